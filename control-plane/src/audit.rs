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

/// The encoding of an origin set write: v1's fields, then the set and the affected services.
/// Every other event keeps v1, so chains written before origin sets verify unchanged.
const ENCODING_SET: &[u8] = b"corsair.audit.v2";

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
    let set_write = !event.origin_set.is_empty();
    field(&[if set_write { ENCODING_SET } else { ENCODING }]);
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
    if set_write {
        field(&[event.origin_set.as_bytes()]);
        let mut affected: Vec<&[u8]> = Vec::with_capacity(event.affected_services.len() * 2);
        for (i, s) in event.affected_services.iter().enumerate() {
            if i > 0 {
                affected.push(b",");
            }
            affected.push(s.as_bytes());
        }
        field(&affected);
    }
    h.finalize().into()
}

/// The result of a chain verification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verification {
    /// How many events verified before the end of the range or the first bad one.
    pub verified: u64,
    /// The first event that does not verify, and why.
    pub first_bad: Option<(u64, String)>,
    /// The last sequence of the range checked (clamped to the log and to [`MAX_EVENTS`]).
    pub end: u64,
    /// Where to go on when the range was cut at [`MAX_EVENTS`]; 0 when it was not.
    pub next_start: u64,
}

/// Why a range cannot be verified.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// `end` comes before `start`.
    #[error("end_sequence {end} is before start_sequence {start}")]
    Reversed {
        /// The start asked for.
        start: u64,
        /// The end asked for.
        end: u64,
    },
    /// `start` is past the last event.
    #[error("start_sequence {start} is past the end of the log, which has {last} events")]
    PastEnd {
        /// The start asked for.
        start: u64,
        /// The last sequence in the log.
        last: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Events one verification checks at most; a longer range says where to go on.
pub const MAX_EVENTS: u64 = 1_000_000;

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

/// Rows read per query while verifying, at most.
const BATCH: u32 = 5_000;
/// Rows read by the first query; later ones are sized by the bytes of the rows seen, so
/// that a batch of large events stays near [`BATCH_BYTES`].
const FIRST_BATCH: u32 = 64;
/// Bytes of events one query reads, about.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Batches read ahead of the one being checked.
const READ_AHEAD: usize = 3;

/// Verifies events `start..=end` (`end` 0: to the newest). Checks that sequences have no
/// gap, each event links to its predecessor's hash, and each hash matches its contents.
pub async fn verify(
    store: Arc<dyn Store>,
    start: u64,
    end: u64,
) -> Result<Verification, RangeError> {
    let start = start.max(1);
    if end != 0 && end < start {
        return Err(RangeError::Reversed { start, end });
    }
    let last = store.head().await?.last_sequence;
    if last == 0 && end == 0 && start == 1 {
        return Ok(Verification::default());
    }
    if start > last {
        return Err(RangeError::PastEnd { start, last });
    }
    let asked = if end == 0 { last } else { end.min(last) };
    let end = asked.min(start.saturating_add(MAX_EVENTS - 1));
    let next_start = if end < asked { end + 1 } else { 0 };
    let mut verification = check_range(store, start, end).await?;
    verification.end = end;
    verification.next_start = if verification.first_bad.is_none() {
        next_start
    } else {
        0
    };
    Ok(verification)
}

/// Verifies `start..=end`, a range within the log.
async fn check_range(
    store: Arc<dyn Store>,
    start: u64,
    end: u64,
) -> Result<Verification, StoreError> {
    let mut prev_hash = if start == 1 {
        GENESIS.to_vec()
    } else {
        match store.get_audit(start - 1).await? {
            Some(e) => e.hash,
            None => {
                return Ok(Verification {
                    first_bad: Some((start - 1, "event is missing".into())),
                    ..Verification::default()
                });
            }
        }
    };
    // Batches are read ahead on separate connections (on SQLite, separate worker threads)
    // and checked in order, so reading and hashing proceed in parallel.
    let fetch = |after: u64, rows: u32| {
        let store = store.clone();
        tokio::spawn(async move { store.audit_after(after, rows).await })
    };
    let mut rows = FIRST_BATCH;
    let mut next_after = start - 1;
    let mut in_flight = VecDeque::new();
    while in_flight.len() < READ_AHEAD && next_after < end {
        in_flight.push_back(fetch(next_after, rows));
        next_after += u64::from(rows);
    }
    let mut expected = start;
    let mut verified = 0;
    while let Some(read) = in_flight.pop_front() {
        let batch = match read.await.map_err(|_| StoreError::Unavailable)? {
            Err(StoreError::Corrupt(why)) => {
                in_flight.iter().for_each(|r| r.abort());
                let first_bad = unreadable(store.as_ref(), end, expected, prev_hash, why).await?;
                return Ok(Verification {
                    verified: verified + first_bad.0 - expected,
                    first_bad: Some(first_bad),
                    ..Verification::default()
                });
            }
            read => read?,
        };
        rows = batch_rows(&batch);
        if next_after < end {
            in_flight.push_back(fetch(next_after, rows));
            next_after += u64::from(rows);
        }
        if let Some(bad) = check_batch(&batch, end, &mut expected, &mut prev_hash, &mut verified) {
            in_flight.iter().for_each(|r| r.abort());
            return Ok(Verification {
                verified,
                first_bad: Some(bad),
                ..Verification::default()
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
            ..Verification::default()
        });
    }
    Ok(Verification {
        verified,
        ..Verification::default()
    })
}

/// Finds the first event from `expected` on that cannot be read (or is wrong), reading one
/// event at a time after a batch failed to decode with `why`.
async fn unreadable(
    store: &dyn Store,
    end: u64,
    mut expected: u64,
    mut prev_hash: Vec<u8>,
    why: String,
) -> Result<(u64, String), StoreError> {
    let mut verified = 0;
    while expected <= end {
        match store.audit_after(expected - 1, 1).await {
            Err(StoreError::Corrupt(why)) => return Ok((expected, why)),
            Err(e) => return Err(e),
            Ok(one) => {
                if let Some(bad) =
                    check_batch(&one, end, &mut expected, &mut prev_hash, &mut verified)
                {
                    return Ok(bad);
                }
                if one.is_empty() {
                    break;
                }
            }
        }
    }
    Ok((expected, why))
}

/// How many rows the next query reads: about [`BATCH_BYTES`] of events the size of
/// `batch`'s, within `1..=BATCH`.
fn batch_rows(batch: &[AuditEvent]) -> u32 {
    let bytes: usize = batch.iter().map(AuditEvent::approximate_size).sum();
    let average = (bytes / batch.len().max(1)).max(1);
    u32::try_from(BATCH_BYTES / average)
        .unwrap_or(BATCH)
        .clamp(1, BATCH)
}
