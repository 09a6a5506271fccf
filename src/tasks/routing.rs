//! Routing a request: pick the model version (directly or through a route's arm), and send a
//! copy to the route's shadow arm in the background, where it cannot fail the request itself
//! and never waits in a queue ahead of real requests (`PendingShadow`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::{RequestMetrics, ServedBy};
use crate::error::{Result, Task};
use crate::registry::{ModelVersion, Registry, RouteRequest, Shadow};
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

/// A shadow copy waiting for the request it copies. A copy to a version that is also one of
/// the route's arms queues with the route's own requests, so it starts only once the request
/// it copies has started running (`start`) or ended (when this is dropped), and not at all
/// while other requests wait for that version: it never takes a place ahead of real work.
#[must_use = "dropping it starts the copy; hold it until the request it copies has started"]
#[derive(Default)]
pub(crate) struct PendingShadow(Option<Box<dyn FnOnce(bool) + Send>>);

impl PendingShadow {
    /// Starts the copy now, if it is still waiting.
    pub fn start(&mut self) {
        if let Some(start) = self.0.take() {
            start(true);
        }
    }

    /// Drops the copy without starting it, giving its place back (counted `dropped`).
    pub fn forget(&mut self) {
        if let Some(start) = self.0.take() {
            start(false);
        }
    }
}

impl Drop for PendingShadow {
    fn drop(&mut self) {
        self.start();
    }
}

impl std::fmt::Debug for PendingShadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PendingShadow(waiting)"
        } else {
            "PendingShadow(none)"
        })
    }
}

/// Resolves `target` for `task`; when the route shadows this request, starts `shadow` on the
/// shadow model and forgets it (its outcome goes to metrics and logs only). A copy that queues
/// with the route's own requests is returned waiting instead: see `PendingShadow`.
pub(crate) fn route<T, F, Fut>(
    registry: &Registry,
    target: &str,
    task: Task,
    routing: &Routing,
    request: &mut RequestMetrics,
    shadow: F,
) -> Result<(Arc<ModelVersion>, ServedBy, PendingShadow)>
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
    let mut pending = PendingShadow::default();
    if let Some(copy) = routed.shadow {
        let work = shadow(Arc::clone(&copy.model));
        // The copy's spans stay in the request's trace, under a span saying it is a shadow.
        let shadow_span = tracing::info_span!("shadow", route = %copy.route, arm = %copy.arm);
        let work = tracing::Instrument::instrument(work, shadow_span);
        let waits = copy.queues_with_arms;
        pending = PendingShadow(Some(Box::new(move |start| match start {
            true => spawn_shadow(copy, work),
            false => metrics::shadow_finished(&copy.route, &copy.arm, "dropped"),
        })));
        if !waits {
            pending.start();
        }
    }
    Ok((routed.model, served_by, pending))
}

fn spawn_shadow<T, Fut>(copy: Shadow, work: Fut)
where
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    if copy.queues_with_arms && copy.model.engine.waiting() > 0 {
        metrics::shadow_finished(&copy.route, &copy.arm, "busy");
        return;
    }
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
