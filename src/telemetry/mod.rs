//! Logs, metrics and traces: every metric is declared in `metrics` (process metrics in
//! `process`), the metrics port in `http`, log setup in `logging`, the OTLP exporter in `traces`.

pub mod call;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod traces;
