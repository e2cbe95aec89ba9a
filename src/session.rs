//! One client connection's life: select a backend, connect (retrying elsewhere), relay, and account:
//! count how it ended and write its routing line. Every accepted connection ends in [`account`],
//! refused or relayed, so the counters and the log always agree.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;
use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::relay::{self, LiveCounters};
use crate::routelog::{self, Ending, Route};
use crate::service::Service;

/// Counts the service's open client connections for `max_connections` and keeps their start time;
/// released on drop.
pub(crate) struct ClientSlot(Arc<Service>, u64);

impl ClientSlot {
    /// Takes a slot, or `None` when the service is full.
    pub(crate) fn take(service: &Arc<Service>) -> Option<ClientSlot> {
        let prev = service.stats.active.fetch_add(1, Relaxed);
        if prev >= service.max_connections {
            service.stats.active.fetch_sub(1, Relaxed);
            return None;
        }
        let id = service.stats.sessions.enter();
        Some(ClientSlot(service.clone(), id))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
        self.0.stats.sessions.leave(self.1);
    }
}

/// A connected backend: the stream, the guard that counts it as active, and the signal that cuts it.
struct Connected {
    backend: Arc<Backend>,
    stream: TcpStream,
    _active: ActiveGuard,
    cut: Arc<CutSignal>,
}

/// Serves one accepted client to completion. Never panics on network errors; every path ends in
/// [`account`].
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    deadline: CancellationToken,
) {
    let _slot = slot;
    // TCP_NODELAY is inherited from the listening socket (listener::bind).
    let mut route = Route::new(service.name.clone(), service.policy.as_str(), peer);

    let connected = tokio::select! {
        c = connect(&service, peer, &mut route) => c,
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

/// Refuses a client because the service already has `max_connections` open (the caller closes it).
pub(crate) fn refuse_over_limit(service: &Service, peer: SocketAddr) {
    let route = Route::new(service.name.clone(), service.policy.as_str(), peer);
    account(service, &route, refused_ending(Outcome::MaxConnections));
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

/// Picks and connects, retrying on a backend not yet tried, up to `connect_attempts`. Nothing of the
/// client's has been forwarded yet, so a retry can never duplicate data.
async fn connect(
    service: &Arc<Service>,
    peer: SocketAddr,
    route: &mut Route,
) -> Result<Connected, Outcome> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let connect_start = Instant::now();
    loop {
        let picked = service.pool.snapshot().pick(peer, &tried).cloned();
        if route.attempts == 0 {
            service.note_selection(picked.is_some());
        }
        let Some(backend) = picked else {
            return Err(if route.attempts == 0 {
                Outcome::NoBackend
            } else {
                Outcome::ConnectFailed
            });
        };
        route.attempts += 1;
        route.backend = Some(backend.addr);
        // Counted from the start of the connect, for least-connections.
        let active = ActiveGuard::new(backend.clone());
        // Taken before connecting, so a cut that happens meanwhile still reaches this session.
        let cut = backend.cut_signal();
        let attempt = Instant::now();
        match tokio::time::timeout(service.connect_timeout, TcpStream::connect(backend.addr)).await
        {
            Ok(Ok(stream)) => {
                backend.stats.connect.observe(attempt.elapsed());
                service.pool.connect_succeeded(&backend);
                route.connect_ms = Some(connect_start.elapsed().as_secs_f64() * 1e3);
                route.backend_name = backend.name();
                return Ok(Connected {
                    backend,
                    stream,
                    _active: active,
                    cut,
                });
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
        tried.push(backend.addr);
    }
}

fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}
