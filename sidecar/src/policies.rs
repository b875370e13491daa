//! The policies a sidecar enforces: service → compiled policy, in one `ArcSwap`, with the
//! origin sets they reference. A request loads one snapshot and uses it from start to
//! finish, so a swap never mixes two policies in one response. An update (its sets first,
//! then its policies, resolved against them) is validated and compiled whole before it is
//! swapped in; if any set or policy in it is invalid, nothing changes.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use corsair_policy::{CompiledPolicy, PolicySpec, lint_with_sets};
use corsair_proto::v1;

use crate::origin_sets::{HeldSet, assemble, to_content};

/// One enforced policy.
#[derive(Debug)]
pub struct Active {
    /// The compiled policy.
    pub compiled: CompiledPolicy,
    /// The revision at which it last changed, its origin sets included.
    pub revision: i64,
    /// The policy as received, for the cache file and for showing where it came from.
    pub wire: v1::Policy,
}

/// Service → policy.
pub type Services = HashMap<String, Arc<Active>, foldhash::fast::RandomState>;

/// Every enforced policy at one global revision.
#[derive(Debug, Default)]
pub struct Policies {
    /// The global revision of the last update applied (0: none yet).
    pub revision: i64,
    /// Service → policy, looked up once per request (with foldhash, which hashes a short
    /// name in fewer instructions than std's SipHash).
    pub services: Services,
    /// When the enforced policies last changed (`None`: never).
    pub applied_at: Option<std::time::Instant>,
    /// Set name → the origin set held. Every set received is kept for the life of a stream
    /// (so the control plane knows exactly what a delta may apply to); sets no policy
    /// references are dropped when a stream opens ([`PolicySet::prune_sets`]).
    pub sets: HashMap<String, HeldSet>,
}

/// The swappable set.
#[derive(Debug)]
pub struct PolicySet {
    current: ArcSwap<Policies>,
    /// The revision of the last applied update, for whoever waits on one.
    applied: tokio::sync::watch::Sender<i64>,
}

impl Default for PolicySet {
    fn default() -> Self {
        PolicySet {
            current: ArcSwap::default(),
            applied: tokio::sync::watch::channel(0).0,
        }
    }
}

/// Why an update was refused; the sidecar keeps its last good policies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A policy in the update is not a valid policy.
    #[error("service {service}: {error}")]
    Invalid {
        /// The service whose policy is invalid.
        service: String,
        /// What is wrong.
        error: String,
    },
    /// An origin set in the update cannot be assembled or is invalid.
    #[error("{0}")]
    InvalidSet(String),
}

impl PolicySet {
    /// Follows the revision of applied updates.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// The current policies (one atomic load).
    pub fn load(&self) -> Arc<Policies> {
        self.current.load_full()
    }

    /// Everything held, as one snapshot response: what the cache file stores, and what
    /// [`apply`](Self::apply) restores.
    pub fn to_snapshot(&self) -> v1::DiscoveryResponse {
        let current = self.current.load();
        let mut upserts: Vec<v1::Policy> =
            current.services.values().map(|a| a.wire.clone()).collect();
        upserts.sort_by(|a, b| a.service.cmp(&b.service));
        let mut origin_sets: Vec<v1::OriginSetContent> = current
            .sets
            .iter()
            .map(|(name, held)| to_content(name, held))
            .collect();
        origin_sets.sort_by(|a, b| a.name.cmp(&b.name));
        v1::DiscoveryResponse {
            revision: current.revision,
            upserts,
            snapshot: true,
            origin_sets,
            ..Default::default()
        }
    }

    /// The revision of each origin set held, for resuming a stream.
    pub fn known_origin_sets(&self) -> HashMap<String, i64> {
        self.current
            .load()
            .sets
            .iter()
            .map(|(name, held)| (name.clone(), held.revision))
            .collect()
    }

    /// Drops the origin sets no held policy references; called as a stream opens, before
    /// [`known_origin_sets`](Self::known_origin_sets) reports what is held.
    pub fn prune_sets(&self) {
        self.current.rcu(|current| {
            let used: std::collections::HashSet<&str> = current
                .services
                .values()
                .flat_map(|a| a.compiled.policy().all_sets().map(|s| s.name()))
                .collect();
            let sets: HashMap<String, HeldSet> = current
                .sets
                .iter()
                .filter(|(name, _)| used.contains(name.as_str()))
                .map(|(name, held)| (name.clone(), held.clone()))
                .collect();
            Arc::new(Policies {
                revision: current.revision,
                services: current.services.clone(),
                applied_at: current.applied_at,
                sets,
            })
        });
    }

    /// The revision of each policy held, for resuming a stream.
    pub fn known_revisions(&self) -> HashMap<String, i64> {
        self.current
            .load()
            .services
            .iter()
            .map(|(s, a)| (s.clone(), a.revision))
            .collect()
    }

    /// Applies a control-plane response: validates and compiles every upsert, then swaps in
    /// the new set at once. A snapshot replaces everything; otherwise removals drop policies.
    pub fn apply(&self, response: &v1::DiscoveryResponse) -> Result<Arc<Policies>, ApplyError> {
        let current = self.current.load();
        let mut services = if response.snapshot {
            Services::default()
        } else {
            current.services.clone()
        };
        let mut sets = current.sets.clone();
        for content in &response.origin_sets {
            let held =
                assemble(content, sets.get(&content.name)).map_err(ApplyError::InvalidSet)?;
            sets.insert(content.name.clone(), held);
        }
        let lookup = |name: &str| sets.get(name).map(|held| held.set.clone());
        for wire in &response.upserts {
            let invalid = |error: String| ApplyError::Invalid {
                service: wire.service.clone(),
                error,
            };
            let spec = PolicySpec::try_from(wire).map_err(|e| invalid(e.to_string()))?;
            let (policy, findings) = lint_with_sets(&spec, &lookup);
            let Some(policy) = policy else {
                let errors: Vec<String> = findings
                    .iter()
                    .filter(|f| f.severity == corsair_policy::Severity::Error)
                    .map(ToString::to_string)
                    .collect();
                return Err(invalid(errors.join("; ")));
            };
            services.insert(
                spec.service.clone(),
                Arc::new(Active {
                    compiled: CompiledPolicy::new(policy),
                    revision: wire.effective_revision.max(wire.revision),
                    wire: wire.clone(),
                }),
            );
        }
        for removed in &response.removals {
            services.remove(removed);
        }
        // The update time moves only when what is enforced changes (a resync that carries
        // the same policies again does not count).
        let changed = services.len() != current.services.len()
            || services.iter().any(|(name, active)| {
                current.services.get(name).is_none_or(|held| {
                    held.wire != active.wire || held.compiled.policy() != active.compiled.policy()
                })
            });
        let next = Arc::new(Policies {
            revision: response.revision.max(current.revision),
            services,
            sets,
            applied_at: if changed {
                Some(std::time::Instant::now())
            } else {
                current.applied_at
            },
        });
        self.current.store(next.clone());
        self.applied.send_replace(next.revision);
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(service: &str, origin: &str, revision: i64) -> v1::Policy {
        v1::Policy {
            service: service.into(),
            allowed_origins: vec![origin.into()],
            revision,
            ..Default::default()
        }
    }

    fn origins(set: &PolicySet, service: &str) -> Option<Vec<String>> {
        set.load()
            .services
            .get(service)
            .map(|a| a.compiled.policy().spec().allowed_origins.clone())
    }

    #[test]
    fn an_invalid_update_changes_nothing() {
        let set = PolicySet::default();
        set.apply(&v1::DiscoveryResponse {
            revision: 1,
            upserts: vec![policy("shop", "https://a.example.com", 1)],
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        // One valid and one invalid policy: all or nothing.
        let err = set
            .apply(&v1::DiscoveryResponse {
                revision: 3,
                upserts: vec![
                    policy("blog", "https://b.example.com", 2),
                    policy("shop", "https://bad.example.com/path", 3),
                ],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("allowed_origins[0]"), "{err}");
        assert_eq!(origins(&set, "shop").unwrap(), ["https://a.example.com"]);
        assert!(origins(&set, "blog").is_none());
        assert_eq!(set.load().revision, 1);
        assert_eq!(
            set.known_revisions(),
            HashMap::from([("shop".to_owned(), 1)])
        );
    }

    #[test]
    fn snapshots_replace_and_removals_drop() {
        let set = PolicySet::default();
        set.apply(&v1::DiscoveryResponse {
            revision: 2,
            upserts: vec![
                policy("a", "https://a.com", 1),
                policy("b", "https://b.com", 2),
            ],
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        set.apply(&v1::DiscoveryResponse {
            revision: 3,
            removals: vec!["a".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(origins(&set, "a").is_none());
        set.apply(&v1::DiscoveryResponse {
            revision: 4,
            upserts: vec![policy("c", "https://c.com", 4)],
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        let names: Vec<String> = set.load().services.keys().cloned().collect();
        assert_eq!(names, ["c"]);
        assert_eq!(set.load().revision, 4);
    }

    fn corp(revision: i64, origins: &[&str]) -> v1::OriginSetContent {
        let mut sorted: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
        sorted.sort();
        v1::OriginSetContent {
            name: "corp".into(),
            revision,
            digest: corsair_policy::origin_set::digest(&sorted).to_vec(),
            added: sorted,
            ..Default::default()
        }
    }

    fn allows(set: &PolicySet, service: &str, origin: &str) -> bool {
        let policies = set.load();
        let mut headers = http::HeaderMap::new();
        headers.insert("origin", origin.parse().unwrap());
        policies.services[service]
            .compiled
            .decide(&corsair_policy::Request::new(&http::Method::GET, &headers))
            .allowed
    }

    #[test]
    fn sets_resolve_and_survive_the_cache_file() {
        let set = PolicySet::default();
        let mut shop = policy("shop", "set:corp", 2);
        shop.effective_revision = 3;
        set.apply(&v1::DiscoveryResponse {
            revision: 3,
            upserts: vec![shop],
            snapshot: true,
            origin_sets: vec![corp(3, &["https://checkout.example.com"])],
            ..Default::default()
        })
        .unwrap();
        assert!(allows(&set, "shop", "https://checkout.example.com"));
        assert_eq!(set.known_revisions()["shop"], 3);
        assert_eq!(set.known_origin_sets()["corp"], 3);

        // What the cache file keeps restores the same decisions.
        let restored = PolicySet::default();
        restored.apply(&set.to_snapshot()).unwrap();
        assert!(allows(&restored, "shop", "https://checkout.example.com"));
        assert!(!allows(&restored, "shop", "https://evil.example.com"));

        // A policy whose set is not held is refused, and nothing changes.
        let err = set
            .apply(&v1::DiscoveryResponse {
                revision: 4,
                upserts: vec![policy("blog", "set:missing", 4)],
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("UNKNOWN_ORIGIN_SET"), "{err}");
        assert!(!set.load().services.contains_key("blog"));
    }

    #[test]
    fn unreferenced_sets_are_dropped_when_a_stream_opens() {
        let set = PolicySet::default();
        set.apply(&v1::DiscoveryResponse {
            revision: 3,
            upserts: vec![policy("shop", "set:corp", 3)],
            snapshot: true,
            origin_sets: vec![corp(2, &["https://checkout.example.com"])],
            ..Default::default()
        })
        .unwrap();
        set.apply(&v1::DiscoveryResponse {
            revision: 4,
            upserts: vec![policy("shop", "https://shop.example.com", 4)],
            ..Default::default()
        })
        .unwrap();
        // Kept while the stream lives: the control plane may send a delta against it.
        assert_eq!(set.known_origin_sets().len(), 1);
        set.prune_sets();
        assert!(set.known_origin_sets().is_empty());
    }
}
