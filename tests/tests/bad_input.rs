//! Bad input against the real binaries: a malformed-request corpus for the sidecar (it never
//! crashes, never forwards an ambiguous request, keeps serving others) and malformed or
//! oversized gRPC for the control plane (clear errors, nothing stored).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use corsair_proto::v1;
use support::{Backend, Deadline, ORIGIN, Plane, Served, bearer, request, revision_of};

/// Sends `raw` on a new connection and reads until the sidecar answers and closes, or stops
/// answering (the connection is closed after a reply to a malformed request); the
/// response, lowercased.
fn send_raw(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The sidecar may answer and close before everything is written.
    let _ = stream.write_all(raw);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).to_ascii_lowercase()
}

fn status(response: &str) -> Option<u16> {
    response.get(9..12).and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_survives_a_malformed_request_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(Backend::Sqlite, dir.path(), &[])
        .await
        .unwrap();
    let Served {
        upstream,
        mut sidecars,
        ..
    } = plane
        .serve(0, 1, dir.path(), &["--client-header-timeout-secs", "1"])
        .await;
    let sidecar = sidecars.pop().unwrap();
    let addr = sidecar.addr;
    let host = format!("Host: {addr}\r\n");

    let huge_value = "a".repeat(200 * 1024);
    let many_headers: String = (0..5000).map(|i| format!("X-Repeat: {i}\r\n")).collect();
    let huge_acrh: String = (0..3000)
        .map(|i| format!("x-h{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        (
            "oversized header",
            format!("GET /bad HTTP/1.1\r\n{host}X-Big: {huge_value}\r\n\r\n").into_bytes(),
        ),
        (
            "thousands of repeated headers",
            format!("GET /bad HTTP/1.1\r\n{host}{many_headers}\r\n").into_bytes(),
        ),
        (
            "invalid header bytes",
            [
                format!("GET /bad HTTP/1.1\r\n{host}X-Bad: ").as_bytes(),
                b"a\x00\x01b",
                b"\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "invalid header name",
            format!("GET /bad HTTP/1.1\r\n{host}Bad Name: x\r\n\r\n").into_bytes(),
        ),
        (
            "content-length and transfer-encoding",
            format!(
                "POST /bad HTTP/1.1\r\n{host}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\n\r\nGET /smuggled HTTP/1.1\r\n{host}\r\n"
            )
            .into_bytes(),
        ),
        (
            "conflicting content-lengths",
            format!(
                "POST /bad HTTP/1.1\r\n{host}Content-Length: 4\r\nContent-Length: 40\r\n\r\n\
                 abcdGET /smuggled HTTP/1.1\r\n{host}\r\n"
            )
            .into_bytes(),
        ),
        (
            "obfuscated transfer-encoding",
            format!(
                "POST /bad HTTP/1.1\r\n{host}Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n\
                 abcdGET /smuggled HTTP/1.1\r\n{host}\r\n"
            )
            .into_bytes(),
        ),
        (
            "space before the colon",
            format!(
                "POST /bad HTTP/1.1\r\n{host}Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n\
                 abcdGET /smuggled HTTP/1.1\r\n{host}\r\n"
            )
            .into_bytes(),
        ),
        (
            "a bad request line",
            b"GET /bad HTTP/9.9 extra\r\n\r\n".to_vec(),
        ),
        (
            "a huge Access-Control-Request-Headers",
            format!(
                "OPTIONS /bad HTTP/1.1\r\n{host}Origin: {ORIGIN}\r\n\
                 Access-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: {huge_acrh}\r\n\
                 Connection: close\r\n\r\n"
            )
            .into_bytes(),
        ),
    ];
    for (name, raw) in &corpus {
        let response = send_raw(addr, raw);
        if let Some(code) = status(&response) {
            // Both lengths: Transfer-Encoding wins, Content-Length is dropped, and the
            // connection closes after the answer (RFC 9112 §6.3), so nothing after the
            // chunked body is read as a request. Everything else malformed is refused.
            let allowed = match *name {
                "content-length and transfer-encoding" => code == 200,
                "a huge Access-Control-Request-Headers" => code == 204,
                _ => (400..500).contains(&code),
            };
            assert!(allowed, "{name}: {code}");
        }
        // Whatever the answer, the sidecar is alive and serves a good request at once.
        let (code, head) = request(addr, "GET", "/good", &[("Origin", ORIGIN)])
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
        assert_eq!(code, 200, "after {name}");
        assert_eq!(revision_of(&head), Ok(1), "after {name}");
    }
    // Nothing ambiguous reached the upstream: no smuggled request, no malformed one.
    let seen = upstream.seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|r| r.contains("/smuggled")), "{seen:?}");
    assert!(
        seen.iter().all(|r| r == "GET /good" || r == "POST /bad"),
        "{seen:?}"
    );

    // Slow headers: connections that never finish their headers are closed after the
    // header timeout, and others are served meanwhile.
    let slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /slow HTTP/1.1\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    for _ in 0..20 {
        let (code, _) = request(addr, "GET", "/good", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(code, 200);
    }
    let deadline = Deadline::new("the sidecar to close 20 connections whose heads never end");
    for mut s in slow {
        let left = deadline.remaining().max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        let mut rest = Vec::new();
        // Returns once the sidecar closes the connection (with a 408 or nothing).
        if let Err(e) = s.read_to_end(&mut rest)
            && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
        {
            deadline.expire(format_args!("{} bytes, then nothing", rest.len()));
        }
    }
    assert!(
        !upstream
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("/slow"))
    );
    assert!(
        sidecar.process.terminate(),
        "the sidecar exits cleanly after all this"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_refuses_malformed_and_oversized_calls() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(Backend::Sqlite, dir.path(), &[])
        .await
        .unwrap();
    let grpc = plane.channel(0);
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(grpc.clone());

    // Bytes that are not a CreatePolicyRequest.
    let mut raw = tonic::client::Grpc::new(grpc.clone());
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(vec![0xffu8, 0xff, 0xff, 0x0f, 0x12]);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", support::ADMIN).parse().unwrap(),
    );
    let garbage = raw
        .unary(
            request,
            http::uri::PathAndQuery::from_static("/corsair.v1.PolicyService/CreatePolicy"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            garbage.code(),
            tonic::Code::Internal | tonic::Code::InvalidArgument
        ),
        "{garbage:?}"
    );

    // A message over the size limit.
    let oversized = policies
        .create_policy(bearer(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "big".into(),
                allowed_origins: vec!["https://a.example.com".repeat(1000); 300],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");

    // Too many entries, within the size limit: refused by validation, naming the field.
    let many = policies
        .create_policy(bearer(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "many".into(),
                allowed_methods: (0..300).map(|i| format!("M{i}")).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(many.code(), tonic::Code::InvalidArgument);
    assert!(many.message().contains("allowed_methods"), "{many:?}");

    // Nothing stored, and the audit chain verifies.
    let listed = policies
        .list_policies(bearer(v1::ListPoliciesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.policies.is_empty());
    let verified = v1::audit_service_client::AuditServiceClient::new(grpc)
        .verify_audit_chain(bearer(v1::VerifyAuditChainRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok);
    drop(plane);
}

/// Sends raw bytes as a gRPC message and reads any answer as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}
