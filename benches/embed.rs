//! Embed throughput: the server at concurrency 1, 8 and 32 against the same work done by
//! calling the ONNX Runtime session directly in-process (the limit on this machine).
//!
//! `cargo bench --bench embed` (or `make bench`). Prints sentences per second and ratios.

mod common;

use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use lmserve::api::proto::EmbedRequest;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::config::ModelRuntime;
use lmserve::registry::loader;
use lmserve::runtime::encoder::{self, EncoderRow, Pooling};

const MODEL: &str = "tiny-encoder";
const BATCH: usize = 32;
/// Passes over the corpus per measurement.
const PASSES: usize = 3;

fn main() {
    let texts = common::read_lines(&common::root().join("bench/texts.txt"));
    let environment = common::ort_environment();
    println!("Embed benchmark: {MODEL}, {} texts x {PASSES} passes, {} cores", texts.len(), std::thread::available_parallelism().map_or(1, |n| n.get()));

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut baselines = Vec::new();
    for threads in [1, cores] {
        let runtime = ModelRuntime { intra_threads: threads, sessions: 1, execution_providers: vec!["cpu".into()], required_provider: None };
        let parts = loader::load(environment, &common::model_dir(MODEL), &runtime).expect("load model");
        let tokenize = |text: &str| -> Vec<i64> {
            let ids = parts.tokenizer.encode(text, false).unwrap();
            ids.get_ids().iter().take(parts.manifest.max_length).map(|&id| i64::from(id)).collect()
        };
        let run = |rows: Vec<EncoderRow>| {
            parts.pool.each_session(|session| encoder::run(session, &parts.bindings, parts.pad_id, &rows).map(|_| ())).unwrap();
        };
        let row = |ids: Vec<i64>| EncoderRow { ids, pooling: Some(Pooling::Mean), logits: false };
        let measure = |mut work: Box<dyn FnMut()>| {
            work();
            let start = Instant::now();
            for _ in 0..PASSES {
                work();
            }
            (texts.len() * PASSES) as f64 / start.elapsed().as_secs_f64()
        };
        let one_at_a_time = measure(Box::new(|| {
            for text in &texts {
                run(vec![row(tokenize(text))]);
            }
        }));
        let unsorted = measure(Box::new(|| {
            for chunk in texts.chunks(BATCH) {
                run(chunk.iter().map(|t| row(tokenize(t))).collect());
            }
        }));
        let sorted = measure(Box::new(|| {
            let mut ids: Vec<Vec<i64>> = texts.iter().map(|t| tokenize(t)).collect();
            ids.sort_by_key(Vec::len);
            for chunk in ids.chunks(BATCH) {
                run(chunk.iter().cloned().map(row).collect());
            }
        }));
        println!("in-process, {threads} intra-op thread(s):");
        common::print_row("  one text per run", one_at_a_time, "texts/s", None);
        common::print_row(&format!("  unsorted batches of {BATCH}"), unsorted, "texts/s", None);
        common::print_row(&format!("  length-sorted batches of {BATCH}"), sorted, "texts/s", None);
        baselines.push(sorted);
    }
    let limit = baselines.iter().copied().fold(0.0, f64::max);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let server = common::Server::start(&[]).await;
        let client = InferenceClient::new(server.channel().await);
        let texts = Arc::new(texts);
        println!("server (one text per request, defaults: {} sessions x 1 thread):", lmserve::config::Config::default().runtime.sessions_per_model);
        for concurrency in [1, 8, 32] {
            let pass = || {
                let texts = Arc::clone(&texts);
                let client = client.clone();
                async move {
                    join_all((0..concurrency).map(|worker| {
                        let mut client = client.clone();
                        let texts = Arc::clone(&texts);
                        async move {
                            for text in texts.iter().skip(worker).step_by(concurrency) {
                                let request = EmbedRequest { model: MODEL.into(), texts: vec![text.clone()], truncate: 1, ..Default::default() };
                                client.embed(request).await.unwrap();
                            }
                        }
                    }))
                    .await;
                }
            };
            pass().await;
            let start = Instant::now();
            for _ in 0..PASSES {
                pass().await;
            }
            let rate = (texts.len() * PASSES) as f64 / start.elapsed().as_secs_f64();
            common::print_row(&format!("  concurrency {concurrency}"), rate, "texts/s", Some((limit, "of the in-process length-sorted limit")));
        }
    });
}
