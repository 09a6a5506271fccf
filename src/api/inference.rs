//! The `lmserve.v1.Inference` service.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert;
use super::proto::inference_server::Inference;
use super::proto::{self};
use super::generate;
use crate::config::{GenerationConfig, LimitsConfig};
use crate::registry::Registry;
use crate::tasks::{classify, embed, generate as generation, tokenize};

/// Requests of one stream in flight at once; responses still leave in request order.
const STREAM_PIPELINE_DEPTH: usize = 8;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct InferenceService {
    registry: Arc<Registry>,
    limits: LimitsConfig,
    generation: GenerationConfig,
}

impl InferenceService {
    pub fn new(registry: Arc<Registry>, limits: LimitsConfig, generation: GenerationConfig) -> Self {
        Self { registry, limits, generation }
    }

    async fn embed_one(
        &self,
        request: proto::EmbedRequest,
    ) -> Result<proto::EmbedResponse, Status> {
        let params = convert::embed_params(request)?;
        let span = tracing::info_span!("embed", model = %params.model, texts = params.texts.len());
        let output = embed::embed(&self.registry, &self.limits, params)
            .instrument(span)
            .await?;
        Ok(convert::embed_response(output))
    }

    async fn classify_one(
        &self,
        request: proto::ClassifyRequest,
    ) -> Result<proto::ClassifyResponse, Status> {
        let params = convert::classify_params(request)?;
        let span =
            tracing::info_span!("classify", model = %params.model, texts = params.texts.len());
        let output = classify::classify(&self.registry, &self.limits, params)
            .instrument(span)
            .await?;
        Ok(convert::classify_response(output))
    }
}

/// Answers each message of `requests` with `handle`, in order; the first failure ends the stream.
fn ordered<Req, Resp, F, Fut>(requests: Streaming<Req>, handle: F) -> ResponseStream<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let responses = requests
        .map(move |message| {
            let handled = message.map(&handle);
            async move {
                match handled {
                    Ok(future) => future.await,
                    Err(status) => Err(status),
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
    async fn generate(&self, request: Request<proto::GenerateRequest>) -> Result<Response<proto::GenerateResponse>, Status> {
        let params = generate::params(request.into_inner());
        let span = tracing::info_span!("generate", model = %params.model);
        let output = generation::generate(&self.registry, &self.generation, params).instrument(span).await?;
        Ok(Response::new(generate::response(output)))
    }

    type GenerateStreamStream = generate::GenerateEventStream;

    async fn generate_stream(&self, request: Request<proto::GenerateRequest>) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let params = generate::params(request.into_inner());
        let span = tracing::info_span!("generate_stream", model = %params.model);
        let stream = generation::start(&self.registry, &self.generation, params).instrument(span).await?;
        Ok(Response::new(generate::stream(stream)))
    }

    async fn embed(
        &self,
        request: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        self.embed_one(request.into_inner())
            .await
            .map(Response::new)
    }

    type EmbedStreamStream = ResponseStream<proto::EmbedResponse>;

    async fn embed_stream(
        &self,
        request: Request<Streaming<proto::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let service = self.clone();
        Ok(Response::new(ordered(
            request.into_inner(),
            move |message| {
                let service = service.clone();
                async move { service.embed_one(message).await }
            },
        )))
    }

    async fn classify(
        &self,
        request: Request<proto::ClassifyRequest>,
    ) -> Result<Response<proto::ClassifyResponse>, Status> {
        self.classify_one(request.into_inner())
            .await
            .map(Response::new)
    }

    type ClassifyStreamStream = ResponseStream<proto::ClassifyResponse>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<proto::ClassifyRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let service = self.clone();
        Ok(Response::new(ordered(
            request.into_inner(),
            move |message| {
                let service = service.clone();
                async move { service.classify_one(message).await }
            },
        )))
    }

    async fn tokenize(
        &self,
        request: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let request = request.into_inner();
        let output = tokenize::tokenize(
            &self.registry,
            &request.model,
            &request.text,
            request.add_special_tokens,
        )?;
        Ok(Response::new(proto::TokenizeResponse {
            tokens: output
                .tokens
                .into_iter()
                .map(|t| proto::Token {
                    id: t.id,
                    text: t.text,
                    start: t.start as u32,
                    end: t.end as u32,
                })
                .collect(),
            served_by: convert::served_by(output.served_by),
        }))
    }

    async fn detokenize(
        &self,
        request: Request<proto::DetokenizeRequest>,
    ) -> Result<Response<proto::DetokenizeResponse>, Status> {
        let request = request.into_inner();
        let output = tokenize::detokenize(
            &self.registry,
            &request.model,
            &request.ids,
            request.skip_special_tokens,
        )?;
        Ok(Response::new(proto::DetokenizeResponse {
            text: output.text,
            served_by: convert::served_by(output.served_by),
        }))
    }
}
