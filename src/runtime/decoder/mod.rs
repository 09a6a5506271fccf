//! The generating families as `StepDecoder`s: a causal decoder with a KV cache (fed back as the
//! graph returned it, or written in place: `shared_cache`), a recurrent model carrying a
//! fixed-size state, a decoder that carries nothing and re-runs the whole sequence, and an
//! encoder-decoder. They share the step graph in `graph`.

mod cache_buffers;
pub mod graph;
pub mod seq2seq;
pub mod shared_cache;

use std::sync::Arc;

pub use graph::{Carry, DecodeBatch, StepGraph};
use graph::{Row, RunInputs, left_pad};
pub use shared_cache::SharedCacheDecoder;

use crate::runtime::SessionPool;
use crate::runtime::bindings::Bindings;
use crate::runtime::step::{RunError, StepDecoder};

/// Which decoder a decoder-only graph needs, checked at load time.
pub fn step_graph(
    pool: Arc<SessionPool>,
    bindings: Arc<Bindings>,
    recurrent: bool,
    pad_id: i64,
) -> Result<StepGraph, String> {
    let graph = StepGraph::new(pool, bindings, recurrent, pad_id)?;
    if graph.carry == Carry::KvCache && !graph.masks_padding() {
        return Err("a KV-cache decoder needs attention_mask and position_ids inputs to batch sequences of different lengths".into());
    }
    Ok(graph)
}

/// A causal decoder whose keys and values `[batch, heads, past, head_dim]` grow a column a step.
pub struct KvCacheDecoder(pub StepGraph);

impl StepDecoder for KvCacheDecoder {
    type Batch = DecodeBatch;

    fn empty(&self) -> DecodeBatch {
        DecodeBatch::empty()
    }

    fn prefill(
        &mut self,
        prompts: Vec<Vec<i64>>,
    ) -> Result<(DecodeBatch, Vec<Vec<f32>>), RunError> {
        let graph = &self.0;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let fed: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let padded: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| left_pad(p, width, graph.pad_id))
            .collect();
        let state = graph.empty_state(prompts.len())?;
        let (logits, state) = graph.run(
            &mut graph.session(),
            RunInputs {
                ids: &padded,
                past: 0,
                real: &fed,
                state,
                extra: Vec::new(),
            },
        )?;
        let rows = prompts.into_iter().map(Row::new).collect();
        Ok((DecodeBatch { rows, state, width }, logits))
    }

    fn step(&mut self, batch: &mut DecodeBatch) -> Result<Vec<Vec<f32>>, RunError> {
        let logits = step_carried(&self.0, batch)?;
        batch.width += 1;
        Ok(logits)
    }

    fn keep(&self, batch: DecodeBatch, rows: &[usize]) -> Result<DecodeBatch, RunError> {
        self.0.filter(batch, rows)
    }

    fn merge(&self, running: DecodeBatch, joining: DecodeBatch) -> Result<DecodeBatch, RunError> {
        self.0.concat(running, joining)
    }
}

/// A recurrent model: a fixed-size state per row (an LSTM's `h` and `c`).
pub struct RecurrentDecoder(pub StepGraph);

impl StepDecoder for RecurrentDecoder {
    type Batch = DecodeBatch;

    fn empty(&self) -> DecodeBatch {
        DecodeBatch::empty()
    }

    fn prefill(
        &mut self,
        prompts: Vec<Vec<i64>>,
    ) -> Result<(DecodeBatch, Vec<Vec<f32>>), RunError> {
        // Padding would flow through a recurrent state, so each prompt runs alone.
        let graph = &self.0;
        let mut batch = DecodeBatch::empty();
        let mut logits = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let state = graph.empty_state(1)?;
            let (mut row_logits, state) = graph.run(
                &mut graph.session(),
                RunInputs {
                    ids: std::slice::from_ref(&prompt),
                    past: 0,
                    real: &[prompt.len()],
                    state,
                    extra: Vec::new(),
                },
            )?;
            logits.push(row_logits.remove(0));
            let single = DecodeBatch {
                rows: vec![Row::new(prompt)],
                state,
                width: 0,
            };
            batch = graph.concat(batch, single)?;
        }
        Ok((batch, logits))
    }

    fn step(&mut self, batch: &mut DecodeBatch) -> Result<Vec<Vec<f32>>, RunError> {
        step_carried(&self.0, batch)
    }

    fn keep(&self, batch: DecodeBatch, rows: &[usize]) -> Result<DecodeBatch, RunError> {
        self.0.filter(batch, rows)
    }

    fn merge(&self, running: DecodeBatch, joining: DecodeBatch) -> Result<DecodeBatch, RunError> {
        self.0.concat(running, joining)
    }
}

/// Feeds each row's pending token with the carried state, which the run replaces.
fn step_carried(graph: &StepGraph, batch: &mut DecodeBatch) -> Result<Vec<Vec<f32>>, RunError> {
    step_with(graph, batch, Vec::new())
}

/// `step_carried` with inputs fed beside the carried state, such as an encoder's outputs.
fn step_with(
    graph: &StepGraph,
    batch: &mut DecodeBatch,
    extra: Vec<(String, ort::session::SessionInputValue<'_>)>,
) -> Result<Vec<Vec<f32>>, RunError> {
    let last: Vec<Vec<i64>> = batch.rows.iter().map(|row| vec![row.pending()]).collect();
    let fed_after: Vec<usize> = batch.rows.iter().map(|row| row.fed + 1).collect();
    let state = std::mem::take(&mut batch.state);
    let (logits, state) = graph.run(
        &mut graph.session(),
        RunInputs {
            ids: &last,
            past: batch.width,
            real: &fed_after,
            state,
            extra,
        },
    )?;
    batch.state = state;
    for row in &mut batch.rows {
        row.fed += 1;
    }
    Ok(logits)
}

/// A decoder that carries nothing between steps: every step re-runs each whole sequence.
pub struct RecomputeDecoder(pub StepGraph);

impl RecomputeDecoder {
    /// Each row's logits for its whole sequence so far. A graph without the inputs that mask
    /// padding (`attention_mask` and `position_ids`) would read a left-padded row's pad tokens
    /// as text, so its rows run in groups of one length, with no padding.
    fn run_full(&self, rows: &[Row]) -> Result<Vec<Vec<f32>>, RunError> {
        if self.0.masks_padding() {
            return self.run_padded(&rows.iter().collect::<Vec<_>>());
        }
        crate::runtime::run_by_length(rows, |row| row.tokens.len(), |group| self.run_padded(group))
    }

    fn run_padded(&self, rows: &[&Row]) -> Result<Vec<Vec<f32>>, RunError> {
        let graph = &self.0;
        let width = rows.iter().map(|row| row.tokens.len()).max().unwrap_or(0);
        let padded: Vec<Vec<i64>> = rows
            .iter()
            .map(|row| left_pad(&row.tokens, width, graph.pad_id))
            .collect();
        let lengths: Vec<usize> = rows.iter().map(|row| row.tokens.len()).collect();
        let (logits, _) = graph.run(
            &mut graph.session(),
            RunInputs {
                ids: &padded,
                past: 0,
                real: &lengths,
                state: Vec::new(),
                extra: Vec::new(),
            },
        )?;
        Ok(logits)
    }
}

impl StepDecoder for RecomputeDecoder {
    type Batch = DecodeBatch;

    fn empty(&self) -> DecodeBatch {
        DecodeBatch::empty()
    }

    fn prefill(
        &mut self,
        prompts: Vec<Vec<i64>>,
    ) -> Result<(DecodeBatch, Vec<Vec<f32>>), RunError> {
        let rows: Vec<Row> = prompts.into_iter().map(Row::new).collect();
        let logits = self.run_full(&rows)?;
        let batch = DecodeBatch {
            rows,
            state: Vec::new(),
            width: 0,
        };
        Ok((batch, logits))
    }

    fn step(&mut self, batch: &mut DecodeBatch) -> Result<Vec<Vec<f32>>, RunError> {
        self.run_full(&batch.rows)
    }

    fn keep(&self, batch: DecodeBatch, rows: &[usize]) -> Result<DecodeBatch, RunError> {
        self.0.filter(batch, rows)
    }

    fn merge(&self, running: DecodeBatch, joining: DecodeBatch) -> Result<DecodeBatch, RunError> {
        self.0.concat(running, joining)
    }
}
