//! The ring worker on its own: its pure decisions, and a worker on loopback with a host that
//! connects every client to a list of targets in turn and reports each end. The relay contract
//! through the whole server (half-close, resets, timeouts, drain, failover) is in `tests/it`, run
//! for `relay: ring` with every other engine.
//!
//! Allowed `unsafe` for what a test does to the kernel directly: an entry pushed on a ring of its
//! own, the descriptor limit raised, a descriptor duplicated, urgent data sent.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::PoisonError;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::relay::{tcp_info_fd, AckTimerRuns};

const WAIT: Duration = Duration::from_secs(10);
/// A tick (or a timeout) that never comes within a test.
const HOUR: Duration = Duration::from_secs(3600);

struct TestHost {
    targets: Vec<SocketAddr>,
    timeout: Duration,
    mode: Mode,
    seen: Arc<Seen>,
    ended: Sender<(Finished, Vec<io::ErrorKind>)>,
    carried: Sender<Quiet>,
}

/// What the test host asks of its clients beyond connecting them to its first target.
#[derive(Default, Clone, Copy)]
struct Mode {
    /// When set, every client must open with these bytes (read within `GREETING_LIMIT`), which are
    /// replaced by `PREFACE` towards the backend: a stand-in for a PROXY header in and out.
    greeting: Option<&'static [u8]>,
    /// The host never decides on a greeting: `Step::More`, whatever it is told.
    undecided: bool,
    /// Every client first waits for a target, until `retry` has been asked this many times.
    wait_for_retries: Option<u64>,
    /// Bulk directions stay on the pool's buffers (`Host::splices_bulk`).
    copy_only: bool,
    /// The worker gets no pipe when it asks for one.
    no_pipes: bool,
    /// Every connection's idle timeout (60 s when not set): the n-th client's the n-th of these
    /// (the last for those after).
    idle: Option<&'static [Duration]>,
    /// The host takes carried connections (`Host::carrier`).
    carries: bool,
    /// A waiting client's wait ends this long after its accept (`Host::wait_left`), when its
    /// `retry` ends it (`BackendsFull`) however many retries `wait_for_retries` asks: the n-th
    /// client's the n-th of these (the last for those after).
    wait_until: Option<&'static [Duration]>,
    /// The worker's tick, when not the product's 250 ms.
    tick: Option<Duration>,
    /// Reading a pipe's bytes back fails on the worker's thread (`splice::break_reads_here`).
    broken_pipe_reads: bool,
    /// The worker's socket to each client sends through a buffer of a few KiB (SO_SNDBUF 4096): a
    /// client that does not read stops the worker's sends after a few KiB.
    tight_client: bool,
    /// The worker makes its backend sockets by system calls, as on a kernel without socket
    /// options on the ring (`sockets_on_ring`).
    socket_calls: bool,
    /// TCP_NODELAY set on a backend socket fails on the worker's thread, on the ring and by a system
    /// call (`fail_nodelay_here`).
    failing_nodelay: bool,
    /// A stop does not wait for the kernel's answers (`hurry_stops_here`).
    hurried_stop: bool,
    /// The kernel refuses the accepts' DONTWAIT flag (`refuse_dontwait_here`).
    refused_dontwait: bool,
    /// Every connection's stall timeout (an hour when not set).
    stall: Option<Duration>,
    /// Every connection's `first_byte_timeout` (none when not set).
    first_byte: Option<Duration>,
}

/// What the host was asked, counted.
#[derive(Default)]
struct Seen {
    /// Clients the host admitted (`Host::accepted`).
    accepted: AtomicU64,
    preambles: AtomicU64,
    retries: AtomicU64,
    /// `Host::carrier` asked: a connection stopped for `Command::Carry` is quiet.
    carriers: AtomicU64,
    /// Listeners served (`Host::listening`): a command sent after another has been taken when
    /// this moves.
    listened: AtomicU64,
    /// When set, `Host::connected` of a connection's first target waits (up to `WAIT`) for a word
    /// on it: the worker sends nothing to that backend until then.
    hold_first: std::sync::Mutex<Option<Receiver<()>>>,
    /// When set, `Host::accepted` waits (up to `WAIT`) for a word on it, and `accepts_held`
    /// counts it as it starts waiting: the worker takes nothing from the kernel meanwhile.
    hold_accept: std::sync::Mutex<Option<Receiver<()>>>,
    accepts_held: AtomicU64,
    /// Connections `hold_first` has held, counted as each starts waiting: the worker is inside
    /// the host from then until the word comes.
    held: AtomicU64,
    /// The targets (their places in `targets`) whose attempts `Host::established` credited.
    established: std::sync::Mutex<Vec<usize>>,
    /// The targets whose attempts reached `Host::relaying`: the one each connection kept.
    relaying: std::sync::Mutex<Vec<usize>>,
    /// Every relayed connection's backend is cut (`Host::cut`).
    cut: std::sync::atomic::AtomicBool,
    /// When set, the next `Host::cut` (asked of every connection on every tick, and on a
    /// backend's cut) waits (up to `WAIT`) for a word on it, and `paused` counts it as it starts
    /// waiting. The worker takes nothing from the kernel meanwhile, and its ring defers the kernel's
    /// side of a completion to the worker (DEFER_TASKRUN), queued as it happens: what happens in the
    /// meantime reaches it, once it goes on, in the order it happened.
    pause: std::sync::Mutex<Option<Receiver<()>>>,
    paused: AtomicU64,
    /// Bytes the host was told were sent (`Host::sent`), both ways.
    sent: AtomicU64,
}

const PREFACE: &[u8] = b"PRE|";
const GREETING_LIMIT: Duration = Duration::from_millis(300);
const GREETING_ROOM: usize = 16;

/// The next target to try, the connect errors seen, and when its wait ends (`Mode::wait_until`).
struct TestConn {
    next: usize,
    errors: Vec<io::ErrorKind>,
    wait_until: Option<Instant>,
}

impl Host for TestHost {
    type Listen = ();
    type Conn = TestConn;
    fn listening(&mut self, _: u32, (): ()) {
        self.seen.listened.fetch_add(1, Relaxed);
        if self.mode.refused_dontwait {
            super::refuse_dontwait_here(); // On the worker's thread, before it arms the accepts.
        }
    }
    fn unlistened(&mut self, _: u32) {}
    fn accepted(
        &mut self,
        _: u32,
        _: SocketAddr,
        client: BorrowedFd<'_>,
    ) -> Option<(TestConn, Admit, Timeouts)> {
        let n = self.seen.accepted.fetch_add(1, Relaxed) as usize;
        if let Some(go) = self.seen.hold_accept.lock().unwrap().take() {
            self.seen.accepts_held.fetch_add(1, Relaxed);
            let _ = go.recv_timeout(WAIT);
        }
        if self.mode.broken_pipe_reads {
            crate::relay::splice::break_reads_here(); // On the worker's thread, as hosts run.
        }
        if self.mode.failing_nodelay {
            super::fail_nodelay_here();
        }
        if self.mode.hurried_stop {
            super::hurry_stops_here();
        }
        if self.mode.tight_client {
            socket2::SockRef::from(&client)
                .set_send_buffer_size(4096)
                .unwrap();
        }
        let nth = |of: &'static [Duration]| of.get(n).or(of.last()).copied();
        let conn = TestConn {
            next: 1,
            errors: Vec::new(),
            wait_until: self
                .mode
                .wait_until
                .and_then(nth)
                .map(|d| Instant::now() + d),
        };
        let admit = match self.mode.greeting {
            Some(_) => Admit::Read {
                limit: GREETING_LIMIT,
                room: GREETING_ROOM,
            },
            None => Admit::Connect {
                target: self.mode.wait_for_retries.is_none().then(|| self.first()),
                preface: Vec::new(),
            },
        };
        let timeouts = Timeouts {
            idle: self
                .mode
                .idle
                .and_then(nth)
                .unwrap_or(Duration::from_secs(60)),
            half_close: Duration::from_secs(60),
            stall: self.mode.stall.unwrap_or(HOUR),
            first_byte: self.mode.first_byte,
            watched: Watched::default(),
        };
        Some((conn, admit, timeouts))
    }
    fn preamble(&mut self, _: &mut TestConn, _: BorrowedFd<'_>, got: Got<'_>) -> Step {
        self.seen.preambles.fetch_add(1, Relaxed);
        if self.mode.undecided {
            return Step::More;
        }
        let greeting = self.mode.greeting.unwrap_or_default();
        match got {
            Got::Bytes(b) if b.starts_with(greeting) => Step::Connect {
                target: Some(self.first()),
                consumed: greeting.len(),
                preface: PREFACE.to_vec(),
            },
            Got::Bytes(b) if greeting.starts_with(b) => Step::More,
            Got::TimedOut => Step::Refuse(Outcome::IdleTimeout),
            _ => Step::Refuse(Outcome::ProxyHeader),
        }
    }
    fn connect_failed(
        &mut self,
        c: &mut TestConn,
        e: io::Error,
    ) -> Result<Option<Target>, Outcome> {
        c.errors.push(e.kind());
        let addr = *self.targets.get(c.next).ok_or(Outcome::ConnectFailed)?;
        c.next += 1;
        Ok(Some(Target {
            addr,
            timeout: self.timeout,
        }))
    }
    fn retry(&mut self, c: &mut TestConn) -> Result<Option<Target>, Outcome> {
        let asked = self.seen.retries.fetch_add(1, Relaxed) + 1;
        if self.wait_left(c).is_some_and(|left| left.is_zero()) {
            return Err(Outcome::BackendsFull);
        }
        let enough = self.mode.wait_for_retries.is_none_or(|n| asked >= n);
        Ok(enough.then(|| self.first()))
    }
    fn wait_left(&self, c: &TestConn) -> Option<Duration> {
        Some(c.wait_until?.saturating_duration_since(Instant::now()))
    }
    fn connected(&mut self, c: &mut TestConn) {
        if c.next == 1 {
            if let Some(go) = self.seen.hold_first.lock().unwrap().as_ref() {
                self.seen.held.fetch_add(1, Relaxed);
                let _ = go.recv_timeout(WAIT);
            }
        }
    }
    fn established(&mut self, c: &mut TestConn) {
        self.seen.established.lock().unwrap().push(c.next - 1);
    }
    fn first_bytes_failed(
        &mut self,
        c: &mut TestConn,
        e: io::Error,
    ) -> Result<Option<Target>, Outcome> {
        self.connect_failed(c, e)
    }
    fn relaying(&mut self, c: &mut TestConn) {
        self.seen.relaying.lock().unwrap().push(c.next - 1);
    }
    fn splices_bulk(&self) -> bool {
        !self.mode.copy_only
    }
    fn sent(&mut self, _: &TestConn, up: u64, down: u64) {
        self.seen.sent.fetch_add(up + down, Relaxed);
    }
    fn cut(&mut self, _: &TestConn) -> Option<Supervised> {
        let pause = self.seen.pause.lock().unwrap().take();
        if let Some(go) = pause {
            self.seen.paused.fetch_add(1, Relaxed);
            let _ = go.recv_timeout(WAIT);
        }
        self.seen
            .cut
            .load(Relaxed)
            .then(|| Supervised::cut(Outcome::BackendDown))
    }
    fn ended(&mut self, c: TestConn, f: Finished) {
        let _ = self.ended.send((f, c.errors));
    }
    type Carrier = ();
    fn carrier(&mut self) -> Option<()> {
        self.seen.carriers.fetch_add(1, Relaxed);
        self.mode.carries.then_some(())
    }
    fn carried(&mut self, _: TestConn, (): (), q: Quiet) {
        let _ = self.carried.send(q);
    }
}

impl TestHost {
    fn first(&self) -> Target {
        Target {
            addr: self.targets[0],
            timeout: self.timeout,
        }
    }
}

struct Running {
    handle: Handle<(), TestConn>,
    thread: JoinHandle<()>,
    addr: SocketAddr,
    ended: Receiver<(Finished, Vec<io::ErrorKind>)>,
    carried: Receiver<Quiet>,
    seen: Arc<Seen>,
    /// The worker's own pipes (none lent when `Mode::no_pipes`).
    pipes: &'static PipePool,
}

/// A worker serving a listener of its own, connecting to `targets` in turn; `None` (said) where
/// this kernel cannot run one.
fn worker(targets: Vec<SocketAddr>, timeout: Duration) -> Option<Running> {
    worker_with(targets, timeout, Mode::default())
}

/// A worker whose clients must open with `greeting` (see `Mode::greeting`).
fn greeted_worker(
    targets: Vec<SocketAddr>,
    timeout: Duration,
    greeting: Option<&'static [u8]>,
) -> Option<Running> {
    let mode = Mode {
        greeting,
        ..Mode::default()
    };
    worker_with(targets, timeout, mode)
}

fn worker_with(targets: Vec<SocketAddr>, timeout: Duration, mode: Mode) -> Option<Running> {
    if crate::relay::uring::missing_in_test() {
        return None;
    }
    let (tx, ended) = mpsc::channel();
    let (carried_tx, carried) = mpsc::channel();
    let seen = Arc::new(Seen::default());
    let host_seen = seen.clone();
    // A pool of the worker's own, so a test can count what it lends.
    let pipes: &'static PipePool =
        Box::leak(Box::new(PipePool::new(if mode.no_pipes { 0 } else { 16 })));
    let make = move || TestHost {
        targets,
        timeout,
        mode,
        seen: host_seen,
        ended: tx,
        carried: carried_tx,
    };
    let tick = mode.tick.unwrap_or(TICK);
    let sockets = !mode.socket_calls && sockets_on_ring();
    let (handle, thread) =
        start_with("ring-test".into(), make, pipes, tick, sockets).expect("a ring worker starts");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    assert!(handle.send(Command::Listen {
        id: 0,
        socket: l,
        with: (),
    }));
    Some(Running {
        handle,
        thread,
        addr,
        ended,
        carried,
        seen,
        pipes,
    })
}

/// Echoes every connection until its EOF, then closes it.
fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(16) {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An address nothing listens on: a port held by a socket that is bound, not listening, and kept
/// for the life of the test process, so a SYN to it is answered by a reset. A port merely released
/// could be handed to another test's listener running beside this one, which would then accept
/// the connection meant to be refused (and the other test would find one it did not expect).
/// Without SO_REUSEADDR on the held socket, no other bind can share its port.
fn refusing() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    HELD.lock().unwrap().push(s);
    addr
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Whether the worker closed `s`: its FIN or its reset, not a read that timed out.
fn closed(s: &mut TcpStream) -> bool {
    match read_some(s, &mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// A client whose first byte has come back through the worker: relayed, both ways.
fn relayed_client(r: &Running) -> TcpStream {
    let mut c = client(r.addr);
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    c
}

/// `read`, again when a signal interrupts it: a socket with a read timeout is never restarted
/// after a signal handler, and other tests in this process signal it.
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

fn byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 12)) as u8
}

/// Writes `total` bytes of the `byte` pattern to `s`, then its FIN.
fn write_pattern(s: &mut TcpStream, total: u64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut i = 0u64;
    while i < total {
        for b in buf.iter_mut() {
            *b = byte(i);
            i += 1;
        }
        s.write_all(&buf).expect("the whole pattern is written");
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads `s` to its EOF, checking each byte against the `byte` pattern; how many came.
fn read_pattern(s: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut i = 0u64;
    loop {
        let n = read_some(s, &mut buf).expect("the pattern is read");
        if n == 0 {
            return i;
        }
        for &got in &buf[..n] {
            assert_eq!(got, byte(i), "byte {i}");
            i += 1;
        }
    }
}

fn stop(r: Running) {
    assert!(r.handle.send(Command::Stop));
    thread_ends(r);
}

/// Waits for `r`'s thread to end (it was told to stop).
fn thread_ends(r: Running) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(r.thread.join().is_ok());
    });
    assert_eq!(rx.recv_timeout(WAIT), Ok(true), "the worker's thread ends");
}

#[test]
fn a_direction_arms_below_half_the_cap_cancels_at_it_and_shuts_once_drained() {
    let mut d = Dir::default();
    assert!(d.should_arm(false, CAP));
    assert!(
        !d.should_arm(true, CAP),
        "an ending connection arms nothing"
    );
    d.armed = true;
    assert!(!d.should_arm(false, CAP), "one receive at a time");
    for i in 0..CAP {
        assert!(!d.should_cancel(CAP), "below the cap at {i}");
        d.held.push_back(Held {
            buf: Buf::Own,
            len: 1,
            off: 0,
        });
    }
    assert!(d.should_cancel(CAP), "at the cap");
    d.cancelling = true;
    assert!(!d.should_cancel(CAP), "cancelled once");
    d.armed = false;
    assert!(
        !d.should_arm(false, CAP),
        "not armed again while it holds the cap"
    );
    d.held.truncate(CAP / 2);
    assert!(!d.should_arm(false, CAP), "nor at half of it");
    d.held.truncate(CAP / 2 - 1);
    assert!(d.should_arm(false, CAP), "below half: armed again");
    d.starved = Some(0);
    assert!(
        !d.should_arm(false, CAP),
        "a starved one waits for a buffer"
    );
    d.starved = None;
    d.eof = true;
    assert!(
        !d.should_arm(false, CAP),
        "nothing more to read after the FIN"
    );
    assert!(!d.should_shut(), "the FIN waits for what came before it");
    d.held.clear();
    d.sending = true;
    assert!(!d.should_shut(), "and for the send in flight");
    d.sending = false;
    assert!(d.should_shut());
    d.shut = true;
    assert!(!d.should_shut(), "passed on once");
}

/// Buffers that come back wake the directions a dry pool stopped in the order they ran dry: one
/// that ran dry first is not put off by those that ran dry after it, and one that runs dry again
/// waits behind those already waiting.
#[test]
fn a_dry_pools_directions_are_woken_oldest_first() {
    let mut q = Starved::default();
    let mut dirs: [Dir; 3] = Default::default();
    for (i, d) in dirs.iter_mut().enumerate() {
        d.starved = Some(q.push(i as u32, Side::Up));
    }
    let take = |q: &mut Starved, dirs: &mut [Dir; 3], woken: &mut Vec<u32>| {
        let (slot, _, ticket) = q.next().unwrap();
        if dirs[slot as usize].leaves_starved(ticket) {
            woken.push(slot);
        }
    };
    let mut woken = Vec::new();
    take(&mut q, &mut dirs, &mut woken);
    dirs[0].starved = Some(q.push(0, Side::Up));
    for _ in 0..3 {
        take(&mut q, &mut dirs, &mut woken);
    }
    assert_eq!(
        woken,
        [0, 1, 2, 0],
        "oldest first; dry again, after those waiting"
    );
    assert!(q.is_empty() && dirs.iter().all(|d| d.starved.is_none()));
}

/// An entry left in the queue when its direction stopped waiting without it (it moved to splice, or
/// its slot was reused) does not wake the direction once it runs dry again: its newer place, behind
/// those already waiting, stands.
#[test]
fn an_entry_left_behind_does_not_wake_its_direction_out_of_turn() {
    let mut q = Starved::default();
    let mut d = Dir {
        starved: Some(q.push(0, Side::Up)),
        ..Dir::default()
    };
    q.push(1, Side::Up);
    // Its flag cleared without its entry (it moved to splice, or its slot was reused), then dry
    // again: a second entry, behind the first and the one between.
    d.starved = Some(q.push(0, Side::Up));
    let (_, _, left) = q.next().unwrap();
    assert!(!d.leaves_starved(left), "the entry left behind");
    assert!(d.starved.is_some(), "still waiting");
    assert_eq!(
        q.next().map(|(slot, ..)| slot),
        Some(1),
        "the one before it"
    );
    let (_, _, place) = q.next().unwrap();
    assert!(d.leaves_starved(place), "its own place");
    assert!(!d.leaves_starved(place), "once");
}

#[test]
fn a_direction_turns_bulk_on_a_full_buffer_and_splices_once_nothing_of_it_is_in_flight() {
    let mut d = Dir::default();
    assert!(!d.turns_bulk(POOL_BUF - 1), "a short receive is not bulk");
    assert!(d.turns_bulk(POOL_BUF));
    d.bulk = true;
    assert!(!d.turns_bulk(POOL_BUF), "once");
    assert!(
        !d.should_arm(false, CAP),
        "a bulk direction receives no more"
    );
    d.armed = true;
    assert!(!d.may_splice(), "its receive is still in the kernel");
    d.armed = false;
    d.held.push_back(Held {
        buf: Buf::Own,
        len: POOL_BUF,
        off: 0,
    });
    assert!(!d.may_splice(), "what it received goes first");
    d.held.clear();
    d.sending = true;
    assert!(!d.may_splice(), "and its send completes first");
    d.sending = false;
    assert!(d.may_splice());
    d.eof = true;
    assert!(!d.may_splice(), "after the FIN there is nothing to splice");
    let mut d = Dir {
        no_pipe: true,
        ..Dir::default()
    };
    assert!(!d.turns_bulk(POOL_BUF), "no pipe was to be had: it stays");
    d.no_pipe = false;
    d.eof = true;
    assert!(!d.turns_bulk(POOL_BUF));
}

#[test]
fn silence_is_measured_against_the_limit_of_the_connections_state() {
    let t = Timeouts {
        idle: Duration::from_secs(10),
        half_close: Duration::from_secs(2),
        stall: HOUR,
        first_byte: None,
        watched: Watched::default(),
    };
    assert_eq!(expired(&t, false, Duration::from_secs(9)), None);
    assert_eq!(
        expired(&t, false, Duration::from_secs(10)),
        Some(Outcome::IdleTimeout)
    );
    assert_eq!(expired(&t, true, Duration::from_secs(1)), None);
    assert_eq!(
        expired(&t, true, Duration::from_secs(2)),
        Some(Outcome::HalfCloseTimeout)
    );
}

#[test]
fn only_an_ending_backends_cancellation_that_found_nothing_while_connecting_is_asked_again() {
    assert_eq!(recancel(0, Side::Down, true, Some(0), true), Some(1));
    assert_eq!(recancel(0, Side::Down, true, Some(0), false), Some(0));
    // It found something (the count of a cancel-all), or failed.
    assert_eq!(recancel(1, Side::Down, true, Some(0), true), None);
    assert_eq!(
        recancel(-libc::ENOENT, Side::Down, true, Some(0), true),
        None
    );
    // The client's side; a connection not ending; one whose connect is in, or was never out.
    assert_eq!(recancel(0, Side::Up, true, Some(0), true), None);
    assert_eq!(recancel(0, Side::Down, false, Some(0), true), None);
    assert_eq!(recancel(0, Side::Down, true, None, true), None);
    // The budget is spent.
    assert_eq!(recancel(0, Side::Down, true, Some(RECANCELS), false), None);
}

/// How many times a cancellation that keeps finding nothing is asked again over loop turns that
/// waited or not (`turns`), until it is not.
fn recancels_over(turns: impl IntoIterator<Item = bool>) -> usize {
    let mut out = Some(0);
    let mut asked = 0;
    for waited in turns {
        match recancel(0, Side::Down, true, out, waited) {
            Some(n) => out = Some(n),
            None => break,
        }
        asked += 1;
    }
    asked
}

#[test]
fn a_cancellations_retries_are_counted_only_after_turns_that_waited() {
    let budget = usize::from(RECANCELS);
    // Only a wait runs the work that issues the connect, so only a wait spends the budget.
    assert_eq!(recancels_over(std::iter::repeat_n(true, 100)), budget);
    assert_eq!(recancels_over(std::iter::repeat_n(false, 1000)), 1000);
    // Turns without one (ACKs held, a full submission queue) before the waits leave it whole.
    let turns = std::iter::repeat_n(false, 10).chain(std::iter::repeat_n(true, 100));
    assert_eq!(recancels_over(turns), 10 + budget);
    let alternating = (0..100).map(|i| i % 2 == 0);
    assert_eq!(recancels_over(alternating), 2 * budget - 1);
}

#[test]
fn user_data_names_the_kind_the_side_and_the_slot() {
    for (kind, slot, side) in [
        (K_RECV, 0, Side::Up),
        (K_SEND, 7, Side::Down),
        (K_TICK, u32::MAX, Side::Down),
    ] {
        let ud = user_data(kind, slot, side);
        assert_eq!(ud & 15, kind);
        assert_eq!((ud >> 32) as u32, slot);
        assert_eq!(side_of(ud), side);
    }
}

/// A backend that does not read: the direction towards it holds `CAP` pool buffers, its receive is
/// cancelled, the pool never gives out, and once the backend reads, every byte arrives in order.
#[test]
fn a_destination_that_does_not_read_stops_its_receive_at_the_cap_and_loses_nothing() {
    const TOTAL: u64 = 64 << 20;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let copy_only = Mode {
        copy_only: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![backend], WAIT, copy_only) else {
        return;
    };
    let mut c = client(r.addr);
    let writer = std::thread::spawn(move || {
        write_pattern(&mut c, TOTAL);
        c
    });
    let mut b = accept_within(&l);
    let deadline = Instant::now() + WAIT;
    while r.handle.counts().cancels_at_cap.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no receive was cancelled at the cap"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Before the worker sees the cap, a fast sender can fill more of the pool than its first
    // buffers (the kernel fills them while completions wait): the pool grows then, and is dry only
    // when it does. The cap stops the receive long before it has given all it has.
    let counts = r.handle.counts();
    let given = counts.pool_given.load(Relaxed);
    assert!(given < u64::from(POOL_BUFS), "the pool gave {given}");
    assert!(
        counts.starved.load(Relaxed) <= (given - u64::from(POOL_FIRST)) / u64::from(POOL_GROW),
        "dry only when it grew"
    );
    b.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(read_pattern(&mut b), TOTAL, "every byte, once");
    drop(b);
    let mut c = writer.join().unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        c.read_to_end(&mut rest).unwrap(),
        0,
        "the backend's FIN reaches the client"
    );
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(f.bytes_up, TOTAL);
    assert_eq!(f.end, Outcome::ClientClosed);
    assert!(
        !f.spliced,
        "a host that does not splice keeps it on the pool"
    );
    stop(r);
}

/// The pool gives the kernel its first 64 buffers, and more only when a receive finds it dry: a
/// thousand echoed exchanges leave it at 64 (all 1,024 were given at once before, and a worker kept
/// 16 MiB resident); twelve uploads stalled at the cap (eight buffers held each) make it grow, and
/// once the backend reads, each arrives whole, once, in order.
#[test]
fn the_pool_grows_only_when_a_receive_finds_it_dry_and_loses_nothing() {
    let Some(r) = worker(vec![echo_backend()], WAIT) else {
        return;
    };
    let mut c = relayed_client(&r);
    for _ in 0..1_000 {
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }
    let counts = r.handle.counts();
    assert_eq!(
        counts.pool_given.load(Relaxed),
        u64::from(POOL_FIRST),
        "a light load keeps the pool at its first buffers"
    );
    assert_eq!(counts.starved.load(Relaxed), 0);
    drop(c);
    stop(r);

    const UPLOADS: usize = 12;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let copy_only = Mode {
        copy_only: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, copy_only) else {
        return;
    };
    let mut ends = Vec::new();
    for _ in 0..UPLOADS {
        let mut c = client(r.addr);
        let b = accept_within(&l);
        b.set_read_timeout(Some(WAIT)).unwrap();
        let sent = upload_until_stalled(&mut c);
        c.shutdown(Shutdown::Write).unwrap();
        ends.push((c, b, sent));
    }
    let counts = r.handle.counts();
    let given = counts.pool_given.load(Relaxed);
    assert!(
        given >= (UPLOADS * CAP) as u64 && given <= u64::from(POOL_BUFS),
        "{UPLOADS} uploads holding {CAP} buffers each: the pool grew from {POOL_FIRST} to {given}"
    );
    assert!(counts.starved.load(Relaxed) > 0, "it grew when it ran dry");
    for (_c, mut b, sent) in ends {
        assert_eq!(read_pattern(&mut b), sent, "every byte of the upload, once");
    }
    stop(r);
}

/// Taken by each test that runs a pool dry (`untimed_copy_worker`).
static DRY_POOLS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A worker whose tick and connections' idle timeout are an hour, so that the tick's slow part,
/// which retries starved receives too, never runs within a test; and the listener of its backends,
/// whose sockets take a few KiB each, so that a hundred stalled uploads hold a few tens of MiB of
/// the kernel's memory, not a GiB.
/// Each such test holds several hundred descriptors: they run one at a time (`DRY_POOLS`), so that
/// together they stay under a soft limit of 1,024.
fn untimed_copy_worker(tight_client: bool) -> Option<(Running, TcpListener)> {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.set_recv_buffer_size(4096).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(1024).unwrap();
    let l: TcpListener = l.into();
    let mode = Mode {
        copy_only: true,
        tick: Some(HOUR),
        idle: Some(&[HOUR]),
        tight_client,
        ..Mode::default()
    };
    let r = worker_with(vec![l.local_addr().unwrap()], WAIT, mode)?;
    Some((r, l))
}

/// Lifts this process's soft limit on descriptors to its hard one (never the hard one itself): a
/// pool run dry by uploads held at the shrinking cap (`cap_for`) takes some three hundred of them,
/// four descriptors each (two here, two in the worker).
fn raise_soft_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 16);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Uploads through `r` to backends accepted from `l` that do not read, each stalled at the cap,
/// until every buffer of the pool is given out and held, and a new connection's first bytes
/// (`hello`) find no buffer: they come through all the same, received into the connection's own
/// buffer (`own_receives`). The stalled connections, then that one's client and backend.
fn dry_pool(r: &Running, l: &TcpListener) -> (Vec<(TcpStream, TcpStream)>, TcpStream, TcpStream) {
    raise_soft_nofile();
    let counts = r.handle.counts();
    let mut stalled = Vec::new();
    // Until a probe finds the pool dry: a new connection's five bytes pass either way, in a pool
    // buffer that was free (it went back once they were sent, and one more upload stalls) or in
    // the connection's own.
    loop {
        assert!(
            stalled.len() < usize::from(POOL_BUFS),
            "{} uploads never left the pool dry",
            stalled.len()
        );
        // Read before the connection is made: its receive, armed as it connects, already finds
        // the pool dry then, before any byte has come.
        let full = counts.pool_given.load(Relaxed) == u64::from(POOL_BUFS);
        let own = counts.own_receives.load(Relaxed);
        let mut c = client(r.addr);
        let mut b = accept_within(l);
        if full {
            c.write_all(b"hello").unwrap();
            b.set_read_timeout(Some(WAIT)).unwrap();
            let mut got = [0u8; 5];
            b.read_exact(&mut got)
                .expect("a new connection's first bytes pass, however dry the pool");
            assert_eq!(&got, b"hello");
            if counts.own_receives.load(Relaxed) > own {
                return (stalled, c, b);
            }
            drop((c, b));
            c = client(r.addr);
            b = accept_within(l);
        }
        upload_until_stalled(&mut c);
        stalled.push((c, b));
    }
}

/// reliability.md `ring-pool-dry`: every buffer of the pool given out and held by uploads stalled
/// at the cap (their backends do not read), a new connection, whose directions hold nothing, still
/// relays both ways at once, through its own buffers, with the tick (which retries what the pool
/// starved) an hour away; and it goes on doing so while the pool stays dry. Before, its receives
/// waited for a buffer that none of the stalled connections would ever give back.
#[test]
fn a_direction_that_holds_nothing_moves_however_dry_the_pool() {
    let _one_at_a_time = DRY_POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((r, l)) = untimed_copy_worker(false) else {
        return;
    };
    let (stalled, mut c, mut b) = dry_pool(&r, &l);
    let counts = r.handle.counts();
    let own = counts.own_receives.load(Relaxed);
    for i in 0..20u8 {
        b.write_all(&[b'a' + i; 4]).unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got)
            .expect("the backend's bytes reach the client, long before the tick");
        assert_eq!(got, [b'a' + i; 4]);
        c.write_all(&[i; 3]).unwrap();
        let mut got = [0u8; 3];
        b.read_exact(&mut got)
            .expect("the client's bytes reach the backend, long before the tick");
        assert_eq!(got, [i; 3]);
    }
    // Each receive takes a pool buffer when one happens to be free (a stalled upload woken by one
    // that came back can give it back again), and its own buffer when none is.
    assert!(
        counts.own_receives.load(Relaxed) > own,
        "the exchanges went through the connection's own buffers"
    );
    assert_eq!(counts.pool_given.load(Relaxed), u64::from(POOL_BUFS));
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    b.read_to_end(&mut rest)
        .expect("the client's FIN passes on");
    assert!(rest.is_empty());
    drop(stalled);
    stop(r);
}

/// A client of `r` whose socket takes a few KiB, and its backend, accepted from `l`.
fn tight_client(r: &Running, l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.set_recv_buffer_size(4096).unwrap();
    c.connect(&r.addr.into()).unwrap();
    let c: TcpStream = c.into();
    c.set_read_timeout(Some(WAIT)).unwrap();
    (c, accept_within(l))
}

/// Both directions carry 32 MiB through an echo: each moves to splice (or, with no pipe to be had,
/// stays on the pool's buffers) and delivers every byte once, in order, then both FINs.
fn bulk_both_ways(mode: Mode) -> Option<Finished> {
    const TOTAL: u64 = 32 << 20;
    let r = worker_with(vec![echo_backend()], WAIT, mode)?;
    let mut c = client(r.addr);
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || write_pattern(&mut w, TOTAL));
    assert_eq!(
        read_pattern(&mut c),
        TOTAL,
        "every byte back, once, then the backend's FIN"
    );
    writer.join().unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!((f.bytes_up, f.bytes_down), (TOTAL, TOTAL));
    assert_eq!(f.end, Outcome::ClientClosed);
    stop(r);
    Some(f)
}

#[test]
fn bulk_moves_to_splice_both_ways_and_loses_nothing() {
    if let Some(f) = bulk_both_ways(Mode::default()) {
        assert!(f.spliced, "bulk moved to splice: {f:?}");
    }
}

#[test]
fn with_no_pipe_to_be_had_bulk_stays_on_the_pool_and_loses_nothing() {
    let mode = Mode {
        no_pipes: true,
        ..Mode::default()
    };
    if let Some(f) = bulk_both_ways(mode) {
        assert!(!f.spliced, "no pipe, no splice: {f:?}");
    }
}

/// A worker in `mode` whose one target is a listener of the test's, a client of it, and that
/// client's connection as the backend accepted it.
fn one_connection(mode: Mode) -> Option<(Running, TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = worker_with(vec![l.local_addr().unwrap()], WAIT, mode)?;
    let c = client(r.addr);
    let b = accept_within(&l);
    b.set_read_timeout(Some(WAIT)).unwrap();
    Some((r, c, b))
}

/// A direction that has ended gives its pipe back at once, while the other goes on.
#[test]
fn a_spliced_direction_gives_its_pipe_back_at_its_fin() {
    let Some((r, mut c, mut b)) = one_connection(Mode::default()) else {
        return;
    };
    let writer = std::thread::spawn(move || {
        write_pattern(&mut c, 1 << 20);
        c
    });
    assert_eq!(read_pattern(&mut b), 1 << 20, "the upload, then its FIN");
    let mut c = writer.join().unwrap();
    wait_until(|| r.pipes.lent() == 0, "the upload's pipe back in the pool");
    b.write_all(b"the download goes on").unwrap();
    let mut got = [0u8; 20];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"the download goes on");
    drop(b);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert!(f.spliced);
    assert_eq!((f.bytes_up, f.bytes_down), (1 << 20, 20));
    stop(r);
}

/// TCP urgent data stops splice: it returns EAGAIN at the mark, while poll keeps reporting the
/// socket readable, or 0 once the FIN has come too, with bytes still queued past the mark. The
/// direction goes back to receiving (which reads past it) instead of polling a socket that is
/// always ready, or taking the bytes after the mark for an end of stream.
fn urgent_data_while_splicing(fin_with_it: bool) {
    let Some((r, mut c, mut b)) = one_connection(Mode::default()) else {
        return;
    };
    let bulk = vec![1u8; 256 << 10];
    c.write_all(&bulk).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < bulk.len() {
        got += read_some(&mut b, &mut buf).unwrap();
    }
    // SAFETY: `c` is an open socket and the buffer is one valid byte.
    let n = unsafe { libc::send(c.as_raw_fd(), b"U".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "the urgent byte is sent");
    c.write_all(b"after the urgent byte").unwrap();
    if fin_with_it {
        c.shutdown(Shutdown::Write).unwrap();
    } else {
        let mut after = [0u8; 21];
        b.read_exact(&mut after)
            .expect("what follows the urgent byte arrives before any FIN");
        assert_eq!(&after, b"after the urgent byte");
        c.write_all(b" and more").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
    }
    let mut rest = Vec::new();
    b.read_to_end(&mut rest)
        .expect("what follows the urgent byte arrives, then the FIN");
    let want: &[u8] = if fin_with_it {
        b"after the urgent byte"
    } else {
        b" and more"
    };
    assert_eq!(rest, want, "urgent data is not inline");
    assert_eq!(r.handle.counts().splices_stuck.load(Relaxed), 1);
    drop(b);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert!(f.spliced);
    stop(r);
}

#[test]
fn urgent_data_sends_a_spliced_direction_back_to_receiving() {
    urgent_data_while_splicing(false);
}

#[test]
fn urgent_data_and_a_fin_are_not_taken_for_the_end_of_a_spliced_stream() {
    urgent_data_while_splicing(true);
}

/// Bytes moved by splice count as activity: a connection that keeps moving bulk data outlives
/// its idle timeout many times over, and one that stops ends at it.
#[test]
fn a_spliced_direction_that_moves_bytes_is_not_idle() {
    const IDLE: Duration = Duration::from_millis(1500);
    let mode = Mode {
        idle: Some(&[IDLE]),
        ..Mode::default()
    };
    let Some((r, mut c, mut b)) = one_connection(mode) else {
        return;
    };
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0usize;
        while let Ok(k @ 1..) = read_some(&mut b, &mut buf) {
            n += k;
        }
        n
    });
    // 64 KiB every 50 ms for four idle timeouts: every write is a bulk receive or splice.
    let chunk = vec![2u8; 64 << 10];
    let until = Instant::now() + IDLE * 4;
    let mut sent = 0usize;
    while Instant::now() < until {
        c.write_all(&chunk).expect("the connection is still open");
        sent += chunk.len();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (f, _) = r.ended.recv_timeout(WAIT).expect("it ends once silent");
    assert_eq!(f.end, Outcome::IdleTimeout);
    assert!(f.spliced);
    assert_eq!(f.bytes_up, sent as u64, "every byte before it went idle");
    assert_eq!(reader.join().unwrap(), sent);
    stop(r);
}

/// A backend that resets in the middle of a spliced stream: the client sees a reset, the
/// connection ends as the backend's.
#[test]
fn a_backend_reset_while_splicing_resets_the_client() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let Some(r) = worker(vec![backend], WAIT) else {
        return;
    };
    let mut c = client(r.addr);
    let (read_half, half_read) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let mut b = accept_within(&l);
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..16 {
            b.write_all(&chunk).unwrap();
        }
        half_read.recv_timeout(WAIT).expect("the client read half");
        SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
        drop(b);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0usize;
    let mut told = false;
    let e = loop {
        match read_some(&mut c, &mut buf) {
            Ok(0) => panic!("an EOF after {got} bytes, not a reset"),
            Ok(n) => got += n,
            Err(e) => break e,
        }
        if got >= 512 << 10 && !told {
            told = true;
            read_half.send(()).unwrap();
        }
    };
    assert_eq!(
        e.kind(),
        io::ErrorKind::ConnectionReset,
        "after {got} bytes"
    );
    server.join().unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert!(f.spliced, "{f:?}");
    assert_eq!(f.end, Outcome::BackendReset);
    stop(r);
}

/// A refused connect goes to the host, which names the next target; the client never knows. With
/// backend sockets made on the ring and by system calls.
#[test]
fn a_refused_connect_tries_the_next_target() {
    for socket_calls in [false, true] {
        refused_then_next(Mode {
            socket_calls,
            ..Mode::default()
        });
    }
}

fn refused_then_next(mode: Mode) {
    let Some(r) = worker_with(vec![refusing(), echo_backend()], WAIT, mode) else {
        return;
    };
    let mut c = client(r.addr);
    c.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c.read(&mut got).unwrap(), 0);
    let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(errors, [io::ErrorKind::ConnectionRefused]);
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (5, 5, Outcome::ClientClosed)
    );
    assert_eq!(
        *r.seen.established.lock().unwrap(),
        [1],
        "with no preface, credited at its connect: the second target only"
    );
    stop(r);
}

/// When every target fails the host's outcome is the end, and the client is closed after it.
#[test]
fn a_client_no_target_takes_ends_as_the_host_says() {
    let Some(r) = worker(vec![refusing(), refusing()], WAIT) else {
        return;
    };
    let mut c = client(r.addr);
    let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(errors.len(), 2);
    assert_eq!(f.end, Outcome::ConnectFailed);
    assert!(closed(&mut c), "closed");
    stop(r);
}

/// A backend that drops SYNs (its accept queue full): the connect ends at its linked timeout,
/// whether its socket was made on the ring (the timeout then the last link of a chain of four) or
/// by system calls.
#[test]
fn a_connect_nobody_answers_ends_at_its_linked_timeout() {
    for socket_calls in [false, true] {
        unanswered(Mode {
            socket_calls,
            ..Mode::default()
        });
    }
}

fn unanswered(mode: Mode) {
    let hole = Hole::new();
    let Some(r) = worker_with(vec![hole.addr], Duration::from_millis(200), mode) else {
        return;
    };
    let _c = client(r.addr);
    let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(errors, [io::ErrorKind::TimedOut]);
    assert_eq!(f.end, Outcome::ConnectFailed);
    stop(r);
}

/// A listener whose accept queue is full: it drops SYNs, so a connect to it is never answered.
struct Hole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<TcpStream>,
}

impl Hole {
    fn new() -> Hole {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let queued = (0..4)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
            "the hole drops SYNs"
        );
        Hole {
            addr,
            _listener: l,
            _queued: queued,
        }
    }
}

/// A connection cut in the loop turn its backend socket comes back from the ring in ends at once,
/// not at its connect's timeout. Its socket's options, the connect and the cut's cancellations go
/// into the kernel in one submission, which issues such a connect only afterwards (from work
/// deferred to the worker's next wait): the first cancellation finds nothing of it. Here the
/// client's accept holds the worker while the cut is sent, so the socket's completion and the
/// cut's wake-up are reaped together.
#[test]
fn a_connection_cut_as_its_connect_goes_in_ends_before_the_connect_times_out() {
    for socket_calls in [false, true] {
        let hole = Hole::new();
        let mode = Mode {
            socket_calls,
            ..Mode::default()
        };
        let Some(r) = worker_with(vec![hole.addr], HOUR, mode) else {
            return;
        };
        let (go, hold) = mpsc::channel();
        *r.seen.hold_accept.lock().unwrap() = Some(hold);
        let mut c = client(r.addr);
        let deadline = Instant::now() + WAIT;
        while r.seen.accepts_held.load(Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the client reaches the host");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(r.handle.send(Command::Cut(Outcome::DrainDeadline)));
        drop(go);
        let (f, errors) = r
            .ended
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("socket calls: {socket_calls}: the connection ends"));
        assert_eq!(
            (f.end, errors),
            (Outcome::DrainDeadline, vec![]),
            "socket calls: {socket_calls}"
        );
        assert!(closed(&mut c), "socket calls: {socket_calls}: closed");
        let on_ring = u64::from(!socket_calls && sockets_on_ring());
        assert_eq!(
            r.handle.counts().sockets_made.load(Relaxed),
            on_ring,
            "socket calls: {socket_calls}: the cut came after the socket"
        );
        assert_eq!(
            r.handle.counts().recancels.load(Relaxed) > 0,
            on_ring > 0,
            "socket calls: {socket_calls}: cancelled again only behind the ring's chain"
        );
        stop(r);
    }
}

/// The worker's socket to a backend has TCP_NODELAY, whether made on the ring (the option set
/// there, in the connect's chain) or by system calls; and the worker made it the way it was told.
#[test]
fn a_backend_socket_has_nodelay_however_it_was_made() {
    for socket_calls in [false, true] {
        let backend = echo_backend();
        let mode = Mode {
            socket_calls,
            ..Mode::default()
        };
        let Some(r) = worker_with(vec![backend], WAIT, mode) else {
            return;
        };
        let _c = relayed_client(&r);
        let ours = ours_connected_to(backend);
        assert_eq!(
            ours.len(),
            1,
            "socket calls: {socket_calls}: one backend socket"
        );
        assert!(
            SockRef::from(&ours[0]).tcp_nodelay().unwrap(),
            "socket calls: {socket_calls}: TCP_NODELAY"
        );
        let on_ring = u64::from(!socket_calls && sockets_on_ring());
        assert_eq!(
            r.handle.counts().sockets_made.load(Relaxed),
            on_ring,
            "socket calls: {socket_calls}"
        );
        stop(r);
    }
}

/// A TCP_NODELAY that fails is best effort, on the ring and on a socket made by system calls, as on
/// the epoll engine: the connect after it goes on and the connection relays through the first
/// backend, without it, and no attempt is counted against a backend. On the ring, the option's
/// failed completion, in a chain whose entries post nothing on success, does not stop the
/// connect's.
#[test]
fn a_nodelay_that_fails_leaves_the_connection_to_relay_without_it() {
    if crate::relay::uring::missing_in_test() {
        return;
    }
    for socket_calls in [false, true] {
        if !socket_calls && !sockets_on_ring() {
            continue;
        }
        let mode = Mode {
            failing_nodelay: true,
            socket_calls,
            ..Mode::default()
        };
        let backend = echo_backend();
        let Some(r) = worker_with(vec![backend, echo_backend()], WAIT, mode) else {
            return;
        };
        let mut c = relayed_client(&r);
        let ours = ours_connected_to(backend);
        assert_eq!(
            ours.len(),
            1,
            "socket calls: {socket_calls}: the first backend"
        );
        assert!(
            !SockRef::from(&ours[0]).tcp_nodelay().unwrap(),
            "socket calls: {socket_calls}: the option did fail"
        );
        c.shutdown(Shutdown::Write).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        let echoed = c.read_to_end(&mut Vec::new()).unwrap();
        assert_eq!(echoed, 0, "socket calls: {socket_calls}: the echo's FIN");
        let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
        assert!(
            errors.is_empty(),
            "socket calls: {socket_calls}: no attempt failed: {errors:?}"
        );
        assert_eq!(f.end, Outcome::ClientClosed);
        stop(r);
    }
}

/// This kernel (6.18) sets socket options on the ring: the tests above run the ring's way there.
#[test]
fn this_kernel_makes_backend_sockets_on_the_ring() {
    if crate::relay::uring::missing_in_test() {
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.trim().split(|c: char| !c.is_ascii_digit());
    let mut next = || v.next().and_then(|p| p.parse::<u32>().ok());
    if let (Some(major), Some(minor)) = (next(), next()) {
        assert_eq!(sockets_on_ring(), (major, minor) >= (6, 7), "{release}");
    }
}

/// A connect cancelled failed for its linked timeout; else for its own error.
#[test]
fn a_connect_fails_for_its_timeout_or_its_own_error() {
    let kind = |res| connect_result(res).map_err(|e: io::Error| e.kind());
    assert_eq!(kind(0), Ok(()));
    assert_eq!(kind(-libc::ECANCELED), Err(io::ErrorKind::TimedOut));
    assert_eq!(
        kind(-libc::ECONNREFUSED),
        Err(io::ErrorKind::ConnectionRefused)
    );
}

/// A cut resets both sides: neither mistakes it for the end of the stream.
#[test]
fn a_cut_resets_the_client() {
    let Some(r) = worker(vec![echo_backend()], WAIT) else {
        return;
    };
    let mut c = relayed_client(&r);
    assert!(r.handle.send(Command::Cut(Outcome::DrainDeadline)));
    ends_as_cut(r, &mut c, Outcome::DrainDeadline);
}

/// A worker relaying to an echo backend whose tick never comes within a test: stretched to an hour,
/// and the idle timeout too, which would shorten it.
fn untimed_worker() -> Option<Running> {
    let mode = Mode {
        tick: Some(HOUR),
        idle: Some(&[HOUR]),
        ..Mode::default()
    };
    worker_with(vec![echo_backend()], WAIT, mode)
}

/// Waits for `r`'s connection to end as cut, with `end`, and for client `c` to see a reset (not an
/// EOF, nor an echo); then stops `r`.
fn ends_as_cut(r: Running, c: &mut TcpStream, end: Outcome) {
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(f.end, end);
    let e = read_some(c, &mut [0u8; 1]).expect_err("a reset");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    stop(r);
}

/// A backend's cut (`Command::BackendCut`) ends the connections the host says are cut at once, with
/// its outcome and a reset, without the tick.
#[test]
fn a_backend_cut_ends_its_connections_without_the_tick() {
    let Some(r) = untimed_worker() else {
        return;
    };
    let mut c = relayed_client(&r);
    r.seen.cut.store(true, Relaxed);
    assert!(r.handle.send(Command::BackendCut));
    ends_as_cut(r, &mut c, Outcome::BackendDown);
}

/// A backend's cut followed by a stop, as one batch of commands most likely: each is taken in
/// the order sent, so the connection ends as cut, not at the stop's drain deadline.
#[test]
fn a_backend_cut_then_a_stop_ends_the_connection_as_cut() {
    let Some(r) = untimed_worker() else {
        return;
    };
    let _c = relayed_client(&r);
    r.seen.cut.store(true, Relaxed);
    assert!(r.handle.send(Command::BackendCut));
    assert!(r.handle.send(Command::Stop));
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(f.end, Outcome::BackendDown);
    thread_ends(r);
}

/// A stop cuts what is open and closes it: the closes of the connections freed in the worker's
/// last turn reach the kernel before the ring goes, so the client sees its reset and the backend
/// its connection closed, as soon as the thread has ended (not when the process exits).
#[test]
fn a_stopped_workers_last_connections_are_closed_when_its_thread_ends() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, Mode::default()) else {
        return;
    };
    let mut c = client(r.addr);
    let mut b = accept_within(&l);
    b.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"x").unwrap();
    let mut got = [0u8; 1];
    b.read_exact(&mut got).unwrap();
    stop(r);
    assert!(closed(&mut c), "the client's connection is closed");
    assert!(closed(&mut b), "the backend's connection is closed");
}

/// A stop that leaves connections open (the kernel did not answer their cancellations within
/// `STOP_WAIT`) accounts each as it ended: the bytes moved since the last tick reach the host's
/// live counters, and its end is the one decided, the stop's cut. The worker here does not wait at
/// all, and its tick is an hour, so nothing was counted before the stop.
#[test]
fn a_connection_a_stop_leaves_open_is_accounted_as_it_ended() {
    let mode = Mode {
        tick: Some(HOUR),
        idle: Some(&[HOUR]),
        hurried_stop: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![echo_backend()], WAIT, mode) else {
        return;
    };
    let mut c = client(r.addr);
    c.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    c.read_exact(&mut got).unwrap();
    assert_eq!(
        r.seen.sent.load(Relaxed),
        0,
        "nothing counted before the stop"
    );
    assert!(r.handle.send(Command::Stop));
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!((f.bytes_up, f.bytes_down), (5, 5));
    assert_eq!(f.end, Outcome::DrainDeadline);
    assert_eq!(
        r.seen.sent.load(Relaxed),
        10,
        "its bytes reach the live counters"
    );
    let seen = r.seen.clone();
    thread_ends(r);
    assert_eq!(seen.sent.load(Relaxed), 10, "counted once");
    // Left open, not closed: the worker did not wait for its cancellations (had it waited, the
    // connection would have been freed and closed as usual, and this would prove nothing).
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let e = read_some(&mut c, &mut [0u8; 1]).expect_err("no byte, no EOF");
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "left open: {e}");
}

/// A kernel that reports 6.10+ but refuses IORING_ACCEPT_DONTWAIT refuses every accept a new
/// listener arms with it (four at once): each is armed again without the flag, none is taken for a
/// listener failing (which would leave it with no accept until the tick's slow part, an hour
/// here), and clients keep being served, one after another.
#[test]
fn a_refused_dontwait_flag_rearms_every_accept_that_carried_it() {
    if !takes_accept_dontwait(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
    ) {
        eprintln!("skipped: this kernel's workers accept without DONTWAIT already");
        return;
    }
    let mode = Mode {
        tick: Some(HOUR),
        idle: Some(&[HOUR]),
        refused_dontwait: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![echo_backend()], WAIT, mode) else {
        return;
    };
    for _ in 0..2 * ACCEPTS {
        relayed_client(&r);
    }
    stop(r);
}

/// A listener sent to a worker already stopping is not taken: the socket is closed, and the
/// worker's thread ends without waiting it out. A client's accept holds the worker while both
/// commands are sent, so it takes them in one turn, the stop first.
#[test]
fn a_listener_sent_after_a_stop_is_closed_not_served() {
    let Some(r) = untimed_worker() else {
        return;
    };
    let late = TcpListener::bind("127.0.0.1:0").unwrap();
    let late_addr = late.local_addr().unwrap();
    let (go, hold) = mpsc::channel();
    *r.seen.hold_accept.lock().unwrap() = Some(hold);
    let _c = client(r.addr);
    wait_until(
        || r.seen.accepts_held.load(Relaxed) > 0,
        "the client reaches the host",
    );
    assert!(r.handle.send(Command::Stop));
    assert!(r.handle.send(Command::Listen {
        id: 1,
        socket: late,
        with: (),
    }));
    drop(go);
    thread_ends(r);
    let refused = TcpStream::connect(late_addr).map_err(|e| e.kind());
    assert_eq!(
        refused.err(),
        Some(io::ErrorKind::ConnectionRefused),
        "nothing listens on {late_addr}"
    );
}

/// A connection whose backend was cut before it connected (`Command::BackendCut` passes by those
/// still connecting) is cut as it connects, not relayed until the tick.
#[test]
fn a_connection_whose_backend_was_cut_as_it_connected_is_cut_then() {
    let Some(r) = untimed_worker() else {
        return;
    };
    r.seen.cut.store(true, Relaxed);
    // It sends nothing: a write could take the reset's error, and the read after it an EOF.
    let mut c = client(r.addr);
    ends_as_cut(r, &mut c, Outcome::BackendDown);
}

/// Unlistening closes the worker's listener (its descriptor was the only one): new clients are
/// refused; the worker then stops when told.
#[test]
fn an_unlistened_address_refuses_clients() {
    let Some(r) = worker(vec![echo_backend()], WAIT) else {
        return;
    };
    let mut c = relayed_client(&r);
    let mut b = [0u8; 1];
    assert!(r.handle.send(Command::Unlisten { id: 0 }));
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(r.addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.write_all(b"y").unwrap();
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y", "an accepted connection goes on");
    stop(r);
}

/// A listener that lives on elsewhere (here, the test's own descriptor; in an upgrade, the new
/// process's) and closes in this worker just as a client arrives: the client's wake-up went to one
/// of this worker's waits, which the close then completes without accepting. No other waiter is
/// woken, so the worker accepts it before the listener goes, and serves it.
#[test]
fn a_client_whose_wake_up_a_closing_listener_took_is_served() {
    let Some(r) = worker(vec![echo_backend()], WAIT) else {
        return;
    };
    let (go, hold) = mpsc::channel();
    *r.seen.hold_first.lock().unwrap() = Some(hold);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    assert!(r.handle.send(Command::Listen {
        id: 1,
        socket: l.try_clone().unwrap(),
        with: (),
    }));
    // The first client holds the worker inside the host (its backend connected), with the
    // listener's other places waiting for a client in the kernel.
    let mut first = client(addr);
    first.write_all(b"1").unwrap();
    let deadline = Instant::now() + WAIT;
    while r.seen.held.load(Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first client reaches the host"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The close is asked first, then the client comes: its wake-up completes one of those waits,
    // which the worker reads after the close.
    assert!(r.handle.send(Command::Unlisten { id: 1 }));
    let mut second = client(addr);
    second.write_all(b"2").unwrap();
    drop(go);
    let mut b = [0u8; 1];
    first.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"1");
    second
        .read_exact(&mut b)
        .expect("the client arriving at the close is served");
    assert_eq!(&b, b"2");
    drop(l);
    stop(r);
}

/// A listener standing in for a backend, and a check that nothing connected to it.
fn quiet_backend() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn nothing_connected(l: &TcpListener) {
    assert_eq!(
        l.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(io::ErrorKind::WouldBlock),
        "nothing reached the backend"
    );
}

/// A greeting read in two pieces is taken by the host; the backend gets the host's preface, then
/// the client's bytes that came with the greeting and after it; only the client's bytes count.
#[test]
fn a_greeting_read_in_pieces_is_replaced_by_the_preface_and_not_counted() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = l.local_addr().unwrap();
    let Some(r) = greeted_worker(vec![backend], WAIT, Some(b"HELLO\n")) else {
        return;
    };
    let mut c = client(r.addr);
    c.write_all(b"HEL").unwrap();
    // The host has seen the first piece (and said `More`) before the rest is sent.
    wait_until(
        || r.seen.preambles.load(Relaxed) >= 1,
        "the first piece read",
    );
    c.write_all(b"LO\nabc").unwrap();
    let mut b = accept_within(&l);
    b.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = [0u8; 7];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"PRE|abc");
    c.write_all(b"de").unwrap();
    let mut more = [0u8; 2];
    b.read_exact(&mut more).unwrap();
    assert_eq!(&more, b"de");
    b.write_all(b"ok").unwrap();
    c.read_exact(&mut more).unwrap();
    assert_eq!(&more, b"ok");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(b.read(&mut more).unwrap(), 0, "the client's FIN passes on");
    drop(b);
    assert_eq!(c.read(&mut more).unwrap(), 0);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (5, 2, Outcome::ClientClosed)
    );
    assert_eq!(r.seen.preambles.load(Relaxed), 2, "read in two pieces");
    assert_eq!(
        *r.seen.established.lock().unwrap(),
        [0],
        "credited once, when the preface is out"
    );
    stop(r);
}

/// The next connection to `l`, within `WAIT` (a test fails rather than waits for ever).
fn accept_within(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no connection reached the backend: {e}"),
        }
    }
}

/// Both ends of a loopback TCP connection: the one that connected, and the one accepted.
fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = client(l.local_addr().unwrap());
    let theirs = accept_within(&l);
    (ours, theirs)
}

/// A connection carried in (`Command::Adopt`) as an upgrade's old process left it: each direction
/// holding bytes it had read, the client's FIN passed on when `up_done`, the reset armed for the
/// way. Returns the client's and the backend's ends, as the test drives them, and a second
/// descriptor of the worker's client socket (to read its options; drop it before the end).
fn adopted(r: &Running, up_done: bool) -> (TcpStream, TcpStream, TcpStream) {
    let (client_end, worker_client) = socket_pair();
    let (backend_end, worker_backend) = socket_pair();
    socket2::SockRef::from(&worker_client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let watch = worker_client.try_clone().unwrap();
    if up_done {
        client_end.shutdown(Shutdown::Write).unwrap();
        worker_backend.shutdown(Shutdown::Write).unwrap();
    }
    let adopt = carried_in(worker_client.into(), worker_backend, up_done);
    assert!(r.handle.send(Command::Adopt(adopt)));
    (client_end, backend_end, watch)
}

/// What [`adopted`] sends, with `client` as it is given: 100 bytes up and 200 down sent before,
/// "up-held" (unless `up_done`) and "down-held" held, the backend's reset armed.
fn carried_in(client: OwnedFd, backend: TcpStream, up_done: bool) -> Box<Adopt<TestConn>> {
    socket2::SockRef::from(&backend)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    Box::new(Adopt {
        conn: TestConn {
            next: 1,
            errors: Vec::new(),
            wait_until: None,
        },
        client,
        backend: backend.into(),
        held: Quiesced {
            to_backend: if up_done {
                Vec::new()
            } else {
                b"up-held".to_vec()
            },
            to_client: b"down-held".to_vec(),
            up_done,
            down_done: false,
            quiet_for: Duration::ZERO,
        },
        so_far: (100, 200),
        timeouts: Timeouts {
            idle: Duration::from_secs(60),
            half_close: Duration::from_secs(60),
            stall: HOUR,
            first_byte: None,
            watched: Watched::default(),
        },
    })
}

/// A connection carried in goes on from where it stopped: what each direction held goes first and
/// whole, then what follows; the reset armed for the way is disarmed (a close would drop what the
/// socket has not sent yet), the sockets are non-blocking, and its counts cover its whole life.
#[test]
fn an_adopted_connection_sends_what_it_held_first_and_counts_its_whole_life() {
    let Some(r) = worker(vec![refusing()], WAIT) else {
        return;
    };
    let (mut c, mut b, watch) = adopted(&r, false);
    let mut got = [0u8; 9];
    b.read_exact(&mut got[..7]).unwrap();
    assert_eq!(&got[..7], b"up-held");
    let linger = socket2::SockRef::from(&watch).linger().unwrap();
    assert_eq!(linger, None, "the worker disarmed the reset");
    // A blocking socket would stall the whole worker in a splice.
    let nonblocking = socket2::SockRef::from(&watch).nonblocking().unwrap();
    assert!(nonblocking, "the worker made it non-blocking");
    drop(watch);
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"down-held");
    c.write_all(b"more").unwrap();
    b.read_exact(&mut got[..4]).unwrap();
    assert_eq!(&got[..4], b"more");
    b.write_all(b"back").unwrap();
    c.read_exact(&mut got[..4]).unwrap();
    assert_eq!(&got[..4], b"back");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_some(&mut b, &mut got).unwrap(),
        0,
        "the client's FIN passes on"
    );
    drop(b);
    assert_eq!(read_some(&mut c, &mut got).unwrap(), 0);
    let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (100 + 7 + 4, 200 + 9 + 4, Outcome::ClientClosed)
    );
    assert_eq!(r.handle.counts().adopted.load(Relaxed), 1);
    stop(r);
}

/// A connection carried in whose backend was cut on its way (`Command::BackendCut` may come
/// before it) is cut as it is adopted, not relayed until the tick (an hour here): nothing it held
/// is sent, and both sides see a reset.
#[test]
fn an_adopted_connection_whose_backend_was_cut_is_cut_then() {
    let mode = Mode {
        tick: Some(HOUR),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![refusing()], WAIT, mode) else {
        return;
    };
    r.seen.cut.store(true, Relaxed);
    let (mut c, mut b, watch) = adopted(&r, false);
    // The worker's close resets the socket only if it holds the last descriptor.
    drop(watch);
    adopted_ends_as_cut(r, Outcome::BackendDown, [&mut c, &mut b]);
}

/// Waits for `r`'s adopted connection (see [`carried_in`]) to end as cut, with `end` and nothing
/// of what it held sent, and for each of `sides` to see a reset; then stops `r`.
fn adopted_ends_as_cut<const N: usize>(r: Running, end: Outcome, sides: [&mut TcpStream; N]) {
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!((f.end, f.bytes_up, f.bytes_down), (end, 100, 200));
    for s in sides {
        let e = read_some(s, &mut [0u8; 16]).expect_err("a reset, not what it held");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
    stop(r);
}

/// A connection carried in whose reset armed for the way cannot be disarmed (its client here is
/// a file, where no socket option can be set) is cut, its backend reset, and nothing it held is
/// sent: relayed, its close would reset the client and drop whatever was sent to it last.
#[test]
fn an_adopted_connection_whose_linger_cannot_be_cleared_is_cut() {
    let Some(r) = worker(vec![refusing()], WAIT) else {
        return;
    };
    let (mut b, worker_backend) = socket_pair();
    let not_a_socket = std::fs::File::open("/dev/null").unwrap();
    let adopt = carried_in(not_a_socket.into(), worker_backend, false);
    assert!(r.handle.send(Command::Adopt(adopt)));
    adopted_ends_as_cut(r, Outcome::ClientReset, [&mut b]);
}

/// Carried in half-closed (the client's FIN read and passed on there): the worker reads nothing
/// more from the client and relays the backend's side to its end, which ends the connection as
/// the client's close.
#[test]
fn an_adopted_half_closed_connection_relays_the_other_way_to_its_end() {
    let Some(r) = worker(vec![refusing()], WAIT) else {
        return;
    };
    let (mut c, mut b, watch) = adopted(&r, true);
    drop(watch);
    let mut got = [0u8; 9];
    assert_eq!(
        read_some(&mut b, &mut got).unwrap(),
        0,
        "the FIN passed on there"
    );
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"down-held");
    b.write_all(b"tail").unwrap();
    drop(b);
    c.read_exact(&mut got[..4]).unwrap();
    assert_eq!(&got[..4], b"tail");
    assert_eq!(read_some(&mut c, &mut got).unwrap(), 0);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (100, 200 + 9 + 4, Outcome::ClientClosed)
    );
    stop(r);
}

/// A backend that takes the connection and resets it before the preface goes: the preface and the
/// client's bytes go to the next target instead, whole, and the client never knows. Only the
/// second attempt is credited to its backend's health.
#[test]
fn a_preface_that_cannot_be_sent_goes_to_the_next_target() {
    let resets = TcpListener::bind("127.0.0.1:0").unwrap();
    let first = resets.local_addr().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let next = l.local_addr().unwrap();
    let Some(r) = greeted_worker(vec![first, next], WAIT, Some(b"HELLO\n")) else {
        return;
    };
    let (reset_tx, reset_rx) = mpsc::channel();
    *r.seen.hold_first.lock().unwrap() = Some(reset_rx);
    let resetter = std::thread::spawn(move || {
        let s = accept_within(&resets);
        // Linger 0: the close sends a reset, which the worker's socket has before it sends.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        reset_tx.send(()).unwrap();
    });
    let mut c = client(r.addr);
    c.write_all(b"HELLO\nabc").unwrap();
    let mut b = accept_within(&l);
    let mut got = [0u8; 7];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"PRE|abc", "the next target gets all of it");
    b.write_all(b"ok").unwrap();
    let mut more = [0u8; 2];
    c.read_exact(&mut more).unwrap();
    assert_eq!(&more, b"ok");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_some(&mut b, &mut more).unwrap(),
        0,
        "the client's FIN passes on"
    );
    drop(b);
    assert_eq!(read_some(&mut c, &mut more).unwrap(), 0);
    let (f, errors) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert!(
        matches!(
            errors[..],
            [io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe]
        ),
        "{errors:?}"
    );
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (3, 2, Outcome::ClientClosed)
    );
    assert_eq!(
        *r.seen.established.lock().unwrap(),
        [1],
        "the first target took the connection, not the preface: only the second is credited"
    );
    assert_eq!(
        *r.seen.relaying.lock().unwrap(),
        [1],
        "the connection is the second target's alone"
    );
    resetter.join().unwrap();
    stop(r);
}

/// A client that never finishes its greeting ends at the limit; one that sends something else, or
/// closes before the end of it, is refused at once; none reaches the backend.
#[test]
fn a_late_wrong_or_unfinished_greeting_is_refused_before_any_connect() {
    let (l, backend) = quiet_backend();
    let Some(r) = greeted_worker(vec![backend], WAIT, Some(b"HELLO\n")) else {
        return;
    };
    let mut silent = client(r.addr);
    silent.write_all(b"HE").unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the silent one ends");
    assert_eq!((f.bytes_up, f.end), (0, Outcome::IdleTimeout));
    assert!(closed(&mut silent), "closed");

    let mut wrong = client(r.addr);
    wrong.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the wrong one ends");
    assert_eq!((f.bytes_up, f.end), (0, Outcome::ProxyHeader));
    assert!(closed(&mut wrong), "closed");

    let mut gone = client(r.addr);
    gone.write_all(b"HELL").unwrap();
    gone.shutdown(Shutdown::Write).unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the unfinished one ends");
    assert_eq!(f.end, Outcome::ProxyHeader);
    nothing_connected(&l);
    stop(r);
}

/// A host that asks for more than the room it set is refused when the room is full: a client
/// cannot make the worker read forever.
#[test]
fn a_greeting_longer_than_its_room_is_refused_when_the_room_is_full() {
    const LONG: &[u8] = b"0123456789abcdefghijklmnop";
    assert!(LONG.len() > GREETING_ROOM);
    let (l, backend) = quiet_backend();
    let Some(r) = greeted_worker(vec![backend], WAIT, Some(LONG)) else {
        return;
    };
    let mut c = client(r.addr);
    c.write_all(LONG).unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!(f.end, Outcome::ProxyHeader);
    assert!(closed(&mut c), "closed");
    nothing_connected(&l);
    stop(r);
}

#[test]
fn accept_dontwait_is_taken_from_linux_6_10() {
    for (release, takes) in [
        ("6.18.44-fc-v657", true),
        ("6.10.0", true),
        ("7.0.1-arch1", true),
        ("6.9.12-200.fc40.x86_64", false),
        ("5.15.0-1051-azure", false),
        ("6", false),
        ("", false),
        ("linux", false),
    ] {
        assert_eq!(takes_accept_dontwait(release), takes, "{release}");
    }
}

/// The flag set through `with_ioprio` reaches the kernel: an accept on a listener nobody connects
/// to completes at once with EAGAIN (without it, it would wait for a client).
#[test]
fn an_accept_with_dontwait_on_an_idle_listener_completes_with_eagain() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if crate::relay::uring::missing_in_test() || !takes_accept_dontwait(release.trim()) {
        eprintln!("skipped: this kernel has no IORING_ACCEPT_DONTWAIT");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ring = IoUring::new(8).unwrap();
    let e = opcode::Accept::new(
        types::Fd(l.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(42);
    let e = with_ioprio(e, ACCEPT_DONTWAIT);
    assert_eq!(
        (e.get_opcode(), e.get_user_data()),
        (u32::from(opcode::Accept::CODE), 42),
        "only ioprio changed"
    );
    // SAFETY: the entry points to nothing; the listener outlives the ring's use of it below.
    unsafe { ring.submission().push(&e).unwrap() };
    ring.submit().unwrap();
    let deadline = Instant::now() + WAIT;
    let res = loop {
        if let Some(c) = ring.completion().next() {
            break c.result();
        }
        assert!(Instant::now() < deadline, "the accept waited for a client");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(res, -libc::EAGAIN);
}

/// Polls `cond` every millisecond until it holds; fails after `WAIT`.
fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A host that keeps answering `More` is refused once the client closes or the limit passes:
/// nothing more can come, so the worker does not read again.
#[test]
fn a_host_that_never_decides_is_refused_when_nothing_more_can_come() {
    let (l, backend) = quiet_backend();
    let mode = Mode {
        greeting: Some(b"HELLO\n"),
        undecided: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![backend], WAIT, mode) else {
        return;
    };
    let mut gone = client(r.addr);
    gone.write_all(b"HE").unwrap();
    gone.shutdown(Shutdown::Write).unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the closed one ends");
    assert_eq!(f.end, Outcome::ProxyHeader);
    let _silent = client(r.addr);
    let (f, _) = r
        .ended
        .recv_timeout(WAIT)
        .expect("the silent one ends at the limit");
    assert_eq!(f.end, Outcome::ProxyHeader);
    nothing_connected(&l);
    stop(r);
}

/// A connection given no target waits, with nothing in the kernel, and asks again on every
/// `Command::Freed`: a thousand of them make a thousand retries well before the 250 ms tick could
/// (it would take four minutes); then, given a target, it is relayed.
#[test]
fn a_waiting_connection_asks_again_on_every_freed_slot() {
    const ASKS: u64 = 1000;
    let mode = Mode {
        wait_for_retries: Some(ASKS),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![echo_backend()], WAIT, mode) else {
        return;
    };
    let mut c = client(r.addr);
    c.write_all(b"queued").unwrap();
    wait_until(
        || r.handle.counts().accepted.load(Relaxed) == 1,
        "the client accepted",
    );
    for _ in 0..ASKS {
        assert!(r.handle.send(Command::Freed));
    }
    let mut got = [0u8; 6];
    c.read_exact(&mut got).expect("relayed once a target came");
    assert_eq!(&got, b"queued");
    assert!(r.seen.retries.load(Relaxed) >= ASKS);
    stop(r);
}

/// A waiting connection's wait ends at its deadline (`Host::wait_left`), not at the next tick,
/// even when it began after a longer wait had its timeout armed, and while short ticks come: with
/// the tick stretched to an hour and no slot ever freed, the first client's 30-minute wait has its
/// timeout armed, and its 200 ms idle timeout brings a tick every 50 ms (which retries no waits);
/// only a timeout armed for the second client's 50 ms can end that one's wait, and it does, as the
/// host says (`BackendsFull`), with nothing sent to a backend, while the first client waits on.
#[test]
fn a_wait_ends_at_its_deadline_without_the_tick() {
    const WAITS: &[Duration] = &[Duration::from_secs(1800), Duration::from_millis(50)];
    const IDLE: &[Duration] = &[Duration::from_millis(200), Duration::from_secs(4 * 3600)];
    let mode = Mode {
        wait_for_retries: Some(u64::MAX),
        wait_until: Some(WAITS),
        idle: Some(IDLE),
        tick: Some(Duration::from_secs(3600)),
        ..Mode::default()
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, mode) else {
        return;
    };
    let mut first = client(r.addr);
    first.write_all(b"waits").unwrap();
    wait_until(
        || r.seen.accepted.load(Relaxed) == 1,
        "the first client admitted",
    );
    let mut second = client(r.addr);
    second.write_all(b"queued").unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("a wait ended");
    assert_eq!(f.end, Outcome::BackendsFull);
    assert_eq!(f.bytes_up, 0);
    assert_eq!(r.seen.accepted.load(Relaxed), 2);
    assert!(r.ended.try_recv().is_err(), "the first client still waits");
    nothing_connected(&l);
    stop(r);
}

/// The tick a connection needs: a quarter of the timeout that applies (idle, or half-close once a
/// side has shut), between 5 ms and the worker's.
#[test]
fn tick_for_is_a_quarter_of_the_timeout_that_applies_within_bounds() {
    let ms = Duration::from_millis;
    let t = |idle, half_close| Timeouts {
        idle: ms(idle),
        half_close: ms(half_close),
        stall: HOUR,
        first_byte: None,
        watched: Watched::default(),
    };
    assert_eq!(tick_for(&t(60_000, 60_000), false, TICK), TICK);
    assert_eq!(tick_for(&t(1_000, 60_000), false, TICK), TICK);
    assert_eq!(tick_for(&t(400, 60_000), false, TICK), ms(100));
    assert_eq!(tick_for(&t(400, 60_000), true, TICK), TICK);
    assert_eq!(tick_for(&t(60_000, 200), false, TICK), TICK);
    assert_eq!(tick_for(&t(60_000, 200), true, TICK), ms(50));
    assert_eq!(tick_for(&t(1, 60_000), false, TICK), MIN_TICK);
    assert_eq!(tick_for(&t(400, 400), false, ms(20)), ms(20));
    // A short `first_byte_timeout` is looked at as often as a short idle timeout.
    let first_byte = Timeouts {
        first_byte: Some(ms(400)),
        ..t(60_000, 60_000)
    };
    assert_eq!(tick_for(&first_byte, false, TICK), ms(100));
    let stalls = Timeouts {
        stall: ms(400),
        ..t(60_000, 60_000)
    };
    assert_eq!(
        tick_for(&stalls, false, TICK),
        ms(100),
        "a short stall timeout is looked at as often"
    );
    assert_eq!(tick_for(&stalls, true, TICK), ms(100));
}

/// The cap is `CAP` while at least half the pool is free, never grows as the pool empties, and is
/// never below 1. Directions whose destinations never read, each filled to the cap of its time,
/// cannot dry the pool before more than twice as many as at a fixed cap (128) hold some of it.
#[test]
fn the_cap_is_full_while_half_the_pool_is_free_and_shrinks_to_one_as_it_empties() {
    let total = usize::from(POOL_BUFS);
    assert_eq!(cap_for(total, total), CAP);
    assert_eq!(cap_for(total / 2, total), CAP);
    assert_eq!(cap_for(total / 4, total), CAP / 2);
    assert_eq!(cap_for(total / 16, total), 1);
    assert_eq!(cap_for(0, total), 1);
    assert_eq!(cap_for(0, 0), 1, "no pool: one at a time");
    for free in 1..=total {
        assert!(
            cap_for(free - 1, total) <= cap_for(free, total),
            "at {free}"
        );
    }
    let (mut free, mut directions) = (total, 0);
    while free > 0 {
        directions += 1;
        let mut held = 0;
        while free > 0 {
            free -= 1;
            held += 1;
            if held >= cap_for(free, total) {
                break;
            }
        }
    }
    assert!(
        directions > 2 * total / CAP,
        "{directions} directions that never send dry the pool"
    );
}

/// `stall_timeout` runs from the first byte that waits for a destination that took none since,
/// again from each byte it takes while more wait, and not at all while nothing waits.
#[test]
fn a_stall_is_measured_from_when_the_destination_last_took_a_byte_with_bytes_waiting() {
    let ms = Duration::from_millis;
    let limit = ms(100);
    let t0 = Instant::now();
    let mut d = Dir::default();
    assert!(!stalled(&d, limit, t0 + HOUR), "nothing waits");
    d.bytes_wait(t0);
    d.bytes_wait(t0 + ms(50));
    assert!(!stalled(&d, limit, t0 + ms(99)));
    assert!(
        stalled(&d, limit, t0 + ms(100)),
        "from the first byte that waited"
    );
    d.bytes_taken(t0 + ms(90), true);
    assert!(
        !stalled(&d, limit, t0 + ms(189)),
        "a byte taken restarts it"
    );
    assert!(stalled(&d, limit, t0 + ms(190)));
    d.bytes_taken(t0 + ms(200), false);
    assert!(!stalled(&d, limit, t0 + HOUR), "all taken: nothing waits");
}

/// A suspected stall (`stalled`) is cut only when the destination's peer acknowledged no byte
/// since the last suspicion: a slow reader's peer acknowledges more each time, and its wait is
/// measured again; where the kernel does not say, the suspicion stands.
#[test]
fn a_suspected_stall_is_cut_only_when_the_peer_acknowledged_nothing_since() {
    let ms = Duration::from_millis;
    let limit = ms(100);
    let t0 = Instant::now();
    let mut d = Dir::default();
    d.bytes_wait(t0);
    assert!(stalled(&d, limit, t0 + limit));
    assert!(
        !stall_verdict(&mut d, Some(5_000), t0 + limit),
        "the first suspicion only notes the count"
    );
    assert!(
        !stalled(&d, limit, t0 + ms(199)),
        "measured again from then"
    );
    assert!(stalled(&d, limit, t0 + ms(200)));
    assert!(
        !stall_verdict(&mut d, Some(9_000), t0 + ms(200)),
        "more acknowledged: a slow reader"
    );
    assert!(stalled(&d, limit, t0 + ms(300)));
    assert!(
        stall_verdict(&mut d, Some(9_000), t0 + ms(300)),
        "nothing acknowledged for a whole timeout"
    );
    let mut unknown = Dir::default();
    unknown.bytes_wait(t0);
    assert!(stall_verdict(&mut unknown, None, t0 + limit));
}

/// reliability.md `ring-stall`: a download whose client reads nothing (its socket takes a few KiB)
/// while its backend trickles 1,000 bytes every 20 ms is cut at twice `stall_timeout` (300 ms
/// here: suspected, then confirmed by its peer acknowledging nothing more):
/// `StallTimeout`, the client reset, the backend's writes failing. Another download through the
/// same worker, whose client reads every byte as it comes, goes on.
#[test]
fn a_destination_that_takes_nothing_for_the_stall_timeout_is_cut_and_one_that_reads_is_not() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mode = Mode {
        stall: Some(Duration::from_millis(300)),
        tight_client: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, mode) else {
        return;
    };
    let (mut stalled_c, mut stalled_b) = tight_client(&r, &l);
    let mut reading = client(r.addr);
    let mut reading_b = accept_within(&l);
    let trickle = std::thread::spawn(move || {
        // Bounded: 1,000 rounds of 20 ms (20 s), far past the timeout.
        for _ in 0..1_000 {
            if let Err(e) = stalled_b.write_all(&[7u8; 1000]) {
                return Some(e.kind());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });
    let mut rounds = 0;
    let ended = loop {
        assert!(rounds < 1_000, "the stalled download was never cut");
        reading_b.write_all(&[9u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        reading
            .read_exact(&mut got)
            .expect("the download whose client reads goes on");
        rounds += 1;
        if let Ok((f, _)) = r.ended.try_recv() {
            break f;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ended.end, Outcome::StallTimeout);
    let mut sink = Vec::new();
    let e = stalled_c
        .read_to_end(&mut sink)
        .expect_err("the stalled client is reset, not sent a FIN");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    let failed = trickle.join().unwrap();
    assert!(
        matches!(
            failed,
            Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        ),
        "the backend is reset: {failed:?}"
    );
    // The one that reads is still relayed, and still open.
    reading_b.write_all(b"more").unwrap();
    let mut got = [0u8; 4];
    reading.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"more");
    assert!(r.ended.try_recv().is_err(), "only the stalled one ended");
    stop(r);
}

/// A connection's short idle timeout is looked at often enough to end it on time (`tick_for`),
/// even when the tick was armed for longer before it came: with the tick stretched to an hour, a
/// first client idle for 4 h keeps the hour-long tick armed, and a second one, idle for 200 ms,
/// still ends (`IdleTimeout`), while the first goes on.
#[test]
fn a_short_idle_timeout_is_looked_at_sooner_than_the_tick() {
    const IDLE: &[Duration] = &[Duration::from_secs(4 * 3600), Duration::from_millis(200)];
    let mode = Mode {
        idle: Some(IDLE),
        tick: Some(Duration::from_secs(3600)),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![echo_backend()], WAIT, mode) else {
        return;
    };
    // Each relayed once, so that the first is admitted (its tick armed) before the second.
    let mut clients = Vec::new();
    for said in [&b"first"[..], b"idle"] {
        let mut c = client(r.addr);
        c.write_all(said).unwrap();
        let mut got = vec![0u8; said.len()];
        c.read_exact(&mut got).expect("relayed");
        clients.push(c);
    }
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the idle one ended");
    assert_eq!(f.end, Outcome::IdleTimeout);
    assert_eq!(f.bytes_up, 4, "the second client's");
    assert!(r.ended.try_recv().is_err(), "the first goes on");
    stop(r);
}

/// Writes the `byte` pattern to `c` without blocking until the worker stops taking it: the client's
/// socket has been full for 100 ms in a row, so the worker holds bytes it cannot send (its buffers
/// at the cap, or its pipe full) and has stopped receiving. How many bytes went.
fn upload_until_stalled(c: &mut TcpStream) -> u64 {
    c.set_nonblocking(true).unwrap();
    let mut i = 0u64;
    let mut full_for = 0;
    let deadline = Instant::now() + WAIT;
    while full_for < 5 {
        assert!(Instant::now() < deadline, "the upload never stalled");
        let block: Vec<u8> = (i..i + (64 << 10)).map(byte).collect();
        match c.write(&block) {
            Ok(n) => {
                i += n as u64;
                full_for = 0;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                full_for += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("upload: {e}"),
        }
    }
    c.set_nonblocking(false).unwrap();
    i
}

/// Writes the `byte` pattern from byte `from` up to `total` to `s`, then its FIN.
fn write_pattern_from(s: &mut TcpStream, from: u64, total: u64) {
    let mut i = from;
    while i < total {
        let block: Vec<u8> = (i..total.min(i + (64 << 10))).map(byte).collect();
        s.write_all(&block)
            .expect("the rest of the pattern is written");
        i += block.len() as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// A worker in `mode` whose one connection uploads to a backend that does not read until the
/// worker holds some of it (at the cap, or in its pipe) and has stopped receiving, then is sent
/// `Command::Carry`; the upload goes on behind (as much again, then its FIN). The worker, the
/// backend's end, the writer (which gives the client back) and the upload's total.
fn carry_a_stalled_upload(mode: Mode) -> Option<(Running, TcpStream, JoinHandle<TcpStream>, u64)> {
    let (r, mut c, b) = one_connection(mode)?;
    let sent = upload_until_stalled(&mut c);
    // As much again after the stall (however much the socket buffers took before it).
    let total = sent + (4 << 20);
    let writer = std::thread::spawn(move || {
        write_pattern_from(&mut c, sent, total);
        c
    });
    assert!(r.handle.send(Command::Carry));
    Some((r, b, writer, total))
}

/// Goes on with one direction of a carried connection as the process it went to would: what was
/// held first, then everything `from` gives, to its FIN, passed on. How many bytes came from `from`.
fn relay_on(from: OwnedFd, to: OwnedFd, held: &[u8]) -> u64 {
    let (mut from, mut to) = (TcpStream::from(from), TcpStream::from(to));
    for s in [&from, &to] {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
    }
    to.write_all(held).unwrap();
    let rest = std::io::copy(&mut from, &mut to).expect("the rest of the direction");
    to.shutdown(Shutdown::Write).unwrap();
    rest
}

/// A stalled upload carried: the host gets both sockets and what was held. The test relays on as
/// a new process would, what was held first and then the rest, and the backend must read the
/// whole pattern once, in order.
fn carried_mid_upload(mode: Mode) {
    let mode = Mode {
        carries: true,
        ..mode
    };
    let Some((r, mut b, writer, total)) = carry_a_stalled_upload(mode) else {
        return;
    };
    let counts = r.handle.counts();
    let q = r
        .carried
        .recv_timeout(WAIT)
        .expect("the connection is carried");
    assert_eq!(counts.carried.load(Relaxed), 1);
    assert_eq!(counts.open.load(Relaxed), 0, "it left the worker");
    assert!(!q.held.up_done && !q.held.down_done, "{:?}", q.held);
    assert!(q.held.to_client.is_empty());
    // The stalled upload's last bytes were held (at the cap, or in the pipe): they go along.
    assert!(!q.held.to_backend.is_empty());
    wait_until(|| r.pipes.lent() == 0, "the pipe back in the pool");
    assert_eq!(
        q.bytes_down, 0,
        "nothing went to the client: {}",
        q.bytes_down
    );
    let reader = std::thread::spawn(move || read_pattern(&mut b));
    relay_on(q.client, q.backend, &q.held.to_backend);
    assert_eq!(reader.join().unwrap(), total, "every byte, once, in order");
    drop(writer.join().unwrap());
    assert!(
        r.ended.try_recv().is_err(),
        "a carried connection does not end here"
    );
    stop(r);
}

#[test]
fn a_carried_connection_takes_along_the_buffers_it_held() {
    carried_mid_upload(Mode {
        copy_only: true,
        ..Mode::default()
    });
}

#[test]
fn a_carried_connection_takes_along_what_its_pipe_held() {
    carried_mid_upload(Mode::default());
}

/// A stalled upload whose pipe cannot be read back when it is carried: the bytes in it cannot go
/// along, so nothing goes. The connection ends here as broken, and both sides see a reset, as
/// neither may take what it got for the whole stream.
#[test]
fn a_carried_connection_whose_pipe_cannot_be_read_resets_both_sides() {
    let mode = Mode {
        carries: true,
        broken_pipe_reads: true,
        ..Mode::default()
    };
    let Some((r, mut c, mut b)) = one_connection(mode) else {
        return;
    };
    upload_until_stalled(&mut c);
    assert!(r.handle.send(Command::Carry));
    let (f, _) = r
        .ended
        .recv_timeout(WAIT)
        .expect("the connection ends here");
    assert_eq!(f.end, Outcome::BackendReset);
    let why = f.broken.as_ref().and_then(io::Error::raw_os_error);
    assert_eq!(why, Some(libc::EIO), "the pipe's read failed");
    assert!(r.carried.try_recv().is_err(), "nothing is carried");
    assert_eq!(r.handle.counts().carried.load(Relaxed), 0);
    for s in [&mut b, &mut c] {
        let mut buf = vec![0u8; 64 << 10];
        let e = loop {
            match read_some(s, &mut buf) {
                Ok(n) => assert!(n > 0, "a reset, not a FIN"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }
    stop(r);
}

/// `Command::Carry` with nothing to take carried connections: each stops at a quiet point and goes
/// on where it stopped (held buffers sent, pipe drained, receives armed again), losing nothing.
fn not_carried_after_all(mode: Mode) {
    let Some((r, mut b, writer, total)) = carry_a_stalled_upload(mode) else {
        return;
    };
    let counts = r.handle.counts();
    wait_until(
        || r.seen.carriers.load(Relaxed) > 0,
        "the connection quiet, and nothing to take it",
    );
    assert_eq!(read_pattern(&mut b), total, "every byte, once, in order");
    let mut c = writer.join().unwrap();
    b.write_all(b"and back").unwrap();
    drop(b);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"and back");
    let (f, _) = r
        .ended
        .recv_timeout(WAIT)
        .expect("the connection ends here");
    assert_eq!((f.bytes_up, f.bytes_down), (total, 8));
    assert_eq!(f.end, Outcome::ClientClosed);
    assert_eq!(counts.carried.load(Relaxed), 0);
    stop(r);
}

#[test]
fn a_connection_nothing_takes_goes_on_from_its_held_buffers() {
    not_carried_after_all(Mode {
        copy_only: true,
        ..Mode::default()
    });
}

#[test]
fn a_connection_nothing_takes_goes_on_from_its_pipe() {
    not_carried_after_all(Mode::default());
}

/// What carrying a direction that has read its FIN with bytes before it still held leans on: the
/// process it goes to reads the FIN again once it has sent them.
#[test]
fn a_socket_that_has_read_its_fin_reads_it_again() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let mut s = accept_within(&l);
    s.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"last words").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    let mut buf = [0u8; 8];
    assert_eq!(read_some(&mut s, &mut buf).unwrap(), 0, "the FIN, again");
}

/// `s`'s TCP_INFO.
fn tcp_info(s: &TcpStream) -> libc::tcp_info {
    tcp_info_fd(s.as_raw_fd()).unwrap()
}

/// Whether the kernel has seen `s`'s FIN acknowledged, so the peer's kernel holds every byte `s`
/// sent, and its FIN: `s` is in FIN_WAIT2 after closing first, CLOSE after closing second (also
/// after a reset, which these tests would see otherwise).
fn fin_acked(s: &TcpStream) -> bool {
    let info = tcp_info(s);
    // FIN_WAIT2 and CLOSE in include/net/tcp_states.h (libc does not name the states).
    matches!(info.tcpi_state, 5 | 7)
}

/// A copy-only worker that carries, whose socket to each client sends through a few KiB
/// (`Mode::tight_client`), and one connection through it: its client, which receives through a
/// few KiB too (`tight_client`), and its backend, a socket of the test's. `None` where the ring is
/// unavailable.
fn tight_carrying_connection() -> Option<(Running, TcpStream, TcpStream)> {
    let mode = Mode {
        copy_only: true,
        carries: true,
        tight_client: true,
        ..Mode::default()
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = worker_with(vec![l.local_addr().unwrap()], WAIT, mode)?;
    let (c, b) = tight_client(&r, &l);
    Some((r, c, b))
}

/// A direction that has read its FIN with bytes before it still held, for a client that does not
/// read, is carried as not ended: the FIN is not passed on ahead of those bytes, and the host gets
/// them to send first. The process it goes to meets the FIN again (see the test above).
#[test]
fn a_fin_read_behind_held_bytes_is_carried_as_not_ended() {
    const TOTAL: u64 = 64 << 10;
    // The client reads nothing until the end, through the smallest receive buffer: with the
    // worker's own tight send buffer, a few KiB of the download fit in the kernel and the rest
    // (a few pool buffers, fewer than the cap: the receive stays armed) is held.
    let Some((r, mut c, mut b)) = tight_carrying_connection() else {
        return;
    };
    write_pattern(&mut b, TOTAL);
    // The worker's kernel has the whole download and its FIN. The FIN's completion is queued
    // before the wake-up `Carry` sends (the ring runs both as the worker asks: DEFER_TASKRUN), and
    // the worker takes its completions in order: it has read the FIN when it takes the command.
    wait_until(|| fin_acked(&b), "the backend's FIN acknowledged");
    assert!(r.handle.send(Command::Carry));
    let q = r
        .carried
        .recv_timeout(WAIT)
        .expect("the connection is carried");
    let held = q.held.to_client.len();
    assert!(
        !q.held.down_done,
        "the FIN passed on ahead of {held} held bytes"
    );
    assert!(!q.held.up_done);
    assert!(held > 0, "bytes before the FIN held");
    assert_eq!(q.bytes_down + held as u64, TOTAL);
    // The test goes on as the process it went to: what was held first, then the backend's socket,
    // which gives nothing more but its FIN, passed on.
    let reader = std::thread::spawn(move || read_pattern(&mut c));
    assert_eq!(
        relay_on(q.backend, q.client, &q.held.to_client),
        0,
        "the FIN again"
    );
    assert_eq!(reader.join().unwrap(), TOTAL, "every byte, once, in order");
    assert!(r.ended.try_recv().is_err(), "it does not end here");
    drop(b);
    stop(r);
}

/// Whether the kernel lists a TCP socket from `local` to `peer` (IPv4) in /proc/net/tcp: one a
/// reset has closed is no longer listed, though a descriptor still holds it.
fn listed(local: SocketAddr, peer: SocketAddr) -> bool {
    tcp_row(local, peer).is_some()
}

/// The bytes the kernel holds unread for the TCP socket from `local` to `peer` (IPv4).
fn unread(local: SocketAddr, peer: SocketAddr) -> u64 {
    // "tx_queue:rx_queue", in hex.
    let row = tcp_row(local, peer).unwrap_or_default();
    let queues = row.get(3).map_or("", String::as_str);
    let rx = queues.split(':').nth(1).unwrap_or("0");
    u64::from_str_radix(rx, 16).unwrap()
}

/// The /proc/net/tcp fields after the row's number of the TCP socket from `local` to `peer`
/// (IPv4), if the kernel lists it.
fn tcp_row(local: SocketAddr, peer: SocketAddr) -> Option<Vec<String>> {
    // As the kernel writes them: the address as a 32-bit word in host order, the port, in hex.
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v.ip().octets()),
            v.port()
        ),
        SocketAddr::V6(_) => unreachable!("the tests' sockets are IPv4"),
    };
    let want = [hex(local), hex(peer)];
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().find_map(|l| {
        let row: Vec<String> = l.split_whitespace().skip(1).map(String::from).collect();
        (row.len() > 2 && row[..2] == want).then_some(row)
    })
}

/// The client's FIN read while its connection stops to be carried, the download already ended: it
/// is passed on once the connection is quiet, and with both ways ended the connection ends here
/// instead of going. When the backend has reset meanwhile (nothing of the worker's was waiting on
/// its socket to see it), passing it on fails: the connection ends here as broken. (The client,
/// both of whose ways have ended, has nothing left that a reset could take back.)
fn fin_while_stopping(backend_reset: bool) {
    let mode = Mode {
        carries: true,
        ..Mode::default()
    };
    let Some((r, mut c, mut b)) = one_connection(mode) else {
        return;
    };
    b.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        read_some(&mut c, &mut buf).unwrap(),
        0,
        "the download's FIN"
    );
    let (go, wait) = mpsc::channel();
    *r.seen.pause.lock().unwrap() = Some(wait);
    wait_until(
        || r.seen.paused.load(Relaxed) > 0,
        "the worker paused in its tick",
    );
    // In this order while it is paused: `Carry`'s wake-up, then the client's FIN (and the
    // backend's reset). Going on, the worker starts the stop, then reads the FIN. (Were the FIN
    // read first, it would be passed on at once and the connection end the same way: that the
    // stop's own FIN was tested shows in the mutants that drop it, which fail both tests.)
    assert!(r.handle.send(Command::Carry));
    c.shutdown(Shutdown::Write).unwrap();
    wait_until(|| fin_acked(&c), "the client's FIN acknowledged");
    if backend_reset {
        let (ours, theirs) = (b.peer_addr().unwrap(), b.local_addr().unwrap());
        assert!(listed(ours, theirs), "the worker's backend socket, listed");
        socket2::SockRef::from(&b)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(b);
        wait_until(
            || !listed(ours, theirs),
            "the worker's backend socket reset",
        );
        go.send(()).unwrap();
        let (f, _) = r.ended.recv_timeout(WAIT).expect("it ends here");
        assert_eq!(f.end, Outcome::BackendReset);
        let why = f.broken.as_ref().map(io::Error::kind);
        assert_eq!(
            why,
            Some(io::ErrorKind::NotConnected),
            "the FIN could not go"
        );
    } else {
        go.send(()).unwrap();
        let (f, _) = r.ended.recv_timeout(WAIT).expect("it ends here");
        assert_eq!(
            f.end,
            Outcome::BackendClosed,
            "the backend's FIN came first"
        );
        assert_eq!(read_some(&mut b, &mut buf).unwrap(), 0, "the client's FIN");
    }
    assert!(r.carried.try_recv().is_err(), "nothing is carried");
    assert_eq!(r.handle.counts().carried.load(Relaxed), 0);
    stop(r);
}

#[test]
fn a_fin_read_while_stopping_is_passed_on_and_the_connection_ends_here() {
    fin_while_stopping(false);
}

#[test]
fn a_backend_reset_while_stopping_ends_the_connection_here_as_broken() {
    fin_while_stopping(true);
}

/// The worker paused in its next tick: what goes on sent on the returned channel (or dropped).
fn pause_in_tick(r: &Running) -> mpsc::Sender<()> {
    let (go, wait) = mpsc::channel();
    let before = r.seen.paused.load(Relaxed);
    *r.seen.pause.lock().unwrap() = Some(wait);
    wait_until(
        || r.seen.paused.load(Relaxed) > before,
        "the worker paused in its tick",
    );
    go
}

/// A send that fails while its connection stops to be carried ends the connection here, as a
/// failed receive does: the send took the socket's error, so the process it went to would read a
/// clean EOF where the client had reset, and pass on a FIN. The client has half-closed (nothing
/// of the worker's receives from it) and does not read the download: the worker's send to it
/// waits for room, and only that wait sees its reset. The reset's completion comes before
/// `Carry`'s wake-up, so the send goes out behind the stop's cancellations and fails.
#[test]
fn a_send_that_fails_while_stopping_ends_the_connection_here_as_broken() {
    const TOTAL: u64 = 64 << 10;
    let Some((r, c, mut b)) = tight_carrying_connection() else {
        return;
    };
    c.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(read_some(&mut b, &mut buf).unwrap(), 0, "the client's FIN");
    let download: Vec<u8> = (0..TOTAL).map(byte).collect();
    b.write_all(&download).unwrap();
    let (ours, theirs) = (b.peer_addr().unwrap(), b.local_addr().unwrap());
    wait_until(
        || listed(ours, theirs) && unread(ours, theirs) == 0,
        "the download in the worker",
    );
    // A tick goes by: the worker has taken what it read, and its send to the client waits for
    // room, before it pauses in the next one.
    drop(pause_in_tick(&r));
    let go = pause_in_tick(&r);
    let (ours, theirs) = (c.peer_addr().unwrap(), c.local_addr().unwrap());
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    wait_until(|| !listed(ours, theirs), "the worker's client socket reset");
    assert!(r.handle.send(Command::Carry));
    go.send(()).unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("it ends here");
    assert_eq!(f.end, Outcome::ClientReset);
    assert!(f.broken.is_some(), "the failed send, said: {f:?}");
    assert!(r.carried.try_recv().is_err(), "nothing is carried");
    assert_eq!(r.handle.counts().carried.load(Relaxed), 0);
    stop(r);
}

/// The last bytes before a FIN that came in the same batch of completions leave in one segment
/// with it: the send goes with MSG_MORE, and the FIN, passed on as it completes, joins them. The
/// client gets one segment where it got two (and acknowledges both at once).
#[test]
fn the_last_bytes_and_a_fin_read_together_leave_in_one_segment() {
    let Some((r, mut c, mut b)) = one_connection(Mode::default()) else {
        return;
    };
    let (go, wait) = mpsc::channel();
    *r.seen.pause.lock().unwrap() = Some(wait);
    // In its tick, or as the connection connects (`cut` is asked then too): either way before it
    // has read anything of the backend's.
    wait_until(|| r.seen.paused.load(Relaxed) > 0, "the worker paused");
    // While it is paused, the answer and its FIN reach the worker's kernel: going on, it reads
    // both in one batch.
    b.write_all(b"the answer").unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    wait_until(|| fin_acked(&b), "the backend's FIN acknowledged");
    let before = tcp_info(&c).tcpi_segs_in;
    go.send(()).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"the answer");
    let segments = tcp_info(&c).tcpi_segs_in - before;
    assert_eq!(segments, 1, "the bytes and the FIN in one segment");
    drop(c);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
    assert_eq!((f.end, f.bytes_down), (Outcome::BackendClosed, 10));
    stop(r);
}

/// Sends `Command::Carry` and returns once the worker has taken it (with no other listener yet).
fn carry_taken(r: &Running) {
    assert!(r.handle.send(Command::Carry));
    // Commands are taken in order: once this listener is served, the carry has been taken.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(r.handle.send(Command::Listen {
        id: 1,
        socket: other,
        with: (),
    }));
    wait_until(|| r.seen.listened.load(Relaxed) == 2, "the carry taken");
}

/// A connection that connects while the worker carries, with a preface to send, and nothing to
/// take it: stopped once the preface is out, it goes on here and relays both ways.
#[test]
fn a_connection_that_connects_while_carrying_with_nothing_to_take_it_relays() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mode = Mode {
        greeting: Some(b"HELLO\n"),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, mode) else {
        return;
    };
    let mut c = client(r.addr);
    carry_taken(&r);
    c.write_all(b"HELLO\n").unwrap();
    let mut b = accept_within(&l);
    let mut pre = [0u8; PREFACE.len()];
    b.read_exact(&mut pre).unwrap();
    assert_eq!(&pre, PREFACE);
    wait_until(
        || r.seen.carriers.load(Relaxed) >= 1,
        "a carrier asked for once the preface was out",
    );
    c.write_all(b"after").unwrap();
    let mut got = [0u8; 5];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after", "the client's side relays");
    b.write_all(b"back!").unwrap();
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"back!", "the backend's side relays");
    assert_eq!(
        *r.seen.relaying.lock().unwrap(),
        [0],
        "the host is told it relays (its queue place goes), though it went on from a stop"
    );
    stop(r);
}

/// A connection that connects while the worker carries goes too; one with a preface to send (a
/// PROXY header) sends it first, so the process it goes to gets only the client's bytes.
#[test]
fn a_connection_that_connects_while_carrying_goes_after_its_preface() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mode = Mode {
        greeting: Some(b"HELLO\n"),
        carries: true,
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![l.local_addr().unwrap()], WAIT, mode) else {
        return;
    };
    let mut c = client(r.addr);
    carry_taken(&r);
    c.write_all(b"HELLO\n").unwrap();
    let mut b = accept_within(&l);
    b.set_read_timeout(Some(WAIT)).unwrap();
    let q = r
        .carried
        .recv_timeout(WAIT)
        .expect("carried once connected");
    let mut pre = [0u8; PREFACE.len()];
    b.read_exact(&mut pre).unwrap();
    assert_eq!(&pre, PREFACE, "the preface went before it left");
    assert!(q.held.to_backend.is_empty(), "{:?}", q.held);
    assert_eq!((q.bytes_up, q.bytes_down), (0, 0));
    let mut from = TcpStream::from(q.client);
    let mut to = TcpStream::from(q.backend);
    from.set_nonblocking(false).unwrap();
    to.set_nonblocking(false).unwrap();
    c.write_all(b"after").unwrap();
    let mut got = [0u8; 5];
    from.read_exact(&mut got).unwrap();
    to.write_all(&got).unwrap();
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"after", "the same connection, relayed on");
    stop(r);
}

/// A client that connects and sends its first bytes to a listener the worker serves only after
/// they are in the kernel (so it finds them there as it accepts the client), listened as `id`.
fn client_ahead(r: &Running, id: u32, first: &[u8]) -> TcpStream {
    let waiting = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = waiting.local_addr().unwrap();
    let mut c = client(addr);
    c.write_all(first).unwrap();
    let me = c.local_addr().unwrap();
    wait_until(
        || unread(addr, me) == first.len() as u64,
        "the client's bytes in the kernel",
    );
    assert!(r.handle.send(Command::Listen {
        id,
        socket: waiting,
        with: (),
    }));
    c
}

/// The backend's side of the worker's connection, once it has read the client's "first" and its
/// kernel has counted two segments in: the SYN, then the handshake's last ACK with those bytes.
/// `None` when the run read the count too late to tell (`AckTimerRuns`).
fn first_with_the_ack(l: &TcpListener, runs: &mut AckTimerRuns) -> Option<TcpStream> {
    let mut b = accept_within(l);
    let mut got = [0u8; 5];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first");
    let segs_in = tcp_info(&b).tcpi_segs_in;
    if !runs.in_time("the client's first bytes") {
        return None;
    }
    assert_eq!(segs_in, 2, "the SYN, then the ACK with the bytes");
    Some(b)
}

/// Runs `case` with a worker of `mode` whose one target is a quiet backend (the listener, and its
/// address), again while a run reads its counts too late to tell ([`AckTimerRuns`], started as
/// the worker is: a case may start it again later). `case` says whether its run was in time.
fn until_in_time(
    mode: Mode,
    mut case: impl FnMut(&TcpListener, SocketAddr, &Running, &mut AckTimerRuns) -> bool,
) {
    let mut runs = AckTimerRuns::new();
    loop {
        let (l, backend) = quiet_backend();
        let Some(r) = worker_with(vec![backend], WAIT, mode) else {
            return;
        };
        runs.start();
        let in_time = case(&l, backend, &r, &mut runs);
        stop(r);
        if in_time {
            return;
        }
    }
}

/// A client whose first bytes are there when the worker connects its backend: the handshake's
/// last ACK leaves with them (quick ACKs off, as HAProxy's `tcp-smart-connect`), so the backend's
/// kernel gets the SYN and then one segment, not an ACK and then the bytes.
#[test]
fn the_handshakes_last_ack_leaves_with_the_clients_first_bytes() {
    until_in_time(Mode::default(), |l, _, r, runs| {
        let mut c = client_ahead(r, 1, b"first");
        let Some(mut b) = first_with_the_ack(l, runs) else {
            return false;
        };
        b.write_all(b"ok").unwrap();
        let mut back = [0u8; 2];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ok", "relayed both ways");
        true
    });
}

/// How many segments each of the worker's own sockets (it runs in this process) connected to
/// `peer` has sent, fewest first.
fn segs_out_of_ours(peer: SocketAddr) -> Vec<u32> {
    let mut sent: Vec<u32> = ours_connected_to(peer)
        .iter()
        .map(|s| tcp_info_fd(s.as_raw_fd()).unwrap().tcpi_segs_out)
        .collect();
    sent.sort_unstable();
    sent
}

/// A descriptor of our own for each of the worker's sockets (it runs in this process) connected to
/// `peer`.
fn ours_connected_to(peer: SocketAddr) -> Vec<OwnedFd> {
    let mut ours = Vec::new();
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    for fd in fds.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok()) {
        // A descriptor of our own for what `fd` names now: another thread may close `fd` (the
        // duplicate then fails) or reuse it (the duplicate then names that, and its peer tells).
        // SAFETY: F_DUPFD_CLOEXEC reads no memory; any number is safe to pass.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a new descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(dup) };
        if SockRef::from(&sock)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            == Some(peer)
        {
            ours.push(sock);
        }
    }
    ours
}

/// A client, its worker held in `Host::connected` once its backend has connected, with the word
/// that lets each held connection go on.
fn held_as_connected(r: &Running) -> (mpsc::Sender<()>, TcpStream) {
    let (go, hold) = mpsc::channel();
    *r.seen.hold_first.lock().unwrap() = Some(hold);
    let c = client(r.addr);
    wait_until(|| r.seen.held.load(Relaxed) == 1, "the backend connected");
    (go, c)
}

/// A client that has sent nothing when the worker connects its backend (a protocol where the
/// server speaks first): the handshake's last ACK, held back for the client's bytes, leaves on its
/// own a loop turn later. Held on, the backend would see the connection only when the kernel's
/// delayed-ACK timer fired, 200 ms later. Two such clients, each held in the host as its backend
/// connects: the second's connect began after the worker accepted it, in a turn after the
/// first's, so when it completes the turn after the first's has ended.
#[test]
fn a_client_that_has_sent_nothing_gets_the_handshakes_last_ack_a_turn_later() {
    until_in_time(Mode::default(), |l, backend, r, runs| {
        let (go, mut c) = held_as_connected(r);
        let first = segs_out_of_ours(backend);
        let _second = client(r.addr);
        go.send(()).unwrap();
        wait_until(
            || r.seen.held.load(Relaxed) == 2,
            "the second backend connected",
        );
        let both = segs_out_of_ours(backend);
        drop(go);
        if !runs.in_time("a client that has sent nothing") {
            return false;
        }
        assert_eq!(
            first,
            [1],
            "the SYN sent, the handshake's last ACK held back"
        );
        assert_eq!(
            both,
            [1, 2],
            "the first's last ACK sent, the second's held back"
        );
        let mut b = accept_within(l);
        b.write_all(b"220 hello").unwrap();
        let mut got = [0u8; 9];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"220 hello", "the server spoke first");
        c.write_all(b"x").unwrap();
        let mut x = [0u8; 1];
        b.read_exact(&mut x).unwrap();
        true
    });
}

/// A client whose first bytes come while the worker connects its backend (after the accept,
/// before the client's receive is armed): the handshake's last ACK, held back, leaves with them.
#[test]
fn first_bytes_that_come_as_the_backend_connects_carry_the_handshakes_last_ack() {
    until_in_time(Mode::default(), |l, _, r, runs| {
        let (go, mut c) = held_as_connected(r);
        c.write_all(b"first").unwrap();
        let me = c.local_addr().unwrap();
        wait_until(
            || unread(r.addr, me) == 5,
            "the client's bytes in the kernel",
        );
        drop(go);
        first_with_the_ack(l, runs).is_some()
    });
}

/// A client reset before the worker connects its backend: it ends as reset when its receive reads
/// the reset, and its backend, reset with it, never accepts it (the handshake's last ACK was still
/// held back for the client's bytes).
#[test]
fn a_client_reset_before_its_connect_ends_as_reset_and_its_backend_never_accepts_it() {
    until_in_time(Mode::default(), |l, _, r, runs| {
        let waiting = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = waiting.local_addr().unwrap();
        let c = client(addr);
        let me = c.local_addr().unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        wait_until(|| !listed(addr, me), "the reset in the kernel");
        runs.start();
        assert!(r.handle.send(Command::Listen {
            id: 1,
            socket: waiting,
            with: (),
        }));
        let (f, _) = r.ended.recv_timeout(WAIT).expect("the connection ends");
        let reached = l.accept().map(|_| ()).map_err(|e| e.kind());
        if !runs.in_time("a client reset before its connect") {
            return false;
        }
        assert_eq!(f.end, Outcome::ClientReset);
        assert!(f.broken.is_some(), "ends broken: {f:?}");
        assert_eq!(
            reached,
            Err(io::ErrorKind::WouldBlock),
            "nothing reached the backend"
        );
        true
    });
}

/// A client whose first bytes are there, connected while connections are carried away: it goes
/// before sending them, so the handshake's last ACK, held back for them, is sent as it goes (the
/// backend would see the connection only at the delayed-ACK timer otherwise).
#[test]
fn a_connection_carried_before_its_first_bytes_went_sends_the_handshakes_last_ack() {
    let mode = Mode {
        carries: true,
        ..Mode::default()
    };
    until_in_time(mode, |l, _, r, runs| {
        // Taken before the listener that follows it (one channel, in order).
        assert!(r.handle.send(Command::Carry));
        let _c = client_ahead(r, 1, b"first");
        let q = r
            .carried
            .recv_timeout(WAIT)
            .expect("the connection is carried");
        let backend_side = TcpStream::from(q.backend);
        let segs_out = tcp_info(&backend_side).tcpi_segs_out;
        if !runs.in_time("a connection carried before its first bytes went") {
            return false;
        }
        assert_eq!(q.held.to_backend, b"", "nothing read of the client");
        assert_eq!(segs_out, 2, "the SYN and the handshake's last ACK sent");
        let _b = accept_within(l);
        true
    });
}

/// `first_byte_timeout` on the ring workers: a client that sends nothing is closed at it (both
/// sides: the connection ends `first_byte_timeout`, nothing moved), while one accepted before it
/// that sent a byte goes on past its own deadline. A client whose opening (a PROXY header's
/// stand-in) was read and replaced by the host's preface has still sent nothing of its own: the
/// preface the backend got does not count as the client's first byte.
#[test]
fn a_silent_client_is_closed_at_its_first_byte_timeout_and_one_that_speaks_is_not() {
    const FIRST_BYTE: Duration = Duration::from_millis(300);
    let backend = echo_backend();
    let mode = Mode {
        first_byte: Some(FIRST_BYTE),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![backend], WAIT, mode) else {
        return;
    };
    let mut talker = relayed_client(&r);
    let mut silent = client(r.addr);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the silent one ends");
    assert_eq!(
        (f.bytes_up, f.bytes_down, f.end),
        (0, 0, Outcome::FirstByteTimeout)
    );
    assert!(closed(&mut silent), "the silent client is closed");
    // The talker's deadline came before the silent one's.
    talker.write_all(b"y").unwrap();
    let mut b = [0u8; 1];
    talker.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y");
    drop(talker);
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the talker ends");
    assert_eq!((f.bytes_up, f.end), (2, Outcome::ClientClosed));
    stop(r);

    let mode = Mode {
        first_byte: Some(FIRST_BYTE),
        greeting: Some(b"HELLO\n"),
        ..Mode::default()
    };
    let Some(r) = worker_with(vec![echo_backend()], WAIT, mode) else {
        return;
    };
    let mut greeted = client(r.addr);
    greeted.write_all(b"HELLO\n").unwrap();
    let (f, _) = r.ended.recv_timeout(WAIT).expect("the greeted one ends");
    assert_eq!((f.bytes_up, f.end), (0, Outcome::FirstByteTimeout));
    // The echo backend sent the preface back before the close.
    let mut got = Vec::new();
    let end = greeted.read_to_end(&mut got);
    assert!(
        end.is_ok()
            || end
                .as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
        "the greeted client is closed: {end:?}"
    );
    stop(r);
}
