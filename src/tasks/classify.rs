//! Classify: tokenize, batch, and turn class logits into ranked label scores.

use std::sync::Arc;

use super::limits::{check_target, check_text_pairs, check_texts};
use super::routing::{self, Routing};
use super::text::{EncoderTexts, Truncate};
use super::{EncodedOutput, RequestMetrics, ServedBy, run_encoder};
use crate::config::LimitsConfig;
use crate::error::{Error, Result, Task};
use crate::kinds::Activation;
use crate::registry::{ModelVersion, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreKind {
    /// What the model's head means: its logits through the model's activation (probabilities
    /// as transformers' text-classification pipeline gives them, a regression head's values as
    /// they are, a CrossEncoder's through its `activation_fn`).
    #[default]
    ModelDefault,
    Probability,
    Raw,
}

#[derive(Debug, Clone)]
pub struct ClassifyParams {
    pub model: String,
    pub texts: Vec<String>,
    /// Empty, or one second text per text: a cross-encoder scores each text with its pair.
    pub text_pairs: Vec<String>,
    /// `None`: every label.
    pub top_k: Option<u32>,
    pub scores: ScoreKind,
    pub truncate: Truncate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub index: usize,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// Ordered by descending score.
    pub labels: Vec<LabelScore>,
    pub token_count: usize,
    pub truncated: bool,
    pub multi_label: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClassifyOutput {
    pub classifications: Vec<Classification>,
    pub served_by: ServedBy,
}

pub async fn classify(
    registry: &Registry,
    limits: &LimitsConfig,
    params: ClassifyParams,
    routing: &Routing,
) -> Result<ClassifyOutput> {
    let mut request = RequestMetrics::start(Task::Classify.as_str(), routing.call_deadline);
    request.requested(registry, &params.model);
    let result = async {
        check_target("model", &params.model, limits)?;
        check_texts(&params.texts, limits)?;
        check_text_pairs(&params.text_pairs, params.texts.len(), limits)?;
        if params.top_k == Some(0) {
            return Err(Error::invalid(
                "top_k",
                "must be at least 1 when set; got 0",
            ));
        }
        // A copy to one of the route's own versions starts once this request has run.
        let (model, served_by, _shadow) = routing::route(
            registry,
            &params.model,
            Task::Classify,
            routing,
            &mut request,
            |shadow| {
                let params = params.clone();
                async move { classify_on(&shadow, params, None).await }
            },
        )?;
        let classifications = classify_on(&model, params, routing.deadline).await?;
        request.tokens(classifications.iter().map(|c| c.token_count).sum(), 0);
        Ok(ClassifyOutput {
            classifications,
            served_by,
        })
    }
    .await;
    request.finish(result)
}

/// Classifies on one model version.
async fn classify_on(
    model: &Arc<ModelVersion>,
    params: ClassifyParams,
    deadline: Option<std::time::Instant>,
) -> Result<Vec<Classification>> {
    let settings = model
        .settings
        .classify
        .as_ref()
        .ok_or_else(|| Error::Internal(format!("{} has no classify settings", model.name)))?;
    let labels = &settings.labels.value;
    let multi_label = settings.multi_label.value;
    let activation = settings.activation.value;
    if settings.prompt.is_some() && params.truncate == Truncate::Left {
        return Err(Error::invalid(
            "truncate",
            format!(
                "TRUNCATE_LEFT would cut off the prompt {}@{} puts before each text first; \
                 truncate right, as sentence-transformers does",
                model.name, model.version
            ),
        ));
    }
    let texts = match &settings.prompt {
        Some(prompt) => params
            .texts
            .into_iter()
            .map(|text| format!("{}{text}", prompt.value))
            .collect(),
        None => params.texts,
    };
    let texts = EncoderTexts {
        texts,
        pairs: params.text_pairs,
        truncate: params.truncate,
    };
    let outputs = run_encoder(model, texts, None, 0, true, deadline).await?;

    let top_k = params.top_k.map_or(labels.len(), |k| k as usize);
    outputs
        .into_iter()
        .map(
            |EncodedOutput {
                 token_count,
                 truncated,
                 output,
             }| {
                let logits = output
                    .logits
                    .ok_or_else(|| Error::Internal("the batch returned no logits".into()))?;
                if logits.len() != labels.len() {
                    return Err(Error::Internal(format!(
                        "the model returned {} scores for {} labels",
                        logits.len(),
                        labels.len()
                    )));
                }
                let scores = match params.scores {
                    ScoreKind::Raw => logits,
                    ScoreKind::ModelDefault => activate(activation, logits),
                    ScoreKind::Probability if multi_label => activate(Activation::Sigmoid, logits),
                    ScoreKind::Probability => activate(Activation::Softmax, logits),
                };
                Ok(Classification {
                    labels: rank(&scores, labels, top_k),
                    token_count,
                    truncated,
                    multi_label,
                })
            },
        )
        .collect()
}

/// Labels with their scores, best first, at most `top_k`.
fn rank(scores: &[f32], labels: &[String], top_k: usize) -> Vec<LabelScore> {
    let mut ranked: Vec<LabelScore> = scores
        .iter()
        .zip(labels)
        .enumerate()
        .map(|(index, (&score, label))| LabelScore {
            label: label.clone(),
            index,
            score,
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    ranked.truncate(top_k);
    ranked
}

fn activate(activation: Activation, logits: Vec<f32>) -> Vec<f32> {
    match activation {
        Activation::Softmax => softmax(&logits),
        Activation::Sigmoid => logits.into_iter().map(sigmoid).collect(),
        Activation::Identity => logits,
        Activation::Tanh => logits.into_iter().map(f32::tanh).collect(),
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let probabilities = softmax(&[1000.0, 1000.0]);
        assert_eq!(probabilities, vec![0.5, 0.5]);
    }

    #[test]
    fn ranks_best_first_and_cuts_to_top_k() {
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let ranked = rank(&[0.1, 0.7, 0.2], &labels, 2);
        assert_eq!(
            ranked.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(ranked[0].index, 1);
    }
}
