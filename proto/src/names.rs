//! Resource names (AIP-122): how each `corsair.v1` resource is named, and the parsers that
//! take a name apart. Clients and the control plane share them, so both spell names alike.

/// A string that is not the resource name it was taken for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a {kind} name: expected {pattern}")]
pub struct NameError {
    /// What was given.
    pub name: String,
    /// The kind of resource expected, for people (`policy`, `sidecar`, …).
    pub kind: &'static str,
    /// The pattern a name of that kind follows.
    pub pattern: &'static str,
}

/// The resource name of a service's policy, `services/{service}/policy`.
pub fn policy_name(service: &str) -> String {
    format!("services/{service}/policy")
}

/// The service a policy resource name (`services/{service}/policy`) names.
pub fn parse_policy_name(name: &str) -> Result<&str, NameError> {
    name.strip_prefix("services/")
        .and_then(|rest| rest.strip_suffix("/policy"))
        .filter(|s| segment(s))
        .ok_or_else(|| error(name, "policy", "services/{service}/policy"))
}

/// The resource name of one revision of a service's policy.
pub fn revision_name(service: &str, revision: i64) -> String {
    format!("services/{service}/policy/revisions/{revision}")
}

/// The resource name of an origin set, `originSets/{set}`.
pub fn origin_set_name(set: &str) -> String {
    format!("originSets/{set}")
}

/// The set an origin set's resource name (`originSets/{set}`) names.
pub fn parse_origin_set_name(name: &str) -> Result<&str, NameError> {
    name.strip_prefix("originSets/")
        .filter(|s| segment(s))
        .ok_or_else(|| error(name, "origin set", "originSets/{set}"))
}

/// The resource name of one revision of an origin set.
pub fn origin_set_revision_name(set: &str, revision: i64) -> String {
    format!("originSets/{set}/revisions/{revision}")
}

/// The resource name of an audit event, `auditEvents/{sequence}`.
pub fn audit_event_name(sequence: u64) -> String {
    format!("auditEvents/{sequence}")
}

/// The sequence number an audit event's resource name (`auditEvents/{sequence}`) names.
pub fn parse_audit_event_name(name: &str) -> Result<u64, NameError> {
    name.strip_prefix("auditEvents/")
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            error(
                name,
                "audit event",
                "auditEvents/{sequence}, sequence from 1",
            )
        })
}

/// The resource name of a sidecar, `sidecars/{sidecar_id}`.
pub fn sidecar_name(sidecar_id: &str) -> String {
    format!("sidecars/{sidecar_id}")
}

/// The sidecar id a sidecar's resource name (`sidecars/{sidecar_id}`) names.
pub fn parse_sidecar_name(name: &str) -> Result<&str, NameError> {
    name.strip_prefix("sidecars/")
        .filter(|s| segment(s))
        .ok_or_else(|| error(name, "sidecar", "sidecars/{sidecar_id}"))
}

/// The resource name of an access token, `tokens/{id}`.
pub fn token_name(id: &str) -> String {
    format!("tokens/{id}")
}

/// The token id a token's resource name (`tokens/{id}`) names.
pub fn parse_token_name(name: &str) -> Result<&str, NameError> {
    name.strip_prefix("tokens/")
        .filter(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| error(name, "token", "tokens/{id}, id 16 hex digits"))
}

/// Whether `s` can be one segment of a name: not empty, no `/`.
fn segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/')
}

fn error(name: &str, kind: &'static str, pattern: &'static str) -> NameError {
    NameError {
        name: name.to_owned(),
        kind,
        pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_policy_name(&policy_name("shop")), Ok("shop"));
        assert_eq!(parse_audit_event_name(&audit_event_name(42)), Ok(42));
        assert_eq!(parse_sidecar_name(&sidecar_name("shop-1")), Ok("shop-1"));
        assert_eq!(
            parse_token_name(&token_name("0123456789abcdef")),
            Ok("0123456789abcdef")
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "services//policy",
            "services/a/b/policy",
            "shop",
            "services/shop",
        ] {
            assert!(parse_policy_name(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "auditEvents/",
            "auditEvents/0",
            "auditEvents/-1",
            "auditEvents/+1",
            "7",
        ] {
            assert!(parse_audit_event_name(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "sidecars/", "sidecars/a/b", "a"] {
            assert!(parse_sidecar_name(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "tokens/abc",
            "tokens/0123456789abcdeg",
            "0123456789abcdef",
        ] {
            assert!(parse_token_name(bad).is_err(), "{bad:?}");
        }
    }
}
