//! The KServe v2 / Open Inference Protocol gRPC service, `inference.GRPCInferenceService` as
//! Triton serves it, on the same port as `lmserve.v1`: tensors and parameters in, lmserve's
//! tasks (`tasks::generate`, `embed`, `classify`) behind, tensors out. This module translates
//! and checks; the work stays in `tasks`. docs/kserve.md describes the mapping.

mod infer;
mod metadata;
mod parameters;
mod request;
mod service;
mod stream;
mod tensors;

pub use service::KserveService;

/// Code generated from `proto/inference` by build.rs.
pub mod proto {
    tonic::include_proto!("inference");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kserve_descriptor");
}

/// The gRPC service name, as paths and health checks spell it.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

#[cfg(test)]
mod tests {
    use super::proto::grpc_inference_service_server::GrpcInferenceServiceServer;

    #[test]
    fn the_service_name_is_the_generated_one() {
        use tonic::server::NamedService;
        assert_eq!(
            super::SERVICE_NAME,
            <GrpcInferenceServiceServer<super::KserveService> as NamedService>::NAME
        );
    }
}
