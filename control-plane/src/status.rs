//! The error model (AIP-193): every failure the API returns is a gRPC status whose details
//! carry a `google.rpc.ErrorInfo` with a domain reason, plus what the failure is about: the
//! field (`BadRequest`), the missing resource (`ResourceInfo`), the current etag, the roles
//! that may call.

use corsair_policy::Rejected;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::{StoreError, WriteError, capped};

/// The `google.rpc.ErrorInfo` domain of Corsair's errors.
pub const ERROR_DOMAIN: &str = "corsair.dev";

/// Field violations a status carries at most; `ErrorInfo`'s `violations` says how many there
/// were. Status details travel in HTTP/2 trailers, which clients cap (16 KiB is common).
pub const MAX_VIOLATIONS: usize = 20;
/// Violations the status message spells out.
const SUMMARIZED: usize = 5;
/// Bytes of one violation's description (it may echo what the caller sent).
const MAX_DETAIL: usize = 256;
/// Bytes of a status message.
const MAX_MESSAGE: usize = 2048;

/// A status with an `ErrorInfo` of `reason` and `metadata`, and nothing more.
pub fn status(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        ERROR_DOMAIN,
        metadata
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
    );
    Status::with_error_details(code, message, details)
}

/// `INVALID_ARGUMENT` for one malformed request field: a `BadRequest` naming it, and the
/// reason `INVALID_<FIELD>`.
pub fn bad_request(field: &str, message: impl Into<String>) -> Status {
    write_error_status(&WriteError::bad_request(field, message))
}

/// The status for a refused call.
pub fn write_error_status(error: &WriteError) -> Status {
    let reason = error.reason();
    let message = capped(error.to_string(), MAX_MESSAGE);
    let mut details = ErrorDetails::new();
    let code = match error {
        WriteError::NotFound { kind, name, .. } | WriteError::AlreadyExists { kind, name, .. } => {
            let name = &capped(name.clone(), MAX_DETAIL);
            details.set_error_info(
                &reason,
                ERROR_DOMAIN,
                [("resource".to_owned(), name.clone())],
            );
            if !name.is_empty() {
                details.set_resource_info(kind.type_url(), name, "", message.clone());
            }
            if matches!(error, WriteError::NotFound { .. }) {
                Code::NotFound
            } else {
                Code::AlreadyExists
            }
        }
        WriteError::Conflict {
            current_etag,
            current_revision,
            ..
        } => {
            details.set_error_info(
                &reason,
                ERROR_DOMAIN,
                [
                    ("current_etag".to_owned(), current_etag.clone()),
                    ("current_revision".to_owned(), current_revision.to_string()),
                ],
            );
            Code::Aborted
        }
        WriteError::Invalid(rejected) => return rejected_status(rejected, "policy."),
        WriteError::InvalidSet(rejected) => {
            return rejected_as(rejected, "origin_set.", "INVALID_SET", "invalid origin set");
        }
        WriteError::SetInUse { referrers, .. } => {
            details.set_error_info(
                &reason,
                ERROR_DOMAIN,
                [("referrers".to_owned(), referrers.len().to_string())],
            );
            details.set_precondition_failure(
                referrers
                    .iter()
                    .take(MAX_VIOLATIONS)
                    .map(|r| {
                        tonic_types::PreconditionViolation::new(
                            "REFERENCED",
                            r.clone(),
                            "this policy references the set; remove the reference first",
                        )
                    })
                    .collect::<Vec<_>>(),
            );
            Code::FailedPrecondition
        }
        WriteError::FailedPrecondition { .. } => {
            details.set_error_info(&reason, ERROR_DOMAIN, []);
            Code::FailedPrecondition
        }
        WriteError::Unauthenticated { .. } => {
            details.set_error_info(&reason, ERROR_DOMAIN, []);
            Code::Unauthenticated
        }
        WriteError::PermissionDenied { required_roles, .. } => {
            details.set_error_info(
                &reason,
                ERROR_DOMAIN,
                [("required_roles".to_owned(), required_roles.join(","))],
            );
            Code::PermissionDenied
        }
        WriteError::BadRequest { field, message } => {
            details.add_bad_request_violation(
                capped(field.clone(), MAX_DETAIL),
                capped(message.clone(), MAX_DETAIL),
            );
            details.set_error_info(&reason, ERROR_DOMAIN, []);
            Code::InvalidArgument
        }
    };
    Status::with_error_details(code, message, details)
}

/// `INVALID_ARGUMENT` for a refused policy: one field violation per blocking finding (the
/// first [`MAX_VIOLATIONS`]), its path under `prefix` and its code as the violation's reason;
/// `ErrorInfo` says whether errors (`INVALID_POLICY`) or only unacknowledged risks
/// (`RISK_NOT_ACKNOWLEDGED`) refused it, and how many violations there were in all.
pub fn rejected_status(rejected: &Rejected, prefix: &str) -> Status {
    rejected_as(rejected, prefix, "INVALID_POLICY", "invalid policy")
}

/// [`rejected_status`] for a resource other than a policy: `invalid_reason` when errors
/// refused it, and `noun` in the message. A finding about another resource (a referrer of an
/// origin set, `services/{service}/policy.…`) keeps its own path.
pub fn rejected_as(rejected: &Rejected, prefix: &str, invalid_reason: &str, noun: &str) -> Status {
    let path = |field: &str| {
        if field.is_empty() {
            prefix.trim_end_matches('.').to_owned()
        } else if field.starts_with("services/") {
            field.to_owned()
        } else {
            format!("{prefix}{field}")
        }
    };
    let total = rejected.blocking.len();
    let violations: Vec<tonic_types::FieldViolation> = rejected
        .blocking
        .iter()
        .take(MAX_VIOLATIONS)
        .map(|f| {
            let mut violation = tonic_types::FieldViolation::new(
                path(&f.field),
                capped(f.message.clone(), MAX_DETAIL),
            );
            violation.reason = f.code.as_str().to_owned();
            violation
        })
        .collect();
    let mut details = ErrorDetails::with_bad_request(violations);
    let mut codes: Vec<&str> = rejected.blocking.iter().map(|f| f.code.as_str()).collect();
    codes.sort_unstable();
    codes.dedup();
    let codes = codes.join(",");
    let reason = if rejected.only_risks() {
        "RISK_NOT_ACKNOWLEDGED"
    } else {
        invalid_reason
    };
    details.set_error_info(
        reason,
        ERROR_DOMAIN,
        [
            ("codes".to_owned(), codes),
            ("violations".to_owned(), total.to_string()),
        ],
    );
    let mut summary = rejected
        .blocking
        .iter()
        .take(SUMMARIZED)
        .map(|f| {
            let message = capped(f.message.clone(), MAX_DETAIL);
            format!("{}: {message} [{}]", path(&f.field), f.code)
        })
        .collect::<Vec<_>>()
        .join("; ");
    if total > SUMMARIZED {
        summary.push_str(&format!("; and {} more", total - SUMMARIZED));
    }
    let message = if rejected.only_risks() {
        format!("unacknowledged risks (acknowledge their codes to proceed): {summary}")
    } else {
        format!("{noun}: {summary}")
    };
    Status::with_error_details(Code::InvalidArgument, capped(message, MAX_MESSAGE), details)
}

/// The status for a storage failure.
pub fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Unavailable => status(
            Code::Unavailable,
            "STORAGE_UNAVAILABLE",
            "storage unavailable; nothing was changed",
            [],
        ),
        StoreError::Corrupt(m) => status(Code::Internal, "STORAGE_CORRUPT", m, []),
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
