//! Shared by the benchmarks: the real server on a free port, and the in-process baseline setup.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// Starts the release binary on a free port with extra `env`, and waits for SERVING.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmserve"))
            .current_dir(root())
            .args(["serve", "--grpc-addr", "127.0.0.1:0", "--no-metrics"])
            .env("LMSERVE_LOGGING__FILTER", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lmserve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("lmserve listening grpc=")
            .expect("server started")
            .to_owned();
        let url = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(channel) = Channel::from_shared(url.clone()).unwrap().connect().await {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if status.is_ok_and(|s| s.into_inner().status == 1) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, url }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The process-wide ONNX Runtime environment, from the same library the server loads.
pub fn ort_environment() -> &'static ort::environment::Environment {
    let config = lmserve::config::Config::default();
    std::env::set_current_dir(root()).unwrap();
    lmserve::runtime::library::init(&config.ort_library_candidates(), config.shared_threads())
        .expect("ONNX Runtime (run `make onnxruntime`)")
}

pub fn model_dir(model: &str) -> PathBuf {
    root().join("models/repository").join(model).join("1")
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

pub fn print_row(name: &str, rate: f64, unit: &str, baseline: Option<(f64, &str)>) {
    match baseline {
        Some((base, label)) => println!(
            "{name:<58} {rate:>9.1} {unit:<9} {:>6.2}x {label}",
            rate / base
        ),
        None => println!("{name:<58} {rate:>9.1} {unit}"),
    }
}

/// The ids of process `pid`'s threads whose name starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let tid = task.file_name().to_str()?.parse().ok()?;
            name.starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// Restricts thread `tid` to `cpus` (a taskset list such as "0" or "0-1"); false where that is
/// not possible here.
pub fn pin(tid: u32, cpus: &str) -> bool {
    Command::new("taskset")
        .args(["-p", "-c", cpus, &tid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
