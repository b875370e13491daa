//! Per-route rules: which route decides a request (exact before prefix, the longest prefix,
//! preflights by their own path), what a route inherits, and how a path is read before it is
//! matched, one named case per shape an attacker uses to make a proxy and an upstream
//! disagree on a path.

use corsair_policy::{
    Action, CompiledPolicy, Decision, Kind, Mode, Policy, PolicySpec, Reason, Request, RouteIndex,
    Scheme,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

const APP: &str = "https://app.example.com";
const ADMIN: &str = "https://admin.example.com";
const EVIL: &str = "https://evil.example";

fn compile(json: &str) -> CompiledPolicy {
    let spec: PolicySpec = serde_json::from_str(json).unwrap();
    let codes: Vec<&str> = corsair_policy::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    CompiledPolicy::new(Policy::check(&spec, &codes).unwrap().policy)
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(*name, HeaderValue::from_str(value).unwrap());
    }
    h
}

fn route(i: usize) -> Option<RouteIndex> {
    Some(RouteIndex::new(i).unwrap())
}

/// The route that decides an actual GET from `APP` to `path` (`Err(())` when the path is
/// refused as ambiguous).
fn route_of(engine: &CompiledPolicy, path: &str) -> Result<Option<RouteIndex>, ()> {
    let h = headers(&[("origin", APP)]);
    let d = engine.decide(&Request::new(&Method::GET, &h).with_path(path));
    match d.reason {
        Reason::PathAmbiguous => Err(()),
        _ => Ok(d.route),
    }
}

/// Routes at several depths, exact and prefix.
const NESTED: &str = r#"{"service":"svc","allowed_origins":["https://app.example.com"],
  "routes":[
    {"path":"/public/","allowed_origins":["*"]},
    {"path":"/api/","allowed_origins":["https://admin.example.com"],"allow_credentials":true},
    {"path":"/api/health","allowed_origins":["*"]},
    {"path":"/api/v2/","allowed_methods":["PATCH"]},
    {"path":"/api/v2/internal/"},
    {"path":"/"  ,"max_age":5}
  ]}"#;

#[test]
fn the_longest_match_wins_and_exact_beats_prefix() {
    let engine = compile(NESTED);
    for (path, want) in [
        ("/public/", route(0)),
        ("/public/a/b", route(0)),
        ("/api/health", route(2)),
        ("/api/health/", route(1)),
        ("/api/healthz", route(1)),
        ("/api/v1/items", route(1)),
        ("/api/v2/items", route(3)),
        ("/api/v2/internal/x", route(4)),
        ("/api/v2/internal", route(3)),
        // A prefix ends in `/`: `/api` is not under `/api/`.
        ("/api", route(5)),
        ("/apix/", route(5)),
        ("/", route(5)),
        // Not a path: the policy's own rules.
        ("*", None),
        ("", None),
    ] {
        assert_eq!(route_of(&engine, path), Ok(want), "{path}");
    }
}

#[test]
fn the_query_string_is_ignored() {
    let engine = compile(NESTED);
    assert_eq!(route_of(&engine, "/api/health?x=/public/"), Ok(route(2)));
    assert_eq!(
        route_of(&engine, "/public/a?next=/api/../api/x"),
        Ok(route(0))
    );
    assert_eq!(route_of(&engine, "/public/a#/api/"), Ok(route(0)));
    assert_eq!(route_of(&engine, "/api/v2/x?%2e%2e"), Ok(route(3)));
}

#[test]
fn a_policy_without_routes_ignores_the_path() {
    let engine = compile(r#"{"service":"svc","allowed_origins":["https://app.example.com"]}"#);
    for path in ["/", "/a/../b", "//x", "/%2e%2e/", "/a\\b", "/a;b", "*", ""] {
        let h = headers(&[("origin", APP)]);
        let d = engine.decide(&Request::new(&Method::GET, &h).with_path(path));
        assert!(d.allowed, "{path}: {d:?}");
        assert_eq!(d.route, None);
    }
}

#[test]
fn each_route_gets_its_own_answer() {
    let engine = compile(NESTED);
    let get = |path: &str, origin: &str| {
        let h = headers(&[("origin", origin)]);
        let d = engine.decide(&Request::new(&Method::GET, &h).with_path(path));
        let cors = d.headers.clone().unwrap();
        (d.allowed, cors.allow_origin, cors.allow_credentials)
    };
    assert_eq!(
        get("/public/logo.png", EVIL),
        (true, Some(HeaderValue::from_static("*")), false)
    );
    assert_eq!(get("/api/users", EVIL), (false, None, false));
    assert_eq!(get("/api/users", APP), (false, None, false));
    assert_eq!(
        get("/api/users", ADMIN),
        (true, Some(HeaderValue::from_static(ADMIN)), true)
    );
    assert_eq!(
        get("/other", APP),
        (true, Some(HeaderValue::from_static(APP)), false)
    );
}

#[test]
fn preflights_are_matched_by_their_own_path() {
    let engine = compile(NESTED);
    let preflight = |path: &str, origin: &str, method: &str| {
        let h = headers(&[
            ("origin", origin),
            ("access-control-request-method", method),
        ]);
        engine.decide(&Request::new(&Method::OPTIONS, &h).with_path(path))
    };
    let d = preflight("/api/v2/items/7", APP, "PATCH");
    assert_eq!(
        (d.kind, d.allowed, d.route),
        (Kind::Preflight, true, route(3))
    );
    // Route 3 sets methods only: its origins are the policy's, not route 1's.
    assert_eq!(
        preflight("/api/v2/items/7", ADMIN, "PATCH").reason,
        Reason::OriginNotAllowed
    );
    // Route 1 allows the admin origin, but not PATCH (the policy's methods).
    let d = preflight("/api/v1/items/7", ADMIN, "PATCH");
    assert_eq!((d.reason, d.route), (Reason::MethodNotAllowed, route(1)));
    let d = preflight("/api/v1/items/7", ADMIN, "GET");
    assert!(d.allowed);
    assert_eq!(d.headers.unwrap().max_age, None);
    // The preflight to `/other` is answered by route 5, with its max age.
    let d = preflight("/other", APP, "GET");
    assert_eq!(
        d.headers.unwrap().max_age,
        Some(&HeaderValue::from_static("5"))
    );
}

/// One route per field, each setting only that field.
const EACH_FIELD: &str = r#"{"service":"svc",
  "allowed_origins":["https://app.example.com"],"allowed_methods":["PUT"],
  "allowed_headers":["x-top"],"exposed_headers":["x-top-total"],"max_age":600,
  "routes":[
    {"path":"/o/","allowed_origins":["https://admin.example.com"]},
    {"path":"/m/","allowed_methods":["PATCH"]},
    {"path":"/h/","allowed_headers":["x-route"]},
    {"path":"/e/","exposed_headers":["x-route-total"]},
    {"path":"/c/","allow_credentials":true},
    {"path":"/a/","max_age":30},
    {"path":"/p/","allow_private_network":true},
    {"path":"/x/","mode":"enforce"},
    {"path":"/s/","mode":"shadow"}
  ]}"#;

/// What one request to `path` gets: allowed, status if answered locally, and the headers.
struct Answer {
    allowed: bool,
    status: Option<u16>,
    headers: Option<HeaderMap>,
}

fn ask(
    engine: &CompiledPolicy,
    path: &str,
    origin: &str,
    preflight: &[(&'static str, &str)],
) -> Answer {
    let mut pairs = vec![("origin", origin)];
    pairs.extend_from_slice(preflight);
    let h = headers(&pairs);
    let method = if preflight.is_empty() {
        Method::GET
    } else {
        Method::OPTIONS
    };
    let d: Decision<'_> = engine.decide(&Request::new(&method, &h).with_path(path));
    Answer {
        allowed: d.allowed,
        status: match d.action {
            Action::Respond(s) => Some(s.as_u16()),
            Action::Forward => None,
        },
        headers: d.headers.map(|c| c.to_header_map()),
    }
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.to_str().unwrap())
}

#[test]
fn a_route_overrides_each_field_it_sets_and_inherits_the_rest() {
    let engine = compile(EACH_FIELD);
    let paths = [
        "/o/x", "/m/x", "/h/x", "/e/x", "/c/x", "/a/x", "/p/x", "/x/x", "/s/x", "/top",
    ];
    for path in paths {
        let sets = |prefix: &str| path.starts_with(prefix);
        // allowed_origins
        assert_eq!(
            ask(&engine, path, APP, &[]).allowed,
            !sets("/o/"),
            "{path}: app"
        );
        assert_eq!(
            ask(&engine, path, ADMIN, &[]).allowed,
            sets("/o/"),
            "{path}: admin"
        );
        let origin = if sets("/o/") { ADMIN } else { APP };
        // allowed_methods
        let put = ask(
            &engine,
            path,
            origin,
            &[("access-control-request-method", "PUT")],
        );
        let patch = ask(
            &engine,
            path,
            origin,
            &[("access-control-request-method", "PATCH")],
        );
        assert_eq!(
            (put.allowed, patch.allowed),
            (!sets("/m/"), sets("/m/")),
            "{path}: methods"
        );
        // allowed_headers
        let top = ask(
            &engine,
            path,
            origin,
            &[
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-top"),
            ],
        );
        let own = ask(
            &engine,
            path,
            origin,
            &[
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-route"),
            ],
        );
        assert_eq!(
            (top.allowed, own.allowed),
            (!sets("/h/"), sets("/h/")),
            "{path}: headers"
        );
        // max_age
        let preflight = ask(
            &engine,
            path,
            origin,
            &[("access-control-request-method", "GET")],
        );
        if !sets("/s/") {
            let want = if sets("/a/") { "30" } else { "600" };
            assert_eq!(
                header(&preflight, "access-control-max-age"),
                Some(want),
                "{path}"
            );
        }
        // exposed_headers and allow_credentials
        let actual = ask(&engine, path, origin, &[]);
        if !sets("/s/") {
            let want = if sets("/e/") {
                "x-route-total"
            } else {
                "x-top-total"
            };
            assert_eq!(
                header(&actual, "access-control-expose-headers"),
                Some(want),
                "{path}"
            );
            let want = sets("/c/").then_some("true");
            assert_eq!(
                header(&actual, "access-control-allow-credentials"),
                want,
                "{path}"
            );
        }
        // allow_private_network
        let pna = ask(
            &engine,
            path,
            origin,
            &[
                ("access-control-request-method", "GET"),
                ("access-control-request-private-network", "true"),
            ],
        );
        assert_eq!(pna.allowed, sets("/p/"), "{path}: private network");
        // mode
        let denied = ask(&engine, path, EVIL, &[]);
        let (status, untouched) = match () {
            _ if sets("/x/") => (Some(403), false),
            _ if sets("/s/") => (None, true),
            _ => (None, false),
        };
        assert_eq!(denied.status, status, "{path}: mode");
        assert_eq!(denied.headers.is_none(), untouched, "{path}: mode");
    }
}

#[test]
fn each_decision_names_its_route_and_mode() {
    let engine = compile(EACH_FIELD);
    let h = headers(&[("origin", EVIL)]);
    let req = Request::new(&Method::GET, &h).with_path("/s/x");
    let d = engine.decide(&req);
    assert_eq!(d.route, route(8));
    assert_eq!(engine.mode(&d), Mode::Shadow);
    assert_eq!(d.route.unwrap().to_string(), "routes[8]");

    let h = headers(&[("origin", ADMIN)]);
    let req = Request::new(&Method::GET, &h).with_path("/o/x");
    let d = engine.decide(&req);
    assert_eq!(
        engine.describe(&req, &d),
        "origin https://admin.example.com allowed by routes[0].allowed_origins[0] (https://admin.example.com); route routes[0] (/o/) decided"
    );
    let h = headers(&[("origin", APP)]);
    let req = Request::new(&Method::GET, &h).with_path("/top?x=1");
    let d = engine.decide(&req);
    assert_eq!(
        engine.describe(&req, &d),
        "origin https://app.example.com allowed by allowed_origins[0] (https://app.example.com); no route matches /top, so the policy's own rules decided"
    );
}

// ---- normalization ------------------------------------------------------------------------

/// `/public/` is open to any origin, `/api/` to the admin origin with credentials, the rest
/// to the app origin.
const SPLIT: &str = r#"{"service":"svc","allowed_origins":["https://app.example.com"],
  "routes":[
    {"path":"/public/","allowed_origins":["*"]},
    {"path":"/api/","allowed_origins":["https://admin.example.com"],"allow_credentials":true},
    {"path":"/api/export","allowed_origins":["https://admin.example.com"],"allow_credentials":true}
  ]}"#;

/// What a path should get: a route (`None`: the policy's own rules), or a refusal.
#[derive(Debug, PartialEq)]
enum Want {
    Route(Option<usize>),
    Ambiguous,
}

#[test]
fn paths_that_read_two_ways_are_refused() {
    use Want::{Ambiguous, Route};
    let engine = compile(SPLIT);
    let cases: &[(&str, &str, Want)] = &[
        ("plain_prefix", "/public/logo.png", Route(Some(0))),
        ("plain_exact", "/api/export", Route(Some(2))),
        (
            "dot_segments_out_of_the_public_prefix",
            "/public/../api/users",
            Ambiguous,
        ),
        (
            "dot_segment_that_stays_inside",
            "/public/./a/../logo.png",
            Route(Some(0)),
        ),
        ("dot_dot_to_the_root", "/api/..", Ambiguous),
        ("encoded_dots", "/public/%2e%2e/api/users", Ambiguous),
        (
            "encoded_dots_uppercase",
            "/public/%2E%2E/api/users",
            Ambiguous,
        ),
        ("half_encoded_dots", "/public/.%2e/api/users", Ambiguous),
        ("double_encoded_dots", "/api/%252e%252e/public/x", Ambiguous),
        ("encoded_slash", "/public/..%2Fapi/users", Ambiguous),
        (
            "encoded_slash_lowercase",
            "/public/..%2fapi/users",
            Ambiguous,
        ),
        ("encoded_slash_into_a_prefix", "/api%2Fusers", Ambiguous),
        (
            "encoded_slash_without_effect",
            "/public/a%2Fb",
            Route(Some(0)),
        ),
        ("encoded_backslash", "/public/..%5Capi/users", Ambiguous),
        ("doubled_slash_to_a_prefix", "//api/users", Ambiguous),
        (
            "doubled_slash_inside_a_prefix",
            "/public//logo.png",
            Route(Some(0)),
        ),
        (
            "doubled_slash_before_an_exact_path",
            "/api//export",
            Ambiguous,
        ),
        ("backslashes", "/public\\..\\api\\users", Ambiguous),
        ("backslash_dot_dot", "/public/..\\api/users", Ambiguous),
        ("semicolon_dot_dot", "/public/..;/api/users", Ambiguous),
        (
            "semicolon_parameter_on_a_prefix",
            "/api;x=1/users",
            Ambiguous,
        ),
        (
            "semicolon_parameter_on_an_exact_path",
            "/api/export;jsessionid=1",
            Ambiguous,
        ),
        (
            "semicolon_parameter_without_effect",
            "/api/users;jsessionid=1",
            Route(Some(1)),
        ),
        ("encoded_letters", "/%61pi/users", Ambiguous),
        (
            "encoded_letter_without_effect",
            "/public/%41",
            Route(Some(0)),
        ),
        ("uppercase_prefix", "/API/users", Ambiguous),
        ("uppercase_exact_path", "/api/EXPORT", Ambiguous),
        (
            "uppercase_without_effect",
            "/public/Logo.PNG",
            Route(Some(0)),
        ),
        (
            "query_with_dot_segments",
            "/public/x?/../../api/users",
            Route(Some(0)),
        ),
        ("query_only", "/api/export?format=csv", Route(Some(2))),
        ("prefix_without_its_slash", "/public", Route(None)),
        ("asterisk", "*", Route(None)),
    ];
    let mut failures = Vec::new();
    for (name, path, want) in cases {
        let got = match route_of(&engine, path) {
            Ok(route) => Route(route.map(RouteIndex::get)),
            Err(()) => Ambiguous,
        };
        if got != *want {
            failures.push(format!("{name} ({path}): got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_ambiguous_path_is_denied_without_cors_headers() {
    let engine = compile(SPLIT);
    let path = "/public/..%2Fapi/users";
    // An actual request from any origin: forwarded (standard mode) without CORS headers.
    for origin in [EVIL, ADMIN, APP] {
        let h = headers(&[("origin", origin)]);
        let req = Request::new(&Method::GET, &h).with_path(path);
        let d = engine.decide(&req);
        assert_eq!(
            (d.kind, d.allowed, d.reason),
            (Kind::Actual, false, Reason::PathAmbiguous)
        );
        assert_eq!((d.route, d.action), (None, Action::Forward));
        let cors = d.headers.unwrap();
        assert_eq!((cors.allow_origin, cors.allow_credentials), (None, false));
        let text = engine.describe(&req, &engine.decide(&req));
        assert!(
            text.contains("/public/..%2Fapi/users")
                && text.contains("/api/users")
                && text.contains("routes[0] (/public/)")
                && text.contains("routes[1] (/api/)"),
            "{text}"
        );
    }
    // The explanation names the path, never the query (which may hold secrets).
    let h = headers(&[("origin", ADMIN)]);
    for target in ["/public/..%2Fapi/users?token=s3cr3t", "/other?token=s3cr3t"] {
        let req = Request::new(&Method::GET, &h).with_path(target);
        let text = engine.describe(&req, &engine.decide(&req));
        assert!(!text.contains("s3cr3t"), "{text}");
    }
    // A preflight: answered here, without headers.
    let h = headers(&[("origin", ADMIN), ("access-control-request-method", "GET")]);
    let d = engine.decide(&Request::new(&Method::OPTIONS, &h).with_path(path));
    assert_eq!(d.reason, Reason::PathAmbiguous);
    assert_eq!(d.action, Action::Respond(StatusCode::NO_CONTENT));
    assert_eq!(d.headers.unwrap().allow_origin, None);
    // No Origin: not CORS, forwarded, and without the `*` the public route would add.
    let h = HeaderMap::new();
    let d = engine.decide(&Request::new(&Method::GET, &h).with_path(path));
    assert_eq!((d.kind, d.allowed), (Kind::NotCors, true));
    assert_eq!(d.headers.unwrap().allow_origin, None);
    let d = engine.decide(&Request::new(&Method::GET, &h).with_path("/public/x"));
    assert_eq!(
        d.headers.unwrap().allow_origin,
        Some(HeaderValue::from_static("*"))
    );
    // Its own origin: never blocked.
    let h = headers(&[("origin", "http://svc.internal")]);
    let d = engine.decide(
        &Request::new(&Method::GET, &h)
            .with_path(path)
            .with_own_origin(Scheme::Http, Some("svc.internal")),
    );
    assert_eq!((d.kind, d.allowed), (Kind::SameOrigin, true));
}

#[test]
fn an_ambiguous_path_is_denied_in_the_strictest_mode_of_the_policy() {
    // The policy enforces one route: an ambiguous path gets 403, wherever it leads.
    let engine = compile(
        r#"{"service":"svc","allowed_origins":["*"],
            "routes":[{"path":"/api/","allowed_origins":["https://admin.example.com"]},
                      {"path":"/api/export","mode":"enforce"}]}"#,
    );
    let h = headers(&[("origin", ADMIN)]);
    let d = engine.decide(&Request::new(&Method::GET, &h).with_path("/public/..;/api/users"));
    assert_eq!(d.reason, Reason::PathAmbiguous);
    assert_eq!(engine.mode(&d), Mode::Enforce);
    assert_eq!(d.action, Action::Respond(StatusCode::FORBIDDEN));

    // Shadow everywhere: reported, nothing changed.
    let engine = compile(
        r#"{"service":"svc","allowed_origins":["*"],"mode":"shadow",
            "routes":[{"path":"/api/","allowed_origins":["https://admin.example.com"]}]}"#,
    );
    let d = engine.decide(&Request::new(&Method::GET, &h).with_path("/x/../api/users"));
    assert_eq!((d.allowed, d.reason), (false, Reason::PathAmbiguous));
    assert_eq!((d.action, d.headers), (Action::Forward, None));
}

#[test]
fn routes_with_uppercase_letters_match_case_sensitively_and_refuse_case_variants() {
    let engine = compile(
        r#"{"service":"svc","allowed_origins":["https://app.example.com"],
            "routes":[{"path":"/Admin/","allowed_origins":["https://admin.example.com"]}]}"#,
    );
    assert_eq!(route_of(&engine, "/Admin/x"), Ok(route(0)));
    assert_eq!(route_of(&engine, "/Admin/X"), Ok(route(0)));
    assert_eq!(route_of(&engine, "/admin/x"), Err(()));
    assert_eq!(route_of(&engine, "/ADMIN/x"), Err(()));
    assert_eq!(route_of(&engine, "/other"), Ok(None));
    assert_eq!(route_of(&engine, "/Other"), Ok(None));
    assert_eq!(route_of(&engine, "/%41dmin/x"), Err(()));
}

#[test]
fn a_path_that_reads_too_many_ways_is_refused() {
    let engine = compile(SPLIT);
    let shape = "a;b/c%41\\d%2F/";
    assert_eq!(route_of(&engine, &format!("/public/{shape}")), Ok(route(0)));
    // The same shape many times over reads in more ways than are followed.
    let long = format!("/public/{}", shape.repeat(60));
    assert_eq!(route_of(&engine, &long), Err(()));
    // So does a path with escapes over 2 KiB, however it reads.
    let escaped = format!("/public/{}", "a%20".repeat(600));
    assert_eq!(route_of(&engine, &escaped[..1500]), Ok(route(0)));
    assert_eq!(route_of(&engine, &escaped), Err(()));
    let h = headers(&[("origin", APP)]);
    let req = Request::new(&Method::GET, &h).with_path(&escaped);
    let text = engine.describe(&req, &engine.decide(&req));
    assert!(text.contains("longer than 2048 bytes"), "{text}");
}

#[test]
fn very_long_paths_cost_a_bounded_lookup() {
    let engine = compile(NESTED);
    let deep = format!("/api/v2/{}", "a/".repeat(30_000));
    assert_eq!(route_of(&engine, &deep), Ok(route(3)));
    let deep_upper = format!("/API/v2/{}", "A/".repeat(30_000));
    assert_eq!(route_of(&engine, &deep_upper), Err(()));
    let dots = format!("/api/v2/{}", "../".repeat(30_000));
    assert_eq!(route_of(&engine, &dots), Err(()));
}

// ---- against models of real servers ---------------------------------------------------------

mod servers {
    //! How some servers read a request path before routing it: deliberately plain code, kept
    //! apart from the engine's.

    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }

    /// Percent-decodes every escape (`only`: those whose byte passes).
    pub(crate) fn decode(path: &[u8], only: impl Fn(u8) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < path.len() {
            if path[i] == b'%'
                && i + 2 < path.len()
                && let (Some(h), Some(l)) = (hex(path[i + 1]), hex(path[i + 2]))
                && only(h * 16 + l)
            {
                out.push(h * 16 + l);
                i += 3;
            } else {
                out.push(path[i]);
                i += 1;
            }
        }
        out
    }

    /// Resolves `.` and `..`, merging `//` or keeping empty segments.
    pub(crate) fn resolve(path: &[u8], merge: bool) -> Vec<u8> {
        let mut kept: Vec<&[u8]> = Vec::new();
        let segments: Vec<&[u8]> = path.split(|&b| b == b'/').skip(1).collect();
        let mut slash_end = false;
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            match *segment {
                b"." => slash_end = true,
                b".." => {
                    kept.pop();
                    slash_end = true;
                }
                b"" if merge || last => slash_end = true,
                s => {
                    kept.push(s);
                    slash_end = false;
                }
            }
        }
        let mut out = Vec::new();
        for s in kept {
            out.push(b'/');
            out.extend_from_slice(s);
        }
        if slash_end || out.is_empty() {
            out.push(b'/');
        }
        out
    }

    pub(crate) fn strip_parameters(path: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut skipping = false;
        for &b in path {
            match b {
                b'/' => {
                    skipping = false;
                    out.push(b);
                }
                b';' => skipping = true,
                _ if skipping => {}
                _ => out.push(b),
            }
        }
        out
    }

    pub(crate) fn backslashes(path: &[u8]) -> Vec<u8> {
        path.iter()
            .map(|&b| if b == b'\\' { b'/' } else { b })
            .collect()
    }

    /// The path a server routes on, and whether it compares case-insensitively.
    pub(crate) fn read(server: &str, path: &[u8]) -> (Vec<u8>, bool) {
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        match server {
            "literal" => (path.to_vec(), false),
            "literal, any case" => (path.to_vec(), true),
            "rfc 3986" => (resolve(&decode(path, unreserved), false), false),
            "nginx" => (resolve(&decode(path, |_| true), true), false),
            "apache" => (resolve(&decode(path, |_| true), false), false),
            "decoded, not resolved" => (decode(path, |_| true), false),
            "tomcat" => (
                resolve(&decode(&strip_parameters(path), |_| true), false),
                false,
            ),
            "decode then parameters" => (
                resolve(&strip_parameters(&decode(path, |_| true)), true),
                false,
            ),
            "iis" => (resolve(&backslashes(&decode(path, |_| true)), true), true),
            "twice decoded" => (
                resolve(&decode(&decode(path, |_| true), |_| true), true),
                false,
            ),
            _ => unreachable!(),
        }
    }

    pub(crate) const SERVERS: [&str; 10] = [
        "literal",
        "literal, any case",
        "rfc 3986",
        "nginx",
        "apache",
        "decoded, not resolved",
        "tomcat",
        "decode then parameters",
        "iis",
        "twice decoded",
    ];

    /// The route a server picks among `routes`: an exact path, else the longest prefix.
    pub(crate) fn route(routes: &[&str], path: &[u8], any_case: bool) -> Option<usize> {
        let eq = |a: &[u8], b: &[u8]| {
            if any_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        if let Some(i) = routes
            .iter()
            .position(|r| !r.ends_with('/') && eq(r.as_bytes(), path))
        {
            return Some(i);
        }
        routes
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.ends_with('/') && path.len() >= r.len() && eq(r.as_bytes(), &path[..r.len()])
            })
            .max_by_key(|(_, r)| r.len())
            .map(|(i, _)| i)
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

    /// Whenever the engine picks a route for a path, every server model routes the path the
    /// same way: a path some server reads otherwise is refused.
    #[test]
    fn a_route_is_only_applied_where_every_server_agrees(
        tokens in proptest::collection::vec(
            proptest::sample::select(vec![
                "/", "api", "API", "public", "v2", "export", "a", ".", "..", "%2e", "%2E",
                "%2f", "%2F", "%5c", "%5C", "\\", ";", ";x=1", "%25", "%252e", "%252F", "%61",
                "%41", "%3B", "%3b", "//", "..;", "p%75blic",
            ]),
            0..8,
        ),
        query in proptest::sample::select(vec!["", "?x=/../api/", "?"]),
    ) {
        const ROUTES: [&str; 5] = ["/public/", "/api/", "/api/export", "/api/v2/", "/a/"];
        let json = serde_json::json!({
            "service": "svc",
            "allowed_origins": [APP],
            "routes": ROUTES.iter().map(|p| serde_json::json!({"path": p, "max_age": 1})).collect::<Vec<_>>(),
        });
        let engine = compile(&json.to_string());
        let path = format!("/{}", tokens.concat());
        let target = format!("{path}{query}");
        if let Ok(route) = route_of(&engine, &target) {
            for server in servers::SERVERS {
                let (read, any_case) = servers::read(server, path.as_bytes());
                let theirs = servers::route(&ROUTES, &read, any_case);
                proptest::prop_assert_eq!(
                    route.map(RouteIndex::get),
                    theirs,
                    "{} reads {} as {}",
                    server,
                    target,
                    String::from_utf8_lossy(&read)
                );
            }
        }
    }
}

proptest::proptest! {
    /// Whatever the path, deciding and explaining never panic, and the cost stays bounded.
    #[test]
    fn arbitrary_paths_never_panic(path in "[/a-zA-Z.%25;\\\\?#2eEfF5cC]{0,64}|\\PC{0,32}") {
        let engine = compile(NESTED);
        for origin in [APP, ADMIN] {
            let h = headers(&[("origin", origin)]);
            let req = Request::new(&Method::GET, &h).with_path(&path);
            let d = engine.decide(&req);
            proptest::prop_assert!(!engine.describe(&req, &d).is_empty());
        }
    }
}
