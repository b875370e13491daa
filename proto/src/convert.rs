//! Conversions between the wire [`v1::Policy`] and the domain [`PolicySpec`]. The spec is
//! still unvalidated: validation (`corsair_policy::Policy::check`) is the caller's next step.

use corsair_policy::{Mode, PolicySpec, RouteSpec};

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
    /// A route's `mode` is not a known value.
    #[error("route {route}: unknown mode {mode}")]
    RouteMode {
        /// The route's index.
        route: usize,
        /// The value.
        mode: i32,
    },
}

impl ConversionError {
    /// The request field at fault, under the policy message (`routes[2].mode`).
    pub fn field(&self) -> String {
        match self {
            ConversionError::Name(_) => "name".into(),
            ConversionError::Mismatch { .. } => "service".into(),
            ConversionError::Mode(_) => "mode".into(),
            ConversionError::RouteMode { route, .. } => format!("routes[{route}].mode"),
        }
    }
}

fn mode_from(mode: i32) -> Option<Mode> {
    match v1::PolicyMode::try_from(mode) {
        Ok(v1::PolicyMode::Unspecified | v1::PolicyMode::Standard) => Some(Mode::Standard),
        Ok(v1::PolicyMode::Enforce) => Some(Mode::Enforce),
        Ok(v1::PolicyMode::Shadow) => Some(Mode::Shadow),
        Err(_) => None,
    }
}

fn mode_to(mode: Mode) -> i32 {
    let mode = match mode {
        Mode::Standard => v1::PolicyMode::Standard,
        Mode::Enforce => v1::PolicyMode::Enforce,
        Mode::Shadow => v1::PolicyMode::Shadow,
    };
    mode as i32
}

/// Route `index` of a wire policy: an absent list or scalar is inherited.
pub fn route_from_proto(index: usize, r: &v1::Route) -> Result<RouteSpec, ConversionError> {
    let list = |l: &Option<v1::StringList>| l.as_ref().map(|l| l.values.clone());
    Ok(RouteSpec {
        path: r.path.clone(),
        allowed_origins: list(&r.allowed_origins),
        allowed_methods: list(&r.allowed_methods),
        allowed_headers: list(&r.allowed_headers),
        exposed_headers: list(&r.exposed_headers),
        allow_credentials: r.allow_credentials,
        max_age: r.max_age_seconds,
        allow_private_network: r.allow_private_network,
        mode: r
            .mode
            .map(|mode| mode_from(mode).ok_or(ConversionError::RouteMode { route: index, mode }))
            .transpose()?,
    })
}

impl From<&RouteSpec> for v1::Route {
    /// The wire route: an inherited list is absent, not empty.
    fn from(r: &RouteSpec) -> Self {
        let list = |l: &Option<Vec<String>>| {
            l.as_ref().map(|values| v1::StringList {
                values: values.clone(),
            })
        };
        v1::Route {
            path: r.path.clone(),
            allowed_origins: list(&r.allowed_origins),
            allowed_methods: list(&r.allowed_methods),
            allowed_headers: list(&r.allowed_headers),
            exposed_headers: list(&r.exposed_headers),
            allow_credentials: r.allow_credentials,
            max_age_seconds: r.max_age,
            allow_private_network: r.allow_private_network,
            mode: r.mode.map(mode_to),
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
        let mode = mode_from(p.mode).ok_or(ConversionError::Mode(p.mode))?;
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
            routes: p
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| route_from_proto(i, r))
                .collect::<Result<_, _>>()?,
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
            mode: mode_to(spec.mode),
            routes: spec.routes.iter().map(v1::Route::from).collect(),
            ..v1::Policy::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed() -> PolicySpec {
        PolicySpec {
            service: "shop".into(),
            allowed_origins: vec!["https://app.example".into()],
            routes: vec![
                RouteSpec {
                    path: "/api/".into(),
                    allowed_origins: Some(vec!["https://admin.example".into()]),
                    allow_credentials: Some(true),
                    max_age: Some(60),
                    mode: Some(Mode::Enforce),
                    ..RouteSpec::default()
                },
                RouteSpec {
                    path: "/internal/".into(),
                    allowed_origins: Some(Vec::new()),
                    allowed_headers: Some(vec!["x-a".into()]),
                    allow_private_network: Some(false),
                    ..RouteSpec::default()
                },
                RouteSpec {
                    path: "/public/".into(),
                    exposed_headers: Some(vec!["*".into()]),
                    allowed_methods: Some(vec!["PUT".into()]),
                    ..RouteSpec::default()
                },
            ],
            ..PolicySpec::default()
        }
    }

    #[test]
    fn routes_round_trip_keeping_unset_apart_from_empty() {
        let spec = routed();
        let wire = v1::Policy::from(&spec);
        assert_eq!(wire.routes.len(), 3);
        assert_eq!(
            wire.routes[1].allowed_origins,
            Some(v1::StringList { values: Vec::new() })
        );
        assert_eq!(wire.routes[1].allowed_methods, None);
        assert_eq!(wire.routes[0].mode, Some(v1::PolicyMode::Enforce as i32));
        assert_eq!(wire.routes[2].mode, None);
        assert_eq!(PolicySpec::try_from(&wire).unwrap(), spec);

        // Through the bytes too: an empty list message is still there.
        use prost::Message;
        let decoded = v1::Policy::decode(wire.encode_to_vec().as_slice()).unwrap();
        assert_eq!(PolicySpec::try_from(&decoded).unwrap(), spec);
    }

    #[test]
    fn a_route_with_an_unknown_mode_names_its_field() {
        let mut wire = v1::Policy::from(&routed());
        wire.routes[2].mode = Some(42);
        let err = PolicySpec::try_from(&wire).unwrap_err();
        assert_eq!(err.field(), "routes[2].mode");
        assert_eq!(err.to_string(), "route 2: unknown mode 42");
    }

    #[test]
    fn a_policy_without_routes_sends_none() {
        let spec = PolicySpec {
            service: "shop".into(),
            ..PolicySpec::default()
        };
        assert!(v1::Policy::from(&spec).routes.is_empty());
    }
}
