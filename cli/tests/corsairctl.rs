//! The real `corsairctl` binary against a real control plane (and, for fleet status, a real
//! sidecar): exit codes, idempotence, compare-and-set, errors, audit filters.

mod support;

use support::{ControlPlane, ctl, spawn_plain, wait_until};

const SHOP_AND_WEB: &str = "\
service: shop
allowed_origins: [https://shop.example.com]
allowed_methods: [PUT]
---
service: web
allowed_origins: [https://web.example.com]
mode: enforce
";

const SHOP_WIDER: &str = "\
service: shop
allowed_origins: [https://shop.example.com, https://admin.example.com]
allowed_methods: [PUT]
";

fn revision(cp: &ControlPlane, service: &str) -> i64 {
    cp.json(&["policy", "get", service])["revision"]
        .as_i64()
        .unwrap()
}

fn audit_count(cp: &ControlPlane, filters: &[&str]) -> usize {
    cp.json(&[&["audit", "list"], filters].concat())
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn apply_diff_and_dry_run_exit_codes_and_idempotent_reapply() {
    let cp = ControlPlane::start();
    let both = cp.file("policies.yaml", SHOP_AND_WEB);

    // Nothing stored yet: diff shows two creations and exits 1.
    let diff = cp.ctl(&["policy", "diff", "-f", &both]);
    assert_eq!(diff.code, 1, "{diff:?}");
    assert!(diff.stdout.contains("+++ services/shop/policy"), "{diff:?}");
    assert!(diff.stdout.contains("+++ services/web/policy"), "{diff:?}");
    assert!(
        diff.stdout.contains("+- https://web.example.com"),
        "{diff:?}"
    );

    // A dry run is checked by the server and stores (and audits) nothing.
    let dry = cp.ctl(&["policy", "apply", "-f", &both, "--dry-run"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(
        dry.stdout
            .contains("services/shop/policy would be created (dry run)"),
        "{dry:?}"
    );
    assert_eq!(cp.json(&["policy", "list"]), serde_json::json!([]));
    // Only the first start's admin token is in the log.
    assert_eq!(audit_count(&cp, &[]), 1);

    let applied = cp.ctl(&["policy", "apply", "-f", &both, "--reason", "first"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    assert!(
        applied
            .stdout
            .contains("services/shop/policy created (revision 1)"),
        "{applied:?}"
    );
    assert!(
        applied
            .stdout
            .contains("services/web/policy created (revision 2)"),
        "{applied:?}"
    );

    // Applying the same files again writes nothing: no revision, no audit event.
    let diff = cp.ctl(&["policy", "diff", "-f", &both]);
    assert_eq!((diff.code, diff.stdout.as_str()), (0, ""), "{diff:?}");
    let again = cp.ctl(&["policy", "apply", "-f", &both]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains("services/shop/policy unchanged")
            && again.stdout.contains("services/web/policy unchanged"),
        "{again:?}"
    );
    assert_eq!((revision(&cp, "shop"), revision(&cp, "web")), (1, 2));
    assert_eq!(audit_count(&cp, &["--service", "shop"]), 1);
    assert_eq!(audit_count(&cp, &["--service", "web"]), 1);

    // One field changes: diff says so, apply writes only that policy.
    let wider = cp.file("shop.yaml", SHOP_WIDER);
    let diff = cp.ctl(&["policy", "diff", "-f", &wider]);
    assert_eq!(diff.code, 1, "{diff:?}");
    assert!(
        diff.stdout.contains("+- https://admin.example.com"),
        "{diff:?}"
    );
    let out = cp.ctl(&["policy", "apply", "-f", &wider]);
    assert!(
        out.stdout
            .contains("services/shop/policy updated (revision 3): allowed_origins"),
        "{out:?}"
    );

    // Standard input and JSON, the format `get -o json` prints, applied back unchanged.
    let shop = cp.ctl(&["policy", "get", "shop", "-o", "json"]).stdout;
    let back = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &shop);
    assert_eq!(back.code, 0, "{back:?}");
    assert!(back.stdout.contains("unchanged"), "{back:?}");

    // A directory is every policy file in it.
    let dir = cp.dir.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("a.json"), r#"[{"service": "api"}]"#).unwrap();
    std::fs::write(dir.join("b.yml"), "service: docs\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "not a policy").unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("services/api/policy created")
            && out.stdout.contains("services/docs/policy created"),
        "{out:?}"
    );
}

#[test]
fn errors_name_the_field_and_exit_non_zero() {
    let cp = ControlPlane::start();
    let bad = cp.file(
        "bad.yaml",
        "service: shop\nallowed_origins: [https://a.example.com, https://b.example.com, 'https://x.example.com/path']\n",
    );
    let out = cp.ctl(&["policy", "apply", "-f", &bad]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("  allowed_origins[2]: ") && out.stderr.contains("[INVALID_ORIGIN]"),
        "{out:?}"
    );
    // diff reports errors with status 2, distinct from "changes".
    let out = cp.ctl(&["policy", "diff", "-f", &bad]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("allowed_origins[2]"), "{out:?}");

    // A misspelt field is caught before anything is sent, naming the file and the field.
    let typo = cp.file(
        "typo.yaml",
        "service: shop\nallowed_origin: [https://a.example.com]\n",
    );
    let out = cp.ctl(&["policy", "apply", "-f", &typo]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("typo.yaml") && out.stderr.contains("allowed_origin"),
        "{out:?}"
    );

    // A risk must be acknowledged by its code.
    let risky = cp.file("risky.yaml", "service: shop\nallowed_origins: ['null']\n");
    let out = cp.ctl(&["policy", "apply", "-f", &risky]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--acknowledge NULL_ORIGIN"), "{out:?}");
    let out = cp.ctl(&[
        "policy",
        "apply",
        "-f",
        &risky,
        "--acknowledge",
        "NULL_ORIGIN",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("acknowledged risk"), "{out:?}");
    // Once stored, the same policy is unchanged without acknowledging its risk again.
    let out = cp.ctl(&["policy", "apply", "-f", &risky]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("unchanged"), "{out:?}");
    assert_eq!(cp.ctl(&["policy", "diff", "-f", &risky]).code, 0);

    // A service defined twice is refused before anything is sent.
    let twice = cp.file("twice.yaml", "service: a\n---\nservice: a\n");
    let out = cp.ctl(&["policy", "diff", "-f", &twice]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("defined twice"), "{out:?}");

    // Not found, and an unreachable control plane.
    let out = cp.ctl(&["policy", "get", "nothing"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("services/nothing/policy"), "{out:?}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let out = ctl(&["--addr", &addr, "policy", "list"], None);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("cannot reach the control plane"),
        "{out:?}"
    );
    let out = ctl(&["--addr", &addr, "policy", "diff", "-f", &risky], None);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn a_stale_etag_is_refused_clearly() {
    let cp = ControlPlane::start();
    let shop = cp.file("shop.yaml", SHOP_AND_WEB.split("---").next().unwrap());
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &shop]).code, 0);

    // Someone saves the policy (with its etag) to edit it…
    let saved = cp.ctl(&["policy", "get", "shop", "-o", "yaml"]).stdout;
    assert!(saved.contains("etag:"), "{saved}");
    // …someone else changes it meanwhile…
    let wider = cp.file("wider.yaml", SHOP_WIDER);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &wider]).code, 0);
    // …and the first edit, made on the old version, is refused rather than lost.
    let edited = saved.replace("mode: standard", "mode: enforce");
    assert_ne!(edited, saved);
    let out = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &edited);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("changed by someone else since it was read"),
        "{out:?}"
    );
    assert_eq!(cp.json(&["policy", "get", "shop"])["mode"], "standard");
}

const ROUTED: &str = "\
service: shop
allowed_origins: [https://shop.example.com]
routes:
  - path: /public/
    allowed_origins: [\"*\"]
  - path: /api/
    allowed_origins: [https://admin.example.com]
    allow_credentials: true
";

#[test]
fn routes_apply_show_diff_and_explain() {
    let cp = ControlPlane::start();
    let routed = cp.file("routed.yaml", ROUTED);
    let applied = cp.ctl(&["policy", "apply", "-f", &routed, "--reason", "routes"]);
    assert_eq!(applied.code, 0, "{applied:?}");

    // `get` shows the routes, with only the fields each sets, and what it prints applies back
    // unchanged.
    let yaml = cp.ctl(&["policy", "get", "shop", "-o", "yaml"]);
    assert!(
        yaml.stdout
            .contains("routes:\n- path: /public/\n  allowed_origins:\n  - \"*\"\n- path: /api/\n"),
        "{yaml:?}"
    );
    let json = cp.json(&["policy", "get", "shop"]);
    assert_eq!(json["routes"][1]["allow_credentials"], true);
    assert!(
        json["routes"][0].get("allow_credentials").is_none(),
        "{json}"
    );
    let table = cp.ctl(&["policy", "get", "shop"]);
    assert!(
        table.stdout.lines().next().unwrap().contains("ROUTES"),
        "{table:?}"
    );
    let again = cp.file("again.yaml", &yaml.stdout);
    let out = cp.ctl(&["policy", "apply", "-f", &again]);
    assert!(out.stdout.contains("unchanged"), "{out:?}");

    // A change to a route is a change of `routes`, shown in the diff and the history.
    let edited = cp.file(
        "edited.yaml",
        &ROUTED.replace(
            "allow_credentials: true",
            "allow_credentials: true\n    max_age: 60",
        ),
    );
    let diff = cp.ctl(&["policy", "diff", "-f", &edited]);
    assert_eq!(diff.code, 1, "{diff:?}");
    assert!(diff.stdout.contains("+  max_age: 60"), "{diff:?}");
    let out = cp.ctl(&["policy", "apply", "-f", &edited, "--reason", "cache"]);
    assert!(out.stdout.contains(": routes"), "{out:?}");

    // Explain picks the route by the path, and says which.
    let explain = |path: &str, origin: &str| {
        cp.json(&[
            "policy",
            "explain",
            "--service",
            "shop",
            "--origin",
            origin,
            "--path",
            path,
        ])
    };
    let public = explain("/public/logo.png", "https://evil.example");
    assert_eq!(public["decision"], "ALLOWED");
    assert_eq!(public["route"], "/public/");
    let api = explain("/api/orders?page=2", "https://admin.example.com");
    assert_eq!(api["decision"], "ALLOWED");
    assert_eq!(api["route"], "/api/");
    let own = explain("/", "https://shop.example.com");
    assert_eq!(own["decision"], "ALLOWED");
    assert!(own.get("route").is_none(), "{own}");
    let sneaky = explain("/public/..%2Fapi/orders", "https://admin.example.com");
    assert_eq!(sneaky["decision"], "DENIED");
    assert!(
        sneaky["reason"].as_str().unwrap().contains("reads as"),
        "{sneaky}"
    );
    let table = cp.ctl(&[
        "policy",
        "explain",
        "--service",
        "shop",
        "--origin",
        "https://evil.example",
        "--path",
        "/public/x",
    ]);
    assert!(
        table
            .stdout
            .starts_with("decision:  ALLOWED\nrequest:   ACTUAL\nroute:     /public/\n"),
        "{table:?}"
    );

    // A bad route is refused with its field path.
    let bad = cp.file(
        "bad.yaml",
        &ROUTED.replace("path: /api/", "path: /api/../admin/"),
    );
    let out = cp.ctl(&["policy", "apply", "-f", &bad]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("routes[1].path") && out.stderr.contains("INVALID_ROUTE_PATH"),
        "{out:?}"
    );
}

#[test]
fn history_rollback_delete_and_explain() {
    let cp = ControlPlane::start();
    let shop = cp.file("shop.yaml", SHOP_AND_WEB.split("---").next().unwrap());
    let wider = cp.file("wider.yaml", SHOP_WIDER);
    assert_eq!(
        cp.ctl(&["policy", "apply", "-f", &shop, "--reason", "v1"])
            .code,
        0
    );
    assert_eq!(
        cp.ctl(&["policy", "apply", "-f", &wider, "--reason", "v2"])
            .code,
        0
    );

    // An unknown service's history fails as `policy get` of it does, not as an empty table.
    let get = cp.ctl(&["policy", "get", "nobody"]);
    let unknown = cp.ctl(&["policy", "history", "nobody"]);
    assert_eq!((get.code, unknown.code), (1, 1), "{get:?} {unknown:?}");
    assert!(unknown.stdout.is_empty(), "{unknown:?}");
    assert!(
        unknown.stderr.contains("services/nobody/policy") && unknown.stderr.contains("no policy"),
        "{unknown:?}"
    );

    let history = cp.ctl(&["policy", "history", "shop"]);
    let lines: Vec<&str> = history.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{history:?}");
    assert!(lines[0].starts_with("REVISION"), "{history:?}");
    assert!(
        lines[1].starts_with("2 ")
            && lines[1].contains("allowed_origins")
            && lines[1].ends_with("v2"),
        "{history:?}"
    );
    assert!(
        lines[2].starts_with("1 ") && lines[2].contains("created"),
        "{history:?}"
    );

    // Explain, against the stored policy.
    let explain = |origin: &str| {
        cp.json(&[
            "policy",
            "explain",
            "--service",
            "shop",
            "--origin",
            origin,
            "--method",
            "PUT",
        ])
    };
    let allowed = explain("https://admin.example.com");
    assert_eq!(allowed["decision"], "ALLOWED");
    assert_eq!(allowed["kind"], "PREFLIGHT");
    assert_eq!(allowed["status"], 204);
    assert!(
        allowed["headers"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({
                "name": "access-control-allow-origin",
                "value": "https://admin.example.com"
            })),
        "{allowed}"
    );

    let out = cp.ctl(&[
        "policy", "rollback", "shop", "--to", "1", "--reason", "back",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("now at revision 3"), "{out:?}");
    assert_eq!(explain("https://admin.example.com")["decision"], "DENIED");
    let table = cp.ctl(&[
        "policy",
        "explain",
        "--service",
        "shop",
        "--origin",
        "https://admin.example.com",
    ]);
    assert!(
        table
            .stdout
            .starts_with("decision:  DENIED\nrequest:   ACTUAL"),
        "{table:?}"
    );

    let out = cp.ctl(&["policy", "delete", "shop", "--dry-run"]);
    assert!(out.stdout.contains("would be deleted"), "{out:?}");
    assert_eq!(revision(&cp, "shop"), 3);
    let out = cp.ctl(&["policy", "delete", "shop", "--reason", "gone"]);
    assert!(out.stdout.contains("deleted (revision 4)"), "{out:?}");
    assert_eq!(cp.ctl(&["policy", "get", "shop"]).code, 1);
    let history = cp.json(&["policy", "history", "shop"]);
    assert_eq!(history[0]["change"], "deleted");
    assert_eq!(history[0]["reason"], "gone");
}

#[test]
fn audit_list_filters_and_follows() {
    let cp = ControlPlane::start();
    let both = cp.file("policies.yaml", SHOP_AND_WEB);
    let wider = cp.file("wider.yaml", SHOP_WIDER);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &both]).code, 0);
    assert_eq!(
        cp.ctl(&["policy", "apply", "-f", &wider, "--reason", "admin"])
            .code,
        0
    );
    // A delete on a stale etag is refused, and audited as a conflict.
    let out = cp.ctl(&["policy", "delete", "web", "--etag", "\"stale\""]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("changed by someone else"), "{out:?}");

    let all = cp.json(&["audit", "list"]);
    let sequences: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    // 1 is the first start's admin token.
    assert_eq!(sequences, [5, 4, 3, 2, 1], "newest first");
    assert_eq!(audit_count(&cp, &["--service", "shop"]), 2);
    assert_eq!(audit_count(&cp, &["--service", "web"]), 2);
    assert_eq!(audit_count(&cp, &["--actor", "bootstrap-admin"]), 4);
    assert_eq!(audit_count(&cp, &["--actor", "someone-else"]), 0);
    assert_eq!(audit_count(&cp, &["--method", "UpdatePolicy"]), 1);
    assert_eq!(audit_count(&cp, &["--outcome", "ok"]), 4);
    assert_eq!(audit_count(&cp, &["--outcome", "conflict"]), 1);
    assert_eq!(audit_count(&cp, &["--since", "1h"]), 5);
    assert_eq!(audit_count(&cp, &["--until", "2000-01-01T00:00:00Z"]), 0);
    assert_eq!(audit_count(&cp, &["--limit", "2"]), 2);
    let shop_update = &cp.json(&["audit", "list", "--method", "UpdatePolicy"])[0];
    assert_eq!(shop_update["reason"], "admin");
    assert_eq!(
        shop_update["changed_fields"],
        serde_json::json!(["allowed_origins"])
    );
    let table = cp.ctl(&["audit", "list", "--service", "shop"]).stdout;
    assert!(table.starts_with("SEQ  TIME"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().contains("UpdatePolicy"),
        "{table}"
    );

    let out = cp.ctl(&["audit", "verify"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("5 events"), "{out:?}");

    // --follow: the listing, oldest first, then each new matching event as it happens.
    let follow = spawn_plain(
        std::path::Path::new(support::CTL),
        &[
            "--addr",
            &cp.addr,
            "--token",
            support::ADMIN_TOKEN,
            "audit",
            "list",
            "--service",
            "web",
            "--follow",
            "-o",
            "json",
        ],
    );
    let next =
        || -> serde_json::Value { serde_json::from_str(&follow.next_line().unwrap()).unwrap() };
    assert_eq!(next()["sequence"], 3);
    assert_eq!(next()["sequence"], 5);
    let web_v2 = cp.file(
        "web2.yaml",
        "service: web\nallowed_origins: [https://new.example.com]\n",
    );
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &web_v2]).code, 0);
    let next = next();
    assert_eq!(next["sequence"], 6);
    assert_eq!(next["service"], "web");
    assert_eq!(next["method"], "corsair.v1.PolicyService/UpdatePolicy");
}

#[test]
fn fleet_status_shows_a_live_sidecar() {
    let cp = ControlPlane::start();
    let shop = cp.file("shop.yaml", SHOP_AND_WEB.split("---").next().unwrap());
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &shop]).code, 0);

    let token = cp.token("shop-1", "sidecar", &["shop"]);
    let mut sidecar = support::shop_sidecar(
        &cp.addr,
        &["--sidecar-id", "shop-1"],
        &[("CORSAIR_TOKEN", &token)],
    );
    sidecar.wait_for_log("sidecar listening");
    // The sidecar ACKs revision 1 right after applying it; wait for the control plane to
    // record that.
    wait_until("the sidecar is SYNCED", || {
        cp.json(&["fleet", "status"])[0]["state"] == "SYNCED"
    });
    let row = cp.json(&["fleet", "status"])[0].clone();
    assert_eq!(row["sidecar_id"], "shop-1");
    assert_eq!(row["services"], serde_json::json!(["shop"]));
    assert_eq!(row["last_acked_revision"], 1);
    let table = cp.ctl(&["fleet", "status"]).stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SIDECAR  SERVICES  STATE   SENT  ACKED"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("shop-1   shop      SYNCED  1     1"),
        "{table}"
    );
    assert_eq!(
        cp.json(&["fleet", "status", "--state", "nacked"]),
        serde_json::json!([])
    );

    assert!(sidecar.terminate().success());
    wait_until("the sidecar is DISCONNECTED", || {
        cp.json(&["fleet", "status"])[0]["state"] == "DISCONNECTED"
    });
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ctl(&["completion", shell], None);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.stdout.contains("corsairctl"), "{shell}: {out:?}");
    }
    let out = ctl(&["completion", "tcsh"], None);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn tokens_never_appear_in_logs_output_or_the_audit_log() {
    let cp = ControlPlane::start();
    let shop = cp.file("shop.yaml", SHOP_AND_WEB.split("---").next().unwrap());
    let editor = cp.token("ci", "editor", &[]);
    let sidecar_token = cp.token("shop-1", "sidecar", &["shop"]);
    let mut printed = Vec::new();
    let mut run = |token: &str, args: &[&str]| {
        let out = cp.ctl_as(token, args);
        printed.push(format!("{}{}", out.stdout, out.stderr));
        out.code
    };
    assert_eq!(run(&editor, &["policy", "apply", "-f", &shop]), 0);
    // Refused: a bad token, a valid one without the role, a revoked one.
    let bogus = "corsair_0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
    assert_eq!(run(bogus, &["policy", "list"]), 1);
    assert_eq!(run(&sidecar_token, &["policy", "list"]), 1);
    let id = cp
        .json(&["token", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(run(support::ADMIN_TOKEN, &["token", "revoke", &id]), 0);
    assert_eq!(run(&editor, &["policy", "list"]), 1);
    let listed = cp.ctl(&["token", "list", "-o", "yaml"]).stdout;
    let audit = cp
        .ctl(&["audit", "list", "-o", "json", "--limit", "1000"])
        .stdout;
    assert!(audit.contains("DENIED"), "{audit}");

    let mut sidecar = support::shop_sidecar(
        &cp.addr,
        &[],
        &[("CORSAIR_TOKEN", &sidecar_token), ("RUST_LOG", "debug")],
    );
    sidecar.wait_for_log("sidecar listening");
    wait_until("the sidecar is SYNCED", || {
        cp.json(&["fleet", "status"])[0]["state"] == "SYNCED"
    });
    assert!(sidecar.terminate().success());
    let sidecar_log = sidecar.rest();

    let mut cp = cp;
    assert!(cp.process.terminate().success());
    let cp_log = cp.process.rest();
    assert!(
        cp_log.iter().any(|l| l.contains("call refused")),
        "the refusals are logged: {cp_log:?}"
    );
    let everything = [
        printed.join("\n"),
        listed,
        audit,
        cp_log.join("\n"),
        sidecar_log.join("\n"),
    ]
    .join("\n");
    for token in [support::ADMIN_TOKEN, &editor, &sidecar_token, bogus] {
        assert!(!everything.contains(token), "a token leaked");
    }
}

#[test]
fn refused_credentials_say_how_to_present_a_token() {
    let cp = ControlPlane::start();
    let hint = "set CORSAIR_TOKEN (or pass --token)";
    // No token at all, then one the control plane does not know.
    let out = ctl(&["--addr", &cp.addr, "policy", "list"], None);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("to authenticate: ") && out.stderr.contains(hint),
        "{out:?}"
    );
    let bogus = "corsair_0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
    let out = cp.ctl_as(bogus, &["audit", "list"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(hint), "{out:?}");
    // A known token without the role: the hint names the role.
    let viewer = cp.token("reader", "viewer", &[]);
    let out = cp.ctl_as(&viewer, &["token", "list"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("role does not allow this") && out.stderr.contains(hint),
        "{out:?}"
    );
    // apply reports each document's error itself, hint included.
    let shop = cp.file("shop.yaml", SHOP_WIDER);
    let out = ctl(&["--addr", &cp.addr, "policy", "apply", "-f", &shop], None);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(hint), "{out:?}");
    // Other errors carry no such hint.
    let out = cp.ctl(&["policy", "get", "nothing"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(!out.stderr.contains("CORSAIR_TOKEN"), "{out:?}");
}

#[test]
fn a_followed_audit_table_lines_up_with_its_header() {
    let cp = ControlPlane::start();
    // Cells longer than their columns: a long actor, service and reason.
    let actor = "a-rather-long-token-name-for-the-deploy-pipeline@example.com";
    let editor = cp.token(actor, "editor", &[]);
    let service = "a-service-whose-name-is-longer-than-its-column-in-the-table";
    let policy = cp.file(
        "long.yaml",
        &format!("service: {service}\nallowed_origins: [https://a.example.com]\n"),
    );
    let out = cp.ctl_as(
        &editor,
        &["policy", "apply", "-f", &policy, "--reason", "first"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let follow = spawn_plain(
        std::path::Path::new(support::CTL),
        &[
            "--addr",
            &cp.addr,
            "--token",
            support::ADMIN_TOKEN,
            "audit",
            "list",
            "--follow",
        ],
    );
    let header = follow.next_line().unwrap();
    assert!(header.starts_with("SEQ "), "{header}");
    // The listing (the admin token's creation, the editor's, the policy), then one live.
    let mut lines = vec![
        follow.next_line().unwrap(),
        follow.next_line().unwrap(),
        follow.next_line().unwrap(),
    ];
    let wider = cp.file(
        "wider.yaml",
        &format!(
            "service: {service}\nallowed_origins: [https://a.example.com, https://b.example.com]\n"
        ),
    );
    let reason = "a reason longer than anything else in the row, which runs to its end";
    let out = cp.ctl_as(
        &editor,
        &["policy", "apply", "-f", &wider, "--reason", reason],
    );
    assert_eq!(out.code, 0, "{out:?}");
    lines.push(follow.next_line().unwrap());
    assert!(lines[3].ends_with(reason), "{lines:?}");

    // Where each column after the first starts in the header; every row has a cell there.
    let head: Vec<char> = header.chars().collect();
    let starts: Vec<usize> = (2..head.len())
        .filter(|&i| head[i] != ' ' && head[i - 1] == ' ' && head[i - 2] == ' ')
        .collect();
    assert_eq!(starts.len(), 8, "{header}");
    for line in &lines {
        let chars: Vec<char> = line.chars().collect();
        for &p in &starts {
            assert!(
                chars.len() > p && chars[p - 2..p] == [' ', ' '] && chars[p] != ' ',
                "not aligned at column {p}:\n{header}\n{line}"
            );
        }
    }
}

#[test]
fn json_output_uses_the_api_field_names() {
    let cp = ControlPlane::start();
    let shop = cp.file("shop.yaml", SHOP_AND_WEB.split("---").next().unwrap());
    let wider = cp.file("wider.yaml", SHOP_WIDER);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &shop]).code, 0);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &wider]).code, 0);
    let keys = |value: &serde_json::Value| -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let has = |value: &serde_json::Value, expected: &[&str]| {
        let keys = keys(value);
        for key in expected {
            assert!(keys.iter().any(|k| k == key), "no {key} in {value}");
        }
    };
    let lacks = |value: &serde_json::Value, invented: &[&str]| {
        let keys = keys(value);
        for key in invented {
            assert!(!keys.iter().any(|k| k == key), "{key} in {value}");
        }
    };

    let policy = cp.json(&["policy", "get", "shop"]);
    has(
        &policy,
        &[
            "revision",
            "etag",
            "create_time",
            "update_time",
            "update_actor",
        ],
    );
    has(
        &cp.json(&["policy", "list"])[0],
        &["create_time", "update_time"],
    );
    let revision = &cp.json(&["policy", "history", "shop"])[0];
    has(
        revision,
        &["revision", "create_time", "actor", "audit_sequence"],
    );
    lacks(revision, &["time"]);
    let event = &cp.json(&["audit", "list"])[0];
    has(
        event,
        &["sequence", "create_time", "actor", "method", "outcome"],
    );
    lacks(event, &["time"]);

    let explained = cp.json(&[
        "policy",
        "explain",
        "--service",
        "shop",
        "--origin",
        "https://shop.example.com",
        "--method",
        "PUT",
    ]);
    has(
        &explained,
        &["decision", "kind", "reason", "headers", "revision"],
    );
    for header in explained["headers"].as_array().unwrap() {
        assert_eq!(keys(header), ["name", "value"], "{explained}");
    }
    // Findings are the API's Finding, not sentences.
    let risky = cp.file("risky.yaml", "service: web\nallowed_origins: ['null']\n");
    let applied = cp.json(&[
        "policy",
        "apply",
        "-f",
        &risky,
        "--acknowledge",
        "NULL_ORIGIN",
    ]);
    let finding = &applied[0]["findings"][0];
    assert_eq!(
        keys(finding),
        ["code", "field", "message", "severity"],
        "{applied}"
    );
    assert_eq!(finding["code"], "NULL_ORIGIN");
    assert_eq!(finding["severity"], "RISK");

    let created = cp.json(&["token", "create", "--name", "ci", "--role", "editor"]);
    assert!(created["secret"].is_string(), "{created}");
    has(
        &created["token"],
        &["id", "name", "role", "create_time", "created_by"],
    );
    let id = created["token"]["id"].as_str().unwrap().to_owned();
    let revoked = cp.json(&["token", "revoke", &id]);
    has(&revoked, &["create_time", "revoke_time"]);
    lacks(&revoked, &["created", "revoked", "expires"]);
    let expiring = cp.json(&[
        "token",
        "create",
        "--name",
        "temp",
        "--role",
        "viewer",
        "--expires-in",
        "1h",
    ]);
    has(&expiring["token"], &["expire_time"]);

    // The sidecar's host is the machine's name, whatever HOSTNAME says.
    let token = cp.token("shop-1", "sidecar", &["shop"]);
    let mut sidecar = support::shop_sidecar(
        &cp.addr,
        &["--sidecar-id", "shop-1"],
        &[("CORSAIR_TOKEN", &token), ("HOSTNAME", "not-this-machine")],
    );
    sidecar.wait_for_log("sidecar listening");
    wait_until("the sidecar is SYNCED", || {
        cp.json(&["fleet", "status"])[0]["state"] == "SYNCED"
    });
    let row = &cp.json(&["fleet", "status"])[0];
    has(
        row,
        &["sidecar_id", "connect_time", "last_seen_time", "host"],
    );
    lacks(row, &["connected_since", "last_seen", "disconnected_at"]);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(row["host"], host.trim(), "{row}");
    assert!(sidecar.terminate().success());
    wait_until("the sidecar is DISCONNECTED", || {
        cp.json(&["fleet", "status"])[0]["state"] == "DISCONNECTED"
    });
    has(&cp.json(&["fleet", "status"])[0], &["disconnect_time"]);
}
