//! One sequence's trip through the continuous batcher as trace spans, children of its request's
//! span although they open and close on the decode thread: `queue` until the scheduler admits
//! it, `prefill` until its prompt has been run, then one `decode` span for all its steps (with
//! the step count, not a span per token). Detokenizing is incremental, a little at every step:
//! its summed time is the decode span's `detokenize_ms`, and the `detokenize` span covers the
//! final flush that completes the text.

use std::time::{Duration, Instant};

use tracing::Span;
use tracing::field::Empty;

pub struct SequenceSpans {
    request: Span,
    queue: Span,
    prefill: Span,
    decode: Span,
    steps: u64,
    detokenizing: Duration,
}

impl SequenceSpans {
    /// Opens the queue span under the current (request) span.
    pub fn enqueued(index: usize) -> Self {
        let request = Span::current();
        let queue = tracing::info_span!(parent: &request, "queue", sequence = index);
        Self {
            request,
            queue,
            prefill: Span::none(),
            decode: Span::none(),
            steps: 0,
            detokenizing: Duration::ZERO,
        }
    }

    /// Admitted: the queue span ends, the prefill span starts.
    pub fn admitted(&mut self) {
        self.queue = Span::none();
        self.prefill = tracing::info_span!(parent: &self.request, "prefill");
    }

    /// One token chosen: the first ends the prefill and opens the decode span.
    pub fn stepped(&mut self) {
        if self.steps == 0 {
            self.prefill = Span::none();
            self.decode = tracing::info_span!(
                parent: &self.request,
                "decode",
                steps = Empty,
                detokenize_ms = Empty
            );
        }
        self.steps += 1;
    }

    /// Runs one incremental detokenization, adding its time to the decode span's total.
    pub fn detokenizing<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = work();
        self.detokenizing += started.elapsed();
        result
    }

    /// The final flush of the text, in its own span under the decode span.
    pub fn final_detokenize<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let span = tracing::info_span!(parent: &self.decode, "detokenize");
        let _entered = span.enter();
        self.detokenizing(work)
    }

    /// The sequence is over: its open spans end now, before the caller hears so (the request's
    /// own span may end as soon as it does).
    pub fn end(&mut self) {
        // As i64: OpenTelemetry has no unsigned integers, and would send a u64 as text.
        self.decode.record("steps", self.steps as i64);
        self.decode
            .record("detokenize_ms", self.detokenizing.as_secs_f64() * 1e3);
        self.queue = Span::none();
        self.prefill = Span::none();
        self.decode = Span::none();
    }
}

impl Drop for SequenceSpans {
    fn drop(&mut self) {
        self.end();
    }
}
