//! OpenTelemetry traces over OTLP/gRPC: the tracer provider behind `tracing`'s spans, and the
//! W3C trace-context propagator `api::observe` uses to continue a caller's trace.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::TracingConfig;

/// Longest client-sent text (a model name) put in a span: spans are exported, and a collector
/// drops a whole batch that is too large.
pub const MAX_SPAN_TEXT: usize = 128;

/// The running exporter; `shutdown` sends the spans still buffered.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("lmserve")
    }

    /// Flushes and stops the exporter. Blocks until the collector answered or gave up, so it
    /// runs on a blocking thread.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = done {
            tracing::warn!(%error, "could not send the last spans to the trace collector");
        }
    }
}

/// Starts exporting when `otlp_endpoint` is set. Must run inside the Tokio runtime: the gRPC
/// client lives on it.
pub fn start(config: &TracingConfig) -> anyhow::Result<Option<Traces>> {
    // Installed even without a collector; the request log then takes the caller's trace id
    // from its traceparent directly.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        anyhow::bail!(
            "tracing.sample_ratio must be in [0, 1]; got {}",
            config.sample_ratio
        );
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        anyhow::bail!(
            "tracing.otlp_endpoint must be a URL such as http://otel-collector:4317; got `{endpoint}`"
        );
    }
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|error| anyhow::anyhow!("tracing.otlp_endpoint `{endpoint}`: {error}"))?;
    // A caller's sampling decision (its traceparent's flag) is kept; new traces are sampled at
    // the configured ratio.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    Ok(Some(Traces { provider }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_https_collector_is_accepted_and_other_schemes_are_not() {
        let config = |endpoint: &str| TracingConfig {
            otlp_endpoint: Some(endpoint.to_owned()),
            ..Default::default()
        };
        // The exporter connects lazily: building it is what an https URL used to fail.
        let traces = start(&config("https://otel-collector.example:4317")).unwrap();
        assert!(traces.is_some());
        let error = start(&config("otel-collector:4317"))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("tracing.otlp_endpoint"), "{error}");
    }
}
