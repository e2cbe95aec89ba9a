//! The running server's registry and its control: which services run, with what config, and how to
//! reload (`reload.rs`) and drain (`drain.rs`) them. The admin API and the signal handlers steer the
//! server through [`Control`]; the application root (`app.rs`) creates it and runs it.
//!
//! What runs where: accept loops and sessions on the data-plane workers (`workers.rs`), one
//! single-threaded runtime per core; everything here (pool probes and timers, DNS watchers, reloads,
//! the drain) on the control runtime, the one [`Control::bind`] is called on.

mod drain;
mod reload;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use drain::DrainProgress;
pub use reload::{ReloadError, ReloadReport};

use crate::admission::Gate;
use crate::config::{Config, ResolverConfig, ServiceConfig};
use crate::discovery::{self, ResolverError, Watcher};
use crate::events::EventBus;
use crate::listener::{self, BindError};
use crate::pool::Backend;
use crate::replicas::ReplicaSet;
use crate::service::Service;
use crate::util::lock;
use crate::workers::{self, Workers};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// Start-up waits for the first DNS answers and probes at most their timeout plus this.
const STARTUP_GRACE: Duration = Duration::from_millis(500);

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

/// A running service, as the admin API and metrics see it.
#[derive(Clone)]
pub struct ServiceView {
    pub service: Arc<Service>,
    pub listen: SocketAddr,
    pub(crate) watchers: Vec<Watcher>,
}

/// A service that runs: its current version and what keeps it running.
struct Running {
    config: ServiceConfig,
    current: Arc<ArcSwap<Service>>,
    local: SocketAddr,
    /// Bound, its accept loop not started yet (between `bind` and `serve`).
    pending: Option<TcpListener>,
    /// Stops this service's accept loop, which closes its listener.
    stop: CancellationToken,
    /// The pool's background work (probes, timers).
    pool_bg: CancellationToken,
    watchers: Vec<(Watcher, CancellationToken)>,
    /// The replicas sluicegate runs for this service, and what stops their checks.
    replicas: Option<(Arc<ReplicaSet>, CancellationToken)>,
}

/// The DNS resolver and the settings it was built with.
struct Resolving {
    settings: ResolverConfig,
    resolver: TokioResolver,
}

/// The running server's state, shared with the admin API and the signal handler.
pub struct Control {
    /// The control runtime: listeners and tasks a reload creates belong here, whoever calls.
    rt: tokio::runtime::Handle,
    /// The data plane: accept loops and sessions run there.
    workers: Workers,
    running: Mutex<Vec<Running>>,
    config: Mutex<Config>,
    config_path: Mutex<Option<PathBuf>>,
    readiness: Arc<Readiness>,
    events: EventBus,
    resolving: Mutex<Option<Resolving>>,
    /// Every client connection, for the drain.
    tracker: TaskTracker,
    /// Every accept loop, for closing the listeners.
    accepting: TaskTracker,
    /// Cut every remaining connection (drain deadline).
    deadline: CancellationToken,
    /// Probes, DNS watchers, pool timers.
    background: CancellationToken,
    /// Set when the stop signal arrives: (signal time, deadline).
    drain: Mutex<Option<(Instant, Instant)>>,
    reloads_applied: AtomicU64,
    /// The top-level `max_connections` over every service.
    pub(crate) gate: Arc<Gate>,
    reloads_rejected: AtomicU64,
    /// Accept loops run (set by `serve`); before that, a reload leaves new listeners pending.
    serving: AtomicBool,
    /// This host's name: which balancer replica this is, in `/backends`, `/stats` and `/metrics`.
    instance: String,
}

fn bind_service(s: &ServiceConfig) -> Result<(TcpListener, SocketAddr), BindError> {
    let err = |source| BindError {
        service: s.name.clone(),
        addr: s.listen,
        source,
    };
    let l = listener::bind(s.listen).map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
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

impl Running {
    fn new(
        config: &ServiceConfig,
        service: Service,
        bound: (TcpListener, SocketAddr),
        events: &EventBus,
    ) -> Running {
        let replicas = ReplicaSet::new(config, service.pool.clone(), events.clone())
            .map(|set| (set, CancellationToken::new()));
        Running {
            config: config.clone(),
            current: Arc::new(ArcSwap::from_pointee(service)),
            local: bound.1,
            pending: Some(bound.0),
            stop: CancellationToken::new(),
            pool_bg: CancellationToken::new(),
            watchers: Vec::new(),
            replicas,
        }
    }
}

impl Control {
    /// Binds every service's listener and starts the worker threads; nothing is served until
    /// [`Control::serve`]. Must be called on the control runtime. On error nothing stays bound.
    pub(crate) fn bind(config: &Config, events: EventBus) -> Result<Control, StartError> {
        let resolving = resolving_for(config)?;
        let mut running = Vec::with_capacity(config.services.len());
        for s in &config.services {
            let bound = bind_service(s)?;
            running.push(Running::new(s, Service::new(s, &events), bound, &events));
        }
        let workers = Workers::start(workers::default_count()).map_err(StartError::Workers)?;
        Ok(Control {
            rt: tokio::runtime::Handle::current(),
            workers,
            running: Mutex::new(running),
            config: Mutex::new(config.clone()),
            config_path: Mutex::new(None),
            readiness: Arc::new(Readiness::default()),
            events,
            resolving: Mutex::new(resolving),
            tracker: TaskTracker::new(),
            accepting: TaskTracker::new(),
            deadline: CancellationToken::new(),
            background: CancellationToken::new(),
            drain: Mutex::new(None),
            reloads_applied: AtomicU64::new(0),
            gate: Arc::new(Gate::new(config.max_connections)),
            reloads_rejected: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            instance: crate::util::hostname(),
        })
    }

    /// Which balancer replica this is (its host's name).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Starts probes and DNS watchers, waits (bounded) for their first results, then starts every
    /// accept loop and reports ready.
    pub(crate) async fn serve(&self) {
        self.start_background().await;
        {
            let mut running = lock(&self.running);
            for r in running.iter_mut() {
                if let Some(l) = r.pending.take() {
                    self.spawn_accept(r, l);
                }
            }
            self.serving.store(true, Relaxed);
        }
        self.readiness.set(true, false);
        self.events.publish("ready", serde_json::json!({}));
    }

    /// The file a reload (SIGHUP, `POST /reload`) reads.
    pub fn set_config_path(&self, path: PathBuf) {
        *lock(&self.config_path) = Some(path);
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
    pub fn services(&self) -> Vec<ServiceView> {
        lock(&self.running)
            .iter()
            .map(|r| ServiceView {
                service: r.current.load_full(),
                listen: r.local,
                watchers: r.watchers.iter().map(|(w, _)| w.clone()).collect(),
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
        lock(&self.running)
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
        lock(&self.running)
            .iter()
            .map(|r| r.current.load_full())
            .find(|s| &*s.name == name)
    }

    /// The admin token in force (reloads may change it).
    pub(crate) fn admin_token(&self) -> Option<String> {
        lock(&self.config)
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
    }

    /// (applied, rejected) reloads so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_applied.load(Relaxed),
            self.reloads_rejected.load(Relaxed),
        )
    }

    fn spawn_accept(&self, r: &Running, l: TcpListener) {
        let s = r.current.load();
        tracing::info!(
            service = %s.name,
            listen = %r.local,
            policy = s.policy.as_str(),
            relay = s.relay.mode.as_str(),
            backends = s.pool.members().len(),
            dns_names = s.names.len(),
            "listening"
        );
        // One accept loop per worker, each on its own descriptor of the one listening socket.
        let handles = self.workers.handles();
        let mut socket = Some(l);
        for (i, handle) in handles.iter().enumerate() {
            let mine = if i + 1 == handles.len() {
                socket.take()
            } else {
                match socket.as_ref().map(TcpListener::try_clone) {
                    Some(Ok(dup)) => Some(dup),
                    Some(Err(e)) => {
                        // Out of descriptors: the workers that have one accept for all.
                        tracing::warn!(service = %s.name, error = %e, "cannot share the listener with every worker");
                        continue;
                    }
                    None => None,
                }
            };
            let Some(mine) = mine else { break };
            let (current, gate, tracker, stop, deadline) = (
                r.current.clone(),
                self.gate.clone(),
                self.tracker.clone(),
                r.stop.clone(),
                self.deadline.clone(),
            );
            let name = s.name.clone();
            let accept = async move {
                // Registered with this worker's runtime, which is why it is converted here.
                match tokio::net::TcpListener::from_std(mine) {
                    Ok(l) => listener::accept_loop(l, current, gate, tracker, stop, deadline).await,
                    Err(e) => {
                        tracing::error!(service = %name, error = %e, "cannot register the listener")
                    }
                }
            };
            handle.spawn(self.accepting.track_future(accept));
        }
    }

    /// Starts the DNS watchers of `r`'s service; returns receivers that fire on each first answer.
    fn start_watchers(
        &self,
        r: &mut Running,
        resolving: Option<&Resolving>,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut firsts = Vec::new();
        let Some(res) = resolving else {
            return firsts;
        };
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
            firsts.push(rx);
        }
        firsts
    }

    fn stop_watchers(r: &mut Running) {
        for (_, stop) in r.watchers.drain(..) {
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

    /// Starts every pool's probes and every DNS watcher, then waits (bounded) for the first DNS answers
    /// and the first probe of every backend, so the first clients find the backends that are up.
    async fn start_background(&self) {
        let mut firsts = Vec::new();
        let resolver_timeout = lock(&self.config).resolver.timeout.0;
        let pools: Vec<_> = {
            let mut running = lock(&self.running);
            let resolving = lock(&self.resolving);
            for r in running.iter_mut() {
                self.start_pool(r);
                firsts.extend(self.start_watchers(r, resolving.as_ref()));
            }
            running
                .iter()
                .map(|r| r.current.load().pool.clone())
                .collect()
        };
        // The replicas' first check (adopting what runs, starting what is missing) before the start-up
        // waits for probes, so the first clients find the replicas that are up. Bounded: a Docker that
        // does not answer must not hold the start.
        let sets: Vec<Arc<ReplicaSet>> = lock(&self.running)
            .iter()
            .filter_map(|r| r.replicas.as_ref().map(|(s, _)| s.clone()))
            .collect();
        for set in sets {
            let _ = tokio::time::timeout(set.first_check_limit(), set.check()).await;
        }
        let dns_by = Instant::now() + resolver_timeout + STARTUP_GRACE;
        for rx in firsts {
            let _ = tokio::time::timeout_at(dns_by, rx).await;
        }
        for pool in pools {
            if let Some(spec) = &pool.settings().probes {
                pool.wait_probed(spec.timeout + STARTUP_GRACE).await;
            }
            pool.warmed_up();
        }
    }
}
