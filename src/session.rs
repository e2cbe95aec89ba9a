//! One client connection's life: read a PROXY header (`accept_proxy`), admit the client (allow and
//! deny lists, per-source limits), select a backend below its cap (or wait in the queue), connect
//! (retrying elsewhere), send a PROXY header (`proxy_protocol`), relay, and account: count how it
//! ended and write its routing line. Every accepted connection ends in [`account`], refused or
//! relayed, so the counters and the log always agree.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::admission::{GateSlot, QueuePlace, Refusal};
use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::proxy_protocol::{self, Header};
use crate::relay::{self, LiveCounters};
use crate::routelog::{self, Ending, Route};
use crate::service::Service;
use crate::util::lock;

/// Counts the service's open client connections for `max_connections` (and the top-level cap) and
/// keeps their start time; released on drop.
pub(crate) struct ClientSlot {
    service: Arc<Service>,
    id: u64,
    _gate: GateSlot,
}

impl ClientSlot {
    /// Takes a slot, or says which cap is reached.
    pub(crate) fn take(
        service: &Arc<Service>,
        gate: Option<GateSlot>,
    ) -> Result<ClientSlot, Outcome> {
        let Some(gate) = gate else {
            return Err(Outcome::GlobalMaxConnections);
        };
        let prev = service.stats.active.fetch_add(1, Relaxed);
        if prev >= service.max_connections {
            service.stats.active.fetch_sub(1, Relaxed);
            return Err(Outcome::MaxConnections);
        }
        let id = service.stats.sessions.enter();
        Ok(ClientSlot {
            service: service.clone(),
            id,
            _gate: gate,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.service.stats.active.fetch_sub(1, Relaxed);
        self.service.stats.sessions.leave(self.id);
    }
}

/// A backend connection counted against its backend's cap; when the service has a queue, its end
/// wakes the connections waiting there.
struct BackendSlot {
    active: Option<ActiveGuard>,
    service: Option<Arc<Service>>,
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        self.active.take();
        if let Some(s) = &self.service {
            s.stats.queue.freed.notify_waiters();
        }
    }
}

/// A connected backend: the stream, the slot that counts it as active, and the signal that cuts it.
struct Connected {
    backend: Arc<Backend>,
    stream: TcpStream,
    _active: BackendSlot,
    cut: Arc<CutSignal>,
}

/// Serves one accepted client to completion. Never panics on network errors; every path ends in
/// [`account`].
pub(crate) async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    deadline: CancellationToken,
) {
    let _slot = slot;
    // TCP_NODELAY is inherited from the listening socket (listener::bind).
    let mut route = Route::new(service.name.clone(), service.policy.as_str(), peer);

    // The address the client reached, for a header sent on: the one a header in names, else ours.
    let mut reached = None;
    if let Some(accept) = &service.accept_proxy {
        let header = if accept.from.iter().any(|c| c.contains(peer.ip())) {
            tokio::select! {
                h = proxy_protocol::read(&mut client, accept.timeout.0) => h.map_err(|e| e.to_string()),
                () = deadline.cancelled() => return account(&service, &route, refused_ending(Outcome::DrainDeadline)),
            }
        } else {
            Err("a connection from outside accept_proxy.from".to_string())
        };
        match header {
            Ok(Header::Proxy { client: c, dst }) => {
                route.via = Some(peer);
                route.client = c;
                reached = Some(dst);
            }
            // The balancer's own health check (or an unknown protocol): the real endpoints stand.
            Ok(Header::Local) => route.via = Some(peer),
            Err(why) => {
                if let Some(suppressed) = lock(&service.stats.proxy_warnings).allow() {
                    tracing::warn!(service = %service.name, peer = %peer, error = %why, suppressed, "PROXY header refused; connection closed");
                }
                // Nothing of it was forwarded: no backend was contacted.
                return account(&service, &route, refused_ending(Outcome::ProxyHeader));
            }
        }
    }
    let origin = route.client;
    let _source = match service.stats.sources.admit(
        origin.ip(),
        &service.limits,
        service.max_connections,
        Instant::now(),
    ) {
        Ok(s) => s,
        Err(Refusal::Denied) => return account(&service, &route, refused_ending(Outcome::Denied)),
        Err(Refusal::SourceLimit) => {
            return account(&service, &route, refused_ending(Outcome::SourceLimit))
        }
    };
    let header = service.proxy_protocol.map(|v| {
        let dst = reached.or_else(|| client.local_addr().ok()).unwrap_or(peer);
        proxy_protocol::encode(v, origin, dst)
    });

    let connected = tokio::select! {
        c = connect(&service, origin, &mut route, header.as_deref()) => c,
        () = deadline.cancelled() => Err(Outcome::DrainDeadline),
    };
    let c = match connected {
        Ok(c) => c,
        Err(refused) => {
            // Dropping `client` closes it at once.
            return account(&service, &route, refused_ending(refused));
        }
    };
    let _ = c.stream.set_nodelay(true);
    // Cut at the drain deadline, or when the backend's sessions are closed (health, discovery).
    let cut = async {
        tokio::select! {
            () = deadline.cancelled() => Outcome::DrainDeadline,
            end = c.cut.cut() => end,
        }
    };
    let live = LiveCounters {
        up: &c.backend.stats.bytes_up,
        down: &c.backend.stats.bytes_down,
    };
    let relayed = relay::relay(&client, &c.stream, &service.relay, cut, live).await;
    // Counted and logged before the close, so whoever sees the close (a client, a test on another
    // thread) finds the connection in the totals.
    let stats = &service.stats;
    stats.bytes_up.fetch_add(relayed.bytes_up, Relaxed);
    stats.bytes_down.fetch_add(relayed.bytes_down, Relaxed);
    if relayed.spliced {
        stats.spliced.fetch_add(1, Relaxed);
    }
    if relayed.uring {
        stats.uring.fetch_add(1, Relaxed);
    }
    let ending = Ending {
        bytes_up: relayed.bytes_up,
        bytes_down: relayed.bytes_down,
        end: relayed.end,
    };
    account(&service, &route, ending);
    // Close both now (the relay may have left a FIN, or an armed reset, to this close).
    drop(c);
    drop(client);
}

/// Refuses a client because a connection cap is reached (the caller closes it).
pub(crate) fn refuse_over_limit(service: &Service, peer: SocketAddr, end: Outcome) {
    let route = Route::new(service.name.clone(), service.policy.as_str(), peer);
    account(service, &route, refused_ending(end));
}

fn refused_ending(end: Outcome) -> Ending {
    Ending {
        bytes_up: 0,
        bytes_down: 0,
        end,
    }
}

/// The end of every client connection: counts its outcome and writes its routing line.
fn account(service: &Service, route: &Route, ending: Ending) {
    service.stats.count(ending.end);
    routelog::emit(route, ending);
}

/// Picks and connects, retrying on a backend not yet tried, up to `connect_attempts`, then sends the
/// PROXY `header` if any. Nothing of the client's has been forwarded yet, so a retry can never
/// duplicate data. A backend at its `max_connections` is skipped without an attempt; when every one
/// is, the connection waits in the queue (if the service has one) for one to free up.
async fn connect(
    service: &Arc<Service>,
    client: SocketAddr,
    route: &mut Route,
    header: Option<&[u8]>,
) -> Result<Connected, Outcome> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut full = 0usize;
    let mut queued: Option<(QueuePlace, tokio::time::Instant)> = None;
    let connect_start = Instant::now();
    loop {
        // With a queue: armed before looking, so a slot freed between the look and the wait is not
        // missed. Without one, no waiter is registered (it takes the Notify's lock).
        let freed = service
            .queue
            .is_some()
            .then(|| service.stats.queue.freed.notified());
        tokio::pin!(freed);
        if let Some(f) = freed.as_mut().as_pin_mut() {
            f.enable();
        }
        let picked = service.pool.snapshot().pick(client, &tried).cloned();
        if route.attempts == 0 && full == 0 {
            service.note_selection(picked.is_some());
        }
        let Some(backend) = picked else {
            if full == 0 {
                return Err(if route.attempts == 0 {
                    Outcome::NoBackend
                } else {
                    Outcome::ConnectFailed
                });
            }
            // Every backend left is at its cap.
            let (Some(q), Some(freed)) = (service.queue, freed.as_mut().as_pin_mut()) else {
                return Err(Outcome::BackendsFull);
            };
            if queued.is_none() {
                let place = service
                    .stats
                    .queue
                    .join(q.max)
                    .ok_or(Outcome::BackendsFull)?;
                queued = Some((place, tokio::time::Instant::now() + q.timeout.0));
            }
            let until = queued
                .as_ref()
                .map(|(_, t)| *t)
                .unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(until) => return Err(Outcome::BackendsFull),
            }
            // Look at the full ones again (the ones that failed a connect stay excluded).
            tried.truncate(tried.len() - full);
            full = 0;
            continue;
        };
        let cap = service.caps.cap_of(&backend);
        // Counted from the start of the connect, for least-connections.
        let Some(active) = ActiveGuard::within(backend.clone(), cap) else {
            tried.push(backend.addr);
            full += 1;
            continue;
        };
        let active = BackendSlot {
            active: Some(active),
            service: (cap.is_some() && service.queue.is_some()).then(|| service.clone()),
        };
        // The full ones are kept at the end of `tried`, after the ones that failed.
        let failed_upto = tried.len() - full;
        route.attempts += 1;
        route.backend = Some(backend.addr);
        // Taken before connecting, so a cut that happens meanwhile still reaches this session.
        let cut = backend.cut_signal();
        let attempt = Instant::now();
        match tokio::time::timeout(service.connect_timeout, TcpStream::connect(backend.addr)).await
        {
            Ok(Ok(mut stream)) => {
                backend.stats.connect.observe(attempt.elapsed());
                service.pool.connect_succeeded(&backend);
                let sent = match header {
                    None => Ok(()),
                    Some(h) => {
                        match tokio::time::timeout(service.connect_timeout, stream.write_all(h))
                            .await
                        {
                            Ok(r) => r,
                            Err(_) => Err(io::ErrorKind::TimedOut.into()),
                        }
                    }
                };
                match sent {
                    Ok(()) => {
                        route.connect_ms = Some(connect_start.elapsed().as_secs_f64() * 1e3);
                        route.backend_name = backend.name();
                        return Ok(Connected {
                            backend,
                            stream,
                            _active: active,
                            cut,
                        });
                    }
                    // Connected but the header did not go: try elsewhere, without ejecting it.
                    Err(e) => {
                        tracing::debug!(service = %service.name, backend = %backend.addr, error = %e, "sending the PROXY header failed")
                    }
                }
            }
            Ok(Err(e)) if is_local_exhaustion(&e) => {
                // Our own descriptors or ports ran out: not the backend's fault, so no ejection.
                tracing::debug!(service = %service.name, backend = %backend.addr, error = %e, "connect failed locally");
            }
            result => {
                let why = match result {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                tracing::debug!(service = %service.name, backend = %backend.addr, error = %why, "connect failed");
                service.pool.connect_failed(&backend);
            }
        }
        drop(active);
        if route.attempts >= service.connect_attempts {
            return Err(Outcome::ConnectFailed);
        }
        tried.insert(failed_upto, backend.addr);
    }
}

fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}
