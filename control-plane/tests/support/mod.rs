//! Test support: a fresh database per test on either backend, a real server on port 0, and
//! generated clients. PostgreSQL comes from `CORSAIR_TEST_POSTGRES_URL` (default: the local
//! server); when it is missing, tests [`skip`], except under `CI=true`, where they fail. Every
//! wait has a [`Deadline`].

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use corsair_control_plane::server::{self, Config};
use corsair_control_plane::store::{self, Store};
use corsair_proto::v1::audit_service_client::AuditServiceClient;
use corsair_proto::v1::policy_service_client::PolicyServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The two storage backends every store test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database made for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop runs outside any runtime guarantee, so use a small one of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut connection) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        )))
                        .execute(&mut connection)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

pub fn postgres_admin_url() -> String {
    std::env::var("CORSAIR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh, empty database; `None` when PostgreSQL is unavailable outside CI (see [`skip`]).
pub async fn fresh_db(backend: Backend) -> Option<TestDb> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("corsair.db").display());
            Some(TestDb {
                url,
                _dir: Some(dir),
                pg: None,
            })
        }
        Backend::Postgres => {
            let admin = postgres_admin_url();
            // One connection, not a pool: a server that is not there fails at once, where a
            // pool would retry until its acquire timeout.
            use sqlx::Connection;
            let mut connection = match sqlx::PgConnection::connect(&admin).await {
                Ok(connection) => connection,
                Err(e) => {
                    skip(&format!("PostgreSQL at {admin} is unreachable ({e})"));
                    return None;
                }
            };
            let name = format!("corsair_t_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut connection)
                .await
                .unwrap();
            let base = admin
                .rsplit_once('/')
                .map_or(admin.as_str(), |(base, _)| base);
            Some(TestDb {
                url: format!("{base}/{name}"),
                _dir: None,
                pg: Some((admin.clone(), name)),
            })
        }
    }
}

/// A control plane serving on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(url: &str) -> TestServer {
        let store = store::connect(url).await.expect("store opens");
        TestServer::with_store(store, Config::default()).await
    }

    pub async fn with_store(store: Arc<dyn Store>, config: Config) -> TestServer {
        TestServer::on("127.0.0.1:0".parse().unwrap(), store, config).await
    }

    /// A server on `addr` (an address a stopped server used, to restart it in place).
    pub async fn on(addr: SocketAddr, store: Arc<dyn Store>, config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn({
            let store = store.clone();
            async move {
                server::serve(listener, store, config, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
            }
        });
        TestServer {
            addr,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn policies(&self) -> PolicyServiceClient<Channel> {
        PolicyServiceClient::new(self.channel().await)
    }

    pub async fn fleet(
        &self,
    ) -> corsair_proto::v1::fleet_service_client::FleetServiceClient<Channel> {
        corsair_proto::v1::fleet_service_client::FleetServiceClient::new(self.channel().await)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel().await)
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            within("the control plane to stop", task).await.unwrap();
        }
    }
}

/// Re-checks `check` until it yields a value: for state another process or task settles
/// asynchronously and announces nowhere (fleet rows after an ACK crosses the wire). Fails
/// naming `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Deadline::new(what);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        deadline.check("");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub use corsair_testkit::{Deadline, PATIENCE, skip, within};

/// Generates one `#[tokio::test]` per backend for an `async fn(Backend)` scenario.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario(Backend::Sqlite).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario(Backend::Postgres).await;
                }
            }
        )*
    };
}

/// `message` as a request presenting `token`.
pub fn bearer<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
