//! Embed and Classify against the committed reference outputs, and batching that never
//! changes a result.

mod common;

use common::{ServerOptions, TestServer, copy_version, floats, max_abs_diff, reference, setting};
use futures::future::join_all;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{self, ClassifyRequest, EmbedRequest, Pooling, ScoreKind, Truncate};
use tonic::transport::Channel;

const TOLERANCE: f32 = 1e-4;

fn embed_request(model: &str, texts: &[&str]) -> EmbedRequest {
    EmbedRequest {
        model: model.into(),
        texts: texts.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

async fn check_embeddings_match_reference(server: &TestServer, model: &str) {
    let reference = reference(model);
    let cases = reference["embed"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 4, "{model}: too few reference cases");
    let texts: Vec<&str> = cases
        .iter()
        .map(|case| case["text"].as_str().unwrap())
        .collect();
    let mut client = server.inference().await;

    // All texts in one request, and each text alone: both must match the reference.
    let together = client
        .embed(embed_request(model, &texts))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(together.embeddings.len(), cases.len());
    let served_by = together.served_by.unwrap();
    assert_eq!(
        (served_by.model.as_str(), served_by.version.as_str()),
        (model, "1")
    );
    for (case, embedding) in cases.iter().zip(&together.embeddings) {
        let expected = floats(&case["embedding"]);
        let diff = max_abs_diff(&embedding.values, &expected);
        assert!(
            diff <= TOLERANCE,
            "{model} {:?}: max abs diff {diff}",
            case["text"]
        );
        let ids = case["ids"].as_array().unwrap();
        assert_eq!(embedding.token_count as usize, ids.len());
        let norm: f32 = embedding.values.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "normalised by default, norm {norm}"
        );
    }
    for (case, text) in cases.iter().zip(&texts) {
        let alone = client
            .embed(embed_request(model, &[text]))
            .await
            .unwrap()
            .into_inner();
        let diff = max_abs_diff(&alone.embeddings[0].values, &floats(&case["embedding"]));
        assert!(
            diff <= TOLERANCE,
            "{model} {text:?} alone: max abs diff {diff}"
        );
    }
}

#[tokio::test]
async fn embeddings_match_the_reference_files() {
    let server = TestServer::start().await;
    check_embeddings_match_reference(&server, "tiny-encoder").await;
    check_embeddings_match_reference(&server, "tiny-word2vec").await;
}

#[tokio::test]
async fn class_probabilities_match_the_reference_file() {
    let server = TestServer::start().await;
    let reference = reference("tiny-encoder");
    let labels: Vec<&str> = reference["classify"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let cases = reference["classify"]["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let mut client = server.inference().await;
    let response = client
        .classify(ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: cases
                .iter()
                .map(|c| c["text"].as_str().unwrap().to_owned())
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (case, classification) in cases.iter().zip(&response.classifications) {
        let expected = floats(&case["probabilities"]);
        assert_eq!(classification.labels.len(), labels.len());
        for label in &classification.labels {
            assert_eq!(label.label, labels[label.index as usize]);
            let diff = (label.score - expected[label.index as usize]).abs();
            assert!(
                diff <= TOLERANCE,
                "{:?} {}: {} vs {}",
                case["text"],
                label.label,
                label.score,
                expected[label.index as usize]
            );
        }
        let scores: Vec<f32> = classification.labels.iter().map(|l| l.score).collect();
        assert!(
            scores.windows(2).all(|w| w[0] >= w[1]),
            "labels ordered best first: {scores:?}"
        );
    }

    // top_k keeps the best label only; raw scores are logits whose softmax is the probability.
    let text = cases[0]["text"].as_str().unwrap().to_owned();
    let top = client
        .classify(ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: vec![text.clone()],
            top_k: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(top.classifications[0].labels.len(), 1);
    assert_eq!(
        top.classifications[0].labels[0].label,
        response.classifications[0].labels[0].label
    );
    let raw = client
        .classify(ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: vec![text],
            scores: ScoreKind::Raw as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut logits = vec![0.0; labels.len()];
    for label in &raw.classifications[0].labels {
        logits[label.index as usize] = label.score;
    }
    let probabilities = lmserve::tasks::classify::softmax(&logits);
    let expected = floats(&cases[0]["probabilities"]);
    assert!(max_abs_diff(&probabilities, &expected) <= TOLERANCE);
}

fn pair_request(model: &str, pairs: &[&serde_json::Value]) -> ClassifyRequest {
    let field = |case: &serde_json::Value, name: &str| case[name].as_str().unwrap().to_owned();
    ClassifyRequest {
        model: model.into(),
        texts: pairs.iter().map(|case| field(case, "text")).collect(),
        text_pairs: pairs.iter().map(|case| field(case, "text_pair")).collect(),
        ..Default::default()
    }
}

/// Each label's score against the probabilities a reference case lists in label order.
fn assert_scores(case: &serde_json::Value, classification: &proto::Classification) {
    let expected = floats(&case["probabilities"]);
    assert_eq!(classification.labels.len(), expected.len());
    let mut scores = vec![0.0; expected.len()];
    for label in &classification.labels {
        scores[label.index as usize] = label.score;
    }
    assert!(
        max_abs_diff(&scores, &expected) <= TOLERANCE,
        "{:?} + {:?}: {scores:?} vs {expected:?}",
        case["text"],
        case["text_pair"]
    );
}

/// A cross-encoder scores each text with its pair as transformers' text-classification
/// pipeline does for {"text", "text_pair"} (reference.json holds that pipeline's output, from
/// the PyTorch weights): one input through BERT's pair template, the pair's tokens of type 1.
/// Over the model's length, the longer of the two is cut first, from either side.
#[tokio::test]
async fn text_pairs_score_as_the_transformers_pipeline_does() {
    let reference = reference("tiny-reranker");
    let labels: Vec<&str> = reference["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let cases: Vec<&serde_json::Value> = reference["cases"].as_array().unwrap().iter().collect();
    assert!(cases.len() >= 6);
    // The truncated cases are cut to a shorter limit than the model's own.
    let truncated = &reference["truncated"];
    let cut_to = truncated[0]["max_length"].as_u64().unwrap();
    let repository = tempfile::tempdir().unwrap();
    copy_version(
        "tiny-reranker",
        "1",
        repository.path(),
        "tiny-reranker",
        "1",
    );
    copy_version(
        "tiny-reranker",
        "1",
        repository.path(),
        "tiny-reranker-short",
        "1",
    );
    let short = repository.path().join("tiny-reranker-short").join("1");
    let manifest = short.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, format!("max_length = {cut_to}\n{text}")).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;

    let response = client
        .classify(pair_request("tiny-reranker", &cases))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.classifications.len(), cases.len());
    for (case, classification) in cases.iter().zip(&response.classifications) {
        assert_scores(case, classification);
        assert_eq!(
            u64::from(classification.token_count),
            case["token_count"].as_u64().unwrap()
        );
        assert!(!classification.truncated);
        for label in &classification.labels {
            assert_eq!(label.label, labels[label.index as usize]);
        }
    }
    // Alone, each pair scores as in the batch; and the pair matters, not only the text.
    let alone = client
        .classify(pair_request("tiny-reranker", &cases[1..2]))
        .await
        .unwrap()
        .into_inner();
    assert_scores(cases[1], &alone.classifications[0]);
    let unpaired = client
        .classify(ClassifyRequest {
            model: "tiny-reranker".into(),
            texts: vec![cases[0]["text"].as_str().unwrap().into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (unpaired.classifications[0].labels[0].score - response.classifications[0].labels[0].score)
            .abs()
            > 0.01
    );
    // An empty pair leaves its text unpaired, as the pipeline takes an empty text_pair.
    let empty = client
        .classify(ClassifyRequest {
            model: "tiny-reranker".into(),
            texts: vec![cases[0]["text"].as_str().unwrap().into()],
            text_pairs: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty.classifications, unpaired.classifications);
    // Tokenize shows the pair as Classify feeds it: as many tokens, the pair's of type 1 (and
    // the separator that ends it), the text's and the first separator of type 0.
    let tokens = client
        .tokenize(proto::TokenizeRequest {
            model: "tiny-reranker".into(),
            text: cases[0]["text"].as_str().unwrap().into(),
            text_pair: Some(cases[0]["text_pair"].as_str().unwrap().into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(
        tokens.len() as u64,
        cases[0]["token_count"].as_u64().unwrap(),
        "{tokens:?}"
    );
    let first_pair = tokens.iter().position(|token| token.in_pair).unwrap();
    assert_eq!(tokens[first_pair - 1].text, "[SEP]");
    for (at, token) in tokens.iter().enumerate() {
        assert_eq!(token.type_id, u32::from(at >= first_pair), "{tokens:?}");
        assert_eq!(token.in_pair, at >= first_pair && at + 1 < tokens.len());
    }
    let pair = cases[0]["text_pair"].as_str().unwrap();
    let first = &tokens[first_pair];
    assert_eq!(
        pair.chars()
            .skip(first.start as usize)
            .take((first.end - first.start) as usize)
            .collect::<String>()
            .to_lowercase(),
        first.text
    );

    // An empty pair is no pair, as Classify takes it.
    let tokenize = |text_pair: Option<String>| proto::TokenizeRequest {
        model: "tiny-reranker".into(),
        text: cases[0]["text"].as_str().unwrap().into(),
        text_pair,
        ..Default::default()
    };
    let unpaired_tokens = client.tokenize(tokenize(None)).await.unwrap().into_inner();
    let empty_pair_tokens = client
        .tokenize(tokenize(Some(String::new())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(empty_pair_tokens.tokens, unpaired_tokens.tokens);
    assert_eq!(
        unpaired_tokens.tokens.len() as u32,
        unpaired.classifications[0].token_count
    );

    // GetModel shows how many token types the model has, and where that came from.
    let model = server
        .models()
        .await
        .get_model(proto::GetModelRequest {
            name: "tiny-reranker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        setting(&model.versions[0], "token_types"),
        ("2", "config.json")
    );

    for case in truncated.as_array().unwrap() {
        let truncate = match case["side"].as_str().unwrap() {
            "right" => Truncate::Right,
            _ => Truncate::Left,
        };
        let response = client
            .classify(ClassifyRequest {
                truncate: truncate as i32,
                ..pair_request("tiny-reranker-short", &[case])
            })
            .await
            .unwrap()
            .into_inner();
        let classification = &response.classifications[0];
        assert_scores(case, classification);
        assert!(classification.truncated);
        assert_eq!(
            u64::from(classification.token_count),
            case["input_ids"].as_array().unwrap().len() as u64
        );
    }
    // Not asked to cut, the pair is refused with both lengths named.
    let error = client
        .classify(pair_request("tiny-reranker-short", &[&truncated[0]]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("texts[0] with text_pairs[0]")
            && error.message().contains(&format!("maximum of {cut_to}")),
        "{}",
        error.message()
    );
}

/// Each text's embedding, one request after another.
async fn embed_one_by_one(
    client: &mut InferenceClient<Channel>,
    model: &str,
    texts: &[String],
) -> Vec<Vec<f32>> {
    let mut embeddings = Vec::new();
    for text in texts {
        let response = client
            .embed(embed_request(model, &[text]))
            .await
            .unwrap()
            .into_inner();
        embeddings.push(response.embeddings[0].values.clone());
    }
    embeddings
}

/// Each text's embedding, from one request per text, all sent at once.
async fn embed_all_at_once(
    client: &InferenceClient<Channel>,
    model: &str,
    texts: &[String],
) -> Vec<Vec<f32>> {
    join_all(texts.iter().map(|text| {
        let mut client = client.clone();
        let request = embed_request(model, &[text]);
        async move {
            client
                .embed(request)
                .await
                .unwrap()
                .into_inner()
                .embeddings
                .remove(0)
                .values
        }
    }))
    .await
}

/// Texts of many lengths sent at once by concurrent callers come back exactly as they do alone.
#[tokio::test]
async fn batched_results_equal_unbatched_results() {
    let server = TestServer::start().await;
    let words = "the quick brown fox jumps over the lazy dog while the king of denmark sleeps";
    let texts: Vec<String> = (1..=24)
        .map(|n| {
            words
                .split(' ')
                .cycle()
                .take(n)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();

    for model in ["tiny-encoder", "tiny-word2vec"] {
        let mut client = server.inference().await;
        let alone = embed_one_by_one(&mut client, model, &texts).await;
        let concurrent = embed_all_at_once(&client, model, &texts).await;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let one_request = client
            .embed(embed_request(model, &refs))
            .await
            .unwrap()
            .into_inner();
        for (i, expected) in alone.iter().enumerate() {
            assert!(
                max_abs_diff(&concurrent[i], expected) <= 1e-5,
                "{model} text {i}: concurrent differs"
            );
            assert!(
                max_abs_diff(&one_request.embeddings[i].values, expected) <= 1e-5,
                "{model} text {i}: one request differs"
            );
        }
    }

    let mut client = server.inference().await;
    let classify = |texts: Vec<String>| ClassifyRequest {
        model: "tiny-encoder".into(),
        texts,
        ..Default::default()
    };
    let alone: Vec<_> = {
        let mut out = Vec::new();
        for text in &texts {
            out.push(
                client
                    .classify(classify(vec![text.clone()]))
                    .await
                    .unwrap()
                    .into_inner()
                    .classifications
                    .remove(0),
            );
        }
        out
    };
    let concurrent = join_all(texts.iter().map(|text| {
        let mut client = client.clone();
        let request = classify(vec![text.clone()]);
        async move {
            client
                .classify(request)
                .await
                .unwrap()
                .into_inner()
                .classifications
                .remove(0)
        }
    }))
    .await;
    for (a, b) in alone.iter().zip(&concurrent) {
        for (x, y) in a.labels.iter().zip(&b.labels) {
            assert_eq!(x.label, y.label);
            assert!((x.score - y.score).abs() <= 1e-5);
        }
    }
}

/// The count of encoder runs of tiny-encoder on `lane` in a metrics page.
fn lane_runs(metrics: &str, lane: &str) -> u64 {
    let series =
        format!(r#"lmserve_batch_lane_total{{model="tiny-encoder",version="1",lane="{lane}"}} "#);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// A request alone runs on the wide lane (every core); requests that queue behind each other run
/// on the narrow one-thread sessions, which hold the same weights and give the same results.
/// With `split_under_load` off, everything runs wide.
#[tokio::test]
async fn lone_requests_run_wide_and_queued_ones_narrow_with_equal_results() {
    let words = "the quick brown fox jumps over the lazy dog while the king of denmark sleeps";
    let texts: Vec<String> = (0..48)
        .map(|n| {
            words
                .split(' ')
                .cycle()
                .skip(n % 7)
                .take(3 + n % 20)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for split in [true, false] {
        let metrics_port = common::free_port();
        let server = TestServer::start_with(ServerOptions {
            args: vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
            env: vec![
                ("LMSERVE_RUNTIME__SHARED_THREADS".into(), "2".into()),
                (
                    "LMSERVE_RUNTIME__SPLIT_UNDER_LOAD".into(),
                    split.to_string(),
                ),
            ],
            ..Default::default()
        })
        .await;
        let mut client = server.inference().await;
        let alone = embed_one_by_one(&mut client, "tiny-encoder", &texts).await;
        let after_alone = common::scrape_metrics(metrics_port).await;
        // Warm-up runs no batch through the batcher: every run so far was a lone request.
        assert_eq!(lane_runs(&after_alone, "wide"), texts.len() as u64);
        assert_eq!(lane_runs(&after_alone, "narrow"), 0);

        let concurrent = embed_all_at_once(&client, "tiny-encoder", &texts).await;
        for (i, expected) in alone.iter().enumerate() {
            assert!(
                max_abs_diff(&concurrent[i], expected) <= 1e-5,
                "split {split}, text {i}: a queued request's embedding differs from its lone one"
            );
        }
        let metrics = common::scrape_metrics(metrics_port).await;
        let narrow = lane_runs(&metrics, "narrow");
        if split {
            assert!(
                narrow > 0,
                "48 requests at once never ran narrow:\n{metrics}"
            );
        } else {
            assert_eq!(narrow, 0, "split_under_load = false ran narrow");
        }
    }
}

#[tokio::test]
async fn embed_options_pooling_normalize_and_truncation() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let text = "Shall I compare thee to a summer's day?";
    let request = |pooling: Pooling, normalize: Option<bool>| EmbedRequest {
        model: "tiny-encoder".into(),
        texts: vec![text.into()],
        pooling: pooling as i32,
        normalize,
        ..Default::default()
    };
    let mean = client
        .embed(request(Pooling::Mean, Some(false)))
        .await
        .unwrap()
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    let cls = client
        .embed(request(Pooling::Cls, Some(false)))
        .await
        .unwrap()
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    let last = client
        .embed(request(Pooling::LastToken, Some(false)))
        .await
        .unwrap()
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    assert_ne!(mean, cls);
    assert_ne!(cls, last);
    let norm: f32 = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "normalize=false leaves the raw mean, norm {norm}"
    );
    let normalized = client
        .embed(request(Pooling::Mean, Some(true)))
        .await
        .unwrap()
        .into_inner()
        .embeddings
        .remove(0)
        .values;
    let expected: Vec<f32> = mean.iter().map(|v| v / norm).collect();
    assert!(max_abs_diff(&normalized, &expected) < 1e-5);

    // A text over the model's maximum: truncated from the side asked for.
    let long = "word ".repeat(2000);
    for (truncate, label) in [
        (proto::Truncate::Right, "right"),
        (proto::Truncate::Left, "left"),
    ] {
        let response = client
            .embed(EmbedRequest {
                model: "tiny-encoder".into(),
                texts: vec![long.clone()],
                truncate: truncate as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.embeddings[0].truncated, "{label}");
        let limit = server_max_length(&server, "tiny-encoder").await;
        assert_eq!(response.embeddings[0].token_count, limit, "{label}");
    }
}

/// `dimensions` keeps the leading values of each vector, as sentence-transformers'
/// `encode(truncate_dim=...)` slices its output: after the model's own normalization, so the
/// cut vector is the full one's first values; with `normalize: true` it is normalized again,
/// as `normalize_embeddings=True` does after the cut. A model's `truncate_dim`
/// (config_sentence_transformers.json) is the default, which a request may widen again; one past
/// the vector's width keeps it whole, as sentence-transformers' slice does.
#[tokio::test]
async fn dimensions_keep_the_leading_values_as_sentence_transformers_truncate_dim_does() {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "tiny-encoder", "1");
    // One cut to 16 values, and one whose truncate_dim is past its width.
    for (name, truncate_dim) in [("matryoshka", 16), ("wider", 4096)] {
        copy_version("tiny-encoder", "1", repository.path(), name, "1");
        let folder = repository.path().join(name).join("1");
        std::fs::write(
            folder.join("modules.json"),
            r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir(folder.join("1_Pooling")).unwrap();
        std::fs::write(
            folder.join("1_Pooling/config.json"),
            r#"{"pooling_mode_mean_tokens": true}"#,
        )
        .unwrap();
        std::fs::write(
            folder.join("config_sentence_transformers.json"),
            format!(r#"{{"model_type": "SentenceTransformer", "prompts": {{}}, "truncate_dim": {truncate_dim}}}"#),
        )
        .unwrap();
    }
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    let text = "Shall I compare thee to a summer's day?";
    let mut embed = async |model: &str, dimensions: Option<u32>, normalize: Option<bool>| {
        client
            .embed(EmbedRequest {
                model: model.into(),
                texts: vec![text.into()],
                dimensions,
                normalize,
                ..Default::default()
            })
            .await
            .map(|response| response.into_inner().embeddings.remove(0).values)
    };
    let full = embed("tiny-encoder", None, None).await.unwrap();
    let width = full.len();
    assert!(width > 16, "{width}");
    let norm = |values: &[f32]| values.iter().map(|v| v * v).sum::<f32>().sqrt();

    // Equal up to the last bits a run on another session may change.
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && max_abs_diff(a, b) < 1e-6;
    let cut = embed("tiny-encoder", Some(16), None).await.unwrap();
    assert!(same(&cut, &full[..16]), "{cut:?}");
    assert!(norm(&cut) < 0.999, "{}", norm(&cut));
    let renormalized = embed("tiny-encoder", Some(16), Some(true)).await.unwrap();
    let expected: Vec<f32> = full[..16].iter().map(|v| v / norm(&full[..16])).collect();
    assert!(max_abs_diff(&renormalized, &expected) < 1e-5);
    assert_eq!(
        embed("tiny-encoder", Some(width as u32), None)
            .await
            .unwrap(),
        full
    );

    // The model's own truncate_dim, and a request that asks for every value.
    let default = embed("matryoshka", None, None).await.unwrap();
    assert!(same(&default, &full[..16]), "{default:?}");
    let widened = embed("matryoshka", Some(width as u32), None).await.unwrap();
    assert!(same(&widened, &full));
    // As sentence-transformers' slice: a truncate_dim past the width keeps every value.
    let whole = embed("wider", None, None).await.unwrap();
    assert!(same(&whole, &full));
    let models = server.models().await;
    let described = common::first_version(&models, "matryoshka").await;
    assert_eq!(
        setting(&described, "embed.truncate_dim"),
        ("16", "config_sentence_transformers.json")
    );

    let over = width as u32 + 1;
    for (dimensions, needles) in [
        (0, vec!["dimensions", "at least 1", "got 0"]),
        (
            over,
            vec!["dimensions", &*over.to_string(), &*width.to_string()],
        ),
    ] {
        let refused = embed("tiny-encoder", Some(dimensions), None)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        for needle in needles {
            assert!(
                refused.message().contains(needle),
                "{needle:?}: {refused:?}"
            );
        }
    }
}

async fn server_max_length(server: &TestServer, model: &str) -> u32 {
    let mut models = server.models().await;
    let info = models
        .get_model(proto::GetModelRequest { name: model.into() })
        .await
        .unwrap()
        .into_inner();
    info.versions[0].max_length
}

#[tokio::test]
async fn streams_answer_every_request_in_order() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let texts: Vec<String> = (0..20)
        .map(|i| format!("message number {i} {}", "long ".repeat(i % 7)))
        .collect();
    let requests: Vec<EmbedRequest> = texts
        .iter()
        .map(|t| embed_request("tiny-word2vec", &[t]))
        .collect();
    let mut expected = Vec::new();
    for request in &requests {
        expected.push(client.embed(request.clone()).await.unwrap().into_inner());
    }
    let stream = client
        .embed_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let responses: Vec<_> = futures::StreamExt::collect::<Vec<_>>(stream).await;
    assert_eq!(responses.len(), expected.len());
    for (got, want) in responses.into_iter().zip(expected) {
        let got = got.unwrap();
        assert!(max_abs_diff(&got.embeddings[0].values, &want.embeddings[0].values) <= 1e-5);
    }

    let classify: Vec<ClassifyRequest> = texts
        .iter()
        .map(|t| ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: vec![t.clone()],
            ..Default::default()
        })
        .collect();
    let stream = client
        .classify_stream(futures::stream::iter(classify))
        .await
        .unwrap()
        .into_inner();
    let responses: Vec<_> = futures::StreamExt::collect::<Vec<_>>(stream).await;
    assert_eq!(responses.len(), texts.len());
    assert!(
        responses
            .iter()
            .all(|r| r.as_ref().unwrap().classifications.len() == 1)
    );
}
