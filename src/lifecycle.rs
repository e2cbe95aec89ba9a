//! Start, run and stop: bind every listener, serve, and on the stop signal drain.
//!
//! Stop sequence: keep accepting for `shutdown.delay` (so a balancer in front can take us out first),
//! close every listener, let in-flight connections finish, and when `shutdown.drain_timeout` (counted
//! from the signal) runs out, cut what remains with a reset and return. Connections are tracked with a
//! `TaskTracker`, so the return comes right after the last one ends, never after a fixed sleep.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ShutdownConfig};
use crate::listener::{self, BindError};
use crate::service::Service;

/// How often drain progress is logged while connections remain.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Every service bound and ready to serve.
pub struct Server {
    bound: Vec<(Arc<Service>, TcpListener)>,
    shutdown: ShutdownConfig,
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
    pub fn bind(config: &Config) -> Result<Server, BindError> {
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
        })
    }

    /// The address each service actually listens on (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.name.clone(), a)))
            .collect()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.bound.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Serves until `shutdown` completes, then drains as described in the module docs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let stop = CancellationToken::new();
        let deadline = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut accepting = tokio::task::JoinSet::new();
        for (service, l) in self.bound {
            tracing::info!(
                service = %service.name,
                listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                policy = service.policy.as_str(),
                relay = service.relay.mode.as_str(),
                backends = service.pool.members().len(),
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

        shutdown.await;
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
        tracing::info!(cut, "drained: exiting");
        Stopped { cut }
    }
}

/// Binds and runs `config` until `shutdown` completes: what `main` does, minus signals.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, BindError> {
    Ok(Server::bind(config)?.run(shutdown).await)
}
