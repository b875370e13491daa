//! HTTP/2 client connections and their deadlines, which hyper does not keep: a connection
//! must bring its first request within the header timeout, and one with no stream open for the
//! idle timeout is shut down (within a quarter more).
//!
//! Shutting down sends `GOAWAY`, and hyper then waits for the client to acknowledge a `PING`
//! before it closes; a client that never does, or that stopped in the middle of a header block
//! (h2 waits for its `CONTINUATION` frames, and calls the service for nothing until then), is
//! closed once the header timeout has passed again with no stream open.
//!
//! Streams are counted by the connection's [`Exchanges`], which every request touches anyway;
//! the clock is read only when the connection's one timer fires, a few times per idle timeout,
//! never per request.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::http1::{Exchanges, Lazy, Stopped};

/// How long an HTTP/2 connection may wait for what is expected of it.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From the connection's start to its first request; and, once it is shut down, for the
    /// client to close it after its streams have ended.
    pub header: Duration,
    /// With no stream open, until the connection is shut down.
    pub idle: Duration,
}

/// Serves the HTTP/2 `connection` to its end, shutting it down (`graceful`) when a deadline
/// passes or `stop` turns true, and dropping it if the client does not close it after that.
/// `opened` is when the connection was accepted; `exchanges` counts its streams.
pub async fn serve<C>(
    connection: C,
    graceful: impl Fn(Pin<&mut C>),
    exchanges: &Exchanges,
    opened: Instant,
    deadlines: Deadlines,
    stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    let mut stop = Stopped::new(stop);
    let first_request_due = opened + deadlines.header;
    // The first look comes early enough for an idle timeout shorter than the header timeout.
    let mut timer = Lazy::new(opened + deadlines.header.min(deadlines.idle / 4));
    // The requests started at the last look, and whether none was in flight then.
    let mut seen = 0;
    let mut quiet = false;
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            ended = connection.as_mut() => return ended,
            () = &mut timer => {
                let now = Instant::now();
                let (started, in_flight) = exchanges.in_flight();
                let next = if closing {
                    if in_flight == 0 {
                        tracing::debug!("HTTP/2 connection not closed by its client after GOAWAY: dropped");
                        return Ok(());
                    }
                    now + deadlines.header
                } else if started == 0 && now < first_request_due {
                    first_request_due
                } else if started == 0 {
                    tracing::debug!("no HTTP/2 request within the header timeout: shutting down");
                    graceful(connection.as_mut());
                    closing = true;
                    now + deadlines.header
                } else if in_flight > 0 || started != seen {
                    seen = started;
                    quiet = false;
                    now + deadlines.idle / 4
                } else if quiet {
                    tracing::debug!(idle = ?deadlines.idle, "HTTP/2 connection idle: shutting down");
                    graceful(connection.as_mut());
                    closing = true;
                    now + deadlines.header
                } else {
                    quiet = true;
                    now + deadlines.idle
                };
                timer.reset(next);
            }
            () = &mut stop, if !closing => {
                graceful(connection.as_mut());
                closing = true;
                timer.reset(Instant::now() + deadlines.header);
            }
        }
    }
}
