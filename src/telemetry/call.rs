//! The record of one call in progress: what the domain learns while serving it (model,
//! version, route, arm, queue time, tokens), for the request-log line `api::observe` writes when
//! the call ends. Reached through a task-local set around the call's handler.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the domain learned about one call, for its request-log line.
#[derive(Debug, Default, Clone)]
pub struct CallFields {
    pub model: String,
    pub version: String,
    pub route: String,
    pub arm: String,
    pub queue: Option<Duration>,
    pub input_tokens: usize,
    pub output_tokens: usize,
}

/// The call in progress, shared between the layer and the domain code serving it.
#[derive(Clone, Default)]
pub struct CallRecord(Arc<Mutex<CallFields>>);

tokio::task_local! {
    static CALL: CallRecord;
}

impl CallRecord {
    /// The record of the call whose handler is running on this task; `None` outside a call
    /// (shadow requests, tests calling the domain directly).
    pub fn current() -> Option<Self> {
        CALL.try_with(Clone::clone).ok()
    }

    /// Runs `work` (the call's handler) with this record as the current one.
    pub fn scope<F: Future>(self, work: F) -> impl Future<Output = F::Output> {
        CALL.scope(self, work)
    }

    /// Runs `work` synchronously with this record as the current one (a response body's poll).
    pub fn sync_scope<R>(self, work: impl FnOnce() -> R) -> R {
        CALL.sync_scope(self, work)
    }

    /// Adds a wait in the queue: a call that queued more than once (several tasks, or a
    /// stream's messages) reports its longest.
    pub fn queued(&self, waited: Duration) {
        self.update(|call| call.queue = Some(call.queue.map_or(waited, |q| q.max(waited))));
    }

    pub fn update(&self, change: impl FnOnce(&mut CallFields)) {
        change(&mut self.0.lock().expect("call record lock"));
    }

    pub fn fields(&self) -> CallFields {
        self.0.lock().expect("call record lock").clone()
    }
}
