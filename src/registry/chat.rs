//! A model's chat template, compiled once when the version loads: it turns a conversation into
//! the prompt text the model was trained on, as transformers' `apply_chat_template` does.

use std::io;

use anyhow::Context;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use tokenizers::Tokenizer;

use super::hf::HfFiles;
use super::settings::ModelSettings;

/// The template's name inside its environment (it shows in render errors).
const NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// The message as templates see it: a dict with `role` and `content`, in that order.
    fn to_value(&self) -> Value {
        Value::from_pairs([
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ])
    }
}

/// Special tokens the template may write, from tokenizer_config.json.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
    /// The id of the token that ends an assistant turn (the eos_token), when the tokenizer
    /// knows it: a chat generation stops there.
    pub end_of_turn: Option<u32>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("tokens", &self.tokens)
            .field("end_of_turn", &self.end_of_turn)
            .finish_non_exhaustive()
    }
}

/// The template of a generating model that has one, compiled; one that does not compile fails
/// the load, naming the file it came from.
pub fn for_model(
    settings: &ModelSettings,
    files: &HfFiles,
    tokenizer: &Tokenizer,
) -> anyhow::Result<Option<ChatTemplate>> {
    let Some(template) = settings
        .chat_template
        .as_ref()
        .filter(|_| settings.generates)
    else {
        return Ok(None);
    };
    let config = files.tokenizer.as_ref();
    let tokens = TemplateTokens {
        bos_token: config
            .and_then(|config| config.bos_token.as_ref())
            .map(|token| token.content().to_owned()),
        eos_token: config
            .and_then(|config| config.eos_token.as_ref())
            .map(|token| token.content().to_owned()),
    };
    let end_of_turn = tokens
        .eos_token
        .as_deref()
        .and_then(|token| tokenizer.token_to_id(token));
    let compiled = ChatTemplate::compile(template.value.clone(), tokens, end_of_turn)
        .with_context(|| format!("the chat template in {} does not compile", template.source))?;
    Ok(Some(compiled))
}

impl ChatTemplate {
    /// Compiles `source` with the environment transformers gives chat templates: blocks trim
    /// their newline and strip leading whitespace, `loop_controls`, Python's string and dict
    /// methods, `raise_exception` and a `tojson` that writes what Python's `json.dumps` does.
    pub fn compile(
        source: String,
        tokens: TemplateTokens,
        end_of_turn: Option<u32>,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)?;
        Ok(Self {
            env,
            tokens,
            end_of_turn,
        })
    }

    /// The prompt for the assistant's next turn (`add_generation_prompt=True`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, minijinja::Error> {
        let template = self.env.get_template(NAME)?;
        template.render(minijinja::context! {
            messages => messages.iter().map(ChatMessage::to_value).collect::<Vec<_>>(),
            add_generation_prompt => true,
            bos_token => self.tokens.bos_token.as_deref().unwrap_or_default(),
            eos_token => self.tokens.eos_token.as_deref().unwrap_or_default(),
        })
    }
}

/// Templates call it to refuse a conversation (roles out of order, say); its message reaches
/// the client.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, so keys keep
/// their order and, without an indent, items are separated by ", " and keys by ": ".
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(width) => {
            let spaces = " ".repeat(width);
            let formatter = PrettyFormatter::with_indent(spaces.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter,
        )),
    };
    written.map_err(|error| {
        minijinja::Error::new(ErrorKind::BadSerialization, "tojson failed").with_source(error)
    })?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

/// Python's default JSON separators: ", " between items and ": " after a key.
struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn tokens() -> TemplateTokens {
        TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        }
    }

    #[test]
    fn renders_like_transformers_with_trimmed_blocks_and_python_methods() {
        // Block tags on their own lines leave no whitespace behind (trim_blocks and
        // lstrip_blocks), `.strip()` and `loop` work, and the generation prompt is added.
        let source = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'system' %}\n[SYS]{{ m.content.strip() }}\n  {% else %}\n<{{ m['role'] }}>{{ m.content }}{{ eos_token }}{% if not loop.last %}|{% endif %}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}\n";
        let template = ChatTemplate::compile(source.into(), tokens(), Some(2)).unwrap();
        let text = template
            .render(&[
                message("system", "  be brief \n"),
                message("user", "hi"),
                message("assistant", "hello"),
            ])
            .unwrap();
        // What transformers' own environment (jinja2) renders for the same template and input.
        assert_eq!(
            text,
            "<s>\n[SYS]be brief\n<user>hi</s>|<assistant>hello</s><assistant>"
        );
        assert_eq!(template.end_of_turn, Some(2));
    }

    #[test]
    fn raise_exception_and_syntax_errors_carry_their_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let template = ChatTemplate::compile(source.into(), tokens(), None).unwrap();
        let error = template
            .render(&[message("assistant", "x")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("first must be user"), "{error}");
        assert_eq!(template.render(&[message("user", "x")]).unwrap(), "ok");

        let broken = ChatTemplate::compile("{% for m in messages %}".into(), tokens(), None);
        assert!(broken.is_err());
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let source = "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let template = ChatTemplate::compile(source.into(), tokens(), None).unwrap();
        let text = template.render(&[message("user", "é \"q\" <b>")]).unwrap();
        assert_eq!(
            text,
            "[{\"role\": \"user\", \"content\": \"é \\\"q\\\" <b>\"}]|{\n  \"role\": \"user\",\n  \"content\": \"é \\\"q\\\" <b>\"\n}"
        );
    }
}
