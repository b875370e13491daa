//! Origin sets in storage: the stored set and its revisions, the write of a set (one
//! transaction, like a policy write: the head row, the set, its revision, its audit event),
//! and [`SetCache`], the validated sets every write resolves `set:` references through.
//!
//! A set write sees its referrers' policies inside its transaction, so a policy written
//! concurrently to reference the set is either seen and checked, or written after the set and
//! checked against it: no referrer escapes the check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use corsair_policy::{OriginSet, OriginSetSpec, SET_PREFIX, lint_set};

use super::refusal::{ResourceKind, WriteError};
use super::{
    AuditEvent, AuditRow, Head, Outcome, PolicyRow, StoreError, StoredPolicy, WriteContext,
    WriteTx, capped, caps, now_micros,
};
use crate::audit;

/// A live origin set with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSet {
    /// The canonical spec.
    pub spec: OriginSetSpec,
    /// The revision of the write that last changed it.
    pub revision: i64,
    /// When it was created (Unix microseconds).
    pub create_time: i64,
    /// When it last changed.
    pub update_time: i64,
    /// Who last changed it.
    pub update_actor: String,
}

impl StoredSet {
    /// Its etag, quoted.
    pub fn etag(&self) -> String {
        set_etag(&self.spec.name, self.revision)
    }
}

/// The etag of an origin set at a revision.
pub fn set_etag(name: &str, revision: i64) -> String {
    format!("\"s-{name}-{revision}\"")
}

/// One stored revision of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRevisionRecord {
    /// The global revision.
    pub revision: i64,
    /// The set's name.
    pub name: String,
    /// The set as of this revision; `None` for a deletion.
    pub spec: Option<OriginSetSpec>,
    /// When.
    pub time: i64,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// The audit event of the write.
    pub audit_sequence: u64,
    /// The services whose effective policy changed.
    pub affected: Vec<String>,
}

/// What a set write's planner sees, read inside the write's transaction.
pub struct SetView<'a> {
    /// The set as stored, if it exists.
    pub current: Option<&'a StoredSet>,
    /// The policies that reference the set.
    pub referrers: &'a [StoredPolicy],
    /// Every stored set, validated (the one written at its current revision).
    pub sets: &'a ResolvedSets,
}

/// What a set write does.
#[derive(Debug)]
pub enum SetPlan {
    /// Store this canonical spec; `affected` are the services whose effective policy changes.
    Put {
        /// The set.
        spec: OriginSetSpec,
        /// The referrers it changes.
        affected: Vec<String>,
    },
    /// Delete the set (refused by the store while a policy references it).
    Delete,
    /// Change nothing; record the refusal.
    Refuse(WriteError),
}

/// Decides a [`SetPlan`].
pub type SetPlanner = Box<dyn FnOnce(SetView<'_>) -> SetPlan + Send>;

/// The result of a set write.
#[derive(Debug, Clone)]
pub struct SetWritten {
    /// The audit event recorded.
    pub event: AuditEvent,
    /// The set after the write, if it exists.
    pub set: Option<StoredSet>,
    /// The policies that referenced it when it was written.
    pub referrers: Vec<String>,
    /// `Err` when the write was refused.
    pub result: Result<(), WriteError>,
}

/// The set names a list of allowed origins references.
pub fn referenced<'a>(origins: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut names: Vec<String> = origins
        .into_iter()
        .filter_map(|o| o.strip_prefix(SET_PREFIX))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every stored origin set, validated, with its revision, as one read saw them.
#[derive(Debug, Default, Clone)]
pub struct ResolvedSets(pub HashMap<String, (i64, Arc<OriginSet>)>);

impl ResolvedSets {
    /// The set named `name`.
    pub fn lookup(&self, name: &str) -> Option<Arc<OriginSet>> {
        self.0.get(name).map(|(_, set)| set.clone())
    }

    /// The revision of the set named `name`.
    pub fn revision(&self, name: &str) -> Option<i64> {
        self.0.get(name).map(|(revision, _)| *revision)
    }
}

/// Validated sets by name and revision, so a write does not re-validate a set of thousands
/// of entries each time a policy that references it is written. Filled from the rows a
/// write's transaction reads, so it never serves a revision the transaction did not see.
#[derive(Debug, Default)]
pub struct SetCache {
    sets: Mutex<HashMap<String, (i64, Arc<OriginSet>)>>,
}

impl SetCache {
    /// Every stored set, validated, as of the transaction's view. Reads each set's spec only
    /// when its revision differs from the cached one.
    pub(crate) async fn current(
        &self,
        tx: &mut (dyn WriteTx + '_),
    ) -> Result<ResolvedSets, StoreError> {
        let versions = tx.set_versions().await?;
        let mut out = HashMap::with_capacity(versions.len());
        for (name, revision) in versions {
            let set = match self.cached(&name, revision) {
                Some(set) => set,
                None => {
                    let row = tx.origin_set(&name).await?;
                    self.remember(row)?
                }
            };
            out.insert(name, (revision, set));
        }
        Ok(ResolvedSets(out))
    }

    /// The validated set `name` at `revision`, if cached.
    pub(crate) fn cached(&self, name: &str, revision: i64) -> Option<Arc<OriginSet>> {
        self.sets
            .lock()
            .expect("set cache")
            .get(name)
            .filter(|(r, _)| *r == revision)
            .map(|(_, s)| s.clone())
    }

    /// Validates a set read from storage (which must be there) and caches it.
    pub(crate) fn remember(&self, row: Option<SetRow>) -> Result<Arc<OriginSet>, StoreError> {
        let row = row.ok_or_else(|| {
            StoreError::Corrupt("an origin set vanished while it was read".into())
        })?;
        let stored = StoredSet::try_from(row)?;
        let set = validated(&stored.spec)?;
        self.sets
            .lock()
            .expect("set cache")
            .insert(stored.spec.name.clone(), (stored.revision, set.clone()));
        Ok(set)
    }
}

/// A stored set, validated again (it was when written; a stored one that no longer is, is
/// corrupt).
pub fn validated(spec: &OriginSetSpec) -> Result<Arc<OriginSet>, StoreError> {
    let (set, findings) = lint_set(spec);
    set.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "stored origin set {} is invalid: {}",
            spec.name,
            findings
                .first()
                .map(ToString::to_string)
                .unwrap_or_default()
        ))
    })
}

/// The set write algorithm, shared by both backends.
pub(crate) async fn write_set_in(
    mut tx: Box<dyn WriteTx + '_>,
    cache: &SetCache,
    ctx: WriteContext,
    name: &str,
    plan: SetPlanner,
) -> Result<SetWritten, StoreError> {
    let head = tx.lock_head().await?;
    let current = tx
        .origin_set(name)
        .await?
        .map(StoredSet::try_from)
        .transpose()?;
    let referrers: Vec<StoredPolicy> = tx
        .referrer_policies(name)
        .await?
        .into_iter()
        .map(StoredPolicy::try_from)
        .collect::<Result<_, _>>()?;
    let sets = cache.current(tx.as_mut()).await?;
    let plan = plan(SetView {
        current: current.as_ref(),
        referrers: &referrers,
        sets: &sets,
    });
    let referrer_names: Vec<String> = referrers.iter().map(|p| p.spec.service.clone()).collect();

    let time = now_micros().max(head.last_time);
    let sequence = head.last_sequence + 1;
    let mut next = Head {
        revision: head.revision,
        last_sequence: sequence,
        last_hash: Vec::new(),
        last_time: time,
    };
    let mut event = AuditEvent {
        sequence,
        time,
        actor: capped(ctx.actor.clone(), caps::ACTOR),
        method: capped(ctx.method, caps::METHOD),
        service: String::new(),
        revision: 0,
        before: current.as_ref().map(|s| set_json(&s.spec)),
        after: None,
        changed_fields: Vec::new(),
        reason: capped(ctx.reason.clone(), caps::REASON),
        request_id: capped(ctx.request_id, caps::REQUEST_ID),
        peer: capped(ctx.peer, caps::PEER),
        outcome: Outcome::Ok,
        error: String::new(),
        prev_hash: head.last_hash,
        hash: Vec::new(),
        origin_set: capped(name.to_owned(), caps::SERVICE),
        affected_services: Vec::new(),
    };
    let refuse = |event: &mut AuditEvent, error: WriteError| {
        event.outcome = error.outcome();
        event.error = capped(error.to_string(), caps::ERROR);
        error
    };
    let (set, result) = match plan {
        SetPlan::Put { spec, affected } => {
            next.revision += 1;
            event.revision = next.revision;
            event.changed_fields = changed_set_fields(current.as_ref().map(|s| &s.spec), &spec);
            event.after = Some(set_json(&spec));
            event.affected_services = affected.clone();
            let stored = StoredSet {
                revision: next.revision,
                create_time: current.as_ref().map_or(time, |s| s.create_time),
                update_time: time,
                update_actor: event.actor.clone(),
                spec,
            };
            tx.put_origin_set(&SetRow::from(&stored)).await?;
            tx.insert_set_revision(&SetRevisionRow {
                revision: next.revision,
                name: name.to_owned(),
                spec: event.after.clone(),
                time,
                actor: event.actor.clone(),
                reason: event.reason.clone(),
                audit_sequence: sequence as i64,
                affected: affected.join(","),
            })
            .await?;
            (Some(stored), Ok(()))
        }
        SetPlan::Delete if !referrers.is_empty() => {
            let error = WriteError::SetInUse {
                name: corsair_proto::names::origin_set_name(name),
                referrers: referrer_names
                    .iter()
                    .map(|s| corsair_proto::names::policy_name(s))
                    .collect(),
            };
            (current, Err(refuse(&mut event, error)))
        }
        SetPlan::Delete => {
            next.revision += 1;
            event.revision = next.revision;
            event.changed_fields = vec!["*".to_owned()];
            tx.delete_origin_set(name).await?;
            tx.insert_set_revision(&SetRevisionRow {
                revision: next.revision,
                name: name.to_owned(),
                spec: None,
                time,
                actor: event.actor.clone(),
                reason: event.reason.clone(),
                audit_sequence: sequence as i64,
                affected: String::new(),
            })
            .await?;
            (None, Ok(()))
        }
        SetPlan::Refuse(error) => (current, Err(refuse(&mut event, error))),
    };
    event.hash = audit::event_hash(&event).to_vec();
    next.last_hash = event.hash.clone();
    tx.insert_audit(&AuditRow::from(&event)).await?;
    tx.set_head(&next).await?;
    if next.revision != head.revision {
        tx.notify(next.revision).await?;
    }
    tx.commit().await?;
    Ok(SetWritten {
        event,
        set,
        referrers: referrer_names,
        result,
    })
}

/// The set fields that differ (both for a creation).
fn changed_set_fields(before: Option<&OriginSetSpec>, after: &OriginSetSpec) -> Vec<String> {
    let mut fields = Vec::new();
    if before.is_none_or(|b| b.description != after.description) {
        fields.push("description".to_owned());
    }
    if before.is_none_or(|b| b.origins != after.origins) {
        fields.push("origins".to_owned());
    }
    fields
}

/// The canonical JSON of a set, as stored and hashed.
pub fn set_json(spec: &OriginSetSpec) -> String {
    serde_json::to_string(spec).expect("a set spec always serializes")
}

fn parse_set(json: &str) -> Result<OriginSetSpec, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("stored origin set: {e}")))
}

// ---- rows ------------------------------------------------------------------------------

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SetRow {
    pub(crate) name: String,
    pub(crate) spec: String,
    pub(crate) revision: i64,
    pub(crate) create_time: i64,
    pub(crate) update_time: i64,
    pub(crate) update_actor: String,
}

impl From<&StoredSet> for SetRow {
    fn from(s: &StoredSet) -> Self {
        SetRow {
            name: s.spec.name.clone(),
            spec: set_json(&s.spec),
            revision: s.revision,
            create_time: s.create_time,
            update_time: s.update_time,
            update_actor: s.update_actor.clone(),
        }
    }
}

impl TryFrom<SetRow> for StoredSet {
    type Error = StoreError;
    fn try_from(row: SetRow) -> Result<Self, StoreError> {
        Ok(StoredSet {
            spec: parse_set(&row.spec)?,
            revision: row.revision,
            create_time: row.create_time,
            update_time: row.update_time,
            update_actor: row.update_actor,
        })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SetRevisionRow {
    pub(crate) revision: i64,
    pub(crate) name: String,
    pub(crate) spec: Option<String>,
    pub(crate) time: i64,
    pub(crate) actor: String,
    pub(crate) reason: String,
    pub(crate) audit_sequence: i64,
    pub(crate) affected: String,
}

impl TryFrom<SetRevisionRow> for SetRevisionRecord {
    type Error = StoreError;
    fn try_from(row: SetRevisionRow) -> Result<Self, StoreError> {
        Ok(SetRevisionRecord {
            revision: row.revision,
            name: row.name,
            spec: row.spec.as_deref().map(parse_set).transpose()?,
            time: row.time,
            actor: row.actor,
            reason: row.reason,
            audit_sequence: row.audit_sequence as u64,
            affected: if row.affected.is_empty() {
                Vec::new()
            } else {
                row.affected.split(',').map(str::to_owned).collect()
            },
        })
    }
}

/// Policy rows, for [`WriteTx::referrer_policies`].
pub(crate) type ReferrerRows = Vec<PolicyRow>;

/// The refusal of a write that references a set in a way the plan rejected, for callers
/// that build one.
pub fn unknown_set(name: &str) -> WriteError {
    WriteError::not_found(
        ResourceKind::OriginSet,
        corsair_proto::names::origin_set_name(name),
        format!("no origin set is named originSets/{name}"),
    )
}
