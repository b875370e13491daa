//! Property tests: arbitrary header bytes never panic the engine, and the compiled engine
//! agrees with a plain, obviously-correct reference implementation of the matching rules on
//! random policies and requests drawn from small alphabets (so that matches are frequent).

use corsair_policy::{Action, CompiledPolicy, Policy, PolicySpec, Request, Scheme};
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

// ---- the reference ----------------------------------------------------------------------

/// Canonicalizes a policy entry the plain way: lowercase, default port dropped.
fn ref_canonical(entry: &str) -> String {
    let e = entry.to_ascii_lowercase();
    if let Some(rest) = e.strip_prefix("https://") {
        format!("https://{}", rest.strip_suffix(":443").unwrap_or(rest))
    } else if let Some(rest) = e.strip_prefix("http://") {
        format!("http://{}", rest.strip_suffix(":80").unwrap_or(rest))
    } else {
        e
    }
}

/// Is `origin` a serialized origin as a browser writes it (for the alphabet used here)?
fn ref_is_canonical(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    if scheme != "http" && scheme != "https" {
        return false;
    }
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    let port_ok = match port {
        None => true,
        Some(p) => {
            let default_port = if scheme == "https" { "443" } else { "80" };
            !p.is_empty() && !p.starts_with('0') && p.parse::<u16>().is_ok() && p != default_port
        }
    };
    host_ok && port_ok
}

/// The reference origin rule: which request origins a list of entries allows.
fn ref_origin_allowed(entries: &[String], origin: &str) -> bool {
    if origin == "null" {
        return entries.iter().any(|e| e == "null");
    }
    if !ref_is_canonical(origin) {
        return false;
    }
    let (scheme, rest) = origin.split_once("://").unwrap();
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    entries.iter().any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = ref_canonical(entry);
        if entry == origin {
            return true;
        }
        let Some(pattern) = entry.strip_prefix(&format!("{scheme}://*.")) else {
            return false;
        };
        let (suffix, entry_port) = match pattern.split_once(':') {
            Some((s, p)) => (s, Some(p)),
            None => (pattern, None),
        };
        entry_port == port && host.ends_with(&format!(".{suffix}"))
    })
}

fn ref_method_allowed(methods: &[String], method: &str) -> bool {
    ["GET", "HEAD", "POST"].contains(&method) || methods.iter().any(|m| m == "*" || m == method)
}

fn ref_headers_allowed(headers: &[String], requested: &[String]) -> bool {
    requested
        .iter()
        .flat_map(|line| line.split(','))
        .map(|h| h.trim_matches([' ', '\t']).to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .all(|h| {
            headers.iter().any(|a| a.to_ascii_lowercase() == h)
                || (headers.iter().any(|a| a == "*") && h != "authorization")
        })
}

// ---- generators -------------------------------------------------------------------------

fn host() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a",
            "b",
            "app",
            "example",
            "evil-example",
            "com",
            "net",
        ]),
        1..4,
    )
    .prop_map(|labels| labels.join("."))
}

fn port() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", ":8080", ":443", ":80"])
}

fn scheme() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["https", "http"])
}

/// A policy entry: exact, wildcard, `*` or `null`, sometimes in non-canonical case.
fn entry() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (scheme(), host(), port(), any::<bool>()).prop_map(|(s, h, p, upper)| {
            let e = format!("{s}://{h}{p}");
            if upper { e.to_ascii_uppercase() } else { e }
        }),
        3 => (scheme(), host(), port()).prop_map(|(s, h, p)| format!("{s}://*.{h}{p}")),
        1 => Just("*".to_owned()),
        1 => Just("null".to_owned()),
    ]
}

/// A request origin: usually well formed, sometimes with the mistakes clients make.
fn request_origin() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (scheme(), host(), port()).prop_map(|(s, h, p)| format!("{s}://{h}{p}")),
        1 => (scheme(), host()).prop_map(|(s, h)| format!("{s}://{h}/")),
        1 => (scheme(), host()).prop_map(|(s, h)| format!("{s}://{}", h.to_ascii_uppercase())),
        1 => Just("null".to_owned()),
    ]
}

fn methods() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec!["PUT", "put", "DELETE", "PATCH", "patch", "*"]),
        0..4,
    )
    .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn allowed_headers() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec!["x-a", "X-B", "authorization", "content-type", "*"]),
        0..4,
    )
    .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn requested_header_lines() -> impl Strategy<Value = Vec<String>> {
    let item = prop::sample::select(vec![
        "x-a",
        "X-A",
        "x-b",
        "Authorization",
        "content-type",
        "x-c",
        "",
        " ",
    ]);
    prop::collection::vec(
        prop::collection::vec(item, 0..4).prop_map(|v| v.join(",")),
        0..3,
    )
}

/// Builds and compiles a policy; `None` when validation refuses it (e.g. `*` + credentials),
/// which the reference does not model.
fn compile(spec: &PolicySpec) -> Option<CompiledPolicy> {
    let codes: Vec<&str> = corsair_policy::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    Policy::check(spec, &codes)
        .ok()
        .map(|v| CompiledPolicy::new(v.policy))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn engine_agrees_with_reference(
        origins in prop::collection::vec(entry(), 0..6),
        methods in methods(),
        headers in allowed_headers(),
        credentials in any::<bool>(),
        origin in request_origin(),
        preflight in any::<bool>(),
        acrm in prop::sample::select(vec!["GET", "PUT", "put", "PATCH", "patch", "DELETE", "PURGE"]),
        acrh in requested_header_lines(),
    ) {
        let spec = PolicySpec {
            service: "svc".into(),
            allowed_origins: origins.clone(),
            allowed_methods: methods.clone(),
            allowed_headers: headers.clone(),
            allow_credentials: credentials,
            ..PolicySpec::default()
        };
        let Some(engine) = compile(&spec) else { return Ok(()) };
        let mut h = HeaderMap::new();
        h.insert("origin", HeaderValue::from_str(&origin).unwrap());
        let method = if preflight {
            h.insert("access-control-request-method", HeaderValue::from_static(acrm));
            for line in &acrh {
                h.append("access-control-request-headers", HeaderValue::from_str(line).unwrap());
            }
            Method::OPTIONS
        } else {
            Method::from_bytes(acrm.as_bytes()).unwrap()
        };
        let decision = engine.decide(&Request::new(&method, &h));

        let expected = ref_origin_allowed(&origins, &origin)
            && ref_method_allowed(&methods, acrm)
            && (!preflight || ref_headers_allowed(&headers, &acrh));
        prop_assert_eq!(decision.allowed, expected, "decision {:?}", decision);

        let cors = decision.headers.expect("standard mode always writes headers");
        if expected {
            let star = origins.iter().any(|o| o == "*") && !credentials && origin != "null"
                && !origins.iter().any(|e| e != "*" && ref_origin_allowed(std::slice::from_ref(e), &origin));
            let acao = cors.allow_origin.expect("allowed responses carry ACAO");
            if star {
                prop_assert_eq!(acao, "*");
            } else {
                prop_assert_eq!(acao, origin.as_str());
            }
            prop_assert_eq!(cors.allow_credentials, credentials);
            prop_assert_eq!(decision.action == Action::Forward, !preflight);
        } else {
            prop_assert!(cors.allow_origin.is_none() && !cors.allow_credentials && cors.allow_headers.is_none());
        }
    }

    #[test]
    fn arbitrary_header_bytes_never_panic(
        method in prop::sample::select(vec!["GET", "OPTIONS", "PUT", "PATCH"]),
        lines in prop::collection::vec(
            (prop::sample::select(vec!["origin", "access-control-request-method", "access-control-request-headers",
                                        "access-control-request-private-network", "host"]),
             prop::collection::vec(any::<u8>(), 0..64)),
            0..8),
        authority in prop::option::of("[ -~]{0,20}"),
        upstream_vary in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..32), 0..3),
        policy in prop::sample::select(vec![
            r#"{"service":"svc","allowed_origins":["https://*.example.com","https://a.com","regex:https://.*"],"allowed_headers":["*"],"allowed_methods":["PUT"]}"#,
            r#"{"service":"svc","allowed_origins":["*"],"mode":"enforce"}"#,
            r#"{"service":"svc","allowed_origins":["null","http://[::1]:80"],"allow_credentials":true,"mode":"shadow"}"#,
        ]),
    ) {
        let spec: PolicySpec = serde_json::from_str(policy).unwrap();
        let engine = compile(&spec).unwrap();
        let mut h = HeaderMap::new();
        for (name, value) in &lines {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.append(*name, v);
            }
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let req = Request::new(&method, &h).with_own_origin(Scheme::Https, authority.as_deref());
        let decision = engine.decide(&req);
        let _ = engine.describe(&req, &decision);
        let mut response = HeaderMap::new();
        for v in &upstream_vary {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                response.append("vary", v);
            }
        }
        if let Some(cors) = &decision.headers {
            cors.apply(&mut response);
            // CORS headers are never duplicated.
            for name in corsair_policy::headers::CORS_RESPONSE_HEADERS {
                prop_assert!(response.get_all(name).iter().count() <= 1);
            }
        }
    }

    #[test]
    fn canonical_entries_parse_back_to_themselves(entry in entry()) {
        if let Ok(pattern) = corsair_policy::OriginPattern::parse(&entry) {
            let canonical = pattern.canonical();
            let again = corsair_policy::OriginPattern::parse(&canonical).unwrap().canonical();
            prop_assert_eq!(&again, &canonical);
            prop_assert_eq!(canonical, ref_canonical(&entry));
        }
    }
}
