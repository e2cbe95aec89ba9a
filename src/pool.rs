//! A service's backends: membership by diff, eligibility, counters, and the snapshot the hot path reads.
//!
//! The hot path (select → connect) loads one [`Snapshot`] through `ArcSwap` and touches only per-backend
//! atomics. Everything that changes who is eligible (discovery, probes, passive ejection, slow start)
//! builds a new snapshot off the hot path under the pool's mutex, and only when something changed.
//!
//! Membership: every source (static config, each DNS name, the admin API) claims a set of addresses;
//! [`Pool::reconcile`] replaces one source's claim and applies the difference of the union: added
//! backends are created (or revived, with their counters, if they left recently), removed ones follow
//! `on_removed`, kept ones keep their counters and sessions. Each change is logged once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balance::Selector;
use crate::config::{OnDown, OnRemoved, Policy};
use crate::events::EventBus;
use crate::health::{self, Health, ProbeError, ProbeRecord, ProbeSpec, PROBE_HISTORY};
use crate::metrics::Histogram;
use crate::relay::End;

/// Effective weights are kept in tenths of a configured weight, so slow start can ramp even a weight
/// of 1 in steps: a full-weight backend has `weight * WEIGHT_SCALE`.
pub const WEIGHT_SCALE: u32 = 10;

/// Where a backend came from. A backend claimed by several sources stays while any claims it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Static,
    /// A DNS name with its port, as written in the config (`backend:5000`).
    Dns(Arc<str>),
    Api,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Static => f.write_str("static"),
            Source::Dns(name) => write!(f, "dns:{name}"),
            Source::Api => f.write_str("api"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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
pub struct CutSignal {
    token: CancellationToken,
    reason: OnceLock<End>,
}

impl CutSignal {
    /// Completes when the backend's sessions are cut, with the reason for their routing lines.
    pub async fn cut(&self) -> End {
        self.token.cancelled().await;
        self.reason.get().copied().unwrap_or(End::BackendRemoved)
    }
}

/// One upstream address and everything known about it. Counters live as long as the backend does, so
/// rebuilding snapshots or reconciling never resets them.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Configured weight.
    weight: AtomicU32,
    /// Weight the policies use, in `WEIGHT_SCALE` units; below full only during slow start.
    effective: AtomicU32,
    pub stats: BackendStats,
    /// Consecutive connect failures; reset by a successful connect.
    consecutive_fails: AtomicU32,
    /// Passive ejection: no new connections until the cool-down ends.
    ejected: AtomicBool,
    health: AtomicU8,
    state: AtomicU8,
    /// Bumped whenever the backend leaves or rejoins, so timers of an earlier departure do nothing.
    generation: AtomicU64,
    sources: Mutex<Vec<Source>>,
    /// Unix ms of the first and latest DNS answer that listed this backend; 0 = never.
    dns_first_seen_ms: AtomicU64,
    dns_last_seen_ms: AtomicU64,
    probes: Mutex<std::collections::VecDeque<ProbeRecord>>,
    /// When the current slow-start ramp began.
    ramp_since: Mutex<Option<Instant>>,
    /// Has taken traffic before: becoming eligible again is a recovery, which slow start ramps.
    ever_ready: AtomicBool,
    /// Joined after start-up: its first eligibility is ramped too.
    joined_late: AtomicBool,
    cut: ArcSwap<CutSignal>,
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

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32) -> Backend {
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
            probes: Mutex::new(std::collections::VecDeque::with_capacity(PROBE_HISTORY)),
            ramp_since: Mutex::new(None),
            ever_ready: AtomicBool::new(false),
            joined_late: AtomicBool::new(false),
            cut: ArcSwap::from_pointee(CutSignal::default()),
        }
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
    pub fn cut_signal(&self) -> Arc<CutSignal> {
        self.cut.load_full()
    }

    /// Cuts every session that picked this backend so far.
    fn cut_sessions(&self, reason: End) {
        let old = self.cut.swap(Arc::new(CutSignal::default()));
        let _ = old.reason.set(reason);
        old.token.cancel();
    }

    /// `Host` for HTTP probes: the DNS name the backend came from, else its address.
    pub fn host_header(&self) -> String {
        lock(&self.sources)
            .iter()
            .find_map(|s| match s {
                Source::Dns(name) => Some(name.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| self.addr.to_string())
    }

    pub fn record_probe(&self, r: ProbeRecord) {
        let mut p = lock(&self.probes);
        if p.len() == PROBE_HISTORY {
            p.pop_front();
        }
        p.push_back(r);
    }

    pub fn probes(&self) -> Vec<ProbeRecord> {
        lock(&self.probes).iter().cloned().collect()
    }

    fn probed_once(&self) -> bool {
        !lock(&self.probes).is_empty()
    }

    /// Everything known about the backend, for the admin API.
    pub fn view(&self) -> BackendView {
        let ms = |a: &AtomicU64| Some(a.load(Relaxed)).filter(|&v| v != 0);
        BackendView {
            address: self.addr,
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

/// A point-in-time view of one backend.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub address: SocketAddr,
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
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn new(backend: Arc<Backend>) -> ActiveGuard {
        backend.stats.active.fetch_add(1, Relaxed);
        ActiveGuard(backend)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Relaxed);
    }
}

/// What the hot path sees: the backends eligible for new connections and the policy state built for them.
pub struct Snapshot {
    pub ready: Vec<Arc<Backend>>,
    selector: Selector,
}

impl Snapshot {
    /// Picks a ready backend for `client`, never one whose address is in `avoid` (already tried).
    pub fn pick(&self, client: SocketAddr, avoid: &[SocketAddr]) -> Option<&Arc<Backend>> {
        self.selector
            .pick(&self.ready, client, avoid)
            .map(|i| &self.ready[i])
    }
}

/// Passive-ejection settings of a pool.
#[derive(Debug, Clone, Copy)]
pub struct Passive {
    /// Consecutive connect failures that eject; 0 disables ejection.
    pub max_fails: u32,
    pub cooldown: Duration,
}

/// How a pool treats its backends; from the service's config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub policy: Policy,
    pub passive: Passive,
    /// Active probes; `None` = every member is eligible without probing.
    pub probes: Option<Arc<ProbeSpec>>,
    pub on_down: OnDown,
    pub on_removed: OnRemoved,
    /// How long the sessions of a removed backend may run with `on_removed: drain`.
    pub removed_drain: Duration,
    pub slow_start: Duration,
}

impl PoolSettings {
    /// Plain settings: a policy, passive ejection, nothing else.
    pub fn basic(policy: Policy, passive: Passive) -> PoolSettings {
        PoolSettings {
            policy,
            passive,
            probes: None,
            on_down: OnDown::Keep,
            on_removed: OnRemoved::Drain,
            removed_drain: Duration::from_secs(30),
            slow_start: Duration::ZERO,
        }
    }
}

/// A change of a backend's eligibility, returned so callers log and count it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Ejected,
    Returned,
}

/// Why an admin operation on a pool was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("{0} is already a backend of this service")]
    Exists(SocketAddr),
    #[error("{0} is not a backend of this service")]
    NotFound(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

/// One membership change made by [`Pool::reconcile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(SocketAddr),
    Removed(SocketAddr),
    Reweighted(SocketAddr, u32),
}

pub struct Pool {
    service: Arc<str>,
    /// Replaced as a whole on reload.
    settings: ArcSwap<PoolSettings>,
    events: EventBus,
    inner: Mutex<Inner>,
    snapshot: ArcSwap<Snapshot>,
    /// Woken after every probe, for the start-up wait.
    probed: Notify,
    /// Per DNS name, a nudge that asks its watcher for an early (rate-capped) refresh.
    dns_nudges: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
}

struct Inner {
    members: Vec<Arc<Backend>>,
    claims: BTreeMap<Source, Vec<(SocketAddr, u32)>>,
    /// Removed backends, with when they left: kept while sessions run, and for [`REMEMBER_REMOVED`]
    /// so one that comes back (a container restarted with its old address) keeps its counters.
    departed: Vec<(Arc<Backend>, Instant)>,
    /// Set by `start`: background tasks (probes, timers) run under it.
    background: Option<CancellationToken>,
    /// The probe loop of each member, by address.
    probe_tasks: HashMap<SocketAddr, CancellationToken>,
    ramp_task: bool,
    /// Start-up is over: backends added from now on are new arrivals (slow start ramps them).
    warm: bool,
    /// The `Arc` this pool lives in, set by `start`, for the tasks it spawns.
    me: Weak<Pool>,
    /// The data plane's runtime, set by `start`: the admin API calls in from another one.
    rt: Option<tokio::runtime::Handle>,
    /// Addresses removed through the admin API: no source brings them back until re-added there.
    excluded: std::collections::HashSet<SocketAddr>,
    /// Weights set through the admin API, over what the sources say.
    weight_overrides: HashMap<SocketAddr, u32>,
}

impl Inner {
    fn me(&self) -> Option<Arc<Pool>> {
        self.me.upgrade()
    }

    /// Spawns `fut` on the data plane's runtime (once started).
    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.rt {
            rt.spawn(fut);
        }
    }

    /// Drops removed backends without sessions that left long ago, or beyond the most recent
    /// [`MAX_REMEMBERED`], so address churn cannot grow the pool.
    fn forget_departed(&mut self) {
        let now = Instant::now();
        self.departed
            .retain(|(b, at)| b.active() > 0 || now.duration_since(*at) < REMEMBER_REMOVED);
        let mut idle = self
            .departed
            .iter()
            .filter(|(b, _)| b.active() == 0)
            .count();
        if idle > MAX_REMEMBERED {
            // Oldest first, as pushed.
            self.departed.retain(|(b, _)| {
                if idle > MAX_REMEMBERED && b.active() == 0 {
                    idle -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

/// How long a removed backend without sessions is remembered.
const REMEMBER_REMOVED: Duration = Duration::from_secs(600);
/// At most this many removed backends without sessions are remembered.
const MAX_REMEMBERED: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Pool {
    pub fn new(service: Arc<str>, settings: PoolSettings, events: EventBus) -> Pool {
        let selector = Selector::new(settings.policy, &[]);
        Pool {
            service,
            settings: ArcSwap::from_pointee(settings),
            events,
            inner: Mutex::new(Inner {
                members: Vec::new(),
                claims: BTreeMap::new(),
                departed: Vec::new(),
                background: None,
                probe_tasks: HashMap::new(),
                ramp_task: false,
                warm: false,
                me: Weak::new(),
                rt: None,
                excluded: Default::default(),
                weight_overrides: HashMap::new(),
            }),
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                selector,
            }),
            probed: Notify::new(),
            dns_nudges: Mutex::new(HashMap::new()),
        }
    }

    /// A pool with these static members (no probes, no discovery): for tests and simple setups.
    pub fn with_members(
        service: Arc<str>,
        policy: Policy,
        passive: Passive,
        members: &[(SocketAddr, u32)],
    ) -> Pool {
        let pool = Pool::new(
            service,
            PoolSettings::basic(policy, passive),
            EventBus::default(),
        );
        pool.reconcile(Source::Static, members.to_vec());
        pool
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// The current members (not the removed ones still draining).
    pub fn members(&self) -> Vec<Arc<Backend>> {
        lock(&self.inner).members.clone()
    }

    /// Members and removed backends that still have sessions.
    pub fn all_backends(&self) -> Vec<Arc<Backend>> {
        let mut inner = lock(&self.inner);
        inner.forget_departed();
        let mut all = inner.members.clone();
        all.extend(
            inner
                .departed
                .iter()
                .filter(|(b, _)| b.active() > 0)
                .map(|(b, _)| b.clone()),
        );
        all
    }

    pub fn member(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        lock(&self.inner)
            .members
            .iter()
            .find(|b| b.addr == addr)
            .cloned()
    }

    pub fn policy(&self) -> Policy {
        self.settings().policy
    }

    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Starts the pool's background work (probes, timers) under `background`; members added later get
    /// their probes at once.
    pub fn start(self: &Arc<Pool>, background: CancellationToken) {
        let mut inner = lock(&self.inner);
        inner.background = Some(background);
        inner.me = Arc::downgrade(self);
        inner.rt = Some(tokio::runtime::Handle::current());
        let members = inner.members.clone();
        for b in &members {
            self.spawn_probes(&mut inner, b);
        }
    }

    /// Marks the end of start-up: from now on a backend that joins is ramped by slow start.
    pub fn warmed_up(&self) {
        lock(&self.inner).warm = true;
    }

    /// Waits until every member has been probed once, or `limit` passes. Without probes, returns at once.
    pub async fn wait_probed(&self, limit: Duration) {
        if self.settings().probes.is_none() {
            return;
        }
        let _ = tokio::time::timeout(limit, async {
            loop {
                let notified = self.probed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.members().iter().all(|b| b.probed_once()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }

    pub(crate) fn probed(&self) {
        self.probed.notify_waiters();
    }

    /// Registers the nudge of the DNS watcher for `name`.
    pub fn register_dns_nudge(&self, name: Arc<str>, nudge: Arc<Notify>) {
        lock(&self.dns_nudges).insert(name, nudge);
    }

    /// Asks the DNS watchers of the names `backend` came from for an early refresh: it failed, and the
    /// name may no longer list it. The watchers cap their query rate, so this cannot flood the resolver.
    fn nudge_dns(&self, backend: &Backend) {
        let nudges = lock(&self.dns_nudges);
        if nudges.is_empty() {
            return;
        }
        for s in backend.sources() {
            if let Source::Dns(name) = s {
                if let Some(n) = nudges.get(&name) {
                    n.notify_one();
                }
            }
        }
    }

    /// Marks the addresses a DNS answer listed as seen now.
    pub fn dns_seen(&self, addrs: &[SocketAddr]) {
        let now = now_ms();
        for b in lock(&self.inner).members.iter() {
            if addrs.contains(&b.addr) {
                let _ = b
                    .dns_first_seen_ms
                    .compare_exchange(0, now, Relaxed, Relaxed);
                b.dns_last_seen_ms.store(now, Relaxed);
            }
        }
    }

    /// Replaces what `source` claims with `desired` (address, weight) and applies the difference to the
    /// members. Returns the changes; each was logged once.
    pub fn reconcile(&self, source: Source, desired: Vec<(SocketAddr, u32)>) -> Vec<Change> {
        let mut inner = lock(&self.inner);
        if desired.is_empty() {
            inner.claims.remove(&source);
        } else {
            inner.claims.insert(source, desired);
        }
        let on_removed = self.settings().on_removed;
        self.apply_locked(&mut inner, |_| on_removed)
    }

    /// Makes the members the union of every claim, minus the excluded addresses; a removed backend's
    /// sessions follow `removal(addr)`.
    fn apply_locked(
        &self,
        inner: &mut Inner,
        removal: impl Fn(SocketAddr) -> OnRemoved,
    ) -> Vec<Change> {
        // The union of every claim: an address keeps the highest weight any source gives it, unless
        // the admin API set one.
        let mut union: BTreeMap<SocketAddr, (u32, Vec<Source>)> = BTreeMap::new();
        for (src, set) in &inner.claims {
            for &(addr, w) in set {
                if inner.excluded.contains(&addr) {
                    continue;
                }
                let e = union.entry(addr).or_insert((0, Vec::new()));
                e.0 = e.0.max(w.max(1));
                if !e.1.contains(src) {
                    e.1.push(src.clone());
                }
            }
        }
        for (addr, e) in union.iter_mut() {
            if let Some(&w) = inner.weight_overrides.get(addr) {
                e.0 = w;
            }
        }
        let mut changes = Vec::new();
        let members = std::mem::take(&mut inner.members);
        let mut kept = Vec::with_capacity(union.len());
        for b in members {
            match union.get(&b.addr) {
                Some((w, sources)) => {
                    *lock(&b.sources) = sources.clone();
                    if b.weight() != *w {
                        b.weight.store(*w, Relaxed);
                        tracing::info!(service = %self.service, backend = %b.addr, weight = *w, "backend weight changed");
                        self.events.publish(
                            "backend_weight",
                            json!({"service": &*self.service, "backend": b.addr, "weight": *w}),
                        );
                        changes.push(Change::Reweighted(b.addr, *w));
                    }
                    kept.push(b);
                }
                None => {
                    self.depart(inner, &b, removal(b.addr));
                    changes.push(Change::Removed(b.addr));
                }
            }
        }
        for (addr, (w, sources)) in union {
            if kept.iter().any(|b| b.addr == addr) {
                continue;
            }
            // A backend that left recently comes back with its counters (and its live sessions).
            let b = match inner.departed.iter().position(|(d, _)| d.addr == addr) {
                Some(i) => {
                    let (b, _) = inner.departed.swap_remove(i);
                    b.generation.fetch_add(1, Relaxed);
                    b
                }
                None => Arc::new(Backend::new(addr, w)),
            };
            b.weight.store(w, Relaxed);
            b.joined_late.store(inner.warm, Relaxed);
            b.health.store(Health::Unknown as u8, Relaxed);
            b.state.store(State::Active as u8, Relaxed);
            let srcs: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
            *lock(&b.sources) = sources;
            let probed = self.settings().probes.is_some();
            tracing::info!(
                service = %self.service,
                backend = %addr,
                weight = w,
                source = srcs.join(","),
                probed,
                "backend added"
            );
            self.events.publish(
                "backend_added",
                json!({"service": &*self.service, "backend": addr, "weight": w, "sources": srcs}),
            );
            changes.push(Change::Added(addr));
            self.spawn_probes(inner, &b);
            kept.push(b);
        }
        inner.members = kept;
        if !changes.is_empty() {
            self.rebuild_locked(inner);
        }
        changes
    }

    /// Takes `b` out of the members, its sessions following `policy`. Called with the lock held.
    fn depart(&self, inner: &mut Inner, b: &Arc<Backend>, policy: OnRemoved) {
        b.state.store(State::Removed as u8, Relaxed);
        let generation = b.generation.fetch_add(1, Relaxed) + 1;
        if let Some(stop) = inner.probe_tasks.remove(&b.addr) {
            stop.cancel();
        }
        tracing::info!(
            service = %self.service,
            backend = %b.addr,
            sessions = b.active(),
            on_removed = ?policy,
            "backend removed"
        );
        self.events.publish(
            "backend_removed",
            json!({"service": &*self.service, "backend": b.addr, "sessions": b.active(), "on_removed": format!("{policy:?}").to_lowercase()}),
        );
        match policy {
            OnRemoved::Close => b.cut_sessions(End::BackendRemoved),
            OnRemoved::Keep => {}
            OnRemoved::Drain => {
                if let Some(bg) = inner.background.clone() {
                    let b = b.clone();
                    let limit = self.settings().removed_drain;
                    let service = self.service.clone();
                    inner.spawn(async move {
                        tokio::select! {
                            () = bg.cancelled() => return,
                            () = tokio::time::sleep(limit) => {}
                        }
                        if b.generation.load(Relaxed) == generation && b.active() > 0 {
                            tracing::info!(service = %service, backend = %b.addr, sessions = b.active(), "removed backend's drain deadline: closing its sessions");
                            b.cut_sessions(End::BackendRemoved);
                        }
                    });
                }
            }
        }
        inner.forget_departed();
        inner.departed.push((b.clone(), Instant::now()));
    }

    /// Adds `addr` as a backend claimed by the admin API (it also lifts an earlier API removal).
    pub fn add_api(&self, addr: SocketAddr, weight: u32) -> Result<(), AdminError> {
        let mut inner = lock(&self.inner);
        if inner.members.iter().any(|b| b.addr == addr) {
            return Err(AdminError::Exists(addr));
        }
        inner.excluded.remove(&addr);
        inner.weight_overrides.remove(&addr);
        let mut claim = inner.claims.get(&Source::Api).cloned().unwrap_or_default();
        claim.retain(|(a, _)| *a != addr);
        claim.push((addr, weight));
        inner.claims.insert(Source::Api, claim);
        let on_removed = self.settings().on_removed;
        self.apply_locked(&mut inner, |_| on_removed);
        Ok(())
    }

    /// Removes `addr` whatever its sources, until the admin API adds it again; its sessions are
    /// drained (until `discovery.drain_timeout`) or, with `close`, cut at once.
    pub fn remove_api(&self, addr: SocketAddr, close: bool) -> Result<(), AdminError> {
        let mut inner = lock(&self.inner);
        if !inner.members.iter().any(|b| b.addr == addr) {
            return Err(AdminError::NotFound(addr));
        }
        inner.excluded.insert(addr);
        if let Some(claim) = inner.claims.get_mut(&Source::Api) {
            claim.retain(|(a, _)| *a != addr);
        }
        let policy = if close {
            OnRemoved::Close
        } else {
            OnRemoved::Drain
        };
        let on_removed = self.settings().on_removed;
        self.apply_locked(&mut inner, |a| if a == addr { policy } else { on_removed });
        Ok(())
    }

    /// Sets whether `addr` takes new connections (`Draining` keeps its sessions, sends it none).
    pub fn set_state(&self, addr: SocketAddr, state: State) -> Result<(), AdminError> {
        let mut inner = lock(&self.inner);
        let b = inner
            .members
            .iter()
            .find(|b| b.addr == addr)
            .cloned()
            .ok_or(AdminError::NotFound(addr))?;
        if state == State::Removed {
            return Err(AdminError::Invalid(
                "state must be active or draining".into(),
            ));
        }
        if b.state.swap(state as u8, Relaxed) != state as u8 {
            tracing::info!(service = %self.service, backend = %addr, state = ?state, sessions = b.active(), "backend state changed");
            self.events.publish(
                "backend_state",
                json!({"service": &*self.service, "backend": addr, "state": state}),
            );
            self.rebuild_locked(&mut inner);
        }
        Ok(())
    }

    /// Sets `addr`'s weight over what its sources say (kept across reconciles and reloads).
    pub fn set_weight(&self, addr: SocketAddr, weight: u32) -> Result<(), AdminError> {
        let mut inner = lock(&self.inner);
        if !inner.members.iter().any(|b| b.addr == addr) {
            return Err(AdminError::NotFound(addr));
        }
        inner.weight_overrides.insert(addr, weight);
        let on_removed = self.settings().on_removed;
        self.apply_locked(&mut inner, |_| on_removed);
        Ok(())
    }

    /// Replaces the pool's settings (a reload): the snapshot is rebuilt for a new policy, and probes
    /// restart when their settings changed (keeping each backend's health).
    pub fn update_settings(&self, new: PoolSettings) {
        let mut inner = lock(&self.inner);
        let old = self.settings.swap(Arc::new(new));
        let probes_changed = match (&old.probes, &self.settings().probes) {
            (None, None) => false,
            (Some(a), Some(b)) => !a.same_as(b),
            _ => true,
        };
        if probes_changed {
            for (_, stop) in inner.probe_tasks.drain() {
                stop.cancel();
            }
            let members = inner.members.clone();
            for b in &members {
                if self.settings().probes.is_none() {
                    b.health.store(Health::Unknown as u8, Relaxed);
                }
                self.spawn_probes(&mut inner, b);
            }
        }
        self.rebuild_locked(&mut inner);
    }

    /// Stops the pool's probes and timers (its service was removed by a reload).
    pub fn stop(&self) {
        let mut inner = lock(&self.inner);
        for (_, stop) in inner.probe_tasks.drain() {
            stop.cancel();
        }
        if let Some(bg) = inner.background.take() {
            bg.cancel();
        }
    }

    fn spawn_probes(self: &Pool, inner: &mut Inner, b: &Arc<Backend>) {
        let (Some(spec), Some(bg)) = (&self.settings().probes, &inner.background) else {
            return;
        };
        let Some(pool) = inner.me() else { return };
        let stop = bg.child_token();
        if let Some(old) = inner.probe_tasks.insert(b.addr, stop.clone()) {
            old.cancel();
        }
        let machine = health::Machine::starting_at(spec.rise, spec.fall, b.health());
        inner.spawn(health::probe_loop(
            pool,
            b.clone(),
            spec.clone(),
            machine,
            stop,
        ));
    }

    /// Applies a health transition reported by `b`'s probe loop.
    pub fn health_changed(&self, b: &Arc<Backend>, health: Health, error: Option<ProbeError>) {
        let mut inner = lock(&self.inner);
        if !inner.members.iter().any(|m| Arc::ptr_eq(m, b)) {
            return; // removed meanwhile
        }
        let was = b.health();
        b.health.store(health as u8, Relaxed);
        self.events.publish(
            "backend_health",
            json!({"service": &*self.service, "backend": b.addr, "health": health, "was": was,
                   "error": error.as_ref().map(|e| e.to_string())}),
        );
        match health {
            Health::Healthy => {
                tracing::info!(service = %self.service, backend = %b.addr, was = was.as_str(), "backend healthy")
            }
            _ => {
                let error = error.map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(service = %self.service, backend = %b.addr, was = was.as_str(), error, on_down = ?self.settings().on_down, sessions = b.active(), "backend unhealthy");
                if self.settings().on_down == OnDown::Close {
                    b.cut_sessions(End::BackendDown);
                }
                self.nudge_dns(b);
            }
        }
        self.rebuild_locked(&mut inner);
    }

    /// Records a successful connect. Writes shared state only when there was a failure streak to clear,
    /// so the common path stays a read.
    pub fn connect_succeeded(&self, backend: &Backend) {
        backend.stats.total.fetch_add(1, Relaxed);
        if backend.consecutive_fails.load(Relaxed) != 0 {
            backend.consecutive_fails.store(0, Relaxed);
        }
    }

    /// Records a failed connect attempt to `backend`; ejects it when the streak reaches `max_fails` and
    /// schedules its return after the cool-down. Returns the transition, if any.
    pub fn connect_failed(self: &Arc<Self>, backend: &Arc<Backend>) -> Option<Transition> {
        backend.stats.failed.fetch_add(1, Relaxed);
        let passive = self.settings().passive;
        let fails = backend.consecutive_fails.fetch_add(1, Relaxed) + 1;
        if passive.max_fails == 0 || fails < passive.max_fails {
            return None;
        }
        if backend.ejected.swap(true, Relaxed) {
            return None; // already ejected by a concurrent failure
        }
        self.rebuild();
        tracing::warn!(
            service = %self.service,
            backend = %backend.addr,
            consecutive_fails = fails,
            cooldown_ms = passive.cooldown.as_millis() as u64,
            "backend ejected after consecutive connect failures"
        );
        self.events.publish(
            "backend_ejected",
            json!({"service": &*self.service, "backend": backend.addr, "consecutive_fails": fails}),
        );
        self.nudge_dns(backend);
        let pool = Arc::clone(self);
        let backend = Arc::clone(backend);
        tokio::spawn(async move {
            tokio::time::sleep(passive.cooldown).await;
            pool.reinstate(&backend);
        });
        Some(Transition::Ejected)
    }

    /// Ends an ejection. The backend comes back on probation: one more failure ejects it again, so a
    /// backend that is still dead costs one connect attempt per cool-down, not `max_fails`.
    fn reinstate(&self, backend: &Backend) {
        backend
            .consecutive_fails
            .store(self.settings().passive.max_fails.saturating_sub(1), Relaxed);
        if backend.ejected.swap(false, Relaxed) {
            self.rebuild();
            tracing::info!(service = %self.service, backend = %backend.addr, "backend returned after cool-down");
            self.events.publish(
                "backend_returned",
                json!({"service": &*self.service, "backend": backend.addr}),
            );
        }
    }

    /// Whether `b` may take new connections now.
    fn eligible(&self, b: &Backend) -> bool {
        b.state() == State::Active
            && !b.is_ejected()
            && (self.settings().probes.is_none() || b.health() == Health::Healthy)
    }

    fn rebuild(&self) {
        let mut inner = lock(&self.inner);
        self.rebuild_locked(&mut inner);
    }

    /// Publishes a new snapshot from the members' current state. Newly eligible backends start their
    /// slow-start ramp here, whatever made them eligible.
    fn rebuild_locked(&self, inner: &mut Inner) {
        let previous = self.snapshot.load();
        let ready: Vec<Arc<Backend>> = inner
            .members
            .iter()
            .filter(|b| self.eligible(b))
            .cloned()
            .collect();
        let slow = self.settings().slow_start;
        let now = Instant::now();
        let mut ramping = false;
        for b in &ready {
            let mut since = lock(&b.ramp_since);
            let newly = !previous.ready.iter().any(|p| Arc::ptr_eq(p, b));
            // A recovery, or a backend that joined after start-up. The members present at start-up
            // are not ramped: they start together, and a ramp would only slow the start.
            let ramp = b.ever_ready.swap(true, Relaxed) || b.joined_late.load(Relaxed);
            if newly && ramp && !slow.is_zero() {
                *since = Some(now);
            }
            let full = b.weight() * WEIGHT_SCALE;
            let eff = match *since {
                Some(t) if now.duration_since(t) < slow => {
                    ramping = true;
                    let frac = now.duration_since(t).as_secs_f64() / slow.as_secs_f64();
                    ((full as f64 * frac) as u32).clamp(b.weight(), full)
                }
                _ => {
                    *since = None;
                    full
                }
            };
            b.effective.store(eff, Relaxed);
        }
        let selector = Selector::new(self.settings().policy, &ready);
        self.snapshot.store(Arc::new(Snapshot { ready, selector }));
        if ramping && !inner.ramp_task {
            if let (Some(bg), Some(pool)) = (inner.background.clone(), inner.me()) {
                inner.ramp_task = true;
                // Ten steps over the window, never more often than every 50 ms.
                let step = (slow / 10).max(Duration::from_millis(50));
                inner.spawn(async move {
                    loop {
                        tokio::select! {
                            () = bg.cancelled() => return,
                            () = tokio::time::sleep(step) => {}
                        }
                        let mut inner = lock(&pool.inner);
                        pool.rebuild_locked(&mut inner);
                        let still = inner.members.iter().any(|b| lock(&b.ramp_since).is_some());
                        if !still {
                            inner.ramp_task = false;
                            return;
                        }
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_fails: u32) -> Arc<Pool> {
        let members: Vec<_> = (1..=3)
            .map(|i| (SocketAddr::from(([127, 0, 0, i], 80)), 1))
            .collect();
        Arc::new(Pool::with_members(
            "t".into(),
            Policy::RoundRobin,
            Passive {
                max_fails,
                cooldown: Duration::from_millis(50),
            },
            &members,
        ))
    }

    #[test]
    fn active_guard_counts_and_returns() {
        let b = Arc::new(Backend::new(SocketAddr::from(([127, 0, 0, 1], 1)), 1));
        let g1 = ActiveGuard::new(b.clone());
        let g2 = ActiveGuard::new(b.clone());
        assert_eq!(b.active(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b.active(), 0);
    }

    #[tokio::test]
    async fn ejection_after_max_fails_and_return_on_probation() {
        let p = pool(2);
        let b = p.members()[0].clone();
        assert_eq!(p.connect_failed(&b), None);
        assert_eq!(p.connect_failed(&b), Some(Transition::Ejected));
        assert_eq!(p.snapshot().ready.len(), 2);
        assert!(p.snapshot().ready.iter().all(|r| r.addr != b.addr));
        // returns after the cool-down
        tokio::time::timeout(Duration::from_secs(5), async {
            while p.snapshot().ready.len() != 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("backend returned");
        // on probation: one more failure ejects again
        assert_eq!(p.connect_failed(&b), Some(Transition::Ejected));
        assert_eq!(b.stats.failed.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn success_clears_the_failure_streak() {
        let p = pool(2);
        let b = p.members()[1].clone();
        p.connect_failed(&b);
        p.connect_succeeded(&b);
        assert_eq!(p.connect_failed(&b), None);
        assert_eq!(p.snapshot().ready.len(), 3);
    }

    #[tokio::test]
    async fn zero_max_fails_never_ejects() {
        let p = pool(0);
        let b = p.members()[2].clone();
        for _ in 0..10 {
            assert_eq!(p.connect_failed(&b), None);
        }
        assert_eq!(p.snapshot().ready.len(), 3);
    }
}
