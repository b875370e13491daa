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
}
