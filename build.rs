//! Generates the gRPC server and client code for `proto/lmserve/v1` and for the KServe v2
//! protocol in `proto/inference` into OUT_DIR.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lmserve_descriptor.bin"))
        // Undecodable requests are the client's doing: INVALID_ARGUMENT, not tonic's INTERNAL.
        .codec_path("crate::api::codec::StrictCodec")
        .compile_with_config(
            named_types(),
            &[
                "proto/lmserve/v1/inference.proto",
                "proto/lmserve/v1/models.proto",
            ],
            &["proto"],
        )?;
    // Its own descriptor set, so reflection can offer it apart from lmserve's own API.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kserve_descriptor.bin"))
        .codec_path("crate::api::codec::StrictCodec")
        .compile_with_config(
            named_types(),
            &["proto/inference/grpc_service.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Messages that know their protobuf name (`prost::Name`): the codec looks a request's fields
/// up in the descriptors by it before decoding (`api::wire`).
fn named_types() -> prost_build::Config {
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    config
}
