//! The gRPC listeners: bound at startup (a port in use is a clear error), served until the
//! shutdown stops them.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::api::edge::EdgeLayer;
use crate::api::observe::ObserveLayer;

/// The layers around every service: `observe` outermost, then `edge`.
pub type Layers = Stack<EdgeLayer, Stack<ObserveLayer, Identity>>;

pub async fn bind(addr: SocketAddr, setting: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another server using the port? set {setting})")
    })
}

/// Serves `router` on `listener` until `stop` turns true; then tonic refuses new connections
/// and waits for the calls in flight.
pub fn spawn(
    router: Router<Layers>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(
        router.serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }),
    )
}

/// Accepted connections with Nagle's algorithm off: a streamed token is a small write that
/// must leave at once, not wait up to 40 ms for the peer's delayed ACK.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|connection| {
        if let Ok(stream) = &connection
            && let Err(error) = stream.set_nodelay(true)
        {
            tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
        }
        connection
    })
}
