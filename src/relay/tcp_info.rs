//! What the kernel knows of a TCP connection (`TCP_INFO`): how many bytes its peer has
//! acknowledged, the measure of a destination that still takes bytes (`stall_timeout`). A write
//! that returns says only that the socket's send buffer had room, and a buffer of megabytes
//! drained by a slow reader may have none for longer than the timeout. And what a socket holds
//! unread (`unread`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// The `TCP_INFO` of socket `fd`. Safe whatever `fd` is: the kernel writes only into the struct
/// given (a descriptor that is no socket is an error).
pub(crate) fn of_raw(fd: RawFd) -> io::Result<(libc::tcp_info, usize)> {
    // SAFETY: zeroed bytes are a valid `tcp_info` (integers only).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes, which the call updates; it reads nothing of ours.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info, len as usize))
}

/// The bytes the peer of `fd` has acknowledged so far (`tcpi_bytes_acked`), `None` where the
/// kernel does not say (before Linux 4.1, or not a TCP socket).
pub(crate) fn bytes_acked(fd: RawFd) -> Option<u64> {
    let (info, len) = of_raw(fd).ok()?;
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + std::mem::size_of::<u64>();
    (len >= end).then_some(info.tcpi_bytes_acked)
}

/// Bytes socket `fd` has received and nobody has read yet (FIONREAD), `None` where the kernel
/// does not say. What `first_byte_timeout` asks last: a client whose bytes wait unread (its relay
/// started after its deadline, before its first receive completed) has spoken. Safe whatever `fd`
/// is: the kernel writes one int, into ours.
pub(crate) fn unread(fd: RawFd) -> Option<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is an int the call may write; it reads nothing of ours.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) };
    (rc == 0).then_some(n.max(0) as u32)
}

/// The TCP_INFO of socket `fd`.
#[cfg(test)]
pub(crate) fn tcp_info_fd(fd: RawFd) -> io::Result<libc::tcp_info> {
    of_raw(fd).map(|(info, _)| info)
}

/// Runs of a test that counts segments to tell whether a connect held its handshake's last ACK.
/// The kernel sends a held ACK on its own 200 ms after the connect (the delayed-ACK timer,
/// `TCP_DELACK_MAX` by default), so a run whose counts were read later than that proves nothing
/// either way: a stall could fail it with the holding right, or pass it with the ACK's release
/// gone. A run that took 150 ms or more, from before its connect to its last count, is run again;
/// a third late run panics.
#[cfg(test)]
pub(crate) struct AckTimerRuns {
    started: tokio::time::Instant,
    late: u32,
}

#[cfg(test)]
impl AckTimerRuns {
    pub(crate) fn new() -> AckTimerRuns {
        AckTimerRuns {
            started: tokio::time::Instant::now(),
            late: 0,
        }
    }

    /// A run starts: called before its connect.
    pub(crate) fn start(&mut self) {
        self.started = tokio::time::Instant::now();
    }

    /// Whether this run read its counts in time, so its assertions hold; when not, the caller
    /// runs it again (a third late run panics).
    pub(crate) fn in_time(&mut self, what: &str) -> bool {
        if self.started.elapsed() < std::time::Duration::from_millis(150) {
            return true;
        }
        self.late += 1;
        assert!(
            self.late < 3,
            "{what}: three runs took 150 ms or more, near the delayed-ACK timer"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    /// What a socket holds unread: nothing, then what its peer sent (once it arrived), then
    /// nothing once read.
    #[test]
    fn the_bytes_a_socket_holds_unread_are_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        assert_eq!(unread(b.as_raw_fd()), Some(0));
        a.write_all(b"hello").unwrap();
        // Loopback delivers at once; bounded by count all the same.
        let mut n = Some(0);
        for _ in 0..200 {
            n = unread(b.as_raw_fd());
            if n == Some(5) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(n, Some(5));
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(unread(b.as_raw_fd()), Some(0));
    }

    #[test]
    fn the_bytes_a_peer_took_are_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let before = bytes_acked(a.as_raw_fd()).expect("TCP_INFO says");
        a.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        // The ACK may trail the read by a moment: bounded by count, not by time.
        let mut after = before;
        for _ in 0..200 {
            after = bytes_acked(a.as_raw_fd()).unwrap();
            if after >= before + 1000 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(after - before, 1000);
        assert_eq!(
            bytes_acked(std::io::stdin().as_raw_fd()),
            None,
            "not a socket"
        );
    }
}
