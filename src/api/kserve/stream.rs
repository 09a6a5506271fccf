//! ModelStreamInfer: every request of the stream answered by its own responses, several in
//! flight at once, their responses interleaved and told apart by `id`. A generate request whose
//! `stream` input is true gets one response per generated token (its text delta) and then a
//! last one, marked by the `triton_final_response` parameter as Triton marks a decoupled
//! model's; any other request gets one response, marked final too. A request that fails gets an `error_message` response
//! and the stream goes on, as Triton's does; only a message the stream cannot read ends it.

use crate::error::bounded;
use crate::tasks::limits::MOST_PIN_BYTES;
use crate::telemetry::traces::MAX_SPAN_TEXT;
use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::infer::{self, Reply, count, finish_reason, response_parameters, text_output};
use super::proto::infer_parameter::ParameterChoice;
use super::proto::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use super::request::Work;
use super::service::KserveService;
use crate::api::deadline::Deadline;
use crate::api::detached;
use crate::api::edge;
use crate::error::{Error, Result};
use crate::tasks::generate::driver::Event;
use crate::tasks::generate::{self as generation, GenerationStream};

/// Requests of one stream answered at once; later ones wait for one of these to finish.
const REQUESTS_IN_FLIGHT: usize = 8;
/// The response parameter that marks a request's last response.
pub const FINAL_RESPONSE: &str = "triton_final_response";

pub type Responses = BoxStream<'static, Result<ModelStreamInferResponse, Status>>;

/// The responses to every request of `requests`.
pub fn responses(
    service: KserveService,
    requests: Streaming<ModelInferRequest>,
    metadata: Arc<MetadataMap>,
    deadline: Deadline,
) -> Responses {
    let responses = requests
        .map(move |message| match message {
            Ok(request) => answer(service.clone(), request, Arc::clone(&metadata), deadline),
            // A message the stream could not read: too large, or not protobuf.
            Err(status) => stream::iter([Err(edge::incoming_status(status))]).boxed(),
        })
        .flatten_unordered(REQUESTS_IN_FLIGHT);
    // A status ends the stream: nothing is sent after it.
    let mut failed = false;
    responses
        .take_while(move |result| {
            let keep = !failed;
            failed |= result.is_err();
            futures::future::ready(keep)
        })
        .boxed()
}

/// The responses to one request: its stream of tokens, its one answer, or its error.
fn answer(
    service: KserveService,
    request: ModelInferRequest,
    metadata: Arc<MetadataMap>,
    deadline: Deadline,
) -> Responses {
    // A failure carries the id and name too, so the client can tell which request failed;
    // bounded, as one refused for too long an id must not have it sent back whole.
    let most = service.tasks().limits.max_name_bytes;
    let failed = Reply {
        id: bounded(&request.id, most).into_owned(),
        // A name at the limit may carry a version pin past it.
        model_name: bounded(&request.model_name, most + MOST_PIN_BYTES).into_owned(),
        layout: super::tensors::Layout::Typed,
    };
    let span = tracing::info_span!("kserve_stream_infer", model = %bounded(&request.model_name, MAX_SPAN_TEXT));
    // On its own task: a client that stops reading cannot hold the queue places it took.
    detached::spawn(start(service, request, metadata, deadline).instrument(span))
        .map(move |started| match started {
            Ok(Ok(responses)) => responses,
            Ok(Err(error)) => stream::iter([Ok(failure(&failed, error))]).boxed(),
            // The work panicked: this request fails, as any other failure, and the stream goes on.
            Err(status) => {
                let error = Error::Internal(status.message().to_owned());
                stream::iter([Ok(failure(&failed, error))]).boxed()
            }
        })
        .flatten_stream()
        .boxed()
}

async fn start(
    service: KserveService,
    request: ModelInferRequest,
    metadata: Arc<MetadataMap>,
    deadline: Deadline,
) -> Result<Responses> {
    let request = service.read(request)?;
    let routing = service.routing(&metadata, deadline, &request)?;
    let tasks = service.tasks();
    match request.work {
        // As Triton's vLLM backend, only when the `stream` input says so; otherwise one response.
        Work::Generate {
            params,
            shape,
            stream: true,
            ..
        } => {
            let generation =
                generation::start(tasks.registry, tasks.generation_limits(), params, &routing)
                    .await
                    .map_err(|error| request.names.apply(error))?;
            Ok(tokens(request.reply, generation, shape))
        }
        _ => {
            let mut response = infer::infer(tasks, request, &routing).await?;
            mark_final(&mut response, true);
            Ok(stream::iter([Ok(answered(response))]).boxed())
        }
    }
}

fn answered(response: ModelInferResponse) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(response),
    }
}

fn mark_final(response: &mut ModelInferResponse, last: bool) {
    response.parameters.extend(response_parameters(vec![(
        FINAL_RESPONSE,
        ParameterChoice::BoolParam(last),
    )]));
}

/// A failed request's one response: the error, with the request's id, marked final.
fn failure(reply: &Reply, error: Error) -> ModelStreamInferResponse {
    let status = Status::from(error);
    let mut response = ModelInferResponse {
        model_name: reply.model_name.clone(),
        id: reply.id.clone(),
        ..Default::default()
    };
    mark_final(&mut response, true);
    ModelStreamInferResponse {
        error_message: format!("{:?}: {}", status.code(), status.message()),
        infer_response: Some(response),
    }
}

/// One response per generated token, then the last one with what the generation ended with.
/// Dropping the stream (the client went away or cancelled) cancels the generation.
fn tokens(reply: Reply, generation: GenerationStream, shape: Vec<i64>) -> Responses {
    stream::unfold(Some(generation), move |generation| {
        let (reply, shape) = (reply.clone(), shape.clone());
        async move {
            let mut generation = generation?;
            loop {
                let (text, parameters) = match generation.next().await? {
                    Event::Started { .. } => continue,
                    Event::Token { text, .. } => (text, Vec::new()),
                    Event::Finished { text, reason, .. } => (
                        text,
                        vec![
                            ("finish_reason", finish_reason(reason)),
                            ("prompt_tokens", count(generation.prompt_tokens)),
                            ("generated_tokens", count(generation.generated_tokens())),
                        ],
                    ),
                    Event::Failed { error, .. } => {
                        let failed = failure(&reply, Error::Run(error));
                        return Some((Ok(failed), None));
                    }
                };
                let mut response = reply.response(
                    &generation.served_by,
                    vec![text_output(text, shape)],
                    parameters,
                );
                mark_final(&mut response, generation.is_done());
                return Some((Ok(answered(response)), Some(generation)));
            }
        }
    })
    .boxed()
}
