//! The sync client: keeps a [`PolicySet`] current from the control plane's
//! `DiscoveryService`, as one reusable component.
//!
//! It opens a stream saying who it is and which revision of each policy it already holds (so
//! a reconnect that missed nothing carries no payload), applies each response (ACK) or refuses
//! it (NACK, keeping the last good policies), and on any error reconnects with exponential
//! backoff and full jitter. [`is_fatal`] is the one place that decides which status codes
//! stop it. While it is disconnected the last good policies keep serving.
//!
//! Given several control-plane replicas, it starts on one chosen by its sidecar id (so a fleet
//! spreads over them), and when a stream ends or cannot open it moves straight to the next
//! replica; it backs off only after every replica has failed in a row.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use corsair_proto::v1::discovery_request::Kind;
use corsair_proto::v1::{self, discovery_service_client::DiscoveryServiceClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::policies::PolicySet;

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
/// `[0, min(max, initial × multiplier^n))`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first ceiling.
    pub initial: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// The largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    /// The gRPC connection-backoff defaults: 1 s, ×1.6, at most 120 s.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            multiplier: 1.6,
            max: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    /// The wait before attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .mul_f64(self.multiplier.powi(attempt.min(64) as i32))
            .min(self.max);
        ceiling.mul_f64(random_unit())
    }
}

/// Where a sidecar starts among `replicas`: a stable hash (FNV-1a) of its id, so that a fleet
/// spreads over the replicas and each sidecar comes back to the same one after a restart.
pub fn first_replica(sidecar_id: &str, replicas: usize) -> usize {
    let hash = sidecar_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % replicas.max(1) as u64) as usize
}

/// A number in [0, 1).
fn random_unit() -> f64 {
    f64::from(uuid::Uuid::new_v4().as_u128() as u32) / (f64::from(u32::MAX) + 1.0)
}

/// Whether a stream error means retrying cannot help (a misconfigured sidecar or server).
pub fn is_fatal(code: Code) -> bool {
    matches!(code, Code::InvalidArgument | Code::Unimplemented)
}

/// Who the sidecar is.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Stable id, shown in fleet status.
    pub sidecar_id: String,
    /// The services it serves (empty: every service).
    pub services: Vec<String>,
    /// Its version.
    pub version: String,
    /// Its host.
    pub host: String,
    /// Reconnect pacing.
    pub backoff: Backoff,
}

/// What the sync client is doing, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    /// Not connected yet, or reconnecting after `error`.
    Connecting {
        /// The last error, if any.
        error: Option<String>,
    },
    /// Connected; `revision` is the global revision of the last update applied.
    Connected {
        /// The last applied revision (0: none yet).
        revision: i64,
    },
    /// A response was refused (the last good policies stay).
    Nacked {
        /// The revision refused.
        revision: i64,
        /// Why.
        error: String,
    },
}

/// A stream ended for good.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy sync stopped: {0}")]
pub struct Fatal(pub Status);

/// One control-plane replica: its address (for logs) and the channel to it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Where it is, as configured.
    pub address: String,
    /// The (lazy) channel to it.
    pub channel: Channel,
}

/// The sync client.
#[derive(Debug)]
pub struct SyncClient {
    replicas: Vec<Replica>,
    config: SyncConfig,
    set: Arc<PolicySet>,
    state: watch::Sender<SyncState>,
    cache_file: Option<std::path::PathBuf>,
    /// `Bearer <token>`, marked sensitive so that `Debug` never shows it.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// A token that cannot be sent as a header value.
#[derive(Debug, thiserror::Error)]
#[error("the token has characters that cannot be sent in a header")]
pub struct BadToken;

impl SyncClient {
    /// A client that keeps `set` current over `channel` (which may be shared).
    pub fn new(channel: Channel, config: SyncConfig, set: Arc<PolicySet>) -> Self {
        Self::with_replicas(
            vec![Replica {
                address: "control plane".into(),
                channel,
            }],
            config,
            set,
        )
    }

    /// A client that follows whichever of `replicas` (not empty) answers, failing over
    /// between them.
    pub fn with_replicas(replicas: Vec<Replica>, config: SyncConfig, set: Arc<PolicySet>) -> Self {
        assert!(!replicas.is_empty(), "a sync client needs a control plane");
        let (state, _) = watch::channel(SyncState::Connecting { error: None });
        SyncClient {
            replicas,
            config,
            set,
            state,
            cache_file: None,
            authorization: None,
        }
    }

    /// Presents `token` to the control plane on every stream.
    pub fn with_token(mut self, token: &str) -> Result<Self, BadToken> {
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}").parse().map_err(|_| BadToken)?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// Writes every applied set to `path` (atomically) before acknowledging it.
    pub fn with_cache_file(mut self, path: std::path::PathBuf) -> Self {
        self.cache_file = Some(path);
        self
    }

    /// Follows the client's state.
    pub fn state(&self) -> watch::Receiver<SyncState> {
        self.state.subscribe()
    }

    /// Runs until `shutdown` resolves (`Ok`) or a fatal status (`Err`).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Fatal> {
        tokio::pin!(shutdown);
        let replicas = self.replicas.len() as u32;
        let mut current = first_replica(&self.config.sidecar_id, self.replicas.len());
        // Sessions failed in a row since the last stream that opened.
        let mut attempt = 0u32;
        loop {
            let result = tokio::select! {
                r = self.session(&self.replicas[current], &mut attempt) => r,
                () = &mut shutdown => return Ok(()),
            };
            let error = match result {
                Ok(()) => Status::unavailable("the control plane closed the stream"),
                Err(status) if is_fatal(status.code()) => {
                    tracing::error!(%status, "policy sync stopped");
                    return Err(Fatal(status));
                }
                Err(status) => status,
            };
            // Refused credentials do not fix themselves soon: wait as long as the backoff
            // allows rather than knocking (and being audited) twice a second.
            if matches!(error.code(), Code::PermissionDenied | Code::Unauthenticated) {
                tracing::warn!(code = ?error.code(), message = error.message(), "the control plane refused this sidecar's credentials");
                attempt = attempt.max(16 * replicas + replicas - 1);
            }
            // The next replica at once, until every one has failed in a row; then back off.
            let delay = if (attempt + 1).is_multiple_of(replicas) {
                self.config.backoff.delay(attempt / replicas)
            } else {
                Duration::ZERO
            };
            attempt = attempt.saturating_add(1);
            current = (current + 1) % self.replicas.len();
            tracing::info!(code = ?error.code(), message = error.message(), ?delay, next = %self.replicas[current].address, "policy stream ended; reconnecting");
            self.state.send_replace(SyncState::Connecting {
                error: Some(format!("{:?}: {}", error.code(), error.message())),
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return Ok(()),
            }
        }
    }

    /// One stream to `replica`, from hello to its end.
    async fn session(&self, replica: &Replica, attempt: &mut u32) -> Result<(), Status> {
        let (tx, rx) = mpsc::channel(8);
        self.set.prune_sets();
        let hello = v1::Hello {
            sidecar_id: self.config.sidecar_id.clone(),
            services: self.config.services.clone(),
            version: self.config.version.clone(),
            host: self.config.host.clone(),
            known_revisions: self.set.known_revisions(),
            known_origin_sets: self.set.known_origin_sets(),
        };
        let send = |kind| v1::DiscoveryRequest { kind: Some(kind) };
        tx.send(send(Kind::Hello(hello)))
            .await
            .expect("the receiver is alive");
        let mut client = DiscoveryServiceClient::new(replica.channel.clone());
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        let mut inbound = client.stream_policies(request).await?.into_inner();
        *attempt = 0;
        tracing::info!(control_plane = %replica.address, "policy stream open");
        self.state.send_replace(SyncState::Connected {
            revision: self.set.load().revision,
        });
        while let Some(response) = inbound.message().await? {
            let reply = match self.set.apply(&response) {
                Ok(applied) => {
                    if let Some(path) = self.cache_file.clone() {
                        let snapshot = self.set.to_snapshot();
                        let saved = tokio::task::spawn_blocking(move || {
                            crate::cache_file::save(&path, &snapshot)
                        })
                        .await;
                        match saved {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => tracing::warn!(%error, "cache file not written"),
                            Err(error) => tracing::warn!(%error, "cache file writer failed"),
                        }
                    }
                    tracing::debug!(
                        revision = applied.revision,
                        upserts = response.upserts.len(),
                        removals = response.removals.len(),
                        "policies applied"
                    );
                    self.state.send_replace(SyncState::Connected {
                        revision: applied.revision,
                    });
                    Kind::Ack(v1::Ack {
                        nonce: response.nonce,
                        revision: response.revision,
                    })
                }
                Err(error) => {
                    tracing::warn!(%error, revision = response.revision, "policy update refused; keeping the last good policies");
                    self.state.send_replace(SyncState::Nacked {
                        revision: response.revision,
                        error: error.to_string(),
                    });
                    Kind::Nack(v1::Nack {
                        nonce: response.nonce,
                        revision: response.revision,
                        error: error.to_string(),
                    })
                }
            };
            if tx.send(send(reply)).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let b = Backoff::default();
        for attempt in 0..30 {
            let d = b.delay(attempt);
            let ceiling = Duration::from_secs(1)
                .mul_f64(1.6f64.powi(attempt as i32))
                .min(b.max);
            assert!(d < ceiling, "attempt {attempt}: {d:?} >= {ceiling:?}");
        }
        assert!(b.delay(100) <= Duration::from_secs(120));
    }

    #[test]
    fn a_fleet_spreads_over_replicas_and_each_sidecar_keeps_its_first() {
        assert_eq!(first_replica("anything", 1), 0);
        let mut per_replica = [0usize; 3];
        for i in 0..300 {
            let id = format!("shop-{i}");
            let first = first_replica(&id, 3);
            assert_eq!(first, first_replica(&id, 3), "stable");
            per_replica[first] += 1;
        }
        assert!(per_replica.iter().all(|&n| n > 50), "{per_replica:?}");
    }

    #[test]
    fn only_configuration_errors_are_fatal() {
        assert!(is_fatal(Code::InvalidArgument));
        assert!(is_fatal(Code::Unimplemented));
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Aborted,
        ] {
            assert!(!is_fatal(code), "{code:?}");
        }
    }
}
