//! An existing database upgrades in place: a database made by the schema as it was before
//! origin sets (migrations 0001–0004), holding policies, their history and an audit chain
//! written the way that schema was written, is opened by today's store. Its policies still
//! serve, its chain still verifies, and new writes (a set, a policy using it) extend the same
//! chain.

mod support;

use std::path::Path;

use corsair_control_plane::audit;
use corsair_control_plane::store::{self, AuditEvent, Outcome};
use corsair_policy::PolicySpec;
use corsair_proto::v1::{self, origin_set_service_client::OriginSetServiceClient};
use support::{Backend, TestServer, fresh_db};

/// The migrations that made the schema before origin sets.
const BEFORE_SETS: u32 = 4;

/// Runs the first [`BEFORE_SETS`] migrations of `backend`'s folder on `url`.
async fn old_schema(backend: Backend, url: &str) {
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(folder);
    let old = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let version: u32 = name[..4].parse().unwrap();
        if version <= BEFORE_SETS {
            std::fs::copy(&path, old.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, BEFORE_SETS);
    let migrator = sqlx::migrate::Migrator::new(old.path()).await.unwrap();
    match backend {
        Backend::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
            let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
                .await
                .unwrap();
            migrator.run(&pool).await.unwrap();
            write_old_rows(Db::Sqlite(pool)).await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            migrator.run(&pool).await.unwrap();
            write_old_rows(Db::Postgres(pool)).await;
        }
    }
}

enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

macro_rules! exec {
    ($db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        match &$db {
            Db::Sqlite(pool) => {
                sqlx::query($sql)$(.bind($bind))*.execute(pool).await.unwrap();
            }
            Db::Postgres(pool) => {
                sqlx::query($sql)$(.bind($bind))*.execute(pool).await.unwrap();
            }
        }
    };
}

/// Two policy writes, as the old schema's writer stored them: the policy, its revision, its
/// audit event (hashed by the v1 encoding) and the head.
async fn write_old_rows(db: Db) {
    let mut prev = audit::GENESIS.to_vec();
    let mut before: Option<String> = None;
    for (revision, origin) in [
        (1i64, "https://a.example.com"),
        (2, "https://b.example.com"),
    ] {
        let spec = PolicySpec {
            service: "shop".into(),
            allowed_origins: vec![origin.into()],
            allowed_methods: vec!["PUT".into()],
            ..PolicySpec::default()
        };
        let json = store::spec_json(&spec);
        let time = 1_700_000_000_000_000 + revision;
        let mut event = AuditEvent {
            sequence: revision as u64,
            time,
            actor: "alice".into(),
            method: "corsair.v1.PolicyService/UpdatePolicy".into(),
            service: "shop".into(),
            revision,
            before: before.clone(),
            after: Some(json.clone()),
            changed_fields: vec!["allowed_origins".into()],
            reason: "before origin sets".into(),
            request_id: format!("req-{revision}"),
            peer: "127.0.0.1:1".into(),
            outcome: Outcome::Ok,
            error: String::new(),
            prev_hash: prev.clone(),
            hash: Vec::new(),
            origin_set: String::new(),
            affected_services: Vec::new(),
        };
        event.hash = audit::event_hash(&event).to_vec();
        exec!(
            db,
            "INSERT INTO policies (service, spec, revision, create_time, update_time, update_actor)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (service) DO UPDATE SET spec = excluded.spec, revision = excluded.revision,
                 update_time = excluded.update_time",
            "shop",
            json.clone(),
            revision,
            time,
            time,
            "alice",
        );
        exec!(
            db,
            "INSERT INTO policy_revisions (revision, service, spec, time, actor, reason, audit_sequence)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            revision,
            "shop",
            json.clone(),
            time,
            "alice",
            "before origin sets",
            revision,
        );
        exec!(
            db,
            "INSERT INTO audit_events (sequence, time, actor, method, service, revision, before_spec,
                 after_spec, changed_fields, reason, request_id, peer, outcome, error, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            revision,
            time,
            event.actor.clone(),
            event.method.clone(),
            "shop",
            revision,
            before.clone(),
            json.clone(),
            "allowed_origins",
            event.reason.clone(),
            event.request_id.clone(),
            event.peer.clone(),
            Outcome::Ok.as_str(),
            "",
            prev.clone(),
            event.hash.clone(),
        );
        exec!(
            db,
            "UPDATE head SET revision = $1, last_sequence = $2, last_hash = $3, last_time = $4 WHERE id = 1",
            revision,
            revision,
            event.hash.clone(),
            time,
        );
        prev = event.hash;
        before = Some(json);
    }
}

async fn upgrades_in_place(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    old_schema(backend, &db.url).await;

    // Today's control plane opens it: the migration to origin sets runs.
    let server = TestServer::start(&db.url).await;
    let mut policies = server.policies().await;
    let shop = policies
        .get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shop.revision, 2);
    assert_eq!(shop.allowed_origins, ["https://b.example.com"]);
    let history = policies
        .list_policy_revisions(v1::ListPolicyRevisionsRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.revisions.len(), 2);

    let mut audit = server.audit().await;
    let verify = |mut audit: v1::audit_service_client::AuditServiceClient<_>| async move {
        audit
            .verify_audit_chain(v1::VerifyAuditChainRequest::default())
            .await
            .unwrap()
            .into_inner()
    };
    let verified = verify(audit.clone()).await;
    assert!(verified.ok, "{}", verified.error);
    assert_eq!(verified.verified_events, 2);

    // A sidecar still gets the old policy.
    let mut stream = corsair_proto::v1::discovery_service_client::DiscoveryServiceClient::new(
        server.channel().await,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(v1::DiscoveryRequest {
        kind: Some(v1::discovery_request::Kind::Hello(v1::Hello {
            sidecar_id: "upgraded".into(),
            services: vec!["shop".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = stream
        .stream_policies(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let snapshot = support::within("the snapshot of the upgraded database", inbound.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        snapshot.upserts[0].allowed_origins,
        ["https://b.example.com"]
    );
    assert_eq!(snapshot.upserts[0].effective_revision, 2);
    drop(tx);

    // New writes extend the same chain: a set, and the old policy using it.
    OriginSetServiceClient::new(server.channel().await)
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(v1::OriginSet {
                name: "originSets/corp".into(),
                origins: vec!["https://checkout.example.com".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    policies
        .update_policy(v1::UpdatePolicyRequest {
            policy: Some(v1::Policy {
                allowed_origins: vec!["https://b.example.com".into(), "set:corp".into()],
                ..shop
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let verified = verify(audit.clone()).await;
    assert!(verified.ok, "{}", verified.error);
    assert_eq!(verified.verified_events, 4);
    let events = audit
        .list_audit_events(v1::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 4);
    server.stop().await;
}

on_both_backends!(upgrades_in_place);
