//! The Docker Engine API, as much of it as sluicegate needs: for replicas, list the containers with
//! given labels, run one (hardened: no new privileges, capabilities dropped, limits), rename one, stop
//! and remove one; for label discovery (`discovery::docker`), list the running containers with given
//! labels (address, labels, health) and follow the Engine's container events. Every call is bounded
//! by a timeout and fails with a [`DockerError`] that says whether the Engine could not be reached
//! (503 for the admin API) or answered with an error (502). The event stream is bounded until the
//! Engine answers the request; after that it is open-ended by nature (events come when they come).
//!
//! The client (`client.rs`, on bollard) is compiled with the `docker` cargo feature, on by default.
//! Without it this sluicegate has no Docker support: config validation refuses a `replicas:` section
//! and a `docker:` backend, so nothing asks for an Engine, and [`Engine`] is a type with no value.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

#[cfg(feature = "docker")]
mod client;
#[cfg(feature = "docker")]
mod events;
#[cfg(feature = "docker")]
pub(crate) use client::Engine;

/// Why a Docker call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) enum DockerError {
    /// No Engine answers at the endpoint (socket missing, permission denied, connection refused).
    #[error("the Docker Engine at {endpoint} cannot be reached: {reason}")]
    Unavailable { endpoint: String, reason: String },
    /// The Engine answered with an error (image not found, name conflict, …): its own message.
    #[error("the Docker Engine said: {message} (HTTP {status})")]
    Daemon { status: u16, message: String },
    #[error("the Docker Engine did not answer within {0:?}")]
    Timeout(Duration),
    /// A started container has no address on the replicas' network.
    #[error("container {container} has no address on network {network:?}")]
    NoAddress { container: String, network: String },
}

impl DockerError {
    /// The admin API's status for this failure: 503 when Docker is not there, 502 when it said no.
    pub(crate) fn http_status(&self) -> u16 {
        match self {
            DockerError::Unavailable { .. } | DockerError::Timeout(_) => 503,
            DockerError::Daemon { .. } | DockerError::NoAddress { .. } => 502,
        }
    }
}

/// A container as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) struct Seen {
    pub(crate) id: String,
    /// Without the leading `/`.
    pub(crate) name: String,
    pub(crate) labels: HashMap<String, String>,
    /// `running`, `exited`, `created`, `restarting`, `paused`, `dead`, …
    pub(crate) state: String,
    /// Docker's words for it (`Exited (137) 2 seconds ago`).
    pub(crate) status: String,
    pub(crate) ip: Option<IpAddr>,
}

/// A running container as label discovery lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) struct Labelled {
    pub(crate) id: String,
    /// Without the leading `/`.
    pub(crate) name: String,
    pub(crate) labels: HashMap<String, String>,
    /// `running`, `paused`, … (only running ones are asked for; the answer is checked all the same).
    pub(crate) state: String,
    pub(crate) health: ContainerHealth,
    /// Its address on the network asked for, or (none asked for) on its first network by name that
    /// gives it one.
    pub(crate) ip: Option<IpAddr>,
}

/// What a container's Docker healthcheck says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) enum ContainerHealth {
    /// It has no healthcheck.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

#[cfg_attr(not(feature = "docker"), allow(dead_code))]
impl ContainerHealth {
    /// Read from a listing's status text, the only place the list API of older engines (before API
    /// 1.49) says it: `Up 5 seconds (healthy)`, `Up 2 seconds (health: starting)`, `Up 1 minute
    /// (unhealthy)`.
    pub(crate) fn from_status(status: &str) -> ContainerHealth {
        let Some(open) = status.rfind('(') else {
            return ContainerHealth::None;
        };
        match status[open..].trim_end() {
            "(healthy)" => ContainerHealth::Healthy,
            "(unhealthy)" => ContainerHealth::Unhealthy,
            "(health: starting)" => ContainerHealth::Starting,
            _ => ContainerHealth::None,
        }
    }
}

/// Something happened to a container with the labels followed (`start`, `die`,
/// `health_status: healthy`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) struct ContainerEvent {
    pub(crate) action: String,
    /// The container's id.
    pub(crate) id: String,
    /// The container's name, where the Engine says it.
    pub(crate) name: String,
}

/// The Engine's container events, until it ends or fails.
pub(crate) type Events = Pin<Box<dyn Stream<Item = Result<ContainerEvent, DockerError>> + Send>>;

/// What a new container is made of.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "docker"), allow(dead_code))]
pub(crate) struct Spec {
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) image: String,
    pub(crate) network: String,
    pub(crate) env: Vec<String>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) labels: HashMap<String, String>,
    /// Capabilities kept; every other one is dropped.
    pub(crate) cap_add: Vec<String>,
    /// Bytes of memory, billionths of a CPU, processes; `None` is no limit.
    pub(crate) memory: Option<i64>,
    pub(crate) nano_cpus: Option<i64>,
    pub(crate) pids: Option<i64>,
}

#[cfg(not(feature = "docker"))]
mod absent {
    use std::net::IpAddr;
    use std::time::Duration;

    use std::collections::BTreeMap;

    use super::{DockerError, Events, Labelled, Seen, Spec};
    use crate::config::DockerTransport;

    /// No Engine client in this build: there is no value of this type.
    #[derive(Clone)]
    pub(crate) enum Engine {}

    impl Engine {
        pub(crate) async fn connect(
            transport: &DockerTransport,
            _timeout: Duration,
        ) -> Result<Engine, DockerError> {
            Err(DockerError::Unavailable {
                endpoint: transport.endpoint().to_string(),
                reason: "this sluicegate was built without Docker support (the `docker` feature)"
                    .into(),
            })
        }
        pub(crate) async fn list(
            &self,
            _: &[(&str, &str)],
            _: &str,
        ) -> Result<Vec<Seen>, DockerError> {
            match *self {}
        }
        pub(crate) async fn run(&self, _: &Spec) -> Result<(String, IpAddr), DockerError> {
            match *self {}
        }
        pub(crate) async fn list_labelled(
            &self,
            _: &BTreeMap<String, String>,
            _: Option<&str>,
        ) -> Result<Vec<Labelled>, DockerError> {
            match *self {}
        }
        pub(crate) async fn events(
            &self,
            _: &BTreeMap<String, String>,
            _: i64,
        ) -> Result<Events, DockerError> {
            match *self {}
        }
        pub(crate) async fn rename(&self, _: &str, _: &str) -> Result<(), DockerError> {
            match *self {}
        }
        pub(crate) async fn remove(&self, _: &str, _: Duration) -> Result<(), DockerError> {
            match *self {}
        }
    }
}
#[cfg(not(feature = "docker"))]
pub(crate) use absent::Engine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_read_from_the_status_text() {
        let h = ContainerHealth::from_status;
        assert_eq!(h("Up 5 seconds (healthy)"), ContainerHealth::Healthy);
        assert_eq!(h("Up 1 minute (unhealthy)"), ContainerHealth::Unhealthy);
        assert_eq!(
            h("Up 2 seconds (health: starting)"),
            ContainerHealth::Starting
        );
        assert_eq!(h("Up 3 hours"), ContainerHealth::None);
        assert_eq!(h("Up 3 hours (Paused)"), ContainerHealth::None);
        assert_eq!(h(""), ContainerHealth::None);
    }
}
