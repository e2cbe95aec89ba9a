//! Replicas: backend containers sluicegate runs itself through the Docker Engine. It starts them,
//! adopts the ones it started before a restart, removes them (after draining their sessions), replaces
//! the ones that die or stay unhealthy, and scales their number with the load.
//!
//! The parts: `engine.rs` speaks the Engine API; `plan.rs` decides what a `POST /add` or `DELETE /rm`
//! does (pure); `heal.rs` decides what to replace and how often (pure); `autoscale.rs` decides when to
//! scale (pure); this file acts on those decisions and keeps the service's pool told (source
//! `docker`). Every change goes through one lock, so the API, healing and the autoscaler never act on
//! the same replica at once.
//!
//! Containers carry the labels `io.sluicegate.balancer`, `io.sluicegate.service` and
//! `io.sluicegate.hostname`; sluicegate only ever lists, stops or removes containers with its own
//! balancer and service labels.

mod autoscale;
mod engine;
mod heal;
mod plan;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) use engine::DockerError;
pub(crate) use plan::{Refusal, ScaleRequest};

use crate::config::{AutoscaleConfig, AutoscaleMetric, ReplicasConfig, ServiceConfig};
use crate::events::EventBus;
use crate::health::Health;
use crate::pool::{Pool, Source};
use crate::util::{lock, unix_ms, Rng};
use autoscale::{Autoscaler, Decision};
use engine::{Engine, Spec};

/// Label: whose containers these are (`replicas.balancer`).
pub(crate) const BALANCER_LABEL: &str = "io.sluicegate.balancer";
/// Label: the service a container serves.
pub(crate) const SERVICE_LABEL: &str = "io.sluicegate.service";
/// Label: the replica's hostname, which `/rep` lists and `/rm` names.
pub(crate) const HOSTNAME_LABEL: &str = "io.sluicegate.hostname";

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReplicaState {
    /// Its container runs (or is coming up); it takes traffic once its probe passes.
    Running,
    /// Being removed: no new connections; its container stops once its sessions finish.
    Draining,
}

/// A replaced replica: what came before, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Replacement {
    pub(crate) previous_container: String,
    pub(crate) reason: String,
    pub(crate) at_ms: u64,
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
    #[serde(skip)]
    unhealthy_since: Option<Instant>,
    #[serde(skip)]
    docker_status: String,
}

/// Why a seed-API call did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScaleError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// Docker failed; `done` lists what was done before it did.
    #[error("{}{error}", if done.is_empty() { String::new() } else { format!("{} done ({}) before: ", done.len(), done.join(", ")) })]
    Docker {
        error: DockerError,
        done: Vec<String>,
    },
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

/// The replicas of one service.
pub(crate) struct ReplicaSet {
    service: Arc<str>,
    cfg: ReplicasConfig,
    autoscale: Option<AutoscaleConfig>,
    /// Container names are this and the hostname.
    prefix: String,
    endpoint: String,
    pool: Arc<Pool>,
    events: EventBus,
    /// A removed replica's sessions get this long before its container stops.
    drain_timeout: Duration,
    engine: tokio::sync::Mutex<Option<Engine>>,
    ops: tokio::sync::Mutex<Ops>,
    view: Mutex<Vec<Replica>>,
    rng: Rng,
    /// Docker is failing (logged once per streak).
    failing: AtomicBool,
    /// Replacements made, and Docker calls that failed, for metrics.
    pub(crate) replaced: AtomicU64,
    pub(crate) docker_errors: AtomicU64,
}

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
            endpoint: r.docker.clone().unwrap_or_else(engine::default_endpoint),
            drain_timeout: cfg.discovery.clone().unwrap_or_default().drain_timeout.0,
            cfg: r,
            autoscale,
            pool,
            events,
            engine: tokio::sync::Mutex::new(None),
            ops: tokio::sync::Mutex::new(Ops {
                autoscaler: None,
                last_total: None,
                budget,
                started: false,
                budget_spent: false,
            }),
            view: Mutex::new(Vec::new()),
            rng: Rng::from_entropy(),
            failing: AtomicBool::new(false),
            replaced: AtomicU64::new(0),
            docker_errors: AtomicU64::new(0),
        }))
    }

    /// Checks the replicas every `check_interval` on the current (control) runtime until `stop`.
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
            }
        });
    }

    /// How long start-up waits for the first check: one Docker call to list, and one per container to
    /// start, each bounded by `replicas.timeout`.
    pub(crate) fn first_check_limit(&self) -> Duration {
        self.cfg.timeout.0
    }

    /// Stops checking (the service was removed or reconfigured). Its containers keep running: a
    /// balancer with the same labels adopts them.
    pub(crate) fn stopped(&self) {
        tracing::info!(service = %self.service, replicas = self.hostnames().len(), "no longer managing the replicas; their containers keep running");
    }

    /// The replicas' hostnames, those being removed left out.
    pub(crate) fn hostnames(&self) -> Vec<String> {
        let mut h: Vec<String> = lock(&self.view)
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .map(|r| r.hostname.clone())
            .collect();
        h.sort();
        h
    }

    /// Every replica, for the admin API.
    pub(crate) fn replicas(&self) -> Vec<Replica> {
        lock(&self.view).clone()
    }

    /// Running replicas (for metrics), and those draining.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let v = lock(&self.view);
        let running = v
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .count();
        (running, v.len() - running)
    }

    /// The connected Engine (connecting on first use, and again after it could not be reached).
    async fn engine(&self) -> Result<Engine, DockerError> {
        let mut g = self.engine.lock().await;
        if let Some(e) = g.as_ref() {
            return Ok(e.clone());
        }
        let e = Engine::connect(&self.endpoint, self.cfg.timeout.0).await?;
        *g = Some(e.clone());
        Ok(e)
    }

    /// Notes a Docker failure: logged and streamed once per streak, counted always; an Engine that
    /// could not be reached is connected again next time.
    async fn docker_failed(&self, what: &str, e: &DockerError) {
        self.docker_errors.fetch_add(1, Relaxed);
        if matches!(e, DockerError::Unavailable { .. } | DockerError::Timeout(_)) {
            *self.engine.lock().await = None;
        }
        if !self.failing.swap(true, Relaxed) {
            tracing::error!(service = %self.service, action = what, error = %e, "Docker failed: the replicas there are keep serving");
        }
        self.events.publish(
            "docker_error",
            json!({"service": &*self.service, "action": what, "error": e.to_string()}),
        );
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

    /// Tells the pool which replicas take traffic (the running ones with an address), and names them.
    fn publish_claim(&self) {
        let live: Vec<(SocketAddr, String)> = lock(&self.view)
            .iter()
            .filter(|r| {
                r.state == ReplicaState::Running && r.docker_state.as_deref() == Some("running")
            })
            .filter_map(|r| r.address.map(|a| (a, r.container.clone())))
            .collect();
        self.pool
            .reconcile(Source::Docker, live.iter().map(|(a, _)| (*a, 1)).collect());
        for (a, name) in live {
            self.pool.name_backend(a, &name);
        }
    }

    /// Starts a replica named `hostname`; `replaced` says what it replaces.
    async fn start_one(
        &self,
        engine: &Engine,
        hostname: &str,
        replaced: Option<Replacement>,
    ) -> Result<(), DockerError> {
        let spec = Spec {
            name: format!("{}{hostname}", self.prefix),
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
        };
        let (id, ip) = engine.run(&spec).await?;
        let address = SocketAddr::new(ip, self.cfg.port);
        tracing::info!(service = %self.service, replica = hostname, container = %spec.name, %address, "replica started");
        self.events.publish(
            "replica_started",
            json!({"service": &*self.service, "replica": hostname, "container": &spec.name,
                   "address": address, "replaces": replaced.as_ref().map(|r| &r.previous_container)}),
        );
        let mut v = lock(&self.view);
        v.retain(|r| r.hostname != hostname);
        v.push(Replica {
            hostname: hostname.to_string(),
            container: spec.name,
            id,
            address: Some(address),
            state: ReplicaState::Running,
            docker_state: Some("running".into()),
            started_ms: unix_ms(),
            replaced,
            unhealthy_since: None,
            docker_status: String::new(),
        });
        Ok(())
    }

    /// Starts replicas named `names`; on a failure, stops there and says what was done.
    async fn start_many(&self, engine: &Engine, names: &[String]) -> Result<(), ScaleError> {
        let mut done = Vec::new();
        for h in names {
            if let Err(error) = self.start_one(engine, h, None).await {
                self.publish_claim();
                self.docker_failed("start", &error).await;
                return Err(ScaleError::Docker { error, done });
            }
            done.push(h.clone());
        }
        self.publish_claim();
        Ok(())
    }

    /// `POST /add`: starts `n` replicas, the named ones first; answers once they are started.
    pub(crate) async fn add(&self, req: ScaleRequest) -> Result<Vec<String>, ScaleError> {
        let mut ops = self.ops.lock().await;
        let current = self.hostnames();
        let names = plan::plan_add(&current, &req, self.cfg.max, plan::numbered(&self.service))?;
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(error) => {
                self.docker_failed("connect", &error).await;
                return Err(ScaleError::Docker {
                    error,
                    done: Vec::new(),
                });
            }
        };
        let started = self.start_many(&engine, &names).await;
        operator_changed(&mut ops);
        started?;
        self.docker_answered();
        Ok(self.hostnames())
    }

    /// `DELETE /rm`: removes `n` replicas, the named ones first, each drained before its container
    /// stops; answers once they are gone.
    pub(crate) async fn remove(&self, req: ScaleRequest) -> Result<Vec<String>, ScaleError> {
        let chosen = {
            let mut ops = self.ops.lock().await;
            let current = self.hostnames();
            let names = plan::plan_remove(&current, &req, self.cfg.min, &self.rng)?;
            // Docker must answer before anything is drained: a refused request changes nothing.
            if let Err(error) = self.engine().await {
                self.docker_failed("connect", &error).await;
                return Err(ScaleError::Docker {
                    error,
                    done: Vec::new(),
                });
            }
            operator_changed(&mut ops);
            self.mark_draining(&names)
        };
        let engine = self.engine().await.map_err(|error| ScaleError::Docker {
            error,
            done: Vec::new(),
        })?;
        // Drained together: each waits for its own sessions.
        let results = join_all(chosen.iter().map(|r| self.drain_and_remove(&engine, r))).await;
        let mut done = Vec::new();
        for (r, result) in chosen.iter().zip(results) {
            match result {
                Ok(()) => done.push(r.hostname.clone()),
                Err(error) => {
                    self.docker_failed("remove", &error).await;
                    return Err(ScaleError::Docker { error, done });
                }
            }
        }
        self.docker_answered();
        Ok(self.hostnames())
    }

    /// Takes `names` out of traffic (the pool drains them); returns them as they were.
    fn mark_draining(&self, names: &[String]) -> Vec<Replica> {
        let chosen: Vec<Replica> = {
            let mut v = lock(&self.view);
            v.iter_mut()
                .filter(|r| names.contains(&r.hostname))
                .map(|r| {
                    r.state = ReplicaState::Draining;
                    r.clone()
                })
                .collect()
        };
        self.publish_claim();
        chosen
    }

    /// Waits until `r`'s sessions end (at most the drain timeout), then stops and removes its
    /// container.
    async fn drain_and_remove(&self, engine: &Engine, r: &Replica) -> Result<(), DockerError> {
        if let Some(addr) = r.address {
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
        engine.remove(&r.id, self.cfg.stop_timeout.0).await?;
        lock(&self.view).retain(|x| x.id != r.id);
        tracing::info!(service = %self.service, replica = %r.hostname, container = %r.container, "replica removed");
        self.events.publish(
            "replica_removed",
            json!({"service": &*self.service, "replica": &r.hostname, "container": &r.container}),
        );
        Ok(())
    }

    /// One check: list the containers, adopt and update, heal, keep the minimum, autoscale.
    pub(crate) async fn check(self: &Arc<Self>) {
        let mut ops = self.ops.lock().await;
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => return self.docker_failed("connect", &e).await,
        };
        if let Err(e) = self.refresh(&engine).await {
            return self.docker_failed("list", &e).await;
        }
        self.docker_answered();
        self.heal(&engine, &mut ops).await;
        let want = if ops.started {
            self.cfg.min
        } else {
            self.cfg.start.unwrap_or(self.cfg.min)
        };
        ops.started = true;
        let have = self.hostnames().len() as u32;
        if have < want {
            let req = ScaleRequest {
                n: (want - have) as i64,
                hostnames: Vec::new(),
            };
            if let Ok(names) = plan::plan_add(
                &self.hostnames(),
                &req,
                self.cfg.max,
                plan::numbered(&self.service),
            ) {
                tracing::info!(service = %self.service, have, want, "starting replicas up to the minimum");
                let _ = self.start_many(&engine, &names).await;
            }
        }
        self.autoscale(&engine, &mut ops).await;
    }

    /// Lists the labelled containers: adopts the running ones not known yet, updates the rest, and
    /// reads each replica's health from the pool.
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
        let mut adopted = Vec::new();
        {
            let mut v = lock(&self.view);
            for s in &seen {
                let address = s.ip.map(|ip| SocketAddr::new(ip, self.cfg.port));
                match v.iter_mut().find(|r| r.id == s.id) {
                    Some(r) => {
                        r.docker_state = Some(s.state.clone());
                        r.docker_status = s.status.clone();
                        if address.is_some() {
                            r.address = address;
                        }
                    }
                    None => {
                        let hostname =
                            s.labels.get(HOSTNAME_LABEL).cloned().unwrap_or_else(|| {
                                s.name.trim_start_matches(&self.prefix).to_string()
                            });
                        if v.iter().any(|r| r.hostname == hostname) {
                            // A second container for one hostname (a replacement being made): the
                            // known one stays the replica.
                            continue;
                        }
                        adopted.push((hostname.clone(), s.name.clone()));
                        v.push(Replica {
                            hostname,
                            container: s.name.clone(),
                            id: s.id.clone(),
                            address,
                            state: ReplicaState::Running,
                            docker_state: Some(s.state.clone()),
                            started_ms: unix_ms(),
                            replaced: None,
                            unhealthy_since: None,
                            docker_status: s.status.clone(),
                        });
                    }
                }
            }
            for r in v.iter_mut() {
                if !seen.iter().any(|s| s.id == r.id) {
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
        }
        for (hostname, container) in adopted {
            tracing::info!(service = %self.service, replica = %hostname, %container, "replica adopted");
            self.events.publish(
                "replica_adopted",
                json!({"service": &*self.service, "replica": hostname, "container": container}),
            );
        }
        self.publish_claim();
        Ok(())
    }

    /// Replaces the replicas that died or stayed unhealthy, within the budget.
    async fn heal(&self, engine: &Engine, ops: &mut Ops) {
        let now = Instant::now();
        let observed: Vec<heal::Observed> = lock(&self.view)
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .map(|r| heal::Observed {
                hostname: r.hostname.clone(),
                state: r.docker_state.clone(),
                status: r.docker_status.clone(),
                unhealthy_since: r.unhealthy_since,
            })
            .collect();
        for (hostname, reason) in heal::to_replace(&observed, now, self.cfg.heal.unhealthy_after.0)
        {
            if !ops.budget.take(now) {
                if !ops.budget_spent {
                    ops.budget_spent = true;
                    tracing::warn!(service = %self.service, per_minute = self.cfg.heal.max_per_minute, "replacement budget spent: healing waits");
                    self.events.publish(
                        "replica_heal_paused",
                        json!({"service": &*self.service, "per_minute": self.cfg.heal.max_per_minute}),
                    );
                }
                return;
            }
            ops.budget_spent = false;
            let Some(old) = lock(&self.view)
                .iter()
                .find(|r| r.hostname == hostname)
                .cloned()
            else {
                continue;
            };
            tracing::warn!(service = %self.service, replica = %hostname, container = %old.container, reason = %reason, "replacing replica");
            if old.docker_state.is_some() {
                if let Err(e) = engine.remove(&old.id, Duration::ZERO).await {
                    self.docker_failed("remove", &e).await;
                    continue;
                }
            }
            let replacement = Replacement {
                previous_container: old.container.clone(),
                reason: reason.to_string(),
                at_ms: unix_ms(),
            };
            self.replaced.fetch_add(1, Relaxed);
            self.events.publish(
                "replica_replaced",
                json!({"service": &*self.service, "replica": &hostname, "container": &old.container,
                       "reason": reason.to_string()}),
            );
            match self.start_one(engine, &hostname, Some(replacement)).await {
                Ok(()) => self.publish_claim(),
                Err(e) => {
                    // Known as gone: the next check tries again, within the budget.
                    if let Some(r) = lock(&self.view).iter_mut().find(|r| r.hostname == hostname) {
                        r.docker_state = None;
                        r.id.clear();
                    }
                    self.publish_claim();
                    self.docker_failed("start", &e).await;
                }
            }
        }
    }

    /// Feeds the autoscaler and acts on its decision.
    async fn autoscale(self: &Arc<Self>, engine: &Engine, ops: &mut Ops) {
        let Some(cfg) = &self.autoscale else { return };
        let now = Instant::now();
        let policy = autoscale::Policy {
            target: cfg.target,
            min: cfg.min.unwrap_or(self.cfg.min).max(1),
            max: cfg.max.unwrap_or(self.cfg.max),
            up_cooldown: cfg.up_cooldown.0,
            down_cooldown: cfg.down_cooldown.0,
            window: cfg.window.0,
        };
        let scaler = ops
            .autoscaler
            .get_or_insert_with(|| Autoscaler::new(policy, now));
        let addrs: Vec<SocketAddr> = lock(&self.view)
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .filter_map(|r| r.address)
            .collect();
        let backends: Vec<_> = addrs.iter().filter_map(|a| self.pool.member(*a)).collect();
        let total = match cfg.metric {
            AutoscaleMetric::ActiveConnections => {
                backends.iter().map(|b| b.active()).sum::<u64>() as f64
            }
            AutoscaleMetric::ConnectionRate => {
                let established: u64 = self
                    .pool
                    .all_backends()
                    .iter()
                    .map(|b| b.stats.total.load(Relaxed))
                    .sum();
                let rate = match ops.last_total {
                    Some((t, before)) if now > t => {
                        established.saturating_sub(before) as f64
                            / now.duration_since(t).as_secs_f64()
                    }
                    _ => 0.0,
                };
                ops.last_total = Some((now, established));
                rate
            }
        };
        scaler.observe(now, total);
        let replicas = self.hostnames().len() as u32;
        let decision = scaler.decide(now, replicas);
        let (direction, to, per) = match decision {
            Decision::Hold => return,
            Decision::Up { to, per_replica } => ("up", to, per_replica),
            Decision::Down { to, per_replica } => ("down", to, per_replica),
        };
        scaler.changed(now);
        tracing::info!(service = %self.service, direction, from = replicas, to, metric = cfg.metric.as_str(), per_replica = per, target = cfg.target, "autoscale");
        self.events.publish(
            "autoscale",
            json!({"service": &*self.service, "direction": direction, "from": replicas, "to": to,
                   "metric": cfg.metric.as_str(), "per_replica": per, "target": cfg.target,
                   "window_s": cfg.window.0.as_secs_f64()}),
        );
        if to > replicas {
            let req = ScaleRequest {
                n: (to - replicas) as i64,
                hostnames: Vec::new(),
            };
            if let Ok(names) = plan::plan_add(
                &self.hostnames(),
                &req,
                self.cfg.max,
                plan::numbered(&self.service),
            ) {
                let _ = self.start_many(engine, &names).await;
            }
        } else {
            let req = ScaleRequest {
                n: (replicas - to) as i64,
                hostnames: Vec::new(),
            };
            if let Ok(names) = plan::plan_remove(&self.hostnames(), &req, self.cfg.min, &self.rng) {
                let chosen = self.mark_draining(&names);
                // Off the check: draining takes up to the drain timeout.
                let (engine, me) = (engine.clone(), self.clone());
                tokio::spawn(async move {
                    for r in chosen {
                        if let Err(e) = me.drain_and_remove(&engine, &r).await {
                            me.docker_failed("remove", &e).await;
                        }
                    }
                });
            }
        }
    }
}
