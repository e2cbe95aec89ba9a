//! The admin HTTP API: health of the process, the backends and their state, runtime changes,
//! Prometheus metrics, a Server-Sent Events stream and the live dashboard. This file is the server
//! (limits, authentication, bodies, the event stream); `routes.rs` maps paths to what they do;
//! `stats.rs` computes the numbers. Every endpoint is documented in `docs/admin-api.md`.
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

mod routes;
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
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::util::RateLimited;
use routes::Route;
use stats::Sampler;

/// Admin connections served at once; more are closed at once.
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
    let l = crate::listener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves the admin API on a thread of its own until `stop` is cancelled.
pub(crate) fn start(
    listener: std::net::TcpListener,
    control: Arc<Control>,
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
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret", b"s3creT"));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
    }
}
