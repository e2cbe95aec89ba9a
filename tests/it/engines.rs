//! Which relay engine a connection actually runs on. These counts assume a pipe is free when a
//! direction turns to splice: the pool is process-wide, the whole suite is one process, and the
//! 1000-client tests of `relay::` exhaust it on purpose (those connections fall back to copying).
//! They do not meet because of libtest's order: it starts tests in name order, one per CPU at a
//! time, and some fifty tests come between `engines::` and `relay::` (on a machine with that many
//! CPUs they could).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::common::*;
use sluicegate::config::RelayMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that answers `n` bytes after reading the request to EOF.
async fn sender(n: usize) -> Backend {
    Backend::start([127, 0, 0, 2], move |mut s| async move {
        if read_all(&mut s).await.is_ok() {
            let _ = s.write_all(&payload(1, n)).await;
        }
    })
    .await
}

async fn spliced_after(mode: RelayMode, answer: usize) -> u64 {
    let backend = sender(answer).await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let got = round_trip(proxy.addr, b"request").await.expect("served");
    assert_eq!(sha(&got), sha(&payload(1, answer)), "{mode:?}: content");
    // round_trip sends its FIN first
    proxy.wait_ended(sluicegate::Outcome::ClientClosed, 1).await;
    proxy.service.stats.spliced_total()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_never_splices() {
    assert_eq!(spliced_after(RelayMode::Copy, 4 << 20).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_splices_even_small_exchanges() {
    assert_eq!(spliced_after(RelayMode::Splice, 100).await, 1);
}

/// `epoll` copies small exchanges and switches to splice once a direction carries bulk data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_splices_bulk_and_copies_small() {
    assert_eq!(
        spliced_after(RelayMode::Epoll, 100).await,
        0,
        "small answer copied"
    );
    assert_eq!(
        spliced_after(RelayMode::Epoll, 4 << 20).await,
        1,
        "bulk answer spliced"
    );
}

/// A trickle of small messages never leaves the copy path in `epoll`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_keeps_request_response_traffic_on_copy() {
    let backend = Backend::echo([127, 0, 0, 3]).await;
    let proxy = Proxy::start(&service_yaml(&[backend.addr], RelayMode::Epoll, "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 512];
    for i in 0..200u64 {
        let msg = payload(i, 512);
        s.write_all(&msg).await.unwrap();
        within(Duration::from_secs(5), "echo", s.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(buf[..], msg[..]);
    }
    drop(s);
    proxy.wait_ended(sluicegate::Outcome::ClientClosed, 1).await;
    assert_eq!(proxy.service.stats.spliced_total(), 0);
    // `epoll` never uses a ring.
    assert_eq!(proxy.service.stats.ring_total(), 0);
}

/// `auto` (no `relay:` key) puts a plain TCP service alone on its address on the ring workers, each
/// connection counted on a ring, and one that routes by `sni` on epoll, since the ring workers read
/// no hello. Each reports the engine it runs. Where io_uring is unavailable both run epoll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_puts_plain_tcp_on_the_ring_and_a_routed_service_on_epoll() {
    let backend = sender(100).await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 10s}}\nlog: {{level: warn}}\nservices:\n  - name: plain\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{b}\"}}]\n  - name: named\n    listen: 127.0.0.1:0\n    sni: [named.example]\n    backends: [{{address: \"{b}\"}}]\n",
        b = backend.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let relay = |name: &str| proxy.control.service(name).expect(name).view().relay;
    assert_eq!(relay("named"), "epoll", "routed by name: the hello is read");
    let plain = proxy.control.service("plain").expect("plain");
    assert_on_ring(&plain, "relay: auto");
    let on_ring = relay("plain") == "ring";
    if !on_ring {
        assert_eq!(relay("plain"), "epoll");
    }
    for _ in 0..3 {
        let got = round_trip(proxy.addr, b"request").await.expect("served");
        assert_eq!(sha(&got), sha(&payload(1, 100)), "content");
    }
    proxy.wait_ended(sluicegate::Outcome::ClientClosed, 3).await;
    assert_eq!(
        proxy.service.stats.ring_total(),
        if on_ring { 3 } else { 0 },
        "plain TCP alone: every connection on the ring workers"
    );
}

/// `ring` serves its service on the ring workers' threads, not the tokio workers': every connection
/// counted as on a ring, bulk answers (only) spliced, the routing counters and the backend's live byte counts
/// exact, and the workers' threads there to be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_serves_its_service_on_the_ring_workers() {
    for answer in [100, 4 << 20] {
        let backend = sender(answer).await;
        let proxy = Proxy::start(&service_yaml(&[backend.addr], RelayMode::Ring, "")).await;
        for _ in 0..3 {
            let got = round_trip(proxy.addr, b"request").await.expect("served");
            assert_eq!(sha(&got), sha(&payload(1, answer)), "content");
        }
        proxy.wait_ended(sluicegate::Outcome::ClientClosed, 3).await;
        let stats = &proxy.service.stats;
        assert_eq!(stats.accepted_total(), 3);
        assert_eq!(stats.ring_total(), 3, "every connection on a ring");
        let bulk = answer > 16 << 10;
        assert_eq!(
            stats.spliced_total(),
            if bulk { 3 } else { 0 },
            "{answer} B answers: a bulk direction moves to splice, a small one never"
        );
        assert_eq!(stats.bytes_total().1, 3 * answer as u64);
        let b = proxy.backend(backend.addr);
        assert_eq!(b.stats.bytes().0, 3 * 7, "live counts, flushed at the end");
        assert_eq!(b.stats.bytes().1, 3 * answer as u64);
        assert_eq!(b.active(), 0);
        let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        assert!(
            threads.iter().any(|n| n.starts_with("sluicegate-r")),
            "ring worker threads: {threads:?}"
        );
    }
}

/// Thread names of process `pid` now (the kernel's io-wq workers show up as `iou-wrk-N` threads of
/// the process whose ring punted an operation to them).
fn thread_names(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new(); // Exited: nothing more to see.
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The ring workers never have the kernel run an operation on an io-wq thread (`iou-wrk`): every
/// operation they use completes inline or from a socket's wake-up, and the ones that would be
/// punted (SHUTDOWN, SPLICE, and a send that finds no room after its poll fired) are not used or
/// not left to the kernel (`MSG_DONTWAIT` and the worker's own poll). Watched in a process of its own (threads sampled every
/// 2 ms) through keep-alive exchanges, connection churn, bulk both ways, and a drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_workers_never_hand_an_operation_to_an_io_wq_thread() {
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = format!(
        "log: {{level: info, format: json}}\nshutdown: {{delay: 0s, drain_timeout: 5s}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: ring\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    // Before Linux 6.10 an accept that loses its client to another worker goes to io-wq by
    // design (no IORING_ACCEPT_DONTWAIT): the claim is for kernels that have it.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    if !matches!((numbers.next(), numbers.next()), (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= (6, 10))
    {
        eprintln!(
            "skipped: Linux {} has no IORING_ACCEPT_DONTWAIT",
            release.trim()
        );
        return;
    }
    let mut sg = tokio::task::block_in_place(|| crate::cli::Sg::start(&yaml));
    let listening = sg.wait_line(Duration::from_secs(5), |l| l["msg"] == "listening");
    if listening["relay"] != "ring" {
        eprintln!(
            "skipped: no ring worker here (the service runs as {})",
            listening["relay"]
        );
        return;
    }
    let (pid, addr) = (sg.pid(), sg.addr);

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (seen, done) = (seen.clone(), done.clone());
        std::thread::spawn(move || {
            // Bounded: 60,000 samples of 2 ms at most (2 minutes).
            for _ in 0..60_000 {
                if done.load(Relaxed) {
                    break;
                }
                seen.lock().unwrap().extend(thread_names(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Keep-alive: 16 connections, 200 small exchanges each.
    let keep_alive = (0..16).map(|i| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).unwrap();
            let msg = payload(i, 64);
            let mut back = [0u8; 64];
            for _ in 0..200 {
                s.write_all(&msg).await.expect("write");
                s.read_exact(&mut back).await.expect("echo");
                assert_eq!(&back[..], &msg[..]);
            }
        })
    });
    // Churn: 1,600 connections, one exchange each, 32 at a time.
    let churn = (0..32u64).map(|i| {
        tokio::spawn(async move {
            for j in 0..50 {
                let got = round_trip(addr, b"hello").await.expect("served");
                assert_eq!(got, b"hello", "churn {i}/{j}");
            }
        })
    });
    // Bulk: 4 connections of 16 MiB each way, sends that fill the sockets' buffers.
    let bulk = (0..4u64).map(|i| {
        tokio::spawn(async move {
            let data = payload(100 + i, 16 << 20);
            let got = round_trip(addr, &data).await.expect("served");
            assert_eq!(sha(&got), sha(&data), "bulk {i}");
        })
    });
    let all: Vec<_> = keep_alive.chain(churn).chain(bulk).collect();
    within(Duration::from_secs(60), "the load", async {
        for t in all {
            t.await.expect("a client");
        }
    })
    .await;
    // A drain with connections open: half-closes and closes while the workers stop.
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(TcpStream::connect(addr).await.expect("connect"));
    }
    sg.signal(libc::SIGTERM);
    for s in &mut open {
        s.shutdown().await.expect("half-close");
    }
    let code = tokio::task::block_in_place(|| sg.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, 0, "drained");
    done.store(true, Relaxed);
    sampler.join().unwrap();

    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().any(|n| n.starts_with("sluicegate-r")),
        "the ring workers were seen: {seen:?}"
    );
    let punted: Vec<_> = seen.iter().filter(|n| n.starts_with("iou-")).collect();
    assert!(punted.is_empty(), "io_uring kernel threads: {punted:?}");
}

/// The value of each `name{worker="…"}` line of a `/metrics` page, by worker.
fn per_worker(page: &str, name: &str) -> Vec<(String, u64)> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix("{worker=\"")?;
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `/metrics` has no ring worker until a `relay: ring` service starts them; then one series per
/// worker, whose accepts add up to the clients served and whose open connections go back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_workers_counters_are_on_the_metrics_page() {
    use crate::common::http::get;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let with_admin = |relay| {
        service_yaml(&[backend.addr], relay, "")
            .replace("services:", "admin: {listen: \"127.0.0.1:0\"}\nservices:")
    };
    let plain = Proxy::start(&with_admin(RelayMode::Epoll)).await;
    let page = get(plain.admin.unwrap(), "/metrics").await.body;
    assert!(
        !page.contains("sluicegate_ring_accepted_total{"),
        "no ring worker without a ring service"
    );

    let p = Proxy::start(&with_admin(RelayMode::Ring)).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let page = get(p.admin.unwrap(), "/metrics").await.body;
    let accepted = per_worker(&page, "sluicegate_ring_accepted_total");
    assert!(!accepted.is_empty(), "{page}");
    assert_eq!(
        accepted.iter().map(|(_, n)| n).sum::<u64>(),
        5,
        "{accepted:?}"
    );
    let open = per_worker(&page, "sluicegate_ring_connections");
    assert_eq!(open.iter().map(|(_, n)| n).sum::<u64>(), 5, "{open:?}");
    let armed = per_worker(&page, "sluicegate_ring_receives_armed_total");
    assert!(armed.iter().map(|(_, n)| n).sum::<u64>() >= 10, "{armed:?}");
    drop(held);
    p.wait_ended(sluicegate::Outcome::ClientClosed, 5).await;
    let admin = p.admin.unwrap();
    wait_until(
        Duration::from_secs(5),
        "no connection open",
        || async move {
            let page = get(admin, "/metrics").await.body;
            per_worker(&page, "sluicegate_ring_connections")
                .iter()
                .all(|(_, n)| *n == 0)
        },
    )
    .await;
    // The ring's per-service count, and its 0.1 names kept until 0.2 (metric and /stats field),
    // read the same.
    let page = get(admin, "/metrics").await.body;
    for name in [
        "sluicegate_connections_ring_total{",
        "sluicegate_connections_uring_total{",
    ] {
        let line = page.lines().find(|l| l.starts_with(name));
        let line = line.unwrap_or_else(|| panic!("{name} on the page:\n{page}"));
        assert!(line.ends_with(" 5"), "{line}");
    }
    // /stats shows the last per-second frame: the next one has every end counted.
    wait_until(
        Duration::from_secs(5),
        "/stats: ring and uring 5",
        || async move {
            let stats = get(admin, "/stats").await.json();
            let service = &stats["services"][0];
            (&service["ring"], &service["uring"]) == (&5.into(), &5.into())
        },
    )
    .await;
}

/// The pool lines of every ring worker from `/metrics`, for a failure message.
fn pool_gauges(page: &str) -> String {
    page.lines()
        .filter(|l| {
            l.starts_with("sluicegate_ring_pool")
                || l.starts_with("sluicegate_ring_receives")
                || l.starts_with("sluicegate_ring_receive_cancels")
                || l.starts_with("sluicegate_ring_accepted")
                || l.starts_with("sluicegate_ring_connections")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Clients that connect to `addr` with a socket that takes a few KiB and never read, `n` of them.
fn stalled_clients(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect(&addr.into()).expect("connect");
            s.into()
        })
        .collect()
}

/// reliability.md `ring-pool-dry`: two ring workers, each with 200 downloads whose clients never
/// read while their backend trickles 1,000 bytes every 20 ms (SSE, chat, pub/sub), held until
/// every one of those backends' writes blocks (everything between is full). New echo clients are
/// then answered on every worker, each within 1 s (a bound on a hang: before, the stalled
/// downloads held the whole pool and a new client got nothing until they ended, an hour later at
/// `idle_timeout`). The workers' pool gauges are in every failure message. Run in a process of its
/// own (the ring workers are per process), with two workers (`SLUICEGATE_WORKERS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_trickle_downloads_leave_every_ring_worker_serving_new_clients() {
    use crate::common::http::get;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    const WORKERS: usize = 2;
    const STALLED_PER_WORKER: u64 = 200;
    const ANSWER_WITHIN: Duration = Duration::from_secs(1);
    raise_fd_limit();
    let blocked = Arc::new(AtomicUsize::new(0));
    let counted = blocked.clone();
    let trickle = Backend::start([127, 0, 0, 2], move |mut s| {
        let blocked = counted.clone();
        async move {
            // A send buffer of a few KiB, fixed (no autotuning), so that the writes block soon
            // after the ring stops reading, not after megabytes.
            let _ = socket2::SockRef::from(&s).set_send_buffer_size(4096);
            let mut seen_blocked = false;
            // Bounded: 15,000 rounds of 20 ms (5 minutes); the test's end resets the connection.
            for _ in 0..15_000 {
                match tokio::time::timeout(Duration::from_millis(500), s.write_all(&[7u8; 1000]))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    // Everything between this backend and its client is full.
                    Err(_) if !seen_blocked => {
                        seen_blocked = true;
                        blocked.fetch_add(1, Relaxed);
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    let echo = Backend::echo([127, 0, 0, 3]).await;
    let yaml = format!(
        "log: {{level: info, format: json}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n  - name: trickle\n    listen: 127.0.0.1:0\n    relay: ring\n    backends: [{{address: \"{}\"}}]\n  - name: echo\n    listen: 127.0.0.1:0\n    relay: ring\n    backends: [{{address: \"{}\"}}]\n",
        trickle.addr, echo.addr
    );
    let mut sg = tokio::task::block_in_place(|| {
        crate::cli::Sg::start_configured(&yaml, "", |c| {
            c.env("SLUICEGATE_WORKERS", WORKERS.to_string());
        })
    });
    let addr_of = |sg: &mut crate::cli::Sg, service: &str| -> std::net::SocketAddr {
        let line = sg.wait_line(Duration::from_secs(10), |l| {
            l["msg"] == "listening" && l["service"] == service
        });
        assert_eq!(line["relay"], "ring", "{service} runs on the ring: {line}");
        line["listen"].as_str().unwrap().parse().unwrap()
    };
    let (trickle_addr, echo_addr) = (addr_of(&mut sg, "trickle"), addr_of(&mut sg, "echo"));
    let admin: std::net::SocketAddr = sg.wait_line(Duration::from_secs(10), |l| {
        l["msg"] == "admin API listening"
    })["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let metrics = || async move { get(admin, "/metrics").await.body };

    // Stalled downloads, 50 at a time, until each worker has accepted its 200 (the kernel spreads
    // clients over the workers' accepts, not evenly).
    let mut stalled = Vec::new();
    loop {
        let page = metrics().await;
        let accepted = per_worker(&page, "sluicegate_ring_accepted_total");
        if accepted.len() == WORKERS && accepted.iter().all(|(_, n)| *n >= STALLED_PER_WORKER) {
            break;
        }
        assert!(
            stalled.len() < 6 * WORKERS * STALLED_PER_WORKER as usize,
            "{} clients left a worker short of {STALLED_PER_WORKER} (or the ring never ran):\n{}",
            stalled.len(),
            pool_gauges(&page)
        );
        stalled.extend(tokio::task::block_in_place(|| {
            stalled_clients(trickle_addr, 50)
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while blocked.load(Relaxed) < stalled.len() {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{} of {} trickling backends blocked:\n{}",
                blocked.load(Relaxed),
                stalled.len(),
                pool_gauges(&metrics().await)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // New echo clients, until each worker has taken at least two of them.
    let before = per_worker(&metrics().await, "sluicegate_ring_accepted_total");
    for i in 0..64u64 {
        let answered = tokio::time::timeout(ANSWER_WITHIN, async {
            let mut s = TcpStream::connect(echo_addr).await?;
            let msg = payload(i, 64);
            s.write_all(&msg).await?;
            let mut back = [0u8; 64];
            s.read_exact(&mut back).await?;
            Ok::<bool, std::io::Error>(back[..] == msg[..])
        })
        .await;
        if !matches!(answered, Ok(Ok(true))) {
            panic!(
                "echo client {i}, beside {} stalled downloads: {answered:?}\n{}",
                stalled.len(),
                pool_gauges(&metrics().await)
            );
        }
        let now = per_worker(&metrics().await, "sluicegate_ring_accepted_total");
        let every_worker = now
            .iter()
            .zip(&before)
            .all(|((_, n), (_, was))| *n >= *was + 2);
        if every_worker {
            drop(stalled);
            return;
        }
    }
    panic!(
        "64 echo clients did not reach every worker twice:\n{}",
        pool_gauges(&metrics().await)
    );
}
