//! `tracing` subscriber setup: text or JSON lines, filtered by an EnvFilter directive.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber; a second call (as in tests) leaves the first in place.
pub fn init(config: &LoggingConfig) {
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|error| {
        eprintln!(
            "logging.filter `{}` is invalid ({error}); using `info`",
            config.filter
        );
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
