//! Faults under steady traffic, with the real binaries as separate processes. Each scenario
//! runs twice: on one control plane with SQLite, and on two control-plane replicas sharing
//! PostgreSQL, every sidecar given both replicas' addresses. Each asserts that no request the
//! upstream would have served failed, that every response's CORS headers come from one
//! revision that had been written, that no sidecar goes back to an older revision, and that
//! after healing every sidecar reaches the latest revision; it prints how long that took.

#[macro_use]
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use corsair_proto::v1;
use support::{
    Backend, Deadline, Load, ORIGIN, Plane, SERVICE, Served, Sidecar, Upstream, bearer, converged,
    policy, request, revision_of, sidecar_token, write_policy,
};

on_both_backends!(
    control_plane_killed_and_restarted,
    control_plane_paused_beyond_the_keepalive_timeout,
    a_sidecar_restarted_while_the_control_plane_is_down_serves_from_its_cache,
    a_corrupt_cache_file_is_ignored_until_the_control_plane_answers,
    the_upstream_down_and_back,
    a_burst_of_updates_while_sidecars_serve,
);

fn assert_clean(served: u64, failures: &[String]) {
    assert!(served > 0, "no traffic was served");
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Each `SYNCED` sidecar's replica and acknowledged revision, from fleet status read through
/// replica `via`.
async fn synced_per_replica(plane: &Plane, via: usize) -> Vec<(String, i64)> {
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(plane.channel(via));
    fleet
        .list_sidecars(bearer(v1::ListSidecarsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .sidecars
        .into_iter()
        .filter(|s| s.state == v1::SidecarState::Synced as i32)
        .map(|s| (s.control_plane, s.last_acked_revision))
        .collect()
}

async fn control_plane_killed_and_restarted(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plane) = Plane::start(backend, dir.path(), &[]).await else {
        return;
    };
    let Served {
        grpc,
        upstream: _upstream,
        sidecars,
        ..
    } = plane.serve(0, 3, dir.path(), &[]).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(200, "before the control plane is killed");

    // SIGKILL to every replica: traffic goes on under the last policy.
    plane.kill_all();
    load.wait_for(500, "with every control-plane replica killed");

    // Back on the same ports and database: the sidecars reconnect and take a new revision.
    plane.start_all();
    load.written.store(2, Ordering::SeqCst);
    let healed = Instant::now();
    let revision = write_policy(&grpc, 2).await;
    let took = converged(&grpc, 3, revision).await;
    eprintln!(
        "{backend:?}: control plane restarted: fleet SYNCED on the new revision {:?} after the write ({:?} after restart)",
        took,
        healed.elapsed()
    );
    load.wait_for(200, "after the restart");
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}

/// SIGSTOP holds the process's sockets but answers nothing. On SQLite the one control plane
/// is frozen: the sidecars' keepalive notices, they leave the dead stream, and traffic goes on
/// under the last policy until SIGCONT. With two replicas, `r0` is frozen: its sidecars move
/// to `r1` and take a new revision written there while `r0` is still frozen.
async fn control_plane_paused_beyond_the_keepalive_timeout(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let keepalive = ["--keepalive-secs", "1"];
    let Some(plane) = Plane::start(backend, dir.path(), &keepalive).await else {
        return;
    };
    let replicas = plane.ports.len();
    let live = replicas - 1;
    let Served {
        grpc,
        upstream: _upstream,
        sidecars,
        ..
    } = plane.serve(live, 3, dir.path(), &keepalive).await;
    let on_r0 = synced_per_replica(&plane, live)
        .await
        .iter()
        .filter(|(replica, _)| replica == "r0")
        .count();
    assert!(on_r0 > 0, "some sidecars start on the replica to be frozen");
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(100, "before a replica is frozen");

    let frozen = &plane.replica(0).process;
    frozen.signal(nix::sys::signal::Signal::SIGSTOP);
    let paused = Instant::now();
    if replicas == 1 {
        for s in &sidecars {
            let deadline = Deadline::new(format!(
                "sidecar {} to leave the stream of the frozen control plane",
                s.addr
            ));
            while support::sync_connected(s) {
                deadline.check("its metrics say connected");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        eprintln!(
            "{backend:?}: control plane paused: sidecars left the stream after {:?}",
            paused.elapsed()
        );
    } else {
        load.written.store(2, Ordering::SeqCst);
        let revision = write_policy(&grpc, 2).await;
        let took = converged(&grpc, 3, revision).await;
        let listed = synced_per_replica(&plane, live).await;
        assert!(
            listed.iter().all(|(replica, _)| replica == "r1"),
            "{listed:?}"
        );
        eprintln!(
            "{backend:?}: r0 paused: its {on_r0} sidecar(s) SYNCED on r1 with a revision written there {:?} after SIGSTOP ({took:?} after the write)",
            paused.elapsed()
        );
    }
    load.wait_for(300, "with replica r0 frozen");

    frozen.signal(nix::sys::signal::Signal::SIGCONT);
    let next = replicas as u64 + 1;
    load.written.store(next as i64, Ordering::SeqCst);
    let resumed = Instant::now();
    // Written through the resumed replica.
    let revision = write_policy(&plane.channel(0), next).await;
    converged(&grpc, 3, revision).await;
    eprintln!(
        "{backend:?}: control plane resumed: fleet SYNCED on a revision written through it {:?} after SIGCONT",
        resumed.elapsed()
    );
    load.wait_for(100, "after SIGCONT");
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}

async fn a_sidecar_restarted_while_the_control_plane_is_down_serves_from_its_cache(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plane) = Plane::start(backend, dir.path(), &[]).await else {
        return;
    };
    let grpc = plane.channel(0);
    let upstream = Upstream::start().await;
    write_policy(&grpc, 1).await;
    let revision = write_policy(&grpc, 2).await;
    let token = sidecar_token(&grpc).await;
    let cache = dir.path().join("cache.json");
    let control_plane = plane.addresses();
    let sidecar = Sidecar::start(&control_plane, upstream.addr, &cache, &token, "s0", &[]);
    converged(&grpc, 1, revision).await;
    plane.kill_all();
    assert!(sidecar.process.terminate());

    // No control plane: the new process serves revision 2 from its cache as soon as it listens.
    let sidecar = Sidecar::start(&control_plane, upstream.addr, &cache, &token, "s0", &[]);
    assert!(sidecar.process.logged("serving from the cache file"));
    assert_eq!(sidecar.admin_status("/readyz"), 200);
    let (status, head) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(revision_of(&head), Ok(2));
    let load = Load::start(&[sidecar.addr], 2, 2);
    load.wait_for(300, "from the cache with the control plane down");

    // The control plane back: the sidecar follows it again.
    plane.start_all();
    load.written.store(3, Ordering::SeqCst);
    let revision = write_policy(&grpc, 3).await;
    let took = converged(&grpc, 1, revision).await;
    eprintln!(
        "{backend:?}: sidecar restarted from its cache: SYNCED {took:?} after the next write"
    );
    load.wait_for(100, "after the control plane came back");
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}

async fn a_corrupt_cache_file_is_ignored_until_the_control_plane_answers(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plane) = Plane::prepare(backend, dir.path(), &[]).await else {
        return;
    };
    let control_plane = plane.addresses();
    let upstream = Upstream::start().await;
    for (name, contents) in [
        ("garbage", &b"\x00\xffnot json at all"[..]),
        (
            "truncated",
            &br#"{"version": 1, "revision": 3, "policies": [{"service": "sh"#[..],
        ),
    ] {
        let cache = dir.path().join(format!("{name}.json"));
        std::fs::write(&cache, contents).unwrap();
        // Nothing listens on the control plane's ports yet.
        let sidecar = Sidecar::start(&control_plane, upstream.addr, &cache, "unused", name, &[]);
        assert!(sidecar.process.logged("ignoring the cache file"), "{name}");
        // The no-policy setting (deny) applies, and readiness says so.
        assert_eq!(sidecar.admin_status("/readyz"), 503, "{name}");
        let (status, _) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(status, 403, "{name}");
    }

    // Once a control plane answers, a sidecar with a corrupt cache converges and serves.
    let cache = dir.path().join("garbage.json");
    std::fs::write(&cache, b"{{{{").unwrap();
    plane.start_all();
    let grpc = plane.channel(0);
    let revision = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let sidecar = Sidecar::start(&control_plane, upstream.addr, &cache, &token, "healed", &[]);
    let took = converged(&grpc, 1, revision).await;
    eprintln!("{backend:?}: corrupt cache: SYNCED {took:?} after start");
    let (status, head) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(revision_of(&head), Ok(1));
    // The good policy replaced the corrupt file.
    let saved = std::fs::read(&cache).unwrap();
    assert!(saved.windows(7).any(|w| w == b"x-rev-1"), "{saved:?}");
}

async fn the_upstream_down_and_back(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(plane) = Plane::start(backend, dir.path(), &[]).await else {
        return;
    };
    let Served {
        mut upstream,
        sidecars,
        ..
    } = plane.serve(0, 2, dir.path(), &[]).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(200, "before the upstream stops");

    load.upstream_down.store(true, Ordering::SeqCst);
    upstream.stop().await;
    for s in &sidecars {
        let (status, _) = request(s.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(
            status, 502,
            "the sidecar answers 502 while the upstream is down"
        );
    }
    let deadline = Deadline::new("20 requests of the load answered 502 with the upstream down");
    loop {
        let bad_gateway = load.bad_gateway.load(Ordering::Relaxed);
        if bad_gateway >= 20 {
            break;
        }
        deadline.check(format_args!("{bad_gateway}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Back, without restarting the sidecars.
    upstream.resume().await;
    let back = Instant::now();
    for s in &sidecars {
        let deadline = Deadline::new(format!(
            "sidecar {} to answer 200 with the upstream back",
            s.addr
        ));
        loop {
            let (status, _) = request(s.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
            if status == 200 {
                break;
            }
            deadline.check(format_args!("status {status}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    eprintln!(
        "{backend:?}: upstream back: served again after {:?}",
        back.elapsed()
    );
    load.upstream_down.store(false, Ordering::SeqCst);
    let settle = load.served.load(Ordering::Relaxed);
    load.wait_for(300, "after the upstream came back");
    let (served, failures) = load.stop();
    assert!(served > settle);
    assert_clean(served, &failures);
}

/// 1,000 updates written through the first replica while 20 sidecars, spread over the
/// replicas, serve traffic.
async fn a_burst_of_updates_while_sidecars_serve(backend: Backend) {
    const SIDECARS: usize = 20;
    const UPDATES: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let Some(plane) = Plane::start(backend, dir.path(), &["--max-writes-per-sec", "0"]).await
    else {
        return;
    };
    let Served {
        grpc,
        upstream: _upstream,
        sidecars,
        revision: first,
    } = plane.serve(0, SIDECARS, dir.path(), &[]).await;
    let replicas: std::collections::BTreeSet<String> = synced_per_replica(&plane, 0)
        .await
        .into_iter()
        .map(|(replica, _)| replica)
        .collect();
    assert_eq!(
        replicas.len(),
        plane.ports.len(),
        "spread over {replicas:?}"
    );
    let load = Load::start_paced(
        &Sidecar::addrs(&sidecars),
        1,
        1,
        Some(Duration::from_millis(2)),
    );
    load.wait_for(100, "before the burst of updates");
    let started = Instant::now();
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(grpc.clone());
    let mut etag = policies
        .get_policy(bearer(v1::GetPolicyRequest {
            name: format!("services/{SERVICE}/policy"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .etag;
    let mut last = first;
    for n in 2..=UPDATES {
        load.written.store(n as i64, Ordering::SeqCst);
        let written = policies
            .update_policy(bearer(v1::UpdatePolicyRequest {
                policy: Some(v1::Policy { etag, ..policy(n) }),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        last = written.revision;
        etag = written.etag;
    }
    let wrote = started.elapsed();
    let took = converged(&grpc, SIDECARS, last).await;
    eprintln!(
        "{backend:?}: {UPDATES} updates written in {wrote:?}; all {SIDECARS} sidecars on {} replica(s) SYNCED on the last {took:?} after it",
        replicas.len()
    );
    load.wait_for(100, "after the burst of updates");
    let (served, failures) = load.stop();
    // Every sidecar now serves the last revision.
    for s in &sidecars {
        let (_, head) = request(s.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(revision_of(&head), Ok(UPDATES));
    }
    assert_clean(served, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_postgres_replicas_killed_and_restarted_its_sidecars_move() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut plane) = Plane::start(Backend::Postgres, dir.path(), &[]).await else {
        return;
    };
    let Served {
        grpc: grpc_r1,
        upstream: _upstream,
        sidecars,
        ..
    } = plane.serve(1, 3, dir.path(), &[]).await;
    let on_r0 = synced_per_replica(&plane, 1)
        .await
        .iter()
        .filter(|(replica, _)| replica == "r0")
        .count();
    assert!(on_r0 > 0, "some sidecars start on r0");
    let load = Load::start(&Sidecar::addrs(&sidecars), 1, 1);
    load.wait_for(200, "before r0 is killed");

    plane.replicas[0].take().unwrap().process.kill();
    let killed = Instant::now();
    load.written.store(2, Ordering::SeqCst);
    let revision = write_policy(&grpc_r1, 2).await;
    let deadline = Deadline::new(format!(
        "all 3 sidecars SYNCED on r1 at revision {revision} or later"
    ));
    loop {
        let listed = synced_per_replica(&plane, 1).await;
        let moved = listed
            .iter()
            .filter(|(replica, acked)| replica == "r1" && *acked >= revision)
            .count();
        if moved == 3 {
            break;
        }
        deadline.check(format_args!(
            "(replica, revision) of each SYNCED: {listed:?}"
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "replica r0 killed: its {on_r0} sidecar(s) SYNCED on r1 {:?} later",
        killed.elapsed()
    );
    load.wait_for(200, "with r0 killed");

    // r0 comes back on its port and takes writes again; the fleet follows them from r1.
    plane.start_all();
    load.written.store(3, Ordering::SeqCst);
    let revision = write_policy(&plane.channel(0), 3).await;
    let took = converged(&grpc_r1, 3, revision).await;
    eprintln!("replica r0 restarted: a write through it reached every sidecar in {took:?}");
    load.wait_for(200, "after r0 came back");
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}
