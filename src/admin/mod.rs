//! The admin HTTP API (INTERFACES.md): health of the process, the backends and their state, runtime
//! changes, Prometheus metrics, a Server-Sent Events stream and the live dashboard.
//!
//! Isolation from the data plane: the admin server runs on a thread of its own with a single-threaded
//! runtime, so whatever it is asked (a flood of connections, a slow client, a large metrics page) uses
//! at most that thread. Limits: [`MAX_CONNECTIONS`] connections (more are closed at once),
//! [`MAX_EVENT_STREAMS`] event streams, headers of at most [`MAX_HEADER_BYTES`] (431 beyond), bodies of
//! at most [`MAX_BODY_BYTES`] (413), [`HEADER_TIMEOUT`] to send a request head (which also closes idle
//! keep-alive connections), [`BODY_TIMEOUT`] for its body (408), and [`CONNECTION_LIFETIME`] in all.
//!
//! Security: reads are open; every mutation (POST, PUT, DELETE) needs `Authorization: Bearer TOKEN`
//! when `admin.token` is set (401 otherwise; compared in constant time). A method a path does not take
//! gets 405 and changes nothing. Config validation refuses a non-loopback `admin.listen` without a token.

mod stats;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::MAX_WEIGHT;
use crate::lifecycle::Control;
use crate::pool::{AdminError, State};

pub use stats::Sampler;

/// Admin connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Event streams open at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 16;
/// Request head size limit (hyper answers 431 beyond it).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Request body size limit (413 beyond it).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time to send a request head; also closes idle keep-alive connections.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Any admin connection, event streams included, is closed after this long.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

const DASHBOARD: &str = include_str!("dashboard.html");

type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>;

/// Binds the admin listener (at start, so a taken port fails start-up).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = crate::listener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves the admin API on a thread of its own until `stop` is cancelled.
pub fn start(listener: std::net::TcpListener, control: Arc<Control>, stop: CancellationToken) {
    let spawned = std::thread::Builder::new()
        .name("sluicegate-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin API: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(serve(listener, control, stop));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "admin API: cannot start its thread");
    }
}

struct Admin {
    control: Arc<Control>,
    sampler: Sampler,
    streams: Arc<Semaphore>,
    stop: CancellationToken,
}

async fn serve(listener: std::net::TcpListener, control: Arc<Control>, stop: CancellationToken) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin API: cannot use its listener");
            return;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %addr, "admin API listening");
    let sampler = Sampler::start(control.clone(), stop.clone());
    let admin = Arc::new(Admin {
        control,
        sampler,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        stop: stop.clone(),
    });
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut errors = crate::listener::RateLimited::new(Duration::from_secs(1));
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    if let Some(suppressed) = errors.allow() {
                        tracing::warn!(error = %e, suppressed, "admin API: accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream); // over the cap: closed at once
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES)
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            // Every connection, event streams included, ends after CONNECTION_LIFETIME: a client that
            // stops reading cannot hold a slot for ever (EventSource reconnects by itself).
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
        });
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<BoxBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<BoxBody> {
    json_response(status, &json!({ "error": msg.into() }))
}

fn full(s: impl Into<Bytes>) -> BoxBody {
    Box::pin(Full::new(s.into()))
}

/// Equal-length secret comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits a percent-encoded path segment back into text (`%5B%3A%3A1%5D%3A80` → `[::1]:80`).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The endpoints, by path; each lists the methods it takes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Dashboard,
    Live,
    Ready,
    Backends,
    Backend(String, String),
    BackendDrain(String, String),
    Stats,
    Metrics,
    Events,
    Reload,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        Some(match segs.as_slice() {
            [] | [""] => Route::Dashboard,
            ["live"] => Route::Live,
            ["ready"] => Route::Ready,
            ["backends"] => Route::Backends,
            ["backends", s, a] => Route::Backend(percent_decode(s)?, percent_decode(a)?),
            ["backends", s, a, "drain"] => {
                Route::BackendDrain(percent_decode(s)?, percent_decode(a)?)
            }
            ["stats"] => Route::Stats,
            ["metrics"] => Route::Metrics,
            ["events"] => Route::Events,
            ["reload"] => Route::Reload,
            _ => return None,
        })
    }

    fn methods(&self) -> &'static [Method] {
        match self {
            Route::Backends => &[Method::GET, Method::POST],
            Route::Backend(..) => &[Method::GET, Method::PUT, Method::DELETE],
            Route::BackendDrain(..) | Route::Reload => &[Method::POST],
            _ => &[Method::GET],
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    service: String,
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBackend {
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    state: Option<String>,
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().to_string();
        let Some(route) = Route::parse(&path) else {
            return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"));
        };
        let method = req.method().clone();
        let allowed = route.methods();
        let head = method == Method::HEAD && allowed.contains(&Method::GET);
        if !allowed.contains(&method) && !head {
            let list: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} takes {}", list.join(", ")),
            );
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                r.headers_mut().insert(ALLOW, v);
            }
            return r;
        }
        let mutation = matches!(method, Method::POST | Method::PUT | Method::DELETE);
        if mutation {
            if let Some(token) = self.control.admin_token() {
                let given = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
                    let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                    r.headers_mut()
                        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                    return r;
                }
            }
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let body = if mutation {
            match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            }
        } else {
            Bytes::new()
        };
        let mut resp = self.route(route, method, &query, &body).await;
        if head {
            *resp.body_mut() = full(Bytes::new());
        }
        resp
    }

    async fn route(
        &self,
        route: Route,
        method: Method,
        query: &str,
        body: &[u8],
    ) -> Response<BoxBody> {
        let c = &self.control;
        match (route, method) {
            (Route::Dashboard, _) => {
                let mut r = Response::new(full(DASHBOARD));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            (Route::Live, _) => json_response(StatusCode::OK, &json!({"live": true})),
            (Route::Ready, _) => {
                let ready = c.readiness().is_ready();
                let body = json!({
                    "ready": ready,
                    "draining": c.readiness().is_draining(),
                    "drain": drain_json(c),
                });
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_response(status, &body)
            }
            (Route::Backends, Method::POST) => self.add_backend(body),
            (Route::Backends, _) => {
                json_response(StatusCode::OK, &Value::Array(stats::backends(c)))
            }
            (Route::Backend(s, a), Method::GET) => match self.find(&s, &a) {
                Ok((svc, addr)) => {
                    match svc.pool.all_backends().into_iter().find(|b| b.addr == addr) {
                        Some(b) => {
                            json_response(StatusCode::OK, &stats::backend_json(&svc.name, &b))
                        }
                        None => error(
                            StatusCode::NOT_FOUND,
                            format!("{addr} is not a backend of {s}"),
                        ),
                    }
                }
                Err(r) => r,
            },
            (Route::Backend(s, a), Method::PUT) => self.update_backend(&s, &a, body),
            (Route::Backend(s, a), _) => {
                let close = match query_param(query, "mode") {
                    None | Some("drain") => false,
                    Some("close") => true,
                    Some(other) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("mode must be drain or close, not {other:?}"),
                        )
                    }
                };
                match self.find(&s, &a) {
                    Ok((svc, addr)) => match svc.pool.remove_api(addr, close) {
                        Ok(()) => json_response(
                            StatusCode::ACCEPTED,
                            &json!({"service": s, "address": addr, "removed": true,
                                    "mode": if close { "close" } else { "drain" }}),
                        ),
                        Err(e) => admin_error(e),
                    },
                    Err(r) => r,
                }
            }
            (Route::BackendDrain(s, a), _) => match self.find(&s, &a) {
                Ok((svc, addr)) => match svc.pool.set_state(addr, State::Draining) {
                    Ok(()) => json_response(
                        StatusCode::ACCEPTED,
                        &json!({"service": s, "address": addr, "state": "draining"}),
                    ),
                    Err(e) => admin_error(e),
                },
                Err(r) => r,
            },
            (Route::Stats, _) => {
                let mut frame = self.sampler.latest_value();
                if query_param(query, "history").is_some() {
                    frame["history"] = self.sampler.history();
                }
                json_response(StatusCode::OK, &frame)
            }
            (Route::Metrics, _) => {
                let mut r = Response::new(full(crate::metrics::render(c)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (Route::Events, _) => self.events_stream(),
            (Route::Reload, _) => {
                // Reading and binding are quick and must not race a signal-driven reload.
                match c.reload_from_file() {
                    Ok(report) => {
                        json_response(StatusCode::OK, &json!({"reloaded": true, "report": report}))
                    }
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"reloaded": false, "error": e.to_string()}),
                    ),
                }
            }
        }
    }

    /// The service named `s` and the socket address `a`, or the error response.
    #[allow(clippy::result_large_err)]
    fn find(
        &self,
        s: &str,
        a: &str,
    ) -> Result<(Arc<crate::service::Service>, SocketAddr), Response<BoxBody>> {
        let svc = self
            .control
            .service(s)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no service named {s:?}")))?;
        let addr: SocketAddr = a.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{a:?} is not an ip:port address"),
            )
        })?;
        Ok((svc, addr))
    }

    fn add_backend(&self, body: &[u8]) -> Response<BoxBody> {
        let req: AddBackend = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        if req.weight == 0 || req.weight > MAX_WEIGHT {
            return error(
                StatusCode::BAD_REQUEST,
                format!("weight must be from 1 to {MAX_WEIGHT}, got {}", req.weight),
            );
        }
        let (svc, addr) = match self.find(&req.service, &req.address) {
            Ok(x) => x,
            Err(r) => return r,
        };
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{addr} is not a connectable address"),
            );
        }
        match svc.pool.add_api(addr, req.weight) {
            Ok(()) => {
                let view = svc
                    .pool
                    .member(addr)
                    .map(|b| stats::backend_json(&svc.name, &b))
                    .unwrap_or(Value::Null);
                json_response(StatusCode::CREATED, &view)
            }
            Err(e) => admin_error(e),
        }
    }

    fn update_backend(&self, s: &str, a: &str, body: &[u8]) -> Response<BoxBody> {
        let req: UpdateBackend = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
        };
        let (svc, addr) = match self.find(s, a) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let state = match req.state.as_deref() {
            None => None,
            Some("active") => Some(State::Active),
            Some("draining") => Some(State::Draining),
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("state must be active or draining, not {other:?}"),
                )
            }
        };
        if let Some(w) = req.weight {
            if w == 0 || w > MAX_WEIGHT {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("weight must be from 1 to {MAX_WEIGHT}, got {w}"),
                );
            }
        }
        if req.weight.is_none() && state.is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "nothing to change: give weight and/or state",
            );
        }
        if let Some(w) = req.weight {
            if let Err(e) = svc.pool.set_weight(addr, w) {
                return admin_error(e);
            }
        }
        if let Some(st) = state {
            if let Err(e) = svc.pool.set_state(addr, st) {
                return admin_error(e);
            }
        }
        match svc.pool.member(addr) {
            Some(b) => json_response(StatusCode::OK, &stats::backend_json(&svc.name, &b)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("{addr} is not a backend of {s}"),
            ),
        }
    }

    fn events_stream(&self) -> Response<BoxBody> {
        // The permit travels with the stream's task and returns when the client goes away.
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("at most {MAX_EVENT_STREAMS} event streams at once"),
            );
        };
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let mut changes = self.control.events().subscribe();
        let mut frames = self.sampler.subscribe();
        let stop = self.stop.clone();
        let first = frames.borrow_and_update().clone();
        tokio::spawn(async move {
            let _permit = permit;
            let send =
                |event: &str, data: &str| Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
            if tx.send(send("stats", &first)).await.is_err() {
                return;
            }
            loop {
                let msg = tokio::select! {
                    () = stop.cancelled() => return,
                    () = tx.closed() => return,
                    r = frames.changed() => {
                        if r.is_err() { return; }
                        let f = frames.borrow_and_update().clone();
                        send("stats", &f)
                    }
                    r = changes.recv() => match r {
                        Ok(ev) => send("change", &ev),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            send("lagged", &json!({"missed": n}).to_string())
                        }
                        Err(_) => return,
                    },
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(Box::pin(ChannelBody(rx)) as BoxBody);
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}

/// A response body fed by a channel (the event stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn admin_error(e: AdminError) -> Response<BoxBody> {
    let status = match e {
        AdminError::Exists(_) => StatusCode::CONFLICT,
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn drain_json(c: &Control) -> Value {
    let d = c.drain_progress();
    let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
    if d.draining {
        let per_backend: Vec<Value> = c
            .backends()
            .into_iter()
            .filter(|(_, b)| b.active() > 0)
            .map(|(svc, b)| json!({"service": &*svc, "backend": b.addr, "remaining": b.active()}))
            .collect();
        v["backends"] = Value::Array(per_backend);
        v["oldest_connection_s"] = c
            .services()
            .iter()
            .filter_map(|s| s.service.stats.sessions.oldest_age())
            .max()
            .map(|d| Value::from(d.as_secs_f64()))
            .unwrap_or(Value::Null);
    }
    v
}

/// Reads a request body within the size and time limits.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<BoxBody>> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        ));
    }
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "request body too slow")),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )),
        Ok(Err(e)) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert_eq!(Route::parse("/"), Some(Route::Dashboard));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(
            Route::parse("/backends/web/127.0.0.1:9001"),
            Some(Route::Backend("web".into(), "127.0.0.1:9001".into()))
        );
        assert_eq!(
            Route::parse("/backends/web/%5B%3A%3A1%5D%3A80/drain"),
            Some(Route::BackendDrain("web".into(), "[::1]:80".into()))
        );
        assert_eq!(Route::parse("/nope"), None);
        assert!(!Route::Reload.methods().contains(&Method::GET));
        assert!(Route::Backends.methods().contains(&Method::POST));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("mode=close", "mode"), Some("close"));
        assert_eq!(query_param("a=1&history", "history"), Some(""));
        assert_eq!(query_param("", "mode"), None);
    }
}
