//! One upstream address and everything known about it: weight, health, state, counters, the latest
//! probes, and the signal that cuts its sessions. Counters live as long as the backend does, so
//! rebuilding snapshots, reconciling sources or reloading never resets them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::membership::Source;
use crate::balance::Candidate;
use crate::health::{Health, ProbeRecord, PROBE_HISTORY};
use crate::outcome::Outcome;
use crate::util::lock;

/// Effective weights are kept in tenths of a configured weight, so slow start can ramp even a weight
/// of 1 in steps: a full-weight backend has `weight * WEIGHT_SCALE`.
pub const WEIGHT_SCALE: u32 = 10;

/// Whether a backend is a member taking new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum State {
    /// A member; takes new connections when healthy and not ejected.
    Active = 0,
    /// A member that takes no new connections; its sessions go on (admin drain).
    Draining = 1,
    /// No longer claimed by any source; kept only while sessions remain (`on_removed`).
    Removed = 2,
}

impl State {
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Active => "active",
            State::Draining => "draining",
            State::Removed => "removed",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Draining,
            2 => State::Removed,
            _ => State::Active,
        }
    }
}

/// Lets a backend's live sessions be cut (health `on_down: close`, `on_removed`): sessions wait on the
/// signal current when they picked the backend; cutting replaces it, so later sessions are unaffected.
#[derive(Debug, Default)]
pub(crate) struct CutSignal {
    token: CancellationToken,
    reason: OnceLock<Outcome>,
}

impl CutSignal {
    /// Completes when the backend's sessions are cut, with the reason for their routing lines.
    pub(crate) async fn cut(&self) -> Outcome {
        self.token.cancelled().await;
        self.reason
            .get()
            .copied()
            .unwrap_or(Outcome::BackendRemoved)
    }
}

/// Upper bounds of the connect-latency buckets, in seconds.
pub(crate) const CONNECT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of connect durations with fixed buckets: one relaxed increment per observation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last is above every bound.
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = CONNECT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Mean in milliseconds, if anything was observed.
    pub fn mean_ms(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_us.load(Relaxed) as f64 / 1e3 / n as f64)
    }

    /// Cumulative counts per bound (the last is +Inf), the sum in seconds, the count.
    pub(crate) fn cumulative(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let c = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Relaxed);
                acc
            })
            .collect();
        (c, self.sum_us.load(Relaxed) as f64 / 1e6, self.count())
    }
}

#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections counted from the start of their connect (least-connections relies on that).
    pub active: AtomicU64,
    /// Connections established to this backend.
    pub total: AtomicU64,
    /// Connect attempts that failed (timeout, refused, reset).
    pub failed: AtomicU64,
    /// Bytes forwarded client → backend, counted as they move.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded backend → client, counted as they move.
    pub bytes_down: AtomicU64,
    /// Time of successful connects.
    pub connect: Histogram,
}

/// One upstream address and everything known about it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Configured weight.
    pub(super) weight: AtomicU32,
    /// Weight the policies use, in `WEIGHT_SCALE` units; below full only during slow start.
    pub(super) effective: AtomicU32,
    pub stats: BackendStats,
    /// Consecutive connect failures; reset by a successful connect.
    pub(super) consecutive_fails: AtomicU32,
    /// Passive ejection: no new connections until the cool-down ends.
    pub(super) ejected: AtomicBool,
    pub(super) health: AtomicU8,
    pub(super) state: AtomicU8,
    /// Bumped whenever the backend leaves or rejoins, so timers of an earlier departure do nothing.
    pub(super) generation: AtomicU64,
    pub(super) sources: Mutex<Vec<Source>>,
    /// Unix ms of the first and latest DNS answer that listed this backend; 0 = never.
    pub(super) dns_first_seen_ms: AtomicU64,
    pub(super) dns_last_seen_ms: AtomicU64,
    probes: Mutex<VecDeque<ProbeRecord>>,
    /// When the current slow-start ramp began.
    pub(super) ramp_since: Mutex<Option<Instant>>,
    /// Has taken traffic before: becoming eligible again is a recovery, which slow start ramps.
    pub(super) ever_ready: AtomicBool,
    /// Joined after start-up: its first eligibility is ramped too.
    pub(super) joined_late: AtomicBool,
    cut: ArcSwap<CutSignal>,
    /// What a reverse DNS lookup calls it (a container's name in Docker), once known.
    name: ArcSwapOption<String>,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr, weight: u32) -> Backend {
        let weight = weight.max(1);
        Backend {
            addr,
            weight: AtomicU32::new(weight),
            effective: AtomicU32::new(weight * WEIGHT_SCALE),
            stats: BackendStats::default(),
            consecutive_fails: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            health: AtomicU8::new(Health::Unknown as u8),
            state: AtomicU8::new(State::Active as u8),
            generation: AtomicU64::new(0),
            sources: Mutex::new(Vec::new()),
            dns_first_seen_ms: AtomicU64::new(0),
            dns_last_seen_ms: AtomicU64::new(0),
            probes: Mutex::new(VecDeque::with_capacity(PROBE_HISTORY)),
            ramp_since: Mutex::new(None),
            ever_ready: AtomicBool::new(false),
            joined_late: AtomicBool::new(false),
            cut: ArcSwap::from_pointee(CutSignal::default()),
            name: ArcSwapOption::empty(),
        }
    }

    /// Its name, when a reverse lookup gave one.
    pub fn name(&self) -> Option<Arc<String>> {
        self.name.load_full()
    }

    pub(super) fn set_name(&self, name: &str) {
        self.name.store(Some(Arc::new(name.to_string())));
    }

    pub fn active(&self) -> u64 {
        self.stats.active.load(Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    /// The weight the policies use, in [`WEIGHT_SCALE`] units.
    #[inline]
    pub fn eff_weight(&self) -> u32 {
        self.effective.load(Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Relaxed)
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Relaxed))
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Relaxed))
    }

    pub fn sources(&self) -> Vec<Source> {
        lock(&self.sources).clone()
    }

    /// The signal a new session of this backend waits on to be cut.
    pub(crate) fn cut_signal(&self) -> Arc<CutSignal> {
        self.cut.load_full()
    }

    /// Cuts every session that picked this backend so far.
    pub(super) fn cut_sessions(&self, reason: Outcome) {
        let old = self.cut.swap(Arc::new(CutSignal::default()));
        let _ = old.reason.set(reason);
        old.token.cancel();
    }

    /// `Host` for HTTP probes: the DNS name the backend came from, else its address.
    pub(super) fn host_header(&self) -> String {
        lock(&self.sources)
            .iter()
            .find_map(|s| match s {
                Source::Dns(name) => Some(name.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| self.addr.to_string())
    }

    pub(super) fn record_probe(&self, r: ProbeRecord) {
        let mut p = lock(&self.probes);
        if p.len() == PROBE_HISTORY {
            p.pop_front();
        }
        p.push_back(r);
    }

    /// The latest probe results, oldest first.
    pub fn probes(&self) -> Vec<ProbeRecord> {
        lock(&self.probes).iter().cloned().collect()
    }

    pub(super) fn probed_once(&self) -> bool {
        !lock(&self.probes).is_empty()
    }

    /// Everything known about the backend, for the admin API.
    pub fn view(&self) -> BackendView {
        let ms = |a: &AtomicU64| Some(a.load(Relaxed)).filter(|&v| v != 0);
        BackendView {
            address: self.addr,
            name: self.name().map(|n| n.to_string()),
            sources: self.sources(),
            weight: self.weight(),
            effective_weight: self.eff_weight() as f64 / WEIGHT_SCALE as f64,
            health: self.health(),
            state: self.state(),
            ejected: self.is_ejected(),
            active: self.active(),
            total: self.stats.total.load(Relaxed),
            failed: self.stats.failed.load(Relaxed),
            bytes_up: self.stats.bytes_up.load(Relaxed),
            bytes_down: self.stats.bytes_down.load(Relaxed),
            connect_ms_mean: self.stats.connect.mean_ms(),
            dns_first_seen_ms: ms(&self.dns_first_seen_ms),
            dns_last_seen_ms: ms(&self.dns_last_seen_ms),
            probes: self.probes(),
        }
    }
}

impl Candidate for Backend {
    #[inline]
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    #[inline]
    fn weight(&self) -> u32 {
        Backend::weight(self)
    }
    #[inline]
    fn weight_units(&self) -> u32 {
        self.eff_weight()
    }
    #[inline]
    fn active(&self) -> u64 {
        Backend::active(self)
    }
}

/// A point-in-time view of one backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub address: SocketAddr,
    /// Its reverse-DNS name (the container's name in Docker), when known.
    pub name: Option<String>,
    pub sources: Vec<Source>,
    pub weight: u32,
    /// The weight in use now (lower than `weight` during slow start).
    pub effective_weight: f64,
    pub health: Health,
    pub state: State,
    /// Passively ejected after consecutive connect failures.
    pub ejected: bool,
    pub active: u64,
    pub total: u64,
    pub failed: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Mean time of successful connects.
    pub connect_ms_mean: Option<f64>,
    pub dns_first_seen_ms: Option<u64>,
    pub dns_last_seen_ms: Option<u64>,
    /// The latest probe results, oldest first.
    pub probes: Vec<ProbeRecord>,
}

/// Holds one unit of a backend's `active` count; dropping it gives the unit back, whatever path the
/// connection took, so the count returns to 0 however connections end.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    /// Counts a connection unless `cap` are already open (`backends[].max_connections`). Counted
    /// first and taken back when over, so two sessions racing for the last place cannot both win.
    pub(crate) fn within(backend: Arc<Backend>, cap: Option<u64>) -> Option<ActiveGuard> {
        let prev = backend.stats.active.fetch_add(1, Relaxed);
        if cap.is_some_and(|c| prev >= c) {
            backend.stats.active.fetch_sub(1, Relaxed);
            return None;
        }
        Some(ActiveGuard(backend))
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_guard_counts_and_returns() {
        let b = Arc::new(Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)), 1));
        let g1 = ActiveGuard::within(b.clone(), None).unwrap();
        let g2 = ActiveGuard::within(b.clone(), None).unwrap();
        assert_eq!(b.active(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let (c, sum, n) = h.cumulative();
        assert_eq!(n, 3);
        assert_eq!(c[0], 1); // ≤ 0.5 ms
        assert_eq!(c[3], 2); // ≤ 5 ms
        assert_eq!(*c.last().unwrap(), 3);
        assert!((sum - 10.0033).abs() < 1e-6);
    }
}
