//! Turns request texts into token ids within the model's maximum length, truncating only when
//! the caller asked to.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::registry::ModelVersion;

/// Texts larger than this in total are tokenized on a blocking thread, off the async executor.
const INLINE_TOKENIZE_BYTES: usize = 4 * 1024;

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

/// Tokenizes every text; a text over the model's limit is truncated or rejected by `truncate`.
pub async fn encode_all(
    model: &Arc<ModelVersion>,
    texts: Vec<String>,
    truncate: Truncate,
) -> Result<Vec<Encoded>> {
    let total: usize = texts.iter().map(String::len).sum();
    if total <= INLINE_TOKENIZE_BYTES {
        return encode_texts(model, &texts, truncate);
    }
    let model = Arc::clone(model);
    tokio::task::spawn_blocking(move || encode_texts(&model, &texts, truncate))
        .await
        .map_err(|error| Error::Internal(format!("tokenizer worker failed: {error}")))?
}

fn encode_texts(
    model: &ModelVersion,
    texts: &[String],
    truncate: Truncate,
) -> Result<Vec<Encoded>> {
    let limit = model.manifest.max_length;
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let encoding = model
                .tokenizer
                .encode(text.as_str(), false)
                .map_err(|error| Error::invalid(format!("texts[{index}]"), format!("cannot be tokenized: {error}")))?;
            let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
            if ids.is_empty() {
                return Err(Error::invalid(format!("texts[{index}]"), "has no tokens; send a non-empty text"));
            }
            fit(ids, limit, truncate).map_err(|length| {
                Error::invalid(
                    format!("texts[{index}]"),
                    format!("{length} tokens is over the model's maximum of {limit}; set truncate to RIGHT or LEFT to cut it"),
                )
            })
        })
        .collect()
}

/// Cuts `ids` to `limit` as `truncate` says, or returns the length when that is not allowed.
pub fn fit(mut ids: Vec<i64>, limit: usize, truncate: Truncate) -> Result<Encoded, usize> {
    if ids.len() <= limit {
        return Ok(Encoded {
            ids,
            truncated: false,
        });
    }
    match truncate {
        Truncate::None => Err(ids.len()),
        Truncate::Right => {
            ids.truncate(limit);
            Ok(Encoded {
                ids,
                truncated: true,
            })
        }
        Truncate::Left => {
            let cut = ids.len() - limit;
            ids.drain(..cut);
            Ok(Encoded {
                ids,
                truncated: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_only_when_asked() {
        assert_eq!(fit(vec![1, 2, 3], 2, Truncate::None), Err(3));
        assert_eq!(
            fit(vec![1, 2, 3], 2, Truncate::Right).unwrap().ids,
            vec![1, 2]
        );
        assert_eq!(
            fit(vec![1, 2, 3], 2, Truncate::Left).unwrap().ids,
            vec![2, 3]
        );
        assert!(!fit(vec![1, 2], 2, Truncate::None).unwrap().truncated);
    }
}
