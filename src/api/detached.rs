//! The work of one message of a client stream, run on its own task. A response stream is only
//! polled while its client reads: hyper stops polling a body whose stream has no flow-control
//! window left. Work polled from that stream would stop halfway, holding the queue places it
//! reserved before tokenizing, for as long as the client kept the connection open. On its own
//! task the work finishes whatever the client does; the stream only picks up its result.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tonic::Status;
use tracing::Instrument;

use crate::telemetry::call::CallRecord;

/// A message's work on its own task. Dropping it (the stream ended or its client went away)
/// aborts the work, which then hands back whatever it held.
pub struct Detached<T>(JoinHandle<T>);

/// Starts `work` on its own task, in the current call's record and span, so that its queue
/// time and tokens reach the call's log line and its spans stay in the call's trace.
pub fn spawn<T, F>(work: F) -> Detached<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let work = work.in_current_span();
    let handle = match CallRecord::current() {
        Some(call) => tokio::spawn(call.scope(work)),
        None => tokio::spawn(work),
    };
    Detached(handle)
}

impl<T> Future for Detached<T> {
    type Output = Result<T, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            joined.map_err(|error| {
                // Not cancelled (only dropping this aborts it), so the work panicked.
                tracing::error!(%error, "a stream message's work failed");
                Status::internal("the server failed while answering this message")
            })
        })
    }
}

impl<T> Drop for Detached<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn the_work_runs_to_its_end_while_nobody_awaits_it() {
        let finished = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&finished);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let detached = spawn(async move {
            tokio::task::yield_now().await;
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(());
            7
        });
        rx.await.unwrap();
        assert!(finished.load(Ordering::SeqCst));
        assert_eq!(detached.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn dropping_it_aborts_the_work() {
        let (never_tx, never_rx) = tokio::sync::oneshot::channel::<()>();
        // Closed when the work is dropped, which only aborting it does.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let detached = spawn(async move {
            let _held = held_tx;
            let _ = never_rx.await;
        });
        tokio::task::yield_now().await;
        drop(detached);
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), held_rx).await;
        assert!(closed.is_ok(), "the work still runs");
        drop(never_tx);
    }

    #[tokio::test]
    async fn a_panic_is_an_internal_status() {
        let detached: Detached<()> = spawn(async { panic!("boom") });
        let status = detached.await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
