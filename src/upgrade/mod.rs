//! Replacing the binary without losing a connection.
//!
//! The old process (on SIGUSR2, or asked by `sluicegate upgrade --pid`) starts the binary at its own
//! path with its own arguments and environment, its standard input one end of a socket pair with no
//! name (the hand-over socket; [`FROM_ENV`] says so), which no other process can reach. The new
//! process receives every listening socket on it (`wire`), reads the config, binds what is new,
//! accepts, and says it is ready; only then does the old one stop accepting, so no connection attempt
//! is refused: the sockets, and their queues, are the same. A new process that fails says why (or just
//! exits) and the old one goes on serving.
//!
//! Then the old process carries its connections over: each relay stops at a quiet point
//! (`relay::Quiesced`) and its two descriptors, what it held and its routing facts go to the new
//! process, which relays on (`session::resume`) and logs it once, `handed_over`. What cannot be carried
//! (TLS the process terminates or originates, a connection still connecting, a new process of another
//! session format) stays and drains as on a stop. The old process sends its totals, so counters go on,
//! and exits 0.

pub mod wire;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::control::{Control, Totals};
use crate::relay::Quiesced;
use crate::session::Carried;
use wire::{Channel, Done, Frame, Peer, SessionMeta, WireError, FORMAT};

/// The environment variable that tells a process an upgrade started it: [`FROM_STDIN`], or (set by
/// a process of an earlier release) the abstract name of a hand-over socket to connect to.
pub const FROM_ENV: &str = "SLUICEGATE_UPGRADE_FROM";

/// [`FROM_ENV`]'s value when the hand-over socket is the new process's standard input.
const FROM_STDIN: &str = "stdin";

/// For tests only (docs/operations.md says so): the step of the hand-over at which a process an
/// upgrade started kills itself (SIGKILL), as one that crashes there would die, so that the tests
/// can show what the old process does then: `before-ready` (its listeners taken), `after-ready`
/// (at the first message past the totals) or `carrying` (at the first carried connection).
const TEST_DIE_AT: &str = "SLUICEGATE_TEST_DIE_AT";

fn die_here_for_tests(step: &str) {
    if std::env::var_os(TEST_DIE_AT).is_some_and(|v| v == step) {
        use rustix::process::{getpid, kill_process, Signal};
        let _ = kill_process(getpid(), Signal::KILL);
    }
}

/// The binary and arguments this process started with: what an upgrade starts again. The path is
/// the one it was started by when that names a file (as nginx does: a symlink switched to a new
/// release is followed), else the one `/proc/self/exe` gave at start (afterwards it names the old,
/// replaced file).
#[derive(Debug, Clone)]
pub struct Origin {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Origin {
    pub fn of_this_process() -> std::io::Result<Origin> {
        let argv0 = std::env::args_os().next().map(PathBuf::from);
        // A path with a slash is a file (relative ones to the directory this process keeps); a bare
        // name was found on PATH, which may have changed: the resolved path then.
        if let Some(p) = argv0.filter(|p| p.components().count() > 1 && p.is_file()) {
            return Ok(Origin {
                exe: std::path::absolute(&p)?,
                args: std::env::args_os().skip(1).collect(),
            });
        }
        let exe = std::env::current_exe()?;
        // A binary replaced since start shows as "PATH (deleted)": the path is what is wanted.
        let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(p) => PathBuf::from(p),
            None => exe,
        };
        Ok(Origin {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Why an upgrade did not happen; the old process goes on serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("this process is PID 1 (a container's main process): its exit would end the container and the new process with it; upgrade by a rolling update instead")]
    Pid1,
    #[error("cannot open the hand-over socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start {exe}: {error}")]
    Spawn { exe: String, error: std::io::Error },
    #[error("the new process (pid {pid}) exited with {status} before it was ready")]
    Exited {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("the new process (pid {pid}) was not ready within {limit:?}; it was stopped")]
    Timeout { pid: u32, limit: Duration },
    #[error("the new process (pid {pid}) failed: {reason}")]
    Failed { pid: u32, reason: String },
    #[error("the hand-over with pid {pid} broke: {error}")]
    Wire { pid: u32, error: WireError },
    #[error("the new process (pid {pid}) exited with {status} during the hand-over, before it said it serves")]
    Died {
        pid: u32,
        status: std::process::ExitStatus,
    },
    #[error("a stop signal came before the new process (pid {pid}) was ready; it was stopped")]
    Abandoned { pid: u32 },
    #[error("the new process (pid {pid}) did not say it serves within {limit:?} of the last connection carried to it; it was stopped")]
    Unconfirmed { pid: u32, limit: Duration },
}

/// A request to upgrade (SIGUSR2, or `sluicegate upgrade`), answered with the new process's pid or
/// why there is none.
pub struct Request {
    pub reply: Option<Reply>,
}

/// Where a `sluicegate upgrade` request's answer goes.
pub struct Reply {
    answer: oneshot::Sender<Result<u32, String>>,
    /// Fires once the answer is written to the asker (or cannot be).
    written: oneshot::Receiver<()>,
}

/// How long an answer may take to reach its asker before the process goes on (and, after a
/// successful upgrade, exits) without waiting further.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

impl Reply {
    /// Answers, and waits (at most [`ANSWER_WAIT`]) until the answer is written: after a successful
    /// upgrade this process exits, which ends the task that writes it, and the asker would read
    /// nothing and report a failure for an upgrade that went through.
    pub async fn send(self, answer: Result<u32, String>) {
        if self.answer.send(answer).is_ok() {
            let _ = tokio::time::timeout(ANSWER_WAIT, self.written).await;
        }
    }
}

/// The old side once the new process accepts: the channel to it, and whether it takes connections.
pub(crate) struct Handing {
    channel: Arc<Channel>,
    pid: u32,
    carry: bool,
    /// It says `Serving` once it has taken what is carried (a build before that does not).
    confirms: bool,
    child: std::process::Child,
}

/// Starts the new process and hands it every listening socket (the services', and `admin`'s);
/// returns once it accepts on them. On an error the new process is gone (stopped if need be) and
/// nothing changed here. Setting `abandon` (a stop signal) stops it within 100 ms.
pub(crate) async fn start(
    origin: &Origin,
    control: &Arc<Control>,
    admin: Option<&std::net::TcpListener>,
    limit: Duration,
    abandon: Arc<AtomicBool>,
) -> Result<Handing, UpgradeError> {
    if std::process::id() == 1 {
        return Err(UpgradeError::Pid1);
    }
    let mut sockets = control.handover_sockets().map_err(UpgradeError::Socket)?;
    if let Some(a) = admin {
        sockets.push((
            Some("admin".to_string()),
            OwnedFd::from(a.try_clone().map_err(UpgradeError::Socket)?),
        ));
    }
    let origin = origin.clone();
    tokio::task::spawn_blocking(move || start_blocking(&origin, sockets, limit, abandon))
        .await
        .map_err(|e| UpgradeError::Socket(std::io::Error::other(e)))?
}

fn start_blocking(
    origin: &Origin,
    sockets: Vec<(Option<String>, OwnedFd)>,
    limit: Duration,
    abandon: Arc<AtomicBool>,
) -> Result<Handing, UpgradeError> {
    let deadline = tokio::time::Instant::now() + limit;
    // The hand-over has no name: the new process gets its end as standard input, so no other
    // process can connect and ask for the listening sockets.
    let (channel, theirs) = Channel::pair().map_err(UpgradeError::Socket)?;
    let child = std::process::Command::new(&origin.exe)
        .args(&origin.args)
        .env(FROM_ENV, FROM_STDIN)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::from(theirs))
        .spawn()
        .map_err(|error| UpgradeError::Spawn {
            exe: origin.exe.display().to_string(),
            error,
        })?;
    let mut new = Starting {
        pid: child.id(),
        child,
        deadline,
        limit,
        abandon,
    };
    tracing::info!(pid = new.pid, exe = %origin.exe.display(), "upgrade: started the new process");
    let result = new
        .hand_listeners(&channel, sockets)
        .and_then(|()| new.ready(channel));
    match result {
        Ok((channel, peer)) => Ok(Handing {
            channel: Arc::new(channel),
            pid: new.pid,
            carry: peer.format == FORMAT,
            confirms: peer.confirms,
            child: new.child,
        }),
        Err(e) => {
            stop_child(&mut new.child);
            Err(e)
        }
    }
}

/// The new process until it is ready: waited for in short steps, so that one that dies without a
/// word is seen at once, and never past the deadline.
struct Starting {
    child: std::process::Child,
    pid: u32,
    deadline: tokio::time::Instant,
    limit: Duration,
    abandon: Arc<AtomicBool>,
}

impl Starting {
    /// `Err` once it has exited or the deadline has passed.
    fn still_there(&mut self) -> Result<(), UpgradeError> {
        if self.abandon.load(SeqCst) {
            return Err(UpgradeError::Abandoned { pid: self.pid });
        }
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return Err(UpgradeError::Exited {
                pid: self.pid,
                status,
            });
        }
        if tokio::time::Instant::now() >= self.deadline {
            return Err(UpgradeError::Timeout {
                pid: self.pid,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn wire(&self, error: impl Into<WireError>) -> UpgradeError {
        UpgradeError::Wire {
            pid: self.pid,
            error: error.into(),
        }
    }

    /// The hello, then every listening socket.
    fn hand_listeners(
        &self,
        channel: &Channel,
        sockets: Vec<(Option<String>, OwnedFd)>,
    ) -> Result<(), UpgradeError> {
        channel
            .set_timeout(Some(SEND_LIMIT))
            .map_err(|e| self.wire(e))?;
        channel
            .send(&Frame::Hello(Peer::me()))
            .map_err(|e| self.wire(e))?;
        for (name, socket) in sockets {
            channel
                .send(&Frame::Listener { name, socket })
                .map_err(|e| self.wire(e))?;
        }
        channel.send(&Frame::ListenersEnd).map_err(|e| self.wire(e))
    }

    /// Its config read, its listeners bound: ready (and what it said of itself), or why not.
    fn ready(&mut self, channel: Channel) -> Result<(Channel, Peer), UpgradeError> {
        channel
            .set_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| self.wire(e))?;
        loop {
            match channel.recv() {
                Ok(Frame::Ready(r)) => {
                    // A new process that stops reading must not hold this one forever.
                    channel
                        .set_timeout(Some(SEND_LIMIT))
                        .map_err(|e| self.wire(e))?;
                    if r.format != FORMAT {
                        tracing::warn!(pid = self.pid, theirs = r.format, ours = FORMAT,
                            "upgrade: the new process speaks another session format: connections stay and drain here");
                    }
                    return Ok((channel, r));
                }
                Ok(Frame::Failed { reason }) => {
                    return Err(UpgradeError::Failed {
                        pid: self.pid,
                        reason,
                    })
                }
                Ok(other) => return Err(self.wire(WireError::Kind(kind_of(&other)))),
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.still_there()?;
                }
                Err(WireError::Closed) => {
                    // It closed the socket: it is exiting.
                    return Err(match exit_status_soon(&mut self.child) {
                        Some(status) => UpgradeError::Exited {
                            pid: self.pid,
                            status,
                        },
                        None => self.wire(WireError::Closed),
                    });
                }
                Err(error) => return Err(self.wire(error)),
            }
        }
    }
}

/// The status of a process that closed its end of the hand-over, and so is exiting: waited for
/// briefly (a second), `None` if it has not exited by then.
fn exit_status_soon(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    for _ in 0..50 {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A new process that is ready but will not take over (a stop signal came meanwhile): stopped.
pub(crate) async fn abandon(mut h: Handing) {
    let _ = tokio::task::spawn_blocking(move || stop_child(&mut h.child)).await;
}

/// A new process that is not taking over must not go on holding the sockets (its own accepts
/// would take clients from us): stopped and reaped.
fn stop_child(child: &mut std::process::Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// How long one message to the new process may take once it is ready.
const SEND_LIMIT: Duration = Duration::from_secs(5);

/// After [`start`], before anything changes here: the first totals sent, which proves the new
/// process still reads. On an error it is stopped and this process goes on as before.
pub(crate) async fn confirm(h: &mut Handing, control: &Control) -> Result<Totals, UpgradeError> {
    let before = control.totals();
    for part in before.parts() {
        if let Err(error) = send(&h.channel, Frame::Totals(to_json(&part))).await {
            stop_child(&mut h.child);
            return Err(UpgradeError::Wire {
                pid: h.pid,
                error: error.into(),
            });
        }
    }
    Ok(before)
}

/// The new process serves (it said so, having taken every connection carried to it): what
/// [`finish`] needs.
pub(crate) struct Served {
    channel: Arc<Channel>,
    pid: u32,
    carried: u64,
    /// It said it serves; `false` when a stop signal ended the hand-over first (this process
    /// drains and exits all the same; the new one goes on alone).
    pub(crate) confirmed: bool,
}

impl Served {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }
}

/// Why a hand-over that had begun did not end with the new process serving; this process accepts
/// again and serves on.
#[derive(Debug)]
pub(crate) struct HandOverFailed {
    pub(crate) error: UpgradeError,
    /// Connections sent to the new process before it was lost: lost with it.
    pub(crate) carried: u64,
}

/// What the watcher heard from the new process during the hand-over.
enum Heard {
    /// It has taken every connection carried and serves.
    Serving,
    /// It died, closed the hand-over or said something out of turn.
    Gone(UpgradeError),
    /// Told to stop listening (the hand-over gave up on its own account).
    Stopped,
}

/// The old side, after [`confirm`]: stops accepting, keeping its listening sockets; carries every
/// connection it can (bounded by `limit`; what stays drains in [`finish`]); then waits (bounded by
/// `limit` again) for the new process to say it serves. It watches the new process all along: if
/// it dies, closes the hand-over or does not answer in time, it is stopped, every connection not
/// yet sent to it goes on here, and this process accepts again on the sockets it kept.
///
/// `stop` (a stop signal) ends the waits at once: what is not yet sent stays here, and the new
/// process, which accepts, is not waited for ([`Served::confirmed`] is `false`).
pub(crate) async fn hand_over(
    h: Handing,
    control: &Arc<Control>,
    limit: Duration,
    stop: &CancellationToken,
) -> Result<Served, HandOverFailed> {
    control.pause_accepting().await;
    tracing::info!(
        pid = h.pid,
        open = control.open_connections(),
        "upgrade: the new process accepts; carrying connections over"
    );
    let Handing {
        channel,
        pid,
        carry,
        confirms,
        child,
    } = h;
    let child = Arc::new(std::sync::Mutex::new(child));
    // Set when the hand-over gives up: the watcher stops listening, the forwarder stops sending.
    let giving_up = Arc::new(AtomicBool::new(false));
    let mut watcher = {
        let (channel, child, stop) = (channel.clone(), child.clone(), giving_up.clone());
        tokio::task::spawn_blocking(move || watch(&channel, &child, pid, &stop))
    };
    let (heard, mut stopped, carried) = if carry {
        carry_over(control, &channel, &mut watcher, &giving_up, limit, stop).await
    } else {
        (None, false, 0)
    };
    let heard = match heard {
        Some(h) => h,
        None if stopped || !confirms => {
            // Stopped: not waited for. Or a build that does not say it serves: taken at its word.
            giving_up.store(true, SeqCst);
            let _ = watcher.await;
            Heard::Serving
        }
        None => {
            // A failure to send shows as the watcher's verdict (it hears the socket close).
            let _ = send(&channel, Frame::SessionsEnd { carried }).await;
            let (serving, stop_came) = wait_serving(watcher, &giving_up, pid, limit, stop).await;
            stopped = stop_came;
            serving
        }
    };
    let error = match heard {
        Heard::Serving => {
            return Ok(Served {
                channel,
                pid,
                carried,
                confirmed: !stopped,
            })
        }
        Heard::Gone(e) => e,
        Heard::Stopped => UpgradeError::Unconfirmed { pid, limit },
    };
    control.leaving.carrying_failed();
    let _ = tokio::task::spawn_blocking(move || stop_child(&mut crate::util::lock(&child))).await;
    control.accept_again();
    Err(HandOverFailed { error, carried })
}

/// The carrying part of [`hand_over`]: connections are sent to the new process (`forward`) until
/// every one has ended here or gone, bounded by `limit` (after which what stays drains), unless
/// the new process is lost meanwhile (the `watcher`'s verdict, returned) or `stop` comes (returned
/// as `true`); either of those sets `giving_up`. Also returns how many connections were sent.
async fn carry_over(
    control: &Arc<Control>,
    channel: &Arc<Channel>,
    watcher: &mut tokio::task::JoinHandle<Heard>,
    giving_up: &Arc<AtomicBool>,
    limit: Duration,
    stop: &CancellationToken,
) -> (Option<Heard>, bool, u64) {
    let mut heard = None;
    let mut stopped = false;
    let (tx, rx) = mpsc::unbounded_channel();
    control.carry_to(tx);
    let forwarder = {
        let (channel, control, stop) = (channel.clone(), control.clone(), giving_up.clone());
        tokio::task::spawn_blocking(move || forward(rx, &channel, &control, &stop))
    };
    // Every connection ends here, or goes: bounded by `limit`, after which what stays drains;
    // unless the new process is lost meanwhile.
    tokio::select! {
        _ = tokio::time::timeout(limit, control.all_gone()) => {}
        w = &mut *watcher => {
            heard = Some(heard_of(w));
            giving_up.store(true, SeqCst);
        }
        () = stop.cancelled() => {
            stopped = true;
            giving_up.store(true, SeqCst);
        }
    }
    control.leaving.stop_carrying();
    let carried = forwarder.await.unwrap_or(0);
    (heard, stopped, carried)
}

/// After the carrying, with the new process told how many connections went: waits for the
/// `watcher`'s verdict, bounded by `limit` (past it the new process is taken as lost) and ended
/// by `stop`, which counts as serving, not waited for (returned as `true`). When it stops waiting
/// before the verdict, it sets `giving_up` and waits for the watcher to stop listening.
async fn wait_serving(
    mut watcher: tokio::task::JoinHandle<Heard>,
    giving_up: &AtomicBool,
    pid: u32,
    limit: Duration,
    stop: &CancellationToken,
) -> (Heard, bool) {
    let waited = tokio::select! {
        w = tokio::time::timeout(limit, &mut watcher) => Some(w),
        () = stop.cancelled() => None,
    };
    match waited {
        Some(Ok(w)) => (heard_of(w), false),
        Some(Err(_)) => {
            giving_up.store(true, SeqCst);
            let _ = watcher.await;
            (Heard::Gone(UpgradeError::Unconfirmed { pid, limit }), false)
        }
        None => {
            giving_up.store(true, SeqCst);
            let _ = watcher.await;
            (Heard::Serving, true)
        }
    }
}

/// The watcher's verdict, or, if its task failed, the new process as lost.
fn heard_of(w: Result<Heard, tokio::task::JoinError>) -> Heard {
    w.unwrap_or_else(|e| Heard::Gone(UpgradeError::Socket(std::io::Error::other(e))))
}

/// Listens to the new process during the hand-over until it says it serves, or is lost (it exited,
/// closed the hand-over, or sent something out of turn), or `stop` is set: checked every 100 ms.
fn watch(
    channel: &Channel,
    child: &std::sync::Mutex<std::process::Child>,
    pid: u32,
    stop: &AtomicBool,
) -> Heard {
    let wire = |error| Heard::Gone(UpgradeError::Wire { pid, error });
    if let Err(e) = channel.set_recv_timeout(Some(Duration::from_millis(100))) {
        return wire(e.into());
    }
    let exited = |status| Heard::Gone(UpgradeError::Died { pid, status });
    loop {
        if stop.load(SeqCst) {
            return Heard::Stopped;
        }
        match channel.recv() {
            Ok(Frame::Serving) => return Heard::Serving,
            Ok(other) => return wire(WireError::Kind(kind_of(&other))),
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                if let Some(status) = crate::util::lock(child).try_wait().ok().flatten() {
                    return exited(status);
                }
            }
            Err(WireError::Closed) => {
                return match exit_status_soon(&mut crate::util::lock(child)) {
                    Some(status) => exited(status),
                    None => wire(WireError::Closed),
                }
            }
            Err(error) => return wire(error),
        }
    }
}

/// The old side, once the new process serves: closes its listening sockets, lets what stayed
/// drain, and sends the totals and the end. Returns how many connections the drain cut.
pub(crate) async fn finish(s: Served, before: Totals, control: &Arc<Control>) -> usize {
    control.close_listeners();
    let Served {
        channel,
        pid,
        carried,
        ..
    } = s;
    let stayed = control.open_connections() as u64;
    let cut = control.drain_from(true).await;
    let after = control.totals().since(&before);
    let mut sent = Ok(());
    for part in after.parts() {
        sent = sent.and(send(&channel, Frame::Totals(to_json(&part))).await);
    }
    let sent = sent.and(send(&channel, Frame::Done(Done { carried, stayed })).await);
    if let Err(e) = sent {
        tracing::warn!(error = %e, "upgrade: the last totals did not reach the new process");
    }
    tracing::info!(pid, carried, stayed, cut, "upgrade: handed over; exiting");
    cut
}

fn to_json(t: &Totals) -> serde_json::Value {
    serde_json::to_value(t).unwrap_or_default()
}

async fn send(channel: &Arc<Channel>, frame: Frame) -> std::io::Result<()> {
    let c = channel.clone();
    tokio::task::spawn_blocking(move || c.send(&frame))
        .await
        .map_err(std::io::Error::other)?
}

/// Sends each carried connection to the new process; one that cannot be sent (the new process gone)
/// goes on here, and so does every one after it, or after the hand-over gives up (`giving_up`).
/// Returns how many went. Runs until the channel closes (`stop_carrying`).
fn forward(
    mut rx: mpsc::UnboundedReceiver<Carried>,
    channel: &Channel,
    control: &Control,
    giving_up: &AtomicBool,
) -> u64 {
    let mut sent = 0;
    let mut broken = false;
    while let Some(c) = rx.blocking_recv() {
        if broken || giving_up.load(SeqCst) {
            control.resume(c);
            continue;
        }
        match send_session(channel, c) {
            Ok(()) => sent += 1,
            Err(failed) => {
                let (e, c) = *failed;
                tracing::warn!(error = %e, "upgrade: cannot carry a connection over; it goes on here");
                broken = true;
                control.leaving.stop_carrying();
                control.resume(c);
            }
        }
    }
    sent
}

fn send_session(channel: &Channel, c: Carried) -> Result<(), Box<(std::io::Error, Carried)>> {
    let meta = Box::new(SessionMeta {
        facts: c.facts.clone(),
        to_backend: c.held.to_backend.len(),
        to_client: c.held.to_client.len(),
        up_done: c.held.up_done,
        down_done: c.held.down_done,
        quiet_ms: c.held.quiet_for.as_millis() as u64,
    });
    let (client, backend) = match (c.client.try_clone(), c.backend.try_clone()) {
        (Ok(a), Ok(b)) => (OwnedFd::from(a), OwnedFd::from(b)),
        (Err(e), _) | (_, Err(e)) => return Err(Box::new((e, c))),
    };
    if let Err(e) = channel.send(&Frame::Session {
        meta,
        client,
        backend,
    }) {
        return Err(Box::new((e, c)));
    }
    // Once the session is sent, its bytes must follow: a failure now loses the connection (the
    // new process drops a session whose bytes do not arrive).
    for f in wire::chunks(&c.held.to_backend).chain(wire::chunks(&c.held.to_client)) {
        if let Err(e) = channel.send(&f) {
            tracing::warn!(error = %e, client = %c.facts.client, "upgrade: a carried connection's held bytes could not follow it");
            return Ok(());
        }
    }
    Ok(())
}

/// The new side: connected to the old process, its listening sockets offered for binding.
pub struct Incoming {
    channel: Channel,
    hello: Peer,
}

impl Incoming {
    /// When this process was started by an upgrade ([`FROM_ENV`]): connects to the old process and
    /// takes its listening sockets (offered to `sockets::take`). The variable is removed, so that a
    /// later upgrade of this process does not inherit it.
    pub fn from_env() -> Result<Option<Incoming>, UpgradeError> {
        let Some(name) = std::env::var_os(FROM_ENV) else {
            return Ok(None);
        };
        std::env::remove_var(FROM_ENV);
        let channel = if name == FROM_STDIN {
            Channel::from_stdin()
        } else {
            wire::connect(&name.to_string_lossy())
        }
        .map_err(UpgradeError::Socket)?;
        let pid = channel.peer_pid().unwrap_or(0);
        let wire = |error| UpgradeError::Wire { pid, error };
        channel
            .set_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| wire(e.into()))?;
        let hello = match channel.recv().map_err(wire)? {
            Frame::Hello(h) => h,
            other => return Err(wire(WireError::Kind(kind_of(&other)))),
        };
        loop {
            match channel.recv().map_err(wire)? {
                Frame::Listener { name, socket } => {
                    // A TCP listener or a UDP service's socket: the descriptor says which.
                    let socket = crate::sockets::Listening::from_fd(socket);
                    crate::sockets::offer(name, socket).map_err(UpgradeError::Socket)?;
                }
                Frame::ListenersEnd => break,
                other => return Err(wire(WireError::Kind(kind_of(&other)))),
            }
        }
        Ok(Some(Incoming { channel, hello }))
    }

    /// The pid of the process this one replaces.
    pub fn from_pid(&self) -> u32 {
        self.hello.pid
    }

    /// Tells the old process this one cannot take over (it goes on serving), and why.
    pub fn fail(self, reason: &str) {
        let _ = self.channel.send(&Frame::Failed {
            reason: reason.to_string(),
        });
    }

    /// Tells the old process this one accepts (it stops accepting), then takes the connections it
    /// carries over and its totals, on a thread of its own, until it is done.
    pub(crate) fn take_over(
        self,
        control: Arc<Control>,
        taking: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let from = self.hello.pid;
        die_here_for_tests("before-ready");
        let ready = Frame::Ready(Peer::me());
        // Taking over from the moment the old process may hear it.
        taking.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.channel.send(&ready) {
            taking.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(from, error = %e, "upgrade: cannot tell the old process this one is ready");
            return;
        }
        let _ = self.channel.set_timeout(None);
        let still = taking.clone();
        let spawned = std::thread::Builder::new()
            .name("sluicegate-upgrade".into())
            .spawn(move || {
                receive(&self.channel, &control, from);
                still.store(false, std::sync::atomic::Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            taking.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, "upgrade: cannot start the thread that takes connections over");
        }
    }
}

fn kind_of(f: &Frame) -> u8 {
    f.encode().0.get(2).copied().unwrap_or(0)
}

/// Takes what the old process sends until it is done (or gone).
fn receive(channel: &Channel, control: &Control, from: u32) {
    let mut resumed = 0u64;
    loop {
        let frame = channel.recv();
        if let Ok(f) = &frame {
            if matches!(f, Frame::Session { .. }) {
                die_here_for_tests("carrying");
            }
            if !matches!(f, Frame::Totals(_)) {
                die_here_for_tests("after-ready");
            }
        }
        match frame {
            Ok(Frame::Session {
                meta,
                client,
                backend,
            }) => match session_bytes(channel, &meta) {
                Ok(held) => {
                    let carried = Carried {
                        client: std::net::TcpStream::from(client),
                        backend: std::net::TcpStream::from(backend),
                        held: Quiesced {
                            to_backend: held.0,
                            to_client: held.1,
                            up_done: meta.up_done,
                            down_done: meta.down_done,
                            quiet_for: Duration::from_millis(meta.quiet_ms),
                        },
                        facts: meta.facts,
                    };
                    control.resume(carried);
                    resumed += 1;
                }
                Err(e) => {
                    tracing::warn!(from, error = %e, client = %meta.facts.client, "upgrade: a carried connection's bytes did not arrive; closing it");
                }
            },
            Ok(Frame::Totals(v)) => match serde_json::from_value::<Totals>(v) {
                Ok(t) => control.add_totals(&t),
                Err(e) => {
                    tracing::warn!(from, error = %e, "upgrade: the old process's totals do not parse")
                }
            },
            Ok(Frame::SessionsEnd { carried }) => {
                // Every carried connection is taken (each resumed as it came): the old process
                // keeps its listening sockets until it hears this.
                if let Err(e) = channel.send(&Frame::Serving) {
                    tracing::warn!(from, error = %e, "upgrade: cannot tell the old process this one serves");
                    return;
                }
                tracing::info!(
                    from,
                    carried,
                    resumed,
                    "upgrade: every carried connection taken; serving"
                );
            }
            Ok(Frame::Done(d)) => {
                tracing::info!(
                    from,
                    carried = d.carried,
                    stayed = d.stayed,
                    resumed,
                    "upgrade: the old process is done"
                );
                return;
            }
            Ok(other) => {
                tracing::warn!(
                    from,
                    kind = kind_of(&other),
                    "upgrade: unexpected message; ignored"
                );
            }
            Err(WireError::Closed) => {
                tracing::info!(
                    from,
                    resumed,
                    "upgrade: the old process closed the hand-over"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(from, error = %e, resumed, "upgrade: the hand-over broke");
                return;
            }
        }
    }
}

/// The held bytes that follow a `Session`, both directions.
fn session_bytes(channel: &Channel, meta: &SessionMeta) -> Result<(Vec<u8>, Vec<u8>), WireError> {
    let total = meta.to_backend + meta.to_client;
    let mut all = Vec::with_capacity(total.min(16 << 20));
    while all.len() < total {
        match channel.recv()? {
            Frame::Chunk(c) => all.extend_from_slice(&c),
            other => return Err(WireError::Kind(kind_of(&other))),
        }
    }
    if all.len() != total {
        return Err(WireError::Truncated);
    }
    let to_client = all.split_off(meta.to_backend);
    Ok((all, to_client))
}

/// Tells systemd (a `Type=notify` unit, `NOTIFY_SOCKET`) this process's state: `READY=1` once it
/// serves, with `MAINPID` after an upgrade so that it follows the new process. No-op elsewhere.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let path = path.to_string_lossy();
        let addr = match path.strip_prefix('@') {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
            None => std::os::unix::net::SocketAddr::from_pathname(&*path)?,
        };
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        s.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `sluicegate upgrade --pid PID`'s side: asks the process `pid` to upgrade and waits for the
/// answer: the new process's pid, or why there is none.
pub fn request(pid: u32, wait: Duration) -> Result<u32, String> {
    use std::io::{BufRead, Write};
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(control_name(pid).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(|e| {
        format!("cannot reach sluicegate pid {pid} ({e}): is it running, as this user, in this network namespace?")
    })?;
    // The name is predictable: whoever holds it must be the process asked for, and trusted.
    let cred = rustix::net::sockopt::socket_peercred(&s).map_err(|e| e.to_string())?;
    let (got, uid) = (cred.pid.as_raw_nonzero().get() as u32, cred.uid);
    if got != pid || !(uid == rustix::process::getuid() || uid.is_root()) {
        return Err(format!(
            "the control socket of pid {pid} is held by pid {got} (uid {}): not asking it",
            uid.as_raw()
        ));
    }
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    // A refusal (another user's request) may come, and the socket close, before the request is
    // written: the write then fails (EPIPE), and the answer, already here, says why.
    let wrote = s.write_all(b"upgrade\n");
    let mut line = String::new();
    let read = std::io::BufReader::new(s).read_line(&mut line);
    if line.is_empty() {
        return Err(match (wrote, read) {
            (Err(e), _) | (Ok(()), Err(e)) => format!("no answer from pid {pid}: {e}"),
            (Ok(()), Ok(_)) => format!("no answer from pid {pid}: it closed the control socket"),
        });
    }
    let line = line.trim_end();
    if let Some(p) = line.strip_prefix("ok ") {
        return p.parse().map_err(|_| format!("a bad answer: {line:?}"));
    }
    Err(line.strip_prefix("failed ").unwrap_or(line).to_string())
}

/// The longest request line read from the control socket (`upgrade\n` is all there is): what a
/// stranger sends beyond it is not buffered.
const REQUEST_MAX: u64 = 64;

/// The abstract socket on which a running sluicegate takes upgrade requests.
fn control_name(pid: u32) -> String {
    format!("sluicegate-control-{pid}")
}

/// Takes `sluicegate upgrade` requests on this process's control socket (from the same user, or
/// root) and passes them on; each is answered when the upgrade succeeded or failed.
pub fn listen_for_requests(to: mpsc::Sender<Request>) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(
        control_name(std::process::id()).as_bytes(),
    )?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    l.set_nonblocking(true)?;
    let l = tokio::net::UnixListener::from_std(l)?;
    let me = rustix::process::getuid();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // Out of descriptors, most likely: try again a little later, not at once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let to = to.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
                let allowed = s
                    .peer_cred()
                    .map(|c| c.uid() == me.as_raw() || c.uid() == 0)
                    .unwrap_or(false);
                // The request is read before any answer, a refusal too: closing with it unread
                // would reset the asker's socket, and it would see "Broken pipe", not why.
                let mut line = String::new();
                let (r, mut w) = s.split();
                let mut r = tokio::io::BufReader::new(r.take(REQUEST_MAX));
                let read =
                    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
                if !allowed {
                    let why = format!(
                        "failed refused: the running sluicegate (pid {}) belongs to uid {}; run upgrade as that user or root\n",
                        std::process::id(),
                        me.as_raw()
                    );
                    let _ = w.write_all(why.as_bytes()).await;
                    return;
                }
                if !matches!(read, Ok(Ok(_))) || line.trim() != "upgrade" {
                    let _ = w.write_all(b"failed unknown request\n").await;
                    return;
                }
                let (tx, rx) = oneshot::channel();
                let (written, written_rx) = oneshot::channel();
                let reply = Reply {
                    answer: tx,
                    written: written_rx,
                };
                let answer = match to.send(Request { reply: Some(reply) }).await {
                    Ok(()) => rx.await.unwrap_or(Err("the server is stopping".into())),
                    Err(_) => Err("the server is stopping".into()),
                };
                let line = match answer {
                    Ok(pid) => format!("ok {pid}\n"),
                    Err(why) => format!("failed {}\n", why.replace('\n', " ")),
                };
                let _ = w.write_all(line.as_bytes()).await;
                let _ = written.send(());
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sluicegate upgrade` against this process's control socket: the answer is written before
    /// `Reply::send` returns, so a process that exits right after answering (as a successful
    /// upgrade's old process does) has already told its asker. The runtime is dropped as soon as
    /// `send` returns, ending every task on it: without the wait, the task that writes the answer
    /// would not have run, and the asker would read nothing.
    #[test]
    fn an_answer_reaches_its_asker_before_the_process_may_exit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        rt.block_on(async { listen_for_requests(tx) }).unwrap();
        let pid = std::process::id();
        let asker = std::thread::spawn(move || request(pid, Duration::from_secs(10)));
        rt.block_on(async {
            let request = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a request within 10 s")
                .expect("the listener is running");
            request
                .reply
                .expect("a request from the control socket has a reply")
                .send(Ok(4242))
                .await;
        });
        drop(rt);
        assert_eq!(asker.join().unwrap(), Ok(4242));
    }
}
