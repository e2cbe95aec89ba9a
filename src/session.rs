//! One client connection's life: select a backend, connect (retrying elsewhere), relay, account, log.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::pool::{ActiveGuard, Backend, CutSignal};
use crate::relay::{self, End, LiveCounters, RelayOutcome};
use crate::routelog::{self, Route};
use crate::service::Service;

/// How a client's connection ended before any relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No ready backend to try.
    NoBackend,
    /// Every attempt failed.
    ConnectFailed,
    /// The service already had `max_connections` open.
    OverLimit,
    /// The drain deadline passed while connecting.
    DrainDeadline,
}

impl Refused {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refused::NoBackend => "no_backend",
            Refused::ConnectFailed => "connect_failed",
            Refused::OverLimit => "max_connections",
            Refused::DrainDeadline => "drain_deadline",
        }
    }
}

/// Counts the service's open client connections for `max_connections` and keeps their start time;
/// released on drop.
pub struct ClientSlot(Arc<Service>, u64);

impl ClientSlot {
    /// Takes a slot, or `None` when the service is full.
    pub fn take(service: &Arc<Service>) -> Option<ClientSlot> {
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

/// Serves one accepted client to completion. Never panics on network errors; every path logs one line.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    deadline: CancellationToken,
) {
    let started = Instant::now();
    let _slot = slot;
    // TCP_NODELAY is inherited from the listening socket (listener::bind).
    let mut route = Route::new(&service, peer);

    let connected = tokio::select! {
        c = connect(&service, peer, &mut route) => c,
        () = deadline.cancelled() => Err(Refused::DrainDeadline),
    };
    let (backend, stream, _active, signal) = match connected {
        Ok(c) => c,
        Err(refused) => {
            let counter = match refused {
                Refused::NoBackend => &service.stats.no_backend,
                Refused::ConnectFailed => &service.stats.connect_failed,
                Refused::OverLimit => &service.stats.over_limit,
                // Cut while connecting: counted with the relays the deadline cut.
                Refused::DrainDeadline => &service.stats.ends[End::DrainDeadline.index()],
            };
            counter.fetch_add(1, Relaxed);
            route.finish_refused(refused, started);
            routelog::emit(&route);
            return; // dropping `client` closes it at once
        }
    };
    let _ = stream.set_nodelay(true);
    // Cut at the drain deadline, or when the backend's sessions are closed (health, discovery).
    let cut = async {
        tokio::select! {
            () = deadline.cancelled() => End::DrainDeadline,
            end = signal.cut() => end,
        }
    };
    let live = LiveCounters {
        up: &backend.stats.bytes_up,
        down: &backend.stats.bytes_down,
    };
    let outcome: RelayOutcome = relay::relay(&client, &stream, &service.relay, cut, live).await;
    // Counted before the close, so whoever sees the close (a client, a test on another thread) finds
    // the connection in the totals.
    service.stats.bytes_up.fetch_add(outcome.bytes_up, Relaxed);
    service
        .stats
        .bytes_down
        .fetch_add(outcome.bytes_down, Relaxed);
    service.stats.count_end(outcome.end);
    if outcome.spliced {
        service.stats.spliced.fetch_add(1, Relaxed);
    }
    // Close both now (the relay may have left a FIN, or an armed reset, to this close).
    drop(stream);
    drop(client);
    route.finish(outcome, started);
    routelog::emit(&route);
}

/// Picks and connects, retrying on a backend not yet tried, up to `connect_attempts`. Nothing of the
/// client's has been forwarded yet, so a retry can never duplicate data.
async fn connect(
    service: &Arc<Service>,
    peer: SocketAddr,
    route: &mut Route,
) -> Result<(Arc<Backend>, TcpStream, ActiveGuard, Arc<CutSignal>), Refused> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let connect_start = Instant::now();
    loop {
        let picked = service.pool.snapshot().pick(peer, &tried).cloned();
        if route.attempts == 0 {
            service.note_selection(picked.is_some());
        }
        let Some(backend) = picked else {
            return Err(if route.attempts == 0 {
                Refused::NoBackend
            } else {
                Refused::ConnectFailed
            });
        };
        route.attempts += 1;
        route.backend = Some(backend.addr);
        // Counted from the start of the connect, for least-connections.
        let active = ActiveGuard::new(backend.clone());
        // Taken before connecting, so a cut that happens meanwhile still reaches this session.
        let signal = backend.cut_signal();
        let attempt = Instant::now();
        match tokio::time::timeout(service.connect_timeout, TcpStream::connect(backend.addr)).await
        {
            Ok(Ok(stream)) => {
                backend.stats.connect.observe(attempt.elapsed());
                service.pool.connect_succeeded(&backend);
                route.connect_ms = Some(connect_start.elapsed().as_secs_f64() * 1e3);
                return Ok((backend, stream, active, signal));
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
            return Err(Refused::ConnectFailed);
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
