//! Storage: the [`Store`] trait and its two implementations, [`sqlite::SqliteStore`] (the
//! embedded default) and [`postgres::PgStore`] (several control planes on one database).
//!
//! Every write goes through [`Store::write`]: in one transaction it locks the single `head`
//! row (global revision counter and audit-chain head), reads the service's current policy,
//! asks the caller's [`Plan`] what to do with it, writes the change and its audit event, and
//! moves the head. A refused write is recorded the same way, without the change. So there is
//! never a change without its audit event, writers are serialized (no lost update, no reused
//! revision, no forked chain), and a failure anywhere leaves nothing behind.

pub mod origin_sets;
pub mod postgres;
mod refusal;
mod sql;
pub mod sqlite;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use corsair_policy::{PolicySpec, SetLookup};

use crate::audit;

use origin_sets::{ReferrerRows, SetCache, SetRevisionRow, SetRow};
pub use origin_sets::{
    ResolvedSets, SetPlan, SetPlanner, SetRevisionRecord, SetWritten, StoredSet,
};
pub use refusal::{ResourceKind, WriteError};

/// A policy as stored: the canonical spec and its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The canonical spec.
    pub spec: PolicySpec,
    /// The global revision that last changed it.
    pub revision: i64,
    /// When the policy was created (Unix microseconds).
    pub create_time: i64,
    /// When it last changed (Unix microseconds).
    pub update_time: i64,
    /// Who last changed it.
    pub update_actor: String,
}

impl StoredPolicy {
    /// The policy's etag: opaque to clients, different for every revision.
    pub fn etag(&self) -> String {
        etag(&self.spec.service, self.revision)
    }
}

/// The etag of a service's policy at a revision.
pub fn etag(service: &str, revision: i64) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{service}\0{revision}"));
    format!("\"{}\"", hex::encode(&digest[..8]))
}

/// One committed change of a service's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionRecord {
    /// The global revision the change took.
    pub revision: i64,
    /// The service.
    pub service: String,
    /// The policy after the change; `None` when the change deleted it.
    pub spec: Option<PolicySpec>,
    /// When (Unix microseconds).
    pub time: i64,
    /// Who.
    pub actor: String,
    /// Why, as the caller wrote it.
    pub reason: String,
    /// The audit event that records the change.
    pub audit_sequence: u64,
}

/// How a write ended, as the audit log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Committed.
    Ok,
    /// Refused: the policy is invalid.
    Invalid,
    /// Refused: stale etag.
    Conflict,
    /// Refused: no such policy or revision.
    NotFound,
    /// Refused: the policy exists already.
    AlreadyExists,
    /// Refused: a risk was not acknowledged.
    RiskNotAcknowledged,
    /// Refused: the caller may not do this.
    Denied,
    /// Refused: the request is not acceptable in the current state.
    FailedPrecondition,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Invalid,
        Outcome::Conflict,
        Outcome::NotFound,
        Outcome::AlreadyExists,
        Outcome::RiskNotAcknowledged,
        Outcome::Denied,
        Outcome::FailedPrecondition,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Invalid => "INVALID",
            Outcome::Conflict => "CONFLICT",
            Outcome::NotFound => "NOT_FOUND",
            Outcome::AlreadyExists => "ALREADY_EXISTS",
            Outcome::RiskNotAcknowledged => "RISK_NOT_ACKNOWLEDGED",
            Outcome::Denied => "DENIED",
            Outcome::FailedPrecondition => "FAILED_PRECONDITION",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Position in the log, from 1, without gaps.
    pub sequence: u64,
    /// When (Unix microseconds); never less than the previous event's.
    pub time: i64,
    /// The principal that made the call.
    pub actor: String,
    /// The full gRPC method, `corsair.v1.PolicyService/UpdatePolicy`.
    pub method: String,
    /// The service whose policy the call was about.
    pub service: String,
    /// The revision the change took; 0 when nothing changed.
    pub revision: i64,
    /// The policy before (JSON of the canonical spec), if there was one.
    pub before: Option<String>,
    /// The policy after (JSON), if the call committed one.
    pub after: Option<String>,
    /// The fields that changed.
    pub changed_fields: Vec<String>,
    /// The caller's reason.
    pub reason: String,
    /// The request id (`x-request-id` when the caller sent one).
    pub request_id: String,
    /// The caller's address.
    pub peer: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was refused, if it was.
    pub error: String,
    /// The previous event's hash (zeros before the first event).
    pub prev_hash: Vec<u8>,
    /// SHA-256 of `prev_hash` and this event's canonical encoding.
    pub hash: Vec<u8>,
    /// For an origin set write, the set's name (then `service` is empty, and `before` and
    /// `after` hold the set's JSON); empty otherwise.
    pub origin_set: String,
    /// For an origin set write, the services whose effective policy it changed.
    pub affected_services: Vec<String>,
}

impl AuditEvent {
    /// About how many bytes the event takes: its text and its policies.
    pub fn approximate_size(&self) -> usize {
        let text = [
            &self.actor,
            &self.method,
            &self.service,
            &self.reason,
            &self.request_id,
            &self.peer,
            &self.error,
        ];
        text.iter().map(|t| t.len()).sum::<usize>()
            + self.before.as_ref().map_or(0, String::len)
            + self.after.as_ref().map_or(0, String::len)
            + self.changed_fields.iter().map(String::len).sum::<usize>()
            + self.origin_set.len()
            + self
                .affected_services
                .iter()
                .map(|s| s.len() + 1)
                .sum::<usize>()
            + 128
    }
}

/// The most bytes each text of an audit event stores; longer text is cut, marked with `…`.
pub mod caps {
    /// The actor.
    pub const ACTOR: usize = 256;
    /// The method.
    pub const METHOD: usize = 256;
    /// The service.
    pub const SERVICE: usize = 256;
    /// The caller's reason; a longer one is refused before it is written.
    pub const REASON: usize = 1024;
    /// The request id.
    pub const REQUEST_ID: usize = 128;
    /// The peer's address.
    pub const PEER: usize = 64;
    /// The error of a refusal.
    pub const ERROR: usize = 4096;
}

/// `text` cut to at most `max` bytes (on a character boundary), marked with `…` when cut.
pub fn capped(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Who is writing, and why: everything the audit event records besides the change.
#[derive(Debug, Clone, Default)]
pub struct WriteContext {
    /// The principal.
    pub actor: String,
    /// The full gRPC method.
    pub method: String,
    /// The service written.
    pub service: String,
    /// The caller's reason.
    pub reason: String,
    /// The request id.
    pub request_id: String,
    /// The caller's address.
    pub peer: String,
}

/// What a write does, decided from the service's current policy while it is locked.
#[derive(Debug)]
pub enum Plan {
    /// Store this spec as the service's policy.
    Put(PolicySpec),
    /// Delete the service's policy.
    Delete,
    /// Change nothing; record the refusal.
    Refuse(WriteError),
    /// Store a new access token. With `only_if_first`, only if no token exists yet (the
    /// bootstrap admin token), otherwise refused with `AlreadyExists`.
    PutToken {
        /// The token.
        token: TokenRecord,
        /// Whether this is the first-start token.
        only_if_first: bool,
    },
    /// Revoke a token at the write's time; refused with `NotFound` if no live token has
    /// this id.
    RevokeToken(String),
}

/// An access token as stored: never the token itself, only its SHA-256.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRecord {
    /// The first 16 hex digits of the token's SHA-256: its public handle.
    pub id: String,
    /// A name for people (`ci-deploy`, `alice`); the actor of its calls.
    pub name: String,
    /// `viewer`, `editor`, `auditor`, `admin` or `sidecar`.
    pub role: String,
    /// For the `sidecar` role, the services it may stream, comma-separated.
    pub services: String,
    /// SHA-256 of the token.
    pub secret_hash: Vec<u8>,
    /// When it was created (Unix microseconds).
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// When it stops working, if ever.
    pub expires_at: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

impl fmt::Debug for TokenRecord {
    /// Everything but the hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("role", &self.role)
            .field("services", &self.services)
            .field("created_at", &self.created_at)
            .field("created_by", &self.created_by)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .finish_non_exhaustive()
    }
}

/// Decides a [`Plan`] from the current policy (`None`: the service has none) and the origin
/// sets as the write's transaction sees them.
pub type Planner = Box<dyn FnOnce(Option<&StoredPolicy>, SetLookup<'_>) -> Plan + Send>;

/// The result of [`Store::write`].
#[derive(Debug, Clone)]
pub struct Written {
    /// The audit event recorded.
    pub event: AuditEvent,
    /// The service's policy after the write (`None` if it has none).
    pub policy: Option<StoredPolicy>,
    /// `Err` when the plan refused the write (the refusal is recorded in `event`).
    pub result: Result<(), WriteError>,
}

/// A storage failure. Messages never carry database detail.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the transaction; nothing was written.
    #[error("storage unavailable")]
    Unavailable,
    /// Stored data could not be read back.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    /// A row that does not decode (text that is not UTF-8, a column of the wrong type) is
    /// corrupt data; anything else is the database being unavailable.
    fn from(error: sqlx::Error) -> Self {
        tracing::warn!(%error, "database error");
        match error {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(format!("a stored row cannot be read: {error}"))
            }
            _ => StoreError::Unavailable,
        }
    }
}

/// Filters of an audit query; empty strings and `None` match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only events about this service.
    pub service: String,
    /// Only events by this actor.
    pub actor: String,
    /// Only events of this method.
    pub method: String,
    /// Only events with this outcome.
    pub outcome: Option<Outcome>,
    /// Only events at or after this time (Unix microseconds).
    pub since: Option<i64>,
    /// Only events before this time (Unix microseconds).
    pub until: Option<i64>,
}

impl AuditFilter {
    /// The equality filters in use, as (column, value).
    pub(crate) fn equalities(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("service", self.service.as_str()),
            ("actor", self.actor.as_str()),
            ("method", self.method.as_str()),
            ("outcome", self.outcome.map_or("", Outcome::as_str)),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &AuditEvent) -> bool {
        (self.service.is_empty() || self.service == event.service)
            && (self.actor.is_empty() || self.actor == event.actor)
            && (self.method.is_empty() || self.method == event.method)
            && self.outcome.is_none_or(|o| o == event.outcome)
            && self.since.is_none_or(|t| event.time >= t)
            && self.until.is_none_or(|t| event.time < t)
    }

    /// Every filter in one string, different for different filters: what a page token is
    /// bound to.
    pub fn fingerprint(&self) -> String {
        let time = |t: Option<i64>| t.map_or_else(String::new, |t| t.to_string());
        [
            self.service.as_str(),
            self.actor.as_str(),
            self.method.as_str(),
            self.outcome.map_or("", Outcome::as_str),
            &time(self.since),
            &time(self.until),
        ]
        .join("\u{1}")
    }
}

/// Where an audit page starts: strictly older than this (time, sequence).
pub type AuditCursor = (i64, u64);

/// The control plane's storage. One implementation per database.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Runs one write: see the module documentation.
    async fn write(&self, ctx: WriteContext, plan: Planner) -> Result<Written, StoreError>;

    /// Runs one write of the origin set `name`, the same way.
    async fn write_set(
        &self,
        ctx: WriteContext,
        name: &str,
        plan: SetPlanner,
    ) -> Result<SetWritten, StoreError>;

    /// One live origin set.
    async fn get_origin_set(&self, name: &str) -> Result<Option<StoredSet>, StoreError>;

    /// Live origin sets in name order, after `after`.
    async fn list_origin_sets(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredSet>, StoreError>;

    /// A set's revisions, newest first, older than `before`.
    async fn list_set_revisions(
        &self,
        name: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<SetRevisionRecord>, StoreError>;

    /// One set revision.
    async fn get_set_revision(
        &self,
        revision: i64,
    ) -> Result<Option<SetRevisionRecord>, StoreError>;

    /// Committed set changes with a revision above `after`, oldest first.
    async fn set_revisions_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<SetRevisionRecord>, StoreError>;

    /// The services whose policy references the set `name`, in order.
    async fn set_referrers(&self, name: &str) -> Result<Vec<String>, StoreError>;

    /// Every origin set, validated, as stored now.
    async fn resolved_sets(&self) -> Result<origin_sets::ResolvedSets, StoreError>;

    /// A service's live policy.
    async fn get_policy(&self, service: &str) -> Result<Option<StoredPolicy>, StoreError>;

    /// Live policies whose service starts with `prefix`, in service order, after `after`.
    async fn list_policies(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredPolicy>, StoreError>;

    /// A service's revisions, newest first, older than `before`.
    async fn list_revisions(
        &self,
        service: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<RevisionRecord>, StoreError>;

    /// One revision.
    async fn get_revision(&self, revision: i64) -> Result<Option<RevisionRecord>, StoreError>;

    /// Audit events passing `filter`, newest first, older than `cursor`.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        cursor: Option<AuditCursor>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// One audit event.
    async fn get_audit(&self, sequence: u64) -> Result<Option<AuditEvent>, StoreError>;

    /// Audit events with a sequence above `after`, oldest first.
    async fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError>;

    /// The newest revision and audit sequence.
    async fn head(&self) -> Result<Head, StoreError>;

    /// Committed changes with a revision above `after`, oldest first.
    async fn revisions_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<RevisionRecord>, StoreError>;

    /// Sends a [`Nudge`] whenever another process may have committed a change, until
    /// `nudges` closes. Returns at once for a store only one process uses.
    async fn follow(&self, nudges: tokio::sync::mpsc::Sender<Nudge>);

    /// Writes fleet rows; a row is only replaced by one from a connection at least as recent.
    async fn save_sidecars(&self, rows: &[SidecarRecord]) -> Result<(), StoreError>;

    /// Fleet rows, by id, after `after`, filtered by service and state (empty: any).
    async fn list_sidecars(
        &self,
        service: &str,
        state: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<SidecarRecord>, StoreError>;

    /// One fleet row.
    async fn get_sidecar(&self, id: &str) -> Result<Option<SidecarRecord>, StoreError>;

    /// Removes sidecars disconnected before `before` (Unix microseconds).
    async fn prune_sidecars(&self, before: i64) -> Result<u64, StoreError>;

    /// One access token by id.
    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Every access token, revoked and expired ones included, by creation time.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Tokens in creation order, `limit` at most, strictly after `after` (creation time,
    /// id) when given.
    async fn list_tokens_page(
        &self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<TokenRecord>, StoreError>;

    /// The secret named `name`: the stored one, or `candidate`, stored now, when there is
    /// none yet. Every replica on one database gets the same.
    async fn secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError>;
}

/// A sidecar's sync state, as fleet status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SidecarState {
    /// It holds the newest revision of every policy it serves.
    Synced,
    /// A push is unacknowledged, or a change is waiting to be pushed.
    Pending,
    /// It refused the last push (it keeps serving its last good policy).
    Nacked,
    /// Its stream is closed.
    Disconnected,
}

impl SidecarState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarState::Synced => "SYNCED",
            SidecarState::Pending => "PENDING",
            SidecarState::Nacked => "NACKED",
            SidecarState::Disconnected => "DISCONNECTED",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<SidecarState> {
        [
            SidecarState::Synced,
            SidecarState::Pending,
            SidecarState::Nacked,
            SidecarState::Disconnected,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// One sidecar in fleet status.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SidecarRecord {
    /// The sidecar's stable id.
    pub sidecar_id: String,
    /// The services it serves, comma-separated (empty: every service).
    pub services: String,
    /// Its version.
    pub version: String,
    /// Its host.
    pub host: String,
    /// The control-plane replica its stream is (or was) on.
    pub control_plane: String,
    /// When its current stream opened (Unix microseconds).
    pub connected_since: i64,
    /// When it was last heard from.
    pub last_seen: i64,
    /// The global revision of the last push.
    pub last_sent_revision: i64,
    /// The global revision it last acknowledged.
    pub last_acked_revision: i64,
    /// `SYNCED`, `PENDING`, `NACKED` or `DISCONNECTED`.
    pub state: String,
    /// The error of its last NACK.
    pub nack_error: String,
    /// When its stream closed.
    pub disconnected_at: Option<i64>,
}

/// What wakes the policy cache besides this process's own writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nudge {
    /// Another process committed this revision.
    Revision(i64),
    /// Notifications may have been lost: re-read everything.
    Resync,
}

/// The head row: global revision and audit-chain head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The newest revision.
    pub revision: i64,
    /// The newest audit sequence.
    pub last_sequence: u64,
    /// The newest audit event's hash.
    pub last_hash: Vec<u8>,
    /// The newest audit event's time.
    pub last_time: i64,
}

/// Opens the store a database URL names: `sqlite://…` or `postgres://…`, running migrations.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, ConnectError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PgStore::connect(url).await?))
    } else {
        Err(ConnectError::Url(url.to_owned()))
    }
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://…")]
    Url(String),
    /// The database could not be reached or opened.
    #[error("cannot open database: {0}")]
    Open(#[source] sqlx::Error),
    /// The schema could not be migrated.
    #[error("cannot migrate database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another process holds the SQLite database.
    #[error("{0}")]
    Locked(String),
}

/// The operations one write transaction needs from a backend.
#[async_trait]
pub(crate) trait WriteTx: Send {
    /// Locks and reads the head row (first statement of the transaction).
    async fn lock_head(&mut self) -> Result<Head, sqlx::Error>;
    async fn policy(&mut self, service: &str) -> Result<Option<PolicyRow>, sqlx::Error>;
    async fn put_policy(&mut self, row: &PolicyRow) -> Result<(), sqlx::Error>;
    async fn delete_policy(&mut self, service: &str) -> Result<(), sqlx::Error>;
    async fn insert_revision(&mut self, row: &RevisionRow) -> Result<(), sqlx::Error>;
    async fn insert_audit(&mut self, row: &AuditRow) -> Result<(), sqlx::Error>;
    async fn set_head(&mut self, head: &Head) -> Result<(), sqlx::Error>;
    async fn count_tokens(&mut self) -> Result<i64, sqlx::Error>;
    async fn put_token(&mut self, token: &TokenRecord) -> Result<(), sqlx::Error>;
    /// Sets `revoked_at` on a live token; whether one was revoked.
    async fn revoke_token(&mut self, id: &str, at: i64) -> Result<bool, sqlx::Error>;
    /// Tells other processes that `revision` is committed (delivered at commit).
    async fn notify(&mut self, revision: i64) -> Result<(), sqlx::Error>;
    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error>;
    /// Every origin set's name and revision.
    async fn set_versions(&mut self) -> Result<Vec<(String, i64)>, sqlx::Error>;
    async fn origin_set(&mut self, name: &str) -> Result<Option<SetRow>, sqlx::Error>;
    async fn put_origin_set(&mut self, row: &SetRow) -> Result<(), sqlx::Error>;
    async fn delete_origin_set(&mut self, name: &str) -> Result<(), sqlx::Error>;
    async fn insert_set_revision(&mut self, row: &SetRevisionRow) -> Result<(), sqlx::Error>;
    /// The policies that reference the set `name`.
    async fn referrer_policies(&mut self, name: &str) -> Result<ReferrerRows, sqlx::Error>;
    /// Makes `sets` the origin sets `service` references (none: it references none).
    async fn set_refs(&mut self, service: &str, sets: &[String]) -> Result<(), sqlx::Error>;
}

/// The write algorithm, shared by both backends.
pub(crate) async fn write_in(
    mut tx: Box<dyn WriteTx + '_>,
    cache: &SetCache,
    ctx: WriteContext,
    plan: Planner,
) -> Result<Written, StoreError> {
    let head = tx.lock_head().await?;
    let current = tx
        .policy(&ctx.service)
        .await?
        .map(StoredPolicy::try_from)
        .transpose()?;
    let sets = cache.current(tx.as_mut()).await?;
    let plan = plan(current.as_ref(), &|name: &str| sets.lookup(name));

    let time = now_micros().max(head.last_time);
    let sequence = head.last_sequence + 1;
    let mut next = Head {
        revision: head.revision,
        last_sequence: sequence,
        last_hash: Vec::new(),
        last_time: time,
    };
    let before = current.as_ref().map(|p| spec_json(&p.spec));
    // Whatever a caller sent, the event stores bounded text.
    let mut event = AuditEvent {
        sequence,
        time,
        actor: capped(ctx.actor.clone(), caps::ACTOR),
        method: capped(ctx.method, caps::METHOD),
        service: capped(ctx.service.clone(), caps::SERVICE),
        revision: 0,
        before,
        after: None,
        changed_fields: Vec::new(),
        reason: capped(ctx.reason.clone(), caps::REASON),
        request_id: capped(ctx.request_id, caps::REQUEST_ID),
        peer: capped(ctx.peer, caps::PEER),
        outcome: Outcome::Ok,
        error: String::new(),
        prev_hash: head.last_hash,
        hash: Vec::new(),
        origin_set: String::new(),
        affected_services: Vec::new(),
    };
    let (policy, result) = match plan {
        Plan::Put(spec) => {
            next.revision += 1;
            event.revision = next.revision;
            event.changed_fields = changed_fields(current.as_ref().map(|p| &p.spec), &spec);
            event.after = Some(spec_json(&spec));
            let stored = StoredPolicy {
                revision: next.revision,
                create_time: current.as_ref().map_or(time, |p| p.create_time),
                update_time: time,
                update_actor: event.actor.clone(),
                spec,
            };
            tx.put_policy(&PolicyRow::from(&stored)).await?;
            tx.set_refs(
                &ctx.service,
                &origin_sets::referenced(&stored.spec.allowed_origins),
            )
            .await?;
            tx.insert_revision(&RevisionRow {
                revision: next.revision,
                service: ctx.service,
                spec: event.after.clone(),
                time,
                actor: event.actor.clone(),
                reason: event.reason.clone(),
                audit_sequence: sequence as i64,
            })
            .await?;
            (Some(stored), Ok(()))
        }
        Plan::Delete => {
            next.revision += 1;
            event.revision = next.revision;
            event.changed_fields = vec!["*".to_owned()];
            tx.delete_policy(&ctx.service).await?;
            tx.set_refs(&ctx.service, &[]).await?;
            tx.insert_revision(&RevisionRow {
                revision: next.revision,
                service: ctx.service,
                spec: None,
                time,
                actor: event.actor.clone(),
                reason: event.reason.clone(),
                audit_sequence: sequence as i64,
            })
            .await?;
            (None, Ok(()))
        }
        Plan::Refuse(error) => {
            event.outcome = error.outcome();
            event.error = capped(error.to_string(), caps::ERROR);
            (current, Err(error))
        }
        Plan::PutToken {
            token,
            only_if_first,
        } => {
            event.changed_fields = vec![format!("token:{}", token.id)];
            if only_if_first && tx.count_tokens().await? > 0 {
                let error = WriteError::AlreadyExists {
                    kind: ResourceKind::Token,
                    name: String::new(),
                    message: "a token exists already".into(),
                };
                event.outcome = error.outcome();
                event.error = capped(error.to_string(), caps::ERROR);
                (current, Err(error))
            } else {
                tx.put_token(&TokenRecord {
                    created_at: time,
                    ..token
                })
                .await?;
                (current, Ok(()))
            }
        }
        Plan::RevokeToken(id) => {
            event.changed_fields = vec![format!("token:{id}")];
            if tx.revoke_token(&id, time).await? {
                (current, Ok(()))
            } else {
                let error = WriteError::not_found(
                    ResourceKind::Token,
                    format!("tokens/{id}"),
                    format!("no live token is named tokens/{id}"),
                );
                event.outcome = error.outcome();
                event.error = capped(error.to_string(), caps::ERROR);
                (current, Err(error))
            }
        }
    };
    event.hash = audit::event_hash(&event).to_vec();
    next.last_hash = event.hash.clone();
    tx.insert_audit(&AuditRow::from(&event)).await?;
    tx.set_head(&next).await?;
    if next.revision != head.revision {
        tx.notify(next.revision).await?;
    }
    tx.commit().await?;
    Ok(Written {
        event,
        policy,
        result,
    })
}

/// The names of the spec fields that differ (all set fields for a creation).
pub fn changed_fields(before: Option<&PolicySpec>, after: &PolicySpec) -> Vec<String> {
    let empty = PolicySpec {
        service: after.service.clone(),
        ..PolicySpec::default()
    };
    let b = before.unwrap_or(&empty);
    let mut fields = Vec::new();
    let mut diff = |name: &str, changed: bool| {
        if changed {
            fields.push(name.to_owned());
        }
    };
    diff(
        "allowed_origins",
        b.allowed_origins != after.allowed_origins,
    );
    diff(
        "allowed_methods",
        b.allowed_methods != after.allowed_methods,
    );
    diff(
        "allowed_headers",
        b.allowed_headers != after.allowed_headers,
    );
    diff(
        "exposed_headers",
        b.exposed_headers != after.exposed_headers,
    );
    diff(
        "allow_credentials",
        b.allow_credentials != after.allow_credentials,
    );
    diff("max_age", b.max_age != after.max_age);
    diff(
        "allow_private_network",
        b.allow_private_network != after.allow_private_network,
    );
    diff("mode", b.mode != after.mode);
    diff("routes", b.routes != after.routes);
    fields
}

/// The canonical JSON of a spec, as stored and hashed.
pub fn spec_json(spec: &PolicySpec) -> String {
    serde_json::to_string(spec).expect("a policy spec always serializes")
}

fn parse_spec(json: &str) -> Result<PolicySpec, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("stored policy: {e}")))
}

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

// ---- rows, shared by both backends ---------------------------------------------------------

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct PolicyRow {
    pub(crate) service: String,
    pub(crate) spec: String,
    pub(crate) revision: i64,
    pub(crate) create_time: i64,
    pub(crate) update_time: i64,
    pub(crate) update_actor: String,
}

impl From<&StoredPolicy> for PolicyRow {
    fn from(p: &StoredPolicy) -> Self {
        PolicyRow {
            service: p.spec.service.clone(),
            spec: spec_json(&p.spec),
            revision: p.revision,
            create_time: p.create_time,
            update_time: p.update_time,
            update_actor: p.update_actor.clone(),
        }
    }
}

impl TryFrom<PolicyRow> for StoredPolicy {
    type Error = StoreError;
    fn try_from(row: PolicyRow) -> Result<Self, StoreError> {
        Ok(StoredPolicy {
            spec: parse_spec(&row.spec)?,
            revision: row.revision,
            create_time: row.create_time,
            update_time: row.update_time,
            update_actor: row.update_actor,
        })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RevisionRow {
    pub(crate) revision: i64,
    pub(crate) service: String,
    pub(crate) spec: Option<String>,
    pub(crate) time: i64,
    pub(crate) actor: String,
    pub(crate) reason: String,
    pub(crate) audit_sequence: i64,
}

impl TryFrom<RevisionRow> for RevisionRecord {
    type Error = StoreError;
    fn try_from(row: RevisionRow) -> Result<Self, StoreError> {
        Ok(RevisionRecord {
            revision: row.revision,
            service: row.service,
            spec: row.spec.as_deref().map(parse_spec).transpose()?,
            time: row.time,
            actor: row.actor,
            reason: row.reason,
            audit_sequence: row.audit_sequence as u64,
        })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AuditRow {
    pub(crate) sequence: i64,
    pub(crate) time: i64,
    pub(crate) actor: String,
    pub(crate) method: String,
    pub(crate) service: String,
    pub(crate) revision: i64,
    pub(crate) before_spec: Option<String>,
    pub(crate) after_spec: Option<String>,
    pub(crate) changed_fields: String,
    pub(crate) reason: String,
    pub(crate) request_id: String,
    pub(crate) peer: String,
    pub(crate) outcome: String,
    pub(crate) error: String,
    pub(crate) prev_hash: Vec<u8>,
    pub(crate) hash: Vec<u8>,
    pub(crate) origin_set: String,
    pub(crate) affected_services: String,
}

impl From<&AuditEvent> for AuditRow {
    fn from(e: &AuditEvent) -> Self {
        AuditRow {
            sequence: e.sequence as i64,
            time: e.time,
            actor: e.actor.clone(),
            method: e.method.clone(),
            service: e.service.clone(),
            revision: e.revision,
            before_spec: e.before.clone(),
            after_spec: e.after.clone(),
            changed_fields: e.changed_fields.join(","),
            reason: e.reason.clone(),
            request_id: e.request_id.clone(),
            peer: e.peer.clone(),
            outcome: e.outcome.as_str().to_owned(),
            error: e.error.clone(),
            prev_hash: e.prev_hash.clone(),
            hash: e.hash.clone(),
            origin_set: e.origin_set.clone(),
            affected_services: e.affected_services.join(","),
        }
    }
}

impl TryFrom<AuditRow> for AuditEvent {
    type Error = StoreError;
    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditEvent {
            sequence: row.sequence as u64,
            time: row.time,
            actor: row.actor,
            method: row.method,
            service: row.service,
            revision: row.revision,
            before: row.before_spec,
            after: row.after_spec,
            changed_fields: if row.changed_fields.is_empty() {
                Vec::new()
            } else {
                row.changed_fields.split(',').map(str::to_owned).collect()
            },
            reason: row.reason,
            request_id: row.request_id,
            peer: row.peer,
            // An unknown outcome is kept visible rather than failing the whole page; the
            // chain check catches any tampering.
            outcome: Outcome::parse(&row.outcome).unwrap_or(Outcome::FailedPrecondition),
            error: row.error,
            prev_hash: row.prev_hash,
            hash: row.hash,
            origin_set: row.origin_set,
            affected_services: if row.affected_services.is_empty() {
                Vec::new()
            } else {
                row.affected_services
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            },
        })
    }
}

/// Turns rows into domain values, failing on the first corrupt one.
pub(crate) fn convert<R, T: TryFrom<R, Error = StoreError>>(
    rows: Vec<R>,
) -> Result<Vec<T>, StoreError> {
    rows.into_iter().map(T::try_from).collect()
}

/// Escapes `%`, `_` and `\` for a `LIKE 'prefix%' ESCAPE '\'` pattern.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}
