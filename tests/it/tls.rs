//! TLS at layer 4 (docs/configuration.md "Shared addresses and TLS"): routes on a shared address by
//! the ClientHello's server name and protocols, passthrough that leaves each backend its own
//! certificate, termination with per-service certificates and client certificates, origination to
//! TLS backends, certificates read again on reload, port ranges. Certificates are made by `openssl`
//! for each test (common/pki.rs); clients and TLS backends are rustls.

use std::net::SocketAddr;
use std::time::Duration;

use sluicegate::config::{Config, RelayMode};
use sluicegate::tls::hello::build::{client_hello, records};
use sluicegate::Outcome;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::common::http::get;
use crate::common::pki::{
    connector, connector_tls12_only, tls_connect, tls_echo_backend, Pair, Pki,
};
use crate::common::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A free port on `ip` now (bound, then released): a shared address needs a real port, and port 0
/// is never shared.
fn free_addr(ip: [u8; 4]) -> SocketAddr {
    let l = std::net::TcpListener::bind(SocketAddr::from((ip, 0))).expect("bind");
    l.local_addr().expect("addr")
}

/// A backend that says its name on a line of its own, then echoes everything until EOF.
async fn tagged(ip: [u8; 4], name: &'static str) -> Backend {
    Backend::start(ip, move |mut s| async move {
        if s.write_all(format!("{name}\n").as_bytes()).await.is_ok() {
            echo(s).await;
        }
    })
    .await
}

/// Sends `first` (in pieces of `piece` bytes, pausing between them), then reads the backend's name
/// and the echo of exactly what was sent: which backend took the connection and whether it received
/// every byte, from the first.
async fn who_echoes(addr: SocketAddr, first: &[u8], piece: usize) -> std::io::Result<String> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    for chunk in first.chunks(piece) {
        w.write_all(chunk).await?;
        if piece < first.len() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut r = BufReader::new(r);
    let mut name = String::new();
    r.read_line(&mut name).await?;
    if name.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let mut back = vec![0u8; first.len()];
    r.read_exact(&mut back).await?;
    assert_eq!(
        back, first,
        "{name}: the backend got every byte, from the first"
    );
    Ok(name.trim().to_string())
}

fn service(name: &str, listen: SocketAddr, keys: &str, backend: SocketAddr) -> String {
    format!("  - {{name: {name}, listen: \"{listen}\", {keys} backends: [{{address: \"{backend}\"}}]}}\n")
}

fn config(services: &str) -> String {
    format!("shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n{services}")
}

/// docs/reliability.md `sni-routes`: one address, five services: exact names, a wildcard, an ALPN
/// route and the default. Each client reaches the service its hello names, even a hello written 7
/// bytes at a time; a client that sends no name, or is not TLS at all, reaches the default; the
/// backend receives every byte from the first. `/route` explains each choice without a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_exact_wildcard_alpn_and_default() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let acme = tagged([127, 0, 0, 2], "acme").await;
    let wild = tagged([127, 0, 0, 2], "wild").await;
    let db = tagged([127, 0, 0, 2], "db").await;
    let dflt = tagged([127, 0, 0, 2], "default").await;
    let yaml = config(
        &[
            service("a", addr, "sni: [a.example.com, www.example.com],", a.addr),
            service(
                "acme",
                addr,
                "sni: [a.example.com], alpn: [acme-tls/1],",
                acme.addr,
            ),
            service("wild", addr, "sni: [\"*.b.example\"],", wild.addr),
            service("db", addr, "sni: [db.b.example],", db.addr),
            service("default", addr, "", dflt.addr),
        ]
        .concat(),
    );
    let p = Proxy::start(&yaml).await;
    let cases: [(Option<&str>, &[&str], &str); 9] = [
        (Some("a.example.com"), &["h2"], "a"),
        (Some("WWW.Example.Com"), &[], "a"),
        (Some("a.example.com"), &["acme-tls/1"], "acme"),
        (Some("x.b.example"), &[], "wild"),
        (Some("db.b.example"), &[], "db"),
        (Some("y.x.b.example"), &[], "default"),
        (Some("unknown.example"), &[], "default"),
        (None, &[], "default"),
        (None, &["acme-tls/1"], "default"),
    ];
    for (sni, alpn, want) in cases {
        let hello = client_hello(sni, alpn);
        assert_eq!(
            who_echoes(addr, &hello, hello.len()).await.unwrap(),
            want,
            "{sni:?} {alpn:?}"
        );
    }
    // A hello in 7-byte pieces, and one in 7-byte records.
    let hello = client_hello(Some("x.b.example"), &[]);
    assert_eq!(who_echoes(addr, &hello, 7).await.unwrap(), "wild");
    let in_records = records(&hello[5..], 7);
    assert_eq!(who_echoes(addr, &in_records, 64).await.unwrap(), "wild");
    // Not TLS: the default, every byte passed on.
    assert_eq!(
        who_echoes(addr, b"GET / HTTP/1.1\r\n\r\n", 100)
            .await
            .unwrap(),
        "default"
    );

    let admin = p.admin.unwrap();
    for (query, service, why) in [
        ("sni=a.example.com&alpn=h2", "a", "exact"),
        ("sni=a.example.com&alpn=h2,acme-tls/1", "acme", "exact+alpn"),
        ("sni=x.b.example", "wild", "wildcard"),
        ("sni=nobody.example", "default", "default"),
        ("", "default", "default"),
    ] {
        let r = get(admin, &format!("/route?listen={addr}&{query}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["service"], service, "{query}: {v}");
        assert_eq!(v["route"], why, "{query}: {v}");
    }
    // Asking changed nothing: the services' counts are the connections made above.
    let db_svc = p.control.service("db").unwrap();
    assert_eq!(db_svc.stats.accepted_total(), 1);
}

/// docs/reliability.md `sni-no-route`: an address without a default closes a client no route takes
/// (`no_route`) and a malformed, oversized, cut or late hello (`tls_hello`), and none of them reaches
/// a backend; the address counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_and_bad_hellos_reach_no_backend() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let yaml = config(&service(
        "a",
        addr,
        "sni: [a.example], client_hello_timeout: 300ms,",
        a.addr,
    ));
    let p = Proxy::start(&yaml).await;
    let closed = |first: Vec<u8>| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&first).await.unwrap();
        let mut got = Vec::new();
        let r = within(SECS(5), "closed", s.read_to_end(&mut got)).await;
        assert!(r.is_err() || got.is_empty(), "nothing comes back: {got:?}");
    };
    closed(client_hello(Some("b.example"), &[])).await;
    closed(client_hello(None, &[])).await;
    closed(b"SSH-2.0-OpenSSH\r\n".to_vec()).await;
    // Silent past client_hello_timeout: no hello, so no route here either.
    closed(Vec::new()).await;
    let no_route = 4;
    let good = client_hello(Some("a.example"), &["h2"]);
    let mut not_a_hello = good.clone();
    not_a_hello[5] = 2; // a ServerHello
    let mut alert_inside = records(&good[5..], 20);
    alert_inside[25] = 21;
    let mut oversized = vec![22, 3, 1, 0x40, 0x00, 1, 0, 0x50, 0x00];
    oversized.resize(17 * 1024, 0);
    for bad in [not_a_hello, alert_inside, oversized] {
        closed(bad).await;
    }
    // Cut short: half a hello, then the client closes its side.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good[..good.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    let _ = within(SECS(5), "closed", s.read_to_end(&mut got)).await;
    // Late: a part of the hello, then nothing for longer than client_hello_timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good[..10]).await.unwrap();
    let r = within(SECS(5), "closed after the timeout", s.read_to_end(&mut got)).await;
    assert!(r.is_err() || got.is_empty());
    let bad_hellos = 5;
    assert_eq!(a.accepted(), 0, "no backend was contacted");
    let admin = p.admin.unwrap();
    wait_until(SECS(5), "counted", || async move {
        let m = get(admin, "/metrics").await.body;
        unrouted(&m, addr, "no_route") == Some(no_route)
            && unrouted(&m, addr, "tls_hello") == Some(bad_hellos)
    })
    .await;
    // And the good one goes through.
    assert_eq!(who_echoes(addr, &good, good.len()).await.unwrap(), "a");
}

/// The value of `sluicegate_unrouted_connections_total` for `addr` and `end` in the `/metrics` page `m`.
fn unrouted(m: &str, addr: SocketAddr, end: &str) -> Option<u64> {
    series(
        m,
        &format!("sluicegate_unrouted_connections_total{{listen=\"{addr}\",end=\"{end}\"}}"),
    )
}

/// The value of the series named exactly `name` (labels included) in the `/metrics` page `m`.
fn series(m: &str, name: &str) -> Option<u64> {
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// docs/reliability.md `sni-pending-cap`: a shared address with `max_pending: 4` and a long
/// `client_hello_timeout`: four clients connect and send nothing; three more are closed at once,
/// without a byte and long before the hello timeout (`pending_full`), the gauge holding at 4. Once the
/// silent ones leave, a real hello routes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_their_route_are_capped() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let yaml = config(&service(
        "a",
        addr,
        "sni: [a.example], client_hello_timeout: 60s, max_pending: 4,",
        a.addr,
    ));
    let p = Proxy::start(&yaml).await;
    let admin = p.admin.unwrap();
    let pending = format!("sluicegate_unrouted_pending{{listen=\"{addr}\"}}");
    let pending = pending.as_str();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    wait_until(SECS(10), "four waiting for their route", || async move {
        series(&get(admin, "/metrics").await.body, pending) == Some(4)
    })
    .await;
    for i in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut got = Vec::new();
        // Without the cap it would wait the whole 60 s hello timeout.
        let r = within(SECS(15), "closed at once", s.read_to_end(&mut got)).await;
        assert!(
            r.is_err() || got.is_empty(),
            "{i}: nothing comes back: {got:?}"
        );
    }
    let m = get(admin, "/metrics").await.body;
    assert_eq!(unrouted(&m, addr, "pending_full"), Some(3), "{m}");
    assert_eq!(series(&m, pending), Some(4), "{m}");
    assert_eq!(a.accepted(), 0);
    drop(silent);
    wait_until(SECS(10), "none waiting", || async move {
        series(&get(admin, "/metrics").await.body, pending) == Some(0)
    })
    .await;
    let good = client_hello(Some("a.example"), &[]);
    assert_eq!(who_echoes(addr, &good, good.len()).await.unwrap(), "a");
}

/// docs/reliability.md `sni-server-first`: a client that sends nothing (a protocol where the server
/// speaks first: SMTP, SSH) has no hello, and goes to the address's default once
/// `client_hello_timeout` has passed; the default's greeting reaches it, and it is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_goes_to_the_default_after_the_hello_timeout() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let smtp = Backend::start([127, 0, 0, 3], |mut s| async move {
        let _ = s.write_all(b"220 mail.example ESMTP\r\n").await;
        let mut line = [0u8; 64];
        if let Ok(n) = s.read(&mut line).await {
            let _ = s.write_all(&line[..n]).await;
        }
    })
    .await;
    let yaml = config(
        &[
            service(
                "a",
                addr,
                "sni: [a.example], client_hello_timeout: 300ms,",
                a.addr,
            ),
            service("mail", addr, "client_hello_timeout: 300ms,", smtp.addr),
        ]
        .concat(),
    );
    let _p = Proxy::start(&yaml).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let mut s = BufReader::new(s);
    let mut greeting = String::new();
    within(
        SECS(5),
        "the default's greeting",
        s.read_line(&mut greeting),
    )
    .await
    .unwrap();
    assert_eq!(greeting, "220 mail.example ESMTP\r\n");
    s.get_mut().write_all(b"EHLO c\r\n").await.unwrap();
    let mut echo = String::new();
    within(SECS(5), "the echo", s.read_line(&mut echo))
        .await
        .unwrap();
    assert_eq!(echo, "EHLO c\r\n");
    assert_eq!(a.accepted(), 0);
}

/// docs/reliability.md `sni-reload-routes`: a reload adds a route to a shared address and removes
/// its default while a connection routed there is open: the open one keeps relaying, the new name
/// reaches its new service, and a client without a name finds no route any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_routes_under_an_open_connection() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let b = tagged([127, 0, 0, 3], "b").await;
    let d = tagged([127, 0, 0, 4], "d").await;
    let before = config(
        &[
            service("a", addr, "sni: [a.example],", a.addr),
            service("d", addr, "", d.addr),
        ]
        .concat(),
    );
    let p = Proxy::start(&before).await;
    assert_eq!(
        who_echoes(addr, &client_hello(None, &[]), 4096)
            .await
            .unwrap(),
        "d"
    );
    // Open through the reload: the name line read, then an echo on each side of it.
    let hello = client_hello(Some("a.example"), &[]);
    let s = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(&hello).await.unwrap();
    let mut name = String::new();
    r.read_line(&mut name).await.unwrap();
    assert_eq!(name, "a\n");
    let mut back = vec![0u8; hello.len()];
    r.read_exact(&mut back).await.unwrap();
    let after = config(
        &[
            service("a", addr, "sni: [a.example],", a.addr),
            service("b", addr, "sni: [b.example],", b.addr),
        ]
        .concat(),
    );
    p.control
        .reload(Config::from_yaml(&after).unwrap())
        .expect("reloaded");
    w.write_all(b"still here").await.unwrap();
    let mut more = [0u8; 10];
    within(
        SECS(5),
        "the open connection relays",
        r.read_exact(&mut more),
    )
    .await
    .unwrap();
    assert_eq!(&more, b"still here");
    assert_eq!(
        who_echoes(addr, &client_hello(Some("b.example"), &[]), 4096)
            .await
            .unwrap(),
        "b"
    );
    assert!(
        who_echoes(addr, &client_hello(None, &[]), 4096)
            .await
            .is_err(),
        "no default any more"
    );
    assert_eq!(d.accepted(), 1);
}

/// docs/reliability.md `sni-passthrough`: two TLS backends with certificates of their own behind one
/// address, routed by name: each client verifies the backend's certificate for the name it asked
/// (sluicegate holds no key) and 1 MiB echoes back exactly; `relay: auto` still splices after the
/// hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_leaves_each_backend_its_own_certificate() {
    let pki = Pki::new("passthrough CA");
    let addr = free_addr([127, 0, 0, 1]);
    let a = tls_echo_backend([127, 0, 0, 2], &pki.server("a", &["a.example"])).await;
    let b = tls_echo_backend([127, 0, 0, 3], &pki.server("b", &["b.example"])).await;
    let yaml = config(
        &[
            service("a", addr, "sni: [a.example], relay: auto,", a.addr),
            service("b", addr, "sni: [b.example], relay: auto,", b.addr),
        ]
        .concat(),
    );
    let p = Proxy::start(&yaml).await;
    let c = connector(&pki, &[], None);
    for (name, backend) in [("a.example", &a), ("b.example", &b)] {
        let before = backend.accepted();
        let mut tls = tls_connect(&c, addr, name)
            .await
            .expect("the backend's own certificate");
        let data = payload(7, 1 << 20);
        let (mut r, mut w) = tokio::io::split(&mut tls);
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = within(SECS(30), "1 MiB echo", async { tokio::join!(send, recv) }).await;
        n.unwrap();
        assert_eq!(sha(&got), sha(&data), "{name}: exact");
        assert_eq!(backend.accepted(), before + 1, "{name} went to its backend");
    }
    // A name no route takes (no default here): closed before any backend or certificate.
    assert!(
        tls_connect(&c, addr, "c.example").await.is_err(),
        "no route"
    );
    let a_svc = p.control.service("a").unwrap();
    assert_eq!(a_svc.stats.spliced_total(), 1, "spliced after the hello");
}

/// A TLS service's numbers from `/metrics`: the handshakes by result.
async fn handshakes(admin: SocketAddr, service: &str, result: &str) -> u64 {
    let m = get(admin, "/metrics").await.body;
    let prefix =
        format!("sluicegate_tls_handshakes_total{{service=\"{service}\",result=\"{result}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads one echo through a TLS stream.
async fn tls_round_trip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within(SECS(5), "echo", s.read_exact(&mut back))
        .await
        .unwrap();
    back
}

/// The common name of the certificate a TLS client got.
fn peer_cn(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
    let cn = x509
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    cn
}

/// docs/reliability.md `tls-termination`: two services terminating TLS on one address, each with its
/// certificate, chosen by the client's name; the one without `sni` presents its own to every other
/// name; plaintext reaches the backends; half-close goes through as close_notify then FIN; the
/// handshakes and the certificate's expiry are in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_presents_each_services_certificate() {
    let pki = Pki::new("termination CA");
    let addr = free_addr([127, 0, 0, 1]);
    let a = pki.server("term-a", &["a.example"]);
    let other = pki.server("term-other", &["other.example", "b.example"]);
    let (ba, bo) = (
        Backend::echo([127, 0, 0, 2]).await,
        Backend::echo([127, 0, 0, 3]).await,
    );
    let tls = |p: &Pair| {
        format!(
            "tls: {{cert: \"{}\", key: \"{}\", alpn: [h2, http/1.1]}},",
            p.cert.display(),
            p.key.display()
        )
    };
    let yaml = config(
        &[
            service(
                "a",
                addr,
                &format!("sni: [a.example], {}", tls(&a)),
                ba.addr,
            ),
            service("other", addr, &tls(&other), bo.addr),
        ]
        .concat(),
    );
    let p = Proxy::start(&yaml).await;
    let c = connector(&pki, &["h2"], None);
    let mut ta = tls_connect(&c, addr, "a.example").await.unwrap();
    assert_eq!(peer_cn(&ta), "a.example");
    assert_eq!(ta.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(tls_round_trip(&mut ta, b"to a").await, b"to a");
    let mut tb = tls_connect(&c, addr, "b.example").await.unwrap();
    assert_eq!(peer_cn(&tb), "other.example", "the default's certificate");
    assert_eq!(tls_round_trip(&mut tb, b"to other").await, b"to other");
    // Half-close: the client's close_notify ends its direction; the echo backend then closes, and
    // the client reads EOF (the balancer's close_notify), not an error.
    ta.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(
        SECS(5),
        "EOF after the backend's FIN",
        ta.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert!(rest.is_empty());
    assert_eq!(ba.accepted(), 1);
    assert_eq!(bo.accepted(), 1);
    let admin = p.admin.unwrap();
    assert_eq!(handshakes(admin, "a", "ok").await, 1);
    let m = get(admin, "/metrics").await.body;
    let expiry = m
        .lines()
        .find(|l| l.starts_with("sluicegate_tls_certificate_expiry_timestamp_seconds{service=\"a\",name=\"a.example\"}"))
        .expect("expiry of a's certificate");
    let at: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    let in_days = (at - sluicegate_now()) / 86400.0;
    assert!(
        (88.0..=90.5).contains(&in_days),
        "90 days from now: {in_days}"
    );
    let stats = get(admin, "/stats").await.json();
    let days = &stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "a")
        .unwrap()["tls"]["days_left"];
    assert!(
        days.as_i64().is_some_and(|d| (88..=90).contains(&d)),
        "{days}"
    );
}

/// docs/reliability.md `tls-rsa-min-version`: termination with an RSA key, `min_version: "1.3"`: a
/// client of TLS 1.3 verifies the certificate and is relayed, its handshake timed in the histogram;
/// a client that speaks only TLS 1.2 is refused in the handshake (`failed`), no backend contacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_with_an_rsa_key_holds_its_minimum_version() {
    let pki = Pki::new("rsa CA");
    let pair = pki.server_rsa("rsa", &["rsa.example"]);
    let backend = tagged([127, 0, 0, 2], "plain").await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n  - name: r\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\", min_version: \"1.3\"}}\n    backends: [{{address: \"{}\"}}]\n",
        pair.cert.display(),
        pair.key.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    let mut tls = tls_connect(&connector(&pki, &[], None), p.addr, "rsa.example")
        .await
        .expect("TLS 1.3 with the RSA certificate");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut name = String::new();
    within(SECS(5), "the backend's name", async {
        let mut r = BufReader::new(&mut tls);
        r.read_line(&mut name).await
    })
    .await
    .unwrap();
    assert_eq!(name, "plain\n");
    drop(tls);
    let old = tls_connect(&connector_tls12_only(&pki), p.addr, "rsa.example").await;
    assert!(old.is_err(), "a TLS 1.2 client is refused");
    let admin = p.admin.unwrap();
    wait_until(SECS(5), "the refusal counted", || async move {
        handshakes(admin, "r", "failed").await == 1
    })
    .await;
    assert_eq!(handshakes(admin, "r", "ok").await, 1);
    assert_eq!(
        backend.accepted(),
        1,
        "the refused client reached no backend"
    );
    let m = get(admin, "/metrics").await.body;
    assert!(
        m.lines()
            .any(|l| l == "sluicegate_tls_handshake_duration_seconds_count{service=\"r\"} 1"),
        "one handshake timed"
    );
}

fn sluicegate_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Reads a PROXY v2 header whole (its length is in its first 16 bytes).
async fn read_v2(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await.unwrap();
    [head.to_vec(), rest].concat()
}

/// The TLVs of a version 2 PROXY header (after its 16 + 12 bytes of IPv4 addresses): (type, value).
fn tlvs(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut rest = &header[16 + 12..];
    let mut out = Vec::new();
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        out.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    out
}

/// docs/reliability.md `sni-proxy-tlvs`: a route passing TLS through with `proxy_protocol: v2` tells
/// its backend the server name and the first protocol the client offered (`PP2_TYPE_AUTHORITY`,
/// `PP2_TYPE_ALPN`), as HAProxy does; no SSL TLV, since nothing was terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_tells_its_backend_the_name_and_protocol_offered() {
    let addr = free_addr([127, 0, 0, 1]);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let tx = tx.clone();
        async move {
            let header = read_v2(&mut s).await;
            let _ = tx.send(header);
            echo(s).await;
        }
    })
    .await;
    let yaml = config(&service(
        "a",
        addr,
        "sni: [a.example], proxy_protocol: v2,",
        backend.addr,
    ));
    let _p = Proxy::start(&yaml).await;
    let hello = client_hello(Some("a.example"), &["h2", "http/1.1"]);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    within(SECS(5), "the hello echoed", s.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, hello);
    let header = within(SECS(5), "the header", rx.recv()).await.unwrap();
    let tlvs = tlvs(&header);
    assert!(tlvs.contains(&(0x02, b"a.example".to_vec())), "{tlvs:?}");
    assert!(tlvs.contains(&(0x01, b"h2".to_vec())), "{tlvs:?}");
    assert!(tlvs.iter().all(|(t, _)| *t != 0x20), "no SSL TLV: {tlvs:?}");
}

/// Whether a client presenting `client` (trusting `pki`) to `addr` is refused: its handshake fails,
/// or (TLS 1.3, where the client's handshake may finish before the server refuses its certificate)
/// its first read brings no echo.
async fn refused(pki: &Pki, client: Option<&Pair>, addr: SocketAddr) -> bool {
    let c = connector(pki, &[], client);
    match tls_connect(&c, addr, "svc.example").await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"x").await;
            let mut b = [0u8; 1];
            !matches!(within(SECS(5), "refusal", s.read(&mut b)).await, Ok(1))
        }
    }
}

/// docs/reliability.md `tls-client-cert`: `tls.client_ca` requires a client certificate: a client
/// without one and a client with another CA's are closed (`tls_client_cert`) and the backend never
/// sees them; a good one is relayed, and with `proxy_protocol: v2` the backend reads the client's
/// common name and the TLS version in the header's SSL TLV, as HAProxy sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_none_another_cas_and_good() {
    let pki = Pki::new("client CA");
    let other = Pki::new("someone else");
    let server = pki.server("cc-server", &["svc.example"]);
    let good = pki.client("cc-good", "alice");
    let foreign = other.client("cc-foreign", "mallory");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let tx = tx.clone();
        async move {
            let header = read_v2(&mut s).await;
            let _ = tx.send(header);
            echo(s).await;
        }
    })
    .await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n  - name: cc\n    listen: 127.0.0.1:0\n    proxy_protocol: v2\n    tls: {{cert: \"{}\", key: \"{}\", client_ca: \"{}\"}}\n    backends: [{{address: \"{}\"}}]\n",
        server.cert.display(),
        server.key.display(),
        pki.ca.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    for (who, client) in [("none", None), ("another CA's", Some(&foreign))] {
        assert!(refused(&pki, client, p.addr).await, "{who}: refused");
    }
    p.wait_ended(Outcome::TlsClientCert, 2).await;
    assert_eq!(backend.accepted(), 0, "the backend never sees them");
    let c = connector(&pki, &[], Some(&good));
    let mut s = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert_eq!(tls_round_trip(&mut s, b"hello").await, b"hello");
    let header = within(SECS(5), "the header", rx.recv()).await.unwrap();
    let tlvs = &header[16 + 12..];
    // PP2_TYPE_SSL (0x20) with client = SSL | CERT_CONN | CERT_SESS, verify 0, then its sub-TLVs.
    let at = tlvs
        .windows(1)
        .position(|w| w[0] == 0x20)
        .expect("an SSL TLV");
    let ssl = &tlvs[at + 3..];
    assert_eq!(ssl[0], 0x07, "client bits");
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
    let sub = &ssl[5..];
    let find = |kind: u8| {
        let mut i = 0;
        while i + 3 <= sub.len() {
            let len = u16::from_be_bytes([sub[i + 1], sub[i + 2]]) as usize;
            if sub[i] == kind {
                return Some(String::from_utf8_lossy(&sub[i + 3..i + 3 + len]).into_owned());
            }
            i += 3 + len;
        }
        None
    };
    assert_eq!(
        find(0x21).as_deref(),
        Some("TLSv1.3"),
        "PP2_SUBTYPE_SSL_VERSION"
    );
    assert_eq!(find(0x22).as_deref(), Some("alice"), "PP2_SUBTYPE_SSL_CN");
    assert_eq!(handshakes(p.admin.unwrap(), "cc", "client_cert").await, 2);
}

/// docs/reliability.md `tls-client-crl`: `tls.client_crl` with `client_ca`: of two clients the CA
/// signed, the one the list revokes is closed (`tls_client_cert`) and its backend never sees it, the
/// other is relayed. A reload reads the lists again: one revoking both refuses the second too; a list
/// that is not one is refused naming its file, and the lists in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused() {
    let pki = Pki::new("crl CA");
    let server = pki.server("crl-server", &["svc.example"]);
    let alice = pki.client("crl-alice", "alice");
    let bob = pki.client("crl-bob", "bob");
    let live = pki.dir.join("live-crl.pem");
    std::fs::copy(pki.crl("revoking-bob", &[&bob]), &live).unwrap();
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: crl\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\", client_ca: \"{}\", client_crl: [\"{}\"]}}\n    backends: [{{address: \"{}\"}}]\n",
        server.cert.display(),
        server.key.display(),
        pki.ca.display(),
        live.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    assert!(refused(&pki, Some(&bob), p.addr).await, "bob is revoked");
    p.wait_ended(Outcome::TlsClientCert, 1).await;
    assert_eq!(backend.accepted(), 0, "the backend never sees him");
    let c = connector(&pki, &[], Some(&alice));
    let mut s = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert_eq!(tls_round_trip(&mut s, b"alice").await, b"alice");

    std::fs::copy(pki.crl("revoking-both", &[&alice, &bob]), &live).unwrap();
    p.control
        .reload(Config::from_yaml(&yaml).unwrap())
        .expect("reloaded");
    assert!(
        refused(&pki, Some(&alice), p.addr).await,
        "alice revoked now"
    );
    p.wait_ended(Outcome::TlsClientCert, 2).await;
    assert_eq!(
        tls_round_trip(&mut s, b"still").await,
        b"still",
        "her open connection goes on"
    );

    std::fs::copy(&pki.ca, &live).unwrap();
    let err = p
        .control
        .reload(Config::from_yaml(&yaml).unwrap())
        .expect_err("a certificate is no revocation list");
    let err = err.to_string();
    assert!(
        err.contains("services[0].tls") && err.contains("live-crl.pem"),
        "{err}"
    );
    assert!(
        refused(&pki, Some(&alice), p.addr).await,
        "the lists in force stay"
    );
}

/// docs/reliability.md `tls-origination`: `backend_tls` with the test CA: a backend whose certificate
/// the CA signed serves; one with another CA's certificate is a failed connect (counted against it,
/// retried on the other, ejected after `max_fails`), and no client sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origination_trusts_its_ca_and_fails_over_from_others() {
    let pki = Pki::new("origination CA");
    let stranger = Pki::new("stranger CA");
    let trusted = tls_echo_backend(
        [127, 0, 0, 2],
        &pki.server("orig-good", &["backend.example"]),
    )
    .await;
    let untrusted = tls_echo_backend(
        [127, 0, 0, 3],
        &stranger.server("orig-bad", &["backend.example"]),
    )
    .await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: o\n    listen: 127.0.0.1:0\n    balance: round_robin\n    connect_attempts: 2\n    passive: {{max_fails: 2, cooldown: 60s}}\n    backend_tls: {{ca: \"{}\", server_name: backend.example}}\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n",
        pki.ca.display(),
        trusted.addr,
        untrusted.addr
    );
    let p = Proxy::start(&yaml).await;
    for i in 0..6 {
        let msg = format!("message {i}");
        let back = round_trip(p.addr, msg.as_bytes()).await.expect("served");
        assert_eq!(back, msg.as_bytes());
    }
    let bad = p.backend(untrusted.addr);
    assert!(bad.stats.failed() >= 2);
    assert!(bad.is_ejected(), "its certificate fails every connect");
    assert_eq!(p.backend(trusted.addr).stats.total(), 6);
}

/// docs/reliability.md `tls-cert-reload`: a reload reads the certificate again: new connections get
/// the new one, a connection open since before keeps working; a reload whose certificate file is
/// broken is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_certificates_again_and_open_connections_go_on() {
    let pki = Pki::new("reload CA");
    let first = pki.server("reload-1", &["svc.example", "first.example"]);
    let second = pki.server("reload-2", &["svc.example", "second.example"]);
    let live = Pair {
        cert: pki.dir.join("live.pem"),
        key: pki.dir.join("live.key"),
    };
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: r\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\"}}\n    backends: [{{address: \"{}\"}}]\n",
        live.cert.display(),
        live.key.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    let c = connector(&pki, &[], None);
    let mut open = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert_eq!(peer_cn(&open), "svc.example");
    let sans = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        let cert = s.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert).unwrap();
        format!(
            "{:?}",
            x509.subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
        )
    };
    assert!(sans(&open).contains("first.example"));
    assert_eq!(tls_round_trip(&mut open, b"before").await, b"before");

    std::fs::copy(&second.cert, &live.cert).unwrap();
    std::fs::copy(&second.key, &live.key).unwrap();
    let report = p
        .control
        .reload(Config::from_yaml(&yaml).unwrap())
        .expect("reloaded");
    assert_eq!(report.unchanged, vec!["r".to_string()], "{report:?}");
    let fresh = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert!(
        sans(&fresh).contains("second.example"),
        "the new certificate"
    );
    assert_eq!(
        tls_round_trip(&mut open, b"after").await,
        b"after",
        "the open connection goes on"
    );

    std::fs::write(&live.cert, "not a certificate").unwrap();
    let err = p
        .control
        .reload(Config::from_yaml(&yaml).unwrap())
        .expect_err("refused");
    assert!(err.to_string().contains("live.pem"), "{err}");
    let again = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert!(sans(&again).contains("second.example"), "nothing changed");
}

/// docs/reliability.md `port-range`: `listen` over a range of ports with `backend_port: same`: each
/// client reaches the backend's port equal to the one it reached, through the tokio workers and the
/// ring workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_range_keeps_the_port_the_client_reached() {
    for relay in [RelayMode::Epoll, RelayMode::Ring] {
        // Three consecutive ports free on both addresses (bound, then released). The kernel's
        // connects take even ports, and after a run of many connections (a benchmark's) their
        // TIME_WAIT sockets can hold every even port for a minute: the search waits that out.
        let deadline = Instant::now() + Duration::from_secs(90);
        let base = loop {
            let base = free_addr([127, 0, 0, 1]).port();
            let free = base <= 65000
                && (base..base + 3).all(|p| {
                    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                        && std::net::TcpListener::bind(("127.0.0.2", p)).is_ok()
                });
            if free {
                break base;
            }
            assert!(
                Instant::now() < deadline,
                "no three consecutive ports free on both addresses within 90 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let range: Vec<u16> = (base..base + 3).collect();
        let mut backends = Vec::new();
        for &port in &range {
            let l = listen(SocketAddr::from(([127, 0, 0, 2], port)));
            backends.push(Backend::serve(l, move |mut s| async move {
                let _ = s.write_all(format!("{port}\n").as_bytes()).await;
            }));
        }
        let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\"}}\nservices:\n  - name: ftp\n    listen: \"127.0.0.1:{}-{}\"\n    relay: {relay}\n    backend_port: same\n    backends: [{{address: \"127.0.0.2:{}\"}}]\n",
        range[0], range[2], range[0], relay = relay.as_str()
    );
        let p = Proxy::start(&yaml).await;
        for &port in &range {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let mut got = String::new();
            within(SECS(5), "the backend's port", s.read_to_string(&mut got))
                .await
                .unwrap();
            assert_eq!(got.trim(), port.to_string());
        }
        // /route says the same without a connection.
        let asked = get(
            p.admin.unwrap(),
            &format!("/route?listen=127.0.0.1:{}", range[2]),
        )
        .await
        .json();
        assert_eq!(
            asked["backend"],
            format!("127.0.0.2:{}", range[2]),
            "{asked}"
        );
        drop(backends);
    }
}

/// docs/reliability.md `listen-both-families`: `listen: ["0.0.0.0:P", "[::]:P"]` binds both (the
/// IPv6 one IPv6-only) and serves a client of each family. Before, `[::]` was bound dual-stack: the
/// second bind failed with EADDRINUSE, or validation refused the pair across services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_list_takes_both_families_on_one_port() {
    let backend = Backend::start([127, 0, 0, 2], |mut s| async move {
        let _ = s.write_all(b"served\n").await;
    })
    .await;
    let port = (0..50)
        .map(|_| free_addr([127, 0, 0, 1]).port())
        .find(|&p| {
            let v4 = std::net::TcpListener::bind(("0.0.0.0", p));
            let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
                .and_then(|s| {
                    s.set_only_v6(true)?;
                    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p)).into())
                });
            v4.is_ok() && v6.is_ok()
        })
        .expect("a port free on 0.0.0.0 and [::] in 50 tries");
    let yaml = format!(
        "log: {{level: warn}}\nservices:\n  - name: both\n    listen: [\"0.0.0.0:{port}\", \"[::]:{port}\"]\n    backends: [{{address: \"{}\"}}]\n",
        backend.addr
    );
    let _p = Proxy::start(&yaml).await;
    for client in [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ] {
        let mut s = TcpStream::connect(client).await.unwrap();
        let mut got = String::new();
        within(SECS(5), "served", s.read_to_string(&mut got))
            .await
            .unwrap();
        assert_eq!(got, "served\n", "{client}");
    }
}

/// docs/reliability.md `tls-probes`: `kind: https` speaks HTTP over the service's `backend_tls` and
/// `kind: tls` does the handshake: a backend with a certificate the CA signed is healthy, one with a
/// stranger's is unhealthy (its handshake fails), and only the healthy one takes clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_https_probes_use_the_backend_tls() {
    let pki = Pki::new("probe CA");
    let stranger = Pki::new("probe stranger");
    let good = pki.server("probe-good", &["127.0.0.2"]);
    let bad = stranger.server("probe-bad", &["127.0.0.3"]);
    // HTTPS backends: a 200 to anything, over TLS.
    let https = |pair: &Pair, ip: [u8; 4]| {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(crate::common::pki::server_config(pair, &[]));
        Backend::serve(listen(SocketAddr::from((ip, 0))), move |s| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            }
        })
    };
    let (g, b) = (https(&good, [127, 0, 0, 2]), https(&bad, [127, 0, 0, 3]));
    for kind in ["https", "tls"] {
        let yaml = format!(
            "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: p\n    listen: 127.0.0.1:0\n    health: {{kind: {kind}, path: /health, interval: 200ms, timeout: 1s, rise: 1, fall: 1}}\n    backend_tls: {{ca: \"{}\"}}\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n",
            pki.ca.display(),
            g.addr,
            b.addr
        );
        let p = Proxy::start(&yaml).await;
        let (good_b, bad_b) = (p.backend(g.addr), p.backend(b.addr));
        wait_for(SECS(5), "both probed", || {
            good_b.health() == sluicegate::Health::Healthy
                && bad_b.health() == sluicegate::Health::Unhealthy
        })
        .await;
        let probes = bad_b.probes();
        let last = probes.last().unwrap();
        assert!(
            last.error.as_deref().is_some_and(|e| e.starts_with("TLS")),
            "{kind}: {last:?}"
        );
        assert_eq!(
            p.service.pool.snapshot().ready.len(),
            1,
            "{kind}: only the healthy one"
        );
    }
}

/// docs/reliability.md `https-probe-passthrough`: a service that passes TLS through (no
/// `backend_tls`) probes its backend's HTTPS `/readyz` with the probe's own `health.tls` (the CA,
/// the name the certificate carries): a 503 marks the backend down and a 200 up again, while the
/// clients' TLS still reaches the backend untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_probe_watches_a_passthrough_backend_without_backend_tls() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;
    let pki = Pki::new("readyz CA");
    let pair = pki.server("apiserver", &["api.test"]);
    let ready = Arc::new(AtomicBool::new(true));
    let acceptor = tokio_rustls::TlsAcceptor::from(crate::common::pki::server_config(&pair, &[]));
    let is_ready = ready.clone();
    let backend = Backend::serve(listen(SocketAddr::from(([127, 0, 0, 2], 0))), move |s| {
        let (acceptor, is_ready) = (acceptor.clone(), is_ready.clone());
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let Ok(n) = tls.read(&mut buf).await else {
                return;
            };
            let asked = String::from_utf8_lossy(&buf[..n]).to_string();
            let reply: &[u8] = if !asked.starts_with("GET /readyz ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nclient"
            } else if is_ready.load(Relaxed) {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = tls.write_all(reply).await;
            let _ = tls.shutdown().await;
        }
    });
    let yaml = format!(
        "log: {{level: warn}}\nservices:\n  - name: api\n    listen: 127.0.0.1:0\n    health: {{kind: https, path: /readyz, interval: 100ms, timeout: 1s, rise: 1, fall: 1, tls: {{ca: \"{}\", server_name: api.test}}}}\n    backends: [{{address: \"{}\"}}]\n",
        pki.ca.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    let b = p.backend(backend.addr);
    wait_for(SECS(5), "probed healthy", || {
        b.health() == sluicegate::Health::Healthy
    })
    .await;
    ready.store(false, Relaxed);
    wait_for(SECS(5), "probed down on a 503", || {
        b.health() == sluicegate::Health::Unhealthy
    })
    .await;
    let last = b.probes().last().cloned().expect("a probe");
    assert!(
        last.error.as_deref().is_some_and(|e| e.contains("503")),
        "{last:?}"
    );
    ready.store(true, Relaxed);
    wait_for(SECS(5), "probed up again", || {
        b.health() == sluicegate::Health::Healthy
    })
    .await;
    // The clients' TLS is the backend's own: the relay neither ends nor starts TLS.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let mut tls = connector(&pki, &[], None)
        .connect(name, tcp)
        .await
        .expect("the backend's certificate");
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut got = String::new();
    let _ = tls.read_to_string(&mut got).await;
    assert!(got.ends_with("client"), "{got:?}");
}

/// docs/reliability.md `tls-reset`: through a terminating service, a backend's reset reaches the
/// client as a reset (an error, not the close_notify of a complete stream), and the routing line's
/// end says whose; a client's reset reaches the backend as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_crosses_the_tls_relay_as_a_reset() {
    let pki = Pki::new("reset CA");
    let cert = pki.server("reset", &["svc.example"]);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<usize>>();
    // Echoes one message, then resets; or, when the client resets, reports what its read saw.
    let backend = Backend::start([127, 0, 0, 2], move |mut s| {
        let seen = seen_tx.clone();
        async move {
            let mut b = [0u8; 64];
            let Ok(n) = s.read(&mut b).await else { return };
            if &b[..n] == b"reset me" {
                rst_on_drop(&s);
                return;
            }
            let _ = s.write_all(&b[..n]).await;
            let mut rest = Vec::new();
            let _ = seen.send(s.read_to_end(&mut rest).await);
        }
    })
    .await;
    let yaml = format!(
        "shutdown: {{drain_timeout: 5s}}\nlog: {{level: warn}}\nservices:\n  - name: r\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\"}}\n    backends: [{{address: \"{}\"}}]\n",
        cert.cert.display(),
        cert.key.display(),
        backend.addr
    );
    let p = Proxy::start(&yaml).await;
    let c = connector(&pki, &[], None);
    let mut t = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    t.write_all(b"reset me").await.unwrap();
    t.flush().await.unwrap();
    let mut buf = Vec::new();
    let r = within(SECS(5), "the reset", t.read_to_end(&mut buf)).await;
    assert!(r.is_err(), "a reset, not a complete stream: {r:?} {buf:?}");
    p.wait_ended(Outcome::BackendReset, 1).await;

    let mut t = tls_connect(&c, p.addr, "svc.example").await.unwrap();
    assert_eq!(tls_round_trip(&mut t, b"hello").await, b"hello");
    rst_on_drop(t.get_ref().0);
    drop(t);
    let seen = within(SECS(5), "the backend's read", seen_rx.recv())
        .await
        .unwrap();
    assert!(seen.is_err(), "the backend sees a reset: {seen:?}");
    p.wait_ended(Outcome::ClientReset, 1).await;
}

/// A peer on the deny list (the top-level `limits.deny`) is closed at accept on a shared address,
/// before its ClientHello is read (the route would wait 60 s for it), counted `denied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_peer_is_closed_before_its_hello_is_read() {
    let addr = free_addr([127, 0, 0, 1]);
    let a = tagged([127, 0, 0, 2], "a").await;
    let yaml = config(&service(
        "a",
        addr,
        "sni: [a.example], client_hello_timeout: 60s,",
        a.addr,
    ));
    let p = Proxy::start(&format!("limits: {{deny: [127.0.0.22]}}\n{yaml}")).await;
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from(([127, 0, 0, 22], 0))).unwrap();
    let mut silent = s.connect(addr).await.unwrap();
    let mut got = Vec::new();
    let r = within(SECS(15), "closed at once", silent.read_to_end(&mut got)).await;
    assert!(r.is_err() || got.is_empty(), "nothing comes back: {got:?}");
    let admin = p.admin.unwrap();
    let m = get(admin, "/metrics").await.body;
    assert_eq!(unrouted(&m, addr, "denied"), Some(1), "{m}");
    assert_eq!(a.accepted(), 0);
    let good = client_hello(Some("a.example"), &[]);
    assert_eq!(who_echoes(addr, &good, good.len()).await.unwrap(), "a");
}
