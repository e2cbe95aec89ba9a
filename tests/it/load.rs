//! The load tool (`sluicegate-load`) against local backends, directly and through sluicegate: request
//! counts, open-loop pacing, failure kinds and per-backend shares in its JSON report.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;

use crate::common::http::hello_server;
use crate::common::*;
use serde_json::Value;
use sluicegate::config::RelayMode;

fn load(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(crate::common::load_tool::path())
        .args(args)
        .arg("--json")
        .output()
        .expect("run sluicegate-load");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_requests_and_shares_through_the_proxy() {
    let (a, served_a) = hello_server([127, 0, 0, 2]).await;
    let (b, served_b) = hello_server([127, 0, 0, 3]).await;
    let proxy = Proxy::start(&service_yaml(
        &[a.addr, b.addr],
        RelayMode::Epoll,
        "balance: round_robin",
    ))
    .await;
    let target = proxy.addr.to_string();
    let (code, r, err) = tokio::task::spawn_blocking(move || {
        load(&[&target, "-c", "8", "-n", "400", "--new-connection"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(r["ok"], 400, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(
        served_a.load(Relaxed) + served_b.load(Relaxed),
        400,
        "every counted request reached a backend once"
    );
    // A new connection per request, round robin: exactly half each, as the backends say.
    for (be, served) in [(&a, &served_a), (&b, &served_b)] {
        let name = be.addr.to_string();
        assert_eq!(
            r["backends"][&name]["requests"],
            served.load(Relaxed),
            "{r}"
        );
        assert_eq!(r["backends"][&name]["share"], 0.5, "{r}");
    }
    let lat = &r["latency"];
    assert!(lat["p50_ms"].as_f64().unwrap() <= lat["p99_ms"].as_f64().unwrap());
    assert!(lat["p99_ms"].as_f64().unwrap() <= lat["max_ms"].as_f64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate() {
    let (a, served) = hello_server([127, 0, 0, 2]).await;
    let target = a.addr.to_string();
    let (code, r, err) = tokio::task::spawn_blocking(move || {
        load(&[&target, "-c", "4", "--rate", "400", "--duration", "1s"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    // 400 requests are due in one second; a request due before the end but answered after it counts.
    let ok = r["ok"].as_u64().unwrap();
    assert!((396..=404).contains(&ok), "{r}");
    assert_eq!(served.load(Relaxed), ok);
    assert_eq!(r["rate"], 400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_kind() {
    let refused = refusing_addr([127, 0, 0, 3]).await.to_string();
    let (code, r, _) =
        tokio::task::spawn_blocking(move || load(&[&refused, "-c", "2", "-n", "10"]))
            .await
            .unwrap();
    assert_eq!(code, 1, "no success: non-zero exit");
    assert_eq!(r["ok"], 0);
    assert_eq!(r["failed"], 10);
    assert_eq!(r["failures"]["connect: connection refused"], 10, "{r}");
    // A backend that answers 503.
    let b = Backend::start([127, 0, 0, 4], |mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
    })
    .await;
    let target = b.addr.to_string();
    let (_, r, _) = tokio::task::spawn_blocking(move || load(&[&target, "-c", "1", "-n", "5"]))
        .await
        .unwrap();
    assert_eq!(r["failures"]["status 503"], 5, "{r}");
}
