//! The YAML configuration: schema, defaults and one validation pass.
//!
//! Parsing (serde, `deny_unknown_fields`, real types) rejects what is malformed; [`Config::validate`] then
//! rejects what is well-formed but wrong (`validate.rs`). Both name the key path
//! (`services[0].backends[1].weight`) so a user can find the line, and both run before anything is
//! bound. Every key is documented in `docs/configuration.md`.

mod admin;
mod health;
mod listen;
mod replicas;
pub mod secret_file;
mod syslog;
mod tls;
mod validate;

pub use admin::{
    AdminConfig, AdminSettings, Env, ProcessEnv, Secret, TokenSource, MIN_TOKEN_LEN, TOKEN_ENV,
    TOKEN_FILE_ENV,
};

pub use health::{
    AgentConfig, DnsName, DnsType, HealthConfig, HealthKind, Hex, OnDown, Pattern, ProbeStep,
    Rcode, StatusRange, MAX_READ_CAP,
};
pub use listen::{
    overlap as route_overlap, parse_listen_entry, Listen, Protocol, RouteKeys, SniName,
    MAX_LISTEN_ADDRESSES,
};
pub use syslog::{Facility, SyslogAddr};
pub use tls::{BackendTlsConfig, TlsConfig, TlsVersion};

pub use replicas::{
    capability, is_container_name, is_hostname, AutoscaleConfig, AutoscaleMetric, DockerEnv,
    DockerTransport, EngineKeys, HealConfig, MemSize, ReplicaLimits, ReplicasConfig, LABEL_PREFIX,
};

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// Upper bound on a backend weight. Smooth weighted round-robin precomputes one period of its schedule
/// (the sum of the weights), so the bound keeps that table small; HAProxy caps weights at 256.
pub const MAX_WEIGHT: u32 = 1000;

/// A backend's weight: from 1 to [`MAX_WEIGHT`], the rule written here only. The config's validation
/// checks `backends[].weight` with it (so every problem of a file is reported at once), and the admin
/// API's bodies are read as it (`POST /backends`, `PUT /backends/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "u32")]
pub struct Weight(u32);

impl Weight {
    pub const ONE: Weight = Weight(1);

    pub fn new(w: u32) -> Result<Weight, WeightError> {
        if (1..=MAX_WEIGHT).contains(&w) {
            Ok(Weight(w))
        } else {
            Err(WeightError(w))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// `w` brought within the bounds. For weights already validated (a loaded config) and weights
    /// from elsewhere that have their own range (a DNS record's).
    pub fn saturating(w: u32) -> Weight {
        Weight(w.clamp(1, MAX_WEIGHT))
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::ONE
    }
}

impl TryFrom<u32> for Weight {
    type Error = WeightError;

    fn try_from(w: u32) -> Result<Weight, WeightError> {
        Weight::new(w)
    }
}

/// A weight out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be from 1 to {MAX_WEIGHT}, got {0}")]
pub struct WeightError(u32);

/// The largest config file read: far beyond any real one, small enough that parsing it is cheap.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// The deepest nesting (block indentation and flow brackets together) a config may have: the schema
/// needs about six levels.
pub const MAX_CONFIG_DEPTH: usize = 64;

/// Refuses a text too large or too deeply nested before the YAML parser sees it (the parser builds
/// every event of a document in memory first).
fn check_shape(text: &str) -> Result<(), ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse(format!(
            "the config is larger than {MAX_CONFIG_BYTES} bytes"
        )));
    }
    let depth = nesting(text);
    if depth > MAX_CONFIG_DEPTH {
        return Err(ConfigError::Parse(format!(
            "the config nests deeper than {MAX_CONFIG_DEPTH} levels"
        )));
    }
    Ok(())
}

/// The deepest nesting in `text`, counted roughly: block levels by indentation (and `- ` items),
/// plus flow brackets outside quotes and comments. Exact enough to refuse what no config needs.
fn nesting(text: &str) -> usize {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut deepest = 0;
    for line in text.lines() {
        let body = line.trim_start_matches(' ');
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            let mut col = line.len() - body.len();
            let mut rest = body;
            indents.retain(|&i| i < col);
            indents.push(col);
            while let Some(r) = rest.strip_prefix("- ") {
                let r2 = r.trim_start_matches(' ');
                col += rest.len() - r2.len();
                rest = r2;
                indents.push(col);
            }
        }
        let (mut quote, mut prev) = (None, ' ');
        for c in body.chars() {
            match (quote, c) {
                (Some(q), c) if c == q && !(q == '"' && prev == '\\') => quote = None,
                (Some(_), _) => {}
                (None, '#') if prev == ' ' => break,
                (None, '\'' | '"') => quote = Some(c),
                (None, '[' | '{') => {
                    flow += 1;
                    deepest = deepest.max(indents.len() + flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        deepest = deepest.max(indents.len() + flow);
    }
    deepest
}

/// Upper bound on `discovery.max_records`: backends one DNS name may bring, whatever it answers.
pub const MAX_DNS_RECORDS: u32 = 10_000;

/// Everything wrong with a config file, each problem with the key path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The message carries the cause (not also a `source`, printed twice by a reporter).
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One validation problem: the key path and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A duration written as `500ms`, `2s`, `1m`, `1h` (a decimal number and a unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl std::str::FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid duration {s:?}: expected a number and a unit (ms, s, m, h), like 500ms or 2s")
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, unit) = t.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let scale = match unit.trim() {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let secs = n * scale;
        if !secs.is_finite() || secs > 365.0 * 86400.0 {
            return Err(format!("invalid duration {s:?}: longer than a year"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Where a backend lives: a literal socket address, a DNS name and port (one backend per record), an
/// SRV name (its records give hosts, ports, weights and priorities), or the Docker containers that
/// carry some labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddress {
    Ip(SocketAddr),
    Name {
        host: String,
        port: u16,
    },
    /// `srv: _db._tcp.service.consul`.
    Srv {
        name: String,
    },
    /// `docker: {labels, port, network}`.
    Docker(DockerSelector),
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddress::Ip(a) => write!(f, "{a}"),
            BackendAddress::Name { host, port } => write!(f, "{host}:{port}"),
            BackendAddress::Srv { name } => write!(f, "srv:{name}"),
            BackendAddress::Docker(d) => write!(f, "{d}"),
        }
    }
}

/// The Docker containers that are backends of a service: those carrying every label of `labels`,
/// at their address on `network` (the first they are on, if absent) and `port` (unless a container's
/// `sluicegate.port` label says another).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSelector {
    pub labels: std::collections::BTreeMap<String, String>,
    pub port: u16,
    #[serde(default)]
    pub network: Option<String>,
    /// The Engine's endpoint, as `replicas.docker` (absent: `DOCKER_HOST`, else the local socket).
    #[serde(default)]
    pub docker: Option<String>,
    /// TLS certificates for a TCP endpoint, as `replicas.docker_cert_path`.
    #[serde(default)]
    pub docker_cert_path: Option<std::path::PathBuf>,
    /// Allows plaintext TCP to an Engine beyond loopback, as `replicas.docker_insecure`.
    #[serde(default)]
    pub docker_insecure: bool,
}

impl DockerSelector {
    /// Its labels as `k=v,...` (in key order): its identity as a backend source.
    pub fn labels_text(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.join(",")
    }

    /// The Engine endpoint and how to reach it, by the rules of `replicas.docker`
    /// ([`EngineKeys::transport`]); the error is the reason, for `docker.docker`.
    pub fn docker_transport(&self, env: &DockerEnv) -> Result<DockerTransport, String> {
        EngineKeys {
            docker: self.docker.as_deref(),
            cert_path: self.docker_cert_path.as_deref(),
            insecure: self.docker_insecure,
            section: "docker",
        }
        .transport(env)
    }
}

impl fmt::Display for DockerSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker:{}:{}", self.labels_text(), self.port)
    }
}

/// An SRV name: the DNS name of SRV records (`_service._proto.name`).
pub fn srv_name_problem(name: &str) -> Option<String> {
    let labels: Vec<&str> = name.trim_end_matches('.').split('.').collect();
    let ok = labels.len() >= 3
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    (!ok).then(|| format!("{name:?} is not an SRV name (_service._proto.domain)"))
}

impl std::str::FromStr for BackendAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(BackendAddress::Ip(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(format!("{s:?}: port must be a number from 1 to 65535"));
        }
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            return Err(format!("{s:?} is not a valid socket address"));
        }
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !valid_name {
            return Err(format!(
                "{s:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(BackendAddress::Name {
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for BackendAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin HTTP API; absent = disabled.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub resolver: ResolverConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub upgrade: UpgradeConfig,
    /// Client connections open at once over every service; absent = only the per-service caps.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Private key and token files other users may read or write are used (with a warning)
    /// instead of refused.
    #[serde(default)]
    pub allow_readable_keys: bool,
    /// Limits for every service without a `limits` of its own; its `deny` and `max_denied` are
    /// the process's runtime deny list.
    #[serde(default)]
    pub limits: LimitsConfig,
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub level: LogLevel,
    /// Directives in `RUST_LOG` syntax (`warn,sluicegate::pool=debug`) over `level`; the environment
    /// variable `SLUICEGATE_LOG` overrides both.
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub format: LogFormat,
    /// Log to this file, rotated daily (`FILE.YYYY-MM-DD`), instead of stdout.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Rotated files kept per log file (the oldest are deleted).
    #[serde(default = "default_keep")]
    pub keep: u32,
    /// The routing log: where it goes (with the application log when absent, `stdout`, `off`, or a
    /// file), and which lines besides the end's.
    #[serde(default)]
    pub access: AccessLogConfig,
    /// Lines each stream may queue for its writer; beyond, lines are dropped (and counted) rather
    /// than making a connection wait.
    #[serde(default = "default_buffer_lines")]
    pub buffer_lines: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::default(),
            filter: None,
            format: LogFormat::default(),
            file: None,
            keep: default_keep(),
            access: AccessLogConfig::default(),
            buffer_lines: default_buffer_lines(),
        }
    }
}

fn default_keep() -> u32 {
    7
}

fn default_buffer_lines() -> u32 {
    8192
}

/// The routing log's destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// With the application log, under its level and filter.
    #[default]
    WithApplication,
    Stdout,
    Off,
    /// A file of its own, rotated daily like `log.file`.
    File(PathBuf),
}

impl AccessLog {
    fn parse<E: de::Error>(to: Option<&str>) -> Result<AccessLog, E> {
        Ok(match to {
            None => AccessLog::WithApplication,
            Some("stdout") => AccessLog::Stdout,
            Some("off") => AccessLog::Off,
            Some("") => return Err(E::custom("expected stdout, off or a file path")),
            Some(path) => AccessLog::File(PathBuf::from(path)),
        })
    }
}

/// `log.access`: a destination (`stdout`, `off`, a path: the string form), or a mapping with the
/// destination as `to`, the lines written besides each connection's end, and a syslog collector
/// that gets every line too.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessLogConfig {
    pub to: AccessLog,
    /// A line when a connection's backend connection is made (`event: "connect"`).
    pub on_connect: bool,
    /// A line per open connection at this period (`event: "progress"`, bytes so far).
    pub every: Option<Dur>,
    /// A syslog collector each routing line is also sent to, beside `to`.
    pub syslog: Option<SyslogAddr>,
    /// The facility of those messages (`local0` when absent).
    pub syslog_facility: Option<Facility>,
}

/// `log.access` written as a mapping.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessLogMapping {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    on_connect: bool,
    #[serde(default)]
    every: Option<Dur>,
    #[serde(default)]
    syslog: Option<SyslogAddr>,
    #[serde(default)]
    syslog_facility: Option<Facility>,
}

impl<'de> Deserialize<'de> for AccessLogConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> de::Visitor<'de> for Visit {
            type Value = AccessLogConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "stdout, off, a file path, or a mapping {to, on_connect, every, syslog, syslog_facility}",
                )
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<AccessLogConfig, E> {
                Ok(AccessLogConfig {
                    to: AccessLog::parse(Some(s))?,
                    ..AccessLogConfig::default()
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<AccessLogConfig, E> {
                Ok(AccessLogConfig::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<AccessLogConfig, E> {
                Ok(AccessLogConfig::default())
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<AccessLogConfig, A::Error> {
                let m = AccessLogMapping::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(AccessLogConfig {
                    to: AccessLog::parse(m.to.as_deref())?,
                    on_connect: m.on_connect,
                    every: m.every,
                    syslog: m.syslog,
                    syslog_facility: m.syslog_facility,
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// `ip:port` name servers; empty means the system's `/etc/resolv.conf`.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    #[serde(default = "default_resolver_timeout")]
    pub timeout: Dur,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: default_resolver_timeout(),
        }
    }
}

fn default_resolver_timeout() -> Dur {
    Dur::secs(1)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// From the stop signal to the forced close of every remaining connection (includes `delay`).
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// Keep accepting this long after the signal, so a load balancer in front can notice first.
    #[serde(default)]
    pub delay: Dur,
}

/// Replacing the binary in place (SIGUSR2, `sluicegate upgrade`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// How long the old process waits for the new one to be ready, and then for its connections to
    /// be carried over; what could not be carried then drains as on a stop (`shutdown`).
    #[serde(default = "default_upgrade_timeout")]
    pub timeout: Dur,
}

fn default_upgrade_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            timeout: default_upgrade_timeout(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: default_drain_timeout(),
            delay: Dur::default(),
        }
    }
}

fn default_drain_timeout() -> Dur {
    Dur::secs(30)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    LeastConn,
    RoundRobin,
    WeightedRoundRobin,
    P2c,
    SourceHash,
}

impl RelayMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            RelayMode::Auto => "auto",
            RelayMode::Epoll => "epoll",
            RelayMode::Splice => "splice",
            RelayMode::Copy => "copy",
            RelayMode::Ring => "ring",
        }
    }
}

impl RelayMode {
    const ALL: [RelayMode; 5] = [
        RelayMode::Auto,
        RelayMode::Epoll,
        RelayMode::Splice,
        RelayMode::Copy,
        RelayMode::Ring,
    ];
}

/// `relay: uring` was an io_uring engine on tokio's workers beside the ring workers; it was
/// retired, and the value is refused with an error that names what replaces it rather than mapped:
/// a config that keeps loading while it means something else hides the change, and an upgrade
/// whose new process refuses the config leaves the old one serving.
impl<'de> Deserialize<'de> for RelayMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RelayMode, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(mode) = RelayMode::ALL.into_iter().find(|m| m.as_str() == s) {
            return Ok(mode);
        }
        if s == "uring" {
            return Err(serde::de::Error::custom(
                "`uring` was retired: io_uring now runs as the ring workers: write `ring` \
                 (plain TCP on an address of its own) or `auto` (the ring where it can serve the \
                 service, epoll elsewhere)",
            ));
        }
        Err(serde::de::Error::custom(format!(
            "unknown relay engine `{s}`: expected one of auto, epoll, splice, copy, ring"
        )))
    }
}

impl Policy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::LeastConn => "least_conn",
            Policy::RoundRobin => "round_robin",
            Policy::WeightedRoundRobin => "weighted_round_robin",
            Policy::P2c => "p2c",
            Policy::SourceHash => "source_hash",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// The ring where it can serve the service (io_uring available; plain TCP, no `sni` or `alpn`,
    /// on addresses no other service shares), `epoll` elsewhere: resolved when the service starts
    /// (`relay::engine_for`), so a running service reports the engine it runs.
    #[default]
    Auto,
    /// Copy small exchanges, switch a direction to splice once it moves bulk data; on tokio's
    /// epoll reactor, everywhere.
    Epoll,
    Splice,
    Copy,
    /// Ring workers (Linux 6.1+): accept, connect, relay and close on one io_uring loop per core,
    /// outside tokio's reactor. Plain TCP on an address of its own for now: no `tls`,
    /// `backend_tls`, `sni` or `alpn`.
    Ring,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Written `address:`, `srv:` or `docker:` (exactly one).
    pub address: BackendAddress,
    /// Checked by validation ([`Weight::new`]), not here, so the file's other problems are reported too.
    pub weight: u32,
    /// Connections open at once to each address of this entry; a full backend is skipped.
    pub max_connections: Option<u32>,
    /// Its tier: lower first. `backup: true` is priority 1 over the default 0.
    pub priority: u32,
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            address: Option<BackendAddress>,
            #[serde(default)]
            srv: Option<String>,
            #[serde(default)]
            docker: Option<DockerSelector>,
            #[serde(default)]
            weight: Option<u32>,
            #[serde(default)]
            max_connections: Option<u32>,
            #[serde(default)]
            backup: bool,
            #[serde(default)]
            priority: Option<u32>,
        }
        let r = Raw::deserialize(d)?;
        if r.srv.is_some() && r.weight.is_some() {
            return Err(de::Error::custom(
                "an srv backend's weights come from its SRV records: no weight here",
            ));
        }
        let address = match (r.address, r.srv, r.docker) {
            (Some(a), None, None) => a,
            (None, Some(name), None) => match srv_name_problem(&name) {
                Some(why) => return Err(de::Error::custom(why)),
                None => BackendAddress::Srv {
                    name: name.trim_end_matches('.').to_ascii_lowercase(),
                },
            },
            (None, None, Some(sel)) => BackendAddress::Docker(sel),
            _ => {
                return Err(de::Error::custom(
                    "a backend is exactly one of address, srv or docker",
                ))
            }
        };
        let priority = match (r.backup, r.priority) {
            (true, Some(_)) => {
                return Err(de::Error::custom(
                    "backup and priority together: backup: true is priority: 1",
                ))
            }
            (true, None) => 1,
            (false, p) => p.unwrap_or(0),
        };
        Ok(BackendConfig {
            address,
            weight: r.weight.unwrap_or(1),
            max_connections: r.max_connections,
            priority,
        })
    }
}

/// When traffic goes back to a better tier that has recovered (`failback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Failback {
    /// At once.
    #[default]
    Immediate,
    /// Not until an operator says (`POST /services/NAME/failback`).
    Never,
    /// Once the better tier has been eligible this long.
    After(Dur),
}

impl Failback {
    pub fn as_str(&self) -> String {
        match self {
            Failback::Immediate => "immediate".into(),
            Failback::Never => "never".into(),
            Failback::After(d) => format!("after {d}"),
        }
    }
}

impl<'de> Deserialize<'de> for Failback {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `expecting` words the error of a value of neither form; an error raised while reading
        // the value (the parser's repetition limit on an alias bomb) comes through as it is.
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "expected immediate, never, or {after: DURATION}"
        )]
        enum Raw {
            Word(String),
            After { after: Dur },
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "immediate" => Ok(Failback::Immediate),
            Raw::Word(w) if w == "never" => Ok(Failback::Never),
            Raw::Word(w) => Err(de::Error::custom(format!(
                "{w:?}: expected immediate, never, or {{after: DURATION}}"
            ))),
            Raw::After { after } => Ok(Failback::After(after)),
        }
    }
}

/// An address block written `10.0.0.0/8`, `2001:db8::/32`, or a single address (`192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client reached over an IPv6 socket arrives as ::ffff:a.b.c.d.
        self.0.contains(&ip) || ip_v4_mapped(ip).is_some_and(|v4| self.0.contains(&v4))
    }
}

/// `a.b.c.d` for `::ffff:a.b.c.d`.
pub fn ip_v4_mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Cidr(ipnet::IpNet::from(ip)));
        }
        let net: ipnet::IpNet = t.parse().map_err(|_| {
            format!("{s:?} is not an address block: write 10.0.0.0/8, 2001:db8::/32 or one address")
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{s:?} has host bits set: did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The PROXY protocol version sent to backends (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `accept_proxy`: read a PROXY header (v1 or v2) from these sources and take its client address.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptProxyConfig {
    /// Only these may connect, and each must send a header.
    pub from: Vec<Cidr>,
    /// The whole header must arrive within this.
    #[serde(default = "default_proxy_timeout")]
    pub timeout: Dur,
    /// Allow a `/0` in `from`: every peer may name any client address. Only for a port no client can
    /// reach except through balancers.
    #[serde(default)]
    pub trust_any: bool,
}

fn default_proxy_timeout() -> Dur {
    Dur::secs(3)
}

/// `limits`: who may connect, and how much one client address may take.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once from one client address.
    #[serde(default)]
    pub per_source_connections: Option<u32>,
    /// New connections per second from one client address (a token bucket, a second's worth deep).
    #[serde(default)]
    pub per_source_rate: Option<u32>,
    /// Only these client addresses may connect (absent or empty: any).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// These may not, whatever `allow` says. At the top level, the runtime deny list's `config`
    /// entries: refused by every service.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// A source refused by a per-source limit this often is refused at accept for a while.
    #[serde(default)]
    pub ban: Option<BanConfig>,
    /// Entries the runtime deny list holds at most (top level only: the list is the process's).
    #[serde(default)]
    pub max_denied: Option<u32>,
}

/// `limits.ban`: `after` per-source refusals `within` a window ban the source `for` a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanConfig {
    pub after: u32,
    pub within: Dur,
    #[serde(rename = "for")]
    pub for_: Dur,
}

/// `limits.max_denied` when absent.
pub const DEFAULT_MAX_DENIED: u32 = 100_000;

impl LimitsConfig {
    pub fn is_empty(&self) -> bool {
        *self == LimitsConfig::default()
    }
}

/// `queue`: when every backend is at its `max_connections`, wait this long for a free one.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Connections waiting at once; more are refused at once.
    pub max: u32,
    pub timeout: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnRemoved {
    Keep,
    #[default]
    Drain,
    Close,
}

impl OnRemoved {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnRemoved::Keep => "keep",
            OnRemoved::Drain => "drain",
            OnRemoved::Close => "close",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Re-resolution period of every DNS name of the service (jittered by ±10 %).
    #[serde(default = "default_refresh")]
    pub refresh: Dur,
    /// What happens to the sessions of a backend that left DNS.
    #[serde(default)]
    pub on_removed: OnRemoved,
    /// With `on_removed: drain`: how long those sessions may still run before they are closed.
    #[serde(default = "default_removed_drain")]
    pub drain_timeout: Dur,
    /// Consecutive NXDOMAIN / no-record answers before a name's backends are removed (a timeout or
    /// SERVFAIL never removes anything).
    #[serde(default = "default_empty_after")]
    pub empty_after: u32,
    /// Records of one answer that become backends; a larger answer is cut to the lowest addresses
    /// (so balancer replicas agree), with a warning and a count.
    #[serde(default = "default_max_records")]
    pub max_records: u32,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh: default_refresh(),
            on_removed: OnRemoved::default(),
            drain_timeout: default_removed_drain(),
            empty_after: default_empty_after(),
            max_records: default_max_records(),
        }
    }
}

fn default_removed_drain() -> Dur {
    Dur::secs(30)
}
fn default_empty_after() -> u32 {
    3
}
fn default_max_records() -> u32 {
    1000
}

fn default_refresh() -> Dur {
    Dur::secs(2)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveConfig {
    /// Consecutive connect failures that eject a backend; 0 disables passive ejection.
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// How long an ejected backend gets no new connections.
    #[serde(default = "default_cooldown")]
    pub cooldown: Dur,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            max_fails: default_max_fails(),
            cooldown: default_cooldown(),
        }
    }
}

fn default_max_fails() -> u32 {
    3
}
fn default_cooldown() -> Dur {
    Dur::secs(10)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// `tcp` (streams) or `udp` (datagrams, in sessions: the `udp` block).
    #[serde(default)]
    pub protocol: Transport,
    /// How a `protocol: udp` service keeps its sessions.
    #[serde(default)]
    pub udp: Option<UdpConfig>,
    /// One address, or several and port ranges; services may share one with `sni`/`alpn`.
    pub listen: Listen,
    /// The server names (TLS SNI) this service answers for on a shared address; none: any.
    #[serde(default)]
    pub sni: Vec<SniName>,
    /// The ALPN protocols that narrow this service's route; none: any.
    #[serde(default)]
    pub alpn: Vec<Protocol>,
    /// How long a client on a routed address may take to send its whole ClientHello.
    #[serde(default = "default_client_hello_timeout")]
    pub client_hello_timeout: Dur,
    /// On a routed address, how many connections may wait for their route at once (their PROXY
    /// header, their ClientHello); beyond, a new one is closed at once.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// `same`: connect to each backend at the port the client reached (port ranges).
    #[serde(default)]
    pub backend_port: BackendPort,
    /// Terminate the clients' TLS.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Connect to the backends over TLS.
    #[serde(default)]
    pub backend_tls: Option<BackendTlsConfig>,
    /// An agent on each backend's host that reports its state and weight.
    #[serde(default)]
    pub agent: Option<AgentConfig>,
    /// Spread over every backend of a backup tier instead of its first.
    #[serde(default)]
    pub all_backups: bool,
    /// When traffic returns to a better tier that recovered.
    #[serde(default)]
    pub failback: Failback,
    #[serde(default)]
    pub balance: Policy,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub passive: PassiveConfig,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: u32,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default = "default_idle_timeout")]
    pub half_close_timeout: Dur,
    /// How long a destination may take no byte while bytes wait for it (`relay: ring`).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Dur,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default)]
    pub slow_start: Dur,
    #[serde(default)]
    pub relay: RelayMode,
    /// Backend containers sluicegate starts, removes and heals itself.
    #[serde(default)]
    pub replicas: Option<ReplicasConfig>,
    /// Scaling those replicas with the load.
    #[serde(default)]
    pub autoscale: Option<AutoscaleConfig>,
    /// Send a PROXY protocol header to backends.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyVersion>,
    /// Read a PROXY protocol header from balancers in front.
    #[serde(default)]
    pub accept_proxy: Option<AcceptProxyConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Wait for a backend below its `max_connections` instead of refusing at once.
    #[serde(default)]
    pub queue: Option<QueueConfig>,
    /// TCP keepalive on the client's socket: a client gone behind a NAT or a cut link is found
    /// dead instead of holding its backend until `idle_timeout`.
    #[serde(default)]
    pub keepalive: Option<KeepaliveConfig>,
    /// TCP keepalive on the backend's socket.
    #[serde(default)]
    pub backend_keepalive: Option<KeepaliveConfig>,
    /// TCP_USER_TIMEOUT on both sockets: how long sent bytes (or keepalive probes) may go
    /// unacknowledged before the kernel gives the peer up.
    #[serde(default)]
    pub user_timeout: Option<Dur>,
    /// Close a client that has sent nothing this long after it was accepted (never for protocols
    /// where the server speaks first).
    #[serde(default)]
    pub first_byte_timeout: Option<Dur>,
}

/// `keepalive:` and `backend_keepalive:`: when the kernel probes a silent peer, and how many
/// unanswered probes find it dead (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Silence before the first probe.
    #[serde(default = "default_keepalive_idle")]
    pub idle: Dur,
    /// Between probes.
    #[serde(default = "default_keepalive_interval")]
    pub interval: Dur,
    /// Probes unanswered before the peer is dead.
    #[serde(default = "default_keepalive_count")]
    pub count: u32,
}

/// Below the 300 to 350 s after which NAT gateways and cloud balancers forget an idle flow.
fn default_keepalive_idle() -> Dur {
    Dur::secs(60)
}
fn default_keepalive_interval() -> Dur {
    Dur::secs(10)
}
fn default_keepalive_count() -> u32 {
    6
}

/// What a service carries: byte streams or datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

/// `udp:` on a `protocol: udp` service: how long its sessions live and how many it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    /// A session with no datagram either way for this long ends.
    #[serde(default = "default_udp_idle_timeout")]
    pub idle_timeout: Dur,
    /// Datagrams expected from the backend per client datagram (nginx's `proxy_responses`): the
    /// session ends once every client datagram has had them. None: no limit.
    #[serde(default)]
    pub responses: Option<u32>,
    /// Client datagrams a session takes (nginx's `proxy_requests`); the next starts a new one.
    #[serde(default)]
    pub requests: Option<u32>,
    /// Sessions open at once on one listen address; when full, the one idle longest is ended.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// No sessions: every datagram balanced on its own, no reply expected.
    #[serde(default)]
    pub per_packet: bool,
    /// Larger datagrams, either way, are dropped and counted.
    #[serde(default = "default_max_datagram")]
    pub max_datagram: u32,
    /// The datagrams are QUIC: a session follows its connection's IDs, so a client whose address
    /// changes (NAT rebinding) stays on its backend. Implied by `sni` or `alpn`.
    #[serde(default)]
    pub quic: bool,
}

/// The largest UDP payload over IPv4 (65,535 less the IP and UDP headers).
pub const MAX_UDP_PAYLOAD: u32 = 65_507;

fn default_udp_idle_timeout() -> Dur {
    Dur::secs(30)
}

fn default_max_sessions() -> u32 {
    65_536
}

fn default_max_datagram() -> u32 {
    MAX_UDP_PAYLOAD
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            idle_timeout: default_udp_idle_timeout(),
            responses: None,
            requests: None,
            max_sessions: default_max_sessions(),
            per_packet: false,
            max_datagram: default_max_datagram(),
            quic: false,
        }
    }
}

/// Which port a connection goes to on its backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendPort {
    /// The backend's own (`backends[].address`).
    #[default]
    Configured,
    /// The port the client reached on the balancer (FTP passive ranges, TURN): the backend's
    /// configured port is then only where it is probed.
    Same,
}

impl ServiceConfig {
    /// Its `udp` settings (the defaults without the block); meaningful on a `protocol: udp` service.
    pub fn udp_settings(&self) -> UdpConfig {
        let mut u = self.udp.unwrap_or_default();
        // Routes by server name or protocol are read from QUIC Initials.
        u.quic |= !self.sni.is_empty() || !self.alpn.is_empty();
        u
    }

    /// What this service answers for on a shared address.
    pub fn route_keys(&self) -> RouteKeys {
        RouteKeys {
            sni: self.sni.clone(),
            alpn: self.alpn.clone(),
        }
    }

    /// Whether the ring workers can serve this service, `alone` saying whether it has its listen
    /// addresses to itself ([`Config::alone`]): plain TCP with no route keys, since they read no
    /// hello and neither terminate nor originate TLS. `relay: auto` runs such a service on the ring.
    pub fn fits_ring(&self, alone: bool) -> bool {
        alone
            && self.protocol == Transport::Tcp
            && self.tls.is_none()
            && self.backend_tls.is_none()
            && self.route_keys().is_default()
    }
}

fn default_client_hello_timeout() -> Dur {
    Dur::secs(5)
}

/// The default of `max_pending`: room for a burst of new clients, and a bound a flood of idle
/// connections reaches long before the descriptor limit.
pub const DEFAULT_MAX_PENDING: u32 = 1024;

fn default_max_pending() -> u32 {
    DEFAULT_MAX_PENDING
}

fn default_connect_timeout() -> Dur {
    Dur::secs(2)
}
fn default_connect_attempts() -> u32 {
    2
}
fn default_idle_timeout() -> Dur {
    Dur::secs(3600)
}
fn default_stall_timeout() -> Dur {
    Dur::secs(300)
}
fn default_max_connections() -> u32 {
    10_000
}

impl Config {
    /// For each service, in order, whether it has its listen addresses to itself: no other service
    /// names one of them (`port: 0` is never shared: each binds its own).
    pub fn alone(&self) -> Vec<bool> {
        let shared = listen::shared_addresses(self.tcp_listens());
        let mut alone = vec![true; self.services.len()];
        for &i in shared.values().flatten() {
            alone[i] = false;
        }
        alone
    }

    /// The listen addresses of the TCP services, by service index: a UDP socket on the same
    /// address is another socket, shared with no TCP service.
    pub(crate) fn tcp_listens(&self) -> impl Iterator<Item = (usize, &Listen)> {
        self.listens(Transport::Tcp)
    }

    /// The listen lists of the services of one transport, with their index.
    pub(crate) fn listens(&self, t: Transport) -> impl Iterator<Item = (usize, &Listen)> {
        self.services
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.protocol == t)
            .map(|(i, s)| (i, &s.listen))
    }

    /// Gives every service without a `limits` of its own the top-level one (validated first, so a
    /// problem is named where it was written). `max_denied` is the process's, not a service's.
    fn inherit_limits(&mut self) {
        let mut top = self.limits.clone();
        top.max_denied = None;
        for s in &mut self.services {
            if s.limits.is_empty() {
                s.limits = top.clone();
            }
        }
    }

    /// `limits.max_denied`, or its default.
    pub(crate) fn max_denied(&self) -> usize {
        self.limits.max_denied.unwrap_or(DEFAULT_MAX_DENIED) as usize
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        // Read at most one byte past the limit: a huge file is refused without being read whole
        // (as bytes: the cut may fall inside a UTF-8 character, which is not the file's fault).
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_CONFIG_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse(format!(
                "the config is larger than {MAX_CONFIG_BYTES} bytes"
            )));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text (at byte {})", e.utf8_error().valid_up_to()),
            ))
        })?;
        Config::from_yaml(&text)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        check_shape(text)?;
        // serde_path_to_error names the full key path even for errors raised inside a field's own
        // deserializer (a bad duration), where the YAML error stops at the enclosing mapping.
        let de = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            // A syntax error inside a collection ends the path in `.?` (an unknown element): drop it.
            let full = e.path().to_string();
            let path = full.trim_end_matches(".?").to_string();
            let inner = e.into_inner().to_string();
            // The YAML error may carry its own, shorter path prefix: keep only the full one.
            let reason = match inner.split_once(": ") {
                Some((prefix, rest)) if path.starts_with(prefix) => rest.to_string(),
                _ => inner,
            };
            if path.is_empty() || path == "." {
                ConfigError::Parse(reason)
            } else {
                ConfigError::Parse(format!("{path}: {reason}"))
            }
        })?;
        let mut problems = config.validate();
        problems.extend(validate::tcp_keys_on_udp(text, &config));
        let mut config = config;
        config.inherit_limits();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The admin API's settings with its token read from wherever it is (the environment, a file, the
    /// config); `None` without an `admin` section. Reads files: called at start and on reload, not by
    /// [`Config::from_yaml`].
    pub fn admin_settings(&self, env: &dyn Env) -> Result<Option<AdminSettings>, ConfigError> {
        self.admin
            .as_ref()
            .map(|a| a.resolve(env, self.allow_readable_keys))
            .transpose()
            .map_err(ConfigError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_service(extra: &str) -> String {
        format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    backends:\n      - address: 127.0.0.1:9001\n{extra}"
        )
    }

    #[test]
    fn log_access_is_a_destination_or_a_mapping() {
        let access = |v: &str| {
            Config::from_yaml(&format!("log: {{access: {v}}}\n{}", one_service("")))
                .map(|c| c.log.access)
        };
        assert_eq!(access("stdout").unwrap().to, AccessLog::Stdout);
        assert_eq!(access("off").unwrap().to, AccessLog::Off);
        let m = access("{on_connect: true, every: 5m}").unwrap();
        assert_eq!(
            m.to,
            AccessLog::WithApplication,
            "no `to`: where it goes today"
        );
        assert!(m.on_connect);
        assert_eq!(m.every, Some(Dur::secs(300)));
        let m = access("{to: /var/log/route.log}").unwrap();
        assert_eq!(m.to, AccessLog::File(PathBuf::from("/var/log/route.log")));
        let e = access("{to: stdout, colour: red}").unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e = access("{every: 100ms}").unwrap_err().to_string();
        assert!(e.contains("log.access.every"), "{e}");
    }

    #[test]
    fn log_access_syslog_is_a_collector_and_a_bad_one_is_named() {
        let access = |v: &str| {
            Config::from_yaml(&format!("log: {{access: {v}}}\n{}", one_service("")))
                .map(|c| c.log.access)
        };
        let m =
            access("{to: off, syslog: \"udp://127.0.0.1:514\", syslog_facility: daemon}").unwrap();
        assert_eq!(m.to, AccessLog::Off);
        assert_eq!(
            m.syslog,
            Some(SyslogAddr::Udp {
                host: "127.0.0.1".into(),
                port: 514
            })
        );
        assert_eq!(m.syslog_facility, Some(Facility::Daemon));
        let m = access("{syslog: \"unix:/dev/log\"}").unwrap();
        assert_eq!(m.to, AccessLog::WithApplication, "beside `to`, as absent");
        for (bad, key, says) in [
            (
                "{syslog: \"udp://logs\"}",
                "log.access.syslog:",
                "not host:port",
            ),
            (
                "{syslog: \"syslog:514\"}",
                "log.access.syslog:",
                "expected udp://HOST:PORT",
            ),
            (
                "{syslog: \"tcp://l:514\", syslog_facility: local9}",
                "log.access.syslog_facility:",
                "local9",
            ),
            (
                "{syslog_facility: local1}",
                "log.access.syslog_facility:",
                "without log.access.syslog",
            ),
            (
                "\"udp://127.0.0.1:514\"",
                "log.access:",
                "give it as log.access.syslog",
            ),
        ] {
            let e = access(bad).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!("500ms".parse::<Dur>().unwrap(), Dur::millis(500));
        assert_eq!("2s".parse::<Dur>().unwrap(), Dur::secs(2));
        assert_eq!("1m".parse::<Dur>().unwrap(), Dur::secs(60));
        assert_eq!("1h".parse::<Dur>().unwrap(), Dur::secs(3600));
        assert_eq!("1.5s".parse::<Dur>().unwrap(), Dur::millis(1500));
        for bad in ["", "5", "s", "5 sec", "-1s", "1d"] {
            assert!(bad.parse::<Dur>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::from_yaml(&one_service("")).unwrap();
        let s = &c.services[0];
        assert_eq!(s.balance, Policy::LeastConn);
        assert_eq!(s.connect_timeout, Dur::secs(2));
        assert_eq!(s.connect_attempts, 2);
        assert_eq!(s.passive.max_fails, 3);
        assert_eq!(s.passive.cooldown, Dur::secs(10));
        assert_eq!(s.idle_timeout, Dur::secs(3600));
        assert_eq!(s.stall_timeout, Dur::secs(300));
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.relay, RelayMode::Auto);
        assert_eq!(s.backends[0].weight, 1);
        assert_eq!(c.shutdown.drain_timeout, Dur::secs(30));
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.admin.is_none(), "no admin section, no admin API");
        let a = Config::from_yaml(&format!("admin: {{}}\n{}", one_service(""))).unwrap();
        assert_eq!(
            a.admin.unwrap().listen,
            "127.0.0.1:9901".parse().unwrap(),
            "not 9090, Prometheus's own port"
        );
    }

    #[test]
    fn backend_addresses_distinguish_ips_and_names() {
        assert!(matches!("127.0.0.1:80".parse(), Ok(BackendAddress::Ip(_))));
        assert!(matches!("[::1]:80".parse(), Ok(BackendAddress::Ip(_))));
        assert!(matches!(
            "backend:5000".parse(),
            Ok(BackendAddress::Name { .. })
        ));
        assert!("backend:99999".parse::<BackendAddress>().is_err());
        assert!("backend".parse::<BackendAddress>().is_err());
        assert!("1.2.3.4:x".parse::<BackendAddress>().is_err());
        assert!("bad host:80".parse::<BackendAddress>().is_err());
    }

    #[test]
    fn weights_are_one_to_the_maximum() {
        assert_eq!(Weight::new(0), Err(WeightError(0)));
        assert_eq!(Weight::new(1).map(Weight::get), Ok(1));
        assert_eq!(Weight::new(MAX_WEIGHT).map(Weight::get), Ok(MAX_WEIGHT));
        assert_eq!(
            Weight::new(MAX_WEIGHT + 1).unwrap_err().to_string(),
            format!("must be from 1 to {MAX_WEIGHT}, got {}", MAX_WEIGHT + 1)
        );
        assert!(serde_json::from_str::<Weight>("0").is_err());
        assert_eq!(serde_json::from_str::<Weight>("7").unwrap().get(), 7);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let yaml =
            one_service("        weight: 0\n    connect_attempts: 0\n    health:\n      rise: 0\n");
        let err = Config::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains("services[0].backends[0].weight"), "{err}");
        assert!(err.contains("services[0].connect_attempts"), "{err}");
        assert!(err.contains("services[0].health.rise"), "{err}");
    }

    #[test]
    fn discovery_and_health_defaults() {
        let c = Config::from_yaml(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    discovery: {}\n    health: {kind: http}\n    backends: [{address: backend:5000}]\n",
        )
        .unwrap();
        let s = &c.services[0];
        let d = s.discovery.as_ref().unwrap();
        assert_eq!(d.refresh, Dur::secs(2));
        assert_eq!(d.on_removed, OnRemoved::Drain);
        assert_eq!(d.drain_timeout, Dur::secs(30));
        assert_eq!(d.empty_after, 3);
        assert_eq!(d.max_records, 1000);
        let h = &s.health;
        assert_eq!(
            (h.kind, h.path.as_str(), h.port),
            (HealthKind::Http, "/health", None)
        );
        assert_eq!((h.interval, h.timeout), (Dur::secs(2), Dur::secs(1)));
        assert_eq!((h.rise, h.fall, h.on_down), (2, 3, OnDown::Keep));
        assert_eq!(c.resolver.timeout, Dur::secs(1));
        assert!(matches!(
            &s.backends[0].address,
            BackendAddress::Name { host, port: 5000 } if host == "backend"
        ));
    }

    /// kind udp and dns: their keys are checked as they are read (type and rcode names, the
    /// name's form) and each error names its key; their keys on another kind, a dns check without
    /// a name and a udp check that does not start with a send are errors naming the key.
    #[test]
    fn udp_and_dns_probes_name_their_keys() {
        let health = |h: &str| {
            Config::from_yaml(&format!(
                "services:\n  - name: web\n    protocol: udp\n    listen: 127.0.0.1:0\n    health: {h}\n    backends: [{{address: 127.0.0.1:53}}]\n"
            ))
        };
        let ok = health("{kind: dns, name: example.org, type: aaaa, expect_rcode: NXDOMAIN, expect_answer: true}")
            .unwrap();
        let h = &ok.services[0].health;
        assert_eq!(
            (h.dns_type(), h.expect_rcode(), h.expect_answer()),
            (DnsType::Aaaa, Rcode::NxDomain, true)
        );
        assert_eq!(h.name.as_ref().unwrap().name.to_string(), "example.org.");
        let d = health("{kind: dns, name: example.org}").unwrap();
        let h = &d.services[0].health;
        assert_eq!(
            (h.dns_type(), h.expect_rcode(), h.expect_answer()),
            (DnsType::A, Rcode::NoError, false)
        );
        assert!(health("{kind: udp, steps: [{send: ping}, {expect: pong}]}").is_ok());
        let refused = |h: &str, key: &str, says: &str| {
            let err = health(h).unwrap_err().to_string();
            assert!(
                err.contains(&format!("services[0].health.{key}")) && err.contains(says),
                "{h}: {err}"
            );
        };
        refused(
            "{kind: dns, name: x.org, type: AXFR}",
            "type",
            "one of A, AAAA, CNAME",
        );
        refused(
            "{kind: dns, name: x.org, expect_rcode: OK}",
            "expect_rcode",
            "one of NOERROR",
        );
        refused("{kind: dns, name: \"a b.org\"}", "name", "not a DNS name");
        refused(
            &format!("{{kind: dns, name: {}.org}}", "a".repeat(64)),
            "name",
            "not a DNS name",
        );
        refused("{kind: dns}", "name", "needs a name");
        refused("{kind: tcp, name: x.org}", "name", "goes with kind: dns");
        refused(
            "{kind: udp, steps: [{send: x}], type: A}",
            "type",
            "goes with kind: dns",
        );
        refused(
            "{kind: http, expect_rcode: NOERROR}",
            "expect_rcode",
            "goes with kind: dns",
        );
        refused(
            "{kind: tcp, expect_answer: false}",
            "expect_answer",
            "goes with kind: dns",
        );
        refused("{kind: udp}", "steps", "kind: udp needs steps");
        refused(
            "{kind: udp, steps: [{expect: pong}]}",
            "steps",
            "the first a send",
        );
        refused(
            "{kind: dns, name: x.org, steps: [{send: x}]}",
            "steps",
            "go with kind: tcp or udp",
        );
    }

    /// A value of neither form is told what the field takes; an alias bomb in one, which serde
    /// buffers whole before trying the forms, is refused by the parser's repetition limit, and the
    /// error says so instead of "expected …".
    #[test]
    fn untagged_choices_say_what_they_take_and_keep_the_parsers_errors() {
        let refused = |listen: &str, extra: &str| {
            let y = format!(
                "services:\n  - name: web\n    listen: {listen}\n    backends:\n      - address: 127.0.0.1:9001\n{extra}"
            );
            Config::from_yaml(&y).unwrap_err().to_string()
        };
        let mut bomb = String::from("[&a0 [x, x, x, x, x, x, x, x, x, x]");
        for i in 1..12 {
            let p = i - 1;
            bomb += &format!(", &a{i} [{}]", vec![format!("*a{p}"); 10].join(", "));
        }
        bomb += "]";
        let e = refused("{a: 1}", "");
        assert!(
            e.contains(
                "services[0].listen: expected an address (ip:port or ip:low-high) or a list of them"
            ),
            "{e}"
        );
        let e = refused("127.0.0.1:0", "    failback: 5\n");
        assert!(
            e.contains("services[0].failback: expected immediate, never, or {after: DURATION}"),
            "{e}"
        );
        for (listen, extra) in [
            (bomb.clone(), String::new()),
            ("127.0.0.1:0".to_string(), format!("    failback: {bomb}\n")),
        ] {
            let e = refused(&listen, &extra);
            assert!(e.contains("repetition limit exceeded"), "{e}");
        }
    }

    /// The retired `uring` engine is refused by name with what replaces it, every engine's name
    /// reads back as itself, and an unknown one lists them.
    #[test]
    fn relay_engines_parse_by_name_and_uring_says_it_was_retired() {
        for mode in RelayMode::ALL {
            let c = Config::from_yaml(&one_service(&format!("    relay: {}\n", mode.as_str())));
            assert_eq!(c.unwrap().services[0].relay, mode);
        }
        let e = Config::from_yaml(&one_service("    relay: uring\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("services[0].relay: `uring` was retired") && e.contains("write `ring`"),
            "{e}"
        );
        let e = Config::from_yaml(&one_service("    relay: fast\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "services[0].relay: unknown relay engine `fast`: expected one of auto, epoll"
            ),
            "{e}"
        );
    }

    #[test]
    fn oversized_and_overdeep_files_are_refused_before_parsing() {
        let big = format!("# {}\n{}", "x".repeat(MAX_CONFIG_BYTES), one_service(""));
        let err = Config::from_yaml(&big).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        let deep_flow = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let err = Config::from_yaml(&deep_flow).unwrap_err().to_string();
        assert!(err.contains("nests deeper"), "{err}");
        let deep_block: String = (0..100)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        let err = Config::from_yaml(&deep_block).unwrap_err().to_string();
        assert!(err.contains("nests deeper"), "{err}");
        // Brackets inside quotes and comments are not nesting.
        let quoted = format!(
            "{}    health: {{kind: http, path: \"/{}\"}} # {}\n",
            one_service(""),
            "[".repeat(100),
            "{".repeat(100)
        );
        Config::from_yaml(&quoted).unwrap();
        // A file past the limit whose cut falls inside a UTF-8 character is still "larger than".
        let path = std::env::temp_dir().join(format!("sluicegate-big-{}.yaml", std::process::id()));
        std::fs::write(&path, format!("# {}", "é".repeat(MAX_CONFIG_BYTES / 2 + 1))).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("larger than"), "{err}");
        assert!(nesting(&one_service("")) < 8);
        for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/conf")).unwrap() {
            let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
            assert!(
                nesting(&text) < 16,
                "a shipped config is far below the limit"
            );
        }
    }

    #[test]
    fn an_open_admin_bind_needs_a_token() {
        struct NoEnv;
        impl Env for NoEnv {
            fn var(&self, _: &str) -> Option<String> {
                None
            }
        }
        let open = Config::from_yaml(&format!(
            "admin:\n  listen: 0.0.0.0:9901\n{}",
            one_service("")
        ))
        .unwrap();
        let err = open.admin_settings(&NoEnv).unwrap_err().to_string();
        assert!(err.contains("admin.token: required"), "{err}");
        let guarded = Config::from_yaml(&format!(
            "admin:\n  listen: 0.0.0.0:9901\n  token: s3cret-s3cret-s3cret\n{}",
            one_service("")
        ))
        .unwrap();
        assert!(guarded
            .admin_settings(&NoEnv)
            .unwrap()
            .unwrap()
            .token
            .is_some());
        let local = Config::from_yaml(&format!(
            "admin:\n  listen: 127.0.0.1:9901\n{}",
            one_service("")
        ))
        .unwrap();
        assert!(local
            .admin_settings(&NoEnv)
            .unwrap()
            .unwrap()
            .token
            .is_none());
        let short = Config::from_yaml(&format!(
            "admin:\n  listen: 127.0.0.1:9901\n  token: s3cret\n{}",
            one_service("")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            short.contains("admin.token: must be at least 16"),
            "{short}"
        );
    }
}
