//! Docker label discovery: the running containers that carry a `docker:` backend's labels are its
//! backends, followed through the Engine's event stream.
//!
//! One watcher task per (service, selector). It connects to the Engine (`docker`, `docker_cert_path`,
//! `docker_insecure`, by the rules and with the hardening of `replicas.docker`), opens the event stream
//! of containers with the labels, lists them, and claims what the list says on the service's pool
//! (source `docker:k=v,...`). Then every followed event (start, die, stop, kill, pause, unpause,
//! health_status, destroy) asks for a new list, a burst of them one list after [`DEBOUNCE`]; and every
//! `discovery.refresh` (±10 %) the containers are listed anyway, which heals a missed event. A list,
//! not the event, is what is believed: it is the whole truth, however events were ordered, with one
//! exception ([`Stopped`]): the Engine still lists a container as running for a moment after its
//! `die` event, so a container whose latest event says it stopped is left out of a list that still
//! shows it, until an event starts it again or a list no longer shows it.
//!
//! What a list means ([`take`], pure):
//! - only running containers count, and of those not one whose Docker healthcheck says `unhealthy` or
//!   `starting` (Docker knows it is not serving; sluicegate's own probes, if any, come on top);
//! - a container's address is on `network`, or (absent) on its first network by name;
//! - its port is `sluicegate.port`, else the selector's; its weight `sluicegate.weight`, else the
//!   entry's; its tier the entry's, one more with `sluicegate.backup=true`;
//! - a label that does not parse skips that container (with a warning naming it and the label, once),
//!   never the others;
//! - at most `discovery.max_records` containers, the lowest addresses, as with DNS (counted as
//!   truncated, warned at most once a minute).
//!
//! When the Engine cannot be reached, a call fails or times out ([`CALL_LIMIT`]), or the event stream
//! breaks, the last claimed set stays (as a DNS failure keeps the last answer), the failure is
//! counted, logged once per streak, and the watcher reconnects after a back-off (250 ms doubling up to
//! `discovery.refresh`), listing again as soon as the Engine answers. An empty list from an Engine
//! that answers is believed at once, unlike an empty DNS answer: the Engine's list is its own state,
//! not a cache's, so the containers are gone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Claimed, Claims, Finder};
use crate::config::{
    BackendAddress, DiscoveryConfig, DockerEnv, DockerSelector, ServiceConfig, Weight,
};
use crate::docker::{ContainerHealth, DockerError, Engine, Events, Labelled};
use crate::metrics::{Family, Kind, Subject, Table};
use crate::util::{unix_ms, RateLimited, Rng};

/// Bound on one Engine call (connect, list; the event stream's request): a local Engine answers in
/// milliseconds, and one that hangs must not hold the last set's freshness for long.
pub(crate) const CALL_LIMIT: Duration = Duration::from_secs(5);
/// How long a burst of events is gathered before the one list it asks for.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(50);
/// The first wait before reconnecting to an Engine that failed; it doubles up to `refresh`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How far back the event stream starts before the list it follows (whole seconds: the API's
/// resolution), so an event between the two is not missed; a replayed one only costs a list.
const EVENTS_OVERLAP_SECS: i64 = 2;

/// A container's weight (1 to 1000), overriding the entry's.
pub(crate) const WEIGHT_LABEL: &str = "sluicegate.weight";
/// `true`: the container is a backup (its tier one more than the entry's); `false`: it is not.
pub(crate) const BACKUP_LABEL: &str = "sluicegate.backup";
/// The port the container serves on, overriding the selector's.
pub(crate) const PORT_LABEL: &str = "sluicegate.port";

/// One `docker:` backend entry of a service, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LabelSpec {
    pub(crate) selector: DockerSelector,
    /// The weight of a container without `sluicegate.weight`.
    pub(crate) weight: u32,
    /// The entry's tier (`priority`, `backup`).
    pub(crate) tier: u32,
    /// `k=v,...`: its identity as a backend source.
    pub(crate) label: Arc<str>,
}

impl LabelSpec {
    /// Its identity as a backend source.
    pub(crate) fn finder(&self) -> Finder {
        Finder::Labels(self.label.clone())
    }
}

/// The `docker:` entries among a service's backends.
pub(crate) fn selectors(cfg: &ServiceConfig) -> Vec<LabelSpec> {
    cfg.backends
        .iter()
        .filter_map(|b| match &b.address {
            BackendAddress::Docker(sel) => Some(LabelSpec {
                label: sel.labels_text().into(),
                selector: sel.clone(),
                weight: b.weight,
                tier: b.priority,
            }),
            _ => None,
        })
        .collect()
}

/// Why a listed container is not a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Skip {
    /// One of its `sluicegate.*` labels does not parse (a warning: someone got it wrong).
    BadLabel {
        label: &'static str,
        value: String,
        why: &'static str,
    },
    /// It has no address on the network (a warning).
    NoAddress,
    /// It does not run (the list asks for running ones only; a paused one may slip through).
    NotRunning(String),
    /// Its Docker healthcheck says `starting` or `unhealthy`.
    Health(ContainerHealth),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::BadLabel { label, value, why } => write!(f, "label {label}={value:?} {why}"),
            Skip::NoAddress => f.write_str("it has no address on the network"),
            Skip::NotRunning(state) => write!(f, "it is {state}, not running"),
            Skip::Health(ContainerHealth::Starting) => {
                f.write_str("its Docker healthcheck is still starting")
            }
            Skip::Health(h) => write!(f, "its Docker healthcheck says {h:?}"),
        }
    }
}

/// What one list means for the selector's claim.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The backends, at most `max` of them (the lowest addresses).
    pub(crate) claims: BTreeSet<Claimed>,
    /// Each backend's container name.
    pub(crate) names: BTreeMap<SocketAddr, Arc<str>>,
    /// The containers left out: (name, id, why).
    pub(crate) skipped: Vec<(String, String, Skip)>,
    /// How many backends the list had, when it had more than `max`.
    pub(crate) had: Option<usize>,
}

/// The claim of `spec` from the containers a list gave, at most `max` (the lowest addresses, so every
/// balancer keeps the same ones). Two containers at one address: the first by name.
pub(crate) fn take(spec: &LabelSpec, containers: &[Labelled], max: usize) -> Taken {
    let mut sorted: Vec<&Labelled> = containers.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    let mut taken = Taken::default();
    let mut by_addr: BTreeMap<SocketAddr, (Claimed, Arc<str>)> = BTreeMap::new();
    for c in sorted {
        match claim_of(spec, c) {
            Ok(claimed) => {
                by_addr
                    .entry(claimed.addr)
                    .or_insert_with(|| (claimed, c.name.as_str().into()));
            }
            Err(skip) => taken.skipped.push((c.name.clone(), c.id.clone(), skip)),
        }
    }
    if by_addr.len() > max {
        taken.had = Some(by_addr.len());
    }
    for (addr, (claimed, name)) in by_addr.into_iter().take(max) {
        taken.claims.insert(claimed);
        taken.names.insert(addr, name);
    }
    taken
}

/// One container's claim, or why it has none.
fn claim_of(spec: &LabelSpec, c: &Labelled) -> Result<Claimed, Skip> {
    if c.state != "running" {
        return Err(Skip::NotRunning(c.state.clone()));
    }
    if matches!(
        c.health,
        ContainerHealth::Starting | ContainerHealth::Unhealthy
    ) {
        return Err(Skip::Health(c.health));
    }
    let label = |key: &'static str| c.labels.get(key).map(|v| (key, v.trim()));
    let bad = |(label, value): (&'static str, &str), why| Skip::BadLabel {
        label,
        value: value.to_string(),
        why,
    };
    let port = match label(PORT_LABEL) {
        None => spec.selector.port,
        Some(l) => match l.1.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(bad(l, "is not a port (1 to 65535)")),
        },
    };
    let weight = match label(WEIGHT_LABEL) {
        None => Weight::saturating(spec.weight),
        Some(l) => match l.1.parse::<u32>().ok().and_then(|w| Weight::new(w).ok()) {
            Some(w) => w,
            None => return Err(bad(l, "is not a weight (1 to 1000)")),
        },
    };
    let backup = match label(BACKUP_LABEL) {
        None => false,
        Some(l) if l.1.eq_ignore_ascii_case("true") => true,
        Some(l) if l.1.eq_ignore_ascii_case("false") => false,
        Some(l) => return Err(bad(l, "is not true or false")),
    };
    let ip = c.ip.ok_or(Skip::NoAddress)?;
    Ok(Claimed {
        addr: SocketAddr::new(ip, port),
        weight,
        tier: spec.tier.saturating_add(u32::from(backup)),
        host: None,
    })
}

/// Counters of a label watcher, for metrics and `/stats`.
#[derive(Debug, Default)]
pub(crate) struct LabelStats {
    /// Lists the Engine answered.
    pub(crate) lists: AtomicU64,
    /// Container events received.
    pub(crate) events: AtomicU64,
    /// The Engine not reached, a call failed or timed out, the event stream broke.
    pub(crate) failed: AtomicU64,
    /// Lists with more containers than `max_records`, cut to that many.
    pub(crate) truncated: AtomicU64,
}

/// A running label watcher's handle.
#[derive(Clone)]
pub(crate) struct LabelWatcher {
    pub(crate) label: Arc<str>,
    pub(crate) stats: Arc<LabelStats>,
}

impl LabelWatcher {
    /// Its counters now, for service `service`.
    pub(crate) fn view(&self, service: &Arc<str>) -> LabelView {
        let s = &self.stats;
        LabelView {
            service: service.clone(),
            labels: self.label.clone(),
            lists: s.lists.load(Relaxed),
            events: s.events.load(Relaxed),
            failed: s.failed.load(Relaxed),
            truncated: s.truncated.load(Relaxed),
        }
    }
}

/// A label watcher's counters at one moment: what `/stats` lists under a service's `docker_labels`
/// (these field names; docs/admin-api.md) and what `/metrics` exports ([`METRICS`]).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LabelView {
    #[serde(skip)]
    service: Arc<str>,
    /// The selector's labels, `k=v,...`.
    labels: Arc<str>,
    lists: u64,
    events: u64,
    failed: u64,
    truncated: u64,
}

impl Subject for LabelView {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        [&*self.service, &*self.labels].into_iter()
    }
}

/// What `/metrics` exports about each `docker:` backend source of each service.
pub(crate) const METRICS: Table<LabelView> = Table {
    subject: &["service", "labels"],
    families: &[
        Family::new(
            Kind::Counter,
            "sluicegate_docker_discovery_lists_total",
            "Lists of the containers carrying a docker: backend's labels that the Engine answered.",
            &[],
            |w, o| o.put(&[], w.lists),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_docker_discovery_events_total",
            "Docker container events received for a docker: backend's labels.",
            &[],
            |w, o| o.put(&[], w.events),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_docker_discovery_failures_total",
            "Docker Engine unreachable, a call failed or timed out, or the event stream broke (the last set is kept).",
            &[],
            |w, o| o.put(&[], w.failed),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_docker_discovery_truncated_total",
            "Lists with more containers than discovery.max_records, cut to the lowest addresses.",
            &[],
            |w, o| o.put(&[], w.truncated),
        ),
    ],
};

/// Everything a label watcher needs.
pub(crate) struct LabelWatchSpec {
    pub(crate) service: Arc<str>,
    pub(crate) claims: Arc<dyn Claims>,
    pub(crate) spec: LabelSpec,
    pub(crate) settings: DiscoveryConfig,
}

/// Starts the watcher of `spec.spec` until `stop`; `first` fires after its first list (or the first
/// failure to get one).
pub(crate) fn watch(
    spec: LabelWatchSpec,
    stop: CancellationToken,
    first: oneshot::Sender<()>,
) -> LabelWatcher {
    let stats = Arc::new(LabelStats::default());
    let watcher = LabelWatcher {
        label: spec.spec.label.clone(),
        stats: stats.clone(),
    };
    let w = LabelWatch {
        spec,
        stats,
        current: None,
        named: HashMap::new(),
        told: HashSet::new(),
        failing: false,
        stopped: Stopped::default(),
        truncation_warnings: RateLimited::new(Duration::from_secs(60)),
        rng: Rng::from_entropy(),
        backoff: FIRST_BACKOFF,
    };
    tokio::spawn(w.run(stop, first));
    watcher
}

/// The containers whose latest event says they stopped serving (`die`, `destroy`, `pause`), by id,
/// for as long as a list still shows them running: the Engine updates its list a moment after the
/// event (a list 10 ms after `die` was seen to show the container running). Pure.
#[derive(Debug, Default)]
pub(crate) struct Stopped(HashSet<String>);

impl Stopped {
    /// Notes an event: a stop adds the container, a start or unpause takes it out again.
    pub(crate) fn event(&mut self, action: &str, id: &str) {
        match action {
            "die" | "destroy" | "pause" => {
                self.0.insert(id.to_string());
            }
            "start" | "unpause" => {
                self.0.remove(id);
            }
            _ => {}
        }
    }

    /// `list` without the containers known to have stopped; forgets those the list no longer shows
    /// (the Engine caught up).
    pub(crate) fn filter(&mut self, list: &[Labelled]) -> Vec<Labelled> {
        self.0.retain(|id| list.iter().any(|c| &c.id == id));
        list.iter()
            .filter(|c| !self.0.contains(&c.id))
            .cloned()
            .collect()
    }
}

/// One selector's watcher: what it claimed, what it told, and the counters it keeps.
struct LabelWatch {
    spec: LabelWatchSpec,
    stats: Arc<LabelStats>,
    /// The set claimed on the pool; `None` before the first list.
    current: Option<BTreeSet<Claimed>>,
    /// The container name each claimed address was named with.
    named: HashMap<SocketAddr, Arc<str>>,
    /// (container id, reason) of the containers left out that were logged already.
    told: HashSet<(String, String)>,
    /// In a failure streak (logged at its start and at its end).
    failing: bool,
    /// Containers stopped by their events that a list may still show running.
    stopped: Stopped,
    truncation_warnings: RateLimited,
    rng: Rng,
    /// The wait before the next reconnect.
    backoff: Duration,
}

impl LabelWatch {
    async fn run(mut self, stop: CancellationToken, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        loop {
            let ended = tokio::select! {
                () = stop.cancelled() => return,
                e = self.follow(&mut first) => e,
            };
            let Err(e) = ended;
            self.failed(&e);
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.backoff) => {}
            }
            self.backoff = (self.backoff * 2).min(self.spec.settings.refresh.0.max(FIRST_BACKOFF));
        }
    }

    /// One connection's life: connect, open the event stream, list, then list again on each burst
    /// of events and every refresh. Returns only with the failure that ended it.
    async fn follow(
        &mut self,
        first: &mut Option<oneshot::Sender<()>>,
    ) -> Result<Infallible, DockerError> {
        let engine = self.connect().await?;
        // Events were missed while disconnected: the next list is believed whole.
        self.stopped = Stopped::default();
        let since = (unix_ms() / 1000) as i64 - EVENTS_OVERLAP_SECS;
        let mut events = engine
            .events(&self.spec.spec.selector.labels, since)
            .await?;
        self.list(&engine).await?;
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        self.backoff = FIRST_BACKOFF;
        loop {
            let next = Instant::now() + self.refresh_interval();
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                event = events.next() => {
                    self.on_event(event)?;
                    self.gather(&mut events).await?;
                }
            }
            self.list(&engine).await?;
        }
    }

    /// Reads the rest of a burst of events for [`DEBOUNCE`], so the burst costs one list.
    async fn gather(&mut self, events: &mut Events) -> Result<(), DockerError> {
        let until = Instant::now() + DEBOUNCE;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return Ok(()),
                event = events.next() => self.on_event(event)?,
            }
        }
    }

    /// Counts one item of the event stream and notes a stop or start; its end or error ends the
    /// connection.
    fn on_event(
        &mut self,
        event: Option<Result<crate::docker::ContainerEvent, DockerError>>,
    ) -> Result<(), DockerError> {
        match event {
            Some(Ok(e)) => {
                self.stats.events.fetch_add(1, Relaxed);
                self.stopped.event(&e.action, &e.id);
                tracing::debug!(service = %self.spec.service, labels = %self.spec.spec.label, container = %e.name, action = %e.action, "Docker event");
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(DockerError::Unavailable {
                endpoint: self.endpoint(),
                reason: "the event stream ended".into(),
            }),
        }
    }

    /// `discovery.refresh`, ±10 %, so balancers sharing an Engine do not list in step.
    fn refresh_interval(&self) -> Duration {
        let jitter = 0.9 + self.rng.below(201) as f64 / 1000.0;
        self.spec.settings.refresh.0.mul_f64(jitter)
    }

    async fn connect(&self) -> Result<Engine, DockerError> {
        let transport = self
            .spec
            .spec
            .selector
            .docker_transport(&DockerEnv::current())
            .map_err(|reason| DockerError::Unavailable {
                endpoint: self.endpoint(),
                reason,
            })?;
        Engine::connect(&transport, CALL_LIMIT).await
    }

    /// The endpoint as configured, for messages.
    fn endpoint(&self) -> String {
        let sel = &self.spec.spec.selector;
        sel.docker
            .clone()
            .or_else(|| DockerEnv::current().host)
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
    }

    /// Lists the containers and applies the answer.
    async fn list(&mut self, engine: &Engine) -> Result<(), DockerError> {
        let sel = &self.spec.spec.selector;
        let list = engine
            .list_labelled(&sel.labels, sel.network.as_deref())
            .await?;
        let list = self.stopped.filter(&list);
        self.apply(&list);
        Ok(())
    }

    /// One list's answer: the claim, the names, the counters and the logs.
    fn apply(&mut self, list: &[Labelled]) {
        let (service, label) = (self.spec.service.clone(), self.spec.spec.label.clone());
        self.stats.lists.fetch_add(1, Relaxed);
        if std::mem::take(&mut self.failing) {
            tracing::info!(service = %service, labels = %label, containers = list.len(), "the Docker Engine answers again");
        }
        let max = self.spec.settings.max_records as usize;
        let taken = take(&self.spec.spec, list, max);
        self.tell_skipped(&taken.skipped, list);
        if let Some(had) = taken.had {
            self.stats.truncated.fetch_add(1, Relaxed);
            if let Some(suppressed) = self.truncation_warnings.allow() {
                tracing::warn!(service = %service, labels = %label, containers = had, max_records = max, suppressed, "more containers carry the labels than discovery.max_records: using the lowest addresses");
            }
        }
        if self.current.as_ref() != Some(&taken.claims) {
            tracing::info!(service = %service, labels = %label, backends = %super::join(&taken.claims), "the containers carrying the labels changed");
            let claimed = taken.claims.iter().cloned().collect();
            self.spec.claims.claim(&self.spec.spec.finder(), claimed);
            self.current = Some(taken.claims.clone());
        }
        self.named.retain(|a, _| taken.names.contains_key(a));
        for (addr, name) in &taken.names {
            if self.named.get(addr) != Some(name) {
                self.spec.claims.named(*addr, name.clone());
                self.named.insert(*addr, name.clone());
            }
        }
        let addrs: Vec<SocketAddr> = taken.names.keys().copied().collect();
        self.spec.claims.seen(&addrs);
    }

    /// Logs each container left out once per reason: a bad label as a warning naming the container
    /// and the label, the rest at info or debug. Forgets the containers no longer listed.
    fn tell_skipped(&mut self, skipped: &[(String, String, Skip)], list: &[Labelled]) {
        let (service, label) = (&self.spec.service, &self.spec.spec.label);
        self.told.retain(|(id, _)| list.iter().any(|c| &c.id == id));
        for (name, id, skip) in skipped {
            let why = skip.to_string();
            if !self.told.insert((id.clone(), why.clone())) {
                continue;
            }
            match skip {
                Skip::BadLabel { .. } | Skip::NoAddress => {
                    tracing::warn!(service = %service, labels = %label, container = %name, reason = %why, "container skipped: not a backend")
                }
                Skip::Health(_) => {
                    tracing::info!(service = %service, labels = %label, container = %name, reason = %why, "container left out")
                }
                Skip::NotRunning(_) => {
                    tracing::debug!(service = %service, labels = %label, container = %name, reason = %why, "container left out")
                }
            }
        }
    }

    /// Notes a failure: counted always, logged once per streak; the last set stays.
    fn failed(&mut self, e: &DockerError) {
        self.stats.failed.fetch_add(1, Relaxed);
        let (service, label) = (&self.spec.service, &self.spec.spec.label);
        if !std::mem::replace(&mut self.failing, true) {
            let kept = self.current.as_ref().map_or(0, BTreeSet::len);
            tracing::warn!(service = %service, labels = %label, error = %e, kept, "Docker label discovery failed: keeping the last known backends, reconnecting");
        } else {
            tracing::debug!(service = %service, labels = %label, error = %e, "Docker label discovery failed again");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn spec(port: u16, weight: u32, tier: u32) -> LabelSpec {
        let selector: DockerSelector =
            serde_yaml::from_str(&format!("{{labels: {{app: db}}, port: {port}}}")).unwrap();
        LabelSpec {
            label: selector.labels_text().into(),
            selector,
            weight,
            tier,
        }
    }

    fn container(name: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> Labelled {
        Labelled {
            id: format!("id-{name}"),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: "running".into(),
            health: ContainerHealth::None,
            ip: Some(IpAddr::from(ip)),
        }
    }

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    /// A list taken just after a `die` event that still shows the container running leaves it out;
    /// once a list no longer shows it, or an event starts it again, it counts as the list says.
    #[test]
    fn a_container_stopped_by_its_event_is_left_out_of_a_late_list() {
        let a = container("a", [10, 0, 0, 1], &[]);
        let b = container("b", [10, 0, 0, 2], &[]);
        let names = |l: Vec<Labelled>| l.into_iter().map(|c| c.name).collect::<Vec<_>>();
        let mut stopped = Stopped::default();
        stopped.event("kill", &a.id);
        assert_eq!(
            names(stopped.filter(&[a.clone(), b.clone()])),
            ["a", "b"],
            "kill alone is no stop"
        );
        stopped.event("die", &a.id);
        assert_eq!(
            names(stopped.filter(&[a.clone(), b.clone()])),
            ["b"],
            "the list lags"
        );
        // A list without it: the Engine caught up, and it is forgotten.
        assert_eq!(names(stopped.filter(std::slice::from_ref(&b))), ["b"]);
        assert_eq!(names(stopped.filter(&[a.clone(), b.clone()])), ["a", "b"]);
        // Stopped, then started again (docker restart): listed as it is.
        stopped.event("die", &b.id);
        stopped.event("start", &b.id);
        assert_eq!(names(stopped.filter(&[a.clone(), b.clone()])), ["a", "b"]);
        stopped.event("pause", &a.id);
        assert_eq!(names(stopped.filter(&[a.clone(), b.clone()])), ["b"]);
        stopped.event("unpause", &a.id);
        assert_eq!(names(stopped.filter(&[a, b])), ["a", "b"]);
    }

    #[test]
    fn containers_become_claims_with_the_entrys_defaults() {
        let t = take(
            &spec(5432, 3, 0),
            &[container("db-1", [10, 0, 0, 2], &[("app", "db")])],
            100,
        );
        let want = Claimed {
            addr: addr([10, 0, 0, 2], 5432),
            weight: Weight::new(3).unwrap(),
            tier: 0,
            host: None,
        };
        assert_eq!(t.claims, BTreeSet::from([want]));
        assert_eq!(t.names[&addr([10, 0, 0, 2], 5432)].as_ref(), "db-1");
        assert!(t.skipped.is_empty() && t.had.is_none());
    }

    #[test]
    fn per_container_labels_override_port_weight_and_tier() {
        let c = container(
            "db-2",
            [10, 0, 0, 3],
            &[
                (PORT_LABEL, "6000"),
                (WEIGHT_LABEL, "7"),
                (BACKUP_LABEL, "true"),
            ],
        );
        let t = take(&spec(5432, 1, 2), &[c], 100);
        let got: Vec<_> = t.claims.into_iter().collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].addr, addr([10, 0, 0, 3], 6000));
        assert_eq!(got[0].weight.get(), 7);
        assert_eq!(got[0].tier, 3, "the entry's tier, one more as a backup");
        let not_backup = container("db-3", [10, 0, 0, 4], &[(BACKUP_LABEL, "False")]);
        let t = take(&spec(5432, 1, 0), &[not_backup], 100);
        assert_eq!(t.claims.iter().next().unwrap().tier, 0);
    }

    #[test]
    fn a_bad_label_skips_that_container_only() {
        let cases = [
            (WEIGHT_LABEL, "heavy"),
            (WEIGHT_LABEL, "0"),
            (WEIGHT_LABEL, "1001"),
            (PORT_LABEL, "0"),
            (PORT_LABEL, "70000"),
            (BACKUP_LABEL, "yes"),
        ];
        for (key, value) in cases {
            let bad = container("bad", [10, 0, 0, 9], &[(key, value)]);
            let good = container("good", [10, 0, 0, 2], &[]);
            let t = take(&spec(80, 1, 0), &[bad, good], 100);
            let addrs: Vec<_> = t.claims.iter().map(|c| c.addr).collect();
            assert_eq!(addrs, vec![addr([10, 0, 0, 2], 80)], "{key}={value}");
            assert_eq!(t.skipped.len(), 1);
            let (name, _, skip) = &t.skipped[0];
            assert_eq!(name, "bad");
            let text = skip.to_string();
            assert!(text.contains(key) && text.contains(value), "{text}");
        }
    }

    #[test]
    fn only_running_healthy_containers_with_an_address_count() {
        let mut paused = container("paused", [10, 0, 0, 2], &[]);
        paused.state = "paused".into();
        let mut starting = container("starting", [10, 0, 0, 3], &[]);
        starting.health = ContainerHealth::Starting;
        let mut unhealthy = container("unhealthy", [10, 0, 0, 4], &[]);
        unhealthy.health = ContainerHealth::Unhealthy;
        let mut healthy = container("healthy", [10, 0, 0, 5], &[]);
        healthy.health = ContainerHealth::Healthy;
        let mut nowhere = container("nowhere", [10, 0, 0, 6], &[]);
        nowhere.ip = None;
        let plain = container("plain", [10, 0, 0, 7], &[]);
        let all = [paused, starting, unhealthy, healthy, nowhere, plain];
        let t = take(&spec(80, 1, 0), &all, 100);
        let names: Vec<&str> = t.names.values().map(|n| n.as_ref()).collect();
        assert_eq!(names, vec!["healthy", "plain"]);
        let skipped: Vec<(&str, &Skip)> =
            t.skipped.iter().map(|(n, _, s)| (n.as_str(), s)).collect();
        assert_eq!(
            skipped,
            vec![
                ("nowhere", &Skip::NoAddress),
                ("paused", &Skip::NotRunning("paused".into())),
                ("starting", &Skip::Health(ContainerHealth::Starting)),
                ("unhealthy", &Skip::Health(ContainerHealth::Unhealthy)),
            ]
        );
    }

    #[test]
    fn a_large_list_keeps_its_lowest_addresses_and_says_how_many_it_had() {
        let list: Vec<Labelled> = (0..20u8)
            .rev()
            .map(|i| container(&format!("c{i}"), [10, 0, 1, i], &[]))
            .collect();
        let t = take(&spec(80, 1, 0), &list, 3);
        let addrs: Vec<_> = t.claims.iter().map(|c| c.addr).collect();
        let want: Vec<_> = (0..3).map(|i| addr([10, 0, 1, i], 80)).collect();
        assert_eq!(addrs, want);
        assert_eq!(t.names.len(), 3);
        assert_eq!(t.had, Some(20));
        assert_eq!(take(&spec(80, 1, 0), &list, 20).had, None);
    }

    #[test]
    fn two_containers_at_one_address_are_one_backend_named_by_the_first() {
        let a = container("b", [10, 0, 0, 2], &[]);
        let b = container("a", [10, 0, 0, 2], &[(WEIGHT_LABEL, "5")]);
        let t = take(&spec(80, 1, 0), &[a, b], 100);
        assert_eq!(t.claims.len(), 1);
        assert_eq!(t.claims.iter().next().unwrap().weight.get(), 5);
        assert_eq!(t.names[&addr([10, 0, 0, 2], 80)].as_ref(), "a");
    }

    #[cfg(feature = "docker")]
    #[test]
    fn selectors_are_the_docker_entries_with_their_weight_and_tier() {
        let cfg: crate::config::Config = crate::config::Config::from_yaml(
            "services:
  - name: db
    listen: 127.0.0.1:5432
    backends:
      - {address: 127.0.0.1:9000}
      - {docker: {labels: {b: 2, a: 1}, port: 5432}, weight: 4, backup: true}
",
        )
        .unwrap();
        let s = selectors(&cfg.services[0]);
        assert_eq!(s.len(), 1);
        assert_eq!(&*s[0].label, "a=1,b=2");
        assert_eq!((s[0].weight, s[0].tier), (4, 1));
        assert_eq!(s[0].finder(), Finder::Labels("a=1,b=2".into()));
    }
}
