//! The proxy benchmark: the same small upstream and the same load generator (`wrk`), side by
//! side in one run, against
//! - the upstream directly,
//! - the real `corsair-sidecar` binary following the real `corsair-control-plane`,
//! - nginx (one worker, upstream keepalive) configured to add the same CORS headers.
//!
//! Measured: throughput and p50/p99 latency for actual requests and for preflights, latency
//! at the same paced load for each (each connection waiting before each request), CPU time
//! per request of the proxy process, RSS idle and with 1,000 open keep-alive connections, new
//! upstream connections per request, and p99 and failures with 10 policy swaps per second
//! pushed by the control plane during load: against the same load without writes and with
//! 10 writes a second to another service, first with the control plane at normal priority,
//! then with it (and the other service's sidecar) at nice 19, then under `SCHED_IDLE`,
//! standing in for a control plane on a machine of its own.
//!
//! Run: `cargo build --release -p corsair-control-plane && cargo bench -p corsair-sidecar --bench proxy`
//! Needs `wrk` and `nginx` (Debian packages). Environment: `CORSAIR_BENCH_SECONDS` (per run,
//! default 10), `CORSAIR_BENCH_ROUNDS` (default 3), `CORSAIR_BENCH_CONNECTIONS` (wrk's `-c`,
//! default 64), `CORSAIR_BENCH_PACE_MS` (the paced runs' wait, default 4),
//! `CORSAIR_BENCH_SWAP_ROUNDS` (rounds of three runs a fifth of that long, with
//! and without swaps; default 24), `CORSAIR_CONTROL_PLANE_BIN`, and `CORSAIR_BENCH_BASELINE`:
//! the path of another `corsair-sidecar` build, run beside this one and loaded in the same
//! rounds, to compare two versions side by side (it stops before the swap runs).
//! `CORSAIR_BENCH_ONLY=swaps` measures the swaps alone, `CORSAIR_BENCH_ONLY=main` all but them,
//! `CORSAIR_BENCH_ONLY=instructions` counts each proxy's instructions per request under
//! callgrind instead (needs Debian's `valgrind`), and `CORSAIR_BENCH_ONLY=large` loads each
//! proxy with 256 KiB downloads, then uploads, instead (`CORSAIR_BENCH_LARGE_CONNECTIONS`
//! clients, default 128): throughput, CPU per exchange and peak RSS.
//! `CORSAIR_BENCH_SIDECAR` runs another `corsair-sidecar` build as the one under test,
//! and `CORSAIR_BENCH_KEEP=1` keeps the run's directory (callgrind dumps, configuration).
//!
//! The proxies under test share the last CPU, loaded one at a time, and everything else
//! (load generator, upstream, control plane) on the others, so that no proxy's tail latency
//! depends on whether the scheduler happened to put it beside the load generator;
//! `CORSAIR_BENCH_PIN=0` lets every process run on every CPU.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use corsair_proto::v1::{self, policy_service_client::PolicyServiceClient};

const SIDECAR: &str = env!("CARGO_BIN_EXE_corsair-sidecar");
const APP: &str = "https://app.example.com";
const ROLE: &str = "CORSAIR_BENCH_ROLE";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `serve` on a one-thread runtime with a listener on a free loopback port, after
/// printing that port's address on the first line of standard output for the parent process.
fn serve_on_loopback<F: std::future::Future<Output = ()>>(
    serve: impl FnOnce(tokio::net::TcpListener) -> F,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        serve(listener).await;
    });
}

/// The body of the upstream's `/large` responses.
const LARGE_BYTES: usize = 256 * 1024;

/// The upstream: a one-thread hyper server answering `hello` with a few headers (and
/// `LARGE_BYTES` at `/large`; a `POST`'s body is read to its end first), counting the
/// connections it accepts and the requests it answers (`GET /__connections` gives both).
fn upstream_main() {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    serve_on_loopback(|listener| async move {
        let accepted = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let large = Bytes::from(vec![b'x'; LARGE_BYTES]);
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            accepted.fetch_add(1, Ordering::Relaxed);
            let (accepted, answered, large) = (accepted.clone(), answered.clone(), large.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    answered.fetch_add(1, Ordering::Relaxed);
                    let body = if req.uri().path() == "/__connections" {
                        Bytes::from(format!(
                            "{} {}",
                            accepted.load(Ordering::Relaxed),
                            answered.load(Ordering::Relaxed)
                        ))
                    } else if req.uri().path() == "/large" {
                        large.clone()
                    } else {
                        Bytes::from_static(b"hello world\n")
                    };
                    // An upload (`CORSAIR_BENCH_ONLY=large`) is read to its end.
                    let upload = (req.method() == http::Method::POST).then(|| req.into_body());
                    async move {
                        if let Some(upload) = upload {
                            let _ = http_body_util::BodyExt::collect(upload).await;
                        }
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header("content-type", "text/plain")
                                .header("x-request-id", "42")
                                .body(Full::new(body))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// A bare hyper proxy in front of `upstream`: hyper's HTTP/1 server, and for each client
/// connection one hyper HTTP/1 client connection of its own, forwarding every request and
/// response as they are: no CORS, no forwarding or hop-by-hop headers, no timeouts, no pool.
/// Nothing built on hyper does less for a proxied request, so its CPU per request is the
/// floor under the sidecar's.
fn bare_proxy_main(upstream: SocketAddr) {
    use hyper::body::Incoming;
    serve_on_loopback(|listener| async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let up = tokio::net::TcpStream::connect(upstream).await.unwrap();
                up.set_nodelay(true).unwrap();
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(up))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let sender = Arc::new(tokio::sync::Mutex::new(sender));
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let sender = sender.clone();
                    async move {
                        let response = {
                            let mut sender = sender.lock().await;
                            sender.ready().await?;
                            sender.try_send_request(req)
                        };
                        response.await.map_err(|e| e.into_error())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// The CPU the proxies run on, the last one, unless `CORSAIR_BENCH_PIN=0`. Set once, at the
/// start, when this process and so everything it starts moves to the other CPUs.
static PROXY_CPU: OnceLock<Option<usize>> = OnceLock::new();

/// Moves this process to all CPUs but the last, which is kept for the proxies, unless
/// `CORSAIR_BENCH_PIN=0` or there is one CPU.
fn pin_self() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    let pin = std::env::var("CORSAIR_BENCH_PIN").as_deref() != Ok("0") && cpus >= 2;
    let cpu = pin.then(|| {
        taskset(&format!("0-{}", cpus - 2), std::process::id());
        cpus - 1
    });
    PROXY_CPU.set(cpu).unwrap();
}

/// Moves every thread of every process of `target` to the proxies' CPU (`proxy`) or to the
/// CPUs of everything else, if the proxies have a CPU.
fn place(target: &Proc, proxy: bool) {
    if let Some(Some(cpu)) = PROXY_CPU.get() {
        let cpus = if proxy {
            cpu.to_string()
        } else {
            format!("0-{}", cpu - 1)
        };
        for pid in pids(target) {
            taskset(&cpus, pid);
        }
    }
}

fn taskset(cpus: &str, pid: u32) {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(status.success(), "taskset -a -p -c {cpus} {pid} failed");
}

/// A command running `bin`, or, given `callgrind` (its output file), valgrind's callgrind
/// running it.
fn command(bin: &Path, callgrind: Option<&Path>) -> Command {
    match callgrind {
        None => Command::new(bin),
        Some(out) => {
            let mut command = Command::new("valgrind");
            command
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .args(["--dump-instr=no", "--quiet"])
                .arg(bin);
            command
        }
    }
}

/// Starts a copy of this program in `role` (given `upstream`'s address, if any), and returns
/// it with the address it serves on, which it prints first.
fn spawn_role(
    role: &str,
    name: &'static str,
    upstream: Option<SocketAddr>,
    callgrind: Option<&Path>,
) -> (Proc, SocketAddr) {
    let mut command = command(&std::env::current_exe().unwrap(), callgrind);
    command.env(ROLE, role).stdout(Stdio::piped());
    if let Some(upstream) = upstream {
        command.env("CORSAIR_BENCH_UPSTREAM", upstream.to_string());
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Proc { child, name }, line.trim().parse().unwrap())
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers only when asked.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proc_stat(pid: u32) -> ([u64; 2], u64) {
    // utime and stime (fields 14 and 15), in clock ticks, and RSS.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks = [
        fields[11].parse::<u64>().unwrap(),
        fields[12].parse::<u64>().unwrap(),
    ];
    (ticks, status_kib(pid, "VmRSS"))
}

/// A size in `/proc/{pid}/status` (`VmRSS`, `VmHWM`, …), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time used so far by each thread of `target` now alive, in nanoseconds (scheduler
/// statistics: finer than the clock ticks of `stat`), by thread id, with the thread's name.
fn thread_cpu_ns(target: &Proc) -> BTreeMap<String, (String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", target.child.id())).unwrap();
    tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns = stat.split(' ').next()?.parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            Some((
                task.file_name().into_string().ok()?,
                (name.trim().to_owned(), ns),
            ))
        })
        .collect()
}

/// The CPU time `target`'s threads used between two [`thread_cpu_ns`] readings: on the
/// sidecar's background threads (named `corsair-sync…`), and on all others. A thread that
/// ended in between is not counted (a blocking-pool thread lives 10 s after its last task).
fn cpu_ns_between(
    before: &BTreeMap<String, (String, u64)>,
    after: &BTreeMap<String, (String, u64)>,
) -> (u64, u64) {
    let (mut background, mut rest) = (0, 0);
    for (tid, (name, ns)) in after {
        let used = ns - before.get(tid).map_or(0, |(_, ns)| *ns);
        if name.starts_with("corsair-sync") {
            background += used;
        } else {
            rest += used;
        }
    }
    (background, rest)
}

/// The processes that do a target's work (for nginx: master and worker).
fn pids(target: &Proc) -> Vec<u32> {
    let mut pids = vec![target.child.id()];
    if let Ok(children) =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", target.child.id()))
    {
        pids.extend(
            children
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap()),
        );
    }
    pids
}

/// Lowers every thread of `target` by running `lower` (a command, then its arguments) with
/// each thread's id last: Linux sets priority and scheduling policy per thread, and threads
/// started later inherit them from the thread that starts them.
fn lower_threads(target: &Proc, lower: &[&str]) {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", target.child.id())).unwrap();
    for task in tasks {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let status = Command::new(lower[0])
            .args(&lower[1..])
            .arg(&tid)
            .stdout(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("{} runs: {e}", lower[0]));
        assert!(status.success(), "{lower:?} {tid} failed");
    }
}

/// User and system CPU time of `target`, in clock ticks.
fn cpu_ticks(target: &Proc) -> [u64; 2] {
    pids(target)
        .into_iter()
        .map(|p| proc_stat(p).0)
        .fold([0, 0], |[u, s], [pu, ps]| [u + pu, s + ps])
}

fn rss_kib(target: &Proc) -> u64 {
    pids(target).into_iter().map(|p| proc_stat(p).1).sum()
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    // Up to a minute: a target under callgrind starts slowly.
    for _ in 0..3000 {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not become ready");
}

fn accepts(addr: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok()
}

#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    failed: u64,
    cpu_us_per_request: f64,
    /// The part of it in user space (the rest is in the kernel).
    user_us_per_request: f64,
}

/// Runs with no writes, with writes to another service, and with swaps, one of each per round.
struct Swaps {
    calm: Run,
    elsewhere: Run,
    swapped: Run,
    /// Medians of the per-round p99 ratios: swaps to none, writes elsewhere to none, swaps
    /// to writes elsewhere.
    ratios: [f64; 3],
    /// The median of the per-round throughput ratios, swaps to none.
    rps_ratio: f64,
}

impl From<[Vec<Run>; 3]> for Swaps {
    fn from([calm, elsewhere, swapped]: [Vec<Run>; 3]) -> Self {
        let ratio = |a: &[Run], b: &[Run], of: fn(&Run) -> f64| {
            middle(a.iter().zip(b).map(|(a, b)| of(a) / of(b)).collect())
        };
        let p99 = |r: &Run| r.p99_us;
        Swaps {
            ratios: [
                ratio(&swapped, &calm, p99),
                ratio(&elsewhere, &calm, p99),
                ratio(&swapped, &elsewhere, p99),
            ],
            rps_ratio: ratio(&swapped, &calm, |r| r.rps),
            calm: median(&calm),
            elsewhere: median(&elsewhere),
            swapped: median(&swapped),
        }
    }
}

fn parse_latency(value: &str) -> f64 {
    let value = value.trim();
    for (unit, scale) in [("us", 1.0), ("ms", 1e3), ("s", 1e6)] {
        if let Some(n) = value.strip_suffix(unit) {
            return n.parse::<f64>().unwrap() * scale;
        }
    }
    panic!("unknown latency {value:?}")
}

/// One `wrk` run against `url`; `script` sets method and headers.
fn wrk(url: &str, script: &Path, seconds: u64, connections: u64, target: Option<&Proc>) -> Run {
    let before = target.map(cpu_ticks);
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk runs (install Debian's wrk)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "wrk failed: {text}");
    let mut run = Run::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap();
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_us = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_us = parse_latency(v);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.failed += v.trim().parse::<u64>().unwrap();
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            run.failed += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if line.contains(" requests in ") {
            run.requests = line.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    if let (Some(before), Some(target)) = (before, target) {
        let [user, system] = cpu_ticks(target);
        let per_request = |ticks: u64| ticks as f64 * 1e6 / 100.0 / run.requests.max(1) as f64;
        run.user_us_per_request = per_request(user - before[0]);
        run.cpu_us_per_request = per_request(user - before[0] + system - before[1]);
    }
    run
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Run {
        rps: pick(|r| r.rps),
        p50_us: pick(|r| r.p50_us),
        p99_us: pick(|r| r.p99_us),
        requests: runs.iter().map(|r| r.requests).sum(),
        failed: runs.iter().map(|r| r.failed).sum(),
        cpu_us_per_request: pick(|r| r.cpu_us_per_request),
        user_us_per_request: pick(|r| r.user_us_per_request),
    }
}

/// Opens `n` keep-alive connections, each with one answered request, and holds them.
fn hold_connections(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(
                s,
                "GET /held HTTP/1.1\r\nHost: {addr}\r\nOrigin: {APP}\r\n\r\n"
            )
            .unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            s
        })
        .collect()
}

/// What the proxies share: the upstream, the control plane, the run's directory.
struct Setup {
    upstream: SocketAddr,
    control_plane: String,
    dir: PathBuf,
}

impl Setup {
    /// Starts `bin` as a sidecar for `service` following the control plane, with one worker
    /// thread like nginx's one worker, under callgrind if given its output file; returns it
    /// with its proxy and admin addresses once it is ready.
    fn sidecar(
        &self,
        bin: &Path,
        name: &'static str,
        service: &str,
        callgrind: Option<&Path>,
    ) -> (Proc, String, String) {
        let (proxy_port, admin_port) = (free_port(), free_port());
        let (addr, admin_addr) = (
            format!("127.0.0.1:{proxy_port}"),
            format!("127.0.0.1:{admin_port}"),
        );
        let sidecar = Proc {
            child: command(bin, callgrind)
                .args(["--listen", &addr, "--admin-listen", &admin_addr])
                .args([
                    "--upstream",
                    &self.upstream.to_string(),
                    "--service",
                    service,
                ])
                .args(["--control-plane", &format!("http://{}", self.control_plane)])
                .arg("--cache-file")
                .arg(self.dir.join(format!("{proxy_port}.cache")))
                .env("RUST_LOG", "warn")
                .env("TOKIO_WORKER_THREADS", "1")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
            name,
        };
        wait_until(name, || {
            accepts(&admin_addr) && get(&admin_addr, "/readyz").0 == 200
        });
        place(&sidecar, true);
        (sidecar, addr, admin_addr)
    }

    /// Starts nginx with one worker, and returns it with its address once it accepts. Under
    /// callgrind (given its output file) it runs without a master process, the worker being
    /// the process callgrind follows.
    fn nginx(&self, callgrind: Option<&Path>) -> (Proc, String) {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut conf = NGINX_CONF
            .replace("__DIR__", &self.dir.display().to_string())
            .replace("__UPSTREAM__", &self.upstream.to_string())
            .replace("__PORT__", &port.to_string());
        if callgrind.is_some() {
            conf = conf.replace("master_process on;", "master_process off;");
        }
        let conf_path = self.dir.join(format!("nginx-{port}.conf"));
        std::fs::write(&conf_path, conf).unwrap();
        let nginx = Proc {
            child: command(Path::new("nginx"), callgrind)
                .arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx runs (install Debian's nginx-light)"),
            name: "nginx",
        };
        let workers = if callgrind.is_some() { 1 } else { 2 };
        wait_until("nginx", || accepts(&addr) && pids(&nginx).len() >= workers);
        place(&nginx, true);
        (nginx, addr)
    }
}

/// The wrk scripts: an allowed cross-origin `GET`, a preflight for `PUT` with `x-custom`, and
/// the `GET` again with each connection waiting `pace_ms` before each request (wrk's `delay`).
fn scripts(dir: &Path, pace_ms: u64) -> [PathBuf; 3] {
    let script = |name: &str, body: &str| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let actual = format!("wrk.method = \"GET\"\nwrk.headers[\"Origin\"] = \"{APP}\"\n");
    [
        script("actual.lua", &actual),
        script(
            "preflight.lua",
            &format!(
                "wrk.method = \"OPTIONS\"\nwrk.headers[\"Origin\"] = \"{APP}\"\nwrk.headers[\"Access-Control-Request-Method\"] = \"PUT\"\nwrk.headers[\"Access-Control-Request-Headers\"] = \"x-custom\"\n"
            ),
        ),
        script(
            "paced.lua",
            &format!("{actual}function delay()\n  return {pace_ms}\nend\n"),
        ),
    ]
}

/// `CORSAIR_BENCH_ONLY=instructions`: the instructions each proxy's process runs per request,
/// counted by callgrind. Unlike time on these shared cores, the count is the same from one run
/// to the next, so it tells two builds apart where wall-clock figures cannot. It counts user
/// space only: the kernel's work (about half of each proxy's CPU time) is left out. Each
/// target runs alone under callgrind: 3 s of `wrk -c16` to warm up, then the count over 10 s.
fn instructions_report(setup: &Setup) {
    let [actual, preflight, _] = scripts(&setup.dir, 0);
    let mut rows = Vec::new();
    let mut measure = |name: String, target: &Proc, addr: &str, out: &Path, preflights: bool| {
        let url = format!("http://{addr}/api/items");
        let mut counts = vec![count_instructions(target, &url, &actual, out)];
        if preflights {
            counts.push(count_instructions(target, &url, &preflight, out));
        }
        eprintln!("{name}: {counts:?} instructions per request");
        rows.push((name, counts));
    };
    let mut sidecars = vec![("corsair-sidecar".to_owned(), sidecar_bin())];
    if let Some(bin) = std::env::var_os("CORSAIR_BENCH_BASELINE") {
        sidecars.push(("baseline sidecar".to_owned(), PathBuf::from(bin)));
    }
    for (i, (name, bin)) in sidecars.into_iter().enumerate() {
        let out = setup.dir.join(format!("callgrind-sidecar-{i}"));
        let (sidecar, addr, _) = setup.sidecar(&bin, "sidecar under callgrind", "shop", Some(&out));
        measure(name, &sidecar, &addr, &out, true);
    }
    let out = setup.dir.join("callgrind-bare");
    let (bare, addr) = spawn_role(
        "bare proxy",
        "bare hyper proxy",
        Some(setup.upstream),
        Some(&out),
    );
    measure(
        "bare hyper proxy".into(),
        &bare,
        &addr.to_string(),
        &out,
        false,
    );
    drop(bare);
    let out = setup.dir.join("callgrind-nginx");
    let (nginx, addr) = setup.nginx(Some(&out));
    measure("nginx".into(), &nginx, &addr, &out, true);
    drop(nginx);

    println!("\n## Instructions per request (callgrind, user space)\n");
    println!("| target | proxied request | preflight |");
    println!("|---|---|---|");
    for (name, counts) in &rows {
        let preflight = counts
            .get(1)
            .map_or_else(|| "–".to_owned(), |c| format!("{c:.0}"));
        println!("| {name} | {:.0} | {preflight} |", counts[0]);
    }
}

/// The instructions `target` (running under callgrind, writing `out`) runs per request of
/// `script` against `url`, over 10 s of `wrk -c16` after 3 s of warm-up.
fn count_instructions(target: &Proc, url: &str, script: &Path, out: &Path) -> f64 {
    let pid = target.child.id().to_string();
    let control = |what: &str| {
        let status = Command::new("callgrind_control")
            .args([what, &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("callgrind_control runs (Debian's valgrind)");
        assert!(status.success(), "callgrind_control {what} failed");
    };
    wrk(url, script, 3, 16, None);
    control("-z");
    let run = wrk(url, script, 10, 16, None);
    // Dumps go to numbered files after `out`, the newest with the highest number.
    let dumps = || {
        let dir = out.parent().unwrap();
        let prefix = format!("{}.", out.file_name().unwrap().to_string_lossy());
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?
                    .rsplit('.')
                    .next()?
                    .parse::<u32>()
                    .ok()
                    .map(|n| (n, dir.join(&name)))
            })
            .max()
    };
    let before = dumps().map(|(n, _)| n);
    control("-d");
    let mut dump = None;
    wait_until("callgrind dump", || {
        dump = dumps().filter(|(n, _)| Some(*n) != before);
        dump.is_some()
    });
    let (_, path) = dump.unwrap();
    // The dump is complete once its summary line is there.
    let mut total = None;
    wait_until("callgrind summary", || {
        total = std::fs::read_to_string(&path).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("summary: "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        total.is_some()
    });
    total.unwrap() as f64 / run.requests.max(1) as f64
}

/// The sidecar under test: this package's, or `CORSAIR_BENCH_SIDECAR`'s.
fn sidecar_bin() -> PathBuf {
    std::env::var_os("CORSAIR_BENCH_SIDECAR").map_or_else(|| PathBuf::from(SIDECAR), PathBuf::from)
}

fn control_plane_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CORSAIR_CONTROL_PLANE_BIN") {
        return path.into();
    }
    // Next to this sidecar binary, in the same target directory.
    let path = Path::new(SIDECAR).with_file_name("corsair-control-plane");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --release -p corsair-control-plane` first",
        path.display()
    );
    path
}

fn policy(exposed: &str) -> v1::Policy {
    v1::Policy {
        service: "shop".into(),
        allowed_origins: vec![APP.into(), "https://admin.example.com".into()],
        allowed_methods: vec!["PUT".into(), "DELETE".into()],
        allowed_headers: vec!["x-custom".into(), "content-type".into()],
        exposed_headers: vec![exposed.into()],
        max_age_seconds: Some(600),
        ..Default::default()
    }
}

const NGINX_CONF: &str = r#"
worker_processes 1;
daemon off;
master_process on;
pid __DIR__/nginx.pid;
error_log __DIR__/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path __DIR__/body;
    proxy_temp_path __DIR__/proxy;
    fastcgi_temp_path __DIR__/fastcgi;
    uwsgi_temp_path __DIR__/uwsgi;
    scgi_temp_path __DIR__/scgi;
    upstream app { server __UPSTREAM__; keepalive 64; }
    map $http_origin $cors_origin {
        default "";
        "https://app.example.com" $http_origin;
        "https://admin.example.com" $http_origin;
    }
    server {
        listen 127.0.0.1:__PORT__ reuseport;
        location / {
            if ($request_method = OPTIONS) {
                add_header Access-Control-Allow-Origin $cors_origin always;
                add_header Access-Control-Allow-Methods "PUT, DELETE" always;
                add_header Access-Control-Allow-Headers "x-custom, content-type" always;
                add_header Access-Control-Max-Age 600 always;
                add_header Vary "Origin, Access-Control-Request-Method, Access-Control-Request-Headers" always;
                return 204;
            }
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_hide_header Access-Control-Allow-Origin;
            add_header Access-Control-Allow-Origin $cors_origin always;
            add_header Access-Control-Expose-Headers x-request-id always;
            add_header Vary Origin always;
        }
    }
}
"#;

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("upstream") => return upstream_main(),
        Ok("bare proxy") => {
            let upstream = std::env::var("CORSAIR_BENCH_UPSTREAM").unwrap();
            return bare_proxy_main(upstream.parse().unwrap());
        }
        _ => {}
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing.
    }
    pin_self();
    let seconds = env_or("CORSAIR_BENCH_SECONDS", 10);
    let only = std::env::var("CORSAIR_BENCH_ONLY").unwrap_or_default();
    let (only_swaps, only_main) = (only == "swaps", only == "main");
    let rounds = env_or("CORSAIR_BENCH_ROUNDS", 3) as usize;
    let connections = env_or("CORSAIR_BENCH_CONNECTIONS", 64);
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("CORSAIR_BENCH_KEEP").is_some() {
        // For `callgrind_annotate` on the dumps, and the processes' logs.
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }

    // The upstream, a second copy of this program.
    let (upstream, upstream_addr) = spawn_role("upstream", "upstream", None, None);
    // Connections the upstream has accepted and requests it has answered so far, each
    // reading included (it comes on a connection of its own).
    let upstream_counts = move || {
        let (_, body) = get(&upstream_addr.to_string(), "/__connections");
        let (connections, requests) = body.split_once(' ').unwrap();
        [connections, requests].map(|n| n.parse::<u64>().unwrap())
    };
    let upstream_connections = move || upstream_counts()[0];

    // The control plane, on SQLite, with the service's policy.
    let cp_port = free_port();
    let cp_addr = format!("127.0.0.1:{cp_port}");
    let cp = Proc {
        child: Command::new(control_plane_bin())
            .args(["--listen", &cp_addr, "--auth", "none", "--database-url"])
            .arg(format!("sqlite://{}", dir.path().join("cp.db").display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        name: "control plane",
    };
    wait_until("control plane", || accepts(&cp_addr));
    // One worker of its own drives the gRPC channel while this thread blocks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime
        .block_on(PolicyServiceClient::connect(format!("http://{cp_addr}")))
        .unwrap();
    runtime
        .block_on(client.create_policy(v1::CreatePolicyRequest {
            policy: Some(policy("x-request-id")),
            ..Default::default()
        }))
        .unwrap();

    let setup = Setup {
        upstream: upstream_addr,
        control_plane: cp_addr.clone(),
        dir: dir.path().to_owned(),
    };
    if only == "instructions" {
        return instructions_report(&setup);
    }
    let start_sidecar =
        |bin: &Path, name: &'static str, service: &str| setup.sidecar(bin, name, service, None);
    let (sidecar, sidecar_addr, admin_addr) =
        start_sidecar(&sidecar_bin(), "corsair-sidecar", "shop");
    // Another build of the sidecar to compare with, if given.
    let mut baseline = std::env::var_os("CORSAIR_BENCH_BASELINE")
        .map(|bin| start_sidecar(Path::new(&bin), "baseline sidecar", "shop"));

    // nginx, one worker.
    let (nginx, nginx_addr) = setup.nginx(None);

    // The bare hyper proxy, a third copy of this program.
    let (bare, bare_addr) = spawn_role("bare proxy", "bare hyper proxy", Some(upstream_addr), None);
    place(&bare, true);
    let bare_addr = bare_addr.to_string();

    let mut idle_rss = vec![
        (sidecar.name, rss_kib(&sidecar)),
        (nginx.name, rss_kib(&nginx)),
    ];
    if let Some((baseline, _, _)) = &baseline {
        idle_rss.push((baseline.name, rss_kib(baseline)));
    }

    let pace_ms = env_or("CORSAIR_BENCH_PACE_MS", 4);
    let [actual, preflight, paced] = scripts(dir.path(), pace_ms);
    if only == "large" {
        let mut targets = vec![
            ("corsair-sidecar", sidecar_addr.clone(), &sidecar),
            ("nginx", nginx_addr.clone(), &nginx),
            ("bare hyper proxy", bare_addr.clone(), &bare),
        ];
        if let Some((baseline, addr, _)) = &baseline {
            targets.insert(1, ("baseline sidecar", addr.clone(), baseline));
        }
        let upload = dir.path().join("upload.lua");
        std::fs::write(
            &upload,
            format!(
                "wrk.method = \"POST\"\nwrk.headers[\"Origin\"] = \"{APP}\"\nwrk.body = string.rep(\"x\", {LARGE_BYTES})\n"
            ),
        )
        .unwrap();
        return large_report(&targets, &actual, &upload, seconds, rounds);
    }

    // Interleaved rounds: every configuration sees the same machine conditions.
    let targets: [(&str, &str, &Path, Option<&Proc>); 10] = [
        (
            "direct",
            &upstream_addr.to_string(),
            &actual,
            Some(&upstream),
        ),
        ("sidecar", &sidecar_addr, &actual, Some(&sidecar)),
        ("nginx", &nginx_addr, &actual, Some(&nginx)),
        ("bare hyper proxy", &bare_addr, &actual, Some(&bare)),
        (
            "sidecar preflight",
            &sidecar_addr,
            &preflight,
            Some(&sidecar),
        ),
        ("nginx preflight", &nginx_addr, &preflight, Some(&nginx)),
        // The same load for each, well below any one's limit: latency without the queueing
        // of a saturated proxy, which at saturation makes p99 a measure of throughput.
        (
            "direct paced",
            &upstream_addr.to_string(),
            &paced,
            Some(&upstream),
        ),
        ("sidecar paced", &sidecar_addr, &paced, Some(&sidecar)),
        ("nginx paced", &nginx_addr, &paced, Some(&nginx)),
        ("bare hyper proxy paced", &bare_addr, &paced, Some(&bare)),
    ];
    let mut targets: Vec<(String, String, PathBuf, Option<&Proc>)> = targets
        .into_iter()
        .map(|(n, a, s, p)| (n.to_owned(), a.to_owned(), s.to_path_buf(), p))
        .collect();
    if let Some((baseline, addr, _)) = &baseline {
        targets.insert(
            2,
            (
                "baseline".into(),
                addr.clone(),
                actual.clone(),
                Some(baseline),
            ),
        );
    }
    let mut results: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    let mut sidecar_requests = 0;
    let mut counted_connections = 0;
    // The same, from one second into each sidecar run to half a second before its end: wrk
    // closes its connections with requests in flight when a run ends, and the sidecar closes
    // those requests' upstream connections (so the service sees the cancellation, as with
    // nginx and Envoy); the next run opens them again in its first moments.
    let mut steady = [0u64; 2];
    for round in 0..if only_swaps { 0 } else { rounds } {
        for (name, addr, script, target) in &targets {
            let before = upstream_connections();
            let sampler = (name == "sidecar" && seconds >= 2).then(|| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(1));
                    let start = upstream_counts();
                    std::thread::sleep(Duration::from_millis(seconds * 1000 - 1500)); // seconds ≥ 2
                    let end = upstream_counts();
                    // Less this sampler's second reading's own connection and request.
                    [end[0] - start[0] - 1, end[1] - start[1] - 1]
                })
            });
            let run = wrk(
                &format!("http://{addr}/api/items"),
                script,
                seconds,
                connections,
                *target,
            );
            let opened = upstream_connections() - before - 1;
            let mut window = String::new();
            if let Some(sampler) = sampler {
                let [mid_run, requests] = sampler.join().unwrap();
                steady[0] += mid_run;
                steady[1] += requests;
                sidecar_requests += run.requests;
                counted_connections += opened;
                window = format!(" ({mid_run} for {requests} requests mid-run)");
            }
            eprintln!(
                "round {round} {name:18} {:>9.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  cpu {:>5.1} µs/req  failed {}  new upstream connections {opened}{window}",
                run.rps, run.p50_us, run.p99_us, run.cpu_us_per_request, run.failed
            );
            results.entry(name.clone()).or_default().push(run);
        }
    }

    // 1,000 open keep-alive connections.
    let mut held_rss = Vec::new();
    let mut holders = vec![(&sidecar, &sidecar_addr), (&nginx, &nginx_addr)];
    if let Some((baseline, addr, _)) = &baseline {
        holders.push((baseline, addr));
    }
    let mut idle_held = 0;
    for (target, addr) in if only_swaps { Vec::new() } else { holders } {
        let before = rss_kib(target);
        let held = hold_connections(addr, 1000);
        held_rss.push((target.name, before, rss_kib(target)));
        if std::ptr::eq(target, &sidecar) {
            idle_held = idle_connections(&admin_addr);
        }
        drop(held);
    }
    if !only_swaps {
        let layout = match PROXY_CPU.get() {
            Some(Some(cpu)) => format!("; proxies alone on CPU {cpu}, the rest on the others"),
            _ => String::new(),
        };
        println!(
            "\n## Proxy benchmark ({rounds} rounds of {seconds} s, wrk -t1 -c{connections}; medians{layout})\n"
        );
        main_report(
            &results,
            &idle_rss,
            &held_rss,
            idle_held,
            counted_connections,
            sidecar_requests,
            steady,
        );
        paced_report(
            &results,
            &format!(
                "wrk -t1 -c{connections}, each connection waiting {pace_ms} ms before each request"
            ),
        );
    }
    if only_main {
        return;
    }

    // Ten policy swaps a second during load, against the same load without, and against the
    // same ten writes a second to another service, pushed to a second sidecar that serves it:
    // the control plane shares this machine's two cores, and that run does all its work
    // (commit, push) and a sidecar's (apply, cache file), leaving the loaded sidecar's share.
    runtime
        .block_on(client.create_policy(v1::CreatePolicyRequest {
            policy: Some(v1::Policy {
                service: "other".into(),
                ..policy("x-request-id")
            }),
            ..Default::default()
        }))
        .unwrap();
    let (other_sidecar, _, _) = start_sidecar(&sidecar_bin(), "sidecar for other", "other");
    // Not under test: it stands for the rest of the fleet, off the proxies' CPU.
    place(&other_sidecar, false);
    let swapping = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (swapping, stop, swaps) = (swapping.clone(), stop.clone(), swaps.clone());
        let mut client = client.clone();
        let handle = runtime.handle().clone();
        std::thread::spawn(move || {
            handle.block_on(async {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let service = match swapping.load(Ordering::Relaxed) {
                        0 => continue,
                        1 => "shop",
                        _ => "other",
                    };
                    n += 1;
                    let exposed = if n.is_multiple_of(2) {
                        "x-request-id"
                    } else {
                        "x-trace-id"
                    };
                    let current = client
                        .get_policy(v1::GetPolicyRequest {
                            name: format!("services/{service}/policy"),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    client
                        .update_policy(v1::UpdatePolicyRequest {
                            policy: Some(v1::Policy {
                                name: current.name,
                                etag: current.etag,
                                service: service.into(),
                                ..policy(exposed)
                            }),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    if service == "shop" {
                        swaps.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        })
    };
    // Per round: no writes, writes to another service, swaps of this one (swapper modes 0, 2, 1).
    // Many short rounds: from one run to the next the p99 of a saturated sidecar moves by more
    // than the effect, so each round compares three runs made seconds apart, in an order that
    // turns from round to round, and the report takes the median of the per-round changes.
    let swap_rounds = env_or("CORSAIR_BENCH_SWAP_ROUNDS", 24) as usize;
    let swap_seconds = seconds.div_ceil(5);
    let under_writes = |setting: &str| {
        let mut under: [Vec<Run>; 3] = Default::default();
        for round in 0..swap_rounds {
            let mut order = [
                (0, 0, "no swaps"),
                (1, 2, "10 writes/s to another service"),
                (2, 1, "10 swaps/s"),
            ];
            order.rotate_left(round % 3);
            for (slot, mode, label) in order {
                swapping.store(mode, Ordering::Relaxed);
                let run = wrk(
                    &format!("http://{sidecar_addr}/api/items"),
                    &actual,
                    swap_seconds,
                    connections,
                    Some(&sidecar),
                );
                eprintln!(
                    "round {round} sidecar, {setting}, {label}: {:.0} req/s, p99 {:.0} µs, failed {}",
                    run.rps, run.p99_us, run.failed
                );
                under[slot].push(run);
            }
            swapping.store(0, Ordering::Relaxed);
        }
        Swaps::from(under)
    };
    // What a swap costs the sidecar, with no traffic: its CPU time with swaps against without.
    // The baseline build, if any, follows the same service and is measured in the same runs.
    let mut quiet: Vec<&Proc> = vec![&sidecar];
    quiet.extend(baseline.as_ref().map(|(b, _, _)| b));
    let quiet_cpu = |mode: u8| {
        swapping.store(mode, Ordering::Relaxed);
        let committed = swaps.load(Ordering::Relaxed);
        let before: Vec<_> = quiet.iter().map(|p| thread_cpu_ns(p)).collect();
        std::thread::sleep(Duration::from_secs(seconds));
        swapping.store(0, Ordering::Relaxed);
        let used: Vec<_> = quiet
            .iter()
            .zip(&before)
            .map(|(p, before)| cpu_ns_between(before, &thread_cpu_ns(p)))
            .collect();
        (used, swaps.load(Ordering::Relaxed) - committed)
    };
    let (idle, _) = quiet_cpu(0);
    let (swapping_cpu, quiet_swaps) = quiet_cpu(1);
    let per_swap =
        |with: u64, without: u64| (with as f64 - without as f64) / 1e3 / quiet_swaps.max(1) as f64;
    // Per process: µs per swap on the background threads and on the others.
    let swap_cpu: Vec<(&str, f64, f64)> = quiet
        .iter()
        .zip(swapping_cpu.iter().zip(&idle))
        .map(|(p, ((bg, rest), (idle_bg, idle_rest)))| {
            (p.name, per_swap(*bg, *idle_bg), per_swap(*rest, *idle_rest))
        })
        .collect();
    // The baseline build is not needed any more: stopped, it takes no CPU from the swap runs
    // (it follows the same service and would apply every swap too).
    drop(baseline.take());

    let shared = under_writes("control plane at normal priority");
    // Again with the control plane and the other sidecar at nice 19, as if they ran on
    // machines of their own: at normal priority their work on these two saturated cores
    // (a commit with its fsync, the push, the other sidecar's apply) queues the loaded
    // sidecar's requests, whichever service is written.
    let nice_19 = ["renice", "-n", "19", "-p"];
    lower_threads(&cp, &nice_19);
    lower_threads(&other_sidecar, &nice_19);
    let apart = under_writes("control plane at nice 19");
    // Closer still to machines of their own: `SCHED_IDLE`, under which they run only on a
    // core nothing else wants and never preempt the loaded sidecar, wrk or the upstream.
    let sched_idle = ["chrt", "--idle", "-p", "0"];
    lower_threads(&cp, &sched_idle);
    lower_threads(&other_sidecar, &sched_idle);
    let idle_apart = under_writes("control plane at SCHED_IDLE");
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let committed = swaps.load(Ordering::Relaxed);
    let last = runtime
        .block_on(client.get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .revision;
    wait_until("last swap applied", || shop_revision(&admin_addr) == last);

    // The swaps' report.
    println!();
    println!(
        "- 10 swaps/s during load ({swap_rounds} rounds of {swap_seconds} s, each: no writes, 10 writes/s to another service, 10 swaps/s): {committed} swaps committed, the last (revision {last}) in force at the end"
    );
    for (name, background, rest) in swap_cpu {
        println!(
            "  - CPU per swap in {name} with no traffic (its threads' CPU time over {seconds} s of swaps, less {seconds} s without; {quiet_swaps} swaps): {:.0} µs: {background:.0} µs on `corsair-sync` threads, {rest:.0} µs on all others",
            background + rest
        );
    }
    for (setting, swaps) in [
        ("the control plane at normal priority", &shared),
        ("the control plane and the other sidecar at nice 19", &apart),
        (
            "the control plane and the other sidecar at SCHED_IDLE",
            &idle_apart,
        ),
    ] {
        let Swaps {
            calm,
            elsewhere,
            swapped,
            ratios: [vs_calm, elsewhere_vs_calm, vs_elsewhere],
            rps_ratio,
        } = swaps;
        println!(
            "  - {setting}: p99 {:.0} µs without writes, {:.0} µs with writes elsewhere, {:.0} µs with swaps; median change per round: swaps {:+.1}%, writes elsewhere {:+.1}%, swaps against writes elsewhere {:+.1}%; throughput with swaps {:+.1}%; failed requests {} without, {} with writes elsewhere, {} with swaps",
            calm.p99_us,
            elsewhere.p99_us,
            swapped.p99_us,
            (vs_calm - 1.0) * 100.0,
            (elsewhere_vs_calm - 1.0) * 100.0,
            (vs_elsewhere - 1.0) * 100.0,
            (rps_ratio - 1.0) * 100.0,
            calm.failed,
            elsewhere.failed,
            swapped.failed
        );
    }
    drop((sidecar, baseline, other_sidecar, nginx, bare, cp, upstream));
}

/// The throughput, latency, RSS and upstream-connection figures.
fn main_report(
    results: &BTreeMap<String, Vec<Run>>,
    idle_rss: &[(&str, u64)],
    held_rss: &[(&str, u64, u64)],
    idle_held: i64,
    counted_connections: u64,
    sidecar_requests: u64,
    [steady_connections, steady_requests]: [u64; 2],
) {
    let direct = median(&results["direct"]);
    let side = median(&results["sidecar"]);
    let ngx = median(&results["nginx"]);
    let bare = median(&results["bare hyper proxy"]);
    let side_pre = median(&results["sidecar preflight"]);
    let ngx_pre = median(&results["nginx preflight"]);
    println!(
        "| target | req/s | p50 | p99 | added p99 | CPU per request | of it in user space | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, run, added) in [
        ("upstream direct", &direct, None),
        ("corsair-sidecar", &side, Some(side.p99_us - direct.p99_us)),
        ("nginx", &ngx, Some(ngx.p99_us - direct.p99_us)),
        ("bare hyper proxy", &bare, Some(bare.p99_us - direct.p99_us)),
        ("corsair-sidecar, preflight", &side_pre, None),
        ("nginx, preflight", &ngx_pre, None),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {} | {:.1} µs | {:.1} µs | {} |",
            run.rps,
            run.p50_us,
            run.p99_us,
            added
                .map(|a| format!("{a:.0} µs"))
                .unwrap_or_else(|| "–".into()),
            run.cpu_us_per_request,
            run.user_us_per_request,
            run.failed
        );
    }
    println!();
    // The machine's speed drifts between rounds: a ratio of two targets' runs in the same
    // round, medianed over the rounds, compares them under the same conditions.
    let per_round = |a: &str, b: &str, of: fn(&Run) -> f64| {
        let ratios: Vec<f64> = results[a]
            .iter()
            .zip(&results[b])
            .map(|(a, b)| of(a) / of(b))
            .collect();
        middle(ratios)
    };

    let (rps, cpu) = (|r: &Run| r.rps, |r: &Run| r.cpu_us_per_request);
    println!(
        "- sidecar / nginx throughput: {:.2}× (per round: {:.2}×)",
        side.rps / ngx.rps,
        per_round("sidecar", "nginx", rps)
    );
    println!(
        "- bare hyper proxy / nginx throughput: {:.2}× (per round: {:.2}×); sidecar / bare hyper proxy: {:.2}× (per round: {:.2}×)",
        bare.rps / ngx.rps,
        per_round("bare hyper proxy", "nginx", rps),
        side.rps / bare.rps,
        per_round("sidecar", "bare hyper proxy", rps)
    );
    if let Some(base) = results.get("baseline").map(|runs| median(runs)) {
        println!(
            "- sidecar / baseline sidecar: throughput {:.3}× (per round: {:.3}×), CPU per request {:.1} µs against {:.1} µs (per round: {:.3}×), p99 {:.0} µs against {:.0} µs",
            side.rps / base.rps,
            per_round("sidecar", "baseline", rps),
            side.cpu_us_per_request,
            base.cpu_us_per_request,
            per_round("sidecar", "baseline", cpu),
            side.p99_us,
            base.p99_us
        );
    }
    added_p99_line(results, "", "at saturation");
    println!(
        "- sidecar preflights / sidecar proxied requests: {:.2}×",
        side_pre.rps / side.rps
    );
    println!(
        "- sidecar preflights / nginx preflights: {:.2}×",
        side_pre.rps / ngx_pre.rps
    );
    for &(name, rss) in idle_rss {
        println!("- RSS idle, {name}: {:.1} MiB", rss as f64 / 1024.0);
    }
    for &(name, before, rss) in held_rss {
        println!(
            "- RSS with 1,000 open keep-alive connections, {name}: {:.1} MiB ({:.1} MiB after the load runs, before opening them)",
            rss as f64 / 1024.0,
            before as f64 / 1024.0
        );
    }
    println!(
        "- of the sidecar's 1,000 held connections, {idle_held} idle without buffers (`corsair_sidecar_client_connections{{state=\"idle\"}}`)"
    );
    println!(
        "- upstream connections opened by the sidecar: {counted_connections} for {sidecar_requests} requests ({} requests per new connection)",
        sidecar_requests / counted_connections.max(1)
    );
    println!(
        "- of them, from 1 s into each run to 0.5 s before its end: {steady_connections} for {steady_requests} requests ({} requests per new connection; the rest replace those closed with the requests in flight when wrk ends a run)",
        steady_requests / steady_connections.max(1)
    );
}

/// The paced runs: latency at the same load for every target, `load`.
fn paced_report(results: &BTreeMap<String, Vec<Run>>, load: &str) {
    let paced = |name: &str| median(&results[&format!("{name} paced")]);
    let direct_paced = paced("direct");
    println!("\nAt the same load for each ({load}):\n");
    println!("| target | req/s | p50 | p99 | added p99 | CPU per request | failed |");
    println!("|---|---|---|---|---|---|---|");
    for (name, key) in [
        ("upstream direct", "direct"),
        ("corsair-sidecar", "sidecar"),
        ("nginx", "nginx"),
        ("bare hyper proxy", "bare hyper proxy"),
    ] {
        let run = paced(key);
        let added = if key == "direct" {
            "–".to_owned()
        } else {
            format!("{:.0} µs", run.p99_us - direct_paced.p99_us)
        };
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {added} | {:.1} µs | {} |",
            run.rps, run.p50_us, run.p99_us, run.cpu_us_per_request, run.failed
        );
    }
    println!();
    added_p99_line(results, " paced", "at the same load");
}

/// The sidecar's added p99 (its p99 less the direct run's) against nginx's, over the medians
/// and per round (each round's runs against one another), and the rounds where the sidecar's
/// own p99 was at or below nginx's; `suffix` picks the runs (`""` at saturation).
fn added_p99_line(results: &BTreeMap<String, Vec<Run>>, suffix: &str, load: &str) {
    let runs = |name: &str| &results[&format!("{name}{suffix}")];
    let (direct, side, ngx) = (runs("direct"), runs("sidecar"), runs("nginx"));
    let ratios: Vec<f64> = side
        .iter()
        .zip(ngx)
        .zip(direct)
        .map(|((s, n), d)| (s.p99_us - d.p99_us) / (n.p99_us - d.p99_us))
        .collect();
    let at_or_below = side.iter().zip(ngx).filter(|(s, n)| s.p99_us <= n.p99_us);
    let (direct, side, ngx) = (median(direct), median(side), median(ngx));
    println!(
        "- added p99 {load}, sidecar / nginx: {:.2}× (per round: {:.2}×); the sidecar's p99 at or below nginx's in {} of {} rounds",
        (side.p99_us - direct.p99_us) / (ngx.p99_us - direct.p99_us),
        middle(ratios),
        at_or_below.count(),
        results[&format!("sidecar{suffix}")].len()
    );
}

/// `CORSAIR_BENCH_ONLY=large`: each target loaded in turn, in interleaved rounds, from
/// `CORSAIR_BENCH_LARGE_CONNECTIONS` connections (default 128), with GETs of the upstream's
/// 256 KiB `/large` (downloads), then with `POST`s of 256 KiB (uploads): throughput, CPU per
/// exchange, and peak RSS (`VmHWM`) over the downloads, then over both.
fn large_report(
    targets: &[(&str, String, &Proc)],
    download: &Path,
    upload: &Path,
    seconds: u64,
    rounds: usize,
) {
    for (what, path, script) in [
        ("downloads", "/large", download),
        ("uploads", "/upload", upload),
    ] {
        large_runs(targets, what, path, script, seconds, rounds);
    }
}

/// One half of [`large_report`]: `script` against `path` on each target, and its table.
fn large_runs(
    targets: &[(&str, String, &Proc)],
    what: &str,
    path: &str,
    script: &Path,
    seconds: u64,
    rounds: usize,
) {
    let connections = env_or("CORSAIR_BENCH_LARGE_CONNECTIONS", 128);
    let mut results: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for round in 0..rounds {
        for (name, addr, target) in targets {
            let url = format!("http://{addr}{path}");
            let run = wrk(&url, script, seconds, connections, Some(target));
            eprintln!(
                "round {round} {what} {name:<18} {:>8.0}/s  cpu {:>6.1} µs each  failed {}",
                run.rps, run.cpu_us_per_request, run.failed
            );
            results.entry(name).or_default().push(run);
        }
    }
    let hwm_kib = |target: &Proc| -> u64 {
        pids(target)
            .into_iter()
            .map(|pid| status_kib(pid, "VmHWM"))
            .sum()
    };
    println!(
        "\n## 256 KiB {what} ({rounds} rounds of {seconds} s, wrk -t1 -c{connections}; medians)\n"
    );
    println!("| target | {what}/s | MiB/s | CPU per exchange | peak RSS | RSS after | failed |");
    println!("|---|---|---|---|---|---|---|");
    for (name, _, target) in targets {
        let run = median(&results[name]);
        println!(
            "| {name} | {:.0} | {:.0} | {:.1} µs | {:.1} MiB | {:.1} MiB | {} |",
            run.rps,
            run.rps * LARGE_BYTES as f64 / (1024.0 * 1024.0),
            run.cpu_us_per_request,
            hwm_kib(target) as f64 / 1024.0,
            rss_kib(target) as f64 / 1024.0,
            results[name].iter().map(|r| r.failed).sum::<u64>(),
        );
    }
    if results.contains_key("baseline sidecar") {
        let per_round = |f: fn(&Run) -> f64| {
            middle(
                results["corsair-sidecar"]
                    .iter()
                    .zip(&results["baseline sidecar"])
                    .map(|(a, b)| f(a) / f(b))
                    .collect(),
            )
        };
        println!(
            "\n- sidecar / baseline sidecar, per round: throughput {:.3}×, CPU per exchange {:.3}×",
            per_round(|r| r.rps),
            per_round(|r| r.cpu_us_per_request)
        );
    }
}

/// The median of `values`, the mean of the middle two for an even count.
fn middle(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    (values[(values.len() - 1) / 2] + values[values.len() / 2]) / 2.0
}

/// The sidecar's idle client connections, from its metrics.
fn idle_connections(admin: &str) -> i64 {
    let (_, metrics) = get(admin, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("corsair_sidecar_client_connections{state=\"idle\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// The revision of the `shop` policy the sidecar enforces.
fn shop_revision(admin: &str) -> i64 {
    let (_, body) = get(admin, "/policy");
    let policy: serde_json::Value = serde_json::from_str(&body).unwrap();
    policy["services"]["shop"]["revision"].as_i64().unwrap()
}
