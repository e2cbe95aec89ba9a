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

/// Datagrams read per system call at most.
pub(crate) const BATCH: usize = if BATCH_SIZE < 8 { BATCH_SIZE } else { 8 };

/// Room for one receive: with GRO the kernel may hand over up to 64 segments of one flow in one
/// buffer, at most 64 KiB in all.
const BUF: usize = 65_536;

/// A bound UDP listen socket and what reading it in batches needs.
#[derive(Debug)]
pub(crate) struct Listening {
    socket: UdpSocket,
    state: UdpSocketState,
    pub(crate) local: SocketAddr,
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
        // quinn-udp forbids fragmentation (QUIC probes its path MTU); a balancer carries what its
        // clients and backends send, as a router would, so large datagrams may be fragmented.
        allow_fragments(&socket)?;
        let local = socket.local_addr()?;
        let socket = UdpSocket::from_std(socket)?;
        Ok(Listening {
            socket,
            state,
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
        let n = {
            let mut slices: Vec<IoSliceMut<'_>> = bufs
                .0
                .iter_mut()
                .map(|b| IoSliceMut::new(&mut b[..]))
                .collect();
            self.socket
                .async_io(Interest::READABLE, || {
                    self.state
                        .recv(UdpSockRef::from(&self.socket), &mut slices, &mut meta)
                })
                .await?
        };
        let mut datagrams = 0;
        for (m, buf) in meta.iter().zip(&bufs.0).take(n) {
            let to = m.dst_ip.map_or(self.local, |ip| {
                SocketAddr::new(unmapped(ip), self.local.port())
            });
            let stride = m.stride.max(1);
            for bytes in buf[..m.len.min(buf.len())].chunks(stride) {
                datagrams += 1;
                f(Received {
                    from: m.addr,
                    to,
                    bytes,
                });
            }
            // A zero-length datagram has no chunk.
            if m.len == 0 {
                datagrams += 1;
                f(Received {
                    from: m.addr,
                    to,
                    bytes: &[],
                });
            }
        }
        Ok(datagrams)
    }

    /// Sends `bytes` to `client` from `from` (the address the client sent to), without waiting:
    /// `WouldBlock` when the socket's send buffer is full; other errors (a client gone) are the
    /// caller's to count.
    pub(crate) fn try_send_to(
        &self,
        client: SocketAddr,
        from: IpAddr,
        bytes: &[u8],
    ) -> io::Result<()> {
        let t = Transmit {
            destination: client,
            ecn: None,
            contents: bytes,
            segment_size: None,
            src_ip: (!from.is_unspecified()).then_some(from),
        };
        // Straight to the kernel: nothing here waits for room, so tokio's readiness is not asked.
        self.state.try_send(UdpSockRef::from(&self.socket), &t)
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
fn allow_fragments(socket: &std::net::UdpSocket) -> io::Result<()> {
    use rustix::net::sockopt;
    if socket.local_addr()?.is_ipv4() {
        sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::DONT)?;
    } else {
        sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::DONT)?;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn allow_fragments(_: &std::net::UdpSocket) -> io::Result<()> {
    Ok(())
}

/// The receive buffers of one listen socket's loop: [`BATCH`] of 64 KiB, allocated once.
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
