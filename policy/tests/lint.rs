//! Validation and lint, one named case per rule: which finding (field path, code, severity)
//! each input produces, and whether the policy is refused.

use corsair_policy::{Code, Policy, PolicySpec, Severity, lint};

struct Case {
    name: &'static str,
    /// The policy, as JSON without `service` (the case adds `"service": "svc"` unless the
    /// JSON names one).
    policy: &'static str,
    /// Every finding expected, in order, as (field, code).
    expect: &'static [(&'static str, Code)],
    /// Whether the policy is accepted once every risk is acknowledged.
    accepted: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "clean_policy_has_no_findings",
        policy: r#"{"allowed_origins":["https://app.example.com"],"allowed_methods":["PUT"],"allowed_headers":["x-a"]}"#,
        expect: &[],
        accepted: true,
    },
    Case {
        name: "service_name_must_be_a_dns_label",
        policy: r#"{"service":"Bad_Name","allowed_origins":["https://a.com"]}"#,
        expect: &[("service", Code::INVALID_SERVICE_NAME)],
        accepted: false,
    },
    Case {
        name: "empty_service_name_is_refused",
        policy: r#"{"service":"","allowed_origins":["https://a.com"]}"#,
        expect: &[("service", Code::INVALID_SERVICE_NAME)],
        accepted: false,
    },
    Case {
        name: "origin_with_path_is_refused",
        policy: r#"{"allowed_origins":["https://a.com","https://b.com/app"]}"#,
        expect: &[("allowed_origins[1]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "origin_with_trailing_slash_is_refused",
        policy: r#"{"allowed_origins":["https://a.com/"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "origin_with_query_is_refused",
        policy: r#"{"allowed_origins":["https://a.com?x=1"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "origin_with_fragment_is_refused",
        policy: r##"{"allowed_origins":["https://a.com#x"]}"##,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "origin_with_userinfo_is_refused",
        policy: r#"{"allowed_origins":["https://user:pw@a.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "origin_with_whitespace_is_refused",
        policy: r#"{"allowed_origins":[" https://a.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "non_http_scheme_is_refused",
        policy: r#"{"allowed_origins":["chrome-extension://abcdef"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "bare_host_is_refused",
        policy: r#"{"allowed_origins":["example.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "idn_that_is_not_punycode_is_refused",
        policy: r#"{"allowed_origins":["https://bücher.example"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "punycode_host_is_accepted",
        policy: r#"{"allowed_origins":["https://xn--bcher-kva.example"]}"#,
        expect: &[],
        accepted: true,
    },
    Case {
        name: "port_out_of_range_is_refused",
        policy: r#"{"allowed_origins":["https://a.com:70000"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "wildcard_not_first_label_is_refused",
        policy: r#"{"allowed_origins":["https://app.*.example.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "partial_label_wildcard_is_refused",
        policy: r#"{"allowed_origins":["https://app-*.example.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_ORIGIN)],
        accepted: false,
    },
    Case {
        name: "regex_that_does_not_compile_is_refused",
        policy: r#"{"allowed_origins":["regex:https://(a|b.example.com"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_REGEX)],
        accepted: false,
    },
    Case {
        name: "regex_too_large_is_refused",
        policy: r#"{"allowed_origins":["regex:https://\\w{1000}\\w{1000}\\w{1000}"]}"#,
        expect: &[("allowed_origins[0]", Code::INVALID_REGEX)],
        accepted: false,
    },
    Case {
        name: "regex_is_a_risk_and_unanchored_is_noted",
        policy: r#"{"allowed_origins":["regex:https://[a-z]+\\.example\\.com"]}"#,
        expect: &[
            ("allowed_origins[0]", Code::REGEX_ORIGIN),
            ("allowed_origins[0]", Code::UNANCHORED_REGEX),
        ],
        accepted: true,
    },
    Case {
        name: "regex_with_unescaped_dot_is_noted",
        policy: r#"{"allowed_origins":["regex:^https://app.example\\.com$"]}"#,
        expect: &[
            ("allowed_origins[0]", Code::REGEX_ORIGIN),
            ("allowed_origins[0]", Code::REGEX_UNESCAPED_DOT),
        ],
        accepted: true,
    },
    Case {
        name: "star_origin_with_credentials_is_refused",
        policy: r#"{"allowed_origins":["*"],"allow_credentials":true}"#,
        expect: &[("allowed_origins[0]", Code::WILDCARD_WITH_CREDENTIALS)],
        accepted: false,
    },
    Case {
        name: "star_methods_with_credentials_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allow_credentials":true,"allowed_methods":["PUT","*"]}"#,
        expect: &[(
            "allowed_methods[1]",
            Code::CREDENTIALS_WITH_WILDCARD_METHODS,
        )],
        accepted: false,
    },
    Case {
        name: "star_exposed_headers_with_credentials_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allow_credentials":true,"exposed_headers":["*"]}"#,
        expect: &[(
            "exposed_headers[0]",
            Code::CREDENTIALS_WITH_WILDCARD_EXPOSED_HEADERS,
        )],
        accepted: false,
    },
    Case {
        name: "star_headers_with_credentials_is_fine_since_names_are_echoed",
        policy: r#"{"allowed_origins":["https://a.com"],"allow_credentials":true,"allowed_headers":["*"]}"#,
        expect: &[(
            "allowed_headers",
            Code::WILDCARD_HEADERS_EXCLUDE_AUTHORIZATION,
        )],
        accepted: true,
    },
    Case {
        name: "private_network_with_star_is_refused",
        policy: r#"{"allowed_origins":["*"],"allow_private_network":true}"#,
        expect: &[("allowed_origins[0]", Code::PRIVATE_NETWORK_WITH_WILDCARD)],
        accepted: false,
    },
    Case {
        name: "null_origin_is_a_risk",
        policy: r#"{"allowed_origins":["null"]}"#,
        expect: &[("allowed_origins[0]", Code::NULL_ORIGIN)],
        accepted: true,
    },
    Case {
        name: "http_beside_https_is_a_risk",
        policy: r#"{"allowed_origins":["https://a.com","http://a.com"]}"#,
        expect: &[("allowed_origins[1]", Code::INSECURE_ORIGIN)],
        accepted: true,
    },
    Case {
        name: "http_alone_is_not_a_risk",
        policy: r#"{"allowed_origins":["http://localhost:3000"]}"#,
        expect: &[],
        accepted: true,
    },
    Case {
        name: "wildcard_under_icann_public_suffix_is_a_risk",
        policy: r#"{"allowed_origins":["https://*.co.uk"]}"#,
        expect: &[("allowed_origins[0]", Code::WILDCARD_UNDER_PUBLIC_SUFFIX)],
        accepted: true,
    },
    Case {
        name: "wildcard_under_private_public_suffix_is_a_risk",
        policy: r#"{"allowed_origins":["https://*.github.io"]}"#,
        expect: &[("allowed_origins[0]", Code::WILDCARD_UNDER_PUBLIC_SUFFIX)],
        accepted: true,
    },
    Case {
        name: "wildcard_under_a_registrable_domain_is_a_notice",
        policy: r#"{"allowed_origins":["https://*.example.co.uk"]}"#,
        expect: &[("allowed_origins[0]", Code::WILDCARD_SUBDOMAIN)],
        accepted: true,
    },
    Case {
        name: "max_age_above_browser_cap_is_noted",
        policy: r#"{"allowed_origins":["https://a.com"],"max_age":86400}"#,
        expect: &[("max_age", Code::MAX_AGE_ABOVE_BROWSER_CAP)],
        accepted: true,
    },
    Case {
        name: "lowercase_standard_method_is_noted",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_methods":["PUT","patch","delete"]}"#,
        expect: &[
            ("allowed_methods[1]", Code::LOWERCASE_METHOD),
            ("allowed_methods[2]", Code::LOWERCASE_METHOD),
        ],
        accepted: true,
    },
    Case {
        name: "method_that_is_not_a_token_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_methods":["PUT,DELETE"]}"#,
        expect: &[("allowed_methods[0]", Code::INVALID_METHOD)],
        accepted: false,
    },
    Case {
        name: "header_that_is_not_a_token_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_headers":["x-a","x b"],"exposed_headers":["x:y"]}"#,
        expect: &[
            ("allowed_headers[1]", Code::INVALID_HEADER),
            ("exposed_headers[0]", Code::INVALID_HEADER),
        ],
        accepted: false,
    },
    Case {
        name: "duplicate_origins_after_canonicalization_are_noted",
        policy: r#"{"allowed_origins":["https://a.com","HTTPS://A.COM:443"]}"#,
        expect: &[("allowed_origins[1]", Code::DUPLICATE_ENTRY)],
        accepted: true,
    },
    Case {
        name: "duplicate_headers_ignore_case",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_headers":["X-A","x-a"]}"#,
        expect: &[("allowed_headers[1]", Code::DUPLICATE_ENTRY)],
        accepted: true,
    },
    Case {
        name: "duplicate_methods_are_case_sensitive",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_methods":["PUT","PUT","Put"]}"#,
        expect: &[
            ("allowed_methods[1]", Code::DUPLICATE_ENTRY),
            ("allowed_methods[2]", Code::LOWERCASE_METHOD),
        ],
        accepted: true,
    },
    Case {
        name: "no_origins_is_noted",
        policy: r#"{"allowed_origins":[]}"#,
        expect: &[("allowed_origins", Code::NO_ORIGINS)],
        accepted: true,
    },
    // ---- routes ------------------------------------------------------------------------------
    Case {
        name: "clean_routes_have_no_findings",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[
            {"path":"/api/","allowed_origins":["https://b.com"],"allow_credentials":true},
            {"path":"/api/health","allowed_origins":["*"],"allow_credentials":false},
            {"path":"/","max_age":60}]}"#,
        expect: &[],
        accepted: true,
    },
    Case {
        name: "route_wildcard_origin_with_inherited_credentials_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allow_credentials":true,
            "routes":[{"path":"/p/","allowed_origins":["https://b.com","*"]}]}"#,
        expect: &[(
            "routes[0].allowed_origins[1]",
            Code::WILDCARD_WITH_CREDENTIALS,
        )],
        accepted: false,
    },
    Case {
        name: "route_credentials_with_inherited_wildcard_origin_is_refused",
        policy: r#"{"allowed_origins":["*"],"routes":[{"path":"/api/","allow_credentials":true}]}"#,
        expect: &[(
            "routes[0].allow_credentials",
            Code::WILDCARD_WITH_CREDENTIALS,
        )],
        accepted: false,
    },
    Case {
        name: "route_credentials_with_inherited_wildcard_methods_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"allowed_methods":["*"],"exposed_headers":["*"],
            "routes":[{"path":"/api/","allow_credentials":true}]}"#,
        expect: &[
            (
                "routes[0].allow_credentials",
                Code::CREDENTIALS_WITH_WILDCARD_METHODS,
            ),
            (
                "routes[0].allow_credentials",
                Code::CREDENTIALS_WITH_WILDCARD_EXPOSED_HEADERS,
            ),
        ],
        accepted: false,
    },
    Case {
        name: "route_private_network_with_inherited_wildcard_is_refused",
        policy: r#"{"allowed_origins":["*"],"routes":[{"path":"/lan/","allow_private_network":true}]}"#,
        expect: &[(
            "routes[0].allow_private_network",
            Code::PRIVATE_NETWORK_WITH_WILDCARD,
        )],
        accepted: false,
    },
    Case {
        name: "a_route_that_takes_credentials_away_is_fine",
        policy: r#"{"allowed_origins":["https://a.com"],"allow_credentials":true,
            "routes":[{"path":"/public/","allowed_origins":["*"],"allow_credentials":false}]}"#,
        expect: &[],
        accepted: true,
    },
    Case {
        name: "findings_of_inherited_fields_are_reported_once_at_the_top",
        policy: r#"{"allowed_origins":["null","https://*.github.io"],"allowed_methods":["patch"],
            "routes":[{"path":"/a/","max_age":60},{"path":"/b/","allow_credentials":true}]}"#,
        expect: &[
            ("allowed_origins[0]", Code::NULL_ORIGIN),
            ("allowed_origins[1]", Code::WILDCARD_UNDER_PUBLIC_SUFFIX),
            ("allowed_methods[0]", Code::LOWERCASE_METHOD),
        ],
        accepted: true,
    },
    Case {
        name: "risky_route_origins_are_reported_under_the_route",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/x/",
            "allowed_origins":["https://a.com","null","http://b.com","regex:https://c.com","HTTPS://A.COM"]}]}"#,
        expect: &[
            ("routes[0].allowed_origins[1]", Code::NULL_ORIGIN),
            ("routes[0].allowed_origins[2]", Code::INSECURE_ORIGIN),
            ("routes[0].allowed_origins[3]", Code::REGEX_ORIGIN),
            ("routes[0].allowed_origins[3]", Code::UNANCHORED_REGEX),
            ("routes[0].allowed_origins[3]", Code::REGEX_UNESCAPED_DOT),
            ("routes[0].allowed_origins[4]", Code::DUPLICATE_ENTRY),
        ],
        accepted: true,
    },
    Case {
        name: "route_lists_are_checked_like_the_policys",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/x/",
            "allowed_origins":["https://a.com/path"],"allowed_methods":["patch","PUT","PUT"],
            "allowed_headers":["x a","*"],"exposed_headers":["x-b","X-B"],"max_age":9000}]}"#,
        expect: &[
            ("routes[0].allowed_origins[0]", Code::INVALID_ORIGIN),
            ("routes[0].allowed_methods[0]", Code::LOWERCASE_METHOD),
            ("routes[0].allowed_methods[2]", Code::DUPLICATE_ENTRY),
            ("routes[0].allowed_headers[0]", Code::INVALID_HEADER),
            (
                "routes[0].allowed_headers",
                Code::WILDCARD_HEADERS_EXCLUDE_AUTHORIZATION,
            ),
            ("routes[0].exposed_headers[1]", Code::DUPLICATE_ENTRY),
            ("routes[0].max_age", Code::MAX_AGE_ABOVE_BROWSER_CAP),
        ],
        accepted: false,
    },
    Case {
        name: "a_route_without_origins_is_noted",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/internal/","allowed_origins":[]}]}"#,
        expect: &[("routes[0].allowed_origins", Code::NO_ORIGINS)],
        accepted: true,
    },
    Case {
        name: "a_route_that_overrides_nothing_is_noted",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/api/"}]}"#,
        expect: &[("routes[0]", Code::ROUTE_OVERRIDES_NOTHING)],
        accepted: true,
    },
    Case {
        name: "a_duplicate_route_path_is_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[
            {"path":"/api/","max_age":1},{"path":"/b","max_age":1},{"path":"/api/","max_age":2}]}"#,
        expect: &[("routes[2].path", Code::DUPLICATE_ROUTE)],
        accepted: false,
    },
    Case {
        name: "route_paths_that_differ_only_in_case_are_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[
            {"path":"/Api/","max_age":1},{"path":"/api/","max_age":2}]}"#,
        expect: &[("routes[1].path", Code::DUPLICATE_ROUTE)],
        accepted: false,
    },
    Case {
        name: "non_canonical_route_paths_are_refused",
        policy: r#"{"allowed_origins":["https://a.com"],"routes":[
            {"path":"api/","max_age":1},{"path":"/a/../b","max_age":1},{"path":"/a//b","max_age":1},
            {"path":"/a%2Fb","max_age":1},{"path":"/a;b","max_age":1},{"path":"/a?x","max_age":1},
            {"path":"/a\b","max_age":1},{"path":"/%61","max_age":1},{"path":"/a b","max_age":1},
            {"path":"","max_age":1}]}"#,
        expect: &[
            ("routes[0].path", Code::INVALID_ROUTE_PATH),
            ("routes[1].path", Code::INVALID_ROUTE_PATH),
            ("routes[2].path", Code::INVALID_ROUTE_PATH),
            ("routes[3].path", Code::INVALID_ROUTE_PATH),
            ("routes[4].path", Code::INVALID_ROUTE_PATH),
            ("routes[5].path", Code::INVALID_ROUTE_PATH),
            ("routes[6].path", Code::INVALID_ROUTE_PATH),
            ("routes[7].path", Code::INVALID_ROUTE_PATH),
            ("routes[8].path", Code::INVALID_ROUTE_PATH),
            ("routes[9].path", Code::INVALID_ROUTE_PATH),
        ],
        accepted: false,
    },
    Case {
        name: "findings_sort_by_route_after_the_policys_own",
        policy: r#"{"allowed_origins":["null"],"routes":[
            {"path":"/b/","max_age":9000,"allowed_origins":["null"]},
            {"path":"/a/","allowed_headers":["*"]},
            {"path":"/a/"}]}"#,
        expect: &[
            ("allowed_origins[0]", Code::NULL_ORIGIN),
            ("routes[0].allowed_origins[0]", Code::NULL_ORIGIN),
            ("routes[0].max_age", Code::MAX_AGE_ABOVE_BROWSER_CAP),
            (
                "routes[1].allowed_headers",
                Code::WILDCARD_HEADERS_EXCLUDE_AUTHORIZATION,
            ),
            ("routes[2]", Code::ROUTE_OVERRIDES_NOTHING),
            ("routes[2].path", Code::DUPLICATE_ROUTE),
        ],
        accepted: false,
    },
];

fn spec(json: &str) -> PolicySpec {
    let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
    if value.get("service").is_none() {
        value["service"] = "svc".into();
    }
    serde_json::from_value(value).unwrap()
}

#[test]
fn lint_cases() {
    let mut failures = Vec::new();
    for case in CASES {
        let spec = spec(case.policy);
        let (policy, findings) = lint(&spec);
        let got: Vec<(&str, Code)> = findings
            .iter()
            .map(|f| (f.field.as_str(), f.code))
            .collect();
        let mut problems = Vec::new();
        if got != case.expect {
            problems.push(format!("findings {got:?}, want {:?}", case.expect));
        }
        for f in &findings {
            if f.severity != f.code.severity() || f.message.is_empty() {
                problems.push(format!("bad finding {f:?}"));
            }
        }
        if policy.is_some() != case.accepted {
            problems.push(format!(
                "accepted {}, want {}",
                policy.is_some(),
                case.accepted
            ));
        }
        let all_codes: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        if Policy::check(&spec, &all_codes).is_ok() != case.accepted {
            problems.push("check() disagrees with lint()".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} lint cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn risks_must_be_acknowledged_by_code() {
    let spec = spec(r#"{"allowed_origins":["null","https://*.github.io"]}"#);
    let refused = Policy::check(&spec, &[] as &[&str]).unwrap_err();
    assert!(refused.only_risks());
    let codes: Vec<Code> = refused.blocking.iter().map(|f| f.code).collect();
    assert_eq!(
        codes,
        [Code::NULL_ORIGIN, Code::WILDCARD_UNDER_PUBLIC_SUFFIX]
    );

    let refused = Policy::check(&spec, &["NULL_ORIGIN"]).unwrap_err();
    assert_eq!(refused.blocking.len(), 1);
    assert_eq!(refused.blocking[0].field, "allowed_origins[1]");

    let ok = Policy::check(&spec, &["NULL_ORIGIN", "WILDCARD_UNDER_PUBLIC_SUFFIX"]).unwrap();
    assert_eq!(
        ok.findings.len(),
        2,
        "acknowledged risks are still reported"
    );
    assert!(ok.findings.iter().all(|f| f.severity == Severity::Risk));
}

#[test]
fn errors_cannot_be_acknowledged() {
    let spec = spec(r#"{"allowed_origins":["*"],"allow_credentials":true}"#);
    let refused = Policy::check(&spec, &["WILDCARD_WITH_CREDENTIALS"]).unwrap_err();
    assert!(!refused.only_risks());
    assert!(
        refused.to_string().contains("allowed_origins[0]"),
        "{refused}"
    );
}

#[test]
fn canonical_policy_is_stable() {
    let spec = spec(
        r#"{"allowed_origins":["HTTPS://App.Example.com:443","https://*.Example.com","https://app.example.com"],
        "allowed_headers":["X-A","x-a"],"allowed_methods":["PUT"]}"#,
    );
    let policy = Policy::check(&spec, &[] as &[&str]).unwrap().policy;
    assert_eq!(
        policy.spec().allowed_origins,
        ["https://app.example.com", "https://*.example.com"]
    );
    assert_eq!(policy.spec().allowed_headers, ["X-A"]);
    // Validating the canonical form again changes nothing.
    let again = Policy::check(policy.spec(), &[] as &[&str]).unwrap().policy;
    assert_eq!(again, policy);
}

#[test]
fn a_policy_without_routes_is_stored_as_before() {
    // Stored policies and audit hashes hold this JSON: a policy without routes must not
    // change it.
    let plain = spec(r#"{"allowed_origins":["https://a.com"],"max_age":5}"#);
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"service":"svc","allowed_origins":["https://a.com"],"allowed_methods":[],"allowed_headers":[],"exposed_headers":[],"allow_credentials":false,"max_age":5,"allow_private_network":false,"mode":"standard"}"#
    );
    let with_route = spec(
        r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/api/","allow_credentials":true}]}"#,
    );
    let json = serde_json::to_string(&with_route).unwrap();
    assert!(
        json.ends_with(
            r#""mode":"standard","routes":[{"path":"/api/","allow_credentials":true}]}"#
        ),
        "{json}"
    );
    assert_eq!(
        serde_json::from_str::<PolicySpec>(&json).unwrap(),
        with_route
    );
    let unknown = r#"{"service":"svc","routes":[{"path":"/a/","allowed_origin":["x"]}]}"#;
    assert!(serde_json::from_str::<PolicySpec>(unknown).is_err());
}

#[test]
fn canonical_routes_are_stable() {
    let spec = spec(
        r#"{"allowed_origins":["https://a.com"],"routes":[{"path":"/api/",
            "allowed_origins":["HTTPS://B.com:443","https://b.com"],"allowed_headers":["X-A","x-a"]}]}"#,
    );
    let policy = Policy::check(&spec, &[] as &[&str]).unwrap().policy;
    let route = &policy.spec().routes[0];
    assert_eq!(
        route.allowed_origins.as_deref(),
        Some(&["https://b.com".to_owned()][..])
    );
    assert_eq!(
        route.allowed_headers.as_deref(),
        Some(&["X-A".to_owned()][..])
    );
    assert_eq!(route.allowed_methods, None);
    let again = Policy::check(policy.spec(), &[] as &[&str]).unwrap().policy;
    assert_eq!(again, policy);
    // A route's effective rules: its own fields, the policy's for the rest.
    let effective = policy.spec().effective(0).unwrap();
    assert_eq!(effective.allowed_origins, ["https://b.com"]);
    assert_eq!(effective.allowed_headers, ["X-A"]);
    assert!(effective.routes.is_empty());
    assert!(policy.spec().effective(1).is_none());
}

#[test]
fn limits_are_enforced() {
    let many: Vec<String> = (0..20_001)
        .map(|i| format!("https://h{i}.example.com"))
        .collect();
    let spec = PolicySpec {
        service: "svc".into(),
        allowed_origins: many,
        ..PolicySpec::default()
    };
    let (_, findings) = lint(&spec);
    assert_eq!(findings[0].code, Code::TOO_MANY_ENTRIES);
    assert_eq!(findings[0].field, "allowed_origins");

    let headers: Vec<String> = (0..300).map(|i| format!("x-{i}")).collect();
    let spec = PolicySpec {
        service: "svc".into(),
        allowed_headers: headers,
        ..PolicySpec::default()
    };
    let (policy, findings) = lint(&spec);
    assert!(policy.is_none());
    assert!(
        findings
            .iter()
            .any(|f| f.code == Code::TOO_MANY_ENTRIES && f.field == "allowed_headers")
    );

    let long = format!("x-{}", "a".repeat(300));
    let spec = PolicySpec {
        service: "svc".into(),
        allowed_headers: vec![long],
        ..PolicySpec::default()
    };
    assert!(lint(&spec).1.iter().any(|f| f.code == Code::INVALID_HEADER));

    let big: Vec<String> = (0..15_000)
        .map(|i| format!("https://{}{i}.example.com", "h".repeat(60)))
        .collect();
    let spec = PolicySpec {
        service: "svc".into(),
        allowed_origins: big,
        ..PolicySpec::default()
    };
    assert!(
        lint(&spec)
            .1
            .iter()
            .any(|f| f.code == Code::POLICY_TOO_LARGE)
    );

    let route = |path: String| corsair_policy::RouteSpec {
        path,
        max_age: Some(1),
        ..Default::default()
    };
    let spec = PolicySpec {
        service: "svc".into(),
        routes: (0..1001).map(|i| route(format!("/r{i}/"))).collect(),
        ..PolicySpec::default()
    };
    let (policy, findings) = lint(&spec);
    assert!(policy.is_none());
    assert!(
        findings
            .iter()
            .any(|f| f.code == Code::TOO_MANY_ENTRIES && f.field == "routes")
    );
    let spec = PolicySpec {
        service: "svc".into(),
        routes: (0..1000).map(|i| route(format!("/r{i}/"))).collect(),
        ..PolicySpec::default()
    };
    assert!(lint(&spec).0.is_some());

    let spec = PolicySpec {
        service: "svc".into(),
        routes: vec![route(format!("/{}", "a".repeat(1024)))],
        ..PolicySpec::default()
    };
    assert_eq!(lint(&spec).1[1].code, Code::INVALID_ROUTE_PATH);

    // Route entries count toward the size of the policy.
    let big: Vec<String> = (0..9_000)
        .map(|i| format!("https://{}{i}.example.com", "h".repeat(60)))
        .collect();
    let spec = PolicySpec {
        service: "svc".into(),
        allowed_origins: big.clone(),
        routes: vec![corsair_policy::RouteSpec {
            path: "/a/".into(),
            allowed_origins: Some(big),
            ..Default::default()
        }],
        ..PolicySpec::default()
    };
    assert!(
        lint(&spec)
            .1
            .iter()
            .any(|f| f.code == Code::POLICY_TOO_LARGE)
    );
}
