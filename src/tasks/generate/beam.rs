//! Beam search as transformers' `generate` does it (`_beam_search`, 4.57): every step extends
//! each running beam by every token, keeps the best `max(2, 1 + eos ids) × num_beams`
//! continuations, finishes those among the top `num_beams` that end (an end-of-sequence id, or
//! the length limit) with their score divided by `generated ** length_penalty`, and runs on with
//! the best `num_beams` that did not end. `early_stopping` decides when the search may stop.
//! The logits processors apply to each beam's log-probabilities before that, as transformers
//! applies them: forced tokens, the minimum length, the model's constraints and
//! `repetition_penalty` (over the prompt, or an encoder-decoder's start token, and the beam).
//!
//! `BeamSearch` is the arithmetic alone; `BeamDriver` runs it as one sequence of the continuous
//! scheduler, whose rows are its beams, and sends the best `n` results when it ends.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::constraints::Constraints;
use super::driver::{Event, FinishReason, GeneratedToken, TokenChoice};
use super::events::EventSender;
use super::forced::{ForcedTokens, force};
use super::sampling::log_softmax;
use super::spans::SequenceSpans;
use super::text::TextStream;
use crate::engine::continuous::{Decision, SequenceDriver, StopCause};
use crate::runtime::step::RunError;

/// transformers' stand-in for minus infinity in beam scores.
const EXCLUDED: f32 = -1.0e9;

pub use crate::kinds::EarlyStopping;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamConfig {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// transformers' `RepetitionPenaltyLogitsProcessor` on the log-probabilities; 1.0 is off.
    pub repetition_penalty: f32,
}

/// A candidate sequence: its tokens, each token's log-probability, and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<i64>,
    pub logprobs: Vec<f32>,
    /// Running: the summed log-probability. Finished: divided by the length penalty.
    pub score: f32,
}

/// One search's state between steps.
#[derive(Debug)]
pub struct BeamSearch {
    config: BeamConfig,
    max_new_tokens: usize,
    min_new_tokens: usize,
    eos_ids: Vec<i64>,
    forced: ForcedTokens,
    constraints: Constraints,
    /// What the model continues (the prompt, or an encoder-decoder's start token): with each
    /// beam's tokens, what the constraints look at.
    context: Vec<i64>,
    /// Best first; one per batch row.
    running: Vec<Hypothesis>,
    /// Best first, at most `num_beams`.
    finished: Vec<Hypothesis>,
    generated: usize,
    /// Cleared once no running beam is expected to beat the finished ones.
    improvement_possible: bool,
}

/// A continuation considered at one step.
struct Candidate {
    beam: usize,
    token: i64,
    /// Under the model's own distribution, as reported.
    logprob: f32,
    /// The beam's score with this token, after the processors (a forced token adds 0).
    score: f32,
    ends: bool,
}

impl BeamSearch {
    pub fn new(
        config: BeamConfig,
        max_new_tokens: usize,
        min_new_tokens: usize,
        eos_ids: Vec<i64>,
        forced: ForcedTokens,
        constraints: Constraints,
        context: Vec<i64>,
    ) -> Self {
        Self {
            config,
            max_new_tokens,
            min_new_tokens,
            eos_ids,
            forced,
            constraints,
            context,
            // The prompt: one row, which the first step widens to `num_beams`.
            running: vec![Hypothesis {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                score: 0.0,
            }],
            finished: Vec::new(),
            generated: 0,
            improvement_possible: true,
        }
    }

    /// Takes the logits of every running beam (row order); returns the rows of the next step
    /// as (running beam it extends, token), or nothing once the search is over.
    pub fn step(&mut self, logits: &[Vec<f32>]) -> Vec<(usize, i64)> {
        debug_assert_eq!(logits.len(), self.running.len());
        let num_beams = self.config.num_beams;
        let keep = 2.max(1 + self.eos_ids.len()) * num_beams;
        let generated = self.generated + 1;
        let mut candidates: Vec<Candidate> = Vec::with_capacity(keep * logits.len());
        for (beam, row) in logits.iter().enumerate() {
            let mut log_probs = log_softmax(row);
            let forced = self.forced.at(self.generated, self.max_new_tokens);
            let penalised = forced.is_empty() && self.config.repetition_penalty != 1.0;
            // The model's own, for the log-probabilities reported, where a processor changes it.
            let model_log_probs = (!forced.is_empty() || penalised).then(|| log_probs.clone());
            if !forced.is_empty() {
                force(&mut log_probs, forced);
            }
            if penalised {
                let seen = self.context.iter().chain(&self.running[beam].tokens);
                penalise_repetition(&mut log_probs, seen, self.config.repetition_penalty);
            }
            if forced.is_empty() {
                let mut banned = Vec::new();
                if self.generated < self.min_new_tokens {
                    banned.extend_from_slice(&self.eos_ids);
                }
                if !self.constraints.is_empty() {
                    let mut sequence = self.context.clone();
                    sequence.extend_from_slice(&self.running[beam].tokens);
                    self.constraints.ban(&sequence, self.generated, &mut banned);
                }
                for token in banned {
                    if let Some(value) = log_probs.get_mut(token as usize) {
                        *value = f32::NEG_INFINITY;
                    }
                }
            }
            let base = self.running[beam].score;
            // A token that cannot be chosen (banned or forced out) extends no beam.
            let possible = best(&log_probs, keep)
                .into_iter()
                .filter(|(_, logprob)| *logprob > f32::NEG_INFINITY);
            for (index, processed) in possible {
                let token = index as i64;
                candidates.push(Candidate {
                    beam,
                    token,
                    logprob: model_log_probs
                        .as_ref()
                        .map_or(processed, |model| model[index]),
                    score: base + processed,
                    ends: self.eos_ids.contains(&token) || generated >= self.max_new_tokens,
                });
            }
        }
        // Best first; among equals, the lower beam and token, as a top-k over beam × vocab.
        candidates.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.beam.cmp(&b.beam))
                .then(a.token.cmp(&b.token))
        });
        candidates.truncate(keep);

        // Those among the best num_beams that end are finished candidates.
        let full = self.finished.len() == num_beams;
        let may_finish = self.improvement_possible
            && !(full && self.config.early_stopping == EarlyStopping::FirstBeams);
        if may_finish {
            let divisor = (generated as f32).powf(self.config.length_penalty);
            for candidate in candidates.iter().take(num_beams).filter(|c| c.ends) {
                let hypothesis = self.extended(candidate, candidate.score / divisor);
                self.finished.push(hypothesis);
            }
            self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            self.finished.truncate(num_beams);
        }

        // The best num_beams that go on; an ending one only where too few do not end.
        let every_one_ends = candidates.iter().all(|c| c.ends);
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| {
            let penalised = |c: &Candidate| c.score + if c.ends { EXCLUDED } else { 0.0 };
            penalised(&candidates[b])
                .total_cmp(&penalised(&candidates[a]))
                .then(a.cmp(&b))
        });
        let running: Vec<Hypothesis> = order
            .iter()
            .take(num_beams)
            .map(|&i| {
                let candidate = &candidates[i];
                let score = candidate.score + if candidate.ends { EXCLUDED } else { 0.0 };
                self.extended(candidate, score)
            })
            .collect();
        let next: Vec<(usize, i64)> = order
            .iter()
            .take(num_beams)
            .map(|&i| (candidates[i].beam, candidates[i].token))
            .collect();
        self.running = running;
        self.generated = generated;

        self.improvement_possible &= self.running_may_improve();
        let all_finished = self.finished.len() == num_beams
            && self.config.early_stopping == EarlyStopping::FirstBeams;
        if !self.improvement_possible || all_finished || every_one_ends {
            return Vec::new();
        }
        next
    }

    fn extended(&self, candidate: &Candidate, score: f32) -> Hypothesis {
        let parent = &self.running[candidate.beam];
        let mut tokens = parent.tokens.clone();
        tokens.push(candidate.token);
        let mut logprobs = parent.logprobs.clone();
        logprobs.push(candidate.logprob);
        Hypothesis {
            tokens,
            logprobs,
            score,
        }
    }

    /// transformers' early-stop heuristic: can the best running beam still beat the worst
    /// finished candidate (while some of the num_beams places are open, always)?
    fn running_may_improve(&self) -> bool {
        if self.finished.len() < self.config.num_beams {
            return true;
        }
        let penalty = self.config.length_penalty;
        let length = if self.config.early_stopping == EarlyStopping::Never && penalty > 0.0 {
            self.max_new_tokens
        } else {
            self.generated
        };
        let best_running = self.running.first().map_or(EXCLUDED, |beam| beam.score)
            / (length as f32).powf(penalty);
        let worst_finished = self.finished.last().map_or(EXCLUDED, |h| h.score);
        best_running > worst_finished
    }

    /// The finished candidates, best first.
    pub fn results(&self) -> &[Hypothesis] {
        &self.finished
    }
}

/// The `count` largest values with their indices, largest first (lower index first on ties).
/// transformers' `RepetitionPenaltyLogitsProcessor`: every token seen, once however often, has
/// its score multiplied by `penalty` where negative (every log-probability but a certain one),
/// else divided by it.
fn penalise_repetition<'a>(scores: &mut [f32], seen: impl Iterator<Item = &'a i64>, penalty: f32) {
    let mut done = vec![false; scores.len()];
    for &token in seen {
        let Some(index) = usize::try_from(token).ok().filter(|&i| i < scores.len()) else {
            continue;
        };
        if std::mem::replace(&mut done[index], true) {
            continue;
        }
        let score = &mut scores[index];
        *score = if *score < 0.0 {
            *score * penalty
        } else {
            *score / penalty
        };
    }
}

fn best(values: &[f32], count: usize) -> Vec<(usize, f32)> {
    let mut indexed: Vec<(usize, f32)> = values.iter().copied().enumerate().collect();
    let count = count.min(indexed.len());
    let by_value = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if count < indexed.len() {
        indexed.select_nth_unstable_by(count, by_value);
        indexed.truncate(count);
    }
    indexed.sort_by(by_value);
    indexed
}

/// A beam search as one sequence of the scheduler; it answers for sequences `0..n`.
pub struct BeamDriver {
    search: BeamSearch,
    n: usize,
    context: Vec<u32>,
    keep_special_tokens: bool,
    tokenizer: Arc<Tokenizer>,
    events: EventSender,
    spans: SequenceSpans,
}

impl BeamDriver {
    pub fn new(
        search: BeamSearch,
        n: usize,
        context: Vec<u32>,
        keep_special_tokens: bool,
        tokenizer: Arc<Tokenizer>,
        events: EventSender,
    ) -> Self {
        Self {
            search,
            n,
            context,
            keep_special_tokens,
            tokenizer,
            events,
            spans: SequenceSpans::enqueued(0),
        }
    }

    /// Sends the best `n` candidates as sequences `0..n`. Where fewer finished (a forced token
    /// leaves one way through its place), the last one stands for the rest, as transformers
    /// returns copies of it.
    fn finish(&mut self) {
        self.spans.end();
        let results = self.search.results().to_vec();
        let Some(last) = results.last() else {
            self.stopped(StopCause::Failed(Arc::new(RunError::SchedulerStopped)));
            return;
        };
        let answers = results.iter().chain(std::iter::repeat(last));
        for (index, hypothesis) in answers.take(self.n).enumerate() {
            let mut text = TextStream::new(&self.context, Vec::new(), self.keep_special_tokens);
            let mut reason = FinishReason::Length;
            for (&token, &logprob) in hypothesis.tokens.iter().zip(&hypothesis.logprobs) {
                let generated = GeneratedToken {
                    choice: TokenChoice::of(&self.tokenizer, token as u32, logprob),
                    top: Vec::new(),
                };
                let delta = if self.search.eos_ids.contains(&token) {
                    reason = FinishReason::Eos;
                    String::new()
                } else {
                    text.push(&self.tokenizer, token as u32).text
                };
                self.events.send(Event::Token {
                    index,
                    token: generated,
                    text: delta,
                });
            }
            self.events.send(Event::Finished {
                index,
                reason,
                text: text.finish(&self.tokenizer),
                stop_sequence: None,
            });
        }
    }
}

impl SequenceDriver for BeamDriver {
    fn started(&mut self) {
        self.spans.admitted();
        let at = Instant::now();
        for index in 0..self.n {
            self.events.send(Event::Started { index, at });
        }
    }

    fn next(&mut self, logits: &[Vec<f32>]) -> Decision {
        self.spans.stepped();
        let next = self.search.step(logits);
        if next.is_empty() {
            self.finish();
        }
        Decision::Beams(next)
    }

    fn abandoned(&self) -> bool {
        // Its sequences go out together at the end, faster than the caller reads them.
        self.events.gone()
    }

    fn stopped(&mut self, cause: StopCause) {
        self.spans.end();
        for index in 0..self.n {
            let event = match &cause {
                StopCause::Cancelled => Event::Finished {
                    index,
                    reason: FinishReason::Cancelled,
                    text: String::new(),
                    stop_sequence: None,
                },
                StopCause::Failed(error) => Event::Failed {
                    index,
                    error: Arc::clone(error),
                },
            };
            self.events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: i64 = 5;

    /// Logits whose log-softmax is `probabilities`' logarithm.
    fn logits(probabilities: &[f32]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln()).collect()
    }

    /// A search with nothing forced or ruled out.
    fn plain(config: BeamConfig, max_new_tokens: usize, min_new_tokens: usize) -> BeamSearch {
        BeamSearch::new(
            config,
            max_new_tokens,
            min_new_tokens,
            vec![EOS],
            ForcedTokens::default(),
            Constraints::default(),
            Vec::new(),
        )
    }

    fn config(num_beams: usize, early_stopping: EarlyStopping) -> BeamConfig {
        BeamConfig {
            num_beams,
            length_penalty: 1.0,
            early_stopping,
            repetition_penalty: 1.0,
        }
    }

    #[test]
    fn one_beam_stopping_at_the_first_finish_is_greedy() {
        let table = [
            [0.1, 0.5, 0.1, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.1, 0.6, 0.05, 0.05],
            [0.05, 0.05, 0.1, 0.1, 0.1, 0.6],
        ];
        let mut search = plain(config(1, EarlyStopping::FirstBeams), 10, 0);
        let mut tokens = Vec::new();
        for row in &table {
            let next = search.step(&[logits(row)]);
            match next.as_slice() {
                [(0, token)] => tokens.push(*token),
                [] => break,
                other => panic!("one beam, got {other:?}"),
            }
        }
        assert_eq!(tokens, vec![1, 3]);
        assert_eq!(search.results()[0].tokens, vec![1, 3, EOS]);
    }

    #[test]
    fn a_repetition_penalty_scales_seen_log_probabilities_and_reports_the_models_own() {
        let mut scores = [-1.0, 0.5, -2.0, -3.0];
        // Seen twice counts once; an id past the vocabulary is passed over.
        penalise_repetition(&mut scores, [1, 0, 0, 9].iter(), 2.0);
        assert_eq!(scores, [-2.0, 0.25, -2.0, -3.0]);

        // The prompt holds token 1, the most likely; halved twice over in log space it loses
        // to token 2, whose log-probability is reported as the model gives it.
        let penalty = BeamConfig {
            repetition_penalty: 2.0,
            ..config(1, EarlyStopping::FirstBeams)
        };
        let mut search = BeamSearch::new(
            penalty,
            1,
            0,
            vec![EOS],
            ForcedTokens::default(),
            Constraints::default(),
            vec![1],
        );
        let row = [0.05, 0.45, 0.4, 0.05, 0.025, 0.025];
        assert!(search.step(&[logits(&row)]).is_empty());
        let best = &search.results()[0];
        assert_eq!(best.tokens, vec![2]);
        assert!((best.logprobs[0] - 0.4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn the_best_sum_wins_over_the_best_first_token() {
        // Greedy takes 0 (0.5) then a flat 0.2; beam search finds 1 (0.4) then 0.9.
        let mut search = plain(config(2, EarlyStopping::Never), 2, 0);
        let first = search.step(&[logits(&[0.5, 0.4, 0.025, 0.025, 0.025, 0.025])]);
        assert_eq!(first, vec![(0, 0), (0, 1)]);
        let after_0 = logits(&[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]);
        let after_1 = logits(&[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]);
        assert!(
            search.step(&[after_0, after_1]).is_empty(),
            "the length limit ends it"
        );
        let best = &search.results()[0];
        assert_eq!(best.tokens, vec![1, 0]);
        let expected = (0.4_f32.ln() + 0.9_f32.ln()) / 2.0;
        assert!(
            (best.score - expected).abs() < 1e-5,
            "{} vs {expected}",
            best.score
        );
    }

    #[test]
    fn a_beam_that_ends_finishes_and_the_others_run_on() {
        let mut search = plain(config(2, EarlyStopping::FirstBeams), 5, 0);
        // EOS is the best first token: it finishes; tokens 0 and 1 run.
        let next = search.step(&[logits(&[0.3, 0.2, 0.05, 0.05, 0.0001, 0.3999])]);
        assert_eq!(next, vec![(0, 0), (0, 1)]);
        assert_eq!(search.results().len(), 1);
        assert_eq!(search.results()[0].tokens, vec![EOS]);
        // Both end next: two finished, early stopping ends the search.
        let ending = logits(&[0.1, 0.1, 0.1, 0.1, 0.1, 0.5]);
        assert!(search.step(&[ending.clone(), ending]).is_empty());
        assert_eq!(search.results().len(), 2);
        assert_eq!(search.results()[0].tokens, vec![EOS]);
    }

    #[test]
    fn no_end_before_the_minimum_length() {
        let mut search = plain(config(2, EarlyStopping::FirstBeams), 5, 2);
        let next = search.step(&[logits(&[0.1, 0.1, 0.1, 0.1, 0.1, 0.5])]);
        assert!(next.iter().all(|&(_, token)| token != EOS), "{next:?}");
        assert!(search.results().is_empty());
    }

    #[test]
    fn best_keeps_the_largest_in_order() {
        assert_eq!(
            best(&[0.1, 0.7, 0.3, 0.7], 3),
            vec![(1, 0.7), (3, 0.7), (2, 0.3)]
        );
    }

    #[test]
    fn forced_first_and_last_tokens_leave_one_way_through_those_places() {
        let forced = ForcedTokens {
            first: Some(2),
            last: vec![EOS],
        };
        let mut search = BeamSearch::new(
            config(2, EarlyStopping::FirstBeams),
            3,
            0,
            vec![EOS],
            forced,
            Constraints::default(),
            Vec::new(),
        );
        // Token 2 is the least likely; forced, it is the one beam that goes on, scored 0.
        let first = logits(&[0.3, 0.3, 0.01, 0.19, 0.1, 0.1]);
        assert_eq!(search.step(&[first]), vec![(0, 2)]);
        let second = logits(&[0.5, 0.3, 0.05, 0.05, 0.05, 0.05]);
        assert_eq!(search.step(&[second]), vec![(0, 0), (0, 1)]);
        // The last place: EOS for both, though each beam likes token 0 best.
        let last = logits(&[0.6, 0.2, 0.05, 0.05, 0.05, 0.05]);
        assert!(search.step(&[last.clone(), last]).is_empty());
        let results = search.results();
        assert_eq!(results[0].tokens, vec![2, 0, EOS]);
        assert_eq!(results[1].tokens, vec![2, 1, EOS]);
        // Each token's reported log-probability is the model's own.
        assert!((results[0].logprobs[0] - 0.01_f32.ln()).abs() < 1e-5);
        assert!((results[0].logprobs[2] - 0.05_f32.ln()).abs() < 1e-5);
        assert!((results[0].score - (0.5_f32.ln() / 3.0)).abs() < 1e-5);
    }
}
