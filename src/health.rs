//! Active health checks: one probe (TCP connect or HTTP `GET`) and the rise/fall state machine that
//! turns probe results into *transitions*. Pure of any pool: the pool's probe loop
//! (`pool/probes.rs`) schedules the probes and acts on the transitions.
//!
//! Passive health (consecutive connect failures, in the pool) and active health are two inputs of one
//! eligibility rule: a backend takes new connections when it is active (not draining or gone from its
//! source), not ejected, and, where probes run, healthy. Both inputs change the pool's view only on a
//! transition.
//!
//! Probe rules: bounded by `timeout` in all; at most [`MAX_RESPONSE_READ`] bytes read; the probe
//! connection is always closed.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{HealthConfig, HealthKind};

/// Bytes of a probe's HTTP response read at most: the status line must fit.
pub(crate) const MAX_RESPONSE_READ: usize = 4096;

/// Probe results kept per backend for the admin view.
pub(crate) const PROBE_HISTORY: usize = 10;

/// What the active probes last concluded about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Health {
    /// Not probed yet (or probes are off).
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }

    pub fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
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
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("timed out")]
    Timeout,
    #[error("write: {0}")]
    Write(io::Error),
    #[error("read: {0}")]
    Read(io::Error),
    #[error("closed before a status line")]
    Closed,
    #[error("no HTTP status line in the first {MAX_RESPONSE_READ} bytes")]
    Malformed,
    #[error("status {0}")]
    Status(u16),
}

/// One probe's outcome, as kept in the history.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    /// Unix time of the probe's start, in milliseconds.
    pub at_ms: u64,
    pub ok: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
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
        }
    }
}

/// A service's probe settings.
#[derive(Debug, Clone)]
pub(crate) struct ProbeSpec {
    pub kind: HealthKind,
    pub path: String,
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl ProbeSpec {
    /// The settings, or `None` when probes are off.
    pub(crate) fn from_config(h: &HealthConfig) -> Option<ProbeSpec> {
        (h.kind != HealthKind::None).then(|| ProbeSpec {
            kind: h.kind,
            path: h.path.clone(),
            port: h.port,
            interval: h.interval.0,
            timeout: h.timeout.0,
            rise: h.rise,
            fall: h.fall,
        })
    }

    /// Whether two specs probe the same way (a reload that keeps them keeps the probe loops).
    pub(crate) fn same_as(&self, o: &ProbeSpec) -> bool {
        (
            self.kind,
            &self.path,
            self.port,
            self.interval,
            self.timeout,
            self.rise,
            self.fall,
        ) == (
            o.kind, &o.path, o.port, o.interval, o.timeout, o.rise, o.fall,
        )
    }

    /// Probes `target` once; `host` goes into the HTTP `Host` header. Bounded by `timeout` in all.
    pub(crate) async fn probe(&self, target: SocketAddr, host: &str) -> Result<(), ProbeError> {
        let target = match self.port {
            Some(p) => SocketAddr::new(target.ip(), p),
            None => target,
        };
        tokio::time::timeout(self.timeout, self.probe_unbounded(target, host))
            .await
            .unwrap_or(Err(ProbeError::Timeout))
    }

    async fn probe_unbounded(&self, target: SocketAddr, host: &str) -> Result<(), ProbeError> {
        let mut s = TcpStream::connect(target)
            .await
            .map_err(ProbeError::Connect)?;
        if self.kind != HealthKind::Http {
            // A reset instead of a FIN: the prober keeps no TIME_WAIT entry per probe.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            return Ok(());
        }
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sluicegate-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Write)?;
        let mut buf = [0u8; MAX_RESPONSE_READ];
        let mut n = 0;
        loop {
            if let Some(code) = status_code(&buf[..n]) {
                return code;
            }
            if n == buf.len() {
                return Err(ProbeError::Malformed);
            }
            match s.read(&mut buf[n..]).await.map_err(ProbeError::Read)? {
                0 => return Err(ProbeError::Closed),
                k => n += k,
            }
        }
        // Dropping `s` closes the probe connection whatever the backend still sends.
    }
}

/// The verdict of a complete status line in `head`, or `None` while it is incomplete.
fn status_code(head: &[u8]) -> Option<Result<(), ProbeError>> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok();
    let code = line.and_then(|l| {
        let mut parts = l.split(' ');
        let version = parts.next()?;
        let code = parts.next()?;
        (version.starts_with("HTTP/1.") && code.len() == 3)
            .then(|| code.parse::<u16>().ok())
            .flatten()
    });
    Some(match code {
        Some(c) if (200..300).contains(&c) => Ok(()),
        Some(c) => Err(ProbeError::Status(c)),
        None => Err(ProbeError::Malformed),
    })
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

    #[test]
    fn status_lines() {
        assert!(status_code(b"HTTP/1.1 200 OK").is_none(), "incomplete");
        assert!(matches!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(Ok(()))));
        assert!(matches!(status_code(b"HTTP/1.0 204 \r\n"), Some(Ok(()))));
        assert!(matches!(
            status_code(b"HTTP/1.1 301 Moved\r\n"),
            Some(Err(ProbeError::Status(301)))
        ));
        assert!(matches!(
            status_code(b"HTTP/1.1 503 Unavailable\r\n"),
            Some(Err(ProbeError::Status(503)))
        ));
        assert!(matches!(
            status_code(b"SSH-2.0-OpenSSH\r\n"),
            Some(Err(ProbeError::Malformed))
        ));
        assert!(matches!(
            status_code(b"HTTP/1.1 2000 OK\r\n"),
            Some(Err(ProbeError::Malformed))
        ));
    }
}
