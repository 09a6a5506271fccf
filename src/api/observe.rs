//! What every call leaves behind: a request id (the client's `x-request-id`, else a new one,
//! returned in the response headers), an `rpc` span that continues the caller's W3C trace
//! (`traceparent`) and parents every span the call creates, and one request-log line when the
//! call ends, with its gRPC status read from the trailers (or CANCELLED when the client left, or
//! when the server dropped an answer its client stopped reading: `unread`).
//!
//! The domain fills in what only it knows (model, version, route, arm, queue time, tokens)
//! through `telemetry::call::CallRecord`, set around the handler.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
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

use super::unread::DroppedUnread;
use crate::config::RequestLog;
use crate::telemetry::call::CallRecord;
use crate::telemetry::metrics;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// A client's request id longer than this (or not printable ASCII) is replaced by a new one,
/// so a log line's size stays bounded whatever the client sends.
const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest method path kept for spans and logs.
pub(super) const MAX_METHOD_BYTES: usize = 128;

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
        // Bounded: the path of an unknown method is whatever the client sent.
        let method = crate::error::bounded(request.uri().path(), MAX_METHOD_BYTES).into_owned();
        let request_id = request_id(request.headers());
        let dropped_unread = request.extensions().get::<DroppedUnread>().cloned();
        let client_trace_id = client_trace_id(request.headers());
        let span = rpc_span(&method, &request_id, request.headers());
        let record = CallRecord::default();
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let response = record.clone().scope(response.instrument(span.clone()));
        // Made before the handler runs: if the client goes away first, dropping it logs the call
        // as CANCELLED.
        let mut end = CallEnd {
            method,
            request_id: request_id.clone(),
            client_trace_id,
            started,
            record,
            span,
            requests: self.requests,
            status: None,
            dropped_unread,
            logged: false,
        };
        Box::pin(async move {
            let mut response = response.await?;
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            // A trailers-only response (most errors) carries its status in the headers.
            end.status = grpc_status(response.headers());
            Ok(response.map(|body| LoggedBody { inner: body, end }))
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

/// The trace id of the caller's W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), for the
/// request log even when no spans are exported.
fn client_trace_id(headers: &HeaderMap) -> String {
    let Some(value) = headers.get("traceparent").and_then(|v| v.to_str().ok()) else {
        return String::new();
    };
    let parts: Vec<&str> = value.trim().split('-').collect();
    match parts.as_slice() {
        [_, trace, span, _]
            if trace.len() == 32
                && span.len() == 16
                && trace.bytes().all(|b| b.is_ascii_hexdigit())
                && trace.bytes().any(|b| b != b'0') =>
        {
            trace.to_ascii_lowercase()
        }
        _ => String::new(),
    }
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

/// The call's span, continuing the caller's trace. Infrastructure calls (health probes every
/// few seconds from each orchestrator) get none unless their caller traces them: a trace of
/// each would cost the collector more than every other call does on a quiet server.
fn rpc_span(method: &str, request_id: &str, headers: &HeaderMap) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    let traced_by_caller = parent.span().span_context().is_valid();
    if is_infrastructure(method) && !traced_by_caller {
        return tracing::Span::none();
    }
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
    if traced_by_caller {
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

/// Everything needed to write the call's log line once its status is known. Writes it when
/// finished, or when dropped unfinished (CANCELLED: the client went away, or the server dropped
/// the answer because its client stopped reading it).
struct CallEnd {
    method: String,
    request_id: String,
    client_trace_id: String,
    started: Instant,
    record: CallRecord,
    span: tracing::Span,
    requests: RequestLog,
    status: Option<(i32, String)>,
    /// Set when the server dropped the answer because its client stopped reading it.
    dropped_unread: Option<DroppedUnread>,
    logged: bool,
}

/// Health probes (gRPC's, and KServe's ServerLive and ServerReady) and reflection arrive every
/// few seconds from orchestrators and tools: they are logged only when they fail, and traced only
/// when their caller traces them.
fn is_infrastructure(method: &str) -> bool {
    method.starts_with("/grpc.health.v1.")
        || method.starts_with("/grpc.reflection.")
        || method == "/inference.GRPCInferenceService/ServerLive"
        || method == "/inference.GRPCInferenceService/ServerReady"
}

/// The paths of every method the server serves.
fn served_methods() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        super::declared_methods()
            .into_iter()
            .map(|(path, _)| path)
            .collect()
    })
}

/// The method label of a call: its path when the server serves it, else "other".
fn method_label(path: &str) -> &str {
    if served_methods().contains(path) {
        path
    } else {
        "other"
    }
}

/// gRPC's name for a status code, as clients and other servers' metrics spell it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl CallEnd {
    fn log(&mut self) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        // Entered last now: the OpenTelemetry span's end time is when the call really ended.
        drop(self.span.enter());
        // No status: the body was dropped before its trailers. The client went away, or the
        // server stopped answering a client that read nothing more (`unread`).
        let dropped_unread = self
            .dropped_unread
            .as_ref()
            .is_some_and(DroppedUnread::is_set);
        let (code, message) = self.status.take().unwrap_or_else(|| {
            let why = if dropped_unread {
                "the server dropped the answer: its client took nothing more of it for \
                 server.response_stall_timeout_ms"
            } else {
                "the client cancelled"
            };
            (tonic::Code::Cancelled as i32, why.to_owned())
        });
        // Every call, whatever stopped it: refused at the edge, cut off by its deadline before
        // its handler ran, or answered.
        metrics::grpc_call(
            method_label(&self.method),
            code_name(tonic::Code::from_i32(code)),
        );
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
                self.client_trace_id.clone()
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

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.log();
    }
}

/// A response body that writes the call's log line when it ends or is dropped. Polled inside the
/// call's span and record, so the work a streaming call does as its body is read (EmbedStream,
/// ClassifyStream, ModelStreamInfer) stays in its trace and its log line.
pub struct LoggedBody<B> {
    inner: B,
    end: CallEnd,
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
        let this = &mut *self;
        let polled = {
            let _entered = this.end.span.enter();
            let inner = &mut this.inner;
            this.end
                .record
                .clone()
                .sync_scope(|| Pin::new(inner).poll_frame(cx))
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                {
                    this.end.status = Some(status);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                let failed = (
                    tonic::Code::Internal as i32,
                    "the response body failed".to_owned(),
                );
                this.end.status = Some(failed);
                this.end.log();
            }
            Poll::Ready(None) => {
                // The end of a body without trailers: a trailers-only response already had its
                // status; anything else ended cleanly.
                this.end.status = this.end.status.take().or(Some((0, String::new())));
                this.end.log();
            }
            Poll::Pending => {}
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
