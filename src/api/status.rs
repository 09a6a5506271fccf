//! Domain errors to gRPC status codes, in one exhaustive match: a new error variant does not
//! compile until someone decides its code. No error maps to OUT_OF_RANGE, which `edge` relies
//! on to recognise tonic's over-size refusals.

use tonic::{Code, Status};

use crate::error::Error;
use crate::runtime::step::RunError;

/// Longest status message sent: a few echoed values and the reason, never a whole input.
const MAX_MESSAGE_BYTES: usize = 1024;
/// The trailer that tells a gRPC client's retry policy how long to back off, in milliseconds.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::RouteNotFound { .. } => Code::NotFound,
            Error::TaskNotServed { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ModelUnavailable { .. } | Error::ShuttingDown => Code::Unavailable,
            Error::QueueFull { .. } | Error::Overloaded { .. } | Error::TokenizerBusy { .. } => {
                Code::ResourceExhausted
            }
            Error::Run(run) if matches!(**run, RunError::CacheMemory { .. }) => {
                Code::ResourceExhausted
            }
            Error::Cancelled => Code::Cancelled,
            Error::Internal(_) | Error::Run(_) => Code::Internal,
        };
        let message = error.to_string();
        let mut status = Status::new(
            code,
            crate::error::bounded(&message, MAX_MESSAGE_BYTES).into_owned(),
        );
        // gRPC's retry policy reads when to try again from this trailer.
        if let Error::Overloaded { retry_after_ms, .. } = error {
            status
                .metadata_mut()
                .insert(RETRY_PUSHBACK, retry_after_ms.into());
        }
        status
    }
}
