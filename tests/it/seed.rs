//! The seed systems' API (`GET /rep`, `POST /add`, `DELETE /rm`, `GET /heartbeat`) where it needs no
//! Docker: the answer shapes, choosing the service, and every refusal, each of which changes nothing.
//! With Docker, `tests/it/replicas.rs` runs the replicas for real.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::fleet::replicas;
use crate::common::http::{get, request, request_within};
use crate::common::*;
use serde_json::{json, Value};

fn service(name: &str, backends: &[SocketAddr], extra: &str) -> String {
    let mut y = format!("  - name: {name}\n    listen: 127.0.0.1:0\n");
    for l in extra.lines().filter(|l| !l.trim().is_empty()) {
        y += &format!("    {}\n", l.trim());
    }
    y += "    backends:\n";
    for b in backends {
        y += &format!("      - {{address: \"{b}\"}}\n");
    }
    if backends.is_empty() {
        y = y.replace("    backends:\n", "");
    }
    y
}

fn config(services: &[String]) -> String {
    format!(
        "log: {{level: warn}}\nadmin: {{listen: \"127.0.0.1:0\", token: t0ken-t0ken-t0ken}}\nservices:\n{}",
        services.concat()
    )
}

/// A service whose replicas Docker would run, with no Docker at its endpoint.
const NO_DOCKER: &str = "replicas: {docker: \"unix:///nonexistent/docker.sock\", image: demo/backend, port: 5000, min: 1, max: 3, start: 1}
health: {kind: http, path: /health}";

async fn call(a: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let r = request(
        a,
        method,
        path,
        &["Authorization: Bearer t0ken-t0ken-t0ken"],
        body.as_bytes(),
    )
    .await
    .expect("request");
    (r.status, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rep_lists_the_backends_of_the_one_service() {
    let (_port, fleet) = replicas(2, 3);
    let addrs: Vec<SocketAddr> = fleet.iter().map(|r| r.addr()).collect();
    let p = Proxy::start(&config(&[service("web", &addrs, "")])).await;
    let a = p.admin.unwrap();
    let hb = get(a, "/heartbeat").await;
    assert_eq!(hb.status, 200);
    assert_eq!(hb.json()["status"], "successful");
    let rep = get(a, "/rep").await;
    assert_eq!(rep.status, 200);
    let mut want: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    want.sort();
    assert_eq!(
        rep.json(),
        json!({"message": {"N": 3, "replicas": want}, "status": "successful"}),
        "the seed systems' shape; static backends are named by their address"
    );
    assert_eq!(get(a, "/services/web/rep").await.json(), rep.json());
    assert_eq!(get(a, "/rep?service=web").await.json(), rep.json());
    // Adding to a service whose containers sluicegate does not run is refused.
    let (status, body) = call(a, "POST", "/add", r#"{"n": 1}"#).await;
    assert_eq!(status, 400);
    assert_eq!(body["status"], "failure");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no replicas section"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_services_must_be_named() {
    let (_port, fleet) = replicas(2, 2);
    let p = Proxy::start(&config(&[
        service("web", &[fleet[0].addr()], ""),
        service("api", &[fleet[1].addr()], ""),
    ]))
    .await;
    let a = p.admin.unwrap();
    let bare = get(a, "/rep").await;
    assert_eq!(bare.status, 400);
    assert!(bare.json()["message"]
        .as_str()
        .unwrap()
        .contains("2 services"));
    assert_eq!(
        get(a, "/services/api/rep").await.json()["message"]["replicas"],
        json!([fleet[1].addr().to_string()])
    );
    let unknown = get(a, "/services/nope/rep").await;
    assert_eq!(unknown.status, 400);
    assert!(unknown.json()["message"].as_str().unwrap().contains("nope"));
}

/// Every bad request is refused with a message before Docker is asked anything; a valid one meets
/// a Docker that is not there: 503 with what Docker's absence looks like. Nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_missing_docker_change_nothing() {
    let p = Proxy::start(&config(&[service("web", &[], NO_DOCKER)])).await;
    let a = p.admin.unwrap();
    let before = get(a, "/rep").await.json();
    assert_eq!(before["message"]["N"], 0, "no Docker: no replica");
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["a", "b"]}"#,
            "<Error> Length of hostname list is more than newly added instances",
        ),
        (
            "DELETE",
            "/rm",
            r#"{"n": 1, "hostnames": ["a", "b"]}"#,
            "<Error> Length of hostname list is more than removable instances",
        ),
        ("POST", "/add", r#"{"n": 0}"#, "positive"),
        ("POST", "/add", r#"{"n": -1}"#, "positive"),
        ("POST", "/add", r#"{"n": "2"}"#, "n: must be an integer"),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": "S5"}"#,
            "hostnames: invalid type: string \"S5\", expected a sequence",
        ),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": [5]}"#,
            "hostnames[0]: invalid type: integer `5`, expected a string",
        ),
        ("POST", "/add", r#"{"hostnames": []}"#, "missing field `n`"),
        ("POST", "/add", r#"{"n": 1, "names": []}"#, "unknown field"),
        ("POST", "/add", r#"{"n": 1"#, "invalid JSON"),
        ("POST", "/add", r#"[1]"#, "JSON object"),
        ("POST", "/add", r#"{"n": 4}"#, "above the maximum of 3"),
        (
            "POST",
            "/add",
            r#"{"n": 1, "hostnames": ["bad name"]}"#,
            "not a valid hostname",
        ),
        (
            "DELETE",
            "/rm",
            r#"{"n": 1, "hostnames": ["ghost"]}"#,
            "no replica named \"ghost\"",
        ),
        ("DELETE", "/rm", r#"{"n": 1}"#, "below the minimum of 1"),
    ];
    for (method, path, body, says) in cases {
        let (status, answer) = call(a, method, path, body).await;
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        assert_eq!(answer["status"], "failure");
        let msg = answer["message"].as_str().unwrap();
        assert!(msg.contains(says), "{method} {path} {body}: {msg}");
    }
    // Valid, but Docker is not there.
    let (status, answer) = call(a, "POST", "/add", r#"{"n": 1, "hostnames": ["S5"]}"#).await;
    assert_eq!(status, 503, "{answer}");
    let msg = answer["message"].as_str().unwrap();
    assert!(
        msg.contains("/nonexistent/docker.sock"),
        "names the endpoint: {msg}"
    );
    // Mutations need the token; reads do not.
    let no_token = request(a, "POST", "/add", &[], br#"{"n": 1}"#)
        .await
        .unwrap();
    assert_eq!(no_token.status, 401);
    assert_eq!(get(a, "/rep").await.json(), before, "nothing changed");
    let m = get(a, "/metrics").await.body;
    assert!(
        m.lines().any(
            |l| l.starts_with("sluicegate_docker_errors_total{service=\"web\"}")
                && !l.ends_with(" 0")
        ),
        "Docker failures are counted"
    );
}

/// reliability.md `docker-hung-labels`: a service whose backends come from Docker labels, on an
/// Engine that accepts and never answers, holds neither the service beside it nor the readiness: the
/// balancer is ready and the static service serves while the Engine's first list is still
/// unanswered (neither listed nor failed yet). Before, start-up waited for that list to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_holds_no_service_beside_a_docker_label_one() {
    let engine = crate::common::docker::FaultyEngine::start();
    engine.hang(true);
    let (_port, fleet) = replicas(2, 1);
    let labelled = format!(
        "backends: [{{docker: {{labels: {{sluicegate.test: hung}}, port: 5000, docker: \"{}\"}}}}]",
        engine.endpoint
    );
    // Proxy::start returns once the balancer is ready.
    let p = Proxy::start(&config(&[
        service("static", &[fleet[0].addr()], ""),
        service("labelled", &[], &labelled),
    ]))
    .await;
    within(
        Duration::from_secs(5),
        "the static service serves",
        crate::common::fleet::who(p.addrs[0]),
    )
    .await
    .expect("served");
    // Read at once, from `/metrics` (computed when asked, where `/stats` is sampled each second):
    // the Engine's list is bounded at 5 s, after which a correct build counts a failure, so no
    // wait here may approach it.
    let admin = p.admin.unwrap();
    let m = get(admin, "/metrics").await.body;
    let count = |family: &str| {
        let prefix = format!("{family}{{service=\"labelled\",");
        m.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(
        (
            count("sluicegate_docker_discovery_lists_total"),
            count("sluicegate_docker_discovery_failures_total")
        ),
        (Some("0".to_string()), Some("0".to_string())),
        "served before the hung Engine's first list ended"
    );
}

/// reliability.md `docker-hung`: an Engine that accepts and never answers holds neither the service
/// without replicas (it serves at once, and the balancer is ready) nor the replica set: while an
/// `/add` waits for Docker, a refusal is answered at once, and the `/add` itself ends in 503 within
/// `replicas.timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_holds_neither_other_services_nor_the_replicas_api() {
    let engine = crate::common::docker::FaultyEngine::start();
    engine.hang(true);
    let (_port, fleet) = replicas(2, 1);
    // Far longer than any wait below: whatever waits for this Engine shows.
    let timeout_s = 20;
    let hung = format!(
        "replicas: {{docker: \"{}\", image: demo/backend, port: 5000, min: 1, max: 3, start: 1, timeout: {timeout_s}s}}
health: {{kind: http, path: /health}}",
        engine.endpoint
    );
    // Proxy::start waits (at most 10 s) for the balancer to be ready.
    let p = Proxy::start(&config(&[
        service("static", &[fleet[0].addr()], ""),
        service("web", &[], &hung),
    ]))
    .await;
    let a = p.admin.unwrap();
    within(
        Duration::from_secs(5),
        "the static service serves",
        crate::common::fleet::who(p.addrs[0]),
    )
    .await
    .expect("served");

    let add = tokio::spawn(async move {
        request_within(
            a,
            "POST",
            "/services/web/add",
            &["Authorization: Bearer t0ken-t0ken-t0ken"],
            br#"{"n": 1}"#,
            Duration::from_secs(3 * timeout_s),
        )
        .await
    });
    // The /add is now waiting for the Engine; the set's decisions are not.
    let (status, body) = within(
        Duration::from_secs(5),
        "a refusal while an /add waits for Docker",
        call(
            a,
            "DELETE",
            "/services/web/rm",
            r#"{"n": 1, "hostnames": ["ghost"]}"#,
        ),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(!add.is_finished(), "the /add is still waiting for Docker");
    let (status, _) = within(
        Duration::from_secs(5),
        "/rep while an /add waits for Docker",
        call(a, "GET", "/services/web/rep", ""),
    )
    .await;
    assert_eq!(status, 200);

    let added = add.await.unwrap().expect("the /add is answered");
    assert_eq!(added.status, 503, "{}", added.body);
    assert!(
        added
            .body
            .contains(&format!("did not answer within {timeout_s}s")),
        "{}",
        added.body
    );
    assert_eq!(
        call(a, "GET", "/services/web/rep", "").await.1["message"]["N"],
        0,
        "nothing was started"
    );
}
