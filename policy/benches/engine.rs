//! Hot-path benchmarks of the compiled engine: what one request costs the sidecar.
//! Run with `cargo bench -p corsair-policy`; figures are recorded in BENCHMARKS.md.

use std::hint::black_box;

use corsair_policy::{CompiledPolicy, Policy, PolicySpec, Request, RouteSpec};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};

fn compile(spec: PolicySpec) -> CompiledPolicy {
    let acknowledged: Vec<&str> = corsair_policy::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    CompiledPolicy::new(
        Policy::check(&spec, &acknowledged)
            .expect("bench policy is valid")
            .policy,
    )
}

/// The bench policy: credentials, two methods, two headers, over the given origins.
fn policy(allowed_origins: Vec<String>) -> CompiledPolicy {
    compile(PolicySpec {
        service: "bench".into(),
        allowed_origins,
        allowed_methods: vec!["PUT".into(), "DELETE".into()],
        allowed_headers: vec!["content-type".into(), "x-request-id".into()],
        exposed_headers: vec!["x-total".into()],
        allow_credentials: true,
        max_age: Some(600),
        ..PolicySpec::default()
    })
}

fn small_policy() -> CompiledPolicy {
    policy(vec!["https://app.example.com".into()])
}

/// 10,000 exact origins and 1,000 wildcard domains.
fn large_policy() -> CompiledPolicy {
    let mut origins: Vec<String> = (0..10_000)
        .map(|i| format!("https://app{i}.customer{i}.com"))
        .collect();
    origins.extend((0..1_000).map(|i| format!("https://*.tenant{i}.example.net")));
    origins.push("https://app.example.com".into());
    policy(origins)
}

/// The bench policy with 100 routes: 50 prefixes (`/api/v{i}/`) with origins and
/// credentials of their own, 50 exact paths (`/public/{i}/status`) open to any origin.
fn routed_policy() -> CompiledPolicy {
    let routes = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                RouteSpec {
                    path: format!("/api/v{i}/"),
                    allowed_origins: Some(vec![
                        "https://app.example.com".into(),
                        format!("https://partner{i}.example.org"),
                    ]),
                    allow_credentials: Some(true),
                    ..RouteSpec::default()
                }
            } else {
                RouteSpec {
                    path: format!("/public/{i}/status"),
                    allowed_origins: Some(vec!["*".into()]),
                    allow_credentials: Some(false),
                    ..RouteSpec::default()
                }
            }
        })
        .collect();
    compile(PolicySpec {
        routes,
        ..small_policy().policy().spec().clone()
    })
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.append(*name, HeaderValue::from_str(value).unwrap());
    }
    h
}

fn decide(c: &mut Criterion, name: &str, engine: &CompiledPolicy, method: &Method, h: &HeaderMap) {
    c.bench_function(name, |b| {
        b.iter(|| black_box(engine.decide(&Request::new(black_box(method), black_box(h)))))
    });
}

fn decide_path(
    c: &mut Criterion,
    name: &str,
    engine: &CompiledPolicy,
    method: &Method,
    h: &HeaderMap,
    path: &str,
) {
    c.bench_function(name, |b| {
        b.iter(|| {
            black_box(
                engine.decide(
                    &Request::new(black_box(method), black_box(h)).with_path(black_box(path)),
                ),
            )
        })
    });
}

fn benches(c: &mut Criterion) {
    let small = small_policy();
    let large = large_policy();

    let actual = headers(&[("origin", "https://app.example.com"), ("accept", "*/*")]);
    decide(c, "allowed_actual/1_origin", &small, &Method::GET, &actual);
    decide(
        c,
        "allowed_actual/11k_origins",
        &large,
        &Method::GET,
        &actual,
    );
    let routed = routed_policy();
    decide_path(
        c,
        "allowed_actual/100_routes",
        &routed,
        &Method::GET,
        &actual,
        "/api/v42/items/7?page=2",
    );
    decide_path(
        c,
        "denied_actual/100_routes_ambiguous_path",
        &routed,
        &Method::GET,
        &actual,
        "/api/v42/..%2F..%2Fpublic/43/status",
    );
    // The most work a path can ask for: 2 KiB, not plain, every reading under one route.
    let hostile_path = format!("/api/v42/{}", "a;b/c%41\\d%2F/".repeat(150));
    decide_path(
        c,
        "actual/100_routes_hostile_2k_path",
        &routed,
        &Method::GET,
        &actual,
        &hostile_path[..2040],
    );
    let tenant = headers(&[("origin", "https://eu.shop.tenant977.example.net")]);
    decide(
        c,
        "allowed_actual/11k_origins_wildcard_hit",
        &large,
        &Method::GET,
        &tenant,
    );

    // Decision plus writing it into a typical upstream response.
    // A fresh upstream response each time (its `Vary` needs merging); cloning it is not timed.
    c.bench_function("allowed_actual_and_apply/1_origin", |b| {
        let upstream = headers(&[
            ("content-type", "application/json"),
            ("content-length", "42"),
            ("vary", "Accept-Encoding"),
        ]);
        b.iter_batched_ref(
            || upstream.clone(),
            |response| {
                let d = small.decide(&Request::new(&Method::GET, black_box(&actual)));
                d.headers.unwrap().apply(response);
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let rejected = headers(&[
        ("origin", "https://evil.example.org"),
        ("access-control-request-method", "PUT"),
    ]);
    decide(
        c,
        "rejected_preflight/1_origin",
        &small,
        &Method::OPTIONS,
        &rejected,
    );
    decide(
        c,
        "rejected_preflight/11k_origins",
        &large,
        &Method::OPTIONS,
        &rejected,
    );

    let normal = headers(&[
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "PUT"),
        (
            "access-control-request-headers",
            "content-type,x-request-id",
        ),
    ]);
    decide(
        c,
        "allowed_preflight/normal_acrh",
        &small,
        &Method::OPTIONS,
        &normal,
    );
    let hostile_value = "x-aaaaaaaaaaaaaaaaaaaaaaaaaaa, ".repeat(8192 / 31);
    let hostile = headers(&[
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "PUT"),
        (
            "access-control-request-headers",
            &hostile_value[..8192.min(hostile_value.len())],
        ),
    ]);
    decide(
        c,
        "preflight/hostile_8k_acrh",
        &small,
        &Method::OPTIONS,
        &hostile,
    );
    let hostile_lines = {
        let mut h = headers(&[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "PUT"),
        ]);
        for _ in 0..256 {
            h.append(
                "access-control-request-headers",
                HeaderValue::from_static("content-type, x-a"),
            );
        }
        h
    };
    decide(
        c,
        "preflight/hostile_256_acrh_lines",
        &small,
        &Method::OPTIONS,
        &hostile_lines,
    );
}

criterion_group!(engine, benches);
criterion_main!(engine);
