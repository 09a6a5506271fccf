//! A pool of ONNX Runtime sessions for one model version. `Session::run` needs `&mut`, so each
//! session runs one batch at a time on the blocking thread pool, never on the async executor;
//! a semaphore lets schedulers wait for a free session before they form a batch.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::providers::Provider;
use crate::config::ModelRuntime;
use crate::error::Error;

/// One graph input or output as the model file declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    /// -1 marks a dynamic axis.
    pub shape: Vec<i64>,
}

pub struct SessionPool {
    sessions: Vec<Mutex<Session>>,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
    provider: Provider,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

/// The right to run one batch on a free session.
pub struct SessionLease {
    pool: Arc<SessionPool>,
    _permit: OwnedSemaphorePermit,
}

impl SessionPool {
    /// Builds `runtime.sessions` sessions on the first provider in the list that registers.
    /// A provider named `required_provider` that cannot register is an error, never a fallback.
    pub fn load(
        environment: &ort::environment::Environment,
        model_file: &Path,
        runtime: &ModelRuntime,
    ) -> anyhow::Result<Self> {
        let providers = runtime
            .execution_providers
            .iter()
            .map(|name| Provider::parse(name).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let required = runtime
            .required_provider
            .as_deref()
            .map(Provider::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if providers.is_empty() {
            anyhow::bail!(
                "runtime.execution_providers is empty; list at least one, e.g. [\"cpu\"]"
            );
        }

        let mut failures = Vec::new();
        for provider in providers {
            match build_session(environment, model_file, provider, runtime.intra_threads) {
                Ok(first) => {
                    let mut sessions = vec![first];
                    for _ in 1..runtime.sessions {
                        let session =
                            build_session(environment, model_file, provider, runtime.intra_threads)
                                .map_err(|error| anyhow::anyhow!("{error}"))?;
                        sessions.push(session);
                    }
                    if !failures.is_empty() {
                        tracing::warn!(model = %model_file.display(), %provider, skipped = ?failures, "fell back to a later execution provider");
                    }
                    return Ok(Self::from_sessions(sessions, provider));
                }
                Err(error) if required == Some(provider) => {
                    anyhow::bail!(
                        "required execution provider {provider} could not register: {error}"
                    );
                }
                Err(error) => failures.push(format!("{provider}: {error}")),
            }
        }
        anyhow::bail!(
            "no execution provider could load the model: {}",
            failures.join("; ")
        )
    }

    fn from_sessions(sessions: Vec<Session>, provider: Provider) -> Self {
        let inputs = sessions[0]
            .inputs()
            .iter()
            .map(|outlet| spec(outlet.name(), outlet.dtype()))
            .collect();
        let outputs = sessions[0]
            .outputs()
            .iter()
            .map(|outlet| spec(outlet.name(), outlet.dtype()))
            .collect();
        let count = sessions.len();
        Self {
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            free: Mutex::new((0..count).rev().collect()),
            permits: Arc::new(Semaphore::new(count)),
            provider,
            inputs,
            outputs,
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|input| input.name == name)
    }

    pub fn has_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|output| output.name == name)
    }

    pub fn size(&self) -> usize {
        self.sessions.len()
    }

    /// Runs `work` on every session in turn, outside any scheduler (at load time).
    pub fn each_session<E>(
        &self,
        mut work: impl FnMut(&mut Session) -> Result<(), E>,
    ) -> Result<(), E> {
        for session in &self.sessions {
            work(&mut session.lock().expect("session lock"))?;
        }
        Ok(())
    }

    /// Session `index`, locked, for a scheduler that owns it outright (the decode loop).
    pub fn session(&self, index: usize) -> std::sync::MutexGuard<'_, Session> {
        // A panic elsewhere while the lock was held does not make the session unusable.
        self.sessions[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until a session is free.
    pub async fn acquire(self: &Arc<Self>) -> SessionLease {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the pool never closes its semaphore");
        SessionLease {
            pool: Arc::clone(self),
            _permit: permit,
        }
    }

    /// Runs `work` on a free session, on the calling thread (which must be allowed to block).
    fn run_now<R>(&self, work: impl FnOnce(&mut Session) -> R) -> R {
        let index = self
            .free
            .lock()
            .expect("free list lock")
            .pop()
            .expect("a permit guarantees a free session");
        let result = {
            let mut session = self.sessions[index].lock().expect("session lock");
            work(&mut session)
        };
        self.free.lock().expect("free list lock").push(index);
        result
    }
}

impl SessionLease {
    /// Runs `work` on the leased session on the blocking thread pool.
    pub async fn run<R: Send + 'static>(
        self,
        work: impl FnOnce(&mut Session) -> R + Send + 'static,
    ) -> crate::error::Result<R> {
        tokio::task::spawn_blocking(move || {
            let result = self.pool.run_now(work);
            drop(self);
            result
        })
        .await
        .map_err(|error| Error::Internal(format!("inference worker failed: {error}")))
    }

    /// Runs `work` on the leased session on the current thread, for callers already on a worker thread.
    pub fn run_blocking<R>(self, work: impl FnOnce(&mut Session) -> R) -> R {
        self.pool.run_now(work)
    }
}

fn build_session(
    environment: &ort::environment::Environment,
    model_file: &Path,
    provider: Provider,
    intra_threads: usize,
) -> ort::Result<Session> {
    let session = Session::builder(environment)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(intra_threads)?
        // Intra-op threads otherwise keep spinning for a while after each run, taking the cores
        // the server needs in between: the gRPC tasks streaming the token just produced, the
        // other models' sessions, and (measured) 25-35% of a concurrent run's speed.
        .with_config_entry("session.force_spinning_stop", "1")?
        .with_execution_providers([provider.dispatch()])?
        .commit_from_file(model_file)?;
    Ok(session)
}

fn spec(name: &str, dtype: &ort::value::ValueType) -> TensorSpec {
    match dtype {
        ort::value::ValueType::Tensor { ty, shape, .. } => TensorSpec {
            name: name.to_owned(),
            dtype: format!("{ty:?}").to_ascii_lowercase(),
            shape: shape.to_vec(),
        },
        other => TensorSpec {
            name: name.to_owned(),
            dtype: other.to_string(),
            shape: Vec::new(),
        },
    }
}
