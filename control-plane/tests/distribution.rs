//! Policy distribution end to end: real control-plane servers, the sidecar's real sync client,
//! and hand-driven streams where the protocol itself is under test. Scenarios run on SQLite
//! and PostgreSQL; the multi-replica ones on PostgreSQL only.

mod support;

use std::sync::Arc;
use std::time::Duration;

use corsair_control_plane::server::Config;
use corsair_control_plane::service::discovery::StreamConfig;
use corsair_proto::v1::{
    self, discovery_request::Kind, discovery_service_client::DiscoveryServiceClient,
};
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::sync::{Backoff, Replica, SyncClient, SyncConfig, SyncState, first_replica};
use support::{Backend, Deadline, TestServer, eventually, fresh_db, within};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const FAST: Backoff = Backoff {
    initial: Duration::from_millis(20),
    multiplier: 1.6,
    max: Duration::from_millis(200),
};

fn policy(service: &str, origin: &str) -> v1::Policy {
    v1::Policy {
        service: service.into(),
        allowed_origins: vec![origin.into()],
        ..Default::default()
    }
}

async fn create(server: &TestServer, service: &str, origin: &str) -> i64 {
    server
        .policies()
        .await
        .create_policy(v1::CreatePolicyRequest {
            policy: Some(policy(service, origin)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

async fn set_origin(server: &TestServer, service: &str, origin: &str) -> i64 {
    let mut client = server.policies().await;
    let mut p = client
        .get_policy(v1::GetPolicyRequest {
            name: format!("services/{service}/policy"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
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

/// A real sync client on its own task.
struct Sidecar {
    id: String,
    set: Arc<PolicySet>,
    state: watch::Receiver<SyncState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    async fn start(url: &str, id: &str, services: &[&str], set: Arc<PolicySet>) -> Sidecar {
        Sidecar::start_on(&[url.to_owned()], id, services, set).await
    }

    /// A sidecar given several control-plane replicas.
    async fn start_on(
        urls: &[String],
        id: &str,
        services: &[&str],
        set: Arc<PolicySet>,
    ) -> Sidecar {
        let replicas = urls
            .iter()
            .map(|url| Replica {
                address: url.clone(),
                channel: tonic::transport::Endpoint::from_shared(url.clone())
                    .unwrap()
                    .connect_lazy(),
            })
            .collect();
        let config = SyncConfig {
            sidecar_id: id.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            version: "test".into(),
            host: "localhost".into(),
            backoff: FAST,
        };
        let client = SyncClient::with_replicas(replicas, config, set.clone());
        let state = client.state();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            client
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Sidecar {
            id: id.into(),
            set,
            state,
            stop: Some(stop),
            task,
        }
    }

    async fn at(&mut self, revision: i64) {
        let deadline = Deadline::new(format!(
            "sidecar {} connected at revision {revision} or later",
            self.id
        ));
        let reached = self
            .state
            .wait_for(|s| matches!(s, SyncState::Connected { revision: r } if *r >= revision));
        let reached = tokio::time::timeout(deadline.remaining(), reached)
            .await
            .map(|reached| reached.map(drop));
        match reached {
            Ok(reached) => reached.unwrap(),
            Err(_) => deadline.expire(format_args!("{:?}", *self.state.borrow())),
        }
    }

    fn origins(&self, service: &str) -> Option<Vec<String>> {
        self.set
            .load()
            .services
            .get(service)
            .map(|a| a.compiled.policy().spec().allowed_origins.clone())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

/// A stream driven by hand.
struct RawStream {
    tx: mpsc::Sender<v1::DiscoveryRequest>,
    inbound: tonic::Streaming<v1::DiscoveryResponse>,
}

impl RawStream {
    async fn open(server: &TestServer, hello: v1::Hello) -> Result<RawStream, tonic::Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(v1::DiscoveryRequest {
            kind: Some(Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let inbound = DiscoveryServiceClient::new(server.channel().await)
            .stream_policies(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(RawStream { tx, inbound })
    }

    async fn next(&mut self) -> Result<Option<v1::DiscoveryResponse>, tonic::Status> {
        within("a message on the discovery stream", self.inbound.message()).await
    }

    async fn send(&self, kind: Kind) {
        self.tx
            .send(v1::DiscoveryRequest { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn hello(id: &str, services: &[&str], known: &[(&str, i64)]) -> v1::Hello {
    v1::Hello {
        sidecar_id: id.into(),
        services: services.iter().map(|s| s.to_string()).collect(),
        known_revisions: known.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
        ..Default::default()
    }
}

async fn fleet_row(server: &TestServer, id: &str) -> v1::Sidecar {
    server
        .fleet()
        .await
        .get_sidecar(v1::GetSidecarRequest {
            name: format!("sidecars/{id}"),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn snapshot_updates_and_removals(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let r1 = create(&server, "shop", "https://shop.example.com").await;
    create(&server, "other", "https://other.example.com").await;

    let mut sidecar =
        Sidecar::start(&server.url(), "sc-1", &["shop", "blog"], Arc::default()).await;
    sidecar.at(r1).await;
    assert_eq!(
        sidecar.origins("shop").unwrap(),
        ["https://shop.example.com"]
    );
    assert!(
        sidecar.origins("other").is_none(),
        "only the services it serves"
    );

    let r3 = create(&server, "blog", "https://blog.example.com").await;
    sidecar.at(r3).await;
    assert_eq!(
        sidecar.origins("blog").unwrap(),
        ["https://blog.example.com"]
    );

    let r4 = server
        .policies()
        .await
        .delete_policy(v1::DeletePolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    sidecar.at(r4).await;
    assert!(
        sidecar.origins("shop").is_none(),
        "a deletion arrives as a removal"
    );

    // The ACK crosses the wire after the sidecar applied the change.
    let row = eventually("fleet status to list sc-1 SYNCED", || async {
        let row = fleet_row(&server, "sc-1").await;
        (row.state == v1::SidecarState::Synced as i32).then_some(row)
    })
    .await;
    assert_eq!(row.last_acked_revision, r4);
    assert_eq!(row.services, ["shop", "blog"]);
    let list = |service: &str, state: v1::SidecarState| v1::ListSidecarsRequest {
        service: service.into(),
        state: state as i32,
        ..Default::default()
    };
    let mut fleet = server.fleet().await;
    let ids = |r: v1::ListSidecarsResponse| -> Vec<String> {
        r.sidecars.into_iter().map(|s| s.sidecar_id).collect()
    };
    let by_service = fleet
        .list_sidecars(list("blog", v1::SidecarState::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(by_service), ["sc-1"]);
    let other = fleet
        .list_sidecars(list("other", v1::SidecarState::Unspecified))
        .await
        .unwrap()
        .into_inner();
    assert!(other.sidecars.is_empty());
    let synced = fleet
        .list_sidecars(list("", v1::SidecarState::Synced))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(synced), ["sc-1"]);
    let nacked = fleet
        .list_sidecars(list("", v1::SidecarState::Nacked))
        .await
        .unwrap()
        .into_inner();
    assert!(nacked.sidecars.is_empty());
    sidecar.stop().await;
    let row = eventually("fleet status to list sc-1 DISCONNECTED", || async {
        let row = fleet_row(&server, "sc-1").await;
        (row.state == v1::SidecarState::Disconnected as i32).then_some(row)
    })
    .await;
    assert!(row.disconnect_time.is_some());
    server.stop().await;
}

async fn resume_without_payload(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let r1 = create(&server, "shop", "https://a.example.com").await;

    // Holding the current revision: nothing is sent until the policy changes.
    let mut stream = RawStream::open(&server, hello("sc-r", &["shop"], &[("shop", r1)]))
        .await
        .unwrap();
    let r2 = set_origin(&server, "shop", "https://b.example.com").await;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first.nonce, "1",
        "the first response is the change, not a resend"
    );
    assert!(!first.snapshot);
    assert_eq!(first.upserts.len(), 1);
    assert_eq!(first.upserts[0].revision, r2);
    stream
        .send(Kind::Ack(v1::Ack {
            nonce: first.nonce,
            revision: first.revision,
        }))
        .await;

    // Holding nothing: a full snapshot.
    let mut fresh = RawStream::open(&server, hello("sc-f", &[], &[]))
        .await
        .unwrap();
    let snap = fresh.next().await.unwrap().unwrap();
    assert!(snap.snapshot);
    assert_eq!(snap.upserts.len(), 1);

    // Holding a policy that was deleted meanwhile: an explicit removal.
    let mut stale = RawStream::open(&server, hello("sc-s", &["gone"], &[("gone", 1)]))
        .await
        .unwrap();
    let removal = stale.next().await.unwrap().unwrap();
    assert_eq!(removal.removals, ["gone"]);
    server.stop().await;
}

async fn nack_is_not_resent_and_shows_in_fleet(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    create(&server, "shop", "https://a.example.com").await;
    let mut stream = RawStream::open(&server, hello("sc-n", &["shop"], &[]))
        .await
        .unwrap();
    // A stream opened before this replica's cache caught up with the create first gets the
    // (empty) state it had; ACK that and refuse the push that carries the policy.
    let push = loop {
        let push = stream.next().await.unwrap().unwrap();
        if !push.upserts.is_empty() {
            break push;
        }
        stream
            .send(Kind::Ack(v1::Ack {
                nonce: push.nonce,
                revision: push.revision,
            }))
            .await;
    };
    stream
        .send(Kind::Nack(v1::Nack {
            nonce: push.nonce.clone(),
            revision: push.revision,
            error: "cannot compile".into(),
        }))
        .await;

    let row = eventually("fleet status to list sc-n NACKED", || async {
        let row = fleet_row(&server, "sc-n").await;
        (row.state == v1::SidecarState::Nacked as i32).then_some(row)
    })
    .await;
    assert_eq!(row.nack_error, "cannot compile");

    // An unrelated change does not resend the NACKed revision; a change to the policy does.
    create(&server, "other", "https://o.example.com").await;
    let r3 = set_origin(&server, "shop", "https://b.example.com").await;
    let next = stream.next().await.unwrap().unwrap();
    assert_eq!(
        next.upserts[0].revision, r3,
        "the NACKed revision was not resent"
    );
    server.stop().await;
}

async fn burst_of_updates_coalesces(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    create(&server, "shop", "https://a0.example.com").await;
    let mut sidecar = Sidecar::start(&server.url(), "sc-b", &["shop"], Arc::default()).await;
    sidecar.at(1).await;

    // Record every revision the sidecar applies.
    let mut seen = sidecar.state.clone();
    let recorder = tokio::spawn(async move {
        let mut revisions = Vec::new();
        while seen.changed().await.is_ok() {
            if let SyncState::Connected { revision } = *seen.borrow_and_update() {
                revisions.push(revision);
                if revision >= 101 {
                    break;
                }
            }
        }
        revisions
    });
    let mut last = 0;
    for i in 1..=100 {
        last = set_origin(&server, "shop", &format!("https://a{i}.example.com")).await;
    }
    assert_eq!(last, 101);
    sidecar.at(last).await;
    assert_eq!(
        sidecar.origins("shop").unwrap(),
        ["https://a100.example.com"]
    );
    let revisions = within("the recorder to see revision 101", recorder)
        .await
        .unwrap();
    assert!(
        revisions.windows(2).all(|w| w[0] <= w[1]),
        "never backwards: {revisions:?}"
    );
    assert_eq!(*revisions.last().unwrap(), 101);
    sidecar.stop().await;
    server.stop().await;
}

async fn control_plane_restart(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let r1 = create(&server, "shop", "https://a.example.com").await;
    let addr = server.addr;
    let mut sidecar = Sidecar::start(&server.url(), "sc-x", &["shop"], Arc::default()).await;
    sidecar.at(r1).await;
    server.stop().await;
    within(
        "sidecar sc-x to reconnect after the control plane stopped",
        sidecar
            .state
            .wait_for(|s| matches!(s, SyncState::Connecting { .. })),
    )
    .await
    .unwrap();
    // The last good policy keeps serving while the control plane is away.
    assert_eq!(sidecar.origins("shop").unwrap(), ["https://a.example.com"]);

    let store = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    let server = TestServer::on(addr, store, Config::default()).await;
    let r2 = set_origin(&server, "shop", "https://b.example.com").await;
    sidecar.at(r2).await;
    assert_eq!(sidecar.origins("shop").unwrap(), ["https://b.example.com"]);
    sidecar.stop().await;
    server.stop().await;
}

async fn ack_timeout_and_admission(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let store = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    let config = Config {
        streams: StreamConfig {
            ack_timeout: Duration::from_millis(50),
            max_new_streams_per_sec: 1,
            ..StreamConfig::default()
        },
        ..Config::default()
    };
    let server = TestServer::with_store(store, config).await;
    create(&server, "shop", "https://a.example.com").await;

    let mut silent = RawStream::open(&server, hello("sc-t", &["shop"], &[]))
        .await
        .unwrap();
    // One admitted per second with a burst of one: the next, at once, is refused.
    let refused = RawStream::open(&server, hello("sc-2", &["shop"], &[]))
        .await
        .err()
        .unwrap();
    // A stream that never ACKs is reset.
    silent.next().await.unwrap().unwrap();
    let end = silent.next().await.unwrap_err();
    assert_eq!(end.code(), Code::DeadlineExceeded);
    assert_eq!(refused.code(), Code::ResourceExhausted);
    server.stop().await;
}

on_both_backends!(
    snapshot_updates_and_removals,
    resume_without_payload,
    nack_is_not_resent_and_shows_in_fleet,
    burst_of_updates_coalesces,
    control_plane_restart,
    ack_timeout_and_admission,
);

/// Two control planes on one PostgreSQL database: a write on one reaches a sidecar on the
/// other, also after the other's LISTEN connection is killed. Anti-entropy is set to an hour,
/// so only the notifications (and the resync after the listener reconnects) can do it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres() {
    let Some(db) = fresh_db(Backend::Postgres).await else {
        return;
    };
    let config = || Config {
        anti_entropy: Duration::from_secs(3600),
        ..Config::default()
    };
    let one = TestServer::with_store(
        corsair_control_plane::store::connect(&db.url)
            .await
            .unwrap(),
        config(),
    )
    .await;
    let two = TestServer::with_store(
        corsair_control_plane::store::connect(&db.url)
            .await
            .unwrap(),
        config(),
    )
    .await;

    let mut sidecar = Sidecar::start(&two.url(), "sc-pg", &["shop"], Arc::default()).await;
    let r1 = create(&one, "shop", "https://a.example.com").await;
    sidecar.at(r1).await;
    let r2 = set_origin(&one, "shop", "https://b.example.com").await;
    sidecar.at(r2).await;

    // Fleet status is the same from either replica: the sidecar's replica writes it before
    // answering, and then the other reads it from the database.
    let row = eventually(
        "replica two to list sc-pg at the last revision it applied",
        || async {
            let row = fleet_row(&two, "sc-pg").await;
            (row.last_acked_revision == r2).then_some(row)
        },
    )
    .await;
    assert_eq!(row.state, v1::SidecarState::Synced as i32);
    assert_eq!(row, fleet_row(&one, "sc-pg").await);

    // Kill every LISTEN connection; the listeners reconnect and resync.
    let admin = sqlx::PgPool::connect(&db.url).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!killed.is_empty(), "the listeners were found");
    let r3 = set_origin(&one, "shop", "https://c.example.com").await;
    sidecar.at(r3).await;
    assert_eq!(sidecar.origins("shop").unwrap(), ["https://c.example.com"]);

    sidecar.stop().await;
    one.stop().await;
    two.stop().await;
}

/// A sidecar given two replicas starts on the one its id picks; when that one goes away it
/// moves to the other, and follows writes made there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_fails_over_between_replicas() {
    let Some(db) = fresh_db(Backend::Postgres).await else {
        return;
    };
    let store = || async {
        corsair_control_plane::store::connect(&db.url)
            .await
            .unwrap()
    };
    let one = TestServer::with_store(store().await, Config::default()).await;
    let two = TestServer::with_store(store().await, Config::default()).await;
    let id = (0..)
        .map(|i| format!("sc-{i}"))
        .find(|id| first_replica(id, 2) == 0)
        .unwrap();
    let urls = [one.url(), two.url()];
    let mut sidecar = Sidecar::start_on(&urls, &id, &["shop"], Arc::default()).await;
    let r1 = create(&two, "shop", "https://a.example.com").await;
    sidecar.at(r1).await;
    let row = eventually(
        "replica two to list the sidecar at its first revision",
        || async {
            let row = listed_row(&two, &id).await?;
            (row.last_acked_revision == r1).then_some(row)
        },
    )
    .await;
    let first = row.control_plane;

    // With `one` gone, the sidecar can only learn of r2 from `two`. (It moves there at once, so
    // its `Connecting` state may be too brief to observe.)
    one.stop().await;
    let r2 = set_origin(&two, "shop", "https://b.example.com").await;
    sidecar.at(r2).await;
    assert_eq!(sidecar.origins("shop").unwrap(), ["https://b.example.com"]);
    // Its row on the new replica is written once the ACK arrives there.
    let row = eventually(
        "replica two, which it moved to, to list the sidecar at the new revision",
        || async {
            let row = listed_row(&two, &id).await?;
            (row.last_acked_revision == r2).then_some(row)
        },
    )
    .await;
    assert_ne!(row.control_plane, first, "it moved to the other replica");
    sidecar.stop().await;
    two.stop().await;
}

/// Sidecar `id`'s fleet row, if it has one yet.
async fn listed_row(server: &TestServer, id: &str) -> Option<v1::Sidecar> {
    let request = v1::GetSidecarRequest {
        name: format!("sidecars/{id}"),
    };
    let row = server.fleet().await.get_sidecar(request).await.ok()?;
    Some(row.into_inner())
}

/// A replica that refuses connections does not hold a sidecar back from the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_skipped() {
    let Some(db) = fresh_db(Backend::Sqlite).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let r1 = create(&server, "shop", "https://a.example.com").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let id = (0..)
        .map(|i| format!("sc-{i}"))
        .find(|id| first_replica(id, 2) == 0)
        .unwrap();
    let mut sidecar =
        Sidecar::start_on(&[dead, server.url()], &id, &["shop"], Arc::default()).await;
    sidecar.at(r1).await;
    assert_eq!(sidecar.origins("shop").unwrap(), ["https://a.example.com"]);
    sidecar.stop().await;
    server.stop().await;
}
