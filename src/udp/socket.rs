//! The listening side of a UDP service: one socket per listen address, read in batches
//! (`recvmmsg`, and UDP GRO where the kernel has it) with the address each datagram was sent to
//! (`IP_PKTINFO`/`IPV6_RECVPKTINFO`), and answered from that exact address, so a wildcard bind
//! answers as the address the client asked. quinn-udp (the QUIC project's UDP layer) does the
//! control messages; the crate stays free of `unsafe`.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams read per system call at most, from a listen socket or a session's backend socket
/// (each into its own buffer, with GRO several datagrams of one sender in one).
pub(crate) const BATCH: usize = if BATCH_SIZE < 16 { BATCH_SIZE } else { 16 };

/// Room for one receive: with GRO the kernel may hand over up to 64 segments of one flow in one
/// buffer, at most 64 KiB in all.
const BUF: usize = 65_536;

/// A bound UDP listen socket and what reading it in batches needs.
#[derive(Debug)]
pub(crate) struct Listening {
    socket: UdpSocket,
    state: UdpSocketState,
    /// What sends to the backends (from the sessions' sockets) need: whether the kernel takes
    /// GSO, apart from the listen socket's, as a refusal on one path says nothing of the other.
    up: UdpSocketState,
    pub(crate) local: SocketAddr,
}

/// What one read of a socket came to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Read {
    /// Datagrams read (GRO segments counted one by one).
    pub(crate) datagrams: usize,
    /// The kernel had fewer than a batch: the socket is empty now.
    pub(crate) drained: bool,
}

/// One datagram of a batch: who sent it, where to, and its bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received<'a> {
    pub(crate) from: SocketAddr,
    /// The address it was sent to (the bound one when the kernel did not say).
    pub(crate) to: SocketAddr,
    pub(crate) bytes: &'a [u8],
}

/// Opens a UDP socket on `addr`, not registered with any runtime yet (the worker that reads it
/// registers it, [`Listening::register`]). An IPv6 wildcard takes IPv6 only, as the TCP listeners
/// do, so `[::]` and `0.0.0.0` can both be listed.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl Listening {
    /// Registers `socket` with the current runtime and turns on what batches and the destination
    /// address need.
    pub(crate) fn register(socket: std::net::UdpSocket) -> io::Result<Listening> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // Asked once of a socket of no use besides (quinn-udp sets its options on it).
        let up = UdpSocketState::new(UdpSockRef::from(&socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            None,
        )?))?;
        // quinn-udp forbids fragmentation (QUIC probes its path MTU); a balancer carries what its
        // clients and backends send, as a router would, so large datagrams may be fragmented.
        allow_fragments(&socket)?;
        let local = socket.local_addr()?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Listening {
            socket,
            state,
            up,
            local,
        })
    }

    /// Waits for datagrams and reads a batch of them into `bufs`; `f` sees each one (GRO segments
    /// split back into datagrams). Returns how many were read.
    pub(crate) async fn recv_batch(
        &self,
        bufs: &mut Bufs,
        mut f: impl FnMut(Received<'_>),
    ) -> io::Result<usize> {
        let mut meta = [RecvMeta::default(); BATCH];
        let n = loop {
            self.socket.readable().await?;
            match try_recv(&self.socket, &self.state, bufs, &mut meta) {
                Ok((0, _)) => continue,
                Ok((n, _)) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        let mut datagrams = 0;
        for_each(&meta[..n], bufs, |m, bytes| {
            let to = m.dst_ip.map_or(self.local, |ip| {
                SocketAddr::new(unmapped(ip), self.local.port())
            });
            datagrams += 1;
            f(Received {
                from: m.addr,
                to,
                bytes,
            });
        });
        Ok(datagrams)
    }

    /// Reads a batch of what the backend sent on a session's socket `socket`, without waiting
    /// (`WouldBlock` when there was nothing); `f` sees each datagram.
    pub(crate) fn recv_backend(
        &self,
        socket: &UdpSocket,
        bufs: &mut Bufs,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<Read> {
        let mut meta = [RecvMeta::default(); BATCH];
        let (n, drained) = try_recv(socket, &self.state, bufs, &mut meta)?;
        let mut datagrams = 0;
        for_each(&meta[..n], bufs, |_, bytes| {
            datagrams += 1;
            f(bytes);
        });
        Ok(Read { datagrams, drained })
    }

    /// Sends `bytes` to `client` from `from` (the address the client sent to), without waiting:
    /// several datagrams of `segment` bytes each (the last one possibly shorter) when `segment` is
    /// given, else one. `WouldBlock` when the socket's send buffer is full; other errors (a client
    /// gone) are the caller's to count.
    pub(crate) fn try_send_to(
        &self,
        client: SocketAddr,
        from: IpAddr,
        bytes: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: client,
            ecn: None,
            contents: bytes,
            segment_size: segment,
            src_ip: (!from.is_unspecified()).then_some(from),
        };
        // Straight to the kernel: nothing here waits for room, so tokio's readiness is not asked.
        self.state.try_send(UdpSockRef::from(&self.socket), &t)
    }

    /// Sends `bytes` to `backend` on a session's socket `socket` (connected to it), as
    /// [`Listening::try_send_to`] does: several datagrams with GSO when `segment` is given.
    pub(crate) fn try_send_up(
        &self,
        socket: &UdpSocket,
        backend: SocketAddr,
        bytes: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let Some(segment) = segment else {
            return try_send(socket, bytes).map(|_| ());
        };
        let t = Transmit {
            destination: backend,
            ecn: None,
            contents: bytes,
            segment_size: Some(segment),
            src_ip: None,
        };
        self.up.try_send(UdpSockRef::from(socket), &t)
    }

    /// Datagrams one send takes, at most: to the clients (`Direction::Down`) or to the backends.
    /// 1 where the kernel has no GSO, or refused it (quinn-udp then stops asking for it).
    pub(crate) fn max_segments(&self, dir: super::stats::Direction) -> usize {
        match dir {
            super::stats::Direction::Down => self.state.max_gso_segments(),
            super::stats::Direction::Up => self.up.max_gso_segments(),
        }
    }
}

/// Reads a batch from `socket` without waiting: how many messages, and whether that was fewer
/// than asked (the kernel's queue is empty now). Fewer is told to tokio as `WouldBlock`, so it
/// forgets the socket's readiness and the next read waits for new datagrams instead of asking
/// the kernel again only to hear it has none (tokio keeps the readiness if an event came since).
fn try_recv(
    socket: &UdpSocket,
    state: &UdpSocketState,
    bufs: &mut Bufs,
    meta: &mut [RecvMeta; BATCH],
) -> io::Result<(usize, bool)> {
    let mut got = 0;
    let r = socket.try_io(Interest::READABLE, || {
        let mut slices: Vec<IoSliceMut<'_>> = bufs
            .0
            .iter_mut()
            .map(|b| IoSliceMut::new(&mut b[..]))
            .collect();
        got = state.recv(UdpSockRef::from(socket), &mut slices, meta)?;
        if got < slices.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok((got, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok((got, true)),
        Err(e) => Err(e),
    }
}

/// Each datagram of a batch read into `bufs`, GRO segments split back into datagrams.
fn for_each(meta: &[RecvMeta], bufs: &Bufs, mut f: impl FnMut(&RecvMeta, &[u8])) {
    for (m, buf) in meta.iter().zip(&bufs.0) {
        let stride = m.stride.max(1);
        for bytes in buf[..m.len.min(buf.len())].chunks(stride) {
            f(m, bytes);
        }
        // A zero-length datagram has no chunk.
        if m.len == 0 {
            f(m, &[]);
        }
    }
}

/// An IPv4 address the kernel reported as IPv4-mapped IPv6 is the IPv4 one.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(target_os = "linux")]
fn allow_fragments(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    use rustix::net::sockopt;
    let ipv4 = socket2::SockRef::from(socket).local_addr()?.is_ipv4();
    if ipv4 {
        sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::DONT)?;
    } else {
        sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::DONT)?;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn allow_fragments(_: &impl std::os::fd::AsFd) -> io::Result<()> {
    Ok(())
}

/// The receive buffers of one listen socket's loop, or of one worker's session sockets: [`BATCH`]
/// of 64 KiB, allocated once.
pub(crate) struct Bufs(Vec<Box<[u8]>>);

impl Bufs {
    pub(crate) fn new() -> Bufs {
        Bufs(
            (0..BATCH)
                .map(|_| vec![0u8; BUF].into_boxed_slice())
                .collect(),
        )
    }
}

/// An unconnected socket of the family of `backend`, for `per_packet` sends (blocking never:
/// a full send buffer drops the datagram).
pub(crate) fn unconnected(backend: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(unspecified(backend))?;
    socket.set_nonblocking(true)?;
    allow_fragments(&socket)?;
    Ok(socket)
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    if like.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

/// Sends one datagram on a session's connected backend socket, without waiting: straight to the
/// kernel, as tokio would refuse a socket registered a moment ago whose readiness its reactor
/// has not seen yet.
pub(crate) fn try_send(socket: &UdpSocket, bytes: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send(bytes)
}

/// Opens a backend socket for one session: bound to an ephemeral port of the family of `backend`
/// and connected to it, so the backend sees one source per client and an ICMP port-unreachable
/// comes back as an error on this socket.
pub(crate) fn connect(backend: SocketAddr) -> io::Result<UdpSocket> {
    // Made non-blocking when made, and bound by the connect itself: a DNS query is a session of
    // its own, so every call saved here is saved per query.
    let ty = socket2::Type::DGRAM.nonblocking();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(backend),
        ty,
        Some(socket2::Protocol::UDP),
    )?;
    let socket: std::net::UdpSocket = socket.into();
    allow_fragments(&socket)?;
    socket.connect(backend)?;
    UdpSocket::from_std(socket)
}

/// Turns on UDP GRO on a session's IPv4 socket, so that a backend's stream is read several
/// datagrams to a buffer: quinn-udp sets it with the rest of its options (about ten system calls,
/// worth it for a stream, not for every session), and fragments are allowed again after it, even
/// when it failed half way. Not on IPv6: quinn-udp also sets `IPV6_DONTFRAG` there, which nothing
/// in this crate's safe socket options can clear, and a datagram over the path MTU would then be
/// refused instead of fragmented.
pub(crate) fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    if socket.local_addr()?.is_ipv6() {
        return Ok(());
    }
    let set = UdpSocketState::new(UdpSockRef::from(socket)).map(drop);
    allow_fragments(socket).and(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::stats::Direction;

    /// 3 x 1,000 bytes and 500: one GSO send's worth.
    fn four() -> (Vec<u8>, Vec<usize>) {
        let bytes = (0..3_500u32).map(|i| (i % 251) as u8).collect();
        (bytes, vec![1_000, 1_000, 1_000, 500])
    }

    fn split(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                bytes[at - n..at].to_vec()
            })
            .collect()
    }

    /// A GSO send arrives as its datagrams both ways: up from a session's socket to the listen
    /// socket (read with GRO, split back), down to the session's socket (read as one batch, which
    /// says it emptied the socket).
    #[tokio::test]
    async fn a_gso_send_arrives_as_its_datagrams_both_ways() {
        let listen = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listening = Listening::register(listen).unwrap();
        assert!(
            listening.max_segments(Direction::Down) > 1
                && listening.max_segments(Direction::Up) > 1,
            "this kernel has UDP GSO (Linux 4.18 and later)"
        );
        let session = connect(listening.local).unwrap();
        let (bytes, sizes) = four();
        let want = split(&bytes, &sizes);

        listening
            .try_send_up(&session, listening.local, &bytes, Some(1_000))
            .unwrap();
        let mut bufs = Bufs::new();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                listening.recv_batch(&mut bufs, |d| got.push(d.bytes.to_vec())),
            );
            read.await.unwrap().unwrap();
        }
        assert!(
            got == want,
            "up: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );

        let to = session.local_addr().unwrap();
        let from = listening.local.ip();
        listening
            .try_send_to(to, from, &bytes, Some(1_000))
            .unwrap();
        let mut got = Vec::new();
        let mut drained = false;
        for _ in 0..100 {
            if got.len() == want.len() {
                break;
            }
            tokio::time::timeout(std::time::Duration::from_secs(5), session.readable())
                .await
                .unwrap()
                .unwrap();
            match listening.recv_backend(&session, &mut bufs, |b| got.push(b.to_vec())) {
                Ok(read) => drained = read.drained,
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        assert!(drained, "fewer than a batch: the socket was emptied");
        assert!(
            got == want,
            "down: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let again = listening.recv_backend(&session, &mut bufs, |_| {});
        assert_eq!(
            again.map(|r| r.datagrams).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "nothing more"
        );
    }
}
