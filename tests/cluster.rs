//! What a Kubernetes cluster needs of the server: routes from the config file that every replica
//! reloads and agrees on, Service variables that are not configuration, a state path that is
//! checked at startup, and a health status per model.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{ServerOptions, TestServer, copy_version, run_to_exit};
use futures::future::join_all;
use lmserve::api::proto::{
    self, EmbedRequest, GetRouteRequest, Route, RouteArm, RouteSource, SetRouteRequest, Task,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn repository() -> tempfile::TempDir {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "1");
    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "2");
    repository
}

fn routes_file(weights: (u32, u32)) -> String {
    format!(
        "[routing]\nreload_interval_ms = 100\n\n[routes.vectors]\ntask = \"embed\"\narms = [{{ target = \"w2v@1\", weight = {} }}, {{ target = \"w2v@2\", weight = {} }}]\n",
        weights.0, weights.1
    )
}

async fn replica(repository: &Path, config: &Path) -> TestServer {
    TestServer::start_with(ServerOptions {
        repository: repository.to_owned(),
        args: vec!["--config".into(), config.to_str().unwrap().into()],
        ..Default::default()
    })
    .await
}

/// The route `vectors` as `server` has it now.
async fn vectors_route(server: &TestServer) -> Route {
    server
        .models()
        .await
        .get_route(GetRouteRequest {
            name: "vectors".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The arm each key gets through the route `vectors`.
async fn arms(server: &TestServer, keys: &[String]) -> HashMap<String, String> {
    let client = server.inference().await;
    let mut arms = HashMap::new();
    for chunk in keys.chunks(50) {
        let answers = join_all(chunk.iter().map(|key| {
            let mut client = client.clone();
            let request = EmbedRequest {
                model: "vectors".into(),
                texts: vec!["king".into()],
                route_key: key.clone(),
                ..Default::default()
            };
            async move {
                client
                    .embed(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .served_by
                    .unwrap()
                    .arm
            }
        }))
        .await;
        arms.extend(chunk.iter().cloned().zip(answers));
    }
    arms
}

#[tokio::test]
async fn replicas_agree_on_every_key_and_follow_the_config_file() {
    let repository = repository();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("lmserve.toml");
    std::fs::write(&config, routes_file((50, 50))).unwrap();
    let (first, second) = (
        replica(repository.path(), &config).await,
        replica(repository.path(), &config).await,
    );

    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let (on_first, on_second) = (arms(&first, &keys).await, arms(&second, &keys).await);
    assert_eq!(
        on_first, on_second,
        "the two replicas sent some key to different arms"
    );
    let ones = on_first.values().filter(|arm| *arm == "w2v@1").count();
    assert!((400..=600).contains(&ones), "50/50 split {ones}/1000");

    // The route says where it comes from, and the API may not change it.
    let mut models = first.models().await;
    let route = models
        .get_route(GetRouteRequest {
            name: "vectors".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(route.source, RouteSource::Config as i32);
    let change = SetRouteRequest {
        route: Some(Route {
            name: "vectors".into(),
            task: Task::Embed as i32,
            arms: vec![RouteArm {
                target: "w2v@2".into(),
                weight: 1.0,
            }],
            ..Default::default()
        }),
    };
    let refused = models.set_route(change.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("config file"), "{refused:?}");
    let mine = SetRouteRequest {
        route: Some(Route {
            name: "mine".into(),
            ..change.route.unwrap()
        }),
    };
    let set = models.set_route(mine).await.unwrap().into_inner();
    assert_eq!(set.source, RouteSource::Api as i32);

    // A change to the file reaches both replicas without a restart.
    std::fs::write(&config, routes_file((80, 20))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for server in [&first, &second] {
        loop {
            let route = vectors_route(server).await;
            if route.arms[0].weight == 80.0 {
                break;
            }
            assert!(Instant::now() < deadline, "the config change never arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (after_first, after_second) = (arms(&first, &keys).await, arms(&second, &keys).await);
    assert_eq!(after_first, after_second);
    let moved = keys
        .iter()
        .filter(|key| after_first[*key] != on_first[*key])
        .count();
    let ones = after_first.values().filter(|arm| *arm == "w2v@1").count();
    assert!((700..=900).contains(&ones), "80/20 split {ones}/1000");
    // Weighted rendezvous hashing moves only the keys it must (about 30% here).
    assert!((200..=400).contains(&moved), "{moved} keys moved");
    // The API route stayed on the replica that took it.
    assert!(
        second
            .models()
            .await
            .get_route(GetRouteRequest {
                name: "mine".into()
            })
            .await
            .is_err()
    );
    assert!(
        models
            .get_route(GetRouteRequest {
                name: "mine".into()
            })
            .await
            .is_ok()
    );
}

/// An edit of the routes file that does not fit what is loaded (here an arm on a version not in
/// the repository yet) must not take the route away from every replica: it serves as it was,
/// and the new definition takes over once its target loads.
#[tokio::test]
async fn a_config_edit_that_does_not_fit_leaves_the_route_serving_until_it_does() {
    let repository = repository();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("lmserve.toml");
    std::fs::write(&config, routes_file((50, 50))).unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        args: vec!["--config".into(), config.to_str().unwrap().into()],
        env: vec![("LMSERVE_REPOSITORY__POLL_INTERVAL_MS".into(), "100".into())],
        ..Default::default()
    })
    .await;
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let before = arms(&server, &keys).await;

    let on_three = routes_file((50, 50)).replace("w2v@2", "w2v@3");
    std::fs::write(&config, &on_three).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server
        .stderr()
        .contains("new definition of this route does not fit")
    {
        assert!(Instant::now() < deadline, "the edit was never read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(arms(&server, &keys).await, before, "the route changed");

    copy_version("tiny-word2vec", "1", repository.path(), "w2v", "3");
    loop {
        let route = vectors_route(&server).await;
        if route.arms.iter().any(|arm| arm.target == "w2v@3") {
            break;
        }
        assert!(Instant::now() < deadline, "the edit never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = arms(&server, &keys).await;
    assert!(
        after.values().all(|arm| arm == "w2v@1" || arm == "w2v@3"),
        "{after:?}"
    );
}

#[tokio::test]
async fn kubernetes_service_variables_do_not_stop_startup() {
    let server = TestServer::start_with(ServerOptions {
        env: [
            ("LMSERVE_PORT", "tcp://10.96.0.10:50051"),
            ("LMSERVE_SERVICE_HOST", "10.96.0.10"),
            ("LMSERVE_SERVICE_PORT", "50051"),
            ("LMSERVE_SERVICE_PORT_GRPC", "50051"),
            ("LMSERVE_SERVICE_PORT_METRICS", "9090"),
            ("LMSERVE_PORT_50051_TCP", "tcp://10.96.0.10:50051"),
            ("LMSERVE_PORT_50051_TCP_PROTO", "tcp"),
            ("LMSERVE_PORT_50051_TCP_PORT", "50051"),
            ("LMSERVE_PORT_50051_TCP_ADDR", "10.96.0.10"),
            ("LMSERVE_PORT_9090_TCP", "tcp://10.96.0.10:9090"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    })
    .await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    // A misspelled key is still refused, with the keys that exist.
    let (ok, output) = run_to_exit(
        &["serve", "--grpc-addr", "127.0.0.1:0", "--no-metrics"],
        &[("LMSERVE_BATCHING__MAX_BATCH", "8")],
    );
    assert!(!ok);
    assert!(
        output.contains("max_batch") && output.contains("max_batch_size"),
        "{output}"
    );
}

#[test]
fn an_unwritable_state_path_is_a_startup_error() {
    let folder = tempfile::tempdir().unwrap();
    let blocked = folder.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let path = blocked.join("state.json");
    let (ok, output) = run_to_exit(
        &["serve", "--grpc-addr", "127.0.0.1:0", "--no-metrics"],
        &[("LMSERVE_STATE__PATH", path.to_str().unwrap())],
    );
    assert!(!ok);
    assert!(
        output.contains("state.path") && output.contains("cannot be written"),
        "{output}"
    );
    // "" keeps no state, and starts.
    let (ok, output) = run_to_exit(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--no-metrics",
            "--help",
        ],
        &[("LMSERVE_STATE__PATH", "")],
    );
    assert!(ok, "{output}");
}

#[tokio::test]
async fn each_model_has_a_health_status_and_readiness_can_need_them_all() {
    let repository = repository();
    copy_version("tiny-encoder", "1", repository.path(), "broken", "1");
    std::fs::write(
        repository.path().join("broken/1/model.onnx"),
        b"not a graph",
    )
    .unwrap();
    // With one model failed, "any" is ready and "all" is not; each model says its own state.
    for (ready_when, overall) in [
        ("any", ServingStatus::Serving),
        ("all", ServingStatus::NotServing),
    ] {
        let server = TestServer::start_with(ServerOptions {
            repository: repository.path().to_owned(),
            env: vec![("LMSERVE_SERVER__READY_WHEN".into(), ready_when.into())],
            ready: false,
            ..Default::default()
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.try_health("model/w2v").await != Some(ServingStatus::Serving) {
            assert!(Instant::now() < deadline, "w2v never ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            server.try_health("model/w2v@2").await,
            Some(ServingStatus::Serving)
        );
        assert_eq!(
            server.try_health("model/broken").await,
            Some(ServingStatus::NotServing)
        );
        assert_eq!(
            server.try_health("model/broken@1").await,
            Some(ServingStatus::NotServing)
        );
        assert_eq!(
            server.try_health("liveness").await,
            Some(ServingStatus::Serving)
        );
        assert_eq!(
            server.try_health("").await,
            Some(overall),
            "ready_when = {ready_when}"
        );
        assert_eq!(
            server.try_health("lmserve.v1.Inference").await,
            Some(overall)
        );
        assert_eq!(server.try_health("model/nope").await, None);
    }
    let _ = proto::LoadState::Ready;
}
