//! What a model or route looks like through KServe: the tasks a name serves, the tensors each
//! task takes and gives (ModelMetadata), and whether it is ready (ModelReady). A route looks
//! like a model of its task whose sizes are left dynamic, since its arms may differ.

use std::sync::Arc;

use super::proto::ModelMetadataResponse;
use super::proto::model_metadata_response::TensorMetadata;
use super::tensors::{BOOL, BYTES, FP32};
use crate::error::{Error, Result, Task};
use crate::registry::manifest::Family;
use crate::registry::{LoadState, ModelVersion, Registry, parse_target};

pub const TEXT_INPUT: &str = "text_input";
/// Classify: a second text for each row of `text_input`, which a cross-encoder scores with it
/// (lmserve.v1's `text_pairs`).
pub const TEXT_PAIR_INPUT: &str = "text_pair";
/// Triton's vLLM backend's switch between streamed and whole responses on ModelStreamInfer.
pub const STREAM_INPUT: &str = "stream";
/// Whether a generate response leaves the prompt out of `text_output` (Triton's vLLM backend's
/// input of that name; by default only a stream leaves it out).
pub const EXCLUDE_INPUT_INPUT: &str = "exclude_input_in_output";
/// A dimension whose size varies from request to request.
const DYNAMIC: i64 = -1;

/// The outputs lmserve's tasks give, by the names requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Generate: the generated text (BYTES).
    Text,
    /// Embed: one vector per text (FP32 [n, dim]).
    Embedding,
    /// Classify: every label's probability per text, in label order (FP32 [n, labels]).
    Probabilities,
    /// Classify: the label names, in the order of `probabilities` (BYTES [labels]).
    Labels,
}

impl Output {
    /// Every output, in the order a response without requested outputs lists them.
    pub const ALL: [Output; 4] = [
        Output::Text,
        Output::Embedding,
        Output::Probabilities,
        Output::Labels,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Output::Text => "text_output",
            Output::Embedding => "embedding",
            Output::Probabilities => "probabilities",
            Output::Labels => "labels",
        }
    }

    pub fn task(self) -> Task {
        match self {
            Output::Text => Task::Generate,
            Output::Embedding => Task::Embed,
            Output::Probabilities | Output::Labels => Task::Classify,
        }
    }

    pub fn parse(name: &str) -> Option<Output> {
        Output::ALL.into_iter().find(|output| output.name() == name)
    }
}

/// What a request's model name resolves to.
pub struct Served {
    /// Every task the target serves: a bare model name serves each task from the newest ready
    /// version that has it, so these are all its ready versions' tasks.
    pub tasks: Vec<Task>,
    /// What a request that lists no outputs gets: the tasks of the version the name resolves
    /// to (a route's one task), so that one version answers.
    pub default_tasks: Vec<Task>,
    /// The version a plain model name resolves to now; `None` for a route.
    pub model: Option<Arc<ModelVersion>>,
}

impl Served {
    /// The outputs of the tasks served, in `Output::ALL` order.
    pub fn outputs(&self) -> Vec<Output> {
        outputs_of(&self.tasks)
    }

    /// The outputs a request that lists none gets.
    pub fn default_outputs(&self) -> Vec<Output> {
        outputs_of(&self.default_tasks)
    }
}

fn outputs_of(tasks: &[Task]) -> Vec<Output> {
    Output::ALL
        .into_iter()
        .filter(|output| tasks.contains(&output.task()))
        .collect()
}

/// The lmserve target (`name`, `name@version`) of a KServe name and version; `field` names
/// the version field in an error.
pub fn target(name: &str, version: &str, field: &str) -> Result<String> {
    if version.is_empty() {
        return Ok(name.to_owned());
    }
    match version.parse::<u64>() {
        Ok(number) => Ok(format!("{name}@{number}")),
        Err(_) => Err(Error::invalid(
            field,
            format!(
                "{} is not a version number; leave it empty for the newest ready version",
                crate::error::echo(version)
            ),
        )),
    }
}

/// The tasks `target` serves: a route's one task, or a ready model version's tasks.
pub fn served(registry: &Registry, target: &str) -> Result<Served> {
    if let Ok(entry) = registry.get_route(target.trim()) {
        return Ok(Served {
            tasks: vec![entry.route.task],
            default_tasks: vec![entry.route.task],
            model: None,
        });
    }
    let model = registry.resolve(target, None)?;
    let mut tasks = model.manifest.tasks.clone();
    if parse_target(target)?.1.is_none() {
        let ready = registry.model_slots(&model.name).unwrap_or_default();
        for other in ready.iter().filter_map(|slot| slot.ready()) {
            for task in &other.manifest.tasks {
                if !tasks.contains(task) {
                    tasks.push(*task);
                }
            }
        }
    }
    Ok(Served {
        default_tasks: model.manifest.tasks.clone(),
        tasks,
        model: Some(model),
    })
}

/// Whether `target` can serve now: a ready model version, or a route whose every arm with
/// traffic is ready. Names that do not exist are not ready; a malformed one is an error.
pub fn ready(registry: &Registry, target: &str) -> Result<bool> {
    parse_target(target)?;
    if let Ok(entry) = registry.get_route(target.trim()) {
        let route = entry.route;
        return Ok(route
            .arms
            .iter()
            .filter(|arm| arm.weight > 0.0)
            .all(|arm| registry.resolve(&arm.target, Some(route.task)).is_ok()));
    }
    Ok(registry.resolve(target, None).is_ok())
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
    TensorMetadata {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape: shape.to_vec(),
    }
}

/// The width of `model`'s embeddings as a request without `dimensions` gets them: the graph's,
/// or the model's `truncate_dim` where that is narrower (a request's `dimensions` changes it).
fn embedding_width(model: &ModelVersion) -> Option<i64> {
    let width = model.embedding_width()?;
    let truncate_dim = model.settings.embed.as_ref()?.truncate_dim.as_ref();
    let width = truncate_dim.map_or(width, |dim| dim.value.min(width));
    i64::try_from(width).ok()
}

fn label_count(model: &ModelVersion) -> Option<i64> {
    let labels = &model.settings.classify.as_ref()?.labels.value;
    i64::try_from(labels.len()).ok()
}

fn output_tensor(output: Output, model: Option<&ModelVersion>) -> TensorMetadata {
    let size = |size: Option<i64>| size.unwrap_or(DYNAMIC);
    match output {
        Output::Text => tensor(output.name(), BYTES, &[DYNAMIC]),
        Output::Embedding => tensor(
            output.name(),
            FP32,
            &[DYNAMIC, size(model.and_then(embedding_width))],
        ),
        Output::Probabilities => tensor(
            output.name(),
            FP32,
            &[DYNAMIC, size(model.and_then(label_count))],
        ),
        Output::Labels => tensor(output.name(), BYTES, &[size(model.and_then(label_count))]),
    }
}

fn platform(model: Option<&ModelVersion>) -> &'static str {
    match model.map(|model| model.manifest.family) {
        None => "lmserve_route",
        Some(Family::Decoder) => "lmserve_decoder",
        Some(Family::Rnn) => "lmserve_rnn",
        Some(Family::Encoder) => "lmserve_encoder",
        Some(Family::EncoderDecoder) => "lmserve_encoder_decoder",
    }
}

/// The versions of `model` that are ready, oldest first.
fn ready_versions(registry: &Registry, model: &str) -> Vec<String> {
    registry
        .model_slots(model)
        .unwrap_or_default()
        .iter()
        .filter(|slot| matches!(slot.state(), LoadState::Ready(_)))
        .map(|slot| slot.version.to_string())
        .collect()
}

/// ModelMetadata for `name` (a model or a route) at `version` (empty: the newest ready one).
pub fn model_metadata(
    registry: &Registry,
    name: &str,
    version: &str,
) -> Result<ModelMetadataResponse> {
    let target = target(name, version, "version")?;
    let served = served(registry, &target)?;
    let model = served.model.as_deref();
    let generates = served.tasks.contains(&Task::Generate);
    // One prompt a request when the name serves generation alone; a name whose versions also
    // embed or classify takes a batch of texts for those, so its shape is dynamic.
    let one_prompt = served.tasks.iter().all(|task| *task == Task::Generate);
    let mut inputs = vec![tensor(
        TEXT_INPUT,
        BYTES,
        if one_prompt { &[1] } else { &[DYNAMIC] },
    )];
    if generates {
        inputs.push(tensor(STREAM_INPUT, BOOL, &[1]));
        inputs.push(tensor(EXCLUDE_INPUT_INPUT, BOOL, &[1]));
    }
    if served.tasks.contains(&Task::Classify) {
        inputs.push(tensor(TEXT_PAIR_INPUT, BYTES, &[DYNAMIC]));
    }
    let versions = match (model, version.is_empty()) {
        (None, _) => Vec::new(),
        (Some(model), true) => ready_versions(registry, &model.name),
        (Some(model), false) => vec![model.version.to_string()],
    };
    Ok(ModelMetadataResponse {
        name: name.to_owned(),
        versions,
        platform: platform(model).to_owned(),
        inputs,
        outputs: served
            .outputs()
            .into_iter()
            .map(|output| {
                // The version that serves this output's task under this name.
                let serving =
                    model.and_then(|_| registry.resolve(&target, Some(output.task())).ok());
                output_tensor(output, serving.as_deref().or(model))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_their_names() {
        for output in Output::ALL {
            assert_eq!(Output::parse(output.name()), Some(output));
        }
        assert_eq!(Output::parse("logits"), None);
    }

    #[test]
    fn version_fields_become_targets() {
        assert_eq!(target("m", "", "version").unwrap(), "m");
        assert_eq!(target("m", "2", "version").unwrap(), "m@2");
        let error = target("m", "two", "model_version").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("model_version: `two` is not a version")
        );
    }
}
