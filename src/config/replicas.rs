//! The `replicas:` and `autoscale:` sections of a service: backend containers sluicegate starts,
//! removes, heals and scales through the Docker Engine.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Dur;

/// Label keys sluicegate puts on the containers it starts; a config may not set them.
pub const LABEL_PREFIX: &str = "io.sluicegate.";

/// Backend containers managed through the Docker Engine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasConfig {
    /// The Engine's endpoint: `unix:///path/docker.sock`, `tcp://host:port` or `https://host:port`.
    /// Absent: `DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    #[serde(default)]
    pub docker: Option<String>,
    /// A directory with `ca.pem`, `cert.pem` and `key.pem`, as the Docker CLI's `DOCKER_CERT_PATH`:
    /// TLS to a TCP endpoint, the Engine verified against `ca.pem`, sluicegate presenting `cert.pem`.
    #[serde(default)]
    pub docker_cert_path: Option<PathBuf>,
    /// Allows plaintext TCP to an Engine that is not on loopback. Whoever is on the path can then run
    /// any container on that host, so it is refused unless asked for.
    #[serde(default)]
    pub docker_insecure: bool,
    /// The image every replica runs (it must be on the Docker host: sluicegate does not pull).
    pub image: String,
    /// The network the replicas join; sluicegate reaches them at their address on it.
    #[serde(default = "default_network")]
    pub network: String,
    /// The port the replicas serve on.
    pub port: u16,
    /// Container names are this prefix and the replica's hostname; default `BALANCER-`.
    #[serde(default)]
    pub name_prefix: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Overrides the image's command.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Extra labels (keys starting with `io.sluicegate.` are sluicegate's own).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_min")]
    pub min: u32,
    #[serde(default = "default_max")]
    pub max: u32,
    /// Replicas to have at start (adopted ones count); default `min`.
    #[serde(default)]
    pub start: Option<u32>,
    /// Whose containers these are: the `io.sluicegate.balancer` label. Balancers that share a Docker
    /// host and a service name must differ here; one balancer restarted keeps it, and so adopts its
    /// containers instead of starting new ones.
    #[serde(default = "default_balancer")]
    pub balancer: String,
    /// How often the containers are listed (to adopt, heal and scale).
    #[serde(default = "default_check_interval")]
    pub check_interval: Dur,
    /// Bound on one Docker call.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Grace a removed container gets between SIGTERM and SIGKILL, after its sessions drained.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Dur,
    #[serde(default)]
    pub heal: HealConfig,
    /// Capabilities the replicas keep (`NET_BIND_SERVICE`, …); every other one is dropped.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Memory, CPU and process limits of each replica.
    #[serde(default)]
    pub limits: ReplicaLimits,
}

/// What one replica may use; absent means no limit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaLimits {
    /// Memory, as `256M`, `1G` or bytes (binary units, as Docker's `--memory`).
    #[serde(default)]
    pub memory: Option<MemSize>,
    /// CPUs, as Docker's `--cpus` (`0.5` is half of one).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Processes and threads, as Docker's `--pids-limit`.
    #[serde(default)]
    pub pids: Option<u32>,
}

/// A number of bytes written as `64M`, `512k`, `1G` (binary multiples, as Docker reads them), or a
/// plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemSize(pub u64);

impl std::str::FromStr for MemSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (64M, 1G, or a number of bytes)"))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            _ => {
                return Err(format!(
                    "{s:?}: the unit must be k, M or G (binary multiples)"
                ))
            }
        };
        n.checked_mul(1u64 << shift)
            .map(MemSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(MemSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Docker's smallest memory limit.
pub(super) const MIN_MEMORY: u64 = 6 << 20;

/// The Linux capabilities (capabilities(7)) a replica may keep, without the `CAP_` prefix.
pub(super) const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// `cap` as Docker's API takes it (`CAP_NET_RAW` and `net_raw` both become `NET_RAW`), if it is a
/// capability.
pub fn capability(cap: &str) -> Option<&'static str> {
    let upper = cap.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAPABILITIES.iter().copied().find(|c| *c == bare)
}

/// Networks a replica may not join: they give it no address of its own (`none`, `host`,
/// `container:NAME`), so replicas on one port would collide, and `host` and `container:` hand it the
/// network stack of the host or of another container.
pub(super) fn forbidden_network(network: &str) -> Option<&'static str> {
    if network == "host" {
        Some("the host's network stack: the replica could reach everything the host can, and every replica would bind the same port of the host")
    } else if network == "none" {
        Some("no network: sluicegate could not reach the replica")
    } else if network.starts_with("container:") {
        Some("another container's network stack: the replica would share its address and ports, and every replica would bind the same port")
    } else {
        None
    }
}

/// The Docker CLI's environment variables that say where the Engine is and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerEnv {
    /// `DOCKER_HOST`.
    pub host: Option<String>,
    /// `DOCKER_TLS_VERIFY` is set to anything (as the Docker CLI reads it).
    pub tls_verify: bool,
    /// `DOCKER_CERT_PATH`.
    pub cert_path: Option<PathBuf>,
    /// `HOME`, for the CLI's default certificate directory `~/.docker`.
    pub home: Option<PathBuf>,
}

impl DockerEnv {
    /// This process's environment.
    pub fn current() -> DockerEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        DockerEnv {
            host: var("DOCKER_HOST"),
            tls_verify: var("DOCKER_TLS_VERIFY").is_some(),
            cert_path: var("DOCKER_CERT_PATH").map(PathBuf::from),
            home: var("HOME").map(PathBuf::from),
        }
    }
}

/// How sluicegate reaches the Docker Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerTransport {
    /// `unix:///path`.
    Unix { endpoint: String },
    /// Plaintext HTTP: `tcp://host:port`.
    Plain { endpoint: String },
    /// TLS, the Engine's certificate verified against `ca`, the client's `cert` and `key` presented.
    /// `endpoint` is `tcp://host:port`.
    Tls {
        endpoint: String,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

impl DockerTransport {
    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        match self {
            DockerTransport::Unix { endpoint }
            | DockerTransport::Plain { endpoint }
            | DockerTransport::Tls { endpoint, .. } => endpoint,
        }
    }
}

/// Whether `host` (of `tcp://host:port`) is this machine's loopback: traffic to it never leaves the host.
fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `host` and `port` of `host:port` or `[v6]:port` (a trailing `/` allowed), if well-formed.
fn host_port(rest: &str) -> Option<(&str, u16)> {
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    ok.then_some((host, port))
}

impl ReplicasConfig {
    /// The Engine endpoint and how to reach it: `docker`, `docker_cert_path` and `docker_insecure`,
    /// and where they are absent the Docker CLI's variables ([`EngineKeys::transport`]). The error is
    /// the reason, for `replicas.docker`.
    pub fn docker_transport(&self, env: &DockerEnv) -> Result<DockerTransport, String> {
        EngineKeys {
            docker: self.docker.as_deref(),
            cert_path: self.docker_cert_path.as_deref(),
            insecure: self.docker_insecure,
            section: "replicas",
        }
        .transport(env)
    }
}

/// The keys that say how the Engine is reached, wherever they are written (a `replicas:` section, a
/// backend's `docker:`): one set of rules for both, so the hardening is the same.
#[derive(Debug, Clone, Copy)]
pub struct EngineKeys<'a> {
    /// `docker`: the endpoint.
    pub docker: Option<&'a str>,
    /// `docker_cert_path`.
    pub cert_path: Option<&'a Path>,
    /// `docker_insecure`.
    pub insecure: bool,
    /// Where the keys are written (`replicas`, `docker`), for messages.
    pub section: &'a str,
}

impl EngineKeys<'_> {
    /// The Engine endpoint and how to reach it: the keys, and where they are absent the Docker CLI's
    /// variables (`DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`). A plaintext endpoint that
    /// is not on loopback is refused unless `docker_insecure` allows it. The error is the reason.
    pub fn transport(&self, env: &DockerEnv) -> Result<DockerTransport, String> {
        let section = self.section;
        let (endpoint, from) = match (self.docker, &env.host) {
            (Some(d), _) => (d.trim().to_string(), String::new()),
            (None, Some(h)) => (h.trim().to_string(), " (from DOCKER_HOST)".to_string()),
            (None, None) => ("unix:///var/run/docker.sock".to_string(), String::new()),
        };
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{endpoint:?}{from}: the socket path must be absolute (unix:///path/to/docker.sock)"));
            }
            if self.cert_path.is_some() {
                return Err(format!(
                    "{endpoint:?}{from} is a Unix socket: {section}.docker_cert_path applies to TCP endpoints only"
                ));
            }
            return Ok(DockerTransport::Unix { endpoint });
        }
        let (scheme, rest) = endpoint.split_once("://").unwrap_or(("", &endpoint));
        let Some((host, port)) =
            host_port(rest).filter(|_| matches!(scheme, "tcp" | "http" | "https"))
        else {
            return Err(format!(
                "{endpoint:?}{from}: must be unix:///path/to/docker.sock, tcp://host:port or https://host:port"
            ));
        };
        let tcp = format!("tcp://{host}:{port}");
        let tls = scheme == "https" || self.cert_path.is_some() || env.tls_verify;
        if tls {
            let dir = self
                .cert_path
                .map(Path::to_path_buf)
                .or_else(|| env.cert_path.clone())
                .or_else(|| env.home.as_ref().map(|h| h.join(".docker")))
                .ok_or_else(|| {
                    format!("{endpoint:?}{from} needs TLS certificates: set {section}.docker_cert_path or DOCKER_CERT_PATH")
                })?;
            return Ok(DockerTransport::Tls {
                endpoint: tcp,
                ca: dir.join("ca.pem"),
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            });
        }
        if !is_loopback_host(host) && !self.insecure {
            return Err(format!(
                "{endpoint:?}{from} is plaintext to a host that is not loopback: whoever is on the path \
                 could run any container there. Use TLS ({section}.docker_cert_path, or DOCKER_TLS_VERIFY \
                 and DOCKER_CERT_PATH), or set {section}.docker_insecure: true to accept the risk"
            ));
        }
        Ok(DockerTransport::Plain { endpoint: tcp })
    }
}

/// When a replica is replaced.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealConfig {
    /// A replica its health checks have found unhealthy this long is replaced (an exited one at once).
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: Dur,
    /// Replacements per minute at most, so a crash-looping image cannot storm the Docker daemon.
    #[serde(default = "default_max_per_minute")]
    pub max_per_minute: u32,
}

impl Default for HealConfig {
    fn default() -> Self {
        HealConfig {
            unhealthy_after: default_unhealthy_after(),
            max_per_minute: default_max_per_minute(),
        }
    }
}

/// What the autoscaler measures per replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoscaleMetric {
    /// Open connections per replica.
    ActiveConnections,
    /// New connections per second per replica.
    ConnectionRate,
}

impl AutoscaleMetric {
    pub fn as_str(&self) -> &'static str {
        match self {
            AutoscaleMetric::ActiveConnections => "active_connections",
            AutoscaleMetric::ConnectionRate => "connection_rate",
        }
    }
}

/// Scaling the replicas with the load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleConfig {
    pub metric: AutoscaleMetric,
    /// The metric's value per replica to aim for.
    pub target: f64,
    /// Bounds of the autoscaler (within `replicas.min` and `replicas.max`, their default).
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
    /// Time after any scaling before scaling up again.
    #[serde(default = "default_up_cooldown")]
    pub up_cooldown: Dur,
    /// Time after any scaling before scaling down.
    #[serde(default = "default_down_cooldown")]
    pub down_cooldown: Dur,
    /// The metric is averaged over this long before a decision.
    #[serde(default = "default_window")]
    pub window: Dur,
}

fn default_network() -> String {
    "bridge".into()
}
fn default_min() -> u32 {
    1
}
fn default_max() -> u32 {
    10
}
fn default_balancer() -> String {
    "sluicegate".into()
}
fn default_check_interval() -> Dur {
    Dur::secs(2)
}
fn default_timeout() -> Dur {
    Dur::secs(30)
}
fn default_stop_timeout() -> Dur {
    Dur::secs(10)
}
fn default_unhealthy_after() -> Dur {
    Dur::secs(30)
}
fn default_max_per_minute() -> u32 {
    6
}
fn default_up_cooldown() -> Dur {
    Dur::secs(30)
}
fn default_down_cooldown() -> Dur {
    Dur::secs(60)
}
fn default_window() -> Dur {
    Dur::secs(30)
}

/// Whether `s` may be (part of) a Docker container name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn is_container_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether `s` may be a replica's hostname: a DNS label (`[a-zA-Z0-9-]`, 1–63, no leading or trailing
/// `-`), so the container's hostname and name are both valid.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(extra: &str) -> ReplicasConfig {
        serde_yaml::from_str(&format!("{{image: i, port: 5000, {extra}}}")).unwrap()
    }

    fn env(host: Option<&str>, tls_verify: bool, cert_path: Option<&str>) -> DockerEnv {
        DockerEnv {
            host: host.map(str::to_string),
            tls_verify,
            cert_path: cert_path.map(PathBuf::from),
            home: Some(PathBuf::from("/home/op")),
        }
    }

    fn tls(endpoint: &str, dir: &str) -> DockerTransport {
        DockerTransport::Tls {
            endpoint: endpoint.into(),
            ca: PathBuf::from(dir).join("ca.pem"),
            cert: PathBuf::from(dir).join("cert.pem"),
            key: PathBuf::from(dir).join("key.pem"),
        }
    }

    #[test]
    fn the_endpoint_comes_from_the_config_then_docker_host_then_the_socket() {
        let none = env(None, false, None);
        assert_eq!(
            replicas("").docker_transport(&none),
            Ok(DockerTransport::Unix {
                endpoint: "unix:///var/run/docker.sock".into()
            })
        );
        assert_eq!(
            replicas("").docker_transport(&env(Some("tcp://127.0.0.1:2375"), false, None)),
            Ok(DockerTransport::Plain {
                endpoint: "tcp://127.0.0.1:2375".into()
            })
        );
        assert_eq!(
            replicas("docker: unix:///run/d.sock").docker_transport(&env(
                Some("tcp://127.0.0.1:2375"),
                false,
                None
            )),
            Ok(DockerTransport::Unix {
                endpoint: "unix:///run/d.sock".into()
            })
        );
    }

    #[test]
    fn plaintext_beyond_loopback_is_refused_unless_asked_for() {
        let none = env(None, false, None);
        for ok in [
            "tcp://127.0.0.1:2375",
            "tcp://localhost:2375",
            "http://[::1]:2375/",
        ] {
            assert!(
                matches!(
                    replicas(&format!("docker: \"{ok}\"")).docker_transport(&none),
                    Ok(DockerTransport::Plain { .. })
                ),
                "{ok}"
            );
        }
        for remote in ["tcp://10.0.0.5:2375", "http://docker.example:2375"] {
            let e = replicas(&format!("docker: \"{remote}\""))
                .docker_transport(&none)
                .unwrap_err();
            assert!(
                e.contains("plaintext") && e.contains("docker_insecure"),
                "{e}"
            );
            assert!(matches!(
                replicas(&format!("docker: \"{remote}\", docker_insecure: true"))
                    .docker_transport(&none),
                Ok(DockerTransport::Plain { .. })
            ));
        }
        let from_env = replicas("")
            .docker_transport(&env(Some("tcp://10.0.0.5:2375"), false, None))
            .unwrap_err();
        assert!(from_env.contains("DOCKER_HOST"), "{from_env}");
    }

    #[test]
    fn tls_follows_the_config_or_the_docker_cli_variables() {
        // DOCKER_TLS_VERIFY with DOCKER_CERT_PATH, as the Docker CLI reads them.
        assert_eq!(
            replicas("").docker_transport(&env(Some("tcp://10.0.0.5:2376"), true, Some("/certs"))),
            Ok(tls("tcp://10.0.0.5:2376", "/certs"))
        );
        // Without DOCKER_CERT_PATH: ~/.docker.
        assert_eq!(
            replicas("docker: tcp://10.0.0.5:2376").docker_transport(&env(None, true, None)),
            Ok(tls("tcp://10.0.0.5:2376", "/home/op/.docker"))
        );
        // The config's directory wins, and turns TLS on by itself; https:// always means TLS.
        assert_eq!(
            replicas("docker: tcp://10.0.0.5:2376, docker_cert_path: /etc/sg/docker")
                .docker_transport(&env(None, false, Some("/certs"))),
            Ok(tls("tcp://10.0.0.5:2376", "/etc/sg/docker"))
        );
        assert_eq!(
            replicas("docker: https://docker.example:2376").docker_transport(&env(
                None,
                false,
                Some("/certs")
            )),
            Ok(tls("tcp://docker.example:2376", "/certs"))
        );
        // A Unix socket ignores DOCKER_TLS_VERIFY, as the CLI does, but a config asking for TLS on
        // one is told it cannot.
        assert!(matches!(
            replicas("docker: unix:///var/run/docker.sock")
                .docker_transport(&env(None, true, None)),
            Ok(DockerTransport::Unix { .. })
        ));
        assert!(
            replicas("docker: unix:///var/run/docker.sock, docker_cert_path: /c")
                .docker_transport(&env(None, false, None))
                .unwrap_err()
                .contains("docker_cert_path")
        );
    }

    /// A `docker:` backend source reaches its Engine by the same rules, its messages naming its
    /// own keys.
    #[test]
    fn a_docker_backend_source_follows_the_same_rules() {
        let sel = |extra: &str| -> crate::config::DockerSelector {
            serde_yaml::from_str(&format!("{{labels: {{a: b}}, port: 80, {extra}}}")).unwrap()
        };
        let none = env(None, false, None);
        assert_eq!(
            sel("").docker_transport(&none),
            Ok(DockerTransport::Unix {
                endpoint: "unix:///var/run/docker.sock".into()
            })
        );
        let e = sel("docker: \"tcp://10.0.0.5:2375\"")
            .docker_transport(&none)
            .unwrap_err();
        assert!(e.contains("set docker.docker_insecure: true"), "{e}");
        assert!(matches!(
            sel("docker: \"tcp://10.0.0.5:2375\", docker_insecure: true").docker_transport(&none),
            Ok(DockerTransport::Plain { .. })
        ));
        assert_eq!(
            sel("docker: \"tcp://10.0.0.5:2376\", docker_cert_path: /c").docker_transport(&none),
            Ok(tls("tcp://10.0.0.5:2376", "/c"))
        );
    }

    #[test]
    fn malformed_endpoints_are_refused() {
        let none = env(None, false, None);
        for bad in [
            "ssh://host",
            "tcp://host",
            "tcp://:2375",
            "tcp://host:0",
            "unix://relative.sock",
            "docker.sock",
        ] {
            assert!(
                replicas(&format!("docker: \"{bad}\""))
                    .docker_transport(&none)
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes_capabilities_and_networks() {
        assert_eq!("64M".parse(), Ok(MemSize(64 << 20)));
        assert_eq!("1GiB".parse(), Ok(MemSize(1 << 30)));
        assert_eq!("512k".parse(), Ok(MemSize(512 << 10)));
        assert_eq!("1000".parse(), Ok(MemSize(1000)));
        for bad in ["", "M", "1.5G", "12T", "-1M"] {
            assert!(bad.parse::<MemSize>().is_err(), "{bad}");
        }
        let l = replicas("limits: {memory: 128M, cpus: 0.5, pids: 64}").limits;
        assert_eq!(l.memory, Some(MemSize(128 << 20)));
        let l = replicas("limits: {memory: 134217728}").limits;
        assert_eq!(l.memory, Some(MemSize(128 << 20)));
        assert_eq!(capability("net_bind_service"), Some("NET_BIND_SERVICE"));
        assert_eq!(capability("CAP_NET_RAW"), Some("NET_RAW"));
        assert_eq!(capability("ALL"), None);
        assert_eq!(capability("NET_BIND"), None);
        assert!(forbidden_network("host").is_some());
        assert!(forbidden_network("none").is_some());
        assert!(forbidden_network("container:db").is_some());
        assert!(forbidden_network("bridge").is_none());
        assert!(forbidden_network("hostile").is_none());
    }
}
