//! Conversions between `corsair.v1` wire types and the domain: resources out, with their
//! names and output-only fields; specs and filters in, refused with the field at fault.

use corsair_policy::{Finding, OriginSetSpec, PolicySpec, Severity};
use corsair_proto::{names, v1};
use prost_types::Timestamp;
use tonic::Status;

use crate::status::{bad_request, write_error_status};
use crate::store::{
    AuditEvent, Outcome, RevisionRecord, SetRevisionRecord, StoredPolicy, StoredSet, WriteError,
};

pub use corsair_proto::convert::policy_name;

/// Parses the resource name in request field `field` with `parse`; a malformed name is
/// `INVALID_ARGUMENT` naming the field.
pub fn parse_name<'a, T>(
    field: &str,
    name: &'a str,
    parse: impl FnOnce(&'a str) -> Result<T, names::NameError>,
) -> Result<T, WriteError> {
    parse(name).map_err(|e| WriteError::bad_request(field, e.to_string()))
}

/// The service a policy resource name (`services/{service}/policy`) in field `name` names.
pub fn parse_policy_name(name: &str) -> Result<&str, WriteError> {
    parse_name("name", name, names::parse_policy_name)
}

/// [`parse_name`] for a handler: the refusal as a status.
pub fn name_arg<'a, T>(
    field: &str,
    name: &'a str,
    parse: impl FnOnce(&'a str) -> Result<T, names::NameError>,
) -> Result<T, Status> {
    parse_name(field, name, parse).map_err(|e| write_error_status(&e))
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

/// The wire policy of a stored one, with the findings lint makes of it.
pub fn stored_to_proto(p: &StoredPolicy) -> v1::Policy {
    let (_, findings) = corsair_policy::lint(&p.spec);
    with_findings(
        v1::Policy {
            revision: p.revision,
            etag: p.etag(),
            create_time: Some(timestamp(p.create_time)),
            update_time: Some(timestamp(p.update_time)),
            update_actor: p.update_actor.clone(),
            ..spec_to_proto(&p.spec)
        },
        &findings,
    )
}

/// `policy` with `findings` as its output-only findings.
pub fn with_findings(policy: v1::Policy, findings: &[Finding]) -> v1::Policy {
    v1::Policy {
        findings: findings.iter().map(finding_to_proto).collect(),
        ..policy
    }
}

/// The spec a wire policy carries (see `TryFrom<&v1::Policy> for PolicySpec`).
pub fn spec_from_proto(p: &v1::Policy) -> Result<PolicySpec, WriteError> {
    PolicySpec::try_from(p)
        .map_err(|e| WriteError::bad_request(format!("policy.{}", e.field()), e.to_string()))
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

fn stored_set_to_proto(json: &Option<String>) -> Option<v1::OriginSet> {
    json.as_deref()
        .and_then(|j| serde_json::from_str::<OriginSetSpec>(j).ok())
        .map(|s| set_spec_to_proto(&s))
}

/// An origin set's spec on the wire, without bookkeeping.
pub fn set_spec_to_proto(spec: &OriginSetSpec) -> v1::OriginSet {
    v1::OriginSet {
        name: names::origin_set_name(&spec.name),
        description: spec.description.clone(),
        origins: spec.origins.clone(),
        ..Default::default()
    }
}

/// A stored origin set on the wire.
pub fn stored_set_to_wire(s: &StoredSet) -> v1::OriginSet {
    v1::OriginSet {
        revision: s.revision,
        etag: s.etag(),
        create_time: Some(timestamp(s.create_time)),
        update_time: Some(timestamp(s.update_time)),
        update_actor: s.update_actor.clone(),
        ..set_spec_to_proto(&s.spec)
    }
}

/// An origin set revision on the wire.
pub fn set_revision_to_proto(r: &SetRevisionRecord) -> v1::OriginSetRevision {
    v1::OriginSetRevision {
        name: names::origin_set_revision_name(&r.name, r.revision),
        revision: r.revision,
        origin_set: r.spec.as_ref().map(|s| v1::OriginSet {
            revision: r.revision,
            etag: crate::store::origin_sets::set_etag(&r.name, r.revision),
            update_time: Some(timestamp(r.time)),
            update_actor: r.actor.clone(),
            ..set_spec_to_proto(s)
        }),
        deleted: r.spec.is_none(),
        create_time: Some(timestamp(r.time)),
        actor: r.actor.clone(),
        reason: r.reason.clone(),
        audit_sequence: r.audit_sequence,
        affected_services: r.affected.clone(),
    }
}

/// An audit event on the wire.
pub fn event_to_proto(e: &AuditEvent) -> v1::AuditEvent {
    let set_write = !e.origin_set.is_empty();
    let (before, after, set_before, set_after) = if set_write {
        (
            None,
            None,
            stored_set_to_proto(&e.before),
            stored_set_to_proto(&e.after),
        )
    } else {
        (
            stored_spec_to_proto(&e.before),
            stored_spec_to_proto(&e.after),
            None,
            None,
        )
    };
    v1::AuditEvent {
        origin_set: if set_write {
            names::origin_set_name(&e.origin_set)
        } else {
            String::new()
        },
        origin_set_before: set_before,
        origin_set_after: set_after,
        affected_services: e.affected_services.clone(),
        name: names::audit_event_name(e.sequence),
        sequence: e.sequence,
        create_time: Some(timestamp(e.time)),
        actor: e.actor.clone(),
        method: e.method.clone(),
        service: e.service.clone(),
        revision: e.revision,
        before,
        after,
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
        name: names::revision_name(&r.service, r.revision),
        revision: r.revision,
        policy: r.spec.as_ref().map(|s| v1::Policy {
            revision: r.revision,
            etag: crate::store::etag(&r.service, r.revision),
            update_time: Some(timestamp(r.time)),
            update_actor: r.actor.clone(),
            ..spec_to_proto(s)
        }),
        deleted: r.spec.is_none(),
        create_time: Some(timestamp(r.time)),
        actor: r.actor.clone(),
        reason: r.reason.clone(),
        audit_sequence: r.audit_sequence,
    }
}
