//! Conversions between the wire [`v1::Policy`] and the domain [`PolicySpec`]. The spec is
//! still unvalidated: validation (`corsair_policy::Policy::check`) is the caller's next step.

use corsair_policy::{Mode, PolicySpec};

use crate::names::NameError;
use crate::v1;

/// Why a wire policy does not make a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// `name` is not `services/{service}/policy`.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `service` and `name` disagree.
    #[error("service {service:?} does not match name {name:?}")]
    Mismatch {
        /// The `service` field.
        service: String,
        /// The `name` field.
        name: String,
    },
    /// `mode` is not a known value.
    #[error("unknown mode {0}")]
    Mode(i32),
}

impl ConversionError {
    /// The request field at fault, under the policy message.
    pub fn field(&self) -> &'static str {
        match self {
            ConversionError::Name(_) => "name",
            ConversionError::Mismatch { .. } => "service",
            ConversionError::Mode(_) => "mode",
        }
    }
}

pub use crate::names::{parse_policy_name, policy_name};

impl TryFrom<&v1::Policy> for PolicySpec {
    type Error = ConversionError;

    /// The service comes from `service`, or from `name`; when both are set they must agree.
    /// Output-only fields are ignored.
    fn try_from(p: &v1::Policy) -> Result<Self, ConversionError> {
        let service = match (p.service.as_str(), p.name.as_str()) {
            (s, "") => s.to_owned(),
            ("", name) => parse_policy_name(name)?.to_owned(),
            (s, name) => {
                if parse_policy_name(name)? != s {
                    return Err(ConversionError::Mismatch {
                        service: s.to_owned(),
                        name: name.to_owned(),
                    });
                }
                s.to_owned()
            }
        };
        let mode = match v1::PolicyMode::try_from(p.mode) {
            Ok(v1::PolicyMode::Unspecified | v1::PolicyMode::Standard) => Mode::Standard,
            Ok(v1::PolicyMode::Enforce) => Mode::Enforce,
            Ok(v1::PolicyMode::Shadow) => Mode::Shadow,
            Err(_) => return Err(ConversionError::Mode(p.mode)),
        };
        Ok(PolicySpec {
            service,
            allowed_origins: p.allowed_origins.clone(),
            allowed_methods: p.allowed_methods.clone(),
            allowed_headers: p.allowed_headers.clone(),
            exposed_headers: p.exposed_headers.clone(),
            allow_credentials: p.allow_credentials,
            max_age: p.max_age_seconds,
            allow_private_network: p.allow_private_network,
            mode,
        })
    }
}

impl From<&PolicySpec> for v1::Policy {
    /// The wire policy of a spec, without bookkeeping (revision, etag, times).
    fn from(spec: &PolicySpec) -> Self {
        v1::Policy {
            name: policy_name(&spec.service),
            service: spec.service.clone(),
            allowed_origins: spec.allowed_origins.clone(),
            allowed_methods: spec.allowed_methods.clone(),
            allowed_headers: spec.allowed_headers.clone(),
            exposed_headers: spec.exposed_headers.clone(),
            allow_credentials: spec.allow_credentials,
            max_age_seconds: spec.max_age,
            allow_private_network: spec.allow_private_network,
            mode: match spec.mode {
                Mode::Standard => v1::PolicyMode::Standard,
                Mode::Enforce => v1::PolicyMode::Enforce,
                Mode::Shadow => v1::PolicyMode::Shadow,
            } as i32,
            ..v1::Policy::default()
        }
    }
}
