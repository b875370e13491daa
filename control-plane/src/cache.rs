//! The policy cache every discovery stream reads: the live policy of every service at one
//! global revision, as ready-to-send wire messages, published through a `watch` channel
//! (latest state wins; a slow stream never holds anyone back).
//!
//! One task per process keeps it current. It loads everything at start, then, whenever it
//! is woken, reads only the committed changes after its revision. It is woken by this
//! process's own writes, by the store's nudges (PostgreSQL `NOTIFY` from other replicas), and
//! by a periodic anti-entropy check, so a lost nudge costs at most one interval. A `Resync`
//! nudge (the listener reconnected) reloads everything.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use corsair_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::convert::{spec_to_proto, stored_to_proto};
use crate::store::{Nudge, RevisionRecord, SetRevisionRecord, Store, StoreError, etag};

/// The live policies and origin sets at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The newest revision reflected.
    pub revision: i64,
    /// Service → its live policy as written (`set:` references unresolved), with `revision`,
    /// `etag` and `effective_revision` set.
    pub policies: HashMap<String, Arc<v1::Policy>>,
    /// Set name → the set.
    pub sets: HashMap<String, Arc<SetState>>,
    /// Set name → the services whose policy references it.
    pub referrers: HashMap<String, BTreeSet<String>>,
}

/// An origin set as the discovery streams send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    /// The revision of its last write.
    pub revision: i64,
    /// When that write committed (Unix microseconds).
    pub time: i64,
    /// Its canonical entries, sorted.
    pub origins: Arc<Vec<String>>,
    /// SHA-256 of `origins` (see [`corsair_policy::origin_set::digest`]).
    pub digest: [u8; 32],
    /// How it differs from the revision before, when this cache saw that one: what a stream
    /// sends a sidecar holding it.
    pub delta: Option<SetDelta>,
}

/// The change of one set write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDelta {
    /// The revision it applies to.
    pub base: i64,
    /// Entries added.
    pub added: Vec<String>,
    /// Entries removed.
    pub removed: Vec<String>,
}

impl SetState {
    fn new(revision: i64, time: i64, origins: Vec<String>, before: Option<&SetState>) -> SetState {
        let delta = before.map(|b| {
            let old: BTreeSet<&String> = b.origins.iter().collect();
            let new: BTreeSet<&String> = origins.iter().collect();
            SetDelta {
                base: b.revision,
                added: new.difference(&old).map(|s| (*s).clone()).collect(),
                removed: old.difference(&new).map(|s| (*s).clone()).collect(),
            }
        });
        SetState {
            revision,
            time,
            digest: corsair_policy::origin_set::digest(&origins),
            origins: Arc::new(origins),
            delta,
        }
    }

    /// The content a sidecar holding revision `held` (if any) needs to reach this one.
    pub fn content_for(&self, name: &str, held: Option<i64>) -> v1::OriginSetContent {
        let base = v1::OriginSetContent {
            name: name.to_owned(),
            revision: self.revision,
            digest: self.digest.to_vec(),
            ..Default::default()
        };
        match &self.delta {
            Some(d) if held == Some(d.base) => v1::OriginSetContent {
                base_revision: d.base,
                added: d.added.clone(),
                removed: d.removed.clone(),
                ..base
            },
            _ => v1::OriginSetContent {
                added: self.origins.as_ref().clone(),
                ..base
            },
        }
    }
}

impl Snapshot {
    /// Records `policy` as `service`'s, indexing its set references and computing its
    /// effective revision.
    fn put_policy(&mut self, service: &str, mut policy: v1::Policy) {
        self.drop_refs(service);
        let refs = referenced(&policy);
        policy.effective_revision = refs
            .iter()
            .filter_map(|name| self.sets.get(name).map(|s| s.revision))
            .fold(policy.revision, i64::max);
        for name in refs {
            self.referrers
                .entry(name)
                .or_default()
                .insert(service.to_owned());
        }
        self.policies.insert(service.to_owned(), Arc::new(policy));
    }

    fn remove_policy(&mut self, service: &str) {
        self.drop_refs(service);
        self.policies.remove(service);
    }

    fn drop_refs(&mut self, service: &str) {
        if let Some(old) = self.policies.get(service) {
            for name in referenced(old) {
                if let Some(services) = self.referrers.get_mut(&name) {
                    services.remove(service);
                    if services.is_empty() {
                        self.referrers.remove(&name);
                    }
                }
            }
        }
    }

    /// Records a set write at `revision`: every referrer's effective policy changes with it.
    fn put_set(&mut self, name: &str, revision: i64, time: i64, origins: Option<Vec<String>>) {
        match origins {
            Some(origins) => {
                let before = self.sets.get(name).map(Arc::as_ref);
                let state = SetState::new(revision, time, origins, before);
                self.sets.insert(name.to_owned(), Arc::new(state));
            }
            None => {
                self.sets.remove(name);
            }
        }
        for service in self.referrers.get(name).into_iter().flatten() {
            if let Some(policy) = self.policies.get_mut(service) {
                let mut next = v1::Policy::clone(policy);
                next.effective_revision = next.effective_revision.max(revision);
                *policy = Arc::new(next);
            }
        }
    }
}

/// The set names a policy references, in its own or its routes' allowed origins.
pub fn referenced(policy: &v1::Policy) -> Vec<String> {
    crate::store::origin_sets::referenced(
        policy.allowed_origins.iter().chain(
            policy
                .routes
                .iter()
                .filter_map(|r| r.allowed_origins.as_ref())
                .flat_map(|list| list.values.iter()),
        ),
    )
}

/// Rows read per query while catching up.
const PAGE: u32 = 1000;

/// Starts the cache task and returns the channel it publishes on once the first load is
/// done. `local` carries the revisions this process commits.
pub async fn start(
    store: Arc<dyn Store>,
    mut local: watch::Receiver<i64>,
    anti_entropy: Duration,
    mut shutdown: watch::Receiver<bool>,
    tasks: &TaskTracker,
) -> Result<watch::Receiver<Arc<Snapshot>>, StoreError> {
    let first = load(store.as_ref()).await?;
    let (publish, snapshots) = watch::channel(Arc::new(first));
    let (nudge_tx, mut nudges) = mpsc::channel(64);
    let follower = tasks.spawn({
        let store = store.clone();
        async move { store.follow(nudge_tx).await }.in_current_span()
    });
    tasks.spawn(
        async move {
            // A store only one process uses closes its nudges at once.
            let mut nudges_open = true;
            let mut tick = tokio::time::interval(anti_entropy);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let full = tokio::select! {
                    _ = local.changed() => false,
                    nudge = nudges.recv(), if nudges_open => match nudge {
                        Some(nudge) => nudge == Nudge::Resync,
                        None => {
                            nudges_open = false;
                            continue;
                        }
                    },
                    _ = tick.tick() => false,
                    () = crate::service::stopped(&mut shutdown) => break,
                };
                let current = publish.borrow().clone();
                let next = if full {
                    load(store.as_ref()).await.map(Some)
                } else {
                    catch_up(store.as_ref(), &current).await
                };
                match next {
                    Ok(Some(next)) => {
                        tracing::debug!(revision = next.revision, "policy cache advanced");
                        publish.send_replace(Arc::new(next));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "policy cache could not read the store; keeping the last state"),
                }
            }
            follower.abort();
        }
        .instrument(tracing::info_span!("policy_cache")),
    );
    Ok(snapshots)
}

/// Everything, from the origin set and policy tables.
async fn load(store: &dyn Store) -> Result<Snapshot, StoreError> {
    // The head first: a change committed during the load is then re-read by the next
    // catch-up instead of being missed.
    let revision = store.head().await?.revision;
    let mut snapshot = Snapshot {
        revision,
        ..Snapshot::default()
    };
    let mut after: Option<String> = None;
    loop {
        let page = store.list_origin_sets(after.as_deref(), PAGE).await?;
        let done = page.len() < PAGE as usize;
        after = page.last().map(|s| s.spec.name.clone());
        for set in page {
            snapshot.put_set(
                &set.spec.name,
                set.revision,
                set.update_time,
                Some(set.spec.origins),
            );
        }
        if done {
            break;
        }
    }
    let mut after: Option<String> = None;
    loop {
        let page = store.list_policies("", after.as_deref(), PAGE).await?;
        let done = page.len() < PAGE as usize;
        after = page.last().map(|p| p.spec.service.clone());
        for p in page {
            snapshot.put_policy(&p.spec.service, stored_to_proto(&p));
        }
        if done {
            break;
        }
    }
    // Not the largest revision read: a change committed mid-load to a service already read
    // would be skipped. Catching up from the head re-applies what was read, harmlessly.
    Ok(snapshot)
}

/// One committed change, of a policy or of a set.
enum Change {
    Policy(RevisionRecord),
    Set(SetRevisionRecord),
}

impl Change {
    fn revision(&self) -> i64 {
        match self {
            Change::Policy(r) => r.revision,
            Change::Set(r) => r.revision,
        }
    }
}

/// The changes after `after`, policies and sets merged in revision order, as far as both
/// lists are complete; and whether there may be more.
async fn changes_after(store: &dyn Store, after: i64) -> Result<(Vec<Change>, bool), StoreError> {
    let policies = store.revisions_after(after, PAGE).await?;
    let sets = store.set_revisions_after(after, PAGE).await?;
    // A full page may stop short of changes the other list holds: go only as far as both.
    let last_if_full = |len: usize, last: Option<i64>| last.filter(|_| len == PAGE as usize);
    let bound = [
        last_if_full(policies.len(), policies.last().map(|r| r.revision)),
        last_if_full(sets.len(), sets.last().map(|r| r.revision)),
    ]
    .into_iter()
    .flatten()
    .min();
    let mut changes: Vec<Change> = policies
        .into_iter()
        .map(Change::Policy)
        .chain(sets.into_iter().map(Change::Set))
        .filter(|c| bound.is_none_or(|b| c.revision() <= b))
        .collect();
    changes.sort_by_key(Change::revision);
    Ok((changes, bound.is_some()))
}

/// The changes after `current`, applied to a copy; `None` when there are none.
async fn catch_up(store: &dyn Store, current: &Snapshot) -> Result<Option<Snapshot>, StoreError> {
    let (mut changes, mut more) = changes_after(store, current.revision).await?;
    if changes.is_empty() {
        return Ok(None);
    }
    let mut next = Snapshot {
        revision: current.revision,
        policies: current.policies.clone(),
        sets: current.sets.clone(),
        referrers: current.referrers.clone(),
    };
    loop {
        for change in changes {
            next.revision = change.revision();
            match change {
                Change::Policy(change) => match &change.spec {
                    Some(spec) => {
                        let policy = v1::Policy {
                            revision: change.revision,
                            etag: etag(&change.service, change.revision),
                            update_time: Some(crate::convert::timestamp(change.time)),
                            update_actor: change.actor.clone(),
                            ..spec_to_proto(spec)
                        };
                        next.put_policy(&change.service, policy);
                    }
                    None => next.remove_policy(&change.service),
                },
                Change::Set(change) => {
                    next.put_set(
                        &change.name,
                        change.revision,
                        change.time,
                        change.spec.map(|s| s.origins),
                    );
                }
            }
        }
        if !more {
            return Ok(Some(next));
        }
        (changes, more) = changes_after(store, next.revision).await?;
    }
}
