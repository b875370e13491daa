//! `corsair.v1.AuditService`: filtered, keyset-paginated listing (newest first), single
//! events, a live tail, and chain verification.

use std::pin::Pin;
use std::time::Duration;

use corsair_proto::v1::{self, audit_service_server::AuditService};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::Shared;
use crate::convert::{
    event_to_proto, micros, outcome_from_proto, page_size, page_token, store_status,
};
use crate::store::AuditFilter;

/// Events read per query while tailing.
const TAIL_BATCH: u32 = 500;
/// How often a tail re-reads the log when nothing in this process wakes it (writes made by
/// other control-plane processes on the same database).
const TAIL_POLL: Duration = Duration::from_secs(1);

/// The audit service.
#[derive(Debug, Clone)]
pub struct Audit {
    shared: Shared,
}

impl Audit {
    /// An audit service over `shared`.
    pub fn new(shared: Shared) -> Self {
        Audit { shared }
    }
}

#[tonic::async_trait]
impl AuditService for Audit {
    async fn list_audit_events(
        &self,
        request: Request<v1::ListAuditEventsRequest>,
    ) -> Result<Response<v1::ListAuditEventsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let filter = AuditFilter {
            service: req.service,
            actor: req.actor,
            method: req.method,
            outcome: outcome_from_proto(req.outcome)?,
            since: req.start_time.as_ref().map(micros),
            until: req.end_time.as_ref().map(micros),
        };
        let fingerprint = format!("{filter:?}");
        let cursor = page_token::decode(&req.page_token, "audit", &fingerprint)?.and_then(|p| {
            let (time, sequence) = p.split_once(':')?;
            Some((time.parse().ok()?, sequence.parse().ok()?))
        });
        if !req.page_token.is_empty() && cursor.is_none() {
            return Err(crate::convert::bad_request(
                "page_token",
                "invalid page token",
            ));
        }
        let mut events = self
            .shared
            .store
            .list_audit(&filter, cursor, limit + 1)
            .await
            .map_err(store_status)?;
        let next_page_token = page_token::finish(&mut events, limit, |last| {
            page_token::encode(
                "audit",
                &fingerprint,
                &format!("{}:{}", last.time, last.sequence),
            )
        });
        Ok(Response::new(v1::ListAuditEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_audit_event(
        &self,
        request: Request<v1::GetAuditEventRequest>,
    ) -> Result<Response<v1::AuditEvent>, Status> {
        let sequence = request.into_inner().sequence;
        match self
            .shared
            .store
            .get_audit(sequence)
            .await
            .map_err(store_status)?
        {
            Some(e) => Ok(Response::new(event_to_proto(&e))),
            None => Err(Status::not_found(format!("no audit event {sequence}"))),
        }
    }

    type WatchAuditEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::AuditEvent, Status>> + Send + 'static>>;

    async fn watch_audit_events(
        &self,
        request: Request<v1::WatchAuditEventsRequest>,
    ) -> Result<Response<Self::WatchAuditEventsStream>, Status> {
        let token_id = crate::service::principal(&request).and_then(|p| p.token_id.clone());
        let req = request.into_inner();
        let filter = AuditFilter {
            service: req.service,
            actor: req.actor,
            method: req.method,
            ..AuditFilter::default()
        };
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        let span = tracing::info_span!("audit_tail", after = req.after_sequence);
        self.shared
            .tasks
            .spawn(tail(shared, filter, req.after_sequence, token_id, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<v1::VerifyAuditChainRequest>,
    ) -> Result<Response<v1::VerifyAuditChainResponse>, Status> {
        let req = request.into_inner();
        let v = crate::audit::verify(
            self.shared.store.clone(),
            req.start_sequence,
            req.end_sequence,
        )
        .await
        .map_err(store_status)?;
        let (first_bad_sequence, error) = v.first_bad.unwrap_or_default();
        Ok(Response::new(v1::VerifyAuditChainResponse {
            ok: first_bad_sequence == 0,
            verified_events: v.verified,
            first_bad_sequence,
            error,
        }))
    }
}

/// Sends every event after `after` that passes `filter`, then follows the log live until
/// the client goes away, the server shuts down, or the caller's token (`token_id`) is
/// revoked or expires (checked on every wake-up: a revocation is itself an audit event).
async fn tail(
    shared: Shared,
    filter: AuditFilter,
    mut after: u64,
    token_id: Option<String>,
    tx: mpsc::Sender<Result<v1::AuditEvent, Status>>,
) {
    let mut woken = shared.audit_head.subscribe();
    let mut shutdown = shared.shutdown.clone();
    loop {
        if let Some(id) = &token_id
            && let Some(status) = crate::auth::stream_refusal(shared.store.as_ref(), id).await
        {
            let _ = tx.send(Err(status)).await;
            return;
        }
        // Seen before reading, so a write committed during the read wakes the next wait.
        woken.borrow_and_update();
        let batch = match shared.store.audit_after(after, TAIL_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                let _ = tx.send(Err(store_status(e))).await;
                return;
            }
        };
        let full = batch.len() == TAIL_BATCH as usize;
        for event in batch {
            after = event.sequence;
            if filter.matches(&event) && tx.send(Ok(event_to_proto(&event))).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = woken.changed() => {}
            _ = tokio::time::sleep(TAIL_POLL) => {}
            _ = tx.closed() => return,
            () = crate::service::stopped(&mut shutdown) => return,
        }
    }
}
