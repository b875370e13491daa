//! The accept loop's bounds: at most so many client connections open at once, and a listener
//! that fails (out of file descriptors, most often) backs off instead of spinning.
//!
//! At the connection limit the listener stops accepting: new connections wait in the kernel's
//! listen backlog (past it, the kernel drops their SYNs and clients retry) until an open one
//! closes. A failed accept sleeps 5 ms, doubling up to 1 s, and is logged at most once a second
//! with the number of failures since the line before; the first accept that works resets both.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The first pause after a failed accept, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// At most one line per this long about failed accepts, or about the connection limit.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A connection's place under the limit, held for as long as the connection (or the tunnel
/// it became) is open.
#[derive(Debug)]
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

/// A listener that accepts within its bounds.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    /// What it is, for its log lines (`proxy`, `admin`).
    name: &'static str,
    /// Places for open connections; `None`: no limit.
    slots: Option<Arc<Semaphore>>,
    limit: usize,
    metrics: Arc<Metrics>,
    backoff: Duration,
    /// Failed accepts not yet logged, and when the last line about them was.
    unlogged: u64,
    failures: u64,
    logged: Option<Instant>,
    /// When the last line about the connection limit was.
    limit_logged: Option<Instant>,
}

impl Listener {
    /// `listener`, with at most `max_connections` accepted connections open at once (`None`:
    /// no limit); failures and waits are counted in `metrics`.
    pub fn new(
        listener: TcpListener,
        name: &'static str,
        max_connections: Option<usize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limit = max_connections.unwrap_or(0);
        Listener {
            listener,
            name,
            slots: max_connections.map(|n| Arc::new(Semaphore::new(n))),
            limit,
            metrics,
            backoff: BACKOFF_MIN,
            unlogged: 0,
            failures: 0,
            logged: None,
            limit_logged: None,
        }
    }

    /// The next connection, once there is room for it. Cancel-safe.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Slot) {
        loop {
            let permit = match &self.slots {
                None => None,
                Some(slots) => Some(match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        self.metrics.connection_limit_reached();
                        let now = Instant::now();
                        if self.limit_logged.is_none_or(|at| now - at >= LOG_EVERY) {
                            self.limit_logged = Some(now);
                            tracing::warn!(
                                listener = self.name,
                                limit = self.limit,
                                "connection limit reached: new connections wait in the backlog"
                            );
                        }
                        slots
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("the connection limit is never closed")
                    }
                }),
            };
            let slot = Slot { _permit: permit };
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.name,
                            failures = self.failures,
                            "accepting connections again"
                        );
                        self.failures = 0;
                        self.unlogged = 0;
                        self.backoff = BACKOFF_MIN;
                    }
                    return (stream, peer, slot);
                }
                Err(error) if is_per_connection(&error) => {
                    tracing::debug!(listener = self.name, %error, "accept failed for one connection");
                }
                Err(error) => {
                    drop(slot);
                    self.metrics.accept_failed();
                    self.failures += 1;
                    self.unlogged += 1;
                    let now = Instant::now();
                    if self.logged.is_none_or(|at| now - at >= LOG_EVERY) {
                        self.logged = Some(now);
                        tracing::warn!(
                            listener = self.name,
                            %error,
                            failures = self.unlogged,
                            backoff = ?self.backoff,
                            "accept failed; backing off"
                        );
                        self.unlogged = 0;
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Whether `error` concerns only the connection being accepted (it was reset before it could
/// be taken, say), so the next accept may work at once: the errors accept(2) says to retry,
/// and an interrupted call. Anything else (no descriptors or memory left, most often) would
/// fail again at once.
fn is_per_connection(error: &io::Error) -> bool {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) {
        return true;
    }
    Errno::from_io_error(error).is_some_and(|errno| {
        [
            Errno::PROTO,
            Errno::PERM,
            Errno::NETDOWN,
            Errno::NOPROTOOPT,
            Errno::HOSTDOWN,
            Errno::NONET,
            Errno::HOSTUNREACH,
            Errno::OPNOTSUPP,
            Errno::NETUNREACH,
        ]
        .contains(&errno)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_and_per_connection_ones_do_not() {
        for errno in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM] {
            let error = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(!is_per_connection(&error), "{error}");
        }
        for errno in [
            Errno::CONNABORTED,
            Errno::PROTO,
            Errno::INTR,
            Errno::NETUNREACH,
        ] {
            let error = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(is_per_connection(&error), "{error}");
        }
    }
}
