//! The pieces of an end-to-end run: the real `corsair-control-plane` and `corsair-sidecar`
//! binaries as processes (found in the target directory beside this test), a real upstream,
//! policies whose every revision is recognisable in response headers, and steady client
//! traffic that checks every response. Every wait here has a [`Deadline`]; a scenario that
//! cannot run on this machine says so with [`skip`].

#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use corsair_proto::v1;
use tonic::transport::Channel;

/// The admin token every control plane here starts with.
pub const ADMIN: &str = "corsair_e2e-admin-token-0123456789abcdef0123456789";
/// The origin every policy here allows.
pub const ORIGIN: &str = "https://app.example.com";
/// The service every sidecar here serves.
pub const SERVICE: &str = "shop";

pub use corsair_testkit::{Deadline, PATIENCE, skip, within};

/// One test per backend for the scenario `$name(backend)`: SQLite, and two replicas on
/// PostgreSQL. The scenario's module must import `Backend`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_two_replicas() {
                super::$name(super::Backend::Postgres).await;
            }
        }
    )*};
}

/// A binary of the workspace, from the target directory this test runs from; built when
/// missing (when this package's tests run alone).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
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
                "-p",
                "corsair-cli",
            ]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            assert!(
                build.status().unwrap().success(),
                "building the binaries failed"
            );
        });
    }
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// A free port on loopback (for a process that must come back on the same address).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process whose JSON log lines are read on a thread; killed when dropped.
pub struct Process {
    pub child: Child,
    /// The binary's file name, for messages.
    name: String,
    lines: std::sync::mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn spawn(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn_with(Command::new(bin), bin, args, env)
    }

    /// [`Process::spawn`] with at most `nofile` file descriptors (`ulimit -n`), set by a
    /// shell that then becomes the binary.
    pub fn spawn_limited(bin: &Path, args: &[&str], env: &[(&str, &str)], nofile: u32) -> Process {
        let mut shell = Command::new("sh");
        shell
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin);
        Process::spawn_with(shell, bin, args, env)
    }

    fn spawn_with(
        mut command: Command,
        bin: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let mut child = command
            .args(args)
            .args(["--log-format", "json"])
            .env_remove("CORSAIR_TOKEN")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        Process {
            child,
            name,
            lines,
            log,
        }
    }

    /// Waits for the log line whose message is `message`; its fields.
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        let deadline = Deadline::new(format!("{} to log {message:?}", self.name));
        loop {
            let line = match self.lines.recv_timeout(deadline.remaining()) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    deadline.expire(self.log.lock().unwrap().last().cloned().unwrap_or_default())
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{} exited before logging {message:?}", self.name)
                }
            };
            if let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                && log["fields"]["message"] == message
            {
                return log["fields"].clone();
            }
        }
    }

    /// Whether any log line so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// SIGKILL, and reaped.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; whether it then exited cleanly.
    pub fn terminate(mut self) -> bool {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Deadline::new(format!("{} to exit after SIGTERM", self.name));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            deadline.check("still running");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control plane on a fixed port (so it can come back on it) and a database.
pub struct ControlPlane {
    pub process: Process,
    pub port: u16,
    pub url: String,
}

impl ControlPlane {
    pub fn start(database_url: &str, port: u16, extra: &[&str]) -> ControlPlane {
        ControlPlane::start_limited(database_url, port, extra, None)
    }

    /// [`ControlPlane::start`], with at most `nofile` file descriptors when given.
    pub fn start_limited(
        database_url: &str,
        port: u16,
        extra: &[&str],
        nofile: Option<u32>,
    ) -> ControlPlane {
        let listen = format!("127.0.0.1:{port}");
        let bin = binary("corsair-control-plane");
        let args = [
            &["--listen", &listen, "--database-url", database_url],
            extra,
        ]
        .concat();
        let env = [("CORSAIR_BOOTSTRAP_TOKEN", ADMIN)];
        let process = match nofile {
            None => Process::spawn(&bin, &args, &env),
            Some(nofile) => Process::spawn_limited(&bin, &args, &env, nofile),
        };
        process.wait_for_log("control plane listening");
        ControlPlane {
            process,
            port,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// Where a scenario keeps its policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One control plane on its own SQLite file.
    Sqlite,
    /// Two control-plane replicas sharing one new PostgreSQL database.
    Postgres,
}

/// A scenario's control plane: one process on SQLite or two replicas (`r0`, `r1`) on
/// PostgreSQL, each on a fixed port so that it can come back on it. Sidecars are given every
/// replica's address ([`Plane::addresses`]) and fail over between them.
pub struct Plane {
    database_url: String,
    extra: Vec<String>,
    pub ports: Vec<u16>,
    /// The running replicas (`None`: killed, or not started yet).
    pub replicas: Vec<Option<ControlPlane>>,
    /// The PostgreSQL database, dropped after the replicas (fields drop in order). A SQLite
    /// file is in the scenario's temporary directory.
    database: Option<PgDatabase>,
}

impl Plane {
    /// A plane on `backend` whose database and ports are chosen but which does not run yet;
    /// `None` when PostgreSQL is unreachable outside CI (see [`postgres_database`]).
    pub async fn prepare(backend: Backend, dir: &Path, extra: &[&str]) -> Option<Plane> {
        Some(match backend {
            Backend::Sqlite => Plane::new(
                format!("sqlite://{}", dir.join("cp.db").display()),
                None,
                1,
                extra,
            ),
            Backend::Postgres => Plane::on_postgres(postgres_database().await?, extra),
        })
    }

    /// Two replicas on `database`, not running yet.
    pub fn on_postgres(database: PgDatabase, extra: &[&str]) -> Plane {
        Plane::new(database.url.clone(), Some(database), 2, extra)
    }

    fn new(
        database_url: String,
        database: Option<PgDatabase>,
        count: usize,
        extra: &[&str],
    ) -> Plane {
        Plane {
            database_url,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ports: (0..count).map(|_| free_port()).collect(),
            replicas: (0..count).map(|_| None).collect(),
            database,
        }
    }

    /// [`Plane::prepare`], then every replica started.
    pub async fn start(backend: Backend, dir: &Path, extra: &[&str]) -> Option<Plane> {
        let mut plane = Plane::prepare(backend, dir, extra).await?;
        plane.start_all();
        Some(plane)
    }

    /// Starts every replica that is not running.
    pub fn start_all(&mut self) {
        for i in 0..self.ports.len() {
            if self.replicas[i].is_none() {
                let id = format!("r{i}");
                let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
                self.replicas[i] = Some(ControlPlane::start(
                    &self.database_url,
                    self.ports[i],
                    &[&["--replica-id", &id], &extra[..]].concat(),
                ));
            }
        }
    }

    /// SIGKILL to every replica: the whole control plane is gone.
    pub fn kill_all(&mut self) {
        for replica in &mut self.replicas {
            if let Some(cp) = replica.take() {
                cp.process.kill();
            }
        }
    }

    /// The running replica `i`.
    pub fn replica(&self, i: usize) -> &ControlPlane {
        self.replicas[i].as_ref().expect("the replica runs")
    }

    /// A channel to replica `i` (which may come and go).
    pub fn channel(&self, i: usize) -> Channel {
        channel(&format!("http://127.0.0.1:{}", self.ports[i]))
    }

    /// The usual opening: through replica `via`, revision 1 of the policy and a sidecar token;
    /// a real upstream; `count` sidecars (`s0`, … with `extra` flags) following every replica,
    /// each with a cache file in `dir`; and the fleet `SYNCED` on revision 1.
    pub async fn serve(&self, via: usize, count: usize, dir: &Path, extra: &[&str]) -> Served {
        let grpc = self.channel(via);
        let upstream = Upstream::start().await;
        let revision = write_policy(&grpc, 1).await;
        let token = sidecar_token(&grpc).await;
        let sidecars = Sidecar::fleet(count, &self.addresses(), upstream.addr, dir, &token, extra);
        converged(&grpc, count, revision).await;
        Served {
            grpc,
            upstream,
            sidecars,
            revision,
        }
    }

    /// Every replica's address, as a sidecar's `--control-plane` takes them.
    pub fn addresses(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What [`Plane::serve`] set up.
pub struct Served {
    /// To the replica the policy was written through.
    pub grpc: Channel,
    pub upstream: Upstream,
    pub sidecars: Vec<Sidecar>,
    /// The revision the fleet is on.
    pub revision: i64,
}

/// A gRPC channel to `url`, connected lazily (so it survives the server coming and going).
pub fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned()).unwrap().connect_lazy()
}

pub fn bearer<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    request
}

/// Revision `n` of the policy: it allows [`ORIGIN`] and exposes `x-rev-n` and `x-check-n`,
/// so a response tells which revision produced it, and a response mixing two revisions shows.
pub fn policy(n: u64) -> v1::Policy {
    v1::Policy {
        service: SERVICE.into(),
        allowed_origins: vec![ORIGIN.into()],
        exposed_headers: vec![format!("x-rev-{n}"), format!("x-check-{n}")],
        ..Default::default()
    }
}

/// Writes revision `n` of the policy (creating it for `n == 1`), retrying while the control
/// plane is unavailable; the global revision it got.
pub async fn write_policy(channel: &Channel, n: u64) -> i64 {
    let mut client = v1::policy_service_client::PolicyServiceClient::new(channel.clone());
    let deadline = Deadline::new(format!(
        "the control plane to take revision {n} of the policy"
    ));
    loop {
        let result = if n == 1 {
            client
                .create_policy(bearer(v1::CreatePolicyRequest {
                    policy: Some(policy(1)),
                    ..Default::default()
                }))
                .await
                .map(|r| r.into_inner().revision)
        } else {
            let current = client
                .get_policy(bearer(v1::GetPolicyRequest {
                    name: format!("services/{SERVICE}/policy"),
                    ..Default::default()
                }))
                .await;
            match current {
                Err(status) => Err(status),
                Ok(current) => client
                    .update_policy(bearer(v1::UpdatePolicyRequest {
                        policy: Some(v1::Policy {
                            etag: current.into_inner().etag,
                            ..policy(n)
                        }),
                        ..Default::default()
                    }))
                    .await
                    .map(|r| r.into_inner().revision),
            }
        };
        match result {
            Ok(revision) => return revision,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                deadline.check(format_args!("{status:?}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("writing revision {n}: {status:?}"),
        }
    }
}

/// A sidecar token for [`SERVICE`].
pub async fn sidecar_token(channel: &Channel) -> String {
    v1::token_service_client::TokenServiceClient::new(channel.clone())
        .create_token(bearer(v1::CreateTokenRequest {
            display_name: "e2e-sidecar".into(),
            role: "sidecar".into(),
            services: vec![SERVICE.into()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .secret
}

/// Waits until every sidecar in fleet status is `SYNCED` at `revision` or later (retrying
/// while the control plane is away); how long that took.
pub async fn converged(channel: &Channel, sidecars: usize, revision: i64) -> Duration {
    let deadline = Deadline::new(format!(
        "fleet status to list {sidecars} sidecar(s) SYNCED at revision {revision} or later"
    ));
    let started = Instant::now();
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(channel.clone());
    loop {
        let listed = fleet
            .list_sidecars(bearer(v1::ListSidecarsRequest {
                page_size: 1000,
                state: v1::SidecarState::Synced as i32,
                ..Default::default()
            }))
            .await;
        let last_seen = match listed {
            Ok(list) => {
                let synced = list
                    .into_inner()
                    .sidecars
                    .iter()
                    .filter(|s| s.last_acked_revision >= revision)
                    .count();
                if synced >= sidecars {
                    return started.elapsed();
                }
                format!("{synced} there")
            }
            Err(status) => format!("{status:?}"),
        };
        deadline.check(last_seen);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sidecar process in front of `upstream`, following a control plane.
pub struct Sidecar {
    pub process: Process,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Sidecar {
    /// A sidecar `id` following `control_plane` (one address, or several separated by commas).
    pub fn start(
        control_plane: &str,
        upstream: SocketAddr,
        cache: &Path,
        token: &str,
        id: &str,
        extra: &[&str],
    ) -> Sidecar {
        Sidecar::start_limited(control_plane, upstream, cache, token, id, extra, None)
    }

    /// [`Sidecar::start`], with at most `nofile` file descriptors when given.
    pub fn start_limited(
        control_plane: &str,
        upstream: SocketAddr,
        cache: &Path,
        token: &str,
        id: &str,
        extra: &[&str],
        nofile: Option<u32>,
    ) -> Sidecar {
        let upstream = upstream.to_string();
        let cache = cache.display().to_string();
        let bin = binary("corsair-sidecar");
        let args = [
            &[
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--upstream",
                &upstream,
                "--service",
                SERVICE,
                "--control-plane",
                control_plane,
                "--cache-file",
                &cache,
                "--sidecar-id",
                id,
            ],
            extra,
        ]
        .concat();
        let env = [("CORSAIR_TOKEN", token)];
        let process = match nofile {
            None => Process::spawn(&bin, &args, &env),
            Some(nofile) => Process::spawn_limited(&bin, &args, &env, nofile),
        };
        let fields = process.wait_for_log("sidecar listening");
        Sidecar {
            process,
            addr: fields["address"].as_str().unwrap().parse().unwrap(),
            admin: fields["admin"].as_str().unwrap().parse().unwrap(),
        }
    }

    /// `count` sidecars `s0`, `s1`, … following `control_plane`, each with its own cache file
    /// in `dir`.
    pub fn fleet(
        count: usize,
        control_plane: &str,
        upstream: SocketAddr,
        dir: &Path,
        token: &str,
        extra: &[&str],
    ) -> Vec<Sidecar> {
        (0..count)
            .map(|i| {
                Sidecar::start(
                    control_plane,
                    upstream,
                    &dir.join(format!("cache-{i}.json")),
                    token,
                    &format!("s{i}"),
                    extra,
                )
            })
            .collect()
    }

    /// The addresses clients reach `sidecars` on.
    pub fn addrs(sidecars: &[Sidecar]) -> Vec<SocketAddr> {
        sidecars.iter().map(|s| s.addr).collect()
    }

    /// The status of an admin path.
    pub fn admin_status(&self, path: &str) -> u16 {
        let (status, _) = request(self.admin, "GET", path, &[]).unwrap();
        status
    }
}

/// One HTTP/1.1 request on a new connection: (status, lowercase head).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{method} {path} to {addr}: no whole answer within {PATIENCE:?}: {e}"),
        )
    })?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    Ok((status, response.to_ascii_lowercase()))
}

/// The revision a response's CORS headers show (`x-rev-n` and `x-check-n` must agree);
/// `Err` for a response without them or with two revisions mixed.
pub fn revision_of(head: &str) -> Result<u64, String> {
    let value = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-expose-headers:"))
        .ok_or_else(|| format!("no expose-headers: {head}"))?;
    let mut rev = None;
    let mut check = None;
    for name in value.split(',').map(str::trim) {
        if let Some(n) = name.strip_prefix("x-rev-") {
            rev = n.parse::<u64>().ok();
        } else if let Some(n) = name.strip_prefix("x-check-") {
            check = n.parse::<u64>().ok();
        }
    }
    match (rev, check) {
        (Some(r), Some(c))
            if r == c && head.contains(&format!("access-control-allow-origin: {ORIGIN}")) =>
        {
            Ok(r)
        }
        _ => Err(format!(
            "a response mixing revisions or missing headers: {head}"
        )),
    }
}

/// Steady client traffic: one keep-alive connection per sidecar per worker, sequential
/// cross-origin GETs, each response checked.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub served: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<String>>>,
    /// The newest policy revision number written so far (`policy(n)`'s n).
    pub written: Arc<AtomicI64>,
    /// Whether upstream errors (502) are expected right now, and so not failures.
    pub upstream_down: Arc<AtomicBool>,
    pub bad_gateway: Arc<AtomicU64>,
    /// Latency of every served request since the last [`Load::take_latencies`], µs.
    pub latencies: Arc<Mutex<Vec<u32>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(sidecars: &[SocketAddr], per_sidecar: usize, written: i64) -> Load {
        Load::start_paced(sidecars, per_sidecar, written, None)
    }

    /// [`Load::start`], each worker pausing `pace` between requests (to leave the machine's
    /// cores to what is under test when there are many workers).
    pub fn start_paced(
        sidecars: &[SocketAddr],
        per_sidecar: usize,
        written: i64,
        pace: Option<Duration>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(AtomicI64::new(written));
        let upstream_down = Arc::new(AtomicBool::new(false));
        let bad_gateway = Arc::new(AtomicU64::new(0));
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for &addr in sidecars {
            for _ in 0..per_sidecar {
                let (stop, served, failures, written, upstream_down, bad_gateway, latencies) = (
                    stop.clone(),
                    served.clone(),
                    failures.clone(),
                    written.clone(),
                    upstream_down.clone(),
                    bad_gateway.clone(),
                    latencies.clone(),
                );
                workers.push(std::thread::spawn(move || {
                    let mut connection: Option<BufReader<TcpStream>> = None;
                    let mut last = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(pace) = pace {
                            std::thread::sleep(pace);
                        }
                        let conn = match &mut connection {
                            Some(c) => c,
                            None => match TcpStream::connect(addr) {
                                Ok(s) => {
                                    let _ = s.set_nodelay(true);
                                    // An answer that never comes is a failure, not a hang.
                                    let _ = s.set_read_timeout(Some(PATIENCE));
                                    connection.insert(BufReader::new(s))
                                }
                                Err(e) => {
                                    failures
                                        .lock()
                                        .unwrap()
                                        .push(format!("connect {addr}: {e}"));
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                            },
                        };
                        // The upstream counts as down for this request if it was when the
                        // request was sent or when its answer came: one sent while it was
                        // down may be answered after the flag is cleared.
                        let down_when_sent = upstream_down.load(Ordering::SeqCst);
                        let sent = Instant::now();
                        let answer = exchange(conn, addr);
                        let down = down_when_sent || upstream_down.load(Ordering::SeqCst);
                        let took = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                        match answer {
                            Ok((200, head)) => match revision_of(&head) {
                                Ok(n) if n as i64 > written.load(Ordering::SeqCst) => failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("revision {n} before it was written")),
                                Ok(n) if n < last => failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{addr} went back from revision {last} to {n}")),
                                Ok(n) => {
                                    last = n;
                                    served.fetch_add(1, Ordering::Relaxed);
                                    latencies.lock().unwrap().push(took);
                                }
                                Err(e) => failures.lock().unwrap().push(e),
                            },
                            Ok((502, _)) if down => {
                                bad_gateway.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, head)) => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("status {status}: {head}"));
                                connection = None;
                            }
                            Err(e) => {
                                if !down {
                                    failures.lock().unwrap().push(format!("{addr}: {e}"));
                                }
                                connection = None;
                            }
                        }
                    }
                }));
            }
        }
        Load {
            stop,
            served,
            failures,
            written,
            upstream_down,
            bad_gateway,
            latencies,
            workers,
        }
    }

    /// Waits until `more` further requests have been served (`what`: while what happens).
    pub fn wait_for(&self, more: u64, what: &str) {
        let deadline = Deadline::new(format!("{more} more requests served {what}"));
        let start = self.served.load(Ordering::Relaxed);
        loop {
            let served = self.served.load(Ordering::Relaxed) - start;
            if served >= more {
                return;
            }
            let failures = self.failures.lock().unwrap();
            assert!(failures.len() < 1000, "{:?}", &failures[..5]);
            deadline.check(format_args!(
                "{served} served, {} failed, e.g. {:?}",
                failures.len(),
                &failures[..failures.len().min(3)]
            ));
            drop(failures);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The latencies recorded since the last call, µs.
    pub fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }

    /// Stops the traffic; (requests served, failures).
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.served.load(Ordering::Relaxed), failures)
    }
}

/// One request on a keep-alive connection: (status, lowercase head).
fn exchange(conn: &mut BufReader<TcpStream>, addr: SocketAddr) -> std::io::Result<(u16, String)> {
    conn.get_mut().write_all(
        format!("GET /item HTTP/1.1\r\nHost: {addr}\r\nOrigin: {ORIGIN}\r\n\r\n").as_bytes(),
    )?;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed mid-response"));
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok((status, head))
}

/// A small real upstream on a fixed address, which can be stopped (every connection closed)
/// and started again.
pub struct Upstream {
    pub addr: SocketAddr,
    /// "METHOD path" of every request it received.
    pub seen: Arc<Mutex<Vec<String>>>,
    running: Option<(tokio::task::JoinHandle<()>, Arc<tokio::sync::Notify>)>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut upstream = Upstream {
            addr,
            seen: Arc::default(),
            running: None,
        };
        upstream.resume().await;
        upstream
    }

    /// Serves again on the same address.
    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let seen = self.seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let seen = seen.clone();
                        connections.spawn(async move {
                            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                                seen.lock().unwrap().push(format!("{} {}", req.method(), req.uri().path()));
                                async {
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::from_static(b"upstream\n")),
                                    ))
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    () = stopped.notified() => {
                        connections.abort_all();
                        return;
                    }
                }
            }
        });
        self.running = Some((task, stop));
    }

    /// Stops listening and closes every connection.
    pub async fn stop(&mut self) {
        if let Some((task, stop)) = self.running.take() {
            stop.notify_one();
            let _ = task.await;
        }
    }
}

/// A new, empty database on the PostgreSQL at `CORSAIR_TEST_POSTGRES_URL` (default: the
/// local server); `None` when that is unreachable outside CI (see [`skip`]).
pub async fn postgres_database() -> Option<PgDatabase> {
    let admin = std::env::var("CORSAIR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match PgDatabase::create(&admin).await {
        Ok(database) => Some(database),
        Err(e) => {
            skip(&format!("PostgreSQL at {admin} is unreachable ({e})"));
            None
        }
    }
}

/// A PostgreSQL database made for one scenario, dropped when this is, whether the scenario
/// passed or failed.
pub struct PgDatabase {
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    /// A new, empty database on the server `admin` (a URL of any database there) names.
    pub async fn create(admin: &str) -> Result<PgDatabase, sqlx::Error> {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(admin).await?;
        let name = format!("corsair_e2e_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut connection)
            .await?;
        let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
        Ok(PgDatabase {
            url: format!("{base}/{name}"),
            admin: admin.to_owned(),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // On a thread with a runtime of its own: this may run inside the test's runtime,
        // which cannot block on a future.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    use sqlx::Connection;
                    let mut connection = sqlx::PgConnection::connect(&admin).await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut connection)
                    .await
                })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop the test database {}: {e}", self.name);
        }
    }
}

/// Whether a sidecar's metrics say it is connected to a control plane.
pub fn sync_connected(sidecar: &Sidecar) -> bool {
    request(sidecar.admin, "GET", "/metrics", &[])
        .map(|(_, text)| text.contains("corsair_sidecar_sync_state{state=\"connected\"} 1"))
        .unwrap_or(false)
}

/// A process's resident memory (KiB) split into anonymous (heap, stacks) and file-backed (its
/// mapped binary and libraries), from /proc.
pub fn rss_parts(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
}

/// A process's resident memory (KiB) and open file descriptors, from /proc.
/// CPU time a process has used, user and system (from `/proc/<pid>/stat`, in clock ticks of
/// 10 ms).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let (utime, stime): (u64, u64) = (fields[11].parse().unwrap(), fields[12].parse().unwrap());
    utime + stime
}

pub fn rss_and_fds(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}
