//! The pool of keep-alive HTTP/1.1 connections to the one upstream.
//!
//! A proxy in front of one service needs one pool with one key, so this is a stack of idle
//! connections behind a mutex: a request pops the most recently used connection (or opens
//! one), and its response body puts the connection back when it has been read to the end.
//! Nothing is spawned per request. A request that a reused connection could not take (it
//! closed while idle) is retried once on another.

use std::error::Error as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// Why the upstream did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting failed or took too long.
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// The connection failed while sending the request or reading the response head.
    #[error("upstream request failed: {0}")]
    Request(hyper::Error),
    /// The request's body failed to arrive from the client: cut short, or malformed (a bad
    /// chunk, say). The client's fault, not the upstream's.
    #[error("the request's body failed: {}", cause(.0))]
    RequestBody(hyper::Error),
}

impl UpstreamError {
    /// Sorts out a failed exchange: hyper reports a failure of the request's body as an
    /// error of the caller's body stream, caused by the client connection's own error.
    fn of_exchange(error: hyper::Error) -> UpstreamError {
        let from_client = error.source().is_some_and(|c| c.is::<hyper::Error>());
        if error.is_user() && from_client {
            UpstreamError::RequestBody(error)
        } else {
            UpstreamError::Request(error)
        }
    }
}

/// What caused `error`, the client connection's own error for a failed request body.
fn cause(error: &hyper::Error) -> String {
    error.source().map_or_else(String::new, ToString::to_string)
}

struct Idle {
    sender: SendRequest<Outgoing>,
    since: Instant,
}

/// Keep-alive connections to one upstream.
pub struct Upstream {
    authority: Authority,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A pool for `authority`; idle connections close after `idle_timeout`.
    pub fn new(authority: Authority, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Upstream {
            authority,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Closes connections idle for longer than the idle timeout, every half of it, for as long
    /// as the pool exists.
    pub fn reap_idle(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let every = self.idle_timeout / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let timeout = pool.idle_timeout;
                pool.idle
                    .lock()
                    .expect("pool lock")
                    .retain(|idle| idle.since.elapsed() < timeout && !idle.sender.is_closed());
            }
        });
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the response head; the body
    /// returns the connection to the pool once read to the end. Not an `async fn`, whose
    /// future would store the request twice.
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<Outgoing>,
    ) -> impl Future<Output = Result<Response<PooledBody>, UpstreamError>> + Send + '_ {
        async move {
            // One retry: a reused connection may have closed while idle, before taking the request.
            let mut reused = true;
            loop {
                let (mut sender, was_idle) = match self.checkout().await {
                    Some(sender) => (sender, true),
                    None => (self.connect().await?, false),
                };
                reused &= was_idle;
                match sender.try_send_request(req).await {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        // An upgraded connection is the client's now; it never returns.
                        let keep = parts.status != http::StatusCode::SWITCHING_PROTOCOLS;
                        let mut body = PooledBody {
                            inner: body,
                            ret: keep.then(|| (sender, self.clone())),
                        };
                        if body.inner.is_end_stream() {
                            body.finish();
                        }
                        return Ok(Response::from_parts(parts, body));
                    }
                    Err(mut error) => match error.take_message() {
                        Some(unsent) if reused => {
                            req = unsent;
                            reused = false;
                        }
                        _ => return Err(UpstreamError::of_exchange(error.into_error())),
                    },
                }
            }
        }
    }

    async fn checkout(&self) -> Option<SendRequest<Outgoing>> {
        loop {
            let idle = self.idle.lock().expect("pool lock").pop()?;
            if idle.since.elapsed() >= self.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            // Ready once its connection has finished the previous exchange: at once, or
            // after one turn of the connection's task.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Outgoing>, UpstreamError> {
        let connect = tokio::net::TcpStream::connect(self.authority.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(UpstreamError::Connect(error.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Request)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn put(&self, sender: SendRequest<Outgoing>) {
        if !sender.is_closed() {
            self.idle.lock().expect("pool lock").push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A request's body on its way to the upstream. A body that is more than its end notes when
/// it last moved, for the response timeout, which counts from the body's end.
pub struct Outgoing {
    inner: Incoming,
    progress: Option<Arc<Progress>>,
    polled: bool,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing").finish_non_exhaustive()
    }
}

impl Outgoing {
    /// `body`, with its [`Progress`] if it has more than its end.
    pub fn new(body: Incoming) -> (Outgoing, Option<Arc<Progress>>) {
        let progress = (!body.is_end_stream()).then(|| {
            Arc::new(Progress {
                start: tokio::time::Instant::now(),
                last: AtomicU64::new(Progress::UNPOLLED),
                clients_turn: AtomicBool::new(false),
            })
        });
        let outgoing = Outgoing {
            inner: body,
            progress: progress.clone(),
            polled: false,
        };
        (outgoing, progress)
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            // Its time counts from when the upstream connection first asks for it.
            if polled.is_ready() || !this.polled {
                progress.moved();
            }
            this.polled = true;
            progress.clients_turn.store(polled.is_pending(), Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When a request's body last moved (a chunk, or its end) on its way upstream, and whose turn
/// it is: the client's, while the upstream connection waits for more of the body, or the
/// upstream's, while it has not asked for more (writing, or the body has ended). Before the
/// first chunk, the body counts as moved when the upstream connection first asked for it.
#[derive(Debug)]
pub struct Progress {
    start: tokio::time::Instant,
    /// Nanoseconds after `start` of the last move; [`Progress::UNPOLLED`] before the upstream
    /// connection first asks for the body.
    last: AtomicU64,
    clients_turn: AtomicBool,
}

impl Progress {
    const UNPOLLED: u64 = u64::MAX;

    fn moved(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos.min(Self::UNPOLLED - 1), Relaxed);
    }

    /// When the body last moved, and whether the client was to send more; `None` before the
    /// upstream connection has asked for it.
    pub fn last(&self) -> Option<(tokio::time::Instant, bool)> {
        let last = self.last.load(Relaxed);
        let clients_turn = self.clients_turn.load(Relaxed);
        (last != Self::UNPOLLED).then(|| (self.start + Duration::from_nanos(last), clients_turn))
    }
}

/// An upstream response body that returns its connection to the pool when read to the end.
/// Dropped early, it takes the connection with it (hyper closes a connection whose response
/// was not read).
pub struct PooledBody {
    inner: Incoming,
    ret: Option<(SendRequest<Outgoing>, Arc<Upstream>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn finish(&mut self) {
        if let Some((sender, pool)) = self.ret.take() {
            pool.put(sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finish(),
            Poll::Ready(Some(Err(_))) => self.ret = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
