//! `sluicegate-load serve`: a small HTTP/1.1 backend that says who it is, to put behind sluicegate when
//! trying it out and in tests (it is what the replica tests run in their containers).
//!
//! `GET /health` and `/heartbeat`: 200. `GET /home`: `Hello from Server: NAME`. `GET /stats`:
//! `{"hostname", "requests"}` (not counted). `GET /bytes?n=N[&rate=R]`: N bytes of the same pattern as
//! the demo backend (byte i is (i × 7 + 13) mod 251), paced at R bytes/s when given. Anything else:
//! `{"hostname": NAME, "requests": N}`. Every answer has `X-Backend: NAME`; connections are kept alive.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The name this server answers with: `--name`, else the host's name (a container's hostname).
pub(crate) fn own_name(name: Option<String>) -> String {
    name.or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) async fn serve(listen: SocketAddr, name: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "sluicegate-load serve: {name} on {}",
        listener.local_addr()?
    );
    let counted = Arc::new(AtomicU64::new(0));
    let name: Arc<str> = name.into();
    loop {
        let (s, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors or similar: wait a moment instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(connection(s, name.clone(), counted.clone()));
    }
}

async fn connection(mut s: TcpStream, name: Arc<str>, counted: Arc<AtomicU64>) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let close = head
            .lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "connection:close");
        let ok = match path {
            "/health" | "/heartbeat" => answer(&mut s, &name, "text/plain", b"ok").await,
            "/home" => {
                counted.fetch_add(1, Relaxed);
                let body = format!("Hello from Server: {name}");
                answer(&mut s, &name, "text/plain", body.as_bytes()).await
            }
            "/stats" => {
                let body = format!(
                    "{{\"hostname\":\"{name}\",\"requests\":{}}}",
                    counted.load(Relaxed)
                );
                answer(&mut s, &name, "application/json", body.as_bytes()).await
            }
            "/bytes" => {
                counted.fetch_add(1, Relaxed);
                let param = |k: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                        .and_then(|v| v.parse::<u64>().ok())
                };
                stream(&mut s, &name, param("n").unwrap_or(1024), param("rate")).await
            }
            _ => {
                let n = counted.fetch_add(1, Relaxed) + 1;
                let body = format!("{{\"hostname\":\"{name}\",\"requests\":{n}}}");
                answer(&mut s, &name, "application/json", body.as_bytes()).await
            }
        };
        if !ok || close {
            return;
        }
    }
}

async fn answer(s: &mut TcpStream, name: &str, kind: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.is_ok() && s.write_all(body).await.is_ok()
}

/// `n` bytes of the pattern, paced at `rate` bytes/s when given.
async fn stream(s: &mut TcpStream, name: &str, n: u64, rate: Option<u64>) -> bool {
    let head = format!(
        "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let period: Vec<u8> = (0..251u32).map(|i| ((i * 7 + 13) % 251) as u8).collect();
    let block: Vec<u8> = period.iter().cycle().take(251 * 263).copied().collect();
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let off = (sent % 251) as usize;
        let k = (n - sent).min(64 * 1024) as usize;
        if s.write_all(&block[off..off + k]).await.is_err() {
            return false;
        }
        sent += k as u64;
        if let Some(r) = rate.filter(|r| *r > 0) {
            tokio::time::sleep_until(started + Duration::from_secs_f64(sent as f64 / r as f64))
                .await;
        }
    }
    true
}
