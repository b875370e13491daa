//! Why a call was refused: [`WriteError`]. Each refusal maps to one audit [`Outcome`] and
//! carries what its gRPC status reports in its details: a domain reason, the resource that
//! was missing, the current etag, or the roles that may call.

use corsair_policy::Rejected;

use super::Outcome;

/// A kind of resource, as `NOT_FOUND` and `ALREADY_EXISTS` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// `services/{service}/policy`.
    Policy,
    /// `services/{service}/policy/revisions/{revision}`.
    PolicyRevision,
    /// `auditEvents/{sequence}`.
    AuditEvent,
    /// `sidecars/{sidecar_id}`.
    Sidecar,
    /// `tokens/{id}`.
    Token,
    /// `originSets/{set}`.
    OriginSet,
    /// `originSets/{set}/revisions/{revision}`.
    OriginSetRevision,
}

impl ResourceKind {
    /// The message type of the resource, as `google.rpc.ResourceInfo.resource_type`.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Policy => "type.googleapis.com/corsair.v1.Policy",
            ResourceKind::PolicyRevision => "type.googleapis.com/corsair.v1.PolicyRevision",
            ResourceKind::AuditEvent => "type.googleapis.com/corsair.v1.AuditEvent",
            ResourceKind::Sidecar => "type.googleapis.com/corsair.v1.Sidecar",
            ResourceKind::Token => "type.googleapis.com/corsair.v1.Token",
            ResourceKind::OriginSet => "type.googleapis.com/corsair.v1.OriginSet",
            ResourceKind::OriginSetRevision => "type.googleapis.com/corsair.v1.OriginSetRevision",
        }
    }

    /// The resource's part of an error reason (`POLICY` in `POLICY_NOT_FOUND`).
    fn reason_stem(self) -> &'static str {
        match self {
            ResourceKind::Policy => "POLICY",
            ResourceKind::PolicyRevision => "REVISION",
            ResourceKind::AuditEvent => "AUDIT_EVENT",
            ResourceKind::Sidecar => "SIDECAR",
            ResourceKind::Token => "TOKEN",
            ResourceKind::OriginSet => "SET",
            ResourceKind::OriginSetRevision => "REVISION",
        }
    }
}

/// Why a call was refused. Each maps to one [`Outcome`] and one gRPC code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The resource does not exist.
    #[error("{message}")]
    NotFound {
        /// What kind of resource.
        kind: ResourceKind,
        /// Its resource name.
        name: String,
        /// For people.
        message: String,
    },
    /// Created twice.
    #[error("{message}")]
    AlreadyExists {
        /// What kind of resource.
        kind: ResourceKind,
        /// Its resource name (empty when the clash is not on a name).
        name: String,
        /// For people.
        message: String,
    },
    /// The etag given is not the current one.
    #[error("{message}")]
    Conflict {
        /// The resource's etag now.
        current_etag: String,
        /// The resource's revision now.
        current_revision: i64,
        /// For people.
        message: String,
    },
    /// The policy is invalid, or a risk is not acknowledged.
    #[error(transparent)]
    Invalid(Box<Rejected>),
    /// The origin set is invalid, or it would make a referrer invalid, or a risk (of the set
    /// or of a referrer) is not acknowledged.
    #[error(transparent)]
    InvalidSet(Box<Rejected>),
    /// An origin set cannot be deleted while policies reference it.
    #[error("{name} is referenced by {}", .referrers.join(", "))]
    SetInUse {
        /// The set's resource name.
        name: String,
        /// The resource names of the referring policies.
        referrers: Vec<String>,
    },
    /// The request does not fit the current state.
    #[error("{message}")]
    FailedPrecondition {
        /// The domain reason, such as `REVISION_IS_DELETION`.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// No credential, or one that is not (or no longer) valid.
    #[error("{message}")]
    Unauthenticated {
        /// The domain reason, such as `TOKEN_REVOKED`.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// A known identity that may not make the call.
    #[error("{message}")]
    PermissionDenied {
        /// The domain reason, such as `ROLE_REQUIRED`.
        reason: &'static str,
        /// The roles that may make the call (empty when no role may).
        required_roles: Vec<&'static str>,
        /// For people.
        message: String,
    },
    /// A malformed request (bad name, bad mask, missing etag, …).
    #[error("{field}: {message}")]
    BadRequest {
        /// The request field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl WriteError {
    /// A resource that does not exist.
    pub fn not_found(
        kind: ResourceKind,
        name: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        WriteError::NotFound {
            kind,
            name: name.into(),
            message: message.into(),
        }
    }

    /// A malformed request field.
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        WriteError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The outcome the audit log records for this refusal.
    pub fn outcome(&self) -> Outcome {
        match self {
            WriteError::NotFound { .. } => Outcome::NotFound,
            WriteError::AlreadyExists { .. } => Outcome::AlreadyExists,
            WriteError::Conflict { .. } => Outcome::Conflict,
            WriteError::Invalid(r) | WriteError::InvalidSet(r) if r.only_risks() => {
                Outcome::RiskNotAcknowledged
            }
            WriteError::Invalid(_) | WriteError::InvalidSet(_) | WriteError::BadRequest { .. } => {
                Outcome::Invalid
            }
            WriteError::FailedPrecondition { .. } | WriteError::SetInUse { .. } => {
                Outcome::FailedPrecondition
            }
            WriteError::Unauthenticated { .. } | WriteError::PermissionDenied { .. } => {
                Outcome::Denied
            }
        }
    }

    /// The domain reason a status reports in its `google.rpc.ErrorInfo`: never the status
    /// code again, always what went wrong in Corsair's terms.
    pub fn reason(&self) -> String {
        match self {
            WriteError::NotFound { kind, .. } => format!("{}_NOT_FOUND", kind.reason_stem()),
            WriteError::AlreadyExists { kind, .. } => {
                format!("{}_ALREADY_EXISTS", kind.reason_stem())
            }
            WriteError::Conflict { .. } => "ETAG_MISMATCH".into(),
            WriteError::Invalid(rejected) | WriteError::InvalidSet(rejected)
                if rejected.only_risks() =>
            {
                "RISK_NOT_ACKNOWLEDGED".into()
            }
            WriteError::Invalid(_) => "INVALID_POLICY".into(),
            WriteError::InvalidSet(_) => "INVALID_SET".into(),
            WriteError::SetInUse { .. } => "SET_IN_USE".into(),
            WriteError::FailedPrecondition { reason, .. }
            | WriteError::Unauthenticated { reason, .. }
            | WriteError::PermissionDenied { reason, .. } => (*reason).to_owned(),
            WriteError::BadRequest { field, .. } => invalid_field_reason(field),
        }
    }
}

/// `INVALID_` and the last segment of a field path, upper-cased: `INVALID_PAGE_TOKEN` for
/// `page_token`, `INVALID_ETAG` for `policy.etag`.
fn invalid_field_reason(field: &str) -> String {
    let leaf = field
        .rsplit('.')
        .next()
        .unwrap_or(field)
        .split('[')
        .next()
        .unwrap_or_default();
    if leaf.is_empty() {
        return "INVALID_REQUEST".into();
    }
    format!("INVALID_{}", leaf.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_on_a_character_boundary_within_its_bound() {
        use crate::store::capped;
        // 'é' is two bytes and '…' three: "h" + "…" is the most of "héllo" 5 bytes hold.
        assert_eq!(capped("héllo".into(), 5), "h…");
        assert_eq!(capped("héllo world".into(), 6), "hé…");
        assert_eq!(capped("short".into(), 10), "short");
        assert!(capped("x".repeat(5000), 4096).len() <= 4096);
    }

    #[test]
    fn reasons_name_the_cause_not_the_code() {
        let cases = [
            (
                WriteError::not_found(ResourceKind::Policy, "services/a/policy", "x"),
                "POLICY_NOT_FOUND",
            ),
            (
                WriteError::not_found(ResourceKind::AuditEvent, "auditEvents/9", "x"),
                "AUDIT_EVENT_NOT_FOUND",
            ),
            (
                WriteError::Conflict {
                    current_etag: "\"e\"".into(),
                    current_revision: 3,
                    message: "x".into(),
                },
                "ETAG_MISMATCH",
            ),
            (
                WriteError::bad_request("page_token", "x"),
                "INVALID_PAGE_TOKEN",
            ),
            (WriteError::bad_request("policy.etag", "x"), "INVALID_ETAG"),
            (
                WriteError::bad_request("policy.allowed_origins[2]", "x"),
                "INVALID_ALLOWED_ORIGINS",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(error.reason(), reason, "{error:?}");
        }
    }
}
