//! The dashboard in a real browser: sluicegate with three backends under traffic, the page opened in
//! headless Chromium (tests/dashboard/check.py drives it over the DevTools protocol), and the DOM must
//! show every backend, the live event stream, counters that move and charts with data, the days
//! left on a TLS service's certificate, and which tier of a service with backups serves. The screenshot goes to the target directory, never into git.
//!
//! Without Chromium the test says so loudly and passes, unless SLUICEGATE_REQUIRE_CHROMIUM=1 (CI sets
//! it after installing Debian's `chromium`), when it fails.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crate::common::fleet::{replicas, who};
use crate::common::Proxy;

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
    let p = Proxy::start(&y).await;
    let url = format!("http://{}/", p.admin.unwrap());
    let backends: Vec<String> = fleet.iter().map(|r| r.addr().to_string()).collect();

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
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard/check.py");
    let out = tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            std::process::Command::new("python3")
                .args([script, &url, &backends.join(","), &shot])
                .output()
                .expect("run python3")
        }
    })
    .await
    .unwrap();
    stop.store(true, Relaxed);
    traffic.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            eprintln!("dashboard check passed: {stdout}\nscreenshot: {shot}");
            let shown: serde_json::Value =
                serde_json::from_str(stdout.trim()).expect("check.py's JSON");
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
        }
        Some(77) => {
            crate::common::require_tool(
                "CHROMIUM",
                Some("no Chromium installed (apt install chromium): the dashboard was not checked in a browser".into()),
            );
        }
        _ => panic!(
            "dashboard check failed ({:?}):\n{stdout}\n{stderr}",
            out.status
        ),
    }
}
