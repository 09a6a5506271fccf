//! Routes and model management through the API: weighted sticky A/B arms, shadow traffic,
//! hot reload and unload under load, state that survives a restart.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer, copy_version};
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::models_client::ModelsClient;
use lmserve::api::proto::{
    self, ClassifyRequest, DeleteRouteRequest, EmbedRequest, GenerateRequest, GenerationParameters,
    GetModelRequest, GetRouteRequest, ListRoutesRequest, LoadModelRequest, Route, RouteArm,
    SetRouteRequest, ShadowArm, UnloadModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

fn route(
    name: &str,
    task: proto::Task,
    arms: &[(&str, f64)],
    shadow: Option<(&str, f64)>,
) -> SetRouteRequest {
    SetRouteRequest {
        route: Some(Route {
            name: name.into(),
            task: task as i32,
            arms: arms
                .iter()
                .map(|(target, weight)| RouteArm {
                    target: target.to_string(),
                    weight: *weight,
                })
                .collect(),
            shadow: shadow.map(|(target, percent)| ShadowArm {
                target: target.into(),
                percent,
            }),
            ..Default::default()
        }),
    }
}

fn embed(model: &str, key: &str) -> EmbedRequest {
    EmbedRequest {
        model: model.into(),
        texts: vec!["king".into()],
        route_key: key.into(),
        ..Default::default()
    }
}

/// A repository of two versions of the word-vector model (fast to run) and one encoder.
fn ab_repository() -> tempfile::TempDir {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "1");
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "2");
    copy_version("tiny-encoder", "1", repository.path(), "enc", "1");
    repository
}

async fn start(repository: &Path, env: &[(&str, &str)]) -> TestServer {
    TestServer::start_with(ServerOptions {
        repository: repository.to_owned(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await
}

/// A server that saves its state to `state`, as a restart of it reads it back.
async fn start_saving_to(repository: &Path, state: &Path) -> TestServer {
    start(
        repository,
        &[("LMSERVE_STATE__PATH", state.to_str().unwrap())],
    )
    .await
}

/// The load state of version `version` of `w2v`, when the server lists it.
async fn w2v_state(models: &ModelsClient<Channel>, version: &str) -> Option<i32> {
    let info = models
        .clone()
        .get_model(GetModelRequest { name: "w2v".into() })
        .await
        .unwrap()
        .into_inner();
    info.versions
        .iter()
        .find(|v| v.version == version)
        .map(|v| v.state)
}

/// Waits until version `version` of `w2v` is in `state`, failing with `never` past `deadline`.
async fn wait_for_w2v(
    models: &ModelsClient<Channel>,
    version: &str,
    state: proto::LoadState,
    deadline: Instant,
    never: &str,
) {
    while w2v_state(models, version).await != Some(state as i32) {
        assert!(Instant::now() < deadline, "{never}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shadow copies of `route` that ended with `outcome`, from a metrics scrape.
fn shadow_count(body: &str, route: &str, outcome: &str) -> u64 {
    body.lines()
        .filter(|line| {
            line.starts_with("lmserve_shadow_requests_total{")
                && line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Sends one keyed Embed per key, 32 at a time, and returns the arm each key got.
async fn arms_for(server: &TestServer, route: &str, keys: &[String]) -> HashMap<String, String> {
    let client = server.inference().await;
    let mut arms = HashMap::new();
    for chunk in keys.chunks(32) {
        let answers = join_all(chunk.iter().map(|key| {
            let mut client = client.clone();
            let request = embed(route, key);
            async move {
                client
                    .embed(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .served_by
                    .unwrap()
            }
        }))
        .await;
        for (key, served_by) in chunk.iter().zip(answers) {
            assert_eq!(served_by.route, route);
            assert_eq!(
                format!("{}@{}", served_by.model, served_by.version),
                served_by.arm
            );
            arms.insert(key.clone(), served_by.arm);
        }
    }
    arms
}

#[tokio::test]
async fn keyed_traffic_splits_by_weight_and_sticks() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    models
        .set_route(route(
            "exp",
            proto::Task::Embed,
            &[("w2v@1", 70.0), ("w2v@2", 30.0)],
            None,
        ))
        .await
        .unwrap();

    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let arms = arms_for(&server, "exp", &keys).await;
    let share = arms.values().filter(|arm| *arm == "w2v@1").count() as f64 / keys.len() as f64;
    assert!(
        (share - 0.70).abs() <= 0.02,
        "observed {share:.4} for weight 0.70"
    );

    // The same keys again: every one keeps its arm; the header carries a key as well as the field.
    let again = arms_for(&server, "exp", &keys[..500]).await;
    assert!(keys[..500].iter().all(|key| again[key] == arms[key]));
    let mut client = server.inference().await;
    let mut by_header = tonic::Request::new(embed("exp", ""));
    by_header
        .metadata_mut()
        .insert("x-lmserve-route-key", "user-7".parse().unwrap());
    assert_eq!(
        client
            .embed(by_header)
            .await
            .unwrap()
            .into_inner()
            .served_by
            .unwrap()
            .arm,
        arms["user-7"]
    );

    // A pin header overrides the key.
    let other = if arms["user-7"] == "w2v@1" {
        "w2v@2"
    } else {
        "w2v@1"
    };
    let mut pinned = tonic::Request::new(embed("exp", "user-7"));
    pinned
        .metadata_mut()
        .insert("x-lmserve-route-arm", other.parse().unwrap());
    assert_eq!(
        client
            .embed(pinned)
            .await
            .unwrap()
            .into_inner()
            .served_by
            .unwrap()
            .arm,
        other
    );

    // 90/10 to 80/20 moves about a tenth of the keys, all of them to the arm that grew.
    let sample = &keys[..3000];
    models
        .set_route(route(
            "exp",
            proto::Task::Embed,
            &[("w2v@1", 90.0), ("w2v@2", 10.0)],
            None,
        ))
        .await
        .unwrap();
    let before = arms_for(&server, "exp", sample).await;
    models
        .set_route(route(
            "exp",
            proto::Task::Embed,
            &[("w2v@1", 80.0), ("w2v@2", 20.0)],
            None,
        ))
        .await
        .unwrap();
    let after = arms_for(&server, "exp", sample).await;
    let moved: Vec<&String> = sample
        .iter()
        .filter(|key| before[*key] != after[*key])
        .collect();
    let share = moved.len() as f64 / sample.len() as f64;
    assert!((0.07..=0.12).contains(&share), "moved {share:.4}");
    assert!(moved.iter().all(|key| after[*key] == "w2v@2"));

    // Keyless requests are spread by weight too.
    let mut counts = HashMap::<String, usize>::new();
    for _ in 0..400 {
        let arm = client
            .embed(embed("exp", ""))
            .await
            .unwrap()
            .into_inner()
            .served_by
            .unwrap()
            .arm;
        *counts.entry(arm).or_default() += 1;
    }
    assert!(counts.get("w2v@2").copied().unwrap_or(0) > 40, "{counts:?}");
}

#[tokio::test]
async fn shadow_failures_and_slowness_never_reach_the_caller() {
    let repository = ab_repository();
    copy_version("tiny-gpt2", "1", repository.path(), "gen", "1");
    copy_version("tiny-gpt2", "1", repository.path(), "short", "1");
    // The shadow's context is too small for the prompts below, so every shadow copy fails.
    let manifest = repository.path().join("short/1/model.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("max_length = 256", "max_length = 4");
    std::fs::write(&manifest, text).unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        env: vec![("LMSERVE_ROUTING__SHADOW_CONCURRENCY".into(), "1".into())],
        args: vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
        ..Default::default()
    })
    .await;
    let mut models = server.models().await;
    models
        .set_route(route(
            "chat",
            proto::Task::Generate,
            &[("gen@1", 1.0)],
            Some(("short@1", 100.0)),
        ))
        .await
        .unwrap();
    // The slow encoder shadows a fast model: with room for one shadow at a time, most copies are dropped.
    models
        .set_route(route(
            "vectors",
            proto::Task::Embed,
            &[("w2v@1", 1.0)],
            Some(("enc@1", 100.0)),
        ))
        .await
        .unwrap();

    let client = server.inference().await;
    let request = GenerateRequest {
        model: "chat".into(),
        prompt: Some(Prompt::Text(
            "To be, or not to be, that is the question".into(),
        )),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(5),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    for _ in 0..3 {
        let response = client
            .clone()
            .generate(request.clone())
            .await
            .unwrap()
            .into_inner();
        let served_by = response.served_by.unwrap();
        assert_eq!(
            (
                served_by.route.as_str(),
                served_by.arm.as_str(),
                served_by.model.as_str()
            ),
            ("chat", "gen@1", "gen")
        );
        assert_eq!(response.sequences[0].tokens.len(), 5);
    }
    // Streams say which route and arm served them, in their first message only.
    let mut stream = client
        .clone()
        .generate_stream(request.clone())
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = futures::StreamExt::next(&mut stream).await {
        messages.push(message.unwrap());
    }
    let served_by = messages[0].served_by.as_ref().unwrap();
    assert_eq!(
        (served_by.route.as_str(), served_by.arm.as_str()),
        ("chat", "gen@1")
    );
    assert!(messages[1..].iter().all(|m| m.served_by.is_none()));

    let long_text = vec!["a long passage to keep the shadow encoder busy ".repeat(20)];
    let answers = join_all((0..64).map(|i| {
        let mut client = client.clone();
        let request = EmbedRequest {
            model: "vectors".into(),
            texts: long_text.clone(),
            route_key: format!("k{i}"),
            ..Default::default()
        };
        async move { client.embed(request).await }
    }))
    .await;
    for answer in answers {
        assert_eq!(answer.unwrap().into_inner().served_by.unwrap().model, "w2v");
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = common::scrape_metrics(metrics_port).await;
    let shadow_count = |route: &str, outcome: &str| shadow_count(&body, route, outcome);
    assert!(shadow_count("chat", "invalid_argument") >= 1, "{body}");
    assert!(shadow_count("vectors", "dropped") >= 1, "{body}");
    assert!(
        body.contains(r#"route="chat",arm="gen@1",task="generate",outcome="ok"} 4"#),
        "{body}"
    );
    assert!(body.contains(r#"lmserve_generated_tokens_total{model="gen",version="1",route="chat",arm="gen@1",task="generate"} 20"#), "{body}");
}

/// A version that shadows itself (an arm that is also the shadow): with room for every copy, a
/// copy that finds the version's own requests waiting is dropped rather than queued ahead of the
/// ones that arrive after it. A shadow that is no arm sees only copies, and runs every one.
#[tokio::test]
async fn a_shadow_copy_never_queues_ahead_of_real_requests() {
    let repository = ab_repository();
    let metrics_port = common::free_port();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        env: vec![("LMSERVE_ROUTING__SHADOW_CONCURRENCY".into(), "64".into())],
        args: vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")],
        ..Default::default()
    })
    .await;
    server
        .models()
        .await
        .set_route(route(
            "echo",
            proto::Task::Embed,
            &[("enc@1", 1.0)],
            Some(("enc@1", 100.0)),
        ))
        .await
        .unwrap();
    server
        .models()
        .await
        .set_route(route(
            "candidate",
            proto::Task::Embed,
            &[("w2v@1", 1.0)],
            Some(("enc@1", 100.0)),
        ))
        .await
        .unwrap();
    let client = server.inference().await;
    for (route_name, model) in [("echo", "enc"), ("candidate", "w2v")] {
        let answers = join_all((0..64).map(|i| {
            let mut client = client.clone();
            let request = EmbedRequest {
                model: route_name.into(),
                texts: vec!["a passage for the encoder and its shadow ".repeat(12)],
                route_key: format!("k{i}"),
                ..Default::default()
            };
            async move { client.embed(request).await }
        }))
        .await;
        for answer in answers {
            assert_eq!(answer.unwrap().into_inner().served_by.unwrap().model, model);
        }
        // The copies still running finish, and give their places back.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let body = common::scrape_metrics(metrics_port).await;
    let count = |route: &str, outcome: &str| shadow_count(&body, route, outcome);
    assert!(count("echo", "busy") >= 1, "{body}");
    assert_eq!(count("echo", "dropped"), 0, "{body}");
    assert_eq!(count("echo", "busy") + count("echo", "ok"), 64, "{body}");
    assert_eq!(count("candidate", "ok"), 64, "{body}");
}

#[tokio::test]
async fn reloads_and_unloads_under_load_lose_no_request() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let client = server.inference().await;
    let stop_at = Instant::now() + Duration::from_secs(4);
    let load = tokio::spawn(async move {
        let workers = (0..8).map(|_| {
            let mut client = client.clone();
            async move {
                let mut served = 0;
                while Instant::now() < stop_at {
                    client
                        .embed(embed("w2v", ""))
                        .await
                        .expect("no request fails during a reload");
                    served += 1;
                }
                served
            }
        });
        join_all(workers).await.into_iter().sum::<usize>()
    });
    let mut models = server.models().await;
    for _ in 0..3 {
        models
            .load_model(LoadModelRequest {
                name: "w2v".into(),
                version: None,
            })
            .await
            .unwrap();
    }
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "3");
    let info = models
        .load_model(LoadModelRequest {
            name: "w2v".into(),
            version: Some(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.versions
            .iter()
            .any(|v| v.version == "3" && v.state == proto::LoadState::Ready as i32)
    );
    models
        .unload_model(UnloadModelRequest {
            name: "w2v".into(),
            version: Some(1),
        })
        .await
        .unwrap();
    models
        .unload_model(UnloadModelRequest {
            name: "w2v".into(),
            version: Some(2),
        })
        .await
        .unwrap();
    let served = load.await.unwrap();
    assert!(served > 50, "only {served} requests ran");
    let info = models
        .get_model(GetModelRequest { name: "w2v".into() })
        .await
        .unwrap()
        .into_inner();
    // The unloaded versions are still listed, as UNLOADED: their folders are there.
    let unloaded = proto::LoadState::Unloaded as i32;
    let ready = proto::LoadState::Ready as i32;
    assert_eq!(
        info.versions
            .iter()
            .map(|v| (v.version.as_str(), v.state))
            .collect::<Vec<_>>(),
        [("1", unloaded), ("2", unloaded), ("3", ready)]
    );
}

#[tokio::test]
async fn the_repository_watch_picks_up_added_and_removed_versions() {
    let repository = ab_repository();
    let server = start(
        repository.path(),
        &[("LMSERVE_REPOSITORY__POLL_INTERVAL_MS", "100")],
    )
    .await;
    let mut models = server.models().await;
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "5");
    let versions = |info: proto::ModelInfo| {
        info.versions
            .into_iter()
            .filter(|v| v.state == proto::LoadState::Ready as i32)
            .map(|v| v.version)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !versions(
        models
            .get_model(GetModelRequest { name: "w2v".into() })
            .await
            .unwrap()
            .into_inner(),
    )
    .contains(&"5".to_string())
    {
        assert!(Instant::now() < deadline, "version 5 never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::remove_dir_all(repository.path().join("w2v/1")).unwrap();
    while versions(
        models
            .get_model(GetModelRequest { name: "w2v".into() })
            .await
            .unwrap()
            .into_inner(),
    )
    .contains(&"1".to_string())
    {
        assert!(Instant::now() < deadline, "version 1 never unloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A version copied into a watched repository can be scanned half-copied: it fails, is loaded
/// again once its files change, and at no point takes a ready server out of rotation, which
/// would take every replica watching the same volume out at once.
#[tokio::test]
async fn a_version_scanned_half_copied_loads_once_complete_and_keeps_the_server_ready() {
    let repository = ab_repository();
    let server = start(
        repository.path(),
        &[
            ("LMSERVE_REPOSITORY__POLL_INTERVAL_MS", "100"),
            ("LMSERVE_SERVER__READY_WHEN", "all"),
        ],
    )
    .await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    let models = server.models().await;
    let source = common::repository().join("tiny-word2vec/1");
    let target = repository.path().join("w2v/6");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(source.join("model.toml"), target.join("model.toml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (failed, ready) = (proto::LoadState::Failed, proto::LoadState::Ready);
    wait_for_w2v(
        &models,
        "6",
        failed,
        deadline,
        "the half-copied version never failed",
    )
    .await;
    // Health follows the registry every 500 ms.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(
        server.health("model/w2v@6").await,
        ServingStatus::NotServing
    );

    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    wait_for_w2v(
        &models,
        "6",
        ready,
        deadline,
        "the completed version never loaded",
    )
    .await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
}

/// A version folder that is still being written to is not loaded: its optional files (a pooling
/// config, a chat template) may be the ones yet to arrive, and a version that loaded without
/// them would serve without them. It loads once its files stop changing.
#[tokio::test]
async fn a_version_folder_still_being_written_loads_once_it_settles() {
    let repository = ab_repository();
    let server = start(
        repository.path(),
        &[
            ("LMSERVE_REPOSITORY__POLL_INTERVAL_MS", "100"),
            ("LMSERVE_REPOSITORY__SETTLE_MS", "1000"),
        ],
    )
    .await;
    let models = server.models().await;
    let state_of_7 = || w2v_state(&models, "7");
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "7");
    let still_arriving = repository.path().join("w2v/7/still-arriving.bin");
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_millis(2500) {
        std::fs::write(&still_arriving, writing.elapsed().as_nanos().to_le_bytes()).unwrap();
        let state = state_of_7().await;
        assert!(
            state.is_none_or(|state| state == proto::LoadState::Unloaded as i32),
            "loaded while being written: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = proto::LoadState::Ready;
    wait_for_w2v(
        &models,
        "7",
        ready,
        deadline,
        "the settled version never loaded",
    )
    .await;
}

/// A LoadModel whose call ends before the load does (its deadline here) still loads the model:
/// the load is not thrown away with the call.
#[tokio::test]
async fn a_load_outlives_the_call_that_started_it() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    models
        .unload_model(UnloadModelRequest {
            name: "enc".into(),
            version: None,
        })
        .await
        .unwrap();
    let mut call = tonic::Request::new(LoadModelRequest {
        name: "enc".into(),
        version: None,
    });
    // The encoder times its batch sizes as it loads, which takes longer than this.
    call.set_timeout(Duration::from_millis(30));
    let ended = models.load_model(call).await.unwrap_err();
    // The server's deadline or the client's own timer, whichever fires first.
    assert!(
        matches!(ended.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{ended:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = models
            .get_model(GetModelRequest { name: "enc".into() })
            .await
            .unwrap()
            .into_inner();
        if info
            .versions
            .iter()
            .any(|v| v.state == proto::LoadState::Ready as i32)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the load was dropped: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SetRoute and UnloadModel racing on one version: whichever wins, no route is left naming a
/// version that is gone (each checks the other's side under the routes lock).
#[tokio::test]
async fn a_route_never_names_a_version_unloaded_beside_it() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let models = server.models().await;
    for round in 0..12 {
        let (mut set, mut unload) = (models.clone(), models.clone());
        let (routed, unloaded) = tokio::join!(
            set.set_route(route("race", proto::Task::Embed, &[("w2v@1", 1.0)], None)),
            unload.unload_model(UnloadModelRequest {
                name: "w2v".into(),
                version: Some(1),
            })
        );
        assert!(
            !(routed.is_ok() && unloaded.is_ok()),
            "round {round}: both the route and the unload went through"
        );
        let mut models = models.clone();
        if routed.is_ok() {
            models
                .delete_route(DeleteRouteRequest {
                    name: "race".into(),
                })
                .await
                .unwrap();
        } else {
            models
                .load_model(LoadModelRequest {
                    name: "w2v".into(),
                    version: Some(1),
                })
                .await
                .unwrap();
        }
    }
}

/// Two unloads racing, one of each version a route reaches through the bare model name: one of
/// them must be refused, or the route would be left with no version to serve.
#[tokio::test]
async fn racing_unloads_never_leave_a_route_without_a_version() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    models
        .set_route(route("bare", proto::Task::Embed, &[("w2v", 1.0)], None))
        .await
        .unwrap();
    let unload = |version| UnloadModelRequest {
        name: "w2v".into(),
        version: Some(version),
    };
    for round in 0..12 {
        let (mut first, mut second) = (models.clone(), models.clone());
        let (one, two) = tokio::join!(
            first.unload_model(unload(1)),
            second.unload_model(unload(2))
        );
        assert!(
            one.is_ok() != two.is_ok(),
            "round {round}: exactly one unload goes through: {one:?} {two:?}"
        );
        let refused = one.err().or(two.err()).unwrap();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("route `bare`"), "{refused:?}");
        let served = server.inference().await.embed(embed("bare", "k")).await;
        assert!(served.is_ok(), "round {round}: {served:?}");
        for version in [1, 2] {
            models
                .load_model(LoadModelRequest {
                    name: "w2v".into(),
                    version: Some(version),
                })
                .await
                .unwrap();
        }
    }
}

/// A version that failed to load cannot serve a route that names the bare model, so it does not
/// count as what is left when another version goes.
#[tokio::test]
async fn a_version_that_failed_to_load_does_not_keep_a_route_served() {
    let repository = ab_repository();
    let broken = repository.path().join("w2v/3");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        common::repository().join("tiny-word2vec/1/model.toml"),
        broken.join("model.toml"),
    )
    .unwrap();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    models
        .set_route(route("bare", proto::Task::Embed, &[("w2v", 1.0)], None))
        .await
        .unwrap();
    let unload = |version| UnloadModelRequest {
        name: "w2v".into(),
        version: Some(version),
    };
    models.unload_model(unload(1)).await.unwrap();
    let refused = models.unload_model(unload(2)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no version left is ready"),
        "{refused:?}"
    );
    let served = server.inference().await.embed(embed("bare", "k")).await;
    assert_eq!(served.unwrap().into_inner().served_by.unwrap().version, "2");
    // The failed version itself may go.
    models.unload_model(unload(3)).await.unwrap();
}

/// A bare name serves each task from the newest ready version that serves it: a newer version
/// that drops a task leaves the older one serving it, by name and through a route of that task,
/// and the older one cannot be unloaded from under such a route. Once no version serves the
/// task, the error names the newest one and what it serves.
#[tokio::test]
async fn a_bare_name_serves_each_task_from_the_newest_version_that_serves_it() {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-encoder", "1", repository.path(), "enc", "1");
    copy_version("tiny-encoder", "1", repository.path(), "enc", "2");
    let manifest = repository.path().join("enc/2/model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let embed_only = text.replace(r#"tasks = ["embed", "classify"]"#, r#"tasks = ["embed"]"#);
    assert_ne!(embed_only, text);
    std::fs::write(&manifest, embed_only).unwrap();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    let mut client = server.inference().await;
    let classify = |model: &str| ClassifyRequest {
        model: model.into(),
        texts: vec!["win a free prize now".into()],
        ..Default::default()
    };
    let version = |served_by: Option<proto::ServedBy>| served_by.unwrap().version;

    let classified = client.classify(classify("enc")).await.unwrap().into_inner();
    assert_eq!(version(classified.served_by), "1");
    let embedded = client.embed(embed("enc", "")).await.unwrap().into_inner();
    assert_eq!(version(embedded.served_by), "2");

    models
        .set_route(route("spam", proto::Task::Classify, &[("enc", 1.0)], None))
        .await
        .unwrap();
    let classified = client
        .classify(classify("spam"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version(classified.served_by), "1");
    let unload = |version| UnloadModelRequest {
        name: "enc".into(),
        version: Some(version),
    };
    let refused = models.unload_model(unload(1)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    for needle in ["route `spam`", "no version left is ready to serve classify"] {
        assert!(
            refused.message().contains(needle),
            "{needle:?}: {refused:?}"
        );
    }
    // Version 2 serves nothing the route needs.
    models.unload_model(unload(2)).await.unwrap();
    models
        .load_model(LoadModelRequest {
            name: "enc".into(),
            version: Some(2),
        })
        .await
        .unwrap();

    models
        .delete_route(DeleteRouteRequest {
            name: "spam".into(),
        })
        .await
        .unwrap();
    models.unload_model(unload(1)).await.unwrap();
    let refused = client.classify(classify("enc")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    for needle in ["enc@2", "does not serve classify", "[embed]"] {
        assert!(
            refused.message().contains(needle),
            "{needle:?}: {refused:?}"
        );
    }
}

/// LoadModel and UnloadModel of one version racing: whichever ends last, what serves and what is
/// saved agree. A load that outlasts the unload serves the version again, rather than filling
/// the slot the unload took out of the registry while the state file says it is loaded.
#[tokio::test]
async fn a_load_racing_an_unload_leaves_serving_and_saved_state_agreeing() {
    let repository = ab_repository();
    let folder = tempfile::tempdir().unwrap();
    let state = folder.path().join("lmserve-state.json");
    let server = start_saving_to(repository.path(), &state).await;
    let models = server.models().await;
    let mut outcomes = (0, 0);
    for round in 0..8_u64 {
        let (mut load, mut unload) = (models.clone(), models.clone());
        let version = || Some(1);
        let (loaded, _) = tokio::join!(
            load.load_model(LoadModelRequest {
                name: "w2v".into(),
                version: version(),
            }),
            async move {
                // Spread over the load's span, so some unloads land while it runs.
                tokio::time::sleep(Duration::from_millis(round * round * 6)).await;
                unload
                    .unload_model(UnloadModelRequest {
                        name: "w2v".into(),
                        version: version(),
                    })
                    .await
            }
        );
        loaded.unwrap();
        let serving = models
            .clone()
            .get_model(GetModelRequest { name: "w2v".into() })
            .await
            .unwrap()
            .into_inner()
            .versions
            .iter()
            .any(|v| v.version == "1" && v.state == proto::LoadState::Ready as i32);
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        let saved_unloaded = saved["unloaded"]
            .as_array()
            .is_some_and(|versions| versions.iter().any(|v| v == "w2v@1"));
        assert_ne!(
            serving, saved_unloaded,
            "round {round}: serving {serving}, saved as unloaded {saved_unloaded}"
        );
        if serving {
            outcomes.0 += 1;
        } else {
            outcomes.1 += 1;
        }
    }
    eprintln!(
        "serving after {} rounds, unloaded after {}",
        outcomes.0, outcomes.1
    );
}

#[tokio::test]
async fn management_errors_name_what_is_wrong() {
    let repository = ab_repository();
    let server = start(repository.path(), &[]).await;
    let mut models = server.models().await;
    for bad in ["../w2v", "w2v/1", "", "..", "a\\\\b"] {
        check(
            models
                .load_model(LoadModelRequest {
                    name: bad.into(),
                    version: None,
                })
                .await,
            Code::InvalidArgument,
            "name",
        );
        check(
            models
                .unload_model(UnloadModelRequest {
                    name: bad.into(),
                    version: None,
                })
                .await,
            Code::InvalidArgument,
            "name",
        );
    }
    check(
        models
            .load_model(LoadModelRequest {
                name: "nope".into(),
                version: None,
            })
            .await,
        Code::NotFound,
        "nope",
    );
    check(
        models
            .load_model(LoadModelRequest {
                name: "w2v".into(),
                version: Some(9),
            })
            .await,
        Code::NotFound,
        "9",
    );
    check(
        models
            .unload_model(UnloadModelRequest {
                name: "w2v".into(),
                version: Some(9),
            })
            .await,
        Code::NotFound,
        "9",
    );

    let setter = models.clone();
    let set = |request| {
        let mut models = setter.clone();
        async move { models.set_route(request).await }
    };
    check(
        set(route(
            "r",
            proto::Task::Embed,
            &[("w2v@1", -1.0), ("w2v@2", 1.0)],
            None,
        ))
        .await,
        Code::InvalidArgument,
        "arms[0].weight",
    );
    check(
        set(route("r", proto::Task::Embed, &[("w2v@1", 0.0)], None)).await,
        Code::InvalidArgument,
        "positive",
    );
    check(
        set(route("r", proto::Task::Embed, &[("w2v@7", 1.0)], None)).await,
        Code::FailedPrecondition,
        "w2v@7",
    );
    check(
        set(route("r", proto::Task::Classify, &[("w2v@1", 1.0)], None)).await,
        Code::FailedPrecondition,
        "classify",
    );
    check(
        set(route("w2v", proto::Task::Embed, &[("w2v@1", 1.0)], None)).await,
        Code::InvalidArgument,
        "model's name",
    );
    check(
        set(route(
            "r",
            proto::Task::Unspecified,
            &[("w2v@1", 1.0)],
            None,
        ))
        .await,
        Code::InvalidArgument,
        "route.task",
    );
    check(
        set(route(
            "r",
            proto::Task::Embed,
            &[("w2v@1", 1.0)],
            Some(("w2v@2", 150.0)),
        ))
        .await,
        Code::InvalidArgument,
        "shadow.percent",
    );
    check(
        models.get_route(GetRouteRequest { name: "r".into() }).await,
        Code::NotFound,
        "r",
    );
    check(
        models
            .delete_route(DeleteRouteRequest { name: "r".into() })
            .await,
        Code::NotFound,
        "r",
    );

    set(route(
        "r",
        proto::Task::Embed,
        &[("w2v@1", 1.0), ("w2v@2", 0.0)],
        None,
    ))
    .await
    .unwrap();
    check(
        models
            .unload_model(UnloadModelRequest {
                name: "w2v".into(),
                version: Some(1),
            })
            .await,
        Code::FailedPrecondition,
        "route `r`",
    );
    check(
        models
            .unload_model(UnloadModelRequest {
                name: "w2v".into(),
                version: None,
            })
            .await,
        Code::FailedPrecondition,
        "route `r`",
    );
    let mut client = server.inference().await;
    check(
        client
            .classify(proto::ClassifyRequest {
                model: "r".into(),
                texts: vec!["x".into()],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "embed",
    );
    let mut pinned = tonic::Request::new(embed("r", ""));
    pinned
        .metadata_mut()
        .insert("x-lmserve-route-arm", "enc@1".parse().unwrap());
    check(
        client.embed(pinned).await,
        Code::InvalidArgument,
        "x-lmserve-route-arm",
    );
    // A pin is bounded like the arm it names, before anything echoes it.
    let mut pinned = tonic::Request::new(embed("r", ""));
    pinned
        .metadata_mut()
        .insert("x-lmserve-route-arm", "a".repeat(4096).parse().unwrap());
    check(
        client.embed(pinned).await,
        Code::InvalidArgument,
        "the x-lmserve-route-arm header: 4096 bytes is over the limit of 128 bytes",
    );

    // Deleting the route releases the versions.
    assert_eq!(
        models
            .list_routes(ListRoutesRequest {})
            .await
            .unwrap()
            .into_inner()
            .routes
            .len(),
        1
    );
    models
        .delete_route(DeleteRouteRequest { name: "r".into() })
        .await
        .unwrap();
    models
        .unload_model(UnloadModelRequest {
            name: "w2v".into(),
            version: Some(1),
        })
        .await
        .unwrap();
}

/// A route saved through the API whose target fails to load at the next start is kept in the
/// state file through other changes and through a delete that cannot be saved, and comes back
/// once its target loads.
#[tokio::test]
async fn a_saved_route_waits_for_its_target_and_is_never_dropped_from_the_state() {
    let repository = ab_repository();
    let folder = tempfile::tempdir().unwrap();
    let state = folder.path().join("lmserve-state.json");
    let saved = route("saved", proto::Task::Embed, &[("w2v@1", 1.0)], None);
    {
        let server = start_saving_to(repository.path(), &state).await;
        server.models().await.set_route(saved).await.unwrap();
    }
    let graph = repository.path().join("w2v/1/model.onnx");
    let good = std::fs::read(&graph).unwrap();
    std::fs::write(&graph, b"not a graph").unwrap();
    let server = start_saving_to(repository.path(), &state).await;
    let mut models = server.models().await;
    let get = |name: &str| GetRouteRequest { name: name.into() };
    let missing = models.get_route(get("saved")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // Another change is saved; the waiting route stays in the file.
    models
        .set_route(route("other", proto::Task::Embed, &[("w2v@2", 1.0)], None))
        .await
        .unwrap();
    let file = std::fs::read_to_string(&state).unwrap();
    assert!(
        file.contains("\"saved\"") && file.contains("\"other\""),
        "{file}"
    );
    // Deleting it when the state file cannot be written changes nothing: it still waits.
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir_all(state.join("in-the-way")).unwrap();
    let refused = models
        .delete_route(DeleteRouteRequest {
            name: "saved".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, file).unwrap();

    std::fs::write(&graph, good).unwrap();
    models
        .load_model(LoadModelRequest {
            name: "w2v".into(),
            version: Some(1),
        })
        .await
        .unwrap();
    let restored = models.get_route(get("saved")).await.unwrap().into_inner();
    assert_eq!(restored.arms[0].target, "w2v@1");
}

#[tokio::test]
async fn route_and_load_changes_survive_a_restart() {
    let repository = ab_repository();
    let folder = tempfile::tempdir().unwrap();
    let state = folder.path().join("lmserve-state.json");
    let state_env = state.to_str().unwrap().to_owned();
    {
        let server = start_saving_to(repository.path(), &state).await;
        let mut models = server.models().await;
        models
            .set_route(route(
                "exp",
                proto::Task::Embed,
                &[("w2v@1", 3.0), ("w2v@2", 1.0)],
                Some(("w2v@2", 10.0)),
            ))
            .await
            .unwrap();
        models
            .unload_model(UnloadModelRequest {
                name: "enc".into(),
                version: None,
            })
            .await
            .unwrap();
    }
    let server = start_saving_to(repository.path(), &state).await;
    let mut models = server.models().await;
    let saved = models
        .get_route(GetRouteRequest { name: "exp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        saved
            .arms
            .iter()
            .map(|a| (a.target.as_str(), a.weight))
            .collect::<Vec<_>>(),
        [("w2v@1", 3.0), ("w2v@2", 1.0)]
    );
    assert_eq!(saved.shadow.unwrap().percent, 10.0);
    // The model unloaded before the restart stays unloaded, and is listed as such.
    let enc = models
        .get_model(GetModelRequest { name: "enc".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        enc.versions
            .iter()
            .all(|v| v.state == proto::LoadState::Unloaded as i32),
        "{enc:?}"
    );
    let served = server
        .inference()
        .await
        .embed(embed("exp", "someone"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.served_by.unwrap().route, "exp");
    drop(server);

    // A crash mid-write leaves a temporary file beside the state: it is ignored.
    std::fs::write(
        folder.path().join("lmserve-state.json.tmp"),
        b"{\"routes\": {\"ex",
    )
    .unwrap();
    let server = start_saving_to(repository.path(), &state).await;
    assert!(
        server
            .models()
            .await
            .get_route(GetRouteRequest { name: "exp".into() })
            .await
            .is_ok()
    );
    drop(server);

    // A state file cut short is reported at startup, with its path.
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, &text[..text.len() / 2]).unwrap();
    let (ok, output) =
        common::serve_to_exit(repository.path(), &[("LMSERVE_STATE__PATH", &state_env)]);
    assert!(!ok);
    assert!(
        output.contains("corrupt") && output.contains(&state_env),
        "{output}"
    );
}

fn check<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn routes_from_the_config_file_serve_at_startup() {
    let repository = ab_repository();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("lmserve.toml");
    std::fs::write(
        &config,
        "[routes.vectors]\ntask = \"embed\"\narms = [{ target = \"w2v@1\", weight = 1 }, { target = \"w2v@2\", weight = 0 }]\n\n\
         [routes.broken]\ntask = \"embed\"\narms = [{ target = \"missing@1\", weight = 1 }]\n",
    )
    .unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        args: vec!["--config".into(), config.to_str().unwrap().into()],
        ..Default::default()
    })
    .await;
    let served = server
        .inference()
        .await
        .embed(embed("vectors", "u"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.served_by.unwrap().arm, "w2v@1");
    // A configured route whose arm is missing is left out, with the reason in the log.
    let mut models = server.models().await;
    assert_eq!(
        models
            .get_route(GetRouteRequest {
                name: "broken".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(
        server.stderr().contains("route left out"),
        "{}",
        server.stderr()
    );
}

#[tokio::test]
async fn version_policies_choose_what_loads_and_explicit_loads_persist() {
    let repository = ab_repository();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("lmserve.toml");
    std::fs::write(&config, "[models.w2v]\nversions = \"latest\"\n").unwrap();
    let state = folder.path().join("state.json");
    let options = || ServerOptions {
        repository: repository.path().to_owned(),
        args: vec!["--config".into(), config.to_str().unwrap().into()],
        env: vec![("LMSERVE_STATE__PATH".into(), state.to_str().unwrap().into())],
        ..Default::default()
    };
    // The versions served; the rest of the folder is listed as UNLOADED.
    let versions = |info: proto::ModelInfo| {
        info.versions
            .into_iter()
            .filter(|v| v.state != proto::LoadState::Unloaded as i32)
            .map(|v| v.version)
            .collect::<Vec<_>>()
    };
    {
        let server = TestServer::start_with(options()).await;
        let mut models = server.models().await;
        assert_eq!(
            versions(
                models
                    .get_model(GetModelRequest { name: "w2v".into() })
                    .await
                    .unwrap()
                    .into_inner()
            ),
            ["2"]
        );
        models
            .load_model(LoadModelRequest {
                name: "w2v".into(),
                version: Some(1),
            })
            .await
            .unwrap();
    }
    let server = TestServer::start_with(options()).await;
    let mut models = server.models().await;
    assert_eq!(
        versions(
            models
                .get_model(GetModelRequest { name: "w2v".into() })
                .await
                .unwrap()
                .into_inner()
        ),
        ["1", "2"]
    );
}
