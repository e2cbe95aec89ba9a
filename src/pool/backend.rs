//! One upstream address and everything known about it: weight, health, state, counters, the latest
//! probes, and the signal that cuts its sessions. Counters live as long as the backend does, so
//! rebuilding snapshots, reconciling sources or reloading never resets them.
//!
//! A backend owns its state machine. Its fields are private; the pool changes them only through the
//! transitions below, each of which says what flipped (so the pool logs, streams and rebuilds only on
//! a change), and the invariants live here, not in the pool's control flow:
//!
//! ```text
//!            join ──▶ Active ◀──set_state──▶ Draining, Maint (probes paused)
//!              ▲        │ depart              │ depart
//!              │        ▼                     ▼
//!              └──── Removed (sessions drain; timers carry the generation they were started in)
//!
//! eligible = Active ∧ ¬ejected ∧ (no probes ∨ Healthy) ∧ the agent says nothing against it
//!   health: observe_health (Unknown → Healthy/Unhealthy …), forget_health (probes turned off)
//!   ejected: connect_failed (the streak reaches max_fails) ⇄ reinstate (after the cool-down, on probation)
//!   agent: observe_agent (up, down, drain, maint, and a weight share)
//!   effective weight: ramp (slow start) of the agent's share of the weight, each time a snapshot is built
//! ```
//!
//! Its tier (lower first) and rank (its place among the claims) decide, with the other members'
//! eligibility, whether its tier serves (`tiers.rs`).
//!
//! A backend that (re)joins gets a new generation, unknown health, `Active`, its sources and weight,
//! all in [`Backend::join`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::membership::Source;
use super::slow_start::Ramp;
use crate::balance::Candidate;
use crate::config::Weight;
use crate::health::{AgentSays, Health, ProbeRecord, PROBE_HISTORY};
use crate::outcome::Outcome;
use crate::util::{lock, AtomicEnum};

/// Effective weights are kept in tenths of a configured weight, so slow start can ramp even a weight
/// of 1 in steps: a full-weight backend has `weight * WEIGHT_SCALE`.
pub const WEIGHT_SCALE: u32 = 10;

crate::util::byte_enum! {
    /// Whether a backend is a member taking new connections.
    pub enum State {
        /// A member; takes new connections when healthy and not ejected.
        Active = 0 => "active",
        /// A member that takes no new connections; its sessions go on (admin drain).
        Draining = 1 => "draining",
        /// No longer claimed by any source; kept only while sessions remain (`on_removed`).
        Removed = 2 => "removed",
        /// Under maintenance (admin API): no new connections, probes paused; its sessions go on.
        Maint = 3 => "maint",
    }
}

/// Lets a backend's live sessions be cut (health `on_down: close`, `on_removed`): sessions wait on the
/// signal current when they picked the backend; cutting replaces it, so later sessions are unaffected.
#[derive(Default)]
pub(crate) struct CutSignal {
    token: CancellationToken,
    reason: OnceLock<Outcome>,
    /// Called once the cut is made, for loops that look ([`CutSignal::fired`]) rather than wait:
    /// the ring workers, told to look at once instead of on their next tick.
    wake: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for CutSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutSignal")
            .field("fired", &self.fired())
            .field("wakes", &self.wake.get().is_some())
            .finish()
    }
}

impl CutSignal {
    /// Whether the backend's sessions are cut, and why: for a loop that looks instead of waiting
    /// (the ring workers, on [`CutSignal::wake_with`]'s call or their tick).
    pub(crate) fn fired(&self) -> Option<Outcome> {
        self.token.is_cancelled().then(|| self.reason())
    }

    /// Has the cut call what `wake` gives (made on the first call only: one process has one set
    /// of ring workers, which all callers are), so the loops that look see the cut at once. A cut
    /// racing the first call may find nothing to call: the caller looks at the signal after this
    /// returns (the ring, as the connection connects or arrives), and the token's lock orders that
    /// look and the cut, so one of the two sees the other.
    pub(crate) fn wake_with(&self, wake: impl FnOnce() -> Arc<dyn Fn() + Send + Sync>) {
        self.wake.get_or_init(wake);
    }

    /// Completes when the backend's sessions are cut, with the reason for their routing lines.
    #[cfg(test)]
    pub(crate) async fn cut(&self) -> Outcome {
        self.cancelled().await;
        self.reason()
    }

    /// Completes when the backend's sessions are cut; [`CutSignal::reason`] then says why. A
    /// session polls this beside the drain's deadline, in every connection's task, where an async
    /// fn waiting on it would keep room for it twice.
    pub(crate) fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Why the backend's sessions were cut, once they were.
    pub(crate) fn reason(&self) -> Outcome {
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

/// A backend's counters. Written only through its methods and [`Backend`]'s transitions, each
/// named for the event it counts; the byte counters are lent to a relay while it moves bytes
/// ([`BackendStats::live`]), since they count as bytes move, not when a connection ends.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections counted from the start of their connect (least-connections relies on that).
    /// Written only by [`ActiveGuard`]; read with [`Backend::active`].
    active: AtomicU64,
    /// Connections established to this backend.
    total: AtomicU64,
    /// Connect attempts that failed (timeout, refused, reset).
    failed: AtomicU64,
    /// Bytes forwarded client → backend, counted as they move.
    bytes_up: AtomicU64,
    /// Bytes forwarded backend → client, counted as they move.
    bytes_down: AtomicU64,
    /// Time of successful connects.
    connect: Histogram,
}

impl BackendStats {
    /// A connect to the backend succeeded after `took`.
    pub(crate) fn connected(&self, took: std::time::Duration) {
        self.connect.observe(took);
    }

    /// Bytes moved to the backend (`up`) and from it (`down`), by an engine that counts them
    /// itself (the ring workers).
    pub(crate) fn moved(&self, up: u64, down: u64) {
        self.bytes_up.fetch_add(up, Relaxed);
        self.bytes_down.fetch_add(down, Relaxed);
    }

    /// The byte counters, lent to a tokio relay that counts each write as it happens.
    pub(crate) fn live(&self) -> crate::relay::LiveCounters<'_> {
        crate::relay::LiveCounters {
            up: &self.bytes_up,
            down: &self.bytes_down,
            conn: None,
        }
    }

    /// Connections established so far.
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Connect attempts that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    /// Bytes moved so far: client → backend, and back.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_up.load(Relaxed), self.bytes_down.load(Relaxed))
    }

    /// Successful connects' times: bucket counts, their sum in seconds, and how many.
    pub(crate) fn connect_times(&self) -> (Vec<u64>, f64, u64) {
        self.connect.cumulative()
    }

    /// Every total by name, for an upgrade to carry into the new process ([`BackendStats::add`]).
    pub(crate) fn totals(&self) -> std::collections::BTreeMap<String, u64> {
        self.counters()
            .map(|(k, c)| (k.to_string(), c.load(Relaxed)))
            .collect()
    }

    /// Adds totals another process counted; names this build does not know are skipped.
    pub(crate) fn add(&self, totals: &std::collections::BTreeMap<String, u64>) {
        for (k, c) in self.counters() {
            if let Some(v) = totals.get(k) {
                c.fetch_add(*v, Relaxed);
            }
        }
    }

    fn counters(&self) -> impl Iterator<Item = (&'static str, &AtomicU64)> {
        [
            ("total", &self.total),
            ("failed", &self.failed),
            ("bytes_up", &self.bytes_up),
            ("bytes_down", &self.bytes_down),
        ]
        .into_iter()
    }
}

/// One upstream address and everything known about it.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Configured weight.
    weight: AtomicU32,
    /// Its tier: lower first.
    tier: AtomicU32,
    /// Its place among the claims (a one-at-a-time backup tier serves the first).
    rank: AtomicU32,
    /// What its agent last said (`Unknown` without an agent), and its share of the weight in percent.
    agent: AtomicEnum<AgentSays>,
    agent_pct: AtomicU32,
    /// Weight the policies use, in `WEIGHT_SCALE` units; below full only during slow start.
    effective: AtomicU32,
    pub stats: BackendStats,
    /// Consecutive connect failures; reset by a successful connect.
    consecutive_fails: AtomicU32,
    /// Passive ejection: no new connections until the cool-down ends.
    ejected: AtomicBool,
    health: AtomicEnum<Health>,
    state: AtomicEnum<State>,
    /// Bumped whenever the backend leaves or rejoins, so timers of an earlier departure do nothing.
    generation: AtomicU64,
    /// Read on the hot path (per-backend caps by DNS name): swapped, never locked.
    sources: ArcSwap<Vec<Source>>,
    /// Unix ms of the first and latest DNS answer that listed this backend; 0 = never.
    dns_first_seen_ms: AtomicU64,
    dns_last_seen_ms: AtomicU64,
    probes: Mutex<VecDeque<ProbeRecord>>,
    ramp: Mutex<Ramp>,
    cut: ArcSwap<CutSignal>,
    /// What a reverse DNS lookup calls it (a container's name in Docker), once known.
    name: ArcSwapOption<String>,
    /// The DNS name it was found under (without a port), when it was.
    host: ArcSwapOption<String>,
    agent_history: Mutex<VecDeque<ProbeRecord>>,
}

impl Backend {
    pub(crate) fn new(addr: SocketAddr, weight: Weight) -> Backend {
        let weight = weight.get();
        Backend {
            addr,
            weight: AtomicU32::new(weight),
            tier: AtomicU32::new(0),
            rank: AtomicU32::new(0),
            agent: AtomicEnum::new(AgentSays::Unknown),
            agent_pct: AtomicU32::new(100),
            effective: AtomicU32::new(weight * WEIGHT_SCALE),
            stats: BackendStats::default(),
            consecutive_fails: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            health: AtomicEnum::new(Health::Unknown),
            state: AtomicEnum::new(State::Active),
            generation: AtomicU64::new(0),
            sources: ArcSwap::from_pointee(Vec::new()),
            dns_first_seen_ms: AtomicU64::new(0),
            dns_last_seen_ms: AtomicU64::new(0),
            probes: Mutex::new(VecDeque::with_capacity(PROBE_HISTORY)),
            ramp: Mutex::new(Ramp::default()),
            cut: ArcSwap::from_pointee(CutSignal::default()),
            name: ArcSwapOption::empty(),
            host: ArcSwapOption::empty(),
            agent_history: Mutex::new(VecDeque::with_capacity(PROBE_HISTORY)),
        }
    }

    // --- What anyone may read.

    /// Its name, when a reverse lookup gave one.
    pub fn name(&self) -> Option<Arc<String>> {
        self.name.load_full()
    }

    pub fn active(&self) -> u64 {
        self.stats.active.load(Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    /// Its tier: lower first.
    pub fn tier(&self) -> u32 {
        self.tier.load(Relaxed)
    }

    pub(super) fn rank(&self) -> u32 {
        self.rank.load(Relaxed)
    }

    /// What its agent last said, and its share of the weight in percent.
    pub fn agent(&self) -> (AgentSays, u32) {
        (self.agent.load(), self.agent_pct.load(Relaxed))
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
        self.health.load()
    }

    pub fn state(&self) -> State {
        self.state.load()
    }

    pub fn sources(&self) -> Arc<Vec<Source>> {
        self.sources.load_full()
    }

    /// The latest probe results, oldest first.
    pub fn probes(&self) -> Vec<ProbeRecord> {
        lock(&self.probes).iter().cloned().collect()
    }

    /// Whether it may take new connections now, given whether its pool probes its backends.
    pub(super) fn eligible(&self, probed: bool) -> bool {
        self.state() == State::Active
            && !self.is_ejected()
            && (!probed || self.health() == Health::Healthy)
            && self.agent.load().allows()
            && self.agent_pct.load(Relaxed) > 0
    }

    /// The signal a new session of this backend waits on to be cut.
    pub(crate) fn cut_signal(&self) -> Arc<CutSignal> {
        self.cut.load_full()
    }

    // --- Membership: the pool's transitions, under its lock.

    /// (Re)joins the members as its sources claim it: a new generation (timers of an earlier
    /// departure do nothing), unknown health, nothing heard from its agent, `Active`. `late` when
    /// start-up is over (slow start ramps its first eligibility).
    pub(super) fn join(&self, claim: Claim, late: bool) {
        self.generation.fetch_add(1, Relaxed);
        self.claim(claim);
        self.health.swap(Health::Unknown);
        self.agent.swap(AgentSays::Unknown);
        self.agent_pct.store(100, Relaxed);
        self.state.swap(State::Active);
        lock(&self.ramp).joined(late);
    }

    /// Its sources' claim, kept: returns what changed of its weight and tier.
    pub(super) fn claim(&self, claim: Claim) -> Reclaimed {
        self.sources.store(Arc::new(claim.sources));
        self.rank.store(claim.rank, Relaxed);
        if self.host.load().as_deref().map(String::as_str) != claim.host.as_deref() {
            self.host.store(claim.host.map(|h| Arc::new(h.to_string())));
        }
        Reclaimed {
            weight: self.weight.swap(claim.weight.get(), Relaxed) != claim.weight.get(),
            tier: self.tier.swap(claim.tier, Relaxed) != claim.tier,
        }
    }

    /// Leaves the members: `Removed` (its sessions drain as the pool says). Returns the generation a
    /// drain deadline must still find for it to apply ([`Backend::same_generation`]).
    pub(super) fn depart(&self) -> u64 {
        self.state.swap(State::Removed);
        self.generation.fetch_add(1, Relaxed) + 1
    }

    /// Whether nothing has left or rejoined since `generation` was handed out.
    pub(super) fn same_generation(&self, generation: u64) -> bool {
        self.generation.load(Relaxed) == generation
    }

    /// The admin API sets a member `Active`, `Draining` or `Maint`; returns whether that flipped it.
    pub(super) fn set_state(&self, state: State) -> bool {
        self.state.swap(state) != state
    }

    // --- Agent.

    /// Its agent answered: returns what it said before, if that is a change.
    pub(super) fn observe_agent(
        &self,
        says: AgentSays,
        pct: Option<u32>,
    ) -> Option<(AgentSays, u32)> {
        let was = (
            self.agent.swap(says),
            match pct {
                Some(p) => self.agent_pct.swap(p, Relaxed),
                None => self.agent_pct.load(Relaxed),
            },
        );
        (was != (says, pct.unwrap_or(was.1))).then_some(was)
    }

    pub(super) fn record_agent(&self, r: ProbeRecord) {
        let mut p = lock(&self.agent_history);
        if p.len() == PROBE_HISTORY {
            p.pop_front();
        }
        p.push_back(r);
    }

    // --- Health.

    /// A probe verdict changed its health: returns what it was, if that is a change.
    pub(super) fn observe_health(&self, health: Health) -> Option<Health> {
        let was = self.health.swap(health);
        (was != health).then_some(was)
    }

    /// Probes were turned off: health is unknown again. Returns what it was, if that is a change.
    pub(super) fn forget_health(&self) -> Option<Health> {
        self.observe_health(Health::Unknown)
    }

    pub(super) fn record_probe(&self, r: ProbeRecord) {
        let mut p = lock(&self.probes);
        if p.len() == PROBE_HISTORY {
            p.pop_front();
        }
        p.push_back(r);
    }

    pub(super) fn probed_once(&self) -> bool {
        !lock(&self.probes).is_empty()
    }

    /// The DNS name (without its port) the backend was found under, if it was: the name its TLS
    /// certificate is expected to carry.
    pub fn dns_name(&self) -> Option<String> {
        self.host.load().as_deref().cloned()
    }

    /// `Host` for HTTP probes: the DNS name the backend came from with its port, else its address.
    pub(super) fn host_header(&self) -> String {
        match self.host.load().as_deref() {
            Some(h) => format!("{h}:{}", self.addr.port()),
            None => self.addr.to_string(),
        }
    }

    // --- Passive health: on the data plane, lock-free.

    /// A connect succeeded: counted, and a failure streak cleared. Writes shared state only when there
    /// was a streak, so the common path stays a read.
    pub(super) fn connect_succeeded(&self) {
        self.stats.total.fetch_add(1, Relaxed);
        if self.consecutive_fails.load(Relaxed) != 0 {
            self.consecutive_fails.store(0, Relaxed);
        }
    }

    /// A UDP session opened: counted, the streak left as it is.
    pub(super) fn session_opened(&self) {
        self.stats.total.fetch_add(1, Relaxed);
    }

    /// A UDP backend answered: a failure streak cleared (the common path stays a read).
    pub(super) fn answered(&self) {
        if self.consecutive_fails.load(Relaxed) != 0 {
            self.consecutive_fails.store(0, Relaxed);
        }
    }

    /// A connect failed: counted; when the streak reaches `max_fails` (0: never) this ejects it.
    /// Returns the streak when this very call ejected it (a concurrent failure that also reached it
    /// returns `None`).
    pub(super) fn connect_failed(&self, max_fails: u32) -> Option<u32> {
        self.stats.failed.fetch_add(1, Relaxed);
        let fails = self.consecutive_fails.fetch_add(1, Relaxed) + 1;
        if max_fails == 0 || fails < max_fails || self.ejected.swap(true, Relaxed) {
            return None;
        }
        Some(fails)
    }

    /// Ends an ejection, on probation: one more failure ejects it again, so a backend that is still
    /// dead costs one connect attempt per cool-down, not `max_fails`. Returns whether it was ejected.
    pub(super) fn reinstate(&self, max_fails: u32) -> bool {
        self.consecutive_fails
            .store(max_fails.saturating_sub(1), Relaxed);
        self.ejected.swap(false, Relaxed)
    }

    // --- Slow start, when a snapshot is built.

    /// Sets the weight the policies use for an eligible backend (`newly` eligible or not): its
    /// agent's share of its weight, ramped over `window` after a recovery. Returns whether it is
    /// still ramping.
    pub(super) fn ramp(&self, newly: bool, window: Duration, now: Instant) -> bool {
        let full = self.weight() * WEIGHT_SCALE;
        let share = (u64::from(full) * u64::from(self.agent_pct.load(Relaxed)) / 100).max(1);
        let share = share.min(u64::from(crate::config::MAX_WEIGHT * WEIGHT_SCALE)) as u32;
        let (effective, ramping) = lock(&self.ramp).step(share, newly, window, now);
        self.effective.store(effective, Relaxed);
        ramping
    }

    pub(super) fn ramping(&self) -> bool {
        lock(&self.ramp).ramping()
    }

    // --- Naming and sessions.

    pub(super) fn set_name(&self, name: &str) {
        self.name.store(Some(Arc::new(name.to_string())));
    }

    /// A DNS answer listed it at `now_ms`.
    pub(super) fn seen_in_dns(&self, now_ms: u64) {
        let _ = self
            .dns_first_seen_ms
            .compare_exchange(0, now_ms, Relaxed, Relaxed);
        self.dns_last_seen_ms.store(now_ms, Relaxed);
    }

    /// Cuts every session that picked this backend so far.
    pub(super) fn cut_sessions(&self, reason: Outcome) {
        let old = self.cut.swap(Arc::new(CutSignal::default()));
        let _ = old.reason.set(reason);
        old.token.cancel();
        if let Some(wake) = old.wake.get() {
            wake();
        }
    }

    /// Everything known about the backend, for the admin API.
    pub fn view(&self) -> BackendView {
        let ms = |a: &AtomicU64| Some(a.load(Relaxed)).filter(|&v| v != 0);
        BackendView {
            address: self.addr,
            name: self.name().map(|n| n.to_string()),
            sources: self.sources().to_vec(),
            weight: self.weight(),
            effective_weight: self.eff_weight() as f64 / WEIGHT_SCALE as f64,
            tier: self.tier(),
            health: self.health(),
            state: self.state(),
            agent: self.agent_view(),
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

    /// What its agent said, when it has one that answered.
    fn agent_view(&self) -> Option<AgentView> {
        let history: Vec<ProbeRecord> = lock(&self.agent_history).iter().cloned().collect();
        (!history.is_empty()).then(|| {
            let (says, weight_pct) = self.agent();
            AgentView {
                says,
                weight_pct,
                history,
            }
        })
    }
}

/// What a member's sources claim for it, as the pool hands it over.
#[derive(Debug)]
pub(super) struct Claim {
    pub(super) weight: Weight,
    pub(super) tier: u32,
    pub(super) rank: u32,
    pub(super) host: Option<Arc<str>>,
    pub(super) sources: Vec<Source>,
}

/// What a claim changed of a kept member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reclaimed {
    pub(super) weight: bool,
    pub(super) tier: bool,
}

/// What a backend's agent says, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub says: AgentSays,
    /// Its share of the configured weight.
    pub weight_pct: u32,
    /// The latest answers (or failures to get one), oldest first.
    pub history: Vec<ProbeRecord>,
}

impl From<super::membership::Desired> for Claim {
    fn from(d: super::membership::Desired) -> Claim {
        Claim {
            weight: d.weight,
            tier: d.tier,
            rank: d.rank,
            host: d.host,
            sources: d.sources,
        }
    }
}

impl From<(Weight, Vec<Source>)> for Claim {
    fn from((weight, sources): (Weight, Vec<Source>)) -> Claim {
        Claim {
            weight,
            tier: 0,
            rank: 0,
            host: None,
            sources,
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
    #[inline]
    fn available(&self) -> bool {
        !self.is_ejected()
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
    /// The weight in use now (lower than `weight` during slow start or when its agent says so).
    pub effective_weight: f64,
    /// Its tier: lower first (0 unless `backup` or `priority`).
    pub tier: u32,
    pub health: Health,
    pub state: State,
    /// What its agent says (`agent:`), once it answered or failed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentView>,
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

impl ActiveGuard {
    /// The backend it counts on.
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.0
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
        let b = Arc::new(Backend::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            Weight::ONE,
        ));
        let g1 = ActiveGuard::within(b.clone(), None).unwrap();
        let g2 = ActiveGuard::within(b.clone(), None).unwrap();
        assert_eq!(b.active(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }

    /// A cut calls what its signal was given to wake (the ring workers), once, with the reason
    /// already readable; the signal that replaces it starts with nothing to wake.
    #[test]
    fn a_cut_wakes_what_its_signal_was_given() {
        let b = Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)), Weight::ONE);
        let signal = b.cut_signal();
        let woken = Arc::new(Mutex::new(Vec::new()));
        let (w, s) = (woken.clone(), Arc::downgrade(&signal));
        signal.wake_with(move || {
            Arc::new(move || lock(&w).push(s.upgrade().and_then(|s| s.fired())))
        });
        signal.wake_with(|| panic!("made again: the first call's stays"));
        b.cut_sessions(Outcome::BackendDown);
        assert_eq!(*lock(&woken), [Some(Outcome::BackendDown)]);
        b.cut_sessions(Outcome::BackendRemoved);
        assert_eq!(lock(&woken).len(), 1, "the next signal wakes nothing");
        assert_eq!(b.cut_signal().fired(), None);
    }

    #[test]
    fn transitions_say_what_flipped() {
        let b = Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)), Weight::ONE);
        b.join(
            (Weight::new(2).unwrap(), vec![Source::Static]).into(),
            false,
        );
        assert!(
            b.eligible(false) && !b.eligible(true),
            "unknown health: only without probes"
        );
        assert_eq!(b.observe_health(Health::Healthy), Some(Health::Unknown));
        assert_eq!(
            b.observe_health(Health::Healthy),
            None,
            "no change, no transition"
        );
        assert!(b.eligible(true));
        assert!(b.set_state(State::Draining) && !b.set_state(State::Draining));
        assert!(!b.eligible(false));
        assert!(b.set_state(State::Active));
        assert!(
            !b.claim((Weight::new(2).unwrap(), vec![Source::Static]).into())
                .weight
                && b.claim((Weight::new(3).unwrap(), vec![Source::Api]).into())
                    .weight
        );
        // The agent: down, drain or a 0 % share take it out; up and a share bring it back.
        assert_eq!(
            b.observe_agent(AgentSays::Up, None),
            Some((AgentSays::Unknown, 100))
        );
        assert_eq!(b.observe_agent(AgentSays::Up, Some(100)), None, "no change");
        assert!(b.observe_agent(AgentSays::Down, None).is_some() && !b.eligible(false));
        b.observe_agent(AgentSays::Up, Some(0));
        assert!(!b.eligible(false), "a 0 % share is a drain");
        b.observe_agent(AgentSays::Up, Some(50));
        assert!(b.eligible(false));
        b.ramp(false, Duration::ZERO, Instant::now());
        assert_eq!(b.eff_weight(), 3 * WEIGHT_SCALE / 2, "half of weight 3");
        assert!(b.set_state(State::Maint) && !b.eligible(false));
        b.set_state(State::Active);
        // Ejection: the streak, the one call that ejects, probation after the cool-down.
        assert_eq!(b.connect_failed(3), None);
        assert_eq!(b.connect_failed(3), None);
        assert_eq!(b.connect_failed(3), Some(3));
        assert_eq!(b.connect_failed(3), None, "already ejected");
        assert!(!b.eligible(false));
        assert!(b.reinstate(3) && !b.reinstate(3));
        assert_eq!(
            b.connect_failed(3),
            Some(3),
            "on probation: one failure ejects"
        );
        b.reinstate(3);
        b.connect_succeeded();
        assert_eq!(b.connect_failed(3), None, "a success clears the streak");
        assert_eq!(b.connect_failed(0), None, "max_fails 0 never ejects");
        // Leaving and rejoining: a new generation, health unknown again, active.
        let g = b.depart();
        assert!(b.same_generation(g) && b.state() == State::Removed);
        b.join((Weight::new(1).unwrap(), vec![Source::Static]).into(), true);
        assert!(
            !b.same_generation(g),
            "a drain deadline of the departure does nothing now"
        );
        assert_eq!((b.health(), b.state()), (Health::Unknown, State::Active));
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
