//! `[tls]` to tonic's rustls configuration; a file that is missing or not PEM stops startup.

use anyhow::{Context, bail};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::TlsConfig;

pub fn server_config(config: &TlsConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    if !config.enabled() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        bail!("TLS needs both tls.cert_file and tls.key_file");
    };
    let read = |path: &std::path::Path, setting: &str| {
        std::fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))
    };
    let identity = Identity::from_pem(read(cert, "tls.cert_file")?, read(key, "tls.key_file")?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.client_ca_file {
        // With a client CA, rustls refuses every client without a certificate it signed.
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "tls.client_ca_file")?));
    }
    Ok(Some(tls))
}
