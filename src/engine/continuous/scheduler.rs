//! The scheduler: a handle that queues sequences, and a loop on its own thread that admits,
//! prefills, steps and retires them. The per-sequence policy (sampling, stop conditions,
//! streaming to the caller) lives behind `SequenceDriver`, so this file only schedules.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::state::{AdmissionQueue, ContinuousLimits, Waiting};
use crate::config::CpuList;
use crate::engine::FaultTracker;
use crate::engine::admission::{QueueClock, Reservation};
use crate::error::{Error, Result};
use crate::runtime::placement;
use crate::runtime::session::panic_message;
use crate::runtime::step::{RowBatch, RunError, SharedRunError, StepDecoder};
use crate::telemetry::metrics::{self, DecodeLoopMetrics, ModelLabels};

/// What the driver chose at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub token: i64,
    /// The sequence ends with this token; it is not fed to the model.
    pub finished: bool,
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
    /// Chooses the next token from this sequence's logits.
    fn next(&mut self, logits: &[f32]) -> Decision;
    /// The caller went away (cancelled, disconnected, deadline passed).
    fn abandoned(&self) -> bool;
    /// The sequence was dropped before it finished.
    fn stopped(&mut self, cause: StopCause);
}

pub struct GenerationJob {
    pub prompt: Vec<i64>,
    /// Prompt tokens plus the most this sequence may generate.
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
                    rows: Vec::new(),
                }
                .run()
            })?;
        Ok(Self { shared })
    }

    /// Whether `sequences` more may queue: refused at once (RESOURCE_EXHAUSTED) when the queue is
    /// full, or when they would wait past `deadline` or the configured maximum queue time.
    /// Checked before the prompt is tokenized; `submit` checks the capacity again.
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
        let clock = self.shared.clock.lock().expect("clock lock");
        let max_queue_time = self.shared.max_queue_time;
        clock
            .admit(queued, sequences, steps, deadline, max_queue_time, now)
            .map_err(|refusal| {
                metrics::queue_rejected(&self.shared.labels);
                Error::overloaded(&self.shared.labels.model, refusal)
            })?;
        // Taken under the queue lock, so admissions see each other's places.
        Ok(Reservation::take(&self.shared.reserved, sequences))
    }

    /// Queues every sequence of one request, or none: a full queue is RESOURCE_EXHAUSTED.
    pub fn submit(&self, jobs: Vec<GenerationJob>, place: Reservation) -> Result<()> {
        let waiting = jobs
            .into_iter()
            .map(|job| Waiting {
                reserved_tokens: job.reserved_tokens,
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
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_all();
    }
}

/// A running sequence: its driver and its token reservation.
struct Active {
    driver: Box<dyn SequenceDriver>,
    reserved_tokens: usize,
}

struct Loop<D: StepDecoder> {
    decoder: D,
    limits: ContinuousLimits,
    faults: Arc<FaultTracker>,
    shared: Arc<Shared>,
    batch: D::Batch,
    /// Row-aligned with `batch`.
    rows: Vec<Active>,
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
                let rows = std::mem::take(&mut self.rows);
                self.fail_all(error, rows);
            }
        }
    }

    /// Admits, retires the abandoned, and runs one decode step.
    fn iterate(&mut self, admitted: Vec<Waiting<GenerationJob>>) {
        if !admitted.is_empty() {
            self.prefill(admitted);
        }
        let abandoned = self
            .rows
            .iter()
            .map(|active| active.driver.abandoned())
            .collect();
        self.retire(abandoned, Some(StopCause::Cancelled));
        if !self.batch.is_empty() {
            self.step();
        }
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
        let reserved: usize = self.rows.iter().map(|active| active.reserved_tokens).sum();
        let admitted = queue.admit(self.rows.len(), reserved, &self.limits);
        self.shared.metrics.queue_depth(queue.len());
        drop(queue);
        let clock = &self.shared.clock;
        clock
            .lock()
            .expect("clock lock")
            .departed(admitted.len(), Instant::now());
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
            });
        }
        let started = Instant::now();
        let result = self.decoder.prefill(prompts);
        self.shared.metrics.prefill(started.elapsed());
        let (mut new_batch, logits) = match result {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(%error, "prefill failed");
                return self.fail_all(error, joining);
            }
        };
        self.faults.succeeded();
        let mut keep = Vec::with_capacity(joining.len());
        for (index, (active, logits)) in joining.iter_mut().zip(&logits).enumerate() {
            let decision = active.driver.next(logits);
            new_batch.push_token(index, decision.token);
            if !decision.finished {
                keep.push(index);
            }
        }
        let joining: Vec<Active> = joining
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, a)| a)
            .collect();
        let new_batch = match self.decoder.keep(new_batch, &keep) {
            Ok(new_batch) => new_batch,
            Err(error) => return self.fail_all(error, joining),
        };
        let running = std::mem::replace(&mut self.batch, self.decoder.empty());
        match self.decoder.merge(running, new_batch) {
            Ok(batch) => {
                self.batch = batch;
                self.rows.extend(joining);
            }
            Err(error) => {
                // The running batch went into the failed concat: its rows have no state left.
                let mut rows = std::mem::take(&mut self.rows);
                rows.extend(joining);
                self.fail_all(error, rows);
            }
        }
    }

    fn step(&mut self) {
        let started = Instant::now();
        let result = self.decoder.step(&mut self.batch);
        let took = started.elapsed();
        self.shared.metrics.decode_step(took, self.rows.len());
        self.shared.clock.lock().expect("clock lock").served(took);
        match result {
            Ok(logits) => {
                self.faults.succeeded();
                let mut finished = vec![false; self.rows.len()];
                for (index, (active, logits)) in self.rows.iter_mut().zip(&logits).enumerate() {
                    let decision = active.driver.next(logits);
                    self.batch.push_token(index, decision.token);
                    finished[index] = decision.finished;
                }
                self.retire(finished, None);
            }
            Err(error) => {
                tracing::error!(%error, "decode step failed");
                let rows = std::mem::take(&mut self.rows);
                self.batch = self.decoder.empty();
                self.fail_all(error, rows);
            }
        }
    }

    /// Removes the rows flagged in `leaving`, telling their drivers `cause` when given.
    fn retire(&mut self, leaving: Vec<bool>, cause: Option<StopCause>) {
        if !leaving.contains(&true) {
            return;
        }
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut kept_rows = Vec::with_capacity(self.rows.len());
        for (index, mut active) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            if leaving[index] {
                if let Some(cause) = &cause {
                    active.driver.stopped(cause.clone());
                }
            } else {
                keep.push(index);
                kept_rows.push(active);
            }
        }
        let batch = std::mem::replace(&mut self.batch, self.decoder.empty());
        match self.decoder.keep(batch, &keep) {
            Ok(batch) => {
                self.batch = batch;
                self.rows = kept_rows;
            }
            Err(error) => self.fail_all(error, kept_rows),
        }
    }

    /// Ends `rows` with a failure. Each call is one failed run for the fault tracker.
    fn fail_all(&mut self, error: RunError, rows: Vec<Active>) {
        self.faults
            .failed(&self.shared.labels.model, &error.to_string());
        let error = Arc::new(error);
        for mut active in rows {
            active.driver.stopped(StopCause::Failed(Arc::clone(&error)));
        }
    }
}
