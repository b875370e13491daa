//! The sidecar's Prometheus metrics, served as text on the admin listener's `/metrics`:
//! requests by decision and reason class, preflights, upstream errors, open client
//! connections, the bounds reached, the policy revision, the sync state and the time since the last update.
//!
//! Every counter the request path touches is created up front and indexed by plain numbers,
//! so counting a request is one atomic add: no label hashing, no lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use corsair_policy::{Kind, Reason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::policies::PolicySet;
use crate::sync::SyncState;

const KINDS: [Kind; 4] = [
    Kind::NotCors,
    Kind::SameOrigin,
    Kind::Preflight,
    Kind::Actual,
];
const CLASSES: [&str; 8] = [
    "allowed",
    "not_cors",
    "same_origin",
    "origin",
    "method",
    "header",
    "private_network",
    "malformed",
];
const OUTCOMES: [&str; 3] = ["allowed", "denied", "shadow_denied"];
const SYNC_STATES: [&str; 4] = ["none", "connecting", "connected", "nacked"];

/// What became of a request, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The CORS protocol allows it.
    Allowed,
    /// Refused (headers withheld, or answered here in enforce mode).
    Denied,
    /// Shadow mode: it would have been refused, and was let through untouched.
    ShadowDenied,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    kind: &'static str,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Vec<Counter>,
    without_policy: [Counter; 2],
    upstream_errors: [Counter; 2],
    client_body_errors: Counter,
    upgrades: Counter,
    client_connections: [Gauge; 2],
    accept_errors: Counter,
    connection_limit_reached: Counter,
    upstream_limit_refusals: Counter,
    denial_logs_suppressed: Counter,
    revision: Gauge,
    since_update: Gauge<f64, AtomicU64>,
    sync_states: Vec<Gauge>,
    started: Instant,
}

/// What an open client connection is doing, for the `state` label of `client_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Reading, handling or answering requests, or between requests that come close
    /// together (an HTTP/2 connection is always here).
    Serving = 0,
    /// An HTTP/1 keep-alive connection waiting for its next request, holding no buffers.
    Idle = 1,
}

/// One open client connection, counted in `client_connections` under its current state
/// until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    metrics: Arc<Metrics>,
    state: ConnectionState,
}

impl OpenConnection {
    /// Counts a new connection, serving.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.client_connections[ConnectionState::Serving as usize].inc();
        OpenConnection {
            metrics,
            state: ConnectionState::Serving,
        }
    }

    /// Moves the connection to `state`.
    pub fn set(&mut self, state: ConnectionState) {
        if state != self.state {
            self.metrics.client_connections[self.state as usize].dec();
            self.metrics.client_connections[state as usize].inc();
            self.state = state;
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.client_connections[self.state as usize].dec();
    }
}

/// Which upstream failure, for the `kind` label of `upstream_errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connecting or talking to the upstream failed (`502`).
    Unavailable,
    /// No response headers in time (`504`).
    Timeout,
}

fn class_index(reason: Reason) -> usize {
    let class = reason.class();
    CLASSES
        .iter()
        .position(|c| *c == class)
        .expect("every reason class is listed")
}

fn kind_index(kind: Kind) -> usize {
    KINDS.iter().position(|k| *k == kind).expect("every kind")
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("corsair_sidecar");
        let decisions_family = Family::<DecisionLabels, Counter>::default();
        let mut decisions = Vec::with_capacity(KINDS.len() * OUTCOMES.len() * CLASSES.len());
        for kind in KINDS {
            for outcome in OUTCOMES {
                for reason in CLASSES {
                    decisions.push(
                        decisions_family
                            .get_or_create(&DecisionLabels {
                                kind: kind.as_str(),
                                outcome,
                                reason,
                            })
                            .clone(),
                    );
                }
            }
        }
        registry.register(
            "requests",
            "Requests decided by the policy, by kind (preflight, actual, same_origin, not_cors), outcome and reason class",
            decisions_family,
        );
        let without_family = Family::<StateLabel, Counter>::default();
        let without_policy = ["passed", "denied"]
            .map(|state| without_family.get_or_create(&StateLabel { state }).clone());
        registry.register(
            "requests_without_policy",
            "Requests that arrived while no policy was loaded, by what was done (passed, denied)",
            without_family,
        );
        let errors_family = Family::<KindLabel, Counter>::default();
        let upstream_errors = ["unavailable", "timeout"]
            .map(|kind| errors_family.get_or_create(&KindLabel { kind }).clone());
        registry.register(
            "upstream_errors",
            "Upstream failures: unavailable (answered 502) and timeout (answered 504, or a response body cut off after a stall)",
            errors_family,
        );
        let client_body_errors = Counter::default();
        registry.register(
            "client_body_errors",
            "Requests whose body failed to arrive from the client before the upstream answered: cut short or malformed (answered 400 where the client still listens), or stalled for the response timeout (answered 408)",
            client_body_errors.clone(),
        );
        let upgrades = Counter::default();
        registry.register(
            "upgrades",
            "Connections upgraded (WebSocket and other Upgrade protocols) and spliced to the upstream",
            upgrades.clone(),
        );
        let connections_family = Family::<StateLabel, Gauge>::default();
        let client_connections = ["serving", "idle"].map(|state| {
            connections_family
                .get_or_create(&StateLabel { state })
                .clone()
        });
        registry.register(
            "client_connections",
            "Open client connections: serving (handling requests, or between requests that come close together) or idle (HTTP/1 keep-alive, waiting for the next request with no buffers held); upgraded connections leave this count",
            connections_family,
        );
        let accept_errors = Counter::default();
        registry.register(
            "accept_errors",
            "Failed accepts on the proxy and admin listeners (out of file descriptors, most often), each followed by a pause of 5 ms doubling up to 1 s",
            accept_errors.clone(),
        );
        let connection_limit_reached = Counter::default();
        registry.register(
            "connection_limit_reached",
            "Times the proxy listener found --max-connections client connections open and stopped accepting until one closed",
            connection_limit_reached.clone(),
        );
        let upstream_limit_refusals = Counter::default();
        registry.register(
            "upstream_limit_refusals",
            "Requests answered 503 because all --upstream-max-connections upstream connections stayed busy for the connect timeout",
            upstream_limit_refusals.clone(),
        );
        let denial_logs_suppressed = Counter::default();
        registry.register(
            "denial_logs_suppressed",
            "Denied-request log lines dropped by the rate limit",
            denial_logs_suppressed.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "policy_revision",
            "Global revision of the policies in force (0: none)",
            revision.clone(),
        );
        let since_update = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "seconds_since_policy_update",
            "Seconds since the policies in force were last updated (since start, if never)",
            since_update.clone(),
        );
        let states_family = Family::<StateLabel, Gauge>::default();
        let sync_states = SYNC_STATES
            .iter()
            .map(|state| states_family.get_or_create(&StateLabel { state }).clone())
            .collect();
        registry.register(
            "sync_state",
            "1 for the control-plane sync state the sidecar is in (none: no control plane)",
            states_family,
        );
        Metrics {
            registry,
            decisions,
            without_policy,
            upstream_errors,
            client_body_errors,
            upgrades,
            client_connections,
            accept_errors,
            connection_limit_reached,
            upstream_limit_refusals,
            denial_logs_suppressed,
            revision,
            since_update,
            sync_states,
            started: Instant::now(),
        }
    }
}

impl Metrics {
    /// Counts one decided request.
    pub fn decided(&self, kind: Kind, outcome: Outcome, reason: Reason) {
        let index = (kind_index(kind) * OUTCOMES.len() + outcome as usize) * CLASSES.len()
            + class_index(reason);
        self.decisions[index].inc();
    }

    /// Counts one request that arrived with no policy loaded.
    pub fn without_policy(&self, denied: bool) {
        self.without_policy[usize::from(denied)].inc();
    }

    /// Counts one request whose body failed to arrive from the client.
    pub fn client_body_error(&self) {
        self.client_body_errors.inc();
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, error: UpstreamError) {
        self.upstream_errors[error as usize].inc();
    }

    /// Counts one failed accept.
    pub fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    /// Counts one time the proxy listener found the connection limit reached.
    pub fn connection_limit_reached(&self) {
        self.connection_limit_reached.inc();
    }

    /// Counts one request refused because every upstream connection stayed busy.
    pub fn upstream_limit_refused(&self) {
        self.upstream_limit_refusals.inc();
    }

    /// Counts one upgraded connection.
    pub fn upgraded(&self) {
        self.upgrades.inc();
    }

    /// The metrics in Prometheus text format, with the gauges read from `policies` and `sync`
    /// now.
    pub fn render(
        &self,
        policies: &PolicySet,
        sync: Option<&watch::Receiver<SyncState>>,
    ) -> String {
        let current = policies.load();
        self.revision.set(current.revision);
        let since = current.applied_at.unwrap_or(self.started).elapsed();
        self.since_update.set(since.as_secs_f64());
        let state = match sync.map(|rx| rx.borrow().clone()) {
            None => "none",
            Some(SyncState::Connecting { .. }) => "connecting",
            Some(SyncState::Connected { .. }) => "connected",
            Some(SyncState::Nacked { .. }) => "nacked",
        };
        for (gauge, name) in self.sync_states.iter().zip(SYNC_STATES) {
            gauge.set(i64::from(name == state));
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// A rate limit on log lines: at most `per_second` in each second; what is dropped is counted
/// at once (in `dropped`) and reported with the next line that gets through. Lock-free, for
/// the request path.
#[derive(Debug)]
pub struct LogLimit {
    per_second: u32,
    epoch: Instant,
    /// The current second since `epoch` (high 32 bits) and lines logged in it (low 32 bits).
    window: AtomicU64,
    suppressed: AtomicU64,
    dropped: Counter,
}

impl LogLimit {
    /// A limit of `per_second` lines each second; every dropped line also counts in `dropped`.
    pub fn new(per_second: u32, dropped: Counter) -> LogLimit {
        LogLimit {
            per_second,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            dropped,
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines dropped since
    /// the last one logged, or `None` (this one is dropped and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(self.epoch.elapsed().as_secs())
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        let second = (second & u64::from(u32::MAX)) << 32;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let held = current & !u64::from(u32::MAX);
            // A caller that read the clock before another moved the window on counts in the
            // newer second: the window never goes back.
            let next = if second > held {
                second | 1
            } else if (current & u64::from(u32::MAX)) < u64::from(self.per_second) {
                current + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                self.dropped.inc();
                return None;
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => current = actual,
            }
        }
    }
}

/// The metrics and the log limit the request path shares.
#[derive(Debug, Clone)]
pub struct Observer {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The denied-request log limit.
    pub denials: Arc<LogLimit>,
}

impl Default for Observer {
    fn default() -> Self {
        let metrics = Arc::new(Metrics::default());
        let dropped = metrics.denial_logs_suppressed.clone();
        Observer {
            metrics,
            denials: Arc::new(LogLimit::new(DENIAL_LOGS_PER_SECOND, dropped)),
        }
    }
}

/// Denied requests logged per second at most; the rest are counted.
pub const DENIAL_LOGS_PER_SECOND: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limit_admits_per_second_and_reports_what_it_dropped() {
        let dropped = Counter::default();
        let limit = LogLimit::new(3, dropped.clone());
        assert_eq!(limit.admit_at(5), Some(0));
        assert_eq!(limit.admit_at(5), Some(0));
        assert_eq!(limit.admit_at(5), Some(0));
        assert_eq!(limit.admit_at(5), None);
        assert_eq!(limit.admit_at(5), None);
        assert_eq!(dropped.get(), 2);
        // A new second: the first line through reports the two dropped.
        assert_eq!(limit.admit_at(6), Some(2));
        assert_eq!(limit.admit_at(6), Some(0));
        assert_eq!(limit.admit_at(6), Some(0));
        // A late caller still in second 5 counts in second 6, which is full.
        assert_eq!(limit.admit_at(5), None);
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn every_decision_has_its_own_counter() {
        let metrics = Metrics::default();
        metrics.decided(Kind::Preflight, Outcome::Denied, Reason::HeaderNotAllowed);
        metrics.decided(
            Kind::Actual,
            Outcome::ShadowDenied,
            Reason::OriginNotAllowed,
        );
        metrics.decided(Kind::Actual, Outcome::Allowed, Reason::Allowed { entry: 0 });
        metrics.decided(Kind::Actual, Outcome::Allowed, Reason::Allowed { entry: 3 });
        metrics.upstream_error(UpstreamError::Timeout);
        let text = metrics.render(&PolicySet::default(), None);
        for line in [
            r#"corsair_sidecar_requests_total{kind="preflight",outcome="denied",reason="header"} 1"#,
            r#"corsair_sidecar_requests_total{kind="actual",outcome="shadow_denied",reason="origin"} 1"#,
            r#"corsair_sidecar_requests_total{kind="actual",outcome="allowed",reason="allowed"} 2"#,
            r#"corsair_sidecar_upstream_errors_total{kind="timeout"} 1"#,
            r#"corsair_sidecar_upstream_errors_total{kind="unavailable"} 0"#,
            r#"corsair_sidecar_sync_state{state="none"} 1"#,
            r#"corsair_sidecar_policy_revision 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
