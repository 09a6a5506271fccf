//! Shutdown in the order load balancers need. On SIGTERM or SIGINT: every health status turns
//! NOT_SERVING at once (Watch streams hear it) while the server keeps serving for
//! `server.drain_delay_ms`, the time an endpoint update takes to reach the balancers; then the
//! health statuses are cleared, which ends the Watch streams, and the listeners stop accepting;
//! calls in flight have `server.shutdown_grace_ms` to finish; streams still open after that get
//! a closing message and UNAVAILABLE.

use std::sync::Arc;
use std::time::Duration;

use super::health::Health;
use crate::api::closing::CloseStreams;
use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// After the streams are closed, how long the listeners get to send their last messages.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

pub struct Shutdown {
    pub health: Arc<Health>,
    /// Stops the health updates, which would otherwise turn statuses back to SERVING.
    pub stop_health: watch::Sender<bool>,
    pub drain_delay: Duration,
    pub grace: Duration,
    /// Tells every listener to stop accepting.
    pub stop: watch::Sender<bool>,
    pub close_streams: CloseStreams,
}

type Served = JoinHandle<Result<(), tonic::transport::Error>>;

impl Shutdown {
    pub async fn run(self, mut servers: Vec<Served>) -> anyhow::Result<()> {
        tracing::info!(
            drain_ms = self.drain_delay.as_millis() as u64,
            "shutting down: NOT_SERVING, still serving while balancers drop this endpoint"
        );
        self.stop_health.send_replace(true);
        self.health.not_serving().await;
        tokio::time::sleep(self.drain_delay).await;
        // Watch streams would hold the graceful stop for the whole grace period.
        self.health.clear().await;
        self.stop.send_replace(true);
        tracing::info!(
            grace_ms = self.grace.as_millis() as u64,
            "no longer accepting connections; waiting for calls in flight"
        );
        let finished = tokio::time::timeout(self.grace, join_all(servers.iter_mut())).await;
        let results = match finished {
            Ok(results) => results,
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.grace.as_millis() as u64,
                    "calls still in flight after the grace period; closing their streams"
                );
                self.close_streams.fire();
                match tokio::time::timeout(CLOSE_FLUSH, join_all(servers.iter_mut())).await {
                    Ok(results) => results,
                    Err(_) => {
                        tracing::warn!("unary calls still running; exiting without them");
                        return Ok(());
                    }
                }
            }
        };
        for result in results {
            result??;
        }
        tracing::info!("shut down");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
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
