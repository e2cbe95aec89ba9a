//! The edge, through real sockets on loopback: PROXY protocol in and out, connection caps (per
//! backend with its queue, per service, over every service), per-source limits, allow and deny
//! lists, and their reload (docs/reliability.md, "The edge").

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::common::*;
use sluicegate::config::{Config, ProxyVersion, RelayMode};
use sluicegate::proxy_protocol::{self, Header, Parsed};
use sluicegate::Outcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `data`, half-closes, and returns everything that comes back (an echo backend's answer).
async fn exchange(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.expect("write");
    s.shutdown().await.expect("shutdown");
    within(Duration::from_secs(5), "the answer", read_all(&mut s))
        .await
        .unwrap_or_default()
}

/// True when the proxy closes `s` without sending anything (a refusal).
async fn refused(mut s: TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(
        within(Duration::from_secs(5), "the close", s.read(&mut b)).await,
        Ok(0) | Err(_)
    )
}

fn parse_all(bytes: &[u8]) -> (Header, &[u8]) {
    match proxy_protocol::parse(bytes) {
        Parsed::Done(h, n) => (h, &bytes[n..]),
        other => panic!(
            "no header in {:?}: {other:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_out_v1_and_v2_carries_the_client_and_the_address_it_reached() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    for (v, name) in [(ProxyVersion::V1, "v1"), (ProxyVersion::V2, "v2")] {
        for relay in [RelayMode::Copy, RelayMode::Splice, RelayMode::Ring] {
            let p = Proxy::start(&service_yaml(
                &[be.addr],
                relay,
                &format!("proxy_protocol: {name}"),
            ))
            .await;
            let s = connect_from([127, 0, 0, 5], p.addr).await;
            let me = s.local_addr().unwrap();
            let back = exchange(s, b"hello, backend").await;
            let (h, rest) = parse_all(&back);
            assert_eq!(
                h,
                Header::Proxy {
                    client: me,
                    dst: p.addr
                },
                "{v:?} {relay:?}"
            );
            assert_eq!(
                rest, b"hello, backend",
                "the client's bytes follow untouched"
            );
        }
    }
}

/// A backend that answers HTTP probes and records the first bytes of every connection.
async fn recording_backend() -> (Backend, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let be = Backend::start([127, 0, 0, 1], move |mut s: TcpStream| {
        let seen = s2.clone();
        async move {
            let mut b = vec![0u8; 256];
            let n = s.read(&mut b).await.unwrap_or(0);
            b.truncate(n);
            let probe = b.starts_with(b"GET /health");
            seen.lock().unwrap().push(b);
            if probe {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        }
    })
    .await;
    (be, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_send_no_proxy_header() {
    let (be, seen) = recording_backend().await;
    let _p = Proxy::start(&service_yaml(
        &[be.addr],
        RelayMode::Epoll,
        "proxy_protocol: v2\nhealth: {kind: http, path: /health, interval: 100ms, timeout: 1s, rise: 1, fall: 1}",
    ))
    .await;
    wait_for(Duration::from_secs(5), "three probes", || {
        seen.lock().unwrap().len() >= 3
    })
    .await;
    for first in seen.lock().unwrap().iter() {
        assert!(
            first.starts_with(b"GET /health"),
            "{:?}",
            String::from_utf8_lossy(first)
        );
    }
}

/// The two places a connection is admitted, its header read and its backend picked: the tokio
/// sessions (whatever their relay) and the ring workers.
const ENGINES: [RelayMode; 2] = [RelayMode::Epoll, RelayMode::Ring];

fn accept_yaml(be: &[SocketAddr], relay: RelayMode, from: &str, extra: &str) -> String {
    service_yaml(
        be,
        relay,
        &format!("accept_proxy: {{from: [{from}], timeout: 500ms}}\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_proxy_takes_the_client_from_the_header_and_sends_it_on() {
    for relay in ENGINES {
        let be = Backend::echo([127, 0, 0, 1]).await;
        let p = Proxy::start(&accept_yaml(
            &[be.addr],
            relay,
            "127.0.0.0/8",
            "proxy_protocol: v2",
        ))
        .await;
        // v1 in, v2 out; the header arrives in two writes.
        let mut s = connect_from([127, 0, 0, 1], p.addr).await;
        s.set_nodelay(true).unwrap();
        s.write_all(b"PROXY TCP4 192.0.2.9 198.51.100.1 4000")
            .await
            .unwrap();
        let back = exchange(s, b" 443\r\nafter the header").await;
        let (h, rest) = parse_all(&back);
        assert_eq!(
            h,
            Header::Proxy {
                client: sa("192.0.2.9:4000"),
                dst: sa("198.51.100.1:443")
            }
        );
        assert_eq!(rest, b"after the header");
        // v2 in (IPv6), v2 out.
        let hdr = proxy_protocol::encode(
            ProxyVersion::V2,
            sa("[2001:db8::9]:5000"),
            sa("[2001:db8::1]:443"),
        );
        let back = exchange(
            connect_from([127, 0, 0, 1], p.addr).await,
            &[hdr.as_slice(), b"x"].concat(),
        )
        .await;
        let (h, rest) = parse_all(&back);
        assert_eq!(
            h,
            Header::Proxy {
                client: sa("[2001:db8::9]:5000"),
                dst: sa("[2001:db8::1]:443")
            }
        );
        assert_eq!(rest, b"x");
        // A v2 LOCAL header (a health check of the balancer in front): served, with the real endpoints.
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let s = connect_from([127, 0, 0, 7], p.addr).await;
        let me = s.local_addr().unwrap();
        let back = exchange(s, &[local.as_slice(), b"y"].concat()).await;
        let (h, rest) = parse_all(&back);
        assert_eq!(
            h,
            Header::Proxy {
                client: me,
                dst: p.addr
            }
        );
        assert_eq!(rest, b"y");
        assert_eq!(p.service.stats.ended(Outcome::ProxyHeader), 0);
        // Counted when each connection is accounted, which may follow the client's EOF.
        let want = if relay == RelayMode::Ring { 3 } else { 0 };
        let stats = &p.service.stats;
        wait_for(Duration::from_secs(5), "every connection counted", || {
            stats.ring_total() == want
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_and_limits_use_the_client_from_the_header() {
    for relay in ENGINES {
        let bes = [
            Backend::echo([127, 0, 0, 2]).await,
            Backend::echo([127, 0, 0, 3]).await,
            Backend::echo([127, 0, 0, 4]).await,
        ];
        let addrs: Vec<SocketAddr> = bes.iter().map(|b| b.addr).collect();
        let p = Proxy::start(&accept_yaml(
            &addrs,
            relay,
            "127.0.0.1",
            "balance: source_hash\nlimits: {per_source_connections: 1}",
        ))
        .await;
        let snap = p.service.pool.snapshot();
        for i in 1..=12u8 {
            let client = SocketAddr::from(([192, 0, 2, i], 1000));
            let want = snap.peek(client).expect("a route");
            let before: Vec<u64> = bes.iter().map(|b| b.accepted()).collect();
            let hdr = proxy_protocol::encode(ProxyVersion::V1, client, p.addr);
            let back = exchange(
                connect_from([127, 0, 0, 1], p.addr).await,
                &[hdr.as_slice(), b"z"].concat(),
            )
            .await;
            assert_eq!(back, b"z");
            let went: Vec<SocketAddr> = bes
                .iter()
                .zip(&before)
                .filter(|(b, n)| b.accepted() > **n)
                .map(|(b, _)| b.addr)
                .collect();
            assert_eq!(went, vec![want], "client {client} went where /route says");
        }
        // One connection per client address: a second with the same header client is refused, another
        // client through the same balancer is not.
        let hdr = |ip: [u8; 4]| {
            proxy_protocol::encode(ProxyVersion::V2, SocketAddr::from((ip, 1)), p.addr)
        };
        let mut first = connect_from([127, 0, 0, 1], p.addr).await;
        first
            .write_all(&[hdr([192, 0, 2, 50]).as_slice(), b"ping"].concat())
            .await
            .unwrap();
        let mut b = [0u8; 4];
        first.read_exact(&mut b).await.unwrap();
        let mut second = connect_from([127, 0, 0, 1], p.addr).await;
        second.write_all(&hdr([192, 0, 2, 50])).await.unwrap();
        assert!(refused(second).await);
        p.wait_ended(Outcome::SourceLimit, 1).await;
        let other = exchange(
            connect_from([127, 0, 0, 1], p.addr).await,
            &[hdr([192, 0, 2, 51]).as_slice(), b"ok"].concat(),
        )
        .await;
        assert_eq!(other, b"ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_from_an_untrusted_source_is_refused_and_nothing_reaches_a_backend() {
    for relay in ENGINES {
        let be = Backend::echo([127, 0, 0, 1]).await;
        let p = Proxy::start(&accept_yaml(&[be.addr], relay, "127.0.0.2/32", "")).await;
        // A spoofed client address from a host that is not the balancer in front.
        let spoof = proxy_protocol::encode(ProxyVersion::V1, sa("192.0.2.1:1"), p.addr);
        let mut s = connect_from([127, 0, 0, 1], p.addr).await;
        s.write_all(&[spoof.as_slice(), b"data"].concat())
            .await
            .unwrap();
        assert!(refused(s).await);
        p.wait_ended(Outcome::ProxyHeader, 1).await;
        assert_eq!(be.accepted(), 0, "no backend was contacted");
        // From the trusted one, the same header is taken.
        let ok = exchange(
            connect_from([127, 0, 0, 2], p.addr).await,
            &[spoof.as_slice(), b"data"].concat(),
        )
        .await;
        assert_eq!(ok, b"data");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_truncated_or_late_header_is_refused() {
    for relay in ENGINES {
        let be = Backend::echo([127, 0, 0, 1]).await;
        let p = Proxy::start(&accept_yaml(&[be.addr], relay, "127.0.0.1", "")).await;
        let sig = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        let v2 = |rest: &[u8]| [sig.as_slice(), rest].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "no header at all",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            ),
            (
                "v1 without CRLF",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n".to_vec(),
            ),
            (
                "v1 port with a leading zero",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n".to_vec(),
            ),
            (
                "v1 port too large",
                b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n".to_vec(),
            ),
            (
                "v1 family mismatch",
                b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n".to_vec(),
            ),
            (
                "v1 too long",
                [b"PROXY TCP4 ".as_slice(), &[b'9'; 120]].concat(),
            ),
            (
                "v1 unknown protocol",
                b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n".to_vec(),
            ),
            (
                "v2 version 1",
                v2(&[0x11, 0x11, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            (
                "v2 command 2",
                v2(&[0x22, 0x11, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            ("v2 short IPv4 block", v2(&[0x21, 0x11, 0, 4, 1, 2, 3, 4])),
            (
                "v2 short IPv6 block",
                v2(&[0x21, 0x21, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            ("v2 family 5", v2(&[0x21, 0x51, 0, 0])),
            ("v2 longer than 4096", v2(&[0x21, 0x11, 0x20, 0x00])),
        ];
        let mut n = 0;
        for (what, bytes) in &cases {
            let mut s = connect_from([127, 0, 0, 1], p.addr).await;
            s.write_all(bytes).await.unwrap();
            assert!(refused(s).await, "{what}");
            n += 1;
            p.wait_ended(Outcome::ProxyHeader, n).await;
        }
        // Truncated: half a header, then the client closes.
        let whole = proxy_protocol::encode(ProxyVersion::V2, sa("192.0.2.1:1"), sa("192.0.2.2:2"));
        let mut s = connect_from([127, 0, 0, 1], p.addr).await;
        s.write_all(&whole[..20]).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(refused(s).await, "truncated");
        n += 1;
        p.wait_ended(Outcome::ProxyHeader, n).await;
        // Late: nothing within the timeout (500 ms), or half a header and then silence.
        for part in [&b""[..], &b"PROXY TCP4 192.0.2.1"[..]] {
            let mut s = connect_from([127, 0, 0, 1], p.addr).await;
            s.write_all(part).await.unwrap();
            let t = Instant::now();
            assert!(refused(s).await, "late");
            assert!(
                t.elapsed() >= Duration::from_millis(400),
                "closed at the timeout, not before"
            );
            n += 1;
            p.wait_ended(Outcome::ProxyHeader, n).await;
        }
        assert_eq!(be.accepted(), 0, "nothing of any of them reached a backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_is_skipped_and_when_all_are_full_the_refusal_is_fast() {
    for relay in ENGINES {
        let a = Backend::echo([127, 0, 0, 2]).await;
        let b = Backend::echo([127, 0, 0, 3]).await;
        let y = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: {relay}\n    balance: source_hash\n    backends:\n      - {{address: \"{}\", max_connections: 1}}\n      - {{address: \"{}\", max_connections: 1}}\n",
        a.addr, b.addr, relay = relay.as_str()
    );
        let p = Proxy::start(&y).await;
        // The same client twice: source_hash would send both to one backend; the second goes to the other.
        let s1 = held([127, 0, 0, 1], p.addr).await;
        let s2 = held([127, 0, 0, 1], p.addr).await;
        assert_eq!((a.accepted(), b.accepted()), (1, 1), "one each");
        assert!(refused(connect_from([127, 0, 0, 1], p.addr).await).await);
        p.wait_ended(Outcome::BackendsFull, 1).await;
        assert_eq!((a.accepted(), b.accepted()), (1, 1), "no connect attempt");
        drop(s1);
        wait_for(Duration::from_secs(5), "a slot frees", || {
            p.active_to_backends() == 1
        })
        .await;
        let s3 = held([127, 0, 0, 1], p.addr).await;
        drop((s2, s3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_waits_for_a_free_backend_within_its_bounds() {
    for relay in ENGINES {
        let a = Backend::echo([127, 0, 0, 2]).await;
        let y = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    relay: {relay}\n    queue: {{max: 1, timeout: 800ms}}\n    backends:\n      - {{address: \"{}\", max_connections: 1}}\n",
        a.addr, relay = relay.as_str()
    );
        let p = Proxy::start(&y).await;
        let s1 = held([127, 0, 0, 1], p.addr).await;
        // Queued: it waits; a second waiter is refused at once (the queue holds one).
        let mut waiting = connect_from([127, 0, 0, 1], p.addr).await;
        waiting.write_all(b"wait").await.unwrap();
        wait_for(Duration::from_secs(5), "one waits", || {
            p.service.view().queue_waiting == 1
        })
        .await;
        assert!(refused(connect_from([127, 0, 0, 1], p.addr).await).await);
        p.wait_ended(Outcome::BackendsFull, 1).await;
        // The held one ends: the waiter gets the backend and its bytes through.
        drop(s1);
        let mut b = [0u8; 4];
        within(
            Duration::from_secs(5),
            "served after waiting",
            waiting.read_exact(&mut b),
        )
        .await
        .unwrap();
        assert_eq!(&b, b"wait");
        // Nobody frees the backend: the waiter is refused at the queue's timeout.
        let t = Instant::now();
        assert!(refused(connect_from([127, 0, 0, 1], p.addr).await).await);
        assert!(
            t.elapsed() >= Duration::from_millis(700),
            "waited {:?}",
            t.elapsed()
        );
        p.wait_ended(Outcome::BackendsFull, 2).await;
        drop(waiting);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_top_level_cap_counts_every_service() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let y = format!(
        "max_connections: 2\nshutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: a\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{0}\"}}]\n  - name: b\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{0}\"}}]\n",
        be.addr
    );
    let p = Proxy::start(&y).await;
    let (a, b) = (p.addrs[0], p.addrs[1]);
    let h1 = held([127, 0, 0, 1], a).await;
    let h2 = held([127, 0, 0, 1], b).await;
    assert!(refused(connect_from([127, 0, 0, 1], a).await).await);
    p.wait_ended(Outcome::GlobalMaxConnections, 1).await;
    drop(h2);
    wait_for(Duration::from_secs(5), "b's connection ends", || {
        p.control.services()[1].service.stats.active_now() == 0
    })
    .await;
    let h3 = held([127, 0, 0, 1], a).await;
    drop((h1, h3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_connections_and_rate() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let p = Proxy::start(&service_yaml(
        &[be.addr],
        RelayMode::Epoll,
        "limits: {per_source_connections: 2}",
    ))
    .await;
    let h1 = held([127, 0, 0, 1], p.addr).await;
    let h2 = held([127, 0, 0, 1], p.addr).await;
    assert!(refused(connect_from([127, 0, 0, 1], p.addr).await).await);
    p.wait_ended(Outcome::SourceLimit, 1).await;
    let other = held([127, 0, 0, 2], p.addr).await;
    drop(h1);
    wait_for(Duration::from_secs(5), "one ends", || {
        p.active_to_backends() == 2
    })
    .await;
    let h3 = held([127, 0, 0, 1], p.addr).await;
    drop((h2, h3, other));

    let rated = Proxy::start(&service_yaml(
        &[be.addr],
        RelayMode::Epoll,
        "limits: {per_source_rate: 2}",
    ))
    .await;
    let t = Instant::now();
    let mut served = 0u32;
    for _ in 0..20 {
        if exchange(connect_from([127, 0, 0, 3], rated.addr).await, b"r").await == b"r" {
            served += 1;
        }
    }
    // Two at once, then two a second.
    let allowed = 2.0 + 2.0 * t.elapsed().as_secs_f64() + 1.0;
    assert!(
        served >= 2 && f64::from(served) <= allowed,
        "served {served} in {:?}",
        t.elapsed()
    );
    assert_eq!(
        rated.service.stats.ended(Outcome::SourceLimit),
        u64::from(20 - served)
    );
    assert!(
        exchange(connect_from([127, 0, 0, 4], rated.addr).await, b"r").await == b"r",
        "another source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_and_their_reload_keep_open_connections() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let yaml = |limits: &str| service_yaml(&[be.addr], RelayMode::Epoll, limits);
    let p = Proxy::start(&yaml("limits: {allow: [127.0.0.0/24], deny: [127.0.0.2]}")).await;
    let kept = held([127, 0, 0, 3], p.addr).await;
    assert!(
        refused(connect_from([127, 0, 0, 2], p.addr).await).await,
        "deny wins"
    );
    assert!(
        refused(connect_from([127, 0, 1, 1], p.addr).await).await,
        "outside allow"
    );
    p.wait_ended(Outcome::Denied, 2).await;
    assert_eq!(be.accepted(), 1);
    // Reload: 127.0.0.3 is denied from now on; its open session goes on.
    let cfg = Config::from_yaml(&yaml("limits: {deny: [127.0.0.3]}")).unwrap();
    p.control.reload(cfg).expect("reload");
    assert!(refused(connect_from([127, 0, 0, 3], p.addr).await).await);
    p.wait_ended(Outcome::Denied, 3).await;
    let mut kept = kept;
    kept.write_all(b"more").await.unwrap();
    let mut b = [0u8; 4];
    within(
        Duration::from_secs(5),
        "the open session",
        kept.read_exact(&mut b),
    )
    .await
    .unwrap();
    assert_eq!(&b, b"more");
    assert_eq!(
        exchange(connect_from([127, 0, 0, 2], p.addr).await, b"now").await,
        b"now"
    );
}

#[test]
fn bad_edge_config_is_refused_naming_the_key() {
    for (yaml, want) in [
        ("accept_proxy: {from: []}", "services[0].accept_proxy.from"),
        ("accept_proxy: {from: [10.0.0.1/8]}", "host bits"),
        ("accept_proxy: {from: [nonsense]}", "not an address block"),
        (
            "limits: {per_source_rate: 0}",
            "services[0].limits.per_source_rate",
        ),
        ("limits: {allow: [300.0.0.0/8]}", "not an address block"),
        (
            "queue: {max: 5, timeout: 1s}",
            "no backend sets max_connections",
        ),
        ("proxy_protocol: v3", "proxy_protocol"),
    ] {
        let y = service_yaml(&[sa("127.0.0.1:9")], RelayMode::Epoll, yaml);
        let err = Config::from_yaml(&y).expect_err(yaml).to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}
