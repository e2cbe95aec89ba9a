//! Health that knows the protocol: `send`/`expect` exchanges against the real
//! `redis-server` and PostgreSQL (the shipped `conf/databases.yaml`), commands run as checks
//! (`kind: exec`), the agent a backend runs to report its own state and weight, and maintenance
//! from the admin API. docs/reliability.md names each scenario.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::databases::{self, Postgres, Redis};
use crate::common::fleet::{replicas, spread, Replica};
use crate::common::http::{get, send};
use crate::common::{listen_on_one_port, wait_for, wait_until, within, Backend, Proxy};
use sluicegate::pool::State;
use sluicegate::{AgentSays, Health};

/// The service `name` of `conf/databases.yaml`, listening on an ephemeral port, over `backends`
/// (in the file's order), with `tweak` applied to its `health` (faster intervals for the test).
fn shipped(name: &str, backends: &[SocketAddr], tweak: &[(&str, serde_yaml::Value)]) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/databases.yaml"))
        .expect("conf/databases.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let mut service = doc["services"]
        .as_sequence()
        .and_then(|s| s.iter().find(|s| s["name"].as_str() == Some(name)))
        .cloned()
        .unwrap_or_else(|| panic!("no service {name} in conf/databases.yaml"));
    service["listen"] = "127.0.0.1:0".into();
    let listed = service["backends"].as_sequence_mut().expect("backends");
    assert_eq!(
        listed.len(),
        backends.len(),
        "one address per listed backend"
    );
    for (b, addr) in listed.iter_mut().zip(backends) {
        b["address"] = addr.to_string().into();
    }
    for (k, v) in tweak {
        service["health"][*k] = v.clone();
    }
    let config = serde_yaml::to_string(&serde_json::json!({"log": {"level": "warn"}})).unwrap();
    let service = serde_yaml::to_string(&vec![service]).unwrap();
    format!("{config}services:\n{service}")
}

fn ms(n: u64) -> serde_yaml::Value {
    format!("{n}ms").into()
}

/// reliability.md `redis-primary`: the shipped Redis check (`INFO replication` / `role:master`)
/// sends traffic to the primary only; promoting the replica (`REPLICAOF NO ONE`) and demoting the
/// old primary moves it within `rise` intervals, and the demoted node's sessions are cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_traffic_follows_the_primary() {
    if !Redis::available("redis_traffic_follows_the_primary") {
        return;
    }
    let primary = Redis::start(None);
    let replica = Redis::start(Some(primary.addr));
    let y = shipped(
        "redis",
        &[primary.addr, replica.addr],
        &[("interval", ms(200)), ("timeout", ms(500))],
    );
    let proxy = Proxy::start(&y).await;
    let health = |a: SocketAddr| proxy.backend(a).health();
    wait_for(Duration::from_secs(5), "primary up, replica down", || {
        health(primary.addr) == Health::Healthy && health(replica.addr) == Health::Unhealthy
    })
    .await;
    let err = proxy
        .backend(replica.addr)
        .probes()
        .last()
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert!(
        err.contains("role:master"),
        "the failure says what was expected: {err}"
    );
    for i in 0..10 {
        assert_eq!(
            databases::command(proxy.addr, &format!("SET k{i} v")).await,
            "+OK"
        );
    }
    // A held session on the primary, to see it cut when the primary is demoted.
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"PING\r\n").await.unwrap();
    let mut pong = [0u8; 7];
    held.read_exact(&mut pong).await.unwrap();

    // The failover: the replica promoted, the old primary made its replica.
    assert_eq!(replica.command("REPLICAOF NO ONE").await, "+OK");
    wait_for(Duration::from_secs(10), "the promoted node healthy", || {
        health(replica.addr) == Health::Healthy
    })
    .await;
    let demote = format!("REPLICAOF 127.0.0.1 {}", replica.addr.port());
    assert_eq!(primary.command(&demote).await, "+OK");
    wait_for(Duration::from_secs(10), "the demoted node down", || {
        health(primary.addr) == Health::Unhealthy
    })
    .await;
    let mut buf = [0u8; 16];
    let cut = within(
        Duration::from_secs(5),
        "held session cut",
        held.read(&mut buf),
    )
    .await;
    assert!(
        matches!(cut, Ok(0) | Err(_)),
        "on_down: close cut the demoted node's session"
    );
    for i in 0..10 {
        assert_eq!(
            databases::command(proxy.addr, &format!("SET n{i} v")).await,
            "+OK"
        );
    }
    assert_eq!(replica.role().await, "master");
    assert_eq!(
        replica.command("GET n9").await,
        "$1",
        "the writes went to the new primary"
    );
}

/// reliability.md `postgres-check`: the shipped Postgres check (an SSLRequest, answered S or N)
/// and the stricter startup exchange of docs/configuration.md pass against a real server and fail
/// once it stops; the backup takes over while the primary is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_answers_the_startup_exchange() {
    if !Postgres::available("postgres_answers_the_startup_exchange") {
        return;
    }
    let mut pg = Postgres::start();
    // The backup: something that answers an SSLRequest with N and nothing more.
    let spare = Backend::start([127, 0, 0, 3], |mut s: TcpStream| async move {
        let mut request = [0u8; 8];
        if s.read_exact(&mut request).await.is_ok() {
            let _ = s.write_all(b"N").await;
        }
        let _ = s.read(&mut request).await;
    })
    .await;
    let y = shipped(
        "postgres",
        &[pg.addr, spare.addr],
        &[("interval", ms(200)), ("fall", 2.into())],
    );
    let proxy = Proxy::start(&y).await;
    let health = |a: SocketAddr| proxy.backend(a).health();
    wait_for(Duration::from_secs(5), "postgres healthy", || {
        health(pg.addr) == Health::Healthy
    })
    .await;
    assert_eq!(proxy.service.pool.snapshot().serving_tier, Some(0));
    // Through sluicegate, the server itself answers.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert!(matches!(&answer, b"N" | b"S"), "{answer:?}");
    drop(s);

    // The stricter check: SSLRequest, then a startup message for user postgres, answered R.
    let strict = format!(
        "log: {{level: warn}}\nservices:\n  - name: pg\n    listen: 127.0.0.1:0\n    health:\n      kind: tcp\n      interval: 200ms\n      fall: 2\n      steps:\n        - send_hex: \"00000008 04d2162f\"\n        - expect_regex: \"^N\"\n        - send_hex: \"00000017 00030000 7573657200 706f737467726573 00 00\"\n        - expect_hex: \"52\"\n    backends: [{{address: \"{}\"}}]\n",
        pg.addr
    );
    let strict = Proxy::start(&strict).await;
    wait_for(
        Duration::from_secs(5),
        "the startup exchange passes",
        || strict.backend(pg.addr).health() == Health::Healthy,
    )
    .await;

    pg.stop();
    wait_for(
        Duration::from_secs(5),
        "both checks fail once it stops",
        || {
            health(pg.addr) == Health::Unhealthy
                && strict.backend(pg.addr).health() == Health::Unhealthy
        },
    )
    .await;
    assert_eq!(
        proxy.service.pool.snapshot().serving_tier,
        Some(1),
        "the backup serves"
    );
}

/// An HTTP backend on `ip` that answers every request with `status` and `body`.
async fn answering(ip: [u8; 4], status: &'static str, body: &'static str) -> Backend {
    Backend::start(ip, move |mut s| async move {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(answer.as_bytes()).await;
    })
    .await
}

/// reliability.md `http-expect`: `kind: http` with `expect_status` (a range) and `expect_body_regex`:
/// only the backend whose answer has an expected status and a body that matches is healthy; one
/// with the right body and a status outside the range, and one with the wrong body, are not, each
/// with what came in its probe history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checks_expect_a_status_and_a_body() {
    let primary = answering([127, 0, 0, 2], "200 OK", "role=primary\n").await;
    let replica = answering([127, 0, 0, 3], "200 OK", "role=replica\n").await;
    let moved = answering([127, 0, 0, 4], "302 Found", "role=primary\n").await;
    let addrs = [primary.addr, replica.addr, moved.addr];
    let y = crate::common::service_yaml(
        &addrs,
        sluicegate::config::RelayMode::Epoll,
        "health: {kind: http, path: /role, expect_status: [\"200-299\"], expect_body_regex: \"^role=prim\", interval: 100ms, timeout: 1s, rise: 1, fall: 1}",
    );
    let proxy = Proxy::start(&y).await;
    wait_for(Duration::from_secs(5), "every backend probed", || {
        addrs
            .iter()
            .all(|a| proxy.backend(*a).health() != Health::Unknown)
    })
    .await;
    let health: Vec<Health> = addrs.iter().map(|a| proxy.backend(*a).health()).collect();
    assert_eq!(
        health,
        [Health::Healthy, Health::Unhealthy, Health::Unhealthy]
    );
    let last_error = |a: SocketAddr| {
        proxy
            .backend(a)
            .view()
            .probes
            .last()
            .and_then(|r| r.error.clone())
            .unwrap_or_default()
    };
    assert!(
        last_error(replica.addr).contains("role=replica"),
        "{}",
        last_error(replica.addr)
    );
    assert!(
        last_error(moved.addr).contains("302"),
        "{}",
        last_error(moved.addr)
    );
    assert_eq!(proxy.service.pool.snapshot().ready.len(), 1);
}

/// reliability.md `exec-check`: a script the test writes, run as `kind: exec`: exit 0 is up; its
/// output and the backend's address are in the probe history; a command that hangs fails at the
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_checks_run_the_command_with_the_backend_in_its_environment() {
    let (_port, fleet) = replicas(2, 2);
    let dir = std::env::temp_dir().join(format!("sg-exec-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("check.sh");
    std::fs::write(
        &script,
        format!(
            "echo \"checking $SLUICEGATE_SERVICE $SLUICEGATE_BACKEND_ADDRESS\"\ntest -e {}/up-$SLUICEGATE_BACKEND_HOST\n",
            dir.display()
        ),
    )
    .unwrap();
    let up = |r: &Replica| dir.join(format!("up-{}", r.ip()));
    std::fs::write(up(&fleet[0]), "").unwrap();
    std::fs::write(up(&fleet[1]), "").unwrap();
    let addrs: Vec<SocketAddr> = fleet.iter().map(|r| r.addr()).collect();
    let y = crate::common::service_yaml(
        &addrs,
        sluicegate::config::RelayMode::Epoll,
        &format!(
            "health: {{kind: exec, command: [/bin/sh, \"{}\"], interval: 200ms, timeout: 2s, fall: 2}}",
            script.display()
        ),
    );
    let proxy = Proxy::start(&y).await;
    let health = |r: &Replica| proxy.backend(r.addr()).health();
    wait_for(Duration::from_secs(5), "both healthy", || {
        fleet.iter().all(|r| health(r) == Health::Healthy)
    })
    .await;
    let last = proxy
        .backend(fleet[0].addr())
        .probes()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(
        last.output.as_deref(),
        Some(format!("checking t {}\\n", fleet[0].addr()).as_str()),
        "the output, escaped, in the history"
    );
    std::fs::remove_file(up(&fleet[1])).unwrap();
    wait_for(Duration::from_secs(5), "the second down", || {
        health(&fleet[1]) == Health::Unhealthy
    })
    .await;
    let err = proxy
        .backend(fleet[1].addr())
        .probes()
        .last()
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert!(err.contains("exit status: 1"), "{err}");
    assert_eq!(spread(proxy.addr, 10).await.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);

    // A command that hangs: each probe fails at its timeout, bounded.
    let y = crate::common::service_yaml(
        &addrs[..1],
        sluicegate::config::RelayMode::Epoll,
        "health: {kind: exec, command: [sleep, \"30\"], interval: 200ms, timeout: 300ms, fall: 2}",
    );
    let hanging = Proxy::start(&y).await;
    wait_for(Duration::from_secs(5), "a hanging check fails", || {
        hanging.backend(addrs[0]).health() == Health::Unhealthy
    })
    .await;
    let err = hanging
        .backend(addrs[0])
        .probes()
        .last()
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert_eq!(err, "timed out");
}

/// An agent the test plays: it answers every connection with the line it is given (or nothing,
/// once closed), on one listener.
struct Agent {
    line: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(listener: TcpListener, first: &str) -> Agent {
        let line = Arc::new(Mutex::new(first.as_bytes().to_vec()));
        let l = line.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let bytes = l.lock().unwrap().clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&bytes).await;
                });
            }
        });
        Agent { line, task }
    }

    fn say(&self, line: &[u8]) {
        *self.line.lock().unwrap() = line.to_vec();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// reliability.md `agent`: a backend's agent takes it out (`drain`, `down`, `maint`), sets its
/// weight share (`NN%`) and brings it back (`up`); garbage, an answer of 1 MiB without a line end,
/// and an agent that stops answering change nothing and are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_adjusts_its_backend_and_garbage_changes_nothing() {
    let (_port, fleet) = replicas(2, 2);
    let [l2, l3]: [TcpListener; 2] = listen_on_one_port(&[[127, 0, 0, 2], [127, 0, 0, 3]])
        .try_into()
        .unwrap();
    let agent_port = l2.local_addr().unwrap().port();
    let a2 = Agent::start(l2, "up 100%\n");
    let _a3 = Agent::start(l3, "ready\n");
    let addrs: Vec<SocketAddr> = fleet.iter().map(|r| r.addr()).collect();
    let y = crate::common::service_yaml(
        &addrs,
        sluicegate::config::RelayMode::Epoll,
        &format!("balance: weighted_round_robin\nagent: {{port: {agent_port}, interval: 100ms, timeout: 500ms}}"),
    );
    let proxy = Proxy::start(&y).await;
    let b2 = proxy.backend(addrs[0]);
    let says = || b2.agent().0;
    wait_for(Duration::from_secs(10), "the agent heard", || {
        says() == AgentSays::Up
    })
    .await;
    assert_eq!(spread(proxy.addr, 20).await.len(), 2);

    a2.say(b"drain # deploying\n");
    wait_for(Duration::from_secs(10), "drained by its agent", || {
        says() == AgentSays::Drain
    })
    .await;
    let got = spread(proxy.addr, 20).await;
    assert_eq!(got.get(&addrs[0].ip()), None, "{got:?}");
    assert_eq!(
        b2.state(),
        State::Active,
        "the agent's drain is not the API's state"
    );

    // down and maint take it out too, each its own word.
    for (word, want) in [
        (&b"down\n"[..], AgentSays::Down),
        (b"MAINT\n", AgentSays::Maint),
    ] {
        a2.say(word);
        wait_for(Duration::from_secs(10), want.as_str(), || says() == want).await;
        let got = spread(proxy.addr, 10).await;
        assert_eq!(got.get(&addrs[0].ip()), None, "{}: {got:?}", want.as_str());
    }

    a2.say(b"up 50%\n");
    wait_for(Duration::from_secs(10), "half weight", || {
        says() == AgentSays::Up && (b2.view().effective_weight - 0.5).abs() < 1e-9
    })
    .await;
    let got = spread(proxy.addr, 30).await;
    assert_eq!(
        got.get(&addrs[0].ip()),
        Some(&10),
        "a third of the traffic: {got:?}"
    );

    // Garbage, then 1 MiB without a line end: refused, recorded, nothing changes.
    let history_len = |b: &sluicegate::pool::Backend| b.view().agent.map_or(0, |a| a.history.len());
    let huge = vec![b'x'; 1 << 20];
    for (bad, error) in [
        (&b"sideways\n"[..], "\"sideways\" is not an agent word"),
        (&huge[..], "no line end in the first 512 bytes"),
    ] {
        a2.say(bad);
        wait_until(Duration::from_secs(10), error, || async {
            let h = b2.view().agent.unwrap().history;
            h.last()
                .and_then(|r| r.error.clone())
                .is_some_and(|e| e.contains(error))
        })
        .await;
        assert_eq!(b2.agent(), (AgentSays::Up, 50), "unchanged by garbage");
    }
    assert!(history_len(&b2) <= 10, "the history is bounded");
    let last = b2.view().agent.unwrap().history.last().cloned().unwrap();
    assert_eq!(last.output.unwrap().len(), 512, "the first 512 bytes kept");

    // An agent that stops answering changes nothing either: once two of its checks have failed
    // (recorded), its word stands.
    let before = last.at_ms;
    drop(a2);
    wait_for(
        Duration::from_secs(10),
        "two failed checks recorded",
        || {
            let h = b2.view().agent.unwrap().history;
            h.iter()
                .filter(|r| r.at_ms > before && r.error.is_some())
                .count()
                >= 2
        },
    )
    .await;
    assert_eq!(b2.agent(), (AgentSays::Up, 50));
    assert_eq!(proxy.backend(addrs[1]).agent(), (AgentSays::Up, 100));
}

/// reliability.md `maint`: `POST /backends/{svc}/{addr}/maint` takes a backend out of rotation and
/// pauses its probes, unlike drain; `PUT` `{"state": "active"}` brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_pauses_probes_and_traffic() {
    let (_port, fleet) = replicas(2, 2);
    let addrs: Vec<SocketAddr> = fleet.iter().map(|r| r.addr()).collect();
    let y = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        crate::common::service_yaml(
            &addrs,
            sluicegate::config::RelayMode::Epoll,
            "health: {kind: http, interval: 100ms}",
        )
    );
    let proxy = Proxy::start(&y).await;
    let admin = proxy.admin.expect("admin");
    let path = format!("/backends/t/{}/maint", addrs[0]);
    let r = send(admin, "POST", &path, "").await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["state"], "maint");
    assert_eq!(proxy.backend(addrs[0]).state(), State::Maint);
    // The other backend's probes are the clock: five of its intervals, however slow the machine.
    let (probes, others) = (fleet[0].health_requests(), fleet[1].health_requests());
    wait_for(
        Duration::from_secs(10),
        "five probes of the other backend",
        || fleet[1].health_requests() >= others + 5,
    )
    .await;
    assert!(
        fleet[0].health_requests() <= probes + 1,
        "probes paused (one may be in flight)"
    );
    let got = spread(proxy.addr, 10).await;
    assert_eq!(got.get(&addrs[0].ip()), None, "{got:?}");
    let listed = get(admin, &format!("/backends/t/{}", addrs[0]))
        .await
        .json();
    assert_eq!(listed["state"], "maint");
    let metrics = get(admin, "/metrics").await.body;
    let line = format!(
        "sluicegate_backend_state{{service=\"t\",backend=\"{}\",state=\"maint\"}} 1",
        addrs[0]
    );
    assert!(metrics.contains(&line), "{line}");

    // Its health check fails after the maintenance (it came back broken): leaving maintenance does
    // not trust what the probes said before it.
    fleet[0].set_status(503);
    let r = send(
        admin,
        "PUT",
        &format!("/backends/t/{}", addrs[0]),
        r#"{"state":"active"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(proxy.backend(addrs[0]).health(), Health::Healthy);
    let ip: IpAddr = addrs[0].ip();
    let got = spread(proxy.addr, 10).await;
    assert!(!got.contains_key(&ip), "not before a probe passes: {got:?}");
    wait_until(Duration::from_secs(10), "probes resumed", || async {
        fleet[0].health_requests() > probes + 2
    })
    .await;
    fleet[0].set_status(200);
    wait_for(Duration::from_secs(10), "healthy again", || {
        proxy.backend(addrs[0]).health() == Health::Healthy
    })
    .await;
    assert_eq!(spread(proxy.addr, 10).await.len(), 2);
    assert!(spread(proxy.addr, 10).await.contains_key(&ip));
}

/// The processes whose environment holds `SG_LEAK=<token>`: what a test's exec checks started
/// (children inherit the variable, so their own children are found too). A zombie's environment
/// reads empty: what is dead and waits for its parent is not counted.
fn marked(token: &str) -> Vec<i32> {
    let want = format!("SG_LEAK={token}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .any(|v| v == want.as_bytes())
        })
        .collect()
}

/// Kills, by pid, whatever a failed test left with its token.
struct KillMarked(String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid carries this test's token.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// How many times the script `name` ran (each run appends a line to its file).
fn runs(dir: &std::path::Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("runs-{name}")))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A service `name` on one backend whose exec check is `script`, written to `dir`; the script
/// first appends a line to `dir/runs-NAME`.
fn exec_service(
    dir: &std::path::Path,
    name: &str,
    backend: u16,
    health: &str,
    script: &str,
) -> String {
    let path = dir.join(format!("{name}.sh"));
    std::fs::write(
        &path,
        format!("echo run >> \"{}/runs-{name}\"\n{script}", dir.display()),
    )
    .unwrap();
    format!(
        "  - name: {name}\n    listen: 127.0.0.1:0\n    backends: [{{address: \"127.0.0.1:{backend}\"}}]\n    health: {{kind: exec, command: [/bin/sh, \"{}\"], {health}}}\n",
        path.display()
    )
}

/// reliability.md `exec-leftovers`: exec checks that leave processes behind, run by the binary (a
/// child subreaper) 20 times each: a child detached with `&` from a command that exits 0, a child in
/// a session of its own (`setsid`), a child that ignores SIGTERM of a command that times out; and
/// a check in flight at stop with both kinds. None outlives its check: at most the one of the check
/// running is seen, and none is left after stop.
#[test]
fn exec_checks_leave_no_process_behind() {
    let dir = crate::cli::tmp_file("x", "")
        .parent()
        .unwrap()
        .to_path_buf();
    let token = format!("sg-leak-{}", dir.file_name().unwrap().to_string_lossy());
    let _cleanup = KillMarked(token.clone());
    let child = |variant: &str| format!("SG_LEAK={token}-{variant}");
    let fast = "interval: 100ms, timeout: 2s, fall: 1";
    let services = [
        exec_service(
            &dir,
            "detached",
            10001,
            fast,
            &format!(
                "{} sh -c 'sleep 300; :' >/dev/null 2>&1 </dev/null &\nexit 0\n",
                child("detached")
            ),
        ),
        exec_service(
            &dir,
            "setsid",
            10002,
            fast,
            &format!(
                "{} setsid sh -c 'sleep 300; :' >/dev/null 2>&1 </dev/null &\nexit 0\n",
                child("setsid")
            ),
        ),
        exec_service(
            &dir,
            "stubborn",
            10003,
            "interval: 100ms, timeout: 200ms, fall: 1",
            &format!(
                "{} sh -c 'trap \"\" TERM HUP INT; sleep 300; :' &\nexec sleep 300\n",
                child("stubborn")
            ),
        ),
        exec_service(
            &dir,
            "atstop",
            10004,
            "interval: 100ms, timeout: 60s, fall: 1",
            &format!(
                "[ \"$(wc -l < \"{d}/runs-atstop\")\" -gt 1 ] || exit 0\n{c} sh -c 'trap \"\" TERM HUP; sleep 300; :' &\n{c} setsid sh -c 'trap \"\" TERM HUP; sleep 300; :' >/dev/null 2>&1 </dev/null &\nexec sleep 300\n",
                c = child("atstop"),
                d = dir.display()
            ),
        ),
    ];
    let yaml = format!(
        "log: {{level: info, format: json}}\nservices:\n{}",
        services.concat()
    );
    let mut sg = crate::cli::Sg::start(&yaml);
    let end = tokio::time::Instant::now() + Duration::from_secs(90);
    for variant in ["detached", "setsid", "stubborn"] {
        while runs(&dir, variant) < 20 {
            assert!(
                tokio::time::Instant::now() < end,
                "{variant}: {} runs in 90 s",
                runs(&dir, variant)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // One check in flight: its child (a shell and its sleep), until the check ends.
        let left = marked(&format!("{token}-{variant}"));
        assert!(
            left.len() <= 2,
            "{variant}: {} processes left after {} checks: {left:?}",
            left.len(),
            runs(&dir, variant)
        );
    }
    // Its first check passes at once (start-up waits for a first verdict); the second hangs.
    assert_eq!(runs(&dir, "atstop"), 2, "the check in flight at stop");
    assert_eq!(
        marked(&format!("{token}-atstop")).len(),
        4,
        "what it started"
    );
    sg.signal(libc::SIGTERM);
    assert_eq!(sg.wait_exit(Duration::from_secs(30)), 0);
    // Killed before sluicegate exited; the kernel may take a moment to tear them down.
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !marked(&token).is_empty() && tokio::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = marked(&token);
    assert!(left.is_empty(), "left after stop: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// reliability.md `exec-slots`: one service's hanging checks (20 backends whose command sleeps
/// past the test) hold only their share of the exec slots: another service's check still runs and
/// gives its verdict, and the hanging service's probes that wait for a slot are logged.
#[test]
fn one_services_hanging_checks_leave_slots_for_another() {
    let dir = crate::cli::tmp_file("x", "")
        .parent()
        .unwrap()
        .to_path_buf();
    let token = format!("sg-slots-{}", dir.file_name().unwrap().to_string_lossy());
    let _cleanup = KillMarked(token.clone());
    let hanging = "interval: 100ms, timeout: 30s, fall: 1";
    let mut hog = exec_service(
        &dir,
        "hog",
        10001,
        hanging,
        &format!(
            "[ -e \"{d}/hang\" ] || exit 0\necho run >> \"{d}/runs-hangs\"\nexport SG_LEAK={token}\nexec sleep 300\n",
            d = dir.display()
        ),
    );
    hog = hog.replace(
        "backends: [{address: \"127.0.0.1:10001\"}]",
        &format!(
            "backends: [{}]",
            (10001..=10020)
                .map(|p| format!("{{address: \"127.0.0.1:{p}\"}}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let up = dir.join("quick-up");
    let quick = exec_service(
        &dir,
        "quick",
        10100,
        "interval: 100ms, timeout: 2s, fall: 1, rise: 1",
        &format!("test -e \"{}\"\n", up.display()),
    );
    let yaml = format!("log: {{level: info, format: json}}\nservices:\n{hog}{quick}");
    // Start-up waits for a first verdict: the checks hang only from now on.
    let mut sg = crate::cli::Sg::start(&yaml);
    std::fs::write(dir.join("hang"), "").unwrap();
    // The hanging checks hold what they may (every slot, before the fix) before the other
    // service's check can pass.
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while runs(&dir, "hangs") < 8 || runs(&dir, "quick") < 1 {
        assert!(
            tokio::time::Instant::now() < end,
            "hog hangs {}, quick {}",
            runs(&dir, "hangs"),
            runs(&dir, "quick")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&up, "").unwrap();
    // Bounds a hang only: the hanging checks time out after 30 s.
    sg.wait_line(Duration::from_secs(15), |l| {
        l["msg"] == "backend healthy" && l["service"] == "quick"
    });
    let waits = sg.wait_line(Duration::from_secs(5), |l| {
        l["msg"] == "health: an exec check waits for a slot" && l["service"] == "hog"
    });
    assert_eq!(waits["share"], 8, "{waits}");
    assert!(
        runs(&dir, "hangs") <= 8,
        "hog hangs {}",
        runs(&dir, "hangs")
    );
    sg.signal(libc::SIGTERM);
    assert_eq!(sg.wait_exit(Duration::from_secs(30)), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
