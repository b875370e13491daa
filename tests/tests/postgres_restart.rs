//! PostgreSQL restarted under two control-plane replicas, with sidecars serving traffic:
//! writes fail with `UNAVAILABLE` on both while it is away, nothing is lost or half-written,
//! the audit chain still verifies, and the fleet converges afterwards. Alone in its test binary, because it stops
//! the machine's PostgreSQL, which other tests use.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use corsair_proto::v1;
use support::{
    Backend, Load, Plane, SERVICE, Served, Sidecar, bearer, converged, policy, write_policy,
};

/// Runs `pg_ctlcluster` on the machine's cluster; whether it worked.
fn cluster(action: &str) -> bool {
    let Some(version) = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
    else {
        return false;
    };
    let mut command = Command::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", &version, "main", action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    command.status().is_ok_and(|s| s.success())
}

/// Starts PostgreSQL again however the test ends.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        if !cluster("status") {
            cluster("start");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_two_control_plane_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let Some(plane) = Plane::start(Backend::Postgres, dir.path(), &[]).await else {
        return;
    };
    if !cluster("status") {
        assert!(
            std::env::var("CI").is_err_and(|_| true)
                || std::env::var("CI").is_ok_and(|v| v != "true"),
            "under CI=true this scenario must be able to restart PostgreSQL (pg_ctlcluster)"
        );
        eprintln!(
            "\n!!! SKIPPING the PostgreSQL restart scenario: pg_ctlcluster cannot manage the cluster !!!\n"
        );
        return;
    }
    let Served {
        grpc,
        upstream: _upstream,
        sidecars,
        ..
    } = plane.serve(0, 3, dir.path(), &[]).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(200);

    let _restart = Restart;
    assert!(cluster("stop"), "stopping PostgreSQL");
    for replica in 0..2 {
        let mut policies =
            v1::policy_service_client::PolicyServiceClient::new(plane.channel(replica));
        let current = policies
            .get_policy(bearer(v1::GetPolicyRequest {
                name: format!("services/{SERVICE}/policy"),
            }))
            .await;
        assert!(current.is_err(), "reads fail while the database is away");
        let asked = Instant::now();
        let refused = policies
            .create_policy(bearer(v1::CreatePolicyRequest {
                policy: Some(v1::Policy {
                    service: "other".into(),
                    ..policy(9)
                }),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        eprintln!(
            "PostgreSQL down: a write to replica r{replica} failed with UNAVAILABLE after {:?}",
            asked.elapsed()
        );
    }
    // Traffic goes on under the last policy.
    load.wait_for(300);

    assert!(cluster("start"), "starting PostgreSQL");
    let back = Instant::now();
    load.written.store(2, Ordering::SeqCst);
    let revision = write_policy(&grpc, 2).await;
    let took = converged(&grpc, 3, revision).await;
    eprintln!(
        "PostgreSQL back: first write {:?} after it started, fleet SYNCED {took:?} after the write",
        back.elapsed() - took
    );
    load.wait_for(200);
    let (served, failures) = load.stop();
    assert!(served > 0 && failures.is_empty(), "{failures:?}");
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(plane.channel(1));

    // Nothing lost or half-written: the refused service has no policy and no revision, the
    // revisions are the two writes, and the audit chain verifies.
    let other = policies
        .get_policy(bearer(v1::GetPolicyRequest {
            name: "services/other/policy".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::NotFound);
    let revisions = policies
        .list_policy_revisions(bearer(v1::ListPolicyRevisionsRequest {
            name: format!("services/{SERVICE}/policy"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .revisions;
    assert_eq!(revisions.len(), 2);
    let verified = v1::audit_service_client::AuditServiceClient::new(grpc.clone())
        .verify_audit_chain(bearer(v1::VerifyAuditChainRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    drop(plane);
}
