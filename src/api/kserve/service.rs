//! The `inference.GRPCInferenceService` tonic service: health and metadata answered here,
//! inference handed to `request` (read), `infer` (run) and `stream` (ModelStreamInfer).

use crate::error::bounded;
use crate::telemetry::metrics;
use crate::telemetry::traces::MAX_SPAN_TEXT;
use std::sync::Arc;

use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::infer::{self, Tasks};
use super::metadata;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::*;
use super::request;
use super::stream::{self, Responses};
use crate::api::closing::{self, Closing};
use crate::api::deadline::{self, Deadline};
use crate::api::routing;
use crate::config::{GenerationConfig, LimitsConfig};
use crate::error::Result;
use crate::registry::Registry;
use crate::tasks::limits::check_target;
use crate::tasks::routing::Routing;

const SERVER_NAME: &str = "lmserve";
/// The protocol extensions served: request and response `parameters`.
const EXTENSIONS: [&str; 1] = ["parameters"];

#[derive(Clone)]
pub struct KserveService {
    registry: Arc<Registry>,
    limits: LimitsConfig,
    generation: GenerationConfig,
    /// Ends the streams still open when a shutdown's grace period runs out.
    closing: Closing,
    /// The server's readiness as its health checks report it (`app::health` owns it).
    ready: watch::Receiver<bool>,
}

impl KserveService {
    pub fn new(registry: Arc<Registry>, closing: Closing, ready: watch::Receiver<bool>) -> Self {
        let config = registry.config();
        Self {
            limits: config.limits.clone(),
            generation: config.generation.clone(),
            registry,
            closing,
            ready,
        }
    }

    pub(super) fn tasks(&self) -> Tasks<'_> {
        Tasks {
            registry: &self.registry,
            limits: &self.limits,
            generation: &self.generation,
        }
    }

    /// Reads a request; one refused here (before its task is known) is counted as task `infer`.
    pub(super) fn read(&self, request: ModelInferRequest) -> Result<request::Request> {
        let named = self.registry.known_name(&request.model_name);
        request::read(&self.registry, &self.limits, request).inspect_err(|error| {
            metrics::request_rejected(named.as_deref().unwrap_or(""), "infer", error.kind())
        })
    }

    /// The call's routing; its answer is due by the sooner of the call's deadline and the
    /// request's own `timeout`.
    pub(super) fn routing(
        &self,
        metadata: &MetadataMap,
        deadline: Deadline,
        request: &request::Request,
    ) -> Result<Routing> {
        let mut routing = routing::routing(
            &self.registry.config().routing,
            &self.limits,
            metadata,
            deadline,
            ("parameters.route_key", request.route_key.as_deref()),
        )?;
        routing.deadline = deadline::sooner(deadline, request.timeout).map(|(at, _)| at.into_std());
        Ok(routing)
    }

    /// The target a ModelReady or ModelMetadata call names, checked like a request's model.
    fn checked_target(&self, name: &str, version: &str) -> Result<String> {
        check_target("name", name, &self.limits)?;
        metadata::target(name, version, "version")
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for KserveService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        // Answering at all is being live.
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = *self.ready.borrow();
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let target = self.checked_target(&request.name, &request.version)?;
        let ready = metadata::ready(&self.registry, &target)?;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.map(str::to_owned).to_vec(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        check_target("name", &request.name, &self.limits)?;
        let response = metadata::model_metadata(&self.registry, &request.name, &request.version)?;
        Ok(Response::new(response))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let span = tracing::info_span!("kserve_infer", model = %bounded(&request.model_name, MAX_SPAN_TEXT));
        let request = self.read(request)?;
        let routing = self.routing(&metadata, deadline, &request)?;
        let response = infer::infer(self.tasks(), request, &routing)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = Responses;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let (metadata, extensions, requests) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let responses = stream::responses(self.clone(), requests, Arc::new(metadata), deadline);
        Ok(Response::new(closing::until_closed(
            deadline::until(responses, deadline),
            self.closing.clone(),
        )))
    }
}
