//! The driver under injected submission failures and tiny rings, on real loopback sockets. These
//! live in the crate, not in `tests/`: they shrink the ring of their own thread and count what the
//! driver did, neither of which the public API offers (nor should: a knob for the queue sizes would
//! only let production misconfigure itself). Each test runs on a fresh thread of its own, so its
//! thread's ring is created under its settings whatever thread libtest runs it on.

use super::*;

use std::collections::HashSet;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use futures_util::future::join_all;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::RelayMode;
use crate::outcome::Outcome;
use crate::relay::{relay, Begin, LiveCounters, RelayOptions, Relayed};

/// A new connection's relay, its backend's handshake ACK not held.
const NEW: Begin = Begin::New { ack_held: false };

/// A failure injected into one `io_uring_enter` (by `Driver::enter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The call fails (EAGAIN, as when the kernel cannot allocate requests) and submits nothing.
    Fail,
    /// The kernel is asked to consume only half of the queued entries.
    Partial,
}

type Plan = Box<dyn FnMut(u64) -> Option<Fault>>;

thread_local! {
    static SIZES: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
    static FAULTS: RefCell<Option<Plan>> = RefCell::new(None);
    static ATTEMPTS: Cell<u64> = const { Cell::new(0) };
}

pub(super) fn ring_sizes() -> Option<(u32, u32)> {
    SIZES.with(Cell::get)
}

/// The fault this thread's plan has for the next `io_uring_enter`, if any.
pub(super) fn next_fault() -> Option<Fault> {
    let attempt = ATTEMPTS.with(|a| a.replace(a.get() + 1));
    FAULTS.with(|f| f.borrow_mut().as_mut().and_then(|plan| plan(attempt)))
}

/// Runs `test` on a new thread with a current-thread runtime: one ring, created by the test.
fn run<F: Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
    let t = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(test());
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// The ring sizes (`None`: the production ones) and the fault plan (by attempt, from 0) of this
/// thread's ring, which must not exist yet.
fn setup(sizes: Option<(u32, u32)>, plan: impl FnMut(u64) -> Option<Fault> + 'static) {
    assert!(existing_driver(None).is_none(), "set up before the ring");
    assert!(
        availability().is_ok(),
        "io_uring unavailable: {:?}",
        availability()
    );
    SIZES.with(|s| s.set(sizes));
    FAULTS.with(|f| *f.borrow_mut() = Some(Box::new(plan)));
}

fn clear_faults() {
    FAULTS.with(|f| *f.borrow_mut() = None);
}

fn stats() -> Stats {
    existing_driver(None).map_or_else(Stats::default, |d| d.stats.get())
}

/// Entries staged or in the submission queue.
fn queued() -> usize {
    existing_driver(None).map_or(0, |d| {
        d.staged.borrow().len() + d.ring.borrow_mut().submission().len()
    })
}

/// Slots held: operations not yet returned, and orphaned buffers the kernel may still use.
fn occupied() -> usize {
    existing_driver(None).map_or(0, |d| {
        d.slots.borrow().iter().filter(|e| e.slot.is_some()).count()
    })
}

fn buf() -> Box<[u8]> {
    vec![0u8; 256].into_boxed_slice()
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A connected pair: (the connecting end, the accepted end).
async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (a, _) = l.accept().await.unwrap();
    (c, a)
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Waits (in 1 ms steps, at most 5000) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what} ({:?})", stats());
}

/// One read of whatever `s` has.
async fn read_some(s: &TcpStream, buf: &mut [u8]) -> usize {
    loop {
        s.readable().await.unwrap();
        match s.try_read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
}

const MSG: &[u8] = b"for the socket's owner, not for a dropped receive";

#[test]
fn positions_still_in_the_queue() {
    // The queue holds the `len` positions before the tail.
    assert!(still_queued(7, 8, 1));
    assert!(!still_queued(6, 8, 1));
    assert!(still_queued(5, 8, 3));
    assert!(!still_queued(4, 8, 3));
    assert!(!still_queued(7, 8, 0));
    // Across the wrap of the 32-bit count.
    assert!(still_queued(u32::MAX, 1, 2));
    assert!(!still_queued(u32::MAX - 1, 1, 2));
}

#[test]
fn back_off_doubles_up_to_its_cap_and_starts_over_after_a_success() {
    let ms = Duration::from_millis;
    let delays: Vec<Duration> = (1..=9).map(backoff_delay).collect();
    assert_eq!(
        delays,
        [1, 2, 4, 8, 16, 32, 64, 100, 100].map(ms).to_vec(),
        "1 ms doubling, capped at 100 ms"
    );
    assert_eq!(backoff_delay(u32::MAX), BACKOFF_CAP);
    let mut b = Backoff::default();
    let t = Instant::now();
    assert_eq!(b.failed(t).0, ms(1));
    assert_eq!(b.failed(t).0, ms(2));
    b.succeeded();
    assert_eq!(b.failed(t).0, ms(1));
}

#[test]
fn failures_are_logged_at_most_every_ten_seconds_with_their_count() {
    let mut b = Backoff::default();
    let t0 = Instant::now();
    assert_eq!(b.failed(t0).1, Some(1), "the first one is logged");
    for i in 1..100 {
        assert_eq!(b.failed(t0 + Duration::from_millis(i * 50)).1, None);
    }
    // A success in between does not reopen the log: failures that alternate with successes would
    // otherwise log every time.
    b.succeeded();
    assert_eq!(b.failed(t0 + Duration::from_millis(9_900)).1, None);
    assert_eq!(
        b.failed(t0 + LOG_EVERY).1,
        Some(101),
        "the next line counts every failure since the last"
    );
}

/// reliability.md `uring-dropped-op`: an operation dropped while its entry waits in the submission
/// queue (the submission failed) must never reach its socket afterwards: the session closes the
/// socket next, and its number goes to the next connection.
#[test]
fn a_receive_dropped_after_a_failed_submission_never_reaches_its_socket() {
    dropped_while_queued(Fault::Fail);
}

/// reliability.md `uring-dropped-op`: the same after a submission the kernel cut short, which
/// leaves the entries after the ones it took in the queue.
#[test]
fn a_receive_dropped_after_a_partial_submission_never_reaches_its_socket() {
    dropped_while_queued(Fault::Partial);
}

fn dropped_while_queued(fault: Fault) {
    run(move || async move {
        // The first submission meets `fault`. The driver retries a partial one at once, so the
        // retry fails: the second entry stays queued either way.
        setup(None, move |attempt| match attempt {
            0 => Some(fault),
            1 if fault == Fault::Partial => Some(Fault::Fail),
            _ => None,
        });
        let l = listener().await;
        let (_first_peer, first_sock) = pair(&l).await;
        let (mut peer, sock) = pair(&l).await;
        let first = Op::recv(first_sock.as_fd(), buf()).unwrap();
        let op = Op::recv(sock.as_fd(), buf()).unwrap();
        eventually("the failed submission", || stats().failed_submits == 1).await;
        let expect_queued = if fault == Fault::Partial { 1 } else { 2 };
        assert_eq!(queued(), expect_queued, "{:?}", stats());
        drop(op);
        assert_eq!(stats().neutralised, 1, "{:?}", stats());
        peer.write_all(MSG).await.unwrap();
        eventually("the queue submitted after the back-off", || queued() == 0).await;
        // Nothing took the bytes: they are all there for the socket's owner.
        let mut got = vec![0u8; 256];
        let n = within("the bytes left in the socket", read_some(&sock, &mut got)).await;
        assert_eq!(&got[..n], MSG);
        // The first one reached the kernel: dropped now, it is cancelled and its slot comes back.
        drop(first);
        assert_eq!(stats().cancelled, 1, "{:?}", stats());
        eventually("every slot free", || occupied() == 0).await;
        let s = stats();
        assert_eq!(s.backoffs, s.failed_submits, "{s:?}");
    });
}

/// An operation dropped before the driver ran never reaches the kernel; one dropped in flight is
/// cancelled, and its slot and buffer come back once the cancelled completion arrives.
#[test]
fn dropped_receives_are_withdrawn_or_cancelled_and_free_their_slots() {
    run(|| async {
        setup(None, |_| None);
        let l = listener().await;
        let (mut peer, sock) = pair(&l).await;
        drop(Op::recv(sock.as_fd(), buf()).unwrap());
        assert_eq!(stats().dropped_staged, 1);
        assert_eq!((queued(), occupied()), (0, 0));
        let op = Op::recv(sock.as_fd(), buf()).unwrap();
        eventually("submitted", || queued() == 0).await;
        drop(op);
        assert_eq!(stats().cancelled, 1);
        eventually("the cancelled receive completed", || occupied() == 0).await;
        peer.write_all(MSG).await.unwrap();
        let mut got = vec![0u8; 256];
        let n = within("the bytes left in the socket", read_some(&sock, &mut got)).await;
        assert_eq!(&got[..n], MSG);
    });
}

/// reliability.md `uring-submit-failures`: while every submission fails the driver waits between
/// tries instead of trying again on every turn of the scheduler, and once the kernel takes entries
/// again the waiting operation completes with nothing else waking the driver.
#[test]
fn failing_submissions_back_off_instead_of_spinning_and_resume_on_their_own() {
    run(|| async {
        setup(None, |_| Some(Fault::Fail));
        let l = listener().await;
        let (mut peer, sock) = pair(&l).await;
        peer.write_all(b"ping").await.unwrap();
        let op = Op::recv(sock.as_fd(), buf()).unwrap();
        // A thousand turns of the scheduler (well under the 1.4 s the first dozen waits add up
        // to), every submission failing: a driver that retried at once would try on each.
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        let s = stats();
        assert!(s.failed_submits >= 1, "{s:?}");
        assert!(s.submits <= 12, "retried without waiting: {s:?}");
        assert_eq!(s.backoffs, s.failed_submits, "a wait after every failure");
        clear_faults();
        let (r, b) = within("the receive after the failures", op).await;
        assert_eq!(r, 4);
        assert_eq!(&b[..4], b"ping");
        let s = stats();
        assert_eq!(s.backoffs, s.failed_submits, "{s:?}");
    });
}

/// reliability.md `uring-cq-overflow`: more completions at once than a tiny completion queue holds;
/// the kernel keeps the rest, and the driver gets every one back.
#[test]
fn completions_beyond_a_tiny_completion_queue_are_not_lost() {
    run(|| async {
        setup(Some((2, 2)), |_| None);
        let l = listener().await;
        let (mut peers, mut socks) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            let (p, s) = pair(&l).await;
            peers.push(p);
            socks.push(s);
        }
        let ops: Vec<_> = socks
            .iter()
            .map(|s| Op::recv(s.as_fd(), buf()).unwrap())
            .collect();
        eventually("all submitted", || queued() == 0).await;
        // Every receive completes at once, before the driver runs again: two fit the queue.
        let msg = |i: usize| format!("message {i} for socket {i}").into_bytes();
        for (i, p) in peers.iter_mut().enumerate() {
            p.write_all(&msg(i)).await.unwrap();
        }
        let done = within("every completion", futures_util::future::join_all(ops)).await;
        for (i, (r, b)) in done.into_iter().enumerate() {
            assert!(r > 0, "socket {i}: {r}");
            assert_eq!(b[..r as usize], msg(i)[..], "socket {i}");
        }
        assert!(stats().overflow_flushes > 0, "{:?}", stats());
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Echoes every message, then half-closes and reads to the end.
    Survivor,
    /// Sends one more message and resets at once.
    Resets,
    /// Sends one more message and has the relay cut (as the drain deadline does).
    Cut,
    /// Goes silent until the idle timeout closes it.
    Idle,
}

fn role(i: usize) -> Role {
    match i % 5 {
        0 | 1 => Role::Survivor,
        2 => Role::Resets,
        3 => Role::Cut,
        _ => Role::Idle,
    }
}

/// Message `k` of connection `i`: 200 to 1499 bytes of its own (small enough never to fill a
/// 16 KiB receive, so the relay stays on the ring).
fn chunk(i: usize, k: usize) -> Vec<u8> {
    let len = 200 + (i * 131 + k * 71) % 1300;
    let mut x = (((i as u64) << 32) | k as u64) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// reliability.md `uring-tiny-ring`: 150 connections relayed through a ring of 2 submission and 2
/// completion entries, with one submission in eight failing and one in four cut short.
/// The relay of connection `i` in the tiny-ring test: a second's idle timeout, a cut when `cut_rx`
/// fires; its sockets closed at once when it ends (as the session does), then `ended` counted.
async fn tiny_ring_relay(
    i: usize,
    proxy_c: TcpStream,
    proxy_b: TcpStream,
    cut_rx: oneshot::Receiver<()>,
    ended: Arc<AtomicUsize>,
) -> (usize, Relayed) {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let opts = RelayOptions {
        mode: RelayMode::Uring,
        // Long enough for a survivor's slowest round trip through the failing ring on a loaded
        // machine.
        idle_timeout: Duration::from_secs(1),
        half_close_timeout: Duration::from_secs(10),
        stall_timeout: Duration::from_secs(300),
    };
    let cut = std::pin::pin!(async move {
        match cut_rx.await {
            Ok(()) => Outcome::DrainDeadline,
            Err(_) => std::future::pending().await,
        }
    });
    let live = LiveCounters {
        up: &up,
        down: &down,
    };
    let r = relay(&proxy_c, &proxy_b, &opts, cut, None, live, NEW).await;
    drop((proxy_c, proxy_b));
    ended.fetch_add(1, Relaxed);
    (i, r)
}

/// A backend that echoes until EOF and returns everything it received.
async fn echo_recording(i: usize, mut backend: TcpStream) -> (usize, Vec<u8>) {
    let mut all = Vec::new();
    let mut b = vec![0u8; 4096];
    loop {
        match backend.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                all.extend_from_slice(&b[..n]);
                if backend.write_all(&b[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = backend.shutdown().await;
    (i, all)
}

/// Client `i` of the tiny-ring test, playing its role: its echoes checked, then it ends as its role
/// says (half-close, reset, cut, silence); returns the digest of what it sent.
async fn tiny_ring_client(
    i: usize,
    mut client: TcpStream,
    cut_tx: oneshot::Sender<()>,
    max_rounds: usize,
) -> (usize, Role, [u8; 32]) {
    let role = role(i);
    let rounds = match role {
        Role::Survivor => max_rounds,
        _ => 1 + i % (max_rounds / 2),
    };
    let mut sent = Vec::new();
    for k in 0..rounds {
        let c = chunk(i, k);
        client.write_all(&c).await.unwrap();
        let mut back = vec![0u8; c.len()];
        within(
            &format!("echo {k} of connection {i}"),
            client.read_exact(&mut back),
        )
        .await
        .unwrap_or_else(|e| panic!("connection {i}, message {k}: {e}"));
        assert!(back == c, "connection {i}, message {k}: bytes not its own");
        sent.extend_from_slice(&c);
    }
    let mut rest = Vec::new();
    match role {
        Role::Survivor => {
            client.shutdown().await.unwrap();
            within("the end", client.read_to_end(&mut rest))
                .await
                .unwrap();
            assert!(rest.is_empty(), "connection {i}: bytes after the last echo");
        }
        Role::Resets => {
            client.write_all(&chunk(i, rounds)).await.unwrap();
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
        }
        Role::Cut => {
            let c = chunk(i, rounds);
            client.write_all(&c).await.unwrap();
            let _ = cut_tx.send(());
            let _ = within("the cut", client.read_to_end(&mut rest)).await;
            assert!(
                c.starts_with(&rest),
                "connection {i}: bytes not its own after the cut"
            );
        }
        Role::Idle => {
            let _ = within("the idle timeout", client.read_to_end(&mut rest)).await;
            assert!(rest.is_empty(), "connection {i}: bytes while silent");
        }
    }
    (i, role, sha(&sent))
}

/// Connections end mid-flight by a client's reset, a cut and the idle timeout, each dropping the
/// operations in flight, and their sockets close at once so that new connections get the same
/// descriptor numbers. Every surviving stream is exact both ways (SHA-256), no connection receives a
/// byte it did not send, and nothing is left in the ring at the end.
#[test]
fn a_tiny_failing_ring_keeps_every_stream_exact_while_operations_are_dropped() {
    const CONNS: usize = 150;
    const WAVE: usize = 30;
    const ROUNDS: usize = 24;
    run(|| async {
        setup(Some((2, 2)), |n| match n % 8 {
            3 => Some(Fault::Fail),
            1 | 5 => Some(Fault::Partial),
            _ => None,
        });
        let l = listener().await;
        let ended = Arc::new(AtomicUsize::new(0));
        let mut fds = Vec::new();
        let (mut relays, mut clients, mut backends) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..CONNS {
            if i > 0 && i % WAVE == 0 {
                // The next wave once a part of the last has closed its sockets, so their numbers
                // are reused.
                let want = i / 4;
                eventually("part of the last wave ended", || {
                    ended.load(Relaxed) >= want
                })
                .await;
            }
            let (client, proxy_c) = pair(&l).await;
            let (proxy_b, backend) = pair(&l).await;
            fds.extend([proxy_c.as_raw_fd(), proxy_b.as_raw_fd()]);
            let (cut_tx, cut_rx) = oneshot::channel::<()>();
            relays.push(tokio::spawn(tiny_ring_relay(
                i,
                proxy_c,
                proxy_b,
                cut_rx,
                ended.clone(),
            )));
            backends.push(tokio::spawn(echo_recording(i, backend)));
            clients.push(tokio::spawn(tiny_ring_client(i, client, cut_tx, ROUNDS)));
        }
        let mut sent = vec![[0u8; 32]; CONNS];
        for c in clients {
            let (i, role, digest) = within("the clients", c).await.unwrap();
            if role == Role::Survivor {
                sent[i] = digest;
            }
        }
        for b in backends {
            let (i, got) = within("the backends", b).await.unwrap();
            if role(i) == Role::Survivor {
                assert_eq!(sha(&got), sent[i], "connection {i}: the backend's bytes");
            } else {
                // A victim's backend got a prefix of what its client sent, never foreign bytes.
                let mine: Vec<u8> = (0..ROUNDS + 1).flat_map(|k| chunk(i, k)).collect();
                assert!(
                    mine.starts_with(&got),
                    "connection {i}: foreign bytes upstream"
                );
            }
        }
        for r in relays {
            let (i, r) = within("the relays", r).await.unwrap();
            let expect = match role(i) {
                Role::Survivor => Outcome::ClientClosed,
                Role::Resets => Outcome::ClientReset,
                Role::Cut => Outcome::DrainDeadline,
                Role::Idle => Outcome::IdleTimeout,
            };
            assert_eq!(r.end, expect, "connection {i}");
            assert!(r.uring && !r.spliced, "connection {i} left the ring: {r:?}");
        }
        let distinct: HashSet<RawFd> = fds.iter().copied().collect();
        assert!(
            distinct.len() < fds.len(),
            "descriptor numbers were reused by later connections"
        );
        eventually("nothing left in the ring", || {
            occupied() == 0 && queued() == 0
        })
        .await;
        let s = stats();
        assert!(s.failed_submits > 0 && s.partial_submits > 0, "{s:?}");
        assert!(s.cancelled > 0 && s.overflow_flushes > 0, "{s:?}");
        assert_eq!(s.backoffs, s.failed_submits, "{s:?}");
        eprintln!("tiny ring: {s:?}");
    });
}

/// With DEFER_TASKRUN one entry runs a bounded batch of the work queued for the thread (20 items),
/// and what it leaves is not signalled again. Here every byte arrives while the thread is busy (out
/// of the ring), and the first receives' data is then taken before the ring is entered: the first
/// entries run only their wake-ups, which find nothing to read and complete nothing. Every other
/// receive must still complete, with nothing else happening afterwards.
#[test]
fn receives_queued_behind_a_batch_that_completed_nothing_still_complete() {
    run(|| async {
        setup(None, |_| None);
        const N: usize = 200;
        // More than two entries' worth of wake-ups that complete nothing.
        const TAKEN: usize = 50;
        let l = listener().await;
        let (mut clients, mut servers) = (Vec::new(), Vec::new());
        for _ in 0..N {
            let (c, s) = pair(&l).await;
            clients.push(c.into_std().unwrap());
            servers.push(s);
        }
        let (taken, rest) = servers.split_at(TAKEN);
        let mut first = std::pin::pin!(join_all(taken.iter().map(recv).collect::<Vec<_>>()));
        let mut others = std::pin::pin!(join_all(rest.iter().map(recv).collect::<Vec<_>>()));
        // Polled once: every receive staged; then submitted (and waiting for data) by the driver.
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        assert!(futures_util::poll!(others.as_mut()).is_pending());
        eventually("every receive submitted", || queued() == 0).await;
        assert!(
            existing_driver(None).is_some_and(|d| d.wake.is_some()),
            "this kernel (6.1+) runs the ring with DEFER_TASKRUN"
        );
        // This thread blocks (it does not enter the ring) while every byte arrives, in order.
        let clients = std::thread::spawn(move || {
            for c in &mut clients {
                std::io::Write::write_all(c, b"x").unwrap();
            }
            clients
        })
        .join()
        .unwrap();
        for s in taken {
            let mut b = [0u8; 8];
            let n = rustix::net::recv(s, &mut b, rustix::net::RecvFlags::DONTWAIT).unwrap();
            assert_eq!(n.0, 1);
        }
        let done = within("every receive whose data is there completes", others).await;
        assert!(done.iter().all(|(r, _)| *r == 1), "{:?}", results(&done));
        // The receives whose data was taken are still waiting, and complete on the next bytes.
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        for c in &clients[..TAKEN] {
            std::io::Write::write_all(&mut &*c, b"y").unwrap();
        }
        let done = within("the receives whose data was taken complete", first).await;
        assert!(done.iter().all(|(r, _)| *r == 1), "{:?}", results(&done));
    });
}

fn recv(s: &TcpStream) -> Op<'_> {
    Op::recv(s.as_fd(), buf()).unwrap()
}

fn results(done: &[(i32, Box<[u8]>)]) -> Vec<i32> {
    done.iter().map(|(r, _)| *r).collect()
}

thread_local! {
    static POOL: Cell<Option<u16>> = const { Cell::new(None) };
}

pub(super) fn pool_size() -> Option<u16> {
    POOL.with(Cell::get)
}

/// A relay through this thread's ring between a fresh client and a backend, both returned with
/// the relay's task: (client, backend, relay).
async fn ring_relay(
    l: &TcpListener,
    backend_sndbuf: Option<usize>,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Relayed>) {
    let (client, proxy_c) = pair(l).await;
    let (proxy_b, backend) = pair(l).await;
    if let Some(n) = backend_sndbuf {
        socket2::SockRef::from(&proxy_b)
            .set_send_buffer_size(n)
            .unwrap();
        socket2::SockRef::from(&backend)
            .set_recv_buffer_size(n)
            .unwrap();
    }
    let relay = tokio::task::spawn_local(async move {
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let opts = RelayOptions {
            mode: RelayMode::Uring,
            idle_timeout: Duration::from_secs(30),
            half_close_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(300),
        };
        let cut = std::pin::pin!(std::future::pending::<Outcome>());
        let live = LiveCounters {
            up: &up,
            down: &down,
        };
        relay(&proxy_c, &proxy_b, &opts, cut, None, live, NEW).await
    });
    (client, backend, relay)
}

/// One round trip through a relay: `req` from the client to the backend, `resp` back, each exact.
async fn exchange(client: &mut TcpStream, backend: &mut TcpStream, req: &[u8], resp: &[u8]) {
    client.write_all(req).await.unwrap();
    let mut got = vec![0u8; req.len()];
    within("the request", backend.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got == req, "the request is not its own");
    backend.write_all(resp).await.unwrap();
    let mut back = vec![0u8; resp.len()];
    within("the response", client.read_exact(&mut back))
        .await
        .unwrap();
    assert!(back == resp, "the response is not its own");
}

/// Runs `test` as `run` does, inside a `LocalSet` (relays are spawned on this thread).
fn run_local<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
    run(|| async move { tokio::task::LocalSet::new().run_until(test()).await })
}

/// A keep-alive exchange arms one multishot receive per direction for the connection's life, not
/// a receive per message: 200 request/response round trips, each one message per direction.
#[test]
fn a_keep_alive_exchange_arms_one_receive_per_direction() {
    run_local(|| async {
        setup(None, |_| None);
        let l = listener().await;
        let (mut client, mut backend, relay) = ring_relay(&l, None).await;
        for k in 0..200usize {
            exchange(&mut client, &mut backend, &chunk(1, k), &chunk(2, k)).await;
        }
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let r = within("the relay's end", relay).await.unwrap();
        assert_eq!(r.end, Outcome::ClientClosed);
        let s = stats();
        assert!(s.stream_messages >= 400, "{s:?}");
        assert!(s.streams <= 4, "a receive armed per message: {s:?}");
        eventually("every slot free", || occupied() == 0).await;
    });
}

/// A destination that does not read: the direction's multishot receive stops at its cap of pool
/// buffers instead of draining the pool (64 buffers here: without the cap, 200 messages run it
/// dry), and every byte still arrives, in order, once the destination reads again.
#[test]
fn a_destination_that_does_not_read_stops_its_receive_before_the_pool_runs_dry() {
    const MESSAGES: usize = 200;
    run_local(|| async {
        setup(None, |_| None);
        POOL.with(|p| p.set(Some(64)));
        let l = listener().await;
        let (mut client, mut backend, relay) = ring_relay(&l, Some(4096)).await;
        let sent: Vec<u8> = (0..MESSAGES)
            .flat_map(|k| chunk(3, k % 7)[..512].to_vec())
            .collect();
        let writer = {
            let sent = sent.clone();
            tokio::task::spawn_local(async move {
                for m in sent.chunks(512) {
                    client.write_all(m).await.unwrap();
                    // One message per receive: small and paced, never taken for bulk.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                client
            })
        };
        eventually("the cap stops the receive", || {
            stats().stream_backpressure > 0
        })
        .await;
        let mut got = Vec::new();
        let mut b = vec![0u8; 4096];
        while got.len() < sent.len() {
            let n = within("the bytes", backend.read(&mut b)).await.unwrap();
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&b[..n]);
        }
        assert!(got == sent, "bytes lost, duplicated or reordered");
        let s = stats();
        assert_eq!(s.stream_no_buffers, 0, "the pool ran dry: {s:?}");
        let mut client = writer.await.unwrap();
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        within("the relay's end", relay).await.unwrap();
        eventually("every slot free", || occupied() == 0).await;
    });
}

/// With the pool dry (two buffers, both held by a connection whose destination does not read), a
/// second connection's receives get ENOBUFS and fall back to one-shot receives: its exchange goes on.
#[test]
fn a_dry_pool_slows_a_direction_and_never_stalls_it() {
    run_local(|| async {
        setup(None, |_| None);
        POOL.with(|p| p.set(Some(2)));
        let l = listener().await;
        let (mut stuck, stuck_backend, stuck_relay) = ring_relay(&l, Some(4096)).await;
        // Fill the stuck backend's socket buffers, then two more messages sit in the pool.
        let filler = tokio::task::spawn_local(async move {
            let m = [7u8; 512];
            for _ in 0..400 {
                if tokio::time::timeout(Duration::from_millis(200), stuck.write_all(&m))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stuck
        });
        let (mut client, mut backend, relay) = ring_relay(&l, None).await;
        eventually("the pool runs dry", || stats().stream_no_buffers > 0).await;
        for k in 0..20usize {
            exchange(&mut client, &mut backend, &chunk(4, k), &chunk(5, k)).await;
        }
        // Each message costs at most one failed arm and one one-shot receive per direction: a
        // receive armed again at once on a dry pool would fail at once, over and over.
        let s = stats();
        assert!(
            s.streams < 200,
            "armed again and again on a dry pool: {s:?}"
        );
        drop((client, backend));
        within("the relay's end", relay).await.unwrap();
        let stuck = filler.await.unwrap();
        drop((stuck, stuck_backend));
        within("the stuck relay's end", stuck_relay).await.unwrap();
        eventually("every slot free", || occupied() == 0).await;
    });
}
