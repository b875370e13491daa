//! What can go wrong, and how it reads on a terminal: a server error prints the server's
//! message, then one line per field violation (`allowed_origins[2]: why [CODE]`) or per
//! policy that keeps an origin set in use, or, for a refused credential, how to present
//! another one.

use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {addr}: {why}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        why: String,
    },
    /// The control plane did not answer within the deadline.
    #[error("{context}: no answer from the control plane within {}", humantime::format_duration(*.deadline))]
    Deadline {
        /// What was being done.
        context: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The control plane refused or failed a call.
    #[error("{}", Refusal { context, status })]
    Status {
        /// What was being done, such as `services/shop/policy`.
        context: String,
        /// The server's status.
        status: Box<Status>,
    },
    /// A file or flag the user gave is unusable.
    #[error("{0}")]
    Input(String),
    /// The server sent something this tool cannot read.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A local resource (a process, a port, a terminal) failed.
    #[error("{0}")]
    Local(String),
    /// Whoever read the output stopped reading (`| head`): not a failure.
    #[error("output closed")]
    OutputClosed,
}

impl CliError {
    /// A server status met while doing `context`.
    pub fn status(context: impl Into<String>, status: Status) -> Self {
        CliError::Status {
            context: context.into(),
            status: Box::new(status),
        }
    }

    /// Whether the server refused only for risks that were not acknowledged.
    pub fn is_unacknowledged_risk(&self) -> bool {
        matches!(self, CliError::Status { status, .. }
            if status.get_details_error_info().is_some_and(|i| i.reason == "RISK_NOT_ACKNOWLEDGED"))
    }

    /// The gRPC code, for a server error.
    pub fn code(&self) -> Option<Code> {
        match self {
            CliError::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

struct Refusal<'a> {
    context: &'a str,
    status: &'a Status,
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.status;
        let violations = status
            .get_details_bad_request()
            .map(|b| b.field_violations)
            .unwrap_or_default();
        let info = status.get_details_error_info();
        let reason = info.as_ref().map_or("", |i| i.reason.as_str());
        let risks_only = reason == "RISK_NOT_ACKNOWLEDGED";
        // Which command reads the resource again, after a conflict.
        let get = if self.context.contains("originSets/") {
            "origin-set get"
        } else {
            "policy get"
        };
        let referrers = if reason == "SET_IN_USE" {
            status
                .get_details_precondition_failure()
                .map(|p| p.violations)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let headline = match status.code() {
            Code::InvalidArgument if risks_only => {
                "refused: it has risks that were not acknowledged".to_owned()
            }
            Code::InvalidArgument if !violations.is_empty() => "refused: invalid".to_owned(),
            Code::FailedPrecondition if reason == "SET_IN_USE" => {
                "refused: policies reference it; remove it from their allowed_origins first:"
                    .to_owned()
            }
            Code::Aborted => format!(
                "not changed: it was changed by someone else since it was read: {} \
                 (read it again with `corsairctl {get}`, or drop the file's etag to apply over it)",
                status.message()
            ),
            Code::Unavailable => format!("the control plane is unavailable: {}", status.message()),
            Code::Unimplemented => format!(
                "the control plane does not support this call: {}",
                status.message()
            ),
            _ => status.message().to_owned(),
        };
        write!(f, "{}: {headline}", self.context)?;
        for v in &violations {
            // Fields of the resource written read as paths under it; a referrer of an origin
            // set keeps its name (`services/shop/policy.allowed_origins[1]`).
            let field = ["policy.", "origin_set."]
                .iter()
                .find_map(|prefix| v.field.strip_prefix(prefix))
                .unwrap_or(&v.field);
            let field = match field {
                "policy" => "(policy)",
                "origin_set" => "(origin set)",
                field => field,
            };
            write!(f, "\n  {field}: {}", v.description)?;
            if !v.reason.is_empty() {
                write!(f, " [{}]", v.reason)?;
            }
        }
        for v in &referrers {
            write!(f, "\n  {}", v.subject)?;
        }
        // The server lists at most some of them, and says how many there are.
        let in_use = info
            .as_ref()
            .filter(|_| reason == "SET_IN_USE")
            .and_then(|i| i.metadata.get("referrers"))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(referrers.len());
        if in_use > referrers.len() {
            write!(f, "\n  and {} more", in_use - referrers.len())?;
        }
        if risks_only {
            let mut codes: Vec<&str> = violations.iter().map(|v| v.reason.as_str()).collect();
            codes.sort_unstable();
            codes.dedup();
            write!(
                f,
                "\n  to accept: --acknowledge {}",
                codes.join(" --acknowledge ")
            )?;
        }
        match status.code() {
            Code::Unauthenticated => f.write_str(
                "\n  to authenticate: set CORSAIR_TOKEN (or pass --token) to a token from \
                 `corsairctl token create`, or to the admin token the control plane printed \
                 on its first start",
            )?,
            Code::PermissionDenied => f.write_str(
                "\n  the token's role does not allow this: set CORSAIR_TOKEN (or pass --token) \
                 to a token with a role that does (see `corsairctl token list`)",
            )?,
            _ => {}
        }
        Ok(())
    }
}

/// `error` and its sources, joined with `: `.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, FieldViolation};

    #[test]
    fn field_violations_read_as_paths_under_the_policy() {
        let mut v = FieldViolation::new("policy.allowed_origins[2]", "not an origin");
        v.reason = "INVALID_ORIGIN".into();
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid policy",
            ErrorDetails::with_bad_request(vec![v]),
        );
        let text = CliError::status("services/shop/policy", status).to_string();
        assert_eq!(
            text,
            "services/shop/policy: refused: invalid\n  allowed_origins[2]: not an origin [INVALID_ORIGIN]"
        );
    }

    #[test]
    fn refused_credentials_say_how_to_present_a_token() {
        let status = Status::unauthenticated("no credential");
        let text = CliError::status("listing policies", status).to_string();
        assert!(
            text.starts_with("listing policies: no credential\n  to authenticate: set CORSAIR_TOKEN (or pass --token)"),
            "{text}"
        );
        let status = Status::permission_denied("ci (role editor) may not call ListTokens");
        let text = CliError::status("listing tokens", status).to_string();
        assert!(
            text.contains("role does not allow this: set CORSAIR_TOKEN (or pass --token)"),
            "{text}"
        );
        let status = Status::not_found("no such policy");
        let text = CliError::status("services/shop/policy", status).to_string();
        assert!(!text.contains("CORSAIR_TOKEN"), "{text}");
    }

    #[test]
    fn a_set_in_use_lists_the_policies_that_use_it() {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            "SET_IN_USE",
            "corsair.dev",
            [("referrers".to_owned(), "3".to_owned())]
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
        details.set_precondition_failure(
            ["services/blog/policy", "services/shop/policy"]
                .map(|s| tonic_types::PreconditionViolation::new("REFERENCED", s, "references it"))
                .to_vec(),
        );
        let status = Status::with_error_details(
            Code::FailedPrecondition,
            "originSets/corp is referenced by …",
            details,
        );
        let text = CliError::status("originSets/corp", status).to_string();
        assert_eq!(
            text,
            "originSets/corp: refused: policies reference it; remove it from their \
             allowed_origins first:\n  services/blog/policy\n  services/shop/policy\n  and 1 more"
        );
    }

    #[test]
    fn a_set_write_names_the_referrers_it_would_harm() {
        let violations = [
            ("origin_set.origins[1]", "NULL_ORIGIN"),
            ("services/shop/policy.allowed_origins[1]", "NULL_ORIGIN"),
        ]
        .map(|(field, code)| {
            let mut v = FieldViolation::new(field, "null origin");
            v.reason = code.into();
            v
        });
        let mut details = ErrorDetails::with_bad_request(violations.to_vec());
        details.set_error_info(
            "RISK_NOT_ACKNOWLEDGED",
            "corsair.dev",
            std::collections::HashMap::new(),
        );
        let status = Status::with_error_details(Code::InvalidArgument, "risks", details);
        let text = CliError::status("sets.yaml: originSets/corp", status).to_string();
        assert_eq!(
            text,
            "sets.yaml: originSets/corp: refused: it has risks that were not acknowledged\n  \
             origins[1]: null origin [NULL_ORIGIN]\n  \
             services/shop/policy.allowed_origins[1]: null origin [NULL_ORIGIN]\n  \
             to accept: --acknowledge NULL_ORIGIN"
        );
        let text =
            CliError::status("originSets/corp", Status::aborted("etag \"x\" is stale")).to_string();
        assert!(text.contains("`corsairctl origin-set get`"), "{text}");
    }

    #[test]
    fn unacknowledged_risks_say_how_to_accept_them() {
        let mut v = FieldViolation::new("policy.allowed_origins[0]", "null origin");
        v.reason = "NULL_ORIGIN".into();
        let mut details = ErrorDetails::with_bad_request(vec![v]);
        details.set_error_info(
            "RISK_NOT_ACKNOWLEDGED",
            "corsair.dev",
            std::collections::HashMap::new(),
        );
        let status = Status::with_error_details(Code::InvalidArgument, "risks", details);
        let text = CliError::status("services/shop/policy", status).to_string();
        assert!(text.contains("not acknowledged"), "{text}");
        assert!(
            text.ends_with("to accept: --acknowledge NULL_ORIGIN"),
            "{text}"
        );
    }
}
