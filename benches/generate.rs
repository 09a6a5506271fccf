//! Generation speed: tokens per second and time to first token for one request (unary and
//! streamed) and for 4 and 16 concurrent streams, against the same greedy loop run on an ONNX
//! Runtime session directly in-process: the limit for the model on this machine.
//!
//! Runs on tiny-gpt2, and on the GPT-2-small-sized decoder of `bench/build_models.py` when it
//! has been built (`make bench` builds it). `cargo bench --bench generate` (or `make bench`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use lmserve::api::proto::generate_request::Prompt;
use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::{GenerateRequest, GenerationParameters, TokenIds};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const PROMPTS: [&str; 4] = [
    "To be, or not to be",
    "ROMEO.",
    "My lord, the queen",
    "What light through yonder window breaks",
];
/// Idle time between measured runs, so neither side's ONNX Runtime threads are still spinning
/// down from the previous run when the next one starts.
const SETTLE: Duration = Duration::from_millis(50);

struct Bench {
    name: &'static str,
    repository: PathBuf,
    new_tokens: usize,
    /// Single-request runs alternate (in-process, unary, stream) this many times; each figure
    /// is the median. This VM's speed drifts by tens of percent over seconds, so only runs
    /// taken close together compare.
    rounds: usize,
    /// Repeats of the 4- and 16-stream runs and of the static batch.
    repeats: usize,
}

/// The model's KV-cache shape, read from its inputs.
struct Shape {
    layers: usize,
    heads: usize,
    head_dim: usize,
}

/// The plain greedy loop with a KV cache: what a batch of sequences costs with nothing around
/// it. Returns the elapsed time, the time to the first token, and each row's tokens.
fn direct_loop(
    session: &mut Session,
    prompts: &[Vec<i64>],
    shape: &Shape,
    new_tokens: usize,
) -> (Duration, Duration, Vec<Vec<i64>>) {
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
    let mut past: Vec<DynValue> = (0..shape.layers * 2)
        .map(|_| {
            Tensor::from_array(([batch, shape.heads, 0, shape.head_dim], Vec::<f32>::new()))
                .unwrap()
                .into_dyn()
        })
        .collect();
    let mut fed: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut generated = vec![Vec::with_capacity(new_tokens); batch];
    let start = Instant::now();
    let mut first_token = Duration::ZERO;
    let mut input = (ids, [batch, width]);
    let mut position = positions;
    for step in 0..new_tokens {
        let columns = width + step;
        let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = vec![
            (
                "input_ids".into(),
                Tensor::from_array((input.1, input.0)).unwrap().into(),
            ),
            (
                "attention_mask".into(),
                Tensor::from_array(([batch, columns], mask.clone()))
                    .unwrap()
                    .into(),
            ),
            (
                "position_ids".into(),
                Tensor::from_array((input.1, position)).unwrap().into(),
            ),
        ];
        for (i, value) in past.drain(..).enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2), value.into()));
        }
        let mut outputs = session.run(inputs).unwrap();
        let (dims, logits) = outputs["logits"].try_extract_tensor::<f32>().unwrap();
        let (t, v) = (dims[1] as usize, dims[2] as usize);
        let next: Vec<i64> = (0..batch)
            .map(|r| {
                let row = &logits[(r * t + t - 1) * v..(r * t + t) * v];
                row.iter()
                    .enumerate()
                    .fold(0, |best, (i, x)| if *x > row[best] { i } else { best })
                    as i64
            })
            .collect();
        for layer in 0..shape.layers {
            past.push(outputs.remove(format!("present.{layer}.key")).unwrap());
            past.push(outputs.remove(format!("present.{layer}.value")).unwrap());
        }
        if step == 0 {
            first_token = start.elapsed();
        }
        for (row, &token) in generated.iter_mut().zip(&next) {
            row.push(token);
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
    (start.elapsed(), first_token, generated)
}

fn median(values: Vec<f64>) -> f64 {
    quantile(values, 0.5)
}

/// The value a share `q` of the way up the sorted values.
fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// "0.97x of the in-process loop (...)" for one series of per-round ratios against `baseline`:
/// the median, and the middle half to show how much this machine moved the single rounds.
fn ratio_note(ratios: &[f64], baseline: &str) -> String {
    format!(
        "{:.2}x of {baseline} (median of per-round ratios; middle half {:.2}-{:.2})",
        median(ratios.to_vec()),
        quantile(ratios.to_vec(), 0.25),
        quantile(ratios.to_vec(), 0.75)
    )
}

/// How one section places the work: the intra-op threads of the server's sessions and of the
/// loop's, and whether the server keeps a CPU for its decode thread (`runtime.decode_cpus`), in
/// which case the loop runs on that CPU too and its intra-op helper on the others.
#[derive(Clone, Copy)]
struct Setup {
    threads: usize,
    decode_cpu: Option<usize>,
}

impl Setup {
    fn label(&self) -> String {
        match self.decode_cpu {
            None => format!("{} intra-op thread(s)", self.threads),
            Some(cpu) => format!(
                "{} intra-op thread(s), decode thread on CPU {cpu} (runtime.decode_cpus)",
                self.threads
            ),
        }
    }

    /// The CPUs other than the decode CPU, as taskset writes them.
    fn rest(&self, cpus: &[usize]) -> Option<String> {
        self.decode_cpu
            .map(|cpu| cpu_list(cpus.iter().copied().filter(|&c| c != cpu)))
    }
}

/// CPU ids as taskset takes them: "0,1".
fn cpu_list(cpus: impl IntoIterator<Item = usize>) -> String {
    cpus.into_iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Moves thread `tid` to `cpus`; a run placed other than it says would measure something else.
fn place(tid: u32, cpus: &str) {
    assert!(
        common::pin(tid, cpus),
        "taskset could not move thread {tid} to CPUs {cpus}"
    );
}

/// One section's single-request figures, as medians of per-round ratios.
struct SingleStream {
    setup: Setup,
    /// The server's stream against the loop placed the same way.
    stream_vs_loop: f64,
    /// That loop against the 1-thread loop run in the same rounds (1 for one thread).
    loop_vs_one_thread: f64,
}

/// The limit for the model on this machine is the fastest of the loops; each section's stream
/// against it follows from the paired ratios. Each is taken against a 1-thread loop run in the
/// same rounds and placed the same way in every section (one core, taken in turn), so neither
/// this VM's drift between sections nor its uneven cores move them.
fn print_against_limit(single: &[SingleStream]) {
    let limit = single
        .iter()
        .max_by(|a, b| a.loop_vs_one_thread.total_cmp(&b.loop_vs_one_thread))
        .expect("at least one section");
    println!(
        "\n  the limit for this model here: the in-process loop with {}",
        limit.setup.label()
    );
    for s in single.iter().filter(|s| s.setup.threads != 1) {
        println!(
            "    the loop with {}: {:.2}x of the 1-thread loop",
            s.setup.label(),
            s.loop_vs_one_thread
        );
    }
    for s in single {
        println!(
            "  server GenerateStream, 1 stream, {}: {:.2}x of that limit",
            s.setup.label(),
            s.stream_vs_loop * s.loop_vs_one_thread / limit.loop_vs_one_thread
        );
    }
}

fn request(model: &str, prompt: &[i64], new_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: prompt.iter().map(|&id| id as u32).collect(),
        })),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(new_tokens as u32),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One streamed generation: its tokens and the time to the first one.
async fn stream_once(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
) -> (Vec<i64>, Duration) {
    let start = Instant::now();
    let mut stream = client.generate_stream(request).await.unwrap().into_inner();
    let mut first = None;
    let mut tokens = Vec::new();
    while let Some(message) = stream.next().await {
        if let Some(token) = message.unwrap().token {
            tokens.push(i64::from(token.id));
            first.get_or_insert_with(|| start.elapsed());
        }
    }
    (tokens, first.unwrap_or_default())
}

/// Tokens that `clients` streaming clients receive in `window`, each sending requests back to
/// back, each request of its own length (half to seven eighths of `new_tokens`): sequences join
/// and leave the batch at different steps while `clients` stay in flight, as under steady load.
/// A generation still running when the window closes is cancelled; its tokens so far count.
async fn tokens_in_flight(
    client: &InferenceClient<Channel>,
    model: &str,
    prompts: &[Vec<i64>],
    new_tokens: usize,
    clients: usize,
    window: Duration,
) -> usize {
    let end = Instant::now() + window;
    let received = join_all((0..clients).map(|worker| {
        let mut client = client.clone();
        async move {
            let mut tokens = 0;
            // Each client's requests differ from the others' at every moment.
            for index in (worker..).step_by(clients) {
                if Instant::now() >= end {
                    break;
                }
                let length = new_tokens / 2 + (index % 4) * new_tokens / 8;
                let prompt = &prompts[index % prompts.len()];
                let mut stream = client
                    .generate_stream(request(model, prompt, length))
                    .await
                    .unwrap()
                    .into_inner();
                while let Ok(Some(message)) =
                    tokio::time::timeout_at(end.into(), stream.next()).await
                {
                    tokens += usize::from(message.unwrap().token.is_some());
                }
            }
            tokens
        }
    }));
    received.await.into_iter().sum()
}

/// One unary generation: its tokens.
async fn unary_once(mut client: InferenceClient<Channel>, request: GenerateRequest) -> Vec<i64> {
    let response = client.generate(request).await.unwrap().into_inner();
    response.sequences[0]
        .tokens
        .iter()
        .map(|token| i64::from(token.id))
        .collect()
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("  {name:<44} {value:>9.1} {unit:<9} {note}");
}

fn run_bench(runtime: &Runtime, bench: &Bench, cpus: &[usize]) {
    let cores = cpus.len();
    let environment = common::ort_environment();
    let dir = bench.repository.join(bench.name).join("1");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<i64>> = PROMPTS
        .iter()
        .map(|p| {
            let encoding = tokenizer.encode(*p, false).unwrap();
            encoding.get_ids().iter().map(|&i| i64::from(i)).collect()
        })
        .collect();
    let static_batch = |rows: usize| -> Vec<Vec<i64>> {
        (0..rows)
            .map(|i| prompts[i % prompts.len()].clone())
            .collect()
    };
    let (batch8, batch16) = (static_batch(8), static_batch(16));
    // The in-process baseline keeps ONNX Runtime's defaults (threads spin between runs),
    // which suit a loop that has the machine to itself.
    let build = |threads: usize| {
        Session::builder(environment)
            .unwrap()
            .with_optimization_level(GraphOptimizationLevel::All)
            .unwrap()
            .with_independent_thread_pool()
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
    let shape = Shape {
        layers: probe
            .inputs()
            .iter()
            .filter(|i| i.name().ends_with(".key"))
            .count(),
        heads: past[1] as usize,
        head_dim: past[3] as usize,
    };
    drop(probe);
    let n = bench.new_tokens;

    println!(
        "\n{}: {n} new tokens per sequence, greedy; single-request figures are medians of {} \
         alternating rounds (in-process loop, and with more threads the 1-thread loop too; unary; \
         stream), the rest of {} runs.",
        bench.name, bench.rounds, bench.repeats
    );
    let mut single = Vec::new();
    let mut setups = vec![
        Setup {
            threads: 1,
            decode_cpu: None,
        },
        Setup {
            threads: cores,
            decode_cpu: None,
        },
    ];
    if cores > 1 {
        setups.push(Setup {
            threads: cores,
            decode_cpu: Some(cpus[0]),
        });
    }
    let main_thread = std::process::id();
    let all_cores = cpu_list(cpus.iter().copied());
    for setup in setups {
        let threads = setup.threads;
        let rest = setup.rest(cpus);
        let repository = bench.repository.to_string_lossy().into_owned();
        let (threads_setting, decode_setting) = (
            threads.to_string(),
            setup.decode_cpu.map(|cpu| cpu.to_string()),
        );
        let mut server_env = vec![
            ("LMSERVE_RUNTIME__INTRA_THREADS", threads_setting.as_str()),
            ("LMSERVE_REPOSITORY__PATH", repository.as_str()),
        ];
        if let Some(cpus) = &decode_setting {
            server_env.push(("LMSERVE_RUNTIME__DECODE_CPUS", cpus.as_str()));
        }
        let server = runtime.block_on(common::Server::start(&server_env));
        let client = runtime.block_on(async { InferenceClient::new(server.channel().await) });
        // The loop's intra-op helpers inherit the CPUs of the thread that builds the session (as
        // the server would have, had it started after this).
        if let Some(rest) = &rest {
            place(main_thread, rest);
        }
        let mut session = build(threads);
        // Beside a loop on more threads, the 1-thread loop runs in the same rounds, so the two
        // compare without this machine's drift between sections.
        let mut one_thread = (threads > 1).then(|| build(1));
        // `count` streams; when `arrival_gap` is set, stream i starts i gaps after the first and
        // asks for between half and all of the n tokens, so requests join and leave mid-batch.
        let streams_arriving = |count: usize, arrival_gap: Option<Duration>| {
            let started = Instant::now();
            let results = runtime.block_on(join_all((0..count).map(|index| {
                let prompt = &prompts[index % prompts.len()];
                let (delay, length) = match arrival_gap {
                    None => (Duration::ZERO, n),
                    Some(gap) => (gap * index as u32, n / 2 + (index % 4) * n / 8),
                };
                let stream = stream_once(client.clone(), request(bench.name, prompt, length));
                async move {
                    tokio::time::sleep(delay).await;
                    stream.await
                }
            })));
            let tokens: usize = results.iter().map(|r| r.0.len()).sum();
            let ttft = results.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / count as f64;
            (tokens as f64 / started.elapsed().as_secs_f64(), ttft)
        };
        let streams = |count: usize| streams_arriving(count, None);

        // Warm both paths, and check they agree: greedy decoding is token-identical.
        let (_, _, expected) = direct_loop(&mut session, &prompts[..1], &shape, n);
        if let Some(one_thread) = &mut one_thread {
            direct_loop(one_thread, &prompts[..1], &shape, n);
        }
        let (streamed, _) = runtime.block_on(stream_once(
            client.clone(),
            request(bench.name, &prompts[0], n),
        ));
        assert_eq!(
            streamed, expected[0],
            "the server's tokens differ from the loop's"
        );

        // With one intra-op thread, the loop and the server's decode thread each run on one
        // core, and this VM's cores differ in speed by 10-25% for seconds at a time. So each
        // round puts both on the same core, taking the cores in turn. While the server runs,
        // this process (the client) moves to the other core, where a remote client's work
        // would not be at all; the server's gRPC threads stay free to run on either.
        // With `runtime.decode_cpus`, the server places its own threads, and the loop runs on
        // the decode CPU.
        let decode_threads = if threads == 1 {
            let prefix: String = format!("decode-{}", bench.name).chars().take(15).collect();
            common::threads_named(server.pid(), &prefix)
        } else {
            Vec::new()
        };
        let (mut direct, mut direct_ttft, mut unary, mut stream, mut stream_ttft) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut unary_ratio, mut stream_ratio, mut loop_ratio) = (vec![], vec![], vec![]);
        for round in 0..bench.rounds {
            let core = cpus[round % cores];
            let client_core = cpus[(round + 1) % cores];
            if let [decode_thread] = decode_threads[..] {
                place(main_thread, &core.to_string());
                place(decode_thread, &core.to_string());
            }
            if let Some(cpu) = setup.decode_cpu {
                place(main_thread, &cpu.to_string());
            }
            std::thread::sleep(SETTLE);
            let (elapsed, first, _) = direct_loop(&mut session, &prompts[..1], &shape, n);
            let direct_rate = n as f64 / elapsed.as_secs_f64();
            if let Some(one_thread) = &mut one_thread {
                place(main_thread, &core.to_string());
                std::thread::sleep(SETTLE);
                let (elapsed, _, _) = direct_loop(one_thread, &prompts[..1], &shape, n);
                loop_ratio.push(direct_rate * elapsed.as_secs_f64() / n as f64);
                place(main_thread, &all_cores);
            }
            if !decode_threads.is_empty() {
                place(main_thread, &client_core.to_string());
            }
            if let Some(rest) = &rest {
                place(main_thread, rest);
            }

            std::thread::sleep(SETTLE);
            let started = Instant::now();
            let tokens = runtime.block_on(unary_once(
                client.clone(),
                request(bench.name, &prompts[0], n),
            ));
            let unary_rate = tokens.len() as f64 / started.elapsed().as_secs_f64();
            assert_eq!(tokens, expected[0]);

            std::thread::sleep(SETTLE);
            let (stream_rate, ttft) = streams(1);

            direct.push(direct_rate);
            direct_ttft.push(first.as_secs_f64());
            unary.push(unary_rate);
            stream.push(stream_rate);
            stream_ttft.push(ttft);
            unary_ratio.push(unary_rate / direct_rate);
            stream_ratio.push(stream_rate / direct_rate);
        }
        // Unpinned again, also before the next session's threads are made (they inherit it).
        for &thread in decode_threads.iter().chain([&main_thread]) {
            place(thread, &all_cores);
        }
        if let Some(cpu) = setup.decode_cpu {
            place(main_thread, &cpu.to_string());
        }
        let mut static_rate = |batch: &[Vec<i64>]| {
            median(
                (0..bench.repeats)
                    .map(|_| {
                        std::thread::sleep(SETTLE);
                        let (elapsed, _, _) = direct_loop(&mut session, batch, &shape, n);
                        (batch.len() * n) as f64 / elapsed.as_secs_f64()
                    })
                    .collect(),
            )
        };
        let (direct_static8, direct_static) = (static_rate(&batch8), static_rate(&batch16));
        if let Some(rest) = &rest {
            place(main_thread, rest);
        }
        let (direct, stream) = (median(direct), median(stream));
        single.push(SingleStream {
            setup,
            stream_vs_loop: median(stream_ratio.clone()),
            loop_vs_one_thread: if loop_ratio.is_empty() {
                1.0
            } else {
                median(loop_ratio.clone())
            },
        });

        println!("\n{}:", setup.label());
        row(
            "in-process greedy loop, 1 sequence",
            direct,
            "tokens/s",
            &if loop_ratio.is_empty() {
                String::new()
            } else {
                ratio_note(&loop_ratio, "the 1-thread loop")
            },
        );
        row("  time to first token", median(direct_ttft) * 1e3, "ms", "");
        row(
            "in-process greedy loop, static batch of 8",
            direct_static8,
            "tokens/s",
            &format!("{:.2}x of 1 sequence", direct_static8 / direct),
        );
        row(
            "in-process greedy loop, static batch of 16",
            direct_static,
            "tokens/s",
            &format!("{:.2}x of 1 sequence", direct_static / direct),
        );
        row(
            "server Generate (unary), 1 request",
            median(unary),
            "tokens/s",
            &ratio_note(&unary_ratio, "the in-process loop"),
        );
        row(
            "server GenerateStream, 1 stream",
            stream,
            "tokens/s",
            &ratio_note(&stream_ratio, "the in-process loop"),
        );
        row("  time to first token", median(stream_ttft) * 1e3, "ms", "");
        for count in [4, 16] {
            let runs: Vec<(f64, f64)> = (0..bench.repeats)
                .map(|_| {
                    std::thread::sleep(SETTLE);
                    streams(count)
                })
                .collect();
            let rate = median(runs.iter().map(|r| r.0).collect());
            row(
                &format!("server GenerateStream, {count} streams"),
                rate,
                "tokens/s",
                &format!(
                    "{:.2}x of 1 stream, {:.2}x of the static batch of 16",
                    rate / stream,
                    rate / direct_static
                ),
            );
            row(
                "  mean time to first token",
                median(runs.iter().map(|r| r.1).collect()) * 1e3,
                "ms",
                "",
            );
        }
        // A new request every 4 single-stream steps, each of its own length: fewer sequences in
        // flight on average than a static batch of 16, so the comparison is with one stream.
        let gap = Duration::from_secs_f64(4.0 / stream);
        let runs: Vec<(f64, f64)> = (0..bench.repeats)
            .map(|_| {
                std::thread::sleep(SETTLE);
                streams_arriving(16, Some(gap))
            })
            .collect();
        let rate = median(runs.iter().map(|r| r.0).collect());
        row(
            "server GenerateStream, 16 staggered streams",
            rate,
            "tokens/s",
            &format!(
                "{:.2}x of 1 stream; arrivals {:.1} ms apart, {}-{} tokens each",
                rate / stream,
                gap.as_secs_f64() * 1e3,
                n / 2,
                n / 2 + 3 * n / 8
            ),
        );
        row(
            "  mean time to first token",
            median(runs.iter().map(|r| r.1).collect()) * 1e3,
            "ms",
            "",
        );
        // Steady load: 8 clients each sending requests of different lengths back to back, for
        // 6 full single-stream generations' time; against the static batch of 8 in-process.
        let window = Duration::from_secs_f64(6.0 * n as f64 / stream);
        let rate = median(
            (0..bench.repeats)
                .map(|_| {
                    std::thread::sleep(SETTLE);
                    let tokens = runtime.block_on(tokens_in_flight(
                        &client, bench.name, &prompts, n, 8, window,
                    ));
                    tokens as f64 / window.as_secs_f64()
                })
                .collect(),
        );
        row(
            "server GenerateStream, 8 clients back to back",
            rate,
            "tokens/s",
            &format!(
                "{:.2}x of 1 stream, {:.2}x of the static batch of 8; {}-{} tokens each \
                 (the static rows: {n})",
                rate / stream,
                rate / direct_static8,
                n / 2,
                n / 2 + 3 * n / 8
            ),
        );
        place(main_thread, &all_cores);
    }
    print_against_limit(&single);
}

fn main() {
    let root = common::root();
    let cpus = lmserve::runtime::placement::allowed_cpus()
        .expect("this process's CPUs")
        .ids()
        .to_vec();
    println!(
        "Generate benchmark, {} cores; the client shares them with the server.",
        cpus.len()
    );
    // One client thread, as in `lmserve generate`: the connection and the streams it carries are
    // served where the messages arrive, without waking a second thread per message.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `cargo bench --bench generate -- tiny-gpt2` runs only the benches whose name is given.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let mut benches = vec![Bench {
        name: "tiny-gpt2",
        repository: root.join("models/repository"),
        new_tokens: 128,
        rounds: 61,
        repeats: 7,
    }];
    let large: &Path = &root.join("bench/models");
    if large.join("gpt2-small-untrained/1/model.toml").exists() {
        benches.push(Bench {
            name: "gpt2-small-untrained",
            repository: large.to_path_buf(),
            new_tokens: 32,
            rounds: 7,
            repeats: 3,
        });
    } else {
        println!("(bench/models/gpt2-small-untrained is not built: `make bench-models`)");
    }
    benches.retain(|bench| only.is_empty() || only.iter().any(|name| name == bench.name));
    for bench in &benches {
        run_bench(&runtime, bench, &cpus);
    }
}
