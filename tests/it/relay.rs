//! Data integrity and TCP semantics through the proxy (docs/reliability.md, "Data integrity and TCP semantics"), each run
//! against every relay mode (copy, splice, epoll, uring, ring).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

use crate::common::*;
use sluicegate::config::RelayMode;
use sluicegate::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Generates one test per relay engine (copy, splice, epoll, uring, ring) for each scenario function
/// `name(RelayMode)`.
macro_rules! every_engine {
    ($($name:ident),* $(,)?) => {
        mod copy {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(sluicegate::config::RelayMode::Copy).await })*
        }
        mod splice {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(sluicegate::config::RelayMode::Splice).await })*
        }
        mod epoll {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(sluicegate::config::RelayMode::Epoll).await })*
        }
        mod ring {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(sluicegate::config::RelayMode::Ring).await })*
        }
    };
}

every_engine!(
    concurrent_echoes_are_exact_and_leave_nothing_behind,
    client_half_close_then_large_answer,
    backend_speaks_first_and_half_closes,
    backend_writes_and_closes_while_client_reads_slowly,
    backend_reset_reaches_the_client_as_a_reset,
    client_reset_reaches_the_backend_as_a_reset,
    half_close_timeout_closes_both_sides,
    half_closed_stream_outlives_the_half_close_timeout,
    idle_timeout_closes_silence_but_not_a_trickle,
    urgent_data_in_a_bulk_stream_is_skipped_and_the_rest_relayed,
);

/// reliability.md `urgent-data`: a client that sends TCP urgent data (MSG_OOB) after bulk data, when
/// a direction may be on splice (which stops at the urgent mark where a receive reads past it):
/// what follows it is relayed, without the FIN behind it (connection A) and with it (B). Urgent
/// data is not inline, so the urgent byte itself goes nowhere, as through a plain receive.
async fn urgent_data_in_a_bulk_stream_is_skipped_and_the_rest_relayed(mode: RelayMode) {
    let backend = Backend::echo([127, 0, 0, 3]).await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    for fin_with_it in [false, true] {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let bulk = payload(7, 256 << 10);
        let (mut r, mut w) = c.split();
        let mut back = vec![0u8; bulk.len()];
        let (wrote, read) = within(SECS(10), "the bulk echo", async {
            tokio::join!(w.write_all(&bulk), r.read_exact(&mut back))
        })
        .await;
        wrote.unwrap();
        read.unwrap();
        assert_eq!(sha(&back), sha(&bulk));
        let sent = socket2::SockRef::from(&c)
            .send_out_of_band(b"U")
            .expect("the urgent byte is sent");
        assert_eq!(sent, 1);
        c.write_all(b"after").await.unwrap();
        let rest = if fin_with_it {
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let read = within(SECS(10), "the rest, then EOF", c.read_to_end(&mut rest)).await;
            if let Err(e) = read {
                // What came before the error, and how the proxy saw the connection end, tell a
                // reset of the proxy's own making from one passed on from the backend.
                panic!(
                    "{mode:?}: no clean EOF: {e} after {:?}; spliced directions so far: {}; ended so far: {}",
                    String::from_utf8_lossy(&rest),
                    proxy.service.stats.spliced_total(),
                    proxy.ended_so_far()
                );
            }
            rest
        } else {
            let mut after = [0u8; 5];
            within(
                SECS(10),
                "what follows the urgent byte",
                c.read_exact(&mut after),
            )
            .await
            .expect("echoed before any FIN");
            c.shutdown().await.unwrap();
            let mut rest = after.to_vec();
            rest.extend(
                within(SECS(10), "EOF", read_all(&mut c))
                    .await
                    .expect("clean EOF"),
            );
            rest
        };
        assert_eq!(rest, b"after", "{mode:?}, FIN with it: {fin_with_it}");
    }
    proxy.wait_ended(Outcome::ClientClosed, 2).await;
}

/// reliability.md `concurrent-echoes`: 3 echo backends, 1000 concurrent clients each send 1 MiB then FIN.
async fn concurrent_echoes_are_exact_and_leave_nothing_behind(mode: RelayMode) {
    let backends = [
        Backend::echo([127, 0, 0, 2]).await,
        Backend::echo([127, 0, 0, 3]).await,
        Backend::echo([127, 0, 0, 4]).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&service_yaml(&addrs, mode, "balance: least_conn")).await;
    let mut ends = addrs.clone();
    ends.push(proxy.addr);
    let clients = 1000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients {
        let addr = proxy.addr;
        tasks.spawn(async move {
            let data = payload(i, 1 << 20);
            let got = round_trip(addr, &data).await.expect("round trip");
            assert_eq!(got.len(), data.len(), "client {i}: length");
            assert_eq!(sha(&got), sha(&data), "client {i}: content");
        });
    }
    within(SECS(240), "1000 echoes", async {
        while let Some(r) = tasks.join_next().await {
            r.expect("client task");
        }
    })
    .await;
    let total: u64 = backends.iter().map(|b| b.accepted()).sum();
    assert_eq!(total, clients);
    for b in &backends {
        assert!(
            b.accepted() > 200,
            "least_conn spreads the load: {} got {}",
            b.addr,
            b.accepted()
        );
    }
    wait_for(SECS(10), "active counters back to 0", || {
        proxy.active_to_backends() == 0 && proxy.service.stats.active_now() == 0
    })
    .await;
    // Only the listeners remain: one for the proxy, one per backend.
    wait_for(
        SECS(10),
        "no socket descriptor left but the listeners",
        || socket_fds_on(&ends) == ends.len(),
    )
    .await;
    let up: u64 = proxy
        .service
        .pool
        .members()
        .iter()
        .map(|b| b.stats.bytes().0)
        .sum();
    let down: u64 = proxy
        .service
        .pool
        .members()
        .iter()
        .map(|b| b.stats.bytes().1)
        .sum();
    assert_eq!(up, clients << 20, "bytes up counted exactly");
    assert_eq!(down, clients << 20, "bytes down counted exactly");
}

/// reliability.md `half-close-then-answer`: the client sends 64 KiB and shuts its write side; the backend answers 4 MiB after EOF.
async fn client_half_close_then_large_answer(mode: RelayMode) {
    let answer = payload(2, 4 << 20);
    let expect = answer.clone();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let answer = answer.clone();
        let seen_tx = seen_tx.clone();
        async move {
            let got = read_all(&mut s).await.expect("backend reads to EOF");
            let _ = seen_tx.send(got.len());
            s.write_all(&answer).await.expect("answer");
            s.shutdown().await.expect("fin");
        }
    })
    .await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(&payload(1, 64 << 10)).await.unwrap();
    c.shutdown().await.unwrap();
    let got = within(SECS(30), "answer after half-close", read_all(&mut c))
        .await
        .expect("clean EOF");
    assert_eq!(sha(&got), sha(&expect));
    assert_eq!(seen_rx.recv_timeout(SECS(5)).unwrap(), 64 << 10);
    proxy.wait_ended(Outcome::ClientClosed, 1).await;
}

/// reliability.md `backend-speaks-first`: the backend sends a 1 MiB banner and half-closes while it keeps reading; both directions
/// complete and no socket is left in CLOSE_WAIT or FIN_WAIT2.
async fn backend_speaks_first_and_half_closes(mode: RelayMode) {
    let banner = payload(3, 1 << 20);
    let upload = payload(4, 512 << 10);
    let (b, u) = (banner.clone(), upload.clone());
    let (ok_tx, ok_rx) = std::sync::mpsc::channel();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let (b, u, ok_tx) = (b.clone(), u.clone(), ok_tx.clone());
        async move {
            s.write_all(&b).await.expect("banner");
            s.shutdown().await.expect("half-close");
            let got = read_all(&mut s).await.expect("read the upload");
            let _ = ok_tx.send(sha(&got) == sha(&u));
        }
    })
    .await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let got = within(SECS(30), "banner", read_all(&mut c))
        .await
        .expect("banner then EOF");
    assert_eq!(sha(&got), sha(&banner));
    // The backend's half-close must not stop the other direction.
    c.write_all(&upload)
        .await
        .expect("upload after backend FIN");
    c.shutdown().await.unwrap();
    assert!(
        ok_rx.recv_timeout(SECS(30)).expect("backend verdict"),
        "upload corrupted"
    );
    drop(c);
    wait_for(
        SECS(10),
        "no CLOSE_WAIT/FIN_WAIT2 on proxy or backend addresses",
        || {
            tcp_states_on(&[proxy.addr, backend.addr])
                .into_iter()
                .all(|st| st != TCP_CLOSE_WAIT && st != TCP_FIN_WAIT2)
        },
    )
    .await;
    proxy.wait_ended(Outcome::BackendClosed, 1).await;
}

/// reliability.md `write-and-close`: the backend writes 8 MiB and closes at once; the client reads slowly; nothing is lost.
async fn backend_writes_and_closes_while_client_reads_slowly(mode: RelayMode) {
    let data = payload(5, 8 << 20);
    let d = data.clone();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let d = d.clone();
        async move {
            s.write_all(&d).await.expect("write 8 MiB");
            // dropped here: close right after the last write
        }
    })
    .await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    within(SECS(60), "slow read of 8 MiB", async {
        loop {
            let n = c.read(&mut chunk).await.expect("no reset");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            tokio::time::sleep(Duration::from_millis(2)).await; // the slow reader
        }
    })
    .await;
    assert_eq!(got.len(), data.len());
    assert_eq!(sha(&got), sha(&data));
}

/// reliability.md `reset-passed-on`: the backend aborts with RST mid-stream; the client must see a reset, not a clean EOF.
async fn backend_reset_reaches_the_client_as_a_reset(mode: RelayMode) {
    let backend = Backend::start([127, 0, 0, 2], |s| async move {
        let mut s = s;
        let mut go = [0u8; 1];
        s.read_exact(&mut go).await.expect("client's go");
        s.write_all(&payload(6, 256 << 10)).await.expect("write");
        rst_on_drop(&s);
        // dropped with linger 0: RST
    })
    .await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"g").await.unwrap();
    let r = within(SECS(10), "reset reaches client", read_all(&mut c)).await;
    let e = r.expect_err("client must see a reset, not a clean EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    proxy.wait_ended(Outcome::BackendReset, 1).await;
}

/// reliability.md `reset-passed-on`: the client aborts with RST mid-stream; the backend must see a reset.
async fn client_reset_reaches_the_backend_as_a_reset(mode: RelayMode) {
    let (tx, rx) = std::sync::mpsc::channel();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(read_all(&mut s).await.map(|v| v.len()));
        }
    })
    .await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(&payload(7, 256 << 10)).await.unwrap();
    wait_for(SECS(10), "proxy connected to the backend", || {
        proxy.backend(backend.addr).active() == 1
    })
    .await;
    rst_on_drop(&c);
    drop(c);
    let r = rx.recv_timeout(SECS(10)).expect("backend finished");
    let e = r.expect_err("backend must see a reset, not a clean EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    proxy.wait_ended(Outcome::ClientReset, 1).await;
}

/// reliability.md `half-close-timeout`: the client half-closes and the backend never answers; after `half_close_timeout` of
/// silence both sockets are closed.
async fn half_close_timeout_closes_both_sides(mode: RelayMode) {
    let (probe_tx, probe_rx) = oneshot::channel::<()>();
    let (verdict_tx, verdict_rx) = oneshot::channel::<bool>();
    let slots = std::sync::Mutex::new(Some((probe_rx, verdict_tx)));
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let slot = slots.lock().unwrap().take();
        async move {
            let Some((probe_rx, verdict_tx)) = slot else {
                return;
            };
            read_all(&mut s).await.expect("EOF from client");
            // Never answer. When told, check that the proxy closed its side: writes then fail (RST).
            let _ = probe_rx.await;
            let mut closed = false;
            for _ in 0..50 {
                if s.write_all(b"x").await.is_err() {
                    closed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = verdict_tx.send(closed);
        }
    })
    .await;
    let timeout = Duration::from_millis(400);
    let proxy = Proxy::start(&service_yaml(
        &[backend.addr],
        mode,
        "half_close_timeout: 400ms",
    ))
    .await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"request").await.unwrap();
    // Before the FIN leaves: the proxy's clock starts when it reads it, which on a loaded machine can
    // come before this task runs again after `shutdown`.
    let t0 = Instant::now();
    c.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = within(SECS(10), "client side closed", c.read_to_end(&mut sink)).await;
    assert!(
        t0.elapsed() >= timeout,
        "closed before the timeout: {:?}",
        t0.elapsed()
    );
    probe_tx.send(()).unwrap();
    assert!(
        within(SECS(10), "backend verdict", verdict_rx)
            .await
            .unwrap(),
        "backend side left open"
    );
    proxy.wait_ended(Outcome::HalfCloseTimeout, 1).await;
}

/// A half-closed connection that keeps streaming is not cut by `half_close_timeout`: the timer measures
/// silence, not age. The stream lasts twice the timeout with a chunk every 50 ms; the timeout is 20
/// gaps long, so only a stall of the whole machine longer than 1 s could cut it.
async fn half_closed_stream_outlives_the_half_close_timeout(mode: RelayMode) {
    let backend = Backend::start([127, 0, 0, 2], |mut s| async move {
        read_all(&mut s).await.expect("request");
        for i in 0..40 {
            s.write_all(&payload(i, 512)).await.expect("stream");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.shutdown().await.expect("fin");
    })
    .await;
    let proxy = Proxy::start(&service_yaml(
        &[backend.addr],
        mode,
        "half_close_timeout: 1s",
    ))
    .await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET").await.unwrap();
    c.shutdown().await.unwrap();
    let got = within(SECS(10), "whole stream", read_all(&mut c))
        .await
        .expect("clean EOF");
    assert_eq!(
        got.len(),
        40 * 512,
        "2 s of streaming survives a 1 s half-close timeout"
    );
}

/// reliability.md `stall-timeout`, on every engine but `uring`: a client that asked for a stream
/// and stopped reading is cut at `stall_timeout` (the backend's writes fail, the client reads a
/// reset, `end: stall_timeout`), long before `idle_timeout`; a client that reads slowly beside it
/// is not, though its destination pushes back all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_cut_at_stall_timeout_and_a_slow_one_is_not() {
    for mode in [
        RelayMode::Copy,
        RelayMode::Splice,
        RelayMode::Epoll,
        RelayMode::Ring,
    ] {
        reader_that_stops_is_cut_at_stall_timeout(mode).await;
    }
}

async fn reader_that_stops_is_cut_at_stall_timeout(mode: RelayMode) {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    let broken = Arc::new(AtomicUsize::new(0));
    let seen = broken.clone();
    // Streams 32 KiB chunks (at most 20 s, 1 GiB) until a write fails.
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let broken = seen.clone();
        async move {
            let mut go = [0u8; 2];
            if s.read_exact(&mut go).await.is_err() {
                return;
            }
            let chunk = payload(3, 32 << 10);
            let end = Instant::now() + SECS(20);
            for _ in 0..(1 << 15) {
                if Instant::now() >= end {
                    return;
                }
                if s.write_all(&chunk).await.is_err() {
                    broken.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    })
    .await;
    let proxy = Proxy::start(&service_yaml(
        &[backend.addr],
        mode,
        "idle_timeout: 1h\nstall_timeout: 1s",
    ))
    .await;
    let mut stopped = TcpStream::connect(proxy.addr).await.unwrap();
    stopped.write_all(b"go").await.unwrap();
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"go").await.unwrap();
    // The slow reader takes 32 KiB every 50 ms for 3 s: three stall timeouts.
    let mut buf = vec![0u8; 32 << 10];
    let mut got = 0usize;
    for _ in 0..60 {
        let n = within(SECS(5), "the slow reader's next bytes", slow.read(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: the slow reader was cut: {e}"));
        assert!(n > 0, "{mode:?}: the slow reader got EOF");
        got += n;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.wait_ended(Outcome::StallTimeout, 1).await;
    wait_for(SECS(5), "the backend's write to fail", || {
        broken.load(Relaxed) == 1
    })
    .await;
    // What the stopped reader was sent sits in its socket; behind it, the reset.
    let mut sink = vec![0u8; 1 << 20];
    let ended = within(SECS(5), "the stopped reader's reset", async {
        loop {
            match stopped.read(&mut sink).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{mode:?}: the stopped reader sees a reset, not the end of the stream"
    );
    // Only the one that stopped was cut.
    assert_eq!(
        proxy.service.stats.ended(Outcome::StallTimeout),
        1,
        "{mode:?}: {}",
        proxy.ended_so_far()
    );
    assert!(got >= 60, "{mode:?}: the slow reader read {got} bytes");
    let n = within(SECS(5), "the slow reader's last bytes", slow.read(&mut buf))
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: the slow reader was cut after: {e}"));
    assert!(n > 0, "{mode:?}: the slow reader got EOF after");
}

/// reliability.md `idle-timeout`: a silent connection is closed at `idle_timeout`; a trickle keeps one alive.
async fn idle_timeout_closes_silence_but_not_a_trickle(mode: RelayMode) {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "idle_timeout: 300ms")).await;

    let mut trickle = TcpStream::connect(proxy.addr).await.unwrap();
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let t0 = Instant::now();
    // Trickle one byte every 100 ms for 1.2 s (four idle periods).
    let mut buf = [0u8; 1];
    for _ in 0..12 {
        trickle.write_all(b"k").await.unwrap();
        within(SECS(5), "echo of the trickle", trickle.read_exact(&mut buf))
            .await
            .expect("alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t0.elapsed() > Duration::from_millis(1200));
    // The silent one was closed long ago, after ≈ 300 ms.
    let mut sink = Vec::new();
    let n = within(
        SECS(1),
        "silent connection closed",
        silent.read_to_end(&mut sink),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0);
    trickle.write_all(b"k").await.unwrap();
    within(SECS(5), "trickle still alive", trickle.read_exact(&mut buf))
        .await
        .expect("alive");
    let t1 = Instant::now();
    let _ = within(
        SECS(5),
        "trickle closed once silent",
        trickle.read_to_end(&mut sink),
    )
    .await;
    assert!(
        t1.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        t1.elapsed()
    );
    assert_eq!(proxy.service.stats.ended(Outcome::IdleTimeout), 2);
}
