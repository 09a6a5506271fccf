//! The `lmserve.v1.Inference` service.

use crate::error::{Error, bounded};
use crate::telemetry::traces::MAX_SPAN_TEXT;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::closing::{self, Closing};
use super::convert;
use super::deadline::{self, Deadline};
use super::detached;
use super::edge;
use super::generate;
use super::observe;
use super::proto::inference_server::Inference;
use super::proto::{self};
use super::routing;
use crate::config::{GenerationConfig, LimitsConfig};
use crate::registry::Registry;
use crate::tasks::routing::Routing;
use crate::tasks::{classify, embed, generate as generation, tokenize};

/// Requests of one stream in flight at once; responses still leave in request order.
const STREAM_PIPELINE_DEPTH: usize = 8;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct InferenceService {
    registry: Arc<Registry>,
    limits: LimitsConfig,
    generation: GenerationConfig,
    /// Ends the streams still open when a shutdown's grace period runs out.
    closing: Closing,
}

impl InferenceService {
    pub fn new(registry: Arc<Registry>, closing: Closing) -> Self {
        let config = registry.config();
        Self {
            limits: config.limits.clone(),
            generation: config.generation.clone(),
            registry,
            closing,
        }
    }

    /// A response stream that ends at the call's deadline or when the server closes streams.
    fn bounded<T: Send + 'static>(
        &self,
        responses: ResponseStream<T>,
        deadline: Deadline,
    ) -> ResponseStream<T> {
        closing::until_closed(deadline::until(responses, deadline), self.closing.clone())
    }

    fn generation_limits(&self) -> generation::Limits<'_> {
        generation::Limits {
            request: &self.limits,
            generation: &self.generation,
        }
    }

    /// The routing key and pin of a request: its `route_key` field, else the configured headers.
    fn routing(
        &self,
        metadata: &MetadataMap,
        deadline: Deadline,
        route_key: &str,
    ) -> crate::error::Result<Routing> {
        routing::routing(
            &self.registry.config().routing,
            &self.limits,
            metadata,
            deadline,
            ("route_key", Some(route_key)),
        )
    }

    async fn embed_one(
        &self,
        request: proto::EmbedRequest,
        metadata: &MetadataMap,
        deadline: Deadline,
    ) -> Result<proto::EmbedResponse, Status> {
        let routing = self.routing(metadata, deadline, &request.route_key)?;
        let params = convert::embed_params(request)?;
        let span = tracing::info_span!("embed", model = %bounded(&params.model, MAX_SPAN_TEXT), texts = params.texts.len());
        let output = embed::embed(&self.registry, &self.limits, params, &routing)
            .instrument(span)
            .await?;
        Ok(convert::embed_response(output))
    }

    async fn classify_one(
        &self,
        request: proto::ClassifyRequest,
        metadata: &MetadataMap,
        deadline: Deadline,
    ) -> Result<proto::ClassifyResponse, Status> {
        let routing = self.routing(metadata, deadline, &request.route_key)?;
        let params = convert::classify_params(request)?;
        let span = tracing::info_span!("classify", model = %bounded(&params.model, MAX_SPAN_TEXT), texts = params.texts.len());
        let output = classify::classify(&self.registry, &self.limits, params, &routing)
            .instrument(span)
            .await?;
        Ok(convert::classify_response(output))
    }
}

/// Answers each message of `requests` with `handle`, in order; the first failure ends the stream.
/// Each message's work runs on its own task, so a client that stops reading cannot hold the
/// queue places of the messages in flight (`detached`).
fn ordered<Req, Resp, F, Fut>(requests: Streaming<Req>, handle: F) -> ResponseStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let responses = requests
        .map(move |message| {
            let handled = message.map(|message| detached::spawn(handle(message)));
            async move {
                match handled {
                    Ok(work) => work.await.and_then(|answered| answered),
                    // A message the stream could not read: too large, or not protobuf.
                    Err(status) => Err(edge::incoming_status(status)),
                }
            }
        })
        .buffered(STREAM_PIPELINE_DEPTH);
    // Stop after the first error: a stream's status ends it.
    let mut failed = false;
    Box::pin(responses.take_while(move |result| {
        let keep = !failed;
        failed |= result.is_err();
        futures::future::ready(keep)
    }))
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn generate(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::GenerateResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let routing = self.routing(&metadata, deadline, &request.route_key)?;
        let params = generate::params(request);
        let span = tracing::info_span!("generate", model = %bounded(&params.model, MAX_SPAN_TEXT));
        let output =
            generation::generate(&self.registry, self.generation_limits(), params, &routing)
                .instrument(span)
                .await?;
        Ok(Response::new(generate::response(output)))
    }

    type GenerateStreamStream = generate::GenerateEventStream;

    async fn generate_stream(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let routing = self.routing(&metadata, deadline, &request.route_key)?;
        let params = generate::params(request);
        let span =
            tracing::info_span!("generate_stream", model = %bounded(&params.model, MAX_SPAN_TEXT));
        let stream = generation::start(&self.registry, self.generation_limits(), params, &routing)
            .instrument(span.clone())
            .await?;
        let events = observe::in_span(generate::stream(stream, self.closing.clone()), span);
        Ok(Response::new(deadline::until(events, deadline)))
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        self.embed_one(request, &metadata, deadline)
            .await
            .map(Response::new)
    }

    type EmbedStreamStream = ResponseStream<proto::EmbedResponse>;

    async fn embed_stream(
        &self,
        request: Request<Streaming<proto::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let (metadata, extensions, requests) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let (service, metadata) = (self.clone(), Arc::new(metadata));
        let responses = ordered(requests, move |message| {
            let (service, metadata) = (service.clone(), Arc::clone(&metadata));
            async move { service.embed_one(message, &metadata, deadline).await }
        });
        Ok(Response::new(self.bounded(responses, deadline)))
    }

    async fn classify(
        &self,
        request: Request<proto::ClassifyRequest>,
    ) -> Result<Response<proto::ClassifyResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        self.classify_one(request, &metadata, deadline)
            .await
            .map(Response::new)
    }

    type ClassifyStreamStream = ResponseStream<proto::ClassifyResponse>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<proto::ClassifyRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let (metadata, extensions, requests) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions);
        let (service, metadata) = (self.clone(), Arc::new(metadata));
        let responses = ordered(requests, move |message| {
            let (service, metadata) = (service.clone(), Arc::clone(&metadata));
            async move { service.classify_one(message, &metadata, deadline).await }
        });
        Ok(Response::new(self.bounded(responses, deadline)))
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions).map(|(at, _)| at.into_std());
        let input = match request.messages {
            None => tokenize::TokenizeInput::Text(request.text, request.text_pair),
            Some(_) if request.text_pair.is_some() => {
                return Err(Error::invalid(
                    "text_pair",
                    "must be unset when messages is set; a conversation has no pair",
                )
                .into());
            }
            Some(_) if !request.text.is_empty() => {
                return Err(Error::invalid(
                    "text",
                    "must be empty when messages is set; send one or the other",
                )
                .into());
            }
            Some(chat) => tokenize::TokenizeInput::Messages(generate::messages(chat)),
        };
        let output = tokenize::tokenize(
            &self.registry,
            &self.limits,
            &request.model,
            input,
            request.add_special_tokens,
            deadline,
        )
        .await?;
        Ok(Response::new(proto::TokenizeResponse {
            tokens: output
                .tokens
                .into_iter()
                .map(|t| proto::Token {
                    id: t.id,
                    text: t.text,
                    start: t.start as u32,
                    end: t.end as u32,
                    type_id: t.type_id,
                    in_pair: t.in_pair,
                })
                .collect(),
            served_by: convert::served_by(output.served_by),
            rendered_text: output.rendered.unwrap_or_default(),
        }))
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let (metadata, extensions, request) = request.into_parts();
        let deadline = deadline::from_request(&metadata, &extensions).map(|(at, _)| at.into_std());
        let output = tokenize::detokenize(
            &self.registry,
            &self.limits,
            &request.model,
            request.ids,
            request.skip_special_tokens,
            deadline,
        )
        .await?;
        Ok(Response::new(proto::DetokenizeResponse {
            text: output.text,
            served_by: convert::served_by(output.served_by),
        }))
    }
}
