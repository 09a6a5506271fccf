//! Loads one model version: manifest, Hugging Face files, tokenizer, sessions, bindings and
//! effective settings; then a warm-up run on every session. Any mismatch fails this version
//! alone, with a reason a person can act on and, once the graph is known, its inputs and outputs.

use std::path::Path;
use std::sync::Arc;

use anyhow::bail;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence};
use tokenizers::{ModelWrapper, Tokenizer};

use super::bindings;
use super::chat::{self, ChatTemplate};
use super::hf::HfFiles;
use super::manifest::{Family, MODEL_FILE, Manifest};
use super::seq2seq;
use super::settings::{ModelSettings, Source, Sourced};
use crate::config::ModelRuntime;
use crate::runtime::bindings::Bindings;
use crate::runtime::decoder::seq2seq::Seq2SeqDecoder;
use crate::runtime::session::RequiredProviderMissing;
use crate::runtime::{GraphIo, SessionPool, batch_size, memory, warmup};

/// Everything a loaded version needs to serve, before its engine is attached.
pub struct LoadedParts {
    pub manifest: Manifest,
    pub tokenizer: Tokenizer,
    pub pool: Arc<SessionPool>,
    pub bindings: Arc<Bindings>,
    pub settings: ModelSettings,
    /// The compiled chat template, for a generating model that has one.
    pub chat: Option<Arc<ChatTemplate>>,
    /// The encoder and first-step graphs beside `pool`'s step graph, for an encoder-decoder.
    pub seq2seq: Option<Seq2SeqDecoder>,
}

/// Why a version did not load, with the graph's inputs and outputs when it got that far.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub reason: String,
    pub graph: Option<GraphIo>,
    /// A required execution provider could not register: no model can work around that, so
    /// startup stops.
    pub fatal: bool,
}

impl LoadFailure {
    /// The failure of the version in `dir`. Its reason reaches clients, so the server's own
    /// paths are left out of it (ONNX Runtime's messages name the file they read).
    fn new(error: anyhow::Error, graph: Option<&GraphIo>, dir: &Path) -> Self {
        let fatal = error.downcast_ref::<RequiredProviderMissing>().is_some();
        let reason = match graph {
            Some(graph) => format!("{error:#}. The {graph}"),
            None => format!("{error:#}"),
        };
        Self {
            reason: without_paths(reason, dir),
            graph: graph.cloned(),
            fatal,
        }
    }
}

fn without_paths(mut reason: String, dir: &Path) -> String {
    for path in [dir.canonicalize().ok(), Some(dir.to_path_buf())]
        .into_iter()
        .flatten()
    {
        let shown = path.display().to_string();
        if !shown.is_empty() {
            reason = reason
                .replace(&format!("{shown}/"), "")
                .replace(&shown, ".");
        }
    }
    reason
}

/// Loads the version in `dir`, whose files must all lie inside `root` (the repository): a
/// symlink that leads elsewhere is refused rather than read.
pub fn load(
    environment: &ort::environment::Environment,
    root: &Path,
    dir: &Path,
    runtime: &ModelRuntime,
) -> Result<LoadedParts, LoadFailure> {
    let fail = |error: anyhow::Error, graph: Option<&GraphIo>| LoadFailure::new(error, graph, dir);
    check_contained(root, dir).map_err(|error| fail(error, None))?;
    let (manifest, files, tokenizer) = read_files(dir).map_err(|error| fail(error, None))?;
    // A generating model's scheduler steps one session; more would only hold more copies of
    // its weights (and of ONNX Runtime's prepacked ones).
    let encoder = manifest.family == Family::Encoder;
    let runtime = &ModelRuntime {
        sessions: if encoder { runtime.sessions } else { 1 },
        narrow_lanes: if encoder { runtime.narrow_lanes } else { 0 },
        ..runtime.clone()
    };
    let loaded = if manifest.family == Family::EncoderDecoder {
        let pools = seq2seq::open(environment, &manifest, dir, runtime)
            .map_err(|error| fail(error, None))?;
        let graph = pools.step.graph().clone();
        prepare_seq2seq(manifest, files, tokenizer, pools)
            .map_err(|error| fail(error, Some(&graph)))?
    } else {
        if !dir.join(MODEL_FILE).is_file() {
            return Err(fail(
                anyhow::anyhow!("{MODEL_FILE} is missing from the version folder"),
                None,
            ));
        }
        let pool = open_graph(environment, dir, runtime).map_err(|error| fail(error, None))?;
        let graph = pool.graph().clone();
        prepare(manifest, files, tokenizer, pool).map_err(|error| fail(error, Some(&graph)))?
    };
    // Warm-up and prepacking have read the weights files through; what stays mapped is read a
    // few rows at a time, so its pages need not stay resident.
    let mapped = memory::page_out_files(dir);
    // Parsing the graph and prepacking freed more than a model's worth of heap.
    memory::give_back();
    tracing::debug!(dir = %dir.display(), mapped_mib = mapped >> 20, "weights file pages handed back");
    Ok(loaded)
}

/// Refuses a version folder any of whose files (followed through symlinks) lies outside `root`.
fn check_contained(root: &Path, dir: &Path) -> anyhow::Result<()> {
    let root = root
        .canonicalize()
        .map_err(|error| anyhow::anyhow!("reading the repository folder: {error}"))?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            let relative = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let resolved = path
                .canonicalize()
                .map_err(|error| anyhow::anyhow!("{relative}: {error}"))?;
            if !resolved.starts_with(&root) {
                bail!(
                    "{relative} leads outside the model repository; copy the file into the version folder instead"
                );
            }
            if resolved.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(())
}

/// The sessions of the version's `model.onnx` (with its external data file, if any).
pub fn open_graph(
    environment: &ort::environment::Environment,
    dir: &Path,
    runtime: &ModelRuntime,
) -> anyhow::Result<SessionPool> {
    SessionPool::load(environment, &dir.join(MODEL_FILE), runtime)
        .map_err(|error| error.context(format!("loading {MODEL_FILE}")))
}

/// The manifest, the Hugging Face files and the tokenizer, which need no ONNX Runtime.
pub fn read_files(dir: &Path) -> anyhow::Result<(Manifest, HfFiles, Tokenizer)> {
    let manifest = Manifest::read(dir)?;
    let files = HfFiles::read(dir)?;
    let tokenizer = read_tokenizer(dir, &manifest, &files)?;
    Ok((manifest, files, tokenizer))
}

pub fn read_tokenizer(
    dir: &Path,
    manifest: &Manifest,
    files: &HfFiles,
) -> anyhow::Result<Tokenizer> {
    let name = manifest.tokenizer.display();
    let mut tokenizer = Tokenizer::from_file(dir.join(&manifest.tokenizer))
        .map_err(|error| anyhow::anyhow!("loading the tokenizer {name}: {error}"))?;
    // The server pads and truncates itself; a tokenizer.json that does either would hide limits.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|error| anyhow::anyhow!("clearing truncation of {name}: {error}"))?;
    without_word_cache(&mut tokenizer);
    if files
        .sentence_transformers
        .as_ref()
        .is_some_and(|st| st.lowercase)
    {
        lowercase_first(&mut tokenizer)
            .map_err(|error| anyhow::anyhow!("lowercasing in {name}: {error}"))?;
    }
    Ok(tokenizer)
}

/// sentence-transformers' `do_lower_case`: a Lowercase normalizer ahead of the tokenizer's own,
/// unless it already has one, as sentence-transformers (6.3) adds it. The Tokenize RPC then
/// shows the tokens the model is fed.
fn lowercase_first(tokenizer: &mut Tokenizer) -> tokenizers::Result<()> {
    let mut normalizers = vec![NormalizerWrapper::Lowercase(Lowercase)];
    match tokenizer.get_normalizer() {
        None => {}
        Some(NormalizerWrapper::Lowercase(_)) => return Ok(()),
        Some(NormalizerWrapper::Sequence(sequence)) => {
            if sequence
                .as_ref()
                .iter()
                .any(|normalizer| matches!(normalizer, NormalizerWrapper::Lowercase(_)))
            {
                return Ok(());
            }
            normalizers.extend(sequence.as_ref().iter().cloned());
        }
        Some(other) => normalizers.push(other.clone()),
    }
    tokenizer.with_normalizer(Some(Sequence::new(normalizers)))?;
    Ok(())
}

/// Turns off a BPE model's cache of tokenized words. tokenizers (0.23) keeps that cache in
/// each thread that tokenizes, keyed by the model instance, and frees none of it when the
/// instance is dropped: every load of a BPE model left up to 10,000 words behind in every
/// blocking-pool thread that served it, so a server under traffic grew with each reload (the
/// soak benchmark went from 272 to 770 MiB in 20 minutes). Without the cache, SmolLM2's
/// tokenizer takes 1.1 us a token instead of 0.95, against milliseconds for a model run.
fn without_word_cache(tokenizer: &mut Tokenizer) {
    if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
        // A clone starts with an empty cache of its own; the model then caches nothing.
        let mut bpe = bpe.clone();
        bpe.resize_cache(0);
        tokenizer.with_model(bpe);
    }
}

/// An encoder-decoder's parts: its step graph stands where other families' one graph does.
fn prepare_seq2seq(
    manifest: Manifest,
    files: HfFiles,
    tokenizer: Tokenizer,
    pools: seq2seq::Seq2SeqPools,
) -> anyhow::Result<LoadedParts> {
    let (pool, bindings, settings, decoder) =
        seq2seq::prepare(&manifest, &files, &tokenizer, pools)?;
    let chat = chat::for_model(&settings, &files, &tokenizer)?.map(Arc::new);
    Ok(LoadedParts {
        manifest,
        tokenizer,
        pool,
        bindings,
        settings,
        chat,
        seq2seq: Some(decoder),
    })
}

/// Binds the graph, works out the settings and warms every session up.
pub fn prepare(
    manifest: Manifest,
    files: HfFiles,
    tokenizer: Tokenizer,
    pool: SessionPool,
) -> anyhow::Result<LoadedParts> {
    let mut bindings = bindings::resolve(&manifest, pool.graph())?;
    if manifest.family == Family::Encoder {
        bindings.first_position = files
            .config
            .as_ref()
            .map_or(0, |config| config.first_position());
    }
    if manifest.family == Family::Rnn && !bindings.has_state() {
        bail!("an rnn model must carry state between steps; map it in [state]");
    }
    let mut settings =
        ModelSettings::resolve(&manifest, &files, &tokenizer, pool.graph(), &bindings)?;
    let chat = chat::for_model(&settings, &files, &tokenizer)?.map(Arc::new);
    let pad_id = i64::from(settings.pad_token_id.value);
    let pool = Arc::new(pool);
    let inputs = pool.inputs().to_vec();
    pool.each_session(|session| warmup::run(session, &bindings, &inputs, pad_id))
        .map_err(|error| {
            anyhow::anyhow!("warm-up run failed (does the manifest match the graph?): {error}")
        })?;
    if manifest.family == Family::Encoder {
        let (best, timed) = batch_size::best_batch(
            &mut pool.session(0),
            &bindings,
            pad_id,
            settings.max_length.value,
        )
        .map_err(|error| anyhow::anyhow!("timing batch sizes failed: {error}"))?;
        tracing::info!(rows = best.rows, tokens = best.tokens, %timed, "encoder batch limits timed");
        settings.best_batch = Some(Sourced {
            value: best,
            source: Source::Measured,
        });
    }
    Ok(LoadedParts {
        manifest,
        tokenizer,
        pool,
        bindings: Arc::new(bindings),
        settings,
        chat,
        seq2seq: None,
    })
}
