//! `corsair-control-plane`: parse flags, open the store, serve until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use corsair_control_plane::auth::{AuthMode, WriteRate};
use corsair_control_plane::server::{self, Config};
use corsair_control_plane::service::PageLimits;
use corsair_control_plane::service::discovery::StreamConfig;
use corsair_control_plane::store;
use corsair_control_plane::tls::TlsFiles;

/// The longest any of the durations may be: longer ones would overflow the clock.
const A_YEAR_SECS: u64 = 365 * 86_400;

/// Corsair control plane: stores CORS policies and serves the corsair.v1 gRPC API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address of the gRPC listener.
    #[arg(long, env = "CORSAIR_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Database: sqlite://PATH (created if missing) or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "CORSAIR_DATABASE_URL",
        default_value = "sqlite://corsair.db"
    )]
    database_url: String,
    /// Log format.
    #[arg(long, env = "CORSAIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How callers authenticate: `tokens` (bearer tokens managed with TokenService) or
    /// `none` (every caller is --identity with every role; loopback only unless --insecure).
    #[arg(long, env = "CORSAIR_AUTH", value_enum, default_value_t = AuthArg::Tokens)]
    auth: AuthArg,
    /// With --auth none: the actor recorded for every change.
    #[arg(long, env = "CORSAIR_IDENTITY", default_value = "local")]
    identity: String,
    /// Writes (policy and token changes) one identity may make per second, with bursts of
    /// twice as many; beyond, RESOURCE_EXHAUSTED. 0 turns the limit off.
    #[arg(long, env = "CORSAIR_MAX_WRITES_PER_SEC", default_value_t = 20)]
    max_writes_per_sec: u32,
    /// PEM certificate chain for TLS on the gRPC listener (with --tls-key); reloaded when the
    /// file changes.
    #[arg(long, env = "CORSAIR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert; reloaded when the file changes.
    #[arg(long, env = "CORSAIR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// PEM CA bundle to verify client certificates against (mTLS); clients without one may
    /// still present a token.
    #[arg(long, env = "CORSAIR_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// SPIFFE trust domain: a verified client certificate whose only URI SAN is
    /// spiffe://<domain>/corsair/sidecar/<service> is a sidecar of that service.
    #[arg(long, env = "CORSAIR_TRUST_DOMAIN", requires = "tls_client_ca")]
    trust_domain: Option<String>,
    /// Seconds between HTTP/2 keepalive pings to clients; a client silent for as long again
    /// is dropped (its sidecar row turns DISCONNECTED).
    #[arg(long, env = "CORSAIR_KEEPALIVE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    keepalive_secs: u64,
    /// Connections served at once; beyond, new ones wait in the kernel's backlog.
    #[arg(long, env = "CORSAIR_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Seconds a new connection may stay silent (and, with TLS, as long again to finish its
    /// handshake) before it is closed.
    #[arg(long, env = "CORSAIR_FIRST_BYTE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    first_byte_timeout_secs: u64,
    /// Allow --auth none on a non-loopback address (logged as a warning at start).
    #[arg(long, env = "CORSAIR_INSECURE")]
    insecure: bool,
    /// Largest request message, in bytes: at least 1 KiB (less would refuse every write), at
    /// most what gRPC's length prefix can state.
    #[arg(long, env = "CORSAIR_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=u64::from(u32::MAX)))]
    max_message_bytes: u64,
    /// Deadline for each call, in seconds.
    #[arg(long, env = "CORSAIR_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    request_timeout_secs: u64,
    /// Seconds shutdown waits for in-flight calls before it closes connections anyway.
    #[arg(long, env = "CORSAIR_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(..=A_YEAR_SECS))]
    shutdown_timeout_secs: u64,
    /// Address of the Prometheus `/metrics` listener; off when unset.
    #[arg(long, env = "CORSAIR_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// This replica's id in fleet status (default: a random one per start).
    #[arg(long, env = "CORSAIR_REPLICA_ID")]
    replica_id: Option<String>,
    /// Seconds a sidecar has to acknowledge a push before its stream is reset.
    #[arg(long, env = "CORSAIR_ACK_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    ack_timeout_secs: u64,
    /// Maximum age of a sidecar stream in seconds (shortened by up to 10% at random), after
    /// which the sidecar reconnects, possibly to another replica.
    #[arg(long, env = "CORSAIR_MAX_CONNECTION_AGE_SECS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    max_connection_age_secs: u64,
    /// New sidecar streams admitted per second; beyond, RESOURCE_EXHAUSTED and the sidecars
    /// back off.
    #[arg(long, env = "CORSAIR_MAX_NEW_STREAMS_PER_SEC", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    max_new_streams_per_sec: u32,
    /// Discovery streams one sidecar credential may hold open at once (each a sidecar id).
    #[arg(long, env = "CORSAIR_MAX_SIDECARS_PER_IDENTITY", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_sidecars_per_identity: u32,
    /// Seconds disconnected sidecars stay in fleet status.
    #[arg(long, env = "CORSAIR_FLEET_RETENTION_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    fleet_retention_secs: u64,
    /// Seconds between checks of the store for changes a lost notification would hide.
    #[arg(long, env = "CORSAIR_ANTI_ENTROPY_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    anti_entropy_secs: u64,
    /// Largest page a listing returns.
    #[arg(long, env = "CORSAIR_MAX_PAGE_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_page_size: u32,
    /// Bytes a listing's page holds at most (about); a page always holds at least one item.
    #[arg(long, env = "CORSAIR_MAX_PAGE_BYTES", default_value_t = 3 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(64 * 1024..=32 * 1024 * 1024))]
    max_page_bytes: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AuthArg {
    Tokens,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version print as usual; a bad flag is one line naming it.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // The first paragraph of clap's message, on one line.
            let text = e.to_string();
            let paragraph: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!(
                "corsair-control-plane: {}",
                paragraph.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }

    let store = match store::connect(&args.database_url).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("corsair-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "corsair-control-plane: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let auth = match args.auth {
        AuthArg::Tokens => {
            // Trimmed (a mounted secret often ends in a newline), as clients' tokens are.
            let given = std::env::var("CORSAIR_BOOTSTRAP_TOKEN")
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty());
            if given
                .as_ref()
                .is_some_and(|t| t.len() < 32 || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                eprintln!(
                    "corsair-control-plane: CORSAIR_BOOTSTRAP_TOKEN must be at least 32 printable characters without spaces"
                );
                return ExitCode::FAILURE;
            }
            match corsair_control_plane::service::token::bootstrap(&store, given.as_deref()).await {
                Ok(Some(token)) => {
                    // Shown once, on the terminal only: never logged.
                    eprintln!(
                        "corsair-control-plane: first start: created the admin token below. It is shown only \
                         now; store it (e.g. export CORSAIR_TOKEN=...) and create narrower tokens with \
                         `corsairctl token create`.\n{token}"
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("corsair-control-plane: cannot create the first admin token: {e}");
                    return ExitCode::FAILURE;
                }
            }
            AuthMode::Tokens
        }
        AuthArg::None => {
            if !args.listen.ip().is_loopback() {
                if !args.insecure {
                    eprintln!(
                        "corsair-control-plane: refusing to serve {} without authentication: use --auth tokens, \
                         or --insecure to accept anyone on the network as an admin",
                        args.listen
                    );
                    return ExitCode::FAILURE;
                }
                tracing::warn!(address = %args.listen, "INSECURE: serving without authentication on a non-loopback address; anyone who can reach it is an admin");
            }
            AuthMode::Disabled {
                identity: args.identity,
            }
        }
    };
    if !args.listen.ip().is_loopback() && args.tls_cert.is_none() {
        tracing::warn!(address = %args.listen, "serving without TLS on a non-loopback address: credentials travel in clear text");
    }
    let config = Config {
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
            reload_interval: Duration::from_secs(2),
        }),
        trust_domain: args.trust_domain,
        keepalive: Duration::from_secs(args.keepalive_secs),
        connections: corsair_control_plane::listener::ConnectionLimits {
            max_connections: within_descriptors(args.max_connections as usize),
            first_byte: Duration::from_secs(args.first_byte_timeout_secs),
        },
        auth,
        write_rate: (args.max_writes_per_sec > 0).then(|| WriteRate {
            per_sec: f64::from(args.max_writes_per_sec),
            burst: args.max_writes_per_sec.saturating_mul(2),
        }),
        max_message_bytes: usize::try_from(args.max_message_bytes).unwrap_or(usize::MAX),
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        pages: PageLimits {
            default: 50.min(args.max_page_size),
            max: args.max_page_size,
            bytes: usize::try_from(args.max_page_bytes).unwrap_or(usize::MAX),
        },
        drain_timeout: Duration::from_secs(args.shutdown_timeout_secs),
        streams: StreamConfig {
            ack_timeout: Duration::from_secs(args.ack_timeout_secs),
            max_connection_age: Duration::from_secs(args.max_connection_age_secs),
            max_new_streams_per_sec: args.max_new_streams_per_sec,
            max_streams_per_identity: args.max_sidecars_per_identity as usize,
            ..StreamConfig::default()
        },
        fleet_retention: Duration::from_secs(args.fleet_retention_secs),
        anti_entropy: Duration::from_secs(args.anti_entropy_secs),
        ..Config::default()
    };
    let config = match args.replica_id {
        Some(replica_id) => Config {
            replica_id,
            ..config
        },
        None => config,
    };
    let metrics_listener = match args.metrics_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("corsair-control-plane: cannot listen on {addr} for metrics: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match server::serve_with_metrics(listener, metrics_listener, store, config, shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corsair-control-plane: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// File descriptors kept free of connections: the database pool, files, the metrics listener.
const RESERVED_DESCRIPTORS: usize = 64;

/// `max_connections`, lowered to what the process's file-descriptor limit leaves after
/// [`RESERVED_DESCRIPTORS`], so that connections wait in the backlog at the cap instead of
/// running the process out of descriptors.
fn within_descriptors(max_connections: usize) -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(usize::MAX);
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    if room < max_connections {
        tracing::warn!(
            max_connections,
            descriptors = limit,
            serving = room,
            "--max-connections lowered to fit the file-descriptor limit (ulimit -n)"
        );
    }
    max_connections.min(room)
}
