//! Admission by time. A model's queue drains at some rate; a new request waits, roughly, for
//! the items ahead of it to drain. A request that would wait past its deadline, or past the
//! server's `max_queue_time_ms`, is refused at once — before it is tokenized — with how long
//! to back off, instead of waiting in a queue it cannot leave in time. The estimator is plain
//! data with an injected clock, tested directly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How far back the drain rate looks.
const WINDOW: Duration = Duration::from_secs(2);
/// Fewer departures than this in the window say too little to refuse anyone on.
const MIN_DEPARTURES: usize = 4;
/// The shortest span a rate is measured over, so a burst does not read as an infinite rate.
const MIN_SPAN: Duration = Duration::from_millis(50);

/// Items that left the queue for a run, with when: the queue's recent drain rate.
#[derive(Debug, Default)]
pub struct DrainRate {
    departures: VecDeque<(Instant, usize)>,
}

impl DrainRate {
    pub fn departed(&mut self, count: usize, now: Instant) {
        if count == 0 {
            return;
        }
        self.departures.push_back((now, count));
        while let Some(&(at, _)) = self.departures.front() {
            if now.duration_since(at) <= WINDOW {
                break;
            }
            self.departures.pop_front();
        }
    }

    /// Items per second over the window's busy span; `None` until enough left to tell.
    pub fn per_second(&self, now: Instant) -> Option<f64> {
        let recent = self
            .departures
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= WINDOW);
        let (mut count, mut oldest) = (0, None);
        for &(at, items) in recent {
            count += items;
            oldest.get_or_insert(at);
        }
        if count < MIN_DEPARTURES {
            return None;
        }
        let span = now.duration_since(oldest?).max(MIN_SPAN);
        Some(count as f64 / span.as_secs_f64())
    }
}

/// Why a request was refused before it queued.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    /// How long it would have waited.
    pub estimated: Duration,
    /// The most it could wait: its remaining deadline, or the server's maximum.
    pub allowed: Duration,
    /// When trying again has a chance: once the queue has drained by the excess.
    pub retry_after: Duration,
}

/// Whether `items` more may queue behind `queued`, draining at `rate`, and still leave the queue
/// within `allowed`.
pub fn admit(
    queued: usize,
    items: usize,
    rate: Option<f64>,
    allowed: Duration,
) -> Result<(), Refusal> {
    let Some(rate) = rate.filter(|rate| *rate > 0.0) else {
        // No measure yet (an idle model): admit, and let the queue's capacity bound the rest.
        return Ok(());
    };
    if queued == 0 {
        return Ok(());
    }
    let estimated = Duration::from_secs_f64((queued + items) as f64 / rate);
    if estimated <= allowed {
        return Ok(());
    }
    Err(Refusal {
        estimated,
        allowed,
        retry_after: estimated - allowed,
    })
}

/// The longest a request may wait in a queue: the server's maximum, or less when its deadline
/// is nearer.
pub fn allowed_wait(max_queue_time: Duration, deadline: Option<Instant>, now: Instant) -> Duration {
    match deadline {
        Some(deadline) => max_queue_time.min(deadline.saturating_duration_since(now)),
        None => max_queue_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_what_drained_over_the_recent_busy_span() {
        let start = Instant::now();
        let mut rate = DrainRate::default();
        assert_eq!(rate.per_second(start), None);
        // 10 items every 100 ms: 100 items per second.
        for step in 0..10 {
            rate.departed(10, start + Duration::from_millis(100 * step));
        }
        let measured = rate
            .per_second(start + Duration::from_millis(1000))
            .unwrap();
        assert!((measured - 100.0).abs() < 1.0, "{measured}");
        // Departures older than the window are forgotten.
        rate.departed(1, start + Duration::from_secs(10));
        assert_eq!(rate.per_second(start + Duration::from_secs(10)), None);
    }

    #[test]
    fn refuses_what_would_wait_too_long_and_says_when_to_retry() {
        // 100 items queued at 100 a second: one second of wait.
        assert!(admit(100, 1, Some(100.0), Duration::from_secs(2)).is_ok());
        let refusal = admit(100, 50, Some(100.0), Duration::from_secs(1)).unwrap_err();
        assert_eq!(refusal.estimated, Duration::from_millis(1500));
        assert_eq!(refusal.retry_after, Duration::from_millis(500));
        // An empty queue, or no measure yet, admits.
        assert!(admit(0, 50, Some(1.0), Duration::ZERO).is_ok());
        assert!(admit(1000, 1, None, Duration::ZERO).is_ok());
    }

    #[test]
    fn the_nearer_of_deadline_and_maximum_bounds_the_wait() {
        let now = Instant::now();
        let max = Duration::from_secs(5);
        assert_eq!(allowed_wait(max, None, now), max);
        assert_eq!(
            allowed_wait(max, Some(now + Duration::from_secs(1)), now),
            Duration::from_secs(1)
        );
        assert_eq!(
            allowed_wait(max, Some(now - Duration::from_secs(1)), now),
            Duration::ZERO
        );
    }
}
