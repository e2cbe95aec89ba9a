//! The binary as users and outside suites drive it (docs/configuration.md, docs/admin-api.md): command line, exit codes, config
//! errors, signals, the JSON routing log; and the scenarios that need a process of their own to measure
//! (docs/reliability.md: `slow-readers`, `out-of-descriptors`, `config-errors`).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

fn tmp_file(name: &str, text: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sluicegate-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A sluicegate process with JSON logs on stdout, collected line by line.
struct Sg {
    child: Child,
    /// The config file it runs with (a reload re-reads it).
    cfg: PathBuf,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    addr: SocketAddr,
}

impl Sg {
    /// Starts the binary (through `sh -c` with `prefix` before `exec`, e.g. a ulimit) and waits for its
    /// "listening" line.
    fn start_with(yaml: &str, prefix: &str) -> Sg {
        let cfg = tmp_file("sg.yaml", yaml);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{prefix} exec \"{BIN}\" --config \"{}\"",
                cfg.display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sluicegate");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut sg = Sg {
            lines: Sg::collect(stdout),
            child,
            cfg,
            seen: Vec::new(),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let listening = sg.wait_line(SECS(20), |l| l["msg"] == "listening");
        sg.addr = listening["listen"].as_str().unwrap().parse().unwrap();
        sg
    }

    fn start(yaml: &str) -> Sg {
        Sg::start_with(yaml, "")
    }

    /// Parses stdout lines as JSON on a thread; a line that is not JSON arrives as `{"raw": line}`.
    fn collect(stdout: std::process::ChildStdout) -> mpsc::Receiver<Value> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        rx
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for a log line matching `pred` (also searching lines already seen).
    fn wait_line(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no matching log line within {limit:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                while let Ok(v) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(v);
                }
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < end,
                "sluicegate did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn routes(&self) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|v| v["target"] == "sluicegate::route")
            .collect()
    }

    /// User + system CPU seconds of the process so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Sg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on a config written from `yaml`, stdout piped.
fn spawn(name: &str, yaml: &str) -> Child {
    let cfg = tmp_file(name, yaml);
    Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sluicegate")
}

fn yaml(backends: &[SocketAddr], extra: &str, shutdown: &str) -> String {
    let mut y = format!("log: {{level: info, format: json}}\nshutdown: {shutdown}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n");
    for l in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", l.trim());
    }
    y += "    backends:\n";
    for b in backends {
        y += &format!("      - {{address: \"{b}\"}}\n");
    }
    y
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("SLUICEGATE_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn every_example_config_is_valid() {
    let mut n = 0;
    for e in std::fs::read_dir(repo("conf")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let (code, _, err) = run(&["--check", "--config", p.to_str().unwrap()], &[]);
            assert_eq!(code, 0, "{}: {err}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// reliability.md `config-errors`: each file in tests/invalid-configs names the key its error must name (`# expect: KEY`).
#[test]
fn every_invalid_config_fails_naming_its_key() {
    let mut n = 0;
    for e in std::fs::read_dir(repo("tests/invalid-configs")).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let key = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line names the key");
        let (code, _, err) = run(&["--check", "--config", p.to_str().unwrap()], &[]);
        assert_eq!(code, 64, "{}: exit code", p.display());
        assert!(
            err.lines().any(|l| l.starts_with(&format!("{key}:"))),
            "{}: error must name {key}:\n{err}",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 20);
}

/// reliability.md `config-errors`: an invalid config exits 64 before any port is bound (the port is held by the test, so
/// binding first would have failed differently).
#[test]
fn invalid_config_exits_before_binding() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cfg = tmp_file(
        "bad.yaml",
        &format!("services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    backends: [{{address: 127.0.0.1:9, weight: 0}}]\n"),
    );
    let (code, _, err) = run(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("services[0].backends[0].weight"), "{err}");
    assert!(!err.contains("cannot listen"), "{err}");
}

#[test]
fn command_line_contract() {
    assert_eq!(run(&[], &[]).0, 2, "no config: bad command line");
    assert_eq!(run(&["--config", "x", "--frobnicate"], &[]).0, 2);
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    let local = repo("conf/local.yaml");
    let (code, out, _) = run(
        &["--check"],
        &[("SLUICEGATE_CONFIG", local.to_str().unwrap())],
    );
    assert_eq!(code, 0, "SLUICEGATE_CONFIG stands in for --config");
    assert!(out.contains("ok"));
    let (code, _, err) = run(
        &["--check", "--config", "/nonexistent/sluicegate.yaml"],
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/sluicegate.yaml"), "{err}");
}

#[test]
fn unbindable_port_exits_nonzero_naming_the_address() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let cfg = tmp_file(
        "busy.yaml",
        &format!("log: {{level: error}}\nservices:\n  - name: web\n    listen: {addr}\n    backends: [{{address: 127.0.0.1:9}}]\n"),
    );
    let (code, _, err) = run(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
}

/// reliability.md `drain-completes` through the binary: SIGTERM closes the listener at once, in-flight transfers finish, exit
/// code 0 right after, and every connection has its routing line with exactly the documented fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero_with_complete_routing_log() {
    let backend = Backend::start([127, 0, 0, 2], |mut s| async move {
        let mut req = [0u8; 1];
        if s.read_exact(&mut req).await.is_err() {
            return;
        }
        for k in 0..30u64 {
            if s.write_all(&payload(k, 8192)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let _ = s.shutdown().await;
    })
    .await;
    let mut sg = Sg::start(&yaml(
        &[backend.addr],
        "balance: round_robin",
        "{drain_timeout: 20s}",
    ));
    let want: Vec<u8> = (0..30).flat_map(|k| payload(k, 8192)).collect();
    let want_sha = sha(&want);
    let mut clients = tokio::task::JoinSet::new();
    let ready = Arc::new(tokio::sync::Barrier::new(21));
    for _ in 0..20 {
        let (addr, ready) = (sg.addr, ready.clone());
        clients.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"g").await.unwrap();
            let mut first = [0u8; 1];
            s.read_exact(&mut first).await.unwrap();
            ready.wait().await;
            let mut rest = read_all(&mut s).await.expect("transfer completes");
            rest.insert(0, first[0]);
            assert_eq!(sha(&rest), want_sha);
        });
    }
    within(SECS(20), "transfers in flight", ready.wait()).await;
    sg.signal(libc::SIGTERM);
    let t = Instant::now();
    let mut probes_accepted = 0;
    while TcpStream::connect(sg.addr).await.is_ok() {
        probes_accepted += 1; // raced the listener's close: it is served, and logged, like any other
        assert!(t.elapsed() < SECS(2), "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while let Some(r) = within(SECS(30), "transfers", clients.join_next()).await {
        r.unwrap();
    }
    let done = Instant::now();
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(10)));
    assert_eq!(code, 0);
    assert!(
        done.elapsed() < SECS(2),
        "exit came {:?} after the last transfer",
        done.elapsed()
    );
    let routes: Vec<_> = sg
        .routes()
        .into_iter()
        .filter(|r| r["bytes_up"] == 1)
        .collect();
    assert_eq!(
        sg.routes().len(),
        20 + probes_accepted,
        "one routing line per connection"
    );
    assert_eq!(routes.len(), 20);
    let fields = [
        "service",
        "client",
        "via",
        "backend",
        "backend_name",
        "policy",
        "attempts",
        "connect_ms",
        "bytes_up",
        "bytes_down",
        "duration_ms",
        "end",
    ];
    for r in routes {
        for f in fields {
            assert!(r.get(f).is_some(), "field {f} missing in {r}");
        }
        let names: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let envelope = ["ts", "level", "target", "msg"];
        assert_eq!(
            names.len(),
            fields.len() + envelope.len(),
            "exactly the documented fields: {names:?}"
        );
        assert_eq!(
            r["backend_name"],
            Value::Null,
            "a static backend has no DNS name"
        );
        assert_eq!(r["service"], "t");
        assert_eq!(r["backend"], backend.addr.to_string());
        assert_eq!(r["policy"], "round_robin");
        assert_eq!(r["attempts"], 1);
        assert_eq!(r["bytes_up"], 1);
        assert_eq!(r["bytes_down"], 30 * 8192);
        assert_eq!(r["end"], "backend_closed");
        assert!(r["connect_ms"].as_f64().is_some() && r["duration_ms"].as_f64().unwrap() > 500.0);
    }
}

/// reliability.md `drain-deadline` through the binary: never-ending transfers are cut at the deadline and the exit code is
/// 0; and a second signal forces exit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_then_second_signal() {
    let backend = Backend::start([127, 0, 0, 2], |mut s| async move {
        loop {
            if s.write_all(&[7u8; 1024]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Deadline: exit 0 at ≈ 1 s, the transfer cut.
    let mut sg = Sg::start(&yaml(&[backend.addr], "", "{drain_timeout: 1s}"));
    let mut c = TcpStream::connect(sg.addr).await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    let t = Instant::now();
    sg.signal(libc::SIGTERM);
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(10)));
    assert_eq!(code, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "left before the deadline: {:?}",
        t.elapsed()
    );
    assert!(
        within(SECS(2), "cut seen", read_all(&mut c)).await.is_err(),
        "cut with a reset"
    );
    assert!(sg.routes().iter().any(|r| r["end"] == "drain_deadline"));

    // Second signal: forced exit at once, long before the 30 s deadline.
    let mut sg = Sg::start(&yaml(&[backend.addr], "", "{drain_timeout: 30s}"));
    let mut c = TcpStream::connect(sg.addr).await.unwrap();
    c.read_exact(&mut b).await.unwrap();
    sg.signal(libc::SIGTERM);
    sg.wait_line(SECS(5), |l| l["msg"] == "listeners closed");
    let t = Instant::now();
    sg.signal(libc::SIGINT);
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(5)));
    assert!(t.elapsed() < SECS(1), "forced exit took {:?}", t.elapsed());
    assert_eq!(code, 130, "forced exit reports the signal");
}

/// `sluicegate healthcheck` follows `/ready`: 0 while serving, 1 while draining and once the process is
/// gone; a config without an admin API cannot be checked and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_follows_ready() {
    let backend = Backend::start([127, 0, 0, 2], |mut s| async move {
        // Holds the connection open, so the drain below has something to wait for.
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    })
    .await;
    let base = yaml(&[backend.addr], "", "{drain_timeout: 30s}");
    let mut sg = Sg::start(&format!("admin: {{listen: \"127.0.0.1:0\"}}\n{base}"));
    let admin = sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening")["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let check = |admin: &str| run(&["healthcheck", "--admin", admin, "--timeout", "2s"], &[]);
    let (code, out, err) = check(&admin);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ready"), "{out}");

    let held = TcpStream::connect(sg.addr).await.unwrap();
    sg.signal(libc::SIGTERM);
    sg.wait_line(SECS(5), |l| l["msg"] == "listeners closed");
    let (code, _, err) = check(&admin);
    assert_eq!(code, 1, "draining is not ready");
    assert!(err.contains("503"), "{err}");
    drop(held);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    let (code, _, err) = check(&admin);
    assert_eq!(code, 1, "a stopped process is not ready");
    assert!(err.contains("cannot reach"), "{err}");

    let no_admin = tmp_file("no-admin.yaml", &base);
    let (code, _, err) = run(
        &["healthcheck", "--config", no_admin.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no admin section"), "{err}");
    assert_eq!(run(&["healthcheck"], &[]).0, 2, "nothing to ask");
}

/// SIGHUP and `POST /reload` re-read the file: an invalid one is rejected with its reason (log and API
/// answer) and the running config kept; a valid one is applied (a new service binds and serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_post_reload_apply_or_reject_the_file() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let base = yaml(&[backend.addr], "", "{drain_timeout: 5s}");
    let with_admin = format!("admin: {{listen: \"127.0.0.1:0\"}}\n{base}");
    let mut sg = Sg::start(&with_admin);
    let admin: SocketAddr = sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    std::fs::write(&sg.cfg, format!("{with_admin}    weight: 0\n")).unwrap();
    sg.signal(libc::SIGHUP);
    let rejected = sg.wait_line(SECS(5), |l| {
        l["msg"] == "config reload rejected: the running config is kept"
    });
    assert!(
        rejected["error"].as_str().unwrap().contains("weight"),
        "{rejected}"
    );
    assert_eq!(
        round_trip(sg.addr, b"still here").await.unwrap(),
        b"still here"
    );
    let api = common::http::send(admin, "POST", "/reload", "").await;
    assert_eq!(api.status, 400);
    assert!(
        api.json()["error"].as_str().unwrap().contains("weight"),
        "{}",
        api.body
    );

    let second = format!(
        "{with_admin}  - name: second\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    std::fs::write(&sg.cfg, &second).unwrap();
    sg.signal(libc::SIGHUP);
    let reloaded = sg.wait_line(SECS(5), |l| l["msg"] == "config reloaded");
    assert!(
        reloaded["added"].as_str().unwrap().contains("second"),
        "{reloaded}"
    );
    let listening = sg.wait_line(SECS(5), |l| {
        l["msg"] == "listening" && l["service"] == "second"
    });
    let addr: SocketAddr = listening["listen"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        round_trip(addr, b"new service").await.unwrap(),
        b"new service"
    );
    assert_eq!(round_trip(sg.addr, b"old one").await.unwrap(), b"old one");
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
}

/// Refused connections get their routing line too: `connect_failed` names the backend tried,
/// `no_backend` has `backend: null`; no connect time for either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_logged() {
    let dead = refusing_addr([127, 0, 0, 3]).await;
    let mut sg = Sg::start(&yaml(
        &[dead],
        "passive: {max_fails: 1, cooldown: 1m}",
        "{drain_timeout: 5s}",
    ));
    for _ in 0..3 {
        let mut c = TcpStream::connect(sg.addr).await.unwrap();
        let _ = within(SECS(5), "closed", read_all(&mut c)).await;
    }
    sg.wait_line(SECS(5), |l| l["end"] == "no_backend");
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    let routes = sg.routes();
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[0]["end"], "connect_failed");
    assert_eq!(routes[0]["backend"], dead.to_string());
    assert!(routes[0]["connect_ms"].is_null());
    for r in &routes[1..] {
        assert_eq!(r["end"], "no_backend");
        assert!(r["backend"].is_null(), "{r}");
        assert_eq!(r["attempts"], 0);
    }
    let transitions: Vec<_> = sg
        .seen
        .iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("no backend"))
        })
        .collect();
    assert_eq!(transitions.len(), 1, "logged once per transition");
}

/// reliability.md `out-of-descriptors`: out of descriptors. With `ulimit -n 256` and 600 clients held open, the accept loop
/// backs off instead of spinning, logs at most about once a second, and serves again once descriptors
/// free up; none leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_and_recovers() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let mut sg = Sg::start_with(
        &yaml(&[backend.addr], "relay: copy", "{drain_timeout: 5s}"),
        "ulimit -n 256 &&",
    );
    let base_fds = sg.fds();
    let mut held = Vec::new();
    for _ in 0..600 {
        if let Ok(Ok(c)) = tokio::time::timeout(SECS(2), TcpStream::connect(sg.addr)).await {
            held.push(c);
        }
    }
    tokio::task::block_in_place(|| {
        sg.wait_line(SECS(10), |l| l["msg"] == "accept failed; backing off")
    });
    let cpu0 = sg.cpu_seconds();
    let logs0 = sg.seen.len();
    tokio::time::sleep(SECS(2)).await; // the measurement window itself
    let cpu = sg.cpu_seconds() - cpu0;
    while let Ok(v) = sg.lines.try_recv() {
        sg.seen.push(v);
    }
    let errors = sg.seen[logs0..]
        .iter()
        .filter(|l| l["msg"] == "accept failed; backing off")
        .count();
    assert!(cpu < 0.5, "accept loop spun: {cpu:.2} CPU-s in 2 s");
    assert!(
        errors <= 3,
        "error log not rate-limited: {errors} lines in 2 s"
    );
    drop(held);
    let t = Instant::now();
    loop {
        if let Ok(Ok(got)) = tokio::time::timeout(SECS(2), round_trip(sg.addr, b"back")).await {
            if got == b"back" {
                break;
            }
        }
        assert!(t.elapsed() < SECS(20), "service did not resume");
    }
    wait_for(SECS(20), "descriptors back to baseline", || {
        sg.fds() <= base_fds
    })
    .await;
}

/// reliability.md `slow-readers`: slow readers and a backend that stops reading. Memory grows by no more than the
/// fixed buffers, the proxy idles while blocked, and every byte arrives later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_and_stalled_writers_are_bounded() {
    for relay in ["copy", "splice"] {
        // Backend writing as fast as the proxy takes it.
        let firehose = Backend::start([127, 0, 0, 2], |mut s| async move {
            let block = vec![1u8; 64 << 10];
            while s.write_all(&block).await.is_ok() {}
        })
        .await;
        let sg = Sg::start(&yaml(
            &[firehose.addr],
            &format!("relay: {relay}"),
            "{drain_timeout: 1s}",
        ));
        let rss0 = sg.rss_kib();
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let addr = sg.addr;
            readers.spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut buf = vec![0u8; 1024];
                // 10 KiB/s for 3 s
                for _ in 0..30 {
                    let _ = s.read_exact(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        while let Some(r) = within(SECS(30), "slow readers", readers.join_next()).await {
            r.unwrap();
        }
        let grown_kib = sg.rss_kib().saturating_sub(rss0);
        // Fixed per-connection buffers: at most 2 × 16 KiB each, plus allocator slack.
        assert!(
            grown_kib < 100 * 32 + 12 * 1024,
            "{relay}: RSS grew by {grown_kib} KiB for 100 slow readers"
        );
        drop(sg);

        // Back-pressure: the backend does not read until told; the client's writes block.
        let go = Arc::new(tokio::sync::Notify::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<[u8; 32]>();
        let slot = std::sync::Mutex::new(Some((go.clone(), tx)));
        let stalled = Backend::start([127, 0, 0, 3], move |mut s| {
            let slot = slot.lock().unwrap().take();
            async move {
                let Some((go, tx)) = slot else { return };
                go.notified().await;
                let got = read_all(&mut s).await.expect("read later");
                let _ = tx.send(sha(&got));
            }
        })
        .await;
        let sg = Sg::start(&yaml(
            &[stalled.addr],
            &format!("relay: {relay}"),
            "{drain_timeout: 1s}",
        ));
        let data = Arc::new(payload(9, 64 << 20));
        let written = Arc::new(AtomicU64::new(0));
        let (d, w, addr) = (data.clone(), written.clone(), sg.addr);
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for c in d.chunks(64 << 10) {
                s.write_all(c).await.unwrap();
                w.fetch_add(c.len() as u64, Relaxed);
            }
            s.shutdown().await.unwrap();
        });
        // Wait until the writer is blocked: no progress for 300 ms.
        let mut last = u64::MAX;
        loop {
            let now = written.load(Relaxed);
            if now == last {
                break;
            }
            last = now;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            last < 64 << 20,
            "{relay}: writes never blocked: back-pressure missing"
        );
        let cpu0 = sg.cpu_seconds();
        tokio::time::sleep(SECS(1)).await; // the measurement window itself
        let cpu = sg.cpu_seconds() - cpu0;
        assert!(
            cpu < 0.2,
            "{relay}: proxy busy while blocked: {cpu:.2} CPU-s in 1 s"
        );
        go.notify_one();
        within(SECS(60), "writer completes", writer).await.unwrap();
        let got = within(SECS(60), "backend read all", rx).await.unwrap();
        assert_eq!(got, sha(&data), "{relay}: every byte arrives later");
    }
}

/// Several services in one process, each with its own listener and pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_services_in_one_process() {
    let a = Backend::start([127, 0, 0, 2], |mut s| async move {
        let _ = s.write_all(b"A").await;
    })
    .await;
    let b = Backend::start([127, 0, 0, 3], |mut s| async move {
        let _ = s.write_all(b"B").await;
    })
    .await;
    let y = format!(
        "log: {{level: info, format: json}}\nservices:\n  - name: a\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n  - name: b\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n",
        a.addr, b.addr
    );
    let mut sg = Sg::start(&y);
    let addr_of = |sg: &mut Sg, name: &str| -> SocketAddr {
        let l = sg.wait_line(SECS(5), |l| l["msg"] == "listening" && l["service"] == name);
        l["listen"].as_str().unwrap().parse().unwrap()
    };
    let (addr_a, addr_b) = (addr_of(&mut sg, "a"), addr_of(&mut sg, "b"));
    assert_ne!(addr_a, addr_b);
    for (addr, want) in [(addr_a, b"A"), (addr_b, b"B")] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_all(&mut s).await.unwrap(), want);
    }
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    let services: Vec<_> = sg
        .routes()
        .iter()
        .map(|r| r["service"].as_str().unwrap().to_string())
        .collect();
    assert!(
        services.contains(&"a".to_string()) && services.contains(&"b".to_string()),
        "{services:?}"
    );
}

/// `log.file`: lines go to a daily-rotated file (named `FILE.YYYY-MM-DD`), none to stdout, and the
/// last ones are flushed before exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_file_receives_every_line() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let path = tmp_file("placeholder", "").with_file_name("sluicegate.log");
    let dir = path.parent().unwrap().to_path_buf();
    let y = format!(
        "log: {{level: info, format: json, file: \"{}\"}}\nshutdown: {{drain_timeout: 5s}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n",
        path.display(),
        backend.addr
    );
    let mut child = spawn("file-log.yaml", &y);
    let read_log = || -> Vec<Value> {
        let mut lines = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("sluicegate.log.")
            {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                lines.extend(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
                );
            }
        }
        lines
    };
    let mut listen = None;
    let t = Instant::now();
    while listen.is_none() {
        listen = read_log().into_iter().find(|l| l["msg"] == "listening");
        assert!(t.elapsed() < SECS(10), "no listening line in the log file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr: SocketAddr = listen.unwrap()["listen"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        round_trip(addr, b"to the file").await.unwrap(),
        b"to the file"
    );
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert_eq!(status.code(), Some(0));
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(
        stdout.is_empty(),
        "nothing on stdout when logging to a file: {stdout}"
    );
    let lines = read_log();
    assert!(lines
        .iter()
        .any(|l| l["target"] == "sluicegate::route" && l["bytes_up"] == 11));
    assert!(
        lines.iter().any(|l| l["msg"] == "drained: exiting"),
        "last lines flushed before exit"
    );
}

/// `log.access`: the routing log in a file of its own, the application log in another, each rotated
/// with `log.keep` files kept; `access: off` drops routing lines only; `log.filter` and `SLUICEGATE_LOG`
/// choose what the application log says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_streams_are_separate_filtered_and_kept() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let dir = tmp_file("placeholder", "").parent().unwrap().to_path_buf();
    // Rotated files of earlier days: with keep 2 only one of them may remain beside today's.
    for day in 1..=4 {
        std::fs::write(dir.join(format!("app.log.2026-01-0{day}")), "old\n").unwrap();
    }
    let lines_of = |prefix: &str| -> Vec<Value> {
        let mut lines = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with(prefix) {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                lines.extend(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
                );
            }
        }
        lines
    };
    let y = format!(
        "log: {{format: json, file: \"{}\", access: \"{}\", keep: 2}}\nshutdown: {{drain_timeout: 5s}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n",
        dir.join("app.log").display(),
        dir.join("access.log").display(),
        backend.addr
    );
    let mut child = spawn("streams.yaml", &y);
    let t = Instant::now();
    let addr: SocketAddr = loop {
        if let Some(l) = lines_of("app.log.")
            .into_iter()
            .find(|l| l["msg"] == "listening")
        {
            break l["listen"].as_str().unwrap().parse().unwrap();
        }
        assert!(
            t.elapsed() < SECS(10),
            "no listening line in the application log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for _ in 0..3 {
        assert_eq!(round_trip(addr, b"abc").await.unwrap(), b"abc");
    }
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert_eq!(status.code(), Some(0));
    let (app, access) = (lines_of("app.log."), lines_of("access.log."));
    assert_eq!(
        access.len(),
        3,
        "one routing line per connection: {access:?}"
    );
    assert!(access.iter().all(|l| l["target"] == "sluicegate::route"));
    assert!(app.iter().all(|l| l["target"] != "sluicegate::route"));
    assert!(app.iter().any(|l| l["msg"] == "drained: exiting"));
    let kept = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("app.log.")
        })
        .count();
    assert!(kept <= 2, "log.keep: 2, found {kept} files");
    assert!(
        !dir.join("app.log.2026-01-01").exists(),
        "the oldest is deleted"
    );

    // access: off, and a filter that keeps only the control's info lines and every warning.
    let y = yaml(&[backend.addr], "", "{drain_timeout: 5s}").replace(
        "log: {level: info, format: json}",
        "log: {format: json, access: off, filter: \"warn,sluicegate::control=info\"}",
    );
    let mut sg = Sg::start(&y);
    assert_eq!(round_trip(sg.addr, b"x").await.unwrap(), b"x");
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    while let Ok(l) = sg.lines.try_recv() {
        sg.seen.push(l);
    }
    assert!(sg.routes().is_empty(), "access: off");
    assert!(
        sg.seen.iter().all(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("sluicegate::control"))
            || l["level"] == "warn"
            || l["level"] == "error"),
        "the filter: {:?}",
        sg.seen
    );
    assert!(sg.seen.iter().any(|l| l["msg"] == "listeners closed"));

    // SLUICEGATE_LOG overrides the config: only the control's lines, no routing line.
    let mut sg = Sg::start_with(
        &yaml(&[backend.addr], "", "{drain_timeout: 5s}"),
        "SLUICEGATE_LOG=error,sluicegate::control=info",
    );
    assert_eq!(round_trip(sg.addr, b"y").await.unwrap(), b"y");
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    while let Ok(l) = sg.lines.try_recv() {
        sg.seen.push(l);
    }
    assert!(
        sg.routes().is_empty(),
        "routing lines are info in sluicegate::route"
    );
    assert!(
        !sg.seen.iter().any(|l| l["msg"] == "starting"),
        "{:?}",
        sg.seen
    );
}

/// `format: text`: one `key=value` line per event, the routing fields included, `null` where unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_format_writes_key_value_lines() {
    let dead = refusing_addr([127, 0, 0, 3]).await;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let y = format!(
        "log: {{level: info, format: text}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    balance: round_robin\n    connect_attempts: 1\n    passive: {{max_fails: 0}}\n    backends: [{{address: \"{}\"}}, {{address: \"{dead}\"}}]\n",
        backend.addr
    );
    let mut child = spawn("text.yaml", &y);
    let lines = Sg::collect(child.stdout.take().unwrap());
    let raw = |v: Value| v["raw"].as_str().unwrap_or_default().to_string();
    let listening = loop {
        let l = raw(lines.recv_timeout(SECS(10)).expect("a log line"));
        if l.contains(": listening ") {
            break l;
        }
    };
    let addr: SocketAddr = listening
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("listen="))
        .unwrap()
        .parse()
        .unwrap();
    // round robin: one connection served, one to the refusing backend
    for _ in 0..2 {
        let _ = round_trip(addr, b"hi").await;
    }
    let mut routes = Vec::new();
    while routes.len() < 2 {
        let l = raw(lines.recv_timeout(SECS(10)).expect("route lines"));
        if l.contains("sluicegate::route") {
            routes.push(l);
        }
    }
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert_eq!(
        tokio::task::block_in_place(|| child.wait()).unwrap().code(),
        Some(0)
    );
    let served = routes
        .iter()
        .find(|l| l.contains("end=client_closed"))
        .expect("served line");
    for key in [
        "service=t",
        "client=127.0.0.1:",
        "policy=round_robin",
        "attempts=1",
        "bytes_up=2",
        "bytes_down=2",
    ] {
        assert!(served.contains(key), "{key} missing: {served}");
    }
    assert!(
        served.contains(&format!("backend={}", backend.addr)),
        "{served}"
    );
    let failed = routes
        .iter()
        .find(|l| l.contains("end=connect_failed"))
        .expect("failed line");
    assert!(failed.contains("connect_ms=null"), "{failed}");
    let at = |k: &str| failed.find(k).unwrap_or(usize::MAX);
    assert!(
        at("attempts=") < at("connect_ms=") && at("connect_ms=") < at("bytes_up="),
        "declared order: {failed}"
    );
}

/// IPv6: a service on [::1] in front of a backend on [::1].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listen_and_backend() {
    let backend = Backend::serve(listen("[::1]:0".parse().unwrap()), echo);
    let y = format!(
        "log: {{level: info, format: json}}\nservices:\n  - name: v6\n    listen: \"[::1]:0\"\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    let mut sg = Sg::start(&y);
    assert!(sg.addr.is_ipv6());
    assert_eq!(round_trip(sg.addr, b"over v6").await.unwrap(), b"over v6");
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    assert_eq!(sg.routes()[0]["backend"], backend.addr.to_string());
}

/// Discovery and health through the binary: backends come from the name server in the config, changes
/// and health transitions are logged once each, and routing lines name the discovered addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_health_through_the_binary() {
    use common::fleet::{replicas, who};
    let (port, fleet) = replicas(2, 2);
    let dns = common::dns::FakeDns::start().await;
    dns.set_ips("backend", &[[127, 0, 0, 2]]);
    let y = format!(
        "log: {{level: info, format: json}}\nshutdown: {{drain_timeout: 5s}}\nresolver: {{nameservers: [\"{}\"], timeout: 500ms}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    discovery: {{refresh: 200ms}}\n    health: {{kind: http, interval: 200ms, timeout: 200ms, fall: 2}}\n    backends: [{{address: \"backend:{port}\"}}]\n",
        dns.addr
    );
    let mut sg = Sg::start(&y);
    let added = sg.wait_line(SECS(5), |l| l["msg"] == "backend added");
    assert_eq!(added["source"], format!("dns:backend:{port}"));
    assert_eq!(who(sg.addr).await.expect("served"), fleet[0].ip());

    dns.set_ips("backend", &[[127, 0, 0, 3]]);
    let ok = |l: &Value, msg: &str, ip: &str| {
        l["msg"] == msg && l["backend"].as_str().is_some_and(|b| b.starts_with(ip))
    };
    tokio::task::block_in_place(|| {
        sg.wait_line(SECS(5), |l| ok(l, "backend removed", "127.0.0.2:"));
        sg.wait_line(SECS(5), |l| ok(l, "backend healthy", "127.0.0.3:"));
    });
    assert_eq!(who(sg.addr).await.expect("served"), fleet[1].ip());

    fleet[1].set_status(503);
    tokio::task::block_in_place(|| {
        sg.wait_line(SECS(5), |l| ok(l, "backend unhealthy", "127.0.0.3:"));
    });
    // Probes keep failing, but the transition is logged once.
    let n = fleet[1].health_requests();
    wait_for(SECS(5), "more failing probes", || {
        fleet[1].health_requests() >= n + 3
    })
    .await;
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
    let downs = sg
        .seen
        .iter()
        .filter(|l| l["msg"] == "backend unhealthy")
        .count();
    assert_eq!(downs, 1, "one line per transition");
    let routes = sg.routes();
    assert_eq!(routes[0]["backend"], fleet[0].addr().to_string());
    assert_eq!(routes[1]["backend"], fleet[1].addr().to_string());
}

/// `conf/sluicegate.service` passes `systemd-analyze verify` (with the binary path pointed at this
/// build) without a single complaint, checks the config before starting, reloads with SIGHUP, does
/// not restart on an invalid config, and gives the drain more time than its default deadline.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo("conf/sluicegate.service")).unwrap();
    let key = |k: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        key("ExecStartPre"),
        ["/usr/local/bin/sluicegate --config /etc/sluicegate/sluicegate.yaml --check"]
    );
    assert_eq!(key("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(key("RestartPreventExitStatus"), ["64"]);
    let stop: u64 = key("TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let drain = sluicegate::config::ShutdownConfig::default()
        .drain_timeout
        .0;
    assert!(
        stop > drain.as_secs(),
        "TimeoutStopSec {stop}s ≤ drain {drain:?}"
    );
    assert!(key("LimitNOFILE")[0].parse::<u64>().unwrap() >= 65536);
    assert_eq!(key("DynamicUser"), ["yes"]);
    assert_eq!(key("ProtectSystem"), ["strict"]);

    let tool = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if tool.is_err() {
        assert!(
            std::env::var("SLUICEGATE_REQUIRE_SYSTEMD_ANALYZE").is_err(),
            "systemd-analyze is required here"
        );
        eprintln!("*** SKIPPED: systemd-analyze not found; the unit was not verified ***");
        return;
    }
    let here = tmp_file(
        "sluicegate.service",
        &unit.replace("/usr/local/bin/sluicegate", BIN),
    );
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// reliability.md `uring-fallback`: where io_uring is unavailable (here forced with
/// `SLUICEGATE_IO_URING=off`, as a seccomp policy or `kernel.io_uring_disabled` would), `relay: uring`
/// runs on the epoll engine, says so in one warning, and relays exactly; without it the service runs
/// on the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_falls_back_to_epoll_with_one_line() {
    let be = Backend::echo([127, 0, 0, 2]).await;
    let two = format!(
        "{}  - name: u\n    listen: 127.0.0.1:0\n    relay: uring\n    backends: [{{address: \"{}\"}}]\n",
        yaml(&[be.addr], "relay: uring", "{drain_timeout: 5s}"),
        be.addr
    );
    for (prefix, engine) in [("SLUICEGATE_IO_URING=off", "auto"), ("", "uring")] {
        let mut sg = Sg::start_with(&two, prefix);
        let listening: Vec<Value> = sg
            .seen
            .iter()
            .filter(|l| l["msg"] == "listening")
            .cloned()
            .collect();
        assert_eq!(listening[0]["relay"], engine, "{listening:?}");
        let msg = payload(7, 256 << 10);
        let mut c = TcpStream::connect(sg.addr).await.unwrap();
        c.write_all(&msg).await.unwrap();
        c.shutdown().await.unwrap();
        let got = within(SECS(10), "echo", read_all(&mut c)).await.unwrap();
        assert_eq!(sha(&got), sha(&msg));
        sg.signal(libc::SIGTERM);
        assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
        let warnings = sg
            .seen
            .iter()
            .filter(|l| {
                l["msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("relay: uring is unavailable"))
            })
            .count();
        assert_eq!(
            warnings,
            usize::from(engine == "auto"),
            "one line, for both services"
        );
    }
}
