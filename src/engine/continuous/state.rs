//! The continuous batcher's admission queue as plain data: which waiting sequences may join
//! the running batch, given its size and the tokens it holds. No I/O, tested directly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContinuousLimits {
    /// Most sequences decoded together.
    pub max_batch_size: usize,
    /// Most tokens (prompt plus the most each may generate) in flight together.
    pub max_total_tokens: usize,
    /// Most sequences admitted in one prefill, so a burst of arrivals does not stall the
    /// running sequences for long.
    pub max_prefill_batch: usize,
    /// How long the running sequences may go without a token while prompts that arrived in the
    /// meantime are prefilled first; past it they step before the next prefill.
    pub max_decode_stall: Duration,
}

/// A sequence waiting to start.
#[derive(Debug)]
pub struct Waiting<T> {
    pub job: T,
    /// The most batch rows it holds at once (its beams).
    pub rows: usize,
    /// Prompt tokens plus the most it may generate: what it can hold at its longest.
    pub reserved_tokens: usize,
    /// When it joined the queue.
    pub queued_at: Instant,
}

#[derive(Debug)]
pub struct AdmissionQueue<T> {
    queue: VecDeque<Waiting<T>>,
    capacity: usize,
}

impl<T> AdmissionQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// When the sequence that has waited longest joined the queue.
    pub fn oldest_queued_at(&self) -> Option<Instant> {
        self.queue.front().map(|waiting| waiting.queued_at)
    }

    /// Queues a request's sequences (all of them, or none when the queue is full).
    pub fn append(&mut self, items: Vec<Waiting<T>>) -> Result<(), Vec<Waiting<T>>> {
        if self.queue.len() + items.len() > self.capacity {
            return Err(items);
        }
        self.queue.extend(items);
        Ok(())
    }

    /// Drops waiting sequences nobody wants any more; returns them so they can be told.
    pub fn remove_where(&mut self, mut abandoned: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut removed = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for waiting in self.queue.drain(..) {
            if abandoned(&waiting.job) {
                removed.push(waiting.job);
            } else {
                kept.push_back(waiting);
            }
        }
        self.queue = kept;
        removed
    }

    /// Takes the sequences that may join a batch of `running` rows holding `running_tokens`,
    /// first come first served: the queue's head is never overtaken, so nothing starves.
    pub fn admit(
        &mut self,
        running: usize,
        running_tokens: usize,
        limits: &ContinuousLimits,
    ) -> Vec<Waiting<T>> {
        let mut admitted = Vec::new();
        let (mut rows, mut tokens) = (running, running_tokens);
        while let Some(head) = self.queue.front() {
            // An empty batch takes the head whatever its beam count, so it can make progress.
            let fits_rows = rows + head.rows <= limits.max_batch_size.max(1) || rows == 0;
            // An empty batch always takes one sequence, however long, so it can make progress.
            let fits_tokens = tokens + head.reserved_tokens <= limits.max_total_tokens || rows == 0;
            if !fits_rows || !fits_tokens || admitted.len() >= limits.max_prefill_batch.max(1) {
                break;
            }
            rows += head.rows;
            tokens += head.reserved_tokens;
            admitted.push(self.queue.pop_front().expect("head exists"));
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ContinuousLimits = ContinuousLimits {
        max_batch_size: 3,
        max_total_tokens: 100,
        max_prefill_batch: 8,
        max_decode_stall: Duration::ZERO,
    };

    fn waiting(job: u32, reserved_tokens: usize) -> Waiting<u32> {
        Waiting {
            job,
            rows: 1,
            reserved_tokens,
            queued_at: Instant::now(),
        }
    }

    fn jobs(admitted: Vec<Waiting<u32>>) -> Vec<u32> {
        admitted.into_iter().map(|w| w.job).collect()
    }

    #[test]
    fn admits_up_to_the_batch_size() {
        let mut queue = AdmissionQueue::new(10);
        queue
            .append((0..5).map(|i| waiting(i, 10)).collect())
            .unwrap();
        assert_eq!(jobs(queue.admit(1, 10, &LIMITS)), vec![0, 1]);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn admits_within_the_token_budget_in_order() {
        let mut queue = AdmissionQueue::new(10);
        queue
            .append(vec![waiting(0, 60), waiting(1, 50), waiting(2, 10)])
            .unwrap();
        // 60 fits, then 50 does not; 10 would, but it may not overtake the head.
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![0]);
        assert_eq!(jobs(queue.admit(1, 60, &LIMITS)), Vec::<u32>::new());
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![1, 2]);
    }

    #[test]
    fn beams_count_as_rows_against_the_batch_size() {
        let mut queue = AdmissionQueue::new(10);
        let beams = |job, rows| Waiting {
            job,
            rows,
            reserved_tokens: 1,
            queued_at: Instant::now(),
        };
        queue
            .append(vec![beams(0, 2), beams(1, 2), beams(2, 1)])
            .unwrap();
        // Two rows run: a two-beam search fits the batch of three only alone.
        assert_eq!(jobs(queue.admit(1, 0, &LIMITS)), vec![0]);
        assert_eq!(jobs(queue.admit(3, 0, &LIMITS)), Vec::<u32>::new());
        // An empty batch takes a search wider than the batch size rather than stall.
        queue.append(vec![beams(3, 5)]).unwrap();
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![1, 2]);
        assert_eq!(jobs(queue.admit(1, 0, &LIMITS)), Vec::<u32>::new());
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![3]);
    }

    #[test]
    fn an_empty_batch_takes_even_an_oversized_sequence() {
        let mut queue = AdmissionQueue::new(10);
        queue.append(vec![waiting(0, 500)]).unwrap();
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![0]);
    }

    #[test]
    fn full_queues_refuse_whole_requests() {
        let mut queue = AdmissionQueue::new(2);
        assert!(
            queue
                .append(vec![waiting(0, 1), waiting(1, 1), waiting(2, 1)])
                .is_err()
        );
        assert!(queue.is_empty());
    }

    #[test]
    fn abandoned_sequences_leave_the_queue() {
        let mut queue = AdmissionQueue::new(10);
        queue
            .append(vec![waiting(0, 1), waiting(1, 1), waiting(2, 1)])
            .unwrap();
        assert_eq!(queue.remove_where(|job| *job == 1), vec![1]);
        assert_eq!(jobs(queue.admit(0, 0, &LIMITS)), vec![0, 2]);
    }
}
