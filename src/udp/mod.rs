//! UDP services (`protocol: udp`): datagrams balanced in sessions. A session is the datagrams
//! between one client address and one listen address; its first datagram picks the backend
//! (every policy, tier and weight, as for TCP), its own socket carries them to that backend (one
//! source per client as the backend sees it), and the backend's answers leave from the exact
//! address the client sent to.
//!
//! - `socket.rs`: the listen socket read in batches with each datagram's destination; the
//!   sessions' backend sockets, read in batches too; sends of several datagrams at once (GSO).
//! - `serve.rs`: the loop of one listen address: admission, the pick, the table, the sends up.
//! - `outbox.rs`: a receive batch's datagrams gathered per session for the sends up.
//! - `gso.rs`: which datagrams to one destination go as one send, and a refused send's fallback
//!   (pure).
//! - `session.rs`: a session's task: the answers down, its end, its line and counters.
//! - `table.rs`: the bounded session table (pure); `exchange.rs`: `udp.responses` and
//!   `udp.requests` counted (pure).
//! - `stats.rs`: the counters and what `/metrics` exports of them.
//! - `quic.rs`: a QUIC client's Initial packets read for its ClientHello's SNI and ALPN, and
//!   connection IDs read from headers (pure); `pending.rs`: new QUIC clients of a shared address
//!   held until their hello is whole (pure); `follow.rs`: connection IDs to their sessions, so a
//!   client whose address changes stays on its backend (pure).
//!
//! Several UDP services may share an address, told apart by the server name (and protocols) of
//! QUIC Initials, with [`crate::route::Table`]'s rules: one socket and one loop serve the address,
//! and each session belongs to the service its first datagrams were routed to.
//!
//! What runs where: each listen address's loop and its sessions' tasks on one data-plane worker,
//! so a session's datagrams are handled on one thread and stay in order.

mod exchange;
mod follow;
mod gso;
mod outbox;
mod pending;
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
use crate::config::RouteKeys;
use crate::route;
use crate::service::Service;
use crate::util::lock;

pub(crate) use stats::{CountsView, UdpBackendView, UdpView, BACKEND_METRICS, METRICS};

/// A service an address's datagrams may be routed to.
pub(crate) struct Target {
    pub(crate) name: Arc<str>,
    pub(crate) service: Arc<ArcSwap<Service>>,
    pub(crate) stats: Arc<stats::UdpStats>,
    /// Cancelled when the service leaves the address (a reload): its sessions there end.
    pub(crate) leave: CancellationToken,
}

/// What one listen address's loop reads, swapped as a whole by a reload.
pub(crate) struct Routes {
    pub(crate) table: route::Table<Target>,
    /// Its datagrams are QUIC: connections are followed by their IDs.
    pub(crate) quic: bool,
}

impl Routes {
    /// The service of an address that needs no ClientHello read to route.
    pub(crate) fn only(&self) -> Option<&Target> {
        self.table.only()
    }

    /// The route of service `name`, if it is still on the address.
    pub(crate) fn target_of(&self, name: &str) -> Option<&Target> {
        self.table.targets().find(|t| &*t.name == name)
    }

    /// Where datagrams no service takes are counted: the default route's, else the first's.
    pub(crate) fn fallback(&self) -> Option<&Target> {
        self.table
            .choose(None, &[])
            .map(|c| c.target)
            .or_else(|| self.table.targets().next())
    }

    /// The largest `max_datagram` of its services: the bound before a route is known.
    pub(crate) fn max_datagram(&self) -> usize {
        self.table
            .targets()
            .map(|t| t.service.load().udp.max_datagram as usize)
            .max()
            .unwrap_or(0)
    }
}

/// One bound UDP listen address, of one service or shared by several.
struct Bound {
    /// The first service listing it, and its place in that service's `listen`: the name an
    /// upgrade finds a port-0 address's socket by.
    service: Arc<str>,
    /// As configured (a port 0 is its own ephemeral port).
    addr: SocketAddr,
    index: usize,
    local: SocketAddr,
    /// Bound, its loop not started yet.
    pending: Option<std::net::UdpSocket>,
    /// A descriptor kept for an upgrade's new process, and for reading again if that process
    /// fails; closed once the new process serves.
    kept: Option<std::net::UdpSocket>,
    routes: Arc<ArcSwap<Routes>>,
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

/// A UDP service as the server runs it.
pub(crate) struct Wanted {
    pub(crate) name: Arc<str>,
    /// Its current version, which a reload swaps.
    pub(crate) current: Arc<ArcSwap<Service>>,
    pub(crate) addrs: Vec<SocketAddr>,
    /// What it answers for on a shared address.
    pub(crate) keys: RouteKeys,
    pub(crate) quic: bool,
}

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
                // One socket per address, whatever number of services share it.
                let port_zero = addr.port() == 0;
                let same = |b_service: &str, b_addr: SocketAddr| {
                    b_addr == addr && (!port_zero || b_service == &**name)
                };
                if bound.iter().any(|b| same(&b.service, b.addr))
                    || fresh
                        .iter()
                        .any(|(n, _, a, _): &(Arc<str>, _, _, _)| same(n, *a))
                {
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
            let keep = self.routes_of(b.addr, &b.service, wanted, None).is_some();
            if !keep {
                b.stop.cancel();
                tracing::info!(service = %b.service, listen = %b.local, "UDP listener closed");
            }
            keep
        });
        for b in bound.iter() {
            let old = b.routes.load();
            if let Some(routes) = self.routes_of(b.addr, &b.service, wanted, Some(&old)) {
                // A service staying keeps its sessions; one leaving ends its sessions here.
                for t in old.table.targets() {
                    if routes.target_of(&t.name).is_none() {
                        t.leave.cancel();
                    }
                }
                b.routes.store(Arc::new(routes));
            }
        }
        for (name, index, addr, socket) in fresh.0 {
            let Some(routes) = self.routes_of(addr, &name, wanted, None) else {
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
                routes: Arc::new(ArcSwap::from_pointee(routes)),
                stop: CancellationToken::new(),
                pause: CancellationToken::new(),
            });
        }
        let names: Vec<Arc<str>> = wanted.iter().map(|w| w.name.clone()).collect();
        self.stats.retain(&names);
    }

    /// The routes of `addr` (bound for service `first`) as `wanted` has them, a service already
    /// on it (in `old`) keeping its sessions' token; `None`: no service listens there now. A
    /// port-0 address is one service's own.
    fn routes_of(
        &self,
        addr: SocketAddr,
        first: &str,
        wanted: &[Wanted],
        old: Option<&Routes>,
    ) -> Option<Routes> {
        let on_it = wanted
            .iter()
            .filter(|w| w.addrs.contains(&addr) && (addr.port() != 0 || &*w.name == first));
        let routes: Vec<(RouteKeys, Target)> = on_it
            .clone()
            .map(|w| {
                let target = Target {
                    name: w.name.clone(),
                    service: w.current.clone(),
                    stats: self.stats.of(&w.name),
                    leave: old
                        .and_then(|o| o.target_of(&w.name))
                        .map_or_else(CancellationToken::new, |t| t.leave.clone()),
                };
                (w.keys.clone(), target)
            })
            .collect();
        if routes.is_empty() {
            return None;
        }
        let quic = on_it.clone().any(|w| w.quic) || routes.len() > 1;
        Some(Routes {
            table: route::Table::new(routes),
            quic,
        })
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
            let (routes, stop, local) = (b.routes.clone(), b.stop.clone(), b.local);
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
                    routes,
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
            .filter(|b| {
                b.routes
                    .load()
                    .table
                    .targets()
                    .any(|t| &*t.service.load().name == name)
            })
            .map(|b| b.local)
            .collect()
    }

    /// Where a QUIC client reaching `listen` (as bound, or as configured) with server name `sni`
    /// and protocols `alpn` would go now, and why: `None` when no UDP service listens there,
    /// `Some(None)` when no route takes it. A datagram that is not a QUIC Initial is routed as one
    /// without a name.
    pub(crate) fn explain(
        &self,
        listen: SocketAddr,
        sni: Option<&str>,
        alpn: &[Vec<u8>],
    ) -> Option<Option<(Arc<Service>, &'static str)>> {
        let bound = lock(&self.bound);
        let b = bound
            .iter()
            .find(|b| b.local == listen)
            .or_else(|| bound.iter().find(|b| b.addr == listen))?;
        let routes = b.routes.load();
        let chosen = routes.table.explain(sni, alpn);
        Some(chosen.map(|(t, why)| (t.service.load_full(), why)))
    }

    /// Every UDP service's counters now.
    pub(crate) fn views(&self) -> Vec<UdpView> {
        self.stats.views()
    }

    /// Every UDP service's backends' counters now.
    pub(crate) fn backend_views(&self) -> Vec<UdpBackendView> {
        self.stats.backend_views()
    }
}
