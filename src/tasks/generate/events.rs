//! The channel a generation's drivers send its events on, counting what the caller has not
//! read. A streaming client that stops reading (its HTTP/2 window closed) would otherwise
//! leave the server generating into an unbounded queue for as long as the connection lives;
//! past `MAX_UNREAD` waiting events a sequence for each of the generation's sequences, a
//! streamed sequence counts as abandoned, and the scheduler drops it as it drops one whose
//! caller left. Sequences collected for a unary answer send their tokens in one go when they
//! finish, so for them only a caller that went away counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::driver::Event;

/// Events per sequence waiting for the caller past which it no longer counts as reading. A
/// client keeping up is a few events behind; one this far behind has stopped.
pub const MAX_UNREAD: usize = 1024;

/// The channel of a generation of `sequences` sequences.
pub fn channel(sequences: usize) -> (EventSender, EventReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let unread = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            sender,
            unread: Arc::clone(&unread),
            limit: MAX_UNREAD * sequences.max(1),
        },
        EventReceiver { receiver, unread },
    )
}

#[derive(Debug, Clone)]
pub struct EventSender {
    sender: UnboundedSender<Event>,
    unread: Arc<AtomicUsize>,
    limit: usize,
}

impl EventSender {
    /// Sends `event`; a caller that went away is noticed through `abandoned`.
    pub fn send(&self, event: Event) {
        // Counted before it can be read, so the count never goes below zero.
        self.unread.fetch_add(1, Ordering::Relaxed);
        if self.sender.send(event).is_err() {
            self.unread.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The caller went away, or stopped reading what is streamed to it.
    pub fn abandoned(&self) -> bool {
        self.gone() || self.unread.load(Ordering::Relaxed) > self.limit
    }

    /// The caller went away.
    pub fn gone(&self) -> bool {
        self.sender.is_closed()
    }
}

#[derive(Debug)]
pub struct EventReceiver {
    receiver: UnboundedReceiver<Event>,
    unread: Arc<AtomicUsize>,
}

impl EventReceiver {
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.receiver.recv().await;
        self.read(event)
    }

    pub fn try_recv(&mut self) -> Option<Event> {
        let event = self.receiver.try_recv().ok();
        self.read(event)
    }

    fn read(&self, event: Option<Event>) -> Option<Event> {
        if event.is_some() {
            self.unread.fetch_sub(1, Ordering::Relaxed);
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Event {
        Event::Started {
            index: 0,
            at: std::time::Instant::now(),
        }
    }

    #[test]
    fn a_caller_that_stops_reading_counts_as_gone() {
        let (sender, mut receiver) = channel(1);
        for _ in 0..MAX_UNREAD {
            sender.send(started());
        }
        assert!(!sender.abandoned(), "at the limit, still reading");
        sender.send(started());
        assert!(sender.abandoned());
        // Reading catches up: no longer abandoned.
        while receiver.try_recv().is_some() {}
        assert!(!sender.abandoned());
        drop(receiver);
        assert!(sender.abandoned());
    }
}
