//! TLS, mutual TLS and API keys on the real server: what is served, what is refused and with
//! which code; a client silent after its TLS handshake is closed; the server's health stays
//! open and a model's needs a key; reflection can be turned off; the Models service can live
//! on a listener of its own.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{ServerOptions, TestServer};
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::models_client::ModelsClient;
use lmserve::api::proto::{EmbedRequest, ListModelsRequest, LoadModelRequest, UnloadModelRequest};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A CA and what it signed, as PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn authority(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn pki() -> Pki {
    let (ca_params, ca_key, ca) = authority("lmserve test CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let signed = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca,
        server: signed(vec!["localhost".into(), "127.0.0.1".into()]),
        client: signed(vec!["client".into()]),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn tls_channel(
    addr: &str,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    endpoint
        .connect()
        .await
        .map_err(|error| format!("{error:?}"))
}

fn embed() -> EmbedRequest {
    EmbedRequest {
        model: "tiny-word2vec".into(),
        texts: vec!["a king".into()],
        ..Default::default()
    }
}

/// Starts a server that speaks TLS, waiting for its port line (health needs a TLS client).
struct TlsServer {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls(pki: &Pki, mutual: bool, env: &[(&str, &str)]) -> TlsServer {
    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("repository");
    common::copy_version("tiny-word2vec", "1", &repository, "tiny-word2vec", "1");
    let mut command = Command::new(env!("CARGO_BIN_EXE_lmserve"));
    command
        .current_dir(common::root())
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--repository",
        ])
        .arg(&repository)
        .env("LMSERVE_LOGGING__FILTER", "warn")
        .env("LMSERVE_STATE__PATH", dir.path().join("state.json"))
        .env(
            "LMSERVE_TLS__CERT_FILE",
            write(dir.path(), "server.crt", &pki.server.0),
        )
        .env(
            "LMSERVE_TLS__KEY_FILE",
            write(dir.path(), "server.key", &pki.server.1),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if mutual {
        command.env(
            "LMSERVE_TLS__CLIENT_CA_FILE",
            write(dir.path(), "ca.crt", &pki.ca),
        );
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("lmserve listening grpc=")
        .expect(&line)
        .to_owned();
    assert!(!addr.contains(' '), "{addr}");
    TlsServer {
        child,
        addr,
        _dir: dir,
    }
}

async fn wait_serving(channel: Channel) {
    let mut health = HealthClient::new(channel);
    for _ in 0..600 {
        if let Ok(response) = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            && response.into_inner().status == 1
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never SERVING");
}

#[tokio::test]
async fn tls_serves_trusting_clients_and_refuses_the_rest() {
    let pki = pki();
    let server = start_tls(&pki, false, &[]);
    let channel = tls_channel(&server.addr, &pki.ca, None).await.unwrap();
    wait_serving(channel.clone()).await;
    InferenceClient::new(channel).embed(embed()).await.unwrap();

    // Plaintext to a TLS port gets no answer.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(channel) => InferenceClient::new(channel).embed(embed()).await.is_err(),
    };
    assert!(refused, "plaintext was served over TLS");
    // A client that trusts another CA refuses the server's certificate.
    let (_, _, other_ca) = authority("another CA");
    let untrusting = tls_channel(&server.addr, &other_ca, None).await;
    let refused = match untrusting {
        Err(_) => true,
        Ok(channel) => InferenceClient::new(channel).embed(embed()).await.is_err(),
    };
    assert!(refused, "a client with the wrong CA got through");
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate() {
    let pki = pki();
    let server = start_tls(&pki, true, &[]);
    let with_cert = tls_channel(&server.addr, &pki.ca, Some(&pki.client))
        .await
        .unwrap();
    wait_serving(with_cert.clone()).await;
    InferenceClient::new(with_cert)
        .embed(embed())
        .await
        .unwrap();
    let without = tls_channel(&server.addr, &pki.ca, None).await;
    let refused = match without {
        Err(_) => true,
        Ok(channel) => InferenceClient::new(channel).embed(embed()).await.is_err(),
    };
    assert!(refused, "a client without a certificate got through");
}

#[tokio::test]
async fn a_client_silent_after_the_tls_handshake_is_closed_after_the_handshake_timeout() {
    let pki = pki();
    let server = start_tls(
        &pki,
        false,
        &[("LMSERVE_SERVER__HANDSHAKE_TIMEOUT_MS", "2000")],
    );
    let channel = tls_channel(&server.addr, &pki.ca, None).await.unwrap();
    wait_serving(channel.clone()).await;

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.addr.as_str()).await.unwrap();
    let mut silent = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake completes");
    // The handshake is done and the client sends nothing more: no HTTP/2 preface. Whether the
    // server closes with a TLS alert or just the socket, the read ends.
    let mut sent = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut sent)).await;
    assert!(
        closed.is_ok(),
        "a connection silent after its TLS handshake was still open after 10 s"
    );
    // A real client is unaffected.
    InferenceClient::new(channel).embed(embed()).await.unwrap();
}

fn bearer<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test]
async fn api_keys_gate_every_call_but_health_by_scope() {
    const ADMIN: &str = "admin-key-0123456789";
    const READER: &str = "reader-key-0123456789";
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        keys.path(),
        format!("admin {ADMIN}\n# a comment\ninference {READER}\n"),
    )
    .unwrap();
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            (
                "LMSERVE_AUTH__KEYS_FILE".into(),
                keys.path().to_str().unwrap().into(),
            ),
            ("LMSERVE_SERVER__REFLECTION".into(), "false".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut inference = server.inference().await;
    let mut models = ModelsClient::new(server.channel().await);

    let status = inference.embed(embed()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("Bearer"), "{status:?}");
    let status = inference
        .embed(bearer(embed(), "not-a-key-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    inference.embed(bearer(embed(), READER)).await.unwrap();
    inference.embed(bearer(embed(), ADMIN)).await.unwrap();
    models
        .list_models(bearer(ListModelsRequest {}, READER))
        .await
        .unwrap();
    let unload = || UnloadModelRequest {
        name: "tiny-lstm".into(),
        version: None,
    };
    let status = models
        .unload_model(bearer(unload(), READER))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("admin"), "{status:?}");
    models.unload_model(bearer(unload(), ADMIN)).await.unwrap();
    let load = LoadModelRequest {
        name: "tiny-lstm".into(),
        version: None,
    };
    models.load_model(bearer(load, ADMIN)).await.unwrap();
    // The server's health needs no key (probes and balancers have none).
    assert_eq!(
        server.health("").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // A model's health needs one: without it, known and unknown names answer alike.
    let mut health = HealthClient::new(server.channel().await);
    let model_health = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in [
        "model/tiny-word2vec",
        "model/tiny-word2vec@1",
        "model/no-such-model",
    ] {
        let status = health.check(model_health(service)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{service}: {status:?}"
        );
        let status = health.watch(model_health(service)).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{service}: {status:?}"
        );
    }
    let serving = health
        .check(bearer(model_health("model/tiny-word2vec"), READER))
        .await
        .unwrap();
    assert_eq!(serving.into_inner().status, 1);
    let status = health
        .check(bearer(model_health("model/no-such-model"), READER))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // Reflection is off.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            server.channel().await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let status = reflection
        .server_reflection_info(bearer(futures::stream::iter([request]), ADMIN))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    // The keys appear nowhere in the log.
    let log = server.stderr();
    assert!(!log.contains(ADMIN) && !log.contains(READER), "{log}");
}

#[tokio::test]
async fn the_models_service_can_have_a_listener_of_its_own() {
    let admin_port = common::free_port();
    let server = TestServer::start_with(ServerOptions {
        env: vec![(
            "LMSERVE_SERVER__ADMIN_ADDR".into(),
            format!("127.0.0.1:{admin_port}"),
        )],
        ..Default::default()
    })
    .await;
    // Inference on the main port; Models is not there.
    server.inference().await.embed(embed()).await.unwrap();
    let status = server
        .models()
        .await
        .list_models(ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    // It is on the admin port, with health.
    let admin = Channel::from_shared(format!("http://127.0.0.1:{admin_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let listed = ModelsClient::new(admin.clone())
        .list_models(ListModelsRequest {})
        .await
        .unwrap();
    assert!(!listed.into_inner().models.is_empty());
    let health = HealthClient::new(admin)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1);
}
