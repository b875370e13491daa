//! The policy cache every discovery stream reads: the live policy of every service at one
//! global revision, as ready-to-send wire messages, published through a `watch` channel
//! (latest state wins; a slow stream never holds anyone back).
//!
//! One task per process keeps it current. It loads everything at start, then, whenever it
//! is woken, reads only the committed changes after its revision. It is woken by this
//! process's own writes, by the store's nudges (PostgreSQL `NOTIFY` from other replicas), and
//! by a periodic anti-entropy check, so a lost nudge costs at most one interval. A `Resync`
//! nudge (the listener reconnected) reloads everything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use corsair_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::convert::{spec_to_proto, stored_to_proto};
use crate::store::{Nudge, Store, StoreError, etag};

/// The live policies at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The newest revision reflected.
    pub revision: i64,
    /// Service → its live policy (with `revision` and `etag` set).
    pub policies: HashMap<String, Arc<v1::Policy>>,
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

/// Everything, from the policies table.
async fn load(store: &dyn Store) -> Result<Snapshot, StoreError> {
    // The head first: a change committed during the load is then re-read by the next
    // catch-up instead of being missed.
    let revision = store.head().await?.revision;
    let mut policies = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_policies("", after.as_deref(), PAGE).await?;
        let done = page.len() < PAGE as usize;
        after = page.last().map(|p| p.spec.service.clone());
        for p in page {
            policies.insert(p.spec.service.clone(), Arc::new(stored_to_proto(&p)));
        }
        if done {
            break;
        }
    }
    // Not the largest revision read: a change committed mid-load to a service already read
    // would be skipped. Catching up from the head re-applies what was read, harmlessly.
    Ok(Snapshot { revision, policies })
}

/// The changes after `current`, applied to a copy; `None` when there are none.
async fn catch_up(store: &dyn Store, current: &Snapshot) -> Result<Option<Snapshot>, StoreError> {
    let mut changes = store.revisions_after(current.revision, PAGE).await?;
    if changes.is_empty() {
        return Ok(None);
    }
    let mut next = Snapshot {
        revision: current.revision,
        policies: current.policies.clone(),
    };
    loop {
        let full = changes.len() == PAGE as usize;
        for change in &changes {
            match &change.spec {
                Some(spec) => {
                    let policy = v1::Policy {
                        revision: change.revision,
                        etag: etag(&change.service, change.revision),
                        update_time: Some(crate::convert::timestamp(change.time)),
                        update_actor: change.actor.clone(),
                        ..spec_to_proto(spec)
                    };
                    next.policies
                        .insert(change.service.clone(), Arc::new(policy));
                }
                None => {
                    next.policies.remove(&change.service);
                }
            }
            next.revision = change.revision;
        }
        if !full {
            return Ok(Some(next));
        }
        changes = store.revisions_after(next.revision, PAGE).await?;
    }
}
