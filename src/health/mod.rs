//! Active health checks: one probe (a TCP connect and its `send`/`expect` steps, the same steps as
//! UDP datagrams, a DNS query, a TLS handshake, HTTP `GET` in the clear or over TLS with the
//! statuses and body the service expects, or a command run), the rise/fall state machine that
//! turns probe results into *transitions*, and the agent a backend may run to report its own state
//! and weight (`agent.rs`). Pure of any pool: the pool's probe and agent loops (`pool/probing.rs`,
//! `pool/agent.rs`) schedule them and act on what they say.
//!
//! Passive health (consecutive connect failures, in the pool) and active health are two inputs of one
//! eligibility rule: a backend takes new connections when it is active (not draining or gone from its
//! source), not ejected, and, where probes run, healthy. Both inputs change the pool's view only on a
//! transition.
//!
//! Probe rules: bounded by `timeout` in all; at most `read_cap` bytes read for an expectation or a
//! body (`exchange.rs`) or of a reply datagram (`datagram.rs`); an ICMP port-unreachable fails a
//! UDP or DNS probe at once (`datagram.rs`; `dns.rs` builds the query and checks its reply); the
//! probe connection or socket is always closed; a command runs without a shell,
//! within its service's share of [`slots::CAP`] commands at once (`slots.rs`), and leaves nothing
//! running when its check ends (`exec.rs`, `reaper.rs`).

mod agent;
mod datagram;
mod dns;
mod exchange;
mod exec;
mod reaper;
mod slots;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{HealthConfig, HealthKind, Rcode};
use crate::util::is_local_exhaustion;
pub use agent::AgentSays;
pub(crate) use agent::{ask as ask_agent, AgentReply};
pub use reaper::{adopt_orphans, reap_orphans};

/// The parsers of what backends answer to checks, pure, public for the fuzz targets
/// (tests/it/fuzz.rs).
pub mod wire {
    use super::AgentSays;

    /// An agent's line: its state word and weight share, or why it is refused.
    pub fn agent_line(line: &[u8]) -> Result<(Option<AgentSays>, Option<u32>), String> {
        super::agent::parse(line).map(|r| (r.says, r.pct))
    }

    /// An HTTP probe's response as read so far, with or without its body, within `cap` bytes:
    /// `None` while more is needed, else the status and body or why it is not a response.
    pub fn http_response(
        raw: &[u8],
        body: bool,
        cap: usize,
    ) -> Option<Result<(u16, Vec<u8>), String>> {
        super::exchange::parse(raw, body, cap)
    }

    /// What a datagram says to a DNS probe that sent query `id` and expects `rcode` (and an answer
    /// record, with `answer`): `None` when it is not the reply, else the verdict.
    pub fn dns_reply(
        datagram: &[u8],
        id: u16,
        rcode: super::Rcode,
        answer: bool,
    ) -> Option<Result<(), String>> {
        let q = super::dns::Question {
            name: hickory_resolver::proto::rr::Name::root(),
            record_type: crate::config::DnsType::A,
            rcode,
            answer,
        };
        super::dns::check(datagram, id, &q)
    }
}

/// The most of a command's output kept in a probe's record.
pub(crate) const OUTPUT_KEPT: usize = 512;

/// Probe results kept per backend for the admin view.
pub(crate) const PROBE_HISTORY: usize = 10;

crate::util::byte_enum! {
    /// What the active probes last concluded about a backend.
    pub enum Health {
        /// Not probed yet (or probes are off).
        Unknown = 0 => "unknown",
        Healthy = 1 => "healthy",
        Unhealthy = 2 => "unhealthy",
    }
}

/// Rise/fall over probe results. A backend never probed becomes healthy on its first pass (Docker
/// publishes a container's DNS record before its app listens, so the first probes may fail) and
/// unhealthy after `fall` failures; after that it takes `rise` straight passes to come up and `fall`
/// straight failures to go down, so alternating results never flap.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    state: Health,
    passes: u32,
    fails: u32,
    rise: u32,
    fall: u32,
}

impl Machine {
    pub(crate) fn new(rise: u32, fall: u32) -> Machine {
        Machine {
            state: Health::Unknown,
            passes: 0,
            fails: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// A machine that continues from `state` (probes restarted by a reload keep each backend's health).
    pub(crate) fn starting_at(rise: u32, fall: u32, state: Health) -> Machine {
        Machine {
            state,
            ..Machine::new(rise, fall)
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> Health {
        self.state
    }

    /// Records one probe result; returns the new state when it changed.
    pub(crate) fn record(&mut self, ok: bool) -> Option<Health> {
        let next = if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            match self.state {
                Health::Unknown => Health::Healthy,
                Health::Unhealthy if self.passes >= self.rise => Health::Healthy,
                s => s,
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            match self.state {
                Health::Unknown | Health::Healthy if self.fails >= self.fall => Health::Unhealthy,
                s => s,
            }
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

/// Why a probe failed; the text goes into the backend's probe history.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// This process could not open or connect a socket for want of its own resources (descriptors,
    /// buffers, memory, local ports): says nothing about the backend, so it gives no verdict.
    #[error("not counted: out of local resources: {0}")]
    Local(io::Error),
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("timed out")]
    Timeout,
    /// A UDP or DNS probe (named) got no reply datagram within the probe's timeout.
    #[error("{0}: no reply within {1:?}")]
    NoReply(&'static str, Duration),
    /// The backend's host answered a UDP or DNS probe (named) with ICMP port-unreachable: nothing
    /// listens on the port.
    #[error("{0}: port unreachable (ICMP)")]
    Unreachable(&'static str),
    #[error("write: {0}")]
    Write(io::Error),
    #[error("read: {0}")]
    Read(io::Error),
    #[error("closed before a complete HTTP response")]
    Closed,
    #[error("not an HTTP response")]
    Malformed,
    #[error("status {0}")]
    Status(u16),
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// An answer that is not what the check expects (a `send`/`expect` step, an HTTP body, an
    /// agent's line): what was expected and what came.
    #[error("{0}")]
    Expect(String),
    /// The command could not be started (not found, not executable, too many running).
    #[error("command: {0}")]
    Spawn(String),
    /// The command ran and said no.
    #[error("command exited with {0}")]
    Exit(String),
}

impl ProbeError {
    /// A failed connect: the backend's fault, unless this process ran out of its own resources.
    pub(crate) fn connecting(e: io::Error) -> ProbeError {
        if is_local_exhaustion(&e) {
            ProbeError::Local(e)
        } else {
            ProbeError::Connect(e)
        }
    }
}

/// A stream a probe speaks HTTP over: a socket, or TLS over one.
pub(crate) trait ProbeIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ProbeIo for T {}

/// A handshake in progress: the stream to speak over once it is done.
pub(crate) type Handshaking<'a> =
    Pin<Box<dyn Future<Output = io::Result<Box<dyn ProbeIo>>> + Send + 'a>>;

/// A probe's TLS handshake, as the service does it with its backends (`backend_tls`): the `tls`
/// module implements it, so this module does not depend on it.
pub(crate) trait ProbeTls: Send + Sync + std::fmt::Debug {
    /// The client side of a handshake on `stream` with a backend found under `dns_name` (if it was)
    /// at `ip`.
    fn handshake<'a>(
        &'a self,
        stream: TcpStream,
        dns_name: Option<&'a str>,
        ip: IpAddr,
    ) -> Handshaking<'a>;
}

/// One probe's outcome, as kept in the history.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    /// Unix time of the probe's start, in milliseconds.
    pub at_ms: u64,
    pub ok: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
    /// Whether it counted towards rise and fall (a probe that failed for a local reason does not).
    pub counted: bool,
    /// What the command printed (`kind: exec`) or the agent said: the first 512 bytes, escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl ProbeError {
    /// Whether the failure is the backend's (it counts towards `fall`), not this process's.
    pub(crate) fn is_verdict(&self) -> bool {
        !matches!(self, ProbeError::Local(_))
    }
}

impl ProbeRecord {
    /// The record of a probe that started at `at`, took `latency` and failed with `error`, if it did.
    pub(crate) fn new(
        at: SystemTime,
        latency: Duration,
        error: Option<&ProbeError>,
    ) -> ProbeRecord {
        ProbeRecord {
            at_ms: at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            ok: error.is_none(),
            latency_ms: latency.as_secs_f64() * 1e3,
            error: error.map(|e| e.to_string()),
            counted: error.is_none_or(ProbeError::is_verdict),
            output: None,
        }
    }

    /// With what the check printed or said (its first [`OUTPUT_KEPT`] bytes).
    pub(crate) fn with_output(self, output: &[u8]) -> ProbeRecord {
        let cut = &output[..output.len().min(OUTPUT_KEPT)];
        ProbeRecord {
            output: Some(cut.escape_ascii().to_string()),
            ..self
        }
    }
}

/// A probe's verdict, and what the check printed when it printed anything (a command's output).
#[derive(Debug)]
pub(crate) struct Probed {
    pub(crate) result: Result<(), ProbeError>,
    pub(crate) output: Option<Vec<u8>>,
}

/// Who a probe is about: the backend and the names it goes by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) addr: SocketAddr,
    /// The HTTP `Host`: the backend's DNS name and port, else its address.
    pub(crate) host: &'a str,
    /// The name the backend was found under, which its TLS certificate must carry.
    pub(crate) dns_name: Option<&'a str>,
}

/// A service's probe settings.
#[derive(Debug, Clone)]
pub(crate) struct ProbeSpec {
    pub(crate) health: HealthConfig,
    /// For `kind: tls` and `https`: the service's TLS to its backends.
    pub(crate) tls: Option<Arc<dyn ProbeTls>>,
    /// For `kind: exec`: the service's name, in the command's environment.
    pub(crate) service: Arc<str>,
    /// For `kind: exec`: the service's place among those sharing the command slots.
    exec_slots: Option<Arc<slots::Member>>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) rise: u32,
    pub(crate) fall: u32,
}

impl ProbeSpec {
    /// The settings of `service`, or `None` when probes are off. `tls` is the service's TLS to its
    /// backends, which `kind: tls` and `https` use (the config's validation requires `backend_tls`
    /// for them).
    pub(crate) fn from_config(
        service: &str,
        h: &HealthConfig,
        tls: Option<Arc<dyn ProbeTls>>,
    ) -> Option<ProbeSpec> {
        let service: Arc<str> = service.into();
        (h.kind != HealthKind::None).then(|| ProbeSpec {
            health: h.clone(),
            tls,
            exec_slots: (h.kind == HealthKind::Exec)
                .then(|| Arc::new(slots::Member::join(service.clone()))),
            service,
            interval: h.interval.0,
            timeout: h.timeout.0,
            rise: h.rise,
            fall: h.fall,
        })
    }

    /// Whether two specs probe the same way (a reload that keeps them keeps the probe loops; new TLS
    /// settings, certificates read again, restart them).
    pub(crate) fn same_as(&self, o: &ProbeSpec) -> bool {
        let same_tls = match (&self.tls, &o.tls) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_tls && self.health == o.health && self.service == o.service
    }

    /// Probes `target` once. Bounded by `timeout` in all.
    pub(crate) async fn probe(&self, target: Target<'_>) -> Probed {
        let addr = match self.health.port {
            Some(p) => SocketAddr::new(target.addr.ip(), p),
            None => target.addr,
        };
        if let Some(slots) = &self.exec_slots {
            let env = exec::Env {
                address: addr,
                host: target.dns_name,
                service: &self.service,
            };
            return exec::run(&self.health.command, &env, self.timeout, slots).await;
        }
        let h = &self.health;
        let result = match h.kind {
            HealthKind::Udp => {
                self.bounded(datagram::steps(addr, &h.steps, h.read_cap))
                    .await
            }
            HealthKind::Dns => self.bounded(dns::ask(addr, h)).await,
            _ => self.bounded(self.connected(addr, target)).await,
        };
        Probed {
            result,
            output: None,
        }
    }

    /// `check` within the probe's timeout. A datagram probe that runs out of it is waiting for a
    /// reply (its sends do not block), so its record says so.
    async fn bounded(
        &self,
        check: impl Future<Output = Result<(), ProbeError>>,
    ) -> Result<(), ProbeError> {
        let out_of_time = match self.health.kind {
            HealthKind::Udp => ProbeError::NoReply("udp", self.timeout),
            HealthKind::Dns => ProbeError::NoReply("dns", self.timeout),
            _ => ProbeError::Timeout,
        };
        tokio::time::timeout(self.timeout, check)
            .await
            .unwrap_or(Err(out_of_time))
    }

    /// Connects to `addr` and runs the check's exchange over the connection.
    async fn connected(&self, addr: SocketAddr, target: Target<'_>) -> Result<(), ProbeError> {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(ProbeError::connecting)?;
        let handshake = |s| async move {
            let Some(tls) = &self.tls else {
                return Err(ProbeError::Tls(io::Error::other("no backend_tls")));
            };
            tls.handshake(s, target.dns_name, addr.ip())
                .await
                .map_err(ProbeError::Tls)
        };
        let h = &self.health;
        match h.kind {
            HealthKind::Http => exchange::http(&mut s, h, target.host).await,
            HealthKind::Https => exchange::http(&mut handshake(s).await?, h, target.host).await,
            HealthKind::Tls => handshake(s).await.map(drop),
            HealthKind::Tcp if !h.steps.is_empty() => {
                exchange::steps(&mut s, &h.steps, h.read_cap).await
            }
            // `probe` sends these over UDP: a connection is never theirs.
            HealthKind::Udp | HealthKind::Dns => Err(ProbeError::Connect(io::Error::other(
                "a datagram probe over a TCP connection",
            ))),
            HealthKind::Tcp | HealthKind::None | HealthKind::Exec => {
                // A reset instead of a FIN: the prober keeps no TIME_WAIT entry per probe.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                Ok(())
            }
        }
        // Dropping the stream closes the probe connection whatever the backend still sends.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_makes_a_new_backend_healthy() {
        let mut m = Machine::new(2, 3);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), Some(Health::Healthy));
    }

    #[test]
    fn a_new_backend_that_keeps_failing_becomes_unhealthy() {
        let mut m = Machine::new(2, 3);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(Health::Unhealthy));
    }

    #[test]
    fn alternating_results_never_flap() {
        let mut m = Machine::new(2, 3);
        m.record(true);
        for _ in 0..100 {
            assert_eq!(m.record(false), None);
            assert_eq!(m.record(true), None);
        }
        assert_eq!(m.state(), Health::Healthy);
        // and from down: alternating never brings it up with rise 2
        for _ in 0..3 {
            m.record(false);
        }
        assert_eq!(m.state(), Health::Unhealthy);
        for _ in 0..100 {
            assert_eq!(m.record(true), None);
            assert_eq!(m.record(false), None);
        }
    }

    #[test]
    fn fall_then_rise() {
        let mut m = Machine::new(2, 3);
        m.record(true);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(Health::Unhealthy));
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(Health::Healthy));
    }
}
