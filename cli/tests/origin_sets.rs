//! Origin sets through the real `corsairctl` against a real control plane: a directory of a
//! set and the policies that use it applied in one command (the set first), diffs that name
//! every policy a set change reaches, effective policies, history, rollback and deletion.

mod support;

use std::path::PathBuf;

use support::ControlPlane;

const CORP: &str = "\
kind: OriginSet
name: corp
description: the corporate front-ends
origins: [https://app.example.com, https://admin.example.com]
";

const CORP_WITH_PAY: &str = "\
kind: OriginSet
name: corp
description: the corporate front-ends
origins: [https://app.example.com, https://admin.example.com, https://pay.example.com]
";

/// Two policies that use `corp`, one with an origin of its own, one `kind: Policy` written out.
const SHOP_AND_BLOG: &str = "\
service: shop
allowed_origins: [https://shop.example.com, set:corp]
---
kind: Policy
service: blog
allowed_origins: [set:corp]
";

/// A directory whose policies file sorts before its sets file, so that applying the set
/// first is apply's doing, not the order of the files.
fn directory(cp: &ControlPlane, set: &str) -> String {
    let dir = cp.dir.path().join("corsair");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a-policies.yaml"), SHOP_AND_BLOG).unwrap();
    std::fs::write(dir.join("z-sets.yaml"), set).unwrap();
    dir.display().to_string()
}

/// Where `needle` starts in `haystack`; panics when it is not there.
fn at(haystack: &str, needle: &str) -> usize {
    haystack
        .find(needle)
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{haystack}"))
}

#[test]
fn a_directory_of_a_set_and_its_policies_applies_the_set_first() {
    let cp = ControlPlane::start();
    let dir = directory(&cp, CORP);

    // Nothing stored: diff shows the set, the policies, and that the set reaches both.
    let diff = cp.ctl(&["policy", "diff", "-f", &dir]);
    assert_eq!(diff.code, 1, "{diff:?}");
    assert!(diff.stdout.contains("+++ originSets/corp"), "{diff:?}");
    assert!(diff.stdout.contains("+kind: OriginSet"), "{diff:?}");
    assert!(
        diff.stdout.contains(
            "originSets/corp: changes the effective policy of services/shop/policy, \
             services/blog/policy (which these files make reference it)"
        ),
        "{diff:?}"
    );
    assert!(diff.stdout.contains("+++ services/blog/policy"), "{diff:?}");

    // A dry run checks the policies against the set it would create, and stores nothing.
    let dry = cp.ctl(&["policy", "apply", "-f", &dir, "--dry-run"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(
        dry.stdout
            .contains("originSets/corp would be created (dry run)")
            && dry
                .stdout
                .contains("services/shop/policy would be created (dry run)"),
        "{dry:?}"
    );
    assert_eq!(cp.json(&["origin-set", "list"]), serde_json::json!([]));

    let applied = cp.ctl(&["policy", "apply", "-f", &dir, "--reason", "first"]);
    assert_eq!(applied.code, 0, "{applied:?}");
    let set = at(&applied.stdout, "originSets/corp created (revision 1)");
    let shop = at(&applied.stdout, "services/shop/policy created (revision 2)");
    let blog = at(&applied.stdout, "services/blog/policy created (revision 3)");
    assert!(set < shop && shop < blog, "{applied:?}");

    // Applied again, nothing changes.
    let again = cp.ctl(&["policy", "apply", "-f", &dir]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains("originSets/corp unchanged")
            && !again.stdout.contains("created")
            && !again.stdout.contains("updated"),
        "{again:?}"
    );
    let diff = cp.ctl(&["policy", "diff", "-f", &dir]);
    assert_eq!((diff.code, diff.stdout.as_str()), (0, ""), "{diff:?}");

    // The set, and who uses it; what `get -o yaml` prints applies back unchanged.
    let corp = cp.json(&["origin-set", "get", "corp"]);
    assert_eq!(corp["kind"], "OriginSet");
    assert_eq!(
        corp["origins"],
        serde_json::json!(["https://admin.example.com", "https://app.example.com"])
    );
    assert_eq!(
        corp["referrers"],
        serde_json::json!(["services/blog/policy", "services/shop/policy"])
    );
    let table = cp.ctl(&["origin-set", "get", "corp"]).stdout;
    assert!(table.starts_with("NAME  ENTRIES  ORIGINS"), "{table}");
    assert!(table.contains("blog,shop"), "{table}");
    let yaml = cp.ctl(&["origin-set", "get", "corp", "-o", "yaml"]).stdout;
    assert!(yaml.starts_with("kind: OriginSet\nname: corp\n"), "{yaml}");
    let back = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &yaml);
    assert_eq!(back.code, 0, "{back:?}");
    assert!(
        back.stdout.contains("originSets/corp unchanged"),
        "{back:?}"
    );
    let listed = cp.ctl(&["origin-set", "list", "-o", "yaml"]).stdout;
    let back = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &listed);
    assert_eq!(back.code, 0, "{back:?}");

    // The effective policy: every origin in force, and where each came from.
    let effective = cp.ctl(&["policy", "get", "shop", "--effective"]).stdout;
    let lines: Vec<Vec<&str>> = effective
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["ORIGIN", "FROM"],
            vec!["https://shop.example.com", "policy"],
            vec!["https://admin.example.com", "set:corp"],
            vec!["https://app.example.com", "set:corp"],
        ],
        "{effective}"
    );
    let effective = cp.json(&["policy", "get", "blog", "--effective"]);
    assert_eq!(effective["effective_revision"], 3);
    assert_eq!(
        effective["effective_origins"][0],
        serde_json::json!({"origin": "https://admin.example.com", "origin_set": "originSets/corp"})
    );
    // Without --effective, the policy as written.
    let basic = cp.json(&["policy", "get", "blog"]);
    assert!(basic.get("effective_origins").is_none(), "{basic}");
    assert_eq!(basic["allowed_origins"], serde_json::json!(["set:corp"]));
    // What `get --effective -o yaml` prints applies back unchanged too.
    let yaml = cp
        .ctl(&["policy", "get", "shop", "--effective", "-o", "yaml"])
        .stdout;
    let back = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &yaml);
    assert_eq!(back.code, 0, "{back:?}");
    assert!(back.stdout.contains("unchanged"), "{back:?}");
}

#[test]
fn documents_of_an_unknown_kind_are_refused_naming_the_file_and_document() {
    let cp = ControlPlane::start();
    let file = cp.file(
        "mixed.yaml",
        "kind: OriginSet\nname: corp\n---\nkind: Route\nname: x\n",
    );
    let out = cp.ctl(&["policy", "apply", "-f", &file]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("{file}#2: unknown kind \"Route\"")),
        "{out:?}"
    );
    assert_eq!(cp.ctl(&["policy", "diff", "-f", &file]).code, 2);
    // Nothing was sent.
    assert_eq!(cp.json(&["origin-set", "list"]), serde_json::json!([]));

    let forgotten = cp.file("set.yaml", "name: corp\norigins: []\n");
    let out = cp.ctl(&["policy", "apply", "-f", &forgotten]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("add `kind: OriginSet`"), "{out:?}");
}

#[test]
fn a_set_change_is_checked_against_and_reaches_every_policy_that_uses_it() {
    let cp = ControlPlane::start();
    let dir = directory(&cp, CORP);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &dir]).code, 0);

    // The set gains an origin, and a new policy in the same files starts using it.
    let sets = PathBuf::from(&dir).join("z-sets.yaml");
    std::fs::write(&sets, CORP_WITH_PAY).unwrap();
    let web = PathBuf::from(&dir).join("b-web.yaml");
    std::fs::write(&web, "service: web\nallowed_origins: [set:corp]\n").unwrap();
    let diff = cp.ctl(&["policy", "diff", "-f", &dir]);
    assert_eq!(diff.code, 1, "{diff:?}");
    assert!(
        diff.stdout.contains("--- originSets/corp (revision 1)")
            && diff.stdout.contains("+- https://pay.example.com"),
        "{diff:?}"
    );
    assert!(
        diff.stdout.contains(
            "originSets/corp: changes the effective policy of services/blog/policy, \
             services/shop/policy; and of services/web/policy (which these files make \
             reference it)"
        ),
        "{diff:?}"
    );
    let out = cp.ctl(&["policy", "apply", "-f", &dir, "--reason", "pay"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("originSets/corp updated (revision 4): origins\n  changes the effective policy of: blog, shop\n"),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("services/web/policy created (revision 5)"),
        "{out:?}"
    );
    for service in ["shop", "blog", "web"] {
        let effective = cp.json(&["policy", "get", service, "--effective"]);
        assert!(
            effective["effective_origins"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!({
                    "origin": "https://pay.example.com",
                    "origin_set": "originSets/corp"
                })),
            "{service}: {effective}"
        );
    }

    // The audit log names the set and the services it changed.
    let event = &cp.json(&["audit", "list", "--method", "UpdateOriginSet"])[0];
    assert_eq!(event["origin_set"], "originSets/corp");
    assert_eq!(
        event["affected_services"],
        serde_json::json!(["blog", "shop"])
    );
    assert_eq!(event["reason"], "pay");
    let table = cp
        .ctl(&["audit", "list", "--method", "UpdateOriginSet"])
        .stdout;
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("UpdateOriginSet")
            && row.contains("originSets/corp")
            && row.contains("origins; affects blog,shop"),
        "{table}"
    );

    // `null` would be a new risk for every policy that uses the set: refused, naming each,
    // until acknowledged.
    std::fs::write(
        &sets,
        CORP_WITH_PAY.replace(
            "https://pay.example.com]",
            "https://pay.example.com, 'null']",
        ),
    )
    .unwrap();
    let out = cp.ctl(&["policy", "apply", "-f", &dir]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("originSets/corp: refused: it has risks that were not acknowledged")
            && out
                .stderr
                .contains("  services/shop/policy.allowed_origins[1]: ")
            && out
                .stderr
                .contains("  services/web/policy.allowed_origins[0]: ")
            && out.stderr.contains("--acknowledge NULL_ORIGIN"),
        "{out:?}"
    );
    let out = cp.ctl(&[
        "policy",
        "apply",
        "-f",
        &dir,
        "--acknowledge",
        "NULL_ORIGIN",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("originSets/corp updated (revision 6)")
            && out.stdout.contains("acknowledged risk: "),
        "{out:?}"
    );
    // Once stored, the same files are unchanged without acknowledging the risk again: the set,
    // and the policies that carry the risk through it.
    let out = cp.ctl(&["policy", "apply", "-f", &dir]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.matches(" unchanged\n").count(), 4, "{out:?}");
    assert_eq!(cp.ctl(&["policy", "diff", "-f", &dir]).code, 0);
}

#[test]
fn history_rollback_and_delete_of_a_set() {
    let cp = ControlPlane::start();
    let dir = directory(&cp, CORP);
    assert_eq!(cp.ctl(&["policy", "apply", "-f", &dir]).code, 0);
    let pay = cp.file("pay.yaml", CORP_WITH_PAY);
    let out = cp.ctl(&["policy", "apply", "-f", &pay, "--reason", "pay"]);
    assert_eq!(out.code, 0, "{out:?}");

    // An unknown set's history fails as `get` of it does.
    let unknown = cp.ctl(&["origin-set", "history", "nobody"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("originSets/nobody"), "{unknown:?}");

    let history = cp.ctl(&["origin-set", "history", "corp"]);
    let lines: Vec<&str> = history.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{history:?}");
    assert!(lines[0].starts_with("REVISION"), "{history:?}");
    assert!(
        lines[1].starts_with("4 ")
            && lines[1].contains("origins +1 -0")
            && lines[1].contains("blog,shop")
            && lines[1].ends_with("pay"),
        "{history:?}"
    );
    assert!(
        lines[2].starts_with("1 ") && lines[2].contains("created"),
        "{history:?}"
    );
    let history = cp.json(&["origin-set", "history", "corp"]);
    assert_eq!(
        history[0]["affected_services"],
        serde_json::json!(["blog", "shop"])
    );
    assert_eq!(history[0]["origin_set"]["kind"], "OriginSet");

    // Someone saves the set to edit it, someone else rolls it back meanwhile…
    let saved = cp.ctl(&["origin-set", "get", "corp", "-o", "yaml"]).stdout;
    let out = cp.ctl(&[
        "origin-set",
        "rollback",
        "corp",
        "--to",
        "1",
        "--reason",
        "back",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "originSets/corp rolled back to revision 1 (now at revision 5)\n  \
         changes the effective policy of: blog, shop\n"
    );
    assert_eq!(
        cp.json(&["origin-set", "get", "corp"])["origins"],
        serde_json::json!(["https://admin.example.com", "https://app.example.com"])
    );
    // …so the first edit, made on the old version, is refused rather than lost.
    let edited = saved.replace("- https://pay.example.com", "- https://new.example.com");
    assert_ne!(edited, saved);
    let out = cp.ctl_stdin(&["policy", "apply", "-f", "-"], &edited);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("changed by someone else")
            && out.stderr.contains("corsairctl origin-set get"),
        "{out:?}"
    );
    // Rolling back to what is in force writes nothing.
    let out = cp.ctl(&["origin-set", "rollback", "corp", "--to", "1"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.starts_with("originSets/corp unchanged"),
        "{out:?}"
    );

    // In use, the set cannot be deleted; the refusal lists who uses it.
    let out = cp.ctl(&["origin-set", "delete", "corp"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "error: originSets/corp: refused: policies reference it; remove it from their \
         allowed_origins first:\n  services/blog/policy\n  services/shop/policy\n"
    );
    for service in ["shop", "blog"] {
        assert_eq!(cp.ctl(&["policy", "delete", service]).code, 0);
    }
    let out = cp.ctl(&["origin-set", "delete", "corp", "--dry-run"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "originSets/corp would be deleted (dry run)\n"),
        "{out:?}"
    );
    let out = cp.ctl(&[
        "origin-set",
        "delete",
        "originSets/corp",
        "--reason",
        "gone",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "originSets/corp deleted (revision 8)\n"),
        "{out:?}"
    );
    assert_eq!(cp.ctl(&["origin-set", "get", "corp"]).code, 1);
    assert_eq!(cp.json(&["origin-set", "list"]), serde_json::json!([]));
    let history = cp.json(&["origin-set", "history", "corp"]);
    assert_eq!(
        (&history[0]["change"], &history[0]["reason"]),
        (&serde_json::json!("deleted"), &serde_json::json!("gone"))
    );

    // A rollback recreates a deleted set.
    let out = cp.ctl(&["origin-set", "rollback", "corp", "--to", "4"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .starts_with("originSets/corp rolled back to revision 4 (now at revision 9)"),
        "{out:?}"
    );
    assert_eq!(
        cp.json(&["origin-set", "list"])[0]["origins"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        cp.json(&["origin-set", "history", "corp"])[0]["change"],
        "recreated"
    );
}
