//! grpc.health.v1, with the per-model statuses behind an inference key when the server has
//! API keys. Probes and load balancers ask the server's own statuses ("", the service names,
//! `liveness`), which stay open; `model/<name>` would tell a caller without a key which models
//! exist, since an unknown one answers NOT_FOUND.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService, WatchStream};

use super::auth::{KeyRing, health_scope};

/// What every model's statuses start with: `model/<name>` and `model/<name>@<version>`.
pub const MODEL_PREFIX: &str = "model/";

/// The health service over `reporter`'s statuses, checking `keys` where a status needs one.
pub fn server(reporter: &HealthReporter, keys: Option<Arc<KeyRing>>) -> HealthServer<KeyedHealth> {
    HealthServer::new(KeyedHealth {
        statuses: HealthService::from_health_reporter(reporter.clone()),
        keys,
    })
}

pub struct KeyedHealth {
    statuses: HealthService,
    keys: Option<Arc<KeyRing>>,
}

impl KeyedHealth {
    fn authorize(&self, request: &Request<HealthCheckRequest>) -> Result<(), Status> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        keys.check_scope(health_scope(&request.get_ref().service), authorization)
    }
}

#[tonic::async_trait]
impl Health for KeyedHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.authorize(&request)?;
        self.statuses.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&request)?;
        self.statuses.watch(request).await
    }
}
