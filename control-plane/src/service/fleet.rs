//! Fleet status: which sidecars exist, on which replica, at which revision, in which state.
//!
//! Each replica keeps the latest status of its own sidecars in memory ([`Fleet`]) and flushes
//! it to the `sidecars` table in one transaction per interval, so ten thousand ACKs do not
//! become ten thousand transactions; a listing flushes first, so a replica always shows its
//! own sidecars exactly, and others' within one interval. Rows of sidecars disconnected for
//! longer than the retention are removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corsair_proto::v1::{self, fleet_service_server::FleetService};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{name_arg, timestamp};
use crate::page_token::PageTokens;
use crate::service::PageLimits;
use crate::status::{bad_request, page_size, store_status, write_error_status};
use crate::store::{
    ResourceKind, SidecarRecord, SidecarState, Store, StoreError, WriteError, now_micros,
};

/// This replica's view of its sidecars, and the writer of their rows.
#[derive(Debug)]
pub struct Fleet {
    /// The id of this control-plane replica, recorded on its sidecars' rows.
    pub replica: String,
    store: Arc<dyn Store>,
    dirty: Mutex<HashMap<String, SidecarRecord>>,
    /// Serializes flushes, so an older batch never lands after a newer one.
    flushing: tokio::sync::Mutex<()>,
}

impl Fleet {
    /// A registry for replica `replica`.
    pub fn new(store: Arc<dyn Store>, replica: String) -> Self {
        Fleet {
            replica,
            store,
            dirty: Mutex::new(HashMap::new()),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// Records a sidecar's latest status (written at the next flush).
    pub fn update(&self, record: SidecarRecord) {
        self.dirty
            .lock()
            .expect("fleet lock")
            .insert(record.sidecar_id.clone(), record);
    }

    /// A sidecar's latest known status: not yet flushed, or as stored.
    pub async fn current(&self, id: &str) -> Result<Option<SidecarRecord>, StoreError> {
        let pending = self.dirty.lock().expect("fleet lock").get(id).cloned();
        match pending {
            Some(record) => Ok(Some(record)),
            None => self.store.get_sidecar(id).await,
        }
    }

    /// Writes every pending status.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _order = self.flushing.lock().await;
        let batch = self.take_dirty();
        let saved = self.store.save_sidecars(&batch).await;
        if saved.is_err() {
            self.requeue(batch);
        }
        saved
    }

    fn take_dirty(&self) -> Vec<SidecarRecord> {
        let mut dirty = self.dirty.lock().expect("fleet lock");
        std::mem::take(&mut *dirty).into_values().collect()
    }

    /// Puts an unsaved batch back, unless something newer arrived meanwhile.
    fn requeue(&self, batch: Vec<SidecarRecord>) {
        let mut dirty = self.dirty.lock().expect("fleet lock");
        for r in batch {
            dirty.entry(r.sidecar_id.clone()).or_insert(r);
        }
    }

    /// Flushes every `interval` and prunes rows disconnected longer than `retention`, until
    /// shutdown (the server flushes once more after the last stream ends).
    pub fn spawn_flusher(
        self: &Arc<Self>,
        interval: Duration,
        retention: Duration,
        mut shutdown: watch::Receiver<bool>,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let fleet = self.clone();
        tasks.spawn(
            async move {
                let mut tick = tokio::time::interval(interval);
                // At least a millisecond: a zero period would panic.
                let period = Duration::from_secs(60).min(retention).max(Duration::from_millis(1));
                let mut prune = tokio::time::interval(period);
                let retention = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Err(error) = fleet.flush().await {
                                tracing::warn!(%error, "fleet status not saved; retrying");
                            }
                        }
                        _ = prune.tick() => {
                            let before = now_micros().saturating_sub(retention);
                            match fleet.store.prune_sidecars(before).await {
                                Ok(0) | Err(_) => {}
                                Ok(n) => tracing::info!(removed = n, "pruned disconnected sidecars"),
                            }
                        }
                        () = crate::service::stopped(&mut shutdown) => break,
                    }
                }
            }
            .instrument(tracing::info_span!("fleet_flusher")),
        );
    }
}

/// The fleet service.
#[derive(Debug, Clone)]
pub struct FleetApi {
    fleet: Arc<Fleet>,
    pages: PageLimits,
    tokens: PageTokens,
}

impl FleetApi {
    /// A fleet service over `fleet`, listing `pages` at a time with page tokens made by
    /// `tokens`.
    pub fn new(fleet: Arc<Fleet>, pages: PageLimits, tokens: PageTokens) -> Self {
        FleetApi {
            fleet,
            pages,
            tokens,
        }
    }
}

fn state_to_proto(state: &str) -> v1::SidecarState {
    match SidecarState::parse(state) {
        Some(SidecarState::Synced) => v1::SidecarState::Synced,
        Some(SidecarState::Pending) => v1::SidecarState::Pending,
        Some(SidecarState::Nacked) => v1::SidecarState::Nacked,
        Some(SidecarState::Disconnected) => v1::SidecarState::Disconnected,
        None => v1::SidecarState::Unspecified,
    }
}

fn sidecar_to_proto(r: &SidecarRecord) -> v1::Sidecar {
    v1::Sidecar {
        name: corsair_proto::names::sidecar_name(&r.sidecar_id),
        sidecar_id: r.sidecar_id.clone(),
        services: r
            .services
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        version: r.version.clone(),
        host: r.host.clone(),
        connect_time: Some(timestamp(r.connected_since)),
        last_seen_time: Some(timestamp(r.last_seen)),
        last_sent_revision: r.last_sent_revision,
        last_acked_revision: r.last_acked_revision,
        state: state_to_proto(&r.state) as i32,
        nack_error: r.nack_error.clone(),
        disconnect_time: r.disconnected_at.map(timestamp),
        control_plane: r.control_plane.clone(),
    }
}

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_sidecars(
        &self,
        request: Request<v1::ListSidecarsRequest>,
    ) -> Result<Response<v1::ListSidecarsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(req.page_size, self.pages.default, self.pages.max)?;
        let state = match v1::SidecarState::try_from(req.state) {
            Ok(v1::SidecarState::Unspecified) => "",
            Ok(v1::SidecarState::Synced) => SidecarState::Synced.as_str(),
            Ok(v1::SidecarState::Pending) => SidecarState::Pending.as_str(),
            Ok(v1::SidecarState::Nacked) => SidecarState::Nacked.as_str(),
            Ok(v1::SidecarState::Disconnected) => SidecarState::Disconnected.as_str(),
            Err(_) => return Err(bad_request("state", format!("unknown state {}", req.state))),
        };
        let filter = format!("{}\u{1}{state}", req.service);
        let after = self.tokens.decode(&req.page_token, "sidecars", &filter)?;
        self.fleet.flush().await.map_err(store_status)?;
        let store = &self.fleet.store;
        let service = req.service.as_str();
        let page = super::paging::read(
            limit,
            self.pages.bytes,
            after,
            |after: Option<String>, n| async move {
                store
                    .list_sidecars(service, state, after.as_deref().unwrap_or_default(), n)
                    .await
            },
            sidecar_to_proto,
            |r| r.sidecar_id.clone(),
        )
        .await
        .map_err(store_status)?;
        Ok(Response::new(v1::ListSidecarsResponse {
            sidecars: page.items,
            next_page_token: self.tokens.next("sidecars", &filter, page.next.as_deref()),
        }))
    }

    async fn get_sidecar(
        &self,
        request: Request<v1::GetSidecarRequest>,
    ) -> Result<Response<v1::Sidecar>, Status> {
        let name = request.into_inner().name;
        let id = name_arg("name", &name, corsair_proto::names::parse_sidecar_name)?;
        self.fleet.flush().await.map_err(store_status)?;
        match self
            .fleet
            .store
            .get_sidecar(id)
            .await
            .map_err(store_status)?
        {
            Some(r) => Ok(Response::new(sidecar_to_proto(&r))),
            None => Err(write_error_status(&WriteError::not_found(
                ResourceKind::Sidecar,
                name.clone(),
                format!("no sidecar {id:?} is known"),
            ))),
        }
    }
}
