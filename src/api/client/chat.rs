//! `lmserve chat`: a conversation with a model that has a chat template. Each line read from
//! stdin is a user turn; the reply streams to stdout token by token, and both turns join the
//! history sent with the next one. EOF or `/exit` ends it.

use std::io::{BufRead, IsTerminal, Write};

use futures::StreamExt;

use super::{Target, status};
use crate::api::proto::generate_request::Prompt;
use crate::api::proto::inference_client::InferenceClient;
use crate::api::proto::{self, ChatMessage, ChatMessages, GenerationParameters};

/// The line that ends a conversation (besides EOF).
pub const EXIT: &str = "/exit";

/// What a conversation is held with.
pub struct ChatOptions {
    pub model: String,
    /// The system message that opens the conversation, if any.
    pub system: Option<String>,
    pub parameters: GenerationParameters,
}

/// Holds a conversation on `input` (stdin, in the CLI), writing replies to `output`.
pub async fn chat(
    target: &Target,
    options: ChatOptions,
    input: impl BufRead,
    output: &mut impl Write,
) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(target.connect().await?);
    let mut history: Vec<ChatMessage> = options
        .system
        .into_iter()
        .map(|content| turn("system", content))
        .collect();
    // A prompt marker only for a person at a terminal; piped input gets bare replies.
    let interactive = std::io::stdin().is_terminal();
    let mut lines = input.lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim() == EXIT {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        history.push(turn("user", line.to_owned()));
        let request = proto::GenerateRequest {
            model: options.model.clone(),
            prompt: Some(Prompt::Messages(ChatMessages {
                messages: history.clone(),
            })),
            parameters: Some(options.parameters.clone()),
            ..Default::default()
        };
        let mut stream = client
            .generate_stream(request)
            .await
            .map_err(status)?
            .into_inner();
        let (mut reply, mut finish) = (String::new(), 0);
        while let Some(message) = stream.next().await {
            let message = message.map_err(status)?;
            write!(output, "{}", message.text)?;
            output.flush()?;
            reply.push_str(&message.text);
            if message.finish_reason != 0 {
                finish = message.finish_reason;
            }
        }
        writeln!(output)?;
        if finish == proto::FinishReason::Length as i32 {
            eprintln!("[the reply was cut at --max-new-tokens]");
        }
        history.push(turn("assistant", reply));
    }
    Ok(())
}

fn turn(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content,
    }
}
