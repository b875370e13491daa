//! The policy model: [`PolicySpec`], what an operator writes, and [`Policy`], the same thing
//! once validated and canonicalized. Only [`Policy::check`] (in `lint`) makes a `Policy`.

use serde::{Deserialize, Serialize};

use crate::origin::OriginPattern;

/// How a sidecar applies a policy to traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Add or omit CORS headers; disallowed requests still reach the service.
    #[default]
    Standard,
    /// Disallowed cross-origin requests get `403` and never reach the service.
    Enforce,
    /// Decide and report, change nothing in traffic.
    Shadow,
}

impl Mode {
    /// The mode's name, as written in a policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standard => "standard",
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
        }
    }
}

/// A service's CORS policy as an operator writes it (in a file, or over the API), not yet
/// validated. Field names are those of the policy file format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The service this policy belongs to (`[a-z]([a-z0-9-]{0,61}[a-z0-9])?`).
    pub service: String,
    /// Origins allowed to read responses: exact origins, `https://*.example.com`,
    /// `regex:...`, `*`, or `null`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may ask for, compared case-sensitively; `*` for any.
    /// `GET`, `HEAD` and `POST` are always allowed.
    #[serde(default)]
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight may ask for, compared case-insensitively; `*` for any
    /// except `authorization`.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Response headers scripts may read beyond the safelisted ones; `*` for all.
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    /// Whether responses may be read by requests made with credentials (cookies, HTTP auth).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long (seconds) a browser may cache a preflight answer; unset leaves it to the
    /// browser (5 seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    /// Whether to grant Private Network Access preflights.
    #[serde(default)]
    pub allow_private_network: bool,
    /// How the policy is applied.
    #[serde(default)]
    pub mode: Mode,
    /// Rules for some paths: each route overrides the fields it sets, for the requests whose
    /// path it matches (the longest match wins), and inherits the rest from the fields above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
}

impl PolicySpec {
    /// The rules route `index` applies: its own fields, the rest inherited; without routes.
    /// `None` when there is no such route.
    pub fn effective(&self, index: usize) -> Option<PolicySpec> {
        let route = self.routes.get(index)?;
        let list = |own: &Option<Vec<String>>, inherited: &Vec<String>| {
            own.as_ref().unwrap_or(inherited).clone()
        };
        Some(PolicySpec {
            service: self.service.clone(),
            allowed_origins: list(&route.allowed_origins, &self.allowed_origins),
            allowed_methods: list(&route.allowed_methods, &self.allowed_methods),
            allowed_headers: list(&route.allowed_headers, &self.allowed_headers),
            exposed_headers: list(&route.exposed_headers, &self.exposed_headers),
            allow_credentials: route.allow_credentials.unwrap_or(self.allow_credentials),
            max_age: route.max_age.or(self.max_age),
            allow_private_network: route
                .allow_private_network
                .unwrap_or(self.allow_private_network),
            mode: route.mode.unwrap_or(self.mode),
            routes: Vec::new(),
        })
    }
}

/// The rules of the requests whose path a route matches. Each field left out (`None`) is
/// inherited from the policy; the `path` is written in canonical form (see
/// [`route`](crate::route)).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// An exact path (`/api/health`), or a prefix ending in `/` (`/api/`) that matches every
    /// path under it.
    pub path: String,
    /// Overrides `allowed_origins`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    /// Overrides `allowed_methods`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_methods: Option<Vec<String>>,
    /// Overrides `allowed_headers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_headers: Option<Vec<String>>,
    /// Overrides `exposed_headers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_headers: Option<Vec<String>>,
    /// Overrides `allow_credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// Overrides `max_age` (a route cannot unset the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    /// Overrides `allow_private_network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_private_network: Option<bool>,
    /// Overrides `mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

impl RouteSpec {
    /// The bytes of its strings: the path and every entry it lists.
    pub fn bytes(&self) -> usize {
        self.path.len()
            + [
                &self.allowed_origins,
                &self.allowed_methods,
                &self.allowed_headers,
                &self.exposed_headers,
            ]
            .into_iter()
            .flatten()
            .flatten()
            .map(String::len)
            .sum::<usize>()
    }

    /// Whether the route sets no field of its own.
    pub fn overrides_nothing(&self) -> bool {
        // Destructured, so that a field added to routes must be counted here.
        let RouteSpec {
            path: _,
            allowed_origins,
            allowed_methods,
            allowed_headers,
            exposed_headers,
            allow_credentials,
            max_age,
            allow_private_network,
            mode,
        } = self;
        allowed_origins.is_none()
            && allowed_methods.is_none()
            && allowed_headers.is_none()
            && exposed_headers.is_none()
            && allow_credentials.is_none()
            && max_age.is_none()
            && allow_private_network.is_none()
            && mode.is_none()
    }
}

/// A validated policy in canonical form: origins canonical, duplicates dropped.
///
/// Its [`spec`](Policy::spec) is what gets stored and sent; compile it with
/// [`CompiledPolicy::new`](crate::CompiledPolicy::new) to decide requests.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) spec: PolicySpec,
    pub(crate) origins: Vec<OriginPattern>,
    /// Each route's parsed `allowed_origins`, `None` where it inherits the policy's.
    pub(crate) route_origins: Vec<Option<Vec<OriginPattern>>>,
}

impl Policy {
    /// The canonical spec.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// The canonical spec, by value.
    pub fn into_spec(self) -> PolicySpec {
        self.spec
    }

    /// The service the policy belongs to.
    pub fn service(&self) -> &str {
        &self.spec.service
    }

    /// The parsed allowed-origin entries, in the order of `spec().allowed_origins`.
    pub fn origins(&self) -> &[OriginPattern] {
        &self.origins
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.spec.mode
    }
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

impl Eq for Policy {}
