//! The gRPC server: the corsair.v1 services, `grpc.health.v1.Health` and server reflection
//! on one listener, with message-size and page-size limits, a span per RPC, and graceful
//! shutdown (health goes `NOT_SERVING` first, streams end, in-flight calls finish).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use corsair_proto::v1::audit_service_server::AuditServiceServer;
use corsair_proto::v1::discovery_service_server::DiscoveryServiceServer;
use corsair_proto::v1::fleet_service_server::FleetServiceServer;
use corsair_proto::v1::origin_set_service_server::OriginSetServiceServer;
use corsair_proto::v1::policy_service_server::PolicyServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use crate::auth::{AuthLayer, AuthMode, WriteRate};
use crate::listener::{Conn, ConnectionLimits};
use crate::metrics::Metrics;
use crate::page_token::PageTokens;
use crate::service::audit::Audit;
use crate::service::discovery::{Discovery, StreamConfig};
use crate::service::fleet::{Fleet, FleetApi};
use crate::service::origin_set::OriginSets;
use crate::service::policy::Policies;
use crate::service::token::Tokens;
use crate::service::{PageLimits, Shared};
use crate::store::{Store, StoreError};
use crate::tls::TlsFiles;
use corsair_proto::v1::token_service_server::TokenServiceServer;

/// How the server behaves; the binary fills it from flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// How callers are authenticated. The default, [`AuthMode::Disabled`], is for
    /// in-process use; the binary authenticates with tokens unless told otherwise.
    pub auth: AuthMode,
    /// TLS for the listener; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// With client certificates: the SPIFFE trust domain whose
    /// `spiffe://<domain>/corsair/sidecar/<service>` URI SANs identify sidecars.
    pub trust_domain: Option<String>,
    /// How fast each identity may write; unlimited when `None`.
    pub write_rate: Option<WriteRate>,
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Deadline for every unary call.
    pub request_timeout: Duration,
    /// Listing page sizes.
    pub pages: PageLimits,
    /// How long shutdown waits for in-flight calls and open connections before it stops
    /// anyway.
    pub drain_timeout: Duration,
    /// This replica's id in fleet status.
    pub replica_id: String,
    /// Discovery stream behaviour.
    pub streams: StreamConfig,
    /// How often the policy cache re-reads the store even without a nudge.
    pub anti_entropy: Duration,
    /// How often fleet status is written.
    pub fleet_flush: Duration,
    /// How long disconnected sidecars stay listed.
    pub fleet_retention: Duration,
    /// HTTP/2 keepalive ping interval (a peer silent for as long again is dropped).
    pub keepalive: Duration,
    /// Connections at once, and how long a silent one lives.
    pub connections: ConnectionLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auth: AuthMode::Disabled {
                identity: "local".into(),
            },
            write_rate: None,
            tls: None,
            trust_domain: None,
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            pages: PageLimits::default(),
            drain_timeout: Duration::from_secs(10),
            replica_id: format!("cp-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            streams: StreamConfig::default(),
            anti_entropy: Duration::from_secs(5),
            fleet_flush: Duration::from_millis(500),
            fleet_retention: Duration::from_secs(3600),
            keepalive: Duration::from_secs(20),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be read at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// TLS could not be set up.
    #[error("{0}")]
    Tls(String),
    /// Reflection could not be built.
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// The page tokens of every replica on `store`, signed with the key they share.
async fn page_tokens(store: &dyn Store) -> Result<PageTokens, StoreError> {
    let mut candidate = [0u8; 32];
    getrandom::fill(&mut candidate).map_err(|_| StoreError::Unavailable)?;
    let stored = store
        .secret(crate::page_token::KEY_NAME, &candidate)
        .await?;
    let key: [u8; 32] = stored.try_into().map_err(|_| {
        StoreError::Corrupt("the page token key in the secrets table is not 32 bytes".into())
    })?;
    Ok(PageTokens::new(key))
}

/// Accepted connections, plain or TLS.
enum Incoming {
    Plain(ReceiverStream<std::io::Result<Conn<tokio::net::TcpStream>>>),
    Tls(
        ReceiverStream<
            std::io::Result<Conn<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
        >,
    ),
}

/// Serves the control plane on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with_metrics(listener, None, store, config, shutdown).await
}

/// [`serve`], plus Prometheus metrics on `metrics_listener`.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    store: Arc<dyn Store>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let head = store.head().await?;
    let page_tokens = page_tokens(store.as_ref()).await?;
    let (audit_head, _) = watch::channel(head.last_sequence);
    let (revisions, local_revisions) = watch::channel(head.revision);
    let (stop, stopped) = watch::channel(false);
    let mut draining = stopped.clone();
    let stopped_tls = stopped.clone();
    let tasks = tokio_util::task::TaskTracker::new();
    let snapshots = crate::cache::start(
        store.clone(),
        local_revisions,
        config.anti_entropy,
        stopped.clone(),
        &tasks,
    )
    .await?;
    let metrics = Arc::new(Metrics::default());
    if let Some(listener) = metrics_listener {
        let mut stop_metrics = stopped.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            async move {
                let _ = stop_metrics.wait_for(|s| *s).await;
            },
        ));
    }
    let fleet = Arc::new(Fleet::new(store.clone(), config.replica_id.clone()));
    let fleet_final = fleet.clone();
    fleet.spawn_flusher(
        config.fleet_flush,
        config.fleet_retention,
        stopped.clone(),
        &tasks,
    );
    let shared = Shared {
        store,
        identity: match &config.auth {
            AuthMode::Disabled { identity } => identity.clone(),
            AuthMode::Tokens => "anonymous".into(),
        },
        audit_head,
        revisions,
        shutdown: stopped.clone(),
        pages: config.pages,
        tasks: tasks.clone(),
        refusals: Arc::default(),
        page_tokens: page_tokens.clone(),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PolicyServiceServer<Policies>>().await;
    health
        .set_serving::<OriginSetServiceServer<OriginSets>>()
        .await;
    health.set_serving::<AuditServiceServer<Audit>>().await;
    health
        .set_serving::<DiscoveryServiceServer<Discovery>>()
        .await;
    health.set_serving::<FleetServiceServer<FleetApi>>().await;
    health.set_serving::<TokenServiceServer<Tokens>>().await;

    // Reflection v1, and v1alpha for the clients that know only it (grpcio-reflection,
    // older grpcurl and Postman).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(corsair_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let limit = config.max_message_bytes;
    let policies = PolicyServiceServer::new(Policies::new(shared.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let origin_sets = OriginSetServiceServer::new(OriginSets::new(shared.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let audit =
        AuditServiceServer::new(Audit::new(shared.clone())).max_decoding_message_size(limit);
    let (revoked, revocations) = watch::channel(0u64);
    let tokens = TokenServiceServer::new(Tokens::new(shared.clone(), revoked))
        .max_decoding_message_size(limit);
    let discovery = DiscoveryServiceServer::new(
        Discovery::new(
            snapshots,
            fleet.clone(),
            metrics,
            config.streams.clone(),
            stopped,
            tasks.clone(),
        )
        .guarded(shared.clone(), revocations, config.anti_entropy),
    )
    .max_decoding_message_size(limit);
    let fleet_api = FleetServiceServer::new(FleetApi::new(fleet, config.pages, page_tokens))
        .max_decoding_message_size(limit);

    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
        health
            .set_not_serving::<PolicyServiceServer<Policies>>()
            .await;
        health
            .set_not_serving::<OriginSetServiceServer<OriginSets>>()
            .await;
        health.set_not_serving::<AuditServiceServer<Audit>>().await;
        health
            .set_not_serving::<DiscoveryServiceServer<Discovery>>()
            .await;
        health
            .set_not_serving::<FleetServiceServer<FleetApi>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = stop.send(true);
    };

    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let incoming = match &config.tls {
        None => Incoming::Plain(crate::listener::accept(
            listener,
            config.connections,
            stopped_tls,
            |stream| async move { Some(stream) },
        )),
        Some(files) => Incoming::Tls(
            crate::tls::incoming(listener, files, config.connections, stopped_tls)
                .map_err(|e| ServeError::Tls(e.to_string()))?,
        ),
    };
    tracing::info!(
        address,
        tls = config.tls.is_some(),
        "control plane listening"
    );
    let router = Server::builder()
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .trace_fn(|request| tracing::info_span!("rpc", method = %request.uri().path()))
        .layer(
            AuthLayer::new(shared.clone(), config.auth.clone(), config.write_rate)
                .with_trust_domain(config.trust_domain.clone()),
        )
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(policies)
        .add_service(origin_sets)
        .add_service(audit)
        .add_service(discovery)
        .add_service(fleet_api)
        .add_service(tokens);
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match incoming {
        Incoming::Plain(stream) => Box::pin(router.serve_with_incoming_shutdown(stream, signal)),
        Incoming::Tls(stream) => Box::pin(router.serve_with_incoming_shutdown(stream, signal)),
    };
    // Graceful shutdown waits for every connection to close; a client that never closes its
    // connection must not keep the process alive past the drain deadline.
    let deadline = async {
        let _ = draining.wait_for(|stop| *stop).await;
        tokio::time::sleep(config.drain_timeout).await;
    };
    tokio::select! {
        result = server => result?,
        () = deadline => tracing::warn!(timeout = ?config.drain_timeout, "drain deadline passed; closing remaining connections"),
    }
    // Streams and tails end on the shutdown signal; wait for them (within the drain
    // deadline), then write the fleet's final state, so nothing outlives `serve`.
    tasks.close();
    if tokio::time::timeout(config.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks still running at the drain deadline");
    }
    if let Err(error) = fleet_final.flush().await {
        tracing::warn!(%error, "final fleet status not saved");
    }
    tracing::info!("stopped");
    Ok(())
}
