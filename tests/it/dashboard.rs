//! The dashboard in a real browser: sluicegate with three backends under traffic, the page opened in
//! headless Chromium (tests/dashboard/check.py drives it over the DevTools protocol), and the DOM must
//! show every backend, the live event stream, counters that move and charts with data, the days
//! left on a TLS service's certificate, and which tier of a service with backups serves. Then the
//! page acts (tests/dashboard/act.py): behind the admin token, each of its buttons against a running
//! balancer. The screenshots go to the target directory, never into git.
//!
//! Without Chromium the tests say so loudly and pass, unless SLUICEGATE_REQUIRE_CHROMIUM=1 (CI sets
//! it after installing Debian's `chromium`), when they fail.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::common::fleet::{replicas, who, Session};
use crate::common::http::get;
use crate::common::{wait_for, Proxy};

/// Runs `script` of tests/dashboard/ with `args` and `envs`: what it printed, as JSON, or `None`
/// when no Chromium is installed (a loud skip, a failure when SLUICEGATE_REQUIRE_CHROMIUM=1).
/// The script bounds each of its own waits.
async fn in_chromium(
    script: &str,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
) -> Option<serde_json::Value> {
    let path = format!("{}/tests/dashboard/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(path)
            .args(args)
            .envs(envs)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            eprintln!("{script} passed: {stdout}");
            Some(serde_json::from_str(stdout.trim()).expect("the script's JSON"))
        }
        Some(77) => {
            crate::common::require_tool(
                "CHROMIUM",
                Some(format!("no Chromium installed (apt install chromium): {script} did not run the dashboard in a browser")),
            );
            None
        }
        _ => panic!("{script} failed ({:?}):\n{stdout}\n{stderr}", out.status),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_backend_and_live_counters() {
    let (_port, fleet) = replicas(2, 3);
    let mut y = String::from(
        "log: {level: warn}\nadmin: {listen: \"127.0.0.1:0\"}\nservices:\n  - name: web\n    listen: 127.0.0.1:0\n    balance: weighted_round_robin\n    health: {kind: http, interval: 1s}\n    backends:\n",
    );
    for (r, w) in fleet.iter().zip([1, 2, 3]) {
        y += &format!("      - {{address: \"{}\", weight: {w}}}\n", r.addr());
    }
    // A TLS-terminating service beside it (a backend of its own), its certificate valid for 90 days.
    let secure_backend = crate::common::Backend::echo([127, 0, 0, 9]).await;
    let pki = crate::common::pki::Pki::new("dashboard CA");
    let cert = pki.server("dash", &["dash.example"]);
    y += &format!(
        "  - name: secure\n    listen: 127.0.0.1:0\n    tls: {{cert: \"{}\", key: \"{}\"}}\n    backends: [{{address: \"{}\"}}]\n",
        cert.cert.display(),
        cert.key.display(),
        secure_backend.addr
    );
    // A service with a backup tier, its primary down (nothing listens there): the backup serves.
    let backup = crate::common::Backend::echo([127, 0, 0, 10]).await;
    let gone = crate::common::refusing_addr([127, 0, 0, 11]).await;
    y += &format!(
        "  - name: tiered\n    listen: 127.0.0.1:0\n    health: {{kind: tcp, interval: 1s}}\n    backends: [{{address: \"{gone}\"}}, {{address: \"{}\", backup: true}}]\n",
        backup.addr
    );
    // A UDP service: its datagrams each way, and its backend's, shown.
    let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    y += &format!(
        "  - name: dgram\n    protocol: udp\n    listen: 127.0.0.1:0\n    backends: [{{address: \"{echo_addr}\"}}]\n"
    );
    let p = Proxy::start(&y).await;
    let url = format!("http://{}/", p.admin.unwrap());
    let backends: Vec<String> = fleet.iter().map(|r| r.addr().to_string()).collect();
    let dgram = p.addrs[3]; // the services in config order: web, secure, tiered, dgram
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..4u8 {
        client.send_to(&[i; 5], dgram).await.unwrap();
        let mut buf = [0u8; 16];
        let answer = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf)).await;
        assert!(matches!(answer, Ok(Ok((5, _)))), "the UDP echo answers");
    }

    // Traffic for as long as the browser looks (bounded: 60 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let (s, addr) = (stop.clone(), p.addr);
    let traffic = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        for _ in 0..3000 {
            if s.load(Relaxed) {
                break;
            }
            tick.tick().await;
            let _ = who(addr).await;
        }
    });
    let shot = format!("{}/dashboard.png", env!("CARGO_TARGET_TMPDIR"));
    let shown = in_chromium(
        "check.py",
        vec![url, backends.join(","), shot.clone()],
        Vec::new(),
    )
    .await;
    stop.store(true, Relaxed);
    traffic.await.unwrap();
    let Some(shown) = shown else {
        return;
    };
    eprintln!("screenshot: {shot}");
    let days = shown["tls_days"].as_array().expect("tls_days");
    assert_eq!(days.len(), 1, "one TLS service: {shown}");
    assert!(
        ["89 d", "90 d"].contains(&days[0].as_str().unwrap_or("")),
        "the certificate's days left: {shown}"
    );
    assert_eq!(
        shown["serving_tier"],
        serde_json::json!(["1"]),
        "the backup tier serves: {shown}"
    );
    assert_eq!(shown["tiers"], serde_json::json!(["tier 1"]), "{shown}");
    let udp = serde_json::json!([{"service": "dgram", "up": "4", "down": "4",
        "backends": [{"backend": echo_addr.to_string(), "datagrams": "4 / 4"}]}]);
    assert_eq!(shown["udp"], udp, "the UDP service's datagrams: {shown}");
    echo_task.abort();
}

/// The admin token of the acting test (the page is given it by act.py, typed into its field).
const TOKEN: &str = "dashboard-acts-0123456789";

/// Issue 68, the dashboard acts: with `admin.token` set, a locked page's drain is refused and the
/// page says so; unlocked, its Drain, Maint, Ready, weight, Failback (a service held on its backup
/// by `failback: never`) and Kill (from a service's connections list) each land, as the API and the
/// page's event log show (tests/dashboard/act.py). Of three connections held through the service,
/// the killed one's client, and only it, sees its connection end. (The connection registry is the
/// process's: the services are named as no other test's, so that lists count these alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_acts_behind_the_token() {
    let (_port, fleet) = replicas(21, 2);
    let (_port, tiers) = replicas(23, 2);
    let y = format!(
        "log: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\", token: \"{TOKEN}\"}}\nservices:\n  - name: actions\n    listen: 127.0.0.1:0\n    health: {{kind: http, interval: 500ms}}\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n  - name: backups\n    listen: 127.0.0.1:0\n    failback: never\n    health: {{kind: http, interval: 100ms, timeout: 500ms, rise: 1, fall: 1}}\n    backends: [{{address: \"{}\"}}, {{address: \"{}\", backup: true}}]\n",
        fleet[0].addr(),
        fleet[1].addr(),
        tiers[0].addr(),
        tiers[1].addr()
    );
    let p = Proxy::start(&y).await;
    let admin = p.admin.expect("admin");
    // `backups` on its backup with its primary healthy again: held there until an operator asks.
    let tiered = p.control.service("backups").expect("backups");
    tiers[0].set_status(503);
    wait_for(Duration::from_secs(10), "the backup serves", || {
        tiered.pool.snapshot().serving_tier == Some(1)
    })
    .await;
    tiers[0].set_status(200);
    wait_for(Duration::from_secs(10), "failback held", || {
        tiered.pool.failback_held()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Session::open(p.addr).await.expect("a held connection").0);
    }

    let backend = fleet[0].addr().to_string();
    let shot = format!("{}/dashboard-acts.png", env!("CARGO_TARGET_TMPDIR"));
    let args = [
        &format!("http://{admin}/"),
        "actions",
        &backend,
        "backups",
        &shot,
    ];
    let Some(shown) = in_chromium(
        "act.py",
        args.iter().map(|a| a.to_string()).collect(),
        vec![("SLUICEGATE_DASHBOARD_TOKEN", TOKEN.to_string())],
    )
    .await
    else {
        return;
    };
    eprintln!("screenshot: {shot}");

    let client = shown["killed"]["client"]
        .as_str()
        .expect("the killed client");
    let (mut killed, mut alive): (Vec<Session>, Vec<Session>) = held
        .into_iter()
        .partition(|s| s.local_addr().is_ok_and(|a| a.to_string() == client));
    assert_eq!(
        killed.len(),
        1,
        "the killed connection is one of those held: {shown}"
    );
    assert!(
        killed[0].closed_within(Duration::from_secs(10)).await,
        "the killed connection's client sees it end"
    );
    for s in &mut alive {
        s.ping().await.expect("the other held connections relay on");
    }
    let left = get(admin, "/connections?service=actions").await.json();
    assert_eq!(left["total"], 2, "one of three killed: {left}");
    let b = get(admin, &format!("/backends/actions/{backend}"))
        .await
        .json();
    assert_eq!(
        (b["state"].as_str(), b["weight"].as_u64()),
        (Some("active"), Some(7)),
        "{b}"
    );
}
