//! Responses a client stops reading. hyper takes a response body's next chunk as soon as it
//! asks, then holds it until the client's HTTP/2 window lets it out; a client that never
//! widens its window would have the server hold every answer whole for as long as the
//! connection lives (an Embed of 16,384 texts is megabytes, and a connection has 256 streams).
//!
//! So an answer reaches hyper in copied chunks of at most `CHUNK_BYTES` (a slice would keep the
//! whole encoded message alive), and a body whose last chunk hyper has not come back from
//! within `server.response_stall_timeout_ms` is dropped by a sweep: the rest of its answer, and
//! whatever still feeds it (a stream's requests in flight, a generation), are freed, and the
//! stream is reset if the client reads again (until then it holds one of the connection's
//! stream places). hyper comes back once the client's window has
//! taken the chunk before, so a client taking less than a chunk per timeout is dropped too. A
//! body waiting on the server (a stream between tokens, a health Watch) is not stalled: hyper
//! is waiting on it, not on the client.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame};
use tower::{Layer, Service};

use super::observe::{MAX_METHOD_BYTES, REQUEST_ID_HEADER};
use crate::telemetry::metrics;

/// The most of an answer handed to hyper at a time: one HTTP/2 frame at its default size. For a
/// client whose window is closed, hyper holds one chunk and its connection what is left of the
/// one before, so a dropped answer leaves about twice this behind. (A client that advertises a
/// wide window and then reads nothing from its socket is held to hyper's send buffer, 400 KiB
/// a stream, until the keepalive drops the connection.)
pub const CHUNK_BYTES: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps each response body in an `UnreadBody`; with a timeout of zero, bodies are only chunked.
#[derive(Clone)]
pub struct UnreadLayer {
    watch: Option<Arc<Watch>>,
}

impl UnreadLayer {
    /// Starts the sweep (on the current runtime) when `timeout` is not zero.
    pub fn new(timeout: Duration) -> Self {
        if timeout.is_zero() {
            return Self { watch: None };
        }
        let watch = Arc::new(Watch {
            timeout,
            bodies: Mutex::new(Vec::new()),
        });
        tokio::spawn(sweep(Arc::downgrade(&watch)));
        Self { watch: Some(watch) }
    }
}

impl<S> Layer<S> for UnreadLayer {
    type Service = Unread<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Unread {
            inner,
            watch: self.watch.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Unread<S> {
    inner: S,
    watch: Option<Arc<Watch>>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Unread<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<UnreadBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let uri = request.uri().clone();
        let watch = self.watch.clone();
        let dropped = DroppedUnread::default();
        request.extensions_mut().insert(dropped.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let call = Call {
                uri,
                request_id: response.headers().get(REQUEST_ID_HEADER).cloned(),
                dropped,
            };
            Ok(response.map(|body| UnreadBody::new(body, call, watch.as_deref())))
        })
    }
}

/// The bodies being answered, and how long each may wait on its client.
struct Watch {
    timeout: Duration,
    bodies: Mutex<Vec<Weak<dyn Stallable>>>,
}

/// Drops, every quarter of the timeout (at most a second apart), the bodies whose client has
/// read nothing for the timeout; ends with the server.
async fn sweep(watch: Weak<Watch>) {
    let every = match watch.upgrade() {
        Some(watch) => (watch.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        None => return,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(watch) = watch.upgrade() else {
            return;
        };
        let bodies = std::mem::take(&mut *lock(&watch.bodies));
        let now = Instant::now();
        let waiting: Vec<_> = bodies
            .into_iter()
            .filter(|body| {
                body.upgrade()
                    .is_some_and(|body| !body.drop_if_stalled(now, watch.timeout))
            })
            .collect();
        lock(&watch.bodies).extend(waiting);
    }
}

/// The call a body answers, for the log line when it is dropped.
struct Call {
    uri: Uri,
    request_id: Option<HeaderValue>,
    dropped: DroppedUnread,
}

/// In a request's extensions: set when the sweep drops the call's answer, before the layers
/// inside see their response body dropped, so the request log says the server ended the call
/// rather than that its client left.
#[derive(Clone, Default)]
pub struct DroppedUnread(Arc<AtomicBool>);

impl DroppedUnread {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

trait Stallable: Send + Sync {
    /// Drops the body when its client has read nothing for `timeout`; true when it is done with
    /// (dropped now or before), so the sweep forgets it.
    fn drop_if_stalled(&self, now: Instant, timeout: Duration) -> bool;
}

/// A response body handed to hyper a chunk at a time, which the sweep can drop under it.
pub struct UnreadBody<B> {
    shared: Arc<Shared<B>>,
    end_stream: bool,
}

struct Shared<B> {
    state: Mutex<State<B>>,
    call: Call,
}

struct State<B> {
    /// `None` once dropped for a stalled client.
    body: Option<Pin<Box<B>>>,
    /// What is left of the last data frame after the chunk handed out.
    rest: Bytes,
    /// Since when hyper has held a chunk (or the response) without asking for more; `None`
    /// while hyper waits on the body.
    handed_out: Option<Instant>,
}

impl<B> UnreadBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    fn new(body: B, call: Call, watch: Option<&Watch>) -> Self {
        // A trailers-only response (most errors) is sent whole with its headers.
        let end_stream = body.is_end_stream();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                body: Some(Box::pin(body)),
                rest: Bytes::new(),
                handed_out: Some(Instant::now()),
            }),
            call,
        });
        if let Some(watch) = watch
            && !end_stream
        {
            let watched: Arc<dyn Stallable> = shared.clone();
            lock(&watch.bodies).push(Arc::downgrade(&watched));
        }
        Self { shared, end_stream }
    }
}

impl<B> Stallable for Shared<B>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    fn drop_if_stalled(&self, now: Instant, timeout: Duration) -> bool {
        let dropped = {
            let mut state = match self.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                // Held: hyper is polling the body right now, so it is not stalled.
                Err(TryLockError::WouldBlock) => return false,
            };
            if state.body.is_none() {
                return true;
            }
            match state.handed_out {
                Some(since) if now.duration_since(since) >= timeout => {
                    state.rest = Bytes::new();
                    state.body.take()
                }
                _ => return false,
            }
        };
        self.call.dropped.0.store(true, Ordering::Release);
        // Dropped outside the lock: dropping a stream's body stops the work feeding it.
        drop(dropped);
        metrics::response_unread();
        tracing::warn!(
            method = %crate::error::bounded(self.call.uri.path(), MAX_METHOD_BYTES),
            request_id = self
                .call
                .request_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .unwrap_or_default(),
            timeout_ms = timeout.as_millis() as u64,
            "dropped a response its client took nothing more of for server.response_stall_timeout_ms"
        );
        true
    }
}

impl<B> Body for UnreadBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        state.handed_out = None;
        if !state.rest.is_empty() {
            state.handed_out = Some(Instant::now());
            return Poll::Ready(Some(Ok(Frame::data(next_chunk(&mut state.rest)))));
        }
        let Some(body) = state.body.as_mut() else {
            return Poll::Ready(Some(Err(
                "the client took nothing more of the response for server.response_stall_timeout_ms"
                    .into(),
            )));
        };
        let polled = match body.as_mut().poll_frame(cx) {
            // Copied even when small: tonic writes a stream's messages into one reused buffer,
            // which one large answer grows to its size.
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    state.rest = data;
                    Frame::data(next_chunk(&mut state.rest))
                }
                Err(frame) => frame,
            },
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        state.handed_out = Some(Instant::now());
        Poll::Ready(Some(Ok(polled)))
    }

    fn is_end_stream(&self) -> bool {
        if self.end_stream {
            return true;
        }
        let state = lock(&self.shared.state);
        state.rest.is_empty() && state.body.as_ref().is_some_and(|body| body.is_end_stream())
    }
}

/// A copy of the first `CHUNK_BYTES` of `data`, leaving the rest in it; the answer's buffer is
/// let go with its last chunk.
fn next_chunk(data: &mut Bytes) -> Bytes {
    let length = data.len().min(CHUNK_BYTES);
    let chunk = Bytes::copy_from_slice(&data[..length]);
    data.advance(length);
    if data.is_empty() {
        *data = Bytes::new();
    }
    chunk
}

/// A lock that outlives a panic in another holder: the state stays consistent between steps.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn call() -> Call {
        Call {
            uri: Uri::from_static("/lmserve.v1.Inference/Embed"),
            request_id: None,
            dropped: DroppedUnread::default(),
        }
    }

    #[tokio::test]
    async fn a_large_answer_is_handed_out_in_chunks() {
        let answer: Bytes = (0..40_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        let mut body = UnreadBody::new(Full::new(answer.clone()), call(), None);
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            chunks.push(frame.unwrap().into_data().unwrap());
        }
        let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [CHUNK_BYTES, CHUNK_BYTES, 40_000 - 2 * CHUNK_BYTES]);
        assert_eq!(chunks.concat(), answer);
        // Copies, so that a chunk left with hyper does not keep the whole answer alive.
        let whole = answer.as_ptr_range();
        assert!(chunks.iter().all(|chunk| !whole.contains(&chunk.as_ptr())));
    }

    #[tokio::test]
    async fn a_small_answer_is_copied_too() {
        let answer = Bytes::from(vec![3u8; 100]);
        let mut body = UnreadBody::new(Full::new(answer.clone()), call(), None);
        let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, answer);
        assert!(!answer.as_ptr_range().contains(&chunk.as_ptr()));
    }

    #[tokio::test]
    async fn a_body_whose_chunk_is_not_taken_is_dropped_and_then_fails() {
        let watch = Watch {
            timeout: Duration::from_secs(60),
            bodies: Mutex::new(Vec::new()),
        };
        let answer = Bytes::from(vec![7u8; 3 * CHUNK_BYTES]);
        let call = call();
        let dropped = call.dropped.clone();
        let mut body = UnreadBody::new(Full::new(answer), call, Some(&watch));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), CHUNK_BYTES);
        let registered = lock(&watch.bodies).pop().unwrap().upgrade().unwrap();
        assert!(!registered.drop_if_stalled(Instant::now(), watch.timeout));
        assert!(!dropped.is_set());
        let later = Instant::now() + Duration::from_secs(61);
        assert!(registered.drop_if_stalled(later, watch.timeout));
        assert!(dropped.is_set(), "the request log would blame the client");
        let next = body.frame().await.unwrap();
        assert!(next.is_err(), "a dropped body went on: {next:?}");
    }

    #[tokio::test]
    async fn a_body_waiting_on_the_server_is_not_stalled() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = tokio_stream_of(receiver);
        let watch = Watch {
            timeout: Duration::from_millis(50),
            bodies: Mutex::new(Vec::new()),
        };
        let mut body = UnreadBody::new(StreamBody::new(stream), call(), Some(&watch));
        let registered = lock(&watch.bodies).pop().unwrap().upgrade().unwrap();
        // hyper asks and the stream has nothing yet: the wait is the server's.
        assert!(
            futures::poll!(std::pin::pin!(body.frame())).is_pending(),
            "an empty stream had a frame"
        );
        let later = Instant::now() + Duration::from_secs(60);
        assert!(!registered.drop_if_stalled(later, watch.timeout));
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"token"))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"token"));
    }

    fn tokio_stream_of<T: Send + 'static>(
        mut receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }
}
