//! Authentication and roles, on both backends: every RPC against every kind of credential,
//! sidecar scopes, refusals in the audit log, and revocation closing an open stream.

mod support;

use std::sync::Arc;

use corsair_control_plane::auth::{AuthMode, Role, WriteRate, rule};
use corsair_control_plane::server::Config;
use corsair_control_plane::service::token::{bootstrap, new_record};
use corsair_control_plane::store::{AuditFilter, Outcome, Plan, Store, WriteContext, now_micros};
use corsair_proto::v1;
use prost::Message;
use support::{Backend, TestServer, bearer, fresh_db, within};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const ADMIN: &str = "corsair_auth-test-admin-0123456789abcdef0123456789";

/// Every method the server exposes: the `corsair.v1` services, health and reflection.
fn every_method() -> Vec<(String, bool, bool)> {
    let mut methods = Vec::new();
    for set in [
        corsair_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let set = prost_types::FileDescriptorSet::decode(set).unwrap();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push((
                        format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                        method.client_streaming(),
                        method.server_streaming(),
                    ));
                }
            }
        }
    }
    methods.sort();
    methods.dedup();
    methods
}

/// Calls `path` with one empty message (valid for every request type) as a stream, which
/// every kind of method accepts on the wire; the status of a refusal, `None` when it was
/// let through (it may still fail later for other reasons).
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> Option<Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let body = tokio_stream::iter([()]);
    let mut request = tonic::Request::new(body);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path: http::uri::PathAndQuery = path.parse().unwrap();
    grpc.streaming(request, path, codec).await.err()
}

/// The `google.rpc.ErrorInfo` of a status: its reason and metadata.
fn error_info(status: &Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "corsair.dev");
    (info.reason, info.metadata)
}

/// Stores a token directly (as the token service would), for states the API cannot make
/// quickly, such as one that has already expired.
async fn put_token(
    store: &Arc<dyn Store>,
    name: &str,
    secret: &str,
    role: Role,
    services: &[&str],
    expires_at: Option<i64>,
) -> String {
    let services: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
    let record = new_record(secret, name, role, &services, "test", expires_at);
    let id = record.id.clone();
    let written = store
        .write(
            WriteContext {
                actor: "test".into(),
                method: "corsair.v1.TokenService/CreateToken".into(),
                service: String::new(),
                reason: String::new(),
                request_id: "test".into(),
                peer: String::new(),
            },
            Box::new(move |_, _| Plan::PutToken {
                token: record,
                only_if_first: false,
            }),
        )
        .await
        .unwrap();
    written.result.unwrap();
    id
}

async fn start(backend: Backend) -> Option<(TestServer, support::TestDb)> {
    start_with(backend, None).await
}

async fn start_with(
    backend: Backend,
    write_rate: Option<WriteRate>,
) -> Option<(TestServer, support::TestDb)> {
    let db = fresh_db(backend).await?;
    let store = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    bootstrap(&store, Some(ADMIN)).await.unwrap();
    let config = Config {
        auth: AuthMode::Tokens,
        write_rate,
        ..Config::default()
    };
    Some((TestServer::with_store(store, config).await, db))
}

fn policy(service: &str) -> v1::CreatePolicyRequest {
    v1::CreatePolicyRequest {
        policy: Some(v1::Policy {
            service: service.into(),
            allowed_origins: vec!["https://a.example.com".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn writes_are_rate_limited_per_identity(backend: Backend) {
    // A bucket of two that refills once every few hours: the third write is refused.
    let rate = WriteRate {
        per_sec: 0.0001,
        burst: 2,
    };
    let Some((server, _db)) = start_with(backend, Some(rate)).await else {
        return;
    };
    let editor = "corsair_rate-editor-0123456789abcdef0123456789ab";
    put_token(&server.store, "ci", editor, Role::Editor, &[], None).await;
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(server.channel().await);
    for service in ["a", "b"] {
        policies
            .create_policy(bearer(editor, policy(service)))
            .await
            .unwrap();
    }
    let refused = policies
        .create_policy(bearer(editor, policy("c")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("ci is writing faster"),
        "{refused:?}"
    );
    // Reads are not limited, and another identity has its own bucket.
    policies
        .list_policies(bearer(editor, v1::ListPoliciesRequest::default()))
        .await
        .unwrap();
    policies
        .create_policy(bearer(ADMIN, policy("c")))
        .await
        .unwrap();
    server.stop().await;
}

async fn revoking_an_auditor_ends_its_audit_tail(backend: Backend) {
    let Some((server, _db)) = start(backend).await else {
        return;
    };
    let auditor = "corsair_tail-auditor-0123456789abcdef0123456789";
    let id = put_token(&server.store, "auditor", auditor, Role::Auditor, &[], None).await;
    let channel = server.channel().await;
    let mut audit = v1::audit_service_client::AuditServiceClient::new(channel.clone());
    let mut tail = audit
        .watch_audit_events(bearer(auditor, v1::WatchAuditEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    // The first start's token and the auditor's own.
    assert_eq!(
        within("the next message on the tail stream", tail.message())
            .await
            .unwrap()
            .unwrap()
            .sequence,
        1
    );
    assert_eq!(
        within("the next message on the tail stream", tail.message())
            .await
            .unwrap()
            .unwrap()
            .sequence,
        2
    );
    v1::token_service_client::TokenServiceClient::new(channel)
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: format!("tokens/{id}"),
                reason: String::new(),
            },
        ))
        .await
        .unwrap();
    let ended = within("the next message on the tail stream", tail.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    server.stop().await;
}

#[test]
fn every_method_has_an_access_rule() {
    let methods = every_method();
    assert!(methods.len() > 20, "{methods:?}");
    for (path, _, _) in methods {
        assert!(rule(&path).is_some(), "{path} has no access rule");
    }
    assert_eq!(rule("/corsair.v1.PolicyService/NoSuchMethod"), None);
}

async fn every_rpc_against_every_credential(backend: Backend) {
    let Some((server, _db)) = start(backend).await else {
        return;
    };
    let store = server.store.clone();
    let viewer = "corsair_viewer-token-0123456789abcdef0123456789";
    let editor = "corsair_editor-token-0123456789abcdef0123456789";
    let auditor = "corsair_auditor-token-0123456789abcdef012345678";
    let sidecar = "corsair_sidecar-token-0123456789abcdef012345678";
    let expired = "corsair_expired-token-0123456789abcdef012345678";
    let revoked = "corsair_revoked-token-0123456789abcdef012345678";
    put_token(&store, "viewer", viewer, Role::Viewer, &[], None).await;
    put_token(&store, "editor", editor, Role::Editor, &[], None).await;
    put_token(&store, "auditor", auditor, Role::Auditor, &[], None).await;
    put_token(&store, "sidecar", sidecar, Role::Sidecar, &["shop"], None).await;
    put_token(
        &store,
        "expired",
        expired,
        Role::Admin,
        &[],
        Some(now_micros() - 1),
    )
    .await;
    let revoked_id = put_token(&store, "revoked", revoked, Role::Admin, &[], None).await;
    let channel = server.channel().await;
    let mut tokens = v1::token_service_client::TokenServiceClient::new(channel.clone());
    tokens
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: format!("tokens/{revoked_id}"),
                reason: "test".into(),
            },
        ))
        .await
        .unwrap();

    let roles = [
        (ADMIN, Role::Admin),
        (viewer, Role::Viewer),
        (editor, Role::Editor),
        (auditor, Role::Auditor),
        (sidecar, Role::Sidecar),
    ];
    for (path, _, _) in every_method() {
        let access = rule(&path).unwrap();
        let public = access == corsair_control_plane::auth::Access::Public;
        let anonymous = [
            (None, "CREDENTIAL_MISSING"),
            (Some("corsair_not-a-real-token"), "TOKEN_INVALID"),
            (Some(expired), "TOKEN_EXPIRED"),
            (Some(revoked), "TOKEN_REVOKED"),
        ];
        for (token, reason) in anonymous {
            let refusal = call(&channel, &path, token).await;
            let code = refusal.as_ref().map_or(Code::Ok, Status::code);
            if public {
                assert_ne!(code, Code::Unauthenticated, "{path} {token:?}");
            } else {
                assert_eq!(code, Code::Unauthenticated, "{path} with {token:?}");
                let status = refusal.expect("refused");
                assert_eq!(error_info(&status).0, reason, "{path} with {token:?}");
            }
        }
        for (token, role) in roles {
            let refusal = call(&channel, &path, Some(token)).await;
            let code = refusal.as_ref().map_or(Code::Ok, Status::code);
            if role.allows(access) {
                assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{path} as {role:?}: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{path} as {role:?}");
                let (reason, metadata) = error_info(&refusal.expect("refused"));
                assert_eq!(reason, "ROLE_REQUIRED", "{path} as {role:?}");
                assert_eq!(
                    metadata["required_roles"],
                    access.roles().join(","),
                    "{path} as {role:?}"
                );
            }
        }
    }

    // Refusals are audited with the principal, never the credential.
    let denied = store
        .list_audit(
            &AuditFilter {
                outcome: Some(Outcome::Denied),
                ..AuditFilter::default()
            },
            None,
            1000,
        )
        .await
        .unwrap();
    assert!(denied.iter().any(|e| e.actor == "anonymous"));
    assert!(
        denied
            .iter()
            .any(|e| e.actor == "viewer" && e.method == "corsair.v1.PolicyService/CreatePolicy")
    );
    let log = format!(
        "{:?}{:?}",
        store
            .list_audit(&AuditFilter::default(), None, 10_000)
            .await
            .unwrap(),
        store.list_tokens().await.unwrap()
    );
    for secret in [ADMIN, viewer, editor, auditor, sidecar, expired, revoked] {
        assert!(
            !log.contains(secret),
            "the audit log or token list shows a token"
        );
    }
    server.stop().await;
}

async fn a_sidecar_streams_only_its_services_and_revocation_ends_its_stream(backend: Backend) {
    let Some((server, _db)) = start(backend).await else {
        return;
    };
    let channel = server.channel().await;
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(channel.clone());
    for service in ["shop", "bank"] {
        policies
            .create_policy(bearer(
                ADMIN,
                v1::CreatePolicyRequest {
                    policy: Some(v1::Policy {
                        service: service.into(),
                        allowed_origins: vec!["https://a.example.com".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }
    let mut tokens = v1::token_service_client::TokenServiceClient::new(channel.clone());
    let created = tokens
        .create_token(bearer(
            ADMIN,
            v1::CreateTokenRequest {
                display_name: "shop-sidecar".into(),
                role: "sidecar".into(),
                services: vec!["shop".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret.clone();
    assert!(!format!("{:?}", created.token).contains(&secret));

    let hello = |services: &[&str]| v1::DiscoveryRequest {
        kind: Some(v1::discovery_request::Kind::Hello(v1::Hello {
            sidecar_id: "s1".into(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })),
    };
    let mut discovery = v1::discovery_service_client::DiscoveryServiceClient::new(channel.clone());

    // Another service's policies, or every service's: refused and audited.
    for asked in [&["bank"][..], &["shop", "bank"], &[]] {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(hello(asked)).await.unwrap();
        let mut stream = discovery
            .stream_policies(bearer(
                &secret,
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .await
            .unwrap()
            .into_inner();
        let refused = within("the next message on the stream stream", stream.message())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{asked:?}");
    }
    let denied = server
        .store
        .list_audit(
            &AuditFilter {
                actor: "shop-sidecar".into(),
                outcome: Some(Outcome::Denied),
                ..AuditFilter::default()
            },
            None,
            100,
        )
        .await
        .unwrap();
    assert_eq!(denied.len(), 3);

    // Its own service: served. Then revoked: the open stream ends.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello(&["shop"])).await.unwrap();
    let mut stream = discovery
        .stream_policies(bearer(
            &secret,
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    let first = within("the next message on the stream stream", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.upserts.len(), 1);
    assert_eq!(first.upserts[0].service, "shop");

    // A sidecar of another service cannot take over this one's fleet row.
    let bank = tokens
        .create_token(bearer(
            ADMIN,
            v1::CreateTokenRequest {
                display_name: "bank-sidecar".into(),
                role: "sidecar".into(),
                services: vec!["bank".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let (bank_tx, bank_rx) = tokio::sync::mpsc::channel(1);
    bank_tx.send(hello(&["bank"])).await.unwrap();
    let taken = discovery
        .stream_policies(bearer(
            &bank,
            tokio_stream::wrappers::ReceiverStream::new(bank_rx),
        ))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::PermissionDenied, "{taken:?}");
    assert!(
        taken.message().contains("held by a live sidecar"),
        "{taken:?}"
    );
    tokens
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: created.token.unwrap().name,
                reason: "compromised".into(),
            },
        ))
        .await
        .unwrap();
    let ended = within("the next message on the stream stream", stream.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    drop(tx);
    server.stop().await;
}

async fn tokens_are_listed_without_secrets_and_bad_requests_are_refused(backend: Backend) {
    let Some((server, _db)) = start(backend).await else {
        return;
    };
    let mut tokens = v1::token_service_client::TokenServiceClient::new(server.channel().await);
    for (request, field) in [
        (
            v1::CreateTokenRequest {
                display_name: "x".into(),
                role: "root".into(),
                ..Default::default()
            },
            "role",
        ),
        (
            v1::CreateTokenRequest {
                display_name: "x".into(),
                role: "sidecar".into(),
                ..Default::default()
            },
            "services",
        ),
        (
            v1::CreateTokenRequest {
                display_name: "x".into(),
                role: "viewer".into(),
                services: vec!["shop".into()],
                ..Default::default()
            },
            "services",
        ),
        (
            v1::CreateTokenRequest {
                role: "viewer".into(),
                ..Default::default()
            },
            "name",
        ),
        (
            v1::CreateTokenRequest {
                display_name: "two words".into(),
                role: "viewer".into(),
                ..Default::default()
            },
            "name",
        ),
        (
            v1::CreateTokenRequest {
                display_name: "bootstrap-admin".into(),
                role: "viewer".into(),
                ..Default::default()
            },
            "reserved",
        ),
    ] {
        let err = tokens
            .create_token(bearer(ADMIN, request))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{err:?}");
    }
    let created = tokens
        .create_token(bearer(
            ADMIN,
            v1::CreateTokenRequest {
                display_name: "ci".into(),
                role: "editor".into(),
                ttl_seconds: 3600,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    // Names are actors: two live tokens never share one.
    let twice = tokens
        .create_token(bearer(
            ADMIN,
            v1::CreateTokenRequest {
                display_name: "ci".into(),
                role: "viewer".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::AlreadyExists);
    let listed = tokens
        .list_tokens(bearer(ADMIN, v1::ListTokensRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tokens.len(), 2);
    assert_eq!(listed.tokens[1].display_name, "ci");
    assert_eq!(
        listed.tokens[1].name,
        created.token.as_ref().unwrap().name,
        "tokens/{{id}}"
    );
    // One token a page, in creation order, with a token to the next.
    let first = tokens
        .list_tokens(bearer(
            ADMIN,
            v1::ListTokensRequest {
                page_size: 1,
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.tokens, listed.tokens[..1]);
    assert!(!first.next_page_token.is_empty());
    let second = tokens
        .list_tokens(bearer(
            ADMIN,
            v1::ListTokensRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.tokens, listed.tokens[1..]);
    assert!(second.next_page_token.is_empty(), "the last page");
    let forged = tokens
        .list_tokens(bearer(
            ADMIN,
            v1::ListTokensRequest {
                page_size: 1,
                page_token: format!("{}A", first.next_page_token),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    assert_eq!(error_info(&forged).0, "INVALID_PAGE_TOKEN");
    assert!(listed.tokens[1].expire_time.is_some());
    assert!(!format!("{listed:?}").contains(&created.secret));
    let err = tokens
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: "tokens/0000000000000000".into(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(error_info(&err).0, "TOKEN_NOT_FOUND");
    // A revoked token's name is not given again: the audit log names its calls by it.
    let ci = listed.tokens[1].name.clone();
    tokens
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: ci,
                reason: String::new(),
            },
        ))
        .await
        .unwrap();
    let reused = tokens
        .create_token(bearer(
            ADMIN,
            v1::CreateTokenRequest {
                display_name: "ci".into(),
                role: "viewer".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(error_info(&reused).0, "TOKEN_ALREADY_EXISTS");
    assert!(reused.message().contains("revoked"), "{}", reused.message());
    let resource = err.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(resource.resource_name, "tokens/0000000000000000");
    assert_eq!(
        resource.resource_type,
        "type.googleapis.com/corsair.v1.Token"
    );
    let malformed = tokens
        .revoke_token(bearer(
            ADMIN,
            v1::RevokeTokenRequest {
                name: "0000000000000000".into(),
                reason: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert_eq!(error_info(&malformed).0, "INVALID_NAME");
    server.stop().await;
}

on_both_backends!(
    writes_are_rate_limited_per_identity,
    revoking_an_auditor_ends_its_audit_tail,
    every_rpc_against_every_credential,
    a_sidecar_streams_only_its_services_and_revocation_ends_its_stream,
    tokens_are_listed_without_secrets_and_bad_requests_are_refused,
);
