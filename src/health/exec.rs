//! `kind: exec`: a command sluicegate runs to check a backend, for what a connection cannot tell
//! (a replication lag, a quorum, a file on a shared disk). Exit status 0 is up.
//!
//! Run without a shell (`command` is the argument vector), with standard input closed, in a process
//! group of its own, and an environment of only `PATH`, `LANG` and the backend's
//! `SLUICEGATE_BACKEND_ADDRESS`, `SLUICEGATE_BACKEND_HOST`, `SLUICEGATE_BACKEND_PORT` and
//! `SLUICEGATE_SERVICE` (nothing of sluicegate's own environment, such as its admin token, leaks to
//! it). Its output is kept, a timed-out command's too; the exit status of the command itself
//! decides, even when a child it left holds its output open.
//!
//! Nothing a check starts outlives it: when it ends, by its exit, its timeout, or its probe dropped
//! (a reload, a stop), its whole process group is killed (`SIGKILL`), and what left the group
//! (`setsid`, a double fork) is killed and reaped by the sweep of `reaper.rs` once the binary made
//! sluicegate a child subreaper. Commands take one of their service's slots (`slots.rs`): a probe
//! that finds none within its timeout fails without a verdict (`ProbeError::Local`), like a probe
//! out of sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use super::slots::Member;
use super::{reaper, ProbeError, Probed, OUTPUT_KEPT};

/// How long the pipes may stay open after the command exited (held by a child it left running).
const PIPE_GRACE: Duration = Duration::from_millis(100);

/// How long a killed command is waited for before it is left to tokio to reap (a process in an
/// uninterruptible sleep dies only when it wakes).
const REAP_GRACE: Duration = Duration::from_secs(1);

/// `PATH` when sluicegate's own has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the command is told about the backend it checks.
#[derive(Debug)]
pub(super) struct Env<'a> {
    pub(super) address: SocketAddr,
    /// The DNS name the backend was found under, else its IP.
    pub(super) host: Option<&'a str>,
    pub(super) service: &'a str,
}

impl Env<'_> {
    fn vars(&self) -> [(&'static str, String); 4] {
        [
            ("SLUICEGATE_BACKEND_ADDRESS", self.address.to_string()),
            (
                "SLUICEGATE_BACKEND_HOST",
                self.host
                    .map_or_else(|| self.address.ip().to_string(), str::to_string),
            ),
            ("SLUICEGATE_BACKEND_PORT", self.address.port().to_string()),
            ("SLUICEGATE_SERVICE", self.service.to_string()),
        ]
    }
}

/// Runs `command` for the backend `env` describes, bounded by `timeout` (waiting for one of
/// `member`'s slots included); its output (standard output, then standard error) is captured, the
/// first [`OUTPUT_KEPT`] bytes of it kept. Whatever its ending, nothing it started is left running.
pub(super) async fn run(
    command: &[String],
    env: &Env<'_>,
    timeout: Duration,
    member: &Member,
) -> Probed {
    let deadline = tokio::time::Instant::now() + timeout;
    let _slot = match member.slot(deadline).await {
        Ok(slot) => slot,
        Err(busy) => {
            return failed(ProbeError::Local(std::io::Error::other(format!(
                "no health command slot: the service runs {} of its {}, {} run in all",
                busy.held, busy.share, busy.running
            ))))
        }
    };
    let Some((program, args)) = command.split_first() else {
        return failed(ProbeError::Spawn("no command".into()));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into()),
        )
        .env("LANG", "C.UTF-8")
        .envs(env.vars())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut running = match Running::spawn(&mut cmd) {
        Ok(r) => r,
        Err(e) => return failed(spawn_failure(program, e)),
    };
    let child = &mut running.child;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = {
        let pipes = async { tokio::join!(capture(stdout, &mut out), capture(stderr, &mut err)) };
        let work = async {
            tokio::pin!(pipes);
            tokio::select! {
                () = async { (&mut pipes).await; } => child.wait().await,
                status = child.wait() => {
                    // A child of the command may hold the pipes after the command exited: its
                    // status decides, and what it wrote so far is kept.
                    let _ = tokio::time::timeout(PIPE_GRACE, pipes).await;
                    status
                }
            }
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    };
    running.finish().await;
    drop(running);
    sweep_after_check().await;
    out.extend_from_slice(&err);
    out.truncate(OUTPUT_KEPT);
    let result = match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(ProbeError::Exit(s.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(ProbeError::Timeout),
        Err(e) => Err(ProbeError::Spawn(format!("{program}: {e}"))),
    };
    Probed {
        result,
        output: Some(out),
    }
}

/// A command started, listed among the checks in flight (so no sweep takes it for a stray) until
/// it is dropped; then its process group is killed, whatever ended the check: its exit, its
/// timeout, the probe dropped at a reload or at stop.
struct Running {
    child: Child,
    pid: Option<u32>,
}

impl Running {
    fn spawn(cmd: &mut Command) -> std::io::Result<Running> {
        // Listed under the lock a sweep holds: started and listed are one step for it.
        let mut in_flight = reaper::in_flight();
        let child = cmd.spawn()?;
        let pid = child.id();
        in_flight.extend(pid);
        Ok(Running { child, pid })
    }

    /// Kills what is left of the group (a command that timed out, children it left), then reaps
    /// the command, which makes what it left outside its group a child of sluicegate (a
    /// subreaper), for the sweep.
    async fn finish(&mut self) {
        kill_group(self.pid);
        let _ = tokio::time::timeout(REAP_GRACE, self.child.wait()).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        kill_group(self.pid);
        if let Some(pid) = self.pid {
            reaper::in_flight().remove(&pid);
        }
        // The child itself is killed again by `kill_on_drop`, and reaped by tokio if it was not.
    }
}

/// Kills and reaps what checks left outside their groups, once the check is over. Checks ending
/// together share one sweep: a check waits for the sweep running to end and skips its own when
/// another started after it ended (that one saw what it left).
async fn sweep_after_check() {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    static SWEEPING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if !reaper::adopting() {
        return;
    }
    let seen = STARTED.load(Ordering::SeqCst);
    let _turn = SWEEPING.lock().await;
    if STARTED.load(Ordering::SeqCst) > seen {
        return;
    }
    STARTED.fetch_add(1, Ordering::SeqCst);
    // Off the control runtime: a scan reads every process's stat file.
    let _ = tokio::task::spawn_blocking(|| reaper::sweep(reaper::ROUNDS_AFTER_CHECK)).await;
}

/// What a failure to start the command says: out of descriptors, processes (`EAGAIN` from fork) or
/// memory is the balancer's own trouble and gives no verdict; anything else (no such program, not
/// executable) is the check's failure.
fn spawn_failure(program: &str, e: std::io::Error) -> ProbeError {
    if crate::util::is_local_exhaustion(&e) || e.raw_os_error() == Some(libc::EAGAIN) {
        ProbeError::Local(e)
    } else {
        ProbeError::Spawn(format!("{program}: {e}"))
    }
}

fn failed(e: ProbeError) -> Probed {
    Probed {
        result: Err(e),
        output: None,
    }
}

/// Kills the process group the command leads (its own children included). After the command was
/// reaped, its group lives on while a member does, and its id with it; with none left, the kill
/// finds nothing (its id is reused only after the pid space wraps around).
fn kill_group(leader: Option<u32>) {
    let pid = leader
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // Fails only when the group is gone already.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Reads a pipe to its end into `kept`, keeping the first [`OUTPUT_KEPT`] bytes (the rest is read
/// and dropped, so a chatty command never blocks on a full pipe). What was read stays in `kept` when
/// the read is cut short.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, kept: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command run for the service `cache`.
    async fn run(command: &[String], env: &Env<'_>, timeout: Duration) -> Probed {
        super::run(command, env, timeout, &Member::join("cache".into())).await
    }

    fn env() -> Env<'static> {
        Env {
            address: "127.0.0.1:6379".parse().unwrap(),
            host: Some("db"),
            service: "cache",
        }
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn exit_status_decides_and_the_output_is_kept() {
        let p = run(
            &sh("echo \"$SLUICEGATE_SERVICE $SLUICEGATE_BACKEND_HOST $SLUICEGATE_BACKEND_PORT $SLUICEGATE_BACKEND_ADDRESS ${SLUICEGATE_ADMIN_TOKEN:-none}\""),
            &env(),
            Duration::from_secs(5),
        )
        .await;
        assert!(p.result.is_ok(), "{:?}", p.result);
        assert_eq!(p.output.unwrap(), b"cache db 6379 127.0.0.1:6379 none\n");
        let p = run(
            &sh("echo lagging >&2; exit 3"),
            &env(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&p.result, Err(ProbeError::Exit(s)) if s.contains('3')),
            "{:?}",
            p.result
        );
        assert_eq!(p.output.unwrap(), b"lagging\n");
        let p = run(
            &sh("head -c 100000 /dev/zero"),
            &env(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(p.output.unwrap().len(), OUTPUT_KEPT, "output capped");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_failure() {
        let p = run(
            &["/nonexistent/check".into()],
            &env(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&p.result, Err(ProbeError::Spawn(m)) if m.contains("/nonexistent/check")),
            "{:?}",
            p.result
        );
    }

    #[test]
    fn our_own_exhaustion_at_spawn_gives_no_verdict() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EAGAIN] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(spawn_failure("check", e), ProbeError::Local(_)),
                "errno {errno}"
            );
        }
        for errno in [libc::ENOENT, libc::EACCES, libc::ENOEXEC] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(spawn_failure("check", e), ProbeError::Spawn(m) if m.starts_with("check: ")),
                "errno {errno}"
            );
        }
    }

    #[tokio::test]
    async fn a_timed_out_command_keeps_what_it_wrote() {
        let p = run(
            &sh("echo waiting for quorum; exec sleep 300"),
            &env(),
            Duration::from_millis(500),
        )
        .await;
        assert!(
            matches!(p.result, Err(ProbeError::Timeout)),
            "{:?}",
            p.result
        );
        assert_eq!(p.output.unwrap(), b"waiting for quorum\n");
    }

    /// The command's own exit decides, even when a child it left behind holds its output open; the
    /// child is killed with the group.
    #[tokio::test]
    async fn the_commands_exit_decides_when_a_child_holds_its_output() {
        let dir = std::env::temp_dir().join(format!("sluicegate-exec-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("bg.pid");
        let script = format!("sleep 300 & echo $! > {}; echo ok", pidfile.display());
        let p = run(&sh(&script), &env(), Duration::from_secs(30)).await;
        assert!(p.result.is_ok(), "{:?}", p.result);
        assert_eq!(p.output.unwrap(), b"ok\n");
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            gone_within_5s(child),
            "the background sleep outlived the check"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A command that hangs, and a child of it that would outlive it, are killed at the timeout.
    #[tokio::test]
    async fn a_hanging_command_and_its_children_are_killed_at_the_timeout() {
        let dir = std::env::temp_dir().join(format!("sg-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let p = run(&sh(&script), &env(), Duration::from_millis(500)).await;
        assert!(
            matches!(p.result, Err(ProbeError::Timeout)),
            "{:?}",
            p.result
        );
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone_within_5s(child), "the forked sleep outlived the check");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The pid a script wrote to `file`, waited for (a real process: a real clock).
    #[allow(clippy::disallowed_types)]
    fn pid_in(file: &std::path::Path) -> i32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
            assert!(std::time::Instant::now() < deadline, "no pid in {file:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A child detached from the output, of a command that exits 0 at once: killed with the group
    /// when the check ends, though nothing held the pipes open.
    #[tokio::test]
    async fn a_detached_child_of_a_passing_command_is_killed_with_its_group() {
        let dir = std::env::temp_dir().join(format!("sg-exec-detached-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("bg.pid");
        let script = format!(
            "sleep 300 >/dev/null 2>&1 </dev/null & echo $! > {}; exit 0",
            pidfile.display()
        );
        let p = run(&sh(&script), &env(), Duration::from_secs(30)).await;
        assert!(p.result.is_ok(), "{:?}", p.result);
        let child = pid_in(&pidfile);
        assert!(
            gone_within_5s(child),
            "the detached sleep outlived the check"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A probe dropped while its command runs (a reload, a stop) kills the command's whole group,
    /// not only the command. (Two threads: the test's waits block one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_probe_kills_the_commands_group() {
        let dir = std::env::temp_dir().join(format!("sg-exec-dropped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("bg.pid");
        let script = format!(
            "trap '' TERM; sleep 300 & echo $! > {}; wait",
            pidfile.display()
        );
        let probe =
            tokio::spawn(async move { run(&sh(&script), &env(), Duration::from_secs(300)).await });
        let child = pid_in(&pidfile);
        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        assert!(
            gone_within_5s(child),
            "the command's child outlived its probe"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether process `pid` is gone (or a zombie about to be reaped by init) within 5 s. A real
    /// process, so a real clock: the paused clock would not wait for it.
    #[allow(clippy::disallowed_types)]
    fn gone_within_5s(pid: i32) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            if stat.is_empty() || state == Some('Z') {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}
