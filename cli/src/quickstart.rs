//! `corsairctl quickstart`: the whole system on one machine, on the embedded default. Starts
//! the real `corsair-control-plane` (SQLite) and `corsair-sidecar` binaries found next to
//! this one, a small demo service in this process, and applies an example policy; prints
//! the policy in force and what to try; on Ctrl-C or SIGTERM stops the sidecar, then the
//! control plane, cleanly. Each run appends to the logs of the ones before.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use corsair_proto::v1;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tonic::Code;

use crate::client::Client;
use crate::doc::{self, PolicyDoc};
use crate::error::CliError;

/// The example policy for the demo service.
pub const DEMO_POLICY: &str = include_str!("../examples/demo.yaml");

/// The service the demo policy is for.
const DEMO_SERVICE: &str = "demo";

/// How long a stopping process may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Flags of `quickstart`.
#[derive(Debug, Clone, Args)]
pub struct QuickstartArgs {
    /// Where the database, the sidecar's cache, the logs and the example policy files go.
    #[arg(long, default_value = ".corsair-quickstart")]
    dir: PathBuf,
    /// The control plane's gRPC listener (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    control_plane_listen: SocketAddr,
    /// The sidecar's listener: the demo service as browsers reach it.
    #[arg(long, default_value = "127.0.0.1:7480")]
    listen: SocketAddr,
    /// The sidecar's admin listener (/metrics, /policy, /readyz).
    #[arg(long, default_value = "127.0.0.1:7481")]
    admin_listen: SocketAddr,
    /// Where corsair-control-plane and corsair-sidecar are (default: next to corsairctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// A child process whose JSON log goes to a file, once its "listening" line is seen.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// The tasks copying its standard output and error into `log`, awaited when it stops so
    /// that no last line is lost.
    copying: Vec<tokio::task::JoinHandle<()>>,
}

/// How long a process may take to say it listens.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The start of the line that opens each run's part of a log.
const RUN_SEPARATOR: &str = "===== quickstart run started";

impl Process {
    /// Starts `bin` with `args` in its own process group (so a terminal's Ctrl-C reaches only
    /// the quickstart, which stops the processes in order), appends its standard output and
    /// error to `log` after a line opening this run, and waits for the log line whose message
    /// is `ready`; returns that line's fields.
    async fn start(
        name: &'static str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
        ready: &'static str,
    ) -> Result<(Process, serde_json::Value), CliError> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .arg("--log-format")
            .arg("json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CliError::Local(format!("cannot start {}: {e}", bin.display())))?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .await
            .map_err(|e| CliError::Local(format!("cannot open {}: {e}", log.display())))?;
        let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        file.write_all(format!("{RUN_SEPARATOR} {started} =====\n").as_bytes())
            .await
            .map_err(|e| CliError::Local(format!("cannot write {}: {e}", log.display())))?;
        let file = std::sync::Arc::new(tokio::sync::Mutex::new(file));
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (found, listening) = oneshot::channel();
        let out_file = file.clone();
        let stdout_copy = tokio::spawn(async move {
            let mut found = Some(found);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut file = out_file.lock().await;
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                if found.is_some()
                    && let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                    && log["fields"]["message"] == ready
                    && let Some(found) = found.take()
                {
                    let _ = found.send(log["fields"].clone());
                }
            }
            let _ = out_file.lock().await.flush().await;
        });
        // Standard error carries the one-line reason a process could not start or stopped.
        let errors = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let seen = errors.clone();
        let stderr_copy = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                seen.lock()
                    .expect("stderr lock")
                    .push_str(&format!("{line}\n"));
                let mut file = file.lock().await;
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
            }
            let _ = file.lock().await.flush().await;
        });
        match tokio::time::timeout(START_LIMIT, listening).await {
            Ok(Ok(fields)) => Ok((
                Process {
                    name,
                    child,
                    log,
                    copying: vec![stdout_copy, stderr_copy],
                },
                fields,
            )),
            Ok(Err(_)) => {
                // It exited before listening.
                let status = child.wait().await.ok();
                let _ = stderr_copy.await;
                let why = errors.lock().expect("stderr lock").trim().to_owned();
                Err(CliError::Local(format!(
                    "{name} did not start ({}): {why}",
                    status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                )))
            }
            Err(_) => Err(CliError::Local(format!(
                "{name} did not start listening within {}s; see {}",
                START_LIMIT.as_secs(),
                log.display()
            ))),
        }
    }

    /// SIGTERM, then waits; kills it if it takes longer than the grace period.
    async fn stop(mut self) -> Result<(), CliError> {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let stopped = tokio::time::timeout(STOP_GRACE, self.child.wait()).await;
        for task in self.copying.drain(..) {
            let _ = task.await;
        }
        match stopped {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(CliError::Local(format!(
                "{} exited with {status}; see {}",
                self.name,
                self.log.display()
            ))),
            Ok(Err(e)) => Err(CliError::Local(format!("{}: {e}", self.name))),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(CliError::Local(format!(
                    "{} did not stop within {}s and was killed",
                    self.name,
                    STOP_GRACE.as_secs()
                )))
            }
        }
    }
}

fn field_addr(fields: &serde_json::Value, key: &str, name: &str) -> Result<SocketAddr, CliError> {
    fields[key]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| CliError::Local(format!("{name} did not log its {key} address")))
}

/// Runs the quickstart until Ctrl-C or SIGTERM. Returns whether everything stopped cleanly.
pub async fn run(args: &QuickstartArgs, deadline: Duration) -> Result<bool, CliError> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .ok_or_else(|| CliError::Local("cannot tell where corsairctl is".into()))?,
    };
    let control_plane_bin = bin_dir.join("corsair-control-plane");
    let sidecar_bin = bin_dir.join("corsair-sidecar");
    for bin in [&control_plane_bin, &sidecar_bin] {
        if !bin.is_file() {
            return Err(CliError::Local(format!(
                "{} is missing: build every binary first (`cargo build`), or run scripts/quickstart.sh",
                bin.display()
            )));
        }
    }
    let dir = &args.dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let demo_file = dir.join("demo.yaml");
    let add_origin_file = dir.join("demo-add-origin.yaml");
    write_new(&demo_file, DEMO_POLICY)?;
    write_new(&add_origin_file, &add_origin_example())?;

    // The admin token the control plane starts with on its first run, kept for later runs;
    // a new database starts with new tokens.
    let admin_token_file = dir.join("admin.token");
    if !dir.join("corsair.db").exists() {
        for stale in [admin_token_file.clone(), dir.join("sidecar.token")] {
            let _ = std::fs::remove_file(stale);
        }
    }
    let admin_token = read_or_create_token(&admin_token_file)?;
    let (control_plane, fields) = Process::start(
        "the control plane",
        &control_plane_bin,
        &[
            "--listen".into(),
            args.control_plane_listen.to_string(),
            "--database-url".into(),
            format!("sqlite://{}", dir.join("corsair.db").display()),
            "--replica-id".into(),
            "quickstart".into(),
        ],
        &[("CORSAIR_BOOTSTRAP_TOKEN", &admin_token)],
        dir.join("control-plane.log"),
        "control plane listening",
    )
    .await?;
    let control_plane_addr = field_addr(&fields, "address", "the control plane")?;
    let grpc = format!("http://{control_plane_addr}");

    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Local(format!("cannot start the demo service: {e}")))?;
    let upstream_addr = upstream
        .local_addr()
        .map_err(|e| CliError::Local(e.to_string()))?;
    let demo = tokio::spawn(serve_demo(upstream));

    let client = Client::connect(&grpc, deadline, Some(&admin_token), None).await?;
    let created = match ensure_demo_policy(&client).await {
        // The database was made with another admin token than the one kept beside it.
        Err(e) if e.code() == Some(Code::Unauthenticated) => {
            return Err(CliError::Local(format!(
                "the control plane refuses the admin token in {}: the database in {} was \
                 created with another one; remove {} to start afresh",
                admin_token_file.display(),
                dir.display(),
                dir.display()
            )));
        }
        created => created?,
    };
    let sidecar_token = sidecar_token(&client, &dir.join("sidecar.token")).await?;

    let (sidecar, fields) = Process::start(
        "the sidecar",
        &sidecar_bin,
        &[
            "--listen".into(),
            args.listen.to_string(),
            "--admin-listen".into(),
            args.admin_listen.to_string(),
            "--upstream".into(),
            upstream_addr.to_string(),
            "--service".into(),
            DEMO_SERVICE.into(),
            "--control-plane".into(),
            grpc.clone(),
            "--cache-file".into(),
            dir.join("demo.policy-cache.json").display().to_string(),
            "--sidecar-id".into(),
            "quickstart-demo".into(),
        ],
        &[("CORSAIR_TOKEN", &sidecar_token)],
        dir.join("sidecar.log"),
        "sidecar listening",
    )
    .await?;
    let sidecar_addr = field_addr(&fields, "address", "the sidecar")?;
    let admin_addr = field_addr(&fields, "admin", "the sidecar")?;
    wait_ready(admin_addr, Duration::from_secs(30)).await?;
    let in_force = policy_in_force(&client).await?;

    crate::output::print(&banner(&Banner {
        dir,
        grpc: &grpc,
        default_grpc: args.control_plane_listen.to_string() == "127.0.0.1:7400",
        sidecar: sidecar_addr,
        admin: admin_addr,
        upstream: upstream_addr,
        created,
        in_force: &in_force,
        add_origin_file: &add_origin_file,
        demo_file: &demo_file,
        admin_token_file: &admin_token_file,
    }))?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Local(format!("cannot handle SIGTERM: {e}")))?;
    let mut control_plane = control_plane;
    let mut sidecar = sidecar;
    let exited = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        status = sidecar.child.wait() => Some(("the sidecar", status, sidecar.log.clone())),
        status = control_plane.child.wait() => Some(("the control plane", status, control_plane.log.clone())),
    };
    eprintln!("stopping…");
    let logs = [control_plane.log.clone(), sidecar.log.clone()];
    let sidecar_stopped = sidecar.stop().await;
    let control_plane_stopped = control_plane.stop().await;
    demo.abort();
    if let Some((name, status, log)) = exited {
        return Err(CliError::Local(format!(
            "{name} exited unexpectedly ({}); see {}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            log.display()
        )));
    }
    let mut clean = true;
    for stopped in [sidecar_stopped, control_plane_stopped] {
        if let Err(e) = stopped {
            eprintln!("error: {e}");
            clean = false;
        }
    }
    if clean {
        eprintln!(
            "stopped; the database is in {}; the logs are in {} and {}, earlier runs' kept \
             above this one's (each run starts at a \"{RUN_SEPARATOR}\" line)",
            dir.display(),
            logs[0].display(),
            logs[1].display()
        );
    }
    Ok(clean)
}

/// A new random token (`corsair_` and 64 hex digits).
fn new_token() -> Result<String, CliError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| CliError::Local(format!("no randomness: {e}")))?;
    Ok(format!(
        "corsair_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The token kept in `path`, or a new one written there readable by the owner only.
fn read_or_create_token(path: &Path) -> Result<String, CliError> {
    if let Ok(token) = std::fs::read_to_string(path) {
        return Ok(token.trim().to_owned());
    }
    let token = new_token()?;
    write_secret(path, &token)?;
    Ok(token)
}

fn write_secret(path: &Path, secret: &str) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(format!("{secret}\n").as_bytes())
        .map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))
}

/// The demo sidecar's token, scoped to the demo service: kept in `path` from an earlier
/// run, or created now.
async fn sidecar_token(client: &Client, path: &Path) -> Result<String, CliError> {
    if let Ok(token) = std::fs::read_to_string(path) {
        return Ok(token.trim().to_owned());
    }
    let created = client
        .call(
            "creating the sidecar's token",
            client
                .tokens()
                .create_token(client.request(v1::CreateTokenRequest {
                    display_name: "quickstart-demo-sidecar".into(),
                    role: "sidecar".into(),
                    services: vec![DEMO_SERVICE.into()],
                    ttl_seconds: 0,
                    reason: "quickstart sidecar".into(),
                })),
        )
        .await?;
    write_secret(path, &created.secret)?;
    Ok(created.secret)
}

/// The example policy with a second origin.
fn add_origin_example() -> String {
    DEMO_POLICY.replace(
        &format!("  - {APP_ORIGIN}\n"),
        &format!("  - {APP_ORIGIN}\n  - {ADMIN_ORIGIN}\n"),
    )
}

/// Writes `contents` to `path` unless it exists (so the user's edits survive a restart).
fn write_new(path: &Path, contents: &str) -> Result<(), CliError> {
    if path.exists() {
        return Ok(());
    }
    std::fs::write(path, contents)
        .map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))
}

/// Creates the demo policy unless the service already has one (kept from an earlier run).
/// Returns whether it was created.
async fn ensure_demo_policy(client: &Client) -> Result<bool, CliError> {
    let docs = doc::parse("the example policy", DEMO_POLICY, Some(false))?;
    let policy = v1::Policy::from(&docs.policies[0].doc.spec());
    let created = client
        .call(
            "creating the example policy",
            client
                .policies()
                .create_policy(client.request(v1::CreatePolicyRequest {
                    policy: Some(policy),
                    validate_only: false,
                    reason: "quickstart example policy".into(),
                    acknowledged_risks: Vec::new(),
                })),
        )
        .await;
    match created {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The origin the example policy allows.
const APP_ORIGIN: &str = "https://app.example.com";

/// The origin the second example adds.
const ADMIN_ORIGIN: &str = "https://admin.example.com";

/// The demo service's policy as the control plane holds it, and how it answers the
/// preflights the banner suggests.
struct InForce {
    policy: PolicyDoc,
    app_allowed: bool,
    admin_allowed: bool,
}

/// Reads the demo policy back from the control plane, and has it explain a preflight from
/// each example origin, so that the banner says what is in force, whichever run stored it.
async fn policy_in_force(client: &Client) -> Result<InForce, CliError> {
    let name = corsair_proto::convert::policy_name(DEMO_SERVICE);
    let stored = client
        .call(
            &name,
            client
                .policies()
                .get_policy(client.request(v1::GetPolicyRequest {
                    name: name.clone(),
                    ..Default::default()
                })),
        )
        .await?;
    let allowed = async |origin: &str| -> Result<bool, CliError> {
        let explained = client
            .call(
                &name,
                client
                    .policies()
                    .explain_request(client.request(v1::ExplainRequestRequest {
                        target: Some(v1::explain_request_request::Target::Name(name.clone())),
                        request: Some(v1::ExplainedRequest {
                            origin: origin.into(),
                            method: "PUT".into(),
                            preflight: true,
                            ..Default::default()
                        }),
                    })),
            )
            .await?;
        Ok(explained.decision == v1::Decision::Allowed as i32)
    };
    Ok(InForce {
        policy: PolicyDoc::from_proto(&stored)?,
        app_allowed: allowed(APP_ORIGIN).await?,
        admin_allowed: allowed(ADMIN_ORIGIN).await?,
    })
}

/// Polls the sidecar's `/readyz` until it answers 200: the sidecar holds a policy.
async fn wait_ready(admin: SocketAddr, limit: Duration) -> Result<(), CliError> {
    let started = tokio::time::Instant::now();
    loop {
        if let Ok(200) = get_status(admin, "/readyz").await {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(CliError::Local(format!(
                "the sidecar was not ready within {}s (see http://{admin}/readyz)",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

/// The demo service: answers every request with a small JSON document describing it.
async fn serve_demo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(demo_response);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn demo_response(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = serde_json::json!({
        "service": DEMO_SERVICE,
        "message": "hello from the demo service",
        "method": request.method().as_str(),
        "path": request.uri().path(),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("x-demo-version", http::HeaderValue::from_static("1"));
    Ok(response)
}

struct Banner<'a> {
    dir: &'a Path,
    grpc: &'a str,
    default_grpc: bool,
    sidecar: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    created: bool,
    in_force: &'a InForce,
    add_origin_file: &'a Path,
    demo_file: &'a Path,
    admin_token_file: &'a Path,
}

/// The policy in force, a line per field.
fn policy_lines(p: &InForce, created: bool) -> String {
    let doc = &p.policy;
    let list = |items: &[String], none: &str| {
        if items.is_empty() {
            none.to_owned()
        } else {
            items.join(", ")
        }
    };
    format!(
        "\
The policy in force for the demo service (revision {revision}, {origin}):

  origins      {origins}
  methods      {methods}
  credentials  {credentials}
  mode         {mode}
",
        revision = doc.revision.unwrap_or_default(),
        origin = if created {
            "the example, created now"
        } else {
            "kept from an earlier run"
        },
        origins = list(&doc.allowed_origins, "none"),
        methods = list(&doc.allowed_methods, "none beyond GET, HEAD, POST"),
        credentials = if doc.allow_credentials {
            "allowed"
        } else {
            "not allowed"
        },
        mode = format!("{:?}", doc.mode).to_lowercase(),
    )
}

/// A suggested preflight, with what the policy in force makes of it.
fn preflight_lines(sidecar: SocketAddr, origin: &str, allowed: bool) -> String {
    let outcome = if allowed {
        "allows: 204 with Access-Control-Allow-* headers"
    } else {
        "denies: no Access-Control-Allow-* headers, so the browser refuses"
    };
    format!(
        "  # A preflight the policy {outcome}\n  curl -i -X OPTIONS http://{sidecar}/orders \
         -H 'Origin: {origin}' -H 'Access-Control-Request-Method: PUT'\n"
    )
}

/// What is running and what to try, with commands that work as printed.
fn banner(b: &Banner<'_>) -> String {
    let ctl = ctl_command(b.grpc, b.default_grpc);
    let s = b.sidecar;
    let change = if b.in_force.admin_allowed {
        format!(
            "  # See what applying the example policy (or your edit of it) would change, and apply it;
  # the sidecar takes it without a restart
  {ctl} policy diff -f {demo}
  {ctl} policy apply -f {demo} --reason 'back to the example'
",
            demo = b.demo_file.display(),
        )
    } else {
        format!(
            "  # Allow {ADMIN_ORIGIN} too: see the change, apply it; the sidecar takes it
  # without a restart, and the denied preflight above is now allowed
  {ctl} policy diff -f {add}
  {ctl} policy apply -f {add} --reason 'admin app'
",
            add = b.add_origin_file.display(),
        )
    };
    format!(
        "\
Corsair is running.

  control plane  {grpc}  (SQLite database in {dir})
  sidecar        http://{s}  in front of the demo service http://{up}
  sidecar admin  http://{admin}  (/readyz /metrics /policy)
  logs           {dir}/control-plane.log, {dir}/sidecar.log (appended: earlier runs' kept above)

{policy}
Try:

{app}
{admin_preflight}
  # corsairctl authenticates with the admin token created on the first run
  export CORSAIR_TOKEN=$(cat {token})

{change}
  # Watch the audit log (another terminal), see the sidecar in sync, explain a request
  {ctl} audit list --follow
  {ctl} fleet status
  {ctl} policy explain --service demo --origin https://admin.example.com --method PUT

  # Edit the policy yourself: {demo}, then apply it the same way.

Ctrl-C stops everything.
",
        grpc = b.grpc,
        dir = b.dir.display(),
        up = b.upstream,
        admin = b.admin,
        policy = policy_lines(b.in_force, b.created),
        app = preflight_lines(s, APP_ORIGIN, b.in_force.app_allowed),
        admin_preflight = preflight_lines(s, ADMIN_ORIGIN, b.in_force.admin_allowed),
        demo = b.demo_file.display(),
        token = b.admin_token_file.display(),
    )
}

/// How to run corsairctl from where the user is: by name if the one on `PATH` is this one,
/// otherwise by path; with `--addr` unless the control plane is on the default address.
fn ctl_command(grpc: &str, default_addr: bool) -> String {
    let exe = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join("corsairctl");
            candidate.is_file() && candidate.canonicalize().ok() == exe.clone()
        })
    });
    let mut command = if on_path {
        "corsairctl".to_owned()
    } else {
        let exe = exe.unwrap_or_else(|| PathBuf::from("corsairctl"));
        let cwd = std::env::current_dir().unwrap_or_default();
        match exe.strip_prefix(&cwd) {
            Ok(relative) if relative.components().count() == 1 => {
                format!("./{}", relative.display())
            }
            Ok(relative) => relative.display().to_string(),
            Err(_) => exe.display().to_string(),
        }
    };
    if !default_addr {
        command.push_str(&format!(" --addr {grpc}"));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_policies_parse() {
        let docs = doc::parse("demo.yaml", DEMO_POLICY, None).unwrap().policies;
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].doc.service, DEMO_SERVICE);
        let (valid, findings) = corsair_policy::lint(&docs[0].doc.spec());
        assert!(valid.is_some(), "{findings:?}");
    }

    #[test]
    fn the_second_example_adds_an_origin() {
        let docs = doc::parse("add.yaml", &add_origin_example(), None)
            .unwrap()
            .policies;
        assert_eq!(
            docs[0].doc.allowed_origins,
            ["https://app.example.com", "https://admin.example.com"]
        );
    }
}
