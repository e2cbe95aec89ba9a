//! A configured service at run time: its settings, its pool and its counters.
//!
//! A `Service` is immutable: a reload builds a new one that shares the old one's pool (members, health,
//! counters) and stats, and the accept loop switches to it; connections already open keep the settings
//! they started with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{BackendAddress, DiscoveryConfig, Policy, ServiceConfig};
use crate::discovery::{self, NameSpec};
use crate::events::EventBus;
use crate::health::ProbeSpec;
use crate::pool::{Passive, Pool, PoolSettings, Source};
use crate::relay::{End, RelayOptions};

pub struct Service {
    pub name: Arc<str>,
    pub policy: Policy,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub max_connections: u64,
    pub relay: RelayOptions,
    /// Shared by every version of the service across reloads.
    pub stats: Arc<ServiceStats>,
    /// The DNS names among the configured backends, each watched by a [`discovery`] task.
    pub names: Vec<NameSpec>,
    pub discovery: DiscoveryConfig,
    events: EventBus,
}

#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Client connections open now.
    pub active: AtomicU64,
    /// Clients closed at once because no backend was available.
    pub no_backend: AtomicU64,
    /// Clients whose every connect attempt failed.
    pub connect_failed: AtomicU64,
    /// Clients closed at once because `max_connections` were open.
    pub over_limit: AtomicU64,
    /// Whether the last selection found no backend; logged only when it flips.
    no_backend_now: AtomicBool,
    /// Times the service went into or out of "no backend available".
    pub no_backend_transitions: AtomicU64,
    /// Relayed connections by how they ended, indexed like [`End::ALL`].
    pub ends: [AtomicU64; End::ALL.len()],
    /// Relayed connections in which at least one direction ran on splice.
    pub spliced: AtomicU64,
    /// Bytes of finished connections, client → backend and back.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// The open client connections' start times, for the oldest connection's age.
    pub sessions: Sessions,
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

    pub fn enter(&self) -> u64 {
        let id = self.next.fetch_add(1, Relaxed);
        self.shard(id).insert(id, Instant::now());
        id
    }

    pub fn leave(&self, id: u64) {
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
    pub fn count_end(&self, end: End) {
        self.ends[end.index()].fetch_add(1, Relaxed);
    }

    pub fn ended(&self, end: End) -> u64 {
        self.ends[end.index()].load(Relaxed)
    }

    /// Every counter on one line, for diagnostics.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "accepted={} active={} no_backend={} connect_failed={} over_limit={}",
            self.accepted.load(Relaxed),
            self.active.load(Relaxed),
            self.no_backend.load(Relaxed),
            self.connect_failed.load(Relaxed),
            self.over_limit.load(Relaxed)
        );
        for e in End::ALL {
            s += &format!(" {}={}", e.as_str(), self.ended(e));
        }
        s
    }
}

impl Service {
    /// The service for `cfg`. With `previous` (a reload), its pool and stats carry over: the pool takes
    /// the new settings and static backends by diff, and no counter is reset.
    pub fn from_config(
        cfg: &ServiceConfig,
        events: &EventBus,
        previous: Option<&Service>,
    ) -> Service {
        let name: Arc<str> = cfg.name.as_str().into();
        let statics: Vec<_> = cfg
            .backends
            .iter()
            .filter_map(|b| match b.address {
                BackendAddress::Ip(a) => Some((a, b.weight)),
                BackendAddress::Name { .. } => None, // claimed by its DNS watcher
            })
            .collect();
        let discovery = cfg.discovery.clone().unwrap_or_default();
        let settings = PoolSettings {
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
        };
        let (pool, stats) = match previous {
            Some(p) => {
                p.pool.update_settings(settings);
                (p.pool.clone(), p.stats.clone())
            }
            None => (
                Arc::new(Pool::new(name.clone(), settings, events.clone())),
                Arc::new(ServiceStats::default()),
            ),
        };
        pool.reconcile(Source::Static, statics);
        Service {
            pool,
            names: discovery::names(cfg),
            discovery,
            events: events.clone(),
            name,
            policy: cfg.balance,
            connect_timeout: cfg.connect_timeout.0,
            connect_attempts: cfg.connect_attempts,
            max_connections: cfg.max_connections as u64,
            relay: RelayOptions {
                mode: cfg.relay,
                idle_timeout: cfg.idle_timeout.0,
                half_close_timeout: cfg.half_close_timeout.0,
            },
            stats,
        }
    }

    /// Notes whether a selection found a backend, logging only the transitions into and out of
    /// "no backend available". The common case is one relaxed load.
    pub fn note_selection(&self, found: bool) {
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
