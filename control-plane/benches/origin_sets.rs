//! Origin set benchmark with the real `corsair-control-plane` binary: one set of 5,000 entries
//! referenced by 1,000 services.
//! - set write, commit latency (the RPC, which returns once the transaction has committed),
//!   on SQLite and on PostgreSQL: each write adds one entry, compare-and-set on the etag, and
//!   lints all 1,000 referrers inside the transaction;
//! - with simulated sidecars spread over the 1,000 services (the real sync client, each
//!   validating and compiling every push), the time from the commit to every sidecar having
//!   applied the change and sent its ACK.
//!
//! Run: `cargo bench -p corsair-control-plane --bench origin_sets`.
//! Environment: `CORSAIR_BENCH_SIDECARS` (default 10000), `CORSAIR_BENCH_SET_WRITES` (default
//! 50), `CORSAIR_TEST_POSTGRES_URL`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corsair_proto::v1::{
    self, origin_set_service_client::OriginSetServiceClient,
    policy_service_client::PolicyServiceClient,
};
use corsair_sidecar::sim;
use corsair_sidecar::sync::Backoff;
use tokio::time::Instant;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_corsair-control-plane");
const ENTRIES: usize = 5_000;
const SERVICES: usize = 1_000;

struct ControlPlane {
    child: Child,
    url: String,
}

impl ControlPlane {
    fn start(database_url: &str) -> ControlPlane {
        let mut child = Command::new(BIN)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
                "--log-format",
                "json",
                "--auth",
                "none",
                "--max-new-streams-per-sec",
                "2000",
                "--max-writes-per-sec",
                "0",
            ])
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
        std::thread::spawn(move || for _ in lines {});
        ControlPlane {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service(i: usize) -> String {
    format!("svc{i:04}")
}

/// The set, and 1,000 policies that reference it.
async fn seed(url: &str) -> v1::OriginSet {
    let mut sets = OriginSetServiceClient::connect(url.to_owned())
        .await
        .unwrap();
    let set = sets
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(v1::OriginSet {
                name: "originSets/corp".into(),
                origins: (0..ENTRIES)
                    .map(|i| format!("https://app{i}.corp.example.com"))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut policies = PolicyServiceClient::connect(url.to_owned()).await.unwrap();
    for i in 0..SERVICES {
        policies
            .create_policy(v1::CreatePolicyRequest {
                policy: Some(v1::Policy {
                    service: service(i),
                    allowed_origins: vec![
                        format!("https://{}.example.com", service(i)),
                        "set:corp".into(),
                    ],
                    allowed_methods: vec!["PUT".into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    set
}

/// Adds one entry to the set; the time the committed write took, and the set after it.
async fn add_entry(
    sets: &mut OriginSetServiceClient<Channel>,
    current: &v1::OriginSet,
    n: usize,
) -> (Duration, v1::OriginSet) {
    let mut origins = current.origins.clone();
    origins.push(format!("https://new{n}.example.com"));
    let started = Instant::now();
    let updated = sets
        .update_origin_set(v1::UpdateOriginSetRequest {
            origin_set: Some(v1::OriginSet {
                origins,
                ..current.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["origins".into()],
            }),
            reason: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (started.elapsed(), updated)
}

fn pct(samples: &[Duration], p: f64) -> Duration {
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

/// `writes` set writes, one after another: their commit latencies.
async fn write_latency(url: &str, mut current: v1::OriginSet, writes: usize) -> Vec<Duration> {
    let mut sets = OriginSetServiceClient::connect(url.to_owned())
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(writes);
    for n in 0..writes {
        let (took, next) = add_entry(&mut sets, &current, n).await;
        samples.push(took);
        current = next;
    }
    samples.sort();
    samples
}

fn report(backend: &str, samples: &[Duration]) {
    println!(
        "{backend}: set of {ENTRIES} entries, {SERVICES} referrers, {} writes: commit p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        pct(samples, 0.5),
        pct(samples, 0.99),
        samples.last().unwrap()
    );
}

fn main() {
    let sidecars: usize = std::env::var("CORSAIR_BENCH_SIDECARS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let writes: usize = std::env::var("CORSAIR_BENCH_SET_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // SQLite: write latency, then the fleet.
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("sets.db").display());
        let cp = ControlPlane::start(&db);
        let set = seed(&cp.url).await;
        let samples = write_latency(&cp.url, set, writes).await;
        report("SQLite", &samples);

        let mut sets = OriginSetServiceClient::connect(cp.url.clone()).await.unwrap();
        let mut current = sets
            .get_origin_set(v1::GetOriginSetRequest {
                name: "originSets/corp".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let started = Instant::now();
        let fleet = sim::start(
            &cp.url,
            sidecars,
            |i| vec![service(i % SERVICES)],
            Backoff {
                initial: Duration::from_millis(500),
                multiplier: 1.6,
                max: Duration::from_secs(10),
            },
        )
        .await
        .unwrap();
        fleet.all_at(current.revision).await;
        println!(
            "{sidecars} sidecars over {SERVICES} services connected and holding the set in {:?}",
            started.elapsed()
        );
        let mut after_commit = Vec::new();
        let mut after_start = Vec::new();
        for n in 0..5 {
            let started = Instant::now();
            let (took, next) = add_entry(&mut sets, &current, 10_000 + n).await;
            let committed = started + took;
            for at in fleet.all_at(next.revision).await {
                after_commit.push(at.saturating_duration_since(committed));
                after_start.push(at.saturating_duration_since(started));
            }
            current = next;
        }
        after_commit.sort();
        after_start.sort();
        println!(
            "{sidecars} sidecars, 5 set writes: commit → every sidecar applied+ACKed: p50 {:?}, p99 {:?}, max {:?} (from the write's start: max {:?})",
            pct(&after_commit, 0.5),
            pct(&after_commit, 0.99),
            after_commit.last().unwrap(),
            after_start.last().unwrap()
        );
        fleet.stop().await;
        drop(cp);

        // PostgreSQL: write latency.
        let admin = std::env::var("CORSAIR_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("PostgreSQL reachable");
        let name = format!("corsair_sets_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
        let pg = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        {
            let cp = ControlPlane::start(&pg);
            let set = seed(&cp.url).await;
            let samples = write_latency(&cp.url, set, writes).await;
            report("PostgreSQL", &samples);
        }
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    });
}
