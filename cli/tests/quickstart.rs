//! `corsairctl quickstart` as a newcomer runs it: the real control plane and sidecar
//! binaries, a demo service and the example policy, answering a preflight, then a clean stop;
//! and run again, with the policy left by the first run and the first run's logs.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use support::{CTL, Running, sibling, spawn_plain};

fn preflight(sidecar: &str, origin: &str) -> String {
    let mut stream = TcpStream::connect(sidecar).unwrap();
    write!(
        stream,
        "OPTIONS /orders HTTP/1.1\r\nHost: {sidecar}\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: PUT\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream.set_read_timeout(Some(support::PATIENCE)).unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("no whole answer from the sidecar at {sidecar}: {e}"));
    response.to_ascii_lowercase()
}

/// Starts the quickstart with its state in `state`; returns it and its banner.
fn start(state: &std::path::Path) -> (Running, String) {
    let quickstart = spawn_plain(
        std::path::Path::new(CTL),
        &[
            "quickstart",
            "--dir",
            state.to_str().unwrap(),
            "--control-plane-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let mut banner = Vec::new();
    while let Some(line) = quickstart.next_line() {
        let done = line.starts_with("Ctrl-C stops everything");
        banner.push(line);
        if done {
            break;
        }
    }
    (quickstart, banner.join("\n"))
}

/// Whether `banner` says the preflight from `origin` is allowed (or denied) right above the
/// command that sends it.
fn says(banner: &str, origin: &str, outcome: &str) -> bool {
    let lines: Vec<&str> = banner.lines().collect();
    lines.windows(2).any(|w| {
        w[0].contains(&format!("A preflight the policy {outcome}"))
            && w[1].contains("curl")
            && w[1].contains(&format!("'Origin: {origin}'"))
    })
}

#[test]
fn quickstart_runs_the_system_answers_a_preflight_and_stops_cleanly() {
    // The binaries it starts are found next to corsairctl.
    sibling("corsair-control-plane");
    sibling("corsair-sidecar");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let (mut quickstart, banner) = start(&state);

    // The banner shows the policy the control plane holds, and what it makes of the
    // preflights it suggests.
    for line in [
        "The policy in force for the demo service (revision 1, the example, created now):",
        "  origins      https://app.example.com",
        "  methods      GET, POST, PUT, DELETE",
        "  credentials  allowed",
        "  mode         standard",
    ] {
        assert!(
            banner.lines().any(|l| l == line),
            "no {line:?} in:\n{banner}"
        );
    }
    assert!(
        says(&banner, "https://app.example.com", "allows"),
        "{banner}"
    );
    assert!(
        says(&banner, "https://admin.example.com", "denies"),
        "{banner}"
    );
    let url = |label: &str| -> String {
        let line = banner
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in:\n{banner}"));
        let url = line
            .split_whitespace()
            .nth(label.split(' ').count())
            .unwrap();
        url.trim_start_matches("http://").to_owned()
    };
    let sidecar = url("sidecar");

    // The sidecar already holds the example policy: the printed preflights behave as printed.
    let allowed = preflight(&sidecar, "https://app.example.com");
    assert!(allowed.starts_with("http/1.1 204"), "{allowed}");
    assert!(
        allowed.contains("access-control-allow-origin: https://app.example.com"),
        "{allowed}"
    );
    let denied = preflight(&sidecar, "https://admin.example.com");
    assert!(!denied.contains("access-control-allow-origin"), "{denied}");

    // The printed lines that authenticate and add an origin work as printed, in a shell,
    // and the sidecar then allows the preflight that was denied, without a restart.
    let printed = |needle: &str| -> String {
        banner
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{banner}"))
            .trim()
            .to_owned()
    };
    let script = format!(
        "set -e\n{}\n{}\n",
        printed("export CORSAIR_TOKEN="),
        printed("policy apply -f")
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .env_remove("CORSAIR_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("services/demo/policy updated"),
        "{out:?}"
    );
    support::wait_until("the sidecar allows the new origin", || {
        preflight(&sidecar, "https://admin.example.com")
            .contains("access-control-allow-origin: https://admin.example.com")
    });

    // SIGTERM (as Ctrl-C) stops the sidecar and the control plane, and exits 0.
    let status = quickstart.terminate();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(state.join("control-plane.log")).unwrap();
    assert!(log.contains(r#""message":"stopped""#), "{log}");
    assert!(
        TcpStream::connect(&sidecar).is_err(),
        "the sidecar still listens"
    );

    // A second run keeps the policy the first one left, says so, and suggests going back.
    let (mut again, banner) = start(&state);
    for line in [
        "The policy in force for the demo service (revision 2, kept from an earlier run):",
        "  origins      https://app.example.com, https://admin.example.com",
    ] {
        assert!(
            banner.lines().any(|l| l == line),
            "no {line:?} in:\n{banner}"
        );
    }
    assert!(
        says(&banner, "https://admin.example.com", "allows"),
        "{banner}"
    );
    assert!(banner.contains("policy apply -f"), "{banner}");
    assert!(again.terminate().success());

    // Each log holds both runs, each after its own opening line, the first one whole.
    for name in ["control-plane.log", "sidecar.log"] {
        let log = std::fs::read_to_string(state.join(name)).unwrap();
        let runs: Vec<&str> = log.split("===== quickstart run started ").skip(1).collect();
        assert_eq!(runs.len(), 2, "{name}:\n{log}");
        assert!(runs[0].contains(r#""message":"stopped""#), "{name}:\n{log}");
        assert!(runs[1].contains(r#""message":"stopped""#), "{name}:\n{log}");
    }
}
