//! Admission by time. A model's queue drains at some rate; a new request waits, roughly, for
//! the items ahead of it to drain. A request that would wait past its deadline, or past the
//! server's `max_queue_time_ms`, is refused at once — before it is tokenized — with how long
//! to back off, instead of waiting in a queue it cannot leave in time. The estimator is plain
//! data with an injected clock, tested directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How far back the drain rate looks.
const WINDOW: Duration = Duration::from_secs(2);
/// Fewer departures than this in the window say too little to refuse anyone on.
const MIN_DEPARTURES: usize = 4;
/// The least busy time a rate is measured over, so a burst does not read as an infinite rate.
const MIN_SPAN: Duration = Duration::from_millis(50);

/// Items that left the queue for a run, with when: the queue's recent drain rate.
///
/// The rate is measured over the time the queue held work, not over the wall clock: a quiet
/// spell before a burst is a queue with nothing to drain, not a slow one. Measured over the
/// wall clock, a burst of 32 one-text requests a second or two after all-MiniLM-L6-v2's
/// previous request had 18-25 of them refused as due to wait over 2 s, on a model that
/// drains about 400 texts a second.
#[derive(Debug, Default)]
pub struct DrainRate {
    /// When each departure happened, how many items left, and for how long the queue had been
    /// waiting on it.
    departures: VecDeque<Departure>,
}

#[derive(Debug, Clone, Copy)]
struct Departure {
    at: Instant,
    items: usize,
    busy: Duration,
}

impl DrainRate {
    /// `count` items left at `now`; the oldest of them had waited since `waiting_since`. The
    /// queue was busy since then, or since the previous departure if that is later.
    pub fn departed(&mut self, count: usize, waiting_since: Instant, now: Instant) {
        if count == 0 {
            return;
        }
        let busy_since = match self.departures.back() {
            Some(previous) => waiting_since.max(previous.at),
            None => waiting_since,
        };
        self.departures.push_back(Departure {
            at: now,
            items: count,
            busy: now.saturating_duration_since(busy_since),
        });
        while let Some(oldest) = self.departures.front() {
            if now.duration_since(oldest.at) <= WINDOW {
                break;
            }
            self.departures.pop_front();
        }
    }

    /// Items per second over the window's busy time; `None` until enough left to tell.
    /// `waiting_since`, the oldest waiting item's arrival, keeps the time since the last
    /// departure in the count while items wait: a queue that has stopped draining reads slower
    /// the longer it stays stuck. Once its oldest item has waited longer than the window, too
    /// few departures are no longer "too little to tell": the queue drained at most one item
    /// over that time, and saying `None` there would admit everyone as if the model were idle.
    pub fn per_second(&self, waiting_since: Option<Instant>, now: Instant) -> Option<f64> {
        let (mut count, mut busy) = (0, Duration::ZERO);
        for departure in self
            .departures
            .iter()
            .filter(|departure| now.duration_since(departure.at) <= WINDOW)
        {
            count += departure.items;
            busy += departure.busy;
        }
        let stuck =
            waiting_since.is_some_and(|since| now.saturating_duration_since(since) > WINDOW);
        if count < MIN_DEPARTURES && !stuck {
            return None;
        }
        if let Some(waiting_since) = waiting_since {
            let last = self.departures.back().map_or(waiting_since, |last| last.at);
            busy += now.saturating_duration_since(waiting_since.max(last));
        }
        Some(count.max(1) as f64 / busy.max(MIN_SPAN).as_secs_f64())
    }
}

/// What waits in a queue when a request asks to join it.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    /// Items queued or admitted to queue.
    pub items: usize,
    /// When the oldest queued item arrived; `None` while the queue is empty.
    pub waiting_since: Option<Instant>,
}

/// A moving average of how long a unit of work (a batch run, a decode step) takes, so that the
/// wait a request may afford leaves room for its own work before its deadline.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServiceTime {
    seconds: Option<f64>,
}

impl ServiceTime {
    /// Weight of the newest measure.
    const ALPHA: f64 = 0.2;

    pub fn record(&mut self, took: Duration) {
        let took = took.as_secs_f64();
        self.seconds = Some(match self.seconds {
            Some(average) => average + Self::ALPHA * (took - average),
            None => took,
        });
    }

    /// `units` of work at the average time; nothing while there is no measure.
    pub fn of(&self, units: usize) -> Duration {
        Duration::from_secs_f64(self.seconds.unwrap_or(0.0) * units as f64)
    }
}

/// A request's place from its admission until it joins the queue (tokenization happens in
/// between). Places held count as queued when the next request is admitted: otherwise a burst
/// admitted at once would each see the queue as short as it was. Given back when dropped, so a
/// request that fails or is cancelled before it queues cannot keep its place.
#[derive(Debug)]
pub struct Reservation {
    held: Arc<AtomicUsize>,
    items: usize,
}

impl Reservation {
    /// Takes `items` places from `held`.
    pub fn take(held: &Arc<AtomicUsize>, items: usize) -> Self {
        held.fetch_add(items, Ordering::AcqRel);
        Self {
            held: Arc::clone(held),
            items,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.held.fetch_sub(self.items, Ordering::AcqRel);
    }
}

/// One queue's clock: how fast it drains, and how long a unit of its work takes.
#[derive(Debug, Default)]
pub struct QueueClock {
    drain: DrainRate,
    service: ServiceTime,
}

impl QueueClock {
    /// Items that had queued at `arrivals` left the queue for a run at `now`.
    pub fn departed(&mut self, arrivals: impl IntoIterator<Item = Instant>, now: Instant) {
        let (count, oldest) = arrivals
            .into_iter()
            .fold((0, now), |(count, oldest), at| (count + 1, oldest.min(at)));
        self.drain.departed(count, oldest, now);
    }

    /// A unit of work (a batch run, a decode step) took `took`.
    pub fn served(&mut self, took: Duration) {
        self.service.record(took);
    }

    /// Whether `items` more, whose own work takes `units` units, may queue behind `backlog`
    /// and still start within `max_queue_time` and in time to finish by `deadline`.
    pub fn admit(
        &self,
        backlog: Backlog,
        items: usize,
        units: usize,
        deadline: Option<Instant>,
        max_queue_time: Duration,
        now: Instant,
    ) -> Result<(), Refusal> {
        let allowed = allowed_wait(max_queue_time, deadline, self.service.of(units), now);
        let rate = self.drain.per_second(backlog.waiting_since, now);
        admit(backlog.items, items, rate, allowed)
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

/// The share of its remaining deadline a request's wait and work may take. The estimates are
/// averages: a queue kept at the very edge of its callers' deadlines makes half of them miss,
/// while a shorter queue keeps the model just as busy.
const DEADLINE_SHARE: f64 = 0.5;

/// The longest a request may wait in a queue: the server's maximum, or less when its deadline
/// is nearer, after the time its own work will take (`service`).
pub fn allowed_wait(
    max_queue_time: Duration,
    deadline: Option<Instant>,
    service: Duration,
    now: Instant,
) -> Duration {
    match deadline {
        Some(deadline) => {
            let share = deadline
                .saturating_duration_since(now)
                .mul_f64(DEADLINE_SHARE);
            max_queue_time.min(share.saturating_sub(service))
        }
        None => max_queue_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_what_drained_over_the_recent_busy_span() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = DrainRate::default();
        assert_eq!(rate.per_second(None, start), None);
        // A backlog: 10 items every 100 ms, each waiting since before the previous departure.
        for step in 0..10 {
            rate.departed(10, start, at(100 * step + 100));
        }
        let measured = rate.per_second(None, at(1000)).unwrap();
        assert!((measured - 100.0).abs() < 1.0, "{measured}");
        // Departures older than the window are forgotten.
        rate.departed(1, at(10_000), at(10_000));
        assert_eq!(rate.per_second(None, at(10_000)), None);
    }

    #[test]
    fn a_quiet_spell_before_a_burst_is_not_a_slow_drain() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = DrainRate::default();
        // One lone request, then nothing for 1.8 s.
        rate.departed(1, at(0), at(1));
        // A burst arrives at 1800 ms and drains in batches of 16 every 40 ms: 400 a second.
        for batch in 1..=3 {
            rate.departed(16, at(1800), at(1800 + 40 * batch));
        }
        let measured = rate.per_second(None, at(1920)).unwrap();
        // Counting the quiet spell would say 49 items in 1.9 s: 26 a second.
        assert!(measured > 350.0, "{measured}");
        // A wait estimated on it admits what the model can serve in time.
        assert!(admit(32, 1, Some(measured), Duration::from_millis(200)).is_ok());
    }

    #[test]
    fn a_queue_that_stops_draining_reads_slower_while_items_wait() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = DrainRate::default();
        for step in 1..=4 {
            rate.departed(10, start, at(100 * step));
        }
        // 40 items in 400 ms; then nothing leaves for 400 ms while items wait.
        let draining = rate.per_second(Some(at(350)), at(400)).unwrap();
        let stuck = rate.per_second(Some(at(350)), at(800)).unwrap();
        assert!((draining - 100.0).abs() < 1.0, "{draining}");
        assert!((stuck - 50.0).abs() < 1.0, "{stuck}");
        // With nothing waiting, the pause is idleness and costs the rate nothing.
        assert!((rate.per_second(None, at(800)).unwrap() - 100.0).abs() < 1.0);
    }

    #[test]
    fn a_queue_stuck_past_the_window_still_refuses() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut clock = QueueClock::default();
        for step in 1..=4 {
            clock.departed([start; 10], at(100 * step));
        }
        let backlog = Backlog {
            items: 500,
            waiting_since: Some(at(350)),
        };
        let max_queue_time = Duration::from_secs(2);
        assert!(
            clock
                .admit(backlog, 1, 1, None, max_queue_time, at(800))
                .is_err()
        );
        // 3 s later nothing has left, and the departures have aged out of the window: the
        // queue has drained at most one item in the 3 s its oldest has waited.
        let refusal = clock
            .admit(backlog, 1, 1, None, max_queue_time, at(3400))
            .unwrap_err();
        assert!(refusal.estimated > Duration::from_secs(1000), "{refusal:?}");
        // A model that has never run anything, with a first request waiting 1 s: no measure.
        let fresh = QueueClock::default();
        let waiting = Backlog {
            items: 3,
            waiting_since: Some(at(0)),
        };
        assert!(
            fresh
                .admit(waiting, 1, 1, None, max_queue_time, at(1000))
                .is_ok()
        );
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
        let none = Duration::ZERO;
        assert_eq!(allowed_wait(max, None, none, now), max);
        // Half the deadline, for the estimates' spread...
        assert_eq!(
            allowed_wait(max, Some(now + Duration::from_secs(2)), none, now),
            Duration::from_secs(1)
        );
        // ...less the request's own work.
        assert_eq!(
            allowed_wait(
                max,
                Some(now + Duration::from_secs(2)),
                Duration::from_millis(300),
                now
            ),
            Duration::from_millis(700)
        );
        assert_eq!(
            allowed_wait(max, Some(now - Duration::from_secs(1)), none, now),
            Duration::ZERO
        );
    }

    #[test]
    fn a_reservation_holds_its_places_until_dropped() {
        let held = Arc::new(AtomicUsize::new(0));
        let first = Reservation::take(&held, 3);
        let second = Reservation::take(&held, 2);
        assert_eq!(held.load(Ordering::Acquire), 5);
        drop(first);
        assert_eq!(held.load(Ordering::Acquire), 2);
        drop(second);
        assert_eq!(held.load(Ordering::Acquire), 0);
    }

    #[test]
    fn service_time_follows_recent_measures() {
        let mut service = ServiceTime::default();
        assert_eq!(service.of(10), Duration::ZERO);
        service.record(Duration::from_millis(10));
        assert_eq!(service.of(3), Duration::from_millis(30));
        for _ in 0..50 {
            service.record(Duration::from_millis(20));
        }
        assert!((service.of(1).as_secs_f64() - 0.020).abs() < 1e-4);
    }
}
