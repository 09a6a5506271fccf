//! Tokenize and Detokenize with any model's tokenizer.

use std::sync::Arc;

use super::limits::{check_name, check_prompt_text, check_token_ids};
use super::text::blocking;
use super::{RequestMetrics, ServedBy};
use crate::config::LimitsConfig;
use crate::error::{Error, Result};
use crate::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// Character (Unicode scalar) offsets into the input.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOutput {
    pub tokens: Vec<Token>,
    pub served_by: ServedBy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetokenizeOutput {
    pub text: String,
    pub served_by: ServedBy,
}

/// Splits `text` into tokens; `add_special_tokens` unset does what inference feeds the model.
pub async fn tokenize(
    registry: &Registry,
    limits: &LimitsConfig,
    model: &str,
    text: String,
    add_special_tokens: Option<bool>,
) -> Result<TokenizeOutput> {
    let mut request = RequestMetrics::start("tokenize");
    request.requested(registry, model);
    let result = async {
        check_name("model", model, limits)?;
        check_prompt_text("text", &text, limits)?;
        let model = registry.resolve(model, None)?;
        request.model(&model);
        let special = add_special_tokens.unwrap_or(model.settings.add_special_tokens.value);
        let tokenizer = Arc::clone(&model.tokenizer);
        let tokens = blocking(move || {
            let encoding = tokenizer
                .encode_char_offsets(text.as_str(), special)
                .map_err(|error| Error::invalid("text", format!("cannot be tokenized: {error}")))?;
            Ok(encoding
                .get_ids()
                .iter()
                .zip(encoding.get_tokens())
                .zip(encoding.get_offsets())
                .map(|((&id, token), &(start, end))| Token {
                    id,
                    text: token.clone(),
                    start,
                    end,
                })
                .collect())
        })
        .await?;
        Ok(TokenizeOutput {
            tokens,
            served_by: ServedBy::of(&model),
        })
    }
    .await;
    request.finish(result)
}

pub async fn detokenize(
    registry: &Registry,
    limits: &LimitsConfig,
    model: &str,
    ids: Vec<u32>,
    skip_special_tokens: bool,
) -> Result<DetokenizeOutput> {
    let mut request = RequestMetrics::start("detokenize");
    request.requested(registry, model);
    let result = async {
        check_name("model", model, limits)?;
        check_token_ids("ids", ids.len(), limits)?;
        let model = registry.resolve(model, None)?;
        request.model(&model);
        let vocab = model.tokenizer.get_vocab_size(true);
        if let Some((index, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= vocab)
        {
            return Err(Error::invalid(
                format!("ids[{index}]"),
                format!("{id} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        let tokenizer = Arc::clone(&model.tokenizer);
        let text = blocking(move || {
            tokenizer
                .decode(&ids, skip_special_tokens)
                .map_err(|error| Error::Internal(format!("decoding failed: {error}")))
        })
        .await?;
        Ok(DetokenizeOutput {
            text,
            served_by: ServedBy::of(&model),
        })
    }
    .await;
    request.finish(result)
}
