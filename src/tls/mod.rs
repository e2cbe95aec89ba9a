//! TLS at layer 4, with rustls and its `ring` provider: the ClientHello read for routing
//! (`hello.rs`, pure), terminating clients' TLS (`server.rs`), originating TLS to backends
//! (`client.rs`), the PEM files both read (`files.rs`), and the stream that gives back a hello
//! already read (`prefixed.rs`).
//!
//! Why `ring`: it is the provider the rest of the tree already builds (bollard's TLS to the Docker
//! Engine), so TLS adds no second crypto library to the build, and its P-256, X25519 and AES-GCM are
//! assembly on x86_64 and aarch64. The provider is passed explicitly, never installed process-wide, so
//! another crate enabling a second provider cannot leave rustls without a default.
//!
//! What a service needs is loaded (and refused, naming the file) when the service starts and on every
//! reload, certificates included, so a reload picks up renewed ones; connections already open keep the
//! configuration they started with.

mod client;
mod files;
pub mod hello;
mod prefixed;
mod server;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub(crate) use client::{ClientStream, Originator};
pub use hello::{ClientHello, HelloError};
pub(crate) use prefixed::Prefixed;
pub(crate) use server::{HandshakeError, ServerStream, Terminator};

use crate::config::{ServiceConfig, TlsVersion};

/// Why a service's TLS files cannot be used; each names the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Bad { path: PathBuf, why: String },
    #[error("server_name {name:?}: {why}")]
    Name { name: String, why: String },
    #[error("no system CA certificates to verify the backends with (set backend_tls.ca): {0}")]
    NoSystemRoots(String),
    #[error("{0}: {1}")]
    Rustls(&'static str, rustls::Error),
}

/// A service's TLS, both ways, as loaded.
#[derive(Debug, Default, Clone)]
pub(crate) struct ServiceTls {
    pub(crate) terminate: Option<Arc<Terminator>>,
    pub(crate) originate: Option<Arc<Originator>>,
    /// The probes' own TLS (`health.tls`), if they do not speak `backend_tls`.
    pub(crate) probe: Option<Arc<Originator>>,
}

/// Loads what `cfg` (`services[index]`)'s `tls` and `backend_tls` name; a private key other users
/// may read is refused unless `allow_readable_keys`. The error says which key and file.
pub(crate) fn load(
    index: usize,
    cfg: &ServiceConfig,
    allow_readable_keys: bool,
) -> Result<ServiceTls, (String, TlsError)> {
    let terminate = cfg
        .tls
        .as_ref()
        .map(|t| Terminator::load(t, allow_readable_keys).map(Arc::new))
        .transpose()
        .map_err(|e| (format!("services[{index}].tls"), e))?;
    let originate = cfg
        .backend_tls
        .as_ref()
        .map(|t| Originator::load(t, allow_readable_keys).map(Arc::new))
        .transpose()
        .map_err(|e| (format!("services[{index}].backend_tls"), e))?;
    let probe = cfg
        .health
        .tls
        .as_ref()
        .map(|t| Originator::load(t, allow_readable_keys).map(Arc::new))
        .transpose()
        .map_err(|e| (format!("services[{index}].health.tls"), e))?;
    check_docker_keys(index, cfg, allow_readable_keys)?;
    Ok(ServiceTls {
        terminate,
        originate,
        probe,
    })
}

/// The private keys `cfg`'s connections to a Docker Engine over TLS present (a `docker:` backend's,
/// its `replicas:`'), held to the rule of its own keys: one other users may read is refused unless
/// `allow_readable_keys`. A key that is not there (yet) is left to the connection, which says so.
fn check_docker_keys(
    index: usize,
    cfg: &ServiceConfig,
    allow_readable_keys: bool,
) -> Result<(), (String, TlsError)> {
    use crate::config::{BackendAddress, DockerEnv, DockerTransport};
    let env = DockerEnv::current();
    let selectors = cfg
        .backends
        .iter()
        .enumerate()
        .filter_map(|(j, b)| match &b.address {
            BackendAddress::Docker(sel) => Some((
                format!("services[{index}].backends[{j}].docker"),
                sel.docker_transport(&env),
            )),
            _ => None,
        });
    let replicas = cfg.replicas.iter().map(|r| {
        (
            format!("services[{index}].replicas"),
            r.docker_transport(&env),
        )
    });
    for (at, transport) in selectors.chain(replicas) {
        let Ok(DockerTransport::Tls { key, .. }) = transport else {
            continue;
        };
        let Ok(file) = std::fs::File::open(&key) else {
            continue;
        };
        crate::config::secret_file::check(&file, &key, "private key", allow_readable_keys)
            .map_err(|why| {
                (
                    at,
                    TlsError::Bad {
                        path: key.clone(),
                        why,
                    },
                )
            })?;
    }
    Ok(())
}

/// Reads every TLS file `config` names (certificates, keys, CAs) and says which key and file is
/// unusable: `--check` and start-up run it before anything is bound.
pub fn check_files(config: &crate::config::Config) -> Result<(), String> {
    for (i, s) in config.services.iter().enumerate() {
        load(i, s, config.allow_readable_keys).map_err(|(key, e)| format!("{key}: {e}"))?;
    }
    Ok(())
}

/// Whether the kernel offers TLS offload (kTLS): `tls` among the upper-layer protocols TCP can take
/// (`/proc/sys/net/ipv4/tcp_available_ulp`, as `setsockopt(TCP_ULP, "tls")` needs); `None` when
/// that cannot be read.
pub(crate) fn kernel_tls() -> Option<bool> {
    let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").ok()?;
    Some(ulps.split_whitespace().any(|u| u == "tls"))
}

/// Says once per process, when the first service with TLS starts, that its records are encrypted
/// and relayed in user space, and why: the kernel has no kTLS, or it has but sluicegate does not
/// hand it session keys (terminated and originated bytes are then copied, never spliced).
pub(crate) fn say_where_records_are_relayed() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| match kernel_tls() {
        Some(true) => tracing::info!(
            ktls = true,
            "TLS is relayed in user space: the kernel offers kTLS, but sluicegate does not hand it session keys"
        ),
        Some(false) => tracing::info!(
            ktls = false,
            "TLS is relayed in user space: the kernel offers no kTLS (tcp_available_ulp has no tls)"
        ),
        None => tracing::info!(
            ktls = false,
            "TLS is relayed in user space: /proc/sys/net/ipv4/tcp_available_ulp cannot be read"
        ),
    });
}

/// The crypto every TLS configuration here uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The versions from `min` up.
fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsVersion::V1_2 => &BOTH,
        TlsVersion::V1_3 => &ONLY_13,
    }
}
