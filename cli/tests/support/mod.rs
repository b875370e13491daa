//! Real processes for the end-to-end tests: the `corsair-control-plane` and `corsair-sidecar`
//! binaries (built beside `corsairctl`), each test with its own database and ports. Every
//! wait has a [`Deadline`].

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

pub use corsair_testkit::{Deadline, PATIENCE};

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
    /// The program's file name, for messages.
    pub name: String,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    /// The next line it prints; `None` once it has closed its output.
    pub fn next_line(&self) -> Option<String> {
        self.next_line_before(&Deadline::new(format!("a line from {}", self.name)))
    }

    fn next_line_before(&self, deadline: &Deadline) -> Option<String> {
        match self.lines.recv_timeout(deadline.remaining()) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => deadline.expire(""),
        }
    }

    /// Every line it printed from now until it closed its output.
    pub fn rest(&self) -> Vec<String> {
        let deadline = Deadline::new(format!("{} to close its output", self.name));
        std::iter::from_fn(|| self.next_line_before(&deadline)).collect()
    }

    /// Reads JSON log lines until one whose message is `message`; returns its fields.
    pub fn wait_for_log(&mut self, message: &str) -> serde_json::Value {
        let deadline = Deadline::new(format!("{} to log {message:?}", self.name));
        loop {
            let line = self
                .next_line_before(&deadline)
                .unwrap_or_else(|| panic!("{} exited before logging {message:?}", self.name));
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
        let deadline = Deadline::new(format!("{} to exit after SIGTERM", self.name));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            deadline.check("still running");
            std::thread::sleep(Duration::from_millis(10));
        }
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
    let name = bin.file_name().unwrap().to_string_lossy().into_owned();
    Running { child, name, lines }
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

/// Polls `done` until it holds; fails naming `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Deadline::new(what);
    while !done() {
        deadline.check("");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    // Which command, without a token given on the command line.
    let shown: Vec<&str> = args
        .iter()
        .scan(false, |after_token, arg| {
            let shown = if *after_token { "…" } else { arg };
            *after_token = *arg == "--token";
            Some(shown)
        })
        .collect();
    let deadline = Deadline::new(format!("corsairctl {} to exit", shown.join(" ")));
    let output = exited
        .recv_timeout(deadline.remaining())
        .unwrap_or_else(|_| {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            deadline.expire("still running")
        });
    let Output {
        status,
        stdout,
        stderr,
    } = output.unwrap();
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
