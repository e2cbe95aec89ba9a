//! Property-based fuzzing (proptest) of everything that parses outside input: the config loader, the
//! duration parser, the PROXY protocol parser (and the TLVs it writes), the TLS ClientHello parser,
//! and the admin API through its real HTTP server.
//!
//! Each target runs `SLUICEGATE_FUZZ_CASES` cases (2,000 by default, so `cargo test` stays quick;
//! `.ci/run` sets 100,000; docs/reliability.md gives the longer run). A failing case is shrunk and
//! printed; proptest also keeps it under `proptest-regressions/`, and a defect found this way gets
//! an example test of its own here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use sluicegate::config::{Config, Dur, ProxyVersion};
use sluicegate::proxy_protocol::{self, Header, Parsed};
use sluicegate::tls::hello::{self as tls_hello, build as hello_build};

fn cases() -> u32 {
    std::env::var("SLUICEGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: cases(),
        // Shrinking a failure must not run for ever in CI.
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

// ---- durations ---------------------------------------------------------------------------------

#[test]
fn durations_never_panic_and_read_back() {
    runner()
        .run(&any::<String>(), |s| {
            let _ = s.parse::<Dur>();
            Ok(())
        })
        .unwrap();
    let written = (
        0u64..10_000_000,
        prop::sample::select(vec!["ms", "s", "m", "h"]),
    );
    runner()
        .run(&written, |(n, unit)| {
            let ms = match unit {
                "ms" => n as f64,
                "s" => n as f64 * 1e3,
                "m" => n as f64 * 6e4,
                _ => n as f64 * 3.6e6,
            };
            let parsed = format!("{n}{unit}").parse::<Dur>();
            if ms <= 365.0 * 86400.0 * 1e3 {
                let d = parsed.map_err(TestCaseError::fail)?;
                prop_assert!((d.0.as_secs_f64() * 1e3 - ms).abs() <= ms * 1e-9 + 1e-6);
            } else {
                prop_assert!(parsed.is_err(), "longer than a year is refused");
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---- the config loader -------------------------------------------------------------------------

/// Scalars a config value might be, right or wrong.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("1e999".to_string()),
        Just("~".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("''".to_string()),
        (0u32..100_000).prop_map(|n| n.to_string()),
        (
            0u32..10_000,
            prop::sample::select(vec!["ms", "s", "m", "h", "x", ""])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        prop::sample::select(vec![
            "127.0.0.1:1",
            "[::1]:80",
            "backend:5000",
            "10.0.0.0/8",
            "::/0",
            "a..b:1",
            "host:0",
            "v1",
            "v2",
            "v3",
            "round_robin",
            "source_hash",
            "p2c",
            "tcp",
            "http",
            "splice",
            "auto",
            "epoll",
            "ring",
            "copy",
            "drain",
            "close",
            "keep",
            "json",
            "text",
            "/health",
            "true",
            "0.0.0.0/0",
            "host",
            "container:db",
            "NET_ADMIN",
            "*.example.com",
            "a.example.com",
            "same",
            "never",
            "1.3",
            "200-299",
            "(unclosed",
            "/nonexistent/file",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
    ]
}

/// A key a service might have, with a value that may be right or wrong.
fn service_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "balance",
        "connect_timeout",
        "connect_attempts",
        "idle_timeout",
        "half_close_timeout",
        "stall_timeout",
        "first_byte_timeout",
        "keepalive",
        "keepalive.idle",
        "keepalive.interval",
        "keepalive.count",
        "backend_keepalive",
        "backend_keepalive.idle",
        "user_timeout",
        "max_connections",
        "slow_start",
        "relay",
        "proxy_protocol",
        "accept_proxy",
        "accept_proxy.from",
        "accept_proxy.timeout",
        "limits",
        "limits.per_source_connections",
        "limits.per_source_rate",
        "limits.allow",
        "limits.deny",
        "limits.ban",
        "limits.ban.after",
        "limits.ban.within",
        "limits.ban.for",
        "limits.max_denied",
        "queue",
        "queue.max",
        "queue.timeout",
        "health.kind",
        "health.name",
        "health.type",
        "health.expect_rcode",
        "health.expect_answer",
        "health.tls",
        "health.tls.verify",
        "health.tls.server_name",
        "health.interval",
        "health.rise",
        "health.path",
        "passive.max_fails",
        "passive.cooldown",
        "discovery.refresh",
        "discovery.on_removed",
        "discovery.max_records",
        "accept_proxy.trust_any",
        "replicas.image",
        "replicas.min",
        "replicas.network",
        "replicas.capabilities",
        "replicas.docker_insecure",
        "replicas.docker_cert_path",
        "autoscale.max",
        "sni",
        "alpn",
        "client_hello_timeout",
        "backend_port",
        "tls.cert",
        "tls.min_version",
        "backend_tls.verify",
        "backend_tls.server_name",
        "health.command",
        "health.expect_status",
        "health.expect_body_regex",
        "agent.port",
        "failback",
        "all_backups",
        "nonsense",
    ]);
    let list = prop::collection::vec(scalar(), 0..3).prop_map(|v| format!("[{}]", v.join(", ")));
    (key, prop_oneof![scalar(), list]).prop_map(|(k, v)| match k.split_once('.') {
        Some((outer, inner)) => format!("{outer}: {{{inner}: {v}}}"),
        None => format!("{k}: {v}"),
    })
}

fn config_text() -> impl Strategy<Value = String> {
    let backend = (
        scalar(),
        prop::option::of(scalar()),
        prop::option::of(scalar()),
    )
        .prop_map(|(a, w, m)| {
            let mut b = format!("{{address: {a}");
            if let Some(w) = w {
                b += &format!(", weight: {w}");
            }
            if let Some(m) = m {
                b += &format!(", max_connections: {m}");
            }
            b + "}"
        });
    let service = (
        scalar(),
        prop::collection::vec(service_line(), 0..6),
        prop::collection::vec(backend, 0..3),
    )
        .prop_map(|(listen, lines, backends)| {
            let mut s = format!("  - name: s\n    listen: {listen}\n");
            for l in lines {
                s += &format!("    {l}\n");
            }
            s += &format!("    backends: [{}]\n", backends.join(", "));
            s
        });
    let top = prop::collection::vec(
        prop::sample::select(vec![
            "max_connections: 0",
            "max_connections: 5",
            "admin: {listen: 0.0.0.0:9, token: ''}",
            "admin: {listen: 127.0.0.1:0}",
            "admin: {listen: 0.0.0.0:9, token_file: /nonexistent/token}",
            "admin: {listen: 127.0.0.1:0, token: short, hosts: ['*.x', 'lb.example']}",
            "log: {level: loud}",
            "log: {access: off, keep: 0}",
            "shutdown: {delay: 10s, drain_timeout: 1s}",
            "upgrade: {timeout: 0s}",
            "upgrade: {timeout: 5s, extra: 1}",
            "resolver: {nameservers: ['0.0.0.0:53']}",
            "limits: {per_source_rate: 5, ban: {after: 3, within: 1m, for: 10m}, max_denied: 10}",
            "limits: {ban: {after: 0, within: 0s, for: 0s}, max_denied: 0}",
            "limits: {deny: [10.0.0.0/8]}",
        ]),
        0..3,
    );
    (top, prop::collection::vec(service, 0..3)).prop_map(|(top, services)| {
        let mut y = top.join("\n");
        y += "\nservices:\n";
        for s in services {
            y += &s;
        }
        y
    })
}

fn check_config(text: &str) -> Result<(), TestCaseError> {
    match Config::from_yaml(text) {
        Ok(c) => {
            prop_assert!(c.validate().is_empty(), "a loaded config is valid");
        }
        Err(e) => {
            prop_assert!(!e.to_string().trim().is_empty(), "an error says something");
        }
    }
    Ok(())
}

#[test]
fn the_config_loader_never_panics_and_names_its_errors() {
    runner()
        .run(&config_text(), |t| check_config(&t))
        .unwrap_or_else(|e| panic!("{e}"));
    // Raw bytes mutated into a valid config: flipped, inserted and removed characters.
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.yaml"))
        .expect("conf/edge.yaml");
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8);
    runner()
        .run(&edits, |edits| {
            let mut b = base.clone().into_bytes();
            for (at, byte, op) in edits {
                let i = at.index(b.len() + 1);
                match op {
                    0 if i < b.len() => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ if i < b.len() => {
                        b.remove(i);
                    }
                    _ => {}
                }
            }
            check_config(&String::from_utf8_lossy(&b))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---- the PROXY protocol parser -----------------------------------------------------------------

fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
    match proxy_protocol::parse(bytes) {
        Parsed::Done(h, n) => {
            prop_assert!(n <= bytes.len() && n >= 15);
            // The header alone parses the same: nothing after it was looked at.
            prop_assert_eq!(proxy_protocol::parse(&bytes[..n]), Parsed::Done(h, n));
        }
        Parsed::Incomplete { more } => prop_assert!(more >= 1),
        Parsed::Malformed(m) => prop_assert!(!m.to_string().is_empty()),
    }
    Ok(())
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
    ]
}

/// A valid header, then some of its bytes changed, cut or followed by more.
fn mutated_header() -> impl Strategy<Value = Vec<u8>> {
    let version = prop::sample::select(vec![ProxyVersion::V1, ProxyVersion::V2]);
    (
        version,
        addr(),
        addr(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(v, c, d, flips, cut, tail)| {
            let mut b = proxy_protocol::encode(v, c, d);
            for (i, byte) in flips {
                let i = i.index(b.len());
                b[i] = byte;
            }
            if let Some(cut) = cut {
                b.truncate(cut.index(b.len() + 1));
            }
            b.extend(tail);
            b
        })
}

#[test]
fn the_proxy_parser_never_panics_and_never_reads_past_a_header() {
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..300), |b| {
            check_parse(&b)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    runner()
        .run(&mutated_header(), |b| check_parse(&b))
        .unwrap_or_else(|e| panic!("{e}"));
    let version = prop::sample::select(vec![ProxyVersion::V1, ProxyVersion::V2]);
    runner()
        .run(
            &(version, addr(), addr(), any::<prop::sample::Index>()),
            |(v, c, d, cut)| {
                let b = proxy_protocol::encode(v, c, d);
                let Parsed::Done(Header::Proxy { client, dst }, n) = proxy_protocol::parse(&b)
                else {
                    return Err(TestCaseError::fail("an encoded header parses"));
                };
                prop_assert_eq!(n, b.len());
                prop_assert_eq!(client.port(), c.port());
                prop_assert_eq!(dst.port(), d.port());
                // Any strict prefix is incomplete and asks for no byte beyond the header.
                let k = cut.index(b.len());
                match proxy_protocol::parse(&b[..k]) {
                    Parsed::Incomplete { more } => prop_assert!(k + more <= b.len()),
                    other => return Err(TestCaseError::fail(format!("prefix {k}: {other:?}"))),
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The ring workers' PROXY header reader, on the wire. A trusted peer sends any bytes (random, or a
/// header mutated, cut or followed by data) in two writes and half-closes: where the parser takes a
/// header from the whole input, the connection is relayed and the echo backend sends back exactly
/// what followed it; anywhere else the connection is refused and nothing reaches the backend. So the
/// worker, reading the header in pieces, decides as the parser does on the whole. At most 20,000
/// cases (each is a connection).
#[test]
fn the_ring_workers_header_reader_decides_as_the_parser_does() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(crate::common::Backend::echo([127, 0, 0, 1]));
    let yaml = crate::common::service_yaml(
        &[backend.addr],
        sluicegate::config::RelayMode::Ring,
        "accept_proxy: {from: [127.0.0.1], timeout: 5s}",
    );
    let proxy = rt.block_on(crate::common::Proxy::start(&yaml));
    let addr = proxy.addr;
    let taken = std::cell::Cell::new(0u64);
    let input = prop_oneof![prop::collection::vec(any::<u8>(), 0..300), mutated_header()];
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases().min(20_000),
        max_shrink_iters: 2000,
        ..RunnerConfig::default()
    });
    runner
        .run(&(input, any::<prop::sample::Index>()), |(bytes, split)| {
            let mut s = TcpStream::connect(addr).map_err(|e| TestCaseError::fail(e.to_string()))?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let k = split.index(bytes.len() + 1);
            // A write may meet a refusal already made: what the client sees after is what counts.
            let _ = s
                .write_all(&bytes[..k])
                .and_then(|()| s.write_all(&bytes[k..]));
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut got = Vec::new();
            let read = s.read_to_end(&mut got);
            match proxy_protocol::parse(&bytes) {
                Parsed::Done(_, n) => {
                    taken.set(taken.get() + 1);
                    prop_assert!(read.is_ok(), "relayed, then closed: {read:?}");
                    prop_assert_eq!(&got[..], &bytes[n..], "what followed the header, echoed");
                }
                other => {
                    prop_assert!(
                        got.is_empty(),
                        "refused ({other:?}), yet {} bytes came back",
                        got.len()
                    );
                    if let Err(e) = &read {
                        prop_assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
                    }
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("ring header reader: {} cases taken", taken.get());
    assert!(taken.get() > 0, "some headers were taken");
    // Counted as each connection is accounted, which may follow the client's EOF: bounded wait.
    let on_ring = || proxy.service.stats.ring_total();
    for _ in 0..500 {
        if on_ring() >= taken.get() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let on_ring = on_ring();
    assert_eq!(
        on_ring,
        taken.get(),
        "every relayed case ran on the ring workers"
    );
    assert_eq!(
        backend.accepted(),
        taken.get(),
        "only taken headers reached the backend"
    );
    drop(proxy);
}

// ---- the TLS ClientHello parser ----------------------------------------------------------------

/// What the hello parser must hold for any input: no panic; a whole hello is within the input and
/// parses the same on its own bytes; every strict prefix of an answer that is not "incomplete" is
/// either incomplete or the same answer (more bytes never change a verdict already given).
fn check_hello(bytes: &[u8]) -> Result<(), TestCaseError> {
    let full = tls_hello::parse(bytes);
    if let Ok(tls_hello::Parsed::Hello { hello, len }) = &full {
        prop_assert!(*len <= bytes.len());
        prop_assert!(*len <= tls_hello::MAX_HELLO);
        prop_assert_eq!(
            tls_hello::parse(&bytes[..*len]),
            Ok(tls_hello::Parsed::Hello {
                hello: hello.clone(),
                len: *len
            })
        );
        if let Some(name) = &hello.sni {
            prop_assert!(!name.is_empty() && name.len() <= 255);
            prop_assert!(name.bytes().all(|b| b.is_ascii_graphic()));
        }
    }
    for k in [
        0,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len().saturating_sub(1),
    ] {
        let k = k.min(bytes.len());
        match (tls_hello::parse(&bytes[..k]), &full) {
            (Ok(tls_hello::Parsed::Incomplete), _) => {}
            (prefix, full) => prop_assert_eq!(&prefix, full, "prefix {} of {}", k, bytes.len()),
        }
    }
    Ok(())
}

/// A ClientHello (a name, protocols), in records of any size, then some of its bytes changed, cut, or
/// followed by more.
fn mutated_hello() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::option::of("[a-z0-9.*-]{1,40}"),
        prop::collection::vec("[a-z0-9/.-]{1,12}", 0..4),
        1usize..400,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(sni, alpn, record, flips, cut, tail)| {
            let alpn: Vec<&str> = alpn.iter().map(String::as_str).collect();
            let one = hello_build::client_hello(sni.as_deref(), &alpn);
            let mut b = hello_build::records(&one[5..], record);
            for (i, byte) in flips {
                let i = i.index(b.len());
                b[i] = byte;
            }
            if let Some(cut) = cut {
                b.truncate(cut.index(b.len() + 1));
            }
            b.extend(tail);
            b
        })
}

#[test]
fn the_hello_parser_never_panics_and_never_changes_its_mind() {
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..600), |b| {
            check_hello(&b)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Random bytes behind a handshake record header, so the parser gets past the first byte.
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..600), |mut b| {
            let mut head = vec![22, 3, 1];
            head.extend_from_slice(&(b.len() as u16).to_be_bytes());
            head.append(&mut b);
            check_hello(&head)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    runner()
        .run(&mutated_hello(), |b| check_hello(&b))
        .unwrap_or_else(|e| panic!("{e}"));
    // What is built parses back, whatever the records.
    runner()
        .run(
            &("[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){1,3}", 1usize..300),
            |(name, record)| {
                let one = hello_build::client_hello(Some(&name), &["h2"]);
                let b = hello_build::records(&one[5..], record);
                match tls_hello::parse(&b) {
                    Ok(tls_hello::Parsed::Hello { hello, len }) => {
                        prop_assert_eq!(len, b.len());
                        prop_assert_eq!(hello.sni.as_deref(), Some(name.as_str()));
                        prop_assert_eq!(hello.alpn, vec![b"h2".to_vec()]);
                    }
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

// ---- the admin API, through its HTTP server ----------------------------------------------------

struct Answer {
    status: u16,
}

/// One request on a keep-alive connection; `None` when the server closed without an answer.
fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    admin: SocketAddr,
    raw: &[u8],
    head: bool,
) -> Option<Answer> {
    if conn.is_none() {
        let s = TcpStream::connect(admin).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut()?;
    r.get_mut().write_all(raw).ok()?;
    let mut status_line = String::new();
    if r.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut length = 0usize;
    let mut close = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; if head { 0 } else { length }];
    r.read_exact(&mut body).ok()?;
    if close {
        *conn = None;
    }
    Some(Answer { status })
}

/// The admin API's top-level paths.
const ROUTES: [&str; 12] = [
    "",
    "live",
    "ready",
    "backends",
    "stats",
    "metrics",
    "reload",
    "rep",
    "add",
    "rm",
    "heartbeat",
    "route",
];

fn admin_request() -> impl Strategy<Value = (String, String, String, Vec<u8>, bool)> {
    let seg = prop_oneof![
        prop::sample::select(
            [
                ROUTES.as_slice(),
                &[
                    "services",
                    "t",
                    "drain",
                    "127.0.0.1%3A9",
                    "%5B%3A%3A1%5D%3A80",
                    "%ZZ",
                    "%",
                    "..",
                    "%00",
                    "%C3%28",
                ]
            ]
            .concat()
        )
        .prop_map(str::to_string),
        "[a-zA-Z0-9%._~-]{0,12}",
    ];
    let single = prop::sample::select(ROUTES.to_vec());
    let name = prop_oneof![Just("t".to_string()), "[a-z%0-9]{0,4}"];
    let backend = prop_oneof![
        prop::sample::select(vec![
            "127.0.0.1%3A9",
            "127.0.0.1:9",
            "%5B%3A%3A1%5D%3A80",
            "%ZZ",
            "%C3%28",
            "10.0.0.1:0",
        ])
        .prop_map(str::to_string),
        "[0-9.:%A-F]{0,16}",
    ];
    let path = prop_oneof![
        3 => single.prop_map(|s| format!("/{s}")),
        3 => (name.clone(), backend.clone()).prop_map(|(s, b)| format!("/backends/{s}/{b}")),
        2 => (name.clone(), backend).prop_map(|(s, b)| format!("/backends/{s}/{b}/drain")),
        2 => (name, prop::sample::select(vec!["rep", "add", "rm", "x"]))
            .prop_map(|(s, op)| format!("/services/{s}/{op}")),
        1 => prop::collection::vec(seg, 0..5).prop_map(|s| format!("/{}", s.join("/"))),
    ];
    let method = prop::sample::select(vec![
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
    ])
    .prop_map(str::to_string);
    let query = prop_oneof![
        Just(String::new()),
        "client=[0-9a-f.:]{0,20}(&service=[a-z]{0,3})?".prop_map(|q| format!("?{q}")),
        "service=[a-z%]{0,6}".prop_map(|q| format!("?{q}")),
        "[ -~&&[^ #]]{0,20}".prop_map(|q| format!("?{q}")),
    ];
    let json = prop_oneof![
        Just(br#"{"service": "t", "address": "127.0.0.1:9"}"#.to_vec()),
        Just(br#"{"service": "t", "address": "127.0.0.1:9", "weight": 0}"#.to_vec()),
        Just(br#"{"weight": 5, "state": "draining"}"#.to_vec()),
        Just(br#"{"weight": 4294967296}"#.to_vec()),
        Just(br#"{"n": 1, "hostnames": ["a"]}"#.to_vec()),
        Just(br#"{"n": -1}"#.to_vec()),
        Just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec()),
        prop::collection::vec(any::<u8>(), 0..200),
        "\\{[ -~]{0,60}\\}".prop_map(String::into_bytes),
    ];
    (path, method, query, json, any::<bool>())
}

#[test]
fn the_admin_api_answers_every_request_and_never_panics() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let be = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let yaml = format!(
        "admin: {{listen: 127.0.0.1:0, token: secret-secret-secret}}\nlog: {{level: error, access: off}}\nshutdown: {{drain_timeout: 1s}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{}\"}}]\n",
        be.local_addr().unwrap()
    );
    let proxy = rt.block_on(crate::common::Proxy::start(&yaml));
    let admin = proxy.admin.expect("admin");
    let conn = std::cell::RefCell::new(None);
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
    runner()
        .run(&admin_request(), |(path, method, query, body, token)| {
            let mut raw = format!(
                "{method} {path}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            )
            .into_bytes();
            if token {
                raw.extend_from_slice(b"Authorization: Bearer secret-secret-secret\r\n");
            }
            raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(&body);
            let Some(a) = request(&mut conn.borrow_mut(), admin, &raw, method == "HEAD") else {
                return Err(TestCaseError::fail(format!(
                    "no answer to {method} {path}{query} ({} body bytes)",
                    body.len()
                )));
            };
            *statuses.borrow_mut().entry(a.status).or_default() += 1;
            prop_assert!((200..600).contains(&a.status));
            prop_assert!(
                a.status < 500 || a.status == 502 || a.status == 503,
                "{} for {method} {path}{query}",
                a.status
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("admin answers by status: {:?}", statuses.borrow());
    // Still serving.
    let mut fresh = None;
    let live = request(
        &mut fresh,
        admin,
        b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        false,
    )
    .expect("live");
    assert_eq!(live.status, 200);
    drop(proxy);
}

// ---- what backends answer to checks ------------------------------------------------------------

/// Lines of agent words, some right, some not.
fn agent_lines() -> impl Strategy<Value = Vec<u8>> {
    let word = prop::sample::select(vec![
        "up",
        "UP",
        "ready",
        "down",
        "fail",
        "stopped",
        "drain",
        "maint",
        "0%",
        "50%",
        "100%",
        "1000%",
        "1001%",
        "-5%",
        "%",
        "maxconn:30",
        "maxconn:x",
        "#",
        "garbage",
        "",
    ]);
    let sep = prop::sample::select(vec![" ", ",", "\t", "  "]);
    prop_oneof![
        prop::collection::vec((word, sep), 0..8).prop_map(|ws| {
            let mut s = String::new();
            for (w, sep) in ws {
                s.push_str(w);
                s.push_str(sep);
            }
            s.into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..600),
    ]
}

/// reliability.md `agent`: any line gets an answer or a refusal naming what is wrong, never a
/// panic; an accepted one says something, and a share above 1000 % is never accepted.
#[test]
fn the_agent_line_parser_never_panics_and_accepts_only_agent_words() {
    use sluicegate::health::wire::agent_line;
    runner()
        .run(&agent_lines(), |line| {
            match agent_line(&line) {
                Ok((says, pct)) => {
                    prop_assert!(says.is_some() || pct.is_some());
                    prop_assert!(pct.is_none_or(|p| p <= 1000));
                }
                Err(why) => prop_assert!(!why.is_empty()),
            }
            prop_assert_eq!(agent_line(&line), agent_line(&line));
            Ok(())
        })
        .unwrap();
}

/// HTTP responses, well-formed and mangled: a status line, headers (a length, chunks or none), a body.
fn http_responses() -> impl Strategy<Value = Vec<u8>> {
    let status = prop::sample::select(vec![
        "HTTP/1.1 200 OK",
        "HTTP/1.0 503 x",
        "HTTP/1.1 20 x",
        "SSH-2.0",
        "HTTP/1.1 299",
    ]);
    let header = prop::sample::select(vec![
        "Content-Length: 5",
        "Content-Length: 999999999999",
        "content-length: x",
        "Transfer-Encoding: chunked",
        "X: y",
    ]);
    let body = prop::sample::select(vec![
        "hello",
        "3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        "zz\r\n",
        "",
        "ffffffffffffffff\r\n",
    ]);
    prop_oneof![
        (status, prop::collection::vec(header, 0..3), body).prop_map(|(s, hs, b)| {
            let mut r = format!("{s}\r\n");
            for h in hs {
                r += &format!("{h}\r\n");
            }
            r += "\r\n";
            r += b;
            r.into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// reliability.md `http-expect`: a probe's response parser never panics, never returns more body
/// than its cap, and a complete answer stays complete when more bytes follow it.
#[test]
fn the_http_probe_parser_never_panics_and_keeps_to_its_cap() {
    use sluicegate::health::wire::http_response;
    let input = (
        http_responses(),
        any::<bool>(),
        16usize..64,
        prop::collection::vec(any::<u8>(), 0..20),
    );
    runner()
        .run(&input, |(raw, body, cap, more)| {
            let first = http_response(&raw, body, cap);
            if let Some(Ok((_, b))) = &first {
                prop_assert!(b.len() <= cap);
            }
            if let Some(Ok((status, _))) = &first {
                let longer = [&raw[..], &more[..]].concat();
                let again = http_response(&longer, body, cap);
                prop_assert!(
                    matches!(&again, Some(Ok((s, _))) if s == status),
                    "{:?} then {:?}",
                    first,
                    again
                );
            }
            Ok(())
        })
        .unwrap();
}

/// DNS replies, well-formed (built with hickory, the wire format a real server writes) and mangled:
/// cut short, a byte changed, or random bytes.
fn dns_replies() -> impl Strategy<Value = Vec<u8>> {
    use hickory_server::proto::op::{Message, OpCode, Query, ResponseCode};
    use hickory_server::proto::rr::rdata::{A, TXT};
    use hickory_server::proto::rr::{Name, RData, Record, RecordType};
    let reply = (
        any::<u16>(),
        0u16..24,
        0usize..4,
        any::<bool>(),
        prop::sample::select(vec!["example.org.", "a.b.c.d.e.", ".", "x.test."]),
    )
        .prop_map(|(id, rcode, answers, qr, name)| {
            let name = Name::from_ascii(name).unwrap();
            let mut m = Message::response(id, OpCode::Query);
            m.metadata.message_type = if qr {
                hickory_server::proto::op::MessageType::Response
            } else {
                hickory_server::proto::op::MessageType::Query
            };
            m.metadata.response_code = ResponseCode::from_low(rcode as u8);
            m.add_query(Query::query(name.clone(), RecordType::A));
            for k in 0..answers {
                let rdata = if k % 2 == 0 {
                    RData::A(A::new(10, 0, 0, k as u8))
                } else {
                    RData::TXT(TXT::new(vec!["v=1".into()]))
                };
                m.add_answer(Record::from_rdata(name.clone(), 60, rdata));
            }
            m.to_vec().unwrap()
        });
    prop_oneof![
        reply.clone(),
        (reply.clone(), any::<prop::sample::Index>())
            .prop_map(|(r, i)| r[..i.index(r.len() + 1)].to_vec()),
        (reply, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut r, i, b)| {
            let at = i.index(r.len());
            r[at] = b;
            r
        }),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// reliability.md `dns-reply`: a DNS probe's reply check never panics; it passes over a datagram
/// unless it has the query's id and says it is a response (the same reply to another query is
/// passed over), its answer is the same every time, and a failure names what is wrong.
#[test]
fn the_dns_reply_check_never_panics_and_takes_only_its_reply() {
    use sluicegate::config::Rcode;
    use sluicegate::health::wire::dns_reply;
    let rcode = prop::sample::select(Rcode::ALL.to_vec());
    runner()
        .run(
            &(dns_replies(), any::<u16>(), rcode, any::<bool>()),
            |(raw, id, rcode, answer)| {
                let ours = raw.len() >= 12 && raw[2] & 0x80 != 0;
                let theirs = if ours {
                    u16::from_be_bytes([raw[0], raw[1]])
                } else {
                    id
                };
                let verdict = dns_reply(&raw, theirs, rcode, answer);
                prop_assert_eq!(verdict.is_some(), ours, "{:?}", verdict);
                if let Some(Err(why)) = &verdict {
                    prop_assert!(why.starts_with("dns: "), "{}", why);
                }
                if ours {
                    prop_assert_eq!(dns_reply(&raw, theirs.wrapping_add(1), rcode, answer), None);
                }
                prop_assert_eq!(dns_reply(&raw, theirs, rcode, answer), verdict);
                Ok(())
            },
        )
        .unwrap();
}

/// Hand-over messages (src/upgrade/wire.rs), well-formed and mangled: `SG`, a kind, a body.
fn handover_messages() -> impl Strategy<Value = Vec<u8>> {
    let body = prop::sample::select(vec![
        r#"{"pid":1,"format":1,"version":"0.1.0"}"#,
        r#"{"pid":-1,"format":1,"version":"0.1.0"}"#,
        r#"{"carried":3,"stayed":0}"#,
        r#""web#0""#,
        r#"null"#,
        r#"{"services":{},"backends":{}}"#,
        r#"{"facts":{}}"#,
        "",
        "{",
    ]);
    prop_oneof![
        (0u8..14, body, prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(k, b, tail)| {
            let mut m = b"SG".to_vec();
            m.push(k);
            m.extend_from_slice(b.as_bytes());
            m.extend(tail);
            m
        }),
        prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// The hand-over's message kinds by their byte (src/upgrade/wire.rs, `Frame::kind`).
const HANDOVER_KINDS: [Option<&str>; 12] = [
    None,
    Some("hello"),
    Some("listener"),
    Some("listeners-end"),
    Some("ready"),
    Some("failed"),
    Some("session"),
    Some("chunk"),
    Some("totals"),
    Some("done"),
    Some("sessions-end"),
    Some("serving"),
];

/// reliability.md `upgrade`: a message from the other process that does not parse is refused with
/// its reason, never a panic; one that needs descriptors is refused without them.
#[test]
fn the_handover_decoder_never_panics_and_names_what_is_wrong() {
    use sluicegate::upgrade::wire::decode_kind;
    runner()
        .run(&handover_messages(), |m| {
            match decode_kind(&m) {
                Ok(kind) => prop_assert!(
                    !matches!(kind, "listener" | "session"),
                    "{kind} without descriptors"
                ),
                Err(why) => {
                    // What it met: not ours, a kind it does not know, or the kind it could not take.
                    let named = match (m.len() >= 3 && m[..2] == *b"SG").then(|| m[2]) {
                        None => "not a hand-over message".to_string(),
                        Some(k) => match HANDOVER_KINDS.get(usize::from(k)).copied().flatten() {
                            Some(name) => format!("a {name} message"),
                            None => format!("unknown message kind {k}"),
                        },
                    };
                    prop_assert!(why.contains(&named), "{why:?} does not say {named:?}");
                }
            }
            Ok(())
        })
        .unwrap();
}
