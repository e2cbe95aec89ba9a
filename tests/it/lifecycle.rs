//! Drain and restart (docs/reliability.md, "Lifecycle"), in process; the signal handling of the
//! binary itself is covered in `cli.rs`.

use std::time::Duration;
use tokio::time::Instant;

use crate::common::*;
use sluicegate::config::RelayMode;
use sluicegate::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Chunk `k` of the stream for `seed`.
fn chunk(seed: u64, k: usize) -> Vec<u8> {
    payload(seed * 1_000_003 + k as u64, 16384)
}

/// A backend that streams `chunks` chunks of 16 KiB with a pause between them, then closes; with
/// a `gate`, everything after the first chunk waits until the gate reads `true`.
async fn slow_streamer(
    ip: [u8; 4],
    chunks: usize,
    pause: Duration,
    gate: Option<tokio::sync::watch::Receiver<bool>>,
) -> Backend {
    Backend::start(ip, move |mut s| {
        let gate = gate.clone();
        async move {
            let mut seed = [0u8; 8];
            if s.read_exact(&mut seed).await.is_err() {
                return;
            }
            let seed = u64::from_le_bytes(seed);
            for k in 0..chunks {
                if s.write_all(&chunk(seed, k)).await.is_err() {
                    return;
                }
                if let (0, Some(mut gate)) = (k, gate.clone()) {
                    if gate.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(pause).await;
            }
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// reliability.md `drain-completes`: stop with 200 in-flight transfers: the listener closes while they are held, all 200 complete
/// intact, and the run ends with the last one rather than at the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_transfers_finish() {
    for mode in ENGINES {
        drain_with(mode).await;
    }
}

async fn drain_with(mode: RelayMode) {
    // The transfers hold after their first chunk until the listener is seen closed: a listener
    // that stayed open until the drain ended would never be seen closed. No clock is asked.
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let backend = slow_streamer([127, 0, 0, 2], 40, Duration::from_millis(25), Some(gate)).await;
    // A deadline far beyond the waits below: a run that ends within them did not wait for it.
    let y = service_yaml(&[backend.addr], mode, "").replace(
        "shutdown: {drain_timeout: 10s}",
        "shutdown: {drain_timeout: 60s}",
    );
    assert!(y.contains("drain_timeout: 60s"), "the deadline was not set");
    let mut proxy = Proxy::start(&y).await;
    let mut tasks = tokio::task::JoinSet::new();
    let started = std::sync::Arc::new(tokio::sync::Barrier::new(201));
    for i in 0..200u64 {
        let (addr, started) = (proxy.addr, started.clone());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&i.to_le_bytes()).await.expect("seed");
            let mut first = [0u8; 1];
            s.read_exact(&mut first).await.expect("transfer started");
            started.wait().await;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.expect("transfer completes");
            let mut all = vec![first[0]];
            all.extend(rest);
            let want: Vec<u8> = (0..40).flat_map(|k| chunk(i, k)).collect();
            assert_eq!(sha(&all), sha(&want), "transfer {i} intact");
        });
    }
    within(SECS(30), "200 transfers in flight", started.wait()).await;
    proxy.signal_stop();
    // The listener closes while all 200 are held: new connections are refused.
    within(SECS(15), "listener closed with 200 transfers held", async {
        while TcpStream::connect(proxy.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        tasks.try_join_next().is_none(),
        "a transfer ended before the gate opened"
    );
    open_gate.send_replace(true);
    while let Some(r) = within(SECS(30), "transfers complete", tasks.join_next()).await {
        r.expect("transfer");
    }
    let stopped = within(
        SECS(15),
        "run ends well before the deadline",
        proxy.stopped(),
    )
    .await;
    assert_eq!(stopped.cut, 0, "nothing was cut");
    assert_eq!(proxy.service.stats.ended(Outcome::BackendClosed), 200);
}

/// `shutdown.delay`: new connections are still accepted during the delay, refused after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_accepting() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let mut y = service_yaml(&[backend.addr], RelayMode::Copy, "");
    y = y.replace(
        "shutdown: {drain_timeout: 10s}",
        "shutdown: {drain_timeout: 10s, delay: 600ms}",
    );
    let mut proxy = Proxy::start(&y).await;
    proxy.signal_stop();
    let t = Instant::now();
    let got = round_trip(proxy.addr, b"during the delay")
        .await
        .expect("accepted during the delay");
    // Served at all: after the delay the listener is closed and the round trip above would fail.
    assert_eq!(got, b"during the delay");
    within(SECS(10), "run ends", proxy.stopped()).await;
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "stopped before the delay ended"
    );
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "refused after the delay"
    );
}

/// reliability.md `drain-deadline`: transfers that never end; at the drain deadline they are cut with a reset and the run
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_what_remains() {
    for mode in ENGINES {
        let backend =
            slow_streamer([127, 0, 0, 2], 1_000_000, Duration::from_millis(20), None).await;
        let mut y = service_yaml(&[backend.addr], mode, "");
        y = y.replace(
            "shutdown: {drain_timeout: 10s}",
            "shutdown: {drain_timeout: 1s}",
        );
        let mut proxy = Proxy::start(&y).await;
        let mut clients = Vec::new();
        for i in 0..20u64 {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(&i.to_le_bytes()).await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            clients.push(s);
        }
        let t = Instant::now();
        proxy.signal_stop();
        let stopped = within(SECS(10), "run ends at the deadline", proxy.stopped()).await;
        // Not before the deadline; the upper side is the 10 s wait above, with the cuts counted below.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(950), "ended after {took:?}");
        assert_eq!(stopped.cut, 20);
        assert_eq!(proxy.service.stats.ended(Outcome::DrainDeadline), 20);
        for mut c in clients {
            let r = within(SECS(10), "client sees the cut", read_all(&mut c)).await;
            assert!(
                r.is_err(),
                "a cut transfer must end in a reset, not a clean EOF"
            );
        }
        assert_eq!(proxy.active_to_backends(), 0);
        assert_eq!(proxy.service.stats.active_now(), 0);
    }
}

/// reliability.md `restart-time-wait`: restart on the same port right after many connections left TIME_WAIT sockets on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_binds_despite_time_wait() {
    // The backend closes first, so the proxy closes the client side first: TIME_WAIT on the listen port.
    let backend = Backend::start([127, 0, 0, 2], |s| async move { drop(s) }).await;
    let mut proxy = Proxy::start(&service_yaml(&[backend.addr], RelayMode::Copy, "")).await;
    let port = proxy.addr.port();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = read_all(&mut s).await;
    }
    proxy.signal_stop();
    within(SECS(10), "run ends", proxy.stopped()).await;
    // TIME_WAIT sockets are usually left on the port now, but the kernel skips TIME_WAIT when the
    // machine-wide bucket limit is full (other tests churn hard). An established connection on the port
    // blocks a bind without SO_REUSEADDR just the same, so hold one to make the test deterministic.
    let placeholder = listen(proxy.addr);
    let _client_side = TcpStream::connect(proxy.addr).await.unwrap();
    let (_server_side, _) = placeholder.accept().await.unwrap();
    drop(placeholder);
    // (std's TcpListener::bind sets SO_REUSEADDR itself, so check with a bare socket.)
    let plain = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(
        plain.bind(&proxy.addr.into()).is_err(),
        "the port must be busy for the test to mean anything"
    );
    let y = service_yaml(&[backend.addr], RelayMode::Copy, "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let again = Proxy::start(&y).await;
    assert_eq!(again.addr.port(), port);
    let mut s = TcpStream::connect(again.addr).await.expect("serving again");
    assert!(read_all(&mut s).await.is_ok());
}
