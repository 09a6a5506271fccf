//! A pool of ONNX Runtime sessions for one model version. `Session::run` needs `&mut`, so each
//! session runs one batch at a time on the blocking thread pool, never on the async executor;
//! a semaphore lets schedulers wait for a free session before they form a batch.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorElementType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::providers::Provider;
use super::shared_weights::SharedWeights;
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

impl TensorSpec {
    /// The tensor's element type where it is float32 or float16, the types carried state has.
    pub fn float_type(&self) -> Option<TensorElementType> {
        match self.dtype.as_str() {
            "float32" => Some(TensorElementType::Float32),
            "float16" => Some(TensorElementType::Float16),
            _ => None,
        }
    }
}

#[cfg(test)]
impl TensorSpec {
    /// A float32 tensor of `shape`, for tests that build a graph's signature by hand.
    pub fn float32(name: &str, shape: &[i64]) -> Self {
        Self {
            name: name.into(),
            dtype: "float32".into(),
            shape: shape.to_vec(),
        }
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|&dim| {
                if dim < 0 {
                    "?".to_owned()
                } else {
                    dim.to_string()
                }
            })
            .collect();
        write!(f, "{} {} [{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// A graph's inputs and outputs, as `lmserve inspect`, GetModel and load errors show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GraphIo {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl fmt::Display for GraphIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |specs: &[TensorSpec]| {
            specs
                .iter()
                .map(TensorSpec::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "graph inputs: {}; graph outputs: {}",
            list(&self.inputs),
            list(&self.outputs)
        )
    }
}

pub struct SessionPool {
    sessions: Vec<Mutex<Session>>,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
    provider: Provider,
    graph: GraphIo,
    /// One-thread sessions holding the same weights as these, for batches under load
    /// (`ModelRuntime::narrow_lanes`).
    narrow: Option<Arc<SessionPool>>,
}

/// A provider the config requires could not register. Typed so that startup can tell it from a
/// model's own faults: no model works around it.
#[derive(Debug, thiserror::Error)]
#[error("required execution provider {provider} could not register: {reason}")]
pub struct RequiredProviderMissing {
    pub provider: Provider,
    pub reason: String,
}

/// The right to run one batch on a free session.
pub struct SessionLease {
    pool: Arc<SessionPool>,
    _permit: OwnedSemaphorePermit,
}

impl SessionPool {
    /// Builds `runtime.sessions` sessions on the first provider in the list that registers.
    /// With `required_provider`, on that provider alone: one that cannot register (or is not
    /// in the list) is a `RequiredProviderMissing`, never a fallback.
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
        // A required provider is the only one tried, wherever the list puts it: any other
        // would be the fallback it forbids. Whether it registers is asked of a bare session
        // builder, so that a model's own fault on it (a corrupt graph, memory) stays that
        // model's failure instead of stopping the server.
        let providers = match required {
            Some(required) => {
                if !providers.contains(&required) {
                    return Err(RequiredProviderMissing {
                        provider: required,
                        reason: format!(
                            "it is not among runtime.execution_providers {:?}",
                            runtime.execution_providers
                        ),
                    }
                    .into());
                }
                let registers = Session::builder(environment).and_then(|builder| {
                    builder
                        .with_execution_providers([required.dispatch()])
                        .map(drop)
                        .map_err(ort::Error::from)
                });
                registers.map_err(|error| RequiredProviderMissing {
                    provider: required,
                    reason: error.to_string(),
                })?;
                vec![required]
            }
            None => providers,
        };

        let mut failures = Vec::new();
        for provider in providers {
            let mut shared = match provider {
                Provider::Cpu if runtime.narrow_lanes > 0 && runtime.intra_threads == 0 => {
                    shared_weights(model_file)
                }
                _ => None,
            };
            let build = |threads, shared: Option<&SharedWeights>| {
                build_session(environment, model_file, provider, threads, shared)
            };
            let mut first = build(runtime.intra_threads, shared.as_ref());
            if let (Err(error), Some(_)) = (&first, &shared) {
                // Lanes are a speed-up: a graph that will not take its weights from outside still
                // loads the plain way (and a broken one fails there with its own error).
                tracing::warn!(model = %model_file.display(), %error, "a session with shared weights failed; loading without them, and without narrow lanes");
                shared = None;
                first = build(runtime.intra_threads, None);
            }
            match first {
                Ok(first) => {
                    let mut sessions = vec![first];
                    for _ in 1..runtime.sessions {
                        sessions.push(
                            build(runtime.intra_threads, shared.as_ref())
                                .map_err(|error| anyhow::anyhow!("{error}"))?,
                        );
                    }
                    if !failures.is_empty() {
                        tracing::warn!(model = %model_file.display(), %provider, skipped = ?failures, "fell back to a later execution provider");
                    }
                    let mut pool = Self::from_sessions(sessions, provider);
                    if shared.is_some() {
                        let narrow = (0..runtime.narrow_lanes)
                            .map(|_| build(1, shared.as_ref()))
                            .collect::<ort::Result<Vec<_>>>()
                            .map_err(|error| anyhow::anyhow!("a narrow lane: {error}"))?;
                        pool.narrow = Some(Arc::new(Self::from_sessions(narrow, provider)));
                    }
                    return Ok(pool);
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
            graph: GraphIo { inputs, outputs },
            narrow: None,
        }
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    pub fn graph(&self) -> &GraphIo {
        &self.graph
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.graph.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.graph.outputs
    }

    pub fn size(&self) -> usize {
        self.sessions.len()
    }

    /// The one-thread sessions that share these sessions' weights, when the model has them.
    pub fn narrow(&self) -> Option<&Arc<SessionPool>> {
        self.narrow.as_ref()
    }

    /// Runs `work` on every session in turn, narrow lanes included, outside any scheduler (at
    /// load time).
    pub fn each_session<E>(
        &self,
        mut work: impl FnMut(&mut Session) -> Result<(), E>,
    ) -> Result<(), E> {
        for index in 0..self.sessions.len() {
            work(&mut self.session(index))?;
        }
        match &self.narrow {
            Some(narrow) => narrow.each_session(work),
            None => Ok(()),
        }
    }

    /// Session `index`, locked, for a scheduler that owns it outright (the decode loop).
    pub fn session(&self, index: usize) -> std::sync::MutexGuard<'_, Session> {
        // A panic elsewhere while the lock was held does not make the session unusable.
        self.sessions[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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
    /// A panic in `work` fails this run alone: the session goes back to the pool and nothing
    /// is left poisoned.
    fn run_now<R>(&self, work: impl FnOnce(&mut Session) -> R) -> Result<R, Error> {
        let checkout = Checkout::take(self)?;
        let mut session = self.session(checkout.index);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| work(&mut session)));
        drop(session);
        drop(checkout);
        result.map_err(|panic| {
            Error::Internal(format!(
                "a session run panicked: {}",
                panic_message(&*panic)
            ))
        })
    }
}

/// One session taken from the free list, given back when dropped, so neither a panic nor an
/// early return can lose it.
struct Checkout<'p> {
    pool: &'p SessionPool,
    index: usize,
}

impl<'p> Checkout<'p> {
    fn take(pool: &'p SessionPool) -> Result<Self, Error> {
        let index = pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            // The semaphore hands out no more permits than there are sessions.
            .ok_or_else(|| Error::Internal("no free session despite a permit".into()))?;
        Ok(Self { pool, index })
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.index);
    }
}

/// The text a panic carried, when it carried one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
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
        .map_err(|error| Error::Internal(format!("inference worker failed: {error}")))?
    }
}

/// The model's weights read once for all its sessions, or `None` (each session then reads its
/// own, and the model gets no narrow lanes) when they cannot be read that way.
fn shared_weights(model_file: &Path) -> Option<SharedWeights> {
    match SharedWeights::read(model_file) {
        Ok(shared) => {
            let (count, bytes) = shared.size();
            tracing::debug!(model = %model_file.display(), initializers = count, mib = bytes >> 20, "weights shared between sessions");
            Some(shared)
        }
        Err(error) => {
            tracing::warn!(model = %model_file.display(), error = format!("{error:#}"), "weights not shareable; no narrow lanes");
            None
        }
    }
}

fn build_session(
    environment: &ort::environment::Environment,
    model_file: &Path,
    provider: Provider,
    intra_threads: usize,
    shared: Option<&SharedWeights>,
) -> ort::Result<Session> {
    let mut builder =
        Session::builder(environment)?.with_optimization_level(GraphOptimizationLevel::All)?;
    if let Some(shared) = shared {
        builder = shared.apply(builder)?;
    }
    // 0: the environment's shared pool (runtime::library), which sessions use unless told not to.
    if intra_threads > 0 {
        builder = builder
            .with_independent_thread_pool()?
            .with_intra_threads(intra_threads)?;
    }
    let session = builder
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
