//! The `tracing` subscriber: log lines (text, coloured only on a terminal, or one JSON object per
//! line), both on stderr and filtered by `logging.filter`; and, when `[tracing]` names a
//! collector, lmserve's spans exported over OTLP under their own filter, so a quiet log level
//! does not silence traces.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use super::traces::{self, Traces};
use crate::config::{LogFormat, LoggingConfig, TracingConfig};

/// The event announcing the listening ports: always logged, whatever the filter, since in JSON
/// mode it is how a script finds a port chosen at random.
pub const LISTENING_TARGET: &str = "lmserve::listening";

/// Installs the global subscriber; a second call (as in tests) leaves the first in place.
/// Returns the trace exporter, to flush at shutdown.
pub fn init(config: &LoggingConfig, tracing: &TracingConfig) -> anyhow::Result<Option<Traces>> {
    let directive = format!("{},{LISTENING_TARGET}=info", config.filter);
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|error| {
        eprintln!(
            "logging.filter `{}` is invalid ({error}); using `info`",
            config.filter
        );
        EnvFilter::new("info")
    });
    let logs = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let traces = traces::start(tracing)?;
    let spans = traces.as_ref().map(|traces| {
        tracing_opentelemetry::layer()
            .with_tracer(traces.tracer())
            .with_filter(Targets::new().with_target("lmserve", tracing::Level::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(traces)
}

/// One JSON object per event: timestamp, level, target, message, the event's fields at the top
/// level (numbers as numbers, lists as lists), and the spans it happened in, outermost first.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut object = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        object.insert("timestamp".into(), timestamp.into());
        object.insert("level".into(), event.metadata().level().as_str().into());
        object.insert("target".into(), event.metadata().target().into());
        event.record(&mut JsonVisitor(&mut object));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut fields = span
                        .extensions()
                        .get::<FormattedFields<N>>()
                        .and_then(|fields| serde_json::from_str::<Map<String, Value>>(fields).ok())
                        .unwrap_or_default();
                    fields.insert("name".into(), span.name().into());
                    Value::Object(fields)
                })
                .collect();
            object.insert("spans".into(), spans.into());
        }
        writeln!(writer, "{}", Value::Object(object))
    }
}

/// Event fields as JSON values. `?value` fields that print as a JSON list or object (a `Vec` of
/// strings or numbers does) stay structured; everything else is a string.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let structured = (field.name() != "message" && text.starts_with(['[', '{']))
            .then(|| serde_json::from_str::<Value>(&text).ok())
            .flatten();
        self.put(field, structured.unwrap_or(Value::String(text)));
    }
}
