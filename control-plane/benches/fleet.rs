//! Distribution benchmark with the real `corsair-control-plane` binary and simulated
//! sidecars (the real sync client, validating and compiling every push):
//! - commit → every sidecar applied/ACKed, for 1,000 streams (p50/p99/max over updates) and
//!   10,000 streams (max per update);
//! - control-plane RSS per idle stream (0 → 10,000 streams);
//! - reconnect storm: the control plane killed and restarted under 10,000 sidecars, time until
//!   all are back, and how many pushes that took (0 when they resume without payload);
//! - two replicas on PostgreSQL: write on one → sidecars on the other.
//!
//! Run: `cargo bench -p corsair-control-plane --bench fleet`.
//! Environment: `CORSAIR_BENCH_SIDECARS` (default 10000), `CORSAIR_TEST_POSTGRES_URL`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corsair_proto::v1::{self, policy_service_client::PolicyServiceClient};
use corsair_sidecar::sim;
use corsair_sidecar::sync::{Backoff, SyncState};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_corsair-control-plane");

struct ControlPlane {
    child: Child,
    addr: String,
}

impl ControlPlane {
    fn start(database_url: &str, listen: &str, extra: &[&str]) -> ControlPlane {
        let mut child = Command::new(BIN)
            .args([
                "--listen",
                listen,
                "--database-url",
                database_url,
                "--log-format",
                "json",
                // Loopback only; the simulated sidecars present no token.
                "--auth",
                "none",
            ])
            .args(extra)
            .env("RUST_LOG", "warn,corsair_control_plane::server=info")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the control plane starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("it logs its address").unwrap();
            let log: serde_json::Value = serde_json::from_str(&line).unwrap();
            if log["fields"]["message"] == "control plane listening" {
                break log["fields"]["address"].as_str().unwrap().to_owned();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ControlPlane { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(url: &str) -> PolicyServiceClient<tonic::transport::Channel> {
    PolicyServiceClient::connect(url.to_owned()).await.unwrap()
}

async fn put(client: &mut PolicyServiceClient<tonic::transport::Channel>, origin: &str) -> i64 {
    let current = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/shared/policy".into(),
            ..Default::default()
        })
        .await
        .ok()
        .map(|r| r.into_inner());
    match current {
        Some(mut p) => {
            p.allowed_origins = vec![origin.into()];
            client
                .update_policy(v1::UpdatePolicyRequest {
                    policy: Some(p),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .revision
        }
        None => {
            let p = v1::Policy {
                service: "shared".into(),
                allowed_origins: vec![origin.into()],
                ..Default::default()
            };
            client
                .create_policy(v1::CreatePolicyRequest {
                    policy: Some(p),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .revision
        }
    }
}

/// Commits `updates` changes one after another; for each, the time from just before the
/// write to each sidecar having applied it (and sent its ACK).
async fn converge(
    fleet: &sim::Fleet,
    writer: &mut PolicyServiceClient<tonic::transport::Channel>,
    updates: usize,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    for i in 0..updates {
        let started = Instant::now();
        let revision = put(writer, &format!("https://u{i}.example.com")).await;
        for at in fleet.all_at(revision).await {
            samples.push(at.saturating_duration_since(started));
        }
    }
    samples.sort();
    samples
}

fn pct(samples: &[Duration], p: f64) -> Duration {
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

fn backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(500),
        multiplier: 1.6,
        max: Duration::from_secs(10),
    }
}

fn shared(_: usize) -> Vec<String> {
    vec!["shared".into()]
}

fn main() {
    let sidecars: usize = std::env::var("CORSAIR_BENCH_SIDECARS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("fleet.db").display());
        let cp = ControlPlane::start(&db, "127.0.0.1:0", &["--max-new-streams-per-sec", "2000"]);
        let url = cp.url();
        let mut writer = client(&url).await;
        put(&mut writer, "https://first.example.com").await;

        // 1,000 streams.
        let fleet = sim::start(&url, 1000, shared, backoff()).await.unwrap();
        fleet.all_connected().await;
        let samples = converge(&fleet, &mut writer, 20).await;
        println!(
            "1,000 streams, 20 updates: commit → applied+ACKed p50 {:?}, p99 {:?}, max {:?}",
            pct(&samples, 0.5),
            pct(&samples, 0.99),
            samples.last().unwrap()
        );
        fleet.stop().await;

        // 0 → N idle streams: memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = cp.rss_kib();
        let started = Instant::now();
        let fleet = sim::start(&url, sidecars, shared, backoff()).await.unwrap();
        fleet.all_connected().await;
        let connected_in = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = cp.rss_kib();
        println!(
            "{sidecars} streams connected in {connected_in:?} (admission 2,000/s); control-plane RSS {before} KiB → {after} KiB: {:.1} KiB per stream",
            (after.saturating_sub(before)) as f64 / sidecars as f64
        );
        let samples = converge(&fleet, &mut writer, 5).await;
        println!(
            "{sidecars} streams, 5 updates: commit → all applied+ACKed: p99 {:?}, max {:?}",
            pct(&samples, 0.99),
            samples.last().unwrap()
        );

        // Reconnect storm: kill -9 and restart on the same address.
        let addr = cp.addr.clone();
        cp.kill();
        for state in &fleet.states {
            let _ = state.clone().wait_for(|s| matches!(s, SyncState::Connecting { .. })).await;
        }
        let started = Instant::now();
        let cp = ControlPlane::start(&db, &addr, &["--max-new-streams-per-sec", "2000", "--metrics-listen", "127.0.0.1:0"]);
        fleet.all_connected().await;
        let back = started.elapsed();
        let metrics_addr = find_metrics_port(&cp);
        let pushes = match metrics_addr {
            Some(m) => scrape(&m, "corsair_pushes_total").await,
            None => f64::NAN,
        };
        println!("reconnect storm: {sidecars} sidecars back in {back:?} after a restart; pushes needed: {pushes} (resumed without payload)");
        fleet.stop().await;
        cp.kill();

        // Two replicas on PostgreSQL.
        let admin = std::env::var("CORSAIR_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = sqlx::PgPool::connect(&admin).await.expect("PostgreSQL reachable");
        let name = format!("corsair_fleet_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&pool).await.unwrap();
        let pg = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let one = ControlPlane::start(&pg, "127.0.0.1:0", &[]);
        let two = ControlPlane::start(&pg, "127.0.0.1:0", &[]);
        let mut writer = client(&one.url()).await;
        put(&mut writer, "https://first.example.com").await;
        let fleet = sim::start(&two.url(), 100, shared, backoff()).await.unwrap();
        fleet.all_connected().await;
        let samples = converge(&fleet, &mut writer, 50).await;
        println!(
            "two replicas on PostgreSQL, 100 sidecars on the other replica, 50 updates: p50 {:?}, p99 {:?}, max {:?}",
            pct(&samples, 0.5),
            pct(&samples, 0.99),
            samples.last().unwrap()
        );
        fleet.stop().await;
        one.kill();
        two.kill();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))).execute(&pool).await;
    });
}

/// The metrics listener's address, from the process's listening sockets.
fn find_metrics_port(cp: &ControlPlane) -> Option<String> {
    let out = Command::new("ss").args(["-ltnpH"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = format!("pid={},", cp.child.id());
    text.lines()
        .filter(|l| l.contains(&pid))
        .filter_map(|l| l.split_whitespace().nth(3))
        .find(|a| *a != cp.addr)
        .map(str::to_owned)
}

async fn scrape(addr: &str, metric: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(f64::NAN)
}
