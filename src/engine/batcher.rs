//! The dynamic batcher for one encoder model version: a handle that queues texts, and a loop
//! that waits for a free session, lets a batch gather for at most `max_wait`, and runs it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tracing::{Instrument, Span};

use super::admission::{Backlog, QueueClock, Reservation};
use super::batch_state::{BatchLimits, BatchState};
use super::faults::FaultTracker;
use super::lanes::Lanes;
use crate::error::{Error, Result};
use crate::runtime::SessionPool;
use crate::runtime::bindings::Bindings;
use crate::runtime::encoder::{self, EncoderRow, EncoderRowOutput};
use crate::telemetry::metrics::{self, ModelLabels};

/// How the batcher forms batches.
#[derive(Debug, Clone, Copy)]
pub struct BatcherSettings {
    pub limits: BatchLimits,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    /// The longest a text may wait in the queue; requests expected to wait longer are refused.
    pub max_queue_time: Duration,
}

struct Pending {
    row: EncoderRow,
    /// The row's output and how long it waited in the queue.
    reply: oneshot::Sender<Result<(EncoderRowOutput, Duration)>>,
    enqueued: Instant,
    /// The request's span, parent of its `queue` and `batch` spans.
    span: Span,
    /// Open while the row waits; closed (dropped) when its batch starts.
    queue_span: Span,
}

/// A request's rows after their batches ran: outputs in input order, and the longest wait.
pub struct Batched {
    pub outputs: Vec<EncoderRowOutput>,
    pub queued: Duration,
}

struct Shared {
    state: Mutex<BatchState<Pending>>,
    /// How fast texts have been leaving the queue, and how long a run takes, for admission by
    /// time.
    clock: Mutex<QueueClock>,
    /// Texts admitted and not yet queued.
    reserved: Arc<AtomicUsize>,
    work: Notify,
    closed: AtomicBool,
    labels: ModelLabels,
    max_queue_time: Duration,
}

/// Queues texts for one model version's batching loop. Dropping it stops the loop once the
/// texts already queued have run.
pub struct Batcher {
    shared: Arc<Shared>,
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.work.notify_one();
    }
}

impl Batcher {
    /// Starts the batching loop for `pool` on the current tokio runtime.
    pub fn spawn(
        pool: Arc<SessionPool>,
        bindings: Arc<Bindings>,
        pad_id: i64,
        settings: BatcherSettings,
        labels: ModelLabels,
        faults: Arc<FaultTracker>,
    ) -> Batcher {
        let shared = Arc::new(Shared {
            state: Mutex::new(BatchState::new(settings.queue_capacity)),
            clock: Mutex::new(QueueClock::default()),
            reserved: Arc::new(AtomicUsize::new(0)),
            work: Notify::new(),
            closed: AtomicBool::new(false),
            labels,
            max_queue_time: settings.max_queue_time,
        });
        let runner = Runner {
            lanes: Lanes::new(pool),
            bindings,
            pad_id,
            settings,
            shared: Arc::clone(&shared),
            faults,
        };
        tokio::spawn(runner.run());
        Batcher { shared }
    }

    /// Texts queued or admitted and about to queue: work waiting for a run.
    pub fn waiting(&self) -> usize {
        let queued = self.shared.state.lock().expect("batch state lock").len();
        queued + self.shared.reserved.load(Ordering::Acquire)
    }

    /// Whether `texts` more may queue: refused at once (RESOURCE_EXHAUSTED) when the queue is
    /// full, or when they would wait past `deadline` or the configured maximum queue time.
    /// Checked before the texts are tokenized; `submit` checks the capacity again.
    pub fn admit(&self, texts: usize, deadline: Option<Instant>) -> Result<Reservation> {
        let now = Instant::now();
        let state = self.shared.state.lock().expect("batch state lock");
        let queued = state.len() + self.shared.reserved.load(Ordering::Acquire);
        {
            if queued + texts > state.capacity() {
                metrics::queue_rejected(&self.shared.labels);
                return Err(Error::QueueFull {
                    model: self.shared.labels.model.clone(),
                    capacity: state.capacity(),
                });
            }
        }
        let backlog = Backlog {
            items: queued,
            waiting_since: state.front().map(|pending| pending.enqueued),
        };
        let clock = self.shared.clock.lock().expect("clock lock");
        let max_queue_time = self.shared.max_queue_time;
        clock
            .admit(backlog, texts, 1, deadline, max_queue_time, now)
            .map_err(|refusal| {
                metrics::queue_rejected(&self.shared.labels);
                Error::overloaded(&self.shared.labels.model, refusal)
            })?;
        // Taken under the state lock, so admissions see each other's places.
        Ok(Reservation::take(&self.shared.reserved, texts))
    }

    /// Runs `rows` (one per text) in whatever batches the loop forms, and returns their outputs
    /// in the same order. All rows are queued or none: a full queue is RESOURCE_EXHAUSTED.
    pub async fn submit(&self, rows: Vec<EncoderRow>, place: Reservation) -> Result<Batched> {
        let now = Instant::now();
        let span = Span::current();
        let queue_span = tracing::info_span!(parent: &span, "queue", texts = rows.len());
        let mut receivers = Vec::with_capacity(rows.len());
        let items = rows
            .into_iter()
            .map(|row| {
                let (reply, receiver) = oneshot::channel();
                receivers.push(receiver);
                let tokens = row.ids.len();
                (
                    Pending {
                        row,
                        reply,
                        enqueued: now,
                        span: span.clone(),
                        queue_span: queue_span.clone(),
                    },
                    tokens,
                )
            })
            .collect();
        {
            let mut state = self.shared.state.lock().expect("batch state lock");
            let capacity = state.capacity();
            if state.append(items).is_err() {
                metrics::queue_rejected(&self.shared.labels);
                return Err(Error::QueueFull {
                    model: self.shared.labels.model.clone(),
                    capacity,
                });
            }
            // The texts are queued now: their place moves from reserved to the queue.
            drop(place);
            metrics::queue_depth(&self.shared.labels, state.len());
        }
        self.shared.work.notify_one();
        drop(queue_span);
        let mut outputs = Vec::with_capacity(receivers.len());
        let mut queued = Duration::ZERO;
        for receiver in receivers {
            let (output, waited) = receiver
                .await
                .map_err(|_| Error::Internal("the batcher dropped a request".into()))??;
            outputs.push(output);
            queued = queued.max(waited);
        }
        Ok(Batched { outputs, queued })
    }
}

struct Runner {
    lanes: Lanes,
    bindings: Arc<Bindings>,
    pad_id: i64,
    settings: BatcherSettings,
    shared: Arc<Shared>,
    faults: Arc<FaultTracker>,
}

impl Runner {
    async fn run(self) {
        loop {
            let turn = self.lanes.turn().await;
            let shared = &self.shared;
            let Some(batch) = self.gather(shared).await else {
                return;
            };
            if batch.is_empty() {
                continue;
            }
            let lease = self.lanes.lease(turn, self.queued(shared) == 0).await;
            metrics::batch_lane(&shared.labels, lease.lane().name());
            let bindings = Arc::clone(&self.bindings);
            let pad_id = self.pad_id;
            let labels = shared.labels.clone();
            let faults = Arc::clone(&self.faults);
            let shared = Arc::clone(shared);
            let spans = batch_spans(&batch, &labels);
            // Logs from the run (a failed batch) carry the first request's context.
            let run_span = spans.first().cloned().unwrap_or_else(Span::none);
            let mut batch = batch;
            tokio::spawn(
                async move {
                    let rows: Vec<EncoderRow> = batch
                        .iter_mut()
                        .map(|pending| std::mem::take(&mut pending.row))
                        .collect();
                    metrics::batch_formed(&labels, rows.len(), padded_tokens(&rows));
                    let started = Instant::now();
                    for pending in &mut batch {
                        metrics::queue_time(&labels, started - pending.enqueued);
                        // The row's wait ends here; its request's queue span ends with the last.
                        pending.queue_span = Span::none();
                    }
                    let result = lease
                        .run(move |session| encoder::run(session, &bindings, pad_id, &rows))
                        .await;
                    let took = started.elapsed();
                    metrics::inference_time(&labels, took);
                    shared.clock.lock().expect("clock lock").served(took);
                    deliver(batch, result, started, &labels, &faults);
                    drop(spans);
                }
                .instrument(run_span),
            );
        }
    }

    /// Waits for work, lets the batch gather for at most `max_wait`, then takes it; `None` once
    /// the batcher is closed and its queue is empty.
    async fn gather(&self, shared: &Shared) -> Option<Vec<Pending>> {
        loop {
            let oldest = {
                let mut state = shared.state.lock().expect("batch state lock");
                // Texts whose caller went away (cancelled, deadline passed) are not worth a run.
                state.retain(|pending| !pending.reply.is_closed());
                metrics::queue_depth(&shared.labels, state.len());
                state.front().map(|pending| pending.enqueued)
            };
            match oldest {
                Some(enqueued) => {
                    let deadline = enqueued + self.settings.max_wait;
                    while self.queued(shared) < self.settings.limits.max_batch_size
                        && Instant::now() < deadline
                    {
                        let _ =
                            tokio::time::timeout_at(deadline.into(), shared.work.notified()).await;
                    }
                    let mut state = shared.state.lock().expect("batch state lock");
                    // Spread what waits over the sessions: one session taking the whole queue
                    // while the others idle is slower than each running its share.
                    let share = state.len().div_ceil(self.lanes.parallel()).max(1);
                    let limits = BatchLimits {
                        max_batch_size: self.settings.limits.max_batch_size.min(share),
                        ..self.settings.limits
                    };
                    let batch = state.next_batch(&limits);
                    metrics::queue_depth(&shared.labels, state.len());
                    drop(state);
                    shared.clock.lock().expect("clock lock").departed(
                        batch.iter().map(|queued| queued.item.enqueued),
                        Instant::now(),
                    );
                    return Some(batch.into_iter().map(|queued| queued.item).collect());
                }
                None if shared.closed.load(Ordering::Acquire) => return None,
                None => shared.work.notified().await,
            }
        }
    }

    fn queued(&self, shared: &Shared) -> usize {
        shared.state.lock().expect("batch state lock").len()
    }
}

fn padded_tokens(rows: &[EncoderRow]) -> usize {
    rows.iter().map(|row| row.ids.len()).max().unwrap_or(0) * rows.len()
}

/// Answers each caller of a batch: its row, or the run's failure, which fails this batch alone.
/// One `batch` span per request with rows in the batch, as a child of that request's span: a
/// batch serves many requests, and each request's trace shows the run it waited for.
fn batch_spans(batch: &[Pending], labels: &ModelLabels) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pending in batch {
        // A request without a span (tracing off) gets none; one with rows here gets one.
        let Some(id) = pending.span.id() else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        spans.push(tracing::info_span!(
            parent: &pending.span,
            "batch",
            model = %labels.model,
            version = %labels.version,
            size = batch.len()
        ));
    }
    spans
}

fn deliver(
    batch: Vec<Pending>,
    result: Result<ort::Result<Vec<EncoderRowOutput>>>,
    started: Instant,
    labels: &ModelLabels,
    faults: &FaultTracker,
) {
    let error = match result {
        Ok(Ok(outputs)) => {
            faults.succeeded();
            for (pending, output) in batch.into_iter().zip(outputs) {
                // A caller that went away meanwhile simply does not read its row.
                let _ = pending.reply.send(Ok((output, started - pending.enqueued)));
            }
            return;
        }
        Ok(Err(error)) => format!("onnxruntime: {error}"),
        Err(Error::Internal(reason)) => reason,
        Err(error) => error.to_string(),
    };
    tracing::error!(model = %labels.model, version = %labels.version, %error, "batch run failed");
    faults.failed(&labels.model, &error);
    for pending in batch {
        let _ = pending.reply.send(Err(Error::Internal(error.clone())));
    }
}
