//! The ring workers, the default data plane (`relay: auto` where it fits, or `relay: ring`): each a
//! thread that runs its own loop on one io_uring and sleeps only in `io_uring_enter`, with accept,
//! connect, receive, send and close all on the ring, built after the C probe
//! (`benchmarks/probes/ring-proxy.c`) that set the ceiling. The loop is generic over the [`Host`]
//! that decides (admission, a backend, the accounting): the services' host is `host.rs`, the threads
//! that run it `workers.rs`; what io_uring is to the process (the probe, a ring's setup, the pool
//! of provided buffers) is `relay/uring/`, below.
//!
//! What a worker does with a connection: one of the accepts it keeps in flight on each listener
//! hands it a client with its address (a multishot accept gives no address, and asking for it after
//! costs a system call, and fails for a client that has already reset); the [`Host`] (the services,
//! above this module) admits it and names a backend, or first asks for the client's opening bytes
//! (a PROXY header: one-shot receives into the connection's own buffer, within a deadline linked to
//! each, until the host decides); a non-blocking socket with TCP_NODELAY and quick ACKs off
//! connects through the ring with a linked timeout (the host names another backend when it fails),
//! and the handshake's last ACK leaves with the first bytes for the backend, or on its own a loop
//! turn later when none have come (`release_acks`); then each direction keeps one multishot receive
//! (one-shot when a dry pool wakes it) armed into the ring's pool of provided buffers and sends
//! from those buffers in order, one send in flight (a preface the host gave, and client bytes read
//! with the header, go first, from the connection's buffer, and the preface is not counted as the
//! client's); both sockets close through the ring. The kernel does the waiting; the thread enters
//! it once per loop, submitting everything the last batch of completions started and waiting for
//! the next (without waiting, when a held ACK is to be looked at).
//!
//! The relay contract is the other engines' (`relay/mod.rs`): a FIN read is passed on (shutdown(2):
//! IORING_OP_SHUTDOWN is punted to an io-wq thread) once what came before it is sent; a side that
//! breaks makes the other see a reset; both FINs end the connection with whoever sent the first;
//! `idle_timeout` while both directions flow, `half_close_timeout` once one has ended, measured from
//! the last byte moved (and `stall_timeout`, below), checked on a tick every 250 ms (or every
//! quarter of the timeout that applies, when that is less, down to 5 ms: `tick_for`); a cut (the drain's deadline, the backend's
//! sessions cut) resets both sides. The same pure decisions (`direction_ended`, `Supervised`) say how
//! it ended.
//!
//! Back-pressure: a direction holds the pool buffers it received and has not yet sent; when it holds
//! as many as the cap allows its receive is cancelled, and armed again once it holds fewer than
//! half of that (or none). The cap is [`CAP`] while at least half the pool is free and shrinks in
//! proportion to what is free, down to 1 (`cap_for`, a few integer operations per receive): the
//! directions whose destinations do not read take about half the pool at the full cap and share the
//! rest at smaller ones, instead of 128 of them holding it all. A receive the pool could not serve
//! (ENOBUFS, every buffer it has given held) ends. While the pool has buffers it never gave (it
//! starts with 64 of its 1,024, so that a worker keeps resident what its load needs), it gives 64
//! more and the direction is armed again at once. Once it has given all, a direction that holds
//! nothing receives into the connection's own buffer (16 KiB, `Conn::pre` or `post`, as the epoll
//! engine's direction has one), one receive at a time, while the pool stays dry; one that holds
//! some waits for buffers to come back (two waiting directions for each, from a send or from a
//! connection's end, and all of them every 250 ms, the tick's slow part), and receives at once
//! when its own sends leave it holding none. So a dry pool slows a direction and never stops it:
//! however many directions hold the pool's buffers, one that holds nothing moves. Why its own
//! buffer rather than a reserve of pool buffers kept for directions that hold none: a reserve is
//! shared too, so enough new directions whose destinations do not read would drain it as well,
//! while a buffer of the connection's own is there for every connection; it costs an allocation
//! only while the pool is dry, and nothing on the common path. What no buffer can bound is a
//! destination that never reads: `stall_timeout` cuts a connection (both sides reset,
//! `Outcome::StallTimeout`) whose destination has taken no byte for that long while bytes waited
//! for it, giving back what it held.
//!
//! Bulk: a direction whose receive fills a whole pool buffer carries bulk data (as `relay: epoll`
//! judges it) and moves to splice(2) for good: its receive is cancelled, what it already received
//! is sent, and then it moves bytes socket → pipe → socket with non-blocking splice calls on this
//! thread, polling through the ring for whichever socket would block (IORING_OP_SPLICE is always
//! handed to io-wq). The pipe (from the process's capped pool, 64 KiB) is its buffer, so the bytes
//! a bulk direction holds are bounded by it. With no pipe to be had it stays on the pool's buffers.
//!
//! Ownership: every submission goes through one type, `submit.rs`'s `Sq`, which builds each entry
//! from the connection (or listener) it is for, never from a descriptor or pointer a step passes
//! in, and pushes it; it alone counts a connection's `refs` (the operations submitted and not
//! completed for the last time; a backend socket's options go uncounted, since they complete before
//! the counted connect chained after them is issued): each method that submits for a connection
//! takes it and counts what it pushes (`Sq::push_for`), so no step can forget to. A connection's
//! state is boxed (the kernel reads its backend address, and the connect's timeout, from there) and
//! stays in its slot while anything of it is in the kernel (until `refs` is back at zero); its slot
//! is reused only after that, so no completion can reach another connection. Sends point into pool
//! buffers the direction holds until the send completes (a `Filled`, which only a completion makes,
//! given up to give the buffer back), or into the connection's own buffer (`Own`), lent to one
//! receive or send at a time, whose completion alone says how much of it is filled. The pool lives
//! as long as the worker, and is leaked if the worker exits with operations still in the kernel.
//! The steps hold no `unsafe`: `submit.rs` says, for each entry, why the kernel may have it.
//!
//! No operation is handed to an io-wq thread (`iou-wrk`, a kernel thread that blocks in it, and
//! wakes the worker from another CPU): the kernel does that with an operation it polled for and
//! that still cannot proceed when woken, so sends carry MSG_DONTWAIT and complete with EAGAIN when
//! the socket is full, and accepts (Linux 6.10+) IORING_ACCEPT_DONTWAIT, when another worker took
//! the client; the worker then polls for room, or for a client (exclusively: one waiter per client
//! across the workers), itself. FIN is shutdown(2), not IORING_OP_SHUTDOWN, which always goes to
//! io-wq. A test watches a loaded process's threads (`engines::the_ring_workers_never_hand_…`).
//!
//! Commands from the control plane (listen, stop listening, cut, carry, stop) come through a channel
//! and an eventfd the ring polls (multishot): the only way in from other threads.
//!
//! Carry (an upgrade): each relayed connection, and each connected after, stops at a quiet point.
//! Everything it has in the kernel is cancelled, nothing new is started, and what completes
//! meanwhile is kept (a receive's buffer, a send's progress). With nothing left in the kernel it
//! leaves the worker: its two sockets, the bytes each direction held (its buffers, then its pipe)
//! and which FIN was passed on go to the host ([`Host::carried`]). Once the host takes no more,
//! a connection stopped goes on here where it stopped.
//!
//! This file holds the [`Host`] a worker serves, the worker's start, loop, commands and ticks, the
//! state every step shares and the pure decisions on it (`Dir`, `expired`, `recancel`); each step
//! is a file of its own: `accept`, `connect` (the first bytes, the backend socket and its
//! connect), `flow` (the relay) and `end` (cancel, free, cut, carry), and what they submit goes
//! through `submit` (every entry, and each completion's way out); the services' side is
//! `host.rs` and the threads `workers.rs`.
// The worker runs no tokio runtime: its clock is the kernel's, whose timeouts it arms.
#![allow(clippy::disallowed_types)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{SockAddr, SockRef};

use crate::outcome::Outcome;
use crate::relay::splice::{stuck_at_urgent, PipeLease, PipePool, PIPE_SIZE};
use crate::relay::uring::bufs::{BufPool, Filled, GROUP};
use crate::relay::{direction_ended, DirEnd, Quiesced, Side, Supervised, Watched};
use crate::util::RateLimited;

mod accept;
mod connect;
mod end;
mod flow;
mod host;
mod submit;
mod workers;

pub(crate) use workers::{RingWorkers, WorkerView, METRICS};

use connect::sockets_on_ring;
#[cfg(test)]
use connect::{connect_result, fail_nodelay_here};
use flow::Starved;
#[cfg(test)]
use submit::with_ioprio;
use submit::{Done, Own, Places, Refs, Sq};

/// `io_uring_enter` failures in a row (each followed by a 1 ms wait) after which a worker gives its
/// listeners to the host ([`Host::enter_refused`]): no client it accepts could be served.
pub(crate) const ENTER_GIVE_UP: u32 = 100;

/// Submission queue entries: one `io_uring_enter` submits at most this many.
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: past them the kernel keeps completions in its overflow list
/// (IORING_FEAT_NODROP) until the next entry moves them back.
const CQ_ENTRIES: u32 = 64 * 1024;
/// Provided buffers per worker, and their size: 16 MiB of address space, touched as the kernel uses
/// the buffers. 16 KiB so that bulk data moves in as few messages as the copy engine's reads.
const POOL_BUFS: u16 = 1024;
const POOL_BUF: u32 = 16 * 1024;
/// Buffers the pool gives the kernel at first, and how many more each time a receive finds it dry:
/// the kernel takes them in turn, so every buffer given is touched sooner or later, and a worker
/// that gave all 1,024 at once kept 16 MiB resident however few it needed at a time.
const POOL_FIRST: u16 = 64;
const POOL_GROW: u16 = 64;
/// Pool buffers a direction may hold before its receive is cancelled while at least half the pool
/// is free; fewer as it empties (`cap_for`).
pub(crate) const CAP: usize = 8;
/// The connection's own buffer a direction that holds nothing receives into when the pool has
/// given every buffer and none is free (`Worker::arm_own`): as large as a pool buffer, as the
/// epoll engine's own buffer is.
const OWN_BUF: usize = POOL_BUF as usize;

/// How many pool buffers a direction may hold when `free` of the pool's `total` are not held by
/// any direction: [`CAP`] while at least half is free, then in proportion, down to 1 (a direction
/// always takes what one receive brings; one that holds nothing has its own buffer besides). So
/// the directions whose destination does not read take at most about half the pool at the full
/// cap, and share what is left at shrinking caps, instead of 128 of them taking it all.
/// A few integer operations: it is asked on every receive.
pub(crate) fn cap_for(free: usize, total: usize) -> usize {
    (CAP * 2 * free / total.max(1)).clamp(1, CAP)
}
/// How often timeouts, cuts and starved receives are looked at, while there is anything to look at
/// (more often while a connection's timeouts are short: `tick_for`).
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// The shortest tick, however short a connection's timeouts.
const MIN_TICK: Duration = Duration::from_millis(5);

/// How often a connection with `timeouts` needs looking at, for the one that applies (idle, or
/// half-close once a side has shut) to end it at most a quarter of it late: a quarter of it, from
/// [`MIN_TICK`] to `base` (the worker's tick).
fn tick_for(timeouts: &Timeouts, half_closed: bool, base: Duration) -> Duration {
    let limit = if half_closed {
        timeouts.half_close
    } else {
        timeouts.idle
    };
    let limit = timeouts.first_byte.map_or(limit, |f| limit.min(f));
    (limit.min(timeouts.stall) / 4).max(MIN_TICK).min(base)
}
/// Accepts in flight per listener and worker: a burst of connections is taken several at a time.
const ACCEPTS: usize = 4;
/// How many times, after a turn that waited, an ending connection's backend cancellation is asked
/// again while its connect has not been issued (`Worker::on_cancel`).
const RECANCELS: u8 = 4;
/// How long a stopping worker waits for its connections' last completions.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// How long a stopping worker waits for its cancellations' answers: [`STOP_WAIT`], or none on a
/// thread that called [`hurry_stops_here`].
fn stop_wait() -> Duration {
    #[cfg(test)]
    if HURRIED.get() {
        return Duration::ZERO;
    }
    STOP_WAIT
}

#[cfg(test)]
thread_local! {
    static HURRIED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From now on, a worker on the calling thread leaves its loop in the turn it is told to stop,
/// before any cancellation is answered: the kernel here answers every one in time, and what a
/// worker does with the connections it leaves open must be tested.
#[cfg(test)]
fn hurry_stops_here() {
    HURRIED.set(true);
}

// An operation's `user_data`: its kind in the low 4 bits, the direction in bit 4 (an accept's
// place in its listener's in bits 4 to 7), the connection's slot (or the listener's id) in the high
// 32.
const K_CLOSE: u64 = 0;
const K_ACCEPT: u64 = 1;
const K_RECV: u64 = 2;
const K_SEND: u64 = 3;
const K_CONNECT: u64 = 4;
const K_LINK: u64 = 5;
const K_CANCEL: u64 = 6;
const K_WAKE: u64 = 7;
const K_TICK: u64 = 8;
const K_PRE: u64 = 9;
const K_WRITABLE: u64 = 10;
const K_READABLE: u64 = 11;
const K_SPLICE: u64 = 12;
const K_UNTIL: u64 = 13;
const K_SOCKET: u64 = 14;
/// A backend socket's option set on the ring: `Side::Up` is TCP_NODELAY, `Side::Down` quick ACKs
/// off.
const K_SOCKOPT: u64 = 15;

fn user_data(kind: u64, slot: u32, side: Side) -> u64 {
    kind | (u64::from(side == Side::Down) << 4) | (u64::from(slot) << 32)
}

fn accept_data(kind: u64, id: u32, k: usize) -> u64 {
    kind | ((k as u64 & 15) << 4) | (u64::from(id) << 32)
}

/// `IORING_ACCEPT_DONTWAIT` (Linux 6.10+), in an accept's `ioprio`: with no client waiting the
/// accept completes with EAGAIN instead of having the kernel poll for one.
const ACCEPT_DONTWAIT: u16 = 2;

/// The flag an accept carries for [`ACCEPT_DONTWAIT`]; on a thread that called
/// [`refuse_dontwait_here`], a bit no kernel takes, so that it is refused (EINVAL) as a kernel
/// that reports 6.10+ without the flag refuses it.
fn accept_flag() -> u16 {
    #[cfg(test)]
    if DONTWAIT_REFUSED.get() {
        return 1 << 15;
    }
    ACCEPT_DONTWAIT
}

#[cfg(test)]
thread_local! {
    static DONTWAIT_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// From now on, accepts armed on the calling thread with DONTWAIT are refused by the kernel.
#[cfg(test)]
fn refuse_dontwait_here() {
    DONTWAIT_REFUSED.set(true);
}

/// Whether this kernel (its release, as `uname -r` prints it) takes [`ACCEPT_DONTWAIT`].
fn takes_accept_dontwait(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 10),
        _ => false,
    }
}

fn side_of(ud: u64) -> Side {
    if ud & 16 == 0 {
        Side::Up
    } else {
        Side::Down
    }
}

/// Where to connect a client, and for how long to try.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) timeout: Duration,
}

/// What a host wants done with a client it admitted.
#[derive(Debug)]
pub(crate) enum Admit {
    /// Connect it to `target`; send `preface` (a PROXY header) to the backend before the client's
    /// first byte. The preface is not counted as the client's bytes. No target: every backend is
    /// full and the client waits in the service's queue (see `Host::retry`).
    Connect {
        target: Option<Target>,
        preface: Vec<u8>,
    },
    /// Read its first bytes (a PROXY header), at most `room` of them and within `limit`, and ask the
    /// host (`Host::preamble`) what they mean before connecting anywhere.
    Read { limit: Duration, room: usize },
}

/// A client's first bytes so far, as `Host::preamble` sees them.
#[derive(Debug)]
pub(crate) enum Got<'a> {
    /// Everything read so far (possibly more than the host wants: what follows is the client's).
    Bytes(&'a [u8]),
    /// The client closed after this many bytes.
    Closed(usize),
    /// `limit` passed first.
    TimedOut,
    Failed(io::Error),
}

/// The host's answer to a client's first bytes.
#[derive(Debug)]
pub(crate) enum Step {
    /// Not enough yet: read on.
    More,
    /// Connect to `target`: the first `consumed` bytes were the host's (a PROXY header), the rest
    /// are the client's and go to the backend after `preface` (as in `Admit::Connect`, where no
    /// target means waiting).
    Connect {
        target: Option<Target>,
        consumed: usize,
        preface: Vec<u8>,
    },
    /// Refused, and why (the host accounts it when the connection ends).
    Refuse(Outcome),
}

/// Why a client's first bytes stopped coming.
enum PreEnd {
    Closed,
    TimedOut,
    Failed(io::Error),
}

/// A connection's inactivity limits (`idle_timeout`, `half_close_timeout`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) idle: Duration,
    pub(crate) half_close: Duration,
    /// `stall_timeout`: how long a direction's destination may take no byte while bytes wait for
    /// it (`stalled`).
    pub(crate) stall: Duration,
    /// `first_byte_timeout`: how long after accept a relayed client may have sent nothing.
    pub(crate) first_byte: Option<Duration>,
    /// Which sides have keepalive or user_timeout set: an ETIMEDOUT there is `keepalive_timeout`.
    pub(crate) watched: Watched,
}

impl Timeouts {
    /// A service's limits, as its relay options give them.
    pub(crate) fn of(relay: &crate::relay::RelayOptions) -> Timeouts {
        Timeouts {
            idle: relay.idle_timeout,
            half_close: relay.half_close_timeout,
            stall: relay.stall_timeout,
            first_byte: relay.first_byte_timeout,
            watched: relay.watched(),
        }
    }
}

/// How a connection the host admitted ended.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Bytes sent to the backend, and to the client.
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    /// A relay's outcome, or the host's own refusal (a connect that failed on every backend).
    pub(crate) end: Outcome,
    /// What broke it, when a side failed.
    pub(crate) broken: Option<io::Error>,
    /// Whether either direction moved to splice(2) (it carried bulk data).
    pub(crate) spliced: bool,
}

/// What a worker asks of the services it serves. Called on the worker's thread, between two entries
/// into the ring: what it does delays every connection of the worker, so nothing here may block.
pub(crate) trait Host {
    /// What the host keeps of a listener (the services behind it).
    type Listen;
    /// What the host keeps of a connection (its service, its slots, its routing record).
    type Conn;
    /// Listener `id` is served by this worker from now on.
    fn listening(&mut self, id: u32, with: Self::Listen);
    /// Listener `id` is no longer served (its last accept has completed).
    fn unlistened(&mut self, id: u32);
    /// A client accepted on listener `id` that is no longer this worker's to serve (a reload moved
    /// its address to other workers, and this accept completed before the worker unlistened): the
    /// host takes it and serves it elsewhere (`None`), or gives it back to be admitted here.
    fn hand_off(&mut self, id: u32, client: OwnedFd, peer: SocketAddr) -> Option<OwnedFd> {
        let _ = (id, peer);
        Some(client)
    }
    /// This worker cannot enter its ring (`io_uring_enter` failed [`ENTER_GIVE_UP`] times in a row:
    /// a policy that refuses it, say): listener `id`'s socket (a duplicate) is the host's to serve
    /// elsewhere (on the epoll engine); the worker unlistens right after.
    fn enter_refused(&mut self, id: u32, socket: OwnedFd) {
        let _ = (id, socket);
    }
    /// A client accepted on listener `id`: its state, what comes next (a backend to connect it to,
    /// or its first bytes to read) and its limits; or `None`, refused, which the host has accounted
    /// (the worker closes the client after).
    fn accepted(
        &mut self,
        id: u32,
        peer: SocketAddr,
        client: BorrowedFd<'_>,
    ) -> Option<(Self::Conn, Admit, Timeouts)>;
    /// After `Admit::Read`: what has been read of the client's first bytes (all of them, each
    /// time), or why no more will come. `Step::More` reads on; with `room` bytes read it is taken
    /// as a refusal (`ProxyHeader`): the host must decide within the room it asked for.
    fn preamble(&mut self, conn: &mut Self::Conn, client: BorrowedFd<'_>, got: Got<'_>) -> Step;
    /// The connect to the last target failed: another to try (none: wait, as for `retry`), or how
    /// the connection ends.
    fn connect_failed(
        &mut self,
        conn: &mut Self::Conn,
        error: io::Error,
    ) -> Result<Option<Target>, Outcome>;
    /// A connection waiting for a backend with room (it was given no target): a target now, still
    /// nothing (it waits on), or how it ends (its wait is over). Asked after every
    /// `Command::Freed`, every 250 ms (the tick's slow part), and when the first of those waiting
    /// reaches its deadline.
    fn retry(&mut self, conn: &mut Self::Conn) -> Result<Option<Target>, Outcome>;
    /// How long from now the wait of a connection waiting for a backend lasts, if it has a
    /// deadline: `retry` is asked again then, so a wait ends at its deadline rather than at the
    /// next tick.
    fn wait_left(&self, conn: &Self::Conn) -> Option<Duration>;
    /// A backend socket made for `conn`, before its connect: the host sets what it wants on it
    /// (keepalive, user_timeout), best effort.
    fn backend_socket(&mut self, conn: &Self::Conn, socket: BorrowedFd<'_>) {
        let _ = (conn, socket);
    }
    /// The connect to the last target succeeded; the relay starts (after the preface, if any).
    fn connected(&mut self, conn: &mut Self::Conn);
    /// The backend took the preface (at once when there is none): the attempt counts as a success
    /// for the backend's health from here, as the epoll engine counts it once the PROXY header is
    /// out. A backend that accepts and closes before then is neither credited nor blamed.
    fn established(&mut self, conn: &mut Self::Conn);
    /// The backend took the connection but what goes before the client's bytes (a preface, the
    /// client bytes read with it) could not be sent: another target, as for `connect_failed`; a
    /// backend that accepts and closes is not dead, so it is not blamed. May follow `established`
    /// (the preface out, the client's bytes after it not), as the epoll engine's forward may.
    fn first_bytes_failed(
        &mut self,
        conn: &mut Self::Conn,
        error: io::Error,
    ) -> Result<Option<Target>, Outcome>;
    /// Everything that goes before the client's bytes is out (or there was nothing): the attempt
    /// is the connection's, and no other follows. What a connection held across its attempts (its
    /// place in the queue) goes now; until then a failed first send leaves it where it was, as
    /// the epoll engine keeps it until its forward is out.
    fn relaying(&mut self, _conn: &mut Self::Conn) {}
    /// Whether a direction that carries bulk data (a receive fills a whole pool buffer) moves to
    /// splice(2), as `relay: epoll` does.
    fn splices_bulk(&self) -> bool {
        true
    }
    /// Bytes sent to the backend (`up`) and to the client (`down`) since the last call.
    fn sent(&mut self, conn: &Self::Conn, up: u64, down: u64);
    /// Whether a connection is to be cut, why and how (a backend's cut resets both sides; an
    /// operator's kill may ask for a FIN): asked of each relayed one on `Command::BackendCut`
    /// and on every tick, and of each as it connects or is adopted.
    fn cut(&mut self, conn: &Self::Conn) -> Option<Supervised>;
    /// One side of a relayed connection has sent its end of stream, passed on to the other.
    fn half_closed(&mut self, _conn: &Self::Conn) {}
    /// The connection ended; its sockets close right after.
    fn ended(&mut self, conn: Self::Conn, finished: Finished);
    /// The way to whatever takes carried connections (an upgrade's new process).
    type Carrier;
    /// After `Command::Carry`, a connection has stopped at a quiet point: the way to what takes
    /// carried connections now, if anything does. If so, the worker hands it over with `carried`
    /// (or drops the carrier, should the connection break first); if not, the connection goes on
    /// here, and the worker stops carrying.
    fn carrier(&mut self) -> Option<Self::Carrier>;
    /// A connection stopped at a quiet point leaves the worker, with both sockets and what it held,
    /// to go on in another process; neither counted nor logged as ended here.
    fn carried(&mut self, conn: Self::Conn, to: Self::Carrier, quiet: Quiet);
}

/// A connection stopped for `Command::Carry`: both sockets (untouched: no FIN, no reset), what each
/// direction had read and not yet written, and what it had moved.
#[derive(Debug)]
pub(crate) struct Quiet {
    pub(crate) client: OwnedFd,
    pub(crate) backend: OwnedFd,
    pub(crate) held: Quiesced,
    /// Bytes sent to the backend (the client's only, not a preface), and to the client.
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
}

/// A connection carried in from an upgrade's old process (its `Quiet` there), with the host's
/// state for it, to relay on from where it stopped. Its sockets come with a zero linger (a
/// connection lost on the way is reset, never ended with a FIN that passes for the stream's end),
/// which the worker clears when it takes them.
pub(crate) struct Adopt<C> {
    pub(crate) conn: C,
    pub(crate) client: OwnedFd,
    pub(crate) backend: OwnedFd,
    pub(crate) held: Quiesced,
    /// Bytes it had moved to the backend and to the client: its `Finished` counts its whole life.
    pub(crate) so_far: (u64, u64),
    pub(crate) timeouts: Timeouts,
}

/// What the control plane tells a worker.
pub(crate) enum Command<L, C> {
    /// Serve `socket` (the worker's own descriptor of a listening socket) as listener `id`.
    Listen {
        id: u32,
        socket: std::net::TcpListener,
        with: L,
    },
    /// Stop accepting on listener `id`; its connections go on.
    Unlisten { id: u32 },
    /// Cut every connection: reset both sides, with this outcome.
    Cut(Outcome),
    /// A backend's connections were cut, or an operator killed one: every relayed connection
    /// asks `Host::cut` now, rather than on the next tick.
    BackendCut,
    /// A backend's connection slot came free: the connections waiting for one ask again.
    Freed,
    /// Stop every relayed connection at a quiet point (and each connected from now on) and hand it
    /// to the host (`Host::carrier`, `Host::carried`), until the host takes no more.
    Carry,
    /// Relay on a connection an upgrade carried in from the process this one replaced.
    Adopt(Box<Adopt<C>>),
    /// Stop listening, cut what is left, and end the thread.
    Stop,
}

/// How the control plane reaches one worker.
pub(crate) struct Handle<L, C> {
    tx: mpsc::Sender<Command<L, C>>,
    wake: Arc<OwnedFd>,
    counts: Arc<Counts>,
}

impl<L, C> Clone for Handle<L, C> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
            counts: self.counts.clone(),
        }
    }
}

impl<L, C> Handle<L, C> {
    /// What the worker has done so far.
    pub(crate) fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Queues `command` and wakes the worker; `false` once the worker has ended.
    pub(crate) fn send(&self, command: Command<L, C>) -> bool {
        if self.tx.send(command).is_err() {
            return false;
        }
        // An eventfd's counter only fails to take a write at u64::MAX - 1, which a worker that
        // reads it on every wake-up never nears.
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        true
    }
}

/// A worker just started: how to reach it, and its thread.
pub(crate) type Started<H> = (
    Handle<<H as Host>::Listen, <H as Host>::Conn>,
    std::thread::JoinHandle<()>,
);

/// Starts a worker thread named `name` serving `make()`'s host, its tick every `tick` (the
/// product's is [`TICK`]; tests stretch it, to tell what the tick does from what does not wait for
/// it); returns once its ring is set up.
pub(crate) fn start<H, F>(name: String, make: F, tick: Duration) -> io::Result<Started<H>>
where
    H: Host,
    H::Listen: Send + 'static,
    H::Conn: Send + 'static,
    F: FnOnce() -> H + Send + 'static,
{
    start_with(
        name,
        make,
        crate::relay::splice::pool(),
        tick,
        sockets_on_ring(),
    )
}

/// [`start`], with the worker's pipes from `pipes`, making its backend sockets on the ring or not
/// (`sockets`, which only [`sockets_on_ring`] may make true).
fn start_with<H, F>(
    name: String,
    make: F,
    pipes: &'static PipePool,
    tick: Duration,
    sockets: bool,
) -> io::Result<Started<H>>
where
    H: Host,
    H::Listen: Send + 'static,
    H::Conn: Send + 'static,
    F: FnOnce() -> H + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let wake = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )?;
    let wake = Arc::new(wake);
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let theirs = wake.clone();
    let counts = Arc::new(Counts::default());
    let kept = counts.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // The ring is made here: SINGLE_ISSUER binds it to the thread that makes it.
        match Worker::new(make(), rx, theirs, kept, pipes, tick, sockets) {
            Ok(w) => {
                let _ = ready_tx.send(Ok(()));
                w.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((Handle { tx, wake, counts }, thread)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other("the ring worker's thread ended at start")),
    }
}

/// A buffer a direction received into and has not yet sent whole.
#[derive(Debug)]
struct Held {
    buf: Buf,
    len: u32,
    off: u32,
}

/// Where a [`Held`]'s bytes are.
#[derive(Debug)]
enum Buf {
    /// A pool buffer, the direction's until it gives it back.
    Pool(Filled),
    /// The connection's own bytes, not a pool buffer: towards the backend `Conn::pre` (the preface
    /// and the client bytes read with it, what a carried-in connection held, or a receive into
    /// it: `Worker::arm_own`), towards the client `Conn::post`.
    Own,
}

/// One direction's state: the pure part of the relay, which the worker acts on.
#[derive(Debug, Default)]
struct Dir {
    held: VecDeque<Held>,
    /// A receive is in the kernel (until its last completion): multishot, or one-shot when a dry
    /// pool woke it (`Worker::wake_starved`).
    armed: bool,
    /// That receive is a one-shot into the connection's own buffer (`Conn::pre` or `post`): the
    /// pool had no buffer and the direction held none (`Worker::arm_own`).
    own: bool,
    /// Since when bytes it holds (buffers, or its pipe's) have waited for its destination with
    /// none taken: `stall_timeout` is measured from here (`stalled`).
    waiting_since: Option<Instant>,
    /// The bytes the destination's peer had acknowledged when a stall was last suspected
    /// (`stall_verdict`): a slow reader's peer acknowledges more, a stopped one's does not.
    acked: Option<u64>,
    /// Its cancellation is on its way (the cap was reached).
    cancelling: bool,
    /// A send is in the kernel.
    sending: bool,
    /// A receive of this batch of completions brought bytes to send: sent once the whole batch
    /// is in (`Worker::send_due`).
    send_due: bool,
    /// The source's FIN was read.
    eof: bool,
    /// The FIN was passed on: the destination's write side is shut down.
    shut: bool,
    /// The pool had no buffer for it: armed again once one comes back. Its place in the worker's
    /// `Starved`, by the ticket the queue gave it.
    starved: Option<u32>,
    /// Bytes sent in all, and since the host last heard.
    sent: u64,
    unflushed: u64,
    /// It carries bulk data: its receive is ended, and once what it holds is sent it moves to
    /// splice(2) (`pipe`) for good.
    bulk: bool,
    /// No pipe was to be had when it wanted one: it stays on the pool's buffers.
    no_pipe: bool,
    /// On splice: the pipe it moves bytes through, with what is in it.
    pipe: Option<PipeLease>,
}

impl Dir {
    /// Whether to arm a receive now: none armed, the source still open, room below half the cap
    /// (`cap`, from `cap_for`; an empty direction always has room), not (moving to) splice.
    fn should_arm(&self, ending: bool, cap: usize) -> bool {
        !self.armed
            && !self.eof
            && self.starved.is_none()
            && !self.bulk
            && !ending
            && self.held.len() < (cap / 2).max(1)
    }

    /// Bytes came for its destination: they wait from now, unless older ones already did.
    fn bytes_wait(&mut self, now: Instant) {
        self.waiting_since.get_or_insert(now);
    }

    /// Its destination took bytes: what is left (if anything) waits from now.
    fn bytes_taken(&mut self, now: Instant, left: bool) {
        self.waiting_since = left.then_some(now);
    }

    /// Whether the entry `ticket`, taken out of `Starved`, is the direction's place there; if so it
    /// leaves the queue. An entry left behind is not: one whose direction moved to splice, or whose
    /// slot was reused, and ran dry again since, has a newer place, which stands.
    fn leaves_starved(&mut self, ticket: u32) -> bool {
        if self.starved != Some(ticket) {
            return false;
        }
        self.starved = None;
        true
    }

    /// Whether a full pool buffer just received makes it a bulk direction.
    fn turns_bulk(&self, received: u32) -> bool {
        received >= POOL_BUF && !self.bulk && !self.no_pipe && !self.eof
    }

    /// Whether it can move to splice now: bulk, and nothing of it in the kernel or held (the
    /// pipe's bytes must follow every byte received before them).
    fn may_splice(&self) -> bool {
        self.bulk
            && self.pipe.is_none()
            && !self.armed
            && !self.sending
            && self.held.is_empty()
            && !self.eof
    }

    /// It stays on the pool's buffers for good (no pipe to be had, or splice stuck at urgent
    /// data): its pipe, if any, goes back, and it is armed again when `should_arm` says so.
    fn back_to_receiving(&mut self) {
        self.pipe = None;
        self.bulk = false;
        self.no_pipe = true;
    }

    /// Whether to cancel the armed receive: the destination has not taken `cap` messages
    /// (`cap_for`).
    fn should_cancel(&self, cap: usize) -> bool {
        self.armed && !self.cancelling && self.held.len() >= cap
    }

    /// Whether to pass the FIN on now: read, and everything before it sent.
    fn should_shut(&self) -> bool {
        self.eof
            && !self.shut
            && !self.sending
            && self.held.is_empty()
            && self.pipe.as_ref().is_none_or(|p| p.pending == 0)
    }
}

/// Which limit a connection's silence is measured against, and whether it has run out.
fn expired(t: &Timeouts, half_closed: bool, quiet: Duration) -> Option<Outcome> {
    let (limit, end) = if half_closed {
        (t.half_close, Outcome::HalfCloseTimeout)
    } else {
        (t.idle, Outcome::IdleTimeout)
    };
    (quiet >= limit).then_some(end)
}

/// Whether `first_byte_timeout` has passed for a connection accepted `age` ago (the caller asks
/// whether its client has spoken).
fn first_byte_due(t: &Timeouts, age: Duration) -> bool {
    t.first_byte.is_some_and(|limit| age >= limit)
}

/// Whether a direction's destination has taken no byte for `limit` while bytes waited for it
/// (`stall_timeout`): a stall suspected, to be confirmed by `stall_verdict`.
fn stalled(d: &Dir, limit: Duration, now: Instant) -> bool {
    d.waiting_since
        .is_some_and(|t| now.saturating_duration_since(t) >= limit)
}

/// For a direction `stalled` suspects, with the bytes its destination's peer has acknowledged
/// (`acked`, `None` where the kernel does not say): cut (`true`, both sides reset,
/// `Outcome::StallTimeout`) when the peer acknowledged nothing since the last suspicion, a
/// `stall_timeout` ago. Else the count is kept and the wait measured again from `now`: a send
/// completes only when the socket's buffer has room, and a buffer of megabytes drained by a slow
/// reader can take longer than the timeout to make room, all the while its peer takes bytes.
fn stall_verdict(d: &mut Dir, acked: Option<u64>, now: Instant) -> bool {
    let Some(acked) = acked else {
        return true;
    };
    if d.acked == Some(acked) {
        return true;
    }
    d.acked = Some(acked);
    d.waiting_since = Some(now);
    false
}

/// Whether a cancellation that completed with `res` is asked again (`Worker::on_cancel`), and if so
/// the retries counted after it: only a cancellation of an ending connection's backend that found
/// nothing while its connect is out (`connect_out`, the retries counted so far) and fewer than
/// `RECANCELS` are counted. A retry counts only after a turn that `waited`, since no other turn
/// runs the work that issues the connect.
fn recancel(
    res: i32,
    side: Side,
    ending: bool,
    connect_out: Option<u8>,
    waited: bool,
) -> Option<u8> {
    let counted = connect_out.filter(|&n| n < RECANCELS)?;
    (res == 0 && side == Side::Down && ending).then(|| counted + u8::from(waited))
}

/// One connection. Boxed: the kernel reads `to` and `link` while its connect is in flight.
struct Conn<C> {
    host: Option<C>,
    client: Option<OwnedFd>,
    backend: Option<OwnedFd>,
    to: SockAddr,
    link: types::Timespec,
    timeouts: Timeouts,
    connected: bool,
    /// It relays: its receives are armed (or wait only for back-pressure or a FIN). A new
    /// connection starts once what goes first (`pre`) is out; until then nothing of the backend's
    /// has been read and nothing new of the client's, so a send of `pre` that fails tries another
    /// backend (`first_bytes_failed`), as `session::connect` does when its PROXY header cannot go.
    /// A carried-in one relays from the start.
    relaying: bool,
    /// Bytes the connection owns: while `reading`, the client's first bytes as they arrive; then
    /// what goes to the backend before anything received later (a preface and the client bytes
    /// read with the header). Freed once sent.
    pre: Own,
    /// How many bytes at the front of `pre` are the preface (sent, but not the client's bytes).
    preface: u32,
    /// `pre`'s counterpart towards the client: what a carried-in connection had read from the
    /// backend and not sent. Freed once sent.
    post: Own,
    /// Reading the client's first bytes (`Admit::Read`), until this deadline.
    reading: Option<Instant>,
    /// The loop turn (`Worker::turn`) it connected in, while the handshake's last ACK is held back
    /// for the first bytes it sends (`backend_socket`, `Worker::release_acks`).
    ack_held: Option<u64>,
    /// Waiting for a backend (in the worker's `waiting`).
    waiting: bool,
    /// While its connect is in the kernel (`connect_with` to `on_connect`): how many times a
    /// cancellation of the backend's has since found nothing (`on_cancel`).
    connect_out: Option<u8>,
    dirs: [Dir; 2],
    /// Operations of this connection in the kernel, but for a backend socket's options
    /// (`Worker::connect_with`): they complete before the connect chained after them is issued.
    /// Counted up only where they are pushed (`Sq`).
    refs: Refs,
    first_fin: Option<Outcome>,
    /// How it ends, once decided; it is freed when nothing of it is left in the kernel.
    end: Option<Supervised>,
    last: Instant,
    /// When it was accepted (`first_byte_timeout` counts from here).
    accepted: Instant,
    /// A direction moved to splice.
    spliced: bool,
    /// Stopping at a quiet point to be carried away (`Command::Carry`): nothing new goes into the
    /// kernel, what is there is cancelled, and what completes is kept.
    carry: bool,
}

impl<C> Conn<C> {
    fn dir(&mut self, side: Side) -> &mut Dir {
        &mut self.dirs[side as usize]
    }

    /// Whether a direction's destination has stopped taking bytes (`stalled`, then
    /// `stall_verdict` with what its peer acknowledged): the connection is to be cut.
    fn stall_confirmed(&mut self, now: Instant) -> bool {
        let limit = self.timeouts.stall;
        let mut cut = false;
        for (i, d) in self.dirs.iter_mut().enumerate() {
            if !stalled(d, limit, now) {
                continue;
            }
            // Up (0) writes to the backend, down (1) to the client.
            let dst = if i == 0 { &self.backend } else { &self.client };
            let acked = dst
                .as_ref()
                .and_then(|fd| crate::relay::tcp_info::bytes_acked(fd.as_raw_fd()));
            cut |= stall_verdict(d, acked, now);
        }
        cut
    }

    /// The relay proper starts (`relaying`), and the host is told (`Host::relaying`), whichever
    /// way the connection got there.
    fn starts_relaying<H: Host<Conn = C>>(&mut self, host: &mut H) {
        self.relaying = true;
        if let Some(h) = self.host.as_mut() {
            host.relaying(h);
        }
    }

    /// The bytes a direction's `Buf::Own` stands for.
    fn owned(&self, side: Side) -> &[u8] {
        match side {
            Side::Up => &self.pre,
            Side::Down => &self.post,
        }
    }

    /// The socket a direction writes to, while the connection has it.
    fn dest(&self, side: Side) -> Option<BorrowedFd<'_>> {
        let to = match side {
            Side::Up => &self.backend,
            Side::Down => &self.client,
        };
        to.as_ref().map(AsFd::as_fd)
    }

    /// The socket a direction reads from, and the one it writes to.
    fn ends(&self, side: Side) -> (RawFd, RawFd) {
        let fd = |s: &Option<OwnedFd>| s.as_ref().map_or(-1, |f| f.as_raw_fd());
        match side {
            Side::Up => (fd(&self.client), fd(&self.backend)),
            Side::Down => (fd(&self.backend), fd(&self.client)),
        }
    }

    /// Whether the client has sent anything: a byte relayed or held (past a preface that is not
    /// its own), or its FIN. What `first_byte_timeout` asks.
    fn client_spoke(&self) -> bool {
        let up = &self.dirs[Side::Up as usize];
        up.sent > 0
            || up.eof
            || up.pipe.is_some()
            || up.held.iter().any(|h| !matches!(h.buf, Buf::Own))
            || self.pre.len() > self.preface as usize
            // Bytes waiting for a receive that has not completed yet.
            || self.client.as_ref().is_some_and(|fd| {
                crate::relay::tcp_info::unread(fd.as_raw_fd()).is_some_and(|n| n > 0)
            })
    }

    fn both_shut(&self) -> bool {
        self.dirs[0].shut && self.dirs[1].shut
    }

    /// Ending, or stopping to be carried: either way nothing new is started.
    fn stopping(&self) -> bool {
        self.end.is_some() || self.carry
    }
}

struct Listening {
    fd: OwnedFd,
    /// Where each accept in flight has the kernel write its client's address (boxed: the kernel
    /// writes there until the accept completes, whatever happens to the map).
    accepts: Places,
    /// Stopping: its accepts are being cancelled.
    closing: bool,
    /// An accept failed for want of descriptors or memory: armed again by the tick's slow part.
    backoff: bool,
}

impl Listening {
    fn armed(&self) -> bool {
        self.accepts.armed()
    }
}

/// What a worker has done, for its tests and a look from outside (`Handle::counts`).
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Clients accepted.
    pub(crate) accepted: AtomicU64,
    /// Receives armed (two per connection when nothing pushes back): multishot, and one-shot for
    /// a direction a dry pool had stopped.
    pub(crate) receives_armed: AtomicU64,
    /// Receives cancelled because their direction held `CAP` buffers.
    pub(crate) cancels_at_cap: AtomicU64,
    /// Receives the pool had no buffer for (ENOBUFS): while it grows, and once it has given all.
    pub(crate) starved: AtomicU64,
    /// Buffers the pool has given the kernel so far (`POOL_FIRST`, growing to `POOL_BUFS`).
    pub(crate) pool_given: AtomicU64,
    /// Buffers of the pool directions hold (read from the kernel, not yet sent), as of the last
    /// tick or connection's end.
    pub(crate) pool_held: AtomicU64,
    /// Receives into a connection's own buffer: the pool had none and the direction held none.
    pub(crate) own_receives: AtomicU64,
    /// Spliced directions that went back to receiving because of TCP urgent data: splice found
    /// nothing to read on a source that polled readable, or an end of stream with bytes still
    /// queued past the mark.
    pub(crate) splices_stuck: AtomicU64,
    /// Connections handed to the host to go on in another process (an upgrade).
    pub(crate) carried: AtomicU64,
    /// Connections carried in from another process (an upgrade) that the worker relays on.
    pub(crate) adopted: AtomicU64,
    /// Connections open on the worker now.
    pub(crate) open: AtomicU64,
    /// Backend sockets the ring made (`Worker::sockets`).
    pub(crate) sockets_made: AtomicU64,
    /// Cancellations of an ending connection's backend asked again: the first came before its
    /// connect was issued (`Worker::on_cancel`).
    pub(crate) recancels: AtomicU64,
}

/// The worker's pool of provided buffers, and how many of them directions hold (a completion
/// named them and they have not been given back): what the fair cap is taken from (`cap_for`).
/// Every buffer a direction takes and gives back goes through here, so the count stays true.
struct Pool {
    bufs: BufPool,
    held: std::cell::Cell<u16>,
}

impl Pool {
    fn new(bufs: BufPool) -> Pool {
        Pool {
            bufs,
            held: std::cell::Cell::new(0),
        }
    }

    /// A completion named a buffer, which a direction now holds.
    fn took(&self) {
        self.held.set(self.held.get().saturating_add(1));
    }

    /// A buffer a direction held goes back to the kernel.
    fn give_back(&self, buf: Filled) {
        self.bufs.give_back(buf);
        self.held.set(self.held.get().saturating_sub(1));
    }

    /// Buffers directions hold now.
    fn held(&self) -> u16 {
        self.held.get()
    }

    /// The most buffers a direction may hold now (`cap_for`).
    fn cap(&self) -> usize {
        let held = usize::from(self.held.get());
        let total = usize::from(POOL_BUFS);
        cap_for(total.saturating_sub(held), total)
    }

    /// Every buffer has been given to the kernel: a receive that finds none will not be helped by
    /// growing.
    fn spent(&self) -> bool {
        self.bufs.given() >= POOL_BUFS
    }
}

/// The worker's cap now, or [`CAP`] once its pool is gone (it is stopping).
fn cap_of(pool: Option<&Pool>) -> usize {
    pool.map_or(CAP, Pool::cap)
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

struct Worker<H: Host> {
    /// Every submission, and the completions' way out (first, so that the ring closes before
    /// anything it points to goes).
    sq: Sq,
    pool: Option<Pool>,
    host: H,
    conns: Vec<Option<Box<Conn<H::Conn>>>>,
    free: Vec<u32>,
    live: usize,
    listeners: HashMap<u32, Listening>,
    commands: mpsc::Receiver<Command<H::Listen, H::Conn>>,
    wake: Arc<OwnedFd>,
    /// Whether the tick is armed; the period the next one is armed with (the fastest `tick_for` of
    /// the connections, `base_tick` at most), and when the armed one fires.
    tick_armed: bool,
    tick_period: Duration,
    base_tick: Duration,
    tick_fires: Option<Instant>,
    /// When a tick last retried what failed (accepts backing off, directions the pool starved):
    /// that goes at the pace of `base_tick`, however often the tick comes.
    slow_at: Instant,
    /// Timeouts armed besides the tick (`arm_at`), by the place in their `user_data`: when each
    /// fires and what for, kept until it completes (its timespec is `Sq`'s until then).
    untils: Vec<Option<(Instant, Until)>>,
    starved: Starved,
    /// Directions with a send due at the end of this batch of completions (`Dir::send_due`).
    due: Vec<(u32, Side)>,
    /// Connections waiting for a backend with room, oldest first.
    waiting: Vec<u32>,
    /// Loop turns taken: which turn a connection connected in (`Conn::ack_held`).
    turn: u64,
    /// `run`'s last entry into the kernel, whose completions are being handled, asked to wait
    /// (GETEVENTS): only such an entry runs the work the kernel defers to this thread.
    waited: bool,
    /// Connections whose handshake's last ACK is held back, with the turn each connected in.
    acks: Vec<(u32, u64)>,
    cqes: Vec<Done>,
    now: Instant,
    stopping: Option<Instant>,
    /// `Command::Carry` came and the host still takes carried connections.
    carrying: bool,
    errors: RateLimited,
    /// `io_uring_enter` failures in a row (EINTR and EBUSY aside).
    enter_failures: u32,
    counts: Arc<Counts>,
    /// Accepts complete with EAGAIN when no client waits, and the worker polls the listener
    /// itself (`on_accept`); else (before Linux 6.10) the kernel polls.
    dontwait: bool,
    /// Bulk directions move to splice (`Host::splices_bulk`), with pipes from here.
    splice: bool,
    /// Backend sockets are made and their options set on the ring ([`sockets_on_ring`]), with no
    /// system call of their own.
    sockets: bool,
    pipes: &'static PipePool,
}

impl<H: Host> Worker<H> {
    fn new(
        host: H,
        commands: mpsc::Receiver<Command<H::Listen, H::Conn>>,
        wake: Arc<OwnedFd>,
        counts: Arc<Counts>,
        pipes: &'static PipePool,
        tick: Duration,
        sockets: bool,
    ) -> io::Result<Worker<H>> {
        let (ring, pool) = crate::relay::uring::after_closed_rings(|| {
            let ring = crate::relay::uring::build(SQ_ENTRIES, CQ_ENTRIES)?;
            let pool = BufPool::register(&ring, POOL_BUFS, POOL_BUF, POOL_FIRST)?;
            Ok((ring, pool))
        })?;
        counts.pool_given.store(u64::from(pool.given()), Relaxed);
        let splice = host.splices_bulk();
        let mut w = Worker {
            sq: Sq::new(ring),
            pool: Some(Pool::new(pool)),
            host,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            listeners: HashMap::new(),
            commands,
            wake,
            tick_armed: false,
            tick_period: tick,
            base_tick: tick,
            tick_fires: None,
            slow_at: Instant::now(),
            untils: Vec::new(),
            starved: Starved::default(),
            due: Vec::new(),
            waiting: Vec::new(),
            turn: 0,
            waited: false,
            acks: Vec::new(),
            cqes: Vec::with_capacity(1024),
            now: Instant::now(),
            stopping: None,
            carrying: false,
            errors: RateLimited::default(),
            enter_failures: 0,
            counts,
            dontwait: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .is_ok_and(|r| takes_accept_dontwait(r.trim())),
            splice,
            sockets,
            pipes,
        };
        w.arm_wake();
        Ok(w)
    }

    fn run(mut self) {
        loop {
            self.sq.flush_backlog();
            // With entries still waiting for room, submit and reap without sleeping: the wait
            // could otherwise outlast what is not yet in the kernel (the tick among them).
            // Nor with ACKs held back for a turn (`release_acks`): this entry submits the client
            // receives armed at those connects, which complete at once with any bytes already
            // there (without GETEVENTS, nothing the kernel deferred to this thread is run).
            let want = usize::from(!self.sq.backlogged() && self.acks.is_empty());
            self.waited = want > 0;
            let entered = self.sq.enter(want);
            if entered.is_ok() {
                self.enter_failures = 0;
            }
            if let Err(e) = entered {
                match e.raw_os_error() {
                    // A signal, or completions to reap before more can be submitted.
                    Some(libc::EINTR | libc::EBUSY) => {}
                    _ => {
                        if let Some(suppressed) = self.errors.allow() {
                            tracing::error!(error = %e, suppressed, "ring worker: io_uring_enter failed; backing off");
                        }
                        // Commands come through the ring (a poll of the wake-up eventfd): taken
                        // here too, or a worker that cannot enter would never hear of a listener,
                        // nor of its stop.
                        self.take_commands();
                        self.enter_failures = self.enter_failures.saturating_add(1);
                        if self.enter_failures >= ENTER_GIVE_UP {
                            self.give_up_listeners();
                        }
                        // Our own thread: the back-off delays only what it serves.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            self.now = Instant::now();
            let mut cqes = std::mem::take(&mut self.cqes);
            self.sq.reap(&mut cqes);
            for done in cqes.drain(..) {
                self.complete(done);
            }
            self.send_due();
            self.release_acks();
            self.cqes = cqes;
            if let Some(since) = self.stopping {
                let done = self.live == 0 && self.listeners.is_empty();
                if done || self.now.duration_since(since) >= stop_wait() {
                    break;
                }
            }
        }
        // The last turn's closes (of the connections it freed, with their resets) are still in
        // the submission queue: they must reach the kernel before the ring goes.
        self.sq.submit_what_is_left();
        let c = &self.counts;
        tracing::debug!(
            accepted = c.accepted.load(Relaxed),
            receives_armed = c.receives_armed.load(Relaxed),
            cancels_at_cap = c.cancels_at_cap.load(Relaxed),
            starved = c.starved.load(Relaxed),
            recancels = c.recancels.load(Relaxed),
            left_open = self.live,
            "ring worker stopped"
        );
        if self.live == 0 && self.listeners.is_empty() {
            return;
        }
        // The kernel did not answer every cancellation within STOP_WAIT. What is left is accounted
        // as it had ended (or, with no end decided, as cut), and everything the kernel may still
        // write into (the pool, the connections' and the listeners' boxes) is leaked: the kernel
        // cancels those operations only after the ring closes, on its own time.
        let mut conns = std::mem::take(&mut self.conns);
        for c in conns.iter_mut().flatten() {
            let end = c
                .end
                .take()
                .unwrap_or_else(|| Supervised::cut(Outcome::DrainDeadline));
            self.account_end(c, end);
        }
        if let Some(pool) = self.pool.take() {
            pool.bufs.leak();
        }
        // The pipes go back (the kernel holds nothing of them: splice is called, not submitted).
        for c in conns.iter_mut().flatten() {
            for d in &mut c.dirs {
                d.pipe = None;
            }
        }
        std::mem::forget(conns);
        std::mem::forget(std::mem::take(&mut self.listeners));
    }

    fn complete(&mut self, done: Done) {
        let (ud, res, flags) = (done.user_data(), done.result(), done.flags());
        let slot = (ud >> 32) as u32;
        match ud & 15 {
            K_ACCEPT => self.on_accept(slot, ((ud >> 4) & 15) as usize, done),
            K_READABLE => self.on_readable(slot, ((ud >> 4) & 15) as usize, &done),
            K_RECV => self.on_recv(slot, side_of(ud), done),
            K_SEND => self.on_send(slot, side_of(ud), &done),
            K_SOCKET => self.on_socket(slot, done),
            // A backend socket's option that failed (only failures complete): the options are
            // best effort (`Worker::connect_with`), and the connect after it goes on.
            K_SOCKOPT => {
                let error = io::Error::from_raw_os_error(-res);
                let option = match side_of(ud) {
                    Side::Up => "TCP_NODELAY",
                    Side::Down => "TCP_QUICKACK",
                };
                connect::option_failed(option, true, &error);
            }
            K_CONNECT => self.on_connect(slot, res),
            K_PRE => self.on_pre(slot, &done),
            K_WRITABLE => self.on_writable(slot, side_of(ud)),
            K_SPLICE => self.on_splice_ready(slot, side_of(ud), res),
            K_LINK => self.release(slot),
            K_CANCEL => self.on_cancel(slot, side_of(ud), res),
            K_WAKE => {
                if !cqueue::more(flags) {
                    self.arm_wake();
                }
                self.take_commands();
            }
            K_TICK => {
                self.tick_armed = false;
                self.tick_fires = None;
                self.on_tick();
            }
            K_UNTIL => match self.untils.get_mut(slot as usize).and_then(Option::take) {
                Some((_, Until::Tick)) => self.on_tick(),
                _ => self.retry_waiting(),
            },
            _ => {} // K_CLOSE
        }
    }

    fn arm_wake(&mut self) {
        self.sq.poll_wake(&self.wake);
    }

    /// Arms a timeout for the earliest deadline among the waiting connections (`Host::wait_left`),
    /// unless one armed for the waits fires by then: when it fires they are asked again
    /// (`retry_waiting`), which arms one for the next. (A timeout that fires before any wait is over costs one
    /// more look; one armed for a wait a freed slot ended fires for nothing.)
    fn arm_until(&mut self) {
        let host = &self.host;
        let first = self
            .waiting
            .iter()
            .filter_map(|&slot| self.conns.get(slot as usize)?.as_deref()?.host.as_ref())
            .filter_map(|h| host.wait_left(h))
            .min();
        if let Some(left) = first {
            self.arm_at(left, Until::Waits);
        }
    }

    /// A connection came, or half-closed, whose timeout needs looking at every `want`
    /// (`tick_for`): the tick runs at least that often from the next one on, and, when the one
    /// armed fires later than that, a tick comes early (unless one armed already fires by then).
    fn note_tick(&mut self, want: Duration) {
        if want >= self.base_tick {
            return;
        }
        self.tick_period = self.tick_period.min(want);
        if self.tick_armed {
            self.arm_at(want, Until::Tick);
        }
    }

    /// Arms a timeout `left` from now for `what`, unless one armed for the same fires by then (for
    /// a tick, the tick itself too). A tick does not stand in for a waits' timeout: a tick that
    /// comes early retries no waits (`on_tick`'s slow part).
    fn arm_at(&mut self, left: Duration, what: Until) {
        let at = Instant::now() + left;
        let covered = (what == Until::Tick && self.tick_fires.is_some_and(|t| t <= at))
            || self
                .untils
                .iter()
                .flatten()
                .any(|&(fires, w)| fires <= at && w == what);
        if covered {
            return;
        }
        let place = match self.untils.iter().position(Option::is_none) {
            Some(p) => p,
            None => {
                self.untils.push(None);
                self.untils.len() - 1
            }
        };
        self.untils[place] = Some((at, what));
        self.sq.until(place, left);
    }

    fn arm_tick(&mut self) {
        if self.tick_armed {
            return;
        }
        self.tick_armed = true;
        self.tick_fires = Some(Instant::now() + self.tick_period);
        self.sq.tick(self.tick_period);
    }

    fn take_commands(&mut self) {
        let mut count = [0u8; 8];
        // Resets the eventfd's counter; commands sent after this wake the poll again.
        let _ = rustix::io::read(&*self.wake, &mut count);
        // However many backends were cut in a row (a reload removing several), one look; taken
        // before any other command, so each still comes in the order it was sent (a cut before a
        // stop or a carry ends its connections as cut).
        let mut cut = false;
        loop {
            let next = self.commands.try_recv();
            if std::mem::take(&mut cut) && !matches!(next, Ok(Command::BackendCut)) {
                self.cut_those_cut();
            }
            match next {
                Ok(Command::BackendCut) => cut = true,
                Ok(c) => self.command(c),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => return self.command(Command::Stop),
            }
        }
    }

    fn command(&mut self, c: Command<H::Listen, H::Conn>) {
        match c {
            // A stopping worker takes no listener: it would never be unlistened, so the worker
            // would not end until something else woke it (a client, the tick). The socket closes
            // here.
            Command::Listen { .. } if self.stopping.is_some() => {}
            Command::Listen { id, socket, with } => {
                self.host.listening(id, with);
                let fd = OwnedFd::from(socket);
                self.listeners.insert(
                    id,
                    Listening {
                        fd,
                        accepts: Places::new(),
                        closing: false,
                        backoff: false,
                    },
                );
                for k in 0..ACCEPTS {
                    self.arm_accept(id, k);
                }
            }
            Command::Unlisten { id } => self.unlisten(id),
            Command::Cut(end) => self.cut_all(end),
            Command::BackendCut => self.cut_those_cut(),
            Command::Freed => self.retry_waiting(),
            Command::Carry => self.carry_all(),
            Command::Adopt(a) => self.adopt(*a),
            Command::Stop => {
                if self.stopping.is_none() {
                    self.stopping = Some(self.now);
                    let ids: Vec<u32> = self.listeners.keys().copied().collect();
                    for id in ids {
                        self.unlisten(id);
                    }
                    self.cut_all(Outcome::DrainDeadline);
                    self.arm_tick();
                }
            }
        }
    }

    fn conn(&mut self, slot: u32) -> Option<&mut Conn<H::Conn>> {
        at(&mut self.conns, slot)
    }

    fn on_tick(&mut self) {
        let now = self.now;
        let mut ending = Vec::new();
        let base = self.base_tick;
        let mut period = base;
        for (slot, c) in self.conns.iter_mut().enumerate() {
            let Some(c) = c.as_deref_mut() else { continue };
            let Some(h) = c.host.as_ref() else { continue };
            let half_closed = c.dirs.iter().any(|d| d.shut);
            period = period.min(tick_for(&c.timeouts, half_closed, base));
            if c.end.is_some() || !c.connected {
                continue;
            }
            let (up, down) = (c.dirs[0].unflushed, c.dirs[1].unflushed);
            if up + down > 0 {
                self.host.sent(h, up, down);
                c.dirs[0].unflushed = 0;
                c.dirs[1].unflushed = 0;
            }
            if let Some(end) = self.host.cut(h) {
                ending.push((slot as u32, end));
            } else if first_byte_due(&c.timeouts, now.saturating_duration_since(c.accepted))
                && !c.client_spoke()
            {
                // Closed both ways: the backend's connection goes with the client's.
                ending.push((slot as u32, Supervised::ended(Outcome::FirstByteTimeout)));
            } else if c.stall_confirmed(now) {
                // Its destination takes nothing while bytes wait: whatever it holds (pool
                // buffers among them) goes, and both sides see a reset, not an end of stream.
                ending.push((slot as u32, Supervised::cut(Outcome::StallTimeout)));
            } else if let Some(o) = expired(
                &c.timeouts,
                half_closed,
                now.saturating_duration_since(c.last),
            ) {
                ending.push((slot as u32, Supervised::ended(o)));
            }
        }
        // From the next tick on, as often as the connections still open need.
        self.tick_period = period;
        self.note_pool_held();
        for (slot, end) in ending {
            self.finish(slot, end);
        }
        // What only stands in for an event that did not come goes on at the pace of the worker's
        // tick, however short a connection's timeouts make it: a listener out of descriptors is
        // not tried every 5 ms.
        // (Due half a tick early: ticks do not land on its pace, and one that came a little early
        // must not put it off by a whole period; nor may one that came late run it twice.)
        if now.saturating_duration_since(self.slow_at) < base.saturating_sub(self.tick_period / 2) {
            return self.keep_ticking();
        }
        self.slow_at = now;
        // A dry pool's directions try again even when no buffer came back meanwhile.
        self.wake_starved(usize::MAX);
        // Waiting connections look again even when no slot came free (their deadlines have
        // timeouts of their own: `arm_until`).
        self.retry_waiting();
        let waiting: Vec<u32> = self
            .listeners
            .iter_mut()
            .filter(|(_, l)| l.backoff && !l.closing)
            .map(|(id, l)| {
                l.backoff = false;
                *id
            })
            .collect();
        for id in waiting {
            for k in 0..ACCEPTS {
                self.arm_accept(id, k);
            }
        }
        self.keep_ticking();
    }

    /// Publishes how many pool buffers directions hold (`Counts::pool_held`): on the tick and
    /// as connections end, not on every receive.
    pub(super) fn note_pool_held(&self) {
        if let Some(p) = &self.pool {
            self.counts.pool_held.store(u64::from(p.held()), Relaxed);
        }
    }

    /// Arms the next tick while there is anything to look at: connections, a stop under way, or a
    /// listener whose accepts back off until a tick.
    fn keep_ticking(&mut self) {
        let backing_off = || self.listeners.values().any(|l| l.backoff && !l.closing);
        if self.live > 0 || self.stopping.is_some() || backing_off() {
            // Armed with a longer period (this tick came early, `note_tick`): another comes
            // early, unless that one fires soon enough.
            if self.tick_armed {
                self.arm_at(self.tick_period, Until::Tick);
            }
            self.arm_tick();
        }
    }
}

/// What a timeout armed besides the tick is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The earliest deadline of the waiting connections (`arm_until`).
    Waits,
    /// A tick sooner than the one armed (`note_tick`).
    Tick,
}

/// The connection in `slot`, borrowing only the table (the host stays free to call).
fn at<C>(conns: &mut [Option<Box<Conn<C>>>], slot: u32) -> Option<&mut Conn<C>> {
    conns.get_mut(slot as usize)?.as_deref_mut()
}

#[cfg(test)]
pub(super) mod tests;
