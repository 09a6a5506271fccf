//! `[tls]` to a rustls acceptor; a file that is missing or not PEM stops startup.
//!
//! The handshake itself runs in `app::connection`, so that one deadline covers it and the
//! HTTP/2 preface after it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// gRPC runs over HTTP/2 only: a client that offers ALPN without h2 fails the handshake (one
/// that offers none is let through, as tonic lets it).
const ALPN_H2: &[u8] = b"h2";

pub fn acceptor(config: &TlsConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    if !config.enabled() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        bail!("TLS needs both tls.cert_file and tls.key_file");
    };
    let chain = certificates(cert, "tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_slice(&read(key, "tls.key_file")?)
        .with_context(|| format!("tls.key_file {} holds no PEM private key", key.display()))?;
    let builder = ServerConfig::builder();
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            // With a client CA, rustls refuses every client without a certificate it signed.
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca, "tls.client_ca_file")? {
                roots
                    .add(certificate)
                    .with_context(|| format!("tls.client_ca_file {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("tls.client_ca_file {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .context("tls.cert_file and tls.key_file do not make a usable identity")?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))
}

fn certificates(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(&read(path, setting)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{setting} {} is not PEM", path.display()))?;
    if chain.is_empty() {
        bail!("{setting} {} holds no PEM certificate", path.display());
    }
    Ok(chain)
}
