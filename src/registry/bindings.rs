//! Matches a manifest to its graph: which graph tensor plays which role. Roles the manifest
//! leaves unset fall back to the names Hugging Face optimum and onnxruntime-genai export.

use anyhow::bail;

use super::manifest::{Family, Manifest};
use crate::error::Task;
use crate::runtime::TensorSpec;
use crate::runtime::bindings::{Bindings, StatePair};

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
const POSITION_IDS: &str = "position_ids";
const TOKEN_TYPE_IDS: &str = "token_type_ids";
const LOGITS: &str = "logits";
const HIDDEN_STATE_NAMES: [&str; 3] = ["last_hidden_state", "token_embeddings", "hidden_states"];
/// optimum's KV-cache names: `present.N.key` is fed back as `past_key_values.N.key`.
const PRESENT_PREFIX: &str = "present.";
const PAST_PREFIX: &str = "past_key_values.";

/// Resolves every role the model needs against the graph, or says what does not match.
pub fn resolve(
    manifest: &Manifest,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> anyhow::Result<Bindings> {
    let has_input = |name: &str| inputs.iter().any(|spec| spec.name == name);
    let has_output = |name: &str| outputs.iter().any(|spec| spec.name == name);
    let names = &manifest.tensors;

    let input_role = |role: &str,
                      named: &Option<String>,
                      standard: &str,
                      required: bool|
     -> anyhow::Result<Option<String>> {
        match named {
            Some(name) if has_input(name) => Ok(Some(name.clone())),
            Some(name) => bail!(
                "manifest names {role} input `{name}`, but the graph's inputs are [{}]",
                list(inputs)
            ),
            None if has_input(standard) => Ok(Some(standard.to_owned())),
            None if required => bail!(
                "the graph has no `{standard}` input and the manifest names no [tensors].{role}; inputs are [{}]",
                list(inputs)
            ),
            None => Ok(None),
        }
    };
    let input_ids =
        input_role("input_ids", &names.input_ids, INPUT_IDS, true)?.expect("required role");
    let attention_mask = input_role(
        "attention_mask",
        &names.attention_mask,
        ATTENTION_MASK,
        false,
    )?;
    let position_ids = input_role("position_ids", &names.position_ids, POSITION_IDS, false)?;
    // BERT-style encoders take segment ids; a single text is all segment 0.
    let token_type_ids = input_role("token_type_ids", &None, TOKEN_TYPE_IDS, false)?;

    let logits_required = manifest.serves(Task::Generate) || manifest.serves(Task::Classify);
    let logits = match &names.logits {
        Some(name) if has_output(name) => Some(name.clone()),
        Some(name) => bail!(
            "manifest names logits output `{name}`, but the graph's outputs are [{}]",
            list(outputs)
        ),
        None if has_output(LOGITS) => Some(LOGITS.to_owned()),
        None if logits_required => bail!(
            "the graph has no `logits` output and the manifest names no [tensors].logits; outputs are [{}]",
            list(outputs)
        ),
        None => None,
    };
    let hidden_states = match &names.hidden_states {
        Some(name) if has_output(name) => Some(name.clone()),
        Some(name) => bail!(
            "manifest names hidden_states output `{name}`, but the graph's outputs are [{}]",
            list(outputs)
        ),
        None => HIDDEN_STATE_NAMES
            .iter()
            .find(|name| has_output(name))
            .map(|name| name.to_string()),
    };
    if manifest.serves(Task::Embed) && hidden_states.is_none() {
        bail!(
            "the model serves embed but the graph has none of the outputs {HIDDEN_STATE_NAMES:?} and the manifest names no [tensors].hidden_states"
        );
    }

    let state = if manifest.state.is_empty() {
        outputs
            .iter()
            .filter_map(|spec| spec.name.strip_prefix(PRESENT_PREFIX))
            .map(|suffix| StatePair {
                output: format!("{PRESENT_PREFIX}{suffix}"),
                input: format!("{PAST_PREFIX}{suffix}"),
            })
            .collect::<Vec<_>>()
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
    for pair in &state {
        if !has_output(&pair.output) || !has_input(&pair.input) {
            bail!(
                "state `{}` -> `{}` does not match the graph: outputs [{}], inputs [{}]",
                pair.output,
                pair.input,
                list(outputs),
                list(inputs)
            );
        }
    }
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
        token_type_ids,
        logits,
        hidden_states,
        state,
    };
    for spec in inputs {
        if !bindings.feeds(&spec.name) {
            bail!(
                "graph input `{}` has no role; name it in the manifest's [tensors] or [state]",
                spec.name
            );
        }
    }
    Ok(bindings)
}

fn list(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|spec| spec.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(names: &[&str]) -> Vec<TensorSpec> {
        names
            .iter()
            .map(|name| TensorSpec {
                name: name.to_string(),
                dtype: "float32".into(),
                shape: vec![-1],
            })
            .collect()
    }

    #[test]
    fn recognises_an_optimum_decoder() {
        let manifest =
            Manifest::parse("family = \"decoder\"\ntasks = [\"generate\"]\nmax_length = 64")
                .unwrap();
        let inputs = specs(&[
            "input_ids",
            "attention_mask",
            "position_ids",
            "past_key_values.0.key",
            "past_key_values.0.value",
        ]);
        let outputs = specs(&["logits", "present.0.key", "present.0.value"]);
        let bindings = resolve(&manifest, &inputs, &outputs).unwrap();
        assert_eq!(bindings.state.len(), 2);
        assert_eq!(
            bindings.state[0],
            StatePair {
                output: "present.0.key".into(),
                input: "past_key_values.0.key".into()
            }
        );
        assert_eq!(bindings.position_ids.as_deref(), Some("position_ids"));
    }

    #[test]
    fn reports_a_manifest_that_does_not_match_the_graph() {
        let manifest = Manifest::parse("family = \"encoder\"\ntasks = [\"embed\"]\nmax_length = 8\n[tensors]\nhidden_states = \"missing\"").unwrap();
        let error = resolve(
            &manifest,
            &specs(&["input_ids"]),
            &specs(&["last_hidden_state"]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("`missing`"), "{error}");

        let manifest =
            Manifest::parse("family = \"encoder\"\ntasks = [\"embed\"]\nmax_length = 8").unwrap();
        let error = resolve(
            &manifest,
            &specs(&["input_ids", "pixel_values"]),
            &specs(&["last_hidden_state"]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("pixel_values"), "{error}");
    }
}
