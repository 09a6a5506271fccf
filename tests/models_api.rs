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
