//! Certificates made by `openssl` for the test that asks (a CA, server certificates with their names,
//! client certificates), TLS clients and TLS backends built on them with rustls.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{listen, Backend};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA of the test's own, in a directory of its own, that signs what the test asks for.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    ca_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA named `name`, EC P-256, valid for a year.
    pub fn new(name: &str) -> Pki {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sg-pki-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed),
            name.replace(' ', "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca.key",
            ],
        );
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "365",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
        }
    }

    fn sign(&self, file: &str, cn: &str, ext: &str, days: u32) -> Pair {
        self.sign_key(
            file,
            cn,
            ext,
            days,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )
    }

    /// Signs a certificate for a new key made with `genpkey`'s `alg` options.
    fn sign_key(&self, file: &str, cn: &str, ext: &str, days: u32, alg: &[&str]) -> Pair {
        let key = format!("{file}.key");
        let cert = format!("{file}.pem");
        let mut genpkey = vec!["genpkey"];
        genpkey.extend_from_slice(alg);
        genpkey.extend_from_slice(&["-out", &key]);
        openssl(&self.dir, &genpkey);
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-out",
                &format!("{file}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        std::fs::write(self.dir.join(format!("{file}.ext")), ext).unwrap();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{file}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                &days.to_string(),
                "-extfile",
                &format!("{file}.ext"),
            ],
        );
        Pair {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        }
    }

    /// A server certificate for `names` (DNS names, or IP addresses), the first as its common name.
    pub fn server(&self, file: &str, names: &[&str]) -> Pair {
        self.server_for_days(file, names, 90)
    }

    /// [`Pki::server`] with an RSA 2048 key instead of an EC one.
    pub fn server_rsa(&self, file: &str, names: &[&str]) -> Pair {
        let alg = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
        self.sign_key(file, names[0], &server_ext(names), 90, &alg)
    }

    /// [`Pki::server`] valid for `days`.
    pub fn server_for_days(&self, file: &str, names: &[&str], days: u32) -> Pair {
        self.sign(file, names[0], &server_ext(names), days)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, file: &str, cn: &str) -> Pair {
        let ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";
        self.sign(file, cn, ext, 90)
    }

    /// A revocation list (PEM) of this CA revoking `revoked`, written to `file`, made by `openssl ca`
    /// (its database started afresh each time, so each list revokes exactly `revoked`).
    pub fn crl(&self, file: &str, revoked: &[&Pair]) -> PathBuf {
        let db = format!("{file}.index");
        std::fs::write(self.dir.join(&db), "").unwrap();
        std::fs::write(self.dir.join(format!("{file}.crlnumber")), "01\n").unwrap();
        let cnf = format!("{file}.cnf");
        std::fs::write(
            self.dir.join(&cnf),
            format!(
                "[ca]\ndefault_ca = test\n[test]\ndatabase = {db}\ncrlnumber = {file}.crlnumber\n\
                 certificate = ca.pem\nprivate_key = ca.key\ndefault_md = sha256\ndefault_crl_days = 30\n"
            ),
        )
        .unwrap();
        for pair in revoked {
            let cert = pair.cert.to_str().unwrap();
            openssl(&self.dir, &["ca", "-config", &cnf, "-revoke", cert]);
        }
        let out = format!("{file}.pem");
        openssl(&self.dir, &["ca", "-config", &cnf, "-gencrl", "-out", &out]);
        self.dir.join(out)
    }

    /// This CA as a rustls trust store.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }
}

/// The extensions of a server certificate for `names` (DNS names, or IP addresses).
fn server_ext(names: &[&str]) -> String {
    let san: Vec<String> = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{n}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect();
    format!(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={}\n",
        san.join(",")
    )
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain(p: &Pair) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(&p.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    (certs, PrivateKeyDer::from_pem_file(&p.key).unwrap())
}

/// A TLS client trusting `pki`'s CA, asking for `sni` (a name or an IP) with `alpn`, presenting
/// `client` if given.
pub fn connector(pki: &Pki, alpn: &[&str], client: Option<&Pair>) -> TlsConnector {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots());
    let mut config = match client {
        Some(p) => {
            let (certs, key) = chain(p);
            b.with_client_auth_cert(certs, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TLS client trusting `pki`'s CA that speaks only TLS 1.2.
pub fn connector_tls12_only(pki: &Pki) -> TlsConnector {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Connects to `addr` and does the client's handshake for `sni`.
pub async fn tls_connect(
    c: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    c.connect(name, tcp).await
}

/// A TLS server config presenting `pair`, with `alpn`.
pub fn server_config(pair: &Pair, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
    let (certs, key) = chain(pair);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A backend that speaks TLS with `pair`'s certificate and echoes what it decrypts, then half-closes
/// (close_notify).
pub async fn tls_echo_backend(ip: [u8; 4], pair: &Pair) -> Backend {
    let acceptor = TlsAcceptor::from(server_config(pair, &[]));
    Backend::serve(listen(SocketAddr::from((ip, 0))), move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tls.shutdown().await;
        }
    })
}
