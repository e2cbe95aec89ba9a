//! Replicas against the real Docker Engine: sluicegate starts, adopts, adds, removes (draining first),
//! heals and autoscales backend containers, and traffic proves each step. The containers run this
//! build's `sluicegate-load serve` (an image made here, no registry), each test on a network of its
//! own with a balancer label of its own, all removed when the test ends.
//!
//! Without a Docker engine these tests say loudly that they skipped; CI sets
//! `SLUICEGATE_REQUIRE_DOCKER=1`, which makes that a failure.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::docker::{self, Scope};
use common::http::{get, request_within};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Runs `body` on a runtime of its own with a Docker scope, and removes the scope's containers only
/// after the runtime (and with it every task of the sluicegate under test) is gone, so nothing can
/// start a container behind the cleanup, whether the body passed or panicked.
fn docker_test<F, Fut>(name: &str, body: F)
where
    F: FnOnce(std::sync::Arc<Scope>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !docker::available(name) {
        return;
    }
    let scope = std::sync::Arc::new(Scope::new());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(body(scope.clone()));
    drop(rt);
}

fn config(scope: &Scope, replicas: &str, extra: &str) -> String {
    format!(
        "log: {{level: warn}}
shutdown: {{drain_timeout: 10s}}
admin: {{listen: \"127.0.0.1:0\"}}
services:
  - name: web
    listen: 127.0.0.1:0
    balance: round_robin
    health: {{kind: http, path: /health, interval: 300ms, timeout: 1s, rise: 1, fall: 2}}
    discovery: {{drain_timeout: 15s}}
    replicas: {{image: \"{}\", network: \"{}\", port: 5000, balancer: \"{}\", check_interval: 300ms, {replicas}}}
{extra}",
        docker::image(),
        scope.network,
        scope.balancer
    )
}

async fn rep(a: SocketAddr) -> Vec<String> {
    let r = get(a, "/rep").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["message"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

async fn wait_rep(a: SocketAddr, n: usize, limit: Duration) -> Vec<String> {
    within(limit, &format!("{n} replicas in /rep"), async {
        loop {
            let r = rep(a).await;
            if r.len() == n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

async fn scale(a: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let r = request_within(a, method, path, &[], body.as_bytes(), SECS(60))
        .await
        .expect("scale request");
    (r.status, r.json())
}

/// One request on a new connection: who answered `GET /home`.
async fn who_serves(proxy: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(proxy).await.ok()?;
    s.write_all(b"GET /home HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.split("Hello from Server: ")
        .nth(1)
        .map(|n| n.trim().to_string())
}

/// Waits until every one of `names` has served a request.
async fn wait_serving(proxy: SocketAddr, names: &[String], limit: Duration) {
    within(limit, &format!("{names:?} all serving"), async {
        let mut seen = std::collections::BTreeSet::new();
        loop {
            if let Some(n) = who_serves(proxy).await {
                seen.insert(n);
            }
            if names.iter().all(|n| seen.contains(n)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A paced download of `n` bytes through the proxy: who served it, and whether every byte was right.
async fn download(proxy: SocketAddr, n: usize, rate: usize) -> (String, bool) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(
        format!("GET /bytes?n={n}&rate={rate} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (String::new(), false);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let backend = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Backend: "))
        .unwrap_or("")
        .to_string();
    let body = &raw[end + 4..];
    let right = body.len() == n
        && body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (((i % 251) * 7 + 13) % 251) as u8);
    (backend, right)
}

#[test]
fn starts_then_adopts_after_a_restart() {
    docker_test("starts_then_adopts_after_a_restart", |scope| async move {
        let cfg = config(&scope, "min: 1, max: 5, start: 2", "");
        let mut p = Proxy::start(&cfg).await;
        let a = p.admin.unwrap();
        let names = wait_rep(a, 2, SECS(30)).await;
        assert_eq!(scope.running(), 2);
        wait_serving(p.addr, &names, SECS(20)).await;
        let backends = get(a, "/backends").await.json();
        for b in backends.as_array().unwrap() {
            assert_eq!(b["source"], "docker", "{b}");
            assert!(names.contains(&b["replica"]["hostname"].as_str().unwrap().to_string()));
            assert_eq!(
                b["name"], b["replica"]["container"],
                "named by its container"
            );
        }

        // A restart neither orphans nor duplicates: the new process adopts the two.
        p.signal_stop();
        p.stopped().await;
        assert_eq!(
            scope.running(),
            2,
            "stopping sluicegate leaves the replicas running"
        );
        let p = Proxy::start(&cfg).await;
        let a = p.admin.unwrap();
        assert_eq!(
            rep(a).await,
            names,
            "adopted at start, before the first client"
        );
        wait_serving(p.addr, &names, SECS(20)).await;
        assert_eq!(scope.running(), 2, "nothing started twice");
    });
}

#[test]
fn add_and_remove_under_traffic_lose_nothing() {
    docker_test(
        "add_and_remove_under_traffic_lose_nothing",
        |scope| async move {
            let p = Proxy::start(&config(&scope, "min: 1, max: 4, start: 2", "")).await;
            let a = p.admin.unwrap();
            let first = wait_rep(a, 2, SECS(30)).await;
            wait_serving(p.addr, &first, SECS(20)).await;

            // Refusals change nothing, with Docker there.
            let containers = scope.containers();
            for (method, path, body) in [
                ("POST", "/add", r#"{"n": 3}"#),
                ("POST", "/add", r#"{"n": 1, "hostnames": ["x", "y"]}"#),
                ("DELETE", "/rm", r#"{"n": 2}"#),
                ("DELETE", "/rm", r#"{"n": 1, "hostnames": ["ghost"]}"#),
            ] {
                let (status, body) = scale(a, method, path, body).await;
                assert_eq!(status, 400, "{method} {path}: {body}");
            }
            // Docker says no (a container of that name exists, not ours): 502 with Docker's words.
            let conflict = "taken";
            std::process::Command::new("docker")
                .args([
                    "create",
                    "--name",
                    &format!("{}-{conflict}", scope.balancer),
                    docker::image(),
                ])
                .output()
                .unwrap();
            let (status, body) = scale(
                a,
                "POST",
                "/add",
                &format!(r#"{{"n": 1, "hostnames": ["{conflict}"]}}"#),
            )
            .await;
            std::process::Command::new("docker")
                .args(["rm", "-f", &format!("{}-{conflict}", scope.balancer)])
                .output()
                .unwrap();
            assert_eq!(status, 502, "{body}");
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("Docker Engine said"),
                "{body}"
            );
            assert_eq!(scope.containers(), containers, "nothing half-done");
            assert_eq!(rep(a).await, first);

            // Add two, one of them named.
            let (status, body) = scale(a, "POST", "/add", r#"{"n": 2, "hostnames": ["s5"]}"#).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["status"], "successful");
            assert_eq!(body["message"]["N"], 4);
            let four: Vec<String> =
                serde_json::from_value(body["message"]["replicas"].clone()).unwrap();
            assert!(four.contains(&"s5".to_string()));
            assert_eq!(scope.running(), 4);
            wait_serving(p.addr, &four, SECS(20)).await;

            // Downloads across all four, then s5 is removed while some of them run on it.
            let mut downloads = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let proxy = p.addr;
                downloads.spawn(async move { download(proxy, 3_000_000, 1_500_000).await });
            }
            // The point is removal mid-stream: wait until all eight are connected.
            wait_for(SECS(10), "eight downloads connected", || {
                p.service
                    .stats
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 8
            })
            .await;
            let (status, body) =
                scale(a, "DELETE", "/rm", r#"{"n": 1, "hostnames": ["s5"]}"#).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["message"]["N"], 3);
            assert!(!body["message"]["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h == "s5"));
            assert!(
                !scope.containers().iter().any(|(n, _)| n.ends_with("-s5")),
                "its container is gone once /rm answers"
            );
            let mut on_s5 = 0;
            while let Some(r) = downloads.join_next().await {
                let (backend, right) = r.unwrap();
                assert!(right, "a download from {backend} lost bytes");
                on_s5 += usize::from(backend == "s5");
            }
            assert!(
                on_s5 > 0,
                "a download ran on the removed replica and finished"
            );
            for _ in 0..20 {
                assert_ne!(who_serves(p.addr).await.as_deref(), Some("s5"));
            }
        },
    );
}

#[test]
fn a_killed_replica_is_replaced() {
    docker_test("a_killed_replica_is_replaced", |scope| async move {
        let p = Proxy::start(&config(&scope, "min: 2, max: 4, start: 2", "")).await;
        let a = p.admin.unwrap();
        let names = wait_rep(a, 2, SECS(30)).await;
        wait_serving(p.addr, &names, SECS(20)).await;
        let (victim, _) = scope.containers()[0].clone();
        scope.kill(&victim);
        within(SECS(30), "the killed replica replaced", async {
            loop {
                let b = get(a, "/backends").await.json();
                let replaced = b.as_array().unwrap().iter().any(|b| {
                    b["replica"]["replaced"]["previous_container"] == victim.as_str()
                        && b["replica"]["docker_state"] == "running"
                });
                if replaced {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let b = get(a, "/backends").await.json();
        let r = b
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["replica"]["replaced"]["previous_container"] == victim.as_str())
            .unwrap();
        assert!(
            r["replica"]["replaced"]["reason"]
                .as_str()
                .unwrap()
                .contains("stopped"),
            "{r}"
        );
        assert_eq!(
            rep(a).await,
            names,
            "the same hostnames: the replica was replaced, not renamed"
        );
        wait_serving(p.addr, &names, SECS(20)).await;
        assert_eq!(scope.running(), 2);
        let m = get(a, "/metrics").await.body;
        assert!(
            m.contains("sluicegate_replica_replacements_total{service=\"web\"} 1"),
            "{m}"
        );
    });
}

#[test]
fn the_autoscaler_follows_a_bounded_load_up_and_down() {
    docker_test(
        "the_autoscaler_follows_a_bounded_load_up_and_down",
        |scope| async move {
            let p = Proxy::start(&config(
            &scope,
            "min: 1, max: 3, start: 1",
            "    autoscale: {metric: active_connections, target: 2, window: 1s, up_cooldown: 1s, down_cooldown: 2s}",
        ))
        .await;
            let a = p.admin.unwrap();
            let one = wait_rep(a, 1, SECS(30)).await;
            wait_serving(p.addr, &one, SECS(20)).await;
            // Six open connections on one replica: 6 per replica against a target of 2: up to 3. Each is a
            // slow download bounded at 60 s; they are dropped as soon as the scale-up is seen.
            let mut held = Vec::new();
            for _ in 0..6 {
                let mut s = TcpStream::connect(p.addr).await.unwrap();
                s.write_all(b"GET /bytes?n=6000000&rate=100000 HTTP/1.1\r\nHost: t\r\n\r\n")
                    .await
                    .unwrap();
                let mut first = [0u8; 1];
                s.read_exact(&mut first).await.unwrap();
                held.push(s);
            }
            wait_rep(a, 3, SECS(30)).await;
            assert_eq!(scope.running(), 3);
            drop(held);
            // No load: down to the minimum, each removed replica drained first.
            wait_rep(a, 1, SECS(40)).await;
            within(SECS(30), "the removed containers gone", async {
                while scope.running() != 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
            let m = get(a, "/metrics").await.body;
            assert!(
                m.contains("sluicegate_replicas{service=\"web\",state=\"running\"} 1"),
                "{m}"
            );
        },
    );
}
