//! Docker-label discovery against the real Docker Engine: containers carrying a `docker:` backend's
//! labels are its backends, followed through the Engine's event stream (not its periodic re-list,
//! which these tests set to a minute), with their per-container labels; the last set stays when the
//! Engine goes away. Each test runs its containers on a network of its own, all removed when it ends.
//!
//! Without a Docker engine these tests say loudly that they skipped; CI sets
//! `SLUICEGATE_REQUIRE_DOCKER=1`, which makes that a failure.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::docker::{self, FaultyEngine, Scope};
use crate::common::http::get;
use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Who answers an HTTP request through the proxy (`X-Backend`, the container's name).
async fn served_by(proxy: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(b"GET /home HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    String::from_utf8_lossy(&raw)
        .lines()
        .find_map(|l| l.strip_prefix("X-Backend: "))
        .map(|b| b.trim().to_string())
        .ok_or_else(|| std::io::Error::other("no X-Backend: not served"))
}

/// Who answers through the proxy, asked again until someone does or `limit` passes: a container is
/// followed from the moment it starts, before its app listens (no health check here), and under a
/// loaded test run the first connections can find the port closed and be reset.
async fn served_within(proxy: SocketAddr, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), served_by(proxy)).await;
        match attempt.unwrap_or_else(|_| Err(std::io::Error::other("no answer within 5 s"))) {
            Ok(who) => return who,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("not served within {limit:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// (container name, weight, tier) of every member, sorted.
fn members(p: &Proxy) -> Vec<(String, u32, u32)> {
    let mut v: Vec<_> = p
        .service
        .pool
        .members()
        .iter()
        .map(|b| {
            let view = b.view();
            (
                view.name.clone().unwrap_or_default(),
                view.weight,
                view.tier,
            )
        })
        .collect();
    v.sort();
    v
}

/// reliability.md `docker-labels`: a container started with the labels is a backend (and served)
/// on its start event, with its `sluicegate.weight` and `sluicegate.backup`; a killed one leaves on
/// its event; when the Engine goes away, the last set stays, the failure is counted, and clients
/// are still served. The waits (15 s) stay well under the re-list a minute away (54 s at the
/// earliest), so only the events can pass them.
#[test]
fn labelled_containers_are_followed_through_the_engines_events() {
    if !docker::available("labelled_containers_are_followed_through_the_engines_events") {
        return;
    }
    let scope = Scope::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(follow(&scope));
    // The runtime (and the sluicegate under test) gone first, then the scope's containers.
    drop(rt);
}

async fn follow(scope: &Scope) {
    let image = docker::image();
    assert!(!image.is_empty());
    // Between sluicegate and the Engine, so the test can take the Engine away.
    let engine = FaultyEngine::start();
    let yaml = format!(
        "log: {{level: warn}}\nshutdown: {{drain_timeout: 5s}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    balance: round_robin\n    discovery: {{refresh: 60s}}\n    backends:\n      - docker: {{labels: {{sluicegate.test: \"{}\"}}, port: 5000, network: \"{}\", docker: \"{}\"}}\n",
        scope.balancer, scope.network, engine.endpoint
    );
    let p = Proxy::start(&yaml).await;
    assert!(members(&p).is_empty(), "nothing carries the labels yet");
    let mine = [("sluicegate.test", scope.balancer.as_str())];

    let first = scope.run("first", &[mine[0], ("sluicegate.weight", "3")]);
    wait_for(
        Duration::from_secs(15),
        "the first container a backend",
        || members(&p) == [(first.clone(), 3, 0)],
    )
    .await;
    let who = served_within(p.addr, Duration::from_secs(20)).await;
    assert_eq!(who, first);

    let backup = scope.run("backup", &[mine[0], ("sluicegate.backup", "true")]);
    wait_for(Duration::from_secs(15), "the backup a backend", || {
        members(&p).len() == 2
    })
    .await;
    assert_eq!(
        members(&p),
        [(backup.clone(), 1, 1), (first.clone(), 3, 0)],
        "the backup label puts it one tier down"
    );
    // Someone else's container with other labels is not followed.
    let _stranger = scope.run("stranger", &[("sluicegate.test", "someone-else")]);

    scope.kill(&first);
    wait_for(Duration::from_secs(15), "the killed container gone", || {
        members(&p).iter().all(|(n, _, _)| *n != first)
    })
    .await;
    assert_eq!(members(&p), [(backup.clone(), 1, 1)]);
    let who = served_within(p.addr, Duration::from_secs(20)).await;
    assert_eq!(who, backup, "the backup serves");

    // The Engine goes away: the watcher's stream breaks and its reconnects fail; the set stays.
    drop(engine);
    let admin = p.admin.unwrap();
    wait_until(
        Duration::from_secs(10),
        "the failure counted",
        || async move {
            let stats = get(admin, "/stats").await.json();
            stats["services"][0]["docker_labels"][0]["failed"]
                .as_u64()
                .is_some_and(|n| n > 0)
        },
    )
    .await;
    assert_eq!(members(&p), [(backup.clone(), 1, 1)], "the last set kept");
    let who = served_within(p.addr, Duration::from_secs(20)).await;
    assert_eq!(who, backup, "still served");
}
