//! The semantic checks of a parsed config: what is well-formed but wrong. Every problem names its
//! key path (`services[0].health.rise: must be at least 1`), and all of them are reported at once.

use std::collections::HashMap;

use super::admin::{is_host_name, token_problem};
use super::replicas::{capability, forbidden_network, DockerEnv, MIN_MEMORY};
use super::{
    is_container_name, AccessLog, AdminConfig, AutoscaleConfig, BackendAddress, Config,
    DockerSelector, Dur, Failback, HealthConfig, HealthKind, Problem, ReplicasConfig,
    ServiceConfig, Transport, Weight, LABEL_PREFIX, MAX_DNS_RECORDS, MAX_READ_CAP,
};

impl Config {
    /// Every semantic problem of a parsed config, each naming its key path; empty when valid.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if let Some(admin) = &self.admin {
            validate_admin(&mut p, admin);
        }
        self.validate_log(&mut p);
        self.validate_globals(&mut p);
        validate_limits(&mut p, "limits", &self.limits);
        for (i, s) in self.services.iter().enumerate() {
            self.validate_identity(&mut p, i, s);
            validate_service(&mut p, i, s);
        }
        self.validate_listen_overlaps(&mut p);
        self.validate_shared(&mut p);
        p.0
    }

    /// The `log` section.
    fn validate_log(&self, p: &mut Problems) {
        if let Some(file) = &self.log.file {
            if file.as_os_str().is_empty() || file.file_name().is_none() {
                p.add("log.file", "must be a file path");
            }
        }
        if let Some(every) = self.log.access.every {
            if every.0 < std::time::Duration::from_secs(1) {
                p.add(
                    "log.access.every",
                    "must be at least 1s (a line per open connection each period)",
                );
            }
        }
        if let AccessLog::File(access) = &self.log.access.to {
            let text = access.to_string_lossy();
            if ["udp://", "tcp://", "unix:"]
                .iter()
                .any(|s| text.starts_with(s))
            {
                p.add(
                    "log.access",
                    format!("{text:?} is a syslog collector: give it as log.access.syslog"),
                );
            } else if access.file_name().is_none() {
                p.add("log.access", "must be stdout, off or a file path");
            } else if self.log.file.as_ref() == Some(access) {
                p.add(
                    "log.access",
                    "must not be log.file: give the routing log a file of its own",
                );
            }
        }
        if self.log.access.syslog_facility.is_some() && self.log.access.syslog.is_none() {
            p.add(
                "log.access.syslog_facility",
                "has no effect without log.access.syslog",
            );
        }
        if !(16..=1_000_000).contains(&self.log.buffer_lines) {
            p.add(
                "log.buffer_lines",
                format!("must be from 16 to 1000000, got {}", self.log.buffer_lines),
            );
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
    }

    /// `resolver`, `shutdown`, `services` as a list and the top-level `max_connections`.
    fn validate_globals(&self, p: &mut Problems) {
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
        if self.upgrade.timeout.is_zero() {
            p.add(
                "upgrade.timeout",
                "must be greater than 0 (it bounds how long the old process waits for the new one)",
            );
        }
        if self.services.is_empty() {
            p.add("services", "at least one service is required");
        }
        if self.max_connections == Some(0) {
            p.add("max_connections", "must be at least 1");
        }
    }

    /// What services[i] must not share with the services before it, or with the admin API: its name
    /// and its listening address.
    fn validate_identity(&self, p: &mut Problems, i: usize, s: &ServiceConfig) {
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
        if let Some(admin) = &self.admin {
            if let Some(a) = s
                .listen
                .addrs()
                .iter()
                .find(|a| overlaps(admin.listen, **a))
            {
                p.add(
                    at("listen"),
                    format!(
                        "{a} overlaps admin.listen ({}): the admin API and a service cannot share a port",
                        admin.listen
                    ),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = s.listen.addrs().iter().find(|a| !seen.insert(**a)) {
            p.add(at("listen"), format!("{dup} is listed twice"));
        }
    }

    /// Listen addresses of different services: the same address is shared (by the routing rules of
    /// [`Config::validate_shared`]); an unspecified address and a specific one on the same port
    /// cannot both be bound.
    fn validate_listen_overlaps(&self, p: &mut Problems) {
        // By port: a config may have port ranges, and only addresses of one port can overlap.
        let mut by_port: HashMap<(bool, u16), Vec<(usize, std::net::SocketAddr)>> = HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            for a in s.listen.addrs() {
                // A UDP address never clashes with a TCP one: each transport has its ports.
                let port = (s.protocol == Transport::Udp, a.port());
                by_port.entry(port).or_default().push((i, *a));
            }
        }
        let mut said = std::collections::HashSet::new();
        let mut ports: Vec<_> = by_port.into_iter().collect();
        ports.sort();
        for (_, addrs) in ports {
            for (x, &(i, a)) in addrs.iter().enumerate() {
                for &(j, b) in &addrs[..x] {
                    // The same address in two services is sharing (validate_shared); twice in one
                    // list, or overlapping within it, cannot be bound.
                    let clash = if i == j {
                        overlaps(a, b)
                    } else {
                        a != b && overlaps(a, b)
                    };
                    if clash && said.insert((j, i)) {
                        let other = if i == j {
                            "another address of the same list".to_string()
                        } else {
                            format!("services[{j}].listen")
                        };
                        p.add(
                            format!("services[{i}].listen"),
                            format!(
                                "{a} overlaps {other} ({b}): an unspecified address takes the port on every address of its family"
                            ),
                        );
                    }
                }
            }
        }
    }

    /// Services sharing a listen address: each a route the address can tell apart (by `sni`, then
    /// `alpn`; at most one default without either), and the same listener-level settings (what is
    /// read before the route is known: the PROXY header and the ClientHello). Each pair is named
    /// once, whatever number of addresses it shares.
    fn validate_shared(&self, p: &mut Problems) {
        for transport in [Transport::Tcp, Transport::Udp] {
            let shared = super::listen::shared_addresses(self.listens(transport));
            let mut said = std::collections::HashSet::new();
            for (addr, services) in shared {
                for (x, &i) in services.iter().enumerate() {
                    for &j in &services[..x] {
                        if !said.insert((j, i)) {
                            continue;
                        }
                        match transport {
                            Transport::Tcp => self.validate_pair(p, addr, j, i),
                            Transport::Udp => self.validate_udp_pair(p, addr, j, i),
                        }
                    }
                }
            }
        }
    }

    /// UDP services `a` (earlier) and `b` both on `addr`: told apart by the server name or
    /// protocols of QUIC Initials, so neither balances datagrams one by one.
    fn validate_udp_pair(&self, p: &mut Problems, addr: std::net::SocketAddr, a: usize, b: usize) {
        let (sa, sb) = (&self.services[a], &self.services[b]);
        let both = format!(
            "services[{a}] ({:?}) and services[{b}] ({:?})",
            sa.name, sb.name
        );
        if let Some(what) = super::route_overlap(&sa.route_keys(), &sb.route_keys()) {
            let (key, why) = if sa.route_keys().is_default() && sb.route_keys().is_default() {
                ("listen", format!("{both} are both the default of UDP {addr} (neither has sni nor alpn): at most one may be; UDP services share an address only to route QUIC by server name"))
            } else {
                ("sni", format!("{both} both answer {what} on UDP {addr}: give them distinct sni names or alpn protocols"))
            };
            p.add(format!("services[{b}].{key}"), why);
        }
        for (i, s) in [(a, sa), (b, sb)] {
            if s.udp_settings().per_packet {
                p.add(
                    format!("services[{i}].udp.per_packet"),
                    format!("{both} share UDP {addr}, routed by QUIC's server name: a per_packet service has no sessions to route"),
                );
            }
        }
    }

    /// Services `a` (earlier) and `b` both on `addr`.
    fn validate_pair(&self, p: &mut Problems, addr: std::net::SocketAddr, a: usize, b: usize) {
        let (sa, sb) = (&self.services[a], &self.services[b]);
        let at = |key: &str| format!("services[{b}].{key}");
        let both = format!(
            "services[{a}] ({:?}) and services[{b}] ({:?})",
            sa.name, sb.name
        );
        if let Some(what) = super::route_overlap(&sa.route_keys(), &sb.route_keys()) {
            let (key, why) = if sa.route_keys().is_default() && sb.route_keys().is_default() {
                ("listen", format!("{both} are both the default of {addr} (neither has sni nor alpn): at most one may be"))
            } else {
                ("sni", format!("{both} both answer {what} on {addr}: give them distinct sni names or alpn protocols"))
            };
            p.add(at(key), why);
        }
        if sa.relay == super::RelayMode::Ring || sb.relay == super::RelayMode::Ring {
            p.add(
                at("relay"),
                format!("{both} share {addr}, and relay: ring serves an address of its own only (no routes yet)"),
            );
        }
        if sa.accept_proxy != sb.accept_proxy {
            p.add(
                at("accept_proxy"),
                format!("{both} share {addr} but not accept_proxy: the PROXY header is read before the route is known, so it must be the same"),
            );
        }
        if sa.client_hello_timeout != sb.client_hello_timeout {
            p.add(
                at("client_hello_timeout"),
                format!("{both} share {addr} but not client_hello_timeout: the hello is read before the route is known, so it must be the same"),
            );
        }
        if sa.max_pending != sb.max_pending {
            p.add(
                at("max_pending"),
                format!("{both} share {addr} but not max_pending: it bounds the connections waiting for their route, so it must be the same"),
            );
        }
    }
}

/// Everything of services[i] on its own.
fn validate_service(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    if s.backends.is_empty() && s.replicas.is_none() {
        p.add(
            at("backends"),
            "at least one backend is required (or a replicas section)",
        );
    }
    if let Some(r) = &s.replicas {
        validate_replicas(p, i, s, r);
    }
    if let Some(a) = &s.autoscale {
        validate_autoscale(p, i, s.replicas.as_ref(), a);
    }
    validate_backends(p, i, s);
    validate_discovery_and_health(p, i, s);
    validate_connecting(p, i, s);
    validate_liveness(p, i, s);
    validate_edge(p, i, s);
    validate_tls(p, i, s);
    validate_ring(p, i, s);
    validate_udp(p, i, s);
}

/// The `udp` block and what a `protocol: udp` service cannot have (the keys that are set with
/// their defaults are found in the text, [`tcp_keys_on_udp`]).
fn validate_udp(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    if s.protocol == Transport::Tcp {
        if s.udp.is_some() {
            p.add(at("udp"), "is for protocol: udp services only");
        }
        if matches!(s.health.kind, HealthKind::Udp | HealthKind::Dns) {
            p.add(
                at("health.kind"),
                "udp and dns probes are for protocol: udp services: a TCP service's backends answer on TCP",
            );
        }
        return;
    }
    let u = s.udp_settings();
    if u.idle_timeout.is_zero() || u.idle_timeout > Dur::secs(7 * 24 * 3600) {
        p.add(at("udp.idle_timeout"), "must be from 1ms to 7d");
    }
    if u.max_sessions == 0 || u.max_sessions > 1_000_000 {
        p.add(at("udp.max_sessions"), "must be from 1 to 1000000");
    }
    if u.max_datagram == 0 || u.max_datagram > super::MAX_UDP_PAYLOAD {
        p.add(
            at("udp.max_datagram"),
            format!("must be from 1 to {}", super::MAX_UDP_PAYLOAD),
        );
    }
    if u.requests == Some(0) {
        p.add(
            at("udp.requests"),
            "must be at least 1 (client datagrams per session); leave it out for no limit",
        );
    }
    if u.per_packet && (u.responses.is_some() || u.requests.is_some()) {
        p.add(
            at("udp.per_packet"),
            "has no sessions, so no responses or requests to count: leave those out",
        );
    }
    if u.per_packet && u.quic {
        p.add(
            at("udp.per_packet"),
            "has no sessions, so no QUIC connection to follow or route by sni/alpn: leave quic, sni and alpn out",
        );
    }
    let unsupported = [
        ("queue", s.queue.is_some()),
        ("agent", s.agent.is_some()),
        (
            "proxy_protocol",
            s.proxy_protocol == Some(super::ProxyVersion::V1),
        ),
        (
            "backend_port",
            s.backend_port != super::BackendPort::Configured,
        ),
    ];
    for (key, set) in unsupported {
        if set {
            p.add(
                at(key),
                "is not supported on a protocol: udp service (yet: see the UDP section of docs/configuration.md)",
            );
        }
    }
    let probe_ok = matches!(
        s.health.kind,
        HealthKind::None | HealthKind::Exec | HealthKind::Udp | HealthKind::Dns
    );
    if !probe_ok {
        p.add(
            at("health.kind"),
            "a protocol: udp service's backends are probed by udp, dns or exec: a TCP, TLS or HTTP probe would test another socket",
        );
    }
}

/// Keys of a stream that a `protocol: udp` service must not have, found in the YAML `text` itself
/// since most have defaults: set, they would be silently ignored.
pub(super) fn tcp_keys_on_udp(text: &str, config: &Config) -> Vec<Problem> {
    const TCP_ONLY: [&str; 15] = [
        "keepalive",
        "backend_keepalive",
        "user_timeout",
        "first_byte_timeout",
        "connect_timeout",
        "connect_attempts",
        "half_close_timeout",
        "stall_timeout",
        "relay",
        "idle_timeout",
        "tls",
        "backend_tls",
        "accept_proxy",
        "client_hello_timeout",
        "max_pending",
    ];
    let mut p = Problems::default();
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return p.0;
    };
    let Some(services) = doc.get("services").and_then(|s| s.as_sequence()) else {
        return p.0;
    };
    for (i, (raw, s)) in services.iter().zip(&config.services).enumerate() {
        if s.protocol != Transport::Udp {
            continue;
        }
        for key in TCP_ONLY {
            if raw.get(key).is_some() {
                let hint = if key == "idle_timeout" {
                    ": a UDP session's is udp.idle_timeout"
                } else {
                    ""
                };
                p.add(
                    format!("services[{i}].{key}"),
                    format!("is for protocol: tcp services only{hint}"),
                );
            }
        }
    }
    p.0
}

/// `relay: ring` serves plain TCP (with PROXY headers, `backend_port: same` and the queue) only so
/// far, with no route keys: what it does not do is refused by name, not ignored.
fn validate_ring(p: &mut Problems, i: usize, s: &ServiceConfig) {
    if s.relay != super::RelayMode::Ring {
        return;
    }
    let at = |key: &str| format!("services[{i}].{key}");
    let unsupported = [
        ("tls", s.tls.is_some()),
        ("backend_tls", s.backend_tls.is_some()),
        // Routing by name means reading the hello, which the ring workers do not.
        ("sni", !s.sni.is_empty()),
        ("alpn", !s.alpn.is_empty()),
    ];
    for (key, set) in unsupported {
        if set {
            p.add(
                at(key),
                format!("relay: ring does not support {key} yet: use relay: auto (or epoll) for this service"),
            );
        }
    }
}

/// services[i]'s TLS settings and its route keys (the files are read when the service starts).
fn validate_tls(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    if s.client_hello_timeout.is_zero() {
        p.add(at("client_hello_timeout"), "must be greater than 0");
    }
    if s.max_pending == 0 {
        p.add(at("max_pending"), "must be at least 1");
    }
    if let Some(t) = &s.tls {
        if t.handshake_timeout.is_zero() {
            p.add(at("tls.handshake_timeout"), "must be greater than 0");
        }
        if !t.client_crl.is_empty() && t.client_ca.is_none() {
            p.add(
                at("tls.client_crl"),
                "revocation lists check client certificates: give client_ca too",
            );
        }
    }
    let over_tls = matches!(s.health.kind, HealthKind::Tls | HealthKind::Https);
    if over_tls && s.backend_tls.is_none() && s.health.tls.is_none() {
        p.add(
            at("health.kind"),
            "tls and https probes need TLS settings: a health.tls section (the probes' own, for a service that passes TLS through) or the service's backend_tls",
        );
    }
    if s.health.tls.is_some() && !over_tls {
        p.add(
            at("health.tls"),
            "is for kind: tls and kind: https probes only",
        );
    }
    let tls_blocks = [
        ("backend_tls", &s.backend_tls),
        ("health.tls", &s.health.tls),
    ];
    for (key, b) in tls_blocks {
        let Some(b) = b else { continue };
        if b.cert.is_some() != b.key.is_some() {
            p.add(
                at(key),
                "cert and key go together: give both (a client certificate) or neither",
            );
        }
        if b.handshake_timeout.is_zero() {
            p.add(
                at(&format!("{key}.handshake_timeout")),
                "must be greater than 0",
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(n) = s.sni.iter().find(|n| !seen.insert(*n)) {
        p.add(at("sni"), format!("{n} is listed twice"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(a) = s.alpn.iter().find(|a| !seen.insert(*a)) {
        p.add(at("alpn"), format!("{a} is listed twice"));
    }
}

/// services[i].backends.
fn validate_backends(p: &mut Problems, i: usize, s: &ServiceConfig) {
    // First index of each address: a config may list thousands of backends.
    let mut first: HashMap<&BackendAddress, usize> = HashMap::new();
    for (k, b) in s.backends.iter().enumerate() {
        let bat = |key: &str| format!("services[{i}].backends[{k}].{key}");
        if let Some(j) = first.get(&b.address) {
            p.add(
                bat("address"),
                format!("duplicate of backends[{j}] ({})", b.address),
            );
        } else {
            first.insert(&b.address, k);
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
        if b.priority > 1000 {
            p.add(bat("priority"), "must be from 0 to 1000 (lower first)");
        }
        if let BackendAddress::Docker(sel) = &b.address {
            if sel.labels.is_empty() {
                p.add(
                    bat("docker.labels"),
                    "at least one label to select the containers by",
                );
            }
            if sel.port == 0 {
                p.add(bat("docker.port"), "must be a number from 1 to 65535");
            }
            if !cfg!(feature = "docker") {
                p.add(
                    bat("docker"),
                    "this build has no Docker client (built without the docker feature)",
                );
            }
            validate_selector_engine(p, &bat, sel);
        }
        if let Err(e) = Weight::new(b.weight) {
            p.add(bat("weight"), e.to_string());
        }
    }
}

/// A `docker:` backend's Engine endpoint: the rules of `replicas.docker` (the same hardening), read
/// with the same environment start-up reads.
fn validate_selector_engine(p: &mut Problems, bat: &dyn Fn(&str) -> String, sel: &DockerSelector) {
    if let Err(reason) = sel.docker_transport(&DockerEnv::current()) {
        p.add(bat("docker.docker"), reason);
    }
    if sel
        .docker_cert_path
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        p.add(
            bat("docker.docker_cert_path"),
            "must be a directory (with ca.pem, cert.pem and key.pem)",
        );
    }
}

/// services[i].discovery and .health.
fn validate_discovery_and_health(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
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
        if d.max_records == 0 || d.max_records > MAX_DNS_RECORDS {
            p.add(
                at("discovery.max_records"),
                format!("must be from 1 to {MAX_DNS_RECORDS}, got {}", d.max_records),
            );
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
    if !h.path.starts_with('/') || h.path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        p.add(
            at("health.path"),
            "must start with '/' and contain no spaces or control characters",
        );
    }
    if h.port == Some(0) {
        p.add(at("health.port"), "must be a number from 1 to 65535");
    }
    validate_probe_kind(p, i, s);
    if let Some(a) = &s.agent {
        if a.port == 0 {
            p.add(at("agent.port"), "must be a number from 1 to 65535");
        }
        if a.interval.is_zero() {
            p.add(at("agent.interval"), "must be greater than 0");
        }
        if a.timeout.is_zero() {
            p.add(at("agent.timeout"), "must be greater than 0");
        }
    }
    if let Failback::After(d) = s.failback {
        if d.is_zero() {
            p.add(at("failback.after"), "must be greater than 0");
        }
    }
}

/// The most `send`/`expect` steps a probe takes.
const MAX_STEPS: usize = 64;

/// services[i].health's keys that belong to its kind only: steps to tcp and udp, the HTTP
/// expectations to http and https, the command to exec, the query and its expectations to dns.
fn validate_probe_kind(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].health.{key}");
    let h = &s.health;
    let http = matches!(h.kind, HealthKind::Http | HealthKind::Https);
    if !h.steps.is_empty() && !matches!(h.kind, HealthKind::Tcp | HealthKind::Udp) {
        p.add(at("steps"), "send/expect steps go with kind: tcp or udp");
    }
    // A UDP "connect" sends nothing, so it proves nothing, and a backend answers only what it is
    // sent: a udp probe starts with a send.
    if h.kind == HealthKind::Udp
        && !h
            .steps
            .first()
            .is_some_and(|s| s.send.is_some() || s.send_hex.is_some())
    {
        p.add(
            at("steps"),
            "kind: udp needs steps, the first a send or send_hex (a UDP backend answers only what it is sent)",
        );
    }
    validate_dns_probe(p, &at, h);
    if h.steps.len() > MAX_STEPS {
        p.add(at("steps"), format!("at most {MAX_STEPS} steps"));
    }
    for (k, step) in h.steps.iter().enumerate() {
        if step.keys() != 1 {
            p.add(
                at(&format!("steps[{k}]")),
                "a step is exactly one of send, send_hex, expect, expect_regex, expect_hex",
            );
        }
    }
    let http_keys =
        !h.expect_status.is_empty() || h.expect_body.is_some() || h.expect_body_regex.is_some();
    if http_keys && !http {
        p.add(
            at("expect_status"),
            "expect_status, expect_body and expect_body_regex go with kind: http or https",
        );
    }
    match (h.kind == HealthKind::Exec, h.command.first()) {
        (true, None) => p.add(
            at("command"),
            "kind: exec needs a command: [PROGRAM, ARGS...]",
        ),
        (true, Some(prog)) if prog.is_empty() => {
            p.add(at("command"), "the program must not be empty")
        }
        (false, Some(_)) => p.add(at("command"), "a command goes with kind: exec"),
        _ => {}
    }
    if !(16..=MAX_READ_CAP).contains(&h.read_cap) {
        p.add(
            at("read_cap"),
            format!("must be from 16 to {MAX_READ_CAP} bytes"),
        );
    }
}

/// services[i].health's DNS query: `name` required with kind: dns (its form is checked as it is
/// read, [`super::DnsName`]); `name`, `type`, `expect_rcode` and `expect_answer` with kind: dns only.
fn validate_dns_probe(p: &mut Problems, at: &dyn Fn(&str) -> String, h: &HealthConfig) {
    if h.kind != HealthKind::Dns {
        let set = [
            ("name", h.name.is_some()),
            ("type", h.dns_type.is_some()),
            ("expect_rcode", h.expect_rcode.is_some()),
            ("expect_answer", h.expect_answer.is_some()),
        ];
        for (key, _) in set.iter().filter(|(_, set)| *set) {
            p.add(at(key), format!("{key} goes with kind: dns"));
        }
        return;
    }
    if h.name.is_none() {
        p.add(at("name"), "kind: dns needs a name to ask for");
    }
}

/// services[i]'s passive health, timeouts, attempts and cap.
fn validate_connecting(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
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
    if s.stall_timeout.is_zero() {
        p.add(at("stall_timeout"), "must be greater than 0");
    }
    if s.max_connections == 0 {
        p.add(at("max_connections"), "must be at least 1");
    }
}

/// The kernel's bounds on TCP_KEEPIDLE and TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
const MAX_KEEPALIVE_COUNT: u32 = 127;

/// services[i]'s keepalive blocks, `user_timeout` and `first_byte_timeout`: within what the
/// kernel takes (it refuses the rest, and would do so on every connection).
fn validate_liveness(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    for (block, k) in [
        ("keepalive", &s.keepalive),
        ("backend_keepalive", &s.backend_keepalive),
    ] {
        let Some(k) = k else { continue };
        for (field, d) in [("idle", k.idle), ("interval", k.interval)] {
            if let Err(why) = keepalive_secs(d) {
                p.add(at(&format!("{block}.{field}")), why);
            }
        }
        if !(1..=MAX_KEEPALIVE_COUNT).contains(&k.count) {
            p.add(
                at(&format!("{block}.count")),
                format!("must be from 1 to {MAX_KEEPALIVE_COUNT}"),
            );
        }
    }
    if let Some(t) = s.user_timeout {
        // TCP_USER_TIMEOUT is an int of milliseconds.
        if t.0.as_millis() == 0 || t.0.as_millis() > i32::MAX as u128 {
            p.add(at("user_timeout"), "must be from 1ms to 24d");
        }
    }
    if s.first_byte_timeout.is_some_and(|t| t.is_zero()) {
        p.add(at("first_byte_timeout"), "must be greater than 0");
    }
}

/// A keepalive time as the kernel takes it: whole seconds, 1 to 32,767.
pub(crate) fn keepalive_secs(d: Dur) -> Result<u32, String> {
    let bad = || format!("must be whole seconds from 1s to {MAX_KEEPALIVE_SECS}s");
    if d.0.subsec_nanos() != 0 || !(1..=MAX_KEEPALIVE_SECS).contains(&d.0.as_secs()) {
        return Err(bad());
    }
    u32::try_from(d.0.as_secs()).map_err(|_| bad())
}

/// services[i].replicas: how the Engine is reached, what the replicas run as, how many there are,
/// and how sluicegate watches them (a replica takes traffic only after its probe passes).
fn validate_replicas(p: &mut Problems, i: usize, s: &ServiceConfig, r: &ReplicasConfig) {
    let at = |key: &str| format!("services[{i}].replicas.{key}");
    if !cfg!(feature = "docker") {
        p.add(
            format!("services[{i}].replicas"),
            "this sluicegate was built without Docker support (the `docker` cargo feature): it cannot run replicas",
        );
    }
    validate_replicas_engine(p, &at, r);
    validate_replicas_container(p, i, &at, r);
    validate_replicas_counts(p, &at, r);
    validate_replicas_rest(p, &at, r);
    if s.health.kind == HealthKind::None {
        p.add(
            format!("services[{i}].health.kind"),
            "must be tcp or http with replicas: a replica takes traffic only after its probe passes",
        );
    }
}

fn validate_replicas_engine(p: &mut Problems, at: &dyn Fn(&str) -> String, r: &ReplicasConfig) {
    // The Docker CLI's variables fill in what the section leaves out, at start-up as here, so
    // `--check` reads them too and says what start-up would.
    if let Err(reason) = r.docker_transport(&DockerEnv::current()) {
        p.add(at("docker"), reason);
    }
    if r.docker_cert_path
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        p.add(
            at("docker_cert_path"),
            "must be a directory (with ca.pem, cert.pem and key.pem)",
        );
    }
}

/// What a replica's container is made of and what it may do.
fn validate_replicas_container(
    p: &mut Problems,
    i: usize,
    at: &dyn Fn(&str) -> String,
    r: &ReplicasConfig,
) {
    if r.image.trim().is_empty() || r.image.contains(char::is_whitespace) {
        p.add(at("image"), "must name an image (no spaces)");
    }
    if r.network.trim().is_empty() {
        p.add(at("network"), "must name a Docker network");
    } else if let Some(why) = forbidden_network(&r.network) {
        p.add(
            at("network"),
            format!(
                "{:?} would give the replicas {why}; use a bridge or user-defined network",
                r.network
            ),
        );
    }
    for (k, cap) in r.capabilities.iter().enumerate() {
        if capability(cap).is_none() {
            p.add(
                format!("services[{i}].replicas.capabilities[{k}]"),
                format!("{cap:?} is not a Linux capability (NET_BIND_SERVICE, CHOWN, …; ALL is not allowed: list the ones needed)"),
            );
        }
    }
    if let Some(m) = r.limits.memory {
        if m.0 < MIN_MEMORY {
            p.add(
                at("limits.memory"),
                "must be at least 6M (Docker's smallest memory limit)",
            );
        }
    }
    if let Some(c) = r.limits.cpus {
        if !c.is_finite() || c < 0.01 {
            p.add(at("limits.cpus"), "must be at least 0.01 (CPUs)");
        }
    }
    if r.limits.pids == Some(0) {
        p.add(at("limits.pids"), "must be at least 1");
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
}

fn validate_replicas_counts(p: &mut Problems, at: &dyn Fn(&str) -> String, r: &ReplicasConfig) {
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
}

/// Environment, labels, command, owner and timing.
fn validate_replicas_rest(p: &mut Problems, at: &dyn Fn(&str) -> String, r: &ReplicasConfig) {
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

/// A `limits` section, the top-level one or a service's (`at` is its path).
fn validate_limits(p: &mut Problems, at: &str, l: &super::LimitsConfig) {
    let key = |k: &str| format!("{at}.{k}");
    if l.per_source_connections == Some(0) {
        p.add(key("per_source_connections"), "must be at least 1");
    }
    if l.per_source_rate == Some(0) {
        p.add(
            key("per_source_rate"),
            "must be at least 1 (new connections per second)",
        );
    }
    if let Some(b) = &l.ban {
        if !(1..=1000).contains(&b.after) {
            p.add(
                key("ban.after"),
                format!("must be from 1 to 1000, got {}", b.after),
            );
        }
        if b.within.is_zero() || b.within > Dur::secs(86_400) {
            p.add(key("ban.within"), "must be from 1ms to 24h");
        }
        if b.for_ < Dur::secs(1) || b.for_ > Dur::secs(30 * 86_400) {
            p.add(key("ban.for"), "must be from 1s to 720h");
        }
        if l.per_source_connections.is_none() && l.per_source_rate.is_none() {
            p.add(
                key("ban"),
                "counts refusals by per_source_connections or per_source_rate: set one of them",
            );
        }
    }
    if l.max_denied == Some(0) || l.max_denied.is_some_and(|m| m > 10_000_000) {
        p.add(key("max_denied"), "must be from 1 to 10000000");
    }
}

/// `accept_proxy`, `limits` and `queue` of services[i].
fn validate_edge(p: &mut Problems, i: usize, s: &ServiceConfig) {
    let at = |key: &str| format!("services[{i}].{key}");
    if let Some(a) = &s.accept_proxy {
        for (k, c) in a.from.iter().enumerate() {
            if c.0.prefix_len() == 0 && !a.trust_any {
                p.add(
                    at(&format!("accept_proxy.from[{k}]")),
                    format!("{c} lets any peer name any client address: list the balancers in front, or set accept_proxy.trust_any: true if every peer is one"),
                );
            }
        }
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
    validate_limits(p, &at("limits"), &s.limits);
    if s.limits.max_denied.is_some() {
        p.add(
            at("limits.max_denied"),
            "is the process's (one deny list for every service): set it in the top-level limits",
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

/// What can be checked of the `admin` section without reading the token (`AdminConfig::resolve`
/// does the rest, including "a non-loopback address needs a token").
fn validate_admin(p: &mut Problems, a: &AdminConfig) {
    if a.token.is_some() && a.token_file.is_some() {
        p.add(
            "admin.token_file",
            "give the token one way: admin.token or admin.token_file, not both",
        );
    }
    if let Some(t) = &a.token {
        if let Err(why) = token_problem(t) {
            p.add("admin.token", why);
        }
    }
    if let Some(f) = &a.token_file {
        if f.as_os_str().is_empty() {
            p.add("admin.token_file", "must be a file path");
        }
    }
    for (k, h) in a.hosts.iter().enumerate() {
        if !is_host_name(h) {
            p.add(
                format!("admin.hosts[{k}]"),
                format!("{h:?} is not a DNS name (IP addresses and localhost are always allowed)"),
            );
        }
    }
}

/// Whether two listening addresses take the same port somewhere. `0.0.0.0` covers every IPv4
/// address and `[::]` every IPv6 one: IPv6 listeners are bound IPV6_V6ONLY (`listener::bind`), so
/// `[::]:P` and `0.0.0.0:P` do not clash. An IPv4-mapped IPv6 address is the IPv4 address. Port 0
/// (any free port) never clashes.
pub(super) fn overlaps(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (x, y) = (plain(a.ip()), plain(b.ip()));
    let covers = |u: IpAddr, o: IpAddr| u.is_unspecified() && u.is_ipv4() == o.is_ipv4();
    x == y || covers(x, y) || covers(y, x)
}

#[cfg(test)]
mod tests {
    use super::overlaps;
    use crate::config::Dur;

    /// `accept_proxy.from` with a /0 is refused unless `trust_any: true` says it is meant, and then
    /// accepted.
    #[test]
    fn a_zero_prefix_needs_trust_any() {
        let yaml = |from: &str, extra: &str| {
            format!("services:\n  - name: web\n    listen: 127.0.0.1:0\n    accept_proxy: {{from: [{from}]{extra}}}\n    backends: [{{address: 127.0.0.1:9001}}]\n")
        };
        for from in ["0.0.0.0/0", "\"::/0\""] {
            let err = crate::config::Config::from_yaml(&yaml(from, ""))
                .expect_err("a /0 alone")
                .to_string();
            assert!(
                err.contains("services[0].accept_proxy.from[0]") && err.contains("trust_any"),
                "{err}"
            );
            crate::config::Config::from_yaml(&yaml(from, ", trust_any: true"))
                .expect("trust_any allows it");
        }
        crate::config::Config::from_yaml(&yaml("10.0.0.0/8", "")).expect("a narrower block");
    }

    /// `limits.ban` and `max_denied` are checked where they are written, and a service without
    /// `limits` of its own takes the top level's (but not `max_denied`, the process's).
    #[test]
    fn bans_are_checked_and_top_level_limits_inherited() {
        use crate::config::Config;
        let yaml = |top: &str, own: &str| {
            format!(
                "{top}
services:
  - name: a
    listen: 127.0.0.1:0
    backends: [{{address: 127.0.0.1:9001}}]
{own}  - name: b
    listen: 127.0.0.1:0
    backends: [{{address: 127.0.0.1:9001}}]
"
            )
        };
        let refused =
            |top: &str, own: &str| Config::from_yaml(&yaml(top, own)).unwrap_err().to_string();
        let e = refused(
            "limits: {per_source_rate: 5, ban: {after: 0, within: 0s, for: 500ms}, max_denied: 0}",
            "",
        );
        for key in [
            "limits.ban.after",
            "limits.ban.within",
            "limits.ban.for",
            "limits.max_denied",
        ] {
            assert!(e.contains(&format!("{key}: must")), "{key}: {e}");
        }
        let e = refused(
            "",
            "    limits: {ban: {after: 3, within: 1m, for: 10m}}
",
        );
        assert!(e.contains("services[0].limits.ban: counts refusals"), "{e}");
        let e = refused(
            "",
            "    limits: {per_source_rate: 1, max_denied: 5}
",
        );
        assert!(e.contains("services[0].limits.max_denied"), "{e}");
        let c = Config::from_yaml(&yaml(
            "limits: {per_source_rate: 5, ban: {after: 3, within: 1m, for: 10m}, max_denied: 7}",
            "    limits: {per_source_connections: 2}
",
        ))
        .unwrap();
        assert_eq!(c.max_denied(), 7);
        assert_eq!(
            c.services[0].limits.ban, None,
            "its own limits replace the top level's"
        );
        assert_eq!(c.services[1].limits.per_source_rate, Some(5));
        assert_eq!(c.services[1].limits.ban.map(|b| b.after), Some(3));
        assert_eq!(c.services[1].limits.max_denied, None);
    }

    /// Built without the `docker` feature (`.ci/run` runs this test so), a `replicas:` section is a
    /// config error, not a replica set that can never reach an Engine.
    #[cfg(not(feature = "docker"))]
    #[test]
    fn replicas_need_the_docker_feature() {
        let err = crate::config::Config::from_yaml(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    health: {kind: tcp}\n    replicas: {image: i, port: 5000}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services[0].replicas: this sluicegate was built without Docker support"),
            "{err}"
        );
    }

    /// Keepalive, `user_timeout` and `first_byte_timeout`: accepted with their defaults and
    /// within the kernel's bounds, refused outside them naming the key, and refused on a UDP
    /// service.
    #[test]
    fn keepalive_and_first_byte_keys_are_range_checked() {
        let yaml = |extra: &str| {
            format!("services:\n  - name: web\n    listen: 127.0.0.1:0\n    backends: [{{address: 127.0.0.1:9001}}]\n{extra}")
        };
        let ok = |extra: &str| {
            crate::config::Config::from_yaml(&yaml(extra))
                .unwrap_or_else(|e| panic!("{extra}: {e}"))
        };
        let c = ok("    keepalive: {}\n    backend_keepalive: {idle: 1s, interval: 1s, count: 2}\n    user_timeout: 30s\n    first_byte_timeout: 10s\n");
        let s = &c.services[0];
        let k = s.keepalive.expect("keepalive");
        assert_eq!(
            (k.idle, k.interval, k.count),
            (Dur::secs(60), Dur::secs(10), 6)
        );
        let b = s.backend_keepalive.expect("backend_keepalive");
        assert_eq!(
            (b.idle, b.interval, b.count),
            (Dur::secs(1), Dur::secs(1), 2)
        );
        assert_eq!(s.user_timeout, Some(Dur::secs(30)));
        assert_eq!(s.first_byte_timeout, Some(Dur::secs(10)));
        ok("    keepalive: {idle: 32767s, interval: 9h, count: 127}\n");
        let c = ok("");
        assert_eq!(c.services[0].keepalive, None, "off by default");
        assert_eq!(c.services[0].first_byte_timeout, None, "off by default");
        for (extra, key) in [
            ("    keepalive: {idle: 0s}\n", "services[0].keepalive.idle"),
            (
                "    keepalive: {idle: 32768s}\n",
                "services[0].keepalive.idle",
            ),
            (
                "    keepalive: {interval: 1500ms}\n",
                "services[0].keepalive.interval",
            ),
            (
                "    backend_keepalive: {count: 0}\n",
                "services[0].backend_keepalive.count",
            ),
            (
                "    backend_keepalive: {count: 128}\n",
                "services[0].backend_keepalive.count",
            ),
            (
                "    backend_keepalive: {interval: 0s}\n",
                "services[0].backend_keepalive.interval",
            ),
            ("    user_timeout: 0s\n", "services[0].user_timeout"),
            ("    user_timeout: 600h\n", "services[0].user_timeout"),
            (
                "    first_byte_timeout: 0s\n",
                "services[0].first_byte_timeout",
            ),
        ] {
            let err = crate::config::Config::from_yaml(&yaml(extra))
                .expect_err(extra)
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = crate::config::Config::from_yaml(&yaml("    keepalive: {idle: 1s, probes: 3}\n"))
            .expect_err("an unknown field")
            .to_string();
        assert!(err.contains("probes"), "{err}");
        for key in [
            "keepalive: {}",
            "backend_keepalive: {}",
            "user_timeout: 1s",
            "first_byte_timeout: 1s",
        ] {
            let udp = format!("services:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:0\n    backends: [{{address: 127.0.0.1:53}}]\n    {key}\n");
            let err = crate::config::Config::from_yaml(&udp)
                .expect_err(key)
                .to_string();
            let name = key.split(':').next().unwrap_or_default();
            assert!(
                err.contains(&format!(
                    "services[0].{name}: is for protocol: tcp services only"
                )),
                "{key}: {err}"
            );
        }
    }

    /// What the ring workers do not do yet is a config error naming the key, not a setting ignored.
    #[test]
    fn relay_ring_refuses_what_it_does_not_do() {
        let yaml = |extra: &str| {
            format!("services:\n  - name: web\n    listen: 127.0.0.1:0\n    relay: ring\n    backends: [{{address: 127.0.0.1:9001}}]\n{extra}")
        };
        crate::config::Config::from_yaml(&yaml("")).expect("plain TCP");
        crate::config::Config::from_yaml(&yaml(
            "    proxy_protocol: v2\n    accept_proxy: {from: [127.0.0.1/32]}\n",
        ))
        .expect("PROXY headers in and out");
        let queued = yaml("    queue: {max: 10, timeout: 1s}\n")
            .replace("9001}", "9001, max_connections: 1}");
        crate::config::Config::from_yaml(&queued).expect("the queue");
        crate::config::Config::from_yaml(&yaml("    backend_port: same\n"))
            .expect("the backend's port the client reached");
        for (extra, key) in [
            ("    tls: {cert: a.pem, key: a.key}\n", "tls"),
            ("    backend_tls: {}\n", "backend_tls"),
            ("    alpn: [h2]\n", "alpn"),
        ] {
            let err = crate::config::Config::from_yaml(&yaml(extra))
                .expect_err(key)
                .to_string();
            assert!(
                err.contains(&format!(
                    "services[0].{key}: relay: ring does not support {key}"
                )),
                "{err}"
            );
        }
        let shared = "services:\n  - {name: a, listen: 127.0.0.1:7000, sni: [a.test], relay: ring, backends: [{address: 127.0.0.1:9001}]}\n  - {name: b, listen: 127.0.0.1:7000, sni: [b.test], backends: [{address: 127.0.0.1:9001}]}\n";
        let err = crate::config::Config::from_yaml(shared)
            .expect_err("a shared address")
            .to_string();
        assert!(
            err.contains("services[1].relay")
                && err.contains("relay: ring serves an address of its own"),
            "{err}"
        );
    }

    #[test]
    fn listen_addresses_overlap_through_unspecified_ones() {
        let o = |a: &str, b: &str| overlaps(a.parse().unwrap(), b.parse().unwrap());
        assert!(o("127.0.0.1:80", "127.0.0.1:80"));
        assert!(o("0.0.0.0:80", "127.0.0.1:80"));
        assert!(o("127.0.0.2:80", "0.0.0.0:80"));
        assert!(!o("[::]:80", "127.0.0.1:80"), "[::] is bound IPv6-only");
        assert!(o("[::]:80", "[::1]:80"));
        assert!(!o("0.0.0.0:80", "[::]:80"), "one family each");
        assert!(o("[::ffff:127.0.0.1]:80", "127.0.0.1:80"));
        assert!(o("[::ffff:127.0.0.1]:80", "0.0.0.0:80"));
        assert!(!o("[::ffff:127.0.0.1]:80", "[::]:80"));
        assert!(!o("0.0.0.0:80", "[::1]:80"), "0.0.0.0 is IPv4 only");
        assert!(!o("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!o("0.0.0.0:80", "0.0.0.0:81"));
        assert!(!o("127.0.0.1:0", "127.0.0.1:0"), "port 0: any free port");
    }

    fn udp_yaml(extra: &str) -> String {
        format!("services:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:5300\n    backends: [{{address: 127.0.0.1:53}}]\n{extra}")
    }

    fn problem(yaml: &str) -> String {
        match crate::config::Config::from_yaml(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_udp_service_takes_its_block_and_refuses_the_tcp_keys_by_name() {
        let c = crate::config::Config::from_yaml(&udp_yaml(
            "    udp: {idle_timeout: 5s, responses: 1, requests: 4, max_sessions: 10, max_datagram: 1500}\n",
        ))
        .expect("a UDP service");
        let u = c.services[0].udp_settings();
        assert_eq!(
            (u.responses, u.requests, u.max_sessions),
            (Some(1), Some(4), 10)
        );
        assert!(
            !c.services[0].fits_ring(true),
            "the ring carries streams only"
        );
        for (extra, key) in [
            ("    connect_timeout: 1s\n", "connect_timeout"),
            ("    idle_timeout: 1m\n", "idle_timeout"),
            ("    relay: epoll\n", "relay"),
            ("    half_close_timeout: 1m\n", "half_close_timeout"),
            ("    accept_proxy: {from: [10.0.0.0/8]}\n", "accept_proxy"),
            ("    backend_tls: {}\n", "backend_tls"),
            ("    proxy_protocol: v1\n", "proxy_protocol"),
            ("    health: {kind: tcp}\n", "health.kind"),
        ] {
            let err = problem(&udp_yaml(extra));
            assert!(err.contains(&format!("services[0].{key}")), "{key}: {err}");
        }
        assert!(problem(&udp_yaml("    idle_timeout: 1m\n")).contains("udp.idle_timeout"));
    }

    #[test]
    fn the_udp_block_is_range_checked_and_only_for_udp() {
        for (extra, key) in [
            ("    udp: {max_sessions: 0}\n", "udp.max_sessions"),
            ("    udp: {max_datagram: 70000}\n", "udp.max_datagram"),
            ("    udp: {requests: 0}\n", "udp.requests"),
            ("    udp: {idle_timeout: 0s}\n", "udp.idle_timeout"),
            (
                "    udp: {per_packet: true, responses: 1}\n",
                "udp.per_packet",
            ),
            ("    udp: {bogus: 1}\n", "udp"),
        ] {
            let err = problem(&udp_yaml(extra));
            assert!(err.contains(key), "{key}: {err}");
        }
        let tcp = udp_yaml("    udp: {}\n").replace("protocol: udp", "protocol: tcp");
        assert!(problem(&tcp).contains("services[0].udp: is for protocol: udp services only"));
        let dns_on_tcp = udp_yaml("    health: {kind: dns, name: a.test}\n")
            .replace("protocol: udp", "protocol: tcp");
        assert!(problem(&dns_on_tcp).contains("services[0].health.kind: udp and dns probes"));
    }

    #[test]
    fn udp_and_tcp_share_a_port_but_two_udp_services_do_not() {
        let both = format!(
            "{}  - name: dns-tcp\n    listen: 127.0.0.1:5300\n    backends: [{{address: 127.0.0.1:53}}]\n",
            udp_yaml("")
        );
        let c = crate::config::Config::from_yaml(&both).expect("TCP and UDP on one port");
        assert_eq!(c.alone(), vec![true, true]);
        let two = format!(
            "{}  - name: dns2\n    protocol: udp\n    listen: 127.0.0.1:5300\n    backends: [{{address: 127.0.0.1:53}}]\n",
            udp_yaml("")
        );
        assert!(problem(&two).contains("services[1].listen"));
        assert!(problem(&two).contains("both the default of UDP"));
    }

    #[test]
    fn tls_probes_take_their_own_tls_or_the_services() {
        let svc = |extra: &str| {
            format!("services:\n  - name: api\n    listen: 127.0.0.1:6443\n    backends: [{{address: 127.0.0.1:9001}}]\n{extra}")
        };
        let own = svc("    health: {kind: https, path: /readyz, tls: {verify: false}}\n");
        let c =
            crate::config::Config::from_yaml(&own).expect("passthrough probed over its own TLS");
        assert!(c.services[0].backend_tls.is_none());
        let neither = problem(&svc("    health: {kind: tls}\n"));
        assert!(
            neither.contains("services[0].health.kind") && neither.contains("health.tls"),
            "{neither}"
        );
        let wrong_kind = problem(&svc("    health: {kind: tcp, tls: {}}\n"));
        assert!(
            wrong_kind.contains("services[0].health.tls"),
            "{wrong_kind}"
        );
        let half = problem(&svc("    health: {kind: tls, tls: {cert: a.pem}}\n"));
        assert!(half.contains("services[0].health.tls"), "{half}");
    }

    #[test]
    fn udp_services_share_an_address_by_quic_server_name() {
        let svc = |name: &str, keys: &str, udp: &str| {
            format!("  - {{name: {name}, protocol: udp, listen: 127.0.0.1:4433, {keys} udp: {{{udp}}}, backends: [{{address: 127.0.0.1:9001}}]}}\n")
        };
        let three = format!(
            "services:\n{}{}{}",
            svc("a", "sni: [a.test],", ""),
            svc("b", "sni: ['*.b.test'], alpn: [h3],", ""),
            svc("other", "", "quic: true"),
        );
        let c = crate::config::Config::from_yaml(&three).expect("routed by SNI");
        assert!(
            c.services.iter().all(|s| s.udp_settings().quic),
            "sni implies quic"
        );
        let same = format!(
            "services:\n{}{}",
            svc("a", "sni: [a.test],", ""),
            svc("b", "sni: [a.test],", "")
        );
        assert!(
            problem(&same).contains("services[1].sni"),
            "{}",
            problem(&same)
        );
        let per_packet = format!(
            "services:\n{}{}",
            svc("a", "sni: [a.test],", ""),
            svc("b", "", "per_packet: true")
        );
        assert!(
            problem(&per_packet).contains("services[1].udp.per_packet"),
            "{}",
            problem(&per_packet)
        );
    }
}
