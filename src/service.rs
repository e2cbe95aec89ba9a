//! A configured service at run time: its settings, its pool and its counters.
//!
//! A `Service` is immutable. A reload builds the next version with [`Service::next`], which shares the
//! pool (members, health, counters) and stats of the current one; the reload applies the new pool
//! settings and static backends to that pool itself (`control/reload.rs`), then the accept loop
//! switches to the new version. Connections already open keep the settings they started with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::{Serialize, Serializer};

use crate::admission::{
    source_key, BackendCaps, Breach, Breaches, DenyList, Limits, Queue, SourceTable,
};
use crate::config::Weight;
use crate::config::{
    AcceptProxyConfig, BackendAddress, BackendPort, DiscoveryConfig, Policy, ProxyVersion,
    QueueConfig, ServiceConfig, Transport, UdpConfig,
};
use crate::discovery::{self, Claimed, NameSpec};
use crate::events::{Event, EventBus};
use crate::health::{AgentSays, Health, ProbeSpec};
use crate::metrics::{Family, Kind, Subject, Table};
use crate::outcome::Outcome;
use crate::pool::{
    Backend, BackendView, Histogram, Passive, Pool, PoolSettings, Source, State, CONNECT_BUCKETS,
};
use crate::relay::{PeerWatch, RelayOptions};
use crate::tls::ServiceTls;

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
    /// Which port a connection goes to on its backend.
    pub(crate) backend_port: BackendPort,
    /// Streams or datagrams.
    pub(crate) protocol: Transport,
    /// How a UDP service keeps its sessions (the defaults on a TCP one, unused).
    pub(crate) udp: UdpConfig,
    /// Its TLS, both ways, as read when this version was made (a reload reads the files again).
    pub(crate) tls: ServiceTls,
    /// Counters, shared by every version of the service across reloads.
    pub stats: Arc<ServiceStats>,
    /// Who is in the service now (open connections, per-source counts, the queue), shared by every
    /// version across reloads like the counters.
    pub(crate) occupancy: Arc<Occupancy>,
    /// The DNS names among the configured backends, each watched by a `discovery` task.
    pub(crate) names: Vec<NameSpec>,
    pub(crate) discovery: DiscoveryConfig,
    events: EventBus,
}

/// A service's counters, shared by every version of it across reloads. Written only through its
/// methods, each named for the event it counts (`accepted`, `relayed`, ...), so what a counter
/// means is decided here; everyone else reads.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Connections accepted.
    accepted: AtomicU64,
    /// Client connections open now.
    active: AtomicU64,
    /// Whether the last selection found no backend; logged only when it flips.
    no_backend_now: AtomicBool,
    /// Times the service went into or out of "no backend available".
    no_backend_transitions: AtomicU64,
    /// Client connections by how they ended (relayed or refused), indexed like [`Outcome::ALL`].
    ends: [AtomicU64; Outcome::ALL.len()],
    /// Relayed connections in which at least one direction ran on splice.
    spliced: AtomicU64,
    /// Relayed connections the ring workers carried (`ring/`).
    ring: AtomicU64,
    /// Bytes of finished connections, client → backend and back.
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// TLS handshakes with clients, by result, indexed like [`TlsResult::ALL`].
    tls_handshakes: [AtomicU64; TlsResult::ALL.len()],
    /// How long the successful ones took.
    tls_handshake_time: Histogram,
}

/// How a TLS handshake with a client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsResult {
    Ok,
    /// A client certificate was required and none, or a bad one, came.
    ClientCert,
    /// Any other failure: no shared version or cipher, a protocol error, the client gone.
    Failed,
    Timeout,
}

impl TlsResult {
    pub(crate) const ALL: [TlsResult; 4] = [
        TlsResult::Ok,
        TlsResult::ClientCert,
        TlsResult::Failed,
        TlsResult::Timeout,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TlsResult::Ok => "ok",
            TlsResult::ClientCert => "client_cert",
            TlsResult::Failed => "failed",
            TlsResult::Timeout => "timeout",
        }
    }
}

/// Who is in a service now, and the state that decides who may come in: kept apart from the counters
/// ([`ServiceStats`]), which only count.
#[derive(Debug, Default)]
pub(crate) struct Occupancy {
    /// The open client connections' start times, for the oldest connection's age.
    pub(crate) sessions: Sessions,
    /// Open connections and recent rates per client address (`limits`).
    pub(crate) sources: Arc<SourceTable>,
    /// Connections waiting for a backend below its cap (`queue`).
    pub(crate) queue: Arc<Queue>,
    /// Refused PROXY headers are logged at most once a second.
    pub(crate) proxy_warnings: Mutex<crate::util::RateLimited>,
    /// Per-source refusals counted toward a ban (`limits.ban`).
    breaches: Mutex<Breaches>,
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
    /// Every total by name, for an upgrade to carry into the new process ([`ServiceStats::add`]).
    pub(crate) fn totals(&self) -> BTreeMap<String, u64> {
        let mut t = BTreeMap::new();
        for (k, v) in [
            ("accepted", &self.accepted),
            ("no_backend_transitions", &self.no_backend_transitions),
            ("spliced", &self.spliced),
            ("ring", &self.ring),
            ("bytes_up", &self.bytes_up),
            ("bytes_down", &self.bytes_down),
        ] {
            t.insert(k.to_string(), v.load(Relaxed));
        }
        for e in Outcome::ALL {
            t.insert(format!("end.{}", e.as_str()), self.ended(e));
        }
        for r in TlsResult::ALL {
            t.insert(
                format!("tls.{}", r.as_str()),
                self.tls_handshakes[r as usize].load(Relaxed),
            );
        }
        t
    }

    /// Adds totals another process counted; names this build does not know are skipped.
    pub(crate) fn add(&self, totals: &BTreeMap<String, u64>) {
        let counter = |k: &str| -> Option<&AtomicU64> {
            Some(match k {
                "accepted" => &self.accepted,
                "no_backend_transitions" => &self.no_backend_transitions,
                "spliced" => &self.spliced,
                // In 0.1 the ring's count went by the retired io_uring engine's name.
                "ring" | "uring" => &self.ring,
                "bytes_up" => &self.bytes_up,
                "bytes_down" => &self.bytes_down,
                _ => {
                    if let Some(e) = k.strip_prefix("end.") {
                        let e = Outcome::ALL.into_iter().find(|o| o.as_str() == e)?;
                        &self.ends[e.index()]
                    } else {
                        let r = k.strip_prefix("tls.")?;
                        let r = TlsResult::ALL.into_iter().find(|t| t.as_str() == r)?;
                        &self.tls_handshakes[r as usize]
                    }
                }
            })
        };
        for (k, v) in totals {
            if let Some(c) = counter(k) {
                c.fetch_add(*v, Relaxed);
            }
        }
    }

    /// A client ended so (relayed or refused).
    pub(crate) fn count(&self, outcome: Outcome) {
        self.ends[outcome.index()].fetch_add(1, Relaxed);
    }

    /// A client was accepted (on any data plane).
    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// A client takes one of the service's `cap` places: `false`, counting nothing, when all are
    /// taken. Counted first and taken back when over, so two racing for the last place cannot
    /// both win.
    pub(crate) fn enter(&self, cap: u64) -> bool {
        if self.active.fetch_add(1, Relaxed) >= cap {
            self.active.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// A client carried in from another process takes a place, whatever the cap.
    pub(crate) fn enter_anyway(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// A client that [`entered`](ServiceStats::enter) has gone.
    pub(crate) fn left(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    /// A relayed connection ended: its bytes, and which engine paths it took.
    pub(crate) fn relayed(&self, relayed: &crate::relay::Relayed) {
        self.bytes_up.fetch_add(relayed.bytes_up, Relaxed);
        self.bytes_down.fetch_add(relayed.bytes_down, Relaxed);
        if relayed.spliced {
            self.spliced.fetch_add(1, Relaxed);
        }
        if relayed.ring {
            self.ring.fetch_add(1, Relaxed);
        }
    }

    /// Selection found a backend (`found`) or none: counts a flip of "no backend available", and
    /// says whether this was one.
    fn no_backend(&self, found: bool) -> bool {
        let flipped = self.no_backend_now.load(Relaxed) == found
            && self.no_backend_now.swap(!found, Relaxed) == found;
        if flipped {
            self.no_backend_transitions.fetch_add(1, Relaxed);
        }
        flipped
    }

    /// Clients accepted so far.
    pub fn accepted_total(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Client connections open now.
    pub fn active_now(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Relayed connections in which a direction ran on splice.
    pub fn spliced_total(&self) -> u64 {
        self.spliced.load(Relaxed)
    }

    /// Relayed connections the ring workers carried.
    pub fn ring_total(&self) -> u64 {
        self.ring.load(Relaxed)
    }

    /// Bytes of finished connections: client → backend, and back.
    pub fn bytes_total(&self) -> (u64, u64) {
        (self.bytes_up.load(Relaxed), self.bytes_down.load(Relaxed))
    }

    /// Times the service went into or out of "no backend available".
    pub fn no_backend_transitions_total(&self) -> u64 {
        self.no_backend_transitions.load(Relaxed)
    }

    /// A TLS handshake with a client ended so, after `took`.
    pub(crate) fn tls_handshake(&self, result: TlsResult, took: Duration) {
        self.tls_handshakes[result as usize].fetch_add(1, Relaxed);
        if result == TlsResult::Ok {
            self.tls_handshake_time.observe(took);
        }
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

/// The pool settings `cfg` asks for; `tls` is its TLS as read (probes of `kind: tls` and `https`
/// speak their own `health.tls` if set, else its `backend_tls`).
pub(crate) fn pool_settings(cfg: &ServiceConfig, tls: &ServiceTls) -> PoolSettings {
    let discovery = cfg.discovery.clone().unwrap_or_default();
    PoolSettings {
        policy: cfg.balance,
        passive: Passive {
            max_fails: cfg.passive.max_fails,
            cooldown: cfg.passive.cooldown.0,
        },
        probes: ProbeSpec::from_config(
            &cfg.name,
            &cfg.health,
            tls.probe
                .clone()
                .or_else(|| tls.originate.clone())
                .map(|o| o as Arc<dyn crate::health::ProbeTls>),
        )
        .map(Arc::new),
        on_down: cfg.health.on_down,
        on_removed: discovery.on_removed,
        removed_drain: discovery.drain_timeout.0,
        slow_start: cfg.slow_start.0,
        agent: cfg.agent.clone(),
        all_backups: cfg.all_backups,
        failback: cfg.failback,
    }
}

/// The backends `cfg` lists by address, in its order, each in its tier (the names are claimed by
/// their DNS watchers, the labels by their Docker watchers).
pub(crate) fn static_backends(cfg: &ServiceConfig) -> Vec<Claimed> {
    cfg.backends
        .iter()
        .filter_map(|b| match b.address {
            // Validated already: within its bounds.
            BackendAddress::Ip(a) => {
                Some(Claimed::new(a, Weight::saturating(b.weight)).in_tier(b.priority))
            }
            BackendAddress::Name { .. }
            | BackendAddress::Srv { .. }
            | BackendAddress::Docker(_) => None,
        })
        .collect()
}

impl Service {
    /// A new service for `cfg` (its TLS files read into `tls`; `alone`: whether it has its listen
    /// addresses to itself, [`crate::config::Config::alone`], which `relay: auto` needs to know): a
    /// new pool holding the static backends, and counters from zero.
    pub(crate) fn new(
        cfg: &ServiceConfig,
        alone: bool,
        tls: ServiceTls,
        events: &EventBus,
    ) -> Service {
        let pool = Arc::new(Pool::new(
            cfg.name.as_str().into(),
            pool_settings(cfg, &tls),
            events.clone(),
        ));
        pool.reconcile(Source::Static, static_backends(cfg));
        let shared = (Arc::default(), Arc::default());
        Service::with((cfg, alone), pool, shared, tls, events)
    }

    /// The next version of this service for `cfg` (a reload): the same pool and counters. The caller
    /// has already applied `cfg`'s pool settings and static backends to the pool.
    pub(crate) fn next(&self, cfg: &ServiceConfig, alone: bool, tls: ServiceTls) -> Service {
        let shared = (self.stats.clone(), self.occupancy.clone());
        Service::with((cfg, alone), self.pool.clone(), shared, tls, &self.events)
    }

    /// This version with its TLS files read again (a reload that changed nothing else, also not
    /// whether it has its addresses to itself: its engine stays).
    pub(crate) fn with_tls(&self, tls: ServiceTls) -> Service {
        Service {
            name: self.name.clone(),
            policy: self.policy,
            pool: self.pool.clone(),
            connect_timeout: self.connect_timeout,
            connect_attempts: self.connect_attempts,
            max_connections: self.max_connections,
            relay: self.relay,
            proxy_protocol: self.proxy_protocol,
            accept_proxy: self.accept_proxy.clone(),
            limits: self.limits.clone(),
            caps: self.caps.clone(),
            queue: self.queue,
            backend_port: self.backend_port,
            protocol: self.protocol,
            udp: self.udp,
            tls,
            stats: self.stats.clone(),
            occupancy: self.occupancy.clone(),
            names: self.names.clone(),
            discovery: self.discovery.clone(),
            events: self.events.clone(),
        }
    }

    /// This version on the epoll engine: the ring workers it was to run on could not start.
    pub(crate) fn on_epoll(&self) -> Service {
        let mut s = self.with_tls(self.tls.clone());
        s.relay.mode = crate::config::RelayMode::Epoll;
        s
    }

    fn with(
        (cfg, alone): (&ServiceConfig, bool),
        pool: Arc<Pool>,
        (stats, occupancy): (Arc<ServiceStats>, Arc<Occupancy>),
        tls: ServiceTls,
        events: &EventBus,
    ) -> Service {
        if tls.originate.as_ref().is_some_and(|o| o.insecure) {
            tracing::warn!(service = %cfg.name, "backend_tls.verify is false: any certificate a backend presents is accepted");
        }
        if tls.probe.as_ref().is_some_and(|o| o.insecure) {
            tracing::warn!(service = %cfg.name, "health.tls.verify is false: the probes accept any certificate a backend presents (the clients' traffic is not touched)");
        }
        if tls.terminate.is_some() || tls.originate.is_some() {
            crate::tls::say_where_records_are_relayed();
        }
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
                mode: crate::relay::engine_for(cfg.relay, &cfg.name, cfg.fits_ring(alone)),
                idle_timeout: cfg.idle_timeout.0,
                half_close_timeout: cfg.half_close_timeout.0,
                stall_timeout: cfg.stall_timeout.0,
                first_byte_timeout: cfg.first_byte_timeout.map(|d| d.0),
                client_watch: PeerWatch::new(cfg.keepalive, cfg.user_timeout),
                backend_watch: PeerWatch::new(cfg.backend_keepalive, cfg.user_timeout),
            },
            proxy_protocol: cfg.proxy_protocol,
            accept_proxy: cfg.accept_proxy.clone(),
            limits: Limits::from_config(&cfg.limits),
            caps: BackendCaps::from_config(cfg),
            queue: cfg.queue,
            backend_port: cfg.backend_port,
            protocol: cfg.protocol,
            udp: cfg.udp_settings(),
            tls,
            stats,
            occupancy,
        }
    }

    /// A client from `ip` was refused by a per-source limit: with `limits.ban`, counted toward a
    /// ban, and at the `after`-th within the window its source goes on the deny list (an event and
    /// a log line either way it turns out).
    pub(crate) fn breached(
        &self,
        ip: std::net::IpAddr,
        deny: &DenyList,
        now: tokio::time::Instant,
    ) {
        let Some(rule) = self.limits.ban else {
            return;
        };
        let key = source_key(ip);
        if crate::util::lock(&self.occupancy.breaches).breach(key, &rule, now) != Breach::Ban {
            return;
        }
        let net = ipnet::IpNet::from(key);
        // The source key of an IPv6 client is its /64.
        let net = match net {
            ipnet::IpNet::V6(_) => ipnet::IpNet::new(key, 64).unwrap_or(net),
            v4 => v4,
        };
        let reason = format!(
            "{} per-source refusals within {} on service {}",
            rule.after, rule.within, self.name
        );
        let recorded = deny.ban(net, rule.for_.0, reason, now).is_ok();
        let for_s = rule.for_.0.as_secs_f64();
        if recorded {
            tracing::warn!(service = %self.name, source = %net, breaches = rule.after, for_s, "banned: refused at accept until the ban ends");
        } else {
            tracing::warn!(service = %self.name, source = %net, breaches = rule.after, for_s, "not banned: the deny list is full (limits.max_denied)");
        }
        self.events.publish(Event::SourceBanned {
            service: &self.name,
            source: net.to_string(),
            breaches: rule.after,
            for_s,
            recorded,
        });
    }

    /// Notes whether a selection found a backend, logging only the transitions into and out of
    /// "no backend available". The common case is one relaxed load.
    pub(crate) fn note_selection(&self, found: bool) {
        if self.stats.no_backend(found) {
            if found {
                tracing::info!(service = %self.name, "backends available again");
            } else {
                tracing::warn!(service = %self.name, "no backend available: closing new clients at once");
            }
            self.events.publish(Event::ServiceBackends {
                service: &self.name,
                available: found,
            });
        }
    }

    /// Its numbers now, read once.
    pub fn view(&self) -> ServiceView {
        let st = &self.stats;
        let ends = std::array::from_fn(|i| st.ends[i].load(Relaxed));
        ServiceView {
            name: self.name.clone(),
            policy: self.policy.as_str(),
            protocol: match self.protocol {
                Transport::Tcp => "tcp",
                Transport::Udp => "udp",
            },
            relay: match self.protocol {
                Transport::Tcp => self.relay.mode.as_str(),
                Transport::Udp => "udp",
            },
            accepted: st.accepted.load(Relaxed),
            active: st.active.load(Relaxed),
            no_backend: ends[Outcome::NoBackend.index()],
            connect_failed: ends[Outcome::ConnectFailed.index()],
            over_limit: ends[Outcome::MaxConnections.index()],
            spliced: st.spliced.load(Relaxed),
            ring: st.ring.load(Relaxed),
            uring: st.ring.load(Relaxed),
            ends,
            bytes_up: st.bytes_up.load(Relaxed),
            bytes_down: st.bytes_down.load(Relaxed),
            oldest_connection_s: self
                .occupancy
                .sessions
                .oldest_age()
                .map(|d| d.as_secs_f64()),
            queue_waiting: self.occupancy.queue.waiting(),
            source_entries: self.occupancy.sources.len() as u64,
            tls: self.tls_view(),
            serving_tier: self.pool.snapshot().serving_tier,
            failback: self.pool.settings().failback.as_str(),
            failback_held: self.pool.failback_held(),
        }
    }

    /// With `tls`: its handshakes so far and the certificate it presents now.
    fn tls_view(&self) -> Option<TlsView> {
        let cert = &self.tls.terminate.as_ref()?.certificate;
        let st = &self.stats;
        let now = crate::util::unix_ms() as i64 / 1000;
        Some(TlsView {
            handshakes: TlsResult::ALL
                .iter()
                .map(|r| (r.as_str(), st.tls_handshakes[*r as usize].load(Relaxed)))
                .collect(),
            certificate: cert.name.clone(),
            not_after: cert.not_after,
            days_left: (cert.not_after - now).div_euclid(86_400),
            time: st.tls_handshake_time.cumulative(),
        })
    }
}

/// A service's numbers at one moment, read once: what `/stats` shows of it (these field names;
/// docs/admin-api.md) and what `/metrics` exports ([`METRICS`]).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: Arc<str>,
    pub policy: &'static str,
    /// `tcp` or `udp`: a UDP service's connection counts are its sessions.
    pub protocol: &'static str,
    /// The relay engine (`udp` for a UDP service: no stream engine carries it).
    pub relay: &'static str,
    pub accepted: u64,
    /// Client connections open now.
    pub active: u64,
    pub no_backend: u64,
    pub connect_failed: u64,
    pub over_limit: u64,
    pub spliced: u64,
    /// Relayed connections the ring workers carried.
    pub ring: u64,
    /// `ring` under its name in 0.1, when an io_uring engine on tokio counted there too: kept
    /// until 0.2 so dashboards and scripts reading it go on working (docs/admin-api.md).
    pub uring: u64,
    /// Client connections by how they ended, indexed like [`Outcome::ALL`] (by name in JSON).
    #[serde(serialize_with = "ends_by_name")]
    pub ends: [u64; Outcome::ALL.len()],
    /// Bytes of finished connections, client → backend and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub oldest_connection_s: Option<f64>,
    /// Clients waiting in the queue for a backend below its cap (metrics only).
    #[serde(skip)]
    pub queue_waiting: u64,
    /// Client addresses the per-source limits track (metrics only).
    #[serde(skip)]
    pub source_entries: u64,
    /// With `tls`: its handshakes and its certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsView>,
    /// The tier that takes new connections (0 unless backups serve); none before any backend was
    /// eligible.
    pub serving_tier: Option<u32>,
    /// The `failback` policy (`immediate`, `never`, `after 5m`).
    pub failback: String,
    /// A better tier is eligible and `failback` keeps traffic on the serving one.
    pub failback_held: bool,
}

/// A TLS-terminating service's handshakes and certificate at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct TlsView {
    /// Handshakes by result: `ok`, `client_cert`, `failed`, `timeout`.
    pub handshakes: BTreeMap<&'static str, u64>,
    /// The presented certificate's name (its common name, else its first DNS name).
    pub certificate: String,
    /// When it expires, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Whole days until then (negative once expired), for the dashboard.
    pub days_left: i64,
    /// Histogram of successful handshakes (metrics only): cumulative counts, sum in seconds, count.
    #[serde(skip)]
    pub(crate) time: (Vec<u64>, f64, u64),
}

fn ends_by_name<S: Serializer>(ends: &[u64; Outcome::ALL.len()], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(Outcome::ALL.iter().map(|e| (e.as_str(), ends[e.index()])))
}

impl Subject for ServiceView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.name)
    }
}

/// What `/metrics` exports about each service.
pub(crate) const METRICS: Table<ServiceView> = Table {
    subject: &["service"],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_connections_accepted_total",
            "Client connections accepted.",
            &[],
            |s, o| o.put(&[], s.accepted),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_connections_active",
            "Client connections open now.",
            &[],
            |s, o| o.put(&[], s.active),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_no_backend_total",
            "Clients closed at once because no backend was available.",
            &[],
            |s, o| o.put(&[], s.no_backend),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_connect_failed_total",
            "Clients whose every connect attempt failed.",
            &[],
            |s, o| o.put(&[], s.connect_failed),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_over_limit_total",
            "Clients closed at once because max_connections were open.",
            &[],
            |s, o| o.put(&[], s.over_limit),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_queue_waiting",
            "Clients waiting for a backend below its max_connections (queue).",
            &[],
            |s, o| o.put(&[], s.queue_waiting),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_source_entries",
            "Client addresses the per-source limits are tracking now (bounded).",
            &[],
            |s, o| o.put(&[], s.source_entries),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_serving_tier",
            "The tier that takes new connections (0 unless backups serve; absent before any backend was eligible).",
            &[],
            |s, o| {
                if let Some(t) = s.serving_tier {
                    o.put(&[], t);
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_failback_held",
            "1 while a better tier is eligible and failback keeps traffic on the serving tier.",
            &[],
            |s, o| o.put(&[], s.failback_held),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_spliced_total",
            "Relayed connections in which a direction ran on splice.",
            &[],
            |s, o| o.put(&[], s.spliced),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_ring_total",
            "Relayed connections the ring workers carried.",
            &[],
            |s, o| o.put(&[], s.ring),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_uring_total",
            "Deprecated (removed in 0.2): sluicegate_connections_ring_total under its 0.1 name.",
            &[],
            |s, o| o.put(&[], s.uring),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_connections_ended_total",
            "Client connections by how they ended (the routing log's end values, refusals included).",
            &["end"],
            |s, o| {
                for e in Outcome::ALL {
                    o.put(&[e.as_str()], s.ends[e.index()]);
                }
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_service_bytes_total",
            "Bytes relayed by the service's finished connections, by direction (up = client to backend).",
            &["direction"],
            |s, o| {
                o.put(&["up"], s.bytes_up);
                o.put(&["down"], s.bytes_down);
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_relay_info",
            "The relay engine a service runs (ring, epoll, copy, splice or uring); a service that asked for ring, uring or auto runs epoll where io_uring is unavailable.",
            &["relay", "policy"],
            |s, o| o.put(&[s.relay, s.policy], 1u64),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_oldest_connection_seconds",
            "Age of the oldest open client connection, per service.",
            &[],
            |s, o| o.put(&[], s.oldest_connection_s.unwrap_or(0.0)),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_tls_handshakes_total",
            "TLS handshakes with clients of a service with tls, by result (ok, client_cert, failed, timeout).",
            &["result"],
            |s, o| {
                for (result, n) in s.tls.iter().flat_map(|t| &t.handshakes) {
                    o.put(&[result], *n);
                }
            },
        ),
        Family::new(
            Kind::Histogram,
            "sluicegate_tls_handshake_duration_seconds",
            "Time of successful TLS handshakes with clients, from the server side's start (on a shared address, after the hello was read for the route).",
            &[],
            |s, o| {
                if let Some(t) = &s.tls {
                    let (counts, sum, count) = &t.time;
                    o.histogram(&[], connect_les(), counts, *sum, *count);
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_tls_certificate_expiry_timestamp_seconds",
            "When the certificate a service with tls presents expires (Unix time), by its name.",
            &["name"],
            |s, o| {
                if let Some(t) = &s.tls {
                    o.put(&[&t.certificate], t.not_after as f64);
                }
            },
        ),
    ],
};

/// A backend as `/metrics` reads it: its view (the one `/backends` and `/stats` serialise), and
/// the backend itself for its connect histogram, which the view does not carry.
///
/// Declared here rather than beside `Backend` in `pool/`: the service is what exports its pool.
pub(crate) struct BackendSubject {
    service: Arc<str>,
    address: String,
    view: BackendView,
    backend: Arc<Backend>,
}

impl BackendSubject {
    pub(crate) fn new(service: Arc<str>, backend: Arc<Backend>) -> BackendSubject {
        BackendSubject {
            service,
            address: backend.addr.to_string(),
            view: backend.view(),
            backend,
        }
    }
}

impl Subject for BackendSubject {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        [&*self.service, self.address.as_str()].into_iter()
    }
}

/// The `le` labels of the connect histogram, written out once.
fn connect_les() -> &'static [String] {
    static LES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LES.get_or_init(|| {
        let bounds = CONNECT_BUCKETS.iter().map(|v| v.to_string());
        bounds.chain(["+Inf".to_string()]).collect()
    })
}

/// What `/metrics` exports about each backend of a service (members, and removed ones still
/// holding sessions).
pub(crate) const BACKEND_METRICS: Table<BackendSubject> = Table {
    subject: &["service", "backend"],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_connections_active",
            "Connections to the backend open now (counted from the start of the connect).",
            &[],
            |b, o| o.put(&[], b.view.active),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_backend_connections_total",
            "Connections established to the backend.",
            &[],
            |b, o| o.put(&[], b.view.total),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_backend_connect_failures_total",
            "Connect attempts to the backend that failed.",
            &[],
            |b, o| o.put(&[], b.view.failed),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_weight",
            "Configured weight.",
            &[],
            |b, o| o.put(&[], b.view.weight),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_effective_weight",
            "Weight in use now (below the configured weight during slow start).",
            &[],
            |b, o| o.put(&[], b.view.effective_weight),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_backend_bytes_total",
            "Bytes relayed to (up) and from (down) the backend, counted as they move.",
            &["direction"],
            |b, o| {
                o.put(&["up"], b.view.bytes_up);
                o.put(&["down"], b.view.bytes_down);
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_health",
            "1 for the backend's current health (unknown, healthy, unhealthy), 0 for the others.",
            &["health"],
            |b, o| {
                for h in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
                    o.put(&[h.as_str()], b.view.health == h);
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_state",
            "1 for the backend's current state (active, draining, maint, removed), 0 for the others.",
            &["state"],
            |b, o| {
                for st in [State::Active, State::Draining, State::Maint, State::Removed] {
                    o.put(&[st.as_str()], b.view.state == st);
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_tier",
            "The backend's tier: lower first (0 unless backup or priority).",
            &[],
            |b, o| o.put(&[], b.view.tier),
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_agent",
            "1 for what the backend's agent says now (up, down, drain, maint), 0 for the others; absent without an agent.",
            &["says"],
            |b, o| {
                if let Some(a) = &b.view.agent {
                    for s in [AgentSays::Up, AgentSays::Down, AgentSays::Drain, AgentSays::Maint] {
                        o.put(&[s.as_str()], a.says == s);
                    }
                }
            },
        ),
        Family::new(
            Kind::Gauge,
            "sluicegate_backend_ejected",
            "1 while the backend is passively ejected after consecutive connect failures.",
            &[],
            |b, o| o.put(&[], b.view.ejected),
        ),
        Family::new(
            Kind::Histogram,
            "sluicegate_backend_connect_seconds",
            "Time of successful connects to the backend.",
            &[],
            |b, o| {
                let (counts, sum, count) = b.backend.stats.connect_times();
                o.histogram(&[], connect_les(), &counts, sum, count);
            },
        ),
    ],
};

#[cfg(test)]
mod tests {
    use super::ServiceStats;

    /// An upgrade's totals carry the ring's count under its name, and a process of 0.1 sends it
    /// as `uring`: both land in `ring`; names this build does not know are skipped.
    #[test]
    fn the_rings_count_is_carried_under_its_name_and_its_old_one() {
        let stats = ServiceStats::default();
        let totals = [("ring", 3), ("uring", 2), ("accepted", 7), ("bogus", 9)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        stats.add(&totals);
        assert_eq!((stats.ring_total(), stats.accepted_total()), (5, 7));
        assert_eq!(stats.totals()["ring"], 5);
        assert!(
            !stats.totals().contains_key("uring"),
            "sent under its name only"
        );
    }
}
