//! The running server's registry and its control: which services run, with what config, and how to
//! reload (`reload.rs`) and drain (`drain.rs`) them. The admin API and the signal handlers steer the
//! server through [`Control`]; the application root (`app.rs`) creates it and runs it.
//!
//! What runs where: accept loops and sessions on the data-plane workers (`workers.rs`), one
//! single-threaded runtime per core; everything here (pool probes and timers, DNS watchers, reloads,
//! the drain) on the control runtime, the one [`Control::bind`] is called on.

mod drain;
mod handover;
mod listeners;
mod ordered;
mod reload;
mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use drain::DrainProgress;
pub(crate) use handover::Totals;
pub use reload::{ReloadError, ReloadReport};
pub(crate) use view::{ControlView, METRICS};

use crate::admission::Gate;
use crate::config::{AdminSettings, Config, ResolverConfig, ServiceConfig, Transport};
use crate::discovery::docker::{self as labels, LabelWatcher};
use crate::discovery::{self, ResolverError, Watcher};
use crate::events::{Event, EventBus};
use crate::listener::{self, BindError};
use crate::pool::Backend;
use crate::replicas::ReplicaSet;
#[cfg(target_os = "linux")]
use crate::ring::RingWorkers;
use crate::route::Routes;
use crate::service::Service;
use crate::tls::{self, ServiceTls, TlsError};
use crate::workers::{self, Workers};
use listeners::{Acceptors, Bound};
use ordered::Ordered;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    /// The admin section cannot be used (its token is missing, unreadable or too short).
    #[error("invalid admin settings:\n{0}")]
    Admin(crate::config::ConfigError),
    /// The admin API's socket is bound to a non-loopback address and it has no token (a config
    /// check passed only for the address the config names).
    #[error("the admin API's socket is bound to {local}, not a loopback address, and admin has no token: set admin.token_file, admin.token or SLUICEGATE_ADMIN_TOKEN")]
    AdminWithoutToken { local: std::net::SocketAddr },
    /// A service's certificate, key or CA file cannot be used.
    #[error("{0}: {1}")]
    Tls(String, TlsError),
}

/// Start-up waits for the first DNS answers and probes at most their timeout plus this.
const STARTUP_GRACE: Duration = Duration::from_millis(500);

/// A watcher's first answer, and how long start-up waits for it.
type First = (oneshot::Receiver<()>, Duration);

/// What a service that uses Docker waits for before its addresses accept: its replica set's first
/// check, and its label watchers' first lists.
struct DockerWait {
    service: String,
    set: Option<Arc<ReplicaSet>>,
    lists: Vec<First>,
}

/// Whether the server serves: ready once every listener is bound and the first DNS answers and probes
/// are in (or their start-up wait ran out); not ready again once draining.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
    changed: Notify,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Completes once the server is ready (at once if it is).
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    fn set(&self, ready: bool, draining: bool) {
        self.ready.store(ready, Relaxed);
        self.draining.store(draining, Relaxed);
        self.changed.notify_waiters();
    }
}

/// A running service: its current version, where it listens and its DNS watchers (the admin API reads
/// its numbers through them).
#[derive(Clone)]
pub struct RunningService {
    pub service: Arc<Service>,
    /// The first address it listens on, as bound.
    pub listen: SocketAddr,
    /// Every address it listens on, as bound.
    pub listens: Vec<SocketAddr>,
    pub(crate) watchers: Vec<Watcher>,
    /// Its `docker:` backend sources' watchers.
    pub(crate) label_watchers: Vec<LabelWatcher>,
}

/// A service that runs: its current version and what keeps it running. Where it listens is the
/// listeners' business (`listeners.rs`): an address may be shared.
struct Running {
    config: ServiceConfig,
    current: Arc<ArcSwap<Service>>,
    /// The pool's background work (probes, timers).
    pool_bg: CancellationToken,
    watchers: Vec<(Watcher, CancellationToken)>,
    /// Its `docker:` backend sources' watchers (started and stopped with the DNS ones).
    label_watchers: Vec<(LabelWatcher, CancellationToken)>,
    /// The replicas sluicegate runs for this service, and what stops their checks.
    replicas: Option<(Arc<ReplicaSet>, CancellationToken)>,
}

/// The DNS resolver and the settings it was built with.
struct Resolving {
    settings: ResolverConfig,
    resolver: TokioResolver,
}

/// Whether the ring workers run: started with the first `relay: ring` service, tried once.
#[cfg(target_os = "linux")]
enum RingState {
    NotStarted,
    Running(Arc<RingWorkers>),
    Failed,
}

/// The running server's state, shared with the admin API and the signal handler.
///
/// **Lock order.** Its locks are taken in this order and never against it: `config_path`,
/// `running`, `listeners`, `config`, `resolving`, `ring`, `drain`. Each one's type carries its
/// place in this list (its rank, from 0), and debug builds assert the order at run time
/// (`ordered.rs`). Held together: a reload holds `running`, `listeners`, `config` and
/// `resolving`, and takes `ring` under them when a service moves to the ring workers; start-up
/// holds `running` with `resolving`, or `running` with `listeners` and then `ring`; accepting
/// again after a failed upgrade holds `listeners`, then `ring`. `config_path` and `drain` are only
/// ever held alone.
pub struct Control {
    /// The control runtime: listeners and tasks a reload creates belong here, whoever calls.
    rt: tokio::runtime::Handle,
    /// The data plane: accept loops and sessions run there.
    workers: Workers,
    /// The ring workers of the services that run on the ring (`relay: ring`, or `auto` where it
    /// fits), started with the first one bound (Linux only: elsewhere both run `epoll`,
    /// `relay::engine_for`).
    #[cfg(target_os = "linux")]
    ring: Ordered<RingState, 5>,
    running: Ordered<Vec<Running>, 1>,
    /// Every bound address.
    listeners: Ordered<Vec<Bound>, 2>,
    /// The UDP services' addresses, loops and counters. Its lock is a leaf, outside the order
    /// below: taken under any of them, and nothing is locked while it is held.
    pub(crate) udp: crate::udp::Udp,
    config: Ordered<Config, 3>,
    config_path: Ordered<Option<PathBuf>, 0>,
    readiness: Arc<Readiness>,
    events: EventBus,
    resolving: Ordered<Option<Resolving>, 4>,
    /// Every client connection, for the drain.
    tracker: TaskTracker,
    /// Every accept loop, for closing the listeners.
    accepting: TaskTracker,
    /// How sessions leave early: the drain deadline cuts them, an upgrade carries them.
    pub(crate) leaving: Arc<crate::session::Leaving>,
    /// Probes, DNS watchers, pool timers.
    background: CancellationToken,
    /// Set when the stop signal arrives: (signal time, deadline).
    drain: Ordered<Option<(Instant, Instant)>, 6>,
    reloads_applied: AtomicU64,
    /// The top-level `max_connections` over every service.
    pub(crate) gate: Arc<Gate>,
    reloads_rejected: AtomicU64,
    /// Accept loops run (set by `serve`); before that, a reload leaves new listeners pending.
    serving: AtomicBool,
    /// This host's name: which balancer replica this is, in `/backends`, `/stats` and `/metrics`.
    instance: String,
    /// The admin API as bound at start (its address, token and names): in force until restart,
    /// whatever a reload says.
    admin: Option<Arc<AdminSettings>>,
}

/// Loads every service's TLS files, in config order; the error names the service's key and file.
fn load_tls(config: &Config) -> Result<Vec<ServiceTls>, (String, TlsError)> {
    config
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| tls::load(i, s, config.allow_readable_keys))
        .collect()
}

fn needs_dns(config: &Config) -> bool {
    config
        .services
        .iter()
        .any(|s| !discovery::names(s).is_empty())
}

fn resolving_for(config: &Config) -> Result<Option<Resolving>, ResolverError> {
    if !needs_dns(config) {
        return Ok(None);
    }
    Ok(Some(Resolving {
        settings: config.resolver.clone(),
        resolver: discovery::resolver(&config.resolver)?,
    }))
}

/// Every UDP service's listen addresses, as configured.
fn udp_addresses(config: &Config) -> Vec<(Arc<str>, Vec<SocketAddr>)> {
    config
        .services
        .iter()
        .filter(|s| s.protocol == Transport::Udp)
        .map(|s| (Arc::from(s.name.as_str()), s.listen.addrs().to_vec()))
        .collect()
}

/// The UDP services running, each with its version holder and its addresses.
fn udp_wanted(running: &[Running]) -> Vec<crate::udp::Wanted> {
    running
        .iter()
        .filter(|r| r.config.protocol == Transport::Udp)
        .map(|r| crate::udp::Wanted {
            name: Arc::from(r.config.name.as_str()),
            current: r.current.clone(),
            addrs: r.config.listen.addrs().to_vec(),
            keys: r.config.route_keys(),
            quic: r.config.udp_settings().quic,
        })
        .collect()
}

fn bind_error(e: crate::udp::BindFailed) -> BindError {
    BindError {
        service: e.service,
        addr: e.addr,
        error: e.error,
    }
}

impl Running {
    fn new(config: &ServiceConfig, service: Service, events: &EventBus) -> Running {
        let replicas = ReplicaSet::new(config, service.pool.clone(), events.clone())
            .map(|set| (set, CancellationToken::new()));
        Running {
            config: config.clone(),
            current: Arc::new(ArcSwap::from_pointee(service)),
            pool_bg: CancellationToken::new(),
            watchers: Vec::new(),
            label_watchers: Vec::new(),
            replicas,
        }
    }
}

impl Control {
    /// Binds every service's listener and starts the worker threads; nothing is served until
    /// [`Control::serve`]. Must be called on the control runtime. On error nothing stays bound.
    pub(crate) fn bind(
        config: &Config,
        admin: Option<AdminSettings>,
        events: EventBus,
    ) -> Result<Control, StartError> {
        let resolving = resolving_for(config)?;
        let tls = load_tls(config).map_err(|(key, e)| StartError::Tls(key, e))?;
        let bound = listeners::bind_missing(&listeners::keys(config), &[], config)?;
        let running: Vec<Running> = config
            .services
            .iter()
            .zip(config.alone())
            .zip(tls)
            .map(|((s, alone), tls)| Running::new(s, Service::new(s, alone, tls, &events), &events))
            .collect();
        for b in &bound {
            b.set_routes(&running);
        }
        let udp = crate::udp::Udp::default();
        let fresh = udp
            .bind_missing(&udp_addresses(config))
            .map_err(bind_error)?;
        udp.commit(fresh, &udp_wanted(&running));
        let workers = Workers::start(workers::default_count()).map_err(StartError::Workers)?;
        Ok(Control {
            rt: tokio::runtime::Handle::current(),
            workers,
            #[cfg(target_os = "linux")]
            ring: Ordered::new(RingState::NotStarted),
            running: Ordered::new(running),
            listeners: Ordered::new(bound),
            udp,
            config: Ordered::new(config.clone()),
            config_path: Ordered::new(None),
            readiness: Arc::new(Readiness::default()),
            events,
            resolving: Ordered::new(resolving),
            tracker: TaskTracker::new(),
            accepting: TaskTracker::new(),
            leaving: Arc::default(),
            background: CancellationToken::new(),
            drain: Ordered::new(None),
            reloads_applied: AtomicU64::new(0),
            gate: {
                let gate = Gate::new(config.max_connections);
                gate.deny
                    .configure(config.max_denied(), &config.limits.deny);
                Arc::new(gate)
            },
            reloads_rejected: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            instance: crate::util::hostname(),
            admin: admin.map(Arc::new),
        })
    }

    /// Which balancer replica this is (its host's name).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Starts probes, DNS watchers, Docker label watchers and the replicas' checks, waits (bounded)
    /// for the first DNS answers and probes, then starts every accept loop and reports ready. Nothing
    /// here waits for Docker: a service with replicas or Docker-label backends starts accepting on its
    /// own once its first check or list is done (bounded), its first clients held in the listen
    /// backlog meanwhile ([`Control::wait_for_docker`]).
    pub(crate) async fn serve(self: &Arc<Self>) {
        let mut docker_firsts = self.start_background().await;
        let mut held = Vec::new();
        {
            let running = self.running.lock();
            let mut listeners = self.listeners.lock();
            for b in listeners.iter_mut() {
                let names = b.service_names();
                let mut waits: Vec<DockerWait> = Vec::new();
                for r in running
                    .iter()
                    .filter(|r| names.iter().any(|n| **n == *r.config.name))
                {
                    let lists = docker_firsts.remove(&r.config.name).unwrap_or_default();
                    let set = r.replicas.as_ref().map(|(set, _)| set.clone());
                    if set.is_some() || !lists.is_empty() {
                        waits.push(DockerWait {
                            service: r.config.name.clone(),
                            set,
                            lists,
                        });
                    }
                }
                if waits.is_empty() {
                    self.spawn_accept(b);
                } else {
                    held.push((b.key.clone(), waits));
                }
            }
            self.serving.store(true, Relaxed);
        }
        self.start_udp();
        self.readiness.set(true, false);
        self.events.publish(Event::Ready);
        for (key, waits) in held {
            let me = self.clone();
            tokio::spawn(async move {
                for wait in waits {
                    me.wait_for_docker(wait).await;
                }
                me.start_listener(&key);
            });
        }
    }

    /// Waits until a service's replica set has done its first check (or `replicas.timeout` has
    /// passed) and its Docker label watchers have listed once (each bounded by one call's limit), and
    /// the backends found have been probed once; the addresses it listens on accept only then.
    ///
    /// Why wait at all: after a restart the replicas and labelled containers still run, and
    /// accepting before they are known would refuse the first clients although healthy backends
    /// exist; held in the listen backlog, those clients are served a few milliseconds later instead.
    /// Why only this service's addresses, and not the readiness: an Engine that hangs must not hold
    /// services that do not use it, nor the signal that the balancer serves them.
    async fn wait_for_docker(&self, wait: DockerWait) {
        let name = wait.service.as_str();
        if let Some(set) = &wait.set {
            let limit = set.first_check_limit();
            if tokio::time::timeout(limit, set.first_check())
                .await
                .is_err()
            {
                tracing::warn!(service = %name, timeout_ms = limit.as_millis() as u64, "Docker did not finish the first check of the replicas in time: accepting with the replicas known so far");
            }
        }
        let started = Instant::now();
        for (rx, limit) in wait.lists {
            if tokio::time::timeout_at(started + limit, rx).await.is_err() {
                tracing::warn!(service = %name, timeout_ms = limit.as_millis() as u64, "Docker did not list the labelled containers in time: accepting with the backends known so far");
            }
        }
        let pool = match self.service(name) {
            Some(s) => s.pool.clone(),
            None => return,
        };
        if let Some(spec) = &pool.settings().probes {
            pool.wait_probed(spec.timeout + STARTUP_GRACE).await;
        }
        pool.warmed_up();
    }

    /// Starts the accept loops of the address `key`, unless a reload closed it meanwhile or the drain
    /// has begun.
    fn start_listener(&self, key: &listeners::ListenKey) {
        let mut listeners = self.listeners.lock();
        if let Some(b) = listeners
            .iter_mut()
            .find(|b| &b.key == key && !b.stop.is_cancelled())
        {
            self.spawn_accept(b);
        }
    }

    /// Starts the loops of the UDP addresses bound and not started yet.
    pub(super) fn start_udp(&self) {
        let handles = self.workers.handles();
        self.udp.start(&crate::udp::Plane {
            workers: handles,
            gate: &self.gate,
            tracker: &self.tracker,
            deadline: &self.leaving.deadline,
        });
    }

    /// The file a reload (SIGHUP, `POST /reload`) reads.
    pub fn set_config_path(&self, path: PathBuf) {
        *self.config_path.lock() = Some(path);
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    pub(crate) fn readiness_handle(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    pub(crate) fn events(&self) -> &EventBus {
        &self.events
    }

    /// The running services, in config order.
    pub fn services(&self) -> Vec<RunningService> {
        let running = self.running.lock();
        let locals = listeners::locals(&self.listeners.lock());
        running
            .iter()
            .map(|r| {
                let listens: Vec<SocketAddr> = match r.config.protocol {
                    Transport::Tcp => listeners::keys_of(&r.config)
                        .iter()
                        .filter_map(|k| locals.get(k).copied())
                        .collect(),
                    Transport::Udp => self.udp.locals(&r.config.name),
                };
                RunningService {
                    service: r.current.load_full(),
                    listen: listens.first().copied().unwrap_or(r.config.listen.first()),
                    listens,
                    watchers: r.watchers.iter().map(|(w, _)| w.clone()).collect(),
                    label_watchers: r.label_watchers.iter().map(|(w, _)| w.clone()).collect(),
                }
            })
            .collect()
    }

    /// Every backend of every service (members and removed ones still holding sessions), with its
    /// service's name.
    pub fn backends(&self) -> Vec<(Arc<str>, Arc<Backend>)> {
        self.services()
            .iter()
            .flat_map(|s| {
                let name = s.service.name.clone();
                s.service
                    .pool
                    .all_backends()
                    .into_iter()
                    .map(move |b| (name.clone(), b))
            })
            .collect()
    }

    /// The replicas sluicegate runs for service `name`, if it has a `replicas:` section.
    pub(crate) fn replicas(&self, name: &str) -> Option<Arc<ReplicaSet>> {
        self.running
            .lock()
            .iter()
            .find(|r| r.config.name == name)
            .and_then(|r| r.replicas.as_ref().map(|(set, _)| set.clone()))
    }

    /// Runs `fut` on the control runtime and waits for it: Docker calls and pool changes stay on the
    /// runtime that owns their connections and timers, whoever asks (the admin API's thread).
    pub(crate) async fn on_control<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        self.rt.spawn(fut).await.ok()
    }

    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.running
            .lock()
            .iter()
            .map(|r| r.current.load_full())
            .find(|s| &*s.name == name)
    }

    /// Where a client reaching `listen` (an address as bound, or as configured) with server name `sni`
    /// and protocols `alpn` would go now, and why, changing nothing: `None` when nothing listens there;
    /// `Some(None)` when no route takes it.
    pub(crate) fn explain_route(
        &self,
        listen: SocketAddr,
        sni: Option<&str>,
        alpn: &[Vec<u8>],
    ) -> Option<Option<(Arc<Service>, &'static str)>> {
        let listeners = self.listeners.lock();
        let b = listeners
            .iter()
            .find(|b| b.local == listen)
            .or_else(|| listeners.iter().find(|b| b.key.addr() == listen))?;
        let routes = b.routes.load();
        let chosen = routes.table.explain(sni, alpn);
        Some(chosen.map(|(t, why)| (t.load_full(), why)))
    }

    /// The connections of each shared address that no service took.
    pub(crate) fn unrouted(&self) -> Vec<crate::route::UnroutedView> {
        self.listeners
            .lock()
            .iter()
            .filter_map(|b| {
                let routes = b.routes.load();
                routes
                    .table
                    .only()
                    .is_none()
                    .then(|| crate::route::UnroutedView::of(b.local, &routes.unrouted))
            })
            .collect()
    }

    /// The admin API's settings as bound at start.
    /// The `upgrade` settings now.
    pub(crate) fn upgrade_settings(&self) -> crate::config::UpgradeConfig {
        self.config.lock().upgrade.clone()
    }

    pub(crate) fn admin_settings(&self) -> Option<Arc<AdminSettings>> {
        self.admin.clone()
    }

    /// (applied, rejected) reloads so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_applied.load(Relaxed),
            self.reloads_rejected.load(Relaxed),
        )
    }

    /// The ring workers, started on first use; `None` (said once in the log) when they cannot
    /// start, and ring services are then served by the tokio workers on the epoll engine.
    #[cfg(target_os = "linux")]
    fn ring_workers(&self) -> Option<Arc<RingWorkers>> {
        let mut ring = self.ring.lock();
        if let RingState::NotStarted = *ring {
            let started = RingWorkers::start(
                workers::default_count(),
                self.gate.clone(),
                self.tracker.clone(),
                self.leaving.clone(),
                self.workers.handles().to_vec(),
            );
            *ring = match started {
                Ok(r) => RingState::Running(Arc::new(r)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the ring workers; their services run on the epoll engine");
                    crate::relay::uring::workers_failed(e.to_string());
                    RingState::Failed
                }
            };
        }
        match &*ring {
            RingState::Running(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Each ring worker's counters, if they have started (reading them does not start them).
    #[cfg(target_os = "linux")]
    pub(crate) fn ring_views(&self) -> Vec<crate::ring::WorkerView> {
        match &*self.ring.lock() {
            RingState::Running(r) => r.views(),
            _ => Vec::new(),
        }
    }

    /// From now on every relayed connection, the tokio sessions' and the ring workers', stops at a
    /// quiet point and goes to `to` (an upgrade carries it into the new process).
    pub(crate) fn carry_to(&self, to: tokio::sync::mpsc::UnboundedSender<crate::session::Carried>) {
        self.leaving.carry_to(to);
        #[cfg(target_os = "linux")]
        if let RingState::Running(r) = &*self.ring.lock() {
            r.carry();
        }
    }

    /// Cuts every ring worker's connections (the drain's deadline), if they have started.
    pub(crate) fn cut_ring(&self, end: crate::outcome::Outcome) {
        #[cfg(target_os = "linux")]
        if let RingState::Running(r) = &*self.ring.lock() {
            r.cut(end);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = end;
    }

    /// Ends the ring workers, if they have started, and waits for their threads: blocks.
    pub(crate) fn stop_ring(&self) {
        #[cfg(target_os = "linux")]
        {
            let running = match &*self.ring.lock() {
                RingState::Running(r) => Some(r.clone()),
                _ => None,
            };
            if let Some(r) = running {
                r.stop();
            }
        }
    }

    /// The ring workers, if they are to accept on an address with `routes` (and can).
    #[cfg(target_os = "linux")]
    fn ring_for(&self, routes: &Routes) -> Option<Arc<RingWorkers>> {
        routes.on_ring().then(|| self.ring_workers()).flatten()
    }

    /// Which workers are to accept on an address with `routes`.
    fn acceptors_for(&self, routes: &Routes) -> Acceptors {
        #[cfg(target_os = "linux")]
        if self.ring_for(routes).is_some() {
            return Acceptors::Ring;
        }
        let _ = routes;
        Acceptors::Tokio
    }

    /// Moves the accepts of an address whose accept loops run to the workers its routes now ask
    /// for (a reload switched its service to or from `relay: ring`). The new workers are given a
    /// descriptor of the socket kept for upgrades, and the old ones are told to stop: the socket
    /// never closes, so what waits in its queue is accepted by one or the other. What the old ones accept
    /// until they have stopped is served all the same (a ring worker hands it to the tokio
    /// workers, `Host::hand_off`; a tokio worker serves a `ring` service on the epoll engine).
    fn move_acceptors(&self, b: &mut Bound) {
        // Stopped for good (an upgrade's `pause_accepting` took the address meanwhile): a fresh
        // token would start accept loops that nothing stops.
        if b.stop.is_cancelled() {
            return;
        }
        let Some(before) = b.acceptors else { return };
        let after = self.acceptors_for(&b.routes.load());
        if after == before {
            return;
        }
        let dup = match b.kept.as_ref().map(std::net::TcpListener::try_clone) {
            Some(Ok(dup)) => dup,
            Some(Err(e)) => {
                tracing::warn!(listen = %b.local, error = %e, from = before.as_str(), to = after.as_str(),
                    "cannot move the accepts to other workers; they stay, and serve its clients as those would");
                return;
            }
            // Only after a drain began, when no reload applies.
            None => return,
        };
        let old = std::mem::replace(&mut b.stop, CancellationToken::new());
        b.pending = Some(dup);
        self.spawn_accept(b);
        old.cancel();
        tracing::info!(listen = %b.local, from = before.as_str(), to = after.as_str(), "accepts moved to other workers");
    }

    /// Starts an accept loop per worker on `b`'s socket, if it has not started yet.
    fn spawn_accept(&self, b: &mut Bound) {
        if b.stop.is_cancelled() {
            return;
        }
        let Some(l) = b.pending.take() else { return };
        let routes = b.routes.load();
        #[cfg(target_os = "linux")]
        let ring = self.ring_for(&routes);
        #[cfg(target_os = "linux")]
        if ring.is_none() && routes.on_ring() {
            // The ring workers could not start (said once): the service runs, and says, epoll.
            for s in routes.table.targets() {
                s.store(Arc::new(s.load().on_epoll()));
            }
        }
        #[cfg(target_os = "linux")]
        if let Some(r) = ring {
            r.listen(
                &self.rt,
                l,
                b.routes.clone(),
                b.stop.clone(),
                &self.accepting,
            );
            b.acceptors = Some(Acceptors::Ring);
            return log_listening(b, &routes);
        }
        b.acceptors = Some(Acceptors::Tokio);
        // One accept loop per worker, each on its own descriptor of the one listening socket.
        let handles = self.workers.handles();
        let mut socket = Some(l);
        for (i, handle) in handles.iter().enumerate() {
            let mine = if i + 1 == handles.len() {
                socket.take()
            } else {
                match socket.as_ref().map(std::net::TcpListener::try_clone) {
                    Some(Ok(dup)) => Some(dup),
                    Some(Err(e)) => {
                        // Out of descriptors: the workers that have one accept for all.
                        tracing::warn!(listen = %b.local, error = %e, "cannot share the listener with every worker");
                        continue;
                    }
                    None => None,
                }
            };
            let Some(mine) = mine else { break };
            let (routes, gate, tracker, stop, leaving) = (
                b.routes.clone(),
                self.gate.clone(),
                self.tracker.clone(),
                b.stop.clone(),
                self.leaving.clone(),
            );
            let local = b.local;
            let accept = async move {
                // Registered with this worker's runtime, which is why it is converted here.
                match tokio::net::TcpListener::from_std(mine) {
                    Ok(l) => listener::accept_loop(l, routes, gate, tracker, stop, leaving).await,
                    Err(e) => {
                        tracing::error!(listen = %local, error = %e, "cannot register the listener")
                    }
                }
            };
            handle.spawn(self.accepting.track_future(accept));
        }
        log_listening(b, &routes);
    }

    /// Starts the DNS and Docker label watchers of `r`'s service; returns receivers that fire on
    /// each first answer, each with how long start-up waits for it.
    /// Starts a watcher per DNS name and per `docker:` source of `r`'s service; returns the first
    /// answers to wait for, DNS and Docker apart (only the service itself waits for Docker).
    fn start_watchers(
        &self,
        r: &mut Running,
        resolving: Option<&Resolving>,
    ) -> (Vec<First>, Vec<First>) {
        let lists = self.start_label_watchers(r);
        let mut firsts = Vec::new();
        let Some(res) = resolving else {
            return (firsts, lists);
        };
        let dns_wait = res.settings.timeout.0 + STARTUP_GRACE;
        let service = r.current.load_full();
        for name in &service.names {
            let (tx, rx) = oneshot::channel();
            let nudge = Arc::new(Notify::new());
            service
                .pool
                .register_dns_nudge(name.label.clone(), nudge.clone());
            let spec = discovery::WatchSpec {
                service: service.name.clone(),
                claims: service.pool.clone(),
                resolver: res.resolver.clone(),
                name: name.clone(),
                settings: service.discovery.clone(),
                query_limit: res.settings.timeout.0 + Duration::from_secs(1),
                nudge,
            };
            let stop = self.background.child_token();
            let watcher = discovery::watch(spec, stop.clone(), tx);
            r.watchers.push((watcher, stop));
            firsts.push((rx, dns_wait));
        }
        (firsts, lists)
    }

    /// Starts a watcher per `docker:` backend source of `r`'s service.
    fn start_label_watchers(&self, r: &mut Running) -> Vec<First> {
        let service = r.current.load_full();
        let mut firsts = Vec::new();
        for spec in labels::selectors(&r.config) {
            let (tx, rx) = oneshot::channel();
            let spec = labels::LabelWatchSpec {
                service: service.name.clone(),
                claims: service.pool.clone(),
                spec,
                settings: service.discovery.clone(),
            };
            let stop = self.background.child_token();
            r.label_watchers
                .push((labels::watch(spec, stop.clone(), tx), stop));
            // A healthy Engine connects and lists in milliseconds; one that hangs holds start-up
            // no longer than one call's bound.
            firsts.push((rx, labels::CALL_LIMIT + STARTUP_GRACE));
        }
        firsts
    }

    fn stop_watchers(r: &mut Running) {
        for (_, stop) in r.watchers.drain(..) {
            stop.cancel();
        }
        for (_, stop) in r.label_watchers.drain(..) {
            stop.cancel();
        }
    }

    /// Starts the pool's background work of a service, and its replicas' checks.
    fn start_pool(&self, r: &mut Running) {
        r.pool_bg = self.background.child_token();
        let service = r.current.load();
        service.pool.start(r.pool_bg.clone());
        if let Some((set, stop)) = &mut r.replicas {
            *stop = self.background.child_token();
            set.start(stop.clone());
        }
    }

    /// Starts every pool's probes, every DNS and Docker label watcher and every replica set's checks,
    /// then waits (bounded) for the first DNS answers and the first probe of every backend, so the
    /// first clients find the backends that are up. Returns, by service, the first Docker lists it
    /// did not wait for: a service with replicas or Docker-label backends is warmed up once those
    /// are in ([`Control::wait_for_docker`]), so the backends it finds are not slow-started.
    async fn start_background(&self) -> HashMap<String, Vec<First>> {
        let mut firsts = Vec::new();
        let mut docker = HashMap::new();
        let pools: Vec<_> = {
            let mut running = self.running.lock();
            let resolving = self.resolving.lock();
            for r in running.iter_mut() {
                self.start_pool(r);
                let (dns, lists) = self.start_watchers(r, resolving.as_ref());
                firsts.extend(dns);
                if !lists.is_empty() {
                    docker.insert(r.config.name.clone(), lists);
                }
            }
            running
                .iter()
                .filter(|r| r.replicas.is_none() && !docker.contains_key(&r.config.name))
                .map(|r| r.current.load().pool.clone())
                .collect()
        };
        let started = Instant::now();
        for (rx, wait) in firsts {
            let _ = tokio::time::timeout_at(started + wait, rx).await;
        }
        for pool in pools {
            if let Some(spec) = &pool.settings().probes {
                pool.wait_probed(spec.timeout + STARTUP_GRACE).await;
            }
            pool.warmed_up();
        }
        docker
    }
}

/// Says that `b` listens, once every worker that accepts on it has its descriptor of the socket:
/// whoever reads the line (a test counting the process's descriptors, an operator) finds it
/// complete.
fn log_listening(b: &Bound, routes: &Routes) {
    match routes.table.only().map(|s| s.load_full()) {
        Some(s) => tracing::info!(
            service = %s.name,
            listen = %b.local,
            policy = s.policy.as_str(),
            relay = s.relay.mode.as_str(),
            tls = s.tls.terminate.is_some(),
            backends = s.pool.members().len(),
            dns_names = s.names.len(),
            "listening"
        ),
        None => {
            let names: Vec<String> = b.service_names().iter().map(|n| n.to_string()).collect();
            tracing::info!(
                service = %names.join(","),
                listen = %b.local,
                routes = names.len(),
                "listening"
            )
        }
    }
}
