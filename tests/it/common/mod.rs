//! Shared test fixtures: an in-process sluicegate, fake backends on 127.0.0.x, deterministic payloads,
//! and waits that end on a condition or a timeout (never a fixed sleep for readiness).
#![allow(dead_code)]

pub mod databases;
pub mod dns;
pub mod docker;
pub mod fleet;
pub mod http;
pub mod knot;
pub mod load_tool;
pub mod pki;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sluicegate::config::{Config, RelayMode};
use sluicegate::service::Service;
use sluicegate::{Server, Stopped};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

/// The engines the scenarios below `relay.rs` run on in turn (`epoll` is `copy`, then `splice`).
pub const ENGINES: [RelayMode; 3] = [RelayMode::Copy, RelayMode::Splice, RelayMode::Ring];

/// Whether io_uring may be missing here on purpose (`SLUICEGATE_TEST_NO_IO_URING=1`, for a kernel
/// or a sandbox without it): only then may a test of the ring workers, or of `auto`, see its
/// service run `epoll` and go on. `.ci/run` sets it only after a probe found no io_uring.
pub fn io_uring_may_be_missing() -> bool {
    std::env::var("SLUICEGATE_TEST_NO_IO_URING").is_ok_and(|v| v == "1")
}

/// Fails the test when the ring workers did not run a service that asked for them (`relay: ring`,
/// or `auto` where it fits) unless io_uring may be missing: a test of an engine must not pass on
/// another one.
pub fn assert_on_ring(service: &Service, asked: &str) {
    let runs = service.view().relay;
    if runs != "ring" {
        assert!(
            io_uring_may_be_missing(),
            "service {} asked for {asked} and runs {runs}: the ring workers did not run (io_uring \
             unavailable? set SLUICEGATE_TEST_NO_IO_URING=1 where that is expected)",
            service.name
        );
        eprintln!("SLUICEGATE_TEST_NO_IO_URING=1: {asked} runs {runs} here");
    }
}

/// Lifts the soft descriptor limit to the hard one: the large scenarios hold thousands of sockets.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Every TCP socket of this network namespace, as /proc/net/tcp and tcp6 list it: its local and
/// remote address (as the kernel writes them, see [`proc_net_addr`]), its state (the kernel's hex
/// code, e.g. [`TCP_TIME_WAIT`]) and its inode ("0" once no descriptor holds it).
struct ProcTcp {
    local: String,
    remote: String,
    state: u8,
    inode: String,
}

/// Reads them now.
fn proc_tcp_sockets() -> Vec<ProcTcp> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            if let Ok(state) = u8::from_str_radix(cols[3], 16) {
                out.push(ProcTcp {
                    local: cols[1].to_string(),
                    remote: cols[2].to_string(),
                    state,
                    inode: cols[9].to_string(),
                });
            }
        }
    }
    out
}

/// The TCP sockets with one of `addrs` (address and port) at either end. Exact addresses: another
/// test's socket on the same port number of another 127.0.0.x (backends of concurrent tests share
/// port numbers across addresses) is not counted.
fn tcp_sockets_on(addrs: &[SocketAddr]) -> Vec<ProcTcp> {
    let on = |c: &str| proc_net_addr(c).is_some_and(|a| addrs.contains(&a));
    proc_tcp_sockets()
        .into_iter()
        .filter(|t| on(&t.local) || on(&t.remote))
        .collect()
}

/// An address as `/proc/net/tcp{,6}` writes it: the IP as 32-bit words in host order, in hex, then
/// the port in hex. IPv4-mapped IPv6 addresses come back as IPv4.
fn proc_net_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).map(u32::from_be))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [a] => std::net::IpAddr::from(a.to_be_bytes()),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (chunk, w) in bytes.chunks_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&w.to_be_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Open TCP sockets of this process with `addrs` (address and port) at either end: a listener
/// bound to one of them, a connection to or from one. Exact addresses, not ports alone: another
/// test's socket on the same port number of another 127.0.0.x is not counted.
pub fn socket_fds_on(addrs: &[SocketAddr]) -> usize {
    let inodes: std::collections::HashSet<String> = tcp_sockets_on(addrs)
        .into_iter()
        .filter(|t| t.inode != "0")
        .map(|t| format!("socket:[{}]", t.inode))
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| inodes.contains(l))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Whether a test that needs an outside tool runs, `missing` saying why the tool is not here (`None`:
/// it is). Without it the test says loudly that it did not run, and passes, unless
/// `SLUICEGATE_REQUIRE_<WHAT>=1` makes that a failure (`.ci/run` sets it for every tool it installs).
/// Only `1` requires: unset, empty, `0` or anything else does not.
pub fn require_tool(what: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    let var = format!("SLUICEGATE_REQUIRE_{what}");
    let required = std::env::var(&var).is_ok_and(|v| v.trim() == "1");
    assert!(!required, "{why}, and {var}=1 requires it");
    eprintln!("\n*** SKIPPED: {why}; this check did NOT run ({var}=1 makes it a failure) ***\n");
    false
}

/// Polls the async `cond` every 5 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let r = tokio::time::timeout(limit, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "timed out after {limit:?} waiting for: {what}");
}

/// Polls `cond` every 5 ms until it holds; panics with `what` after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_until(limit, what, || std::future::ready(cond())).await
}

/// Runs `fut` under a timeout, panicking with `what`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A connection to `to` from the local address `from` (any of 127/8).
pub async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from((from, 0))).expect("bind");
    s.connect(to).await.expect("connect")
}

/// A session held open through the proxy: it echoed once, so its backend connection is up.
pub async fn held(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, to).await;
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    within(Duration::from_secs(5), "the echo", s.read_exact(&mut b))
        .await
        .expect("echoed");
    s
}

/// A service config for one service named `t` on 127.0.0.1:0 with these backends, relay engine and
/// extra service keys (one `key: value` per line).
pub fn service_yaml(backends: &[SocketAddr], relay: RelayMode, extra: &str) -> String {
    let mut y = String::from("shutdown: {drain_timeout: 10s}\nlog: {level: warn}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n");
    y += &format!("    relay: {}\n", relay.as_str());
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", line.trim());
    }
    y += "    backends:\n";
    for b in backends {
        y += &format!("      - {{address: \"{b}\"}}\n");
    }
    y
}

/// sluicegate running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Every service's listening address, in config order.
    pub addrs: Vec<SocketAddr>,
    /// The admin API's address, when the config enables it.
    pub admin: Option<SocketAddr>,
    pub control: Arc<sluicegate::Control>,
    pub service: Arc<Service>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Stopped>>,
}

impl Proxy {
    pub async fn start(yaml: &str) -> Proxy {
        raise_fd_limit();
        // SLUICEGATE_TEST_LOG=debug shows the proxy's own log on stderr (the first test to start wins).
        if let Ok(level) = std::env::var("SLUICEGATE_TEST_LOG") {
            if let Ok(level) = level.parse::<tracing::Level>() {
                let _ = tracing_subscriber::fmt()
                    .with_max_level(level)
                    .with_writer(std::io::stderr)
                    .try_init();
            }
        }
        let config =
            Config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
        let server = Server::bind(&config).expect("bind");
        let addrs: Vec<SocketAddr> = server.local_addrs().iter().map(|(_, a)| *a).collect();
        let addr = addrs[0];
        let admin = server.admin_addr();
        let control = server.control();
        let service = server.services()[0].clone();
        let readiness = server.readiness();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        // Start-up waits for the first DNS answers and probes; the tests start from a served state.
        within(
            Duration::from_secs(10),
            "proxy ready",
            readiness.wait_ready(),
        )
        .await;
        for s in server_services_asking_for_the_ring(&config, &control) {
            assert_on_ring(&s, "relay: ring");
        }
        Proxy {
            addr,
            addrs,
            admin,
            control,
            service,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Sends the stop signal (drain begins).
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the run to end after `signal_stop`.
    pub async fn stopped(&mut self) -> Stopped {
        self.task
            .take()
            .expect("stopped once")
            .await
            .expect("run task")
    }

    pub fn backend(&self, addr: SocketAddr) -> Arc<sluicegate::pool::Backend> {
        self.service
            .pool
            .members()
            .iter()
            .find(|b| b.addr == addr)
            .cloned()
            .expect("known backend")
    }

    /// Waits until `n` relayed connections ended as `end`.
    pub async fn wait_ended(&self, end: sluicegate::Outcome, n: u64) {
        let what = format!("{n} connection(s) ended as {}", end.as_str());
        wait_for(Duration::from_secs(5), &what, || {
            self.service.stats.ended(end) == n
        })
        .await;
    }

    /// The connections ended so far, by outcome (`client_closed: 2, backend_reset: 1`), for a
    /// failure's message: which side the proxy saw end, and how.
    pub fn ended_so_far(&self) -> String {
        let ended: Vec<String> = sluicegate::Outcome::ALL
            .iter()
            .map(|&o| (o, self.service.stats.ended(o)))
            .filter(|&(_, n)| n > 0)
            .map(|(o, n)| format!("{}: {n}", o.as_str()))
            .collect();
        ended.join(", ")
    }

    /// Sum of every backend's active count.
    pub fn active_to_backends(&self) -> u64 {
        self.service.pool.members().iter().map(|b| b.active()).sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// A fake backend: a listener on 127.0.0.x and a task per connection; `kill` aborts them all at once,
/// like `kill -9` (the sockets are closed by their owner disappearing).
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backend {
    pub async fn start<F, Fut>(ip: [u8; 4], handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Backend::serve(listen(SocketAddr::from((ip, 0))), handler)
    }

    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (acc, ts) = (accepted.clone(), tasks.clone());
        let handler = Arc::new(handler);
        let listen_task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    // Out of descriptors, say: wait for some to close rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                acc.fetch_add(1, Relaxed);
                let h = handler.clone();
                let t = tokio::spawn(async move { h(s).await });
                ts.lock().unwrap().push(t.abort_handle());
            }
        });
        tasks.lock().unwrap().push(listen_task.abort_handle());
        Backend {
            addr,
            accepted,
            tasks,
        }
    }

    pub async fn echo(ip: [u8; 4]) -> Backend {
        Backend::start(ip, echo).await
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Echoes until EOF, then half-closes.
pub async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// A listener with a deep accept queue. `TcpListener::bind` uses a backlog of 128, which a burst of a
/// thousand connects overflows: the kernel then drops handshakes and clients stall for seconds.
pub fn listen(addr: SocketAddr) -> TcpListener {
    try_listen(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"))
}

/// Listeners on one port, one on each of `ips` (as `listen` makes them). The port is the one the
/// kernel gives the first; another test may hold it on the other addresses (a refusing address
/// holds its port for the whole run), so a port not free on all of them is given up for another,
/// a bounded number of times.
pub fn listen_on_one_port(ips: &[[u8; 4]]) -> Vec<TcpListener> {
    const TRIES: usize = 50;
    let (first, rest) = ips.split_first().expect("at least one address");
    for _ in 0..TRIES {
        let l = listen(SocketAddr::from((*first, 0)));
        let port = l.local_addr().expect("addr").port();
        let others: Option<Vec<TcpListener>> = rest
            .iter()
            .map(|ip| try_listen(SocketAddr::from((*ip, port))).ok())
            .collect();
        if let Some(others) = others {
            return std::iter::once(l).chain(others).collect();
        }
    }
    panic!("no port free on all of {ips:?} in {TRIES} tries");
}

/// `listen`, with its error returned.
pub fn try_listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    TcpListener::from_std(s.into())
}

/// An address on which nothing listens: its port is held, for the life of the test process, by a
/// socket bound without SO_REUSEADDR and never listening, so a SYN to it is answered by a reset and
/// no other test's listener can be given the same port (as one just released could be).
pub async fn refusing_addr(ip: [u8; 4]) -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let (addr, held) = refusing_held(ip);
    HELD.lock().expect("held").push(held);
    addr
}

/// As `refusing_addr`, its port held by the socket returned instead: a test that brings a backend
/// up at the address later drops it first (no listener can bind the port while it is held).
pub fn refusing_held(ip: [u8; 4]) -> (SocketAddr, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((ip, 0)).into()).expect("bind");
    let addr = s
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("an inet address");
    (addr, s)
}

/// `n` deterministic pseudo-random bytes for `seed`.
pub fn payload(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

pub fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Sends `data` and FIN, reads everything back until EOF, concurrently, within `ROUND_TRIP_LIMIT`.
/// Returns what was read.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let all = async {
        let mut s = TcpStream::connect(addr).await?;
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(data).await?;
            w.shutdown().await
        };
        let mut got = Vec::with_capacity(data.len());
        let recv = r.read_to_end(&mut got);
        let (a, b) = tokio::join!(send, recv);
        a?;
        b?;
        Ok(got)
    };
    tokio::time::timeout(ROUND_TRIP_LIMIT, all)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "round trip"))?
}

/// How long a round trip may take before it fails (`TimedOut`): a proxy that accepts and then
/// neither answers nor closes must fail a test, not hang it. Longer than any test's own budget
/// around its round trips (relay.rs gives a thousand concurrent MiB echoes 240 s), so that budget
/// stays the one that decides.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(300);

/// Reads until EOF, failing on an error (a reset shows up as `Err`).
pub async fn read_all(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).await?;
    Ok(v)
}

/// States of the TCP sockets with one of `addrs` (address and port) at either end (exact addresses,
/// see [`tcp_sockets_on`]).
pub fn tcp_states_on(addrs: &[SocketAddr]) -> Vec<u8> {
    tcp_sockets_on(addrs).into_iter().map(|t| t.state).collect()
}

pub const TCP_FIN_WAIT2: u8 = 0x05;
pub const TCP_TIME_WAIT: u8 = 0x06;
pub const TCP_CLOSE_WAIT: u8 = 0x08;

/// Makes dropping `s` send RST instead of FIN (SO_LINGER 0, which never blocks).
pub fn rst_on_drop(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// The running services whose config says `relay: ring`.
fn server_services_asking_for_the_ring(
    config: &Config,
    control: &sluicegate::Control,
) -> Vec<Arc<Service>> {
    config
        .services
        .iter()
        .filter(|s| s.relay == RelayMode::Ring)
        .filter_map(|s| control.service(&s.name))
        .collect()
}
