//! Tokenize and Detokenize with any model's tokenizer.

use super::{RequestMetrics, ServedBy};
use crate::error::{Error, Result};
use crate::registry::Registry;

/// Longest text Tokenize accepts, in bytes.
pub const MAX_TOKENIZE_BYTES: usize = 1 << 20;

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
pub fn tokenize(
    registry: &Registry,
    model: &str,
    text: &str,
    add_special_tokens: Option<bool>,
) -> Result<TokenizeOutput> {
    let mut request = RequestMetrics::start("tokenize");
    let result = (|| {
        if text.len() > MAX_TOKENIZE_BYTES {
            return Err(Error::invalid(
                "text",
                format!(
                    "{} bytes is over the limit of {MAX_TOKENIZE_BYTES} bytes",
                    text.len()
                ),
            ));
        }
        let model = registry.resolve(model, None)?;
        request.model(&model);
        let special = add_special_tokens.unwrap_or(model.settings.add_special_tokens.value);
        let encoding = model
            .tokenizer
            .encode_char_offsets(text, special)
            .map_err(|error| Error::invalid("text", format!("cannot be tokenized: {error}")))?;
        let tokens = encoding
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
            .collect();
        Ok(TokenizeOutput {
            tokens,
            served_by: ServedBy::of(&model),
        })
    })();
    request.finish(result)
}

pub fn detokenize(
    registry: &Registry,
    model: &str,
    ids: &[u32],
    skip_special_tokens: bool,
) -> Result<DetokenizeOutput> {
    let mut request = RequestMetrics::start("detokenize");
    let result = (|| {
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
        let text = model
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|error| Error::Internal(format!("decoding failed: {error}")))?;
        Ok(DetokenizeOutput {
            text,
            served_by: ServedBy::of(&model),
        })
    })();
    request.finish(result)
}
