//! Storage benchmark, on SQLite and PostgreSQL side by side:
//! - policy writes per second through the store (1 and 8 concurrent writers);
//! - a filtered audit page (service + time range, 50 rows) with 1,000,000 events stored: p50/p99;
//! - a full audit-chain verification of those events.
//!
//! Run: `cargo bench -p corsair-control-plane --bench store`.
//! Environment: `CORSAIR_BENCH_EVENTS` (default 1000000), `CORSAIR_BENCH_BACKENDS`
//! (default `sqlite,postgres`), `CORSAIR_TEST_POSTGRES_URL` (admin URL of the local server).

use std::sync::Arc;
use std::time::Instant;

use corsair_control_plane::audit::{self, GENESIS};
use corsair_control_plane::store::postgres::PgStore;
use corsair_control_plane::store::sqlite::SqliteStore;
use corsair_control_plane::store::{
    AuditEvent, AuditFilter, Outcome, Plan, Store, WriteContext, now_micros, spec_json,
};
use corsair_policy::PolicySpec;

const SERVICES: u64 = 1000;
const ACTORS: u64 = 20;

fn main() {
    let events: u64 = std::env::var("CORSAIR_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let backends =
        std::env::var("CORSAIR_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("events: {events}");
    for backend in backends.split(',') {
        rt.block_on(run(backend.trim(), events));
    }
}

async fn run(backend: &str, events: u64) {
    println!("\n== {backend} ==");
    let dir = tempfile::tempdir().unwrap();
    let admin = std::env::var("CORSAIR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pg_name = format!("corsair_bench_{}", uuid::Uuid::new_v4().simple());
    let (store, seed): (Arc<dyn Store>, Seeder) = match backend {
        "sqlite" => {
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            let s = SqliteStore::connect(&url).await.unwrap();
            let pool = s.pool().clone();
            (Arc::new(s), Seeder::Sqlite(pool))
        }
        "postgres" => {
            let pool = sqlx::PgPool::connect(&admin)
                .await
                .expect("PostgreSQL reachable");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE \"{pg_name}\""
            )))
            .execute(&pool)
            .await
            .unwrap();
            let base = admin.rsplit_once('/').unwrap().0;
            let s = PgStore::connect(&format!("{base}/{pg_name}"))
                .await
                .unwrap();
            let pool = s.pool().clone();
            (Arc::new(s), Seeder::Postgres(pool))
        }
        other => panic!("unknown backend {other}"),
    };

    for writers in [1, 8] {
        let per = 2000 / writers;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    let service = format!("w{w}-{}", i % 50);
                    let spec = PolicySpec {
                        service: service.clone(),
                        allowed_origins: vec![format!("https://app{i}.example.com")],
                        ..PolicySpec::default()
                    };
                    let ctx = WriteContext {
                        actor: "bench".into(),
                        method: "bench".into(),
                        service,
                        ..Default::default()
                    };
                    store
                        .write(ctx, Box::new(move |_, _| Plan::Put(spec)))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "writes, {writers} writer(s): {:.0}/s ({} in {secs:.2} s)",
            (per * writers) as f64 / secs,
            per * writers
        );
    }

    let head = store.head().await.unwrap();
    let started = Instant::now();
    let (t0, t_end) = seed
        .seed(
            head.last_sequence,
            head.last_hash.clone(),
            head.last_time,
            events,
        )
        .await;
    println!(
        "seeded {events} audit events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Filtered page: one service, a time window a quarter of the log wide, 50 rows.
    let span = t_end - t0;
    let mut samples = Vec::new();
    let mut rng = 0x9e3779b97f4a7c15u64;
    for _ in 0..1000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let service = format!("svc{}", rng % SERVICES);
        let since = t0 + (rng % (span as u64 * 3 / 4)) as i64;
        let filter = AuditFilter {
            service,
            since: Some(since),
            until: Some(since + span / 4),
            ..AuditFilter::default()
        };
        let started = Instant::now();
        let page = store.list_audit(&filter, None, 50).await.unwrap();
        samples.push(started.elapsed());
        assert!(page.len() <= 50);
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "filtered audit page (service + time range, 50 rows): p50 {:?}, p99 {:?}",
        pct(0.50),
        pct(0.99)
    );

    let started = Instant::now();
    let v = audit::verify(store.clone(), 0, 0).await.unwrap();
    assert!(v.first_bad.is_none(), "{v:?}");
    println!(
        "full chain verification: {} events in {:.2} s",
        v.verified,
        started.elapsed().as_secs_f64()
    );

    drop(store);
    if backend == "postgres" {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{pg_name}\" WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    }
}

enum Seeder {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

const COLUMNS: &str = "sequence, time, actor, method, service, revision, before_spec, after_spec, changed_fields, reason, request_id, peer, outcome, error, prev_hash, hash";

impl Seeder {
    /// Appends `count` chained events after the current head, one millisecond apart, and
    /// moves the head. Returns the time of the first and last event.
    async fn seed(
        &self,
        last_sequence: u64,
        mut prev: Vec<u8>,
        last_time: i64,
        count: u64,
    ) -> (i64, i64) {
        if prev.is_empty() {
            prev = GENESIS.to_vec();
        }
        let t0 = now_micros().max(last_time) + 1000;
        let after = spec_json(&PolicySpec {
            service: "svc".into(),
            allowed_origins: vec!["https://app.example.com".into()],
            ..Default::default()
        });
        let batch = 1000;
        let mut seq = last_sequence;
        let mut time = t0;
        while seq < last_sequence + count {
            let mut events = Vec::with_capacity(batch);
            for _ in 0..batch.min((last_sequence + count - seq) as usize) {
                seq += 1;
                time += 1000;
                let mut e = AuditEvent {
                    sequence: seq,
                    time,
                    actor: format!("user{}", seq % ACTORS),
                    method: "corsair.v1.PolicyService/UpdatePolicy".into(),
                    service: format!("svc{}", seq % SERVICES),
                    revision: seq as i64,
                    before: Some(after.clone()),
                    after: Some(after.clone()),
                    changed_fields: vec!["allowed_origins".into()],
                    reason: "bench".into(),
                    request_id: format!("req-{seq}"),
                    peer: "127.0.0.1:50000".into(),
                    outcome: Outcome::Ok,
                    error: String::new(),
                    prev_hash: prev.clone(),
                    hash: Vec::new(),
                    origin_set: String::new(),
                    affected_services: Vec::new(),
                };
                e.hash = audit::event_hash(&e).to_vec();
                prev = e.hash.clone();
                events.push(e);
            }
            match self {
                Seeder::Sqlite(pool) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
                        "INSERT INTO audit_events ({COLUMNS}) "
                    ));
                    q.push_events(&events);
                    let mut tx = pool.begin().await.unwrap();
                    q.build().execute(&mut *tx).await.unwrap();
                    tx.commit().await.unwrap();
                }
                Seeder::Postgres(pool) => {
                    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
                        "INSERT INTO audit_events ({COLUMNS}) "
                    ));
                    q.push_events(&events);
                    q.build().execute(pool).await.unwrap();
                }
            }
        }
        match self {
            Seeder::Sqlite(pool) => {
                sqlx::query(
                    "UPDATE head SET last_sequence = ?, last_hash = ?, last_time = ? WHERE id = 1",
                )
                .bind(seq as i64)
                .bind(&prev)
                .bind(time)
                .execute(pool)
                .await
                .unwrap();
                sqlx::query("ANALYZE").execute(pool).await.unwrap();
            }
            Seeder::Postgres(pool) => {
                sqlx::query("UPDATE head SET last_sequence = $1, last_hash = $2, last_time = $3 WHERE id = 1").bind(seq as i64).bind(&prev).bind(time).execute(pool).await.unwrap();
                sqlx::query("ANALYZE audit_events")
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
        (t0, time)
    }
}

macro_rules! push_values_for {
    ($q:expr, $events:expr) => {
        $q.push_values($events, |mut row, e| {
            row.push_bind(e.sequence as i64)
                .push_bind(e.time)
                .push_bind(e.actor.clone())
                .push_bind(e.method.clone())
                .push_bind(e.service.clone())
                .push_bind(e.revision)
                .push_bind(e.before.clone())
                .push_bind(e.after.clone())
                .push_bind(e.changed_fields.join(","))
                .push_bind(e.reason.clone())
                .push_bind(e.request_id.clone())
                .push_bind(e.peer.clone())
                .push_bind(e.outcome.as_str())
                .push_bind(e.error.clone())
                .push_bind(e.prev_hash.clone())
                .push_bind(e.hash.clone());
        })
    };
}

/// Multi-row `VALUES` for one batch of events, on either backend.
trait PushValues {
    fn push_events(&mut self, events: &[AuditEvent]);
}

impl PushValues for sqlx::QueryBuilder<sqlx::Sqlite> {
    fn push_events(&mut self, events: &[AuditEvent]) {
        push_values_for!(self, events);
    }
}

impl PushValues for sqlx::QueryBuilder<sqlx::Postgres> {
    fn push_events(&mut self, events: &[AuditEvent]) {
        push_values_for!(self, events);
    }
}
