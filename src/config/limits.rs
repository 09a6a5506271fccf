//! `[limits]`: the most a client may send. Each is checked before any work is done for the
//! request, and a refusal names the field, the limit and the value.

use serde::{Deserialize, Serialize};

/// The most `max_texts_per_request` and `max_messages_per_request` may be: a request's lists
/// are counted on the wire before it is decoded, four times this many elements at most
/// (`api::wire`), and a request within those limits must fit.
pub const MOST_TEXTS_OR_MESSAGES: usize = 16_384;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most texts in one Embed or Classify request.
    pub max_texts_per_request: usize,
    /// Most bytes in one Embed or Classify text.
    pub max_text_bytes: usize,
    /// Most bytes in a Generate prompt or a Tokenize text.
    pub max_prompt_bytes: usize,
    /// Most token ids in a Generate prompt or a Detokenize request.
    pub max_prompt_tokens: usize,
    /// Most messages in a conversation (a Generate or Tokenize `messages`); their roles and
    /// contents together are bounded by `max_prompt_bytes`.
    pub max_messages_per_request: usize,
    /// Longest model name, route name, arm target, routing key (a request's own or its header)
    /// or KServe request id, in bytes.
    pub max_name_bytes: usize,
    /// Most arms in one route.
    pub max_route_arms: usize,
    /// Largest request message of the Inference service, in bytes; larger ones are refused with
    /// RESOURCE_EXHAUSTED before they are read. Any request's lists (repeated fields and map
    /// entries, together) hold 65,536 elements at most, counted before decoding (`api::wire`).
    pub max_inference_message_bytes: usize,
    /// Largest request message of the Models service, in bytes.
    pub max_models_message_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_texts_per_request: 256,
            max_text_bytes: 64 * 1024,
            max_prompt_bytes: 256 * 1024,
            max_prompt_tokens: 65_536,
            max_messages_per_request: 1024,
            max_name_bytes: 128,
            max_route_arms: 16,
            // 256 texts of 64 KiB, with room for the rest of the message.
            max_inference_message_bytes: 17 * 1024 * 1024,
            max_models_message_bytes: 1024 * 1024,
        }
    }
}
