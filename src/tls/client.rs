//! Originating TLS to a service's backends (`backend_tls`): whom to trust (a CA file, else the
//! system's roots), which name to expect, a client certificate to present.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{files, provider, TlsError};
use crate::config::{BackendTlsConfig, TlsVersion};

/// A backend's stream once its handshake is done.
pub(crate) type ClientStream = TlsStream<TcpStream>;

/// How a service speaks TLS to its backends.
pub(crate) struct Originator {
    connector: TlsConnector,
    /// The name every backend's certificate must carry, when configured.
    server_name: Option<ServerName<'static>>,
    pub(crate) handshake_timeout: Duration,
    /// `verify: false`: any certificate is accepted.
    pub(crate) insecure: bool,
}

impl std::fmt::Debug for Originator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Originator")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Originator {
    /// Reads the files of `cfg`; every failure names its file.
    pub(crate) fn load(
        cfg: &BackendTlsConfig,
        allow_readable_keys: bool,
    ) -> Result<Originator, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(super::versions(TlsVersion::V1_2))
            .map_err(|e| TlsError::Rustls("TLS versions", e))?;
        let builder = if cfg.verify {
            let roots = match &cfg.ca {
                Some(ca) => files::roots(ca)?,
                None => system_roots()?,
            };
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        };
        let mut config = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(files::certs(cert)?, files::key(key, allow_readable_keys)?)
                .map_err(|e| TlsError::Bad {
                    path: key.clone(),
                    why: format!("does not go with {}: {e}", cert.display()),
                })?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = cfg.alpn.iter().map(|p| p.0.clone()).collect();
        let server_name = cfg
            .server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n.to_string()).map_err(|e| TlsError::Name {
                    name: n.to_string(),
                    why: e.to_string(),
                })
            })
            .transpose()?;
        Ok(Originator {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            handshake_timeout: cfg.handshake_timeout.0,
            insecure: !cfg.verify,
        })
    }

    /// The name to expect of a backend: the configured one, else the DNS name it was found under,
    /// else its IP address.
    pub(crate) fn name_for(&self, dns_name: Option<&str>, ip: IpAddr) -> ServerName<'static> {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        dns_name
            .and_then(|n| ServerName::try_from(n.to_string()).ok())
            .unwrap_or(ServerName::IpAddress(ip.into()))
    }

    /// Runs the client side of the handshake on a connected `stream`, within the handshake timeout.
    pub(crate) async fn connect(
        &self,
        stream: TcpStream,
        name: ServerName<'static>,
    ) -> std::io::Result<ClientStream> {
        match tokio::time::timeout(self.handshake_timeout, self.connector.connect(name, stream))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake with the backend timed out",
            )),
        }
    }
}

impl crate::health::ProbeTls for Originator {
    fn handshake<'a>(
        &'a self,
        stream: TcpStream,
        dns_name: Option<&'a str>,
        ip: IpAddr,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::io::Result<Box<dyn crate::health::ProbeIo>>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            let s = self.connect(stream, self.name_for(dns_name, ip)).await?;
            Ok(Box::new(s) as Box<dyn crate::health::ProbeIo>)
        })
    }
}

/// The system's trust anchors (the OS store, `SSL_CERT_FILE`, `SSL_CERT_DIR`).
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::NoSystemRoots(if errors.is_empty() {
            "none found".to_string()
        } else {
            errors.join("; ")
        }));
    }
    Ok(store)
}

/// `verify: false`: accepts any certificate, but still checks the handshake's signatures against
/// the one presented (the backend holds its key), so only who it is goes unverified.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
