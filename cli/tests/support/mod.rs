//! Real processes for the end-to-end tests: the `corsair-control-plane` and `corsair-sidecar`
//! binaries (built beside `corsairctl`), each test with its own database and ports.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

/// The `corsairctl` under test.
pub const CTL: &str = env!("CARGO_BIN_EXE_corsairctl");

/// A sibling binary of `corsairctl`, in the same profile. `cargo test --workspace` (as
/// `scripts/test.sh` runs it) has built it with everything else; when this package's tests
/// run alone and it is missing, it is built here. (Building it here every time would build it
/// with other features than the workspace build, and the two would keep rebuilding each
/// other's binaries.)
pub fn sibling(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = Path::new(CTL).parent().expect("corsairctl has a directory");
    let path = dir.join(name);
    if !path.is_file() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args([
                "build",
                "--bins",
                "-p",
                "corsair-control-plane",
                "-p",
                "corsair-sidecar",
            ]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "building the other binaries failed");
        });
    }
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// A child process whose standard output is read line by line on a thread (so a chatty
/// child never blocks on a full pipe); killed when dropped, so a failing test leaves no
/// process behind.
pub struct Running {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    /// The next line it prints; `None` once it has closed its output.
    pub fn next_line(&self) -> Option<String> {
        self.lines.recv().ok()
    }

    /// Every line it printed from now until it closed its output.
    pub fn rest(&self) -> Vec<String> {
        self.lines.iter().collect()
    }

    /// Reads JSON log lines until one whose message is `message`; returns its fields.
    pub fn wait_for_log(&mut self, message: &str) -> serde_json::Value {
        loop {
            let line = self
                .next_line()
                .unwrap_or_else(|| panic!("the process exited before logging {message:?}"));
            if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                && log["fields"]["message"] == message
            {
                return log["fields"].clone();
            }
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The admin token every test control plane starts with.
pub const ADMIN_TOKEN: &str = "corsair_test-admin-token-0123456789abcdef0123456789";

/// Starts a binary with JSON logs on stdout.
pub fn spawn(bin: &Path, args: &[&str]) -> Running {
    spawn_env(bin, &[args, &["--log-format", "json"]].concat(), &[])
}

/// Starts a binary with its standard output piped.
pub fn spawn_plain(bin: &Path, args: &[&str]) -> Running {
    spawn_env(bin, args, &[])
}

/// Starts a binary with its standard output piped and `env` set.
pub fn spawn_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(bin)
        .args(args)
        .env_remove("CORSAIR_TOKEN")
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines }
}

/// A control plane on its own SQLite database and port.
pub struct ControlPlane {
    pub process: Running,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl ControlPlane {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cp.db").display());
        let mut process = spawn_env(
            &sibling("corsair-control-plane"),
            &[
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &url,
                "--log-format",
                "json",
            ],
            &[("CORSAIR_BOOTSTRAP_TOKEN", ADMIN_TOKEN)],
        );
        let fields = process.wait_for_log("control plane listening");
        let addr = format!("http://{}", fields["address"].as_str().unwrap());
        ControlPlane { process, addr, dir }
    }

    /// Runs `corsairctl --addr <this> args…` as the admin.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        self.ctl_as(ADMIN_TOKEN, args)
    }

    /// Runs `corsairctl --addr <this> args…` with `token`.
    pub fn ctl_as(&self, token: &str, args: &[&str]) -> Ctl {
        ctl_with(&[&["--addr", &self.addr], args].concat(), None, Some(token))
    }

    /// Runs `corsairctl --addr <this> args…` as the admin, with `stdin` as standard input.
    pub fn ctl_stdin(&self, args: &[&str], stdin: &str) -> Ctl {
        ctl_with(
            &[&["--addr", &self.addr], args].concat(),
            Some(stdin),
            Some(ADMIN_TOKEN),
        )
    }

    /// A new token with `role` (and, for a sidecar, `services`), as the admin creates it.
    pub fn token(&self, name: &str, role: &str, services: &[&str]) -> String {
        let mut args = vec!["token", "create", "--name", name, "--role", role];
        for s in services {
            args.extend(["--service", s]);
        }
        let out = self.ctl(&args);
        assert_eq!(out.code, 0, "{out:?}");
        out.stdout.trim().to_owned()
    }

    /// Writes a file in this test's directory and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }

    /// `args` with `-o json`, parsed; panics unless it succeeded.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(&[args, &["-o", "json"]].concat());
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }
}

/// Polls `done` until it holds. Each poll is a full round trip to a process; the bound
/// only turns a hang into a failure that says what was awaited.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("gave up waiting until {what}");
}

/// What a `corsairctl` run printed.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `corsairctl args…` without a token.
pub fn ctl(args: &[&str], stdin: Option<&str>) -> Ctl {
    ctl_with(args, stdin, None)
}

/// Runs `corsairctl args…`, with `CORSAIR_TOKEN` set to `token` if given.
pub fn ctl_with(args: &[&str], stdin: Option<&str>, token: Option<&str>) -> Ctl {
    let mut command = Command::new(CTL);
    command.env_remove("CORSAIR_TOKEN");
    if let Some(token) = token {
        command.env("CORSAIR_TOKEN", token);
    }
    let mut child = command
        .args(args)
        .env_remove("CORSAIR_ADDR")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Ctl {
        code: status.code().expect("exited, not killed"),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// A `corsair-sidecar` for service `shop` (its upstream never dialled) following the control
/// plane at `control_plane`, with JSON logs, `extra` flags and `env`.
pub fn shop_sidecar(control_plane: &str, extra: &[&str], env: &[(&str, &str)]) -> Running {
    spawn_env(
        &sibling("corsair-sidecar"),
        &[
            &[
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
                "--service",
                "shop",
                "--control-plane",
                control_plane,
                "--log-format",
                "json",
            ],
            extra,
        ]
        .concat(),
        env,
    )
}
