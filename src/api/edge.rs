//! The layer every RPC passes through:
//! - API keys, when configured (`auth`), checked before anything else;
//! - a call left waiting for the rest of its request is ended (`half_sent`);
//! - a health call, open to callers without a key, may send at most `OPEN_CALL_BODY_BYTES`:
//!   without the cap such a caller could make the server buffer a message up to the service's
//!   size limit on each of its streams;
//! - a call past its `grpc-timeout` ends DEADLINE_EXCEEDED (tonic's own timer says CANCELLED);
//! - a request message over the service's size limit is RESOURCE_EXHAUSTED, as the gRPC C++ and
//!   Go servers answer (tonic says OUT_OF_RANGE, a code lmserve's own errors never use, see
//!   `status.rs`);
//! - a Triton RPC that lmserve leaves out (model config, statistics, repository, shared memory,
//!   trace, logging) is UNIMPLEMENTED with a message saying what is served, where tonic sends
//!   none.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::auth::{KeyRing, required_scope};
use super::{deadline, half_sent};

/// The most a call that needs no key may send: a health check names one service.
const OPEN_CALL_BODY_BYTES: usize = 4096;
/// Why a KServe call is UNIMPLEMENTED; a gRPC message header, so printable ASCII without `%`.
const KSERVE_UNIMPLEMENTED: &str = "lmserve serves ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and ModelStreamInfer of inference.GRPCInferenceService; Triton's model configuration, statistics, repository, shared memory, trace and logging RPCs are not implemented";

#[derive(Clone, Default)]
pub struct EdgeLayer {
    keys: Option<Arc<KeyRing>>,
    request_stall_timeout: Duration,
}

impl EdgeLayer {
    /// The edge of a server that checks `keys` (`None`: no authentication) and ends calls left
    /// waiting for more of their request for `request_stall_timeout` (zero: never).
    pub fn new(keys: Option<Arc<KeyRing>>, request_stall_timeout: Duration) -> Self {
        Self {
            keys,
            request_stall_timeout,
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            keys: self.keys.clone(),
            request_stall_timeout: self.request_stall_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    keys: Option<Arc<KeyRing>>,
    request_stall_timeout: Duration,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ResBody> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let arrived = tokio::time::Instant::now();
        request.extensions_mut().insert(deadline::Arrival(arrived));
        let scope = required_scope(request.uri().path());
        if let Some(keys) = &self.keys {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            if let Err(status) = keys.check_scope(scope, authorization) {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        if scope.is_none() {
            request = request.map(cap_open_call_body);
        }
        let (parts, body) = request.into_parts();
        let body = half_sent::guard(parts.uri.path(), body, self.request_stall_timeout);
        request = Request::from_parts(parts, body);
        let timeout = request
            .headers()
            .get(deadline::HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(deadline::parse);
        let kserve = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|path| path.strip_prefix(super::kserve::SERVICE_NAME))
            .is_some_and(|rest| rest.starts_with('/'));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match timeout {
                Some(timeout) => {
                    let budget = timeout.saturating_sub(deadline::ANSWER_LEAD);
                    match tokio::time::timeout_at(arrived + budget, response).await {
                        Ok(response) => response?,
                        Err(_) => {
                            return Ok(Status::deadline_exceeded(format!(
                                "the call's deadline of {timeout:?} passed"
                            ))
                            .into_http());
                        }
                    }
                }
                None => response.await?,
            };
            let response = over_size_is_resource_exhausted(response);
            Ok(match kserve {
                true => explain_unimplemented(response),
                false => response,
            })
        })
    }
}

/// `body`, ending with RESOURCE_EXHAUSTED once it passes `OPEN_CALL_BODY_BYTES`.
fn cap_open_call_body(body: Body) -> Body {
    Body::new(Limited::new(body, OPEN_CALL_BODY_BYTES).map_err(|error| {
        match error.downcast::<LengthLimitError>() {
            Ok(_) => Status::resource_exhausted(format!(
                "a health call may send at most {OPEN_CALL_BODY_BYTES} bytes"
            )),
            Err(error) => Status::from_error(error),
        }
    }))
}

/// The status for a streamed request message tonic could not read: over the size limit is
/// RESOURCE_EXHAUSTED, as for a unary request.
pub fn incoming_status(status: Status) -> Status {
    match status.code() {
        Code::OutOfRange => Status::resource_exhausted(status.message().to_owned()),
        _ => status,
    }
}

/// Rewrites the status of a trailers-only response that tonic's decoder answered OUT_OF_RANGE.
fn over_size_is_resource_exhausted<B>(mut response: Response<B>) -> Response<B> {
    let out_of_range = HeaderValue::from(Code::OutOfRange as i32);
    let headers = response.headers_mut();
    if headers.get("grpc-status") == Some(&out_of_range) {
        headers.insert(
            "grpc-status",
            HeaderValue::from(Code::ResourceExhausted as i32),
        );
    }
    response
}

/// Adds why to an UNIMPLEMENTED answer that says nothing (tonic's, for a method the service
/// does not have).
fn explain_unimplemented<B>(mut response: Response<B>) -> Response<B> {
    let unimplemented = HeaderValue::from(Code::Unimplemented as i32);
    let headers = response.headers_mut();
    if headers.get("grpc-status") == Some(&unimplemented) && !headers.contains_key("grpc-message") {
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(KSERVE_UNIMPLEMENTED),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_out_of_range_becomes_resource_exhausted() {
        let status = |code: Code| Status::new(code, "x").into_http::<()>();
        let rewritten = over_size_is_resource_exhausted(status(Code::OutOfRange));
        assert_eq!(rewritten.headers()["grpc-status"], "8");
        let kept = over_size_is_resource_exhausted(status(Code::InvalidArgument));
        assert_eq!(kept.headers()["grpc-status"], "3");
    }

    #[test]
    fn silent_unimplemented_answers_say_what_is_served() {
        let mut bare = Response::new(());
        bare.headers_mut()
            .insert("grpc-status", HeaderValue::from(Code::Unimplemented as i32));
        let explained = explain_unimplemented(bare);
        assert!(
            explained.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("ModelStreamInfer")
        );
        let said = Status::unimplemented("own reason").into_http::<()>();
        let message = said.headers()["grpc-message"].clone();
        assert_eq!(
            explain_unimplemented(said).headers()["grpc-message"],
            message
        );
    }
}
