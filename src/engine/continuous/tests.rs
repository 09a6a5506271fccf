//! The scheduler's loop against a fake decoder, no ONNX file: each row's carried state is the
//! sum of the tokens it has been fed, and the next token is a function of the whole history, so
//! a row whose state went to another row, or a token fed twice or never, shows up as a wrong
//! sequence. Timing varies from run to run; the sequences must not.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::kv_budget::KvBudget;
use super::scheduler::{
    ContinuousScheduler, Decision, GenerationJob, SchedulerSettings, SequenceDriver, StopCause,
};
use super::state::ContinuousLimits;
use crate::engine::FaultTracker;
use crate::runtime::step::{RowBatch, RunError, StepDecoder};
use crate::telemetry::metrics::ModelLabels;

const VOCAB: usize = 50;
/// A token the fake never chooses, for prompts.
const END: i64 = 0;

/// The token the fake model predicts after `history`.
fn next_token(history: &[i64]) -> i64 {
    let mixed = history
        .iter()
        .fold(7_i64, |acc, &token| (acc * 31 + token) % 1_000_003);
    1 + mixed % (VOCAB as i64 - 1)
}

/// What a sequence must generate: `steps` tokens, each from the history before it.
fn expected(prompt: &[i64], steps: usize) -> Vec<i64> {
    let mut history = prompt.to_vec();
    for _ in 0..steps {
        history.push(next_token(&history));
    }
    history[prompt.len()..].to_vec()
}

fn one_hot(token: i64) -> Vec<f32> {
    let mut logits = vec![0.0; VOCAB];
    logits[token as usize] = 1.0;
    logits
}

#[derive(Clone)]
struct FakeRow {
    tokens: Vec<i64>,
    fed: usize,
    /// The carried state: the sum of the tokens fed so far.
    state: i64,
}

struct FakeBatch(Vec<FakeRow>);

impl RowBatch for FakeBatch {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn push_token(&mut self, row: usize, token: i64) {
        self.0[row].tokens.push(token);
    }
}

/// What the scheduler asked of the fake, in the order it ran.
#[derive(Default)]
struct Calls {
    order: Vec<Call>,
}

impl Calls {
    /// The rows of each prefill.
    fn prefills(&self) -> Vec<usize> {
        self.order
            .iter()
            .filter_map(|call| match call {
                Call::Prefill(rows) => Some(*rows),
                Call::Step(_) => None,
            })
            .collect()
    }

    /// The rows of each step.
    fn steps(&self) -> Vec<usize> {
        self.order
            .iter()
            .filter_map(|call| match call {
                Call::Step(rows) => Some(*rows),
                Call::Prefill(_) => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Prefill(usize),
    Step(usize),
}

#[derive(Default)]
struct FakeDecoder {
    calls: Arc<Mutex<Calls>>,
    /// Steps to go before one fails (0: none), and before one panics.
    fail_at_step: Arc<AtomicUsize>,
    panic_at_step: Arc<AtomicUsize>,
    /// How long a step takes, so sequences overlap.
    step_time: Duration,
    /// How long a prefill takes, in milliseconds; the test may change it while the loop runs.
    prefill_millis: Arc<AtomicUsize>,
}

fn countdown(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(1)
        })
        .is_ok_and(|left| left == 1)
}

impl StepDecoder for FakeDecoder {
    type Batch = FakeBatch;

    fn empty(&self) -> FakeBatch {
        FakeBatch(Vec::new())
    }

    fn prefill(&mut self, prompts: Vec<Vec<i64>>) -> Result<(FakeBatch, Vec<Vec<f32>>), RunError> {
        self.calls
            .lock()
            .unwrap()
            .order
            .push(Call::Prefill(prompts.len()));
        let millis = self.prefill_millis.load(Ordering::Acquire) as u64;
        std::thread::sleep(Duration::from_millis(millis));
        let logits = prompts.iter().map(|p| one_hot(next_token(p))).collect();
        let rows = prompts
            .into_iter()
            .map(|tokens| FakeRow {
                fed: tokens.len(),
                state: tokens.iter().sum(),
                tokens,
            })
            .collect();
        Ok((FakeBatch(rows), logits))
    }

    fn step(&mut self, batch: &mut FakeBatch) -> Result<Vec<Vec<f32>>, RunError> {
        self.calls
            .lock()
            .unwrap()
            .order
            .push(Call::Step(batch.len()));
        std::thread::sleep(self.step_time);
        if countdown(&self.fail_at_step) {
            return Err(RunError::MissingOutput("logits".into()));
        }
        if countdown(&self.panic_at_step) {
            panic!("a bug in the step");
        }
        let mut logits = Vec::with_capacity(batch.len());
        for row in &mut batch.0 {
            // The state must be this row's own: the sum of exactly the tokens it was fed.
            let own: i64 = row.tokens[..row.fed].iter().sum();
            assert_eq!(
                row.state, own,
                "a row's carried state belongs to another row"
            );
            assert_eq!(row.fed + 1, row.tokens.len(), "one pending token per row");
            row.state += row.tokens[row.fed];
            row.fed += 1;
            logits.push(one_hot(next_token(&row.tokens)));
        }
        Ok(logits)
    }

    fn keep(&self, batch: FakeBatch, rows: &[usize]) -> Result<FakeBatch, RunError> {
        Ok(FakeBatch(
            rows.iter().map(|&i| batch.0[i].clone()).collect(),
        ))
    }

    fn merge(&self, running: FakeBatch, joining: FakeBatch) -> Result<FakeBatch, RunError> {
        let mut rows = running.0;
        rows.extend(joining.0);
        Ok(FakeBatch(rows))
    }
}

#[test]
fn the_load_time_rehearsal_joins_steps_and_drops_rows_as_serving_does() {
    let mut decoder = FakeDecoder::default();
    let calls = Arc::clone(&decoder.calls);
    // The fake checks at every step that each row has one pending token and its own state.
    crate::runtime::step::rehearse(&mut decoder, 7).unwrap();
    let calls = calls.lock().unwrap();
    assert_eq!(calls.prefills(), vec![2, 1]);
    assert_eq!(calls.steps(), vec![2, 3, 2]);
}

#[derive(Debug)]
enum Outcome {
    Done(Vec<i64>),
    Cancelled(Vec<i64>),
    Failed(String),
}

/// Takes the argmax for `steps` tokens and reports what it got.
struct TestDriver {
    id: usize,
    steps: usize,
    tokens: Vec<i64>,
    /// Set by the test to walk away; `cancel_after` sets it itself after that many tokens.
    abandoned: Arc<AtomicBool>,
    cancel_after: Option<usize>,
    report: Sender<(usize, Outcome)>,
    progress: Sender<(usize, usize)>,
}

impl SequenceDriver for TestDriver {
    fn started(&mut self) {}

    fn next(&mut self, rows: &[Vec<f32>]) -> Decision {
        let logits = rows[0].as_slice();
        let token = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i64)
            .unwrap();
        self.tokens.push(token);
        let _ = self.progress.send((self.id, self.tokens.len()));
        if self.cancel_after == Some(self.tokens.len()) {
            self.abandoned.store(true, Ordering::Release);
        }
        let finished = self.tokens.len() == self.steps;
        if finished {
            let _ = self
                .report
                .send((self.id, Outcome::Done(self.tokens.clone())));
        }
        Decision::Token { token, finished }
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    fn stopped(&mut self, cause: StopCause) {
        let outcome = match cause {
            StopCause::Cancelled => Outcome::Cancelled(self.tokens.clone()),
            StopCause::Failed(error) => Outcome::Failed(error.to_string()),
        };
        let _ = self.report.send((self.id, outcome));
    }
}

struct Harness {
    scheduler: ContinuousScheduler,
    calls: Arc<Mutex<Calls>>,
    fail_at_step: Arc<AtomicUsize>,
    panic_at_step: Arc<AtomicUsize>,
    prefill_millis: Arc<AtomicUsize>,
    faults: Arc<FaultTracker>,
    report: Sender<(usize, Outcome)>,
    outcomes: Receiver<(usize, Outcome)>,
    progress_tx: Sender<(usize, usize)>,
    progress: Receiver<(usize, usize)>,
}

/// The harness's `max_decode_stall`.
const MAX_DECODE_STALL: Duration = Duration::from_millis(150);

fn harness(max_batch_size: usize, step_time: Duration) -> Harness {
    harness_with_kv(max_batch_size, step_time, KvBudget::new(0, 100_000, 0))
}

fn harness_with_kv(max_batch_size: usize, step_time: Duration, kv: KvBudget) -> Harness {
    let decoder = FakeDecoder {
        step_time,
        ..FakeDecoder::default()
    };
    let (calls, fail_at_step, panic_at_step, prefill_millis) = (
        Arc::clone(&decoder.calls),
        Arc::clone(&decoder.fail_at_step),
        Arc::clone(&decoder.panic_at_step),
        Arc::clone(&decoder.prefill_millis),
    );
    let faults = Arc::new(FaultTracker::new(100));
    let settings = SchedulerSettings {
        faults: Arc::clone(&faults),
        limits: ContinuousLimits {
            max_batch_size,
            max_total_tokens: kv.budget_tokens,
            max_prefill_batch: 64,
            max_decode_stall: MAX_DECODE_STALL,
        },
        queue_capacity: 64,
        decode_cpus: None,
        max_queue_time: Duration::from_secs(60),
        kv: Arc::new(kv),
    };
    let labels = ModelLabels {
        model: "fake".into(),
        version: "1".into(),
    };
    let scheduler = ContinuousScheduler::spawn(decoder, settings, labels).unwrap();
    let (report, outcomes) = channel();
    let (progress_tx, progress) = channel();
    Harness {
        scheduler,
        calls,
        fail_at_step,
        panic_at_step,
        prefill_millis,
        faults,
        report,
        outcomes,
        progress_tx,
        progress,
    }
}

impl Harness {
    /// Queues one sequence; returns its cancel switch.
    fn submit(
        &self,
        id: usize,
        prompt: Vec<i64>,
        steps: usize,
        cancel_after: Option<usize>,
    ) -> Arc<AtomicBool> {
        let abandoned = Arc::new(AtomicBool::new(false));
        let driver = TestDriver {
            id,
            steps,
            tokens: Vec::new(),
            abandoned: Arc::clone(&abandoned),
            cancel_after,
            report: self.report.clone(),
            progress: self.progress_tx.clone(),
        };
        let place = self.scheduler.admit(1, steps, None).unwrap();
        let job = GenerationJob {
            rows: 1,
            reserved_tokens: prompt.len() + steps,
            prompt,
            driver: Box::new(driver),
        };
        self.scheduler.submit(vec![job], place).unwrap();
        abandoned
    }

    /// Waits for `count` outcomes, in id order.
    fn outcomes(&self, count: usize) -> Vec<Outcome> {
        let mut got: Vec<(usize, Outcome)> = (0..count)
            .map(|_| {
                self.outcomes
                    .recv_timeout(Duration::from_secs(20))
                    .expect("an outcome")
            })
            .collect();
        got.sort_by_key(|(id, _)| *id);
        got.into_iter().map(|(_, outcome)| outcome).collect()
    }

    /// Waits until the fake has been asked for `count` prefills.
    fn wait_for_prefills(&self, count: usize) {
        for _ in 0..10_000 {
            if self.calls.lock().unwrap().prefills().len() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("prefill {count} never started");
    }

    /// Waits until sequence `id` has `tokens` tokens.
    fn wait_for(&self, id: usize, tokens: usize) {
        loop {
            let (who, count) = self
                .progress
                .recv_timeout(Duration::from_secs(20))
                .expect("progress");
            if who == id && count >= tokens {
                return;
            }
        }
    }
}

fn prompt(seed: i64, len: usize) -> Vec<i64> {
    (0..len as i64)
        .map(|i| END + 1 + (seed * 7 + i * 3) % 40)
        .collect()
}

fn assert_done(outcome: &Outcome, want: &[i64]) {
    match outcome {
        Outcome::Done(tokens) => assert_eq!(tokens, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn sequences_started_together_each_follow_their_own_history() {
    let h = harness(8, Duration::ZERO);
    let specs: Vec<(Vec<i64>, usize)> = (0..5)
        .map(|i| (prompt(i, 2 + i as usize), 3 + 4 * i as usize))
        .collect();
    for (id, (p, steps)) in specs.iter().enumerate() {
        h.submit(id, p.clone(), *steps, None);
    }
    for (outcome, (p, steps)) in h.outcomes(specs.len()).iter().zip(&specs) {
        assert_done(outcome, &expected(p, *steps));
    }
    let calls = h.calls.lock().unwrap();
    // Every step ran every live row at once: at most one step per token of the longest.
    assert!(
        calls.steps().len() <= 3 + 4 * 4,
        "{} steps",
        calls.steps().len()
    );
}

#[test]
fn rows_joining_a_running_batch_and_leaving_it_keep_their_state() {
    let h = harness(8, Duration::from_millis(2));
    let long = prompt(1, 3);
    h.submit(0, long.clone(), 60, None);
    h.wait_for(0, 5);
    let joiners: Vec<(Vec<i64>, usize)> = (2..6)
        .map(|i| (prompt(i, i as usize), 5 * i as usize))
        .collect();
    for (n, (p, steps)) in joiners.iter().enumerate() {
        h.submit(n + 1, p.clone(), *steps, None);
        h.wait_for(0, 8 + 3 * n);
    }
    let outcomes = h.outcomes(1 + joiners.len());
    assert_done(&outcomes[0], &expected(&long, 60));
    for (outcome, (p, steps)) in outcomes[1..].iter().zip(&joiners) {
        assert_done(outcome, &expected(p, *steps));
    }
    let calls = h.calls.lock().unwrap();
    assert!(
        calls.prefills().len() >= 2,
        "the joiners were prefilled while the first ran"
    );
    assert!(
        calls.steps().iter().any(|&rows| rows >= 2),
        "rows decoded together: {:?}",
        calls.steps()
    );
}

#[test]
fn prompts_arriving_during_prefills_go_first_until_the_running_rows_waited_the_stall_limit() {
    let h = harness(8, Duration::from_millis(1));
    let specs: Vec<(Vec<i64>, usize)> = (0..4).map(|i| (prompt(i, 3), 40)).collect();
    h.submit(0, specs[0].0.clone(), 40, None);
    h.wait_for(0, 3);
    // Each of the next three arrives while the one before it is being prefilled. Prefills take
    // 2/3 of the stall limit: the running row waits through two of them, not three.
    h.prefill_millis.store(
        MAX_DECODE_STALL.as_millis() as usize * 2 / 3,
        Ordering::Release,
    );
    for (id, (p, steps)) in specs.iter().enumerate().skip(1) {
        h.submit(id, p.clone(), *steps, None);
        h.wait_for_prefills(id + 1);
    }
    h.prefill_millis.store(0, Ordering::Release);
    for (outcome, (p, steps)) in h.outcomes(specs.len()).iter().zip(&specs) {
        assert_done(outcome, &expected(p, *steps));
    }
    let calls = h.calls.lock().unwrap();
    let second = calls
        .order
        .iter()
        .enumerate()
        .filter(|&(_, &call)| call == Call::Prefill(1))
        .nth(1)
        .map(|(at, _)| at)
        .expect("a second prefill");
    assert_eq!(
        calls.order[second..second + 4],
        [
            Call::Prefill(1),
            Call::Prefill(1),
            Call::Step(3),
            Call::Prefill(1)
        ],
        "{:?}",
        calls.order
    );
}

#[test]
fn admission_never_exceeds_the_batch_size_and_everyone_finishes() {
    let h = harness(2, Duration::from_millis(1));
    let specs: Vec<(Vec<i64>, usize)> = (0..6).map(|i| (prompt(i, 3), 4 + i as usize)).collect();
    for (id, (p, steps)) in specs.iter().enumerate() {
        h.submit(id, p.clone(), *steps, None);
    }
    for (outcome, (p, steps)) in h.outcomes(specs.len()).iter().zip(&specs) {
        assert_done(outcome, &expected(p, *steps));
    }
    let calls = h.calls.lock().unwrap();
    assert!(
        calls.steps().iter().all(|&rows| rows <= 2),
        "{:?}",
        calls.steps()
    );
    assert!(
        calls.prefills().iter().all(|&rows| rows <= 2),
        "{:?}",
        calls.prefills()
    );
}

#[test]
fn the_kv_budget_holds_a_sequence_back_and_reports_what_runs() {
    // 1 MiB at 17,476 bytes a token: 60 tokens, so two sequences of 44 cannot run together.
    let kv = KvBudget::new(17_476, 100_000, 1);
    assert_eq!(kv.budget_tokens, 60);
    let h = harness_with_kv(8, Duration::from_millis(2), kv);
    let (first, second) = (prompt(1, 4), prompt(2, 4));
    h.submit(0, first.clone(), 40, None);
    h.wait_for(0, 5);
    h.submit(1, second.clone(), 40, None);
    h.wait_for(0, 20);
    // The second waits: only the first's prompt and its most tokens are held.
    assert_eq!(h.scheduler.kv_budget().tokens_in_use(), 44);
    let outcomes = h.outcomes(2);
    assert_done(&outcomes[0], &expected(&first, 40));
    assert_done(&outcomes[1], &expected(&second, 40));
    let released = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(2));
        h.scheduler.kv_budget().tokens_in_use() == 0
    });
    assert!(released, "{}", h.scheduler.kv_budget().tokens_in_use());
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_are_unaffected() {
    let h = harness(8, Duration::from_millis(1));
    let specs: Vec<(Vec<i64>, usize)> = (0..3).map(|i| (prompt(i, 4), 30)).collect();
    h.submit(0, specs[0].0.clone(), 30, None);
    h.submit(1, specs[1].0.clone(), 30, Some(6));
    h.submit(2, specs[2].0.clone(), 30, None);
    let outcomes = h.outcomes(3);
    assert_done(&outcomes[0], &expected(&specs[0].0, 30));
    match &outcomes[1] {
        // It may take one more step before the scheduler sees it gone, never more.
        Outcome::Cancelled(tokens) => {
            assert!((6..=7).contains(&tokens.len()), "{tokens:?}");
            assert_eq!(tokens[..], expected(&specs[1].0, tokens.len())[..]);
        }
        other => panic!("expected a cancellation, got {other:?}"),
    }
    assert_done(&outcomes[2], &expected(&specs[2].0, 30));
}

#[test]
fn a_failed_step_fails_its_rows_and_the_scheduler_goes_on() {
    let h = harness(8, Duration::ZERO);
    h.fail_at_step.store(3, Ordering::Release);
    h.submit(0, prompt(0, 3), 10, None);
    h.submit(1, prompt(1, 3), 10, None);
    for outcome in h.outcomes(2) {
        match outcome {
            Outcome::Failed(message) => assert!(message.contains("logits"), "{message}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }
    assert!(
        h.faults.broken().is_none(),
        "one failure does not break a model"
    );
    h.submit(2, prompt(2, 3), 5, None);
    assert_done(&h.outcomes(1)[0], &expected(&prompt(2, 3), 5));
}

#[test]
fn a_panicking_step_drops_its_batch_not_the_scheduler() {
    let h = harness(8, Duration::ZERO);
    h.panic_at_step.store(2, Ordering::Release);
    h.submit(0, prompt(0, 3), 10, None);
    match &h.outcomes(1)[0] {
        Outcome::Failed(message) => assert!(message.contains("panicked"), "{message}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    h.submit(1, prompt(1, 2), 6, None);
    assert_done(&h.outcomes(1)[0], &expected(&prompt(1, 2), 6));
}

/// Holds three beams that swap, copy and drop each other's rows every step, and checks each
/// row's logits come from that beam's own history.
struct ShufflingBeams {
    histories: Vec<Vec<i64>>,
    steps_left: usize,
    report: Sender<(usize, Outcome)>,
}

impl SequenceDriver for ShufflingBeams {
    fn started(&mut self) {}

    fn next(&mut self, rows: &[Vec<f32>]) -> Decision {
        assert_eq!(rows.len(), self.histories.len(), "one row per beam");
        for (row, history) in rows.iter().zip(&self.histories) {
            assert_eq!(
                row,
                &one_hot(next_token(history)),
                "row logits belong to another beam"
            );
        }
        self.steps_left -= 1;
        if self.steps_left == 0 {
            let best = self.histories[0].clone();
            let _ = self.report.send((0, Outcome::Done(best)));
            return Decision::Beams(Vec::new());
        }
        // Parents: the last beam twice (once with its predicted token, once another), then the
        // first; the middle one is dropped.
        let last = self.histories.len() - 1;
        let parents = [last, last, 0];
        let next: Vec<(usize, i64)> = parents
            .iter()
            .enumerate()
            .map(|(i, &parent)| {
                (
                    parent,
                    1 + (next_token(&self.histories[parent]) + i as i64) % 40,
                )
            })
            .collect();
        self.histories = next
            .iter()
            .map(|&(parent, token)| {
                let mut history = self.histories[parent].clone();
                history.push(token);
                history
            })
            .collect();
        Decision::Beams(next)
    }

    fn abandoned(&self) -> bool {
        false
    }

    fn stopped(&mut self, cause: StopCause) {
        let _ = self.report.send((0, Outcome::Failed(format!("{cause:?}"))));
    }
}

#[test]
fn beams_reorder_and_copy_rows_with_their_state() {
    let h = harness(8, Duration::ZERO);
    // A plain sequence runs beside the beams, so their rows move around it.
    h.submit(1, prompt(5, 3), 12, None);
    let start = prompt(9, 4);
    let driver = ShufflingBeams {
        histories: vec![start.clone()],
        steps_left: 10,
        report: h.report.clone(),
    };
    let place = h.scheduler.admit(1, 10, None).unwrap();
    let job = GenerationJob {
        rows: 3,
        reserved_tokens: 3 * (start.len() + 10),
        prompt: start,
        driver: Box::new(driver),
    };
    h.scheduler.submit(vec![job], place).unwrap();
    let outcomes = h.outcomes(2);
    assert!(matches!(outcomes[0], Outcome::Done(_)), "{:?}", outcomes[0]);
    assert_done(&outcomes[1], &expected(&prompt(5, 3), 12));
}
