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
    let expected = server.unary_text("tiny-gpt2", "To be, or not", 12).await;
    assert!(
        output.starts_with(&format!("To be, or not{expected}")),
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
    // A reranker scores each text with its --pair: the score reference.json holds for this pair.
    let case = &common::reference("tiny-reranker")["cases"][5];
    assert_eq!(case["text"], "horse kingdom");
    let score = case["probabilities"][0].as_f64().unwrap() as f32;
    let (ok, output) = run_to_exit(
        &[
            "classify",
            "--addr",
            &addr,
            "--model",
            "tiny-reranker",
            "--pair",
            "A horse! a horse! my kingdom for a horse!",
            "horse kingdom",
        ],
        &[],
    );
    assert!(ok, "{output}");
    assert!(
        output.contains(&format!("relevant {score:.4}\thorse kingdom")),
        "{output}"
    );

    let (ok, output) = run_to_exit(&["generate", "--addr", &addr, "--model", "nope", "hi"], &[]);
    assert!(!ok);
    assert!(output.contains("NotFound"), "{output}");
}

/// A continuation is printed after its prompt; a translation stands alone. Which one a stream is
/// comes from the version that served it, so a route to an encoder-decoder counts as one too.
#[tokio::test]
async fn a_translation_is_printed_without_its_prompt_also_through_a_route() {
    let server = TestServer::start().await;
    let addr = server.url();
    let source = "I like to read books.";
    let expected = server.unary_text("tiny-translator", source, 12).await;
    let (ok, output) = run_to_exit(
        &[
            "routes",
            "set",
            "mt",
            "--task",
            "generate",
            "--arm",
            "tiny-translator=1",
            "--addr",
            &addr,
        ],
        &[],
    );
    assert!(ok, "{output}");
    for model in ["tiny-translator", "tiny-translator@1", "mt"] {
        let (ok, output) = run_to_exit(
            &[
                "generate",
                "--addr",
                &addr,
                "--model",
                model,
                "--max-new-tokens",
                "12",
                source,
            ],
            &[],
        );
        assert!(ok, "{output}");
        assert!(
            output.starts_with(&format!("{expected}\n")),
            "{model}: {output}"
        );
    }
}

#[tokio::test]
async fn models_and_routes_from_the_command_line_with_a_host_port_address() {
    let server = TestServer::start_with(common::ServerOptions {
        env: vec![(
            "LMSERVE_API_KEYS".into(),
            "admin:cli-admin-key-0123456789".into(),
        )],
        ..Default::default()
    })
    .await;
    // host:port, as grpcurl takes it, and the key from the environment.
    let addr = server.addr.clone();
    let key = [("LMSERVE_API_KEY", "cli-admin-key-0123456789")];
    let lmserve = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--addr", &addr]);
        run_to_exit(&all, &key)
    };

    let (ok, output) = lmserve(&["models", "list"]);
    assert!(ok, "{output}");
    assert!(output.contains("tiny-gpt2@1  READY  generate"), "{output}");
    assert!(
        output.contains("tiny-encoder@1  READY  embed,classify"),
        "{output}"
    );

    let (ok, output) = lmserve(&["models", "get", "tiny-encoder"]);
    assert!(ok, "{output}");
    assert!(output.contains("  labels  ham,spam"), "{output}");
    assert!(output.contains("  setting  max_length = "), "{output}");

    let (ok, output) = lmserve(&[
        "routes",
        "set",
        "pick",
        "--task",
        "generate",
        "--arm",
        "tiny-gpt2@1=90",
        "--arm",
        "tiny-lstm=10",
    ]);
    assert!(ok, "{output}");
    assert_eq!(
        output.trim(),
        "pick  generate  tiny-gpt2@1=90,tiny-lstm=10  api"
    );
    let (ok, output) = lmserve(&["routes", "list"]);
    assert!(ok && output.contains("pick  generate"), "{output}");
    let (ok, output) = lmserve(&["routes", "delete", "pick"]);
    assert!(ok && output.contains("pick  deleted"), "{output}");
    let (ok, output) = lmserve(&["routes", "get", "pick"]);
    assert!(!ok && output.contains("NotFound"), "{output}");

    let (ok, output) = lmserve(&["models", "unload", "tiny-lstm"]);
    assert!(ok && output.contains("tiny-lstm@1  UNLOADED"), "{output}");
    let (ok, output) = lmserve(&["models", "load", "tiny-lstm"]);
    assert!(ok && output.contains("tiny-lstm@1  READY"), "{output}");

    // Mistakes say what to change.
    let (ok, output) = lmserve(&[
        "routes",
        "set",
        "bad",
        "--task",
        "translate",
        "--arm",
        "tiny-gpt2=1",
    ]);
    assert!(
        !ok && output.contains("--task `translate` is not a task"),
        "{output}"
    );
    let (ok, output) = lmserve(&[
        "routes",
        "set",
        "bad",
        "--task",
        "generate",
        "--arm",
        "tiny-gpt2",
    ]);
    assert!(!ok && output.contains("must be target=number"), "{output}");
    let (ok, output) = run_to_exit(&["models", "list", "--addr", &addr], &[]);
    assert!(!ok && output.contains("Unauthenticated"), "{output}");
    let (ok, output) = run_to_exit(&["models", "list", "--addr", "127.0.0.1:1"], &[]);
    assert!(
        !ok && output.contains("cannot reach lmserve at http://127.0.0.1:1"),
        "{output}"
    );
    assert!(
        output.contains("onnect"),
        "the transport error says why: {output}"
    );
}

/// `lmserve chat` with two lines piped in: each reply streams to stdout on its own line, and
/// the second is the reply to the whole conversation so far (the history is kept).
#[tokio::test]
async fn chat_from_the_command_line_keeps_the_history() {
    use lmserve::api::proto::{ChatMessage, ChatMessages};

    let repository = common::chat_repository("<|endoftext|>");
    common::copy_version("tiny-gpt2", "1", repository.path(), "tiny-gpt2", "1");
    let server = TestServer::start_with(common::ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let addr = server.url();
    let (ok, stdout, stderr) = common::run_with_input(
        &[
            "chat",
            "--addr",
            &addr,
            "--model",
            "tiny-chat",
            "--system",
            "Speak verse.",
            "--max-new-tokens",
            "8",
        ],
        "ROMEO.\nJULIET.\n/exit\nnever sent\n",
    );
    assert!(ok, "{stdout}{stderr}");

    let mut client = server.inference().await;
    let turn = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    let mut history = vec![turn("system", "Speak verse."), turn("user", "ROMEO.")];
    let mut expected = String::new();
    for next in ["JULIET.", ""] {
        let reply = client
            .generate(GenerateRequest {
                model: "tiny-chat".into(),
                prompt: Some(Prompt::Messages(ChatMessages {
                    messages: history.clone(),
                })),
                parameters: Some(GenerationParameters {
                    max_new_tokens: Some(8),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let text = &reply.sequences[0].text;
        expected.push_str(&format!("{text}\n"));
        history.push(turn("assistant", text));
        history.push(turn("user", next));
    }
    assert_eq!(stdout, expected);

    // A model without a chat template: the server's reason, and a failing exit.
    let (ok, stdout, stderr) =
        common::run_with_input(&["chat", "--addr", &addr, "--model", "tiny-gpt2"], "hi\n");
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("tiny-gpt2@1") && stderr.contains("no chat_template"),
        "{stderr}"
    );
}

/// A client whose output goes to a reader that has already gone (`lmserve models get m | head`)
/// ends quietly on SIGPIPE, without a panic and its backtrace.
#[tokio::test]
async fn a_client_piped_into_a_closed_reader_ends_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let server = TestServer::start().await;
    // The reader is closed before the child starts: closing it after `spawn` raced the
    // child, which on a loaded machine could print its answer into the pipe first and exit 0.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lmserve"))
        .args(["models", "get", "--addr", &server.url(), "tiny-gpt2@1"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
}
