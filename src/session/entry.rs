//! What a connection says before a service takes it: the PROXY header from a balancer in front
//! (`accept_proxy`), and on a shared address the TLS ClientHello, read whole but not answered, whose
//! server name and protocols choose the route.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::accesslog::Record;
use crate::config::AcceptProxyConfig;
use crate::outcome::Outcome;
use crate::proxy_protocol::{self, Header};
use crate::tls::hello::{self, Parsed, MAX_HELLO};
use crate::tls::ClientHello;
use crate::util::{lock, RateLimited};

/// With `accept_proxy`: reads the PROXY header of a peer inside `from` and takes its client address
/// (see [`take_header`]); returns the address the client reached, if the header names it. A peer
/// outside `from`, a bad or late header: `Err(ProxyHeader)`; the drain deadline meanwhile:
/// `Err(DrainDeadline)`.
pub(super) async fn accept_header(
    client: &mut TcpStream,
    peer: SocketAddr,
    accept: Option<&AcceptProxyConfig>,
    warnings: &Mutex<RateLimited>,
    record: &mut Record,
    deadline: &CancellationToken,
) -> Result<Option<SocketAddr>, Outcome> {
    let Some(accept) = accept else {
        return Ok(None);
    };
    let header = if may_send_header(accept, peer) {
        tokio::select! {
            h = proxy_protocol::read(client, accept.timeout.0) => h.map_err(|e| e.to_string()),
            () = deadline.cancelled() => return Err(Outcome::DrainDeadline),
        }
    } else {
        Err(UNTRUSTED.to_string())
    };
    take_header(header, peer, warnings, record)
}

/// Why a header is not even read: the peer is not a balancer `accept_proxy` trusts.
pub(crate) const UNTRUSTED: &str = "a connection from outside accept_proxy.from";

/// Whether `peer` is inside `accept_proxy.from`: only those may name another client.
pub(crate) fn may_send_header(accept: &AcceptProxyConfig, peer: SocketAddr) -> bool {
    accept.from.iter().any(|c| c.contains(peer.ip()))
}

/// What a PROXY header from `peer` (or why there is none) means for its connection: a header's
/// client becomes the connection's (in the routing record and the current span, with `peer` as
/// `via`), and the address it reached is returned; a LOCAL header keeps the real endpoints. A bad,
/// late or untrusted one: `Err(ProxyHeader)`, said at most once a second (`warnings`). Shared by the
/// tokio sessions and the ring workers, which read the header each their own way.
pub(crate) fn take_header(
    header: Result<Header, String>,
    peer: SocketAddr,
    warnings: &Mutex<RateLimited>,
    record: &mut Record,
) -> Result<Option<SocketAddr>, Outcome> {
    match header {
        Ok(Header::Proxy { client: c, dst }) => {
            record.via = Some(peer);
            record.client = c;
            let span = tracing::Span::current();
            span.record("client", tracing::field::display(c));
            span.record("via", tracing::field::display(peer));
            Ok(Some(dst))
        }
        // The balancer's own health check (or an unknown protocol): the real endpoints stand.
        Ok(Header::Local) => {
            record.via = Some(peer);
            Ok(None)
        }
        Err(why) => {
            if let Some(suppressed) = lock(warnings).allow() {
                tracing::warn!(error = %why, suppressed, "PROXY header refused; connection closed");
            }
            Err(Outcome::ProxyHeader)
        }
    }
}

/// A client's first bytes, as read for its route: every byte read (the backend gets them all, from
/// the first) and the ClientHello they hold, if they are TLS.
pub(super) struct FirstBytes {
    pub(super) bytes: Vec<u8>,
    pub(super) hello: Option<ClientHello>,
}

/// Reads until the bytes hold a whole ClientHello (however many segments and records it came in),
/// are not TLS at all (another protocol: no hello), or the client closed or stayed silent for
/// `timeout` having sent nothing (no hello either). A hello that is malformed, larger than
/// [`MAX_HELLO`], cut short by the client or begun and not whole within `timeout`: `Err(TlsHello)`,
/// said at most once a second; the drain deadline: `Err(DrainDeadline)`.
pub(super) async fn read_hello(
    client: &mut TcpStream,
    timeout: Duration,
    warnings: &Mutex<RateLimited>,
    deadline: &CancellationToken,
) -> Result<FirstBytes, Outcome> {
    let refuse = |why: String| {
        if let Some(suppressed) = lock(warnings).allow() {
            tracing::warn!(error = %why, suppressed, "TLS ClientHello refused; connection closed");
        }
        Outcome::TlsHello
    };
    let mut bytes = Vec::with_capacity(1024);
    let read = async {
        loop {
            if bytes.len() >= MAX_HELLO {
                return Err(format!("no whole ClientHello in {MAX_HELLO} bytes"));
            }
            bytes.reserve(1024.min(MAX_HELLO - bytes.len()));
            let room = MAX_HELLO - bytes.len();
            let n = client
                .take(room as u64)
                .read_buf(&mut bytes)
                .await
                .map_err(|e| format!("reading the ClientHello: {e}"))?;
            match hello::parse(&bytes).map_err(|e| e.to_string())? {
                Parsed::NotTls => return Ok(None),
                Parsed::Hello { hello, .. } => return Ok(Some(hello)),
                Parsed::Incomplete if n == 0 && bytes.is_empty() => return Ok(None),
                Parsed::Incomplete if n == 0 => {
                    return Err(format!(
                        "closed after {} bytes of a ClientHello",
                        bytes.len()
                    ))
                }
                Parsed::Incomplete => {}
            }
        }
    };
    let read = tokio::select! {
        r = tokio::time::timeout(timeout, read) => r,
        () = deadline.cancelled() => return Err(Outcome::DrainDeadline),
    };
    let hello = match read {
        Ok(Ok(hello)) => hello,
        Ok(Err(why)) => return Err(refuse(why)),
        // Silent for the whole timeout: no hello at all, as from a client of a protocol where the
        // server speaks first (SMTP, SSH, MySQL). It goes where a client without a name goes.
        Err(_) if bytes.is_empty() => None,
        Err(_) => return Err(refuse(format!("no whole ClientHello within {timeout:?}"))),
    };
    Ok(FirstBytes { bytes, hello })
}
