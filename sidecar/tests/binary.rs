//! The `corsair-sidecar` binary as a process: it serves from its cache file at once while the
//! control plane is down, reports that on its admin endpoints, refuses a corrupt cache file,
//! and stops cleanly on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;

use corsair_proto::v1;
use corsair_sidecar::cache_file;
use support::{Deadline, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_corsair-sidecar");

/// An upstream answering 200 to everything.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, name: &str) -> Option<String> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    Some(line[at..].split_whitespace().next()?.to_owned())
}

/// A sidecar process, killed when dropped (so a failing test leaves none behind).
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the sidecar; returns it with its proxy and admin addresses.
fn start(args: &[&str]) -> (Sidecar, String, String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log is read on a thread, so that waiting for a line can have a deadline and the
    // process never blocks on a full pipe.
    let stdout = child.stdout.take().unwrap();
    let sidecar = Sidecar(child);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Deadline::new("the sidecar to log \"sidecar listening\"");
    loop {
        let line = match lines.recv_timeout(deadline.remaining()) {
            Ok(line) => strip_ansi(&line),
            Err(RecvTimeoutError::Timeout) => deadline.expire(""),
            Err(RecvTimeoutError::Disconnected) => panic!("the sidecar exited before it listened"),
        };
        if line.contains("sidecar listening") {
            let proxy = field(&line, "address").unwrap();
            let admin = field(&line, "admin").unwrap();
            return (sidecar, proxy, admin);
        }
    }
}

/// One HTTP/1.1 request; the whole response as text.
async fn http(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within(
        &format!("{addr} to answer and close"),
        s.read_to_string(&mut response),
    )
    .await
    .unwrap();
    response
}

/// `GET path` on the admin listener; the whole response as text.
async fn admin_get(admin: &str, path: &str) -> String {
    http(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

fn preflight(origin: &str) -> String {
    format!(
        "OPTIONS /x HTTP/1.1\r\nHost: api.local\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: PUT\r\nConnection: close\r\n\r\n"
    )
}

/// The nice value in a `/proc/…/stat` file: field 19, counted after the parenthesized name
/// (which may hold spaces).
fn nice_in(stat: &std::path::Path) -> i32 {
    let stat = std::fs::read_to_string(stat).unwrap();
    stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(16)
        .unwrap()
        .parse()
        .unwrap()
}

/// The nice value of each thread of process `pid` named `name`.
fn nice_of_threads(pid: u32, name: &str) -> Vec<i32> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            nice.push(nice_in(&path.join("stat")));
        }
    }
    nice
}

fn stop(mut sidecar: Sidecar) {
    let status = Command::new("kill")
        .args(["-TERM", &sidecar.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Deadline::new("the sidecar to exit after SIGTERM");
    loop {
        if let Some(status) = sidecar.0.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        deadline.check("still running");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_the_cache_file_while_the_control_plane_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shop.cache");
    let snapshot = v1::DiscoveryResponse {
        revision: 9,
        snapshot: true,
        upserts: vec![v1::Policy {
            service: "shop".into(),
            allowed_origins: vec!["https://app.example.com".into(), "set:corp".into()],
            allowed_methods: vec!["PUT".into()],
            revision: 9,
            ..Default::default()
        }],
        // The origin sets it references are kept beside it.
        origin_sets: vec![v1::OriginSetContent {
            name: "corp".into(),
            revision: 8,
            digest: corsair_policy::origin_set::digest(&["https://checkout.example.com"]).to_vec(),
            added: vec!["https://checkout.example.com".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    cache_file::save(&cache, &snapshot).unwrap();
    let up = upstream().await;
    let down = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (child, proxy, admin) = start(&[
        "--upstream",
        &up.to_string(),
        "--service",
        "shop",
        "--cache-file",
        cache.to_str().unwrap(),
        "--control-plane",
        &format!("http://{down}"),
    ]);

    let allowed = http(&proxy, &preflight("https://app.example.com")).await;
    assert!(allowed.starts_with("HTTP/1.1 204"), "{allowed}");
    assert!(
        allowed
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example.com"),
        "{allowed}"
    );
    let denied = http(&proxy, &preflight("https://evil.com")).await;
    assert!(
        !denied
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{denied}"
    );
    let from_set = http(&proxy, &preflight("https://checkout.example.com")).await;
    assert!(from_set.starts_with("HTTP/1.1 204"), "{from_set}");

    let policy = admin_get(&admin, "/policy").await;
    assert!(policy.contains("\"source\": \"cache file\""), "{policy}");
    // Where each origin in force came from.
    let body: serde_json::Value =
        serde_json::from_str(&policy[policy.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(
        body["services"]["shop"]["effective_origins"],
        serde_json::json!([
            { "origin": "https://app.example.com" },
            { "origin": "https://checkout.example.com", "origin_set": "corp" },
        ])
    );
    assert!(policy.contains("\"revision\": 9"), "{policy}");
    let ready = admin_get(&admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = admin_get(&admin, "/metrics").await;
    for line in [
        "corsair_sidecar_policy_revision 9",
        r#"corsair_sidecar_sync_state{state="connecting"} 1"#,
        r#"corsair_sidecar_sync_state{state="connected"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in {metrics}");
    }
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_file_is_ignored_and_the_no_policy_setting_applies() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shop.cache");
    std::fs::write(&cache, b"CORSAIR1 truncated").unwrap();
    let up = upstream().await;
    let (child, proxy, admin) = start(&[
        "--upstream",
        &up.to_string(),
        "--service",
        "shop",
        "--cache-file",
        cache.to_str().unwrap(),
    ]);
    let denied = http(&proxy, "GET / HTTP/1.1\r\nHost: api.local\r\nOrigin: https://app.example.com\r\nConnection: close\r\n\r\n").await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let plain = http(
        &proxy,
        "GET / HTTP/1.1\r\nHost: api.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    let ready = admin_get(&admin, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("cross-origin requests are denied"),
        "{ready}"
    );
    stop(child);
}

#[test]
fn a_bad_flag_is_one_clear_line() {
    // A missing flag, an upstream over TLS, and a timeout too long for the clock (it would
    // overflow it).
    for (args, named) in [
        (&["--service", "shop"][..], "--upstream"),
        (
            &["--service", "shop", "--upstream", "https://127.0.0.1:1"][..],
            "scheme must be http",
        ),
        (
            &[
                "--service",
                "shop",
                "--upstream",
                "127.0.0.1:1",
                "--response-timeout-secs",
                "18446744073709551615",
            ][..],
            "--response-timeout-secs",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_is_enforced_and_edits_go_live() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.json");
    std::fs::write(&file, r#"{"service":"shop","allowed_origins":["https://a.example.com"],"allowed_methods":["PUT"]}"#).unwrap();
    let up = upstream().await;
    let (child, proxy, admin) = start(&[
        "--upstream",
        &format!("http://{up}"),
        "--service",
        "shop",
        "--policy-file",
        file.to_str().unwrap(),
    ]);
    let allows = |origin: &'static str| {
        let proxy = proxy.clone();
        async move {
            http(&proxy, &preflight(origin))
                .await
                .to_ascii_lowercase()
                .contains(&format!("access-control-allow-origin: {origin}"))
        }
    };
    // The file is read shortly after start, and again after each edit: re-check until it is.
    let deadline = Deadline::new("the policy file allowing https://a.example.com to apply");
    while !allows("https://a.example.com").await {
        deadline.check("");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    std::fs::write(&file, r#"{"service":"shop","allowed_origins":["https://b.example.com"],"allowed_methods":["PUT"]}"#).unwrap();
    let deadline = Deadline::new("the edited policy file allowing https://b.example.com to apply");
    while !allows("https://b.example.com").await {
        deadline.check("");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!allows("https://a.example.com").await);
    // The watcher runs on the background thread, 10 nice steps below the proxy, which keeps
    // the priority of the thread that started it (this one).
    let ours = nice_in("/proc/thread-self/stat".as_ref());
    assert_eq!(nice_of_threads(child.0.id(), "corsair-sidecar"), [ours]);
    assert_eq!(
        nice_of_threads(child.0.id(), "corsair-sync"),
        [(ours + 10).min(19)]
    );
    let policy = admin_get(&admin, "/policy").await;
    assert!(policy.contains("\"source\": \"policy file\""), "{policy}");
    let metrics = admin_get(&admin, "/metrics").await;
    let denied = metrics
        .lines()
        .find(|l| {
            l.starts_with(r#"corsair_sidecar_requests_total{kind="preflight",outcome="denied",reason="origin"}"#)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(denied >= Some(1), "{metrics}");
    assert!(
        metrics.contains(r#"corsair_sidecar_sync_state{state="none"} 1"#),
        "{metrics}"
    );
    stop(child);
}

/// Starts the sidecar with at most `files` open files; returns it with its proxy address and
/// its log lines, as they come.
fn start_with_open_files(
    files: u32,
    args: &[&str],
) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("sh")
        .args(["-c", &format!("ulimit -n {files} && exec \"$0\" \"$@\"")])
        .arg(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let proxy = loop {
        let line = strip_ansi(&lines.next().expect("the sidecar logs its address").unwrap());
        if line.contains("sidecar listening") {
            break field(&line, "address").unwrap();
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(strip_ansi(&line));
        }
    });
    (child, proxy, rx)
}

/// CPU time (user and system) process `pid` has used, in clock ticks (USER_HZ, 100 a second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime: fields 14 and 15, counted from the pid.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors, the sidecar neither spins nor floods its log: a failed accept
/// backs off (5 ms doubling up to 1 s) and is logged at most once a second. Once connections
/// close, it accepts again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_accepts_back_off_and_recover() {
    let up = upstream().await;
    // Silent connections stay open: the header timeout is an hour.
    let (child, proxy, logs) = start_with_open_files(
        64,
        &[
            "--upstream",
            &up.to_string(),
            "--service",
            "shop",
            "--no-policy",
            "pass",
            "--client-header-timeout-secs",
            "3600",
        ],
    );
    let pid = child.id();
    let child = Sidecar(child);
    let next_line = || {
        logs.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the sidecar logs on")
    };
    // More connections than descriptors: those beyond wait in the listen backlog.
    let mut hogs = Vec::new();
    for _ in 0..100 {
        hogs.push(TcpStream::connect(&proxy).await.unwrap());
    }
    while !next_line().contains("accept failed; backing off") {}
    let before = cpu_ticks(pid);
    let mut failure_lines = 0;
    let window = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while let Some(left) = window.checked_duration_since(std::time::Instant::now()) {
        match logs.recv_timeout(left) {
            Ok(line) => failure_lines += usize::from(line.contains("accept failed")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Err(error) => panic!("{error}"),
        }
    }
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop takes a whole core: 100 ticks in that second.
    assert!(
        used <= 10,
        "{used} ticks of CPU in a second out of descriptors"
    );
    assert!(failure_lines <= 2, "{failure_lines} lines in a second");
    drop(hogs);
    while !next_line().contains("accepting connections again") {}
    let answer = http(
        &proxy,
        "GET / HTTP/1.1\r\nHost: api.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    stop(child);
}
