//! Backup tiers: a tier takes new connections only while no better tier has an eligible
//! backend; `failback` says when traffic goes back (`immediate`, `never` until the admin API says,
//! `after` a wait); a backup tier serves its first backend unless `all_backups`; balancers using
//! `source_hash` agree across tiers. Replicas on 127.0.0.2, .3, .4 whose `/health` the tests steer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::common::fleet::{replicas, spread, Replica};
use crate::common::http::{get, send};
use crate::common::{wait_for, Proxy};
use sluicegate::Health;

/// Service `t`: the first replica a primary, the others backups, probed over HTTP every 100 ms.
fn yaml(fleet: &[Replica], extra: &str) -> String {
    let mut y = String::from("log: {level: warn}\nadmin: {listen: \"127.0.0.1:0\"}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    health: {kind: http, interval: 100ms, timeout: 500ms, rise: 1, fall: 1}\n");
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", line.trim());
    }
    y += "    backends:\n";
    for (i, r) in fleet.iter().enumerate() {
        let backup = if i == 0 { "" } else { ", backup: true" };
        y += &format!("      - {{address: \"{}\"{backup}}}\n", r.addr());
    }
    y
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn only(proxy: &Proxy, want: &[u8], what: &str) {
    let got = spread(proxy.addr, 12).await;
    let mut ips: Vec<IpAddr> = got.keys().copied().collect();
    ips.sort();
    let want: Vec<IpAddr> = want.iter().map(|l| ip(*l)).collect();
    assert_eq!(ips, want, "{what}: {got:?}");
}

async fn down(proxy: &Proxy, r: &Replica) {
    r.set_status(503);
    wait_for(Duration::from_secs(10), "marked down", || {
        proxy.backend(r.addr()).health() == Health::Unhealthy
    })
    .await;
}

async fn up(proxy: &Proxy, r: &Replica) {
    r.set_status(200);
    wait_for(Duration::from_secs(10), "marked up", || {
        proxy.backend(r.addr()).health() == Health::Healthy
    })
    .await;
}

/// Collects the `service_tier` changes of `/events` (as JSON) as they come, once the stream has
/// answered (returns then).
async fn tier_events(
    admin: SocketAddr,
) -> std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = seen.clone();
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = crate::common::within(Duration::from_secs(5), "the stream", lines.next_line())
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if v["type"] == "service_tier" {
                into.lock().unwrap().push(v);
            }
        }
    });
    seen
}

fn serving(proxy: &Proxy) -> Option<u32> {
    proxy.service.pool.snapshot().serving_tier
}

/// reliability.md `backup-tiers`: the backups get nothing while the primary is up; with it down the
/// first backup takes everything (all backups with `all_backups`); `immediate` fails back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_serve_only_while_the_primary_is_down() {
    let (_port, fleet) = replicas(2, 3);
    let proxy = Proxy::start(&yaml(&fleet, "")).await;
    only(&proxy, &[2], "the primary").await;
    assert_eq!(proxy.backend(fleet[1].addr()).view().tier, 1);
    down(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "the first backup only").await;
    assert_eq!(serving(&proxy), Some(1));
    up(&proxy, &fleet[0]).await;
    only(&proxy, &[2], "failback: immediate").await;

    let (_port, fleet) = replicas(5, 3);
    let proxy = Proxy::start(&yaml(&fleet, "all_backups: true")).await;
    down(&proxy, &fleet[0]).await;
    only(&proxy, &[6, 7], "every backup").await;
    down(&proxy, &fleet[1]).await;
    only(&proxy, &[7], "the backups still up").await;
}

/// reliability.md `failback-never`: once traffic moved to the backup it stays there when the
/// primary returns, across a reload, until `POST /services/t/failback`; the hold and the change are
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_never_waits_for_the_operator() {
    let (_port, fleet) = replicas(2, 2);
    let y = yaml(&fleet, "failback: never");
    let proxy = Proxy::start(&y).await;
    let admin = proxy.admin.expect("admin");
    let events = tier_events(admin).await;
    let r = send(admin, "POST", "/services/t/failback", "").await;
    assert_eq!(r.status, 409, "the best tier serves already: {}", r.body);
    down(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "the backup").await;
    up(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "still the backup: no automatic failback").await;
    assert!(proxy.service.pool.failback_held());
    // /stats is sampled once a second.
    crate::common::wait_until(Duration::from_secs(10), "/stats shows the hold", || async {
        let stats = get(admin, "/stats").await.json();
        let svc = &stats["services"][0];
        (svc["serving_tier"].as_u64(), svc["failback_held"].as_bool()) == (Some(1), Some(true))
    })
    .await;
    // A reload that changes the service keeps the decision (the pool, and its serving tier, carry
    // over; the snapshot is rebuilt).
    let changed = yaml(&fleet, "failback: never\nconnect_timeout: 3s");
    let config = sluicegate::config::Config::from_yaml(&changed).expect("config");
    let report = proxy.control.reload(config).expect("reload");
    assert_eq!(report.changed, vec!["t".to_string()], "{report:?}");
    only(&proxy, &[3], "still the backup after a reload").await;

    let r = send(admin, "POST", "/services/t/failback", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["serving_tier"], 0);
    only(&proxy, &[2], "back on the primary").await;
    assert!(!proxy.service.pool.failback_held());
    // Each step streamed: the failover, the hold, and the operator's failback.
    crate::common::wait_for(Duration::from_secs(10), "the tier events", || {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "operator")
    })
    .await;
    let seen: Vec<(u64, bool, String)> = events
        .lock()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["serving"].as_u64().unwrap(),
                e["held"].as_bool().unwrap(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen.first(),
        Some(&(1, false, "failover".to_string())),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|(tier, held, _)| *tier == 1 && *held),
        "the hold: {seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&(0, false, "operator".to_string())),
        "{seen:?}"
    );
}

/// reliability.md `failback-never-reload`: a service that a reload adds with `failback: never`,
/// whose primary answers its first probe after its backup does, starts on the primary: the order of
/// first probes is no failover (as at start-up). Before, the pool counted as started at once and the
/// backup, healthy first, kept the traffic for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_by_reload_starts_on_its_best_tier() {
    let (_port, fleet) = replicas(2, 2);
    fleet[0].set_mode(crate::common::fleet::HealthMode::Slow);
    let other = replicas(5, 1).1;
    let first = yaml(&other, "").replace("name: t", "name: other");
    let proxy = Proxy::start(&first).await;
    let both = format!(
        "{first}{}",
        yaml(&fleet, "failback: never")
            .split_once("services:\n")
            .unwrap()
            .1
    );
    let config = sluicegate::config::Config::from_yaml(&both).expect("config");
    proxy.control.reload(config).expect("reload");
    let t = proxy
        .control
        .services()
        .into_iter()
        .find(|v| &*v.service.name == "t")
        .expect("t added")
        .service;
    wait_for(Duration::from_secs(10), "both probed", || {
        t.pool
            .members()
            .iter()
            .all(|b| b.health() == Health::Healthy)
    })
    .await;
    assert_eq!(
        t.pool.snapshot().serving_tier,
        Some(0),
        "the primary serves"
    );
    assert!(!t.pool.failback_held());
}

/// reliability.md `failback-after`: the primary must stay healthy for the wait before traffic
/// returns to it (under tokio's real clock the test only checks the order: not before, then after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_after_waits_for_the_primary_to_stay_up() {
    let (_port, fleet) = replicas(2, 2);
    let proxy = Proxy::start(&yaml(&fleet, "failback: {after: 1s}")).await;
    down(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "the backup").await;
    up(&proxy, &fleet[0]).await;
    let back_at = Instant::now();
    only(&proxy, &[3], "still the backup during the wait").await;
    wait_for(Duration::from_secs(5), "failback after the wait", || {
        serving(&proxy) == Some(0)
    })
    .await;
    assert!(
        back_at.elapsed() >= Duration::from_millis(900),
        "not before the wait: {:?}",
        back_at.elapsed()
    );
    only(&proxy, &[2], "the primary again").await;
}

/// reliability.md `source-hash-tiers`: two balancers with the same backends and `source_hash` send
/// each client to the same backend whichever tier serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_agrees_across_tiers() {
    let (_port, fleet) = replicas(2, 4);
    let y = yaml(&fleet, "balance: source_hash\nall_backups: true");
    let (a, b) = (Proxy::start(&y).await, Proxy::start(&y).await);
    let clients: Vec<SocketAddr> = (0..200u32)
        .map(|i| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 5000)))
        .collect();
    let picks = |p: &Proxy| -> Vec<Option<SocketAddr>> {
        let snap = p.service.pool.snapshot();
        clients.iter().map(|c| snap.peek(*c)).collect()
    };
    assert_eq!(picks(&a), picks(&b));
    assert!(picks(&a).iter().all(|p| *p == Some(fleet[0].addr())));
    fleet[0].set_status(503);
    wait_for(Duration::from_secs(10), "both fail over", || {
        serving(&a) == Some(1) && serving(&b) == Some(1)
    })
    .await;
    let (pa, pb) = (picks(&a), picks(&b));
    assert_eq!(pa, pb, "the balancers agree on the backup tier");
    let used: std::collections::HashSet<_> = pa.iter().flatten().collect();
    assert_eq!(used.len(), 3, "spread over the three backups");
}
