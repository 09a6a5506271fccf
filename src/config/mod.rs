//! Typed configuration, layered by figment: built-in defaults < `lmserve.toml` <
//! `LMSERVE_*` environment < command-line flags. The only module that reads the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub mod cpus;
pub mod limits;
pub mod routes;
pub mod security;

pub use cpus::CpuList;
pub use limits::LimitsConfig;
use routes::RouteConfig;
pub use security::{AuthConfig, TlsConfig};

/// Prefix of every environment variable the server reads as configuration.
pub const ENV_PREFIX: &str = "LMSERVE_";
/// Separates nested keys in environment variables: `LMSERVE_BATCHING__MAX_BATCH_SIZE`.
pub const ENV_NESTING: &str = "__";
/// The `LMSERVE_*` variables that are configuration: nested keys, `LMSERVE_SECTION__KEY`. The
/// others are not, and are left alone: the variables Kubernetes defines for a Service named
/// `lmserve` (`LMSERVE_PORT`, `LMSERVE_SERVICE_HOST`, `LMSERVE_PORT_50051_TCP_ADDR`, ...; port
/// names cannot hold "__"), and the API keys, which the security module reads as a secret.
fn environment() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|key| key.as_str().contains(ENV_NESTING))
        .split(ENV_NESTING)
}

/// Where ort looks for the ONNX Runtime shared library when the config names none.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// Where `make onnxruntime` unpacks the library from the PyPI wheel.
pub const CACHED_ORT_LIBRARY: &str = ".cache/onnxruntime-1.31.1/libonnxruntime.so";
/// The config file read from the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "lmserve.toml";
/// The state file when `state.path` is not set, relative to the working directory (where the
/// default config file is read too).
pub const DEFAULT_STATE_FILE: &str = "lmserve-state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub repository: RepositoryConfig,
    pub runtime: RuntimeConfig,
    pub batching: BatchingConfig,
    pub generation: GenerationConfig,
    pub limits: LimitsConfig,
    pub logging: LoggingConfig,
    pub tracing: TracingConfig,
    pub routing: RoutingConfig,
    pub state: StateConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    /// Per-model overrides of the runtime settings, keyed by model name.
    pub models: BTreeMap<String, ModelOverrides>,
    /// Routes defined at startup, keyed by route name.
    pub routes: BTreeMap<String, RouteConfig>,
}

/// How requests find a route's arm.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// gRPC metadata header carrying the sticky routing key (a request's `route_key` wins).
    pub key_header: String,
    /// gRPC metadata header pinning an arm by target or index, for debugging.
    pub pin_header: String,
    /// Shadow requests running at once; more are dropped (and counted), never queued.
    pub shadow_concurrency: usize,
    /// How often the config file is read again for its `[routes]`, in milliseconds; 0: never.
    /// Kubernetes updates a mounted ConfigMap in place, so every replica picks up a route change
    /// without a restart.
    pub reload_interval_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            key_header: "x-lmserve-route-key".into(),
            pin_header: "x-lmserve-route-arm".into(),
            shadow_concurrency: 4,
            reload_interval_ms: 2_000,
        }
    }
}

/// Where route and load changes made through the API are kept across restarts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// The state file; unset: `lmserve-state.json` in the working directory; `""`: no
    /// persistence.
    pub path: Option<PathBuf>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            path: Some(PathBuf::from(DEFAULT_STATE_FILE)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// Prometheus `/metrics` listen address; unset disables the exporter.
    pub metrics_addr: Option<SocketAddr>,
    /// A listener of its own for the Models service (model management, routes), e.g.
    /// `127.0.0.1:50052`; unset: Models is served on `grpc_addr` with the rest.
    pub admin_addr: Option<SocketAddr>,
    /// Serve gRPC server reflection (v1 and v1alpha).
    pub reflection: bool,
    /// On SIGTERM, health turns NOT_SERVING at once and the server keeps serving this long, the
    /// time a load balancer (a Kubernetes endpoint update) takes to stop sending new calls.
    pub drain_delay_ms: u64,
    /// Then new connections are refused and calls in flight have this long to finish; streams
    /// still running are ended with a closing message and UNAVAILABLE.
    pub shutdown_grace_ms: u64,
    /// When the overall health status ("") is SERVING: once every model version loaded, or
    /// once any did. Each model has a status of its own either way.
    pub ready_when: ReadyWhen,
    /// Most client connections open at once, per listener; more wait in the kernel's backlog
    /// until one closes.
    pub max_connections: usize,
    /// Most connections open at once from one client address, per listener, so that one client
    /// cannot take every place under `max_connections`; its further ones are closed as they
    /// are accepted. 0: no limit but `max_connections`. Behind a proxy or a NAT every client
    /// shares the proxy's address: raise it, or set 0, there.
    pub max_connections_per_client: usize,
    /// How many leading bits of an IPv6 address name one client for
    /// `max_connections_per_client`. 128 (the default): each address is a client, as inside a
    /// cluster, where a node's pods share one /64. 64 on a listener open to the internet, where
    /// one subscriber holds a whole /64 and could otherwise open 256 connections from each of
    /// its addresses.
    pub ipv6_client_prefix: u8,
    /// Most calls in flight on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a
    /// client's further calls wait on its side.
    pub max_streams_per_connection: u32,
    /// A new connection that has not finished its TLS handshake (with TLS) and sent its HTTP/2
    /// preface within this many milliseconds is closed.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 PING interval on idle connections, in milliseconds; a peer that does not answer
    /// within 20 s is dropped. 0: no pings.
    pub keepalive_interval_ms: u64,
    /// A connection older than this many milliseconds is asked to close (HTTP/2 GOAWAY): its
    /// calls in flight go on, its client opens a new one for the next. gRPC's
    /// MAX_CONNECTION_AGE: it spreads long-lived clients over pods added since they connected,
    /// and no connection, idle or stalled, holds its place for ever. 0 (the default): no limit,
    /// because a tonic (Rust) client does not reconnect on the GOAWAY while a call of its is
    /// still open on the connection: its next calls wait for the close, up to the grace.
    pub max_connection_age_ms: u64,
    /// After that, how long its calls in flight may take to finish before the connection is
    /// closed under them.
    pub max_connection_age_grace_ms: u64,
    /// A response whose client has taken nothing more of it for this long (its HTTP/2 window
    /// closed) is dropped, and its stream reset if the client reads again, so a client that
    /// stops widening its window
    /// cannot make the server hold its answers, or the work feeding its streams, for as long
    /// as the connection lives. 0: never.
    pub response_stall_timeout_ms: u64,
    /// A call that has waited this long for more of its request (the rest of a message, or a
    /// unary call's message and the end of its stream) ends DEADLINE_EXCEEDED, so a client
    /// cannot make the server hold part-sent messages (up to the message limit each) for as
    /// long as the connection lives. A stream of requests idle between messages is not
    /// stalled. 0: never.
    pub request_stall_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReadyWhen {
    /// Every version the server loads at startup is ready (none failed, none still loading).
    /// Once it was, the server stays ready while any version is: versions that come later
    /// (a repository scan, LoadModel) would otherwise take every replica out of rotation at
    /// once while they load.
    All,
    /// At least one version is ready.
    Any,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RepositoryConfig {
    /// Folder holding `<model>/<version>/model.toml`.
    pub path: PathBuf,
    /// How often to rescan the folder for added and removed versions, in milliseconds; 0: never.
    pub poll_interval_ms: u64,
    /// A version a rescan finds (or one that failed and changed) loads once rescans have found
    /// its files unchanged for this long, in milliseconds: a folder still being copied in would
    /// otherwise load without the files yet to arrive (a pooling config, a chat template), which
    /// are optional, and serve without them.
    pub settle_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so`; unset: `ORT_DYLIB_PATH`, then the Makefile's cache folder.
    pub ort_library: Option<PathBuf>,
    /// Threads of a session's own intra-op pool. 0 (the default): the session runs on the
    /// process-wide pool of `shared_threads` instead, so a request alone uses every core and
    /// concurrent runs, of any model, split them rather than oversubscribe the host.
    pub intra_threads: usize,
    /// Threads in the process-wide intra-op pool (the calling thread counts as one); unset: one
    /// per CPU the process may use, `decode_cpus` included.
    pub shared_threads: Option<usize>,
    /// Session instances per encoder version; each runs one batch at a time (a generating model
    /// steps one). On the shared pool one is best on a small host: a second session's run
    /// competes for the same threads (measured in bench/RESULTS.md); more help where one run
    /// cannot fill the device, as on a GPU or with sessions of their own threads.
    pub sessions_per_model: usize,
    /// Gives an encoder on the CPU and the shared pool also one single-thread session per
    /// shared-pool thread, holding the same weights once: a batch that runs alone spreads over
    /// every core, and batches under load run side by side on one core each, which need not
    /// meet after every operator (measured in bench/RESULTS.md).
    pub split_under_load: bool,
    /// Execution providers tried in order, e.g. `["cuda:0", "cpu"]`.
    pub execution_providers: Vec<String>,
    /// A provider that must register and serve every model: one of `execution_providers`, and
    /// then the only one tried. When it cannot register (or is not in the list), startup fails
    /// instead of falling back; a model that fails on it for its own reasons fails alone.
    pub required_provider: Option<String>,
    /// CPUs reserved for the decode threads of generating models, e.g. "0" or "0-1"; the rest of
    /// the server runs on the others. Unset: no thread is pinned. Worth setting when the intra-op
    /// threads fill the host, so per-token gRPC work does not preempt the decode thread. Every
    /// generating model's decode thread may use all of them: give as many CPUs as models that
    /// generate at the same time.
    pub decode_cpus: Option<CpuList>,
    /// glibc malloc arenas; unset: one per CPU the process may use (at least 2), which keeps
    /// resident memory flat under load; 0: glibc's default (eight per CPU).
    pub malloc_arenas: Option<usize>,
    /// Session runs of one model version that may fail in a row before the version is marked
    /// FAILED (until it is reloaded); each failure answers only its own batch. 0: never.
    pub max_consecutive_failures: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most rows (texts) in one session run.
    pub max_batch_size: usize,
    /// Most padded tokens (rows × longest row) in one session run.
    pub max_batch_tokens: usize,
    /// How long the first text of a batch waits for company, in microseconds.
    pub max_wait_micros: u64,
    /// Padding a batch may carry, as a share of its real tokens; texts of very different
    /// lengths then run in separate batches instead of padding each other.
    pub max_padding_ratio: f64,
    /// Texts waiting per model before new requests get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// The longest a request may wait in a model's queue, in milliseconds: one expected to wait
    /// longer (or past its own deadline) is refused at once with RESOURCE_EXHAUSTED and a
    /// `grpc-retry-pushback-ms` trailer, before it is tokenized.
    pub max_queue_time_ms: u64,
}

/// Continuous batching and the limits of a Generate request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Most sequences decoded together per model.
    pub max_batch_size: usize,
    /// Most tokens (prompt plus the most each may generate) in flight per model.
    pub max_total_tokens: usize,
    /// Memory one model's KV cache may hold, in MiB: with the model's bytes per token (from its
    /// graph), it caps the tokens in flight below `max_total_tokens`. 0: no byte budget.
    pub kv_cache_mib: usize,
    /// Most waiting sequences prefilled in one run between decode steps.
    pub max_prefill_batch: usize,
    /// How long running sequences may wait for their next token, in milliseconds, while prompts
    /// that arrived during a prefill are prefilled first (each prefill run is one more wait).
    /// 0: a step after every prefill.
    pub max_decode_stall_ms: u64,
    /// Sequences waiting per model before new requests get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// The longest a request may wait to start, in milliseconds; as `[batching]`'s.
    pub max_queue_time_ms: u64,
    /// Tokens generated when a request does not say.
    pub default_max_new_tokens: usize,
    /// Most tokens a request may ask for.
    pub max_new_tokens: usize,
    /// Most sequences (`n`) per request.
    pub max_sequences: usize,
    /// Most stop sequences, and most stop token ids, per request.
    pub max_stop_sequences: usize,
    /// Longest stop sequence, in bytes.
    pub max_stop_sequence_bytes: usize,
    /// Most alternatives (`top_logprobs`) per token.
    pub max_top_logprobs: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_total_tokens: 32_768,
            kv_cache_mib: 1024,
            max_prefill_batch: 8,
            max_decode_stall_ms: 500,
            queue_capacity: 1024,
            max_queue_time_ms: 10_000,
            default_max_new_tokens: 64,
            max_new_tokens: 2048,
            max_sequences: 8,
            max_stop_sequences: 8,
            max_stop_sequence_bytes: 256,
            max_top_logprobs: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info,ort=warn`.
    pub filter: String,
    /// Which finished calls get a request-log line: every call, or only failed ones. Failed
    /// calls are always logged (at warn).
    pub requests: RequestLog,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RequestLog {
    All,
    Errors,
}

/// OpenTelemetry traces, exported over OTLP/gRPC when `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector, e.g. `http://otel-collector:4317`; unset: no spans leave the process.
    pub otlp_endpoint: Option<String>,
    /// `service.name` on every span.
    pub service_name: String,
    /// Share of new traces kept, in [0, 1]. A request whose `traceparent` says sampled (or not)
    /// follows its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "lmserve".to_owned(),
            sample_ratio: 1.0,
        }
    }
}

/// Settings one model may change; unset fields inherit `[runtime]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelOverrides {
    /// Which versions to load: "all" (default), "latest", "latest:N", or a list like "1,3".
    pub versions: Option<String>,
    pub intra_threads: Option<usize>,
    pub sessions_per_model: Option<usize>,
    pub split_under_load: Option<bool>,
    pub execution_providers: Option<Vec<String>>,
    pub required_provider: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            metrics_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            admin_addr: None,
            reflection: true,
            drain_delay_ms: 5_000,
            shutdown_grace_ms: 10_000,
            ready_when: ReadyWhen::Any,
            max_connections: 1024,
            max_connections_per_client: 256,
            ipv6_client_prefix: 128,
            max_streams_per_connection: 256,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 60_000,
            max_connection_age_ms: 0,
            max_connection_age_grace_ms: 5 * 60 * 1000,
            response_stall_timeout_ms: 30_000,
            request_stall_timeout_ms: 30_000,
        }
    }
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("models/repository"),
            poll_interval_ms: 0,
            settle_ms: 2000,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            ort_library: None,
            intra_threads: 0,
            shared_threads: None,
            sessions_per_model: 1,
            split_under_load: true,
            execution_providers: vec!["cpu".to_owned()],
            required_provider: None,
            decode_cpus: None,
            malloc_arenas: None,
            max_consecutive_failures: 5,
        }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 16_384,
            max_wait_micros: 0,
            max_padding_ratio: 0.3,
            queue_capacity: 4096,
            max_queue_time_ms: 2_000,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info,ort=warn".to_owned(),
            requests: RequestLog::All,
        }
    }
}

/// The runtime settings one model version is loaded with, after overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRuntime {
    /// 0: the process-wide pool.
    pub intra_threads: usize,
    pub sessions: usize,
    /// One-thread sessions that share the weights of the first and take batches under load
    /// (`split_under_load`); 0: none. Built only on the CPU provider.
    pub narrow_lanes: usize,
    pub execution_providers: Vec<String>,
    pub required_provider: Option<String>,
}

impl Config {
    /// Layers the config file (when present), the environment and `overrides` over the defaults.
    /// `file` names an explicit config file, which must exist.
    // figment's error is large, but it is built once, at startup, and printed as it is.
    #[allow(clippy::result_large_err)]
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Self, figment::Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        figment = match file {
            Some(path) => figment.merge(Toml::file_exact(path)),
            None => figment.merge(Toml::file(DEFAULT_CONFIG_FILE)),
        };
        let mut config: Config = figment.merge(environment()).merge(overrides).extract()?;
        // `state.path = ""` is how a file or the environment says "keep no state".
        if config
            .state
            .path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            config.state.path = None;
        }
        config.check_counts().map_err(figment::Error::from)?;
        // A limit set below the default length (max_new_tokens = 32 alone) lowers the default
        // with it: a request that leaves its length unset may not get more than one may ask for.
        let generation = &mut config.generation;
        generation.default_max_new_tokens = generation
            .default_max_new_tokens
            .min(generation.max_new_tokens);
        Ok(config)
    }

    /// Settings that count what the server may take on at once (a batch, a queue, a request's
    /// tokens) mean nothing at 0: a queue of none would refuse every request, and a length
    /// limit of none would have no length to give. Refused at startup, naming the setting.
    fn check_counts(&self) -> Result<(), String> {
        let (batching, generation) = (&self.batching, &self.generation);
        let at_least_one = [
            ("batching.max_batch_size", batching.max_batch_size),
            ("batching.max_batch_tokens", batching.max_batch_tokens),
            ("batching.queue_capacity", batching.queue_capacity),
            ("generation.max_batch_size", generation.max_batch_size),
            ("generation.max_total_tokens", generation.max_total_tokens),
            ("generation.max_prefill_batch", generation.max_prefill_batch),
            ("generation.queue_capacity", generation.queue_capacity),
            (
                "generation.default_max_new_tokens",
                generation.default_max_new_tokens,
            ),
            ("generation.max_new_tokens", generation.max_new_tokens),
            ("generation.max_sequences", generation.max_sequences),
            (
                "runtime.sessions_per_model",
                self.runtime.sessions_per_model,
            ),
        ];
        if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{name} must be at least 1; got 0"));
        }
        let most = limits::MOST_TEXTS_OR_MESSAGES;
        for (name, value) in [
            (
                "limits.max_texts_per_request",
                self.limits.max_texts_per_request,
            ),
            (
                "limits.max_messages_per_request",
                self.limits.max_messages_per_request,
            ),
        ] {
            if value > most {
                return Err(format!("{name} must be at most {most}; got {value}"));
            }
        }
        let prefix = self.server.ipv6_client_prefix;
        if !(1..=128).contains(&prefix) {
            return Err(format!(
                "server.ipv6_client_prefix must be between 1 and 128 bits; got {prefix}"
            ));
        }
        Ok(())
    }

    /// The config file `load` reads: `explicit`, else `lmserve.toml` when there is one.
    pub fn file(explicit: Option<&Path>) -> Option<PathBuf> {
        match explicit {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|path| path.is_file()),
        }
    }

    /// The `[routes]` of a config file alone (read again when the file changes).
    pub fn routes_in(file: &Path) -> anyhow::Result<BTreeMap<String, RouteConfig>> {
        #[derive(Deserialize)]
        struct Routes {
            #[serde(default)]
            routes: BTreeMap<String, RouteConfig>,
        }
        let text = std::fs::read_to_string(file)
            .map_err(|error| anyhow::anyhow!("reading {}: {error}", file.display()))?;
        let routes: Routes = toml::from_str(&text)
            .map_err(|error| anyhow::anyhow!("{}: {}", file.display(), error.message()))?;
        Ok(routes.routes)
    }

    /// The runtime settings for `model`, its overrides applied over `[runtime]`.
    pub fn model_runtime(&self, model: &str) -> ModelRuntime {
        let overrides = self.models.get(model).cloned().unwrap_or_default();
        let intra_threads = overrides
            .intra_threads
            .unwrap_or(self.runtime.intra_threads);
        let split = overrides
            .split_under_load
            .unwrap_or(self.runtime.split_under_load);
        // Lanes split the shared pool's cores; a session with threads of its own has no share.
        let narrow_lanes = match self.shared_threads() {
            threads if split && intra_threads == 0 && threads > 1 => threads,
            _ => 0,
        };
        ModelRuntime {
            intra_threads,
            sessions: overrides
                .sessions_per_model
                .unwrap_or(self.runtime.sessions_per_model)
                .max(1),
            narrow_lanes,
            execution_providers: overrides
                .execution_providers
                .unwrap_or_else(|| self.runtime.execution_providers.clone()),
            required_provider: overrides
                .required_provider
                .or_else(|| self.runtime.required_provider.clone()),
        }
    }

    /// The version policy of `model`.
    pub fn version_policy(&self, model: &str) -> Result<VersionPolicy, String> {
        match self.models.get(model).and_then(|m| m.versions.as_deref()) {
            None => Ok(VersionPolicy::All),
            Some(text) => VersionPolicy::parse(text)
                .map_err(|reason| format!("models.{model}.versions: {reason}")),
        }
    }

    /// Threads of the process-wide intra-op pool: `runtime.shared_threads`, else the CPUs this
    /// process may use. Read before `decode_cpus` takes CPUs away from the threads started later.
    pub fn shared_threads(&self) -> usize {
        self.runtime.shared_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// The ONNX Runtime library: config, then `ORT_DYLIB_PATH`, then the cache folder `make onnxruntime` fills.
    pub fn ort_library_candidates(&self) -> Vec<PathBuf> {
        let mut candidates = Vec::new();
        if let Some(path) = &self.runtime.ort_library {
            candidates.push(path.clone());
        }
        if let Some(path) = std::env::var_os(ORT_DYLIB_ENV) {
            candidates.push(PathBuf::from(path));
        }
        candidates.push(PathBuf::from(CACHED_ORT_LIBRARY));
        candidates
    }
}

/// Which of a model's versions are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    All,
    Latest(usize),
    Specific(Vec<u64>),
}

impl VersionPolicy {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(VersionPolicy::All);
        }
        if text == "latest" {
            return Ok(VersionPolicy::Latest(1));
        }
        if let Some(count) = text.strip_prefix("latest:") {
            return match count.trim().parse::<usize>() {
                Ok(count) if count > 0 => Ok(VersionPolicy::Latest(count)),
                _ => Err(format!("`{text}`: latest:N needs N of at least 1")),
            };
        }
        text.split(',')
            .map(|part| {
                part.trim().parse::<u64>().map_err(|_| {
                    format!("`{text}` is not all, latest, latest:N or a list like 1,3")
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(VersionPolicy::Specific)
    }

    /// The versions of `available` (ascending) this policy selects.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::All => available.to_vec(),
            VersionPolicy::Latest(count) => {
                available[available.len().saturating_sub(*count)..].to_vec()
            }
            VersionPolicy::Specific(wanted) => available
                .iter()
                .copied()
                .filter(|v| wanted.contains(v))
                .collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn layers_apply_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                DEFAULT_CONFIG_FILE,
                "[batching]\nmax_batch_size = 8\nmax_wait_micros = 7\n",
            )?;
            jail.set_env("LMSERVE_BATCHING__MAX_BATCH_SIZE", "16");
            let flags = Figment::from(Serialized::default("server.grpc_addr", "127.0.0.1:1"));
            let config = Config::load(None, flags)?;
            assert_eq!(
                config.batching.max_batch_size, 16,
                "environment beats the file"
            );
            assert_eq!(
                config.batching.max_wait_micros, 7,
                "the file beats the defaults"
            );
            assert_eq!(
                config.server.grpc_addr,
                SocketAddr::from(([127, 0, 0, 1], 1))
            );
            Ok(())
        });
    }

    #[test]
    fn the_example_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("lmserve.example.toml");
        Jail::expect_with(|_| {
            assert_eq!(
                Config::load(Some(&path), Figment::new())?,
                Config::default()
            );
            Ok(())
        });
    }

    #[test]
    fn counts_of_none_are_refused_naming_the_setting() {
        Jail::expect_with(|jail| {
            for (file, named) in [
                (
                    "[generation]\nmax_new_tokens = 0\n",
                    "generation.max_new_tokens",
                ),
                (
                    "[batching]\nqueue_capacity = 0\n",
                    "batching.queue_capacity",
                ),
            ] {
                jail.create_file(DEFAULT_CONFIG_FILE, file)?;
                let error = Config::load(None, Figment::new()).unwrap_err().to_string();
                assert!(error.contains(named), "{file}: {error}");
            }
            // A limit below the default length lowers the default with it.
            jail.create_file(DEFAULT_CONFIG_FILE, "[generation]\nmax_new_tokens = 32\n")?;
            let generation = Config::load(None, Figment::new())?.generation;
            assert_eq!(
                (generation.max_new_tokens, generation.default_max_new_tokens),
                (32, 32)
            );
            Ok(())
        });
    }

    #[test]
    fn list_limits_past_what_the_wire_check_admits_are_refused() {
        Jail::expect_with(|jail| {
            jail.create_file(
                DEFAULT_CONFIG_FILE,
                "[limits]\nmax_texts_per_request = 20000\n",
            )?;
            let error = Config::load(None, Figment::new()).unwrap_err().to_string();
            assert!(
                error.contains("limits.max_texts_per_request must be at most 16384; got 20000"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn an_ipv6_client_prefix_outside_an_address_is_refused() {
        Jail::expect_with(|jail| {
            for prefix in [0, 129, 255] {
                jail.create_file(
                    DEFAULT_CONFIG_FILE,
                    &format!("[server]\nipv6_client_prefix = {prefix}\n"),
                )?;
                let error = Config::load(None, Figment::new()).unwrap_err().to_string();
                let expected = format!(
                    "server.ipv6_client_prefix must be between 1 and 128 bits; got {prefix}"
                );
                assert!(error.contains(&expected), "{error}");
            }
            jail.set_env("LMSERVE_SERVER__IPV6_CLIENT_PREFIX", "64");
            assert_eq!(
                Config::load(None, Figment::new())?
                    .server
                    .ipv6_client_prefix,
                64
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file(DEFAULT_CONFIG_FILE, "[batching]\nmax_batch = 8\n")?;
            assert!(Config::load(None, Figment::new()).is_err());
            Ok(())
        });
    }

    #[test]
    fn kubernetes_service_variables_are_not_config_but_misspelled_keys_are_refused() {
        Jail::expect_with(|jail| {
            // What Kubernetes defines in every pod for a Service named "lmserve".
            for (name, value) in [
                ("LMSERVE_PORT", "tcp://10.0.0.1:50051"),
                ("LMSERVE_SERVICE_HOST", "10.0.0.1"),
                ("LMSERVE_SERVICE_PORT", "50051"),
                ("LMSERVE_SERVICE_PORT_GRPC", "50051"),
                ("LMSERVE_PORT_50051_TCP", "tcp://10.0.0.1:50051"),
                ("LMSERVE_PORT_50051_TCP_PROTO", "tcp"),
                ("LMSERVE_PORT_50051_TCP_PORT", "50051"),
                ("LMSERVE_PORT_50051_TCP_ADDR", "10.0.0.1"),
                ("LMSERVE_API_KEYS", "admin:0123456789abcdef"),
            ] {
                jail.set_env(name, value);
            }
            jail.set_env("LMSERVE_BATCHING__MAX_BATCH_SIZE", "8");
            let config = Config::load(None, Figment::new())?;
            assert_eq!(config.batching.max_batch_size, 8);

            jail.set_env("LMSERVE_BATCHING__MAX_BATCH", "8");
            let error = Config::load(None, Figment::new()).unwrap_err().to_string();
            assert!(
                error.contains("max_batch") && error.contains("max_batch_size"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn routes_are_read_from_the_file_alone() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "routes.toml",
                "[server]\nreflection = false\n[routes.chat]\ntask = \"generate\"\narms = [{ target = \"m@1\", weight = 1 }]\n",
            )?;
            let routes = Config::routes_in(Path::new("routes.toml")).unwrap();
            assert_eq!(routes["chat"].arms[0].target, "m@1");
            Ok(())
        });
    }

    #[test]
    fn version_policies_select_versions() {
        let available = [1, 2, 5];
        assert_eq!(
            VersionPolicy::parse("all").unwrap().select(&available),
            vec![1, 2, 5]
        );
        assert_eq!(
            VersionPolicy::parse("latest").unwrap().select(&available),
            vec![5]
        );
        assert_eq!(
            VersionPolicy::parse("latest:2").unwrap().select(&available),
            vec![2, 5]
        );
        assert_eq!(
            VersionPolicy::parse("1, 5,9").unwrap().select(&available),
            vec![1, 5]
        );
        assert!(VersionPolicy::parse("latest:0").is_err());
        assert!(VersionPolicy::parse("newest").is_err());
    }

    #[test]
    fn model_overrides_inherit_runtime() {
        let mut config = Config::default();
        config.models.insert(
            "m".into(),
            ModelOverrides {
                sessions_per_model: Some(3),
                ..Default::default()
            },
        );
        let runtime = config.model_runtime("m");
        assert_eq!(runtime.sessions, 3);
        assert_eq!(runtime.intra_threads, config.runtime.intra_threads);
        assert_eq!(
            config.model_runtime("other").sessions,
            config.runtime.sessions_per_model
        );
    }

    #[test]
    fn narrow_lanes_split_the_shared_pool_only() {
        let mut config = Config::default();
        config.runtime.shared_threads = Some(4);
        config.models.insert(
            "own-threads".into(),
            ModelOverrides {
                intra_threads: Some(2),
                ..Default::default()
            },
        );
        config.models.insert(
            "unsplit".into(),
            ModelOverrides {
                split_under_load: Some(false),
                ..Default::default()
            },
        );
        assert_eq!(config.model_runtime("m").narrow_lanes, 4);
        assert_eq!(config.model_runtime("own-threads").narrow_lanes, 0);
        assert_eq!(config.model_runtime("unsplit").narrow_lanes, 0);
        config.runtime.shared_threads = Some(1);
        assert_eq!(
            config.model_runtime("m").narrow_lanes,
            0,
            "one core: nothing to split"
        );
    }
}
