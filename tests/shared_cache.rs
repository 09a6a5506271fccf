//! The decoder that writes its KV cache in place, on the real SmolLM2 graphs of
//! `make real-models` (float32, and the float16 graph for GPUs): rows prefilled together,
//! joining a running batch, leaving it, and outgrowing their buffers at every step
//! greedy-decode exactly as each prompt does alone. On the committed tiny-llama fixtures, more
//! rows join than the buffers have free slots, and most leave again.

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
    in_place(&repository.join("smollm2-135m-instruct/1"), 2, growth)
}

/// The decoder of the model version in `folder`, which writes its cache in place.
fn in_place(folder: &Path, pad_id: i64, growth: usize) -> SharedCacheDecoder {
    let pool = Arc::new(common::cpu_session_pool(&folder.join("model.onnx"), 2));
    // The roles as the registry resolves them from the graph, which names them itself.
    let manifest = std::fs::read_to_string(folder.join("model.toml")).unwrap();
    let bindings = resolve(&Manifest::parse(&manifest).unwrap(), pool.graph()).unwrap();
    assert!(bindings.writes_cache_in_place());
    let graph = decoder::step_graph(pool, Arc::new(bindings), false, pad_id).unwrap();
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

#[test]
fn more_rows_than_free_slots_join_and_most_leave_as_alone() {
    for model in ["tiny-llama-in-place", "tiny-llama-in-place-fp16"] {
        let folder = common::root()
            .join("tests/fixtures/in-place")
            .join(model)
            .join("1");
        let reference = common::reference("tiny-llama");
        // 15 prompts of 3 to 7 tokens, from the reference's.
        let prompts: Vec<Vec<i64>> = reference["generate"]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|case| {
                let ids: Vec<i64> = case["prompt_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|id| id.as_i64().unwrap())
                    .collect();
                [3, 5, 7].map(|len| ids[..len.min(ids.len())].to_vec())
            })
            .collect();
        let mut roomy = in_place(&folder, 0, 128);
        let expected: Vec<Vec<i64>> = prompts.iter().map(|p| alone(&mut roomy, p)).collect();

        // One prompt joins before each step: the 9th finds the 8 slots of the first full.
        let mut decoder = in_place(&folder, 0, 128);
        let mut running = Running {
            batch: decoder.empty(),
            rows: Vec::new(),
            tokens: vec![Vec::new(); prompts.len()],
        };
        for (prompt, ids) in prompts.iter().enumerate() {
            let (joining, logits) = decoder.prefill(vec![ids.clone()]).unwrap();
            running.take(&[prompt], &logits);
            let batch = std::mem::replace(&mut running.batch, decoder.empty());
            running.batch = decoder.merge(batch, joining).unwrap();
            running.rows.push(prompt);
            if running.tokens[0].len() < NEW_TOKENS {
                running.step(&mut decoder);
            }
        }
        // Every row but the last two leaves, a few at a time and in order, down to a batch
        // small enough to be laid out anew in fewer slots.
        while running.rows.len() > 2 {
            let keep: Vec<usize> = (0..running.rows.len()).filter(|row| row % 3 != 0).collect();
            let batch = std::mem::replace(&mut running.batch, decoder.empty());
            running.batch = decoder.keep(batch, &keep).unwrap();
            running.rows = keep.iter().map(|&row| running.rows[row]).collect();
            running.step(&mut decoder);
        }
        while running.tokens[*running.rows.last().unwrap()].len() < NEW_TOKENS {
            running.step(&mut decoder);
        }
        for (prompt, tokens) in running.tokens.iter().enumerate() {
            let n = tokens.len().min(NEW_TOKENS);
            assert_eq!(
                tokens[..n],
                expected[prompt][..n],
                "{model} prompt {prompt}"
            );
        }
        assert!(
            running
                .rows
                .iter()
                .all(|&row| running.tokens[row].len() >= NEW_TOKENS)
        );
    }
}
