//! The Docker Engine API, as much of it as replica management needs: list the containers with given
//! labels, run one, stop and remove one. Built on bollard (the maintained async Engine client: it speaks
//! the API over the Unix socket or TCP, negotiates the API version with older engines, and models the
//! API's types). Every call is bounded by a timeout and fails with a [`DockerError`] that says whether
//! the Engine could not be reached (503 for the admin API) or answered with an error (502).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, ContainerSummary, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;

/// Why a Docker call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// What a new container is made of.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) image: String,
    pub(crate) network: String,
    pub(crate) env: Vec<String>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) labels: HashMap<String, String>,
}

/// A connected Engine client.
#[derive(Clone)]
pub(crate) struct Engine {
    docker: Docker,
    endpoint: String,
    timeout: Duration,
}

/// `unix:///var/run/docker.sock` unless `DOCKER_HOST` says otherwise.
pub(crate) fn default_endpoint() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

impl Engine {
    /// Connects to `endpoint` and agrees on an API version (older engines speak older ones).
    pub(crate) async fn connect(endpoint: &str, timeout: Duration) -> Result<Engine, DockerError> {
        let unavailable = |reason: String| DockerError::Unavailable {
            endpoint: endpoint.to_string(),
            reason,
        };
        if let Some(path) = endpoint.strip_prefix("unix://") {
            // bollard would connect lazily; say plainly what is wrong with the socket first.
            std::fs::metadata(path).map_err(|e| unavailable(e.to_string()))?;
        }
        let docker = Docker::connect_with_host(endpoint).map_err(|e| unavailable(e.to_string()))?;
        let docker = tokio::time::timeout(timeout, docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Timeout(timeout))?
            .map_err(|e| classify(endpoint, e))?;
        Ok(Engine {
            docker,
            endpoint: endpoint.to_string(),
            timeout,
        })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, DockerError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| DockerError::Timeout(self.timeout))?
            .map_err(|e| classify(&self.endpoint, e))
    }

    /// Every container (running or not) with all of `labels`.
    pub(crate) async fn list(
        &self,
        labels: &[(&str, &str)],
        network: &str,
    ) -> Result<Vec<Seen>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .bounded(self.docker.list_containers(Some(opts)))
            .await?;
        Ok(list.into_iter().map(|c| seen(c, network)).collect())
    }

    /// Creates and starts a container; returns its id and address on `spec.network`. A container
    /// created but not started is removed again, so a failure leaves nothing behind.
    pub(crate) async fn run(&self, spec: &Spec) -> Result<(String, IpAddr), DockerError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            hostname: Some(spec.hostname.clone()),
            env: Some(spec.env.clone()),
            cmd: spec.command.clone(),
            labels: Some(spec.labels.clone()),
            host_config: Some(HostConfig {
                network_mode: Some(spec.network.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .bounded(self.docker.create_container(Some(opts), body))
            .await?;
        if let Err(e) = self
            .bounded(self.docker.start_container(&created.id, None))
            .await
        {
            let _ = self.remove(&created.id, Duration::ZERO).await;
            return Err(e);
        }
        match self.address(&created.id, &spec.network).await {
            Ok(ip) => Ok((created.id, ip)),
            Err(e) => {
                let _ = self.remove(&created.id, Duration::ZERO).await;
                Err(e)
            }
        }
    }

    /// The address of container `id` on `network`.
    pub(crate) async fn address(&self, id: &str, network: &str) -> Result<IpAddr, DockerError> {
        let info = self
            .bounded(self.docker.inspect_container(id, None))
            .await?;
        info.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| DockerError::NoAddress {
                container: id.to_string(),
                network: network.to_string(),
            })
    }

    /// Stops container `id` (SIGTERM, then SIGKILL after `grace`) and removes it. A container that is
    /// gone already counts as removed.
    pub(crate) async fn remove(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let stop = StopContainerOptionsBuilder::default()
            .t(grace.as_secs() as i32)
            .build();
        match self
            .bounded(self.docker.stop_container(id, Some(stop)))
            .await
        {
            Ok(())
            | Err(DockerError::Daemon {
                status: 304 | 404, ..
            }) => {}
            Err(e) => return Err(e),
        }
        let rm = RemoveContainerOptionsBuilder::default().force(true).build();
        match self
            .bounded(self.docker.remove_container(id, Some(rm)))
            .await
        {
            Ok(()) | Err(DockerError::Daemon { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn seen(c: ContainerSummary, network: &str) -> Seen {
    let ip = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| n.get(network))
        .and_then(|e| e.ip_address.as_deref())
        .and_then(|ip| ip.parse().ok());
    Seen {
        id: c.id.unwrap_or_default(),
        name: c
            .names
            .and_then(|n| n.into_iter().next())
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: c.labels.unwrap_or_default(),
        state: c
            .state
            .map(|s| s.to_string())
            .unwrap_or_default()
            .to_lowercase(),
        status: c.status.unwrap_or_default(),
        ip,
    }
}

/// Sorts bollard's errors into "not reachable" and "said no".
fn classify(endpoint: &str, e: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code,
            message,
        } => DockerError::Daemon {
            status: status_code,
            message,
        },
        E::RequestTimeoutError => DockerError::Timeout(Duration::ZERO),
        other => DockerError::Unavailable {
            endpoint: endpoint.to_string(),
            reason: other.to_string(),
        },
    }
}
