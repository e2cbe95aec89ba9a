//! A service's backends: who is a member, who may take new connections, and the snapshot the hot path
//! reads.
//!
//! The hot path (select → connect) loads one [`Snapshot`] through `ArcSwap` and touches only per-backend
//! atomics. Everything that changes who is eligible (sources, probes, passive ejection, slow start,
//! the admin API) builds a new snapshot off the hot path under the pool's mutex, and only when something
//! changed. A passive ejection is seen on a worker: there it only flips the backend's flag, which
//! every policy reads at pick time, and the snapshot without it is built on the control runtime.
//!
//! The parts, by concern:
//! - `backend.rs`: one backend and its state machine (every transition says what flipped), its
//!   counters and connect histogram, the guard that counts its open connections, the signal that cuts
//!   its sessions;
//! - `membership.rs`: the sources' claims and the admin API's overrides, and the pure difference
//!   between the members and what they should be;
//! - `api.rs`: what the admin API changes (add, remove, reweight, drain), with its limits;
//! - `ejection.rs`: passive health (consecutive connect failures, the cool-down, probation);
//! - `probing.rs`: active health in the pool: each backend's probe loop and its transitions (the probe
//!   and the rise/fall machine are the `health` module's);
//! - `agent.rs`: each backend's agent loop (what its agent says adjusts it);
//! - `slow_start.rs`: the ramp of a recovered or late backend's weight;
//! - `tiers.rs`: which tier serves (backup tiers) and when traffic fails back (pure);
//! - `transition.rs`: what changed, as values, and the one place that logs and streams them;
//! - this file: settings, the one membership path (`Pool::mutate_membership`: every source's claim
//!   and every API change), departures and their drain deadlines, and the snapshot.
//!
//! Every background task of a pool (probes and timers) runs on the control runtime that started it,
//! under the token it was started with, whichever thread reported the change.

mod agent;
mod api;
mod backend;
mod ejection;
mod membership;
mod probing;
mod slow_start;
mod tiers;
mod transition;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use api::AdminError;
#[cfg(test)]
use api::{MAX_API_BACKENDS, MAX_API_POOL};
pub(crate) use backend::{ActiveGuard, CutSignal, CONNECT_BUCKETS};
pub use backend::{AgentView, Backend, BackendStats, BackendView, Histogram, State, WEIGHT_SCALE};
pub use membership::Source;
pub(crate) use tiers::{Reason as TierReason, TierChange};
pub(crate) use transition::Transition;

use crate::balance::Selector;
use crate::config::{AgentConfig, Failback, OnDown, OnRemoved, Policy};
use crate::discovery::{Claimed, Claims, Finder};
use crate::events::EventBus;
use crate::health::{AgentSays, Health, ProbeSpec};
use crate::outcome::Outcome;
use crate::util::{lock, unix_ms};
use membership::Membership;
use tiers::Tiers;

/// What the hot path sees: the backends eligible for new connections and the policy state built for them.
pub struct Snapshot {
    pub ready: Vec<Arc<Backend>>,
    /// What the selector indexes: the ready backends, or, for `source_hash`, every member sorted by
    /// address (its table skips the ineligible ones).
    candidates: Vec<Arc<Backend>>,
    selector: Selector,
    /// The tier that takes new connections.
    pub serving_tier: Option<u32>,
}

impl Snapshot {
    /// Picks a ready backend for `client`, never one whose address is in `avoid` (already tried).
    #[inline]
    pub(crate) fn pick(&self, client: SocketAddr, avoid: &[SocketAddr]) -> Option<&Arc<Backend>> {
        self.selector
            .pick(&self.candidates, client, avoid)
            .map(|i| &self.candidates[i])
    }

    /// The backend a new connection from `client` would get now, changing nothing (no cursor moves):
    /// exact for `source_hash`, `round_robin`, `weighted_round_robin` and `least_conn` until the next
    /// connection or change; for `p2c`, whose draw is random, the least loaded backend.
    pub fn peek(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.selector
            .peek(&self.candidates, client)
            .map(|i| self.candidates[i].addr)
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
    /// Each backend's agent, when the service has one.
    pub(crate) agent: Option<AgentConfig>,
    /// A backup tier spreads over all its eligible backends, not only its first.
    pub(crate) all_backups: bool,
    pub(crate) failback: Failback,
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
    /// Backends a worker just ejected, for the control runtime to rebuild the snapshot without them
    /// and start their cool-downs: a worker never takes the pool's lock. At most one message per
    /// ejection, and a backend is ejected again only after its cool-down, so this holds at most one
    /// per member.
    ejections: mpsc::UnboundedSender<Ejected>,
    /// Its receiving end, until `start` hands it to the task that applies ejections.
    ejections_rx: Mutex<Option<mpsc::UnboundedReceiver<Ejected>>>,
}

/// A backend a worker ejected, with the streak of connect failures that did.
type Ejected = (Arc<Backend>, u32);

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
    /// The agent loop of each member, by address.
    agent_tasks: HashMap<SocketAddr, CancellationToken>,
    ramp_task: bool,
    /// Which tier serves; kept across reloads (the pool is).
    tiers: Tiers,
    /// When a task will rebuild the snapshot for an `after` failback, if one is scheduled.
    tier_wake: Option<Instant>,
    /// Changes of the serving tier decided by a rebuild, published (after the transitions that
    /// caused them) once the lock is released.
    pending: Vec<Transition>,
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

impl Pool {
    pub(crate) fn new(service: Arc<str>, settings: PoolSettings, events: EventBus) -> Pool {
        let selector = Selector::over_ready::<Arc<Backend>>(settings.policy, &[]);
        let (ejections, ejections_rx) = mpsc::unbounded_channel();
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
                agent_tasks: HashMap::new(),
                ramp_task: false,
                tiers: Tiers::default(),
                tier_wake: None,
                pending: Vec::new(),
                warm: false,
            }),
            snapshot: ArcSwap::from_pointee(Snapshot {
                ready: Vec::new(),
                candidates: Vec::new(),
                selector,
                serving_tier: None,
            }),
            probed: Notify::new(),
            dns_nudges: Mutex::new(HashMap::new()),
            ejections,
            ejections_rx: Mutex::new(Some(ejections_rx)),
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

    /// Starts the pool's background work (probes, agents, timers) on the current (control) runtime
    /// under `stop`; members added later get their probes and agents at once.
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
            self.spawn_agent(&mut inner, b);
        }
        if let Some(rx) = lock(&self.ejections_rx).take() {
            inner.spawn(move |pool, stop| pool.apply_ejections(rx, stop));
        }
    }

    /// Marks the end of start-up: from now on a backend that joins is ramped by slow start.
    pub(crate) fn warmed_up(&self) {
        lock(&self.inner).warm = true;
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
        for s in backend.sources().iter() {
            if let Source::Dns(name) | Source::Srv(name) = s {
                if let Some(n) = nudges.get(name) {
                    n.notify_one();
                }
            }
        }
    }

    /// Marks the addresses a DNS answer listed as seen now.
    fn dns_seen(&self, addrs: &[SocketAddr]) {
        let now = unix_ms();
        let listed: HashSet<&SocketAddr> = addrs.iter().collect();
        for b in lock(&self.inner).members.iter() {
            if listed.contains(&b.addr) {
                b.seen_in_dns(now);
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

    /// Logs and streams `transitions` (after the pool's lock is released), then the tier changes they
    /// caused, and hands them all back.
    fn publish(&self, mut transitions: Vec<Transition>) -> Vec<Transition> {
        transitions.append(&mut lock(&self.inner).pending);
        for t in &transitions {
            t.publish(&self.service, &self.events);
        }
        transitions
    }

    /// Replaces what `source` claims with `desired` (address, weight and tier) and applies the
    /// difference to the members.
    pub(crate) fn reconcile(
        &self,
        source: Source,
        desired: Vec<impl Into<Claimed>>,
    ) -> Vec<Transition> {
        let on_removed = self.settings().on_removed;
        let done = self.mutate_membership(
            |inner| {
                inner.membership.claim(source, desired);
                Ok::<(), std::convert::Infallible>(())
            },
            |_| on_removed,
        );
        match done {
            Ok(ts) => ts,
            Err(never) => match never {},
        }
    }

    /// The one path by which the members change, whoever asks (a source's claim, the admin API):
    /// `change` edits the claims under the pool's lock (or refuses, changing nothing), then the members
    /// are made what the claims want, a removed backend's sessions following `removal(addr)`. The
    /// transitions are published after the lock is released, and returned.
    fn mutate_membership<E>(
        &self,
        change: impl FnOnce(&mut Inner) -> Result<(), E>,
        removal: impl Fn(SocketAddr) -> OnRemoved,
    ) -> Result<Vec<Transition>, E> {
        let ts = {
            let mut inner = lock(&self.inner);
            change(&mut inner)?;
            self.apply_locked(&mut inner, removal)
        };
        Ok(self.publish(ts))
    }

    /// Replaces the pool's settings (a reload): the snapshot is rebuilt for a new policy, and probes
    /// restart when their settings changed (keeping each backend's health, unless probes or the
    /// agent are turned off: then what they said is forgotten, and that is published).
    pub(crate) fn update_settings(&self, new: PoolSettings) {
        let mut ts = Vec::new();
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
                    if let Some(was) = b.forget_health() {
                        ts.push(Transition::Health {
                            backend: b.addr,
                            health: Health::Unknown,
                            was,
                            error: None,
                            on_down: self.settings().on_down,
                            sessions: b.active(),
                        });
                    }
                }
                self.spawn_probes(&mut inner, b);
            }
        }
        if old.agent != self.settings().agent {
            for (_, stop) in inner.agent_tasks.drain() {
                stop.cancel();
            }
            let members = inner.members.clone();
            for b in &members {
                if self.settings().agent.is_none() {
                    if let Some((was, _)) = b.observe_agent(AgentSays::Unknown, Some(100)) {
                        ts.push(Transition::Agent {
                            backend: b.addr,
                            says: AgentSays::Unknown,
                            was,
                            weight_pct: 100,
                            sessions: b.active(),
                        });
                    }
                }
                self.spawn_agent(&mut inner, b);
            }
        }
        self.rebuild_locked(&mut inner);
        drop(inner);
        self.publish(ts);
    }

    /// Stops the pool's probes and timers (its service was removed by a reload).
    pub(crate) fn stop(&self) {
        let mut inner = lock(&self.inner);
        let tasks = std::mem::take(&mut inner.probe_tasks)
            .into_values()
            .chain(std::mem::take(&mut inner.agent_tasks).into_values());
        for stop in tasks {
            stop.cancel();
        }
        if let Some(t) = inner.tasks.take() {
            t.stop.cancel();
        }
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
        for (addr, desired) in diff.kept {
            let Some(b) = by_addr.remove(&addr) else {
                continue;
            };
            let (weight, tier) = (desired.weight.get(), desired.tier);
            let changed = b.claim(desired.into());
            if changed.weight || changed.tier {
                ts.push(Transition::Reweighted {
                    backend: addr,
                    weight,
                    tier,
                });
            }
            kept.push(b);
        }
        for (addr, desired) in diff.added {
            // A backend that left recently comes back with its counters (and its live sessions).
            let b = match inner.departed.iter().position(|(d, _)| d.addr == addr) {
                Some(i) => inner.departed.swap_remove(i).0,
                None => Arc::new(Backend::new(addr, desired.weight)),
            };
            ts.push(Transition::Added {
                backend: addr,
                weight: desired.weight.get(),
                tier: desired.tier,
                sources: desired.sources.clone(),
                probed: self.settings().probes.is_some(),
            });
            b.join(desired.into(), inner.warm);
            self.spawn_probes(inner, &b);
            self.spawn_agent(inner, &b);
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
        let generation = b.depart();
        for tasks in [&mut inner.probe_tasks, &mut inner.agent_tasks] {
            if let Some(stop) = tasks.remove(&b.addr) {
                stop.cancel();
            }
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
                    if b.same_generation(generation) && b.active() > 0 {
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

    /// Publishes a new snapshot from the members' current state: the serving tier decided anew,
    /// and its eligible backends. Newly eligible backends start their slow-start ramp here, whatever
    /// made them eligible. A change of the serving tier is queued for the next `publish`, which every
    /// caller makes once it has released the lock.
    fn rebuild_locked(&self, inner: &mut Inner) {
        let previous = self.snapshot.load();
        let was_ready: HashSet<*const Backend> = previous.ready.iter().map(Arc::as_ptr).collect();
        let settings = self.settings();
        let probed = settings.probes.is_some();
        let eligible: Vec<bool> = inner.members.iter().map(|b| b.eligible(probed)).collect();
        let available: BTreeSet<u32> = inner
            .members
            .iter()
            .zip(&eligible)
            .filter(|(_, e)| **e)
            .map(|(b, _)| b.tier())
            .collect();
        let now = Instant::now();
        let decision = inner
            .tiers
            .decide(&available, settings.failback, !inner.warm, now);
        let serving = self.serving_set(inner, &eligible, decision.serving, &settings);
        let ready: Vec<Arc<Backend>> = inner
            .members
            .iter()
            .zip(&serving)
            .filter(|(_, s)| **s)
            .map(|(b, _)| b.clone())
            .collect();
        let mut ramping = false;
        for b in &ready {
            let newly = !was_ready.contains(&Arc::as_ptr(b));
            ramping |= b.ramp(newly, settings.slow_start, now);
        }
        let (candidates, selector) = if settings.policy == Policy::SourceHash {
            // Every member, sorted, with the serving ones marked: balancers that see the same
            // members in the same states pick alike, whichever tier serves.
            let mut members: Vec<(Arc<Backend>, bool)> =
                inner.members.iter().cloned().zip(serving).collect();
            members.sort_by_key(|(b, _)| b.addr);
            let (members, marks): (Vec<Arc<Backend>>, Vec<bool>) = members.into_iter().unzip();
            let selector = Selector::over_members(&members, marks);
            (members, selector)
        } else {
            (ready.clone(), Selector::over_ready(settings.policy, &ready))
        };
        self.snapshot.store(Arc::new(Snapshot {
            ready,
            candidates,
            selector,
            serving_tier: decision.serving,
        }));
        if ramping {
            self.keep_ramping(inner, settings.slow_start);
        }
        if let Some(at) = decision.wake_at {
            self.wake_for_failback(inner, at);
        }
        if let Some(change) = decision.change {
            inner.pending.push(Transition::Tier {
                change,
                held: false,
            });
        } else if let (true, Some(serving)) = (decision.held_began, decision.serving) {
            inner.pending.push(Transition::Tier {
                change: TierChange {
                    from: Some(serving),
                    to: serving,
                    reason: TierReason::Failback,
                },
                held: true,
            });
        }
    }

    /// Which members take new connections: the eligible ones of the serving tier; of a backup tier
    /// (worse than the best among the members) only the first by rank, unless `all_backups`.
    fn serving_set(
        &self,
        inner: &Inner,
        eligible: &[bool],
        serving: Option<u32>,
        settings: &PoolSettings,
    ) -> Vec<bool> {
        let mut set: Vec<bool> = inner
            .members
            .iter()
            .zip(eligible)
            .map(|(b, e)| *e && Some(b.tier()) == serving)
            .collect();
        let primary = inner.members.iter().map(|b| b.tier()).min();
        if serving.is_some() && serving != primary && !settings.all_backups {
            let first = inner
                .members
                .iter()
                .enumerate()
                .filter(|(i, _)| set[*i])
                .min_by_key(|(_, b)| (b.rank(), b.addr))
                .map(|(i, _)| i);
            for (i, s) in set.iter_mut().enumerate() {
                *s = Some(i) == first;
            }
        }
        set
    }

    /// Rebuilds the snapshot at `at` (an `after` failback's wait ends), unless a wake-up at or
    /// before it is scheduled already. Called with the lock held.
    fn wake_for_failback(&self, inner: &mut Inner, at: Instant) {
        if inner.tier_wake.is_some_and(|w| w <= at) {
            return;
        }
        inner.tier_wake = Some(at);
        inner.spawn(move |pool, stop| async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep_until(at) => {
                    {
                        let mut inner = lock(&pool.inner);
                        if inner.tier_wake == Some(at) {
                            inner.tier_wake = None;
                        }
                        pool.rebuild_locked(&mut inner);
                    }
                    pool.publish(Vec::new());
                }
            }
        });
    }

    /// An operator's failback (`POST /services/{name}/failback`): traffic goes to the best tier
    /// with an eligible backend, if it is better than the serving one. Returns the change, or
    /// `None` when the best tier serves already.
    pub(crate) fn failback(&self) -> Option<TierChange> {
        let mut inner = lock(&self.inner);
        let probed = self.settings().probes.is_some();
        let available: BTreeSet<u32> = inner
            .members
            .iter()
            .filter(|b| b.eligible(probed))
            .map(|b| b.tier())
            .collect();
        let change = inner.tiers.failback(&available)?;
        self.rebuild_locked(&mut inner);
        drop(inner);
        self.publish(vec![Transition::Tier {
            change,
            held: false,
        }]);
        Some(change)
    }

    /// Whether failback holds traffic on a worse tier than the best eligible one.
    pub fn failback_held(&self) -> bool {
        lock(&self.inner).tiers.held()
    }
}

/// A DNS watcher's answers become the claim of its name.
impl Claims for Pool {
    fn claim(&self, finder: &Finder, found: Vec<Claimed>) {
        self.reconcile(Source::from(finder), found);
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
    use crate::config::Weight;

    fn pool(max_fails: u32) -> Arc<Pool> {
        let settings = PoolSettings {
            policy: Policy::RoundRobin,
            passive: Passive {
                max_fails,
                cooldown: Duration::from_secs(10),
            },
            probes: None,
            on_down: OnDown::Keep,
            on_removed: OnRemoved::Drain,
            removed_drain: Duration::from_secs(30),
            slow_start: Duration::ZERO,
            agent: None,
            all_backups: false,
            failback: Failback::Immediate,
        };
        let p = Arc::new(Pool::new("t".into(), settings, EventBus::default()));
        let members: Vec<_> = (1..=3)
            .map(|i| (SocketAddr::from(([127, 0, 0, i], 80)), Weight::ONE))
            .collect();
        p.reconcile(Source::Static, members);
        p.start(CancellationToken::new());
        p
    }

    /// Under tokio's paused clock: the backend stays out for exactly its cool-down (10 s, passed
    /// without waiting), then returns on probation.
    #[tokio::test(start_paused = true)]
    async fn ejection_after_max_fails_and_return_on_probation() {
        let p = pool(2);
        let cooldown = p.settings().passive.cooldown;
        let b = p.members()[0].clone();
        assert_eq!(p.connect_failed(&b), None);
        assert_eq!(p.connect_failed(&b), Some(2), "the second failure ejects");
        // The control runtime (this test's) rebuilds the snapshot without it.
        tokio::task::yield_now().await;
        assert_eq!(p.snapshot().ready.len(), 2);
        assert!(p.snapshot().ready.iter().all(|r| r.addr != b.addr));
        tokio::time::sleep(cooldown - Duration::from_millis(1)).await;
        assert_eq!(
            p.snapshot().ready.len(),
            2,
            "still out just before the cool-down ends"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(p.snapshot().ready.len(), 3, "back after the cool-down");
        // on probation: one more failure ejects again
        assert_eq!(
            p.connect_failed(&b),
            Some(2),
            "on probation: one failure ejects"
        );
        assert_eq!(b.stats.failed(), 3);
    }

    /// Under tokio's paused clock: a backend that joins a warm pool ramps over `slow_start` (10 s)
    /// from a tenth of its weight, grows while the window runs, and is at full weight, ramping no
    /// more, once the window has passed.
    #[tokio::test(start_paused = true)]
    async fn a_late_joiner_ramps_over_the_slow_start_window() {
        let p = pool(1);
        let mut settings = (*p.settings()).clone();
        settings.slow_start = Duration::from_secs(10);
        p.update_settings(settings);
        p.warmed_up();
        let mut members: Vec<_> = p.members().iter().map(|b| (b.addr, Weight::ONE)).collect();
        let new = SocketAddr::from(([127, 0, 0, 9], 80));
        members.push((new, Weight::new(10).unwrap()));
        p.reconcile(Source::Static, members);
        let b = p.members().into_iter().find(|b| b.addr == new).unwrap();
        let full = 10 * WEIGHT_SCALE;
        let start = b.eff_weight();
        assert!(start < full / 5, "starts low: {start}");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let half = b.eff_weight();
        assert!(start < half && half < full, "grows: {start} → {half}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(b.eff_weight(), full, "full once the window passed");
        assert!(!b.ramping());
    }

    /// Under tokio's paused clock: a removed backend with a session open is drained for
    /// `removed_drain` (30 s); its sessions are cut at that deadline, not a moment before.
    #[tokio::test(start_paused = true)]
    async fn a_removed_backend_is_cut_at_its_drain_deadline() {
        let p = pool(1);
        let b = p.members()[0].clone();
        let session = ActiveGuard::within(b.clone(), None).unwrap();
        let cut = b.cut_signal();
        let keep: Vec<_> = p.members()[1..]
            .iter()
            .map(|b| (b.addr, Weight::ONE))
            .collect();
        p.reconcile(Source::Static, keep);
        let mut cut_at = std::pin::pin!(cut.cut());
        let early = tokio::time::timeout(Duration::from_secs(29), &mut cut_at).await;
        assert!(early.is_err(), "still draining before the deadline");
        let reason = tokio::time::timeout(Duration::from_secs(2), cut_at)
            .await
            .expect("cut at the deadline");
        assert_eq!(reason, Outcome::BackendRemoved);
        drop(session);
    }

    /// An ejection seen on a worker takes effect on the very next pick, though the worker builds
    /// nothing: the snapshot it sees is the old one until the control runtime rebuilds it.
    #[tokio::test]
    async fn ejection_is_immediate_and_the_rebuild_runs_on_the_control_runtime() {
        for policy in [
            Policy::RoundRobin,
            Policy::WeightedRoundRobin,
            Policy::LeastConn,
            Policy::P2c,
            Policy::SourceHash,
        ] {
            let p = pool(1);
            let mut settings = (*p.settings()).clone();
            settings.policy = policy;
            p.update_settings(settings);
            let b = p.members()[1].clone();
            let snapshot_id = |p: &Pool| Arc::as_ptr(&*p.snapshot()) as usize;
            let before = snapshot_id(&p);
            // A worker thread: it cannot run the control runtime's tasks (this one, which is
            // blocked in `join` meanwhile).
            let (pool2, b2) = (p.clone(), b.clone());
            let picks = std::thread::spawn(move || {
                assert!(pool2.connect_failed(&b2).is_some());
                let unchanged = snapshot_id(&pool2) == before;
                let picks: Vec<SocketAddr> = (0..100u32)
                    .filter_map(|i| {
                        let client = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4000));
                        pool2.snapshot().pick(client, &[]).map(|b| b.addr)
                    })
                    .collect();
                (unchanged, picks)
            })
            .join()
            .unwrap();
            let (unchanged, picks) = picks;
            assert!(unchanged, "{policy:?}: the worker built no snapshot");
            assert_eq!(
                picks.len(),
                100,
                "{policy:?}: the others still take clients"
            );
            assert!(
                picks.iter().all(|a| *a != b.addr),
                "{policy:?}: the ejected backend got no new connection"
            );
            tokio::time::timeout(Duration::from_secs(5), async {
                while p.snapshot().ready.iter().any(|r| r.addr == b.addr) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the control runtime rebuilt the snapshot");
        }
    }

    /// A reload that turns probes or the agent off forgets what they said, and says so: the backend's
    /// health back to unknown and its agent's word gone are published like any other transition.
    #[tokio::test]
    async fn a_reload_that_turns_probes_and_the_agent_off_publishes_what_it_forgets() {
        let p = pool(1);
        let mut events = p.events.subscribe();
        let b = p.members()[0].clone();
        b.observe_health(Health::Unhealthy);
        b.observe_agent(AgentSays::Drain, Some(50));
        let mut settings = (*p.settings()).clone();
        // Probes and the agent on, then off again with no await between: on this test's one thread
        // no probe runs meanwhile.
        let health = serde_yaml::from_str("{kind: tcp, interval: 1h}").unwrap();
        settings.probes = ProbeSpec::from_config("t", &health, None).map(Arc::new);
        settings.agent = Some(serde_yaml::from_str("{port: 9, interval: 1h}").unwrap());
        p.update_settings(settings.clone());
        settings.probes = None;
        settings.agent = None;
        p.update_settings(settings);
        assert_eq!(b.health(), Health::Unknown);
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e.to_string());
        }
        let about_b = |kind: &str| {
            seen.iter()
                .filter(|e| e.contains(kind) && e.contains(&b.addr.to_string()))
                .count()
        };
        assert_eq!(about_b("\"backend_health\""), 1, "{seen:?}");
        assert_eq!(about_b("\"backend_agent\""), 1, "{seen:?}");
    }

    #[tokio::test]
    async fn the_admin_api_adds_up_to_its_limit() {
        let p = pool(1);
        let a = |i: usize| SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 80));
        for i in 0..MAX_API_BACKENDS {
            p.add_api(a(i), Weight::ONE).unwrap();
        }
        assert_eq!(
            p.add_api(a(MAX_API_BACKENDS), Weight::ONE),
            Err(AdminError::ApiLimit(MAX_API_BACKENDS))
        );
        assert_eq!(p.members().len(), MAX_API_BACKENDS + 3, "nothing added");
        // A removal makes room again.
        p.remove_api(a(0), true).unwrap();
        p.add_api(a(MAX_API_BACKENDS), Weight::ONE).unwrap();
        // The whole pool is capped too, whatever the sources of its members.
        let many: Vec<_> = (0..MAX_API_POOL)
            .map(|i| {
                (
                    SocketAddr::from(([10, 2, (i >> 8) as u8, i as u8], 80)),
                    Weight::ONE,
                )
            })
            .collect();
        let p = pool(1);
        p.reconcile(Source::Static, many);
        assert_eq!(
            p.add_api(a(0), Weight::ONE),
            Err(AdminError::PoolFull(MAX_API_POOL))
        );
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
        let w = |n| Weight::new(n).unwrap();
        p.member(a(2))
            .unwrap()
            .stats
            .add(&[("total".to_string(), 7)].into());
        let ts = p.reconcile(Source::Static, vec![(a(2), w(4)), (a(4), w(1))]);
        assert_eq!(ts.len(), 4, "{ts:?}");
        assert!(ts.contains(&Transition::Reweighted {
            backend: a(2),
            weight: 4,
            tier: 0,
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
        assert_eq!(p.member(a(2)).unwrap().stats.total(), 7);
        // The same claim again changes nothing.
        assert!(p
            .reconcile(Source::Static, vec![(a(2), w(4)), (a(4), w(1))])
            .is_empty());
        // A backend that comes back within the memory window gets its counters back.
        p.member(a(4))
            .unwrap()
            .stats
            .add(&[("total".to_string(), 5)].into());
        p.reconcile(Source::Static, vec![(a(2), w(4))]);
        p.reconcile(Source::Static, vec![(a(2), w(4)), (a(4), w(1))]);
        assert_eq!(p.member(a(4)).unwrap().stats.total(), 5);
    }
}
