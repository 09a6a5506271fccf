//! What every call leaves behind: a request id (the client's `x-request-id`, else a new one,
//! returned in the response headers), an `rpc` span that continues the caller's W3C trace
//! (`traceparent`) and parents every span the call creates, and one request-log line when the
//! call ends, with its gRPC status read from the trailers (or CANCELLED when the client left).
//!
//! The domain fills in what only it knows (model, version, route, arm, queue time, tokens)
//! through `telemetry::call::CallRecord`, set around the handler.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::RequestLog;
use crate::telemetry::call::CallRecord;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A client's request id longer than this (or not printable ASCII) is replaced by a new one,
/// so a log line's size stays bounded whatever the client sends.
const MAX_REQUEST_ID_BYTES: usize = 128;

#[derive(Clone, Copy)]
pub struct ObserveLayer {
    requests: RequestLog,
}

impl ObserveLayer {
    pub fn new(requests: RequestLog) -> Self {
        Self { requests }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            requests: self.requests,
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    requests: RequestLog,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let method = request.uri().path().to_owned();
        let request_id = request_id(request.headers());
        let span = rpc_span(&method, &request_id, request.headers());
        let record = CallRecord::default();
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let response = record.clone().scope(response.instrument(span.clone()));
        let requests = self.requests;
        Box::pin(async move {
            let mut response = response.await?;
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            let mut end = CallEnd {
                method,
                request_id,
                started,
                record,
                span,
                requests,
                status: None,
            };
            // A trailers-only response (most errors) carries its status in the headers.
            end.status = grpc_status(response.headers());
            Ok(response.map(|body| LoggedBody {
                inner: body,
                end: Some(end),
            }))
        })
    }
}

/// `stream` with `span` entered while it is polled, so the span lasts as long as the stream
/// (an OpenTelemetry span ends when its `tracing` span is last exited).
pub fn in_span<T: Send + 'static>(
    mut stream: Pin<Box<dyn Stream<Item = T> + Send>>,
    span: tracing::Span,
) -> Pin<Box<dyn Stream<Item = T> + Send>> {
    Box::pin(futures::stream::poll_fn(move |cx| {
        let _entered = span.enter();
        stream.as_mut().poll_next(cx)
    }))
}

/// The client's request id when it is a reasonable one, else a new random one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_BYTES
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}

/// Reads W3C trace context from gRPC metadata (HTTP/2 headers).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

fn rpc_span(method: &str, request_id: &str, headers: &HeaderMap) -> tracing::Span {
    let (service, name) = method
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((method, ""));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %method.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %name,
        request_id = %request_id,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed; then there is nothing to join.
        let _ = span.set_parent(parent);
    }
    span
}

fn grpc_status(headers: &HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|value| value.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((code, message))
}

/// gRPC percent-encodes `grpc-message`; the log shows it as the server wrote it.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything needed to write the call's log line once its status is known.
struct CallEnd {
    method: String,
    request_id: String,
    started: Instant,
    record: CallRecord,
    span: tracing::Span,
    requests: RequestLog,
    status: Option<(i32, String)>,
}

/// Health probes and reflection arrive every few seconds from orchestrators and tools: they are
/// logged only when they fail.
fn is_infrastructure(method: &str) -> bool {
    method.starts_with("/grpc.health.v1.") || method.starts_with("/grpc.reflection.")
}

impl CallEnd {
    fn log(self) {
        // Entered last now: the OpenTelemetry span ends here, when the call really ended.
        drop(self.span.enter());
        // No status: the body was dropped before its trailers, the client went away.
        let (code, message) = self.status.unwrap_or((
            tonic::Code::Cancelled as i32,
            "the client cancelled".to_owned(),
        ));
        let code_name = format!("{:?}", tonic::Code::from_i32(code));
        self.span.record("rpc.grpc.status_code", code);
        let ok = code == tonic::Code::Ok as i32;
        if ok && (self.requests == RequestLog::Errors || is_infrastructure(&self.method)) {
            return;
        }
        let fields = self.record.fields();
        let trace_id = {
            let context = self.span.context();
            let span_context = context.span().span_context().clone();
            if span_context.is_valid() {
                span_context.trace_id().to_string()
            } else {
                String::new()
            }
        };
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let queue_ms = fields.queue.map_or(0.0, |queue| queue.as_secs_f64() * 1e3);
        macro_rules! request_line {
            ($level:expr) => {
                tracing::event!(
                    target: "lmserve::request",
                    parent: None,
                    $level,
                    request_id = %self.request_id,
                    trace_id = %trace_id,
                    method = %self.method,
                    model = %fields.model,
                    version = %fields.version,
                    route = %fields.route,
                    arm = %fields.arm,
                    code = %code_name,
                    latency_ms,
                    queue_ms,
                    input_tokens = fields.input_tokens as u64,
                    output_tokens = fields.output_tokens as u64,
                    error = %message,
                    "request"
                )
            };
        }
        if ok {
            request_line!(tracing::Level::INFO);
        } else {
            request_line!(tracing::Level::WARN);
        }
    }
}

/// A response body that writes the call's log line when it ends or is dropped.
pub struct LoggedBody<B> {
    inner: B,
    end: Option<CallEnd>,
}

impl<B> Body for LoggedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(end) = &mut self.end
                {
                    end.status = grpc_status(trailers).or(end.status.take());
                }
            }
            Poll::Ready(None) => {
                // The end of a body without trailers: a trailers-only response already had its
                // status; anything else ended cleanly.
                if let Some(mut end) = self.end.take() {
                    end.status = end.status.or(Some((0, String::new())));
                    end.log();
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            end.log();
        }
    }
}
