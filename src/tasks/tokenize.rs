//! Tokenize and Detokenize with any model's tokenizer.

use std::sync::{Arc, LazyLock};

use tokio::sync::Semaphore;

use super::chat;
use super::limits::{check_messages, check_name, check_prompt_text, check_token_ids};
use super::text::blocking;
use super::{RequestMetrics, ServedBy};
use crate::config::LimitsConfig;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::registry::chat::ChatMessage;

/// Tokenize and Detokenize calls whose tokenizer work runs at once. These calls have no queue
/// of their own, and each takes a blocking-pool thread: a flood of them would grow that pool,
/// which encoder runs and Generate's prompts use, to hundreds of threads on a few cores. Past
/// this many they wait for a turn, on no thread, until their deadline.
static TURNS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Semaphore::new(2 * cores)
});

/// Runs `work` on the blocking pool once one of `turns` is free, holding it until the work is
/// done (even if the caller has gone meanwhile).
async fn in_turn<T: Send + 'static>(
    turns: &'static Semaphore,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let turn = turns
        .acquire()
        .await
        .map_err(|_| Error::Internal("the tokenizer turns are closed".into()))?;
    blocking(move || {
        let _turn = turn;
        work()
    })
    .await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: u32,
    pub text: String,
    /// Character (Unicode scalar) offsets into the input.
    pub start: usize,
    pub end: usize,
}

/// What to tokenize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizeInput {
    Text(String),
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
) -> Result<TokenizeOutput> {
    let mut request = RequestMetrics::start("tokenize", None);
    request.requested(registry, model);
    let result = async {
        check_name("model", model, limits)?;
        match &input {
            TokenizeInput::Text(text) => check_prompt_text("text", text, limits)?,
            TokenizeInput::Messages(messages) => check_messages("messages", messages, limits)?,
        }
        let model = registry.resolve(model, None)?;
        request.model(&model);
        let served_by = ServedBy::of(&model);
        let (tokens, rendered) = in_turn(&TURNS, move || {
            let (text, rendered, special) = match input {
                TokenizeInput::Text(text) => {
                    let special = model.settings.add_special_tokens.value;
                    (text, false, add_special_tokens.unwrap_or(special))
                }
                TokenizeInput::Messages(messages) => {
                    let text = chat::render(&model, "messages", &messages)?;
                    (text, true, add_special_tokens.unwrap_or(false))
                }
            };
            let encoding = model
                .tokenizer
                .encode_char_offsets(text.as_str(), special)
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
) -> Result<DetokenizeOutput> {
    let mut request = RequestMetrics::start("detokenize", None);
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
        let text = in_turn(&TURNS, move || {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_past_its_turns_waits_without_a_thread() {
        static ONE_TURN: Semaphore = Semaphore::const_new(1);
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let work = || {
            let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
            MOST.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        };
        let calls: Vec<_> = (0..6)
            .map(|_| tokio::spawn(in_turn(&ONE_TURN, work)))
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 1);
    }
}
