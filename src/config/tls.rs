//! TLS settings of a service: terminating clients' TLS (`tls`) and originating TLS to its backends
//! (`backend_tls`). Only paths and choices here; the files are read (and refused when broken) by the
//! `tls` module when the service starts or reloads.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Dur, Protocol};

/// The TLS versions a service accepts from clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

impl TlsVersion {
    pub fn as_str(&self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

fn default_handshake_timeout() -> Dur {
    Dur::secs(10)
}

/// `tls`: the service terminates its clients' TLS and relays plaintext to its backends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
    /// Protocols offered in ALPN, in the server's order of preference.
    #[serde(default)]
    pub alpn: Vec<Protocol>,
    /// The lowest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// PEM: the CAs a client certificate must chain to; given, a client must present one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM: revocation lists (one file or a list) a client certificate is checked against; only
    /// with `client_ca`.
    #[serde(default, deserialize_with = "paths")]
    pub client_crl: Vec<PathBuf>,
    /// How long a client may take for its whole handshake, from its first byte.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

/// One path or a list of them.
fn paths<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "expected a file path or a list of them")]
    enum Raw {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(p) => vec![p],
        Raw::Many(v) => v,
    })
}

fn yes() -> bool {
    true
}

/// `backend_tls`: the service connects to its backends over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsConfig {
    /// PEM: the CAs the backends' certificates must chain to; absent, the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the backends' certificates must carry; absent, the DNS name a backend was found
    /// under, else its IP address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM: a client certificate chain to present (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `false` accepts any certificate (logged as a warning at start): for tests, never production.
    #[serde(default = "yes")]
    pub verify: bool,
    /// Protocols offered in ALPN to the backends.
    #[serde(default)]
    pub alpn: Vec<Protocol>,
    /// How long the TLS handshake with a backend may take (on top of `connect_timeout`).
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}
