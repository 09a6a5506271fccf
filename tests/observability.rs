//! What an operator sees: OTLP traces received by a collector running inside the test, request
//! logs in JSON, the metrics port's paths, and metric counts after a known set of requests.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer};
use lmserve::api::kserve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmserve::api::kserve::proto::infer_parameter::ParameterChoice;
use lmserve::api::kserve::proto::model_infer_request::InferInputTensor;
use lmserve::api::kserve::proto::{InferParameter, ModelInferRequest};
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{
    ClassifyRequest, EmbedRequest, GenerateRequest, GenerationParameters, Route, RouteArm,
    SetRouteRequest, ShadowArm, Task,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::StreamExt;
use tonic::Request;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// An OTLP/gRPC trace collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// The spans of one trace, once `expected` names have all arrived (or after 20 s).
    async fn trace(&self, trace_id: &[u8], expected: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|span| span.trace_id == trace_id)
                .cloned()
                .collect();
            let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
            if expected.iter().all(|name| names.contains(name)) || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

/// Checks that `spans` form one tree under the call's span (named after its method, as
/// OpenTelemetry's gRPC conventions say), whose parent is the client's span,
/// and that each `(child, parent)` pair holds. Returns the spans by name.
fn check_tree<'a>(
    spans: &'a [Span],
    rpc_name: &str,
    client_span: &[u8],
    edges: &[(&str, &str)],
) -> HashMap<&'a str, &'a Span> {
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let rpc = by_name
        .get(rpc_name)
        .unwrap_or_else(|| panic!("no {rpc_name} span in {names:?}"));
    assert_eq!(
        rpc.parent_span_id, client_span,
        "rpc continues the client's span"
    );
    for (child, parent) in edges {
        let child_span = by_name
            .get(child)
            .unwrap_or_else(|| panic!("no {child} span in {names:?}"));
        let parent_span = by_id
            .get(child_span.parent_span_id.as_slice())
            .unwrap_or_else(|| panic!("{child}'s parent is not in the trace: {names:?}"));
        assert_eq!(parent_span.name, *parent, "{child}'s parent");
    }
    // Every span reaches the rpc span through parents in the same trace.
    for span in spans {
        let mut current: &Span = span;
        let mut hops = 0;
        while current.name != rpc_name {
            current = by_id
                .get(current.parent_span_id.as_slice())
                .copied()
                .unwrap_or_else(|| panic!("{} is cut off from the rpc span", span.name));
            hops += 1;
            assert!(hops < 16);
        }
    }
    by_name
}

const EMBED: &str = "lmserve.v1.Inference/Embed";
const STREAM: &str = "lmserve.v1.Inference/GenerateStream";
const HEALTH: &str = "grpc.health.v1.Health/Check";

fn traceparent(trace: &[u8; 16], span: &[u8; 8]) -> String {
    format!("00-{}-{}-01", hex(trace), hex(span))
}

#[tokio::test]
async fn a_collector_receives_each_calls_span_tree_in_the_clients_trace() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("LMSERVE_TRACING__OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            // A quiet log level must not silence traces.
            ("LMSERVE_LOGGING__FILTER".into(), "error".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    // A probe like an orchestrator's, untraced, and one whose caller traces it.
    assert_eq!(server.health("").await, ServingStatus::Serving);
    let health_trace = [0x55u8; 16];
    let health_parent = [0x66u8; 8];
    let mut request = Request::new(HealthCheckRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        traceparent(&health_trace, &health_parent).parse().unwrap(),
    );
    HealthClient::new(server.channel().await)
        .check(request)
        .await
        .unwrap();

    let embed_trace = [0x11u8; 16];
    let embed_parent = [0x22u8; 8];
    let mut request = Request::new(EmbedRequest {
        model: "tiny-encoder".into(),
        texts: vec!["first text".into(), "a second one".into()],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        traceparent(&embed_trace, &embed_parent).parse().unwrap(),
    );
    client.embed(request).await.unwrap();

    let generate_trace = [0x33u8; 16];
    let generate_parent = [0x44u8; 8];
    let mut request = Request::new(GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::Text("To be, or not".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(9),
            ..Default::default()
        }),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        traceparent(&generate_trace, &generate_parent)
            .parse()
            .unwrap(),
    );
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut tokens = 0;
    while let Some(message) = stream.next().await {
        tokens += usize::from(message.unwrap().token.is_some());
    }
    assert_eq!(tokens, 9);

    let spans = collector
        .trace(
            &embed_trace,
            &[EMBED, "embed", "route", "tokenize", "queue", "batch"],
        )
        .await;
    check_tree(
        &spans,
        EMBED,
        &embed_parent,
        &[
            ("embed", EMBED),
            ("route", "embed"),
            ("tokenize", "embed"),
            ("queue", "embed"),
            ("batch", "embed"),
        ],
    );

    let expected = [
        STREAM,
        "generate_stream",
        "route",
        "tokenize",
        "queue",
        "prefill",
        "decode",
        "detokenize",
    ];
    let spans = collector.trace(&generate_trace, &expected).await;
    let by_name = check_tree(
        &spans,
        STREAM,
        &generate_parent,
        &[
            ("generate_stream", STREAM),
            ("route", "generate_stream"),
            ("tokenize", "generate_stream"),
            ("queue", "generate_stream"),
            ("prefill", "generate_stream"),
            ("decode", "generate_stream"),
            ("detokenize", "decode"),
        ],
    );
    let decode = by_name["decode"];
    assert_eq!(
        attribute(decode, "steps"),
        Some(&Value::IntValue(9)),
        "one decode span with the step count"
    );
    assert_eq!(
        spans.iter().filter(|s| s.name == "decode").count(),
        1,
        "not one span per token"
    );

    // Health probes leave no trace of their own (the server's startup made several, and so
    // did the test above); the one whose caller traced it is in the caller's trace.
    let spans = collector.trace(&health_trace, &[HEALTH]).await;
    check_tree(&spans, HEALTH, &health_parent, &[]);
    let health_spans = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|span| span.name == HEALTH)
        .count();
    assert_eq!(health_spans, 1, "only the traced probe has a span");

    let rpc = by_name[STREAM];
    assert_eq!(
        attribute(rpc, "rpc.method"),
        Some(&Value::StringValue("GenerateStream".into()))
    );
    // The rpc span lasts until the stream ended, after the decode span.
    assert!(
        rpc.end_time_unix_nano >= decode.end_time_unix_nano,
        "{:#?}",
        spans
            .iter()
            .map(|s| (&s.name, s.start_time_unix_nano, s.end_time_unix_nano))
            .collect::<Vec<_>>()
    );
}

/// The JSON lines of a server's stderr.
fn json_lines(server: &TestServer) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&server.stderr_path)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON line: {line:?}"))
        })
        .collect()
}

/// The request-log lines, once `count` of them exist.
async fn request_lines(server: &TestServer, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<_> = json_lines(server)
            .into_iter()
            .filter(|line| line["target"] == "lmserve::request")
            .collect();
        if lines.len() >= count || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_finished_call_writes_one_json_request_line_tied_to_its_request_id() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("LMSERVE_LOGGING__FORMAT".into(), "json".into())],
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;

    let mut request = Request::new(GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::Text("My lord,".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-generate-1".parse().unwrap());
    let response = client.generate(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "req-generate-1"
    );

    // No id from the client: the server makes one and returns it.
    let failed = client
        .embed(EmbedRequest {
            model: "tiny-encoder".into(),
            texts: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::InvalidArgument);
    let generated_id = failed
        .metadata()
        .get("x-request-id")
        .expect("a request id on errors too")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated_id.len(), 32);

    // A streaming call's work happens as its body is read: still in its log line.
    let mut request = Request::new(tokio_stream::iter(vec![
        EmbedRequest {
            model: "tiny-encoder".into(),
            texts: vec!["one".into()],
            ..Default::default()
        };
        2
    ]));
    request
        .metadata_mut()
        .insert("x-request-id", "req-embed-stream".parse().unwrap());
    let mut answers = client.embed_stream(request).await.unwrap().into_inner();
    while answers.next().await.transpose().unwrap().is_some() {}

    // A client that goes away mid-call: logged as CANCELLED.
    let mut request = Request::new(GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::Text("Long".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(200),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-abandoned".parse().unwrap());
    let mut abandoning = client.clone();
    let call = tokio::spawn(async move { abandoning.generate(request).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    call.abort();

    let lines = request_lines(&server, 4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|line| line["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:#?}"))
    };
    let streamed = by_id("req-embed-stream");
    assert_eq!(streamed["model"], "tiny-encoder");
    assert_eq!(streamed["code"], "Ok");
    assert!(
        streamed["input_tokens"].as_u64().unwrap() >= 2,
        "{streamed}"
    );
    let abandoned = by_id("req-abandoned");
    assert_eq!(abandoned["code"], "Cancelled", "{abandoned}");
    assert_eq!(abandoned["model"], "tiny-gpt2");
    let ok = lines
        .iter()
        .find(|line| line["request_id"] == "req-generate-1")
        .expect("the generate call's line");
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["method"], "/lmserve.v1.Inference/Generate");
    assert_eq!(ok["model"], "tiny-gpt2");
    assert_eq!(ok["version"], "1");
    assert_eq!(ok["code"], "Ok");
    assert!(
        ok["latency_ms"].as_f64().unwrap() > 0.0,
        "numbers are numbers"
    );
    assert!(ok["queue_ms"].is_f64());
    assert!(ok["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(ok["output_tokens"], 7);

    let error = lines
        .iter()
        .find(|line| line["request_id"] == generated_id.as_str())
        .expect("the failed call's line, under the id the client was given");
    assert_eq!(error["level"], "WARN");
    assert_eq!(error["code"], "InvalidArgument");
    assert!(
        error["error"].as_str().unwrap().contains("texts"),
        "{error}"
    );

    // Only JSON reaches stderr, and nothing reaches stdout in JSON mode (the harness read the
    // ports from the listening event).
    let events = json_lines(&server);
    assert!(events.iter().any(|e| e["message"] == "lmserve listening"));
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A sample's value in the Prometheus text, by name and label subset.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The default models on a server with a metrics port, and that port's address.
async fn start_with_metrics() -> (TestServer, String) {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    })
    .await;
    let metrics_addr = server.metrics_addr.clone().expect("metrics port");
    (server, metrics_addr)
}

#[tokio::test]
async fn the_metrics_port_counts_each_request_once_and_answers_health_over_http() {
    let (server, metrics_addr) = start_with_metrics().await;
    let mut client = server.inference().await;

    for _ in 0..3 {
        client
            .embed(EmbedRequest {
                model: "tiny-encoder".into(),
                texts: vec!["one".into(), "two".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    client
        .classify(ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: vec!["WIN A FREE PRIZE".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = client
        .generate_stream(GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(Prompt::Text("To be".into())),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(5),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while stream.next().await.is_some() {}
    // Refused before routing: labelled with the model it named, which the server knows.
    let refused = client
        .generate(GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(Prompt::Text("x".into())),
            parameters: Some(GenerationParameters {
                temperature: Some(-1.0),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);

    let (status, metrics) = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let requests = "lmserve_requests_total";
    assert_eq!(
        sample(
            &metrics,
            requests,
            &[
                ("model", "tiny-encoder"),
                ("task", "embed"),
                ("outcome", "ok")
            ]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            requests,
            &[("model", "tiny-encoder"), ("task", "classify")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            requests,
            &[
                ("model", "tiny-gpt2"),
                ("task", "generate"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            requests,
            &[("model", "tiny-gpt2"), ("outcome", "invalid_argument")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_request_input_tokens_count",
            &[("model", "tiny-encoder"), ("task", "embed")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_generated_tokens_total",
            &[("model", "tiny-gpt2")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_request_output_tokens_sum",
            &[("model", "tiny-gpt2")]
        ),
        5.0
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_inter_token_latency_seconds_count",
            &[("model", "tiny-gpt2"), ("route", "")]
        ),
        4.0,
        "one gap between each two of the 5 tokens"
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_time_to_first_token_seconds_count",
            &[("model", "tiny-gpt2"), ("arm", "")]
        ),
        1.0
    );
    assert!(
        sample(
            &metrics,
            "lmserve_queue_duration_seconds_count",
            &[("model", "tiny-gpt2")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "lmserve_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_threads",
    ] {
        assert!(sample(&metrics, name, &[]) > 0.0, "{name}");
    }
    // Typed as Prometheus client libraries type them, so rate() and promtool accept them.
    assert!(metrics.contains("# TYPE process_cpu_seconds_total counter\n"));
    assert!(metrics.contains("# TYPE process_resident_memory_bytes gauge\n"));

    assert_eq!(http_get(&metrics_addr, "/health/live").await.0, 200);
    assert_eq!(http_get(&metrics_addr, "/health/ready").await.0, 200);
    assert_eq!(http_get(&metrics_addr, "/").await.0, 404);
    assert_eq!(http_get(&metrics_addr, "/metrics/extra").await.0, 404);
}

/// Whether `span` has an ancestor named `name` among `spans`.
fn under(spans: &[Span], span: &Span, name: &str) -> bool {
    let mut parent = span.parent_span_id.as_slice();
    while let Some(found) = spans.iter().find(|s| s.span_id == parent) {
        if found.name == name {
            return true;
        }
        parent = found.parent_span_id.as_slice();
    }
    false
}

/// A shadow copy sent to the version that serves the request itself (a route trying a setting
/// on its own version) starts only once the request it copies has run (Embed) or started its
/// prefill (Generate): its queue span, under the `shadow` span of the request's trace, opens
/// after the request's batch or prefill began. Before, the copy was started ahead of the
/// request and could queue in front of it.
#[tokio::test]
async fn a_shadow_copy_to_the_requests_own_version_starts_after_the_request() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("LMSERVE_TRACING__OTLP_ENDPOINT".into(), endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    })
    .await;
    let metrics_addr = server.metrics_addr.clone().expect("metrics port");
    let mut models = server.models().await;
    for (name, task, model) in [
        ("echo-embed", Task::Embed, "tiny-encoder@1"),
        ("echo-generate", Task::Generate, "tiny-gpt2@1"),
    ] {
        models
            .set_route(SetRouteRequest {
                route: Some(Route {
                    name: name.into(),
                    task: task as i32,
                    arms: vec![RouteArm {
                        target: model.into(),
                        weight: 1.0,
                    }],
                    shadow: Some(ShadowArm {
                        target: model.into(),
                        percent: 100.0,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let mut client = server.inference().await;
    let traced = |round: u8, kind: u8| {
        let trace = [0x70 + round; 16];
        let parent = [kind; 8];
        (trace, traceparent(&trace, &parent).parse().unwrap())
    };
    let rounds = 4;
    let mut traces = Vec::new();
    for round in 0..rounds {
        let (trace, header) = traced(round, 1);
        let mut request = Request::new(EmbedRequest {
            model: "echo-embed".into(),
            texts: vec!["a text and its shadow copy".into()],
            ..Default::default()
        });
        request.metadata_mut().insert("traceparent", header);
        client.embed(request).await.unwrap();
        traces.push(("batch", trace));
        let (trace, header) = traced(round + rounds, 2);
        let mut request = Request::new(GenerateRequest {
            model: "echo-generate".into(),
            prompt: Some(Prompt::Text("To be, or not".into())),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        });
        request.metadata_mut().insert("traceparent", header);
        client.generate(request).await.unwrap();
        traces.push(("prefill", trace));
        // Each copy runs before the next request, which would otherwise find it waiting.
        let copies = |metrics: &str| {
            ["echo-embed", "echo-generate"]
                .iter()
                .map(|route| {
                    sample(
                        metrics,
                        "lmserve_shadow_requests_total",
                        &[("route", route), ("outcome", "ok")],
                    )
                })
                .sum::<f64>()
        };
        let done = 2.0 * f64::from(round + 1);
        let metrics = metrics_when(&metrics_addr, |m| copies(m) >= done).await;
        assert_eq!(copies(&metrics), done, "{metrics}");
    }
    for (primary_span, trace) in traces {
        let spans = collector
            .trace(&trace, &["shadow", "queue", primary_span])
            .await;
        let queues: Vec<&Span> = spans.iter().filter(|s| s.name == "queue").collect();
        let (copy_queue, own_queue): (Vec<&Span>, Vec<&Span>) =
            queues.into_iter().partition(|s| under(&spans, s, "shadow"));
        let primary = spans
            .iter()
            .find(|s| s.name == primary_span && !under(&spans, s, "shadow"))
            .unwrap_or_else(|| panic!("no {primary_span} span of the request itself"));
        assert_eq!((copy_queue.len(), own_queue.len()), (1, 1), "{spans:?}");
        // Only once the request itself has left the queue: its batch or prefill has begun.
        let after = primary.start_time_unix_nano;
        assert!(
            copy_queue[0].start_time_unix_nano >= after,
            "{primary_span}: the copy queued {} ns before",
            after - copy_queue[0].start_time_unix_nano
        );
    }
}

/// A KServe generation of tiny-gpt2 as long as its positions allow (249 tokens), with Triton's
/// `timeout` parameter where one is given.
fn long_kserve_generation(triton_timeout: Option<Duration>) -> ModelInferRequest {
    let prompt = "To be, or not to be";
    let mut raw = (prompt.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(prompt.as_bytes());
    let parameter = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let mut parameters = vec![
        ("max_tokens", ParameterChoice::Int64Param(249)),
        ("ignore_eos", ParameterChoice::BoolParam(true)),
    ];
    if let Some(timeout) = triton_timeout {
        // In microseconds.
        let micros = timeout.as_micros() as i64;
        parameters.push(("timeout", ParameterChoice::Int64Param(micros)));
    }
    ModelInferRequest {
        model_name: "tiny-gpt2".into(),
        inputs: vec![InferInputTensor {
            name: "text_input".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        parameters: parameters
            .into_iter()
            .map(|(key, choice)| (key.to_owned(), parameter(choice)))
            .collect(),
        ..Default::default()
    }
}

/// A Triton `timeout` bounds a request's admission only; a request that runs past it and is
/// then dropped by its client was cancelled, not cut off by a deadline. A KServe call cut off by
/// its own `grpc-timeout` is.
#[tokio::test]
async fn a_triton_timeout_that_passes_while_running_does_not_relabel_a_cancel() {
    let (server, metrics_addr) = start_with_metrics().await;
    // 10 ms: an idle server admits it at once; the generation takes longer than the test
    // takes to give up.
    let request = long_kserve_generation(Some(Duration::from_millis(10)));
    let mut kserve = GrpcInferenceServiceClient::new(server.channel().await);
    let sent = Instant::now();
    let call = tokio::spawn({
        let mut kserve = kserve.clone();
        async move { kserve.model_infer(request).await }
    });
    // The client gives up once the request runs (its first token is out) and its timeout has
    // passed, with the generation still going.
    let give_up = sent + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(&metrics_addr, "/metrics").await;
        let first_tokens = sample(
            &metrics,
            "lmserve_time_to_first_token_seconds_count",
            &[("model", "tiny-gpt2")],
        );
        if first_tokens >= 1.0 && sent.elapsed() > Duration::from_millis(15) {
            break;
        }
        assert!(Instant::now() < give_up, "no first token in 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        !call.is_finished(),
        "the generation ended before the client gave up"
    );
    call.abort();
    let outcome = |metrics: &str, outcome| {
        sample(
            metrics,
            "lmserve_requests_total",
            &[("model", "tiny-gpt2"), ("outcome", outcome)],
        )
    };
    let metrics = metrics_when(&metrics_addr, |metrics| {
        outcome(metrics, "cancelled") + outcome(metrics, "deadline_exceeded") >= 1.0
    })
    .await;
    assert_eq!(outcome(&metrics, "cancelled"), 1.0, "{metrics}");
    assert_eq!(outcome(&metrics, "deadline_exceeded"), 0.0, "{metrics}");

    // The call's own deadline, passing while the generation runs: an idle server admits it,
    // and 249 tokens take over 70 ms even where tiny-gpt2 is fastest (0.3 ms a token), one far
    // less. The server answers 5 ms before the deadline, ahead of tonic's own timer.
    let mut cut = tonic::Request::new(long_kserve_generation(None));
    cut.set_timeout(Duration::from_millis(25));
    let status = kserve.model_infer(cut).await.unwrap_err();
    assert!(cut_off(&status), "{status:?}");
    let metrics = metrics_when(&metrics_addr, |metrics| {
        outcome(metrics, "cancelled") + outcome(metrics, "deadline_exceeded") >= 2.0
    })
    .await;
    assert_eq!(outcome(&metrics, "deadline_exceeded"), 1.0, "{metrics}");
    assert_eq!(outcome(&metrics, "cancelled"), 1.0, "{metrics}");
}

/// Calls the server gives up on at their `grpc-timeout` (the edge drops them) are counted
/// `deadline_exceeded`, embed and generate alike, as many as the client saw cut off.
#[tokio::test]
async fn requests_cut_off_by_their_deadline_are_counted() {
    let (server, metrics_addr) = start_with_metrics().await;
    let mut client = server.inference().await;
    let long = "the quick brown fox jumps over the lazy dog ".repeat(14);
    let (mut embeds_cut, mut generates_cut) = (0, 0);
    // A request the server may also refuse at admission as unable to finish in time, so the
    // deadlines vary until some are cut off while running.
    // Over 5 ms: the server answers before tonic's own timer would (`deadline::ANSWER_LEAD`).
    for millis in [6, 7, 8, 10, 12, 15, 20, 30] {
        let mut embed = tonic::Request::new(EmbedRequest {
            model: "tiny-encoder".into(),
            texts: vec![long.clone(); 256],
            ..Default::default()
        });
        embed.set_timeout(Duration::from_millis(millis));
        if let Err(status) = client.embed(embed).await
            && cut_off(&status)
        {
            embeds_cut += 1;
        }
        let mut generate = tonic::Request::new(GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(Prompt::Text("To be".into())),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(500),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        generate.set_timeout(Duration::from_millis(millis));
        if let Err(status) = client.generate(generate).await
            && cut_off(&status)
        {
            generates_cut += 1;
        }
    }
    assert!(
        embeds_cut > 0 && generates_cut > 0,
        "no deadline cut a call"
    );
    // Each call is counted as its response body is dropped, a moment after the client heard.
    let sent = 8.0;
    let metrics = metrics_when(&metrics_addr, |metrics| {
        ["Embed", "Generate"].iter().all(|method| {
            let method = format!("/lmserve.v1.Inference/{method}");
            sample(metrics, "lmserve_grpc_calls_total", &[("method", &method)]) == sent
        })
    })
    .await;
    // A cut call that reached its handler, which knows the model, counts once among the
    // requests: `deadline_exceeded`, or `cancelled` where tonic's own timer, which starts a
    // moment before the server's, dropped it first. One cut off while still being read (a
    // 170 KB embed) or waiting for a thread counts only among the calls, below, which count
    // every call exactly.
    for (model, task, cut) in [
        ("tiny-encoder", "embed", embeds_cut),
        ("tiny-gpt2", "generate", generates_cut),
    ] {
        let outcome = |outcome| {
            sample(
                &metrics,
                "lmserve_requests_total",
                &[("model", model), ("task", task), ("outcome", outcome)],
            )
        };
        let counted = outcome("deadline_exceeded") + outcome("cancelled");
        assert!(
            outcome("deadline_exceeded") >= 1.0 && counted <= cut as f64,
            "{task}: {metrics}"
        );
    }
    let calls = |method, code| {
        sample(
            &metrics,
            "lmserve_grpc_calls_total",
            &[("method", method), ("code", code)],
        )
    };
    // Every call once, with its code (the wait above): the cut ones among them.
    for method in [
        "/lmserve.v1.Inference/Embed",
        "/lmserve.v1.Inference/Generate",
    ] {
        let every_code = sample(&metrics, "lmserve_grpc_calls_total", &[("method", method)]);
        assert_eq!(every_code, sent, "{method}: {metrics}");
        assert!(
            calls(method, "DEADLINE_EXCEEDED") >= 1.0,
            "{method}: {metrics}"
        );
    }
    // A method the server does not serve is one series, whatever the client names.
    let mut unknown = tonic::client::Grpc::new(server.channel().await);
    for name in ["/lmserve.v1.Inference/Nope", "/made.up.Service/Call"] {
        unknown.ready().await.unwrap();
        let status = unknown
            .unary::<EmbedRequest, EmbedRequest, _>(
                tonic::Request::new(EmbedRequest::default()),
                http::uri::PathAndQuery::from_static(name),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    let other = |metrics: &str| {
        sample(
            metrics,
            "lmserve_grpc_calls_total",
            &[("method", "other"), ("code", "UNIMPLEMENTED")],
        )
    };
    let metrics = metrics_when(&metrics_addr, |metrics| other(metrics) >= 2.0).await;
    assert_eq!(other(&metrics), 2.0, "{metrics}");
    assert!(!metrics.contains("Nope") && !metrics.contains("made.up"));
}

/// What a client hears when its deadline passed: DEADLINE_EXCEEDED from the server, or
/// CANCELLED from tonic's own timer, should it fire first.
fn cut_off(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// The metrics once `ready` holds of them, or after 5 s as they are then.
async fn metrics_when(addr: &str, ready: impl Fn(&str) -> bool) -> String {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = http_get(addr, "/metrics").await;
        if ready(&metrics) || Instant::now() >= give_up {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
