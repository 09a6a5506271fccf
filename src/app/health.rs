//! The grpc.health.v1 statuses, kept in step with the registry:
//! - "" and the services (`lmserve.v1.Inference`, `lmserve.v1.Models`,
//!   `inference.GRPCInferenceService`): SERVING once the models loaded, every version or any
//!   (`server.ready_when`); what readiness probes ask, and what KServe's ServerReady answers;
//! - `liveness`: SERVING while the process serves at all, loading and draining included;
//! - `model/<name>` (any version ready) and `model/<name>@<version>`: SERVING when ready,
//!   NOT_SERVING while loading or after failing; a model no longer held has no status.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::ReadyWhen;
use crate::registry::{LoadState, Registry};

/// The whole server's statuses.
const SERVER: [&str; 4] = [
    "",
    "lmserve.v1.Inference",
    "lmserve.v1.Models",
    crate::api::kserve::SERVICE_NAME,
];
pub const LIVENESS: &str = "liveness";
/// How often model statuses are brought up to date.
const REFRESH: Duration = Duration::from_millis(500);

pub struct Health {
    reporter: Mutex<HealthReporter>,
    ready_when: ReadyWhen,
    /// Model statuses published last, to clear those of models that went away.
    published: Mutex<BTreeSet<String>>,
    /// The whole server's readiness, for services that answer it themselves (KServe's
    /// ServerReady, the metrics port's /health/ready), always the same as the health status "".
    ready: watch::Sender<bool>,
}

impl Health {
    pub async fn new(reporter: HealthReporter, ready_when: ReadyWhen) -> Arc<Self> {
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        for service in SERVER {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        Arc::new(Self {
            reporter: Mutex::new(reporter),
            ready_when,
            published: Mutex::new(BTreeSet::new()),
            ready: watch::Sender::new(false),
        })
    }

    /// Follows the whole server's readiness.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Publishes every status from the registry's state now.
    pub async fn publish(&self, registry: &Registry) {
        let mut statuses = Vec::new();
        let (mut versions, mut ready) = (0, 0);
        let mut models = std::collections::BTreeMap::<String, bool>::new();
        for slot in registry.slots() {
            let up = matches!(slot.state(), LoadState::Ready(_));
            versions += 1;
            ready += usize::from(up);
            *models.entry(slot.model.clone()).or_default() |= up;
            statuses.push((format!("model/{}@{}", slot.model, slot.version), up));
        }
        statuses.extend(
            models
                .into_iter()
                .map(|(name, up)| (format!("model/{name}"), up)),
        );
        let serving = versions == 0
            || match self.ready_when {
                ReadyWhen::All => ready == versions,
                ReadyWhen::Any => ready > 0,
            };
        let reporter = self.reporter.lock().await;
        for service in SERVER {
            reporter.set_service_status(service, status(serving)).await;
        }
        self.ready.send_replace(serving);
        let mut published = self.published.lock().await;
        let now: BTreeSet<String> = statuses.iter().map(|(name, _)| name.clone()).collect();
        for (name, up) in statuses {
            reporter.set_service_status(&name, status(up)).await;
        }
        let mut reporter = reporter;
        for gone in published.difference(&now) {
            reporter.clear_service_status(gone).await;
        }
        *published = now;
    }

    /// Keeps the statuses up to date until `stop` turns true.
    pub fn follow(self: &Arc<Self>, registry: Arc<Registry>, mut stop: watch::Receiver<bool>) {
        let health = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(REFRESH);
            loop {
                tokio::select! {
                    _ = ticker.tick() => health.publish(&registry).await,
                    () = async { let _ = stop.wait_for(|stop| *stop).await; } => return,
                }
            }
        });
    }

    /// Everything but liveness NOT_SERVING: the start of a shutdown.
    pub async fn not_serving(&self) {
        let reporter = self.reporter.lock().await;
        self.ready.send_replace(false);
        let published = self.published.lock().await;
        for service in SERVER
            .iter()
            .copied()
            .chain(published.iter().map(String::as_str))
        {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }

    /// Forgets every status: open Watch streams end, and Check answers NOT_FOUND.
    pub async fn clear(&self) {
        let mut reporter = self.reporter.lock().await;
        self.ready.send_replace(false);
        let published = self.published.lock().await;
        let all = SERVER
            .iter()
            .copied()
            .chain([LIVENESS])
            .chain(published.iter().map(String::as_str));
        for service in all {
            reporter.clear_service_status(service).await;
        }
    }
}

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
