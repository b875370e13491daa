//! Origin sets: named lists of allowed-origin entries that many policies share by writing
//! `set:NAME` in `allowed_origins`. [`OriginSetSpec`] is what an operator writes;
//! [`OriginSet`] is the same validated, canonical and compiled once, shared (`Arc`) by every
//! policy that references it. It keeps what a referrer's lint needs (its findings, whether it
//! holds https and plain http entries, its size), so linting a policy costs the same whether
//! its sets hold ten entries or twenty thousand.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lint::{
    Code, DNS_LABEL, Finding, Linter, MAX_POLICY_BYTES, OriginsContext, Severity, is_dns_label,
};
use crate::matcher::OriginMatcher;
use crate::origin::OriginPattern;

/// How a policy's `allowed_origins` entry references an origin set: `set:corp-frontends`.
pub const SET_PREFIX: &str = "set:";
/// At most this many bytes in a set's description.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;

/// Finds a validated origin set by name.
pub type SetLookup<'a> = &'a dyn Fn(&str) -> Option<Arc<OriginSet>>;

/// An origin set as an operator writes it, not yet validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSetSpec {
    /// The set's name, a lowercase DNS label; policies reference it as `set:NAME`.
    pub name: String,
    /// What the set is for, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Allowed-origin entries in the policy syntax (exact, `https://*.example.com`,
    /// `regex:…`, `null`); `*` and `set:` references are refused.
    #[serde(default)]
    pub origins: Vec<String>,
}

/// A validated origin set in canonical form, compiled for matching.
#[derive(Debug)]
pub struct OriginSet {
    spec: OriginSetSpec,
    matcher: OriginMatcher,
    findings: Vec<Finding>,
    has_https: bool,
    insecure: usize,
    bytes: usize,
    digest: [u8; 32],
}

impl OriginSet {
    /// The canonical spec.
    pub fn spec(&self) -> &OriginSetSpec {
        &self.spec
    }

    /// The set's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The canonical entries, sorted.
    pub fn origins(&self) -> &[String] {
        &self.spec.origins
    }

    /// How many entries it has.
    pub fn len(&self) -> usize {
        self.spec.origins.len()
    }

    /// Whether it has no entries.
    pub fn is_empty(&self) -> bool {
        self.spec.origins.is_empty()
    }

    /// Its findings (notices and risks), with fields `origins[i]`.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Whether an entry is https.
    pub fn has_https(&self) -> bool {
        self.has_https
    }

    /// How many entries are plain http.
    pub fn insecure(&self) -> usize {
        self.insecure
    }

    /// Bytes of its entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// SHA-256 of its canonical entries (see [`digest`]).
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The entry matching `origin` in this set, if any.
    pub(crate) fn matcher(&self) -> &OriginMatcher {
        &self.matcher
    }
}

/// SHA-256 of a set's entries (canonical and sorted), each followed by a newline: what a
/// sidecar checks a set it rebuilt from a delta against. Entries hold no newline.
pub fn digest<S: AsRef<str>>(origins: &[S]) -> [u8; 32] {
    let mut h = Sha256::new();
    for o in origins {
        h.update(o.as_ref().as_bytes());
        h.update(b"\n");
    }
    h.finalize().into()
}

/// Validates and lints an origin set: the compiled set (`None` when any finding is an error)
/// and every finding, fields `name`, `description` and `origins[i]`.
pub fn lint_set(spec: &OriginSetSpec) -> (Option<Arc<OriginSet>>, Vec<Finding>) {
    let mut l = Linter::default();
    if !is_dns_label(&spec.name) {
        l.push(
            "name".into(),
            Code::INVALID_SET_NAME,
            format!(
                "{:?} is not a valid origin set name: {DNS_LABEL}",
                spec.name
            ),
        );
    }
    if spec.description.len() > MAX_DESCRIPTION_BYTES {
        l.push(
            "description".into(),
            Code::DESCRIPTION_TOO_LONG,
            format!(
                "{} bytes; the limit is {MAX_DESCRIPTION_BYTES}",
                spec.description.len()
            ),
        );
    }
    let mut origins = l.origins(
        "origins",
        &spec.origins,
        &OriginsContext {
            credentials: false,
            private_network: false,
            sets: None,
        },
    );
    let bytes: usize = origins.canonical.iter().map(String::len).sum();
    if bytes > MAX_POLICY_BYTES {
        l.push(
            "origins".into(),
            Code::POLICY_TOO_LARGE,
            format!("the set has {bytes} bytes of entries; the limit is {MAX_POLICY_BYTES}"),
        );
    }
    let mut findings = l.findings;
    findings.sort_by_key(|f| {
        let index = f
            .field
            .split_once('[')
            .and_then(|(_, i)| i.trim_end_matches(']').parse::<usize>().ok());
        (f.field.starts_with("origins"), index)
    });
    if findings.iter().any(|f| f.severity == Severity::Error) {
        return (None, findings);
    }
    // A set's order carries no meaning: sorted, it is the same set however it was written,
    // and a sidecar can rebuild it from a delta.
    let mut entries: Vec<(String, OriginPattern)> = origins
        .patterns
        .into_iter()
        .map(|(i, p)| (std::mem::take(&mut origins.canonical[i as usize]), p))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let matcher = OriginMatcher::new(entries.iter().enumerate().map(|(i, (_, p))| (i as u32, p)));
    let canonical: Vec<String> = entries.into_iter().map(|(text, _)| text).collect();
    let set = OriginSet {
        digest: digest(&canonical),
        spec: OriginSetSpec {
            name: spec.name.clone(),
            description: spec.description.clone(),
            origins: canonical,
        },
        matcher,
        findings: findings.clone(),
        has_https: origins.has_https,
        insecure: origins.insecure,
        bytes,
    };
    (Some(Arc::new(set)), findings)
}
