//! A fleet of lightweight simulated sidecars: each runs the real [`SyncClient`] with its own
//! [`PolicySet`] (so it validates, compiles, ACKs and NACKs like a real sidecar), without a
//! proxy. Streams share a few HTTP/2 connections, as many sidecars behind one load balancer
//! would look to a control plane.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::policies::PolicySet;
use crate::sync::{Backoff, SyncClient, SyncConfig, SyncState};

/// Streams multiplexed on one connection.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// A running simulated fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Each sidecar's sync state.
    pub states: Vec<watch::Receiver<SyncState>>,
    /// Each sidecar's policies.
    pub sets: Vec<Arc<PolicySet>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Connects `count` sidecars to `endpoint`; sidecar `i` serves `services(i)`.
pub async fn start(
    endpoint: &str,
    count: usize,
    services: impl Fn(usize) -> Vec<String>,
    backoff: Backoff,
) -> Result<Fleet, tonic::transport::Error> {
    let (stop, stopped) = watch::channel(false);
    let mut channels: Vec<Channel> = Vec::new();
    let mut fleet = Fleet {
        states: Vec::with_capacity(count),
        sets: Vec::with_capacity(count),
        stop,
        tasks: JoinSet::new(),
    };
    for i in 0..count {
        if i % STREAMS_PER_CONNECTION == 0 {
            channels.push(
                Endpoint::from_shared(endpoint.to_owned())?
                    .http2_keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
                    .connect_lazy(),
            );
        }
        let set = Arc::new(PolicySet::default());
        let config = SyncConfig {
            sidecar_id: format!("sim-{i:05}"),
            services: services(i),
            version: "sim".into(),
            host: "simulator".into(),
            backoff,
        };
        let client = SyncClient::new(
            channels.last().expect("a channel").clone(),
            config,
            set.clone(),
        );
        fleet.states.push(client.state());
        fleet.sets.push(set);
        let mut stopped = stopped.clone();
        fleet.tasks.spawn(async move {
            let _ = client
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
    }
    Ok(fleet)
}

impl Fleet {
    /// Waits until every sidecar has applied global revision `revision` or later; returns
    /// when each got there.
    pub async fn all_at(&self, revision: i64) -> Vec<Instant> {
        let mut waits = JoinSet::new();
        for (i, state) in self.states.iter().enumerate() {
            let mut state = state.clone();
            waits.spawn(async move {
                let _ = state
                    .wait_for(
                        |s| matches!(s, SyncState::Connected { revision: r } if *r >= revision),
                    )
                    .await;
                (i, Instant::now())
            });
        }
        let mut at = vec![Instant::now(); self.states.len()];
        while let Some(done) = waits.join_next().await {
            let (i, t) = done.expect("waiter");
            at[i] = t;
        }
        at
    }

    /// Waits until every sidecar has a stream open.
    pub async fn all_connected(&self) {
        for state in &self.states {
            let _ = state
                .clone()
                .wait_for(|s| matches!(s, SyncState::Connected { .. }))
                .await;
        }
    }

    /// Stops every sidecar.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
