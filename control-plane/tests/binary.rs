//! The `corsair-control-plane` binary as a process: flag and database errors, serving, and a
//! clean exit on SIGTERM. Plus the process-level guarantees of the stores.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;

use corsair_proto::v1;
use support::{Backend, Deadline, TestServer, bearer, fresh_db, within};

const BIN: &str = env!("CARGO_BIN_EXE_corsair-control-plane");

/// The admin token the binary starts with, through `CORSAIR_BOOTSTRAP_TOKEN`.
const ADMIN: &str = "corsair_binary-test-admin-token-0123456789abcdef";

/// A control-plane process started by [`start`].
struct Started {
    child: std::process::Child,
    addr: String,
    /// Its log lines after the "listening" one, read until it exits.
    log: std::thread::JoinHandle<Vec<String>>,
}

/// Starts the binary on `url`; returns once it listens.
fn start(url: &str, env: &[(&str, &str)], args: &[&str]) -> Started {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            url,
            "--log-format",
            "json",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("CORSAIR_BOOTSTRAP_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log is read on a thread, so that waiting for a line can have a deadline and the
    // process never blocks on a full pipe.
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Deadline::new("the control plane to log \"control plane listening\"");
    let addr = loop {
        let line = match lines.recv_timeout(deadline.remaining()) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => deadline.expire(""),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("the control plane exited before it listened: {out:?}")
            }
        };
        let log: serde_json::Value = serde_json::from_str(&line).expect("json logs");
        if log["fields"]["message"] == "control plane listening" {
            break log["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    let log = std::thread::spawn(move || lines.iter().collect());
    Started { child, addr, log }
}

/// SIGTERM; asserts a clean exit; what it wrote to stderr and its log lines.
fn stop(started: Started) -> (String, Vec<String>) {
    let status = Command::new("kill")
        .args(["-TERM", &started.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (pid, child) = (started.child.id(), started.child);
    let (tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let deadline = Deadline::new("the control plane to exit after SIGTERM");
    let out = exited
        .recv_timeout(deadline.remaining())
        .unwrap_or_else(|_| {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            deadline.expire("still running")
        });
    let out = out.unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8(out.stderr).unwrap(),
        started.log.join().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_creates_one_admin_token_and_shows_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let started = start(&url, &[], &[]);
    let mut client =
        v1::policy_service_client::PolicyServiceClient::connect(format!("http://{}", started.addr))
            .await
            .unwrap();
    let refused = client
        .list_policies(v1::ListPoliciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    drop(client);
    let (stderr, log) = stop(started);
    let token = stderr
        .lines()
        .find(|l| l.starts_with("corsair_"))
        .unwrap_or_else(|| panic!("no token shown: {stderr}"))
        .to_owned();
    // Shown on the terminal, never logged.
    assert!(
        !log.iter().any(|l| l.contains(&token)),
        "the token was logged"
    );

    // The token works; a second start creates and shows nothing.
    let started = start(&url, &[], &[]);
    let mut client =
        v1::policy_service_client::PolicyServiceClient::connect(format!("http://{}", started.addr))
            .await
            .unwrap();
    client
        .list_policies(bearer(&token, v1::ListPoliciesRequest::default()))
        .await
        .unwrap();
    drop(client);
    let (stderr, _) = stop(started);
    assert!(!stderr.contains("corsair_"), "{stderr}");
    // The audit log has the creation, never the token.
    let store = corsair_control_plane::store::connect(&url).await.unwrap();
    let events = store
        .list_audit(&Default::default(), None, 100)
        .await
        .unwrap();
    assert!(events.iter().any(|e| e.method.ends_with("/CreateToken")));
    assert!(!format!("{events:?}").contains(&token));
}

#[test]
fn without_authentication_only_loopback_unless_insecure() {
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:0", "--auth", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("without authentication") && stderr.contains("--insecure"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "0.0.0.0:0",
            "--auth",
            "none",
            "--insecure",
            "--log-format",
            "json",
        ])
        .args(["--database-url", &url])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.contains("control plane listening"))
        .collect();
    assert!(lines.iter().any(|l| l.contains("INSECURE")), "{lines:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bad_flag_is_one_clear_line() {
    // Not an address; a duration too long for the clock (it would overflow it); a zero
    // retention, which would make the pruning interval zero; a zero message limit.
    for (args, named) in [
        (&["--listen", "not-an-address"][..], "--listen"),
        (
            &["--request-timeout-secs", "18446744073709551615"][..],
            "--request-timeout-secs",
        ),
        (
            &["--fleet-retention-secs", "9223372036854775807"][..],
            "--fleet-retention-secs",
        ),
        (
            &["--fleet-retention-secs", "0"][..],
            "--fleet-retention-secs",
        ),
        // A message limit no write fits in.
        (&["--max-message-bytes", "0"][..], "--max-message-bytes"),
    ] {
        // An unsupported database, so that a flag let through ends the run too (with 1).
        let out = Command::new(BIN)
            .args(args)
            .args(["--database-url", "mysql://x"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[test]
fn an_unreachable_database_is_one_clear_line() {
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nowhere",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open database"), "{stderr}");

    let out = Command::new(BIN)
        .args(["--database-url", "mysql://x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("unsupported database URL")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cp.db").display());
    let started = start(&url, &[("CORSAIR_BOOTSTRAP_TOKEN", ADMIN)], &[]);
    let mut client =
        v1::policy_service_client::PolicyServiceClient::connect(format!("http://{}", started.addr))
            .await
            .unwrap();
    client
        .create_policy(bearer(
            ADMIN,
            v1::CreatePolicyRequest {
                policy: Some(v1::Policy {
                    service: "shop".into(),
                    allowed_origins: vec!["https://a.com".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // The client goes first: a graceful shutdown waits for open connections to close.
    drop(client);
    // Wait off the runtime, so the client's connection can still answer the server's GOAWAY.
    let (_, rest) = tokio::task::spawn_blocking(move || stop(started))
        .await
        .unwrap();
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
    assert!(
        !rest.iter().any(|l| l.contains("drain deadline")),
        "shutdown drained on its own: {rest:?}"
    );
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused() {
    let db = fresh_db(Backend::Sqlite).await.unwrap();
    let _first = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    let second = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap_err();
    assert!(
        second
            .to_string()
            .contains("in use by another control-plane process"),
        "{second}"
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let db = fresh_db(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db.url).await;
    let mut stream = server
        .audit()
        .await
        .watch_audit_events(v1::WatchAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    server.stop().await;
    // The tail ends with the server: no more messages, and no hang.
    let end = within("the tail to end with the server", stream.message()).await;
    assert!(matches!(end, Ok(None) | Err(_)));
}
