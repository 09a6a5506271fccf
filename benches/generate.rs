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
use ort::value::{DynValue, Tensor};

const MODEL: &str = "tiny-gpt2";
const NEW_TOKENS: usize = 128;
const PROMPTS: [&str; 4] = ["To be, or not to be", "ROMEO.", "My lord, the queen", "What light through yonder window breaks"];

/// The plain greedy loop with a KV cache: what one sequence costs with nothing around it.
fn direct_loop(session: &mut Session, prompts: &[Vec<i64>], layers: usize, heads: usize, head_dim: usize) -> (Duration, Duration) {
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
        .map(|_| Tensor::from_array(([batch, heads, 0, head_dim], Vec::<f32>::new())).unwrap().into_dyn())
        .collect();
    let mut fed: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut columns = width;
    let start = Instant::now();
    let mut first_token = Duration::ZERO;
    let mut input = (ids, [batch, width]);
    let mut position = positions;
    for step in 0..NEW_TOKENS {
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![
            ("input_ids".into(), Tensor::from_array((input.1, input.0.clone())).unwrap().into()),
            ("attention_mask".into(), Tensor::from_array(([batch, columns], mask.clone())).unwrap().into()),
            ("position_ids".into(), Tensor::from_array((input.1, position.clone())).unwrap().into()),
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
                row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best }) as i64
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
        columns += 1;
        position = fed.clone();
        fed.iter_mut().for_each(|f| *f += 1);
        input = (next, [batch, 1]);
    }
    (start.elapsed(), first_token)
}

fn main() {
    let environment = common::ort_environment();
    let dir = common::model_dir(MODEL);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<i64>> = PROMPTS.iter().map(|p| tokenizer.encode(*p, false).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect()).collect();
    let mut session = Session::builder(environment)
        .unwrap()
        .with_intra_threads(cores)
        .unwrap()
        .commit_from_file(dir.join("model.onnx"))
        .unwrap();
    let past = session.inputs().iter().find(|i| i.name() == "past_key_values.0.key").unwrap().dtype().tensor_shape().unwrap().to_vec();
    let layers = session.inputs().iter().filter(|i| i.name().ends_with(".key")).count();
    let (heads, head_dim) = (past[1] as usize, past[3] as usize);

    println!("Generate benchmark: {MODEL}, {NEW_TOKENS} new tokens per sequence, greedy, {cores} cores");
    direct_loop(&mut session, &prompts[..1], layers, heads, head_dim);
    let (elapsed, first) = direct_loop(&mut session, &prompts[..1], layers, heads, head_dim);
    let direct_single = NEW_TOKENS as f64 / elapsed.as_secs_f64();
    common::print_row("in-process greedy loop, 1 sequence", direct_single, "tokens/s", None);
    println!("{:<58} {:>9.2} ms", "  time to first token", first.as_secs_f64() * 1e3);
    let batch16: Vec<Vec<i64>> = (0..16).map(|i| prompts[i % prompts.len()].clone()).collect();
    let (elapsed, _) = direct_loop(&mut session, &batch16, layers, heads, head_dim);
    let direct_static = (16 * NEW_TOKENS) as f64 / elapsed.as_secs_f64();
    common::print_row("in-process greedy loop, static batch of 16", direct_static, "tokens/s", Some((direct_single, "of 1 sequence")));
    drop(session);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let server = common::Server::start(&[("LMSERVE_RUNTIME__INTRA_THREADS", &cores.to_string())]).await;
        let client = InferenceClient::new(server.channel().await);
        let stream_once = |index: usize| {
            let mut client = client.clone();
            async move {
                let request = GenerateRequest {
                    model: MODEL.into(),
                    prompt: Some(Prompt::Text(PROMPTS[index % PROMPTS.len()].into())),
                    parameters: Some(GenerationParameters { max_new_tokens: Some(NEW_TOKENS as u32), ignore_eos: true, ..Default::default() }),
                    truncate_prompt: false,
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
        };
        stream_once(0).await;
        println!("server (GenerateStream, {cores} intra-op threads):");
        let mut single = 0.0;
        for streams in [1, 4, 16] {
            let start = Instant::now();
            let results = join_all((0..streams).map(stream_once)).await;
            let elapsed = start.elapsed().as_secs_f64();
            let tokens: usize = results.iter().map(|r| r.0).sum();
            let rate = tokens as f64 / elapsed;
            let ttft = results.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / streams as f64;
            if streams == 1 {
                single = rate;
                common::print_row("  1 stream", rate, "tokens/s", Some((direct_single, "of the in-process loop")));
            } else {
                common::print_row(&format!("  {streams} streams"), rate, "tokens/s", Some((single, "of 1 stream")));
                common::print_row("", rate, "tokens/s", Some((direct_static, "of the in-process static batch of 16")));
            }
            println!("{:<58} {:>9.2} ms", "    mean time to first token", ttft * 1e3);
        }
    });
}
