//! Origin sets: their own validation, and policies that reference them.

use std::collections::HashMap;
use std::sync::Arc;

use corsair_policy::{
    Code, CompiledPolicy, OriginSet, OriginSetSpec, Policy, PolicySpec, Reason, Request, lint_set,
    lint_with_sets,
};
use http::{HeaderMap, HeaderValue, Method};

fn set(name: &str, origins: &[&str]) -> Arc<OriginSet> {
    let (set, findings) = lint_set(&OriginSetSpec {
        name: name.into(),
        description: String::new(),
        origins: origins.iter().map(|s| s.to_string()).collect(),
    });
    set.unwrap_or_else(|| panic!("set {name} is valid: {findings:?}"))
}

fn policy(origins: &[&str]) -> PolicySpec {
    PolicySpec {
        service: "shop".into(),
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        ..PolicySpec::default()
    }
}

fn codes(findings: &[corsair_policy::Finding]) -> Vec<(String, Code)> {
    findings.iter().map(|f| (f.field.clone(), f.code)).collect()
}

fn sets(list: &[Arc<OriginSet>]) -> HashMap<String, Arc<OriginSet>> {
    list.iter()
        .map(|s| (s.name().to_owned(), s.clone()))
        .collect()
}

#[test]
fn a_set_refuses_wildcards_references_and_bad_names() {
    let (set, findings) = lint_set(&OriginSetSpec {
        name: "Corp".into(),
        description: "x".repeat(2000),
        origins: vec![
            "https://a.example.com".into(),
            "*".into(),
            "set:other".into(),
            "https://a.example.com/".into(),
        ],
    });
    assert!(set.is_none());
    assert_eq!(
        codes(&findings),
        vec![
            ("name".into(), Code::INVALID_SET_NAME),
            ("description".into(), Code::DESCRIPTION_TOO_LONG),
            ("origins[1]".into(), Code::WILDCARD_IN_SET),
            ("origins[2]".into(), Code::INVALID_ORIGIN),
            ("origins[3]".into(), Code::INVALID_ORIGIN),
        ]
    );
}

#[test]
fn a_set_is_canonical_and_its_digest_follows_its_entries() {
    let a = set(
        "corp",
        &["HTTPS://App.Example.com", "https://app.example.com"],
    );
    assert_eq!(a.origins(), ["https://app.example.com"]);
    // Sorted: the order it was written in is not part of a set.
    assert_eq!(
        set("corp", &["https://b.example.com", "https://a.example.com"]).digest(),
        set("corp", &["https://a.example.com", "https://b.example.com"]).digest()
    );
    let b = set("corp", &["https://app.example.com"]);
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), set("corp", &["https://b.example.com"]).digest());
}

#[test]
fn an_unknown_or_malformed_reference_is_refused_with_its_field() {
    let known = sets(&[set("corp", &["https://a.example.com"])]);
    let lookup = |name: &str| known.get(name).cloned();
    let (policy, findings) = lint_with_sets(
        &policy(&["set:corp", "set:missing", "set:Bad_Name", "set:corp"]),
        &lookup,
    );
    assert!(policy.is_none());
    assert_eq!(
        codes(&findings),
        vec![
            ("allowed_origins[1]".into(), Code::UNKNOWN_ORIGIN_SET),
            ("allowed_origins[2]".into(), Code::INVALID_SET_NAME),
            ("allowed_origins[3]".into(), Code::DUPLICATE_ENTRY),
        ]
    );
    // Without any set known, a reference is never silently dropped.
    let (policy, findings) = corsair_policy::lint(&policy_spec_with("set:corp"));
    assert!(policy.is_none());
    assert_eq!(codes(&findings)[0].1, Code::UNKNOWN_ORIGIN_SET);
}

fn policy_spec_with(entry: &str) -> PolicySpec {
    policy(&[entry])
}

#[test]
fn a_sets_risks_must_be_acknowledged_by_its_referrers() {
    let known = sets(&[set(
        "partners",
        &["https://p.example.com", "null", "http://legacy.example.com"],
    )]);
    let lookup = |name: &str| known.get(name).cloned();
    let spec = policy(&["https://app.example.com", "set:partners"]);
    let refused = Policy::check_with_sets(&spec, &[] as &[&str], &lookup).unwrap_err();
    assert_eq!(
        codes(&refused.blocking),
        vec![
            ("allowed_origins[1]".into(), Code::NULL_ORIGIN),
            ("allowed_origins[1]".into(), Code::INSECURE_ORIGIN),
        ]
    );
    assert!(
        refused.blocking[0]
            .message
            .contains("origin set partners, origins[1]")
    );
    Policy::check_with_sets(&spec, &["NULL_ORIGIN", "INSECURE_ORIGIN"], &lookup).unwrap();
}

#[test]
fn plain_http_in_a_policy_is_a_risk_when_a_set_brings_https() {
    let known = sets(&[set("corp", &["https://a.example.com"])]);
    let lookup = |name: &str| known.get(name).cloned();
    let (_, findings) = lint_with_sets(&policy(&["http://localhost:3000", "set:corp"]), &lookup);
    assert_eq!(
        codes(&findings),
        vec![("allowed_origins[0]".into(), Code::INSECURE_ORIGIN)]
    );
}

#[test]
fn the_resolved_size_is_bounded() {
    let many: Vec<String> = (0..15_000)
        .map(|i| format!("https://a{i}.example.com"))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let known = sets(&[set("one", &refs), set("two", &refs[..6_000])]);
    let lookup = |name: &str| known.get(name).cloned();
    let (policy, findings) = lint_with_sets(&policy(&["set:one", "set:two"]), &lookup);
    assert!(policy.is_none());
    assert!(codes(&findings).contains(&("allowed_origins".into(), Code::TOO_MANY_ENTRIES)));
}

#[test]
fn the_engine_allows_a_sets_entries_and_names_where_they_came_from() {
    let known = sets(&[set(
        "corp",
        &[
            "https://checkout.example.com",
            "https://*.corp.example",
            "null",
        ],
    )]);
    let lookup = |name: &str| known.get(name).cloned();
    let spec = policy(&["https://app.example.com", "set:corp"]);
    let policy = Policy::check_with_sets(&spec, &["NULL_ORIGIN"], &lookup)
        .unwrap()
        .policy;
    assert_eq!(
        policy.effective_origins(),
        vec![
            ("https://app.example.com", None),
            ("https://*.corp.example", Some("corp")),
            ("https://checkout.example.com", Some("corp")),
            ("null", Some("corp")),
        ]
    );
    let engine = CompiledPolicy::new(policy);
    let decide = |origin: &str| {
        let mut h = HeaderMap::new();
        h.insert("origin", HeaderValue::from_str(origin).unwrap());
        let req = Request::new(&Method::GET, &h);
        let d = engine.decide(&req);
        (d.reason, engine.describe(&req, &d))
    };
    assert_eq!(
        decide("https://app.example.com").0,
        Reason::Allowed { entry: 0 }
    );
    let (reason, text) = decide("https://checkout.example.com");
    assert_eq!(reason, Reason::Allowed { entry: 1 });
    assert!(
        text.contains("(https://checkout.example.com, from set:corp)"),
        "{text}"
    );
    assert_eq!(
        engine.set_entry(1, "https://checkout.example.com"),
        Some("https://checkout.example.com")
    );
    assert_eq!(
        decide("https://eu.corp.example").0,
        Reason::Allowed { entry: 1 }
    );
    assert_eq!(
        engine.set_entry(1, "https://eu.corp.example"),
        Some("https://*.corp.example")
    );
    assert_eq!(decide("null").0, Reason::Allowed { entry: 1 });
    assert_eq!(engine.set_entry(1, "null"), Some("null"));
    assert_eq!(engine.set_entry(0, "https://app.example.com"), None);
    assert_eq!(decide("https://evil.example").0, Reason::OriginNotAllowed);
}

#[test]
fn a_route_may_take_its_origins_from_a_set() {
    let known = sets(&[set("partners", &["https://p.example.com"])]);
    let lookup = |name: &str| known.get(name).cloned();
    let spec = PolicySpec {
        routes: vec![corsair_policy::RouteSpec {
            path: "/partners/".into(),
            allowed_origins: Some(vec!["set:partners".into()]),
            ..Default::default()
        }],
        ..policy(&["https://app.example.com"])
    };
    assert_eq!(spec.origin_set_refs(), ["partners"]);
    // Unresolved, the route's reference is refused with its field.
    let (none, findings) = corsair_policy::lint(&spec);
    assert!(none.is_none());
    assert!(
        codes(&findings).contains(&(
            "routes[0].allowed_origins[0]".into(),
            Code::UNKNOWN_ORIGIN_SET
        )),
        "{findings:?}"
    );
    let policy = Policy::check_with_sets(&spec, &[] as &[&str], &lookup)
        .unwrap()
        .policy;
    assert_eq!(policy.all_sets().count(), 1);
    let engine = CompiledPolicy::new(policy);
    let allowed = |origin: &str, path: &str| {
        let mut h = HeaderMap::new();
        h.insert("origin", HeaderValue::from_str(origin).unwrap());
        let req = Request::new(&Method::GET, &h).with_path(path);
        let d = engine.decide(&req);
        (d.allowed, engine.describe(&req, &d))
    };
    let (ok, text) = allowed("https://p.example.com", "/partners/orders");
    assert!(ok, "{text}");
    assert!(text.contains("from set:partners"), "{text}");
    assert!(!allowed("https://p.example.com", "/orders").0);
    assert!(!allowed("https://app.example.com", "/partners/orders").0);
    assert!(allowed("https://app.example.com", "/orders").0);
}
