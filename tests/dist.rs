//! The container image's tree (`make dist`) runs on its own: copied outside the checkout and
//! started with a clean environment, the server finds its library, models and configuration
//! in the tree and serves. The image's paths are absolute; here the copy's root stands in for
//! `/`, and only those paths are pointed at it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{EmbedRequest, GenerateRequest, GenerationParameters};
use tonic::transport::Channel;

#[tokio::test]
async fn the_image_tree_serves_on_its_own() {
    let tree = common::root().join("dist/root");
    assert!(
        tree.join("usr/local/bin/lmserve").is_file(),
        "no image tree in {}; run `make dist`",
        tree.display()
    );
    let root = tempfile::tempdir().unwrap();
    common::copy_dir(&tree, root.path());
    // Nothing else: binary, library, models, configuration and the state volume.
    let mut top: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["etc", "opt", "usr", "var"]);
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    let config = std::fs::read_to_string(at("/etc/lmserve/lmserve.toml")).unwrap();
    for path in [
        "/opt/lmserve/models/repository",
        "/opt/lmserve/lib/libonnxruntime.so",
        "/var/lib/lmserve/state.json",
    ] {
        assert!(
            config.contains(path),
            "the image config does not use {path}"
        );
    }

    let mut child = Command::new(at("/usr/local/bin/lmserve"))
        .args(["serve", "--config"])
        .arg(at("/etc/lmserve/lmserve.toml"))
        .args(["--grpc-addr", "127.0.0.1:0", "--no-metrics"])
        .current_dir(root.path())
        .env_clear()
        .env(
            "LMSERVE_REPOSITORY__PATH",
            at("/opt/lmserve/models/repository"),
        )
        .env(
            "LMSERVE_RUNTIME__ORT_LIBRARY",
            at("/opt/lmserve/lib/libonnxruntime.so"),
        )
        .env("LMSERVE_STATE__PATH", at("/var/lib/lmserve/state.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The image logs JSON: every line on stderr is a JSON object, the ports in the
    // `lmserve listening` event.
    let mut addr = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line:?}"));
        if event["message"] == "lmserve listening" {
            addr = event["grpc"].as_str().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("the listening event");
    let outcome = serve_a_little(&format!("http://{addr}"), root.path()).await;
    let _ = child.kill();
    let _ = child.wait();
    outcome.unwrap();
}

async fn serve_a_little(url: &str, root: &Path) -> Result<(), String> {
    let mut client = None;
    for _ in 0..600 {
        if let Ok(channel) = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
        {
            let mut candidate = InferenceClient::new(channel);
            let probe = EmbedRequest {
                model: "tiny-encoder".into(),
                texts: vec!["hello".into()],
                ..Default::default()
            };
            if candidate.embed(probe).await.is_ok() {
                client = Some(candidate);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut client = client.ok_or("the tree's server never answered")?;
    let request = GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::Text("ROMEO.".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(8),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    // Models load side by side and the server is ready with the first one; the decoder may
    // still be loading when the encoder answers.
    let mut attempts = 0;
    let generated = loop {
        match client.generate(request.clone()).await {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 600 => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(status) => return Err(status.to_string()),
        }
    };
    if generated.sequences[0].tokens.len() != 8 {
        return Err(format!("{generated:?}"));
    }
    // The checkout was not needed: the server read nothing outside the tree it was given.
    if !root.join("var/lib/lmserve").is_dir() {
        return Err("the state volume is missing".into());
    }
    Ok(())
}
