//! Terminating a client's TLS (`tls` on a service): the service's certificate, its ALPN and minimum
//! version, and, with `client_ca`, a client certificate required and verified.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::files::{self, CertInfo};
use super::{provider, versions, Prefixed, TlsError};
use crate::config::TlsConfig;

/// A client's stream once its handshake is done.
pub(crate) type ServerStream = TlsStream<Prefixed<TcpStream>>;

/// What a service presents and requires of its clients.
pub(crate) struct Terminator {
    acceptor: TlsAcceptor,
    pub(crate) handshake_timeout: Duration,
    /// The certificate it presents (its leaf).
    pub(crate) certificate: CertInfo,
    /// A client certificate is required.
    pub(crate) client_auth: bool,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("certificate", &self.certificate)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// What a finished handshake says, for the routing log and a PROXY v2 header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Handshake {
    /// `TLSv1.3`, `TLSv1.2` (as HAProxy's PP2_SUBTYPE_SSL_VERSION writes it).
    pub(crate) version: &'static str,
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<Vec<u8>>,
    /// The client certificate's subject common name, when one was presented and has one.
    pub(crate) client_cn: Option<String>,
    pub(crate) client_cert: bool,
}

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// A client certificate was required and none, or a bad one, came.
    ClientCert(String),
    /// Anything else: a protocol error, no shared cipher or version, the connection gone.
    Failed(String),
    /// It took longer than `handshake_timeout`.
    Timeout,
}

impl Terminator {
    /// Reads the files of `cfg` and builds what handshakes need; every failure names its file.
    pub(crate) fn load(cfg: &TlsConfig, allow_readable_keys: bool) -> Result<Terminator, TlsError> {
        let chain = files::certs(&cfg.cert)?;
        let key = files::key(&cfg.key, allow_readable_keys)?;
        let certificate = files::info(&chain[0]).map_err(|why| TlsError::Bad {
            path: cfg.cert.clone(),
            why,
        })?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(cfg.min_version))
            .map_err(|e| TlsError::Rustls("TLS versions", e))?;
        let builder = match &cfg.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(files::roots(ca)?);
                let mut crls = Vec::new();
                for path in &cfg.client_crl {
                    crls.extend(files::crls(path)?);
                }
                // With lists, a certificate whose issuer has none among them is refused (as
                // nginx's ssl_crl does): a revocation that cannot be checked is not assumed absent.
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .with_crls(crls)
                    .build()
                    .map_err(|e| TlsError::Bad {
                        path: cfg.client_crl.first().unwrap_or(ca).clone(),
                        why: format!("cannot verify client certificates with it: {e}"),
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Bad {
                path: cfg.key.clone(),
                why: format!("does not go with {}: {e}", cfg.cert.display()),
            })?;
        config.alpn_protocols = cfg.alpn.iter().map(|p| p.0.clone()).collect();
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: cfg.handshake_timeout.0,
            certificate,
            client_auth: cfg.client_ca.is_some(),
        })
    }

    /// Runs the server side of the handshake on `stream` (whose hello may have been read already),
    /// within the handshake timeout.
    pub(crate) async fn accept(
        &self,
        stream: Prefixed<TcpStream>,
    ) -> Result<(ServerStream, Handshake), HandshakeError> {
        let accepted = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream))
            .await
            .map_err(|_| HandshakeError::Timeout)?;
        let tls = accepted.map_err(|e| {
            let rustls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match rustls_error {
                Some(
                    rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_),
                ) if self.client_auth => HandshakeError::ClientCert(e.to_string()),
                _ => HandshakeError::Failed(e.to_string()),
            }
        })?;
        let conn = tls.get_ref().1;
        let peer = conn.peer_certificates().and_then(|c| c.first());
        let handshake = Handshake {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                _ => "TLS",
            },
            sni: conn.server_name().map(str::to_string),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            client_cn: peer.and_then(files::common_name),
            client_cert: peer.is_some(),
        };
        Ok((tls, handshake))
    }
}
