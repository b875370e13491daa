//! Conversions between `corsair.v1` wire types and the domain, and the mapping of domain
//! errors to gRPC statuses with `google.rpc` details.

use corsair_policy::{Finding, PolicySpec, Rejected, Severity};
use corsair_proto::v1;
use prost_types::Timestamp;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::{AuditEvent, Outcome, RevisionRecord, StoreError, StoredPolicy, WriteError};

/// The `google.rpc.ErrorInfo` domain of Corsair's errors.
pub const ERROR_DOMAIN: &str = "corsair.dev";

pub use corsair_proto::convert::policy_name;

/// The service a policy resource name (`services/{service}/policy`) names.
pub fn parse_policy_name(name: &str) -> Result<&str, WriteError> {
    corsair_proto::convert::parse_policy_name(name).map_err(|e| WriteError::BadRequest {
        field: "name".into(),
        message: e.to_string(),
    })
}

/// Unix microseconds to a protobuf timestamp.
pub fn timestamp(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// A protobuf timestamp to Unix microseconds.
pub fn micros(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

/// The wire policy of a spec, without bookkeeping.
pub fn spec_to_proto(spec: &PolicySpec) -> v1::Policy {
    v1::Policy::from(spec)
}

/// The wire policy of a stored one.
pub fn stored_to_proto(p: &StoredPolicy) -> v1::Policy {
    v1::Policy {
        revision: p.revision,
        etag: p.etag(),
        create_time: Some(timestamp(p.create_time)),
        update_time: Some(timestamp(p.update_time)),
        update_actor: p.update_actor.clone(),
        ..spec_to_proto(&p.spec)
    }
}

/// The spec a wire policy carries (see `TryFrom<&v1::Policy> for PolicySpec`).
pub fn spec_from_proto(p: &v1::Policy) -> Result<PolicySpec, WriteError> {
    PolicySpec::try_from(p).map_err(|e| WriteError::BadRequest {
        field: format!("policy.{}", e.field()),
        message: e.to_string(),
    })
}

/// A lint finding on the wire.
pub fn finding_to_proto(f: &Finding) -> v1::Finding {
    v1::Finding {
        field: f.field.clone(),
        code: f.code.as_str().to_owned(),
        severity: match f.severity {
            Severity::Error => v1::Severity::Error,
            Severity::Risk => v1::Severity::Risk,
            Severity::Notice => v1::Severity::Notice,
        } as i32,
        message: f.message.clone(),
    }
}

/// The wire outcome of a domain one.
pub fn outcome_to_proto(o: Outcome) -> v1::Outcome {
    match o {
        Outcome::Ok => v1::Outcome::Ok,
        Outcome::Invalid => v1::Outcome::Invalid,
        Outcome::Conflict => v1::Outcome::Conflict,
        Outcome::NotFound => v1::Outcome::NotFound,
        Outcome::AlreadyExists => v1::Outcome::AlreadyExists,
        Outcome::RiskNotAcknowledged => v1::Outcome::RiskNotAcknowledged,
        Outcome::Denied => v1::Outcome::Denied,
        Outcome::FailedPrecondition => v1::Outcome::FailedPrecondition,
    }
}

/// The domain outcome of a wire one (`None` for unspecified).
pub fn outcome_from_proto(o: i32) -> Result<Option<Outcome>, Status> {
    Ok(match v1::Outcome::try_from(o) {
        Ok(v1::Outcome::Unspecified) => None,
        Ok(v1::Outcome::Ok) => Some(Outcome::Ok),
        Ok(v1::Outcome::Invalid) => Some(Outcome::Invalid),
        Ok(v1::Outcome::Conflict) => Some(Outcome::Conflict),
        Ok(v1::Outcome::NotFound) => Some(Outcome::NotFound),
        Ok(v1::Outcome::AlreadyExists) => Some(Outcome::AlreadyExists),
        Ok(v1::Outcome::RiskNotAcknowledged) => Some(Outcome::RiskNotAcknowledged),
        Ok(v1::Outcome::Denied) => Some(Outcome::Denied),
        Ok(v1::Outcome::FailedPrecondition) => Some(Outcome::FailedPrecondition),
        Ok(v1::Outcome::Error) | Err(_) => {
            return Err(bad_request("outcome", format!("unsupported outcome {o}")));
        }
    })
}

fn stored_spec_to_proto(json: &Option<String>) -> Option<v1::Policy> {
    json.as_deref()
        .and_then(|j| serde_json::from_str::<PolicySpec>(j).ok())
        .map(|s| spec_to_proto(&s))
}

/// An audit event on the wire.
pub fn event_to_proto(e: &AuditEvent) -> v1::AuditEvent {
    v1::AuditEvent {
        sequence: e.sequence,
        time: Some(timestamp(e.time)),
        actor: e.actor.clone(),
        method: e.method.clone(),
        service: e.service.clone(),
        revision: e.revision,
        before: stored_spec_to_proto(&e.before),
        after: stored_spec_to_proto(&e.after),
        changed_fields: e.changed_fields.clone(),
        reason: e.reason.clone(),
        request_id: e.request_id.clone(),
        peer: e.peer.clone(),
        outcome: outcome_to_proto(e.outcome) as i32,
        error: e.error.clone(),
        hash: e.hash.clone(),
        prev_hash: e.prev_hash.clone(),
    }
}

/// A revision on the wire.
pub fn revision_to_proto(r: &RevisionRecord) -> v1::PolicyRevision {
    v1::PolicyRevision {
        revision: r.revision,
        policy: r.spec.as_ref().map(|s| v1::Policy {
            revision: r.revision,
            etag: crate::store::etag(&r.service, r.revision),
            update_time: Some(timestamp(r.time)),
            update_actor: r.actor.clone(),
            ..spec_to_proto(s)
        }),
        deleted: r.spec.is_none(),
        time: Some(timestamp(r.time)),
        actor: r.actor.clone(),
        reason: r.reason.clone(),
        audit_sequence: r.audit_sequence,
    }
}

/// `INVALID_ARGUMENT` with one field violation.
pub fn bad_request(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let mut details = ErrorDetails::with_bad_request_violation(field, message.clone());
    details.set_error_info("INVALID_ARGUMENT", ERROR_DOMAIN, []);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        details,
    )
}

/// The status for a refused write.
pub fn write_error_status(error: &WriteError) -> Status {
    match error {
        WriteError::NotFound(m) => Status::not_found(m.clone()),
        WriteError::AlreadyExists(m) => Status::already_exists(m.clone()),
        WriteError::Conflict(m) => Status::aborted(m.clone()),
        WriteError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
        WriteError::Unauthenticated(m) => Status::unauthenticated(m.clone()),
        WriteError::PermissionDenied(m) => Status::permission_denied(m.clone()),
        WriteError::BadRequest { field, message } => bad_request(field, message.clone()),
        WriteError::Invalid(rejected) => rejected_status(rejected, "policy."),
    }
}

/// `INVALID_ARGUMENT` for a refused policy: one field violation per blocking finding, its
/// path under `prefix` and its code as the violation's reason; `ErrorInfo` says whether
/// errors (`INVALID_POLICY`) or only unacknowledged risks (`RISK_NOT_ACKNOWLEDGED`) refused it.
pub fn rejected_status(rejected: &Rejected, prefix: &str) -> Status {
    let violations: Vec<tonic_types::FieldViolation> = rejected
        .blocking
        .iter()
        .map(|f| {
            let field = if f.field.is_empty() {
                prefix.trim_end_matches('.').to_owned()
            } else {
                format!("{prefix}{}", f.field)
            };
            let mut violation = tonic_types::FieldViolation::new(field, f.message.clone());
            violation.reason = f.code.as_str().to_owned();
            violation
        })
        .collect();
    let mut details = ErrorDetails::with_bad_request(violations);
    let codes = rejected
        .blocking
        .iter()
        .map(|f| f.code.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let reason = if rejected.only_risks() {
        "RISK_NOT_ACKNOWLEDGED"
    } else {
        "INVALID_POLICY"
    };
    details.set_error_info(reason, ERROR_DOMAIN, [("codes".to_owned(), codes)]);
    let summary = rejected
        .blocking
        .iter()
        .map(|f| format!("{prefix}{}: {} [{}]", f.field, f.message, f.code))
        .collect::<Vec<_>>()
        .join("; ");
    let message = if rejected.only_risks() {
        format!("unacknowledged risks (acknowledge their codes to proceed): {summary}")
    } else {
        format!("invalid policy: {summary}")
    };
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// The status for a storage failure.
pub fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Unavailable => Status::unavailable("storage unavailable; nothing was changed"),
        StoreError::Corrupt(m) => Status::internal(m),
    }
}

/// Opaque page tokens: the kind of listing, the filter it was made for and the position,
/// hex-encoded. A token used with another filter is refused.
pub mod page_token {
    use tonic::Status;

    use super::bad_request;

    /// Encodes a token.
    pub fn encode(kind: &str, filter: &str, position: &str) -> String {
        hex::encode(format!("{kind}\0{filter}\0{position}"))
    }

    /// Cuts a listing fetched with `limit + 1` rows down to `limit`; when there was more,
    /// returns the next page's token, made from the last row kept.
    pub fn finish<T>(rows: &mut Vec<T>, limit: u32, token: impl FnOnce(&T) -> String) -> String {
        if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(token).unwrap_or_default()
        } else {
            String::new()
        }
    }

    /// Decodes a token made by [`encode`] with the same kind and filter; `None` for an empty
    /// token (the first page).
    pub fn decode(token: &str, kind: &str, filter: &str) -> Result<Option<String>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            bad_request(
                "page_token",
                "invalid page token, or made for other filters",
            )
        };
        let bytes = hex::decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.splitn(3, '\0');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(k), Some(f), Some(position)) if k == kind && f == filter => {
                Ok(Some(position.to_owned()))
            }
            _ => Err(invalid()),
        }
    }
}

/// The effective page size: 0 means `default`, anything above `max` is `max`, negative is
/// refused.
pub fn page_size(requested: i32, default: u32, max: u32) -> Result<u32, Status> {
    match requested {
        0 => Ok(default),
        n if n < 0 => Err(bad_request("page_size", "must not be negative")),
        n => Ok((n as u32).min(max)),
    }
}
