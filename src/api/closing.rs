//! The signal that ends the streams still open when a shutdown's grace period runs out, so that
//! each ends with a closing message and UNAVAILABLE (retry elsewhere) rather than a cut
//! connection.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::Status;

/// Fired once by the server; every open stream holds a copy.
#[derive(Clone)]
pub struct Closing(watch::Receiver<bool>);

/// The server's end of the signal.
pub struct CloseStreams(watch::Sender<bool>);

pub fn channel() -> (CloseStreams, Closing) {
    let (sender, receiver) = watch::channel(false);
    (CloseStreams(sender), Closing(receiver))
}

impl CloseStreams {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Closing {
    /// A signal that never fires (clients and tests that build services by hand).
    pub fn never() -> Self {
        channel().1
    }

    /// Resolves once the server fires the signal (never, if it is dropped unfired).
    pub async fn fired(&mut self) {
        if self.0.wait_for(|fired| *fired).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The status a stream ends with when the server closes it.
pub fn status() -> Status {
    Status::unavailable("the server is shutting down; retry on another replica")
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `stream` until the server closes streams, then UNAVAILABLE.
pub fn until_closed<T: Send + 'static>(stream: BoxStream<T>, closing: Closing) -> BoxStream<T> {
    Box::pin(futures::stream::unfold(
        Some((stream, closing)),
        |state| async move {
            let (mut stream, mut closing) = state?;
            tokio::select! {
                item = stream.next() => item.map(|item| (item, Some((stream, closing)))),
                () = closing.fired() => Some((Err(status()), None)),
            }
        },
    ))
}
