//! Backup tiers (issue 23): a tier takes new connections only while no better tier has an eligible
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
    wait_for(Duration::from_secs(3), "marked down", || {
        proxy.backend(r.addr()).health() == Health::Unhealthy
    })
    .await;
}

async fn up(proxy: &Proxy, r: &Replica) {
    r.set_status(200);
    wait_for(Duration::from_secs(3), "marked up", || {
        proxy.backend(r.addr()).health() == Health::Healthy
    })
    .await;
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
    let r = send(admin, "POST", "/services/t/failback", "").await;
    assert_eq!(r.status, 409, "the best tier serves already: {}", r.body);
    down(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "the backup").await;
    up(&proxy, &fleet[0]).await;
    only(&proxy, &[3], "still the backup: no automatic failback").await;
    assert!(proxy.service.pool.failback_held());
    // /stats is sampled once a second.
    crate::common::wait_until(Duration::from_secs(3), "/stats shows the hold", || async {
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
    wait_for(Duration::from_secs(3), "both fail over", || {
        serving(&a) == Some(1) && serving(&b) == Some(1)
    })
    .await;
    let (pa, pb) = (picks(&a), picks(&b));
    assert_eq!(pa, pb, "the balancers agree on the backup tier");
    let used: std::collections::HashSet<_> = pa.iter().flatten().collect();
    assert_eq!(used.len(), 3, "spread over the three backups");
}
