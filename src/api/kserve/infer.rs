//! ModelInfer's work: a read request run on lmserve's tasks (embed and classify together when
//! both tasks' outputs are asked for), and the answer written as a ModelInferResponse.

use std::collections::HashMap;

use super::metadata::Output;
use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::{InferParameter, ModelInferResponse};
use super::request::{Request, Work};
use super::tensors::{Data, Layout};
use crate::config::{GenerationConfig, LimitsConfig};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::tasks::ServedBy;
use crate::tasks::classify::{self, ClassifyOutput};
use crate::tasks::embed::{self, EmbedOutput};
use crate::tasks::generate::driver::FinishReason;
use crate::tasks::generate::{self as generation, GenerateOutput};
use crate::tasks::routing::Routing;

/// What the tasks need from the server.
#[derive(Clone, Copy)]
pub struct Tasks<'a> {
    pub registry: &'a Registry,
    pub limits: &'a LimitsConfig,
    pub generation: &'a GenerationConfig,
}

impl Tasks<'_> {
    pub fn generation_limits(&self) -> generation::Limits<'_> {
        generation::Limits {
            request: self.limits,
            generation: self.generation,
        }
    }
}

/// One output tensor of a response.
pub struct Tensor {
    pub output: Output,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// Response parameters, as the response carries them.
pub type ResponseParameters = Vec<(&'static str, ParameterChoice)>;

/// What every response to one request repeats.
#[derive(Debug, Clone)]
pub struct Reply {
    pub id: String,
    /// As the client named it (a model or a route).
    pub model_name: String,
    pub layout: Layout,
}

impl Reply {
    /// A response carrying `tensors`, saying which model version (and route arm) served it.
    pub fn response(
        &self,
        served_by: &ServedBy,
        tensors: Vec<Tensor>,
        mut parameters: ResponseParameters,
    ) -> ModelInferResponse {
        parameters.extend(served_by_parameters(served_by));
        let mut outputs = Vec::with_capacity(tensors.len());
        let mut raw = Vec::new();
        for Tensor {
            output,
            shape,
            data,
        } in tensors
        {
            let datatype = data.datatype().to_owned();
            let contents = match self.layout {
                Layout::Raw => {
                    raw.push(data.into_raw());
                    None
                }
                Layout::Typed => Some(data.into_contents()),
            };
            outputs.push(InferOutputTensor {
                name: output.name().to_owned(),
                datatype,
                shape,
                parameters: HashMap::new(),
                contents,
            });
        }
        ModelInferResponse {
            model_name: self.model_name.clone(),
            model_version: served_by.version.clone(),
            id: self.id.clone(),
            parameters: response_parameters(parameters),
            outputs,
            raw_output_contents: raw,
        }
    }
}

pub fn response_parameters(parameters: ResponseParameters) -> HashMap<String, InferParameter> {
    parameters
        .into_iter()
        .map(|(key, choice)| {
            (
                key.to_owned(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            )
        })
        .collect()
}

/// `served_by` ("model@version"), and `route` and `arm` when a route chose the version.
fn served_by_parameters(served_by: &ServedBy) -> ResponseParameters {
    let mut parameters = vec![(
        "served_by",
        ParameterChoice::StringParam(format!("{}@{}", served_by.model, served_by.version)),
    )];
    if !served_by.route.is_empty() {
        parameters.push((
            "route",
            ParameterChoice::StringParam(served_by.route.clone()),
        ));
        parameters.push(("arm", ParameterChoice::StringParam(served_by.arm.clone())));
    }
    parameters
}

pub fn finish_reason(reason: FinishReason) -> ParameterChoice {
    ParameterChoice::StringParam(
        match reason {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
        }
        .to_owned(),
    )
}

/// A count as a response parameter.
pub fn count(value: usize) -> ParameterChoice {
    ParameterChoice::Int64Param(i64::try_from(value).unwrap_or(i64::MAX))
}

/// `text` as the BYTES `text_output`, shaped like the prompt.
pub fn text_output(text: String, shape: Vec<i64>) -> Tensor {
    Tensor {
        output: Output::Text,
        shape,
        data: Data::Bytes(vec![text.into_bytes()]),
    }
}

/// Runs `request` to its end and answers with every output it asked for.
pub async fn infer(
    tasks: Tasks<'_>,
    request: Request,
    routing: &Routing,
) -> Result<ModelInferResponse> {
    let Request {
        reply, work, names, ..
    } = request;
    let answered = match work {
        Work::Generate { stream: true, .. } => Err(Error::invalid(
            "stream",
            "true asks for token streaming, which needs ModelStreamInfer; send false or leave the input out",
        )),
        Work::Generate {
            params,
            shape,
            echoed_prompt,
            ..
        } => generation::generate(tasks.registry, tasks.generation_limits(), params, routing)
            .await
            .map(|output| generated(&reply, output, shape, echoed_prompt)),
        Work::Encode {
            embed,
            classify,
            outputs,
        } => encode(tasks, embed, classify, routing)
            .await
            .map(|(embedded, classified)| encoded(&reply, &outputs, embedded, classified)),
    };
    answered.map_err(|error| names.apply(error))
}

fn generated(
    reply: &Reply,
    output: GenerateOutput,
    shape: Vec<i64>,
    echoed_prompt: Option<String>,
) -> ModelInferResponse {
    let mut parameters = vec![
        ("prompt_tokens", count(output.prompt_tokens)),
        ("generated_tokens", count(output.generated_tokens)),
    ];
    let sequence = output.sequences.into_iter().next();
    let (text, reason) = sequence.map_or((String::new(), None), |s| (s.text, s.finish_reason));
    let text = match echoed_prompt {
        Some(prompt) => prompt + &text,
        None => text,
    };
    if let Some(reason) = reason {
        parameters.push(("finish_reason", finish_reason(reason)));
    }
    reply.response(
        &output.served_by,
        vec![text_output(text, shape)],
        parameters,
    )
}

/// Embeds and classifies the same texts, at once when both are asked for.
async fn encode(
    tasks: Tasks<'_>,
    embed_params: Option<embed::EmbedParams>,
    classify_params: Option<classify::ClassifyParams>,
    routing: &Routing,
) -> Result<(Option<EmbedOutput>, Option<ClassifyOutput>)> {
    let embedding = async {
        match embed_params {
            Some(params) => embed::embed(tasks.registry, tasks.limits, params, routing)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let classification = async {
        match classify_params {
            Some(params) => classify::classify(tasks.registry, tasks.limits, params, routing)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    futures::try_join!(embedding, classification)
}

fn encoded(
    reply: &Reply,
    outputs: &[Output],
    embedded: Option<EmbedOutput>,
    classified: Option<ClassifyOutput>,
) -> ModelInferResponse {
    let served_by = embedded
        .as_ref()
        .map(|e| e.served_by.clone())
        .or_else(|| classified.as_ref().map(|c| c.served_by.clone()))
        .unwrap_or_default();
    let rows = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
    let mut embedding = embedded.map(|output| {
        let texts = output.embeddings.len();
        let width = output.embeddings.first().map_or(0, |e| e.values.len());
        let values: Vec<f32> = output
            .embeddings
            .into_iter()
            .flat_map(|e| e.values)
            .collect();
        Tensor {
            output: Output::Embedding,
            shape: vec![rows(texts), rows(width)],
            data: Data::Fp32(values),
        }
    });
    let (mut probabilities, mut labels) = match classified {
        Some(output) => {
            let (probabilities, labels) = label_order(output);
            (Some(probabilities), Some(labels))
        }
        None => (None, None),
    };
    let tensors = outputs
        .iter()
        .filter_map(|output| match output {
            Output::Embedding => embedding.take(),
            Output::Probabilities => probabilities.take(),
            Output::Labels => labels.take(),
            Output::Text => None,
        })
        .collect();
    reply.response(&served_by, tensors, Vec::new())
}

/// Classify's ranked labels back in label order: `probabilities` [texts, labels] and the
/// `labels` names [labels], the same for every text.
fn label_order(output: ClassifyOutput) -> (Tensor, Tensor) {
    let texts = output.classifications.len();
    let width = output.classifications.first().map_or(0, |c| c.labels.len());
    let mut names = vec![Vec::new(); width];
    let mut values = vec![0.0f32; texts * width];
    for (row, classification) in output.classifications.into_iter().enumerate() {
        for label in classification.labels {
            if label.index < width {
                values[row * width + label.index] = label.score;
                names[label.index] = label.label.into_bytes();
            }
        }
    }
    let size = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
    (
        Tensor {
            output: Output::Probabilities,
            shape: vec![size(texts), size(width)],
            data: Data::Fp32(values),
        },
        Tensor {
            output: Output::Labels,
            shape: vec![size(width)],
            data: Data::Bytes(names),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::classify::{Classification, LabelScore};

    #[test]
    fn ranked_labels_return_to_label_order() {
        let classification = |scores: [(usize, f32); 2]| Classification {
            labels: scores
                .into_iter()
                .map(|(index, score)| LabelScore {
                    label: ["ham", "spam"][index].to_owned(),
                    index,
                    score,
                })
                .collect(),
            token_count: 1,
            truncated: false,
            multi_label: false,
        };
        let (probabilities, labels) = label_order(ClassifyOutput {
            classifications: vec![
                classification([(1, 0.9), (0, 0.1)]),
                classification([(0, 0.7), (1, 0.3)]),
            ],
            served_by: ServedBy::default(),
        });
        assert_eq!(probabilities.shape, [2, 2]);
        assert_eq!(probabilities.data, Data::Fp32(vec![0.1, 0.9, 0.7, 0.3]));
        assert_eq!(labels.shape, [2]);
        assert_eq!(
            labels.data,
            Data::Bytes(vec![b"ham".to_vec(), b"spam".to_vec()])
        );
    }

    #[test]
    fn responses_use_the_request_layout() {
        let reply = |layout| Reply {
            id: "7".into(),
            model_name: "chat".into(),
            layout,
        };
        let served_by = ServedBy {
            model: "tiny-gpt2".into(),
            version: "1".into(),
            route: "chat".into(),
            arm: "tiny-gpt2@1".into(),
        };
        let raw = reply(Layout::Raw).response(
            &served_by,
            vec![text_output("hi".into(), vec![1])],
            Vec::new(),
        );
        assert_eq!(raw.raw_output_contents, [[2, 0, 0, 0, b'h', b'i']]);
        assert!(raw.outputs[0].contents.is_none());
        assert_eq!((raw.id.as_str(), raw.model_version.as_str()), ("7", "1"));
        assert_eq!(
            raw.parameters["served_by"].parameter_choice,
            Some(ParameterChoice::StringParam("tiny-gpt2@1".into()))
        );
        assert!(raw.parameters.contains_key("arm"));
        let typed = reply(Layout::Typed).response(
            &served_by,
            vec![text_output("hi".into(), vec![1])],
            Vec::new(),
        );
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(
            typed.outputs[0].contents.as_ref().unwrap().bytes_contents,
            [b"hi".to_vec()]
        );
    }
}
