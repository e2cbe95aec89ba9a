//! Discovery: backend sources that find their addresses elsewhere and hand them to the pool as
//! claims. A name resolved on a timer, either as A/AAAA records (one backend per address, at the
//! configured port) or as SRV records (`srv.rs`: hosts, ports, weights and priorities); and the
//! Docker containers that carry some labels (`docker.rs`), followed through the Engine's events.
//!
//! One watcher task per (service, name) re-resolves every `discovery.refresh` (±10 % jitter) and hands
//! the answer to its [`Claims`] (the service's pool) as that name's claim; the pool applies the
//! difference. Resolution never runs on the connection path: sessions only read the pool's snapshot.
//!
//! Answers are trusted by kind (Docker's embedded DNS answers with TTL 600, shuffles the records per
//! query, drops a stopped container at once and keeps a paused one; `docs/architecture.md`):
//! - records: the name's set is exactly them;
//! - a timeout, SERVFAIL or any transport error: the last good set stays (a resolver hiccup must not
//!   empty a pool);
//! - NXDOMAIN or no records (a service scaled to 0): the set is emptied only after `empty_after`
//!   consecutive such answers;
//! - more records than `max_records`: the lowest addresses, so every balancer replica keeps the same
//!   ones, with a warning (at most one a minute per name) and a count (`truncated`).
//!
//! The resolver's cache is off (Docker answers with TTL 600, which would hide scaling for ten
//! minutes); the watcher owns the timing instead. A watcher has at most one query in flight, and an
//! early refresh asked for by the pool (a backend of the name failed) waits until `refresh / 4` after
//! the previous query, so nothing that happens to backends can raise the query rate per name above
//! one per `max(refresh / 4, 250 ms)`.

pub(crate) mod docker;
mod srv;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::TokioResolver;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Weight;
use crate::config::{BackendAddress, DiscoveryConfig, ResolverConfig, ServiceConfig};
use crate::metrics::{Family, Kind, Subject, Table};
use crate::util::{RateLimited, Rng};

/// One backend as a source claims it: its address, weight and tier, and the DNS name it was found
/// under. Ordered by address first, so a capped set keeps the lowest addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Claimed {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: Weight,
    /// Its tier: lower first (`backends[].priority`, an SRV record's priority).
    pub(crate) tier: u32,
    /// The DNS name it was found under, without a port: the name its TLS certificate must carry and
    /// the `Host` of its HTTP probes.
    pub(crate) host: Option<Arc<str>>,
}

impl Claimed {
    pub(crate) fn new(addr: SocketAddr, weight: Weight) -> Claimed {
        Claimed {
            addr,
            weight,
            tier: 0,
            host: None,
        }
    }

    pub(crate) fn in_tier(self, tier: u32) -> Claimed {
        Claimed { tier, ..self }
    }
}

impl From<(SocketAddr, Weight)> for Claimed {
    fn from((addr, weight): (SocketAddr, Weight)) -> Claimed {
        Claimed::new(addr, weight)
    }
}

/// Which discovery source a claim comes from, by its label (as the backend view shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Finder {
    /// A name's A/AAAA records; the label is `host:port` as configured.
    Name(Arc<str>),
    /// A name's SRV records; the label is the SRV name.
    Srv(Arc<str>),
    /// Docker containers with some labels; the label is `k=v,...`.
    Labels(Arc<str>),
}

/// Where a watcher's answers go: the service's pool.
pub(crate) trait Claims: Send + Sync + 'static {
    /// `finder` now lists exactly `found` (an empty list withdraws its claim).
    fn claim(&self, finder: &Finder, found: Vec<Claimed>);
    /// An answer listed `addrs` just now (for first and last seen times).
    fn seen(&self, addrs: &[SocketAddr]);
    /// A reverse lookup names the backend at `addr` (in Docker: its container's name).
    fn named(&self, addr: SocketAddr, name: Arc<str>);
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver ({what}): {reason}")]
pub struct ResolverError {
    what: String,
    reason: String,
}

/// Builds the resolver: the configured name servers, or the system's (`/etc/resolv.conf`).
pub(crate) fn resolver(cfg: &ResolverConfig) -> Result<TokioResolver, ResolverError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if cfg.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| ResolverError {
            what: "system configuration".into(),
            reason: e.to_string(),
        })?
    } else {
        let servers = cfg
            .nameservers
            .iter()
            .map(|ns| {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                let mut c = NameServerConfig::udp_and_tcp(ns.ip());
                c.connections = vec![udp, tcp];
                c
            })
            .collect();
        TokioResolver::builder_with_config(HickoryConfig::from_name_servers(servers), provider)
    };
    let o = builder.options_mut();
    o.cache_size = 0;
    o.timeout = cfg.timeout.0;
    // One try per refresh: the next refresh is the retry, and a slow resolver must not stack queries.
    o.attempts = 1;
    o.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    builder.build().map_err(|e| ResolverError {
        what: "options".into(),
        reason: e.to_string(),
    })
}

/// What a watcher asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A/AAAA records of `host`: one backend per address, at `port`.
    Address { host: String, port: u16 },
    /// SRV records of `name`: their targets' addresses at the records' ports.
    Srv { name: String },
}

/// One DNS name of a service, as configured.
#[derive(Debug, Clone)]
pub(crate) struct NameSpec {
    pub(crate) lookup: Lookup,
    /// The weight of each address (A/AAAA; SRV records carry their own).
    pub(crate) weight: u32,
    /// The entry's tier (`priority`); an SRV record's priority is added to it.
    pub(crate) tier: u32,
    /// `host:port` as written in the config, or the SRV name: the name's identity as a source.
    pub(crate) label: Arc<str>,
}

impl NameSpec {
    /// Its identity as a backend source.
    pub(crate) fn finder(&self) -> Finder {
        match self.lookup {
            Lookup::Address { .. } => Finder::Name(self.label.clone()),
            Lookup::Srv { .. } => Finder::Srv(self.label.clone()),
        }
    }
}

/// The DNS names among a service's backends.
pub(crate) fn names(cfg: &ServiceConfig) -> Vec<NameSpec> {
    cfg.backends
        .iter()
        .filter_map(|b| {
            let (lookup, label) = match &b.address {
                BackendAddress::Name { host, port } => (
                    Lookup::Address {
                        host: host.clone(),
                        port: *port,
                    },
                    b.address.to_string(),
                ),
                BackendAddress::Srv { name } => (Lookup::Srv { name: name.clone() }, name.clone()),
                BackendAddress::Ip(_) | BackendAddress::Docker(_) => return None,
            };
            Some(NameSpec {
                lookup,
                weight: b.weight,
                tier: b.priority,
                label: label.into(),
            })
        })
        .collect()
}

/// What one query said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Records(BTreeSet<Claimed>),
    /// NXDOMAIN or no records.
    Empty(String),
    /// Timeout, SERVFAIL, transport error: says nothing about the name.
    Failed(String),
}

/// Counters of a watcher, for metrics.
#[derive(Debug, Default)]
pub(crate) struct WatchStats {
    pub(crate) queries: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) empty: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Answers with more records than `max_records`, cut to that many.
    pub(crate) truncated: AtomicU64,
}

/// `answer` with at most `max` records: the lowest addresses (IPv4 before IPv6), whatever order the
/// server sent them in, so balancer replicas asking the same name keep the same backends. Also
/// returns how many records the answer had, when it had too many.
pub(crate) fn cap_records(answer: Answer, max: usize) -> (Answer, Option<usize>) {
    match answer {
        Answer::Records(set) if set.len() > max => {
            let had = set.len();
            (
                Answer::Records(set.into_iter().take(max).collect()),
                Some(had),
            )
        }
        other => (other, None),
    }
}

/// The decision logic of a watcher, apart from the network: what the name's set becomes after each
/// answer.
#[derive(Debug)]
pub(crate) struct NameState {
    /// The set the pool has for this name; `None` before the first usable answer.
    current: Option<BTreeSet<Claimed>>,
    empties: u32,
    empty_after: u32,
    failing: bool,
}

/// What the watcher must do after an answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Claim exactly this set (it changed).
    Set(BTreeSet<Claimed>),
    /// Nothing changes.
    Keep,
}

impl NameState {
    pub(crate) fn new(empty_after: u32) -> NameState {
        NameState {
            current: None,
            empties: 0,
            empty_after: empty_after.max(1),
            failing: false,
        }
    }

    pub(crate) fn apply(&mut self, answer: &Answer) -> Verdict {
        match answer {
            Answer::Records(set) => {
                self.empties = 0;
                self.failing = false;
                if self.current.as_ref() == Some(set) {
                    Verdict::Keep
                } else {
                    self.current = Some(set.clone());
                    Verdict::Set(set.clone())
                }
            }
            Answer::Empty(_) => {
                self.failing = false;
                self.empties = self.empties.saturating_add(1);
                let has = self.current.as_ref().is_some_and(|c| !c.is_empty());
                if self.empties >= self.empty_after && (has || self.current.is_none()) {
                    self.current = Some(BTreeSet::new());
                    Verdict::Set(BTreeSet::new())
                } else {
                    Verdict::Keep
                }
            }
            Answer::Failed(_) => {
                self.failing = true;
                Verdict::Keep
            }
        }
    }
}

/// Asks the resolver once about `spec`'s name, bounded by `limit` in all.
pub(crate) async fn query(resolver: &TokioResolver, spec: &NameSpec, limit: Duration) -> Answer {
    match &spec.lookup {
        Lookup::Address { host, port } => {
            let weight = Weight::saturating(spec.weight);
            let host_name: Arc<str> = host.as_str().into();
            match addresses(resolver, host, limit).await {
                Ok(ips) => Answer::Records(
                    ips.into_iter()
                        .map(|ip| Claimed {
                            addr: SocketAddr::new(ip, *port),
                            weight,
                            tier: spec.tier,
                            host: Some(host_name.clone()),
                        })
                        .collect(),
                ),
                Err(a) => a,
            }
        }
        Lookup::Srv { name } => {
            tokio::time::timeout(limit, srv::query(resolver, name, spec.tier, limit))
                .await
                .unwrap_or_else(|_| Answer::Failed("timed out".into()))
        }
    }
}

/// The A/AAAA records of `host`, or the answer that says why there are none.
pub(crate) async fn addresses(
    resolver: &TokioResolver,
    host: &str,
    limit: Duration,
) -> Result<BTreeSet<IpAddr>, Answer> {
    // Parsed as ASCII, not through IDNA (what a `&str` gets): Docker's names carry underscores
    // (`tasks.stack_service`, `project_web_1`), which IDNA rejects.
    let name = match Name::from_ascii(host) {
        Ok(name) => name,
        Err(e) => return Err(Answer::Failed(format!("{host:?} is not a DNS name: {e}"))),
    };
    match tokio::time::timeout(limit, resolver.lookup_ip(name)).await {
        Err(_) => Err(Answer::Failed("timed out".into())),
        Ok(Ok(lookup)) => {
            let set: BTreeSet<IpAddr> = lookup.iter().collect();
            if set.is_empty() {
                Err(Answer::Empty("no A/AAAA records".into()))
            } else {
                Ok(set)
            }
        }
        Ok(Err(e)) if e.is_no_records_found() => Err(Answer::Empty(e.to_string())),
        Ok(Err(e)) => Err(Answer::Failed(e.to_string())),
    }
}

/// The name a reverse lookup of `ip` gives, bounded by `limit`: the first label of the PTR record's
/// target, which in Docker's embedded DNS is the container's name (`web-1.demo_net.` → `web-1`).
pub(crate) async fn reverse_name(
    resolver: &TokioResolver,
    ip: IpAddr,
    limit: Duration,
) -> Option<Arc<str>> {
    let lookup = tokio::time::timeout(limit, resolver.reverse_lookup(ip))
        .await
        .ok()?
        .ok()?;
    lookup.answers().iter().find_map(|r| match &r.data {
        hickory_resolver::proto::rr::RData::PTR(ptr) => {
            let full = ptr.0.to_string();
            let first = full.trim_end_matches('.').split('.').next()?;
            (!first.is_empty()).then(|| Arc::from(first))
        }
        _ => None,
    })
}

/// A running watcher's handle.
#[derive(Clone)]
pub(crate) struct Watcher {
    pub(crate) label: Arc<str>,
    pub(crate) stats: Arc<WatchStats>,
}

impl Watcher {
    /// Its counters now, for service `service`.
    pub(crate) fn view(&self, service: &Arc<str>) -> WatchView {
        let s = &self.stats;
        WatchView {
            service: service.clone(),
            name: self.label.clone(),
            queries: s.queries.load(Relaxed),
            records: s.records.load(Relaxed),
            empty: s.empty.load(Relaxed),
            failed: s.failed.load(Relaxed),
            truncated: s.truncated.load(Relaxed),
        }
    }
}

/// A watcher's counters at one moment: what `/stats` lists under a service's `dns` (these field
/// names; docs/admin-api.md) and what `/metrics` exports ([`METRICS`]).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WatchView {
    #[serde(skip)]
    service: Arc<str>,
    /// The name as configured, `host:port`.
    name: Arc<str>,
    queries: u64,
    records: u64,
    empty: u64,
    failed: u64,
    truncated: u64,
}

impl Subject for WatchView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        [&*self.service, &*self.name].into_iter()
    }
}

/// What `/metrics` exports about each DNS name of each service.
pub(crate) const METRICS: Table<WatchView> = Table {
    subject: &["service", "name"],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_dns_queries_total",
            "DNS lookups of a backend name by result (records, empty, failed).",
            &["result"],
            |w, o| {
                o.put(&["records"], w.records);
                o.put(&["empty"], w.empty);
                o.put(&["failed"], w.failed);
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_dns_answers_truncated_total",
            "DNS answers with more records than discovery.max_records, cut to the lowest addresses.",
            &[],
            |w, o| o.put(&[], w.truncated),
        ),
    ],
};

/// Everything a watcher needs.
pub(crate) struct WatchSpec {
    pub(crate) service: Arc<str>,
    pub(crate) claims: Arc<dyn Claims>,
    pub(crate) resolver: TokioResolver,
    pub(crate) name: NameSpec,
    pub(crate) settings: DiscoveryConfig,
    /// Bound on one query, whatever the resolver does.
    pub(crate) query_limit: Duration,
    /// Asks for an early refresh (a backend of the name failed); rate-capped here.
    pub(crate) nudge: Arc<Notify>,
}

/// Starts the watcher of `spec.name` until `stop`; `first` fires after its first answer (whatever it
/// was).
pub(crate) fn watch(
    spec: WatchSpec,
    stop: CancellationToken,
    first: oneshot::Sender<()>,
) -> Watcher {
    let stats = Arc::new(WatchStats::default());
    let watcher = Watcher {
        label: spec.name.label.clone(),
        stats: stats.clone(),
    };
    let watch = Watch {
        state: NameState::new(spec.settings.empty_after),
        spec,
        stats,
        rng: Rng::from_entropy(),
        truncation_warnings: RateLimited::new(Duration::from_secs(60)),
        named: BTreeSet::new(),
        last_query: None,
    };
    tokio::spawn(watch.run(stop, first));
    watcher
}

/// One name's watcher: what it asks, what it concluded, and the counters it keeps.
struct Watch {
    spec: WatchSpec,
    state: NameState,
    stats: Arc<WatchStats>,
    rng: Rng,
    truncation_warnings: RateLimited,
    /// Addresses whose name was asked for already (only new ones are looked up).
    named: BTreeSet<SocketAddr>,
    last_query: Option<Instant>,
}

impl Watch {
    async fn run(mut self, stop: CancellationToken, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        let mut next = Instant::now();
        loop {
            if !self.wait_turn(&stop, next).await {
                return;
            }
            let started = Instant::now();
            self.last_query = Some(started);
            self.stats.queries.fetch_add(1, Relaxed);
            let spec = &self.spec;
            let answer = tokio::select! {
                () = stop.cancelled() => return,
                a = query(&spec.resolver, &spec.name, spec.query_limit) => a,
            };
            self.handle(answer);
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            let jitter = 0.9 + self.rng.below(201) as f64 / 1000.0;
            next = started + self.spec.settings.refresh.0.mul_f64(jitter);
        }
    }

    /// Waits for the next refresh, or for a nudge (a backend of the name failed), which is rate-capped
    /// at one query per `max(refresh / 4, 250 ms)`. `false` once stopped.
    async fn wait_turn(&self, stop: &CancellationToken, next: Instant) -> bool {
        let min_gap = (self.spec.settings.refresh.0 / 4).max(Duration::from_millis(250));
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep_until(next) => {}
            () = self.spec.nudge.notified() => {
                if let Some(t) = self.last_query {
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep_until(t + min_gap) => {}
                    }
                }
            }
        }
        true
    }

    /// Applies one answer: the name's set, the claims, the counters and the logs.
    fn handle(&mut self, answer: Answer) {
        let (service, label) = (&self.spec.service, &self.spec.name.label);
        let max_records = self.spec.settings.max_records as usize;
        let (answer, had) = cap_records(answer, max_records);
        if let Some(had) = had {
            self.stats.truncated.fetch_add(1, Relaxed);
            if let Some(suppressed) = self.truncation_warnings.allow() {
                tracing::warn!(service = %service, name = %label, records = had, max_records, suppressed, "DNS answer has more records than discovery.max_records: using the lowest addresses");
            }
        }
        let was_failing = self.state.failing;
        let verdict = self.state.apply(&answer);
        match &answer {
            Answer::Records(set) => self.on_records(set, &verdict, was_failing),
            Answer::Empty(why) => {
                self.stats.empty.fetch_add(1, Relaxed);
                let times = self.state.empties;
                if let Verdict::Set(_) = verdict {
                    tracing::warn!(service = %service, name = %label, answer = %why, times, "DNS name has no records: removing its backends");
                    self.spec.claims.claim(&self.spec.name.finder(), Vec::new());
                } else {
                    tracing::debug!(service = %service, name = %label, answer = %why, times, "DNS name has no records");
                }
            }
            Answer::Failed(why) => {
                self.stats.failed.fetch_add(1, Relaxed);
                if !was_failing {
                    tracing::warn!(service = %service, name = %label, error = %why, "DNS query failed: keeping the last known backends");
                } else {
                    tracing::debug!(service = %service, name = %label, error = %why, "DNS query failed");
                }
            }
        }
    }

    fn on_records(&mut self, set: &BTreeSet<Claimed>, verdict: &Verdict, was_failing: bool) {
        let (service, name) = (&self.spec.service, &self.spec.name);
        self.stats.records.fetch_add(1, Relaxed);
        if was_failing {
            tracing::info!(service = %service, name = %name.label, records = set.len(), "DNS answers again");
        }
        let addrs: Vec<SocketAddr> = set.iter().map(|c| c.addr).collect();
        if let Verdict::Set(_) = verdict {
            tracing::info!(service = %service, name = %name.label, records = %join(set), "DNS answer changed");
            self.spec
                .claims
                .claim(&name.finder(), set.iter().cloned().collect());
            self.name_new(set);
        }
        self.spec.claims.seen(&addrs);
    }

    /// Names the addresses not named yet: an SRV record's by its target's first label, the others by
    /// a reverse lookup, off the watcher's loop (a slow reverse zone must not delay refreshes).
    fn name_new(&mut self, set: &BTreeSet<Claimed>) {
        self.named.retain(|a| set.iter().any(|c| c.addr == *a));
        let new: Vec<&Claimed> = set
            .iter()
            .filter(|c| !self.named.contains(&c.addr))
            .collect();
        if new.is_empty() {
            return;
        }
        self.named.extend(new.iter().map(|c| c.addr));
        let spec = &self.spec;
        if let Lookup::Srv { .. } = spec.name.lookup {
            for c in new {
                if let Some(first) = c.host.as_deref().and_then(|h| h.split('.').next()) {
                    spec.claims.named(c.addr, first.into());
                }
            }
            return;
        }
        let new: Vec<SocketAddr> = new.iter().map(|c| c.addr).collect();
        let (claims, resolver, limit) =
            (spec.claims.clone(), spec.resolver.clone(), spec.query_limit);
        tokio::spawn(async move {
            for addr in new {
                if let Some(n) = reverse_name(&resolver, addr.ip(), limit).await {
                    claims.named(addr, n);
                }
            }
        });
    }
}

/// The claimed addresses, for a log line (with weight and tier where they are not the defaults).
fn join(set: &BTreeSet<Claimed>) -> String {
    set.iter()
        .map(|c| match (c.weight.get(), c.tier) {
            (1, 0) => c.addr.to_string(),
            (w, t) => format!("{} (weight {w}, tier {t})", c.addr),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ips: &[[u8; 4]]) -> BTreeSet<Claimed> {
        ips.iter()
            .map(|ip| Claimed::new(SocketAddr::from((*ip, 80)), Weight::ONE))
            .collect()
    }

    #[test]
    fn records_replace_the_set_and_repeat_answers_change_nothing() {
        let mut s = NameState::new(3);
        let a = Answer::Records(set(&[[10, 0, 0, 1]]));
        assert_eq!(s.apply(&a), Verdict::Set(set(&[[10, 0, 0, 1]])));
        assert_eq!(s.apply(&a), Verdict::Keep);
        let b = Answer::Records(set(&[[10, 0, 0, 1], [10, 0, 0, 2]]));
        assert_eq!(
            s.apply(&b),
            Verdict::Set(set(&[[10, 0, 0, 1], [10, 0, 0, 2]]))
        );
    }

    #[test]
    fn a_large_answer_keeps_its_lowest_addresses() {
        let big: BTreeSet<Claimed> = (0..50u8)
            .rev()
            .map(|i| IpAddr::from([10, 0, 1, i]))
            .chain(["::1".parse().unwrap()])
            .map(|ip| Claimed::new(SocketAddr::new(ip, 80), Weight::ONE))
            .collect();
        let (a, had) = cap_records(Answer::Records(big), 3);
        assert_eq!(
            a,
            Answer::Records(set(&[[10, 0, 1, 0], [10, 0, 1, 1], [10, 0, 1, 2]]))
        );
        assert_eq!(had, Some(51));
        let small = Answer::Records(set(&[[10, 0, 0, 1]]));
        assert_eq!(cap_records(small.clone(), 1), (small, None));
        let nx = Answer::Empty("NXDOMAIN".into());
        assert_eq!(cap_records(nx.clone(), 1), (nx, None));
    }

    #[test]
    fn failures_keep_the_last_good_set() {
        let mut s = NameState::new(3);
        s.apply(&Answer::Records(set(&[[10, 0, 0, 1]])));
        for _ in 0..100 {
            assert_eq!(s.apply(&Answer::Failed("SERVFAIL".into())), Verdict::Keep);
        }
    }

    #[test]
    fn empty_answers_remove_only_after_empty_after_in_a_row() {
        let mut s = NameState::new(3);
        s.apply(&Answer::Records(set(&[[10, 0, 0, 1]])));
        let nx = Answer::Empty("NXDOMAIN".into());
        assert_eq!(s.apply(&nx), Verdict::Keep);
        assert_eq!(s.apply(&nx), Verdict::Keep);
        // a failure in between does not reset the count, records do
        assert_eq!(s.apply(&Answer::Failed("timeout".into())), Verdict::Keep);
        s.apply(&Answer::Records(set(&[[10, 0, 0, 1]])));
        assert_eq!(s.apply(&nx), Verdict::Keep);
        assert_eq!(s.apply(&nx), Verdict::Keep);
        assert_eq!(s.apply(&nx), Verdict::Set(BTreeSet::new()));
        assert_eq!(s.apply(&nx), Verdict::Keep);
    }

    /// Claims that go nowhere: only the watcher's timing is under test.
    struct Nowhere;

    impl Claims for Nowhere {
        fn claim(&self, _: &Finder, _: Vec<Claimed>) {}
        fn seen(&self, _: &[SocketAddr]) {}
        fn named(&self, _: SocketAddr, _: Arc<str>) {}
    }

    /// A watcher of `refresh` that never queries (its name server is never asked: only its timing,
    /// `wait_turn`, runs), with its last query at `last_query`.
    fn watch_every(refresh: Duration, last_query: Option<Instant>) -> Watch {
        let resolver = resolver(&ResolverConfig {
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            ..ResolverConfig::default()
        })
        .unwrap();
        let settings = DiscoveryConfig {
            refresh: crate::config::Dur(refresh),
            ..DiscoveryConfig::default()
        };
        Watch {
            state: NameState::new(settings.empty_after),
            spec: WatchSpec {
                service: "web".into(),
                claims: Arc::new(Nowhere),
                resolver,
                name: NameSpec {
                    lookup: Lookup::Address {
                        host: "backend".into(),
                        port: 80,
                    },
                    weight: 1,
                    tier: 0,
                    label: "backend:80".into(),
                },
                settings,
                query_limit: Duration::from_secs(1),
                nudge: Arc::new(Notify::new()),
            },
            stats: Arc::default(),
            rng: Rng::seeded(1),
            truncation_warnings: RateLimited::new(Duration::from_secs(60)),
            named: BTreeSet::new(),
            last_query,
        }
    }

    /// How long `wait_turn` took (paused clock: exact), nudged first if `nudge` (as the pool does:
    /// `notify_one`, whose permit waits for the watcher).
    async fn turn_after(w: &Watch, next: Instant, nudge: bool) -> Duration {
        if nudge {
            w.spec.nudge.notify_one();
        }
        let t0 = Instant::now();
        assert!(
            w.wait_turn(&CancellationToken::new(), next).await,
            "not stopped"
        );
        t0.elapsed()
    }

    /// Under tokio's paused clock: without a nudge the watcher waits for its refresh time; a nudge
    /// right after a query waits out `max(refresh / 4, 250 ms)` from that query, and one long after
    /// it goes at once.
    #[tokio::test(start_paused = true)]
    async fn a_nudge_goes_early_but_never_within_the_minimum_gap() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        let w = watch_every(ms(2000), Some(now));
        assert_eq!(turn_after(&w, now + ms(2000), false).await, ms(2000));

        // Nudged at once: a quarter of the refresh after the last query.
        let now = Instant::now();
        let w = watch_every(ms(2000), Some(now));
        assert_eq!(turn_after(&w, now + ms(2000), true).await, ms(500));

        // A short refresh: the floor is 250 ms.
        let now = Instant::now();
        let w = watch_every(ms(400), Some(now - ms(100)));
        assert_eq!(turn_after(&w, now + ms(300), true).await, ms(150));

        // The last query long ago (or none yet): the nudge goes at once.
        let now = Instant::now();
        let w = watch_every(ms(2000), Some(now - ms(5000)));
        assert_eq!(turn_after(&w, now + ms(2000), true).await, ms(0));
        let w = watch_every(ms(2000), None);
        assert_eq!(turn_after(&w, Instant::now() + ms(2000), true).await, ms(0));
    }

    /// Under tokio's paused clock: a stopped watcher's wait ends at once, and says so.
    #[tokio::test(start_paused = true)]
    async fn a_stopped_watcher_stops_waiting() {
        let w = watch_every(Duration::from_secs(60), None);
        let stop = CancellationToken::new();
        stop.cancel();
        let t0 = Instant::now();
        assert!(!w.wait_turn(&stop, t0 + Duration::from_secs(60)).await);
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
