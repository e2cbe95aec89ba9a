//! Timed bans and the runtime deny list (docs/configuration.md "Timed bans and the runtime deny
//! list", docs/admin-api.md "The deny list"): a source banned after its breaches and admitted again
//! when the ban ends, the API's entries refusing at accept until removed or expired, on the ring
//! workers and on a tokio engine; the list through a reload and an upgrade; the API's refusals.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::cli::Sg;
use crate::common::http::{get, request};
use crate::common::*;
use crate::upgrade::{free_port, upgrade};
use sluicegate::config::{Config, RelayMode};
use sluicegate::Outcome;

const TOKEN: &str = "a-token-long-enough-for-admin";

/// Whether a client from `from` is served (its bytes echoed) or refused (closed with nothing).
async fn served(from: [u8; 4], to: SocketAddr) -> bool {
    let mut s = connect_from(from, to).await;
    // A refused client may find its socket closed before it writes.
    let _ = s.write_all(b"hello").await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let _ = within(
        Duration::from_secs(5),
        "an answer or the close",
        s.read_to_end(&mut got),
    )
    .await;
    got == b"hello"
}

/// A proxy with an admin API (a token) and these top-level lines, one service on `relay`.
async fn proxy(be: SocketAddr, relay: RelayMode, top: &str, service: &str) -> Proxy {
    let yaml = format!(
        "admin: {{listen: \"127.0.0.1:0\", token: \"{TOKEN}\"}}\n{top}\n{}",
        service_yaml(&[be], relay, service)
    );
    Proxy::start(&yaml).await
}

/// `GET /deny`'s entries.
async fn deny_list(admin: SocketAddr) -> Vec<Value> {
    let r = get(admin, "/deny").await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["deny"].as_array().expect("a list").clone()
}

/// A mutation of the deny list with the token: its status and body.
async fn deny_call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {TOKEN}");
    let r = request(admin, method, path, &[&auth], body.as_bytes())
        .await
        .expect("the admin API answers");
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// One sample of `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let page = get(admin, "/metrics").await.body;
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not on the page"))
}

/// The admin API's event stream, read once its first frame shows it is subscribed.
struct Events(BufReader<TcpStream>);

impl Events {
    async fn open(admin: SocketAddr) -> Events {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut e = Events(BufReader::new(s));
        e.next(|kind, _| kind == "stats").await;
        e
    }

    /// The next event (`kind`, data) `pick` takes, within 10 s.
    async fn next(&mut self, pick: impl Fn(&str, &Value) -> bool) -> Value {
        within(Duration::from_secs(10), "an event", async {
            let mut kind = String::new();
            loop {
                let mut line = String::new();
                assert!(
                    self.0.read_line(&mut line).await.unwrap() > 0,
                    "stream ended"
                );
                let line = line.trim_end();
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = k.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    let v: Value = serde_json::from_str(d).expect("JSON data");
                    if pick(&kind, &v) {
                        return v;
                    }
                }
            }
        })
        .await
    }
}

/// `per_source_connections: 1` broken twice bans 127.0.0.5 for 2 s: refused at accept (`denied`)
/// although it holds nothing, listed with source `ban`, an event and the metrics; admitted again
/// once the ban has ended.
async fn a_ban_after_the_breaches_ends_when_its_time_is_up(relay: RelayMode) {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let limits = "limits: {per_source_connections: 1, ban: {after: 2, within: 1m, for: 2s}}";
    let p = proxy(be.addr, relay, "", limits).await;
    let admin = p.admin.expect("admin");
    let mut events = Events::open(admin).await;
    let h = held([127, 0, 0, 5], p.addr).await;
    assert!(!served([127, 0, 0, 5], p.addr).await, "over the limit");
    assert!(deny_list(admin).await.is_empty(), "one breach bans nobody");
    assert!(
        !served([127, 0, 0, 5], p.addr).await,
        "over the limit again"
    );
    p.wait_ended(Outcome::SourceLimit, 2).await;
    let banned = events
        .next(|k, v| k == "change" && v["type"] == "source_banned")
        .await;
    assert_eq!(banned["source"], "127.0.0.5/32", "{banned}");
    assert_eq!(banned["recorded"], true, "{banned}");
    let list = deny_list(admin).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["cidr"], "127.0.0.5/32");
    assert_eq!(list[0]["source"], "ban");
    assert!(list[0]["expires"].is_string(), "{list:?}");
    drop(h);
    wait_for(Duration::from_secs(5), "the held session ends", || {
        p.active_to_backends() == 0
    })
    .await;
    assert!(!served([127, 0, 0, 5], p.addr).await, "banned");
    p.wait_ended(Outcome::Denied, 1).await;
    assert!(served([127, 0, 0, 6], p.addr).await, "another source");
    assert_eq!(metric(admin, "sluicegate_bans_total").await, 1.0);
    assert_eq!(metric(admin, "sluicegate_banned_sources").await, 1.0);
    wait_until(Duration::from_secs(10), "the ban ends", || async {
        deny_list(admin).await.is_empty()
    })
    .await;
    assert!(
        served([127, 0, 0, 5], p.addr).await,
        "admitted once the ban ended"
    );
    assert_eq!(metric(admin, "sluicegate_banned_sources").await, 0.0);
    assert_eq!(p.service.stats.ended(Outcome::Denied), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_a_ban_after_the_breaches_ends_when_its_time_is_up() {
    if io_uring_may_be_missing() {
        return;
    }
    a_ban_after_the_breaches_ends_when_its_time_is_up(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_a_ban_after_the_breaches_ends_when_its_time_is_up() {
    a_ban_after_the_breaches_ends_when_its_time_is_up(RelayMode::Epoll).await;
}

/// `POST /deny` refuses a client at accept until `DELETE`, then again until its `ttl` ends.
async fn the_api_denies_until_removed_or_expired(relay: RelayMode) {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let p = proxy(be.addr, relay, "", "").await;
    let admin = p.admin.expect("admin");
    assert!(served([127, 0, 0, 7], p.addr).await);
    let (status, made) = deny_call(
        admin,
        "POST",
        "/deny",
        r#"{"cidr": "127.0.0.7", "reason": "a test"}"#,
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["cidr"], "127.0.0.7/32", "one address is a /32");
    assert_eq!(made["expires"], Value::Null);
    assert_eq!(made["source"], "api");
    assert!(!served([127, 0, 0, 7], p.addr).await, "denied");
    p.wait_ended(Outcome::Denied, 1).await;
    assert_eq!(be.accepted(), 1, "the refused client reached no backend");
    assert!(served([127, 0, 0, 8], p.addr).await, "another source");
    let list = deny_list(admin).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["reason"], "a test");
    let (status, gone) = deny_call(admin, "DELETE", "/deny/127.0.0.7%2F32", "").await;
    assert_eq!(status, 200, "{gone}");
    assert!(
        served([127, 0, 0, 7], p.addr).await,
        "admitted after DELETE"
    );
    let (status, _) = deny_call(admin, "DELETE", "/deny/127.0.0.7%2F32", "").await;
    assert_eq!(status, 404, "not listed any more");

    let (status, made) = deny_call(
        admin,
        "POST",
        "/deny",
        r#"{"cidr": "127.0.0.0/29", "ttl": "1s"}"#,
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert!(made["expires"].is_string(), "{made}");
    assert!(!served([127, 0, 0, 7], p.addr).await, "denied by the /29");
    p.wait_ended(Outcome::Denied, 2).await;
    wait_until(Duration::from_secs(10), "the entry expires", || async {
        deny_list(admin).await.is_empty()
    })
    .await;
    assert!(
        served([127, 0, 0, 7], p.addr).await,
        "admitted after the ttl"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_the_api_denies_until_removed_or_expired() {
    if io_uring_may_be_missing() {
        return;
    }
    the_api_denies_until_removed_or_expired(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_the_api_denies_until_removed_or_expired() {
    the_api_denies_until_removed_or_expired(RelayMode::Epoll).await;
}

/// A denied peer is refused at accept, before a byte is read: a client that sends nothing to a
/// service waiting for a PROXY header (for 30 s) is closed at once, and counted `denied`.
async fn a_denied_peer_is_refused_before_its_header_is_read(relay: RelayMode) {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let edge = "accept_proxy: {from: [127.0.0.0/8], timeout: 30s}";
    let p = proxy(be.addr, relay, "limits: {deny: [127.0.0.14]}", edge).await;
    let mut silent = connect_from([127, 0, 0, 14], p.addr).await;
    let mut b = [0u8; 1];
    let read = within(Duration::from_secs(5), "the close", silent.read(&mut b)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    p.wait_ended(Outcome::Denied, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_a_denied_peer_is_refused_before_its_header_is_read() {
    if io_uring_may_be_missing() {
        return;
    }
    a_denied_peer_is_refused_before_its_header_is_read(RelayMode::Ring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_a_denied_peer_is_refused_before_its_header_is_read() {
    a_denied_peer_is_refused_before_its_header_is_read(RelayMode::Epoll).await;
}

/// Bad input is a 400 naming what was wrong, no token a 401, a full list a 422, a config entry
/// a 409; and none of them changes the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_api_refuses_bad_input_naming_it() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let top = "limits: {deny: [192.0.2.0/24], max_denied: 2}";
    let p = proxy(be.addr, RelayMode::Epoll, top, "").await;
    let admin = p.admin.expect("admin");
    for (body, names) in [
        (r#"{"cidr": "300.1.2.3"}"#, "cidr:"),
        (r#"{"cidr": "198.51.100.7/24"}"#, "host bits"),
        (r#"{"cidr": "198.51.100.0/24", "ttl": "soon"}"#, "ttl:"),
        (r#"{"cidr": "198.51.100.0/24", "ttl": "0s"}"#, "ttl:"),
        (
            r#"{"cidr": "198.51.100.0/24", "for": "1h"}"#,
            "unknown field",
        ),
        (r#"["198.51.100.0/24"]"#, "JSON object"),
    ] {
        let (status, v) = deny_call(admin, "POST", "/deny", body).await;
        assert_eq!(status, 400, "{body}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(names), "{body}: {e}");
    }
    let (status, v) = deny_call(admin, "DELETE", "/deny/not-a-net", "").await;
    assert_eq!(status, 400, "{v}");
    let no_token = request(
        admin,
        "POST",
        "/deny",
        &[],
        br#"{"cidr": "198.51.100.0/24"}"#,
    )
    .await
    .unwrap();
    assert_eq!(no_token.status, 401, "{}", no_token.body);
    let list = deny_list(admin).await;
    assert_eq!(list.len(), 1, "only the config's: {list:?}");
    assert_eq!(list[0]["source"], "config");
    let (status, v) = deny_call(admin, "DELETE", "/deny/192.0.2.0%2F24", "").await;
    assert_eq!(status, 409, "{v}");
    let (status, _) = deny_call(admin, "POST", "/deny", r#"{"cidr": "198.51.100.0/24"}"#).await;
    assert_eq!(status, 201);
    let (status, v) = deny_call(admin, "POST", "/deny", r#"{"cidr": "203.0.113.0/24"}"#).await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("max_denied"), "{v}");
    assert_eq!(deny_list(admin).await.len(), 2);
    assert_eq!(metric(admin, "sluicegate_denied_entries").await, 2.0);
}

/// A reload replaces the config's entries and keeps the API's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_list_survives_a_reload() {
    let be = Backend::echo([127, 0, 0, 1]).await;
    let p = proxy(be.addr, RelayMode::Epoll, "limits: {deny: [127.0.0.9]}", "").await;
    let admin = p.admin.expect("admin");
    let (status, _) = deny_call(admin, "POST", "/deny", r#"{"cidr": "127.0.0.10"}"#).await;
    assert_eq!(status, 201);
    assert!(!served([127, 0, 0, 9], p.addr).await, "the config's");
    assert!(!served([127, 0, 0, 10], p.addr).await, "the API's");
    let yaml = format!(
        "admin: {{listen: \"127.0.0.1:0\", token: \"{TOKEN}\"}}\nlimits: {{deny: [127.0.0.11]}}\n{}",
        service_yaml(&[be.addr], RelayMode::Epoll, "")
    );
    p.control
        .reload(Config::from_yaml(&yaml).unwrap())
        .expect("reload");
    assert!(!served([127, 0, 0, 10], p.addr).await, "the API's kept");
    assert!(!served([127, 0, 0, 11], p.addr).await, "the new config's");
    assert!(
        served([127, 0, 0, 9], p.addr).await,
        "the old config's gone"
    );
    let mut sources: Vec<String> = deny_list(admin)
        .await
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["cidr"].as_str().unwrap(),
                e["source"].as_str().unwrap()
            )
        })
        .collect();
    sources.sort();
    assert_eq!(sources, ["127.0.0.10/32 api", "127.0.0.11/32 config"]);
}

/// The binary upgraded in place: the API's entries (one with a ttl, which keeps its expiry) are
/// on the new process's list and refuse there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_list_is_carried_across_an_upgrade() {
    let backend = Backend::echo([127, 0, 0, 1]).await;
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut sg = Sg::start(&format!(
        "log: {{level: info, format: json}}\nadmin: {{listen: \"{admin}\", token: \"{TOKEN}\"}}\nservices:\n  - name: t\n    listen: 127.0.0.1:0\n    backends:\n      - {{address: \"{}\"}}\n",
        backend.addr
    ));
    let (status, _) = deny_call(admin, "POST", "/deny", r#"{"cidr": "127.0.0.12"}"#).await;
    assert_eq!(status, 201);
    let (status, timed) = deny_call(
        admin,
        "POST",
        "/deny",
        r#"{"cidr": "127.0.1.0/24", "ttl": "1h", "reason": "r"}"#,
    )
    .await;
    assert_eq!(status, 201);
    let before = deny_list(admin).await;
    assert!(!served([127, 0, 0, 12], sg.addr).await);
    let new = tokio::task::block_in_place(|| upgrade(&mut sg));
    // The entries come in the totals, which the new process takes as they arrive.
    wait_until(
        Duration::from_secs(10),
        "the new process lists them",
        || async { deny_list(admin).await == before },
    )
    .await;
    assert!(
        before.iter().any(|e| e["expires"] == timed["expires"]),
        "the same expiry: {before:?}"
    );
    assert!(
        !served([127, 0, 0, 12], sg.addr).await,
        "refused by the new process"
    );
    assert!(!served([127, 0, 1, 1], sg.addr).await);
    assert!(served([127, 0, 0, 13], sg.addr).await);
    drop(new);
}
