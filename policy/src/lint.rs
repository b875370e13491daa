//! Validation and lint: turns a [`PolicySpec`] into a canonical [`Policy`] plus
//! [`Finding`]s, each naming the field path, a stable [`Code`] and a sentence.
//!
//! Errors always refuse the policy; risks refuse it unless the caller acknowledges their code;
//! notices are returned and accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::model::{Policy, PolicySpec, RouteOrigins, RouteSpec};
use crate::origin::{OriginEntryError, OriginPattern, REGEX_PREFIX, Scheme};
use crate::origin_set::{OriginSet, SET_PREFIX, SetLookup};
use crate::route::{self, MAX_ROUTES};

/// At most this many allowed-origin entries.
pub const MAX_ORIGINS: usize = 20_000;
/// At most this many entries in `allowed_methods`, `allowed_headers` or `exposed_headers`.
pub const MAX_LIST_ENTRIES: usize = 256;
/// At most this many bytes in one method or header name.
pub const MAX_TOKEN_LEN: usize = 256;
/// At most this many bytes in the whole policy (the sum of its strings).
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// Browsers cap preflight caching at this many seconds (Chromium: 7200).
pub const BROWSER_MAX_AGE_CAP: u32 = 7200;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Always refused.
    Error,
    /// Refused unless the caller acknowledges the finding's code.
    Risk,
    /// Reported, accepted.
    Notice,
}

impl Severity {
    /// The severity's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Risk => "risk",
            Severity::Notice => "notice",
        }
    }
}

macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident => $severity:ident,)*) => {
        /// A stable finding code. Its name (`WILDCARD_WITH_CREDENTIALS`) is what operators
        /// acknowledge and scripts match on; it never changes meaning.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum Code {
            $($(#[$doc])* $variant,)*
        }

        impl Code {
            /// Every code, in documentation order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as written (`NULL_ORIGIN`).
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => stringify!($variant),)* }
            }

            /// The severity findings with this code always have.
            pub fn severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$severity,)* }
            }

            /// Looks a code up by name.
            pub fn from_name(name: &str) -> Option<Code> {
                match name { $(stringify!($variant) => Some(Code::$variant),)* _ => None }
            }
        }
    };
}

codes! {
    /// The service name is not a lowercase DNS label.
    INVALID_SERVICE_NAME => Error,
    /// An allowed origin is malformed (path, userinfo, scheme, port, host, white space, IDN).
    INVALID_ORIGIN => Error,
    /// A `regex:` origin does not compile or exceeds the size limits.
    INVALID_REGEX => Error,
    /// A method is not an HTTP token.
    INVALID_METHOD => Error,
    /// A header name is not an HTTP token.
    INVALID_HEADER => Error,
    /// A list has more entries than allowed.
    TOO_MANY_ENTRIES => Error,
    /// The policy is larger than allowed.
    POLICY_TOO_LARGE => Error,
    /// `*` origin with credentials: browsers refuse it, and reflecting any origin instead
    /// would hand every website the user's session.
    WILDCARD_WITH_CREDENTIALS => Error,
    /// `*` in allowed methods with credentials: browsers treat it literally.
    CREDENTIALS_WITH_WILDCARD_METHODS => Error,
    /// `*` in exposed headers with credentials: browsers treat it literally.
    CREDENTIALS_WITH_WILDCARD_EXPOSED_HEADERS => Error,
    /// Private network access granted to any origin.
    PRIVATE_NETWORK_WITH_WILDCARD => Error,
    /// A route path is not in canonical form, so no request could be matched to it reliably.
    INVALID_ROUTE_PATH => Error,
    /// A route repeats the path of an earlier one (or differs from it only in letter case),
    /// so one of them could never decide a request.
    DUPLICATE_ROUTE => Error,
    /// `null` is allowed: sandboxed iframes, `file:` pages and redirects all send it.
    NULL_ORIGIN => Risk,
    /// An `http://` origin beside `https://` ones: anyone on the network path can inject it.
    INSECURE_ORIGIN => Risk,
    /// A regular-expression origin: easy to get wrong.
    REGEX_ORIGIN => Risk,
    /// A wildcard directly under a public suffix (`https://*.co.uk`, `https://*.github.io`)
    /// allows sites owned by anyone.
    WILDCARD_UNDER_PUBLIC_SUFFIX => Risk,
    /// A wildcard subdomain: any dangling subdomain can be taken over.
    WILDCARD_SUBDOMAIN => Notice,
    /// A regex without `^`/`$`: it is matched against the whole origin anyway.
    UNANCHORED_REGEX => Notice,
    /// A regex with an unescaped `.`, which matches any character, not only a dot.
    REGEX_UNESCAPED_DOT => Notice,
    /// Max age above what browsers honour.
    MAX_AGE_ABOVE_BROWSER_CAP => Notice,
    /// A lowercase variant of a standard method (`patch`): methods are case-sensitive.
    LOWERCASE_METHOD => Notice,
    /// An entry that repeats an earlier one (after canonicalization); it is dropped.
    DUPLICATE_ENTRY => Notice,
    /// `*` in allowed headers never covers `authorization`.
    WILDCARD_HEADERS_EXCLUDE_AUTHORIZATION => Notice,
    /// No origin is allowed: the policy allows no cross-origin request.
    NO_ORIGINS => Notice,
    /// An origin set's name (or the name in a `set:` reference) is not a lowercase DNS label.
    INVALID_SET_NAME => Error,
    /// A `set:` reference names no origin set.
    UNKNOWN_ORIGIN_SET => Error,
    /// `*` in an origin set: a set lists origins, and `*` belongs in a policy of its own.
    WILDCARD_IN_SET => Error,
    /// An origin set's description is longer than allowed.
    DESCRIPTION_TOO_LONG => Error,
    /// A route sets no field: its paths get the policy's own rules.
    ROUTE_OVERRIDES_NOTHING => Notice,
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validation or lint finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The field path, as `allowed_origins[2]`.
    pub field: String,
    /// The stable code.
    pub code: Code,
    /// The code's severity.
    pub severity: Severity,
    /// A sentence for an operator.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} [{} {}]",
            self.field,
            self.message,
            self.severity.as_str(),
            self.code
        )
    }
}

/// A policy that passed validation, with every finding (notices and acknowledged risks).
#[derive(Debug, Clone)]
pub struct Validated {
    /// The canonical policy.
    pub policy: Policy,
    /// All findings, in field order.
    pub findings: Vec<Finding>,
}

/// A refused policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy refused: {}", .blocking.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Rejected {
    /// What refused it: every error, and every risk not acknowledged.
    pub blocking: Vec<Finding>,
    /// Every finding, blocking or not.
    pub findings: Vec<Finding>,
}

impl Rejected {
    /// Whether only unacknowledged risks (no errors) refused the policy.
    pub fn only_risks(&self) -> bool {
        self.blocking.iter().all(|f| f.severity == Severity::Risk)
    }
}

impl Policy {
    /// Validates and lints `spec`, which references no origin set. Refuses it on any error,
    /// and on any risk whose code is not in `acknowledged`.
    pub fn check<S: AsRef<str>>(
        spec: &PolicySpec,
        acknowledged: &[S],
    ) -> Result<Validated, Rejected> {
        Policy::check_with_sets(spec, acknowledged, &|_| None)
    }

    /// Validates and lints `spec`, resolving its `set:` references through `sets`. Refuses it
    /// on any error, and on any risk whose code is not in `acknowledged`.
    pub fn check_with_sets<S: AsRef<str>>(
        spec: &PolicySpec,
        acknowledged: &[S],
        sets: SetLookup<'_>,
    ) -> Result<Validated, Rejected> {
        let (policy, findings) = lint_with_sets(spec, sets);
        let blocking = blocking(&findings, acknowledged);
        match policy {
            Some(policy) if blocking.is_empty() => Ok(Validated { policy, findings }),
            _ => Err(Rejected { blocking, findings }),
        }
    }
}

/// The findings that refuse a write: every error, and every risk not in `acknowledged`.
pub fn blocking<S: AsRef<str>>(findings: &[Finding], acknowledged: &[S]) -> Vec<Finding> {
    findings
        .iter()
        .filter(|f| match f.severity {
            Severity::Error => true,
            Severity::Risk => !acknowledged.iter().any(|a| a.as_ref() == f.code.as_str()),
            Severity::Notice => false,
        })
        .cloned()
        .collect()
}

/// Validates and lints `spec`, which references no origin set (a `set:` entry is an
/// `UNKNOWN_ORIGIN_SET` error): the canonical policy (`None` when any finding is an error)
/// and every finding, in field order.
pub fn lint(spec: &PolicySpec) -> (Option<Policy>, Vec<Finding>) {
    lint_with_sets(spec, &|_| None)
}

/// Validates and lints `spec`, resolving its `set:` references through `sets`. Findings of
/// a referenced set appear once per set and code, on the reference's field.
pub fn lint_with_sets(spec: &PolicySpec, sets: SetLookup<'_>) -> (Option<Policy>, Vec<Finding>) {
    let mut l = Linter::default();
    l.service(&spec.service);
    let origins = l.origins(
        "allowed_origins",
        &spec.allowed_origins,
        &OriginsContext {
            credentials: spec.allow_credentials,
            private_network: spec.allow_private_network,
            sets: Some(sets),
        },
    );
    let methods = l.methods(spec);
    let headers = l.tokens(
        "allowed_headers",
        &spec.allowed_headers,
        Code::INVALID_HEADER,
        true,
    );
    if spec.allowed_headers.iter().any(|h| h == "*")
        && !spec
            .allowed_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("authorization"))
    {
        l.push(
            "allowed_headers".into(),
            Code::WILDCARD_HEADERS_EXCLUDE_AUTHORIZATION,
            "`*` allows any request header except authorization; list authorization explicitly if it is needed".into(),
        );
    }
    let exposed = l.tokens(
        "exposed_headers",
        &spec.exposed_headers,
        Code::INVALID_HEADER,
        true,
    );
    if spec.allow_credentials {
        if let Some(i) = spec.allowed_methods.iter().position(|m| m == "*") {
            l.push(
                format!("allowed_methods[{i}]"),
                Code::CREDENTIALS_WITH_WILDCARD_METHODS,
                "`*` cannot be combined with allow_credentials: browsers read it as a method named `*`; list the methods".into(),
            );
        }
        if let Some(i) = spec.exposed_headers.iter().position(|h| h == "*") {
            l.push(
                format!("exposed_headers[{i}]"),
                Code::CREDENTIALS_WITH_WILDCARD_EXPOSED_HEADERS,
                "`*` cannot be combined with allow_credentials: browsers read it as a header named `*`; list the headers".into(),
            );
        }
    }
    if let Some(max_age) = spec.max_age
        && max_age > BROWSER_MAX_AGE_CAP
    {
        l.push(
            "max_age".into(),
            Code::MAX_AGE_ABOVE_BROWSER_CAP,
            format!("browsers cache preflights for at most {BROWSER_MAX_AGE_CAP} seconds; {max_age} will be capped"),
        );
    }
    let size: usize = spec.service.len()
        + origins.set_bytes
        + [
            &spec.allowed_origins,
            &spec.allowed_methods,
            &spec.allowed_headers,
            &spec.exposed_headers,
        ]
        .iter()
        .flat_map(|list| list.iter())
        .map(String::len)
        .sum::<usize>()
        + spec.routes.iter().map(RouteSpec::bytes).sum::<usize>();
    // Routes are checked only within the size limit, which bounds the work they take.
    let routes = if size > MAX_POLICY_BYTES {
        l.push(
            "".into(),
            Code::POLICY_TOO_LARGE,
            format!("the policy has {size} bytes of entries; the limit is {MAX_POLICY_BYTES}"),
        );
        Vec::new()
    } else {
        l.routes(spec, sets)
    };

    let Linter { findings } = l;
    let ok = !findings.iter().any(|f| f.severity == Severity::Error);
    let (routes, route_origins) = routes.into_iter().unzip();
    let policy = ok.then(|| Policy {
        spec: PolicySpec {
            service: spec.service.clone(),
            allowed_origins: origins.canonical,
            allowed_methods: methods,
            allowed_headers: headers,
            exposed_headers: exposed,
            allow_credentials: spec.allow_credentials,
            max_age: spec.max_age,
            allow_private_network: spec.allow_private_network,
            mode: spec.mode,
            routes,
        },
        origins: origins.patterns,
        sets: origins.sets,
        route_origins,
    });
    let mut findings = findings;
    findings.sort_by_key(|f| field_order(&f.field));
    (policy, findings)
}

/// Orders findings by route (the policy's own fields first, the policy as a whole last),
/// then by field, then by index within the field.
fn field_order(field: &str) -> (usize, usize, usize) {
    if field.is_empty() {
        return (usize::MAX, 0, 0);
    }
    let route = field
        .strip_prefix("routes[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
    match route {
        Some((i, rest)) => {
            let (name, index) = name_order(rest.strip_prefix('.').unwrap_or(rest));
            (1 + i, name, index)
        }
        None => {
            let (name, index) = name_order(field);
            (0, name, index)
        }
    }
}

/// A field's place among the fields, and its index (`allowed_origins[2]`).
fn name_order(field: &str) -> (usize, usize) {
    const FIELDS: [&str; 11] = [
        "",
        "service",
        "path",
        "allowed_origins",
        "allowed_methods",
        "allowed_headers",
        "exposed_headers",
        "allow_credentials",
        "max_age",
        "allow_private_network",
        "routes",
    ];
    let (name, index) = match field.split_once('[') {
        Some((name, rest)) => (name, rest.trim_end_matches(']').parse().unwrap_or(0)),
        None => (field, 0),
    };
    (
        FIELDS
            .iter()
            .position(|f| *f == name)
            .unwrap_or(FIELDS.len()),
        index,
    )
}

/// The field a cross-field finding on `list` also depends on.
fn partner(code: Code) -> Option<&'static str> {
    match code {
        Code::WILDCARD_WITH_CREDENTIALS
        | Code::CREDENTIALS_WITH_WILDCARD_METHODS
        | Code::CREDENTIALS_WITH_WILDCARD_EXPOSED_HEADERS => Some("allow_credentials"),
        Code::PRIVATE_NETWORK_WITH_WILDCARD => Some("allow_private_network"),
        _ => None,
    }
}

/// Which fields of the policy a route sets, by name.
fn route_sets(route: &RouteSpec, field: &str) -> bool {
    match field {
        "allowed_origins" => route.allowed_origins.is_some(),
        "allowed_methods" => route.allowed_methods.is_some(),
        "allowed_headers" => route.allowed_headers.is_some(),
        "exposed_headers" => route.exposed_headers.is_some(),
        "allow_credentials" => route.allow_credentials.is_some(),
        "max_age" => route.max_age.is_some(),
        "allow_private_network" => route.allow_private_network.is_some(),
        "mode" => route.mode.is_some(),
        _ => false,
    }
}

/// The rules a route applies, for checking: its own fields, the policy's for the rest. An
/// inherited list stands in as `["*"]` when it has `*` (the only entry that combines with
/// other fields) and as `[]` otherwise: findings on inherited lists are the policy's own, and
/// a long list is not checked again for every route.
fn rules_of(spec: &PolicySpec, route: &RouteSpec) -> PolicySpec {
    let list = |own: &Option<Vec<String>>, inherited: &Vec<String>| match own {
        Some(own) => own.clone(),
        None if inherited.iter().any(|e| e == "*") => vec!["*".to_owned()],
        None => Vec::new(),
    };
    PolicySpec {
        service: spec.service.clone(),
        allowed_origins: list(&route.allowed_origins, &spec.allowed_origins),
        allowed_methods: list(&route.allowed_methods, &spec.allowed_methods),
        allowed_headers: list(&route.allowed_headers, &spec.allowed_headers),
        exposed_headers: list(&route.exposed_headers, &spec.exposed_headers),
        allow_credentials: route.allow_credentials.unwrap_or(spec.allow_credentials),
        max_age: route.max_age.or(spec.max_age),
        allow_private_network: route
            .allow_private_network
            .unwrap_or(spec.allow_private_network),
        mode: route.mode.unwrap_or(spec.mode),
        routes: Vec::new(),
    }
}

#[derive(Default)]
pub(crate) struct Linter {
    pub(crate) findings: Vec<Finding>,
}

/// What the checks of an origin list depend on besides the list.
pub(crate) struct OriginsContext<'a> {
    pub(crate) credentials: bool,
    pub(crate) private_network: bool,
    /// How `set:` references resolve; `None` for a set's own entries, where `*` and
    /// references are refused.
    pub(crate) sets: Option<SetLookup<'a>>,
}

/// A checked origin list.
#[derive(Default)]
pub(crate) struct Origins {
    /// The parsed entries, each with its index in `canonical`.
    pub(crate) patterns: Vec<(u32, OriginPattern)>,
    /// The referenced sets, each with its index in `canonical`.
    pub(crate) sets: Vec<(u32, Arc<OriginSet>)>,
    /// The canonical list, duplicates dropped, references kept as written.
    pub(crate) canonical: Vec<String>,
    /// Whether an own entry is https.
    pub(crate) has_https: bool,
    /// How many own entries are plain http.
    pub(crate) insecure: usize,
    /// Bytes of the referenced sets' entries.
    pub(crate) set_bytes: usize,
}

/// What a service or origin set name may be.
pub(crate) const DNS_LABEL: &str = "1 to 63 lowercase letters, digits and hyphens, starting with a letter, not ending with a hyphen";

/// Whether `name` is a lowercase DNS label starting with a letter (see [`DNS_LABEL`]).
pub(crate) fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether an entry is plain http (exact or wildcard).
fn is_insecure(pattern: &OriginPattern) -> bool {
    matches!(pattern, OriginPattern::Exact(o) if o.starts_with("http://"))
        || matches!(
            pattern,
            OriginPattern::Subdomains {
                scheme: Scheme::Http,
                ..
            }
        )
}

impl Linter {
    pub(crate) fn push(&mut self, field: String, code: Code, message: String) {
        self.findings.push(Finding {
            field,
            code,
            severity: code.severity(),
            message,
        });
    }

    /// Checks every route: its path, and every check of [`lint`] on the rules it applies
    /// (what it sets, the rest inherited). A finding on a field the route sets is
    /// reported under `routes[i].`; one that only the combination with an inherited field
    /// makes is reported on the field the route sets; the rest are the policy's own and
    /// reported once, at the top. Returns each route in canonical form, with its parsed
    /// origins when it sets them.
    fn routes(
        &mut self,
        spec: &PolicySpec,
        sets: SetLookup<'_>,
    ) -> Vec<(RouteSpec, Option<RouteOrigins>)> {
        if spec.routes.len() > MAX_ROUTES {
            self.push(
                "routes".into(),
                Code::TOO_MANY_ENTRIES,
                format!("{} routes; the limit is {MAX_ROUTES}", spec.routes.len()),
            );
            return Vec::new();
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(spec.routes.len());
        let mut seen_folded: HashMap<String, usize> = HashMap::with_capacity(spec.routes.len());
        let mut out = Vec::with_capacity(spec.routes.len());
        for (i, route) in spec.routes.iter().enumerate() {
            let prefix = format!("routes[{i}]");
            let path_field = format!("{prefix}.path");
            if let Err(problem) = route::check_path(&route.path) {
                self.push(path_field.clone(), Code::INVALID_ROUTE_PATH, problem);
            }
            if let Some(j) = seen.get(route.path.as_str()) {
                self.push(
                    path_field,
                    Code::DUPLICATE_ROUTE,
                    format!("{} is also the path of routes[{j}]", route.path),
                );
            } else if let Some(j) = seen_folded.get(&route.path.to_ascii_lowercase()) {
                self.push(
                    path_field,
                    Code::DUPLICATE_ROUTE,
                    format!(
                        "{} differs from routes[{j}].path ({}) only in letter case: a server that ignores case serves both alike, so requests under either would be refused as ambiguous",
                        route.path, spec.routes[*j].path
                    ),
                );
            }
            seen.entry(&route.path).or_insert(i);
            seen_folded
                .entry(route.path.to_ascii_lowercase())
                .or_insert(i);
            if route.overrides_nothing() {
                self.push(
                    prefix.clone(),
                    Code::ROUTE_OVERRIDES_NOTHING,
                    format!("the route sets no field, so {} gets the policy's own rules (which also stops a shorter route from applying to it)", route.path),
                );
            }

            let (checked, findings) = lint_with_sets(&rules_of(spec, route), sets);
            for finding in findings {
                let name = finding.field.split('[').next().unwrap_or_default();
                if route_sets(route, name) {
                    self.push(
                        format!("{prefix}.{}", finding.field),
                        finding.code,
                        finding.message,
                    );
                } else if let Some(partner) = partner(finding.code)
                    && route_sets(route, partner)
                {
                    self.push(
                        format!("{prefix}.{partner}"),
                        finding.code,
                        format!(
                            "{} (the route inherits the policy's {name})",
                            finding.message
                        ),
                    );
                }
            }
            // A route whose rules do not check out refuses the policy through its findings
            // (or the policy's own); its canonical form no longer matters.
            let Some(checked) = checked else {
                out.push((route.clone(), None));
                continue;
            };
            let own = |set: bool, list: &Vec<String>| set.then(|| list.clone());
            let canonical = RouteSpec {
                path: route.path.clone(),
                allowed_origins: own(
                    route.allowed_origins.is_some(),
                    &checked.spec.allowed_origins,
                ),
                allowed_methods: own(
                    route.allowed_methods.is_some(),
                    &checked.spec.allowed_methods,
                ),
                allowed_headers: own(
                    route.allowed_headers.is_some(),
                    &checked.spec.allowed_headers,
                ),
                exposed_headers: own(
                    route.exposed_headers.is_some(),
                    &checked.spec.exposed_headers,
                ),
                ..route.clone()
            };
            let origins = route.allowed_origins.as_ref().map(|_| RouteOrigins {
                patterns: checked.origins,
                sets: checked.sets,
            });
            out.push((canonical, origins));
        }
        out
    }

    fn service(&mut self, name: &str) {
        if !is_dns_label(name) {
            self.push(
                "service".into(),
                Code::INVALID_SERVICE_NAME,
                format!("{name:?} is not a valid service name: {DNS_LABEL}"),
            );
        }
    }

    /// Checks a list of allowed-origin entries (a policy's `allowed_origins`, or a set's
    /// `origins` when `ctx.sets` is `None`), resolving `set:` references.
    pub(crate) fn origins(
        &mut self,
        field: &str,
        entries: &[String],
        ctx: &OriginsContext<'_>,
    ) -> Origins {
        let mut out = Origins::default();
        if entries.len() > MAX_ORIGINS {
            self.push(
                field.into(),
                Code::TOO_MANY_ENTRIES,
                format!("{} entries; the limit is {MAX_ORIGINS}", entries.len()),
            );
            return out;
        }
        // References resolved first: their https entries decide whether a plain http one is
        // a risk.
        let referenced: Vec<Option<Arc<OriginSet>>> = entries
            .iter()
            .map(|e| {
                let name = e.strip_prefix(SET_PREFIX)?;
                ctx.sets.and_then(|lookup| lookup(name))
            })
            .collect();
        let has_https = entries.iter().any(|o| {
            o.get(..8)
                .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
        }) || referenced.iter().flatten().any(|s| s.has_https());
        let mut seen = HashSet::with_capacity(entries.len());
        let mut effective = 0usize;
        for (i, entry) in entries.iter().enumerate() {
            let field = format!("{field}[{i}]");
            if let Some(name) = entry.strip_prefix(SET_PREFIX) {
                let Some(lookup_set) = referenced[i].as_ref() else {
                    match ctx.sets {
                        None => self.push(
                            field,
                            Code::INVALID_ORIGIN,
                            "an origin set cannot reference another set".into(),
                        ),
                        Some(_) if !is_dns_label(name) => self.push(
                            field,
                            Code::INVALID_SET_NAME,
                            format!("{name:?} is not a valid origin set name: {DNS_LABEL}"),
                        ),
                        Some(_) => self.push(
                            field,
                            Code::UNKNOWN_ORIGIN_SET,
                            format!("there is no origin set named {name:?}"),
                        ),
                    }
                    continue;
                };
                if !seen.insert(entry.clone()) {
                    self.push(
                        field,
                        Code::DUPLICATE_ENTRY,
                        format!("{entry:?} repeats an earlier entry and is dropped"),
                    );
                    continue;
                }
                self.set_findings(&field, lookup_set, has_https);
                effective += lookup_set.len();
                out.set_bytes += lookup_set.bytes();
                out.sets
                    .push((out.canonical.len() as u32, lookup_set.clone()));
                out.canonical.push(entry.clone());
                continue;
            }
            let pattern = match OriginPattern::parse(entry) {
                Ok(p) => p,
                Err(e) => {
                    let code = match e {
                        OriginEntryError::Regex(..) => Code::INVALID_REGEX,
                        _ => Code::INVALID_ORIGIN,
                    };
                    self.push(field, code, e.to_string());
                    continue;
                }
            };
            let text = pattern.canonical();
            if !seen.insert(text.clone()) {
                self.push(
                    field,
                    Code::DUPLICATE_ENTRY,
                    format!("{entry:?} repeats an earlier entry ({text}) and is dropped"),
                );
                continue;
            }
            self.pattern_findings(&field, entry, &pattern, ctx);
            let insecure = is_insecure(&pattern);
            if insecure && has_https {
                self.push(
                    field,
                    Code::INSECURE_ORIGIN,
                    format!("{text} is plain http beside https origins: anyone on the network path can act as it"),
                );
            }
            out.has_https |= text.starts_with("https://");
            out.insecure += usize::from(insecure);
            effective += 1;
            out.patterns.push((out.canonical.len() as u32, pattern));
            out.canonical.push(text);
        }
        if effective > MAX_ORIGINS {
            self.push(
                field.into(),
                Code::TOO_MANY_ENTRIES,
                format!(
                    "{effective} entries with the origin sets resolved; the limit is {MAX_ORIGINS}"
                ),
            );
        }
        // Only references, to empty sets, allow nothing as surely as an empty list does.
        if effective == 0 && ctx.sets.is_some() && entries.iter().all(|e| e.starts_with(SET_PREFIX))
        {
            self.push(
                field.into(),
                Code::NO_ORIGINS,
                "no origin is allowed, so no cross-origin request is".into(),
            );
        }
        out
    }

    /// The findings of one parsed entry that depend on the entry alone (and, for `*`, on
    /// credentials and private network access).
    fn pattern_findings(
        &mut self,
        field: &str,
        entry: &str,
        pattern: &OriginPattern,
        ctx: &OriginsContext<'_>,
    ) {
        let field = field.to_owned();
        match pattern {
            OriginPattern::Any => {
                if ctx.sets.is_none() {
                    self.push(
                        field,
                        Code::WILDCARD_IN_SET,
                        "`*` cannot be part of an origin set: write it in the policy itself".into(),
                    );
                    return;
                }
                if ctx.credentials {
                    self.push(
                        field.clone(),
                        Code::WILDCARD_WITH_CREDENTIALS,
                        "`*` cannot be combined with allow_credentials: list the origins that may send credentials".into(),
                    );
                }
                if ctx.private_network {
                    self.push(
                        field,
                        Code::PRIVATE_NETWORK_WITH_WILDCARD,
                        "private network access cannot be granted to `*`: list the origins".into(),
                    );
                }
            }
            OriginPattern::Null => self.push(
                field,
                Code::NULL_ORIGIN,
                "`null` is sent by sandboxed iframes, file: pages and cross-origin redirects, which any site can produce".into(),
            ),
            OriginPattern::Regex(_) => {
                let source = &entry[REGEX_PREFIX.len()..];
                self.push(
                    field.clone(),
                    Code::REGEX_ORIGIN,
                    "regular-expression origins are easy to get wrong; prefer exact origins or https://*.domain".into(),
                );
                if !source.starts_with('^') || !source.ends_with('$') {
                    self.push(
                        field.clone(),
                        Code::UNANCHORED_REGEX,
                        "the pattern is matched against the whole origin (scheme, host and port), as if written ^(?:...)$".into(),
                    );
                }
                if has_unescaped_dot(source) {
                    self.push(
                        field,
                        Code::REGEX_UNESCAPED_DOT,
                        "`.` matches any character; write `\\.` for a literal dot".into(),
                    );
                }
            }
            OriginPattern::Subdomains { suffix, .. } => {
                if is_public_suffix(suffix) {
                    self.push(
                        field,
                        Code::WILDCARD_UNDER_PUBLIC_SUFFIX,
                        format!("{suffix} is a public suffix: *.{suffix} allows sites registered by anyone"),
                    );
                } else {
                    self.push(
                        field,
                        Code::WILDCARD_SUBDOMAIN,
                        format!("every subdomain of {suffix} is allowed, including any that is dangling and can be taken over"),
                    );
                }
            }
            OriginPattern::Exact(_) => {}
        }
    }

    /// A referenced set's findings, on the reference: one per code, counting its entries.
    /// Whether its plain http entries are a risk depends on the whole policy, so that is
    /// decided here rather than taken from the set.
    fn set_findings(&mut self, field: &str, set: &OriginSet, has_https: bool) {
        let mut by_code: BTreeMap<&str, (Code, usize, &Finding)> = BTreeMap::new();
        for f in set.findings() {
            if f.code == Code::INSECURE_ORIGIN || f.severity == Severity::Error {
                continue;
            }
            by_code
                .entry(f.code.as_str())
                .and_modify(|(_, n, _)| *n += 1)
                .or_insert((f.code, 1, f));
        }
        let name = set.name();
        for (code, count, first) in by_code.into_values() {
            let message = if count == 1 {
                format!("origin set {name}, {}: {}", first.field, first.message)
            } else {
                format!(
                    "origin set {name}, {count} entries, first {}: {}",
                    first.field, first.message
                )
            };
            self.push(field.into(), code, message);
        }
        if set.insecure() > 0 && has_https {
            self.push(
                field.into(),
                Code::INSECURE_ORIGIN,
                format!(
                    "origin set {name} holds {} plain http entries beside https origins: anyone on the network path can act as them",
                    set.insecure()
                ),
            );
        }
    }

    fn methods(&mut self, spec: &PolicySpec) -> Vec<String> {
        let methods = self.tokens(
            "allowed_methods",
            &spec.allowed_methods,
            Code::INVALID_METHOD,
            false,
        );
        for (i, m) in spec.allowed_methods.iter().enumerate() {
            const STANDARD: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
            ];
            if m.bytes().any(|b| b.is_ascii_lowercase())
                && let Some(standard) = STANDARD.iter().find(|s| s.eq_ignore_ascii_case(m))
            {
                let note = if *standard == "PATCH" {
                    "browsers send `patch` as written, so it only matches fetch(…, {method: 'patch'})".to_owned()
                } else {
                    format!("browsers always send {standard} in uppercase, so {m:?} never matches")
                };
                self.push(
                    format!("allowed_methods[{i}]"),
                    Code::LOWERCASE_METHOD,
                    format!("methods are case-sensitive: {note}; did you mean {standard:?}?"),
                );
            }
        }
        methods
    }

    /// Checks a list of HTTP tokens (`*` allowed); returns it without duplicates.
    fn tokens(
        &mut self,
        name: &str,
        list: &[String],
        invalid: Code,
        case_insensitive: bool,
    ) -> Vec<String> {
        if list.len() > MAX_LIST_ENTRIES {
            self.push(
                name.into(),
                Code::TOO_MANY_ENTRIES,
                format!("{} entries; the limit is {MAX_LIST_ENTRIES}", list.len()),
            );
            return Vec::new();
        }
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        for (i, token) in list.iter().enumerate() {
            let field = format!("{name}[{i}]");
            if token != "*" && !is_token(token) {
                self.push(
                    field,
                    invalid,
                    format!("{token:?} is not a valid name: 1 to {MAX_TOKEN_LEN} characters from the HTTP token set, no spaces or commas"),
                );
                continue;
            }
            let dup = out.iter().any(|t| {
                if case_insensitive {
                    t.eq_ignore_ascii_case(token)
                } else {
                    t == token
                }
            });
            if dup {
                self.push(
                    field,
                    Code::DUPLICATE_ENTRY,
                    format!("{token:?} repeats an earlier entry and is dropped"),
                );
                continue;
            }
            out.push(token.clone());
        }
        out
    }
}

/// An HTTP token (RFC 9110 §5.6.2), at most [`MAX_TOKEN_LEN`] bytes.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOKEN_LEN && s.bytes().all(is_tchar)
}

/// A token character: `!#$%&'*+-.^_`|~`, digits and letters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `domain` is itself a public suffix (ICANN or private section of the list).
fn is_public_suffix(domain: &str) -> bool {
    psl::suffix(domain.as_bytes())
        .is_some_and(|s| s.is_known() && s.as_bytes() == domain.as_bytes())
}

/// Whether a pattern has a `.` outside a character class that is not escaped.
fn has_unescaped_dot(pattern: &str) -> bool {
    let mut escaped = false;
    let mut in_class = false;
    let bytes = pattern.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'[' => in_class = true,
            b']' => in_class = false,
            // `.*` and `.+` are meant as "anything"; a lone `.` between name parts is the bug.
            b'.' if !in_class && !matches!(bytes.get(i + 1), Some(b'*' | b'+' | b'?' | b'{')) => {
                return true;
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_suffixes() {
        assert!(is_public_suffix("co.uk"));
        assert!(is_public_suffix("github.io"));
        assert!(is_public_suffix("com"));
        assert!(!is_public_suffix("example.com"));
        assert!(!is_public_suffix("corp.internal"));
    }

    #[test]
    fn every_code_round_trips() {
        for code in Code::ALL {
            assert_eq!(Code::from_name(code.as_str()), Some(*code));
        }
    }

    #[test]
    fn unescaped_dots() {
        assert!(has_unescaped_dot(r"https://app.example\.com"));
        assert!(!has_unescaped_dot(r"https://[a-z.]+\.example\.com"));
        assert!(!has_unescaped_dot(r"https://.*\.example\.com"));
    }
}
