//! Listening sockets and the accept loop.
//!
//! The accept loop never gives up: a failed accept is logged (at most once a second, with a count of
//! what was suppressed) and retried. Running out of descriptors or memory backs off exponentially up to
//! a cap instead of spinning on a listener that stays readable; a per-connection error (the client reset
//! before we accepted) is retried at once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::accesslog::{self, Ending, Record};
use crate::admission::Gate;
use crate::outcome::Outcome;
use crate::route::Routes;
use crate::session::{self, ClientSlot, Leaving};
use crate::util::{accept_failed_one_client, RateLimited};

/// Accept queue depth; the kernel caps it at net.core.somaxconn. A burst beyond the queue makes the
/// kernel drop handshakes, which clients see as multi-second stalls.
const BACKLOG: i32 = 4096;
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_CAP: Duration = Duration::from_millis(500);

/// A listener could not be bound. Its message carries the cause, which is therefore not also its
/// `source` (an error reporter would print it twice).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for service {service:?}: {error}")]
pub struct BindError {
    pub service: String,
    pub addr: SocketAddr,
    pub error: io::Error,
}

/// Binds `addr` with SO_REUSEADDR, so a restart succeeds while old connections sit in TIME_WAIT, and
/// with TCP_NODELAY, which accepted sockets inherit: a proxy must not add Nagle delay to small writes.
/// An IPv6 address is bound IPv6-only (as nginx does), so `[::]:P` and `0.0.0.0:P` can both be bound
/// and a `listen` list says which families it takes; an IPv4-mapped one (`[::ffff:a.b.c.d]`) cannot
/// be, and takes IPv4.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let SocketAddr::V6(v6) = addr {
        if v6.ip().to_ipv4_mapped().is_none() {
            socket.set_only_v6(true)?;
        }
    }
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt per connection saved.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The listening socket for `addr`: one given to this process (by the process it replaced, or by
/// systemd) bound exactly there, or for a port-0 address named any of `names`
/// (`sockets::choose`), else a new one ([`bind`]). A given socket gets what `bind` would have set
/// on the accepted connections' behalf. An upgrade's socket at another address on this port is an
/// error (`sockets::ListenChanged`, "listen changed: restart needed").
pub(crate) fn open(addr: SocketAddr, names: &[&str]) -> io::Result<std::net::TcpListener> {
    match crate::sockets::take(addr, names).map_err(io::Error::other)? {
        Some(l) => {
            socket2::SockRef::from(&l).set_tcp_nodelay(true)?;
            l.set_nonblocking(true)?;
            let local = l.local_addr()?;
            tracing::info!(listen = %local, configured = %addr, "taking over a listening socket given to this process");
            Ok(l)
        }
        None => bind(addr),
    }
}

/// Accepts until `stop` is cancelled, then drops the listener (new connections are refused from then).
/// Each connection goes to the address's one service, or, on a shared address, to the session that
/// reads its route.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    current: Arc<ArcSwap<Routes>>,
    gate: Arc<Gate>,
    tracker: TaskTracker,
    stop: CancellationToken,
    leaving: Arc<Leaving>,
) {
    let mut backoff = BACKOFF_START;
    let mut errors = RateLimited::new(Duration::from_secs(1));
    let local: Arc<str> = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = BACKOFF_START;
                // The routes as they are now (a reload swaps them); the connection keeps these.
                let routes = current.load_full();
                dispatch(client, peer, routes, &local, &gate, &tracker, &leaving);
            }
            Err(e) if e.raw_os_error().is_some_and(accept_failed_one_client) => continue,
            Err(e) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::error!(
                        listen = %local,
                        error = %e,
                        backoff_ms = backoff.as_millis() as u64,
                        suppressed,
                        "accept failed; backing off"
                    );
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
            }
        }
    }
}

/// Serves a connection another engine accepted on an address that is now these workers' (a ring
/// worker's accept completed after a reload moved the address off the ring): as if this worker's
/// accept loop had taken it, with the routes the reload left. Runs on a tokio worker; `_tracked`
/// keeps a drain waiting for the client from its hand-off until its session is tracked itself.
pub(crate) async fn hand_in(
    client: std::net::TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    local: Arc<str>,
    gate: Arc<Gate>,
    (tracker, _tracked): (TaskTracker, TaskTrackerToken),
    leaving: Arc<Leaving>,
) {
    let client = client
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(client));
    match client {
        Ok(client) => dispatch(client, peer, routes, &local, &gate, &tracker, &leaving),
        Err(e) => {
            tracing::warn!(listen = %local, client = %peer, error = %e, "cannot take a connection the ring accepted; closing it")
        }
    }
}

/// Hands an accepted connection to its session, in a span of its own: every line about it names
/// it. Its backend (and, with accept_proxy, its real client; on a shared address, its service) are
/// recorded in the span as they become known.
fn dispatch(
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    local: &Arc<str>,
    gate: &Arc<Gate>,
    tracker: &TaskTracker,
    leaving: &Arc<Leaving>,
) {
    // The deny list before any byte is read (behind a PROXY header the session asks again, for
    // the client the header names).
    let denied = gate.deny.refuses(peer.ip(), tokio::time::Instant::now());
    if let Some(current) = routes.table.only() {
        // The address's one service: no route to read.
        let service = current.load_full();
        service.stats.accepted();
        let span = session::span(Some(&service.name), peer, local);
        if denied {
            span.in_scope(|| session::refuse_over_limit(&service, peer, Outcome::Denied));
            return;
        }
        let at = session::Reached {
            client: peer,
            listen: local,
            engine: service.relay.mode.as_str(),
        };
        match ClientSlot::take(&service, gate.enter(), at) {
            Ok(slot) => {
                let serve =
                    session::serve(client, peer, service.clone(), slot, leaving.clone(), span);
                tracker.spawn(serve);
            }
            Err(end) => span.in_scope(|| session::refuse_over_limit(&service, peer, end)),
        }
        return;
    }
    let span = session::span(None, peer, local);
    // Until its route is known a connection counts against no service's cap: `max_pending` bounds
    // how many may wait for it on this address, so a flood of silent clients cannot pile up here.
    // A denied peer takes neither a place nor a slot.
    let waiting = (!denied)
        .then(|| routes.unrouted.wait(routes.max_pending))
        .flatten();
    let entered = waiting.map(|w| (w, gate.enter()));
    let end = match entered {
        None if denied => Outcome::Denied,
        Some((waiting, Some(slot))) => {
            let serve = session::serve_routed(
                client,
                peer,
                local.clone(),
                routes,
                slot,
                waiting,
                leaving.clone(),
                span,
            );
            tracker.spawn(serve);
            return;
        }
        Some((_, None)) => Outcome::GlobalMaxConnections,
        None => Outcome::PendingFull,
    };
    routes.unrouted.count(end);
    let record = Record::new(Arc::from(""), "", peer);
    let ending = Ending {
        bytes_up: 0,
        bytes_down: 0,
        end,
    };
    span.in_scope(|| accesslog::emit(&record, ending));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let l = TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(
            s.nodelay().unwrap(),
            "the session relies on the listener's TCP_NODELAY"
        );
    }

    #[test]
    fn no_other_socket_can_share_the_port() {
        // The workers share one socket by descriptor, so SO_REUSEPORT is never set: another process
        // (another sluicegate started by mistake) must fail to bind instead of taking a share.
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let other =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        other.set_reuse_address(true).unwrap();
        other.set_reuse_port(true).unwrap();
        let err = other
            .bind(&addr.into())
            .expect_err("the port is ours alone");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }
}
