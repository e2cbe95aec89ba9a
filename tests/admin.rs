//! The admin API (docs/admin-api.md) in process: every endpoint, token enforcement, garbage, metrics that
//! match the traffic, the event stream, drain progress, and runtime backend changes (docs/reliability.md: `admin-token`, `admin-garbage`).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::fleet::{replicas, who, Replica, Session};
use common::http::{get, request, send};
use common::{wait_for, within, Proxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn yaml(fleet: &[Replica], admin: &str, extra: &str) -> String {
    let mut y = format!(
        "log: {{level: warn}}\nshutdown: {{drain_timeout: 3s}}\nadmin: {{listen: \"127.0.0.1:0\"{admin}}}\nservices:\n  - name: web\n    listen: 127.0.0.1:0\n    balance: round_robin\n"
    );
    for l in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", l.trim());
    }
    y += "    backends:\n";
    for r in fleet {
        y += &format!("      - {{address: \"{}\"}}\n", r.addr());
    }
    y
}

fn admin(p: &Proxy) -> SocketAddr {
    p.admin.expect("admin enabled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_endpoint_answers() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    for _ in 0..4 {
        who(p.addr).await.expect("served");
    }
    let live = get(a, "/live").await;
    assert_eq!(
        (live.status, live.json()["live"].as_bool()),
        (200, Some(true))
    );
    let ready = get(a, "/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);

    let backends = get(a, "/backends").await;
    assert_eq!(backends.status, 200);
    let list = backends.json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2);
    for b in list {
        for key in [
            "service",
            "address",
            "sources",
            "weight",
            "effective_weight",
            "health",
            "state",
            "active",
            "total",
            "failed",
            "bytes_up",
            "bytes_down",
            "probes",
            "last_probe",
            "dns_first_seen_ms",
            "dns_last_seen_ms",
            "connect_ms_mean",
            "source",
            "bytes_in",
            "bytes_out",
            "failed_connects",
        ] {
            assert!(b.get(key).is_some(), "backend view lacks {key}: {b}");
        }
        assert_eq!(b["service"], "web");
        assert_eq!(b["sources"][0], "static");
        assert_eq!(b["source"], "static");
        assert_eq!(b["total"], 2);
        assert!(b["connect_ms_mean"].as_f64().is_some());
    }
    let one = get(a, &format!("/backends/web/{}", fleet[0].addr())).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["address"], fleet[0].addr().to_string());

    let stats = get(a, "/stats?history=1").await;
    assert_eq!(stats.status, 200);
    let s = stats.json();
    assert_eq!(s["services"][0]["name"], "web");
    assert_eq!(s["services"][0]["backends"].as_array().unwrap().len(), 2);
    assert!(s["history"].is_array());

    let metrics = get(a, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(metrics
        .body
        .contains("sluicegate_connections_accepted_total{service=\"web\"} 4"));

    let page = get(a, "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("EventSource(\"/events\")"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no CDN"
    );

    let missing = get(a, "/nope").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_at_runtime_add_drain_weight_remove() {
    let (port, fleet) = replicas(2, 3);
    let p = Proxy::start(&yaml(&fleet[..2], "", "")).await;
    let a = admin(&p);
    // add: 201, source api, and it takes traffic
    let add = send(
        a,
        "POST",
        "/backends",
        &format!(
            "{{\"service\": \"web\", \"address\": \"{}\", \"weight\": 2}}",
            fleet[2].addr()
        ),
    )
    .await;
    assert_eq!(add.status, 201, "{}", add.body);
    assert_eq!(add.json()["sources"][0], "api");
    assert_eq!(add.json()["weight"], 2);
    let again = send(
        a,
        "POST",
        "/backends",
        &format!(
            "{{\"service\": \"web\", \"address\": \"{}\"}}",
            fleet[2].addr()
        ),
    )
    .await;
    assert_eq!(again.status, 409);
    let mut seen = HashMap::new();
    for _ in 0..30 {
        *seen.entry(who(p.addr).await.expect("served")).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "the added backend serves: {seen:?}");

    // drain: no new connections, sessions kept
    let (mut held, ip) = loop {
        let (s, ip) = Session::open(p.addr).await.expect("session");
        if ip == fleet[0].ip() {
            break (s, ip);
        }
    };
    let drain = send(
        a,
        "POST",
        &format!("/backends/web/{}/drain", fleet[0].addr()),
        "",
    )
    .await;
    assert_eq!(drain.status, 202);
    for _ in 0..20 {
        assert_ne!(
            who(p.addr).await.expect("served"),
            ip,
            "draining gets nothing new"
        );
    }
    held.ping()
        .await
        .expect("a draining backend keeps its sessions");
    let view = get(a, &format!("/backends/web/{}", fleet[0].addr()))
        .await
        .json();
    assert_eq!(view["state"], "draining");
    let back = send(
        a,
        "PUT",
        &format!("/backends/web/{}", fleet[0].addr()),
        "{\"state\": \"active\", \"weight\": 3}",
    )
    .await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(
        (
            back.json()["state"].as_str(),
            back.json()["weight"].as_u64()
        ),
        (Some("active"), Some(3))
    );

    // remove with close: its sessions are cut at once
    let del = send(
        a,
        "DELETE",
        &format!("/backends/web/{}?mode=close", fleet[0].addr()),
        "",
    )
    .await;
    assert_eq!(del.status, 202);
    assert!(held.closed_within(Duration::from_secs(2)).await, "closed");
    let gone = get(a, &format!("/backends/web/{}", fleet[0].addr())).await;
    assert!(gone.status == 404 || gone.json()["state"] == "removed");
    assert_eq!(
        send(
            a,
            "DELETE",
            &format!("/backends/web/{}", fleet[0].addr()),
            ""
        )
        .await
        .status,
        404
    );
    // bad input: each names what is wrong, nothing changes
    for (method, path, body, status) in [
        (
            "POST",
            "/backends".to_string(),
            "{\"service\": \"web\"}".to_string(),
            400,
        ),
        (
            "POST",
            "/backends".into(),
            "{\"service\": \"nope\", \"address\": \"127.0.0.1:1\"}".into(),
            404,
        ),
        (
            "POST",
            "/backends".into(),
            format!("{{\"service\": \"web\", \"address\": \"127.0.0.9:{port}\", \"weight\": 0}}"),
            400,
        ),
        (
            "POST",
            "/backends".into(),
            "{\"service\": \"web\", \"address\": \"backend:80\"}".into(),
            400,
        ),
        (
            "POST",
            "/backends".into(),
            "{\"service\": \"web\", \"address\": \"127.0.0.9:1\", \"extra\": 1}".into(),
            400,
        ),
        (
            "PUT",
            format!("/backends/web/{}", fleet[1].addr()),
            "{\"state\": \"gone\"}".into(),
            400,
        ),
        (
            "DELETE",
            format!("/backends/web/{}?mode=maybe", fleet[1].addr()),
            String::new(),
            400,
        ),
        (
            "POST",
            "/backends/web/notanaddress/drain".into(),
            String::new(),
            400,
        ),
    ] {
        let r = send(a, method, &path, &body).await;
        assert_eq!(r.status, status, "{method} {path} {body}: {}", r.body);
        assert!(r.json()["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(
        p.service.pool.members().len(),
        2,
        "bad requests changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_mutation_and_only_mutations() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&yaml(&fleet, ", token: s3cret", "")).await;
    let a = admin(&p);
    let drain = format!("/backends/web/{}/drain", fleet[0].addr());
    for auth in [
        &[][..],
        &["Authorization: Bearer wrong"][..],
        &["Authorization: s3cret"][..],
    ] {
        for (m, path) in [
            ("POST", drain.as_str()),
            ("POST", "/reload"),
            ("DELETE", &format!("/backends/web/{}", fleet[0].addr())),
        ] {
            let r = request(a, m, path, auth, b"").await.unwrap();
            assert_eq!(r.status, 401, "{m} {path} with {auth:?}");
        }
        let add = request(
            a,
            "POST",
            "/backends",
            auth,
            b"{\"service\": \"web\", \"address\": \"127.0.0.9:9\"}",
        )
        .await
        .unwrap();
        assert_eq!(add.status, 401);
    }
    assert_eq!(p.service.pool.members().len(), 2);
    assert!(p
        .service
        .pool
        .members()
        .iter()
        .all(|b| b.state() == sluicegate::pool::State::Active));
    // reads are open
    assert_eq!(get(a, "/backends").await.status, 200);
    assert_eq!(get(a, "/metrics").await.status, 200);
    // the right token works
    let ok = request(a, "POST", &drain, &["Authorization: Bearer s3cret"], b"")
        .await
        .unwrap();
    assert_eq!(ok.status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_get_405_and_change_nothing() {
    let (_port, fleet) = replicas(2, 1);
    let p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    let drain = format!("/backends/web/{}/drain", fleet[0].addr());
    for (m, path) in [
        ("GET", drain.as_str()),
        ("GET", "/reload"),
        ("POST", "/metrics"),
        ("DELETE", "/backends"),
        ("PATCH", "/backends"),
        ("POST", "/live"),
        ("PUT", "/ready"),
    ] {
        let r = request(a, m, path, &[], b"").await.unwrap();
        assert_eq!(r.status, 405, "{m} {path}");
        assert!(r.header("allow").is_some(), "Allow header for {m} {path}");
    }
    assert_eq!(
        p.service.pool.members()[0].state(),
        sluicegate::pool::State::Active
    );
    assert_eq!(p.control.reload_counts(), (0, 0), "no reload happened");
}

/// reliability.md `admin-garbage`: garbage is answered 4xx or closed, within caps, and the data plane keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_garbage_is_refused_and_the_data_plane_keeps_its_latency() {
    common::raise_fd_limit();
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    // 10 MB body
    let big = vec![b'x'; 10 * 1024 * 1024];
    let r = request(a, "POST", "/backends", &[], &big).await.unwrap();
    assert_eq!(r.status, 413);
    // a body that lies about its length: capped while reading
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(b"POST /backends HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 100_000, "y".repeat(100_000));
    let _ = s.write_all(chunk.as_bytes()).await;
    let mut line = String::new();
    let mut r = BufReader::new(s);
    within(
        Duration::from_secs(5),
        "chunked answer",
        r.read_line(&mut line),
    )
    .await
    .unwrap();
    assert!(line.contains(" 413 "), "{line:?}");
    // 64 KiB header
    let huge = format!("X-Huge: {}", "h".repeat(64 * 1024));
    let r = request(a, "GET", "/live", &[&huge], b"").await.unwrap();
    assert_eq!(r.status, 431);
    // bad JSON, binary
    assert_eq!(send(a, "POST", "/backends", "{not json").await.status, 400);
    let r = request(a, "POST", "/backends", &[], &[0xff, 0x00, 0xfe, 0x12])
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x01, 0x00, 0x00])
        .await
        .unwrap(); // a TLS hello
    let mut buf = Vec::new();
    let _ = within(
        Duration::from_secs(10),
        "garbage closed",
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await;
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).contains(" 400 "),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );

    // The data plane's latency before and while 1000 idle admin connections are held.
    async fn data_latency(addr: SocketAddr, n: usize) -> Vec<Duration> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            who(addr).await.expect("served");
            v.push(t.elapsed());
        }
        v.sort();
        v
    }
    let before = data_latency(p.addr, 200).await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = TcpStream::connect(a).await {
            idle.push(s);
        }
    }
    let during = data_latency(p.addr, 200).await;
    let p50 = |v: &[Duration]| v[v.len() / 2];
    let p99 = |v: &[Duration]| v[v.len() * 99 / 100];
    eprintln!(
        "data plane p50/p99 before {:?}/{:?}, with 1000 idle admin connections {:?}/{:?}",
        p50(&before),
        p99(&before),
        p50(&during),
        p99(&during)
    );
    assert!(
        p50(&during) < p50(&before) * 3 + Duration::from_millis(2),
        "p50 held"
    );
    // The admin API itself still answers (the cap closes the excess at once).
    drop(idle);
    let live = within(Duration::from_secs(10), "live", get(a, "/live")).await;
    assert_eq!(live.status, 200);
}

/// Metrics parsed and checked against traffic this test generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_generated_traffic() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    const N: u64 = 40;
    for _ in 0..N {
        who(p.addr).await.expect("served");
    }
    wait_for(Duration::from_secs(5), "connections ended", || {
        p.service.stats.active.load(Relaxed) == 0
    })
    .await;
    let text = get(a, "/metrics").await.body;
    let mut values: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            let ok = line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ");
            assert!(ok, "malformed comment: {line}");
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("name value");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(
            values.insert(name.to_string(), v).is_none(),
            "duplicate series {name}"
        );
    }
    let m = |k: &str| *values.get(k).unwrap_or_else(|| panic!("missing {k}"));
    assert_eq!(
        m("sluicegate_connections_accepted_total{service=\"web\"}"),
        N as f64
    );
    assert_eq!(m("sluicegate_connections_active{service=\"web\"}"), 0.0);
    let ended: f64 = values
        .iter()
        .filter(|(k, _)| k.starts_with("sluicegate_connections_ended_total{service=\"web\""))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ended, N as f64, "every connection ended exactly once");
    let mut total = 0.0;
    for r in &fleet {
        let b = r.addr();
        let t = m(&format!(
            "sluicegate_backend_connections_total{{service=\"web\",backend=\"{b}\"}}"
        ));
        assert_eq!(t, (N / 2) as f64, "round robin: half each");
        total += t;
        // The client sends an 11-byte hello; the replica answers with its address and a newline.
        let up = m(&format!(
            "sluicegate_backend_bytes_total{{service=\"web\",backend=\"{b}\",direction=\"up\"}}"
        ));
        assert_eq!(up, (N / 2 * 11) as f64);
        let down = m(&format!(
            "sluicegate_backend_bytes_total{{service=\"web\",backend=\"{b}\",direction=\"down\"}}"
        ));
        assert_eq!(down, (N / 2) as f64 * (r.ip().to_string().len() + 1) as f64);
        let count = m(&format!(
            "sluicegate_backend_connect_seconds_count{{service=\"web\",backend=\"{b}\"}}"
        ));
        let inf = m(&format!("sluicegate_backend_connect_seconds_bucket{{service=\"web\",backend=\"{b}\",le=\"+Inf\"}}"));
        assert_eq!((count, inf), (t, t));
        assert_eq!(
            m(&format!(
                "sluicegate_backend_state{{service=\"web\",backend=\"{b}\",state=\"active\"}}"
            )),
            1.0
        );
    }
    assert_eq!(total, N as f64);
    assert_eq!(m("sluicegate_draining"), 0.0);
    assert_eq!(m("sluicegate_serving"), 1.0);
    assert!(
        !values.keys().any(|k| k.starts_with("sluicegate_up")),
        "Prometheus's own `up` is not shadowed"
    );
    let build = format!(
        "sluicegate_build_info{{version=\"{}\",target=\"{}-{}\"}}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    assert_eq!(m(&build), 1.0);
    assert!(m("process_open_fds") > 2.0);
    assert!(m("process_resident_memory_bytes") > 1e6);
    assert!(m("process_cpu_seconds_total") >= 0.0);
    assert!(m("process_start_time_seconds") > 1.7e9);
    assert!(m("process_max_fds") >= m("process_open_fds"));
    promtool_check(&text);
}

/// Lints a metrics page with Prometheus's own `promtool check metrics`. Without promtool the check says
/// loudly that it did not run, unless `SLUICEGATE_REQUIRE_PROMTOOL=1` (CI) makes that a failure.
fn promtool_check(page: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var("SLUICEGATE_REQUIRE_PROMTOOL").is_err(),
                "promtool is required here: {e}"
            );
            eprintln!("*** SKIPPED: promtool not found ({e}); the metrics page was not linted ***");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /events`: a stats frame every second, and state changes as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_carries_stats_and_changes() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut events: Vec<(String, serde_json::Value)> = Vec::new();
    let mut event = String::new();
    let mut triggered = false;
    within(
        Duration::from_secs(10),
        "two stats frames and a change",
        async {
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    panic!("stream ended");
                }
                let line = line.trim_end();
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    events.push((event.clone(), serde_json::from_str(d).expect("JSON data")));
                    if !triggered && events.iter().any(|(e, _)| e == "stats") {
                        triggered = true;
                        let drain = format!("/backends/web/{}/drain", fleet[1].addr());
                        assert_eq!(send(a, "POST", &drain, "").await.status, 202);
                    }
                    let stats = events.iter().filter(|(e, _)| e == "stats").count();
                    let change = events
                        .iter()
                        .any(|(e, d)| e == "change" && d["type"] == "backend_state");
                    if stats >= 2 && change {
                        return;
                    }
                }
            }
        },
    )
    .await;
    let (_, change) = events.iter().find(|(e, _)| e == "change").unwrap();
    assert_eq!(change["backend"], fleet[1].addr().to_string());
    assert_eq!(change["state"], "draining");
    let (_, frame) = events.iter().find(|(e, _)| e == "stats").unwrap();
    assert_eq!(frame["services"][0]["name"], "web");
}

/// Drain progress in /ready, /stats and /metrics while shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_progress_is_reported() {
    let (_port, fleet) = replicas(2, 1);
    let mut p = Proxy::start(&yaml(&fleet, "", "")).await;
    let a = admin(&p);
    let (mut held, _) = Session::open(p.addr).await.expect("session");
    p.signal_stop();
    wait_for(Duration::from_secs(5), "draining", || {
        p.control.readiness().is_draining()
    })
    .await;
    let ready = get(a, "/ready").await;
    assert_eq!(ready.status, 503);
    let body = ready.json();
    assert_eq!(body["draining"], true);
    assert_eq!(body["drain"]["remaining"], 1);
    assert!(body["drain"]["deadline_in"].as_f64().unwrap() <= 3.0);
    assert_eq!(body["drain"]["backends"][0]["remaining"], 1);
    assert!(body["drain"]["oldest_connection_s"].as_f64().is_some());
    let metrics = get(a, "/metrics").await.body;
    assert!(metrics.contains("sluicegate_draining 1"));
    assert!(metrics.contains("sluicegate_drain_remaining_connections 1"));
    held.ping().await.expect("in-flight session still served");
    drop(held);
    let stopped = within(Duration::from_secs(5), "drained", p.stopped()).await;
    assert_eq!(stopped.cut, 0);
}
