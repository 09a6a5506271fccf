//! Tokens a model's generation config rules out at a step, as transformers' processors rule
//! them out: `no_repeat_ngram_size` (NoRepeatNGram: summarizers such as BART-CNN repeat
//! themselves without it), `bad_words_ids` (NoBadWords), `suppress_tokens` and
//! `begin_suppress_tokens` (SuppressTokens, SuppressTokensAtBegin).

/// What one request may not generate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// No n-gram of this size occurs twice in the sequence; 0: any may.
    pub no_repeat_ngram_size: usize,
    /// Token sequences never generated: the last token of each is ruled out where the others
    /// end the sequence (always, for one token alone).
    pub bad_words: Vec<Vec<i64>>,
    /// Never generated.
    pub suppress: Vec<i64>,
    /// Not generated as the token at `begin_at` (counted from the first generated, 0).
    pub suppress_at_begin: Vec<i64>,
    pub begin_at: usize,
}

impl Constraints {
    pub fn is_empty(&self) -> bool {
        self.no_repeat_ngram_size == 0
            && self.bad_words.is_empty()
            && self.suppress.is_empty()
            && self.suppress_at_begin.is_empty()
    }

    /// Adds to `banned` the tokens that may not follow `sequence` (what the model continues:
    /// the prompt, or an encoder-decoder's start token, then what was generated), when
    /// `generated` tokens have been generated.
    pub fn ban(&self, sequence: &[i64], generated: usize, banned: &mut Vec<i64>) {
        banned.extend_from_slice(&self.suppress);
        if generated == self.begin_at {
            banned.extend_from_slice(&self.suppress_at_begin);
        }
        for word in &self.bad_words {
            if let Some((last, before)) = word.split_last()
                && sequence.ends_with(before)
            {
                banned.push(*last);
            }
        }
        let size = self.no_repeat_ngram_size;
        // As transformers: nothing is banned until the sequence could complete an n-gram.
        if size > 0 && sequence.len() + 1 >= size {
            let tail = &sequence[sequence.len() + 1 - size..];
            banned.extend(
                sequence
                    .windows(size)
                    .filter(|ngram| ngram[..size - 1] == *tail)
                    .map(|ngram| ngram[size - 1]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn banned(constraints: &Constraints, sequence: &[i64], generated: usize) -> Vec<i64> {
        let mut banned = Vec::new();
        constraints.ban(sequence, generated, &mut banned);
        banned.sort_unstable();
        banned.dedup();
        banned
    }

    #[test]
    fn an_ngram_seen_before_cannot_be_completed_again() {
        let bigrams = Constraints {
            no_repeat_ngram_size: 2,
            ..Default::default()
        };
        // "5 7" and "5 9" were seen; the sequence ends in 5: neither 7 nor 9 may follow.
        assert_eq!(banned(&bigrams, &[5, 7, 1, 5, 9, 2, 5], 3), [7, 9]);
        assert!(banned(&bigrams, &[5], 0).is_empty());
        let trigrams = Constraints {
            no_repeat_ngram_size: 3,
            ..Default::default()
        };
        assert_eq!(banned(&trigrams, &[1, 2, 3, 1, 2], 2), [3]);
        assert!(banned(&trigrams, &[1], 0).is_empty());
        let unigrams = Constraints {
            no_repeat_ngram_size: 1,
            ..Default::default()
        };
        assert_eq!(banned(&unigrams, &[4, 2, 4], 1), [2, 4]);
    }

    #[test]
    fn bad_words_and_suppressed_tokens_are_ruled_out_where_they_apply() {
        let constraints = Constraints {
            bad_words: vec![vec![8], vec![3, 4, 6]],
            suppress: vec![11],
            suppress_at_begin: vec![12],
            begin_at: 0,
            ..Default::default()
        };
        assert_eq!(banned(&constraints, &[1, 3, 4], 0), [6, 8, 11, 12]);
        assert_eq!(banned(&constraints, &[1, 3, 5], 1), [8, 11]);
        assert!(!constraints.is_empty());
        assert!(Constraints::default().is_empty());
    }
}
