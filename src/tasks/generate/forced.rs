//! Tokens a model's generation config forces at fixed places, as transformers' generate does
//! with its ForcedBOS and ForcedEOS logits processors: BART and mBART begin every target with a
//! given token, and Marian ends a sequence cut by its length limit with its EOS.

/// The forced tokens of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForcedTokens {
    /// The first generated token.
    pub first: Option<i64>,
    /// The last token the length limit allows: one of these.
    pub last: Vec<i64>,
}

impl ForcedTokens {
    /// The tokens allowed for generated token `index` (from 0) of at most `max_new_tokens`;
    /// empty where nothing is forced. At a one-token limit the last token's rule wins, as the
    /// ForcedEOS processor runs after the ForcedBOS one.
    pub fn at(&self, index: usize, max_new_tokens: usize) -> &[i64] {
        if index + 1 == max_new_tokens && !self.last.is_empty() {
            &self.last
        } else if index == 0 {
            self.first.as_slice()
        } else {
            &[]
        }
    }
}

/// Scores as the processors leave them: 0 for the forced tokens, -inf for every other. Over
/// logits or log-probabilities alike, a forced token's log-probability is then 0.
pub fn force(scores: &mut [f32], forced: &[i64]) {
    scores.fill(f32::NEG_INFINITY);
    for &token in forced {
        if let Some(score) = scores.get_mut(token as usize) {
            *score = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_last_places_are_forced_and_the_last_wins_alone() {
        let forced = ForcedTokens {
            first: Some(7),
            last: vec![2, 3],
        };
        assert_eq!(forced.at(0, 4), &[7]);
        assert!(forced.at(1, 4).is_empty());
        assert_eq!(forced.at(3, 4), &[2, 3]);
        assert_eq!(forced.at(0, 1), &[2, 3]);
        let first_only = ForcedTokens {
            first: Some(7),
            last: Vec::new(),
        };
        assert_eq!(first_only.at(0, 1), &[7]);
    }

    #[test]
    fn forcing_leaves_only_the_forced_tokens_possible() {
        let mut scores = vec![1.0, 5.0, -2.0, 0.5];
        force(&mut scores, &[2, 9]);
        assert_eq!(
            scores,
            [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]
        );
    }
}
