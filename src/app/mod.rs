//! Wiring: config to running server. Startup fails loudly on what a person must fix (missing
//! ONNX Runtime, a port already taken, a required GPU that is absent, unreadable TLS files or
//! API keys); shutdown runs in the order load balancers need (`shutdown`).

mod health;
mod listeners;
mod shutdown;
mod tls;

use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::api::auth::KeyRing;
use crate::api::closing;
use crate::api::edge::EdgeLayer;
use crate::api::inference::InferenceService;
use crate::api::kserve::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::api::kserve::{self, KserveService};
use crate::api::models::ModelsService;
use crate::api::proto::inference_server::InferenceServer;
use crate::api::proto::models_server::ModelsServer;
use crate::api::proto::{self};
use crate::config::{Config, security};
use crate::registry::Registry;
use crate::runtime::library;
use crate::telemetry;
use health::Health;
use listeners::bind;
use shutdown::Shutdown;

type EdgeServer = Server<Stack<EdgeLayer, Identity>>;

/// Runs the server until SIGINT or SIGTERM. `config_file` is the file `config` was read from,
/// whose routes are reloaded when it changes.
pub async fn serve(config: Config, config_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    telemetry::logging::init(&config.logging);
    let keys = security::api_keys(&config.auth)?;
    let tls = tls::server_config(&config.tls)?;
    let environment = library::init(&config.ort_library_candidates())?;
    if let Some(addr) = config.server.metrics_addr {
        telemetry::metrics::install(addr)?;
    }
    let registry = Arc::new(Registry::open(config.clone())?);

    let main = bind(config.server.grpc_addr, "server.grpc_addr or --grpc-addr").await?;
    let admin = match config.server.admin_addr {
        Some(addr) => Some(bind(addr, "server.admin_addr").await?),
        None => None,
    };
    // One machine-readable line on stdout, so scripts and tests started on port 0 find the
    // ports. Whoever reads it may close the pipe afterwards: a failed write is not an error.
    let admin_shown = match &admin {
        Some(admin) => format!(" admin={}", admin.local_addr()?),
        None => String::new(),
    };
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "lmserve listening grpc={}{admin_shown}",
            main.local_addr()?
        );
        let _ = stdout.flush();
    }
    tracing::info!(
        grpc = %main.local_addr()?,
        admin = ?admin.as_ref().map(TcpListener::local_addr).transpose()?,
        tls = tls.is_some(),
        auth = !keys.is_empty(),
        repository = %config.repository.path.display(),
        "lmserve starting"
    );
    if let Some(decode) = &config.runtime.decode_cpus
        && let Ok(rest) = crate::runtime::placement::allowed_cpus()
    {
        tracing::info!(%decode, %rest, "decode threads on their own CPUs, the rest of the server on the others");
    }

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter, config.server.ready_when).await;
    let (close_streams, closing) = closing::channel();
    let limits = &config.limits;
    let kserve = GrpcInferenceServiceServer::new(KserveService::new(
        Arc::clone(&registry),
        closing.clone(),
        health.readiness(),
    ))
    .max_decoding_message_size(limits.max_inference_message_bytes);
    let inference = InferenceServer::new(InferenceService::new(Arc::clone(&registry), closing))
        .max_decoding_message_size(limits.max_inference_message_bytes);
    let models = ModelsServer::new(ModelsService::new(Arc::clone(&registry)))
        .max_decoding_message_size(limits.max_models_message_bytes);

    let edge = EdgeLayer::new((!keys.is_empty()).then(|| KeyRing::new(keys)));
    let server = || -> anyhow::Result<EdgeServer> {
        let builder = Server::builder();
        let builder = match &tls {
            Some(tls) => builder.tls_config(tls.clone())?,
            None => builder,
        };
        Ok(builder.layer(edge.clone()))
    };
    let reflection = |router: Router<Stack<EdgeLayer, Identity>>| -> anyhow::Result<_> {
        if !config.server.reflection {
            return Ok(router);
        }
        Ok(router
            .add_service(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(kserve::proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()?,
            )
            .add_service(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(kserve::proto::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1alpha()?,
            ))
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let main_router = server()?
        .add_service(health_service.clone())
        .add_service(inference)
        .add_service(kserve);
    // Models goes to the admin listener when there is one, and only there.
    let main_router = match admin {
        Some(_) => main_router,
        None => main_router.add_service(models.clone()),
    };
    servers.push(listeners::spawn(
        reflection(main_router)?,
        main,
        stopped.clone(),
    ));
    if let Some(admin) = admin {
        let admin_router = server()?.add_service(health_service).add_service(models);
        servers.push(listeners::spawn(reflection(admin_router)?, admin, stopped));
    }

    // Load while the health check says NOT_SERVING, so orchestrators wait for warm models.
    registry.load_all(environment).await?;
    tokio::spawn(Arc::clone(&registry).watch());
    if let Some(file) = config_file {
        tokio::spawn(Arc::clone(&registry).watch_routes(file));
    }
    health.publish(&registry).await;
    let (stop_health, health_stopped) = tokio::sync::watch::channel(false);
    health.follow(Arc::clone(&registry), health_stopped);
    tracing::info!("models loaded; serving");

    shutdown::signal().await;
    Shutdown {
        health,
        stop_health,
        drain_delay: std::time::Duration::from_millis(config.server.drain_delay_ms),
        grace: std::time::Duration::from_millis(config.server.shutdown_grace_ms),
        stop,
        close_streams,
    }
    .run(servers)
    .await
}
