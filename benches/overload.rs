//! Overload: Embed and GenerateStream offered at six times what the server can do, to show that
//! admission by time keeps the work it accepts useful. For each workload:
//! 1. full load: as many clients as the model works on at once, back to back, for the
//!    capacity (requests per second) and the latency percentiles at exactly full load;
//! 2. overload: requests arriving at six times the capacity for the same time, each with a
//!    deadline of twice the full-load p99. Goodput counts the requests answered in time.
//!
//! Goals: goodput at least 90% of capacity; admitted p99 at most twice the full-load p99.
//!
//!     cargo bench --bench overload -- [SECONDS]      (`make overload`; default 15 per phase)

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{EmbedRequest, GenerateRequest, GenerationParameters, Truncate};
use tokio::sync::Mutex;
use tonic::Code;
use tonic::transport::Channel;

const OVERLOAD: f64 = 6.0;

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// One kind of request, built for a channel, a sequence number and a deadline.
struct Workload {
    name: &'static str,
    /// Clients that keep the model exactly busy.
    full_load_clients: usize,
    make: Arc<dyn Fn(Channel, usize, Option<Duration>) -> Call + Send + Sync>,
}

fn embed_workload(texts: Arc<Vec<String>>) -> Workload {
    Workload {
        name: "Embed, 16 texts a request, tiny-encoder",
        full_load_clients: 8,
        make: Arc::new(move |channel, i, deadline| {
            let texts: Vec<String> = (0..16)
                .map(|k| texts[(i * 16 + k) % texts.len()].clone())
                .collect();
            Box::pin(async move {
                let mut request = tonic::Request::new(EmbedRequest {
                    model: "tiny-encoder".into(),
                    texts,
                    truncate: Truncate::Right as i32,
                    ..Default::default()
                });
                if let Some(deadline) = deadline {
                    request.set_timeout(deadline);
                }
                InferenceClient::new(channel).embed(request).await.map(drop)
            })
        }),
    }
}

fn generate_workload() -> Workload {
    Workload {
        name: "GenerateStream, 32 tokens, tiny-gpt2",
        full_load_clients: 32,
        make: Arc::new(|channel, i, deadline| {
            Box::pin(async move {
                let mut request = tonic::Request::new(GenerateRequest {
                    model: "tiny-gpt2".into(),
                    prompt: Some(Prompt::Text(
                        ["ROMEO.", "My lord,", "To be, or not"][i % 3].into(),
                    )),
                    parameters: Some(GenerationParameters {
                        max_new_tokens: Some(32),
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                if let Some(deadline) = deadline {
                    request.set_timeout(deadline);
                }
                let mut stream = InferenceClient::new(channel)
                    .generate_stream(request)
                    .await?
                    .into_inner();
                while let Some(message) = stream.next().await {
                    message?;
                }
                Ok(())
            })
        }),
    }
}

/// Outcomes of one phase: latencies of the successes, and counts of the rest.
#[derive(Default)]
struct Outcomes {
    ok: Vec<Duration>,
    refused: usize,
    expired: usize,
    failed: usize,
}

impl Outcomes {
    fn record(&mut self, took: Duration, outcome: Result<(), tonic::Status>) {
        match outcome {
            Ok(()) => self.ok.push(took),
            Err(status) if status.code() == Code::ResourceExhausted => self.refused += 1,
            // tonic's client reports its own timer as CANCELLED.
            Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                self.expired += 1
            }
            Err(status) => {
                if self.failed == 0 {
                    eprintln!("unexpected: {status:?}");
                }
                self.failed += 1;
            }
        }
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.ok.sort();
        self.ok
            .get(((self.ok.len() as f64 * p) as usize).min(self.ok.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

async fn full_load(channel: &Channel, workload: &Workload, span: Duration) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let end = Instant::now() + span;
    let clients = (0..workload.full_load_clients).map(|client| {
        let (channel, make, outcomes) = (
            channel.clone(),
            Arc::clone(&workload.make),
            Arc::clone(&outcomes),
        );
        tokio::spawn(async move {
            let mut i = client * 100_000;
            while Instant::now() < end {
                let started = Instant::now();
                let outcome = make(channel.clone(), i, None).await;
                outcomes.lock().await.record(started.elapsed(), outcome);
                i += 1;
            }
        })
    });
    futures::future::join_all(clients).await;
    Arc::try_unwrap(outcomes).ok().unwrap().into_inner()
}

async fn overload(
    channel: &Channel,
    workload: &Workload,
    span: Duration,
    rate: f64,
    deadline: Duration,
) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + span;
    let mut calls = Vec::new();
    let mut i = 0;
    while Instant::now() < end {
        ticker.tick().await;
        let (channel, make, outcomes) = (
            channel.clone(),
            Arc::clone(&workload.make),
            Arc::clone(&outcomes),
        );
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = make(channel, i, Some(deadline)).await;
            outcomes.lock().await.record(started.elapsed(), outcome);
        }));
        i += 1;
    }
    futures::future::join_all(calls).await;
    Arc::try_unwrap(outcomes).ok().unwrap().into_inner()
}

/// The CPUs this process may use, split in two: the first half for the server, the rest for the
/// clients (on 2 CPUs: "0" and "1").
fn split_cpus() -> (String, String) {
    let output = std::process::Command::new("taskset")
        .args(["-c", "-p", &std::process::id().to_string()])
        .output()
        .expect("taskset");
    let text = String::from_utf8_lossy(&output.stdout);
    let list = text.rsplit(':').next().unwrap_or("").trim().to_owned();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse::<usize>().unwrap()),
        }
    }
    assert!(cpus.len() >= 2, "the overload benchmark needs two CPUs");
    let half = cpus.len() / 2;
    let join = |ids: &[usize]| {
        ids.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    (join(&cpus[..half]), join(&cpus[half..]))
}

/// Moves every thread of process `pid` (and the threads it starts later) onto `cpus`.
fn pin_process(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(15);
    let span = Duration::from_secs(seconds);
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().join("state.json");
    let server =
        common::Server::start(&[("LMSERVE_STATE__PATH", state_path.to_str().unwrap())]).await;
    // The server and its clients on separate CPUs, as they would be on separate machines: at six
    // times the load, a client sharing the server's cores measures its own backlog.
    let (server_cpus, client_cpus) = split_cpus();
    assert!(
        pin_process(server.pid(), &server_cpus) && pin_process(std::process::id(), &client_cpus),
        "taskset could not place the server on {server_cpus} and the clients on {client_cpus}"
    );
    let texts = Arc::new(common::read_lines(&common::root().join("bench/texts.txt")));
    // Several connections, as many clients would have.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(server.channel().await);
    }
    println!(
        "overload: {seconds} s per phase; server on CPUs {server_cpus}, clients on CPUs {client_cpus}"
    );
    for workload in [embed_workload(texts), generate_workload()] {
        // Warm up, then full load.
        full_load(&channels[0], &workload, Duration::from_secs(2)).await;
        let mut full = full_load(&channels[0], &workload, span).await;
        let capacity = full.ok.len() as f64 / span.as_secs_f64();
        let (full_p50, full_p99) = (full.percentile(0.5), full.percentile(0.99));
        let deadline = full_p99 * 2;
        let mut over = overload(&channels[1], &workload, span, capacity * OVERLOAD, deadline).await;
        let goodput = over.ok.len() as f64 / span.as_secs_f64();
        let (p50, p99) = (over.percentile(0.5), over.percentile(0.99));
        println!("\n{}", workload.name);
        println!(
            "  full load ({} clients): {capacity:.1} req/s, p50 {full_p50:.1?}, p99 {full_p99:.1?}",
            workload.full_load_clients
        );
        println!(
            "  offered {:.1} req/s ({OVERLOAD}x) with deadline {deadline:.1?}: goodput {goodput:.1} req/s, admitted p50 {p50:.1?}, p99 {p99:.1?}",
            capacity * OVERLOAD
        );
        println!(
            "  refused at once {}, deadline exceeded {}, other errors {}",
            over.refused, over.expired, over.failed
        );
        println!(
            "  goodput / capacity {:.2} (goal >= 0.90); admitted p99 / full-load p99 {:.2} (goal <= 2.00)",
            goodput / capacity,
            p99.as_secs_f64() / full_p99.as_secs_f64()
        );
    }
}
