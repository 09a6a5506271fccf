//! Domain errors to gRPC status codes, in one exhaustive match: a new error variant does not
//! compile until someone decides its code.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::ModelNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::RouteNotFound { .. } => Code::NotFound,
            Error::TaskNotServed { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ModelUnavailable { .. } | Error::ShuttingDown => Code::Unavailable,
            Error::QueueFull { .. } => Code::ResourceExhausted,
            Error::Cancelled => Code::Cancelled,
            Error::Internal(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}
