//! The model registry: which models and versions exist, their load state, the route table,
//! and how a request's `model` field ("name", "name@version" or a route) resolves to a loaded
//! version. Loading and unloading live in `lifecycle`, routes in `route_table`.

pub mod bindings;
pub mod chat;
pub mod hf;
pub mod inspect;
mod lifecycle;
pub mod loader;
pub mod manifest;
pub mod repository;
mod route_changes;
mod route_table;
pub mod routes;
pub mod seq2seq;
pub mod settings;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tokenizers::Tokenizer;

use crate::config::Config;
use crate::engine::{Engine, FaultTracker};
use crate::error::{Error, Result, Task};
use crate::runtime::SessionPool;
use crate::runtime::bindings::Bindings;
use crate::telemetry::metrics::ModelLabels;
use loader::LoadFailure;
use manifest::Manifest;
use settings::ModelSettings;
use state::PersistedState;

pub use route_changes::{RouteEntry, RouteSource, RouteTable};
pub use route_table::{RouteRequest, Routed, Shadow};

/// A loaded, warmed-up model version ready to serve.
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub manifest: Manifest,
    /// What the manifest, the Hugging Face files and the defaults add up to.
    pub settings: ModelSettings,
    /// The compiled chat template, when the model generates and has one.
    pub chat: Option<Arc<chat::ChatTemplate>>,
    pub tokenizer: Arc<Tokenizer>,
    /// Size of the token space: the larger of the tokenizer's vocabulary and the logits width.
    pub vocab_size: usize,
    /// Ids a prompt may contain: the logits width where the graph declares it (a decoder's
    /// embedding rows; the tokenizer may know added tokens the model cannot embed), else
    /// `vocab_size`.
    pub input_vocab_size: usize,
    pub pool: Arc<SessionPool>,
    pub bindings: Arc<Bindings>,
    pub pad_id: i64,
    /// The batcher or continuous scheduler serving it.
    pub engine: Engine,
    pub labels: ModelLabels,
    /// Failed runs in a row; past the limit the version reports FAILED.
    pub faults: Arc<FaultTracker>,
}

impl ModelVersion {
    /// The width of the vectors its graph returns for Embed, where the graph declares it.
    pub fn embedding_width(&self) -> Option<usize> {
        let settings = self.settings.embed.as_ref()?;
        let name = if settings.use_pooled_output {
            self.bindings.pooled_output.as_ref()
        } else {
            self.bindings.hidden_states.as_ref()
        }?;
        let output = self.pool.graph().outputs.iter().find(|o| &o.name == name)?;
        let width = *output.shape.last()?;
        usize::try_from(width).ok().filter(|&width| width > 0)
    }
}

#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<ModelVersion>),
    Failed(Arc<LoadFailure>),
}

/// One version in the catalogue.
pub enum Listed {
    Slot(Arc<Slot>),
    /// A folder in the repository that the registry does not serve.
    Unloaded(repository::VersionDir),
}

impl Listed {
    pub fn version(&self) -> u64 {
        match self {
            Listed::Slot(slot) => slot.version,
            Listed::Unloaded(dir) => dir.version,
        }
    }
}

/// One version folder and what became of it.
pub struct Slot {
    pub model: String,
    pub version: u64,
    pub path: PathBuf,
    state: RwLock<LoadState>,
    /// The folder's files as the last load began, so a repository scan can tell a version that
    /// failed on a half-copied folder from one that failed on files nobody has touched since.
    loaded_from: Mutex<repository::Contents>,
}

impl Slot {
    pub(crate) fn new(model: String, version: u64, path: PathBuf) -> Self {
        Self {
            model,
            version,
            path,
            state: RwLock::new(LoadState::Loading),
            loaded_from: Mutex::new(repository::Contents::default()),
        }
    }

    /// Whether the version failed to load and its files changed since: worth loading again (once
    /// they settle).
    pub(crate) fn failed_and_changed(&self) -> bool {
        matches!(*self.state.read().expect("slot lock"), LoadState::Failed(_))
            && *self.loaded_from.lock().expect("slot lock") != repository::Contents::of(&self.path)
    }

    /// The version's state; a loaded version whose runs keep failing is `Failed`.
    pub fn state(&self) -> LoadState {
        let state = self.state.read().expect("slot lock").clone();
        match &state {
            LoadState::Ready(model) => match model.faults.broken() {
                Some(reason) => LoadState::Failed(Arc::new(LoadFailure {
                    reason,
                    graph: Some(model.pool.graph().clone()),
                    fatal: false,
                })),
                None => state,
            },
            _ => state,
        }
    }

    /// The version, when it is ready to serve.
    pub fn ready(&self) -> Option<Arc<ModelVersion>> {
        match self.state() {
            LoadState::Ready(model) => Some(model),
            _ => None,
        }
    }

    pub(crate) fn set(&self, state: LoadState) {
        *self.state.write().expect("slot lock") = state;
    }
}

pub struct Registry {
    config: Config,
    models: RwLock<BTreeMap<String, BTreeMap<u64, Arc<Slot>>>>,
    /// The route table requests read. Held only to read it or to put a new table in place,
    /// never across a write of the state file: changes are decided under `route_edits`.
    routes: RwLock<RouteTable>,
    /// Held by whatever changes the routes or the versions a route may use (SetRoute,
    /// DeleteRoute, a reload of the config file's routes, LoadModel, UnloadModel, a scan), from
    /// its check until its change is saved and in place: so no route can come to name a version
    /// going away, while requests go on reading the table.
    route_edits: Mutex<()>,
    /// What the API changed, as last written to the state file.
    persisted: Mutex<PersistedState>,
    /// Set once the first load starts; later loads (API, watch) reuse it.
    environment: OnceLock<&'static ort::environment::Environment>,
    /// Shadow requests running now; a full semaphore drops new shadow copies.
    shadow_permits: Arc<tokio::sync::Semaphore>,
    /// Held by each load through the API or a repository scan: one at a time, so a retried
    /// LoadModel waits for the load before it instead of holding a second copy of the model.
    loads: tokio::sync::Mutex<()>,
    /// Held by LoadModel and UnloadModel from saving a change of the versions served until the
    /// registry has it (after `route_edits`, where both are taken): so the two land in one
    /// order or the other, without holding up routing while the state file is written.
    membership: Mutex<()>,
    /// Version folders a rescan found still changing: loaded once they settle.
    settling: repository::Settling,
    /// The config file's routes as last read, and the API's saved routes left out at startup
    /// because a target was not ready: tried again after each load, and (the API's) kept in
    /// the state file meanwhile.
    waiting_routes: Mutex<route_changes::WaitingRoutes>,
}

impl Registry {
    /// Reads the state file (a corrupt one is an error naming it) and scans the repository;
    /// the versions to serve start out `Loading`.
    pub fn open(config: Config) -> anyhow::Result<Self> {
        let persisted = match &config.state.path {
            Some(path) => {
                state::check_writable(path)?;
                state::read(path)?.unwrap_or_default()
            }
            None => PersistedState::default(),
        };
        let registry = Self {
            models: RwLock::new(BTreeMap::new()),
            routes: RwLock::new(RouteTable::new()),
            route_edits: Mutex::new(()),
            persisted: Mutex::new(persisted),
            environment: OnceLock::new(),
            shadow_permits: Arc::new(tokio::sync::Semaphore::new(
                config.routing.shadow_concurrency,
            )),
            loads: tokio::sync::Mutex::new(()),
            membership: Mutex::new(()),
            settling: repository::Settling::default(),
            waiting_routes: Mutex::new(route_changes::WaitingRoutes {
                config: config.routes.clone(),
                api: BTreeMap::new(),
            }),
            config,
        };
        registry.add_wanted_slots(None)?;
        if registry.slots().is_empty() {
            tracing::warn!(path = %registry.config.repository.path.display(), "the model repository holds no model versions to serve");
        }
        Ok(registry)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every version slot, ordered by model then version.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .flat_map(|versions| versions.values().cloned())
            .collect()
    }

    /// Every model the repository holds or the registry still serves, by name, each with its
    /// versions oldest first: the registry's slot for a version, or the folder of one it does
    /// not serve (never loaded by policy, or unloaded).
    pub fn catalogue(&self) -> Result<BTreeMap<String, Vec<Listed>>> {
        let on_disk = repository::scan(&self.config.repository.path)
            .map_err(|error| Error::Internal(format!("scanning the repository: {error:#}")))?;
        let models = self.models.read().expect("registry lock");
        let mut catalogue: BTreeMap<String, BTreeMap<u64, Listed>> = BTreeMap::new();
        for dir in on_disk {
            catalogue
                .entry(dir.model.clone())
                .or_default()
                .insert(dir.version, Listed::Unloaded(dir));
        }
        for (name, versions) in models.iter() {
            for (version, slot) in versions {
                catalogue
                    .entry(name.clone())
                    .or_default()
                    .insert(*version, Listed::Slot(Arc::clone(slot)));
            }
        }
        Ok(catalogue
            .into_iter()
            .map(|(name, versions)| (name, versions.into_values().collect()))
            .collect())
    }

    /// The version slots of one model, oldest first.
    pub fn model_slots(&self, name: &str) -> Option<Vec<Arc<Slot>>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .map(|versions| versions.values().cloned().collect())
    }

    /// Resolves a request's `model` field to a ready version that serves `task` (any task when `None`).
    pub fn resolve(&self, target: &str, task: Option<Task>) -> Result<Arc<ModelVersion>> {
        let (name, version) = parse_target(target)?;
        let slots = self.model_slots(name).ok_or_else(|| Error::ModelNotFound {
            name: name.to_owned(),
        })?;
        let model = match version {
            Some(version) => {
                let slot = slots
                    .iter()
                    .find(|slot| slot.version == version)
                    .ok_or_else(|| {
                        Error::version_not_found(
                            name,
                            version,
                            slots.iter().map(|slot| slot.version),
                        )
                    })?;
                ready(slot)?
            }
            // The newest ready version that serves the task, so that a newer version which
            // dropped a task does not take the bare name from an older one that serves it.
            // When none serves it, the newest ready one's tasks say why below; when none is
            // ready, the newest one's reason.
            None => {
                let serves =
                    |model: &Arc<ModelVersion>| task.is_none_or(|t| model.manifest.serves(t));
                let newest_ready = |fits: &dyn Fn(&Arc<ModelVersion>) -> bool| {
                    slots
                        .iter()
                        .rev()
                        .filter_map(|slot| slot.ready())
                        .find(|m| fits(m))
                };
                match newest_ready(&serves).or_else(|| newest_ready(&|_| true)) {
                    Some(model) => model,
                    None => ready(slots.last().ok_or_else(|| Error::ModelNotFound {
                        name: name.to_owned(),
                    })?)?,
                }
            }
        };
        if let Some(task) = task.filter(|task| !model.manifest.serves(*task)) {
            return Err(Error::TaskNotServed {
                model: model.name.clone(),
                version: model.version.to_string(),
                task,
                served: model
                    .manifest
                    .tasks
                    .iter()
                    .map(|task| task.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(model)
    }
}

fn ready(slot: &Slot) -> Result<Arc<ModelVersion>> {
    match slot.state() {
        LoadState::Ready(model) => Ok(model),
        LoadState::Loading => Err(Error::ModelUnavailable {
            model: slot.model.clone(),
            version: slot.version.to_string(),
            reason: "still loading".into(),
        }),
        LoadState::Failed(failure) => Err(Error::ModelUnavailable {
            model: slot.model.clone(),
            version: slot.version.to_string(),
            reason: failure.reason.clone(),
        }),
    }
}

/// Splits "name" or "name@version".
pub fn parse_target(target: &str) -> Result<(&str, Option<u64>)> {
    let target = target.trim();
    if target.is_empty() {
        return Err(Error::invalid(
            "model",
            "must name a model, e.g. \"tiny-encoder\" or \"tiny-encoder@1\"; got an empty string",
        ));
    }
    match target.split_once('@') {
        None => Ok((target, None)),
        Some((name, version)) => match version.parse::<u64>() {
            Ok(version) if !name.is_empty() => Ok((name, Some(version))),
            _ => Err(Error::invalid(
                "model",
                format!("`{target}` is not \"name\" or \"name@version\" with a numeric version"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(parse_target("m").unwrap(), ("m", None));
        assert_eq!(parse_target("m@12").unwrap(), ("m", Some(12)));
        for bad in ["", "m@", "m@x", "@1"] {
            assert!(
                matches!(parse_target(bad), Err(Error::InvalidArgument { .. })),
                "{bad:?}"
            );
        }
    }
}
