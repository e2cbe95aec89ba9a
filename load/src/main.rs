//! `sluicegate-load`: a load generator for TCP and HTTP services, shipped with sluicegate.
//!
//! Closed loop (as fast as the service answers) or open loop (`--rate`: requests are due on a fixed
//! schedule per connection; a request an earlier answer held up is measured from when it was *due*,
//! not when it could be sent, so a stall is charged to every request it delayed: no coordinated
//! omission; one whose connection was free is measured from when it was sent, so the tool's own
//! timer lag is not charged to the service: `counted_from`). Latencies go
//! into an HdrHistogram (1 µs to 60 s, three significant digits). The report gives successes, failures
//! by kind, requests per second, mean and p50/p90/p99/p99.9, and the share of each backend when the
//! answers say who served them (`X-Backend`, a JSON `hostname`, or `Hello from Server: NAME`); `--json`
//! prints the same as one JSON object for scripts.
//!
//! Traffic goes only where it is pointed, and every run is bounded by `--duration` or `--requests`.
//!
//! `sluicegate-load serve` is the other end: a small backend that says who it is (`serve.rs`).

mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Load a TCP or HTTP service: closed or open loop, with latency percentiles and per-backend shares.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "sluicegate-load",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The service to load: ip:port (host names are resolved once, at start).
    target: Option<String>,
    /// What a request is: an HTTP/1.1 GET, or a TCP message echoed back.
    #[arg(long, value_enum, default_value_t = Mode::Http)]
    mode: Mode,
    /// HTTP: the path to GET.
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP: the Host header (default: the target).
    #[arg(long)]
    host: Option<String>,
    /// TCP: bytes per message; the answer must be as long.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Connections, each with one request in flight.
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// How long to run (e.g. 10s); the default when --requests is not given.
    #[arg(short, long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests in all.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open loop: requests per second in all, spread evenly over the connections.
    #[arg(short, long)]
    rate: Option<f64>,
    /// A new connection for every request (the default keeps connections alive).
    #[arg(long)]
    new_connection: bool,
    /// Send requests but record nothing for this long at the start (connections, caches warm up).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Give up on one request after this long (counted as a timeout).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Be a backend instead: a small HTTP server that says who it is (GET /, /home, /health,
    /// /heartbeat, /stats, /bytes?n=N&rate=R).
    Serve {
        /// Where to listen.
        #[arg(long, default_value = "0.0.0.0:5000")]
        listen: SocketAddr,
        /// The name it answers with (default: the host's name).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Http,
    Tcp,
}

/// A duration as sluicegate's config writes them (`500ms`, `10s`): the config's own parser.
fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<sluicegate::config::Dur>().map(|d| d.0)
}

/// How one request failed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Connect(String),
    Timeout,
    Reset,
    Closed,
    Status(u16),
    Protocol(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect: {e}"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Reset => f.write_str("reset"),
            Failure::Closed => f.write_str("closed early"),
            Failure::Status(c) => write!(f, "status {c}"),
            Failure::Protocol(e) => write!(f, "protocol: {e}"),
        }
    }
}

fn io_failure(e: &std::io::Error) -> Failure {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
        UnexpectedEof => Failure::Closed,
        TimedOut => Failure::Timeout,
        _ => Failure::Protocol(e.kind().to_string()),
    }
}

/// What one connection's loop measured.
struct Tally {
    latency: Histogram<u64>,
    /// Open loop: how late the tool sent the requests whose connection was free when they were due
    /// (its timers fire on tokio's 1 ms wheel): its own precision, not the service's.
    lag: Histogram<u64>,
    /// Open loop: requests counted from when they were due, an earlier answer having held them up.
    held_up: u64,
    ok: u64,
    failures: BTreeMap<Failure, u64>,
    /// When each failed request was due (Unix seconds), the first [`FAILED_AT_MAX`]: lets a caller tell
    /// requests in flight at a fault from ones started after it.
    failed_at: Vec<f64>,
    backends: BTreeMap<String, u64>,
}

const FAILED_AT_MAX: usize = 1000;

impl Tally {
    fn new() -> Tally {
        Tally {
            // 1 µs .. 60 s at three significant digits: constant bounds the crate accepts (low ≥ 1,
            // high ≥ 2 × low, 0..=5 digits), so this cannot fail.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds"),
            lag: Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid bounds"),
            held_up: 0,
            ok: 0,
            failures: BTreeMap::new(),
            failed_at: Vec::new(),
            backends: BTreeMap::new(),
        }
    }

    fn merge(&mut self, o: Tally) {
        let _ = self.latency.add(&o.latency);
        let _ = self.lag.add(&o.lag);
        self.held_up += o.held_up;
        self.ok += o.ok;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.failed_at.extend(o.failed_at);
        self.failed_at.truncate(FAILED_AT_MAX);
        for (k, v) in o.backends {
            *self.backends.entry(k).or_default() += v;
        }
    }
}

/// Set by SIGINT or SIGTERM: the run ends early, and still reports.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The shared budget of requests, when `--requests` bounds the run.
struct Budget(Option<std::sync::atomic::AtomicU64>);

impl Budget {
    fn take(&self) -> bool {
        match &self.0 {
            None => true,
            Some(left) => left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok(),
        }
    }
}

/// Who served an answer, when it says so.
fn backend_of(headers: &str, body: &[u8]) -> Option<String> {
    for line in headers.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("x-backend") {
                return Some(v.trim().to_string());
            }
        }
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    if let Some(name) = text.strip_prefix("Hello from Server:") {
        return Some(name.trim().to_string());
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("hostname")?.as_str().map(str::to_string)
}

/// One connection, reused while the server keeps it open.
struct Conn {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// The last exchange failed before a byte of its answer arrived.
    fresh_answer: bool,
}

/// The open stream, connecting first if there is none.
async fn connected(
    stream: &mut Option<TcpStream>,
    target: SocketAddr,
) -> Result<&mut TcpStream, Failure> {
    if stream.is_none() {
        let s = TcpStream::connect(target)
            .await
            .map_err(|e| Failure::Connect(e.kind().to_string()))?;
        let _ = s.set_nodelay(true);
        *stream = Some(s);
    }
    stream
        .as_mut()
        .ok_or_else(|| Failure::Connect("no stream".into()))
}

impl Conn {
    /// One TCP exchange: `msg` out, as many bytes back.
    async fn tcp(&mut self, target: SocketAddr, msg: &[u8]) -> Result<Option<String>, Failure> {
        let s = connected(&mut self.stream, target).await?;
        self.fresh_answer = true;
        s.write_all(msg).await.map_err(|e| io_failure(&e))?;
        let mut got = vec![0u8; msg.len()];
        let n = s.read(&mut got).await.map_err(|e| io_failure(&e))?;
        if n == 0 {
            return Err(Failure::Closed);
        }
        self.fresh_answer = false;
        s.read_exact(&mut got[n..])
            .await
            .map_err(|e| io_failure(&e))?;
        if got != msg {
            return Err(Failure::Protocol("echo differs".into()));
        }
        Ok(None)
    }

    /// One HTTP/1.1 exchange; returns who served it, if the answer says.
    async fn http(&mut self, target: SocketAddr, req: &[u8]) -> Result<Option<String>, Failure> {
        let s = connected(&mut self.stream, target).await?;
        self.fresh_answer = true;
        s.write_all(req).await.map_err(|e| io_failure(&e))?;
        self.buf.clear();
        // The head.
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(Failure::Protocol("head over 64 KiB".into()));
            }
            read_more(s, &mut self.buf).await?;
            self.fresh_answer = false;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| Failure::Protocol("no status line".into()))?;
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        // HTTP/1.0 closes unless it says otherwise.
        let keep = header("connection").map(|v| v == "keep-alive");
        let close = match keep {
            Some(k) => !k,
            None => head.starts_with("HTTP/1.0"),
        };
        let mut body = self.buf.split_off(head_end);
        if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while body.len() < len {
                read_more(s, &mut body).await?;
            }
            body.truncate(len);
        } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            body = read_chunked(s, body).await?;
        } else {
            // Delimited by the close.
            loop {
                match read_more(s, &mut body).await {
                    Ok(()) => {}
                    Err(Failure::Closed) => break,
                    Err(e) => return Err(e),
                }
            }
            self.stream = None;
        }
        if close {
            self.stream = None;
        }
        if !(200..300).contains(&status) {
            return Err(Failure::Status(status));
        }
        Ok(backend_of(&head, &body))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) => Err(Failure::Closed),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(io_failure(&e)),
    }
}

async fn read_chunked(s: &mut TcpStream, mut raw: Vec<u8>) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = loop {
            if let Some(i) = find(&raw[at..], b"\r\n") {
                break at + i;
            }
            read_more(s, &mut raw).await?;
        };
        let size_text = String::from_utf8_lossy(&raw[at..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| Failure::Protocol("bad chunk size".into()))?;
        let data = line_end + 2;
        while raw.len() < data + size + 2 {
            read_more(s, &mut raw).await?;
        }
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&raw[data..data + size]);
        at = data + size + 2;
    }
}

/// One connection's loop until the deadline or the budget ends.
async fn run_connection(
    args: Arc<Args>,
    target: SocketAddr,
    request: Arc<Vec<u8>>,
    index: usize,
    start: Instant,
    until: Option<Instant>,
    budget: Arc<Budget>,
) -> Tally {
    let mut tally = Tally::new();
    let mut conn = Conn {
        stream: None,
        buf: Vec::with_capacity(16 * 1024),
        fresh_answer: false,
    };
    // Open loop: this connection's requests are due every `period`, its first one offset so that the
    // connections' schedules interleave.
    let period = args
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(args.connections as f64 / r));
    let mut due = period.map(|p| start + p.mul_f64(index as f64 / args.connections as f64));
    // When the last exchange on this connection ended.
    let mut free = start;
    loop {
        if until.is_some_and(|u| Instant::now() >= u)
            || STOP.load(std::sync::atomic::Ordering::Relaxed)
            || !budget.take()
        {
            return tally;
        }
        let (sent_at, from) = match due {
            Some(d) => {
                if until.is_some_and(|u| d >= u) {
                    return tally;
                }
                tokio::time::sleep_until(d).await;
                let sent = Instant::now();
                let from = counted_from(d, free, sent);
                if d >= start + args.warmup {
                    if from == sent {
                        tally.lag.saturating_record(micros(sent - d));
                    } else {
                        tally.held_up += 1;
                    }
                }
                (d, from)
            }
            None => {
                let now = Instant::now();
                (now, now)
            }
        };
        if args.new_connection {
            conn.stream = None;
        }
        let exchange = async {
            // A kept-alive connection the server closed meanwhile fails before any answer: tried once
            // more on a new connection, as HTTP clients do. Nothing of the answer was read, so nothing
            // is counted twice.
            let reused = conn.stream.is_some();
            let first = match args.mode {
                Mode::Http => conn.http(target, &request).await,
                Mode::Tcp => conn.tcp(target, &request).await,
            };
            match first {
                Err(Failure::Closed | Failure::Reset) if reused && conn.fresh_answer => {
                    conn.stream = None;
                    match args.mode {
                        Mode::Http => conn.http(target, &request).await,
                        Mode::Tcp => conn.tcp(target, &request).await,
                    }
                }
                r => r,
            }
        };
        let result = match tokio::time::timeout(args.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        free = Instant::now();
        let took = micros(free - from);
        if result.is_err() {
            conn.stream = None;
        }
        if sent_at >= start + args.warmup {
            if result.is_err() && tally.failed_at.len() < FAILED_AT_MAX {
                let due = std::time::SystemTime::now() - sent_at.elapsed();
                let unix = due
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                tally.failed_at.push(unix);
            }
            record(&mut tally, result, took);
        }
        if let (Some(d), Some(p)) = (due.as_mut(), period) {
            *d += p;
        }
    }
}

/// When an open-loop request's latency counts from: when it was `due` if its connection was still busy
/// then (`free`: the exchange before it ended later), since that wait is the service's doing and must
/// be charged (no coordinated omission); else when it was `sent`, since the delay from `due` to then is
/// the tool's own (tokio's timers fire on a 1 ms wheel and the runtime sleeps in whole milliseconds:
/// 1.7–2.6 ms late at the p99 here, which would otherwise be in every latency and hide a hop of 100 µs).
/// A stall that begins between `due` and `sent` is charged from `sent`: short by the lag, at most.
fn counted_from(due: Instant, free: Instant, sent: Instant) -> Instant {
    if free > due {
        due
    } else {
        sent
    }
}

/// A duration in whole microseconds, at least 1 (the histograms' floor).
fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

/// Counts one request's result.
fn record(tally: &mut Tally, result: Result<Option<String>, Failure>, micros: u64) {
    match result {
        Ok(backend) => {
            tally.ok += 1;
            tally.latency.saturating_record(micros);
            if let Some(b) = backend {
                *tally.backends.entry(b).or_default() += 1;
            }
        }
        Err(f) => {
            *tally.failures.entry(f).or_default() += 1;
        }
    }
}

/// The tool's one runtime (current-thread: one core's worth of load per process), or the exit code
/// that says it could not start.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("sluicegate-load: cannot start a runtime: {e}");
            ExitCode::from(1)
        })
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::Serve { listen, name }) = args.command.take() {
        let rt = match runtime() {
            Ok(r) => r,
            Err(code) => return code,
        };
        return match rt.block_on(serve::serve(listen, serve::own_name(name))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluicegate-load serve: cannot listen on {listen}: {e}");
                ExitCode::from(1)
            }
        };
    }
    let Some(target_text) = args.target.clone() else {
        eprintln!("sluicegate-load: give the target ip:port (or `serve` to be a backend)");
        return ExitCode::from(2);
    };
    let target: SocketAddr = match std::net::ToSocketAddrs::to_socket_addrs(&target_text)
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            eprintln!(
                "sluicegate-load: {:?} is not a reachable ip:port or host:port",
                args.target
            );
            return ExitCode::from(2);
        }
    };
    if args.connections == 0 || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        eprintln!("sluicegate-load: --connections must be at least 1 and --rate positive");
        return ExitCode::from(2);
    }
    let duration = match (args.duration, args.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let request = Arc::new(match args.mode {
        Mode::Http => {
            let host = args.host.clone().unwrap_or_else(|| target_text.clone());
            let conn = if args.new_connection {
                "close"
            } else {
                "keep-alive"
            };
            format!(
                "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluicegate-load\r\nConnection: {conn}\r\n\r\n",
                args.path
            )
            .into_bytes()
        }
        Mode::Tcp => (0..args.size).map(|i| (i % 251) as u8).collect(),
    });
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let args = Arc::new(args);
    let (tally, elapsed) = runtime.block_on(async {
        let start = Instant::now();
        let until = duration.map(|d| start + d);
        let budget = Arc::new(Budget(args.requests.map(std::sync::atomic::AtomicU64::new)));
        // Ctrl-C (or SIGTERM) ends the run early; the report still comes.
        tokio::spawn(async {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..args.connections {
            tasks.spawn(run_connection(
                args.clone(),
                target,
                request.clone(),
                i,
                start,
                until,
                budget.clone(),
            ));
        }
        let mut all = Tally::new();
        while let Some(t) = tasks.join_next().await {
            if let Ok(t) = t {
                all.merge(t);
            }
        }
        // What was recorded: the run after the warm-up.
        (all, start.elapsed().saturating_sub(args.warmup))
    });
    report(&args, &tally, elapsed);
    if tally.ok == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn report(args: &Args, t: &Tally, elapsed: Duration) {
    let failed: u64 = t.failures.values().sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ms = |q: f64| t.latency.value_at_quantile(q) as f64 / 1000.0;
    let total_backend: u64 = t.backends.values().sum();
    if args.json {
        let failures: serde_json::Map<String, serde_json::Value> = t
            .failures
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let backends: serde_json::Map<String, serde_json::Value> = t
            .backends
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({"requests": v, "share": *v as f64 / total_backend.max(1) as f64}),
                )
            })
            .collect();
        let latency = if t.latency.is_empty() {
            serde_json::Value::Null
        } else {
            json!({
                "mean_ms": t.latency.mean() / 1000.0,
                "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                "max_ms": t.latency.max() as f64 / 1000.0,
            })
        };
        let lag = if t.lag.is_empty() {
            serde_json::Value::Null
        } else {
            json!({
                "p50_ms": t.lag.value_at_quantile(0.5) as f64 / 1000.0,
                "p99_ms": t.lag.value_at_quantile(0.99) as f64 / 1000.0,
            })
        };
        println!(
            "{}",
            json!({
                "target": args.target.as_deref().unwrap_or(""),
                "mode": format!("{:?}", args.mode).to_lowercase(),
                "connections": args.connections,
                "rate": args.rate,
                "new_connection": args.new_connection,
                "seconds": secs,
                "requests": t.ok + failed,
                "ok": t.ok,
                "failed": failed,
                "failures": failures,
                "failed_at": t.failed_at,
                "rps": t.ok as f64 / secs,
                "latency": latency,
                "lag": lag,
                "held_up": t.held_up,
                "backends": backends,
            })
        );
        return;
    }
    let mode = match (args.rate, args.new_connection) {
        (Some(r), false) => format!("open loop at {r} req/s"),
        (Some(r), true) => format!("open loop at {r} req/s, a new connection per request"),
        (None, false) => "closed loop".to_string(),
        (None, true) => "closed loop, a new connection per request".to_string(),
    };
    println!(
        "{} {} for {secs:.2} s, {} connections, {mode}",
        format!("{:?}", args.mode).to_uppercase(),
        args.target.as_deref().unwrap_or(""),
        args.connections
    );
    println!(
        "  requests   {:>10}   ok {}   failed {failed}",
        t.ok + failed,
        t.ok
    );
    for (k, v) in &t.failures {
        println!("    {v:>8}  {k}");
    }
    println!("  throughput {:>10.1} req/s", t.ok as f64 / secs);
    if !t.latency.is_empty() {
        println!(
            "  latency    mean {:.3} ms   p50 {:.3}   p90 {:.3}   p99 {:.3}   p99.9 {:.3}   max {:.3}",
            t.latency.mean() / 1000.0,
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            t.latency.max() as f64 / 1000.0
        );
    }
    if !t.lag.is_empty() {
        println!(
            "  (not counted: the tool's own lag sending requests due on a free connection: p50 {:.3} ms   p99 {:.3})",
            t.lag.value_at_quantile(0.5) as f64 / 1000.0,
            t.lag.value_at_quantile(0.99) as f64 / 1000.0,
        );
    }
    if args.rate.is_some() {
        println!(
            "  counted from when they were due, an earlier answer having held them up: {}",
            t.held_up
        );
    }
    if !t.backends.is_empty() {
        println!("  served by");
        for (k, v) in &t.backends {
            println!(
                "    {k:<24} {v:>8}  {:5.1} %",
                100.0 * *v as f64 / total_backend.max(1) as f64
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open loop: a request whose connection was free when it was due counts from when it was sent
    /// (the timer's lag is the tool's); one an earlier answer held up counts from when it was due
    /// (the wait is the service's, and the requests queued behind a stall all pay for it).
    #[test]
    fn an_open_loop_request_counts_from_its_due_time_only_when_an_earlier_answer_held_it_up() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // Free since 0, due at 10 ms, sent at 10.8 ms (a late timer): from 10.8 ms.
        assert_eq!(counted_from(at(10_000), at(0), at(10_800)), at(10_800));
        // Free exactly when due: from its send.
        assert_eq!(counted_from(at(10_000), at(10_000), at(10_050)), at(10_050));
        // Its connection busy until 25 ms (a slow answer), due at 10 ms, sent at 25 ms: from 10 ms.
        assert_eq!(counted_from(at(10_000), at(25_000), at(25_000)), at(10_000));
    }

    #[test]
    fn durations_parse_as_in_the_config() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "s", "10x", "1.2.3s", "-1s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("expected a number and a unit"), "{bad:?}: {e}");
        }
        assert!(parse_duration("9000h")
            .unwrap_err()
            .contains("longer than a year"));
    }

    #[test]
    fn backends_name_themselves_three_ways() {
        assert_eq!(
            backend_of("HTTP/1.1 200 OK\r\nX-Backend: b1\r\n", b""),
            Some("b1".into())
        );
        assert_eq!(
            backend_of("HTTP/1.1 200 OK\r\n", b"Hello from Server: S5\n"),
            Some("S5".into())
        );
        assert_eq!(
            backend_of(
                "HTTP/1.1 200 OK\r\n",
                br#"{"hostname": "web-1", "requests": 3}"#
            ),
            Some("web-1".into())
        );
        assert_eq!(backend_of("HTTP/1.1 200 OK\r\n", b"hello"), None);
    }
}
