//! The Models service, health checking, reflection, Tokenize/Detokenize and the metrics endpoint.

mod common;

use common::{ServerOptions, TestServer};
use lmserve::api::proto::{
    self, DetokenizeRequest, GetModelRequest, ListModelsRequest, TokenizeRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn lists_and_describes_models() {
    let server = TestServer::start().await;
    let mut models = server.models().await;
    let list = models
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
    for expected in [
        "tiny-encoder",
        "tiny-gpt2",
        "tiny-llama",
        "tiny-lstm",
        "tiny-transformer-lm",
        "tiny-word2vec",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
    for model in &list.models {
        let version = &model.versions[0];
        assert_eq!(
            version.state,
            proto::LoadState::Ready as i32,
            "{}: {}",
            model.name,
            version.load_error
        );
        assert_eq!(version.execution_provider, "cpu");
        assert!(!version.inputs.is_empty() && !version.outputs.is_empty());
    }

    let encoder = models
        .get_model(GetModelRequest {
            name: "tiny-encoder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = &encoder.versions[0];
    assert_eq!(version.family, proto::Family::Encoder as i32);
    assert_eq!(
        version.tasks,
        vec![proto::Task::Embed as i32, proto::Task::Classify as i32]
    );
    assert_eq!(version.labels, vec!["ham", "spam"]);
    let input_ids = version
        .inputs
        .iter()
        .find(|t| t.name == "input_ids")
        .unwrap();
    assert_eq!(input_ids.dtype, "int64");
    assert_eq!(input_ids.shape, vec![-1, -1]);

    let gpt2 = models
        .get_model(GetModelRequest {
            name: "tiny-gpt2@1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gpt2.versions[0].family, proto::Family::Decoder as i32);
    assert!(
        gpt2.versions[0]
            .inputs
            .iter()
            .any(|t| t.name == "past_key_values.0.key")
    );

    let missing = models
        .get_model(GetModelRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad_version = models
        .get_model(GetModelRequest {
            name: "tiny-gpt2@7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_version.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn health_reports_each_service_and_reflection_lists_them() {
    let server = TestServer::start().await;
    for service in ["", "lmserve.v1.Inference", "lmserve.v1.Models"] {
        assert_eq!(
            server.health(service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "lmserve.v1.Inference",
        "lmserve.v1.Models",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == expected), "{services:?}");
    }
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    let text = "To be, or not to be: that is the question — ça va?";
    let response = client
        .tokenize(TokenizeRequest {
            model: "tiny-gpt2".into(),
            text: text.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(response.tokens.len() > 5);
    let chars: Vec<char> = text.chars().collect();
    let mut previous_end = 0;
    for token in &response.tokens {
        assert!(
            token.start <= token.end && token.end as usize <= chars.len(),
            "{token:?}"
        );
        assert!(
            token.start >= previous_end.min(token.start),
            "offsets move forward"
        );
        previous_end = token.end;
    }
    assert_eq!(
        response.tokens.last().unwrap().end as usize,
        chars.len(),
        "offsets count characters, not bytes"
    );
    let ids: Vec<u32> = response.tokens.iter().map(|t| t.id).collect();
    let decoded = client
        .detokenize(DetokenizeRequest {
            model: "tiny-gpt2".into(),
            ids,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decoded.text, text);
    assert_eq!(decoded.served_by.unwrap().model, "tiny-gpt2");

    // The reference ids of the generation models come from the same tokenizer.
    let reference = common::reference("tiny-gpt2");
    let case = &reference["generate"]["cases"][0];
    let response = client
        .tokenize(TokenizeRequest {
            model: "tiny-gpt2".into(),
            text: case["prompt"].as_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected: Vec<u64> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        response
            .tokens
            .iter()
            .map(|t| t.id as u64)
            .collect::<Vec<_>>(),
        expected
    );
}

#[tokio::test]
async fn metrics_count_requests_by_model_and_outcome() {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    let request = proto::EmbedRequest {
        model: "tiny-encoder".into(),
        texts: vec!["hello".into(), "world".into()],
        ..Default::default()
    };
    client.embed(request).await.unwrap();
    let _ = client
        .embed(proto::EmbedRequest {
            model: "nope".into(),
            texts: vec!["x".into()],
            ..Default::default()
        })
        .await;

    let body = common::scrape_metrics(metrics_port).await;
    for needle in [
        r#"lmserve_requests_total{model="tiny-encoder",version="1",route="",arm="",task="embed",outcome="ok"} 1"#,
        r#"outcome="not_found""#,
        "lmserve_batch_size_rows_bucket",
        "lmserve_inference_duration_seconds_bucket",
        "lmserve_queue_duration_seconds",
        "lmserve_tokenize_duration_seconds",
        r#"lmserve_models_loaded{state="ready"}"#,
    ] {
        assert!(body.contains(needle), "metrics lack {needle}:\n{body}");
    }
}

/// GetModel reports a generating model's KV budget from its graph and the configured memory,
/// and what a running stream holds of it; an encoder reports the batch limits timed at load.
#[tokio::test]
async fn reports_the_kv_cache_budget_and_its_use() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("LMSERVE_GENERATION__KV_CACHE_MIB".into(), "1".into())],
        ..Default::default()
    })
    .await;
    let models = server.models().await;
    let describe = |name: &'static str| common::first_version(&models, name);

    // tiny-gpt2 carries 4 layers of keys and values, [batch, 4 heads, past, 32] in float32.
    let per_token = 4 * 2 * 4 * 32 * 4;
    let idle = describe("tiny-gpt2").await.kv_cache.unwrap();
    assert_eq!(idle.bytes_per_token, per_token);
    assert_eq!(idle.budget_tokens, (1 << 20) / per_token);
    assert_eq!(idle.budget_bytes, 1 << 20);
    assert_eq!((idle.used_tokens, idle.used_bytes), (0, 0));

    // A recurrent state does not grow with the sequence: max_total_tokens alone limits it.
    let lstm = describe("tiny-lstm").await.kv_cache.unwrap();
    assert_eq!(lstm.bytes_per_token, 0);
    assert_eq!(lstm.budget_tokens, 32_768);
    assert!(describe("tiny-encoder").await.kv_cache.is_none());

    let mut client = server.inference().await;
    let mut stream = client
        .generate_stream(proto::GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(proto::generate_request::Prompt::TokenIds(proto::TokenIds {
                ids: vec![1, 2, 3, 4, 5],
            })),
            parameters: Some(proto::GenerationParameters {
                max_new_tokens: Some(200),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // While it runs, GetModel sees the prompt plus the most it may generate held, or (once it
    // is done) nothing; how exactly admission holds tokens back is the scheduler's unit test.
    let reader = tokio::spawn(async move { while stream.message().await.unwrap().is_some() {} });
    while !reader.is_finished() {
        let running = describe("tiny-gpt2").await.kv_cache.unwrap();
        assert!([0, 205].contains(&running.used_tokens), "{running:?}");
        assert_eq!(running.used_bytes, running.used_tokens * per_token);
    }
    reader.await.unwrap();
    let mut after = describe("tiny-gpt2").await.kv_cache.unwrap();
    for _ in 0..100 {
        if after.used_tokens == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        after = describe("tiny-gpt2").await.kv_cache.unwrap();
    }
    assert_eq!(after.used_tokens, 0);

    // A beam search whose beams together need more than the whole budget is refused up front,
    // not run past it: 4 beams of 5 + 200 tokens reserve 820 of 256.
    let refused = client
        .generate(proto::GenerateRequest {
            model: "tiny-gpt2".into(),
            prompt: Some(proto::generate_request::Prompt::TokenIds(proto::TokenIds {
                ids: vec![1, 2, 3, 4, 5],
            })),
            parameters: Some(proto::GenerationParameters {
                max_new_tokens: Some(200),
                num_beams: 4,
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    for needle in ["parameters.num_beams", "820", "budget of 256"] {
        assert!(refused.message().contains(needle), "{refused:?}");
    }

    let encoder = describe("tiny-encoder").await;
    for name in ["batching.best_batch_size", "batching.best_batch_tokens"] {
        let row = encoder.settings.iter().find(|s| s.name == name).unwrap();
        assert_eq!(row.source, "measured at load");
        assert!(row.value.parse::<usize>().unwrap() >= 1, "{row:?}");
    }
}

/// Tokenize and Detokenize have no model queue: past four calls a core waiting for the
/// tokenizers they are refused at once, rather than queued ahead of inference, which still runs.
#[tokio::test]
async fn a_flood_of_tokenize_calls_is_refused_past_its_bound_and_inference_goes_on() {
    let server = TestServer::start().await;
    let client = server.inference().await;
    let text = "To be, or not to be, that is the question: whether 'tis nobler in the mind \
                to suffer the slings and arrows of outrageous fortune. "
        .repeat(1500);
    // Twice the bound (four a core) and more: some must be refused wherever this runs.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let count = 8 * cores + 16;
    let calls = (0..count).map(|_| {
        let mut client = client.clone();
        let text = text.clone();
        async move {
            client
                .tokenize(TokenizeRequest {
                    model: "tiny-gpt2".into(),
                    text,
                    ..Default::default()
                })
                .await
        }
    });
    let mut embedding = client.clone();
    let embed = embedding.embed(proto::EmbedRequest {
        model: "tiny-encoder".into(),
        texts: vec!["still served".into()],
        ..Default::default()
    });
    let (outcomes, embedded) = tokio::join!(futures::future::join_all(calls), embed);
    assert_eq!(embedded.unwrap().into_inner().embeddings.len(), 1);
    let refused = outcomes.iter().filter(|outcome| outcome.is_err()).count();
    for outcome in &outcomes {
        if let Err(status) = outcome {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert!(
                status.message().contains("the tokenizers are busy"),
                "{}",
                status.message()
            );
        }
    }
    assert!(refused > 0, "all {count} were tokenized at once");
    assert!(refused < count, "none was tokenized");
}
