//! Who may come in, and how much they may take, decided before any backend is contacted: the
//! top-level connection cap ([`Gate`]), allow and deny lists and per-source limits ([`Limits`],
//! [`SourceTable`]), and per-backend caps with their queue ([`BackendCaps`], [`Queue`]).
//!
//! The process's runtime deny list and the ban decision are in `deny` ([`DenyList`], held by the
//! [`Gate`]; [`Breaches`]).
//!
//! Each decision is a counter or a table lookup under one short lock; a refusal costs no connect.
//! The tables outlive reloads (a reload swaps only the limits they are checked against), so open
//! connections stay counted.

mod deny;

#[cfg(test)]
pub(crate) use deny::DenySource;
pub(crate) use deny::{Breach, Breaches, Denied, DenyError, DenyList, DenyView, METRICS};

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::time::Instant;

use tokio::sync::Notify;

use crate::config::{ip_v4_mapped, BackendAddress, BanConfig, Cidr, LimitsConfig, ServiceConfig};
use crate::pool::{Backend, Source};
use crate::util::lock;

/// The top-level `max_connections`: client connections open over every service; and the
/// process's deny list, checked at accept (the gate is what every accept loop holds, and it lives
/// as long as the process, across reloads).
#[derive(Debug)]
pub(crate) struct Gate {
    open: AtomicU64,
    max: AtomicU64,
    pub(crate) deny: DenyList,
}

impl Gate {
    pub(crate) fn new(max: Option<u32>) -> Gate {
        let g = Gate {
            open: AtomicU64::new(0),
            max: AtomicU64::new(u64::MAX),
            deny: DenyList::default(),
        };
        g.set_max(max);
        g
    }

    /// A reload's new cap; connections already open stay.
    pub(crate) fn set_max(&self, max: Option<u32>) {
        self.max.store(max.map_or(u64::MAX, u64::from), Relaxed);
    }

    pub(crate) fn open(&self) -> u64 {
        self.open.load(Relaxed)
    }

    /// `None` when the cap is reached.
    pub(crate) fn enter(self: &Arc<Gate>) -> Option<GateSlot> {
        let prev = self.open.fetch_add(1, Relaxed);
        if prev >= self.max.load(Relaxed) {
            self.open.fetch_sub(1, Relaxed);
            return None;
        }
        Some(GateSlot(self.clone()))
    }

    /// A connection that is open already (carried in by an upgrade): counted even above the cap.
    pub(crate) fn enter_anyway(self: &Arc<Gate>) -> GateSlot {
        self.open.fetch_add(1, Relaxed);
        GateSlot(self.clone())
    }
}

/// One connection counted by the [`Gate`]; released on drop.
#[derive(Debug)]
pub(crate) struct GateSlot(Arc<Gate>);

impl GateSlot {
    pub(crate) fn deny(&self) -> &DenyList {
        &self.0.deny
    }
}

impl Drop for GateSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// A service's `limits`, as checked now.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    per_source_connections: Option<u32>,
    per_source_rate: Option<u32>,
    /// Refusals by the two above that ban a source.
    pub(crate) ban: Option<BanConfig>,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Denied,
    SourceLimit,
}

impl Limits {
    pub(crate) fn from_config(c: &LimitsConfig) -> Limits {
        Limits {
            allow: c.allow.clone(),
            deny: c.deny.clone(),
            per_source_connections: c.per_source_connections,
            per_source_rate: c.per_source_rate,
            ban: c.ban,
        }
    }

    /// Deny wins over allow; an empty allow list allows everyone.
    pub(crate) fn permits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }

    fn tracks_sources(&self) -> bool {
        self.per_source_connections.is_some() || self.per_source_rate.is_some()
    }
}

/// The key one client counts under: its address, with an IPv4 address seen through a dual-stack
/// socket as plain IPv4, and IPv6 by /64 (one host usually holds a whole /64, so counting single
/// IPv6 addresses would let one client take 2^64 shares).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip_v4_mapped(ip).unwrap_or(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug)]
struct SourceEntry {
    open: u32,
    /// New connections it may still open now (a token bucket a second's worth deep).
    tokens: f64,
    refilled: Instant,
}

const SOURCE_SHARDS: usize = 16;
/// Room in each shard beyond the service's `max_connections`, for sources that hold no connection
/// but are still being rate-limited.
const RATE_ROOM: usize = 1024;

/// Per-source counts of one service, shared by its versions across reloads.
///
/// Memory is bounded: a shard holds at most `max_connections + 1024` entries. Entries with open
/// connections number at most `max_connections` (each open connection holds one), so they always
/// fit; when a shard is full of sources that hold none (a flood from many addresses), it forgets
/// those, which can let such a source open a few more than its rate but never grows the table.
#[derive(Debug, Default)]
pub(crate) struct SourceTable {
    shards: [Mutex<HashMap<IpAddr, SourceEntry>>; SOURCE_SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

impl SourceTable {
    fn shard(&self, key: IpAddr) -> &Mutex<HashMap<IpAddr, SourceEntry>> {
        use std::hash::BuildHasher;
        &self.shards[self.hasher.hash_one(key) as usize % SOURCE_SHARDS]
    }

    /// Sources tracked now (for the metrics).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Admits a new connection from `ip` under `limits`, or says why not. `max_connections` is the
    /// service's cap, which bounds the table.
    pub(crate) fn admit(
        self: &Arc<SourceTable>,
        ip: IpAddr,
        limits: &Limits,
        max_connections: u64,
        now: Instant,
    ) -> Result<Option<SourceSlot>, Refusal> {
        if !limits.permits(ip) {
            return Err(Refusal::Denied);
        }
        if !limits.tracks_sources() {
            return Ok(None);
        }
        let key = source_key(ip);
        let rate = limits.per_source_rate.map(f64::from);
        let cap = (max_connections as usize).saturating_add(RATE_ROOM);
        let mut shard = lock(self.shard(key));
        if !shard.contains_key(&key) && shard.len() >= cap {
            shard.retain(|_, e| e.open > 0 || !refilled(e, rate, now));
            if shard.len() >= cap {
                shard.retain(|_, e| e.open > 0);
            }
        }
        let e = shard.entry(key).or_insert_with(|| SourceEntry {
            open: 0,
            tokens: rate.unwrap_or(0.0),
            refilled: now,
        });
        if let Some(max) = limits.per_source_connections {
            if e.open >= max {
                return Err(Refusal::SourceLimit);
            }
        }
        if let Some(r) = rate {
            let elapsed = now.saturating_duration_since(e.refilled).as_secs_f64();
            e.tokens = (e.tokens + elapsed * r).min(r);
            e.refilled = now;
            if e.tokens < 1.0 {
                return Err(Refusal::SourceLimit);
            }
            e.tokens -= 1.0;
        }
        e.open += 1;
        Ok(Some(SourceSlot {
            table: self.clone(),
            key,
            rate,
        }))
    }
}

/// Whether a source's bucket is full again, so forgetting it changes nothing.
fn refilled(e: &SourceEntry, rate: Option<f64>, now: Instant) -> bool {
    match rate {
        None => true,
        Some(r) => e.tokens + now.saturating_duration_since(e.refilled).as_secs_f64() * r >= r,
    }
}

/// One open connection counted for its source; released on drop.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    table: Arc<SourceTable>,
    key: IpAddr,
    rate: Option<f64>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut shard = lock(self.table.shard(self.key));
        if let Some(e) = shard.get_mut(&self.key) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 && refilled(e, self.rate, Instant::now()) {
                shard.remove(&self.key);
            }
        }
    }
}

/// `backends[].max_connections` of one service: by address for the listed ones, by DNS name for the
/// ones a name resolves to. Backends the admin API or `replicas` add have no cap.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackendCaps {
    by_addr: HashMap<SocketAddr, u64>,
    by_name: HashMap<String, u64>,
}

impl BackendCaps {
    pub(crate) fn from_config(cfg: &ServiceConfig) -> BackendCaps {
        let mut caps = BackendCaps::default();
        for b in &cfg.backends {
            let Some(max) = b.max_connections else {
                continue;
            };
            match &b.address {
                BackendAddress::Ip(a) => {
                    caps.by_addr.insert(*a, u64::from(max));
                }
                name @ BackendAddress::Name { .. } => {
                    caps.by_name.insert(name.to_string(), u64::from(max));
                }
                BackendAddress::Srv { name } => {
                    caps.by_name.insert(name.clone(), u64::from(max));
                }
                BackendAddress::Docker(d) => {
                    caps.by_name.insert(d.labels_text(), u64::from(max));
                }
            }
        }
        caps
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_addr.is_empty() && self.by_name.is_empty()
    }

    /// The cap on `b`, if any (the smallest of those its sources give it).
    pub(crate) fn cap_of(&self, b: &Backend) -> Option<u64> {
        if self.is_empty() {
            return None;
        }
        let by_name = b
            .sources()
            .iter()
            .filter_map(|s| match s {
                Source::Dns(label) | Source::Srv(label) | Source::Labels(label) => {
                    self.by_name.get(&**label).copied()
                }
                _ => None,
            })
            .min();
        match (self.by_addr.get(&b.addr).copied(), by_name) {
            (Some(a), Some(n)) => Some(a.min(n)),
            (a, n) => a.or(n),
        }
    }
}

/// Connections waiting for a backend below its cap (`queue`), shared by a service's versions.
#[derive(Default)]
pub(crate) struct Queue {
    waiting: AtomicU64,
    /// Woken whenever a capped backend's connection ends ([`Queue::slot_freed`]).
    pub(crate) freed: Notify,
    /// Called then too, once set ([`Queue::wake_with`]): the ring workers, whose waiting
    /// connections look again on a command, not on `freed`.
    wake: OnceLock<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("waiting", &self.waiting())
            .field("wakes", &self.wake.get().is_some())
            .finish()
    }
}

impl Queue {
    /// A capped backend's connection ended, on either data plane: every connection waiting looks
    /// again, whichever data plane it waits on (a reload can move a service between them with
    /// connections left on the other).
    pub(crate) fn slot_freed(&self) {
        self.freed.notify_waiters();
        if let Some(wake) = self.wake.get() {
            wake();
        }
    }

    /// Has [`Queue::slot_freed`] also call what `wake` gives (made on the first call only: one
    /// process has one set of ring workers). Called before a ring connection looks at the
    /// backends, so a slot freed after that look finds the call there.
    pub(crate) fn wake_with(&self, wake: impl FnOnce() -> Arc<dyn Fn() + Send + Sync>) {
        self.wake.get_or_init(wake);
    }

    pub(crate) fn waiting(&self) -> u64 {
        self.waiting.load(Relaxed)
    }

    /// A place in the queue, or `None` when `max` already wait.
    pub(crate) fn join(self: &Arc<Queue>, max: u32) -> Option<QueuePlace> {
        let prev = self.waiting.fetch_add(1, Relaxed);
        if prev >= u64::from(max) {
            self.waiting.fetch_sub(1, Relaxed);
            return None;
        }
        Some(QueuePlace(self.clone()))
    }
}

#[derive(Debug)]
pub(crate) struct QueuePlace(Arc<Queue>);

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(yaml: &str) -> Limits {
        Limits::from_config(&serde_yaml::from_str(yaml).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_an_empty_allow_allows_all() {
        let l = limits("{allow: [10.0.0.0/8, '2001:db8::/32'], deny: [10.1.0.0/16]}");
        assert!(l.permits(ip("10.2.3.4")));
        assert!(!l.permits(ip("10.1.3.4")), "deny wins");
        assert!(!l.permits(ip("192.0.2.1")), "outside allow");
        assert!(l.permits(ip("2001:db8::1")));
        assert!(
            l.permits(ip("::ffff:10.2.3.4")),
            "IPv4 through a dual-stack socket"
        );
        assert!(!l.permits(ip("::ffff:10.1.3.4")));
        let open = limits("{deny: [192.0.2.7]}");
        assert!(open.permits(ip("192.0.2.8")) && !open.permits(ip("192.0.2.7")));
    }

    #[test]
    fn per_source_connections_count_open_ones_and_release() {
        let t = Arc::new(SourceTable::default());
        let l = limits("{per_source_connections: 2}");
        let now = Instant::now();
        let a = t.admit(ip("192.0.2.1"), &l, 100, now).unwrap();
        let b = t.admit(ip("192.0.2.1"), &l, 100, now).unwrap();
        assert_eq!(
            t.admit(ip("192.0.2.1"), &l, 100, now).unwrap_err(),
            Refusal::SourceLimit
        );
        assert!(
            t.admit(ip("192.0.2.2"), &l, 100, now).is_ok(),
            "another source"
        );
        drop(a);
        let c = t.admit(ip("192.0.2.1"), &l, 100, now).unwrap();
        drop((b, c));
        assert_eq!(t.len(), 0, "a source with nothing open is forgotten");
    }

    #[test]
    fn the_rate_is_a_bucket_a_second_deep() {
        let t = Arc::new(SourceTable::default());
        let l = limits("{per_source_rate: 5}");
        let t0 = Instant::now();
        let mut ok = 0;
        for _ in 0..20 {
            if t.admit(ip("192.0.2.1"), &l, 100, t0).is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 5, "a burst of a second's worth");
        let t1 = t0 + Duration::from_millis(400);
        let later = (0..20)
            .filter(|_| t.admit(ip("192.0.2.1"), &l, 100, t1).is_ok())
            .count();
        assert_eq!(later, 2, "0.4 s refills two");
    }

    #[test]
    fn ipv6_counts_by_64() {
        let t = Arc::new(SourceTable::default());
        let l = limits("{per_source_connections: 1}");
        let now = Instant::now();
        let _a = t.admit(ip("2001:db8:1:2::1"), &l, 100, now).unwrap();
        assert!(t.admit(ip("2001:db8:1:2::ffff"), &l, 100, now).is_err());
        assert!(t.admit(ip("2001:db8:1:3::1"), &l, 100, now).is_ok());
    }

    #[test]
    fn a_flood_of_sources_cannot_grow_the_table_past_its_bound() {
        let t = Arc::new(SourceTable::default());
        let l = limits("{per_source_rate: 10}");
        let now = Instant::now();
        let max = 10u64;
        for i in 0..200_000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            let _ = t.admit(a, &l, max, now);
        }
        let bound = SOURCE_SHARDS * (max as usize + RATE_ROOM);
        assert!(t.len() <= bound, "{} entries, bound {bound}", t.len());
        // Sources with open connections are never the ones forgotten.
        let c = limits("{per_source_connections: 1, per_source_rate: 10}");
        let held = t.admit(ip("192.0.2.1"), &c, max, now).unwrap();
        for i in 0..200_000u32 {
            let _ = t.admit(
                IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000u32 + i)),
                &c,
                max,
                now,
            );
        }
        assert!(
            t.admit(ip("192.0.2.1"), &c, max, now).is_err(),
            "still counted"
        );
        drop(held);
    }

    #[test]
    fn the_gate_caps_and_releases() {
        let g = Arc::new(Gate::new(Some(2)));
        let a = g.enter().unwrap();
        let _b = g.enter().unwrap();
        assert!(g.enter().is_none());
        drop(a);
        assert!(g.enter().is_some());
        g.set_max(None);
        let many: Vec<_> = (0..100).filter_map(|_| g.enter()).collect();
        assert_eq!(many.len(), 100);
    }

    #[test]
    fn the_queue_is_bounded() {
        let q = Arc::new(Queue::default());
        let a = q.join(1).unwrap();
        assert!(q.join(1).is_none());
        drop(a);
        assert!(q.join(1).is_some());
    }
}
