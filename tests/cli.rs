//! The binary as a client: `lmserve generate|embed|classify` against a running server.

mod common;

use common::{TestServer, run_to_exit};
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{GenerateRequest, GenerationParameters};

#[tokio::test]
async fn generate_embed_and_classify_from_the_command_line() {
    let server = TestServer::start().await;
    let addr = server.url();

    let (ok, output) = run_to_exit(
        &[
            "generate",
            "--addr",
            &addr,
            "--model",
            "tiny-gpt2",
            "--max-new-tokens",
            "12",
            "To be, or not",
        ],
        &[],
    );
    assert!(ok, "{output}");
    let expected = server
        .inference()
        .await
        .generate(GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(Prompt::Text("To be, or not".into())),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(12),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        output.starts_with(&format!("To be, or not{}", expected.sequences[0].text)),
        "{output}"
    );
    assert!(output.contains("tokens, FINISH_REASON_"), "{output}");

    let (ok, output) = run_to_exit(
        &[
            "embed",
            "--addr",
            &addr,
            "--model",
            "tiny-word2vec",
            "king",
            "queen",
        ],
        &[],
    );
    assert!(ok, "{output}");
    let vectors: Vec<Vec<f32>> = output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(vectors.len(), 2);
    assert!(vectors[0].len() > 8);

    let (ok, output) = run_to_exit(
        &[
            "classify",
            "--addr",
            &addr,
            "--model",
            "tiny-encoder",
            "Meeting at noon tomorrow",
        ],
        &[],
    );
    assert!(ok, "{output}");
    assert!(
        output.contains("ham") && output.contains("spam"),
        "{output}"
    );

    let (ok, output) = run_to_exit(&["generate", "--addr", &addr, "--model", "nope", "hi"], &[]);
    assert!(!ok);
    assert!(output.contains("NotFound"), "{output}");
}
