//! A service's backends: who is a member, who may take new connections, and the snapshot the hot path
//! reads.
//!
//! The hot path (select → connect) loads one [`Snapshot`] through `ArcSwap` and touches only per-backend
//! atomics. Everything that changes who is eligible (sources, probes, passive ejection, slow start,
//! the admin API) builds a new snapshot off the hot path under the pool's mutex, and only when something
//! changed.
//!
//! The parts:
//! - `backend.rs`: one backend, its counters and connect histogram, the guard that counts its open
//!   connections, the signal that cuts its sessions;
//! - `membership.rs`: the sources' claims and the admin API's overrides, and the pure difference
//!   between the members and what they should be;
//! - `probes.rs`: the probe loop of one backend (the probe and the rise/fall machine are `health`'s);
//! - `transition.rs`: what changed, as values, and the one place that logs and streams them;
//! - this file: applying differences and transitions to the live backends, the timers that follow
//!   from them (cool-downs, drain deadlines of removed backends, the slow-start ramp), and the snapshot.
//!
//! Every background task of a pool (probes and timers) runs on the control runtime that started it,
//! under the token it was started with, whichever thread reported the change.

mod backend;
mod membership;
mod probes;
mod transition;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use backend::{ActiveGuard, CutSignal, CONNECT_BUCKETS};
pub use backend::{Backend, BackendStats, BackendView, Histogram, State, WEIGHT_SCALE};
pub use membership::Source;
pub(crate) use transition::Transition;

use crate::balance::Selector;
use crate::config::{OnDown, OnRemoved, Policy};
use crate::discovery::Claims;
use crate::events::EventBus;
use crate::health::{self, Health, ProbeError, ProbeSpec};
use crate::outcome::Outcome;
use crate::util::{lock, unix_ms};
use membership::{Desired, Membership};

/// What the hot path sees: the backends eligible for new connections and the policy state built for them.
pub struct Snapshot {
    pub ready: Vec<Arc<Backend>>,
    /// What the selector indexes: the ready backends, or, for `source_hash`, every member sorted by
    /// address (its table skips the ineligible ones).
    candidates: Vec<Arc<Backend>>,
    selector: Selector,
}

impl Snapshot {
    /// Picks a ready backend for `client`, never one whose address is in `avoid` (already tried).
    #[inline]
    pub(crate) fn pick(&self, client: SocketAddr, avoid: &[SocketAddr]) -> Option<&Arc<Backend>> {
        self.selector
            .pick(&self.candidates, client, avoid)
            .map(|i| &self.candidates[i])
    }

    /// The backend a new connection from `client` would get now. With `source_hash` this is exact
    /// and changes nothing; with the other policies it is the next pick (and counts as one).
    pub fn route(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.pick(client, &[]).map(|b| b.addr)
    }
}

/// Passive-ejection settings of a pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Passive {
    /// Consecutive connect failures that eject; 0 disables ejection.
    pub(crate) max_fails: u32,
    pub(crate) cooldown: Duration,
}

/// How a pool treats its backends; from the service's config.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    pub(crate) policy: Policy,
    pub(crate) passive: Passive,
    /// Active probes; `None` = every member is eligible without probing.
    pub(crate) probes: Option<Arc<ProbeSpec>>,
    pub(crate) on_down: OnDown,
    pub(crate) on_removed: OnRemoved,
    /// How long the sessions of a removed backend may run with `on_removed: drain`.
    pub(crate) removed_drain: Duration,
    pub(crate) slow_start: Duration,
}

/// Why an admin operation on a pool was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AdminError {
    #[error("{0} is already a backend of this service")]
    Exists(SocketAddr),
    #[error("{0} is not a backend of this service")]
    NotFound(SocketAddr),
    #[error("{0}")]
    Invalid(String),
}

/// How long a removed backend without sessions is remembered.
const REMEMBER_REMOVED: Duration = Duration::from_secs(600);
/// At most this many removed backends without sessions are remembered.
const MAX_REMEMBERED: usize = 256;

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

/// Where a started pool runs its background work.
struct Tasks {
    /// Cancelled when the pool stops (its service was removed, or the process stops).
    stop: CancellationToken,
    /// The control runtime: callers on other threads (workers, the admin API) still schedule here.
    rt: Handle,
    /// The `Arc` this pool lives in, for the tasks it spawns.
    me: Weak<Pool>,
}

struct Inner {
    members: Vec<Arc<Backend>>,
    membership: Membership,
    /// Removed backends, with when they left: kept while sessions run, and for [`REMEMBER_REMOVED`]
    /// so one that comes back (a container restarted with its old address) keeps its counters.
    departed: Vec<(Arc<Backend>, Instant)>,
    /// Set by `start`.
    tasks: Option<Tasks>,
    /// The probe loop of each member, by address.
    probe_tasks: HashMap<SocketAddr, CancellationToken>,
    ramp_task: bool,
    /// Start-up is over: backends added from now on are new arrivals (slow start ramps them).
    warm: bool,
}

impl Inner {
    /// Spawns `make(pool)` on the control runtime, once the pool is started.
    fn spawn<F>(&self, make: impl FnOnce(Arc<Pool>, CancellationToken) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(t) = &self.tasks {
            if let Some(pool) = t.me.upgrade() {
                t.rt.spawn(make(pool, t.stop.clone()));
            }
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

/// Slow start: the effective weight, in [`WEIGHT_SCALE`] units, of a backend of configured `weight`
/// whose ramp began `elapsed` ago over a `window`; `None` once the ramp is over. Starts at a tenth of
/// the full weight and grows linearly.
fn ramped(weight: u32, elapsed: Duration, window: Duration) -> Option<u32> {
    if elapsed >= window {
        return None;
    }
    let full = weight * WEIGHT_SCALE;
    let frac = elapsed.as_secs_f64() / window.as_secs_f64();
    Some(((full as f64 * frac) as u32).clamp(weight, full))
}

impl Pool {
    pub(crate) fn new(service: Arc<str>, settings: PoolSettings, events: EventBus) -> Pool {
        let selector = Selector::over_ready::<Arc<Backend>>(settings.policy, &[]);
        Pool {
            service,
            settings: ArcSwap::from_pointee(settings),
            events,
            inner: Mutex::new(Inner {
                members: Vec::new(),
                membership: Membership::default(),
                departed: Vec::new(),
                tasks: None,
                probe_tasks: HashMap::new(),
                ramp_task: false,
                warm: false,
            }),
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                candidates: Vec::new(),
                selector,
            }),
            probed: Notify::new(),
            dns_nudges: Mutex::new(HashMap::new()),
        }
    }

    /// The backends eligible for new connections now, and the policy over them.
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

    pub(crate) fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Starts the pool's background work (probes, timers) on the current (control) runtime under
    /// `stop`; members added later get their probes at once.
    pub(crate) fn start(self: &Arc<Pool>, stop: CancellationToken) {
        let mut inner = lock(&self.inner);
        inner.tasks = Some(Tasks {
            stop,
            rt: Handle::current(),
            me: Arc::downgrade(self),
        });
        let members = inner.members.clone();
        for b in &members {
            self.spawn_probes(&mut inner, b);
        }
    }

    /// Marks the end of start-up: from now on a backend that joins is ramped by slow start.
    pub(crate) fn warmed_up(&self) {
        lock(&self.inner).warm = true;
    }

    /// Waits until every member has been probed once, or `limit` passes. Without probes, returns at once.
    pub(crate) async fn wait_probed(&self, limit: Duration) {
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

    fn probed(&self) {
        self.probed.notify_waiters();
    }

    /// Registers the nudge of the DNS watcher for `name`.
    pub(crate) fn register_dns_nudge(&self, name: Arc<str>, nudge: Arc<Notify>) {
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
    fn dns_seen(&self, addrs: &[SocketAddr]) {
        let now = unix_ms();
        for b in lock(&self.inner).members.iter() {
            if addrs.contains(&b.addr) {
                let _ = b
                    .dns_first_seen_ms
                    .compare_exchange(0, now, Relaxed, Relaxed);
                b.dns_last_seen_ms.store(now, Relaxed);
            }
        }
    }

    /// Names the member at `addr` (reverse DNS, or a replica's container name).
    pub(crate) fn name_backend(&self, addr: SocketAddr, name: &str) {
        if let Some(b) = self.member(addr) {
            if b.name().as_deref().map(String::as_str) != Some(name) {
                tracing::debug!(service = %self.service, backend = %addr, name, "backend named");
                b.set_name(name);
            }
        }
    }

    /// Logs and streams `transitions` (after the pool's lock is released), and hands them back.
    fn publish(&self, transitions: Vec<Transition>) -> Vec<Transition> {
        for t in &transitions {
            t.publish(&self.service, &self.events);
        }
        transitions
    }

    /// Replaces what `source` claims with `desired` (address, weight) and applies the difference to the
    /// members.
    pub(crate) fn reconcile(
        &self,
        source: Source,
        desired: Vec<(SocketAddr, u32)>,
    ) -> Vec<Transition> {
        let ts = {
            let mut inner = lock(&self.inner);
            inner.membership.claim(source, desired);
            let on_removed = self.settings().on_removed;
            self.apply_locked(&mut inner, |_| on_removed)
        };
        self.publish(ts)
    }

    /// Adds `addr` as a backend claimed by the admin API (it also lifts an earlier API removal).
    pub(crate) fn add_api(
        &self,
        addr: SocketAddr,
        weight: u32,
    ) -> Result<Vec<Transition>, AdminError> {
        let ts = {
            let mut inner = lock(&self.inner);
            if inner.members.iter().any(|b| b.addr == addr) {
                return Err(AdminError::Exists(addr));
            }
            inner.membership.add_api(addr, weight);
            let on_removed = self.settings().on_removed;
            self.apply_locked(&mut inner, |_| on_removed)
        };
        Ok(self.publish(ts))
    }

    /// Removes `addr` whatever its sources, until the admin API adds it again; its sessions are
    /// drained (until `discovery.drain_timeout`) or, with `close`, cut at once.
    pub(crate) fn remove_api(
        &self,
        addr: SocketAddr,
        close: bool,
    ) -> Result<Vec<Transition>, AdminError> {
        let ts = {
            let mut inner = lock(&self.inner);
            if !inner.members.iter().any(|b| b.addr == addr) {
                return Err(AdminError::NotFound(addr));
            }
            inner.membership.remove_api(addr);
            let policy = if close {
                OnRemoved::Close
            } else {
                OnRemoved::Drain
            };
            let on_removed = self.settings().on_removed;
            self.apply_locked(&mut inner, |a| if a == addr { policy } else { on_removed })
        };
        Ok(self.publish(ts))
    }

    /// Sets whether `addr` takes new connections (`Draining` keeps its sessions, sends it none).
    pub(crate) fn set_state(
        &self,
        addr: SocketAddr,
        state: State,
    ) -> Result<Vec<Transition>, AdminError> {
        if state == State::Removed {
            return Err(AdminError::Invalid(
                "state must be active or draining".into(),
            ));
        }
        let ts = {
            let mut inner = lock(&self.inner);
            let b = inner
                .members
                .iter()
                .find(|b| b.addr == addr)
                .cloned()
                .ok_or(AdminError::NotFound(addr))?;
            if b.state.swap(state as u8, Relaxed) == state as u8 {
                return Ok(Vec::new());
            }
            self.rebuild_locked(&mut inner);
            vec![Transition::State {
                backend: addr,
                state,
                sessions: b.active(),
            }]
        };
        Ok(self.publish(ts))
    }

    /// Sets `addr`'s weight over what its sources say (kept across reconciles and reloads).
    pub(crate) fn set_weight(
        &self,
        addr: SocketAddr,
        weight: u32,
    ) -> Result<Vec<Transition>, AdminError> {
        let ts = {
            let mut inner = lock(&self.inner);
            if !inner.members.iter().any(|b| b.addr == addr) {
                return Err(AdminError::NotFound(addr));
            }
            inner.membership.override_weight(addr, weight);
            let on_removed = self.settings().on_removed;
            self.apply_locked(&mut inner, |_| on_removed)
        };
        Ok(self.publish(ts))
    }

    /// Replaces the pool's settings (a reload): the snapshot is rebuilt for a new policy, and probes
    /// restart when their settings changed (keeping each backend's health).
    pub(crate) fn update_settings(&self, new: PoolSettings) {
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
    pub(crate) fn stop(&self) {
        let mut inner = lock(&self.inner);
        for (_, stop) in inner.probe_tasks.drain() {
            stop.cancel();
        }
        if let Some(t) = inner.tasks.take() {
            t.stop.cancel();
        }
    }

    fn spawn_probes(&self, inner: &mut Inner, b: &Arc<Backend>) {
        let (Some(spec), Some(tasks)) = (self.settings().probes.clone(), &inner.tasks) else {
            return;
        };
        let stop = tasks.stop.child_token();
        if let Some(old) = inner.probe_tasks.insert(b.addr, stop.clone()) {
            old.cancel();
        }
        let machine = health::Machine::starting_at(spec.rise, spec.fall, b.health());
        let b = b.clone();
        inner.spawn(move |pool, _| probes::probe_loop(pool, b, spec, machine, stop));
    }

    /// Applies a health transition reported by `b`'s probe loop.
    fn health_changed(
        &self,
        b: &Arc<Backend>,
        health: Health,
        error: Option<ProbeError>,
    ) -> Vec<Transition> {
        let ts = {
            let mut inner = lock(&self.inner);
            if !inner.members.iter().any(|m| Arc::ptr_eq(m, b)) {
                return Vec::new(); // removed meanwhile
            }
            let was = b.health();
            b.health.store(health as u8, Relaxed);
            let on_down = self.settings().on_down;
            if health != Health::Healthy {
                if on_down == OnDown::Close {
                    b.cut_sessions(Outcome::BackendDown);
                }
                self.nudge_dns(b);
            }
            self.rebuild_locked(&mut inner);
            vec![Transition::Health {
                backend: b.addr,
                health,
                was,
                error: error.map(|e| e.to_string()),
                on_down,
                sessions: b.active(),
            }]
        };
        self.publish(ts)
    }

    /// Records a successful connect. Writes shared state only when there was a failure streak to clear,
    /// so the common path stays a read.
    pub(crate) fn connect_succeeded(&self, backend: &Backend) {
        backend.stats.total.fetch_add(1, Relaxed);
        if backend.consecutive_fails.load(Relaxed) != 0 {
            backend.consecutive_fails.store(0, Relaxed);
        }
    }

    /// Records a failed connect attempt to `backend`; ejects it when the streak reaches `max_fails` and
    /// schedules its return after the cool-down. Returns the transition, if any.
    pub(crate) fn connect_failed(&self, backend: &Arc<Backend>) -> Option<Transition> {
        backend.stats.failed.fetch_add(1, Relaxed);
        let passive = self.settings().passive;
        let fails = backend.consecutive_fails.fetch_add(1, Relaxed) + 1;
        if passive.max_fails == 0 || fails < passive.max_fails {
            return None;
        }
        if backend.ejected.swap(true, Relaxed) {
            return None; // already ejected by a concurrent failure
        }
        {
            let mut inner = lock(&self.inner);
            self.rebuild_locked(&mut inner);
            let b = backend.clone();
            inner.spawn(move |pool, stop| async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(passive.cooldown) => { pool.reinstate(&b); }
                }
            });
        }
        self.nudge_dns(backend);
        let t = Transition::Ejected {
            backend: backend.addr,
            consecutive_fails: fails,
            cooldown: passive.cooldown,
        };
        self.publish(vec![t]).pop()
    }

    /// Ends an ejection. The backend comes back on probation: one more failure ejects it again, so a
    /// backend that is still dead costs one connect attempt per cool-down, not `max_fails`.
    fn reinstate(&self, backend: &Backend) {
        backend
            .consecutive_fails
            .store(self.settings().passive.max_fails.saturating_sub(1), Relaxed);
        if backend.ejected.swap(false, Relaxed) {
            self.rebuild_locked(&mut lock(&self.inner));
            self.publish(vec![Transition::Returned {
                backend: backend.addr,
            }]);
        }
    }

    /// Whether `b` may take new connections now.
    fn eligible(&self, b: &Backend) -> bool {
        b.state() == State::Active
            && !b.is_ejected()
            && (self.settings().probes.is_none() || b.health() == Health::Healthy)
    }

    /// Makes the members what the membership wants; a removed backend's sessions follow
    /// `removal(addr)`. Called with the lock held; returns the transitions to publish.
    fn apply_locked(
        &self,
        inner: &mut Inner,
        removal: impl Fn(SocketAddr) -> OnRemoved,
    ) -> Vec<Transition> {
        let addrs: Vec<SocketAddr> = inner.members.iter().map(|b| b.addr).collect();
        let diff = membership::diff(&addrs, inner.membership.desired());
        let mut ts = Vec::new();
        let mut by_addr: HashMap<SocketAddr, Arc<Backend>> = std::mem::take(&mut inner.members)
            .into_iter()
            .map(|b| (b.addr, b))
            .collect();
        let mut kept = Vec::with_capacity(diff.kept.len() + diff.added.len());
        for addr in diff.removed {
            if let Some(b) = by_addr.remove(&addr) {
                ts.push(self.depart(inner, &b, removal(addr)));
            }
        }
        // Kept members stay in their order; the new ones follow in address order.
        for (addr, Desired { weight, sources }) in diff.kept {
            let Some(b) = by_addr.remove(&addr) else {
                continue;
            };
            *lock(&b.sources) = sources;
            if b.weight.swap(weight, Relaxed) != weight {
                ts.push(Transition::Reweighted {
                    backend: addr,
                    weight,
                });
            }
            kept.push(b);
        }
        for (addr, Desired { weight, sources }) in diff.added {
            // A backend that left recently comes back with its counters (and its live sessions).
            let b = match inner.departed.iter().position(|(d, _)| d.addr == addr) {
                Some(i) => {
                    let (b, _) = inner.departed.swap_remove(i);
                    b.generation.fetch_add(1, Relaxed);
                    b
                }
                None => Arc::new(Backend::new(addr, weight)),
            };
            b.weight.store(weight, Relaxed);
            b.joined_late.store(inner.warm, Relaxed);
            b.health.store(Health::Unknown as u8, Relaxed);
            b.state.store(State::Active as u8, Relaxed);
            *lock(&b.sources) = sources.clone();
            ts.push(Transition::Added {
                backend: addr,
                weight,
                sources,
                probed: self.settings().probes.is_some(),
            });
            self.spawn_probes(inner, &b);
            kept.push(b);
        }
        inner.members = kept;
        if !ts.is_empty() {
            self.rebuild_locked(inner);
        }
        ts
    }

    /// Takes `b` out of the members, its sessions following `policy`. Called with the lock held.
    fn depart(&self, inner: &mut Inner, b: &Arc<Backend>, policy: OnRemoved) -> Transition {
        b.state.store(State::Removed as u8, Relaxed);
        let generation = b.generation.fetch_add(1, Relaxed) + 1;
        if let Some(stop) = inner.probe_tasks.remove(&b.addr) {
            stop.cancel();
        }
        let t = Transition::Removed {
            backend: b.addr,
            sessions: b.active(),
            on_removed: policy,
        };
        match policy {
            OnRemoved::Close => b.cut_sessions(Outcome::BackendRemoved),
            OnRemoved::Keep => {}
            OnRemoved::Drain => {
                let limit = self.settings().removed_drain;
                let b = b.clone();
                inner.spawn(move |pool, stop| async move {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(limit) => {}
                    }
                    if b.generation.load(Relaxed) == generation && b.active() > 0 {
                        let sessions = b.active();
                        b.cut_sessions(Outcome::BackendRemoved);
                        pool.publish(vec![Transition::DrainDeadline {
                            backend: b.addr,
                            sessions,
                        }]);
                    }
                });
            }
        }
        inner.forget_departed();
        inner.departed.push((b.clone(), Instant::now()));
        t
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
            let eff = match since.and_then(|t| ramped(b.weight(), now.duration_since(t), slow)) {
                Some(w) => {
                    ramping = true;
                    w
                }
                None => {
                    *since = None;
                    b.weight() * WEIGHT_SCALE
                }
            };
            b.effective.store(eff, Relaxed);
        }
        let policy = self.settings().policy;
        let (candidates, selector) = if policy == Policy::SourceHash {
            let mut members = inner.members.clone();
            members.sort_by_key(|b| b.addr);
            let eligible = members.iter().map(|b| self.eligible(b)).collect();
            let selector = Selector::over_members(&members, eligible);
            (members, selector)
        } else {
            (ready.clone(), Selector::over_ready(policy, &ready))
        };
        self.snapshot.store(Arc::new(Snapshot {
            ready,
            candidates,
            selector,
        }));
        if ramping && !inner.ramp_task && inner.tasks.is_some() {
            inner.ramp_task = true;
            // Ten steps over the window, never more often than every 50 ms.
            let step = (slow / 10).max(Duration::from_millis(50));
            inner.spawn(move |pool, stop| async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
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

/// A DNS watcher's answers become the claim of its name.
impl Claims for Pool {
    fn claim(&self, label: &Arc<str>, addrs: Vec<(SocketAddr, u32)>) {
        self.reconcile(Source::Dns(label.clone()), addrs);
    }

    fn seen(&self, addrs: &[SocketAddr]) {
        self.dns_seen(addrs);
    }

    fn named(&self, addr: SocketAddr, name: Arc<str>) {
        self.name_backend(addr, &name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_fails: u32) -> Arc<Pool> {
        let settings = PoolSettings {
            policy: Policy::RoundRobin,
            passive: Passive {
                max_fails,
                cooldown: Duration::from_millis(50),
            },
            probes: None,
            on_down: OnDown::Keep,
            on_removed: OnRemoved::Drain,
            removed_drain: Duration::from_secs(30),
            slow_start: Duration::ZERO,
        };
        let p = Arc::new(Pool::new("t".into(), settings, EventBus::default()));
        let members: Vec<_> = (1..=3)
            .map(|i| (SocketAddr::from(([127, 0, 0, i], 80)), 1))
            .collect();
        p.reconcile(Source::Static, members);
        p.start(CancellationToken::new());
        p
    }

    #[tokio::test]
    async fn ejection_after_max_fails_and_return_on_probation() {
        let p = pool(2);
        let b = p.members()[0].clone();
        assert_eq!(p.connect_failed(&b), None);
        assert!(matches!(
            p.connect_failed(&b),
            Some(Transition::Ejected {
                consecutive_fails: 2,
                ..
            })
        ));
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
        assert!(matches!(
            p.connect_failed(&b),
            Some(Transition::Ejected { .. })
        ));
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

    #[tokio::test]
    async fn reconcile_returns_each_change_once_and_keeps_counters() {
        let p = pool(3);
        let a = |i| SocketAddr::from(([127, 0, 0, i], 80));
        p.member(a(2)).unwrap().stats.total.store(7, Relaxed);
        let ts = p.reconcile(Source::Static, vec![(a(2), 4), (a(4), 1)]);
        assert_eq!(ts.len(), 4, "{ts:?}");
        assert!(ts.contains(&Transition::Reweighted {
            backend: a(2),
            weight: 4
        }));
        assert!(ts
            .iter()
            .any(|t| matches!(t, Transition::Added { backend, .. } if *backend == a(4))));
        assert_eq!(
            ts.iter()
                .filter(|t| matches!(t, Transition::Removed { .. }))
                .count(),
            2
        );
        assert_eq!(p.member(a(2)).unwrap().stats.total.load(Relaxed), 7);
        // The same claim again changes nothing.
        assert!(p
            .reconcile(Source::Static, vec![(a(2), 4), (a(4), 1)])
            .is_empty());
        // A backend that comes back within the memory window gets its counters back.
        p.member(a(4)).unwrap().stats.total.store(5, Relaxed);
        p.reconcile(Source::Static, vec![(a(2), 4)]);
        p.reconcile(Source::Static, vec![(a(2), 4), (a(4), 1)]);
        assert_eq!(p.member(a(4)).unwrap().stats.total.load(Relaxed), 5);
    }

    #[test]
    fn slow_start_ramps_from_a_tenth_to_full() {
        let w = Duration::from_secs(10);
        assert_eq!(ramped(3, Duration::ZERO, w), Some(3), "a tenth of 3 × 10");
        assert_eq!(ramped(3, Duration::from_secs(5), w), Some(15));
        assert_eq!(ramped(3, Duration::from_millis(9_999), w), Some(29));
        assert_eq!(ramped(3, w, w), None, "over: full weight");
    }
}
