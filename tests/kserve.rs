//! The KServe v2 service (`inference.GRPCInferenceService`) on the real server: health and
//! metadata; ModelInfer giving what lmserve.v1's Generate, Embed and Classify give, through
//! routes too; ModelStreamInfer's token deltas adding up to the unary text with the last one
//! marked final; bad input refused INVALID_ARGUMENT naming the field; API keys as for
//! lmserve.v1, with ServerLive and ServerReady open like health.

mod common;

use common::{ServerOptions, TestServer, max_abs_diff};
use futures::StreamExt;
use lmserve::api::kserve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmserve::api::kserve::proto::infer_parameter::ParameterChoice;
use lmserve::api::kserve::proto::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use lmserve::api::kserve::proto::*;
use lmserve::api::proto as v1;
use tonic::transport::Channel;
use tonic::{Code, Request};

type Client = GrpcInferenceServiceClient<Channel>;

async fn client(server: &TestServer) -> Client {
    GrpcInferenceServiceClient::new(server.channel().await)
}

fn raw_bytes(texts: &[&str]) -> Vec<u8> {
    let mut raw = Vec::new();
    for text in texts {
        raw.extend_from_slice(&(text.len() as u32).to_le_bytes());
        raw.extend_from_slice(text.as_bytes());
    }
    raw
}

fn text_input(shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: "text_input".into(),
        datatype: "BYTES".into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

/// A request with `texts` as raw BYTES, the way tritonclient sends them.
fn infer(model: &str, texts: &[&str], parameters: &[(&str, ParameterChoice)]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        id: "req-1".into(),
        parameters: parameters
            .iter()
            .map(|(key, choice)| {
                let value = InferParameter {
                    parameter_choice: Some(choice.clone()),
                };
                (key.to_string(), value)
            })
            .collect(),
        inputs: vec![text_input(&[texts.len() as i64])],
        raw_input_contents: vec![raw_bytes(texts)],
        ..Default::default()
    }
}

/// `request` with a one-BOOL input (`stream`, `exclude_input_in_output`) in its raw layout.
fn with_flag(mut request: ModelInferRequest, name: &str, value: bool) -> ModelInferRequest {
    request.inputs.push(InferInputTensor {
        name: name.into(),
        datatype: "BOOL".into(),
        shape: vec![1],
        ..Default::default()
    });
    request.raw_input_contents.push(vec![u8::from(value)]);
    request
}

fn outputs(names: &[&str]) -> Vec<InferRequestedOutputTensor> {
    names
        .iter()
        .map(|name| InferRequestedOutputTensor {
            name: name.to_string(),
            ..Default::default()
        })
        .collect()
}

/// An output's index, shape and (raw or typed) elements.
fn output<'a>(response: &'a ModelInferResponse, name: &str) -> (usize, &'a [i64]) {
    let index = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name} in {response:?}"));
    (index, &response.outputs[index].shape)
}

fn texts_of(response: &ModelInferResponse, name: &str) -> Vec<String> {
    let (index, _) = output(response, name);
    let elements = match response.raw_output_contents.get(index) {
        Some(raw) => {
            let (mut raw, mut elements) = (raw.as_slice(), Vec::new());
            while let Some((length, rest)) = raw.split_first_chunk::<4>() {
                let (element, rest) = rest.split_at(u32::from_le_bytes(*length) as usize);
                elements.push(element.to_vec());
                raw = rest;
            }
            elements
        }
        None => {
            response.outputs[index]
                .contents
                .clone()
                .unwrap()
                .bytes_contents
        }
    };
    elements
        .into_iter()
        .map(|e| String::from_utf8(e).unwrap())
        .collect()
}

fn floats_of(response: &ModelInferResponse, name: &str) -> Vec<f32> {
    let (index, _) = output(response, name);
    match response.raw_output_contents.get(index) {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        None => {
            response.outputs[index]
                .contents
                .clone()
                .unwrap()
                .fp32_contents
        }
    }
}

fn string_parameter(response: &ModelInferResponse, key: &str) -> String {
    match &response.parameters[key].parameter_choice {
        Some(ParameterChoice::StringParam(value)) => value.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

fn is_final(response: &ModelInferResponse) -> bool {
    match response.parameters["triton_final_response"].parameter_choice {
        Some(ParameterChoice::BoolParam(last)) => last,
        ref other => panic!("triton_final_response: {other:?}"),
    }
}

const PROMPT: &str = "ROMEO:";

async fn set_route(server: &TestServer, name: &str, task: v1::Task, target: &str) {
    server
        .models()
        .await
        .set_route(v1::SetRouteRequest {
            route: Some(v1::Route {
                name: name.into(),
                task: task as i32,
                arms: vec![v1::RouteArm {
                    target: target.into(),
                    weight: 1.0,
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn health_metadata_and_unimplemented_rpcs() {
    let server = TestServer::start().await;
    let mut kserve = client(&server).await;
    assert!(
        kserve
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        kserve
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    for (name, version, expected) in [
        ("tiny-gpt2", "", true),
        ("tiny-gpt2", "1", true),
        ("tiny-gpt2", "9", false),
        ("no-such-model", "", false),
    ] {
        let answer = kserve.model_ready(ready(name, version)).await.unwrap();
        assert_eq!(answer.into_inner().ready, expected, "{name}@{version}");
    }
    let bad = kserve
        .model_ready(ready("tiny-gpt2", "one"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("version: `one`"), "{bad:?}");
    assert_eq!(
        format!(
            "{:?}",
            server.health("inference.GRPCInferenceService").await
        ),
        "Serving"
    );

    let metadata = kserve
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.name, "lmserve");
    assert_eq!(metadata.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(metadata.extensions, ["parameters"]);

    let request = |name: &str| ModelMetadataRequest {
        name: name.into(),
        version: String::new(),
    };
    let gpt2 = kserve
        .model_metadata(request("tiny-gpt2"))
        .await
        .unwrap()
        .into_inner();
    let shapes = |tensors: &[model_metadata_response::TensorMetadata]| -> Vec<String> {
        tensors
            .iter()
            .map(|t| format!("{} {} {:?}", t.name, t.datatype, t.shape))
            .collect()
    };
    assert_eq!(gpt2.versions, ["1"]);
    assert_eq!(
        shapes(&gpt2.inputs),
        [
            "text_input BYTES [1]",
            "stream BOOL [1]",
            "exclude_input_in_output BOOL [1]"
        ]
    );
    assert_eq!(shapes(&gpt2.outputs), ["text_output BYTES [-1]"]);
    let encoder = kserve
        .model_metadata(request("tiny-encoder"))
        .await
        .unwrap()
        .into_inner();
    // A classifier takes a second text per row, for a cross-encoder.
    assert_eq!(
        shapes(&encoder.inputs),
        ["text_input BYTES [-1]", "text_pair BYTES [-1]"]
    );
    assert_eq!(
        shapes(&encoder.outputs),
        [
            "embedding FP32 [-1, 128]",
            "probabilities FP32 [-1, 2]",
            "labels BYTES [2]"
        ]
    );
    let missing = kserve
        .model_metadata(request("no-such-model"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // A Triton RPC lmserve leaves out, called as tritonclient's get_model_config would.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, ServerLiveResponse, _>(
            Request::new(ServerLiveRequest {}),
            "/inference.GRPCInferenceService/ModelConfig"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert!(status.message().contains("ModelStreamInfer"), "{status:?}");
}

#[tokio::test]
async fn model_infer_gives_what_lmserve_v1_gives() {
    let server = TestServer::start().await;
    let mut kserve = client(&server).await;

    let generated = server.unary_text("tiny-gpt2", PROMPT, 16).await;
    // As Triton's vLLM backend answers: the prompt, then what was generated.
    let expected = format!("{PROMPT}{generated}");
    let max_tokens = [("max_tokens", ParameterChoice::Int64Param(16))];
    let raw = kserve
        .model_infer(infer("tiny-gpt2", &[PROMPT], &max_tokens))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        texts_of(&raw, "text_output"),
        std::slice::from_ref(&expected)
    );
    let excluded = with_flag(
        infer("tiny-gpt2", &[PROMPT], &max_tokens),
        "exclude_input_in_output",
        true,
    );
    let excluded = kserve.model_infer(excluded).await.unwrap().into_inner();
    assert_eq!(texts_of(&excluded, "text_output"), [generated]);

    // What tritonclient's infer(priority=..., timeout=...) sends is taken.
    let triton_options = [
        ("max_tokens", ParameterChoice::Int64Param(16)),
        ("priority", ParameterChoice::Uint64Param(1)),
        ("timeout", ParameterChoice::Int64Param(30_000_000)),
    ];
    let optioned = kserve
        .model_infer(infer("tiny-gpt2", &[PROMPT], &triton_options))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        texts_of(&optioned, "text_output"),
        std::slice::from_ref(&expected)
    );
    assert_eq!(output(&raw, "text_output").1, [1]);
    assert_eq!(
        (raw.id.as_str(), raw.model_version.as_str()),
        ("req-1", "1")
    );
    assert_eq!(string_parameter(&raw, "finish_reason"), "length");

    // Typed contents, a [1, 1] prompt and an explicit version.
    let mut typed = infer("tiny-gpt2", &[PROMPT], &max_tokens);
    typed.model_version = "1".into();
    typed.raw_input_contents.clear();
    typed.inputs[0].shape = vec![1, 1];
    typed.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: vec![PROMPT.as_bytes().to_vec()],
        ..Default::default()
    });
    let typed = kserve.model_infer(typed).await.unwrap().into_inner();
    assert!(typed.raw_output_contents.is_empty());
    assert_eq!(
        texts_of(&typed, "text_output"),
        std::slice::from_ref(&expected)
    );
    assert_eq!(output(&typed, "text_output").1, [1, 1]);

    // A route is a model name too.
    set_route(&server, "chat", v1::Task::Generate, "tiny-gpt2@1").await;
    let routed = kserve
        .model_infer(infer("chat", &[PROMPT], &max_tokens))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(texts_of(&routed, "text_output"), [expected]);
    assert_eq!(routed.model_name, "chat");
    assert_eq!(string_parameter(&routed, "arm"), "tiny-gpt2@1");

    let texts = [
        "free money, click now",
        "see you at lunch tomorrow",
        "ROMEO:",
    ];
    let mut inference = server.inference().await;
    let embedded = inference
        .embed(v1::EmbedRequest {
            model: "tiny-encoder".into(),
            texts: texts.map(String::from).to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let classified = inference
        .classify(v1::ClassifyRequest {
            model: "tiny-encoder".into(),
            texts: texts.map(String::from).to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut both = infer("tiny-encoder", &texts, &[]);
    both.outputs = outputs(&["labels", "embedding", "probabilities"]);
    let both = kserve.model_infer(both).await.unwrap().into_inner();
    let names: Vec<&str> = both.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["labels", "embedding", "probabilities"]);
    assert_eq!(output(&both, "embedding").1, [3, 128]);
    let vectors = floats_of(&both, "embedding");
    for (row, embedding) in embedded.embeddings.iter().enumerate() {
        let got = &vectors[row * 128..(row + 1) * 128];
        assert!(max_abs_diff(got, &embedding.values) <= 1e-5, "row {row}");
    }
    assert_eq!(texts_of(&both, "labels"), ["ham", "spam"]);
    assert_eq!(output(&both, "probabilities").1, [3, 2]);
    let probabilities = floats_of(&both, "probabilities");
    for (row, classification) in classified.classifications.iter().enumerate() {
        for label in &classification.labels {
            let got = probabilities[row * 2 + label.index as usize];
            assert!(
                (got - label.score).abs() <= 1e-5,
                "row {row} {}",
                label.label
            );
        }
    }

    // Typed contents in, typed contents out; an embed route.
    set_route(&server, "vectors", v1::Task::Embed, "tiny-encoder").await;
    let mut typed = infer("vectors", &texts[..1], &[]);
    typed.raw_input_contents.clear();
    typed.inputs[0].shape = vec![1, 1];
    typed.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: vec![texts[0].as_bytes().to_vec()],
        ..Default::default()
    });
    let typed = kserve.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(typed.outputs.len(), 1, "a route serves one task");
    let values = typed.outputs[0]
        .contents
        .as_ref()
        .unwrap()
        .fp32_contents
        .clone();
    assert!(max_abs_diff(&values, &embedded.embeddings[0].values) <= 1e-5);
    assert_eq!(string_parameter(&typed, "route"), "vectors");
}

/// A bare model name answers each task from the newest ready version that serves it, as
/// lmserve.v1 does: a newer version that dropped classify leaves the older one answering
/// `probabilities`, and metadata lists what both serve. A request without `outputs` gets the
/// newest version's own; one that asks for outputs different versions serve is refused.
#[tokio::test]
async fn a_bare_name_answers_each_task_from_the_newest_version_that_serves_it() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_version("tiny-encoder", "1", repository.path(), "enc", "1");
    common::copy_version("tiny-encoder", "1", repository.path(), "enc", "2");
    let manifest = repository.path().join("enc/2/model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let embed_only = text.replace(r#"tasks = ["embed", "classify"]"#, r#"tasks = ["embed"]"#);
    assert_ne!(embed_only, text);
    std::fs::write(&manifest, embed_only).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut kserve = client(&server).await;
    let texts = ["win a free prize now"];

    let mut request = infer("enc", &texts, &[]);
    request.outputs = outputs(&["probabilities", "labels"]);
    let classified = kserve.model_infer(request).await.unwrap().into_inner();
    assert_eq!(classified.model_version, "1");
    assert_eq!(floats_of(&classified, "probabilities").len(), 2);

    let embedded = kserve
        .model_infer(infer("enc", &texts, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embedded.model_version, "2");
    let names: Vec<&str> = embedded.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["embedding"]);

    let mut request = infer("enc", &texts, &[]);
    request.outputs = outputs(&["embedding", "probabilities"]);
    let refused = kserve.model_infer(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for needle in [
        "outputs",
        "embed by enc@2",
        "classify by enc@1",
        "model_version",
    ] {
        assert!(
            refused.message().contains(needle),
            "{needle:?}: {refused:?}"
        );
    }

    let metadata = kserve
        .model_metadata(ModelMetadataRequest {
            name: "enc".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = metadata.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["embedding", "probabilities", "labels"]);
    let labels = metadata
        .outputs
        .iter()
        .find(|o| o.name == "labels")
        .unwrap();
    assert_eq!(labels.shape, [2]);
    assert!(
        metadata
            .inputs
            .iter()
            .any(|input| input.name == "text_pair")
    );
}

/// A name whose versions mix generation (the newer) and encoder tasks (the older): its
/// metadata takes a batch of texts, as the encoder version does, and lists both tasks' inputs
/// and outputs; each request is answered by the version serving the outputs it asks for.
#[tokio::test]
async fn metadata_of_a_name_mixing_generation_and_encoder_versions_takes_a_batch() {
    let repository = tempfile::tempdir().unwrap();
    common::copy_version("tiny-encoder", "1", repository.path(), "mixed", "1");
    common::copy_version("tiny-gpt2", "1", repository.path(), "mixed", "2");
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut kserve = client(&server).await;
    let metadata = |version: &str| ModelMetadataRequest {
        name: "mixed".into(),
        version: version.into(),
    };
    let shapes = |tensors: &[model_metadata_response::TensorMetadata]| -> Vec<String> {
        tensors
            .iter()
            .map(|t| format!("{} {:?}", t.name, t.shape))
            .collect()
    };
    let both = kserve
        .model_metadata(metadata(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shapes(&both.inputs),
        [
            "text_input [-1]",
            "stream [1]",
            "exclude_input_in_output [1]",
            "text_pair [-1]"
        ]
    );
    let outputs_named: Vec<&str> = both.outputs.iter().map(|o| o.name.as_str()).collect();
    for name in ["text_output", "embedding", "probabilities"] {
        assert!(outputs_named.contains(&name), "{outputs_named:?}");
    }
    let generator = kserve
        .model_metadata(metadata("2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shapes(&generator.inputs),
        [
            "text_input [1]",
            "stream [1]",
            "exclude_input_in_output [1]"
        ]
    );

    // A batch of two texts, as the metadata allows, answered by the encoder version.
    let mut request = infer("mixed", &["hello", "a second text"], &[]);
    request.outputs = outputs(&["embedding"]);
    let embedded = kserve.model_infer(request).await.unwrap().into_inner();
    assert_eq!(embedded.model_version, "1");
    assert_eq!(floats_of(&embedded, "embedding").len(), 2 * 128);
    let generated = kserve
        .model_infer(infer("mixed", &[PROMPT], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.model_version, "2");
}

#[tokio::test]
async fn stream_infer_sends_token_deltas_then_a_final_response() {
    let server = TestServer::start().await;
    let mut kserve = client(&server).await;
    let expected = server.unary_text("tiny-gpt2", PROMPT, 20).await;

    let twenty = [("max_tokens", ParameterChoice::Uint64Param(20))];
    let mut generate = with_flag(infer("tiny-gpt2", &[PROMPT], &twenty), "stream", true);
    generate.id = "gen".into();
    let mut bad = infer(
        "tiny-gpt2",
        &[PROMPT],
        &[("top_p", ParameterChoice::DoubleParam(7.0))],
    );
    bad.id = "bad".into();
    let mut embed = infer("tiny-encoder", &["hello"], &[]);
    embed.id = "emb".into();
    embed.outputs = outputs(&["embedding"]);
    // As Triton's vLLM backend: without `stream` true, the whole text (the prompt first) at once.
    let mut whole = infer("tiny-gpt2", &[PROMPT], &twenty);
    whole.id = "whole".into();
    // A stream does not repeat the prompt, and may not be asked to.
    let mut echoing = with_flag(generate.clone(), "exclude_input_in_output", false);
    echoing.id = "bad".into();
    // Refused for its id, whose failure carries that id cut to the limit, not sent back whole.
    let mut long_id = infer("tiny-gpt2", &[PROMPT], &twenty);
    long_id.id = "L".repeat(1 << 20);
    let requests = futures::stream::iter([generate, bad, embed, whole, echoing, long_id]);
    let mut responses = kserve
        .model_stream_infer(requests)
        .await
        .unwrap()
        .into_inner();

    let (mut deltas, mut finals, mut errors, mut embeddings) = (Vec::new(), 0, Vec::new(), 0);
    let (mut generated_tokens, mut wholes, mut long_ids) = (0, Vec::new(), 0);
    while let Some(message) = responses.next().await {
        let message = message.unwrap();
        let response = message.infer_response.unwrap();
        let last = is_final(&response);
        match response.id.as_str() {
            "gen" => {
                assert_eq!(finals, 0, "a response after the final one");
                deltas.extend(texts_of(&response, "text_output"));
                finals += usize::from(last);
                if last {
                    let Some(ParameterChoice::Int64Param(count)) =
                        response.parameters["generated_tokens"].parameter_choice
                    else {
                        panic!("no generated_tokens in {response:?}");
                    };
                    generated_tokens = count as usize;
                }
            }
            "bad" => {
                assert!(last);
                errors.push(message.error_message);
            }
            "emb" => {
                assert!(last && message.error_message.is_empty());
                assert_eq!(floats_of(&response, "embedding").len(), 128);
                embeddings += 1;
            }
            "whole" => {
                assert!(last && message.error_message.is_empty());
                wholes.extend(texts_of(&response, "text_output"));
            }
            long if long.starts_with(&"L".repeat(128)) => {
                assert!(last && long.len() < 200, "{} bytes of id", long.len());
                assert!(
                    message
                        .error_message
                        .starts_with("InvalidArgument: id: 1048576 bytes is over the limit"),
                    "{}",
                    message.error_message
                );
                long_ids += 1;
            }
            other => panic!("unexpected id {other}"),
        }
    }
    assert_eq!((finals, long_ids), (1, 1));
    assert_eq!(
        deltas.len(),
        generated_tokens + 1,
        "one response per token, then the final one"
    );
    assert_eq!(deltas.concat(), expected);
    errors.sort();
    assert_eq!(errors.len(), 2);
    assert!(
        errors[0]
            .starts_with("InvalidArgument: exclude_input_in_output: false asks for the prompt"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("InvalidArgument: parameters.top_p: must be in (0, 1]"),
        "{errors:?}"
    );
    assert_eq!(embeddings, 1);
    assert_eq!(wholes, [format!("{PROMPT}{expected}")]);
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut kserve = client(&server).await;
    let gpt2 = |parameters: &[(&str, ParameterChoice)]| infer("tiny-gpt2", &[PROMPT], parameters);
    let encoder = |texts: &[&str]| infer("tiny-encoder", texts, &[]);
    let with = |mut request: ModelInferRequest, change: &dyn Fn(&mut ModelInferRequest)| {
        change(&mut request);
        request
    };
    let long_text = "word ".repeat(20_000);
    let cases: Vec<(&str, ModelInferRequest, Code, &str)> = vec![
        (
            "no inputs",
            with(gpt2(&[]), &|r| {
                r.inputs.clear();
                r.raw_input_contents.clear();
            }),
            Code::InvalidArgument,
            "inputs: text_input is missing",
        ),
        (
            "wrong datatype",
            with(gpt2(&[]), &|r| r.inputs[0].datatype = "FP32".into()),
            Code::InvalidArgument,
            "text_input.datatype: must be BYTES",
        ),
        (
            "a batch of prompts",
            infer("tiny-gpt2", &["a", "b"], &[]),
            Code::InvalidArgument,
            "text_input.shape: generate models take one prompt",
        ),
        (
            "a lying length prefix",
            with(gpt2(&[]), &|r| r.raw_input_contents[0][0] = 250),
            Code::InvalidArgument,
            "text_input.raw_input_contents: element 0 declares 250 bytes",
        ),
        (
            "a cut length prefix",
            with(encoder(&["a"]), &|r| r.raw_input_contents[0].truncate(2)),
            Code::InvalidArgument,
            "inside the length prefix",
        ),
        (
            "raw for some inputs",
            with(gpt2(&[]), &|r| r.raw_input_contents.push(vec![1])),
            Code::InvalidArgument,
            "raw_input_contents: holds 2 entries for 1 inputs",
        ),
        (
            "a huge shape",
            with(encoder(&["a"]), &|r| r.inputs[0].shape = vec![i64::MAX, 1]),
            Code::InvalidArgument,
            "text_input.shape: [9223372036854775807, 1] holds more than the limit of 256",
        ),
        (
            "a text over the model's length",
            encoder(&[&"word ".repeat(400)]),
            Code::InvalidArgument,
            "set parameters.truncate to right or left to cut it",
        ),
        (
            "a 1 MiB id",
            with(gpt2(&[]), &|r| r.id = "i".repeat(1 << 20)),
            Code::InvalidArgument,
            "id: 1048576 bytes is over the limit of 128 bytes",
        ),
        (
            "a 1 MiB route key",
            gpt2(&[(
                "route_key",
                ParameterChoice::StringParam("k".repeat(1 << 20)),
            )]),
            Code::InvalidArgument,
            "parameters.route_key: 1048576 bytes is over the limit of 128 bytes",
        ),
        (
            "a negative dimension",
            with(encoder(&["a"]), &|r| r.inputs[0].shape = vec![-3]),
            Code::InvalidArgument,
            "text_input.shape: dimension 0 of [-3] is -3",
        ),
        (
            "a matrix of texts",
            with(encoder(&["a", "b"]), &|r| r.inputs[0].shape = vec![1, 2]),
            Code::InvalidArgument,
            "text_input.shape: must be [n] or [n, 1]",
        ),
        (
            "no texts",
            encoder(&[]),
            Code::InvalidArgument,
            "text_input: must hold at least one text",
        ),
        (
            "a text over the limit",
            encoder(&["ok", &long_text]),
            Code::InvalidArgument,
            "text_input[1]: 100000 bytes is over the limit of 65536",
        ),
        (
            "invalid UTF-8",
            with(encoder(&["ab"]), &|r| r.raw_input_contents[0][5] = 0xff),
            Code::InvalidArgument,
            "text_input[0]: is not valid UTF-8",
        ),
        (
            "typed count mismatch",
            with(encoder(&["a"]), &|r| {
                r.raw_input_contents.clear();
                r.inputs[0].contents = Some(InferTensorContents::default());
            }),
            Code::InvalidArgument,
            "text_input.contents.bytes_contents: holds 0 elements",
        ),
        (
            "an unknown input",
            with(gpt2(&[]), &|r| {
                r.inputs.push(InferInputTensor {
                    name: "image".into(),
                    ..text_input(&[1])
                });
                r.raw_input_contents.push(raw_bytes(&["x"]));
            }),
            Code::InvalidArgument,
            "inputs[1].name: `image` is not an input",
        ),
        (
            "an unknown output",
            with(gpt2(&[]), &|r| r.outputs = outputs(&["logits"])),
            Code::InvalidArgument,
            "outputs[0].name: `logits` is not an output of `tiny-gpt2`",
        ),
        (
            "a classification count",
            with(encoder(&["a"]), &|r| {
                r.outputs = outputs(&["labels"]);
                r.outputs[0].parameters.insert(
                    "classification".into(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::Int64Param(1)),
                    },
                );
            }),
            Code::InvalidArgument,
            "outputs[0].parameters: `classification` is not read",
        ),
        (
            "an unknown parameter",
            gpt2(&[("temprature", ParameterChoice::DoubleParam(0.5))]),
            Code::InvalidArgument,
            "parameters.temprature: is not a parameter of generate requests",
        ),
        (
            "a parameter of the wrong type",
            gpt2(&[("max_tokens", ParameterChoice::StringParam("8".into()))]),
            Code::InvalidArgument,
            "parameters.max_tokens: must be an int64_param or uint64_param; got a string_param",
        ),
        (
            "zero tokens",
            gpt2(&[("max_tokens", ParameterChoice::Int64Param(0))]),
            Code::InvalidArgument,
            "parameters.max_tokens: must be at least 1; got 0",
        ),
        (
            "tokens over the server's limit",
            gpt2(&[("max_new_tokens", ParameterChoice::Int64Param(1 << 30))]),
            Code::InvalidArgument,
            "parameters.max_new_tokens: 1073741824 is over the server's limit",
        ),
        (
            "an embed parameter on a generate model",
            gpt2(&[("normalize", ParameterChoice::BoolParam(true))]),
            Code::InvalidArgument,
            "parameters.normalize: is not a parameter",
        ),
        (
            "stream true on ModelInfer",
            with(gpt2(&[]), &|r| {
                r.inputs.push(InferInputTensor {
                    name: "stream".into(),
                    datatype: "BOOL".into(),
                    shape: vec![1],
                    ..Default::default()
                });
                r.raw_input_contents.push(vec![1]);
            }),
            Code::InvalidArgument,
            "stream: true asks for token streaming",
        ),
        (
            "a version that is no number",
            with(gpt2(&[]), &|r| r.model_version = "latest".into()),
            Code::InvalidArgument,
            "model_version: `latest` is not a version number",
        ),
        (
            "a model name over the limit",
            with(gpt2(&[]), &|r| r.model_name = "m".repeat(10_000)),
            Code::InvalidArgument,
            "model_name: 10000 bytes is over the limit of 128",
        ),
        (
            "an unknown model",
            infer("no-such-model", &["a"], &[]),
            Code::NotFound,
            "no-such-model",
        ),
        (
            "a version that does not exist",
            with(gpt2(&[]), &|r| r.model_version = "9".into()),
            Code::NotFound,
            "has no version `9`",
        ),
    ];
    for (name, request, code, needle) in cases {
        let status = kserve.model_infer(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: {:?}",
            status.message()
        );
        assert!(status.message().len() <= 1024, "{name}: unbounded message");
    }

    // Still serving, and healthy.
    let response = kserve
        .model_infer(infer(
            "tiny-gpt2",
            &[PROMPT],
            &[("max_tokens", ParameterChoice::Int64Param(2))],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(string_parameter(&response, "served_by"), "tiny-gpt2@1");
    assert!(
        kserve
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
}

#[tokio::test]
async fn api_keys_gate_inference_but_not_liveness_or_readiness() {
    const READER: &str = "reader-key-0123456789";
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), format!("inference {READER}\n")).unwrap();
    let server = TestServer::start_with(ServerOptions {
        env: vec![(
            "LMSERVE_AUTH__KEYS_FILE".into(),
            keys.path().to_str().unwrap().into(),
        )],
        ..Default::default()
    })
    .await;
    let mut kserve = client(&server).await;
    assert!(
        kserve
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        kserve
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let request = || infer("tiny-encoder", &["hello"], &[]);
    let refused = kserve.model_infer(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = kserve
        .model_metadata(ModelMetadataRequest {
            name: "tiny-encoder".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut keyed = Request::new(request());
    keyed
        .metadata_mut()
        .insert("authorization", format!("Bearer {READER}").parse().unwrap());
    kserve.model_infer(keyed).await.unwrap();
}
