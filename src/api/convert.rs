//! Proto messages to domain parameters and back. Client-supplied enums are checked here: an
//! unknown value is an INVALID_ARGUMENT naming the field, never a panic.

use super::proto;
use crate::error::{Error, Result};
use crate::runtime::encoder::Pooling;
use crate::tasks::ServedBy;
use crate::tasks::classify::{ClassifyOutput, ClassifyParams, ScoreKind};
use crate::tasks::embed::{EmbedOutput, EmbedParams};
use crate::tasks::text::Truncate;

fn unknown_enum(field: &str, value: i32, known: &str) -> Error {
    Error::invalid(
        field,
        format!("unknown value {value}; known values: {known}"),
    )
}

fn truncate(value: i32) -> Result<Truncate> {
    match proto::Truncate::try_from(value) {
        // Unset means what TRUNCATE_NONE says (inference.proto documents it).
        Ok(proto::Truncate::Unspecified | proto::Truncate::None) => Ok(Truncate::None),
        Ok(proto::Truncate::Right) => Ok(Truncate::Right),
        Ok(proto::Truncate::Left) => Ok(Truncate::Left),
        Err(_) => Err(unknown_enum(
            "truncate",
            value,
            "TRUNCATE_UNSPECIFIED, TRUNCATE_RIGHT, TRUNCATE_LEFT, TRUNCATE_NONE",
        )),
    }
}

fn pooling(value: i32) -> Result<Option<Pooling>> {
    match proto::Pooling::try_from(value) {
        Ok(proto::Pooling::Unspecified) => Ok(None),
        Ok(proto::Pooling::Mean) => Ok(Some(Pooling::Mean)),
        Ok(proto::Pooling::Cls) => Ok(Some(Pooling::Cls)),
        Ok(proto::Pooling::LastToken) => Ok(Some(Pooling::Last)),
        Ok(proto::Pooling::Max) => Ok(Some(Pooling::Max)),
        Err(_) => Err(unknown_enum(
            "pooling",
            value,
            "POOLING_UNSPECIFIED, POOLING_MEAN, POOLING_CLS, POOLING_LAST_TOKEN, POOLING_MAX",
        )),
    }
}

fn score_kind(value: i32) -> Result<ScoreKind> {
    match proto::ScoreKind::try_from(value) {
        Ok(proto::ScoreKind::Unspecified) => Ok(ScoreKind::ModelDefault),
        Ok(proto::ScoreKind::Probability) => Ok(ScoreKind::Probability),
        Ok(proto::ScoreKind::Raw) => Ok(ScoreKind::Raw),
        Err(_) => Err(unknown_enum(
            "scores",
            value,
            "SCORE_KIND_UNSPECIFIED, SCORE_KIND_RAW, SCORE_KIND_PROBABILITY",
        )),
    }
}

pub fn embed_params(request: proto::EmbedRequest) -> Result<EmbedParams> {
    Ok(EmbedParams {
        pooling: pooling(request.pooling)?,
        truncate: truncate(request.truncate)?,
        model: request.model,
        texts: request.texts,
        normalize: request.normalize,
        prompt_name: request.prompt_name,
        dimensions: request.dimensions.map(|d| d as usize),
    })
}

pub fn classify_params(request: proto::ClassifyRequest) -> Result<ClassifyParams> {
    Ok(ClassifyParams {
        scores: score_kind(request.scores)?,
        truncate: truncate(request.truncate)?,
        model: request.model,
        texts: request.texts,
        text_pairs: request.text_pairs,
        top_k: request.top_k,
    })
}

pub fn served_by(served_by: ServedBy) -> Option<proto::ServedBy> {
    Some(proto::ServedBy {
        model: served_by.model,
        version: served_by.version,
        route: served_by.route,
        arm: served_by.arm,
    })
}

pub fn embed_response(output: EmbedOutput) -> proto::EmbedResponse {
    proto::EmbedResponse {
        embeddings: output
            .embeddings
            .into_iter()
            .map(|e| proto::Embedding {
                values: e.values,
                token_count: e.token_count as u32,
                truncated: e.truncated,
            })
            .collect(),
        served_by: served_by(output.served_by),
    }
}

pub fn classify_response(output: ClassifyOutput) -> proto::ClassifyResponse {
    proto::ClassifyResponse {
        classifications: output
            .classifications
            .into_iter()
            .map(|c| proto::Classification {
                labels: c
                    .labels
                    .into_iter()
                    .map(|l| proto::LabelScore {
                        label: l.label,
                        index: l.index as u32,
                        score: l.score,
                    })
                    .collect(),
                token_count: c.token_count as u32,
                truncated: c.truncated,
                multi_label: c.multi_label,
            })
            .collect(),
        served_by: served_by(output.served_by),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // inference.proto promises that an unset enum means what its named default says.
    #[test]
    fn unset_enums_mean_their_documented_default() {
        let none = proto::Truncate::None as i32;
        assert_eq!(truncate(0).unwrap(), truncate(none).unwrap());
        assert_eq!(truncate(0).unwrap(), Truncate::None);
        // Unset scores mean the model's own kind: its logits through classify.activation.
        assert_eq!(score_kind(0).unwrap(), ScoreKind::ModelDefault);
        let probability = proto::ScoreKind::Probability as i32;
        assert_eq!(score_kind(probability).unwrap(), ScoreKind::Probability);
    }
}
