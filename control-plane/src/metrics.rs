//! Prometheus metrics of the control plane, served as text on `/metrics` of a separate HTTP
//! listener: connected sidecars, pushes, ACKs, NACKs, refused streams, and the time from a
//! change's commit to each sidecar's ACK of it.

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The control plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open discovery streams.
    pub connected: Gauge,
    /// Responses pushed to sidecars.
    pub pushes: Counter,
    /// ACKs received.
    pub acks: Counter,
    /// NACKs received.
    pub nacks: Counter,
    /// Streams refused by admission control.
    pub streams_refused: Counter,
    convergence: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("corsair");
        let connected = Gauge::default();
        let pushes = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let streams_refused = Counter::default();
        // 1 ms to ~16 s.
        let convergence = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "connected_sidecars",
            "Open discovery streams",
            connected.clone(),
        );
        registry.register("pushes", "Responses pushed to sidecars", pushes.clone());
        registry.register("acks", "ACKs received from sidecars", acks.clone());
        registry.register("nacks", "NACKs received from sidecars", nacks.clone());
        registry.register(
            "streams_refused",
            "Streams refused by admission control",
            streams_refused.clone(),
        );
        registry.register(
            "convergence_seconds",
            "Time from a policy change's commit to a sidecar's ACK of it",
            convergence.clone(),
        );
        Metrics {
            registry,
            connected,
            pushes,
            acks,
            nacks,
            streams_refused,
            convergence,
        }
    }
}

impl Metrics {
    /// Records one commit-to-ACK time.
    pub fn observe_convergence(&self, micros: i64) {
        self.convergence.observe(micros.max(0) as f64 / 1e6);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "metrics listener");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, Infallible>(response.expect("static response parts are valid"))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
