//! HTTP/1 client connections that hold no buffers while they wait for their next request.
//!
//! hyper's HTTP/1 server keeps an 8 KiB read buffer and an 8 KiB header write buffer for as
//! long as a connection is open, idle or not: 16 MiB for 1,000 idle keep-alive clients. So a
//! client connection here is served by one hyper connection per busy period instead. When
//! hyper waits for the next request head with no request in flight and nothing left to write,
//! that hyper connection is taken apart ([`UpgradeableConnection::into_parts`]), which frees
//! its buffers. The socket then waits on its own for the next bytes, and a new hyper
//! connection carries on from them, first reading whatever the old one had read but not yet
//! parsed.
//!
//! A hyper connection is not taken apart while it holds the start of a request head: it reads
//! the rest itself, however slowly it comes, within its header timeout. It is kept for the
//! rest of its life once it has read a request with a body, since the response can be
//! complete while the body is still arriving and only hyper knows where the body ends. A
//! request asking to upgrade the connection needs nothing of the kind: hyper hands the
//! connection over in the same poll that flushes a `101` (or a `CONNECT`'s `2xx`), with its
//! reading closed, so it is never found waiting in between; any other answer leaves an
//! ordinary keep-alive connection.
//!
//! A connection whose requests come close together would rebuild hyper's state for each one,
//! which costs about a tenth of the throughput: so one whose last gap between requests was
//! shorter than the busy gap keeps its hyper connection until it has been idle that long.
//!
//! The header timeout runs from the moment the connection opened, and then from the end of
//! each request, across the wait with no hyper connection.
//!
//! A client that closes its connection while a request is in flight has given up on it: the
//! connection ends, and with it the request and its upstream exchange. hyper would find out
//! by reading the socket while the request is in flight, and each such read first makes room
//! for 8 KiB in its read buffer, which the request's head still shares: a fresh buffer for
//! every request. Here hyper does not read then (its half-close setting), and the serving
//! loop watches the socket instead, without a buffer: once hyper's last read left it empty
//! and the request's body has all arrived (told by whichever task forwards it; until then
//! hyper reads the body, and a close is a body cut short), a peek at one byte tells a close
//! from the next request's bytes, which are left for hyper. The watch goes on while the
//! connection shuts down.
//!
//! The connection's timers (hyper's header timeout, and the response timeout of each request
//! it serves) are [`Deadline`]s: they register nothing with tokio's timer, but note their
//! deadline with the connection, and the serving loop keeps one tokio timer at the earliest
//! one; a deadline is past once that timer has fired at it, so polling one reads no clock. A timer per request in tokio's wheel costs a lock and a list insertion to arm it and
//! the same to cancel it, for a timeout that almost never fires. Here the one timer is set
//! again only when it fires, or when a deadline earlier than it is noted: a few times per
//! timeout period, not twice per request. Deadlines count on tokio's clock.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1::{Builder, UpgradeableConnection};
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{ConnectionState, OpenConnection};
use crate::upstream::{Arrivals, Arrived};

/// What the service, the response bodies, the timers and the socket of one client
/// connection tell its serving loop about the current hyper connection.
#[derive(Debug)]
pub struct Exchanges {
    /// The instant the connection's deadlines are counted from.
    epoch: std::time::Instant,
    /// The earliest deadline a [`Deadline`] of the connection waits for, in nanoseconds after
    /// `epoch` (`NO_DEADLINE`: none): the serving loop wakes the connection then.
    due: AtomicU64,
    /// Every deadline up to this one (in nanoseconds after `epoch`) has passed: the serving
    /// loop's timer fired there. A [`Deadline`] asks this instead of reading the clock.
    passed: AtomicU64,
    /// Requests handed to the service, on this client connection.
    started: AtomicU64,
    /// Of those, the ones whose response body hyper has finished with (or dropped).
    finished: AtomicU64,
    /// The current hyper connection has read a request with a body: it serves the connection
    /// to the end.
    kept: AtomicBool,
    /// The current hyper connection has written since it last flushed.
    written: AtomicBool,
    /// Bytes have been read since the last request started: the start of a request head,
    /// most likely, which the hyper connection holding it finishes reading.
    partial: AtomicBool,
    /// hyper's last read went to the socket (and so, most likely, left it empty): whatever
    /// arrives next (the client closing, while a request is in flight) is news, for the
    /// serving loop to look at.
    emptied: AtomicBool,
    /// The request in flight has a body.
    body: AtomicBool,
    /// Where the bodies of requests tell, by number (in `started`), that they have all
    /// arrived, whichever task forwards them.
    arrivals: Arc<Arrivals>,
    /// Whether the current hyper connection waits for bytes with nothing in flight: `ACTIVE`,
    /// `IDLE`, or `NOTED` (idle, and the serving loop knows).
    idle: AtomicU8,
}

const ACTIVE: u8 = 0;
const IDLE: u8 = 1;
const NOTED: u8 = 2;

/// No deadline noted.
const NO_DEADLINE: u64 = u64::MAX;

impl Default for Exchanges {
    fn default() -> Self {
        Exchanges {
            epoch: Instant::now().into_std(),
            due: AtomicU64::new(NO_DEADLINE),
            passed: AtomicU64::default(),
            started: AtomicU64::default(),
            finished: AtomicU64::default(),
            kept: AtomicBool::default(),
            written: AtomicBool::default(),
            partial: AtomicBool::default(),
            emptied: AtomicBool::default(),
            body: AtomicBool::default(),
            arrivals: Arc::default(),
            idle: AtomicU8::default(),
        }
    }
}

impl Exchanges {
    /// A timer of this connection that is ready at `at` (on tokio's clock): for futures the
    /// connection's own task polls (hyper's HTTP/1 server polls the service's futures in
    /// it). The connection must be served by [`serve`], which wakes it when a deadline is
    /// due.
    pub fn deadline(self: &Arc<Self>, at: std::time::Instant) -> Deadline {
        Deadline {
            nanos: self.nanos(at),
            exchanges: self.clone(),
        }
    }

    fn nanos(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Called as the service is called with `request`, before hyper reads on: the returned
    /// guard, carried by the response body, marks the exchange finished when dropped.
    pub fn start(self: &Arc<Self>, request: &http::Request<Incoming>) -> Exchange {
        self.started.fetch_add(1, Relaxed);
        let body = !request.body().is_end_stream();
        if body {
            self.kept.store(true, Relaxed);
        }
        self.body.store(body, Relaxed);
        self.partial.store(false, Relaxed);
        self.idle.store(ACTIVE, Relaxed);
        Exchange(self.clone())
    }

    /// The hyper connection could be taken apart: no request in flight or being written,
    /// none that keeps it, and no request head begun.
    fn settled(&self) -> bool {
        self.started.load(Relaxed) == self.finished.load(Relaxed)
            && !self.kept.load(Relaxed)
            && !self.written.load(Relaxed)
            && !self.partial.load(Relaxed)
    }

    /// The requests handed to the service so far, and how many of them are still in flight.
    pub(crate) fn in_flight(&self) -> (u64, u64) {
        let finished = self.finished.load(Relaxed);
        let started = self.started.load(Relaxed);
        (started, started.saturating_sub(finished))
    }

    /// For the body of the request in flight: what it tells once it has all arrived.
    pub fn arrived(&self) -> Arrived {
        Arrived::new(self.arrivals.clone(), self.started.load(Relaxed))
    }

    /// hyper read bytes (or the end of the stream).
    fn read(&self) {
        self.partial.store(true, Relaxed);
        self.idle.store(ACTIVE, Relaxed);
    }

    /// The socket had nothing to read for hyper.
    fn waiting(&self) {
        if self.idle.load(Relaxed) == ACTIVE && self.settled() {
            self.idle.store(IDLE, Relaxed);
        }
    }

    /// A request is in flight, with its body (if it has one) all arrived, and the socket was
    /// left empty: the serving loop watches it for the client closing. While a body arrives,
    /// hyper reads the socket itself, and a client closing then is a body cut short. If the
    /// body is what is missing, `cx` is woken once it has arrived, which another task may
    /// tell.
    fn watched(&self, cx: &Context<'_>) -> bool {
        let started = self.started.load(Relaxed);
        self.emptied.load(Relaxed)
            && started != self.finished.load(Relaxed)
            && (!self.body.load(Relaxed) || self.arrivals.poll_arrived(started, cx.waker()))
    }

    /// True, once, when the hyper connection has gone idle since it was last active.
    fn note_idle(&self) -> bool {
        let idle = self.idle.load(Relaxed) == IDLE;
        if idle {
            self.idle.store(NOTED, Relaxed);
        }
        idle
    }
}

/// A timer of one client connection, ready once the serving loop's timer has fired at or
/// after its deadline (see the module's documentation). It is polled only from the
/// connection's task, and it wakes that task through the serving loop's timer, not by a
/// waker of its own.
#[derive(Debug)]
pub struct Deadline {
    /// The deadline, in nanoseconds after the connection's epoch.
    nanos: u64,
    exchanges: Arc<Exchanges>,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        // No clock read: the serving loop records how far its timer has come.
        if self.nanos <= self.exchanges.passed.load(Relaxed) {
            return Poll::Ready(());
        }
        self.exchanges.due.fetch_min(self.nanos, Relaxed);
        Poll::Pending
    }
}

impl hyper::rt::Sleep for Deadline {}

/// The timer hyper is given for a connection served by [`serve`]: its sleeps are
/// [`Deadline`]s of the connection.
#[derive(Debug, Clone)]
struct ConnectionTimer(Arc<Exchanges>);

impl hyper::rt::Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.deadline(deadline))
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// The one tokio timer of a connection, at the earliest deadline its [`Deadline`]s noted.
struct Wake {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Where `sleep` is set, in nanoseconds after the connection's epoch (`NO_DEADLINE`:
    /// unset, or fired).
    armed: u64,
}

impl Wake {
    fn new() -> Self {
        Wake {
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: NO_DEADLINE,
        }
    }

    /// Polls `connection`, and, until it is ready, also the timer, so that the connection is
    /// polled again, with all its timers, once the earliest deadline it noted is due.
    /// Deadlines noted later than the timer do not move it: when it fires, the noted
    /// deadlines are forgotten, and those still waiting note themselves again.
    fn poll<C: Future + Unpin>(
        &mut self,
        connection: &mut C,
        exchanges: &Exchanges,
        cx: &mut Context<'_>,
    ) -> Poll<C::Output> {
        loop {
            if let Poll::Ready(ended) = Pin::new(&mut *connection).poll(cx) {
                return Poll::Ready(ended);
            }
            let due = exchanges.due.load(Relaxed);
            if due >= self.armed {
                // Polled when it was set, the timer wakes this task when it fires: until then
                // there is nothing to poll it for.
                if self.armed == NO_DEADLINE || !self.sleep.is_elapsed() {
                    return Poll::Pending;
                }
            } else {
                let at = exchanges.epoch + Duration::from_nanos(due);
                self.sleep.as_mut().reset(at.into());
                self.armed = due;
                // Outside tokio's budget: a poll refused for an exhausted budget would not
                // register this task to be woken, and nothing polls the timer again.
                let sleep = tokio::task::unconstrained(self.sleep.as_mut());
                if std::pin::pin!(sleep).poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Due: forget the noted deadlines and poll the connection again, so that the
            // timers whose deadline has passed fire and the others note theirs again.
            exchanges.passed.fetch_max(self.armed, Relaxed);
            self.armed = NO_DEADLINE;
            exchanges.due.store(NO_DEADLINE, Relaxed);
        }
    }
}

/// One request on its way through; finished when dropped.
#[derive(Debug)]
pub struct Exchange(Arc<Exchanges>);

impl Exchange {
    /// The connection the request came on.
    pub fn connection(&self) -> &Arc<Exchanges> {
        &self.0
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Relaxed);
    }
}

/// A response body that finishes its [`Exchange`] when hyper drops it, which hyper does once
/// it has taken the last frame (or given up on the body).
#[derive(Debug)]
pub struct Finishing<B> {
    body: B,
    _exchange: Exchange,
}

impl<B> Finishing<B> {
    /// `body`, finishing `exchange` when dropped.
    pub fn new(body: B, exchange: Exchange) -> Self {
        Finishing {
            body,
            _exchange: exchange,
        }
    }
}

impl<B: Body + Unpin> Body for Finishing<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket as hyper sees it: bytes carried over from the previous hyper connection
/// first, and every read that finds nothing and every write reported to [`Exchanges`].
#[derive(Debug)]
struct Io {
    stream: TokioIo<Shared>,
    unparsed: Bytes,
    exchanges: Arc<Exchanges>,
}

impl Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unparsed.is_empty() {
            let n = this.unparsed.len().min(buf.remaining());
            buf.put_slice(&this.unparsed[..n]);
            this.unparsed.advance(n);
            this.exchanges.read();
            return Poll::Ready(Ok(()));
        }
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        // Even a read that filled the buffer has most likely emptied the socket; if not, the
        // serving loop's one peek finds the bytes and leaves them to hyper.
        this.exchanges.emptied.store(true, Relaxed);
        if read.is_pending() {
            this.exchanges.waiting();
        } else {
            this.exchanges.read();
        }
        read
    }
}

impl Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.exchanges.written.store(true, Relaxed);
        this.exchanges.idle.store(ACTIVE, Relaxed);
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.exchanges.written.store(true, Relaxed);
        this.exchanges.idle.store(ACTIVE, Relaxed);
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper flushes the socket only once its own write buffer is empty.
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            this.exchanges.written.store(false, Relaxed);
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The client socket, shared by hyper's connection, which reads and writes it, and the
/// serving loop, which watches it while hyper does not read. It reads and writes as tokio's
/// own socket does, through a shared reference.
#[derive(Debug)]
struct Shared(Arc<TcpStream>);

impl AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &*self.0;
        let asked = buf.remaining();
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let mut read = None;
            let result = stream.try_io(Interest::READABLE, || {
                let n = stream.try_read_buf(buf)?;
                read = Some(n);
                // A read short of the buffer has emptied the socket (with epoll, which Linux
                // has): so the readiness is cleared (`WouldBlock` tells `try_io` to), and the
                // next read waits for new bytes instead of finding none with a syscall.
                if 0 < n && n < asked {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            if read.is_some() {
                return Poll::Ready(Ok(()));
            }
            match result {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
                Ok(()) => unreachable!("a read that succeeded counted its bytes"),
            }
        }
    }
}

impl Shared {
    /// Writes with `write` once the socket is writable.
    fn send(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }
}

impl AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.send(cx, |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.send(cx, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // As tokio's own: a peer already gone is shut down.
        match SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write) {
            Err(error) if error.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            shut => Poll::Ready(shut),
        }
    }
}

/// Ready once the client has closed `stream` (or it failed) while it is watched
/// ([`Exchanges::watched`]), looking without reading. Bytes found waiting instead are hyper's
/// to read: the watch stops until hyper has read.
fn poll_gone(stream: &TcpStream, exchanges: &Exchanges, cx: &mut Context<'_>) -> Poll<()> {
    if !exchanges.watched(cx) {
        return Poll::Pending;
    }
    let mut byte = [std::mem::MaybeUninit::uninit()];
    match ready!(stream.poll_peek(cx, &mut ReadBuf::uninit(&mut byte))) {
        Ok(1..) => {
            exchanges.emptied.store(false, Relaxed);
            Poll::Pending
        }
        Ok(0) | Err(_) => Poll::Ready(()),
    }
}

/// Serves the HTTP/1 client on `stream` until it closes, times out or, once `stop` turns
/// true, has finished its in-flight requests. `opened` is when the connection was accepted;
/// `header_timeout` is how long a client may take to send a request head, counted from then
/// and from the end of each request. A connection whose last gap between requests was
/// shorter than `busy_gap` gives back its buffers once idle that long, any other at once.
/// `exchanges` must be the one `service` reports to.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, B>(
    stream: TcpStream,
    service: S,
    exchanges: Arc<Exchanges>,
    opened: Instant,
    header_timeout: Duration,
    busy_gap: Duration,
    stop: watch::Receiver<bool>,
    mut open: OpenConnection,
) -> Result<(), hyper::Error>
where
    S: HttpService<Incoming, ResBody = B> + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send,
    B: Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = Arc::new(stream);
    let mut io = Io {
        stream: TokioIo::new(Shared(stream.clone())),
        unparsed: Bytes::new(),
        exchanges: exchanges.clone(),
    };
    let mut service = service;
    let mut stop = Stopped::new(stop);
    // The deadline for the next request head: from the connection's start, then from the end
    // of each request. hyper enforces `header_timeout` for each head it reads itself; this
    // covers the time the connection waited on its own before.
    let mut deadline = opened + header_timeout;
    let mut first_head = Lazy::new(deadline);
    // One timer, for the deadline while the connection waits on its own, and for `busy_gap`
    // while a busy connection's hyper connection is idle. It is moved lazily, when it fires,
    // so a busy connection does not touch it for each request.
    let mut timer = Lazy::new(deadline);
    // Whether the last gap between requests was shorter than `busy_gap`.
    let mut busy = false;
    let mut requests = 0;
    let mut wake = Wake::new();
    loop {
        if Instant::now() >= deadline {
            return Ok(());
        }
        let mut connection: UpgradeableConnection<Io, S> = Builder::new()
            .timer(ConnectionTimer(exchanges.clone()))
            .header_read_timeout(header_timeout)
            // Not reading while a request is in flight: the loop below watches for the
            // client closing instead.
            .half_close(true)
            .serve_connection(io, service)
            .with_upgrades();
        exchanges.kept.store(false, Relaxed);
        exchanges.written.store(false, Relaxed);
        exchanges.idle.store(ACTIVE, Relaxed);
        open.set(ConnectionState::Serving);
        first_head.reset(deadline);
        let before = exchanges.started.load(Relaxed);
        // When the hyper connection last went idle, and the requests started by then.
        let mut idle_since = None;
        // The connection has just been polled and found idle, in this same poll of the task:
        // its wakers are set, and polling it again before it is woken would repeat the work
        // of a whole poll of hyper's connection for each request.
        let mut polled = false;
        loop {
            let headless = exchanges.started.load(Relaxed) == before;
            tokio::select! {
                // The connection first: it is what wakes the task nearly every time.
                biased;
                ended = poll_fn(|cx| {
                    if std::mem::take(&mut polled) {
                        return Poll::Pending;
                    }
                    match wake.poll(&mut connection, &exchanges, cx) {
                        Poll::Ready(ended) => Poll::Ready(Some(ended)),
                        Poll::Pending if exchanges.note_idle() => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                }) => {
                    if let Some(ended) = ended {
                        return ended;
                    }
                    if !busy {
                        break;
                    }
                    // Busy: let it be, and look again once it could have been idle for
                    // `busy_gap`.
                    let now = Instant::now();
                    let watching = idle_since.is_some();
                    idle_since = Some((now, exchanges.started.load(Relaxed)));
                    if !watching || timer.is_elapsed() || timer.deadline() > now + busy_gap {
                        timer.reset(now + busy_gap);
                    }
                    polled = true;
                }
                () = &mut timer, if idle_since.is_some() => {
                    let (since, started) = idle_since.expect("checked by the branch");
                    if exchanges.started.load(Relaxed) != started || !exchanges.settled() {
                        idle_since = None;
                    } else if since.elapsed() >= busy_gap {
                        break;
                    } else {
                        timer.reset(since + busy_gap);
                    }
                }
                // Asked at each poll, after the connection's: polling the connection is what
                // starts and finishes requests.
                () = poll_fn(|cx| poll_gone(&stream, &exchanges, cx)) => {
                    // Given up on: the request, and its upstream exchange, go with the
                    // connection.
                    return Ok(());
                }
                () = &mut first_head, if headless => {
                    // Past the deadline with no request head read on this hyper connection.
                    if exchanges.started.load(Relaxed) == before {
                        return Ok(());
                    }
                }
                () = &mut stop => {
                    Pin::new(&mut connection).graceful_shutdown();
                    // In-flight requests finish, unless their clients give up on them.
                    return poll_fn(|cx| {
                        if let Poll::Ready(ended) = wake.poll(&mut connection, &exchanges, cx) {
                            return Poll::Ready(ended);
                        }
                        poll_gone(&stream, &exchanges, cx).map(Ok)
                    })
                    .await;
                }
            }
        }
        // Idle: take the hyper connection apart, freeing its buffers.
        let Some(parts) = connection.into_parts() else {
            return Ok(());
        };
        io = parts.io;
        service = parts.service;
        if !parts.read_buf.is_empty() {
            // The start of a pipelined request's head, read along with the previous request:
            // a copy, so hyper's whole buffer is freed.
            io.unparsed = Bytes::copy_from_slice(&parts.read_buf);
        }
        drop(parts.read_buf);
        let idle_start = idle_since.map_or_else(Instant::now, |(since, _)| since);
        let started = exchanges.started.load(Relaxed);
        if started != requests {
            requests = started;
            deadline = idle_start + header_timeout;
        }
        open.set(ConnectionState::Idle);
        if timer.is_elapsed() || timer.deadline() > deadline {
            timer.reset(deadline);
        }
        loop {
            tokio::select! {
                ready = stream.readable() => {
                    if ready.is_err() {
                        return Ok(());
                    }
                    break;
                }
                () = &mut timer => {
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                    timer.reset(deadline);
                }
                () = &mut stop => return Ok(()),
            }
        }
        busy = idle_start.elapsed() < busy_gap;
    }
}

/// A tokio timer, for a future polled at every wake of its task: after the poll that
/// registers the task's waker with it (the first after each reset), it is polled again only
/// once it has fired (one load), not through tokio's timer entry every time.
pub(crate) struct Lazy {
    sleep: Pin<Box<tokio::time::Sleep>>,
    registered: bool,
}

impl Lazy {
    pub(crate) fn new(at: Instant) -> Self {
        Lazy {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            registered: false,
        }
    }

    pub(crate) fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.registered = false;
    }

    fn is_elapsed(&self) -> bool {
        self.sleep.is_elapsed()
    }

    fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }
}

impl Future for Lazy {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        self.registered = true;
        // Outside tokio's budget, so that the poll surely registers the waker.
        let sleep = tokio::task::unconstrained(self.sleep.as_mut());
        std::pin::pin!(sleep).poll(cx)
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// [`stopped`], for a future polled at every wake of its task: after its first poll, which
/// registers the task's waker with the channel, it polls the channel again only once the
/// channel's version has moved (one atomic load), not its waiter list (a lock) every time.
pub(crate) struct Stopped {
    changes: watch::Receiver<bool>,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stopped {
    pub(crate) fn new(stop: watch::Receiver<bool>) -> Self {
        Stopped {
            changes: stop.clone(),
            wait: Box::pin(stopped(stop)),
            registered: false,
        }
    }
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.registered && matches!(self.changes.has_changed(), Ok(false)) {
            return Poll::Pending;
        }
        self.registered = true;
        // Outside tokio's budget, so that the first poll surely registers the waker.
        let wait = tokio::task::unconstrained(self.wait.as_mut());
        std::pin::pin!(wait).poll(cx)
    }
}
