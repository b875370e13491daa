//! The CORS response headers a decision produces, and how they are written into a response:
//! the upstream's own `Access-Control-*` headers are replaced, `Vary` is merged.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, HeaderMap,
    HeaderName, HeaderValue, VARY,
};

/// `Access-Control-Allow-Private-Network`, from the Private Network Access draft.
pub const ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");
/// `Access-Control-Request-Private-Network`, from the Private Network Access draft.
pub const ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");

/// Every response header the CORS protocol defines. A sidecar owns these: whatever the
/// upstream sent under these names is removed before Corsair's are written.
pub const CORS_RESPONSE_HEADERS: [HeaderName; 7] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK,
];

/// The request headers a CORS answer can depend on, as `Vary` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vary(u8);

impl Vary {
    /// No dependency.
    pub const NONE: Vary = Vary(0);
    /// `Origin`.
    pub const ORIGIN: Vary = Vary(1);
    /// `Origin` and the three preflight request headers.
    pub const PREFLIGHT: Vary = Vary(0b1111);

    const TOKENS: [&'static str; 4] = [
        "Origin",
        "Access-Control-Request-Method",
        "Access-Control-Request-Headers",
        "Access-Control-Request-Private-Network",
    ];

    /// Whether no token is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The tokens, in a fixed order.
    pub fn tokens(self) -> impl Iterator<Item = &'static str> {
        Self::TOKENS
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, t)| t)
    }

    /// The tokens as one prebuilt header value.
    fn value(self) -> HeaderValue {
        match self {
            Vary::ORIGIN => HeaderValue::from_static("Origin"),
            Vary::PREFLIGHT => HeaderValue::from_static(
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, Access-Control-Request-Private-Network",
            ),
            other => HeaderValue::from_str(&other.tokens().collect::<Vec<_>>().join(", "))
                .expect("Vary tokens are valid header values"),
        }
    }
}

/// The CORS headers one response gets. Values are borrowed from those prebuilt when the
/// policy was compiled (`'p`), or shared with the request (`Access-Control-Allow-Origin`
/// echoes the request's `Origin` bytes), so making one allocates nothing but the echoed
/// `Access-Control-Allow-Headers` when the request's list has to be normalized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsHeaders<'p> {
    /// `Access-Control-Allow-Origin`.
    pub allow_origin: Option<HeaderValue>,
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// `Access-Control-Allow-Methods` (preflight only).
    pub allow_methods: Option<&'p HeaderValue>,
    /// `Access-Control-Allow-Headers` (preflight only): the requested names.
    pub allow_headers: Option<HeaderValue>,
    /// `Access-Control-Expose-Headers` (actual responses only).
    pub expose_headers: Option<&'p HeaderValue>,
    /// `Access-Control-Max-Age` (preflight only).
    pub max_age: Option<&'p HeaderValue>,
    /// `Access-Control-Allow-Private-Network: true` (preflight only).
    pub allow_private_network: bool,
    /// What `Vary` must name.
    pub vary: Vary,
}

const TRUE: HeaderValue = HeaderValue::from_static("true");

impl CorsHeaders<'_> {
    /// Only `Vary`: the answer for a request that gets no CORS headers.
    pub fn vary_only(vary: Vary) -> Self {
        CorsHeaders {
            vary,
            ..CorsHeaders::default()
        }
    }

    /// Writes these headers into a response: removes every CORS header already there, sets
    /// Corsair's, and merges `Vary`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        // One pass over the names is cheaper than seven lookups when, as usual, the upstream
        // sent none.
        if headers
            .keys()
            .any(|k| k.as_str().starts_with("access-control-"))
        {
            for name in &CORS_RESPONSE_HEADERS {
                headers.remove(name);
            }
        }
        // The `Access-Control-*` headers, in the order they are written.
        if let Some(v) = &self.allow_origin {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, v.clone());
        }
        if self.allow_credentials {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE);
        }
        if let Some(v) = self.allow_methods {
            headers.insert(ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &self.allow_headers {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = self.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        if let Some(v) = self.max_age {
            headers.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if self.allow_private_network {
            headers.insert(ACCESS_CONTROL_ALLOW_PRIVATE_NETWORK, TRUE);
        }
        merge_vary(headers, self.vary);
    }

    /// A fresh header map with these headers, for a response Corsair answers itself.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(8);
        self.apply(&mut headers);
        headers
    }
}

/// Adds `vary`'s tokens to the response's `Vary`, without duplicating a token already named
/// (in any case, on any line), and leaves `Vary: *` alone.
pub fn merge_vary(headers: &mut HeaderMap, vary: Vary) {
    if vary.is_empty() {
        return;
    }
    // One lookup: most upstream responses carry no `Vary`.
    let mut entry = match headers.entry(VARY) {
        http::header::Entry::Vacant(entry) => {
            entry.insert(vary.value());
            return;
        }
        http::header::Entry::Occupied(entry) => entry,
    };
    let existing = || vary_tokens(entry.iter());
    // A Vary value that is not text cannot be merged into: keep the upstream's as is.
    if existing().any(|t| t == b"*") || entry.iter().any(|v| v.to_str().is_err()) {
        return;
    }
    let mut missing = vary
        .tokens()
        .filter(|t| !existing().any(|e| e.eq_ignore_ascii_case(t.as_bytes())))
        .peekable();
    if missing.peek().is_none() {
        return;
    }
    let mut merged = Vec::with_capacity(64);
    let mut push = |token: &[u8]| {
        if !merged.is_empty() {
            merged.extend_from_slice(b", ");
        }
        merged.extend_from_slice(token);
    };
    existing().for_each(&mut push);
    missing.for_each(|t| push(t.as_bytes()));
    let merged =
        HeaderValue::try_from(merged).expect("joined Vary tokens are a valid header value");
    entry.insert(merged);
}

/// The tokens of `Vary` lines, trimmed, empty items skipped.
fn vary_tokens<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> impl Iterator<Item = &'a [u8]> {
    lines
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vary_after(lines: &[&str], vary: Vary) -> Vec<String> {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(VARY, HeaderValue::from_str(line).unwrap());
        }
        merge_vary(&mut h, vary);
        h.get_all(VARY)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn vary_merges_without_duplicates() {
        assert_eq!(vary_after(&[], Vary::ORIGIN), ["Origin"]);
        assert_eq!(
            vary_after(&["Accept-Encoding"], Vary::ORIGIN),
            ["Accept-Encoding, Origin"]
        );
        assert_eq!(
            vary_after(&["accept-encoding, origin"], Vary::ORIGIN),
            ["accept-encoding, origin"]
        );
        assert_eq!(
            vary_after(&["Accept", "Cookie"], Vary::ORIGIN),
            ["Accept, Cookie, Origin"]
        );
        assert_eq!(vary_after(&["*"], Vary::PREFLIGHT), ["*"]);
        assert_eq!(vary_after(&["Accept", "*"], Vary::ORIGIN), ["Accept", "*"]);
        assert_eq!(vary_after(&[" , Origin ,"], Vary::ORIGIN), [" , Origin ,"]);
    }
}
