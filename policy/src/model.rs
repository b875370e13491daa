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

impl PartialEq for Policy {
    /// Equal specs resolving to equal sets.
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
            && self.sets.len() == other.sets.len()
            && self
                .sets
                .iter()
                .zip(&other.sets)
                .all(|((_, a), (_, b))| a.digest() == b.digest())
    }
}

impl Eq for Policy {}
