//! Reload: a validated config applied to the running server as a difference.
//!
//! [`plan`] is pure: from the running config and the new one it decides, per service, whether it is
//! added, removed, unchanged or changed (and then whether its listener is rebound, its DNS watchers
//! restarted, and which DNS names it dropped), whether the resolver is rebuilt, and which settings need
//! a restart. [`Control::apply`] then carries the plan out: everything that can fail (building a
//! resolver, binding new listeners) comes first, so a failed reload changes nothing; then services are
//! removed (their listeners close, their connections finish), changed (same pool and counters, new
//! settings for new connections) and added.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{bind_service, needs_dns, resolving_for, Control, Running};
use crate::config::{Config, ConfigError};
use crate::discovery::{self, ResolverError};
use crate::listener::BindError;
use crate::pool::Source;
use crate::replicas::ReplicaSet;
use crate::service::{self, Service};
use crate::util::lock;

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
    /// Changed: new settings on the same pool and counters.
    Change {
        /// Its `listen` changed: bind the new address (before anything else), then close the old.
        rebind: bool,
        /// Its DNS names, discovery settings or the resolver changed: restart its watchers.
        rewatch: bool,
        /// DNS names it no longer has: their backends leave.
        dropped_names: Vec<Arc<str>>,
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
    let old_by_name: BTreeMap<&str, _> =
        old.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let steps = new
        .services
        .iter()
        .map(|s| {
            let step = match old_by_name.get(s.name.as_str()) {
                None => Step::Add,
                Some(o) if *o == s && !new_resolver => Step::Keep,
                Some(o) => {
                    let (old_names, new_names) = (discovery::names(o), discovery::names(s));
                    let labels = |n: &[discovery::NameSpec]| -> Vec<Arc<str>> {
                        n.iter().map(|n| n.label.clone()).collect()
                    };
                    let (ol, nl) = (labels(&old_names), labels(&new_names));
                    Step::Change {
                        rebind: o.listen != s.listen,
                        rewatch: new_resolver || ol != nl || o.discovery != s.discovery,
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
    if new.admin.as_ref().map(|a| a.listen) != old.admin.as_ref().map(|a| a.listen) {
        restart_needed.push("admin.listen".to_string());
    }
    Plan {
        steps,
        removed,
        new_resolver,
        restart_needed,
    }
}

impl Control {
    fn stop_replicas(r: &mut Running) {
        if let Some((set, stop)) = r.replicas.take() {
            stop.cancel();
            set.stopped();
            // Its replicas leave the pool with it (drained as the service's on_removed says).
            r.current.load().pool.reconcile(Source::Docker, Vec::new());
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
        let _rt = self.rt.enter();
        let mut running = lock(&self.running);
        let mut config = lock(&self.config);
        let mut resolving = lock(&self.resolving);
        let plan = plan(&config, &new);

        // Everything that can fail comes first, so a failure changes nothing.
        let fresh_resolver = if plan.new_resolver {
            Some(resolving_for(&new)?)
        } else {
            None
        };
        let mut bound: BTreeMap<String, (TcpListener, SocketAddr)> = BTreeMap::new();
        for ((name, step), s) in plan.steps.iter().zip(&new.services) {
            if matches!(step, Step::Add | Step::Change { rebind: true, .. }) {
                bound.insert(name.clone(), bind_service(s)?);
            }
        }

        // From here on nothing fails.
        self.gate.set_max(new.max_connections);
        match fresh_resolver {
            Some(r) => *resolving = r,
            None if !needs_dns(&new) => *resolving = None,
            None => {}
        }
        let started = self.serving.load(Relaxed);
        let mut old: Vec<Running> = std::mem::take(&mut *running);
        for r in old
            .iter_mut()
            .filter(|r| plan.removed.contains(&r.config.name))
        {
            r.stop.cancel();
            Self::stop_watchers(r);
            r.current.load().pool.stop();
            tracing::info!(service = %r.config.name, "service removed: its connections finish");
        }
        for ((name, step), s) in plan.steps.iter().zip(&new.services) {
            let mut fresh = bound.remove(name);
            let mut r = match step {
                Step::Add => {
                    let Some(b) = fresh.take() else { continue };
                    let mut r = Running::new(s, Service::new(s, &self.events), b, &self.events);
                    // Before `serve`, its start-up starts every pool and watcher.
                    if started {
                        self.start_pool(&mut r);
                        r.current.load().pool.warmed_up();
                        self.start_watchers(&mut r, resolving.as_ref());
                    }
                    r
                }
                Step::Keep | Step::Change { .. } => {
                    let Some(i) = old.iter().position(|r| &r.config.name == name) else {
                        continue;
                    };
                    old.swap_remove(i)
                }
            };
            if let Step::Change {
                rebind,
                rewatch,
                dropped_names,
            } = step
            {
                let prev = r.current.load_full();
                prev.pool.update_settings(service::pool_settings(s));
                prev.pool
                    .reconcile(Source::Static, service::static_backends(s));
                for label in dropped_names {
                    prev.pool.reconcile(Source::Dns(label.clone()), Vec::new());
                }
                r.current.store(Arc::new(prev.next(s)));
                if r.config.replicas != s.replicas || r.config.autoscale != s.autoscale {
                    // New replica settings: a new set, which adopts the running containers.
                    Self::stop_replicas(&mut r);
                    r.replicas = ReplicaSet::new(s, prev.pool.clone(), self.events.clone())
                        .map(|set| (set, CancellationToken::new()));
                    if started {
                        if let Some((set, stop)) = &mut r.replicas {
                            *stop = self.background.child_token();
                            set.start(stop.clone());
                        }
                    }
                }
                if *rewatch && started {
                    Self::stop_watchers(&mut r);
                    self.start_watchers(&mut r, resolving.as_ref());
                }
                if *rebind {
                    if let Some((l, local)) = fresh {
                        r.stop.cancel();
                        r.stop = CancellationToken::new();
                        r.local = local;
                        r.pending = Some(l);
                    }
                }
                r.config = s.clone();
            }
            if started {
                if let Some(l) = r.pending.take() {
                    self.spawn_accept(&r, l);
                }
            }
            running.push(r);
        }
        let report = plan.report();
        *config = new;
        Ok(report)
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
    fn a_new_listen_address_rebinds_and_nothing_else_does() {
        let old = config(WEB, "");
        let moved = config(&WEB.replace("8080", "8090"), "");
        assert_eq!(
            plan(&old, &moved).steps[0].1,
            Step::Change {
                rebind: true,
                rewatch: false,
                dropped_names: vec![]
            }
        );
        let retimed = config(&WEB.replace("}]}", "}], connect_timeout: 5s}"), "");
        assert_eq!(
            plan(&old, &retimed).steps[0].1,
            Step::Change {
                rebind: false,
                rewatch: false,
                dropped_names: vec![]
            }
        );
    }

    #[test]
    fn dropped_dns_names_leave_and_watchers_restart() {
        let old = config(API, "");
        let new = config(&API.replace("backend:5000", "other:5000"), "");
        let p = plan(&old, &new);
        assert_eq!(
            p.steps[0].1,
            Step::Change {
                rebind: false,
                rewatch: true,
                dropped_names: vec!["backend:5000".into()]
            }
        );
        assert!(!p.new_resolver, "same resolver settings");
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
    fn log_and_admin_listen_need_a_restart() {
        let old = config(WEB, "admin: {listen: 127.0.0.1:9901}\n");
        let new = config(
            WEB,
            "admin: {listen: 127.0.0.1:9902}\nlog: {level: debug}\n",
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.restart_needed,
            vec![
                "log (level, format, file)".to_string(),
                "admin.listen".to_string()
            ]
        );
        assert_eq!(p.steps, vec![("web".into(), Step::Keep)]);
    }
}
