//! What every generating family does, seen from the continuous scheduler: start sequences from
//! their prompts, advance all of them by one token, and let rows leave or join between steps.
//! The scheduler knows nothing else about a model, so a new family is one implementation of
//! `StepDecoder`, and the scheduler can be tested with a fake one.

use std::sync::Arc;

/// Why a run of a model failed. Kept typed from the session up to the gRPC status mapping.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("onnxruntime: {0}")]
    Onnx(#[from] ort::Error),
    #[error("the model returned no `{0}` output")]
    MissingOutput(String),
    #[error("the model returned `{name}` shaped {shape:?}; expected {expected}")]
    BadShape {
        name: String,
        shape: Vec<i64>,
        expected: &'static str,
    },
    /// The model's scheduler ended before the sequence did (its version was unloaded mid-way
    /// and its thread stopped, or it died).
    #[error("the scheduler stopped")]
    SchedulerStopped,
    /// A bug in one step; its batch is dropped and the model goes on serving.
    #[error("a decode step panicked: {0}")]
    Panicked(String),
    /// The host could not give the memory a batch's KV cache needed.
    #[error(
        "the host could not allocate {mib} MiB for a KV cache of {rows} rows of {columns} columns"
    )]
    CacheMemory {
        mib: u128,
        rows: usize,
        columns: usize,
    },
}

/// Shared by every sequence a failed run ends.
pub type SharedRunError = Arc<RunError>;

/// Rows decoded together, in the scheduler's order: row `i` of the batch is the scheduler's
/// sequence `i`, before and after every call.
pub trait RowBatch: Send {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records the token chosen for row `row`; the next step feeds it.
    fn push_token(&mut self, row: usize, token: i64);
}

/// One generating model, driven a step at a time on the scheduler's thread.
pub trait StepDecoder: Send + 'static {
    type Batch: RowBatch;

    /// A batch with no rows.
    fn empty(&self) -> Self::Batch;

    /// Runs the prompts of new sequences; returns them as a batch and each row's next-token
    /// logits.
    fn prefill(&mut self, prompts: Vec<Vec<i64>>)
    -> Result<(Self::Batch, Vec<Vec<f32>>), RunError>;

    /// Feeds each row's pending token; returns every row's next-token logits.
    fn step(&mut self, batch: &mut Self::Batch) -> Result<Vec<Vec<f32>>, RunError>;

    /// Keeps the rows at `rows`, in that order.
    fn keep(&self, batch: Self::Batch, rows: &[usize]) -> Result<Self::Batch, RunError>;

    /// Appends `joining`'s rows after `running`'s.
    fn merge(&self, running: Self::Batch, joining: Self::Batch) -> Result<Self::Batch, RunError>;
}

/// Puts `decoder` through what serving does to a batch, with throwaway rows of `token`: a
/// prefill of two prompts of different lengths, a step, a third row joining, a step, a row
/// leaving with the rest reordered, and a last step. Run once at load time, it makes a graph
/// that cannot decode a changing batch fail its load instead of its first concurrent requests,
/// and on a GPU it makes the first copy of carried state through the host (which builds ONNX
/// Runtime's copy session) happen before traffic. It does not make the first burst of real
/// prompts faster on the CPU: eight SmolLM2 prompts 50 ms apart, first burst after a start,
/// took 333-417 ms mean TTFT with it and 285-420 ms without (three starts each).
pub fn rehearse<D: StepDecoder>(decoder: &mut D, token: i64) -> Result<(), RunError> {
    let feed_next = |batch: &mut D::Batch| {
        for row in 0..batch.len() {
            batch.push_token(row, token);
        }
    };
    let (mut batch, _) = decoder.prefill(vec![vec![token; 4], vec![token; 2]])?;
    feed_next(&mut batch);
    decoder.step(&mut batch)?;
    let (joining, _) = decoder.prefill(vec![vec![token; 3]])?;
    let mut batch = decoder.merge(batch, joining)?;
    feed_next(&mut batch);
    decoder.step(&mut batch)?;
    let mut batch = decoder.keep(batch, &[2, 0])?;
    feed_next(&mut batch);
    decoder.step(&mut batch)?;
    Ok(())
}
