//! Startup fails loudly, with the fix in the message, on what a person must repair.

mod common;

use common::run_to_exit;

#[test]
fn a_missing_onnx_runtime_names_the_command_that_fetches_it() {
    // From an empty folder, so the Makefile's cache folder is not found either.
    let empty = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lmserve"))
        .current_dir(empty.path())
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--ort-library",
            "/nonexistent/libonnxruntime.so",
        ])
        .env("ORT_DYLIB_PATH", "/nonexistent/too.so")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(text.contains("ONNX Runtime library not found"), "{text}");
    assert!(text.contains("make onnxruntime"), "{text}");
    assert!(text.contains("/nonexistent/libonnxruntime.so"), "{text}");
}

#[test]
fn a_port_in_use_is_a_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, output) = run_to_exit(&["serve", "--grpc-addr", &addr, "--no-metrics"], &[]);
    assert!(!ok);
    assert!(
        output.contains(&format!("cannot listen on {addr}")),
        "{output}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn decode_cpus_the_process_may_not_use_are_a_startup_error() {
    let (ok, output) = run_to_exit(
        &["serve", "--grpc-addr", "127.0.0.1:0", "--no-metrics"],
        &[("LMSERVE_RUNTIME__DECODE_CPUS", "1000-1001")],
    );
    assert!(!ok);
    assert!(
        output.contains("runtime.decode_cpus = \"1000-1001\" names CPU 1000")
            && output.contains("may only run on CPUs"),
        "{output}"
    );
}

#[test]
fn a_required_gpu_that_is_missing_is_a_startup_error() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_version("tiny-word2vec", "1", repository.path(), "w2v", "1");
    let (ok, output) = common::serve_to_exit(
        repository.path(),
        &[
            (
                "LMSERVE_RUNTIME__EXECUTION_PROVIDERS",
                "[\"cuda:0\", \"cpu\"]",
            ),
            ("LMSERVE_RUNTIME__REQUIRED_PROVIDER", "cuda:0"),
        ],
    );
    assert!(!ok, "{output}");
    assert!(
        output.contains("required execution provider cuda:0 could not register"),
        "{output}"
    );
}

/// A required provider must be the one that serves: one not in the list is a startup error,
/// not a silent CPU pod.
#[test]
fn a_required_provider_missing_from_the_list_is_a_startup_error() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_version("tiny-word2vec", "1", repository.path(), "w2v", "1");
    let (ok, output) = common::serve_to_exit(
        repository.path(),
        &[("LMSERVE_RUNTIME__REQUIRED_PROVIDER", "cuda:0")],
    );
    assert!(!ok, "{output}");
    assert!(
        output.contains("cuda:0") && output.contains("not among runtime.execution_providers"),
        "{output}"
    );
}

/// With a required provider that registers, a model's own fault (a corrupt graph) fails that
/// model alone; the rest serve.
#[tokio::test]
async fn a_broken_model_under_a_required_provider_fails_alone() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_version("tiny-word2vec", "1", repository.path(), "w2v", "1");
    common::copy_version("tiny-word2vec", "1", repository.path(), "broken", "1");
    std::fs::write(
        repository.path().join("broken/1/model.onnx"),
        b"not a graph",
    )
    .unwrap();
    let server = common::TestServer::start_with(common::ServerOptions {
        repository: repository.path().to_owned(),
        env: vec![("LMSERVE_RUNTIME__REQUIRED_PROVIDER".into(), "cpu".into())],
        ..Default::default()
    })
    .await;
    let mut models = server.models().await;
    let state = |info: lmserve::api::proto::ModelInfo| info.versions[0].state;
    let broken = models
        .get_model(lmserve::api::proto::GetModelRequest {
            name: "broken".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(broken), lmserve::api::proto::LoadState::Failed as i32);
    let w2v = models
        .get_model(lmserve::api::proto::GetModelRequest { name: "w2v".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(w2v), lmserve::api::proto::LoadState::Ready as i32);
}

#[test]
fn an_invalid_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmserve.toml");
    std::fs::write(&path, "[batching]\nmax_batch = 3\n").unwrap();
    let (ok, output) = run_to_exit(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(output.contains("max_batch"), "{output}");
}
