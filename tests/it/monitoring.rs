//! The monitoring files shipped for Prometheus and Grafana (`compose/prometheus/rules.yml`,
//! `compose/grafana/sluicegate.json`) name only metrics a live sluicegate really exposes, and the rules
//! pass `promtool check rules`.

use std::collections::BTreeSet;

use crate::common::http::get;
use crate::common::*;
use serde_json::Value;
use sluicegate::config::RelayMode;

/// Every series name a live `/metrics` page can have: each family, with a histogram's suffixes.
async fn exposed_names() -> BTreeSet<String> {
    let backend = Backend::echo([127, 0, 0, 2]).await;
    let yaml = service_yaml(&[backend.addr], RelayMode::Epoll, "")
        .replace("services:", "admin: {listen: \"127.0.0.1:0\"}\nservices:");
    let p = Proxy::start(&yaml).await;
    let page = get(p.admin.unwrap(), "/metrics").await.body;
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        }
    }
    assert!(names.len() > 30, "{names:?}");
    names
}

/// The metric names a PromQL expression uses: sluicegate's, the process metrics, and recording
/// rules (`level:metric:ops`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut token = String::new();
    let mut in_quotes = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_quotes = !in_quotes;
            token.clear();
            continue;
        }
        if !in_quotes && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            token.push(c);
            continue;
        }
        if token.contains("sluicegate_") || token.starts_with("process_") {
            out.push(token.clone());
        }
        token.clear();
    }
    out
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_name_only_exposed_metrics() {
    let exposed = exposed_names().await;
    let rules_text = std::fs::read_to_string(repo("compose/prometheus/rules.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&rules_text).unwrap();
    let mut recorded = BTreeSet::new();
    let mut rule_exprs = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            recorded.insert(rule["record"].as_str().unwrap().to_string());
            rule_exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    let known = |n: &str| exposed.contains(n) || recorded.contains(n);
    for e in &rule_exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "a rule that reads nothing: {e}");
        for n in names {
            assert!(
                known(&n),
                "rules.yml names {n}, which /metrics does not expose: {e}"
            );
        }
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("compose/grafana/sluicegate.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            queries += 1;
            let names = metric_names(e);
            assert!(
                !names.is_empty(),
                "panel {}: a query that reads no metric: {e}",
                panel["title"]
            );
            for n in names {
                assert!(
                    known(&n),
                    "panel {}: {n} is neither exposed nor recorded: {e}",
                    panel["title"]
                );
            }
        }
    }
    assert!(queries >= 15, "{queries} queries");
    // The names this test knows must be the ones that matter: a misspelling is caught.
    assert!(!known("sluicegate_connections_acepted_total"));
    assert_eq!(
        metric_names(
            "sum by (service) (rate(sluicegate_a_total{end=\"x\"}[1m])) / b:sluicegate_c:r"
        ),
        ["sluicegate_a_total", "b:sluicegate_c:r"]
    );
}

#[test]
fn promtool_accepts_the_rules() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("compose/prometheus/rules.yml"))
        .output();
    match out {
        Err(e) => {
            require_tool("PROMTOOL", Some(format!("promtool not found ({e})")));
        }
        Ok(o) => assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}
