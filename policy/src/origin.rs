//! Origins: the grammar of a serialized origin, the parsing of policy origin entries into
//! [`OriginPattern`]s, and the zero-copy parsing of a request's `Origin` header.
//!
//! Corsair keeps every exact origin in the one canonical form a browser serializes
//! (`scheme://host[:port]`, lowercase, default port omitted), so matching an exact origin is
//! a single string comparison and no request origin needs to be rewritten on the hot path.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The longest origin Corsair accepts, in bytes: a 253-byte host name plus scheme and port,
/// with room to spare. A longer `Origin` header never matches anything.
pub const MAX_ORIGIN_LEN: usize = 320;

/// The scheme of an origin. Only HTTP(S) origins can make CORS requests Corsair serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `http`
    Http,
    /// `https`
    Https,
}

impl Scheme {
    /// The scheme as written in an origin.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The port a browser leaves out of the serialized origin.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    fn parse(s: &str) -> Option<Scheme> {
        match s {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request origin split into its parts, borrowing from the header value.
///
/// Only origins already in canonical serialized form parse: that is the only form a browser
/// sends, and accepting variants would let a non-browser client reach a match that no
/// browser could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestOrigin<'a> {
    /// The whole origin, as sent.
    pub serialized: &'a str,
    /// Its scheme.
    pub scheme: Scheme,
    /// The host: a lowercase DNS name, a dotted IPv4 address, or a bracketed IPv6 address.
    pub host: &'a str,
    /// The explicit port, `None` when the scheme's default applies.
    pub port: Option<u16>,
}

impl<'a> RequestOrigin<'a> {
    /// Parses a canonical serialized origin such as `https://app.example.com:8443`.
    /// Returns `None` for anything else, including `null`.
    pub fn parse(serialized: &'a str) -> Option<Self> {
        if serialized.len() > MAX_ORIGIN_LEN {
            return None;
        }
        let (scheme, rest) = if let Some(rest) = serialized.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            (Scheme::Http, serialized.strip_prefix("http://")?)
        };
        let (host, port) = split_host_port(rest)?;
        let port = match port {
            None => None,
            Some(p) => {
                let port = canonical_port(p)?;
                if port == scheme.default_port() {
                    return None;
                }
                Some(port)
            }
        };
        if !is_canonical_host(host) {
            return None;
        }
        Some(RequestOrigin {
            serialized,
            scheme,
            host,
            port,
        })
    }
}

/// Splits `host[:port]`, minding bracketed IPv6 hosts. Returns `None` when the authority
/// has characters that cannot appear in an origin.
fn split_host_port(rest: &str) -> Option<(&str, Option<&str>)> {
    if rest.starts_with('[') {
        let end = rest.find(']')?;
        let host = &rest[..=end];
        match &rest[end + 1..] {
            "" => Some((host, None)),
            tail => Some((host, Some(tail.strip_prefix(':')?))),
        }
    } else {
        match rest.bytes().position(|b| b == b':') {
            None => Some((rest, None)),
            Some(i) => Some((&rest[..i], Some(&rest[i + 1..]))),
        }
    }
}

/// A port written canonically: 1 to 5 digits, no leading zero, at most 65535.
fn canonical_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || p.starts_with('0') || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

/// Is `host` a host exactly as a browser serializes it in an origin?
fn is_canonical_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // The URL standard serializes IPv6 in RFC 5952 form, as `Ipv6Addr`'s `Display` does
        // (IPv4-mapped addresses aside, which Corsair does not accept).
        return inner
            .parse::<Ipv6Addr>()
            .is_ok_and(|ip| ip.to_ipv4_mapped().is_none() && ip.to_string() == inner);
    }
    if looks_numeric(host) {
        return host
            .parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.to_string() == host);
    }
    is_dns_name(host)
}

/// The URL standard parses a host whose last label is numeric as IPv4.
fn looks_numeric(host: &str) -> bool {
    let last = match host.bytes().rposition(|b| b == b'.') {
        Some(i) => &host.as_bytes()[i + 1..],
        None => host.as_bytes(),
    };
    !last.is_empty() && last.iter().all(u8::is_ascii_digit)
}

/// A lowercase ASCII DNS name: labels of `a-z`, `0-9`, `-` and `_`, 1 to 63 bytes each,
/// 253 bytes at most, no empty label (so no leading, trailing or doubled dot).
pub(crate) fn is_dns_name(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let mut label = 0;
    for &b in host.as_bytes() {
        match DNS_BYTES[b as usize] {
            LABEL if label < 63 => label += 1,
            DOT if label > 0 => label = 0,
            _ => return false,
        }
    }
    label > 0
}

/// What each byte is in a DNS name: [`LABEL`], [`DOT`] or neither (0). A table keeps the
/// loop above one load and one branch per byte, which every cross-origin request pays.
const DNS_BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => LABEL,
            b'.' => DOT,
            _ => 0,
        };
        b += 1;
    }
    table
};
const LABEL: u8 = 1;
const DOT: u8 = 2;

/// One allowed-origin entry of a policy, parsed.
#[derive(Debug, Clone)]
pub enum OriginPattern {
    /// An exact canonical origin.
    Exact(String),
    /// `scheme://*.suffix[:port]`: any host under `suffix` at a label boundary, never `suffix`
    /// itself.
    Subdomains {
        /// The scheme a matching origin must have.
        scheme: Scheme,
        /// The parent domain, without the leading dot.
        suffix: String,
        /// The explicit port a matching origin must have (`None`: the default port).
        port: Option<u16>,
    },
    /// `regex:...`, matched against the whole origin.
    Regex(regex::Regex),
    /// `*`: any origin except `null`.
    Any,
    /// `null`: the opaque origin, only ever matched by this entry.
    Null,
}

/// Prefix that marks an allowed-origin entry as a regular expression.
pub const REGEX_PREFIX: &str = "regex:";

/// Upper bound for one compiled origin regex, in bytes of compiled program.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// Why an allowed-origin entry was refused. The message is written for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginEntryError {
    /// The entry is empty or has white space.
    #[error("{0:?} is empty or contains white space")]
    Whitespace(String),
    /// The entry has no `scheme://`.
    #[error("{0:?} is not an origin: expected scheme://host[:port]")]
    NotAnOrigin(String),
    /// The scheme is neither `http` nor `https`.
    #[error("{0:?} has scheme {1:?}: only http and https origins can be allowed")]
    Scheme(String, String),
    /// The entry has a path, query or fragment (a trailing slash included).
    #[error("{0:?} has a path, query or fragment: an origin is only scheme://host[:port]")]
    Path(String),
    /// The entry has a user name or password.
    #[error("{0:?} has userinfo (user@): an origin never does")]
    Userinfo(String),
    /// The port is not a number from 1 to 65535.
    #[error("{0:?} has an invalid port")]
    Port(String),
    /// The host is not an ASCII host name or IP address.
    #[error("{0:?} has an invalid host {1:?}")]
    Host(String, String),
    /// The host has non-ASCII characters.
    #[error("{0:?} is an internationalized host name: write it in punycode ({1})")]
    Idn(String, String),
    /// A `*` stands anywhere else than as the first label of the host.
    #[error("{0:?}: a wildcard must be the whole first label, as in https://*.example.com")]
    Wildcard(String),
    /// The regular expression does not compile or is too large.
    #[error("{0:?} is not a valid regular expression: {1}")]
    Regex(String, String),
}

impl OriginPattern {
    /// Parses one allowed-origin entry. Exact origins and wildcards are canonicalized
    /// (lowercase scheme and host, default port dropped).
    pub fn parse(entry: &str) -> Result<OriginPattern, OriginEntryError> {
        if entry.is_empty() || entry.chars().any(char::is_whitespace) {
            return Err(OriginEntryError::Whitespace(entry.to_owned()));
        }
        if entry == "*" {
            return Ok(OriginPattern::Any);
        }
        if entry == "null" {
            return Ok(OriginPattern::Null);
        }
        if let Some(pattern) = entry.strip_prefix(REGEX_PREFIX) {
            return compile_anchored(pattern)
                .map(OriginPattern::Regex)
                .map_err(|e| OriginEntryError::Regex(entry.to_owned(), e));
        }
        let e = || entry.to_owned();
        let (scheme, rest) = entry
            .split_once("://")
            .ok_or_else(|| OriginEntryError::NotAnOrigin(e()))?;
        let scheme_lower = scheme.to_ascii_lowercase();
        let scheme = Scheme::parse(&scheme_lower)
            .ok_or_else(|| OriginEntryError::Scheme(e(), scheme.to_owned()))?;
        if rest.contains(['/', '?', '#', '\\']) {
            return Err(OriginEntryError::Path(e()));
        }
        if rest.contains('@') {
            return Err(OriginEntryError::Userinfo(e()));
        }
        let (host, port) =
            split_host_port(rest).ok_or_else(|| OriginEntryError::Host(e(), rest.to_owned()))?;
        let port = match port {
            None => None,
            Some(p) => {
                let port: u16 = p
                    .parse()
                    .ok()
                    .filter(|&n| n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| OriginEntryError::Port(e()))?;
                (port != scheme.default_port()).then_some(port)
            }
        };
        if !host.is_ascii() {
            let hint = idna::domain_to_ascii(host)
                .map(|ascii| format!("{}://{}", scheme, ascii))
                .unwrap_or_else(|_| "xn--…".to_owned());
            return Err(OriginEntryError::Idn(e(), hint));
        }
        let host = host.to_ascii_lowercase();
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.contains('*') || !is_dns_name(suffix) || looks_numeric(suffix) {
                return Err(OriginEntryError::Wildcard(e()));
            }
            return Ok(OriginPattern::Subdomains {
                scheme,
                suffix: suffix.to_owned(),
                port,
            });
        }
        if host.contains('*') {
            return Err(OriginEntryError::Wildcard(e()));
        }
        let host =
            canonicalize_host(&host).ok_or_else(|| OriginEntryError::Host(e(), host.clone()))?;
        let mut canonical = format!("{scheme}://{host}");
        if let Some(port) = port {
            canonical.push(':');
            canonical.push_str(&port.to_string());
        }
        Ok(OriginPattern::Exact(canonical))
    }

    /// The entry as it is stored: canonical for exact origins and wildcards.
    pub fn canonical(&self) -> String {
        match self {
            OriginPattern::Exact(o) => o.clone(),
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => match port {
                Some(p) => format!("{scheme}://*.{suffix}:{p}"),
                None => format!("{scheme}://*.{suffix}"),
            },
            OriginPattern::Regex(re) => {
                let anchored = re.as_str();
                let inner = &anchored[ANCHOR_OPEN.len()..anchored.len() - ANCHOR_CLOSE.len()];
                format!("{REGEX_PREFIX}{inner}")
            }
            OriginPattern::Any => "*".to_owned(),
            OriginPattern::Null => "null".to_owned(),
        }
    }
}

/// A lowercase host in the form a browser serializes it, or `None` when it is not a host.
fn canonicalize_host(host: &str) -> Option<String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let ip: Ipv6Addr = inner.parse().ok()?;
        if ip.to_ipv4_mapped().is_some() {
            return None;
        }
        return Some(format!("[{ip}]"));
    }
    if looks_numeric(host) {
        let ip: Ipv4Addr = host.parse().ok()?;
        return Some(ip.to_string());
    }
    is_dns_name(host).then(|| host.to_owned())
}

const ANCHOR_OPEN: &str = "^(?:";
const ANCHOR_CLOSE: &str = ")$";

/// Compiles `pattern` anchored to the whole input, within [`REGEX_SIZE_LIMIT`].
fn compile_anchored(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".to_owned());
    }
    regex::RegexBuilder::new(&format!("{ANCHOR_OPEN}{pattern}{ANCHOR_CLOSE}"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(4 * REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => {
                format!("the compiled pattern exceeds the {limit}-byte limit")
            }
            other => other
                .to_string()
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_origins_must_be_canonical() {
        for ok in [
            "https://example.com",
            "http://localhost:8080",
            "https://127.0.0.1",
            "https://[::1]:8443",
            "https://a_b.example.com",
        ] {
            assert!(RequestOrigin::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "null",
            "https://example.com/",
            "https://Example.com",
            "HTTPS://example.com",
            "https://example.com:443",
            "http://example.com:80",
            "https://example.com:0443",
            "https://example.com:",
            "https://example.com:99999",
            "https://user@example.com",
            "https://example..com",
            "https://.example.com",
            "ftp://example.com",
            "https://[::FFFF:1.2.3.4]",
            "https://[0:0::1]",
            "https://010.1.1.1",
            "https://exa mple.com",
            "",
        ] {
            assert!(RequestOrigin::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn entries_are_canonicalized() {
        let canon = |s: &str| OriginPattern::parse(s).unwrap().canonical();
        assert_eq!(canon("HTTPS://Example.COM:443"), "https://example.com");
        assert_eq!(canon("http://example.com:80"), "http://example.com");
        assert_eq!(canon("http://example.com:8080"), "http://example.com:8080");
        assert_eq!(canon("https://*.Example.com:443"), "https://*.example.com");
        assert_eq!(canon("https://[0:0::1]:8443"), "https://[::1]:8443");
        assert_eq!(
            canon("regex:https://[a-z]+\\.example\\.com"),
            "regex:https://[a-z]+\\.example\\.com"
        );
    }

    #[test]
    fn idn_hint_is_punycode() {
        let err = OriginPattern::parse("https://bücher.example").unwrap_err();
        assert!(
            err.to_string().contains("https://xn--bcher-kva.example"),
            "{err}"
        );
    }
}
