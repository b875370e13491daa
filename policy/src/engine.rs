//! The compiled engine: [`CompiledPolicy`] is built once per policy version and decides each
//! request — preflight, actual, same-origin or not CORS at all — returning the [`Decision`]
//! a correct CORS server must act on, with a [`Reason`] an operator can read.
//!
//! Everything that can be done at compile time is: exact origins sit in a hash map, wildcard
//! origins in per-scheme-and-port suffix maps, header values are prebuilt. A decision reads
//! the request's headers in place and allocates nothing but a normalized
//! `Access-Control-Allow-Headers` echo.

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
use crate::origin::{RequestOrigin, Scheme};
use crate::origin_set::OriginSet;

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
}

impl<'a> Request<'a> {
    /// A request with no known authority (every `Origin` counts as cross-origin).
    pub fn new(method: &'a Method, headers: &'a HeaderMap) -> Self {
        Request {
            method,
            headers,
            scheme: Scheme::Http,
            authority: None,
        }
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
        /// Index into the policy's `allowed_origins` (for a `set:` reference,
        /// [`CompiledPolicy::set_entry`] names the set's entry).
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
            | Reason::HeadersTooLarge => "malformed",
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
}

/// A policy compiled for deciding requests.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: Policy,
    origins: OriginMatcher,
    /// The referenced sets, compiled once and shared, each with its `allowed_origins` index.
    sets: Vec<(u32, Arc<OriginSet>)>,
    methods: TokenSet,
    headers: TokenSet,
    credentials: bool,
    private_network: bool,
    allow_methods: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
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

impl CompiledPolicy {
    /// Compiles a validated policy.
    pub fn new(policy: Policy) -> CompiledPolicy {
        let origins = OriginMatcher::new(policy.origins.iter().map(|(i, p)| (*i, p)));
        let sets = policy.sets.clone();
        let spec = &policy.spec;
        let methods = TokenSet::new(spec.allowed_methods.iter(), false);
        let headers = TokenSet::new(spec.allowed_headers.iter(), true);
        CompiledPolicy {
            allow_methods: if methods.any {
                Some(HeaderValue::from_static("*"))
            } else {
                header_value(&spec.allowed_methods)
            },
            expose_headers: header_value(&spec.exposed_headers),
            max_age: spec.max_age.map(HeaderValue::from),
            credentials: spec.allow_credentials,
            private_network: spec.allow_private_network,
            origins,
            sets,
            methods,
            headers,
            policy,
        }
    }

    /// The policy this was compiled from.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides one request.
    pub fn decide(&self, req: &Request<'_>) -> Decision<'_> {
        let mut origins = req.headers.get_all(ORIGIN).into_iter();
        let Some(origin_value) = origins.next() else {
            return self.not_cors();
        };
        let kind = if req.method == Method::OPTIONS
            && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            Kind::Preflight
        } else {
            Kind::Actual
        };
        if origins.next().is_some() {
            return self.deny(kind, Reason::OriginRepeated);
        }
        let Ok(origin) = origin_value.to_str() else {
            return self.deny(kind, Reason::OriginMalformed);
        };
        if let Some(authority) = req.authority
            && is_same_origin(origin, req.scheme, authority)
        {
            return self.finish(Decision {
                kind: Kind::SameOrigin,
                allowed: true,
                reason: Reason::SameOrigin,
                action: Action::Forward,
                headers: Some(CorsHeaders::vary_only(Vary::ORIGIN)),
            });
        }
        let entry = match self.match_origin(origin) {
            Ok(matched) => matched,
            Err(reason) => return self.deny(kind, reason),
        };
        let allow_origin = if Some(entry) == self.origins.any && !self.credentials {
            HeaderValue::from_static("*")
        } else {
            origin_value.clone()
        };
        match kind {
            Kind::Preflight => self.preflight(req, entry, allow_origin),
            _ => {
                if !self.method_allowed(req.method.as_str()) {
                    return self.deny(kind, Reason::MethodNotAllowed);
                }
                self.finish(Decision {
                    kind,
                    allowed: true,
                    reason: Reason::Allowed { entry },
                    action: Action::Forward,
                    headers: Some(CorsHeaders {
                        allow_origin: Some(allow_origin),
                        allow_credentials: self.credentials,
                        expose_headers: self.expose_headers.as_ref(),
                        vary: Vary::ORIGIN,
                        ..CorsHeaders::default()
                    }),
                })
            }
        }
    }

    /// A request without `Origin`: forwarded; a `*` policy without credentials still labels
    /// it `Access-Control-Allow-Origin: *` (so a cached copy serves any origin), every other
    /// policy only adds `Vary: Origin`.
    fn not_cors(&self) -> Decision<'_> {
        let headers = if self.origins.any.is_some() && !self.credentials {
            CorsHeaders {
                allow_origin: Some(HeaderValue::from_static("*")),
                expose_headers: self.expose_headers.as_ref(),
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
        })
    }

    fn preflight(&self, req: &Request<'_>, entry: u32, allow_origin: HeaderValue) -> Decision<'_> {
        let mut acrm = req
            .headers
            .get_all(ACCESS_CONTROL_REQUEST_METHOD)
            .into_iter();
        let method = match (acrm.next().map(HeaderValue::to_str), acrm.next()) {
            (Some(Ok(m)), None) if is_token(m) => m,
            _ => return self.deny(Kind::Preflight, Reason::MethodMalformed),
        };
        if !self.method_allowed(method) {
            return self.deny(Kind::Preflight, Reason::MethodNotAllowed);
        }
        let allow_headers = match self.requested_headers(req.headers) {
            Ok(echo) => echo,
            Err(reason) => return self.deny(Kind::Preflight, reason),
        };
        let private_network = requests_private_network(req.headers);
        if private_network && !self.private_network {
            return self.deny(Kind::Preflight, Reason::PrivateNetworkNotAllowed);
        }
        self.finish(Decision {
            kind: Kind::Preflight,
            allowed: true,
            reason: Reason::Allowed { entry },
            action: Action::Respond(StatusCode::NO_CONTENT),
            headers: Some(CorsHeaders {
                allow_origin: Some(allow_origin),
                allow_credentials: self.credentials,
                allow_methods: self.allow_methods.as_ref(),
                allow_headers,
                max_age: self.max_age.as_ref(),
                allow_private_network: private_network,
                vary: Vary::PREFLIGHT,
                ..CorsHeaders::default()
            }),
        })
    }

    /// A disallowed request: no CORS headers, answered here when it is a preflight or when
    /// the policy enforces.
    fn deny(&self, kind: Kind, reason: Reason) -> Decision<'_> {
        let vary = if kind == Kind::Preflight {
            Vary::PREFLIGHT
        } else {
            Vary::ORIGIN
        };
        let action = match (self.policy.spec.mode, kind) {
            (Mode::Enforce, _) => Action::Respond(StatusCode::FORBIDDEN),
            (_, Kind::Preflight) => Action::Respond(StatusCode::NO_CONTENT),
            _ => Action::Forward,
        };
        self.finish(Decision {
            kind,
            allowed: false,
            reason,
            action,
            headers: Some(CorsHeaders::vary_only(vary)),
        })
    }

    /// Shadow mode decides the same, then changes nothing.
    #[inline]
    fn finish<'p>(&self, mut decision: Decision<'p>) -> Decision<'p> {
        if self.policy.spec.mode == Mode::Shadow {
            decision.action = Action::Forward;
            decision.headers = None;
        }
        decision
    }

    /// Finds the allowed-origin entry that matches a request origin: the policy's own
    /// entries first, then its sets' (the `set:` reference's index), then `*`. A policy
    /// without sets takes the short way, which never looks at them.
    fn match_origin(&self, origin: &str) -> Result<u32, Reason> {
        if !self.sets.is_empty() {
            return self.match_origin_with_sets(origin);
        }
        if origin == "null" {
            return self.origins.null.ok_or(Reason::NullNotAllowed);
        }
        if let Some(entry) = self.origins.exact(origin) {
            return Ok(entry);
        }
        let parsed = RequestOrigin::parse(origin).ok_or(Reason::OriginMalformed)?;
        self.origins
            .pattern(origin, &parsed)
            .or(self.origins.any)
            .ok_or(Reason::OriginNotAllowed)
    }

    /// [`match_origin`](Self::match_origin) for a policy that references sets: each kind of
    /// entry is asked of the policy, then of its sets.
    fn match_origin_with_sets(&self, origin: &str) -> Result<u32, Reason> {
        if origin == "null" {
            return self
                .origins
                .null
                .or_else(|| self.in_sets(|m| m.null))
                .ok_or(Reason::NullNotAllowed);
        }
        if let Some(entry) = self
            .origins
            .exact(origin)
            .or_else(|| self.in_sets(|m| m.exact(origin)))
        {
            return Ok(entry);
        }
        let parsed = RequestOrigin::parse(origin).ok_or(Reason::OriginMalformed)?;
        self.origins
            .pattern(origin, &parsed)
            .or_else(|| self.in_sets(|m| m.pattern(origin, &parsed)))
            .or(self.origins.any)
            .ok_or(Reason::OriginNotAllowed)
    }

    /// The index of the first referenced set `find` finds an entry in.
    fn in_sets(&self, find: impl Fn(&OriginMatcher) -> Option<u32>) -> Option<u32> {
        self.sets
            .iter()
            .find(|(_, set)| find(set.matcher()).is_some())
            .map(|(entry, _)| *entry)
    }

    /// When `allowed_origins[entry]` is a `set:` reference, the set's entry that matches
    /// `origin`: the name of an allowed decision's origin for people, found again rather
    /// than carried in every decision.
    pub fn set_entry(&self, entry: u32, origin: &str) -> Option<&str> {
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

    /// Parses `Access-Control-Request-Headers` (every line; items split on commas, white
    /// space and empty items ignored) and checks every name. On success, the value to echo
    /// in `Access-Control-Allow-Headers`: the request's own value when it is already clean,
    /// else the names lowercased and joined.
    fn requested_headers(&self, headers: &HeaderMap) -> Result<Option<HeaderValue>, Reason> {
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
                if !self.header_allowed(name) {
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

    /// A sentence explaining `decision` for `req` to an operator.
    pub fn describe(&self, req: &Request<'_>, decision: &Decision<'_>) -> String {
        let origin = || {
            req.headers
                .get(ORIGIN)
                .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
                .unwrap_or_default()
        };
        let entry = |i: u32| {
            let written = &self.policy.spec.allowed_origins[i as usize];
            match self.set_entry(i, &origin()) {
                Some(origin) => format!("allowed_origins[{i}] ({origin}, from {written})"),
                None => format!("allowed_origins[{i}] ({written})"),
            }
        };
        let shadow = if self.policy.spec.mode == Mode::Shadow {
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
                    .find(|n| !n.is_empty() && !self.header_allowed(n))
                    .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
                    .unwrap_or_default();
                if name == "authorization" && self.headers.any {
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
        };
        format!("{text}{shadow}")
    }
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
