//! PostgreSQL restarted under two control-plane replicas, with sidecars serving traffic:
//! writes fail with `UNAVAILABLE` on both while it is away, nothing is lost or half-written,
//! the audit chain still verifies, and the fleet converges afterwards. The PostgreSQL here
//! is a server of the test's own ([`PrivatePostgres`]); no other server is stopped.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use corsair_proto::v1;
use support::{
    Load, PgDatabase, Plane, SERVICE, Served, Sidecar, bearer, converged, free_port, policy, skip,
    write_policy,
};

/// A PostgreSQL server of this test's own: a cluster made by `initdb` in a temporary directory,
/// trusting every local connection, on a free port of 127.0.0.1, its socket in that directory.
/// Stopped (`-m immediate`) and the directory removed when dropped. The tools come from
/// `CORSAIR_PG_BINDIR`, `pg_config --bindir` or `/usr/lib/postgresql/*/bin`.
struct PrivatePostgres {
    bindir: PathBuf,
    /// Holds `data/` (the cluster), `server.log` and the server's socket.
    dir: tempfile::TempDir,
    port: u16,
    /// `initdb` and `pg_ctl` refuse to run as root: as root, they run as the `postgres` user,
    /// who owns the directory.
    as_postgres: bool,
}

impl PrivatePostgres {
    /// What this machine needs to run one: the tools' directory, and the `postgres` user's
    /// (uid, gid) when this runs as root. `Err` says what is missing.
    fn requirements() -> Result<(PathBuf, Option<(u32, u32)>), String> {
        let bindir = bindir()?;
        let me = std::fs::metadata("/proc/self").map_err(|e| format!("/proc/self: {e}"))?;
        if me.uid() != 0 {
            return Ok((bindir, None));
        }
        Ok((bindir, Some((id("-u")?, id("-g")?))))
    }

    /// Creates the cluster and starts it, with the tools in `bindir`, run as `owner` if given.
    fn start(bindir: PathBuf, owner: Option<(u32, u32)>) -> PrivatePostgres {
        let dir = tempfile::tempdir().unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let server = PrivatePostgres {
            bindir,
            dir,
            port: free_port(),
            as_postgres: owner.is_some(),
        };
        let data = server.data();
        server
            .run(
                "initdb",
                &[
                    "-D",
                    &data,
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let conf = Path::new(&data).join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n",
            server.port,
            server.dir.path().display()
        ));
        std::fs::write(&conf, text).unwrap();
        server.start_again();
        server
    }

    /// A URL of a database that is always there, for [`PgDatabase::create`].
    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `pg_ctl start`, returning once the server accepts connections (at most 60 s).
    fn start_again(&self) {
        let log = self.dir.path().join("server.log").display().to_string();
        let started = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"],
        );
        if let Err(e) = started {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{e}\nserver.log:\n{log}");
        }
    }

    /// `pg_ctl stop -m fast` (sessions cut off, a clean shutdown), returning once it is down
    /// (at most 60 s).
    fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs one of the server's tools, as `postgres` when this is root; `Err` with its output
    /// when it fails.
    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let program = self.bindir.join(tool);
        let mut command = if self.as_postgres {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(&program);
            runuser
        } else {
            Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "{tool} {}: {}\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Already stopped when the test ended cleanly; otherwise at once, without waiting for
        // clients (the directory goes next).
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// The directory of PostgreSQL's server tools (`initdb`, `pg_ctl`).
fn bindir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("CORSAIR_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").is_file() {
            Ok(dir)
        } else {
            Err(format!("CORSAIR_PG_BINDIR={} has no initdb", dir.display()))
        };
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // Debian keeps each major version's server in /usr/lib/postgresql/<major>/bin.
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    installed.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    from_pg_config
        .into_iter()
        .chain(installed.into_iter().map(|(_, dir)| dir))
        .find(|dir| dir.join("initdb").is_file())
        .ok_or_else(|| {
            "no initdb (install PostgreSQL's server, e.g. Debian's `postgresql`, or set \
             CORSAIR_PG_BINDIR)"
                .to_owned()
        })
}

/// The `postgres` user's uid (`-u`) or gid (`-g`).
fn id(which: &str) -> Result<u32, String> {
    let output = Command::new("id")
        .args([which, "postgres"])
        .output()
        .map_err(|e| format!("id: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| "running as root, and there is no `postgres` user to run initdb".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_two_control_plane_replicas() {
    let server = match PrivatePostgres::requirements() {
        Ok((bindir, owner)) => PrivatePostgres::start(bindir, owner),
        Err(why) => {
            skip(&format!(
                "it cannot run a PostgreSQL server of its own: {why}"
            ));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let database = PgDatabase::create(&server.admin_url()).await.unwrap();
    let mut plane = Plane::on_postgres(database, &[]);
    plane.start_all();
    let Served {
        grpc,
        upstream: _upstream,
        sidecars,
        ..
    } = plane.serve(0, 3, dir.path(), &[]).await;
    let load = Load::start(&Sidecar::addrs(&sidecars), 2, 1);
    load.wait_for(200, "before PostgreSQL stops");

    server.stop();
    for replica in 0..2 {
        let mut policies =
            v1::policy_service_client::PolicyServiceClient::new(plane.channel(replica));
        let current = policies
            .get_policy(bearer(v1::GetPolicyRequest {
                name: format!("services/{SERVICE}/policy"),
                ..Default::default()
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
    load.wait_for(300, "with PostgreSQL stopped");

    server.start_again();
    let back = Instant::now();
    load.written.store(2, Ordering::SeqCst);
    let revision = write_policy(&grpc, 2).await;
    let took = converged(&grpc, 3, revision).await;
    eprintln!(
        "PostgreSQL back: first write {:?} after it started, fleet SYNCED {took:?} after the write",
        back.elapsed() - took
    );
    load.wait_for(200, "with PostgreSQL back");
    let (served, failures) = load.stop();
    assert!(served > 0 && failures.is_empty(), "{failures:?}");
    let mut policies = v1::policy_service_client::PolicyServiceClient::new(plane.channel(1));

    // Nothing lost or half-written: the refused service has no policy and no revision, the
    // revisions are the two writes, and the audit chain verifies.
    let other = policies
        .get_policy(bearer(v1::GetPolicyRequest {
            name: "services/other/policy".into(),
            ..Default::default()
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
