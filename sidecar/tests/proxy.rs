//! The proxy against a real upstream on port 0: local preflights, merged headers, enforce
//! mode, hop-by-hop headers, forwarding headers, streamed bodies, upstream failure, the
//! no-policy setting, upgrades, metrics, hot swaps (one, and many under load), and HTTP/1
//! keep-alive connections giving back their buffers while idle.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use corsair_policy::Scheme;
use corsair_proto::v1;
use corsair_sidecar::metrics::Observer;
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::proxy::{self, NoPolicy, ProxyConfig};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Deadline, within};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// An upstream that counts requests, echoes the body, reports what it saw in `x-saw-*`
/// headers, and sends its own (to be replaced) `Access-Control-Allow-Origin: *`.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let saw = |name: &str| {
                            req.headers()
                                .get(name)
                                .cloned()
                                .unwrap_or_else(|| "-".parse().unwrap())
                        };
                        let mut response = Response::builder()
                            .header("access-control-allow-origin", "*")
                            .header("vary", "Accept-Encoding")
                            .header("x-saw-forwarded-for", saw("x-forwarded-for"))
                            .header("x-saw-forwarded-proto", saw("x-forwarded-proto"))
                            .header("x-saw-forwarded-host", saw("x-forwarded-host"))
                            .header("x-saw-secret", saw("x-secret"))
                            .header("x-saw-connection", saw("connection"))
                            .header("x-saw-path", req.uri().path())
                            .header("x-saw-uri", req.uri().to_string())
                            .header("x-saw-host", saw("host"));
                        if req.uri().path() == "/error" {
                            response = response.status(500);
                        }
                        let asks_upgrade =
                            req.headers().get("upgrade").is_some_and(|v| v == "echo")
                                && req.headers().get("connection").is_some_and(|v| {
                                    v.to_str().unwrap().eq_ignore_ascii_case("upgrade")
                                });
                        if req.uri().path() == "/upgrade" && !asks_upgrade {
                            let response = response
                                .status(StatusCode::BAD_REQUEST)
                                .body(Full::new(Bytes::from_static(b"no upgrade asked\n")))
                                .unwrap();
                            return Ok::<_, Infallible>(response);
                        }
                        if req.uri().path() == "/upgrade" {
                            // Switch to an echo protocol: every byte comes back.
                            let upgrade = hyper::upgrade::on(req);
                            tokio::spawn(async move {
                                let io = upgrade.await.unwrap();
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            });
                            let response = response
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "echo")
                                .body(Full::new(Bytes::new()))
                                .unwrap();
                            return Ok::<_, Infallible>(response);
                        }
                        if req.uri().path() == "/hang" {
                            // Never answers.
                            std::future::pending::<()>().await;
                        }
                        if req.uri().path() == "/early" {
                            // Answer before the request body has arrived, reading it later.
                            tokio::spawn(req.into_body().collect());
                            let body = Full::new(Bytes::from_static(b"early"));
                            return Ok::<_, Infallible>(response.body(body).unwrap());
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Ok::<_, Infallible>(response.body(Full::new(body)).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, hits)
}

struct Sidecar {
    addr: SocketAddr,
    set: Arc<PolicySet>,
    observer: Observer,
    stop: Option<oneshot::Sender<()>>,
}

impl Sidecar {
    async fn start(upstream: SocketAddr, no_policy: NoPolicy) -> Sidecar {
        Sidecar::with_timeouts(upstream, no_policy, proxy::Timeouts::default()).await
    }

    async fn with_timeouts(
        upstream: SocketAddr,
        no_policy: NoPolicy,
        timeouts: proxy::Timeouts,
    ) -> Sidecar {
        Sidecar::with_limits(upstream, no_policy, timeouts, proxy::Limits::default()).await
    }

    async fn with_limits(
        upstream: SocketAddr,
        no_policy: NoPolicy,
        timeouts: proxy::Timeouts,
        limits: proxy::Limits,
    ) -> Sidecar {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let set = Arc::new(PolicySet::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let observer = Observer::default();
        let config = ProxyConfig {
            upstream: upstream.to_string().parse().unwrap(),
            service: "shop".into(),
            public_scheme: Scheme::Http,
            no_policy,
            timeouts,
            limits,
            observer: observer.clone(),
        };
        tokio::spawn(proxy::serve(listener, set.clone(), config, async {
            let _ = stopped.await;
        }));
        Sidecar {
            addr,
            set,
            observer,
            stop: Some(stop),
        }
    }

    /// A sidecar passing requests through without a policy, with `response` as its response
    /// timeout and the other timeouts at their defaults.
    async fn with_response_timeout(upstream: SocketAddr, response: std::time::Duration) -> Sidecar {
        let timeouts = proxy::Timeouts {
            response,
            ..proxy::Timeouts::default()
        };
        Sidecar::with_timeouts(upstream, NoPolicy::PassThrough, timeouts).await
    }

    fn policy(&self, revision: i64, origins: &[&str], mode: v1::PolicyMode) {
        self.set
            .apply(&v1::DiscoveryResponse {
                revision,
                snapshot: true,
                upserts: vec![v1::Policy {
                    service: "shop".into(),
                    allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
                    allowed_methods: vec!["PUT".into()],
                    allowed_headers: vec!["x-custom".into()],
                    mode: mode as i32,
                    revision,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap();
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        self.send_with(
            Client::builder(TokioExecutor::new()).build_http(),
            method,
            path,
            headers,
            body,
        )
        .await
    }

    /// [`Sidecar::send`] through `client`.
    async fn send_with(
        &self,
        client: Client<HttpConnector, Full<Bytes>>,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let request = req
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let what = format!("the sidecar's whole answer to {} {path}", request.method());
        within(&what, async {
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, headers, body)
        })
        .await
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const APP: &str = "https://app.example.com";

/// A client that speaks HTTP/2 over cleartext from its first byte (prior knowledge) gets the
/// same answers: preflights locally, actual requests proxied with the policy's headers.
#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let h2 = || {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http()
    };
    let (status, headers, _) = sidecar
        .send_with(
            h2(),
            Method::OPTIONS,
            "/x",
            &[("origin", APP), ("access-control-request-method", "PUT")],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], APP);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let (status, headers, body) = sidecar
        .send_with(h2(), Method::POST, "/x", &[("origin", APP)], "over h2")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], APP);
    assert_eq!(body, "over h2");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// The upstream gets every request in origin form with a `Host`: an HTTP/1 request in
/// absolute form, one whose `Connection` names `Host`, an HTTP/2 request (whose authority
/// becomes `Host`) and an ordinary one.
#[tokio::test]
async fn requests_reach_the_upstream_in_origin_form_with_a_host() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    // The absolute form's authority wins over `Host` (RFC 9112 §3.2.2), without user
    // information.
    raw.send(b"GET http://me@shop.example/abs?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
        .await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-uri"), Some("/abs?q=1"));
    assert_eq!(header(&headers, "x-saw-host"), Some("shop.example"));
    // `Host` stays, even named by `Connection`.
    raw.send(b"GET /named HTTP/1.1\r\nHost: shop.example\r\nConnection: host\r\n\r\n")
        .await;
    let (_, headers, _) = raw.response().await;
    assert_eq!(header(&headers, "x-saw-host"), Some("shop.example"));
    raw.send(b"GET /plain?q=2 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await;
    let (_, headers, _) = raw.response().await;
    assert_eq!(header(&headers, "x-saw-uri"), Some("/plain?q=2"));
    assert_eq!(header(&headers, "x-saw-host"), Some("shop.example"));
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (status, headers, _) = sidecar.send_with(h2, Method::GET, "/h2?q=3", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-saw-uri"], "/h2?q=3");
    assert_eq!(headers["x-saw-host"], sidecar.addr.to_string());
}

/// A request head (target and fields) over 64 KiB is answered `431` and never forwarded;
/// one just under it is, and the connection carries on after the refusal.
#[tokio::test]
async fn a_request_head_over_64_kib_is_refused_and_never_forwarded() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    let fields = |kib: usize| -> String {
        (0..kib)
            .map(|i| format!("x-f{i:03}: {}\r\n", "a".repeat(1024 - 10)))
            .collect()
    };
    raw.send(format!("GET /under HTTP/1.1\r\nHost: a\r\n{}\r\n", fields(63)).as_bytes())
        .await;
    let (status, _, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    raw.send(format!("GET /over HTTP/1.1\r\nHost: a\r\n{}\r\n", fields(65)).as_bytes())
        .await;
    let (status, _, body) = raw.response().await;
    assert_eq!(status, 431);
    assert_eq!(body, "request header fields too large\n");
    // The target counts too.
    let long_target = format!("/{}", "t".repeat(40 * 1024));
    raw.send(
        format!(
            "GET {long_target} HTTP/1.1\r\nHost: a\r\n{}\r\n",
            fields(30)
        )
        .as_bytes(),
    )
    .await;
    let (status, _, _) = raw.response().await;
    assert_eq!(status, 431);
    raw.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/after"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "neither refused head was forwarded"
    );
}

/// A client that connects and sends nothing, or only part of the HTTP/2 preface, is closed
/// after the header timeout.
#[tokio::test]
async fn a_silent_client_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::Deny,
        proxy::Timeouts {
            client_headers: std::time::Duration::from_millis(200),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    use tokio::io::AsyncWriteExt;
    let mut silent = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    // One that starts the HTTP/2 preface and stops.
    let mut halfway = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    halfway.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for client in [&mut silent, &mut halfway] {
        let mut byte = [0u8; 1];
        // Closed by the sidecar (EOF or reset), without a byte of response.
        let read = within(
            "the sidecar to close a silent client",
            client.read(&mut byte),
        )
        .await;
        assert!(matches!(read, Ok(0) | Err(_)));
    }
    // Others are served meanwhile and after.
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (status, _, _) = sidecar
        .send(Method::GET, "/x", &[("origin", APP)], "")
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn preflights_are_answered_locally() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (status, headers, body) = sidecar
        .send(
            Method::OPTIONS,
            "/x",
            &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom"),
            ],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers["access-control-allow-origin"], APP);
    assert_eq!(headers["access-control-allow-headers"], "x-custom");
    assert!(body.is_empty());
    assert_eq!(hits.load(Ordering::SeqCst), 0, "never reaches the upstream");
}

#[tokio::test]
async fn actual_requests_get_the_policy_headers_over_the_upstream_ones() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (status, headers, body) = sidecar
        .send(
            Method::POST,
            "/echo",
            &[
                ("origin", APP),
                ("connection", "x-secret"),
                ("x-secret", "1"),
            ],
            "streamed body",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "streamed body");
    assert_eq!(
        headers
            .get_all("access-control-allow-origin")
            .iter()
            .collect::<Vec<_>>(),
        [APP]
    );
    assert_eq!(headers["vary"], "Accept-Encoding, Origin");
    assert_eq!(headers["x-saw-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-saw-forwarded-proto"], "http");
    assert_eq!(
        headers["x-saw-forwarded-host"],
        sidecar.addr.to_string().as_str()
    );
    assert_eq!(
        headers["x-saw-secret"], "-",
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A request that comes through another proxy: its `X-Forwarded-For` is extended, the
    // others replaced.
    let (_, headers, _) = sidecar
        .send(
            Method::GET,
            "/",
            &[
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "spoofed.example"),
            ],
            "",
        )
        .await;
    assert_eq!(headers["x-saw-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-saw-forwarded-proto"], "http");
    assert_eq!(
        headers["x-saw-forwarded-host"],
        sidecar.addr.to_string().as_str()
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // A disallowed origin in standard mode is forwarded, with the upstream's ACAO removed;
    // CORS headers go on error statuses too.
    let (status, headers, _) = sidecar
        .send(Method::GET, "/error", &[("origin", "https://evil.com")], "")
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(headers["vary"], "Accept-Encoding, Origin");
    let (_, headers, _) = sidecar
        .send(Method::GET, "/error", &[("origin", APP)], "")
        .await;
    assert_eq!(headers["access-control-allow-origin"], APP);
}

/// `/public/` open to any origin, `/api/` to the admin origin with credentials (enforced),
/// the rest to `APP`.
fn routed_policy(revision: i64) -> v1::DiscoveryResponse {
    let list = |values: &[&str]| {
        Some(v1::StringList {
            values: values.iter().map(|s| s.to_string()).collect(),
        })
    };
    v1::DiscoveryResponse {
        revision,
        snapshot: true,
        upserts: vec![v1::Policy {
            service: "shop".into(),
            allowed_origins: vec![APP.into()],
            routes: vec![
                v1::Route {
                    path: "/public/".into(),
                    allowed_origins: list(&["*"]),
                    ..Default::default()
                },
                v1::Route {
                    path: "/api/".into(),
                    allowed_origins: list(&[ADMIN]),
                    allow_credentials: Some(true),
                    allowed_methods: list(&["DELETE"]),
                    mode: Some(v1::PolicyMode::Enforce as i32),
                    ..Default::default()
                },
            ],
            revision,
            ..Default::default()
        }],
        ..Default::default()
    }
}

const ADMIN: &str = "https://admin.example.com";
const EVIL: &str = "https://evil.example";

/// Each path gets its route's answer, preflights by their own path, over HTTP/1 and HTTP/2;
/// a path that servers read differently gets none, and reaches the upstream as it was sent.
#[tokio::test]
async fn routes_give_each_path_its_own_answer() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.set.apply(&routed_policy(1)).unwrap();
    let h2 = || {
        Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http()
    };
    let h1 = || Client::builder(TokioExecutor::new()).build_http();
    for client in [h1(), h2()] {
        let (status, headers, _) = sidecar
            .send_with(
                client.clone(),
                Method::GET,
                "/public/logo.png",
                &[("origin", EVIL)],
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(headers.get("access-control-allow-credentials").is_none());

        let (_, headers, _) = sidecar
            .send_with(
                client.clone(),
                Method::GET,
                "/api/orders",
                &[("origin", ADMIN)],
                "",
            )
            .await;
        assert_eq!(headers["access-control-allow-origin"], ADMIN);
        assert_eq!(headers["access-control-allow-credentials"], "true");
        // The enforced route refuses another origin before the upstream.
        let before = hits.load(Ordering::SeqCst);
        let (status, _, _) = sidecar
            .send_with(
                client.clone(),
                Method::GET,
                "/api/orders",
                &[("origin", APP)],
                "",
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(hits.load(Ordering::SeqCst), before);
        // The policy's own rules elsewhere.
        let (_, headers, _) = sidecar
            .send_with(
                client.clone(),
                Method::GET,
                "/orders",
                &[("origin", APP)],
                "",
            )
            .await;
        assert_eq!(headers["access-control-allow-origin"], APP);

        // Preflights are matched by their own path.
        let preflight = |path: &'static str, origin: &'static str| {
            let client = client.clone();
            let sidecar = &sidecar;
            async move {
                sidecar
                    .send_with(
                        client,
                        Method::OPTIONS,
                        path,
                        &[
                            ("origin", origin),
                            ("access-control-request-method", "DELETE"),
                        ],
                        "",
                    )
                    .await
            }
        };
        let (status, headers, _) = preflight("/api/orders/7", ADMIN).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(headers["access-control-allow-methods"], "DELETE");
        assert_eq!(headers["access-control-allow-credentials"], "true");
        let (status, headers, _) = preflight("/public/orders/7", ADMIN).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(
            headers.get("access-control-allow-origin").is_none(),
            "{headers:?}"
        );
    }

    // A path the upstream may read as under `/api/`, sent to look like `/public/`: no CORS
    // headers (the policy enforces a route, so 403), never the public `*`.
    for path in [
        "/public/..%2Fapi/orders",
        "/public/..;/api/orders",
        "//api/orders",
        "/API/orders",
    ] {
        let (status, headers, _) = sidecar
            .send(Method::GET, path, &[("origin", EVIL)], "")
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            headers.get("access-control-allow-origin").is_none(),
            "{path}"
        );
    }
    // Without an Origin it is not CORS, and goes through as it was sent.
    let (status, headers, _) = sidecar
        .send(Method::GET, "/public/..%2Fapi/orders?x=1", &[], "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-saw-uri"], "/public/..%2Fapi/orders?x=1");
    assert!(headers.get("access-control-allow-origin").is_none());
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    let line =
        r#"corsair_sidecar_requests_total{kind="actual",outcome="denied",reason="malformed"} 4"#;
    assert!(metrics.contains(line), "missing {line} in\n{metrics}");
}

#[tokio::test]
async fn enforce_mode_blocks_before_the_upstream() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Enforce);
    let (status, _, _) = sidecar
        .send(Method::GET, "/", &[("origin", "https://evil.com")], "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let (status, _, _) = sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn shadow_mode_changes_nothing_and_counts_what_it_would_deny() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Shadow);
    // The upstream's own headers come back untouched, allowed origin or not.
    for origin in [APP, "https://evil.com"] {
        let (status, headers, _) = sidecar
            .send(Method::GET, "/", &[("origin", origin)], "")
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["access-control-allow-origin"], "*");
    }
    // Preflights go to the upstream too.
    let (status, headers, _) = sidecar
        .send(
            Method::OPTIONS,
            "/",
            &[
                ("origin", "https://evil.com"),
                ("access-control-request-method", "PUT"),
            ],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    for line in [
        r#"corsair_sidecar_requests_total{kind="actual",outcome="allowed",reason="allowed"} 1"#,
        r#"corsair_sidecar_requests_total{kind="actual",outcome="shadow_denied",reason="origin"} 1"#,
        r#"corsair_sidecar_requests_total{kind="preflight",outcome="shadow_denied",reason="origin"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_swap_takes_effect_on_the_next_request() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (_, headers, _) = sidecar
        .send(
            Method::GET,
            "/",
            &[("origin", "https://new.example.com")],
            "",
        )
        .await;
    assert!(headers.get("access-control-allow-origin").is_none());
    sidecar.policy(2, &["https://new.example.com"], v1::PolicyMode::Standard);
    let (_, headers, _) = sidecar
        .send(
            Method::GET,
            "/",
            &[("origin", "https://new.example.com")],
            "",
        )
        .await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://new.example.com"
    );
}

#[tokio::test]
async fn without_a_policy_the_setting_decides() {
    let (up, hits) = upstream().await;
    let deny = Sidecar::start(up, NoPolicy::Deny).await;
    let (status, _, _) = deny.send(Method::GET, "/", &[("origin", APP)], "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = deny.send(Method::GET, "/", &[], "").await;
    assert_eq!(status, StatusCode::OK, "requests without Origin still pass");
    let own = format!("http://{}", deny.addr);
    let (status, _, _) = deny
        .send(Method::GET, "/", &[("origin", own.as_str())], "")
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "same-origin requests are never blocked"
    );
    let pass = Sidecar::start(up, NoPolicy::PassThrough).await;
    let (status, headers, _) = pass.send(Method::GET, "/", &[("origin", APP)], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "*", "untouched");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

/// A body many times hyper's buffers (8 KiB at first, about 400 KiB at most) streams through
/// to the upstream and back, byte for byte.
#[tokio::test]
async fn bodies_many_times_the_buffers_stream_through_whole() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let sent: Bytes = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let request = Request::post(format!("http://{}/echo", sidecar.addr))
        .header("origin", APP)
        .body(Full::new(sent.clone()))
        .unwrap();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let echoed = within("the 4 MiB body echoed back", async {
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["access-control-allow-origin"], APP);
        response.into_body().collect().await.unwrap().to_bytes()
    })
    .await;
    assert!(
        echoed == sent,
        "{} bytes back of {}",
        echoed.len(),
        sent.len()
    );
}

#[tokio::test]
async fn a_dead_upstream_is_a_502() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let sidecar = Sidecar::start(dead, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (status, headers, body) = sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        headers["access-control-allow-origin"], APP,
        "the browser can read the error"
    );
    assert_eq!(body, "upstream unavailable\n");
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504() {
    // Accepts connections and reads nothing back: it never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            held.push(stream);
        }
    });
    let timeouts = proxy::Timeouts {
        response: std::time::Duration::from_millis(50),
        // Nothing but the response timeout ends the request.
        client_headers: std::time::Duration::from_secs(3600),
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(silent, NoPolicy::Deny, timeouts).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    // Over HTTP/1 and over HTTP/2, whose requests run in tasks of their own.
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for client in [Client::builder(TokioExecutor::new()).build_http(), h2] {
        let (status, headers, body) = sidecar
            .send_with(client, Method::GET, "/", &[("origin", APP)], "")
            .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(headers["access-control-allow-origin"], APP);
        assert_eq!(body, "upstream timed out\n");
    }
}

/// On a busy keep-alive connection, a response timeout longer than the header timeout still
/// fires: the connection's timer, set for the header deadline hyper noted while waiting for
/// the next request, fires first, and is set again for the response deadline.
#[tokio::test]
async fn a_response_timeout_after_a_shorter_header_deadline_still_fires() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::PassThrough,
        proxy::Timeouts {
            // Long enough that a slow machine sends the third request within it.
            client_headers: std::time::Duration::from_secs(1),
            response: std::time::Duration::from_secs(2),
            client_busy_gap: std::time::Duration::from_secs(3600),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    let mut raw = Raw::connect(sidecar.addr).await;
    // Two requests close together: the connection then keeps its hyper connection, which
    // waits for the next head with hyper's header timer running.
    for path in ["/first", "/second"] {
        raw.send(format!("GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n").as_bytes())
            .await;
        assert_eq!(raw.response().await.0, 200);
    }
    sidecar.wait_for_connections(0, 1).await;
    raw.send(b"GET /hang HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (504, "upstream timed out\n"));
}

/// The response timeout counts from the end of the request's body: an upload that takes
/// longer than it, arriving steadily, is answered by the upstream.
#[tokio::test]
async fn a_slow_upload_outlasting_the_response_timeout_is_answered() {
    let (up, _) = upstream().await;
    let response = std::time::Duration::from_millis(400);
    let sidecar = Sidecar::with_response_timeout(up, response).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"POST /echo HTTP/1.1\r\nHost: shop\r\nContent-Length: 6\r\n\r\n")
        .await;
    // A slow client: a part of the body every third of the timeout, for twice the timeout.
    for part in [b"sl", b"ow", b"ly"] {
        tokio::time::sleep(response * 2 / 3).await;
        raw.send(part).await;
    }
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (200, "slowly"));
}

/// An upstream that answers each request with `head` and then `parts` of its body, waiting
/// `pause` before each, and then nothing more; it says when the sidecar closes a connection.
async fn stalling_upstream(
    head: &'static str,
    parts: Vec<&'static str>,
    pause: std::time::Duration,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed, closes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (closed, parts) = (closed.clone(), parts.clone());
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                read_head(&mut stream).await;
                stream.get_mut().write_all(head.as_bytes()).await.unwrap();
                for part in parts {
                    tokio::time::sleep(pause).await;
                    stream.get_mut().write_all(part.as_bytes()).await.unwrap();
                }
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                let _ = closed.send(());
            });
        }
    });
    (addr, closes)
}

/// An upstream that stops sending in the middle of a body: once it has sent nothing for the
/// response timeout, the response is cut off (over HTTP/1 the connection closes short of the
/// length; over HTTP/2 the stream is reset), the upstream connection is closed, and it
/// counts as an upstream timeout.
#[tokio::test]
async fn an_upstream_stalled_mid_body_is_cut_off_after_the_response_timeout() {
    use tokio::io::AsyncReadExt;
    let (up, mut closes) = stalling_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        vec!["0123456789"],
        std::time::Duration::ZERO,
    )
    .await;
    let timeouts = proxy::Timeouts {
        response: std::time::Duration::from_millis(200),
        // Nothing but the response timeout ends the request.
        client_headers: std::time::Duration::from_secs(3600),
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(up, NoPolicy::PassThrough, timeouts).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"GET /stall HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let mut received = Vec::new();
    let cut_off = raw.stream.read_to_end(&mut received);
    let _ = within("the sidecar to cut off the stalled response", cut_off).await;
    let received = String::from_utf8(received).unwrap();
    assert!(received.starts_with("HTTP/1.1 200 OK\r\n"), "{received}");
    assert!(received.ends_with("\r\n\r\n0123456789"), "{received}");
    let closed = "the sidecar to close the stalled upstream connection";
    within(closed, closes.recv()).await.unwrap();

    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::get(format!("http://{}/stall", sidecar.addr))
        .body(Full::default())
        .unwrap();
    let response = within(
        "the head of the stalled response over HTTP/2",
        h2.request(request),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect();
    assert!(
        within("the sidecar to reset the stalled stream", body)
            .await
            .is_err()
    );
    within(closed, closes.recv()).await.unwrap();

    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    let line = r#"corsair_sidecar_upstream_errors_total{kind="timeout"} 2"#;
    assert!(metrics.contains(line), "missing {line} in\n{metrics}");
}

/// The response timeout bounds each pause within a response's body, not the whole body: one
/// that comes in parts a third of the timeout apart, for longer than the timeout, arrives
/// whole.
#[tokio::test]
async fn a_slow_response_body_outlasting_the_response_timeout_arrives_whole() {
    let response = std::time::Duration::from_millis(400);
    let (up, _) = stalling_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n",
        vec!["sl", "ow", "ly"],
        response * 2 / 3,
    )
    .await;
    let sidecar = Sidecar::with_response_timeout(up, response).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"GET /slow HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (200, "slowly"));
}

/// Over HTTP/2 the response timeout is kept the same way: a slow upload is answered, an
/// upstream that never answers is a `504`.
#[tokio::test]
async fn over_http2_the_response_timeout_counts_from_the_end_of_the_body() {
    let (up, _) = upstream().await;
    let response = std::time::Duration::from_millis(400);
    let sidecar = Sidecar::with_response_timeout(up, response).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (parts, rx) = tokio::sync::mpsc::channel::<Result<_, Infallible>>(1);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let upload = client.request(
        Request::post(format!("http://{}/echo", sidecar.addr))
            .body(body)
            .unwrap(),
    );
    let slowly = async move {
        for part in ["sl", "ow", "ly"] {
            tokio::time::sleep(response * 2 / 3).await;
            let part = hyper::body::Frame::data(Bytes::from_static(part.as_bytes()));
            parts.send(Ok(part)).await.unwrap();
        }
    };
    let answered = async {
        let (response, ()) = tokio::join!(upload, slowly);
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap().to_bytes()
    };
    let body = within("the answer to a slow upload over HTTP/2", answered).await;
    assert_eq!(body, "slowly");
    let hang = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let (status, _, body) = sidecar.send_with(hang, Method::GET, "/hang", &[], "").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::GATEWAY_TIMEOUT, &b"upstream timed out\n"[..])
    );
}

/// A request body that stops arriving is ended after the response timeout without a byte: a
/// `408`, the client's error, not the upstream's.
#[tokio::test]
async fn a_stalled_upload_is_a_408_after_the_response_timeout() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_response_timeout(up, std::time::Duration::from_millis(200)).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"POST /echo HTTP/1.1\r\nHost: shop\r\nContent-Length: 6\r\n\r\nhal")
        .await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (408, "request body timed out\n"));
    assert!(raw.closed().await);
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    for line in [
        "corsair_sidecar_client_body_errors_total 1",
        r#"corsair_sidecar_upstream_errors_total{kind="timeout"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn upgrades_are_spliced_to_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (mut stream, head) = upgrade_from(&sidecar, APP, "HTTP/1.1", "keep-alive, Upgrade").await;
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(
        head.contains(&format!("access-control-allow-origin: {APP}")),
        "{head}"
    );
    // The connection is now the upstream's echo protocol, both ways.
    for message in [&b"ping"[..], b"\x00\xffbinary", b"GET / HTTP/1.1\r\n\r\n"] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        let echo = stream.read_exact(&mut echoed);
        within("the echo through the tunnel", echo).await.unwrap();
        assert_eq!(echoed, message);
    }
    drop(stream);
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    assert!(
        metrics.contains("corsair_sidecar_upgrades_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn decisions_and_upstream_errors_are_counted() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
    sidecar.policy(7, &[APP], v1::PolicyMode::Enforce);
    sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
    for _ in 0..3 {
        sidecar
            .send(Method::GET, "/", &[("origin", "https://evil.example")], "")
            .await;
    }
    sidecar
        .send(
            Method::OPTIONS,
            "/",
            &[("origin", APP), ("access-control-request-method", "DELETE")],
            "",
        )
        .await;
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    for line in [
        r#"corsair_sidecar_requests_without_policy_total{state="denied"} 1"#,
        r#"corsair_sidecar_requests_total{kind="actual",outcome="allowed",reason="allowed"} 1"#,
        r#"corsair_sidecar_requests_total{kind="actual",outcome="denied",reason="origin"} 3"#,
        r#"corsair_sidecar_requests_total{kind="preflight",outcome="denied",reason="method"} 1"#,
        "corsair_sidecar_policy_revision 7",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }

    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let sidecar = Sidecar::start(dead_addr, NoPolicy::PassThrough).await;
    sidecar.send(Method::GET, "/", &[], "").await;
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    assert!(
        metrics.contains(r#"corsair_sidecar_upstream_errors_total{kind="unavailable"} 1"#),
        "{metrics}"
    );
}

/// Two policies that differ in every header they produce, so a response mixing them shows.
fn variant(revision: i64) -> v1::DiscoveryResponse {
    let odd = revision % 2 == 1;
    v1::DiscoveryResponse {
        revision,
        snapshot: true,
        upserts: vec![v1::Policy {
            service: "shop".into(),
            allowed_origins: vec![APP.into()],
            allowed_methods: vec![if odd { "PUT" } else { "PATCH" }.into()],
            exposed_headers: vec![if odd { "x-odd" } else { "x-even" }.into()],
            allow_credentials: odd,
            max_age_seconds: Some(if odd { 11 } else { 22 }),
            revision,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Which variant produced these headers, or a panic if they mix both or miss one.
fn variant_of(status: StatusCode, headers: &http::HeaderMap, preflight: bool) -> bool {
    let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert!(status.is_success(), "request failed: {status}");
    assert_eq!(get("access-control-allow-origin").as_deref(), Some(APP));
    let credentials = get("access-control-allow-credentials").is_some();
    let odd = if preflight {
        let methods = get("access-control-allow-methods").unwrap();
        let max_age = get("access-control-max-age").unwrap();
        let odd = methods == "PUT";
        assert_eq!(max_age, if odd { "11" } else { "22" }, "mixed: {headers:?}");
        odd
    } else {
        get("access-control-expose-headers").unwrap() == "x-odd"
    };
    assert_eq!(credentials, odd, "mixed: {headers:?}");
    odd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swaps_under_load_fail_nothing_and_never_mix_policies() {
    use std::sync::atomic::AtomicBool;
    let (up, _) = upstream().await;
    let sidecar = Arc::new(Sidecar::start(up, NoPolicy::Deny).await);
    sidecar.set.apply(&variant(1)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..8 {
        let (sidecar, done) = (sidecar.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = [0usize; 2];
            let preflight = client % 2 == 0;
            while !done.load(Ordering::Relaxed) {
                let (status, headers, body) = if preflight {
                    sidecar
                        .send(
                            Method::OPTIONS,
                            "/",
                            &[("origin", APP), ("access-control-request-method", "POST")],
                            "",
                        )
                        .await
                } else {
                    sidecar
                        .send(Method::POST, "/", &[("origin", APP)], "payload")
                        .await
                };
                if !preflight {
                    assert_eq!(body, "payload");
                }
                seen[usize::from(variant_of(status, &headers, preflight))] += 1;
            }
            seen
        }));
    }
    // Each swap is checked by a request of the swapper's own before the next one.
    for revision in 2..=100 {
        sidecar.set.apply(&variant(revision)).unwrap();
        let (status, headers, _) = sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
        assert_eq!(variant_of(status, &headers, false), revision % 2 == 1);
    }
    done.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let seen = client.await.unwrap();
        total += seen[0] + seen[1];
    }
    assert!(total > 0);
}

/// Sends an upgrade request from `origin`; returns the connection and the response head.
async fn upgrade_from(
    sidecar: &Sidecar,
    origin: &str,
    version: &str,
    connection: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /upgrade {version}\r\nHost: {}\r\nOrigin: {origin}\r\nConnection: {connection}\r\nUpgrade: echo\r\n\r\n",
                sidecar.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    within("the head of the answer to an upgrade", async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            head.push(byte[0]);
        }
    })
    .await;
    (stream, String::from_utf8(head).unwrap())
}

/// An upgraded connection stays open while bytes pass, and is closed once none has passed
/// either way for the tunnel idle timeout.
#[tokio::test]
async fn idle_tunnels_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::Deny,
        proxy::Timeouts {
            tunnel_idle: std::time::Duration::from_millis(400),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (mut stream, head) = upgrade_from(&sidecar, APP, "HTTP/1.1", "Upgrade").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A byte every 40 ms, for twice the timeout: echoed every time.
    for i in 0..20u8 {
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
        stream.write_all(&[i]).await.unwrap();
        let mut echo = [0u8; 1];
        let echoed = stream.read_exact(&mut echo);
        within("the echo through the tunnel", echoed).await.unwrap();
        assert_eq!(echo[0], i);
    }
    // Then nothing: closed.
    let mut byte = [0u8; 1];
    let read = within(
        "the sidecar to close the idle tunnel",
        stream.read(&mut byte),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)));
}

#[tokio::test]
async fn upgrades_from_refused_origins_never_reach_the_upstream() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    // Standard mode forwards refused actual requests (the browser blocks them), but browsers
    // do not apply CORS to WebSockets: the sidecar refuses those itself.
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (_, head) = upgrade_from(&sidecar, "https://evil.example", "HTTP/1.1", "Upgrade").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // An HTTP/1.0 request cannot upgrade: `Upgrade` is dropped on the way, so the upstream
    // sees a plain request.
    let (_, head) = upgrade_from(&sidecar, APP, "HTTP/1.0", "Upgrade").await;
    assert!(head.starts_with("HTTP/1.0 400"), "{head}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// An upstream that answers `ok` and reports each connection it accepts and each that ends.
async fn connection_counting_upstream() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                let _ = closed_tx.send(());
            });
        }
    });
    (addr, accepted, closed)
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_when_idle() {
    let (up, accepted, mut closed) = connection_counting_upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::PassThrough,
        proxy::Timeouts {
            upstream_idle: std::time::Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    // One after another: one upstream connection carries them all.
    for _ in 0..50 {
        let (status, _, body) = sidecar.send(Method::GET, "/", &[], "").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Left idle, it is closed by the sidecar, and the next request opens a new one.
    let idle = "the sidecar to close the idle upstream connection";
    within(idle, closed.recv()).await.unwrap();
    let (status, _, _) = sidecar.send(Method::GET, "/", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// On shutdown the sidecar stops accepting, closes idle keep-alive connections, lets the
/// request in flight finish (telling its client to close), and only then returns.
#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that answers only once released, and says when a request has arrived.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    tokio::spawn({
        let (arrived, release) = (arrived.clone(), release.clone());
        async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (arrived, release) = (arrived.clone(), release.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        let (arrived, release) = (arrived.clone(), release.clone());
                        async move {
                            arrived.notify_one();
                            release.notified().await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("done"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let set = Arc::new(PolicySet::default());
    let config = ProxyConfig {
        upstream: up.to_string().parse().unwrap(),
        service: "shop".into(),
        public_scheme: Scheme::Http,
        no_policy: NoPolicy::PassThrough,
        timeouts: proxy::Timeouts::default(),
        limits: proxy::Limits::default(),
        observer: Observer::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(proxy::serve(listener, set, config, async {
        let _ = stopped.await;
    }));

    // An idle keep-alive connection, and one whose request is at the upstream.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();
    within("the request to reach the upstream", arrived.notified()).await;

    stop.send(()).unwrap();
    let mut byte = [0u8; 1];
    let read = within(
        "shutdown to close the idle connection",
        idle.read(&mut byte),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)));
    // The listener closed before the idle connections did: no one is queued meanwhile.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    assert!(!serving.is_finished());

    release.notify_one();
    let mut response = Vec::new();
    let finished = busy.read_to_end(&mut response);
    within("the request in flight to be answered", finished)
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap().to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(response.contains("connection: close"), "{response}");
    assert!(response.ends_with("done"), "{response}");
    within("the sidecar to finish shutting down", serving)
        .await
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Shutdown closes keep-alive connections between requests: one that gave back its hyper
/// connection, and a busy one that kept it.
#[tokio::test]
async fn keep_alive_connections_between_requests_are_closed_at_shutdown() {
    let (up, _) = upstream().await;
    let mut sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::PassThrough,
        proxy::Timeouts {
            // Nothing but shutdown closes them before the test ends.
            client_headers: std::time::Duration::from_secs(3600),
            client_busy_gap: std::time::Duration::from_secs(3600),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    let mut released = Raw::connect(sidecar.addr).await;
    released
        .send(b"GET /one HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    assert_eq!(released.response().await.0, 200);
    sidecar.wait_for_connections(1, 0).await;
    let mut kept = Raw::connect(sidecar.addr).await;
    for path in ["/one", "/two"] {
        kept.send(format!("GET {path} HTTP/1.1\r\nHost: shop\r\n\r\n").as_bytes())
            .await;
        assert_eq!(kept.response().await.0, 200);
    }
    sidecar.wait_for_connections(1, 1).await;
    sidecar.stop.take().unwrap().send(()).unwrap();
    assert!(released.closed().await);
    assert!(kept.closed().await);
}

/// A raw HTTP/1 client connection, to control exactly which bytes go out when.
struct Raw {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream: tokio::io::BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.get_mut().write_all(bytes).await.unwrap();
    }

    /// Reads one response: its status, lowercase headers and body (by `Content-Length`).
    async fn response(&mut self) -> (u16, Vec<(String, String)>, String) {
        within("a whole response on the connection", self.read_response()).await
    }

    async fn read_response(&mut self) -> (u16, Vec<(String, String)>, String) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).await.unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("no response, got {status_line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map_or(0, |(_, value)| value.parse().unwrap());
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await.unwrap();
        (status, headers, String::from_utf8(body).unwrap())
    }

    /// True once the sidecar has closed the connection (EOF or reset), false if it sent
    /// something instead.
    async fn closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let read = self.stream.read(&mut byte);
        let read = within("the sidecar to close the connection", read).await;
        matches!(read, Ok(0) | Err(_))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

impl Sidecar {
    /// The `client_connections` gauge for `state`.
    fn connections(&self, state: &str) -> i64 {
        let metrics = self.observer.metrics.render(&self.set, None);
        let line = format!("corsair_sidecar_client_connections{{state=\"{state}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
            .parse()
            .unwrap()
    }

    /// Waits until `idle` connections wait with their buffers released and `serving` serve.
    async fn wait_for_connections(&self, idle: i64, serving: i64) {
        let deadline = Deadline::new(format!(
            "the sidecar to report {idle} idle and {serving} serving connection(s)"
        ));
        loop {
            let seen = (self.connections("idle"), self.connections("serving"));
            if seen == (idle, serving) {
                return;
            }
            deadline.check(format_args!("{} idle, {} serving", seen.0, seen.1));
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

/// Between requests an HTTP/1 keep-alive connection holds no hyper connection (and so none of
/// its buffers): at once after its first request, and after the busy gap once it has shown
/// itself busy. It carries on when the next request comes: one at a time, pipelined, or with
/// a head that arrives in parts, before and after the connection went idle.
#[tokio::test]
async fn idle_keep_alive_connections_give_back_their_buffers_and_carry_on() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::Deny,
        proxy::Timeouts {
            client_busy_gap: std::time::Duration::from_millis(50),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let mut raw = Raw::connect(sidecar.addr).await;
    for path in ["/one", "/two"] {
        raw.send(format!("GET {path} HTTP/1.1\r\nHost: shop\r\nOrigin: {APP}\r\n\r\n").as_bytes())
            .await;
        let (status, headers, _) = raw.response().await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-saw-path"), Some(path));
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
        sidecar.wait_for_connections(1, 0).await;
    }

    // Two requests in one write: answered in order.
    raw.send(
        format!(
            "GET /three HTTP/1.1\r\nHost: shop\r\n\r\nGET /four HTTP/1.1\r\nHost: shop\r\nOrigin: {APP}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    for path in ["/three", "/four"] {
        let (status, headers, _) = raw.response().await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "x-saw-path"), Some(path));
    }
    sidecar.wait_for_connections(1, 0).await;

    // A request and the start of the next in one write: the connection goes idle holding
    // only that start, and the second request is answered once the rest arrives.
    raw.send(b"GET /five HTTP/1.1\r\nHost: shop\r\n\r\nGET /six HTTP/1.1\r\nHo")
        .await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/five"));
    sidecar.wait_for_connections(1, 0).await;
    raw.send(b"st: shop\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/six"));

    // A response whose end is written after the connection was idle once: the body streams.
    raw.send(b"POST /seven HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let (status, headers, body) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/seven"));
    assert_eq!(body, "hello");
    raw.send(b"GET /eight HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/eight"));
    assert_eq!(hits.load(Ordering::SeqCst), 8);

    // Stopping the sidecar closes an idle connection.
    drop(sidecar);
    assert!(raw.closed().await);
}

/// A request asking to upgrade that the upstream answers without switching leaves an
/// ordinary keep-alive connection: it gives back its buffers once idle, and serves the next
/// request.
#[tokio::test]
async fn a_refused_upgrade_leaves_an_ordinary_keep_alive_connection() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(
        format!(
            "GET /upgrade HTTP/1.1\r\nHost: shop\r\nOrigin: {APP}\r\nConnection: upgrade\r\nUpgrade: other\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let (status, _, body) = raw.response().await;
    assert_eq!(status, 400);
    assert_eq!(body, "no upgrade asked\n");
    sidecar.wait_for_connections(1, 0).await;
    raw.send(b"GET /next HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/next"));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// A request head that arrives in parts is read by the hyper connection that began it, and
/// the pause inside it is no gap between requests: the connection still gives back its
/// buffers at once after the response, where a busy one would wait for the busy gap (an hour
/// here).
#[tokio::test]
async fn a_head_in_parts_does_not_make_a_connection_busy() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::PassThrough,
        proxy::Timeouts {
            client_busy_gap: std::time::Duration::from_secs(3600),
            ..proxy::Timeouts::default()
        },
    )
    .await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"GET /parts HTTP/1.1\r\nHo").await;
    // The pause only makes two reads likely: nothing observable changes in between to await,
    // and the outcome must be the same either way.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    raw.send(b"st: shop\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/parts"));
    sidecar.wait_for_connections(1, 0).await;
}

/// A request whose response is complete before its body has arrived keeps its connection
/// serving: the rest of the body goes to the upstream and is never taken for a request.
#[tokio::test]
async fn a_body_still_arriving_after_the_response_is_never_parsed_as_a_request() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n";
    raw.send(
        format!(
            "POST /early HTTP/1.1\r\nHost: shop\r\nContent-Length: {}\r\n\r\nfirst",
            5 + 1 + smuggled.len()
        )
        .as_bytes(),
    )
    .await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (200, "early"));
    // One more byte of the body: read, it leaves the connection with nothing in flight but
    // a body to finish. The rest of the body then comes in a later read (the pause only
    // makes that likely; the outcome must be the same either way), then a request.
    raw.send(b"x").await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    raw.send(smuggled.as_bytes()).await;
    raw.send(b"GET /next HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let (status, headers, _) = raw.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/next"));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// A chunked body whose trailer section ends in a bare LF is refused with a `400`, counted as
/// the client's error, not the upstream's. Read leniently, the sidecar and a front end before
/// it could disagree on where the request ends (request smuggling): here the bytes after it,
/// a request of their own to such a front end, would be taken as more trailer.
#[tokio::test]
async fn a_chunked_trailer_ending_in_a_bare_lf_is_the_clients_error() {
    use tokio::io::AsyncReadExt;
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(
        b"POST /echo HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\nX: value\n\n\
          GET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n",
    )
    .await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (400, "bad request body\n"));
    // Nothing more is read from that connection.
    let mut rest = Vec::new();
    let rest_read = raw.stream.read_to_end(&mut rest);
    within("the sidecar to close the connection", rest_read)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "");
    assert!(hits.load(Ordering::SeqCst) <= 1);
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    for line in [
        "corsair_sidecar_client_body_errors_total 1",
        r#"corsair_sidecar_upstream_errors_total{kind="unavailable"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
}

/// A client gone in the middle of its request's body is no upstream error.
#[tokio::test]
async fn a_body_cut_short_by_the_client_is_no_upstream_error() {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"POST /echo HTTP/1.1\r\nHost: shop\r\nContent-Length: 10\r\n\r\nhalf")
        .await;
    drop(raw);
    let metrics = &sidecar.observer.metrics;
    let deadline = Deadline::new("the sidecar to count 1 client body error");
    while !metrics
        .render(&sidecar.set, None)
        .contains("corsair_sidecar_client_body_errors_total 1")
    {
        deadline.check("");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let metrics = metrics.render(&sidecar.set, None);
    let line = r#"corsair_sidecar_upstream_errors_total{kind="unavailable"} 0"#;
    assert!(metrics.contains(line), "missing {line} in\n{metrics}");
}

/// A sidecar with a 300 ms header timeout, and a keep-alive connection to it that has had one
/// request answered.
async fn answered_once_with_header_timeout_300ms() -> (Sidecar, Raw) {
    answered_once_with_busy_gap(proxy::Timeouts::default().client_busy_gap).await
}

/// [`answered_once_with_header_timeout_300ms`], with `busy_gap` as the client busy gap.
async fn answered_once_with_busy_gap(busy_gap: std::time::Duration) -> (Sidecar, Raw) {
    let (up, _) = upstream().await;
    let sidecar = Sidecar::with_timeouts(
        up,
        NoPolicy::PassThrough,
        proxy::Timeouts {
            client_headers: std::time::Duration::from_millis(300),
            client_busy_gap: busy_gap,
            ..proxy::Timeouts::default()
        },
    )
    .await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"GET /first HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    assert_eq!(raw.response().await.0, 200);
    (sidecar, raw)
}

/// The header timeout counts the time a keep-alive connection waited with no hyper connection:
/// a head begun near the end of it is cut off at the deadline, not given a timeout of its own.
#[tokio::test]
async fn the_header_timeout_counts_the_idle_wait() {
    let (sidecar, mut raw) = answered_once_with_header_timeout_300ms().await;
    sidecar.wait_for_connections(1, 0).await;
    // 250 ms idle, then a head in two parts 150 ms apart: its end comes 400 ms after the
    // last request, past the 300 ms deadline. (Later sends only make that more so.)
    use tokio::io::AsyncWriteExt;
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let _ = raw
        .stream
        .get_mut()
        .write_all(b"GET /late HTTP/1.1\r\n")
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let _ = raw.stream.get_mut().write_all(b"Host: shop\r\n\r\n").await;
    assert!(raw.closed().await);
}

/// A connection busy enough to keep its hyper connection between requests, then sending the
/// start of a head and nothing more, is closed at the header timeout: hyper's header timer,
/// not the serving loop's, closes it.
#[tokio::test]
async fn an_unfinished_head_on_a_busy_connection_is_closed_at_the_header_timeout() {
    let (sidecar, mut raw) =
        answered_once_with_busy_gap(std::time::Duration::from_secs(3600)).await;
    // A second request within the busy gap: after it, the connection counts as busy and
    // keeps its hyper connection. The pause before it is a sleep on purpose: it puts the
    // third head's deadline well after the serving loop's deadline for the first.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    raw.send(b"GET /second HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    assert_eq!(raw.response().await.0, 200);
    sidecar.wait_for_connections(0, 1).await;
    raw.send(b"GET /third HTTP/1.1\r\n").await;
    assert!(raw.closed().await);
    sidecar.wait_for_connections(0, 0).await;
}

/// The header timeout runs from the end of the last request: a client sending a head a few
/// bytes at a time is closed, however often it sends.
#[tokio::test]
async fn a_trickled_head_is_closed_after_the_header_timeout() {
    let (_sidecar, mut raw) = answered_once_with_header_timeout_300ms().await;
    use tokio::io::AsyncWriteExt;
    raw.send(b"GET /second HTTP/1.1\r\n").await;
    // A header line every 50 ms, until the sidecar closes the connection.
    let deadline = Deadline::new("the sidecar to close a connection trickling its head");
    for i in 0.. {
        deadline.check(format_args!("{i} header lines sent"));
        tokio::select! {
            closed = raw.closed() => {
                assert!(closed);
                break;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
        let line = format!("x-{i}: y\r\n");
        let _ = raw.stream.get_mut().write_all(line.as_bytes()).await;
    }
}

/// What a [`scripted_upstream`] does with the next request it reads.
#[derive(Clone, Copy)]
enum Answer {
    /// Writes these bytes, then reads on.
    Keep(&'static str),
    /// Writes these bytes, then closes the connection.
    Close(&'static str),
    /// Writes these bytes once another request given `Together` has arrived too, then reads
    /// on: two requests in flight at once, on two connections.
    Together(&'static str),
}

/// An upstream that reads each request head (requests without a body) and answers with the
/// next of `answers`, raw bytes, whatever connection it came on; it counts the connections it
/// accepts and records the request lines.
async fn scripted_upstream(
    answers: Vec<Answer>,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let answers = Arc::new(std::sync::Mutex::new(answers.into_iter()));
    let together = Arc::new(tokio::sync::Barrier::new(2));
    let (counter, lines) = (accepted.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let (answers, lines, together) = (answers.clone(), lines.clone(), together.clone());
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    lines.lock().unwrap().push(line.trim_end().to_owned());
                    while line != "\r\n" {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    let next = answers.lock().unwrap().next();
                    match next.expect("an answer for every request") {
                        Answer::Keep(bytes) => {
                            stream.get_mut().write_all(bytes.as_bytes()).await.unwrap();
                        }
                        Answer::Close(bytes) => {
                            let _ = stream.get_mut().write_all(bytes.as_bytes()).await;
                            return;
                        }
                        Answer::Together(bytes) => {
                            together.wait().await;
                            stream.get_mut().write_all(bytes.as_bytes()).await.unwrap();
                        }
                    }
                }
            });
        }
    });
    (addr, accepted, seen)
}

/// Bodies framed each way the upstream may frame them reach the client whole: by length, in
/// chunks (with extensions and trailers), and until the upstream closes; a connection is
/// reused after the first two, not after the last.
#[tokio::test]
async fn upstream_bodies_are_read_by_length_chunks_or_close() {
    let (up, accepted, _) = scripted_upstream(vec![
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength"),
        Answer::Keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             4;ext=1\r\nchun\r\n3\r\nked\r\n0\r\nX-Trailer: t\r\n\r\n",
        ),
        Answer::Close("HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\nuntil close"),
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"),
    ])
    .await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    for expected in ["length", "chunked", "until close", "fresh"] {
        let (status, headers, body) = sidecar.send(Method::GET, "/", &[], "").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, expected.as_bytes()));
        assert!(
            !headers.contains_key("transfer-encoding")
                || expected == "chunked"
                || expected == "until close"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A response the sidecar cannot be sure where it ends, or cannot read at all, is a `502`,
/// counted as the upstream's error, and its connection is not used again.
#[tokio::test]
async fn malformed_upstream_responses_are_a_502() {
    let big = Box::leak(
        format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)).into_boxed_str(),
    );
    let answers = [
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        "SSH-2.0-OpenSSH_9.2\r\n\r\n",
        big,
    ];
    let script: Vec<Answer> = answers.iter().map(|a| Answer::Keep(a)).collect();
    let (up, accepted, _) = scripted_upstream(script).await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    for answer in answers {
        let (status, _, body) = sidecar.send(Method::GET, "/", &[], "").await;
        assert_eq!(
            (status, &body[..]),
            (StatusCode::BAD_GATEWAY, &b"upstream unavailable\n"[..]),
            "{}",
            &answer[..answer.len().min(60)]
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), answers.len());
    let metrics = sidecar.observer.metrics.render(&sidecar.set, None);
    let line = format!(
        r#"corsair_sidecar_upstream_errors_total{{kind="unavailable"}} {}"#,
        answers.len()
    );
    assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
}

/// `100 Continue` and `103 Early Hints` from the upstream are passed over for the final
/// response.
#[tokio::test]
async fn interim_responses_are_passed_over() {
    let (up, _, _) = scripted_upstream(vec![Answer::Keep(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
         HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated",
    )])
    .await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let (status, headers, body) = sidecar.send(Method::GET, "/", &[], "").await;
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"created"[..]));
    assert!(!headers.contains_key("link"));
}

/// A reused connection the upstream closes on reading the next request (its idle timeout
/// racing the request): a request that is safe to send twice goes again on a new connection,
/// a `POST` is answered `502`, never sent twice.
#[tokio::test]
async fn a_request_on_a_connection_closed_under_it_is_resent_only_if_safe() {
    let (up, accepted, seen) = scripted_upstream(vec![
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"),
        Answer::Close(""),
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo"),
        Answer::Close(""),
    ])
    .await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let (_, _, body) = sidecar.send(Method::GET, "/1", &[], "").await;
    assert_eq!(body, "one");
    let (status, _, body) = sidecar.send(Method::GET, "/2", &[], "").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"two"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "resent on a new connection"
    );
    let (status, _, _) = sidecar.send(Method::POST, "/3", &[], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "GET /1 HTTP/1.1",
            "GET /2 HTTP/1.1",
            "GET /2 HTTP/1.1",
            "POST /3 HTTP/1.1"
        ]
    );
}

/// A connection is pooled again only when the response has ended where its framing says and
/// nothing more has come: bytes after a response, `Connection: close`, and a `HEAD`'s length
/// (which announces a body that never comes) each do the right thing.
#[tokio::test]
async fn only_connections_at_a_message_boundary_are_reused() {
    let (up, accepted, _) = scripted_upstream(vec![
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK"),
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        Answer::Keep("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nlast"),
        Answer::Keep("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"),
    ])
    .await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let (_, _, body) = sidecar.send(Method::GET, "/", &[], "").await;
    assert_eq!(body, "ok");
    // A new connection: the first had unasked-for bytes after its response.
    let (status, headers, body) = sidecar.send(Method::HEAD, "/", &[], "").await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    assert_eq!(headers["content-length"], "100");
    // The same connection again: a HEAD's response has no body.
    let (_, _, body) = sidecar.send(Method::GET, "/", &[], "").await;
    assert_eq!(body, "last");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // A new one after `Connection: close`.
    let (_, _, body) = sidecar.send(Method::GET, "/", &[], "").await;
    assert_eq!(body, "new");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

/// A request is sent again at most once, and on a new connection: an upstream that closes the
/// connection on a request (a handler that crashes, say) sees it twice, not once per pooled
/// connection.
#[tokio::test]
async fn a_request_is_resent_once_on_a_new_connection() {
    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (up, accepted, seen) = scripted_upstream(vec![
        Answer::Together(ok),
        Answer::Together(ok),
        Answer::Close(""),
        Answer::Close(""),
        Answer::Keep(ok),
    ])
    .await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    // Two requests at once leave two pooled connections.
    let (a, b) = tokio::join!(
        sidecar.send(Method::GET, "/a", &[], ""),
        sidecar.send(Method::GET, "/b", &[], "")
    );
    assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let (status, _, _) = sidecar.send(Method::GET, "/crash", &[], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let crashes = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.starts_with("GET /crash"))
        .count();
    assert_eq!(crashes, 2, "sent, then resent once");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "resent on a new connection"
    );
}

/// A client may send all of its request before it reads any of the response. An upstream that
/// answers early, streaming a large response while it reads the body, still gets the whole
/// body while the client is not reading: the response waits for the client, the body does
/// not wait for the response.
#[tokio::test]
async fn an_early_answer_never_stops_the_body_on_its_way() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 24 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (received_tx, received) = oneshot::channel::<usize>();
    let received_tx = Arc::new(std::sync::Mutex::new(Some(received_tx)));
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = service_fn(move |req: Request<Incoming>| {
            let received_tx = received_tx.clone();
            async move {
                // The body is read in parallel with the response being sent.
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut total = 0;
                    while let Some(frame) = body.frame().await {
                        total += frame.unwrap().into_data().map_or(0, |d| d.len());
                    }
                    let tx = received_tx.lock().unwrap().take().unwrap();
                    let _ = tx.send(total);
                });
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                let frames = (0..SIZE / chunk.len())
                    .map(move |_| Ok::<_, Infallible>(hyper::body::Frame::data(chunk.clone())));
                let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-length", SIZE)
                        .body(body)
                        .unwrap(),
                )
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut client = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    client
        .write_all(
            format!("POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: {SIZE}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let chunk = vec![b'y'; 64 << 10];
    let uploaded = async {
        for _ in 0..SIZE / chunk.len() {
            client.write_all(&chunk).await.unwrap();
        }
        // Only now does the client read.
        received.await.unwrap()
    };
    let uploaded = within("the upstream to read the whole body", uploaded).await;
    assert_eq!(uploaded, SIZE);
    let downloaded = async {
        let mut response = Vec::new();
        let mut buf = vec![0; 1 << 16];
        let head_end = loop {
            let n = client.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before the response's head");
            response.extend_from_slice(&buf[..n]);
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
        let mut body = response.len() - head_end;
        while body < SIZE {
            let n = client.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed after {body} bytes of the response's body");
            body += n;
        }
        body
    };
    assert_eq!(within("the whole response", downloaded).await, SIZE);
}

/// A request's trailers are not forwarded: nothing declares them (`Trailer` is hop-by-hop),
/// and an upstream that merges trailers into the head would take `X-Forwarded-For` or `Host`
/// from the client.
#[tokio::test]
async fn request_trailers_are_not_forwarded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|req: Request<Incoming>| async move {
                let collected = req.into_body().collect().await.unwrap();
                let trailers = collected
                    .trailers()
                    .map_or_else(|| "-".to_owned(), |t| format!("{t:?}"));
                let body = collected.to_bytes();
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("x-saw-trailers", trailers)
                        .body(Full::new(body))
                        .unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(
        b"POST /echo HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    .await;
    let (status, headers, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (200, "hello"));
    assert_eq!(header(&headers, "x-saw-trailers"), Some("-"));
}

/// `CONNECT` asks for a tunnel to wherever the client names: a forward proxy's work. It is
/// answered `501` and never reaches the upstream.
#[tokio::test]
async fn connect_is_not_implemented() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"CONNECT upstream.example:443 HTTP/1.1\r\nHost: upstream.example:443\r\n\r\n")
        .await;
    let (status, _, body) = raw.response().await;
    assert_eq!((status, body.as_str()), (501, "CONNECT is not supported\n"));
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// Reads a request head from `stream`, and returns its `Content-Length` (0 without one).
async fn read_head(stream: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> usize {
    use tokio::io::AsyncBufReadExt;
    let mut length = 0;
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        let read = stream.read_line(&mut line).await.unwrap();
        assert!(read > 0, "the connection closed within a head");
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    length
}

/// An upstream that takes one connection, reads one request (its head, and a body of
/// `Content-Length`), says so, and never answers; it says too when the sidecar closes the
/// connection.
async fn silent_upstream() -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
) {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (received_tx, received) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut body = vec![0; read_head(&mut stream).await];
        stream.read_exact(&mut body).await.unwrap();
        received_tx.send(()).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "nothing more was sent: {rest:?}");
        closed_tx.send(()).unwrap();
    });
    (addr, received, closed)
}

/// How a client leaves a request in flight.
#[derive(Clone, Copy, Debug)]
enum Leave {
    Close,
    /// Shuts down its sending side only.
    HalfClose,
    /// Closes while the sidecar shuts down, letting requests in flight finish.
    CloseDuringShutdown,
}

/// A client that closes its connection while its request waits for the upstream has given up
/// on it: the upstream connection closes too (as with nginx, a client shutting down only its
/// sending side has given up as well), so the service sees the cancellation; also while the
/// sidecar shuts down. The response timeout is an hour: nothing else would close it.
#[tokio::test]
async fn a_client_gone_with_its_request_in_flight_takes_the_upstream_exchange_along() {
    let get = "GET /wait HTTP/1.1\r\nHost: shop\r\n\r\n";
    let post = "POST /wait HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello";
    for (request, leave) in [
        (get, Leave::Close),
        (post, Leave::HalfClose),
        (post, Leave::Close),
        (get, Leave::CloseDuringShutdown),
    ] {
        let (up, received, closed) = silent_upstream().await;
        let mut sidecar =
            Sidecar::with_response_timeout(up, std::time::Duration::from_secs(3600)).await;
        let mut idle = Raw::connect(sidecar.addr).await;
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(request.as_bytes()).await;
        within("the request to reach the upstream", received)
            .await
            .unwrap();
        match leave {
            Leave::Close => drop(raw),
            Leave::HalfClose => {
                use tokio::io::AsyncWriteExt;
                raw.stream.get_mut().shutdown().await.unwrap();
            }
            Leave::CloseDuringShutdown => {
                sidecar.stop.take().unwrap().send(()).unwrap();
                // Closed once the connections have been told to stop.
                assert!(idle.closed().await);
                drop(raw);
            }
        }
        within(
            &format!("{leave:?}: the upstream connection to close"),
            closed,
        )
        .await
        .unwrap_or_else(|_| panic!("{leave:?}: the upstream failed"));
    }
}

/// The same once the upstream has answered before the request's body had all arrived: the
/// rest of the body goes on by a task of its own, and the client closing after sending it,
/// while the response still streams, closes the upstream connection.
#[tokio::test]
async fn a_client_gone_after_an_early_answer_takes_the_upstream_exchange_along() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (body_tx, body) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        read_head(&mut stream).await;
        // Answered at once, with a body that never ends.
        stream
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n")
            .await
            .unwrap();
        let mut body = [0; 10];
        stream.read_exact(&mut body).await.unwrap();
        body_tx.send(body).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        closed_tx.send(rest).unwrap();
    });
    let sidecar =
        Sidecar::with_timeouts(up, NoPolicy::PassThrough, proxy::Timeouts::default()).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"POST /upload HTTP/1.1\r\nHost: shop\r\nContent-Length: 10\r\n\r\nhello")
        .await;
    let mut head = String::new();
    within("the early answer's first chunk", async {
        while !head.ends_with("early\r\n") {
            raw.stream.read_line(&mut head).await.unwrap();
        }
    })
    .await;
    raw.send(b"world").await;
    let body = within("the upstream to read the rest of the body", body).await;
    assert_eq!(&body.unwrap(), b"helloworld");
    drop(raw);
    let closed = within("the upstream connection to close", closed).await;
    assert!(closed.unwrap().is_empty());
}

/// A request that arrives while the one before it on the connection still waits for its
/// response is not taken for the client closing: it is answered after it.
#[tokio::test]
async fn a_request_sent_while_another_is_in_flight_is_answered_after_it() {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (first_tx, first) = tokio::sync::oneshot::channel();
    let (answer_tx, answer) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut first_tx = Some(first_tx);
        let mut answer = Some(answer);
        for body in ["first", "other"] {
            read_head(&mut stream).await;
            if let (Some(first_tx), Some(answer)) = (first_tx.take(), answer.take()) {
                first_tx.send(()).unwrap();
                answer.await.unwrap();
            }
            let response = format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{body}");
            stream
                .get_mut()
                .write_all(response.as_bytes())
                .await
                .unwrap();
        }
    });
    let sidecar =
        Sidecar::with_timeouts(up, NoPolicy::PassThrough, proxy::Timeouts::default()).await;
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(b"GET /one HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    within("the first request to reach the upstream", first)
        .await
        .unwrap();
    raw.send(b"GET /two HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    answer_tx.send(()).unwrap();
    for body in ["first", "other"] {
        let (status, _, got) = raw.response().await;
        assert_eq!((status, got.as_str()), (200, body));
    }
}

impl Sidecar {
    /// The value of the metric line that starts with `name` (with its labels, if any).
    fn metric(&self, name: &str) -> u64 {
        let metrics = self.observer.metrics.render(&self.set, None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .parse()
            .unwrap()
    }
}

/// What a [`gated_upstream`] reports.
struct Gated {
    /// Let this many held requests be answered.
    gate: Arc<tokio::sync::Semaphore>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// One message for each request that arrives.
    arrived: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// One message for each connection that closes.
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// An upstream that holds each request (a head without a body) until the test lets one
/// through, then answers `ok`; it reports each request's line as it arrives, and each
/// connection that closes (the sidecar closing one whose request it holds, too).
async fn gated_upstream() -> (SocketAddr, Gated) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    let (gate_, accepted_) = (gate.clone(), accepted.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted_.fetch_add(1, Ordering::SeqCst);
            let (gate, arrived_tx, closed_tx) =
                (gate_.clone(), arrived_tx.clone(), closed_tx.clone());
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let request = line.trim_end().to_owned();
                    while line != "\r\n" {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            let _ = closed_tx.send(());
                            return;
                        }
                    }
                    let _ = arrived_tx.send(request);
                    // Held, noticing the sidecar closing the connection meanwhile.
                    tokio::select! {
                        permit = gate.acquire() => permit.unwrap().forget(),
                        _ = stream.fill_buf() => break,
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.get_mut().write_all(ok).await.is_err() {
                        break;
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    (
        addr,
        Gated {
            gate,
            accepted,
            arrived,
            closed,
        },
    )
}

/// At most `--upstream-max-idle` upstream connections stay pooled after a burst: the others
/// close as their responses end, and the pooled ones carry the next requests.
#[tokio::test]
async fn idle_upstream_connections_are_bounded() {
    let (up, mut upstream) = gated_upstream().await;
    let limits = proxy::Limits {
        upstream_max_idle: 2,
        ..proxy::Limits::default()
    };
    let sidecar = Sidecar::with_limits(up, NoPolicy::PassThrough, Default::default(), limits).await;
    // Five requests at once: five upstream connections.
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(format!("GET /{i} HTTP/1.1\r\nHost: shop\r\n\r\n").as_bytes())
            .await;
        clients.push(raw);
    }
    for _ in 0..5 {
        upstream.arrived.recv().await.unwrap();
    }
    upstream.gate.add_permits(5);
    for raw in &mut clients {
        assert_eq!(raw.response().await.0, 200);
    }
    // Two are pooled; three close.
    for _ in 0..3 {
        upstream.closed.recv().await.unwrap();
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5);
    for raw in &mut clients[..2] {
        raw.send(b"GET /again HTTP/1.1\r\nHost: shop\r\n\r\n").await;
        upstream.arrived.recv().await.unwrap();
        upstream.gate.add_permits(1);
        assert_eq!(raw.response().await.0, 200);
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5, "reused");
}

/// With `--upstream-max-connections` busy, a request waits for one up to the connect timeout:
/// it gets the first to go back to the pool, or `503` (counted) once the time is up. The
/// upstream never sees more connections than the bound.
#[tokio::test]
async fn at_the_upstream_connection_bound_requests_wait_then_get_503() {
    let (up, mut upstream) = gated_upstream().await;
    let timeouts = proxy::Timeouts {
        connect: std::time::Duration::from_millis(300),
        ..proxy::Timeouts::default()
    };
    let limits = proxy::Limits {
        upstream_max_connections: 1,
        ..proxy::Limits::default()
    };
    let sidecar = Sidecar::with_limits(up, NoPolicy::PassThrough, timeouts, limits).await;
    let mut first = Raw::connect(sidecar.addr).await;
    first
        .send(b"GET /first HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    assert_eq!(
        upstream.arrived.recv().await.unwrap(),
        "GET /first HTTP/1.1"
    );
    // The one connection stays busy: the second request is refused.
    let mut second = Raw::connect(sidecar.addr).await;
    second
        .send(b"GET /second HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    let (status, _, body) = second.response().await;
    assert_eq!(
        (status, body.as_str()),
        (503, "upstream connection limit reached\n")
    );
    assert_eq!(
        sidecar.metric("corsair_sidecar_upstream_limit_refusals_total"),
        1
    );
    // A third waits, and gets the connection as soon as the first is answered. (The pause
    // lets it start waiting; it is served either way.)
    let mut third = Raw::connect(sidecar.addr).await;
    third
        .send(b"GET /third HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    upstream.gate.add_permits(1);
    assert_eq!(first.response().await.0, 200);
    assert_eq!(
        upstream.arrived.recv().await.unwrap(),
        "GET /third HTTP/1.1"
    );
    upstream.gate.add_permits(1);
    assert_eq!(third.response().await.0, 200);
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        sidecar.metric("corsair_sidecar_upstream_limit_refusals_total"),
        1
    );
}

/// At `--max-connections` the sidecar stops accepting: a new client waits (in the kernel's
/// backlog) until an open connection closes, and is then served.
#[tokio::test]
async fn past_the_connection_limit_clients_wait_until_one_closes() {
    use tokio::io::AsyncBufReadExt;
    let (up, hits) = upstream().await;
    let limits = proxy::Limits {
        max_connections: 2,
        ..proxy::Limits::default()
    };
    let sidecar = Sidecar::with_limits(up, NoPolicy::PassThrough, Default::default(), limits).await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n").await;
        assert_eq!(raw.response().await.0, 200);
        open.push(raw);
    }
    let mut third = Raw::connect(sidecar.addr).await;
    third
        .send(b"GET /third HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await;
    let limit = Deadline::new("the sidecar to count a connection past its limit");
    while sidecar.metric("corsair_sidecar_connection_limit_reached_total") == 0 {
        limit.check("");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Not answered while the two stay open.
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        third.stream.fill_buf(),
    )
    .await;
    assert!(waited.is_err(), "answered past the limit");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    drop(open.pop());
    let (status, headers, _) = third.response().await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-saw-path"), Some("/third"));
}

/// A request whose target host is ambiguous gets `400`, closes its connection, and never
/// reaches the upstream: two `Host`s (also with a target in absolute form), none in HTTP/1.1,
/// or an invalid one. Valid forms pass.
#[tokio::test]
async fn ambiguous_hosts_are_refused_and_never_forwarded() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::Deny).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let refused: &[(&str, &str)] = &[
        (
            "two Hosts, the first one same-origin",
            "GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: evil.example\r\nOrigin: http://app.example.com\r\n\r\n",
        ),
        (
            "two Hosts on an absolute-form target",
            "GET http://shop/ HTTP/1.1\r\nHost: shop\r\nHost: other\r\n\r\n",
        ),
        ("no Host in HTTP/1.1", "GET / HTTP/1.1\r\n\r\n"),
        ("a space in Host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        (
            "user information in Host",
            "GET / HTTP/1.1\r\nHost: me@shop\r\n\r\n",
        ),
        ("an empty Host", "GET / HTTP/1.1\r\nHost:\r\n\r\n"),
        ("a path in Host", "GET / HTTP/1.1\r\nHost: shop/x\r\n\r\n"),
        (
            "a port that is not a number",
            "GET / HTTP/1.1\r\nHost: shop:http\r\n\r\n",
        ),
        (
            "an unclosed IP literal",
            "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        ),
        (
            "two Hosts in HTTP/1.0",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
    ];
    for (case, request) in refused {
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(request.as_bytes()).await;
        let (status, headers, _) = raw.response().await;
        assert_eq!(status, 400, "{case}");
        assert_eq!(header(&headers, "connection"), Some("close"), "{case}");
        assert!(raw.closed().await, "{case}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was forwarded");
    let passed: &[(&str, &str)] = &[
        (
            "a name and a port",
            "GET / HTTP/1.1\r\nHost: shop.example:8080\r\n\r\n",
        ),
        (
            "an IPv6 literal",
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        ),
        ("an empty port", "GET / HTTP/1.1\r\nHost: shop:\r\n\r\n"),
        ("no Host in HTTP/1.0", "GET / HTTP/1.0\r\n\r\n"),
    ];
    for (case, request) in passed {
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(request.as_bytes()).await;
        assert_eq!(raw.response().await.0, 200, "{case}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), passed.len());
}

/// A request body with a transfer coding other than one `chunked` cannot be forwarded as it
/// came (it would reach the upstream decoded, as plain chunked): an unknown coding is `501`,
/// `chunked` twice `400`; the connection closes and nothing reaches the upstream.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let body = "5\r\nhello\r\n0\r\n\r\n";
    for (codings, status) in [
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            501,
        ),
        ("Transfer-Encoding: chunked, chunked\r\n", 400),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            400,
        ),
    ] {
        let mut raw = Raw::connect(sidecar.addr).await;
        raw.send(format!("POST / HTTP/1.1\r\nHost: shop\r\n{codings}\r\n{body}").as_bytes())
            .await;
        assert_eq!(raw.response().await.0, status, "{codings}");
        assert!(raw.closed().await, "{codings}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing was forwarded");
    let mut raw = Raw::connect(sidecar.addr).await;
    raw.send(
        format!("POST / HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: Chunked\r\n\r\n{body}")
            .as_bytes(),
    )
    .await;
    let (status, _, echoed) = raw.response().await;
    assert_eq!((status, echoed.as_str()), (200, "hello"));
}

/// Over HTTP/2 a `host` header that names another host than `:authority`, or a second one,
/// is `400` and never forwarded; one that agrees passes.
#[tokio::test]
async fn over_http2_a_host_other_than_the_authority_is_refused() {
    let (up, hits) = upstream().await;
    let sidecar = Sidecar::start(up, NoPolicy::PassThrough).await;
    let tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut send = async |hosts: &[&str]| {
        let mut request = Request::get("http://shop.example/x");
        for host in hosts {
            request = request.header("host", *host);
        }
        let (response, _) = client
            .send_request(request.body(()).unwrap(), true)
            .unwrap();
        let response = response.await.unwrap();
        let status = response.status();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        status
    };
    assert_eq!(send(&["other.example"]).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        send(&["shop.example", "other.example"]).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(send(&["SHOP.example"]).await, StatusCode::OK);
    assert_eq!(send(&[]).await, StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// An HTTP/2 client written frame by frame, to do what real clients do not.
struct RawH2 {
    stream: tokio::net::TcpStream,
}

/// Frame types and flags.
const DATA_FRAME: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

impl RawH2 {
    /// Connects, and sends the preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> RawH2 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut raw = RawH2 { stream };
        use tokio::io::AsyncWriteExt;
        raw.stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        let _ = self.stream.write_all(&frame).await;
    }

    /// A GET of `path`'s header block (HPACK, without Huffman coding or indexing).
    fn get(path: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend(path.as_bytes());
        block.extend([0x01, 4]);
        block.extend(b"shop");
        block
    }

    /// The next frame (type, flags, stream, payload); `None` once the sidecar has closed the
    /// connection.
    async fn next(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        self.stream.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// The types of the frames that come until the sidecar closes the connection.
    async fn until_closed(&mut self) -> Vec<u8> {
        let mut kinds = Vec::new();
        let closing = async {
            while let Some((kind, ..)) = self.next().await {
                kinds.push(kind);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), closing)
            .await
            .expect("the sidecar closes the connection");
        kinds
    }
}

/// An HTTP/2 connection that brings no request within the header timeout is shut down
/// (`GOAWAY`) and closed, though it never answers the `GOAWAY`'s `PING`: one silent after the
/// preface, and one whose first header block never ends (h2 waits for its `CONTINUATION`).
#[tokio::test]
async fn http2_connections_without_a_request_are_closed_after_the_header_timeout() {
    let (up, hits) = upstream().await;
    let timeouts = proxy::Timeouts {
        client_headers: std::time::Duration::from_millis(200),
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(up, NoPolicy::PassThrough, timeouts).await;
    let mut silent = RawH2::connect(sidecar.addr).await;
    let mut unfinished = RawH2::connect(sidecar.addr).await;
    unfinished
        .send(HEADERS, END_STREAM, 1, &RawH2::get("/never"))
        .await;
    for raw in [&mut silent, &mut unfinished] {
        assert!(raw.until_closed().await.contains(&GOAWAY));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    sidecar.wait_for_connections(0, 0).await;
}

/// An HTTP/2 connection is shut down once no stream has been open for the idle timeout, not
/// while one is, however long it takes. (The header timeout is an hour: nothing else closes
/// it.)
#[tokio::test]
async fn idle_http2_connections_are_shut_down() {
    let (up, mut upstream) = gated_upstream().await;
    let timeouts = proxy::Timeouts {
        http2_idle: std::time::Duration::from_millis(200),
        client_headers: std::time::Duration::from_secs(3600),
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(up, NoPolicy::PassThrough, timeouts).await;
    let tcp = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (response, _) = client
        .send_request(Request::get("http://shop/slow").body(()).unwrap(), true)
        .unwrap();
    upstream.arrived.recv().await.unwrap();
    // Held three idle timeouts long: the connection stays.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    upstream.gate.add_permits(1);
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    // Then, idle, it is shut down.
    tokio::time::timeout(std::time::Duration::from_secs(20), connection)
        .await
        .expect("the idle connection is shut down")
        .unwrap()
        .unwrap();
    sidecar.wait_for_connections(0, 0).await;
}

/// An HTTP/2 client that stops answering `PING`s is closed after the keepalive time, even
/// with a stream open (its request at the upstream).
#[tokio::test]
async fn http2_clients_that_do_not_answer_pings_are_closed() {
    let (up, mut upstream) = gated_upstream().await;
    let timeouts = proxy::Timeouts {
        http2_keepalive: Some(std::time::Duration::from_millis(200)),
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(up, NoPolicy::PassThrough, timeouts).await;
    let mut raw = RawH2::connect(sidecar.addr).await;
    raw.send(HEADERS, END_HEADERS | END_STREAM, 1, &RawH2::get("/held"))
        .await;
    upstream.arrived.recv().await.unwrap();
    let kinds = raw.until_closed().await;
    assert!(kinds.contains(&PING), "{kinds:?}");
    // The exchange goes with the connection.
    upstream.closed.recv().await.unwrap();
}

/// The sidecar announces its HTTP/2 limits (streams, and the windows Envoy's edge advice
/// gives: 64 KiB a stream, 1 MiB a connection) and refuses streams past the limit.
#[tokio::test]
async fn http2_streams_past_the_limit_are_refused() {
    let (up, mut upstream) = gated_upstream().await;
    let limits = proxy::Limits {
        http2_max_concurrent_streams: 2,
        ..proxy::Limits::default()
    };
    let sidecar = Sidecar::with_limits(up, NoPolicy::PassThrough, Default::default(), limits).await;
    let mut raw = RawH2::connect(sidecar.addr).await;
    let (mut settings, mut window) = (None, None);
    while settings.is_none() || window.is_none() {
        match raw.next().await.expect("open") {
            (SETTINGS, 0, 0, payload) => {
                let pairs: Vec<(u16, u32)> = payload
                    .chunks(6)
                    .map(|p| {
                        (
                            u16::from_be_bytes([p[0], p[1]]),
                            u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                        )
                    })
                    .collect();
                settings = Some(pairs);
            }
            (WINDOW_UPDATE, _, 0, payload) => {
                window = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
            _ => {}
        }
    }
    let settings = settings.unwrap();
    assert!(settings.contains(&(0x3, 2)), "{settings:?}");
    assert!(settings.contains(&(0x4, 65_536)), "{settings:?}");
    assert_eq!(window, Some(1024 * 1024 - 65_535));
    raw.send(SETTINGS, ACK, 0, &[]).await;
    for stream in [1, 3, 5] {
        raw.send(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &RawH2::get("/held"),
        )
        .await;
    }
    loop {
        let (kind, _, stream, payload) = raw.next().await.expect("open");
        if kind == RST_STREAM {
            assert_eq!(
                (stream, &payload[..]),
                (5, &7u32.to_be_bytes()[..]),
                "REFUSED_STREAM"
            );
            break;
        }
        assert_ne!(kind, DATA_FRAME);
    }
    for _ in 0..2 {
        upstream.arrived.recv().await.unwrap();
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
}
