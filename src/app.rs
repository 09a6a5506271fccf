//! Wiring: config to running server. Startup fails loudly on what a person must fix (missing
//! ONNX Runtime, a port already taken, a required GPU that is absent); graceful shutdown drains.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::inference::InferenceService;
use crate::api::models::ModelsService;
use crate::api::proto::inference_server::InferenceServer;
use crate::api::proto::models_server::ModelsServer;
use crate::api::proto::{self};
use crate::config::Config;
use crate::registry::Registry;
use crate::runtime::library;
use crate::telemetry;

/// Service names reported by `grpc.health.v1`, besides the overall "" status.
const HEALTH_SERVICES: [&str; 2] = ["lmserve.v1.Inference", "lmserve.v1.Models"];
/// Requests larger than this are refused before they are decoded.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::logging::init(&config.logging);
    let environment = library::init(&config.ort_library_candidates())?;
    if let Some(addr) = config.server.metrics_addr {
        telemetry::metrics::install(addr)?;
    }
    let registry = Arc::new(Registry::open(config.clone())?);

    let listener = TcpListener::bind(config.server.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {} (is another server using the port? set server.grpc_addr or --grpc-addr)", config.server.grpc_addr))?;
    let local = listener.local_addr()?;
    // One machine-readable line on stdout, so scripts and tests started on port 0 find the port.
    println!("lmserve listening grpc={local}");
    tracing::info!(grpc = %local, metrics = ?config.server.metrics_addr, repository = %config.repository.path.display(), "lmserve starting");
    if let Some(decode) = &config.runtime.decode_cpus
        && let Ok(rest) = crate::runtime::placement::allowed_cpus()
    {
        tracing::info!(%decode, %rest, "decode threads on their own CPUs, the rest of the server on the others");
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let inference = InferenceServer::new(InferenceService::new(
        Arc::clone(&registry),
        config.limits.clone(),
        config.generation.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let models = ModelsServer::new(ModelsService::new(Arc::clone(&registry)));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(inference)
            .add_service(models)
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = stop_rx.await;
            }),
    );

    // Load while the health check says NOT_SERVING, so orchestrators wait for warm models.
    registry.load_all(environment).await?;
    tokio::spawn(Arc::clone(&registry).watch());
    set_health(&health, ServingStatus::Serving).await;
    tracing::info!("all models loaded; serving");

    shutdown_signal().await;
    tracing::info!("shutting down; draining requests in flight");
    set_health(&health, ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    match tokio::time::timeout(grace, server).await {
        Ok(joined) => joined?.context("gRPC server")?,
        Err(_) => tracing::warn!(
            ?grace,
            "requests still in flight after the grace period; exiting"
        ),
    }
    Ok(())
}

/// Accepted connections with Nagle's algorithm off: a streamed token is a small write that
/// must leave at once, not wait up to 40 ms for the peer's delayed ACK.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|connection| {
        if let Ok(stream) = &connection
            && let Err(error) = stream.set_nodelay(true)
        {
            tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
        }
        connection
    })
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
