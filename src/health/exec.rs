//! `kind: exec`: a command sluicegate runs to check a backend, for what a connection cannot tell
//! (a replication lag, a quorum, a file on a shared disk). Exit status 0 is up.
//!
//! Run without a shell (`command` is the argument vector), with standard input closed, in a process
//! group of its own, and an environment of only `PATH`, `LANG` and the backend's
//! `SLUICEGATE_BACKEND_ADDRESS`, `SLUICEGATE_BACKEND_HOST`, `SLUICEGATE_BACKEND_PORT` and
//! `SLUICEGATE_SERVICE` (nothing of sluicegate's own environment, such as its admin token, leaks to
//! it). At the timeout its whole process group is killed, so a command that forks cannot leave work
//! running; so is a group whose leader exited while a child it left holds its output open (the
//! leader's exit status decides). Its output is kept, a timed-out command's too. At most [`MAX_RUNNING`] commands run at once in the process: a probe that finds no slot
//! within its timeout fails without a verdict (`ProbeError::Local`), like a probe out of sockets.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::{ProbeError, Probed, OUTPUT_KEPT};

/// Commands running at once, across every service: each is a process.
pub(crate) const MAX_RUNNING: usize = 16;

static SLOTS: Semaphore = Semaphore::const_new(MAX_RUNNING);

/// How long the pipes may stay open after the command exited (held by a child it left running).
const PIPE_GRACE: Duration = Duration::from_millis(100);

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

/// Runs `command` for the backend `env` describes, bounded by `timeout` (waiting for a slot
/// included); its output (standard output, then standard error) is captured, the first
/// [`OUTPUT_KEPT`] bytes of it kept.
pub(super) async fn run(command: &[String], env: &Env<'_>, timeout: Duration) -> Probed {
    let deadline = tokio::time::Instant::now() + timeout;
    let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, SLOTS.acquire()).await else {
        return Probed {
            result: Err(ProbeError::Local(std::io::Error::other(format!(
                "{MAX_RUNNING} health commands running already"
            )))),
            output: None,
        };
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
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(spawn_failure(program, e)),
    };
    let group = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (status, pipes_open) = {
        let pipes = async { tokio::join!(capture(stdout, &mut out), capture(stderr, &mut err)) };
        let work = async {
            tokio::pin!(pipes);
            tokio::select! {
                () = async { (&mut pipes).await; } => (child.wait().await, false),
                status = child.wait() => {
                    // A child of the command may hold the pipes after the command exited: its
                    // status decides, and what it wrote so far is kept.
                    let open = tokio::time::timeout(PIPE_GRACE, pipes).await.is_err();
                    (status, open)
                }
            }
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(done) => done,
            Err(_) => (Err(std::io::ErrorKind::TimedOut.into()), true),
        }
    };
    if pipes_open {
        // Something in the group still runs: the probe is over, so is it.
        kill_group(group);
    }
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

/// Kills the process group the command leads (its own children included); the child itself is
/// killed again, and reaped, when it is dropped (`kill_on_drop`).
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
