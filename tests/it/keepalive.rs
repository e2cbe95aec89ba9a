//! How a dead or silent peer is let go (issue 68): TCP keepalive and user_timeout on the balancer's
//! sockets, seen by `ss` on both sides of a connection; a backend behind a path that drops every
//! packet (in a network namespace the test makes) found dead by keepalive; and `first_byte_timeout`
//! closing a client that sends nothing, its backend connection freed, while one that sends goes on.
//! Each on the ring workers and on a tokio engine.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluicegate::config::RelayMode;
use sluicegate::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::cli::Sg;
use crate::common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The keepalive timer `ss` shows on the established socket from `local` to `peer` (`None`: no
/// such socket, or another timer runs on it now, as while bytes wait for an ACK).
fn keepalive_left(local: Option<SocketAddr>, peer: SocketAddr) -> Option<Duration> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().find_map(|line| {
        // Recv-Q, Send-Q, local, peer, then the timer.
        let f: Vec<&str> = line.split_whitespace().collect();
        let ours = f.get(3) == Some(&peer.to_string().as_str())
            && local.is_none_or(|l| f.get(2) == Some(&l.to_string().as_str()));
        if !ours {
            return None;
        }
        let timer = f.iter().find_map(|x| x.strip_prefix("timer:(keepalive,"))?;
        ss_duration(timer.split(',').next()?)
    })
}

/// `ss`'s way of writing a timer: `36sec`, `1min5sec`, `986ms`.
fn ss_duration(t: &str) -> Option<Duration> {
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    let (min, rest) = match t.split_once("min") {
        Some((m, rest)) => (m.parse::<u64>().ok()?, rest),
        None => (0, t),
    };
    let sec = match rest.strip_suffix("sec") {
        Some(s) => s.parse::<u64>().ok()?,
        None if rest.is_empty() => 0,
        None => return None,
    };
    Some(SECS(min * 60 + sec))
}

#[test]
fn ss_timers_are_read() {
    assert_eq!(ss_duration("36sec"), Some(SECS(36)));
    assert_eq!(ss_duration("1min5sec"), Some(SECS(65)));
    assert_eq!(ss_duration("1min"), Some(SECS(60)));
    assert_eq!(ss_duration("986ms"), Some(Duration::from_millis(986)));
    assert_eq!(ss_duration("soon"), None);
}

/// Waits until `ss` shows a keepalive timer on the socket from `local` to `peer` that started at
/// `idle` (it counts down from there; `timer:(keepalive,36sec,0)` for 37 s).
async fn wait_keepalive(what: &str, local: Option<SocketAddr>, peer: SocketAddr, idle: u64) {
    let limit = SECS(10);
    let r = tokio::time::timeout(limit, async {
        loop {
            if let Some(left) = keepalive_left(local, peer) {
                assert!(
                    left <= SECS(idle) && left > SECS(idle - 10),
                    "{what}: keepalive timer at {left:?}, the configured idle is {idle}s"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let shown = String::from_utf8_lossy(&Command::new("ss").arg("-tnoH").output().unwrap().stdout)
        .to_string();
    assert!(
        r.is_ok(),
        "{what}: no keepalive timer on {local:?} -> {peer} within {limit:?}:\n{shown}"
    );
}

/// Sends `msg` on `c` and waits for it to come back whole (from an echo backend).
async fn echoed(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    within(SECS(5), "the echo", c.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(got, msg);
}

/// `keepalive` on the client's socket and `backend_keepalive` on the backend's, each with its own
/// idle, as `ss -tno` shows them; a service without them sets neither.
async fn keepalive_on_both_sockets(mode: RelayMode) {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let extra = "keepalive: {idle: 37s, interval: 5s, count: 3}\nbackend_keepalive: {idle: 43s}\nuser_timeout: 20s";
    let proxy = Proxy::start(&service_yaml(&[backend.addr], mode, extra)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    echoed(&mut c, b"ping").await;
    let client = c.local_addr().unwrap();
    wait_keepalive("the client's side", Some(proxy.addr), client, 37).await;
    // The balancer's socket to the backend is the only one whose peer is the backend.
    wait_keepalive("the backend's side", None, backend.addr, 43).await;

    let plain = Proxy::start(&service_yaml(&[backend.addr], mode, "")).await;
    let mut c = TcpStream::connect(plain.addr).await.unwrap();
    echoed(&mut c, b"ping").await;
    let client = c.local_addr().unwrap();
    assert_eq!(
        keepalive_left(Some(plain.addr), client),
        None,
        "off by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_set_on_both_sockets_on_the_ring() {
    keepalive_on_both_sockets(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_is_set_on_both_sockets_on_epoll() {
    keepalive_on_both_sockets(RelayMode::Epoll).await;
}

/// A network namespace with a veth pair to it, removed by name when dropped (the test failing
/// included): the backend lives there, on an address of a private range only this test uses.
struct Netns {
    name: String,
    host_if: String,
    /// The balancer's side, and the backend's.
    ours: String,
    theirs: String,
}

/// Runs `ip`/`nft` with `args`: why it failed, if it did.
fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd} {args:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

impl Netns {
    /// A namespace named for this process and `tag`, reached over 10.213.`net`.0/30.
    fn make(tag: &str, net: u8) -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("sgka-{id}-{tag}"),
            host_if: format!("sgka{id}{tag}"),
            ours: format!("10.213.{net}.1"),
            theirs: format!("10.213.{net}.2"),
        };
        // Left by an earlier run that was killed: gone before it is made again.
        ns.remove();
        let peer_if = format!("{}p", ns.host_if);
        run("ip", &["netns", "add", &ns.name])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer_if,
            ],
        )?;
        run("ip", &["link", "set", &peer_if, "netns", &ns.name])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", ns.ours),
                "dev",
                &ns.host_if,
            ],
        )?;
        run("ip", &["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.theirs), "dev", &peer_if])?;
        inside(&["link", "set", &peer_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Every packet into the namespace dropped: its backend neither answers nor resets.
    fn drop_everything(&self) -> Result<(), String> {
        let nft = |rule: &str| run("ip", &["netns", "exec", &self.name, "nft", rule]);
        nft("add table inet sgka")?;
        nft("add chain inet sgka in { type filter hook input priority 0 ; policy drop ; }")
    }

    fn remove(&self) {
        // Deleting the namespace takes its end of the pair, and with it ours.
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = run("ip", &["link", "del", &self.host_if]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An echo server: binds the address it is given, prints its port, echoes on every connection.
const ECHO: &str = r#"
import socket, sys, threading
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
def serve(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// An echo server in `ns` on its address (python3, a thread per connection): its port, and the
/// process, killed when dropped.
struct NsEcho {
    child: std::process::Child,
    port: u16,
}

impl NsEcho {
    fn start(ns: &Netns) -> Result<NsEcho, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", ECHO, &ns.theirs])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("python3 in the namespace: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .map_err(|e| e.to_string())?;
        let port = line
            .trim()
            .parse()
            .map_err(|_| format!("the echo server said {line:?}"))?;
        Ok(NsEcho { child, port })
    }
}

impl Drop for NsEcho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace and its echo server, or why there is none: the test then skips, unless
/// `SLUICEGATE_REQUIRE_NETNS=1` (CI) makes that a failure.
fn namespace_with_backend(tag: &str, net: u8) -> Option<(Netns, NsEcho)> {
    let made = Netns::make(tag, net).and_then(|ns| Ok((NsEcho::start(&ns)?, ns)));
    match made {
        Ok((echo, ns)) => Some((ns, echo)),
        Err(why) => {
            require_tool(
                "NETNS",
                Some(format!("cannot make a network namespace: {why}")),
            );
            None
        }
    }
}

/// A backend behind a path that starts dropping every packet is found dead by the balancer's
/// keepalive (idle 1 s, interval 1 s, 2 probes): the connection ends as `keepalive_timeout`
/// within idle + interval × count (a little more for the scheduler), and the client is reset.
/// Without `backend_keepalive` the same connection would sit until `idle_timeout` (an hour).
async fn a_vanished_backend_is_found_by_keepalive(mode: RelayMode, tag: &str, net: u8) {
    // 1 s idle + 2 × 1 s probes.
    let extra = "backend_keepalive: {idle: 1s, interval: 1s, count: 2}";
    a_vanished_backend_is_found(mode, (tag, net), extra, SECS(3), false).await;
}

/// The backend behind the dropped path found dead by `user_timeout` alone (no keepalive): the
/// client's bytes sent after the drop go unacknowledged, and the kernel gives the backend up
/// `user_timeout` after: `keepalive_timeout` too.
async fn a_vanished_backend_is_found_by_user_timeout(mode: RelayMode, tag: &str, net: u8) {
    a_vanished_backend_is_found(mode, (tag, net), "user_timeout: 2s", SECS(2), true).await;
}

/// The backend in a namespace ([`Netns`]), the service with `extra`; after an echo every packet
/// into the namespace is dropped (and with `send`, the client sends more): the connection must
/// end as `keepalive_timeout` within `found` (a little more allowed for a loaded machine, not
/// for the mechanism), the client reset and the backend's slot freed.
async fn a_vanished_backend_is_found(
    mode: RelayMode,
    (tag, net): (&str, u8),
    extra: &str,
    found: Duration,
    send: bool,
) {
    let Some((ns, echo)) = namespace_with_backend(tag, net) else {
        return;
    };
    let backend: SocketAddr = format!("{}:{}", ns.theirs, echo.port).parse().unwrap();
    let proxy = Proxy::start(&service_yaml(&[backend], mode, extra)).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    echoed(&mut c, b"hello").await;
    ns.drop_everything().expect("a drop rule in the namespace");
    if send {
        c.write_all(b"into the void").await.unwrap();
    }
    let limit = found + SECS(4);
    let mut buf = [0u8; 16];
    let read = within(limit, "the client's end", c.read(&mut buf)).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{mode:?}: the client is reset, got {read:?} ({})",
        proxy.ended_so_far()
    );
    proxy.wait_ended(Outcome::KeepaliveTimeout, 1).await;
    wait_for(SECS(5), "the backend's slot freed", || {
        proxy.active_to_backends() == 0
    })
    .await;
    drop(echo);
    drop(ns);
}

/// On the ring workers, then on epoll, each with a namespace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_behind_a_dropped_path_ends_as_keepalive_timeout() {
    for (mode, tag, net) in [(RelayMode::Ring, "r", 1), (RelayMode::Epoll, "e", 2)] {
        a_vanished_backend_is_found_by_keepalive(mode, tag, net).await;
    }
}

/// On the ring workers, then on epoll, each with a namespace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_behind_a_dropped_path_is_given_up_at_user_timeout() {
    for (mode, tag, net) in [(RelayMode::Ring, "ur", 3), (RelayMode::Epoll, "ue", 4)] {
        a_vanished_backend_is_found_by_user_timeout(mode, tag, net).await;
    }
}

/// A backend that tells when each connection it took ends (EOF or reset), and echoes until then.
async fn telling_backend() -> (Backend, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let backend = Backend::start([127, 0, 0, 2], move |s| {
        let tx = tx.clone();
        async move {
            echo(s).await;
            let _ = tx.send(());
        }
    })
    .await;
    (backend, rx)
}

/// The admin API's `GET /backends`: the backend's `active`.
async fn active_on(admin: SocketAddr) -> u64 {
    let list = http::get(admin, "/backends").await.json();
    list.as_array()
        .and_then(|l| l.first())
        .and_then(|b| b["active"].as_u64())
        .unwrap_or(u64::MAX)
}

/// `first_byte_timeout: 1s` through the binary: a client that connects first and sends at once is
/// not cut; one that connects after it and sends nothing is closed (it reads the end), its routing
/// line says `first_byte_timeout`, its backend sees its connection end and `GET /backends` shows
/// it freed. The talker's deadline passed before the silent one's, so seeing the silent one cut
/// shows the talker outlived its own.
async fn a_silent_client_is_closed_at_first_byte_timeout(relay: &str) {
    let (backend, mut ended) = telling_backend().await;
    let yaml = format!(
        "log: {{level: info, format: json}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nshutdown: {{drain_timeout: 5s}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: {relay}\n    first_byte_timeout: 1s\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    let mut sg = tokio::task::block_in_place(|| Sg::start(&yaml));
    let admin: SocketAddr = tokio::task::block_in_place(|| {
        sg.wait_line(SECS(5), |l| l["msg"] == "admin API listening")["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    });
    let metrics = http::get(admin, "/metrics").await.body;
    if relay == "ring" && !io_uring_may_be_missing() {
        assert!(
            metrics.contains("relay=\"ring\""),
            "the ring workers run the service"
        );
    }
    let mut talker = TcpStream::connect(sg.addr).await.unwrap();
    echoed(&mut talker, b"hi").await;
    let mut silent = TcpStream::connect(sg.addr).await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    wait_until(SECS(5), "both connected to the backend", || async {
        active_on(admin).await == 2
    })
    .await;
    let mut buf = [0u8; 8];
    let read = within(SECS(10), "the silent client's close", silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "{relay}: the silent client is closed, read {read:?}"
    );
    within(SECS(5), "the backend sees its end", ended.recv())
        .await
        .expect("told");
    wait_until(SECS(5), "GET /backends active back to 1", || async {
        active_on(admin).await == 1
    })
    .await;
    let line: Value = tokio::task::block_in_place(|| {
        sg.wait_line(SECS(5), |l| {
            l["target"] == "sluicegate::route"
                && l["client"]
                    .as_str()
                    .is_some_and(|c| c.ends_with(&format!(":{silent_port}")))
        })
    });
    assert_eq!(line["end"], "first_byte_timeout", "{relay}: {line}");
    // The talker goes on, past its own deadline.
    echoed(&mut talker, b"again").await;
    drop(talker);
    within(SECS(5), "the backend sees the talker's end", ended.recv())
        .await
        .expect("told");
    tokio::task::block_in_place(|| {
        let l = sg.wait_line(SECS(5), |l| {
            l["target"] == "sluicegate::route" && l["end"] == "client_closed"
        });
        assert_eq!(l["bytes_up"], 7, "{l}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_first_byte_timeout_on_the_ring() {
    a_silent_client_is_closed_at_first_byte_timeout("ring").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_first_byte_timeout_on_epoll() {
    a_silent_client_is_closed_at_first_byte_timeout("epoll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_at_first_byte_timeout_on_copy() {
    a_silent_client_is_closed_at_first_byte_timeout("copy").await;
}

/// A connection carried into the new process at an upgrade keeps the keepalive the old process
/// set on both its sockets (they are passed, not copied: nothing is set again), on either engine.
async fn keepalive_across_an_upgrade(relay: &str) {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = format!(
        "log: {{level: info, format: json}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: {relay}\n    keepalive: {{idle: 37s}}\n    backend_keepalive: {{idle: 43s}}\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    let sg = tokio::task::block_in_place(|| Sg::start(&yaml));
    let addr = sg.addr;
    let mut c = TcpStream::connect(addr).await.unwrap();
    echoed(&mut c, b"before").await;
    let client = c.local_addr().unwrap();
    let (mut sg, _new) = tokio::task::spawn_blocking(move || {
        let mut sg = sg;
        let new = crate::upgrade::upgrade(&mut sg);
        (sg, new)
    })
    .await
    .unwrap();
    let done = sg.wait_line(SECS(10), |l| l["msg"] == "upgrade: handed over; exiting");
    assert_eq!(done["carried"], 1, "{relay}: {done}");
    echoed(&mut c, b"after!").await;
    wait_keepalive("the carried client's side", Some(addr), client, 37).await;
    wait_keepalive("the carried backend's side", None, backend.addr, 43).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_survives_an_upgrade() {
    for relay in ["ring", "epoll"] {
        keepalive_across_an_upgrade(relay).await;
    }
}

/// A client that sent at once but waited in the queue past its `first_byte_timeout` (every backend
/// full) has spoken: when a slot frees and its relay starts, after its deadline, its bytes still
/// unread in its socket, it is relayed, not cut. (Asked of the relay's flows alone, the ring's
/// tick could come before the client's first receive completed and cut it.)
async fn a_client_that_spoke_while_queued_is_not_cut(mode: RelayMode) {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = service_yaml(
        &[backend.addr],
        mode,
        "first_byte_timeout: 200ms\nqueue: {max: 4, timeout: 10s}",
    )
    .replace("\"}", "\", max_connections: 1}");
    let proxy = Proxy::start(&yaml).await;
    let mut holder = TcpStream::connect(proxy.addr).await.unwrap();
    echoed(&mut holder, b"hold").await;
    let mut queued = TcpStream::connect(proxy.addr).await.unwrap();
    queued.write_all(b"queued").await.unwrap();
    // Its deadline passes while it waits (the scenario, not a wait for readiness).
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(holder);
    let mut got = [0u8; 6];
    let read = within(
        SECS(5),
        "the queued client's echo",
        queued.read_exact(&mut got),
    )
    .await;
    assert!(
        read.is_ok(),
        "{mode:?}: relayed, not cut: {read:?} ({})",
        proxy.ended_so_far()
    );
    assert_eq!(&got, b"queued");
    assert_eq!(proxy.service.stats.ended(Outcome::FirstByteTimeout), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_spoke_while_queued_is_not_cut_on_the_ring() {
    a_client_that_spoke_while_queued_is_not_cut(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_spoke_while_queued_is_not_cut_on_epoll() {
    a_client_that_spoke_while_queued_is_not_cut(RelayMode::Epoll).await;
}
