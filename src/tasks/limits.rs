//! The `[limits]` checks, run on a request before any work is done for it: each refusal is an
//! INVALID_ARGUMENT naming the field, the limit and the value (bounded, when it is echoed).

use crate::config::LimitsConfig;
use crate::error::{Error, Result, echo};
use crate::registry::chat::ChatMessage;

/// A model, route or target name: within `max_name_bytes`, and printable.
pub fn check_name(field: &str, value: &str, limits: &LimitsConfig) -> Result<()> {
    if value.len() > limits.max_name_bytes {
        return Err(Error::invalid(
            field,
            format!(
                "{} bytes is over the limit of {} bytes",
                value.len(),
                limits.max_name_bytes
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("{} holds control characters", echo(value)),
        ));
    }
    Ok(())
}

/// Most bytes a version pin adds to a name: `@` and the 20 digits of the largest version.
pub const MOST_PIN_BYTES: usize = 21;

/// A target, "name" or "name@version": the name is held to `check_name`, so that a model whose
/// name is at the limit can still be pinned to one of its versions.
pub fn check_target(field: &str, value: &str, limits: &LimitsConfig) -> Result<()> {
    let name = match value.rsplit_once('@') {
        Some((name, version))
            if (1..MOST_PIN_BYTES).contains(&version.len())
                && version.bytes().all(|byte| byte.is_ascii_digit()) =>
        {
            name
        }
        _ => value,
    };
    check_name(field, name, limits)
}

/// The texts of an Embed or Classify request.
pub fn check_texts(texts: &[String], limits: &LimitsConfig) -> Result<()> {
    if texts.is_empty() {
        return Err(Error::invalid(
            "texts",
            "must hold at least one text; got 0",
        ));
    }
    if texts.len() > limits.max_texts_per_request {
        return Err(Error::invalid(
            "texts",
            format!(
                "{} texts is over the limit of {} per request",
                texts.len(),
                limits.max_texts_per_request
            ),
        ));
    }
    check_text_bytes("texts", texts, limits)
}

/// A Classify request's `text_pairs`: none, or one per text, each within the size of a text.
pub fn check_text_pairs(pairs: &[String], texts: usize, limits: &LimitsConfig) -> Result<()> {
    if !pairs.is_empty() && pairs.len() != texts {
        return Err(Error::invalid(
            "text_pairs",
            format!(
                "must be empty or hold one pair per text ({texts} texts); got {}",
                pairs.len()
            ),
        ));
    }
    check_text_bytes("text_pairs", pairs, limits)
}

/// Each of `field`'s texts within `max_text_bytes`.
fn check_text_bytes(field: &str, texts: &[String], limits: &LimitsConfig) -> Result<()> {
    for (index, text) in texts.iter().enumerate() {
        if text.len() > limits.max_text_bytes {
            return Err(Error::invalid(
                format!("{field}[{index}]"),
                format!(
                    "{} bytes is over the limit of {} bytes",
                    text.len(),
                    limits.max_text_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// A prompt or Tokenize text, before it is tokenized.
pub fn check_prompt_text(field: &str, text: &str, limits: &LimitsConfig) -> Result<()> {
    if text.len() > limits.max_prompt_bytes {
        return Err(Error::invalid(
            field,
            format!(
                "{} bytes is over the limit of {} bytes",
                text.len(),
                limits.max_prompt_bytes
            ),
        ));
    }
    Ok(())
}

/// Token ids a client sends (a prompt, or ids to detokenize).
pub fn check_token_ids(field: &str, count: usize, limits: &LimitsConfig) -> Result<()> {
    if count > limits.max_prompt_tokens {
        return Err(Error::invalid(
            field,
            format!(
                "{count} ids is over the limit of {} ids",
                limits.max_prompt_tokens
            ),
        ));
    }
    Ok(())
}

/// A conversation: at least one message, at most `max_messages_per_request`, each role a short
/// printable name, and roles and contents together within `max_prompt_bytes`. `field` is the
/// list's name, e.g. "prompt.messages".
pub fn check_messages(field: &str, messages: &[ChatMessage], limits: &LimitsConfig) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::invalid(
            field,
            "must hold at least one message; got 0",
        ));
    }
    if messages.len() > limits.max_messages_per_request {
        return Err(Error::invalid(
            field,
            format!(
                "{} messages is over the limit of {} per request",
                messages.len(),
                limits.max_messages_per_request
            ),
        ));
    }
    let mut bytes = 0;
    for (index, message) in messages.iter().enumerate() {
        let role = format!("{field}[{index}].role");
        if message.role.is_empty() {
            return Err(Error::invalid(
                role,
                "is empty; say who speaks, e.g. \"user\"",
            ));
        }
        check_name(&role, &message.role, limits)?;
        bytes += message.role.len() + message.content.len();
        if bytes > limits.max_prompt_bytes {
            return Err(Error::invalid(
                format!("{field}[{index}].content"),
                format!(
                    "the messages reach {bytes} bytes here, over the limit of {} bytes",
                    limits.max_prompt_bytes
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<()>) -> String {
        match result {
            Err(Error::InvalidArgument { field, message }) => format!("{field}: {message}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn each_refusal_names_the_field_the_limit_and_the_value() {
        let limits = LimitsConfig::default();
        assert_eq!(
            message(check_name("model", &"m".repeat(3 << 20), &limits)),
            "model: 3145728 bytes is over the limit of 128 bytes"
        );
        assert!(message(check_name("model", "a\u{0}b", &limits)).contains("control characters"));
        assert!(check_name("model", "tiny-gpt2@1", &limits).is_ok());
        let longest = "m".repeat(limits.max_name_bytes);
        assert!(check_target("model", &format!("{longest}@18446744073709551615"), &limits).is_ok());
        assert_eq!(
            message(check_target("model", &format!("{longest}m@1"), &limits)),
            "model: 129 bytes is over the limit of 128 bytes"
        );
        assert_eq!(
            message(check_target(
                "model",
                &format!("{longest}@123456789012345678901"),
                &limits
            )),
            "model: 150 bytes is over the limit of 128 bytes"
        );
        assert_eq!(
            message(check_prompt_text(
                "prompt.text",
                &"x".repeat(300_000),
                &limits
            )),
            "prompt.text: 300000 bytes is over the limit of 262144 bytes"
        );
        assert_eq!(
            message(check_token_ids("ids", 70_000, &limits)),
            "ids: 70000 ids is over the limit of 65536 ids"
        );
        assert_eq!(
            message(check_texts(&[], &limits)),
            "texts: must hold at least one text; got 0"
        );
    }

    #[test]
    fn conversations_are_bounded_by_count_role_and_bytes() {
        let limits = LimitsConfig {
            max_messages_per_request: 2,
            max_prompt_bytes: 10,
            ..LimitsConfig::default()
        };
        let turn = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert!(check_messages("m", &[turn("user", "hi")], &limits).is_ok());
        assert_eq!(
            message(check_messages("m", &[], &limits)),
            "m: must hold at least one message; got 0"
        );
        assert_eq!(
            message(check_messages("m", &vec![turn("user", ""); 3], &limits)),
            "m: 3 messages is over the limit of 2 per request"
        );
        assert_eq!(
            message(check_messages(
                "m",
                &[turn("user", ""), turn("", "x")],
                &limits
            )),
            "m[1].role: is empty; say who speaks, e.g. \"user\""
        );
        assert!(
            message(check_messages("m", &[turn("us\ner", "")], &limits)).starts_with("m[0].role: ")
        );
        assert_eq!(
            message(check_messages(
                "m",
                &[turn("user", "a"), turn("bot", "abc")],
                &limits
            )),
            "m[1].content: the messages reach 11 bytes here, over the limit of 10 bytes"
        );
    }
}
