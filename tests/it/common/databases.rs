//! Real database servers for the protocol-aware health checks: Debian's `redis-server` and
//! PostgreSQL, each started by the test on an ephemeral port of 127.0.0.1 with its data in a
//! directory of its own, and stopped (by its own process id) when dropped. Without the server
//! installed the caller skips, saying so loudly, unless `SLUICEGATE_REQUIRE_REDIS=1` /
//! `SLUICEGATE_REQUIRE_POSTGRES=1` (CI) makes that a failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A port of 127.0.0.1 free a moment ago (the server binds it next; a clash fails the start, loudly).
pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits (bounded) until `addr` accepts a connection; panics naming `what` otherwise.
fn wait_listening(addr: SocketAddr, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A directory of its own for one server, under the temporary directory, empty.
pub(super) fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sg-{name}-{}-{}", std::process::id(), free_port()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Whether `program arg` runs and succeeds (how a test finds out that a tool is installed).
pub(super) fn runs(program: impl AsRef<std::ffi::OsStr>, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Sends `signal` to a server this test started (by its own process id), waits up to 20 s for it
/// to exit, then kills it.
pub(super) fn stop_child(mut child: Child, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `redis-server` of this test.
pub struct Redis {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Redis {
    /// Whether `redis-server` is installed (else the caller skips, or fails in CI).
    pub fn available(test: &str) -> bool {
        let found = runs("redis-server", "--version");
        super::require_tool(
            "REDIS",
            (!found).then(|| {
                format!("{test}: redis-server is not installed (apt install redis-server)")
            }),
        )
    }

    /// A primary, or a replica of `primary`.
    pub fn start(primary: Option<SocketAddr>) -> Redis {
        let port = free_port();
        let dir = scratch("redis");
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(p) = primary {
            cmd.args(["--replicaof", &p.ip().to_string(), &p.port().to_string()]);
        }
        let mut child = cmd.spawn().expect("start redis-server");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "redis-server", &mut child);
        Redis { addr, child, dir }
    }

    /// Sends one inline command; returns the first line of the answer.
    pub async fn command(&self, line: &str) -> String {
        command(self.addr, line).await
    }

    /// Its replication role as `INFO replication` says it.
    pub async fn role(&self) -> String {
        let mut s = TcpStream::connect(self.addr).await.expect("connect");
        s.write_all(b"INFO replication\r\nQUIT\r\n")
            .await
            .expect("write");
        let mut text = String::new();
        let mut r = BufReader::new(s);
        let all = async { while r.read_line(&mut text).await.unwrap_or(0) > 0 {} };
        super::within(Duration::from_secs(10), "redis's INFO replication", all).await;
        text.lines()
            .find_map(|l| l.strip_prefix("role:"))
            .unwrap_or("")
            .trim()
            .to_string()
    }
}

/// Sends one inline command to the Redis at `addr` (directly or through sluicegate); returns the
/// first line of the answer.
pub async fn command(addr: SocketAddr, line: &str) -> String {
    let s = TcpStream::connect(addr).await.expect("connect");
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut answer)).await;
    answer.trim_end().to_string()
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL server of this test: a cluster made with `initdb` (trust authentication), run by
/// the `postgres` user when the test runs as root (the server refuses to run as root).
pub struct Postgres {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: PathBuf,
}

impl Postgres {
    /// The directory of the installed server's programs (`/usr/lib/postgresql/N/bin`), newest first.
    fn bin_dir() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("postgres").exists() && d.join("initdb").exists())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    /// Whether PostgreSQL is installed (else the caller skips, or fails in CI).
    pub fn available(test: &str) -> bool {
        super::require_tool(
            "POSTGRES",
            Self::bin_dir()
                .is_none()
                .then(|| format!("{test}: PostgreSQL is not installed (apt install postgresql)")),
        )
    }

    /// Runs `program` as the user that may run the server: `postgres` when this is root.
    fn as_server_user(program: &Path) -> Command {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if root {
            // setpriv execs the program itself: its process id is the server's.
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn start() -> Postgres {
        let bin = Self::bin_dir().expect("PostgreSQL installed");
        let dir = scratch("postgres");
        let data = dir.join("data");
        let chown = |p: &Path| {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status();
        };
        chown(&dir);
        let out = Self::as_server_user(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut child = Self::as_server_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "postgres", &mut child);
        Postgres {
            addr,
            child: Some(child),
            dir,
        }
    }

    /// Stops the server (a fast shutdown, as `pg_ctl stop -m fast`) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child, rustix::process::Signal::INT);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
