//! Turns request texts into the token ids the model sees, as its authors tokenize: with the
//! special tokens the tokenizer's post-processor adds (unless the model's settings say not),
//! within the model's maximum length counting those tokens. Truncation, only when the caller
//! asks for it, cuts the text and never the special tokens.

use std::sync::{Arc, LazyLock};

use tokenizers::{Tokenizer, TruncationDirection};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::registry::ModelVersion;

/// Inputs larger than this are followed by handing freed memory back to the system.
pub const TRIM_AFTER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncate {
    /// Over-long input is an INVALID_ARGUMENT.
    #[default]
    None,
    /// Keep the head.
    Right,
    /// Keep the tail.
    Left,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

/// Why a text could not become model input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// The tokenizer refused it.
    Tokenizer(String),
    /// It has no tokens at all.
    Empty,
    /// `tokens` (special tokens included) is over `limit` and truncation was not asked for.
    TooLong { tokens: usize, limit: usize },
}

/// What a text over the model's limit is told to set; other APIs say it in their own terms.
pub const TRUNCATE_HINT: &str = "set truncate to TRUNCATE_RIGHT or TRUNCATE_LEFT to cut it";

/// Tokenizes every text; a text over the model's limit is truncated or rejected by `truncate`.
pub async fn encode_all(
    model: &Arc<ModelVersion>,
    texts: Vec<String>,
    truncate: Truncate,
) -> Result<Vec<Encoded>> {
    let model = Arc::clone(model);
    let bytes: usize = texts.iter().map(String::len).sum();
    // The trim too runs on the blocking thread: it takes every malloc arena's lock in turn.
    blocking(move || {
        let encoded = encode_texts(&model, &texts, truncate);
        drop(texts);
        if bytes >= TRIM_AFTER_BYTES {
            give_back_memory();
        }
        encoded
    })
    .await
}

/// Tokenizer work that runs at once, over every model and API (Embed, Classify, Generate's
/// prompts, Tokenize). Each takes a blocking-pool thread: a flood of calls would grow that
/// pool, which encoder runs use too, to hundreds of threads on a few cores, where more than a
/// couple per core tokenize no faster. Past this many, work waits for a turn on no thread.
static TURNS: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Semaphore::new(2 * cores)
});

/// Runs tokenizer work on the blocking pool, never on the async executor's threads: a long
/// input takes milliseconds of CPU that every other request would otherwise wait behind. It
/// waits for one of the turns first, and holds it until the work is done (even if the caller
/// has gone meanwhile).
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    in_turn(&TURNS, work).await
}

async fn in_turn<T: Send + 'static>(
    turns: &'static Semaphore,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let turn = turns
        .acquire()
        .await
        .map_err(|_| Error::Internal("the tokenizer turns are closed".into()))?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        work()
    })
    .await
    .map_err(|error| Error::Internal(format!("tokenizer worker failed: {error}")))?
}

/// Returns memory freed by a large tokenization to the system.
pub fn give_back_memory() {
    crate::runtime::memory::give_back();
}

fn encode_texts(
    model: &ModelVersion,
    texts: &[String],
    truncate: Truncate,
) -> Result<Vec<Encoded>> {
    let limit = model.settings.max_length.value;
    let special = model.settings.add_special_tokens.value;
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            encode(&model.tokenizer, text, special, limit, truncate)
                .map_err(|error| text_error(&format!("texts[{index}]"), error, TRUNCATE_HINT))
        })
        .collect()
}

/// The INVALID_ARGUMENT for `field` that failed to encode; `how_to_cut` says which request
/// setting truncates.
pub fn text_error(field: &str, error: EncodeError, how_to_cut: &str) -> Error {
    match error {
        EncodeError::Tokenizer(reason) => {
            Error::invalid(field, format!("cannot be tokenized: {reason}"))
        }
        EncodeError::Empty => Error::invalid(field, "has no tokens; send a non-empty text"),
        EncodeError::TooLong { tokens, limit } => Error::invalid(
            field,
            format!(
                "{tokens} tokens is over the model's maximum of {limit} (special tokens included); {how_to_cut}"
            ),
        ),
    }
}

/// Encodes one text as the model sees it: at most `limit` tokens, special tokens included when
/// `special` is set. Over the limit, `truncate` cuts the text's own tokens from its end (Right)
/// or start (Left) and the special tokens are added around what is left.
pub fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    special: bool,
    limit: usize,
    truncate: Truncate,
) -> Result<Encoded, EncodeError> {
    let tokenizer_error = |error: tokenizers::Error| EncodeError::Tokenizer(error.to_string());
    let full = tokenizer
        .encode_fast(text, special)
        .map_err(tokenizer_error)?;
    if full.is_empty() {
        return Err(EncodeError::Empty);
    }
    if full.len() <= limit {
        return Ok(Encoded {
            ids: ids_of(&full),
            truncated: false,
        });
    }
    let direction = match truncate {
        Truncate::None => {
            return Err(EncodeError::TooLong {
                tokens: full.len(),
                limit,
            });
        }
        Truncate::Right => TruncationDirection::Right,
        Truncate::Left => TruncationDirection::Left,
    };
    let mut plain = tokenizer
        .encode_fast(text, false)
        .map_err(tokenizer_error)?;
    let added = full.len().saturating_sub(plain.len());
    // The model's settings keep the limit above the special tokens; a text cut to nothing would
    // still not be a text.
    let room = limit.saturating_sub(added).max(1);
    plain.truncate(room, 0, direction);
    let cut = tokenizer
        .post_process(plain, None, special)
        .map_err(tokenizer_error)?;
    Ok(Encoded {
        ids: ids_of(&cut),
        truncated: true,
    })
}

fn ids_of(encoding: &tokenizers::Encoding) -> Vec<i64> {
    encoding.get_ids().iter().map(|&id| i64::from(id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

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

    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;

    /// A word-level tokenizer with BERT's `[CLS] text [SEP]` post-processor.
    fn bert_like() -> Tokenizer {
        let vocab = [
            ("[CLS]", 0),
            ("[SEP]", 1),
            ("a", 2),
            ("b", 3),
            ("c", 4),
            ("d", 5),
        ]
        .into_iter()
        .map(|(word, id)| (word.to_string(), id))
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("a".into())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        tokenizer.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("[CLS] $A [SEP]")
                .unwrap()
                .special_tokens(vec![("[CLS]", 0), ("[SEP]", 1)])
                .build()
                .unwrap(),
        ));
        tokenizer
    }

    #[test]
    fn adds_the_post_processors_special_tokens() {
        let tokenizer = bert_like();
        let encoded = encode(&tokenizer, "a b", true, 8, Truncate::None).unwrap();
        assert_eq!(encoded.ids, vec![0, 2, 3, 1]);
        let plain = encode(&tokenizer, "a b", false, 8, Truncate::None).unwrap();
        assert_eq!(plain.ids, vec![2, 3]);
    }

    #[test]
    fn the_limit_counts_special_tokens_and_truncation_keeps_them() {
        let tokenizer = bert_like();
        assert_eq!(
            encode(&tokenizer, "a b c d", true, 5, Truncate::None),
            Err(EncodeError::TooLong {
                tokens: 6,
                limit: 5
            })
        );
        let right = encode(&tokenizer, "a b c d", true, 5, Truncate::Right).unwrap();
        assert_eq!(right.ids, vec![0, 2, 3, 4, 1]);
        assert!(right.truncated);
        let left = encode(&tokenizer, "a b c d", true, 5, Truncate::Left).unwrap();
        assert_eq!(left.ids, vec![0, 3, 4, 5, 1]);
        let fits = encode(&tokenizer, "a b c", true, 5, Truncate::Right).unwrap();
        assert!(!fits.truncated);
    }

    #[test]
    fn an_empty_text_is_refused() {
        let tokenizer = bert_like();
        assert_eq!(
            encode(&tokenizer, "", false, 5, Truncate::None),
            Err(EncodeError::Empty)
        );
    }
}
