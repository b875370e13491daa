//! The admin listener, on its own port: `/healthz` (the process is up), `/readyz` (a policy
//! is loaded, or what happens without one), `/metrics` (Prometheus text) and `/policy` (the
//! active policies as JSON, their revisions, and where they came from).

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::policies::PolicySet;
use crate::proxy::NoPolicy;
use crate::sync::SyncState;

/// Where the active policies came from.
pub type Source = Arc<Mutex<&'static str>>;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The enforced policies.
    pub policies: Arc<PolicySet>,
    /// The service this sidecar serves.
    pub service: String,
    /// Behaviour without a policy.
    pub no_policy: NoPolicy,
    /// `"none"`, `"cache file"`, `"control plane"` or `"policy file"`.
    pub source: Source,
    /// The proxy's metrics.
    pub metrics: Arc<Metrics>,
    /// The control-plane sync state, when following one.
    pub sync: Option<watch::Receiver<SyncState>>,
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static parts are valid")
}

fn route(path: &str, state: &AdminState) -> Response<Full<Bytes>> {
    let snapshot = state.policies.load();
    let loaded = snapshot.services.contains_key(&state.service);
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.render(&state.policies, state.sync.as_ref()),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match (loaded, state.no_policy) {
            (true, _) => respond(
                StatusCode::OK,
                "text/plain",
                format!("ready: policy revision {}\n", snapshot.revision),
            ),
            (false, NoPolicy::PassThrough) => respond(
                StatusCode::OK,
                "text/plain",
                "ready: no policy yet; passing traffic through untouched\n".into(),
            ),
            (false, NoPolicy::Deny) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no policy yet; cross-origin requests are denied\n".into(),
            ),
        },
        "/policy" => {
            let services: serde_json::Map<String, serde_json::Value> = snapshot
                .services
                .iter()
                .map(|(name, active)| {
                    let policy = active.compiled.policy();
                    let mut value = serde_json::json!({
                        "revision": active.revision,
                        "policy": policy.spec(),
                    });
                    // With origin sets, every origin in force and the set it came from.
                    if !policy.sets().is_empty() {
                        let sets: serde_json::Map<String, serde_json::Value> = policy
                            .sets()
                            .iter()
                            .map(|(_, set)| {
                                let revision = snapshot.sets.get(set.name()).map(|h| h.revision);
                                (set.name().to_owned(), serde_json::json!({ "revision": revision, "entries": set.len() }))
                            })
                            .collect();
                        let effective: Vec<serde_json::Value> = policy
                            .effective_origins()
                            .into_iter()
                            .map(|(origin, set)| match set {
                                Some(set) => serde_json::json!({ "origin": origin, "origin_set": set }),
                                None => serde_json::json!({ "origin": origin }),
                            })
                            .collect();
                        value["origin_sets"] = serde_json::Value::Object(sets);
                        value["effective_origins"] = serde_json::Value::Array(effective);
                    }
                    (name.clone(), value)
                })
                .collect();
            let body = serde_json::json!({
                "service": state.service,
                "revision": snapshot.revision,
                "source": *state.source.lock().expect("source lock"),
                "services": services,
            });
            respond(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut listener =
        crate::listener::Listener::new(listener, "admin", None, state.metrics.clone());
    loop {
        let (stream, _, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = route(req.uri().path(), &state);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
