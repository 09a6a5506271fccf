//! Loads one model version: manifest, tokenizer, sessions, bindings; then a warm-up run on
//! every session. Any mismatch fails this version alone, with a reason a person can act on.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokenizers::Tokenizer;

use super::bindings;
use super::manifest::{Family, MODEL_FILE, Manifest};
use crate::config::ModelRuntime;
use crate::runtime::bindings::Bindings;
use crate::runtime::{SessionPool, warmup};

/// Everything a loaded version needs to serve, before schedulers are attached.
pub struct LoadedParts {
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
    pub pool: Arc<SessionPool>,
    pub bindings: Arc<Bindings>,
    pub pad_id: i64,
}

pub fn load(
    environment: &ort::environment::Environment,
    dir: &Path,
    runtime: &ModelRuntime,
) -> anyhow::Result<LoadedParts> {
    let manifest = Manifest::read(dir)?;
    let tokenizer_path = dir.join(&manifest.tokenizer);
    let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|error| {
        anyhow::anyhow!("loading tokenizer {}: {error}", tokenizer_path.display())
    })?;
    // The server pads and truncates itself; a tokenizer.json that does either would hide limits.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|error| {
        anyhow::anyhow!(
            "clearing truncation of {}: {error}",
            tokenizer_path.display()
        )
    })?;

    let model_file = dir.join(MODEL_FILE);
    if !model_file.is_file() {
        bail!("{} is missing", model_file.display());
    }
    let pool = SessionPool::load(environment, &model_file, runtime)
        .with_context(|| format!("loading {}", model_file.display()))?;
    let bindings = bindings::resolve(&manifest, pool.inputs(), pool.outputs())?;
    if manifest.family == Family::Rnn && !bindings.has_state() {
        bail!("an rnn model must carry state between steps");
    }

    let vocab = tokenizer.get_vocab_size(true);
    let pad_id = manifest.pad_token_id.unwrap_or(0);
    if pad_id as usize >= vocab {
        bail!("pad_token_id {pad_id} is outside the tokenizer's vocabulary of {vocab}");
    }
    let pool = Arc::new(pool);
    let inputs = pool.inputs().to_vec();
    pool.each_session(|session| warmup::run(session, &bindings, &inputs, pad_id as i64))
        .map_err(|error| {
            anyhow::anyhow!("warm-up run failed (does the manifest match the graph?): {error}")
        })?;
    Ok(LoadedParts {
        manifest,
        tokenizer,
        pool,
        bindings: Arc::new(bindings),
        pad_id: pad_id as i64,
    })
}
