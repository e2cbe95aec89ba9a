//! Replicas against the real Docker Engine: sluicegate starts, adopts, adds, removes (draining first),
//! heals and autoscales backend containers, and traffic proves each step. The containers run this
//! build's `sluicegate-load serve` (an image made here, no registry), each test on a network of its
//! own with a balancer label of its own, all removed when the test ends.
//!
//! Without a Docker engine these tests say loudly that they skipped; CI sets
//! `SLUICEGATE_REQUIRE_DOCKER=1`, which makes that a failure.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::docker::{self, Scope};
use crate::common::http::{get, request_within};
use crate::common::*;
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
        // The service accepts once its first check has adopted them and they were probed: its very
        // first client is served by one of them, not refused.
        let first = within(SECS(30), "the first client served", who_serves(p.addr)).await;
        assert!(
            first.as_ref().is_some_and(|n| names.contains(n)),
            "adopted before the first client: served by {first:?}"
        );
        assert_eq!(rep(a).await, names, "adopted");
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
                p.service.stats.active_now() == 8
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
            while let Some(r) = within(SECS(60), "the downloads", downloads.join_next()).await {
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
            wait_for(SECS(30), "the removed containers gone", || {
                scope.running() == 1
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

/// The replica entries `/stats` shows for service `web` (every state, with `removal` when one failed).
async fn replica_views(a: SocketAddr) -> Vec<Value> {
    let s = get(a, "/stats").await.json();
    s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| s["replicas"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until the view of replica `hostname` satisfies `cond`; returns it.
async fn wait_view(
    a: SocketAddr,
    hostname: &str,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    within(SECS(30), what, async {
        loop {
            if let Some(v) = replica_views(a)
                .await
                .into_iter()
                .find(|r| r["hostname"] == hostname && cond(r))
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// reliability.md `replica-removal-fails`: the Engine refuses to stop and remove a replica `/rm`
/// chose. The replica leaves traffic at once, its removal is recorded in its container's name, and
/// is retried with back-off (counted, shown in the replica's view); a restarted balancer does not
/// adopt it but goes on removing it; once the Engine removes again, its container is gone.
#[test]
fn a_failed_removal_is_retried_and_survives_a_restart() {
    docker_test(
        "a_failed_removal_is_retried_and_survives_a_restart",
        |scope| async move {
            let engine = docker::FaultyEngine::start();
            let cfg = config(
                &scope,
                &format!("min: 1, max: 3, docker: \"{}\"", engine.endpoint),
                "",
            );
            let mut p = Proxy::start(&cfg).await;
            let a = p.admin.unwrap();
            wait_rep(a, 1, SECS(30)).await;
            // Two, so that one can go (a restart then starts nothing: one is the minimum).
            let (status, body) = scale(a, "POST", "/add", r#"{"n": 1}"#).await;
            assert_eq!(status, 200, "{body}");
            let names = rep(a).await;
            wait_serving(p.addr, &names, SECS(20)).await;
            let (victim, keep) = (names[0].clone(), names[1].clone());

            engine.fail_removals(true);
            let (status, body) = scale(
                a,
                "DELETE",
                "/rm",
                &format!(r#"{{"n": 1, "hostnames": ["{victim}"]}}"#),
            )
            .await;
            assert_eq!(status, 502, "{body}");
            let msg = body["message"].as_str().unwrap();
            assert!(
                msg.contains("injected fault") && msg.contains("retried"),
                "{msg}"
            );
            assert_eq!(
                rep(a).await,
                std::slice::from_ref(&keep),
                "out of traffic at once"
            );
            for _ in 0..20 {
                assert_eq!(who_serves(p.addr).await.as_ref(), Some(&keep));
            }
            // Retried with back-off: the second failure comes a second after the first.
            let v = wait_view(a, &victim, "a second removal attempt", |r| {
                r["removal"]["failures"].as_u64() >= Some(2)
            })
            .await;
            assert_eq!(v["state"], "draining", "{v}");
            assert!(
                v["removal"]["error"]
                    .as_str()
                    .unwrap()
                    .contains("injected fault"),
                "{v}"
            );
            let marked = v["container"].as_str().unwrap().to_string();
            assert!(marked.contains(".removing-"), "{v}");
            assert!(
                scope
                    .containers()
                    .contains(&(marked.clone(), "running".into())),
                "its container runs on, renamed: {:?}",
                scope.containers()
            );
            let m = get(a, "/metrics").await.body;
            assert!(
                m.lines().any(
                    |l| l.starts_with("sluicegate_docker_errors_total{service=\"web\"}")
                        && !l.ends_with(" 0")
                ),
                "{m}"
            );

            // A restart, the Engine still refusing: the replica is not adopted back into traffic.
            p.signal_stop();
            p.stopped().await;
            let p = Proxy::start(&cfg).await;
            let a = p.admin.unwrap();
            let first = within(SECS(30), "the first client served", who_serves(p.addr)).await;
            assert_eq!(first.as_ref(), Some(&keep));
            assert_eq!(rep(a).await, std::slice::from_ref(&keep), "not adopted");
            let v = wait_view(a, &victim, "the removal taken up again", |r| {
                r["removal"]["failures"].as_u64() >= Some(1)
            })
            .await;
            assert_eq!(v["state"], "draining", "{v}");
            let docker_backends = get(a, "/backends")
                .await
                .json()
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["source"] == "docker")
                .count();
            assert_eq!(docker_backends, 1, "only the kept replica takes traffic");

            engine.fail_removals(false);
            wait_for(
                SECS(90),
                "the container removed once the Engine removes again",
                || !scope.containers().iter().any(|(n, _)| *n == marked),
            )
            .await;
            let victim = victim.as_str();
            wait_until(SECS(10), "the replica gone from the view", || async move {
                !replica_views(a)
                    .await
                    .iter()
                    .any(|r| r["hostname"] == victim)
            })
            .await;
            assert!(engine.refused.load(std::sync::atomic::Ordering::Relaxed) >= 3);
            assert_eq!(rep(a).await, [keep]);
        },
    );
}

/// reliability.md `replica-hardening`: a replica runs with no-new-privileges, every capability
/// dropped but the listed ones, and the configured memory, CPU and process limits, as Docker reports
/// them and as its process sees them; and it serves.
#[test]
fn replicas_run_hardened() {
    docker_test("replicas_run_hardened", |scope| async move {
        let p = Proxy::start(&config(
            &scope,
            "min: 1, max: 1, capabilities: [net_bind_service], limits: {memory: 64M, cpus: 0.5, pids: 100}",
            "",
        ))
        .await;
        let a = p.admin.unwrap();
        let names = wait_rep(a, 1, SECS(30)).await;
        wait_serving(p.addr, &names, SECS(20)).await;
        let (container, _) = scope.containers()[0].clone();
        let inspect = std::process::Command::new("docker")
            .args(["inspect", &container])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&inspect.stdout).unwrap();
        let h = &v[0]["HostConfig"];
        assert_eq!(
            h["SecurityOpt"],
            serde_json::json!(["no-new-privileges:true"]),
            "{h}"
        );
        assert_eq!(h["CapDrop"], serde_json::json!(["ALL"]), "{h}");
        assert_eq!(h["CapAdd"], serde_json::json!(["NET_BIND_SERVICE"]), "{h}");
        assert_eq!(h["Memory"], 64 << 20, "{h}");
        assert_eq!(h["NanoCpus"], 500_000_000, "{h}");
        assert_eq!(h["PidsLimit"], 100, "{h}");
        assert_eq!(h["Privileged"], false, "{h}");
        // What the kernel enforces on its process: no new privileges, and only CAP_NET_BIND_SERVICE
        // (bit 10) in every set.
        let pid = v[0]["State"]["Pid"].as_u64().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(set), "0000000000000400", "{set} {status}");
        }
    });
}

/// reliability.md `docker-tls`: sluicegate reaches an Engine served over TLS with client
/// certificates (as `dockerd --tlsverify`), with the `DOCKER_CERT_PATH` layout in
/// `replicas.docker_cert_path`, and runs its replicas through it; given a CA that did not sign the
/// Engine's certificate, it refuses to talk to it (503) instead of trusting it.
#[test]
fn replicas_reach_an_engine_over_tls() {
    docker_test("replicas_reach_an_engine_over_tls", |scope| async move {
        let engine = docker::TlsEngine::start().await;
        let over_tls = |dir: &str| {
            format!(
                "docker: \"tcp://127.0.0.1:{}\", docker_cert_path: \"{}\"",
                engine.addr.port(),
                docker::tls_dir(dir).display()
            )
        };
        // The fixtures' keys are checked in, so 0644 on checkout: allowed, as they are not secret.
        let readable = "allow_readable_keys: true\n";
        let p = Proxy::start(&config(
            &scope,
            &format!("min: 1, max: 2, {}", over_tls("engine")),
            readable,
        ))
        .await;
        let a = p.admin.unwrap();
        let names = wait_rep(a, 1, SECS(30)).await;
        wait_serving(p.addr, &names, SECS(20)).await;
        assert!(engine.handshakes.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(engine.refused.load(std::sync::atomic::Ordering::Relaxed), 0);

        // The same client certificate, but a CA that did not sign the Engine's: refused.
        // (Same labels: were it trusted, it would adopt the running replica and /add would work.)
        let q = Proxy::start(&config(
            &scope,
            &format!("min: 0, max: 2, {}", over_tls("untrusted")),
            readable,
        ))
        .await;
        let (status, body) = scale(q.admin.unwrap(), "POST", "/add", r#"{"n": 1}"#).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("invalid peer certificate"),
            "says why: {body}"
        );
        assert_eq!(rep(q.admin.unwrap()).await, Vec::<String>::new());
        assert_eq!(
            scope.running(),
            1,
            "nothing started through an unverified Engine"
        );
    });
}
