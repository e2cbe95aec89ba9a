//! Balancer replicas agree with no shared state: with `source_hash`, two (or more) sluicegate
//! processes that know the same backends send every client to the same backend, whatever order the
//! backends arrived in (static config, shuffled DNS answers, the admin API) and whatever churn they went
//! through; and one join or leave of N backends moves about 1/N of clients. Asked through `GET /route`,
//! which answers exactly what a new connection from a client address would get.
//!
//! `scale_out_simulation` prints the figures `docs/scale-out.md` quotes (3 → 4 balancers, 10 → 11
//! backends): `cargo test --test agreement scale_out -- --nocapture`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::common::dns::{FakeDns, Reply};
use crate::common::http::{get, send};
use crate::common::*;

/// Client addresses asked: enough that a backend's share in the sample is within about 1 point of its
/// share of the table (three standard deviations at 1/7).
const CLIENTS: u32 = 12_000;

fn client(i: u32) -> IpAddr {
    // Spread over a /16 the way real client addresses are: not all in one /24.
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919))
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn yaml(dns: Option<SocketAddr>, statics: &[SocketAddr], port: u16) -> String {
    let mut y = String::from("log: {level: warn}\nadmin: {listen: \"127.0.0.1:0\"}\n");
    if let Some(d) = dns {
        y += &format!("resolver: {{nameservers: [\"{d}\"], timeout: 300ms}}\n");
    }
    y += "services:\n  - name: t\n    listen: 127.0.0.1:0\n    balance: source_hash\n";
    y += "    discovery: {refresh: 200ms, empty_after: 1}\n    backends:\n";
    if dns.is_some() {
        y += &format!("      - {{address: \"backend:{port}\"}}\n");
    }
    for s in statics {
        y += &format!("      - {{address: \"{s}\"}}\n");
    }
    y
}

/// Where every client would go, as one balancer says.
async fn routes(admin: SocketAddr) -> BTreeMap<IpAddr, String> {
    let mut m = BTreeMap::new();
    for i in 0..CLIENTS {
        let c = client(i);
        let r = get(admin, &format!("/route?client={c}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        m.insert(
            c,
            r.json()["backend"].as_str().unwrap_or("none").to_string(),
        );
    }
    m
}

fn moved(a: &BTreeMap<IpAddr, String>, b: &BTreeMap<IpAddr, String>) -> f64 {
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count() as f64 / a.len() as f64
}

async fn members(p: &Proxy) -> Vec<SocketAddr> {
    let mut m: Vec<SocketAddr> = p.service.pool.members().iter().map(|b| b.addr).collect();
    m.sort();
    m
}

async fn wait_members(p: &Proxy, want: &[SocketAddr]) {
    let mut want = want.to_vec();
    want.sort();
    let want = &want;
    wait_until(Duration::from_secs(10), "the members", || async move {
        members(p).await == *want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_agree_through_churn() {
    let port = 19_000 + (std::process::id() % 1000) as u16;
    let addr = |last: u8| SocketAddr::new(ip(last), port);
    // Two name servers answering the same name in opposite orders.
    let (dns_a, dns_b) = (FakeDns::start().await, FakeDns::start().await);
    let answer = |order: &[u8]| Reply::Records(order.iter().map(|l| ip(*l)).collect());
    dns_a.set("backend", answer(&[2, 3, 4, 5]));
    dns_b.set("backend", answer(&[5, 4, 3, 2]));
    // Static backends listed in opposite orders.
    let a = Proxy::start(&yaml(Some(dns_a.addr), &[addr(10), addr(11)], port)).await;
    let b = Proxy::start(&yaml(Some(dns_b.addr), &[addr(11), addr(10)], port)).await;
    let all = [2, 3, 4, 5, 10, 11].map(addr);
    wait_members(&a, &all).await;
    wait_members(&b, &all).await;
    let (aa, ba) = (a.admin.unwrap(), b.admin.unwrap());
    let first = routes(aa).await;
    assert_eq!(first, routes(ba).await, "same members, same routes");
    assert!(first.values().all(|v| v != "none"));

    // Churn on one side only: a DNS answer loses and regains a backend, shuffled differently each
    // time; the API removes a backend and adds it back; a new backend joins through DNS on both.
    dns_a.set("backend", answer(&[4, 2, 5]));
    wait_members(&a, &[2, 4, 5, 10, 11].map(addr)).await;
    dns_a.set("backend", answer(&[3, 5, 2, 4]));
    wait_members(&a, &all).await;
    let r = send(aa, "DELETE", &format!("/backends/t/{}", addr(10)), "").await;
    assert_eq!(r.status, 202);
    let r = send(
        aa,
        "POST",
        "/backends",
        &format!(r#"{{"service": "t", "address": "{}"}}"#, addr(10)),
    )
    .await;
    assert_eq!(r.status, 201);
    dns_a.set("backend", answer(&[6, 3, 2, 5, 4]));
    dns_b.set("backend", answer(&[2, 6, 5, 4, 3]));
    let six = [2, 3, 4, 5, 6, 10, 11].map(addr);
    wait_members(&a, &six).await;
    wait_members(&b, &six).await;
    let after = routes(aa).await;
    assert_eq!(
        after,
        routes(ba).await,
        "different histories, same members: same routes"
    );

    // One join of 7: the new backend's share (1/7, give or take the sample) moved to it, and at most
    // 2 points more moved between the others (Maglev's table is near-minimal, not minimal).
    let joined = moved(&first, &after);
    let to_new = share_of(&after, &addr(6));
    assert!(
        (to_new - 1.0 / 7.0).abs() < 0.01,
        "the new backend got {to_new:.4}"
    );
    assert!(
        joined >= to_new && joined <= to_new + 0.02,
        "a join of 7 moved {joined:.4} (the new one's share {to_new:.4})"
    );

    // A view of health one balancer has and the other lacks costs only that backend's clients.
    let r = send(aa, "POST", &format!("/backends/t/{}/drain", addr(3)), "").await;
    assert_eq!(r.status, 202);
    let drained = routes(aa).await;
    let differ = moved(&after, &drained);
    let share_of_3 = share_of(&after, &addr(3));
    assert!(
        (differ - share_of_3).abs() < 1e-9,
        "only its clients moved: {differ} vs {share_of_3}"
    );

    // One leave of 7 (both sides): between 1/7 and 1/7 + 2 points moved.
    dns_a.set("backend", answer(&[6, 3, 2, 5]));
    dns_b.set("backend", answer(&[5, 2, 3, 6]));
    let left = [2, 3, 5, 6, 10, 11].map(addr);
    wait_members(&a, &left).await;
    wait_members(&b, &left).await;
    send(
        aa,
        "PUT",
        &format!("/backends/t/{}", addr(3)),
        r#"{"state": "active"}"#,
    )
    .await;
    let gone = routes(ba).await;
    assert_eq!(gone, routes(aa).await);
    let m = moved(&after, &gone);
    let had = share_of(&after, &addr(4));
    assert!(
        (had - 1.0 / 7.0).abs() < 0.01,
        "the leaving backend had {had:.4}"
    );
    assert!(
        m >= had && m <= had + 0.02,
        "a leave of 7 moved {m:.4} (the leaving one's share {had:.4})"
    );
}

fn share_of(m: &BTreeMap<IpAddr, String>, b: &SocketAddr) -> f64 {
    m.values().filter(|v| **v == b.to_string()).count() as f64 / m.len() as f64
}

/// The figures of docs/scale-out.md: four balancers over the same ten backends, the backends listed
/// in a different order for each; a fourth balancer joining the three moves no client (every balancer
/// computes the same table), and an eleventh backend moves about 1/11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_simulation() {
    let port = 20_000 + (std::process::id() % 1000) as u16;
    let ten: Vec<SocketAddr> = (2..12).map(|l| SocketAddr::new(ip(l), port)).collect();
    let mut balancers = Vec::new();
    for k in 0..4usize {
        let mut order = ten.clone();
        order.rotate_left(k * 3);
        if k % 2 == 1 {
            order.reverse();
        }
        balancers.push(Proxy::start(&yaml(None, &order, port)).await);
    }
    let mut maps = Vec::new();
    for p in &balancers {
        maps.push(routes(p.admin.unwrap()).await);
    }
    // ECMP or DNS may send a client to any balancer: with 3, then 4, a client's backend is what any
    // of them says.
    let disagree_3 = (1..3)
        .map(|i| moved(&maps[0], &maps[i]))
        .fold(0.0, f64::max);
    let disagree_4 = (1..4)
        .map(|i| moved(&maps[0], &maps[i]))
        .fold(0.0, f64::max);
    let eleventh = SocketAddr::new(ip(12), port);
    for p in &balancers {
        let r = send(
            p.admin.unwrap(),
            "POST",
            "/backends",
            &format!(r#"{{"service": "t", "address": "{eleventh}"}}"#),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let mut after = Vec::new();
    for p in &balancers {
        after.push(routes(p.admin.unwrap()).await);
    }
    let moved_11 = moved(&maps[0], &after[0]);
    let after_disagree = (1..4)
        .map(|i| moved(&after[0], &after[i]))
        .fold(0.0, f64::max);
    let to_new = after[0]
        .values()
        .filter(|v| **v == eleventh.to_string())
        .count() as f64
        / CLIENTS as f64;
    println!("| change | clients whose backend changes |");
    println!("| --- | --- |");
    println!(
        "| any of 3 balancers vs another, 10 backends | {:.2} % |",
        disagree_3 * 100.0
    );
    println!(
        "| a 4th balancer joins (any of 4 vs another) | {:.2} % |",
        disagree_4 * 100.0
    );
    println!(
        "| 10 → 11 backends, on every balancer | {:.2} % (ideal 1/11 = 9.09 %; to the new backend {:.2} %, between the others {:.2} %) |",
        moved_11 * 100.0,
        to_new * 100.0,
        (moved_11 - to_new) * 100.0
    );
    println!(
        "| any of 4 balancers vs another, 11 backends | {:.2} % |",
        after_disagree * 100.0
    );
    println!("({CLIENTS} client addresses)");
    assert_eq!(disagree_3, 0.0);
    assert_eq!(disagree_4, 0.0);
    assert_eq!(after_disagree, 0.0);
    assert!((to_new - 1.0 / 11.0).abs() < 0.01, "{to_new}");
    assert!(
        moved_11 >= to_new && moved_11 <= to_new + 0.02,
        "{moved_11}"
    );
}
