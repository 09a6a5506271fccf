//! The transport limits a careless or hostile client meets: a connection that sends nothing is
//! closed after the handshake timeout, connections beyond the limit wait until one closes, one
//! client's connections past its own limit are closed while other clients are served, and
//! the server advertises its limit on calls per connection in its HTTP/2 SETTINGS, and a health
//! call, which needs no key, cannot make the server buffer a large message, and a client that
//! stops reading a stream's responses holds none of the queue places its requests took, a
//! connection that idles gives its place back at its maximum age, an answer its client reads
//! none of is dropped after the stall timeout, and a call whose client stops sending halfway
//! ends after the request stall timeout.

mod common;

use std::time::Duration;

use futures::StreamExt;
use prost::Message;

use common::{ServerOptions, TestServer};
use lmserve::api::kserve::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use lmserve::api::kserve::proto::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use lmserve::api::kserve::proto::{ModelInferRequest, ServerLiveResponse};
use lmserve::api::proto::EmbedRequest;
use lmserve::api::proto::inference_client::InferenceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A server with no models (the transport is all these tests need) and `env` set.
async fn start(env: &[(&str, &str)]) -> (TestServer, tempfile::TempDir) {
    start_with_args(env, &[]).await
}

async fn start_with_args(env: &[(&str, &str)], args: &[&str]) -> (TestServer, tempfile::TempDir) {
    let repository = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(ServerOptions {
        repository: repository.path().to_owned(),
        args: args.iter().map(|arg| arg.to_string()).collect(),
        env: env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        ready: false,
    })
    .await;
    (server, repository)
}

/// One health check on a connection of its own, given `within` to answer.
async fn health_check(server: &TestServer, within: Duration) -> Result<(), String> {
    let call = async {
        let channel = Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .map_err(|error| error.to_string())?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|status| status.to_string())
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
    let (server, _repository) = start(&[("LMSERVE_SERVER__HANDSHAKE_TIMEOUT_MS", "300")]).await;
    let mut silent = TcpStream::connect(server.addr.as_str()).await.unwrap();
    // The server's own SETTINGS come first; then, with nothing from the client, the close.
    let mut sent = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut sent)).await;
    assert!(
        closed.is_ok(),
        "a connection that sent nothing was still open after 10 s"
    );
    // A real client is unaffected.
    health_check(&server, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_one_closes() {
    let (server, _repository) = start(&[("LMSERVE_SERVER__MAX_CONNECTIONS", "2")]).await;
    health_check(&server, Duration::from_secs(5)).await.unwrap();
    // That client's connection is gone once its channel is; give the server a moment to see it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = [
        TcpStream::connect(server.addr.as_str()).await.unwrap(),
        TcpStream::connect(server.addr.as_str()).await.unwrap(),
    ];
    let refused = health_check(&server, Duration::from_secs(1)).await;
    assert!(
        refused.is_err(),
        "a third connection was served past a limit of 2"
    );
    drop(held);
    health_check(&server, Duration::from_secs(5)).await.unwrap();
}

/// A client that keeps its connections alive, as a real HTTP/2 client does: it sends the preface
/// and its SETTINGS and answers the server's pings until dropped.
async fn live_connection(addr: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Connections live `server.max_connection_age_ms`: then a GOAWAY asks the client to reconnect
/// for its next call, one with no call in flight closes at once, and calls in flight keep the
/// grace to finish before the connection is closed under them. (A tonic client's next call on
/// that connection waits for the close instead of reconnecting, so a new connection asks here.)
#[tokio::test]
async fn connections_are_asked_to_close_at_their_maximum_age_and_cut_after_its_grace() {
    let (server, _repository) = start(&[
        ("LMSERVE_SERVER__MAX_CONNECTIONS", "2"),
        ("LMSERVE_SERVER__MAX_CONNECTION_AGE_MS", "1500"),
        ("LMSERVE_SERVER__MAX_CONNECTION_AGE_GRACE_MS", "2500"),
    ])
    .await;
    // Two that open no call and answer every ping, which nothing else closes, hold both places.
    let held = [
        live_connection(&server.addr).await,
        live_connection(&server.addr).await,
    ];
    let waiting = health_check(&server, Duration::from_millis(700)).await;
    assert!(
        waiting.is_err(),
        "a third connection was served past a limit of 2"
    );
    health_check(&server, Duration::from_secs(10))
        .await
        .unwrap();
    drop(held);

    // A call in flight at the age: a health Watch, open until the server ends it.
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let watch_request = HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = HealthClient::new(channel)
        .watch(watch_request)
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("the first status");
    // A second past the age, inside the grace: still open, and the server takes new connections.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    match tokio::time::timeout(Duration::from_millis(10), watch.message()).await {
        Err(_) | Ok(Ok(Some(_))) => {}
        ended => panic!("the call in flight ended inside the grace: {ended:?}"),
    }
    health_check(&server, Duration::from_secs(5)).await.unwrap();
    // At the end of the grace the connection is closed under it.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the call was still open 10 s past the grace");
}

#[tokio::test]
async fn one_client_cannot_hold_every_connection() {
    let (server, _repository) = start_with_args(
        &[
            ("LMSERVE_SERVER__MAX_CONNECTIONS", "4"),
            ("LMSERVE_SERVER__MAX_CONNECTIONS_PER_CLIENT", "2"),
        ],
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(live_connection(&server.addr).await);
    }
    // Past its limit, the same client's next connection is closed at once, even one that
    // would send its preface, rather than waiting for a place.
    let mut refused = TcpStream::connect(server.addr.as_str()).await.unwrap();
    let mut sent = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut sent));
    assert!(
        closed.await.is_ok(),
        "a third connection from one client was left open past its limit of 2"
    );
    let refused = health_check(&server, Duration::from_secs(2)).await;
    assert!(
        refused.is_err(),
        "a third connection from one client was served past its limit of 2"
    );

    // Another client, from another address, has the places that one could not take.
    let other = async {
        let channel = Channel::from_shared(server.url())
            .unwrap()
            .local_address(Some("127.0.0.2".parse().unwrap()))
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
    };
    tokio::time::timeout(Duration::from_secs(5), other)
        .await
        .expect("another client was not answered within 5 s")
        .unwrap();

    let metrics = server.metrics_addr.clone().expect("a metrics port");
    let text = metrics_get(&metrics, "/metrics", Duration::from_secs(5))
        .await
        .unwrap();
    let refusals = text
        .lines()
        .find_map(|line| line.strip_prefix("lmserve_connections_refused_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert!(refusals >= Some(2.0), "{refusals:?} in\n{text}");

    // Its connections closed, the first client is served again, once the server has seen them
    // close.
    drop(held);
    let give_up = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(error) = health_check(&server, Duration::from_secs(1)).await {
        assert!(
            std::time::Instant::now() < give_up,
            "the first client was not served again: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_limit_on_calls_per_connection_is_advertised() {
    let (server, _repository) = start(&[("LMSERVE_SERVER__MAX_STREAMS_PER_CONNECTION", "7")]).await;
    let tcp = TcpStream::connect(server.addr.as_str()).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // The server's SETTINGS arrive as the connection is driven; a request makes sure of it.
    let request = http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .body(())
    .unwrap();
    let settled = async {
        let mut ready = client.clone().ready().await.unwrap();
        let (response, mut body) = ready.send_request(request, false).unwrap();
        // An empty HealthCheckRequest: the 5-byte gRPC frame header alone.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        response.await.unwrap();
    };
    tokio::select! {
        _ = &mut connection => panic!("the connection ended"),
        _ = tokio::time::timeout(Duration::from_secs(5), settled) => {}
    }
    assert_eq!(connection.max_concurrent_send_streams(), 7);
}

#[tokio::test]
async fn a_health_call_may_send_a_few_kilobytes_at_most() {
    let (server, _repository) = start(&[]).await;
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let check = |service: String| {
        let mut health = HealthClient::new(channel.clone());
        async move { health.check(HealthCheckRequest { service }).await }
    };
    // A long name that fits is answered as any unknown service is.
    let status = check("x".repeat(4000)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = check("x".repeat(5000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("4096"), "{status:?}");
    // KServe's ServerLive needs no key either; its request has no fields, so any message's
    // bytes decode as one.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, ServerLiveResponse, _>(
            tonic::Request::new(HealthCheckRequest {
                service: "x".repeat(5000),
            }),
            http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ServerLive"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The connection still serves.
    check(String::new()).await.unwrap();
}

/// A GET of `path` on the metrics port on a connection of its own, given `within` to answer.
async fn metrics_get(addr: &str, path: &str, within: Duration) -> Result<String, String> {
    let call = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: lmserve\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response)
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

#[tokio::test]
async fn the_metrics_port_has_the_same_connection_limits() {
    let (server, _repository) = start_with_args(
        &[
            ("LMSERVE_SERVER__HANDSHAKE_TIMEOUT_MS", "3000"),
            ("LMSERVE_SERVER__MAX_CONNECTIONS", "2"),
        ],
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let metrics = server.metrics_addr.clone().expect("a metrics port");
    let live = metrics_get(&metrics, "/health/live", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");

    // Past the limit a connection waits, and one that sends nothing is closed in time.
    let mut held = [
        TcpStream::connect(metrics.as_str()).await.unwrap(),
        TcpStream::connect(metrics.as_str()).await.unwrap(),
    ];
    let waiting = metrics_get(&metrics, "/health/live", Duration::from_millis(300)).await;
    assert!(
        waiting.is_err(),
        "a third connection was served past a limit of 2"
    );
    for silent in &mut held {
        let mut sent = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut sent)).await;
        assert!(
            closed.is_ok(),
            "a silent metrics connection was still open after 10 s"
        );
    }
    let live = metrics_get(&metrics, "/health/live", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
}

/// Whether `stream` is closed by the server within `within`, while `burst` is sent to it at once
/// and then `trickle` a byte every 200 ms.
async fn closed_while_trickling(
    stream: TcpStream,
    burst: &[u8],
    trickle: &[u8],
    within: Duration,
) -> bool {
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(burst).await.unwrap();
    let trickle = trickle.to_vec();
    let writing = tokio::spawn(async move {
        for byte in trickle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
        }
        // Held open, silent, once the trickle is spent.
        std::future::pending::<()>().await;
    });
    let mut sent = Vec::new();
    let closed = tokio::time::timeout(within, reader.read_to_end(&mut sent))
        .await
        .is_ok();
    writing.abort();
    closed
}

#[tokio::test]
async fn the_metrics_port_closes_slow_and_idle_requests_after_the_handshake_timeout() {
    let (server, _repository) = start_with_args(
        &[("LMSERVE_SERVER__HANDSHAKE_TIMEOUT_MS", "2000")],
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let metrics = server.metrics_addr.clone().expect("a metrics port");

    // A head whose first line comes at once, past the connection's handshake, and whose rest
    // comes a byte every 200 ms: each byte moves the idle timeout on, but the head as a whole
    // must arrive within the 2 s.
    let slow = TcpStream::connect(metrics.as_str()).await.unwrap();
    let first = b"GET /metrics HTTP/1.1\r\nHost: lmserve\r\n";
    let rest = b"X-Padding: lmserve\r\n".repeat(8);
    assert!(
        closed_while_trickling(slow, first, &rest, Duration::from_secs(8)).await,
        "a request head trickled a byte every 200 ms was still being read after 8 s"
    );

    // A kept-alive connection, after its answer, gets the same time for its next request.
    let mut kept = TcpStream::connect(metrics.as_str()).await.unwrap();
    kept.write_all(b"GET /health/live HTTP/1.1\r\nHost: lmserve\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0; 256];
    let read = kept.read(&mut answer).await.unwrap();
    assert!(answer[..read].starts_with(b"HTTP/1.1 200"));
    assert!(
        closed_while_trickling(kept, &[], &[], Duration::from_secs(8)).await,
        "an idle kept-alive metrics connection was still open after 8 s"
    );

    let live = metrics_get(&metrics, "/health/live", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
}

/// Texts of about 220 tokens: a request of 100 takes a while to tokenize.
fn long_text() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(14)
}

fn embed_request(texts: Vec<String>) -> EmbedRequest {
    EmbedRequest {
        model: "tiny-encoder".into(),
        texts,
        ..Default::default()
    }
}

/// A server whose encoder queue holds 450 texts, and a channel to it whose HTTP/2 window is 64
/// bytes and never widened: a client on it reads nothing.
async fn stalled_client_setup() -> (TestServer, Channel) {
    let server = TestServer::start_with(ServerOptions {
        env: vec![("LMSERVE_BATCHING__QUEUE_CAPACITY".into(), "450".into())],
        ..Default::default()
    })
    .await;
    let stalled = Channel::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(64)
        .connect()
        .await
        .unwrap();
    (server, stalled)
}

/// Another client asks for more places than the queue has left while two of the stalled
/// stream's requests hold theirs. Refusals while those requests run are fine; refusals ever
/// after are not.
async fn assert_another_client_is_served(server: &TestServer) {
    let mut client = server.inference().await;
    let mut last_refusal = None;
    let served = async {
        loop {
            match client.embed(embed_request(vec![long_text(); 256])).await {
                Ok(response) => return response.into_inner(),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    last_refusal = Some(status.message().to_owned());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    let response = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .unwrap_or_else(|_| panic!("still refused after 30 s: {last_refusal:?}"));
    assert_eq!(response.embeddings.len(), 256);
}

/// A client that stops reading an EmbedStream: its HTTP/2 window fills with the answers to
/// the short requests it sent first, after which the server's response stream is polled no
/// more (hyper polls a response body until it holds a chunk it has no window to send). The long
/// requests it had in flight must still run and hand back their queue places, or a few such
/// streams would hold a model's whole queue and every other client would be refused for as
/// long as the connection stayed.
#[tokio::test]
async fn a_client_that_stops_reading_a_stream_holds_no_queue_places() {
    let (server, stalled) = stalled_client_setup().await;
    let mut requests: Vec<_> = (0..4)
        .map(|_| embed_request(vec!["hello".into()]))
        .collect();
    requests.extend((0..4).map(|_| embed_request(vec![long_text(); 100])));
    let unread = InferenceClient::new(stalled)
        .embed_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    assert_another_client_is_served(&server).await;
    drop(unread);
}

/// The same through KServe's ModelStreamInfer, whose requests run several at once.
#[tokio::test]
async fn a_kserve_client_that_stops_reading_a_stream_holds_no_queue_places() {
    let (server, stalled) = stalled_client_setup().await;
    let infer = |texts: Vec<String>| {
        let mut raw = Vec::new();
        for text in &texts {
            raw.extend_from_slice(&(text.len() as u32).to_le_bytes());
            raw.extend_from_slice(text.as_bytes());
        }
        ModelInferRequest {
            model_name: "tiny-encoder".into(),
            inputs: vec![InferInputTensor {
                name: "text_input".into(),
                datatype: "BYTES".into(),
                shape: vec![texts.len() as i64],
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "embedding".into(),
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        }
    };
    // Answered as they finish: the first short answer fills the window, and the second, sent
    // after the long requests, is the chunk the server holds and polls no further for.
    let mut requests = vec![(0, infer(vec!["hello".into()]))];
    requests.extend((0..4).map(|i| (if i == 0 { 300 } else { 0 }, infer(vec![long_text(); 100]))));
    requests.push((0, infer(vec!["hello".into()])));
    let requests = futures::stream::iter(requests).then(|(pause, request)| async move {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        request
    });
    let unread = GrpcInferenceServiceClient::new(stalled)
        .model_stream_infer(requests)
        .await
        .unwrap()
        .into_inner();
    // Once every request of the stream has been sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_another_client_is_served(&server).await;
    drop(unread);
}

/// A call to lmserve.v1.Inference's `method` begun on a raw HTTP/2 connection made with
/// `builder`: its response to come, and its body to send.
async fn raw_call(
    server: &TestServer,
    builder: h2::client::Builder,
    method: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let tcp = TcpStream::connect(server.addr.as_str()).await.unwrap();
    let (client, connection) = builder.handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{}/lmserve.v1.Inference/{method}",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    client
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap()
}

/// `message` as gRPC frames it: uncompressed, after its 4-byte length.
fn grpc_framed(message: &[u8]) -> Vec<u8> {
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// An Embed of 256 texts sent on a raw HTTP/2 connection whose window is 64 bytes and widens
/// only as `read_answer` reads: the response's head, and the body left unread.
async fn embed_unread(server: &TestServer) -> h2::RecvStream {
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(64);
    let (response, mut body) = raw_call(server, builder, "Embed").await;
    let framed = grpc_framed(&embed_request(vec!["hello".into(); 256]).encode_to_vec());
    body.send_data(bytes::Bytes::from(framed), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("no response head within 10 s")
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body()
}

/// Reads the body's data to its end, widening the window as it goes: the bytes, and the stream's
/// error if it was reset. Its trailers are left to read.
async fn read_answer(body: &mut h2::RecvStream) -> (Vec<u8>, Option<h2::Error>) {
    let mut answer = Vec::new();
    let read = async {
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(chunk) => {
                    body.flow_control().release_capacity(chunk.len()).unwrap();
                    answer.extend_from_slice(&chunk);
                }
                Err(error) => return Some(error),
            }
        }
        None
    };
    let error = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the answer did not end within 10 s of reading");
    (answer, error)
}

/// A client that reads none of an answer the server has ready: after
/// `server.response_stall_timeout_ms` the server drops the answer (so such a client cannot make
/// it hold answers for as long as its connection lives) and resets the stream when the client
/// reads again. A client that reads within the timeout gets its whole answer, however little
/// of it its window let through at a time.
#[tokio::test]
async fn an_answer_its_client_does_not_read_is_dropped_after_the_stall_timeout() {
    let server = TestServer::start_with(ServerOptions {
        args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        env: vec![(
            "LMSERVE_SERVER__RESPONSE_STALL_TIMEOUT_MS".into(),
            "2000".into(),
        )],
        ..Default::default()
    })
    .await;

    let mut read_in_time = embed_unread(&server).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (answer, error) = read_answer(&mut read_in_time).await;
    assert!(error.is_none(), "an answer read in time failed: {error:?}");
    let whole = answer.len();
    let message = lmserve::api::proto::EmbedResponse::decode(&answer[5..]).unwrap();
    assert_eq!(message.embeddings.len(), 256);
    assert!(
        whole > 64 * 1024,
        "the answer is {whole} bytes, too small to test with"
    );

    let mut unread = embed_unread(&server).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (answer, error) = read_answer(&mut unread).await;
    let error = error.unwrap_or_else(|| {
        panic!(
            "an answer unread for 4.5 s was sent whole ({} bytes)",
            answer.len()
        )
    });
    assert!(error.is_reset(), "{error:?}");
    // The chunk hyper held, and perhaps a window's worth of the next before the reset.
    assert!(
        answer.len() < 2 * lmserve::api::unread::CHUNK_BYTES,
        "{} of the {whole} bytes came after the stall",
        answer.len()
    );

    let port = server
        .metrics_addr
        .as_deref()
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .expect("a metrics port");
    let metrics = common::scrape_metrics(port).await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "lmserve_responses_unread_total 1"),
        "{metrics}"
    );
    let stderr = server.stderr();
    assert!(
        stderr.contains("dropped a response its client took nothing more of"),
        "{stderr}"
    );
    // The call's request line says the server ended it, not that the client left.
    let request_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("lmserve::request") && line.contains("code=Cancelled"))
        .collect();
    assert_eq!(request_lines.len(), 1, "{stderr}");
    assert!(
        request_lines[0].contains("the server dropped the answer: its client took nothing more"),
        "{}",
        request_lines[0]
    );
}

/// Sends `pieces` of an Embed call's body on a connection of its own, `pause` apart, the last
/// one ending the stream if `end_stream`, and returns the call's gRPC status once it comes (None: none within 10 s).
async fn embed_in_pieces(
    server: &TestServer,
    pieces: Vec<Vec<u8>>,
    pause: Duration,
    end_stream: bool,
) -> Option<(Code, String)> {
    let (response, mut body) = raw_call(server, h2::client::Builder::new(), "Embed").await;
    let answered = async {
        let response = response.await.unwrap();
        if let Some(status) = grpc_status(response.headers()) {
            return status;
        }
        let mut rest = response.into_body();
        while rest.data().await.is_some() {}
        let trailers = rest.trailers().await.unwrap().expect("trailers");
        grpc_status(&trailers).expect("a grpc-status")
    };
    let sending = async {
        let count = pieces.len();
        for (index, piece) in pieces.into_iter().enumerate() {
            let last = index + 1 == count;
            body.send_data(bytes::Bytes::from(piece), last && end_stream)
                .unwrap();
            tokio::time::sleep(pause).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            status = answered => status,
            () = sending => unreachable!(),
        }
    })
    .await
    .ok()
}

/// The gRPC status in `headers` (a trailers-only response's, or trailers), its message decoded.
fn grpc_status(headers: &http::HeaderMap) -> Option<(Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .map(|value| percent_decoded(value.to_str().unwrap_or_default()))
        .unwrap_or_default();
    Some((Code::from_i32(code), message))
}

/// gRPC's percent-encoding of `grpc-message` undone.
fn percent_decoded(text: &str) -> String {
    let mut bytes = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&byte, after)) = rest.split_first() {
        let escaped = (byte == b'%')
            .then(|| after.get(..2))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(decoded) => {
                bytes.push(decoded);
                rest = &after[2..];
            }
            None => {
                bytes.push(byte);
                rest = after;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A client that sends part of a message and then nothing, or a unary call's whole message but
/// not the end of its stream: after `server.request_stall_timeout_ms` the call ends
/// DEADLINE_EXCEEDED, so such a client cannot make the server hold what it sent for as long as
/// its connection lives. A client that sends a message in pieces, each within the timeout of
/// the last, is read to the end.
#[tokio::test]
async fn a_message_its_client_stops_sending_halfway_ends_the_call() {
    let (server, _repository) =
        start(&[("LMSERVE_SERVER__REQUEST_STALL_TIMEOUT_MS", "1000")]).await;
    let message = embed_request(vec!["x".repeat(20_000); 3]).encode_to_vec();
    let whole = grpc_framed(&message);
    let half = whole[..whole.len() / 2].to_vec();
    let started = std::time::Instant::now();
    let (code, text) = embed_in_pieces(&server, vec![half], Duration::from_millis(10), false)
        .await
        .expect("no answer within 10 s to a call whose message stopped halfway");
    assert_eq!(code, Code::DeadlineExceeded, "{text}");
    assert!(text.contains("server.request_stall_timeout_ms"), "{text}");
    assert!(
        text.contains("bytes of a message was still to come"),
        "{text}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1000));

    let (code, text) = embed_in_pieces(&server, vec![whole.clone()], Duration::ZERO, false)
        .await
        .expect("no answer within 10 s to a unary call whose stream did not end");
    assert_eq!(code, Code::DeadlineExceeded, "{text}");
    assert!(
        text.contains("the end of its stream was still to come"),
        "{text}"
    );

    let (code, text) = embed_in_pieces(&server, Vec::new(), Duration::ZERO, false)
        .await
        .expect("no answer within 10 s to a unary call that sent no message");
    assert_eq!(code, Code::DeadlineExceeded, "{text}");
    assert!(text.contains("its message was still to come"), "{text}");

    // Four pieces 600 ms apart: 1.8 s in all, each within the 1 s timeout. No model is loaded,
    // so a message read whole is refused for its model.
    let pieces: Vec<Vec<u8>> = whole
        .chunks(whole.len() / 4 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(pieces.len(), 4);
    let (code, text) = embed_in_pieces(&server, pieces, Duration::from_millis(600), true)
        .await
        .expect("no answer within 10 s to a message sent whole");
    assert_eq!(code, Code::NotFound, "{text}");
}

/// A stream of requests may idle between messages for longer than
/// `server.request_stall_timeout_ms`; stalled halfway through one, it ends DEADLINE_EXCEEDED
/// after the answers to the messages it sent whole.
#[tokio::test]
async fn a_request_stream_may_idle_between_messages_but_not_within_one() {
    let server = TestServer::start_with(ServerOptions {
        env: vec![(
            "LMSERVE_SERVER__REQUEST_STALL_TIMEOUT_MS".into(),
            "1000".into(),
        )],
        ..Default::default()
    })
    .await;
    let (response, mut body) = raw_call(&server, h2::client::Builder::new(), "EmbedStream").await;
    let whole = grpc_framed(&embed_request(vec!["hello".into()]).encode_to_vec());
    body.send_data(bytes::Bytes::from(whole.clone()), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    body.send_data(bytes::Bytes::from(whole.clone()), false)
        .unwrap();
    body.send_data(bytes::Bytes::from(whole[..whole.len() / 2].to_vec()), false)
        .unwrap();

    let ended = async {
        let mut received = response.await.unwrap().into_body();
        let (answers, error) = read_answer(&mut received).await;
        assert!(error.is_none(), "{error:?}");
        let trailers = received.trailers().await.unwrap().expect("trailers");
        (answers, grpc_status(&trailers).expect("a grpc-status"))
    };
    let (answers, (code, text)) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the stream did not end within 10 s");
    assert_eq!(code, Code::DeadlineExceeded, "{text}");
    assert!(
        text.contains("bytes of a message was still to come"),
        "{text}"
    );
    // The two whole messages were answered, the one before the idle spell among them.
    let mut rest = answers.as_slice();
    let mut count = 0;
    while rest.len() >= 5 {
        let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let response = lmserve::api::proto::EmbedResponse::decode(&rest[5..5 + length]).unwrap();
        assert_eq!(response.embeddings.len(), 1);
        rest = &rest[5 + length..];
        count += 1;
    }
    assert_eq!(count, 2);
    drop(body);
}
