//! The bad-input suite: malformed, oversized and out-of-range requests across every RPC, raw
//! undecodable bytes included. Each case must get its code (and a message naming the field,
//! the limit and the value, bounded in size); after each, the server is healthy and a canary
//! request running alongside the whole time has never waited a second.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::models_client::ModelsClient;
use lmserve::api::proto::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    needles: Vec<&'static str>,
}

fn case(name: &'static str, code: Code, needles: &[&'static str], call: Call) -> Case {
    Case {
        name,
        call,
        code,
        needles: needles.to_vec(),
    }
}

/// Sends bytes as they are, whatever they decode to, and reads the answer as bytes.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

fn raw(channel: &Channel, path: &'static str, bytes: Vec<u8>) -> Call {
    let channel = channel.clone();
    Box::pin(async move {
        let mut client = tonic::client::Grpc::new(channel);
        client
            .ready()
            .await
            .map_err(|e| Status::unknown(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(path);
        client
            .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(bytes), path, RawCodec)
            .await
            .map(drop)
    })
}

fn generation(model: &str, parameters: GenerationParameters) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: Some(Prompt::Text("ROMEO.".into())),
        parameters: Some(parameters),
        ..Default::default()
    }
}

fn params() -> GenerationParameters {
    GenerationParameters {
        max_new_tokens: Some(4),
        ..Default::default()
    }
}

fn embed(model: &str, texts: Vec<String>) -> EmbedRequest {
    EmbedRequest {
        model: model.into(),
        texts,
        ..Default::default()
    }
}

fn route(name: &str, arms: Vec<(&str, f64)>) -> SetRouteRequest {
    SetRouteRequest {
        route: Some(Route {
            name: name.into(),
            task: Task::Embed as i32,
            arms: arms
                .into_iter()
                .map(|(target, weight)| RouteArm {
                    target: target.into(),
                    weight,
                })
                .collect(),
            shadow: None,
            ..Default::default()
        }),
    }
}

/// A request running beside the suite the whole time: the longest it waited since the last look.
fn canary(channel: Channel) -> Arc<Mutex<Duration>> {
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let record = Arc::clone(&slowest);
    tokio::spawn(async move {
        let mut client = InferenceClient::new(channel);
        loop {
            let started = Instant::now();
            let answered = client
                .tokenize(TokenizeRequest {
                    model: "tiny-gpt2".into(),
                    text: "canary".into(),
                    add_special_tokens: None,
                    messages: None,
                    text_pair: None,
                })
                .await;
            let took = started.elapsed();
            assert!(answered.is_ok(), "the canary failed: {answered:?}");
            {
                let mut slowest = record.lock().unwrap();
                *slowest = (*slowest).max(took);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    slowest
}

#[tokio::test]
async fn every_bad_request_gets_its_code_and_disturbs_nobody() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let inference = || InferenceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let models = || ModelsClient::new(channel.clone());
    let huge_name = "m".repeat(3 << 20);

    let mut cases: Vec<Case> = Vec::new();
    macro_rules! on {
        ($client:expr, $method:ident, $request:expr) => {{
            let mut client = $client;
            let request = $request;
            Box::pin(async move { client.$method(request).await.map(drop) }) as Call
        }};
    }
    macro_rules! stream_on {
        ($client:expr, $method:ident, $request:expr) => {{
            let mut client = $client;
            let request = $request;
            Box::pin(async move {
                use futures::StreamExt;
                let mut stream = client.$method(request).await?.into_inner();
                while let Some(item) = stream.next().await {
                    item?;
                }
                Ok(())
            }) as Call
        }};
    }
    use Code::{FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unimplemented};

    // Generate.
    let g = |model: &str, parameters| generation(model, parameters);
    cases.push(case(
        "generate: empty model",
        InvalidArgument,
        &["model"],
        on!(inference(), generate, g("", params())),
    ));
    cases.push(case(
        "generate: 3 MiB model name",
        InvalidArgument,
        &["model", "3145728 bytes", "128"],
        on!(inference(), generate, g(&huge_name, params())),
    ));
    cases.push(case(
        "generate: unknown model",
        NotFound,
        &["nope"],
        on!(inference(), generate, g("nope", params())),
    ));
    cases.push(case(
        "generate: bad version",
        InvalidArgument,
        &["tiny-gpt2@x"],
        on!(inference(), generate, g("tiny-gpt2@x", params())),
    ));
    cases.push(case(
        "generate: missing version",
        NotFound,
        &["versions: [1]"],
        on!(inference(), generate, g("tiny-gpt2@9", params())),
    ));
    cases.push(case(
        "generate: no prompt",
        InvalidArgument,
        &["prompt", "missing"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                model: "tiny-gpt2".into(),
                ..Default::default()
            }
        ),
    ));
    cases.push(case(
        "generate: 300 kB prompt",
        InvalidArgument,
        &["prompt.text", "300000 bytes", "262144"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Text("x".repeat(300_000))),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: 70000 prompt ids",
        InvalidArgument,
        &["prompt.token_ids", "70000", "65536"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::TokenIds(TokenIds {
                    ids: vec![1; 70_000]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: prompt id outside the vocabulary",
        InvalidArgument,
        &["prompt.token_ids[1]", "9999999"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::TokenIds(TokenIds {
                    ids: vec![1, 9_999_999]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    let turn = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    cases.push(case(
        "generate: messages to a model without a chat template",
        FailedPrecondition,
        &["tiny-gpt2@1", "no chat_template"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Messages(ChatMessages {
                    messages: vec![turn("user", "hi")]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: empty messages",
        InvalidArgument,
        &["prompt.messages", "at least one message"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Messages(ChatMessages { messages: vec![] })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: 2000 messages",
        InvalidArgument,
        &["prompt.messages", "2000 messages", "1024"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Messages(ChatMessages {
                    messages: vec![turn("user", "hi"); 2000]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: a message with no role",
        InvalidArgument,
        &["prompt.messages[1].role", "empty"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Messages(ChatMessages {
                    messages: vec![turn("user", "hi"), turn("", "hi")]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: messages over the prompt bytes",
        InvalidArgument,
        &["prompt.messages[2].content", "262144"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Messages(ChatMessages {
                    messages: vec![turn("user", &"x".repeat(100_000)); 3]
                })),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: prompt over the context",
        InvalidArgument,
        &["prompt", "256"],
        on!(
            inference(),
            generate,
            GenerateRequest {
                prompt: Some(Prompt::Text("king ".repeat(2000))),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "generate: max_new_tokens 0",
        InvalidArgument,
        &["max_new_tokens", "0"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    max_new_tokens: Some(0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: max_new_tokens over the limit",
        InvalidArgument,
        &["max_new_tokens", "99999"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    max_new_tokens: Some(99_999),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: min over max",
        InvalidArgument,
        &["min_new_tokens", "9"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    min_new_tokens: 9,
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: negative temperature",
        InvalidArgument,
        &["temperature", "-1"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    temperature: Some(-1.0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: NaN temperature",
        InvalidArgument,
        &["temperature", "NaN"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    temperature: Some(f32::NAN),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: top_p 2",
        InvalidArgument,
        &["top_p", "2"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    top_p: Some(2.0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: typical_p 0",
        InvalidArgument,
        &["typical_p", "0"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    typical_p: Some(0.0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: repetition_penalty 0",
        InvalidArgument,
        &["repetition_penalty"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    repetition_penalty: Some(0.0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: frequency_penalty 5",
        InvalidArgument,
        &["frequency_penalty", "5"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    frequency_penalty: 5.0,
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: presence_penalty -5",
        InvalidArgument,
        &["presence_penalty", "-5"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    presence_penalty: -5.0,
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: n 100",
        InvalidArgument,
        &["parameters.n", "100"],
        on!(
            inference(),
            generate,
            g("tiny-gpt2", GenerationParameters { n: 100, ..params() })
        ),
    ));
    cases.push(case(
        "generate: top_logprobs 100",
        InvalidArgument,
        &["top_logprobs", "100"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    top_logprobs: 100,
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: 9 stop sequences",
        InvalidArgument,
        &["stop", "9"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    stop: vec!["x".into(); 9],
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: empty stop sequence",
        InvalidArgument,
        &["stop[0]", "empty"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    stop: vec![String::new()],
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: 1 kB stop sequence",
        InvalidArgument,
        &["stop[0]", "1000 bytes"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    stop: vec!["x".repeat(1000)],
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: 9 stop ids",
        InvalidArgument,
        &["stop_token_ids", "9"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    stop_token_ids: vec![1; 9],
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: stop id outside the vocabulary",
        InvalidArgument,
        &["stop_token_ids[0]", "123456"],
        on!(
            inference(),
            generate,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    stop_token_ids: vec![123_456],
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "generate: an encoder",
        FailedPrecondition,
        &["tiny-encoder", "generate"],
        on!(inference(), generate, g("tiny-encoder", params())),
    ));
    cases.push(case(
        "generate: model name with a NUL",
        InvalidArgument,
        &["model", "control"],
        on!(inference(), generate, g("tiny\0gpt2", params())),
    ));

    // GenerateStream.
    cases.push(case(
        "stream: no prompt",
        InvalidArgument,
        &["prompt"],
        stream_on!(
            inference(),
            generate_stream,
            GenerateRequest {
                model: "tiny-gpt2".into(),
                ..Default::default()
            }
        ),
    ));
    cases.push(case(
        "stream: 300 kB prompt",
        InvalidArgument,
        &["prompt.text", "262144"],
        stream_on!(
            inference(),
            generate_stream,
            GenerateRequest {
                prompt: Some(Prompt::Text("x".repeat(300_000))),
                ..g("tiny-gpt2", params())
            }
        ),
    ));
    cases.push(case(
        "stream: temperature 0 when sampling",
        InvalidArgument,
        &["temperature"],
        stream_on!(
            inference(),
            generate_stream,
            g(
                "tiny-gpt2",
                GenerationParameters {
                    do_sample: Some(true),
                    temperature: Some(0.0),
                    ..params()
                }
            )
        ),
    ));
    cases.push(case(
        "stream: unknown model",
        NotFound,
        &["nope"],
        stream_on!(inference(), generate_stream, g("nope", params())),
    ));

    // Embed, EmbedStream.
    cases.push(case(
        "embed: no texts",
        InvalidArgument,
        &["texts", "0"],
        on!(inference(), embed, embed("tiny-encoder", vec![])),
    ));
    cases.push(case(
        "embed: 300 texts",
        InvalidArgument,
        &["texts", "300", "256"],
        on!(
            inference(),
            embed,
            embed("tiny-encoder", vec!["x".into(); 300])
        ),
    ));
    cases.push(case(
        "embed: 70 kB text",
        InvalidArgument,
        &["texts[0]", "70000 bytes", "65536"],
        on!(
            inference(),
            embed,
            embed("tiny-encoder", vec!["x".repeat(70_000)])
        ),
    ));
    cases.push(case(
        "embed: 3 MiB route key",
        InvalidArgument,
        &["route_key", "3145728 bytes", "128"],
        on!(
            inference(),
            embed,
            EmbedRequest {
                route_key: huge_name.clone(),
                ..embed("tiny-encoder", vec!["x".into()])
            }
        ),
    ));
    cases.push(case(
        "embed: empty text",
        InvalidArgument,
        &["texts[0]", "no tokens"],
        on!(
            inference(),
            embed,
            embed("tiny-encoder", vec![String::new()])
        ),
    ));
    cases.push(case(
        "embed: text over the model's length",
        InvalidArgument,
        &["texts[0]", "maximum of 256", "truncate"],
        on!(
            inference(),
            embed,
            embed("tiny-encoder", vec!["word ".repeat(2000)])
        ),
    ));
    cases.push(case(
        "embed: unknown pooling",
        InvalidArgument,
        &["pooling", "42"],
        on!(
            inference(),
            embed,
            EmbedRequest {
                pooling: 42,
                ..embed("tiny-encoder", vec!["x".into()])
            }
        ),
    ));
    cases.push(case(
        "embed: unknown truncate",
        InvalidArgument,
        &["truncate", "9"],
        on!(
            inference(),
            embed,
            EmbedRequest {
                truncate: 9,
                ..embed("tiny-encoder", vec!["x".into()])
            }
        ),
    ));
    cases.push(case(
        "embed: a decoder",
        FailedPrecondition,
        &["tiny-gpt2", "embed"],
        on!(inference(), embed, embed("tiny-gpt2", vec!["x".into()])),
    ));
    cases.push(case(
        "embed: 3 MiB model name",
        InvalidArgument,
        &["model", "3145728"],
        on!(inference(), embed, embed(&huge_name, vec!["x".into()])),
    ));
    cases.push(case(
        "embed: message over 17 MiB",
        ResourceExhausted,
        &[],
        on!(
            inference(),
            embed,
            embed("tiny-encoder", vec!["x".repeat(60_000); 310])
        ),
    ));
    cases.push(case(
        "embed stream: a bad second message",
        InvalidArgument,
        &["texts"],
        stream_on!(
            inference(),
            embed_stream,
            futures::stream::iter([
                embed("tiny-encoder", vec!["fine".into()]),
                embed("tiny-encoder", vec![])
            ])
        ),
    ));

    // Classify, ClassifyStream.
    let classify = |model: &str| ClassifyRequest {
        model: model.into(),
        texts: vec!["x".into()],
        ..Default::default()
    };
    cases.push(case(
        "classify: top_k 0",
        InvalidArgument,
        &["top_k", "0"],
        on!(
            inference(),
            classify,
            ClassifyRequest {
                top_k: Some(0),
                ..classify("tiny-encoder")
            }
        ),
    ));
    cases.push(case(
        "classify: unknown scores",
        InvalidArgument,
        &["scores", "5"],
        on!(
            inference(),
            classify,
            ClassifyRequest {
                scores: 5,
                ..classify("tiny-encoder")
            }
        ),
    ));
    cases.push(case(
        "classify: more text_pairs than texts",
        InvalidArgument,
        &["text_pairs", "one pair per text (1 texts)", "got 2"],
        on!(
            inference(),
            classify,
            ClassifyRequest {
                text_pairs: vec!["a".into(), "b".into()],
                ..classify("tiny-reranker")
            }
        ),
    ));
    cases.push(case(
        "classify: 300 kB text pair",
        InvalidArgument,
        &["text_pairs[0]", "300000 bytes"],
        on!(
            inference(),
            classify,
            ClassifyRequest {
                text_pairs: vec!["x".repeat(300_000)],
                ..classify("tiny-reranker")
            }
        ),
    ));
    cases.push(case(
        "classify: unknown model",
        NotFound,
        &["nope"],
        on!(inference(), classify, classify("nope")),
    ));
    cases.push(case(
        "classify: an embedder",
        FailedPrecondition,
        &["tiny-word2vec", "classify"],
        on!(inference(), classify, classify("tiny-word2vec")),
    ));
    cases.push(case(
        "classify stream: a bad message",
        InvalidArgument,
        &["top_k"],
        stream_on!(
            inference(),
            classify_stream,
            futures::stream::iter([ClassifyRequest {
                top_k: Some(0),
                ..classify("tiny-encoder")
            }])
        ),
    ));

    // Tokenize, Detokenize.
    let tokenize = |model: &str, text: String| TokenizeRequest {
        model: model.into(),
        text,
        add_special_tokens: None,
        messages: None,
        text_pair: None,
    };
    cases.push(case(
        "tokenize: both text and messages",
        InvalidArgument,
        &["text", "messages"],
        on!(
            inference(),
            tokenize,
            TokenizeRequest {
                messages: Some(ChatMessages {
                    messages: vec![turn("user", "hi")]
                }),
                ..tokenize("tiny-gpt2", "x".into())
            }
        ),
    ));
    cases.push(case(
        "tokenize: messages with a model without a chat template",
        FailedPrecondition,
        &["tiny-gpt2@1", "no chat_template"],
        on!(
            inference(),
            tokenize,
            TokenizeRequest {
                messages: Some(ChatMessages {
                    messages: vec![turn("user", "hi")]
                }),
                ..tokenize("tiny-gpt2", String::new())
            }
        ),
    ));
    cases.push(case(
        "tokenize: 300 kB text",
        InvalidArgument,
        &["text", "300000 bytes", "262144"],
        on!(
            inference(),
            tokenize,
            tokenize("tiny-gpt2", "x".repeat(300_000))
        ),
    ));
    cases.push(case(
        "tokenize: 300 kB text_pair",
        InvalidArgument,
        &["text_pair", "300000 bytes", "262144"],
        on!(
            inference(),
            tokenize,
            TokenizeRequest {
                text_pair: Some("x".repeat(300_000)),
                ..tokenize("tiny-reranker", "x".into())
            }
        ),
    ));
    cases.push(case(
        "tokenize: text_pair with messages",
        InvalidArgument,
        &["text_pair", "messages"],
        on!(
            inference(),
            tokenize,
            TokenizeRequest {
                messages: Some(ChatMessages {
                    messages: vec![turn("user", "hi")]
                }),
                text_pair: Some("x".into()),
                ..tokenize("tiny-llama", String::new())
            }
        ),
    ));
    cases.push(case(
        "tokenize: unknown model",
        NotFound,
        &["nope"],
        on!(inference(), tokenize, tokenize("nope", "x".into())),
    ));
    cases.push(case(
        "tokenize: 3 MiB model name",
        InvalidArgument,
        &["model", "3145728"],
        on!(inference(), tokenize, tokenize(&huge_name, "x".into())),
    ));
    let detokenize = |model: &str, ids: Vec<u32>| DetokenizeRequest {
        model: model.into(),
        ids,
        skip_special_tokens: false,
    };
    cases.push(case(
        "detokenize: id outside the vocabulary",
        InvalidArgument,
        &["ids[0]", "999999"],
        on!(
            inference(),
            detokenize,
            detokenize("tiny-gpt2", vec![999_999])
        ),
    ));
    cases.push(case(
        "detokenize: 70000 ids",
        InvalidArgument,
        &["ids", "70000", "65536"],
        on!(
            inference(),
            detokenize,
            detokenize("tiny-gpt2", vec![1; 70_000])
        ),
    ));
    cases.push(case(
        "detokenize: unknown model",
        NotFound,
        &["nope"],
        on!(inference(), detokenize, detokenize("nope", vec![1])),
    ));

    // Models.
    cases.push(case(
        "get model: empty name",
        InvalidArgument,
        &["name"],
        on!(
            models(),
            get_model,
            GetModelRequest {
                name: String::new()
            }
        ),
    ));
    cases.push(case(
        "get model: unknown",
        NotFound,
        &["nope"],
        on!(
            models(),
            get_model,
            GetModelRequest {
                name: "nope".into()
            }
        ),
    ));
    cases.push(case(
        "get model: bad version",
        InvalidArgument,
        &["name"],
        on!(
            models(),
            get_model,
            GetModelRequest {
                name: "tiny-gpt2@x".into()
            }
        ),
    ));
    cases.push(case(
        "get model: 500 kB name",
        InvalidArgument,
        &["name", "512000 bytes"],
        on!(
            models(),
            get_model,
            GetModelRequest {
                name: "m".repeat(512_000)
            }
        ),
    ));
    cases.push(case(
        "load model: path escape",
        InvalidArgument,
        &["name", "plain folder name"],
        on!(
            models(),
            load_model,
            LoadModelRequest {
                name: "../etc".into(),
                version: None
            }
        ),
    ));
    cases.push(case(
        "load model: unknown",
        NotFound,
        &["nope"],
        on!(
            models(),
            load_model,
            LoadModelRequest {
                name: "nope".into(),
                version: None
            }
        ),
    ));
    cases.push(case(
        "load model: missing version",
        NotFound,
        &["99"],
        on!(
            models(),
            load_model,
            LoadModelRequest {
                name: "tiny-gpt2".into(),
                version: Some(99)
            }
        ),
    ));
    cases.push(case(
        "unload model: unknown",
        NotFound,
        &["nope"],
        on!(
            models(),
            unload_model,
            UnloadModelRequest {
                name: "nope".into(),
                version: None
            }
        ),
    ));
    cases.push(case(
        "set route: missing route",
        InvalidArgument,
        &["route"],
        on!(models(), set_route, SetRouteRequest { route: None }),
    ));
    cases.push(case(
        "set route: padded name",
        InvalidArgument,
        &["route.name", "letter or digit"],
        on!(
            models(),
            set_route,
            route(" padded ", vec![("tiny-encoder", 1.0)])
        ),
    ));
    cases.push(case(
        "set route: a model's name",
        InvalidArgument,
        &["route.name", "model's name"],
        on!(
            models(),
            set_route,
            route("tiny-encoder", vec![("tiny-encoder", 1.0)])
        ),
    ));
    cases.push(case(
        "set route: 20 arms",
        InvalidArgument,
        &["route.arms", "20", "16"],
        on!(
            models(),
            set_route,
            route("many", vec![("tiny-encoder", 1.0); 20])
        ),
    ));
    cases.push(case(
        "set route: 60000 arms",
        ResourceExhausted,
        &[],
        on!(
            models(),
            set_route,
            route("many", vec![("tiny-encoder", 1.0); 60_000])
        ),
    ));
    cases.push(case(
        "set route: no task",
        InvalidArgument,
        &["route.task"],
        on!(
            models(),
            set_route,
            SetRouteRequest {
                route: Some(Route {
                    task: 0,
                    ..route("r", vec![("tiny-encoder", 1.0)]).route.unwrap()
                })
            }
        ),
    ));
    cases.push(case(
        "set route: negative weight",
        InvalidArgument,
        &["weight", "-1"],
        on!(
            models(),
            set_route,
            route("r", vec![("tiny-encoder", -1.0)])
        ),
    ));
    cases.push(case(
        "set route: repeated arm",
        InvalidArgument,
        &["arms[1]", "twice"],
        on!(
            models(),
            set_route,
            route("r", vec![("tiny-encoder", 1.0), ("tiny-encoder", 1.0)])
        ),
    ));
    cases.push(case(
        "set route: an arm that cannot serve",
        FailedPrecondition,
        &["tiny-gpt2", "embed"],
        on!(models(), set_route, route("r", vec![("tiny-gpt2", 1.0)])),
    ));
    cases.push(case(
        "set route: shadow over 100%",
        InvalidArgument,
        &["shadow.percent", "150"],
        on!(
            models(),
            set_route,
            SetRouteRequest {
                route: Some(Route {
                    shadow: Some(ShadowArm {
                        target: "tiny-encoder".into(),
                        percent: 150.0
                    }),
                    ..route("r", vec![("tiny-encoder", 1.0)]).route.unwrap()
                })
            }
        ),
    ));
    cases.push(case(
        "delete route: unknown",
        NotFound,
        &["nope"],
        on!(
            models(),
            delete_route,
            DeleteRouteRequest {
                name: "nope".into()
            }
        ),
    ));
    cases.push(case(
        "get route: unknown",
        NotFound,
        &["nope"],
        on!(
            models(),
            get_route,
            GetRouteRequest {
                name: "nope".into()
            }
        ),
    ));

    // Health.
    cases.push(case("health: unknown service", NotFound, &[], {
        let mut health = HealthClient::new(channel.clone());
        Box::pin(async move {
            health
                .check(HealthCheckRequest {
                    service: "nope".into(),
                })
                .await
                .map(drop)
        })
    }));

    // Raw bytes that are not the message they claim to be.
    let invalid_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    let truncated = vec![0x0a, 0x10, b'a'];
    let wrong_wire_type = vec![0x12, 0x01];
    for (path, bytes, what) in [
        (
            "/lmserve.v1.Inference/Embed",
            invalid_utf8.clone(),
            "embed: invalid UTF-8",
        ),
        (
            "/lmserve.v1.Inference/Embed",
            truncated.clone(),
            "embed: truncated field",
        ),
        (
            "/lmserve.v1.Inference/Classify",
            wrong_wire_type.clone(),
            "classify: wrong wire type",
        ),
        (
            "/lmserve.v1.Inference/Generate",
            invalid_utf8.clone(),
            "generate: invalid UTF-8",
        ),
        (
            "/lmserve.v1.Inference/GenerateStream",
            truncated.clone(),
            "stream: truncated field",
        ),
        (
            "/lmserve.v1.Inference/Tokenize",
            invalid_utf8.clone(),
            "tokenize: invalid UTF-8",
        ),
        (
            "/lmserve.v1.Inference/Detokenize",
            vec![0x12, 0x05, 0x01],
            "detokenize: truncated packed ids",
        ),
        (
            "/lmserve.v1.Models/GetModel",
            invalid_utf8.clone(),
            "get model: invalid UTF-8",
        ),
        (
            "/lmserve.v1.Models/SetRoute",
            truncated.clone(),
            "set route: truncated field",
        ),
        (
            "/lmserve.v1.Models/LoadModel",
            wrong_wire_type.clone(),
            "load model: wrong wire type",
        ),
    ] {
        cases.push(case(
            what,
            InvalidArgument,
            &["not a valid protobuf message"],
            raw(&channel, path, bytes),
        ));
    }
    // Lists of empty elements: two bytes each on the wire, up to 312 decoded. They are counted
    // before decoding, so a message within the size limit cannot decode into gigabytes.
    let empty_elements = |tag: u8, count: usize| [tag, 0x00].repeat(count);
    // A conversation (field 7) of 100,000 empty messages (its field 1).
    let mut conversation = vec![0x3a];
    prost::encoding::encode_varint(200_000, &mut conversation);
    conversation.extend(empty_elements(0x0a, 100_000));
    for (path, bytes, what, needle) in [
        (
            "/inference.GRPCInferenceService/ModelInfer",
            empty_elements(0x2a, 4_000_000),
            "kserve: four million empty inputs",
            "inputs: the request holds more than 65536 list elements",
        ),
        (
            "/lmserve.v1.Inference/Embed",
            empty_elements(0x12, 100_000),
            "embed: a hundred thousand empty texts",
            "texts: the request holds more than 65536 list elements",
        ),
        (
            "/lmserve.v1.Inference/Generate",
            conversation,
            "generate: a hundred thousand empty messages",
            "messages.messages: the request holds more than 65536 list elements",
        ),
    ] {
        cases.push(case(
            what,
            InvalidArgument,
            &[needle],
            raw(&channel, path, bytes),
        ));
    }
    let over_a_mebibyte = prost::Message::encode_to_vec(&GetModelRequest {
        name: "m".repeat(1_100_000),
    });
    cases.push(case(
        "models: message over 1 MiB",
        ResourceExhausted,
        &[],
        raw(&channel, "/lmserve.v1.Models/GetModel", over_a_mebibyte),
    ));
    cases.push(case(
        "unknown method",
        Unimplemented,
        &[],
        raw(&channel, "/lmserve.v1.Inference/Nope", vec![]),
    ));

    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let slowest = canary(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    for case in cases {
        let status = case.call.await.expect_err(case.name);
        assert_eq!(status.code(), case.code, "{}: {status:?}", case.name);
        for needle in &case.needles {
            assert!(
                status.message().contains(needle),
                "{}: {needle:?} not in {:?}",
                case.name,
                status.message()
            );
        }
        assert!(
            status.message().len() <= 1100,
            "{}: a {} byte message",
            case.name,
            status.message().len()
        );
        let healthy = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(
            healthy.into_inner().status,
            ServingStatus::Serving as i32,
            "{}",
            case.name
        );
        let waited = std::mem::take(&mut *slowest.lock().unwrap());
        assert!(
            waited < Duration::from_secs(1),
            "{}: the canary waited {waited:?}",
            case.name
        );
    }
    // And the server still does real work.
    InferenceClient::new(channel)
        .generate(generation("tiny-gpt2", params()))
        .await
        .unwrap();
}
