//! Test harness: the real `lmserve` binary on an ephemeral port, and clients for it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lmserve::api::proto::inference_client::InferenceClient;
use lmserve::api::proto::models_client::ModelsClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const REPOSITORY: &str = "models/repository";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn repository() -> PathBuf {
    root().join(REPOSITORY)
}

/// A running server process; killed when dropped.
pub struct TestServer {
    child: Child,
    pub addr: String,
    /// The metrics port, when the server was started with `--metrics-addr`.
    pub metrics_addr: Option<String>,
    pub stderr_path: PathBuf,
    _logs: tempfile::TempDir,
}

pub struct ServerOptions {
    pub repository: PathBuf,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// Wait until the overall health status is SERVING (else only until the port is bound).
    pub ready: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            repository: repository(),
            env: Vec::new(),
            args: Vec::new(),
            ready: true,
        }
    }
}

/// Where a started server listens.
struct Ports {
    grpc: String,
    metrics: Option<String>,
}

/// Text mode: the `lmserve listening grpc=… [admin=…] [metrics=…]` line on stdout.
fn listening_line(child: &mut Child, stderr_path: &Path) -> Ports {
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let Some(rest) = line.trim().strip_prefix("lmserve listening ") else {
        let _ = child.wait();
        panic!(
            "server did not start: {line:?}\n{}",
            std::fs::read_to_string(stderr_path).unwrap_or_default()
        )
    };
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    Ports {
        grpc: field("grpc").expect("grpc port"),
        metrics: field("metrics"),
    }
}

/// JSON mode: nothing on stdout; the `lmserve listening` event among the JSON lines on stderr.
fn listening_event(child: &mut Child, stderr_path: &Path) -> Ports {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = std::fs::read_to_string(stderr_path).unwrap_or_default();
        let event = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["message"] == "lmserve listening");
        if let Some(event) = event {
            let metrics = event["metrics"].as_str().filter(|m| !m.is_empty());
            return Ports {
                grpc: event["grpc"].as_str().unwrap().to_owned(),
                metrics: metrics.map(str::to_owned),
            };
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited with {status}:\n{logs}");
        }
        assert!(Instant::now() < deadline, "no listening event:\n{logs}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// Starts the binary and waits until the health check says SERVING.
    pub async fn start_with(options: ServerOptions) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let stderr_path = logs.path().join("stderr.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_lmserve"));
        command
            .current_dir(root())
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--repository"])
            .arg(&options.repository)
            .args(
                (!options.args.iter().any(|arg| arg == "--metrics-addr")).then_some("--no-metrics"),
            )
            .args(&options.args)
            .env("LMSERVE_LOGGING__FILTER", "info,ort=error")
            .env("LMSERVE_STATE__PATH", logs.path().join("state.json"))
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let mut child = command.spawn().expect("start lmserve");
        let json = options
            .env
            .iter()
            .any(|(key, value)| key == "LMSERVE_LOGGING__FORMAT" && value == "json");
        let ports = if json {
            listening_event(&mut child, &stderr_path)
        } else {
            listening_line(&mut child, &stderr_path)
        };
        let server = Self {
            child,
            addr: ports.grpc,
            metrics_addr: ports.metrics,
            stderr_path,
            _logs: logs,
        };
        if options.ready {
            server.wait_serving().await;
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal), with its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// The text of a unary Generate of `prompt` with the model's defaults and at most
    /// `max_new_tokens`: what other ways of asking must give.
    pub async fn unary_text(&self, model: &str, prompt: &str, max_new_tokens: u32) -> String {
        use lmserve::api::proto::{GenerateRequest, GenerationParameters, generate_request};
        let response = self
            .inference()
            .await
            .generate(GenerateRequest {
                model: model.into(),
                prompt: Some(generate_request::Prompt::Text(prompt.into())),
                parameters: Some(GenerationParameters {
                    max_new_tokens: Some(max_new_tokens),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        response.sequences[0].text.clone()
    }

    pub async fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel().await)
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut client = HealthClient::new(self.channel().await);
        let response = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        ServingStatus::try_from(response.into_inner().status).unwrap()
    }

    /// The status of `service`, or `None` when the server has none for it (or cannot answer yet).
    pub async fn try_health(&self, service: &str) -> Option<ServingStatus> {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .ok()?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await {
                let mut client = HealthClient::new(channel);
                if let Ok(response) = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && response.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never became SERVING:\n{}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args`, returning (success, stdout + stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_lmserve"))
        .current_dir(root())
        .args(args)
        // No state file in the checkout; a test may still set one.
        .env("LMSERVE_STATE__PATH", "")
        .envs(env.iter().copied())
        .output()
        .expect("run lmserve");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Serves `repository` (a free port, no metrics) until the server exits: for startups that
/// must fail. Returns (success, stdout + stderr).
pub fn serve_to_exit(repository: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let repository = repository.to_str().unwrap();
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--no-metrics",
        "--repository",
        repository,
    ];
    run_to_exit(&args, env)
}

/// The first version GetModel lists for `name`.
pub async fn first_version(
    models: &ModelsClient<Channel>,
    name: &str,
) -> lmserve::api::proto::ModelVersion {
    models
        .clone()
        .get_model(lmserve::api::proto::GetModelRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .versions
        .remove(0)
}

/// The committed reference outputs of one model.
pub fn reference(model: &str) -> serde_json::Value {
    let path = repository().join(model).join("1").join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A GetModel setting's value and where it came from.
pub fn setting<'a>(
    version: &'a lmserve::api::proto::ModelVersion,
    name: &str,
) -> (&'a str, &'a str) {
    let found = version
        .settings
        .iter()
        .find(|setting| setting.name == name)
        .unwrap_or_else(|| panic!("no setting {name} in {:?}", version.settings));
    (found.value.as_str(), found.source.as_str())
}

pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies one model version into `dest/<name>/<version>`.
pub fn copy_version(model: &str, version: &str, dest: &Path, name: &str, new_version: &str) {
    copy_dir(
        &repository().join(model).join(version),
        &dest.join(name).join(new_version),
    );
}

/// The small fixture models built by tests/fixtures/build.py.
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures/repository")
}

/// Copies a folder's files (and sub-folders) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// One CPU session of `model` with `intra_threads` threads of its own, outside any server.
pub fn cpu_session_pool(model: &Path, intra_threads: usize) -> lmserve::runtime::SessionPool {
    let environment = lmserve::runtime::library::init(
        &lmserve::config::Config::default().ort_library_candidates(),
        1,
    )
    .expect("ONNX Runtime (make onnxruntime)");
    let runtime = lmserve::config::ModelRuntime {
        intra_threads,
        sessions: 1,
        narrow_lanes: 0,
        execution_providers: vec!["cpu".into()],
        required_provider: None,
    };
    lmserve::runtime::SessionPool::load(environment, model, &runtime).unwrap()
}

/// The repository `make real-models` writes SmolLM2 into in float16 (the graph for GPUs),
/// beside the main one.
pub fn real_models_float16() -> PathBuf {
    real_models().with_file_name("float16")
}

/// The repository `make real-models` builds: `TEST_REAL_MODELS`, else the user's cache folder.
pub fn real_models() -> PathBuf {
    if let Some(path) = std::env::var_os("TEST_REAL_MODELS") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    let path = cache.join("lmserve/real-models/repository");
    assert!(
        path.join("all-minilm-l6-v2/1/.built").is_file()
            && path.join("smollm2-135m-instruct/1/.built").is_file(),
        "the real models are not built in {}; run `make real-models`",
        path.display()
    );
    path
}

/// The body of `GET /metrics` from the exporter on `port`.
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain chat template (one line per turn, then the assistant's cue), as a model folder's
/// `chat_template.jinja` holds it.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}\n{{ m.role | upper }}: {{ m.content }}\n{% endfor %}\n{% if add_generation_prompt %}ASSISTANT:{% endif %}\n";

/// A repository with tiny-gpt2 as `tiny-chat`: the same model with `CHAT_TEMPLATE` and a
/// tokenizer_config.json whose eos_token (the template's end of turn) is `eos_token`.
pub fn chat_repository(eos_token: &str) -> tempfile::TempDir {
    let repository = tempfile::tempdir().unwrap();
    copy_version("tiny-gpt2", "1", repository.path(), "tiny-chat", "1");
    let folder = repository.path().join("tiny-chat/1");
    std::fs::write(folder.join("chat_template.jinja"), CHAT_TEMPLATE).unwrap();
    let config = serde_json::json!({ "eos_token": eos_token, "bos_token": "<|endoftext|>" });
    std::fs::write(folder.join("tokenizer_config.json"), config.to_string()).unwrap();
    repository
}

/// Runs the binary to completion with `input` on its stdin, returning (success, stdout, stderr).
pub fn run_with_input(args: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmserve"))
        .current_dir(root())
        .args(args)
        .env("LMSERVE_STATE__PATH", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lmserve");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
