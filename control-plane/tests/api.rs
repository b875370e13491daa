//! The control plane over gRPC, against a real server on port 0, on SQLite and on
//! PostgreSQL: round trips, compare-and-set races, validation details, the audit log and its
//! chain, restarts and reflection.

mod support;

use std::collections::HashSet;

use corsair_proto::v1;
use support::{Backend, TestServer, fresh_db, within};
use tonic::Code;
use tonic_types::StatusExt;

fn policy(service: &str, origins: &[&str]) -> v1::Policy {
    v1::Policy {
        service: service.into(),
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        allowed_methods: vec!["PUT".into()],
        ..Default::default()
    }
}

fn create(p: v1::Policy) -> v1::CreatePolicyRequest {
    v1::CreatePolicyRequest {
        policy: Some(p),
        reason: "test".into(),
        ..Default::default()
    }
}

fn update(p: v1::Policy) -> v1::UpdatePolicyRequest {
    v1::UpdatePolicyRequest {
        policy: Some(p),
        reason: "test".into(),
        ..Default::default()
    }
}

async fn round_trips(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;

    let created = client
        .create_policy(create(policy("shop", &["HTTPS://App.Example.com:443"])))
        .await
        .unwrap()
        .into_inner();
    let p1 = created.clone();
    assert_eq!(p1.name, "services/shop/policy");
    assert_eq!(
        p1.allowed_origins,
        ["https://app.example.com"],
        "stored canonical"
    );
    assert_eq!(p1.revision, 1);
    assert_eq!(created.revision, 1);
    assert!(!p1.etag.is_empty());

    let got = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, p1);

    let dup = client
        .create_policy(create(policy("shop", &["https://x.com"])))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    let mut changed = p1.clone();
    changed.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://admin.example.com".into(),
    ];
    let p2 = client
        .update_policy(update(changed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.revision, 2);
    assert_ne!(p2.etag, p1.etag);

    // Field mask: only the mode changes.
    let masked = v1::UpdatePolicyRequest {
        policy: Some(v1::Policy {
            name: p2.name.clone(),
            etag: p2.etag.clone(),
            mode: v1::PolicyMode::Enforce as i32,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["mode".into()],
        }),
        ..Default::default()
    };
    let p3 = client.update_policy(masked).await.unwrap().into_inner();
    assert_eq!(p3.mode, v1::PolicyMode::Enforce as i32);
    assert_eq!(
        p3.allowed_origins, p2.allowed_origins,
        "unmasked fields kept"
    );

    // validate_only changes nothing.
    let mut dry = p3.clone();
    dry.allowed_origins = vec!["https://dry.example.com".into()];
    let resp = client
        .update_policy(v1::UpdatePolicyRequest {
            validate_only: true,
            ..update(dry)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.allowed_origins, ["https://dry.example.com"]);
    let still = client
        .get_policy(v1::GetPolicyRequest {
            name: p3.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.revision, 3);

    // History, newest first, then rollback to revision 1 as a new revision.
    let history = client
        .list_policy_revisions(v1::ListPolicyRevisionsRequest {
            name: p3.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let revisions: Vec<i64> = history.revisions.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, [3, 2, 1]);
    let rolled = client
        .rollback_policy(v1::RollbackPolicyRequest {
            name: p3.name.clone(),
            revision: 1,
            etag: p3.etag.clone(),
            reason: "back to the start".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.revision, 4);
    assert_eq!(rolled.allowed_origins, ["https://app.example.com"]);

    // Delete with a stale etag is refused; with the current one it succeeds.
    let stale = client
        .delete_policy(v1::DeletePolicyRequest {
            name: p3.name.clone(),
            etag: p3.etag.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let deleted = client
        .delete_policy(v1::DeletePolicyRequest {
            name: p3.name.clone(),
            etag: rolled.etag.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revision, 5);
    let gone = client
        .get_policy(v1::GetPolicyRequest {
            name: p3.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Rolling back to the deletion is refused; to a revision that set a policy recreates it.
    let refused = client
        .rollback_policy(v1::RollbackPolicyRequest {
            name: p3.name.clone(),
            revision: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let recreated = client
        .rollback_policy(v1::RollbackPolicyRequest {
            name: p3.name.clone(),
            revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recreated.revision, 6);

    // allow_missing creates.
    let made = client
        .update_policy(v1::UpdatePolicyRequest {
            allow_missing: true,
            ..update(policy("blog", &["https://blog.example.com"]))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.revision, 7);
    server.stop().await;
}

async fn etag_is_required_and_checked(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    let p = client
        .create_policy(create(policy("shop", &["https://a.com"])))
        .await
        .unwrap()
        .into_inner();

    let mut no_etag = p.clone();
    no_etag.etag.clear();
    let err = client.update_policy(update(no_etag)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "policy.etag"
    );

    let mut ok = p.clone();
    ok.allowed_methods = vec!["DELETE".into()];
    client.update_policy(update(ok)).await.unwrap();
    let err = client.update_policy(update(p.clone())).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains("revision 2"), "{}", err.message());

    let missing = client
        .update_policy(update(policy("nope", &["https://a.com"])))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

async fn validation_errors_carry_field_paths(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;

    let mut bad = policy("shop", &["https://ok.com", "https://bad.com/path", "*"]);
    bad.allow_credentials = true;
    let err = client.create_policy(create(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let violations = err.get_details_bad_request().unwrap().field_violations;
    let got: Vec<(&str, &str)> = violations
        .iter()
        .map(|v| (v.field.as_str(), v.reason.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("policy.allowed_origins[1]", "INVALID_ORIGIN"),
            ("policy.allowed_origins[2]", "WILDCARD_WITH_CREDENTIALS")
        ]
    );
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "INVALID_POLICY"
    );

    // A risk is refused the same way, with its code, until acknowledged.
    let risky = policy("shop", &["null"]);
    let err = client
        .create_policy(create(risky.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let info = err.get_details_error_info().unwrap();
    assert_eq!(info.reason, "RISK_NOT_ACKNOWLEDGED");
    assert_eq!(info.metadata["codes"], "NULL_ORIGIN");
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "policy.allowed_origins[0]"
    );
    let ok = client
        .create_policy(v1::CreatePolicyRequest {
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..create(risky)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.findings.len(), 1);
    assert_eq!(ok.findings[0].code, "NULL_ORIGIN");

    let bad_name = client
        .get_policy(v1::GetPolicyRequest {
            name: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    assert_eq!(
        bad_name.get_details_bad_request().unwrap().field_violations[0].field,
        "name"
    );
    server.stop().await;
}

/// 50 tasks each read the policy and try one compare-and-set update. On PostgreSQL they
/// are split across two control-plane servers (two connection pools) on one database.
async fn concurrent_writers_never_lose_an_update(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let second = match backend {
        Backend::Postgres => Some(TestServer::start(&db.url).await),
        Backend::Sqlite => None,
    };
    let mut client = server.policies().await;
    client
        .create_policy(create(policy("shop", &["https://a.com"])))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for i in 0..50 {
        let target = match &second {
            Some(second) if i % 2 == 1 => second,
            _ => &server,
        };
        let mut client = target.policies().await;
        tasks.push(tokio::spawn(async move {
            let current = client
                .get_policy(v1::GetPolicyRequest {
                    name: "services/shop/policy".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut next = current.clone();
            next.allowed_origins = vec![format!("https://writer{i}.example.com")];
            match client.update_policy(update(next)).await {
                Ok(r) => Some((r.into_inner().revision, i)),
                Err(e) => {
                    assert_eq!(e.code(), Code::Aborted, "{e:?}");
                    None
                }
            }
        }));
    }
    let mut successes = Vec::new();
    for t in tasks {
        if let Some(s) = t.await.unwrap() {
            successes.push(s);
        }
    }
    assert!(!successes.is_empty());
    let revisions: HashSet<i64> = successes.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        revisions.len(),
        successes.len(),
        "every success has its own revision"
    );
    let (last_revision, last_writer) = *successes.iter().max().unwrap();
    let final_policy = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(final_policy.revision, last_revision);
    assert_eq!(
        final_policy.allowed_origins,
        [format!("https://writer{last_writer}.example.com")]
    );

    // One event for the create and one for every attempt, chained without a fork.
    let mut audit = server.audit().await;
    let events = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 51);
    let conflicts = events
        .iter()
        .filter(|e| e.outcome == v1::Outcome::Conflict as i32)
        .count();
    assert_eq!(conflicts, 50 - successes.len());
    let verified = audit
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.verified_events, 51);
    if let Some(second) = second {
        second.stop().await;
    }
    server.stop().await;
}

async fn audit_filters_and_pages(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    for i in 0..7 {
        client
            .create_policy(create(policy(&format!("svc{i}"), &["https://a.com"])))
            .await
            .unwrap();
    }
    let mut req = tonic::Request::new(create(policy("svc3", &["https://a.com"])));
    req.metadata_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    assert_eq!(
        client.create_policy(req).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let mut audit = server.audit().await;
    // Newest first, across pages of 3.
    let mut sequences = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit
            .list_audit_events(v1::ListAuditEventsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 3);
        sequences.extend(page.events.iter().map(|e| e.sequence));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sequences, (1..=8).rev().collect::<Vec<u64>>());

    let svc3 = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            service: "svc3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(svc3.len(), 2);
    assert_eq!(svc3[0].outcome, v1::Outcome::AlreadyExists as i32);
    assert_eq!(svc3[0].request_id, "req-42");
    assert!(svc3[0].peer.starts_with("127.0.0.1:"), "{}", svc3[0].peer);
    assert_eq!(svc3[0].actor, "local");
    assert_eq!(svc3[0].method, "corsair.v1.PolicyService/CreatePolicy");
    assert_eq!(
        svc3[1].changed_fields,
        ["allowed_origins", "allowed_methods"]
    );
    assert!(svc3[1].after.is_some() && svc3[1].before.is_none());

    let refused = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            outcome: v1::Outcome::AlreadyExists as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(refused.len(), 1);

    // Time range: everything up to the 4th event's time (exclusive) holds events 1..=3 at most.
    let fourth = audit
        .get_audit_event(v1::GetAuditEventRequest {
            name: "auditEvents/4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let before_fourth = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            end_time: fourth.create_time,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(before_fourth.iter().all(|e| e.sequence < 4));
    let since_fourth = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            start_time: fourth.create_time,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(since_fourth.iter().all(|e| e.sequence >= 4) && since_fourth.len() >= 5);

    // A token is tied to its filter.
    let first = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let misuse = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1,
            page_token: first.next_page_token,
            service: "svc1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(misuse.code(), Code::InvalidArgument);
    let missing = audit
        .get_audit_event(v1::GetAuditEventRequest {
            name: "auditEvents/999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await;
}

async fn chain_verification_detects_tampering(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    for i in 0..5 {
        client
            .create_policy(create(policy(&format!("svc{i}"), &["https://a.com"])))
            .await
            .unwrap();
    }
    let mut audit = server.audit().await;
    let ok = audit
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(ok.ok && ok.verified_events == 5, "{ok:?}");
    server.stop().await;

    // Edit a row behind the control plane's back.
    let tamper = "UPDATE audit_events SET reason = 'nothing to see' WHERE sequence = 3";
    run_sql(&db.url, tamper).await;
    let server = TestServer::start(&db.url).await;
    let mut audit = server.audit().await;
    let bad = audit
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!bad.ok);
    assert_eq!(bad.first_bad_sequence, 3);
    assert_eq!(bad.verified_events, 2);
    // A range after the edited row still verifies.
    let tail = audit
        .verify_audit_chain(v1::VerifyAuditChainRequest {
            start_sequence: 4,
            end_sequence: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tail.ok, "{tail:?}");
    server.stop().await;

    // A row that cannot be read is named as the bad event, not taken for the storage being
    // unavailable: an outcome no version wrote, or (SQLite) text that is not UTF-8.
    run_sql(
        &db.url,
        "UPDATE audit_events SET outcome = 'BOGUS' WHERE sequence = 5",
    )
    .await;
    if backend == Backend::Sqlite {
        run_sql(
            &db.url,
            "UPDATE audit_events SET actor = CAST(x'ff' AS TEXT) WHERE sequence = 4",
        )
        .await;
    }
    let server = TestServer::start(&db.url).await;
    let unreadable = server
        .audit()
        .await
        .verify_audit_chain(v1::VerifyAuditChainRequest {
            start_sequence: 4,
            end_sequence: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unreadable.ok, "{unreadable:?}");
    let expected = if backend == Backend::Sqlite { 4 } else { 5 };
    assert_eq!(unreadable.first_bad_sequence, expected, "{unreadable:?}");
    assert!(!unreadable.error.is_empty());
    server.stop().await;

    // A deleted row is found too.
    run_sql(&db.url, "DELETE FROM audit_events WHERE sequence = 2").await;
    let server = TestServer::start(&db.url).await;
    let bad = server
        .audit()
        .await
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bad.first_bad_sequence, 2);
    server.stop().await;
}

async fn run_sql(url: &str, sql: &'static str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

async fn restart_keeps_everything(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let p = server
        .policies()
        .await
        .create_policy(create(policy("shop", &["https://a.com"])))
        .await
        .unwrap()
        .into_inner();
    server.stop().await;

    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    let got = client
        .get_policy(v1::GetPolicyRequest {
            name: p.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, p);
    // The revision counter and chain continue where they were.
    let mut next = got.clone();
    next.allowed_methods = vec!["DELETE".into()];
    assert_eq!(
        client
            .update_policy(update(next))
            .await
            .unwrap()
            .into_inner()
            .revision,
        2
    );
    let verified = server
        .audit()
        .await
        .verify_audit_chain(v1::VerifyAuditChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok && verified.verified_events == 2);
    server.stop().await;
}

async fn watch_tails_the_log_live(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    client
        .create_policy(create(policy("one", &["https://a.com"])))
        .await
        .unwrap();
    client
        .create_policy(create(policy("two", &["https://a.com"])))
        .await
        .unwrap();

    let mut stream = server
        .audit()
        .await
        .watch_audit_events(v1::WatchAuditEventsRequest {
            after_sequence: 0,
            service: "two".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("the next message on the stream stream", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.sequence, first.service.as_str()), (2, "two"));

    client
        .create_policy(create(policy("three", &["https://a.com"])))
        .await
        .unwrap();
    let mut p = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/two/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    p.allowed_methods = vec!["PATCH".into()];
    client.update_policy(update(p)).await.unwrap();
    let live = within("the next message on the stream stream", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((live.sequence, live.service.as_str()), (4, "two"));
    server.stop().await;
}

async fn explain_answers_like_a_sidecar(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    let mut p = policy("shop", &["https://app.example.com"]);
    p.allowed_headers = vec!["x-custom".into()];
    p.max_age_seconds = Some(60);
    client.create_policy(create(p)).await.unwrap();

    let explain = |origin: &str, headers: &[&str], credentials: bool| v1::ExplainRequestRequest {
        target: Some(v1::explain_request_request::Target::Name(
            "services/shop/policy".into(),
        )),
        request: Some(v1::ExplainedRequest {
            origin: origin.into(),
            method: "PUT".into(),
            request_headers: headers.iter().map(|s| s.to_string()).collect(),
            preflight: true,
            credentials,
            ..Default::default()
        }),
    };
    let allowed = client
        .explain_request(explain("https://app.example.com", &["X-Custom"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision, v1::Decision::Allowed as i32);
    assert_eq!(allowed.status, 204);
    assert!(!allowed.forwarded);
    assert_eq!(allowed.revision, 1);
    let headers: Vec<(String, String)> = allowed
        .headers
        .iter()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    assert!(headers.contains(&(
        "access-control-allow-origin".into(),
        "https://app.example.com".into()
    )));
    assert!(headers.contains(&("access-control-allow-headers".into(), "x-custom".into())));
    assert!(headers.contains(&("access-control-max-age".into(), "60".into())));
    assert!(
        allowed.reason.contains("allowed_origins[0]"),
        "{}",
        allowed.reason
    );

    let denied = client
        .explain_request(explain("https://app.example.com", &["x-evil"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.decision, v1::Decision::Denied as i32);
    assert_eq!(
        denied.reason,
        "requested header x-evil is not in allowed_headers"
    );

    let credentialed = client
        .explain_request(explain("https://app.example.com", &[], true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(credentialed.decision, v1::Decision::Denied as i32);
    assert!(
        credentialed.reason.contains("credentials"),
        "{}",
        credentialed.reason
    );

    // An inline policy is validated, not stored.
    let inline = v1::ExplainRequestRequest {
        target: Some(v1::explain_request_request::Target::Policy(policy(
            "",
            &["https://bad.com/"],
        ))),
        request: Some(v1::ExplainedRequest {
            origin: "https://bad.com".into(),
            ..Default::default()
        }),
    };
    let err = client.explain_request(inline).await.unwrap_err();
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "policy.allowed_origins[0]"
    );
    server.stop().await;
}

fn list(values: &[&str]) -> Option<v1::StringList> {
    Some(v1::StringList {
        values: values.iter().map(|s| s.to_string()).collect(),
    })
}

/// `/public/` open to any origin, `/api/` to the admin origin with credentials, `/internal/`
/// to none.
fn routed(service: &str) -> v1::Policy {
    v1::Policy {
        routes: vec![
            v1::Route {
                path: "/public/".into(),
                allowed_origins: list(&["*"]),
                ..Default::default()
            },
            v1::Route {
                path: "/api/".into(),
                allowed_origins: list(&["HTTPS://Admin.Example.com"]),
                allow_credentials: Some(true),
                mode: Some(v1::PolicyMode::Enforce as i32),
                ..Default::default()
            },
            v1::Route {
                path: "/internal/".into(),
                allowed_origins: list(&[]),
                ..Default::default()
            },
        ],
        ..policy(service, &["https://app.example.com"])
    }
}

fn violations(err: &tonic::Status) -> Vec<(String, String)> {
    err.get_details_bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| (v.field.clone(), v.reason.clone()))
        .collect()
}

async fn routes_are_stored_updated_and_explained(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;

    // Stored canonical, an empty list kept apart from an unset one, with the findings of the
    // route's rules under its field path.
    let created = client
        .create_policy(create(routed("shop")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.routes[1].allowed_origins,
        list(&["https://admin.example.com"])
    );
    assert_eq!(created.routes[1].allowed_methods, None);
    assert_eq!(created.routes[2].allowed_origins, list(&[]));
    assert_eq!(created.routes[0].allow_credentials, None);
    assert_eq!(created.routes[1].mode, Some(v1::PolicyMode::Enforce as i32));
    let findings: Vec<(&str, &str)> = created
        .findings
        .iter()
        .map(|f| (f.field.as_str(), f.code.as_str()))
        .collect();
    assert_eq!(findings, [("routes[2].allowed_origins", "NO_ORIGINS")]);
    let got = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.routes, created.routes);

    // An update limited to `routes` replaces the whole list and nothing else; one limited to
    // another field keeps the routes.
    let mut change = policy("shop", &["https://other.example.com"]);
    change.etag = got.etag.clone();
    change.routes = vec![v1::Route {
        path: "/api/health".into(),
        allowed_origins: list(&["*"]),
        ..Default::default()
    }];
    let updated = client
        .update_policy(v1::UpdatePolicyRequest {
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["routes".into()],
            }),
            ..update(change.clone())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.allowed_origins, ["https://app.example.com"]);
    assert_eq!(updated.routes.len(), 1);
    assert_eq!(updated.routes[0].path, "/api/health");
    change.etag = updated.etag.clone();
    let updated = client
        .update_policy(v1::UpdatePolicyRequest {
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["allowed_origins".into()],
            }),
            ..update(change)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.allowed_origins, ["https://other.example.com"]);
    assert_eq!(updated.routes[0].path, "/api/health");
    let mut audit = server.audit().await;
    let events = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            service: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let changed: Vec<Vec<String>> = events.iter().map(|e| e.changed_fields.clone()).collect();
    assert_eq!(changed[0], ["allowed_origins"]);
    assert_eq!(changed[1], ["routes"]);
    assert_eq!(events[1].after.as_ref().unwrap().routes.len(), 1);

    // Refusals name the route's field.
    let mut bad = routed("web");
    bad.routes[0].allow_credentials = Some(true);
    bad.routes[2].path = "/internal/../admin/".into();
    let err = client.create_policy(create(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&err),
        [
            (
                "policy.routes[0].allowed_origins[0]".into(),
                "WILDCARD_WITH_CREDENTIALS".into()
            ),
            ("policy.routes[2].path".into(), "INVALID_ROUTE_PATH".into()),
        ]
    );
    let mut bad = routed("web");
    bad.routes[1].path = "/public/".into();
    let err = client.create_policy(create(bad)).await.unwrap_err();
    assert_eq!(
        violations(&err),
        [("policy.routes[1].path".into(), "DUPLICATE_ROUTE".into())]
    );
    let mut bad = routed("web");
    bad.routes[1].mode = Some(9);
    let err = client.create_policy(create(bad)).await.unwrap_err();
    assert_eq!(violations(&err)[0].0, "policy.routes[1].mode");
    let err = client
        .update_policy(v1::UpdatePolicyRequest {
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["routes[0]".into()],
            }),
            ..update(routed("shop"))
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "update_mask");

    // Explain picks the route by the path and names it.
    client.create_policy(create(routed("web"))).await.unwrap();
    let explain = |path: &str, origin: &str, credentials: bool| v1::ExplainRequestRequest {
        target: Some(v1::explain_request_request::Target::Name(
            "services/web/policy".into(),
        )),
        request: Some(v1::ExplainedRequest {
            origin: origin.into(),
            method: "GET".into(),
            credentials,
            path: path.into(),
            ..Default::default()
        }),
    };
    let mut ask = async |path: &str, origin: &str, credentials: bool| {
        client
            .explain_request(explain(path, origin, credentials))
            .await
            .unwrap()
            .into_inner()
    };
    let public = ask("/public/logo.png", "https://evil.example", false).await;
    assert_eq!(public.decision, v1::Decision::Allowed as i32);
    assert_eq!(public.route, "/public/");
    assert!(public.reason.contains("routes[0]"), "{}", public.reason);
    // Credentials are the route's to allow: the policy's own rules do not.
    let api = ask("/api/orders?page=2", "https://admin.example.com", true).await;
    assert_eq!(api.decision, v1::Decision::Allowed as i32, "{}", api.reason);
    assert_eq!(api.route, "/api/");
    let own = ask("/orders", "https://app.example.com", true).await;
    assert_eq!(own.decision, v1::Decision::Denied as i32);
    assert_eq!(own.route, "");
    let enforced = ask("/api/orders", "https://app.example.com", false).await;
    assert_eq!(
        (enforced.decision, enforced.status),
        (v1::Decision::Denied as i32, 403)
    );
    let sneaky = ask(
        "/public/..%2Fapi/orders",
        "https://admin.example.com",
        false,
    )
    .await;
    assert_eq!(sneaky.decision, v1::Decision::Denied as i32);
    assert_eq!(sneaky.route, "");
    assert!(sneaky.reason.contains("/api/orders"), "{}", sneaky.reason);
    let no_path = ask("", "https://app.example.com", false).await;
    assert_eq!(
        (no_path.decision, no_path.route.as_str()),
        (v1::Decision::Allowed as i32, "")
    );
    server.stop().await;
}

/// The `google.rpc.ErrorInfo` of a status: its reason and metadata, in Corsair's domain.
fn error_info(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "corsair.dev");
    assert_ne!(
        info.reason,
        format!("{:?}", status.code()),
        "the reason is not the code again"
    );
    (info.reason, info.metadata)
}

/// Asserts `status` is `code` with ErrorInfo `reason`; returns its metadata.
fn refused(
    status: &tonic::Status,
    code: Code,
    reason: &str,
) -> std::collections::HashMap<String, String> {
    assert_eq!(status.code(), code, "{status:?}");
    let (got, metadata) = error_info(status);
    assert_eq!(got, reason, "{status:?}");
    metadata
}

/// What a stock gRPC client sees: resource names, writes that return the resource with its
/// findings, etags with or without quotes, rich errors with domain reasons on every failure,
/// and malformed names told apart from absent resources.
async fn resources_names_and_rich_errors(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    let mut audit = server.audit().await;

    // A write returns the policy, with the findings of the write on it.
    let created = client
        .create_policy(v1::CreatePolicyRequest {
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..create(policy("shop", &["https://a.example.com", "null"]))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "services/shop/policy");
    assert_eq!(created.revision, 1);
    assert!(
        created.findings.iter().any(|f| f.code == "NULL_ORIGIN"),
        "{:?}",
        created.findings
    );
    let got = client
        .get_policy(v1::GetPolicyRequest {
            name: created.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.findings, created.findings,
        "a read reports the same findings"
    );

    // Etags: quoted as returned, accepted without the quotes.
    assert!(created.etag.starts_with('"') && created.etag.ends_with('"'));
    let mut unquoted = created.clone();
    unquoted.etag = created.etag.trim_matches('"').to_owned();
    unquoted.allowed_methods = vec!["DELETE".into()];
    let updated = client
        .update_policy(v1::UpdatePolicyRequest {
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..update(unquoted)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.revision, 2);
    // A stale etag: ABORTED, with the current etag to retry with.
    let stale = client
        .update_policy(update(created.clone()))
        .await
        .unwrap_err();
    let metadata = refused(&stale, Code::Aborted, "ETAG_MISMATCH");
    assert_eq!(metadata["current_etag"], updated.etag);
    assert_eq!(metadata["current_revision"], "2");

    // A rollback to what is already in force writes nothing.
    let head = server.store.head().await.unwrap();
    let same = client
        .rollback_policy(v1::RollbackPolicyRequest {
            name: created.name.clone(),
            revision: 2,
            acknowledged_risks: vec!["NULL_ORIGIN".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.revision, 2, "no new revision");
    assert_eq!(same.etag, updated.etag);
    assert_eq!(
        server.store.head().await.unwrap(),
        head,
        "no revision, no audit event"
    );

    // NOT_FOUND names the resource; a malformed name is INVALID_ARGUMENT, on every method.
    let absent = client
        .get_policy(v1::GetPolicyRequest {
            name: "services/nobody/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&absent, Code::NotFound, "POLICY_NOT_FOUND");
    let info = absent.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(info.resource_name, "services/nobody/policy");
    assert_eq!(info.resource_type, "type.googleapis.com/corsair.v1.Policy");
    let history = client
        .list_policy_revisions(v1::ListPolicyRevisionsRequest {
            name: "services/nobody/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&history, Code::NotFound, "POLICY_NOT_FOUND");
    let no_revision = client
        .rollback_policy(v1::RollbackPolicyRequest {
            name: created.name.clone(),
            revision: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&no_revision, Code::NotFound, "REVISION_NOT_FOUND");
    let malformed = [
        client
            .get_policy(v1::GetPolicyRequest {
                name: "shop".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        client
            .delete_policy(v1::DeletePolicyRequest {
                name: "services/shop".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        client
            .list_policy_revisions(v1::ListPolicyRevisionsRequest {
                name: "policies/shop".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        audit
            .get_audit_event(v1::GetAuditEventRequest { name: "1".into() })
            .await
            .unwrap_err(),
        server
            .fleet()
            .await
            .get_sidecar(v1::GetSidecarRequest {
                name: "sidecar-1".into(),
            })
            .await
            .unwrap_err(),
    ];
    for status in &malformed {
        refused(status, Code::InvalidArgument, "INVALID_NAME");
        let violations = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(violations.field_violations[0].field, "name");
    }
    let no_sidecar = server
        .fleet()
        .await
        .get_sidecar(v1::GetSidecarRequest {
            name: "sidecars/nobody".into(),
        })
        .await
        .unwrap_err();
    refused(&no_sidecar, Code::NotFound, "SIDECAR_NOT_FOUND");
    let no_event = audit
        .get_audit_event(v1::GetAuditEventRequest {
            name: "auditEvents/999".into(),
        })
        .await
        .unwrap_err();
    refused(&no_event, Code::NotFound, "AUDIT_EVENT_NOT_FOUND");
    assert_eq!(
        no_event.get_details_resource_info().unwrap().resource_name,
        "auditEvents/999"
    );

    // Audit events are named, and the first one's prev_hash is what the proto says.
    let first = audit
        .get_audit_event(v1::GetAuditEventRequest {
            name: "auditEvents/1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.name, "auditEvents/1");
    assert_eq!(first.prev_hash, vec![0u8; 32]);

    // The method filter takes a method's name or its full name, and refuses others.
    let by = |method: &str| v1::ListAuditEventsRequest {
        method: method.into(),
        ..Default::default()
    };
    let short = audit
        .list_audit_events(by("UpdatePolicy"))
        .await
        .unwrap()
        .into_inner();
    let full = audit
        .list_audit_events(by("/corsair.v1.PolicyService/UpdatePolicy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(short.events.len(), 2, "the update and the stale one");
    assert_eq!(short, full);
    let unknown = audit
        .list_audit_events(by("UpdatePolicies"))
        .await
        .unwrap_err();
    refused(&unknown, Code::InvalidArgument, "INVALID_METHOD");
    assert!(
        unknown
            .message()
            .contains("corsair.v1.PolicyService/UpdatePolicy"),
        "lists the valid methods: {}",
        unknown.message()
    );
    server.stop().await;
}

/// Page tokens are opaque, bound to the request's filters, and a forged or tampered one is
/// refused rather than read: it never widens a query.
async fn page_tokens_are_opaque_and_bound(backend: Backend) {
    let Some(db) = fresh_db(backend).await else {
        return;
    };
    let server = TestServer::start(&db.url).await;
    let mut client = server.policies().await;
    for service in ["shop-a", "shop-b", "shop-c", "blog"] {
        client
            .create_policy(create(policy(service, &["https://a.example.com"])))
            .await
            .unwrap();
    }
    let list = |prefix: &str, token: &str| v1::ListPoliciesRequest {
        page_size: 1,
        page_token: token.into(),
        service_prefix: prefix.into(),
    };
    let first = client
        .list_policies(list("shop-", ""))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    assert!(!token.contains("shop"), "opaque: {token}");
    let second = client
        .list_policies(list("shop-", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.policies[0].service, "shop-b");

    // Reused with another filter.
    let other = client.list_policies(list("", &token)).await.unwrap_err();
    refused(&other, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    assert!(
        other.message().contains("other filters"),
        "{}",
        other.message()
    );
    // Tampered: any change to any character.
    let mut chars: Vec<char> = token.chars().collect();
    for i in 0..chars.len() {
        let original = chars[i];
        chars[i] = if original == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.iter().collect();
        let err = client
            .list_policies(list("shop-", &tampered))
            .await
            .unwrap_err();
        refused(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
        chars[i] = original;
    }
    // Forged in the readable format tokens once had: never read, never a wider query.
    let forged = hex::encode("policies\0\0");
    let err = client.list_policies(list("", &forged)).await.unwrap_err();
    refused(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");

    // The audit log's tokens are bound to every filter, times included.
    let mut audit = server.audit().await;
    let page = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1,
            method: "CreatePolicy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let widened = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&widened, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let later = audit
        .list_audit_events(v1::ListAuditEventsRequest {
            page_size: 1,
            page_token: page.next_page_token,
            method: "CreatePolicy".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&later, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    server.stop().await;
}

on_both_backends!(
    resources_names_and_rich_errors,
    page_tokens_are_opaque_and_bound,
    round_trips,
    etag_is_required_and_checked,
    validation_errors_carry_field_paths,
    concurrent_writers_never_lose_an_update,
    audit_filters_and_pages,
    chain_verification_detects_tampering,
    restart_keeps_everything,
    watch_tails_the_log_live,
    explain_answers_like_a_sidecar,
    routes_are_stored_updated_and_explained,
);

#[tokio::test]
async fn reflection_and_health_list_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let db = fresh_db(Backend::Sqlite).await.unwrap();
    let server = TestServer::start(&db.url).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        within("the next message on the stream stream", stream.message())
            .await
            .unwrap()
            .unwrap()
            .message_response
    else {
        panic!("expected a service list");
    };
    let names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "corsair.v1.PolicyService",
        "corsair.v1.AuditService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "corsair.v1.PolicyService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let db = fresh_db(Backend::Sqlite).await.unwrap();
    let store = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    let config = corsair_control_plane::server::Config {
        max_message_bytes: 64 * 1024,
        ..Default::default()
    };
    let server = TestServer::with_store(store, config).await;
    let origins: Vec<String> = (0..5000)
        .map(|i| format!("https://host{i}.example.com"))
        .collect();
    let big = v1::Policy {
        service: "big".into(),
        allowed_origins: origins,
        ..Default::default()
    };
    let err = server
        .policies()
        .await
        .create_policy(create(big))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let head = server.store.head().await.unwrap();
    assert_eq!(head.last_sequence, 0, "nothing stored");
    server.stop().await;
}
