//! The access log (`log.access`): one line per client connection, written when it ends, saying where
//! it was routed and how it went.
//!
//! Fields: `service, client, via, backend, backend_name, policy, attempts, connect_ms, bytes_up,
//! bytes_down, duration_ms, end`, and on shared addresses and TLS services `sni, alpn, route, tls`
//! (documented in `docs/configuration.md`, "Routing log"). A field without a value (no backend was
//! chosen, no connect succeeded, no service took the connection) is written as `null`. Lines go through `tracing` at INFO with
//! target [`TARGET`], so `log.level: warn` skips their formatting entirely. The session writes the line
//! (`session::account`), whatever way the connection ended.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connections;

use crate::outcome::Outcome;

/// The `tracing` target of access-log lines, which tells them apart from the application log. Not
/// `sluicegate::access`: it is documented output (`docs/configuration.md`, the `target` of every
/// JSON line), and filters (`log.filter`, `SLUICEGATE_LOG`) and log pipelines select the lines by it.
pub const TARGET: &str = "sluicegate::route";

/// What is known about one connection's routing, filled in as it progresses.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) service: Arc<str>,
    pub(crate) client: SocketAddr,
    /// The balancer in front whose PROXY header named `client` (`accept_proxy`).
    pub(crate) via: Option<SocketAddr>,
    /// The backend connected to, or the last one tried.
    pub(crate) backend: Option<SocketAddr>,
    /// Its reverse-DNS name, when known.
    pub(crate) backend_name: Option<Arc<String>>,
    pub(crate) policy: &'static str,
    pub(crate) attempts: u32,
    pub(crate) connect_ms: Option<f64>,
    pub(crate) started: Instant,
    /// What its ClientHello said and how its route was chosen: boxed, as only connections on shared
    /// addresses and to TLS services have any, and every connection's task keeps its record.
    hello: Option<Box<Hello>>,
    /// Carried in from the process this one replaced (an upgrade): the line covers its whole life.
    pub(crate) handed_over: bool,
}

/// The part of a [`Record`] that only routed and TLS connections have.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hello {
    /// The server name of its ClientHello (routed, or TLS terminated).
    pub(crate) sni: Option<String>,
    /// The protocols its ClientHello offered (routed), or the one agreed (TLS terminated).
    pub(crate) alpn: Option<String>,
    /// Why its route took it (`exact`, `wildcard`, `alpn`, `default`, ...), on a shared address.
    pub(crate) route: Option<&'static str>,
    /// The TLS version agreed with the client, when the service terminates TLS.
    pub(crate) tls: Option<&'static str>,
}

/// How the connection ended, for its line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending {
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) end: Outcome,
}

impl Record {
    pub(crate) fn new(service: Arc<str>, policy: &'static str, client: SocketAddr) -> Record {
        Record {
            service,
            client,
            via: None,
            backend: None,
            backend_name: None,
            policy,
            attempts: 0,
            connect_ms: None,
            started: Instant::now(),
            hello: None,
            handed_over: false,
        }
    }

    /// What its ClientHello said and how it was routed, when it was (else all `None`).
    pub(crate) fn hello(&self) -> &Hello {
        static NONE: Hello = Hello {
            sni: None,
            alpn: None,
            route: None,
            tls: None,
        };
        self.hello.as_deref().unwrap_or(&NONE)
    }

    /// The same, to fill in.
    pub(crate) fn hello_mut(&mut self) -> &mut Hello {
        self.hello.get_or_insert_with(Box::default)
    }
}

/// One UDP session's line, written when it ends.
#[derive(Debug)]
pub(crate) struct UdpLine<'a> {
    pub(crate) service: &'a str,
    pub(crate) client: SocketAddr,
    /// The address the client sent to.
    pub(crate) listen: SocketAddr,
    pub(crate) backend: SocketAddr,
    pub(crate) backend_name: Option<&'a str>,
    pub(crate) policy: &'static str,
    pub(crate) datagrams_up: u64,
    pub(crate) datagrams_down: u64,
    pub(crate) bytes_up: u64,
    pub(crate) bytes_down: u64,
    pub(crate) duration: std::time::Duration,
    pub(crate) end: &'static str,
    /// A QUIC session's: what its Initials named and how its route took it.
    pub(crate) sni: Option<&'a str>,
    pub(crate) alpn: Option<&'a str>,
    pub(crate) route: Option<&'static str>,
    pub(crate) quic_version: Option<&'static str>,
}

/// Writes a UDP session's line (`protocol: "udp"`; a no-op when INFO is filtered out).
pub(crate) fn emit_udp(l: &UdpLine<'_>) {
    let duration_ms = (l.duration.as_secs_f64() * 1e6).round() / 1e3;
    tracing::info!(
        target: TARGET,
        protocol = "udp",
        service = l.service,
        client = %l.client,
        listen = %l.listen,
        backend = %l.backend,
        backend_name = l.backend_name,
        policy = l.policy,
        datagrams_up = l.datagrams_up,
        datagrams_down = l.datagrams_down,
        bytes_up = l.bytes_up,
        bytes_down = l.bytes_down,
        duration_ms,
        end = l.end,
        event = "end",
        sni = l.sni,
        alpn = l.alpn,
        route = l.route,
        quic_version = l.quic_version,
        "route"
    );
}

/// Writes the line (a no-op when INFO is filtered out).
pub(crate) fn emit(r: &Record, e: Ending) {
    let duration_ms = (r.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    // A refusal for want of a backend names none, even if one was tried before.
    let backend = if e.end == Outcome::NoBackend {
        None
    } else {
        r.backend
    };
    let name = backend.and(r.backend_name.as_deref()).map(String::as_str);
    let via = r.via.map(|v| v.to_string());
    macro_rules! line {
        ($backend:expr, $connect_ms:expr) => {
            tracing::info!(
                target: TARGET,
                service = (!r.service.is_empty()).then_some(&*r.service),
                client = %r.client,
                via = via.as_deref(),
                backend = $backend,
                backend_name = name,
                policy = (!r.policy.is_empty()).then_some(r.policy),
                attempts = r.attempts,
                connect_ms = $connect_ms,
                bytes_up = e.bytes_up,
                bytes_down = e.bytes_down,
                duration_ms,
                end = e.end.as_str(),
                event = "end",
                sni = r.hello().sni.as_deref(),
                alpn = r.hello().alpn.as_deref(),
                route = r.hello().route,
                tls = r.hello().tls,
                handed_over = r.handed_over,
                "route"
            )
        };
    }
    let connect_ms = r.connect_ms.map(|c| (c * 1e3).round() / 1e3);
    match (backend, connect_ms) {
        (Some(b), Some(c)) => line!(tracing::field::display(b), c),
        (Some(b), None) => line!(tracing::field::display(b), tracing::field::Empty),
        (None, _) => line!(tracing::field::Empty, tracing::field::Empty),
    }
}

/// Whether a line is written as each connection's backend connection is made
/// (`log.access.on_connect`): one switch for the process, as its routing log is.
static ON_CONNECT: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_on_connect(on: bool) {
    ON_CONNECT.store(on, Relaxed);
}

/// Writes a connection's `connect` line, when `log.access.on_connect` asks for one: where it was
/// routed, once its backend connection is made (`id` as `GET /connections` lists it).
pub(crate) fn emit_connect(r: &Record, id: u64) {
    if !ON_CONNECT.load(Relaxed) {
        return;
    }
    let via = r.via.map(|v| v.to_string());
    let connect_ms = r.connect_ms.map(|c| (c * 1e3).round() / 1e3);
    tracing::info!(
        target: TARGET,
        event = "connect",
        id,
        service = &*r.service,
        client = %r.client,
        via = via.as_deref(),
        backend = r.backend.map(tracing::field::display),
        backend_name = r.backend_name.as_deref().map(String::as_str),
        policy = r.policy,
        attempts = r.attempts,
        connect_ms,
        sni = r.hello().sni.as_deref(),
        alpn = r.hello().alpn.as_deref(),
        route = r.hello().route,
        tls = r.hello().tls,
        handed_over = r.handed_over,
        "route"
    );
}

/// Writes a `progress` line for every open connection and UDP session each `every`
/// (`log.access.every`), with its bytes so far, until `stop`.
pub(crate) async fn progress(every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for c in connections::registry().all().iter().rev() {
            if c.state() == connections::State::Connecting {
                continue;
            }
            let facts = c.facts();
            let (up, down) = c.bytes();
            let duration_ms = (c.born.elapsed().as_secs_f64() * 1e6).round() / 1e3;
            tracing::info!(
                target: TARGET,
                event = "progress",
                id = c.id,
                protocol = c.protocol.as_str(),
                service = &*c.service,
                client = %facts.client.unwrap_or(c.client),
                backend = facts.backend.map(tracing::field::display),
                backend_name = facts.backend_name.as_deref().map(String::as_str),
                bytes_up = up,
                bytes_down = down,
                duration_ms,
                handed_over = c.handed_over,
                "route"
            );
        }
    }
}
