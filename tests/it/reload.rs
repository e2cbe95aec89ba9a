//! Hot reload as a difference (issue: admin and reload): services added, removed and changed without
//! dropping a live connection or resetting a counter; a reload that fails changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fleet::{replicas, who, Replica, Session};
use crate::common::{wait_for, Proxy};
use sluicegate::config::Config;

fn service(name: &str, backends: &[&Replica], extra: &str) -> String {
    let mut y = format!("  - name: {name}\n    listen: 127.0.0.1:0\n");
    for l in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", l.trim());
    }
    y += "    backends:\n";
    for r in backends {
        y += &format!("      - {{address: \"{}\"}}\n", r.addr());
    }
    y
}

fn config(services: &[String]) -> String {
    format!(
        "log: {{level: warn}}\nshutdown: {{drain_timeout: 3s}}\nservices:\n{}",
        services.concat()
    )
}

fn listen_of(p: &Proxy, name: &str) -> SocketAddr {
    p.control
        .services()
        .into_iter()
        .find(|s| &*s.service.name == name)
        .map(|s| s.listen)
        .unwrap_or_else(|| panic!("no service {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_services_keeping_counters_and_sessions() {
    let (_port, fleet) = replicas(2, 3);
    let v1 = config(&[
        service("web", &[&fleet[0], &fleet[1]], "balance: round_robin"),
        service("old", &[&fleet[2]], ""),
    ]);
    let p = Proxy::start(&v1).await;
    let web = listen_of(&p, "web");
    let old = listen_of(&p, "old");
    for _ in 0..10 {
        who(web).await.expect("web");
    }
    let (mut on_old, _) = Session::open(old).await.expect("session on old");
    let (mut on_web, ip) = Session::open(web).await.expect("session on web");
    assert!(ip == fleet[0].ip() || ip == fleet[1].ip());
    let kept = p.service.pool.member(fleet[0].addr()).unwrap();
    let kept_total = kept.stats.total();

    // web: fleet[1] → fleet[2], weights change; old: removed; new: added.
    let v2 = config(&[
        service(
            "web",
            &[&fleet[0], &fleet[2]],
            "balance: round_robin\nconnect_attempts: 3",
        ),
        service("new", &[&fleet[1]], ""),
    ]);
    let report = p
        .control
        .reload(Config::from_yaml(&v2).unwrap())
        .expect("applied");
    assert_eq!(report.added, vec!["new"]);
    assert_eq!(report.removed, vec!["old"]);
    assert_eq!(report.changed, vec!["web"]);

    // web keeps its listener, pool object and counters; traffic follows the new backends.
    assert_eq!(listen_of(&p, "web"), web);
    let web_now = p.control.service("web").unwrap();
    assert!(Arc::ptr_eq(&web_now.pool, &p.service.pool), "same pool");
    assert_eq!(web_now.connect_attempts, 3);
    assert!(
        web_now.stats.accepted_total() >= 11,
        "service counters kept"
    );
    assert!(kept.stats.total() >= kept_total, "backend counters kept");
    let mut seen = HashMap::new();
    for _ in 0..20 {
        *seen.entry(who(web).await.expect("web")).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2);
    assert!(
        seen.contains_key(&fleet[0].ip()) && seen.contains_key(&fleet[2].ip()),
        "{seen:?}"
    );
    // the session that was open on web keeps going (even if its backend left web's set)
    on_web
        .ping()
        .await
        .expect("web session survived the reload");

    // old: no new connections, but its open session finishes normally
    wait_for(Duration::from_secs(5), "old listener closed", || {
        std::net::TcpStream::connect_timeout(&old, Duration::from_millis(200)).is_err()
    })
    .await;
    on_old
        .ping()
        .await
        .expect("old's session survived its service's removal");
    // new: serves at once
    let new = listen_of(&p, "new");
    assert_eq!(who(new).await.expect("new"), fleet[1].ip());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_changes_nothing() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&config(&[service("web", &[&fleet[0]], "")])).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = config(&[
        service("web", &[&fleet[1]], ""),
        format!(
            "  - name: clash\n    listen: {}\n    backends: [{{address: \"{}\"}}]\n",
            taken.local_addr().unwrap(),
            fleet[0].addr()
        ),
    ]);
    let err = p
        .control
        .reload(Config::from_yaml(&bad).unwrap())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&taken.local_addr().unwrap().to_string()),
        "{err}"
    );
    // nothing changed: web still on fleet[0] only
    assert_eq!(who(p.addr).await.unwrap(), fleet[0].ip());
    assert_eq!(p.control.services().len(), 1);
    assert_eq!(p.control.reload_counts(), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_api_added_survives_a_reload() {
    let (_port, fleet) = replicas(2, 3);
    let y = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        config(&[service("web", &[&fleet[0], &fleet[1]], "")])
    );
    let p = Proxy::start(&y).await;
    let a = p.admin.unwrap();
    let add = crate::common::http::send(
        a,
        "POST",
        "/backends",
        &format!(
            "{{\"service\": \"web\", \"address\": \"{}\"}}",
            fleet[2].addr()
        ),
    )
    .await;
    assert_eq!(add.status, 201);
    let del = crate::common::http::send(
        a,
        "DELETE",
        &format!("/backends/web/{}", fleet[1].addr()),
        "",
    )
    .await;
    assert_eq!(del.status, 202);
    // reload the same file: the API's additions and removals stay
    p.control
        .reload(Config::from_yaml(&y).unwrap())
        .expect("applied");
    let views = crate::common::http::get(a, "/backends").await.json();
    let members: Vec<(String, String)> = views
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] != "removed")
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["sources"][0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        members.contains(&(fleet[2].addr().to_string(), "api".into())),
        "{members:?}"
    );
    assert!(
        !members
            .iter()
            .any(|(a, _)| *a == fleet[1].addr().to_string()),
        "{members:?}"
    );
    assert_eq!(members.len(), 2);
}

/// Four clients that open a session to `addr` and ping it, one after another, until stopped
/// (100,000 each at most), counting what worked and what failed.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            clients.push(tokio::spawn(async move {
                for _ in 0..100_000 {
                    if stop.load(Relaxed) {
                        break;
                    }
                    match Session::open(addr).await {
                        Ok((mut s, _)) => match s.ping().await {
                            Ok(()) => ok.fetch_add(1, Relaxed),
                            Err(_) => failed.fetch_add(1, Relaxed),
                        },
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                }
            }));
        }
        Traffic {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Waits (5 s at most) for twenty more sessions to work.
    async fn goes_on(&self) {
        let before = self.ok.load(Relaxed);
        wait_for(Duration::from_secs(5), "traffic between reloads", || {
            self.ok.load(Relaxed) >= before + 20
        })
        .await;
    }

    /// Stops the clients: how many sessions worked, and how many failed.
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// Reloads under traffic: twenty reloads that change weights, policy and backends while clients
/// connect continuously; no connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_loses_no_connection() {
    let (_port, fleet) = replicas(2, 3);
    let p = Proxy::start(&config(&[service("web", &[&fleet[0], &fleet[1]], "")])).await;
    let traffic = Traffic::start(p.addr);
    let policies = ["round_robin", "least_conn", "p2c", "weighted_round_robin"];
    for i in 0..20 {
        let set: Vec<&Replica> = match i % 3 {
            0 => vec![&fleet[0], &fleet[1], &fleet[2]],
            1 => vec![&fleet[1], &fleet[2]],
            _ => vec![&fleet[0], &fleet[2]],
        };
        let v = config(&[service(
            "web",
            &set,
            &format!("balance: {}", policies[i % 4]),
        )]);
        p.control
            .reload(Config::from_yaml(&v).unwrap())
            .expect("applied");
        traffic.goes_on().await;
    }
    let (ok, failed) = traffic.stop().await;
    eprintln!("{ok} sessions through 20 reloads, {failed} failed");
    assert_eq!(failed, 0);
    assert_eq!(p.control.reload_counts(), (20, 0));
}

/// Whether `web` runs on the ring (where io_uring is unavailable, `ring` runs as `auto`: said).
fn ring_runs(p: &Proxy) -> bool {
    let relay = p.control.service("web").expect("web").view().relay;
    if relay != "ring" {
        eprintln!("skipped: no ring worker here (the service runs as {relay})");
    }
    relay == "ring"
}

/// How many of service `name`'s connections ran on a ring (counted as each ends).
fn on_ring(p: &Proxy, name: &str) -> u64 {
    p.control.service(name).expect(name).stats.ring_total()
}

/// A proxy serving `web` (two replicas) on the epoll engine; its address; the configs of `web` on
/// epoll and on the ring; and the replicas, which live as long as that is kept.
async fn web_on_epoll() -> (Proxy, SocketAddr, [String; 2], Vec<Replica>) {
    let (_port, fleet) = replicas(2, 2);
    let epoll = config(&[service("web", &[&fleet[0], &fleet[1]], "relay: epoll")]);
    let ring = config(&[service("web", &[&fleet[0], &fleet[1]], "relay: ring")]);
    let p = Proxy::start(&epoll).await;
    let web = listen_of(&p, "web");
    (p, web, [epoll, ring], fleet)
}

/// A reload moves a kept address to `relay: ring` and back: the address stays bound, a connection
/// open before each move goes on where it runs, and the connections accepted after each move run on
/// the engine the reload asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_kept_address_on_and_off_the_ring() {
    let (p, web, [epoll, ring], _fleet) = web_on_epoll().await;
    let (mut before, _) = Session::open(web).await.expect("before the moves");

    p.control
        .reload(Config::from_yaml(&ring).unwrap())
        .expect("onto the ring");
    if !ring_runs(&p) {
        return;
    }
    assert_eq!(listen_of(&p, "web"), web, "the same address");
    let (mut during, _) = Session::open(web).await.expect("on the ring");
    for _ in 0..3 {
        who(web).await.expect("on the ring");
    }
    wait_for(
        Duration::from_secs(10),
        "three connections on the ring",
        || on_ring(&p, "web") == 3,
    )
    .await;
    before.ping().await.expect("the first connection goes on");

    p.control
        .reload(Config::from_yaml(&epoll).unwrap())
        .expect("off the ring");
    for _ in 0..3 {
        who(web).await.expect("off the ring");
    }
    wait_for(Duration::from_secs(10), "six connections ended", || {
        p.control
            .service("web")
            .unwrap()
            .stats
            .ended(sluicegate::Outcome::ClientClosed)
            == 6
    })
    .await;
    assert_eq!(on_ring(&p, "web"), 3, "the last three ran on epoll");
    before.ping().await.expect("the first connection goes on");
    during.ping().await.expect("the ring's connection goes on");
    assert_eq!(p.control.reload_counts(), (2, 0));
}

/// `relay: auto` follows the address: `web`, plain TCP alone on its address, runs on the ring; a
/// reload that brings a second service (routed by `sni`) onto that address, `web`'s own config
/// unchanged, moves `web` to epoll (the address's hellos must be read now), and one that takes the
/// second away moves it back. The address stays bound and the connection open across both goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_follows_whether_a_service_has_its_address_to_itself() {
    let (_port, fleet) = replicas(2, 2);
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let at = |y: String| y.replace("127.0.0.1:0", &addr.to_string());
    let alone = config(&[at(service("web", &[&fleet[0]], ""))]);
    let shared = config(&[
        at(service("web", &[&fleet[0]], "")),
        at(service("named", &[&fleet[1]], "sni: [named.example]")),
    ]);
    let p = Proxy::start(&alone).await;
    if !ring_runs(&p) {
        return;
    }
    let (mut open, _) = Session::open(addr).await.expect("on the ring");
    let engine = |p: &Proxy| p.control.service("web").expect("web").view().relay;
    let ended = |p: &Proxy| {
        p.control
            .service("web")
            .unwrap()
            .stats
            .ended(sluicegate::Outcome::ClientClosed)
    };
    for (cfg, runs, served) in [(&shared, "epoll", 0), (&alone, "ring", 3)] {
        p.control
            .reload(Config::from_yaml(cfg).unwrap())
            .expect("applied");
        assert_eq!(engine(&p), runs);
        let before = (ended(&p), on_ring(&p, "web"));
        for _ in 0..3 {
            assert_eq!(
                who(addr).await.expect("served"),
                fleet[0].addr().ip(),
                "the default route"
            );
        }
        wait_for(Duration::from_secs(10), "three more ended", || {
            ended(&p) == before.0 + 3
        })
        .await;
        assert_eq!(on_ring(&p, "web") - before.1, served, "{runs}: on the ring");
        open.ping().await.expect("the first connection goes on");
    }
    assert_eq!(listen_of(&p, "web"), addr, "the same address");
    assert_eq!(p.control.reload_counts(), (2, 0));
}

/// Clients connect without pause while ten reloads move the address on and off the ring: not one
/// connection fails, and both engines served some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_an_address_on_and_off_the_ring_under_traffic_loses_no_connection() {
    let (p, web, [epoll, ring], _fleet) = web_on_epoll().await;
    let traffic = Traffic::start(web);
    for i in 0..10 {
        let v = if i % 2 == 0 { &ring } else { &epoll };
        p.control
            .reload(Config::from_yaml(v).unwrap())
            .expect("applied");
        if i == 0 && !ring_runs(&p) {
            traffic.stop().await;
            return;
        }
        traffic.goes_on().await;
    }
    let (ok, failed) = traffic.stop().await;
    let ring_served = on_ring(&p, "web");
    eprintln!("{ok} sessions through 10 moves, {failed} failed, {ring_served} on the ring");
    assert_eq!(failed, 0);
    assert!(
        ring_served > 0 && ring_served < ok,
        "both engines served: {ring_served} of {ok} on the ring"
    );
    assert_eq!(p.control.reload_counts(), (10, 0));
}
