//! DNS discovery against an in-process DNS server whose answers change while sluicegate runs, with
//! replicas on 127.0.0.2, .3, … sharing one port, as Docker runs them (docs/reliability.md, "Discovery").

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;

use crate::common::dns::{FakeDns, Reply};
use crate::common::fleet::{replica_at, replicas, spread, who, Session};
use crate::common::{wait_for, wait_until, within, Proxy};
use sluicegate::Outcome;

/// One service `t` whose only backend is the name `backend` on `port`, resolved through `dns`.
fn yaml(dns: SocketAddr, port: u16, extra: &str) -> String {
    let mut y = format!(
        "log: {{level: warn}}\nshutdown: {{drain_timeout: 5s}}\nresolver: {{nameservers: [\"{dns}\"], timeout: 300ms}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    connect_timeout: 1s\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", line.trim());
    }
    y += &format!("    backends:\n      - {{address: \"backend:{port}\"}}\n");
    y
}

fn ips(proxy: &Proxy) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = proxy
        .service
        .pool
        .members()
        .iter()
        .map(|b| b.addr.ip())
        .collect();
    v.sort();
    v
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Waits for the members to be `want`. The deadline only bounds a hang, far beyond a few refreshes:
/// how soon a change is followed is counted in queries where that is the point (`dns-move`).
async fn wait_members(proxy: &Proxy, want: &[u8]) {
    let want: Vec<IpAddr> = want.iter().map(|&l| ip(l)).collect();
    let what = format!("members {want:?}");
    wait_for(Duration::from_secs(15), &what, || ips(proxy) == want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_1_to_3_to_1_spreads_then_concentrates() {
    let (port, _r) = replicas(2, 3);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let proxy = Proxy::start(&yaml(
        dns.addr,
        port,
        "balance: round_robin\ndiscovery: {refresh: 200ms}",
    ))
    .await;
    // The first answer is awaited before serving: the very first client finds the backend.
    assert_eq!(ips(&proxy), vec![ip(2)]);
    assert_eq!(spread(proxy.addr, 20).await, HashMap::from([(ip(2), 20)]));

    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]]);
    wait_members(&proxy, &[2, 3, 4]).await;
    let counts = spread(proxy.addr, 300).await;
    for l in [2, 3, 4] {
        let n = counts.get(&ip(l)).copied().unwrap_or(0);
        assert!((90..=110).contains(&n), "even spread over 3: {counts:?}");
    }
    let kept = proxy.backend(SocketAddr::new(ip(2), port));
    let total_before = kept.stats.total();

    dns.set_ips("backend", &[[127, 0, 0, 3]]);
    wait_members(&proxy, &[3]).await;
    assert_eq!(spread(proxy.addr, 30).await, HashMap::from([(ip(3), 30)]));

    // A backend that leaves and comes back keeps its counters.
    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    wait_members(&proxy, &[2, 3]).await;
    let back = proxy.backend(SocketAddr::new(ip(2), port));
    assert!(std::sync::Arc::ptr_eq(&kept, &back), "same backend object");
    assert!(back.stats.total() >= total_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_3_to_5_to_1_follows() {
    let (port, mut fleet) = replicas(2, 3);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]]);
    let proxy = Proxy::start(&yaml(dns.addr, port, "discovery: {refresh: 200ms}")).await;
    fleet.push(replica_at(5, port));
    fleet.push(replica_at(6, port));
    dns.set_ips(
        "backend",
        &[
            [127, 0, 0, 2],
            [127, 0, 0, 3],
            [127, 0, 0, 4],
            [127, 0, 0, 5],
            [127, 0, 0, 6],
        ],
    );
    wait_members(&proxy, &[2, 3, 4, 5, 6]).await;
    let counts = spread(proxy.addr, 250).await;
    assert_eq!(counts.len(), 5, "all five used: {counts:?}");
    for n in counts.values() {
        assert!((35..=65).contains(n), "spread over 5: {counts:?}");
    }
    dns.set_ips("backend", &[[127, 0, 0, 6]]);
    wait_members(&proxy, &[6]).await;
    assert_eq!(spread(proxy.addr, 20).await, HashMap::from([(ip(6), 20)]));
}

/// reliability.md `dns-move`: the name moves; new connections follow within a few refreshes (counted in queries)
/// and none reaches the old address afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_name_is_followed_and_the_old_address_gets_nothing() {
    let (port, fleet) = replicas(2, 2);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let proxy = Proxy::start(&yaml(dns.addr, port, "discovery: {refresh: 500ms}")).await;
    assert_eq!(who(proxy.addr).await.expect("first"), ip(2));

    let q0 = dns.queries("backend");
    dns.set_ips("backend", &[[127, 0, 0, 3]]);
    let moved = Instant::now();
    within(Duration::from_secs(15), "traffic follows the move", async {
        while who(proxy.addr).await.expect("served") != ip(3) {}
    })
    .await;
    // How soon, in refreshes (an A and an AAAA query each): the next answer is taken, not cached
    // away. Ten allow for a test thread that stalls while the refreshes go on.
    let asked = dns.queries("backend") - q0;
    assert!(asked <= 2 * 10, "followed only after {asked} queries");
    let old = fleet[0].data_connections();
    assert_eq!(spread(proxy.addr, 50).await, HashMap::from([(ip(3), 50)]));
    assert_eq!(
        fleet[0].data_connections(),
        old,
        "no connection to the old address"
    );
    eprintln!("followed after {:?} and {asked} queries", moved.elapsed());
}

/// `on_removed` decides what happens to live sessions of a backend that leaves DNS.
async fn sessions_after_removal(
    policy: &str,
    drain_timeout: &str,
) -> (Vec<Session>, Proxy, FakeDns) {
    let (port, fleet) = replicas(2, 2);
    std::mem::forget(fleet); // the replicas outlive the proxy's verdict
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let extra = format!(
        "discovery: {{refresh: 200ms, on_removed: {policy}, drain_timeout: {drain_timeout}}}"
    );
    let proxy = Proxy::start(&yaml(dns.addr, port, &extra)).await;
    let mut sessions = Vec::new();
    for _ in 0..5 {
        let (s, who) = Session::open(proxy.addr).await.expect("session");
        assert_eq!(who, ip(2));
        sessions.push(s);
    }
    dns.set_ips("backend", &[[127, 0, 0, 3]]);
    wait_members(&proxy, &[3]).await;
    (sessions, proxy, dns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_removed_keep_leaves_sessions_running() {
    let (mut sessions, proxy, _dns) = sessions_after_removal("keep", "1500ms").await;
    // Longer than the drain timeout: still running.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for s in &mut sessions {
        s.ping().await.expect("kept session still works");
    }
    assert_eq!(proxy.service.stats.ended(Outcome::BackendRemoved), 0);
    // The removed backend stays visible while its sessions run.
    assert!(proxy
        .service
        .pool
        .all_backends()
        .iter()
        .any(|b| b.addr.ip() == ip(2) && b.state() == sluicegate::pool::State::Removed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_removed_drain_runs_sessions_until_the_deadline() {
    // A 5 s deadline, checked as "not before 2 s": the test sees the removal late if it stalls,
    // and the pings must go before the deadline.
    let (mut sessions, proxy, _dns) = sessions_after_removal("drain", "5s").await;
    let removed = Instant::now();
    for s in &mut sessions {
        s.ping().await.expect("draining session still works");
    }
    for s in &mut sessions {
        assert!(
            s.closed_within(Duration::from_secs(15)).await,
            "cut at the deadline"
        );
    }
    let after = removed.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "not before the deadline: {after:?}"
    );
    proxy.wait_ended(Outcome::BackendRemoved, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_removed_close_cuts_sessions_at_once() {
    // A drain deadline far beyond the wait: a cut seen within it was not the drain's.
    let (mut sessions, proxy, _dns) = sessions_after_removal("close", "60s").await;
    for s in &mut sessions {
        assert!(
            s.closed_within(Duration::from_secs(15)).await,
            "cut at once"
        );
    }
    proxy.wait_ended(Outcome::BackendRemoved, 5).await;
}

/// reliability.md `dns-outage`: SERVFAIL and timeouts keep the last good set; every connection succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_outage_keeps_the_last_good_set() {
    let (port, _fleet) = replicas(2, 2);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    let proxy = Proxy::start(&yaml(dns.addr, port, "discovery: {refresh: 100ms}")).await;
    for reply in [Reply::ServFail, Reply::Silent] {
        dns.set("backend", reply.clone());
        let q0 = dns.queries("backend");
        let until = Instant::now() + Duration::from_secs(2);
        let mut n = 0;
        while Instant::now() < until {
            who(proxy.addr)
                .await
                .unwrap_or_else(|e| panic!("{reply:?}: connection failed: {e}"));
            n += 1;
        }
        assert!(dns.queries("backend") > q0, "the outage was queried");
        assert_eq!(ips(&proxy), vec![ip(2), ip(3)], "{reply:?} kept the set");
        eprintln!("{reply:?}: {n} connections, all served");
    }
}

/// reliability.md `slow-dns`: answers that take 3 s add nothing to connections to known backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_dns_adds_no_latency() {
    let (port, _fleet) = replicas(2, 2);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    // A resolver timeout of 2 s: a query on the connection path would cost seconds.
    let y = yaml(dns.addr, port, "discovery: {refresh: 100ms}")
        .replace("timeout: 300ms", "timeout: 2s");
    let proxy = Proxy::start(&y).await;
    dns.set_delay(Duration::from_secs(3));
    let q0 = dns.queries("backend");
    let (mut worst, mut slow) = (Duration::ZERO, 0);
    for _ in 0..200 {
        let t = Instant::now();
        who(proxy.addr).await.expect("served");
        worst = worst.max(t.elapsed());
        slow += usize::from(t.elapsed() >= Duration::from_secs(1));
    }
    let asked = dns.queries("backend") - q0;
    eprintln!("worst connection {worst:?}, {slow} of 200 over 1 s, {asked} queries meanwhile");
    // Counted, not timed: a lookup on the connection path would ask once per connection and make
    // every connection slow; a stall of the machine slows a few.
    assert!(asked < 50, "{asked} queries for 200 connections");
    assert!(slow <= 5, "{slow} of 200 connections took over 1 s");
    assert_eq!(ips(&proxy), vec![ip(2), ip(3)]);
}

/// NXDOMAIN empties a name only after `empty_after` answers in a row; records bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_empties_only_after_repeated_answers() {
    let (port, _fleet) = replicas(2, 1);
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let proxy = Proxy::start(&yaml(
        dns.addr,
        port,
        "discovery: {refresh: 1s, empty_after: 3}",
    ))
    .await;
    let q0 = dns.queries("backend");
    dns.set("backend", Reply::NxDomain);
    // Two refreshes (A and AAAA each) answered NXDOMAIN: still there.
    wait_for(Duration::from_secs(5), "two NXDOMAIN refreshes", || {
        dns.queries("backend") >= q0 + 4
    })
    .await;
    assert_eq!(ips(&proxy), vec![ip(2)]);
    who(proxy.addr).await.expect("still served");
    wait_members(&proxy, &[]).await;
    assert!(who(proxy.addr).await.is_err(), "no backend: refused");
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    wait_members(&proxy, &[2]).await;
    who(proxy.addr).await.expect("served again");
}

/// Failing backends nudge their watcher for an early refresh, but the query rate per name stays
/// capped (one per refresh / 4, at least 250 ms) however many connections fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_cannot_flood_the_resolver() {
    // The name points at an address where nothing listens.
    let port = crate::common::refusing_addr([127, 0, 0, 2]).await.port();
    let dns = FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let proxy = Proxy::start(&yaml(
        dns.addr,
        port,
        "discovery: {refresh: 1s}\npassive: {max_fails: 1, cooldown: 100ms}",
    ))
    .await;
    let q0 = dns.queries("backend");
    let start = Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_secs(2) {
        let _ = who(proxy.addr).await;
        attempts += 1;
    }
    let lookups = (dns.queries("backend") - q0) / 2; // A + AAAA per lookup
    let cap = (start.elapsed().as_millis() / 250) as u64 + 2;
    eprintln!("{attempts} failing connections, {lookups} lookups (cap {cap})");
    assert!(attempts > 50, "enough failures to test the cap");
    assert!(lookups <= cap, "{lookups} lookups in 2 s");
    assert!(lookups >= 2, "the timer still runs");
}

/// A and AAAA records both become backends (same port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_records_become_backends_too() {
    let (port, _fleet) = replicas(2, 1);
    let v6 = crate::common::listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
    let _v6 = crate::common::Backend::serve(v6, crate::common::echo);
    let dns = FakeDns::start().await;
    dns.set(
        "backend",
        Reply::Records(vec![ip(2), "::1".parse().unwrap()]),
    );
    let proxy = Proxy::start(&yaml(dns.addr, port, "balance: round_robin")).await;
    let mut members = ips(&proxy);
    members.sort();
    assert_eq!(members, vec![ip(2), "::1".parse::<IpAddr>().unwrap()]);
    // Both serve: the replica says who it is, the v6 echo returns what it got.
    let mut v4 = 0;
    for _ in 0..10 {
        match who(proxy.addr).await {
            Ok(a) if a == ip(2) => v4 += 1,
            Ok(a) => panic!("unexpected {a}"),
            Err(_) => {} // the echo backend echoes the hello instead of naming itself
        }
    }
    assert_eq!(v4, 5, "round robin over both");
    let v6_backend = proxy.backend(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
    assert_eq!(v6_backend.stats.total(), 5);
}

/// Where the DNS server answers reverse lookups (Docker's does, with the container's name), every
/// discovered backend is named in `/backends`. (The resolver answers reverse lookups of 127.0.0.0/8
/// itself, with `localhost`, so the named backend here is a documentation address that never gets a
/// connection: the test only reads the pool.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_dns_names_the_backends() {
    let dns = FakeDns::start().await;
    let (port, _fleet) = replicas(2, 1);
    dns.set_ips(
        "backend",
        &[[127, 0, 0, 2], [192, 0, 2, 10], [192, 0, 2, 11]],
    );
    dns.set_ptr([192, 0, 2, 10], "demo_backend_1.demo_net");
    // 192.0.2.11 has no PTR record: it stays unnamed.
    let proxy = Proxy::start(&yaml(dns.addr, port, "")).await;
    let named = SocketAddr::new(IpAddr::from([192, 0, 2, 10]), port);
    let unnamed = SocketAddr::new(IpAddr::from([192, 0, 2, 11]), port);
    wait_for(Duration::from_secs(5), "the reverse lookup", || {
        proxy.backend(named).name().is_some()
    })
    .await;
    assert_eq!(
        proxy.backend(named).name().as_deref().map(String::as_str),
        Some("demo_backend_1"),
        "the first label: the container's name"
    );
    assert_eq!(
        proxy.backend(named).view().name.as_deref(),
        Some("demo_backend_1")
    );
    assert!(proxy.backend(unnamed).name().is_none());
}

/// Docker's names carry underscores (Swarm's `tasks.<stack>_<service>`, Compose v1's `project_web_1`),
/// which IDNA parsing rejects: they must still resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_underscores_resolve() {
    let (port, _r) = replicas(2, 2);
    let dns = FakeDns::start().await;
    dns.set_ips("tasks.demo_backend", &[[127, 0, 0, 2], [127, 0, 0, 3]]);
    let y = yaml(dns.addr, port, "discovery: {refresh: 200ms}")
        .replace("\"backend:", "\"tasks.demo_backend:");
    let proxy = Proxy::start(&y).await;
    wait_members(&proxy, &[2, 3]).await;
    assert_eq!(spread(proxy.addr, 20).await.len(), 2, "both replicas serve");
}

/// reliability.md `dns-too-many-records`: an answer with more records than `discovery.max_records`
/// brings only that many backends, the lowest addresses whatever order the server sent them in (so
/// balancer replicas keep the same ones), and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_cut_to_its_lowest_addresses() {
    let (port, _fleet) = replicas(2, 1);
    let dns = FakeDns::start().await;
    let many: Vec<[u8; 4]> = (10..30u8).rev().map(|l| [127, 0, 0, l]).collect();
    dns.set_ips("backend", &many);
    let y = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        yaml(
            dns.addr,
            port,
            "balance: round_robin\ndiscovery: {refresh: 200ms, max_records: 5}"
        )
    );
    let proxy = Proxy::start(&y).await;
    assert_eq!(ips(&proxy), (10..15).map(ip).collect::<Vec<_>>());
    let admin = proxy.admin.expect("admin");
    let line =
        format!("sluicegate_dns_answers_truncated_total{{service=\"t\",name=\"backend:{port}\"}} ");
    async fn truncated(admin: SocketAddr, line: &str) -> Option<u64> {
        let page = crate::common::http::get(admin, "/metrics").await.body;
        page.lines()
            .find_map(|l| l.strip_prefix(line))
            .and_then(|v| v.trim().parse::<u64>().ok())
    }
    let before = truncated(admin, &line).await.unwrap_or(0);
    assert!(before >= 1, "counted");
    // The next answers are cut the same way; a smaller one is taken whole.
    let line = line.as_str();
    wait_until(
        Duration::from_secs(5),
        "another truncated answer",
        || async move { truncated(admin, line).await.unwrap_or(0) > before },
    )
    .await;
    assert_eq!(ips(&proxy), (10..15).map(ip).collect::<Vec<_>>());
    dns.set_ips("backend", &[[127, 0, 0, 40], [127, 0, 0, 41]]);
    wait_members(&proxy, &[40, 41]).await;
}

/// reliability.md `srv-tiers`: the SRV records give each backend its port and weight, and their priority
/// its tier; only the best priority takes traffic, the next one when the best is gone, and a target
/// without addresses is left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_weights_and_tiers() {
    let (port, _fleet) = replicas(2, 3);
    let dns = FakeDns::start().await;
    dns.set_ips("a.node.consul", &[[127, 0, 0, 2]]);
    dns.set_ips("b.node.consul", &[[127, 0, 0, 3]]);
    dns.set_ips("c.node.consul", &[[127, 0, 0, 4]]);
    dns.set_srv(
        "_db._tcp.service.consul",
        &[
            (10, 3, port, "a.node.consul"),
            (10, 1, port, "b.node.consul"),
            (20, 5, port, "c.node.consul"),
            (10, 1, port, "gone.node.consul"),
        ],
    );
    let y = format!(
        "log: {{level: warn}}\nresolver: {{nameservers: [\"{}\"], timeout: 300ms}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    balance: weighted_round_robin\n    all_backups: true\n    discovery: {{refresh: 200ms}}\n    backends:\n      - {{srv: _db._tcp.service.consul}}\n",
        dns.addr
    );
    let proxy = Proxy::start(&y).await;
    wait_members(&proxy, &[2, 3, 4]).await;
    let at = |l: u8| SocketAddr::new(ip(l), port);
    let (a, b, c) = (
        proxy.backend(at(2)),
        proxy.backend(at(3)),
        proxy.backend(at(4)),
    );
    assert_eq!((a.weight(), b.weight(), c.weight()), (3, 1, 5));
    assert_eq!((a.tier(), b.tier(), c.tier()), (10, 10, 20));
    assert_eq!(
        a.view().sources[0].to_string(),
        "srv:_db._tcp.service.consul"
    );
    assert_eq!(
        a.dns_name().as_deref(),
        Some("a.node.consul"),
        "the target: the TLS name"
    );
    let got = spread(proxy.addr, 40).await;
    assert_eq!(got.get(&ip(2)), Some(&30), "weight 3 of 4: {got:?}");
    assert_eq!(got.get(&ip(3)), Some(&10), "weight 1 of 4: {got:?}");
    assert_eq!(proxy.service.pool.snapshot().serving_tier, Some(10));
    // The best priority's records go: the next tier serves.
    dns.set_srv("_db._tcp.service.consul", &[(20, 5, port, "c.node.consul")]);
    wait_members(&proxy, &[4]).await;
    assert_eq!(spread(proxy.addr, 10).await.get(&ip(4)), Some(&10));
    assert_eq!(proxy.service.pool.snapshot().serving_tier, Some(20));
    // An SRV outage keeps the last good set, as for A records. Three queries from now: one may
    // have been asked before the change, and a watcher asks again only once it has its answer, so
    // at least one SERVFAIL has been applied.
    let q0 = dns.queries("_db._tcp.service.consul");
    dns.set("_db._tcp.service.consul", Reply::ServFail);
    wait_for(Duration::from_secs(10), "SERVFAIL answered", || {
        dns.queries("_db._tcp.service.consul") >= q0 + 3
    })
    .await;
    assert_eq!(ips(&proxy), vec![ip(4)]);
}
