//! Matches a manifest to its graph: which graph tensor plays which role, and whether each bound
//! tensor has the element type and rank its role needs. Roles the manifest leaves unset fall
//! back to the names Hugging Face optimum, sentence-transformers and onnxruntime-genai export.
//! Every mismatch names the manifest key that would fix it.

use anyhow::bail;

use super::manifest::{Family, Manifest};
use crate::error::Task;
use crate::runtime::bindings::{Bindings, StatePair};
use crate::runtime::{GraphIo, TensorSpec};

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const POSITION_IDS: &str = "position_ids";
const TOKEN_TYPE_IDS: &str = "token_type_ids";
const LOGITS: &str = "logits";
const HIDDEN_STATE_NAMES: [&str; 3] = ["last_hidden_state", "token_embeddings", "hidden_states"];
/// sentence-transformers' name for an output already pooled to one vector per text.
const POOLED_OUTPUT: &str = "sentence_embedding";
/// optimum's KV-cache names: `present.N.key` is fed back as `past_key_values.N.key`.
const PRESENT_PREFIX: &str = "present.";
const PAST_PREFIX: &str = "past_key_values.";

/// onnxruntime's GroupQueryAttention inputs, which a graph that writes its cache in place takes
/// instead of attention_mask and position_ids.
const SEQLENS_K: &str = "seqlens_k";
const TOTAL_SEQUENCE_LENGTH: &str = "total_sequence_length";

const INT32: &str = "int32";
const INT64: &str = "int64";
const FLOAT32: &str = "float32";
const FLOAT16: &str = "float16";

/// What a role needs of its tensor, and where the manifest sets it.
struct Need {
    role: &'static str,
    dtype: &'static str,
    ranks: &'static [usize],
    layout: &'static str,
    key: &'static str,
    /// Another way out, when there is one.
    otherwise: &'static str,
}

/// Token ids, masks, positions and segments: one int64 per token.
fn token_input(role: &'static str, key: &'static str) -> Need {
    Need {
        role,
        dtype: INT64,
        ranks: &[2],
        layout: "[batch, sequence]",
        key,
        otherwise: "",
    }
}

fn find<'a>(specs: &'a [TensorSpec], name: &str) -> Option<&'a TensorSpec> {
    specs.iter().find(|spec| spec.name == name)
}

/// Resolves every role the model needs against the graph, or says what does not match.
pub fn resolve(manifest: &Manifest, graph: &GraphIo) -> anyhow::Result<Bindings> {
    resolve_feeding(manifest, graph, &[])
}

/// `resolve` for a graph some of whose inputs are fed by another part of the model: an
/// encoder-decoder's steps take the encoder's outputs.
pub fn resolve_feeding(
    manifest: &Manifest,
    graph: &GraphIo,
    fed_elsewhere: &[&str],
) -> anyhow::Result<Bindings> {
    let names = &manifest.tensors;

    let input_role = |need: Need, named: &Option<String>, standard: &str, required: bool| {
        let found = match named {
            Some(name) => Some(find(&graph.inputs, name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} names input `{name}`, but the graph has no such input",
                    need.key
                )
            })?),
            None => find(&graph.inputs, standard),
        };
        match found {
            Some(spec) => check(spec, "input", &need).map(|()| Some(spec.name.clone())),
            None if required => bail!(
                "the graph has no `{standard}` input; name the input that carries token ids in {}",
                need.key
            ),
            None => Ok(None),
        }
    };
    let input_ids = input_role(
        token_input("input_ids", "[tensors].input_ids"),
        &names.input_ids,
        INPUT_IDS,
        true,
    )?
    .expect("a required role");
    let attention_mask = input_role(
        token_input("attention_mask", "[tensors].attention_mask"),
        &names.attention_mask,
        ATTENTION_MASK,
        false,
    )?;
    let position_ids = input_role(
        token_input("position_ids", "[tensors].position_ids"),
        &names.position_ids,
        POSITION_IDS,
        false,
    )?;
    // BERT-style encoders take segment ids; a single text is all segment 0.
    let token_type_ids = input_role(
        token_input("token_type_ids", "[tensors].token_type_ids"),
        &names.token_type_ids,
        TOKEN_TYPE_IDS,
        false,
    )?;

    let output_role = |need: &Need, named: Option<&String>, standard: &[&str]| {
        let found = match named {
            Some(name) => Some(find(&graph.outputs, name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} names output `{name}`, but the graph has no such output",
                    need.key
                )
            })?),
            None => standard.iter().find_map(|name| find(&graph.outputs, name)),
        };
        found
            .map(|spec| check(spec, "output", need).map(|()| spec.name.clone()))
            .transpose()
    };

    let generates = manifest.serves(Task::Generate);
    let classifies = manifest.serves(Task::Classify);
    let logits_need = if generates {
        Need {
            role: "logits",
            dtype: FLOAT32,
            ranks: &[3, 2],
            layout: "[batch, sequence, vocab] (or [batch, vocab])",
            key: "[tensors].logits",
            otherwise: "",
        }
    } else {
        Need {
            role: "class logits",
            dtype: FLOAT32,
            ranks: &[2],
            layout: "[batch, classes]",
            key: "[tensors].logits",
            otherwise: "",
        }
    };
    // An encoder that only embeds never reads its logits (an MLM head's, say), so they stay unbound.
    let logits = if generates || classifies {
        output_role(&logits_need, names.logits.as_ref(), &[LOGITS])?
    } else {
        None
    };
    if logits.is_none() && (generates || classifies) {
        bail!(
            "the graph has no `logits` output; name the output with the {} {} in [tensors].logits",
            logits_need.role,
            logits_need.layout
        );
    }

    let embed = manifest.embed.clone().unwrap_or_default();
    let (hidden_states, pooled_output) = if manifest.serves(Task::Embed) {
        let pooled_need = Need {
            role: "pooled_output",
            dtype: FLOAT32,
            ranks: &[2],
            layout: "[batch, dim]",
            key: "[embed].pooled_output",
            otherwise: ", or [tensors].hidden_states for per-token states [batch, sequence, hidden]",
        };
        let hidden_need = Need {
            role: "hidden_states",
            dtype: FLOAT32,
            ranks: &[3],
            layout: "[batch, sequence, hidden]",
            key: "[tensors].hidden_states",
            otherwise: ", or [embed].pooled_output for an output already pooled to [batch, dim]",
        };
        let pooled = output_role(&pooled_need, embed.pooled_output.as_ref(), &[POOLED_OUTPUT])?;
        let hidden = output_role(
            &hidden_need,
            names.hidden_states.as_ref(),
            &HIDDEN_STATE_NAMES,
        )?;
        if hidden.is_none() && pooled.is_none() {
            bail!(
                "the model serves embed but the graph has none of the outputs {HIDDEN_STATE_NAMES:?} or `{POOLED_OUTPUT}`; name per-token states [batch, sequence, hidden] in [tensors].hidden_states, or a pooled [batch, dim] output in [embed].pooled_output"
            );
        }
        (hidden, pooled)
    } else {
        (None, None)
    };

    let seqlens_k = length_input(graph, SEQLENS_K, &[1], "[batch]")?;
    let total_sequence_length = length_input(graph, TOTAL_SEQUENCE_LENGTH, &[0, 1], "[]")?;
    if seqlens_k.is_some() != total_sequence_length.is_some() {
        bail!(
            "the graph takes only one of `{SEQLENS_K}` and `{TOTAL_SEQUENCE_LENGTH}`; a graph that writes its KV cache in place needs both"
        );
    }

    let state = state_pairs(manifest, graph, seqlens_k.is_some())?;
    if manifest.family == Family::Encoder && !state.is_empty() {
        bail!(
            "an encoder carries no state, but the graph has state tensors {:?}",
            state.iter().map(|p| &p.output).collect::<Vec<_>>()
        );
    }

    let bindings = Bindings {
        input_ids,
        attention_mask,
        position_ids,
        first_position: 0,
        token_type_ids,
        logits,
        hidden_states,
        pooled_output,
        state,
        seqlens_k,
        total_sequence_length,
    };
    for spec in &graph.inputs {
        if !bindings.feeds(&spec.name) && !fed_elsewhere.contains(&spec.name.as_str()) {
            bail!(
                "graph input `{}` has no role; name it in the manifest's [tensors] or [state]",
                spec.name
            );
        }
    }
    Ok(bindings)
}

/// A row-length input of a graph that writes its cache in place, by its onnxruntime name.
fn length_input(
    graph: &GraphIo,
    name: &str,
    ranks: &[usize],
    layout: &str,
) -> anyhow::Result<Option<String>> {
    let Some(spec) = find(&graph.inputs, name) else {
        return Ok(None);
    };
    if spec.dtype != INT32 || (known_rank(spec) && !ranks.contains(&spec.shape.len())) {
        bail!(
            "input `{spec}` is read as onnxruntime's GroupQueryAttention `{name}`, which needs int32 {layout}"
        );
    }
    Ok(Some(spec.name.clone()))
}

/// The state carried from step to step: the manifest's `[state]`, else optimum's KV-cache names.
/// State is float32, or float16 in a cache written in place (`in_place`): the type
/// onnxruntime's GroupQueryAttention needs to run on CUDA.
fn state_pairs(
    manifest: &Manifest,
    graph: &GraphIo,
    in_place: bool,
) -> anyhow::Result<Vec<StatePair>> {
    let pairs: Vec<StatePair> = if manifest.state.is_empty() {
        graph
            .outputs
            .iter()
            .filter_map(|spec| spec.name.strip_prefix(PRESENT_PREFIX))
            .map(|suffix| StatePair {
                output: format!("{PRESENT_PREFIX}{suffix}"),
                input: format!("{PAST_PREFIX}{suffix}"),
            })
            .collect()
    } else {
        manifest
            .state
            .iter()
            .map(|(output, input)| StatePair {
                output: output.clone(),
                input: input.clone(),
            })
            .collect()
    };
    for pair in &pairs {
        let output = graph.outputs.iter().find(|spec| spec.name == pair.output);
        let input = graph.inputs.iter().find(|spec| spec.name == pair.input);
        let (Some(output), Some(input)) = (output, input) else {
            bail!(
                "[state] `{}` -> `{}` does not match the graph: the output or the input is missing",
                pair.output,
                pair.input
            );
        };
        for (spec, kind) in [(output, "output"), (input, "input")] {
            let supported = spec.dtype == FLOAT32 || (in_place && spec.dtype == FLOAT16);
            if !supported {
                let types = if in_place {
                    "float32 or float16"
                } else {
                    "float32 (float16 only in a cache written in place)"
                };
                bail!("state {kind} `{spec}` must be {types}; check [state] in model.toml");
            }
        }
        if output.dtype != input.dtype {
            bail!(
                "[state] feeds output `{output}` back as input `{input}`, but their types differ"
            );
        }
        if known_rank(output) && known_rank(input) && output.shape.len() != input.shape.len() {
            bail!(
                "[state] feeds output `{output}` back as input `{input}`, but their ranks differ"
            );
        }
    }
    Ok(pairs)
}

/// Whether the graph declares the tensor's rank (some exports leave output shapes out).
fn known_rank(spec: &TensorSpec) -> bool {
    !spec.shape.is_empty()
}

fn check(spec: &TensorSpec, kind: &str, need: &Need) -> anyhow::Result<()> {
    let dtype_ok = spec.dtype == need.dtype;
    let rank_ok = !known_rank(spec) || need.ranks.contains(&spec.shape.len());
    if dtype_ok && rank_ok {
        return Ok(());
    }
    bail!(
        "{kind} `{spec}` is bound as {role}, which needs {dtype} of rank {ranks} {layout}; set {key} in model.toml to a matching {kind}{otherwise}",
        role = need.role,
        dtype = need.dtype,
        ranks = need
            .ranks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" or "),
        layout = need.layout,
        key = need.key,
        otherwise = need.otherwise,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: dtype.into(),
            shape: shape.to_vec(),
        }
    }

    fn ids(names: &[&str]) -> Vec<TensorSpec> {
        names
            .iter()
            .map(|name| spec(name, INT64, &[-1, -1]))
            .collect()
    }

    #[test]
    fn recognises_an_optimum_decoder() {
        let manifest = Manifest::parse("family = \"decoder\"\ntasks = [\"generate\"]").unwrap();
        let mut inputs = ids(&["input_ids", "attention_mask", "position_ids"]);
        inputs.push(spec("past_key_values.0.key", FLOAT32, &[-1, 2, -1, 8]));
        inputs.push(spec("past_key_values.0.value", FLOAT32, &[-1, 2, -1, 8]));
        let outputs = vec![
            spec("logits", FLOAT32, &[-1, -1, 50]),
            spec("present.0.key", FLOAT32, &[-1, 2, -1, 8]),
            spec("present.0.value", FLOAT32, &[-1, 2, -1, 8]),
        ];
        let bindings = resolve(&manifest, &GraphIo { inputs, outputs }).unwrap();
        assert_eq!(bindings.state.len(), 2);
        assert_eq!(
            bindings.state[0],
            StatePair {
                output: "present.0.key".into(),
                input: "past_key_values.0.key".into()
            }
        );
        assert_eq!(bindings.position_ids.as_deref(), Some("position_ids"));
        assert!(!bindings.writes_cache_in_place());
    }

    #[test]
    fn recognises_a_decoder_that_writes_its_cache_in_place() {
        let manifest = Manifest::parse("family = \"decoder\"\ntasks = [\"generate\"]").unwrap();
        let cache = || spec("past_key_values.0.key", FLOAT32, &[-1, 3, -1, 64]);
        let mut inputs = ids(&["input_ids"]);
        inputs.extend([
            spec(SEQLENS_K, INT32, &[-1]),
            spec(TOTAL_SEQUENCE_LENGTH, INT32, &[]),
            cache(),
        ]);
        let outputs = vec![
            spec("logits", FLOAT32, &[-1, 1, 50]),
            spec("present.0.key", FLOAT32, &[-1, 3, -1, 64]),
        ];
        let graph = GraphIo { inputs, outputs };
        let bindings = resolve(&manifest, &graph).unwrap();
        assert!(bindings.writes_cache_in_place());
        assert_eq!(bindings.seqlens_k.as_deref(), Some(SEQLENS_K));
        assert_eq!(bindings.attention_mask, None);

        // Row lengths in int64, or only one of the two inputs, are refused with the reason.
        let mut wrong = graph.clone();
        wrong.inputs[1] = spec(SEQLENS_K, INT64, &[-1]);
        let error = resolve(&manifest, &wrong).unwrap_err().to_string();
        assert!(
            error.contains("`seqlens_k`, which needs int32 [batch]"),
            "{error}"
        );
        let mut half = graph.clone();
        half.inputs.remove(2);
        let error = resolve(&manifest, &half).unwrap_err().to_string();
        assert!(error.contains("needs both"), "{error}");
    }

    #[test]
    fn float16_state_is_accepted_only_in_a_cache_written_in_place() {
        let manifest = Manifest::parse("family = \"decoder\"\ntasks = [\"generate\"]").unwrap();
        let cache = |name: &str, dtype: &str| spec(name, dtype, &[-1, 3, -1, 64]);
        let mut inputs = ids(&["input_ids"]);
        inputs.extend([
            spec(SEQLENS_K, INT32, &[-1]),
            spec(TOTAL_SEQUENCE_LENGTH, INT32, &[]),
            cache("past_key_values.0.key", FLOAT16),
        ]);
        let outputs = vec![
            spec("logits", FLOAT32, &[-1, 1, 50]),
            cache("present.0.key", FLOAT16),
        ];
        let in_place = GraphIo { inputs, outputs };
        assert!(
            resolve(&manifest, &in_place)
                .unwrap()
                .writes_cache_in_place()
        );

        // A float32 past fed from a float16 present would not be the same buffer.
        let mut mixed = in_place.clone();
        mixed.outputs[1] = cache("present.0.key", FLOAT32);
        let error = resolve(&manifest, &mixed).unwrap_err().to_string();
        assert!(error.contains("their types differ"), "{error}");

        // optimum's layout concatenates its cache, which the server gathers as float32.
        let mut optimum = ids(&["input_ids", "attention_mask", "position_ids"]);
        optimum.push(cache("past_key_values.0.key", FLOAT16));
        let graph = GraphIo {
            inputs: optimum,
            outputs: vec![
                spec("logits", FLOAT32, &[-1, -1, 50]),
                cache("present.0.key", FLOAT16),
            ],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(
            error.contains("must be float32 (float16 only in a cache written in place)"),
            "{error}"
        );
    }

    #[test]
    fn finds_sentence_transformers_outputs_by_name() {
        let manifest = Manifest::parse("family = \"encoder\"\ntasks = [\"embed\"]").unwrap();
        let graph = GraphIo {
            inputs: ids(&["input_ids", "attention_mask", "token_type_ids"]),
            outputs: vec![
                spec("token_embeddings", FLOAT32, &[-1, -1, 384]),
                spec("sentence_embedding", FLOAT32, &[-1, 384]),
            ],
        };
        let bindings = resolve(&manifest, &graph).unwrap();
        assert_eq!(bindings.hidden_states.as_deref(), Some("token_embeddings"));
        assert_eq!(
            bindings.pooled_output.as_deref(),
            Some("sentence_embedding")
        );
        assert_eq!(bindings.token_type_ids.as_deref(), Some("token_type_ids"));
        assert_eq!(bindings.logits, None, "an embedder reads no logits");
    }

    #[test]
    fn a_pooled_output_named_as_hidden_states_names_the_key_to_set() {
        let manifest = Manifest::parse(
            "family = \"encoder\"\ntasks = [\"embed\"]\n[tensors]\nhidden_states = \"pooled\"",
        )
        .unwrap();
        let graph = GraphIo {
            inputs: ids(&["input_ids"]),
            outputs: vec![spec("pooled", FLOAT32, &[-1, 16])],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(error.contains("`pooled float32 [?, 16]`"), "{error}");
        assert!(error.contains("[embed].pooled_output"), "{error}");
        assert!(error.contains("rank 3"), "{error}");
    }

    #[test]
    fn wrong_types_and_names_are_refused() {
        let manifest = Manifest::parse(
            "family = \"encoder\"\ntasks = [\"embed\"]\n[tensors]\nhidden_states = \"missing\"",
        )
        .unwrap();
        let graph = GraphIo {
            inputs: ids(&["input_ids"]),
            outputs: vec![spec("last_hidden_state", FLOAT32, &[-1, -1, 8])],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(error.contains("`missing`"), "{error}");

        let manifest = Manifest::parse("family = \"encoder\"\ntasks = [\"embed\"]").unwrap();
        let graph = GraphIo {
            inputs: vec![spec("input_ids", "int32", &[-1, -1])],
            outputs: vec![spec("last_hidden_state", FLOAT32, &[-1, -1, 8])],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(
            error.contains("needs int64") && error.contains("[tensors].input_ids"),
            "{error}"
        );

        let graph = GraphIo {
            inputs: ids(&["input_ids", "pixel_values"]),
            outputs: vec![spec("last_hidden_state", FLOAT32, &[-1, -1, 8])],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(error.contains("pixel_values"), "{error}");

        let manifest = Manifest::parse(
            "family = \"encoder\"\ntasks = [\"classify\"]\n[classify]\nlabels = [\"a\"]",
        )
        .unwrap();
        let graph = GraphIo {
            inputs: ids(&["input_ids"]),
            outputs: vec![spec("logits", FLOAT32, &[-1, -1, 2])],
        };
        let error = resolve(&manifest, &graph).unwrap_err().to_string();
        assert!(error.contains("[batch, classes]"), "{error}");
    }
}
