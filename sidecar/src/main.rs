//! `corsair-sidecar`: serve from the cache file at once, follow the control plane, proxy to
//! the upstream, stop cleanly on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, ValueEnum};
use corsair_policy::Scheme;
use corsair_sidecar::admin::{self, AdminState};
use corsair_sidecar::cache_file;
use corsair_sidecar::metrics::Observer;
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::proxy::{self, NoPolicy, ProxyConfig};
use corsair_sidecar::sync::{Replica, SyncClient, SyncConfig};
use http::uri::Authority;
use tokio::sync::watch;

/// The longest any of the timeouts may be: longer ones would overflow the clock.
const A_YEAR_SECS: u64 = 365 * 86_400;

/// The largest HTTP/2 window (2^31 - 1), and stream count taken.
const MAX_WINDOW: i64 = (1 << 31) - 1;

/// The largest connection count taken.
const MAX_COUNT: u64 = 10_000_000;

/// Corsair sidecar: enforces a service's CORS policy in front of it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address clients reach the service on.
    #[arg(long, env = "CORSAIR_SIDECAR_LISTEN", default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// Address of the admin listener (/healthz, /readyz, /metrics, /policy).
    #[arg(
        long,
        env = "CORSAIR_SIDECAR_ADMIN_LISTEN",
        default_value = "127.0.0.1:7481"
    )]
    admin_listen: SocketAddr,
    /// The service's own address: host:port or http://host:port (plain HTTP; port 80 if none).
    #[arg(long, env = "CORSAIR_UPSTREAM", value_parser = corsair_sidecar::upstream::parse_address)]
    upstream: Authority,
    /// The service whose policy applies.
    #[arg(long, env = "CORSAIR_SERVICE")]
    service: String,
    /// The control plane's gRPC address, e.g. http://127.0.0.1:7400; for several replicas,
    /// their addresses separated by commas (the sidecar fails over between them).
    #[arg(long, env = "CORSAIR_CONTROL_PLANE", value_delimiter = ',')]
    control_plane: Vec<String>,
    /// A local policy file (JSON, the policy-file format) to enforce instead of following a
    /// control plane; edits apply within a second, invalid edits are logged and ignored.
    #[arg(long, env = "CORSAIR_POLICY_FILE", conflicts_with = "control_plane")]
    policy_file: Option<PathBuf>,
    /// Last-known-good cache file: served from at start, rewritten after every update.
    #[arg(long, env = "CORSAIR_CACHE_FILE")]
    cache_file: Option<PathBuf>,
    /// What to do with cross-origin requests while no policy is known.
    #[arg(long, env = "CORSAIR_NO_POLICY", value_enum, default_value_t = NoPolicyArg::Deny)]
    no_policy: NoPolicyArg,
    /// The scheme clients use to reach the service (behind a TLS terminator: https).
    #[arg(long, env = "CORSAIR_PUBLIC_SCHEME", value_enum, default_value_t = SchemeArg::Http)]
    public_scheme: SchemeArg,
    /// Seconds to connect to the upstream before answering 502.
    #[arg(long, env = "CORSAIR_CONNECT_TIMEOUT_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    connect_timeout_secs: u64,
    /// Seconds to wait for the upstream's response headers, once the request's body has been sent, before answering 504; also the longest pause allowed within a request's body (then 408).
    #[arg(long, env = "CORSAIR_RESPONSE_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    response_timeout_secs: u64,
    /// Seconds a client has to send a request's headers before its connection is closed
    /// (against slow-header attacks).
    #[arg(long, env = "CORSAIR_CLIENT_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    client_header_timeout_secs: u64,
    /// Milliseconds: an idle HTTP/1 client connection gives back its buffers at once, unless
    /// its last gap between requests was shorter than this; then once idle this long.
    #[arg(long, env = "CORSAIR_CLIENT_BUSY_GAP_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(..=A_YEAR_SECS * 1000))]
    client_busy_gap_ms: u64,
    /// Seconds an upgraded connection (WebSocket, …) may pass no byte either way before it is
    /// closed.
    #[arg(long, env = "CORSAIR_TUNNEL_IDLE_TIMEOUT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    tunnel_idle_timeout_secs: u64,
    /// Seconds an HTTP/2 client connection may have no stream open before it is shut down
    /// (GOAWAY).
    #[arg(long, env = "CORSAIR_HTTP2_IDLE_TIMEOUT_SECS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    http2_idle_timeout_secs: u64,
    /// Seconds of silence from an HTTP/2 client before it is sent a PING; one that does not
    /// answer within as long again is closed (0: no pings).
    #[arg(long, env = "CORSAIR_HTTP2_KEEPALIVE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=A_YEAR_SECS))]
    http2_keepalive_secs: u64,
    /// Streams one HTTP/2 client connection may have open at once; more are refused.
    #[arg(long, env = "CORSAIR_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_WINDOW))]
    http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window per stream, in bytes: how much of a request's body a client
    /// may send ahead.
    #[arg(long, env = "CORSAIR_HTTP2_STREAM_WINDOW_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=MAX_WINDOW))]
    http2_stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection, in bytes.
    #[arg(long, env = "CORSAIR_HTTP2_CONNECTION_WINDOW_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u32).range(65_535..=MAX_WINDOW))]
    http2_connection_window_bytes: u32,
    /// Client connections open at once (HTTP/1, HTTP/2 and upgraded); at the limit new
    /// connections wait in the listen backlog until one closes.
    #[arg(long, env = "CORSAIR_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    max_connections: u64,
    /// Idle upstream connections kept for reuse; beyond, a connection is closed when its
    /// response ends.
    #[arg(long, env = "CORSAIR_UPSTREAM_MAX_IDLE", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=MAX_COUNT))]
    upstream_max_idle: u64,
    /// Upstream connections open at once (idle, busy and upgraded); at the limit a request
    /// waits up to the connect timeout for one, then gets 503.
    #[arg(long, env = "CORSAIR_UPSTREAM_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    upstream_max_connections: u64,
    /// How many nice steps below the proxy's priority the background work runs: following the
    /// control plane, writing the cache file, watching the policy file (0: the same priority;
    /// the lowest Linux allows is 19).
    #[arg(long, env = "CORSAIR_BACKGROUND_NICE", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=19))]
    background_nice: u8,
    /// Log format.
    #[arg(long, env = "CORSAIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// PEM CA bundle to verify the control plane's certificate against (TLS; use an
    /// https:// --control-plane address).
    #[arg(long, env = "CORSAIR_CONTROL_PLANE_CA", requires = "control_plane")]
    control_plane_ca: Option<PathBuf>,
    /// PEM client certificate presented to the control plane (mTLS; with --client-key and
    /// --control-plane-ca). Its URI SAN names the sidecar's service.
    #[arg(long, env = "CORSAIR_CLIENT_CERT", requires_all = ["client_key", "control_plane_ca"])]
    client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "CORSAIR_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Seconds between HTTP/2 keepalive pings to the control plane; a control plane silent for
    /// as long again is taken as gone, and the sidecar reconnects.
    #[arg(long, env = "CORSAIR_KEEPALIVE_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=A_YEAR_SECS))]
    keepalive_secs: u64,
    /// Token presented to the control plane (a `sidecar` token for --service); prefer the
    /// environment variable, which `ps` does not show.
    #[arg(long, env = "CORSAIR_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    token: Option<Secret>,
    /// Stable id shown in fleet status (default: service and a random suffix).
    #[arg(long, env = "CORSAIR_SIDECAR_ID")]
    sidecar_id: Option<String>,
}

/// A credential: never printed, not even by `Debug`.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    if text.is_empty() {
        return Err("empty".into());
    }
    Ok(Secret(text.to_owned()))
}

/// The machine's host name for fleet status, as the kernel reports it (`uname`; `(none)` when
/// it was never set). Most shells do not export `HOSTNAME`, so it is only the fallback.
fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy();
    if !name.is_empty() && name != "(none)" {
        return name.into_owned();
    }
    std::env::var("HOSTNAME").unwrap_or_default()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum NoPolicyArg {
    Deny,
    Pass,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SchemeArg {
    Http,
    Https,
}

/// A lazy channel to the control-plane replica at `url`, with keepalive and, given a CA,
/// TLS; a bad address or TLS setting is reported here, as the exit code to end with.
fn control_plane_channel(args: &Args, url: &str) -> Result<tonic::transport::Channel, ExitCode> {
    let secs = std::time::Duration::from_secs(args.keepalive_secs);
    let endpoint = match tonic::transport::Endpoint::from_shared(url.to_owned()) {
        Ok(e) => e
            .http2_keep_alive_interval(secs)
            .keep_alive_timeout(secs)
            // A control plane that accepts connections but answers nothing (frozen) must
            // not hold a reconnect forever.
            .connect_timeout(secs)
            .keep_alive_while_idle(true),
        Err(e) => {
            eprintln!("corsair-sidecar: --control-plane {url:?}: {e}");
            return Err(ExitCode::from(2));
        }
    };
    let endpoint = match &args.control_plane_ca {
        None => endpoint,
        Some(_) if !url.starts_with("https://") => {
            eprintln!(
                "corsair-sidecar: --control-plane-ca needs an https:// --control-plane, not {url:?}"
            );
            return Err(ExitCode::from(2));
        }
        Some(ca) => {
            let identity = args.client_cert.as_deref().zip(args.client_key.as_deref());
            match corsair_proto::client_tls(ca, identity)
                .and_then(|tls| endpoint.tls_config(tls).map_err(|e| e.to_string()))
            {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    eprintln!("corsair-sidecar: TLS: {e}");
                    return Err(ExitCode::FAILURE);
                }
            }
        }
    };
    Ok(endpoint.connect_lazy())
}

/// Files the sidecar keeps open besides its connections, with room to spare: the runtimes'
/// event queues, the listeners, admin connections, the cache and policy files.
const FILES_OF_OUR_OWN: u64 = 64;

/// A count taken by a flag (at most [`MAX_COUNT`]) as a `usize`.
fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Raises the soft limit on open files to the hard one, as Go programs do at start: the low
/// soft limit many systems set (1,024) is kept for programs that use `select(2)`, which the
/// sidecar does not. Warns if the limit is still below `needed`, what the connection bounds
/// may take: accepts then fail, and back off, before the bounds are reached.
fn raise_open_file_limit(needed: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        limit.current = Some(hard);
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%error, soft, hard, "cannot raise the open-file limit");
        }
    }
    if let Some(soft) = getrlimit(Resource::Nofile).current
        && soft < needed
    {
        tracing::warn!(
            limit = soft,
            needed,
            "the open-file limit is below --max-connections plus --upstream-max-connections: accepts will fail, and back off, before those are reached"
        );
    }
}

fn main() -> ExitCode {
    // One worker: a current-thread runtime (no work-stealing overhead); otherwise one worker
    // per core, or `TOKIO_WORKER_THREADS`.
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => {
            eprintln!("corsair-sidecar: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
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
                "corsair-sidecar: {}",
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

    let policies = Arc::new(PolicySet::default());
    let source = Arc::new(Mutex::new("none"));
    if let Some(path) = &args.cache_file {
        match cache_file::load(path) {
            Ok(Some(snapshot)) => match policies.apply(&snapshot) {
                Ok(set) => {
                    *source.lock().expect("source lock") = "cache file";
                    tracing::info!(revision = set.revision, "serving from the cache file");
                }
                Err(error) => {
                    tracing::warn!(%error, "cache file holds an invalid policy; ignoring it")
                }
            },
            Ok(None) => tracing::info!(path = %path.display(), "no cache file yet"),
            Err(error) => tracing::warn!(%error, "ignoring the cache file"),
        }
    }
    let no_policy = match args.no_policy {
        NoPolicyArg::Deny => NoPolicy::Deny,
        NoPolicyArg::Pass => NoPolicy::PassThrough,
    };
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (listener, admin_listener) = match (bind(args.listen).await, bind(args.admin_listen).await)
    {
        (Ok(l), Ok(a)) => (l, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("corsair-sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "sidecar listening"
    );

    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let observer = Observer::default();
    let background = match corsair_sidecar::background::start(args.background_nice) {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("corsair-sidecar: cannot start the background thread: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut sync = None;
    if !args.control_plane.is_empty() {
        let mut replicas = Vec::new();
        for url in &args.control_plane {
            // Created there, the channel runs its connections on the background thread.
            let _there = background.handle().enter();
            match control_plane_channel(&args, url) {
                Ok(channel) => replicas.push(Replica {
                    address: url.clone(),
                    channel,
                }),
                Err(code) => return code,
            }
        }
        let config = SyncConfig {
            sidecar_id: args.sidecar_id.clone().unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    args.service,
                    &uuid::Uuid::new_v4().simple().to_string()[..8]
                )
            }),
            services: vec![args.service.clone()],
            version: env!("CARGO_PKG_VERSION").into(),
            host: host_name(),
            backoff: Default::default(),
        };
        let mut client = SyncClient::with_replicas(replicas, config, policies.clone());
        if let Some(Secret(token)) = &args.token {
            client = match client.with_token(token) {
                Ok(client) => client,
                Err(e) => {
                    eprintln!("corsair-sidecar: --token: {e}");
                    return ExitCode::FAILURE;
                }
            };
        }
        if let Some(path) = &args.cache_file {
            client = client.with_cache_file(path.clone());
        }
        let mut state = client.state();
        let marker = source.clone();
        background.handle().spawn(async move {
            while state.changed().await.is_ok() {
                if matches!(*state.borrow(), corsair_sidecar::sync::SyncState::Connected { revision } if revision > 0)
                {
                    *marker.lock().expect("source lock") = "control plane";
                }
            }
        });
        sync = Some(client.state());
        background
            .handle()
            .spawn(client.run(until_stopped(stopped.clone())));
    }

    let admin_state = AdminState {
        policies: policies.clone(),
        service: args.service.clone(),
        no_policy,
        source: source.clone(),
        metrics: observer.metrics.clone(),
        sync,
    };
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        until_stopped(stopped.clone()),
    ));

    if let Some(path) = args.policy_file.clone() {
        *source.lock().expect("source lock") = "policy file";
        background
            .handle()
            .spawn(corsair_sidecar::policy_file::watch(
                path,
                args.service.clone(),
                policies.clone(),
                corsair_sidecar::policy_file::DEFAULT_INTERVAL,
                until_stopped(stopped.clone()),
            ));
    }

    let limits = proxy::Limits {
        max_connections: count(args.max_connections),
        http2_max_concurrent_streams: args.http2_max_concurrent_streams,
        http2_stream_window: args.http2_stream_window_bytes,
        http2_connection_window: args.http2_connection_window_bytes,
        upstream_max_idle: count(args.upstream_max_idle),
        upstream_max_connections: count(args.upstream_max_connections),
    };
    raise_open_file_limit(args.max_connections + args.upstream_max_connections + FILES_OF_OUR_OWN);
    let config = ProxyConfig {
        upstream: args.upstream,
        service: args.service,
        public_scheme: match args.public_scheme {
            SchemeArg::Http => Scheme::Http,
            SchemeArg::Https => Scheme::Https,
        },
        no_policy,
        timeouts: proxy::Timeouts {
            connect: std::time::Duration::from_secs(args.connect_timeout_secs),
            response: std::time::Duration::from_secs(args.response_timeout_secs),
            client_headers: std::time::Duration::from_secs(args.client_header_timeout_secs),
            client_busy_gap: std::time::Duration::from_millis(args.client_busy_gap_ms),
            tunnel_idle: std::time::Duration::from_secs(args.tunnel_idle_timeout_secs),
            http2_idle: std::time::Duration::from_secs(args.http2_idle_timeout_secs),
            http2_keepalive: (args.http2_keepalive_secs > 0)
                .then(|| std::time::Duration::from_secs(args.http2_keepalive_secs)),
            ..proxy::Timeouts::default()
        },
        limits,
        observer,
    };
    let signal = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop.send(true);
    };
    proxy::serve(listener, policies, config, signal).await;
    // The sync client has stopped too; a cache-file write in progress finishes.
    background.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
