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

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::exchange::{Counted, Exchange};
use super::follow::{Cids, Recorded};
use super::gso;
use super::quic::{self, Version};
use super::socket::{Bufs, Listening};
use super::stats::{Direction, Dropped, End, Tally, UdpStats};
use crate::admission::{GateSlot, SourceSlot};
use crate::connections::{self, Conn, Facts, Registered};
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::service::Service;
use crate::util::lock;

/// What the loop and the session's task share of a session.
pub(crate) struct Live {
    /// Connected to the backend.
    pub(crate) socket: UdpSocket,
    pub(crate) backend: Arc<Backend>,
    /// The version of its service it started with (a reload's next one serves new sessions).
    pub(crate) service: Arc<Service>,
    /// Its service's counters and its backend's.
    pub(crate) stats: Tally,
    /// What its QUIC Initials said, for a session of a QUIC address.
    pub(crate) quic: Option<QuicInfo>,
    /// The connection IDs recorded for it (at most [`super::follow::PER_SESSION`]).
    pub(crate) cids: Mutex<Vec<Box<[u8]>>>,
    /// Its service left the address.
    leave: CancellationToken,
    pub(crate) client: SocketAddr,
    /// Where the client sent to: the address its answers leave from.
    pub(crate) to: SocketAddr,
    /// Milliseconds since the loop's epoch of the last datagram either way.
    last: AtomicU64,
    pub(crate) exchange: Mutex<Exchange>,
    bytes: [AtomicU64; 2],
    why: OnceLock<End>,
    stop: CancellationToken,
    /// Its places (service, top-level cap, source, backend), given back the moment it ends, by
    /// whoever ends it: an eviction makes room at once, and a client's next session is admitted
    /// under the limits its ended one held.
    slots: Mutex<Option<Slots>>,
    /// The backend has answered (its failure streak cleared once).
    answered: std::sync::atomic::AtomicBool,
    /// The loop's clock: activity is stamped against it.
    epoch: Instant,
    /// Its listing for the operator (`connections`), also held by its slots until it ends.
    pub(crate) conn: Arc<Conn>,
}

/// A QUIC session's routing facts, for its line.
#[derive(Debug, Clone, Default)]
pub(crate) struct QuicInfo {
    pub(crate) version: Option<Version>,
    pub(crate) sni: Option<String>,
    /// The protocol its route was narrowed by, else the client's first.
    pub(crate) alpn: Option<String>,
    /// Why its route took it (`None`: the address has one service, no hello was read).
    pub(crate) route: Option<&'static str>,
}

/// A new session's parts.
pub(crate) struct Parts {
    pub(crate) socket: UdpSocket,
    pub(crate) key: (SocketAddr, SocketAddr),
    pub(crate) exchange: Exchange,
    pub(crate) slots: Slots,
    pub(crate) stats: Arc<UdpStats>,
    pub(crate) quic: Option<QuicInfo>,
    /// Cancelled when its service leaves the address (a reload), which ends it as `shutdown`.
    pub(crate) leave: CancellationToken,
}

impl Live {
    pub(crate) fn new(parts: Parts, epoch: Instant) -> Live {
        let Parts {
            socket,
            key: (client, to),
            exchange,
            slots,
            stats,
            quic,
            leave,
        } = parts;
        let conn = slots.listed.conn().clone();
        let backend = slots.active.backend().clone();
        let live = Live {
            conn,
            socket,
            stats: stats.tally(&backend),
            backend,
            service: slots.service.clone(),
            quic,
            cids: Mutex::new(Vec::new()),
            leave,
            client,
            to,
            last: AtomicU64::new(0),
            exchange: Mutex::new(exchange),
            bytes: Default::default(),
            why: OnceLock::new(),
            stop: CancellationToken::new(),
            slots: Mutex::new(Some(slots)),
            answered: std::sync::atomic::AtomicBool::new(false),
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

    /// A datagram of `len` payload bytes went `dir`: counted for the session, its service and
    /// its backend.
    pub(crate) fn carried(&self, dir: Direction, len: usize) {
        self.stats.carried(dir, len);
        self.bytes[dir as usize].fetch_add(len as u64, Relaxed);
        let (up, down) = match dir {
            Direction::Up => (len as u64, 0),
            Direction::Down => (0, len as u64),
        };
        self.conn.moved(up, down, crate::relay::stamp());
    }

    /// Lists the session for the operator: its routing, and an operator's kill ending it.
    pub(crate) fn list(self: &Arc<Self>) {
        let quic = self.quic.as_ref();
        self.conn.set_facts(Facts {
            client: Some(self.client),
            backend: Some(self.backend.addr),
            backend_name: self.backend.name(),
            tier: Some(self.backend.tier()),
            route: quic.and_then(|q| q.route),
            sni: quic.and_then(|q| q.sni.clone()),
            engine: Some("udp"),
            ..Facts::default()
        });
        self.conn.set_state(connections::State::Relaying);
        let weak = Arc::downgrade(self);
        self.conn.wake_with(|| {
            Arc::new(move || {
                if let Some(live) = weak.upgrade() {
                    live.end(End::Killed);
                }
            })
        });
        // A kill between the listing and the hook above found nothing to call.
        if self.conn.kill_asked().is_some() {
            self.end(End::Killed);
        }
    }

    /// Ends the session (the first reason given stands) and gives its places back.
    pub(crate) fn end(&self, why: End) {
        let _ = self.why.set(why);
        self.stop.cancel();
        drop(lock(&self.slots).take());
    }

    /// Records connection ID `cid` as this session's (`id` in the loop's table): one it holds
    /// already is not taken back from a later session the client moved to.
    pub(crate) fn record_cid(&self, cids: &Mutex<Cids>, id: u64, cid: &[u8]) {
        let mut held = lock(&self.cids);
        if held.iter().any(|c| &c[..] == cid) {
            return;
        }
        if lock(cids).record(cid, id, held.len()) == Recorded::Yes {
            held.push(cid.into());
        }
    }

    /// Ended, or about to: its service left the address, so it takes no more datagrams.
    pub(crate) fn ended(&self) -> bool {
        self.stop.is_cancelled() || self.leave.is_cancelled()
    }

    pub(crate) fn end_reason(&self) -> Option<End> {
        self.why.get().copied()
    }
}

/// What a session holds until it ends: its places in the service, under the top-level cap, in
/// the source limits and on the backend, given back when dropped (the guards count by being
/// held).
pub(crate) struct Slots {
    pub(crate) active: ActiveGuard,
    pub(crate) _source: Option<SourceSlot>,
    pub(crate) service: Arc<Service>,
    /// Its place under the top-level `max_connections`.
    pub(crate) _gate: GateSlot,
    /// Its start among the service's open sessions (the oldest one's age).
    pub(crate) since: u64,
    /// Its place in the operator's list (`connections`).
    pub(crate) listed: Registered,
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
    /// The backend's cut signal as it was when the session picked it.
    pub(crate) cut: Arc<CutSignal>,
    pub(crate) listening: Arc<Listening>,
    /// The address's connection IDs: the backend's are recorded as they come, and the session's
    /// forgotten when it ends.
    pub(crate) cids: Arc<Mutex<Cids>>,
    pub(crate) idle: Duration,
    pub(crate) max_datagram: usize,
    /// The drain deadline, or the service's removal: ends it as `shutdown`.
    pub(crate) shutdown: CancellationToken,
    /// Tells the loop the session is gone, so its table forgets it.
    pub(crate) gone: tokio::sync::mpsc::UnboundedSender<u64>,
    pub(crate) id: u64,
    pub(crate) started: Instant,
}

/// One worker's buffers for the backends' datagrams: a session holds none of its own, so a
/// hundred thousand idle sessions cost no buffer memory. Used only between an await and the next,
/// never across one.
struct DownBufs {
    bufs: Bufs,
    /// One read's datagrams laid end to end, as a GSO send takes them, and their sizes.
    out: Vec<u8>,
    sizes: Vec<usize>,
}

thread_local! {
    static DOWN: std::cell::RefCell<DownBufs> = std::cell::RefCell::new(DownBufs {
        bufs: Bufs::new(),
        out: Vec::new(),
        sizes: Vec::new(),
    });
}

/// Datagrams a session carries down before its socket gets UDP GRO: a stream's, not a DNS
/// query's (GRO costs about ten system calls to turn on).
const GRO_AFTER: u64 = 256;

/// What a session's task knows of its reads.
#[derive(Default)]
struct Reading {
    datagrams: u64,
    gro: bool,
}

/// Carries the backend's datagrams to the client until the session ends, then accounts for it.
pub(crate) async fn run(t: Task) {
    let end = carry(&t).await;
    t.live.end(end);
    let end = t.live.why.get().copied().unwrap_or(end);
    if end == End::BackendUnreachable {
        t.live.service.pool.connect_failed(&t.live.backend);
    }
    {
        let held = lock(&t.live.cids);
        lock(&t.cids).forget(t.id, held.iter().map(|c| &c[..]));
    }
    account(&t, end);
    let _ = t.gone.send(t.id);
}

/// The session's life: the first way it ends.
async fn carry(t: &Task) -> End {
    let live = &t.live;
    let mut reading = Reading::default();
    loop {
        let idle_until = live.epoch + Duration::from_millis(live.last_active()) + t.idle;
        tokio::select! {
            biased;
            () = live.stop.cancelled() => return live.why.get().copied().unwrap_or(End::Shutdown),
            () = t.shutdown.cancelled() => return End::Shutdown,
            () = live.leave.cancelled() => return End::Shutdown,
            () = t.cut.cancelled() => {
                return match t.cut.reason() {
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
            // An ICMP error on a connected UDP socket raises EPOLLERR alone: waited for too.
            r = live.socket.ready(Interest::READABLE | Interest::ERROR) => {
                let ready = match r {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::debug!(error = %e, "backend socket failed");
                        return End::BackendUnreachable;
                    }
                };
                if ready.is_error() {
                    if let Some(e) = pending_error(&live.socket) {
                        if unreachable(&e) {
                            tracing::debug!(error = %e, backend = %live.backend.addr, "backend unreachable");
                            return End::BackendUnreachable;
                        }
                        tracing::debug!(error = %e, "an error on the backend socket, not the backend's");
                    }
                }
                if ready.is_readable() {
                    match down(t, &mut reading) {
                        Down::Ended(end) => return end,
                        // The budget is spent and more is waiting: let the worker's other tasks
                        // (the listen loop, other sessions) run first.
                        Down::More => tokio::task::yield_now().await,
                        Down::Idle => {}
                    }
                }
            }
        }
    }
}

/// Whether an error on a session's socket says the backend cannot be reached (ICMP port, host or
/// network unreachable), rather than something of ours (no buffer, a local firewall).
pub(crate) fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// The error pending on `socket` (`SO_ERROR`), if any; none clears tokio's error readiness, so
/// a spurious one does not wake the task again.
fn pending_error(socket: &UdpSocket) -> Option<io::Error> {
    socket
        .try_io(Interest::ERROR, || match socket.take_error() {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Ok(e),
        })
        .ok()
}

/// Datagrams carried down per wake-up at most: a backend sending faster than that must not hold
/// the worker from the listen loop and the other sessions.
const DOWN_BUDGET: usize = 64;

/// What a round of [`down`] came to.
enum Down {
    Ended(End),
    /// The budget ran out with more waiting.
    More,
    /// Nothing more to read now.
    Idle,
}

/// Reads what the backend sent, as much as is there without waiting (up to [`DOWN_BUDGET`]), a
/// batch at a time, and sends each batch on.
fn down(t: &Task, reading: &mut Reading) -> Down {
    let live = &t.live;
    DOWN.with(|d| {
        let mut d = d.borrow_mut();
        let DownBufs { bufs, out, sizes } = &mut *d;
        let mut carried = 0;
        while carried < DOWN_BUDGET {
            out.clear();
            sizes.clear();
            let read = t.listening.recv_backend(&live.socket, bufs, |bytes| {
                if bytes.len() > t.max_datagram {
                    return live.stats.dropped(Dropped::TooLarge);
                }
                if live.quic.is_some() {
                    record_server_cid(t, bytes);
                }
                out.extend_from_slice(bytes);
                sizes.push(bytes.len());
            });
            let read = match read {
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Down::Idle,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if unreachable(&e) => {
                    tracing::debug!(error = %e, backend = %live.backend.addr, "backend unreachable");
                    return Down::Ended(End::BackendUnreachable);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "receiving from the backend failed");
                    return Down::Idle;
                }
            };
            carried += read.datagrams;
            if read.datagrams > 0 {
                live.touch();
                if !live.answered.swap(true, Relaxed) {
                    live.service.pool.answered(&live.backend);
                }
                stream(live, reading, read.datagrams);
            }
            if let Some(end) = answer(t, out, sizes) {
                return Down::Ended(end);
            }
            if read.drained {
                return Down::Idle;
            }
        }
        Down::More
    })
}

/// Turns GRO on once a session has carried a stream's worth of datagrams down.
fn stream(live: &Live, reading: &mut Reading, datagrams: usize) {
    reading.datagrams += datagrams as u64;
    if reading.gro || reading.datagrams < GRO_AFTER {
        return;
    }
    reading.gro = true;
    if let Err(e) = super::socket::enable_gro(&live.socket) {
        tracing::debug!(error = %e, "cannot turn on GRO on a session's socket");
    }
}

/// Sends one read's datagrams (`out`, sized `sizes`) to the client in as few sends as GSO allows,
/// and counts each: `Some` when that was the last answer the session waits for. They go in slices
/// no longer than the answers the session still takes, so that one GSO send never carries a
/// datagram past the one that ends it; a slice whose sends failed counted none of its datagrams, so
/// the next slice carries on with the rest rather than losing them uncounted.
fn answer(t: &Task, out: &[u8], sizes: &[usize]) -> Option<End> {
    let live = &t.live;
    let limits = (
        t.listening.max_segments(Direction::Down),
        gso::max_segment(live.client.is_ipv6()),
    );
    let mut end = None;
    let (mut from, mut at) = (0, 0);
    while from < sizes.len() && end.is_none() {
        // At least one: each slice moves on.
        let left = lock(&live.exchange).downs_left();
        let slice = &sizes[from..sizes.len().min(from.saturating_add(left))];
        let len: usize = slice.iter().sum();
        let Some(bytes) = out.get(at..at + len) else {
            break;
        };
        gso::send(
            bytes,
            slice,
            limits,
            |bytes, segment| {
                t.listening
                    .try_send_to(live.client, live.to.ip(), bytes, segment)
            },
            |k, sent| answered(live, slice[k], sent, &mut end),
        );
        from += slice.len();
        at += len;
    }
    end
}

/// Counts one answer's send: false once it was the last answer the session waits for (`end` set).
fn answered(live: &Live, size: usize, sent: Result<(), &io::Error>, end: &mut Option<End>) -> bool {
    match sent {
        Ok(()) => {
            live.carried(Direction::Down, size);
            if let Some(c) = lock(&live.exchange).down() {
                *end = Some(match c {
                    Counted::Responses => End::Responses,
                    Counted::Requests => End::Requests,
                });
                return false;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            live.stats.dropped(Dropped::QueueFull);
        }
        Err(e) => {
            // The client's side (gone, unreachable): nothing the backend did.
            tracing::debug!(error = %e, "sending to the client failed");
            live.stats.dropped(Dropped::SendFailed);
        }
    }
    true
}

/// Records the Source Connection ID the backend chose, from its long-header packets (its
/// Initial and Handshake packets): the client's short-header packets carry it.
fn record_server_cid(t: &Task, datagram: &[u8]) {
    if !quic::is_long_header(datagram) {
        return;
    }
    if let Ok(header) = quic::parse_long_header(datagram) {
        t.live.record_cid(&t.cids, t.id, header.scid);
    }
}

/// Its routing-log line and its counters.
fn account(t: &Task, end: End) {
    let live = &t.live;
    let service = &live.service;
    let stats = &live.stats;
    let (up, down) = {
        let e = lock(&live.exchange);
        (e.up, e.down)
    };
    let bytes_up = live.bytes[Direction::Up as usize].load(Relaxed);
    let bytes_down = live.bytes[Direction::Down as usize].load(Relaxed);
    live.backend.stats.moved(bytes_up, bytes_down);
    stats.ended(end);
    let quic = live.quic.as_ref();
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
        sni: quic.and_then(|q| q.sni.as_deref()),
        alpn: quic.and_then(|q| q.alpn.as_deref()),
        route: quic.and_then(|q| q.route),
        quic_version: quic.and_then(|q| q.version).map(|v| v.name()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns: an async fn's future, without making one.
    fn returned<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// What every open session costs besides its socket, held to its budget: its task's future
    /// (the biggest part), what the loop and the task share, and its listing. 100,000 idle sessions
    /// are 100,000 of each (benchmarks/udp.py `hold` measures the whole: about 3.2 KiB a session
    /// with tokio's task header, the socket's registration, the tables and the allocator's
    /// rounding; its `log.level: warn` leaves the session's span out).
    #[test]
    fn a_sessions_parts_stay_within_their_budget() {
        let task = returned(run);
        let live = std::mem::size_of::<Live>();
        let conn = std::mem::size_of::<crate::connections::Conn>();
        assert!(task <= 816, "a session's task future grew to {task} bytes");
        assert!(live <= 464, "a session's Live grew to {live} bytes");
        assert!(conn <= 400, "a connection's listing grew to {conn} bytes");
    }
}
