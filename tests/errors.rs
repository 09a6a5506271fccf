//! Every failure a client can cause comes back with a deliberate code and a message naming the
//! field, the limit and the value; none of them disturbs the server.

mod common;

use common::{ServerOptions, TestServer, copy_version};
use lmserve::api::proto::{
    ClassifyRequest, DetokenizeRequest, EmbedRequest, ListModelsRequest, LoadState, TokenizeRequest,
};
use tonic::Code;

fn embed(model: &str, texts: Vec<String>) -> EmbedRequest {
    EmbedRequest {
        model: model.into(),
        texts,
        ..Default::default()
    }
}

fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    needles: &[&str],
) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "message {:?} lacks {needle:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let one = || vec!["hello there".to_string()];

    assert_status(
        client.embed(embed("no-such-model", one())).await,
        Code::NotFound,
        &["no-such-model"],
    );
    assert_status(
        client.embed(embed("tiny-encoder@9", one())).await,
        Code::NotFound,
        &["tiny-encoder", "9", "versions: [1]"],
    );
    assert_status(
        client.embed(embed("tiny-encoder@x", one())).await,
        Code::InvalidArgument,
        &["model", "tiny-encoder@x"],
    );
    assert_status(
        client.embed(embed("", one())).await,
        Code::InvalidArgument,
        &["model"],
    );
    assert_status(
        client.embed(embed("tiny-encoder", vec![])).await,
        Code::InvalidArgument,
        &["texts", "at least one", "0"],
    );
    assert_status(
        client
            .embed(embed("tiny-encoder", vec![String::new()]))
            .await,
        Code::InvalidArgument,
        &["texts[0]", "no tokens"],
    );
    assert_status(
        client
            .embed(embed("tiny-encoder", vec!["x".into(); 300]))
            .await,
        Code::InvalidArgument,
        &["texts", "300", "256"],
    );

    let unknown_pooling = EmbedRequest {
        pooling: 42,
        ..embed("tiny-encoder", one())
    };
    assert_status(
        client.embed(unknown_pooling).await,
        Code::InvalidArgument,
        &["pooling", "42"],
    );
    let unknown_truncate = EmbedRequest {
        truncate: 9,
        ..embed("tiny-encoder", one())
    };
    assert_status(
        client.embed(unknown_truncate).await,
        Code::InvalidArgument,
        &["truncate", "9"],
    );

    let long = vec!["word ".repeat(2000)];
    assert_status(
        client.embed(embed("tiny-encoder", long.clone())).await,
        Code::InvalidArgument,
        &[
            "texts[0]",
            "tokens is over the model's maximum of",
            "truncate",
        ],
    );

    let classify = |top_k: Option<u32>, model: &str| ClassifyRequest {
        model: model.into(),
        texts: one(),
        top_k,
        ..Default::default()
    };
    assert_status(
        client.classify(classify(Some(0), "tiny-encoder")).await,
        Code::InvalidArgument,
        &["top_k", "at least 1", "0"],
    );
    let bad_scores = ClassifyRequest {
        scores: 5,
        ..classify(None, "tiny-encoder")
    };
    assert_status(
        client.classify(bad_scores).await,
        Code::InvalidArgument,
        &["scores", "5"],
    );

    // A task the model does not serve.
    assert_status(
        client.classify(classify(None, "tiny-word2vec")).await,
        Code::FailedPrecondition,
        &["tiny-word2vec", "classify", "embed"],
    );
    assert_status(
        client.embed(embed("tiny-gpt2", one())).await,
        Code::FailedPrecondition,
        &["tiny-gpt2", "embed", "generate"],
    );

    assert_status(
        client
            .detokenize(DetokenizeRequest {
                model: "tiny-gpt2".into(),
                ids: vec![1, 99_999_999],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["ids[1]", "99999999", "vocabulary"],
    );
    assert_status(
        client
            .tokenize(TokenizeRequest {
                model: "nope".into(),
                text: "x".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["nope"],
    );

    // Streams: a bad message ends the stream with its status after the good ones before it.
    let requests = vec![
        embed("tiny-encoder", one()),
        embed("tiny-encoder", vec![]),
        embed("tiny-encoder", one()),
    ];
    let stream = client
        .embed_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let results: Vec<_> = futures::StreamExt::collect::<Vec<_>>(stream).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].is_ok());
    assert_eq!(
        results[1].as_ref().unwrap_err().code(),
        Code::InvalidArgument
    );

    // After all of that the server still serves.
    let ok = client
        .embed(embed("tiny-encoder", one()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.embeddings.len(), 1);
}

#[tokio::test]
async fn a_full_queue_is_resource_exhausted() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("LMSERVE_BATCHING__QUEUE_CAPACITY".into(), "4".into())],
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    assert_status(
        client
            .embed(embed("tiny-encoder", vec!["a text".into(); 5]))
            .await,
        Code::ResourceExhausted,
        &["tiny-encoder", "queue is full", "4"],
    );
    // Under the capacity the same model still answers.
    assert_eq!(
        client
            .embed(embed("tiny-encoder", vec!["a text".into(); 4]))
            .await
            .unwrap()
            .into_inner()
            .embeddings
            .len(),
        4
    );
}

#[tokio::test]
async fn a_model_that_failed_to_load_is_unavailable_and_the_others_serve() {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "good", "1");
    // A corrupt graph, a missing graph, and a manifest naming a tensor the graph lacks.
    copy_version("tiny-encoder", "1", repository.path(), "corrupt", "1");
    std::fs::write(
        repository.path().join("corrupt/1/model.onnx"),
        b"not an onnx file",
    )
    .unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "missing", "1");
    std::fs::remove_file(repository.path().join("missing/1/model.onnx")).unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "mismatch", "1");
    let manifest_path = repository.path().join("mismatch/1/model.toml");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let manifest = manifest.replace(
        "hidden_states = \"last_hidden_state\"",
        "hidden_states = \"no_such_output\"",
    );
    assert!(manifest.contains("no_such_output"));
    std::fs::write(&manifest_path, manifest).unwrap();
    // A second, broken version of the good model: the latest ready version still serves.
    copy_version("tiny-encoder", "1", repository.path(), "good", "2");
    std::fs::write(repository.path().join("good/2/model.onnx"), b"garbage").unwrap();

    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    let served = client
        .embed(embed("good", vec!["fine".into()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.served_by.unwrap().version, "1");
    assert_status(
        client.embed(embed("good@2", vec!["x".into()])).await,
        Code::Unavailable,
        &["good@2"],
    );
    for (name, reason) in [
        ("corrupt", "model.onnx"),
        ("missing", "missing"),
        ("mismatch", "no_such_output"),
    ] {
        assert_status(
            client.embed(embed(name, vec!["x".into()])).await,
            Code::Unavailable,
            &[name, reason],
        );
        let mut models = server.models().await;
        let info = models
            .get_model(lmserve::api::proto::GetModelRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            info.versions[0].state,
            lmserve::api::proto::LoadState::Failed as i32
        );
        assert!(
            info.versions[0].load_error.contains(reason),
            "{name}: {}",
            info.versions[0].load_error
        );
    }
}

/// A name is held to `limits.max_name_bytes`, and a version pin comes on top: a model whose
/// name is at the limit serves by name and pinned to a version, and one byte more is refused.
#[tokio::test]
async fn a_model_named_at_the_limit_can_be_pinned_to_a_version() {
    let repository = tempfile::tempdir().unwrap();
    let longest = format!("tiny-encoder-{}", "x".repeat(128 - "tiny-encoder-".len()));
    copy_version("tiny-encoder", "1", repository.path(), &longest, "1");
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    for target in [longest.clone(), format!("{longest}@1")] {
        let response = client
            .embed(embed(&target, vec!["hello".into()]))
            .await
            .unwrap_or_else(|status| panic!("{target}: {status:?}"));
        assert_eq!(response.into_inner().embeddings.len(), 1);
    }
    assert_status(
        client
            .embed(embed(&format!("{longest}x@1"), vec!["hello".into()]))
            .await,
        Code::InvalidArgument,
        &["model", "129 bytes is over the limit of 128 bytes"],
    );
}

/// A file system allows folder names no request could send: longer than
/// `limits.max_name_bytes`, with control characters, with `@` (a request reads what follows as a
/// version) or a space at either end (a request is trimmed). Such a folder is reported as failed
/// with what to change, rather than loaded and held in memory for nothing; the others serve.
#[tokio::test]
async fn a_model_folder_no_request_could_name_is_reported_failed() {
    let repository = tempfile::tempdir().unwrap();
    let too_long = format!("tiny-encoder-{}", "x".repeat(129 - "tiny-encoder-".len()));
    let unnameable = [
        (
            too_long.as_str(),
            "129 bytes is over the limit of 128 bytes",
        ),
        ("bell\u{7}", "holds control characters"),
        ("enc@1", "holds `@`"),
        ("enc@v", "holds `@`"),
        (" enc", "starts or ends with a space"),
    ];
    copy_version("tiny-encoder", "1", repository.path(), "enc", "1");
    for (name, _) in unnameable {
        copy_version("tiny-encoder", "1", repository.path(), name, "1");
    }
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let list = server
        .models()
        .await
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    for (name, why) in unnameable {
        let listed = list
            .models
            .iter()
            .find(|model| model.name == name)
            .unwrap_or_else(|| panic!("{name:?} is not listed"));
        let version = &listed.versions[0];
        assert_eq!(version.state, LoadState::Failed as i32, "{name:?}");
        for expected in ["no request could name this model", why, "rename the folder"] {
            assert!(
                version.load_error.contains(expected),
                "{name:?}: {}",
                version.load_error
            );
        }
    }
    // "enc@1" names version 1 of `enc`, which serves.
    let response = server
        .inference()
        .await
        .embed(embed("enc@1", vec!["hello".into()]))
        .await
        .unwrap();
    assert_eq!(response.into_inner().served_by.unwrap().model, "enc");
}
