//! The application root: binds every service and the admin API, serves until the stop signal, then
//! drains. `main` adds the command line, logging and signals; tests drive [`Server`] directly.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{AdminSettings, Config, ProcessEnv};
use crate::control::{Control, Readiness, StartError};
use crate::events::EventBus;
use crate::listener::BindError;
use crate::service::Service;

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

impl Server {
    /// Binds every service's listener and the admin API's; nothing is served until [`Server::run`].
    /// Must be called inside a tokio runtime, which becomes the control runtime. On error nothing
    /// stays bound. The admin token is read from the environment or its file here.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let admin = config
            .admin_settings(&ProcessEnv)
            .map_err(StartError::Admin)?;
        Server::bind_with(config, admin)
    }

    /// [`Server::bind`] with the admin API's settings already resolved (`main` resolves them first,
    /// to exit with the config's exit code when the token is missing or bad).
    pub fn bind_with(config: &Config, admin: Option<AdminSettings>) -> Result<Server, StartError> {
        let listener = match &admin {
            Some(a) => Some(crate::admin::bind(a.listen).map_err(|error| BindError {
                service: "admin".into(),
                addr: a.listen,
                error,
            })?),
            None => None,
        };
        let control = Arc::new(Control::bind(config, admin, EventBus::default())?);
        Ok(Server {
            control,
            admin: listener,
        })
    }

    /// The file a reload (SIGHUP, `POST /reload`) reads.
    pub fn set_config_path(&self, path: PathBuf) {
        self.control.set_config_path(path);
    }

    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The address each service actually listens on (a port 0 in the config is resolved here).
    pub fn local_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.control
            .services()
            .into_iter()
            .map(|v| (v.service.name.clone(), v.listen))
            .collect()
    }

    /// Where the admin API listens, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn readiness(&self) -> Arc<Readiness> {
        self.control.readiness_handle()
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.control
            .services()
            .into_iter()
            .map(|v| v.service)
            .collect()
    }

    /// Serves until `shutdown` completes, then drains (`control/drain.rs`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Stopped {
        let c = self.control;
        let admin_stop = CancellationToken::new();
        if let (Some(l), Some(settings)) = (self.admin, c.admin_settings()) {
            crate::admin::start(l, c.clone(), settings, admin_stop.clone());
        }
        c.serve().await;
        shutdown.await;
        let cut = c.drain().await;
        admin_stop.cancel();
        tracing::info!(cut, "drained: exiting");
        Stopped { cut }
    }
}
