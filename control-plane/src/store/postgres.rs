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
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        MIGRATOR.run(&pool).await?;
        Ok(PgStore { pool })
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
        "SELECT revision, last_sequence, last_hash, last_time FROM head WHERE id = 1 FOR UPDATE"
);
