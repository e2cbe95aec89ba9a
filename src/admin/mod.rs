//! The admin HTTP API: health of the process, the backends and their state, runtime changes,
//! Prometheus metrics, a Server-Sent Events stream and the live dashboard. This file is the server
//! (limits, authentication, bodies, the event stream); `endpoints.rs` maps paths to what they do;
//! `stats.rs` computes the per-second frames and backend objects, `metrics.rs` the metrics page, both
//! from the views the subsystems give. Every endpoint is documented in `docs/admin-api.md`.
//!
//! Isolation from the data plane: the admin server runs on a thread of its own with a single-threaded
//! runtime, so whatever it is asked (a flood of connections, a slow client, a large metrics page) uses
//! at most that thread. Limits: [`MAX_CONNECTIONS`] connections (more are closed at once),
//! [`MAX_EVENT_STREAMS`] event streams, headers of at most [`MAX_HEADER_BYTES`] (431 beyond), bodies of
//! at most [`MAX_BODY_BYTES`] (413), [`HEADER_TIMEOUT`] to send a request head (which also closes idle
//! keep-alive connections), [`BODY_TIMEOUT`] for its body (408), and [`CONNECTION_LIFETIME`] in all.
//!
//! Security (docs/admin-api.md, "Security"): every request must name the API by an IP address,
//! `localhost` or one of `admin.hosts` in its `Host` header, and a request carrying an `Origin` must
//! come from that same origin (403 otherwise), so neither a DNS-rebinding page nor another site can
//! use a browser to reach it. A `POST`, and any request with a body, must be `Content-Type:
//! application/json` (415), which a page cannot send cross-site without a preflight that is never
//! granted. Reads are open to whoever passes those checks; every mutation (POST, PUT, DELETE) needs
//! `Authorization: Bearer TOKEN` when a token is set (401), compared without leaking where or whether
//! it differs. The token is the one bound with the listener at start; a reload never changes it. A
//! method a path does not take gets 405 and changes nothing.
//!
//! Slots: at [`MAX_CONNECTIONS`], a new connection evicts the oldest one that has not sent a byte
//! (an idle flood cannot keep `/ready` from answering), and is closed only when every connection
//! has spoken.

mod connections;
mod deny;
mod endpoints;
mod metrics;
mod stats;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH,
    CONTENT_TYPE, HOST, ORIGIN, TRANSFER_ENCODING, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::AdminSettings;
use crate::control::Control;
use crate::util::{lock, RateLimited};
use endpoints::Endpoint;
use stats::Sampler;

/// Admin connections served at once; beyond, the oldest silent one is evicted, else the new one closed.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Event streams open at once; more get 503.
pub(crate) const MAX_EVENT_STREAMS: usize = 16;
/// Request head size limit (hyper answers 431 beyond it).
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Request body size limit (413 beyond it).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time to send a request head; also closes idle keep-alive connections.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to send a request body.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Any admin connection, event streams included, is closed after this long.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

const DASHBOARD: &str = include_str!("dashboard.html");

type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>;

/// Binds the admin listener (at start, so a taken port fails start-up).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let l = crate::listener::open(addr, &["admin"])?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves the admin API on a thread of its own until `stop` is cancelled, with the settings it was
/// bound with.
pub(crate) fn start(
    listener: std::net::TcpListener,
    control: Arc<Control>,
    settings: Arc<AdminSettings>,
    stop: CancellationToken,
) {
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
            rt.block_on(serve(listener, control, settings, stop));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "admin API: cannot start its thread");
    }
}

struct Admin {
    control: Arc<Control>,
    settings: Arc<AdminSettings>,
    sampler: Sampler,
    streams: Arc<Semaphore>,
    stop: CancellationToken,
}

/// The open admin connections, oldest first, for the cap and the eviction of silent ones.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: VecDeque<Slot>,
}

struct Slot {
    id: u64,
    /// Set once the client has sent a byte.
    spoke: Arc<AtomicBool>,
    evict: CancellationToken,
}

impl Slots {
    /// A slot for a new connection: free, or taken from the oldest connection that has not sent a
    /// byte (which is closed); `None` when every connection has spoken.
    fn admit(&mut self) -> Option<(u64, Arc<AtomicBool>, CancellationToken)> {
        if self.open.len() >= MAX_CONNECTIONS {
            let silent = self.open.iter().position(|s| !s.spoke.load(Relaxed))?;
            if let Some(victim) = self.open.remove(silent) {
                victim.evict.cancel();
            }
        }
        self.next_id += 1;
        let slot = Slot {
            id: self.next_id,
            spoke: Arc::new(AtomicBool::new(false)),
            evict: CancellationToken::new(),
        };
        let handles = (slot.id, slot.spoke.clone(), slot.evict.clone());
        self.open.push_back(slot);
        Some(handles)
    }

    fn leave(&mut self, id: u64) {
        if let Some(i) = self.open.iter().position(|s| s.id == id) {
            self.open.remove(i);
        }
    }
}

/// A connection's socket that notes when the client first sends a byte.
struct Watched {
    io: TcpStream,
    spoke: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.spoke.store(true, Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn serve(
    listener: std::net::TcpListener,
    control: Arc<Control>,
    settings: Arc<AdminSettings>,
    stop: CancellationToken,
) {
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
    let token = settings
        .token
        .as_ref()
        .map_or("none", |(_, from)| from.as_str());
    tracing::info!(listen = %addr, token, "admin API listening");
    if settings.token.is_none() {
        tracing::warn!(
            listen = %addr,
            "the admin API has NO TOKEN: any process that reaches it can add backends, drain and reload; set admin.token_file or SLUICEGATE_ADMIN_TOKEN"
        );
    }
    let sampler = Sampler::start(control.clone(), stop.clone());
    let admin = Arc::new(Admin {
        control,
        settings,
        sampler,
        streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        stop: stop.clone(),
    });
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut errors = RateLimited::new(Duration::from_secs(1));
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
        let Some((id, spoke, evict)) = lock(&slots).admit() else {
            drop(stream); // every slot holds a connection that has spoken: closed at once
            continue;
        };
        let (admin, slots) = (admin.clone(), slots.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let io = Watched { io: stream, spoke };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES)
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .serve_connection(TokioIo::new(io), service);
            // Every connection, event streams included, ends after CONNECTION_LIFETIME: a client that
            // stops reading cannot hold a slot for ever (EventSource reconnects by itself).
            tokio::select! {
                () = evict.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
            }
            lock(&slots).leave(id);
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

/// Why a request is refused: its status and what was wrong, answered `{"error": …}`, or in the seed
/// systems' shape on their routes (`{"message": …, "status": "failure"}`).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    seed: bool,
    /// A header the status calls for (`Allow` with 405, `WWW-Authenticate` with 401).
    header: Option<(HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            seed: false,
            header: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// The same refusal, answered in the seed systems' shape.
    fn seed(self) -> ApiError {
        ApiError { seed: true, ..self }
    }

    fn with_header(self, name: HeaderName, value: HeaderValue) -> ApiError {
        ApiError {
            header: Some((name, value)),
            ..self
        }
    }

    fn response(self) -> Response<BoxBody> {
        let body = if self.seed {
            json!({"message": self.message, "status": "failure"})
        } else {
            json!({ "error": self.message })
        };
        let mut r = json_response(self.status, &body);
        if let Some((name, value)) = self.header {
            r.headers_mut().insert(name, value);
        }
        r
    }
}

fn full(s: impl Into<Bytes>) -> BoxBody {
    Box::pin(Full::new(s.into()))
}

/// Why a request is refused before its route is looked at, if it is: a `Host` that is not one of
/// the API's names, a foreign `Origin`, or a POST (or a body) that is not JSON.
fn refused(settings: &AdminSettings, method: &Method, h: &HeaderMap) -> Option<ApiError> {
    let text = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let host = text(HOST);
    if let Some(host) = host {
        if !settings.host_allowed(host) {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Host {host:?} is not a name of this admin API: use its address, or add the name to admin.hosts"),
            ));
        }
    } else if h.contains_key(HOST) {
        return Some(ApiError::bad_request("the Host header is not text"));
    }
    if let Some(origin) = h.get(ORIGIN) {
        let same = origin.to_str().ok().zip(host).is_some_and(|(o, host)| {
            let authority = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            authority.is_some_and(|a| a.eq_ignore_ascii_case(host))
        });
        if !same {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin requests are refused (Origin {origin:?})"),
            ));
        }
    }
    let has_body =
        h.contains_key(TRANSFER_ENCODING) || text(CONTENT_LENGTH).is_some_and(|n| n.trim() != "0");
    if *method == Method::POST || has_body {
        let json = text(CONTENT_TYPE).is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Some(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a POST, and any request with a body, needs Content-Type: application/json",
            ));
        }
    }
    None
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any case).
fn bearer(h: &HeaderMap) -> &[u8] {
    h.get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            let (scheme, rest) = v.split_at(v.len().min(7));
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then(|| rest.trim_ascii())
        })
        .unwrap_or(b"")
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        match self.answer(req).await {
            Ok(r) => r,
            Err(e) => e.response(),
        }
    }

    /// Checks a request in the order docs/admin-api.md gives (the security checks, the path, the
    /// method, the token, the body), then answers it.
    async fn answer(&self, req: Request<Incoming>) -> Result<Response<BoxBody>, ApiError> {
        if let Some(e) = refused(&self.settings, req.method(), req.headers()) {
            return Err(e);
        }
        let path = req.uri().path().to_string();
        let endpoint = Endpoint::parse(&path)
            .ok_or_else(|| ApiError::not_found(format!("no such endpoint: {path}")))?;
        let method = req.method().clone();
        let allowed = endpoint.methods();
        let head = method == Method::HEAD && allowed.contains(&Method::GET);
        if !allowed.contains(&method) && !head {
            let list: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
            let e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} takes {}", list.join(", ")),
            );
            return Err(match HeaderValue::from_str(&list.join(", ")) {
                Ok(v) => e.with_header(ALLOW, v),
                Err(_) => e,
            });
        }
        let mutation = matches!(method, Method::POST | Method::PUT | Method::DELETE);
        if mutation {
            if let Some((token, _)) = &self.settings.token {
                if !token.matches(bearer(req.headers())) {
                    let e =
                        ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                    return Err(e.with_header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
                }
            }
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let body = if mutation {
            read_body(req).await?
        } else {
            Bytes::new()
        };
        let mut resp = self.dispatch(endpoint, method, &query, &body).await?;
        if head {
            *resp.body_mut() = full(Bytes::new());
        }
        Ok(resp)
    }

    fn events_stream(&self) -> Result<Response<BoxBody>, ApiError> {
        // The permit travels with the stream's task and returns when the client goes away.
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("at most {MAX_EVENT_STREAMS} event streams at once"),
            ));
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
        Ok(r)
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

/// Reads a request body within the size and time limits.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request body too slow",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        assert_eq!(bearer(&headers(&[("authorization", "Bearer abc")])), b"abc");
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  abc ")])),
            b"abc"
        );
        assert_eq!(bearer(&headers(&[("authorization", "BEARER abc")])), b"abc");
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), b"");
        assert_eq!(bearer(&headers(&[("authorization", "Bear")])), b"");
        assert_eq!(bearer(&headers(&[])), b"");
    }

    #[test]
    fn foreign_hosts_origins_and_bodies_are_refused() {
        let s = AdminSettings {
            listen: "127.0.0.1:9901".parse().unwrap(),
            token: None,
            hosts: vec!["lb.internal".into()],
        };
        let status = |m: Method, pairs: &[(&'static str, &str)]| {
            refused(&s, &m, &headers(pairs)).map(|e| e.status.as_u16())
        };
        let json = ("content-type", "application/json; charset=utf-8");
        assert_eq!(status(Method::GET, &[("host", "127.0.0.1:9901")]), None);
        assert_eq!(status(Method::GET, &[("host", "lb.internal:9901")]), None);
        assert_eq!(status(Method::GET, &[]), None, "HTTP/1.0 without Host");
        assert_eq!(
            status(Method::GET, &[("host", "evil.example:9901")]),
            Some(403)
        );
        let same = [
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:9901"),
            json,
        ];
        assert_eq!(status(Method::POST, &same), None);
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8000",
            "null",
            "file://",
        ] {
            let h = [("host", "127.0.0.1:9901"), ("origin", origin), json];
            assert_eq!(status(Method::POST, &h), Some(403), "{origin}");
        }
        let h = [("host", "127.0.0.1:9901"), ("content-type", "text/plain")];
        assert_eq!(status(Method::POST, &h), Some(415));
        assert_eq!(
            status(Method::POST, &[("host", "127.0.0.1:9901")]),
            Some(415)
        );
        let h = [("host", "127.0.0.1:9901"), ("content-length", "2")];
        assert_eq!(status(Method::PUT, &h), Some(415), "a body must be JSON");
        assert_eq!(status(Method::DELETE, &[("host", "127.0.0.1:9901")]), None);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_silent_connection_only() {
        let mut slots = Slots::default();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(slots.admit().unwrap());
        }
        held[0].1.store(true, Relaxed); // the oldest has spoken
        let (_, _, _) = slots.admit().expect("a silent one makes room");
        assert!(!held[0].2.is_cancelled(), "a connection that spoke is kept");
        assert!(held[1].2.is_cancelled(), "the oldest silent one is closed");
        assert_eq!(slots.open.len(), MAX_CONNECTIONS);
        for (_, spoke, _) in &held {
            spoke.store(true, Relaxed);
        }
        let newest = slots.open.back().unwrap().spoke.clone();
        newest.store(true, Relaxed);
        assert!(
            slots.admit().is_none(),
            "every connection has spoken: refuse"
        );
        let id = held[5].0;
        slots.leave(id);
        assert!(slots.admit().is_some(), "a slot freed is taken");
    }
}
