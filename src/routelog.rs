//! The routing-decision log: one line per client connection, written when it ends.
//!
//! Fields (INTERFACES.md): `service, client, backend, policy, attempts, connect_ms, bytes_up, bytes_down,
//! duration_ms, end`. A field without a value (no backend was chosen, no connect succeeded) is written as
//! `null`. Lines go through `tracing` at INFO with target [`TARGET`], so `log.level: warn` skips their
//! formatting entirely.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::relay::RelayOutcome;
use crate::service::Service;
use crate::session::Refused;

pub const TARGET: &str = "sluicegate::route";

/// What is known about one connection's routing, filled in as it progresses.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<str>,
    pub client: SocketAddr,
    /// The backend connected to, or the last one tried.
    pub backend: Option<SocketAddr>,
    pub policy: &'static str,
    pub attempts: u32,
    pub connect_ms: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: f64,
    pub end: &'static str,
}

impl Route {
    pub fn new(service: &Service, client: SocketAddr) -> Route {
        Route {
            service: service.name.clone(),
            client,
            backend: None,
            policy: service.policy.as_str(),
            attempts: 0,
            connect_ms: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0.0,
            end: "",
        }
    }

    pub fn finish(&mut self, outcome: RelayOutcome, started: Instant) {
        self.bytes_up = outcome.bytes_up;
        self.bytes_down = outcome.bytes_down;
        self.end = outcome.end.as_str();
        self.duration_ms = ms(started);
    }

    pub fn finish_refused(&mut self, refused: Refused, started: Instant) {
        if refused == Refused::NoBackend {
            self.backend = None;
        }
        self.end = refused.as_str();
        self.duration_ms = ms(started);
    }
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

/// Writes the line (a no-op when INFO is filtered out).
pub fn emit(r: &Route) {
    macro_rules! line {
        ($backend:expr, $connect_ms:expr) => {
            tracing::info!(
                target: TARGET,
                service = %r.service,
                client = %r.client,
                backend = $backend,
                policy = r.policy,
                attempts = r.attempts,
                connect_ms = $connect_ms,
                bytes_up = r.bytes_up,
                bytes_down = r.bytes_down,
                duration_ms = r.duration_ms,
                end = r.end,
                "route"
            )
        };
    }
    let connect_ms = r.connect_ms.map(|c| (c * 1e3).round() / 1e3);
    match (r.backend, connect_ms) {
        (Some(b), Some(c)) => line!(tracing::field::display(b), c),
        (Some(b), None) => line!(tracing::field::display(b), tracing::field::Empty),
        (None, _) => line!(tracing::field::Empty, tracing::field::Empty),
    }
}
