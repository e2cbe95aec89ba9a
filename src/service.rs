//! A configured service at run time: its settings, its pool and its counters.
//!
//! A `Service` is immutable. A reload builds the next version with [`Service::next`], which shares the
//! pool (members, health, counters) and stats of the current one; the reload applies the new pool
//! settings and static backends to that pool itself (`control/reload.rs`), then the accept loop
//! switches to the new version. Connections already open keep the settings they started with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admission::{BackendCaps, Limits, Queue, SourceTable};
use crate::config::{
    AcceptProxyConfig, BackendAddress, DiscoveryConfig, Policy, ProxyVersion, QueueConfig,
    ServiceConfig,
};
use crate::discovery::{self, NameSpec};
use crate::events::EventBus;
use crate::health::ProbeSpec;
use crate::outcome::Outcome;
use crate::pool::{Passive, Pool, PoolSettings, Source};
use crate::relay::RelayOptions;

/// One service as configured now: a listening address's settings, its backends and its counters.
pub struct Service {
    pub name: Arc<str>,
    pub policy: Policy,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub max_connections: u64,
    pub(crate) relay: RelayOptions,
    /// The PROXY header sent to backends.
    pub(crate) proxy_protocol: Option<ProxyVersion>,
    /// Reading a PROXY header from the balancers in front.
    pub(crate) accept_proxy: Option<AcceptProxyConfig>,
    pub(crate) limits: Limits,
    pub(crate) caps: BackendCaps,
    pub(crate) queue: Option<QueueConfig>,
    /// Shared by every version of the service across reloads.
    pub stats: Arc<ServiceStats>,
    /// The DNS names among the configured backends, each watched by a `discovery` task.
    pub(crate) names: Vec<NameSpec>,
    pub(crate) discovery: DiscoveryConfig,
    events: EventBus,
}

#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now.
    pub active: AtomicU64,
    /// Whether the last selection found no backend; logged only when it flips.
    no_backend_now: AtomicBool,
    /// Times the service went into or out of "no backend available".
    pub no_backend_transitions: AtomicU64,
    /// Client connections by how they ended (relayed or refused), indexed like [`Outcome::ALL`].
    ends: [AtomicU64; Outcome::ALL.len()],
    /// Relayed connections in which at least one direction ran on splice.
    pub spliced: AtomicU64,
    /// Relayed connections that ran on the io_uring engine.
    pub uring: AtomicU64,
    /// Bytes of finished connections, client → backend and back.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// The open client connections' start times, for the oldest connection's age.
    pub sessions: Sessions,
    /// Open connections and recent rates per client address (`limits`).
    pub(crate) sources: Arc<SourceTable>,
    /// Connections waiting for a backend below its cap (`queue`).
    pub(crate) queue: Arc<Queue>,
    /// Refused PROXY headers are logged at most once a second.
    pub(crate) proxy_warnings: Mutex<crate::util::RateLimited>,
}

/// Start times of the open client connections. Ids grow with time, so the smallest open id of a shard
/// is its oldest connection; sharded so the data plane's threads rarely meet on one lock.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    shards: [Mutex<BTreeMap<u64, Instant>>; SESSION_SHARDS],
}

const SESSION_SHARDS: usize = 8;

impl Sessions {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        self.shards[id as usize % SESSION_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn enter(&self) -> u64 {
        let id = self.next.fetch_add(1, Relaxed);
        self.shard(id).insert(id, Instant::now());
        id
    }

    pub(crate) fn leave(&self, id: u64) {
        self.shard(id).remove(&id);
    }

    /// Age of the oldest open connection.
    pub fn oldest_age(&self) -> Option<Duration> {
        (0..SESSION_SHARDS as u64)
            .filter_map(|i| self.shard(i).first_key_value().map(|(_, t)| t.elapsed()))
            .max()
    }
}

impl ServiceStats {
    pub(crate) fn count(&self, outcome: Outcome) {
        self.ends[outcome.index()].fetch_add(1, Relaxed);
    }

    /// Clients waiting in the queue for a backend below its cap.
    pub fn queue_waiting(&self) -> u64 {
        self.queue.waiting()
    }

    /// Client connections that ended with `outcome`.
    pub fn ended(&self, outcome: Outcome) -> u64 {
        self.ends[outcome.index()].load(Relaxed)
    }

    /// Every counter on one line, for diagnostics.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "accepted={} active={}",
            self.accepted.load(Relaxed),
            self.active.load(Relaxed),
        );
        for e in Outcome::ALL {
            s += &format!(" {}={}", e.as_str(), self.ended(e));
        }
        s
    }
}

/// The pool settings `cfg` asks for.
pub(crate) fn pool_settings(cfg: &ServiceConfig) -> PoolSettings {
    let discovery = cfg.discovery.clone().unwrap_or_default();
    PoolSettings {
        policy: cfg.balance,
        passive: Passive {
            max_fails: cfg.passive.max_fails,
            cooldown: cfg.passive.cooldown.0,
        },
        probes: ProbeSpec::from_config(&cfg.health).map(Arc::new),
        on_down: cfg.health.on_down,
        on_removed: discovery.on_removed,
        removed_drain: discovery.drain_timeout.0,
        slow_start: cfg.slow_start.0,
    }
}

/// The backends `cfg` lists by address (the names are claimed by their DNS watchers).
pub(crate) fn static_backends(cfg: &ServiceConfig) -> Vec<(SocketAddr, u32)> {
    cfg.backends
        .iter()
        .filter_map(|b| match b.address {
            BackendAddress::Ip(a) => Some((a, b.weight)),
            BackendAddress::Name { .. } => None,
        })
        .collect()
}

impl Service {
    /// A new service for `cfg`: a new pool holding the static backends, and counters from zero.
    pub(crate) fn new(cfg: &ServiceConfig, events: &EventBus) -> Service {
        let pool = Arc::new(Pool::new(
            cfg.name.as_str().into(),
            pool_settings(cfg),
            events.clone(),
        ));
        pool.reconcile(Source::Static, static_backends(cfg));
        Service::with(cfg, pool, Arc::new(ServiceStats::default()), events)
    }

    /// The next version of this service for `cfg` (a reload): the same pool and counters. The caller
    /// has already applied `cfg`'s pool settings and static backends to the pool.
    pub(crate) fn next(&self, cfg: &ServiceConfig) -> Service {
        Service::with(cfg, self.pool.clone(), self.stats.clone(), &self.events)
    }

    fn with(
        cfg: &ServiceConfig,
        pool: Arc<Pool>,
        stats: Arc<ServiceStats>,
        events: &EventBus,
    ) -> Service {
        Service {
            pool,
            names: discovery::names(cfg),
            discovery: cfg.discovery.clone().unwrap_or_default(),
            events: events.clone(),
            name: cfg.name.as_str().into(),
            policy: cfg.balance,
            connect_timeout: cfg.connect_timeout.0,
            connect_attempts: cfg.connect_attempts,
            max_connections: cfg.max_connections as u64,
            relay: RelayOptions {
                mode: crate::relay::engine_for(cfg.relay, &cfg.name),
                idle_timeout: cfg.idle_timeout.0,
                half_close_timeout: cfg.half_close_timeout.0,
            },
            proxy_protocol: cfg.proxy_protocol,
            accept_proxy: cfg.accept_proxy.clone(),
            limits: Limits::from_config(&cfg.limits),
            caps: BackendCaps::from_config(cfg),
            queue: cfg.queue,
            stats,
        }
    }

    /// Notes whether a selection found a backend, logging only the transitions into and out of
    /// "no backend available". The common case is one relaxed load.
    pub(crate) fn note_selection(&self, found: bool) {
        if self.stats.no_backend_now.load(Relaxed) == found
            && self.stats.no_backend_now.swap(!found, Relaxed) == found
        {
            self.stats.no_backend_transitions.fetch_add(1, Relaxed);
            if found {
                tracing::info!(service = %self.name, "backends available again");
            } else {
                tracing::warn!(service = %self.name, "no backend available: closing new clients at once");
            }
            self.events.publish(
                "service_backends",
                json!({"service": &*self.name, "available": found}),
            );
        }
    }
}
