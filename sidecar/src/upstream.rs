//! The upstream side: keep-alive HTTP/1.1 connections to the one upstream, and the exchanges
//! on them.
//!
//! A proxy in front of one service needs one pool with one key, so this is a stack of idle
//! connections behind a mutex: a request pops the most recently used connection (or opens
//! one), and its response body puts the connection back when it has been read to the end.
//!
//! An exchange runs in the task of the request it serves, with no task or channel of its own:
//! the request's future writes the head and the body to the upstream socket and reads the
//! response head from it ([`codec`]), and the response body reads the rest as the client
//! connection asks for it. hyper's client would run each upstream connection as a task of its
//! own, with channels to the request and the response body between them: about 40% of the
//! proxy's instructions per request went there (see BENCHMARKS.md).
//!
//! An upstream may answer before it has read the whole of a request's body. Then the exchange
//! becomes a task of its own, which goes on forwarding the body while it hands the response's
//! frames over through a channel: a client may send all of its request before it reads any of
//! the response, and the body must not wait for the response to be read. A body that ends
//! short of its declared length is the client's error, and closes the connection.
//!
//! The pool is bounded: at most so many connections idle (one more is closed instead of
//! pooled), and at most so many open at once, idle, busy and upgraded. At that bound a request
//! waits, up to the connect timeout, for a connection to go back to the pool or to close, and is
//! then refused ([`UpstreamError::Limit`]).
//!
//! A connection goes back to the pool only at a message boundary on both sides: the request
//! written whole, the response read whole, nothing unasked for after it, and neither side
//! closing. A pooled connection the upstream has closed is noticed when it is taken (its
//! socket reads end of stream); a request without a body that finds its reused connection
//! closed before any byte of an answer is sent again, once, on a new connection, if resending
//! it is safe (its method is idempotent, or it could not be written at all).

mod codec;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub use codec::Malformed;
pub(crate) use codec::is_hop_by_hop;
use codec::{Asked, ChunkLine, Chunked, Decoded, Framing, RequestFraming};

/// Why the upstream did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting failed or took too long.
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// The connection failed while sending the request or reading the response head, or the
    /// head was malformed.
    #[error("upstream request failed: {0}")]
    Request(ExchangeError),
    /// The request's body failed to arrive from the client: cut short, or malformed (a bad
    /// chunk, say). The client's fault, not the upstream's.
    #[error("the request's body failed: {0}")]
    RequestBody(BodyError),
    /// Every connection the pool may open stayed busy for the connect timeout.
    #[error("all {max} upstream connections stayed busy for {waited:?}")]
    Limit {
        /// The bound.
        max: usize,
        /// How long the request waited.
        waited: Duration,
    },
}

/// Why a request's body did not arrive whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client's connection failed it: cut short, or malformed.
    #[error(transparent)]
    Client(hyper::Error),
    /// It ended (an HTTP/2 stream reset without an error ends a body cleanly) before the
    /// length it declared, or ran past it.
    #[error("{sent} bytes of a body of {declared}")]
    Length {
        /// Its `Content-Length`.
        declared: u64,
        /// What it brought.
        sent: u64,
    },
}

/// What went wrong on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Reading or writing the socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The upstream closed the connection before the response ended.
    #[error("the upstream closed the connection before the response ended")]
    Closed,
    /// The response is not one that can be forwarded.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// The request's body failed to arrive from the client (while the response streamed).
    #[error("the request's body failed: {0}")]
    RequestBody(BodyError),
    /// The upstream sent nothing of the response's body for this long.
    #[error("the upstream sent nothing of the response's body for {0:?}")]
    Stalled(Duration),
}

impl From<ExchangeError> for UpstreamError {
    fn from(error: ExchangeError) -> Self {
        match error {
            ExchangeError::RequestBody(error) => UpstreamError::RequestBody(error),
            error => UpstreamError::Request(error),
        }
    }
}

/// The first read buffer of a connection, and how far it grows for a body that arrives
/// faster than it is sent on.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 128 * 1024;

/// One connection to the upstream, with its buffers.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet taken.
    read: BytesMut,
    /// How much room to make before the next read: grows while reads fill it.
    read_size: usize,
    /// The request head being written.
    head: Vec<u8>,
    /// Whether it was taken from the pool (rather than opened for this request).
    reused: bool,
    /// Its place under the pool's bound on open connections.
    slot: OwnedSemaphorePermit,
}

impl Conn {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit) -> Self {
        Conn {
            stream,
            read: BytesMut::new(),
            read_size: READ_MIN,
            head: Vec::new(),
            reused: false,
            slot,
        }
    }

    /// Reads more into `read`: the number of bytes, 0 at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.read_size / 2 {
            self.read.reserve(self.read_size);
        }
        let room = self.read.capacity() - self.read.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.read
        ))?;
        if n == room && self.read_size < READ_MAX {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Whether the connection can take a request: nothing unasked for has arrived, and the
    /// upstream has not closed it. A connection with nothing to read reads nothing: its
    /// socket is known not to be readable.
    fn is_open(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Ready to go back to the pool: the read buffer shrinks back if a large body grew it.
    fn rest(&mut self) {
        if self.read_size > READ_MIN {
            self.read_size = READ_MIN;
            self.read = BytesMut::new();
        }
    }
}

struct Idle {
    conn: Conn,
    /// The pool's epoch when the connection went idle.
    since: u64,
}

/// The upstream's address as `--upstream` takes it: `host:port`, or `http://host:port` (a
/// trailing `/` allowed), the port 80 when none is given. The sidecar speaks plain HTTP/1.1
/// to a service next to it, so a scheme other than `http`, a path, a query or user
/// information is refused, saying which.
pub fn parse_address(text: &str) -> Result<Authority, String> {
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "the scheme must be http (the sidecar speaks plain HTTP/1.1 to its service), not {scheme:?}"
            ));
        }
        None => text,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("the upstream needs a host".into());
    }
    if rest.contains(['/', '?', '#']) {
        return Err("the upstream is an address, host:port, without a path or query".into());
    }
    if rest.contains('@') {
        return Err("the upstream is an address, host:port, without user information".into());
    }
    let authority: Authority = rest
        .parse()
        .map_err(|e| format!("not an address, host:port: {e}"))?;
    if authority.host().is_empty() {
        return Err("the upstream needs a host".into());
    }
    match authority.port_u16() {
        Some(0) => Err("the upstream's port cannot be 0".into()),
        Some(_) => Ok(authority),
        None if rest.ends_with(':') => Err("the upstream's port is empty".into()),
        None => format!("{rest}:80")
            .parse()
            .map_err(|e| format!("not an address, host:port: {e}")),
    }
}

/// Ticks of the pool's epoch (a quarter of the idle timeout each) after which an idle
/// connection is closed: it has been idle for the whole timeout, and at most a quarter more.
const IDLE_TICKS: u64 = 5;

/// How a pool connects, and how much it holds.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Connecting, and, at the bound, waiting for a connection.
    pub connect_timeout: Duration,
    /// Idle connections are closed after this (within a quarter more).
    pub idle_timeout: Duration,
    /// The longest pause allowed within the rest of a request's body, forwarded after its
    /// response has ended.
    pub body_pause: Duration,
    /// Idle connections kept at most.
    pub max_idle: usize,
    /// Connections open at once at most, idle, busy and upgraded.
    pub max_connections: usize,
}

/// Keep-alive connections to one upstream.
pub struct Upstream {
    authority: Authority,
    settings: Settings,
    idle: Mutex<Vec<Idle>>,
    /// A place for each connection that may be open.
    slots: Arc<Semaphore>,
    /// Requests waiting at the bound, told when a connection goes back to the pool.
    waiting: AtomicUsize,
    pooled: Notify,
    /// How long connections have been idle, counted without reading the clock per request:
    /// [`Upstream::reap_idle`] advances it every quarter of the idle timeout.
    epoch: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A pool for `authority`.
    pub fn new(authority: Authority, settings: Settings) -> Self {
        Upstream {
            authority,
            settings,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(
                settings.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            waiting: AtomicUsize::new(0),
            pooled: Notify::new(),
            epoch: AtomicU64::new(0),
        }
    }

    /// Closes connections idle for the idle timeout (within a quarter more), or closed by the
    /// upstream, checking every quarter of the timeout, for as long as the pool exists.
    pub fn reap_idle(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let every = (self.settings.idle_timeout / 4).max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let epoch = pool.epoch.fetch_add(1, Relaxed) + 1;
                pool.idle
                    .lock()
                    .expect("pool lock")
                    .retain(|idle| epoch - idle.since < IDLE_TICKS && idle.conn.is_open());
            }
        });
    }

    /// Sends `req` (`Host` set, hop-by-hop fields gone; the target goes in origin form), with
    /// `appended` written after its own headers, and returns the response head; the body reads
    /// the rest and returns the connection to the pool once read to the end. `progress`, given
    /// for a request with a body, notes how the body moves until the response head has
    /// arrived.
    ///
    /// hyper moves this future (within the request's) into place for every request, so it is
    /// kept small: the request is taken apart before it, not stored again inside it, and what
    /// few requests need (a body to forward, a new connection) is boxed.
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        self: &'a Arc<Self>,
        req: Request<Incoming>,
        progress: Option<&'a Progress>,
        appended: &'a [(&'a HeaderName, &'a HeaderValue)],
    ) -> impl Future<Output = Result<Response<PooledBody>, UpstreamError>> + Send + 'a {
        let (mut parts, body) = req.into_parts();
        let framing = if body.is_end_stream() {
            if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
                RequestFraming::Length(0)
            } else {
                RequestFraming::None
            }
        } else {
            match body.size_hint().exact() {
                Some(n) => RequestFraming::Length(n),
                None => RequestFraming::Chunked,
            }
        };
        let mut forward = (!body.is_end_stream()).then(|| {
            let arrived = progress.and_then(|p| p.arrived.clone());
            Box::new(Forward::new(body, framing, arrived))
        });
        async move {
            let asked = Asked::of(&parts.method);
            // Resent if its connection turns out closed: only what the upstream cannot have
            // acted on, or may act on twice.
            let idempotent = matches!(
                parts.method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            );
            let mut conn = match self.take() {
                Some(conn) => conn,
                None => Box::pin(self.open(true)).await?,
            };
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            codec::encode_request(
                &mut conn.head,
                &parts.method,
                target,
                &parts.headers,
                appended,
                framing,
            );
            // The request's header map, emptied, takes the response's fields: hyper keeps a
            // response's map for the next request it reads, so one allocation serves every
            // exchange on a client connection.
            let spare = &mut parts.headers;
            spare.clear();
            let mut resent = false;
            loop {
                let mut exchange = Exchange::new(asked);
                let head = std::future::poll_fn(|cx| {
                    exchange.poll(&mut conn, forward.as_deref_mut(), progress, spare, cx)
                })
                .await;
                match head {
                    Ok(head) => {
                        // Answered before the request was written whole (or could be): the
                        // connection is not at a request's end, and the rest is not sent.
                        let sent = !exchange.write_failed && exchange.written == conn.head.len();
                        let forward = forward.filter(|_| sent);
                        return Ok(self.respond(head, conn, forward, sent));
                    }
                    Err(error) => {
                        let resend = !resent
                            && conn.reused
                            && forward.is_none()
                            && !exchange.received
                            && (idempotent || exchange.write_failed)
                            && matches!(error, ExchangeError::Io(_) | ExchangeError::Closed);
                        if !resend {
                            return Err(error.into());
                        }
                        // Once, on a new connection: another pooled one could be as stale,
                        // and a request the upstream closes on must not run once per
                        // pooled connection.
                        resent = true;
                        let head = std::mem::take(&mut conn.head);
                        // Its place goes to the new one.
                        drop(conn);
                        conn = Box::pin(self.open(false)).await?;
                        conn.head = head;
                    }
                }
            }
        }
    }

    /// The most recently pooled connection still open, if any.
    fn take(&self) -> Option<Conn> {
        loop {
            let idle = self.idle.lock().expect("pool lock").pop()?;
            if self.epoch.load(Relaxed) - idle.since < IDLE_TICKS && idle.conn.is_open() {
                let mut conn = idle.conn;
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// A connection for a request that found none idle: a new one, if the bound allows;
    /// otherwise the first to go back to the pool (if `reuse`) or a new one once another has
    /// closed, whichever comes first within the connect timeout.
    async fn open(&self, reuse: bool) -> Result<Conn, UpstreamError> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return self.connect(slot).await;
        }
        let timeout = self.settings.connect_timeout;
        let waiting = Waiting::new(&self.waiting);
        let mut deadline = std::pin::pin!(tokio::time::sleep(timeout));
        loop {
            let mut pooled = std::pin::pin!(self.pooled.notified());
            pooled.as_mut().enable();
            if reuse && let Some(conn) = self.take() {
                return Ok(conn);
            }
            tokio::select! {
                slot = self.slots.clone().acquire_owned() => {
                    drop(waiting);
                    let slot = slot.expect("the pool's bound is never closed");
                    return self.connect(slot).await;
                }
                () = &mut pooled, if reuse => {}
                () = &mut deadline => {
                    return Err(UpstreamError::Limit {
                        max: self.settings.max_connections,
                        waited: timeout,
                    });
                }
            }
        }
    }

    async fn connect(&self, slot: OwnedSemaphorePermit) -> Result<Conn, UpstreamError> {
        let connect = TcpStream::connect(self.authority.as_str());
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(UpstreamError::Connect(error.to_string())),
            Err(_) => {
                return Err(UpstreamError::Connect(format!(
                    "no connection within {timeout:?}",
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream, slot))
    }

    /// Pools `conn`, unless as many are idle already (then it closes); a request waiting at
    /// the bound is told.
    fn put(&self, mut conn: Conn) {
        conn.rest();
        {
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.len() >= self.settings.max_idle {
                return;
            }
            idle.push(Idle {
                conn,
                since: self.epoch.load(Relaxed),
            });
        }
        if self.waiting.load(Relaxed) > 0 {
            self.pooled.notify_one();
        }
    }

    /// A response has been read whole from `conn`. The connection goes back to the pool if
    /// the response allows it (`keep_alive`), nothing else has arrived, and the request has
    /// been written whole; with the request's body still arriving, once that is forwarded.
    fn finish(self: &Arc<Self>, conn: Conn, forward: Option<Box<Forward>>, keep_alive: bool) {
        match forward.filter(|f| !f.is_done()) {
            Some(forward) => {
                tokio::spawn(self.clone().forward_rest(conn, forward, keep_alive));
            }
            None if keep_alive && conn.read.is_empty() => self.put(conn),
            None => {}
        }
    }

    /// Forwards the rest of a request's body whose response has ended: the client connection
    /// keeps reading it (never as a request of its own), and the upstream connection is
    /// pooled again after it. A body that pauses for `body_pause`, or fails, closes both.
    async fn forward_rest(
        self: Arc<Self>,
        mut conn: Conn,
        mut forward: Box<Forward>,
        keep_alive: bool,
    ) {
        while !forward.is_done() {
            let written = forward.written;
            let step = std::future::poll_fn(|cx| {
                forward.poll_forward(&mut conn, cx)?;
                if forward.is_done() || forward.written != written {
                    Poll::Ready(Ok::<_, ExchangeError>(()))
                } else {
                    Poll::Pending
                }
            });
            if !matches!(
                tokio::time::timeout(self.settings.body_pause, step).await,
                Ok(Ok(()))
            ) {
                return;
            }
        }
        if keep_alive && conn.is_open() {
            self.put(conn);
        }
    }

    /// The response for `head`, its body reading the rest from `conn`. `sent`: the request's
    /// head was written whole, and its body could be (`forward` has the rest).
    fn respond(
        self: &Arc<Self>,
        head: codec::Head,
        mut conn: Conn,
        forward: Option<Box<Forward>>,
        sent: bool,
    ) -> Response<PooledBody> {
        let keep_alive = head.keep_alive && sent;
        // A request body written whole no longer needs forwarding.
        let forward = forward.filter(|f| !f.is_done());
        let body = match head.framing {
            _ if head.status == http::StatusCode::SWITCHING_PROTOCOLS => {
                let unread = conn.read.split().freeze();
                PooledBody(Inner::Upgraded(Box::new(Upgraded {
                    stream: conn.stream,
                    unread,
                    slot: Slot { _permit: conn.slot },
                })))
            }
            Framing::Empty => {
                self.finish(conn, forward, keep_alive);
                PooledBody(Inner::Full(None))
            }
            // Most responses arrive whole with their head: the connection goes back at once.
            Framing::Length(n) if conn.read.len() as u64 >= n => {
                let data = conn.read.split_to(n as usize).freeze();
                self.finish(conn, forward, keep_alive);
                PooledBody(Inner::Full(Some(data)))
            }
            framing => {
                let relayed = forward.is_some();
                let streaming = Box::new(Streaming {
                    conn: Some(conn),
                    framing: match framing {
                        Framing::Length(n) => Reading::Length(n),
                        Framing::Chunked => Reading::Chunked(Chunked::default()),
                        _ => Reading::Close,
                    },
                    forward,
                    keep_alive,
                    pool: self.clone(),
                });
                if relayed {
                    let size = streaming.size_hint();
                    let (frames, receiver) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(relay(streaming, frames));
                    PooledBody(Inner::Relayed(receiver, size))
                } else {
                    PooledBody(Inner::Streaming(streaming))
                }
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head.reason
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
        {
            response.extensions_mut().insert(reason);
        }
        response
    }
}

/// Where an exchange stands until its response head has arrived.
#[derive(Debug)]
struct Exchange {
    /// What the request was, for the response's framing.
    asked: Asked,
    /// Bytes of the request head written so far.
    written: usize,
    /// Writing failed: the head or the body is not all there. A response may still have come.
    write_failed: bool,
    write_error: Option<io::Error>,
    /// Some byte of a response has arrived.
    received: bool,
}

impl Exchange {
    fn new(asked: Asked) -> Self {
        Exchange {
            asked,
            written: 0,
            write_failed: false,
            write_error: None,
            received: false,
        }
    }

    /// Writes what it can of the request, then reads the response head.
    fn poll(
        &mut self,
        conn: &mut Conn,
        forward: Option<&mut Forward>,
        progress: Option<&Progress>,
        spare: &mut HeaderMap,
        cx: &mut Context<'_>,
    ) -> Poll<Result<codec::Head, ExchangeError>> {
        if !self.write_failed
            && let Err(error) = poll_write_request(
                &mut conn.stream,
                &conn.head,
                &mut self.written,
                forward,
                progress,
                cx,
            )
        {
            match error {
                ExchangeError::Io(error) => {
                    // The upstream may have answered before it stopped reading: look first.
                    self.write_failed = true;
                    self.write_error = Some(error);
                }
                error => return Poll::Ready(Err(error)),
            }
        }
        loop {
            if !conn.read.is_empty() {
                self.received = true;
                if let Some(head) = codec::parse_response(&mut conn.read, self.asked, spare)? {
                    return Poll::Ready(Ok(head));
                }
            }
            // A failed write is the first cause of whatever ends the exchange.
            let failed = match conn.poll_read(cx) {
                Poll::Pending if self.write_failed => ExchangeError::Closed,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => ExchangeError::Closed,
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(error)) => ExchangeError::Io(error),
            };
            return Poll::Ready(Err(self
                .write_error
                .take()
                .map_or(failed, ExchangeError::Io)));
        }
    }
}

/// Writes what is left of the request head (`head` from `written` on), then as much of the
/// body as is there and the socket takes; never pending (what it waits for will wake the
/// task).
fn poll_write_request(
    stream: &mut TcpStream,
    head: &[u8],
    written: &mut usize,
    mut forward: Option<&mut Forward>,
    progress: Option<&Progress>,
    cx: &mut Context<'_>,
) -> Result<(), ExchangeError> {
    loop {
        if let Some(forward) = forward.as_deref_mut() {
            forward.fill(cx, progress)?;
        }
        let head = &head[*written..];
        let mut slices = [io::IoSlice::new(&[]); 4];
        slices[0] = io::IoSlice::new(head);
        let count = match forward.as_deref() {
            Some(forward) => 1 + forward.slices(&mut slices[1..]),
            None => 1,
        };
        if slices[..count].iter().all(|s| s.is_empty()) {
            return Ok(());
        }
        let n = match Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count]) {
            Poll::Pending => return Ok(()),
            Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(error)) => return Err(error.into()),
        };
        let from_head = n.min(head.len());
        *written += from_head;
        if let Some(forward) = forward.as_deref_mut() {
            forward.advance(n - from_head);
        }
    }
}

/// A request's body on its way to the upstream, framed: what is taken from the client and
/// not yet written.
#[derive(Debug)]
struct Forward {
    body: Incoming,
    chunked: bool,
    /// The body's end has been taken (and its framing queued).
    ended: bool,
    /// The framing before `data`: a chunk-size line.
    line: Option<ChunkLine>,
    line_at: usize,
    data: Bytes,
    /// The framing after `data`: CRLF after a chunk, the last chunk and the end of the body.
    tail: &'static [u8],
    /// Bytes written so far, framing included.
    written: u64,
    /// For a body of declared length, that length and what it has brought so far: a body
    /// that ends short of it would leave the upstream waiting for the rest, and the next
    /// request on the connection taken for it.
    length: Option<(u64, u64)>,
    /// Told once the body has ended.
    arrived: Option<Arrived>,
}

impl Forward {
    fn new(body: Incoming, framing: RequestFraming, arrived: Option<Arrived>) -> Self {
        Forward {
            body,
            chunked: framing == RequestFraming::Chunked,
            ended: false,
            line: None,
            line_at: 0,
            data: Bytes::new(),
            tail: &[],
            written: 0,
            length: match framing {
                RequestFraming::Length(n) => Some((n, 0)),
                _ => None,
            },
            arrived,
        }
    }

    /// The body has ended (or brought trailers, which are not forwarded): its framing's end
    /// goes out, if it brought what it declared.
    fn end(&mut self) -> Result<(), ExchangeError> {
        self.ended = true;
        if let Some((declared, sent)) = self.length
            && sent != declared
        {
            return Err(ExchangeError::RequestBody(BodyError::Length {
                declared,
                sent,
            }));
        }
        if self.chunked {
            self.tail = b"0\r\n\r\n";
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.line.is_none() && self.data.is_empty() && self.tail.is_empty()
    }

    /// Written whole, end included.
    fn is_done(&self) -> bool {
        self.ended && self.is_empty()
    }

    /// With nothing left to write, takes the body's next frame, if it has one ready.
    fn fill(
        &mut self,
        cx: &mut Context<'_>,
        progress: Option<&Progress>,
    ) -> Result<(), ExchangeError> {
        while self.is_empty() && !self.ended {
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            if let Some(progress) = progress {
                // Its time counts from when the upstream connection first asks for it.
                if polled.is_ready() || progress.last.load(Relaxed) == Progress::UNPOLLED {
                    progress.moved();
                }
                progress.clients_turn.store(polled.is_pending(), Relaxed);
            }
            match polled {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(error))) => {
                    return Err(ExchangeError::RequestBody(BodyError::Client(error)));
                }
                Poll::Ready(None) => self.end()?,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if let Some((declared, sent)) = &mut self.length {
                            *sent += data.len() as u64;
                            if *sent > *declared {
                                let (declared, sent) = (*declared, *sent);
                                return Err(ExchangeError::RequestBody(BodyError::Length {
                                    declared,
                                    sent,
                                }));
                            }
                        }
                        if self.chunked {
                            self.line = Some(ChunkLine::new(data.len()));
                            self.line_at = 0;
                            self.tail = b"\r\n";
                        }
                        self.data = data;
                    }
                    // Trailers end the body. They are not forwarded: nothing declared them
                    // (`Trailer` is dropped as hop-by-hop), and an upstream that merges them
                    // into the head would take `Host` or `X-Forwarded-For` from the client.
                    Err(_) => self.end()?,
                },
            }
        }
        if self.ended
            && let Some(arrived) = self.arrived.take()
        {
            arrived.tell();
        }
        Ok(())
    }

    /// The bytes waiting to be written, in order, into `slices`; how many it used.
    fn slices<'a>(&'a self, slices: &mut [io::IoSlice<'a>]) -> usize {
        let mut used = 0;
        let line = self
            .line
            .as_ref()
            .map_or(&[][..], |l| &l.as_bytes()[self.line_at..]);
        for part in [line, &self.data[..], self.tail] {
            if !part.is_empty() {
                slices[used] = io::IoSlice::new(part);
                used += 1;
            }
        }
        used
    }

    /// `n` bytes of [`Forward::slices`] have been written.
    fn advance(&mut self, mut n: usize) {
        self.written += n as u64;
        if let Some(line) = &self.line {
            let left = line.as_bytes().len() - self.line_at;
            let took = n.min(left);
            self.line_at += took;
            n -= took;
            if took == left {
                self.line = None;
            }
        }
        let took = n.min(self.data.len());
        self.data.advance(took);
        n -= took;
        self.tail = &self.tail[n.min(self.tail.len())..];
    }

    /// Writes what it can of the rest of the body, as the response streams.
    fn poll_forward(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        poll_write_request(&mut conn.stream, &[], &mut 0, Some(self), None, cx)
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
    /// Told once the body has all arrived, by whichever task forwards it.
    arrived: Option<Arrived>,
}

impl Progress {
    const UNPOLLED: u64 = u64::MAX;

    /// A body on its way, telling `arrived` (if given) once it has all arrived.
    pub fn new(arrived: Option<Arrived>) -> Self {
        Progress {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(Progress::UNPOLLED),
            clients_turn: AtomicBool::new(false),
            arrived,
        }
    }

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

/// Where the bodies of one client connection's requests tell that they have all arrived, by
/// whichever task forwards them: the client connection's, or one of the upstream side's own
/// when the response came first. The latest request number told, and a task to wake then.
#[derive(Debug, Default)]
pub struct Arrivals {
    latest: AtomicU64,
    waiting: Mutex<Option<std::task::Waker>>,
}

impl Arrivals {
    /// Whether the body of request `number` has all arrived; if not, `waker` is woken once
    /// it has.
    pub fn poll_arrived(&self, number: u64, waker: &std::task::Waker) -> bool {
        if self.latest.load(Relaxed) >= number {
            return true;
        }
        let mut waiting = self.waiting.lock().expect("arrivals lock");
        if !waiting.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *waiting = Some(waker.clone());
        }
        // Told in between: the waker may have been taken before it was set.
        self.latest.load(Relaxed) >= number
    }
}

/// What the body of one request tells once it has all arrived.
#[derive(Debug, Clone)]
pub struct Arrived {
    arrivals: Arc<Arrivals>,
    number: u64,
}

impl Arrived {
    /// Tells `arrivals` that request `number`'s body has arrived, when it has.
    pub fn new(arrivals: Arc<Arrivals>, number: u64) -> Self {
        Arrived { arrivals, number }
    }

    fn tell(&self) {
        self.arrivals.latest.fetch_max(self.number, Relaxed);
        let waiting = self.arrivals.waiting.lock().expect("arrivals lock").take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// An upstream response's body. Read to the end, it returns its connection to the pool;
/// dropped before, it closes it.
#[derive(Debug)]
pub struct PooledBody(Inner);

#[derive(Debug)]
enum Inner {
    /// The whole body (or none), read with the head; the connection is back in the pool.
    Full(Option<Bytes>),
    /// The body still arriving.
    Streaming(Box<Streaming>),
    /// The body still arriving, read by [`relay`] while the request's body is forwarded, and
    /// its size as the head gave it.
    Relayed(
        tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, ExchangeError>>,
        SizeHint,
    ),
    /// A `101`: the connection is no longer HTTP's.
    Upgraded(Box<Upgraded>),
}

/// An upstream connection switched to another protocol, and the bytes read past the `101`.
#[derive(Debug)]
pub struct Upgraded {
    /// The connection.
    pub stream: TcpStream,
    /// What the upstream sent after the `101`, for the client first.
    pub unread: Bytes,
    /// The connection's place under the pool's bound, to hold until it closes.
    pub slot: Slot,
}

/// An upstream connection's place under the pool's bound on open connections.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// A request waiting at the pool's bound, counted while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl PooledBody {
    /// Whether the body is still arriving from the upstream.
    pub fn is_streaming(&self) -> bool {
        matches!(self.0, Inner::Streaming(_) | Inner::Relayed(..))
    }

    /// The connection, if the response switched protocols.
    pub fn into_upgraded(self) -> Option<Upgraded> {
        match self.0 {
            Inner::Upgraded(upgraded) => Some(*upgraded),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Streaming {
    /// The connection, until the body has ended.
    conn: Option<Conn>,
    framing: Reading,
    /// The rest of the request's body, still being forwarded.
    forward: Option<Box<Forward>>,
    /// The response allows the connection to be reused.
    keep_alive: bool,
    pool: Arc<Upstream>,
}

/// How the rest of a body is read.
#[derive(Debug)]
enum Reading {
    /// This many bytes to go.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes.
    Close,
}

impl Streaming {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        if let Err(error) = self.poll_forward(cx) {
            self.conn = None;
            return Poll::Ready(Some(Err(error)));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let frame = match &mut self.framing {
                Reading::Length(left) if !conn.read.is_empty() => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.read.len());
                    *left -= take as u64;
                    Some(Frame::data(conn.read.split_to(take).freeze()))
                }
                Reading::Length(_) => None,
                Reading::Chunked(chunked) => match chunked.decode(&mut conn.read) {
                    Ok(Decoded::Data(data)) => Some(Frame::data(data)),
                    Ok(Decoded::Trailers(trailers)) => Some(Frame::trailers(trailers)),
                    Ok(Decoded::End) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => None,
                    Err(malformed) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(malformed.into())));
                    }
                },
                Reading::Close if !conn.read.is_empty() => {
                    Some(Frame::data(conn.read.split().freeze()))
                }
                Reading::Close => None,
            };
            if let Some(frame) = frame {
                if self.is_read() {
                    self.finish();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            match ready!(conn.poll_read(cx)) {
                Ok(0) if matches!(self.framing, Reading::Close) => {
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(ExchangeError::Closed)));
                }
                Ok(_) => {}
                Err(error) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
    }

    /// Writes what it can of the rest of the request's body. An upstream that stops reading
    /// it may still have answered whole: the response goes on, and the connection is not
    /// reused. A body that fails on the client's side cuts the response off.
    fn poll_forward(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        let (Some(conn), Some(forward)) = (self.conn.as_mut(), self.forward.as_mut()) else {
            return Ok(());
        };
        match forward.poll_forward(conn, cx) {
            Ok(()) if forward.is_done() => self.forward = None,
            Ok(()) => {}
            Err(ExchangeError::Io(error)) => {
                tracing::debug!(%error, "upstream stopped reading the request's body");
                self.forward = None;
                self.keep_alive = false;
            }
            Err(error) => return Err(error),
        }
        Ok(())
    }

    /// Whether the body has been read to its end.
    fn is_read(&self) -> bool {
        match self.framing {
            Reading::Length(left) => left == 0,
            Reading::Chunked(chunked) => chunked == Chunked::Done,
            Reading::Close => false,
        }
    }

    /// The response has been read whole: the connection goes back to the pool if both
    /// messages ended where they should and nothing else has arrived.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.finish(conn, self.forward.take(), self.keep_alive);
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            Reading::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// Reads a response whose request's body is still being forwarded, handing its frames over
/// one at a time, and goes on forwarding the body while the frame before waits to be taken.
/// Ends with the response, or when the response body is dropped (the client gone).
async fn relay(
    mut streaming: Box<Streaming>,
    frames: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, ExchangeError>>,
) {
    loop {
        let room = {
            let mut reserve = std::pin::pin!(frames.reserve());
            std::future::poll_fn(|cx| {
                if let Err(error) = streaming.poll_forward(cx) {
                    return Poll::Ready(Err(error));
                }
                reserve.as_mut().poll(cx).map(Ok)
            })
            .await
        };
        let (permit, frame) = match room {
            Ok(Ok(permit)) => {
                let frame = std::future::poll_fn(|cx| streaming.poll_frame(cx));
                tokio::select! {
                    frame = frame => (permit, frame),
                    // The client is gone, while the upstream is quiet.
                    () = frames.closed() => return,
                }
            }
            // The client is gone: so is the exchange.
            Ok(Err(_)) => return,
            Err(error) => match frames.reserve().await {
                Ok(permit) => (permit, Some(Err(error))),
                Err(_) => return,
            },
        };
        let Some(frame) = frame else { return };
        let failed = frame.is_err();
        permit.send(frame);
        if failed {
            return;
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        match &mut self.0 {
            Inner::Full(data) => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
            Inner::Streaming(streaming) => streaming.poll_frame(cx),
            Inner::Relayed(frames, _) => frames.poll_recv(cx),
            Inner::Upgraded(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(data) => data.is_none(),
            Inner::Streaming(streaming) => streaming.conn.is_none(),
            Inner::Relayed(..) => false,
            Inner::Upgraded(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Streaming(streaming) => streaming.size_hint(),
            Inner::Relayed(_, size) => *size,
            Inner::Upgraded(_) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests;
