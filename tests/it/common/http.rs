//! A minimal HTTP/1.1 client for the admin API tests: one request per connection, read to EOF.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends one request (`extra` are full header lines; a POST, PUT or DELETE without a Content-Type
/// among them gets `Content-Type: application/json`, as the admin API requires) and reads the whole
/// reply (within 10 s).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &[u8],
) -> std::io::Result<Reply> {
    request_within(addr, method, path, extra, body, Duration::from_secs(10)).await
}

/// [`request`], waiting up to `limit` for the reply.
pub async fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &[u8],
    limit: Duration,
) -> std::io::Result<Reply> {
    let json = ["POST", "PUT", "DELETE"].contains(&method)
        && !extra
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("content-type:"));
    let json = if json {
        &["Content-Type: application/json"][..]
    } else {
        &[]
    };
    request_raw(addr, method, path, &[json, extra].concat(), body, limit).await
}

/// [`request_within`] with exactly the headers given (and Host, Connection, Content-Length).
pub async fn request_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[&str],
    body: &[u8],
    limit: Duration,
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !extra
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        head += &format!("Host: {addr}\r\n");
    }
    for h in extra {
        head += h;
        head += "\r\n";
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).await?;
    // A server may answer (413) before the whole body is sent and close: that is fine.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> std::io::Result<Reply> {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no head: {text:?}"),
        )
    })?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no status"))?;
    Ok(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"").await.expect("GET")
}

pub async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    request(addr, method, path, &[], body.as_bytes())
        .await
        .expect("request")
}

/// A keep-alive HTTP/1.1 server on `ip` that answers every request `200 Hello from Server: NAME` with
/// `X-Backend: NAME`, NAME being its address; it counts the requests it answered.
pub async fn hello_server(
    ip: [u8; 4],
) -> (super::Backend, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let served = std::sync::Arc::new(AtomicU64::new(0));
    let count = served.clone();
    let listener = super::listen(SocketAddr::from((ip, 0)));
    let name = listener.local_addr().unwrap().to_string();
    let backend = super::Backend::serve(listener, move |mut s| {
        let (name, count) = (name.clone(), count.clone());
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    let body = format!("Hello from Server: {name}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    count.fetch_add(1, Relaxed);
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    });
    (backend, served)
}
