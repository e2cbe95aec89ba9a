//! Start, run and stop: bind every listener, serve, and on the stop signal drain.
//!
//! Stop sequence: keep accepting for `shutdown.delay` (so a balancer in front can take us out first),
//! close every listener, let in-flight connections finish, and when `shutdown.drain_timeout` (counted
//! from the signal) runs out, cut what remains with a reset and return. Connections are tracked with a
//! `TaskTracker`, so the return comes right after the last one ends, never after a fixed sleep.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use hickory_resolver::TokioResolver;

use crate::config::{Config, ShutdownConfig};
use crate::discovery::{self, ResolverError};
use crate::listener::{self, BindError};
use crate::service::Service;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
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

/// Every service bound and ready to serve.
pub struct Server {
    bound: Vec<(Arc<Service>, TcpListener)>,
    shutdown: ShutdownConfig,
    /// Present when some service has DNS names.
    resolver: Option<TokioResolver>,
    resolver_timeout: Duration,
    readiness: Arc<Readiness>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the drain deadline, which were cut.
    pub cut: usize,
}

impl Server {
    /// Binds every service's listener; nothing is served until [`Server::run`]. Must be called inside a
    /// tokio runtime. On error nothing stays bound.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let needs_dns = config
            .services
            .iter()
            .any(|s| !discovery::names(s).is_empty());
        let resolver = if needs_dns {
            Some(discovery::resolver(&config.resolver)?)
        } else {
            None
        };
        let mut bound = Vec::with_capacity(config.services.len());
        for s in &config.services {
            let err = |source| BindError {
                service: s.name.clone(),
                addr: s.listen,
                source,
            };
            let std_listener = listener::bind(s.listen).map_err(err)?;
            let l = TcpListener::from_std(std_listener).map_err(err)?;
            bound.push((Arc::new(Service::from_config(s)), l));
        }
        Ok(Server {
            bound,
            shutdown: config.shutdown.clone(),
            resolver,
            resolver_timeout: config.resolver.timeout.0,
            readiness: Arc::new(Readiness::default()),
        })
    }

    /// The address each service actually listens on (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.name.clone(), a)))
            .collect()
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.bound.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Serves until `shutdown` completes, then drains as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let stop = CancellationToken::new();
        let deadline = CancellationToken::new();
        let tracker = TaskTracker::new();
        // Probes, DNS watchers and pool timers: they run until the drain is over.
        let background = CancellationToken::new();
        self.start_background(&background).await;
        let mut accepting = tokio::task::JoinSet::new();
        for (service, l) in self.bound {
            tracing::info!(
                service = %service.name,
                listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                policy = service.policy.as_str(),
                relay = service.relay.mode.as_str(),
                backends = service.pool.members().len(),
                dns_names = service.names.len(),
                "listening"
            );
            accepting.spawn(listener::accept_loop(
                l,
                service,
                tracker.clone(),
                stop.clone(),
                deadline.clone(),
            ));
        }

        self.readiness.set(true, false);

        shutdown.await;
        self.readiness.set(false, true);
        let cut_at = Instant::now() + self.shutdown.drain_timeout.0;
        tracing::info!(
            delay_ms = self.shutdown.delay.0.as_millis() as u64,
            drain_timeout_ms = self.shutdown.drain_timeout.0.as_millis() as u64,
            in_flight = tracker.len(),
            "stop signal: draining"
        );
        tokio::time::sleep(self.shutdown.delay.0).await;
        stop.cancel();
        while accepting.join_next().await.is_some() {}
        tracker.close();
        tracing::info!(in_flight = tracker.len(), "listeners closed");

        let mut cut = 0;
        let mut progress =
            tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                () = tracker.wait() => break,
                () = tokio::time::sleep_until(cut_at) => {
                    cut = tracker.len();
                    tracing::warn!(remaining = cut, "drain deadline reached: cutting remaining connections");
                    deadline.cancel();
                    tracker.wait().await;
                    break;
                }
                _ = progress.tick() => {
                    let left = cut_at.saturating_duration_since(Instant::now());
                    tracing::info!(remaining = tracker.len(), deadline_in_ms = left.as_millis() as u64, "draining");
                }
            }
        }
        background.cancel();
        tracing::info!(cut, "drained: exiting");
        Stopped { cut }
    }

    /// Starts every pool's probes and every DNS watcher, then waits (bounded) for the first DNS answers
    /// and the first probe of every backend, so the first clients find the backends that are up.
    async fn start_background(&self, background: &CancellationToken) {
        let mut firsts = Vec::new();
        for (service, _) in &self.bound {
            service.pool.start(background.clone());
            let Some(resolver) = &self.resolver else {
                continue;
            };
            for name in &service.names {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let spec = discovery::WatchSpec {
                    service: service.name.clone(),
                    pool: service.pool.clone(),
                    resolver: resolver.clone(),
                    name: name.clone(),
                    settings: service.discovery.clone(),
                    query_limit: self.resolver_timeout + Duration::from_secs(1),
                };
                let watcher = discovery::watch(spec, background.clone(), tx);
                service
                    .watchers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(watcher);
                firsts.push(rx);
            }
        }
        let dns_by = Instant::now() + self.resolver_timeout + STARTUP_GRACE;
        for rx in firsts {
            let _ = tokio::time::timeout_at(dns_by, rx).await;
        }
        for (service, _) in &self.bound {
            if let Some(spec) = &service.pool.settings().probes {
                service.pool.wait_probed(spec.timeout + STARTUP_GRACE).await;
            }
            service.pool.warmed_up();
        }
    }
}

/// Binds and runs `config` until `shutdown` completes: what `main` does, minus signals.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, StartError> {
    Ok(Server::bind(config)?.run(shutdown).await)
}
