//! Routing a request: pick the model version (directly or through a route's arm), and send a
//! copy to the route's shadow arm in the background, where it cannot fail the request itself
//! and never waits in a queue ahead of real requests (`Registry::route` drops it then).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::{RequestMetrics, ServedBy};
use crate::error::{Result, Task};
use crate::registry::{ModelVersion, Registry, RouteRequest};
use crate::telemetry::metrics;

/// What the caller sent besides the request itself: a sticky routing key, an optional pinned
/// arm, and its deadline (for admission by time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub key: Option<String>,
    pub pin: Option<String>,
    /// When the request's answer is due: the call's own deadline, or a sooner limit the
    /// request carries (Triton's `timeout`), which admission by time uses.
    pub deadline: Option<Instant>,
    /// The call's own deadline (`grpc-timeout`), at which the server drops the call: a request
    /// dropped after it was cut off by it, where one dropped after only a request's own limit
    /// passed was cancelled by its client.
    pub call_deadline: Option<Instant>,
}

/// Resolves `target` for `task`; when the route shadows this request, starts `shadow` on the
/// shadow model and forgets it (its outcome goes to metrics and logs only).
pub(crate) fn route<T, F, Fut>(
    registry: &Registry,
    target: &str,
    task: Task,
    routing: &Routing,
    request: &mut RequestMetrics,
    shadow: F,
) -> Result<(Arc<ModelVersion>, ServedBy)>
where
    F: FnOnce(Arc<ModelVersion>) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let span = tracing::info_span!(
        "route",
        target = %crate::error::bounded(target, crate::telemetry::traces::MAX_SPAN_TEXT),
        model = tracing::field::Empty,
        route = tracing::field::Empty,
        arm = tracing::field::Empty
    );
    let _entered = span.enter();
    let routed = registry.route(
        target,
        task,
        RouteRequest {
            key: routing.key.as_deref(),
            pin: routing.pin.as_deref(),
        },
    )?;
    request.model(&routed.model);
    let mut served_by = ServedBy::of(&routed.model);
    span.record(
        "model",
        format!("{}@{}", served_by.model, served_by.version).as_str(),
    );
    if let Some(choice) = routed.choice {
        span.record("route", choice.route.as_str());
        span.record("arm", choice.arm.as_str());
        request.route(&choice.route, &choice.arm);
        served_by.route = choice.route;
        served_by.arm = choice.arm;
    }
    if let Some(copy) = routed.shadow {
        let work = shadow(Arc::clone(&copy.model));
        // The copy's spans stay in the request's trace, under a span saying it is a shadow.
        let shadow_span = tracing::info_span!("shadow", route = %copy.route, arm = %copy.arm);
        let work = tracing::Instrument::instrument(work, shadow_span);
        tokio::spawn(async move {
            let _permit = copy.permit;
            let started = Instant::now();
            let outcome = match work.await {
                Ok(_) => "ok",
                Err(error) => {
                    tracing::info!(route = %copy.route, shadow = %copy.arm, %error, "shadow request failed");
                    error.kind()
                }
            };
            metrics::shadow_finished(&copy.route, &copy.arm, outcome);
            metrics::shadow_time(&copy.route, &copy.arm, started.elapsed());
        });
    }
    Ok((routed.model, served_by))
}
