//! What every test crate shares: a [`Deadline`] for every wait, so that a hang fails naming
//! what it waited for, and [`skip`] for a test this machine cannot run, on record for the
//! test command's final summary.

use std::fmt::Display;
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long any wait here lasts before it fails: a guard against a hang, far above what the
/// awaited thing takes even on a loaded machine, not a bound on how fast it happens.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A wait that fails, naming what it waited for and what it saw last, once [`PATIENCE`] (or
/// its own limit) has passed.
pub struct Deadline {
    what: String,
    started: Instant,
    limit: Duration,
}

impl Deadline {
    /// A wait for `what`, for at most [`PATIENCE`].
    pub fn new(what: impl Into<String>) -> Deadline {
        Deadline::with_limit(PATIENCE, what)
    }

    /// A wait for `what`, for at most `limit`.
    pub fn with_limit(limit: Duration, what: impl Into<String>) -> Deadline {
        Deadline {
            what: what.into(),
            started: Instant::now(),
            limit,
        }
    }

    /// Fails the wait once the deadline has passed; `last_seen` says how far it got.
    pub fn check(&self, last_seen: impl Display) {
        if self.started.elapsed() >= self.limit {
            self.expire(last_seen);
        }
    }

    /// The time left, for a wait that takes a timeout.
    pub fn remaining(&self) -> Duration {
        self.limit.saturating_sub(self.started.elapsed())
    }

    /// Fails the wait: "timed out after 60s waiting for: … (last seen: …)".
    pub fn expire(&self, last_seen: impl Display) -> ! {
        let last_seen = last_seen.to_string();
        let last_seen = if last_seen.is_empty() {
            String::new()
        } else {
            format!(" (last seen: {last_seen})")
        };
        panic!(
            "timed out after {:?} waiting for: {}{last_seen}",
            self.limit, self.what
        );
    }
}

/// `future`'s output, or a failure naming `what` after [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    let deadline = Deadline::new(what);
    tokio::time::timeout(deadline.remaining(), future)
        .await
        .unwrap_or_else(|_| deadline.expire(""))
}

/// Skips the running test because `why`, except under `CI=true`, where that is a failure.
/// Says so on stderr and adds one line to the file `CORSAIR_SKIP_LOG` names, which
/// `scripts/test.sh` lists after the run (cargo shows no output of a test that passed).
pub fn skip(why: &str) {
    let mut scenario = test_binary();
    // The test harness names each test's thread after the test.
    if let Some(test) = std::thread::current().name().filter(|n| *n != "main") {
        scenario = format!("{scenario}::{test}");
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{scenario} cannot be skipped under CI=true: {why}");
    }
    eprintln!("\n!!! SKIPPING {scenario}: {why} !!!\n");
    if let Some(log) = std::env::var_os("CORSAIR_SKIP_LOG") {
        // One append of one whole line: lines of tests running in parallel never interleave.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| file.write_all(format!("{scenario}: {why}\n").as_bytes()))
            .unwrap_or_else(|e| panic!("recording the skip in {}: {e}", log.to_string_lossy()));
    }
}

/// The running test binary, as `<package> <test file>`: the package from the variable cargo
/// sets when it runs tests, the file from the binary's name less cargo's hash.
fn test_binary() -> String {
    let package = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let file = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => name.to_owned(),
            _ => stem,
        })
        .unwrap_or_default();
    format!("{package} {file}")
}
