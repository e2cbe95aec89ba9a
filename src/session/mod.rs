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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::accesslog::{self, Ending, Record};
use crate::admission::{DenyList, Gate, GateSlot, Refusal, SourceSlot};
use crate::connections::{self, Conn, Facts, How, Opened, Protocol, Registered};
use crate::outcome::Outcome;
use crate::pool::Backend;
use crate::proxy_protocol;
use crate::relay::Endpoint as _;
use crate::relay::{self, Relayed};
use crate::route::{Routes, Waiting};
use crate::service::{Service, TlsResult};
use crate::tls::{HandshakeError, Prefixed, ServerStream};
pub(crate) use connect::{carried_backend, Tried};
use connect::{connect, BackendStream, Connected, Outbound};
pub(crate) use entry::{may_send_header, take_header, UNTRUSTED};
use socket2::SockRef;

/// How sessions leave this process before they end: the drain's deadline cuts them; an upgrade
/// carries them into the new process (`carry`, then each relayed one is sent to `carried`). One per
/// process (per [`crate::Control`]), shared by every session.
#[derive(Debug, Default)]
pub(crate) struct Leaving {
    /// Cut every session still open (the drain deadline).
    pub(crate) deadline: CancellationToken,
    /// Stop every relay at a quiet point and send the connection to `carried`; a fresh one after
    /// an upgrade that failed, so that relays started then are not stopped for nothing.
    carry: std::sync::Mutex<CancellationToken>,
    /// Where carried connections go: set before `carry` fires, taken away once the upgrade no
    /// longer takes any (a relay that stops then goes on where it stopped).
    pub(crate) carried: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<Carried>>>,
}

impl Leaving {
    /// From now on every relay stops at a quiet point and its connection goes to `to`.
    pub(crate) fn carry_to(&self, to: tokio::sync::mpsc::UnboundedSender<Carried>) {
        *crate::util::lock(&self.carried) = Some(to);
        crate::util::lock(&self.carry).cancel();
    }

    /// What stops relays for an upgrade (a relay takes it as it starts).
    pub(crate) fn carry_signal(&self) -> CancellationToken {
        crate::util::lock(&self.carry).clone()
    }

    /// No more connections are carried (the receiver learns it when its channel closes).
    pub(crate) fn stop_carrying(&self) {
        crate::util::lock(&self.carried).take();
    }

    /// The upgrade failed: nothing is carried, and relays started from now on are not stopped
    /// (those stopped meanwhile go on where they stopped, as after any upgrade).
    pub(crate) fn carrying_failed(&self) {
        self.stop_carrying();
        *crate::util::lock(&self.carry) = CancellationToken::new();
    }
}

/// A connection stopped at a quiet point, to be relayed on by another process: its two sockets,
/// what its relay held, and what its routing line says so far.
#[derive(Debug)]
pub(crate) struct Carried {
    pub(crate) client: std::net::TcpStream,
    pub(crate) backend: std::net::TcpStream,
    pub(crate) held: relay::Quiesced,
    pub(crate) facts: CarriedFacts,
}

/// What a carried connection's routing line and counters need from the process it left.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CarriedFacts {
    pub(crate) service: String,
    pub(crate) client: SocketAddr,
    pub(crate) via: Option<SocketAddr>,
    pub(crate) backend: SocketAddr,
    pub(crate) backend_name: Option<String>,
    pub(crate) attempts: u32,
    pub(crate) connect_ms: Option<f64>,
    /// How long it had been open.
    pub(crate) age_ms: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<String>,
    pub(crate) route: Option<String>,
}

impl CarriedFacts {
    /// What `record` says of a connection that has moved these bytes so far (the client's, to
    /// `backend`), for the process it goes to.
    pub(crate) fn of(record: &Record, bytes_up: u64, bytes_down: u64, backend: SocketAddr) -> Self {
        CarriedFacts {
            service: record.service.to_string(),
            client: record.client,
            via: record.via,
            backend: record.backend.unwrap_or(backend),
            backend_name: record.backend_name.as_deref().cloned(),
            attempts: record.attempts,
            connect_ms: record.connect_ms,
            age_ms: record.started.elapsed().as_millis() as u64,
            bytes_up,
            bytes_down,
            sni: record.hello().sni.clone(),
            alpn: record.hello().alpn.clone(),
            route: record.hello().route.map(str::to_string),
        }
    }

    /// The routing record the connection goes on with, its start as long ago as it was accepted.
    pub(crate) fn record(&self, service: &Service) -> Record {
        let mut r = Record::new(service.name.clone(), service.policy.as_str(), self.client);
        r.via = self.via;
        r.backend = Some(self.backend);
        r.backend_name = self.backend_name.clone().map(Arc::new);
        r.attempts = self.attempts;
        r.connect_ms = self.connect_ms;
        r.started = r
            .started
            .checked_sub(Duration::from_millis(self.age_ms))
            .unwrap_or(r.started);
        if self.sni.is_some() || self.alpn.is_some() || self.route.is_some() {
            let hello = r.hello_mut();
            hello.sni = self.sni.clone();
            hello.alpn = self.alpn.clone();
            hello.route = self.route.as_deref().and_then(crate::route::Why::named);
        }
        r.handed_over = true;
        r
    }
}

/// Counts the service's open client connections for `max_connections` (and the top-level cap),
/// keeps their start time, and lists the connection for the operator (`connections`); released on
/// drop.
pub(crate) struct ClientSlot {
    service: Arc<Service>,
    id: u64,
    listed: Registered,
    _gate: GateSlot,
}

/// Where a connection came in, for its listing.
pub(crate) struct Reached<'a> {
    pub(crate) client: SocketAddr,
    pub(crate) listen: &'a Arc<str>,
    /// The engine that took it: `ring`, or the tokio side's relay.
    pub(crate) engine: &'static str,
}

impl ClientSlot {
    /// Takes a slot, or says which cap is reached.
    pub(crate) fn take(
        service: &Arc<Service>,
        gate: Option<GateSlot>,
        at: Reached<'_>,
    ) -> Result<ClientSlot, Outcome> {
        let Some(gate) = gate else {
            return Err(Outcome::GlobalMaxConnections);
        };
        if !service.stats.enter(service.max_connections) {
            return Err(Outcome::MaxConnections);
        }
        Ok(ClientSlot::entered(service, gate, at, None))
    }

    fn entered(
        service: &Arc<Service>,
        gate: GateSlot,
        at: Reached<'_>,
        handed_over: Option<Duration>,
    ) -> ClientSlot {
        let listed = connections::registry().enter(Opened {
            protocol: Protocol::Tcp,
            service: service.name.clone(),
            client: at.client,
            listen: at.listen.clone(),
            engine: at.engine,
            handed_over,
        });
        listed.conn().active().store(relay::stamp(), Relaxed);
        ClientSlot {
            service: service.clone(),
            id: service.occupancy.sessions.enter(),
            listed,
            _gate: gate,
        }
    }

    /// A slot for a connection carried in from another process: counted, never refused.
    pub(crate) fn carried(
        service: &Arc<Service>,
        gate: &Arc<Gate>,
        at: Reached<'_>,
        age: Duration,
    ) -> ClientSlot {
        service.stats.enter_anyway();
        ClientSlot::entered(service, gate.enter_anyway(), at, Some(age))
    }

    /// The connection's listing.
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        self.listed.conn()
    }
}

impl ClientSlot {
    /// The process's deny list, which the slot's gate holds.
    pub(crate) fn deny(&self) -> &DenyList {
        self._gate.deny()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.service.stats.left();
        self.service.occupancy.sessions.leave(self.id);
    }
}

/// Writes what `record` knows of a connection's routing into its listing.
pub(crate) fn list_facts(
    conn: &Conn,
    record: &Record,
    backend: Option<&Backend>,
    engine: Option<&'static str>,
    originated: bool,
) {
    let hello = record.hello();
    conn.set_facts(Facts {
        client: Some(record.client),
        via: record.via,
        route: hello.route,
        sni: hello.sni.clone(),
        backend: record.backend,
        backend_name: record.backend_name.clone(),
        tier: backend.map(|b| b.tier()),
        tls_terminated: hello.tls,
        tls_originated: originated,
        engine,
    });
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
///
/// The session's functions that stay on the stack for the connection's whole life (this one,
/// `serve_taken`, `relay_and_account`) are plain functions returning one `async move` block, not
/// async fns: an async fn keeps room for each argument it takes beside the local it moves it into,
/// and nested five deep (these three, the relay and its supervisor) that was more than a kilobyte
/// of every connection's task. The test `a_plain_connections_task_stays_small` holds the line.
pub(crate) fn serve(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    leaving: Arc<Leaving>,
    span: tracing::Span,
) -> impl Future<Output = ()> {
    let record = Record::new(service.name.clone(), service.policy.as_str(), peer);
    serve_taken(client, peer, service, slot, record, None, leaving, span)
}

/// Serves one accepted client of a shared address: reads what chooses its route (the PROXY header,
/// then the ClientHello), then serves it as its service's; `waiting` is its place among the
/// address's connections waiting for their route. A client no service takes is counted in the
/// address's unrouted connections and logged without a service.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_routed(
    mut client: TcpStream,
    peer: SocketAddr,
    listen: Arc<str>,
    routes: Arc<Routes>,
    gate: GateSlot,
    waiting: Waiting,
    leaving: Arc<Leaving>,
    span: tracing::Span,
) {
    let mut record = Record::new(Arc::from(""), "", peer);
    let routed = route(&mut client, peer, &routes, &mut record, &leaving.deadline)
        .instrument(span.clone())
        .await;
    // Routed or refused, it no longer waits for its route.
    drop(waiting);
    let (service, entry) = match routed {
        Ok(r) => r,
        Err(end) => {
            routes.unrouted.count(end);
            return span.in_scope(|| accesslog::emit(&record, refused_ending(end)));
        }
    };
    span.record("service", tracing::field::display(&service.name));
    record.service = service.name.clone();
    record.policy = service.policy.as_str();
    service.stats.accepted();
    let at = Reached {
        client: peer,
        listen: &listen,
        engine: service.relay.mode.as_str(),
    };
    let slot = match ClientSlot::take(&service, Some(gate), at) {
        Ok(slot) => slot,
        Err(end) => return span.in_scope(|| account(&service, &record, refused_ending(end))),
    };
    // Boxed: every connection's task keeps room for its entry, and only a routed one has one.
    serve_taken(
        client,
        peer,
        service,
        slot,
        record,
        Some(Box::new(entry)),
        leaving,
        span,
    )
    .await
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
    let hello = record.hello_mut();
    hello.sni = sni.map(str::to_string);
    let offered_alpn = alpn.first().cloned();
    hello.alpn = (!alpn.is_empty()).then(|| {
        alpn.iter()
            .map(|p| String::from_utf8_lossy(p))
            .collect::<Vec<_>>()
            .join(",")
    });
    let chosen = routes.table.choose(sni, alpn).ok_or(Outcome::NoRoute)?;
    hello.route = Some(chosen.why.as_str());
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

/// A client refused before its relay: why, and its socket, held so that it closes only once the
/// refusal is counted and logged (a client that sees the close then finds its routing line, and its
/// next connection, perhaps on another worker, cannot be logged before it). A TLS handshake that
/// fails has closed its socket already.
struct Refused {
    end: Outcome,
    _client: Option<ClientStream>,
}

impl Refused {
    fn with(end: Outcome, client: ClientStream) -> Refused {
        Refused {
            end,
            _client: Some(client),
        }
    }
}

impl From<Outcome> for Refused {
    fn from(end: Outcome) -> Refused {
        Refused { end, _client: None }
    }
}

/// An admitted, connected client: both sides, and its place in the source table (held until it
/// ends).
struct Admitted {
    client: ClientStream,
    backend: Connected,
    /// Boxed: every connection's task keeps room for it, and only services with per-source limits
    /// have one.
    _source: Option<Box<SourceSlot>>,
    /// Bytes of the client's sent to the backend before the relay (the hello, passed through).
    forwarded: u64,
}

/// Serves a client its service has taken (`slot`, held until it ends), to its end. Not an async
/// fn, which would store its arguments twice (see [`serve`]).
#[allow(clippy::manual_async_fn)]
#[allow(clippy::too_many_arguments)]
fn serve_taken(
    client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    slot: ClientSlot,
    mut record: Record,
    entry: Option<Box<Entry>>,
    leaving: Arc<Leaving>,
    span: tracing::Span,
) -> impl Future<Output = ()> {
    async move {
        // This mention is what moves the slot into the block, so that it is held until the
        // session ends: without it the slot would be dropped when `serve_taken` returns, at spawn.
        let _slot = &slot;
        // In a block of its own, so that its room is not kept through the relay.
        let a = {
            // TCP_NODELAY is inherited from the listening socket (listener::bind); keepalive and
            // user_timeout are the service's (no system call unless it has them).
            service
                .relay
                .client_watch
                .apply_or_log(socket2::SockRef::from(&client), "client");
            // An operator's kill before the relay is seen as the relay starts: a race here would
            // cost every connection's task room for it (`a_plain_connections_task_stays_small`).
            let admitted = admit_and_connect(
                client,
                peer,
                (&service, slot.deny()),
                &mut record,
                entry.map(|e| *e).unwrap_or_default(),
                &leaving.deadline,
            )
            .instrument(span.clone())
            .await;
            match admitted {
                Ok(a) => a,
                // Nothing was relayed; the client closes once its refusal is accounted.
                Err(refused) => {
                    span.in_scope(|| account(&service, &record, refused_ending(refused.end)));
                    drop(refused);
                    return;
                }
            }
        };
        relay_and_account(a, &service, &record, slot.conn(), &leaving, &span, None).await
    }
}

/// Reads a PROXY header (`accept_proxy`, unless the route did), admits the client (access lists,
/// per-source limits), terminates its TLS (`tls`) and connects it to a backend; or says how it was
/// refused.
async fn admit_and_connect(
    mut client: TcpStream,
    peer: SocketAddr,
    (service, deny): (&Arc<Service>, &DenyList),
    record: &mut Record,
    entry: Entry,
    deadline: &CancellationToken,
) -> Result<Admitted, Refused> {
    // The address the client reached, for a header sent on: the one a header in names, else ours.
    let reached = match entry.proxied {
        Some(reached) => reached,
        None => {
            let warnings = &service.occupancy.proxy_warnings;
            let accept = service.accept_proxy.as_ref();
            match entry::accept_header(&mut client, peer, accept, warnings, record, deadline).await
            {
                Ok(reached) => reached,
                Err(end) => return Err(Refused::with(end, ClientStream::Plain(client))),
            }
        }
    };
    let dst = reached.or_else(|| client.local_addr().ok()).unwrap_or(peer);
    let origin = record.client;
    let source = match admit_source(service, deny, origin.ip()) {
        Ok(source) => source,
        Err(end) => return Err(Refused::with(end, ClientStream::Plain(client))),
    };
    let mut facts = proxy_protocol::Tls {
        authority: record.hello().sni.clone(),
        alpn: entry.offered_alpn,
        ..Default::default()
    };
    let (client, forward) = match &service.tls.terminate {
        Some(_) => {
            let stream = Prefixed::new(entry.first, client);
            // Boxed: a plain connection's task need not keep room for a TLS handshake.
            let tls = Box::pin(terminate(stream, service, record, &mut facts, deadline)).await?;
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
    let connected = tokio::select! {
        c = connect(service, origin, record, &out) => c,
        () = deadline.cancelled() => Err(Outcome::DrainDeadline),
    };
    let backend = match connected {
        Ok(backend) => backend,
        Err(end) => return Err(Refused::with(end, client)),
    };
    Ok(Admitted {
        client,
        backend,
        _source: source.map(Box::new),
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
            let hello = record.hello_mut();
            hello.tls = Some(hs.version);
            hello.sni = hs.sni.clone().or(hello.sni.take());
            if let Some(p) = &hs.alpn {
                hello.alpn = Some(String::from_utf8_lossy(p).into_owned());
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
/// a test on another thread) finds the connection in the totals. A relay stopped for `carry` (an
/// upgrade) hands the connection to the new process instead, neither counted nor logged here: its
/// routing line is the new process's.
#[allow(clippy::manual_async_fn)]
fn relay_and_account<'a>(
    mut a: Admitted,
    service: &'a Service,
    record: &'a Record,
    conn: &'a Conn,
    leaving: &'a Leaving,
    span: &'a tracing::Span,
    mut resumed: Option<Resumed>,
) -> impl Future<Output = ()> + 'a {
    // Not an async fn, which would store its arguments twice (see `serve`): `a` and `resumed`
    // are used where they were moved in.
    async move {
        let forwarded = a.forwarded;
        let backend = a.backend.backend.clone();
        begin_relaying(&a, service, record, conn, span, resumed.as_ref());
        let opts = &service.relay;
        let cut_signal = a.backend.cut.clone();
        // A drain's deadline, the backend's sessions cut or an operator's kill: one `poll_fn` over
        // the three, pinned here (a `select!` kept room for its own state beside theirs, in every
        // connection's task).
        let mut drained = std::pin::pin!(leaving.deadline.cancelled());
        let mut removed = std::pin::pin!(cut_signal.cancelled());
        let mut cut = std::pin::pin!(std::future::poll_fn(|cx| {
            if drained.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Outcome::DrainDeadline);
            }
            if conn.poll_killed(cx).is_ready() {
                return std::task::Poll::Ready(Outcome::Killed);
            }
            removed.as_mut().poll(cx).map(|()| cut_signal.reason())
        }));
        let mut relayed: Relayed = match (&mut a.client, &mut a.backend.stream) {
            (ClientStream::Plain(cl), BackendStream::Plain(b)) => {
                let carry_signal = leaving.carry_signal();
                let mut carry = Some(&carry_signal);
                loop {
                    let so_far = resumed.as_ref().map_or((0, 0), |r| r.so_far);
                    let begin =
                        relay_begin(resumed.take(), a.backend.ack_held, opts, forwarded, record);
                    let mut r = relay::relay(
                        cl,
                        b,
                        opts,
                        cut.as_mut(),
                        carry,
                        live(&backend, conn),
                        begin,
                    )
                    .await;
                    r.bytes_up += so_far.0;
                    r.bytes_down += so_far.1;
                    let Some(held) = r.carried.take() else {
                        break r;
                    };
                    // Stopped for an upgrade: the connection goes to the new process, unless it
                    // cannot (the upgrade is over): then it goes on here, where it stopped.
                    match carry_away(cl, b, held, record, &r, forwarded, leaving) {
                        Ok(()) => return,
                        Err(held) => {
                            carry = None;
                            resumed = Some(Resumed {
                                held: Box::new(held),
                                so_far: (r.bytes_up, r.bytes_down),
                            });
                        }
                    }
                }
            }
            // TLS relays are boxed, as their handshakes are: the task of every plain connection
            // would otherwise keep room for them.
            (ClientStream::Plain(cl), BackendStream::Tls(b)) => {
                let first = first_byte_by(opts, forwarded, record);
                boxed_streams(cl, &mut **b, opts, cut, live(&backend, conn), first).await
            }
            (ClientStream::Tls(cl), BackendStream::Plain(b)) => {
                boxed_streams(&mut **cl, b, opts, cut, live(&backend, conn), None).await
            }
            (ClientStream::Tls(cl), BackendStream::Tls(b)) => {
                boxed_streams(&mut **cl, &mut **b, opts, cut, live(&backend, conn), None).await
            }
        };
        relayed.bytes_up += forwarded;
        end_relayed(a, &relayed, service, record, conn, span);
    }
}

/// A relay through TLS streams, boxed: only TLS connections pay for its room.
fn boxed_streams<'x, C, B, K>(
    client: &'x mut C,
    backend: &'x mut B,
    opts: &'x relay::RelayOptions,
    cut: std::pin::Pin<&'x mut K>,
    live: relay::LiveCounters<'x>,
    first_byte_by: Option<Instant>,
) -> std::pin::Pin<Box<impl Future<Output = Relayed> + 'x>>
where
    C: relay::Endpoint,
    B: relay::Endpoint,
    K: Future<Output = Outcome>,
{
    Box::pin(relay::relay_streams(
        client,
        backend,
        opts,
        cut,
        live,
        first_byte_by,
    ))
}

/// A connection starts relaying: the bytes sent before it (the route's hello) counted, its
/// listing filled in, its `connect` line written (not again for one carried in).
fn begin_relaying(
    a: &Admitted,
    service: &Service,
    record: &Record,
    conn: &Conn,
    span: &tracing::Span,
    resumed: Option<&Resumed>,
) {
    live(&a.backend.backend, conn)
        .up
        .fetch_add(a.forwarded, Relaxed);
    list_relaying(conn, a, record, resumed, service);
    if resumed.is_none() {
        span.in_scope(|| accesslog::emit_connect(record, conn.id));
    }
}

/// Where a plain relay starts: where a carried connection stopped, or new.
fn relay_begin(
    resumed: Option<Resumed>,
    ack_held: bool,
    opts: &relay::RelayOptions,
    forwarded: u64,
    record: &Record,
) -> relay::Begin {
    match resumed {
        Some(r) => relay::Begin::Resumed(r.held),
        None => relay::Begin::New {
            ack_held,
            first_byte_by: relay::FirstByteIn::until(first_byte_by(opts, forwarded, record)),
        },
    }
}

/// A relay ended: a kill that asked for a FIN gets one, the end is counted and logged, then both
/// sockets close (the relay may have left a FIN, or an armed reset, to this close).
fn end_relayed(
    a: Admitted,
    relayed: &Relayed,
    service: &Service,
    record: &Record,
    conn: &Conn,
    span: &tracing::Span,
) {
    if relayed.end == Outcome::Killed && conn.kill_asked() == Some(How::Fin) {
        // The relay armed a reset on both sides, as for any cut; this operator asked for a FIN.
        a.close_with_fin();
    }
    span.in_scope(|| account_relayed(service, record, relayed));
    let Admitted {
        client,
        backend: c,
        _source,
        ..
    } = a;
    drop(c);
    drop(client);
}

/// When a plain client that has sent nothing is closed (`first_byte_timeout`), if it is: one that
/// has spoken (its hello read for the route) has sent its first byte. Worked out where each new
/// relay starts (a carried one is not new), not kept in the session: every connection's task
/// would keep room for it.
fn first_byte_by(opts: &relay::RelayOptions, forwarded: u64, record: &Record) -> Option<Instant> {
    opts.first_byte_timeout
        .filter(|_| forwarded == 0)
        .map(|t| record.started + t)
}

/// What counts a relay's bytes as they move: the backend's totals and the connection's listing.
/// Made at each relay's start rather than kept in the session: every connection's task would keep
/// room for it beside the relay's own copy.
fn live<'a>(backend: &'a Backend, conn: &'a Conn) -> relay::LiveCounters<'a> {
    relay::LiveCounters {
        conn: Some(conn),
        ..backend.stats.live()
    }
}

/// Lists a connection that starts relaying: its routing so far, its engine, the bytes a
/// connection carried in had moved in the process it left.
fn list_relaying(
    conn: &Conn,
    a: &Admitted,
    record: &Record,
    resumed: Option<&Resumed>,
    service: &Service,
) {
    let (engine, originated) = match (&a.client, &a.backend.stream) {
        (ClientStream::Plain(_), BackendStream::Plain(_)) => (service.relay.mode.as_str(), false),
        (_, BackendStream::Tls(_)) => ("tls", true),
        (ClientStream::Tls(_), BackendStream::Plain(_)) => ("tls", false),
    };
    list_facts(
        conn,
        record,
        Some(&a.backend.backend),
        Some(engine),
        originated,
    );
    conn.moved(a.forwarded, 0, relay::stamp());
    if let Some(r) = resumed {
        conn.moved(r.so_far.0, r.so_far.1, relay::stamp());
    }
    conn.set_state(connections::State::Relaying);
}

impl Admitted {
    /// Closes both sides with a FIN rather than the reset the relay armed (a kill with
    /// `how=fin`): best effort; a side whose option cannot be cleared is reset.
    fn close_with_fin(&self) {
        let client = match &self.client {
            ClientStream::Plain(s) => SockRef::from(s),
            ClientStream::Tls(s) => SockRef::from(s.socket()),
        };
        let backend = match &self.backend.stream {
            BackendStream::Plain(s) => SockRef::from(s),
            BackendStream::Tls(s) => SockRef::from(s.socket()),
        };
        for side in [client, backend] {
            let _ = side.set_linger(None);
        }
    }
}

/// The end of a relayed connection: its bytes and engine in the service's totals, how it broke
/// (at debug), and its routing line.
pub(crate) fn account_relayed(service: &Service, record: &Record, relayed: &Relayed) {
    service.stats.relayed(relayed);
    if let Some(e) = &relayed.broken {
        tracing::debug!(end = relayed.end.as_str(), error = %e, "relay broken");
    }
    let ending = Ending {
        bytes_up: relayed.bytes_up,
        bytes_down: relayed.bytes_down,
        end: relayed.end,
    };
    account(service, record, ending);
}

/// Where a carried connection's relay starts: what it held, and the bytes it had moved.
struct Resumed {
    /// Boxed: every connection's task keeps room for a `Resumed`, and few ever have one.
    held: Box<relay::Quiesced>,
    so_far: (u64, u64),
}

/// Relays a connection carried in from the process this one replaced (an upgrade) to its end, then
/// counts and logs it as any other, its routing line covering its whole life (`handed_over`). It
/// is not refused for a cap: it is open already.
pub(crate) async fn resume(
    carried: Carried,
    service: Arc<Service>,
    gate: Arc<Gate>,
    leaving: Arc<Leaving>,
) {
    let Carried {
        client,
        backend,
        held,
        facts,
    } = carried;
    let span = carried_span(&facts, &service);
    let tokio_stream = |s: std::net::TcpStream| {
        s.set_nonblocking(true)?;
        // Armed while in transit (`carry_away`): taken, it closes as any other.
        socket2::SockRef::from(&s).set_linger(None)?;
        TcpStream::from_std(s)
    };
    let (client, backend) = match (tokio_stream(client), tokio_stream(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            // Both descriptors close here: the connection cannot go on without its relay.
            span.in_scope(|| tracing::warn!(error = %e, "cannot take a carried connection"));
            return;
        }
    };
    let listen: Arc<str> = client
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
        .into();
    let at = Reached {
        client: facts.client,
        listen: &listen,
        engine: service.relay.mode.as_str(),
    };
    let age = Duration::from_millis(facts.age_ms);
    let slot = ClientSlot::carried(&service, &gate, at, age);
    let record = facts.record(&service);
    let a = Admitted {
        client: ClientStream::Plain(client),
        backend: connect::Connected::carried(&service, facts.backend, backend),
        _source: None,
        forwarded: 0,
    };
    let resumed = Resumed {
        held: Box::new(held),
        so_far: (facts.bytes_up, facts.bytes_down),
    };
    relay_and_account(
        a,
        &service,
        &record,
        slot.conn(),
        &leaving,
        &span,
        Some(resumed),
    )
    .await;
}

/// The one tracing span of a connection carried in from the process this one replaced.
pub(crate) fn carried_span(facts: &CarriedFacts, service: &Service) -> tracing::Span {
    tracing::info_span!("conn", client = %facts.client, service = %service.name, handed_over = true)
}

/// Sends a connection stopped for `carry` to the upgrade's new process: both sockets (duplicated:
/// ours close when the session ends, which the kernel does not turn into a FIN while the other
/// process holds them), what the relay held, and what its routing line needs. `Err` gives `held`
/// back when nothing takes carried connections.
fn carry_away(
    client: &TcpStream,
    backend: &TcpStream,
    held: relay::Quiesced,
    record: &Record,
    relayed: &Relayed,
    forwarded: u64,
    leaving: &Leaving,
) -> Result<(), relay::Quiesced> {
    let Some(to) = crate::util::lock(&leaving.carried).clone() else {
        return Err(held);
    };
    let (Ok(client), Ok(backend)) = (dup_stream(client), dup_stream(backend)) else {
        return Err(held);
    };
    // Lost on the way (the new process gone, its config without the service), the connection
    // must end with a reset, never a FIN that passes for the stream's end; whoever relays it on
    // clears this (`resume`).
    for s in [&client, &backend] {
        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    }
    let facts = CarriedFacts::of(
        record,
        relayed.bytes_up + forwarded,
        relayed.bytes_down,
        backend_addr(&backend),
    );
    to.send(Carried {
        client,
        backend,
        held,
        facts,
    })
    .map_err(|e| {
        // It goes on here after all: closed as any other when it ends.
        let c = e.0;
        for s in [&c.client, &c.backend] {
            let _ = socket2::SockRef::from(s).set_linger(None);
        }
        c.held
    })
}

/// A second descriptor of `s`'s socket, for another owner (the same socket: closing one of the two
/// does not close it).
fn dup_stream(s: &TcpStream) -> std::io::Result<std::net::TcpStream> {
    Ok(socket2::SockRef::from(s).try_clone()?.into())
}

pub(crate) fn backend_addr(s: &std::net::TcpStream) -> SocketAddr {
    s.peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The client's place in its service's source table (access lists, per-source limits), or how it
/// is refused.
///
/// The deny list is asked again here: behind a PROXY header, `ip` is the client the header names,
/// which the accept loop's look (at the peer) could not see. A refusal by a per-source limit counts
/// toward the service's ban.
pub(crate) fn admit_source(
    service: &Service,
    deny: &DenyList,
    ip: std::net::IpAddr,
) -> Result<Option<SourceSlot>, Outcome> {
    let now = Instant::now();
    if deny.refuses(ip, now) {
        return Err(Outcome::Denied);
    }
    let table = &service.occupancy.sources;
    table
        .admit(ip, &service.limits, service.max_connections, now)
        .map_err(|r| match r {
            Refusal::Denied => Outcome::Denied,
            Refusal::SourceLimit => {
                service.breached(ip, deny, now);
                Outcome::SourceLimit
            }
        })
}

/// The one tracing span of a client connection, accepted on `local`: every line about it names it.
/// Its service (unless known here), backend and the client a PROXY header names are recorded as
/// they become known.
pub(crate) fn span(service: Option<&str>, peer: SocketAddr, local: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "conn",
        service = tracing::field::Empty,
        client = %peer,
        listen = %local,
        via = tracing::field::Empty,
        backend = tracing::field::Empty,
    );
    if let Some(name) = service {
        span.record("service", name);
    }
    span
}

/// Refuses a client before it has a backend (a cap reached, its source refused; the caller closes
/// it).
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
pub(crate) fn account(service: &Service, record: &Record, ending: Ending) {
    service.stats.count(ending.end);
    accesslog::emit(record, ending);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::events::EventBus;
    use crate::tls::ServiceTls;

    /// Every connection's task is as large as its session's largest state, for the connection's
    /// whole life: an idle connection's memory is mostly this. In a release build the plain
    /// session's future was 4,984 bytes before the functions that stay on its stack stopped being
    /// async fns, its futures were pinned once and lent down, and TLS, splice, the ring and the
    /// upgrade's stop were boxed; 2,736 after; 1,904 once the relay's own functions, the cut and
    /// the rare parts of the routing record followed. tokio allocates the task in steps of 128
    /// bytes and keeps 112 of its own beside the future (header, scheduler, id, stage, the drain's
    /// tracker token, trailer), so the release budget is the most that keeps the task at 2,048
    /// bytes: a field more costs every idle connection 128. A debug build (`cargo test`) lays the
    /// future out larger (1,952 bytes); its budget keeps the same room above what it measured.
    #[tokio::test]
    async fn a_plain_connections_task_stays_small() {
        const BUDGET: usize = if cfg!(debug_assertions) { 1_984 } else { 1_936 };
        let cfg = Config::from_yaml(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: epoll\n    backends: [{address: \"127.0.0.1:9\"}]\n",
        )
        .unwrap();
        let service = Arc::new(Service::new(
            &cfg.services[0],
            true,
            ServiceTls::default(),
            &EventBus::default(),
        ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let peer = client.local_addr().unwrap();
        let gate = Arc::new(Gate::new(None));
        let listen: Arc<str> = Arc::from("127.0.0.1:1");
        let at = Reached {
            client: peer,
            listen: &listen,
            engine: "epoll",
        };
        let slot = ClientSlot::take(&service, gate.enter(), at).unwrap();
        let leaving = Arc::new(Leaving::default());
        let session = serve(client, peer, service, slot, leaving, tracing::Span::none());
        let size = std::mem::size_of_val(&session);
        println!("a plain session's future: {size} bytes");
        assert!(
            size <= BUDGET,
            "a plain connection's session future is {size} bytes, over its budget of {BUDGET}: \
             box what only some connections need (see `serve`)"
        );
    }
}
