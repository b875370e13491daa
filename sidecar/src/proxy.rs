//! The proxy: a hyper server (HTTP/1.1, and HTTP/2 over cleartext) in front of one upstream,
//! enforcing the service's CORS policy on every request.
//!
//! Each request loads the [`PolicySet`] once and uses that snapshot from start to finish, so a
//! policy swap never mixes two policies in one response. Preflights are answered here and
//! never reach the upstream; forwarded requests get the engine's headers merged into the
//! upstream's response. Bodies stream in both directions. Hop-by-hop headers (including every
//! header `Connection` names) are removed and `X-Forwarded-For/-Proto/-Host` set.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use corsair_policy::{Action, CompiledPolicy, Decision, Mode, Request as CorsRequest, Scheme};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::listener::{Listener, Slot};
use crate::metrics::{Observer, OpenConnection, Outcome, UpstreamError};
use crate::policies::PolicySet;
use crate::upstream::{ExchangeError, PooledBody, Progress, Upstream, UpstreamError as SendError};
use crate::{http1, http2};

/// A response body: the upstream's, or a short one of the sidecar's own.
#[derive(Debug)]
pub enum Body {
    /// The upstream response's, read with its head.
    Upstream(PooledBody),
    /// The upstream response's, still arriving.
    Streaming(Box<Watched>),
    /// Written by the sidecar (a preflight's, an error's).
    Local(Full<Bytes>),
}

/// An upstream response body still arriving, cut off once the upstream has sent nothing of
/// it for the response timeout: hyper then closes an HTTP/1 connection, or resets an HTTP/2
/// stream, and the upstream connection is closed. The clock is read when a wait begins, not
/// for every frame.
#[derive(Debug)]
pub struct Watched {
    body: PooledBody,
    timeout: std::time::Duration,
    pause: Pause,
    observer: Observer,
    upstream: Authority,
}

/// The deadline of the current wait for the upstream, if one has begun: a deadline of the
/// client connection over HTTP/1, or tokio's timer.
#[derive(Debug)]
enum Pause {
    Connection(Arc<http1::Exchanges>, Option<http1::Deadline>),
    Tokio(Option<Pin<Box<tokio::time::Sleep>>>),
}

impl Pause {
    /// Whether the wait that is on (or begins now) has lasted `timeout`.
    fn poll_over(&mut self, timeout: std::time::Duration, cx: &mut Context<'_>) -> bool {
        let due = || {
            let now = tokio::time::Instant::now();
            now.checked_add(timeout).unwrap_or(now + FOREVER)
        };
        match self {
            Pause::Connection(exchanges, deadline) => {
                let deadline = deadline.get_or_insert_with(|| exchanges.deadline(due().into_std()));
                Pin::new(deadline).poll(cx).is_ready()
            }
            Pause::Tokio(sleep) => sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due())))
                .as_mut()
                .poll(cx)
                .is_ready(),
        }
    }

    /// The wait is over: something came.
    fn end(&mut self) {
        match self {
            Pause::Connection(_, deadline) => *deadline = None,
            Pause::Tokio(sleep) => *sleep = None,
        }
    }
}

impl Watched {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            self.pause.end();
            return Poll::Ready(frame);
        }
        if !self.pause.poll_over(self.timeout, cx) {
            return Poll::Pending;
        }
        self.observer.metrics.upstream_error(UpstreamError::Timeout);
        tracing::warn!(upstream = %self.upstream, timeout = ?self.timeout, "upstream stalled mid-response; cut off");
        Poll::Ready(Some(Err(ExchangeError::Stalled(self.timeout))))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        match self.get_mut() {
            Body::Upstream(body) => Pin::new(body).poll_frame(cx),
            Body::Streaming(body) => body.poll_frame(cx),
            Body::Local(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Upstream(body) => body.is_end_stream(),
            Body::Streaming(body) => body.body.is_end_stream(),
            Body::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Upstream(body) => body.size_hint(),
            Body::Streaming(body) => body.body.size_hint(),
            Body::Local(body) => body.size_hint(),
        }
    }
}

/// What to do with cross-origin requests while no policy is known for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPolicy {
    /// Answer cross-origin requests `403` (same-origin and non-CORS requests still pass).
    Deny,
    /// Forward everything untouched.
    PassThrough,
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The upstream, `host:port`.
    pub upstream: Authority,
    /// The service whose policy applies.
    pub service: String,
    /// The scheme clients use to reach the sidecar (for same-origin checks and
    /// `X-Forwarded-Proto`).
    pub public_scheme: Scheme,
    /// Behaviour without a policy.
    pub no_policy: NoPolicy,
    /// Timeouts on both sides.
    pub timeouts: Timeouts,
    /// How much the proxy holds at once, on both sides.
    pub limits: Limits,
    /// Metrics and the denial-log limit.
    pub observer: Observer,
}

/// How much the proxy holds at once, so that no client can take all of it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections open at once, upgraded ones included; at the limit the listener
    /// stops accepting, and new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// more are refused (`REFUSED_STREAM`).
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows, in bytes: how much of a request's body a client may send
    /// ahead of the upstream taking it, per stream and per connection.
    pub http2_stream_window: u32,
    /// See [`Limits::http2_stream_window`].
    pub http2_connection_window: u32,
    /// Idle upstream connections kept for reuse; one more is closed instead.
    pub upstream_max_idle: usize,
    /// Upstream connections open at once, idle and upgraded ones included; at the limit a
    /// request waits up to the connect timeout for one, then is answered `503`.
    pub upstream_max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            http2_stream_window: 64 * 1024,
            http2_connection_window: 1024 * 1024,
            upstream_max_idle: 100,
            upstream_max_connections: 1024,
        }
    }
}

/// How long the proxy waits, so nothing hangs.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to the upstream (then `502`).
    pub connect: std::time::Duration,
    /// From the end of a request's body (sent upstream) to its response headers (then
    /// `504`); also the longest pause within the body on its way (then `408`), and within
    /// the response's body (then the response is cut off).
    pub response: std::time::Duration,
    /// A client sending its request headers (then the connection is closed).
    pub client_headers: std::time::Duration,
    /// An idle pooled upstream connection is closed after this (within a quarter more).
    pub upstream_idle: std::time::Duration,
    /// An idle HTTP/1 client connection gives back its buffers at once, unless its last gap
    /// between requests was shorter than this; then once it has been idle this long.
    pub client_busy_gap: std::time::Duration,
    /// An upgraded connection (WebSocket, …) with no byte passing either way for this long is
    /// closed (within a quarter more).
    pub tunnel_idle: std::time::Duration,
    /// An HTTP/2 connection with no stream open for this long is shut down (within a quarter
    /// more).
    pub http2_idle: std::time::Duration,
    /// HTTP/2 `PING`s to a client silent for this long, and the time it has to answer each
    /// (then its connection is closed); `None`: no pings.
    pub http2_keepalive: Option<std::time::Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: std::time::Duration::from_secs(5),
            response: std::time::Duration::from_secs(30),
            client_headers: std::time::Duration::from_secs(10),
            upstream_idle: std::time::Duration::from_secs(90),
            client_busy_gap: std::time::Duration::from_secs(1),
            tunnel_idle: std::time::Duration::from_secs(300),
            http2_idle: std::time::Duration::from_secs(75),
            http2_keepalive: Some(std::time::Duration::from_secs(20)),
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    policies: Arc<PolicySet>,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()>,
) {
    let limits = config.limits;
    let client = Arc::new(Upstream::new(
        config.upstream.clone(),
        crate::upstream::Settings {
            connect_timeout: config.timeouts.connect,
            idle_timeout: config.timeouts.upstream_idle,
            body_pause: config.timeouts.response,
            max_idle: limits.upstream_max_idle,
            max_connections: limits.upstream_max_connections,
        },
    ));
    client.reap_idle();
    let client_headers = config.timeouts.client_headers;
    let busy_gap = config.timeouts.client_busy_gap;
    let http2_deadlines = http2::Deadlines {
        header: client_headers,
        idle: config.timeouts.http2_idle,
    };
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(limits.http2_stream_window)
        .initial_connection_window_size(limits.http2_connection_window)
        .keep_alive_interval(config.timeouts.http2_keepalive);
    if let Some(keepalive) = config.timeouts.http2_keepalive {
        http2.keep_alive_timeout(keepalive);
    }
    let mut listener = Listener::new(
        listener,
        "proxy",
        Some(limits.max_connections),
        config.observer.metrics.clone(),
    );
    // Upgraded connections outlive their request; they are closed when serving stops.
    let (close_tunnels, tunnels) = tokio::sync::watch::channel(false);
    let shared = Arc::new((policies, config, client, tunnels, http2));
    // On shutdown every connection is told to finish its in-flight requests and close.
    let (stop_connections, stop) = tokio::sync::watch::channel(false);
    let connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, slot) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let opened = tokio::time::Instant::now();
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(shared.1.observer.metrics.clone());
        let shared = shared.clone();
        let exchanges = Arc::new(http1::Exchanges::default());
        // What the connection's requests share: the client's address, and the connection's
        // place under the limit, held by an upgraded connection until it closes.
        let peer = Arc::new(Peer {
            forwarded: forwarded_for(peer),
            _slot: slot,
        });
        // For HTTP/1, the service's futures run in the connection's task, and time their
        // upstream requests with the connection's timers.
        let service = {
            let exchanges = exchanges.clone();
            let shared = shared.clone();
            move |http1: bool| {
                service_fn(move |req: Request<Incoming>| {
                    let shared = shared.clone();
                    let peer = peer.clone();
                    let exchange = exchanges.start(&req);
                    async move {
                        let (policies, config, client, tunnels, _) = &*shared;
                        let connection = Connection {
                            peer: &peer,
                            timers: http1.then_some(exchange.connection()),
                            tunnels,
                        };
                        let response = handle(req, connection, policies, config, client).await;
                        Ok::<_, Infallible>(
                            response.map(|body| http1::Finishing::new(body, exchange)),
                        )
                    }
                })
            }
        };
        let mut stop = stop.clone();
        connections.spawn(async move {
            // A client that connects and sends nothing is closed after the header timeout
            // too: left to detect the protocol by reading, hyper would wait forever.
            let protocol = tokio::select! {
                first = tokio::time::timeout_at(opened + client_headers, first_protocol(&stream)) => match first {
                    Ok(Ok(protocol)) => protocol,
                    Ok(Err(_)) | Err(_) => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            };
            // Told the protocol, hyper reads the stream itself from its first byte: the
            // automatic builder would first read the 24 bytes of a possible HTTP/2 preface,
            // then grow hyper's 8 KiB read buffer to 16 KiB to append the rest.
            let ended = match protocol {
                Protocol::Http1 => {
                    http1::serve(
                        stream,
                        service(true),
                        exchanges,
                        opened,
                        client_headers,
                        busy_gap,
                        stop,
                        open,
                    )
                    .await
                }
                Protocol::Http2 => {
                    let _open = open;
                    let connection = shared.4.serve_connection(TokioIo::new(stream), service(false));
                    http2::serve(
                        connection,
                        |c| c.graceful_shutdown(),
                        &exchanges,
                        opened,
                        http2_deadlines,
                        stop,
                    )
                    .await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    // New connections are refused from here on.
    drop(listener);
    let _ = stop_connections.send(true);
    connections.close();
    connections.wait().await;
    let _ = close_tunnels.send(true);
}

/// The client of one connection, as its requests see it.
struct Peer {
    /// The client's [`forwarded_for`] entry.
    forwarded: HeaderValue,
    /// The connection's place under the connection limit.
    _slot: Slot,
}

/// The HTTP/2 connection preface a prior-knowledge (h2c) client opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The protocol of a new connection, from its first bytes, read without consuming them. A
/// connection closed before any byte counts as HTTP/1, which answers EOF.
async fn first_protocol(stream: &tokio::net::TcpStream) -> std::io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    if let Some(protocol) = classify(&first[..n]) {
        return Ok(protocol);
    }
    // A proper prefix of the preface so far. `peek` leaves the socket readable, so wait for
    // more bytes by peeking through a second handle inside `try_io`, whose `WouldBlock`
    // clears the readiness until the next bytes arrive.
    let peer = std::net::TcpStream::from(std::os::fd::AsFd::as_fd(stream).try_clone_to_owned()?);
    loop {
        stream.readable().await?;
        let seen = stream.try_io(tokio::io::Interest::READABLE, || {
            let n = peer.peek(&mut first)?;
            classify(&first[..n]).ok_or_else(|| std::io::ErrorKind::WouldBlock.into())
        });
        match seen {
            Ok(protocol) => return Ok(protocol),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The protocol `first` (the bytes received so far) opens; `None` while it is a proper prefix
/// of the HTTP/2 preface.
fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() || !H2_PREFACE.starts_with(first) {
        Some(Protocol::Http1)
    } else if first.len() == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

fn local(status: StatusCode, headers: HeaderMap, body: &'static str) -> Response<Body> {
    let body = Body::Local(Full::new(Bytes::from_static(body.as_bytes())));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The largest request head forwarded, in bytes of its target and fields (as Envoy's
/// default, about 60 KiB); a larger one is answered `431`. hyper's own limit on a head it
/// reads (about 400 KiB) is its read buffer's, which also sizes its reads of a body.
const MAX_HEAD: usize = 64 * 1024;

/// What a request knows of the client connection it came on.
struct Connection<'a> {
    /// The client: its [`forwarded_for`] entry, and its connection's place under the limit,
    /// which an upgraded connection holds.
    peer: &'a Arc<Peer>,
    /// The connection's timers, when the request's future runs in its task (HTTP/1);
    /// otherwise the request is timed with tokio's.
    timers: Option<&'a Arc<http1::Exchanges>>,
    /// Turns true when serving stops, closing upgraded connections.
    tunnels: &'a tokio::sync::watch::Receiver<bool>,
}

/// A request's answer. Not an `async fn`: the future of one stores its arguments twice, the
/// request among them, and moves them all when hyper boxes it.
#[allow(clippy::manual_async_fn)]
fn handle<'a>(
    mut req: Request<Incoming>,
    connection: Connection<'a>,
    policies: &'a PolicySet,
    config: &'a ProxyConfig,
    client: &'a Arc<Upstream>,
) -> impl Future<Output = Response<Body>> + Send + 'a {
    async move {
        let Connection {
            peer,
            timers,
            tunnels,
        } = connection;
        // One pass over the names: most requests carry no hop-by-hop header (and so neither an
        // upgrade nor anything to strip), and no `X-Forwarded-*` of their own.
        let names = Names::of(req.headers());
        let target = req.uri().authority().map_or(0, |a| a.as_str().len())
            + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if names.len + target > MAX_HEAD {
            return local(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                HeaderMap::new(),
                "request header fields too large\n",
            );
        }
        // A tunnel to wherever the client names is a forward proxy's business, not this one's.
        if req.method() == http::Method::CONNECT {
            return local(
                StatusCode::NOT_IMPLEMENTED,
                HeaderMap::new(),
                "CONNECT is not supported\n",
            );
        }
        // What the upstream could read otherwise than the sidecar did never reaches it.
        let host = match names.hosts {
            1 => req.headers().get(header::HOST),
            _ => None,
        };
        if let Some((status, why)) = ambiguity(&req, host, &names) {
            let mut headers = HeaderMap::new();
            if req.version() <= http::Version::HTTP_11 {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return local(status, headers, why);
        }
        // One snapshot for the whole request.
        let snapshot = policies.load();
        let active = snapshot.services.get(&config.service);
        // The request target's authority where it has one (absolute form, HTTP/2's
        // `:authority`), which wins over `Host` (RFC 9112 §3.2.2, RFC 9113 §8.3.1); otherwise
        // `Host` (shared with the request, no copy).
        let from_target = req.uri().authority().is_some();
        let authority_value = match req.uri().authority() {
            Some(target) => host_value(target),
            None => host.cloned(),
        };
        let authority = authority_value.as_ref().and_then(|v| v.to_str().ok());
        let hop_by_hop = names.hop_by_hop;
        let upgrade = hop_by_hop && is_upgrade(&req);
        // The decision borrows the snapshot's compiled policy, which `snapshot` keeps alive.
        let cors = match active {
            Some(active) => {
                // The target as the upstream will get it picks the route.
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let request = CorsRequest::new(req.method(), req.headers())
                    .with_own_origin(config.public_scheme, authority)
                    .with_path(target);
                let decision = active.compiled.decide(&request);
                let shadow = active.compiled.mode(&decision) == Mode::Shadow;
                let outcome = match (decision.allowed, shadow) {
                    (true, _) => Outcome::Allowed,
                    (false, false) => Outcome::Denied,
                    (false, true) => Outcome::ShadowDenied,
                };
                config
                    .observer
                    .metrics
                    .decided(decision.kind, outcome, decision.reason);
                if !decision.allowed {
                    log_denial(config, &active.compiled, &request, &decision);
                    // Browsers do not apply CORS to WebSocket and other upgrades: the origin
                    // check is the server's, so a refused origin never reaches the upstream
                    // (except in shadow mode, which changes nothing).
                    if upgrade && !shadow {
                        return local(
                            StatusCode::FORBIDDEN,
                            HeaderMap::new(),
                            "cross-origin upgrade refused\n",
                        );
                    }
                }
                match decision.action {
                    Action::Respond(status) => {
                        let headers = decision
                            .headers
                            .map(|h| h.to_header_map())
                            .unwrap_or_default();
                        return local(status, headers, "");
                    }
                    Action::Forward => decision.headers,
                }
            }
            None => {
                let cross_origin = req.headers().get(header::ORIGIN).is_some_and(|origin| {
                    let same =
                        authority
                            .zip(origin.to_str().ok())
                            .is_some_and(|(authority, origin)| {
                                corsair_policy::is_same_origin(
                                    origin,
                                    config.public_scheme,
                                    authority,
                                )
                            });
                    !same
                });
                let deny = config.no_policy == NoPolicy::Deny && cross_origin;
                config.observer.metrics.without_policy(deny);
                if deny {
                    return local(
                        StatusCode::FORBIDDEN,
                        HeaderMap::new(),
                        "no CORS policy loaded yet\n",
                    );
                }
                None
            }
        };

        // An HTTP/1.1 `Upgrade` (WebSocket, …): once the upstream agrees (`101`), both
        // connections are handed over and spliced byte for byte.
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if hop_by_hop {
            strip_hop_by_hop(req.headers_mut(), upgrade);
        }
        // `X-Forwarded-*` go after the request's own headers as its head is written, or, when
        // it brought some of its own, into its header map, joined or replaced.
        let proto = HeaderValue::from_static(config.public_scheme.as_str());
        let forwarded: [(&HeaderName, &HeaderValue); 3];
        let appended: &[(&HeaderName, &HeaderValue)] = if names.forwarded {
            add_forwarded(
                req.headers_mut(),
                &peer.forwarded,
                config.public_scheme,
                authority_value.as_ref(),
            );
            &[]
        } else {
            let host = authority_value.as_ref();
            forwarded = [
                (&X_FORWARDED_FOR, &peer.forwarded),
                (&X_FORWARDED_PROTO, &proto),
                (&X_FORWARDED_HOST, host.unwrap_or(&proto)),
            ];
            &forwarded[..if host.is_some() { 3 } else { 2 }]
        };
        // `Host` is the authority (added for HTTP/2, put back if `Connection` named it; one
        // that came from `Host` and was not stripped is there already).
        if let Some(host) = authority_value.as_ref()
            && (from_target || hop_by_hop)
            && req.headers().get(header::HOST) != Some(host)
        {
            req.headers_mut().insert(header::HOST, host.clone());
        }

        // The response timeout counts from the end of the request's body, and is also the
        // longest pause allowed within it. Over HTTP/1, the client connection learns when
        // the body has all arrived: from then on, the client closing is giving up on the
        // request.
        let progress = (!req.body().is_end_stream())
            .then(|| Progress::new(timers.map(|exchanges| exchanges.arrived())));
        let progress = progress.as_ref();
        // Each way constructs its own future in place: a future handed to a function that pins
        // it would be stored twice in this one.
        let timeout = config.timeouts.response;
        let now = tokio::time::Instant::now();
        // Past the end of time (a timeout too long to add), a deadline that never comes.
        let mut due = now.checked_add(timeout).unwrap_or(now + FOREVER);
        let response = match timers {
            Some(timers) => {
                let mut send = std::pin::pin!(client.send(req, progress, appended));
                let mut deadline = timers.deadline(due.into_std());
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(response) = send.as_mut().poll(cx) {
                        return Poll::Ready(Ok(response));
                    }
                    loop {
                        std::task::ready!(Pin::new(&mut deadline).poll(cx));
                        due = next_due(progress, due, timeout)?;
                        deadline = timers.deadline(due.into_std());
                    }
                })
                .await
            }
            None => {
                let mut send = std::pin::pin!(client.send(req, progress, appended));
                let mut sleep = std::pin::pin!(tokio::time::sleep_until(due));
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(response) = send.as_mut().poll(cx) {
                        return Poll::Ready(Ok(response));
                    }
                    loop {
                        std::task::ready!(sleep.as_mut().poll(cx));
                        due = next_due(progress, due, timeout)?;
                        sleep.as_mut().reset(due);
                    }
                })
                .await
            }
        };
        let response = match response {
            Ok(result) => result,
            Err(Late::Upstream) => {
                config
                    .observer
                    .metrics
                    .upstream_error(UpstreamError::Timeout);
                tracing::warn!(upstream = %config.upstream, ?timeout, "upstream did not answer in time");
                let mut headers = HeaderMap::new();
                if let Some(cors) = &cors {
                    cors.apply(&mut headers);
                }
                return local(StatusCode::GATEWAY_TIMEOUT, headers, "upstream timed out\n");
            }
            Err(Late::Body) => {
                config.observer.metrics.client_body_error();
                tracing::debug!(?timeout, "request body stalled");
                let mut headers = HeaderMap::new();
                if let Some(cors) = &cors {
                    cors.apply(&mut headers);
                }
                return local(
                    StatusCode::REQUEST_TIMEOUT,
                    headers,
                    "request body timed out\n",
                );
            }
        };
        match response {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                let body = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    let (Some(client_upgrade), Some(upstream)) =
                        (client_upgrade, body.into_upgraded())
                    else {
                        config
                            .observer
                            .metrics
                            .upstream_error(UpstreamError::Unavailable);
                        tracing::warn!(upstream = %config.upstream, "upstream switched protocols unasked");
                        return local(
                            StatusCode::BAD_GATEWAY,
                            HeaderMap::new(),
                            "upstream switched protocols unasked\n",
                        );
                    };
                    tokio::spawn(splice(
                        client_upgrade,
                        upstream,
                        config.observer.clone(),
                        tunnels.clone(),
                        config.timeouts.tunnel_idle,
                        peer.clone(),
                    ));
                    Body::Local(Full::new(Bytes::new()))
                } else if body.is_streaming() {
                    Body::Streaming(Box::new(Watched {
                        body,
                        timeout,
                        pause: match timers {
                            Some(timers) => Pause::Connection(timers.clone(), None),
                            None => Pause::Tokio(None),
                        },
                        observer: config.observer.clone(),
                        upstream: config.upstream.clone(),
                    }))
                } else {
                    Body::Upstream(body)
                };
                // No hop-by-hop field of the upstream's is left: the upstream side drops them
                // as it reads the head.
                if let Some(cors) = &cors {
                    cors.apply(&mut parts.headers);
                }
                Response::from_parts(parts, body)
            }
            Err(error @ SendError::RequestBody(_)) => {
                // Most often a client gone mid-upload; it is theirs to see, not the
                // operator's, so no warning and no upstream error.
                config.observer.metrics.client_body_error();
                tracing::debug!(%error, "request body failed");
                let mut headers = HeaderMap::new();
                if let Some(cors) = &cors {
                    cors.apply(&mut headers);
                }
                local(StatusCode::BAD_REQUEST, headers, "bad request body\n")
            }
            Err(error @ SendError::Limit { .. }) => {
                config.observer.metrics.upstream_limit_refused();
                tracing::debug!(%error, "upstream connection limit reached");
                let mut headers = HeaderMap::new();
                if let Some(cors) = &cors {
                    cors.apply(&mut headers);
                }
                local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    headers,
                    "upstream connection limit reached\n",
                )
            }
            Err(error) => {
                config
                    .observer
                    .metrics
                    .upstream_error(UpstreamError::Unavailable);
                tracing::warn!(%error, upstream = %config.upstream, "upstream request failed");
                let mut headers = HeaderMap::new();
                if let Some(cors) = &cors {
                    cors.apply(&mut headers);
                }
                local(StatusCode::BAD_GATEWAY, headers, "upstream unavailable\n")
            }
        }
    }
}

/// Why the wait for a response head is over without one.
enum Late {
    /// The upstream had the whole request, or stopped taking its body, and did not answer
    /// within the response timeout.
    Upstream,
    /// The client paused its request's body for longer than the response timeout.
    Body,
}

/// At `due`, the deadline of the wait for a response head: the next deadline, if the
/// request's body has moved since the one before (the timeout counts from its last move), or
/// why the wait is over.
fn next_due(
    progress: Option<&Progress>,
    due: tokio::time::Instant,
    timeout: std::time::Duration,
) -> Result<tokio::time::Instant, Late> {
    // Without a body, or before the upstream connection took it, the wait is the upstream's.
    let Some((last, clients_turn)) = progress.and_then(Progress::last) else {
        return Err(Late::Upstream);
    };
    match last.checked_add(timeout) {
        // An upstream that stopped reading the body is late, not the client.
        Some(next) if next <= due => Err(if clients_turn {
            Late::Body
        } else {
            Late::Upstream
        }),
        next => Ok(next.unwrap_or(last + FOREVER)),
    }
}

/// Splices an upgraded client connection to the upgraded upstream one, byte for byte, until
/// either side closes, no byte has passed either way for `idle`, or serving stops. `_peer`
/// holds the client connection's place under the connection limit until then.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: crate::upstream::Upgraded,
    observer: Observer,
    mut stop: tokio::sync::watch::Receiver<bool>,
    idle: std::time::Duration,
    _peer: Arc<Peer>,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    observer.metrics.upgraded();
    let moved = Arc::new(AtomicU64::new(0));
    let mut client = Counted {
        inner: TokioIo::new(client),
        moved: moved.clone(),
    };
    let crate::upstream::Upgraded {
        stream: mut upstream,
        unread,
        slot: _slot,
    } = upstream;
    // What the upstream sent right after its `101` goes first.
    if !unread.is_empty()
        && let Err(error) = tokio::io::AsyncWriteExt::write_all(&mut client, &unread).await
    {
        tracing::debug!(%error, "upgraded connection ended with an error");
        return;
    }
    // Checked four times per `idle`, without a clock read per transfer: closed after four
    // checks in a row saw nothing move.
    let quiet = async {
        let mut tick = tokio::time::interval((idle / 4).max(std::time::Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let (mut seen, mut quiet) = (0, 0);
        while quiet < 4 {
            tick.tick().await;
            let now = moved.load(Relaxed);
            quiet = if now == seen { quiet + 1 } else { 0 };
            seen = now;
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        }
        () = quiet => tracing::debug!(?idle, "upgraded connection idle: closed"),
        _ = stop.wait_for(|stop| *stop) => {}
    }
}

/// An I/O that counts the bytes passing through it either way.
struct Counted<T> {
    inner: T,
    moved: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, Relaxed);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.moved.fetch_add(n as u64, Relaxed);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.moved.fetch_add(n as u64, Relaxed);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Logs a refused (or, in shadow mode, would-be refused) request, within the rate limit: an
/// attacker sending denied origins cannot flood the logs.
fn log_denial(
    config: &ProxyConfig,
    compiled: &CompiledPolicy,
    request: &CorsRequest<'_>,
    decision: &Decision<'_>,
) {
    let Some(suppressed) = config.observer.denials.admit() else {
        return;
    };
    let route = decision.route.map_or("", |i| {
        compiled.policy().spec().routes[i.get()].path.as_str()
    });
    tracing::info!(
        service = %config.service,
        kind = decision.kind.as_str(),
        reason = decision.reason.class(),
        route,
        suppressed,
        "{}",
        compiled.describe(request, decision),
    );
}

/// Whether `req` asks to switch protocols on this connection (HTTP/1.1 `Connection: upgrade`
/// with an `Upgrade` header).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The hop-by-hop headers, besides those `Connection` names and `Upgrade`.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// What a request's header names call for, from one pass over them.
struct Names {
    /// Some are hop-by-hop.
    hop_by_hop: bool,
    /// How many are `Host`.
    hosts: usize,
    /// Some are `X-Forwarded-*`.
    forwarded: bool,
    /// The bytes of the fields as HTTP/1 writes them (`name: value` and a line end each).
    len: usize,
}

impl Names {
    fn of(headers: &HeaderMap) -> Self {
        let mut names = Names {
            hop_by_hop: false,
            hosts: 0,
            forwarded: false,
            len: 0,
        };
        for (name, value) in headers {
            names.hop_by_hop |= is_hop_by_hop(name);
            names.hosts += usize::from(name == header::HOST);
            names.forwarded |= name.as_str().starts_with("x-forwarded-");
            names.len += name.as_str().len() + value.len() + 4;
        }
        names
    }
}

/// Why `req` cannot be forwarded faithfully, if it cannot: its target host is ambiguous (more
/// than one `Host`, an invalid one, none in HTTP/1.1 or HTTP/2, or over HTTP/2 one that names
/// another host than `:authority`: RFC 9112 §3.2, RFC 9113 §8.3.1), so the upstream could
/// serve another host than the policy was decided for; or its body has a transfer coding
/// other than one `chunked`, which the upstream would get decoded, framed as plain chunked
/// (RFC 9112 §6.1: an unknown coding is `501`). `host` is its one `Host`, if it has exactly
/// one.
fn ambiguity(
    req: &Request<Incoming>,
    host: Option<&HeaderValue>,
    names: &Names,
) -> Option<(StatusCode, &'static str)> {
    let bad = |why| Some((StatusCode::BAD_REQUEST, why));
    if names.hosts > 1 {
        return bad("more than one Host\n");
    }
    let version = req.version();
    match (host, req.uri().authority()) {
        (Some(host), _) if !is_valid_host(host.as_bytes()) => return bad("invalid Host\n"),
        (None, _) if version == http::Version::HTTP_11 => return bad("no Host\n"),
        (None, None) if version >= http::Version::HTTP_2 => return bad("no :authority or Host\n"),
        (Some(host), Some(authority))
            if version >= http::Version::HTTP_2 && !same_host(authority, host) =>
        {
            return bad("Host differs from :authority\n");
        }
        _ => {}
    }
    // `Transfer-Encoding` is hop-by-hop, and HTTP/1's alone.
    if !names.hop_by_hop || version > http::Version::HTTP_11 {
        return None;
    }
    let mut chunked = 0;
    for value in req.headers().get_all(header::TRANSFER_ENCODING) {
        for coding in value.as_bytes().split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            if !coding.eq_ignore_ascii_case(b"chunked") {
                return Some((
                    StatusCode::NOT_IMPLEMENTED,
                    "transfer coding not implemented\n",
                ));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return bad("chunked more than once\n");
    }
    None
}

/// Whether `host` is a valid `Host` value: `uri-host [":" port]` (RFC 9110 §7.2), the host an
/// IP literal in brackets or a registered name (which may be an IPv4 address), never empty.
fn is_valid_host(host: &[u8]) -> bool {
    let (name_ok, rest) = match host.strip_prefix(b"[") {
        Some(literal) => match literal.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && literal[..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                &literal[end + 1..],
            ),
            None => return false,
        },
        None => {
            let end = host.iter().position(|&b| b == b':').unwrap_or(host.len());
            (end > 0 && is_reg_name(&host[..end]), &host[end..])
        }
    };
    let port_ok = match rest {
        [] => true,
        [b':', port @ ..] => port.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    name_ok && port_ok
}

/// Whether `name` is an RFC 3986 `reg-name`: unreserved and sub-delimiter characters, and
/// percent-encoded octets.
fn is_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                if !name
                    .get(i + 1..i + 3)
                    .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// Whether the `Host` value `host` names the same host and port as `authority` (without its
/// user information), letter case aside.
fn same_host(authority: &Authority, host: &HeaderValue) -> bool {
    let authority = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, h)| h);
    authority.as_bytes().eq_ignore_ascii_case(host.as_bytes())
}

/// Whether `name` is in [`HOP_BY_HOP`] or is `Upgrade`: the list the upstream's responses are
/// read with too.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    crate::upstream::is_hop_by_hop(name.as_str().as_bytes())
}

/// Removes hop-by-hop headers, including every header `Connection` names. `Upgrade` is kept
/// only for an upgrade (`upgrading`) that `Connection` asks for, so upgrades pass through.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrading = upgrading && named.contains(&header::UPGRADE);
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if !(upgrading && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A timeout too long to add to the clock: some thirty years.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(30 * 365 * 86_400);

/// An authority as a `Host` value: without user information (`user@`), which `Host` never
/// carries.
fn host_value(authority: &Authority) -> Option<HeaderValue> {
    let host = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, h)| h);
    HeaderValue::from_str(host).ok()
}

/// The client's address as an `X-Forwarded-For` entry, made once per connection.
fn forwarded_for(peer: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.ip().to_string()).expect("an IP address is a valid header value")
}

/// Sets `X-Forwarded-For` (appending `peer`, the client's [`forwarded_for`] entry, to the
/// lines the request brought, in order, on one line), `X-Forwarded-Proto` and
/// `X-Forwarded-Host`.
fn add_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    scheme: Scheme,
    host: Option<&HeaderValue>,
) {
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            entry.insert(peer.clone());
        }
        header::Entry::Occupied(mut entry) => {
            let mut joined = Vec::with_capacity(64);
            for prior in entry.iter() {
                joined.extend_from_slice(prior.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(peer.as_bytes());
            // Valid header values joined by ", " make a valid one.
            if let Ok(joined) = HeaderValue::from_bytes(&joined) {
                entry.insert(joined);
            }
        }
    }
    headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(scheme.as_str()),
    );
    if let Some(host) = host {
        headers.insert(&X_FORWARDED_HOST, host.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(classify(b""), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI"), None);
        assert_eq!(classify(&H2_PREFACE[..23]), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"),
            Some(Protocol::Http1)
        );
    }

    #[test]
    fn forwarded_headers_append_to_what_the_request_brought() {
        let mut headers = HeaderMap::new();
        let host = HeaderValue::from_static("shop.example");
        add_forwarded(
            &mut headers,
            &forwarded_for("10.0.0.7:5555".parse().unwrap()),
            Scheme::Https,
            Some(&host),
        );
        assert_eq!(headers["x-forwarded-for"], "10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "shop.example");

        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.2"));
        add_forwarded(
            &mut headers,
            &forwarded_for("[::1]:80".parse().unwrap()),
            Scheme::Http,
            None,
        );
        let xff: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["203.0.113.1, 198.51.100.2, ::1"]);
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(!headers.contains_key("x-forwarded-host"));
    }

    #[test]
    fn hop_by_hop_headers_go_and_asked_upgrades_stay() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(*name, HeaderValue::from_static(value));
            }
            headers
        };
        // None present: untouched.
        let mut headers = map(&[("content-type", "text/plain"), ("x-a", "1")]);
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(
            headers,
            map(&[("content-type", "text/plain"), ("x-a", "1")])
        );
        // Every listed one, every one `Connection` names, and an unasked `Upgrade`.
        let mut headers = map(&[
            ("connection", "keep-alive, x-a"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-a", "1"),
            ("x-b", "2"),
        ]);
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers, map(&[("x-b", "2")]));
        // An upgrade that `Connection` asks for keeps `Upgrade`.
        let mut headers = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(
            headers,
            map(&[("upgrade", "websocket"), ("connection", "upgrade")])
        );
    }
}
