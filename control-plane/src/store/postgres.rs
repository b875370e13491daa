//! The shared store: PostgreSQL, for any number of control-plane processes on one database.
//!
//! Writers on every process serialize on the `head` row (`SELECT … FOR UPDATE` opens each
//! write transaction), so revisions are never reused and the audit chain never forks.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

use super::{
    AuditCursor, AuditEvent, AuditFilter, AuditRow, ConnectError, Head, Planner, PolicyRow,
    RevisionRecord, RevisionRow, StoreError, StoredPolicy, WriteContext, Written, convert,
    like_prefix, write_in,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Validated origin sets, for resolving `set:` references in writes.
    sets: std::sync::Arc<super::origin_sets::SetCache>,
}

impl PgStore {
    /// Connects to `url` and migrates the database.
    pub async fn connect(url: &str) -> Result<PgStore, ConnectError> {
        let options = PgConnectOptions::from_str(url).map_err(ConnectError::Open)?;
        // One direct attempt first: the pool would retry a refused connection until its
        // acquire timeout, and an unreachable database should be reported at once.
        PgConnection::connect_with(&options)
            .await
            .map_err(ConnectError::Open)?
            .close()
            .await
            .map_err(ConnectError::Open)?;
        // A connection is normally free at once; while the database is away, calls fail with
        // UNAVAILABLE within a few seconds rather than waiting out the caller's deadline.
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore {
            pool,
            sets: Default::default(),
        })
    }

    /// The connection pool, for tests and benchmarks that reach into the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

pub(crate) struct PgTx {
    tx: Transaction<'static, Postgres>,
}

impl PgStore {
    async fn begin_write(&self) -> Result<PgTx, sqlx::Error> {
        Ok(PgTx {
            tx: self.pool.begin().await?,
        })
    }
}

// Every writer, on every replica, queues on the head row.
super::sql::sql_store!(
    PgStore,
    PgTx,
    Postgres,
    lock_head =
        "SELECT revision, last_sequence, last_hash, last_time FROM head WHERE id = 1 FOR UPDATE",
    notify = "SELECT pg_notify('corsair_revisions', $1)"
);

/// The channel every committed revision is announced on.
const CHANNEL: &str = "corsair_revisions";

impl PgStore {
    /// Listens for other processes' commits. Notifications are only a nudge: the reader
    /// always re-reads the tables, and after the listener's connection is lost (when
    /// notifications may have been missed) it asks for a full resync.
    async fn follow_changes(&self, nudges: tokio::sync::mpsc::Sender<super::Nudge>) {
        use super::Nudge;
        let mut backoff = Duration::from_millis(100);
        loop {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                listener = listener => match listener {
                    Ok(l) => l,
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for changes; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
                () = nudges.closed() => return,
            };
            backoff = Duration::from_millis(100);
            // Anything committed before LISTEN took effect is caught by this resync.
            if nudges.send(Nudge::Resync).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    next = listener.try_recv() => next,
                    () = nudges.closed() => return,
                };
                let nudge = match next {
                    Ok(Some(n)) => n.payload().parse().map_or(Nudge::Resync, Nudge::Revision),
                    // The connection dropped and was re-established: notifications may be lost.
                    Ok(None) => {
                        tracing::info!("change listener reconnected; resyncing");
                        Nudge::Resync
                    }
                    Err(error) => {
                        tracing::warn!(%error, "change listener failed; reconnecting");
                        break;
                    }
                };
                if nudges.send(nudge).await.is_err() {
                    return;
                }
            }
        }
    }
}
