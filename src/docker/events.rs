//! The Engine's event stream, read here rather than through bollard: bollard's decoder parses its
//! whole buffer again on each chunk of a line that has not ended, so one line without end cost
//! quadratic CPU on the control runtime (6.6 s of CPU in 7.5 s: probes, DNS and reloads stalled)
//! and memory without bound. Here tokio-util's `LinesCodec` splits the body into lines, looking at
//! each byte once and holding at most [`MAX_LINE`] of a line: a longer line is discarded with an
//! error in the log, and the stream goes on at the next newline. The request is the one bollard
//! would make (the negotiated API version, the same filters), over the same transport. Streams are
//! read on a thread of their own, off the control runtime: the watcher there takes parsed events.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bollard::models::EventMessage;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, LinesCodec, LinesCodecError};
use tokio_util::task::AbortOnDropHandle;

use super::DockerError;
use crate::config::DockerTransport;

/// The longest event line read: an event is a few hundred bytes (a container with many labels, a
/// few KiB), so a line past this is no event the Engine sent but a broken or hostile stream.
pub(crate) const MAX_LINE: usize = 1 << 20;

/// The most of an error answer's body read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// One line of the stream, as [`EventLines`] splits it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A whole line, without its newline.
    Text(String),
    /// A line longer than the maximum: what was read of it is dropped, the rest will be skipped up
    /// to the next newline.
    TooLong,
    /// A line that is not UTF-8 (dropped whole).
    NotText,
}

/// Splits the event stream into lines: `LinesCodec` with a maximum, whose refusals are items, not
/// errors, so that the stream goes on after them (a codec error would end the `FramedRead`).
pub(crate) struct EventLines(LinesCodec);

impl EventLines {
    pub(crate) fn new(max: usize) -> EventLines {
        EventLines(LinesCodec::new_with_max_length(max))
    }

    fn item(got: Result<Option<String>, LinesCodecError>) -> Option<Line> {
        match got {
            Ok(line) => line.map(Line::Text),
            Err(LinesCodecError::MaxLineLengthExceeded) => Some(Line::TooLong),
            // The codec's only other error is a line that is not UTF-8, consumed already.
            Err(LinesCodecError::Io(_)) => Some(Line::NotText),
        }
    }
}

impl Decoder for EventLines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        Ok(EventLines::item(self.0.decode(src)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        Ok(EventLines::item(self.0.decode_eof(src)))
    }
}

/// A byte stream to the Engine.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The query of an events request: from `since` (Unix seconds), with `filters` (the Engine's
/// JSON filter map), URL-encoded.
pub(crate) fn query(since: i64, filters: &HashMap<String, Vec<String>>) -> String {
    let json = serde_json::to_string(filters).unwrap_or_else(|_| "{}".into());
    format!("since={since}&filters={}", url_encoded(&json))
}

/// `s` with every byte but the URL's unreserved characters written as `%XX`.
fn url_encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Events read ahead of the watcher that takes them (each is small): beyond, the reader waits.
const QUEUED: usize = 64;

/// Opens `GET /v{version}/events?{query}` on `transport`, the answer's head bounded by `timeout`;
/// the stream then yields each event until the Engine ends it or the connection breaks (its last
/// item). The stream is read on a thread of its own ([`reader`]): what it costs is never the
/// control runtime's, where the watcher that takes its events runs.
pub(crate) async fn open(
    transport: &DockerTransport,
    version: &str,
    query: &str,
    timeout: Duration,
) -> Result<super::Events, DockerError> {
    let endpoint = transport.endpoint().to_string();
    let unavailable = |reason: String| DockerError::Unavailable {
        endpoint: endpoint.clone(),
        reason,
    };
    let reader =
        reader().map_err(|e| unavailable(format!("no thread to read the event stream on: {e}")))?;
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUED);
    let (transport, path) = (transport.clone(), format!("/v{version}/events?{query}"));
    reader.spawn(async move {
        let mut events = match read(&transport, &path, timeout).await {
            Ok(events) => events,
            Err(e) => {
                let _ = head_tx.send(Err(e));
                return;
            }
        };
        if head_tx.send(Ok(())).is_err() {
            return;
        }
        loop {
            let item = tokio::select! {
                () = tx.closed() => return,
                item = futures_util::StreamExt::next(&mut events) => item,
            };
            let Some(item) = item else { return };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    head_rx
        .await
        .map_err(|_| unavailable("the event reader ended".into()))??;
    Ok(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
    )))
}

/// The runtime the event streams are read on, on a thread of its own started with the first one.
fn reader() -> Result<&'static tokio::runtime::Handle, String> {
    static READER: OnceLock<Result<tokio::runtime::Handle, String>> = OnceLock::new();
    READER
        .get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let handle = rt.handle().clone();
            std::thread::Builder::new()
                .name("sluicegate-docker-events".into())
                .spawn(move || rt.block_on(std::future::pending::<()>()))
                .map_err(|e| e.to_string())?;
            Ok(handle)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Opens the stream at `path` on `transport` and reads it here.
async fn read(
    transport: &DockerTransport,
    path: &str,
    timeout: Duration,
) -> Result<EventStream, DockerError> {
    let endpoint = transport.endpoint().to_string();
    let unavailable = |reason: String| DockerError::Unavailable {
        endpoint: endpoint.clone(),
        reason,
    };
    let head = async {
        let (io, host) = connect(transport).await.map_err(&unavailable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unavailable(format!("HTTP handshake: {e}")))?;
        // The connection's driver, ended with the stream that reads its body.
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| unavailable(format!("events request: {e}")))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| unavailable(format!("events request: {e}")))?;
        Ok::<_, DockerError>((answer, driver))
    };
    let (answer, driver) = tokio::time::timeout(timeout, head)
        .await
        .map_err(|_| DockerError::Timeout(timeout))??;
    let status = answer.status();
    if !status.is_success() {
        let message = tokio::time::timeout(timeout, error_message(answer.into_body()))
            .await
            .unwrap_or_else(|_| "no message".into());
        return Err(DockerError::Daemon {
            status: status.as_u16(),
            message,
        });
    }
    Ok(EventStream {
        body: answer.into_body(),
        buf: BytesMut::new(),
        lines: EventLines::new(MAX_LINE),
        endpoint: endpoint.into(),
        _driver: driver,
    })
}

/// Connects to the Engine as `transport` says; returns the stream and the `Host` to name.
async fn connect(transport: &DockerTransport) -> Result<(Box<dyn Io>, String), String> {
    match transport {
        DockerTransport::Unix { endpoint } => {
            let path = endpoint.trim_start_matches("unix://");
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| e.to_string())?;
            Ok((Box::new(s), "docker".into()))
        }
        DockerTransport::Plain { endpoint } => {
            let addr = host_port(endpoint);
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            Ok((Box::new(s), addr.to_string()))
        }
        DockerTransport::Tls {
            endpoint,
            ca,
            cert,
            key,
        } => {
            let addr = host_port(endpoint);
            let host = addr
                .rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{host}: {e}"))?;
            let config = tls_config(ca, cert, key)?;
            let s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let s = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, s)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok((Box::new(s), addr.to_string()))
        }
    }
}

/// `host:port` of `tcp://host:port` (a trailing `/` allowed, as the config accepts it).
fn host_port(endpoint: &str) -> &str {
    endpoint
        .trim_start_matches("tcp://")
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
}

/// The client side of the Engine's TLS: its certificate verified against `ca`, ours presented, as
/// bollard's `ssl` transport does. Each failure names its file.
fn tls_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &std::path::Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| bad(ca, &e))? {
        roots
            .add(c.map_err(|e| bad(ca, &e))?)
            .map_err(|e| bad(ca, &e))?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| bad(key, &e))
}

/// The Engine's message in an error answer (`{"message": "..."}`), else its body as text.
async fn error_message(mut body: Incoming) -> String {
    let mut got = Vec::new();
    while got.len() < MAX_ERROR_BODY {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    got.extend_from_slice(&d);
                }
            }
            _ => break,
        }
    }
    got.truncate(MAX_ERROR_BODY);
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_slice::<Message>(&got)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&got).into_owned())
}

/// The events of one answer's body.
struct EventStream {
    body: Incoming,
    buf: BytesMut,
    lines: EventLines,
    endpoint: Arc<str>,
    _driver: AbortOnDropHandle<()>,
}

impl EventStream {
    /// The next event among the whole lines read; logs and skips the lines that are none.
    fn next_event(&mut self) -> Option<super::ContainerEvent> {
        while let Ok(Some(line)) = self.lines.decode(&mut self.buf) {
            match line {
                Line::Text(text) if text.trim().is_empty() => {}
                Line::Text(text) => match serde_json::from_str::<EventMessage>(&text) {
                    Ok(m) => return Some(super::client::container_event(m)),
                    Err(e) => {
                        tracing::error!(endpoint = %self.endpoint, error = %e, "Docker event line is not an event: skipped")
                    }
                },
                Line::TooLong => {
                    tracing::error!(endpoint = %self.endpoint, max_bytes = MAX_LINE, "Docker event line longer than the maximum: discarded up to its newline")
                }
                Line::NotText => {
                    tracing::error!(endpoint = %self.endpoint, "Docker event line is not UTF-8: skipped")
                }
            }
        }
        None
    }
}

impl Stream for EventStream {
    type Item = Result<super::ContainerEvent, DockerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(event) = this.next_event() {
                return Poll::Ready(Some(Ok(event)));
            }
            let frame = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            this.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    return Poll::Ready(Some(Err(DockerError::Unavailable {
                        endpoint: this.endpoint.to_string(),
                        reason: format!("the event stream broke: {e}"),
                    })))
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line without end, fed in small reads as a socket gives it: the codec never holds more
    /// than the maximum and a read (it looks at each byte once), says once that the line was too
    /// long, and the line after it comes whole.
    #[test]
    fn an_endless_line_is_dropped_and_the_next_line_read() {
        let max = 1024;
        let mut lines = EventLines::new(max);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let read = [b'a'; 100];
        for _ in 0..1000 {
            buf.extend_from_slice(&read);
            while let Some(l) = lines.decode(&mut buf).unwrap() {
                got.push(l);
            }
            assert!(buf.len() <= max + read.len(), "held {} bytes", buf.len());
        }
        buf.extend_from_slice(b"aaa\n{\"Action\":\"die\"}\n");
        while let Some(l) = lines.decode(&mut buf).unwrap() {
            got.push(l);
        }
        assert_eq!(
            got,
            [Line::TooLong, Line::Text("{\"Action\":\"die\"}".into())]
        );
    }

    #[test]
    fn a_line_not_utf8_is_skipped_whole() {
        let mut lines = EventLines::new(64);
        let mut buf = BytesMut::from(&b"\xff\xfe\nok\n"[..]);
        assert_eq!(lines.decode(&mut buf).unwrap(), Some(Line::NotText));
        assert_eq!(
            lines.decode(&mut buf).unwrap(),
            Some(Line::Text("ok".into()))
        );
    }

    #[test]
    fn the_query_is_url_encoded() {
        let mut f = HashMap::new();
        f.insert("label".to_string(), vec!["a=b c".to_string()]);
        assert_eq!(
            query(12, &f),
            "since=12&filters=%7B%22label%22%3A%5B%22a%3Db%20c%22%5D%7D"
        );
    }
}
