//! The gRPC services, over the state they share ([`Shared`]): [`policy::Policies`],
//! [`audit::Audit`], [`discovery::Discovery`], [`fleet::FleetApi`] and [`token::Tokens`].

pub mod audit;
pub mod discovery;
pub mod fleet;
pub mod origin_set;
pub mod paging;
pub mod policy;
pub mod token;

use std::sync::Arc;

use tokio::sync::watch;
use tonic::Request;

use crate::store::{Store, WriteContext, Written};

/// Resolves once `shutdown` turns `true` (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Moves a latest-value channel to `value` if that is newer; only then are watchers woken.
fn raise<T: PartialOrd>(channel: &watch::Sender<T>, value: T) {
    channel.send_if_modified(|current| {
        let newer = value > *current;
        if newer {
            *current = value;
        }
        newer
    });
}

/// Listing sizes, for every List method.
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    /// Page size when the request leaves it at 0.
    pub default: u32,
    /// Largest page served; larger requests are served this many.
    pub max: u32,
    /// Bytes a page holds at most, about (see [`paging`]).
    pub bytes: usize,
}

impl Default for PageLimits {
    fn default() -> Self {
        PageLimits {
            default: 50,
            max: 1000,
            bytes: paging::PAGE_BYTES,
        }
    }
}

/// What every service shares.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The principal recorded as the actor of every call (until callers authenticate).
    pub identity: String,
    /// The newest audit sequence this process wrote; audit watchers wake on it.
    pub audit_head: watch::Sender<u64>,
    /// The newest revision this process committed; the policy cache wakes on it.
    pub revisions: watch::Sender<i64>,
    /// Turns `true` when the server shuts down; streams end on it.
    pub shutdown: watch::Receiver<bool>,
    /// Listing sizes.
    pub pages: PageLimits,
    /// Every task the server spawns; shutdown waits for them, so nothing outlives `serve`.
    pub tasks: tokio_util::task::TaskTracker,
    /// How many refused calls are written to the audit log (beyond: logged as a count).
    pub refusals: Arc<std::sync::Mutex<crate::auth::RefusalBudget>>,
    /// Makes and checks the page tokens of every listing.
    pub page_tokens: crate::page_token::PageTokens,
}

/// Refuses a write's `reason` longer than the audit log keeps.
/// The paths of an update mask, refused (`INVALID_UPDATE_MASK`) when one names a field that
/// is not in `fields` (`*` stands for all of them).
pub(crate) fn mask_paths(
    mask: Option<&prost_types::FieldMask>,
    fields: &[&str],
) -> Result<Vec<String>, crate::store::WriteError> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    match paths
        .iter()
        .find(|p| *p != "*" && !fields.contains(&p.as_str()))
    {
        Some(unknown) => Err(crate::store::WriteError::bad_request(
            "update_mask",
            format!(
                "unknown field {unknown:?}; updatable fields: {}",
                fields.join(", ")
            ),
        )),
        None => Ok(paths),
    }
}

/// Checks a caller's etag against a resource's current one (`current_etag`, at
/// `current_revision`), with or without the double quotes around it (AIP-154 etags are
/// quoted strings, and clients send them either way). Empty means "no condition" unless
/// `required`. `noun` names the kind of resource in the hint, `what` the resource itself.
pub(crate) fn check_etag(
    etag: &str,
    required: bool,
    field: &str,
    (current_etag, current_revision): (String, i64),
    noun: &str,
    what: &str,
) -> Result<(), crate::store::WriteError> {
    if etag.is_empty() {
        if required {
            return Err(crate::store::WriteError::bad_request(
                field,
                format!("required: pass the etag of the {noun} being changed (compare-and-set)"),
            ));
        }
        return Ok(());
    }
    let unquoted = |e: &str| {
        e.strip_prefix('"')
            .and_then(|e| e.strip_suffix('"'))
            .unwrap_or(e)
            .to_owned()
    };
    if unquoted(etag) != unquoted(&current_etag) {
        return Err(crate::store::WriteError::Conflict {
            message: format!(
                "etag {etag} is stale: {what} is now at revision {current_revision} (etag {current_etag}); read it again and retry"
            ),
            current_etag,
            current_revision,
        });
    }
    Ok(())
}

pub(crate) fn check_reason(reason: &str) -> Result<(), crate::store::WriteError> {
    use crate::store::caps::REASON;
    if reason.len() > REASON {
        return Err(crate::store::WriteError::bad_request(
            "reason",
            format!("{} bytes; at most {REASON}", reason.len()),
        ));
    }
    Ok(())
}

/// The caller's `x-request-id`, or a new one.
pub(crate) fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// The principal the auth layer attached to a call.
pub(crate) fn principal<T>(request: &Request<T>) -> Option<&crate::auth::Principal> {
    request.extensions().get::<crate::auth::Principal>()
}

impl Shared {
    /// Publishes a write's audit event and revision to watchers in this process.
    pub(crate) fn published(&self, written: &Written) {
        self.published_event(&written.event);
    }

    /// Publishes an audit event, and the revision it took if any, to watchers in this
    /// process.
    pub(crate) fn published_event(&self, event: &crate::store::AuditEvent) {
        if event.revision > 0 {
            raise(&self.revisions, event.revision);
        }
        raise(&self.audit_head, event.sequence);
    }

    /// The audit context of a call: actor, method, request id and peer.
    pub(crate) fn context<T>(
        &self,
        request: &Request<T>,
        method: &str,
        service: &str,
        reason: &str,
    ) -> WriteContext {
        let request_id = request_id(request.metadata().as_ref());
        WriteContext {
            actor: principal(request).map_or_else(|| self.identity.clone(), |p| p.name.clone()),
            method: method.to_owned(),
            service: service.to_owned(),
            reason: reason.to_owned(),
            request_id,
            peer: request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }
    }
}
