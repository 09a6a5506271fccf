//! Embed: tokenize, batch through the model's dynamic batcher, pool, normalise.

use std::sync::Arc;

use super::limits::{check_target, check_texts};
use super::routing::{self, Routing};
use super::text::{self, Truncate};
use super::{EncodedOutput, RequestMetrics, ServedBy, run_encoder};
use crate::config::LimitsConfig;
use crate::error::{Error, Result, Task};
use crate::registry::settings::{Source, pooling_name};
use crate::registry::{ModelVersion, Registry};
use crate::runtime::encoder::{Embedding as EncoderEmbedding, Pooling};

#[derive(Debug, Clone)]
pub struct EmbedParams {
    pub model: String,
    pub texts: Vec<String>,
    /// `None`: the manifest's default.
    pub normalize: Option<bool>,
    /// `None`: the manifest's default.
    pub pooling: Option<Pooling>,
    pub truncate: Truncate,
    /// The model's prompt to put before each text; `None`: its default, `""`: none.
    pub prompt_name: Option<String>,
    /// How many leading values of each vector to keep; `None`: the model's `truncate_dim`.
    pub dimensions: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    pub values: Vec<f32>,
    pub token_count: usize,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    pub embeddings: Vec<Embedding>,
    pub served_by: ServedBy,
}

pub async fn embed(
    registry: &Registry,
    limits: &LimitsConfig,
    params: EmbedParams,
    routing: &Routing,
) -> Result<EmbedOutput> {
    let mut request = RequestMetrics::start(Task::Embed.as_str(), routing.call_deadline);
    request.requested(registry, &params.model);
    let result = async {
        check_target("model", &params.model, limits)?;
        check_texts(&params.texts, limits)?;
        // A copy to one of the route's own versions starts once this request has run.
        let (model, served_by, _shadow) = routing::route(
            registry,
            &params.model,
            Task::Embed,
            routing,
            &mut request,
            |shadow| {
                let params = params.clone();
                async move { embed_on(&shadow, params, None).await }
            },
        )?;
        let embeddings = embed_on(&model, params, routing.deadline).await?;
        request.tokens(embeddings.iter().map(|e| e.token_count).sum(), 0);
        Ok(EmbedOutput {
            embeddings,
            served_by,
        })
    }
    .await;
    request.finish(result)
}

/// Embeds on one model version.
async fn embed_on(
    model: &Arc<ModelVersion>,
    params: EmbedParams,
    deadline: Option<std::time::Instant>,
) -> Result<Vec<Embedding>> {
    let settings = model
        .settings
        .embed
        .as_ref()
        .ok_or_else(|| Error::Internal(format!("{} has no embed settings", model.name)))?;
    // A pooling the request names is applied to per-token states, which a graph that only
    // returns pooled vectors does not have.
    let embedding = match params.pooling {
        Some(pooling) if !settings.after_pooling.is_empty() => {
            return Err(Error::invalid(
                "pooling",
                format!(
                    "{}@{} runs {} after pooling, which only its graph's pooled output includes, so {} pooling cannot be chosen; leave pooling unset",
                    model.name,
                    model.version,
                    settings.after_pooling.join(", "),
                    pooling_name(pooling)
                ),
            ));
        }
        Some(pooling) if model.bindings.hidden_states.is_some() => EncoderEmbedding::Pool(pooling),
        Some(pooling) => {
            return Err(Error::invalid(
                "pooling",
                format!(
                    "{}@{} returns embeddings its graph already pooled, so {} pooling cannot be chosen; leave pooling unset",
                    model.name,
                    model.version,
                    pooling_name(pooling)
                ),
            ));
        }
        None if settings.use_pooled_output => EncoderEmbedding::Pooled,
        None => EncoderEmbedding::Pool(settings.pooling.value),
    };
    // As sentence-transformers' encode: the model's own normalization (a Normalize module, or
    // model.toml's) runs before the cut to `truncate_dim`, and `normalize_embeddings=True`
    // after it. The server's own default (a model that says nothing) normalizes what it
    // returns, after the cut, as a client of such a server expects unit vectors.
    let model_default = params.normalize.is_none() && settings.normalize.value;
    let the_models_own = settings.normalize.source != Source::Default;
    let normalize_before_cut = model_default && the_models_own;
    let normalize_after_cut = params.normalize == Some(true) || (model_default && !the_models_own);
    // A model's truncate_dim past its width keeps every value, as sentence-transformers' slice
    // does; a request's must fit.
    let dimensions = match params.dimensions {
        Some(0) => {
            return Err(Error::invalid(
                "dimensions",
                "must be at least 1 when set; got 0",
            ));
        }
        Some(dimensions) => {
            if let Some(width) = model.embedding_width()
                && dimensions > width
            {
                return Err(too_wide(model, dimensions, width));
            }
            Some(dimensions)
        }
        None => None,
    };
    let prompt = settings.prompt(params.prompt_name.as_deref())?;
    if prompt.is_some() && !settings.prompt_in_pooling && embedding == EncoderEmbedding::Pooled {
        return Err(Error::invalid(
            "prompt_name",
            format!(
                "{}@{} pools without its prompt's tokens (include_prompt false), which its graph's \
                 pooled output cannot leave out, and it has no per-token states to pool here; \
                 send prompt_name \"\" for no prompt",
                model.name, model.version
            ),
        ));
    }
    if prompt.is_some() && params.truncate == Truncate::Left {
        return Err(Error::invalid(
            "truncate",
            "TRUNCATE_LEFT would cut off the text's prompt first; truncate right, as \
             sentence-transformers does, or send prompt_name \"\" for no prompt",
        ));
    }
    // As sentence-transformers: the prompt and the text as one string.
    let texts = match prompt {
        Some(prompt) => params
            .texts
            .into_iter()
            .map(|text| format!("{prompt}{text}"))
            .collect(),
        None => params.texts,
    };
    let pool_from = match prompt {
        Some(prompt) if !settings.prompt_in_pooling => {
            let (model, prompt) = (Arc::clone(model), prompt.to_owned());
            text::blocking(move || prompt_length(&model, &prompt)).await?
        }
        _ => 0,
    };

    let outputs = run_encoder(
        model,
        text::EncoderTexts::single(texts, params.truncate),
        Some(embedding),
        pool_from,
        false,
        deadline,
    )
    .await?;
    outputs
        .into_iter()
        .map(
            |EncodedOutput {
                 token_count,
                 truncated,
                 output,
             }| {
                let mut values = output
                    .pooled
                    .ok_or_else(|| Error::Internal("the batch returned no pooled state".into()))?;
                if normalize_before_cut {
                    l2_normalize(&mut values);
                }
                // Checked here too for a graph that does not declare its width.
                if let Some(dimensions) = dimensions {
                    if dimensions > values.len() {
                        return Err(too_wide(model, dimensions, values.len()));
                    }
                    values.truncate(dimensions);
                } else if let Some(truncate_dim) = &settings.truncate_dim {
                    values.truncate(truncate_dim.value);
                }
                if normalize_after_cut {
                    l2_normalize(&mut values);
                }
                Ok(Embedding {
                    values,
                    token_count,
                    truncated,
                })
            },
        )
        .collect()
}

/// The tokens pooling leaves out for a model that pools without its prompt: the prompt's,
/// tokenized alone with the special tokens, less the special token that ends it alone, as
/// sentence-transformers counts them (for BERT, `[CLS]` and the prompt, not the `[SEP]`; for a
/// tokenizer that adds nothing at the end, every token of the prompt).
fn prompt_length(model: &ModelVersion, prompt: &str) -> Result<usize> {
    let add_special_tokens = model.settings.add_special_tokens.value;
    let encoding = model
        .tokenizer
        .encode(prompt, add_special_tokens)
        .map_err(|error| Error::Internal(format!("tokenizing the prompt: {error}")))?;
    Ok(prompt_tokens(&encoding))
}

fn prompt_tokens(encoding: &tokenizers::Encoding) -> usize {
    let ends_special = encoding.get_special_tokens_mask().last() == Some(&1);
    encoding.len() - usize::from(ends_special)
}

fn too_wide(model: &ModelVersion, dimensions: usize, width: usize) -> Error {
    Error::invalid(
        "dimensions",
        format!(
            "is {dimensions}, over the {width} values {}@{} returns",
            model.name, model.version
        ),
    )
}

/// Scales `values` to unit length; a zero vector stays zero.
pub fn l2_normalize(values: &mut [f32]) {
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        values.iter_mut().for_each(|v| *v /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_unit_length() {
        let mut values = [3.0, 4.0];
        l2_normalize(&mut values);
        assert_eq!(values, [0.6, 0.8]);
        let mut zero = [0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, [0.0, 0.0]);
    }
}
