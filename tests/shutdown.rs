//! Shutdown in the order load balancers need, and deadlines that end as DEADLINE_EXCEEDED.

mod common;

use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer};
use futures::StreamExt;
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{
    EmbedRequest, FinishReason, GenerateRequest, GenerateStreamResponse, GenerationParameters,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn generate(model: &str, tokens: u32, n: u32) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: Some(Prompt::Text("ROMEO.".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(tokens),
            ignore_eos: true,
            n,
            // Several greedy sequences would be copies, which the server refuses.
            do_sample: Some(n > 1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn terminate(server: &TestServer) {
    // SAFETY: kill takes no pointers; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) }, 0);
}

async fn collect(
    stream: tonic::Streaming<GenerateStreamResponse>,
) -> (Vec<GenerateStreamResponse>, Option<tonic::Status>) {
    let mut messages = Vec::new();
    let mut stream = stream;
    while let Some(item) = stream.next().await {
        match item {
            Ok(message) => messages.push(message),
            Err(status) => return (messages, Some(status)),
        }
    }
    (messages, None)
}

#[tokio::test]
async fn sigterm_drains_in_the_order_load_balancers_need() {
    let drain = Duration::from_millis(2000);
    let mut server = TestServer::start_with(ServerOptions {
        env: vec![
            (
                "LMSERVE_SERVER__DRAIN_DELAY_MS".into(),
                drain.as_millis().to_string(),
            ),
            ("LMSERVE_SERVER__SHUTDOWN_GRACE_MS".into(), "30000".into()),
        ],
        ..Default::default()
    })
    .await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    // A Watch stream hears changes only, though the statuses are refreshed every 500 ms.
    let quiet = tokio::time::timeout(Duration::from_millis(1200), watch.next()).await;
    assert!(
        quiet.is_err(),
        "Watch sent an unchanged status: {:?}",
        quiet.unwrap()
    );

    // 30 streams in flight, each long enough to outlast the drain delay.
    let mut client = server.inference().await;
    let mut streams = Vec::new();
    for _ in 0..30 {
        let stream = client
            .generate_stream(generate("tiny-transformer-lm", 120, 1))
            .await
            .unwrap();
        streams.push(tokio::spawn(collect(stream.into_inner())));
    }
    let signalled = Instant::now();
    terminate(&server);
    // Health turns NOT_SERVING at once, and Watch streams hear it...
    let update = tokio::time::timeout(Duration::from_millis(500), watch.next())
        .await
        .expect("Watch heard nothing")
        .unwrap()
        .unwrap();
    assert_eq!(update.status, ServingStatus::NotServing as i32);
    let checked = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        checked.into_inner().status,
        ServingStatus::NotServing as i32
    );
    // ...while calls are still served for the drain delay.
    let embedded = client
        .embed(EmbedRequest {
            model: "tiny-encoder".into(),
            texts: vec!["still serving".into()],
            ..Default::default()
        })
        .await;
    assert!(embedded.is_ok(), "{embedded:?}");
    assert!(
        signalled.elapsed() < drain,
        "the check took too long to prove anything"
    );

    // Then the Watch stream ends rather than holding the shutdown...
    let ended = tokio::time::timeout(drain * 4, watch.next())
        .await
        .expect("Watch never ended");
    assert!(matches!(ended, None | Some(Err(_))), "{ended:?}");
    assert!(signalled.elapsed() >= drain);
    // ...and new connections are refused.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await;
    assert!(
        fresh.is_err(),
        "a new connection was accepted after the drain"
    );

    // Every stream in flight finished whole.
    for (messages, status) in join_all(streams).await.into_iter().map(Result::unwrap) {
        assert!(status.is_none(), "a stream was cut: {status:?}");
        let tokens = messages.iter().filter(|m| m.token.is_some()).count();
        assert_eq!(tokens, 120);
        assert_eq!(
            messages.last().unwrap().finish_reason,
            FinishReason::Length as i32
        );
    }
    let exit = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn streams_that_outlive_the_grace_end_with_a_closing_message_and_unavailable() {
    let mut server = TestServer::start_with(ServerOptions {
        env: vec![
            ("LMSERVE_SERVER__DRAIN_DELAY_MS".into(), "0".into()),
            ("LMSERVE_SERVER__SHUTDOWN_GRACE_MS".into(), "300".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut client = server.inference().await;
    // Four sequences of 250 tokens from the model that re-runs its whole sequence each step:
    // seconds of work, far past the grace.
    let stream = client
        .generate_stream(generate("tiny-transformer-lm", 250, 4))
        .await
        .unwrap();
    let following = tokio::spawn(collect(stream.into_inner()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    terminate(&server);
    let (messages, status) = following.await.unwrap();
    let status = status.expect("the stream ended without a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let closing: Vec<_> = messages
        .iter()
        .filter(|m| m.finish_reason == FinishReason::Cancelled as i32)
        .collect();
    assert_eq!(
        closing.len(),
        4,
        "one closing message per unfinished sequence"
    );
    assert!(closing.last().unwrap().timings.is_some());
    let exit = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn deadlines_end_as_deadline_exceeded() {
    let server = TestServer::start().await;
    let mut client = server.inference().await;
    // The client's own timer fires at the same deadline; the server answers a moment before it,
    // and on a loaded machine its answer may still arrive second. So the client may see either;
    // what the server answered is read from its request log.
    let expired = |status: &tonic::Status| {
        status.code() == Code::DeadlineExceeded
            || (status.code() == Code::Cancelled && status.message() == "Timeout expired")
    };
    for _ in 0..5 {
        let mut request = tonic::Request::new(generate("tiny-transformer-lm", 250, 4));
        request.set_timeout(Duration::from_millis(150));
        let status = client.generate(request).await.unwrap_err();
        assert!(expired(&status), "{status:?}");
    }
    let mut request = tonic::Request::new(generate("tiny-transformer-lm", 250, 4));
    request.set_timeout(Duration::from_millis(150));
    let stream = client.generate_stream(request).await.unwrap().into_inner();
    let (_, status) = collect(stream).await;
    assert!(expired(&status.unwrap()));

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = std::fs::read_to_string(&server.stderr_path).unwrap();
        let answered = logs
            .lines()
            .filter(|line| line.contains("lmserve::request") && line.contains("Generate"))
            .filter(|line| line.contains("code=DeadlineExceeded"))
            .count();
        if answered == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{answered} of 6 answered DEADLINE_EXCEEDED:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
