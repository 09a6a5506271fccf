//! The `lmserve` command: `lmserve serve` runs the server (the default when no command is
//! given); `generate`, `embed` and `classify` are clients of a running server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use lmserve::api::client;
use lmserve::api::proto::GenerationParameters;
use lmserve::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "lmserve",
    version,
    about = "gRPC model server for ONNX language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models in the repository over gRPC.
    Serve(ServeArgs),
    /// Generate text with a running server, printing tokens as they arrive.
    Generate(GenerateArgs),
    /// Embed texts with a running server (one JSON array per line).
    Embed(TextsArgs),
    /// Classify texts with a running server.
    Classify(TextsArgs),
    /// Show what the server makes of a model folder (graph, manifest, settings), without serving.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// A model version folder: model.onnx, tokenizer.json, and model.toml or Hugging Face files.
    dir: PathBuf,
    /// Config file (TOML), for runtime.ort_library; default: ./lmserve.toml when present.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// ONNX Runtime shared library (libonnxruntime.so).
    #[arg(long)]
    ort_library: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Server address.
    #[arg(long, default_value = client::DEFAULT_ADDR)]
    addr: String,
    /// Model, "name" or "name@version".
    #[arg(long, short)]
    model: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    sample: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// The prompt.
    prompt: String,
}

#[derive(clap::Args)]
struct TextsArgs {
    /// Server address.
    #[arg(long, default_value = client::DEFAULT_ADDR)]
    addr: String,
    /// Model, "name" or "name@version".
    #[arg(long, short)]
    model: String,
    /// The texts.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Config file (TOML); default: ./lmserve.toml when present.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC listen address, e.g. 0.0.0.0:50051 (port 0 picks a free port).
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Do not start the metrics exporter.
    #[arg(long, conflicts_with = "metrics_addr")]
    no_metrics: bool,
    /// Model repository folder.
    #[arg(long)]
    repository: Option<PathBuf>,
    /// ONNX Runtime shared library (libonnxruntime.so).
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
}

fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    match value {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("`{other}` is not a log format; use text or json")),
    }
}

impl ServeArgs {
    /// Flags the user gave, as the top configuration layer.
    fn overrides(&self) -> Figment {
        let mut figment = Figment::new();
        if let Some(addr) = self.grpc_addr {
            figment = figment.merge(Serialized::default("server.grpc_addr", addr));
        }
        if let Some(addr) = self.metrics_addr {
            figment = figment.merge(Serialized::default("server.metrics_addr", addr));
        }
        if self.no_metrics {
            figment = figment.merge(Serialized::default(
                "server.metrics_addr",
                Option::<SocketAddr>::None,
            ));
        }
        if let Some(path) = &self.repository {
            figment = figment.merge(Serialized::default("repository.path", path));
        }
        if let Some(path) = &self.ort_library {
            figment = figment.merge(Serialized::default("runtime.ort_library", path));
        }
        if let Some(format) = self.log_format {
            figment = figment.merge(Serialized::default("logging.format", format));
        }
        figment
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => {
            let parameters = GenerationParameters {
                max_new_tokens: Some(args.max_new_tokens),
                do_sample: args.sample.then_some(true),
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                seed: args.seed,
                stop: args.stop,
                ..Default::default()
            };
            run_client(client::generate(
                &args.addr,
                args.model,
                args.prompt,
                parameters,
            ))
        }
        Command::Embed(args) => run_client(client::embed(&args.addr, args.model, args.texts)),
        Command::Classify(args) => run_client(client::classify(&args.addr, args.model, args.texts)),
        Command::Inspect(args) => inspect(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lmserve: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_client(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let mut overrides = Figment::new();
    if let Some(path) = &args.ort_library {
        overrides = overrides.merge(Serialized::default("runtime.ort_library", path));
    }
    let config = Config::load(args.config.as_deref(), overrides)?;
    let environment = lmserve::runtime::library::init(&config.ort_library_candidates())?;
    let report = lmserve::registry::inspect::inspect(environment, &args.dir)?;
    print!("{}", report.text);
    if !report.loads {
        anyhow::bail!("{} would not load", args.dir.display());
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref(), args.overrides())?;
    lmserve::runtime::memory::limit_arenas(config.runtime.malloc_arenas);
    // Before the runtime, logging, ONNX Runtime or the metrics exporter start any thread, so
    // that they all inherit the CPUs left over.
    if let Some(decode) = &config.runtime.decode_cpus {
        lmserve::runtime::placement::reserve_decode_cpus(decode).map_err(anyhow::Error::msg)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let file = Config::file(args.config.as_deref());
    runtime.block_on(lmserve::app::serve(config, file))
}
