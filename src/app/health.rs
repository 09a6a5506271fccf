//! The grpc.health.v1 statuses, kept in step with the registry:
//! - "" and the services (`lmserve.v1.Inference`, `lmserve.v1.Models`,
//!   `inference.GRPCInferenceService`): SERVING once the models loaded, every version or any
//!   (`server.ready_when`); what readiness probes ask, and what KServe's ServerReady answers;
//! - `liveness`: SERVING while the process serves at all, loading and draining included;
//! - `model/<name>` (any version ready) and `model/<name>@<version>`: SERVING when ready,
//!   NOT_SERVING while loading or after failing; a model no longer held has no status. With
//!   API keys, these need an inference key (`api::health`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::health::MODEL_PREFIX;
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
    reporter: Mutex<Reporter>,
    ready_when: ReadyWhen,
    /// The whole server's readiness, for services that answer it themselves (KServe's
    /// ServerReady, the metrics port's /health/ready), always the same as the health status "".
    ready: watch::Sender<bool>,
}

/// The health service's statuses and what they were last set to, changed under one lock.
struct Reporter {
    reporter: HealthReporter,
    /// Each status as last set. Setting a status sends it to every Watch stream of that service
    /// even when it is unchanged, so a refresh sets only those that changed.
    statuses: BTreeMap<String, ServingStatus>,
    /// Model statuses published last, to clear those of models that went away.
    models: BTreeSet<String>,
    /// Set once the shutdown began: a refresh after it must not turn anything SERVING again.
    draining: bool,
    /// Set once the server was first ready: from then on `ReadyWhen::All` asks only that some
    /// version serves (below).
    was_ready: bool,
}

impl Reporter {
    async fn set(&mut self, service: &str, status: ServingStatus) {
        if self.statuses.get(service) != Some(&status) {
            self.reporter.set_service_status(service, status).await;
            self.statuses.insert(service.to_owned(), status);
        }
    }

    async fn clear(&mut self, service: &str) {
        self.reporter.clear_service_status(service).await;
        self.statuses.remove(service);
    }

    /// The server's readiness services and every model's, as published last.
    fn readiness_services(&self) -> Vec<String> {
        SERVER
            .iter()
            .map(|service| (*service).to_owned())
            .chain(self.models.iter().cloned())
            .collect()
    }
}

impl Health {
    pub async fn new(reporter: HealthReporter, ready_when: ReadyWhen) -> Arc<Self> {
        let mut reporter = Reporter {
            reporter,
            statuses: BTreeMap::new(),
            models: BTreeSet::new(),
            draining: false,
            was_ready: false,
        };
        reporter.set(LIVENESS, ServingStatus::Serving).await;
        for service in SERVER {
            reporter.set(service, ServingStatus::NotServing).await;
        }
        Arc::new(Self {
            reporter: Mutex::new(reporter),
            ready_when,
            ready: watch::Sender::new(false),
        })
    }

    /// Follows the whole server's readiness.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Publishes every status from the registry's state now (nothing once draining).
    pub async fn publish(&self, registry: &Registry) {
        // A version that fails at run time changes state without a load or unload; its gauge
        // follows here, as its health status does.
        registry.record_load_states();
        let mut statuses = Vec::new();
        let (mut versions, mut ready) = (0, 0);
        let mut models = std::collections::BTreeMap::<String, bool>::new();
        for slot in registry.slots() {
            let up = matches!(slot.state(), LoadState::Ready(_));
            versions += 1;
            ready += usize::from(up);
            *models.entry(slot.model.clone()).or_default() |= up;
            statuses.push((format!("{MODEL_PREFIX}{}@{}", slot.model, slot.version), up));
        }
        statuses.extend(
            models
                .into_iter()
                .map(|(name, up)| (format!("{MODEL_PREFIX}{name}"), up)),
        );
        let mut reporter = self.reporter.lock().await;
        if reporter.draining {
            return;
        }
        // "All" holds traffic back until every version found at startup loaded. A version that
        // comes later (a repository scan, LoadModel) reaches every replica of a deployment at
        // about the same time: were it counted, all of them would leave the rotation while it
        // loads, and stay out should it fail. Its own statuses say how it is.
        let serving = versions == 0
            || match self.ready_when {
                ReadyWhen::All => ready == versions || (reporter.was_ready && ready > 0),
                ReadyWhen::Any => ready > 0,
            };
        reporter.was_ready |= serving;
        for service in SERVER {
            reporter.set(service, status(serving)).await;
        }
        self.ready.send_replace(serving);
        let now: BTreeSet<String> = statuses.iter().map(|(name, _)| name.clone()).collect();
        for (name, up) in statuses {
            reporter.set(&name, status(up)).await;
        }
        let gone: Vec<String> = reporter.models.difference(&now).cloned().collect();
        for name in gone {
            reporter.clear(&name).await;
        }
        reporter.models = now;
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
        let mut reporter = self.reporter.lock().await;
        reporter.draining = true;
        self.ready.send_replace(false);
        for service in reporter.readiness_services() {
            reporter.set(&service, ServingStatus::NotServing).await;
        }
    }

    /// Forgets every status: open Watch streams end, and Check answers NOT_FOUND.
    pub async fn clear(&self) {
        let mut reporter = self.reporter.lock().await;
        reporter.draining = true;
        self.ready.send_replace(false);
        for service in reporter.readiness_services() {
            reporter.clear(&service).await;
        }
        reporter.clear(LIVENESS).await;
    }
}

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
