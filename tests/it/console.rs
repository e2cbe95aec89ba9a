//! The operator's console over real sockets: `GET /connections` lists live connections with their
//! facts and bytes, filters them, and `DELETE /connections` ends one by id or every match, on the
//! ring workers and on a tokio engine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use sluicegate::config::RelayMode;
use sluicegate::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::common::http::{request, Reply};
use crate::common::*;

/// How a backend's side of a connection ended.
#[derive(Debug, PartialEq)]
enum Seen {
    Eof,
    Reset,
}

/// An echo backend on `ip` that reports how each connection ended.
async fn reporting_echo(ip: [u8; 4], tx: mpsc::UnboundedSender<Seen>) -> Backend {
    Backend::start(ip, move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            let seen = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break Seen::Eof,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break Seen::Reset;
                        }
                    }
                    Err(_) => break Seen::Reset,
                }
            };
            let _ = tx.send(seen);
        }
    })
    .await
}

/// A client from `source` that sends `n` bytes and reads them back through the balancer.
async fn held_client(proxy: SocketAddr, source: Ipv4Addr, n: usize) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0))
        .expect("bind the client's source");
    let mut s = within(Duration::from_secs(5), "connect", sock.connect(proxy))
        .await
        .expect("connect");
    let msg = payload(n as u64, n);
    s.write_all(&msg).await.expect("send");
    let mut back = vec![0u8; n];
    within(Duration::from_secs(5), "echo", s.read_exact(&mut back))
        .await
        .expect("echo");
    assert_eq!(back, msg);
    s
}

async fn admin(proxy: &Proxy, method: &str, path: &str) -> Reply {
    let addr = proxy.admin.expect("admin API");
    request(addr, method, path, &[], b"")
        .await
        .expect("admin request")
}

async fn listed(proxy: &Proxy, query: &str) -> Value {
    let r = admin(
        proxy,
        "GET",
        &format!("/connections?listen={}&{query}", proxy.addr),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// How the client's side ends once the balancer ends it: a reset, or an end of stream.
async fn client_end(s: &mut TcpStream) -> Seen {
    let mut buf = [0u8; 64];
    match within(Duration::from_secs(5), "the client's end", s.read(&mut buf)).await {
        Ok(0) => Seen::Eof,
        Ok(n) => panic!("{n} unexpected bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Seen::Reset,
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn backend_end(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    within(Duration::from_secs(5), "the backend's end", rx.recv())
        .await
        .expect("a backend connection ended")
}

/// 50 held connections from two source blocks over two backends: listed with their facts and
/// bytes, filtered, one killed by id (reset both ways, `end: killed`), one with a FIN, then every
/// match of a filter, leaving the rest alone.
async fn listed_filtered_and_killed(mode: RelayMode) {
    let (tx, mut ended) = mpsc::unbounded_channel();
    let a = reporting_echo([127, 0, 0, 31], tx.clone()).await;
    let b = reporting_echo([127, 0, 0, 32], tx).await;
    let yaml = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\n{}",
        service_yaml(&[a.addr, b.addr], mode, "balance: round_robin")
    );
    let proxy = Proxy::start(&yaml).await;
    let mut clients = Vec::new();
    for i in 0..50usize {
        // Ten from 127.0.1.0/24, forty from 127.0.2.0/24; each moves its own byte count.
        let source = if i < 10 {
            Ipv4Addr::new(127, 0, 1, 1 + i as u8)
        } else {
            Ipv4Addr::new(127, 0, 2, 1 + i as u8)
        };
        clients.push(held_client(proxy.addr, source, 100 + i).await);
    }
    // Bytes are current within a second (the ring counts at its tick).
    wait_until(
        Duration::from_secs(5),
        "every connection's bytes listed",
        || async {
            let all = listed(&proxy, "").await;
            all["total"] == 50
                && all["connections"].as_array().unwrap().iter().all(|c| {
                    c["bytes_up"].as_u64() >= Some(100) && c["bytes_up"] == c["bytes_down"]
                })
        },
    )
    .await;
    let all = listed(&proxy, "").await;
    let conns = all["connections"].as_array().unwrap();
    let engine = if mode == RelayMode::Ring {
        "ring"
    } else {
        mode.as_str()
    };
    let mut ids = Vec::new();
    for c in conns {
        assert_eq!(c["service"], "t");
        assert_eq!(c["protocol"], "tcp");
        assert_eq!(c["engine"], engine, "{c}");
        assert_eq!(c["state"], "relaying", "{c}");
        assert_eq!(c["listen"], proxy.addr.to_string());
        assert_eq!(c["handed_over"], false);
        let backend = c["backend"].as_str().unwrap();
        assert!([a.addr.to_string(), b.addr.to_string()].contains(&backend.to_string()));
        assert!(c["started"].as_str().unwrap().ends_with('Z'), "{c}");
        assert!(c["age_s"].as_f64().unwrap() >= 0.0);
        ids.push(c["id"].as_u64().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    // The newest is the last client: 149 bytes each way.
    assert_eq!(conns[0]["bytes_up"], 149);
    assert!(conns[0]["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.2.50:"));

    let on_a = listed(&proxy, &format!("backend={}", a.addr)).await;
    assert_eq!(on_a["total"], proxy.backend(a.addr).active());
    assert_eq!(on_a["total"], 25, "round robin over two");
    assert!(on_a["connections"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["backend"] == a.addr.to_string()));
    assert_eq!(listed(&proxy, "client=127.0.1.0%2F24").await["total"], 10);
    let some = listed(&proxy, "limit=5").await;
    assert_eq!(
        (
            some["total"].as_u64(),
            some["connections"].as_array().unwrap().len()
        ),
        (Some(50), 5)
    );

    // One by id, with the default reset: both sides see it; the end says `killed`.
    let newest = ids[0];
    let r = admin(&proxy, "DELETE", &format!("/connections/{newest}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["killed"], 1);
    let mut victim = clients.pop().unwrap();
    assert_eq!(client_end(&mut victim).await, Seen::Reset);
    assert_eq!(backend_end(&mut ended).await, Seen::Reset);
    proxy.wait_ended(Outcome::Killed, 1).await;
    let again = admin(&proxy, "DELETE", &format!("/connections/{newest}")).await;
    assert_eq!(again.status, 404, "gone once killed");

    // One with a FIN: both sides read an end of stream.
    let r = admin(
        &proxy,
        "DELETE",
        &format!("/connections/{}?how=fin", ids[1]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut victim = clients.pop().unwrap();
    assert_eq!(client_end(&mut victim).await, Seen::Eof);
    assert_eq!(backend_end(&mut ended).await, Seen::Eof);
    proxy.wait_ended(Outcome::Killed, 2).await;

    // Every match of a filter, and no other.
    let no_filter = admin(&proxy, "DELETE", "/connections").await;
    assert_eq!(no_filter.status, 400, "a kill by filter needs a filter");
    let r = admin(
        &proxy,
        "DELETE",
        &format!("/connections?listen={}&client=127.0.1.0%2F24", proxy.addr),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["killed"], 10);
    for c in clients.iter_mut().take(10) {
        assert_eq!(client_end(c).await, Seen::Reset);
    }
    proxy.wait_ended(Outcome::Killed, 12).await;
    for (i, c) in clients.iter_mut().enumerate().skip(10) {
        let msg = payload(i as u64, 10);
        c.write_all(&msg)
            .await
            .expect("a connection the filter did not match goes on");
        let mut back = [0u8; 10];
        within(
            Duration::from_secs(5),
            "echo after the kills",
            c.read_exact(&mut back),
        )
        .await
        .expect("echo");
    }
    assert_eq!(listed(&proxy, "").await["total"], 38);
    let bad = admin(&proxy, "GET", "/connections?client=nope").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("client"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_filtered_and_killed_on_the_ring() {
    listed_filtered_and_killed(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_filtered_and_killed_on_epoll() {
    listed_filtered_and_killed(RelayMode::Epoll).await;
}

/// A connection still waiting in a full backend's queue is killed at once on the ring (a worker is
/// woken for it), listed as `connecting` until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_connection_is_killed_at_once_on_the_ring() {
    let (tx, _ended) = mpsc::unbounded_channel();
    let a = reporting_echo([127, 0, 0, 33], tx).await;
    let yaml = format!(
        "admin: {{listen: \"127.0.0.1:0\"}}\nlog: {{level: warn}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: ring\n    queue: {{max: 10, timeout: 30s}}\n    backends:\n      - {{address: \"{}\", max_connections: 1}}\n",
        a.addr
    );
    let proxy = Proxy::start(&yaml).await;
    let _first = held_client(proxy.addr, Ipv4Addr::new(127, 0, 3, 1), 10).await;
    let mut waiting = TcpStream::connect(proxy.addr).await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "the second connection queued",
        || async { listed(&proxy, "state=connecting").await["total"] == 1 },
    )
    .await;
    let queued = listed(&proxy, "state=connecting").await;
    let id = queued["connections"][0]["id"].as_u64().expect("its id");
    let r = admin(&proxy, "DELETE", &format!("/connections/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut buf = [0u8; 8];
    let end = within(
        Duration::from_secs(5),
        "the queued client's end",
        waiting.read(&mut buf),
    )
    .await;
    assert!(matches!(end, Ok(0) | Err(_)), "closed: {end:?}");
    proxy.wait_ended(Outcome::Killed, 1).await;
    assert_eq!(listed(&proxy, "").await["total"], 1, "the first goes on");
}
