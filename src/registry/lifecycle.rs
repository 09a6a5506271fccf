//! Loading and unloading model versions: at startup, through the API, and when a repository
//! watch sees versions come and go. A replaced or unloaded version keeps serving the requests
//! that already hold it; its schedulers stop once those are done.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::loader::LoadFailure;
use super::route_changes::{self, RouteTable};
use super::state::PersistedState;
use super::{LoadState, ModelVersion, Registry, Slot, loader, repository, state};
use crate::config::{Config, VersionPolicy};
use crate::engine::{self, EngineGraphs, FaultTracker};
use crate::error::{Error, Result, Task};
use crate::telemetry::metrics::{self, ModelLabels};

fn key(model: &str, version: u64) -> String {
    format!("{model}@{version}")
}

impl Registry {
    /// Adds a `Loading` slot for each version folder the version policy and the saved state
    /// want and the registry lacks. `settle`: a folder must have stayed unchanged this long
    /// across scans first (a rescan's; at startup, None).
    pub(super) fn add_wanted_slots(
        &self,
        settle: Option<Duration>,
    ) -> anyhow::Result<Vec<Arc<Slot>>> {
        let found = repository::scan(&self.config.repository.path)?;
        let persisted = self.persisted.lock().expect("state lock").clone();
        let mut wanted = Vec::new();
        let names: BTreeSet<&str> = found.iter().map(|dir| dir.model.as_str()).collect();
        for name in names {
            let available: Vec<u64> = found
                .iter()
                .filter(|dir| dir.model == name)
                .map(|dir| dir.version)
                .collect();
            let policy = self
                .config
                .version_policy(name)
                .map_err(anyhow::Error::msg)?;
            let selected = policy.select(&available);
            wanted.extend(found.iter().filter(|dir| {
                let id = key(name, dir.version);
                dir.model == name
                    && (selected.contains(&dir.version) || persisted.loaded.contains(&id))
                    && !persisted.unloaded.contains(&id)
            }));
        }
        let present = |dir: &repository::VersionDir| {
            self.models
                .read()
                .expect("registry lock")
                .get(&dir.model)
                .is_some_and(|versions| versions.contains_key(&dir.version))
        };
        // Folders are read here, outside the registry lock that requests take.
        let ready: Vec<&repository::VersionDir> = wanted
            .into_iter()
            .filter(|dir| !present(dir))
            .filter(|dir| match settle {
                Some(quiet) if !self.settling.settled(&dir.path, quiet) => {
                    tracing::debug!(model = %dir.model, version = dir.version, "version folder still changing; loaded once it settles");
                    false
                }
                _ => true,
            })
            .collect();
        let mut added = Vec::new();
        let mut models = self.models.write().expect("registry lock");
        for dir in ready {
            let versions = models.entry(dir.model.clone()).or_default();
            if versions.contains_key(&dir.version) {
                continue;
            }
            let slot = Arc::new(Slot::new(dir.model.clone(), dir.version, dir.path.clone()));
            versions.insert(dir.version, Arc::clone(&slot));
            added.push(slot);
        }
        Ok(added)
    }

    /// Loads every slot still `Loading`, one after another, then installs the routes. A version
    /// that fails is marked failed with its reason; the others serve. Fails only when a required
    /// execution provider is missing, which no model can work around.
    pub async fn load_all(
        &self,
        environment: &'static ort::environment::Environment,
    ) -> anyhow::Result<()> {
        let _ = self.environment.set(environment);
        for slot in self
            .slots()
            .into_iter()
            .filter(|slot| matches!(slot.state(), LoadState::Loading))
        {
            if let Err(failure) = self.load_slot(&slot).await
                && failure.fatal
            {
                anyhow::bail!("{}@{}: {}", slot.model, slot.version, failure.reason);
            }
        }
        self.install_startup_routes();
        self.record_load_states();
        Ok(())
    }

    /// Loads one slot on a blocking thread and publishes the result in it.
    async fn load_slot(&self, slot: &Arc<Slot>) -> Result<(), Arc<LoadFailure>> {
        let failure = |reason: String| {
            Arc::new(LoadFailure {
                reason,
                graph: None,
                fatal: false,
            })
        };
        let environment = *self
            .environment
            .get()
            .ok_or_else(|| failure("the runtime is not initialised yet".into()))?;
        *slot.loaded_from.lock().expect("slot lock") = repository::Contents::of(&slot.path);
        let served = if let Some(reason) = unnameable(&slot.model, &self.config.limits) {
            Err(LoadFailure {
                reason,
                graph: None,
                fatal: false,
            })
        } else {
            let runtime = self.config.model_runtime(&slot.model);
            let path = slot.path.clone();
            let config = self.config.clone();
            let (model, version) = (slot.model.clone(), slot.version);
            // Starting the engine runs the load-time rehearsal (a decoder's prefill and steps):
            // on the blocking thread too, not on an async worker that gRPC calls are waiting for.
            tokio::task::spawn_blocking(move || {
                let parts = loader::load(environment, &config.repository.path, &path, &runtime)?;
                let graph = parts.pool.graph().clone();
                serve(&config, &model, version, parts).map_err(|error| LoadFailure {
                    reason: format!("{error:#}. The {graph}"),
                    graph: Some(graph),
                    fatal: false,
                })
            })
            .await
            .map_err(|error| failure(format!("loader failed: {error}")))?
        };
        match served {
            Ok(model) => {
                tracing::info!(model = %slot.model, version = slot.version, provider = %model.pool.provider(), sessions = model.pool.size(), narrow_lanes = model.pool.narrow().map_or(0, |lanes| lanes.size()), "model ready");
                slot.set(LoadState::Ready(Arc::new(model)));
                Ok(())
            }
            Err(failure) => {
                let failure = Arc::new(failure);
                tracing::error!(model = %slot.model, version = slot.version, reason = %failure.reason, "model failed to load");
                // A reload that fails leaves the working version in place.
                if !matches!(slot.state(), LoadState::Ready(_)) {
                    slot.set(LoadState::Failed(Arc::clone(&failure)));
                }
                Err(failure)
            }
        }
    }

    /// Sets `lmserve_models_loaded` from the versions' states now.
    pub(crate) fn record_load_states(&self) {
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

    /// Loads (or reloads) `name`'s versions from the repository folder: one version, or those
    /// its policy selects. Each loads off to the side; once it is warm and the change is saved,
    /// it replaces what the registry had (requests in flight finish on the old instance). A
    /// version that fails to load changes nothing that is saved, and a working instance keeps
    /// serving.
    pub async fn load_model(&self, name: &str, version: Option<u64>) -> Result<Vec<u64>> {
        check_model_name(name, &self.config.limits)?;
        let _one_at_a_time = self.loads.lock().await;
        let found: Vec<_> = repository::scan(&self.config.repository.path)
            .map_err(|error| Error::Internal(format!("scanning the repository: {error:#}")))?
            .into_iter()
            .filter(|dir| dir.model == name)
            .collect();
        if found.is_empty() {
            return Err(Error::ModelNotFound {
                name: name.to_owned(),
            });
        }
        let available: Vec<u64> = found.iter().map(|dir| dir.version).collect();
        let policy = self
            .config
            .version_policy(name)
            .unwrap_or(VersionPolicy::All);
        let selected = policy.select(&available);
        let versions = match version {
            Some(version) if available.contains(&version) => vec![version],
            Some(version) => {
                return Err(Error::version_not_found(
                    name,
                    version,
                    available.iter().copied(),
                ));
            }
            None => selected.clone(),
        };
        let mut failures = Vec::new();
        for dir in found.iter().filter(|dir| versions.contains(&dir.version)) {
            let fresh = Arc::new(Slot::new(dir.model.clone(), dir.version, dir.path.clone()));
            // Looked up again after the load: an UnloadModel meanwhile may have taken the slot
            // there was out of the registry, and one filled then would serve no one.
            let existing = || {
                self.models
                    .read()
                    .expect("registry lock")
                    .get(name)
                    .and_then(|v| v.get(&dir.version).cloned())
            };
            let was_listed = existing().is_some();
            let loaded = self.load_slot(&fresh).await;
            match loaded {
                Ok(()) => {
                    let id = key(name, dir.version);
                    let by_policy = selected.contains(&dir.version);
                    let _edits = self.route_edits.lock().expect("route edits lock");
                    let routes = self.routes.read().expect("routes lock").clone();
                    let _membership = self.membership.lock().expect("membership lock");
                    self.commit(&routes, |persisted| {
                        persisted.unloaded.remove(&id);
                        if !by_policy {
                            persisted.loaded.insert(id.clone());
                        }
                    })?;
                    self.install(existing(), fresh);
                }
                Err(failure) => {
                    failures.push(format!("{name}@{}: {}", dir.version, failure.reason));
                    let _membership = self.membership.lock().expect("membership lock");
                    match existing() {
                        // A working instance keeps serving; the failure is in the answer.
                        Some(slot) if matches!(slot.state(), LoadState::Ready(_)) => {}
                        Some(slot) => slot.set(LoadState::Failed(failure)),
                        // Listed as failed where it was not listed before; not where an
                        // UnloadModel took it out meanwhile.
                        None if !was_listed => self.install(None, fresh),
                        None => {}
                    }
                }
            }
        }
        self.record_load_states();
        if failures.len() < versions.len() {
            self.retry_routes();
        }
        if !failures.is_empty() {
            return Err(Error::ModelUnavailable {
                model: name.to_owned(),
                version: versions
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                reason: failures.join("; "),
            });
        }
        Ok(versions)
    }

    /// Puts a loaded (or failed) slot in the registry: into the existing slot, so that whoever
    /// holds it sees the new instance, or as a new version.
    fn install(&self, existing: Option<Arc<Slot>>, fresh: Arc<Slot>) {
        match existing {
            Some(slot) => slot.set(fresh.state.read().expect("slot lock").clone()),
            None => {
                self.models
                    .write()
                    .expect("registry lock")
                    .entry(fresh.model.clone())
                    .or_default()
                    .insert(fresh.version, fresh);
            }
        }
    }

    /// Unloads `name` (every version, or one). Refused while a route uses what would go.
    pub fn unload_model(&self, name: &str, version: Option<u64>) -> Result<Vec<u64>> {
        check_model_name(name, &self.config.limits)?;
        // Both held from reading the versions until they are gone: SetRoute checks its targets
        // under route_edits too, and another unload (or a scan that found a folder gone) waits,
        // so no two removals each leave a route the version the other took.
        let edits = self.route_edits.lock().expect("route edits lock");
        let routes = self.routes.read().expect("routes lock").clone();
        let membership = self.membership.lock().expect("membership lock");
        let slots = self.model_slots(name).ok_or_else(|| Error::ModelNotFound {
            name: name.to_owned(),
        })?;
        let versions: Vec<u64> = match version {
            Some(version) if slots.iter().any(|slot| slot.version == version) => vec![version],
            Some(version) => {
                return Err(Error::version_not_found(
                    name,
                    version,
                    slots.iter().map(|slot| slot.version),
                ));
            }
            None => slots.iter().map(|slot| slot.version).collect(),
        };
        let leaves_none = |task| !serves_besides(&slots, &versions, task);
        if let Some(using) = Self::route_using(&routes, name, &versions, leaves_none) {
            let others_left = using.by_bare_name && slots.len() > versions.len();
            return Err(Error::FailedPrecondition(format!(
                "route `{}` uses {name}{}{}; change or delete the route first",
                using.route,
                version.map(|v| format!("@{v}")).unwrap_or_default(),
                if others_left {
                    format!(", and no version left is ready to serve {}", using.task)
                } else {
                    String::new()
                }
            )));
        }
        self.commit(&routes, |persisted| {
            for &version in &versions {
                persisted.loaded.remove(&key(name, version));
                persisted.unloaded.insert(key(name, version));
            }
        })?;
        self.remove_versions(name, &versions);
        drop(membership);
        drop(edits);
        self.record_load_states();
        tracing::info!(model = name, ?versions, "unloaded");
        Ok(versions)
    }

    fn remove_versions(&self, name: &str, versions: &[u64]) {
        let mut models = self.models.write().expect("registry lock");
        if let Some(slots) = models.get_mut(name) {
            for version in versions {
                // Requests holding this version finish on it; it is dropped with the last one.
                slots.remove(version);
            }
            if slots.is_empty() {
                models.remove(name);
            }
        }
    }

    /// Saves a management change before it takes effect: `change` edits a copy of the saved
    /// state and `routes` is the route table as it will be. Only once the copy is on disk does it
    /// become the saved state, and only then may the caller apply the change; when it cannot be
    /// written nothing changes and the caller gets the reason.
    pub(super) fn commit(
        &self,
        routes: &RouteTable,
        change: impl FnOnce(&mut PersistedState),
    ) -> Result<()> {
        let mut persisted = self.persisted.lock().expect("state lock");
        let mut next = persisted.clone();
        change(&mut next);
        next.api_routes = route_changes::api_routes(routes);
        // Saved routes waiting for their targets stay saved.
        for (name, route) in &self.waiting_routes.lock().expect("routes lock").api {
            next.api_routes
                .entry(name.clone())
                .or_insert_with(|| route.clone());
        }
        if next == *persisted {
            return Ok(());
        }
        if let Some(path) = &self.config.state.path
            && let Err(error) = state::write(path, &next)
        {
            tracing::error!(path = %path.display(), %error, "cannot write the state file; the change is not applied");
            return Err(Error::Internal(format!(
                "the change was not applied: the server cannot save it ({error})"
            )));
        }
        *persisted = next;
        Ok(())
    }

    /// Watches the repository folder: loads versions that appear (as policy and state allow)
    /// and unloads versions whose folder is gone, unless a route still uses them.
    pub async fn watch(self: Arc<Self>) {
        let interval = self.config.repository.poll_interval_ms;
        if interval == 0 {
            return;
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(interval));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(error) = self.rescan().await {
                tracing::warn!(error = %format!("{error:#}"), "repository rescan failed");
            }
        }
    }

    async fn rescan(&self) -> anyhow::Result<()> {
        let _one_at_a_time = self.loads.lock().await;
        let mut loaded = false;
        let settle = Duration::from_millis(self.config.repository.settle_ms);
        for slot in self.add_wanted_slots(Some(settle))? {
            tracing::info!(model = %slot.model, version = slot.version, "new version in the repository");
            loaded |= self.load_slot(&slot).await.is_ok();
        }
        // A version copied in while a scan ran fails on the half-copied folder; once its files
        // change it is tried again, where a folder left as it was is not reloaded every poll.
        for slot in self.slots() {
            if slot.failed_and_changed() && self.settling.settled(&slot.path, settle) {
                tracing::info!(model = %slot.model, version = slot.version, "loading again a version that failed: its files changed");
                loaded |= self.load_slot(&slot).await.is_ok();
            }
        }
        if loaded {
            self.retry_routes();
        }
        let on_disk: BTreeSet<(String, u64)> = repository::scan(&self.config.repository.path)?
            .into_iter()
            .map(|dir| (dir.model, dir.version))
            .collect();
        for slot in self.slots() {
            if on_disk.contains(&(slot.model.clone(), slot.version)) {
                continue;
            }
            // As an unload holds them: the check and the removal in one step.
            let _edits = self.route_edits.lock().expect("route edits lock");
            let routes = self.routes.read().expect("routes lock").clone();
            let _membership = self.membership.lock().expect("membership lock");
            let others = self.model_slots(&slot.model).unwrap_or_default();
            let leaves_none = |task| !serves_besides(&others, &[slot.version], task);
            match Self::route_using(&routes, &slot.model, &[slot.version], leaves_none) {
                Some(using) => {
                    tracing::warn!(model = %slot.model, version = slot.version, route = %using.route, "version folder removed but a route uses it; keeping it loaded")
                }
                None => {
                    tracing::info!(model = %slot.model, version = slot.version, "version folder removed; unloading");
                    self.remove_versions(&slot.model, &[slot.version]);
                }
            }
        }
        self.record_load_states();
        Ok(())
    }
}

/// Whether a version of `slots` other than `going` is ready to serve `task`: what a route
/// naming the bare model still has after they go. One still loading does not count, as it may
/// yet fail.
fn serves_besides(slots: &[Arc<Slot>], going: &[u64], task: Task) -> bool {
    slots
        .iter()
        .filter(|slot| !going.contains(&slot.version))
        .filter_map(|slot| slot.ready())
        .any(|model| model.manifest.serves(task))
}

/// The reason no request could name the model in folder `name`, or None when one can. A
/// request's target is held to `limits.max_name_bytes`, may not carry control characters, is
/// trimmed, and splits at `@` into a name and a version; a file system allows all of these in a
/// folder name, and names longer than the default limit. Such a folder is reported as failed
/// rather than loaded and held in memory for nothing.
fn unnameable(name: &str, limits: &crate::config::LimitsConfig) -> Option<String> {
    let reason = match crate::tasks::limits::check_name("its folder name", name, limits) {
        Err(error) => format!(
            "{error}; rename the folder, or raise limits.max_name_bytes if the name is too long"
        ),
        Ok(()) if !matches!(super::parse_target(name), Ok((parsed, None)) if parsed == name) => {
            format!(
                "its folder name {} holds `@` (a request reads what follows as a version) or \
                 starts or ends with a space (a request is trimmed); rename the folder",
                crate::error::echo(name)
            )
        }
        Ok(()) => return None,
    };
    Some(format!("no request could name this model: {reason}"))
}

/// A model name from a client must stay inside the repository folder.
fn check_model_name(name: &str, limits: &crate::config::LimitsConfig) -> Result<()> {
    crate::tasks::limits::check_name("name", name, limits)?;
    if name.is_empty() {
        return Err(Error::invalid(
            "name",
            "must name a model folder; got an empty string",
        ));
    }
    if name.contains('/')
        || name.contains('\\')
        || name.contains("..")
        || name.contains('\0')
        || name.starts_with('.')
    {
        return Err(Error::invalid(
            "name",
            format!(
                "`{name}` must be a plain folder name inside the repository (no path separators, no \"..\")"
            ),
        ));
    }
    Ok(())
}

/// Starts the engine the model's family needs.
fn serve(
    config: &Config,
    model: &str,
    version: u64,
    parts: loader::LoadedParts,
) -> anyhow::Result<ModelVersion> {
    let labels = ModelLabels {
        model: model.to_owned(),
        version: version.to_string(),
    };
    let faults = Arc::new(FaultTracker::new(config.runtime.max_consecutive_failures));

    let pad_id = i64::from(parts.settings.pad_token_id.value);
    let engine = engine::start(
        EngineGraphs {
            family: parts.manifest.family,
            pool: Arc::clone(&parts.pool),
            bindings: Arc::clone(&parts.bindings),
            pad_id,
            best_batch: parts.settings.best_batch.as_ref().map(|best| best.value),
            seq2seq: parts.seq2seq,
        },
        config,
        &labels,
        &faults,
    )?;
    let logits_width = parts
        .bindings
        .logits
        .as_ref()
        .and_then(|name| parts.pool.outputs().iter().find(|spec| &spec.name == name))
        .and_then(|spec| spec.shape.last().copied())
        .filter(|&dim| dim > 0)
        .unwrap_or(0) as usize;
    Ok(ModelVersion {
        name: model.to_owned(),
        version,
        vocab_size: parts.tokenizer.get_vocab_size(true).max(logits_width),
        input_vocab_size: match logits_width {
            0 => parts.tokenizer.get_vocab_size(true),
            width => width,
        },
        tokenizer: Arc::new(parts.tokenizer),
        manifest: parts.manifest,
        settings: parts.settings,
        chat: parts.chat,
        pool: parts.pool,
        bindings: parts.bindings,
        pad_id,
        engine,
        labels,
        faults,
    })
}
