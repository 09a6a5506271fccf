//! A model version's run failures in a row. One failed run fails only its own callers; a version
//! whose runs keep failing is broken, and the registry reports it FAILED with the last reason
//! until it is reloaded.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct FaultTracker {
    /// Failures in a row that break the version; 0 never does.
    limit: usize,
    in_a_row: AtomicUsize,
    broken: Mutex<Option<String>>,
}

impl FaultTracker {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            in_a_row: AtomicUsize::new(0),
            broken: Mutex::new(None),
        }
    }

    pub fn succeeded(&self) {
        self.in_a_row.store(0, Ordering::Relaxed);
    }

    pub fn failed(&self, model: &str, reason: &str) {
        let count = self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if self.limit == 0 || count < self.limit {
            return;
        }
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        if broken.is_none() {
            tracing::error!(%model, failures = count, %reason, "runs keep failing; the version is marked failed until it is reloaded");
            *broken = Some(format!(
                "{count} runs failed in a row (runtime.max_consecutive_failures); the last: {reason}. Reload the model once it is fixed"
            ));
        }
    }

    /// Why the version is broken, once it is.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_in_a_row_break_a_version() {
        let tracker = FaultTracker::new(3);
        tracker.failed("m", "a");
        tracker.failed("m", "b");
        tracker.succeeded();
        tracker.failed("m", "c");
        tracker.failed("m", "d");
        assert_eq!(tracker.broken(), None);
        tracker.failed("m", "e");
        let reason = tracker.broken().unwrap();
        assert!(
            reason.contains("3 runs failed in a row") && reason.contains("the last: e"),
            "{reason}"
        );
        assert!(FaultTracker::new(0).broken().is_none());
    }

    #[test]
    fn a_limit_of_zero_never_breaks() {
        let tracker = FaultTracker::new(0);
        for _ in 0..100 {
            tracker.failed("m", "x");
        }
        assert_eq!(tracker.broken(), None);
    }
}
