//! One UDP session: the datagrams between one client address and one listen address, sent to
//! its backend from a socket of its own and answered from the address the client sent to. The
//! listen loop ([`super::serve`]) sends the client's datagrams; the session's task carries the
//! backend's back and ends the session (its timer, its count, its backend's errors, a cut), then
//! accounts for it: one routing-log line, the counters, its slots given back.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::exchange::{Counted, Exchange};
use super::socket::Listening;
use super::stats::{Direction, Dropped, End, UdpStats};
use crate::admission::{GateSlot, SourceSlot};
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::service::Service;
use crate::util::lock;

/// What the loop and the session's task share of a session.
#[derive(Debug)]
pub(crate) struct Live {
    /// Connected to the backend.
    pub(crate) socket: UdpSocket,
    pub(crate) backend: Arc<Backend>,
    pub(crate) client: SocketAddr,
    /// Where the client sent to: the address its answers leave from.
    pub(crate) to: SocketAddr,
    /// Milliseconds since the loop's epoch of the last datagram either way.
    last: AtomicU64,
    pub(crate) exchange: Mutex<Exchange>,
    bytes: [AtomicU64; 2],
    why: OnceLock<End>,
    stop: CancellationToken,
    /// The loop's clock: activity is stamped against it.
    epoch: Instant,
}

impl Live {
    pub(crate) fn new(
        socket: UdpSocket,
        backend: Arc<Backend>,
        client: SocketAddr,
        to: SocketAddr,
        exchange: Exchange,
        epoch: Instant,
    ) -> Live {
        let live = Live {
            socket,
            backend,
            client,
            to,
            last: AtomicU64::new(0),
            exchange: Mutex::new(exchange),
            bytes: Default::default(),
            why: OnceLock::new(),
            stop: CancellationToken::new(),
            epoch,
        };
        live.touch();
        live
    }

    /// A datagram went one way or the other now.
    pub(crate) fn touch(&self) {
        self.last.store(self.now_ms(), Relaxed);
    }

    pub(crate) fn last_active(&self) -> u64 {
        self.last.load(Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn carried(&self, dir: Direction, len: usize) {
        self.bytes[dir as usize].fetch_add(len as u64, Relaxed);
    }

    /// Ends the session (the first reason given stands).
    pub(crate) fn end(&self, why: End) {
        let _ = self.why.set(why);
        self.stop.cancel();
    }

    pub(crate) fn ended(&self) -> bool {
        self.stop.is_cancelled()
    }

    pub(crate) fn end_reason(&self) -> Option<End> {
        self.why.get().copied()
    }
}

/// What a session holds until it ends: its places in the service, the backend and the source
/// limits, given back when dropped (the guards count by being held).
pub(crate) struct Slots {
    pub(crate) _active: ActiveGuard,
    pub(crate) _source: Option<SourceSlot>,
    pub(crate) service: Arc<Service>,
    /// The backend's cut signal as it was when the session picked it.
    pub(crate) cut: Arc<CutSignal>,
    /// Its place under the top-level `max_connections`.
    pub(crate) _gate: GateSlot,
    /// Its start among the service's open sessions (the oldest one's age).
    pub(crate) since: u64,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.service.stats.left();
        self.service.occupancy.sessions.leave(self.since);
    }
}

/// Everything the session's task needs besides [`Live`].
pub(crate) struct Task {
    pub(crate) live: Arc<Live>,
    pub(crate) slots: Slots,
    pub(crate) listening: Arc<Listening>,
    pub(crate) stats: Arc<UdpStats>,
    pub(crate) idle: Duration,
    pub(crate) max_datagram: usize,
    /// The drain deadline, or the service's removal: ends it as `shutdown`.
    pub(crate) shutdown: CancellationToken,
    /// Tells the loop the session is gone, so its table forgets it.
    pub(crate) gone: tokio::sync::mpsc::UnboundedSender<u64>,
    pub(crate) id: u64,
    pub(crate) started: Instant,
}

thread_local! {
    /// One buffer per thread for the backend's datagrams: a session holds none of its own, so a
    /// hundred thousand idle sessions cost no buffer memory. Used only between an await and the
    /// next, never across one.
    static DOWN: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; 65_536].into_boxed_slice());
}

/// Carries the backend's datagrams to the client until the session ends, then accounts for it.
pub(crate) async fn run(t: Task) {
    let end = carry(&t).await;
    t.live.end(end);
    let end = t.live.why.get().copied().unwrap_or(end);
    if end == End::BackendUnreachable {
        t.slots.service.pool.connect_failed(&t.live.backend);
    }
    account(&t, end);
    let _ = t.gone.send(t.id);
}

/// The session's life: the first way it ends.
async fn carry(t: &Task) -> End {
    let live = &t.live;
    loop {
        let idle_until = live.epoch + Duration::from_millis(live.last_active()) + t.idle;
        tokio::select! {
            biased;
            () = live.stop.cancelled() => return live.why.get().copied().unwrap_or(End::Shutdown),
            () = t.shutdown.cancelled() => return End::Shutdown,
            () = t.slots.cut.cancelled() => {
                return match t.slots.cut.reason() {
                    Outcome::BackendDown => End::BackendDown,
                    _ => End::BackendRemoved,
                };
            }
            () = tokio::time::sleep_until(idle_until) => {
                // Active meanwhile (the loop stamps the client's datagrams): wait again.
                if live.epoch + Duration::from_millis(live.last_active()) + t.idle <= Instant::now() {
                    return End::IdleTimeout;
                }
            }
            r = live.socket.readable() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "backend socket failed");
                    return End::BackendUnreachable;
                }
                if let Some(end) = down(t) {
                    return end;
                }
            }
        }
    }
}

/// Reads what the backend sent, as much as is there without waiting, and sends it on.
fn down(t: &Task) -> Option<End> {
    let live = &t.live;
    DOWN.with(|buf| {
        let mut buf = buf.borrow_mut();
        loop {
            let n = match live.socket.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNREFUSED: the backend's port is closed (ICMP port-unreachable).
                    tracing::debug!(error = %e, backend = %live.backend.addr, "backend unreachable");
                    return Some(End::BackendUnreachable);
                }
            };
            live.touch();
            if n > t.max_datagram {
                t.stats.dropped(Dropped::TooLarge);
                continue;
            }
            match t.listening.try_send_to(live.client, live.to.ip(), &buf[..n]) {
                Ok(()) => {
                    t.stats.carried(Direction::Down, n);
                    live.carried(Direction::Down, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    t.stats.dropped(Dropped::QueueFull);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "sending to the client failed");
                    continue;
                }
            }
            if let Some(c) = lock(&live.exchange).down() {
                return Some(match c {
                    Counted::Responses => End::Responses,
                    Counted::Requests => End::Requests,
                });
            }
        }
    })
}

/// Its routing-log line and its counters.
fn account(t: &Task, end: End) {
    let live = &t.live;
    let service = &t.slots.service;
    let (up, down) = {
        let e = lock(&live.exchange);
        (e.up, e.down)
    };
    let bytes_up = live.bytes[Direction::Up as usize].load(Relaxed);
    let bytes_down = live.bytes[Direction::Down as usize].load(Relaxed);
    live.backend.stats.moved(bytes_up, bytes_down);
    t.stats.ended(end);
    crate::accesslog::emit_udp(&crate::accesslog::UdpLine {
        service: &service.name,
        client: live.client,
        listen: live.to,
        backend: live.backend.addr,
        backend_name: live.backend.name().as_deref().map(String::as_str),
        policy: service.policy.as_str(),
        datagrams_up: up,
        datagrams_down: down,
        bytes_up,
        bytes_down,
        duration: t.started.elapsed(),
        end: end.as_str(),
    });
}
