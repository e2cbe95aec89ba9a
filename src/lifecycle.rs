//! Start, run, reload and stop.
//!
//! [`Server::bind`] binds every listener (and the admin API's); [`Server::run`] starts probes and DNS
//! watchers, waits (bounded) for their first results, serves, and on the stop signal drains. The
//! [`Control`] it shares with the admin API and the signal handler reloads the config and reports
//! readiness and drain progress.
//!
//! Stop sequence: keep accepting for `shutdown.delay` (so a balancer in front can take us out first),
//! close every listener, let in-flight connections finish, and when `shutdown.drain_timeout` (counted
//! from the signal) runs out, cut what remains with a reset and return. Connections are tracked with a
//! `TaskTracker`, so the return comes right after the last one ends, never after a fixed sleep.
//!
//! Reload applies a validated config as a difference: new services bind, removed ones stop accepting
//! and let their connections finish, changed ones swap settings under their running accept loop (their
//! pool and counters carry over, connections already open keep the settings they started with), and
//! DNS watchers restart only where names, discovery or resolver settings changed. A reload that cannot
//! bind a new listener changes nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use serde::Serialize;
use serde_json::json;
use std::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, ServiceConfig};
use crate::discovery::{self, ResolverError, Watcher};
use crate::events::EventBus;
use crate::listener::{self, BindError};
use crate::pool::Source;
use crate::service::Service;
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

/// Why a reload was rejected; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error("no config file to reload from")]
    NoFile,
    #[error("draining: no reload during shutdown")]
    Draining,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// Start-up waits for the first DNS answers and probes at most their timeout plus this.
const STARTUP_GRACE: Duration = Duration::from_millis(500);

/// How often drain progress is logged while connections remain.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

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

/// Where a drain stands.
#[derive(Debug, Clone, Serialize)]
pub struct DrainProgress {
    pub draining: bool,
    /// Client connections still open.
    pub remaining: u64,
    /// Until the deadline cuts what remains.
    #[serde(serialize_with = "ser_secs")]
    pub deadline_in: Option<Duration>,
    /// Since the stop signal.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Option<Duration>,
}

fn ser_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// A running service, as the admin API and metrics see it.
#[derive(Clone)]
pub struct ServiceView {
    pub service: Arc<Service>,
    pub listen: SocketAddr,
    pub watchers: Vec<Watcher>,
}

/// A service that runs: its current version and what keeps it running.
struct Running {
    config: ServiceConfig,
    current: Arc<ArcSwap<Service>>,
    local: SocketAddr,
    /// Bound, its accept loop not started yet (between `bind` and `run`).
    pending: Option<TcpListener>,
    /// Stops this service's accept loop, which closes its listener.
    stop: CancellationToken,
    /// The pool's background work (probes, timers).
    pool_bg: CancellationToken,
    watchers: Vec<(Watcher, CancellationToken)>,
}

struct Resolving {
    settings: crate::config::ResolverConfig,
    resolver: TokioResolver,
}

/// The running server's state, shared with the admin API and the signal handler.
pub struct Control {
    rt: tokio::runtime::Handle,
    /// The data plane: accept loops and sessions run there.
    workers: Workers,
    running: Mutex<Vec<Running>>,
    config: Mutex<Config>,
    config_path: Mutex<Option<PathBuf>>,
    readiness: Arc<Readiness>,
    events: EventBus,
    resolving: Mutex<Option<Resolving>>,
    tracker: TaskTracker,
    accepting: TaskTracker,
    /// Cut every remaining connection (drain deadline).
    deadline: CancellationToken,
    /// Probes, DNS watchers, pool timers.
    background: CancellationToken,
    /// Set when the stop signal arrives: (signal time, deadline).
    drain: Mutex<Option<(Instant, Instant)>>,
    reloads_applied: AtomicU64,
    reloads_rejected: AtomicU64,
    /// Accept loops run (set by `run`); before that, a reload leaves new listeners pending.
    serving: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every service bound and ready to serve.
pub struct Server {
    control: Arc<Control>,
    admin: Option<std::net::TcpListener>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the drain deadline, which were cut.
    pub cut: usize,
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

impl Server {
    /// Binds every service's listener and the admin API's; nothing is served until [`Server::run`].
    /// Must be called inside a tokio runtime. On error nothing stays bound.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let resolving = if needs_dns(config) {
            Some(Resolving {
                settings: config.resolver.clone(),
                resolver: discovery::resolver(&config.resolver)?,
            })
        } else {
            None
        };
        let events = EventBus::default();
        let mut running = Vec::with_capacity(config.services.len());
        for s in &config.services {
            let (l, local) = bind_service(s)?;
            running.push(Running {
                config: s.clone(),
                current: Arc::new(ArcSwap::from_pointee(Service::from_config(
                    s, &events, None,
                ))),
                local,
                pending: Some(l),
                stop: CancellationToken::new(),
                pool_bg: CancellationToken::new(),
                watchers: Vec::new(),
            });
        }
        let admin = match &config.admin {
            Some(a) => Some(crate::admin::bind(a.listen).map_err(|source| BindError {
                service: "admin".into(),
                addr: a.listen,
                source,
            })?),
            None => None,
        };
        let workers = Workers::start(workers::default_count()).map_err(StartError::Workers)?;
        let control = Arc::new(Control {
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
            reloads_rejected: AtomicU64::new(0),
            serving: AtomicBool::new(false),
        });
        Ok(Server { control, admin })
    }

    /// The file a reload (SIGHUP, `POST /reload`) reads.
    pub fn set_config_path(&self, path: PathBuf) {
        *lock(&self.control.config_path) = Some(path);
    }

    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The address each service actually listens on (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        lock(&self.control.running)
            .iter()
            .map(|r| (r.current.load().name.clone(), r.local))
            .collect()
    }

    /// Where the admin API listens, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.control.readiness.clone()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.control
            .services()
            .into_iter()
            .map(|v| v.service)
            .collect()
    }

    /// Serves until `shutdown` completes, then drains as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let c = self.control;
        let admin_stop = CancellationToken::new();
        if let Some(l) = self.admin {
            crate::admin::start(l, c.clone(), admin_stop.clone());
        }
        c.start_background().await;
        {
            let mut running = lock(&c.running);
            for r in running.iter_mut() {
                if let Some(l) = r.pending.take() {
                    c.spawn_accept(r, l);
                }
            }
            c.serving.store(true, Relaxed);
        }
        c.readiness.set(true, false);
        c.events.publish("ready", json!({}));

        shutdown.await;
        c.readiness.set(false, true);
        let shutdown = lock(&c.config).shutdown.clone();
        let signalled = Instant::now();
        let cut_at = signalled + shutdown.drain_timeout.0;
        *lock(&c.drain) = Some((signalled, cut_at));
        tracing::info!(
            delay_ms = shutdown.delay.0.as_millis() as u64,
            drain_timeout_ms = shutdown.drain_timeout.0.as_millis() as u64,
            in_flight = c.tracker.len(),
            "stop signal: draining"
        );
        c.events.publish(
            "draining",
            json!({"in_flight": c.tracker.len(), "deadline_s": shutdown.drain_timeout.0.as_secs_f64()}),
        );
        tokio::time::sleep(shutdown.delay.0).await;
        for r in lock(&c.running).iter() {
            r.stop.cancel();
        }
        c.accepting.close();
        c.accepting.wait().await;
        c.tracker.close();
        tracing::info!(in_flight = c.tracker.len(), "listeners closed");

        let mut cut = 0;
        let mut progress =
            tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                () = c.tracker.wait() => break,
                () = tokio::time::sleep_until(cut_at) => {
                    cut = c.tracker.len();
                    tracing::warn!(remaining = cut, "drain deadline reached: cutting remaining connections");
                    c.deadline.cancel();
                    c.tracker.wait().await;
                    break;
                }
                _ = progress.tick() => {
                    let left = cut_at.saturating_duration_since(Instant::now());
                    tracing::info!(remaining = c.tracker.len(), deadline_in_ms = left.as_millis() as u64, "draining");
                }
            }
        }
        c.background.cancel();
        admin_stop.cancel();
        // Every session has ended: the worker threads have nothing left to run.
        let c2 = c.clone();
        let _ = tokio::task::spawn_blocking(move || c2.workers.stop()).await;
        tracing::info!(cut, "drained: exiting");
        Stopped { cut }
    }
}

impl Control {
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    pub fn events(&self) -> &EventBus {
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
    pub fn backends(&self) -> Vec<(Arc<str>, Arc<crate::pool::Backend>)> {
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

    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        lock(&self.running)
            .iter()
            .map(|r| r.current.load_full())
            .find(|s| &*s.name == name)
    }

    /// The admin token in force (reloads may change it).
    pub fn admin_token(&self) -> Option<String> {
        lock(&self.config)
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
    }

    pub fn drain_progress(&self) -> DrainProgress {
        let drain = *lock(&self.drain);
        let now = Instant::now();
        DrainProgress {
            draining: drain.is_some(),
            remaining: self.tracker.len() as u64,
            deadline_in: drain.map(|(_, cut)| cut.saturating_duration_since(now)),
            elapsed: drain.map(|(t, _)| now.duration_since(t)),
        }
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
            let (current, tracker, stop, deadline) = (
                r.current.clone(),
                self.tracker.clone(),
                r.stop.clone(),
                self.deadline.clone(),
            );
            let name = s.name.clone();
            let accept = async move {
                // Registered with this worker's runtime, which is why it is converted here.
                match tokio::net::TcpListener::from_std(mine) {
                    Ok(l) => listener::accept_loop(l, current, tracker, stop, deadline).await,
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
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        let mut firsts = Vec::new();
        let Some(res) = resolving else {
            return firsts;
        };
        let service = r.current.load_full();
        for name in &service.names {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let spec = discovery::WatchSpec {
                service: service.name.clone(),
                pool: service.pool.clone(),
                resolver: res.resolver.clone(),
                name: name.clone(),
                settings: service.discovery.clone(),
                query_limit: res.settings.timeout.0 + Duration::from_secs(1),
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

    /// Starts every pool's probes and every DNS watcher, then waits (bounded) for the first DNS answers
    /// and the first probe of every backend, so the first clients find the backends that are up.
    async fn start_background(&self) {
        let mut firsts = Vec::new();
        let resolver_timeout = lock(&self.config).resolver.timeout.0;
        let pools: Vec<_> = {
            let mut running = lock(&self.running);
            let resolving = lock(&self.resolving);
            for r in running.iter_mut() {
                r.pool_bg = self.background.child_token();
                let service = r.current.load_full();
                service.pool.start(r.pool_bg.clone());
                firsts.extend(self.start_watchers(r, resolving.as_ref()));
            }
            running
                .iter()
                .map(|r| r.current.load().pool.clone())
                .collect()
        };
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

    /// Reads the config file again and applies it (SIGHUP, `POST /reload`).
    pub fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        let path = lock(&self.config_path).clone();
        let result = match path {
            None => Err(ReloadError::NoFile),
            Some(p) => Config::load(&p)
                .map_err(ReloadError::from)
                .and_then(|c| self.apply(c)),
        };
        self.account(&result);
        result
    }

    /// Applies `new` (already validated) as a difference to the running server.
    pub fn reload(&self, new: Config) -> Result<ReloadReport, ReloadError> {
        let result = self.apply(new);
        self.account(&result);
        result
    }

    fn account(&self, result: &Result<ReloadReport, ReloadError>) {
        match result {
            Ok(report) => {
                self.reloads_applied.fetch_add(1, Relaxed);
                tracing::info!(
                    added = ?report.added,
                    removed = ?report.removed,
                    changed = ?report.changed,
                    restart_needed = ?report.restart_needed,
                    "config reloaded"
                );
                self.events
                    .publish("reload", json!({"ok": true, "report": report}));
            }
            Err(e) => {
                self.reloads_rejected.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "config reload rejected: the running config is kept");
                self.events
                    .publish("reload", json!({"ok": false, "error": e.to_string()}));
            }
        }
    }

    fn apply(&self, new: Config) -> Result<ReloadReport, ReloadError> {
        if self.readiness.is_draining() {
            return Err(ReloadError::Draining);
        }
        // Listeners and tasks belong to the data plane's runtime, whoever calls.
        let _rt = self.rt.enter();
        let mut running = lock(&self.running);
        let mut config = lock(&self.config);
        let mut resolving = lock(&self.resolving);

        // Everything that can fail comes first, so a failure changes nothing.
        let resolver_changed = needs_dns(&new)
            && resolving
                .as_ref()
                .is_none_or(|r| r.settings != new.resolver);
        let new_resolving = if !needs_dns(&new) {
            None
        } else if resolver_changed {
            Some(Resolving {
                settings: new.resolver.clone(),
                resolver: discovery::resolver(&new.resolver)?,
            })
        } else {
            resolving.take()
        };
        let mut fresh: Vec<Option<(TcpListener, SocketAddr)>> = Vec::new();
        for s in &new.services {
            let same_listen = running
                .iter()
                .any(|r| r.config.name == s.name && r.config.listen == s.listen);
            fresh.push(if same_listen {
                None
            } else {
                match bind_service(s) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        // Put back what was taken.
                        if !resolver_changed {
                            *resolving = new_resolving;
                        }
                        return Err(e.into());
                    }
                }
            });
        }

        let mut report = ReloadReport::default();
        let started = self.serving.load(Relaxed);
        let mut old: Vec<Running> = std::mem::take(&mut *running);
        for r in old.iter_mut() {
            if !new.services.iter().any(|s| s.name == r.config.name) {
                r.stop.cancel();
                Self::stop_watchers(r);
                r.current.load().pool.stop();
                tracing::info!(service = %r.config.name, "service removed: its connections finish");
                report.removed.push(r.config.name.clone());
            }
        }
        for (s, bound) in new.services.iter().zip(fresh) {
            match old.iter().position(|r| r.config.name == s.name) {
                Some(i) => {
                    let mut r = old.swap_remove(i);
                    let unchanged = r.config == *s && !resolver_changed;
                    if unchanged {
                        report.unchanged.push(s.name.clone());
                        running.push(r);
                        continue;
                    }
                    let prev = r.current.load_full();
                    let next = Service::from_config(s, &self.events, Some(&prev));
                    // Names the service no longer has: their backends leave.
                    for name in &prev.names {
                        if !next.names.iter().any(|n| n.label == name.label) {
                            next.pool
                                .reconcile(Source::Dns(name.label.clone()), Vec::new());
                        }
                    }
                    let rewatch = resolver_changed
                        || prev
                            .names
                            .iter()
                            .map(|n| &n.label)
                            .ne(next.names.iter().map(|n| &n.label))
                        || r.config.discovery != s.discovery;
                    r.current.store(Arc::new(next));
                    if rewatch {
                        Self::stop_watchers(&mut r);
                        self.start_watchers(&mut r, new_resolving.as_ref());
                    }
                    if let Some((l, local)) = bound {
                        r.stop.cancel();
                        r.stop = CancellationToken::new();
                        r.local = local;
                        if started {
                            self.spawn_accept(&r, l);
                        } else {
                            r.pending = Some(l);
                        }
                    }
                    r.config = s.clone();
                    report.changed.push(s.name.clone());
                    running.push(r);
                }
                None => {
                    let Some((l, local)) = bound else { continue };
                    let service = Service::from_config(s, &self.events, None);
                    let mut r = Running {
                        config: s.clone(),
                        current: Arc::new(ArcSwap::from_pointee(service)),
                        local,
                        pending: None,
                        stop: CancellationToken::new(),
                        pool_bg: self.background.child_token(),
                        watchers: Vec::new(),
                    };
                    r.current.load().pool.start(r.pool_bg.clone());
                    r.current.load().pool.warmed_up();
                    self.start_watchers(&mut r, new_resolving.as_ref());
                    if started {
                        self.spawn_accept(&r, l);
                    } else {
                        r.pending = Some(l);
                    }
                    report.added.push(s.name.clone());
                    running.push(r);
                }
            }
        }
        if new.log != config.log {
            report
                .restart_needed
                .push("log (level, format, file)".into());
        }
        if new.admin.as_ref().map(|a| a.listen) != config.admin.as_ref().map(|a| a.listen) {
            report.restart_needed.push("admin.listen".into());
        }
        *resolving = new_resolving;
        *config = new;
        Ok(report)
    }
}

/// Binds and runs `config` until `shutdown` completes: what `main` does, minus signals.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, StartError> {
    Ok(Server::bind(config)?.run(shutdown).await)
}
