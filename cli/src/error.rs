//! What can go wrong, and how it reads on a terminal: a server error prints the server's
//! message, then one line per field violation (`allowed_origins[2]: why [CODE]`), or, for a
//! refused credential, how to present another one.

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
        let risks_only = status
            .get_details_error_info()
            .is_some_and(|i| i.reason == "RISK_NOT_ACKNOWLEDGED");
        let headline = match status.code() {
            Code::InvalidArgument if risks_only => {
                "refused: the policy has risks that were not acknowledged".to_owned()
            }
            Code::InvalidArgument if !violations.is_empty() => "refused: invalid".to_owned(),
            Code::Aborted => format!(
                "not changed: it was changed by someone else since it was read: {} \
                 (read it again with `corsairctl policy get`, or drop the file's etag to apply over it)",
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
            let field = v.field.strip_prefix("policy.").unwrap_or(&v.field);
            let field = if field == "policy" { "(policy)" } else { field };
            write!(f, "\n  {field}: {}", v.description)?;
            if !v.reason.is_empty() {
                write!(f, " [{}]", v.reason)?;
            }
        }
        if risks_only {
            let codes: Vec<&str> = violations.iter().map(|v| v.reason.as_str()).collect();
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
