//! The policy model: [`PolicySpec`], what an operator writes, and [`Policy`], the same thing
//! once validated and canonicalized. Only [`Policy::check`] (in `lint`) makes a `Policy`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::origin::OriginPattern;
use crate::origin_set::OriginSet;

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
    /// `regex:...`, `*`, `null`, or `set:NAME` for every entry of an origin set.
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
    /// The names of the origin sets the policy references (`set:NAME` in its own or a
    /// route's `allowed_origins`), sorted, each once.
    pub fn origin_set_refs(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .allowed_origins
            .iter()
            .chain(
                self.routes
                    .iter()
                    .flat_map(|r| r.allowed_origins.iter().flatten()),
            )
            .filter_map(|o| o.strip_prefix(crate::origin_set::SET_PREFIX))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }

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
    /// The parsed entries of `spec.allowed_origins`, each with its index there.
    pub(crate) origins: Vec<(u32, OriginPattern)>,
    /// The origin sets `spec.allowed_origins` references, each with its index there.
    pub(crate) sets: Vec<(u32, Arc<OriginSet>)>,
    /// Each route's parsed `allowed_origins`, `None` where it inherits the policy's.
    pub(crate) route_origins: Vec<Option<RouteOrigins>>,
}

/// A route's own allowed origins, parsed: like [`Policy`]'s, each with its index in the
/// route's `allowed_origins`.
#[derive(Debug, Clone)]
pub(crate) struct RouteOrigins {
    pub(crate) patterns: Vec<(u32, OriginPattern)>,
    pub(crate) sets: Vec<(u32, Arc<OriginSet>)>,
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

    /// The parsed allowed-origin entries, each with its index in `spec().allowed_origins`
    /// (`set:` references are not among them: see [`sets`](Self::sets)).
    pub fn origins(&self) -> &[(u32, OriginPattern)] {
        &self.origins
    }

    /// The origin sets the policy references, each with the index of its `set:` entry in
    /// `spec().allowed_origins`.
    pub fn sets(&self) -> &[(u32, Arc<OriginSet>)] {
        &self.sets
    }

    /// Every origin the policy allows with its sets resolved, in order, each with the set it
    /// came from (`None` for the policy's own entries).
    pub fn effective_origins(&self) -> Vec<(&str, Option<&str>)> {
        let mut sets = self.sets.iter().peekable();
        let mut out = Vec::new();
        for (i, entry) in self.spec.allowed_origins.iter().enumerate() {
            match sets.peek() {
                Some((at, set)) if *at as usize == i => {
                    out.extend(set.origins().iter().map(|o| (o.as_str(), Some(set.name()))));
                    sets.next();
                }
                _ => out.push((entry.as_str(), None)),
            }
        }
        out
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.spec.mode
    }
}

impl Policy {
    /// Every origin set the policy resolves, its routes' included, in order.
    pub fn all_sets(&self) -> impl Iterator<Item = &Arc<OriginSet>> {
        self.sets.iter().map(|(_, s)| s).chain(
            self.route_origins
                .iter()
                .flatten()
                .flat_map(|r| r.sets.iter().map(|(_, s)| s)),
        )
    }
}

impl PartialEq for Policy {
    /// Equal specs resolving to equal sets.
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
            && self
                .all_sets()
                .map(|s| s.digest())
                .eq(other.all_sets().map(|s| s.digest()))
    }
}

impl Eq for Policy {}
