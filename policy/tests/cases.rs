//! The engine's behaviour, one named case per rule: the CORS protocol of the Fetch standard,
//! and the edge cases that CORS libraries have got wrong (trailing slashes, uppercase,
//! default ports, `null`, `evil-example.com`, split `Access-Control-Request-Headers`, `Vary`
//! merging, …). Each case runs a request through a compiled policy, writes the decision's
//! headers into the upstream response and compares every resulting header.

use corsair_policy::{Action, CompiledPolicy, Kind, Policy, PolicySpec, Reason, Request, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

const ACAO: &str = "access-control-allow-origin";
const ACAC: &str = "access-control-allow-credentials";
const ACAM: &str = "access-control-allow-methods";
const ACAH: &str = "access-control-allow-headers";
const ACEH: &str = "access-control-expose-headers";
const MAX_AGE: &str = "access-control-max-age";
const ACAPN: &str = "access-control-allow-private-network";
const VARY: &str = "vary";
const PREFLIGHT_VARY: &str = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, Access-Control-Request-Private-Network";

const APP: &str = "https://app.example.com";

/// The policy most cases use.
const P1: &str = r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["PUT","DELETE"],
    "allowed_headers":["X-Custom","content-type"],"exposed_headers":["X-Total"],"max_age":600}"#;
const P1_ENFORCE: &str = r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["PUT","DELETE"],
    "allowed_headers":["X-Custom","content-type"],"exposed_headers":["X-Total"],"max_age":600,"mode":"enforce"}"#;
const P1_SHADOW: &str = r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["PUT","DELETE"],
    "allowed_headers":["X-Custom","content-type"],"exposed_headers":["X-Total"],"max_age":600,"mode":"shadow"}"#;
const CREDS: &str = r#"{"allowed_origins":["https://app.example.com"],"allow_credentials":true,
    "allowed_methods":["PUT"],"allowed_headers":["x-custom"]}"#;
const ANY: &str = r#"{"allowed_origins":["*"],"exposed_headers":["X-Total"]}"#;
const WILD: &str = r#"{"allowed_origins":["https://*.example.com"]}"#;
const WILD_PORT: &str = r#"{"allowed_origins":["https://*.example.com:8443"]}"#;
const REGEX: &str = r#"{"allowed_origins":["regex:https://(app|admin)\\.example\\.com"]}"#;
const REGEX_ALL: &str = r#"{"allowed_origins":["regex:.*"]}"#;
const NULL: &str = r#"{"allowed_origins":["null"]}"#;
const HEADERS_ANY: &str =
    r#"{"allowed_origins":["https://app.example.com"],"allowed_headers":["*"]}"#;
const HEADERS_ANY_AUTH: &str =
    r#"{"allowed_origins":["https://app.example.com"],"allowed_headers":["*","Authorization"]}"#;
const METHODS_ANY: &str =
    r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["*"]}"#;
const PNA: &str = r#"{"allowed_origins":["https://app.example.com"],"allow_private_network":true}"#;
const CANON: &str = r#"{"allowed_origins":["HTTPS://App.Example.COM:443"]}"#;
const PATCH_LOWER: &str =
    r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["patch"]}"#;
const IPV6: &str = r#"{"allowed_origins":["http://[::1]:8080"]}"#;
const MAX_AGE_ZERO: &str = r#"{"allowed_origins":["https://app.example.com"],"max_age":0}"#;
const ENFORCE_EMPTY: &str = r#"{"allowed_origins":["https://app.example.com"],"mode":"enforce"}"#;

type Pairs = &'static [(&'static str, &'static str)];

struct Case {
    name: &'static str,
    policy: &'static str,
    method: &'static str,
    request: Pairs,
    /// The request's own authority (scheme http), for same-origin checks.
    authority: Option<&'static str>,
    /// Headers the upstream's response carried (only for forwarded requests).
    upstream: Pairs,
    kind: Kind,
    reason: Reason,
    /// `None`: forwarded; `Some(status)`: answered by the sidecar.
    respond: Option<u16>,
    /// Every header of the final response; `None` when the response must be left untouched.
    response: Option<Pairs>,
}

const D: Case = Case {
    name: "",
    policy: P1,
    method: "GET",
    request: &[],
    authority: None,
    upstream: &[],
    kind: Kind::Actual,
    reason: Reason::Allowed { entry: 0 },
    respond: None,
    response: Some(&[]),
};

fn cases() -> Vec<Case> {
    vec![
        // ---- actual requests: origin matching -------------------------------------------
        Case {
            name: "actual_get_from_allowed_exact_origin",
            request: &[("origin", APP)],
            response: Some(&[(ACAO, APP), (ACEH, "X-Total"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_from_disallowed_origin_forwarded_without_cors_headers",
            request: &[("origin", "https://evil.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_from_disallowed_origin_enforce_is_403",
            policy: P1_ENFORCE,
            request: &[("origin", "https://evil.com")],
            reason: Reason::OriginNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_from_disallowed_origin_shadow_leaves_response_untouched",
            policy: P1_SHADOW,
            request: &[("origin", "https://evil.com")],
            upstream: &[("access-control-allow-origin", "*")],
            reason: Reason::OriginNotAllowed,
            response: None,
            ..D
        },
        Case {
            name: "actual_allowed_shadow_leaves_response_untouched",
            policy: P1_SHADOW,
            request: &[("origin", APP)],
            response: None,
            ..D
        },
        Case {
            name: "no_origin_is_not_cors_and_gets_vary",
            kind: Kind::NotCors,
            reason: Reason::NoOrigin,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "no_origin_with_star_policy_gets_star",
            policy: ANY,
            kind: Kind::NotCors,
            reason: Reason::NoOrigin,
            response: Some(&[(ACAO, "*"), (ACEH, "X-Total"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "star_policy_answers_star_to_any_origin",
            policy: ANY,
            request: &[("origin", "https://whatever.test")],
            response: Some(&[(ACAO, "*"), (ACEH, "X-Total"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "star_policy_never_matches_null",
            policy: ANY,
            request: &[("origin", "null")],
            reason: Reason::NullNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "explicit_null_entry_allows_null",
            policy: NULL,
            request: &[("origin", "null")],
            response: Some(&[(ACAO, "null"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "null_origin_not_listed_is_denied",
            request: &[("origin", "null")],
            reason: Reason::NullNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "origin_with_trailing_slash_is_malformed",
            request: &[("origin", "https://app.example.com/")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "uppercase_request_origin_is_malformed",
            request: &[("origin", "https://APP.example.com")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "request_origin_with_default_port_is_malformed",
            request: &[("origin", "https://app.example.com:443")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "policy_entry_with_uppercase_and_default_port_is_canonicalized",
            policy: CANON,
            request: &[("origin", APP)],
            response: Some(&[(ACAO, APP), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "same_host_other_port_is_not_allowed",
            request: &[("origin", "https://app.example.com:8443")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "same_host_other_scheme_is_not_allowed",
            request: &[("origin", "http://app.example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "exact_origin_as_prefix_of_attacker_host_is_not_allowed",
            request: &[("origin", "https://app.example.com.evil.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "origin_with_trailing_space_is_malformed",
            request: &[("origin", "https://app.example.com ")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "empty_origin_is_malformed",
            request: &[("origin", "")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "repeated_origin_header_never_matches",
            request: &[("origin", APP), ("origin", APP)],
            reason: Reason::OriginRepeated,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "repeated_origin_header_enforce_is_403",
            policy: P1_ENFORCE,
            request: &[("origin", APP), ("origin", "https://evil.com")],
            reason: Reason::OriginRepeated,
            respond: Some(403),
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "ipv6_origin_matches_exactly",
            policy: IPV6,
            request: &[("origin", "http://[::1]:8080")],
            response: Some(&[(ACAO, "http://[::1]:8080"), (VARY, "Origin")]),
            ..D
        },
        // ---- wildcard subdomains ----------------------------------------------------------
        Case {
            name: "wildcard_matches_subdomain",
            policy: WILD,
            request: &[("origin", "https://a.example.com")],
            response: Some(&[(ACAO, "https://a.example.com"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_matches_any_depth",
            policy: WILD,
            request: &[("origin", "https://a.b.c.example.com")],
            response: Some(&[(ACAO, "https://a.b.c.example.com"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_never_matches_apex",
            policy: WILD,
            request: &[("origin", "https://example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_matches_only_at_label_boundary",
            policy: WILD,
            request: &[("origin", "https://evil-example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_suffix_followed_by_attacker_domain_is_not_allowed",
            policy: WILD,
            request: &[("origin", "https://a.example.com.evil.net")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_requires_same_scheme",
            policy: WILD,
            request: &[("origin", "http://a.example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_without_port_rejects_explicit_port",
            policy: WILD,
            request: &[("origin", "https://a.example.com:8443")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_with_port_rejects_default_port",
            policy: WILD_PORT,
            request: &[("origin", "https://a.example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_with_port_matches_that_port",
            policy: WILD_PORT,
            request: &[("origin", "https://a.example.com:8443")],
            response: Some(&[(ACAO, "https://a.example.com:8443"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_never_matches_null",
            policy: WILD,
            request: &[("origin", "null")],
            reason: Reason::NullNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_is_not_fooled_by_a_path_in_origin",
            policy: WILD,
            request: &[("origin", "https://evil.com/.example.com")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "wildcard_is_not_fooled_by_userinfo_in_origin",
            policy: WILD,
            request: &[("origin", "https://a.example.com@evil.com")],
            reason: Reason::OriginMalformed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        // ---- regular expressions ----------------------------------------------------------
        Case {
            name: "regex_matches_whole_origin",
            policy: REGEX,
            request: &[("origin", "https://admin.example.com")],
            response: Some(&[(ACAO, "https://admin.example.com"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "regex_is_anchored_at_the_end",
            policy: REGEX,
            request: &[("origin", "https://app.example.com.evil.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "regex_is_anchored_at_the_start",
            policy: REGEX,
            request: &[("origin", "https://xapp.example.com")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "regex_never_matches_null",
            policy: REGEX_ALL,
            request: &[("origin", "null")],
            reason: Reason::NullNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        // ---- credentials and methods on actual requests -----------------------------------
        Case {
            name: "credentials_echo_origin_and_send_acac_true",
            policy: CREDS,
            request: &[("origin", APP)],
            response: Some(&[(ACAC, "true"), (ACAO, APP), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_with_listed_method_is_allowed",
            method: "PUT",
            request: &[("origin", APP)],
            response: Some(&[(ACAO, APP), (ACEH, "X-Total"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_with_unlisted_method_gets_no_cors_headers",
            method: "PATCH",
            request: &[("origin", APP)],
            reason: Reason::MethodNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "actual_with_unlisted_method_enforce_is_403",
            policy: P1_ENFORCE,
            method: "PATCH",
            request: &[("origin", APP)],
            reason: Reason::MethodNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "head_is_safelisted",
            policy: ENFORCE_EMPTY,
            method: "HEAD",
            request: &[("origin", APP)],
            response: Some(&[(ACAO, APP), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "post_is_safelisted",
            policy: ENFORCE_EMPTY,
            method: "POST",
            request: &[("origin", APP)],
            response: Some(&[(ACAO, APP), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "options_without_acrm_is_an_actual_request",
            method: "OPTIONS",
            request: &[("origin", APP)],
            reason: Reason::MethodNotAllowed,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "options_with_acrm_but_no_origin_is_not_cors",
            method: "OPTIONS",
            request: &[("access-control-request-method", "PUT")],
            kind: Kind::NotCors,
            reason: Reason::NoOrigin,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        // ---- preflights -------------------------------------------------------------------
        Case {
            name: "preflight_allowed_is_answered_with_every_header",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "x-custom"),
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "preflight_without_requested_headers_has_no_acah",
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "DELETE")],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "preflight_for_safelisted_method_with_custom_header",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "content-type"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "content-type"),
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "preflight_method_is_case_sensitive",
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "put")],
            kind: Kind::Preflight,
            reason: Reason::MethodNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "lowercase_get_is_not_safelisted",
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "get")],
            kind: Kind::Preflight,
            reason: Reason::MethodNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "lowercase_patch_listed_matches_lowercase_patch",
            policy: PATCH_LOWER,
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "patch")],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAM, "patch"), (ACAO, APP), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "acrm_with_a_comma_is_never_mirrored",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT, DELETE"),
            ],
            kind: Kind::Preflight,
            reason: Reason::MethodMalformed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "acrm_sent_twice_is_malformed",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-method", "PUT"),
            ],
            kind: Kind::Preflight,
            reason: Reason::MethodMalformed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "empty_acrm_is_malformed",
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "")],
            kind: Kind::Preflight,
            reason: Reason::MethodMalformed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "requested_headers_compare_case_insensitively",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "X-CUSTOM,Content-Type"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "x-custom, content-type"),
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "requested_headers_tolerate_spaces_and_empty_items",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                (
                    "access-control-request-headers",
                    " x-custom , ,content-type,",
                ),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "x-custom, content-type"),
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "requested_headers_split_over_several_lines",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom"),
                ("access-control-request-headers", "content-type"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "x-custom, content-type"),
                (ACAM, "PUT, DELETE"),
                (ACAO, APP),
                (MAX_AGE, "600"),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "one_disallowed_header_fails_the_whole_preflight",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom,x-evil"),
            ],
            kind: Kind::Preflight,
            reason: Reason::HeaderNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "disallowed_header_enforce_is_403",
            policy: P1_ENFORCE,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-evil"),
            ],
            kind: Kind::Preflight,
            reason: Reason::HeaderNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "requested_header_that_is_not_a_token_is_malformed",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom, bad header"),
            ],
            kind: Kind::Preflight,
            reason: Reason::HeadersMalformed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "star_headers_allow_any_header",
            policy: HEADERS_ANY,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-anything,x-else"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAH, "x-anything,x-else"),
                (ACAO, APP),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "star_headers_never_cover_authorization",
            policy: HEADERS_ANY,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "authorization"),
            ],
            kind: Kind::Preflight,
            reason: Reason::HeaderNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "authorization_listed_explicitly_is_allowed",
            policy: HEADERS_ANY_AUTH,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "Authorization"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAH, "authorization"), (ACAO, APP), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "star_methods_allow_any_method",
            policy: METHODS_ANY,
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "PURGE")],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAM, "*"), (ACAO, APP), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "preflight_from_disallowed_origin_is_answered_without_cors_headers",
            method: "OPTIONS",
            request: &[
                ("origin", "https://evil.com"),
                ("access-control-request-method", "PUT"),
            ],
            kind: Kind::Preflight,
            reason: Reason::OriginNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "preflight_from_disallowed_origin_enforce_is_403",
            policy: P1_ENFORCE,
            method: "OPTIONS",
            request: &[
                ("origin", "https://evil.com"),
                ("access-control-request-method", "PUT"),
            ],
            kind: Kind::Preflight,
            reason: Reason::OriginNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "preflight_in_shadow_mode_is_forwarded_untouched",
            policy: P1_SHADOW,
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "PUT")],
            kind: Kind::Preflight,
            response: None,
            ..D
        },
        Case {
            name: "preflight_with_credentials",
            policy: CREDS,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "x-custom"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[
                (ACAC, "true"),
                (ACAH, "x-custom"),
                (ACAM, "PUT"),
                (ACAO, APP),
                (VARY, PREFLIGHT_VARY),
            ]),
            ..D
        },
        Case {
            name: "preflight_from_star_policy",
            policy: ANY,
            method: "OPTIONS",
            request: &[
                ("origin", "https://x.test"),
                ("access-control-request-method", "GET"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAO, "*"), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "private_network_preflight_allowed",
            policy: PNA,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-private-network", "true"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAO, APP), (ACAPN, "true"), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "private_network_preflight_denied_when_not_allowed",
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-private-network", "true"),
            ],
            kind: Kind::Preflight,
            reason: Reason::PrivateNetworkNotAllowed,
            respond: Some(204),
            response: Some(&[(VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "private_network_header_other_than_true_is_ignored",
            policy: PNA,
            method: "OPTIONS",
            request: &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-private-network", "false"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAO, APP), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "max_age_zero_is_sent",
            policy: MAX_AGE_ZERO,
            method: "OPTIONS",
            request: &[("origin", APP), ("access-control-request-method", "GET")],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAO, APP), (MAX_AGE, "0"), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        Case {
            name: "wildcard_preflight_has_no_max_age_when_unset",
            policy: WILD,
            method: "OPTIONS",
            request: &[
                ("origin", "https://a.example.com"),
                ("access-control-request-method", "GET"),
            ],
            kind: Kind::Preflight,
            respond: Some(204),
            response: Some(&[(ACAO, "https://a.example.com"), (VARY, PREFLIGHT_VARY)]),
            ..D
        },
        // ---- same origin ------------------------------------------------------------------
        Case {
            name: "same_origin_is_never_blocked_in_enforce_mode",
            policy: ENFORCE_EMPTY,
            method: "DELETE",
            request: &[("origin", "http://api.local")],
            authority: Some("api.local"),
            kind: Kind::SameOrigin,
            reason: Reason::SameOrigin,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "same_origin_ignores_default_port_in_host",
            policy: ENFORCE_EMPTY,
            method: "PUT",
            request: &[("origin", "http://api.local")],
            authority: Some("api.local:80"),
            kind: Kind::SameOrigin,
            reason: Reason::SameOrigin,
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "same_host_other_scheme_is_cross_origin",
            policy: ENFORCE_EMPTY,
            method: "PUT",
            request: &[("origin", "https://api.local")],
            authority: Some("api.local"),
            reason: Reason::OriginNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        Case {
            name: "same_host_other_port_is_cross_origin",
            policy: ENFORCE_EMPTY,
            request: &[("origin", "http://api.local:8080")],
            authority: Some("api.local"),
            reason: Reason::OriginNotAllowed,
            respond: Some(403),
            response: Some(&[(VARY, "Origin")]),
            ..D
        },
        // ---- merging into the upstream's response -----------------------------------------
        Case {
            name: "upstream_cors_headers_are_replaced_not_duplicated",
            request: &[("origin", APP)],
            upstream: &[
                (ACAO, "*"),
                (ACAC, "true"),
                (ACEH, "X-Secret"),
                (MAX_AGE, "99999"),
            ],
            response: Some(&[(ACAO, APP), (ACEH, "X-Total"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "upstream_cors_headers_are_removed_for_disallowed_origin",
            request: &[("origin", "https://evil.com")],
            upstream: &[
                (ACAO, "https://evil.com"),
                (ACAC, "true"),
                ("content-type", "text/plain"),
            ],
            reason: Reason::OriginNotAllowed,
            response: Some(&[("content-type", "text/plain"), (VARY, "Origin")]),
            ..D
        },
        Case {
            name: "vary_merges_with_upstream_vary",
            request: &[("origin", APP)],
            upstream: &[(VARY, "Accept-Encoding")],
            response: Some(&[
                (ACAO, APP),
                (ACEH, "X-Total"),
                (VARY, "Accept-Encoding, Origin"),
            ]),
            ..D
        },
        Case {
            name: "vary_merges_across_several_upstream_lines",
            request: &[("origin", APP)],
            upstream: &[(VARY, "Accept"), (VARY, "Accept-Language")],
            response: Some(&[
                (ACAO, APP),
                (ACEH, "X-Total"),
                (VARY, "Accept, Accept-Language, Origin"),
            ]),
            ..D
        },
        Case {
            name: "vary_does_not_duplicate_origin_in_any_case",
            request: &[("origin", APP)],
            upstream: &[(VARY, "origin, accept")],
            response: Some(&[(ACAO, APP), (ACEH, "X-Total"), (VARY, "origin, accept")]),
            ..D
        },
        Case {
            name: "vary_star_is_left_alone",
            request: &[("origin", APP)],
            upstream: &[(VARY, "*")],
            response: Some(&[(ACAO, APP), (ACEH, "X-Total"), (VARY, "*")]),
            ..D
        },
        Case {
            name: "vary_added_for_disallowed_origin_too",
            request: &[("origin", "https://evil.com")],
            upstream: &[(VARY, "Accept-Encoding")],
            reason: Reason::OriginNotAllowed,
            response: Some(&[(VARY, "Accept-Encoding, Origin")]),
            ..D
        },
    ]
}

fn compile(json: &str) -> CompiledPolicy {
    let mut value: serde_json::Value =
        serde_json::from_str(json).expect("case policy is valid JSON");
    value["service"] = "svc".into();
    let spec: PolicySpec = serde_json::from_value(value).expect("case policy is a policy");
    let all_risks = [
        "NULL_ORIGIN",
        "INSECURE_ORIGIN",
        "REGEX_ORIGIN",
        "WILDCARD_UNDER_PUBLIC_SUFFIX",
    ];
    let validated =
        Policy::check(&spec, &all_risks).unwrap_or_else(|e| panic!("case policy refused: {e}"));
    CompiledPolicy::new(validated.policy)
}

fn header_map(pairs: Pairs) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    h
}

fn sorted(h: &HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<_> = h
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    v.sort();
    v
}

#[test]
fn engine_cases() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for case in &cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        let engine = compile(case.policy);
        let method = Method::from_bytes(case.method.as_bytes()).unwrap();
        let headers = header_map(case.request);
        let request = Request::new(&method, &headers).with_own_origin(Scheme::Http, case.authority);
        let decision = engine.decide(&request);

        let mut problems = Vec::new();
        if decision.kind != case.kind {
            problems.push(format!("kind {:?}, want {:?}", decision.kind, case.kind));
        }
        if decision.reason != case.reason {
            problems.push(format!(
                "reason {:?}, want {:?}",
                decision.reason, case.reason
            ));
        }
        let want_allowed = matches!(
            case.reason,
            Reason::Allowed { .. } | Reason::NoOrigin | Reason::SameOrigin
        );
        if decision.allowed != want_allowed {
            problems.push(format!("allowed {}, want {want_allowed}", decision.allowed));
        }
        let want_action = match case.respond {
            None => Action::Forward,
            Some(s) => Action::Respond(StatusCode::from_u16(s).unwrap()),
        };
        if decision.action != want_action {
            problems.push(format!(
                "action {:?}, want {want_action:?}",
                decision.action
            ));
        }
        let mut response = match decision.action {
            Action::Forward => header_map(case.upstream),
            Action::Respond(_) => HeaderMap::new(),
        };
        match (&decision.headers, case.response) {
            (Some(cors), Some(want)) => {
                cors.apply(&mut response);
                let want = sorted(&header_map(want));
                let got = sorted(&response);
                if got != want {
                    problems.push(format!(
                        "response headers\n      got  {got:?}\n      want {want:?}"
                    ));
                }
            }
            (None, None) => {}
            (got, want) => problems.push(format!("headers {got:?}, want response {want:?}")),
        }
        // Every decision has a readable explanation.
        assert!(!engine.describe(&request, &decision).is_empty());
        if !problems.is_empty() {
            failures.push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn preflight_with_acrh<'p>(
    engine: &'p CompiledPolicy,
    lines: &[Vec<u8>],
) -> corsair_policy::Decision<'p> {
    let mut h = header_map(&[("origin", APP), ("access-control-request-method", "GET")]);
    for line in lines {
        h.append(
            "access-control-request-headers",
            HeaderValue::from_bytes(line).unwrap(),
        );
    }
    engine.decide(&Request::new(&Method::OPTIONS, &h))
}

#[test]
fn oversized_acrh_is_refused() {
    let engine = compile(HEADERS_ANY);
    let big = "x-a,".repeat(2048).into_bytes();
    assert_eq!(
        preflight_with_acrh(&engine, &[big]).reason,
        Reason::HeadersTooLarge
    );
    let many = (0..200)
        .map(|i| format!("x-{i}"))
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes();
    assert_eq!(
        preflight_with_acrh(&engine, &[many]).reason,
        Reason::HeadersTooLarge
    );
    let lines: Vec<Vec<u8>> = (0..100)
        .map(|_| b"x-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec())
        .collect();
    assert_eq!(
        preflight_with_acrh(&engine, &lines).reason,
        Reason::HeadersTooLarge
    );
}

#[test]
fn non_text_header_bytes_never_match() {
    let engine = compile(HEADERS_ANY);
    let mut h = HeaderMap::new();
    h.insert(
        "origin",
        HeaderValue::from_bytes(b"https://app.example.com\xff").unwrap(),
    );
    let d = engine.decide(&Request::new(&Method::GET, &h));
    assert_eq!(d.reason, Reason::OriginMalformed);
    assert_eq!(
        preflight_with_acrh(&engine, &[b"x-a, \xffx".to_vec()]).reason,
        Reason::HeadersMalformed
    );
    let mut h = header_map(&[("origin", APP)]);
    h.insert(
        "access-control-request-method",
        HeaderValue::from_bytes(b"P\xffT").unwrap(),
    );
    let d = engine.decide(&Request::new(&Method::OPTIONS, &h));
    assert_eq!(d.reason, Reason::MethodMalformed);
}

#[test]
fn large_header_sets_use_the_same_rules() {
    // More than a handful of allowed headers switches to hashed lookup.
    let names: Vec<String> = (0..40).map(|i| format!("X-Header-{i}")).collect();
    let json = serde_json::json!({"allowed_origins": [APP], "allowed_headers": names, "allowed_methods": (0..20).map(|i| format!("M{i}")).collect::<Vec<_>>()});
    let engine = compile(&json.to_string());
    let d = preflight_with_acrh(&engine, &[b"x-header-7, X-HEADER-39".to_vec()]);
    assert!(d.allowed, "{d:?}");
    assert_eq!(
        d.headers.unwrap().allow_headers.unwrap(),
        "x-header-7, x-header-39"
    );
    assert_eq!(
        preflight_with_acrh(&engine, &[b"x-header-40".to_vec()]).reason,
        Reason::HeaderNotAllowed
    );
    let h = header_map(&[("origin", APP), ("access-control-request-method", "M19")]);
    assert!(engine.decide(&Request::new(&Method::OPTIONS, &h)).allowed);
}

#[test]
fn describe_names_the_entry_and_the_culprit() {
    let engine = compile(P1);
    let h = header_map(&[("origin", APP)]);
    let req = Request::new(&Method::GET, &h);
    let text = engine.describe(&req, &engine.decide(&req));
    assert_eq!(
        text,
        "origin https://app.example.com allowed by allowed_origins[0] (https://app.example.com)"
    );

    let h = header_map(&[
        ("origin", APP),
        ("access-control-request-method", "PUT"),
        ("access-control-request-headers", "x-custom, X-Evil"),
    ]);
    let req = Request::new(&Method::OPTIONS, &h);
    let text = engine.describe(&req, &engine.decide(&req));
    assert_eq!(text, "requested header x-evil is not in allowed_headers");
}
