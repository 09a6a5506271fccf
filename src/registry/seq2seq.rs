//! An encoder-decoder's graphs: which files the version holds, which layout they follow, and
//! which step input each of the encoder's results feeds.
//!
//! - optimum's split export: `encoder_model.onnx`, `decoder_model.onnx` (the first step, fed
//!   the encoder's hidden states) and `decoder_with_past_model.onnx` (later steps, fed the
//!   cross-attention keys and values the first step returned);
//! - optimum's merged export: `decoder_model_merged.onnx`, both steps in one graph chosen by
//!   `use_cache_branch`;
//! - a single step graph fed the encoder outputs `[encoder_outputs]` names, from the first step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use tokenizers::Tokenizer;

use super::bindings;
use super::hf::HfFiles;
use super::manifest::{GraphFiles, Manifest};
use super::settings::ModelSettings;
use crate::config::ModelRuntime;
use crate::runtime::bindings::Bindings;
use crate::runtime::decoder::StepGraph;
use crate::runtime::decoder::seq2seq::{EncoderGraph, FirstStep, Seq2SeqDecoder};
use crate::runtime::step::StepDecoder;
use crate::runtime::{GraphIo, SessionPool};

const ENCODER_FILE: &str = "encoder_model.onnx";
const DECODER_FILE: &str = "decoder_model.onnx";
const DECODER_WITH_PAST_FILE: &str = "decoder_with_past_model.onnx";
const DECODER_MERGED_FILE: &str = "decoder_model_merged.onnx";
const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const ENCODER_HIDDEN_STATES: &str = "encoder_hidden_states";
const ENCODER_ATTENTION_MASK: &str = "encoder_attention_mask";
const LAST_HIDDEN_STATE: &str = "last_hidden_state";
const USE_CACHE_BRANCH: &str = "use_cache_branch";
const PRESENT_PREFIX: &str = "present.";
const PAST_PREFIX: &str = "past_key_values.";
/// optimum marks the cross-attention cache with this part of the name.
const CROSS_ATTENTION_PART: &str = ".encoder.";

/// Which graph files a version's layout uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Files {
    /// The step graph alone, fed the encoder's outputs.
    Step {
        encoder: PathBuf,
        step: PathBuf,
    },
    Split {
        encoder: PathBuf,
        first: PathBuf,
        step: PathBuf,
    },
    Merged {
        encoder: PathBuf,
        merged: PathBuf,
    },
}

impl Files {
    /// `[graphs]` as written, or optimum's file names where the folder has them.
    fn find(graphs: Option<&GraphFiles>, dir: &Path) -> anyhow::Result<Self> {
        let named = graphs.cloned().unwrap_or_default();
        let or_standard = |set: &Option<PathBuf>, standard: &str| {
            set.clone().or_else(|| {
                let path = PathBuf::from(standard);
                dir.join(&path).is_file().then_some(path)
            })
        };
        let encoder = or_standard(&named.encoder, ENCODER_FILE).ok_or_else(|| {
            anyhow::anyhow!(
                "an encoder-decoder needs an encoder graph: {ENCODER_FILE}, or [graphs].encoder"
            )
        })?;
        let files = if let Some(merged) = named.decoder_merged.clone() {
            Files::Merged { encoder, merged }
        } else if graphs.is_some() {
            match (named.decoder, named.decoder_with_past) {
                (Some(first), Some(step)) => Files::Split {
                    encoder,
                    first,
                    step,
                },
                (Some(step), None) => Files::Step { encoder, step },
                (None, _) => bail!(
                    "[graphs] names no decoder; set decoder (and decoder_with_past for optimum's split export) or decoder_merged"
                ),
            }
        } else if dir.join(DECODER_WITH_PAST_FILE).is_file() && dir.join(DECODER_FILE).is_file() {
            Files::Split {
                encoder,
                first: DECODER_FILE.into(),
                step: DECODER_WITH_PAST_FILE.into(),
            }
        } else if dir.join(DECODER_MERGED_FILE).is_file() {
            Files::Merged {
                encoder,
                merged: DECODER_MERGED_FILE.into(),
            }
        } else {
            bail!(
                "no decoder graph: the folder has neither {DECODER_FILE} with {DECODER_WITH_PAST_FILE} nor {DECODER_MERGED_FILE}; name the graphs in [graphs]"
            )
        };
        for file in files.all() {
            if !dir.join(file).is_file() {
                bail!("{} is missing from the version folder", file.display());
            }
        }
        Ok(files)
    }

    fn all(&self) -> Vec<&Path> {
        match self {
            Files::Step { encoder, step } => vec![encoder, step],
            Files::Split {
                encoder,
                first,
                step,
            } => vec![encoder, first, step],
            Files::Merged { encoder, merged } => vec![encoder, merged],
        }
        .into_iter()
        .map(PathBuf::as_path)
        .collect()
    }
}

/// Whether `dir` holds an encoder-decoder: its manifest says so, or it has no manifest and no
/// model.onnx but optimum's encoder_model.onnx.
pub fn is_encoder_decoder(dir: &Path) -> bool {
    match Manifest::read(dir) {
        Ok(manifest) => manifest.family == crate::kinds::Family::EncoderDecoder,
        Err(_) => {
            !dir.join(super::manifest::MANIFEST_FILE).is_file()
                && !dir.join(super::manifest::MODEL_FILE).is_file()
                && dir.join(ENCODER_FILE).is_file()
        }
    }
}

/// The sessions of an encoder-decoder's graphs.
pub struct Seq2SeqPools {
    files: Files,
    pub encoder: Arc<SessionPool>,
    /// optimum's separate first-step graph.
    pub first: Option<Arc<SessionPool>>,
    /// The graph every later step runs; with the merged export, every step.
    pub step: SessionPool,
}

impl Seq2SeqPools {
    /// Each graph with what it does, for a person reading them.
    pub fn graphs(&self) -> Vec<(String, &GraphIo)> {
        let name = |file: &Path| file.display().to_string();
        match &self.files {
            Files::Step { encoder, step } => vec![
                (format!("encoder ({})", name(encoder)), self.encoder.graph()),
                (format!("decoder step ({})", name(step)), self.step.graph()),
            ],
            Files::Split {
                encoder,
                first,
                step,
            } => {
                let mut graphs =
                    vec![(format!("encoder ({})", name(encoder)), self.encoder.graph())];
                if let Some(first_pool) = &self.first {
                    graphs.push((
                        format!("first decoder step ({})", name(first)),
                        first_pool.graph(),
                    ));
                }
                graphs.push((
                    format!("later decoder steps ({})", name(step)),
                    self.step.graph(),
                ));
                graphs
            }
            Files::Merged { encoder, merged } => vec![
                (format!("encoder ({})", name(encoder)), self.encoder.graph()),
                (
                    format!("merged decoder ({})", name(merged)),
                    self.step.graph(),
                ),
            ],
        }
    }
}

/// Opens every graph the version's layout uses.
pub fn open(
    environment: &ort::environment::Environment,
    manifest: &Manifest,
    dir: &Path,
    runtime: &ModelRuntime,
) -> anyhow::Result<Seq2SeqPools> {
    let files = Files::find(manifest.graphs.as_ref(), dir)?;
    let load = |file: &Path| {
        SessionPool::load(environment, &dir.join(file), runtime)
            .with_context(|| format!("loading {}", file.display()))
    };
    let (encoder, first, step) = match &files {
        Files::Step { encoder, step } => (load(encoder)?, None, load(step)?),
        Files::Split {
            encoder,
            first,
            step,
        } => (load(encoder)?, Some(Arc::new(load(first)?)), load(step)?),
        Files::Merged { encoder, merged } => (load(encoder)?, None, load(merged)?),
    };
    Ok(Seq2SeqPools {
        files,
        encoder: Arc::new(encoder),
        first,
        step,
    })
}

fn has_input(graph: &GraphIo, name: &str) -> bool {
    graph.inputs.iter().any(|spec| spec.name == name)
}

fn has_output(graph: &GraphIo, name: &str) -> bool {
    graph.outputs.iter().any(|spec| spec.name == name)
}

/// The decoder's own carried state (`present.X` fed back as `past_key_values.X`), leaving out
/// optimum's cross-attention cache, which the steps are fed unchanged.
fn self_attention_state(manifest: &Manifest, step: &GraphIo) -> BTreeMap<String, String> {
    if !manifest.state.is_empty() {
        return manifest.state.clone();
    }
    step.outputs
        .iter()
        .filter_map(|spec| spec.name.strip_prefix(PRESENT_PREFIX))
        .filter(|suffix| !format!(".{suffix}").contains(CROSS_ATTENTION_PART))
        .map(|suffix| {
            (
                format!("{PRESENT_PREFIX}{suffix}"),
                format!("{PAST_PREFIX}{suffix}"),
            )
        })
        .filter(|(_, input)| has_input(step, input))
        .collect()
}

/// Binds the step graph and assembles the decoder: what feeds each step input, from the
/// encoder or from the first step.
pub fn prepare(
    manifest: &Manifest,
    files: &HfFiles,
    tokenizer: &Tokenizer,
    pools: Seq2SeqPools,
) -> anyhow::Result<(
    Arc<SessionPool>,
    Arc<Bindings>,
    ModelSettings,
    Seq2SeqDecoder,
)> {
    let Seq2SeqPools {
        files: layout,
        encoder,
        first,
        step,
    } = pools;
    let step_graph = step.graph().clone();
    let encoder_graph = encoder.graph().clone();
    let mut step_manifest = manifest.clone();
    step_manifest.state = self_attention_state(manifest, &step_graph);
    if step_manifest.state.is_empty() {
        bail!(
            "the decoder step graph carries no state: map its outputs to its inputs in [state] (present.N.key = past_key_values.N.key)"
        );
    }

    let encoder_attention_mask = manifest.tensors.encoder_attention_mask.clone().or_else(|| {
        has_input(&step_graph, ENCODER_ATTENTION_MASK).then(|| ENCODER_ATTENTION_MASK.into())
    });
    let cache_branch =
        has_input(&step_graph, USE_CACHE_BRANCH).then(|| USE_CACHE_BRANCH.to_owned());
    // Encoder outputs each step is fed, as (encoder output, step input).
    let mut encoder_to_step: Vec<(String, String)> = manifest
        .encoder_outputs
        .iter()
        .map(|(output, input)| (output.clone(), input.clone()))
        .collect();
    if encoder_to_step.is_empty() {
        let hidden = hidden_state_output(&encoder_graph)?;
        if has_input(&step_graph, ENCODER_HIDDEN_STATES) {
            encoder_to_step.push((hidden, ENCODER_HIDDEN_STATES.into()));
        }
        if let Files::Step { .. } = layout {
            for spec in &encoder_graph.outputs {
                if has_input(&step_graph, &spec.name) {
                    encoder_to_step.push((spec.name.clone(), spec.name.clone()));
                }
            }
        }
    }
    for (output, input) in &encoder_to_step {
        if !has_output(&encoder_graph, output) {
            bail!("[encoder_outputs] names `{output}`, which the encoder graph does not output");
        }
        if !has_input(&step_graph, input) {
            bail!("[encoder_outputs] feeds `{input}`, which the decoder step graph does not take");
        }
    }

    // What the first step returns for the later ones: optimum's `present.N.encoder.*`.
    let cross_inputs: Vec<String> = step_graph
        .inputs
        .iter()
        .map(|spec| spec.name.clone())
        .filter(|name| name.starts_with(PAST_PREFIX) && name.contains(CROSS_ATTENTION_PART))
        .collect();
    let mut fed: Vec<&str> = encoder_to_step
        .iter()
        .map(|(_, input)| input.as_str())
        .collect();
    fed.extend(cross_inputs.iter().map(String::as_str));
    fed.extend(encoder_attention_mask.as_deref());
    fed.extend(cache_branch.as_deref());
    let bindings = bindings::resolve_feeding(&step_manifest, &step_graph, &fed)?;
    let settings = ModelSettings::resolve(manifest, files, tokenizer, &step_graph, &bindings)?;
    let pad_id = i64::from(settings.pad_token_id.value);
    let start_token = i64::from(
        settings
            .decoder_start_token_id
            .as_ref()
            .expect("resolved for every encoder-decoder")
            .value,
    );
    let logits = bindings
        .logits
        .clone()
        .expect("generating models have logits");
    let bindings = Arc::new(bindings);
    let step = Arc::new(step);

    let first_step = match &layout {
        Files::Step { .. } => {
            if !cross_inputs.is_empty() {
                bail!(
                    "the decoder step graph takes {cross_inputs:?}, which only optimum's first-step graph makes; add decoder_model.onnx or feed them from the encoder in [encoder_outputs]"
                );
            }
            None
        }
        Files::Split { .. } | Files::Merged { .. } => {
            let first_pool = first.clone().unwrap_or_else(|| Arc::clone(&step));
            let first_graph = first_pool.graph().clone();
            let hidden_states = (
                ENCODER_HIDDEN_STATES.to_owned(),
                hidden_state_output(&encoder_graph)?,
            );
            if !has_input(&first_graph, ENCODER_HIDDEN_STATES) {
                bail!("optimum's first decoder step must take `{ENCODER_HIDDEN_STATES}`");
            }
            let present_of = |input: &str| {
                let suffix = input.strip_prefix(PAST_PREFIX).unwrap_or(input);
                format!("{PRESENT_PREFIX}{suffix}")
            };
            let fixed_outputs: Vec<(String, String)> = cross_inputs
                .iter()
                .map(|input| (present_of(input), input.clone()))
                .collect();
            let state_outputs: Vec<String> = bindings
                .state
                .iter()
                .map(|pair| pair.output.clone())
                .collect();
            for (output, _) in &fixed_outputs {
                if !has_output(&first_graph, output) {
                    bail!("the first decoder step does not output `{output}`");
                }
            }
            for output in &state_outputs {
                if !has_output(&first_graph, output) {
                    bail!("the first decoder step does not output `{output}`");
                }
            }
            // The merged graph takes every past input on the first step too, empty.
            let empty_inputs = first_graph
                .inputs
                .iter()
                .filter(|spec| spec.name.starts_with(PAST_PREFIX))
                .map(|spec| (spec.name.clone(), spec.shape.clone()))
                .collect();
            Some(FirstStep {
                pool: first_pool,
                input_ids: bindings.input_ids.clone(),
                logits: logits.clone(),
                hidden_states,
                encoder_attention_mask: encoder_attention_mask
                    .clone()
                    .filter(|name| has_input(&first_graph, name)),
                state_outputs,
                fixed_outputs,
                empty_inputs,
                cache_branch: cache_branch.clone(),
            })
        }
    };

    // A state whose every dimension after the batch is fixed is recurrent; one with a dynamic
    // length axis is a cache that grows a column a step.
    let recurrent = bindings.state.iter().all(|pair| {
        step_graph
            .inputs
            .iter()
            .any(|spec| spec.name == pair.input && spec.shape.iter().skip(1).all(|&dim| dim >= 0))
    });
    if bindings.writes_cache_in_place() {
        bail!(
            "the decoder step graph writes its cache in place (it takes seqlens_k and total_sequence_length); an encoder-decoder's step graph must return its cache as outputs"
        );
    }
    let step_graph_runtime =
        StepGraph::new(Arc::clone(&step), Arc::clone(&bindings), recurrent, pad_id)
            .map_err(anyhow::Error::msg)?;
    let (source_ids, source_mask) = encoder_inputs(manifest, &encoder_graph)?;
    let mut decoder = Seq2SeqDecoder {
        encoder: EncoderGraph {
            input_ids: source_ids,
            attention_mask: source_mask,
            pool: encoder,
            pad_id,
        },
        encoder_to_step,
        first_step,
        step: step_graph_runtime,
        encoder_attention_mask,
        cache_branch,
        start_token,
    };
    warm_up(&mut decoder, pad_id)?;
    Ok((step, bindings, settings, decoder))
}

/// The encoder graph's inputs for the source's token ids and, when it takes one, its mask.
/// Without a mask, sources of different lengths are encoded apart.
fn encoder_inputs(
    manifest: &Manifest,
    encoder: &GraphIo,
) -> anyhow::Result<(String, Option<String>)> {
    let names = &manifest.tensors;
    let taken: Vec<&str> = encoder
        .inputs
        .iter()
        .map(|spec| spec.name.as_str())
        .collect();
    let source_ids = names.source_ids.as_deref().unwrap_or(INPUT_IDS);
    if !has_input(encoder, source_ids) {
        bail!(
            "the encoder graph has no `{source_ids}` input (it takes {taken:?}); name its token ids in [tensors].source_ids"
        );
    }
    let source_mask = match &names.source_mask {
        Some(name) if !has_input(encoder, name) => {
            bail!(
                "[tensors].source_mask names `{name}`, which the encoder graph does not take (it takes {taken:?})"
            )
        }
        Some(name) => Some(name.as_str()),
        None => has_input(encoder, ATTENTION_MASK).then_some(ATTENTION_MASK),
    };
    if let Some(unfed) = encoder
        .inputs
        .iter()
        .find(|spec| spec.name != source_ids && Some(spec.name.as_str()) != source_mask)
    {
        bail!(
            "the encoder graph takes `{}`, which is neither its token ids nor its mask; name those in [tensors].source_ids and [tensors].source_mask",
            unfed.name
        );
    }
    Ok((source_ids.to_owned(), source_mask.map(str::to_owned)))
}

/// The encoder output that carries per-token hidden states.
fn hidden_state_output(encoder: &GraphIo) -> anyhow::Result<String> {
    if has_output(encoder, LAST_HIDDEN_STATE) {
        return Ok(LAST_HIDDEN_STATE.into());
    }
    match encoder.outputs.as_slice() {
        [only] => Ok(only.name.clone()),
        _ => bail!(
            "the encoder graph has no `{LAST_HIDDEN_STATE}` output; name what each step is fed in [encoder_outputs]"
        ),
    }
}

/// Runs two sources of different lengths through the encoder and two decoder steps: proves
/// every graph accepts what it will be fed, before traffic arrives.
fn warm_up(decoder: &mut Seq2SeqDecoder, pad_id: i64) -> anyhow::Result<()> {
    let sources = vec![vec![pad_id; 2], vec![pad_id; 3]];
    let run = |decoder: &mut Seq2SeqDecoder| -> Result<(), crate::runtime::step::RunError> {
        let (mut batch, _) = decoder.prefill(sources.clone())?;
        use crate::runtime::step::RowBatch;
        for row in 0..batch.len() {
            batch.push_token(row, pad_id);
        }
        decoder.step(&mut batch)?;
        Ok(())
    };
    run(decoder).map_err(|error| {
        anyhow::anyhow!("warm-up run failed (do the graphs match the manifest?): {error}")
    })
}
