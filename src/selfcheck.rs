//! `sluicegate healthcheck`: asks a running sluicegate's admin API whether it is ready (`GET /ready`),
//! for container health checks and supervisors. A plain blocking HTTP/1.0 exchange: the check runs in
//! images with nothing else in them (the compose image is `FROM scratch`), and must not need a runtime.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::Config;

/// Why the server is not known to be ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("the config has no admin section: there is no /ready to ask (give --admin ADDR)")]
    NoAdmin,
    /// The message carries the cause (not also a `source`, printed twice by a reporter).
    #[error("cannot reach the admin API at {addr}: {error}")]
    Unreachable {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the admin API at {addr} answered {status}: {body}")]
    Status {
        addr: SocketAddr,
        status: String,
        body: String,
    },
}

/// Where to ask: the admin address of `config`, with an unspecified address (`0.0.0.0`, `[::]`)
/// replaced by the loopback address of the same family.
pub fn admin_address(config: &Config) -> Result<SocketAddr, NotReady> {
    let listen = config.admin.as_ref().ok_or(NotReady::NoAdmin)?.listen;
    let ip = match listen.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, listen.port()))
}

/// Asks `addr` for `/ready` within `timeout`; `Ok` with the answer's body when it is 200.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<String, NotReady> {
    let unreachable = |error| NotReady::Unreachable { addr, error };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    // One write: the whole request in one segment, never a head cut in pieces.
    let request = format!(
        "GET /ready HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: sluicegate-healthcheck\r\n\r\n"
    );
    s.write_all(request.as_bytes()).map_err(unreachable)?;
    // The answer is small; a longer one is cut, which cannot make a non-200 look like a 200.
    let mut answer = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    if status.split(' ').nth(1) == Some("200") {
        Ok(body.trim().to_string())
    } else {
        Err(NotReady::Status {
            addr,
            status: if status.is_empty() {
                "nothing".into()
            } else {
                status
            },
            body: body.trim().chars().take(500).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_admin_address_is_asked_on_loopback() {
        let c = Config::from_yaml(
            "admin: {listen: \"0.0.0.0:9901\", token: a-long-enough-token}\nservices:\n  - {name: w, listen: 127.0.0.1:0, backends: [{address: 127.0.0.1:1}]}\n",
        )
        .unwrap();
        assert_eq!(
            admin_address(&c).unwrap(),
            "127.0.0.1:9901".parse().unwrap()
        );
        let none = Config::from_yaml(
            "services:\n  - {name: w, listen: 127.0.0.1:0, backends: [{address: 127.0.0.1:1}]}\n",
        )
        .unwrap();
        assert!(matches!(admin_address(&none), Err(NotReady::NoAdmin)));
    }

    #[test]
    fn only_200_is_ready() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Reads the whole request before answering: closing with unread bytes would send a reset.
        let serve = |answer: &'static str| {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            c.write_all(answer.as_bytes()).unwrap();
        };
        let t = std::thread::scope(|sc| {
            sc.spawn(|| serve("HTTP/1.1 200 OK\r\n\r\n{\"ready\":true}"));
            check(addr, Duration::from_secs(5))
        });
        assert_eq!(t.unwrap(), "{\"ready\":true}");
        let t = std::thread::scope(|sc| {
            sc.spawn(|| serve("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"draining\":true}"));
            check(addr, Duration::from_secs(5))
        });
        assert!(matches!(t, Err(NotReady::Status { ref status, .. }) if status.contains("503")));
        drop(l);
        assert!(matches!(
            check(addr, Duration::from_secs(5)),
            Err(NotReady::Unreachable { .. })
        ));
    }
}
