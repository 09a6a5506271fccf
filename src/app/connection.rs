//! Accepted connections under the server's connection limits: at most `max_connections` open
//! at once per listener, at most `max_per_client` of them from one client address, and each
//! closed unless it finishes its TLS handshake (with TLS) and sends its HTTP/2 connection
//! preface within the handshake timeout. Without these, a client that opens connections and
//! sends nothing holds a socket and a task each, for ever, and one that keeps them alive (it
//! sends the preface and answers pings) holds every place under the limit, leaving none for
//! anyone else, health probes included.
//!
//! TLS is accepted here rather than by tonic so that the preface is counted in plaintext: a
//! deadline on the TLS handshake alone lets a client finish it and then send nothing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::clients::{Client, ClientCounts, ClientPlace};

/// The HTTP/2 client connection preface (RFC 9113, 3.4) is 24 bytes.
const PREFACE_BYTES: usize = 24;

/// Raises the soft limit on open files to the hard one, as the Go runtime does for its servers:
/// the usual soft limit of 1024 is below what the connection limits allow, and a server out of
/// descriptors can accept nothing, health probes included. Warns where even the hard limit is
/// below `wanted`.
pub fn raise_open_files_limit(wanted: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed, nothing else.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let hard = limit.rlim_max;
        if limit.rlim_cur < hard {
            limit.rlim_cur = hard;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        } else {
            true
        }
    };
    let allowed = if raised {
        limit.rlim_max
    } else {
        limit.rlim_cur
    };
    if (allowed as u128) < wanted as u128 {
        tracing::warn!(
            open_files = allowed,
            wanted,
            "the limit on open files is below what server.max_connections allows on every \
             listener; raise it (ulimit -n) or lower max_connections"
        );
    }
}

/// How long accepting waits after an error of the server's own (no file descriptor left).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// An accept error of the server's own (no descriptor or buffer left), which the next accept
/// meets too; other errors belong to one connection (its peer reset it, its network went
/// away), and the next connection may be fine.
fn is_a_shortage(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Most connections open at once from one client (`Client::of`); 0: no limit but
    /// `max_connections`. Past it a client's further connections are closed as they are
    /// accepted, where waiting in the backlog would hold up every other client's too.
    pub max_per_client: usize,
    /// The leading bits of an IPv6 address that name its client (`Client::of`).
    pub ipv6_client_prefix: u8,
    pub handshake_timeout: Duration,
    /// How long a connection may live at most: its maximum age, when tonic asks it to close
    /// (GOAWAY), plus the grace its calls in flight get. At the end its reads fail, which
    /// closes it under any call still running. tonic's own grace skips the GOAWAY.
    pub lifetime: Option<Duration>,
    /// Closes a connection that sends nothing for this long (counted from the accept, then
    /// from each read that brings bytes), or whose writes wait this long on a client that reads
    /// nothing. For the HTTP/1 metrics port, whose server reads nothing more while an answer
    /// waits to be written; gRPC's connections have HTTP/2 pings instead.
    pub idle_timeout: Option<Duration>,
}

/// Connections accepted from `listener`, with TLS when `tls` is set. At the limit no more are
/// accepted until one closes: the rest wait in the kernel's backlog rather than each costing a
/// task and buffers. The TLS handshake runs on the connection's own task, when tonic first
/// reads or writes it, so a slow client does not hold up the accepting.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
) -> impl futures::Stream<Item = io::Result<Connection>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let state = Accepting {
        listener,
        permits,
        clients: Arc::new(ClientCounts::default()),
        last_warned: None,
        last_refused: None,
    };
    futures::stream::unfold(state, move |mut state| {
        let tls = tls.clone();
        async move {
            let permit = Arc::clone(&state.permits)
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            loop {
                let (stream, peer) = match state.listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        if is_a_shortage(&error) {
                            // A retry at once would fail at once, and the serving loop retries
                            // at once. Wait, as hyper and axum do. Logged once a second at most.
                            if once_a_second(&mut state.last_warned) {
                                tracing::warn!(%error, "cannot accept connections; retrying every 50 ms");
                            }
                            tokio::time::sleep(ACCEPT_RETRY).await;
                        }
                        return Some((Err(error), state));
                    }
                };
                let client = Client::of(peer.ip(), limits.ipv6_client_prefix);
                let Some(place) = state.clients.admit(client, limits.max_per_client) else {
                    // Dropping the stream closes it; the permit waits for the next client.
                    crate::telemetry::metrics::connection_refused();
                    if once_a_second(&mut state.last_refused) {
                        tracing::warn!(
                            %client,
                            limit = limits.max_per_client,
                            "a client holds server.max_connections_per_client connections; \
                             closing its further ones"
                        );
                    }
                    continue;
                };
                // Nagle's algorithm off: a streamed token is a small write that must leave at
                // once, not wait up to 40 ms for the peer's delayed ACK.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
                }
                let info = stream.connect_info();
                let io = match tls {
                    Some(tls) => Io::TlsHandshake(Box::new(tls.accept(stream))),
                    None => Io::Plain(stream),
                };
                let connection = Connection {
                    io,
                    info,
                    handshake: Some(Handshake {
                        deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
                        bytes_left: PREFACE_BYTES,
                    }),
                    idle: limits.idle_timeout.map(Idle::new),
                    end_of_life: limits
                        .lifetime
                        .map(|lifetime| Box::pin(tokio::time::sleep(lifetime))),
                    _client: place,
                    _permit: permit,
                };
                return Some((Ok(connection), state));
            }
        }
    })
}

/// What accepting carries from one connection to the next.
struct Accepting {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    clients: Arc<ClientCounts>,
    last_warned: Option<tokio::time::Instant>,
    last_refused: Option<tokio::time::Instant>,
}

/// Whether a warning last given at `last` may be given again, and if so notes it as given now.
fn once_a_second(last: &mut Option<tokio::time::Instant>) -> bool {
    let now = tokio::time::Instant::now();
    if last.is_some_and(|at| now - at < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

/// A connection holding its place under the limit until it is dropped.
pub struct Connection {
    io: Io,
    info: TcpConnectInfo,
    /// Until the preface has arrived.
    handshake: Option<Handshake>,
    idle: Option<Idle>,
    /// When the connection's `ConnectionLimits::lifetime` runs out.
    end_of_life: Option<Pin<Box<Sleep>>>,
    _client: ClientPlace,
    _permit: OwnedSemaphorePermit,
}

/// The deadline a read must beat, moved on by every read that brings bytes, and the one a
/// write that waits must beat: a client that reads nothing holds a response half written, and
/// an HTTP/1 server reads nothing more until it is out.
struct Idle {
    after: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Set while a write waits for the client to read.
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    fn new(after: Duration) -> Self {
        Self {
            after,
            deadline: Box::pin(tokio::time::sleep(after)),
            write_deadline: None,
        }
    }

    /// Passes a write's outcome on, failing one that has waited past the idle timeout.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_deadline = None;
            return polled;
        }
        let after = self.after;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the connection's idle timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

enum Io {
    Plain(TcpStream),
    TlsHandshake(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<TlsStream<TcpStream>>),
    /// The TLS handshake failed; a finished `Accept` must not be polled again.
    Failed,
}

struct Handshake {
    deadline: Pin<Box<Sleep>>,
    bytes_left: usize,
}

impl Handshake {
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.deadline.as_mut().poll(cx).map(|()| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent no request (with TLS: finished no handshake) within \
                 server.handshake_timeout_ms",
            )
        })
    }
}

impl Connection {
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.info.remote_addr()
    }

    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match &mut self.idle {
            Some(idle) => idle.watch_write(cx, polled),
            None => polled,
        }
    }

    /// Drives a TLS handshake in progress; ready once the stream can carry plaintext.
    fn poll_tls_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let accepting = match &mut self.io {
            Io::TlsHandshake(accepting) => accepting,
            Io::Failed => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Io::Plain(_) | Io::Tls(_) => return Poll::Ready(Ok(())),
        };
        match Pin::new(accepting.as_mut()).poll(cx) {
            Poll::Ready(Ok(stream)) => {
                self.io = Io::Tls(Box::new(stream));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                self.io = Io::Failed;
                Poll::Ready(Err(error))
            }
            Poll::Pending => match &mut self.handshake {
                Some(handshake) => handshake.expired(cx).map(Err),
                None => Poll::Pending,
            },
        }
    }

    /// The stream to read and write once any TLS handshake is done.
    fn ready_io(&mut self) -> Pin<&mut dyn AsyncReadWrite> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream),
            Io::Tls(stream) => Pin::new(stream.as_mut()),
            Io::TlsHandshake(_) | Io::Failed => {
                unreachable!("polled only after a TLS handshake that succeeded")
            }
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin {}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWrite for T {}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(end) = &mut this.end_of_life
            && end.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived server.max_connection_age_ms and its grace",
            )));
        }
        ready!(this.poll_tls_handshake(cx))?;
        let before = buf.filled().len();
        let polled = this.ready_io().poll_read(cx, buf);
        if let Some(idle) = &mut this.idle {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let next = tokio::time::Instant::now() + idle.after;
                    idle.deadline.as_mut().reset(next);
                }
                Poll::Pending if idle.deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing for the connection's idle timeout",
                    )));
                }
                _ => {}
            }
        }
        if let Some(handshake) = &mut this.handshake {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let read = buf.filled().len() - before;
                    handshake.bytes_left = handshake.bytes_left.saturating_sub(read);
                    // Done waiting once the preface is in, or the peer closed its side.
                    if handshake.bytes_left == 0 || read == 0 {
                        this.handshake = None;
                    }
                }
                Poll::Pending => {
                    if let Poll::Ready(expired) = handshake.expired(cx) {
                        return Poll::Ready(Err(expired));
                    }
                }
                Poll::Ready(Err(_)) => {}
            }
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_tls_handshake(cx))?;
        let polled = self.ready_io().poll_write(cx, buf);
        self.watch_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_tls_handshake(cx))?;
        let polled = self.ready_io().poll_write_vectored(cx, bufs);
        self.watch_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
            // What the stream will be: hyper asks once, before the handshake is done.
            Io::TlsHandshake(_) => true,
            Io::Failed => false,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_tls_handshake(cx))?;
        let polled = self.ready_io().poll_flush(cx);
        self.watch_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Io::TlsHandshake(_) | Io::Failed = self.io {
            // Nothing was said over TLS; dropping the connection closes the socket.
            return Poll::Ready(Ok(()));
        }
        self.ready_io().poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        raise_open_files_limit(0);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct passed.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    #[test]
    fn only_a_shortage_of_the_servers_own_waits() {
        assert!(is_a_shortage(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_a_shortage(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(!is_a_shortage(&io::Error::from_raw_os_error(libc::EPROTO)));
    }

    /// Connections accepted on a fresh local port under these limits, and the port's address.
    async fn listening(
        max_per_client: usize,
        idle_timeout: Option<Duration>,
    ) -> (
        std::net::SocketAddr,
        Pin<Box<impl futures::Stream<Item = io::Result<Connection>>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 8,
            max_per_client,
            ipv6_client_prefix: 128,
            handshake_timeout: Duration::from_secs(30),
            lifetime: None,
            idle_timeout,
        };
        (addr, Box::pin(accept(listener, limits, None)))
    }

    #[tokio::test]
    async fn a_connection_silent_past_its_idle_timeout_is_closed() {
        let (addr, mut connections) = listening(0, Some(Duration::from_secs(1))).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut connection = connections.next().await.unwrap().unwrap();
        // The server waits on each read while the client pauses; gaps of 0.4 s add up to well
        // past the timeout, and each read that brings bytes moves the deadline on.
        let writer = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                client
                    .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                    .await
                    .unwrap();
            }
            client
        });
        let mut read = vec![0; 64];
        let mut total = 0;
        while total < 4 * 25 {
            total += connection.read(&mut read).await.unwrap();
        }
        let _client = writer.await.unwrap();
        let started = tokio::time::Instant::now();
        let error = connection.read(&mut read).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_write_the_client_reads_nothing_of_fails_after_the_idle_timeout() {
        let (addr, mut connections) = listening(0, Some(Duration::from_secs(1))).await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut connection = connections.next().await.unwrap().unwrap();
        // Writes fill the socket's buffers, then wait on a client that reads nothing.
        let chunk = vec![0; 64 * 1024];
        let writing = async {
            loop {
                if let Err(error) = connection.write_all(&chunk).await {
                    break error;
                }
            }
        };
        let error = tokio::time::timeout(Duration::from_secs(20), writing)
            .await
            .expect("a write still waited on the client after 20 s");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_client_past_its_limit_is_closed_and_others_are_accepted() {
        let (addr, mut connections) = listening(2, None).await;
        let from = |client: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind((client, 0).into()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let held = [from([127, 0, 0, 1]).await, from([127, 0, 0, 1]).await];
        let first = connections.next().await.unwrap().unwrap();
        let _second = connections.next().await.unwrap().unwrap();

        // The third from the same address is closed as accepted; the next one the stream
        // yields is another client's.
        let mut third = from([127, 0, 0, 1]).await;
        let other = from([127, 0, 0, 2]).await;
        let accepted = connections.next().await.unwrap().unwrap();
        assert_eq!(accepted.remote_addr().unwrap(), other.local_addr().unwrap());
        let mut read = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut read));
        assert!(closed.await.is_ok(), "the third connection was left open");

        // A connection closed gives its client a place again.
        drop(first);
        let again = from([127, 0, 0, 1]).await;
        let accepted = connections.next().await.unwrap().unwrap();
        assert_eq!(accepted.remote_addr().unwrap(), again.local_addr().unwrap());
        drop(held);
    }
}
