//! Replicas: backend containers sluicegate runs itself through the Docker Engine. It starts them,
//! adopts the ones it started before a restart, removes them (after draining their sessions), replaces
//! the ones that die or stay unhealthy, and scales their number with the load.
//!
//! The parts: the `docker` module speaks the Engine API; `plan.rs` decides what a `POST /add` or
//! `DELETE /rm` does (pure); `heal.rs` decides what to replace and how often (pure); `autoscale.rs`
//! decides when to scale (pure); this file acts on those decisions and keeps the service's pool told
//! (source `docker`).
//!
//! One lock guards the replicas and the decisions' state, and it is never held across a Docker call:
//! an operation decides under it and marks the replicas it acts on (a placeholder in `starting` for
//! one being started, `busy` for one being replaced or removed), calls Docker without it, and applies
//! the result under it again. So an Engine that hangs delays only the operation waiting for it, and
//! two operations never act on the same replica.
//!
//! Containers carry the labels `io.sluicegate.balancer`, `io.sluicegate.service` and
//! `io.sluicegate.hostname`; sluicegate only ever lists, renames, stops or removes containers with its
//! own balancer and service labels. A replica whose removal is decided is renamed first (Docker lets
//! nothing else about a running container change): its name then ends in `.removing-` and the start
//! of its id, which a restarted balancer reads as "finish removing this", never as a replica to adopt.

mod autoscale;
mod heal;
mod plan;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use plan::{ScaleRefusal, ScaleRequest};

use crate::config::Weight;
use crate::config::{
    capability, AutoscaleConfig, AutoscaleMetric, DockerEnv, DockerTransport, ReplicasConfig,
    ServiceConfig,
};
use crate::docker::{DockerError, Engine, Seen, Spec};
use crate::events::{Event, EventBus};
use crate::health::Health;
use crate::metrics::{Family, Kind, Subject, Table};
use crate::pool::{Pool, Source};
use crate::util::{lock, unix_ms, Rng};
use autoscale::{Autoscaler, Decision};

/// Label: whose containers these are (`replicas.balancer`).
pub(crate) const BALANCER_LABEL: &str = "io.sluicegate.balancer";
/// Label: the service a container serves.
pub(crate) const SERVICE_LABEL: &str = "io.sluicegate.service";
/// Label: the replica's hostname, which `/rep` lists and `/rm` names.
pub(crate) const HOSTNAME_LABEL: &str = "io.sluicegate.hostname";
/// A container whose removal was decided is renamed to its name, this, and the start of its id.
const REMOVING: &str = ".removing-";

/// The name that records the removal of container `id`, named `name`.
fn removing_name(name: &str, id: &str) -> String {
    format!("{name}{REMOVING}{}", short_id(id))
}

/// Whether container `id`'s name records its removal. The id in the name makes it unambiguous: no
/// configured name can carry the id of a container not yet created.
fn is_removing_name(name: &str, id: &str) -> bool {
    !id.is_empty() && name.ends_with(&format!("{REMOVING}{}", short_id(id)))
}

/// The first 12 characters of a container id (hex from a real Engine; counted in characters, so an
/// Engine's odd answer cannot cut one in half).
fn short_id(id: &str) -> &str {
    id.char_indices().nth(12).map_or(id, |(at, _)| &id[..at])
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReplicaState {
    /// Its container is being created and started; its hostname is taken.
    Starting,
    /// Its container runs (or is coming up); it takes traffic once its probe passes.
    Running,
    /// Being removed: no new connections; its container is stopped and removed once its sessions
    /// finish, and the removal is tried again until Docker has done it.
    Draining,
}

/// A replaced replica: what came before, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Replacement {
    pub(crate) previous_container: String,
    pub(crate) reason: String,
    pub(crate) at_ms: u64,
}

/// A removal that failed, and when it is tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RemovalRetry {
    /// Attempts that failed so far.
    pub(crate) failures: u32,
    /// The last one's error.
    pub(crate) error: String,
    pub(crate) next_attempt_ms: u64,
}

/// One replica as sluicegate knows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Replica {
    pub(crate) hostname: String,
    pub(crate) container: String,
    #[serde(skip)]
    id: String,
    pub(crate) address: Option<SocketAddr>,
    pub(crate) state: ReplicaState,
    /// Docker's state of its container (`running`, `exited`, …), `null` when the container is gone.
    pub(crate) docker_state: Option<String>,
    pub(crate) started_ms: u64,
    pub(crate) replaced: Option<Replacement>,
    /// Draining, its removal failed: the retries.
    pub(crate) removal: Option<RemovalRetry>,
    #[serde(skip)]
    unhealthy_since: Option<Instant>,
    #[serde(skip)]
    docker_status: String,
    /// An operation acts on it now (a replacement, a removal): no other may.
    #[serde(skip)]
    busy: bool,
    /// Draining: its container's name records the removal.
    #[serde(skip)]
    marked: bool,
    /// Draining and not busy: when the next removal attempt is due.
    #[serde(skip)]
    remove_at: Option<Instant>,
}

impl Replica {
    /// A replica about to be started: its hostname is taken, it has no container yet.
    fn starting(hostname: &str, container: String) -> Replica {
        Replica {
            hostname: hostname.to_string(),
            container,
            id: String::new(),
            address: None,
            state: ReplicaState::Starting,
            docker_state: None,
            started_ms: unix_ms(),
            replaced: None,
            removal: None,
            unhealthy_since: None,
            docker_status: String::new(),
            busy: true,
            marked: false,
            remove_at: None,
        }
    }
}

/// Why a seed-API call did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScaleError {
    #[error(transparent)]
    Refused(#[from] ScaleRefusal),
    /// Docker failed; `done` lists what was done before it did, `retrying` the replicas whose
    /// removal failed and goes on in the background.
    #[error("{}", docker_message(error, done, retrying))]
    Docker {
        error: DockerError,
        done: Vec<String>,
        retrying: Vec<String>,
    },
}

impl ScaleError {
    fn docker(error: DockerError) -> ScaleError {
        ScaleError::Docker {
            error,
            done: Vec::new(),
            retrying: Vec::new(),
        }
    }
}

fn docker_message(error: &DockerError, done: &[String], retrying: &[String]) -> String {
    let mut m = String::new();
    if !done.is_empty() {
        m += &format!("{} done ({}) before: ", done.len(), done.join(", "));
    }
    m += &error.to_string();
    if !retrying.is_empty() {
        m += &format!(
            "; out of traffic and marked for removal, retried until Docker removes them: {}",
            retrying.join(", ")
        );
    }
    m
}

/// An operator's `/add` or `/rm` starts the autoscaler's cool-downs and a fresh window, as its own
/// changes do; otherwise an idle service would be scaled back within one window of the request.
fn operator_changed(ops: &mut Ops) {
    if let Some(scaler) = ops.autoscaler.as_mut() {
        scaler.changed(Instant::now());
    }
}

/// What the autoscaler and the healer keep between checks.
struct Ops {
    autoscaler: Option<Autoscaler>,
    /// The previous total of connections established to the replicas, for the connection rate.
    last_total: Option<(Instant, u64)>,
    budget: heal::Budget,
    /// The first check has run (it brings the replicas up to `replicas.start`).
    started: bool,
    /// Healing was refused by the budget (logged once until it heals again).
    budget_spent: bool,
}

/// The replicas and the decisions' state, under one lock.
struct State {
    replicas: Vec<Replica>,
    ops: Ops,
}

impl State {
    /// The hostnames of the running replicas.
    fn running(&self) -> Vec<String> {
        let mut h: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .map(|r| r.hostname.clone())
            .collect();
        h.sort();
        h
    }

    /// The hostnames taken: running replicas and those being started.
    fn taken(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Draining)
            .map(|r| r.hostname.clone())
            .collect()
    }

    /// Running replicas an operation acts on now.
    fn busy(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Running && r.busy)
            .map(|r| r.hostname.clone())
            .collect()
    }

    /// Marks the running replicas named `names` busy; returns them as they were.
    fn take(&mut self, names: &[String]) -> Vec<Replica> {
        self.replicas
            .iter_mut()
            .filter(|r| r.state == ReplicaState::Running && names.contains(&r.hostname))
            .map(|r| {
                r.busy = true;
                r.clone()
            })
            .collect()
    }

    /// The entry of replica `r` (a copy taken earlier), if it is still known. The hostname is part of
    /// the key: a replica whose container is gone has no id.
    fn of(&mut self, r: &Replica) -> Option<&mut Replica> {
        self.replicas
            .iter_mut()
            .find(|x| x.id == r.id && x.hostname == r.hostname && x.state != ReplicaState::Starting)
    }

    /// Frees replica `r` from the operation that held it.
    fn release(&mut self, r: &Replica) {
        if let Some(x) = self.of(r) {
            x.busy = false;
        }
    }

    /// Gives up the hostnames reserved for replicas that were not started.
    fn unreserve(&mut self, names: &[String]) {
        self.replicas
            .retain(|r| !(r.state == ReplicaState::Starting && names.contains(&r.hostname)));
    }
}

/// A container a refresh took in: adopted, or (`resumed`) one whose removal a restart interrupted.
struct Found {
    hostname: String,
    container: String,
    resumed: bool,
}

/// What became of a replica chosen for removal.
enum Retired {
    Removed,
    /// Its removal could not be recorded: nothing changed, it still runs and takes traffic.
    Kept(DockerError),
    /// Out of traffic and marked; its removal failed and is retried.
    Retrying(DockerError),
}

/// The replicas of one service.
pub(crate) struct ReplicaSet {
    service: Arc<str>,
    cfg: ReplicasConfig,
    autoscale: Option<AutoscaleConfig>,
    /// Container names are this and the hostname.
    prefix: String,
    /// How the Engine is reached, or why it cannot be (config validation reports it first).
    transport: Result<DockerTransport, String>,
    pool: Arc<Pool>,
    events: EventBus,
    /// A removed replica's sessions get this long before its container stops.
    drain_timeout: Duration,
    /// The connected Engine, reused until it cannot be reached.
    engine: Mutex<Option<Engine>>,
    /// Never held across a Docker call (module docs).
    state: Mutex<State>,
    rng: Rng,
    /// Docker is failing (logged once per streak).
    failing: AtomicBool,
    /// The first check has ended (start-up waits for it, bounded).
    checked: AtomicBool,
    checked_notify: Notify,
    /// Replacements made, and Docker calls that failed, for metrics.
    replaced: AtomicU64,
    docker_errors: AtomicU64,
}

/// A replica set's counts at one moment, as `/metrics` exports them ([`METRICS`]).
#[derive(Debug, Clone)]
pub(crate) struct ReplicaCounts {
    service: Arc<str>,
    running: usize,
    draining: usize,
    replaced: u64,
    docker_errors: u64,
}

impl Subject for ReplicaCounts {
    fn label_values(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.service)
    }
}

/// What `/metrics` exports about the replicas of each service that has a `replicas:` section.
pub(crate) const METRICS: Table<ReplicaCounts> = Table {
    subject: &["service"],
    families: &[
        Family::new(
            Kind::Gauge,
            "sluicegate_replicas",
            "Replicas sluicegate runs for the service, by state (running, draining).",
            &["state"],
            |r, o| {
                o.put(&["running"], r.running);
                o.put(&["draining"], r.draining);
            },
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_replica_replacements_total",
            "Replicas replaced because their container stopped, vanished or stayed unhealthy.",
            &[],
            |r, o| o.put(&[], r.replaced),
        ),
        Family::new(
            Kind::Counter,
            "sluicegate_docker_errors_total",
            "Docker Engine calls that failed (unreachable, refused, timed out).",
            &[],
            |r, o| o.put(&[], r.docker_errors),
        ),
    ],
};

impl ReplicaSet {
    /// The replica set of `cfg`, if it has a `replicas:` section.
    pub(crate) fn new(
        cfg: &ServiceConfig,
        pool: Arc<Pool>,
        events: EventBus,
    ) -> Option<Arc<ReplicaSet>> {
        let r = cfg.replicas.clone()?;
        let autoscale = cfg.autoscale.clone();
        let budget = heal::Budget::new(r.heal.max_per_minute);
        Some(Arc::new(ReplicaSet {
            service: cfg.name.as_str().into(),
            prefix: r
                .name_prefix
                .clone()
                .unwrap_or_else(|| format!("{}-", r.balancer)),
            transport: r.docker_transport(&DockerEnv::current()),
            drain_timeout: cfg.discovery.clone().unwrap_or_default().drain_timeout.0,
            cfg: r,
            autoscale,
            pool,
            events,
            engine: Mutex::new(None),
            state: Mutex::new(State {
                replicas: Vec::new(),
                ops: Ops {
                    autoscaler: None,
                    last_total: None,
                    budget,
                    started: false,
                    budget_spent: false,
                },
            }),
            rng: Rng::from_entropy(),
            failing: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            checked_notify: Notify::new(),
            replaced: AtomicU64::new(0),
            docker_errors: AtomicU64::new(0),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Checks the replicas every `check_interval` on the current (control) runtime until `stop`. The
    /// first check runs at once.
    pub(crate) fn start(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.cfg.check_interval.0);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Stopping interrupts a check too: a container it was starting is adopted later.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = me.check() => {}
                }
                if !me.checked.swap(true, Relaxed) {
                    me.checked_notify.notify_waiters();
                }
            }
        });
    }

    /// Completes once the first check has ended (adopting what runs, starting what is missing),
    /// whether Docker answered or not.
    pub(crate) async fn first_check(&self) {
        loop {
            let notified = self.checked_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.checked.load(Relaxed) {
                return;
            }
            notified.await;
        }
    }

    /// How long the service waits for the first check before it accepts: `replicas.timeout`, the
    /// bound on one Docker call (a healthy Engine lists and starts in far less).
    pub(crate) fn first_check_limit(&self) -> Duration {
        self.cfg.timeout.0
    }

    /// Stops checking (the service was removed or reconfigured). Its containers keep running: a
    /// balancer with the same labels adopts them.
    pub(crate) fn stopped(&self) {
        tracing::info!(service = %self.service, replicas = self.hostnames().len(), "no longer managing the replicas; their containers keep running");
    }

    /// The replicas' hostnames, those being started or removed left out.
    pub(crate) fn hostnames(&self) -> Vec<String> {
        self.state().running()
    }

    /// Every replica, for the admin API.
    pub(crate) fn replicas(&self) -> Vec<Replica> {
        self.state().replicas.clone()
    }

    /// Its counts now, for metrics.
    pub(crate) fn counts(&self) -> ReplicaCounts {
        let st = self.state();
        let n = |s| st.replicas.iter().filter(|r| r.state == s).count();
        ReplicaCounts {
            service: self.service.clone(),
            running: n(ReplicaState::Running),
            draining: n(ReplicaState::Draining),
            replaced: self.replaced.load(Relaxed),
            docker_errors: self.docker_errors.load(Relaxed),
        }
    }

    /// The connected Engine (connecting on first use, and again after it could not be reached). The
    /// connection is made outside every lock: an Engine that hangs holds only this caller.
    async fn engine(&self) -> Result<Engine, DockerError> {
        if let Some(e) = lock(&self.engine).as_ref() {
            return Ok(e.clone());
        }
        let transport = self
            .transport
            .as_ref()
            .map_err(|reason| DockerError::Unavailable {
                endpoint: self.cfg.docker.clone().unwrap_or_default(),
                reason: reason.clone(),
            })?;
        let e = Engine::connect(transport, self.cfg.timeout.0).await?;
        *lock(&self.engine) = Some(e.clone());
        Ok(e)
    }

    /// Notes a Docker failure: logged and streamed once per streak, counted always; an Engine that
    /// could not be reached is connected again next time.
    fn docker_failed(&self, what: &str, e: &DockerError) {
        self.docker_errors.fetch_add(1, Relaxed);
        if matches!(e, DockerError::Unavailable { .. } | DockerError::Timeout(_)) {
            *lock(&self.engine) = None;
        }
        if !self.failing.swap(true, Relaxed) {
            tracing::error!(service = %self.service, action = what, error = %e, "Docker failed: the replicas there are keep serving");
        }
        self.events.publish(Event::DockerError {
            service: &self.service,
            action: what,
            error: e.to_string(),
        });
    }

    fn docker_answered(&self) {
        if self.failing.swap(false, Relaxed) {
            tracing::info!(service = %self.service, "Docker answers again");
        }
    }

    fn labels(&self, hostname: &str) -> HashMap<String, String> {
        let mut l: HashMap<String, String> = self
            .cfg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        l.insert(BALANCER_LABEL.into(), self.cfg.balancer.clone());
        l.insert(SERVICE_LABEL.into(), self.service.to_string());
        l.insert(HOSTNAME_LABEL.into(), hostname.to_string());
        l
    }

    fn container_name(&self, hostname: &str) -> String {
        format!("{}{hostname}", self.prefix)
    }

    /// Tells the pool which replicas take traffic (the running ones with an address), and names them.
    /// Called with the state locked, so claims reach the pool in the order they were made.
    fn publish_claim(&self, st: &State) {
        let live: Vec<(SocketAddr, &str)> = st
            .replicas
            .iter()
            .filter(|r| {
                r.state == ReplicaState::Running && r.docker_state.as_deref() == Some("running")
            })
            .filter_map(|r| r.address.map(|a| (a, r.container.as_str())))
            .collect();
        self.pool.reconcile(
            Source::Docker,
            live.iter().map(|(a, _)| (*a, Weight::ONE)).collect(),
        );
        for (a, name) in live {
            self.pool.name_backend(a, name);
        }
    }

    /// What a new container of replica `hostname` is made of.
    fn spec(&self, hostname: &str) -> Spec {
        let l = &self.cfg.limits;
        Spec {
            name: self.container_name(hostname),
            hostname: hostname.to_string(),
            image: self.cfg.image.clone(),
            network: self.cfg.network.clone(),
            env: self
                .cfg
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            command: self.cfg.command.clone(),
            labels: self.labels(hostname),
            cap_add: self
                .cfg
                .capabilities
                .iter()
                .filter_map(|c| capability(c))
                .map(str::to_string)
                .collect(),
            memory: l.memory.map(|m| m.0.min(i64::MAX as u64) as i64),
            nano_cpus: l.cpus.map(|c| (c * 1e9).round() as i64),
            pids: l.pids.map(i64::from),
        }
    }

    /// Starts replica `hostname` (reserved, or being replaced); `replaced` says what it replaces.
    async fn start_one(
        &self,
        engine: &Engine,
        hostname: &str,
        replaced: Option<Replacement>,
    ) -> Result<(), DockerError> {
        let spec = self.spec(hostname);
        let (id, ip) = engine.run(&spec).await?;
        let address = SocketAddr::new(ip, self.cfg.port);
        tracing::info!(service = %self.service, replica = hostname, container = %spec.name, %address, "replica started");
        self.events.publish(Event::ReplicaStarted {
            service: &self.service,
            replica: hostname,
            container: &spec.name,
            address,
            replaces: replaced.as_ref().map(|r| r.previous_container.as_str()),
        });
        let mut st = self.state();
        let started = Replica {
            hostname: hostname.to_string(),
            container: spec.name,
            id,
            address: Some(address),
            state: ReplicaState::Running,
            docker_state: Some("running".into()),
            started_ms: unix_ms(),
            replaced,
            removal: None,
            unhealthy_since: None,
            docker_status: String::new(),
            busy: false,
            marked: false,
            remove_at: None,
        };
        match st
            .replicas
            .iter_mut()
            .find(|r| r.hostname == hostname && r.state != ReplicaState::Draining)
        {
            Some(r) => *r = started,
            None => st.replicas.push(started),
        }
        self.publish_claim(&st);
        Ok(())
    }

    /// Starts the replicas reserved as `names`; on a failure, stops there, gives up the rest, and
    /// says what was done.
    async fn start_reserved(&self, names: &[String]) -> Result<(), ScaleError> {
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(error) => {
                self.state().unreserve(names);
                self.docker_failed("connect", &error);
                return Err(ScaleError::docker(error));
            }
        };
        let mut done = Vec::new();
        for (i, h) in names.iter().enumerate() {
            if let Err(error) = self.start_one(&engine, h, None).await {
                self.state().unreserve(&names[i..]);
                self.docker_failed("start", &error);
                return Err(ScaleError::Docker {
                    error,
                    done,
                    retrying: Vec::new(),
                });
            }
            done.push(h.clone());
        }
        Ok(())
    }

    /// `POST /add`: starts `n` replicas, the named ones first; answers once they are started.
    pub(crate) async fn add(&self, req: ScaleRequest) -> Result<Vec<String>, ScaleError> {
        let names = {
            let mut st = self.state();
            let names = plan::plan_add(
                &st.taken(),
                &req,
                self.cfg.max,
                plan::numbered(&self.service),
            )?;
            for h in &names {
                let placeholder = Replica::starting(h, self.container_name(h));
                st.replicas.push(placeholder);
            }
            operator_changed(&mut st.ops);
            names
        };
        self.start_reserved(&names).await?;
        self.docker_answered();
        Ok(self.hostnames())
    }

    /// `DELETE /rm`: removes `n` replicas, the named ones first, each drained before its container
    /// stops; answers once they are gone, or once their removal has failed (it is then retried).
    pub(crate) async fn remove(&self, req: ScaleRequest) -> Result<Vec<String>, ScaleError> {
        let chosen = {
            let mut st = self.state();
            let names =
                plan::plan_remove(&st.running(), &st.busy(), &req, self.cfg.min, &self.rng)?;
            st.take(&names)
        };
        // Docker must answer before anything is drained: a refused request changes nothing.
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(error) => {
                let mut st = self.state();
                for r in &chosen {
                    st.release(r);
                }
                drop(st);
                self.docker_failed("connect", &error);
                return Err(ScaleError::docker(error));
            }
        };
        operator_changed(&mut self.state().ops);
        // Drained together: each waits for its own sessions.
        let results = join_all(chosen.iter().map(|r| self.retire(&engine, r))).await;
        let (mut done, mut retrying, mut failed) = (Vec::new(), Vec::new(), None);
        for (r, result) in chosen.iter().zip(results) {
            match result {
                Retired::Removed => done.push(r.hostname.clone()),
                Retired::Kept(e) => {
                    failed.get_or_insert(e);
                }
                Retired::Retrying(e) => {
                    retrying.push(r.hostname.clone());
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            None => {
                self.docker_answered();
                Ok(self.hostnames())
            }
            Some(error) => Err(ScaleError::Docker {
                error,
                done,
                retrying,
            }),
        }
    }

    /// Removes replica `r` (marked busy by the caller): records the removal in its container's name,
    /// takes it out of traffic, waits for its sessions, stops and removes its container. A removal
    /// that fails is retried by the checks, with back-off.
    async fn retire(&self, engine: &Engine, r: &Replica) -> Retired {
        let marked = removing_name(&r.container, &r.id);
        if let Err(e) = engine.rename(&r.id, &marked).await {
            self.state().release(r);
            self.docker_failed("rename", &e);
            return Retired::Kept(e);
        }
        {
            let mut st = self.state();
            if let Some(x) = st.of(r) {
                x.state = ReplicaState::Draining;
                x.container = marked;
                x.marked = true;
            }
            self.publish_claim(&st);
        }
        self.drain_sessions(r.address).await;
        match self.remove_container(engine, r).await {
            Ok(()) => Retired::Removed,
            Err(e) => Retired::Retrying(e),
        }
    }

    /// Waits until the sessions on `addr` end, at most the drain timeout.
    async fn drain_sessions(&self, addr: Option<SocketAddr>) {
        let Some(addr) = addr else { return };
        let deadline = Instant::now() + self.drain_timeout;
        let sessions = || {
            self.pool
                .all_backends()
                .iter()
                .find(|b| b.addr == addr)
                .map_or(0, |b| b.active())
        };
        // The pool signals nothing when a session ends; a short poll bounds the wait's overshoot.
        while sessions() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops and removes the container of draining replica `r` (busy) and forgets it; on a failure,
    /// schedules the next attempt.
    async fn remove_container(&self, engine: &Engine, r: &Replica) -> Result<(), DockerError> {
        let result = engine.remove(&r.id, self.cfg.stop_timeout.0).await;
        let mut st = self.state();
        let Some(i) = st.replicas.iter().position(|x| {
            x.id == r.id && x.hostname == r.hostname && x.state == ReplicaState::Draining
        }) else {
            return result;
        };
        match &result {
            Ok(()) => {
                let r = st.replicas.remove(i);
                drop(st);
                tracing::info!(service = %self.service, replica = %r.hostname, container = %r.container, "replica removed");
                self.events.publish(Event::ReplicaRemoved {
                    service: &self.service,
                    replica: &r.hostname,
                    container: &r.container,
                });
            }
            Err(e) => {
                drop(st);
                self.removal_failed(r, "remove", e);
            }
        }
        result
    }

    /// Notes that removing draining replica `r` failed at `step`, and schedules the next attempt.
    fn removal_failed(&self, r: &Replica, step: &str, e: &DockerError) {
        let mut st = self.state();
        let Some(x) = st.of(r) else { return };
        let failures = x.removal.as_ref().map_or(0, |x| x.failures) + 1;
        let wait = plan::retry_after(failures);
        x.busy = false;
        x.remove_at = Some(Instant::now() + wait);
        x.removal = Some(RemovalRetry {
            failures,
            error: e.to_string(),
            next_attempt_ms: unix_ms() + wait.as_millis() as u64,
        });
        let container = x.container.clone();
        drop(st);
        tracing::warn!(service = %self.service, replica = %r.hostname, %container, failures, retry_in_s = wait.as_secs(), error = %e, "removing the replica failed: retrying");
        self.docker_failed(step, e);
    }

    /// Tries again the removals that are due: those that failed, and those a restart found recorded.
    async fn retry_removals(&self, engine: &Engine) {
        let now = Instant::now();
        let due: Vec<Replica> = {
            let mut st = self.state();
            st.replicas
                .iter_mut()
                .filter(|r| {
                    r.state == ReplicaState::Draining
                        && !r.busy
                        && r.remove_at.is_some_and(|t| t <= now)
                })
                .map(|r| {
                    r.busy = true;
                    r.clone()
                })
                .collect()
        };
        for r in due {
            if !r.marked {
                let marked = removing_name(&r.container, &r.id);
                if let Err(e) = engine.rename(&r.id, &marked).await {
                    self.removal_failed(&r, "rename", &e);
                    continue;
                }
                if let Some(x) = self.state().of(&r) {
                    x.container = marked;
                    x.marked = true;
                }
            }
            let _ = self.remove_container(engine, &r).await;
        }
    }

    /// One check: list the containers, adopt and update, finish removals, heal, keep the minimum,
    /// autoscale.
    async fn check(self: &Arc<Self>) {
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => return self.docker_failed("connect", &e),
        };
        if let Err(e) = self.refresh(&engine).await {
            return self.docker_failed("list", &e);
        }
        self.docker_answered();
        self.retry_removals(&engine).await;
        self.heal(&engine).await;
        let names = {
            let mut st = self.state();
            let want = if st.ops.started {
                self.cfg.min
            } else {
                self.cfg.start.unwrap_or(self.cfg.min)
            };
            st.ops.started = true;
            let taken = st.taken();
            let have = taken.len() as u32;
            let req = ScaleRequest {
                n: want.saturating_sub(have) as i64,
                hostnames: Vec::new(),
            };
            match plan::plan_add(&taken, &req, self.cfg.max, plan::numbered(&self.service)) {
                Ok(names) if have < want => {
                    tracing::info!(service = %self.service, have, want, "starting replicas up to the minimum");
                    for h in &names {
                        st.replicas
                            .push(Replica::starting(h, self.container_name(h)));
                    }
                    names
                }
                _ => Vec::new(),
            }
        };
        if !names.is_empty() {
            let _ = self.start_reserved(&names).await;
        }
        self.autoscale(&engine).await;
    }

    /// Lists the labelled containers: adopts the running ones not known yet, takes up the removals a
    /// restart found recorded, updates the rest, and reads each replica's health from the pool.
    async fn refresh(&self, engine: &Engine) -> Result<(), DockerError> {
        let seen = engine
            .list(
                &[
                    (BALANCER_LABEL, &self.cfg.balancer),
                    (SERVICE_LABEL, &self.service),
                ],
                &self.cfg.network,
            )
            .await?;
        let now = Instant::now();
        let (found, gone) = {
            let mut st = self.state();
            let found: Vec<Found> = seen
                .iter()
                .filter_map(|s| self.take_in(&mut st, s, now))
                .collect();
            let gone = self.sweep(&mut st, &seen, now);
            self.publish_claim(&st);
            (found, gone)
        };
        self.announce_refresh(found, gone);
        Ok(())
    }

    /// Merges one listed container into the known replicas: updates a known one (or starts draining
    /// it, when another set of this service marked it for removal), or takes in one not known yet.
    /// Returns what was found when it was not known.
    fn take_in(&self, st: &mut State, s: &Seen, now: Instant) -> Option<Found> {
        let address = s.ip.map(|ip| SocketAddr::new(ip, self.cfg.port));
        let removing = is_removing_name(&s.name, &s.id);
        if let Some(r) = st.replicas.iter_mut().find(|r| r.id == s.id) {
            r.docker_state = Some(s.state.clone());
            r.docker_status = s.status.clone();
            if address.is_some() {
                r.address = address;
            }
            if removing && r.state != ReplicaState::Draining {
                // Marked by another set of this service (before a reload): it drains that set's
                // sessions; this one removes it after the drain timeout.
                r.state = ReplicaState::Draining;
                r.container = s.name.clone();
                r.marked = true;
                r.remove_at = Some(now + self.drain_timeout);
            }
            return None;
        }
        let hostname = s
            .labels
            .get(HOSTNAME_LABEL)
            .cloned()
            .unwrap_or_else(|| s.name.trim_start_matches(&self.prefix).to_string());
        let known = |r: &Replica| r.hostname == hostname && r.state != ReplicaState::Draining;
        if !removing && st.replicas.iter().any(known) {
            // A second container for one hostname (a replacement being made): the known one stays
            // the replica.
            return None;
        }
        let mut r = Replica::starting(&hostname, s.name.clone());
        r.id = s.id.clone();
        r.address = address;
        r.docker_state = Some(s.state.clone());
        r.docker_status = s.status.clone();
        r.busy = false;
        if removing {
            // Its removal was decided before a restart: finish it, never adopt it.
            r.state = ReplicaState::Draining;
            r.marked = true;
            r.remove_at = Some(now);
        } else {
            r.state = ReplicaState::Running;
        }
        st.replicas.push(r);
        Some(Found {
            hostname,
            container: s.name.clone(),
            resumed: removing,
        })
    }

    /// Notes which replicas' containers were not listed and which are unhealthy in the pool, and
    /// forgets the draining replicas whose container is gone (nothing is left to remove): returns
    /// those.
    fn sweep(&self, st: &mut State, seen: &[Seen], now: Instant) -> Vec<Replica> {
        for r in st.replicas.iter_mut() {
            if !r.id.is_empty() && !seen.iter().any(|s| s.id == r.id) {
                r.docker_state = None;
            }
            let unhealthy = r
                .address
                .and_then(|a| self.pool.member(a))
                .is_some_and(|b| b.health() == Health::Unhealthy);
            r.unhealthy_since = if unhealthy {
                r.unhealthy_since.or(Some(now))
            } else {
                None
            };
        }
        let (gone, kept) = std::mem::take(&mut st.replicas).into_iter().partition(|r| {
            r.state == ReplicaState::Draining && !r.busy && r.docker_state.is_none()
        });
        st.replicas = kept;
        gone
    }

    /// Logs and streams what a refresh found, after the set's lock is released.
    fn announce_refresh(&self, found: Vec<Found>, gone: Vec<Replica>) {
        for f in found {
            let (replica, container) = (&f.hostname, &f.container);
            if f.resumed {
                tracing::info!(service = %self.service, %replica, %container, "finishing the removal of a replica decided before a restart");
                continue;
            }
            tracing::info!(service = %self.service, %replica, %container, "replica adopted");
            self.events.publish(Event::ReplicaAdopted {
                service: &self.service,
                replica,
                container,
            });
        }
        for r in gone {
            tracing::info!(service = %self.service, replica = %r.hostname, container = %r.container, "replica removed (its container was gone)");
            self.events.publish(Event::ReplicaRemoved {
                service: &self.service,
                replica: &r.hostname,
                container: &r.container,
            });
        }
    }

    /// Replaces the replicas that died or stayed unhealthy, within the budget.
    async fn heal(&self, engine: &Engine) {
        let now = Instant::now();
        let todo: Vec<(Replica, heal::Reason)> = {
            let mut st = self.state();
            let observed: Vec<heal::Observed> = st
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running && !r.busy)
                .map(|r| heal::Observed {
                    hostname: r.hostname.clone(),
                    state: r.docker_state.clone(),
                    status: r.docker_status.clone(),
                    unhealthy_since: r.unhealthy_since,
                })
                .collect();
            let mut todo = Vec::new();
            for (hostname, reason) in
                heal::to_replace(&observed, now, self.cfg.heal.unhealthy_after.0)
            {
                if !st.ops.budget.take(now) {
                    if !st.ops.budget_spent {
                        st.ops.budget_spent = true;
                        tracing::warn!(service = %self.service, per_minute = self.cfg.heal.max_per_minute, "replacement budget spent: healing waits");
                        self.events.publish(Event::ReplicaHealPaused {
                            service: &self.service,
                            per_minute: self.cfg.heal.max_per_minute,
                        });
                    }
                    break;
                }
                st.ops.budget_spent = false;
                todo.extend(
                    st.take(std::slice::from_ref(&hostname))
                        .into_iter()
                        .map(|r| (r, reason.clone())),
                );
            }
            todo
        };
        for (old, reason) in todo {
            let hostname = old.hostname.clone();
            tracing::warn!(service = %self.service, replica = %hostname, container = %old.container, reason = %reason, "replacing replica");
            if old.docker_state.is_some() {
                if let Err(e) = engine.remove(&old.id, Duration::ZERO).await {
                    self.state().release(&old);
                    self.docker_failed("remove", &e);
                    continue;
                }
            }
            let replacement = Replacement {
                previous_container: old.container.clone(),
                reason: reason.to_string(),
                at_ms: unix_ms(),
            };
            self.replaced.fetch_add(1, Relaxed);
            self.events.publish(Event::ReplicaReplaced {
                service: &self.service,
                replica: &hostname,
                container: &old.container,
                reason: reason.to_string(),
            });
            if let Err(e) = self.start_one(engine, &hostname, Some(replacement)).await {
                // Known as gone: the next check tries again, within the budget.
                {
                    let mut st = self.state();
                    if let Some(r) = st.of(&old) {
                        r.docker_state = None;
                        r.id.clear();
                        r.busy = false;
                    }
                    self.publish_claim(&st);
                }
                self.docker_failed("start", &e);
            }
        }
    }

    /// Feeds the autoscaler and acts on its decision.
    async fn autoscale(self: &Arc<Self>, engine: &Engine) {
        let Some(cfg) = &self.autoscale else { return };
        let now = Instant::now();
        let (up, down) = {
            let mut st = self.state();
            let load = self.autoscale_load(&mut st, cfg.metric, now);
            // Those being started count: they are on their way.
            let taken = st.taken();
            let replicas = taken.len() as u32;
            let policy = self.autoscale_policy(cfg);
            let scaler = st
                .ops
                .autoscaler
                .get_or_insert_with(|| Autoscaler::new(policy, now));
            scaler.observe(now, load);
            let (direction, to, per_replica) = match scaler.decide(now, replicas) {
                Decision::Hold => return,
                Decision::Up { to, per_replica } => ("up", to, per_replica),
                Decision::Down { to, per_replica } => ("down", to, per_replica),
            };
            scaler.changed(now);
            tracing::info!(service = %self.service, direction, from = replicas, to, metric = cfg.metric.as_str(), per_replica, target = cfg.target, "autoscale");
            self.events.publish(Event::Autoscale {
                service: &self.service,
                direction,
                from: replicas,
                to,
                metric: cfg.metric.as_str(),
                per_replica,
                target: cfg.target,
                window_s: cfg.window.0.as_secs_f64(),
            });
            self.scale_to(&mut st, &taken, to)
        };
        if !up.is_empty() {
            let _ = self.start_reserved(&up).await;
        }
        if !down.is_empty() {
            // Off the check: draining takes up to the drain timeout. Together, as /rm does: each
            // leaves traffic at once and waits for its own sessions.
            let (engine, me) = (engine.clone(), self.clone());
            tokio::spawn(async move {
                join_all(down.iter().map(|r| me.retire(&engine, r))).await;
            });
        }
    }

    /// The autoscaler's policy, from the service's `autoscale:` and `replicas:` bounds.
    fn autoscale_policy(&self, cfg: &AutoscaleConfig) -> autoscale::AutoscalePolicy {
        autoscale::AutoscalePolicy {
            target: cfg.target,
            min: cfg.min.unwrap_or(self.cfg.min).max(1),
            max: cfg.max.unwrap_or(self.cfg.max),
            up_cooldown: cfg.up_cooldown.0,
            down_cooldown: cfg.down_cooldown.0,
            window: cfg.window.0,
        }
    }

    /// The load the autoscaler weighs now: the running replicas' open connections, or the rate of
    /// connections established to them since the previous check.
    fn autoscale_load(&self, st: &mut State, metric: AutoscaleMetric, now: Instant) -> f64 {
        match metric {
            AutoscaleMetric::ActiveConnections => st
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running)
                .filter_map(|r| r.address.and_then(|a| self.pool.member(a)))
                .map(|b| b.active())
                .sum::<u64>() as f64,
            AutoscaleMetric::ConnectionRate => {
                let established: u64 = self
                    .pool
                    .all_backends()
                    .iter()
                    .map(|b| b.stats.total())
                    .sum();
                let rate = match st.ops.last_total {
                    Some((t, before)) if now > t => {
                        established.saturating_sub(before) as f64
                            / now.duration_since(t).as_secs_f64()
                    }
                    _ => 0.0,
                };
                st.ops.last_total = Some((now, established));
                rate
            }
        }
    }

    /// Reserves the hostnames of the replicas to start, or takes the replicas to remove, to go from
    /// `taken` to `to` replicas.
    fn scale_to(&self, st: &mut State, taken: &[String], to: u32) -> (Vec<String>, Vec<Replica>) {
        let replicas = taken.len() as u32;
        if to > replicas {
            let req = ScaleRequest {
                n: (to - replicas) as i64,
                hostnames: Vec::new(),
            };
            let names = plan::plan_add(taken, &req, self.cfg.max, plan::numbered(&self.service))
                .unwrap_or_default();
            for h in &names {
                st.replicas
                    .push(Replica::starting(h, self.container_name(h)));
            }
            (names, Vec::new())
        } else {
            let req = ScaleRequest {
                n: (replicas - to) as i64,
                hostnames: Vec::new(),
            };
            let names = plan::plan_remove(&st.running(), &st.busy(), &req, self.cfg.min, &self.rng)
                .unwrap_or_default();
            (Vec::new(), st.take(&names))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_is_recorded_in_a_name_no_config_can_produce() {
        let id = "3f2a9c1b7d0e55aa";
        let marked = removing_name("sluicegate-web-1", id);
        assert_eq!(marked, "sluicegate-web-1.removing-3f2a9c1b7d0e");
        assert!(crate::config::is_container_name(&marked));
        assert!(is_removing_name(&marked, id));
        // Another container's mark, a hostname that looks like one, an unknown id: not this one's.
        assert!(!is_removing_name(&marked, "0123456789abcdef"));
        assert!(!is_removing_name("sluicegate-web.removing-", id));
        assert!(!is_removing_name("x.removing-", ""));
        // An Engine's odd id is cut by characters, never inside one.
        assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
        assert_eq!(short_id("abc"), "abc");
    }
}
