//! Probes over UDP. The socket is connected to the backend, so the kernel drops datagrams from
//! anyone else and reports the backend host's ICMP port-unreachable as `ECONNREFUSED` on the next
//! send or receive: a closed port fails the probe at once instead of at its timeout. `kind: udp`
//! runs the `steps` on it (each send one datagram, each expect the next reply datagram); `kind:
//! dns` (`dns.rs`) sends its query on it. The caller bounds the whole by the probe's timeout.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use super::exchange::{expected, quote, satisfied, to_send};
use super::ProbeError;
use crate::config::ProbeStep;
use crate::util::is_local_exhaustion;

/// A UDP socket connected to one backend, and the probe kind it serves (which its errors name).
#[derive(Debug)]
pub(super) struct Datagrams {
    sock: UdpSocket,
    kind: &'static str,
}

impl Datagrams {
    /// A socket on an ephemeral port of the backend's address family, connected to `addr`.
    pub(super) async fn connect(addr: SocketAddr, kind: &'static str) -> Result<Self, ProbeError> {
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // Out of descriptors or buffers here is this process's state, not the backend's: no verdict.
        let sock = UdpSocket::bind(local)
            .await
            .map_err(ProbeError::connecting)?;
        sock.connect(addr).await.map_err(ProbeError::connecting)?;
        Ok(Datagrams { sock, kind })
    }

    /// Sends `bytes` as one datagram.
    pub(super) async fn send(&self, bytes: &[u8]) -> Result<(), ProbeError> {
        self.sock
            .send(bytes)
            .await
            .map(drop)
            .map_err(|e| self.failed(e, ProbeError::Write))
    }

    /// The next datagram from the backend, cut to `buf`'s length (the kernel drops the rest).
    pub(super) async fn recv(&self, buf: &mut [u8]) -> Result<usize, ProbeError> {
        // tokio waits for error readiness too here, so a queued ICMP error wakes the receive.
        self.sock
            .recv(buf)
            .await
            .map_err(|e| self.failed(e, ProbeError::Read))
    }

    /// A send or receive that failed: the port is closed (ICMP), this process is short of
    /// buffers (no verdict), or `other`.
    fn failed(&self, e: io::Error, other: fn(io::Error) -> ProbeError) -> ProbeError {
        if e.raw_os_error() == Some(libc::ECONNREFUSED) {
            ProbeError::Unreachable(self.kind)
        } else if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            other(e)
        }
    }
}

/// `kind: udp`: the steps over a socket connected to `addr`. A send is one datagram; an expect
/// reads the next reply datagram, at most `cap` bytes of it, and that datagram must satisfy it
/// (a reply is not accumulated with the next one, as a TCP stream's bytes are).
pub(super) async fn steps(
    addr: SocketAddr,
    steps: &[ProbeStep],
    cap: usize,
) -> Result<(), ProbeError> {
    let d = Datagrams::connect(addr, "udp").await?;
    let mut buf = vec![0u8; cap];
    for (k, step) in steps.iter().enumerate() {
        if let Some(bytes) = to_send(step) {
            d.send(bytes).await?;
            continue;
        }
        let n = d.recv(&mut buf).await?;
        let reply = &buf[..n];
        if satisfied(step, reply) == Some(false) {
            return Err(ProbeError::Expect(format!(
                "udp: step {k}: reply did not match {}: {}",
                expected(step),
                quote(reply)
            )));
        }
    }
    Ok(())
    // Dropping the socket closes it; a late reply is refused by the kernel.
}
