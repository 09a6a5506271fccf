//! The listeners: bound at startup (a port in use is a clear error); the gRPC ones served until
//! the shutdown stops them, the metrics port under the same connection limits.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use futures::{Stream, StreamExt};

use super::connection::{Connection, ConnectionLimits, accept};
use crate::api::edge::EdgeLayer;
use crate::api::observe::ObserveLayer;
use crate::api::unread::UnreadLayer;

/// The layers around every service: `unread` outermost (where hyper polls), then `observe`,
/// then `edge`.
pub type Layers = Stack<EdgeLayer, Stack<ObserveLayer, Stack<UnreadLayer, Identity>>>;

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
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(
        router.serve_with_incoming_shutdown(accept(listener, limits, tls), async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }),
    )
}

/// The metrics port's connections, limited as the gRPC ones are, for axum.
pub struct HttpListener {
    connections: Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>>,
    local: SocketAddr,
}

impl HttpListener {
    pub fn new(listener: TcpListener, limits: ConnectionLimits) -> io::Result<Self> {
        Ok(Self {
            local: listener.local_addr()?,
            connections: Box::pin(accept(listener, limits, None)),
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            match self.connections.next().await {
                Some(Ok(connection)) => {
                    let peer = connection.remote_addr().unwrap_or(self.local);
                    return (connection, peer);
                }
                // `connection::accept` has waited already where the error was the server's.
                Some(Err(error)) => {
                    tracing::debug!(%error, "cannot accept a metrics connection");
                }
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
