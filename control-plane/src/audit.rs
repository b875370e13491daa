//! The audit chain: each event's hash is SHA-256 over the previous event's hash and the
//! event's canonical encoding, so editing, deleting or reordering any stored row breaks the
//! chain at that row, and [`verify`] finds it.

use std::collections::VecDeque;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::store::{AuditEvent, Store, StoreError};

/// The `prev_hash` of the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// Version tag of the canonical encoding, hashed first so the encoding can evolve.
const ENCODING: &[u8] = b"corsair.audit.v1";

/// SHA-256(prev_hash ‖ canonical(event)). Every field except `hash` is covered, each
/// length-prefixed so no two different events encode alike.
pub fn event_hash(event: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    // Each field: its length as 8 big-endian bytes, then its parts.
    let mut field = |parts: &[&[u8]]| {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        h.update((len as u64).to_be_bytes());
        for part in parts {
            h.update(part);
        }
    };
    field(&[ENCODING]);
    field(&[&event.prev_hash]);
    field(&[&event.sequence.to_be_bytes()]);
    field(&[&event.time.to_be_bytes()]);
    field(&[event.actor.as_bytes()]);
    field(&[event.method.as_bytes()]);
    field(&[event.service.as_bytes()]);
    field(&[&event.revision.to_be_bytes()]);
    // Absent and empty policies must differ.
    for policy in [&event.before, &event.after] {
        match policy {
            Some(p) => field(&[b"+", p.as_bytes()]),
            None => field(&[b"-"]),
        }
    }
    let mut changed: Vec<&[u8]> = Vec::with_capacity(event.changed_fields.len() * 2);
    for (i, f) in event.changed_fields.iter().enumerate() {
        if i > 0 {
            changed.push(b",");
        }
        changed.push(f.as_bytes());
    }
    field(&changed);
    field(&[event.reason.as_bytes()]);
    field(&[event.request_id.as_bytes()]);
    field(&[event.peer.as_bytes()]);
    field(&[event.outcome.as_str().as_bytes()]);
    field(&[event.error.as_bytes()]);
    h.finalize().into()
}

/// The result of a chain verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// How many events verified before the end of the range or the first bad one.
    pub verified: u64,
    /// The first event that does not verify, and why.
    pub first_bad: Option<(u64, String)>,
}

/// Checks one batch in sequence order, advancing `expected`, `prev_hash` and `verified`;
/// returns the first bad event.
fn check_batch(
    batch: &[AuditEvent],
    end: u64,
    expected: &mut u64,
    prev_hash: &mut Vec<u8>,
    verified: &mut u64,
) -> Option<(u64, String)> {
    for event in batch {
        if event.sequence > end {
            break;
        }
        if event.sequence != *expected {
            return Some((*expected, "event is missing".into()));
        }
        if event.prev_hash != *prev_hash {
            return Some((
                *expected,
                "does not link to the previous event's hash".into(),
            ));
        }
        if event.hash != event_hash(event) {
            return Some((*expected, "contents do not match the stored hash".into()));
        }
        prev_hash.clone_from(&event.hash);
        *verified += 1;
        *expected += 1;
    }
    None
}

/// Rows read per query while verifying.
const BATCH: u32 = 5_000;
/// Batches read ahead of the one being checked.
const READ_AHEAD: usize = 3;

/// Verifies events `start..=end` (`end` 0: to the newest). Checks that sequences have no
/// gap, each event links to its predecessor's hash, and each hash matches its contents.
pub async fn verify(
    store: Arc<dyn Store>,
    start: u64,
    end: u64,
) -> Result<Verification, StoreError> {
    let start = start.max(1);
    let end = if end == 0 {
        store.head().await?.last_sequence
    } else {
        end
    };
    let mut prev_hash = if start == 1 {
        GENESIS.to_vec()
    } else {
        match store.get_audit(start - 1).await? {
            Some(e) => e.hash,
            None => {
                return Ok(Verification {
                    verified: 0,
                    first_bad: Some((start - 1, "event is missing".into())),
                });
            }
        }
    };
    // Batches are read ahead on separate connections (on SQLite, separate worker threads)
    // and checked in order, so reading and hashing proceed in parallel.
    let fetch = |after: u64| {
        let store = store.clone();
        tokio::spawn(async move { store.audit_after(after, BATCH).await })
    };
    let mut next_after = start - 1;
    let mut in_flight = VecDeque::new();
    while in_flight.len() < READ_AHEAD && next_after < end {
        in_flight.push_back(fetch(next_after));
        next_after += u64::from(BATCH);
    }
    let mut expected = start;
    let mut verified = 0;
    while let Some(read) = in_flight.pop_front() {
        let batch = read.await.map_err(|_| StoreError::Unavailable)??;
        if next_after < end {
            in_flight.push_back(fetch(next_after));
            next_after += u64::from(BATCH);
        }
        if let Some(bad) = check_batch(&batch, end, &mut expected, &mut prev_hash, &mut verified) {
            in_flight.iter().for_each(|r| r.abort());
            return Ok(Verification {
                verified,
                first_bad: Some(bad),
            });
        }
        if expected > end {
            break;
        }
    }
    if expected <= end {
        return Ok(Verification {
            verified,
            first_bad: Some((expected, "event is missing".into())),
        });
    }
    Ok(Verification {
        verified,
        first_bad: None,
    })
}
