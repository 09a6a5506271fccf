//! Turns one step's logits into the next token: penalties, then greedy choice or sampling with
//! temperature, top-k, top-p and typical-p (in transformers' order), each sequence with its own
//! seeded generator.

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
        // Relative to the best score, so that a tiny temperature sends the others towards -inf
        // instead of sending the best ones to +inf (where the finiteness filter would drop them).
        let best = max_of(scores);
        let temperature = self.config.temperature;
        scores
            .iter_mut()
            .for_each(|s| *s = (*s - best) / temperature);
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
        // The k best, and every token tied with the k-th: as transformers' top-k (which drops
        // only scores below the k-th), rather than favouring the lower ids among equals.
        if self.config.top_k > 0 && candidates.len() > self.config.top_k {
            let kth = candidates[self.config.top_k - 1].1;
            let keep = candidates
                .iter()
                .position(|c| c.1 < kth)
                .unwrap_or(candidates.len());
            candidates.truncate(keep);
        }
        let mut probabilities = softmax_of(&candidates);
        // Top-p, then typical-p: transformers' order when both are set.
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
        if self.config.typical_p < 1.0 {
            (candidates, probabilities) =
                typical_filter(candidates, probabilities, self.config.typical_p);
        }
        draw(&candidates, &probabilities, self.rng.random())
    }
}

/// The candidate whose share of the cumulative distribution holds `draw` (in [0, 1)). Summed in
/// f64 and scaled to the total, so that rounding neither skips the rarest tokens nor leaves the
/// draw past the end, where it would fall on the least likely candidate.
fn draw(candidates: &[(usize, f32)], probabilities: &[f32], draw: f32) -> i64 {
    let sum: f64 = probabilities.iter().map(|&p| f64::from(p)).sum();
    let target = f64::from(draw) * sum;
    let mut total = 0.0f64;
    for (candidate, &p) in candidates.iter().zip(probabilities) {
        total += f64::from(p);
        if target < total {
            return candidate.0 as i64;
        }
    }
    // Only where `draw` rounds to the very end: the last candidate with any probability.
    candidates
        .iter()
        .zip(probabilities)
        .rev()
        .find(|(_, p)| **p > 0.0)
        .or(candidates.iter().zip(probabilities).next())
        .map_or(0, |(candidate, _)| candidate.0 as i64)
}

fn apply_penalties(scores: &mut [f32], config: &SamplingConfig, counts: &[u32], seen: &[bool]) {
    if config.repetition_penalty != 1.0 {
        for (score, _) in scores.iter_mut().zip(seen).filter(|(_, seen)| **seen) {
            // Clamped: a tiny penalty would otherwise turn a seen token's score into +inf.
            *score = if *score < 0.0 {
                (*score * config.repetition_penalty).max(f32::MIN)
            } else {
                (*score / config.repetition_penalty).min(f32::MAX)
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

/// Independent partial results, so the loops over a vocabulary compile to vector instructions.
const LANES: usize = 8;

pub fn argmax(values: &[f32]) -> usize {
    // Two vectorizable passes beat one that carries an index; ties go to the lowest id, as in
    // torch.argmax, which the greedy references were made with.
    let max = max_of(values);
    values.iter().position(|&x| x == max).unwrap_or(0)
}

/// The largest value, ignoring NaN; -inf when there is none.
fn max_of(values: &[f32]) -> f32 {
    let chunks = values.chunks_exact(LANES);
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for chunk in chunks.clone() {
        for (m, &x) in lane_max.iter_mut().zip(chunk) {
            // A comparison, not `f32::max`, whose NaN rule keeps the loop scalar.
            *m = if x > *m { x } else { *m };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lane_max)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
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
/// Every row of every decode step pays for it, so it runs over the vocabulary in lanes with
/// [`exp_non_positive`] instead of calling libm once per token.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = max_of(logits);
    if !max.is_finite() {
        // Empty, all -inf (nothing is possible) or +inf (one token is certain) logits.
        return max;
    }
    let chunks = logits.chunks_exact(LANES);
    let mut lane_sum = [0.0_f32; LANES];
    for chunk in chunks.clone() {
        for (sum, &x) in lane_sum.iter_mut().zip(chunk) {
            *sum += exp_non_positive(x - max);
        }
    }
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| exp_non_positive(x - max))
        .sum();
    (lane_sum.iter().sum::<f32>() + rest).ln() + max
}

/// `exp(x)` for `x <= 0`, within 2e-7 relative error of libm and without calls or float-to-int
/// casts, so a loop over it vectorizes (2.5x faster than libm over a 4096-token vocabulary).
/// Cephes' `expf`: x = n ln 2 + r with |r| <= ln 2 / 2, exp(r) by a degree-6 polynomial, and
/// 2^n written straight into the exponent bits. Below -87 (where f32 stops being normal) the
/// result is about 1.6e-38 instead of 0, which no sum notices; NaN stays NaN.
fn exp_non_positive(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to the nearest integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let exp_r = p * r * r + r + 1.0;
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    exp_r * f32::from_bits(((n_bits + 127) as u32) << 23)
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

    #[test]
    fn a_draw_at_the_end_of_the_distribution_takes_the_last_possible_token() {
        let candidates = [(4, 0.0), (9, -1.0), (2, -40.0), (7, f32::NEG_INFINITY)];
        // f32 probabilities as softmax gives them: the third is below what an f32 running total
        // near 1 can add, and the fourth is none.
        let probabilities = [0.7310586, 0.26894143, 4.2e-18, 0.0];
        assert_eq!(draw(&candidates, &probabilities, 0.0), 4);
        assert_eq!(draw(&candidates, &probabilities, 0.75), 9);
        // A draw at the very end (rounding) falls on the last token with any probability,
        // never on one with none, as the least likely candidate was before.
        assert_eq!(draw(&candidates, &probabilities, 1.0), 2);
        assert_eq!(draw(&candidates, &[0.5, 0.5, 0.0, 0.0], 1.0), 9);
    }

    fn sampler(config: SamplingConfig) -> Sampler {
        Sampler::new(config, 7, 5, &[])
    }

    #[test]
    fn greedy_takes_the_best_token_and_respects_bans() {
        let mut greedy = sampler(SamplingConfig::default());
        assert_eq!(greedy.choose(&[0.1, 3.0, 0.2, 2.0, 0.0], &[]), 1);
        assert_eq!(greedy.choose(&[0.1, 3.0, 0.2, 2.0, 0.0], &[1]), 3);
        // Ties go to the lowest id, across the vector lanes too; NaN never wins.
        let mut wide = vec![0.0_f32; 37];
        wide[5] = 1.0;
        wide[29] = 1.0;
        wide[0] = f32::NAN;
        assert_eq!(argmax(&wide), 5);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn extreme_but_valid_settings_keep_the_best_tokens() {
        // Dividing raw scores by 1e-38 would make the best ones +inf and filter them out.
        let cold = SamplingConfig {
            do_sample: true,
            temperature: 1e-38,
            ..Default::default()
        };
        let mut sampler = Sampler::new(cold, 3, 5, &[]);
        for _ in 0..20 {
            assert_eq!(sampler.choose(&[5.0, -2.0, 7.5, 0.0, 7.0], &[]), 2);
        }
        // A seen token's score divided by 1e-38 (past f32::MAX) stays the favourite.
        let eager = SamplingConfig {
            do_sample: true,
            repetition_penalty: 1e-38,
            ..Default::default()
        };
        let mut sampler = Sampler::new(eager, 3, 4, &[0]);
        for _ in 0..20 {
            assert_eq!(sampler.choose(&[4.0, 3.0, 2.0, 1.0], &[]), 0);
        }
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
    fn top_k_keeps_every_token_tied_with_the_kth() {
        let logits = [1.0, 2.0, 2.0, 0.0];
        let mut top_1 = sampler(SamplingConfig {
            do_sample: true,
            top_k: 1,
            ..Default::default()
        });
        let drawn: std::collections::BTreeSet<i64> =
            (0..200).map(|_| top_1.choose(&logits, &[])).collect();
        assert_eq!(drawn, [1, 2].into());
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
    fn exp_non_positive_matches_libm() {
        let mut worst = 0.0_f64;
        for step in 0..=870_000 {
            let x = -(step as f32) * 1e-4;
            let exact = f64::from(x).exp();
            worst = worst.max((f64::from(exp_non_positive(x)) - exact).abs() / exact);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert!(exp_non_positive(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn log_sum_exp_matches_a_double_precision_sum() {
        // Logits spread like a language model's, over a vocabulary that is not a multiple of
        // the lane count.
        let logits: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919 % 4099) as f32 / 4099.0 - 0.8) * 20.0)
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact = logits
            .iter()
            .map(|&x| f64::from(x - max).exp())
            .sum::<f64>()
            .ln()
            + f64::from(max);
        assert!((f64::from(log_sum_exp(&logits)) - exact).abs() < 1e-5);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert!((log_sum_exp(&[f32::NEG_INFINITY, 0.0]) - 0.0).abs() < 1e-7);
    }

    #[test]
    fn log_softmax_and_top_n() {
        let log_probs = log_softmax(&[0.0, 0.0]);
        assert!((log_probs[0] - 0.5_f32.ln()).abs() < 1e-6);
        assert_eq!(top_n(&[-3.0, -0.5, -1.0], 2), vec![(1, -0.5), (2, -1.0)]);
    }
}
