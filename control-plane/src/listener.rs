//! Accepting connections without letting any client starve the others: at most
//! `max_connections` at once (beyond, new ones wait in the kernel's backlog), a deadline for
//! a connection's first byte (a silent TCP connection is closed, not kept), and an accept
//! loop that backs off on errors such as running out of file descriptors, logging them at a
//! bounded rate, and recovers by itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How many connections, and how long a silent one lives.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; beyond, new ones wait to be accepted.
    pub max_connections: usize,
    /// How long a new connection may stay silent before it is closed (the TLS handshake, for
    /// TLS, has as long again).
    pub first_byte: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            first_byte: Duration::from_secs(10),
        }
    }
}

/// A served connection: the stream, and its place under the connection limit, given back
/// when the connection closes.
#[derive(Debug)]
pub struct Conn<S> {
    stream: S,
    _permit: OwnedSemaphorePermit,
}

/// Accepts on `listener` until `stop` turns true, and yields each connection that sent a
/// byte within the deadline, after `handshake` (which may drop it by returning `None`).
pub fn accept<S, H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
    handshake: H,
) -> ReceiverStream<io::Result<Conn<S>>>
where
    S: Send + 'static,
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = Option<S>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshake = Arc::new(handshake);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|s| *s) => return,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    backoff.failed(&error).await;
                    continue;
                }
            };
            backoff.succeeded();
            let _ = stream.set_nodelay(true);
            let (tx, handshake) = (tx.clone(), handshake.clone());
            tokio::spawn(async move {
                let opened = async {
                    let mut byte = [0u8; 1];
                    match stream.peek(&mut byte).await {
                        Ok(n) if n > 0 => Some(stream),
                        _ => None,
                    }
                };
                let Ok(Some(stream)) = tokio::time::timeout(limits.first_byte, opened).await else {
                    tracing::debug!(%peer, "connection closed: no byte within the deadline");
                    return;
                };
                if let Some(stream) = handshake(stream).await {
                    let _ = tx
                        .send(Ok(Conn {
                            stream,
                            _permit: permit,
                        }))
                        .await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Backs off after failed accepts, from 5 ms doubling to 1 s, and logs them at most once a
/// second with how many there were.
#[derive(Debug)]
struct Backoff {
    delay: Duration,
    failures: u64,
    logged: Option<tokio::time::Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delay: Self::FIRST,
            failures: 0,
            logged: None,
        }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    async fn failed(&mut self, error: &io::Error) {
        self.failures += 1;
        let now = tokio::time::Instant::now();
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            tracing::warn!(%error, failures = self.failures, retry_in = ?self.delay, "accept failing; backing off");
            self.logged = Some(now);
            self.failures = 0;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }
}

impl<S: Connected> Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn listening(
        limits: ConnectionLimits,
    ) -> (
        std::net::SocketAddr,
        ReceiverStream<io::Result<Conn<TcpStream>>>,
        watch::Sender<bool>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let conns = accept(listener, limits, stopped, |s| async move { Some(s) });
        (addr, conns, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_deadline_and_frees_its_slot() {
        let limits = ConnectionLimits {
            max_connections: 1,
            first_byte: Duration::from_secs(10),
        };
        let (addr, mut conns, _stop) = listening(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        talker.write_all(b"x").await.unwrap();
        // The silent one holds the only slot until its deadline; then it is closed and the
        // talker, waiting in the backlog, is served.
        let mut end = [0u8; 1];
        assert_eq!(
            silent.read(&mut end).await.unwrap(),
            0,
            "closed by the server"
        );
        let mut served = conns.next().await.expect("served").unwrap();
        let mut got = [0u8; 1];
        served.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_second_and_resets() {
        let mut backoff = Backoff::default();
        let error = io::Error::from_raw_os_error(24);
        let mut delays = Vec::new();
        for _ in 0..10 {
            delays.push(backoff.delay);
            backoff.failed(&error).await;
        }
        assert_eq!(delays[0], Duration::from_millis(5));
        assert_eq!(delays[1], Duration::from_millis(10));
        assert_eq!(delays[9], Duration::from_secs(1));
        backoff.succeeded();
        assert_eq!(backoff.delay, Duration::from_millis(5));
    }
}
