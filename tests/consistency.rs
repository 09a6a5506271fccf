//! State and answers agree: a change that cannot be saved is not applied, a failed load is never
//! saved as loaded, load errors show no server paths or file contents, gauges stay true when
//! calls expire, a request that could not leave the queue in time is refused at once, and a
//! burst after a quiet spell is not.

mod common;

use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer, copy_version};
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::{
    EmbedRequest, GenerateRequest, GenerationParameters, GetModelRequest, GetRouteRequest,
    LoadModelRequest, LoadState, Route, RouteArm, SetRouteRequest, Task, UnloadModelRequest,
};
use tonic::Code;

/// tiny-gpt2 continuing "ROMEO." for exactly `max_new_tokens` tokens.
fn romeo(max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: "tiny-gpt2".into(),
        prompt: Some(Prompt::Text("ROMEO.".into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn state_of(info: &lmserve::api::proto::ModelInfo, version: &str) -> i32 {
    info.versions
        .iter()
        .find(|v| v.version == version)
        .unwrap()
        .state
}

#[tokio::test]
async fn a_change_that_cannot_be_saved_is_not_applied() {
    let folder = tempfile::tempdir().unwrap();
    let state = folder.path().join("state.json");
    let server = TestServer::start_with(ServerOptions {
        env: vec![("LMSERVE_STATE__PATH".into(), state.to_str().unwrap().into())],
        ..Default::default()
    })
    .await;
    // A folder where the state file goes: every write of the file now fails.
    std::fs::create_dir_all(state.join("in-the-way")).unwrap();
    let mut models = server.models().await;
    let route = SetRouteRequest {
        route: Some(Route {
            name: "chat".into(),
            task: Task::Generate as i32,
            arms: vec![RouteArm {
                target: "tiny-gpt2@1".into(),
                weight: 1.0,
            }],
            shadow: None,
            ..Default::default()
        }),
    };
    let status = models.set_route(route.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("not applied"), "{status:?}");
    assert!(
        !status.message().contains(folder.path().to_str().unwrap()),
        "{status:?}"
    );
    let missing = models
        .get_route(GetRouteRequest {
            name: "chat".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);

    let unload = UnloadModelRequest {
        name: "tiny-lstm".into(),
        version: None,
    };
    assert_eq!(
        models
            .unload_model(unload.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Internal
    );
    let info = models
        .get_model(GetModelRequest {
            name: "tiny-lstm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state_of(&info, "1"),
        LoadState::Ready as i32,
        "still served"
    );
    assert!(server.stderr().contains("not applied"));

    // Once the file can be written, the same changes go through.
    std::fs::remove_dir_all(&state).unwrap();
    models.set_route(route).await.unwrap();
    models.unload_model(unload).await.unwrap();
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        saved.contains("chat") && saved.contains("tiny-lstm@1"),
        "{saved}"
    );
}

#[tokio::test]
async fn a_failed_load_is_never_saved_as_loaded_and_unloaded_versions_stay_listed() {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "enc", "1");
    copy_version("tiny-encoder", "1", repository.path(), "enc", "2");
    std::fs::write(repository.path().join("enc/2/model.onnx"), b"not a graph").unwrap();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("lmserve.toml");
    std::fs::write(&config, "[models.enc]\nversions = \"1\"\n").unwrap();
    let state = folder.path().join("state.json");
    let options = || ServerOptions {
        repository: repository.path().to_owned(),
        args: vec!["--config".into(), config.to_str().unwrap().into()],
        env: vec![("LMSERVE_STATE__PATH".into(), state.to_str().unwrap().into())],
        ..Default::default()
    };
    {
        let server = TestServer::start_with(options()).await;
        let mut models = server.models().await;
        let info = models
            .get_model(GetModelRequest { name: "enc".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            state_of(&info, "2"),
            LoadState::Unloaded as i32,
            "left out by its policy"
        );
        let failed = models
            .load_model(LoadModelRequest {
                name: "enc".into(),
                version: Some(2),
            })
            .await
            .unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable);
        // No server path in what the client reads.
        let root = repository.path().to_str().unwrap();
        assert!(!failed.message().contains(root), "{failed:?}");
        let info = models
            .get_model(GetModelRequest { name: "enc".into() })
            .await
            .unwrap()
            .into_inner();
        let version = info.versions.iter().find(|v| v.version == "2").unwrap();
        assert_eq!(version.state, LoadState::Failed as i32);
        assert!(!version.load_error.contains(root), "{}", version.load_error);
        if let Ok(saved) = std::fs::read_to_string(&state) {
            assert!(!saved.contains("enc@2"), "a failed load was saved: {saved}");
        }
    }
    // After a restart the failed version is not retried.
    let server = TestServer::start_with(options()).await;
    let info = server
        .models()
        .await
        .get_model(GetModelRequest { name: "enc".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_of(&info, "1"), LoadState::Ready as i32);
    assert_eq!(state_of(&info, "2"), LoadState::Unloaded as i32);
    assert!(
        !server.stderr().contains("failed to load"),
        "{}",
        server.stderr()
    );
}

#[tokio::test]
async fn files_that_lead_outside_the_repository_are_refused_unread() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.toml");
    std::fs::write(&secret, "family = \"encoder\"\ntop-secret-line = [\n").unwrap();
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "linked", "1");
    let manifest = repository.path().join("linked/1/model.toml");
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink(&secret, &manifest).unwrap();
    // A manifest that does not parse says where, not what the line holds.
    copy_version("tiny-encoder", "1", repository.path(), "garbled", "1");
    std::fs::write(
        repository.path().join("garbled/1/model.toml"),
        "family = \"encoder\"\ntasks = [\"embed\"]\npassword = \"hunter2\" oops\n",
    )
    .unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "good", "1");
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        ..Default::default()
    })
    .await;
    let mut models = server.models().await;
    for (name, needle) in [
        ("linked", "leads outside the model repository"),
        ("garbled", "line 3"),
    ] {
        let info = models
            .get_model(GetModelRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        let error = &info.versions[0].load_error;
        assert_eq!(info.versions[0].state, LoadState::Failed as i32);
        assert!(error.contains(needle), "{name}: {error}");
        for leaked in [
            "top-secret-line",
            "hunter2",
            outside.path().to_str().unwrap(),
            repository.path().to_str().unwrap(),
        ] {
            assert!(!error.contains(leaked), "{name} leaks {leaked:?}: {error}");
        }
    }
    server
        .inference()
        .await
        .embed(EmbedRequest {
            model: "good".into(),
            texts: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_queue_gauge_stays_true_when_calls_expire() {
    let metrics_port = common::free_port();
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
        env: vec![
            ("LMSERVE_RUNTIME__SESSIONS_PER_MODEL".into(), "1".into()),
            ("LMSERVE_BATCHING__MAX_BATCH_SIZE".into(), "1".into()),
        ],
        ..Default::default()
    })
    .await;
    let channel = server.channel().await;
    let text = "spam and ham ".repeat(60);
    let calls = (0..48).map(|_| {
        let mut client =
            lmserve::api::proto::inference_client::InferenceClient::new(channel.clone());
        let text = text.clone();
        async move {
            let mut request = tonic::Request::new(EmbedRequest {
                model: "tiny-encoder".into(),
                texts: vec![text],
                ..Default::default()
            });
            request.set_timeout(Duration::from_millis(15));
            client.embed(request).await.map(drop)
        }
    });
    let results = join_all(calls).await;
    assert!(
        results.iter().any(Result::is_err),
        "no call expired; the test proves nothing"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = common::scrape_metrics(metrics_port).await;
    let depth = body
        .lines()
        .find(|line| line.starts_with("lmserve_queue_depth_texts{model=\"tiny-encoder\""))
        .unwrap_or_else(|| panic!("no queue gauge in\n{body}"));
    assert!(depth.ends_with(" 0"), "{depth}");
}

#[tokio::test]
async fn a_request_that_cannot_start_in_time_is_refused_at_once() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("LMSERVE_GENERATION__MAX_BATCH_SIZE".into(), "1".into()),
            (
                "LMSERVE_GENERATION__MAX_QUEUE_TIME_MS".into(),
                "1000".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let request = || romeo(250);
    // One sequence at a time, a fraction of a second each: a queue of 30 holds seconds of work.
    let channel = server.channel().await;
    let backlog: Vec<_> = (0..30)
        .map(|_| {
            let mut client =
                lmserve::api::proto::inference_client::InferenceClient::new(channel.clone());
            let request = request();
            tokio::spawn(async move { client.generate(request).await.map(drop) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut client = server.inference().await;
    let mut with_deadline = tonic::Request::new(request());
    with_deadline.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let refused = client.generate(with_deadline).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "refused only after {:?}",
        started.elapsed()
    );
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("would wait about"),
        "{refused:?}"
    );
    let pushback: u64 = refused
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a pushback trailer")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0);
    // Without a deadline the server's maximum queue time (1 s here) applies.
    let refused = client.generate(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // What was admitted finishes.
    for outcome in join_all(backlog).await {
        outcome.unwrap().unwrap();
    }
}

/// Admission by time judges a queue by how fast it drains while it holds work: a burst that
/// follows a quiet spell must not read the spell as a slow drain and be refused.
#[tokio::test]
async fn a_burst_after_a_quiet_spell_is_admitted() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![
            ("LMSERVE_BATCHING__MAX_QUEUE_TIME_MS".into(), "200".into()),
            ("LMSERVE_GENERATION__MAX_QUEUE_TIME_MS".into(), "200".into()),
            ("LMSERVE_GENERATION__MAX_BATCH_SIZE".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await;
    let channel = server.channel().await;
    let client = || lmserve::api::proto::inference_client::InferenceClient::new(channel.clone());
    let embed = |text: String| EmbedRequest {
        model: "tiny-encoder".into(),
        texts: vec![text],
        ..Default::default()
    };
    let generate = || romeo(4);
    client().embed(embed("a lone text".into())).await.unwrap();
    client().generate(generate()).await.unwrap();
    // Quiet, within the window the drain rate looks back over.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Callers that each send their next request as soon as the last is answered: the queue
    // holds a few at a time, each served within milliseconds.
    let embedders = (0..8).map(|caller| {
        let mut client = client();
        async move {
            for i in 0..12 {
                let text = format!("caller {caller} sends text {i} ").repeat(1 + i % 4);
                client.embed(embed(text)).await?;
            }
            Ok::<_, tonic::Status>(())
        }
    });
    let generators = (0..4).map(|_| {
        let mut client = client();
        async move {
            for _ in 0..6 {
                client.generate(generate()).await?;
            }
            Ok::<_, tonic::Status>(())
        }
    });
    let (embedded, generated) = tokio::join!(join_all(embedders), join_all(generators));
    for outcome in embedded.into_iter().chain(generated) {
        outcome.unwrap();
    }
}
