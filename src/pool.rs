//! A service's backends: their counters, their eligibility, and the snapshot the hot path reads.
//!
//! The hot path (select → connect) loads one [`Snapshot`] through `ArcSwap` and touches only per-backend
//! atomics. Everything that changes who is eligible (passive ejection now; health and discovery later)
//! builds a new snapshot off the hot path, under `rebuild`'s mutex, so selection never takes a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::balance::Selector;
use crate::config::Policy;

/// One upstream address and everything counted about it. Counters live as long as the backend does, so
/// rebuilding snapshots never resets them.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub stats: BackendStats,
    /// Consecutive connect failures; reset by a successful connect.
    consecutive_fails: AtomicU32,
    /// Passive ejection: no new connections until the cool-down ends.
    ejected: AtomicBool,
}

#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections counted from the start of their connect (least-connections relies on that).
    pub active: AtomicU64,
    /// Connections established to this backend.
    pub total: AtomicU64,
    /// Connect attempts that failed (timeout, refused, reset).
    pub failed: AtomicU64,
    /// Bytes forwarded client → backend, added when a connection ends.
    pub bytes_up: AtomicU64,
    /// Bytes forwarded backend → client, added when a connection ends.
    pub bytes_down: AtomicU64,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32) -> Backend {
        Backend {
            addr,
            weight: weight.max(1),
            stats: BackendStats::default(),
            consecutive_fails: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
        }
    }

    pub fn active(&self) -> u64 {
        self.stats.active.load(Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Relaxed)
    }
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

/// A change of a backend's eligibility, returned so callers log and count it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Ejected,
    Returned,
}

pub struct Pool {
    service: Arc<str>,
    policy: Policy,
    passive: Passive,
    members: Vec<Arc<Backend>>,
    snapshot: ArcSwap<Snapshot>,
    /// Serialises snapshot rebuilds so two concurrent transitions cannot publish a stale set.
    rebuild_lock: Mutex<()>,
}

impl Pool {
    pub fn new(
        service: Arc<str>,
        policy: Policy,
        passive: Passive,
        members: Vec<Arc<Backend>>,
    ) -> Pool {
        let snapshot = ArcSwap::from_pointee(build(policy, &members));
        Pool {
            service,
            policy,
            passive,
            members,
            snapshot,
            rebuild_lock: Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    pub fn members(&self) -> &[Arc<Backend>] {
        &self.members
    }

    pub fn policy(&self) -> Policy {
        self.policy
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
        let fails = backend.consecutive_fails.fetch_add(1, Relaxed) + 1;
        if self.passive.max_fails == 0 || fails < self.passive.max_fails {
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
            cooldown_ms = self.passive.cooldown.as_millis() as u64,
            "backend ejected after consecutive connect failures"
        );
        let pool = Arc::clone(self);
        let backend = Arc::clone(backend);
        tokio::spawn(async move {
            tokio::time::sleep(pool.passive.cooldown).await;
            pool.reinstate(&backend);
        });
        Some(Transition::Ejected)
    }

    /// Ends an ejection. The backend comes back on probation: one more failure ejects it again, so a
    /// backend that is still dead costs one connect attempt per cool-down, not `max_fails`.
    fn reinstate(&self, backend: &Backend) {
        backend
            .consecutive_fails
            .store(self.passive.max_fails.saturating_sub(1), Relaxed);
        if backend.ejected.swap(false, Relaxed) {
            self.rebuild();
            tracing::info!(service = %self.service, backend = %backend.addr, "backend returned after cool-down");
        }
    }

    fn rebuild(&self) {
        let _serial = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.snapshot
            .store(Arc::new(build(self.policy, &self.members)));
    }
}

fn build(policy: Policy, members: &[Arc<Backend>]) -> Snapshot {
    let ready: Vec<Arc<Backend>> = members
        .iter()
        .filter(|b| !b.is_ejected())
        .cloned()
        .collect();
    let selector = Selector::new(policy, &ready);
    Snapshot { ready, selector }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_fails: u32) -> Arc<Pool> {
        let members = (1..=3)
            .map(|i| Arc::new(Backend::new(SocketAddr::from(([127, 0, 0, i], 80)), 1)))
            .collect();
        Arc::new(Pool::new(
            "t".into(),
            Policy::RoundRobin,
            Passive {
                max_fails,
                cooldown: Duration::from_millis(50),
            },
            members,
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
