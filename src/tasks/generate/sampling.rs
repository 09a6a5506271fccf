//! Turns one step's logits into the next token: penalties, then greedy choice or sampling with
//! temperature, top-k, top-p and typical-p, each sequence with its own seeded generator.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The validated sampling settings of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub do_sample: bool,
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 1.0 disables.
    pub typical_p: f32,
    /// 1.0 disables; applied to every token seen (prompt and generated), as in transformers.
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the generated tokens (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Subtracted once if the token was generated before.
    pub presence_penalty: f32,
}

impl SamplingConfig {
    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
    /// How often each token was generated so far (index: token id).
    counts: Vec<u32>,
    /// Tokens seen anywhere (prompt or generated), for the repetition penalty.
    seen: Vec<bool>,
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(config: SamplingConfig, seed: u64, vocab: usize, prompt: &[i64]) -> Self {
        let mut seen = vec![false; vocab];
        for &token in prompt {
            if let Some(flag) = seen.get_mut(token as usize) {
                *flag = true;
            }
        }
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            counts: vec![0; vocab],
            seen,
            scratch: Vec::with_capacity(vocab),
        }
    }

    /// Records a generated token, for the penalties of later steps.
    pub fn observe(&mut self, token: i64) {
        let index = token as usize;
        if let Some(count) = self.counts.get_mut(index) {
            *count += 1;
        }
        if let Some(flag) = self.seen.get_mut(index) {
            *flag = true;
        }
    }

    /// Picks the next token. `banned` tokens (EOS before `min_new_tokens`) cannot be chosen.
    pub fn choose(&mut self, logits: &[f32], banned: &[i64]) -> i64 {
        if !self.config.do_sample && banned.is_empty() && !self.config.has_penalties() {
            return argmax(logits) as i64;
        }
        let scores = &mut self.scratch;
        scores.clear();
        scores.extend_from_slice(logits);
        apply_penalties(scores, &self.config, &self.counts, &self.seen);
        for &token in banned {
            if let Some(score) = scores.get_mut(token as usize) {
                *score = f32::NEG_INFINITY;
            }
        }
        if !self.config.do_sample {
            return argmax(scores) as i64;
        }
        let temperature = self.config.temperature;
        scores.iter_mut().for_each(|s| *s /= temperature);
        let mut candidates: Vec<(usize, f32)> = scores
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .collect();
        if candidates.is_empty() {
            return argmax(logits) as i64;
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            candidates.truncate(self.config.top_k);
        }
        let mut probabilities = softmax_of(&candidates);
        if self.config.typical_p < 1.0 {
            (candidates, probabilities) =
                typical_filter(candidates, probabilities, self.config.typical_p);
        }
        if self.config.top_p < 1.0 {
            let mut total = 0.0;
            let keep = probabilities
                .iter()
                .position(|p| {
                    total += p;
                    total >= self.config.top_p
                })
                .map_or(probabilities.len(), |i| i + 1);
            candidates.truncate(keep);
            probabilities = softmax_of(&candidates);
        }
        let draw: f32 = self.rng.random();
        let mut total = 0.0;
        for (i, p) in probabilities.iter().enumerate() {
            total += p;
            if draw < total {
                return candidates[i].0 as i64;
            }
        }
        candidates.last().map_or(0, |c| c.0 as i64)
    }
}

fn apply_penalties(scores: &mut [f32], config: &SamplingConfig, counts: &[u32], seen: &[bool]) {
    if config.repetition_penalty != 1.0 {
        for (score, _) in scores.iter_mut().zip(seen).filter(|(_, seen)| **seen) {
            *score = if *score < 0.0 {
                *score * config.repetition_penalty
            } else {
                *score / config.repetition_penalty
            };
        }
    }
    if config.frequency_penalty != 0.0 || config.presence_penalty != 0.0 {
        for (score, &count) in scores
            .iter_mut()
            .zip(counts)
            .filter(|(_, count)| **count > 0)
        {
            *score -= config.frequency_penalty * count as f32 + config.presence_penalty;
        }
    }
}

pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &value) in values.iter().enumerate() {
        if value > values[best] {
            best = i;
        }
    }
    best
}

fn softmax_of(candidates: &[(usize, f32)]) -> Vec<f32> {
    let max = candidates.first().map_or(0.0, |c| c.1);
    let exps: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Typical sampling (Meister et al.): keep the tokens whose surprise is closest to the
/// distribution's entropy until their mass reaches `mass`.
fn typical_filter(
    candidates: Vec<(usize, f32)>,
    probabilities: Vec<f32>,
    mass: f32,
) -> (Vec<(usize, f32)>, Vec<f32>) {
    let entropy: f32 = probabilities
        .iter()
        .filter(|p| **p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    let distance = |i: usize| (-probabilities[i].ln() - entropy).abs();
    order.sort_by(|&a, &b| distance(a).total_cmp(&distance(b)));
    let mut total = 0.0;
    let mut kept = Vec::new();
    for i in order {
        kept.push(i);
        total += probabilities[i];
        if total >= mass {
            break;
        }
    }
    kept.sort_unstable();
    let candidates: Vec<(usize, f32)> = kept.iter().map(|&i| candidates[i]).collect();
    let probabilities = softmax_of(&candidates);
    (candidates, probabilities)
}

/// `ln(Σ exp(x))`, computed without overflow: a token's log-probability is its logit minus this.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln() + max
}

/// Natural-log probabilities of `logits`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits.iter().map(|&x| x - log_sum).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first.
pub fn top_n(log_probs: &[f32], n: usize) -> Vec<(usize, f32)> {
    let mut indexed: Vec<(usize, f32)> = log_probs.iter().copied().enumerate().collect();
    let n = n.min(indexed.len());
    if n == 0 {
        return Vec::new();
    }
    indexed.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    indexed.truncate(n);
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(config: SamplingConfig) -> Sampler {
        Sampler::new(config, 7, 5, &[])
    }

    #[test]
    fn greedy_takes_the_best_token_and_respects_bans() {
        let mut greedy = sampler(SamplingConfig::default());
        assert_eq!(greedy.choose(&[0.1, 3.0, 0.2, 2.0, 0.0], &[]), 1);
        assert_eq!(greedy.choose(&[0.1, 3.0, 0.2, 2.0, 0.0], &[1]), 3);
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let config = SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut sampler = Sampler::new(config, 0, 3, &[0]);
        // Token 0 (seen in the prompt) drops from 3.0 to 1.5, below token 1.
        assert_eq!(sampler.choose(&[3.0, 2.0, -1.0], &[]), 1);

        let config = SamplingConfig {
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            ..Default::default()
        };
        let mut sampler = Sampler::new(config, 0, 3, &[]);
        sampler.observe(0);
        sampler.observe(0);
        // 3.0 - 2 * 1.0 - 0.5 = 0.5 < 1.0
        assert_eq!(sampler.choose(&[3.0, 1.0, 0.0], &[]), 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let config = SamplingConfig {
            do_sample: true,
            temperature: 1.5,
            ..Default::default()
        };
        let logits = [1.0, 1.1, 0.9, 1.05, 1.0];
        let draw = |seed| {
            let mut sampler = Sampler::new(config.clone(), seed, 5, &[]);
            (0..32)
                .map(|_| sampler.choose(&logits, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let mut top_k = sampler(SamplingConfig {
            do_sample: true,
            top_k: 2,
            ..Default::default()
        });
        let mut top_p = sampler(SamplingConfig {
            do_sample: true,
            top_p: 0.5,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(top_k.choose(&logits, &[]) < 2);
            assert_eq!(top_p.choose(&logits, &[]), 0);
        }
    }

    #[test]
    fn typical_p_keeps_the_typical_tokens() {
        let logits = [10.0, 0.0, 0.0, 0.0, 0.0];
        let mut typical = sampler(SamplingConfig {
            do_sample: true,
            typical_p: 0.5,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(typical.choose(&logits, &[]), 0);
        }
    }

    #[test]
    fn log_softmax_and_top_n() {
        let log_probs = log_softmax(&[0.0, 0.0]);
        assert!((log_probs[0] - 0.5_f32.ln()).abs() < 1e-6);
        assert_eq!(top_n(&[-3.0, -0.5, -1.0], 2), vec![(1, -0.5), (2, -1.0)]);
    }
}
