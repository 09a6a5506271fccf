//! The gRPC listeners: bound at startup (a port in use is a clear error), served until the
//! shutdown stops them.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use super::connection::{ConnectionLimits, accept};
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
