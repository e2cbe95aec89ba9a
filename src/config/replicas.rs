//! The `replicas:` and `autoscale:` sections of a service: backend containers sluicegate starts,
//! removes, heals and scales through the Docker Engine.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Dur;

/// Label keys sluicegate puts on the containers it starts; a config may not set them.
pub const LABEL_PREFIX: &str = "io.sluicegate.";

/// Backend containers managed through the Docker Engine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicasConfig {
    /// The Engine's endpoint: `unix:///path/docker.sock` or `tcp://host:port`. Absent: `DOCKER_HOST`,
    /// else `unix:///var/run/docker.sock`.
    #[serde(default)]
    pub docker: Option<String>,
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
