//! Embed throughput: the server at concurrency 1, 8 and 32 against the same work done by
//! calling the ONNX Runtime session directly in-process (the limit on this machine).
//!
//! `cargo bench --bench embed` (or `make bench`). Prints texts per second and ratios; server and
//! in-process passes alternate so that drift on a shared machine hits both alike.
//! `EMBED_MODEL_DIR=<repository>/<model>/<version>` benches another encoder, e.g. all-MiniLM-L6-v2
//! from `make real-models`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures::future::join_all;
use lmserve::api::proto::EmbedRequest;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::config::ModelRuntime;
use lmserve::registry::loader::{self, LoadedParts};
use lmserve::runtime::encoder::{self, Embedding, EncoderRow, Pooling};
use lmserve::tasks::text::{self, Truncate};

/// The default model: `models/repository/tiny-encoder/1`.
const DEFAULT_MODEL: &str = "tiny-encoder";
const BATCH: usize = 32;
/// Paired measurements per concurrency; figures are medians.
const REPEATS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One pass over `texts` in-process: tokenize, batch (sorted by length or not), run, pool.
fn in_process(parts: &LoadedParts, texts: &[String], batch: usize, sorted: bool) -> f64 {
    let start = Instant::now();
    let settings = &parts.settings;
    // The same tokenization as the server's: the model's special tokens, cut to its limit.
    let mut ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|text| {
            text::encode(
                &parts.tokenizer,
                text,
                settings.add_special_tokens.value,
                settings.max_length.value,
                Truncate::Right,
            )
            .unwrap()
            .ids
        })
        .collect();
    if sorted {
        ids.sort_by_key(Vec::len);
    }
    for chunk in ids.chunks(batch) {
        let rows: Vec<EncoderRow> = chunk
            .iter()
            .map(|ids| EncoderRow {
                ids: ids.clone(),
                embedding: Some(Embedding::Pool(Pooling::Mean)),
                pool_from: 0,
                logits: false,
                ..EncoderRow::default()
            })
            .collect();
        parts
            .pool
            .each_session(|session| {
                let pad_id = i64::from(settings.pad_token_id.value);
                encoder::run(session, &parts.bindings, pad_id, &rows).map(|_| ())
            })
            .unwrap();
    }
    texts.len() as f64 / start.elapsed().as_secs_f64()
}

/// The version folder benched, its model's name and the repository holding it.
fn target() -> (std::path::PathBuf, String, std::path::PathBuf) {
    let dir = std::env::var_os("EMBED_MODEL_DIR").map_or_else(
        || common::model_dir(DEFAULT_MODEL),
        std::path::PathBuf::from,
    );
    let model = dir.parent().expect("a model folder holds the version");
    let name = model.file_name().unwrap().to_string_lossy().into_owned();
    let repository = model
        .parent()
        .expect("a repository holds the model")
        .to_owned();
    (dir, name, repository)
}

fn main() {
    let (dir, model, repository) = target();
    let texts = Arc::new(common::read_lines(&common::root().join("bench/texts.txt")));
    let environment = common::ort_environment();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "Embed benchmark: {model}, {} texts of 3-150 words per pass, {cores} cores",
        texts.len()
    );

    let mut best: Option<(f64, LoadedParts, usize)> = None;
    for threads in [1, cores] {
        let runtime = ModelRuntime {
            intra_threads: threads,
            sessions: 1,
            narrow_lanes: 0,
            execution_providers: vec!["cpu".into()],
            required_provider: None,
        };
        let parts = loader::load(environment, &repository, &dir, &runtime).expect("load model");
        in_process(&parts, &texts, BATCH, true);
        println!("in-process, {threads} intra-op thread(s):");
        common::print_row(
            "  one text per run",
            median(
                (0..3)
                    .map(|_| in_process(&parts, &texts, 1, false))
                    .collect(),
            ),
            "texts/s",
            None,
        );
        common::print_row(
            &format!("  unsorted batches of {BATCH}"),
            median(
                (0..3)
                    .map(|_| in_process(&parts, &texts, BATCH, false))
                    .collect(),
            ),
            "texts/s",
            None,
        );
        let sorted = median(
            (0..3)
                .map(|_| in_process(&parts, &texts, BATCH, true))
                .collect(),
        );
        common::print_row(
            &format!("  length-sorted batches of {BATCH}"),
            sorted,
            "texts/s",
            None,
        );
        if best.as_ref().is_none_or(|(rate, ..)| sorted > *rate) {
            best = Some((sorted, parts, threads));
        }
    }
    let (_, limit, limit_threads) = best.expect("measured");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let repository_path = repository.to_string_lossy().into_owned();
    let server = runtime.block_on(common::Server::start(&[(
        "LMSERVE_REPOSITORY__PATH",
        &repository_path,
    )]));
    let client = runtime.block_on(async { InferenceClient::new(server.channel().await) });
    let serve = |concurrency: usize| {
        let start = Instant::now();
        // Every caller takes the next text from one counter, so all of them stay busy until the
        // texts run out (a fixed share each left the pass's end below its concurrency).
        let next = Arc::new(AtomicUsize::new(0));
        runtime.block_on(join_all((0..concurrency).map(|_| {
            let mut client = client.clone();
            let model = model.clone();
            let texts = Arc::clone(&texts);
            let next = Arc::clone(&next);
            async move {
                while let Some(text) = texts.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let request = EmbedRequest {
                        model: model.clone(),
                        texts: vec![text.clone()],
                        truncate: 1,
                        ..Default::default()
                    };
                    client.embed(request).await.unwrap();
                }
            }
        })));
        texts.len() as f64 / start.elapsed().as_secs_f64()
    };
    serve(8);
    let defaults = lmserve::config::Config::default();
    let lanes = match defaults.runtime.split_under_load && cores > 1 {
        true => format!(", and {cores} one-thread sessions under load"),
        false => String::new(),
    };
    println!(
        "server (one text per request; defaults: {} session(s) on one shared pool of {cores} threads{lanes}) against length-sorted batches of {BATCH} in-process ({limit_threads} thread(s)):",
        defaults.runtime.sessions_per_model
    );
    for concurrency in [1, 8, 32] {
        let (mut rates, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..REPEATS {
            let baseline = in_process(&limit, &texts, BATCH, true);
            let rate = serve(concurrency);
            rates.push(rate);
            ratios.push(rate / baseline);
        }
        common::print_row(
            &format!("  concurrency {concurrency}"),
            median(rates),
            "texts/s",
            None,
        );
        println!(
            "{:<58} {:>9.2}x of the in-process limit (median of {REPEATS} paired runs)",
            "",
            median(ratios)
        );
    }
}
