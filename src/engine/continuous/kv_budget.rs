//! The KV cache's share of memory: what one token of one sequence costs in the carried state,
//! and how many tokens a byte budget admits. Admission reserves each sequence's prompt plus the
//! most it may generate, so the tokens in use never pass the budget; GetModel reports both.

use std::sync::atomic::{AtomicUsize, Ordering};

use ort::value::TensorElementType;

use crate::runtime::TensorSpec;
use crate::runtime::bindings::Bindings;

/// Bytes one token adds to a sequence's carried state: every state input with a growing axis
/// besides the batch (a KV cache `[batch, heads, past, head_dim]`), its fixed dimensions times
/// its element's size (float32, or float16 in a cache written in place; checked at load). A
/// recurrent state (`[layers, batch, hidden]`, one dynamic axis) does not grow with the
/// sequence: 0.
pub fn bytes_per_token(inputs: &[TensorSpec], bindings: &Bindings) -> usize {
    bindings
        .state
        .iter()
        .filter_map(|pair| inputs.iter().find(|spec| spec.name == pair.input))
        .filter(|spec| spec.shape.iter().filter(|&&dim| dim < 0).count() >= 2)
        .map(|spec| {
            let fixed: i64 = spec.shape.iter().filter(|&&dim| dim > 0).product();
            let element = spec.float_type().unwrap_or(TensorElementType::Float32);
            element.byte_size(fixed as usize).unwrap_or(0)
        })
        .sum()
}

/// A generating model's KV budget and what its running sequences hold of it.
#[derive(Debug, Default)]
pub struct KvBudget {
    pub bytes_per_token: usize,
    /// Tokens admission lets in flight: `generation.max_total_tokens`, or fewer where
    /// `generation.kv_cache_mib` is smaller at this model's bytes per token.
    pub budget_tokens: usize,
    /// Tokens reserved by the running sequences (their prompts plus the most each may add).
    tokens_in_use: AtomicUsize,
}

impl KvBudget {
    pub fn new(bytes_per_token: usize, max_total_tokens: usize, budget_mib: usize) -> Self {
        let by_memory = match (budget_mib, bytes_per_token) {
            (0, _) | (_, 0) => usize::MAX,
            (mib, per_token) => (mib << 20) / per_token,
        };
        Self {
            bytes_per_token,
            budget_tokens: max_total_tokens.min(by_memory).max(1),
            tokens_in_use: AtomicUsize::new(0),
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_tokens.saturating_mul(self.bytes_per_token)
    }

    pub fn tokens_in_use(&self) -> usize {
        self.tokens_in_use.load(Ordering::Relaxed)
    }

    pub fn set_in_use(&self, tokens: usize) {
        self.tokens_in_use.store(tokens, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::StatePair;

    fn carrying(inputs: &[&str]) -> Bindings {
        Bindings {
            input_ids: "input_ids".into(),
            attention_mask: None,
            position_ids: None,
            first_position: 0,
            token_type_ids: None,
            logits: Some("logits".into()),
            hidden_states: None,
            pooled_output: None,
            state: inputs
                .iter()
                .map(|name| StatePair {
                    input: (*name).into(),
                    output: format!("present{name}"),
                })
                .collect(),
            seqlens_k: None,
            total_sequence_length: None,
        }
    }

    #[test]
    fn a_kv_cache_costs_its_fixed_dimensions_per_token() {
        // SmolLM2-135M: 30 layers of keys and values, 3 KV heads of 64.
        let names: Vec<String> = (0..60).map(|i| format!("past.{i}")).collect();
        let inputs: Vec<TensorSpec> = names
            .iter()
            .map(|n| TensorSpec::float32(n, &[-1, 3, -1, 64]))
            .collect();
        let bindings = carrying(&names.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(bytes_per_token(&inputs, &bindings), 60 * 3 * 64 * 4);
        // The same cache in float16 (the graph CUDA runs) costs half.
        let half: Vec<TensorSpec> = inputs
            .into_iter()
            .map(|spec| TensorSpec {
                dtype: "float16".into(),
                ..spec
            })
            .collect();
        assert_eq!(bytes_per_token(&half, &bindings), 60 * 3 * 64 * 2);
    }

    #[test]
    fn a_recurrent_state_does_not_grow() {
        let inputs = [TensorSpec::float32("h", &[2, -1, 128])];
        // [layers, batch, hidden]: the batch is not the first axis, but nothing grows with time.
        let bindings = carrying(&["h"]);
        assert_eq!(bytes_per_token(&inputs, &bindings), 0);
        let budget = KvBudget::new(0, 32_768, 1024);
        assert_eq!(budget.budget_tokens, 32_768);
    }

    #[test]
    fn the_smaller_of_the_two_budgets_admits() {
        let budget = KvBudget::new(46_080, 32_768, 1024);
        assert_eq!(budget.budget_tokens, (1024 << 20) / 46_080);
        assert_eq!(KvBudget::new(16, 32_768, 1024).budget_tokens, 32_768);
        assert_eq!(KvBudget::new(16, 32_768, 0).budget_tokens, 32_768);
    }
}
