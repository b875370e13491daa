//! The proxy against a real upstream on port 0: local preflights, merged headers, enforce
//! mode, hop-by-hop headers, forwarding headers, streamed bodies, upstream failure, the
//! no-policy setting, and a hot swap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use corsair_policy::Scheme;
use corsair_proto::v1;
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::proxy::{self, NoPolicy, ProxyConfig};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
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
                            .header("x-saw-secret", saw("x-secret"))
                            .header("x-saw-connection", saw("connection"));
                        if req.uri().path() == "/error" {
                            response = response.status(500);
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        Ok::<_, Infallible>(response.body(Full::new(body)).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

struct Sidecar {
    addr: SocketAddr,
    set: Arc<PolicySet>,
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let set = Arc::new(PolicySet::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let config = ProxyConfig {
            upstream: upstream.to_string().parse().unwrap(),
            service: "shop".into(),
            public_scheme: Scheme::Http,
            no_policy,
            timeouts,
        };
        tokio::spawn(proxy::serve(listener, set.clone(), config, async {
            let _ = stopped.await;
        }));
        Sidecar {
            addr,
            set,
            stop: Some(stop),
        }
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
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let response = client
            .request(
                req.body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
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
        headers["x-saw-secret"], "-",
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

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
        ..proxy::Timeouts::default()
    };
    let sidecar = Sidecar::with_timeouts(silent, NoPolicy::Deny, timeouts).await;
    sidecar.policy(1, &[APP], v1::PolicyMode::Standard);
    let (status, headers, body) = sidecar.send(Method::GET, "/", &[("origin", APP)], "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["access-control-allow-origin"], APP);
    assert_eq!(body, "upstream timed out\n");
}
