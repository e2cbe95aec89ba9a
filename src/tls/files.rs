//! Certificates, keys and CA bundles read from PEM files, each failure naming its file, and what a
//! certificate says about itself (its name and when it expires) for the metrics and the dashboard.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::RootCertStore;

use super::TlsError;
use crate::config::secret_file;

/// The largest PEM file read: a chain or bundle of that size is no certificate file.
const MAX_PEM: u64 = 1024 * 1024;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_checked(path, |_| Ok(()))
}

/// [`read`], with `check` asked about the file once open (before a byte is read).
fn read_checked(
    path: &Path,
    check: impl FnOnce(&std::fs::File) -> Result<(), String>,
) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = |error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    };
    let mut text = Vec::new();
    let f = std::fs::File::open(path).map_err(file)?;
    check(&f).map_err(|why| TlsError::Bad {
        path: path.to_path_buf(),
        why,
    })?;
    f.take(MAX_PEM + 1).read_to_end(&mut text).map_err(file)?;
    if text.len() as u64 > MAX_PEM {
        return Err(TlsError::Bad {
            path: path.to_path_buf(),
            why: format!("larger than {MAX_PEM} bytes: not a PEM certificate file"),
        });
    }
    Ok(text)
}

/// Every certificate of a PEM file, in order (a chain: the leaf first).
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bad {
            path: path.to_path_buf(),
            why: format!("not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Bad {
            path: path.to_path_buf(),
            why: "no certificate in it (PEM, BEGIN CERTIFICATE)".into(),
        });
    }
    for c in &certs {
        info(c).map_err(|why| TlsError::Bad {
            path: path.to_path_buf(),
            why,
        })?;
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC). A file other users may
/// read or write is refused unless `allow_readable` (`allow_readable_keys`).
pub(crate) fn key(path: &Path, allow_readable: bool) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read_checked(path, |f| {
        secret_file::check(f, path, "private key", allow_readable)
    })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| TlsError::Bad {
        path: path.to_path_buf(),
        why: format!("no private key in it (PEM: PKCS#8, RSA or EC): {e}"),
    })
}

/// The CAs of a PEM bundle, as trust anchors.
pub(crate) fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|e| TlsError::Bad {
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// Every revocation list of the PEM file `path` (`BEGIN X509 CRL`): at least one.
pub(crate) fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let text = read(path)?;
    let bad = |why: String| TlsError::Bad {
        path: path.to_path_buf(),
        why,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if crls.is_empty() {
        return Err(bad("no revocation list in it (PEM, BEGIN X509 CRL)".into()));
    }
    for c in &crls {
        x509_parser::parse_x509_crl(c)
            .map_err(|e| bad(format!("not an X.509 revocation list: {e}")))?;
    }
    Ok(crls)
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Its subject's common name, else its first DNS name, else its subject as written.
    pub(crate) name: String,
    /// When it expires, in seconds since the Unix epoch.
    pub(crate) not_after: i64,
}

/// Reads a certificate's name and expiry; `Err` says why it is not an X.509 certificate.
pub(crate) fn info(cert: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let subject = x509.subject();
    let cn = subject
        .iter_common_name()
        .find_map(|a| a.as_str().ok().map(str::to_string));
    let dns = || {
        x509.subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
            })
    };
    Ok(CertInfo {
        name: cn.or_else(dns).unwrap_or_else(|| subject.to_string()),
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// A certificate's subject common name, if it has one (for the PROXY v2 TLV a backend reads).
pub(crate) fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = x509
        .subject()
        .iter_common_name()
        .find_map(|a| a.as_str().ok().map(str::to_string));
    cn
}
