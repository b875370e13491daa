//! Faults under steady traffic, with the real binaries as separate processes. Each scenario
//! asserts that no request the upstream would have served failed, that every response's CORS
//! headers come from one revision that had been written, that no sidecar goes back to an
//! older revision, and that after healing every sidecar reaches the latest revision; it
//! prints how long that took.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use corsair_proto::v1;
use support::{
    ControlPlane, Load, ORIGIN, SERVICE, Sidecar, Upstream, bearer, channel, converged, free_port,
    policy, request, revision_of, sidecar_token, write_policy,
};

fn sqlite(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("cp.db").display())
}

fn assert_clean(served: u64, failures: &[String]) {
    assert!(served > 0, "no traffic was served");
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start(&sqlite(&dir), port, &[]);
    let grpc = channel(&cp.url);
    let upstream = Upstream::start().await;
    let revision = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let sidecars = Sidecar::fleet(3, |_| port, upstream.addr, dir.path(), &token, &[]);
    converged(&grpc, 3, revision).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(200);

    // SIGKILL: traffic goes on under the last policy.
    cp.process.kill();
    load.wait_for(500);

    // Back on the same port and database: the sidecars reconnect and take a new revision.
    let cp = ControlPlane::start(&sqlite(&dir), port, &[]);
    load.written.store(2, Ordering::SeqCst);
    let healed = Instant::now();
    let revision = write_policy(&grpc, 2).await;
    let took = converged(&grpc, 3, revision).await;
    eprintln!(
        "control plane restarted: fleet SYNCED on the new revision {:?} after the write ({:?} after restart)",
        took,
        healed.elapsed()
    );
    load.wait_for(200);
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_while_the_control_plane_is_down_serves_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start(&sqlite(&dir), port, &[]);
    let grpc = channel(&cp.url);
    let upstream = Upstream::start().await;
    write_policy(&grpc, 1).await;
    let revision = write_policy(&grpc, 2).await;
    let token = sidecar_token(&grpc).await;
    let cache = dir.path().join("cache.json");
    let sidecar = Sidecar::start(port, upstream.addr, &cache, &token, "s0", &[]);
    converged(&grpc, 1, revision).await;
    cp.process.kill();
    assert!(sidecar.process.terminate());

    // No control plane: the new process serves revision 2 from its cache as soon as it listens.
    let sidecar = Sidecar::start(port, upstream.addr, &cache, &token, "s0", &[]);
    assert!(sidecar.process.logged("serving from the cache file"));
    assert_eq!(sidecar.admin_status("/readyz"), 200);
    let (status, head) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(revision_of(&head), Ok(2));
    let load = Load::start(&[sidecar.addr], 2, 2);
    load.wait_for(300);
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_file_is_ignored_until_the_control_plane_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
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
        // Nothing listens on the control plane's port yet.
        let sidecar = Sidecar::start(port, upstream.addr, &cache, "unused", name, &[]);
        assert!(sidecar.process.logged("ignoring the cache file"), "{name}");
        // The no-policy setting (deny) applies, and readiness says so.
        assert_eq!(sidecar.admin_status("/readyz"), 503, "{name}");
        let (status, _) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(status, 403, "{name}");
    }

    // Once a control plane answers, a sidecar with a corrupt cache converges and serves.
    let cache = dir.path().join("garbage.json");
    std::fs::write(&cache, b"{{{{").unwrap();
    let cp = ControlPlane::start(&sqlite(&dir), port, &[]);
    let grpc = channel(&cp.url);
    let revision = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let sidecar = Sidecar::start(port, upstream.addr, &cache, &token, "healed", &[]);
    let took = converged(&grpc, 1, revision).await;
    eprintln!("corrupt cache: SYNCED {took:?} after start");
    let (status, head) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(revision_of(&head), Ok(1));
    // The good policy replaced the corrupt file.
    let saved = std::fs::read(&cache).unwrap();
    assert!(saved.windows(7).any(|w| w == b"x-rev-1"), "{saved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_down_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start(&sqlite(&dir), port, &[]);
    let grpc = channel(&cp.url);
    let mut upstream = Upstream::start().await;
    let revision = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let cache = dir.path().join("cache.json");
    let sidecar = Sidecar::start(port, upstream.addr, &cache, &token, "s0", &[]);
    converged(&grpc, 1, revision).await;
    let load = Load::start(&[sidecar.addr], 2, 1);
    load.wait_for(200);

    load.upstream_down.store(true, Ordering::SeqCst);
    upstream.stop().await;
    let (status, _) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
    assert_eq!(
        status, 502,
        "the sidecar answers 502 while the upstream is down"
    );
    while load.bad_gateway.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Back, without restarting the sidecar.
    upstream.resume().await;
    let back = Instant::now();
    loop {
        let (status, _) = request(sidecar.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("upstream back: served again after {:?}", back.elapsed());
    load.upstream_down.store(false, Ordering::SeqCst);
    let settle = load.served.load(Ordering::Relaxed);
    load.wait_for(300);
    let (served, failures) = load.stop();
    assert!(served > settle);
    assert_clean(served, &failures);
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_updates_while_sidecars_serve_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    burst(&sqlite(&dir), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_updates_while_sidecars_serve_on_two_postgres_replicas() {
    if let Some(url) = support::postgres_database().await {
        burst(&url, 2).await;
    }
}

/// 1,000 updates written to the first of `replicas` control planes on `database_url`, while
/// 20 sidecars, spread over the replicas, serve traffic.
async fn burst(database_url: &str, replicas: usize) {
    const SIDECARS: usize = 20;
    const UPDATES: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let planes: Vec<ControlPlane> = (0..replicas)
        .map(|i| {
            let id = format!("r{i}");
            ControlPlane::start(
                database_url,
                free_port(),
                &["--max-writes-per-sec", "0", "--replica-id", &id],
            )
        })
        .collect();
    let grpc = channel(&planes[0].url);
    let upstream = Upstream::start().await;
    let first = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let sidecars = Sidecar::fleet(
        SIDECARS,
        |i| planes[i % replicas].port,
        upstream.addr,
        dir.path(),
        &token,
        &[],
    );
    converged(&grpc, SIDECARS, first).await;
    let load = Load::start_paced(
        &Sidecar::addrs(&sidecars),
        1,
        1,
        Some(Duration::from_millis(2)),
    );
    load.wait_for(100);
    let started = Instant::now();
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(grpc.clone());
    let mut etag = policies
        .get_policy(bearer(v1::GetPolicyRequest {
            name: format!("services/{SERVICE}/policy"),
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
        etag = written.policy.unwrap().etag;
    }
    let wrote = started.elapsed();
    let took = converged(&grpc, SIDECARS, last).await;
    eprintln!(
        "{UPDATES} updates written in {wrote:?}; all {SIDECARS} sidecars on {replicas} replica(s) SYNCED on the last {took:?} after it"
    );
    load.wait_for(100);
    let (served, failures) = load.stop();
    // Every sidecar now serves the last revision.
    for s in &sidecars {
        let (_, head) = request(s.addr, "GET", "/item", &[("Origin", ORIGIN)]).unwrap();
        assert_eq!(revision_of(&head), Ok(UPDATES));
    }
    assert_clean(served, &failures);
    drop(planes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_paused_beyond_the_keepalive_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp = ControlPlane::start(&sqlite(&dir), port, &["--keepalive-secs", "1"]);
    let grpc = channel(&cp.url);
    let upstream = Upstream::start().await;
    let revision = write_policy(&grpc, 1).await;
    let token = sidecar_token(&grpc).await;
    let sidecars = Sidecar::fleet(
        2,
        |_| port,
        upstream.addr,
        dir.path(),
        &token,
        &["--keepalive-secs", "1"],
    );
    converged(&grpc, 2, revision).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(100);

    // SIGSTOP: the process holds its sockets but answers nothing. The sidecars' keepalive
    // notices, they leave the dead stream, and traffic goes on meanwhile.
    cp.process.signal(nix::sys::signal::Signal::SIGSTOP);
    let paused = Instant::now();
    for s in &sidecars {
        while support::sync_connected(s) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "control plane paused: sidecars left the stream after {:?}",
        paused.elapsed()
    );
    load.wait_for(300);

    cp.process.signal(nix::sys::signal::Signal::SIGCONT);
    load.written.store(2, Ordering::SeqCst);
    let resumed = Instant::now();
    let revision = write_policy(&grpc, 2).await;
    converged(&grpc, 2, revision).await;
    eprintln!(
        "control plane resumed: fleet SYNCED on a new revision {:?} after SIGCONT",
        resumed.elapsed()
    );
    load.wait_for(100);
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_postgres_replicas_killed_and_restarted_its_sidecars_move() {
    let Some(url) = support::postgres_database().await else {
        return;
    };
    let (port_a, port_b) = (free_port(), free_port());
    let a = ControlPlane::start(&url, port_a, &["--replica-id", "a"]);
    let b = ControlPlane::start(&url, port_b, &["--replica-id", "b"]);
    let front = support::Front::start(vec![port_a, port_b]).await;
    let grpc_b = channel(&b.url);
    let upstream = Upstream::start().await;
    let revision = write_policy(&grpc_b, 1).await;
    let token = sidecar_token(&grpc_b).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecars = Sidecar::fleet(3, |_| front.port, upstream.addr, dir.path(), &token, &[]);
    converged(&grpc_b, 3, revision).await;
    let mut fleet = v1::fleet_service_client::FleetServiceClient::new(grpc_b.clone());
    let on = |fleet: v1::ListSidecarsResponse, replica: &str| {
        fleet
            .sidecars
            .iter()
            .filter(|s| s.control_plane == replica && s.state == v1::SidecarState::Synced as i32)
            .count()
    };
    let listed = fleet
        .list_sidecars(bearer(v1::ListSidecarsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on(listed, "a"), 3, "the front sends everyone to a first");
    let load = Load::start(&Sidecar::addrs(&sidecars), 1, 1);
    load.wait_for(200);

    a.process.kill();
    let killed = Instant::now();
    load.written.store(2, Ordering::SeqCst);
    let revision = write_policy(&grpc_b, 2).await;
    loop {
        let listed = fleet
            .list_sidecars(bearer(v1::ListSidecarsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let moved = listed
            .sidecars
            .iter()
            .filter(|s| s.control_plane == "b" && s.last_acked_revision >= revision)
            .count();
        if moved == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "replica a killed: all sidecars SYNCED on b {:?} later",
        killed.elapsed()
    );
    load.wait_for(200);

    // a comes back on its port and takes writes again; the fleet follows them from b.
    let a = ControlPlane::start(&url, port_a, &["--replica-id", "a"]);
    load.written.store(3, Ordering::SeqCst);
    let revision = write_policy(&channel(&a.url), 3).await;
    let took = converged(&grpc_b, 3, revision).await;
    eprintln!("replica a restarted: a write through it reached every sidecar in {took:?}");
    load.wait_for(200);
    let (served, failures) = load.stop();
    assert_clean(served, &failures);
    drop((a, b));
}
