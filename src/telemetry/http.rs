//! The metrics port: Prometheus `/metrics`, and `/health/live` and `/health/ready` for tools that
//! cannot speak gRPC health (200 when live or ready, 503 when not); any other path is 404.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use super::process;

/// How often histograms drop samples past their window and the exporter tidies up.
const UPKEEP: Duration = Duration::from_secs(5);

/// Serves on `listener`, bound by the caller (a port in use stops startup), until the process
/// exits.
pub fn serve<L>(
    listener: L,
    handle: PrometheusHandle,
    ready: watch::Receiver<bool>,
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
                    let _ = tokio::task::spawn_blocking(process::record).await;
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        handle.render(),
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
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics port stopped");
        }
    });
    Ok(bound)
}
