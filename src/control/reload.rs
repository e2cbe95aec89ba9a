//! Reload: a validated config applied to the running server as a difference.
//!
//! [`plan`] is pure: from the running config and the new one it decides, per service, whether it is
//! added, removed, unchanged or changed (and then whether its DNS watchers restart, and which DNS
//! names it dropped), whether the resolver is rebuilt, and which settings need a restart.
//! [`Control::apply`] then carries the plan out: everything that can fail (building a resolver,
//! reading every service's TLS files, binding the addresses no service listened on before) comes
//! first, so a failed reload changes nothing; then services are removed (their connections finish),
//! changed (same pool and counters, new settings for new connections) and added; then every address
//! gets its new routes, and the addresses no service names any more close.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::listeners::{self, Bound};
use super::{load_tls, needs_dns, resolving_for, Control, Resolving, Running};
use crate::config::{AdminSettings, Config, ConfigError, ProcessEnv, ServiceConfig};
use crate::discovery::docker as labels;
use crate::discovery::{self, Claimed, Finder, ResolverError};
use crate::events::Event;
use crate::listener::BindError;
use crate::pool::Source;
use crate::replicas::ReplicaSet;
use crate::service::{self, Service};
use crate::tls::{ServiceTls, TlsError};

/// Why a reload was rejected; the running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Carries its cause in its message (not also as a source, which would print it twice).
    #[error("invalid config: {0}")]
    Config(ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error("{0}: {1}")]
    Tls(String, TlsError),
    #[error("no config file to reload from")]
    NoFile,
    #[error("draining: no reload during shutdown")]
    Draining,
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> ReloadError {
        ReloadError::Config(e)
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that take effect only after a restart.
    pub restart_needed: Vec<String>,
}

/// What happens to one service of the new config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// New: bind, start its pool and watchers, serve.
    Add,
    /// Same config, same resolver: nothing to do.
    Keep,
    /// Changed: new settings on the same pool and counters (where it listens is the listeners'
    /// business).
    Change {
        /// Its DNS names, Docker label selectors, discovery settings or the resolver changed:
        /// restart its watchers.
        rewatch: bool,
        /// DNS names and Docker label selectors it no longer has: their backends leave.
        dropped_names: Vec<Finder>,
    },
}

/// The whole reload, decided before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Every service of the new config, in its order.
    pub(crate) steps: Vec<(String, Step)>,
    /// Running services the new config no longer has.
    pub(crate) removed: Vec<String>,
    /// A new resolver must be built (some service uses DNS and the resolver settings changed, or
    /// none used DNS before).
    pub(crate) new_resolver: bool,
    /// Settings that apply only at the next start.
    pub(crate) restart_needed: Vec<String>,
}

impl Plan {
    /// The report of this plan once applied.
    fn report(&self) -> ReloadReport {
        let mut r = ReloadReport {
            removed: self.removed.clone(),
            restart_needed: self.restart_needed.clone(),
            ..ReloadReport::default()
        };
        for (name, step) in &self.steps {
            match step {
                Step::Add => r.added.push(name.clone()),
                Step::Keep => r.unchanged.push(name.clone()),
                Step::Change { .. } => r.changed.push(name.clone()),
            }
        }
        r
    }
}

/// Decides how to go from the running config `old` to `new` (both valid).
pub(crate) fn plan(old: &Config, new: &Config) -> Plan {
    let new_resolver = needs_dns(new) && (!needs_dns(old) || old.resolver != new.resolver);
    // Whether a service has its addresses to itself decides what `relay: auto` runs: a change of
    // it alone is a change of the service.
    let old_by_name: BTreeMap<&str, _> = old
        .services
        .iter()
        .zip(old.alone())
        .map(|(s, alone)| (s.name.as_str(), (s, alone)))
        .collect();
    let steps = new
        .services
        .iter()
        .zip(new.alone())
        .map(|(s, alone)| {
            let step = match old_by_name.get(s.name.as_str()) {
                None => Step::Add,
                Some(&(o, was_alone)) if o == s && was_alone == alone && !new_resolver => {
                    Step::Keep
                }
                Some(&(o, _)) => {
                    let (old_names, new_names) = (discovery::names(o), discovery::names(s));
                    let finders = |n: &[discovery::NameSpec]| -> Vec<Finder> {
                        n.iter().map(discovery::NameSpec::finder).collect()
                    };
                    // What a watcher claims with: a new weight or tier re-claims too.
                    let claims = |n: &[discovery::NameSpec]| -> Vec<(Finder, u32, u32)> {
                        n.iter().map(|n| (n.finder(), n.weight, n.tier)).collect()
                    };
                    let (mut ol, mut nl) = (finders(&old_names), finders(&new_names));
                    // Docker label sources: any change of a selector or its entry restarts them.
                    let (old_labels, new_labels) = (labels::selectors(o), labels::selectors(s));
                    ol.extend(old_labels.iter().map(labels::LabelSpec::finder));
                    nl.extend(new_labels.iter().map(labels::LabelSpec::finder));
                    let rewatch = new_resolver
                        || claims(&old_names) != claims(&new_names)
                        || old_labels != new_labels
                        || o.discovery != s.discovery;
                    Step::Change {
                        rewatch,
                        dropped_names: ol.into_iter().filter(|l| !nl.contains(l)).collect(),
                    }
                }
            };
            (s.name.clone(), step)
        })
        .collect();
    let removed = old
        .services
        .iter()
        .filter(|o| !new.services.iter().any(|s| s.name == o.name))
        .map(|o| o.name.clone())
        .collect();
    let mut restart_needed = Vec::new();
    if new.log != old.log {
        restart_needed.push("log (level, format, file)".to_string());
    }
    Plan {
        steps,
        removed,
        new_resolver,
        restart_needed,
    }
}

/// What a reload asks of the admin API that only a restart can do: the admin listener keeps the
/// address, token and names it was started with (`bound`), so a reload can never open it up.
pub(crate) fn admin_changes(
    bound: Option<&AdminSettings>,
    new: Option<&AdminSettings>,
) -> Vec<String> {
    match (bound, new) {
        (None, None) => Vec::new(),
        (None, Some(_)) => vec!["admin (enabling the admin API)".into()],
        (Some(_), None) => vec!["admin (disabling the admin API)".into()],
        (Some(b), Some(n)) => {
            let mut c = Vec::new();
            if b.listen != n.listen {
                c.push("admin.listen".into());
            }
            if b.token.as_ref().map(|t| &t.0) != n.token.as_ref().map(|t| &t.0) {
                c.push("admin.token".into());
            }
            if b.hosts != n.hosts {
                c.push("admin.hosts".into());
            }
            c
        }
    }
}

impl Control {
    fn stop_replicas(r: &mut Running) {
        if let Some((set, stop)) = r.replicas.take() {
            stop.cancel();
            set.stopped();
            // Its replicas leave the pool with it (drained as the service's on_removed says).
            r.current
                .load()
                .pool
                .reconcile(Source::Docker, Vec::<Claimed>::new());
        }
    }

    /// Reads the config file again and applies it (SIGHUP, `POST /reload`).
    pub fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        let path = self.config_path.lock().clone();
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
                self.events.publish(Event::Reload {
                    ok: true,
                    report: serde_json::to_value(report).ok(),
                    error: None,
                });
            }
            Err(e) => {
                self.reloads_rejected.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "config reload rejected: the running config is kept");
                self.events.publish(Event::Reload {
                    ok: false,
                    report: None,
                    error: Some(e.to_string()),
                });
            }
        }
    }

    fn apply(&self, new: Config) -> Result<ReloadReport, ReloadError> {
        if self.readiness.is_draining() {
            return Err(ReloadError::Draining);
        }
        let _rt = self.rt.enter();
        let mut running = self.running.lock();
        let mut bound = self.listeners.lock();
        let mut config = self.config.lock();
        let mut resolving = self.resolving.lock();
        // Again under the locks: an upgrade's `pause_accepting` may have begun since the first look.
        if self.readiness.is_draining() {
            return Err(ReloadError::Draining);
        }
        let mut plan = plan(&config, &new);
        plan.restart_needed.extend(self.admin_restart_needed(&new)?);

        // Everything that can fail comes first, so a failure changes nothing.
        let fresh_resolver = if plan.new_resolver {
            Some(resolving_for(&new)?)
        } else {
            None
        };
        let tls = load_tls(&new).map_err(|(key, e)| ReloadError::Tls(key, e))?;
        let keys = listeners::keys(&new);
        let fresh = listeners::bind_missing(&keys, &bound, &new)?;
        let fresh_udp = self
            .udp
            .bind_missing(&super::udp_addresses(&new))
            .map_err(super::bind_error)?;

        // From here on nothing fails.
        self.gate.set_max(new.max_connections);
        // The API's entries and the bans stay: the list is the process's, not the config's.
        self.gate.deny.configure(new.max_denied(), &new.limits.deny);
        match fresh_resolver {
            Some(r) => *resolving = r,
            None if !needs_dns(&new) => *resolving = None,
            None => {}
        }
        let old = std::mem::take(&mut *running);
        *running = self.apply_steps(&plan, &new, old, tls, resolving.as_ref());
        self.apply_listeners(&mut bound, fresh, &keys, &running);
        self.udp.commit(fresh_udp, &super::udp_wanted(&running));
        if self.serving.load(Relaxed) {
            self.start_udp();
        }
        let report = plan.report();
        // What only a restart changes stays as it runs, so the next reload is compared with what is
        // in force.
        let (log, admin) = (config.log.clone(), config.admin.clone());
        *config = new;
        config.log = log;
        config.admin = admin;
        Ok(report)
    }

    /// Carries out the plan's steps on the running services (`old`), in the new config's order:
    /// removed ones stop, kept ones stay as they are (with their TLS files read again), changed ones
    /// take their new settings, added ones start. Returns the services now running.
    fn apply_steps(
        &self,
        plan: &Plan,
        new: &Config,
        mut old: Vec<Running>,
        tls: Vec<ServiceTls>,
        resolving: Option<&Resolving>,
    ) -> Vec<Running> {
        let started = self.serving.load(Relaxed);
        for r in old
            .iter_mut()
            .filter(|r| plan.removed.contains(&r.config.name))
        {
            Self::remove_service(r);
        }
        let mut running = Vec::with_capacity(new.services.len());
        let services = new.services.iter().zip(new.alone());
        for (((name, step), (s, alone)), tls) in plan.steps.iter().zip(services).zip(tls) {
            let taken = old.iter().position(|r| &r.config.name == name);
            let r = match (step, taken) {
                (Step::Add, _) => self.add_service((s, alone), tls, started, resolving),
                (Step::Keep, Some(i)) => {
                    let r = old.swap_remove(i);
                    if tls.terminate.is_some() || tls.originate.is_some() {
                        // Certificates renewed on disk take effect for new connections (and probes).
                        let current = r.current.load_full();
                        if tls.originate.is_some() {
                            current
                                .pool
                                .update_settings(service::pool_settings(s, &tls));
                        }
                        r.current.store(Arc::new(current.with_tls(tls)));
                    }
                    r
                }
                (Step::Change { .. }, Some(i)) => {
                    let mut r = old.swap_remove(i);
                    self.change_service(&mut r, (s, alone), step, tls, started, resolving);
                    r
                }
                (_, None) => continue,
            };
            running.push(r);
        }
        running
    }

    /// The addresses after a reload: those no service names any more close, the `fresh` ones join
    /// (and accept at once once the server serves), and every one gets its new routes.
    fn apply_listeners(
        &self,
        bound: &mut Vec<Bound>,
        fresh: Vec<Bound>,
        keys: &std::collections::BTreeSet<listeners::ListenKey>,
        running: &[Running],
    ) {
        bound.retain(|b| {
            let kept = keys.contains(&b.key);
            if !kept {
                b.stop.cancel();
                tracing::info!(listen = %b.local, "listener closed: no service listens there any more");
            }
            kept
        });
        bound.extend(fresh);
        let started = self.serving.load(Relaxed);
        for b in bound.iter_mut() {
            b.set_routes(running);
            if started {
                self.move_acceptors(b);
                self.spawn_accept(b);
            }
        }
    }

    /// What the new config asks of the admin API that waits for a restart, said once. Its token is
    /// read (and checked) even so: a token that cannot be read now would stop the next start.
    fn admin_restart_needed(&self, new: &Config) -> Result<Vec<String>, ReloadError> {
        let new_admin = new.admin_settings(&ProcessEnv)?;
        let admin = admin_changes(self.admin.as_deref(), new_admin.as_ref());
        if !admin.is_empty() {
            tracing::warn!(
                changed = ?admin,
                "the admin API keeps the address, token and names it was started with until a restart"
            );
        }
        Ok(admin)
    }

    /// A service the new config no longer has: its listener closes, its connections finish.
    fn remove_service(r: &mut Running) {
        Self::stop_watchers(r);
        r.current.load().pool.stop();
        tracing::info!(service = %r.config.name, "service removed: its connections finish");
    }

    /// A new service, bound already. Before `serve`, start-up starts every pool and watcher.
    fn add_service(
        &self,
        (s, alone): (&ServiceConfig, bool),
        tls: ServiceTls,
        started: bool,
        resolving: Option<&Resolving>,
    ) -> Running {
        let mut r = Running::new(s, Service::new(s, alone, tls, &self.events), &self.events);
        if started {
            self.start_pool(&mut r);
            self.start_watchers(&mut r, resolving);
            // Started once its backends' first probes are in, as at start-up: until then the order
            // in which they answer moves no tier (a backup healthy first is no failover).
            let pool = r.current.load().pool.clone();
            self.rt.spawn(async move {
                if let Some(spec) = &pool.settings().probes {
                    pool.wait_probed(spec.timeout + super::STARTUP_GRACE).await;
                }
                pool.warmed_up();
            });
        }
        r
    }

    /// A changed service: new settings on the same pool and counters, its static backends and DNS
    /// names reconciled, its replicas, watchers and listener replaced where the plan says.
    fn change_service(
        &self,
        r: &mut Running,
        (s, alone): (&ServiceConfig, bool),
        step: &Step,
        tls: ServiceTls,
        started: bool,
        resolving: Option<&Resolving>,
    ) {
        let Step::Change {
            rewatch,
            dropped_names,
        } = step
        else {
            return;
        };
        let prev = r.current.load_full();
        prev.pool.update_settings(service::pool_settings(s, &tls));
        prev.pool
            .reconcile(Source::Static, service::static_backends(s));
        for finder in dropped_names {
            prev.pool
                .reconcile(Source::from(finder), Vec::<Claimed>::new());
        }
        r.current.store(Arc::new(prev.next(s, alone, tls)));
        if r.config.replicas != s.replicas || r.config.autoscale != s.autoscale {
            // New replica settings: a new set, which adopts the running containers.
            Self::stop_replicas(r);
            r.replicas = ReplicaSet::new(s, prev.pool.clone(), self.events.clone())
                .map(|set| (set, CancellationToken::new()));
            if started {
                if let Some((set, stop)) = &mut r.replicas {
                    *stop = self.background.child_token();
                    set.start(stop.clone());
                }
            }
        }
        // The new config first: the label watchers are started from it.
        r.config = s.clone();
        if *rewatch && started {
            Self::stop_watchers(r);
            self.start_watchers(r, resolving);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str, extra: &str) -> Config {
        Config::from_yaml(&format!("{extra}services:\n{services}")).unwrap()
    }

    const WEB: &str =
        "  - {name: web, listen: 127.0.0.1:8080, backends: [{address: 127.0.0.1:9001}]}\n";
    const API: &str =
        "  - {name: api, listen: 127.0.0.1:8081, backends: [{address: backend:5000}]}\n";

    #[test]
    fn the_same_config_changes_nothing() {
        let c = config(&format!("{WEB}{API}"), "");
        let p = plan(&c, &c);
        assert_eq!(
            p.steps,
            vec![("web".into(), Step::Keep), ("api".into(), Step::Keep)]
        );
        assert!(p.removed.is_empty() && !p.new_resolver && p.restart_needed.is_empty());
    }

    #[test]
    fn services_are_added_removed_and_kept_by_name() {
        let old = config(WEB, "");
        let new = config(API, "");
        let p = plan(&old, &new);
        assert_eq!(p.steps, vec![("api".into(), Step::Add)]);
        assert_eq!(p.removed, vec!["web".to_string()]);
        assert!(
            p.new_resolver,
            "the first service with a DNS name needs a resolver"
        );
        assert_eq!(p.report().added, vec!["api".to_string()]);
    }

    #[test]
    fn a_new_listen_address_or_timeout_is_a_change() {
        let old = config(WEB, "");
        let moved = config(&WEB.replace("8080", "8090"), "");
        let change = Step::Change {
            rewatch: false,
            dropped_names: vec![],
        };
        assert_eq!(plan(&old, &moved).steps[0].1, change);
        let retimed = config(&WEB.replace("}]}", "}], connect_timeout: 5s}"), "");
        assert_eq!(plan(&old, &retimed).steps[0].1, change);
    }

    #[test]
    fn dropped_dns_names_leave_and_watchers_restart() {
        let old = config(API, "");
        let new = config(&API.replace("backend:5000", "other:5000"), "");
        let p = plan(&old, &new);
        assert_eq!(
            p.steps[0].1,
            Step::Change {
                rewatch: true,
                dropped_names: vec![Finder::Name("backend:5000".into())]
            }
        );
        assert!(!p.new_resolver, "same resolver settings");
    }

    /// A changed or removed `docker:` selector restarts the watchers and withdraws the old claim.
    #[cfg(feature = "docker")]
    #[test]
    fn dropped_docker_selectors_leave_and_watchers_restart() {
        let db = "  - {name: db, listen: 127.0.0.1:5432, backends: [{docker: {labels: {app: db}, port: 5432}}]}\n";
        let old = config(db, "");
        let p = plan(&old, &config(&db.replace("app: db", "app: pg"), ""));
        assert_eq!(
            p.steps[0].1,
            Step::Change {
                rewatch: true,
                dropped_names: vec![Finder::Labels("app=db".into())]
            }
        );
        let reweighted = config(&db.replace("5432}}", "5432}, weight: 3}"), "");
        assert_eq!(
            plan(&old, &reweighted).steps[0].1,
            Step::Change {
                rewatch: true,
                dropped_names: vec![]
            }
        );
    }

    #[test]
    fn new_resolver_settings_rewatch_every_service() {
        let old = config(&format!("{WEB}{API}"), "");
        let new = config(
            &format!("{WEB}{API}"),
            "resolver: {nameservers: [\"127.0.0.1:5353\"]}\n",
        );
        let p = plan(&old, &new);
        assert!(p.new_resolver);
        for (_, step) in &p.steps {
            assert!(
                matches!(step, Step::Change { rewatch: true, .. }),
                "{step:?}"
            );
        }
    }

    #[test]
    fn log_needs_a_restart() {
        let old = config(WEB, "admin: {listen: 127.0.0.1:9901}\n");
        let new = config(
            WEB,
            "admin: {listen: 127.0.0.1:9902}\nlog: {level: debug}\n",
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.restart_needed,
            vec!["log (level, format, file)".to_string()]
        );
        assert_eq!(p.steps, vec![("web".into(), Step::Keep)]);
    }

    #[test]
    fn the_admin_api_keeps_what_it_was_bound_with() {
        let settings = |listen: &str, token: Option<&str>, hosts: &[&str]| AdminSettings {
            listen: listen.parse().unwrap(),
            token: token.map(|t| {
                (
                    crate::config::Secret::new(t),
                    crate::config::TokenSource::Config,
                )
            }),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let bound = settings("0.0.0.0:9901", Some("a-long-enough-token"), &[]);
        assert!(admin_changes(Some(&bound), Some(&bound.clone())).is_empty());
        // The reload of the security issue: a loopback address and no token.
        let open = settings("127.0.0.1:9901", None, &[]);
        assert_eq!(
            admin_changes(Some(&bound), Some(&open)),
            vec!["admin.listen".to_string(), "admin.token".to_string()]
        );
        let other = settings("0.0.0.0:9901", Some("another-long-token"), &["lb"]);
        assert_eq!(
            admin_changes(Some(&bound), Some(&other)),
            vec!["admin.token".to_string(), "admin.hosts".to_string()]
        );
        assert_eq!(admin_changes(Some(&bound), None).len(), 1);
        assert_eq!(admin_changes(None, Some(&open)).len(), 1);
    }
}
