//! `corsair.v1.AuditService`: filtered, keyset-paginated listing (newest first), single
//! events, a live tail, and chain verification.

use std::pin::Pin;
use std::time::Duration;

use corsair_proto::v1::{self, audit_service_server::AuditService};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use super::Shared;
use crate::audit::RangeError;
use crate::convert::{event_to_proto, micros, name_arg, outcome_from_proto};
use crate::status::{bad_request, page_size, status, store_status, write_error_status};
use crate::store::{AuditFilter, ResourceKind, WriteError};

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
            method: method_filter(&req.method)?,
            outcome: outcome_from_proto(req.outcome)?,
            since: req.start_time.as_ref().map(micros),
            until: req.end_time.as_ref().map(micros),
        };
        let fingerprint = filter.fingerprint();
        let tokens = &self.shared.page_tokens;
        let cursor = tokens
            .decode(&req.page_token, "audit", &fingerprint)?
            .map(|p| {
                let (time, sequence) = p.split_once(':')?;
                Some((time.parse().ok()?, sequence.parse().ok()?))
            })
            .map(|cursor| {
                cursor.ok_or_else(|| bad_request("page_token", "not a page token of this listing"))
            })
            .transpose()?;
        let store = &self.shared.store;
        let filter = &filter;
        let page = super::paging::read(
            limit,
            self.shared.pages.bytes,
            cursor,
            |cursor, n| async move { store.list_audit(filter, cursor, n).await },
            event_to_proto,
            |e| (e.time, e.sequence),
        )
        .await
        .map_err(store_status)?;
        let next = page
            .next
            .map(|(time, sequence)| format!("{time}:{sequence}"));
        Ok(Response::new(v1::ListAuditEventsResponse {
            events: page.items,
            next_page_token: tokens.next("audit", &fingerprint, next.as_deref()),
        }))
    }

    async fn get_audit_event(
        &self,
        request: Request<v1::GetAuditEventRequest>,
    ) -> Result<Response<v1::AuditEvent>, Status> {
        let name = request.into_inner().name;
        let sequence = name_arg("name", &name, corsair_proto::names::parse_audit_event_name)?;
        match self
            .shared
            .store
            .get_audit(sequence)
            .await
            .map_err(store_status)?
        {
            Some(e) => Ok(Response::new(event_to_proto(&e))),
            None => Err(write_error_status(&WriteError::not_found(
                ResourceKind::AuditEvent,
                name,
                format!("the audit log has no event {sequence}"),
            ))),
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
            method: method_filter(&req.method)?,
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
        .map_err(|e| match e {
            RangeError::Store(e) => store_status(e),
            RangeError::Reversed { .. } => bad_request("end_sequence", e.to_string()),
            RangeError::PastEnd { last, .. } => status(
                Code::OutOfRange,
                "START_PAST_END",
                e.to_string(),
                [("last_sequence".to_owned(), last.to_string())],
            ),
        })?;
        let (first_bad_sequence, error) = v.first_bad.unwrap_or_default();
        Ok(Response::new(v1::VerifyAuditChainResponse {
            ok: first_bad_sequence == 0,
            verified_events: v.verified,
            first_bad_sequence,
            error,
            end_sequence: v.end,
            next_start_sequence: v.next_start,
        }))
    }
}

/// The full method name (`corsair.v1.PolicyService/UpdatePolicy`) an audit `method` filter
/// names: empty, a method's name alone, or its full name with or without a leading `/`. A
/// method the control plane does not serve is refused, listing those it does.
fn method_filter(given: &str) -> Result<String, Status> {
    if given.is_empty() {
        return Ok(String::new());
    }
    let wanted = given.trim_start_matches('/');
    let methods: Vec<String> = crate::auth::audited_methods().collect();
    methods
        .iter()
        .find(|full| {
            *full == wanted
                || full
                    .rsplit_once('/')
                    .is_some_and(|(_, method)| method == wanted)
        })
        .cloned()
        .ok_or_else(|| {
            bad_request(
                "method",
                format!(
                    "{given:?} is not a method the control plane serves; one of: {}",
                    methods.join(", ")
                ),
            )
        })
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
