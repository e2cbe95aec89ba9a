//! The Engine client on bollard, the maintained async Engine client: it speaks the API over the Unix
//! socket, TCP or TLS (rustls), negotiates the API version with older engines, and models the API's
//! types.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerSummary, EndpointSettings, EventMessage, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{Docker, API_DEFAULT_VERSION};

use super::{ContainerEvent, ContainerHealth, DockerError, Events, Labelled, Seen, Spec};
use crate::config::DockerTransport;

/// The container events label discovery follows: each can change which containers run and are
/// healthy (`stop` and `kill` come before the `die` that ends a container; `pause` takes one out of
/// service, `unpause` puts it back; the Engine matches `health_status` to `health_status: …`).
const FOLLOWED_EVENTS: &[&str] = &[
    "start",
    "die",
    "stop",
    "kill",
    "pause",
    "unpause",
    "health_status",
    "destroy",
];

impl Spec {
    /// The container's host settings: its network, and the hardening every replica gets (no
    /// privilege gained through setuid binaries or file capabilities, every capability dropped but
    /// the listed ones, the limits).
    pub(crate) fn host_config(&self) -> HostConfig {
        HostConfig {
            network_mode: Some(self.network.clone()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: (!self.cap_add.is_empty()).then(|| self.cap_add.clone()),
            memory: self.memory,
            nano_cpus: self.nano_cpus,
            pids_limit: self.pids,
            ..Default::default()
        }
    }
}

/// A connected Engine client.
#[derive(Clone)]
pub(crate) struct Engine {
    docker: Docker,
    /// How the Engine was reached: the event stream opens its own connection (`events.rs`).
    transport: DockerTransport,
    endpoint: String,
    timeout: Duration,
}

impl Engine {
    /// Connects to the Engine as `transport` says and agrees on an API version (older engines speak
    /// older ones).
    pub(crate) async fn connect(
        transport: &DockerTransport,
        timeout: Duration,
    ) -> Result<Engine, DockerError> {
        let endpoint = transport.endpoint();
        let unavailable = |reason: String| DockerError::Unavailable {
            endpoint: endpoint.to_string(),
            reason,
        };
        // bollard's own bound on a request, in whole seconds, after ours (`bounded`), which counts.
        let secs = timeout.as_secs() + 1;
        let docker = match transport {
            DockerTransport::Unix { endpoint } => {
                // bollard would connect lazily; say plainly what is wrong with the socket first.
                let path = endpoint.trim_start_matches("unix://");
                std::fs::metadata(path).map_err(|e| unavailable(e.to_string()))?;
                Docker::connect_with_unix(endpoint, secs, API_DEFAULT_VERSION)
            }
            DockerTransport::Plain { endpoint } => {
                Docker::connect_with_http(endpoint, secs, API_DEFAULT_VERSION)
            }
            DockerTransport::Tls {
                endpoint,
                ca,
                cert,
                key,
            } => {
                // bollard reads the client's certificate and key only during the handshake and
                // drops them silently when they cannot be read: check them here, with their paths.
                for f in [ca, cert, key] {
                    std::fs::File::open(f)
                        .map_err(|e| unavailable(format!("cannot read {}: {e}", f.display())))?;
                }
                Docker::connect_with_ssl(endpoint, key, cert, ca, secs, API_DEFAULT_VERSION)
            }
        }
        .map_err(|e| unavailable(e.to_string()))?;
        let docker = tokio::time::timeout(timeout, docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Timeout(timeout))?
            .map_err(|e| classify(endpoint, timeout, e))?;
        Ok(Engine {
            docker,
            transport: transport.clone(),
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
            .map_err(|e| classify(&self.endpoint, self.timeout, e))
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

    /// The running containers with all of `labels`, each with its address on `network` (absent: on
    /// its first network by name that gives it one) and what its healthcheck says.
    pub(crate) async fn list_labelled(
        &self,
        labels: &BTreeMap<String, String>,
        network: Option<&str>,
    ) -> Result<Vec<Labelled>, DockerError> {
        let mut filters = label_filters(labels);
        filters.insert("status".to_string(), vec!["running".to_string()]);
        let opts = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self
            .bounded(self.docker.list_containers(Some(opts)))
            .await?;
        Ok(list.into_iter().map(|c| labelled(c, network)).collect())
    }

    /// The Engine's events about containers with all of `labels`, from `since` (Unix seconds: a
    /// little before the list they follow, so nothing between the two is missed) on. The request is
    /// bounded like any call (the Engine answers it at once); the stream then runs until the Engine
    /// ends it or the connection breaks, which it reports as its last item. Read by `events.rs`, in
    /// lines of at most `events::MAX_LINE` bytes, not by bollard.
    pub(crate) async fn events(
        &self,
        labels: &BTreeMap<String, String>,
        since: i64,
    ) -> Result<Events, DockerError> {
        let mut filters = label_filters(labels);
        filters.insert("type".to_string(), vec!["container".to_string()]);
        filters.insert(
            "event".to_string(),
            FOLLOWED_EVENTS.iter().map(|e| e.to_string()).collect(),
        );
        let query = super::events::query(since, &filters);
        let version = self.docker.client_version().to_string();
        super::events::open(&self.transport, &version, &query, self.timeout).await
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
            host_config: Some(spec.host_config()),
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
    async fn address(&self, id: &str, network: &str) -> Result<IpAddr, DockerError> {
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

    /// Renames container `id` to `name` (a running one too: the one thing about a running container
    /// Docker lets change, which is why a removal's intent is recorded in the name). A container
    /// that is gone already needs no renaming.
    pub(crate) async fn rename(&self, id: &str, name: &str) -> Result<(), DockerError> {
        let opts = RenameContainerOptionsBuilder::default().name(name).build();
        match self.bounded(self.docker.rename_container(id, opts)).await {
            Ok(()) | Err(DockerError::Daemon { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops container `id` (SIGTERM, then SIGKILL after `grace`) and removes it. A container that is
    /// gone already counts as removed.
    pub(crate) async fn remove(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let stop = StopContainerOptionsBuilder::default()
            .t(grace.as_secs() as i32)
            .build();
        // The Engine answers a stop only after the grace: the bound on the call covers it (and
        // bollard's own, which every call shares, is lifted beyond it for this one).
        let bound = self.timeout + grace;
        let docker = self
            .docker
            .clone()
            .with_timeout(bound + Duration::from_secs(1));
        match tokio::time::timeout(bound, docker.stop_container(id, Some(stop)))
            .await
            .map_err(|_| DockerError::Timeout(bound))
            .and_then(|r| r.map_err(|e| classify(&self.endpoint, bound, e)))
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
        name: first_name(c.names),
        labels: c.labels.unwrap_or_default(),
        state: state_of(c.state),
        status: c.status.unwrap_or_default(),
        ip,
    }
}

/// A container's state as the Engine words it, in lower case (`running`, `exited`; empty if absent).
fn state_of(state: Option<impl ToString>) -> String {
    state
        .map(|s| s.to_string())
        .unwrap_or_default()
        .to_lowercase()
}

/// The list and event filter that matches containers with all of `labels`.
fn label_filters(labels: &BTreeMap<String, String>) -> HashMap<String, Vec<String>> {
    let mut filters = HashMap::new();
    filters.insert(
        "label".to_string(),
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    );
    filters
}

fn labelled(c: ContainerSummary, network: Option<&str>) -> Labelled {
    let networks = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    // By name, so "the first network" is the same on every list and on every balancer.
    let networks: BTreeMap<String, EndpointSettings> = networks.into_iter().collect();
    let ip = match network {
        Some(n) => networks.get(n).and_then(endpoint_ip),
        None => networks.values().find_map(endpoint_ip),
    };
    let status = c.status.unwrap_or_default();
    Labelled {
        id: c.id.unwrap_or_default(),
        name: first_name(c.names),
        labels: c.labels.unwrap_or_default(),
        state: state_of(c.state),
        health: ContainerHealth::from_status(&status),
        ip,
    }
}

/// An endpoint's IPv4 address, else its global IPv6 one (Docker writes an empty string for none).
fn endpoint_ip(e: &EndpointSettings) -> Option<IpAddr> {
    [&e.ip_address, &e.global_ipv6_address]
        .into_iter()
        .flatten()
        .find_map(|ip| ip.parse().ok())
}

/// A container's name without the leading `/`.
fn first_name(names: Option<Vec<String>>) -> String {
    names
        .and_then(|n| n.into_iter().next())
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string()
}

pub(super) fn container_event(m: EventMessage) -> ContainerEvent {
    let (id, name) = match m.actor {
        Some(a) => (
            a.id.unwrap_or_default(),
            a.attributes
                .and_then(|mut a| a.remove("name"))
                .unwrap_or_default(),
        ),
        None => Default::default(),
    };
    ContainerEvent {
        action: m.action.unwrap_or_default(),
        id,
        name,
    }
}

/// Sorts bollard's errors into "not reachable" and "said no"; `timeout` is the bound on the call.
fn classify(endpoint: &str, timeout: Duration, e: bollard::errors::Error) -> DockerError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code,
            message,
        } => DockerError::Daemon {
            status: status_code,
            message,
        },
        E::RequestTimeoutError => DockerError::Timeout(timeout),
        other => DockerError::Unavailable {
            endpoint: endpoint.to_string(),
            reason: with_causes(&other),
        },
    }
}

/// `e` and what caused it, down the chain: bollard's own words ("client error (Connect)") say
/// nothing of the certificate the TLS handshake refused, or of the refused connection.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text += ": ";
            text += &more;
        }
        cause = c.source();
    }
    text
}
