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

/// Server reflection's methods, which its crate declares outside the descriptors below; both are
/// streams of requests.
const REFLECTION_METHODS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The path of every method the server serves, and whether its client sends a stream of
/// requests, from the services' own descriptors.
fn declared_methods() -> Vec<(String, bool)> {
    use prost::Message;
    let mut methods: Vec<(String, bool)> = REFLECTION_METHODS
        .iter()
        .map(|path| (path.to_string(), true))
        .collect();
    for encoded in [
        proto::FILE_DESCRIPTOR_SET,
        kserve::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(encoded)
            .expect("the descriptors compiled into the server decode");
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    methods.push((path, method.client_streaming()));
                }
            }
        }
    }
    methods
}
