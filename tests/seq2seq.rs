//! Encoder-decoder models from optimum's export, against what transformers generates for the
//! same weights: an untrained MarianMT (tests/fixtures/seq2seq, built by bench/seq2seq/build.py)
//! in the split layout (encoder, decoder, decoder with past) and the merged one. The references
//! came from transformers' `generate` on the PyTorch model and were checked equal to optimum's
//! ORTModelForSeq2SeqLM and to a plain onnxruntime loop over the same files.

mod common;

use common::{ServerOptions, TestServer, root};
use futures::StreamExt;
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{
    EarlyStopping, GenerateRequest, GenerateResponse, GenerationParameters, TokenizeRequest,
};
use serde_json::Value;
use tonic::Code;

const MODELS: [&str; 2] = ["marian-tiny-untrained", "marian-tiny-untrained-merged"];

fn fixtures() -> std::path::PathBuf {
    root().join("tests/fixtures/seq2seq")
}

fn reference() -> Value {
    let path = fixtures().join("marian-tiny-untrained/1/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cases() -> Vec<Value> {
    reference()["cases"].as_array().unwrap().clone()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

async fn serve() -> TestServer {
    TestServer::start_with(ServerOptions {
        repository: fixtures(),
        ..Default::default()
    })
    .await
}

fn request(model: &str, source: &str, num_beams: u32) -> GenerateRequest {
    let max_new_tokens = reference()["max_new_tokens"].as_u64().unwrap() as u32;
    GenerateRequest {
        model: model.into(),
        prompt: Some(Prompt::Text(source.into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            num_beams,
            // The references were made with transformers' early_stopping=True.
            early_stopping: EarlyStopping::FirstBeams as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn generated(response: &GenerateResponse) -> Vec<u32> {
    response.sequences[0]
        .tokens
        .iter()
        .map(|token| token.id)
        .collect()
}

/// transformers' beam score: the summed log-probabilities over the generated length.
fn score(response: &GenerateResponse) -> f32 {
    let tokens = &response.sequences[0].tokens;
    tokens.iter().map(|token| token.logprob).sum::<f32>() / tokens.len() as f32
}

#[tokio::test]
async fn sources_are_read_as_transformers_tokenizes_them() {
    let server = serve().await;
    let mut client = server.inference().await;
    for case in cases() {
        let tokens = client
            .tokenize(TokenizeRequest {
                model: MODELS[0].into(),
                text: case["source"].as_str().unwrap().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<u32> = tokens.tokens.iter().map(|token| token.id).collect();
        assert_eq!(
            got,
            ids(&case["source_ids"]),
            "ends with </s> as Marian's do"
        );
    }
}

#[tokio::test]
async fn greedy_and_beam_search_give_transformers_tokens_in_both_layouts() {
    let server = serve().await;
    let mut client = server.inference().await;
    for model in MODELS {
        for case in cases() {
            let source = case["source"].as_str().unwrap();
            let greedy = client
                .generate(request(model, source, 1))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                generated(&greedy),
                ids(&case["greedy"]["ids"]),
                "{model}: {source}"
            );
            assert_eq!(
                greedy.prompt_tokens as usize,
                ids(&case["source_ids"]).len()
            );
            let beam = client
                .generate(request(model, source, 4))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                generated(&beam),
                ids(&case["beam"]["ids"]),
                "{model}: {source}"
            );
            let expected = case["beam"]["score"].as_f64().unwrap() as f32;
            assert!(
                (score(&beam) - expected).abs() < 1e-4,
                "{model}: score {} against transformers' {expected}",
                score(&beam)
            );
        }
    }
}

#[tokio::test]
async fn concurrent_sources_batch_together_without_changing_a_token() {
    // Sources of different lengths share the encoder's run and the decoder's steps; rows at
    // different positions (optimum's graphs take no decoder mask) run apart.
    let server = serve().await;
    let client = server.inference().await;
    let mut calls = Vec::new();
    for round in 0..2 {
        for model in MODELS {
            for case in cases() {
                let beams = if round == 0 { 1 } else { 4 };
                let want = if beams == 1 {
                    ids(&case["greedy"]["ids"])
                } else {
                    ids(&case["beam"]["ids"])
                };
                let source = case["source"].as_str().unwrap().to_owned();
                let mut client = client.clone();
                calls.push(async move {
                    let response = client
                        .generate(request(model, &source, beams))
                        .await
                        .unwrap()
                        .into_inner();
                    (model, beams, source, generated(&response), want)
                });
            }
        }
    }
    for (model, beams, source, got, want) in join_all(calls).await {
        assert_eq!(got, want, "{model} with {beams} beams: {source}");
    }
}

#[tokio::test]
async fn a_stream_carries_the_unary_text_and_tokens() {
    let server = serve().await;
    let mut client = server.inference().await;
    let case = &cases()[0];
    let source = case["source"].as_str().unwrap();
    for beams in [1, 3] {
        let unary = client
            .generate(request(MODELS[0], source, beams))
            .await
            .unwrap()
            .into_inner();
        let mut stream = client
            .generate_stream(request(MODELS[0], source, beams))
            .await
            .unwrap()
            .into_inner();
        let (mut text, mut tokens) = (String::new(), Vec::new());
        while let Some(message) = stream.next().await {
            let message = message.unwrap();
            text.push_str(&message.text);
            tokens.extend(message.token.map(|token| token.id));
        }
        assert_eq!(text, unary.sequences[0].text, "{beams} beams");
        assert_eq!(tokens, generated(&unary), "{beams} beams");
    }
}

/// One way to spoil a request's parameters.
type Change = fn(&mut GenerationParameters);

#[tokio::test]
async fn beam_search_returns_the_n_best_and_refuses_what_it_cannot_honour() {
    let server = serve().await;
    let mut client = server.inference().await;
    let source = cases()[1]["source"].as_str().unwrap().to_owned();
    let mut two = request(MODELS[0], &source, 4);
    two.parameters.as_mut().unwrap().n = 2;
    let response = client.generate(two).await.unwrap().into_inner();
    assert_eq!(response.sequences.len(), 2);
    assert_eq!(generated(&response), ids(&cases()[1]["beam"]["ids"]));
    assert_ne!(response.sequences[0].tokens, response.sequences[1].tokens);

    let refusals: [(&str, Change); 5] = [
        ("parameters.do_sample", |p| p.do_sample = Some(true)),
        ("parameters.n", |p| p.n = 5),
        ("parameters.early_stopping", |p| p.early_stopping = 9),
        ("parameters.top_logprobs", |p| p.top_logprobs = 2),
        ("parameters.num_beams", |p| p.num_beams = 1000),
    ];
    for (field, change) in refusals {
        let mut bad = request(MODELS[0], &source, 4);
        change(bad.parameters.as_mut().unwrap());
        let status = client.generate(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
}

#[test]
fn inspect_shows_every_graph_and_what_an_export_without_a_manifest_needs() {
    let folder = tempfile::tempdir().unwrap();
    let export = folder.path().join("1");
    common::copy_dir(&fixtures().join("marian-tiny-untrained/1"), &export);
    std::fs::remove_file(export.join("model.toml")).unwrap();
    let (loads, text) = common::run_to_exit(&["inspect", export.to_str().unwrap()], &[]);
    assert!(loads, "{text}");
    for expected in [
        "family = \"encoder-decoder\"",
        "first decoder step (decoder_model.onnx) inputs",
        "later decoder steps (decoder_with_past_model.onnx) inputs",
        "past_key_values.0.encoder.key",
        "decoder_start_token_id",
        "result: loads and runs",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }

    // Without the later-step graph, the folder says which files it lacks.
    std::fs::remove_file(export.join("decoder_with_past_model.onnx")).unwrap();
    let (loads, text) = common::run_to_exit(&["inspect", export.to_str().unwrap()], &[]);
    assert!(!loads, "{text}");
    assert!(text.contains("decoder_with_past_model.onnx"), "{text}");
}

/// tiny-translator, trained here (models/pipeline/translation.py): its references were made by
/// nn.Transformer itself (greedy, full recompute) and by a beam search that transformers'
/// generate reproduces over the same graphs.
fn translator_reference() -> Value {
    let path = root().join("models/repository/tiny-translator/1/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn translate(source: &str, num_beams: u32) -> GenerateRequest {
    let reference = translator_reference();
    let settings = &reference["beam_settings"];
    GenerateRequest {
        model: "tiny-translator".into(),
        prompt: Some(Prompt::Text(source.into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(reference["max_new_tokens"].as_u64().unwrap() as u32),
            num_beams,
            length_penalty: settings["length_penalty"].as_f64().map(|p| p as f32),
            early_stopping: if settings["early_stopping"].as_bool().unwrap() {
                EarlyStopping::FirstBeams as i32
            } else {
                EarlyStopping::Heuristic as i32
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_translator_translates_as_its_own_definition_does() {
    let server = TestServer::start().await;
    let client = server.inference().await;
    let reference = translator_reference();
    let num_beams = reference["beam_settings"]["num_beams"].as_u64().unwrap() as u32;
    let mut calls = Vec::new();
    // Greedy and beam requests for every source at once: they batch with each other.
    for (kind, beams) in [("greedy", 1), ("beam", num_beams)] {
        for case in reference[kind].as_array().unwrap().clone() {
            let mut client = client.clone();
            calls.push(async move {
                let source = case["source"].as_str().unwrap();
                let response = client
                    .generate(translate(source, beams))
                    .await
                    .unwrap()
                    .into_inner();
                (kind, case, response)
            });
        }
    }
    for (kind, case, response) in join_all(calls).await {
        let source = case["source"].as_str().unwrap();
        assert_eq!(generated(&response), ids(&case["ids"]), "{kind}: {source}");
        assert_eq!(
            response.sequences[0].text,
            case["text"].as_str().unwrap(),
            "{kind}: {source}"
        );
        if kind == "beam" {
            let expected = case["score"].as_f64().unwrap() as f32;
            assert!((score(&response) - expected).abs() < 1e-4, "{source}");
        }
    }
}

#[tokio::test]
async fn lmserve_generate_prints_the_translation_alone() {
    let server = TestServer::start().await;
    let case = &translator_reference()["greedy"][1];
    let (ok, output) = common::run_to_exit(
        &[
            "generate",
            "--addr",
            &server.addr,
            "--model",
            "tiny-translator",
            "--num-beams",
            "2",
            case["source"].as_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{output}");
    let printed = output.lines().next().unwrap();
    assert!(
        !printed.contains(case["source"].as_str().unwrap()),
        "{output}"
    );
    assert!(!printed.trim().is_empty(), "{output}");
    assert!(output.contains("FINISH_REASON_EOS"), "{output}");
}

#[tokio::test]
async fn sampling_settings_apply_to_translations() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let source = "She talks a lot.";
    let sampled = |seed: u64| {
        let mut request = translate(source, 1);
        let parameters = request.parameters.as_mut().unwrap();
        parameters.do_sample = Some(true);
        parameters.temperature = Some(1.5);
        parameters.seed = Some(seed);
        parameters.n = 4;
        request
    };
    let first = client.generate(sampled(7)).await.unwrap().into_inner();
    let again = client.generate(sampled(7)).await.unwrap().into_inner();
    let texts = |response: &GenerateResponse| -> Vec<String> {
        response.sequences.iter().map(|s| s.text.clone()).collect()
    };
    assert_eq!(texts(&first), texts(&again), "a seed fixes the samples");
    let distinct: std::collections::BTreeSet<_> = texts(&first).into_iter().collect();
    assert!(
        distinct.len() > 1,
        "four samples at temperature 1.5: {distinct:?}"
    );

    // Stop sequences and token limits cut the target, not the source.
    let mut cut = translate(source, 1);
    let parameters = cut.parameters.as_mut().unwrap();
    parameters.stop = vec!["habla".into()];
    let response = client.generate(cut).await.unwrap().into_inner();
    assert_eq!(response.sequences[0].text, "Ella ");
    assert_eq!(response.sequences[0].stop_sequence, "habla");
    let mut short = translate(source, 1);
    short.parameters.as_mut().unwrap().max_new_tokens = Some(2);
    let response = client.generate(short).await.unwrap().into_inner();
    assert_eq!(response.generated_tokens, 2);
}

#[tokio::test]
async fn a_models_own_num_beams_is_its_default_decoding() {
    // As opus-mt's generation_config.json does: beams unless the request asks otherwise.
    let repository = tempfile::tempdir().unwrap();
    let version = repository.path().join("marian/1");
    common::copy_dir(&fixtures().join("marian-tiny-untrained/1"), &version);
    let path = version.join("generation_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_beams"] = 4.into();
    config["early_stopping"] = true.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    let case = &cases()[2];
    let source = case["source"].as_str().unwrap();
    let mut plain = request("marian", source, 0);
    plain.parameters.as_mut().unwrap().early_stopping = 0;
    let response = client.generate(plain.clone()).await.unwrap().into_inner();
    assert_eq!(generated(&response), ids(&case["beam"]["ids"]));
    // Asking for log-probabilities of alternatives keeps it on one row: greedy.
    plain.parameters.as_mut().unwrap().top_logprobs = 2;
    let response = client.generate(plain).await.unwrap().into_inner();
    assert_eq!(generated(&response), ids(&case["greedy"]["ids"]));
}
