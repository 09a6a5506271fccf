//! The gRPC surface: one file per tonic service, proto <-> domain conversion, and the single
//! mapping from domain errors to gRPC status codes. The only module that names tonic types.

pub mod auth;
pub mod client;
pub mod closing;
pub mod codec;
pub mod convert;
pub mod deadline;
pub mod detached;
pub mod edge;
pub mod generate;
pub mod half_sent;
pub mod health;
pub mod inference;
pub mod kserve;
pub mod models;
pub mod observe;
pub mod routing;
pub mod status;
pub mod unread;
pub mod wire;

/// Code generated from `proto/lmserve/v1` by build.rs.
pub mod proto {
    tonic::include_proto!("lmserve.v1");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("lmserve_descriptor");
}
