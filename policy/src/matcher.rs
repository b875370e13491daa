//! [`OriginMatcher`]: a list of parsed allowed-origin entries compiled for lookup. Exact
//! origins sit in a hash map, wildcard origins in per-scheme-and-port suffix maps, regexes in
//! a list. A policy compiles its own entries into one; an origin set compiles its entries into
//! another, once, and every policy that references the set shares it.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::origin::{OriginPattern, RequestOrigin, Scheme};

/// Compiled origin entries; each match names the index of the entry it matched.
#[derive(Debug, Default)]
pub(crate) struct OriginMatcher {
    exact: HashMap<Box<str>, u32, RandomState>,
    subdomains: Vec<SubdomainGroup>,
    regexes: Vec<(u32, regex::Regex)>,
    /// The first `*` entry.
    pub(crate) any: Option<u32>,
    /// The first `null` entry.
    pub(crate) null: Option<u32>,
}

#[derive(Debug)]
struct SubdomainGroup {
    scheme: Scheme,
    port: Option<u16>,
    suffixes: HashMap<Box<str>, u32, RandomState>,
}

impl OriginMatcher {
    /// Compiles `(index, pattern)` pairs; where two entries are equal the first is kept.
    pub(crate) fn new<'a>(patterns: impl Iterator<Item = (u32, &'a OriginPattern)>) -> Self {
        let mut m = OriginMatcher::default();
        for (i, pattern) in patterns {
            match pattern {
                OriginPattern::Exact(o) => {
                    m.exact.entry(o.as_str().into()).or_insert(i);
                }
                OriginPattern::Subdomains {
                    scheme,
                    suffix,
                    port,
                } => {
                    let group = match m
                        .subdomains
                        .iter()
                        .position(|g| g.scheme == *scheme && g.port == *port)
                    {
                        Some(g) => &mut m.subdomains[g],
                        None => {
                            m.subdomains.push(SubdomainGroup {
                                scheme: *scheme,
                                port: *port,
                                suffixes: HashMap::default(),
                            });
                            m.subdomains.last_mut().expect("just pushed")
                        }
                    };
                    group.suffixes.entry(suffix.as_str().into()).or_insert(i);
                }
                OriginPattern::Regex(re) => m.regexes.push((i, re.clone())),
                OriginPattern::Any => m.any = m.any.or(Some(i)),
                OriginPattern::Null => m.null = m.null.or(Some(i)),
            }
        }
        m
    }

    /// The exact entry equal to `origin`.
    #[inline]
    pub(crate) fn exact(&self, origin: &str) -> Option<u32> {
        self.exact.get(origin).copied()
    }

    /// The wildcard or regex entry matching `origin` (already parsed), skipping exact ones
    /// (asked first, through [`exact`](Self::exact)) and `*`.
    pub(crate) fn pattern(&self, origin: &str, parsed: &RequestOrigin<'_>) -> Option<u32> {
        for group in &self.subdomains {
            if group.scheme != parsed.scheme || group.port != parsed.port {
                continue;
            }
            // Every proper suffix that starts at a label boundary, longest first.
            let host = parsed.host;
            for (i, _) in host.match_indices('.') {
                if let Some(&entry) = group.suffixes.get(&host[i + 1..]) {
                    return Some(entry);
                }
            }
        }
        self.regexes
            .iter()
            .find(|(_, re)| re.is_match(origin))
            .map(|(entry, _)| *entry)
    }
}
