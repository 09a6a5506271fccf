//! Logs, metrics and traces: every metric is declared in `metrics`, log setup lives in `logging`.

pub mod logging;
pub mod metrics;
