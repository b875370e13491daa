//! What a real browser allows through the sidecar: headless Chromium loads a page from one
//! origin, and the page fetches from sidecars on other origins (same host, other ports) and
//! reports what the browser let its script see, per-route rules included.
//!
//! Needs Debian's `chromium` (or `CORSAIR_CHROMIUM`). Without it the test skips (see
//! [`support::skip`]), or fails under `CI=true`.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use corsair_policy::Scheme;
use corsair_proto::v1;
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::proxy::{self, NoPolicy, ProxyConfig};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// Serves `handler` over HTTP/1.1 on `listener`.
fn serve<F, Fut>(listener: TcpListener, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn reply(
    status: StatusCode,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, value);
    }
    response.body(Full::new(body.into())).unwrap()
}

/// The service behind the sidecars. It records the method and path of every request it gets.
async fn upstream(seen: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(listener, move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri().path()));
            let cookie = req
                .headers()
                .get("cookie")
                .map(|c| c.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let request_id = ("x-request-id", "rid-42".to_owned());
            // The same resources under the routes' prefixes.
            let path = req.uri().path();
            let path = ["/api", "/public"]
                .iter()
                .find_map(|prefix| path.strip_prefix(prefix))
                .unwrap_or(path);
            match path {
                "/set-cookie" => reply(
                    StatusCode::OK,
                    &[("set-cookie", "session=s3cr3t; Path=/; SameSite=Lax".into())],
                    "set",
                ),
                "/echo-cookie" => reply(StatusCode::OK, &[], format!("cookie={cookie}")),
                _ => reply(StatusCode::OK, &[request_id], "hello"),
            }
        }
    })
}

/// A sidecar in front of `upstream` enforcing `policy`.
async fn sidecar(upstream: SocketAddr, policy: v1::Policy) -> (String, Arc<PolicySet>) {
    sidecar_from(upstream, snapshot(1, policy)).await
}

/// A sidecar in front of `upstream` enforcing what `first` brings.
async fn sidecar_from(
    upstream: SocketAddr,
    first: v1::DiscoveryResponse,
) -> (String, Arc<PolicySet>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let set = Arc::new(PolicySet::default());
    let service = first.upserts[0].service.clone();
    set.apply(&first).unwrap();
    let config = ProxyConfig {
        upstream: upstream.to_string().parse().unwrap(),
        service,
        public_scheme: Scheme::Http,
        no_policy: NoPolicy::Deny,
        timeouts: Default::default(),
        limits: Default::default(),
        observer: Default::default(),
    };
    tokio::spawn(proxy::serve(
        listener,
        set.clone(),
        config,
        std::future::pending(),
    ));
    (format!("http://{addr}"), set)
}

/// The origin set `frontends` as the control plane sends it: whole (`base` 0), or as the
/// delta from `base` that adds `added`.
fn frontends(revision: i64, base: i64, all: &[&str], added: &[&str]) -> v1::OriginSetContent {
    let mut all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    all.sort();
    v1::OriginSetContent {
        name: "frontends".into(),
        revision,
        digest: corsair_policy::origin_set::digest(&all).to_vec(),
        base_revision: base,
        added: if base == 0 {
            all
        } else {
            added.iter().map(|s| s.to_string()).collect()
        },
        removed: Vec::new(),
    }
}

fn snapshot(revision: i64, policy: v1::Policy) -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        revision,
        snapshot: true,
        upserts: vec![v1::Policy { revision, ..policy }],
        ..Default::default()
    }
}

/// The browser to drive, or `None` (a skip) when this machine has none.
fn chromium() -> Option<PathBuf> {
    let candidates = std::env::var_os("CORSAIR_CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/bin/chromium-browser"].map(PathBuf::from));
    for candidate in candidates {
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    support::skip(
        "headless Chromium not found (install Debian's `chromium`, or set CORSAIR_CHROMIUM)",
    );
    None
}

/// The page: each check fetches cross-origin and records what the script could see;
/// `swap` asks the page's own server to change a sidecar's policy mid-run. The results go
/// back to the page's server as JSON.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>corsair browser checks</title>
<script>
const SHOP = "__SHOP__", PLAIN = "__PLAIN__", CLOSED = "__CLOSED__", ROUTED = "__ROUTED__",
  FRONTENDS = "__FRONTENDS__";
const results = {};
let n = 0;
// Every URL is distinct, so no preflight or response cache answers for the sidecar.
const url = (base, path) => `${base}${path}?n=${++n}`;
async function check(name, run) {
  try { results[name] = await run(); }
  catch (e) { results[name] = "blocked: " + e.name; }
}
async function text(response) { return `${response.status} ${await response.text()}`; }
async function swap(to) {
  const r = await fetch("/swap?to=" + to, { method: "POST" });
  if (!r.ok) throw new Error("swap failed");
}
(async () => {
 try {
  await check("simple_get_allowed", async () => text(await fetch(url(SHOP, "/data"))));
  await check("simple_get_denied", async () => text(await fetch(url(CLOSED, "/data"))));
  await check("preflighted_put", async () => text(await fetch(url(SHOP, "/data"),
    { method: "PUT", headers: { "X-Custom": "1", "Content-Type": "application/json" }, body: "{}" })));
  await check("denied_header", async () => text(await fetch(url(SHOP, "/data"),
    { method: "PUT", headers: { "X-Not-Allowed": "1" }, body: "{}" })));
  await check("credentials_set_cookie", async () =>
    text(await fetch(url(SHOP, "/set-cookie"), { credentials: "include" })));
  await check("credentials_cookie_sent", async () =>
    text(await fetch(url(SHOP, "/echo-cookie"), { credentials: "include" })));
  await check("credentials_refused", async () =>
    text(await fetch(url(PLAIN, "/echo-cookie"), { credentials: "include" })));
  await check("exposed_header", async () =>
    String((await fetch(url(SHOP, "/data"))).headers.get("x-request-id")));
  await check("unexposed_header", async () =>
    String((await fetch(url(PLAIN, "/data"))).headers.get("x-request-id")));
  await check("before_swap", async () => text(await fetch(url(SHOP, "/data"))));
  await swap("closed");
  await check("after_swap_closed", async () => text(await fetch(url(SHOP, "/data"))));
  await check("after_swap_closed_put", async () => text(await fetch(url(SHOP, "/data"),
    { method: "PUT", headers: { "X-Custom": "1" }, body: "{}" })));
  await swap("open");
  await check("after_swap_open", async () => text(await fetch(url(SHOP, "/data"))));
  // One sidecar, per-route rules: `/public/` is open to any origin without credentials,
  // `/api/` to this page's origin with them; the rest to another origin.
  await check("route_public_get", async () => text(await fetch(url(ROUTED, "/public/data"))));
  await check("route_public_credentials_refused", async () =>
    text(await fetch(url(ROUTED, "/public/echo-cookie"), { credentials: "include" })));
  await check("route_public_preflight_refused", async () => text(await fetch(url(ROUTED, "/public/data"),
    { method: "PUT", headers: { "X-Custom": "1" }, body: "{}" })));
  await check("route_api_credentials", async () =>
    text(await fetch(url(ROUTED, "/api/echo-cookie"), { credentials: "include" })));
  await check("route_api_preflighted_put", async () => text(await fetch(url(ROUTED, "/api/data"),
    { method: "PUT", headers: { "X-Custom": "1" }, body: "{}", credentials: "include" })));
  await check("route_none_matches", async () => text(await fetch(url(ROUTED, "/data"))));
  // A policy that takes its origins from an origin set; then the set gains this page's
  // origin, as a delta, with no restart.
  await check("set_before", async () => text(await fetch(url(FRONTENDS, "/data"))));
  await swap("set");
  await check("set_after", async () => text(await fetch(url(FRONTENDS, "/data"))));
 } catch (e) {
  // The test then fails on this entry instead of waiting for a report that never comes.
  results.page_error = String(e);
 }
  await fetch("/result", { method: "POST", body: JSON.stringify(results) });
})();
</script>
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_allows_exactly_what_the_policy_says() {
    let Some(browser) = chromium() else { return };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let up = upstream(seen.clone()).await;

    // The page's origin is fixed before the sidecars' policies name it.
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://{}", page_listener.local_addr().unwrap());
    let open = v1::Policy {
        service: "shop".into(),
        allowed_origins: vec![page_origin.clone()],
        allowed_methods: vec!["PUT".into()],
        allowed_headers: vec!["x-custom".into(), "content-type".into()],
        exposed_headers: vec!["x-request-id".into()],
        allow_credentials: true,
        max_age_seconds: Some(0),
        ..Default::default()
    };
    let closed = v1::Policy {
        allowed_origins: vec!["https://elsewhere.example".into()],
        ..open.clone()
    };
    let (shop, shop_set) = sidecar(up, open.clone()).await;
    let (plain, _) = sidecar(
        up,
        v1::Policy {
            service: "plain".into(),
            allowed_origins: vec![page_origin.clone()],
            ..Default::default()
        },
    )
    .await;
    let (closed_url, _) = sidecar(
        up,
        v1::Policy {
            service: "closed".into(),
            ..closed.clone()
        },
    )
    .await;

    let list = |values: &[&str]| {
        Some(v1::StringList {
            values: values.iter().map(|s| s.to_string()).collect(),
        })
    };
    let (routed, _) = sidecar(
        up,
        v1::Policy {
            service: "routed".into(),
            allowed_origins: vec!["https://elsewhere.example".into()],
            max_age_seconds: Some(0),
            routes: vec![
                v1::Route {
                    path: "/public/".into(),
                    allowed_origins: list(&["*"]),
                    ..Default::default()
                },
                v1::Route {
                    path: "/api/".into(),
                    allowed_origins: list(&[&page_origin]),
                    allowed_methods: list(&["PUT"]),
                    allowed_headers: list(&["x-custom"]),
                    allow_credentials: Some(true),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    )
    .await;

    let uses_set = v1::Policy {
        service: "corp".into(),
        allowed_origins: vec!["set:frontends".into()],
        revision: 1,
        effective_revision: 1,
        ..Default::default()
    };
    let (frontends_url, frontends_set) = sidecar_from(
        up,
        v1::DiscoveryResponse {
            revision: 1,
            snapshot: true,
            upserts: vec![uses_set.clone()],
            origin_sets: vec![frontends(1, 0, &["https://elsewhere.example"], &[])],
            ..Default::default()
        },
    )
    .await;
    let set_write = v1::DiscoveryResponse {
        revision: 2,
        upserts: vec![v1::Policy {
            effective_revision: 2,
            ..uses_set
        }],
        origin_sets: vec![frontends(
            2,
            1,
            &["https://elsewhere.example", &page_origin],
            &[&page_origin],
        )],
        ..Default::default()
    };

    let page = PAGE
        .replace("__FRONTENDS__", &frontends_url)
        .replace("__SHOP__", &shop)
        .replace("__PLAIN__", &plain)
        .replace("__CLOSED__", &closed_url)
        .replace("__ROUTED__", &routed);
    let (results_tx, mut results_rx) = mpsc::channel::<String>(1);
    let revision = Arc::new(Mutex::new(1));
    let page_server = {
        let (page, results_tx) = (Arc::new(page), results_tx);
        move |req: Request<Incoming>| {
            let (page, results_tx, shop_set, revision) = (
                page.clone(),
                results_tx.clone(),
                shop_set.clone(),
                revision.clone(),
            );
            let (frontends_set, set_write) = (frontends_set.clone(), set_write.clone());
            let (open, closed) = (open.clone(), closed.clone());
            async move {
                let path = req.uri().path().to_owned();
                let query = req.uri().query().unwrap_or_default().to_owned();
                match path.as_str() {
                    "/" => reply(
                        StatusCode::OK,
                        &[("content-type", "text/html".into())],
                        page.to_string(),
                    ),
                    "/swap" if query == "to=set" => {
                        frontends_set.apply(&set_write).unwrap();
                        reply(StatusCode::OK, &[], "swapped")
                    }
                    "/swap" => {
                        let policy = if query == "to=closed" { closed } else { open };
                        let mut revision = revision.lock().unwrap();
                        *revision += 1;
                        shop_set.apply(&snapshot(*revision, policy)).unwrap();
                        reply(StatusCode::OK, &[], "swapped")
                    }
                    "/result" => {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = results_tx
                            .send(String::from_utf8(body.to_vec()).unwrap())
                            .await;
                        reply(StatusCode::OK, &[], "thanks")
                    }
                    _ => reply(StatusCode::NOT_FOUND, &[], "not found"),
                }
            }
        }
    };
    serve(page_listener, page_server);

    let profile = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{page_origin}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (exited_tx, exited_rx) = oneshot::channel::<String>();
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        let _ = exited_tx.send(text);
    });
    let results = support::within("the page in Chromium to report its checks", async {
        tokio::select! {
            results = results_rx.recv() => results.unwrap(),
            output = exited_rx => panic!("Chromium exited before the page reported:\n{}", output.unwrap_or_default()),
        }
    })
    .await;
    child.kill().await.unwrap();
    log.abort();

    let results: BTreeMap<String, String> = serde_json::from_str(&results).unwrap();
    let expected: BTreeMap<&str, &str> = [
        ("simple_get_allowed", "200 hello"),
        ("simple_get_denied", "blocked: TypeError"),
        ("preflighted_put", "200 hello"),
        ("denied_header", "blocked: TypeError"),
        ("credentials_set_cookie", "200 set"),
        ("credentials_cookie_sent", "200 cookie=session=s3cr3t"),
        ("credentials_refused", "blocked: TypeError"),
        ("exposed_header", "rid-42"),
        ("unexposed_header", "null"),
        ("before_swap", "200 hello"),
        ("after_swap_closed", "blocked: TypeError"),
        ("after_swap_closed_put", "blocked: TypeError"),
        ("after_swap_open", "200 hello"),
        ("route_public_get", "200 hello"),
        ("route_public_credentials_refused", "blocked: TypeError"),
        ("route_public_preflight_refused", "blocked: TypeError"),
        ("route_api_credentials", "200 cookie=session=s3cr3t"),
        ("route_api_preflighted_put", "200 hello"),
        ("route_none_matches", "blocked: TypeError"),
        ("set_before", "blocked: TypeError"),
        ("set_after", "200 hello"),
    ]
    .into_iter()
    .collect();
    let results: BTreeMap<&str, &str> = results
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(results, expected);

    // Preflights were answered by the sidecar; the upstream saw only actual requests, and
    // none of the refused preflights' PUTs.
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|s| s.starts_with("OPTIONS")), "{seen:?}");
    let puts: Vec<&String> = seen.iter().filter(|s| s.starts_with("PUT")).collect();
    assert_eq!(puts, ["PUT /data", "PUT /api/data"], "{seen:?}");
}
