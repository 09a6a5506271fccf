//! Wiring: config to running server. Startup fails loudly on what a person must fix (missing
//! ONNX Runtime, a port already taken, a required GPU that is absent, unreadable TLS files or
//! API keys); shutdown runs in the order load balancers need (`shutdown`).

mod clients;
mod connection;
mod health;
mod listeners;
mod shutdown;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::Router;

use crate::api::auth::KeyRing;
use crate::api::closing;
use crate::api::edge::EdgeLayer;
use crate::api::inference::InferenceService;
use crate::api::kserve::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::api::kserve::{self, KserveService};
use crate::api::models::ModelsService;
use crate::api::observe::ObserveLayer;
use crate::api::proto::inference_server::InferenceServer;
use crate::api::proto::models_server::ModelsServer;
use crate::api::proto::{self};
use crate::api::unread::UnreadLayer;
use crate::config::{Config, security};
use crate::registry::Registry;
use crate::runtime::library;
use crate::telemetry;
use connection::ConnectionLimits;
use health::Health;
use listeners::bind;
use shutdown::Shutdown;

type EdgeServer = Server<listeners::Layers>;

/// How long a metrics connection may go without sending or reading anything in the middle of a
/// request. Between requests (and while a head arrives) the handshake timeout holds instead,
/// so a kept-alive connection closes after that; this bounds a client that stops reading an
/// answer half written.
const METRICS_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs the server until SIGINT or SIGTERM. `config_file` is the file `config` was read from,
/// whose routes are reloaded when it changes.
pub async fn serve(config: Config, config_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let traces = telemetry::logging::init(&config.logging, &config.tracing)?;
    let keys = security::api_keys(&config.auth)?;
    let tls = tls::acceptor(&config.tls)?;
    let environment = library::init(&config.ort_library_candidates(), config.shared_threads())?;
    // Before the registry, so what loading records is counted.
    let metrics = match config.server.metrics_addr {
        Some(addr) => Some((addr, telemetry::metrics::install()?)),
        None => None,
    };
    let registry = Arc::new(Registry::open(config.clone())?);
    // Up to max_connections on each of three listeners, besides the models' files.
    connection::raise_open_files_limit(
        config
            .server
            .max_connections
            .saturating_mul(3)
            .saturating_add(256),
    );

    let main = bind(config.server.grpc_addr, "server.grpc_addr or --grpc-addr").await?;
    let admin = match config.server.admin_addr {
        Some(addr) => Some(bind(addr, "server.admin_addr").await?),
        None => None,
    };
    let key_ring = (!keys.is_empty()).then(|| Arc::new(KeyRing::new(keys)));
    let reporter = tonic_health::server::HealthReporter::new();
    let health_service = crate::api::health::server(&reporter, key_ring.clone());
    let health = Health::new(reporter, config.server.ready_when).await;
    let connection_limits = ConnectionLimits {
        max_connections: config.server.max_connections,
        max_per_client: config.server.max_connections_per_client,
        ipv6_client_prefix: config.server.ipv6_client_prefix,
        handshake_timeout: Duration::from_millis(config.server.handshake_timeout_ms.max(1)),
        lifetime: (config.server.max_connection_age_ms > 0).then(|| {
            let server = &config.server;
            Duration::from_millis(
                server
                    .max_connection_age_ms
                    .saturating_add(server.max_connection_age_grace_ms),
            )
        }),
        idle_timeout: None,
    };
    let metrics_addr = match metrics {
        Some((addr, handle)) => {
            let listener = bind(addr, "server.metrics_addr or --metrics-addr").await?;
            let limits = ConnectionLimits {
                idle_timeout: Some(METRICS_IDLE_TIMEOUT),
                ..connection_limits
            };
            let listener = listeners::HttpListener::new(listener, limits)?;
            Some(telemetry::http::serve(
                listener,
                handle,
                health.readiness(),
                connection_limits.handshake_timeout,
            )?)
        }
        None => None,
    };
    announce(
        &config,
        &main,
        admin.as_ref(),
        metrics_addr,
        tls.is_some(),
        key_ring.is_some(),
    )?;
    if let Some(decode) = &config.runtime.decode_cpus
        && let Ok(rest) = crate::runtime::placement::allowed_cpus()
    {
        tracing::info!(%decode, %rest, "decode threads on their own CPUs, the rest of the server on the others");
    }

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

    let edge = EdgeLayer::new(
        key_ring,
        Duration::from_millis(config.server.request_stall_timeout_ms),
    );
    let observe = ObserveLayer::new(config.logging.requests);
    let unread = UnreadLayer::new(Duration::from_millis(
        config.server.response_stall_timeout_ms,
    ));
    let transport = &config.server;
    let server = || -> anyhow::Result<EdgeServer> {
        let keepalive = (transport.keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(transport.keepalive_interval_ms));
        let mut builder = Server::builder()
            .max_concurrent_streams(transport.max_streams_per_connection.max(1))
            // hyper's own default, which tonic leaves unset: a client that makes the server
            // reset its streams over and over (CVE-2023-44487's kin) gets a GOAWAY.
            .http2_max_local_error_reset_streams(Some(1024))
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        // The GOAWAY at the age; the grace after it is the connection's own lifetime
        // (`ConnectionLimits`), as tonic's grace would replace the GOAWAY with a cut.
        if transport.max_connection_age_ms > 0 {
            builder =
                builder.max_connection_age(Duration::from_millis(transport.max_connection_age_ms));
        }
        // Chunking and dropping unread answers outermost, where hyper polls; then the call's
        // record and log, so refusals at the edge are logged too.
        Ok(builder
            .layer(unread.clone())
            .layer(observe)
            .layer(edge.clone()))
    };
    let reflection = |router: Router<listeners::Layers>| -> anyhow::Result<_> {
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
        connection_limits,
        tls.clone(),
        stopped.clone(),
    ));
    if let Some(admin) = admin {
        let admin_router = server()?.add_service(health_service).add_service(models);
        servers.push(listeners::spawn(
            reflection(admin_router)?,
            admin,
            connection_limits,
            tls,
            stopped,
        ));
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
    let result = Shutdown {
        health,
        stop_health,
        drain_delay: std::time::Duration::from_millis(config.server.drain_delay_ms),
        grace: std::time::Duration::from_millis(config.server.shutdown_grace_ms),
        stop,
        close_streams,
    }
    .run(servers)
    .await;
    if let Some(traces) = traces {
        traces.shutdown().await;
    }
    result
}

/// Says where the server listens. In text mode, one machine-readable line on stdout as well, so
/// scripts and tests started on port 0 find the ports (whoever reads it may close the pipe
/// afterwards: a failed write is not an error). In JSON mode only JSON is written, to stderr:
/// the `lmserve listening` event, which no log filter hides.
fn announce(
    config: &Config,
    main: &TcpListener,
    admin: Option<&TcpListener>,
    metrics: Option<std::net::SocketAddr>,
    tls: bool,
    auth: bool,
) -> anyhow::Result<()> {
    let grpc = main.local_addr()?;
    let admin = admin.map(TcpListener::local_addr).transpose()?;
    if config.logging.format == crate::config::LogFormat::Text {
        use std::io::Write;
        let mut line = format!("lmserve listening grpc={grpc}");
        if let Some(admin) = admin {
            line.push_str(&format!(" admin={admin}"));
        }
        if let Some(metrics) = metrics {
            line.push_str(&format!(" metrics={metrics}"));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
    let shown =
        |addr: Option<std::net::SocketAddr>| addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        target: telemetry::logging::LISTENING_TARGET,
        grpc = %grpc,
        admin = %shown(admin),
        metrics = %shown(metrics),
        tls,
        auth,
        repository = %config.repository.path.display(),
        version = env!("CARGO_PKG_VERSION"),
        "lmserve listening"
    );
    Ok(())
}
