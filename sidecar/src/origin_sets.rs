//! Origin sets on the sidecar: each set the control plane sends, whole or as a delta against
//! the one held, is assembled, checked against its digest, validated and compiled. A set is
//! compiled once per process, however many policies use it: sets are interned by name,
//! revision and digest, so the policies of every service (and every simulated sidecar of a
//! fleet in one process) share one compiled copy.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use corsair_policy::origin_set::digest;
use corsair_policy::{OriginSet, OriginSetSpec, lint_set};
use corsair_proto::v1;

/// A set held, at a revision.
#[derive(Debug, Clone)]
pub struct HeldSet {
    /// The revision of the set's last write.
    pub revision: i64,
    /// The set, validated and compiled.
    pub set: Arc<OriginSet>,
}

/// Name, revision and digest → the compiled set, while anything holds it.
type Interned = HashMap<(String, i64, [u8; 32]), Weak<OriginSet>>;

static INTERNED: LazyLock<Mutex<Interned>> = LazyLock::new(Mutex::default);

/// Builds the set `content` describes from `held` (the copy this sidecar has, needed for a
/// delta), checks it against the digest sent, and validates it. The error says why the set
/// cannot be used.
pub fn assemble(content: &v1::OriginSetContent, held: Option<&HeldSet>) -> Result<HeldSet, String> {
    let name = content.name.as_str();
    let digest_sent: [u8; 32] = content
        .digest
        .as_slice()
        .try_into()
        .map_err(|_| format!("origin set {name}: the digest is not 32 bytes"))?;
    let key = (name.to_owned(), content.revision, digest_sent);
    if let Some(set) = INTERNED
        .lock()
        .expect("interned sets")
        .get(&key)
        .and_then(Weak::upgrade)
    {
        return Ok(HeldSet {
            revision: content.revision,
            set,
        });
    }
    let origins: Vec<String> = if content.base_revision == 0 {
        let mut all = content.added.clone();
        all.sort();
        all.dedup();
        all
    } else {
        let base = held
            .filter(|h| h.revision == content.base_revision)
            .ok_or_else(|| {
                format!(
                    "origin set {name}: a delta against revision {} while holding {}",
                    content.base_revision,
                    held.map_or("none".to_owned(), |h| h.revision.to_string())
                )
            })?;
        let removed: BTreeSet<&str> = content.removed.iter().map(String::as_str).collect();
        let mut all: BTreeSet<&str> = base
            .set
            .origins()
            .iter()
            .map(String::as_str)
            .filter(|o| !removed.contains(o))
            .collect();
        all.extend(content.added.iter().map(String::as_str));
        all.into_iter().map(str::to_owned).collect()
    };
    if digest(&origins) != digest_sent {
        return Err(format!(
            "origin set {name} at revision {}: the entries do not match the digest sent",
            content.revision
        ));
    }
    let (set, findings) = lint_set(&OriginSetSpec {
        name: name.to_owned(),
        description: String::new(),
        origins,
    });
    let set = set.ok_or_else(|| {
        let errors: Vec<String> = findings
            .iter()
            .filter(|f| f.severity == corsair_policy::Severity::Error)
            .map(ToString::to_string)
            .collect();
        format!("origin set {name}: {}", errors.join("; "))
    })?;
    let mut interned = INTERNED.lock().expect("interned sets");
    // Forget sets nobody holds any more, now and then.
    if interned.len() >= 64 && interned.len().is_power_of_two() {
        interned.retain(|_, weak| weak.strong_count() > 0);
    }
    interned.insert(key, Arc::downgrade(&set));
    Ok(HeldSet {
        revision: content.revision,
        set,
    })
}

/// A held set as a whole-set content, for the cache file.
pub fn to_content(name: &str, held: &HeldSet) -> v1::OriginSetContent {
    v1::OriginSetContent {
        name: name.to_owned(),
        revision: held.revision,
        digest: held.set.digest().to_vec(),
        base_revision: 0,
        added: held.set.origins().to_vec(),
        removed: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(name: &str, revision: i64, origins: &[&str]) -> v1::OriginSetContent {
        let mut sorted: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
        sorted.sort();
        v1::OriginSetContent {
            name: name.into(),
            revision,
            digest: digest(&sorted).to_vec(),
            base_revision: 0,
            added: sorted,
            removed: vec![],
        }
    }

    #[test]
    fn a_delta_rebuilds_the_set_and_is_checked_against_its_digest() {
        let first = assemble(
            &whole(
                "corp",
                1,
                &["https://a.example.com", "https://b.example.com"],
            ),
            None,
        )
        .unwrap();
        let target = ["https://a.example.com", "https://c.example.com"];
        let mut delta = whole("corp", 2, &target);
        delta.base_revision = 1;
        delta.added = vec!["https://c.example.com".into()];
        delta.removed = vec!["https://b.example.com".into()];
        let second = assemble(&delta, Some(&first)).unwrap();
        assert_eq!(second.set.origins(), target);
        // Interned: the same revision assembles to the same compiled set.
        assert!(Arc::ptr_eq(
            &second.set,
            &assemble(&delta, Some(&first)).unwrap().set
        ));

        // A delta against a revision not held, or one that does not add up, is refused.
        let mut stale = delta.clone();
        stale.revision = 3;
        stale.base_revision = 7;
        assert!(
            assemble(&stale, Some(&first))
                .unwrap_err()
                .contains("delta against revision 7")
        );
        let mut wrong = delta.clone();
        wrong.revision = 4;
        wrong.added = vec!["https://evil.example.com".into()];
        assert!(
            assemble(&wrong, Some(&first))
                .unwrap_err()
                .contains("digest")
        );
    }

    #[test]
    fn an_invalid_set_is_refused() {
        let err = assemble(&whole("corp", 1, &["https://a.example.com/path"]), None).unwrap_err();
        assert!(err.contains("origins[0]"), "{err}");
    }
}
