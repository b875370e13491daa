//! The embedded store: one SQLite file in WAL mode, for one control-plane process.
//!
//! Writes are serialized twice over: by an async mutex inside the process (so tasks queue in
//! order instead of spinning on SQLite's busy handler) and by `BEGIN IMMEDIATE`. A second
//! process on the same file is refused at start by an exclusive lock on a side file.

use std::fs::File;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use super::{
    AuditCursor, AuditEvent, AuditFilter, AuditRow, ConnectError, Head, Planner, PolicyRow,
    RevisionRecord, RevisionRow, StoreError, StoredPolicy, WriteContext, Written, convert,
    like_prefix, write_in,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    write_lock: Mutex<()>,
    /// Validated origin sets, for resolving `set:` references in writes.
    sets: super::origin_sets::SetCache,
    /// Held for the store's lifetime: the exclusive lock that keeps a second process out.
    _process_lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` and migrates it.
    pub async fn connect(url: &str) -> Result<SqliteStore, ConnectError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(ConnectError::Open)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let in_memory = options.get_filename().to_str() == Some(":memory:");
        let process_lock = if in_memory {
            None
        } else {
            Some(lock_file(options.get_filename().to_path_buf())?)
        };
        let pool = SqlitePoolOptions::new()
            // In memory, every connection would be a separate database.
            .max_connections(if in_memory { 1 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(ConnectError::Open)?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            pool,
            write_lock: Mutex::new(()),
            sets: Default::default(),
            _process_lock: process_lock,
        })
    }

    /// The connection pool, for tests and benchmarks that reach into the database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Takes an exclusive advisory lock on `<database>.lock`, so a second control plane on the
/// same file fails at start instead of corrupting the single-writer assumptions.
fn lock_file(db: PathBuf) -> Result<File, ConnectError> {
    let mut path = db.into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ConnectError::Open(sqlx::Error::Io(e)))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => Err(ConnectError::Locked(format!(
            "the SQLite database is in use by another control-plane process (lock {}); SQLite serves one process, use PostgreSQL for several replicas",
            path.display()
        ))),
    }
}

pub(crate) struct SqliteTx<'a> {
    tx: Transaction<'static, Sqlite>,
    _guard: MutexGuard<'a, ()>,
}

impl SqliteStore {
    async fn begin_write(&self) -> Result<SqliteTx<'_>, sqlx::Error> {
        let guard = self.write_lock.lock().await;
        Ok(SqliteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            _guard: guard,
        })
    }
}

// BEGIN IMMEDIATE already holds the write lock when the head row is read.
super::sql::sql_store!(
    SqliteStore,
    SqliteTx<'_>,
    Sqlite,
    lock_head = "SELECT revision, last_sequence, last_hash, last_time FROM head WHERE id = 1",
    notify = ""
);

impl SqliteStore {
    /// Only this process writes the file, and it wakes its own readers.
    async fn follow_changes(&self, _nudges: tokio::sync::mpsc::Sender<super::Nudge>) {}
}
