//! Models served as their Hugging Face files define them, on the fixture encoder (see
//! tests/fixtures/build.py): special tokens, limits and labels from the files beside the graph,
//! an already pooled output, load-time checks that name the key to fix, and run failures that
//! stay with their own callers.

mod common;

use common::{
    ServerOptions, TestServer, copy_dir, copy_version, fixtures, max_abs_diff, run_to_exit, setting,
};
use lmserve::api::proto::{
    ClassifyRequest, EmbedRequest, GetModelRequest, LoadModelRequest, LoadState, Pooling,
    ScoreKind, TokenizeRequest, Truncate,
};
use lmserve::runtime::bindings::Bindings;
use lmserve::runtime::encoder::{self, Embedding, EncoderRow};
use tonic::Code;

fn fixture_reference() -> serde_json::Value {
    let text =
        std::fs::read_to_string(common::root().join("tests/fixtures/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `version` failed to load, its reason naming each of `needles`.
fn assert_failed_naming(version: &lmserve::api::proto::ModelVersion, needles: &[&str]) {
    assert_eq!(version.state, LoadState::Failed as i32);
    for needle in needles {
        assert!(
            version.load_error.contains(needle),
            "{needle:?} not in {}",
            version.load_error
        );
    }
}

fn embed(model: &str, text: &str) -> EmbedRequest {
    EmbedRequest {
        model: model.into(),
        texts: vec![text.into()],
        ..Default::default()
    }
}

async fn fixture_server(env: Vec<(String, String)>) -> (TestServer, tempfile::TempDir) {
    fixture_server_with(env, Vec::new()).await
}

async fn fixture_server_with(
    env: Vec<(String, String)>,
    args: Vec<String>,
) -> (TestServer, tempfile::TempDir) {
    let repository = tempfile::tempdir().unwrap();
    for name in ["pooled-encoder", "misbound-encoder"] {
        copy_dir(&fixtures().join(name), &repository.path().join(name));
    }
    copy_version("tiny-encoder", "1", repository.path(), "tiny-encoder", "1");
    // Files that disagree with the graph, or do not parse.
    let pooled = fixtures().join("pooled-encoder");
    copy_dir(&pooled, &repository.path().join("three-labels"));
    std::fs::write(
        repository.path().join("three-labels/1/config.json"),
        r#"{"max_position_embeddings": 16, "id2label": {"0": "a", "1": "b", "2": "c"}}"#,
    )
    .unwrap();
    copy_dir(&pooled, &repository.path().join("broken-config"));
    std::fs::write(
        repository.path().join("broken-config/1/config.json"),
        "{ \"id2label\": ",
    )
    .unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        env,
        args,
        ..Default::default()
    })
    .await;
    (server, repository)
}

#[tokio::test]
async fn settings_come_from_the_hugging_face_files_and_the_graph() {
    let (server, _repository) = fixture_server(Vec::new()).await;
    let reference = fixture_reference();
    let mut client = server.inference().await;

    // Embed returns the graph's own pooled output, as it is: the masked mean over [CLS] text
    // [SEP], computed independently with numpy from the weights.
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = common::floats(&case["mean"]);
        let pooled = client
            .embed(embed("pooled-encoder", text))
            .await
            .unwrap()
            .into_inner();
        let embedding = &pooled.embeddings[0];
        assert!(max_abs_diff(&embedding.values, &expected) < 1e-5, "{text}");
        assert_eq!(
            embedding.token_count as usize,
            case["ids"].as_array().unwrap().len()
        );
        // Pooling the per-token states here instead gives the same vector.
        let by_server = client
            .embed(EmbedRequest {
                pooling: Pooling::Mean as i32,
                ..embed("pooled-encoder", text)
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            max_abs_diff(&by_server.embeddings[0].values, &expected) < 1e-5,
            "{text}"
        );

        // Labels from config.json's id2label; raw scores are the graph's logits.
        let classified = client
            .classify(ClassifyRequest {
                model: "pooled-encoder".into(),
                texts: vec![text.into()],
                scores: ScoreKind::Raw as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let logits = common::floats(&case["logits"]);
        for label in &classified.classifications[0].labels {
            assert_eq!(label.label, ["NEGATIVE", "POSITIVE"][label.index as usize]);
            assert!((label.score - logits[label.index as usize]).abs() < 1e-5);
        }
    }

    // Tokenize adds what inference feeds by default: the post-processor's [CLS] and [SEP].
    let tokenize = |add_special_tokens| TokenizeRequest {
        model: "pooled-encoder".into(),
        text: "the king is dead".into(),
        add_special_tokens,
        messages: None,
        text_pair: None,
    };
    let ids = |response: lmserve::api::proto::TokenizeResponse| {
        response.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
    };
    let default = ids(client.tokenize(tokenize(None)).await.unwrap().into_inner());
    let expected: Vec<u32> = reference["cases"][0]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(default, expected);
    let plain = ids(client
        .tokenize(tokenize(Some(false)))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(plain, expected[1..expected.len() - 1]);

    // max_length (16, config.json) counts the special tokens; truncation cuts the text only.
    let words = "to be or not to be that is the question all the world a stage and all the men";
    let status = client
        .embed(embed("pooled-encoder", words))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("21 tokens is over the model's maximum of 16"),
        "{status:?}"
    );
    let truncated = client
        .embed(EmbedRequest {
            truncate: Truncate::Right as i32,
            ..embed("pooled-encoder", words)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(truncated.embeddings[0].token_count, 16);
    assert!(truncated.embeddings[0].truncated);
    let first_fourteen: Vec<&str> = words.split(' ').take(14).collect();
    let by_hand = client
        .embed(embed("pooled-encoder", &first_fourteen.join(" ")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        by_hand.embeddings[0].values, truncated.embeddings[0].values,
        "[SEP] kept"
    );

    // GetModel says where each setting came from.
    let mut models = server.models().await;
    let info = models
        .get_model(GetModelRequest {
            name: "pooled-encoder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = &info.versions[0];
    assert_eq!(version.max_length, 16);
    assert_eq!(version.labels, ["NEGATIVE", "POSITIVE"]);
    assert_eq!(setting(version, "max_length"), ("16", "config.json"));
    assert_eq!(
        setting(version, "classify.labels"),
        ("[\"NEGATIVE\", \"POSITIVE\"]", "config.json")
    );
    assert_eq!(
        setting(version, "embed.pooling"),
        ("the graph's pooled output", "graph")
    );
    assert_eq!(setting(version, "embed.normalize"), ("false", "default"));
    assert_eq!(setting(version, "pad_token_id"), ("0", "config.json"));
    assert_eq!(setting(version, "add_special_tokens").1, "tokenizer.json");
}

#[tokio::test]
async fn a_pooled_output_bound_as_hidden_states_fails_at_load_with_the_graph_and_the_key() {
    let (server, _repository) = fixture_server(Vec::new()).await;
    let mut models = server.models().await;
    let info = models
        .get_model(GetModelRequest {
            name: "misbound-encoder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = &info.versions[0];
    assert_failed_naming(
        version,
        &[
            "sentence_embedding float32 [?, 8]",
            "[tensors].hidden_states",
            "[embed].pooled_output",
            "graph inputs: input_ids int64 [?, ?]",
            "graph outputs: token_embeddings float32 [?, ?, 8]",
        ],
    );
    // The graph is described for the failed version too.
    let outputs: Vec<&str> = version.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        outputs,
        ["token_embeddings", "sentence_embedding", "logits"]
    );
    assert_eq!(version.outputs[1].shape, [-1, 8]);

    let mut client = server.inference().await;
    let status = client
        .embed(embed("misbound-encoder", "the king"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // The other models serve.
    client
        .embed(embed("pooled-encoder", "the king"))
        .await
        .unwrap();
    client
        .embed(embed("tiny-encoder", "the king"))
        .await
        .unwrap();
}

/// An encoder with no attention_mask input cannot be told where a row's padding is: a batch of
/// texts of different lengths runs them apart, so each embedding is what the text alone gives.
/// The fixture's states add their row's mean, so a text's mean-pooled vector is twice the mean
/// of its embedding rows (reference computed with numpy from the same table). Run through the
/// encoder directly: the server's batch limit, timed at load, may keep a tiny graph's texts in
/// batches of one.
#[tokio::test]
async fn an_encoder_without_a_mask_never_reads_padding() {
    let model = fixtures().join("unmasked-encoder/1/model.onnx");
    let pool = std::sync::Arc::new(common::cpu_session_pool(&model, 1));
    let bindings = Bindings {
        input_ids: "input_ids".into(),
        attention_mask: None,
        position_ids: None,
        first_position: 0,
        token_type_ids: None,
        logits: None,
        hidden_states: Some("last_hidden_state".into()),
        pooled_output: None,
        state: Vec::new(),
        seqlens_k: None,
        total_sequence_length: None,
    };
    let reference = fixture_reference();
    let cases = reference["cases"].as_array().unwrap().clone();
    let rows: Vec<EncoderRow> = cases
        .iter()
        .map(|case| EncoderRow {
            ids: case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_i64().unwrap())
                .collect(),
            embedding: Some(Embedding::Pool(encoder::Pooling::Mean)),
            pool_from: 0,
            logits: false,
            ..EncoderRow::default()
        })
        .collect();
    assert!(
        rows.windows(2)
            .any(|pair| pair[0].ids.len() != pair[1].ids.len())
    );
    let outputs = pool
        .acquire()
        .await
        .run(move |session| encoder::run(session, &bindings, 0, &rows))
        .await
        .unwrap()
        .unwrap();
    for (case, output) in cases.iter().zip(&outputs) {
        let expected: Vec<f32> = common::floats(&case["mean"])
            .iter()
            .map(|x| 2.0 * x)
            .collect();
        let got = output.pooled.as_ref().unwrap();
        assert!(
            max_abs_diff(got, &expected) < 1e-5,
            "{}: {got:?} against {expected:?}",
            case["text"]
        );
    }
}

/// A classifier with one label (a reranker, a single-score head) is scored with a sigmoid, as
/// transformers' text-classification pipeline does: a softmax over one logit would be 1 for
/// every text. References computed with numpy from the fixture's weights.
#[tokio::test]
async fn one_label_is_scored_with_a_sigmoid() {
    let repository = tempfile::tempdir().unwrap();
    copy_dir(
        &fixtures().join("one-label-encoder"),
        &repository.path().join("one-label-encoder"),
    );
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    for case in fixture_reference()["cases"].as_array().unwrap() {
        let classified = client
            .classify(ClassifyRequest {
                model: "one-label-encoder".into(),
                texts: vec![case["text"].as_str().unwrap().into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let [label] = &classified.classifications[0].labels[..] else {
            panic!("{classified:?}");
        };
        assert_eq!(label.label, "RELEVANT");
        let expected = case["one_label_score"].as_f64().unwrap() as f32;
        assert!(
            (label.score - expected).abs() < 1e-5,
            "{label:?} against {expected}"
        );
    }
}

/// A regression head (problem_type "regression" in config.json, as transformers saves a
/// one-label model trained on scores) is returned as it is, as transformers' pipeline applies
/// no function to it; a request may still ask for the sigmoid. The value is the numpy logit.
#[tokio::test]
async fn a_regression_head_returns_its_values_as_they_are() {
    let repository = tempfile::tempdir().unwrap();
    let version = repository.path().join("scorer/1");
    copy_dir(&fixtures().join("one-label-encoder/1"), &version);
    let config = version.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["problem_type"] = "regression".into();
    std::fs::write(&config, json.to_string()).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let models = server.models().await;
    let described = common::first_version(&models, "scorer").await;
    assert_eq!(
        setting(&described, "classify.activation"),
        ("identity", "config.json")
    );
    let mut client = server.inference().await;
    for case in fixture_reference()["cases"].as_array().unwrap() {
        let request = |scores: ScoreKind| ClassifyRequest {
            model: "scorer".into(),
            texts: vec![case["text"].as_str().unwrap().into()],
            scores: scores as i32,
            ..Default::default()
        };
        let score = |response: lmserve::api::proto::ClassifyResponse| {
            response.classifications[0].labels[0].score
        };
        let probability = case["one_label_score"].as_f64().unwrap() as f32;
        let logit = (probability / (1.0 - probability)).ln();
        let unset = score(
            client
                .classify(request(ScoreKind::Unspecified))
                .await
                .unwrap()
                .into_inner(),
        );
        assert!((unset - logit).abs() < 1e-3, "{unset} against {logit}");
        let asked = score(
            client
                .classify(request(ScoreKind::Probability))
                .await
                .unwrap()
                .into_inner(),
        );
        assert!(
            (asked - probability).abs() < 1e-5,
            "{asked} against {probability}"
        );
    }
}

/// sentence-transformers' CrossEncoders (tests/fixtures/cross_encoders.py): each fixture, with
/// each way its files name the activation written over the saved ones, as "{fixture}-{variant}".
fn cross_encoder_repository() -> (tempfile::TempDir, serde_json::Value) {
    let path = common::root().join("tests/fixtures/cross_encoders.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let repository = tempfile::tempdir().unwrap();
    for (fixture, model) in reference.as_object().unwrap() {
        copy_dir(&fixtures().join(fixture), &repository.path().join(fixture));
        for (variant, case) in model["cases"].as_object().unwrap() {
            let Some(files) = case["files"].as_object() else {
                continue;
            };
            let folder = repository.path().join(format!("{fixture}-{variant}"));
            copy_dir(&fixtures().join(fixture), &folder);
            for (file, content) in files {
                let path = folder.join("1").join(file);
                match content {
                    serde_json::Value::Null => std::fs::remove_file(path).unwrap(),
                    json => std::fs::write(path, json.to_string()).unwrap(),
                }
            }
        }
    }
    (repository, reference)
}

/// A sentence-transformers CrossEncoder is scored as `CrossEncoder.predict` scores its pairs:
/// through the activation its files name (version 6's config_sentence_transformers.json, or
/// config.json as versions 4-5 and earlier wrote it), else a sigmoid for one label and the raw
/// logits for more; a function outside PyTorch is passed over for the next file's, or that
/// default, as sentence-transformers does without trust_remote_code. model.toml's
/// `[classify] activation` overrides them all. transformers' pipeline would have
/// given a sigmoid and a softmax. A default prompt goes before each pair's first text, as
/// `predict` puts it. A tokenizer whose `model_input_names` leave out
/// `token_type_ids` feeds the model no type ids. The references are sentence-transformers' own.
#[tokio::test]
async fn a_cross_encoder_scores_pairs_as_sentence_transformers_does() {
    let (repository, reference) = cross_encoder_repository();
    // A PyTorch activation the server does not apply: the load fails, unless model.toml says
    // how to score.
    for name in ["ce-relu", "ce-relu-overridden"] {
        let folder = repository.path().join(name);
        copy_dir(&fixtures().join("ce-reranker"), &folder);
        std::fs::write(
            folder.join("1/config_sentence_transformers.json"),
            r#"{"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.ReLU"}"#,
        )
        .unwrap();
    }
    let manifest = repository.path().join("ce-relu-overridden/1/model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text + "\n[classify]\nactivation = \"identity\"\n",
    )
    .unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let models = server.models().await;
    let mut client = server.inference().await;
    let mut checked = 0;
    for (fixture, model) in reference.as_object().unwrap() {
        let pairs = model["pairs"].as_array().unwrap();
        let (texts, text_pairs) = pairs
            .iter()
            .map(|pair| {
                let text = |i: usize| pair[i].as_str().unwrap().to_owned();
                (text(0), text(1))
            })
            .unzip();
        let mut cases: Vec<(String, &serde_json::Value)> = model["cases"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(variant, case)| match case["files"].is_object() {
                true => (format!("{fixture}-{variant}"), &case["scores"]),
                false => (fixture.clone(), case),
            })
            .collect();
        if fixture == "ce-reranker" {
            // Scored as model.toml says: the logits, as the saved reranker's own Identity.
            cases.push(("ce-relu-overridden".into(), &model["cases"]["saved"]));
        }
        for (name, expected) in cases {
            let version = common::first_version(&models, &name).await;
            assert_eq!(
                version.state,
                LoadState::Ready as i32,
                "{name}: {}",
                version.load_error
            );
            let classified = client
                .classify(ClassifyRequest {
                    model: name.clone(),
                    texts: Vec::clone(&texts),
                    text_pairs: Vec::clone(&text_pairs),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for (classification, expected) in classified
                .classifications
                .iter()
                .zip(expected.as_array().unwrap())
            {
                let mut got = vec![f32::NAN; classification.labels.len()];
                for label in &classification.labels {
                    got[label.index as usize] = label.score;
                }
                let expected = common::floats(expected);
                assert!(
                    max_abs_diff(&got, &expected) < 1e-4,
                    "{name}: {got:?} against sentence-transformers' {expected:?}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 5 * 13);

    let activation = |name: &'static str| {
        let models = models.clone();
        async move {
            let version = common::first_version(&models, name).await;
            let (value, source) = setting(&version, "classify.activation");
            (value.to_owned(), source.to_owned())
        }
    };
    for (name, value, source) in [
        (
            "ce-reranker",
            "identity",
            "config_sentence_transformers.json",
        ),
        ("ce-reranker-named_none", "sigmoid", "default"),
        ("ce-reranker-v4_tanh", "tanh", "config.json"),
        ("ce-nli-v3_softmax", "softmax", "config.json"),
        ("ce-nli-named_none", "identity", "default"),
        ("ce-reranker-outside_torch_then_v4", "tanh", "config.json"),
        ("ce-relu-overridden", "identity", "model.toml"),
    ] {
        assert_eq!(
            activation(name).await,
            (value.into(), source.into()),
            "{name}"
        );
    }
    let prompted = common::first_version(&models, "ce-reranker-default_prompt").await;
    assert_eq!(
        setting(&prompted, "classify.prompt"),
        ("what the queen wants ", "config_sentence_transformers.json")
    );
    let without_types = common::first_version(&models, "ce-reranker-without_type_ids").await;
    assert_eq!(
        setting(&without_types, "token_types"),
        ("1", "tokenizer_config.json")
    );

    let relu = common::first_version(&models, "ce-relu").await;
    assert_failed_naming(
        &relu,
        &[
            "config_sentence_transformers.json",
            "torch.nn.modules.activation.ReLU",
            "[classify] activation",
        ],
    );
}

/// What model.toml sets overrides Hugging Face files this server cannot follow: a
/// sentence-transformers Pooling module in a mode it does not pool by, and a malformed id2label.
/// Without the override the load fails naming the file and the mode.
#[tokio::test]
async fn model_toml_overrides_files_the_server_cannot_follow() {
    let repository = tempfile::tempdir().unwrap();
    for name in ["overridden", "not-overridden"] {
        copy_version("tiny-encoder", "1", repository.path(), name, "1");
        let folder = repository.path().join(name).join("1");
        std::fs::write(
            folder.join("modules.json"),
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]"#,
        )
        .unwrap();
        std::fs::create_dir(folder.join("1_Pooling")).unwrap();
        std::fs::write(
            folder.join("1_Pooling/config.json"),
            r#"{"word_embedding_dimension": 8, "pooling_mode_weightedmean_tokens": true}"#,
        )
        .unwrap();
        std::fs::write(folder.join("config.json"), r#"{"id2label": {"x": "a"}}"#).unwrap();
    }
    let manifest = repository.path().join("not-overridden/1/model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("pooling = \"mean\"\n", "")).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let models = server.models().await;
    let overridden = common::first_version(&models, "overridden").await;
    assert_eq!(
        overridden.state,
        LoadState::Ready as i32,
        "{}",
        overridden.load_error
    );
    assert_eq!(
        setting(&overridden, "embed.pooling"),
        ("mean", "model.toml")
    );
    let failed = common::first_version(&models, "not-overridden").await;
    assert_failed_naming(
        &failed,
        &[
            "1_Pooling/config.json",
            "weightedmean_tokens",
            "[embed] pooling",
        ],
    );
    let mut client = server.inference().await;
    client.embed(embed("overridden", "the king")).await.unwrap();
}

/// A sentence-transformers pipeline with a Dense projection after pooling (LaBSE's, say): a graph
/// that only returns per-token states cannot give its embeddings, so it fails to load naming
/// the module; a graph that returns the pipeline's own pooled output serves it, and a request
/// cannot pool the states instead.
#[tokio::test]
async fn a_dense_module_after_pooling_is_served_only_through_the_pooled_output() {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "states-only", "1");
    copy_dir(
        &fixtures().join("pooled-encoder"),
        &repository.path().join("pooled"),
    );
    for folder in [
        repository.path().join("states-only/1"),
        repository.path().join("pooled/1"),
    ] {
        std::fs::write(
            folder.join("modules.json"),
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir(folder.join("1_Pooling")).unwrap();
        std::fs::write(
            folder.join("1_Pooling/config.json"),
            r#"{"embedding_dimension": 8, "pooling_mode": "mean"}"#,
        )
        .unwrap();
    }
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let models = server.models().await;
    let states_only = common::first_version(&models, "states-only").await;
    assert_failed_naming(
        &states_only,
        &["modules.json", "2_Dense", "sentence_embedding"],
    );
    let pooled = common::first_version(&models, "pooled").await;
    assert_eq!(
        pooled.state,
        LoadState::Ready as i32,
        "{}",
        pooled.load_error
    );
    let mut client = server.inference().await;
    client.embed(embed("pooled", "the king")).await.unwrap();
    let mut pooling_asked = embed("pooled", "the king");
    pooling_asked.pooling = Pooling::Cls as i32;
    let status = client.embed(pooling_asked).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("2_Dense"), "{status:?}");
}

/// `lmserve_models_loaded{state="failed"}` now.
async fn failed_versions(metrics_port: u16) -> f64 {
    let metrics = common::scrape_metrics(metrics_port).await;
    let line = metrics
        .lines()
        .find(|line| line.starts_with(r#"lmserve_models_loaded{state="failed"}"#))
        .unwrap_or_else(|| panic!("no failed gauge in {metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_failing_run_fails_only_its_callers_and_repeated_failures_mark_the_version_failed() {
    let metrics_port = common::free_port();
    let (server, _repository) = fixture_server_with(
        vec![(
            "LMSERVE_RUNTIME__MAX_CONSECUTIVE_FAILURES".into(),
            "3".into(),
        )],
        vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
    )
    .await;
    let mut client = server.inference().await;
    // "unembeddable" has no row in the embedding table: ONNX Runtime's Gather fails the run.
    let fault = || embed("pooled-encoder", "long live unembeddable");
    let status = client.embed(fault()).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("onnxruntime"), "{status:?}");
    // The session went back to its pool: the next requests, one per session and more, succeed.
    for _ in 0..4 {
        client
            .embed(embed("pooled-encoder", "the king"))
            .await
            .unwrap();
    }
    let mut models = server.models().await;
    let state = |info: lmserve::api::proto::ModelInfo| info.versions[0].clone();
    let get = || GetModelRequest {
        name: "pooled-encoder".into(),
    };
    assert_eq!(
        state(models.get_model(get()).await.unwrap().into_inner()).state,
        LoadState::Ready as i32
    );

    let failed_before = failed_versions(metrics_port).await;

    // Three failed runs in a row break the version until it is reloaded.
    for _ in 0..3 {
        assert_eq!(
            client.embed(fault()).await.unwrap_err().code(),
            Code::Internal
        );
    }
    let broken = state(models.get_model(get()).await.unwrap().into_inner());
    assert_eq!(broken.state, LoadState::Failed as i32);
    assert!(
        broken.load_error.contains("3 runs failed in a row"),
        "{}",
        broken.load_error
    );
    let status = client
        .embed(embed("pooled-encoder", "the king"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("runs failed in a row"),
        "{status:?}"
    );
    // The load-state gauge follows within the health refresh (500 ms), as alerts need it to.
    let failed_after = failed_before + 1.0;
    let mut failed = failed_before;
    for _ in 0..30 {
        failed = failed_versions(metrics_port).await;
        if failed == failed_after {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(failed, failed_after);
    client
        .embed(embed("tiny-encoder", "the king"))
        .await
        .unwrap();

    models
        .load_model(LoadModelRequest {
            name: "pooled-encoder".into(),
            version: None,
        })
        .await
        .unwrap();
    client
        .embed(embed("pooled-encoder", "the king"))
        .await
        .unwrap();
}

#[test]
fn inspect_shows_the_graph_the_manifest_it_would_infer_and_the_settings() {
    let pooled = fixtures().join("pooled-encoder/1");
    let (ok, text) = run_to_exit(&["inspect", pooled.to_str().unwrap()], &[]);
    assert!(ok, "{text}");
    for needle in [
        "sentence_embedding  float32  [?, 8]",
        "max_length",
        "(config.json)",
        "result: loads and runs",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }

    // Without a manifest: the two lines a standard export needs, inferred from the graph.
    let bare = tempfile::tempdir().unwrap();
    copy_dir(&pooled, bare.path());
    std::fs::remove_file(bare.path().join("model.toml")).unwrap();
    let (ok, text) = run_to_exit(&["inspect", bare.path().to_str().unwrap()], &[]);
    assert!(ok, "{text}");
    assert!(text.contains("inferred from the graph"), "{text}");
    assert!(
        text.contains("family = \"encoder\"\n  tasks = [\"embed\", \"classify\"]"),
        "{text}"
    );

    let (ok, text) = run_to_exit(
        &[
            "inspect",
            fixtures().join("misbound-encoder/1").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("does not load") && text.contains("[embed].pooled_output"),
        "{text}"
    );
}

#[tokio::test]
async fn generation_config_supplies_a_decoders_stop_ids_and_defaults() {
    use lmserve::api::proto::generate_request::Prompt;
    use lmserve::api::proto::{FinishReason, GenerateRequest, GenerationParameters};

    // tiny-gpt2 with its stop id and sampling defaults moved out of the manifest into the
    // Hugging Face files, as an optimum export has them. The stop id is the third token of a
    // committed greedy reference, so where generation must stop is known.
    let reference = common::reference("tiny-gpt2");
    let case = &reference["generate"]["cases"][0];
    let greedy_ids: Vec<u32> = case["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect();
    let eos = greedy_ids[2];
    let stop_at = greedy_ids.iter().position(|&id| id == eos).unwrap();
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-gpt2", "1", repository.path(), "gpt2-hf", "1");
    let folder = repository.path().join("gpt2-hf/1");
    std::fs::write(
        folder.join("model.toml"),
        "family = \"decoder\"\ntasks = [\"generate\"]\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("config.json"),
        r#"{"n_positions": 256, "eos_token_id": 0}"#,
    )
    .unwrap();
    std::fs::write(
        folder.join("generation_config.json"),
        format!(r#"{{"eos_token_id": [{eos}], "pad_token_id": 0, "do_sample": true, "temperature": 0.7, "top_k": 5, "max_new_tokens": 9}}"#),
    )
    .unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;

    let mut models = server.models().await;
    let info = models
        .get_model(GetModelRequest {
            name: "gpt2-hf".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = &info.versions[0];
    assert_eq!(setting(version, "max_length"), ("256", "config.json"));
    assert_eq!(
        setting(version, "eos_token_ids"),
        (format!("[{eos}]").as_str(), "generation_config.json")
    );
    assert_eq!(
        setting(version, "generation.temperature"),
        ("0.7", "generation_config.json")
    );
    assert_eq!(
        setting(version, "generation.do_sample"),
        ("true", "generation_config.json")
    );

    let request = |parameters: GenerationParameters| GenerateRequest {
        model: "gpt2-hf".into(),
        prompt: Some(Prompt::Text("ROMEO.".into())),
        parameters: Some(parameters),
        ..Default::default()
    };
    let ids = |response: lmserve::api::proto::GenerateResponse| {
        let sequence = &response.sequences[0];
        (
            sequence.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
            sequence.finish_reason,
        )
    };
    let mut client = server.inference().await;
    // Unset parameters take the model's defaults: sampled (seeded) like the explicit request.
    let by_default = ids(client
        .generate(request(GenerationParameters {
            seed: Some(11),
            ignore_eos: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner());
    let explicit = ids(client
        .generate(request(GenerationParameters {
            seed: Some(11),
            ignore_eos: true,
            do_sample: Some(true),
            temperature: Some(0.7),
            top_k: Some(5),
            max_new_tokens: Some(9),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(by_default, explicit);
    assert_eq!(
        by_default.0.len(),
        9,
        "max_new_tokens from generation_config.json"
    );
    // A request's own values win: greedy here is the committed greedy reference.
    let greedy = ids(client
        .generate(GenerateRequest {
            prompt: Some(Prompt::Text(case["prompt"].as_str().unwrap().into())),
            ..request(GenerationParameters {
                do_sample: Some(false),
                max_new_tokens: Some(8),
                ignore_eos: true,
                ..Default::default()
            })
        })
        .await
        .unwrap()
        .into_inner());
    assert_eq!(greedy.0, greedy_ids[..8]);
    // The EOS of generation_config.json ends the sequence where the reference reaches it.
    let stopped = ids(client
        .generate(GenerateRequest {
            prompt: Some(Prompt::Text(case["prompt"].as_str().unwrap().into())),
            ..request(GenerationParameters {
                do_sample: Some(false),
                max_new_tokens: Some(8),
                ..Default::default()
            })
        })
        .await
        .unwrap()
        .into_inner());
    assert_eq!(stopped.0, greedy_ids[..=stop_at]);
    assert_eq!(stopped.1, FinishReason::Eos as i32);
}

#[tokio::test]
async fn a_decoder_gets_a_bos_exactly_when_its_tokenizer_adds_one() {
    use lmserve::api::proto::generate_request::Prompt;
    use lmserve::api::proto::{GenerateRequest, GenerationParameters, TokenIds};

    // tiny-llama as a Llama export has it: a post-processor that puts BOS (id 0) first.
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-llama", "1", repository.path(), "llama-bos", "1");
    copy_version("tiny-gpt2", "1", repository.path(), "tiny-gpt2", "1");
    let path = repository.path().join("llama-bos/1/tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let bos = tokenizer["added_tokens"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    tokenizer["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos.clone(): {"id": bos, "ids": [0], "tokens": [bos]}}
    });
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    let prompt = "ROMEO. What light";
    let plain = client
        .tokenize(TokenizeRequest {
            model: "llama-bos".into(),
            text: prompt.into(),
            add_special_tokens: Some(false),
            messages: None,
            text_pair: None,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u32> = plain.tokens.iter().map(|t| t.id).collect();
    let default = client
        .tokenize(TokenizeRequest {
            model: "llama-bos".into(),
            text: prompt.into(),
            add_special_tokens: None,
            messages: None,
            text_pair: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.tokens[0].id, 0);
    assert_eq!(default.tokens.len(), ids.len() + 1);

    let parameters = || {
        Some(GenerationParameters {
            max_new_tokens: Some(6),
            ignore_eos: true,
            ..Default::default()
        })
    };
    let generate = |model: &str, prompt: Prompt| GenerateRequest {
        model: model.into(),
        prompt: Some(prompt),
        parameters: parameters(),
        ..Default::default()
    };
    let by_text = client
        .generate(generate("llama-bos", Prompt::Text(prompt.into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        by_text.prompt_tokens as usize,
        ids.len() + 1,
        "BOS added to the text"
    );
    let with_bos: Vec<u32> = std::iter::once(0).chain(ids.iter().copied()).collect();
    let by_ids = client
        .generate(generate(
            "llama-bos",
            Prompt::TokenIds(TokenIds { ids: with_bos }),
        ))
        .await
        .unwrap()
        .into_inner();
    let tokens = |r: &lmserve::api::proto::GenerateResponse| {
        r.sequences[0]
            .tokens
            .iter()
            .map(|t| t.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(tokens(&by_text), tokens(&by_ids));

    // GPT-2's tokenizer adds nothing: the prompt is its own tokens.
    let gpt2 = client
        .generate(generate("tiny-gpt2", Prompt::Text(prompt.into())))
        .await
        .unwrap()
        .into_inner();
    let gpt2_ids = client
        .tokenize(TokenizeRequest {
            model: "tiny-gpt2".into(),
            text: prompt.into(),
            add_special_tokens: None,
            messages: None,
            text_pair: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gpt2.prompt_tokens as usize, gpt2_ids.tokens.len());
    assert_ne!(gpt2_ids.tokens[0].id, 0);
}

/// roberta-positions (tests/fixtures/roberta_positions.py): a transformers RobertaModel exported
/// with `position_ids` as an input, and the embeddings RobertaModel gives when it numbers the
/// positions itself.
#[tokio::test]
async fn a_roberta_graph_that_takes_positions_gets_them_as_roberta_numbers_them() {
    let repository = tempfile::tempdir().unwrap();
    copy_dir(
        &fixtures().join("roberta-positions"),
        &repository.path().join("roberta-positions"),
    );
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let text =
        std::fs::read_to_string(common::root().join("tests/fixtures/roberta_positions.json"))
            .unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    // All in one request, so the shorter texts run padded beside the longest.
    let response = server
        .inference()
        .await
        .embed(EmbedRequest {
            model: "roberta-positions".into(),
            texts: cases
                .iter()
                .map(|case| case["text"].as_str().unwrap().to_owned())
                .collect(),
            pooling: Pooling::Mean as i32,
            normalize: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (case, embedding) in cases.iter().zip(&response.embeddings) {
        let text = case["text"].as_str().unwrap();
        let by_transformers = common::floats(&case["mean"]);
        let diff = max_abs_diff(&embedding.values, &by_transformers);
        assert!(diff < 1e-4, "{text}: {diff} from RobertaModel's own");
        // Numbered from 0, the same graph gives other vectors: the numbering is what is tested.
        let from_zero = common::floats(&case["mean_from_zero"]);
        assert!(max_abs_diff(&by_transformers, &from_zero) > 0.1, "{text}");
        assert_eq!(
            embedding.token_count as usize,
            case["ids"].as_array().unwrap().len()
        );
    }
}
