//! The metrics catalogue: every metric lmserve exports, declared once with its unit and help
//! text, and recorded through typed helpers so label sets stay consistent.

use std::time::Duration;

pub use metrics::Histogram;
use metrics::{
    Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "lmserve_requests_total";
pub const REQUEST_SECONDS: &str = "lmserve_request_duration_seconds";
pub const QUEUE_SECONDS: &str = "lmserve_queue_duration_seconds";
pub const TOKENIZE_SECONDS: &str = "lmserve_tokenize_duration_seconds";
pub const INFERENCE_SECONDS: &str = "lmserve_inference_duration_seconds";
pub const BATCH_SIZE: &str = "lmserve_batch_size_rows";
pub const BATCH_TOKENS: &str = "lmserve_batch_padded_tokens";
pub const BATCH_LANE_TOTAL: &str = "lmserve_batch_lane_total";
pub const QUEUE_DEPTH: &str = "lmserve_queue_depth_texts";
pub const QUEUE_REJECTED_TOTAL: &str = "lmserve_queue_rejected_total";
pub const INPUT_TOKENS_TOTAL: &str = "lmserve_input_tokens_total";
pub const MODELS_LOADED: &str = "lmserve_models_loaded";
pub const SHADOW_REQUESTS_TOTAL: &str = "lmserve_shadow_requests_total";
pub const SHADOW_SECONDS: &str = "lmserve_shadow_duration_seconds";
pub const PREFILL_SECONDS: &str = "lmserve_prefill_duration_seconds";
pub const DECODE_STEP_SECONDS: &str = "lmserve_decode_step_duration_seconds";
pub const DECODE_BATCH_SIZE: &str = "lmserve_decode_batch_size_sequences";
pub const GENERATED_TOKENS_TOTAL: &str = "lmserve_generated_tokens_total";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "lmserve_time_to_first_token_seconds";
pub const INTER_TOKEN_SECONDS: &str = "lmserve_inter_token_latency_seconds";
pub const REQUEST_INPUT_TOKENS: &str = "lmserve_request_input_tokens";
pub const REQUEST_OUTPUT_TOKENS: &str = "lmserve_request_output_tokens";
pub const BUILD_INFO: &str = "lmserve_build_info";
pub const GRPC_CALLS_TOTAL: &str = "lmserve_grpc_calls_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "lmserve_connections_refused_total";
pub const RESPONSES_UNREAD_TOTAL: &str = "lmserve_responses_unread_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Whole requests and waits: a generation of a few thousand tokens, or a queue under load,
/// takes minutes, which the buckets above would all put past 10 s.
const LONG_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0,
];

/// Labels that identify one model version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLabels {
    pub model: String,
    pub version: String,
}

/// The route and arm a request went through; empty strings when it named a model directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLabels<'a> {
    pub route: &'a str,
    pub arm: &'a str,
}

/// How a request ended, for `lmserve_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error(&'static str),
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(kind) => kind,
        }
    }
}

/// Installs the Prometheus recorder and describes every metric; `telemetry::http` serves what
/// the returned handle renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        // Full names take precedence over the suffix.
        .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.into()), LONG_SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(TIME_TO_FIRST_TOKEN_SECONDS.into()),
            LONG_SECONDS_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(QUEUE_SECONDS.into()), LONG_SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SHADOW_SECONDS.into()), LONG_SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DECODE_BATCH_SIZE.into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_INPUT_TOKENS.into()), SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_OUTPUT_TOKENS.into()), SIZE_BUCKETS)?
        .install_recorder()
        .map_err(|error| anyhow::anyhow!("cannot install the metrics recorder: {error}"))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "ort_api" => ort::MINOR_VERSION.to_string()).set(1.0);
    Ok(handle)
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests by model, version, task and outcome."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time from request arrival to response, by model, version and task."
    );
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Time a text waited in the batch queue."
    );
    describe_histogram!(
        TOKENIZE_SECONDS,
        Unit::Seconds,
        "Time spent tokenizing one request."
    );
    describe_histogram!(
        INFERENCE_SECONDS,
        Unit::Seconds,
        "Time of one session run (one batch)."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Rows in one session run.");
    describe_histogram!(
        BATCH_TOKENS,
        Unit::Count,
        "Padded tokens (rows x longest row) in one session run."
    );
    describe_counter!(
        BATCH_LANE_TOTAL,
        Unit::Count,
        "Encoder runs by lane: wide (every core of the shared pool) or narrow (one core each)."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Texts waiting in the batch queue."
    );
    describe_counter!(
        QUEUE_REJECTED_TOTAL,
        Unit::Count,
        "Requests refused because the queue was full."
    );
    describe_counter!(
        INPUT_TOKENS_TOTAL,
        Unit::Count,
        "Tokens fed to models, by model, version, route, arm and task."
    );
    describe_gauge!(MODELS_LOADED, Unit::Count, "Model versions by load state.");
    describe_counter!(
        SHADOW_REQUESTS_TOTAL,
        Unit::Count,
        "Shadow copies by route, shadow arm and outcome (ok, an error kind, or dropped under load)."
    );
    describe_histogram!(
        SHADOW_SECONDS,
        Unit::Seconds,
        "Duration of shadow copies, by route and shadow arm."
    );
    describe_histogram!(
        PREFILL_SECONDS,
        Unit::Seconds,
        "Time of one prefill run (prompts joining the decode batch)."
    );
    describe_histogram!(
        DECODE_STEP_SECONDS,
        Unit::Seconds,
        "Time of one decode step over the whole batch."
    );
    describe_histogram!(
        DECODE_BATCH_SIZE,
        Unit::Count,
        "Sequences in one decode step."
    );
    describe_counter!(
        GENERATED_TOKENS_TOTAL,
        Unit::Count,
        "Tokens generated, by model, version, route and arm."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from request arrival to its first generated token, by model, version, route and arm."
    );
    describe_histogram!(
        INTER_TOKEN_SECONDS,
        Unit::Seconds,
        "Time between two consecutive tokens of one request, as its caller receives them."
    );
    describe_histogram!(
        REQUEST_INPUT_TOKENS,
        Unit::Count,
        "Tokens one request fed to the model (all its texts, or its prompt)."
    );
    describe_histogram!(
        REQUEST_OUTPUT_TOKENS,
        Unit::Count,
        "Tokens one generate request produced (all its sequences)."
    );
    describe_counter!(
        GRPC_CALLS_TOTAL,
        Unit::Count,
        "gRPC calls by method and the status code the client got, counted as each call ends."
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Connections closed as they were accepted because their client address held \
         server.max_connections_per_client already."
    );
    describe_counter!(
        RESPONSES_UNREAD_TOTAL,
        Unit::Count,
        "Responses dropped before they were sent whole, because their client took nothing \
         more of them for server.response_stall_timeout_ms."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; its labels say which lmserve version and ONNX Runtime API level run."
    );
}

pub fn request_finished(
    labels: &ModelLabels,
    route: RouteLabels<'_>,
    task: &'static str,
    outcome: Outcome,
    elapsed: Duration,
) {
    counter!(
        REQUESTS_TOTAL,
        "model" => labels.model.clone(),
        "version" => labels.version.clone(),
        "route" => route.route.to_owned(),
        "arm" => route.arm.to_owned(),
        "task" => task,
        "outcome" => outcome.as_str()
    )
    .increment(1);
    histogram!(
        REQUEST_SECONDS,
        "model" => labels.model.clone(),
        "version" => labels.version.clone(),
        "route" => route.route.to_owned(),
        "arm" => route.arm.to_owned(),
        "task" => task
    )
    .record(elapsed);
}

/// One gRPC call ended with `code`; `method` is the call's path when the server serves it, else
/// "other", so that no client can add a series by naming methods.
pub fn grpc_call(method: &str, code: &'static str) {
    counter!(GRPC_CALLS_TOTAL, "method" => method.to_owned(), "code" => code).increment(1);
}

/// A connection closed as it was accepted, its client being at its limit of connections.
pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED_TOTAL).increment(1);
}

/// A response dropped before it was sent whole, its client having taken nothing more of it
/// for the stall timeout.
pub fn response_unread() {
    counter!(RESPONSES_UNREAD_TOTAL).increment(1);
}

/// A request that failed before a model version was chosen (unknown model, bad argument).
/// `requested` is the route or model it named when the server knows that name, else empty.
pub fn request_rejected(requested: &str, task: &'static str, kind: &'static str) {
    counter!(REQUESTS_TOTAL, "model" => requested.to_owned(), "version" => "", "route" => "", "arm" => "", "task" => task, "outcome" => kind).increment(1);
}

pub fn request_tokens(
    labels: &ModelLabels,
    route: RouteLabels<'_>,
    task: &'static str,
    input: usize,
    generated: usize,
) {
    let labels = [
        ("model", labels.model.clone()),
        ("version", labels.version.clone()),
        ("route", route.route.to_owned()),
        ("arm", route.arm.to_owned()),
        ("task", task.to_owned()),
    ];
    counter!(INPUT_TOKENS_TOTAL, &labels).increment(input as u64);
    histogram!(REQUEST_INPUT_TOKENS, &labels).record(input as f64);
    if task == "generate" {
        counter!(GENERATED_TOKENS_TOTAL, &labels).increment(generated as u64);
        histogram!(REQUEST_OUTPUT_TOKENS, &labels).record(generated as f64);
    }
}

pub fn tokenize_time(labels: &ModelLabels, elapsed: Duration) {
    histogram!(TOKENIZE_SECONDS, "model" => labels.model.clone(), "version" => labels.version.clone()).record(elapsed);
}

pub fn queue_time(labels: &ModelLabels, elapsed: Duration) {
    histogram!(QUEUE_SECONDS, "model" => labels.model.clone(), "version" => labels.version.clone())
        .record(elapsed);
}

pub fn inference_time(labels: &ModelLabels, elapsed: Duration) {
    histogram!(INFERENCE_SECONDS, "model" => labels.model.clone(), "version" => labels.version.clone()).record(elapsed);
}

pub fn batch_formed(labels: &ModelLabels, rows: usize, padded_tokens: usize) {
    histogram!(BATCH_SIZE, "model" => labels.model.clone(), "version" => labels.version.clone())
        .record(rows as f64);
    histogram!(BATCH_TOKENS, "model" => labels.model.clone(), "version" => labels.version.clone())
        .record(padded_tokens as f64);
}

/// One encoder run started on `lane` ("wide" or "narrow").
pub fn batch_lane(labels: &ModelLabels, lane: &'static str) {
    counter!(BATCH_LANE_TOTAL, "model" => labels.model.clone(), "version" => labels.version.clone(), "lane" => lane)
        .increment(1);
}

pub fn queue_depth(labels: &ModelLabels, depth: usize) {
    gauge!(QUEUE_DEPTH, "model" => labels.model.clone(), "version" => labels.version.clone())
        .set(depth as f64);
}

pub fn queue_rejected(labels: &ModelLabels) {
    counter!(QUEUE_REJECTED_TOTAL, "model" => labels.model.clone(), "version" => labels.version.clone()).increment(1);
}

pub fn models_loaded(state: &'static str, count: usize) {
    gauge!(MODELS_LOADED, "state" => state).set(count as f64);
}

/// One generating model's per-step instruments, looked up once. The decode loop records them on
/// every step, where building the label set and finding the series each time would be a cost
/// of every token.
pub struct DecodeLoopMetrics {
    prefill_seconds: Histogram,
    step_seconds: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge,
}

impl DecodeLoopMetrics {
    pub fn new(labels: &ModelLabels) -> Self {
        let (model, version) = (labels.model.clone(), labels.version.clone());
        Self {
            prefill_seconds: histogram!(PREFILL_SECONDS, "model" => model.clone(), "version" => version.clone()),
            step_seconds: histogram!(DECODE_STEP_SECONDS, "model" => model.clone(), "version" => version.clone()),
            batch_size: histogram!(DECODE_BATCH_SIZE, "model" => model.clone(), "version" => version.clone()),
            queue_depth: gauge!(QUEUE_DEPTH, "model" => model, "version" => version),
        }
    }

    pub fn prefill(&self, elapsed: Duration) {
        self.prefill_seconds.record(elapsed);
    }

    pub fn decode_step(&self, elapsed: Duration, sequences: usize) {
        self.step_seconds.record(elapsed);
        self.batch_size.record(sequences as f64);
    }

    pub fn queue_depth(&self, depth: usize) {
        self.queue_depth.set(depth as f64);
    }
}

pub fn time_to_first_token(labels: &ModelLabels, route: RouteLabels<'_>, elapsed: Duration) {
    histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        "model" => labels.model.clone(),
        "version" => labels.version.clone(),
        "route" => route.route.to_owned(),
        "arm" => route.arm.to_owned()
    )
    .record(elapsed);
}

/// The inter-token histogram of one generate request's model and route, looked up once per
/// request rather than once per token.
pub fn inter_token(labels: &ModelLabels, route: RouteLabels<'_>) -> Histogram {
    histogram!(
        INTER_TOKEN_SECONDS,
        "model" => labels.model.clone(),
        "version" => labels.version.clone(),
        "route" => route.route.to_owned(),
        "arm" => route.arm.to_owned()
    )
}

pub fn shadow_finished(route: &str, arm: &str, outcome: &'static str) {
    counter!(SHADOW_REQUESTS_TOTAL, "route" => route.to_owned(), "arm" => arm.to_owned(), "outcome" => outcome).increment(1);
}

pub fn shadow_time(route: &str, arm: &str, elapsed: Duration) {
    histogram!(SHADOW_SECONDS, "route" => route.to_owned(), "arm" => arm.to_owned())
        .record(elapsed);
}
