//! Hostile clients against the real binaries. The control plane: silent connections and
//! descriptor exhaustion under a low `ulimit -n`, oversized fields, huge pages, long
//! validation errors, a sidecar credential that floods the fleet, absurd token lifetimes and
//! verification ranges, and bytes that are not protobuf. The sidecar: idle HTTP/2
//! connections and half-sent header blocks under a low `ulimit -n`, and requests it cannot
//! forward faithfully. Each asserts that the attack gets a clear answer or a bounded cost,
//! and that a legitimate client is served meanwhile or right after.

#[macro_use]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use corsair_proto::v1;
use support::{
    ADMIN, Backend, ControlPlane, Deadline, Plane, bearer, cpu_ticks, free_port, rss_and_fds,
    within,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

on_both_backends!(
    oversized_and_malformed_requests_get_clear_errors_and_store_bounded_text,
    huge_policies_page_within_a_stock_clients_limit,
);

fn policies(channel: &Channel) -> v1::policy_service_client::PolicyServiceClient<Channel> {
    v1::policy_service_client::PolicyServiceClient::new(channel.clone())
}

fn audit(channel: &Channel) -> v1::audit_service_client::AuditServiceClient<Channel> {
    v1::audit_service_client::AuditServiceClient::new(channel.clone())
}

fn reason_of(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// `count` origins of about 30 bytes each.
fn origins(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("https://host{i:06}.example.com"))
        .collect()
}

/// Silent TCP connections, more than the process has descriptors: they are closed at the
/// first-byte deadline, the accept loop neither spins nor floods the log, and a legitimate
/// client is served once its connection is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_descriptor_exhaustion_do_not_stop_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start_limited(
        &format!("sqlite://{}", dir.path().join("cp.db").display()),
        port,
        &["--first-byte-timeout-secs", "2"],
        Some(128),
    );
    let pid = cp.process.child.id();
    let addr = format!("127.0.0.1:{port}");
    // The cap was lowered to fit 128 descriptors.
    assert!(
        cp.process.logged("--max-connections lowered"),
        "the cap follows ulimit -n"
    );

    let before = cpu_ticks(pid);
    let started = Instant::now();
    let hogs: Vec<TcpStream> = (0..400)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    // A legitimate call, queued behind every hog.
    let channel = Channel::from_shared(cp.url.clone()).unwrap().connect_lazy();
    let served = within("a legitimate call behind 400 silent connections", async {
        loop {
            let call = policies(&channel)
                .list_policies(bearer(v1::ListPoliciesRequest::default()))
                .await;
            match call {
                Ok(_) => break,
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
        started.elapsed()
    })
    .await;
    let ticks = cpu_ticks(pid) - before;
    eprintln!(
        "served after {served:?} behind 400 silent connections; control plane CPU {} ms",
        ticks * 10
    );
    // Every hog was closed by the server; none is still held.
    for mut hog in hogs {
        hog.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut byte = [0u8; 1];
        closed_by_peer(hog.read(&mut byte).map(|_| ()));
    }
    // Waiting is not spinning: the CPU it took is a small share of the time it waited.
    let waited_ms = started.elapsed().as_millis() as u64;
    assert!(
        ticks * 10 < waited_ms / 2,
        "{} ms of CPU in {waited_ms} ms",
        ticks * 10
    );
    let lines = cp.process.log.lock().unwrap().len();
    assert!(lines < 200, "the log stays bounded: {lines} lines");
    let (_, fds) = rss_and_fds(pid);
    assert!(fds <= 128, "{fds} descriptors");
}

async fn oversized_and_malformed_requests_get_clear_errors_and_store_bounded_text(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(plane) =
        Plane::start(backend, dir.path(), &["--max-sidecars-per-identity", "3"]).await
    else {
        return;
    };
    let channel = plane.channel(0);

    // A 3 MiB reason is refused before the store, and the refusal stores 1 KiB of it.
    let refused = policies(&channel)
        .create_policy(bearer(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "shop".into(),
                allowed_origins: vec!["https://a.example.com".into()],
                ..Default::default()
            }),
            reason: "r".repeat(3 * 1024 * 1024),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&refused), "INVALID_REASON");
    let events = audit(&channel)
        .list_audit_events(bearer(v1::ListAuditEventsRequest {
            method: "CreatePolicy".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);
    assert!(events[0].reason.len() <= 1024, "{}", events[0].reason.len());

    // Fifty 3 KB invalid origins: a readable INVALID_ARGUMENT, not a broken transport.
    let long = (0..50)
        .map(|i| format!("https://{}{i}.example.com/path", "x".repeat(3000)))
        .collect();
    let invalid = policies(&channel)
        .create_policy(bearer(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "shop".into(),
                allowed_origins: long,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert_eq!(reason_of(&invalid), "INVALID_POLICY");
    let details = invalid.get_details_error_info().unwrap();
    assert_eq!(details.metadata["violations"], "50");
    let violations = invalid.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations.len(), 20);
    assert!(violations.iter().all(|v| v.description.len() <= 256));
    assert!(
        invalid.message().contains("and 45 more"),
        "{}",
        invalid.message()
    );

    // Tokens that would outlive a timestamp, and verification ranges that make no sense.
    let mut tokens = v1::token_service_client::TokenServiceClient::new(channel.clone());
    let forever = tokens
        .create_token(bearer(v1::CreateTokenRequest {
            display_name: "forever".into(),
            role: "viewer".into(),
            ttl_seconds: 8000 * 365 * 24 * 3600,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&forever), "INVALID_TTL_SECONDS");
    let verify = |start_sequence, end_sequence| {
        let mut audit = audit(&channel);
        async move {
            audit
                .verify_audit_chain(bearer(v1::VerifyAuditChainRequest {
                    start_sequence,
                    end_sequence,
                }))
                .await
        }
    };
    let whole = verify(0, u64::MAX).await.unwrap().into_inner();
    assert!(whole.ok, "{whole:?}");
    assert_eq!(
        whole.end_sequence, whole.verified_events,
        "clamped to the log"
    );
    let reversed = verify(10, 5).await.unwrap_err();
    assert_eq!(reason_of(&reversed), "INVALID_END_SEQUENCE");
    let past = verify(1000, 0).await.unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange);
    assert_eq!(reason_of(&past), "START_PAST_END");

    // Bytes that are not the expected message: INVALID_ARGUMENT, not INTERNAL.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<prost_types::Timestamp, v1::Policy>::default();
    let mut garbage = tonic::Request::new(prost_types::Timestamp {
        seconds: 5,
        nanos: 0,
    });
    garbage
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    let malformed = grpc
        .unary(
            garbage,
            "/corsair.v1.PolicyService/GetPolicy".parse().unwrap(),
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    assert_eq!(reason_of(&malformed), "MESSAGE_MALFORMED");

    // A sidecar credential: bounded Hello fields, and a bounded number of live streams.
    let secret = support::sidecar_token(&channel).await;
    let open = |id: String, host: String| {
        let channel = channel.clone();
        let secret = secret.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(v1::DiscoveryRequest {
                kind: Some(v1::discovery_request::Kind::Hello(v1::Hello {
                    sidecar_id: id,
                    services: vec![support::SERVICE.into()],
                    host,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {secret}").parse().unwrap());
            let mut stream = v1::discovery_service_client::DiscoveryServiceClient::new(channel)
                .stream_policies(request)
                .await?
                .into_inner();
            let first = stream.message().await;
            Ok::<_, tonic::Status>((tx, stream, first))
        }
    };
    let huge_host = open("big".into(), "h".repeat(2 * 1024 * 1024)).await;
    let refused = match huge_host {
        Err(status) | Ok((_, _, Err(status))) => status,
        Ok((_, _, first)) => panic!("a 2 MiB host was taken: {first:?}"),
    };
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let mut held = Vec::new();
    for i in 0..3 {
        let (tx, stream, first) = open(format!("s{i}"), "host".into()).await.unwrap();
        assert!(first.is_ok(), "stream {i}: {first:?}");
        held.push((tx, stream));
    }
    let fourth = match open("s3".into(), "host".into()).await {
        Err(status) | Ok((_, _, Err(status))) => status,
        Ok(_) => panic!("a fourth stream of one credential was let in"),
    };
    assert_eq!(fourth.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&fourth), "SIDECARS_PER_IDENTITY_EXCEEDED");
    drop(held);
}

/// Policies of 20,000 origins: every listing pages within a stock client's 4 MiB limit, the
/// control plane's memory stays bounded while it lists them, and corsairctl reads every page.
async fn huge_policies_page_within_a_stock_clients_limit(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(plane) = Plane::start(backend, dir.path(), &[]).await else {
        return;
    };
    let channel = plane.channel(0);
    let big = origins(20_000);
    for i in 0..BIG_POLICIES {
        let mut p = v1::Policy {
            service: format!("big-{i}"),
            allowed_origins: big.clone(),
            ..Default::default()
        };
        let created = policies(&channel)
            .create_policy(bearer(v1::CreatePolicyRequest {
                policy: Some(p.clone()),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        // An update, so the audit log holds events with a large policy before and after.
        p.etag = created.etag;
        p.allowed_methods = vec!["PUT".into()];
        policies(&channel)
            .update_policy(bearer(v1::UpdatePolicyRequest {
                policy: Some(p),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let pid = plane.replica(0).process.child.id();

    // A legitimate reader's latency, alone and then while the listings below run.
    policies(&channel)
        .create_policy(bearer(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "small".into(),
                allowed_origins: vec!["https://a.example.com".into()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    let quiet = reads(channel.clone(), 200).await;
    let reader = tokio::spawn(reads(channel.clone(), 200));

    // A stock client (4 MiB limit) asks for 1,000 a page and gets every policy, page by page.
    let mut seen = 0;
    let mut token = String::new();
    let deadline = Deadline::new("the policy listing to end");
    loop {
        let page = policies(&channel)
            .list_policies(bearer(v1::ListPoliciesRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(!page.policies.is_empty());
        seen += page.policies.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        deadline.check(format!("{seen} policies"));
    }
    assert_eq!(seen, BIG_POLICIES + 1);
    let mut events = 0;
    let mut token = String::new();
    loop {
        let page = audit(&channel)
            .list_audit_events(bearer(v1::ListAuditEventsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        events += page.events.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        deadline.check(format!("{events} events"));
    }
    assert!(events >= 2 * BIG_POLICIES, "{events}");
    let busy = within("the legitimate reads", reader).await.unwrap();
    eprintln!(
        "GetPolicy p50/p99 alone {:?}/{:?}, while listing huge pages {:?}/{:?}",
        percentile(&quiet, 50),
        percentile(&quiet, 99),
        percentile(&busy, 50),
        percentile(&busy, 99)
    );
    let (rss_kib, _) = rss_and_fds(pid);
    eprintln!("control plane RSS after listing: {} MiB", rss_kib / 1024);
    assert!(rss_kib < 512 * 1024, "{rss_kib} KiB");

    // corsairctl reads the same listings whole.
    let ctl = |args: &[&str]| {
        std::process::Command::new(support::binary("corsairctl"))
            .args(["--addr", &plane.replica(0).url, "-o", "json"])
            .args(args)
            .env("CORSAIR_TOKEN", ADMIN)
            .output()
            .unwrap()
    };
    for args in [
        &["policy", "list"][..],
        &["audit", "list", "--limit", "1000"][..],
    ] {
        let out = ctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Large policies made by [`huge_policies_page_within_a_stock_clients_limit`]: eight of about
/// 640 KB, more than a stock client's 4 MiB together.
const BIG_POLICIES: usize = 8;

/// The latencies of `count` sequential `GetPolicy` calls of a small policy.
async fn reads(channel: Channel, count: usize) -> Vec<Duration> {
    let mut client = policies(&channel);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let found = client
            .get_policy(bearer(v1::GetPolicyRequest {
                name: "services/small/policy".into(),
                ..Default::default()
            }))
            .await;
        assert!(found.is_ok(), "{found:?}");
        latencies.push(started.elapsed());
    }
    latencies
}

/// Fails unless a read ended because the peer closed (or reset) the connection, rather than
/// because the read timed out with the connection still open.
fn closed_by_peer(read: std::io::Result<()>) {
    if let Err(e) = read {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the connection was never closed by the server"
        );
    }
}

/// The `p`th percentile of `latencies`.
fn percentile(latencies: &[Duration], p: usize) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// A HEADERS frame on stream 1 without END_HEADERS: one indexed field (`:method: GET`), and
/// then the CONTINUATION that never comes.
const HALF_HEADERS: &[u8] = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82";

/// A sidecar in front of a real upstream, synced to the first policy, with `extra` flags and
/// at most `nofile` descriptors.
async fn hostile_sidecar(
    dir: &std::path::Path,
    extra: &[&str],
    nofile: Option<u32>,
) -> (Plane, support::Upstream, support::Sidecar) {
    let plane = Plane::start(Backend::Sqlite, dir, &[]).await.unwrap();
    let grpc = plane.channel(0);
    let upstream = support::Upstream::start().await;
    let revision = support::write_policy(&grpc, 1).await;
    let token = support::sidecar_token(&grpc).await;
    let sidecar = support::Sidecar::start_limited(
        &plane.addresses(),
        upstream.addr,
        &dir.join("sidecar.cache"),
        &token,
        "hostile",
        extra,
        nofile,
    );
    support::converged(&grpc, 1, revision).await;
    (plane, upstream, sidecar)
}

/// A legitimate cross-origin request through the sidecar; its status and how long it took.
fn legitimate(addr: SocketAddr) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = support::request(addr, "GET", "/ok", &[("Origin", support::ORIGIN)])
        .unwrap_or_else(|e| panic!("a legitimate request: {e}"));
    (status, started.elapsed())
}

/// Idle HTTP/2 connections (the preface and SETTINGS, then nothing) and HEADERS without
/// END_HEADERS, more of them than the sidecar has descriptors: each is closed at its deadline,
/// the sidecar's CPU and log stay small, and legitimate requests are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_and_half_sent_headers_do_not_stop_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let (_plane, _upstream, sidecar) = hostile_sidecar(
        dir.path(),
        &[
            "--http2-idle-timeout-secs",
            "2",
            "--client-header-timeout-secs",
            "2",
        ],
        Some(256),
    )
    .await;
    let pid = sidecar.process.child.id();
    let before = cpu_ticks(pid);
    let lines_before = sidecar.process.log.lock().unwrap().len();
    let started = Instant::now();
    let hogs: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut hog = TcpStream::connect(sidecar.addr).unwrap();
            let _ = hog.write_all(PREFACE);
            if i % 2 == 1 {
                let _ = hog.write_all(HALF_HEADERS);
            }
            hog
        })
        .collect();
    // Legitimate requests while the hogs hold their connections, one after another.
    let addr = sidecar.addr;
    let latencies = tokio::task::spawn_blocking(move || {
        (0..50)
            .map(|_| {
                let (status, took) = legitimate(addr);
                assert_eq!(status, 200);
                took
            })
            .collect::<Vec<_>>()
    });
    let latencies = within("50 legitimate requests beside 300 hogs", latencies)
        .await
        .unwrap();
    for mut hog in hogs {
        hog.set_read_timeout(Some(support::PATIENCE)).unwrap();
        // The server's SETTINGS, maybe a GOAWAY, then the end.
        closed_by_peer(hog.read_to_end(&mut Vec::new()).map(|_| ()));
    }
    let ticks = cpu_ticks(pid) - before;
    let waited_ms = started.elapsed().as_millis() as u64;
    eprintln!(
        "legitimate p50/p99 beside 300 HTTP/2 hogs: {:?}/{:?}; sidecar CPU {} ms in {waited_ms} ms",
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        ticks * 10
    );
    assert!(
        ticks * 10 < waited_ms / 2,
        "{} ms of CPU in {waited_ms} ms",
        ticks * 10
    );
    let lines = sidecar.process.log.lock().unwrap().len() - lines_before;
    assert!(lines < 200, "the log stays bounded: {lines} lines");
    let (_, fds) = rss_and_fds(pid);
    assert!(fds <= 256, "{fds} descriptors");
    assert_eq!(
        legitimate(sidecar.addr).0,
        200,
        "served after the hogs are gone"
    );
}

/// Requests the sidecar cannot forward faithfully: two `Host` headers, none, one that is not a
/// host, a transfer coding other than a lone `chunked`. Each is refused, and the upstream
/// never sees one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_requests_are_refused_and_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let (_plane, upstream, sidecar) = hostile_sidecar(dir.path(), &[], None).await;
    let cases: [(&str, &str, &[u16]); 4] = [
        (
            "two Host headers",
            "GET /two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            &[400],
        ),
        ("no Host", "GET /no-host HTTP/1.1\r\n\r\n", &[400]),
        (
            "a Host that is not a host",
            "GET /bad-host HTTP/1.1\r\nHost: a b\r\n\r\n",
            &[400],
        ),
        (
            "gzip, chunked",
            "POST /gzip HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            &[400, 501],
        ),
    ];
    for (what, raw, expected) in cases {
        let mut stream = TcpStream::connect(sidecar.addr).unwrap();
        stream.set_read_timeout(Some(support::PATIENCE)).unwrap();
        stream.write_all(raw.as_bytes()).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let status: u16 = String::from_utf8_lossy(&response)
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no answer: {response:?}"));
        assert!(expected.contains(&status), "{what}: {status}");
    }
    assert_eq!(legitimate(sidecar.addr).0, 200);
    let seen = upstream.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["GET /ok"],
        "only the legitimate request reached the upstream"
    );
}
