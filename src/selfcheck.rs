//! The admin API from the command line: `sluicegate healthcheck` asks a running sluicegate whether
//! it is ready (`GET /ready`), for container health checks and supervisors; `sluicegate connections`
//! lists its live connections (`GET /connections`) as a table or JSON, or ends them (`DELETE`).
//! Plain blocking HTTP/1.0 exchanges: the check runs in images with nothing else in them (the
//! compose image is `FROM scratch`), and must not need a runtime.

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
    ask(addr, "GET", "/ready", None, timeout, 64 * 1024)
}

/// The most of a `/connections` answer read: 100,000 listed connections at about 500 bytes each.
const MAX_LISTING: u64 = 64 * 1024 * 1024;

/// One request to the admin API at `addr` (with the bearer `token`, if any) within `timeout`;
/// `Ok` with the body when the answer is 200, which is read up to `max` bytes.
pub fn ask(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
    max: u64,
) -> Result<String, NotReady> {
    let unreachable = |error| NotReady::Unreachable { addr, error };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    // A mutation must say its (empty) body is JSON: the admin API's cross-site defence.
    let json = if method == "GET" {
        ""
    } else {
        "Content-Type: application/json\r\nContent-Length: 0\r\n"
    };
    // One write: the whole request in one segment, never a head cut in pieces.
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: sluicegate-cli\r\n{auth}{json}\r\n"
    );
    s.write_all(request.as_bytes()).map_err(unreachable)?;
    // A longer answer is cut, which cannot make a non-200 look like a 200.
    let mut answer = Vec::new();
    s.take(max).read_to_end(&mut answer).map_err(unreachable)?;
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

/// What `sluicegate connections` asks for.
#[derive(Debug, Default)]
pub struct Connections {
    pub service: Option<String>,
    pub backend: Option<String>,
    pub client: Option<String>,
    pub older_than: Option<String>,
    pub limit: Option<usize>,
    /// End the matches instead of listing them, `reset` or `fin`.
    pub kill: Option<String>,
}

impl Connections {
    /// The request: its method and path with the filters, percent-encoded.
    pub fn request(&self) -> (&'static str, String) {
        let mut q = Vec::new();
        for (k, v) in [
            ("service", &self.service),
            ("backend", &self.backend),
            ("client", &self.client),
            ("older_than", &self.older_than),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={}", percent_encode(v)));
            }
        }
        let method = match &self.kill {
            Some(how) => {
                q.push(format!("how={}", percent_encode(how)));
                "DELETE"
            }
            None => {
                if let Some(n) = self.limit {
                    q.push(format!("limit={n}"));
                }
                "GET"
            }
        };
        let query = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        (method, format!("/connections{query}"))
    }

    /// Asks the admin API at `addr`: its answer's body.
    pub fn ask(
        &self,
        addr: SocketAddr,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<String, NotReady> {
        let (method, path) = self.request();
        ask(addr, method, &path, token, timeout, MAX_LISTING)
    }
}

/// `s` with every byte outside the URL's unreserved set percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `GET /connections` answer as a table, one line per connection, oldest last, and the count.
pub fn connections_table(answer: &serde_json::Value) -> String {
    let cols = [
        "ID", "SERVICE", "CLIENT", "BACKEND", "ENGINE", "STATE", "AGE", "IDLE", "UP", "DOWN",
    ];
    let mut rows = vec![cols.iter().map(|c| c.to_string()).collect::<Vec<_>>()];
    let empty = Vec::new();
    let listed = answer["connections"].as_array().unwrap_or(&empty);
    for c in listed {
        let text = |k: &str| cell(&c[k]);
        let secs = |k: &str| human_secs(c[k].as_f64().unwrap_or(0.0));
        rows.push(vec![
            text("id"),
            text("service"),
            text("client"),
            text("backend"),
            text("engine"),
            text("state"),
            secs("age_s"),
            secs("idle_s"),
            human_bytes(c["bytes_up"].as_u64().unwrap_or(0)),
            human_bytes(c["bytes_down"].as_u64().unwrap_or(0)),
        ]);
    }
    let mut out = aligned(&rows);
    let total = answer["total"].as_u64().unwrap_or(listed.len() as u64);
    out += &format!("{} of {total} connections\n", listed.len());
    out
}

/// What `sluicegate top` shows below the services: which connections, and how many.
#[derive(Debug, Clone)]
pub struct Top {
    /// `oldest`, `busiest`, `idlest` or `newest` (the admin API's `sort`).
    pub sort: String,
    pub limit: usize,
    pub service: Option<String>,
}

impl Top {
    /// The connections' request: `GET /connections` in this order, this many.
    pub fn connections_path(&self) -> String {
        let mut path = format!(
            "/connections?sort={}&limit={}",
            percent_encode(&self.sort),
            self.limit
        );
        if let Some(s) = &self.service {
            path += &format!("&service={}", percent_encode(s));
        }
        path
    }

    /// One frame: asks `/stats` and `/connections`, and renders them.
    pub fn frame(&self, addr: SocketAddr, timeout: Duration) -> Result<String, NotReady> {
        let stats = ask(addr, "GET", "/stats", None, timeout, MAX_LISTING)?;
        let conns = ask(
            addr,
            "GET",
            &self.connections_path(),
            None,
            timeout,
            MAX_LISTING,
        )?;
        let parse = |body: &str| serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
        Ok(self.render(&parse(&stats), &parse(&conns)))
    }

    /// A frame of `sluicegate top` (pure): the services with their backends, then the
    /// connections first in the order asked.
    pub fn render(&self, stats: &serde_json::Value, conns: &serde_json::Value) -> String {
        let empty = Vec::new();
        let state = match (stats["ready"].as_bool(), stats["draining"].as_bool()) {
            (_, Some(true)) => "draining",
            (Some(true), _) => "ready",
            _ => "not ready",
        };
        let services = stats["services"].as_array().unwrap_or(&empty);
        let mut out = format!("sluicegate: {state}, {} services\n\n", services.len());
        let mut rows = vec![[
            "SERVICE", "PROTO", "BACKEND", "STATE", "HEALTH", "WEIGHT", "ACTIVE", "TOTAL",
            "CONN/S", "BYTES/S",
        ]
        .map(String::from)
        .to_vec()];
        for svc in services {
            if self.service.as_deref().is_some_and(|s| svc["name"] != s) {
                continue;
            }
            rows.push(vec![
                cell(&svc["name"]),
                cell(&svc["protocol"]),
                format!("tier {}", cell(&svc["serving_tier"])),
                String::new(),
                String::new(),
                String::new(),
                cell(&svc["active"]),
                cell(&svc["accepted"]),
                rate(&svc["conn_rate"]),
                human_bytes(svc["bytes_rate"].as_f64().unwrap_or(0.0) as u64) + "/s",
            ]);
            for b in svc["backends"].as_array().unwrap_or(&empty) {
                rows.push(vec![
                    String::new(),
                    String::new(),
                    cell(&b["address"]),
                    cell(&b["state"]),
                    cell(&b["health"]),
                    cell(&b["effective_weight"]),
                    cell(&b["active"]),
                    cell(&b["total"]),
                    rate(&b["conn_rate"]),
                    human_bytes(b["bytes_rate"].as_f64().unwrap_or(0.0) as u64) + "/s",
                ]);
            }
        }
        out += &aligned(&rows);
        out += &format!("\nconnections, {} first:\n", self.sort);
        out += &connections_table(conns);
        out
    }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn rate(v: &serde_json::Value) -> String {
    v.as_f64().map_or("-".into(), |r| format!("{r:.1}"))
}

/// Rows as columns padded to their widest cell, two spaces apart.
fn aligned(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn human_secs(s: f64) -> String {
    match s {
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!("{}h{:02}m", (s / 3600.0) as u64, (s % 3600.0 / 60.0) as u64),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n < 10 * 1024 => format!("{n}B"),
        n if n < 10 * 1024 * 1024 => format!("{}KiB", n / 1024),
        n if n < 10 * 1024 * 1024 * 1024 => format!("{}MiB", n >> 20),
        n => format!("{}GiB", n >> 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_request_carries_its_filters_encoded() {
        let c = Connections {
            service: Some("web".into()),
            client: Some("10.0.0.0/8".into()),
            limit: Some(5),
            ..Connections::default()
        };
        assert_eq!(
            c.request(),
            (
                "GET",
                "/connections?service=web&client=10.0.0.0%2F8&limit=5".into()
            )
        );
        let kill = Connections {
            backend: Some("[::1]:80".into()),
            kill: Some("fin".into()),
            ..Connections::default()
        };
        assert_eq!(
            kill.request(),
            (
                "DELETE",
                "/connections?backend=%5B%3A%3A1%5D%3A80&how=fin".into()
            )
        );
        assert_eq!(Connections::default().request().1, "/connections");
    }

    #[test]
    fn a_listing_is_a_table_with_its_count() {
        let answer = serde_json::json!({"total": 3, "connections": [
            {"id": 9, "service": "pg", "client": "10.1.4.7:51234", "backend": "10.0.0.12:5432",
             "engine": "ring", "state": "relaying", "age_s": 4000.0, "idle_s": 2.25,
             "bytes_up": 80211, "bytes_down": 20_000_000},
            {"id": 8, "service": "pg", "client": "10.1.4.8:1", "backend": null,
             "engine": "epoll", "state": "connecting", "age_s": 61.0, "idle_s": 61.0,
             "bytes_up": 0, "bytes_down": 0}
        ]});
        let t = connections_table(&answer);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID  SERVICE  CLIENT"), "{t}");
        assert!(
            lines[1].contains("10.0.0.12:5432") && lines[1].contains("1h06m"),
            "{t}"
        );
        assert!(
            lines[1].contains("78KiB") && lines[1].contains("19MiB"),
            "{t}"
        );
        assert!(
            lines[2].contains(" - ") && lines[2].contains("1m01s"),
            "{t}"
        );
        assert_eq!(lines[3], "2 of 3 connections");
    }

    #[test]
    fn a_top_frame_shows_services_backends_and_connections() {
        let stats = serde_json::json!({"ready": true, "draining": false, "services": [
            {"name": "web", "protocol": "tcp", "serving_tier": 0, "active": 3, "accepted": 40,
             "conn_rate": 2.5, "bytes_rate": 20480.0, "backends": [
                {"address": "127.0.0.1:8080", "state": "draining", "health": "healthy",
                 "effective_weight": 2, "active": 1, "total": 30, "conn_rate": 0.5, "bytes_rate": 0.0}]},
            {"name": "dns", "protocol": "udp", "serving_tier": 0, "active": 0, "accepted": 0,
             "conn_rate": 0.0, "bytes_rate": 0.0, "backends": []}
        ]});
        let conns = serde_json::json!({"total": 1, "connections": [
            {"id": 4, "service": "web", "client": "127.0.0.1:5000", "backend": "127.0.0.1:8080",
             "engine": "ring", "state": "relaying", "age_s": 5.0, "idle_s": 1.0,
             "bytes_up": 10, "bytes_down": 20}]});
        let top = Top {
            sort: "busiest".into(),
            limit: 10,
            service: None,
        };
        let f = top.render(&stats, &conns);
        assert!(f.starts_with("sluicegate: ready, 2 services"), "{f}");
        let web = f.lines().find(|l| l.starts_with("web")).unwrap();
        assert!(
            web.contains("tcp") && web.contains("2.5") && web.contains("20KiB/s"),
            "{f}"
        );
        let backend = f
            .lines()
            .find(|l| l.contains("127.0.0.1:8080") && l.contains("draining"));
        assert!(
            backend.is_some_and(|l| l.contains("healthy") && l.contains("30")),
            "{f}"
        );
        assert!(
            f.contains("connections, busiest first:") && f.contains("1 of 1 connections"),
            "{f}"
        );
        let only_dns = Top {
            service: Some("dns".into()),
            ..top.clone()
        };
        let f = only_dns.render(&stats, &conns);
        assert!(
            f.lines().any(|l| l.starts_with("dns")) && !f.lines().any(|l| l.starts_with("web")),
            "{f}"
        );
        assert_eq!(
            only_dns.connections_path(),
            "/connections?sort=busiest&limit=10&service=dns"
        );
    }

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
