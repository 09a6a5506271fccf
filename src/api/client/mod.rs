//! The command-line client: `lmserve generate|embed|classify|models|routes` against a running
//! server. `Target` says where the server is and how to reach it; each submodule owns one service.

pub mod chat;
pub mod inference;
pub mod registry;

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The server a client command talks to when `--addr` is not given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";

/// Where the server is and the credentials to present.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `host:port` as grpcurl takes it, or a URL (`http://…`, `https://…`).
    pub addr: String,
    /// Sent as `authorization: Bearer <key>` when the server requires API keys.
    pub api_key: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate, for `https://` addresses.
    pub ca_file: Option<PathBuf>,
}

/// A channel that adds the API key to every call.
pub type Connection = InterceptedService<Channel, BearerKey>;

/// Adds `authorization: Bearer <key>` to every request when a key is configured.
#[derive(Clone)]
pub struct BearerKey(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Target {
    /// The address as a URL: a bare `host:port` means plain HTTP/2, as with grpcurl -plaintext,
    /// unless a CA file asks for TLS.
    fn url(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else if self.ca_file.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let url = self.url();
        let mut endpoint = Channel::from_shared(url.clone()).map_err(|error| {
            anyhow::anyhow!(
                "`{}` is not a server address ({error}); use host:port or a URL",
                self.addr
            )
        })?;
        if url.starts_with("https://") {
            let Some(ca_file) = &self.ca_file else {
                anyhow::bail!(
                    "{url} uses TLS: give the CA certificate that signed the server's with --ca-file"
                );
            };
            let pem = std::fs::read(ca_file).map_err(|error| {
                anyhow::anyhow!("cannot read --ca-file {}: {error}", ca_file.display())
            })?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
        }
        let channel = endpoint.connect().await.map_err(|error| {
            anyhow::anyhow!("cannot reach lmserve at {url}: {}", error_chain(&error))
        })?;
        let key = match &self.api_key {
            Some(key) => Some(format!("Bearer {key}").parse().map_err(|_| {
                anyhow::anyhow!("the API key holds characters a header cannot carry")
            })?),
            None => None,
        };
        Ok(InterceptedService::new(channel, BearerKey(key)))
    }
}

/// A transport error with its causes: tonic's top-level message alone is just "transport error".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A failed call as the user should see it: the gRPC code's name and the server's message.
fn status(error: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", error.code(), error.message())
}
