//! The decoder that writes its KV cache in place, on the real SmolLM2 graphs of
//! `make real-models` (float32, and the float16 graph for GPUs): rows prefilled together,
//! joining a running batch, leaving it, and outgrowing their buffers at every step
//! greedy-decode exactly as each prompt does alone.

mod common;

use std::path::Path;
use std::sync::Arc;

use lmserve::registry::bindings::resolve;
use lmserve::registry::manifest::Manifest;
use lmserve::runtime::decoder::{self, Carry, SharedCacheDecoder};
use lmserve::runtime::step::{RowBatch, StepDecoder};

const NEW_TOKENS: usize = 10;

/// SmolLM2 of `repository`, as `make real-models` builds it there.
fn smollm2(repository: &Path, growth: usize) -> SharedCacheDecoder {
    let folder = repository.join("smollm2-135m-instruct/1");
    let pool = Arc::new(common::cpu_session_pool(&folder.join("model.onnx"), 2));
    // The roles as the registry resolves them from the graph, which names them itself.
    let manifest = std::fs::read_to_string(folder.join("model.toml")).unwrap();
    let bindings = resolve(&Manifest::parse(&manifest).unwrap(), pool.graph()).unwrap();
    assert!(bindings.writes_cache_in_place());
    let graph = decoder::step_graph(pool, Arc::new(bindings), false, 2).unwrap();
    assert_eq!(graph.carry, Carry::SharedKvCache);
    SharedCacheDecoder::new(graph).unwrap().with_growth(growth)
}

fn argmax(logits: &[f32]) -> i64 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    best.0 as i64
}

/// SmolLM2 token ids of three prompts of different lengths (any ids below the vocabulary do).
fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47],
        vec![9555, 2056, 253, 655],
        vec![504, 1341, 4110, 3521, 359, 30, 216, 1780, 314],
    ]
}

/// Each prompt decoded alone, with the default headroom.
fn alone(decoder: &mut SharedCacheDecoder, prompt: &[i64]) -> Vec<i64> {
    let (mut batch, logits) = decoder.prefill(vec![prompt.to_vec()]).unwrap();
    let mut tokens = vec![argmax(&logits[0])];
    while tokens.len() < NEW_TOKENS {
        batch.push_token(0, *tokens.last().unwrap());
        let logits = decoder.step(&mut batch).unwrap();
        tokens.push(argmax(&logits[0]));
    }
    tokens
}

/// The running rows' prompts (indices into `prompts()`) and the tokens each prompt has got.
struct Running {
    batch: <SharedCacheDecoder as StepDecoder>::Batch,
    rows: Vec<usize>,
    tokens: Vec<Vec<i64>>,
}

impl Running {
    fn take(&mut self, rows: &[usize], logits: &[Vec<f32>]) {
        for (&prompt, logits) in rows.iter().zip(logits) {
            self.tokens[prompt].push(argmax(logits));
        }
    }

    fn step(&mut self, decoder: &mut SharedCacheDecoder) {
        for (row, &prompt) in self.rows.iter().enumerate() {
            let token = *self.tokens[prompt].last().unwrap();
            self.batch.push_token(row, token);
        }
        let logits = decoder.step(&mut self.batch).unwrap();
        let rows = self.rows.clone();
        self.take(&rows, &logits);
    }
}

#[test]
fn rows_decode_as_alone_when_batched_joining_leaving_and_outgrowing_buffers() {
    decode_batched_as_alone(&common::real_models());
}

#[test]
fn float16_rows_decode_as_alone_when_batched_joining_leaving_and_outgrowing_buffers() {
    decode_batched_as_alone(&common::real_models_float16());
}

fn decode_batched_as_alone(repository: &Path) {
    let prompts = prompts();
    let mut roomy = smollm2(repository, 128);
    let expected: Vec<Vec<i64>> = prompts.iter().map(|p| alone(&mut roomy, p)).collect();
    drop(roomy);
    // With the default headroom rows join into free slots and leave by moving later rows down;
    // with one column every step also copies the cache into larger buffers.
    for growth in [128, 1] {
        let tokens = decode_batched(&mut smollm2(repository, growth), &prompts);
        assert_eq!(tokens[0], expected[0][..tokens[0].len()], "growth {growth}");
        for prompt in [1, 2] {
            assert_eq!(
                tokens[prompt][..NEW_TOKENS],
                expected[prompt][..],
                "prompt {prompt}, growth {growth}"
            );
        }
    }
}

/// Each prompt's tokens from one batch that the prompts join and leave.
fn decode_batched(decoder: &mut SharedCacheDecoder, prompts: &[Vec<i64>]) -> Vec<Vec<i64>> {
    let (batch, logits) = decoder.prefill(prompts[..2].to_vec()).unwrap();
    let mut running = Running {
        batch,
        rows: vec![0, 1],
        tokens: vec![Vec::new(); prompts.len()],
    };
    running.take(&[0, 1], &logits);
    for _ in 0..3 {
        running.step(decoder);
    }
    // The third prompt joins a batch whose rows are longer than it.
    let (joining, logits) = decoder.prefill(vec![prompts[2].clone()]).unwrap();
    running.take(&[2], &logits);
    let batch = std::mem::replace(&mut running.batch, decoder.empty());
    running.batch = decoder.merge(batch, joining).unwrap();
    running.rows.push(2);
    for _ in 0..2 {
        running.step(decoder);
    }
    // The first row leaves; the others go on in their order.
    let batch = std::mem::replace(&mut running.batch, decoder.empty());
    running.batch = decoder.keep(batch, &[1, 2]).unwrap();
    running.rows = vec![1, 2];
    running.step(decoder);
    // The two go on reordered.
    let batch = std::mem::replace(&mut running.batch, decoder.empty());
    running.batch = decoder.keep(batch, &[1, 0]).unwrap();
    running.rows = vec![2, 1];
    while running.tokens[2].len() < NEW_TOKENS {
        running.step(decoder);
    }
    running.tokens
}
