//! Accepted connections under the server's connection limits: at most `max_connections` open
//! at once per listener, and each closed unless it sends its HTTP/2 connection preface within
//! the handshake timeout. Without these, a client that opens connections and sends nothing
//! holds a socket and a task each, for ever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client connection preface (RFC 9113, 3.4) is 24 bytes; a TLS ClientHello is
/// longer, and the TLS handshake has its own timeout after these.
const PREFACE_BYTES: usize = 24;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Connections accepted from `listener`. At the limit no more are accepted until one closes:
/// the rest wait in the kernel's backlog rather than each costing a task and buffers.
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl futures::Stream<Item = io::Result<Connection>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    futures::stream::unfold((listener, permits), move |(listener, permits)| async move {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let accepted = listener.accept().await.map(|(stream, _)| {
            // Nagle's algorithm off: a streamed token is a small write that must leave at
            // once, not wait up to 40 ms for the peer's delayed ACK.
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
            }
            Connection {
                stream,
                handshake: Some(Handshake {
                    deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
                    bytes_left: PREFACE_BYTES,
                }),
                _permit: permit,
            }
        });
        Some((accepted, (listener, permits)))
    })
}

/// A TCP connection holding its place under the limit until it is dropped.
pub struct Connection {
    stream: TcpStream,
    /// Until the preface has arrived.
    handshake: Option<Handshake>,
    _permit: OwnedSemaphorePermit,
}

struct Handshake {
    deadline: Pin<Box<Sleep>>,
    bytes_left: usize,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
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
                Poll::Pending if handshake.deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no connection preface within server.handshake_timeout_ms",
                    )));
                }
                _ => {}
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
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}
