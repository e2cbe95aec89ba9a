//! One client connection's life: on a shared address, its route (the PROXY header, then the TLS
//! ClientHello read for its server name and protocols: `entry.rs`); then read a PROXY header
//! (`accept_proxy`), admit the client (allow and deny lists, per-source limits), terminate its TLS
//! (`tls`), select a backend below its cap (or wait in the queue), connect (retrying elsewhere;
//! `connect.rs`), send a PROXY header (`proxy_protocol`), the TLS handshake with the backend
//! (`backend_tls`) and the bytes read for the route, relay, and account: count how it ended and
//! write its routing line. Every accepted connection ends in [`account`] (or, when no service took
//! it, in its address's unrouted count), refused or relayed, so the counters and the log always
//! agree.

mod connect;
mod entry;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{GateSlot, Refusal, SourceSlot};
use crate::outcome::Outcome;
use crate::proxy_protocol;
use crate::relay::{self, LiveCounters, Relayed};
use crate::route::Routes;
use crate::routelog::{self, Ending, Record};
use crate::service::{Service, TlsResult};
use crate::tls::{HandshakeError, Prefixed, ServerStream};
use connect::{connect, BackendStream, Connected, Outbound};

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
        let id = service.occupancy.sessions.enter();
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
        self.service.occupancy.sessions.leave(self.id);
    }
}

/// What a connection brings to its service from before the service took it (on a shared address:
/// the PROXY header and the first bytes read for the route).
#[derive(Default)]
struct Entry {
    /// The PROXY header was read for the route already: what it said the client reached.
    proxied: Option<Option<SocketAddr>>,
    /// The bytes read for the route, forwarded first.
    first: Vec<u8>,
    /// The first protocol (ALPN) the client's hello offered: a PROXY v2 header of a service passing
    /// TLS through says it (a terminating one says what was agreed).
    offered_alpn: Option<Vec<u8>>,
}

/// Serves one accepted client of a service alone on its address to completion. Never panics on
/// network errors; every path ends in [`account`].
///
/// Everything before the relay runs in the connection's `span` (a few polls). The relay's polls do
/// not enter it: an enter and an exit on every poll would cost every keep-alive request; what the
/// relay has to say (how it broke) is logged in the span when it ends.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    deadline: CancellationToken,
    span: tracing::Span,
) {
    let record = Record::new(service.name.clone(), service.policy.as_str(), peer);
    serve_taken(
        client,
        peer,
        service,
        slot,
        record,
        Entry::default(),
        deadline,
        span,
    )
    .await
}

/// Serves one accepted client of a shared address: reads what chooses its route (the PROXY header,
/// then the ClientHello), then serves it as its service's. A client no service takes is counted in
/// the address's unrouted connections and logged without a service.
pub(crate) async fn serve_routed(
    mut client: TcpStream,
    peer: SocketAddr,
    routes: Arc<Routes>,
    gate: GateSlot,
    deadline: CancellationToken,
    span: tracing::Span,
) {
    let mut record = Record::new(Arc::from(""), "", peer);
    let routed = route(&mut client, peer, &routes, &mut record, &deadline)
        .instrument(span.clone())
        .await;
    let (service, entry) = match routed {
        Ok(r) => r,
        Err(end) => {
            routes.unrouted.count(end);
            return span.in_scope(|| routelog::emit(&record, refused_ending(end)));
        }
    };
    span.record("service", tracing::field::display(&service.name));
    record.service = service.name.clone();
    record.policy = service.policy.as_str();
    service.stats.accepted.fetch_add(1, Relaxed);
    match ClientSlot::take(&service, Some(gate)) {
        Ok(slot) => serve_taken(client, peer, service, slot, record, entry, deadline, span).await,
        Err(end) => span.in_scope(|| account(&service, &record, refused_ending(end))),
    }
}

/// Reads the PROXY header (the address's `accept_proxy`) and the ClientHello, and chooses the
/// service: `Err` how the connection ends when none takes it.
async fn route(
    client: &mut TcpStream,
    peer: SocketAddr,
    routes: &Routes,
    record: &mut Record,
    deadline: &CancellationToken,
) -> Result<(Arc<Service>, Entry), Outcome> {
    let warnings = &routes.unrouted.warnings;
    let reached = entry::accept_header(
        client,
        peer,
        routes.accept_proxy.as_ref(),
        warnings,
        record,
        deadline,
    )
    .await?;
    let first = entry::read_hello(client, routes.hello_timeout, warnings, deadline).await?;
    let (sni, alpn) = match &first.hello {
        Some(h) => (h.sni.as_deref(), h.alpn.as_slice()),
        None => (None, &[][..]),
    };
    record.sni = sni.map(str::to_string);
    let offered_alpn = alpn.first().cloned();
    record.alpn = (!alpn.is_empty()).then(|| {
        alpn.iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
            .join(",")
    });
    let chosen = routes.table.choose(sni, alpn).ok_or(Outcome::NoRoute)?;
    record.route = Some(chosen.why.as_str());
    let service = chosen.target.load_full();
    Ok((
        service,
        Entry {
            proxied: Some(reached),
            first: first.bytes,
            offered_alpn,
        },
    ))
}

/// The client's side of a connection: its socket, or TLS terminated over it (`tls`).
enum ClientStream {
    Plain(TcpStream),
    Tls(Box<ServerStream>),
}

/// An admitted, connected client: both sides, and its place in the source table (held until it
/// ends).
struct Admitted {
    client: ClientStream,
    backend: Connected,
    _source: Option<SourceSlot>,
    /// Bytes of the client's sent to the backend before the relay (the hello, passed through).
    forwarded: u64,
}

/// Serves a client its service has taken (`slot`), to its end.
#[allow(clippy::too_many_arguments)]
async fn serve_taken(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    mut record: Record,
    entry: Entry,
    deadline: CancellationToken,
    span: tracing::Span,
) {
    let _slot = slot;
    // TCP_NODELAY is inherited from the listening socket (listener::bind).
    let admitted = admit_and_connect(client, peer, &service, &mut record, entry, &deadline)
        .instrument(span.clone())
        .await;
    match admitted {
        Ok(a) => relay_and_account(a, &service, &record, &deadline, &span).await,
        // Dropping the client closes it at once; nothing was relayed.
        Err(refused) => span.in_scope(|| account(&service, &record, refused_ending(refused))),
    }
}

/// Reads a PROXY header (`accept_proxy`, unless the route did), admits the client (access lists,
/// per-source limits), terminates its TLS (`tls`) and connects it to a backend; or says how it was
/// refused.
async fn admit_and_connect(
    mut client: TcpStream,
    peer: SocketAddr,
    service: &Arc<Service>,
    record: &mut Record,
    entry: Entry,
    deadline: &CancellationToken,
) -> Result<Admitted, Outcome> {
    // The address the client reached, for a header sent on: the one a header in names, else ours.
    let reached = match entry.proxied {
        Some(reached) => reached,
        None => {
            let warnings = &service.occupancy.proxy_warnings;
            let accept = service.accept_proxy.as_ref();
            entry::accept_header(&mut client, peer, accept, warnings, record, deadline).await?
        }
    };
    let dst = reached.or_else(|| client.local_addr().ok()).unwrap_or(peer);
    let origin = record.client;
    let admitted = service.occupancy.sources.admit(
        origin.ip(),
        &service.limits,
        service.max_connections,
        Instant::now(),
    );
    let source = admitted.map_err(|r| match r {
        Refusal::Denied => Outcome::Denied,
        Refusal::SourceLimit => Outcome::SourceLimit,
    })?;
    let mut facts = proxy_protocol::Tls {
        authority: record.sni.clone(),
        alpn: entry.offered_alpn,
        ..Default::default()
    };
    let (client, forward) = match &service.tls.terminate {
        Some(_) => {
            let stream = Prefixed::new(entry.first, client);
            let tls = terminate(stream, service, record, &mut facts, deadline).await?;
            (ClientStream::Tls(Box::new(tls)), Vec::new())
        }
        None => (ClientStream::Plain(client), entry.first),
    };
    let header = service
        .proxy_protocol
        .map(|v| proxy_protocol::encode_with(v, origin, dst, &facts));
    let out = Outbound {
        header: header.as_deref(),
        forward: &forward,
        reached_port: Some(dst.port()),
    };
    let backend = tokio::select! {
        c = connect(service, origin, record, &out) => c,
        () = deadline.cancelled() => Err(Outcome::DrainDeadline),
    }?;
    Ok(Admitted {
        client,
        backend,
        _source: source,
        forwarded: forward.len() as u64,
    })
}

/// The server side of the client's TLS handshake: counted by result and timed, its facts in the
/// routing record and for a PROXY header sent on.
async fn terminate(
    stream: Prefixed<TcpStream>,
    service: &Service,
    record: &mut Record,
    facts: &mut proxy_protocol::Tls,
    deadline: &CancellationToken,
) -> Result<ServerStream, Outcome> {
    let Some(t) = &service.tls.terminate else {
        return Err(Outcome::TlsHandshake);
    };
    let started = Instant::now();
    let accepted = tokio::select! {
        a = t.accept(stream) => a,
        () = deadline.cancelled() => return Err(Outcome::DrainDeadline),
    };
    let (result, end, why) = match accepted {
        Ok((tls, hs)) => {
            service
                .stats
                .tls_handshake(TlsResult::Ok, started.elapsed());
            record.tls = Some(hs.version);
            record.sni = hs.sni.clone().or(record.sni.take());
            if let Some(p) = &hs.alpn {
                record.alpn = Some(String::from_utf8_lossy(p).into_owned());
            }
            *facts = proxy_protocol::Tls {
                version: Some(hs.version),
                client_cert: hs.client_cert,
                client_cn: hs.client_cn,
                authority: hs.sni,
                alpn: hs.alpn,
            };
            return Ok(tls);
        }
        Err(HandshakeError::ClientCert(why)) => {
            (TlsResult::ClientCert, Outcome::TlsClientCert, why)
        }
        Err(HandshakeError::Failed(why)) => (TlsResult::Failed, Outcome::TlsHandshake, why),
        Err(HandshakeError::Timeout) => (
            TlsResult::Timeout,
            Outcome::TlsHandshake,
            format!("not done within {:?}", t.handshake_timeout),
        ),
    };
    service.stats.tls_handshake(result, started.elapsed());
    tracing::debug!(error = %why, end = end.as_str(), "TLS handshake with the client failed");
    Err(end)
}

/// Relays a connected client until the relay ends (or the drain deadline, or its backend's sessions
/// are cut), then counts and logs it, before both sockets close: whoever sees the close (a client,
/// a test on another thread) finds the connection in the totals.
async fn relay_and_account(
    a: Admitted,
    service: &Service,
    record: &Record,
    deadline: &CancellationToken,
    span: &tracing::Span,
) {
    let Admitted {
        mut client,
        backend: mut c,
        _source,
        forwarded,
    } = a;
    let cut_signal = c.cut.clone();
    let cut = async {
        tokio::select! {
            () = deadline.cancelled() => Outcome::DrainDeadline,
            end = cut_signal.cut() => end,
        }
    };
    let stats = &c.backend.stats;
    let live = LiveCounters {
        up: &stats.bytes_up,
        down: &stats.bytes_down,
    };
    live.up.fetch_add(forwarded, Relaxed);
    let opts = &service.relay;
    let mut relayed: Relayed = match (&mut client, &mut c.stream) {
        (ClientStream::Plain(cl), BackendStream::Plain(b)) => {
            relay::relay(cl, b, opts, cut, live).await
        }
        (ClientStream::Plain(cl), BackendStream::Tls(b)) => {
            relay::relay_streams(cl, &mut **b, opts, cut, live).await
        }
        (ClientStream::Tls(cl), BackendStream::Plain(b)) => {
            relay::relay_streams(&mut **cl, b, opts, cut, live).await
        }
        (ClientStream::Tls(cl), BackendStream::Tls(b)) => {
            relay::relay_streams(&mut **cl, &mut **b, opts, cut, live).await
        }
    };
    relayed.bytes_up += forwarded;
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
    span.in_scope(|| {
        if let Some(e) = &relayed.broken {
            tracing::debug!(end = relayed.end.as_str(), error = %e, "relay broken");
        }
        account(service, record, ending);
    });
    // Close both now (the relay may have left a FIN, or an armed reset, to this close).
    drop(c);
    drop(client);
}

/// Refuses a client because a connection cap is reached (the caller closes it).
pub(crate) fn refuse_over_limit(service: &Service, peer: SocketAddr, end: Outcome) {
    let record = Record::new(service.name.clone(), service.policy.as_str(), peer);
    account(service, &record, refused_ending(end));
}

fn refused_ending(end: Outcome) -> Ending {
    Ending {
        bytes_up: 0,
        bytes_down: 0,
        end,
    }
}

/// The end of every client connection: counts its outcome and writes its routing line.
fn account(service: &Service, record: &Record, ending: Ending) {
    service.stats.count(ending.end);
    routelog::emit(record, ending);
}
