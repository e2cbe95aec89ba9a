//! Docker-label discovery against the real Docker Engine: containers carrying a `docker:` backend's
//! labels are its backends, followed through the Engine's event stream (not its periodic re-list,
//! which these tests set to a minute), with their per-container labels; the last set stays when the
//! Engine goes away. Each test runs its containers on a network of its own, all removed when it ends.
//!
//! Without a Docker engine these tests say loudly that they skipped; CI sets
//! `SLUICEGATE_REQUIRE_DOCKER=1`, which makes that a failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
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

/// An Engine of the test's own on a Unix socket: answers `/version`, lists one running container
/// (`c1` at 127.0.0.2 with the test's label), and on `/events` sends a line without end (8 MiB with
/// no newline, in 64 KiB chunks, as a broken or hostile Engine might), then the newline and a `die`
/// event for `c1`, and holds the stream open. Counts the event requests.
struct EndlessEngine {
    endpoint: String,
    events_requests: Arc<AtomicU64>,
    dir: std::path::PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EndlessEngine {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bytes of the line without end.
const ENDLESS: usize = 8 << 20;

impl EndlessEngine {
    fn start(label: &'static str) -> EndlessEngine {
        let dir = std::env::temp_dir().join(format!("sluicegate-endless-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let events_requests = Arc::new(AtomicU64::new(0));
        let counted = events_requests.clone();
        let task = docker::serve_each(listener, move |s| {
            EndlessEngine::serve(s, label, counted.clone())
        });
        EndlessEngine {
            endpoint: format!("unix://{}", path.display()),
            events_requests,
            dir,
            task,
        }
    }

    /// One request per connection (each answer says `Connection: close`).
    async fn serve(mut s: tokio::net::UnixStream, label: &str, events: Arc<AtomicU64>) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        let reply = |body: String| {
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        };
        let answer = if path.ends_with("/version") {
            reply(r#"{"ApiVersion":"1.45","Version":"27.0.0","MinAPIVersion":"1.24"}"#.into())
        } else if path.contains("/containers/json") {
            reply(format!(
                r#"[{{"Id":"c1id","Names":["/c1"],"Labels":{{"sluicegate.test":"{label}"}},"State":"running","Status":"Up 5 seconds","NetworkSettings":{{"Networks":{{"n1":{{"IPAddress":"127.0.0.2"}}}}}}}}]"#
            ))
        } else if path.contains("/events") {
            events.fetch_add(1, Relaxed);
            let _ = EndlessEngine::endless(&mut s).await;
            return;
        } else {
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
        };
        let _ = s.write_all(answer.as_bytes()).await;
    }

    /// The event stream: the line without end, then the event after it, then nothing (held open
    /// for at most a minute, the test's bound).
    async fn endless(s: &mut tokio::net::UnixStream) -> std::io::Result<()> {
        async fn chunk(s: &mut tokio::net::UnixStream, data: &[u8]) -> std::io::Result<()> {
            s.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            s.write_all(data).await?;
            s.write_all(b"\r\n").await
        }
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await?;
        chunk(s, br#"{"Type":"container","Action":"start","x":""#).await?;
        let filler = vec![b'a'; 64 << 10];
        for _ in 0..ENDLESS / filler.len() {
            chunk(s, &filler).await?;
        }
        let die = r#"{"Type":"container","Action":"die","Actor":{"ID":"c1id","Attributes":{"name":"c1"}},"scope":"local","time":1}"#;
        chunk(s, format!("\n{die}\n").as_bytes()).await?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    }
}

/// reliability.md `docker-endless-line`: the Engine's event stream sends a line without end (8 MiB
/// without a newline), then a `die` event. The line is read through a splitter that looks at each
/// byte once and holds at most 1 MiB of a line (bollard's decoder parsed its whole buffer again on
/// each chunk: quadratic, on the control runtime); it is discarded with an error in the log, and
/// the `die` after it is applied on the same stream (the container leaves, though the Engine still
/// lists it running), with no reconnect. Before the fix the broken line made the stream fail on
/// each connection, so the `die` was never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_docker_event_line_is_dropped_and_the_next_event_applied() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let engine = EndlessEngine::start("endless");
    let yaml = format!(
        "log: {{level: info, format: json}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    discovery: {{refresh: 60s}}\n    backends:\n      - docker: {{labels: {{sluicegate.test: endless}}, port: {}, docker: \"{}\"}}\n",
        backend.addr.port(),
        engine.endpoint
    );
    let mut sg = tokio::task::block_in_place(|| crate::cli::Sg::start(&yaml));
    let changed = |l: &serde_json::Value| l["msg"] == "the containers carrying the labels changed";
    let first = tokio::task::block_in_place(|| sg.wait_line(Duration::from_secs(20), changed));
    let at = backend.addr.to_string();
    assert!(
        first["backends"].as_str().is_some_and(|b| b.contains(&at)),
        "c1 listed first: {first}"
    );
    let discarded = tokio::task::block_in_place(|| {
        sg.wait_line(Duration::from_secs(30), |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("Docker event line longer than the maximum"))
        })
    });
    assert_eq!(discarded["level"], "error", "{discarded}");
    let gone = tokio::task::block_in_place(|| {
        sg.wait_line(Duration::from_secs(30), |l| {
            changed(l) && !l["backends"].as_str().is_some_and(|b| b.contains(&at))
        })
    });
    assert!(gone.is_object());
    assert_eq!(
        engine.events_requests.load(Relaxed),
        1,
        "the die event applied on the stream that carried the endless line, not after a reconnect"
    );
    sg.signal(libc::SIGTERM);
    assert_eq!(
        tokio::task::block_in_place(|| sg.wait_exit(Duration::from_secs(10))),
        0
    );
}
