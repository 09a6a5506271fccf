//! The work behind each RPC, free of gRPC types: validate, tokenize, schedule, post-process.

pub mod chat;
pub mod classify;
pub mod embed;
pub mod generate;
pub mod limits;
pub mod routing;
pub mod text;
pub mod tokenize;

use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::registry::{ModelVersion, Registry};
use crate::telemetry::call::{CallFields, CallRecord};
use crate::telemetry::metrics::{self, ModelLabels, Outcome};

/// The model version that served a request, and the route arm that chose it (if any).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServedBy {
    pub model: String,
    pub version: String,
    pub route: String,
    pub arm: String,
}

impl ServedBy {
    pub fn route_labels(&self) -> metrics::RouteLabels<'_> {
        metrics::RouteLabels {
            route: &self.route,
            arm: &self.arm,
        }
    }

    pub fn of(model: &ModelVersion) -> Self {
        Self {
            model: model.name.clone(),
            version: model.version.to_string(),
            ..Default::default()
        }
    }
}

/// Records one request's outcome, duration and sizes once it is known, in the metrics and in
/// the call's request-log record.
pub(crate) struct RequestMetrics {
    task: &'static str,
    started: Instant,
    labels: Option<ModelLabels>,
    route: (String, String),
    /// The route or model the request named, when the server knows it: the label of a request
    /// refused before a version was chosen.
    requested: String,
    input_tokens: usize,
    generated_tokens: usize,
    call: Option<CallRecord>,
    /// The caller's deadline: a request dropped after it was cut off by it, not cancelled.
    deadline: Option<Instant>,
    recorded: bool,
}

impl RequestMetrics {
    pub fn start(task: &'static str, deadline: Option<Instant>) -> Self {
        Self {
            task,
            started: Instant::now(),
            labels: None,
            route: Default::default(),
            requested: String::new(),
            input_tokens: 0,
            generated_tokens: 0,
            call: CallRecord::current(),
            deadline,
            recorded: false,
        }
    }

    /// The request's `model` field, labelled only when it names a known route or model.
    pub fn requested(&mut self, registry: &Registry, target: &str) {
        if let Some(name) = registry.known_name(target) {
            self.requested = name;
        }
    }

    pub fn route(&mut self, route: &str, arm: &str) {
        self.route = (route.to_owned(), arm.to_owned());
        self.record(|call| {
            call.route = route.to_owned();
            call.arm = arm.to_owned();
        });
    }

    /// Tokens the request fed to the model and generated.
    pub fn tokens(&mut self, input: usize, generated: usize) {
        self.input_tokens = input;
        self.generated_tokens = generated;
        // Added: one call may run several tasks (KServe's embed and classify outputs together).
        self.record(|call| {
            call.input_tokens += input;
            call.output_tokens += generated;
        });
    }

    /// How long the request waited in the model's queue (the longest of its texts).
    pub fn queued(&mut self, waited: Duration) {
        if let Some(call) = &self.call {
            call.queued(waited);
        }
    }

    pub fn model(&mut self, model: &ModelVersion) {
        self.labels = Some(model.labels.clone());
        self.record(|call| {
            call.model = model.name.clone();
            call.version = model.version.to_string();
        });
    }

    fn record(&self, change: impl FnOnce(&mut CallFields)) {
        if let Some(call) = &self.call {
            call.update(change);
        }
    }

    pub fn finish<T>(mut self, result: Result<T>) -> Result<T> {
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(error) => Outcome::Error(error.kind()),
        };
        self.record_outcome(outcome);
        result
    }

    fn record_outcome(&mut self, outcome: Outcome) {
        self.recorded = true;
        match &self.labels {
            Some(labels) => {
                let route = metrics::RouteLabels {
                    route: &self.route.0,
                    arm: &self.route.1,
                };
                metrics::request_finished(
                    labels,
                    route,
                    self.task,
                    outcome,
                    self.started.elapsed(),
                );
                metrics::request_tokens(
                    labels,
                    route,
                    self.task,
                    self.input_tokens,
                    self.generated_tokens,
                );
            }
            None => {
                if let Outcome::Error(kind) = outcome {
                    metrics::request_rejected(&self.requested, self.task, kind)
                }
            }
        }
    }
}

/// A request dropped before it finished still counts: the server's edge drops a call whose
/// `grpc-timeout` passed, and a client that goes away drops its call too. Both are failures an
/// error-rate alert must see.
impl Drop for RequestMetrics {
    fn drop(&mut self) {
        if !self.recorded {
            let kind = match self.deadline {
                // Unwinding: the work panicked, and its caller hears INTERNAL.
                _ if std::thread::panicking() => Error::Internal(String::new()).kind(),
                Some(deadline) if Instant::now() >= deadline => DEADLINE_EXCEEDED,
                _ => Error::Cancelled.kind(),
            };
            self.record_outcome(Outcome::Error(kind));
        }
    }
}

/// The outcome of a request its deadline cut off (the edge answers DEADLINE_EXCEEDED).
pub(crate) const DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// What the encoder pass returns for one text: how many tokens it had, whether it was cut,
/// and the model's outputs for it.
pub(crate) struct EncodedOutput {
    pub token_count: usize,
    pub truncated: bool,
    pub output: crate::runtime::encoder::EncoderRowOutput,
}

/// Tokenizes `texts` (each with its pair, if any) and runs them through the model's dynamic
/// batcher, each row asking for `embedding` and/or its class logits. Outputs keep input order.
pub(crate) async fn run_encoder(
    model: &std::sync::Arc<ModelVersion>,
    texts: text::EncoderTexts,
    embedding: Option<crate::runtime::encoder::Embedding>,
    pool_from: usize,
    logits: bool,
    deadline: Option<Instant>,
) -> Result<Vec<EncodedOutput>> {
    let batcher = model
        .engine
        .batcher()
        .ok_or_else(|| Error::Internal(format!("{} has no batcher", model.name)))?;
    // Before tokenizing: a request the queue cannot serve in time costs nothing more.
    let place = batcher.admit(texts.texts.len(), deadline)?;
    let started = Instant::now();
    let encoded = text::encode_all(model, texts)
        .instrument(tracing::info_span!("tokenize"))
        .await?;
    metrics::tokenize_time(&model.labels, started.elapsed());
    let shapes: Vec<(usize, bool)> = encoded.iter().map(|e| (e.ids.len(), e.truncated)).collect();
    let rows = encoded
        .into_iter()
        .map(|e| crate::runtime::encoder::EncoderRow {
            ids: e.ids,
            type_ids: e.type_ids,
            embedding,
            pool_from,
            logits,
        })
        .collect();
    let batched = batcher.submit(rows, place).await?;
    if let Some(call) = CallRecord::current() {
        call.queued(batched.queued);
    }
    Ok(shapes
        .into_iter()
        .zip(batched.outputs)
        .map(|((token_count, truncated), output)| EncodedOutput {
            token_count,
            truncated,
            output,
        })
        .collect())
}
