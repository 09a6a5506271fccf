//! The work behind each RPC, free of gRPC types: validate, tokenize, schedule, post-process.

pub mod classify;
pub mod embed;
pub mod generate;
pub mod text;
pub mod tokenize;

use std::time::Instant;

use crate::error::{Error, Result};
use crate::registry::ModelVersion;
use crate::telemetry::metrics::{self, ModelLabels, Outcome};

/// The model version that served a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy {
    pub model: String,
    pub version: String,
}

impl ServedBy {
    pub fn of(model: &ModelVersion) -> Self {
        Self {
            model: model.name.clone(),
            version: model.version.to_string(),
        }
    }
}

/// Records one request's outcome and duration once it is known.
pub(crate) struct RequestMetrics {
    task: &'static str,
    started: Instant,
    labels: Option<ModelLabels>,
}

impl RequestMetrics {
    pub fn start(task: &'static str) -> Self {
        Self {
            task,
            started: Instant::now(),
            labels: None,
        }
    }

    pub fn model(&mut self, model: &ModelVersion) {
        self.labels = Some(model.labels.clone());
    }

    pub fn finish<T>(self, result: Result<T>) -> Result<T> {
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(error) => Outcome::Error(error.kind()),
        };
        match (&self.labels, &result) {
            (Some(labels), _) => {
                metrics::request_finished(labels, self.task, outcome, self.started.elapsed())
            }
            (None, Err(error)) => metrics::request_rejected(self.task, error.kind()),
            (None, Ok(_)) => {}
        }
        result
    }
}

/// Checks the list of texts a request carries against the configured limits.
pub(crate) fn check_texts(texts: &[String], limits: &crate::config::LimitsConfig) -> Result<()> {
    if texts.is_empty() {
        return Err(Error::invalid(
            "texts",
            "must hold at least one text; got 0",
        ));
    }
    if texts.len() > limits.max_texts_per_request {
        return Err(Error::invalid(
            "texts",
            format!(
                "{} texts is over the limit of {} per request",
                texts.len(),
                limits.max_texts_per_request
            ),
        ));
    }
    for (index, text) in texts.iter().enumerate() {
        if text.len() > limits.max_text_bytes {
            return Err(Error::invalid(
                format!("texts[{index}]"),
                format!(
                    "{} bytes is over the limit of {} bytes",
                    text.len(),
                    limits.max_text_bytes
                ),
            ));
        }
    }
    Ok(())
}
