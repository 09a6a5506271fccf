//! A ModelInferRequest read and checked into the work lmserve runs for it: which tasks its
//! requested outputs need, their texts and settings, and how its responses lay out tensors.
//! Sizes are checked against `[limits]` before anything is copied out of the message.

use std::collections::HashSet;
use std::time::Duration;

use super::infer::Reply;
use super::metadata::{
    self, EXCLUDE_INPUT_INPUT, Output, STREAM_INPUT, Served, TEXT_INPUT, TEXT_PAIR_INPUT,
};
use super::parameters::{self, Parameters};
use super::proto::ModelInferRequest;
use super::proto::model_infer_request::InferInputTensor;
use super::tensors::{self, BOOL, BYTES, Layout, Source, show_shape};
use crate::config::LimitsConfig;
use crate::error::{Error, Result, Task, echo};
use crate::registry::Registry;
use crate::tasks::classify::{ClassifyParams, ScoreKind};
use crate::tasks::embed::EmbedParams;
use crate::tasks::generate::params::{GenerateParams, Prompt};
use crate::tasks::limits::{check_name, check_target};

pub enum Work {
    Generate {
        params: GenerateParams,
        /// The prompt's shape, which `text_output` repeats.
        shape: Vec<i64>,
        /// The `stream` input; unset is false, as in Triton's vLLM backend.
        stream: bool,
        /// The prompt, where `text_output` begins with it: as Triton's vLLM backend answers, a
        /// response that is not streamed repeats it unless `exclude_input_in_output` says not.
        echoed_prompt: Option<String>,
    },
    Encode {
        embed: Option<EmbedParams>,
        classify: Option<ClassifyParams>,
        /// In the order the response lists them.
        outputs: Vec<Output>,
    },
}

/// The longest `timeout` taken, in microseconds: a day, well past any call's deadline, and far
/// from overflowing an instant.
const MAX_TIMEOUT_MICROS: u64 = 24 * 3600 * 1_000_000;

pub struct Request {
    pub reply: Reply,
    pub route_key: Option<String>,
    /// Triton's `timeout`: the request's own time limit, which admission holds it to as it holds
    /// a call to its `grpc-timeout` (Triton's queue policy likewise rejects a request that would
    /// time out waiting).
    pub timeout: Option<Duration>,
    pub work: Work,
    pub names: FieldNames,
}

/// lmserve's names for what a request sent, and the names this request used for them, so
/// that an error from a task names the field the client knows.
pub struct FieldNames {
    parameters: Vec<(&'static str, &'static str)>,
}

impl FieldNames {
    pub fn apply(&self, error: Error) -> Error {
        let Error::InvalidArgument { field, message } = error else {
            return error;
        };
        let field = if let Some(rest) = field.strip_prefix("texts") {
            format!("{TEXT_INPUT}{rest}").replace("text_pairs", TEXT_PAIR_INPUT)
        } else if let Some(rest) = field.strip_prefix("text_pairs") {
            format!("{TEXT_PAIR_INPUT}{rest}")
        } else if field == "prompt" || field == "prompt.text" {
            TEXT_INPUT.to_owned()
        } else if field == "model" {
            "model_name".to_owned()
        } else if [
            "pooling",
            "dimensions",
            "prompt_name",
            "normalize",
            "truncate",
        ]
        .contains(&field.as_str())
        {
            // Request fields that are parameters here.
            format!("parameters.{field}")
        } else {
            self.parameters
                .iter()
                .find(|(ours, _)| field.strip_prefix("parameters.") == Some(*ours))
                .map_or(field.clone(), |(_, theirs)| format!("parameters.{theirs}"))
        };
        // The advice names lmserve.v1's fields; here they are parameters (generation takes no
        // truncation, so only shortening is left).
        let message = message
            .replace(
                crate::tasks::text::TRUNCATE_HINT,
                "set parameters.truncate to right or left to cut it",
            )
            .replace(crate::tasks::generate::TRUNCATE_PROMPT_HINT, "shorten it");
        Error::InvalidArgument { field, message }
    }
}

/// Reads `request` for the model or route it names.
pub fn read(
    registry: &Registry,
    limits: &LimitsConfig,
    mut request: ModelInferRequest,
) -> Result<Request> {
    let mut parameters = Parameters::new(std::mem::take(&mut request.parameters));
    check_target("model_name", &request.model_name, limits)?;
    // The id is echoed in every response, one per generated token when streamed.
    check_name("id", &request.id, limits)?;
    let mut target =
        metadata::target(&request.model_name, &request.model_version, "model_version")?;
    let served = metadata::served(registry, &target)?;
    let outputs = requested_outputs(&request, &served)?;
    let tasks: Vec<Task> = [Task::Generate, Task::Embed, Task::Classify]
        .into_iter()
        .filter(|task| outputs.iter().any(|output| output.task() == *task))
        .collect();
    // One response names one version: outputs whose tasks newer and older versions of a bare
    // name serve apart cannot share it.
    if served.model.is_some() && tasks.len() > 1 {
        let versions = tasks
            .iter()
            .map(|&task| Ok((task, registry.resolve(&target, Some(task))?)))
            .collect::<Result<Vec<_>>>()?;
        if versions
            .windows(2)
            .any(|pair| pair[0].1.version != pair[1].1.version)
        {
            let by: Vec<String> = versions
                .iter()
                .map(|(task, model)| format!("{task} by {}@{}", model.name, model.version))
                .collect();
            return Err(Error::invalid(
                "outputs",
                format!(
                    "asks for tasks that different versions serve ({}); ask for one task's outputs, or name a model_version",
                    by.join(", ")
                ),
            ));
        }
        // Every task then runs on the version checked, even if another loads meanwhile.
        let (_, model) = &versions[0];
        target = format!("{}@{}", model.name, model.version);
    }
    let generate = tasks.contains(&Task::Generate);
    if generate && tasks.len() > 1 {
        return Err(Error::invalid(
            "outputs",
            "text_output cannot be asked for together with another task's outputs",
        ));
    }
    let layout = layout(&request)?;
    let inputs = Inputs::read(&request, layout, generate)?;
    let text_input = inputs.text.ok_or_else(|| {
        Error::invalid(
            "inputs",
            format!("{TEXT_INPUT} is missing; send the texts as a BYTES tensor named {TEXT_INPUT}"),
        )
    })?;

    let route_key = parameters.string("route_key")?;
    // What tritonclient's infer(timeout=..., priority=...) send. lmserve serves requests in the
    // order they arrive, so a priority is accepted and changes nothing.
    let timeout = parameters
        .unsigned("timeout", MAX_TIMEOUT_MICROS)?
        .filter(|&micros| micros > 0)
        .map(Duration::from_micros);
    parameters.unsigned("priority", u64::MAX)?;
    // Every streamed request gets a final response (an empty one when nothing is left to
    // send), so the flag that asks for one changes nothing.
    parameters.bool("triton_enable_empty_final_response")?;
    let work = if generate {
        let shape = text_input.shape.to_vec();
        let texts = generate_prompt(text_input, layout, &request.raw_input_contents)?;
        let prompt = texts.into_iter().next();
        let raw = &request.raw_input_contents;
        let flag = |input: Option<Input<'_>>, name| match input {
            Some(input) => bool_flag(name, input, layout, raw).map(Some),
            None => Ok(None),
        };
        let stream = flag(inputs.stream, STREAM_INPUT)?.unwrap_or(false);
        let echoed_prompt = match (stream, flag(inputs.exclude_input, EXCLUDE_INPUT_INPUT)?) {
            (true, Some(false)) => {
                return Err(Error::invalid(
                    EXCLUDE_INPUT_INPUT,
                    "false asks for the prompt in the output, which a stream does not repeat; \
                     leave it out or send true",
                ));
            }
            (false, None | Some(false)) => prompt.clone(),
            _ => None,
        };
        let mut params = GenerateParams {
            model: target,
            prompt: prompt.map(Prompt::Text),
            ..Default::default()
        };
        parameters::generation(&mut parameters, &mut params)?;
        Work::Generate {
            params,
            shape,
            stream,
            echoed_prompt,
        }
    } else {
        let mut texts = encoder_texts(text_input, layout, &request.raw_input_contents, limits)?;
        let text_pairs = match inputs.text_pair {
            Some(_) if tasks.contains(&Task::Embed) => {
                return Err(Error::invalid(
                    TEXT_PAIR_INPUT,
                    "is read for classification only, and an embedding is of one text; ask for \
                     probabilities (and labels) alone",
                ));
            }
            Some(input) => {
                let pairs = encoder_texts(input, layout, &request.raw_input_contents, limits)?;
                if pairs.len() != texts.len() {
                    return Err(Error::invalid(
                        format!("{TEXT_PAIR_INPUT}.shape"),
                        format!(
                            "must hold one text per row of {TEXT_INPUT} ({} rows); got {}",
                            texts.len(),
                            pairs.len()
                        ),
                    ));
                }
                pairs
            }
            None => Vec::new(),
        };
        let truncate = parameters::truncate(&mut parameters)?;
        let embed_settings = match tasks.contains(&Task::Embed) {
            true => Some((
                parameters.bool("normalize")?,
                parameters::pooling(&mut parameters)?,
                parameters.string("prompt_name")?,
                parameters.unsigned("dimensions", u64::from(u32::MAX))?,
            )),
            false => None,
        };
        let classifies = tasks.contains(&Task::Classify);
        let embed =
            embed_settings.map(
                |(normalize, pooling, prompt_name, dimensions)| EmbedParams {
                    model: target.clone(),
                    // Copied only when classify needs the texts too.
                    texts: if classifies {
                        texts.clone()
                    } else {
                        std::mem::take(&mut texts)
                    },
                    normalize,
                    pooling,
                    truncate,
                    prompt_name,
                    dimensions: dimensions.map(|d| d as usize),
                },
            );
        let classify = classifies.then_some(ClassifyParams {
            model: target,
            texts,
            text_pairs,
            top_k: None,
            scores: ScoreKind::ModelDefault,
            truncate,
        });
        Work::Encode {
            embed,
            classify,
            outputs,
        }
    };
    let task_names: Vec<&str> = tasks.iter().map(|task| task.as_str()).collect();
    parameters.finish(&task_names.join(" and "))?;
    Ok(Request {
        reply: Reply {
            id: request.id,
            model_name: request.model_name,
            layout,
        },
        route_key,
        timeout,
        work,
        names: FieldNames {
            parameters: parameters.renamed().to_vec(),
        },
    })
}

/// The outputs the request asks for, each once and each one the model gives; none: all.
fn requested_outputs(request: &ModelInferRequest, served: &Served) -> Result<Vec<Output>> {
    let available = served.outputs();
    if request.outputs.is_empty() {
        return Ok(served.default_outputs());
    }
    let mut outputs = Vec::with_capacity(available.len());
    for (index, requested) in request.outputs.iter().enumerate() {
        let output = Output::parse(&requested.name)
            .filter(|output| available.contains(output))
            .ok_or_else(|| {
                let names: Vec<&str> = available.iter().map(|output| output.name()).collect();
                Error::invalid(
                    format!("outputs[{index}].name"),
                    format!(
                        "{} is not an output of {}; its outputs: [{}]",
                        echo(&requested.name),
                        echo(&request.model_name),
                        names.join(", ")
                    ),
                )
            })?;
        if outputs.contains(&output) {
            return Err(Error::invalid(
                format!("outputs[{index}].name"),
                format!("{} is asked for twice", output.name()),
            ));
        }
        if let Some(key) = requested.parameters.keys().min() {
            return Err(Error::invalid(
                format!("outputs[{index}].parameters"),
                format!(
                    "{} is not read: lmserve takes no output parameters (no shared memory, no classification count; probabilities hold every label)",
                    echo(key)
                ),
            ));
        }
        outputs.push(output);
    }
    Ok(outputs)
}

/// Raw when the request sent `raw_input_contents`, one entry per input.
fn layout(request: &ModelInferRequest) -> Result<Layout> {
    let raw = request.raw_input_contents.len();
    if raw == 0 {
        return Ok(Layout::Typed);
    }
    if raw != request.inputs.len() {
        return Err(Error::invalid(
            "raw_input_contents",
            format!(
                "holds {raw} entries for {} inputs; send one per input, or none and use contents",
                request.inputs.len()
            ),
        ));
    }
    Ok(Layout::Raw)
}

/// One input with where its elements are.
struct Input<'a> {
    index: usize,
    tensor: &'a InferInputTensor,
    shape: &'a [i64],
}

impl Input<'_> {
    fn source<'r>(&'r self, layout: Layout, raw: &'r [Vec<u8>]) -> Source<'r> {
        match layout {
            Layout::Raw => Source::Raw(&raw[self.index]),
            Layout::Typed => Source::Typed(self.tensor.contents.as_ref()),
        }
    }
}

/// The request's inputs by name; any other name, or one sent twice, is refused.
struct Inputs<'a> {
    text: Option<Input<'a>>,
    text_pair: Option<Input<'a>>,
    stream: Option<Input<'a>>,
    exclude_input: Option<Input<'a>>,
}

impl<'a> Inputs<'a> {
    fn read(request: &'a ModelInferRequest, layout: Layout, generate: bool) -> Result<Self> {
        let mut inputs = Inputs {
            text: None,
            text_pair: None,
            stream: None,
            exclude_input: None,
        };
        let mut seen = HashSet::new();
        for (index, tensor) in request.inputs.iter().enumerate() {
            let name = tensor.name.as_str();
            let slot = match name {
                TEXT_INPUT => &mut inputs.text,
                TEXT_PAIR_INPUT if !generate => &mut inputs.text_pair,
                STREAM_INPUT if generate => &mut inputs.stream,
                EXCLUDE_INPUT_INPUT if generate => &mut inputs.exclude_input,
                _ => {
                    let known = if generate {
                        format!(
                            "{TEXT_INPUT} (BYTES), {STREAM_INPUT} (BOOL), {EXCLUDE_INPUT_INPUT} (BOOL)"
                        )
                    } else {
                        format!("{TEXT_INPUT} (BYTES), {TEXT_PAIR_INPUT} (BYTES, classification)")
                    };
                    return Err(Error::invalid(
                        format!("inputs[{index}].name"),
                        format!(
                            "{} is not an input of {}; its inputs: {known}",
                            echo(name),
                            echo(&request.model_name)
                        ),
                    ));
                }
            };
            if !seen.insert(name) {
                return Err(Error::invalid(
                    format!("inputs[{index}].name"),
                    format!("{name} is sent twice"),
                ));
            }
            if let Some(key) = tensor.parameters.keys().min() {
                return Err(Error::invalid(
                    format!("{name}.parameters"),
                    format!(
                        "{} is not read: lmserve takes no input parameters (no shared memory)",
                        echo(key)
                    ),
                ));
            }
            if layout == Layout::Raw && tensor.contents.is_some() {
                return Err(Error::invalid(
                    format!("{name}.contents"),
                    "is set as well as raw_input_contents; send the data in one of them",
                ));
            }
            *slot = Some(Input {
                index,
                tensor,
                shape: &tensor.shape,
            });
        }
        Ok(inputs)
    }
}

fn check_datatype(input: &Input<'_>, datatype: &str) -> Result<()> {
    if input.tensor.datatype == datatype {
        return Ok(());
    }
    Err(Error::invalid(
        format!("{}.datatype", input.tensor.name),
        format!("must be {datatype}; got {}", echo(&input.tensor.datatype)),
    ))
}

/// Whether `shape` is `[n]` or `[n, 1]`: one text per row.
fn one_per_row(shape: &[i64]) -> bool {
    matches!(shape, [_] | [_, 1])
}

/// The one prompt of a generate request: shape `[1]` or `[1, 1]`.
fn generate_prompt(input: Input<'_>, layout: Layout, raw: &[Vec<u8>]) -> Result<Vec<String>> {
    check_datatype(&input, BYTES)?;
    if !matches!(input.shape, [1] | [1, 1]) {
        return Err(Error::invalid(
            format!("{TEXT_INPUT}.shape"),
            format!(
                "generate models take one prompt per request, shape [1] or [1, 1]; got {}",
                show_shape(input.shape)
            ),
        ));
    }
    let elements = tensors::bytes_elements(TEXT_INPUT, input.source(layout, raw), 1)?;
    tensors::utf8(TEXT_INPUT, elements)
}

/// The texts of an embed or classify request (`text_input`, or a classify request's
/// `text_pair`): shape `[n]` or `[n, 1]`, n within the limit.
fn encoder_texts(
    input: Input<'_>,
    layout: Layout,
    raw: &[Vec<u8>],
    limits: &LimitsConfig,
) -> Result<Vec<String>> {
    check_datatype(&input, BYTES)?;
    let name = input.tensor.name.as_str();
    let field = format!("{name}.shape");
    if !one_per_row(input.shape) {
        return Err(Error::invalid(
            field,
            format!(
                "must be [n] or [n, 1], one text per row; got {}",
                show_shape(input.shape)
            ),
        ));
    }
    let count = tensors::element_count(&field, input.shape, limits.max_texts_per_request)?;
    let elements = tensors::bytes_elements(name, input.source(layout, raw), count)?;
    tensors::utf8(name, elements)
}

/// A one-BOOL input (`stream`, `exclude_input_in_output`).
fn bool_flag(name: &str, input: Input<'_>, layout: Layout, raw: &[Vec<u8>]) -> Result<bool> {
    check_datatype(&input, BOOL)?;
    if !matches!(input.shape, [1] | [1, 1]) {
        return Err(Error::invalid(
            format!("{name}.shape"),
            format!("must be [1]; got {}", show_shape(input.shape)),
        ));
    }
    let flags = tensors::bool_elements(name, input.source(layout, raw), 1)?;
    Ok(flags[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_errors_name_the_fields_the_client_sent() {
        let names = FieldNames {
            parameters: vec![("max_new_tokens", "max_tokens")],
        };
        let renamed = |field: &str| match names.apply(Error::invalid(field, "x")) {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(renamed("texts[2]"), "text_input[2]");
        assert_eq!(renamed("texts"), "text_input");
        assert_eq!(renamed("prompt.text"), "text_input");
        assert_eq!(renamed("model"), "model_name");
        assert_eq!(
            renamed("parameters.max_new_tokens"),
            "parameters.max_tokens"
        );
        assert_eq!(renamed("parameters.top_p"), "parameters.top_p");
        assert_eq!(renamed("pooling"), "parameters.pooling");
        let advice = names.apply(Error::invalid(
            "texts[0]",
            format!(
                "300 tokens is over 256; {}",
                crate::tasks::text::TRUNCATE_HINT
            ),
        ));
        assert_eq!(
            advice.to_string(),
            "text_input[0]: 300 tokens is over 256; set parameters.truncate to right or left to cut it"
        );
        assert!(matches!(
            names.apply(Error::ShuttingDown),
            Error::ShuttingDown
        ));
    }

    #[test]
    fn rows_hold_one_text() {
        assert!(one_per_row(&[3]) && one_per_row(&[3, 1]));
        assert!(!one_per_row(&[]) && !one_per_row(&[3, 2]) && !one_per_row(&[1, 1, 1]));
    }
}
