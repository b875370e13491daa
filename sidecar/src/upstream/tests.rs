use std::convert::Infallible;

use http_body_util::Empty;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::*;

/// An HTTP/2 client that resets its stream without an error ends the request's body cleanly,
/// whatever its `Content-Length` said (RFC 9113 §8.1, as hyper reads it). Forwarded as
/// complete, the body would leave the upstream waiting for the rest, and the connection's
/// next request would be taken for it.
#[tokio::test]
async fn a_body_that_ends_short_of_its_length_is_the_clients_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (bodies_tx, mut bodies) = tokio::sync::mpsc::channel::<Incoming>(1);
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = service_fn(move |req: Request<Incoming>| {
            let bodies_tx = bodies_tx.clone();
            async move {
                bodies_tx.send(req.into_body()).await.unwrap();
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = Request::post(format!("http://{addr}/upload"))
        .header("content-length", "100")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"0123456789"), false)
        .unwrap();
    let body = bodies.recv().await.unwrap();
    // Answered early; then the client stops sending, without an error.
    response.await.unwrap();
    stream.send_reset(h2::Reason::NO_ERROR);

    let mut forward = Forward::new(body, RequestFraming::Length(100), None);
    let ended = std::future::poll_fn(|cx| {
        loop {
            if let Err(error) = forward.fill(cx, None) {
                return Poll::Ready(Err(error));
            }
            if forward.ended {
                return Poll::Ready(Ok(()));
            }
            if forward.is_empty() {
                return Poll::Pending;
            }
            // Taken as written.
            forward.advance(forward.data.len());
        }
    })
    .await;
    assert!(
        matches!(
            ended,
            Err(ExchangeError::RequestBody(BodyError::Length {
                declared: 100,
                sent: 10
            }))
        ),
        "{ended:?}"
    );
}

#[test]
fn an_upstream_address_is_host_and_port_with_or_without_http() {
    for (given, parsed) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),
        ("HTTP://app.internal:9000/", "app.internal:9000"),
        ("http://localhost", "localhost:80"),
        ("localhost", "localhost:80"),
        ("[::1]:8080", "[::1]:8080"),
        ("http://[::1]", "[::1]:80"),
    ] {
        assert_eq!(parse_address(given).unwrap().as_str(), parsed, "{given}");
    }
    for (given, says) in [
        ("https://127.0.0.1:8443", "scheme must be http"),
        ("unix:///run/app.sock", "scheme must be http"),
        ("http://127.0.0.1:8080/api", "without a path"),
        ("127.0.0.1:8080?x=1", "without a path"),
        ("http://user@127.0.0.1:8080", "without user information"),
        ("127.0.0.1:0", "port cannot be 0"),
        ("127.0.0.1:", "port"),
        ("", "host"),
        ("http://", "host"),
        ("127.0.0.1:99999", "port"),
    ] {
        let error = parse_address(given).expect_err(given);
        assert!(error.contains(says), "{given}: {error}");
    }
}
