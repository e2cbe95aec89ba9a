//! The semantic checks of a parsed config: what is well-formed but wrong. Every problem names its
//! key path (`services[0].health.rise: must be at least 1`), and all of them are reported at once.

use super::{
    is_container_name, AccessLog, AutoscaleConfig, BackendAddress, Config, Dur, HealthKind,
    Problem, ReplicasConfig, ServiceConfig, LABEL_PREFIX, MAX_WEIGHT,
};

impl Config {
    /// Every semantic problem of a parsed config, each naming its key path; empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if let Some(admin) = &self.admin {
            let loopback = admin.listen.ip().is_loopback();
            match &admin.token {
                Some(t) if t.trim().is_empty() => p.add("admin.token", "must not be empty"),
                None if !loopback => p.add(
                    "admin.token",
                    format!(
                        "required when admin.listen ({}) is not a loopback address",
                        admin.listen
                    ),
                ),
                _ => {}
            }
        }
        if let Some(file) = &self.log.file {
            if file.as_os_str().is_empty() || file.file_name().is_none() {
                p.add("log.file", "must be a file path");
            }
        }
        if let AccessLog::File(access) = &self.log.access {
            if access.file_name().is_none() {
                p.add("log.access", "must be stdout, off or a file path");
            } else if self.log.file.as_ref() == Some(access) {
                p.add(
                    "log.access",
                    "must not be log.file: give the routing log a file of its own",
                );
            }
        }
        if self.log.keep == 0 {
            p.add(
                "log.keep",
                "must be at least 1 (rotated files kept per log file)",
            );
        }
        if let Some(f) = &self.log.filter {
            // The same parser the logger uses (RUST_LOG syntax).
            if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(f) {
                p.add("log.filter", format!("invalid filter {f:?}: {e}"));
            }
        }
        if self.resolver.timeout.is_zero() {
            p.add("resolver.timeout", "must be greater than 0");
        }
        for (k, ns) in self.resolver.nameservers.iter().enumerate() {
            if ns.port() == 0 || ns.ip().is_unspecified() {
                p.add(
                    format!("resolver.nameservers[{k}]"),
                    format!("{ns} is not a usable name server address"),
                );
            }
        }
        if self.shutdown.delay > self.shutdown.drain_timeout {
            p.add(
                "shutdown.delay",
                format!(
                    "must not exceed shutdown.drain_timeout ({}), which bounds the whole shutdown",
                    self.shutdown.drain_timeout
                ),
            );
        }
        if self.services.is_empty() {
            p.add("services", "at least one service is required");
        }
        if self.max_connections == Some(0) {
            p.add("max_connections", "must be at least 1");
        }
        for (i, s) in self.services.iter().enumerate() {
            let at = |key: &str| format!("services[{i}].{key}");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                p.add(
                    at("name"),
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                );
            }
            if let Some(j) = self.services[..i].iter().position(|o| o.name == s.name) {
                p.add(
                    at("name"),
                    format!("duplicate of services[{j}].name ({:?})", s.name),
                );
            }
            if s.listen.port() != 0 {
                if let Some(j) = self.services[..i].iter().position(|o| o.listen == s.listen) {
                    p.add(
                        at("listen"),
                        format!("{} is already used by services[{j}]", s.listen),
                    );
                }
            }
            if s.backends.is_empty() && s.replicas.is_none() {
                p.add(
                    at("backends"),
                    "at least one backend is required (or a replicas section)",
                );
            }
            if let Some(r) = &s.replicas {
                validate_replicas(&mut p, i, s, r);
            }
            if let Some(a) = &s.autoscale {
                validate_autoscale(&mut p, i, s.replicas.as_ref(), a);
            }
            for (k, b) in s.backends.iter().enumerate() {
                let bat = |key: &str| format!("services[{i}].backends[{k}].{key}");
                if let Some(j) = s.backends[..k].iter().position(|o| o.address == b.address) {
                    p.add(
                        bat("address"),
                        format!("duplicate of backends[{j}] ({})", b.address),
                    );
                }
                if let BackendAddress::Ip(a) = b.address {
                    if a.port() == 0 {
                        p.add(bat("address"), "port must be a number from 1 to 65535");
                    }
                    if a.ip().is_unspecified() {
                        p.add(
                            bat("address"),
                            format!("{} is not a connectable address", a.ip()),
                        );
                    }
                }
                if b.max_connections == Some(0) {
                    p.add(bat("max_connections"), "must be at least 1");
                }
                if b.weight == 0 || b.weight > MAX_WEIGHT {
                    p.add(
                        bat("weight"),
                        format!("must be from 1 to {MAX_WEIGHT}, got {}", b.weight),
                    );
                }
            }
            if let Some(d) = &s.discovery {
                if d.refresh < Dur::millis(100) {
                    p.add(at("discovery.refresh"), "must be at least 100ms");
                }
                if d.empty_after == 0 {
                    p.add(at("discovery.empty_after"), "must be at least 1");
                }
                if d.drain_timeout.is_zero() {
                    p.add(at("discovery.drain_timeout"), "must be greater than 0");
                }
            }
            let h = &s.health;
            if h.interval.is_zero() {
                p.add(at("health.interval"), "must be greater than 0");
            }
            if h.timeout.is_zero() {
                p.add(at("health.timeout"), "must be greater than 0");
            }
            if h.rise == 0 {
                p.add(at("health.rise"), "must be at least 1");
            }
            if h.fall == 0 {
                p.add(at("health.fall"), "must be at least 1");
            }
            if !h.path.starts_with('/') || h.path.chars().any(|c| c.is_ascii_control() || c == ' ')
            {
                p.add(
                    at("health.path"),
                    "must start with '/' and contain no spaces or control characters",
                );
            }
            if h.port == Some(0) {
                p.add(at("health.port"), "must be a number from 1 to 65535");
            }
            if s.passive.max_fails > 0 && s.passive.cooldown.is_zero() {
                p.add(
                    at("passive.cooldown"),
                    "must be greater than 0 when passive.max_fails is set",
                );
            }
            if s.connect_timeout.is_zero() {
                p.add(at("connect_timeout"), "must be greater than 0");
            }
            if s.connect_attempts == 0 {
                p.add(at("connect_attempts"), "must be at least 1");
            }
            if s.idle_timeout.is_zero() {
                p.add(at("idle_timeout"), "must be greater than 0");
            }
            if s.half_close_timeout.is_zero() {
                p.add(at("half_close_timeout"), "must be greater than 0");
            }
            if s.max_connections == 0 {
                p.add(at("max_connections"), "must be at least 1");
            }
            validate_edge(&mut p, i, s);
        }
        p.0
    }
}

fn validate_replicas(p: &mut Problems, i: usize, s: &ServiceConfig, r: &ReplicasConfig) {
    let at = |key: &str| format!("services[{i}].replicas.{key}");
    if let Some(d) = &r.docker {
        if !(d.starts_with("unix:///") || d.starts_with("tcp://") || d.starts_with("http://")) {
            p.add(
                at("docker"),
                format!("{d:?}: must be unix:///path/to/docker.sock or tcp://host:port"),
            );
        }
    }
    if r.image.trim().is_empty() || r.image.contains(char::is_whitespace) {
        p.add(at("image"), "must name an image (no spaces)");
    }
    if r.network.trim().is_empty() {
        p.add(at("network"), "must name a Docker network");
    }
    if r.port == 0 {
        p.add(at("port"), "must be a number from 1 to 65535");
    }
    if let Some(prefix) = &r.name_prefix {
        if !is_container_name(prefix) {
            p.add(
                at("name_prefix"),
                "must start with a letter or digit and use only letters, digits, '_', '.' and '-'",
            );
        }
    }
    if r.max == 0 || r.max > MAX_REPLICAS {
        p.add(at("max"), format!("must be from 1 to {MAX_REPLICAS}"));
    }
    if r.min > r.max {
        p.add(
            at("min"),
            format!("must not exceed replicas.max ({})", r.max),
        );
    }
    if let Some(start) = r.start {
        if start < r.min || start > r.max {
            p.add(
                at("start"),
                format!(
                    "must be from replicas.min ({}) to replicas.max ({})",
                    r.min, r.max
                ),
            );
        }
    }
    for k in r.env.keys() {
        if k.is_empty() || k.contains('=') {
            p.add(at("env"), format!("{k:?} is not a variable name"));
        }
    }
    for k in r.labels.keys() {
        if k.starts_with(LABEL_PREFIX) {
            p.add(
                at("labels"),
                format!("{k:?}: labels starting with {LABEL_PREFIX} are sluicegate's own"),
            );
        }
    }
    if r.command.as_ref().is_some_and(|c| c.is_empty()) {
        p.add(
            at("command"),
            "must not be empty (leave it out for the image's own)",
        );
    }
    if !is_container_name(&r.balancer) {
        p.add(
            at("balancer"),
            "must start with a letter or digit and use only letters, digits, '_', '.' and '-'",
        );
    }
    if r.check_interval < Dur::millis(200) {
        p.add(at("check_interval"), "must be at least 200ms");
    }
    if r.timeout.is_zero() {
        p.add(at("timeout"), "must be greater than 0");
    }
    if r.heal.max_per_minute == 0 {
        p.add(at("heal.max_per_minute"), "must be at least 1");
    }
    if s.health.kind == HealthKind::None {
        p.add(
            format!("services[{i}].health.kind"),
            "must be tcp or http with replicas: a replica takes traffic only after its probe passes",
        );
    }
}

fn validate_autoscale(
    p: &mut Problems,
    i: usize,
    replicas: Option<&ReplicasConfig>,
    a: &AutoscaleConfig,
) {
    let at = |key: &str| format!("services[{i}].autoscale.{key}");
    let Some(r) = replicas else {
        p.add(
            format!("services[{i}].autoscale"),
            "needs a replicas section: the autoscaler starts and removes replicas",
        );
        return;
    };
    if !(a.target.is_finite() && a.target > 0.0) {
        p.add(at("target"), "must be a number greater than 0");
    }
    let (min, max) = (a.min.unwrap_or(r.min), a.max.unwrap_or(r.max));
    if min < r.min.max(1) {
        p.add(
            at("min"),
            format!("must be at least replicas.min ({}) and at least 1", r.min),
        );
    }
    if max > r.max {
        p.add(
            at("max"),
            format!("must not exceed replicas.max ({})", r.max),
        );
    }
    if min > max {
        p.add(at("min"), format!("must not exceed autoscale.max ({max})"));
    }
    for (key, d) in [
        ("window", a.window),
        ("up_cooldown", a.up_cooldown),
        ("down_cooldown", a.down_cooldown),
    ] {
        if d.is_zero() {
            p.add(at(key), "must be greater than 0");
        }
    }
}

/// Replicas one service may have at most.
const MAX_REPLICAS: u32 = 100;

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// `accept_proxy`, `limits` and `queue` of services[i].
fn validate_edge(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    if let Some(a) = &s.accept_proxy {
        if a.from.is_empty() {
            p.add(
                at("accept_proxy.from"),
                "must list the balancers in front (a header from anyone else would be a spoofed client address)",
            );
        }
        if a.timeout.is_zero() || a.timeout > Dur::secs(60) {
            p.add(at("accept_proxy.timeout"), "must be from 1ms to 60s");
        }
    }
    let l = &s.limits;
    if l.per_source_connections == Some(0) {
        p.add(at("limits.per_source_connections"), "must be at least 1");
    }
    if l.per_source_rate == Some(0) {
        p.add(
            at("limits.per_source_rate"),
            "must be at least 1 (new connections per second)",
        );
    }
    if let Some(q) = &s.queue {
        if q.max == 0 {
            p.add(at("queue.max"), "must be at least 1");
        }
        if q.timeout.is_zero() || q.timeout > Dur::secs(300) {
            p.add(at("queue.timeout"), "must be from 1ms to 5m");
        }
        if !s.backends.iter().any(|b| b.max_connections.is_some()) {
            p.add(
                at("queue"),
                "waits for a backend below its max_connections, but no backend sets max_connections",
            );
        }
    }
}
