//! A conversation turned into prompt text by the model's chat template, for Generate's and
//! Tokenize's `messages`.

use crate::error::{Error, Result};
use crate::registry::ModelVersion;
use crate::registry::chat::ChatMessage;

/// The prompt text for the assistant's next turn. `field` names the messages in an error.
pub fn render(model: &ModelVersion, field: &str, messages: &[ChatMessage]) -> Result<String> {
    let Some(template) = &model.chat else {
        return Err(Error::FailedPrecondition(format!(
            "model `{}@{}` has no chat_template (in tokenizer_config.json or {}), so it cannot take {field}; send a text prompt instead",
            model.name,
            model.version,
            crate::registry::hf::CHAT_TEMPLATE,
        )));
    };
    template.render(messages).map_err(|error| {
        Error::invalid(
            field,
            format!("the model's chat template refused them: {error}"),
        )
    })
}

/// The token that ends an assistant's turn, which a chat generation stops at.
pub fn end_of_turn(model: &ModelVersion) -> Option<u32> {
    model
        .chat
        .as_ref()
        .and_then(|template| template.end_of_turn)
}
