//! `corsairctl quickstart` as a newcomer runs it: the real control plane and sidecar
//! binaries, a demo service and the example policy, answering a preflight, then a clean stop.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;

use support::{CTL, sibling, spawn_plain};

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

#[test]
fn quickstart_runs_the_system_answers_a_preflight_and_stops_cleanly() {
    // The binaries it starts are found next to corsairctl.
    sibling("corsair-control-plane");
    sibling("corsair-sidecar");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let mut quickstart = spawn_plain(
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
    let banner = banner.join("\n");
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
}
