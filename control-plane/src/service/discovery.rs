//! `corsair.v1.DiscoveryService.StreamPolicies`: one task per sidecar stream.
//!
//! The sidecar says who it is and which revision of each policy (and origin set) it holds; the
//! stream answers with only what differs (an upsert per changed policy, a removal per deleted
//! one, each referenced origin set it lacks, whole or as a delta), or a full snapshot when the
//! sidecar holds nothing. A policy's revision here is its effective one: a write of a set it
//! references changes it too. At most one response is unacknowledged: while it
//! is, newer changes are not queued; the next push is computed from the latest cache state
//! once the ACK arrives (latest state wins). A NACKed revision is not resent until the policy
//! changes again. No ACK within the timeout, the maximum connection age (jittered, so load
//! rebalances across replicas) or shutdown ends the stream; the sidecar reconnects.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corsair_proto::v1::discovery_request::Kind;
use corsair_proto::v1::{self, discovery_service_server::DiscoveryService};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use super::fleet::Fleet;
use crate::cache::Snapshot;
use crate::metrics::Metrics;
use crate::status::{bad_request, status};
use crate::store::{SidecarRecord, SidecarState, now_micros};

/// Stream behaviour.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// A push not acknowledged within this ends the stream.
    pub ack_timeout: Duration,
    /// A stream lives at most this long (± `age_jitter`), then the sidecar reconnects.
    pub max_connection_age: Duration,
    /// Fraction of `max_connection_age` by which each stream's age is randomly shortened.
    pub age_jitter: f64,
    /// New streams admitted per second (with a burst of as many); beyond, `RESOURCE_EXHAUSTED`.
    pub max_new_streams_per_sec: u32,
    /// Streams one sidecar credential may hold open at once; beyond, `RESOURCE_EXHAUSTED`.
    pub max_streams_per_identity: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            ack_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(30 * 60),
            age_jitter: 0.1,
            max_new_streams_per_sec: 2000,
            max_streams_per_identity: 1024,
        }
    }
}

/// A token bucket for stream admission.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The discovery service.
#[derive(Debug, Clone)]
pub struct Discovery {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    config: StreamConfig,
    shutdown: watch::Receiver<bool>,
    admission: Arc<Mutex<Bucket>>,
    tasks: tokio_util::task::TaskTracker,
    guard: Option<Guard>,
    /// Open streams per sidecar credential.
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream of a sidecar credential, counted in [`Discovery::held`] while it lives.
struct Held {
    held: Arc<Mutex<HashMap<String, usize>>>,
    identity: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("held streams");
        if let Some(count) = held.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.identity);
            }
        }
    }
}

/// Bytes of a sidecar's `Hello` fields, at most: they are stored in the fleet table and shown
/// by fleet status.
mod hello_caps {
    /// `sidecar_id`.
    pub(super) const SIDECAR_ID: usize = 256;
    /// `host`.
    pub(super) const HOST: usize = 255;
    /// `version`.
    pub(super) const VERSION: usize = 128;
    /// One service name.
    pub(super) const SERVICE: usize = 253;
    /// How many services (and known revisions).
    pub(super) const SERVICES: usize = 10_000;
}

/// Refuses a `Hello` whose fields exceed [`hello_caps`], naming the field.
fn check_hello(hello: &v1::Hello) -> Result<(), Status> {
    use hello_caps::*;
    let field = |name: &str, value: &str, max: usize| {
        if value.len() > max {
            return Err(bad_request(
                &format!("hello.{name}"),
                format!("{} bytes; at most {max}", value.len()),
            ));
        }
        Ok(())
    };
    if hello.sidecar_id.is_empty() {
        return Err(bad_request("hello.sidecar_id", "required"));
    }
    field("sidecar_id", &hello.sidecar_id, SIDECAR_ID)?;
    field("host", &hello.host, HOST)?;
    field("version", &hello.version, VERSION)?;
    if hello.services.len() > SERVICES
        || hello.known_revisions.len() > SERVICES
        || hello.known_origin_sets.len() > SERVICES
    {
        return Err(bad_request(
            "hello.services",
            format!("at most {SERVICES} services"),
        ));
    }
    for service in hello
        .services
        .iter()
        .chain(hello.known_revisions.keys())
        .chain(hello.known_origin_sets.keys())
    {
        if service.is_empty() || service.len() > SERVICE {
            return Err(bad_request(
                "hello.services",
                format!("a service name is 1 to {SERVICE} bytes"),
            ));
        }
    }
    Ok(())
}

/// What a stream needs to keep checking its caller's token: the store, and the signal that
/// a token was revoked in this process (revocations by other replicas are found by the
/// periodic re-check).
#[derive(Debug, Clone)]
struct Guard {
    shared: super::Shared,
    revoked: watch::Receiver<u64>,
    recheck: Duration,
}

impl Discovery {
    /// A discovery service reading `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        fleet: Arc<Fleet>,
        metrics: Arc<Metrics>,
        config: StreamConfig,
        shutdown: watch::Receiver<bool>,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        let burst = f64::from(config.max_new_streams_per_sec);
        Discovery {
            snapshots,
            fleet,
            metrics,
            config,
            shutdown,
            tasks,
            admission: Arc::new(Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            })),
            guard: None,
            held: Arc::default(),
        }
    }

    /// Enforces sidecar scopes and ends a stream when its token is revoked (signalled by
    /// `revoked`, or found every `recheck`) or expires. Refusals are audited through `shared`.
    pub fn guarded(
        mut self,
        shared: super::Shared,
        revoked: watch::Receiver<u64>,
        recheck: Duration,
    ) -> Self {
        self.guard = Some(Guard {
            shared,
            revoked,
            recheck,
        });
        self
    }

    fn admit(&self) -> bool {
        let rate = f64::from(self.config.max_new_streams_per_sec);
        let mut b = self.admission.lock().expect("admission lock");
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Items are boxed: tokio's channel allocates slots 32 at a time, and an unboxed
/// `Result<DiscoveryResponse, Status>` would make that block about 10 KB per idle stream.
type Outbound = mpsc::Sender<Result<Box<v1::DiscoveryResponse>, Box<Status>>>;

/// The status a stream ends with when the control plane stops.
fn shutting_down() -> Status {
    status(
        Code::Unavailable,
        "SHUTTING_DOWN",
        "control plane shutting down",
        [],
    )
}

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    type StreamPoliciesStream =
        Pin<Box<dyn Stream<Item = Result<v1::DiscoveryResponse, Status>> + Send + 'static>>;

    async fn stream_policies(
        &self,
        request: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamPoliciesStream>, Status> {
        if !self.admit() {
            self.metrics.streams_refused.inc();
            return Err(status(
                Code::ResourceExhausted,
                "STREAM_RATE_EXCEEDED",
                "too many new streams; retry with exponential backoff",
                [],
            ));
        }
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let principal = super::principal(&request).cloned();
        let ctx = self.guard.as_ref().map(|g| {
            g.shared.context(
                &request,
                "corsair.v1.DiscoveryService/StreamPolicies",
                "",
                "",
            )
        });
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let span = tracing::info_span!("discovery", %peer, sidecar = tracing::field::Empty);
        self.tasks.spawn(
            self.clone()
                .session(inbound, tx, principal, ctx)
                .instrument(span),
        );
        Ok(Response::new(Box::pin(
            ReceiverStream::new(rx).map(|item| item.map(|r| *r).map_err(|s| *s)),
        )))
    }
}

/// The one response awaiting its ACK.
struct InFlight {
    nonce: String,
    revision: i64,
    /// Service → effective revision pushed (0: removed).
    entries: Vec<(String, i64)>,
    /// Origin sets pushed, with their revisions.
    sets: Vec<(String, i64)>,
    /// Newest commit time among the pushed policies, for the convergence histogram.
    committed_at: Option<i64>,
    sent: tokio::time::Instant,
}

impl Discovery {
    /// Counts one more open stream of a sidecar credential, or refuses it past
    /// `max_streams_per_identity`. Other callers (and a control plane without auth) are not
    /// counted.
    fn hold(&self, principal: Option<&crate::auth::Principal>) -> Result<Option<Held>, Status> {
        let Some(p) = principal.filter(|p| p.role == crate::auth::Role::Sidecar) else {
            return Ok(None);
        };
        let mut held = self.held.lock().expect("held streams");
        let count = held.entry(p.name.clone()).or_default();
        if *count >= self.config.max_streams_per_identity {
            return Err(status(
                Code::ResourceExhausted,
                "SIDECARS_PER_IDENTITY_EXCEEDED",
                format!(
                    "{} holds {} open streams already, the most one credential may",
                    p.name, count
                ),
                [],
            ));
        }
        *count += 1;
        Ok(Some(Held {
            held: self.held.clone(),
            identity: p.name.clone(),
        }))
    }

    /// Why the stream's token no longer admits it (revoked, expired or gone), if it does not.
    async fn token_refusal(&self, token_id: Option<&str>) -> Option<Status> {
        let (guard, id) = (self.guard.as_ref()?, token_id?);
        crate::auth::stream_refusal(guard.shared.store.as_ref(), id).await
    }

    async fn session(
        self,
        mut inbound: Streaming<v1::DiscoveryRequest>,
        tx: Outbound,
        principal: Option<crate::auth::Principal>,
        ctx: Option<crate::store::WriteContext>,
    ) {
        let hello = match inbound.message().await {
            Ok(Some(v1::DiscoveryRequest {
                kind: Some(Kind::Hello(hello)),
            })) => hello,
            Ok(Some(_)) => {
                let _ = tx
                    .send(Err(Box::new(status(
                        Code::InvalidArgument,
                        "HELLO_REQUIRED",
                        "the first message must be a Hello",
                        [],
                    ))))
                    .await;
                return;
            }
            Ok(None) | Err(_) => return,
        };
        if let Err(refused) = check_hello(&hello) {
            let _ = tx.send(Err(Box::new(refused))).await;
            return;
        }
        let _held = match self.hold(principal.as_ref()) {
            Ok(held) => held,
            Err(refused) => {
                let _ = tx.send(Err(Box::new(refused))).await;
                return;
            }
        };
        tracing::Span::current().record("sidecar", hello.sidecar_id.as_str());
        // A sidecar token streams only its own services, named explicitly.
        if let (Some(guard), Some(p), Some(ctx)) = (&self.guard, &principal, ctx)
            && p.role == crate::auth::Role::Sidecar
        {
            let outside: Vec<&String> = hello
                .services
                .iter()
                .filter(|s| !p.services.contains(s))
                .collect();
            // Nor may it take over the fleet row of a live sidecar of other services.
            let held_elsewhere = match self.fleet.current(&hello.sidecar_id).await {
                Ok(Some(row)) => {
                    row.state != SidecarState::Disconnected.as_str()
                        && row
                            .services
                            .split(',')
                            .any(|s| !p.services.iter().any(|own| own == s))
                }
                _ => false,
            };
            if hello.services.is_empty() || !outside.is_empty() || held_elsewhere {
                let error = crate::store::WriteError::PermissionDenied {
                    reason: if held_elsewhere {
                        "SIDECAR_ID_HELD"
                    } else {
                        "SERVICE_NOT_PERMITTED"
                    },
                    required_roles: vec![crate::auth::Role::Sidecar.as_str()],
                    message: if held_elsewhere {
                        format!(
                            "sidecar id {:?} is held by a live sidecar of other services",
                            hello.sidecar_id
                        )
                    } else {
                        format!(
                            "{} may stream only {}; asked for {}",
                            p.name,
                            p.services.join(", "),
                            if hello.services.is_empty() {
                                "every service".to_owned()
                            } else {
                                hello.services.join(", ")
                            }
                        )
                    },
                };
                let status = crate::status::write_error_status(&error);
                let ctx = crate::store::WriteContext {
                    service: hello.services.first().cloned().unwrap_or_default(),
                    ..ctx
                };
                if let Err(e) = crate::auth::audit_refusal(&guard.shared, ctx, error).await {
                    tracing::warn!(error = %e, "refusal not audited");
                }
                let _ = tx.send(Err(Box::new(status))).await;
                return;
            }
        }
        let token_id = principal.as_ref().and_then(|p| p.token_id.clone());
        let mut revoked = self.guard.as_ref().map(|g| g.revoked.clone());
        let mut recheck = tokio::time::interval(
            self.guard
                .as_ref()
                .map_or(Duration::from_secs(3600), |g| g.recheck),
        );
        recheck.tick().await;
        let scope: Option<HashSet<String>> =
            (!hello.services.is_empty()).then(|| hello.services.iter().cloned().collect());
        let in_scope = |s: &str| scope.as_ref().is_none_or(|set| set.contains(s));
        let mut known: HashMap<String, i64> = hello
            .known_revisions
            .iter()
            .filter(|(s, r)| in_scope(s) && **r > 0)
            .map(|(s, r)| (s.clone(), *r))
            .collect();
        let mut needs_snapshot = hello.known_revisions.is_empty();
        // The sets the sidecar holds: it keeps every set it is sent for the life of the
        // stream and reports exactly what it holds when it opens one, so this stays exact
        // and a delta is only ever sent against a set the sidecar has.
        let mut held_sets: HashMap<String, i64> = hello
            .known_origin_sets
            .iter()
            .filter(|(_, r)| **r > 0)
            .map(|(s, r)| (s.clone(), *r))
            .collect();
        let mut nacked: HashMap<String, i64> = HashMap::new();
        let now = now_micros();
        let mut record = SidecarRecord {
            sidecar_id: hello.sidecar_id.clone(),
            services: hello.services.join(","),
            version: hello.version.clone(),
            host: hello.host.clone(),
            control_plane: self.fleet.replica.clone(),
            connected_since: now,
            last_seen: now,
            last_sent_revision: 0,
            last_acked_revision: 0,
            state: SidecarState::Pending.as_str().to_owned(),
            nack_error: String::new(),
            disconnected_at: None,
        };
        self.fleet.update(record.clone());
        self.metrics.connected.inc();
        tracing::info!(services = %record.services, "sidecar connected");

        let mut snapshots = self.snapshots.clone();
        let mut shutdown = self.shutdown.clone();
        let mut in_flight: Option<InFlight> = None;
        let mut nonce = 0u64;
        let age = self
            .config
            .max_connection_age
            .mul_f64(1.0 - self.config.age_jitter * jitter());
        let age_deadline = tokio::time::Instant::now() + age;
        let end: Option<Status> = loop {
            if in_flight.is_none() {
                let snap = snapshots.borrow_and_update().clone();
                let mut response = v1::DiscoveryResponse {
                    revision: snap.revision,
                    snapshot: needs_snapshot,
                    ..Default::default()
                };
                let mut entries = Vec::new();
                let mut sets_sent: Vec<(String, i64)> = Vec::new();
                let mut committed_at = None;
                let mut services: Vec<&String> = match &scope {
                    Some(set) => set.iter().collect(),
                    None => snap.policies.keys().chain(known.keys()).collect(),
                };
                services.sort();
                services.dedup();
                for service in services {
                    let desired = snap.policies.get(service);
                    let want = desired.map_or(0, |p| effective_revision(p));
                    let held = known.get(service).copied().unwrap_or(0);
                    // The sidecar holds a newer revision than this replica's cache has
                    // reached: wait for the cache rather than send it backwards.
                    if want == held || held > snap.revision || nacked.get(service) == Some(&want) {
                        continue;
                    }
                    match desired {
                        Some(p) => {
                            let commit = p.update_time.as_ref().map(crate::convert::micros);
                            committed_at = committed_at.max(commit);
                            for name in crate::cache::referenced(p) {
                                let Some(set) = snap.sets.get(&name) else {
                                    continue;
                                };
                                let held = held_sets.get(&name).copied();
                                if held == Some(set.revision)
                                    || sets_sent.iter().any(|(sent, _)| *sent == name)
                                {
                                    continue;
                                }
                                // The set's write is what this push brings, when it is the newer.
                                committed_at = committed_at.max(Some(set.time));
                                response.origin_sets.push(set.content_for(&name, held));
                                sets_sent.push((name, set.revision));
                            }
                            response.upserts.push(v1::Policy::clone(p));
                        }
                        None if !needs_snapshot => response.removals.push(service.clone()),
                        None => {}
                    }
                    entries.push((service.clone(), want));
                }
                if needs_snapshot || !entries.is_empty() {
                    // A snapshot loaded mid-change can hold policies newer than its revision;
                    // a response brings at least the newest revision it carries.
                    let brings = entries.iter().map(|(_, r)| *r).max().unwrap_or(0);
                    response.revision = response.revision.max(brings);
                    nonce += 1;
                    response.nonce = nonce.to_string();
                    in_flight = Some(InFlight {
                        nonce: response.nonce.clone(),
                        revision: response.revision,
                        entries,
                        sets: sets_sent,
                        committed_at,
                        sent: tokio::time::Instant::now(),
                    });
                    needs_snapshot = false;
                    record.last_sent_revision = response.revision;
                    record.state = SidecarState::Pending.as_str().to_owned();
                    self.fleet.update(record.clone());
                    self.metrics.pushes.inc();
                    if tx.send(Ok(Box::new(response))).await.is_err() {
                        break None;
                    }
                } else if record.state == SidecarState::Pending.as_str() {
                    // Resumed holding everything current: no payload, already in sync.
                    record.last_sent_revision = record.last_sent_revision.max(snap.revision);
                    record.last_acked_revision = record.last_acked_revision.max(snap.revision);
                    record.state = SidecarState::Synced.as_str().to_owned();
                    self.fleet.update(record.clone());
                }
            }
            let ack_deadline = in_flight.as_ref().map(|f| f.sent + self.config.ack_timeout);
            tokio::select! {
                _ = async { revoked.as_mut().expect("guarded").changed().await }, if token_id.is_some() && revoked.is_some() => {
                    if let Some(status) = self.token_refusal(token_id.as_deref()).await {
                        break Some(status);
                    }
                }
                _ = recheck.tick(), if token_id.is_some() => {
                    if let Some(status) = self.token_refusal(token_id.as_deref()).await {
                        break Some(status);
                    }
                }
                changed = snapshots.changed(), if in_flight.is_none() => {
                    if changed.is_err() {
                        break Some(shutting_down());
                    }
                }
                message = inbound.message() => {
                    let message = match message {
                        Ok(Some(m)) => m,
                        Ok(None) => break None,
                        Err(status) => {
                            tracing::debug!(%status, "stream error");
                            break None;
                        }
                    };
                    record.last_seen = now_micros();
                    match message.kind {
                        Some(Kind::Ack(ack)) => match in_flight.take_if(|f| f.nonce == ack.nonce) {
                            Some(done) => {
                                held_sets.extend(done.sets);
                                for (service, revision) in done.entries {
                                    nacked.remove(&service);
                                    if revision == 0 {
                                        known.remove(&service);
                                    } else {
                                        known.insert(service, revision);
                                    }
                                }
                                record.last_acked_revision = done.revision;
                                record.state = SidecarState::Synced.as_str().to_owned();
                                record.nack_error.clear();
                                self.fleet.update(record.clone());
                                self.metrics.acks.inc();
                                if let Some(at) = done.committed_at {
                                    self.metrics.observe_convergence(now_micros() - at);
                                }
                            }
                            None => tracing::debug!(nonce = %ack.nonce, "ACK for a response not in flight"),
                        },
                        Some(Kind::Nack(nack)) => match in_flight.take_if(|f| f.nonce == nack.nonce) {
                            Some(done) => {
                                tracing::warn!(error = %nack.error, revision = done.revision, "sidecar refused a push");
                                for (service, revision) in done.entries {
                                    nacked.insert(service, revision);
                                }
                                record.state = SidecarState::Nacked.as_str().to_owned();
                                record.nack_error = nack.error;
                                self.fleet.update(record.clone());
                                self.metrics.nacks.inc();
                            }
                            None => tracing::debug!(nonce = %nack.nonce, "NACK for a response not in flight"),
                        },
                        Some(Kind::Hello(_)) => break Some(status(Code::InvalidArgument, "HELLO_REPEATED", "Hello may only be sent first", [])),
                        None => {}
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline.unwrap_or_else(tokio::time::Instant::now)), if ack_deadline.is_some() => {
                    tracing::warn!(timeout = ?self.config.ack_timeout, "no ACK in time; resetting the stream");
                    break Some(status(Code::DeadlineExceeded, "ACK_TIMEOUT", "no ACK within the timeout; reconnect", []));
                }
                _ = tokio::time::sleep_until(age_deadline) => {
                    break Some(status(Code::Unavailable, "MAX_CONNECTION_AGE", "maximum connection age reached; reconnect", []));
                }
                () = crate::service::stopped(&mut shutdown) => break Some(shutting_down()),
                () = tx.closed() => break None,
            }
        };
        if let Some(status) = end {
            let _ = tx.try_send(Err(Box::new(status)));
        }
        let now = now_micros();
        record.state = SidecarState::Disconnected.as_str().to_owned();
        record.disconnected_at = Some(now);
        self.fleet.update(record);
        self.metrics.connected.dec();
        tracing::info!("sidecar disconnected");
    }
}

/// The revision at which a policy's effective form last changed: its own, or a referenced
/// set's when that is newer.
fn effective_revision(policy: &v1::Policy) -> i64 {
    policy.effective_revision.max(policy.revision)
}

/// A number in [0, 1) that differs between streams.
fn jitter() -> f64 {
    f64::from(uuid::Uuid::new_v4().as_u128() as u32) / f64::from(u32::MAX)
}
