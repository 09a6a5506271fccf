//! Turns request texts into the token ids the model sees, as its authors tokenize: with the
//! special tokens the tokenizer's post-processor adds (unless the model's settings say not),
//! within the model's maximum length counting those tokens. Truncation, only when the caller
//! asks for it, cuts the text and never the special tokens. A text with a pair (a
//! cross-encoder's input) is joined to it by the tokenizer's pair template, and truncation cuts
//! the longer of the two first, as transformers' fast tokenizers do.

use std::sync::{Arc, LazyLock};

use tokenizers::utils::truncation::{TruncationParams, TruncationStrategy, truncate_encodings};
use tokenizers::{EncodeInput, Tokenizer, TruncationDirection};
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
    /// Token type (segment) ids where any is not 0: a pair's second text, or a template that
    /// gives a special token a type of its own (XLNet's `<cls>`). Empty: all 0.
    pub type_ids: Vec<i64>,
    pub truncated: bool,
}

impl Encoded {
    fn of(encoding: &tokenizers::Encoding, truncated: bool) -> Self {
        let type_ids = encoding.get_type_ids();
        Self {
            ids: encoding.get_ids().iter().map(|&id| i64::from(id)).collect(),
            type_ids: if type_ids.iter().all(|&t| t == 0) {
                Vec::new()
            } else {
                type_ids.iter().map(|&t| i64::from(t)).collect()
            },
            truncated,
        }
    }

    /// Without type ids (all 0) where the tokenizer gives a type the model does not have: a
    /// RoBERTa-family model has one type, and transformers does not pass it the ids its tokenizer
    /// makes; an id past the embedding table would fail the whole batch's run.
    fn within(mut self, token_types: Option<usize>) -> Self {
        if let Some(types) = token_types
            && self.type_ids.iter().any(|&t| t >= types as i64)
        {
            self.type_ids = Vec::new();
        }
        self
    }
}

/// The texts of one request, as an encoder reads them.
#[derive(Debug, Clone, Default)]
pub struct EncoderTexts {
    pub texts: Vec<String>,
    /// Empty, or one second text per text, tokenized together with it (a cross-encoder's input).
    pub pairs: Vec<String>,
    pub truncate: Truncate,
}

impl EncoderTexts {
    pub fn single(texts: Vec<String>, truncate: Truncate) -> Self {
        Self {
            texts,
            pairs: Vec::new(),
            truncate,
        }
    }

    fn bytes(&self) -> usize {
        self.texts.iter().chain(&self.pairs).map(String::len).sum()
    }
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

/// Tokenizes every text (with its pair); a text over the model's limit is truncated or rejected
/// as `texts.truncate` says.
pub async fn encode_all(model: &Arc<ModelVersion>, texts: EncoderTexts) -> Result<Vec<Encoded>> {
    let model = Arc::clone(model);
    let bytes = texts.bytes();
    // The trim too runs on the blocking thread: it takes every malloc arena's lock in turn.
    blocking(move || {
        let encoded = encode_texts(&model, &texts);
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
static TURNS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(turns()));

fn turns() -> usize {
    2 * std::thread::available_parallelism().map_or(1, usize::from)
}

/// Runs tokenizer work on the blocking pool, never on the async executor's threads: a long
/// input takes milliseconds of CPU that every other request would otherwise wait behind. It
/// waits for one of the turns first, and holds it until the work is done (even if the caller
/// has gone meanwhile).
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    in_turn(&TURNS, work).await
}

/// Calls that only tokenize (Tokenize, Detokenize) waiting for a turn or running, at most. They
/// have no model queue to bound them, and they wait for the same turns as inference: a flood
/// of them would put every Embed and Generate behind it, holding the queue places those took.
/// Past this many they are refused (RESOURCE_EXHAUSTED) rather than queued.
static ASIDE: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(aside_places()));

fn aside_places() -> usize {
    2 * turns()
}

/// As `blocking`, for a call that only tokenizes: refused at once when `ASIDE` is full.
pub async fn aside<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    aside_in(&ASIDE, aside_places(), &TURNS, work).await
}

async fn aside_in<T: Send + 'static>(
    places: &'static Semaphore,
    most: usize,
    turns: &'static Semaphore,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let _place = places
        .try_acquire()
        .map_err(|_| Error::TokenizerBusy { waiting: most })?;
    in_turn(turns, work).await
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

fn encode_texts(model: &ModelVersion, texts: &EncoderTexts) -> Result<Vec<Encoded>> {
    let limit = model.settings.max_length.value;
    let special = model.settings.add_special_tokens.value;
    let token_types = model.settings.token_types.as_ref().map(|types| types.value);
    texts
        .texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            // An empty pair leaves its text alone, as transformers' pipeline takes it.
            let pair = texts
                .pairs
                .get(index)
                .map(String::as_str)
                .filter(|pair| !pair.is_empty());
            encode_pair(&model.tokenizer, text, pair, special, limit, texts.truncate)
                .map(|encoded| encoded.within(token_types))
                .map_err(|error| {
                    let field = match pair {
                        Some(_) => format!("texts[{index}] with text_pairs[{index}]"),
                        None => format!("texts[{index}]"),
                    };
                    text_error(&field, error, TRUNCATE_HINT)
                })
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
    encode_pair(tokenizer, text, None, special, limit, truncate)
}

/// Encodes a text, and its `pair` when there is one, as [`encode`] does one text. The limit
/// counts both; over it, truncation cuts the longer of the two first (transformers'
/// `longest_first`, the fast tokenizers' own rule), each from its end (Right) or start (Left).
pub fn encode_pair(
    tokenizer: &Tokenizer,
    text: &str,
    pair: Option<&str>,
    special: bool,
    limit: usize,
    truncate: Truncate,
) -> Result<Encoded, EncodeError> {
    let tokenizer_error = |error: tokenizers::Error| EncodeError::Tokenizer(error.to_string());
    let input = match pair {
        Some(pair) => EncodeInput::Dual(text.into(), pair.into()),
        None => EncodeInput::Single(text.into()),
    };
    let full = tokenizer
        .encode_fast(input, special)
        .map_err(tokenizer_error)?;
    if full.is_empty() {
        return Err(EncodeError::Empty);
    }
    if full.len() <= limit {
        return Ok(Encoded::of(&full, false));
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
    let first = tokenizer
        .encode_fast(text, false)
        .map_err(tokenizer_error)?;
    let second = pair
        .map(|pair| {
            // Of type 1, as the library's own encoding of a pair makes it: a post-processor sets
            // the types again, but a tokenizer without one keeps them.
            tokenizer.encode_fast(pair, false).map(|mut second| {
                second.set_type_ids(vec![1; second.len()]);
                second
            })
        })
        .transpose()
        .map_err(tokenizer_error)?;
    let plain = first.len() + second.as_ref().map_or(0, tokenizers::Encoding::len);
    let added = full.len().saturating_sub(plain);
    // The model's settings keep the limit above one text's special tokens; a pair's may fill it.
    let room = limit.saturating_sub(added);
    if room == 0 {
        return Err(EncodeError::TooLong {
            tokens: full.len(),
            limit,
        });
    }
    let cut_to = TruncationParams {
        direction,
        max_length: room,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    };
    let (first, second) = truncate_encodings(first, second, &cut_to).map_err(tokenizer_error)?;
    let cut = tokenizer
        .post_process(first, second, special)
        .map_err(tokenizer_error)?;
    Ok(Encoded::of(&cut, true))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokenize_only_calls_past_their_places_are_refused_not_queued() {
        static ONE_TURN: Semaphore = Semaphore::const_new(1);
        static TWO_PLACES: Semaphore = Semaphore::const_new(2);
        let slow = || {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        };
        let running: Vec<_> = (0..2)
            .map(|_| tokio::spawn(aside_in(&TWO_PLACES, 2, &ONE_TURN, slow)))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = aside_in(&TWO_PLACES, 2, &ONE_TURN, || Ok(())).await;
        assert!(
            matches!(refused, Err(Error::TokenizerBusy { waiting: 2 })),
            "{refused:?}"
        );
        for call in running {
            call.await.unwrap().unwrap();
        }
        // Places given back: the next call runs.
        aside_in(&TWO_PLACES, 2, &ONE_TURN, || Ok(()))
            .await
            .unwrap();
    }

    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::processors::template::TemplateProcessing;

    /// A word-level tokenizer with BERT's post-processor: `[CLS] text [SEP]`, and for a pair
    /// `[CLS] text [SEP] pair [SEP]` with the pair's tokens of type 1.
    fn bert_like() -> Tokenizer {
        let mut tokenizer = word_level();
        tokenizer.with_post_processor(Some(
            TemplateProcessing::builder()
                .try_single("[CLS] $A [SEP]")
                .unwrap()
                .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
                .unwrap()
                .special_tokens(vec![("[CLS]", 0), ("[SEP]", 1)])
                .build()
                .unwrap(),
        ));
        tokenizer
    }

    /// The same with BERT's own post-processor, which keeps the type ids it is given.
    fn bert_processed() -> Tokenizer {
        let mut tokenizer = word_level();
        tokenizer.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), 1),
            ("[CLS]".into(), 0),
        )));
        tokenizer
    }

    fn word_level() -> Tokenizer {
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

    #[test]
    fn a_pair_is_joined_by_the_template_with_its_token_types() {
        let tokenizer = bert_like();
        let encoded = encode_pair(&tokenizer, "a b", Some("c"), true, 8, Truncate::None).unwrap();
        assert_eq!(encoded.ids, vec![0, 2, 3, 1, 4, 1]);
        assert_eq!(encoded.type_ids, vec![0, 0, 0, 0, 1, 1]);
        // A single text's types are all 0, and left out.
        let single = encode(&tokenizer, "a b", true, 8, Truncate::None).unwrap();
        assert!(single.type_ids.is_empty());
        assert_eq!(
            encode_pair(&tokenizer, "a b", Some("c d"), true, 6, Truncate::None),
            Err(EncodeError::TooLong {
                tokens: 7,
                limit: 6
            })
        );
    }

    #[test]
    fn type_ids_the_model_lacks_become_zeros() {
        let pair = encode_pair(&bert_like(), "a b", Some("c"), true, 8, Truncate::None).unwrap();
        assert_eq!(pair.clone().within(Some(2)), pair);
        assert_eq!(pair.clone().within(None), pair);
        assert!(pair.within(Some(1)).type_ids.is_empty());
    }

    /// Without a post-processor the pair's tokens keep the type the library gives them, cut or not.
    #[test]
    fn a_pair_without_a_post_processor_is_of_type_1() {
        let mut reference = word_level();
        reference
            .with_truncation(Some(TruncationParams {
                max_length: 4,
                ..TruncationParams::default()
            }))
            .unwrap();
        let expected = reference.encode(("a b c", "d c b"), true).unwrap();
        let ours = encode_pair(
            &word_level(),
            "a b c",
            Some("d c b"),
            true,
            4,
            Truncate::Right,
        );
        assert_eq!(ours.unwrap(), Encoded::of(&expected, true));
        assert_eq!(expected.get_type_ids(), [0, 0, 1, 1]);
    }

    /// Truncated pairs are what the tokenizer itself gives with transformers' `longest_first`
    /// truncation to the same length, from either side, types included, under a template and
    /// under BERT's own post-processor. A limit the special tokens fill is refused. Left out: a
    /// limit that leaves one token for both texts (4 here), where the library's `encode` keeps
    /// the pair's token though its `truncate_encodings`, given the same lengths, keeps the text's.
    #[test]
    fn a_pair_is_cut_longest_first_as_the_tokenizer_cuts_it() {
        let texts = ["a", "a b", "a b c", "a b c d", "d c b a d c b a"];
        for (direction, truncate, make) in [
            (
                TruncationDirection::Right,
                Truncate::Right,
                bert_like as fn() -> Tokenizer,
            ),
            (TruncationDirection::Left, Truncate::Left, bert_like),
            (TruncationDirection::Right, Truncate::Right, bert_processed),
            (TruncationDirection::Left, Truncate::Left, bert_processed),
        ] {
            assert_eq!(
                encode_pair(&make(), "a b", Some("c d"), true, 3, truncate),
                Err(EncodeError::TooLong {
                    tokens: 7,
                    limit: 3
                })
            );
            for limit in 5..=12 {
                let mut reference = make();
                reference
                    .with_truncation(Some(TruncationParams {
                        direction,
                        max_length: limit,
                        strategy: TruncationStrategy::LongestFirst,
                        stride: 0,
                    }))
                    .unwrap();
                for first in texts {
                    for second in texts {
                        let expected = reference.encode((first, second), true).unwrap();
                        let whole = make().encode((first, second), true).unwrap();
                        let ours = encode_pair(&make(), first, Some(second), true, limit, truncate)
                            .unwrap();
                        let case = format!("{first:?} + {second:?}, {limit}, {truncate:?}");
                        assert_eq!(ours, Encoded::of(&expected, whole.len() > limit), "{case}");
                    }
                }
            }
        }
    }
}
