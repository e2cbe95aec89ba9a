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
    /// The routing log's lines besides each connection's end (`log.access`), set as it serves.
    access: crate::config::AccessLogConfig,
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
            Some(a) => {
                let err = |error| BindError {
                    service: "admin".into(),
                    addr: a.listen,
                    error,
                };
                let l = crate::admin::bind(a.listen).map_err(err)?;
                // The token rule on where the socket really is, not only where the config says.
                let local = l.local_addr().map_err(err)?;
                if !a.may_serve_on(local) {
                    return Err(StartError::AdminWithoutToken { local });
                }
                Some(l)
            }
            None => None,
        };
        let control = Arc::new(Control::bind(config, admin, EventBus::default())?);
        Ok(Server {
            control,
            access: config.log.access.clone(),
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
        let (_tx, upgrades) = tokio::sync::mpsc::channel(1);
        self.run_upgradable(
            shutdown,
            Upgrades {
                requests: upgrades,
                origin: None,
                incoming: None,
            },
        )
        .await
    }

    /// [`Server::run`], and on each upgrade request, an upgrade (`upgrade`): when it succeeds this
    /// process hands everything over and returns; when it fails it goes on serving. With `incoming`
    /// (this process is an upgrade's new one) it takes over from the old one once it serves.
    pub async fn run_upgradable(self, shutdown: impl Future<Output = ()>, up: Upgrades) -> Stopped {
        let c = self.control;
        let admin_stop = CancellationToken::new();
        // A descriptor of the admin API's socket, for an upgrade to pass on.
        let admin_kept = self.admin.as_ref().and_then(|l| l.try_clone().ok());
        if let (Some(l), Some(settings)) = (self.admin, c.admin_settings()) {
            crate::admin::start(l, c.clone(), settings, admin_stop.clone());
        }
        // Before the first accept, so that no connection misses its line.
        crate::accesslog::set_on_connect(self.access.on_connect);
        c.serve().await;
        if let Some(every) = self.access.every {
            tokio::spawn(crate::accesslog::progress(every.0, admin_stop.clone()));
        }
        for (name, local) in crate::sockets::leftover() {
            tracing::warn!(name = name.as_deref(), listen = %local,
                "a listening socket given to this process is for no address in its config: closed");
        }
        let Upgrades {
            mut requests,
            origin,
            incoming,
        } = up;
        // While this process still takes connections from the one it replaced, it does not upgrade.
        let taking = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(incoming) = incoming {
            incoming.take_over(c.clone(), taking.clone());
        }
        // After an upgrade, MAINPID moves systemd's eye to this process (NotifyAccess=all).
        crate::upgrade::notify_systemd(&format!("READY=1\nMAINPID={}", std::process::id()));
        let limit = c.upgrade_settings().timeout.0;
        tokio::pin!(shutdown);
        loop {
            let request = tokio::select! {
                () = &mut shutdown => break,
                r = requests.recv() => r,
            };
            let Some(mut request) = request else {
                // Nothing asks for upgrades: serve until the stop.
                (&mut shutdown).await;
                break;
            };
            if taking.load(std::sync::atomic::Ordering::SeqCst) {
                let busy = "still taking connections over from the previous process; try again";
                answer(&mut request, Err(busy.into())).await;
                continue;
            }
            let Some(origin) = &origin else {
                let cannot = "this process cannot upgrade (no binary path)";
                answer(&mut request, Err(cannot.into())).await;
                continue;
            };
            let upgrader = Upgrader {
                control: &c,
                origin,
                admin: admin_kept.as_ref(),
                admin_stop: &admin_stop,
                limit,
            };
            match upgrader.upgrade(&mut request, &mut shutdown).await {
                AfterUpgrade::Exit(cut) => return Stopped { cut },
                AfterUpgrade::ServeOn => {}
                AfterUpgrade::Drain => break,
            }
        }
        let cut = c.drain().await;
        admin_stop.cancel();
        tracing::info!(cut, "drained: exiting");
        Stopped { cut }
    }
}

/// Answers an upgrade request's asker, if it waits for an answer (`sluicegate upgrade`; a SIGUSR2
/// has no one to answer).
async fn answer(request: &mut crate::upgrade::Request, said: Result<u32, String>) {
    if let Some(r) = request.reply.take() {
        r.send(said).await;
    }
}

/// Awaits `work` to its end, hearing a stop signal (`shutdown`) meanwhile: that calls `give_up`,
/// which ends `work`'s waits. Returns what `work` returned, and whether the stop signal came.
async fn heeding_stop<T, S>(
    work: impl Future<Output = T>,
    shutdown: &mut S,
    give_up: impl FnOnce(),
) -> (T, bool)
where
    S: Future<Output = ()> + Unpin,
{
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => (r, false),
        () = &mut *shutdown => {
            give_up();
            (work.await, true)
        }
    }
}

/// What an upgrade takes from [`Server::run_upgradable`], for one request that can be acted on.
struct Upgrader<'a> {
    control: &'a Arc<Control>,
    /// The binary to start.
    origin: &'a crate::upgrade::Origin,
    /// A descriptor of the admin API's socket, to pass on.
    admin: Option<&'a std::net::TcpListener>,
    /// Stops this process's admin API once the new process serves.
    admin_stop: &'a CancellationToken,
    /// The upgrade's timeout, which bounds each of its waits.
    limit: std::time::Duration,
}

/// How an upgrade ended, for the serving loop of [`Server::run_upgradable`].
enum AfterUpgrade {
    /// Handed over, and what stayed here drained with this many connections cut: this process is
    /// done.
    Exit(usize),
    /// It failed: this process goes on serving.
    ServeOn,
    /// It failed or was given up, and a stop signal came meanwhile: this process drains.
    Drain,
}

impl Upgrader<'_> {
    /// Upgrades: starts the new process, hands everything over to it, and answers `request`. A
    /// stop signal (`shutdown`) during it is heard at once.
    async fn upgrade<S>(
        &self,
        request: &mut crate::upgrade::Request,
        shutdown: &mut S,
    ) -> AfterUpgrade
    where
        S: Future<Output = ()> + Unpin,
    {
        tracing::info!("upgrade requested: starting the new process");
        let (started, stopping) = self.start(shutdown).await;
        let (handing, before) = match started {
            Ok(h) if stopping => {
                crate::upgrade::abandon(h.0).await;
                answer(request, Err("the server is stopping".into())).await;
                return AfterUpgrade::Drain;
            }
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed: still serving");
                answer(request, Err(e.to_string())).await;
                return match stopping {
                    true => AfterUpgrade::Drain,
                    false => AfterUpgrade::ServeOn,
                };
            }
        };
        self.hand_over(handing, before, request, shutdown).await
    }

    /// Starts the new process and confirms that it reads (`upgrade::start`, `upgrade::confirm`).
    /// Returns that, and whether a stop signal came meanwhile.
    async fn start<S>(
        &self,
        shutdown: &mut S,
    ) -> (
        Result<(crate::upgrade::Handing, crate::control::Totals), crate::upgrade::UpgradeError>,
        bool,
    )
    where
        S: Future<Output = ()> + Unpin,
    {
        // A stop signal during the upgrade is heard at once (and from then on a second one
        // forces exit, `main`'s `Stops`): it ends the upgrade's waits, and this process drains.
        let abandon = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starting = async {
            let mut h = crate::upgrade::start(
                self.origin,
                self.control,
                self.admin,
                self.limit,
                abandon.clone(),
            )
            .await?;
            match crate::upgrade::confirm(&mut h, self.control).await {
                Ok(before) => Ok((h, before)),
                Err(e) => Err(e),
            }
        };
        heeding_stop(starting, shutdown, || {
            abandon.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .await
    }

    /// Hands everything over to the new process, once it is started and confirmed
    /// (`upgrade::hand_over`), answers `request`, and once it serves, lets what stayed here drain
    /// (`upgrade::finish`). A stop signal during the hand-over ends its waits.
    async fn hand_over<S>(
        &self,
        handing: crate::upgrade::Handing,
        before: crate::control::Totals,
        request: &mut crate::upgrade::Request,
        shutdown: &mut S,
    ) -> AfterUpgrade
    where
        S: Future<Output = ()> + Unpin,
    {
        // The asker hears `ok` only once the new process serves what was carried to it.
        let stop_upgrade = CancellationToken::new();
        let handing = crate::upgrade::hand_over(handing, self.control, self.limit, &stop_upgrade);
        let (handed, stopping) = heeding_stop(handing, shutdown, || stop_upgrade.cancel()).await;
        match handed {
            Ok(served) => {
                let said = match served.confirmed {
                    true => Ok(served.pid()),
                    false => Err(format!("a stop signal came during the hand-over: this process drains and exits; the new process (pid {}) goes on alone", served.pid())),
                };
                answer(request, said).await;
                self.admin_stop.cancel();
                let finishing = crate::upgrade::finish(served, before, self.control);
                tokio::pin!(finishing);
                let cut = if stopping {
                    finishing.await
                } else {
                    // Already draining: a stop signal is heard only to arm the forced exit.
                    tokio::select! {
                        cut = &mut finishing => cut,
                        () = &mut *shutdown => finishing.await,
                    }
                };
                AfterUpgrade::Exit(cut)
            }
            Err(f) => {
                tracing::error!(error = %f.error, carried = f.carried,
                    "upgrade failed: still serving");
                answer(request, Err(f.error.to_string())).await;
                match stopping {
                    true => AfterUpgrade::Drain,
                    false => AfterUpgrade::ServeOn,
                }
            }
        }
    }
}

/// What [`Server::run_upgradable`] needs for upgrades: where requests come from, the binary to
/// start, and, in an upgrade's new process, the old process it takes over from.
pub struct Upgrades {
    pub requests: tokio::sync::mpsc::Receiver<crate::upgrade::Request>,
    pub origin: Option<crate::upgrade::Origin>,
    pub incoming: Option<crate::upgrade::Incoming>,
}
