//! The errors a request can meet, classified once; `api::status` maps each to a gRPC code.

use std::fmt;

pub use crate::kinds::Task;
use crate::runtime::step::SharedRunError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is out of range; the message names the field, the limit and the value.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("model `{name}` is not in the repository")]
    ModelNotFound { name: String },
    #[error("model `{model}` has no version `{version}`; versions: [{available}]")]
    VersionNotFound {
        model: String,
        version: String,
        available: String,
    },
    #[error("model `{model}@{version}` does not serve {task}; it serves [{served}]")]
    TaskNotServed {
        model: String,
        version: String,
        task: Task,
        served: String,
    },
    #[error("model `{model}@{version}` is not available: {reason}")]
    ModelUnavailable {
        model: String,
        version: String,
        reason: String,
    },
    #[error("route `{name}` does not exist")]
    RouteNotFound { name: String },
    /// The request conflicts with the server's state (e.g. unloading a version a route uses).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("model `{model}` queue is full ({capacity} texts waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    /// Tokenize and Detokenize calls waiting or running are at their bound (`text::aside`).
    #[error(
        "the tokenizers are busy: {waiting} Tokenize and Detokenize calls are waiting or running, the most at once; retry later"
    )]
    TokenizerBusy { waiting: usize },
    /// The request would wait in the queue past its deadline or the server's maximum queue time.
    #[error(
        "model `{model}` is busy: a new request would wait about {estimated_ms} ms in its queue, over the {allowed_ms} ms it may wait (its deadline, or the server's maximum queue time); retry in {retry_after_ms} ms"
    )]
    Overloaded {
        model: String,
        estimated_ms: u64,
        allowed_ms: u64,
        retry_after_ms: u64,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The caller went away before the work finished; recorded, never sent.
    #[error("cancelled by the caller")]
    Cancelled,
    /// A fault inside the server (a worker died, a broken invariant); never the client's doing.
    #[error("internal error: {0}")]
    Internal(String),
    /// A run of the model failed; the runtime's error is kept as the source.
    #[error("internal error: {0}")]
    Run(#[source] SharedRunError),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `model` has no version `version`; `available` lists the versions it has.
    pub fn version_not_found(
        model: &str,
        version: impl fmt::Display,
        available: impl IntoIterator<Item = u64>,
    ) -> Self {
        let available: Vec<String> = available.into_iter().map(|v| v.to_string()).collect();
        Error::VersionNotFound {
            model: model.to_owned(),
            version: version.to_string(),
            available: available.join(", "),
        }
    }

    /// A refusal by admission control: `refusal` says by how much and when to retry.
    pub fn overloaded(model: &str, refusal: crate::engine::admission::Refusal) -> Self {
        let ms =
            |duration: std::time::Duration| duration.as_millis().min(u128::from(u64::MAX)) as u64;
        Error::Overloaded {
            model: model.to_owned(),
            estimated_ms: ms(refusal.estimated),
            allowed_ms: ms(refusal.allowed),
            retry_after_ms: ms(refusal.retry_after).max(1),
        }
    }

    /// A short label for metrics: what kind of failure this was.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::RouteNotFound { .. } => "not_found",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::TaskNotServed { .. } => "task_not_served",
            Error::ModelUnavailable { .. } => "unavailable",
            Error::QueueFull { .. } => "queue_full",
            Error::TokenizerBusy { .. } => "tokenizer_busy",
            Error::Overloaded { .. } => "overloaded",
            Error::ShuttingDown => "shutting_down",
            Error::Cancelled => "cancelled",
            Error::Internal(_) | Error::Run(_) => "internal",
        }
    }
}

impl From<ort::Error> for Error {
    fn from(error: ort::Error) -> Self {
        Error::Internal(format!("onnxruntime: {error}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest client-supplied value an error message repeats.
pub const MAX_ECHO_BYTES: usize = 200;

/// `text` cut to at most `max` bytes at a character boundary, saying how long it was: a client's
/// 3 MiB model name is not worth sending back.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

/// A client-supplied value as an error message shows it: bounded, in backticks.
pub fn echo(value: &str) -> String {
    format!("`{}`", bounded(value, MAX_ECHO_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary_and_says_the_length() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(300);
        let cut = bounded(&long, 201);
        assert!(cut.starts_with(&"é".repeat(100)));
        assert!(cut.ends_with("… (600 bytes)"), "{cut}");
        assert_eq!(echo("x"), "`x`");
    }
}
