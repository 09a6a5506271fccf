//! The per-sequence policy the continuous scheduler calls at every step: choose the token,
//! decide whether the sequence ends, and send the caller what it produced.

use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::constraints::Constraints;
use super::events::EventSender;
use super::forced::{ForcedTokens, force};
use super::sampling::{Sampler, log_softmax, log_sum_exp, top_n};
use super::spans::SequenceSpans;
use super::text::TextStream;
use crate::engine::continuous::{Decision, SequenceDriver, StopCause};
use crate::runtime::step::SharedRunError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Eos,
    StopSequence,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenChoice {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

impl TokenChoice {
    /// Token `id` with its text decoded on its own.
    pub fn of(tokenizer: &Tokenizer, id: u32, logprob: f32) -> Self {
        Self {
            id,
            text: tokenizer.decode(&[id], false).unwrap_or_default(),
            logprob,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub choice: TokenChoice,
    /// The most likely alternatives at this step, best first.
    pub top: Vec<TokenChoice>,
}

/// What a sequence tells its caller, in order: `Started`, then `Token`s, then `Finished` (or
/// `Failed`).
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        index: usize,
        at: Instant,
    },
    Token {
        index: usize,
        token: GeneratedToken,
        text: String,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        text: String,
        stop_sequence: Option<String>,
    },
    Failed {
        index: usize,
        error: SharedRunError,
    },
}

/// How the caller takes a sequence's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every token as soon as it exists (GenerateStream).
    Stream,
    /// Everything at the end (Generate). The first token still goes out at once, which is what
    /// time to first token measures; the rest wait in the driver, so the collecting task wakes
    /// a few times per sequence instead of once per token, and leaves the cores to the model.
    Collect,
}

/// How one sequence decides when it is done.
#[derive(Debug, Clone)]
pub struct StopRules {
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// The model's end-of-sequence ids (unless ignored) and the caller's stop ids.
    pub stop_ids: Vec<i64>,
    pub top_logprobs: usize,
    /// Tokens the model's generation config forces at the first and last places.
    pub forced: ForcedTokens,
    /// Tokens it rules out (repeated n-grams, bad words, suppressed tokens).
    pub constraints: Constraints,
}

pub struct Driver {
    index: usize,
    sampler: Sampler,
    text: TextStream,
    tokenizer: Arc<Tokenizer>,
    rules: StopRules,
    generated: usize,
    events: EventSender,
    delivery: Delivery,
    /// Token events not yet sent (`Delivery::Collect`).
    held: Vec<Event>,
    /// What the model continues, then every token generated: what the constraints look at.
    history: Vec<i64>,
    /// The tokens ruled out at this step (a buffer kept between steps).
    banned: Vec<i64>,
    spans: SequenceSpans,
}

impl Driver {
    pub fn new(
        index: usize,
        sampler: Sampler,
        text: TextStream,
        tokenizer: Arc<Tokenizer>,
        rules: StopRules,
        events: EventSender,
        delivery: Delivery,
    ) -> Self {
        Self {
            index,
            sampler,
            text,
            tokenizer,
            rules,
            generated: 0,
            events,
            delivery,
            held: Vec::new(),
            history: Vec::new(),
            banned: Vec::new(),
            spans: SequenceSpans::enqueued(index),
        }
    }

    /// Starts the history the constraints look at from what the model continues (the prompt,
    /// or an encoder-decoder's start token).
    pub fn continuing(mut self, context: &[i64]) -> Self {
        self.history = context.to_vec();
        self
    }

    fn choice(&self, id: usize, logprob: f32) -> TokenChoice {
        TokenChoice::of(&self.tokenizer, id as u32, logprob)
    }

    fn send(&mut self, event: Event) {
        if matches!(event, Event::Finished { .. } | Event::Failed { .. }) {
            self.spans.end();
        }
        if self.delivery == Delivery::Collect
            && self.generated > 1
            && matches!(event, Event::Token { .. })
        {
            self.held.push(event);
            return;
        }
        // A caller that went away is noticed through `abandoned`; nothing to do here.
        for held in self.held.drain(..) {
            self.events.send(held);
        }
        self.events.send(event);
    }
}

impl SequenceDriver for Driver {
    fn started(&mut self) {
        self.spans.admitted();
        self.send(Event::Started {
            index: self.index,
            at: Instant::now(),
        });
    }

    fn next(&mut self, rows: &[Vec<f32>]) -> Decision {
        let forced = self
            .rules
            .forced
            .at(self.generated, self.rules.max_new_tokens);
        let processed;
        let logits = if forced.is_empty() {
            rows[0].as_slice()
        } else {
            let mut scores = rows[0].clone();
            force(&mut scores, forced);
            processed = scores;
            processed.as_slice()
        };
        self.banned.clear();
        if forced.is_empty() {
            if self.generated < self.rules.min_new_tokens {
                self.banned.extend_from_slice(&self.rules.stop_ids);
            }
            let constraints = &self.rules.constraints;
            constraints.ban(&self.history, self.generated, &mut self.banned);
        }
        let token = self.sampler.choose(logits, &self.banned);
        self.history.push(token);
        self.sampler.observe(token);
        self.generated += 1;
        self.spans.stepped();

        // Reported under the model's own distribution, before penalties, filters and forcing.
        let model = rows[0].as_slice();
        let log_normalizer = log_sum_exp(model);
        let top = if self.rules.top_logprobs == 0 {
            Vec::new()
        } else {
            let log_probs = log_softmax(model);
            top_n(&log_probs, self.rules.top_logprobs)
                .into_iter()
                .map(|(id, logprob)| self.choice(id, logprob))
                .collect()
        };
        let logprob = model
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |logit| logit - log_normalizer);
        let generated = GeneratedToken {
            choice: self.choice(token as usize, logprob),
            top,
        };

        // End-of-sequence and stop ids end the sequence without adding text.
        if self.rules.stop_ids.contains(&token) {
            let (text, tokenizer) = (&mut self.text, &self.tokenizer);
            let text = self.spans.final_detokenize(|| text.finish(tokenizer));
            self.send(Event::Token {
                index: self.index,
                token: generated,
                text: String::new(),
            });
            self.send(Event::Finished {
                index: self.index,
                reason: FinishReason::Eos,
                text,
                stop_sequence: None,
            });
            return Decision::Token {
                token,
                finished: true,
            };
        }
        let (text, tokenizer) = (&mut self.text, &self.tokenizer);
        let delta = self
            .spans
            .detokenizing(|| text.push(tokenizer, token as u32));
        self.send(Event::Token {
            index: self.index,
            token: generated,
            text: delta.text,
        });
        if let Some(stop) = delta.stopped_by {
            self.send(Event::Finished {
                index: self.index,
                reason: FinishReason::StopSequence,
                text: String::new(),
                stop_sequence: Some(stop),
            });
            return Decision::Token {
                token,
                finished: true,
            };
        }
        if self.generated >= self.rules.max_new_tokens {
            let (text, tokenizer) = (&mut self.text, &self.tokenizer);
            let text = self.spans.final_detokenize(|| text.finish(tokenizer));
            self.send(Event::Finished {
                index: self.index,
                reason: FinishReason::Length,
                text,
                stop_sequence: None,
            });
            return Decision::Token {
                token,
                finished: true,
            };
        }
        Decision::Token {
            token,
            finished: false,
        }
    }

    fn abandoned(&self) -> bool {
        match self.delivery {
            Delivery::Stream => self.events.abandoned(),
            // Its tokens go out together at the end, faster than the caller reads them.
            Delivery::Collect => self.events.gone(),
        }
    }

    fn stopped(&mut self, cause: StopCause) {
        match cause {
            StopCause::Cancelled => self.send(Event::Finished {
                index: self.index,
                reason: FinishReason::Cancelled,
                text: String::new(),
                stop_sequence: None,
            }),
            StopCause::Failed(error) => self.send(Event::Failed {
                index: self.index,
                error,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(decision: Decision) -> bool {
        matches!(decision, Decision::Token { finished: true, .. })
    }
    use crate::tasks::generate::events::EventReceiver;
    use crate::tasks::generate::sampling::SamplingConfig;

    const VOCAB: usize = 4096;

    fn driver(delivery: Delivery, max_new_tokens: usize) -> (Driver, EventReceiver) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/repository/tiny-gpt2/1/tokenizer.json"
        );
        let tokenizer = Arc::new(Tokenizer::from_file(path).unwrap());
        let (sender, events) = crate::tasks::generate::events::channel(1);
        let rules = StopRules {
            max_new_tokens,
            min_new_tokens: 0,
            forced: ForcedTokens::default(),
            constraints: Constraints::default(),
            stop_ids: vec![0],
            top_logprobs: 0,
        };
        let sampler = Sampler::new(SamplingConfig::default(), 0, VOCAB, &[]);
        let text = TextStream::new(&[], Vec::new(), false);
        let driver = Driver::new(0, sampler, text, tokenizer, rules, sender, delivery);
        (driver, events)
    }

    /// Logits whose greedy choice is `token`.
    fn pointing_at(token: usize) -> Vec<f32> {
        let mut logits = vec![0.0; VOCAB];
        logits[token] = 5.0;
        logits
    }

    fn drain(events: &mut EventReceiver) -> Vec<Event> {
        std::iter::from_fn(|| events.try_recv()).collect()
    }

    fn token_ids(events: &[Event]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|event| match event {
                Event::Token { token, .. } => Some(token.choice.id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stream_gets_every_token_at_once() {
        let (mut driver, mut events) = driver(Delivery::Stream, 3);
        for token in [100, 101] {
            assert!(!finished(driver.next(&[pointing_at(token)])));
            assert_eq!(token_ids(&drain(&mut events)), vec![token as u32]);
        }
        assert!(finished(driver.next(&[pointing_at(102)])));
        let last = drain(&mut events);
        assert_eq!(token_ids(&last), vec![102]);
        assert!(matches!(
            last.last(),
            Some(Event::Finished {
                reason: FinishReason::Length,
                ..
            })
        ));
    }

    #[test]
    fn a_collected_sequence_sends_its_first_token_then_the_rest_at_the_end() {
        let (mut driver, mut events) = driver(Delivery::Collect, 4);
        driver.next(&[pointing_at(100)]);
        assert_eq!(token_ids(&drain(&mut events)), vec![100]);
        for token in [101, 102] {
            driver.next(&[pointing_at(token)]);
            assert!(drain(&mut events).is_empty());
        }
        assert!(finished(driver.next(&[pointing_at(103)])));
        let rest = drain(&mut events);
        assert_eq!(token_ids(&rest), vec![101, 102, 103]);
        assert!(matches!(rest.last(), Some(Event::Finished { .. })));
    }

    #[test]
    fn held_tokens_go_out_before_a_cancellation() {
        let (mut driver, mut events) = driver(Delivery::Collect, 10);
        for token in [100, 101, 102] {
            driver.next(&[pointing_at(token)]);
        }
        driver.stopped(StopCause::Cancelled);
        let all = drain(&mut events);
        assert_eq!(token_ids(&all), vec![100, 101, 102]);
        assert!(matches!(
            all.last(),
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ));
    }

    #[test]
    fn a_streamed_sequence_nobody_reads_is_abandoned_and_a_collected_one_is_not() {
        let steps = crate::tasks::generate::events::MAX_UNREAD + 10;
        let (mut streamed, _unread) = driver(Delivery::Stream, steps + 10);
        let (mut collected, _held) = driver(Delivery::Collect, steps + 10);
        for _ in 0..steps {
            streamed.next(&[pointing_at(100)]);
            collected.next(&[pointing_at(100)]);
        }
        assert!(streamed.abandoned());
        assert!(!collected.abandoned());
    }
}
