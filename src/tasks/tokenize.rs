//! Tokenize and Detokenize with any model's tokenizer.

use std::sync::Arc;

use tokenizers::EncodeInput;

use super::chat;
use super::limits::{check_messages, check_prompt_text, check_target, check_token_ids};
use super::text::aside;
use super::{RequestMetrics, ServedBy};
use crate::config::LimitsConfig;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::registry::chat::ChatMessage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// Character (Unicode scalar) offsets into the input (the pair, for the pair's tokens).
    pub start: usize,
    pub end: usize,
    /// The token type id the model is fed with it.
    pub type_id: u32,
    /// Whether the token comes from the pair.
    pub in_pair: bool,
}

/// What to tokenize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizeInput {
    /// A text, and a second one tokenized together with it (a cross-encoder's pair).
    Text(String, Option<String>),
    /// A conversation, rendered with the model's chat template first.
    Messages(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOutput {
    pub tokens: Vec<Token>,
    /// The rendered conversation, for `Messages`.
    pub rendered: Option<String>,
    pub served_by: ServedBy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetokenizeOutput {
    pub text: String,
    pub served_by: ServedBy,
}

/// Splits the input into tokens. `add_special_tokens` unset does what inference feeds the
/// model: the model's setting for text, none for a conversation (its template writes them).
pub async fn tokenize(
    registry: &Registry,
    limits: &LimitsConfig,
    model: &str,
    input: TokenizeInput,
    add_special_tokens: Option<bool>,
    deadline: Option<std::time::Instant>,
) -> Result<TokenizeOutput> {
    let mut request = RequestMetrics::start("tokenize", deadline);
    request.requested(registry, model);
    let result = async {
        check_target("model", model, limits)?;
        match &input {
            TokenizeInput::Text(text, pair) => {
                check_prompt_text("text", text, limits)?;
                if let Some(pair) = pair {
                    check_prompt_text("text_pair", pair, limits)?;
                }
            }
            TokenizeInput::Messages(messages) => check_messages("messages", messages, limits)?,
        }
        let model = registry.resolve(model, None)?;
        request.model(&model);
        let served_by = ServedBy::of(&model);
        let (tokens, rendered) = aside(move || {
            let (text, pair, rendered, special) = match input {
                TokenizeInput::Text(text, pair) => {
                    let special = model.settings.add_special_tokens.value;
                    // An empty pair leaves its text unpaired, as Classify takes it.
                    let pair = pair.filter(|pair| !pair.is_empty());
                    (text, pair, false, add_special_tokens.unwrap_or(special))
                }
                TokenizeInput::Messages(messages) => {
                    let text = chat::render(&model, "messages", &messages)?;
                    (text, None, true, add_special_tokens.unwrap_or(false))
                }
            };
            let input = match &pair {
                Some(pair) => EncodeInput::Dual(text.as_str().into(), pair.as_str().into()),
                None => EncodeInput::Single(text.as_str().into()),
            };
            let encoding = model
                .tokenizer
                .encode_char_offsets(input, special)
                .map_err(|error| Error::invalid("text", format!("cannot be tokenized: {error}")))?;
            // As the encoder is fed them: none to a graph without the input, and none past the
            // types the model has.
            let types = model.settings.token_types.as_ref().map(|types| types.value);
            let fed_types = model.bindings.token_type_ids.is_some()
                && types.is_none_or(|types| {
                    encoding
                        .get_type_ids()
                        .iter()
                        .all(|&type_id| (type_id as usize) < types)
                });
            let tokens = encoding
                .get_ids()
                .iter()
                .zip(encoding.get_tokens())
                .zip(encoding.get_offsets())
                .zip(encoding.get_type_ids())
                .zip(encoding.get_sequence_ids())
                .map(
                    |((((&id, token), &(start, end)), &type_id), sequence)| Token {
                        id,
                        text: token.clone(),
                        start,
                        end,
                        type_id: if fed_types { type_id } else { 0 },
                        in_pair: pair.is_some() && sequence == Some(1),
                    },
                )
                .collect();
            Ok((tokens, rendered.then_some(text)))
        })
        .await?;
        Ok(TokenizeOutput {
            tokens,
            rendered,
            served_by,
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
    deadline: Option<std::time::Instant>,
) -> Result<DetokenizeOutput> {
    let mut request = RequestMetrics::start("detokenize", deadline);
    request.requested(registry, model);
    let result = async {
        check_target("model", model, limits)?;
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
        let text = aside(move || {
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
