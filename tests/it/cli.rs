//! The binary as users and outside suites drive it (docs/configuration.md, docs/admin-api.md):
//! command line, exit codes, config errors, signals, the JSON routing log; and the scenarios that
//! need a process of their own to measure (docs/reliability.md: `slow-readers`,
//! `out-of-descriptors`, `accept-refused`, `config-errors`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::time::Instant;

use crate::common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: fn(u64) -> Duration = Duration::from_secs;
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

pub(crate) fn tmp_file(name: &str, text: &str) -> PathBuf {
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
pub(crate) struct Sg {
    child: Child,
    /// The config file it runs with (a reload re-reads it).
    pub(crate) cfg: PathBuf,
    lines: mpsc::Receiver<Value>,
    pub(crate) seen: Vec<Value>,
    pub(crate) addr: SocketAddr,
}

/// The next log line, if one comes before `end`. The deadline is checked on every line too: a
/// flood of lines that never match must not outlast it.
fn line_before(lines: &mpsc::Receiver<Value>, end: Instant) -> Option<Value> {
    let left = end.saturating_duration_since(Instant::now());
    lines.recv_timeout(left).ok().filter(|_| !left.is_zero())
}

impl Sg {
    /// Starts the binary (through `sh -c` with `prefix` before `exec`, e.g. a ulimit) and waits for its
    /// "listening" line.
    pub(crate) fn start_with(yaml: &str, prefix: &str) -> Sg {
        Sg::start_configured(yaml, prefix, |_| {})
    }

    /// As [`Sg::start_with`], the command first given to `configure` (e.g. for a `pre_exec`).
    pub(crate) fn start_configured(
        yaml: &str,
        prefix: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Sg {
        Sg::start_program(yaml, &format!("{prefix} exec \"{BIN}\""), configure)
    }

    /// As [`Sg::start_with`], started as `exe` (a wrapper that runs the binary) instead: what an
    /// upgrade starts again.
    pub(crate) fn start_as(yaml: &str, exe: &std::path::Path) -> Sg {
        Sg::start_program(yaml, &format!("exec \"{}\"", exe.display()), |_| {})
    }

    /// `sh -c "{program} --config CFG"`, its "listening" line waited for.
    fn start_program(yaml: &str, program: &str, configure: impl FnOnce(&mut Command)) -> Sg {
        let cfg = tmp_file("sg.yaml", yaml);
        let mut command = without_callers_env(Command::new("sh"));
        configure(&mut command);
        let mut child = command
            .arg("-c")
            .arg(format!("{program} --config \"{}\"", cfg.display()))
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

    pub(crate) fn start(yaml: &str) -> Sg {
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

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for a log line matching `pred` (also searching lines already seen).
    pub(crate) fn wait_line(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let end = Instant::now() + limit;
        loop {
            match line_before(&self.lines, end) {
                Some(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                None => panic!(
                    "no matching log line within {limit:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits until `n` log lines match `pred` (counting lines already seen).
    pub(crate) fn wait_count(&mut self, limit: Duration, n: usize, pred: impl Fn(&Value) -> bool) {
        let end = Instant::now() + limit;
        while self.seen.iter().filter(|v| pred(v)).count() < n {
            match line_before(&self.lines, end) {
                Some(v) => self.seen.push(v),
                None => panic!(
                    "{} of {n} matching log lines within {limit:?}",
                    self.seen.iter().filter(|v| pred(v)).count()
                ),
            }
        }
    }

    /// Whether the process still runs (it has not exited).
    pub(crate) fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit; returns its exit code.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> i32 {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Every line the process wrote, up to the pipe's end: a pause of the reader
                // thread must not drop its last lines. Bounded, as an upgraded process
                // (a grandchild) holds the pipe open.
                let drained = Instant::now() + Duration::from_secs(5);
                while let Ok(v) = self
                    .lines
                    .recv_timeout(drained.saturating_duration_since(Instant::now()))
                {
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

    pub(crate) fn routes(&self) -> Vec<&Value> {
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

    pub(crate) fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What each open descriptor is (`socket:[inode]`, `pipe:[inode]`, `anon_inode:[io_uring]`,
    /// a path), a TCP socket with its state as the kernel names it in `/proc/net/tcp` (hex: 01
    /// established, 08 close-wait, ...): for a failure to say what was left open.
    fn fd_targets(&self) -> Vec<String> {
        let pid = self.pid();
        let mut states = std::collections::HashMap::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"));
            for l in text.unwrap_or_default().lines().skip(1) {
                let f: Vec<&str> = l.split_whitespace().collect();
                if let (Some(st), Some(inode)) = (f.get(3), f.get(9)) {
                    states.insert(format!("socket:[{inode}]"), st.to_string());
                }
            }
        }
        let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| {
                let t = t.display().to_string();
                match states.get(&t) {
                    Some(st) => format!("{t} tcp state {st}"),
                    None => t,
                }
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Sg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary, without the variables of the caller's environment that it reads.
pub(crate) fn sluicegate() -> Command {
    without_callers_env(Command::new(BIN))
}

/// `c` without the variables of the caller's environment that sluicegate reads (the config path, the
/// admin token, the Docker CLI's): each test says what it runs with.
pub(crate) fn without_callers_env(mut c: Command) -> Command {
    for var in [
        "SLUICEGATE_CONFIG",
        "SLUICEGATE_ADMIN_TOKEN",
        "SLUICEGATE_ADMIN_TOKEN_FILE",
        "DOCKER_HOST",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
    ] {
        c.env_remove(var);
    }
    c
}

/// Starts the binary on a config written from `yaml`, stdout piped.
fn spawn(name: &str, yaml: &str) -> Child {
    let cfg = tmp_file(name, yaml);
    sluicegate()
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
    let out = sluicegate()
        .args(args)
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

/// Every file in `conf/` passes `--check`, which also reads the certificates and keys a config
/// names. The compose demo's names them where its container mounts them (`/etc/sluicegate/tls/`):
/// checked here with certificates of the same names made for the test.
#[test]
fn every_example_config_is_valid() {
    let pki = crate::common::pki::Pki::new("example configs");
    for name in ["web", "api"] {
        let pair = pki.server(name, &[&format!("{name}.demo.test")]);
        std::fs::copy(&pair.key, pki.dir.join(format!("{name}-key.pem"))).unwrap();
    }
    let mut n = 0;
    for e in std::fs::read_dir(repo("conf")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let text = std::fs::read_to_string(&p).unwrap();
            let dir = format!("{}/", pki.dir.display());
            let checked = tmp_file("example.yaml", &text.replace("/etc/sluicegate/tls/", &dir));
            let (code, _, err) = run(&["--check", "--config", checked.to_str().unwrap()], &[]);
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
    let mut probes_accepted = 0;
    // The listener closes at once (no shutdown.delay): well within the transfers' second.
    for _ in 0..200 {
        if TcpStream::connect(sg.addr).await.is_err() {
            break;
        }
        probes_accepted += 1; // raced the listener's close: it is served, and logged, like any other
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        TcpStream::connect(sg.addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    while let Some(r) = within(SECS(30), "transfers", clients.join_next()).await {
        r.unwrap();
    }
    let done = Instant::now();
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(10)));
    assert_eq!(code, 0);
    // Right after the last transfer, not at the 20 s deadline (a bound, not a speed test).
    assert!(
        done.elapsed() < SECS(10),
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
    for r in routes {
        assert_drained_routing_line(r, backend.addr);
    }
}

/// A routing line of `sigterm_drains_then_exits_zero_with_complete_routing_log`: exactly the
/// documented fields, with what its transfer did.
fn assert_drained_routing_line(r: &Value, backend: SocketAddr) {
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
        "event",
        "sni",
        "alpn",
        "route",
        "tls",
        "handed_over",
    ];
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
    assert_eq!(r["backend"], backend.to_string());
    assert_eq!(r["policy"], "round_robin");
    assert_eq!(r["attempts"], 1);
    assert_eq!(r["bytes_up"], 1);
    assert_eq!(r["bytes_down"], 30 * 8192);
    assert_eq!(r["end"], "backend_closed");
    assert_eq!(r["event"], "end");
    assert!(r["connect_ms"].as_f64().is_some() && r["duration_ms"].as_f64().unwrap() > 500.0);
}

/// A backend that sends a KiB every 20 ms until its client goes: a transfer that never ends.
async fn trickling_backend() -> Backend {
    Backend::start([127, 0, 0, 2], |mut s| async move {
        while s.write_all(&[7u8; 1024]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// sluicegate in front of `backend` with `shutdown`, and a client whose transfer is under way.
async fn trickling_through(backend: &Backend, shutdown: &str) -> (Sg, TcpStream) {
    let sg = Sg::start(&yaml(&[backend.addr], "", shutdown));
    let mut c = TcpStream::connect(sg.addr).await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    (sg, c)
}

/// reliability.md `drain-deadline` through the binary: never-ending transfers are cut at the deadline and the exit code is
/// 0; and a second signal forces exit at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_then_second_signal() {
    let backend = trickling_backend().await;
    // Deadline: exit 0 at ≈ 1 s, the transfer cut.
    let (mut sg, mut c) = trickling_through(&backend, "{drain_timeout: 1s}").await;
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
        within(SECS(10), "cut seen", read_all(&mut c))
            .await
            .is_err(),
        "cut with a reset"
    );
    assert!(sg.routes().iter().any(|r| r["end"] == "drain_deadline"));

    // Second signal (a second or more after the first): forced exit at once, long before the 30 s
    // deadline.
    let (mut sg, _c) = trickling_through(&backend, "{drain_timeout: 30s}").await;
    sg.signal(libc::SIGTERM);
    let first = Instant::now();
    sg.wait_line(SECS(5), |l| l["msg"] == "listeners closed");
    // Within a second of the first it would be the same request (`two_stop_signals_together_drain`).
    tokio::time::sleep(
        (first + Duration::from_millis(1200)).saturating_duration_since(Instant::now()),
    )
    .await;
    let t = Instant::now();
    sg.signal(libc::SIGINT);
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(5)));
    // Forced: long before the 30 s drain deadline would have ended it (a bound, not a speed test).
    assert!(t.elapsed() < SECS(10), "forced exit took {:?}", t.elapsed());
    assert_eq!(code, 130, "forced exit reports the signal");
}

/// reliability.md `same-stop-twice`: two stop signals delivered together (a process-group kill, or a
/// supervisor and a terminal passing one on each) are one request: the drain goes on and the process
/// exits 0 when the last connection ends, instead of being forced out by the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stop_signals_together_drain() {
    let backend = trickling_backend().await;
    let (mut sg, mut c) = trickling_through(&backend, "{drain_timeout: 30s}").await;
    sg.signal(libc::SIGTERM);
    sg.signal(libc::SIGTERM);
    sg.signal(libc::SIGINT);
    tokio::task::block_in_place(|| {
        sg.wait_line(SECS(5), |l| l["msg"] == "listeners closed");
        sg.wait_line(SECS(5), |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("stop signal within a second of the first"))
        });
    });
    // Still draining: the held connection keeps receiving.
    let mut b = [0u8; 1];
    within(SECS(5), "relay goes on", c.read_exact(&mut b))
        .await
        .expect("still relayed after the repeated signals");
    drop(c);
    let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(10)));
    assert_eq!(code, 0, "drained, not forced");
    assert!(sg
        .seen
        .iter()
        .all(|l| l["msg"] != "second stop signal: forcing exit"));
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

/// reliability.md `admin-token-bound`, through the binary and SIGHUP: the token read from
/// `admin.token_file` at start stays the admin API's until a restart. A reload that finds another
/// token in the file applies to the services and says the token needs a restart; one whose token is
/// too short, or whose file is gone, is refused. Each time the token read at start is the one that
/// works. Without a token, a warning says so at start; with one, no such warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_is_read_once_and_a_bad_one_refuses_the_reload() {
    use crate::common::http::request;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let base = yaml(&[backend.addr], "", "{drain_timeout: 5s}");
    let no_token = |l: &Value| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("the admin API has NO TOKEN"))
    };
    let first = "first-token-0123456789";
    let token_file = tmp_file("admin-token", &format!("{first}\n"));
    // Only the owner's: a token file others may read is refused (`allow_readable_keys`).
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "admin: {{listen: \"127.0.0.1:0\", token_file: \"{}\"}}\n{base}",
        token_file.display()
    );
    let mut sg = Sg::start(&config);
    let listening = sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening");
    assert_eq!(listening["token"], "admin.token_file", "{listening}");
    assert!(!sg.seen.iter().any(no_token), "a token is configured");
    let admin: SocketAddr = listening["listen"].as_str().unwrap().parse().unwrap();
    // Each step: the bound token drains, nothing else does (the drain is undone in between).
    let drain = format!("/backends/t/{}/drain", backend.addr);
    let active = format!("/backends/t/{}", backend.addr);
    let check = |step: &'static str, admin: SocketAddr| {
        let (drain, active) = (drain.clone(), active.clone());
        async move {
            let bearer = |t: &str| format!("Authorization: Bearer {t}");
            for (token, want) in [
                (None, 401),
                (Some("second-token-0123456789"), 401),
                (Some(first), 202),
            ] {
                let h = token.map(bearer);
                let h: Vec<&str> = h.iter().map(String::as_str).collect();
                let r = request(admin, "POST", &drain, &h, b"").await.unwrap();
                assert_eq!(r.status, want, "{step}: token {token:?}: {}", r.body);
            }
            let h = bearer(first);
            let r = request(admin, "PUT", &active, &[&h], br#"{"state": "active"}"#).await;
            assert_eq!(r.unwrap().status, 200, "{step}: back to active");
        }
    };
    check("at start", admin).await;

    // Another token in the file: the services reload, the admin API keeps its token.
    std::fs::write(&token_file, "second-token-0123456789").unwrap();
    sg.signal(libc::SIGHUP);
    let reloaded = sg.wait_line(SECS(5), |l| l["msg"] == "config reloaded");
    let needed = reloaded["restart_needed"].as_str().unwrap_or_default();
    assert!(needed.contains("admin.token"), "{reloaded}");
    check("after a reload with another token", admin).await;

    // A token too short, then no file at all: refused, nothing changes.
    for (what, write) in [("a short token", Some("short")), ("no token file", None)] {
        match write {
            Some(t) => std::fs::write(&token_file, t).unwrap(),
            None => std::fs::remove_file(&token_file).unwrap(),
        }
        // Only this step's lines count.
        sg.seen.clear();
        sg.signal(libc::SIGHUP);
        let rejected = sg.wait_line(SECS(5), |l| {
            l["msg"] == "config reload rejected: the running config is kept"
        });
        let error = rejected["error"].as_str().unwrap_or_default();
        assert!(error.contains("token"), "{what}: {rejected}");
        check(what, admin).await;
    }
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);

    // No token: said loudly at start.
    let mut open = Sg::start(&format!("admin: {{listen: \"127.0.0.1:0\"}}\n{base}"));
    let warned = open.wait_line(SECS(5), no_token);
    assert_eq!(warned["level"], "warn", "{warned}");
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
    let api = crate::common::http::send(admin, "POST", "/reload", "").await;
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
/// free up; none leak. For the tokio accept loops (`relay: copy`) and the ring workers' (`relay:
/// ring`, each worker backing off on its own and logging at most once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_backs_off_and_recovers() {
    // One ring worker per core, each logging on its own.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (relay, loops) in [("copy", 1), ("ring", cores)] {
        descriptor_exhaustion(relay, loops).await;
    }
}

/// reliability.md `accept-refused`: a security module that refuses every accept on the listener
/// (EPERM, said before any client leaves the queue, so the same client is refused again at once)
/// makes the accept loop back off and say why, as running out of descriptors does, instead of
/// spinning. A seccomp filter stands in for the module. The tokio accept loop's (`relay: copy`)
/// only: the ring's accepts go through io_uring, which seccomp does not see (the decision both
/// loops share has its own unit test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_refused_by_policy_backs_off() {
    use std::os::unix::process::CommandExt;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let config = yaml(&[backend.addr], "relay: copy", "{drain_timeout: 1s}");
    let mut sg = Sg::start_configured(&config, "", |c| {
        // SAFETY: `refuse_accepts` makes two prctl(2) calls on stack data, async-signal-safe
        // between fork and exec.
        unsafe {
            c.pre_exec(refuse_accepts);
        }
    });
    // The handshake completes in the kernel; the accept of it is what the filter refuses.
    let _queued = TcpStream::connect(sg.addr).await.unwrap();
    let refused = tokio::task::block_in_place(|| {
        sg.wait_line(SECS(10), |l| l["msg"] == "accept failed; backing off")
    });
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("Operation not permitted")),
        "the refusal, said: {refused}"
    );
    let cpu0 = sg.cpu_seconds();
    tokio::time::sleep(SECS(2)).await; // the measurement window itself
    let cpu = sg.cpu_seconds() - cpu0;
    assert!(cpu < 0.5, "accept loop spun: {cpu:.2} CPU-s in 2 s");
}

/// In the child before exec: a seccomp filter under which accept(2) and accept4(2) fail with EPERM,
/// as they do when a security module refuses; every other call is allowed.
fn refuse_accepts() -> std::io::Result<()> {
    refuse_calls(&[libc::SYS_accept4, libc::SYS_accept])
}

/// In the child before exec: a seccomp filter under which each system call numbered in `calls` (at
/// most 8) fails with EPERM; every other call is allowed. It is inherited across exec (the
/// shell's, then sluicegate's). Allocates nothing: it runs between fork and exec.
fn refuse_calls(calls: &[libc::c_long]) -> std::io::Result<()> {
    const MAX: usize = 8;
    if calls.len() > MAX {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // The system call's number is the first word of `seccomp_data`. No check of the architecture:
    // this stands in for a policy in a test of native binaries, it is not a sandbox.
    let mut filter = [op(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW); MAX + 3];
    filter[0] = op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0);
    let n = calls.len();
    for (i, &nr) in calls.iter().enumerate() {
        // On a match, jump over the comparisons left and the ALLOW, to the ERRNO.
        filter[1 + i] = libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: (n - i) as u8,
            jf: 0,
            k: nr as u32,
        };
    }
    filter[1 + n] = op(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW);
    filter[2 + n] = op(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
    );
    let program = libc::sock_fprog {
        len: (n + 3) as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl(2) with integers, then with a pointer to `program`, which points to `filter`;
    // both live through the call, and the kernel copies the program.
    let failed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// reliability.md `uring-refused`: a seccomp profile refuses io_uring_setup: `relay: auto` runs
/// the epoll engine, serves, and its note names the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_on_epoll_when_io_uring_setup_is_refused() {
    io_uring_refused(libc::SYS_io_uring_setup, "io_uring_setup failed").await;
}

/// reliability.md `uring-refused`: a seccomp profile allows io_uring_setup (and register) but
/// refuses io_uring_enter, the call every io_uring engine lives in: the probe submits a NOP
/// through it, so `relay: auto` runs the epoll engine, serves, and its note names the refusal
/// (before the NOP, the probe passed, the service went on the ring workers, and no client was
/// ever accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_serves_on_epoll_when_io_uring_enter_is_refused() {
    io_uring_refused(libc::SYS_io_uring_enter, "io_uring_enter refused").await;
}

/// Runs sluicegate (`relay: auto`) under a seccomp filter refusing system call `nr` with EPERM,
/// and checks that it serves on epoll and says why in the note of `relay: auto`, `said` included.
async fn io_uring_refused(nr: libc::c_long, said: &str) {
    use std::os::unix::process::CommandExt;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let config = yaml(&[backend.addr], "relay: auto", "{drain_timeout: 1s}");
    let mut sg = Sg::start_configured(&config, "", |c| {
        // SAFETY: `refuse_calls` makes two prctl(2) calls on stack data, async-signal-safe
        // between fork and exec.
        unsafe {
            c.pre_exec(move || refuse_calls(&[nr]));
        }
    });
    let listening = sg.wait_line(SECS(10), |l| l["msg"] == "listening");
    assert_eq!(listening["relay"], "epoll", "{listening}");
    let msg = payload(3, 64 << 10);
    let mut c = TcpStream::connect(sg.addr).await.unwrap();
    c.write_all(&msg).await.unwrap();
    c.shutdown().await.unwrap();
    let got = within(SECS(10), "echo", read_all(&mut c)).await.unwrap();
    assert_eq!(sha(&got), sha(&msg), "served exactly");
    let note = sg.wait_line(SECS(10), |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("relay: auto runs the epoll engine here"))
    });
    let reason = note["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(said) && reason.contains("Operation not permitted"),
        "the note names the refusal: {note}"
    );
    sg.signal(libc::SIGTERM);
    assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
}

async fn descriptor_exhaustion(relay: &str, loops: usize) {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let mut sg = Sg::start_with(
        &yaml(
            &[backend.addr],
            &format!("relay: {relay}"),
            "{drain_timeout: 5s}",
        ),
        "ulimit -n 256 &&",
    );
    let backing_off = |l: &serde_json::Value| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.ends_with("accept failed; backing off"))
    };
    let base = sg.fd_targets();
    let base_fds = base.len();
    let mut held = Vec::new();
    for _ in 0..600 {
        if let Ok(Ok(c)) = tokio::time::timeout(SECS(2), TcpStream::connect(sg.addr)).await {
            held.push(c);
        }
    }
    tokio::task::block_in_place(|| sg.wait_line(SECS(10), backing_off));
    let cpu0 = sg.cpu_seconds();
    let logs0 = sg.seen.len();
    tokio::time::sleep(SECS(2)).await; // the measurement window itself
    let cpu = sg.cpu_seconds() - cpu0;
    while let Ok(v) = sg.lines.try_recv() {
        sg.seen.push(v);
    }
    let errors = sg.seen[logs0..].iter().filter(|l| backing_off(l)).count();
    assert!(
        cpu < 0.5,
        "{relay}: accept loop spun: {cpu:.2} CPU-s in 2 s"
    );
    assert!(
        errors <= 3 * loops,
        "{relay}: error log not rate-limited: {errors} lines in 2 s from {loops} accept loop(s)"
    );
    drop(held);
    let addr = sg.addr;
    wait_until(SECS(20), "the service resumes", || async move {
        let got = tokio::time::timeout(SECS(2), round_trip(addr, b"back")).await;
        matches!(got, Ok(Ok(g)) if g == b"back")
    })
    .await;
    let back = tokio::time::timeout(SECS(20), async {
        while sg.fds() > base_fds {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if back.is_err() {
        let mut left = sg.fd_targets();
        for t in &base {
            if let Some(i) = left.iter().position(|x| x == t) {
                left.remove(i);
            }
        }
        panic!(
            "{relay}: {} descriptors open 20 s after the clients left, {base_fds} at the start; \
             not open then: {left:?}",
            sg.fds()
        );
    }
}

/// Every line about a connection names it: the failed connect a session logs (at debug) carries the
/// connection's span fields (`service`, `client`, `listen`, and `backend` once one is connected), the
/// same client its routing line names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_about_a_connection_names_it() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let refusing = refusing_addr([127, 0, 0, 3]).await;
    let mut sg = Sg::start(
        &yaml(
            &[refusing, backend.addr],
            "balance: round_robin\nconnect_attempts: 2\npassive: {max_fails: 0}",
            "{drain_timeout: 5s}",
        )
        .replace("level: info", "level: debug"),
    );
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(sg.addr).await.unwrap();
        clients.push(c.local_addr().unwrap().to_string());
        c.write_all(b"hi").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await.unwrap(), b"hi");
    }
    let failed =
        tokio::task::block_in_place(|| sg.wait_line(SECS(10), |l| l["msg"] == "connect failed"));
    let client = failed["client"].as_str().expect("the connection's client");
    assert!(clients.iter().any(|c| c == client), "{failed}");
    assert_eq!(failed["service"], "t");
    assert_eq!(failed["listen"], sg.addr.to_string());
    assert_eq!(
        failed["backend"],
        refusing.to_string(),
        "the event's own backend wins"
    );
    let route = tokio::task::block_in_place(|| {
        sg.wait_line(SECS(10), |l| l["msg"] == "route" && l["client"] == client)
    });
    assert_eq!(route["backend"], backend.addr.to_string());
    assert!(
        route.get("listen").is_none(),
        "the routing line keeps its documented fields"
    );
    // The relay runs outside the span (no enter per poll) but how it broke is logged in it.
    let mut c = TcpStream::connect(sg.addr).await.unwrap();
    let reset_client = c.local_addr().unwrap().to_string();
    rst_on_drop(&c);
    c.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    c.read_exact(&mut b).await.unwrap();
    drop(c);
    let broken = tokio::task::block_in_place(|| {
        sg.wait_line(SECS(10), |l| {
            l["msg"] == "relay broken" && l["client"] == reset_client
        })
    });
    assert_eq!(broken["end"], "client_reset", "{broken}");
    assert_eq!(broken["service"], "t");
}

/// reliability.md `probes-out-of-descriptors`: the balancer's own descriptor exhaustion is no verdict on
/// its backends. With `ulimit -n 128`, probes every 300 ms, `fall: 1` and `rise: 5`, clients held
/// open until accepts fail: the probes fail with EMFILE, say so once, and mark nobody down, so the
/// first client after the descriptors come back is served (were the backend marked down, it would be
/// closed at once for 1.5 s, until five probes passed).
///
/// A relayed session holds two descriptors, so clients alone can leave one free for good (an odd
/// count left: each new client is accepted into it and closed when its backend socket fails), and a
/// probe would then find it. Idle admin connections hold one each and take that last one, whatever
/// the count the process inherited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_do_not_blame_backends_for_our_descriptor_exhaustion() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let config = yaml(
        &[backend.addr],
        "relay: copy\nhealth: {kind: tcp, interval: 300ms, timeout: 1s, rise: 5, fall: 1}",
        "{drain_timeout: 5s}",
    );
    let mut sg = Sg::start_with(
        &format!("admin: {{listen: \"127.0.0.1:0\"}}\n{config}"),
        "ulimit -n 128 &&",
    );
    let admin: SocketAddr = sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut held = Vec::new();
    let connect = |addr| async move {
        match tokio::time::timeout(SECS(2), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => Some(c),
            _ => None,
        }
    };
    for _ in 0..300 {
        held.extend(connect(sg.addr).await);
    }
    for _ in 0..2 {
        held.extend(connect(admin).await);
    }
    // Once the table is full, the accept loop fails on the next client.
    for _ in 0..5 {
        held.extend(connect(sg.addr).await);
    }
    tokio::task::block_in_place(|| {
        sg.wait_line(SECS(10), |l| l["msg"] == "accept failed; backing off");
        sg.wait_line(SECS(10), |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("health probes cannot open sockets"))
        });
    });
    // Several probe rounds while exhausted (fall is 1: one counted failure would mark it down).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(held);
    // The held sessions close while the first clients after them arrive, so one of those may still
    // meet EMFILE at its own connect (a local failure, reset, not blamed on the backend). What must
    // not happen is what happened before: the backend marked down, clients refused as `no_backend`
    // until `rise` probes passed.
    let deadline = Instant::now() + SECS(10);
    loop {
        match round_trip(sg.addr, b"back").await {
            Ok(served) if served == b"back" => break,
            other => assert!(
                Instant::now() < deadline,
                "no client served within 10 s of recovery: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Ok(v) = sg.lines.try_recv() {
        sg.seen.push(v);
    }
    assert!(
        !sg.seen.iter().any(|l| l["msg"] == "backend unhealthy"),
        "a backend was blamed for our exhaustion"
    );
    assert!(
        !sg.seen.iter().any(|l| l["end"] == "no_backend"),
        "a client was refused for want of a healthy backend"
    );
    let warnings = sg
        .seen
        .iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("health probes cannot open sockets"))
        })
        .count();
    assert_eq!(warnings, 1, "said once per streak");
}

/// The JSON lines of the daily log file whose name starts with `prefix` in `dir` (none yet: empty).
fn log_file_lines(dir: &std::path::Path, prefix: &str) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// A sluicegate process whose application log goes to a file in `dir` and whose routing log goes to
/// `stdout`, with a queue of 64 lines per stream; returns it with its service and admin addresses.
async fn spawn_logging_to(
    dir: &std::path::Path,
    backend: SocketAddr,
    stdout: Stdio,
) -> (Child, SocketAddr, SocketAddr) {
    let yaml = format!(
        "log: {{level: info, format: json, file: \"{}/app.log\", access: stdout, buffer_lines: 64}}\nadmin: {{listen: 127.0.0.1:0}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: copy\n    backends: [{{address: \"{backend}\"}}]\n",
        dir.display()
    );
    let cfg = dir.join("sg.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let child = sluicegate()
        .args(["--config", cfg.to_str().unwrap()])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluicegate");
    let addr_of = |msg: &str| {
        log_file_lines(dir, "app.log")
            .into_iter()
            .find(|l| l["msg"] == msg)
            .and_then(|l| l["listen"].as_str()?.parse::<SocketAddr>().ok())
    };
    let mut found = None;
    wait_for(SECS(20), "service and admin listening", || {
        found = addr_of("listening").zip(addr_of("admin API listening"));
        found.is_some()
    })
    .await;
    let (svc, admin) = found.unwrap();
    (child, svc, admin)
}

/// `sluicegate_log_lines_dropped_total` for `stream` and `reason`, from `/metrics`.
pub(crate) async fn dropped_lines(admin: SocketAddr, stream: &str, reason: &str) -> u64 {
    let page = crate::common::http::get(admin, "/metrics").await.body;
    let series =
        format!("sluicegate_log_lines_dropped_total{{stream=\"{stream}\",reason=\"{reason}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series}in /metrics"))
}

/// Sends `n` round trips through `addr`, `concurrency` at a time; every one must come back whole.
pub(crate) async fn round_trips(addr: SocketAddr, n: usize, concurrency: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Relaxed) < n as u64 {
                let got = round_trip(addr, b"ping").await.expect("round trip");
                assert_eq!(got, b"ping");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// reliability.md `log-stalled`: a routing log nobody reads (stdout into a pipe that is never read,
/// as under a paused log driver) stalls no connection. The queue fills, lines are dropped and counted
/// (`queue_full`), traffic flows, and one warning says so; before, the worker that wrote the line
/// blocked with every connection on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stdout_drops_and_counts_lines_and_traffic_flows() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let dir = tmp_file("x", "").parent().unwrap().to_path_buf();
    // Kept open and never read: the pipe holds 64 KiB, about 250 routing lines.
    let (mut child, addr, admin) = spawn_logging_to(&dir, backend.addr, Stdio::piped()).await;
    within(
        SECS(60),
        "3,000 round trips through a stalled log",
        round_trips(addr, 3000, 16),
    )
    .await;
    let n = dropped_lines(admin, "routing", "queue_full").await;
    assert!(n > 0, "routing lines dropped and counted");
    // Still stalled: more traffic flows, and every line of it is dropped and counted.
    within(SECS(60), "500 more round trips", round_trips(addr, 500, 16)).await;
    wait_until(
        SECS(10),
        "the 500 lines counted as dropped",
        || async move { dropped_lines(admin, "routing", "queue_full").await >= n + 500 },
    )
    .await;
    assert_eq!(dropped_lines(admin, "routing", "write_error").await, 0);
    let warned = || {
        log_file_lines(&dir, "app.log")
            .iter()
            .filter(|l| {
                l["msg"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("routing log cannot keep up"))
            })
            .count()
    };
    wait_for(SECS(10), "the warning in the application log", || {
        warned() > 0
    })
    .await;
    assert_eq!(warned(), 1, "said once per streak");
    let _ = child.kill();
    let _ = child.wait();
}

/// reliability.md `log-unwritable`: a routing log that cannot be written (stdout on a full device)
/// drops its lines, counts them (`write_error`) and says so once; connections are served as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_stdout_counts_write_errors() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let dir = tmp_file("x", "").parent().unwrap().to_path_buf();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let (mut child, addr, admin) = spawn_logging_to(&dir, backend.addr, Stdio::from(full)).await;
    within(SECS(30), "round trips", round_trips(addr, 50, 4)).await;
    wait_until(
        SECS(10),
        "every routing line counted as a write error",
        || async move { dropped_lines(admin, "routing", "write_error").await >= 50 },
    )
    .await;
    wait_for(SECS(10), "the warning in the application log", || {
        log_file_lines(&dir, "app.log").iter().any(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("routing log cannot be written"))
        })
    })
    .await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("routing log cannot be written").count(),
        1,
        "one warning on stderr: {stderr}"
    );
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
    wait_for(SECS(10), "the listening line in the log file", || {
        listen = read_log().into_iter().find(|l| l["msg"] == "listening");
        listen.is_some()
    })
    .await;
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
/// with `log.keep` files kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_streams_are_separate_and_kept() {
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
    let mut listening = None;
    wait_for(
        SECS(10),
        "the listening line in the application log",
        || {
            listening = lines_of("app.log.")
                .into_iter()
                .find(|l| l["msg"] == "listening");
            listening.is_some()
        },
    )
    .await;
    let addr: SocketAddr = listening.unwrap()["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
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
}

/// `access: off` drops routing lines only; `log.filter` and `SLUICEGATE_LOG` choose what the
/// application log says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_filters_choose_what_is_written() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
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
    let next_line = |end: Instant, what: &str| {
        raw(line_before(&lines, end).unwrap_or_else(|| panic!("no {what} within 10 s")))
    };
    let end = Instant::now() + SECS(10);
    let listening = loop {
        let l = next_line(end, "listening line");
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
    let end = Instant::now() + SECS(10);
    while routes.len() < 2 {
        let l = next_line(end, "two route lines");
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
    use crate::common::fleet::{replicas, who};
    let (port, fleet) = replicas(2, 2);
    let dns = crate::common::dns::FakeDns::start().await;
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

/// `conf/sluicegate.service` and `conf/sluicegate.socket` pass `systemd-analyze verify` (with the
/// binary path pointed at this build) without a single complaint; the unit checks the config before
/// starting, reloads by upgrading in place (and so is `Type=notify`), does
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
    assert_eq!(
        key("ExecReload"),
        ["/usr/local/bin/sluicegate upgrade --pid $MAINPID"]
    );
    assert_eq!(key("Type"), ["notify"]);
    assert_eq!(
        key("NotifyAccess"),
        ["all"],
        "the new process says MAINPID="
    );
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
    let missing = tool
        .err()
        .map(|e| format!("systemd-analyze not found ({e})"));
    if !require_tool("SYSTEMD_ANALYZE", missing) {
        return;
    }
    // As shipped, and with the admin token's credential lines uncommented (as its header says).
    let with_token = unit.replace("#LoadCredential=", "LoadCredential=").replace(
        "#Environment=SLUICEGATE_ADMIN_TOKEN_FILE",
        "Environment=SLUICEGATE_ADMIN_TOKEN_FILE",
    );
    assert_ne!(
        with_token, unit,
        "the unit shows how to pass the admin token"
    );
    let socket = std::fs::read_to_string(repo("conf/sluicegate.socket")).unwrap();
    for text in [&unit, &with_token] {
        let here = tmp_file(
            "sluicegate.service",
            &text.replace("/usr/local/bin/sluicegate", BIN),
        );
        // The socket unit beside it, verified with it.
        let sock = here.with_file_name("sluicegate.socket");
        std::fs::write(&sock, &socket).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&here)
            .arg(&sock)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.trim().is_empty(), "{said}");
    }
}

/// reliability.md `uring-fallback`: where io_uring is unavailable (here forced with
/// `SLUICEGATE_IO_URING=off`, as a seccomp policy or `kernel.io_uring_disabled` would), `relay: ring`
/// runs on the epoll engine and says so in one warning for all its services, `relay: auto` runs it
/// too and says so in one note, and each relays exactly; without it the services run on the ring
/// workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_falls_back_to_epoll_with_one_line() {
    let be = Backend::echo([127, 0, 0, 2]).await;
    let service = |name: &str, relay: &str| {
        format!("  - name: {name}\n    listen: 127.0.0.1:0\n{relay}    backends: [{{address: \"{}\"}}]\n", be.addr)
    };
    let all = format!(
        "{}{}{}{}",
        yaml(&[be.addr], "relay: ring", "{drain_timeout: 5s}"),
        service("r2", "    relay: ring\n"),
        service("r", "    relay: ring\n"),
        service("a", ""),
    );
    for (prefix, off) in [("SLUICEGATE_IO_URING=off", true), ("", false)] {
        let mut sg = Sg::start_with(&all, prefix);
        let listening =
            |name: &'static str| move |l: &Value| l["msg"] == "listening" && l["service"] == name;
        let mut lines = Vec::new();
        for name in ["r2", "r", "a"] {
            let l = sg.wait_line(SECS(20), listening(name));
            assert_eq!(l["relay"], if off { "epoll" } else { "ring" }, "{l}");
            lines.push(l);
        }
        for l in &lines {
            let addr: std::net::SocketAddr = l["listen"].as_str().unwrap().parse().unwrap();
            let msg = payload(7, 256 << 10);
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&msg).await.unwrap();
            c.shutdown().await.unwrap();
            let got = within(SECS(10), "echo", read_all(&mut c)).await.unwrap();
            assert_eq!(sha(&got), sha(&msg));
        }
        sg.signal(libc::SIGTERM);
        assert_eq!(tokio::task::block_in_place(|| sg.wait_exit(SECS(10))), 0);
        let said = |what: &str| {
            sg.seen
                .iter()
                .filter(|l| l["msg"].as_str().is_some_and(|m| m.contains(what)))
                .count()
        };
        let once_if_off = usize::from(off);
        assert_eq!(
            said("relay: ring is unavailable"),
            once_if_off,
            "one line, for the three ring services"
        );
        assert_eq!(
            said("relay: auto runs the epoll engine here"),
            once_if_off,
            "one note for auto"
        );
    }
}

/// reliability.md `tls-origination-defaults`: `backend_tls: {}` verifies a backend against the
/// system's roots (here `SSL_CERT_FILE`, which the OS trust store loader reads, names the test's CA)
/// and the DNS name the backend was found under (`db.test`, from the in-process DNS server): the
/// client is served. A service with `verify: false` beside it warns at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_defaults_to_the_system_roots_and_the_backends_dns_name() {
    let pki = crate::common::pki::Pki::new("system roots");
    let backend =
        crate::common::pki::tls_echo_backend([127, 0, 0, 2], &pki.server("db", &["db.test"])).await;
    let dns = crate::common::dns::FakeDns::start().await;
    dns.set_ips("db.test", &[[127, 0, 0, 2]]);
    let port = backend.addr.port();
    let yaml = format!(
        "log: {{level: info, format: json}}\nresolver: {{nameservers: [\"{}\"], timeout: 300ms}}\nservices:\n  - name: strict\n    listen: 127.0.0.1:0\n    backend_tls: {{}}\n    backends: [{{address: \"db.test:{port}\"}}]\n  - name: lax\n    listen: 127.0.0.1:0\n    backend_tls: {{verify: false}}\n    backends: [{{address: \"{}\"}}]\n",
        dns.addr, backend.addr
    );
    let mut sg = Sg::start_with(&yaml, &format!("SSL_CERT_FILE={}", pki.ca.display()));
    let warned = sg.wait_line(SECS(5), |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("backend_tls.verify is false"))
    });
    assert_eq!(warned["service"], "lax");
    let strict: SocketAddr = sg.wait_line(SECS(5), |l| {
        l["msg"] == "listening" && l["service"] == "strict"
    })["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let served = within(SECS(10), "served", round_trip(strict, b"hello over TLS"))
        .await
        .expect("verified against the system roots and db.test");
    assert_eq!(served, b"hello over TLS");
}

/// reliability.md `ktls`: a service that terminates TLS says once, at start, that its records are
/// relayed in user space and whether the kernel offers kTLS (this machine's does not: `ktls: false`),
/// as `/proc/sys/net/ipv4/tcp_available_ulp` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_says_once_where_its_records_are_relayed() {
    let pki = crate::common::pki::Pki::new("ktls line");
    let pair = pki.server("web", &["web.test"]);
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let service = |name: &str| {
        format!(
            "  - name: {name}\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\"}}\n    backends: [{{address: \"{}\"}}]\n",
            pair.cert.display(),
            pair.key.display(),
            backend.addr
        )
    };
    let yaml = format!(
        "log: {{level: info, format: json}}\nservices:\n{}{}",
        service("one"),
        service("two")
    );
    let mut sg = Sg::start(&yaml);
    let offered = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|u| u.split_whitespace().any(|u| u == "tls"))
        .unwrap_or(false);
    let line = sg.wait_line(SECS(5), |l| {
        l["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("TLS is relayed in user space"))
    });
    assert_eq!(line["ktls"], offered, "{line}");
    let said = sg
        .seen
        .iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("TLS is relayed in user space"))
        })
        .count();
    assert_eq!(said, 1, "once for two TLS services");
}

/// reliability.md `secret-file-mode`: a TLS private key other users may read is refused by the check
/// the start runs (exit 64, naming the file and its mode); the same key made the owner's alone
/// starts; readable again with `allow_readable_keys: true` it starts with a warning naming the file.
#[test]
fn a_key_others_may_read_is_refused_unless_allowed() {
    let pki = crate::common::pki::Pki::new("key mode");
    let pair = pki.server("web", &["web.test"]);
    let chmod =
        |mode| std::fs::set_permissions(&pair.key, std::fs::Permissions::from_mode(mode)).unwrap();
    let yaml = |extra: &str| {
        format!(
            "{extra}log: {{level: info, format: json}}\nservices:\n  - name: web\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\"}}\n    backends: [{{address: 127.0.0.1:9}}]\n",
            pair.cert.display(),
            pair.key.display(),
        )
    };
    let key = pair.key.display().to_string();
    chmod(0o644);
    let cfg = tmp_file("readable-key.yaml", &yaml(""));
    // `--check` reads the files as the start does (the same function), and exits either way.
    let (code, _, err) = run(&["--check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("services[0].tls") && err.contains(&key) && err.contains("mode 0644"),
        "{err}"
    );
    let warned = |l: &Value| l["level"] == "warn" && l["file"] == key.as_str();

    chmod(0o600);
    let mut sg = Sg::start(&yaml(""));
    sg.signal(libc::SIGTERM);
    sg.wait_exit(SECS(10));
    assert!(!sg.seen.iter().any(warned), "no warning for a private key");

    chmod(0o644);
    let mut sg = Sg::start(&yaml("allow_readable_keys: true\n"));
    let line = sg.wait_line(SECS(5), warned);
    assert_eq!(line["mode"], "0644", "{line}");
    sg.signal(libc::SIGTERM);
    sg.wait_exit(SECS(10));
}

/// reliability.md `secret-file-mode`: the private key sluicegate presents to a Docker Engine over
/// TLS (`docker_cert_path`, of a `docker:` backend and of `replicas:`) is held to the same rule as
/// its own keys: readable by others, `--check` refuses it naming the key and its mode; the owner's
/// alone, it passes. (No Engine is reached: the check reads the files as the start does.)
#[test]
fn a_docker_client_key_others_may_read_is_refused() {
    let dir = tmp_file("ca.pem", "").parent().unwrap().to_path_buf();
    let pki = crate::common::pki::Pki::new("docker key mode");
    let pair = pki.server("docker-client", &["docker.test"]);
    std::fs::copy(&pair.cert, dir.join("cert.pem")).unwrap();
    std::fs::copy(&pair.cert, dir.join("ca.pem")).unwrap();
    let key = dir.join("key.pem");
    std::fs::copy(&pair.key, &key).unwrap();
    let chmod =
        |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    let engine = format!(
        "docker: \"tcp://127.0.0.1:2376\", docker_cert_path: \"{}\"",
        dir.display()
    );
    for (section, yaml) in [
        (
            "services[0].backends[0].docker",
            format!("services:\n  - name: web\n    listen: 127.0.0.1:0\n    backends: [{{docker: {{labels: {{app: web}}, port: 80, {engine}}}}}]\n"),
        ),
        (
            "services[0].replicas",
            format!("services:\n  - name: web\n    listen: 127.0.0.1:0\n    health: {{kind: tcp}}\n    replicas: {{image: \"web:1\", network: net, port: 80, min: 1, max: 2, start: 1, balancer: b, {engine}}}\n"),
        ),
    ] {
        let cfg = tmp_file("docker-key.yaml", &yaml);
        chmod(0o644);
        let (code, _, err) = run(&["--check", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 64, "{section}: {err}");
        assert!(
            err.contains(section)
                && err.contains(&key.display().to_string())
                && err.contains("mode 0644"),
            "{section}: {err}"
        );
        chmod(0o600);
        let (code, _, err) = run(&["--check", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{section}: {err}");
    }
}

/// reliability.md `sni-explained`: on a shared address the routing line says why a connection went
/// where it did (`sni`, `alpn`, `route`), and a connection no service took is logged with
/// `service: null` and its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_line_explains_a_shared_address() {
    use sluicegate::tls::hello::build::client_hello;
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let shared = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = format!(
        "log: {{level: info, format: json}}\nshutdown: {{drain_timeout: 5s}}\nservices:\n  - name: a\n    listen: \"{shared}\"\n    sni: [\"*.example\"]\n    backends: [{{address: \"{b}\"}}]\n  - name: acme\n    listen: \"{shared}\"\n    sni: [\"*.example\"]\n    alpn: [acme-tls/1]\n    backends: [{{address: \"{b}\"}}]\n",
        b = backend.addr
    );
    let mut sg = Sg::start(&yaml);
    for (sni, alpn) in [
        ("x.example", &["h2", "http/1.1"][..]),
        ("y.example", &["acme-tls/1"][..]),
    ] {
        let mut c = TcpStream::connect(shared).await.unwrap();
        let hello = client_hello(Some(sni), alpn);
        c.write_all(&hello).await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(read_all(&mut c).await.unwrap(), hello, "echoed whole");
    }
    let mut c = TcpStream::connect(shared).await.unwrap();
    c.write_all(&client_hello(Some("other.test"), &[]))
        .await
        .unwrap();
    let _ = read_all(&mut c).await;
    tokio::task::block_in_place(|| {
        let a = sg.wait_line(SECS(10), |l| l["msg"] == "route" && l["sni"] == "x.example");
        assert_eq!(
            (&a["service"], &a["alpn"], &a["route"]),
            (
                &Value::from("a"),
                &Value::from("h2,http/1.1"),
                &Value::from("wildcard")
            ),
            "{a}"
        );
        let acme = sg.wait_line(SECS(10), |l| l["msg"] == "route" && l["sni"] == "y.example");
        assert_eq!(acme["service"], "acme");
        assert_eq!(acme["route"], "wildcard+alpn");
        let none = sg.wait_line(SECS(10), |l| {
            l["msg"] == "route" && l["sni"] == "other.test"
        });
        assert_eq!(none["service"], Value::Null, "{none}");
        assert_eq!(none["end"], "no_route");
        assert_eq!(none["route"], Value::Null);
    });
}

/// `sluicegate connections` against a running process: a table of its live connections, `--json`,
/// filters, and `--kill` ending the matches with the token read from the config's `token_file`
/// (without it the kill is refused and exits 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_command_lists_and_kills() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let base = yaml(&[backend.addr], "", "{drain_timeout: 5s}");
    let token_file = tmp_file("admin-token", "cli-token-0123456789\n");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "admin: {{listen: \"127.0.0.1:0\", token_file: \"{}\"}}\n{base}",
        token_file.display()
    );
    let mut sg = Sg::start(&config);
    let admin = sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening")["listen"]
        .as_str()
        .unwrap()
        .to_string();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(sg.addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        held.push(s);
    }
    let cfg = sg.cfg.to_str().unwrap().to_string();
    let cli = |extra: &[&str]| {
        let mut args = vec!["connections", "--admin", &admin];
        args.extend_from_slice(extra);
        tokio::task::block_in_place(|| run(&args, &[]))
    };
    let (code, out, err) = cli(&["--service", "t"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID  SERVICE"), "{out}");
    assert_eq!(
        lines.len(),
        5,
        "a header, three connections, the count: {out}"
    );
    assert!(lines[1].contains(&backend.addr.to_string()), "{out}");
    assert_eq!(lines[4], "3 of 3 connections");
    let (code, out, _) = cli(&["--json", "--limit", "1"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["total"].as_u64(),
            v["connections"].as_array().unwrap().len()
        ),
        (Some(3), 1)
    );
    let (code, out, _) = cli(&["--client", "192.0.2.0/24"]);
    assert_eq!((code, out.lines().last()), (0, Some("0 of 0 connections")));

    // `top`, piped: frame after frame, each the service, its backend and the connections.
    let top = |extra: &[&str]| {
        let mut args = vec!["top", "--count", "2", "--interval", "100ms"];
        args.extend_from_slice(extra);
        tokio::task::block_in_place(|| run(&args, &[]))
    };
    let (code, out, err) = top(&["--admin", &admin, "--limit", "2", "--sort", "oldest"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.matches("sluicegate: ready").count(),
        2,
        "two frames: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("t ") && l.contains("tcp")),
        "{out}"
    );
    let backend_row = |l: &str| l.contains(&backend.addr.to_string()) && l.contains("active");
    assert!(out.lines().any(backend_row), "{out}");
    assert!(out.contains("connections, oldest first:"), "{out}");
    assert_eq!(out.matches("2 of 3 connections").count(), 2, "{out}");
    let (code, _, err) = top(&["--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1, "nobody answers: {err}");

    let (code, _, err) = cli(&["--kill", "--service", "t"]);
    assert_eq!(code, 1, "no token, no kill");
    assert!(err.contains("401"), "{err}");
    let (code, out, err) = cli(&["-c", &cfg, "--kill", "--service", "t"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "killed 3");
    for mut s in held {
        let mut buf = [0u8; 8];
        let r = within(SECS(5), "the killed client's end", s.read(&mut buf)).await;
        assert!(r.is_err(), "a kill resets: {r:?}");
    }
    let killed = sg.wait_line(SECS(5), |l| l["end"] == "killed");
    assert_eq!(killed["service"], "t");
}

/// `log.access: {on_connect: true, every: 1s}`: a `connect` line once the backend connection is
/// made, `progress` lines with the bytes so far while it stays open, then the `end` line; on the
/// ring and on epoll. The string form of `log.access` keeps working (the other tests use it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_progress_lines_come_while_a_connection_is_open() {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    for relay in ["ring", "epoll"] {
        let base = yaml(
            &[backend.addr],
            &format!("relay: {relay}"),
            "{drain_timeout: 5s}",
        );
        let config = base.replace(
            "log: {level: info, format: json}",
            "log: {level: info, format: json, access: {to: stdout, on_connect: true, every: 1s}}",
        );
        assert_ne!(config, base, "the log line was replaced");
        let mut sg = Sg::start(&config);
        let mut s = TcpStream::connect(sg.addr).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        within(SECS(5), "echo", s.read_exact(&mut back))
            .await
            .unwrap();
        let connect = sg.wait_line(SECS(5), |l| l["event"] == "connect");
        assert_eq!(
            connect["backend"],
            backend.addr.to_string(),
            "{relay}: {connect}"
        );
        assert_eq!(connect["service"], "t");
        let id = connect["id"].as_u64().expect("the connection's id");
        let progress = sg.wait_line(SECS(5), |l| {
            l["event"] == "progress" && l["bytes_up"].as_u64() == Some(5)
        });
        assert_eq!(progress["id"], id, "{relay}: {progress}");
        assert_eq!(progress["bytes_down"], 5, "{relay}: {progress}");
        drop(s);
        let end = sg.wait_line(SECS(5), |l| l["event"] == "end");
        assert_eq!(end["end"], "client_closed", "{relay}: {end}");
        sg.signal(libc::SIGTERM);
        let code = tokio::task::block_in_place(|| sg.wait_exit(SECS(10)));
        assert_eq!(code, 0, "{relay}");
    }
}
