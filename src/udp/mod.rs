//! UDP services (`protocol: udp`): datagrams balanced in sessions. A session is the datagrams
//! between one client address and one listen address; its first datagram picks the backend
//! (every policy, tier and weight, as for TCP), its own socket carries them to that backend (one
//! source per client as the backend sees it), and the backend's answers leave from the exact
//! address the client sent to.
//!
//! - `socket.rs`: the listen socket read in batches with each datagram's destination; the
//!   sessions' backend sockets.
//! - `serve.rs`: the loop of one listen address: admission, the pick, the table, the sends up.
//! - `session.rs`: a session's task: the answers down, its end, its line and counters.
//! - `table.rs`: the bounded session table (pure); `exchange.rs`: `udp.responses` and
//!   `udp.requests` counted (pure).
//! - `stats.rs`: the counters and what `/metrics` exports of them.
//! - `quic.rs`: a QUIC client's Initial packets read for its ClientHello's SNI and ALPN, and
//!   connection IDs read from headers (pure; not called by the listen loop yet).
//!
//! What runs where: each listen address's loop and its sessions' tasks on one data-plane worker,
//! so a session's datagrams are handled on one thread and stay in order.

mod exchange;
// Used by its tests only until the listen loop routes QUIC by SNI (issue 67).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod quic;
mod serve;
mod session;
mod socket;
mod stats;
mod table;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Gate;
use crate::service::Service;
use crate::util::lock;

pub(crate) use stats::{UdpView, METRICS};

/// One bound UDP listen address of one service.
struct Bound {
    service: Arc<str>,
    /// As configured (a port 0 is its own ephemeral port).
    addr: SocketAddr,
    /// Its place in the service's `listen`, which names a port-0 address at an upgrade.
    index: usize,
    local: SocketAddr,
    /// Bound, its loop not started yet.
    pending: Option<std::net::UdpSocket>,
    /// A descriptor kept for an upgrade's new process, and for reading again if that process
    /// fails; closed once the new process serves.
    kept: Option<std::net::UdpSocket>,
    current: Arc<ArcSwap<Service>>,
    /// Ends the loop and its sessions.
    stop: CancellationToken,
    /// Ends the loop only (an upgrade's new process reads the socket): its sessions go on.
    pause: CancellationToken,
}

impl Bound {
    /// The name an upgrade gives a port-0 address's socket, the only way to find it again.
    fn handover_name(&self) -> Option<String> {
        (self.addr.port() == 0).then(|| handover_name(&self.service, self.index))
    }
}

fn handover_name(service: &str, index: usize) -> String {
    format!("{service}#{index}/udp")
}

/// Every UDP listen address, their loops and their counters. Its lock is a leaf: nothing else is
/// locked while it is held.
#[derive(Default)]
pub(crate) struct Udp {
    bound: Mutex<Vec<Bound>>,
    stats: stats::Registry,
    /// Set when the drain begins: no new sessions.
    draining: CancellationToken,
}

/// A UDP address that could not be bound.
#[derive(Debug)]
pub(crate) struct BindFailed {
    pub(crate) service: String,
    pub(crate) addr: SocketAddr,
    pub(crate) error: std::io::Error,
}

/// What the loops run with, from the server.
pub(crate) struct Plane<'a> {
    pub(crate) workers: &'a [tokio::runtime::Handle],
    pub(crate) gate: &'a Arc<Gate>,
    pub(crate) tracker: &'a TaskTracker,
    /// The drain deadline: ends every open session.
    pub(crate) deadline: &'a CancellationToken,
}

/// Addresses bound for a reload or the start, not yet in use: dropped, they close.
pub(crate) struct Fresh(Vec<(Arc<str>, usize, SocketAddr, std::net::UdpSocket)>);

/// A UDP service as the server runs it: its name, its current version, its listen addresses.
pub(crate) type Wanted = (Arc<str>, Arc<ArcSwap<Service>>, Vec<SocketAddr>);

impl Udp {
    /// Binds the addresses of `wanted` not bound yet; nothing changes until [`Udp::commit`], and
    /// on an error nothing stays bound.
    pub(crate) fn bind_missing(
        &self,
        wanted: &[(Arc<str>, Vec<SocketAddr>)],
    ) -> Result<Fresh, BindFailed> {
        let bound = lock(&self.bound);
        let mut fresh = Vec::new();
        for (name, addrs) in wanted {
            for (index, &addr) in addrs.iter().enumerate() {
                if bound.iter().any(|b| b.service == *name && b.addr == addr) {
                    continue;
                }
                let fail = |error| BindFailed {
                    service: name.to_string(),
                    addr,
                    error,
                };
                // Given by the process this one replaces first, as TCP listeners are (systemd's
                // sockets are taken for TCP only so far).
                let names = [name.to_string(), handover_name(name, index)];
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let socket = match crate::sockets::take_udp(addr, &names) {
                    Ok(Some(s)) => {
                        tracing::info!(listen = ?s.local_addr().ok(), configured = %addr, "taking over a UDP socket given to this process");
                        s
                    }
                    Ok(None) => socket::bind(addr).map_err(fail)?,
                    Err(e) => return Err(fail(std::io::Error::other(e))),
                };
                fresh.push((name.clone(), index, addr, socket));
            }
        }
        Ok(Fresh(fresh))
    }

    /// The addresses as `wanted` has them: those no longer wanted stop (their loops and open
    /// sessions end), `fresh` ones join (started by [`Udp::start`]). Kept ones go on reading
    /// their service's versions through the holder they started with, which a reload swaps.
    pub(crate) fn commit(&self, fresh: Fresh, wanted: &[Wanted]) {
        let mut bound = lock(&self.bound);
        bound.retain(|b| {
            let keep = wanted
                .iter()
                .any(|(n, _, addrs)| *n == b.service && addrs.contains(&b.addr));
            if !keep {
                b.stop.cancel();
                tracing::info!(service = %b.service, listen = %b.local, "UDP listener closed");
            }
            keep
        });
        for (name, index, addr, socket) in fresh.0 {
            let Some((_, current, _)) = wanted.iter().find(|(n, _, _)| *n == name) else {
                continue;
            };
            let (Ok(local), Ok(kept)) = (socket.local_addr(), socket.try_clone()) else {
                continue;
            };
            bound.push(Bound {
                service: name,
                addr,
                index,
                local,
                pending: Some(socket),
                kept: Some(kept),
                current: current.clone(),
                stop: CancellationToken::new(),
                pause: CancellationToken::new(),
            });
        }
        let names: Vec<Arc<str>> = wanted.iter().map(|(n, _, _)| n.clone()).collect();
        self.stats.retain(&names);
    }

    /// Starts the loop of every address bound and not started yet, spread over the workers.
    pub(crate) fn start(&self, plane: &Plane<'_>) {
        let mut bound = lock(&self.bound);
        for (i, b) in bound.iter_mut().enumerate() {
            let Some(socket) = b.pending.take() else {
                continue;
            };
            let Some(handle) = plane.workers.get(i % plane.workers.len().max(1)) else {
                continue;
            };
            let stats = self.stats.of(&b.service);
            let (current, stop, local) = (b.current.clone(), b.stop.clone(), b.local);
            let pause = b.pause.clone();
            let (gate, tracker) = (plane.gate.clone(), plane.tracker.clone());
            let (draining, deadline) = (self.draining.clone(), plane.deadline.clone());
            tracing::info!(service = %b.service, listen = %local, protocol = "udp", "listening");
            handle.spawn(async move {
                // Registered with this worker's runtime, which is why it is done here.
                let listening = match socket::Listening::register(socket) {
                    Ok(l) => Arc::new(l),
                    Err(e) => {
                        tracing::error!(listen = %local, error = %e, "cannot register the UDP socket");
                        return;
                    }
                };
                serve::serve(serve::Loop {
                    listening,
                    service: current,
                    stats,
                    gate,
                    tracker,
                    draining,
                    deadline,
                    stop,
                    pause,
                })
                .await;
            });
        }
    }

    /// The drain began: new sessions are refused; open ones go on to their end.
    pub(crate) fn drain(&self) {
        self.draining.cancel();
    }

    /// Stops every loop (their sessions end as `shutdown`).
    pub(crate) fn stop(&self) {
        for b in lock(&self.bound).iter() {
            b.stop.cancel();
        }
    }

    /// A descriptor of every UDP socket for an upgrade's new process, with the name it finds a
    /// port-0 one by.
    pub(crate) fn handover_sockets(
        &self,
    ) -> std::io::Result<Vec<(Option<String>, std::os::fd::OwnedFd)>> {
        lock(&self.bound)
            .iter()
            .filter_map(|b| Some((b.handover_name(), b.kept.as_ref()?)))
            .map(|(name, s)| Ok((name, s.try_clone()?.into())))
            .collect()
    }

    /// An upgrade's new process reads the sockets now: the loops stop reading, their open
    /// sessions go on (answering from the same sockets) until they end.
    pub(crate) fn pause(&self) {
        for b in lock(&self.bound).iter_mut() {
            b.pause.cancel();
            b.pending.take();
        }
    }

    /// The new process failed before it served: the loops read again, from the kept descriptors.
    pub(crate) fn resume(&self) {
        for b in lock(&self.bound).iter_mut() {
            if !b.pause.is_cancelled() {
                continue;
            }
            match b.kept.as_ref().map(std::net::UdpSocket::try_clone) {
                Some(Ok(dup)) => {
                    b.pause = CancellationToken::new();
                    b.pending = Some(dup);
                }
                Some(Err(e)) => tracing::error!(listen = %b.local, error = %e,
                    "cannot read a UDP socket again after a failed upgrade; its clients go unanswered until a restart"),
                None => {}
            }
        }
    }

    /// The new process serves: the kept descriptors close (the sockets stay, held by it and by
    /// the sessions still answering here).
    pub(crate) fn close_kept(&self) {
        for b in lock(&self.bound).iter_mut() {
            b.kept.take();
        }
    }

    /// Where service `name` listens for datagrams, as bound.
    pub(crate) fn locals(&self, name: &str) -> Vec<SocketAddr> {
        lock(&self.bound)
            .iter()
            .filter(|b| &*b.service == name)
            .map(|b| b.local)
            .collect()
    }

    /// Every UDP service's counters now.
    pub(crate) fn views(&self) -> Vec<UdpView> {
        self.stats.views()
    }
}
