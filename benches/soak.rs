//! Soak: mixed traffic against the real server, with hot reloads and route changes going on,
//! for a while; prints the server's memory curve and fails (exit 1) on any request that should
//! have succeeded and did not.
//!
//!     cargo bench --bench soak -- [SECONDS]      (`make soak`: 600; `make test` runs 60)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::models_client::ModelsClient;
use lmserve::api::proto::*;
use tokio::sync::Mutex;
use tonic::transport::Channel;

const GENERATORS: [&str; 4] = [
    "tiny-gpt2",
    "tiny-llama",
    "tiny-lstm",
    "tiny-transformer-lm",
];

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Tally {
    async fn record(&self, what: &str, outcome: Result<(), tonic::Status>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(status) = outcome {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_errors.lock().await;
            if first.len() < 10 {
                first.push(format!("{what}: {:?} {}", status.code(), status.message()));
            }
        }
    }
}

/// The server's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn traffic(
    channel: Channel,
    texts: Arc<Vec<String>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut client = InferenceClient::new(channel);
    let mut turn = seed;
    while !stop.load(Ordering::Relaxed) {
        turn = turn
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let pick = |n: usize| (turn >> 33) as usize % n;
        let text = texts[pick(texts.len())].clone();
        match turn % 5 {
            0 | 1 => {
                let model = GENERATORS[pick(GENERATORS.len())];
                let request = GenerateRequest {
                    model: model.into(),
                    prompt: Some(Prompt::Text(text.chars().take(200).collect())),
                    truncate_prompt: true,
                    parameters: Some(GenerationParameters {
                        max_new_tokens: Some(8 + (turn % 56) as u32),
                        do_sample: Some(turn.is_multiple_of(2)),
                        seed: Some(turn),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let outcome = async {
                    let mut stream = client.generate_stream(request).await?.into_inner();
                    while let Some(message) = stream.next().await {
                        message?;
                    }
                    Ok(())
                }
                .await;
                tally.record(model, outcome).await;
            }
            2 => {
                let texts = vec![text; 1 + pick(8)];
                let request = EmbedRequest {
                    model: "tiny-encoder".into(),
                    texts,
                    truncate: Truncate::Right as i32,
                    ..Default::default()
                };
                tally
                    .record("embed", client.embed(request).await.map(drop))
                    .await;
            }
            3 => {
                let request = ClassifyRequest {
                    model: "tiny-encoder".into(),
                    texts: vec![text],
                    truncate: Truncate::Right as i32,
                    ..Default::default()
                };
                tally
                    .record("classify", client.classify(request).await.map(drop))
                    .await;
            }
            _ => {
                let request = EmbedRequest {
                    model: "vectors".into(),
                    texts: vec![text],
                    truncate: Truncate::Right as i32,
                    ..Default::default()
                };
                // Through a route whose arms the reloader keeps reloading.
                tally
                    .record("route", client.embed(request).await.map(drop))
                    .await;
            }
        }
    }
}

/// Reloads models and rewrites the route while traffic runs.
async fn reloads(channel: Channel, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut models = ModelsClient::new(channel);
    let mut round = 0_u64;
    let disabled = std::env::var_os("SOAK_NO_RELOADS").is_some();
    while !stop.load(Ordering::Relaxed) && !disabled {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        round += 1;
        let model = [
            "tiny-encoder",
            "tiny-word2vec",
            GENERATORS[(round % 4) as usize],
        ][(round % 3) as usize];
        let reload = LoadModelRequest {
            name: model.into(),
            version: None,
        };
        tally
            .record("reload", models.load_model(reload).await.map(drop))
            .await;
        let weight = (round % 4) as f64;
        let route = SetRouteRequest {
            route: Some(Route {
                name: "vectors".into(),
                task: Task::Embed as i32,
                arms: vec![
                    RouteArm {
                        target: "tiny-word2vec@1".into(),
                        weight: 1.0,
                    },
                    RouteArm {
                        target: "tiny-encoder@1".into(),
                        weight,
                    },
                ],
                shadow: Some(ShadowArm {
                    target: "tiny-encoder@1".into(),
                    percent: 20.0,
                }),
                ..Default::default()
            }),
        };
        tally
            .record("set route", models.set_route(route).await.map(drop))
            .await;
    }
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(60);
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().join("state.json");
    let server =
        common::Server::start(&[("LMSERVE_STATE__PATH", state_path.to_str().unwrap())]).await;
    let channel = server.channel().await;
    let texts = Arc::new(common::read_lines(&common::root().join("bench/texts.txt")));
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));

    // The route exists before traffic uses it.
    reloads_once(channel.clone()).await;
    let mut workers = Vec::new();
    for seed in 0..4 {
        workers.push(tokio::spawn(traffic(
            channel.clone(),
            Arc::clone(&texts),
            Arc::clone(&tally),
            Arc::clone(&stop),
            seed,
        )));
    }
    workers.push(tokio::spawn(reloads(
        channel.clone(),
        Arc::clone(&tally),
        Arc::clone(&stop),
    )));

    println!(
        "soak: {seconds} s of mixed traffic (generate, embed, classify, a routed embed with shadow) with hot reloads and route changes"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>8}",
        "seconds", "rss MiB", "requests", "errors"
    );
    let started = Instant::now();
    let samples = 10.min(seconds.max(1));
    let mut curve = Vec::new();
    for sample in 1..=samples {
        let until = started + Duration::from_secs(seconds * sample / samples);
        tokio::time::sleep_until(until.into()).await;
        let rss = rss_mib(server.pid());
        curve.push(rss);
        println!(
            "{:>8} {:>10.1} {:>10} {:>8}",
            started.elapsed().as_secs(),
            rss,
            tally.requests.load(Ordering::Relaxed),
            tally.errors.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let (requests, errors) = (
        tally.requests.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    let first = curve.first().copied().unwrap_or_default();
    let last = curve.last().copied().unwrap_or_default();
    println!(
        "soak: {requests} requests, {errors} errors; resident memory {first:.1} MiB after the first sample, {last:.1} MiB at the end ({:+.1} MiB)",
        last - first
    );
    drop(server);
    if errors > 0 {
        for error in tally.first_errors.lock().await.iter() {
            eprintln!("  {error}");
        }
        std::process::exit(1);
    }
}

async fn reloads_once(channel: Channel) {
    let route = SetRouteRequest {
        route: Some(Route {
            name: "vectors".into(),
            task: Task::Embed as i32,
            arms: vec![RouteArm {
                target: "tiny-word2vec@1".into(),
                weight: 1.0,
            }],
            shadow: None,
            ..Default::default()
        }),
    };
    ModelsClient::new(channel)
        .set_route(route)
        .await
        .expect("the soak's route");
}
