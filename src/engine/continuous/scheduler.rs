//! The scheduler: a handle that queues sequences, and a loop on its own thread that admits,
//! prefills, steps and retires them. The per-sequence policy (sampling, stop conditions,
//! streaming to the caller) lives behind `SequenceDriver`, so this file only schedules.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::kv_budget::KvBudget;
use super::state::{AdmissionQueue, ContinuousLimits, Waiting};
use crate::config::CpuList;
use crate::engine::FaultTracker;
use crate::engine::admission::{Backlog, QueueClock, Reservation};
use crate::error::{Error, Result};
use crate::runtime::placement;
use crate::runtime::session::panic_message;
use crate::runtime::step::{RowBatch, RunError, SharedRunError, StepDecoder};
use crate::telemetry::metrics::{self, DecodeLoopMetrics, ModelLabels};

/// What the driver chose at one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The sequence's one row goes on with `token`, or ends with it (`finished`: it is not fed
    /// to the model).
    Token { token: i64, finished: bool },
    /// A beam search's rows for the next step: each continues row `parent` of this sequence
    /// with `token`; a row may go on more than once, or not at all. Empty: the search is over.
    Beams(Vec<(usize, i64)>),
}

/// Why a sequence left before it finished.
#[derive(Debug, Clone)]
pub enum StopCause {
    Cancelled,
    /// A run of the model failed; every sequence in it ends with the same error.
    Failed(SharedRunError),
}

/// One sequence's policy, called on the scheduler thread: it must not block.
pub trait SequenceDriver: Send {
    /// The sequence left the queue and its prompt is about to run.
    fn started(&mut self);
    /// Chooses what comes next from the logits of each of this sequence's rows: one row, or
    /// one per live beam.
    fn next(&mut self, logits: &[Vec<f32>]) -> Decision;
    /// The caller went away (cancelled, disconnected, deadline passed).
    fn abandoned(&self) -> bool;
    /// The sequence was dropped before it finished.
    fn stopped(&mut self, cause: StopCause);
}

pub struct GenerationJob {
    pub prompt: Vec<i64>,
    /// The most rows the sequence decodes at once: 1, or its beam count.
    pub rows: usize,
    /// Prompt tokens plus the most this sequence may generate, over all its rows.
    pub reserved_tokens: usize,
    pub driver: Box<dyn SequenceDriver>,
}

struct Shared {
    queue: Mutex<AdmissionQueue<GenerationJob>>,
    /// How fast sequences have been leaving the queue, and how long a decode step takes, for
    /// admission by time.
    clock: Mutex<QueueClock>,
    /// Sequences admitted and not yet queued.
    reserved: Arc<AtomicUsize>,
    max_queue_time: Duration,
    wake: Condvar,
    closed: AtomicBool,
    labels: ModelLabels,
    metrics: DecodeLoopMetrics,
    kv: Arc<KvBudget>,
}

/// How one model's scheduler runs: its admission limits, its queue, and where its thread runs.
pub struct SchedulerSettings {
    /// Counts failed runs in a row; shared with the registry, which reports a broken version.
    pub faults: Arc<FaultTracker>,
    pub limits: ContinuousLimits,
    /// Sequences that may wait; beyond it a request is RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// `runtime.decode_cpus`: the CPUs the decode thread moves to, if any.
    pub decode_cpus: Option<CpuList>,
    /// The longest a sequence may wait to start; requests expected to wait longer are refused.
    pub max_queue_time: Duration,
    /// The KV cache's budget; admission holds the tokens in flight to its `budget_tokens`.
    pub kv: Arc<KvBudget>,
}

/// Owns the scheduler thread of one model version; dropping it stops the thread once the
/// sequences in flight are done.
pub struct ContinuousScheduler {
    shared: Arc<Shared>,
}

impl ContinuousScheduler {
    pub fn spawn<D: StepDecoder>(
        decoder: D,
        settings: SchedulerSettings,
        labels: ModelLabels,
    ) -> std::io::Result<Self> {
        let SchedulerSettings {
            faults,
            limits,
            queue_capacity,
            decode_cpus,
            max_queue_time,
            kv,
        } = settings;
        let shared = Arc::new(Shared {
            queue: Mutex::new(AdmissionQueue::new(queue_capacity)),
            clock: Mutex::new(QueueClock::default()),
            reserved: Arc::new(AtomicUsize::new(0)),
            max_queue_time,
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
            metrics: DecodeLoopMetrics::new(&labels),
            labels: labels.clone(),
            kv,
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("decode-{}@{}", labels.model, labels.version))
            .spawn(move || {
                if let Some(cpus) = decode_cpus {
                    pin_decode_thread(&cpus, &thread_shared.labels);
                }
                Loop {
                    batch: decoder.empty(),
                    decoder,
                    limits,
                    faults,
                    shared: thread_shared,
                    active: Vec::new(),
                    last_token: Instant::now(),
                }
                .run()
            })?;
        Ok(Self { shared })
    }

    /// The KV cache's budget, and what the running sequences hold of it.
    pub fn kv_budget(&self) -> &KvBudget {
        &self.shared.kv
    }

    /// Whether `sequences` more may queue: refused at once (RESOURCE_EXHAUSTED) when the queue is
    /// full, or when they would wait past `deadline` or the configured maximum queue time.
    /// Checked before the prompt is tokenized; `submit` checks the capacity again.
    /// Sequences queued or admitted and about to queue: work waiting for a place in the batch.
    pub fn waiting(&self) -> usize {
        let queued = self.shared.queue.lock().expect("queue lock").len();
        queued + self.shared.reserved.load(Ordering::Acquire)
    }

    pub fn admit(
        &self,
        sequences: usize,
        steps: usize,
        deadline: Option<Instant>,
    ) -> Result<Reservation> {
        let now = Instant::now();
        let queue = self.shared.queue.lock().expect("queue lock");
        let queued = queue.len() + self.shared.reserved.load(Ordering::Acquire);
        {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(Error::ShuttingDown);
            }
            if queued + sequences > queue.capacity() {
                metrics::queue_rejected(&self.shared.labels);
                return Err(Error::QueueFull {
                    model: self.shared.labels.model.clone(),
                    capacity: queue.capacity(),
                });
            }
        }
        let backlog = Backlog {
            items: queued,
            waiting_since: queue.oldest_queued_at(),
        };
        let clock = self.shared.clock.lock().expect("clock lock");
        let max_queue_time = self.shared.max_queue_time;
        clock
            .admit(backlog, sequences, steps, deadline, max_queue_time, now)
            .map_err(|refusal| {
                metrics::queue_rejected(&self.shared.labels);
                Error::overloaded(&self.shared.labels.model, refusal)
            })?;
        // Taken under the queue lock, so admissions see each other's places.
        Ok(Reservation::take(&self.shared.reserved, sequences))
    }

    /// Queues every sequence of one request, or none: a full queue is RESOURCE_EXHAUSTED.
    pub fn submit(&self, jobs: Vec<GenerationJob>, place: Reservation) -> Result<()> {
        let now = Instant::now();
        let waiting = jobs
            .into_iter()
            .map(|job| Waiting {
                reserved_tokens: job.reserved_tokens,
                rows: job.rows.max(1),
                queued_at: now,
                job,
            })
            .collect();
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let capacity = queue.capacity();
        if queue.append(waiting).is_err() {
            metrics::queue_rejected(&self.shared.labels);
            return Err(Error::QueueFull {
                model: self.shared.labels.model.clone(),
                capacity,
            });
        }
        // The sequences are queued now: their place moves from reserved to the queue.
        drop(place);
        self.shared.metrics.queue_depth(queue.len());
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// Moves the calling decode thread onto `cpus` (`runtime.decode_cpus`). A failure leaves it where
/// it was, which costs speed, not correctness, so it is logged rather than fatal.
fn pin_decode_thread(cpus: &CpuList, labels: &ModelLabels) {
    let (model, version) = (&labels.model, &labels.version);
    match placement::pin_current_thread(cpus) {
        Ok(()) => tracing::info!(%model, %version, %cpus, "decode thread pinned"),
        Err(error) => {
            tracing::warn!(%model, %version, %cpus, %error, "decode thread left unpinned");
        }
    }
}

impl Drop for ContinuousScheduler {
    fn drop(&mut self) {
        // Under the queue's lock, so the decode thread is either before its check of `closed`
        // or already waiting: stored and notified between the two, the wake-up would be lost
        // and the thread, with its sessions, would wait forever.
        let _queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_all();
    }
}

/// A running sequence: its driver, its token reservation, and how many batch rows it holds
/// (they are consecutive, in the order of `Loop::active`).
struct Active {
    driver: Box<dyn SequenceDriver>,
    reserved_tokens: usize,
    rows: usize,
}

struct Loop<D: StepDecoder> {
    decoder: D,
    limits: ContinuousLimits,
    faults: Arc<FaultTracker>,
    shared: Arc<Shared>,
    batch: D::Batch,
    /// The sequences whose rows `batch` holds, in row order.
    active: Vec<Active>,
    /// When the running rows last got a token (a step, or the prefill that started them).
    last_token: Instant,
}

impl<D: StepDecoder> Loop<D> {
    fn run(mut self) {
        loop {
            let Some(admitted) = self.wait_and_admit() else {
                return;
            };
            // A bug in one step must not take the model's generation down with it: the batch is
            // dropped (its callers see a failed stream) and the loop goes on.
            let step =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.iterate(admitted)));
            if let Err(panic) = step {
                let error = RunError::Panicked(panic_message(&*panic));
                tracing::error!(model = %self.shared.labels.model, version = %self.shared.labels.version, %error, "dropping its batch");
                self.batch = self.decoder.empty();
                let active = std::mem::take(&mut self.active);
                self.fail_all(error, active);
                self.publish_kv_use();
            }
        }
    }

    /// Admits, retires the abandoned, and runs one decode step, unless prompts wait to go first.
    fn iterate(&mut self, admitted: Vec<Waiting<GenerationJob>>) {
        let prefilled = !admitted.is_empty();
        if prefilled {
            let started_batch = self.batch.is_empty();
            self.prefill(admitted);
            if started_batch {
                self.last_token = Instant::now();
            }
        }
        let abandoned = self
            .active
            .iter()
            .map(|active| active.driver.abandoned())
            .collect();
        self.retire(abandoned);
        // Prompts that arrived while that prefill ran are prefilled before the running rows'
        // next step: otherwise a step more stands between them and their first token, and
        // they are prefilled in smaller runs, which cost more per prompt. The running rows wait
        // for their next token meanwhile, until `max_decode_stall` has passed.
        let prefill_next = prefilled
            && self.last_token.elapsed() < self.limits.max_decode_stall
            && self.prompts_waiting();
        if !prefill_next && !self.batch.is_empty() {
            self.step();
            self.last_token = Instant::now();
        }
        self.publish_kv_use();
    }

    fn prompts_waiting(&self) -> bool {
        !self.shared.queue.lock().expect("queue lock").is_empty()
    }

    fn publish_kv_use(&self) {
        let reserved = self
            .active
            .iter()
            .map(|active| active.reserved_tokens)
            .sum();
        self.shared.kv.set_in_use(reserved);
    }

    /// Blocks while there is nothing to do; returns the sequences that may join now, or
    /// `None` once the scheduler is closed and idle.
    fn wait_and_admit(&mut self) -> Option<Vec<Waiting<GenerationJob>>> {
        let mut queue = self.shared.queue.lock().expect("queue lock");
        loop {
            let abandoned = queue.remove_where(|job| job.driver.abandoned());
            if !abandoned.is_empty() {
                self.shared.metrics.queue_depth(queue.len());
            }
            for mut job in abandoned {
                job.driver.stopped(StopCause::Cancelled);
            }
            if !self.batch.is_empty() || !queue.is_empty() {
                break;
            }
            if self.shared.closed.load(Ordering::Acquire) {
                return None;
            }
            queue = self.shared.wake.wait(queue).expect("queue lock");
        }
        let reserved: usize = self
            .active
            .iter()
            .map(|active| active.reserved_tokens)
            .sum();
        let running_rows: usize = self.active.iter().map(|active| active.rows).sum();
        let admitted = queue.admit(running_rows, reserved, &self.limits);
        self.shared.metrics.queue_depth(queue.len());
        drop(queue);
        self.shared.clock.lock().expect("clock lock").departed(
            admitted.iter().map(|waiting| waiting.queued_at),
            Instant::now(),
        );
        Some(admitted)
    }

    fn prefill(&mut self, admitted: Vec<Waiting<GenerationJob>>) {
        let mut prompts = Vec::with_capacity(admitted.len());
        let mut joining = Vec::with_capacity(admitted.len());
        for waiting in admitted {
            let mut job = waiting.job;
            job.driver.started();
            prompts.push(job.prompt);
            joining.push(Active {
                driver: job.driver,
                reserved_tokens: waiting.reserved_tokens,
                rows: 1,
            });
        }
        let started = Instant::now();
        let result = self.decoder.prefill(prompts);
        self.shared.metrics.prefill(started.elapsed());
        let (new_batch, logits) = match result {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(%error, "prefill failed");
                return self.fail_all(error, joining);
            }
        };
        self.faults.succeeded();
        let (new_batch, joining) = match self.advance(new_batch, joining, logits) {
            Ok(advanced) => advanced,
            Err((error, joining)) => return self.fail_all(error, joining),
        };
        let running = std::mem::replace(&mut self.batch, self.decoder.empty());
        match self.decoder.merge(running, new_batch) {
            Ok(batch) => {
                self.batch = batch;
                self.active.extend(joining);
            }
            Err(error) => {
                // The running batch went into the failed merge: its rows have no state left.
                let mut active = std::mem::take(&mut self.active);
                active.extend(joining);
                self.fail_all(error, active);
            }
        }
    }

    fn step(&mut self) {
        let started = Instant::now();
        let result = self.decoder.step(&mut self.batch);
        let took = started.elapsed();
        self.shared.metrics.decode_step(took, self.batch.len());
        self.shared.clock.lock().expect("clock lock").served(took);
        let batch = std::mem::replace(&mut self.batch, self.decoder.empty());
        let active = std::mem::take(&mut self.active);
        let advanced = match result {
            Ok(logits) => {
                self.faults.succeeded();
                self.advance(batch, active, logits)
            }
            Err(error) => {
                tracing::error!(%error, "decode step failed");
                Err((error, active))
            }
        };
        match advanced {
            Ok((batch, active)) => {
                self.batch = batch;
                self.active = active;
            }
            Err((error, active)) => self.fail_all(error, active),
        }
    }

    /// Gives each sequence its rows' logits and arranges the batch as the drivers decided:
    /// finished sequences leave, every row that goes on gets its token, and beams are
    /// reordered. A batch whose rows all go on in place is not copied.
    #[allow(clippy::type_complexity)]
    fn advance(
        &mut self,
        batch: D::Batch,
        active: Vec<Active>,
        logits: Vec<Vec<f32>>,
    ) -> Result<(D::Batch, Vec<Active>), (RunError, Vec<Active>)> {
        let mut keep = Vec::with_capacity(logits.len());
        let mut tokens = Vec::with_capacity(logits.len());
        let mut going_on = Vec::with_capacity(active.len());
        let mut offset = 0;
        for mut sequence in active {
            let rows = &logits[offset..offset + sequence.rows];
            match sequence.driver.next(rows) {
                Decision::Token { token, finished } => {
                    if !finished {
                        keep.push(offset);
                        tokens.push(token);
                        sequence.rows = 1;
                        going_on.push(sequence);
                    }
                }
                Decision::Beams(next) => {
                    if !next.is_empty() {
                        for &(parent, token) in &next {
                            debug_assert!(parent < sequence.rows, "a beam's parent is its own row");
                            keep.push(offset + parent);
                            tokens.push(token);
                        }
                        sequence.rows = next.len();
                        going_on.push(sequence);
                    }
                }
            }
            offset += rows.len();
        }
        let mut batch = match self.decoder.keep(batch, &keep) {
            Ok(batch) => batch,
            Err(error) => return Err((error, going_on)),
        };
        for (row, token) in tokens.into_iter().enumerate() {
            batch.push_token(row, token);
        }
        Ok((batch, going_on))
    }

    /// Removes the sequences flagged in `leaving`, telling their drivers they were cancelled.
    fn retire(&mut self, leaving: Vec<bool>) {
        if !leaving.contains(&true) {
            return;
        }
        let mut keep = Vec::with_capacity(self.batch.len());
        let mut kept = Vec::with_capacity(self.active.len());
        let mut offset = 0;
        for (index, mut active) in std::mem::take(&mut self.active).into_iter().enumerate() {
            let rows = offset..offset + active.rows;
            offset = rows.end;
            if leaving[index] {
                active.driver.stopped(StopCause::Cancelled);
            } else {
                keep.extend(rows);
                kept.push(active);
            }
        }
        let batch = std::mem::replace(&mut self.batch, self.decoder.empty());
        match self.decoder.keep(batch, &keep) {
            Ok(batch) => {
                self.batch = batch;
                self.active = kept;
            }
            Err(error) => self.fail_all(error, kept),
        }
    }

    /// Ends `sequences` with a failure. Each call is one failed run for the fault tracker.
    fn fail_all(&mut self, error: RunError, sequences: Vec<Active>) {
        self.faults
            .failed(&self.shared.labels.model, &error.to_string());
        let error = Arc::new(error);
        for mut active in sequences {
            active.driver.stopped(StopCause::Failed(Arc::clone(&error)));
        }
    }
}
