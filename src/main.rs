//! The `lmserve` command: `lmserve serve` runs the server (the default when no command is
//! given); `generate`, `chat`, `embed`, `classify`, `models` and `routes` are clients of a
//! running server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use lmserve::api::client;
use lmserve::api::proto::{EarlyStopping, GenerationParameters};
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
    /// Chat with a model that has a chat template: each stdin line is your turn, the reply
    /// streams back, the conversation is kept. EOF or /exit ends it.
    Chat(ChatArgs),
    /// Embed texts with a running server (one JSON array per line).
    Embed(TextsArgs),
    /// Classify texts with a running server.
    Classify(ClassifyArgs),
    /// List, describe, load and unload models on a running server.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// List, show, set and delete routes (A/B tests) on a running server.
    #[command(subcommand)]
    Routes(RoutesCommand),
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

/// How a client command reaches the server.
#[derive(clap::Args)]
struct ServerArgs {
    /// Server address: host:port (plain HTTP/2, as grpcurl -plaintext) or a URL (http://, https://).
    #[arg(long, env = "LMSERVE_ADDR", default_value = client::DEFAULT_ADDR)]
    addr: String,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "LMSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) of a TLS server; a host:port address then means https.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl ServerArgs {
    fn target(self) -> client::Target {
        client::Target {
            addr: self.addr,
            api_key: self.api_key,
            ca_file: self.ca_file,
        }
    }
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Every version of every model in the repository, with its state.
    List(ServerArgs),
    /// One model ("name" or "name@version"): tensors, labels and effective settings.
    Get(ModelArgs),
    /// Load (or reload) a model; the newest version unless --version is given.
    Load(ModelVersionArgs),
    /// Stop serving a model, or one --version of it.
    Unload(ModelVersionArgs),
}

#[derive(clap::Args)]
struct ModelArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Model, "name" or "name@version".
    name: String,
}

#[derive(clap::Args)]
struct ModelVersionArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Model name.
    name: String,
    #[arg(long)]
    version: Option<u64>,
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// Every route, with its arms and where it comes from (config or API).
    List(ServerArgs),
    /// One route.
    Get(RouteNameArgs),
    /// Create or replace a route on this server (per replica; config-file routes cannot be changed).
    Set(SetRouteArgs),
    /// Delete a route set through the API.
    Delete(RouteNameArgs),
}

#[derive(clap::Args)]
struct RouteNameArgs {
    #[command(flatten)]
    server: ServerArgs,
    name: String,
}

#[derive(clap::Args)]
struct SetRouteArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Route name, used in requests' `model` field.
    name: String,
    /// The task every arm serves: generate, embed or classify.
    #[arg(long)]
    task: String,
    /// An arm as target=weight, e.g. tiny-gpt2@1=90 (repeatable).
    #[arg(long = "arm", required = true)]
    arms: Vec<String>,
    /// A shadow arm as target=percent of requests copied to it.
    #[arg(long)]
    shadow: Option<String>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Model, "name" or "name@version".
    #[arg(long, short)]
    model: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Beam search with this many beams (1: none); the text arrives when the search ends.
    #[arg(long, default_value_t = 1)]
    num_beams: u32,
    /// Beam search: finished candidates score sum(log p) / length^length_penalty.
    #[arg(long)]
    length_penalty: Option<f32>,
    /// Beam search: stop as soon as num_beams candidates have finished.
    #[arg(long)]
    early_stopping: bool,
    /// The prompt (for a translation or summarization model, the source text).
    prompt: String,
}

#[derive(clap::Args)]
struct ChatArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Model, "name" or "name@version"; it must have a chat template.
    #[arg(long, short)]
    model: String,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: u32,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How `generate` and `chat` pick tokens.
#[derive(clap::Args)]
struct SamplingArgs {
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
}

impl SamplingArgs {
    fn parameters(self, max_new_tokens: u32) -> GenerationParameters {
        GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            do_sample: self.sample.then_some(true),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
struct TextsArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Model, "name" or "name@version".
    #[arg(long, short)]
    model: String,
    /// The texts.
    #[arg(required = true)]
    texts: Vec<String>,
}

#[derive(clap::Args)]
struct ClassifyArgs {
    #[command(flatten)]
    texts: TextsArgs,
    /// A second text for each text, in order, which a cross-encoder scores with it (repeat
    /// once per text).
    #[arg(long = "pair")]
    pairs: Vec<String>,
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
                num_beams: args.num_beams,
                length_penalty: args.length_penalty,
                early_stopping: if args.early_stopping {
                    EarlyStopping::FirstBeams as i32
                } else {
                    EarlyStopping::Unspecified as i32
                },
                ..args.sampling.parameters(args.max_new_tokens)
            };
            run_client(client::inference::generate(
                &args.server.target(),
                args.model,
                args.prompt,
                parameters,
            ))
        }
        Command::Chat(args) => {
            let options = client::chat::ChatOptions {
                model: args.model,
                system: args.system,
                parameters: args.sampling.parameters(args.max_new_tokens),
            };
            run_client(async move {
                let input = std::io::stdin().lock();
                client::chat::chat(
                    &args.server.target(),
                    options,
                    input,
                    &mut std::io::stdout(),
                )
                .await
            })
        }
        Command::Embed(args) => run_client(client::inference::embed(
            &args.server.target(),
            args.model,
            args.texts,
        )),
        Command::Classify(args) => run_client(client::inference::classify(
            &args.texts.server.target(),
            args.texts.model,
            args.texts.texts,
            args.pairs,
        )),
        Command::Models(command) => run_client(models(command)),
        Command::Routes(command) => run_client(routes(command)),
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

async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    use client::registry;
    match command {
        ModelsCommand::List(server) => registry::list_models(&server.target()).await,
        ModelsCommand::Get(args) => registry::get_model(&args.server.target(), args.name).await,
        ModelsCommand::Load(args) => {
            registry::load_model(&args.server.target(), args.name, args.version).await
        }
        ModelsCommand::Unload(args) => {
            registry::unload_model(&args.server.target(), args.name, args.version).await
        }
    }
}

async fn routes(command: RoutesCommand) -> anyhow::Result<()> {
    use client::registry;
    match command {
        RoutesCommand::List(server) => registry::list_routes(&server.target()).await,
        RoutesCommand::Get(args) => registry::get_route(&args.server.target(), args.name).await,
        RoutesCommand::Set(args) => {
            let spec = registry::RouteSpec {
                name: args.name,
                task: args.task,
                arms: args.arms,
                shadow: args.shadow,
            };
            registry::set_route(&args.server.target(), spec).await
        }
        RoutesCommand::Delete(args) => {
            registry::delete_route(&args.server.target(), args.name).await
        }
    }
}

fn run_client(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    // A client printing into a pipe whose reader has gone (`lmserve models get m | head`) ends
    // quietly, as other command-line tools do, instead of panicking in `println!`. Only the
    // clients: the server keeps Rust's default, where a closed socket is an error to handle.
    #[cfg(unix)]
    // SAFETY: called before this process starts any thread, and SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
    let environment = lmserve::runtime::library::init(&config.ort_library_candidates(), 1)?;
    let report = lmserve::registry::inspect::inspect(environment, &args.dir)?;
    print!("{}", report.text);
    if !report.loads {
        anyhow::bail!("{} would not load", args.dir.display());
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref(), args.overrides())?;
    // Counted while every CPU is still this thread's.
    config.runtime.shared_threads = Some(config.shared_threads());
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
