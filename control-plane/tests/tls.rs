//! TLS and mTLS on the gRPC listener: sidecar identities from certificate URI SANs, refused
//! certificates (another CA, two URI SANs), tokens over TLS, and certificate reload.

mod support;

use std::path::Path;
use std::time::Duration;

use corsair_control_plane::auth::AuthMode;
use corsair_control_plane::server::Config;
use corsair_control_plane::service::token::bootstrap;
use corsair_control_plane::tls::TlsFiles;
use corsair_proto::v1;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use support::{Backend, Deadline, TestServer, bearer, fresh_db, within};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const ADMIN: &str = "corsair_tls-test-admin-0123456789abcdef0123456789";
const DOMAIN: &str = "corsair.test";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// A leaf signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, dns: &[&str], uris: &[&str]) -> (String, String) {
    let mut params =
        CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).unwrap();
    for uri in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*uri).try_into().unwrap()));
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn channel(
    server: &TestServer,
    trusted: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trusted))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn hello(services: &[&str]) -> v1::DiscoveryRequest {
    v1::DiscoveryRequest {
        kind: Some(v1::discovery_request::Kind::Hello(v1::Hello {
            sidecar_id: "s1".into(),
            services: services.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })),
    }
}

/// Opens a policy stream asking for `services`; its first message or error.
async fn stream(
    channel: Channel,
    services: &[&str],
) -> Result<v1::DiscoveryResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(hello(services)).await.unwrap();
    let mut client = v1::discovery_service_client::DiscoveryServiceClient::new(channel);
    let mut inbound = client
        .stream_policies(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = within("the first discovery response", inbound.message())
        .await?
        .expect("a first message");
    drop(tx);
    Ok(first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identifies_sidecars_and_refuses_what_it_must() {
    let db = fresh_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours = ca("corsair test CA");
    let theirs = ca("another CA");
    let server_pair = leaf(&ours, &["localhost"], &[]);
    let files = TlsFiles {
        cert: write(dir.path(), "server.pem", &server_pair.0),
        key: write(dir.path(), "server.key", &server_pair.1),
        client_ca: Some(write(dir.path(), "clients.pem", &ours.pem)),
        reload_interval: Duration::from_millis(20),
    };
    let store = corsair_control_plane::store::connect(&db.url)
        .await
        .unwrap();
    bootstrap(&store, Some(ADMIN)).await.unwrap();
    let server = TestServer::with_store(
        store,
        Config {
            auth: AuthMode::Tokens,
            tls: Some(files.clone()),
            trust_domain: Some(DOMAIN.into()),
            ..Config::default()
        },
    )
    .await;

    // A token over TLS, without a client certificate.
    let anonymous = channel(&server, &ours.pem, None).await.unwrap();
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(anonymous.clone());
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
    let refused = policies
        .list_policies(v1::ListPoliciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A sidecar certificate: its own service only, and nothing but streaming.
    let shop = leaf(&ours, &[], &["spiffe://corsair.test/corsair/sidecar/shop"]);
    let shop_channel = channel(&server, &ours.pem, Some(&shop)).await.unwrap();
    let first = stream(shop_channel.clone(), &["shop"]).await.unwrap();
    assert_eq!(first.upserts.len(), 1);
    assert_eq!(first.upserts[0].service, "shop");
    let other = stream(shop_channel.clone(), &["bank"]).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    let write = v1::policy_service_client::PolicyServiceClient::new(shop_channel)
        .delete_policy(v1::DeletePolicyRequest {
            name: "services/shop/policy".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(write.code(), Code::PermissionDenied);

    // Two URI SANs, or another trust domain: not an identity.
    let two = leaf(
        &ours,
        &[],
        &[
            "spiffe://corsair.test/corsair/sidecar/shop",
            "spiffe://corsair.test/corsair/sidecar/bank",
        ],
    );
    let err = stream(
        channel(&server, &ours.pem, Some(&two)).await.unwrap(),
        &["shop"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("exactly one URI SAN"), "{err:?}");
    let foreign = leaf(
        &ours,
        &[],
        &["spiffe://elsewhere.test/corsair/sidecar/shop"],
    );
    let err = stream(
        channel(&server, &ours.pem, Some(&foreign)).await.unwrap(),
        &["shop"],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A certificate from another CA: the handshake fails.
    let stranger = leaf(
        &theirs,
        &[],
        &["spiffe://corsair.test/corsair/sidecar/shop"],
    );
    let failed = match channel(&server, &ours.pem, Some(&stranger)).await {
        Err(_) => true,
        Ok(channel) => stream(channel, &["shop"]).await.is_err(),
    };
    assert!(failed, "a certificate from another CA was accepted");

    // Plain text to a TLS listener gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let err = v1::policy_service_client::PolicyServiceClient::new(plain)
            .list_policies(bearer(ADMIN, v1::ListPoliciesRequest::default()))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }

    // Reload: a certificate from another CA replaces the server's; new connections that
    // trust only that CA succeed once it is picked up, without a restart.
    let renewed = leaf(&theirs, &["localhost"], &[]);
    std::fs::write(&files.key, &renewed.1).unwrap();
    std::fs::write(&files.cert, &renewed.0).unwrap();
    let deadline = Deadline::new("the renewed certificate to be served");
    loop {
        let answered = match channel(&server, &theirs.pem, None).await {
            Ok(channel) => v1::policy_service_client::PolicyServiceClient::new(channel)
                .list_policies(bearer(ADMIN, v1::ListPoliciesRequest::default()))
                .await
                .map(drop)
                .map_err(|status| format!("{status:?}")),
            Err(e) => Err(format!("{e:?}")),
        };
        match answered {
            Ok(()) => break,
            Err(last_seen) => deadline.check(last_seen),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
