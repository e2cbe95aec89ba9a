//! Linux `splice(2)`: socket → pipe → socket without copying through user space. One of the
//! modules allowed `unsafe` (src/lib.rs lists them): the `pipe2`, `fcntl` and `splice` calls, each behind a
//! safe function whose descriptors are owned or borrowed (`OwnedFd`, `BorrowedFd`), so none can name
//! a closed one.
//!
//! Pipes are the scarce resource: without CAP_SYS_RESOURCE a user's pipes beyond
//! `/proc/sys/fs/pipe-user-pages-soft` shrink to one page, and every pipe costs two descriptors. So pipes
//! are reused from a pool, the number lent out is capped, a pipe that comes back short is refused, and a
//! connection that cannot get a pipe copies instead.

// Each `unsafe` block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};

/// Default pipe capacity on Linux (16 pages); what a splice moves at most per call.
pub(crate) const PIPE_SIZE: usize = 64 * 1024;
/// Idle pipes kept for reuse.
const MAX_IDLE: usize = 256;

#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else; each OwnedFd
        // becomes their single owner and closes it exactly once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_GETPIPE_SZ only reads the state of an open descriptor we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < PIPE_SIZE as i32 {
            // The per-user pipe budget is spent: a one-page pipe would make splice slower than copying.
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "pipe shrunk: per-user pipe budget exhausted",
            ));
        }
        Ok(Pipe { read, write })
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed for it); null offsets
    // are required for pipes and sockets; no user memory is passed.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether socket `from` has bytes to read that splice(2) will not move. Splice stops at TCP urgent
/// data (the kernel's `tcp_read_sock` does not skip the urgent byte, as a receive does): it returns
/// EAGAIN there, or 0 once the FIN has come too, with ordinary bytes still queued after the mark.
/// A peek reads past the mark without taking anything.
///
/// An error the peek meets (a reset that came since the splice) is returned: a peek clears a
/// socket's error as a receive does, so nothing after it would see the reset. With `fin_in` (the
/// splice said 0) the peek is made twice at most: the queue can no longer change, so its EAGAIN
/// can only be a signal pending at the mark, which the thread takes on the way back.
pub(crate) fn stuck_at_urgent(from: BorrowedFd<'_>, fin_in: bool) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    for _ in 0..if fin_in { 2 } else { 1 } {
        #[cfg(test)]
        if PEEKS_INTERRUPTED.get() > 0 {
            PEEKS_INTERRUPTED.set(PEEKS_INTERRUPTED.get() - 1);
            continue;
        }
        match rustix::net::recv(from, &mut byte[..], peek) {
            Ok((n, _)) => return Ok(n > 0),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

#[cfg(test)]
thread_local! {
    static BROKEN_READS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PEEKS_INTERRUPTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// From now, the next `n` peeks of [`stuck_at_urgent`] on the calling thread say EAGAIN without
/// asking the kernel, as one does when a signal is pending at the urgent mark: nothing can time a
/// signal into that window from outside the system call.
#[cfg(test)]
fn interrupt_peeks_here(n: u32) {
    PEEKS_INTERRUPTED.set(n);
}

/// From now on, on the calling thread, reading the bytes a pipe holds back out of it
/// ([`PipeLease::take_pending`], as a connection stops to be carried) fails with EIO. Nothing
/// outside the process can make a read of its own pipe fail, and what a carried connection does
/// then must be tested; per thread, as every test relays on a thread of its own.
#[cfg(test)]
pub(crate) fn break_reads_here() {
    BROKEN_READS.set(true);
}

/// Pipes kept for reuse, and how many are lent out, against a cap.
pub(crate) struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    lent: AtomicUsize,
    cap: usize,
}

/// The process's pipes, shared by every engine that splices.
pub(crate) fn pool() -> &'static PipePool {
    static POOL: OnceLock<PipePool> = OnceLock::new();
    POOL.get_or_init(|| PipePool::new(default_cap()))
}

/// Pipes lent at most: three quarters of the per-user soft budget of full-size pipes, leaving room for
/// other processes of the same user. (Root with CAP_SYS_RESOURCE is not bound by it, but the cap also
/// bounds descriptors: two per pipe.)
fn default_cap() -> usize {
    let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&p| p > 0)
        .unwrap_or(16384);
    (pages / (PIPE_SIZE / 4096) * 3 / 4).max(2)
}

impl PipePool {
    pub(crate) fn new(cap: usize) -> PipePool {
        PipePool {
            idle: Mutex::new(Vec::new()),
            lent: AtomicUsize::new(0),
            cap,
        }
    }

    /// A pipe, or `None` when the cap is reached or the system cannot give a full-size one.
    pub(crate) fn lend(&'static self) -> Option<PipeLease> {
        if self.lent.fetch_add(1, Relaxed) >= self.cap {
            self.lent.fetch_sub(1, Relaxed);
            return None;
        }
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match reused.map(Ok).unwrap_or_else(Pipe::new) {
            Ok(pipe) => Some(PipeLease {
                pool: self,
                pipe: Some(pipe),
                pending: 0,
            }),
            Err(_) => {
                self.lent.fetch_sub(1, Relaxed);
                None
            }
        }
    }

    /// Pipes lent out now.
    #[cfg(test)]
    pub(crate) fn lent(&self) -> usize {
        self.lent.load(Relaxed)
    }

    /// Pipes waiting for reuse.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A pipe lent from a pool for one direction of one connection. Dropping it returns the pipe for reuse
/// when it is known to be empty, and closes it otherwise.
pub(crate) struct PipeLease {
    pool: &'static PipePool,
    pipe: Option<Pipe>,
    /// Bytes spliced into the pipe and not yet out of it.
    pub pending: usize,
}

impl std::fmt::Debug for PipeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeLease")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl PipeLease {
    /// A pipe from the process-wide pool (see [`PipePool::lend`]).
    pub(crate) fn acquire() -> Option<PipeLease> {
        pool().lend()
    }

    /// Moves up to `len` bytes from socket `from` into the pipe and counts them as pending. `Ok(0)` is end
    /// of stream; `WouldBlock` means the socket has nothing to read now.
    pub(crate) fn fill_from(&mut self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        let pipe = self.pipe.as_ref().ok_or_else(gone)?;
        let n = splice(from, pipe.write.as_fd(), len)?;
        self.pending += n;
        Ok(n)
    }

    /// Fills the pipe from socket `from` as [`PipeLease::fill_from`] does, telling a stop at TCP
    /// urgent data ([`Filled::Stuck`]) from the end of the stream and from an empty socket.
    ///
    /// Splice stops at the urgent mark: EAGAIN there, or 0 once the FIN has come too, with bytes
    /// still queued past the mark, which a peek sees. After EAGAIN, a peek that sees bytes may have
    /// seen ones that came just after the splice, so one more splice decides ([`after_peek`]).
    pub(crate) fn fill_or_stuck(&mut self, from: BorrowedFd<'_>) -> io::Result<Filled> {
        match self.fill_from(from, PIPE_SIZE) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match stuck_at_urgent(from, false)? {
                    true => after_peek(self.fill_from(from, PIPE_SIZE)),
                    false => Err(e),
                }
            }
            Ok(0) if stuck_at_urgent(from, true)? => Ok(Filled::Stuck),
            r => r.map(Filled::Bytes),
        }
    }

    /// Moves pending bytes from the pipe into socket `to`; `WouldBlock` means its send buffer is full.
    pub(crate) fn drain_to(&mut self, to: BorrowedFd<'_>) -> io::Result<usize> {
        let pipe = self.pipe.as_ref().ok_or_else(gone)?;
        let n = splice(pipe.read.as_fd(), to, self.pending)?;
        self.pending -= n;
        Ok(n)
    }

    /// Reads every pending byte out of the pipe into user memory (a connection carried into another
    /// process takes them along), leaving the pipe empty and fit for reuse.
    pub(crate) fn take_pending(&mut self) -> io::Result<Vec<u8>> {
        let pipe = self.pipe.as_ref().ok_or_else(gone)?;
        #[cfg(test)]
        if self.pending > 0 && BROKEN_READS.get() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let mut out = vec![0u8; self.pending];
        let mut got = 0;
        while got < out.len() {
            let rest = &mut out[got..];
            // SAFETY: `rest` is valid writable memory of `rest.len()` bytes for the whole call, and
            // the pipe's read end is open (owned by the lease).
            let n =
                unsafe { libc::read(pipe.read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            match n {
                n if n > 0 => got += n as usize,
                0 => break,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        out.truncate(got);
        self.pending -= got;
        Ok(out)
    }
}

impl Drop for PipeLease {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            // A pipe with bytes still in it would hand them to the next connection: close it instead.
            if self.pending == 0 {
                let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < MAX_IDLE {
                    idle.push(pipe);
                }
            }
        }
        self.pool.lent.fetch_sub(1, Relaxed);
    }
}

/// What one fill of a splicing direction's pipe did.
#[derive(Debug, PartialEq)]
pub(crate) enum Filled {
    /// Bytes moved into the pipe; 0 is the end of the stream.
    Bytes(usize),
    /// Splice stopped at urgent data with bytes past it: only a receive reads on from here.
    Stuck,
}

/// The splice that follows a failed one and a peek that saw bytes: bytes moved mean they had just
/// come; nothing moved means they lie past the urgent mark, whether it says EAGAIN or 0 (the FIN
/// came in between, and bytes the peek saw are still there: taking 0 for the end lost them).
fn after_peek(splice: io::Result<usize>) -> io::Result<Filled> {
    match splice {
        Ok(0) => Ok(Filled::Stuck),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::Stuck),
        r => r.map(Filled::Bytes),
    }
}

fn gone() -> io::Error {
    io::Error::other("pipe already returned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn small_pool(cap: usize) -> &'static PipePool {
        Box::leak(Box::new(PipePool::new(cap)))
    }

    #[test]
    fn the_cap_bounds_lending_and_frees_on_drop() {
        let p = small_pool(2);
        let a = p.lend().expect("first");
        let b = p.lend().expect("second");
        assert!(
            p.lend().is_none(),
            "beyond the cap: the caller copies instead"
        );
        assert_eq!(p.lent(), 2);
        drop(a);
        assert_eq!(p.lent(), 1);
        assert_eq!(p.idle(), 1, "an empty pipe is kept for reuse");
        let c = p.lend().expect("reused");
        assert_eq!(p.idle(), 0);
        drop((b, c));
        assert_eq!(p.lent(), 0);
    }

    #[test]
    fn a_pipe_with_bytes_in_it_is_closed_not_reused() {
        let p = small_pool(4);
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // splice needs a pipe on one side; a socket pair stands in for the TCP socket.
        tx.write_all(b"left over").unwrap();
        let mut lease = p.lend().unwrap();
        let n = lease.fill_from(rx.as_fd(), PIPE_SIZE).expect("splice in");
        assert_eq!(n, 9);
        assert_eq!(lease.pending, 9);
        drop(lease);
        assert_eq!(p.idle(), 0, "dirty pipe closed");
        assert_eq!(p.lent(), 0);
        // and a drained one is reused
        let mut lease = p.lend().unwrap();
        tx.write_all(b"abc").unwrap();
        lease.fill_from(rx.as_fd(), PIPE_SIZE).unwrap();
        let (out_r, out_w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(lease.drain_to(out_w.as_fd()).unwrap(), 3);
        let mut got = [0u8; 3];
        (&out_r).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        drop(lease);
        assert_eq!(p.idle(), 1);
    }

    #[test]
    fn after_a_peek_saw_bytes_a_splice_that_moves_none_is_stuck_at_urgent_data() {
        let again = || Err(io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(after_peek(again()).unwrap(), Filled::Stuck);
        assert_eq!(
            after_peek(Ok(0)).unwrap(),
            Filled::Stuck,
            "the FIN came since"
        );
        assert_eq!(after_peek(Ok(5)).unwrap(), Filled::Bytes(5));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(after_peek(Err(reset)).is_err());
    }

    /// `f` again while it says EAGAIN (bytes on their way over loopback), 1 ms or more apart,
    /// 10,000 times at the most.
    fn once_ready<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        for _ in 0..10_000 {
            match f() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                r => return r,
            }
        }
        f()
    }

    /// The kernel's side of `after_peek`: a socket whose splice stops at the urgent mark says
    /// EAGAIN, then 0 once the FIN is in, with the bytes past the mark still there to receive.
    #[test]
    fn a_splice_stopped_at_urgent_data_says_again_then_0_once_the_fin_is_in() {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        // As the engines' sockets are: a blocking one's splice says 0, not EAGAIN, at the mark.
        s.set_nonblocking(true).unwrap();
        let p = small_pool(1);
        let mut lease = p.lend().unwrap();
        c.write_all(b"before").unwrap();
        socket2::SockRef::from(&c).send_out_of_band(b"U").unwrap();
        c.write_all(b"after").unwrap();
        let mut filled = 0;
        while filled < 6 {
            let n = once_ready(|| lease.fill_from(s.as_fd(), 6 - filled)).unwrap();
            assert_ne!(n, 0, "no end of stream before the mark");
            filled += n;
        }
        assert_eq!(lease.take_pending().unwrap(), b"before");
        let stuck = once_ready(|| lease.fill_or_stuck(s.as_fd())).unwrap();
        assert_eq!(stuck, Filled::Stuck, "EAGAIN at the mark, bytes past it");
        let e = lease
            .fill_from(s.as_fd(), PIPE_SIZE)
            .expect_err("nothing moves");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        c.shutdown(Shutdown::Write).unwrap();
        let fin_in = once_ready(|| lease.fill_from(s.as_fd(), PIPE_SIZE)).unwrap();
        assert_eq!(fin_in, 0, "a splice at the mark once the FIN is in");
        // Here the first splice says 0; the 0 of a second one (the race) is `after_peek`'s, above.
        let stuck = lease.fill_or_stuck(s.as_fd()).unwrap();
        assert_eq!(stuck, Filled::Stuck, "0 at the mark is not the end");
        s.set_nonblocking(false).unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got[..5]).unwrap();
        assert_eq!(&got[..5], b"after", "a receive reads past the mark");
        assert_eq!(s.read(&mut got).unwrap(), 0);
    }

    /// A reset the peek meets is passed on, not cleared into what would read as a clean end.
    #[test]
    fn a_reset_the_peek_meets_is_an_error_not_a_clean_end() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(c);
        let peeked = once_ready(|| {
            stuck_at_urgent(s.as_fd(), false).and_then(|stuck| match stuck {
                // Not yet in: the reset is on its way over loopback.
                false => Err(io::ErrorKind::WouldBlock.into()),
                true => Ok(()),
            })
        });
        let e = peeked.expect_err("the reset, not bytes");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Once the FIN is in (`fin_in`: the splice said 0), a peek at the urgent mark that says
    /// EAGAIN was a signal pending, not an empty queue: the second peek sees the bytes past the
    /// mark. Without the FIN, one peek only (splice's EAGAIN is asked again at the next readiness).
    #[test]
    fn a_peek_interrupted_at_the_mark_is_made_again_once_the_fin_is_in() {
        use std::net::{Shutdown, TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        let sock = socket2::SockRef::from(&c);
        sock.send_out_of_band(b"U").unwrap();
        (&c).write_all(b"after").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let past_the_mark = || {
            stuck_at_urgent(s.as_fd(), false).and_then(|stuck| match stuck {
                true => Ok(()),
                false => Err(io::ErrorKind::WouldBlock.into()),
            })
        };
        once_ready(past_the_mark).expect("bytes past the mark");
        interrupt_peeks_here(1);
        assert!(stuck_at_urgent(s.as_fd(), true).unwrap(), "peeked again");
        interrupt_peeks_here(2);
        assert!(!stuck_at_urgent(s.as_fd(), true).unwrap(), "twice at most");
        interrupt_peeks_here(1);
        assert!(
            !stuck_at_urgent(s.as_fd(), false).unwrap(),
            "once without the FIN"
        );
        assert!(stuck_at_urgent(s.as_fd(), false).unwrap(), "nothing taken");
    }

    #[test]
    fn pending_bytes_are_taken_out_whole() {
        let p = small_pool(4);
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.write_all(b"carried along").unwrap();
        let mut lease = p.lend().unwrap();
        lease.fill_from(rx.as_fd(), PIPE_SIZE).unwrap();
        assert_eq!(lease.take_pending().unwrap(), b"carried along");
        assert_eq!(lease.pending, 0);
        drop(lease);
        assert_eq!(p.idle(), 1, "emptied, so reused");
    }
}
