//! The compiled engine: [`CompiledPolicy`] is built once per policy version and decides each
//! request — preflight, actual, same-origin or not CORS at all — returning the [`Decision`]
//! a correct CORS server must act on, with a [`Reason`] an operator can read.
//!
//! Everything that can be done at compile time is: exact origins sit in a hash map, wildcard
//! origins in per-scheme-and-port suffix maps, header values are prebuilt, and each route is
//! compiled into rules of its own. A decision reads the request's headers in place and
//! allocates nothing but a normalized `Access-Control-Allow-Headers` echo (and, for a policy
//! with routes, the readings of a path that is not plain).

use std::collections::HashSet;
use std::sync::Arc;

use foldhash::fast::RandomState;

use http::header::{
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderValue, ORIGIN,
};
use http::{Method, StatusCode};

use crate::headers::{ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK, CorsHeaders, Vary};
use crate::lint::{MAX_TOKEN_LEN, is_tchar, is_token};
use crate::matcher::OriginMatcher;
use crate::model::{Mode, Policy};
use crate::origin::{OriginPattern, RequestOrigin, Scheme};
use crate::origin_set::OriginSet;
use crate::route::{self, RouteIndex, RouteTable};

/// An `Access-Control-Request-Headers` longer than this (all lines together) is refused
/// without being parsed.
pub const MAX_REQUEST_HEADERS_BYTES: usize = 4096;
/// An `Access-Control-Request-Headers` listing more names than this is refused.
pub const MAX_REQUEST_HEADERS_ITEMS: usize = 128;
/// A preflight with `Access-Control-Request-Headers` on more lines than this is refused.
pub const MAX_REQUEST_HEADERS_LINES: usize = 16;

/// Lists at most this long are searched linearly; longer ones through a hash set.
const LINEAR_SEARCH_MAX: usize = 8;

/// What the engine needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The scheme the client used to reach the service.
    pub scheme: Scheme,
    /// The authority the client asked for (`Host`, or HTTP/2 `:authority`), if any; with the
    /// scheme it makes the request's own origin, for the same-origin check.
    pub authority: Option<&'a str>,
    /// The request target's path and query as received (`/api/items?page=2`), which picks
    /// the route; empty when unknown, which no route matches.
    pub path: &'a str,
}

impl<'a> Request<'a> {
    /// A request with no known authority (every `Origin` counts as cross-origin) and no
    /// path (the policy's own rules decide, whatever its routes).
    pub fn new(method: &'a Method, headers: &'a HeaderMap) -> Self {
        Request {
            method,
            headers,
            scheme: Scheme::Http,
            authority: None,
            path: "",
        }
    }

    /// Sets the request target's path and query, as received.
    pub fn with_path(mut self, path: &'a str) -> Self {
        self.path = path;
        self
    }

    /// Sets the request's own origin, from its scheme and authority.
    pub fn with_own_origin(mut self, scheme: Scheme, authority: Option<&'a str>) -> Self {
        self.scheme = scheme;
        self.authority = authority;
        self
    }
}

/// What kind of request it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No `Origin` header: not a CORS request.
    NotCors,
    /// `Origin` equal to the request's own origin.
    SameOrigin,
    /// `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    Preflight,
    /// A cross-origin request that is not a preflight.
    Actual,
}

impl Kind {
    /// The kind's name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NotCors => "not_cors",
            Kind::SameOrigin => "same_origin",
            Kind::Preflight => "preflight",
            Kind::Actual => "actual",
        }
    }
}

/// Why the engine decided as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request has no `Origin` header.
    NoOrigin,
    /// The origin is the request's own.
    SameOrigin,
    /// The origin matched this entry of `allowed_origins`, and everything else asked for is
    /// allowed.
    Allowed {
        /// Index into the policy's `allowed_origins`.
        entry: u32,
    },
    /// The origin matched no entry.
    OriginNotAllowed,
    /// The origin is `null` and `null` is not listed.
    NullNotAllowed,
    /// The `Origin` header is not a serialized origin (trailing slash, uppercase, default
    /// port, bytes that are not text, …).
    OriginMalformed,
    /// The request has more than one `Origin` header.
    OriginRepeated,
    /// The method (or the preflight's requested method) is not allowed.
    MethodNotAllowed,
    /// `Access-Control-Request-Method` is missing a single valid token.
    MethodMalformed,
    /// A requested header is not allowed.
    HeaderNotAllowed,
    /// `Access-Control-Request-Headers` is not a list of tokens.
    HeadersMalformed,
    /// `Access-Control-Request-Headers` is larger than Corsair parses.
    HeadersTooLarge,
    /// Private network access was requested and is not allowed.
    PrivateNetworkNotAllowed,
    /// The path reads differently to different servers (dot segments, encoded slashes, …)
    /// and the readings fall under different routes.
    PathAmbiguous,
}

impl Reason {
    /// A short class for metrics labels: `allowed`, `not_cors`, `same_origin`, `origin`,
    /// `method`, `header`, `private_network` or `malformed`.
    pub fn class(self) -> &'static str {
        match self {
            Reason::NoOrigin => "not_cors",
            Reason::SameOrigin => "same_origin",
            Reason::Allowed { .. } => "allowed",
            Reason::OriginNotAllowed | Reason::NullNotAllowed => "origin",
            Reason::MethodNotAllowed => "method",
            Reason::HeaderNotAllowed => "header",
            Reason::PrivateNetworkNotAllowed => "private_network",
            Reason::OriginMalformed
            | Reason::OriginRepeated
            | Reason::MethodMalformed
            | Reason::HeadersMalformed
            | Reason::HeadersTooLarge
            | Reason::PathAmbiguous => "malformed",
        }
    }
}

/// What the server does with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it to the upstream service, then write the decision's headers into its response.
    Forward,
    /// Answer it here with this status and an empty body; it never reaches the upstream.
    Respond(StatusCode),
}

/// The engine's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'p> {
    /// What kind of request it was.
    pub kind: Kind,
    /// Whether the CORS protocol allows it (in shadow mode: whether it would).
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// What to do with the request.
    pub action: Action,
    /// The CORS headers for the response; `None` leaves the response untouched (shadow mode).
    pub headers: Option<CorsHeaders<'p>>,
    /// The route whose rules decided; `None` when the policy's own rules did, or when the
    /// path was ambiguous. (Its mode is [`CompiledPolicy::mode`].)
    pub route: Option<RouteIndex>,
}

/// A policy compiled for deciding requests.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: Policy,
    origins: Origins,
    grants: Grants,
    /// `None` for a policy without routes, which never looks at the path.
    routes: Option<Box<Routes>>,
}

/// The allowed origins of one level of rules, ready for matching: its own entries, and the
/// origin sets it references (compiled once, shared by every policy that uses them).
#[derive(Debug)]
struct Origins {
    own: OriginMatcher,
    /// The referenced sets, each with the index of its `set:` entry.
    sets: Vec<(u32, Arc<OriginSet>)>,
    /// The first `*` entry.
    any: Option<u32>,
}

/// What one level of rules grants beyond the origin, and how it applies them.
#[derive(Debug)]
struct Grants {
    methods: TokenSet,
    headers: TokenSet,
    credentials: bool,
    private_network: bool,
    allow_methods: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    mode: Mode,
}

/// The routes: the table that finds a request's route, and each route's rules.
#[derive(Debug)]
struct Routes {
    table: RouteTable,
    rules: Vec<RouteRules>,
    /// The mode an ambiguous path is denied in: the strictest of the policy's.
    ambiguous_mode: Mode,
}

#[derive(Debug)]
struct RouteRules {
    /// `None` when the route inherits the policy's origins.
    origins: Option<Origins>,
    grants: Grants,
}

/// A set of tokens compared exactly (methods) or ASCII-case-insensitively (headers, stored
/// lowercase), with `*`.
#[derive(Debug, Default)]
struct TokenSet {
    any: bool,
    list: Vec<Box<str>>,
    set: HashSet<Box<str>, RandomState>,
}

impl TokenSet {
    fn new<'a>(tokens: impl Iterator<Item = &'a String>, lowercase: bool) -> TokenSet {
        let mut out = TokenSet::default();
        for t in tokens {
            if t == "*" {
                out.any = true;
            } else if lowercase {
                out.list.push(t.to_ascii_lowercase().into());
            } else {
                out.list.push(t.as_str().into());
            }
        }
        if out.list.len() > LINEAR_SEARCH_MAX {
            out.set = out.list.iter().cloned().collect();
        }
        out
    }

    /// Exact membership (`*` not considered).
    fn contains(&self, token: &str) -> bool {
        if self.list.len() > LINEAR_SEARCH_MAX {
            self.set.contains(token)
        } else {
            self.list.iter().any(|t| &**t == token)
        }
    }

    /// ASCII-case-insensitive membership for lowercase-stored sets (`*` not considered).
    fn contains_ignore_case(&self, token: &[u8]) -> bool {
        if self.list.len() > LINEAR_SEARCH_MAX {
            let mut buf = [0u8; MAX_TOKEN_LEN];
            let Some(lower) = buf.get_mut(..token.len()) else {
                return false;
            };
            lower.copy_from_slice(token);
            lower.make_ascii_lowercase();
            // Tokens are ASCII, so this never fails for a name that was parsed as one.
            std::str::from_utf8(lower).is_ok_and(|s| self.set.contains(s))
        } else {
            self.list
                .iter()
                .any(|t| t.as_bytes().eq_ignore_ascii_case(token))
        }
    }
}

fn header_value(items: &[String]) -> Option<HeaderValue> {
    (!items.is_empty()).then(|| {
        HeaderValue::from_str(&items.join(", "))
            .expect("validated tokens form a valid header value")
    })
}

impl Origins {
    fn new(patterns: &[(u32, OriginPattern)], sets: &[(u32, Arc<OriginSet>)]) -> Origins {
        let own = OriginMatcher::new(patterns.iter().map(|(i, p)| (*i, p)));
        Origins {
            any: own.any,
            own,
            sets: sets.to_vec(),
        }
    }

    /// Finds the allowed-origin entry that matches a request origin: the own entries first,
    /// then the sets' (the `set:` reference's index), then `*`. Without sets, the short way,
    /// which never looks at them.
    fn find(&self, origin: &str) -> Result<u32, Reason> {
        if !self.sets.is_empty() {
            return self.find_with_sets(origin);
        }
        if origin == "null" {
            return self.own.null.ok_or(Reason::NullNotAllowed);
        }
        if let Some(entry) = self.own.exact(origin) {
            return Ok(entry);
        }
        let parsed = RequestOrigin::parse(origin).ok_or(Reason::OriginMalformed)?;
        self.own
            .pattern(origin, &parsed)
            .or(self.any)
            .ok_or(Reason::OriginNotAllowed)
    }

    /// [`find`](Self::find) with sets: each kind of entry is asked of the own entries, then
    /// of the sets.
    fn find_with_sets(&self, origin: &str) -> Result<u32, Reason> {
        if origin == "null" {
            return self
                .own
                .null
                .or_else(|| self.in_sets(|m| m.null))
                .ok_or(Reason::NullNotAllowed);
        }
        if let Some(entry) = self
            .own
            .exact(origin)
            .or_else(|| self.in_sets(|m| m.exact(origin)))
        {
            return Ok(entry);
        }
        let parsed = RequestOrigin::parse(origin).ok_or(Reason::OriginMalformed)?;
        self.own
            .pattern(origin, &parsed)
            .or_else(|| self.in_sets(|m| m.pattern(origin, &parsed)))
            .or(self.any)
            .ok_or(Reason::OriginNotAllowed)
    }

    /// The index of the first referenced set `find` finds an entry in.
    fn in_sets(&self, find: impl Fn(&OriginMatcher) -> Option<u32>) -> Option<u32> {
        self.sets
            .iter()
            .find(|(_, set)| find(set.matcher()).is_some())
            .map(|(entry, _)| *entry)
    }

    /// When entry `entry` is a `set:` reference, the set's entry that matches `origin`.
    fn set_entry(&self, entry: u32, origin: &str) -> Option<&str> {
        let (_, set) = self.sets.iter().find(|(at, _)| *at == entry)?;
        let m = set.matcher();
        let index = if origin == "null" {
            m.null
        } else {
            m.exact(origin)
                .or_else(|| m.pattern(origin, &RequestOrigin::parse(origin)?))
        }?;
        set.origins().get(index as usize).map(String::as_str)
    }
}

impl Grants {
    #[allow(clippy::too_many_arguments)]
    fn new(
        methods: &[String],
        headers: &[String],
        exposed: &[String],
        credentials: bool,
        max_age: Option<u32>,
        private_network: bool,
        mode: Mode,
    ) -> Grants {
        let methods_set = TokenSet::new(methods.iter(), false);
        Grants {
            allow_methods: if methods_set.any {
                Some(HeaderValue::from_static("*"))
            } else {
                header_value(methods)
            },
            expose_headers: header_value(exposed),
            max_age: max_age.map(HeaderValue::from),
            credentials,
            private_network,
            methods: methods_set,
            headers: TokenSet::new(headers.iter(), true),
            mode,
        }
    }

    /// `GET`, `HEAD` and `POST` are CORS-safelisted (byte-exact); anything else must be listed.
    fn method_allowed(&self, method: &str) -> bool {
        matches!(method, "GET" | "HEAD" | "POST")
            || self.methods.any
            || self.methods.contains(method)
    }

    fn header_allowed(&self, name: &[u8]) -> bool {
        if self.headers.contains_ignore_case(name) {
            return true;
        }
        self.headers.any && !name.eq_ignore_ascii_case(b"authorization")
    }
}

/// The rules that decide one request: the policy's own, or a route's.
#[derive(Debug, Clone, Copy)]
struct Rules<'p> {
    origins: &'p Origins,
    grants: &'p Grants,
    route: Option<RouteIndex>,
}

impl CompiledPolicy {
    /// Compiles a validated policy.
    pub fn new(policy: Policy) -> CompiledPolicy {
        let spec = &policy.spec;
        let origins = Origins::new(&policy.origins, &policy.sets);
        let grants = Grants::new(
            &spec.allowed_methods,
            &spec.allowed_headers,
            &spec.exposed_headers,
            spec.allow_credentials,
            spec.max_age,
            spec.allow_private_network,
            spec.mode,
        );
        let routes = (!spec.routes.is_empty()).then(|| {
            let rules = spec
                .routes
                .iter()
                .zip(&policy.route_origins)
                .map(|(route, route_origins)| RouteRules {
                    origins: route_origins
                        .as_ref()
                        .map(|r| Origins::new(&r.patterns, &r.sets)),
                    grants: Grants::new(
                        route
                            .allowed_methods
                            .as_deref()
                            .unwrap_or(&spec.allowed_methods),
                        route
                            .allowed_headers
                            .as_deref()
                            .unwrap_or(&spec.allowed_headers),
                        route
                            .exposed_headers
                            .as_deref()
                            .unwrap_or(&spec.exposed_headers),
                        route.allow_credentials.unwrap_or(spec.allow_credentials),
                        route.max_age.or(spec.max_age),
                        route
                            .allow_private_network
                            .unwrap_or(spec.allow_private_network),
                        route.mode.unwrap_or(spec.mode),
                    ),
                })
                .collect();
            let ambiguous_mode = std::iter::once(spec.mode)
                .chain(spec.routes.iter().filter_map(|r| r.mode))
                .max_by_key(|mode| match mode {
                    Mode::Shadow => 0,
                    Mode::Standard => 1,
                    Mode::Enforce => 2,
                })
                .unwrap_or(spec.mode);
            Box::new(Routes {
                table: RouteTable::new(spec.routes.iter().map(|r| r.path.as_str())),
                rules,
                ambiguous_mode,
            })
        });
        CompiledPolicy {
            origins,
            grants,
            routes,
            policy,
        }
    }

    /// The policy this was compiled from.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// When `allowed_origins[entry]` (the policy's own) is a `set:` reference, the set's
    /// entry that matches `origin`: the name of an allowed decision's origin for people,
    /// found again rather than carried in every decision.
    pub fn set_entry(&self, entry: u32, origin: &str) -> Option<&str> {
        self.origins.set_entry(entry, origin)
    }

    /// Decides one request.
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        // One call decides, whatever the rules: it is inlined here, and a policy without
        // routes decides with one test more than before routes existed.
        let rules = match &self.routes {
            None => self.own_rules(),
            Some(routes) => match routes.table.select(req.path) {
                Ok(route) => self.rules(route),
                Err(_) => return ambiguous(req, routes.ambiguous_mode),
            },
        };
        rules.decide(req)
    }

    /// The mode `decision` was made in: its route's, or for an ambiguous path the strictest
    /// of the policy's (enforce over standard over shadow).
    pub fn mode(&self, decision: &Decision<'_>) -> Mode {
        match (&self.routes, decision.reason) {
            (Some(routes), Reason::PathAmbiguous) => routes.ambiguous_mode,
            _ => self.rules(decision.route).grants.mode,
        }
    }

    /// The rules of `route`, or the policy's own.
    #[inline]
    fn rules(&self, route: Option<RouteIndex>) -> Rules<'_> {
        match (route, &self.routes) {
            (Some(i), Some(routes)) => {
                let r = &routes.rules[i.get()];
                Rules {
                    origins: r.origins.as_ref().unwrap_or(&self.origins),
                    grants: &r.grants,
                    route,
                }
            }
            _ => self.own_rules(),
        }
    }

    /// The policy's own rules.
    #[inline]
    fn own_rules(&self) -> Rules<'_> {
        Rules {
            origins: &self.origins,
            grants: &self.grants,
            route: None,
        }
    }

    /// A sentence explaining `decision` for `req` to an operator. It names the request's
    /// path, never its query (which may hold secrets).
    pub fn describe(&self, req: &Request<'_>, decision: &Decision<'_>) -> String {
        let rules = self.rules(decision.route);
        let path = without_query(req.path);
        let spec = &self.policy.spec;
        let origin = || {
            req.headers
                .get(ORIGIN)
                .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        let entry = |i: u32| {
            let (field, written) = match decision
                .route
                .and_then(|r| Some((r, spec.routes[r.get()].allowed_origins.as_ref()?)))
            {
                Some((route, own)) => (format!("{route}.allowed_origins[{i}]"), &own[i as usize]),
                None => (
                    format!("allowed_origins[{i}]"),
                    &spec.allowed_origins[i as usize],
                ),
            };
            match rules.origins.set_entry(i, &origin()) {
                Some(origin) => format!("{field} ({origin}, from {written})"),
                None => format!("{field} ({written})"),
            }
        };
        let shadow = if self.mode(decision) == Mode::Shadow {
            " (shadow mode: traffic is not changed)"
        } else {
            ""
        };
        let text = match decision.reason {
            Reason::NoOrigin => "no Origin header: not a CORS request".to_owned(),
            Reason::SameOrigin => format!("origin {} is the request's own origin", origin()),
            Reason::Allowed { entry: i } => format!("origin {} allowed by {}", origin(), entry(i)),
            Reason::OriginNotAllowed => format!("origin {} matches no allowed origin", origin()),
            Reason::NullNotAllowed => {
                "origin null is not listed (only an explicit `null` entry allows it)".to_owned()
            }
            Reason::OriginMalformed => format!(
                "Origin {:?} is not a serialized origin (scheme://host[:port], lowercase, no default port, no path)",
                origin()
            ),
            Reason::OriginRepeated => "the request has more than one Origin header".to_owned(),
            Reason::MethodNotAllowed => {
                let method = match decision.kind {
                    Kind::Preflight => req
                        .headers
                        .get(ACCESS_CONTROL_REQUEST_METHOD)
                        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                        .unwrap_or_default(),
                    _ => req.method.to_string(),
                };
                format!("method {method} is not in allowed_methods (methods are case-sensitive)")
            }
            Reason::MethodMalformed => {
                "Access-Control-Request-Method must be one method name, sent once".to_owned()
            }
            Reason::HeaderNotAllowed => {
                let name = req
                    .headers
                    .get_all(ACCESS_CONTROL_REQUEST_HEADERS)
                    .iter()
                    .flat_map(|l| l.as_bytes().split(|&b| b == b','))
                    .map(<[u8]>::trim_ascii)
                    .find(|n| !n.is_empty() && !rules.grants.header_allowed(n))
                    .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
                    .unwrap_or_default();
                if name == "authorization" && rules.grants.headers.any {
                    "requested header authorization is not allowed: `*` never covers it, list it explicitly".to_owned()
                } else {
                    format!("requested header {name} is not in allowed_headers")
                }
            }
            Reason::HeadersMalformed => {
                "Access-Control-Request-Headers is not a comma-separated list of header names"
                    .to_owned()
            }
            Reason::HeadersTooLarge => format!(
                "Access-Control-Request-Headers exceeds {MAX_REQUEST_HEADERS_BYTES} bytes, {MAX_REQUEST_HEADERS_ITEMS} names or {MAX_REQUEST_HEADERS_LINES} lines"
            ),
            Reason::PrivateNetworkNotAllowed => {
                "private network access was requested and allow_private_network is off".to_owned()
            }
            Reason::PathAmbiguous => return format!("{}{shadow}", self.describe_ambiguity(req)),
        };
        let route = match (&self.routes, decision.route) {
            (None, _) => String::new(),
            (Some(_), Some(i)) => format!("; route {i} ({}) decided", spec.routes[i.get()].path),
            (Some(_), None) if path.is_empty() => {
                "; no path given, so the policy's own rules decided".to_owned()
            }
            (Some(_), None) => {
                format!("; no route matches {path}, so the policy's own rules decided")
            }
        };
        format!("{text}{route}{shadow}")
    }

    /// Why a path is ambiguous: its readings and the rules each falls under.
    fn describe_ambiguity(&self, req: &Request<'_>) -> String {
        let spec = &self.policy.spec;
        let routes: Vec<String> = self
            .routes
            .as_ref()
            .map(|r| r.table.routes_of(req.path))
            .unwrap_or_default()
            .iter()
            .map(|route| match route {
                Some(i) => format!("{i} ({})", spec.routes[i.get()].path),
                None => "the policy's own rules".to_owned(),
            })
            .collect();
        let readings = route::readings(req.path);
        let path = without_query(req.path);
        if routes.len() < 2 {
            return format!(
                "the path {path} has escapes, dot segments, `//`, `\\` or `;`, and is longer than {} bytes or reads in more ways than Corsair follows (at most {}, of {} bytes in all): a cross-origin request to it is refused",
                route::MAX_READ_PATH_BYTES,
                route::MAX_READINGS,
                route::MAX_READ_BYTES,
            );
        }
        format!(
            "the path {path} reads as {} on different servers (by how they decode escapes, `\\`, `;` and dot segments, and letter case), which fall under {}: a cross-origin request to it is refused, since the upstream may serve another path than the one the rules would be chosen for",
            readings.join(" or "),
            routes.join(" and "),
        )
    }
}

impl<'p> Rules<'p> {
    #[inline]
    fn decide(self, req: &Request<'_>) -> Decision<'p> {
        let mut origins = req.headers.get_all(ORIGIN).into_iter();
        let Some(origin_value) = origins.next() else {
            return self.not_cors();
        };
        let kind = classify(req);
        if origins.next().is_some() {
            return self.deny(kind, Reason::OriginRepeated);
        }
        let Ok(origin) = origin_value.to_str() else {
            return self.deny(kind, Reason::OriginMalformed);
        };
        if let Some(authority) = req.authority
            && is_same_origin(origin, req.scheme, authority)
        {
            return same_origin(self.grants.mode, self.route);
        }
        let entry = match self.origins.find(origin) {
            Ok(entry) => entry,
            Err(reason) => return self.deny(kind, reason),
        };
        let allow_origin = if Some(entry) == self.origins.any && !self.grants.credentials {
            HeaderValue::from_static("*")
        } else {
            origin_value.clone()
        };
        match kind {
            Kind::Preflight => self.preflight(req, entry, allow_origin),
            _ => {
                if !self.grants.method_allowed(req.method.as_str()) {
                    return self.deny(kind, Reason::MethodNotAllowed);
                }
                self.finish(Decision {
                    kind,
                    allowed: true,
                    reason: Reason::Allowed { entry },
                    action: Action::Forward,
                    headers: Some(CorsHeaders {
                        allow_origin: Some(allow_origin),
                        allow_credentials: self.grants.credentials,
                        expose_headers: self.grants.expose_headers.as_ref(),
                        vary: Vary::ORIGIN,
                        ..CorsHeaders::default()
                    }),
                    route: self.route,
                })
            }
        }
    }

    /// A request without `Origin`: forwarded; a `*` policy without credentials still labels
    /// it `Access-Control-Allow-Origin: *` (so a cached copy serves any origin), every other
    /// policy only adds `Vary: Origin`.
    fn not_cors(self) -> Decision<'p> {
        let headers = if self.origins.any.is_some() && !self.grants.credentials {
            CorsHeaders {
                allow_origin: Some(HeaderValue::from_static("*")),
                expose_headers: self.grants.expose_headers.as_ref(),
                vary: Vary::ORIGIN,
                ..CorsHeaders::default()
            }
        } else {
            CorsHeaders::vary_only(Vary::ORIGIN)
        };
        self.finish(Decision {
            kind: Kind::NotCors,
            allowed: true,
            reason: Reason::NoOrigin,
            action: Action::Forward,
            headers: Some(headers),
            route: self.route,
        })
    }

    fn preflight(self, req: &Request<'_>, entry: u32, allow_origin: HeaderValue) -> Decision<'p> {
        let mut acrm = req
            .headers
            .get_all(ACCESS_CONTROL_REQUEST_METHOD)
            .into_iter();
        let method = match (acrm.next().map(HeaderValue::to_str), acrm.next()) {
            (Some(Ok(m)), None) if is_token(m) => m,
            _ => return self.deny(Kind::Preflight, Reason::MethodMalformed),
        };
        if !self.grants.method_allowed(method) {
            return self.deny(Kind::Preflight, Reason::MethodNotAllowed);
        }
        let allow_headers = match self.requested_headers(req.headers) {
            Ok(echo) => echo,
            Err(reason) => return self.deny(Kind::Preflight, reason),
        };
        let private_network = requests_private_network(req.headers);
        if private_network && !self.grants.private_network {
            return self.deny(Kind::Preflight, Reason::PrivateNetworkNotAllowed);
        }
        self.finish(Decision {
            kind: Kind::Preflight,
            allowed: true,
            reason: Reason::Allowed { entry },
            action: Action::Respond(StatusCode::NO_CONTENT),
            headers: Some(CorsHeaders {
                allow_origin: Some(allow_origin),
                allow_credentials: self.grants.credentials,
                allow_methods: self.grants.allow_methods.as_ref(),
                allow_headers,
                max_age: self.grants.max_age.as_ref(),
                allow_private_network: private_network,
                vary: Vary::PREFLIGHT,
                ..CorsHeaders::default()
            }),
            route: self.route,
        })
    }

    fn deny(self, kind: Kind, reason: Reason) -> Decision<'p> {
        deny(self.grants.mode, self.route, kind, reason)
    }

    #[inline]
    fn finish(self, decision: Decision<'p>) -> Decision<'p> {
        finish(self.grants.mode, decision)
    }

    /// Parses `Access-Control-Request-Headers` (every line; items split on commas, white
    /// space and empty items ignored) and checks every name. On success, the value to echo
    /// in `Access-Control-Allow-Headers`: the request's own value when it is already clean,
    /// else the names lowercased and joined.
    fn requested_headers(self, headers: &HeaderMap) -> Result<Option<HeaderValue>, Reason> {
        let lines = headers.get_all(ACCESS_CONTROL_REQUEST_HEADERS);
        let mut total = 0;
        let mut line_count = 0;
        for line in &lines {
            total += line.len();
            line_count += 1;
            if total > MAX_REQUEST_HEADERS_BYTES || line_count > MAX_REQUEST_HEADERS_LINES {
                return Err(Reason::HeadersTooLarge);
            }
        }
        let mut items = 0;
        let mut clean = line_count == 1;
        for line in &lines {
            for item in line.as_bytes().split(|&b| b == b',') {
                let name = item.trim_ascii();
                if name.is_empty() {
                    clean = false;
                    continue;
                }
                if !name.iter().all(|&b| is_tchar(b)) {
                    return Err(Reason::HeadersMalformed);
                }
                items += 1;
                if items > MAX_REQUEST_HEADERS_ITEMS {
                    return Err(Reason::HeadersTooLarge);
                }
                if !self.grants.header_allowed(name) {
                    return Err(Reason::HeaderNotAllowed);
                }
                clean &= name.len() == item.len() && !name.iter().any(u8::is_ascii_uppercase);
            }
        }
        if items == 0 {
            return Ok(None);
        }
        if clean {
            return Ok(lines.iter().next().cloned());
        }
        let mut echo = Vec::with_capacity(total + items);
        for line in &lines {
            for name in line
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
            {
                if !name.is_empty() {
                    if !echo.is_empty() {
                        echo.extend_from_slice(b", ");
                    }
                    echo.extend(name.iter().map(u8::to_ascii_lowercase));
                }
            }
        }
        Ok(Some(
            HeaderValue::try_from(echo).expect("tokens are valid header bytes"),
        ))
    }
}

/// A request whose path falls under different routes as different servers read it: no
/// route's rules can be trusted with it, so a cross-origin request is denied, in the
/// strictest mode of the policy. A request without `Origin`, or from its own origin, needs
/// no rules and passes (without any `Access-Control-Allow-Origin`).
#[cold]
fn ambiguous<'p>(req: &Request<'_>, mode: Mode) -> Decision<'p> {
    let mut origins = req.headers.get_all(ORIGIN).into_iter();
    let Some(origin_value) = origins.next() else {
        return finish(
            mode,
            Decision {
                kind: Kind::NotCors,
                allowed: true,
                reason: Reason::NoOrigin,
                action: Action::Forward,
                headers: Some(CorsHeaders::vary_only(Vary::ORIGIN)),
                route: None,
            },
        );
    };
    let kind = classify(req);
    if origins.next().is_none()
        && let Ok(origin) = origin_value.to_str()
        && let Some(authority) = req.authority
        && is_same_origin(origin, req.scheme, authority)
    {
        return same_origin(mode, None);
    }
    deny(mode, None, kind, Reason::PathAmbiguous)
}

/// A request target without its query or fragment.
fn without_query(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or_default()
}

/// A request with `Origin`: a preflight (`OPTIONS` with `Access-Control-Request-Method`) or
/// an actual request.
#[inline]
fn classify(req: &Request<'_>) -> Kind {
    if req.method == Method::OPTIONS && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD) {
        Kind::Preflight
    } else {
        Kind::Actual
    }
}

/// A request from its own origin: allowed, whatever the rules.
fn same_origin<'p>(mode: Mode, route: Option<RouteIndex>) -> Decision<'p> {
    finish(
        mode,
        Decision {
            kind: Kind::SameOrigin,
            allowed: true,
            reason: Reason::SameOrigin,
            action: Action::Forward,
            headers: Some(CorsHeaders::vary_only(Vary::ORIGIN)),
            route,
        },
    )
}

/// A disallowed request: no CORS headers, answered here when it is a preflight or when
/// the rules enforce.
fn deny<'p>(mode: Mode, route: Option<RouteIndex>, kind: Kind, reason: Reason) -> Decision<'p> {
    let vary = if kind == Kind::Preflight {
        Vary::PREFLIGHT
    } else {
        Vary::ORIGIN
    };
    let action = match (mode, kind) {
        (Mode::Enforce, _) => Action::Respond(StatusCode::FORBIDDEN),
        (_, Kind::Preflight) => Action::Respond(StatusCode::NO_CONTENT),
        _ => Action::Forward,
    };
    finish(
        mode,
        Decision {
            kind,
            allowed: false,
            reason,
            action,
            headers: Some(CorsHeaders::vary_only(vary)),
            route,
        },
    )
}

/// Shadow mode decides the same, then changes nothing.
#[inline]
fn finish(mode: Mode, mut decision: Decision<'_>) -> Decision<'_> {
    if mode == Mode::Shadow {
        decision.action = Action::Forward;
        decision.headers = None;
    }
    decision
}

/// Whether the preflight asks for private network access (`...-Private-Network: true`).
fn requests_private_network(headers: &HeaderMap) -> bool {
    headers
        .get(ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// Whether `origin` is `scheme://authority`, minding the default port and host case: the
/// engine's same-origin rule, for callers that must apply it without a policy.
pub fn is_same_origin(origin: &str, scheme: Scheme, authority: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix(scheme.as_str())
        .and_then(|r| r.strip_prefix("://"))
    else {
        return false;
    };
    let default_port = match scheme {
        Scheme::Http => ":80",
        Scheme::Https => ":443",
    };
    let authority = authority.strip_suffix(default_port).unwrap_or(authority);
    !authority.is_empty() && rest.eq_ignore_ascii_case(authority)
}
