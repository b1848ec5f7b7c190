//! Which certificates registries are trusted with: the system's PEM bundle, read directly so
//! that `images.ca_file` can be added to it (ureq's platform verifier takes no extra roots).

use std::path::{Path, PathBuf};

use ureq::tls::{PemItem, RootCerts};

use crate::error::{Error, Result};

/// Where the system keeps its PEM bundle (Debian, Fedora, Alpine, …).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The system's PEM bundle (`SSL_CERT_FILE` first) plus `ca_file`. The bundled Mozilla roots
/// are the fallback when the system has none.
pub(super) fn roots(ca_file: Option<&Path>) -> Result<RootCerts> {
    let mut certs = Vec::new();
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let system = env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file());
    for path in system.iter().map(PathBuf::as_path).chain(ca_file) {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(PemItem::Certificate(cert)) = item {
                certs.push(cert);
            }
        }
    }
    if certs.is_empty() {
        return Ok(RootCerts::WebPki);
    }
    Ok(RootCerts::new_with_certs(&certs))
}
