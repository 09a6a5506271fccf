//! The real pretrained models of `make real-models`, through the Rust client: SmolLM2's streamed
//! greedy tokens against transformers' (the model's own implementation, from its GGUF file) and
//! all-MiniLM-L6-v2's embeddings against sentence-transformers'. The references are committed in
//! models/real/reference/; tests/python/test_real_models.py checks the rest. SmolLM2's chat
//! template is checked against transformers' apply_chat_template (reference/smollm2-chat.json).
//! SmolLM2's float16 graph (the one for GPUs) is held to the same greedy tokens. SmolLM2's beam
//! search with a repetition penalty is held to transformers' sequences.

mod common;

use common::{ServerOptions, TestServer};
use futures::StreamExt;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{
    ChatMessage, ChatMessages, EarlyStopping, EmbedRequest, FinishReason, GenerateRequest,
    GenerationParameters, GetModelRequest, TokenIds, TokenizeRequest, Truncate,
};
use tonic::transport::Channel;

fn reference(name: &str) -> serde_json::Value {
    let path = common::root()
        .join("models/real/reference")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn real_server() -> TestServer {
    serve(common::real_models()).await
}

async fn serve(repository: std::path::PathBuf) -> TestServer {
    TestServer::start_with(ServerOptions {
        repository,
        env: vec![
            ("LMSERVE_RUNTIME__SESSIONS_PER_MODEL".into(), "1".into()),
            ("LMSERVE_RUNTIME__INTRA_THREADS".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn real_models_match_their_own_libraries() {
    let server = real_server().await;
    let mut client = server.inference().await;
    greedy_as_transformers(&mut client).await;
    beams_as_transformers(&mut client).await;

    let minilm = reference("all-minilm-l6-v2");
    let cases: Vec<&serde_json::Value> = minilm["cases"]
        .as_array()
        .unwrap()
        .iter()
        .step_by(6)
        .collect();
    let response = client
        .embed(EmbedRequest {
            model: "all-minilm-l6-v2".into(),
            texts: cases
                .iter()
                .map(|c| c["text"].as_str().unwrap().to_owned())
                .collect(),
            truncate: Truncate::Right as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (case, embedding) in cases.iter().zip(&response.embeddings) {
        let expected = common::floats(&case["embedding"]);
        let dot: f64 = embedding
            .values
            .iter()
            .zip(&expected)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(&embedding.values) * norm(&expected));
        assert!(cosine >= 0.99999, "{}: cosine {cosine}", case["text"]);
    }
}

/// SmolLM2's float16 graph, in which a GPU runs its attention, served on the CPU: its greedy
/// tokens are transformers' float32 ones too.
#[tokio::test]
async fn float16_smollm2_decodes_as_transformers() {
    let server = serve(common::real_models_float16()).await;
    greedy_as_transformers(&mut server.inference().await).await;

    // Its cache is budgeted at float16's size: 30 layers of keys and values, 3 heads of 64.
    let version = server
        .models()
        .await
        .get_model(GetModelRequest {
            name: "smollm2-135m-instruct".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
        .remove(0);
    assert_eq!(
        version.kv_cache.unwrap().bytes_per_token,
        30 * 2 * 3 * 64 * 2
    );
}

/// SmolLM2's streamed greedy tokens and finish reasons are transformers' (reference cases).
async fn greedy_as_transformers(client: &mut InferenceClient<Channel>) {
    let smollm2 = reference("smollm2-135m-instruct");
    let limit = smollm2["max_new_tokens"].as_u64().unwrap() as u32;
    let eos = smollm2["eos_token_id"].as_u64().unwrap() as u32;
    for case in smollm2["cases"].as_array().unwrap() {
        let request = GenerateRequest {
            model: "smollm2-135m-instruct".into(),
            prompt: Some(Prompt::Text(case["prompt"].as_str().unwrap().into())),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(limit),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut stream = client.generate_stream(request).await.unwrap().into_inner();
        let (mut tokens, mut finish) = (Vec::new(), 0);
        while let Some(message) = stream.next().await {
            let message = message.unwrap();
            if let Some(token) = message.token {
                tokens.push(token.id);
            }
            if message.finish_reason != 0 {
                finish = message.finish_reason;
            }
        }
        let expected: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokens, expected, "{}", case["prompt"]);
        let reason = if expected.last() == Some(&eos) {
            FinishReason::Eos
        } else {
            FinishReason::Length
        };
        assert_eq!(finish, reason as i32, "{}", case["prompt"]);
    }
}

/// SmolLM2's beam search with a repetition penalty returns transformers' sequences, best first
/// (reference cases computed by transformers' own generate).
async fn beams_as_transformers(client: &mut InferenceClient<Channel>) {
    let beams = reference("smollm2-135m-instruct-beams");
    let settings = &beams["settings"];
    assert_eq!(settings["early_stopping"], false);
    for case in beams["cases"].as_array().unwrap() {
        let request = GenerateRequest {
            model: "smollm2-135m-instruct".into(),
            prompt: Some(Prompt::TokenIds(TokenIds {
                ids: ids(&case["prompt_ids"]),
            })),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(settings["max_new_tokens"].as_u64().unwrap() as u32),
                do_sample: Some(false),
                num_beams: settings["num_beams"].as_u64().unwrap() as u32,
                n: settings["num_return_sequences"].as_u64().unwrap() as u32,
                repetition_penalty: Some(settings["repetition_penalty"].as_f64().unwrap() as f32),
                length_penalty: Some(settings["length_penalty"].as_f64().unwrap() as f32),
                early_stopping: EarlyStopping::Heuristic as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let response = client.generate(request).await.unwrap().into_inner();
        let sequences: Vec<Vec<u32>> = response
            .sequences
            .iter()
            .map(|sequence| sequence.tokens.iter().map(|token| token.id).collect())
            .collect();
        let expected: Vec<Vec<u32>> = case["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(sequences, expected, "{}", case["prompt"]);
    }
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

fn conversation(value: &serde_json::Value) -> ChatMessages {
    ChatMessages {
        messages: value
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect(),
    }
}

/// Conversations rendered by SmolLM2's own chat template give exactly transformers' text and
/// token ids; a greedy chat reply is transformers' greedy reply to the same prompt, and it ends
/// at the end of the assistant's turn (`<|im_end|>`) with FINISH_REASON_EOS.
#[tokio::test]
async fn chat_renders_like_transformers_and_stops_at_end_of_turn() {
    let server = real_server().await;
    let mut client = server.inference().await;
    let chat = reference("smollm2-chat");
    for case in chat["cases"].as_array().unwrap() {
        let tokens = client
            .tokenize(TokenizeRequest {
                model: "smollm2-135m-instruct".into(),
                messages: Some(conversation(&case["messages"])),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            tokens.rendered_text,
            case["text"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        let got: Vec<u32> = tokens.tokens.iter().map(|t| t.id).collect();
        assert_eq!(got, ids(&case["ids"]), "{}", case["name"]);
    }

    // The first conversation renders to the prompt of one of the greedy references.
    let first = &chat["cases"][0];
    let greedy = reference("smollm2-135m-instruct");
    let expected = greedy["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| ids(&case["prompt_ids"]) == ids(&first["ids"]))
        .expect("a greedy reference for the chat prompt");
    let expected = ids(&expected["tokens"]);
    let end_of_turn = chat["eos_token_id"].as_u64().unwrap() as u32;
    assert_eq!(expected.last(), Some(&end_of_turn));
    let response = client
        .generate(GenerateRequest {
            model: "smollm2-135m-instruct".into(),
            prompt: Some(Prompt::Messages(conversation(&first["messages"]))),
            parameters: Some(GenerationParameters {
                max_new_tokens: Some(expected.len() as u32 + 8),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.prompt_tokens as usize, ids(&first["ids"]).len());
    let sequence = &response.sequences[0];
    let got: Vec<u32> = sequence.tokens.iter().map(|t| t.id).collect();
    assert_eq!(got, expected);
    assert_eq!(sequence.finish_reason, FinishReason::Eos as i32);
    assert!(!sequence.text.contains("<|im_end|>"), "{:?}", sequence.text);
}
