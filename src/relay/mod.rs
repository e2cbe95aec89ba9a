//! Moving bytes between a client and its backend, both directions at once, until both are done.
//!
//! The contract, whatever the engine:
//! - **Half-close.** EOF read from one side becomes `shutdown(SHUT_WR)` on the other; the opposite
//!   direction keeps flowing until it ends too (or `half_close_timeout` passes).
//! - **Resets.** An error on one side (RST, EPIPE) is passed on as a reset (SO_LINGER 0) on the other,
//!   so a peer never mistakes a broken stream for a complete one.
//! - **Bounded buffering.** At most one buffer (or one pipe) per direction; a slow reader stalls its
//!   writer through TCP back-pressure instead of growing memory.
//! - **Exact counts.** Bytes are counted when written to the destination, so the totals are exact even
//!   when the connection ends in an error or a timeout.
//!
//! Engines: `copy` moves bytes through a user-space buffer; `splice` (Linux) moves them socket → pipe →
//! socket in the kernel; `auto` copies and switches a direction to splice once it carries bulk data (a
//! read fills the whole buffer), which keeps small request/response traffic on the cheaper copy path.
//! `auto` does not use io_uring: in side-by-side runs the ring did not reliably cost less machine CPU
//! (benchmarks/results/2026-11-23-io-uring.md).
//! A direction that cannot get a pipe copies. `uring` keeps one receive or send per direction in
//! flight on the worker's io_uring ring (`uring.rs`) and, like `auto`, splices a direction once it
//! carries bulk data; where io_uring is unavailable it runs as `auto`.

#[cfg(target_os = "linux")]
mod splice;
mod stream;
#[cfg(target_os = "linux")]
pub(crate) mod uring;

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub(crate) use stream::{relay_streams, Endpoint};

use crate::config::RelayMode;
use crate::outcome::Outcome;

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
}

/// Counters that see every byte as it is written: client → backend (`up`) and back (`down`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveCounters<'a> {
    pub(crate) up: &'a AtomicU64,
    pub(crate) down: &'a AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Relayed {
    /// Bytes written to the backend.
    pub(crate) bytes_up: u64,
    /// Bytes written to the client.
    pub(crate) bytes_down: u64,
    /// How it ended: one of the relay's outcomes, never a refusal.
    pub(crate) end: Outcome,
    /// Whether either direction ran on splice, i.e. held a pipe (for `auto`: carried bulk data).
    pub(crate) spliced: bool,
    /// Whether the connection ran on the io_uring engine.
    pub(crate) uring: bool,
    /// What broke it, when a side failed (the relay logs nothing: the session does, in its span).
    pub(crate) broken: Option<io::Error>,
}

/// How one direction ended.
#[derive(Debug)]
enum DirEnd {
    /// The source sent FIN; the destination's write side has been shut down.
    Eof,
    /// Reading the source failed: the source side broke.
    SourceError(io::Error),
    /// Writing the destination failed: the destination side broke.
    DestError(io::Error),
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
    /// This direction runs on the io_uring ring.
    uring: AtomicBool,
    /// Milliseconds since the relay started at the last successful write, for the idle timer.
    last_active_ms: AtomicU64,
}

/// The engine a service configured with `mode` runs: `uring` where io_uring is unavailable falls
/// back to `auto` (epoll), saying so once per process.
pub(crate) fn engine_for(mode: RelayMode, service: &str) -> RelayMode {
    if mode != RelayMode::Uring {
        return mode;
    }
    #[cfg(target_os = "linux")]
    let why = match uring::availability() {
        Ok(()) => return mode,
        Err(why) => why.as_str(),
    };
    #[cfg(not(target_os = "linux"))]
    let why = "io_uring is Linux only";
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Relaxed) {
        tracing::warn!(
            service,
            reason = why,
            "relay: uring is unavailable; falling back to the epoll engine (auto)"
        );
    }
    RelayMode::Auto
}

/// Relays until both directions end, one side fails, a timeout fires or `cut` completes (the drain
/// deadline, or the backend's sessions being closed), which ends the relay with the `Outcome` it yields.
/// On return, resets have been armed (SO_LINGER 0) on the side that must see one; the caller closes both
/// sockets by dropping them.
pub(crate) async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    opts: &RelayOptions,
    cut: impl std::future::Future<Output = Outcome>,
    live: LiveCounters<'_>,
) -> Relayed {
    let start = Instant::now();
    let up = Flow::new(live.up);
    let down = Flow::new(live.down);
    let mut up_fut = std::pin::pin!(pump(client, backend, &up, &down, opts.mode, start));
    let mut down_fut = std::pin::pin!(pump(backend, client, &down, &up, opts.mode, start));
    let (mut up_done, mut down_done) = (false, false);
    let directions = std::future::poll_fn(|cx| {
        if !up_done {
            if let Poll::Ready(end) = up_fut.as_mut().poll(cx) {
                up_done = true;
                return Poll::Ready((Side::Up, end));
            }
        }
        if !down_done {
            if let Poll::Ready(end) = down_fut.as_mut().poll(cx) {
                down_done = true;
                return Poll::Ready((Side::Down, end));
            }
        }
        Poll::Pending
    });
    let supervised = supervise(directions, &up, &down, opts, start, cut).await;
    conclude(supervised, &up, &down, client, backend)
}

/// How a relay of any engine ends: resets armed on the sockets that must see one, the live counters
/// flushed, and what moved.
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
    Relayed {
        bytes_up: up.bytes(),
        bytes_down: down.bytes(),
        end: supervised.end,
        spliced: up.spliced.load(Relaxed) || down.spliced.load(Relaxed),
        uring: up.uring.load(Relaxed) || down.uring.load(Relaxed),
        broken: supervised.broken,
    }
}

/// A direction of a connection: client → backend, or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Up,
    Down,
}

/// How a supervised relay ended, and which sockets must be reset when closed.
struct Supervised {
    end: Outcome,
    reset_client: bool,
    reset_backend: bool,
    /// What broke it, when a side failed.
    broken: Option<io::Error>,
}

/// The part of a relay every engine shares: waits on `directions` (which yields each direction's end
/// once) and on the inactivity timer and the cut, and decides how the connection ends. One inactivity
/// timer: `idle_timeout` while both directions flow, `half_close_timeout` once one has ended
/// (HAProxy's `timeout client-fin`: a half-closed connection may still stream for hours as long as
/// bytes keep moving); half-closing restarts the clock.
async fn supervise(
    directions: impl std::future::Future<Output = (Side, DirEnd)>,
    up: &Flow<'_>,
    down: &Flow<'_>,
    opts: &RelayOptions,
    start: Instant,
    cut: impl std::future::Future<Output = Outcome>,
) -> Supervised {
    let mut limit = opts.idle_timeout;
    let mut timeout_end = Outcome::IdleTimeout;
    let mut quiet_floor = start;
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer, cut, directions);
    let mut done = 0;
    let mut first_fin: Option<Outcome> = None;
    let broken = |end, reset_client, cause| Supervised {
        end,
        reset_client,
        reset_backend: !reset_client,
        broken: Some(cause),
    };
    loop {
        tokio::select! {
            (side, r) = &mut directions => {
                done += 1;
                match (side, r) {
                    (Side::Up, DirEnd::Eof) => { first_fin.get_or_insert(Outcome::ClientClosed); }
                    (Side::Down, DirEnd::Eof) => { first_fin.get_or_insert(Outcome::BackendClosed); }
                    // The side that failed is gone; the other must see a reset.
                    (Side::Up, DirEnd::SourceError(e)) => return broken(Outcome::ClientReset, false, e),
                    (Side::Up, DirEnd::DestError(e)) => return broken(Outcome::BackendReset, true, e),
                    (Side::Down, DirEnd::SourceError(e)) => return broken(Outcome::BackendReset, true, e),
                    (Side::Down, DirEnd::DestError(e)) => return broken(Outcome::ClientReset, false, e),
                };
            }
            () = &mut timer => {
                let last = up.last_active_ms.load(Relaxed).max(down.last_active_ms.load(Relaxed));
                let quiet_since = (start + Duration::from_millis(last)).max(quiet_floor);
                if Instant::now() >= quiet_since + limit {
                    return Supervised { end: timeout_end, reset_client: false, reset_backend: false, broken: None };
                }
                timer.as_mut().reset(quiet_since + limit);
                continue;
            }
            end = &mut cut => {
                // A reset on both sides, so neither mistakes the cut for the end of the stream.
                return Supervised { end, reset_client: true, reset_backend: true, broken: None };
            }
        }
        // A direction ended with EOF.
        if done == 2 {
            let end = first_fin.unwrap_or(Outcome::ClientClosed);
            return Supervised {
                end,
                reset_client: false,
                reset_backend: false,
                broken: None,
            };
        }
        limit = opts.half_close_timeout;
        timeout_end = Outcome::HalfCloseTimeout;
        quiet_floor = Instant::now();
        timer.as_mut().reset(quiet_floor + limit);
    }
}

/// Arms a reset on `side`: when the socket is dropped the kernel sends RST instead of FIN.
fn arm_reset(side: &TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, with a FIN.
    let _ = SockRef::from(side).set_linger(Some(Duration::ZERO));
}

impl<'a> Flow<'a> {
    fn new(live: &'a AtomicU64) -> Flow<'a> {
        Flow {
            bytes: AtomicU64::new(0),
            live,
            unflushed: AtomicU64::new(0),
            last_active_ms: AtomicU64::new(0),
            eof: AtomicBool::new(false),
            spliced: AtomicBool::new(false),
            uring: AtomicBool::new(false),
        }
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

    fn wrote(&self, n: usize, start: Instant) {
        self.bytes.fetch_add(n as u64, Relaxed);
        let pending = self.unflushed.fetch_add(n as u64, Relaxed) + n as u64;
        if pending >= LIVE_FLUSH {
            self.flush_live();
        }
        self.last_active_ms
            .store(start.elapsed().as_millis() as u64, Relaxed);
    }
}

/// One direction: read from `src`, write everything to `dst`, until EOF or an error.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    other: &Flow<'_>,
    mode: RelayMode,
    start: Instant,
) -> DirEnd {
    #[cfg(target_os = "linux")]
    if mode == RelayMode::Uring && uring::usable() {
        flow.uring.store(true, Relaxed);
        if let Some(end) = uring::pump(src, dst, flow, other, start).await {
            return end;
        }
        // Bulk: spliced, as `auto` does (the socket is still registered with the reactor, so the
        // epoll engines can take it over); with no pipe free, copied below.
        if let Some(pipe) = splice::PipeLease::acquire() {
            return pump_splice(src, dst, flow, other, pipe, start).await;
        }
    }
    #[cfg(target_os = "linux")]
    if mode == RelayMode::Splice {
        if let Some(pipe) = splice::PipeLease::acquire() {
            return pump_splice(src, dst, flow, other, pipe, start).await;
        }
    }
    // Bytes read but not yet written, once the destination has pushed back (see `copy_through_scratch`).
    let mut held: Option<Box<[u8]>> = None;
    loop {
        if let Err(e) = src.readable().await {
            return DirEnd::SourceError(e);
        }
        let (n, mut off) = if let Some(b) = held.as_deref_mut() {
            // Under back-pressure: this direction has a buffer of its own.
            match read_once(src, b) {
                Ok(0) => return finish(dst, flow, other),
                Ok(n) => (n, 0),
                Err(e) if retry(&e) => continue,
                Err(e) => return DirEnd::SourceError(e),
            }
        } else {
            match copy_through_scratch(src, dst, flow, start) {
                Scratch::Eof => return finish(dst, flow, other),
                Scratch::Again => continue,
                Scratch::SourceError(e) => return DirEnd::SourceError(e),
                Scratch::DestError(e) => return DirEnd::DestError(e),
                Scratch::Done(n) => (n, n),
                Scratch::Held { read, written, buf } => {
                    held = Some(buf);
                    (read, written)
                }
            }
        };
        let b = held.as_deref().unwrap_or(&[]);
        while off < n {
            if let Err(e) = dst.writable().await {
                return DirEnd::DestError(e);
            }
            match dst.try_write(&b[off..n]) {
                Ok(k) => {
                    off += k;
                    flow.wrote(k, start);
                }
                Err(e) if retry(&e) => continue,
                Err(e) => return DirEnd::DestError(e),
            }
        }
        // A full buffer means bulk data: from here on splice, if a pipe is to be had. (`uring` lands
        // here only where io_uring is unavailable, or with no pipe free, and then behaves as `auto`.)
        #[cfg(target_os = "linux")]
        if matches!(mode, RelayMode::Auto | RelayMode::Uring) && n == COPY_BUF {
            if let Some(pipe) = splice::PipeLease::acquire() {
                drop(held);
                return pump_splice(src, dst, flow, other, pipe, start).await;
            }
        }
    }
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
fn copy_through_scratch(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    start: Instant,
) -> Scratch {
    SCRATCH.with_borrow_mut(|b| {
        let n = match read_once(src, b) {
            Ok(0) => return Scratch::Eof,
            Ok(n) => n,
            Err(e) if retry(&e) => return Scratch::Again,
            Err(e) => return Scratch::SourceError(e),
        };
        let mut off = 0;
        while off < n {
            match dst.try_write(&b[off..n]) {
                Ok(k) => {
                    off += k;
                    flow.wrote(k, start);
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

#[cfg(target_os = "linux")]
async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
    other: &Flow<'_>,
    mut pipe: splice::PipeLease,
    start: Instant,
) -> DirEnd {
    use std::os::fd::AsFd;
    flow.spliced.store(true, Relaxed);
    loop {
        // The pipe is empty here: fill it from the socket.
        if let Err(e) = src.readable().await {
            return DirEnd::SourceError(e);
        }
        // Plain try_io, not read_once: a short splice does not mean the socket is drained (the pipe's 16
        // buffer slots can fill with small segments first), and clearing readiness then would stall.
        match src.try_io(Interest::READABLE, || {
            pipe.fill_from(src.as_fd(), splice::PIPE_SIZE)
        }) {
            Ok(0) => return finish(dst, flow, other),
            Ok(_) => {}
            Err(e) if retry(&e) => continue,
            Err(e) => return DirEnd::SourceError(e),
        }
        // Drain it completely before reading again, so `pending` bytes are the only ones in flight.
        while pipe.pending > 0 {
            if let Err(e) = dst.writable().await {
                return DirEnd::DestError(e);
            }
            match dst.try_io(Interest::WRITABLE, || pipe.drain_to(dst.as_fd())) {
                Ok(k) => flow.wrote(k, start),
                Err(e) if retry(&e) => continue,
                Err(e) => return DirEnd::DestError(e),
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

/// One non-blocking read. On TCP a short read means the receive queue was emptied, so the read
/// readiness is cleared at once instead of paying a further `read` for EAGAIN: one syscall saved per
/// message per direction. tokio clears it only if no new readiness event arrived meanwhile, so no wake-up
/// is lost. (Not for writes: clearing write readiness after a short write was measured to lose wake-ups;
/// not for splice, whose short counts prove nothing.)
fn read_once(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len();
    let mut got = None;
    let r = sock.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(sock)).read(buf)?;
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
    flow.eof.store(true, Relaxed);
    if other.eof.load(Relaxed) {
        return DirEnd::Eof;
    }
    match SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        // ENOTCONN: the destination is already gone; the other direction will see it.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => DirEnd::DestError(e),
        _ => DirEnd::Eof,
    }
}
