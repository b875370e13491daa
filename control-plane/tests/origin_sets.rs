//! Origin sets through the API, on both backends: their own lifecycle, policies that
//! reference them, set writes checked against every referrer, the audit trail, and one set
//! write reaching the sidecars of every referrer in one push (as a delta when they hold the
//! set already).

mod support;

use std::sync::Arc;
use std::time::Duration;

use corsair_proto::v1::{
    self, discovery_request::Kind, discovery_service_client::DiscoveryServiceClient,
    origin_set_service_client::OriginSetServiceClient,
};
use corsair_sidecar::policies::PolicySet;
use corsair_sidecar::sync::{Backoff, SyncClient, SyncConfig, SyncState};
use support::{Backend, Deadline, TestServer, fresh_db, within};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

async fn sets(server: &TestServer) -> OriginSetServiceClient<Channel> {
    OriginSetServiceClient::new(server.channel().await)
}

fn set(name: &str, origins: &[&str]) -> v1::OriginSet {
    v1::OriginSet {
        name: format!("originSets/{name}"),
        description: format!("the {name} front-ends"),
        origins: origins.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn policy(service: &str, origins: &[&str]) -> v1::Policy {
    v1::Policy {
        service: service.into(),
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn create_set(server: &TestServer, set: v1::OriginSet) -> v1::OriginSet {
    sets(server)
        .await
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(set),
            reason: "new front-end".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn create_policy(server: &TestServer, p: v1::Policy) -> Result<v1::Policy, tonic::Status> {
    server
        .policies()
        .await
        .create_policy(v1::CreatePolicyRequest {
            policy: Some(p),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_set(
    server: &TestServer,
    current: &v1::OriginSet,
    origins: &[&str],
    acknowledged: &[&str],
) -> Result<v1::OriginSet, tonic::Status> {
    sets(server)
        .await
        .update_origin_set(v1::UpdateOriginSetRequest {
            origin_set: Some(v1::OriginSet {
                origins: origins.iter().map(|s| s.to_string()).collect(),
                ..current.clone()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["origins".into()],
            }),
            acknowledged_risks: acknowledged.iter().map(|s| s.to_string()).collect(),
            reason: "add checkout".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// The reason and the field violations (field, reason) of a refusal.
fn refusal(status: &tonic::Status) -> (String, Vec<(String, String)>) {
    let details = status.get_error_details();
    let reason = details
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    let violations = details
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.reason.clone()))
                .collect()
        })
        .unwrap_or_default();
    (reason, violations)
}

async fn lifecycle(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = sets(&server).await;

    // Validate-only stores nothing.
    let checked = client
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(set(
                "corp",
                &["https://b.example.com", "HTTPS://A.example.com"],
            )),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checked.revision, 0);
    assert_eq!(
        checked.origins,
        ["https://a.example.com", "https://b.example.com"]
    );
    let missing = client
        .get_origin_set(v1::GetOriginSetRequest {
            name: "originSets/corp".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(refusal(&missing).0, "SET_NOT_FOUND");

    // Invalid entries are refused with their field.
    let invalid = client
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(set("corp", &["https://a.example.com", "*"])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&invalid),
        (
            "INVALID_SET".to_owned(),
            vec![(
                "origin_set.origins[1]".to_owned(),
                "WILDCARD_IN_SET".to_owned()
            )]
        )
    );

    let created = create_set(&server, set("corp", &["https://a.example.com"])).await;
    assert!(created.revision > 0);
    assert_eq!(created.name, "originSets/corp");
    let again = client
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(set("corp", &[])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(&again).0, "SET_ALREADY_EXISTS");

    // Compare-and-set.
    let stale = v1::OriginSet {
        etag: "\"s-corp-999\"".into(),
        ..created.clone()
    };
    let conflict = update_set(&server, &stale, &["https://b.example.com"], &[])
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::Aborted);
    let updated = update_set(
        &server,
        &v1::OriginSet {
            etag: created.etag.trim_matches('"').into(),
            ..created.clone()
        },
        &["https://a.example.com", "https://b.example.com"],
        &[],
    )
    .await
    .unwrap();
    assert!(updated.revision > created.revision);
    // The mask kept the description.
    assert_eq!(updated.description, "the corp front-ends");

    // History, newest first, and a rollback that writes a new revision.
    let history = client
        .list_origin_set_revisions(v1::ListOriginSetRevisionsRequest {
            name: "originSets/corp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let revisions: Vec<i64> = history.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, [updated.revision, created.revision]);
    let rolled = client
        .rollback_origin_set(v1::RollbackOriginSetRequest {
            name: "originSets/corp".into(),
            revision: created.revision,
            reason: "back".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.origins, ["https://a.example.com"]);
    assert!(rolled.revision > updated.revision);

    let listed = client
        .list_origin_sets(v1::ListOriginSetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.origin_sets.len(), 1);

    let deleted = client
        .delete_origin_set(v1::DeleteOriginSetRequest {
            name: "originSets/corp".into(),
            reason: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.revision > rolled.revision);

    // Every write and refusal is in the chain, which verifies.
    let mut audit = server.audit().await;
    let events = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            method: "corsair.v1.OriginSetService/UpdateOriginSet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 2, "the conflict and the update");
    let update = events
        .iter()
        .find(|e| e.revision == updated.revision)
        .unwrap();
    assert_eq!(update.origin_set, "originSets/corp");
    assert_eq!(update.changed_fields, ["origins"]);
    assert_eq!(
        update.origin_set_after.as_ref().unwrap().origins,
        ["https://a.example.com", "https://b.example.com"]
    );
    let verified = audit
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{}", verified.error);
    server.stop().await;
}

async fn policies_reference_sets(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;

    let unknown = create_policy(
        &server,
        policy("shop", &["https://shop.example.com", "set:corp"]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        refusal(&unknown),
        (
            "INVALID_POLICY".to_owned(),
            vec![(
                "policy.allowed_origins[1]".to_owned(),
                "UNKNOWN_ORIGIN_SET".to_owned()
            )]
        )
    );

    // A set's own risks are acknowledged by its writer.
    let corp = sets(&server)
        .await
        .create_origin_set(v1::CreateOriginSetRequest {
            origin_set: Some(set("corp", &["https://checkout.example.com", "null"])),
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The set's risk reaches the policy that uses it.
    let risky = create_policy(
        &server,
        policy("shop", &["https://shop.example.com", "set:corp"]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        refusal(&risky),
        (
            "RISK_NOT_ACKNOWLEDGED".to_owned(),
            vec![(
                "policy.allowed_origins[1]".to_owned(),
                "NULL_ORIGIN".to_owned()
            )]
        )
    );
    let created = server
        .policies()
        .await
        .create_policy(v1::CreatePolicyRequest {
            policy: Some(policy("shop", &["https://shop.example.com", "set:corp"])),
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.allowed_origins,
        ["https://shop.example.com", "set:corp"]
    );

    let effective = server
        .policies()
        .await
        .get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            view: v1::PolicyView::Effective as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let origins: Vec<(String, String)> = effective
        .effective_origins
        .iter()
        .map(|o| (o.origin.clone(), o.origin_set.clone()))
        .collect();
    assert_eq!(
        origins,
        [
            ("https://shop.example.com".to_owned(), String::new()),
            (
                "https://checkout.example.com".to_owned(),
                "originSets/corp".to_owned()
            ),
            ("null".to_owned(), "originSets/corp".to_owned()),
        ]
    );
    assert_eq!(
        effective.effective_revision,
        created.revision.max(corp.revision)
    );

    let explained = server
        .policies()
        .await
        .explain_request(v1::ExplainRequestRequest {
            target: Some(v1::explain_request_request::Target::Name(
                "services/shop/policy".into(),
            )),
            request: Some(v1::ExplainedRequest {
                origin: "https://checkout.example.com".into(),
                method: "GET".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.decision, v1::Decision::Allowed as i32);
    assert!(
        explained.reason.contains("from set:corp"),
        "{}",
        explained.reason
    );
    server.stop().await;
}

async fn set_writes_are_checked_against_referrers(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let corp = create_set(&server, set("corp", &["https://checkout.example.com"])).await;
    for service in ["shop", "blog"] {
        create_policy(
            &server,
            policy(
                service,
                &[&format!("https://{service}.example.com"), "set:corp"],
            ),
        )
        .await
        .unwrap();
    }
    create_policy(&server, policy("other", &["https://other.example.com"]))
        .await
        .unwrap();

    // `null` would be a new risk for both referrers: refused, naming each.
    let refused = update_set(
        &server,
        &corp,
        &["https://checkout.example.com", "null"],
        &[],
    )
    .await
    .unwrap_err();
    let (reason, mut violations) = refusal(&refused);
    assert_eq!(reason, "RISK_NOT_ACKNOWLEDGED");
    violations.sort();
    let want: Vec<(String, String)> = [
        "origin_set.origins[1]",
        "services/blog/policy.allowed_origins[1]",
        "services/shop/policy.allowed_origins[1]",
    ]
    .iter()
    .map(|f| (f.to_string(), "NULL_ORIGIN".to_owned()))
    .collect();
    assert_eq!(violations, want);
    // Plain http beside the referrers' https origins is a new risk too.
    let insecure = update_set(&server, &corp, &["http://checkout.example.com"], &[])
        .await
        .unwrap_err();
    assert!(refusal(&insecure).1.contains(&(
        "services/shop/policy.allowed_origins[1]".to_owned(),
        "INSECURE_ORIGIN".to_owned()
    )));

    // Acknowledged, it goes through, and its audit event names the services it changed.
    let updated = update_set(
        &server,
        &corp,
        &["https://checkout.example.com", "https://pay.example.com"],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        updated.referrers,
        ["services/blog/policy", "services/shop/policy"]
    );
    let event = server
        .audit()
        .await
        .list_audit_events(v1::ListAuditEventsRequest {
            method: "corsair.v1.OriginSetService/UpdateOriginSet".into(),
            outcome: v1::Outcome::Ok as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .remove(0);
    assert_eq!(event.affected_services, ["blog", "shop"]);
    assert_eq!(event.revision, updated.revision);

    // A set in use cannot be deleted; the refusal lists who uses it.
    let in_use = sets(&server)
        .await
        .delete_origin_set(v1::DeleteOriginSetRequest {
            name: "originSets/corp".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    let details = in_use.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "SET_IN_USE");
    let subjects: Vec<String> = details
        .precondition_failure()
        .unwrap()
        .violations
        .iter()
        .map(|v| v.subject.clone())
        .collect();
    assert_eq!(subjects, ["services/blog/policy", "services/shop/policy"]);

    // Once no policy references it, it can go.
    for service in ["shop", "blog"] {
        server
            .policies()
            .await
            .delete_policy(v1::DeletePolicyRequest {
                name: format!("services/{service}/policy"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    sets(&server)
        .await
        .delete_origin_set(v1::DeleteOriginSetRequest {
            name: "originSets/corp".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    server.stop().await;
}

const FAST: Backoff = Backoff {
    initial: Duration::from_millis(20),
    multiplier: 1.6,
    max: Duration::from_millis(200),
};

/// A real sync client serving `services`, connected at `revision` or later.
async fn sidecar(
    server: &TestServer,
    id: &str,
    services: &[&str],
) -> (Arc<PolicySet>, tokio::sync::watch::Receiver<SyncState>) {
    let set = Arc::new(PolicySet::default());
    let client = SyncClient::new(
        tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .connect_lazy(),
        SyncConfig {
            sidecar_id: id.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            version: "test".into(),
            host: "localhost".into(),
            backoff: FAST,
        },
        set.clone(),
    );
    let state = client.state();
    tokio::spawn(async move {
        let _ = client.run(std::future::pending::<()>()).await;
    });
    (set, state)
}

async fn at(state: &mut tokio::sync::watch::Receiver<SyncState>, revision: i64) {
    let deadline = Deadline::new(format!("a sidecar at revision {revision}"));
    let reached =
        state.wait_for(|s| matches!(s, SyncState::Connected { revision: r } if *r >= revision));
    if tokio::time::timeout(deadline.remaining(), reached)
        .await
        .is_err()
    {
        deadline.expire(format_args!("{:?}", *state.borrow()));
    }
}

fn allows(set: &PolicySet, service: &str, origin: &str) -> bool {
    let policies = set.load();
    let Some(active) = policies.services.get(service) else {
        return false;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("origin", origin.parse().unwrap());
    active
        .compiled
        .decide(&corsair_policy::Request::new(&http::Method::GET, &headers))
        .allowed
}

async fn a_set_write_reaches_every_referrer(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let corp = create_set(&server, set("corp", &["https://checkout.example.com"])).await;
    let mut written = std::collections::HashMap::new();
    for service in ["shop", "blog"] {
        let revision = create_policy(
            &server,
            policy(
                service,
                &[&format!("https://{service}.example.com"), "set:corp"],
            ),
        )
        .await
        .unwrap()
        .revision;
        written.insert(service, revision);
    }
    let (both, mut both_state) = sidecar(&server, "sc-both", &["shop", "blog"]).await;
    let (shop, mut shop_state) = sidecar(&server, "sc-shop", &["shop"]).await;
    at(&mut both_state, written["blog"]).await;
    at(&mut shop_state, written["shop"]).await;
    assert!(!allows(&both, "blog", "https://pay.example.com"));

    let updated = update_set(
        &server,
        &corp,
        &["https://checkout.example.com", "https://pay.example.com"],
        &[],
    )
    .await
    .unwrap();
    at(&mut both_state, updated.revision).await;
    at(&mut shop_state, updated.revision).await;
    for (set, service) in [(&both, "shop"), (&both, "blog"), (&shop, "shop")] {
        assert!(allows(set, service, "https://pay.example.com"), "{service}");
        assert!(allows(
            set,
            service,
            &format!("https://{service}.example.com")
        ));
        assert_eq!(set.load().services[service].revision, updated.revision);
    }
    // Fleet status shows both converge at the set's revision.
    for id in ["sc-both", "sc-shop"] {
        let row = support::eventually(
            &format!("fleet status to show {id} synced at the set write"),
            || async {
                let row = server
                    .fleet()
                    .await
                    .get_sidecar(v1::GetSidecarRequest {
                        name: format!("sidecars/{id}"),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (row.last_acked_revision >= updated.revision).then_some(row)
            },
        )
        .await;
        assert_eq!(row.state, v1::SidecarState::Synced as i32);
    }
    // Both policies share one compiled set.
    let policies = both.load();
    let (_, a) = &policies.services["shop"].compiled.policy().sets()[0];
    let (_, b) = &policies.services["blog"].compiled.policy().sets()[0];
    assert!(Arc::ptr_eq(a, b));

    // A stream that says it holds the set gets the next write as a delta.
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::DiscoveryRequest {
        kind: Some(Kind::Hello(v1::Hello {
            sidecar_id: "raw".into(),
            services: vec!["shop".into()],
            known_revisions: [("shop".to_owned(), updated.revision)].into(),
            known_origin_sets: [("corp".to_owned(), updated.revision)].into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = DiscoveryServiceClient::new(server.channel().await)
        .stream_policies(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let third = update_set(
        &server,
        &updated,
        &[
            "https://checkout.example.com",
            "https://pay.example.com",
            "https://new.example.com",
        ],
        &[],
    )
    .await
    .unwrap();
    let push = within("the push of the set write", inbound.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(push.revision, third.revision);
    assert_eq!(push.upserts.len(), 1);
    assert_eq!(push.upserts[0].effective_revision, third.revision);
    let content = &push.origin_sets[0];
    assert_eq!(
        (
            content.base_revision,
            content.added.clone(),
            content.removed.clone()
        ),
        (
            updated.revision,
            vec!["https://new.example.com".to_owned()],
            vec![]
        )
    );
    drop(tx);
    server.stop().await;
}

on_both_backends!(
    lifecycle,
    policies_reference_sets,
    set_writes_are_checked_against_referrers,
    a_set_write_reaches_every_referrer,
);
