//! Generation speed: tokens per second and time to first token with 1, 4 and 16 concurrent
//! streams, against the same greedy loop run on the ONNX Runtime session directly in-process.
//!
//! `cargo bench --bench generate` (or `make bench`).

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{GenerateRequest, GenerationParameters};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor};

const MODEL: &str = "tiny-gpt2";
const NEW_TOKENS: usize = 128;
/// Each figure is the median of this many runs; one run of a tiny model is too short to trust.
const REPEATS: usize = 7;
const PROMPTS: [&str; 4] = [
    "To be, or not to be",
    "ROMEO.",
    "My lord, the queen",
    "What light through yonder window breaks",
];

/// The plain greedy loop with a KV cache: what one sequence costs with nothing around it.
fn direct_loop(
    session: &mut Session,
    prompts: &[Vec<i64>],
    layers: usize,
    heads: usize,
    head_dim: usize,
) -> (Duration, Duration) {
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut positions = Vec::new();
    for prompt in prompts {
        let pad = width - prompt.len();
        ids.extend(std::iter::repeat_n(0, pad).chain(prompt.iter().copied()));
        mask.extend(std::iter::repeat_n(0_i64, pad).chain(std::iter::repeat_n(1, prompt.len())));
        positions.extend(std::iter::repeat_n(0_i64, pad).chain(0..prompt.len() as i64));
    }
    let mut past: Vec<DynValue> = (0..layers * 2)
        .map(|_| {
            Tensor::from_array(([batch, heads, 0, head_dim], Vec::<f32>::new()))
                .unwrap()
                .into_dyn()
        })
        .collect();
    let mut fed: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let start = Instant::now();
    let mut first_token = Duration::ZERO;
    let mut input = (ids, [batch, width]);
    let mut position = positions;
    for step in 0..NEW_TOKENS {
        let columns = width + step;
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![
            (
                "input_ids".into(),
                Tensor::from_array((input.1, input.0.clone()))
                    .unwrap()
                    .into(),
            ),
            (
                "attention_mask".into(),
                Tensor::from_array(([batch, columns], mask.clone()))
                    .unwrap()
                    .into(),
            ),
            (
                "position_ids".into(),
                Tensor::from_array((input.1, position.clone()))
                    .unwrap()
                    .into(),
            ),
        ];
        for (i, value) in past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2), value.into()));
        }
        let mut outputs = session.run(inputs).unwrap();
        let (shape, logits) = outputs["logits"].try_extract_tensor::<f32>().unwrap();
        let (t, v) = (shape[1] as usize, shape[2] as usize);
        let next: Vec<i64> = (0..batch)
            .map(|r| {
                let row = &logits[(r * t + t - 1) * v..(r * t + t) * v];
                row.iter()
                    .enumerate()
                    .fold(0, |best, (i, x)| if *x > row[best] { i } else { best })
                    as i64
            })
            .collect();
        for layer in 0..layers {
            past.push(outputs.remove(format!("present.{layer}.key")).unwrap());
            past.push(outputs.remove(format!("present.{layer}.value")).unwrap());
        }
        if step == 0 {
            first_token = start.elapsed();
        }
        // Next step: one new column per row.
        let mut new_mask = Vec::with_capacity(batch * (columns + 1));
        for r in 0..batch {
            new_mask.extend_from_slice(&mask[r * columns..(r + 1) * columns]);
            new_mask.push(1);
        }
        mask = new_mask;
        position = fed.clone();
        fed.iter_mut().for_each(|f| *f += 1);
        input = (next, [batch, 1]);
    }
    (start.elapsed(), first_token)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let environment = common::ort_environment();
    let dir = common::model_dir(MODEL);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<i64>> = PROMPTS
        .iter()
        .map(|p| {
            tokenizer
                .encode(*p, false)
                .unwrap()
                .get_ids()
                .iter()
                .map(|&i| i64::from(i))
                .collect()
        })
        .collect();
    let batch16: Vec<Vec<i64>> = (0..16)
        .map(|i| prompts[i % prompts.len()].clone())
        .collect();
    let build = |threads: usize| {
        Session::builder(environment)
            .unwrap()
            .with_optimization_level(GraphOptimizationLevel::All)
            .unwrap()
            .with_intra_threads(threads)
            .unwrap()
            .commit_from_file(dir.join("model.onnx"))
            .unwrap()
    };
    let probe = build(1);
    let past = probe
        .inputs()
        .iter()
        .find(|i| i.name() == "past_key_values.0.key")
        .unwrap()
        .dtype()
        .tensor_shape()
        .unwrap()
        .to_vec();
    let layers = probe
        .inputs()
        .iter()
        .filter(|i| i.name().ends_with(".key"))
        .count();
    let (heads, head_dim) = (past[1] as usize, past[3] as usize);
    drop(probe);

    println!(
        "Generate benchmark: {MODEL}, {NEW_TOKENS} new tokens per sequence, greedy, {cores} cores."
    );
    println!("Server and in-process runs alternate, {REPEATS} of each; figures are medians.");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for threads in [1, cores] {
        let mut session = build(threads);
        let server = runtime.block_on(common::Server::start(&[(
            "LMSERVE_RUNTIME__INTRA_THREADS",
            threads.to_string().as_str(),
        )]));
        let client = runtime.block_on(async { InferenceClient::new(server.channel().await) });
        let streams = |count: usize| {
            let client = client.clone();
            let started = Instant::now();
            let results = runtime.block_on(join_all(
                (0..count).map(|index| stream_once(client.clone(), index)),
            ));
            let tokens: usize = results.iter().map(|r| r.0).sum();
            let ttft = results.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / count as f64;
            (tokens as f64 / started.elapsed().as_secs_f64(), ttft)
        };
        // Warm both paths.
        direct_loop(&mut session, &prompts[..1], layers, heads, head_dim);
        streams(1);

        let (mut direct, mut direct_ttft, mut server_single, mut server_ttft, mut ratios) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..REPEATS {
            let (elapsed, first) =
                direct_loop(&mut session, &prompts[..1], layers, heads, head_dim);
            let rate = NEW_TOKENS as f64 / elapsed.as_secs_f64();
            let (served, ttft) = streams(1);
            ratios.push(served / rate);
            direct.push(rate);
            direct_ttft.push(first.as_secs_f64());
            server_single.push(served);
            server_ttft.push(ttft);
        }
        let direct_static = median(
            (0..REPEATS)
                .map(|_| {
                    (16 * NEW_TOKENS) as f64
                        / direct_loop(&mut session, &batch16, layers, heads, head_dim)
                            .0
                            .as_secs_f64()
                })
                .collect(),
        );
        let single = median(server_single.clone());
        println!("\n{threads} intra-op thread(s):");
        common::print_row(
            "  in-process greedy loop, 1 sequence",
            median(direct.clone()),
            "tokens/s",
            None,
        );
        println!(
            "{:<58} {:>9.2} ms",
            "    time to first token",
            median(direct_ttft) * 1e3
        );
        common::print_row(
            "  in-process greedy loop, static batch of 16",
            direct_static,
            "tokens/s",
            Some((median(direct), "of 1 sequence")),
        );
        common::print_row("  server, 1 stream", single, "tokens/s", None);
        println!(
            "{:<58} {:>9.2}x of the in-process loop (median of paired runs)",
            "",
            median(ratios)
        );
        println!(
            "{:<58} {:>9.2} ms",
            "    mean time to first token",
            median(server_ttft) * 1e3
        );
        for count in [4, 16] {
            let runs: Vec<(f64, f64)> = (0..REPEATS).map(|_| streams(count)).collect();
            let rate = median(runs.iter().map(|r| r.0).collect());
            common::print_row(
                &format!("  server, {count} streams"),
                rate,
                "tokens/s",
                Some((single, "of 1 stream")),
            );
            println!(
                "{:<58} {:>9.2}x of the in-process static batch of 16",
                "",
                rate / direct_static
            );
            println!(
                "{:<58} {:>9.2} ms",
                "    mean time to first token",
                median(runs.iter().map(|r| r.1).collect()) * 1e3
            );
        }
    }
}

/// One streamed generation: (tokens received, time to the first one).
async fn stream_once(
    mut client: InferenceClient<tonic::transport::Channel>,
    index: usize,
) -> (usize, Duration) {
    let request = GenerateRequest {
        model: MODEL.into(),
        prompt: Some(Prompt::Text(PROMPTS[index % PROMPTS.len()].into())),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(NEW_TOKENS as u32),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut first = None;
    let mut tokens = 0;
    while let Some(message) = stream.next().await {
        if message.unwrap().token.is_some() {
            tokens += 1;
            first.get_or_insert_with(|| start.elapsed());
        }
    }
    (tokens, first.unwrap_or_default())
}
