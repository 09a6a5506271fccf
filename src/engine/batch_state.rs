//! The dynamic batcher's queue as a plain data structure: `append` admits a request's texts
//! (all or none), `next_batch` picks the next session run. No I/O, no clocks: tested directly.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    /// Most rows in one run.
    pub max_batch_size: usize,
    /// Most padded tokens (rows × longest row) in one run.
    pub max_batch_tokens: usize,
    /// Padding tolerated, as a share of the real tokens: 0.25 lets a batch hold at most 25%
    /// padding. Mixed lengths then go to separate runs, which is faster than padding them.
    pub max_padding_ratio: f64,
}

/// How many batches' worth of the queue's front a batch may pick its texts from.
const LOOKAHEAD_BATCHES: usize = 1;

/// One queued text.
#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    /// Its length in tokens.
    pub tokens: usize,
    /// Arrival order; the oldest text anchors the next batch, so nothing starves.
    pub sequence: u64,
}

#[derive(Debug)]
pub struct BatchState<T> {
    queue: VecDeque<Queued<T>>,
    capacity: usize,
    next_sequence: u64,
}

impl<T> BatchState<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            capacity,
            next_sequence: 0,
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

    /// Queues all of `items` (each with its token count), or none when they do not fit.
    pub fn append(&mut self, items: Vec<(T, usize)>) -> Result<(), Vec<(T, usize)>> {
        if self.queue.len() + items.len() > self.capacity {
            return Err(items);
        }
        for (item, tokens) in items {
            self.queue.push_back(Queued {
                item,
                tokens,
                sequence: self.next_sequence,
            });
            self.next_sequence += 1;
        }
        Ok(())
    }

    /// The oldest queued text.
    pub fn front(&self) -> Option<&T> {
        self.queue.front().map(|queued| &queued.item)
    }

    /// Drops queued texts nobody waits for any more (their caller went away).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.queue.retain(|queued| keep(&queued.item));
    }

    /// Takes the next batch: the oldest text plus the texts closest to it in length, as many as
    /// the limits allow. Returns an empty batch only when the queue is empty.
    pub fn next_batch(&mut self, limits: &BatchLimits) -> Vec<Queued<T>> {
        let Some(anchor) = self.queue.front() else {
            return Vec::new();
        };
        let anchor_tokens = anchor.tokens;
        // Only the next batch's worth of texts may join: under a steady stream, texts of a common
        // length would otherwise keep overtaking older ones of an odd length, and a request (done
        // when its last text is) would wait far longer than its place in the queue says. With a
        // window twice as wide, requests at six times capacity waited twice what admission by
        // time estimated (the overload benchmark).
        let window = self
            .queue
            .len()
            .min(limits.max_batch_size.max(1) * LOOKAHEAD_BATCHES);
        let mut order: Vec<usize> = (0..window).collect();
        order.sort_by_key(|&i| {
            (
                self.queue[i].tokens.abs_diff(anchor_tokens),
                self.queue[i].sequence,
            )
        });

        let mut chosen = Vec::new();
        let (mut longest, mut real_tokens) = (0_usize, 0_usize);
        for i in order {
            if chosen.len() == limits.max_batch_size.max(1) {
                break;
            }
            let tokens = self.queue[i].tokens.max(1);
            let new_longest = longest.max(tokens);
            let padded = new_longest * (chosen.len() + 1);
            let new_real = real_tokens + tokens;
            let fits_tokens = padded <= limits.max_batch_tokens;
            let fits_padding = padded as f64 <= new_real as f64 * (1.0 + limits.max_padding_ratio);
            // The anchor always goes, even alone over the limits: it must make progress.
            if !chosen.is_empty() && (!fits_tokens || !fits_padding) {
                // Candidates are sorted by distance from the anchor, not by length: a longer one
                // that pads every row too much can be followed by a shorter one that fits.
                continue;
            }
            chosen.push(i);
            longest = new_longest;
            real_tokens = new_real;
        }
        chosen.sort_unstable_by(|a, b| b.cmp(a));
        let mut batch: Vec<Queued<T>> = chosen
            .into_iter()
            .filter_map(|i| self.queue.remove(i))
            .collect();
        batch.sort_by_key(|queued| queued.sequence);
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_batch_size: 4,
        max_batch_tokens: 1000,
        max_padding_ratio: 0.25,
    };

    fn lengths<T>(batch: &[Queued<T>]) -> Vec<usize> {
        batch.iter().map(|queued| queued.tokens).collect()
    }

    #[test]
    fn append_is_all_or_nothing() {
        let mut state = BatchState::new(3);
        assert!(state.append(vec![("a", 1), ("b", 1)]).is_ok());
        let rejected = state.append(vec![("c", 1), ("d", 1)]).unwrap_err();
        assert_eq!(rejected.len(), 2);
        assert_eq!(state.len(), 2);
    }

    #[test]
    fn groups_texts_of_similar_length() {
        let mut state = BatchState::new(100);
        state
            .append(vec![(0, 10), (1, 40), (2, 11), (3, 9), (4, 41), (5, 39)])
            .unwrap();
        assert_eq!(lengths(&state.next_batch(&LIMITS)), vec![10, 11, 9]);
        assert_eq!(lengths(&state.next_batch(&LIMITS)), vec![40, 41, 39]);
        assert!(state.next_batch(&LIMITS).is_empty());
    }

    #[test]
    fn respects_size_and_token_limits() {
        let mut state = BatchState::new(100);
        state.append((0..6).map(|i| (i, 10)).collect()).unwrap();
        assert_eq!(state.next_batch(&LIMITS).len(), 4);
        let tight = BatchLimits {
            max_batch_tokens: 20,
            ..LIMITS
        };
        assert_eq!(state.next_batch(&tight).len(), 2);
    }

    #[test]
    fn a_shorter_text_fits_where_a_longer_one_as_near_did_not() {
        let mut state = BatchState::new(100);
        state
            .append(vec![(0, 10), (1, 10), (2, 10), (3, 10), (4, 15), (5, 5)])
            .unwrap();
        let limits = BatchLimits {
            max_batch_size: 8,
            max_padding_ratio: 0.3,
            ..LIMITS
        };
        // 15 would pad the five rows to 75 tokens for 55 real (over 1.3x); 5 pads to 50 for 45.
        assert_eq!(lengths(&state.next_batch(&limits)), vec![10, 10, 10, 10, 5]);
        assert_eq!(lengths(&state.next_batch(&limits)), vec![15]);
    }

    #[test]
    fn the_oldest_text_always_makes_progress() {
        let mut state = BatchState::new(100);
        state.append(vec![("huge", 5000), ("small", 3)]).unwrap();
        let batch = state.next_batch(&LIMITS);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].item, "huge");
    }

    #[test]
    fn batches_keep_arrival_order() {
        let mut state = BatchState::new(100);
        state.append(vec![("a", 10), ("b", 12), ("c", 11)]).unwrap();
        let items: Vec<_> = state
            .next_batch(&LIMITS)
            .into_iter()
            .map(|q| q.item)
            .collect();
        assert_eq!(items, vec!["a", "b", "c"]);
    }

    #[test]
    fn texts_far_back_in_the_queue_do_not_overtake() {
        let mut state = BatchState::new(1000);
        // An odd-length text at the front, then many of a common length.
        let mut items = vec![("odd", 50)];
        items.extend((0..100).map(|_| ("common", 10)));
        state.append(items).unwrap();
        state.append(vec![("late twin", 50)]).unwrap();
        // The late text of the front's length is beyond the lookahead: it waits its turn.
        let first = state.next_batch(&LIMITS);
        assert_eq!(first[0].item, "odd");
        assert!(first.iter().all(|queued| queued.item != "late twin"));
    }

    #[test]
    fn retain_drops_abandoned_texts() {
        let mut state = BatchState::new(100);
        state.append(vec![(1, 10), (2, 10), (3, 10)]).unwrap();
        state.retain(|item| *item != 2);
        assert_eq!(state.len(), 2);
    }
}
