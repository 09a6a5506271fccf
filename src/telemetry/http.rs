//! The metrics port: Prometheus `/metrics`, and `/health/live` and `/health/ready` for tools that
//! cannot speak gRPC health (200 when live or ready, 503 when not); any other path is 404.
//!
//! Each request's head must arrive within the header timeout of the connection's starting to
//! wait for it, after the accept or the last response: a client that sends its headers a byte
//! at a time, or keeps a connection idle, does not hold one of the port's places for long.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use super::process;

/// How often histograms drop samples past their window and the exporter tidies up.
const UPKEEP: Duration = Duration::from_secs(5);

/// Serves on `listener`, bound by the caller (a port in use stops startup), until the process
/// exits.
pub fn serve<L>(
    mut listener: L,
    handle: PrometheusHandle,
    ready: watch::Receiver<bool>,
    header_timeout: Duration,
) -> anyhow::Result<SocketAddr>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP);
        loop {
            ticker.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    // /proc reads (one entry per open file) stay off the async workers.
                    let process = tokio::task::spawn_blocking(process::render)
                        .await
                        .unwrap_or_default();
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        handle.render() + &process,
                    )
                }
            }),
        )
        .route("/health/live", get(|| async { (StatusCode::OK, "live\n") }))
        .route(
            "/health/ready",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this port serves /metrics, /health/live and /health/ready\n",
            )
                .into_response()
        });
    // axum::serve sets no timer, and hyper times no request head without one.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    tokio::spawn(async move {
        loop {
            let (connection, _) = listener.accept().await;
            let serving = http.serve_connection(
                TokioIo::new(connection),
                TowerToHyperService::new(app.clone()),
            );
            tokio::spawn(async move {
                if let Err(error) = serving.await {
                    tracing::debug!(%error, "a metrics connection ended with an error");
                }
            });
        }
    });
    Ok(bound)
}
