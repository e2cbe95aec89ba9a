//! Moving bytes between a client and its backend, both directions at once, until both are done.
//!
//! The contract, whatever the engine:
//! - **Half-close.** EOF read from one side becomes `shutdown(SHUT_WR)` on the other; the opposite
//!   direction keeps flowing until it ends too (or `half_close_timeout` passes).
//! - **Resets.** An error on one side (RST, EPIPE) is passed on as a reset (SO_LINGER 0) on the other,
//!   so a peer never mistakes a broken stream for a complete one.
//! - **Bounded buffering.** A stated cap per direction (one buffer or one pipe here; the ring
//!   workers' pool buffers up to their cap); a slow reader stalls its writer through TCP
//!   back-pressure instead of growing memory, and a destination that takes no byte for
//!   `stall_timeout` while bytes wait for it has its connection cut, both sides reset.
//! - **Exact counts.** Bytes are counted when written to the destination, so the totals are exact even
//!   when the connection ends in an error or a timeout.
//!
//! Engines: `copy` moves bytes through a user-space buffer; `splice` (Linux) moves them socket → pipe →
//! socket in the kernel; `epoll` copies and switches a direction to splice once it carries bulk data (a
//! read fills the whole buffer), which keeps small request/response traffic on the cheaper copy path.
//! A direction that cannot get a pipe copies. These run on tokio, in a connection's task
//! (`session`). The ring workers (`src/ring/`) are the other data plane: `ring` services are
//! accepted, connected and relayed there, off tokio, under this same contract (this module's
//! [`direction_ended`] and [`Supervised`] are theirs too); `auto` is the ring where it can serve the
//! service and `epoll` elsewhere ([`choose_engine`]).

#[cfg(all(test, target_os = "linux"))]
mod carry_tests;
mod clock;
pub(crate) use clock::{since, stamp};
mod liveness;
/// For tests elsewhere that count what a socket's kernel sent.
#[cfg(all(test, target_os = "linux"))]
pub(crate) use tcp_info::{tcp_info_fd, AckTimerRuns};
#[cfg(target_os = "linux")]
pub(crate) mod splice;
mod stream;
#[cfg(target_os = "linux")]
pub(crate) mod tcp_info;
#[cfg(target_os = "linux")]
pub(crate) mod uring;
mod woken;

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use liveness::{PeerWatch, Watched};
pub(crate) use stream::{relay_streams, Endpoint};

use crate::config::RelayMode;
use crate::connections::{self, Conn};
use crate::outcome::Outcome;
use woken::Woken;

/// Live byte counters are updated at least this often (in bytes moved) and when the relay ends.
const LIVE_FLUSH: u64 = 64 * 1024;

/// Copy buffer size: the thread's scratch buffer, and a direction's own once its destination pushes back.
const COPY_BUF: usize = 16 * 1024;

/// How one service relays: the engine and the inactivity timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayOptions {
    pub(crate) mode: RelayMode,
    pub(crate) idle_timeout: Duration,
    pub(crate) half_close_timeout: Duration,
    /// `stall_timeout`: how long a destination may take nothing while bytes wait for it before
    /// the connection is cut.
    pub(crate) stall_timeout: Duration,
    /// `first_byte_timeout`: how long after accept a client may send nothing before it is closed.
    pub(crate) first_byte_timeout: Option<Duration>,
    /// `keepalive` and `user_timeout`, for the client's socket.
    pub(crate) client_watch: PeerWatch,
    /// `backend_keepalive` and `user_timeout`, for the backend's socket.
    pub(crate) backend_watch: PeerWatch,
}

impl RelayOptions {
    /// Which sides a dead peer is looked for on (an ETIMEDOUT there is `keepalive_timeout`).
    pub(crate) fn watched(&self) -> Watched {
        Watched {
            client: self.client_watch.is_set(),
            backend: self.backend_watch.is_set(),
        }
    }
}

/// Counters that see every byte as it is written: client → backend (`up`) and back (`down`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveCounters<'a> {
    pub(crate) up: &'a AtomicU64,
    pub(crate) down: &'a AtomicU64,
    /// The connection's listing (`connections`), whose bytes, activity and state the relay keeps
    /// current at every write and end of stream.
    pub(crate) conn: Option<&'a Conn>,
}

#[derive(Debug)]
pub(crate) struct Relayed {
    /// Bytes written to the backend.
    pub(crate) bytes_up: u64,
    /// Bytes written to the client.
    pub(crate) bytes_down: u64,
    /// How it ended: one of the relay's outcomes, never a refusal.
    pub(crate) end: Outcome,
    /// Whether either direction ran on splice, i.e. held a pipe (for `epoll`: carried bulk data).
    pub(crate) spliced: bool,
    /// Whether the connection ran on the ring workers (`ring/`).
    pub(crate) ring: bool,
    /// What broke it, when a side failed (the relay logs nothing: the session does, in its span).
    pub(crate) broken: Option<io::Error>,
    /// The relay stopped at a quiet point because `carry` fired: the connection is to go on in another
    /// process, with this. `end` means nothing then, and neither socket was touched.
    pub(crate) carried: Option<Quiesced>,
}

/// A relay stopped at a quiet point (no read in flight, no operation in the kernel): what each
/// direction had read and not yet written, and which had ended. Together with the two sockets, all
/// another process needs to go on relaying the connection exactly.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Quiesced {
    /// Read from the client, not yet written to the backend.
    pub(crate) to_backend: Vec<u8>,
    /// Read from the backend, not yet written to the client.
    pub(crate) to_client: Vec<u8>,
    /// The client's EOF was read (and passed on as the backend's write side shut down).
    pub(crate) up_done: bool,
    /// The backend's EOF was read (and passed on).
    pub(crate) down_done: bool,
    /// How long both directions had been silent.
    pub(crate) quiet_for: Duration,
}

/// Where a carried connection's relay starts again: [`Quiesced`] as another process left it.
pub(crate) type Resumed = Quiesced;

/// How one direction ended.
#[derive(Debug)]
pub(crate) enum DirEnd {
    /// The source sent FIN; the destination's write side has been shut down.
    Eof,
    /// Reading the source failed: the source side broke.
    SourceError(io::Error),
    /// Writing the destination failed: the destination side broke.
    DestError(io::Error),
    /// Stopped at a quiet point for `carry`: what it had read and not written is in its `Flow`.
    Carried,
}

/// Shared between the two directions and the timers of one connection.
struct Flow<'a> {
    bytes: AtomicU64,
    /// Also counts the bytes as they move, for whoever watches live (the backend's counters): flushed
    /// every [`LIVE_FLUSH`] bytes and at the end, so small exchanges do not write a shared cache line
    /// per message.
    live: &'a AtomicU64,
    unflushed: AtomicU64,
    /// This direction read EOF from its source.
    eof: AtomicBool,
    /// This direction runs on splice (holds a pipe).
    spliced: AtomicBool,
    /// The last successful write's [`clock::stamp`] (0 before the first), for the idle timer.
    last_active: AtomicU64,
    /// The socket this direction writes to (open as long as the relay runs): what its peer
    /// acknowledged tells a stalled destination from a slow one (`stall_timeout`).
    dst: std::os::fd::RawFd,
    /// A relay through TLS streams (`stream.rs`) waits to write bytes it read: its buffer is its
    /// own, not `pending`.
    blocked: AtomicBool,
    /// Bytes read and not yet written, kept here (not in the pump's own variables) whenever the pump
    /// waits with some, so a relay stopped for `carry` finds them; and where a carried connection's
    /// bytes start. Touched only under back-pressure: a message written at once never comes here.
    pending: Parked<Pending>,
    /// The connection's listing.
    conn: Option<&'a Conn>,
    /// This is the client-to-backend direction (a byte beside the flags, where a pair with the
    /// listing would cost every connection's task 16 bytes).
    up: bool,
    /// The direction's pipe while it holds bytes and waits for the destination, for the same reason.
    #[cfg(target_os = "linux")]
    pipe: Parked<splice::PipeLease>,
    /// Client → backend on a new connection of a copying engine, started with the backend's
    /// handshake ACK still held back for the client's first bytes ([`Begin::New`]): to be sent
    /// before this direction first waits for a client that has sent nothing ([`ack_unless_bytes`]).
    ack_held: AtomicBool,
}

/// A value a pump leaves where its relay can take it while the pump waits. The pump and its relay
/// run on one thread, one at a time, so the lock is never contended; a `Mutex` only because relay
/// futures must be `Send` (sessions are tokio tasks).
struct Parked<T>(std::sync::Mutex<Option<T>>);

impl<T> Parked<T> {
    fn new(v: Option<T>) -> Parked<T> {
        Parked(std::sync::Mutex::new(v))
    }

    fn put(&self, v: T) {
        *crate::util::lock(&self.0) = Some(v);
    }

    fn take(&self) -> Option<T> {
        crate::util::lock(&self.0).take()
    }

    fn is_some(&self) -> bool {
        crate::util::lock(&self.0).is_some()
    }
}

/// What the last look for `stall_timeout` saw of a waiting direction's destination: the bytes its
/// peer had acknowledged, and since when that count has stood still.
#[derive(Debug, Clone, Copy)]
struct Acked {
    bytes: u64,
    since: Instant,
}

/// Bytes a direction read and has not yet written: `buf[off..end]`.
struct Pending {
    buf: Box<[u8]>,
    off: usize,
    end: usize,
}

/// The engine a service configured with `mode` runs (see [`choose_engine`]); `fits_ring`: plain TCP
/// on addresses of its own ([`crate::config::ServiceConfig::fits_ring`]). A service that falls back
/// for want of io_uring says so once per process and mode: every service of that mode falls back for
/// the same reason (a warning for `ring`, asked for by name; a note for `auto`, which never promised
/// the ring).
pub(crate) fn engine_for(mode: RelayMode, service: &str, fits_ring: bool) -> RelayMode {
    #[cfg(target_os = "linux")]
    let ring = crate::relay::uring::usable;
    #[cfg(not(target_os = "linux"))]
    let ring = || Err("io_uring is Linux only");
    let (engine, unavailable) = choose_engine(mode, fits_ring, ring);
    let Some(why) = unavailable else {
        return engine;
    };
    static SAID: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];
    let said = match mode {
        RelayMode::Ring => &SAID[0],
        _ => &SAID[1],
    };
    if said.swap(true, Relaxed) {
        return engine;
    }
    if mode == RelayMode::Auto {
        tracing::info!(
            service,
            reason = why,
            "relay: auto runs the epoll engine here: io_uring is unavailable"
        );
    } else {
        tracing::warn!(
            service,
            reason = why,
            "relay: {} is unavailable; falling back to the epoll engine",
            mode.as_str()
        );
    }
    engine
}

/// The engine for `mode`, given whether the ring workers could serve the service (`fits_ring`) and
/// whether they can run here (`ring`): `auto` is the ring where both hold and `epoll` elsewhere;
/// `ring` without io_uring is `epoll`. The second value is why io_uring was wanted and is not there.
/// `ring` is asked only when the mode needs it: a process with no service on the ring makes no
/// io_uring call.
pub(crate) fn choose_engine<'a>(
    mode: RelayMode,
    fits_ring: bool,
    ring: impl FnOnce() -> Result<(), &'a str>,
) -> (RelayMode, Option<&'a str>) {
    let or_epoll = |available: Result<(), &'a str>| match available {
        Ok(()) => (RelayMode::Ring, None),
        Err(why) => (RelayMode::Epoll, Some(why)),
    };
    match mode {
        RelayMode::Auto if fits_ring => or_epoll(ring()),
        RelayMode::Auto => (RelayMode::Epoll, None),
        RelayMode::Ring => or_epoll(ring()),
        RelayMode::Epoll | RelayMode::Splice | RelayMode::Copy => (mode, None),
    }
}

/// Relays until both directions end, one side fails, a timeout fires or `cut` completes (the drain
/// deadline, or the backend's sessions being closed), which ends the relay with the `Outcome` it yields;
/// or until `carry` fires (an upgrade carries the connection into another process): then it stops at a
/// quiet point and returns what it had read and not written ([`Relayed::carried`]), the sockets
/// untouched. `begin` says how it starts: new, or where another process left it. On return, resets
/// have been armed (SO_LINGER 0) on the side that must see one; the caller closes both sockets by
/// dropping them.
///
/// `cut` comes pinned by the caller, and every future here is pinned once and lent down: an async
/// fn keeps room for each argument it takes by value beside the local it moves it into, so a future
/// passed down two layers by value is stored three times in every connection's task (this was half
/// of an idle connection's memory).
///
/// Not an async fn, for the same reason: the returned block keeps each argument once. What a
/// resumed relay starts with is boxed, as only a carried connection has it, and the block keeps
/// room for `begin` all its life.
#[allow(clippy::manual_async_fn)]
pub(crate) fn relay<'a, C: Future<Output = Outcome> + 'a>(
    client: &'a TcpStream,
    backend: &'a TcpStream,
    opts: &'a RelayOptions,
    cut: Pin<&'a mut C>,
    carry: Option<&'a CancellationToken>,
    live: LiveCounters<'a>,
    begin: Begin,
) -> impl Future<Output = Relayed> + 'a {
    async move {
        let start = Instant::now();
        let up = Flow::new(live.up, backend.as_raw_fd(), live.conn, true);
        let down = Flow::new(live.down, client.as_raw_fd(), live.conn, false);
        // In a block, so that its locals are not kept for the relay's life in every task.
        let ended = {
            let mut done = (false, false);
            let mut quiet_for = Duration::ZERO;
            let mut first_byte_by = FirstByteIn::NONE;
            match begin {
                Begin::New {
                    ack_held,
                    first_byte_by: by,
                } => {
                    up.ack_held
                        .store(ack_held && sends_held_ack(opts.mode), Relaxed);
                    first_byte_by = by;
                }
                Begin::Resumed(r) => {
                    let r = *r;
                    up.resume(r.to_backend, r.up_done);
                    down.resume(r.to_client, r.down_done);
                    done = (r.up_done, r.down_done);
                    quiet_for = r.quiet_for;
                }
            }
            Ended {
                up: done.0,
                down: done.1,
                quiet_for,
                first_byte_by,
            }
        };
        let mut up_fut = std::pin::pin!(pump(client, backend, &up, &down, opts.mode));
        let mut down_fut = std::pin::pin!(pump(backend, client, &down, &up, opts.mode));
        let (mut up_done, mut down_done) = (ended.up, ended.down);
        // Each direction is polled only when its own socket (or ring operation) woke the task.
        let (up_woken, down_woken) = (Woken::new(), Woken::new());
        let directions = std::pin::pin!(std::future::poll_fn(|cx| {
            if !up_done {
                if let Poll::Ready(end) = up_woken.poll(cx, |cx| up_fut.as_mut().poll(cx)) {
                    up_done = true;
                    return Poll::Ready((Side::Up, end));
                }
            }
            if !down_done {
                if let Poll::Ready(end) = down_woken.poll(cx, |cx| down_fut.as_mut().poll(cx)) {
                    down_done = true;
                    return Poll::Ready((Side::Down, end));
                }
            }
            Poll::Pending
        }));
        let carry = std::pin::pin!(async {
            match carry {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        });
        let supervised = supervise(directions, &up, &down, opts, start, cut, carry, ended).await;
        conclude(supervised, &up, &down, client, backend)
    }
}

/// How a relay starts.
pub(crate) enum Begin {
    /// A new connection. `ack_held`: its backend's handshake ACK is still held back for the
    /// client's first bytes, nothing having gone to the backend before the relay
    /// ([`connect_holding_ack`]). `first_byte_by`: when a client that has sent nothing is closed
    /// (`first_byte_timeout`, from its accept), if it is.
    New {
        ack_held: bool,
        first_byte_by: FirstByteIn,
    },
    /// Where another process left it (an upgrade).
    Resumed(Box<Resumed>),
}

/// Which directions a relay starts with ended (a carried connection), and how long it had been quiet.
/// Not `Copy`: moved into the supervisor, it is not also kept in the relay's own state.
#[derive(Debug, Clone, Default)]
struct Ended {
    up: bool,
    down: bool,
    quiet_for: Duration,
    /// When a client that has sent nothing by then is closed (`first_byte_timeout`).
    first_byte_by: FirstByteIn,
}

impl Ended {
    /// The end a connection carried in with a direction ended would have if the other ended too:
    /// by the side whose FIN came first.
    fn first_fin(&self) -> Option<Outcome> {
        match (self.up, self.down) {
            (true, _) => Some(Outcome::ClientClosed),
            (false, true) => Some(Outcome::BackendClosed),
            _ => None,
        }
    }
}

/// How a relay of any engine ends: resets armed on the sockets that must see one, the live counters
/// flushed, and what moved; for a relay stopped for `carry`, what each direction holds.
fn conclude(
    supervised: Supervised,
    up: &Flow<'_>,
    down: &Flow<'_>,
    client: &TcpStream,
    backend: &TcpStream,
) -> Relayed {
    if supervised.reset_client {
        arm_reset(client);
    }
    if supervised.reset_backend {
        arm_reset(backend);
    }
    up.flush_live();
    down.flush_live();
    let mut supervised = supervised;
    let carried = match supervised.carried.map(|quiet_for| {
        Ok::<_, io::Error>(Quiesced {
            to_backend: up.held_bytes()?,
            to_client: down.held_bytes()?,
            up_done: up.eof.load(Relaxed),
            down_done: down.eof.load(Relaxed),
            quiet_for,
        })
    }) {
        Some(Ok(q)) => Some(q),
        // Bytes held in a pipe that cannot be read cannot go along: neither side may take what it
        // got for the whole stream, so both are reset.
        Some(Err(e)) => {
            arm_reset(client);
            arm_reset(backend);
            supervised.end = Outcome::BackendReset;
            supervised.broken = Some(e);
            None
        }
        None => None,
    };
    Relayed {
        bytes_up: up.bytes(),
        bytes_down: down.bytes(),
        end: supervised.end,
        spliced: up.spliced.load(Relaxed) || down.spliced.load(Relaxed),
        ring: false,
        broken: supervised.broken,
        carried,
    }
}

/// A direction of a connection: client → backend, or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Up,
    Down,
}

/// How a supervised relay ended, and which sockets must be reset when closed.
pub(crate) struct Supervised {
    pub(crate) end: Outcome,
    pub(crate) reset_client: bool,
    pub(crate) reset_backend: bool,
    /// What broke it, when a side failed.
    pub(crate) broken: Option<io::Error>,
    /// Stopped for `carry`, quiet for this long: to go on in another process.
    pub(crate) carried: Option<Duration>,
}

impl Supervised {
    /// A side failed: the other one must see a reset (`reset_client`: the client, else the backend).
    pub(crate) fn broken(end: Outcome, reset_client: bool, cause: io::Error) -> Supervised {
        Supervised {
            end,
            reset_client,
            reset_backend: !reset_client,
            broken: Some(cause),
            carried: None,
        }
    }

    pub(crate) fn ended(end: Outcome) -> Supervised {
        Supervised {
            end,
            reset_client: false,
            reset_backend: false,
            broken: None,
            carried: None,
        }
    }

    /// Cut from outside (a drain deadline, the backend's sessions cut) or for a destination that
    /// stopped reading (`stall_timeout`): a reset on both sides, so neither mistakes the cut for
    /// the end of the stream.
    pub(crate) fn cut(end: Outcome) -> Supervised {
        Supervised {
            end,
            reset_client: true,
            reset_backend: true,
            broken: None,
            carried: None,
        }
    }
}

/// The part of a relay every engine shares: waits on `directions` (which yields each direction's end
/// once) and on the inactivity timer, the cut and `carry`, and decides how the connection ends. One
/// inactivity timer: `idle_timeout` while both directions flow, `half_close_timeout` once one has
/// ended (HAProxy's `timeout client-fin`: a half-closed connection may still stream for hours as long
/// as bytes keep moving); half-closing restarts the clock. `ended` is where a carried connection
/// starts: directions already ended, and the silence it brings along. The futures come pinned, each
/// stored once, by the engine's relay (see [`relay`]).
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)]
fn supervise<'a, D, C, K>(
    mut directions: Pin<&'a mut D>,
    up: &'a Flow<'a>,
    down: &'a Flow<'a>,
    opts: &'a RelayOptions,
    start: Instant,
    mut cut: Pin<&'a mut C>,
    mut carry: Pin<&'a mut K>,
    mut ended: Ended,
) -> impl Future<Output = Supervised> + 'a
where
    D: Future<Output = (Side, DirEnd)>,
    C: Future<Output = Outcome>,
    K: Future<Output = ()>,
{
    async move {
        let mut done = u8::from(ended.up) + u8::from(ended.down);
        let mut first_fin = ended.first_fin();
        if done == 2 {
            // Carried in with both directions ended: nothing is left to relay.
            return Supervised::ended(first_fin.unwrap_or(Outcome::ClientClosed));
        }
        let (mut limit, mut timeout_end) = if done == 0 {
            (opts.idle_timeout, Outcome::IdleTimeout)
        } else {
            (opts.half_close_timeout, Outcome::HalfCloseTimeout)
        };
        // Silence carried in counts: the timers run on from where the other process left them.
        let mut quiet_floor = start.checked_sub(ended.quiet_for).unwrap_or(start);
        let stall = opts.stall_timeout;
        let mut stalls = StallWatch::default();
        // `ended.first_byte_by` is the deadline, kept there rather than in a copy: every
        // connection's task would keep room for both.
        let timer = tokio::time::sleep_until(sooner(
            (quiet_floor + limit).min(start + stall),
            ended.first_byte_by.at(start),
        ));
        tokio::pin!(timer);
        // The timer, the cut and `carry` rarely fire: polled only when one of them woke the task, not on
        // every message (see `woken`).
        let rare = Woken::new();
        loop {
            let event = next_event(
                directions.as_mut(),
                timer.as_mut(),
                cut.as_mut(),
                carry.as_mut(),
                &rare,
            )
            .await;
            match event {
                Event::Direction(side, r) => {
                    done += 1;
                    if let Some(broken) = direction_ended(side, r, &mut first_fin, opts.watched()) {
                        return broken;
                    }
                }
                Event::Timer => {
                    let silence = Silence {
                        start,
                        floor: quiet_floor,
                        limit,
                        end: timeout_end,
                    };
                    match at_timer(up, down, opts, &mut ended, &mut stalls, silence) {
                        Ok(next) => timer.as_mut().reset(next),
                        Err(end) => return end,
                    }
                    rare.set();
                    continue;
                }
                Event::Cut(end) => return Supervised::cut(end),
                Event::Carry => {
                    let quiet = quiet_since(up, down, quiet_floor);
                    return stop_for_carry(up, down, first_fin, quiet);
                }
            }
            // A direction ended with EOF.
            if done == 2 {
                return Supervised::ended(first_fin.unwrap_or(Outcome::ClientClosed));
            }
            limit = opts.half_close_timeout;
            timeout_end = Outcome::HalfCloseTimeout;
            quiet_floor = Instant::now();
            ended.first_byte_by.unless(client_spoke(up, down));
            let first_byte_by = ended.first_byte_by.at(start);
            timer
                .as_mut()
                .reset(sooner(quiet_floor + limit.min(stall), first_byte_by));
            rare.set();
        }
    }
}

/// When a relay last moved a byte either way, or `floor` if later: silent since the floor when
/// nothing moved yet (a carried connection's silence included).
fn quiet_since(up: &Flow<'_>, down: &Flow<'_>, floor: Instant) -> Instant {
    let last = up
        .last_active
        .load(Relaxed)
        .max(down.last_active.load(Relaxed));
    if last == 0 {
        return floor;
    }
    clock::instant_of(last).max(floor)
}

/// The inactivity timer a relay runs under now: since when it counts silence, how long it
/// allows, and the end at its expiry (idle or half-closed).
struct Silence {
    start: Instant,
    floor: Instant,
    limit: Duration,
    end: Outcome,
}

/// The supervisor's timer fired: how the connection ends now (a silent client's first-byte
/// deadline, a stalled destination, silence past its limit), or when to look again.
fn at_timer(
    up: &Flow<'_>,
    down: &Flow<'_>,
    opts: &RelayOptions,
    ended: &mut Ended,
    stalls: &mut StallWatch,
    s: Silence,
) -> Result<Instant, Supervised> {
    let now = Instant::now();
    ended.first_byte_by.unless(client_spoke(up, down));
    if ended.first_byte_by.at(s.start).is_some_and(|by| now >= by) {
        // Both sides closed: the backend's connection is freed with the client's.
        return Err(Supervised::ended(Outcome::FirstByteTimeout));
    }
    let Some(next_look) = stalls.look(up, down, opts.stall_timeout, now) else {
        return Err(Supervised::cut(Outcome::StallTimeout));
    };
    let quiet = quiet_since(up, down, s.floor);
    if now >= quiet + s.limit {
        return Err(Supervised::ended(s.end));
    }
    Ok(sooner(
        (quiet + s.limit).min(next_look),
        ended.first_byte_by.at(s.start),
    ))
}

/// Whether the client has sent anything (`first_byte_timeout`): its direction heard from it, or
/// bytes of it wait unread in its socket (`down` writes to the client). The system call only
/// when the first is not so, at a timer.
fn client_spoke(up: &Flow<'_>, down: &Flow<'_>) -> bool {
    #[cfg(target_os = "linux")]
    let unread = || tcp_info::unread(down.dst).is_some_and(|n| n > 0);
    #[cfg(not(target_os = "linux"))]
    let unread = || false;
    up.heard_from_source() || unread()
}

/// `first_byte_timeout`'s deadline as milliseconds after the relay's start: 4 bytes where an
/// instant takes 16, in every connection's task (the relay's start and its supervisor's state).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct FirstByteIn(Option<std::num::NonZeroU32>);

impl FirstByteIn {
    /// No deadline.
    pub(crate) const NONE: FirstByteIn = FirstByteIn(None);

    /// The deadline `by` (none: no deadline), from now, where a relay starts.
    pub(crate) fn until(by: Option<Instant>) -> FirstByteIn {
        FirstByteIn(by.map(|by| {
            let ms = by.saturating_duration_since(Instant::now()).as_millis();
            // Already due: due at once (1 ms), never "no deadline".
            std::num::NonZeroU32::new(ms.clamp(1, u128::from(u32::MAX)) as u32)
                .unwrap_or(std::num::NonZeroU32::MIN)
        }))
    }

    /// The deadline, for a relay that started at `start`.
    fn at(self, start: Instant) -> Option<Instant> {
        self.0
            .map(|ms| start + Duration::from_millis(u64::from(ms.get())))
    }

    /// No deadline once the client has spoken.
    fn unless(&mut self, spoke: bool) {
        if spoke {
            self.0 = None;
        }
    }
}

/// The sooner of `at` and `first_byte_by`, when there is one.
fn sooner(at: Instant, first_byte_by: Option<Instant>) -> Instant {
    first_byte_by.map_or(at, |by| by.min(at))
}

/// What a supervised relay's looks for `stall_timeout` saw of each direction (`Flow::stall_look`).
#[derive(Default)]
struct StallWatch {
    up: Option<Acked>,
    down: Option<Acked>,
}

impl StallWatch {
    /// Looks at both directions at `now`: `None` when one has stalled (the connection is to be
    /// cut), else when to look next: when a waiting direction could have stalled, or one `limit`
    /// on, so that a direction whose destination stops taking bytes is cut between one and two
    /// `limit`s after its peer last acknowledged one. (The pumps do not wake the supervisor when
    /// they start waiting: that is the path of every back-pressured write.)
    fn look(
        &mut self,
        up: &Flow<'_>,
        down: &Flow<'_>,
        limit: Duration,
        now: Instant,
    ) -> Option<Instant> {
        let (up_stalled, up_at) = up.stall_look(&mut self.up, limit, now);
        let (down_stalled, down_at) = down.stall_look(&mut self.down, limit, now);
        if up_stalled || down_stalled {
            return None;
        }
        Some(
            up_at
                .into_iter()
                .chain(down_at)
                .min()
                .unwrap_or(now + limit),
        )
    }
}

/// What woke a supervised relay.
enum Event {
    Direction(Side, DirEnd),
    Timer,
    Cut(Outcome),
    Carry,
}

/// The next event of a supervised relay: a direction's end, looked at first (a direction is what
/// wakes the task almost every time), else the timer, the cut or `carry`, which are polled only when
/// one of them woke the task (see `woken`).
fn next_event<'a, D, C, K>(
    mut directions: Pin<&'a mut D>,
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    mut cut: Pin<&'a mut C>,
    mut carry: Pin<&'a mut K>,
    rare: &'a Woken,
) -> impl Future<Output = Event> + 'a
where
    D: Future<Output = (Side, DirEnd)>,
    C: Future<Output = Outcome>,
    K: Future<Output = ()>,
{
    std::future::poll_fn(move |cx| {
        if let Poll::Ready((side, r)) = directions.as_mut().poll(cx) {
            return Poll::Ready(Event::Direction(side, r));
        }
        rare.poll(cx, |cx| {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            if let Poll::Ready(end) = cut.as_mut().poll(cx) {
                return Poll::Ready(Event::Cut(end));
            }
            carry.as_mut().poll(cx).map(|()| Event::Carry)
        })
    })
}

/// What a direction's end means for the relay: `Some` when a side broke (the side that failed is
/// gone; the other must see a reset), else nothing, after noting which side sent the first FIN.
/// A side the kernel found dead (ETIMEDOUT where `watched` says keepalive or user_timeout is set)
/// ends as `keepalive_timeout`, the other side reset as for any broken side.
pub(crate) fn direction_ended(
    side: Side,
    end: DirEnd,
    first_fin: &mut Option<Outcome>,
    watched: Watched,
) -> Option<Supervised> {
    // Which side broke (`true`: the backend, so the client is the one reset), and how.
    let (backend_broke, e) = match (side, end) {
        (Side::Up, DirEnd::Eof) => {
            first_fin.get_or_insert(Outcome::ClientClosed);
            return None;
        }
        (Side::Down, DirEnd::Eof) => {
            first_fin.get_or_insert(Outcome::BackendClosed);
            return None;
        }
        (Side::Up, DirEnd::SourceError(e)) | (Side::Down, DirEnd::DestError(e)) => (false, e),
        (Side::Up, DirEnd::DestError(e)) | (Side::Down, DirEnd::SourceError(e)) => (true, e),
        // Only after `carry` fired, which `supervise` handles.
        (_, DirEnd::Carried) => return None,
    };
    let watched = if backend_broke {
        watched.backend
    } else {
        watched.client
    };
    let end = match (liveness::found_dead(&e, watched), backend_broke) {
        (true, _) => Outcome::KeepaliveTimeout,
        (false, true) => Outcome::BackendReset,
        (false, false) => Outcome::ClientReset,
    };
    Some(Supervised::broken(end, backend_broke, e))
}

/// How a relay stopped for `carry` ends: carried (quiet since `quiet`), or, when both directions
/// had ended, as it would have. A pump of these engines is at a quiet point whenever it waits (what
/// it holds is in its `Flow`), so stopping takes no wait.
fn stop_for_carry(
    up: &Flow<'_>,
    down: &Flow<'_>,
    first_fin: Option<Outcome>,
    quiet: Instant,
) -> Supervised {
    if up.eof.load(Relaxed) && down.eof.load(Relaxed) {
        return Supervised::ended(first_fin.unwrap_or(Outcome::ClientClosed));
    }
    Supervised {
        carried: Some(Instant::now().saturating_duration_since(quiet)),
        ..Supervised::ended(Outcome::ClientClosed)
    }
}

/// Arms a reset on `side`: when the socket is dropped the kernel sends RST instead of FIN.
fn arm_reset(side: &TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, with a FIN.
    let _ = SockRef::from(side).set_linger(Some(Duration::ZERO));
}

impl<'a> Flow<'a> {
    fn new(
        live: &'a AtomicU64,
        dst: std::os::fd::RawFd,
        conn: Option<&'a Conn>,
        up: bool,
    ) -> Flow<'a> {
        Flow {
            bytes: AtomicU64::new(0),
            live,
            conn,
            up,
            unflushed: AtomicU64::new(0),
            last_active: AtomicU64::new(0),
            dst,
            blocked: AtomicBool::new(false),
            eof: AtomicBool::new(false),
            spliced: AtomicBool::new(false),
            pending: Parked::new(None),
            #[cfg(target_os = "linux")]
            pipe: Parked::new(None),
            ack_held: AtomicBool::new(false),
        }
    }

    /// Starts this direction where another process left it: `held` is written first; `ended` means
    /// its EOF was read (and passed on) already.
    fn resume(&self, held: Vec<u8>, ended: bool) {
        self.eof.store(ended, Relaxed);
        if !held.is_empty() {
            let end = held.len();
            self.hold(held.into_boxed_slice(), 0, end);
        }
    }

    /// Keeps `buf[off..end]`, read and not yet written, where the pump and a relay stopped for
    /// `carry` find it.
    fn hold(&self, buf: Box<[u8]>, off: usize, end: usize) {
        self.pending.put(Pending { buf, off, end });
    }

    /// Looks at this direction for `stall_timeout` (`limit`) at `now`, with what the last look saw
    /// (`seen`): stalled when it waits for its destination with bytes it read (in its buffer or
    /// its pipe) and the destination's peer has acknowledged no byte over a whole `limit` between
    /// two looks: the reader stopped reading. A slow reader's peer acknowledges what it makes
    /// room for, so it is not cut, however long its socket's send buffer takes to drain. When it
    /// waits, also the instant of the next look that could find it stalled.
    fn stall_look(
        &self,
        seen: &mut Option<Acked>,
        limit: Duration,
        now: Instant,
    ) -> (bool, Option<Instant>) {
        #[cfg(target_os = "linux")]
        let waiting = self.pending.is_some() || self.pipe.is_some();
        #[cfg(not(target_os = "linux"))]
        let waiting = self.pending.is_some();
        if !waiting && !self.blocked.load(Relaxed) {
            *seen = None;
            return (false, None);
        }
        // Where the kernel does not say, the bytes written stand for it.
        #[cfg(target_os = "linux")]
        let bytes = tcp_info::bytes_acked(self.dst).unwrap_or_else(|| self.bytes());
        #[cfg(not(target_os = "linux"))]
        let bytes = self.bytes();
        match *seen {
            Some(a) if a.bytes == bytes => (now >= a.since + limit, Some(a.since + limit)),
            _ => {
                *seen = Some(Acked { bytes, since: now });
                (false, Some(now + limit))
            }
        }
    }

    /// What this direction read and has not written, once its pump is stopped: its held bytes, then
    /// those in its pipe (read out of it, so the pipe goes back to the pool empty).
    fn held_bytes(&self) -> io::Result<Vec<u8>> {
        let mut out = self
            .pending
            .take()
            .map(|p| p.buf[p.off..p.end].to_vec())
            .unwrap_or_default();
        #[cfg(target_os = "linux")]
        if let Some(mut pipe) = self.pipe.take() {
            out.extend_from_slice(&pipe.take_pending()?);
        }
        Ok(out)
    }

    /// Whether anything came from this direction's source: bytes (written, or held waiting for
    /// the destination) or its EOF. What `first_byte_timeout` asks of the client → backend one.
    fn heard_from_source(&self) -> bool {
        #[cfg(target_os = "linux")]
        let piped = self.pipe.is_some();
        #[cfg(not(target_os = "linux"))]
        let piped = false;
        self.bytes() > 0
            || self.eof.load(Relaxed)
            || self.blocked.load(Relaxed)
            || self.pending.is_some()
            || piped
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    fn flush_live(&self) {
        let pending = self.unflushed.swap(0, Relaxed);
        if pending > 0 {
            self.live.fetch_add(pending, Relaxed);
        }
    }

    fn wrote(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Relaxed);
        let pending = self.unflushed.fetch_add(n as u64, Relaxed) + n as u64;
        if pending >= LIVE_FLUSH {
            self.flush_live();
        }
        let now = clock::stamp();
        self.last_active.store(now, Relaxed);
        if let Some(c) = self.conn {
            // The connection's own cache line, which only this connection's task writes.
            c.counter(self.up).fetch_add(n as u64, Relaxed);
            c.active().store(now, Relaxed);
        }
    }

    /// Its source sent its end of stream.
    fn read_eof(&self) {
        self.eof.store(true, Relaxed);
        if let Some(c) = self.conn {
            c.set_state(connections::State::HalfClosed);
        }
    }
}

/// One direction: read from `src`, write everything to `dst`, until EOF or an error. Whenever it waits
/// holding bytes it has not written, they are parked in `flow` (so a relay stopped for `carry` finds
/// them there), and bytes parked there before it starts (a carried connection's) go out first.
///
/// The splice pump is boxed: a task is as large as its largest state, and every idle
/// `epoll` or `copy` connection's task would otherwise keep room for them. The box is one
/// allocation per direction that takes one of those paths: under `relay: splice` that is every
/// direction from the start.
#[allow(clippy::manual_async_fn)]
fn pump<'a>(
    src: &'a TcpStream,
    dst: &'a TcpStream,
    flow: &'a Flow<'a>,
    other: &'a Flow<'a>,
    mode: RelayMode,
) -> impl Future<Output = DirEnd> + 'a {
    async move {
        #[cfg(target_os = "linux")]
        let mut stuck = false; // Splice stopped at urgent data (`pump_splice`): copy from then on.
        #[cfg(target_os = "linux")]
        if mode == RelayMode::Splice {
            if let Some(pipe) = splice::PipeLease::acquire() {
                match Box::pin(pump_splice(src, dst, flow, other, pipe)).await {
                    Some(end) => return end,
                    None => stuck = true,
                }
            }
        }
        // The direction's own buffer, once the destination has pushed back (see `copy_through_scratch`).
        let mut own: Option<Box<[u8]>> = None;
        let mut last_read = 0;
        loop {
            match write_out(dst, flow).await {
                // Kept for reading only when it is a full-size buffer (a carried connection's held
                // bytes come in one of their own length).
                Ok(Some(buf)) if buf.len() == COPY_BUF => own = Some(buf),
                Ok(_) => {}
                Err(e) => return DirEnd::DestError(e),
            }
            // A full buffer means bulk data: from here on splice, if a pipe is to be had. (`ring`
            // lands here only for a connection carried in from an older process.)
            #[cfg(target_os = "linux")]
            if matches!(mode, RelayMode::Epoll | RelayMode::Ring) && last_read == COPY_BUF && !stuck
            {
                if let Some(pipe) = splice::PipeLease::acquire() {
                    own = None;
                    match Box::pin(pump_splice(src, dst, flow, other, pipe)).await {
                        Some(end) => return end,
                        None => stuck = true,
                    }
                }
            }
            ack_unless_bytes(src, dst, flow);
            if let Err(e) = read_ready(src).await {
                return DirEnd::SourceError(e);
            }
            if let Some(mut b) = own.take() {
                // Under back-pressure once: this direction reads into a buffer of its own.
                match read_once(src, &mut b) {
                    Ok(0) => return finish(dst, flow, other),
                    Ok(n) => {
                        last_read = n;
                        flow.hold(b, 0, n);
                    }
                    Err(e) if retry(&e) => own = Some(b),
                    Err(e) => return DirEnd::SourceError(e),
                }
                continue;
            }
            match copy_through_scratch(src, dst, flow) {
                Scratch::Eof => return finish(dst, flow, other),
                Scratch::Again => {}
                Scratch::SourceError(e) => return DirEnd::SourceError(e),
                Scratch::DestError(e) => return DirEnd::DestError(e),
                Scratch::Done(n) => last_read = n,
                Scratch::Held { read, written, buf } => {
                    last_read = read;
                    flow.hold(buf, written, read);
                }
            }
        }
    }
}

/// Writes out what the direction holds (`flow.pending`: what a carried connection brought, or what
/// the destination pushed back), waiting for the destination with it parked in `flow`, where a relay
/// stopped for `carry` finds it. Returns the emptied buffer, for reuse. A `poll_fn` over references
/// rather than an async fn: every direction's future keeps room for this wait, and an async fn
/// would keep its arguments twice and the bytes it holds beside them.
fn write_out<'a>(
    dst: &'a TcpStream,
    flow: &'a Flow<'a>,
) -> impl Future<Output = io::Result<Option<Box<[u8]>>>> + 'a {
    std::future::poll_fn(move |cx| loop {
        let Some(mut p) = flow.pending.take() else {
            return Poll::Ready(Ok(None));
        };
        if write_held(dst, &mut p, flow)? {
            return Poll::Ready(Ok(Some(p.buf)));
        }
        flow.pending.put(p);
        // Pending until the destination takes bytes again (the failed write cleared its readiness).
        std::task::ready!(dst.poll_write_ready(cx))?;
    })
}

/// Waits until `s` may have bytes to read. A relay has one reader per socket, so the socket's single
/// read waker (`poll_read_ready`) is enough, and the wait keeps nothing in the task, where
/// `TcpStream::readable()`, which queues any number of waiters, keeps 152 bytes per direction for
/// every idle connection.
fn read_ready(s: &TcpStream) -> impl Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| s.poll_read_ready(cx))
}

/// Connects to `addr` with TCP_NODELAY (a proxy must not add Nagle delay) and, with `hold_ack`,
/// quick ACKs off, as HAProxy's `tcp-smart-connect` and the ring workers do: the kernel then holds
/// the handshake's last ACK and it leaves with the first bytes sent, so the backend wakes once to
/// accept and read them, not once for each. A copying relay started with it held sends it on its
/// own when the client has sent nothing ([`ack_unless_bytes`]); `hold_ack` only for those. Both
/// options are best effort: without them the connection works as it would anyway.
pub(crate) async fn connect_holding_ack(
    addr: std::net::SocketAddr,
    hold_ack: bool,
    watch: &PeerWatch,
) -> io::Result<TcpStream> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    let _ = socket.set_nodelay(true);
    watch.apply_or_log(SockRef::from(&socket), "backend");
    #[cfg(target_os = "linux")]
    if hold_ack {
        let _ = SockRef::from(&socket).set_tcp_quickack(false);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = hold_ack;
    socket.connect(addr).await
}

/// Whether a relay of `mode` sends a held handshake ACK for a client that has sent nothing
/// ([`ack_unless_bytes`]): the engines whose pump starts by copying. A backend connected for any
/// other must not hold it (`hold_ack` of [`connect_holding_ack`]).
pub(crate) fn sends_held_ack(mode: RelayMode) -> bool {
    matches!(mode, RelayMode::Epoll | RelayMode::Copy)
}

/// Before the client → backend direction waits for its client, while [`Flow::ack_held`]: sends
/// the backend's handshake ACK, if the kernel still holds it ([`connect_holding_ack`]), unless the
/// client's bytes are there to carry it. A client that sends nothing (a protocol where the server
/// speaks first) would otherwise leave its backend waiting for the kernel's delayed-ACK timer,
/// 200 ms, before it even accepts. "There" is the readiness the reactor knows, without a system
/// call: when it says readable, the read that follows either carries the ACK or finds nothing
/// (tokio can hold a socket readable with nothing to read: seen for a freshly accepted, silent one
/// while writing the tests below), and the check runs again before the next wait.
fn ack_unless_bytes(src: &TcpStream, dst: &TcpStream, flow: &Flow<'_>) {
    if !flow.ack_held.load(Relaxed) {
        return;
    }
    if flow.bytes() > 0 {
        // The bytes written carried it.
        flow.ack_held.store(false, Relaxed);
        return;
    }
    // A waker that does nothing: the wait that follows polls again with the task's own.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if src.poll_read_ready(&mut cx).is_pending() {
        // Turning quick ACKs on sends an ACK the kernel holds. Best effort: the delayed-ACK timer
        // sends it otherwise.
        #[cfg(target_os = "linux")]
        let _ = SockRef::from(dst).set_tcp_quickack(true);
        #[cfg(not(target_os = "linux"))]
        let _ = dst;
        flow.ack_held.store(false, Relaxed);
    }
}

/// Writes what it can of `p` without waiting: `Ok(true)` when all of it is out.
fn write_held(dst: &TcpStream, p: &mut Pending, flow: &Flow<'_>) -> io::Result<bool> {
    while p.off < p.end {
        match send_now(dst, &p.buf[p.off..p.end]) {
            Ok(k) => {
                p.off += k;
                flow.wrote(k);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

thread_local! {
    /// One read buffer per thread, shared by every connection on it: a message that the destination takes
    /// at once (requests and responses, almost always) needs no buffer of the connection's own, so
    /// connections cost no buffer memory and no allocation until a destination pushes back.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_BUF].into_boxed_slice());
}

enum Scratch {
    Eof,
    /// Nothing to read after all.
    Again,
    /// Read and written completely.
    Done(usize),
    /// Read `read` bytes, of which the destination took `written`; `buf[written..read]` holds the rest.
    Held {
        read: usize,
        written: usize,
        buf: Box<[u8]>,
    },
    SourceError(io::Error),
    DestError(io::Error),
}

/// Reads once into the thread's scratch buffer and writes what it can without waiting. Whatever the
/// destination does not take is moved into a buffer of the direction's own, which it then keeps.
fn copy_through_scratch(src: &TcpStream, dst: &TcpStream, flow: &Flow<'_>) -> Scratch {
    SCRATCH.with_borrow_mut(|b| {
        let n = match read_once(src, b) {
            Ok(0) => return Scratch::Eof,
            Ok(n) => n,
            Err(e) if retry(&e) => return Scratch::Again,
            Err(e) => return Scratch::SourceError(e),
        };
        let mut off = 0;
        while off < n {
            match send_now(dst, &b[off..n]) {
                Ok(k) => {
                    off += k;
                    flow.wrote(k);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Scratch::DestError(e),
            }
        }
        if off == n {
            return Scratch::Done(n);
        }
        let mut buf = vec![0u8; COPY_BUF].into_boxed_slice();
        buf[off..n].copy_from_slice(&b[off..n]);
        Scratch::Held {
            read: n,
            written: off,
            buf,
        }
    })
}

/// A direction on splice, until it ends, or (`None`, its pipe empty) until splice stops at TCP
/// urgent data in the source, which the caller then copies past.
#[cfg(target_os = "linux")]
async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    other: &Flow<'_>,
    mut pipe: splice::PipeLease,
) -> Option<DirEnd> {
    use splice::Filled;
    use std::os::fd::AsFd;
    flow.spliced.store(true, Relaxed);
    // What a carried connection brought along goes out before anything is read.
    if let Err(e) = write_out(dst, flow).await {
        return Some(DirEnd::DestError(e));
    }
    loop {
        // The pipe is empty here: fill it from the socket.
        if let Err(e) = src.readable().await {
            return Some(DirEnd::SourceError(e));
        }
        // Plain try_io, not read_once: a short splice does not mean the socket is drained (the pipe's 16
        // buffer slots can fill with small segments first), and clearing readiness then would stall.
        // Stuck at TCP urgent data, the caller's receives read past it; the readiness stays set
        // (`Stuck` is not an error), so they start at once.
        let fd = src.as_fd();
        let fill = || pipe.fill_or_stuck(fd);
        match src.try_io(Interest::READABLE, fill) {
            Ok(Filled::Stuck) => return None,
            Ok(Filled::Bytes(0)) => return Some(finish(dst, flow, other)),
            Ok(Filled::Bytes(_)) => {}
            Err(e) if retry(&e) => continue,
            Err(e) => return Some(DirEnd::SourceError(e)),
        }
        // Drain it completely before reading again, so `pending` bytes are the only ones in flight.
        while pipe.pending > 0 {
            match dst.try_io(Interest::WRITABLE, || pipe.drain_to(dst.as_fd())) {
                Ok(k) => {
                    flow.wrote(k);
                    continue;
                }
                Err(e) if retry(&e) => {}
                Err(e) => return Some(DirEnd::DestError(e)),
            }
            // Waiting with bytes in the pipe: parked where a relay stopped for `carry` finds them.
            flow.pipe.put(pipe);
            let ready = dst.writable().await;
            let Some(back) = flow.pipe.take() else {
                return Some(DirEnd::Carried);
            };
            pipe = back;
            if let Err(e) = ready {
                return Some(DirEnd::DestError(e));
            }
        }
    }
}

/// Errors after which the same operation is simply tried again.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// One non-blocking send: `TcpStream::try_write`, but through rustix's direct system call. The
/// libc wrappers of `send(2)` and `recv(2)` are cancellation points, which in a process with more
/// than one thread switch asynchronous cancellation on and off around every call (glibc 2.36,
/// Debian 12's; newer versions reworked cancellation, and may not): 0.5 % of the epoll engine's
/// samples under keep-alive load (`perf record`), where nginx's single-threaded workers pay
/// nothing. No SIGPIPE: a peer gone is an EPIPE like any other error.
fn send_now(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    return dst.try_io(Interest::WRITABLE, || {
        Ok(rustix::net::send(
            dst,
            buf,
            rustix::net::SendFlags::NOSIGNAL,
        )?)
    });
    // Where rustix has no MSG_NOSIGNAL (Apple's systems), as before.
    #[cfg(not(target_os = "linux"))]
    dst.try_write(buf)
}

/// One non-blocking read (a direct system call, as [`send_now`]). On TCP a short read means the
/// receive queue was emptied, so the read readiness is cleared at once instead of paying a further
/// `read` for EAGAIN: one syscall saved per message per direction. tokio clears it only if no new
/// readiness event arrived meanwhile, so no wake-up is lost. (Not for writes: clearing write
/// readiness after a short write was measured to lose wake-ups; not for splice, whose short counts
/// prove nothing.)
fn read_once(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len();
    let mut got = None;
    let r = sock.try_io(Interest::READABLE, || {
        let (n, _) = rustix::net::recv(sock, &mut *buf, rustix::net::RecvFlags::empty())?;
        got = Some(n);
        if n > 0 && n < want {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (r, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}

/// The source sent FIN: pass it on and leave the other direction running. When the other direction has
/// already ended, the relay is over and the caller closes `dst` at once, which sends the FIN anyway
/// (nothing unread can remain: its own EOF was read), so the shutdown call is skipped. Measured with perf on a
/// connection-per-request load: the FIN's work moves into close(), so only the syscall is saved (~1 %).
fn finish(dst: &TcpStream, flow: &Flow<'_>, other: &Flow<'_>) -> DirEnd {
    flow.read_eof();
    if other.eof.load(Relaxed) {
        return DirEnd::Eof;
    }
    match SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        // ENOTCONN: the destination is already gone; the other direction will see it.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => DirEnd::DestError(e),
        _ => DirEnd::Eof,
    }
}

#[cfg(test)]
mod tests {
    use super::choose_engine;
    use crate::config::RelayMode::{self, *};

    /// `auto` is the ring only for a service the ring can serve on a kernel that allows it;
    /// `ring` without io_uring is `epoll`, and says why; the rest are what they say.
    #[test]
    fn auto_is_the_ring_where_it_fits_and_is_allowed() {
        let (yes, no) = (Ok(()), Err("blocked"));
        type Case<'a> = (
            RelayMode,
            bool,
            Result<(), &'a str>,
            RelayMode,
            Option<&'a str>,
        );
        let cases: [Case; 9] = [
            (Auto, true, yes, Ring, None),
            (Auto, false, yes, Epoll, None),
            (Auto, true, no, Epoll, Some("blocked")),
            (Auto, false, no, Epoll, None),
            (Ring, true, yes, Ring, None),
            (Ring, false, yes, Ring, None),
            (Ring, true, no, Epoll, Some("blocked")),
            (Epoll, true, yes, Epoll, None),
            (Copy, true, no, Copy, None),
        ];
        for (mode, fits, ring, engine, why) in cases {
            assert_eq!(
                choose_engine(mode, fits, || ring),
                (engine, why),
                "{mode:?}, fits the ring: {fits}, ring {ring:?}"
            );
        }
    }

    /// An engine that does not need io_uring never probes for it (a seccomp profile that kills
    /// or audits io_uring calls must not see one from `relay: epoll`).
    #[test]
    fn only_the_ring_probes_for_io_uring() {
        let asked = std::cell::Cell::new(0);
        let probe = || {
            asked.set(asked.get() + 1);
            Ok(())
        };
        for mode in [Epoll, Splice, Copy] {
            choose_engine(mode, true, probe);
        }
        choose_engine(Auto, false, probe);
        assert_eq!(
            asked.get(),
            0,
            "epoll, splice, copy, and auto where the ring cannot serve"
        );
        choose_engine(Auto, true, probe);
        choose_engine(Ring, true, probe);
        assert_eq!(asked.get(), 2);
    }

    /// ETIMEDOUT on a side with keepalive or user_timeout (`watched`) is the peer found dead: the
    /// connection ends as `keepalive_timeout` and the other side is reset. On a side without
    /// them (the retransmissions given up), and for any other error, it is that side's reset.
    #[test]
    fn a_watched_side_that_timed_out_is_keepalive_timeout() {
        use super::{direction_ended, DirEnd, Side, Watched};
        use crate::outcome::Outcome::*;
        let timed_out = || std::io::Error::from_raw_os_error(libc::ETIMEDOUT);
        let reset = || std::io::Error::from_raw_os_error(libc::ECONNRESET);
        let both = Watched {
            client: true,
            backend: true,
        };
        let client_only = Watched {
            client: true,
            backend: false,
        };
        // (direction, how it ended, watched) → end, and whether the client is the side reset.
        use DirEnd::{DestError as Dst, SourceError as Src};
        let (up, down, t, r) = (Side::Up, Side::Down, timed_out, reset);
        let cases = [
            (up, Src(t()), both, KeepaliveTimeout, false),
            (down, Dst(t()), client_only, KeepaliveTimeout, false),
            (down, Src(t()), both, KeepaliveTimeout, true),
            (up, Dst(t()), both, KeepaliveTimeout, true),
            (down, Src(t()), client_only, BackendReset, true),
            (up, Src(t()), Watched::default(), ClientReset, false),
            (up, Src(r()), both, ClientReset, false),
            (down, Src(r()), both, BackendReset, true),
        ];
        for (side, end, watched, want, reset_client) in cases {
            let what = format!("{side:?} {end:?} {watched:?}");
            let s = direction_ended(side, end, &mut None, watched).expect(&what);
            assert_eq!(s.end, want, "{what}");
            assert_eq!(
                (s.reset_client, s.reset_backend),
                (reset_client, !reset_client),
                "{what}"
            );
        }
        let mut first_fin = None;
        assert!(direction_ended(Side::Up, DirEnd::Eof, &mut first_fin, both).is_none());
        assert_eq!(first_fin, Some(ClientClosed));
    }
}

#[cfg(all(test, target_os = "linux"))]
mod held_ack_tests {
    use std::future::Future;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU64;
    use std::task::Poll;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::tcp_info::{tcp_info_fd, AckTimerRuns};
    use super::{connect_holding_ack, relay, Begin, LiveCounters, PeerWatch, RelayOptions};
    use crate::config::RelayMode::Epoll;

    /// Segments in and out of `s`, from its TCP_INFO.
    fn segs(s: &TcpStream) -> (u32, u32) {
        let info = tcp_info_fd(s.as_raw_fd()).unwrap();
        (info.tcpi_segs_in, info.tcpi_segs_out)
    }

    /// A backend listening, a proxy's side of a new client (the socket it accepted), the client's,
    /// which has sent `first` (once the proxy's side knows it readable), and the proxy's socket
    /// connected to the backend with its handshake's last ACK held.
    async fn connected_holding_ack(first: &[u8]) -> (TcpListener, TcpStream, TcpStream, TcpStream) {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let ours = l.accept().await.unwrap().0;
        if !first.is_empty() {
            client.write_all(first).await.unwrap();
            ours.readable().await.unwrap();
        }
        let b = connect_holding_ack(backend.local_addr().unwrap(), true, &PeerWatch::NONE)
            .await
            .unwrap();
        (backend, ours, client, b)
    }

    const HELD: Begin = Begin::New {
        ack_held: true,
        first_byte_by: super::FirstByteIn::NONE,
    };

    const EPOLL: RelayOptions = RelayOptions {
        mode: Epoll,
        idle_timeout: Duration::from_secs(60),
        half_close_timeout: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(300),
        first_byte_timeout: None,
        client_watch: PeerWatch::NONE,
        backend_watch: PeerWatch::NONE,
    };

    /// A client whose first bytes are there when its backend has connected: the handshake's last
    /// ACK, held back, leaves with them. The backend's kernel counts the SYN and one segment, not
    /// an ACK and then the bytes.
    #[tokio::test]
    async fn the_clients_first_bytes_carry_the_backends_held_ack() {
        let mut runs = AckTimerRuns::new();
        loop {
            runs.start();
            let (backend, ours, mut client, b) = connected_holding_ack(b"first").await;
            let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
            let live = LiveCounters {
                up: &up,
                down: &down,
                conn: None,
            };
            let cut = std::pin::pin!(std::future::pending());
            let relayed = relay(&ours, &b, &EPOLL, cut, None, live, HELD);
            let far_end = async {
                let (mut far, _) = backend.accept().await.unwrap();
                let mut got = [0u8; 5];
                far.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"first");
                let segs_in = segs(&far).0;
                let in_time = runs.in_time("the client's first bytes");
                client.shutdown().await.unwrap();
                far.shutdown().await.unwrap();
                (segs_in, in_time)
            };
            let (r, (segs_in, in_time)) = tokio::join!(relayed, far_end);
            if !in_time {
                continue;
            }
            assert_eq!(segs_in, 2, "the SYN, then the ACK with the bytes");
            assert_eq!(r.bytes_up, 5);
            return;
        }
    }

    /// A client that has sent nothing when its backend has connected (a protocol where the server
    /// speaks first): the relay sends the held ACK before it first waits for the client, not
    /// 200 ms later when the kernel's delayed-ACK timer would; the backend accepts the connection
    /// only once it has it.
    #[tokio::test]
    async fn a_silent_clients_relay_sends_the_backends_held_ack_before_it_waits() {
        let mut runs = AckTimerRuns::new();
        loop {
            runs.start();
            let (backend, ours, _client, b) = connected_holding_ack(b"").await;
            let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
            let live = LiveCounters {
                up: &up,
                down: &down,
                conn: None,
            };
            let cut = std::pin::pin!(std::future::pending());
            let before = segs(&b).1;
            let mut relayed = std::pin::pin!(relay(&ours, &b, &EPOLL, cut, None, live, HELD));
            let waits =
                std::future::poll_fn(|cx| Poll::Ready(relayed.as_mut().poll(cx).is_pending()));
            assert!(waits.await, "the relay waits for bytes");
            let after = segs(&b).1;
            if !runs.in_time("a silent client's relay") {
                continue;
            }
            assert_eq!(
                before, 1,
                "the SYN sent, the handshake's last ACK held back"
            );
            assert_eq!(after, 2, "the SYN and the handshake's last ACK sent");
            backend.accept().await.unwrap();
            return;
        }
    }
}
