//! Fake replicas as Docker runs them: one app per address (127.0.0.2, 127.0.0.3, …), all on one port,
//! each answering data connections with its own address and `GET /health` with a status the test sets.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{listen, Backend};

/// How a replica answers `GET /health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HealthMode {
    /// A status line with the replica's current status code.
    Status = 0,
    /// Reads and never answers.
    Hang = 1,
    /// 200 followed by a 10 MB body.
    Huge = 2,
    /// Closes without a byte.
    Close = 3,
    /// Bytes that are not HTTP.
    Garbage = 4,
    /// Each probe alternates 200 / 503.
    Alternate = 5,
    /// The current status code, 200 ms late.
    Slow = 6,
}

pub struct Probes {
    pub status: AtomicU16,
    pub mode: AtomicU8,
    /// Health requests received.
    pub count: AtomicU64,
    /// Health connections open now, and the most ever open at once.
    pub open: AtomicU64,
    pub max_open: AtomicU64,
    /// Data connections received.
    pub data: AtomicU64,
}

pub struct Replica {
    pub backend: Backend,
    pub probes: Arc<Probes>,
}

impl Replica {
    pub fn addr(&self) -> SocketAddr {
        self.backend.addr
    }
    pub fn ip(&self) -> IpAddr {
        self.backend.addr.ip()
    }
    pub fn set_status(&self, code: u16) {
        self.probes.mode.store(HealthMode::Status as u8, Relaxed);
        self.probes.status.store(code, Relaxed);
    }
    pub fn set_mode(&self, mode: HealthMode) {
        self.probes.mode.store(mode as u8, Relaxed);
    }
    pub fn health_requests(&self) -> u64 {
        self.probes.count.load(Relaxed)
    }
    pub fn data_connections(&self) -> u64 {
        self.probes.data.load(Relaxed)
    }
}

/// Starts `n` replicas on 127.0.0.{first_ip}.. sharing one port.
pub fn replicas(first_ip: u8, n: u8) -> (u16, Vec<Replica>) {
    'port: for _ in 0..50 {
        let first = listen(SocketAddr::from(([127, 0, 0, first_ip], 0)));
        let port = first.local_addr().expect("addr").port();
        let mut listeners = vec![first];
        for i in 1..n {
            let addr = SocketAddr::from(([127, 0, 0, first_ip + i], port));
            match std::net::TcpListener::bind(addr) {
                Ok(l) => {
                    drop(l);
                    listeners.push(listen(addr));
                }
                Err(_) => continue 'port,
            }
        }
        let out = listeners.into_iter().map(replica_on).collect();
        return (port, out);
    }
    panic!("no port free on every replica address");
}

/// One more replica at `ip` on `port` (a scale-up).
pub fn replica_at(ip: u8, port: u16) -> Replica {
    replica_on(listen(SocketAddr::from(([127, 0, 0, ip], port))))
}

fn replica_on(l: tokio::net::TcpListener) -> Replica {
    let probes = Arc::new(Probes {
        status: AtomicU16::new(200),
        mode: AtomicU8::new(HealthMode::Status as u8),
        count: AtomicU64::new(0),
        open: AtomicU64::new(0),
        max_open: AtomicU64::new(0),
        data: AtomicU64::new(0),
    });
    let p = probes.clone();
    let backend = Backend::serve(l, move |s| serve(s, p.clone()));
    Replica { backend, probes }
}

async fn serve(mut s: TcpStream, p: Arc<Probes>) {
    let me = s
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut first = [0u8; 11];
    if s.read_exact(&mut first).await.is_err() {
        return;
    }
    if &first != b"GET /health" {
        // Data (the client's 11-byte hello): say who we are, then echo until EOF.
        p.data.fetch_add(1, Relaxed);
        let (mut r, mut w) = s.split();
        if w.write_all(format!("{me}\n").as_bytes()).await.is_err() {
            return;
        }
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
        return;
    }
    let n = p.count.fetch_add(1, Relaxed);
    let open = p.open.fetch_add(1, Relaxed) + 1;
    p.max_open.fetch_max(open, Relaxed);
    // Read the rest of the request head.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => head.extend_from_slice(&buf[..k]),
        }
    }
    let mode = p.mode.load(Relaxed);
    let status =
        |code: u16| format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    match mode {
        m if m == HealthMode::Hang as u8 => {
            let _ = s.read(&mut buf).await; // until the prober gives up and closes
        }
        m if m == HealthMode::Huge as u8 => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..160 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        }
        m if m == HealthMode::Close as u8 => {}
        m if m == HealthMode::Garbage as u8 => {
            let _ = s.write_all(&[0xff; 300]).await;
        }
        m if m == HealthMode::Alternate as u8 => {
            let code = if n.is_multiple_of(2) { 503 } else { 200 };
            let _ = s.write_all(status(code).as_bytes()).await;
        }
        m if m == HealthMode::Slow as u8 => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let code = p.status.load(Relaxed);
            let _ = s.write_all(status(code).as_bytes()).await;
        }
        _ => {
            let code = p.status.load(Relaxed);
            let _ = s.write_all(status(code).as_bytes()).await;
        }
    }
    p.open.fetch_sub(1, Relaxed);
}

/// What a data client sends first: as long as `GET /health`, so the replica can tell them apart.
const HELLO: &[u8; 11] = b"sluicegate\n";

/// Connects through `addr`, asks who answers, and closes.
pub async fn who(addr: SocketAddr) -> std::io::Result<IpAddr> {
    let (s, ip) = Session::open(addr).await?;
    drop(s);
    Ok(ip)
}

/// A held connection through the proxy to one replica.
pub struct Session {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Session {
    pub async fn open(addr: SocketAddr) -> std::io::Result<(Session, IpAddr)> {
        let mut line = String::new();
        let hello = async {
            let s = TcpStream::connect(addr).await?;
            let (r, mut w) = s.into_split();
            w.write_all(HELLO).await?;
            let mut r = BufReader::new(r);
            r.read_line(&mut line).await?;
            Ok::<_, std::io::Error>((r, w))
        };
        let (r, w) = tokio::time::timeout(Duration::from_secs(10), hello)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello back"))??;
        let ip = line.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("no backend answered ({line:?})"),
            )
        })?;
        Ok((Session { r, w }, ip))
    }

    /// The client's own address, as the proxy lists it (`GET /connections`).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.w.local_addr()
    }

    /// Sends a line and reads its echo; an error or EOF means the session was cut.
    pub async fn ping(&mut self) -> std::io::Result<()> {
        self.w.write_all(b"ping\n").await?;
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(5), self.r.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
        if n == 0 || line != "ping\n" {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "cut",
            ));
        }
        Ok(())
    }

    /// Waits until the proxy closes or resets the session (bounded by `limit`).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, self.r.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Who answers `n` sequential connections through `addr`, counted per address; every one must succeed.
pub async fn spread(addr: SocketAddr, n: usize) -> std::collections::HashMap<IpAddr, usize> {
    let mut counts = std::collections::HashMap::new();
    for i in 0..n {
        let who = super::within(Duration::from_secs(5), "connection", who(addr))
            .await
            .unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
        *counts.entry(who).or_default() += 1;
    }
    counts
}
