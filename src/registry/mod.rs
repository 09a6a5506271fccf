//! The model registry: which models and versions exist, their load state, and how a request's
//! `model` field ("name" or "name@version") resolves to a loaded version.

pub mod bindings;
pub mod loader;
pub mod manifest;
pub mod repository;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokenizers::Tokenizer;

use crate::config::Config;
use crate::error::{Error, Result, Task};
use crate::runtime::SessionPool;
use crate::runtime::bindings::Bindings;
use crate::runtime::decoder::DecoderModel;
use crate::scheduling::batcher::{Batcher, BatcherSettings};
use crate::scheduling::continuous::{ContinuousLimits, ContinuousScheduler};
use crate::scheduling::{BatchLimits, BatcherHandle};
use crate::telemetry::metrics::{self, ModelLabels};
use manifest::{Family, Manifest};

/// A loaded, warmed-up model version ready to serve.
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub manifest: Manifest,
    pub tokenizer: Arc<Tokenizer>,
    /// Size of the token space: the larger of the tokenizer's vocabulary and the logits width.
    pub vocab_size: usize,
    pub pool: Arc<SessionPool>,
    pub bindings: Arc<Bindings>,
    pub pad_id: i64,
    /// The dynamic batcher, for encoders.
    pub batcher: Option<BatcherHandle>,
    /// The continuous batcher, for decoders and RNNs.
    pub generator: Option<ContinuousScheduler>,
    pub labels: ModelLabels,
}

#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<ModelVersion>),
    Failed(String),
}

/// One version folder and what became of it.
pub struct Slot {
    pub model: String,
    pub version: u64,
    pub path: PathBuf,
    state: RwLock<LoadState>,
}

impl Slot {
    pub fn state(&self) -> LoadState {
        self.state.read().expect("slot lock").clone()
    }

    fn set(&self, state: LoadState) {
        *self.state.write().expect("slot lock") = state;
    }
}

pub struct Registry {
    config: Config,
    models: RwLock<BTreeMap<String, BTreeMap<u64, Arc<Slot>>>>,
}

impl Registry {
    /// Scans the repository; every version starts out `Loading`.
    pub fn scan(config: Config) -> anyhow::Result<Self> {
        let mut models: BTreeMap<String, BTreeMap<u64, Arc<Slot>>> = BTreeMap::new();
        for dir in repository::scan(&config.repository.path)? {
            let slot = Slot {
                model: dir.model.clone(),
                version: dir.version,
                path: dir.path,
                state: RwLock::new(LoadState::Loading),
            };
            models
                .entry(dir.model)
                .or_default()
                .insert(dir.version, Arc::new(slot));
        }
        if models.is_empty() {
            tracing::warn!(path = %config.repository.path.display(), "the model repository holds no model versions");
        }
        Ok(Self {
            config,
            models: RwLock::new(models),
        })
    }

    /// Loads every version, one after another on a blocking thread. A version that fails is
    /// marked failed with its reason; the others serve. Fails only when a required execution
    /// provider is missing, which no model can work around.
    pub async fn load_all(
        &self,
        environment: &'static ort::environment::Environment,
    ) -> anyhow::Result<()> {
        for slot in self.slots() {
            let runtime = self.config.model_runtime(&slot.model);
            let path = slot.path.clone();
            let loaded =
                tokio::task::spawn_blocking(move || loader::load(environment, &path, &runtime))
                    .await?;
            match loaded.and_then(|parts| self.serve(&slot, parts)) {
                Ok(model) => {
                    tracing::info!(model = %slot.model, version = slot.version, provider = %model.pool.provider(), sessions = model.pool.size(), "model ready");
                    slot.set(LoadState::Ready(Arc::new(model)));
                }
                Err(error) => {
                    let reason = format!("{error:#}");
                    if reason.contains("required execution provider") {
                        anyhow::bail!("{}@{}: {reason}", slot.model, slot.version);
                    }
                    tracing::error!(model = %slot.model, version = slot.version, %reason, "model failed to load");
                    slot.set(LoadState::Failed(reason));
                }
            }
        }
        self.record_load_states();
        Ok(())
    }

    /// Attaches the scheduler the model's family needs.
    fn serve(&self, slot: &Slot, parts: loader::LoadedParts) -> anyhow::Result<ModelVersion> {
        let labels = ModelLabels { model: slot.model.clone(), version: slot.version.to_string() };
        let (mut batcher, mut generator) = (None, None);
        match parts.manifest.family {
            Family::Encoder => {
                batcher = Some(Batcher::spawn(Arc::clone(&parts.pool), Arc::clone(&parts.bindings), parts.pad_id, self.batcher_settings(), labels.clone()));
            }
            Family::Decoder | Family::Rnn => {
                let recurrent = parts.manifest.family == Family::Rnn;
                let decoder = DecoderModel::new(Arc::clone(&parts.bindings), parts.pool.inputs(), recurrent, parts.pad_id).map_err(anyhow::Error::msg)?;
                let generation = &self.config.generation;
                let limits = ContinuousLimits {
                    max_batch_size: generation.max_batch_size.max(1),
                    max_total_tokens: generation.max_total_tokens.max(1),
                    max_prefill_batch: generation.max_prefill_batch.max(1),
                };
                generator = Some(ContinuousScheduler::spawn(decoder, Arc::clone(&parts.pool), limits, generation.queue_capacity.max(1), labels.clone())?);
            }
        }
        let logits_width = parts
            .bindings
            .logits
            .as_ref()
            .and_then(|name| parts.pool.outputs().iter().find(|spec| &spec.name == name))
            .and_then(|spec| spec.shape.last().copied())
            .filter(|&dim| dim > 0)
            .unwrap_or(0) as usize;
        Ok(ModelVersion {
            name: slot.model.clone(),
            version: slot.version,
            vocab_size: parts.tokenizer.get_vocab_size(true).max(logits_width),
            tokenizer: Arc::new(parts.tokenizer),
            manifest: parts.manifest,
            pool: parts.pool,
            bindings: parts.bindings,
            pad_id: parts.pad_id,
            batcher,
            generator,
            labels,
        })
    }

    fn batcher_settings(&self) -> BatcherSettings {
        let batching = &self.config.batching;
        BatcherSettings {
            limits: BatchLimits {
                max_batch_size: batching.max_batch_size.max(1),
                max_batch_tokens: batching.max_batch_tokens.max(1),
                max_padding_ratio: batching.max_padding_ratio.max(0.0),
            },
            max_wait: std::time::Duration::from_micros(batching.max_wait_micros),
            queue_capacity: batching.queue_capacity.max(1),
        }
    }

    fn record_load_states(&self) {
        let (mut ready, mut failed, mut loading) = (0, 0, 0);
        for slot in self.slots() {
            match slot.state() {
                LoadState::Ready(_) => ready += 1,
                LoadState::Failed(_) => failed += 1,
                LoadState::Loading => loading += 1,
            }
        }
        metrics::models_loaded("ready", ready);
        metrics::models_loaded("failed", failed);
        metrics::models_loaded("loading", loading);
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

    /// The version slots of one model, oldest first.
    pub fn model_slots(&self, name: &str) -> Option<Vec<Arc<Slot>>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .map(|versions| versions.values().cloned().collect())
    }

    /// Whether every version has finished loading, successfully or not.
    pub fn settled(&self) -> bool {
        self.slots()
            .iter()
            .all(|slot| !matches!(slot.state(), LoadState::Loading))
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
                    .ok_or_else(|| Error::VersionNotFound {
                        model: name.to_owned(),
                        version: version.to_string(),
                        available: slots
                            .iter()
                            .map(|slot| slot.version.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                ready(slot)?
            }
            // The newest version that is ready; when none is, the newest one's reason.
            None => match slots.iter().rev().find_map(|slot| ready(slot).ok()) {
                Some(model) => model,
                None => ready(slots.last().ok_or_else(|| Error::ModelNotFound {
                    name: name.to_owned(),
                })?)?,
            },
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
        LoadState::Failed(reason) => Err(Error::ModelUnavailable {
            model: slot.model.clone(),
            version: slot.version.to_string(),
            reason,
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
