//! Requests a client stops sending halfway through a message. The server buffers a gRPC
//! message until it is whole and widens the client's HTTP/2 window as it buffers, so a client
//! that sends most of a message and then nothing more would have the server hold up to the
//! service's message limit (17 MiB for inference) on each of its streams for as long as the
//! connection lives. A request body that has been in the middle of a message, with nothing new,
//! for `server.request_stall_timeout_ms` ends the call DEADLINE_EXCEEDED and frees what was
//! buffered. A unary call's client owes its one message and the end of its stream from the
//! start (tonic waits for that end before the handler runs), so any wait on it counts; a
//! stream of requests idle between messages is not stalled: its client has nothing to send.
//!
//! A request can also wait on the connection's receive window, which a stream whose requests
//! are not being read (EmbedStream holds 8 in flight) may have filled; that wait ends with the
//! stream's next read, long before the timeout unless the server is stuck.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::{Instant, Sleep};
use tonic::Status;

/// The bytes of a gRPC message header: a compression flag and a 4-byte length.
const HEADER_BYTES: usize = 5;

/// `body`, the request of a call to `path`, failing once it has kept the call waiting for
/// `timeout` (zero: never).
pub fn guard(path: &str, body: tonic::body::Body, timeout: Duration) -> tonic::body::Body {
    if timeout.is_zero() {
        return body;
    }
    tonic::body::Body::new(HalfSent {
        inner: body,
        timeout,
        unary: !streaming_requests().contains(path),
        framing: Framing::default(),
        stalled: None,
        armed: false,
    })
}

/// The paths of the methods whose client sends a stream of requests.
fn streaming_requests() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        super::declared_methods()
            .into_iter()
            .filter_map(|(path, streaming)| streaming.then_some(path))
            .collect()
    })
}

struct HalfSent<B> {
    inner: B,
    timeout: Duration,
    /// One request message: every wait is on the client.
    unary: bool,
    framing: Framing,
    /// Made the first time the body waits mid-message, then reset for each later wait.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Whether `stalled` counts the current wait.
    armed: bool,
}

impl<B> Body for HalfSent<B>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.framing.feed(data);
                }
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending if this.unary || this.framing.mid_message() => {
                // The clock is read once a wait, not at every poll within it.
                if !std::mem::replace(&mut this.armed, true) {
                    let deadline = Instant::now() + this.timeout;
                    match &mut this.stalled {
                        Some(stalled) => stalled.as_mut().reset(deadline),
                        None => this.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let stalled = this.stalled.as_mut().expect("armed above");
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "nothing more of the request arrived for {} ms \
                         (server.request_stall_timeout_ms); {} was still to come",
                        this.timeout.as_millis(),
                        this.framing.still_to_come()
                    ))))),
                    Poll::Pending => Poll::Pending,
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Where a body is in gRPC's framing: within a message's header, within its payload, or
/// between messages.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; HEADER_BYTES],
    header_read: usize,
    payload_left: u64,
    /// Whole messages so far.
    messages: u64,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let taken = data.len().min(self.payload_left as usize);
                self.payload_left -= taken as u64;
                data = &data[taken..];
                if self.payload_left == 0 {
                    self.messages += 1;
                }
                continue;
            }
            let taken = data.len().min(HEADER_BYTES - self.header_read);
            self.header[self.header_read..self.header_read + taken].copy_from_slice(&data[..taken]);
            self.header_read += taken;
            data = &data[taken..];
            if self.header_read == HEADER_BYTES {
                let length = &self.header[1..];
                self.payload_left =
                    u32::from_be_bytes([length[0], length[1], length[2], length[3]]).into();
                self.header_read = 0;
                if self.payload_left == 0 {
                    self.messages += 1;
                }
            }
        }
    }

    fn mid_message(&self) -> bool {
        self.header_read > 0 || self.payload_left > 0
    }

    /// What the body owes, for a call stalled waiting on it.
    fn still_to_come(&self) -> String {
        if self.payload_left > 0 {
            format!("{} bytes of a message", self.payload_left)
        } else if self.header_read > 0 {
            "the rest of a message's 5-byte header".to_owned()
        } else if self.messages == 0 {
            "its message".to_owned()
        } else {
            "the end of its stream".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(payload);
        framed
    }

    #[test]
    fn streams_of_requests_are_known_from_the_descriptors() {
        let streams = streaming_requests();
        assert!(streams.contains("/lmserve.v1.Inference/EmbedStream"));
        assert!(streams.contains("/inference.GRPCInferenceService/ModelStreamInfer"));
        // A server stream whose client sends one request.
        assert!(!streams.contains("/lmserve.v1.Inference/GenerateStream"));
        assert!(!streams.contains("/lmserve.v1.Inference/Embed"));
    }

    #[test]
    fn framing_knows_when_a_message_is_whole_however_the_bytes_arrive() {
        let two = [message(b"hello"), message(b""), message(&[9; 300])].concat();
        for piece in [1, 2, 4, 5, 6, 7, 64, two.len()] {
            let mut framing = Framing::default();
            let mut ends = Vec::new();
            for chunk in two.chunks(piece) {
                framing.feed(chunk);
                ends.push(framing.mid_message());
            }
            assert!(!framing.mid_message(), "pieces of {piece}");
            if piece == 1 {
                // Mid-message after the first byte, and whole after the tenth (5 + "hello").
                assert!(ends[0]);
                assert!(!ends[9]);
            }
        }
        let mut framing = Framing::default();
        assert_eq!(framing.still_to_come(), "its message");
        framing.feed(&message(&[1; 100])[..40]);
        assert_eq!(framing.still_to_come(), "65 bytes of a message");
        framing.feed(&[0; 65]);
        assert_eq!(framing.still_to_come(), "the end of its stream");
        framing.feed(&[0, 0]);
        assert_eq!(
            framing.still_to_come(),
            "the rest of a message's 5-byte header"
        );
    }
}
