//! DNS discovery: a backend address whose host is a name becomes one backend per A/AAAA record.
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
//!   consecutive such answers.
//!
//! The resolver's cache is off (Docker answers with TTL 600, which would hide scaling for ten
//! minutes); the watcher owns the timing instead. A watcher has at most one query in flight, and an
//! early refresh asked for by the pool (a backend of the name failed) waits until `refresh / 4` after
//! the previous query, so nothing that happens to backends can raise the query rate per name above
//! one per `max(refresh / 4, 250 ms)`.

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
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendAddress, DiscoveryConfig, ResolverConfig, ServiceConfig};
use crate::util::Rng;

/// Where a watcher's answers go: the service's pool.
pub(crate) trait Claims: Send + Sync + 'static {
    /// The name `label` now lists exactly `addrs` (an empty list withdraws its claim).
    fn claim(&self, label: &Arc<str>, addrs: Vec<(SocketAddr, u32)>);
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

/// One DNS name of a service, as configured.
#[derive(Debug, Clone)]
pub(crate) struct NameSpec {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) weight: u32,
    /// `host:port`, as written in the config: the name's identity as a backend source.
    pub(crate) label: Arc<str>,
}

/// The DNS names among a service's backends.
pub(crate) fn names(cfg: &ServiceConfig) -> Vec<NameSpec> {
    cfg.backends
        .iter()
        .filter_map(|b| match &b.address {
            BackendAddress::Name { host, port } => Some(NameSpec {
                host: host.clone(),
                port: *port,
                weight: b.weight,
                label: b.address.to_string().into(),
            }),
            BackendAddress::Ip(_) => None,
        })
        .collect()
}

/// What one query said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Records(BTreeSet<IpAddr>),
    /// NXDOMAIN or no A/AAAA records.
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
}

/// The decision logic of a watcher, apart from the network: what the name's set becomes after each
/// answer.
#[derive(Debug)]
pub(crate) struct NameState {
    /// The set the pool has for this name; `None` before the first usable answer.
    current: Option<BTreeSet<IpAddr>>,
    empties: u32,
    empty_after: u32,
    failing: bool,
}

/// What the watcher must do after an answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Claim exactly this set (it changed).
    Set(BTreeSet<IpAddr>),
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

/// Asks the resolver once, bounded by `limit`.
pub(crate) async fn query(resolver: &TokioResolver, host: &str, limit: Duration) -> Answer {
    // Parsed as ASCII, not through IDNA (what a `&str` gets): Docker's names carry underscores
    // (`tasks.stack_service`, `project_web_1`), which IDNA rejects.
    let name = match Name::from_ascii(host) {
        Ok(name) => name,
        Err(e) => return Answer::Failed(format!("{host:?} is not a DNS name: {e}")),
    };
    match tokio::time::timeout(limit, resolver.lookup_ip(name)).await {
        Err(_) => Answer::Failed("timed out".into()),
        Ok(Ok(lookup)) => {
            let set: BTreeSet<IpAddr> = lookup.iter().collect();
            if set.is_empty() {
                Answer::Empty("no A/AAAA records".into())
            } else {
                Answer::Records(set)
            }
        }
        Ok(Err(e)) if e.is_no_records_found() => Answer::Empty(e.to_string()),
        Ok(Err(e)) => Answer::Failed(e.to_string()),
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
    let WatchSpec {
        service,
        claims,
        resolver,
        name,
        settings,
        query_limit,
        nudge,
    } = spec;
    let stats = Arc::new(WatchStats::default());
    let watcher = Watcher {
        label: name.label.clone(),
        stats: stats.clone(),
    };
    tokio::spawn(async move {
        let rng = Rng::from_entropy();
        let refresh = settings.refresh.0;
        let min_gap = (refresh / 4).max(Duration::from_millis(250));
        let mut state = NameState::new(settings.empty_after);
        let mut first = Some(first);
        let mut last_query: Option<Instant> = None;
        // Addresses whose name was asked for already (only new ones are looked up).
        let mut named: BTreeSet<IpAddr> = BTreeSet::new();
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
                () = nudge.notified() => {
                    if let Some(t) = last_query {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep_until(t + min_gap) => {}
                        }
                    }
                }
            }
            let started = Instant::now();
            last_query = Some(started);
            stats.queries.fetch_add(1, Relaxed);
            let answer = tokio::select! {
                () = stop.cancelled() => return,
                a = query(&resolver, &name.host, query_limit) => a,
            };
            let was_failing = state.failing;
            let verdict = state.apply(&answer);
            match &answer {
                Answer::Records(set) => {
                    stats.records.fetch_add(1, Relaxed);
                    if was_failing {
                        tracing::info!(service = %service, name = %name.label, records = set.len(), "DNS answers again");
                    }
                    let addrs: Vec<SocketAddr> = set
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, name.port))
                        .collect();
                    if let Verdict::Set(_) = verdict {
                        tracing::info!(service = %service, name = %name.label, records = %join(&addrs), "DNS answer changed");
                        claims.claim(
                            &name.label,
                            addrs.iter().map(|a| (*a, name.weight)).collect(),
                        );
                        named.retain(|ip| set.contains(ip));
                        let new: Vec<IpAddr> = set.difference(&named).copied().collect();
                        named.extend(new.iter().copied());
                        if !new.is_empty() {
                            // Off the watcher's loop: a slow reverse zone must not delay refreshes.
                            let (claims, resolver, port) =
                                (claims.clone(), resolver.clone(), name.port);
                            tokio::spawn(async move {
                                for ip in new {
                                    if let Some(n) = reverse_name(&resolver, ip, query_limit).await
                                    {
                                        claims.named(SocketAddr::new(ip, port), n);
                                    }
                                }
                            });
                        }
                    }
                    claims.seen(&addrs);
                }
                Answer::Empty(why) => {
                    stats.empty.fetch_add(1, Relaxed);
                    if let Verdict::Set(_) = verdict {
                        tracing::warn!(service = %service, name = %name.label, answer = %why, times = state.empties, "DNS name has no records: removing its backends");
                        claims.claim(&name.label, Vec::new());
                    } else {
                        tracing::debug!(service = %service, name = %name.label, answer = %why, times = state.empties, "DNS name has no records");
                    }
                }
                Answer::Failed(why) => {
                    stats.failed.fetch_add(1, Relaxed);
                    if !was_failing {
                        tracing::warn!(service = %service, name = %name.label, error = %why, "DNS query failed: keeping the last known backends");
                    } else {
                        tracing::debug!(service = %service, name = %name.label, error = %why, "DNS query failed");
                    }
                }
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            let jitter = 0.9 + rng.below(201) as f64 / 1000.0;
            next = started + refresh.mul_f64(jitter);
        }
    });
    watcher
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ips: &[[u8; 4]]) -> BTreeSet<IpAddr> {
        ips.iter().map(|ip| IpAddr::from(*ip)).collect()
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
}
