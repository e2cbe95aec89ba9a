//! Active health checks and their effect on traffic (docs/reliability.md, "Backend failure"), against replicas on
//! 127.0.0.2, .3, … whose `/health` the tests steer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

use crate::common::dns::FakeDns;
use crate::common::fleet::{replicas, spread, who, HealthMode, Replica, Session};
use crate::common::{wait_for, Proxy};
use sluicegate::Health;
use sluicegate::Outcome;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// One service `t` over `fleet` with these extra service keys.
fn yaml(fleet: &[Replica], extra: &str) -> String {
    let addrs: Vec<SocketAddr> = fleet.iter().map(|r| r.addr()).collect();
    crate::common::service_yaml(&addrs, sluicegate::config::RelayMode::Epoll, extra)
}

fn health_of(proxy: &Proxy, r: &Replica) -> Health {
    proxy.backend(r.addr()).health()
}

/// A `/health` turning 503 stops new traffic after `fall` failed probes (and a few in flight);
/// back after `rise` passed ones once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_endpoint_stops_and_resumes_traffic() {
    let (_port, fleet) = replicas(2, 3);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "balance: round_robin\nhealth: {kind: http, interval: 300ms, timeout: 200ms, rise: 2, fall: 3}",
    ))
    .await;
    // Start-up waits for the first probes, but only up to timeout + 0.5 s: on a machine loaded by the
    // other tests a first probe can take longer, so wait for it rather than assume it.
    wait_for(Duration::from_secs(10), "first probes passed", || {
        fleet
            .iter()
            .all(|r| health_of(&proxy, r) == Health::Healthy)
    })
    .await;
    assert_eq!(spread(proxy.addr, 30).await.len(), 3);

    // How soon is counted in probes, not timed: a stalled machine slows the probes too. Allowed:
    // `fall` failures, one in flight at the switch, and ten more (3 s) while the test's own thread
    // may lag behind the proxy's.
    fleet[1].set_status(503);
    let (t, asked) = (Instant::now(), fleet[1].health_requests());
    wait_for(Duration::from_secs(15), "marked down", || {
        health_of(&proxy, &fleet[1]) == Health::Unhealthy
    })
    .await;
    let probes = fleet[1].health_requests() - asked;
    eprintln!("down after {:?} and {probes} probes", t.elapsed());
    assert!(
        probes <= 3 + 10,
        "down only after {probes} probes; fall is 3"
    );
    let before = fleet[1].data_connections();
    let counts = spread(proxy.addr, 60).await;
    assert_eq!(
        counts.get(&ip(3)),
        None,
        "no traffic to the unhealthy backend: {counts:?}"
    );
    assert_eq!(fleet[1].data_connections(), before);

    fleet[1].set_status(200);
    let (t, asked) = (Instant::now(), fleet[1].health_requests());
    wait_for(Duration::from_secs(15), "back up", || {
        health_of(&proxy, &fleet[1]) == Health::Healthy
    })
    .await;
    let probes = fleet[1].health_requests() - asked;
    eprintln!("up after {:?} and {probes} probes", t.elapsed());
    assert!(probes <= 2 + 10, "up only after {probes} probes; rise is 2");
    assert_eq!(spread(proxy.addr, 30).await.len(), 3);
}

/// reliability.md `no-flap`: alternating results never flap; three straight failures do mark it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_probe_results_do_not_flap() {
    let (_port, fleet) = replicas(2, 1);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 20ms, timeout: 20ms, rise: 2, fall: 3}",
    ))
    .await;
    assert_eq!(health_of(&proxy, &fleet[0]), Health::Healthy);
    fleet[0].set_mode(HealthMode::Alternate);
    let start = fleet[0].health_requests();
    let b = proxy.backend(fleet[0].addr());
    wait_for(Duration::from_secs(10), "40 alternating probes", || {
        assert_eq!(b.health(), Health::Healthy, "flapped");
        fleet[0].health_requests() >= start + 40
    })
    .await;
    let history = b.probes();
    assert!(history.iter().any(|p| !p.ok) && history.iter().any(|p| p.ok));
    fleet[0].set_status(500);
    wait_for(Duration::from_secs(10), "down after 3 failures", || {
        b.health() == Health::Unhealthy
    })
    .await;
}

/// reliability.md `bad-health-endpoints`: only 2xx is healthy; hangs, floods, redirects, errors, garbage and silent closes
/// are not; reads are bounded; one probe in flight; no descriptor growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_2xx_is_healthy_whatever_the_endpoint_does() {
    let (_port, fleet) = replicas(2, 1);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 5ms, timeout: 5ms, rise: 1, fall: 1}",
    ))
    .await;
    let b = proxy.backend(fleet[0].addr());
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, Health);
    let cases: [Case; 6] = [
        (
            "hang",
            Box::new(|| fleet[0].set_mode(HealthMode::Hang)),
            Health::Unhealthy,
        ),
        (
            "10 MB 200",
            Box::new(|| fleet[0].set_mode(HealthMode::Huge)),
            Health::Healthy,
        ),
        (
            "301",
            Box::new(|| fleet[0].set_status(301)),
            Health::Unhealthy,
        ),
        (
            "204",
            Box::new(|| fleet[0].set_status(204)),
            Health::Healthy,
        ),
        (
            "500",
            Box::new(|| fleet[0].set_status(500)),
            Health::Unhealthy,
        ),
        (
            "garbage",
            Box::new(|| fleet[0].set_mode(HealthMode::Garbage)),
            Health::Unhealthy,
        ),
    ];
    for (what, set, want) in cases.iter() {
        // From the opposite state, so each case is a transition.
        if *want == Health::Healthy {
            fleet[0].set_mode(HealthMode::Close);
            wait_for(Duration::from_secs(10), "down first", || {
                b.health() == Health::Unhealthy
            })
            .await;
        } else {
            fleet[0].set_status(200);
            wait_for(Duration::from_secs(10), "up first", || {
                b.health() == Health::Healthy
            })
            .await;
        }
        set();
        let n = fleet[0].health_requests();
        wait_for(Duration::from_secs(10), what, || {
            b.health() == *want && fleet[0].health_requests() >= n + 2
        })
        .await;
        let last = b.probes().pop().expect("probed");
        eprintln!("{what}: {:?} {:?}", b.health(), last.error);
    }
    // 1000 rounds of misbehaving endpoints: no descriptor left behind.
    let modes = [
        HealthMode::Hang,
        HealthMode::Huge,
        HealthMode::Garbage,
        HealthMode::Close,
    ];
    for (i, mode) in modes.iter().enumerate() {
        fleet[0].set_mode(*mode);
        let n = fleet[0].health_requests();
        wait_for(
            Duration::from_secs(30),
            &format!("250 probes of round {i}"),
            || fleet[0].health_requests() >= n + 250,
        )
        .await;
    }
    fleet[0].set_status(200);
    wait_for(Duration::from_secs(10), "healthy", || {
        b.health() == Health::Healthy
    })
    .await;
    wait_for(Duration::from_secs(10), "probe sockets closed", || {
        // the listener, and at most one probe's two ends
        crate::common::socket_fds_on(&[fleet[0].addr()]) <= 3
    })
    .await;
}

/// At most one probe in flight per backend: probes that hang for ten intervals do not pile up. (The
/// backend sees the previous probe's close a moment late, hence at most 2 open from its side; without
/// the guarantee about ten would be.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_in_flight_even_when_probes_hang() {
    let (_port, fleet) = replicas(2, 1);
    let _p = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 10ms, timeout: 100ms, rise: 1, fall: 1}",
    ))
    .await;
    fleet[0].set_mode(HealthMode::Hang);
    let n = fleet[0].health_requests();
    wait_for(Duration::from_secs(10), "20 hanging probes", || {
        fleet[0].health_requests() >= n + 20
    })
    .await;
    let max = fleet[0].probes.max_open.load(Relaxed);
    assert!(max <= 2, "{max} probes open at once");
}

/// reliability.md `all-backends-down` with probes: every backend unhealthy: clients are closed at once, and traffic
/// resumes when one recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_closes_clients_at_once() {
    let (_port, fleet) = replicas(2, 2);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 50ms, timeout: 50ms, rise: 1, fall: 1}",
    ))
    .await;
    for r in &fleet {
        r.set_status(503);
    }
    wait_for(Duration::from_secs(10), "all down", || {
        proxy.service.pool.snapshot().ready.is_empty()
    })
    .await;
    // Closed at once: without a connect attempt to any backend (both still accept connections,
    // so an attempt would count as established or failed). Counted, not timed.
    let tried = || {
        fleet
            .iter()
            .map(|r| {
                let b = proxy.backend(r.addr());
                b.stats.total() + b.stats.failed()
            })
            .sum::<u64>()
    };
    let before = tried();
    for _ in 0..20 {
        assert!(who(proxy.addr).await.is_err(), "refused");
    }
    assert_eq!(
        tried(),
        before,
        "a connect was attempted while every backend was down"
    );
    assert_eq!(
        proxy.service.stats.ended(sluicegate::Outcome::NoBackend),
        20
    );
    fleet[1].set_status(200);
    wait_for(Duration::from_secs(10), "one back", || {
        !proxy.service.pool.snapshot().ready.is_empty()
    })
    .await;
    assert_eq!(spread(proxy.addr, 10).await, HashMap::from([(ip(3), 10)]));
}

/// A TCP probe: a listener is healthy, a closed port is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_probes_follow_the_listener() {
    let (_port, fleet) = replicas(2, 2);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: tcp, interval: 50ms, timeout: 50ms, rise: 2, fall: 2}",
    ))
    .await;
    assert_eq!(health_of(&proxy, &fleet[0]), Health::Healthy);
    let b = proxy.backend(fleet[1].addr());
    fleet[1].backend.kill();
    wait_for(Duration::from_secs(10), "closed port is down", || {
        b.health() == Health::Unhealthy
    })
    .await;
    assert_eq!(spread(proxy.addr, 20).await, HashMap::from([(ip(2), 20)]));
}

/// `health.port` probes another port than the traffic port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_can_use_another_port() {
    let (_port, fleet) = replicas(2, 1);
    let (health_port, health) = replicas(2, 1);
    let proxy = Proxy::start(&yaml(
        &fleet,
        &format!(
            "health: {{kind: http, port: {health_port}, interval: 50ms, timeout: 50ms, fall: 1}}"
        ),
    ))
    .await;
    assert!(health[0].health_requests() >= 1);
    assert_eq!(fleet[0].health_requests(), 0);
    health[0].set_status(503);
    let b = proxy.backend(fleet[0].addr());
    wait_for(Duration::from_secs(10), "down by the other port", || {
        b.health() == Health::Unhealthy
    })
    .await;
}

/// reliability.md `down-keeps-sessions`: a backend marked down keeps its idle sessions by default…
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_backend_keeps_its_sessions_by_default() {
    let (_port, fleet) = replicas(2, 1);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 100ms, timeout: 100ms, fall: 1}",
    ))
    .await;
    let mut sessions = Vec::new();
    for _ in 0..100 {
        sessions.push(Session::open(proxy.addr).await.expect("session").0);
    }
    fleet[0].set_status(503);
    let b = proxy.backend(fleet[0].addr());
    wait_for(Duration::from_secs(10), "down", || {
        b.health() == Health::Unhealthy
    })
    .await;
    // Well past one interval, counted in probes rather than waited for: a loaded machine slows
    // the probes and any cut alike.
    let probes = fleet[0].health_requests();
    wait_for(Duration::from_secs(10), "three more probes", || {
        fleet[0].health_requests() >= probes + 3
    })
    .await;
    for s in &mut sessions {
        s.ping().await.expect("kept");
    }
    assert_eq!(proxy.service.stats.ended(Outcome::BackendDown), 0);
}

/// … and closes them within one interval with `on_down: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_down_close_cuts_the_sessions() {
    let (_port, fleet) = replicas(2, 1);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 100ms, timeout: 100ms, fall: 1, on_down: close}",
    ))
    .await;
    let mut sessions = Vec::new();
    for _ in 0..100 {
        sessions.push(Session::open(proxy.addr).await.expect("session").0);
    }
    fleet[0].set_status(503);
    let b = proxy.backend(fleet[0].addr());
    wait_for(Duration::from_secs(10), "down", || {
        b.health() == Health::Unhealthy
    })
    .await;
    for s in &mut sessions {
        assert!(s.closed_within(Duration::from_secs(5)).await, "cut");
    }
    proxy.wait_ended(Outcome::BackendDown, 100).await;
}

/// A backend discovered before its app is healthy (Docker adds the record first) gets no traffic
/// until its first probe passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_waits_for_its_first_passing_probe() {
    let (port, fleet) = replicas(2, 2);
    fleet[1].set_status(503);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let yaml = format!(
        "log: {{level: warn}}\nresolver: {{nameservers: [\"{}\"]}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    balance: round_robin\n    discovery: {{refresh: 100ms}}\n    health: {{kind: http, interval: 100ms, timeout: 100ms, rise: 2, fall: 3}}\n    backends: [{{address: \"backend:{port}\"}}]\n",
        dns.addr
    );
    let proxy = Proxy::start(&yaml).await;
    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    wait_for(Duration::from_secs(10), "discovered", || {
        proxy.service.pool.members().len() == 2
    })
    .await;
    wait_for(Duration::from_secs(10), "probed", || {
        fleet[1].health_requests() >= 2
    })
    .await;
    assert_eq!(spread(proxy.addr, 30).await, HashMap::from([(ip(2), 30)]));
    assert_eq!(fleet[1].data_connections(), 0);
    fleet[1].set_status(200);
    wait_for(Duration::from_secs(10), "first pass", || {
        proxy.backend(fleet[1].addr()).health() == Health::Healthy
    })
    .await;
    assert_eq!(spread(proxy.addr, 30).await.len(), 2);
    // The view says where it came from and when DNS listed it.
    let view = proxy.backend(fleet[1].addr()).view();
    assert_eq!(view.sources[0].to_string(), format!("dns:backend:{port}"));
    assert!(view.dns_first_seen_ms.is_some() && view.dns_last_seen_ms >= view.dns_first_seen_ms);
    assert!(!view.probes.is_empty());
}

/// reliability.md `backend-killed` with discovery and probes: one of three backends killed under 40 new connections a
/// second; no connection is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_under_load_loses_nothing() {
    let (_port, fleet) = replicas(2, 3);
    let proxy = Proxy::start(&yaml(
        &fleet,
        "health: {kind: http, interval: 500ms, timeout: 200ms}\nconnect_attempts: 3",
    ))
    .await;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut failed = 0;
    let mut served = HashMap::<IpAddr, usize>::new();
    for i in 0..120 {
        tick.tick().await;
        if i == 40 {
            fleet[2].backend.kill();
        }
        match who(proxy.addr).await {
            Ok(ip) => *served.entry(ip).or_default() += 1,
            Err(e) => {
                eprintln!("connection {i}: {e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 0, "{served:?}");
    let b = proxy.backend(fleet[2].addr());
    wait_for(Duration::from_secs(10), "killed backend out", || {
        b.is_ejected() || b.health() == Health::Unhealthy
    })
    .await;
}

/// reliability.md `slow-start`: with slow start, a recovered backend's share ramps over the window, for every
/// policy that uses weights or counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_recovered_backend() {
    for policy in ["weighted_round_robin", "least_conn", "p2c"] {
        slow_start_ramps(policy).await;
    }
}

async fn slow_start_ramps(policy: &str) {
    let (_port, fleet) = replicas(2, 2);
    let proxy = Proxy::start(&yaml(
        &fleet,
        &format!("balance: {policy}\nslow_start: 2s\nhealth: {{kind: http, interval: 50ms, timeout: 50ms, rise: 1, fall: 1}}"),
    ))
    .await;
    let b = proxy.backend(fleet[1].addr());
    // Members present at start-up are not ramped.
    assert_eq!(b.eff_weight(), b.weight() * sluicegate::pool::WEIGHT_SCALE);
    fleet[1].set_status(503);
    wait_for(Duration::from_secs(10), "down", || {
        b.health() == Health::Unhealthy
    })
    .await;
    fleet[1].set_status(200);
    wait_for(Duration::from_secs(10), "up", || {
        b.health() == Health::Healthy
    })
    .await;
    // Shares of the recovered backend among 40 sessions held open at once (least-connections
    // balances what is open, not what was opened), sampled at 0, 0.5, 1 and 1.5 s.
    let up = Instant::now();
    let mut shares = Vec::new();
    for k in 0..4u32 {
        tokio::time::sleep_until(up + Duration::from_millis(500) * k).await;
        let mut held = Vec::new();
        let mut mine = 0;
        for _ in 0..40 {
            let (s, who) = Session::open(proxy.addr).await.expect("served");
            if who == ip(3) {
                mine += 1;
            }
            held.push(s);
        }
        shares.push(mine as f64 / 40.0);
        drop(held);
        wait_for(Duration::from_secs(10), "sessions closed", || {
            proxy.active_to_backends() == 0
        })
        .await;
    }
    eprintln!("{policy}: shares of the recovered backend per 500 ms: {shares:?}");
    assert!(shares[0] < 0.25, "{policy} starts low: {shares:?}");
    assert!(shares[0] < shares[2], "{policy} ramps: {shares:?}");
    // After the window: full weight (1:1).
    wait_for(Duration::from_secs(10), "full weight", || {
        b.eff_weight() == b.weight() * sluicegate::pool::WEIGHT_SCALE
    })
    .await;
    let counts = spread(proxy.addr, 200).await;
    assert!(
        counts.values().all(|&n| (70..=130).contains(&n)),
        "{policy}: {counts:?}"
    );
}

/// How a [`UdpResponder`] treats a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UdpMode {
    /// `PONG` to a `PING`.
    Answer = 0,
    /// Something else.
    Wrong = 1,
    /// Nothing.
    Silent = 2,
}

/// A UDP backend on an ephemeral port of 127.0.0.1, in this process, whose answer a test steers;
/// dropped, its port is closed (the host answers ICMP port-unreachable).
struct UdpResponder {
    addr: SocketAddr,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// Datagrams received.
    seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpResponder {
    async fn start() -> UdpResponder {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(UdpMode::Answer as u8));
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (m, s) = (mode.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                s.fetch_add(1, Relaxed);
                let answer: &[u8] = match m.load(Relaxed) {
                    0 if &buf[..n] == b"PING" => b"PONG",
                    0 | 1 => b"NOPE",
                    _ => continue,
                };
                let _ = sock.send_to(answer, from).await;
            }
        });
        UdpResponder {
            addr,
            mode,
            seen,
            task,
        }
    }

    fn set(&self, mode: UdpMode) {
        self.mode.store(mode as u8, Relaxed);
    }

    fn seen(&self) -> u64 {
        self.seen.load(Relaxed)
    }

    /// Closes the port (the socket goes with the task) and waits until it is closed.
    async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// sluicegate with one service whose one backend is `addr`, probed as `health` says.
async fn probing(addr: SocketAddr, health: &str) -> Proxy {
    // A UDP service: its backends answer datagrams, which is what these probes ask.
    Proxy::start(&format!(
        "shutdown: {{drain_timeout: 10s}}\nlog: {{level: warn}}\nservices:\n  - name: t\n    protocol: udp\n    listen: 127.0.0.1:0\n    health: {health}\n    backends:\n      - {{address: \"{addr}\"}}\n"
    ))
    .await
}

/// Waits until `b` is `want` and its last probe failed saying `says` (or passed, when empty).
async fn wait_health(b: &sluicegate::pool::Backend, want: Health, says: &str) {
    wait_for(
        Duration::from_secs(10),
        &format!("{want:?}: {says}"),
        || {
            let last = b.probes().pop();
            b.health() == want
                && last.is_some_and(|p| match &p.error {
                    None => says.is_empty(),
                    Some(e) => !says.is_empty() && e.contains(says),
                })
        },
    )
    .await;
}

/// reliability.md `udp-check`: `kind: udp`: a PING datagram answered PONG is healthy; another
/// answer or none is not, and the probe's record says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_probes_follow_the_replies() {
    let udp = UdpResponder::start().await;
    let proxy = probing(udp.addr, "{kind: udp, interval: 20ms, timeout: 300ms, rise: 1, fall: 1, steps: [{send: PING}, {expect: PONG}]}").await;
    let b = proxy.backend(udp.addr);
    wait_health(&b, Health::Healthy, "").await;
    assert!(udp.seen() >= 1);

    udp.set(UdpMode::Wrong);
    wait_health(
        &b,
        Health::Unhealthy,
        "udp: step 1: reply did not match \"PONG\": NOPE",
    )
    .await;
    udp.set(UdpMode::Answer);
    wait_health(&b, Health::Healthy, "").await;
    udp.set(UdpMode::Silent);
    let n = udp.seen();
    wait_health(&b, Health::Unhealthy, "udp: no reply within 300ms").await;
    assert!(udp.seen() > n, "the silent backend was asked");
    assert!(b.probes().iter().all(|p| p.counted));
}

/// reliability.md `udp-check`: `kind: udp` and `kind: dns` on a closed port: the host's ICMP
/// port-unreachable fails the probe at once. The timeout is a minute, and start-up waits for the
/// first probe, so only that can mark the backend down within the waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_udp_port_fails_the_probe_at_once() {
    for (kind, health) in [
        ("udp", "{kind: udp, steps: [{send: PING}, {expect: PONG}]"),
        ("dns", "{kind: dns, name: example.org"),
    ] {
        let udp = UdpResponder::start().await;
        let addr = udp.addr;
        udp.close().await;
        let proxy = probing(
            addr,
            &format!("{health}, interval: 20ms, timeout: 60s, rise: 1, fall: 1}}"),
        )
        .await;
        let b = proxy.backend(addr);
        wait_health(&b, Health::Unhealthy, &format!("{kind}: port unreachable")).await;
        let last = b.probes().pop().expect("probed");
        assert!(last.counted, "a closed port is the backend's verdict");
    }
}

/// reliability.md `dns-check`: `kind: dns` against a real DNS server (hickory-server, as the
/// discovery tests use): the name's records pass; NXDOMAIN, an empty answer where one is
/// expected, SERVFAIL or silence do not, and the record says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_probes_ask_a_real_server() {
    use crate::common::dns::Reply;
    let dns = FakeDns::start().await;
    dns.set_ips("db.test", &[[10, 0, 0, 1]]);
    let proxy = probing(dns.addr, "{kind: dns, name: db.test, expect_answer: true, interval: 20ms, timeout: 500ms, rise: 1, fall: 1}").await;
    let b = proxy.backend(dns.addr);
    wait_health(&b, Health::Healthy, "").await;
    assert!(dns.queries("db.test") >= 1);

    dns.set("db.test", Reply::NxDomain);
    wait_health(
        &b,
        Health::Unhealthy,
        "dns: rcode NXDOMAIN, expected NOERROR",
    )
    .await;
    dns.set_ips("db.test", &[[10, 0, 0, 2]]);
    wait_health(&b, Health::Healthy, "").await;
    // NOERROR without an A record (the name holds only an AAAA one).
    dns.set("db.test", Reply::Records(vec!["::1".parse().unwrap()]));
    wait_health(
        &b,
        Health::Unhealthy,
        "dns: no A record in the answer for db.test.",
    )
    .await;
    dns.set("db.test", Reply::ServFail);
    wait_health(
        &b,
        Health::Unhealthy,
        "dns: rcode SERVFAIL, expected NOERROR",
    )
    .await;
    dns.set("db.test", Reply::Silent);
    wait_health(&b, Health::Unhealthy, "dns: no reply within 500ms").await;
}

/// reliability.md `dns-check`: `kind: dns` with `expect_rcode: NXDOMAIN` passes on a name that must
/// not exist, against the real server; and a reply is known by its id: a datagram with another id
/// before it is passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_probes_take_the_reply_with_their_id() {
    use hickory_server::proto::op::{Message, ResponseCode};
    let dns = FakeDns::start().await;
    let proxy = probing(dns.addr, "{kind: dns, name: gone.test, type: TXT, expect_rcode: NXDOMAIN, interval: 20ms, timeout: 500ms, rise: 1, fall: 1}").await;
    wait_health(&proxy.backend(dns.addr), Health::Healthy, "").await;

    // A hand-made server that first answers with another id (refusing), then with the query's.
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let id = q.metadata.id;
            let mut stray = Message::error_msg(
                id.wrapping_add(1),
                q.metadata.op_code,
                ResponseCode::Refused,
            );
            stray.add_queries(q.queries.clone());
            let mut reply = Message::error_msg(id, q.metadata.op_code, ResponseCode::NoError);
            reply.add_queries(q.queries.clone());
            for m in [stray, reply] {
                let _ = sock.send_to(&m.to_vec().unwrap(), from).await;
            }
        }
    });
    let proxy = probing(
        addr,
        "{kind: dns, name: db.test, interval: 20ms, timeout: 500ms, rise: 1, fall: 1}",
    )
    .await;
    let b = proxy.backend(addr);
    wait_for(Duration::from_secs(10), "five passing probes", || {
        let p = b.probes();
        p.len() >= 5 && p.iter().all(|p| p.ok)
    })
    .await;
    assert_eq!(b.health(), Health::Healthy);
    server.abort();
}
