//! `corsair.v1.OriginSetService`: reads, the audited writes (create, update, delete,
//! rollback) and revision history of origin sets.
//!
//! A set write is planned inside the store's transaction, with the policies that reference
//! the set: each referrer's effective policy is linted with the set as it is and as it would
//! be, and the write is refused if one would become invalid or gain a risk the write did not
//! acknowledge, naming the service and the finding.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use corsair_policy::{
    Code, Finding, OriginSetSpec, Rejected, Severity, blocking, lint_set, lint_with_sets,
};
use corsair_proto::names::{self, origin_set_name, parse_origin_set_name};
use corsair_proto::v1::{self, origin_set_service_server::OriginSetService};
use tonic::{Request, Response, Status};

use super::{Shared, paging};
use crate::convert::{finding_to_proto, set_revision_to_proto, stored_set_to_wire};
use crate::status::{bad_request, page_size, store_status, write_error_status};
use crate::store::origin_sets::SetView;
use crate::store::{ResourceKind, SetPlan, SetPlanner, StoredPolicy, StoredSet, WriteError};

const SERVICE: &str = "corsair.v1.OriginSetService";

/// Fields an update mask may name.
const MASK_FIELDS: [&str; 2] = ["description", "origins"];

/// The origin set service.
#[derive(Debug, Clone)]
pub struct OriginSets {
    shared: Shared,
}

/// What a write returns: the set after it, the revision it took, its referrers.
type WriteResult = (Option<StoredSet>, i64, Vec<String>);

impl OriginSets {
    /// An origin set service over `shared`.
    pub fn new(shared: Shared) -> Self {
        OriginSets { shared }
    }

    /// Runs one write: validate-only against the current state, or through the store.
    async fn write<T>(
        &self,
        request: &Request<T>,
        method: &str,
        name: &str,
        reason: &str,
        validate_only: bool,
        planner: SetPlanner,
    ) -> Result<WriteResult, Status> {
        let planner = match super::check_reason(reason) {
            Ok(()) => planner,
            Err(e) => refuse(e),
        };
        if validate_only {
            return self.validate_only(name, planner).await;
        }
        let ctx = self
            .shared
            .context(request, &format!("{SERVICE}/{method}"), "", reason);
        let written = self
            .shared
            .store
            .write_set(ctx, name, planner)
            .await
            .map_err(store_status)?;
        self.shared.published_event(&written.event);
        match written.result {
            Ok(()) => {
                tracing::info!(
                    origin_set = name,
                    method,
                    revision = written.event.revision,
                    affected = written.event.affected_services.len(),
                    "origin set changed"
                );
                Ok((written.set, written.event.revision, written.referrers))
            }
            Err(e) => {
                tracing::info!(origin_set = name, method, error = %e, "write refused");
                Err(write_error_status(&e))
            }
        }
    }

    /// Plans a write against the current state, changing nothing.
    async fn validate_only(&self, name: &str, planner: SetPlanner) -> Result<WriteResult, Status> {
        let store = &self.shared.store;
        let current = store.get_origin_set(name).await.map_err(store_status)?;
        let services = store.set_referrers(name).await.map_err(store_status)?;
        let mut referrers: Vec<StoredPolicy> = Vec::with_capacity(services.len());
        for service in &services {
            if let Some(p) = store.get_policy(service).await.map_err(store_status)? {
                referrers.push(p);
            }
        }
        let sets = store.resolved_sets().await.map_err(store_status)?;
        let plan = planner(SetView {
            current: current.as_ref(),
            referrers: &referrers,
            sets: &sets,
        });
        match plan {
            SetPlan::Put { spec, .. } => Ok((
                Some(StoredSet {
                    spec,
                    revision: 0,
                    create_time: 0,
                    update_time: 0,
                    update_actor: String::new(),
                }),
                0,
                services,
            )),
            SetPlan::Delete if !services.is_empty() => {
                Err(write_error_status(&in_use(name, &services)))
            }
            SetPlan::Delete => Ok((None, 0, services)),
            SetPlan::Refuse(e) => Err(write_error_status(&e)),
        }
    }
}

/// A planner that refuses with `error` whatever the state.
fn refuse(error: WriteError) -> SetPlanner {
    Box::new(move |_| SetPlan::Refuse(error))
}

fn in_use(name: &str, services: &[String]) -> WriteError {
    WriteError::SetInUse {
        name: origin_set_name(name),
        referrers: services.iter().map(|s| names::policy_name(s)).collect(),
    }
}

fn no_set(name: &str) -> WriteError {
    WriteError::not_found(
        ResourceKind::OriginSet,
        origin_set_name(name),
        format!("there is no origin set originSets/{name}"),
    )
}

/// Validates `spec`, and every referrer's effective policy with it: `Put` when nothing
/// blocks, recording the findings in `out`.
fn validated_put(
    spec: &OriginSetSpec,
    acknowledged: &[String],
    view: &SetView<'_>,
    out: &Mutex<Vec<Finding>>,
) -> SetPlan {
    let (set, mut findings) = lint_set(spec);
    let Some(set) = set else {
        let blocking = blocking(&findings, acknowledged);
        return SetPlan::Refuse(WriteError::InvalidSet(Box::new(Rejected {
            blocking,
            findings,
        })));
    };
    let now = |name: &str| view.sets.lookup(name);
    let next = |name: &str| {
        if name == set.name() {
            Some(set.clone())
        } else {
            view.sets.lookup(name)
        }
    };
    for referrer in view.referrers {
        let (_, before) = lint_with_sets(&referrer.spec, &now);
        let accepted: HashSet<Code> = before
            .iter()
            .filter(|f| f.severity == Severity::Risk)
            .map(|f| f.code)
            .collect();
        let resource = names::policy_name(&referrer.spec.service);
        let (_, after) = lint_with_sets(&referrer.spec, &next);
        findings.extend(
            after
                .into_iter()
                .filter(|f| match f.severity {
                    Severity::Error => true,
                    Severity::Risk => !accepted.contains(&f.code),
                    Severity::Notice => false,
                })
                .map(|f| Finding {
                    field: if f.field.is_empty() {
                        resource.clone()
                    } else {
                        format!("{resource}.{}", f.field)
                    },
                    ..f
                }),
        );
    }
    let blocking = blocking(&findings, acknowledged);
    if !blocking.is_empty() {
        return SetPlan::Refuse(WriteError::InvalidSet(Box::new(Rejected {
            blocking,
            findings,
        })));
    }
    *out.lock().expect("findings lock") = findings;
    SetPlan::Put {
        spec: set.spec().clone(),
        affected: view
            .referrers
            .iter()
            .map(|p| p.spec.service.clone())
            .collect(),
    }
}

/// Checks a caller's etag against the current set (see [`super::check_etag`]).
fn check_etag(
    current: &StoredSet,
    etag: &str,
    required: bool,
    field: &str,
) -> Result<(), WriteError> {
    super::check_etag(
        etag,
        required,
        field,
        (current.etag(), current.revision),
        "origin set",
        &format!("originSets/{}", current.spec.name),
    )
}

/// The wire set a read or write returns.
fn wire(set: &StoredSet, referrers: &[String], findings: &[Finding]) -> v1::OriginSet {
    let mut out = if set.revision == 0 {
        crate::convert::set_spec_to_proto(&set.spec)
    } else {
        stored_set_to_wire(set)
    };
    out.referrers = referrers.iter().map(|s| names::policy_name(s)).collect();
    out.findings = findings.iter().map(finding_to_proto).collect();
    out
}

/// The spec of a wire set, named by its resource name.
fn spec_from_wire(set: &v1::OriginSet) -> Result<OriginSetSpec, WriteError> {
    let name = parse_origin_set_name(&set.name)
        .map_err(|e| WriteError::bad_request("origin_set.name", e.to_string()))?;
    Ok(OriginSetSpec {
        name: name.to_owned(),
        description: set.description.clone(),
        origins: set.origins.clone(),
    })
}

fn written(
    result: WriteResult,
    findings: &Mutex<Vec<Finding>>,
) -> Result<Response<v1::OriginSet>, Status> {
    let (set, _, referrers) = result;
    let set = set.ok_or_else(|| {
        crate::status::status(
            tonic::Code::Internal,
            "WRITE_STORED_NO_SET",
            "the write stored no origin set",
            [],
        )
    })?;
    let findings = findings.lock().expect("findings lock");
    Ok(Response::new(wire(&set, &referrers, &findings)))
}

#[tonic::async_trait]
impl OriginSetService for OriginSets {
    async fn get_origin_set(
        &self,
        request: Request<v1::GetOriginSetRequest>,
    ) -> Result<Response<v1::OriginSet>, Status> {
        let name = parse_origin_set_name(&request.get_ref().name)
            .map_err(|e| bad_request("name", e.to_string()))?;
        let store = &self.shared.store;
        let set = store
            .get_origin_set(name)
            .await
            .map_err(store_status)?
            .ok_or_else(|| write_error_status(&no_set(name)))?;
        let referrers = store.set_referrers(name).await.map_err(store_status)?;
        let findings = lint_set(&set.spec).1;
        Ok(Response::new(wire(&set, &referrers, &findings)))
    }

    async fn list_origin_sets(
        &self,
        request: Request<v1::ListOriginSetsRequest>,
    ) -> Result<Response<v1::ListOriginSetsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let tokens = &self.shared.page_tokens;
        let after = tokens.decode(&req.page_token, "originSets", "")?;
        let store = &self.shared.store;
        let page =
            paging::read(
                limit,
                self.shared.pages.bytes,
                after,
                |after: Option<String>, n| async move {
                    store.list_origin_sets(after.as_deref(), n).await
                },
                stored_set_to_wire,
                |s| s.spec.name.clone(),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(v1::ListOriginSetsResponse {
            origin_sets: page.items,
            next_page_token: tokens.next("originSets", "", page.next.as_deref()),
        }))
    }

    async fn create_origin_set(
        &self,
        request: Request<v1::CreateOriginSetRequest>,
    ) -> Result<Response<v1::OriginSet>, Status> {
        let req = request.get_ref();
        let findings = Arc::new(Mutex::new(Vec::new()));
        let parsed = match req.origin_set.as_ref() {
            None => Err(WriteError::bad_request("origin_set", "required")),
            Some(set) => spec_from_wire(set),
        };
        let (name, planner): (String, SetPlanner) = match parsed {
            Err(e) => (String::new(), refuse(e)),
            Ok(spec) => {
                let acknowledged = req.acknowledged_risks.clone();
                let out = findings.clone();
                (
                    spec.name.clone(),
                    Box::new(move |view: SetView<'_>| match view.current {
                        Some(current) => SetPlan::Refuse(WriteError::AlreadyExists {
                            kind: ResourceKind::OriginSet,
                            name: origin_set_name(&current.spec.name),
                            message: format!(
                                "originSets/{} exists already (revision {}); update it instead",
                                current.spec.name, current.revision
                            ),
                        }),
                        None => validated_put(&spec, &acknowledged, &view, &out),
                    }),
                )
            }
        };
        let result = self
            .write(
                &request,
                "CreateOriginSet",
                &name,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written(result, &findings)
    }

    async fn update_origin_set(
        &self,
        request: Request<v1::UpdateOriginSetRequest>,
    ) -> Result<Response<v1::OriginSet>, Status> {
        let req = request.get_ref();
        let findings = Arc::new(Mutex::new(Vec::new()));
        let parsed = match req.origin_set.as_ref() {
            None => Err(WriteError::bad_request("origin_set", "required")),
            Some(set) => spec_from_wire(set).map(|spec| (spec, set.etag.clone())),
        }
        .and_then(|parsed| {
            super::mask_paths(req.update_mask.as_ref(), &MASK_FIELDS).map(|mask| (parsed, mask))
        });
        let (name, planner): (String, SetPlanner) = match parsed {
            Err(e) => (String::new(), refuse(e)),
            Ok(((spec, etag), mask)) => {
                let acknowledged = req.acknowledged_risks.clone();
                let allow_missing = req.allow_missing;
                let out = findings.clone();
                (
                    spec.name.clone(),
                    Box::new(move |view: SetView<'_>| {
                        let whole = mask.is_empty() || mask.iter().any(|p| p == "*");
                        let merged = |base: &OriginSetSpec| OriginSetSpec {
                            name: spec.name.clone(),
                            description: if whole || mask.iter().any(|p| p == "description") {
                                spec.description.clone()
                            } else {
                                base.description.clone()
                            },
                            origins: if whole || mask.iter().any(|p| p == "origins") {
                                spec.origins.clone()
                            } else {
                                base.origins.clone()
                            },
                        };
                        match view.current {
                            None if allow_missing => validated_put(
                                &merged(&OriginSetSpec::default()),
                                &acknowledged,
                                &view,
                                &out,
                            ),
                            None => SetPlan::Refuse(no_set(&spec.name)),
                            Some(current) => {
                                match check_etag(current, &etag, true, "origin_set.etag") {
                                    Err(e) => SetPlan::Refuse(e),
                                    Ok(()) => validated_put(
                                        &merged(&current.spec),
                                        &acknowledged,
                                        &view,
                                        &out,
                                    ),
                                }
                            }
                        }
                    }),
                )
            }
        };
        let result = self
            .write(
                &request,
                "UpdateOriginSet",
                &name,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written(result, &findings)
    }

    async fn delete_origin_set(
        &self,
        request: Request<v1::DeleteOriginSetRequest>,
    ) -> Result<Response<v1::DeleteOriginSetResponse>, Status> {
        let req = request.get_ref();
        let (name, planner): (String, SetPlanner) = match parse_origin_set_name(&req.name) {
            Err(e) => (
                String::new(),
                refuse(WriteError::bad_request("name", e.to_string())),
            ),
            Ok(name) => {
                let etag = req.etag.clone();
                let owned = name.to_owned();
                (
                    name.to_owned(),
                    Box::new(move |view: SetView<'_>| match view.current {
                        None => SetPlan::Refuse(no_set(&owned)),
                        Some(current) => match check_etag(current, &etag, false, "etag") {
                            Err(e) => SetPlan::Refuse(e),
                            Ok(()) => SetPlan::Delete,
                        },
                    }),
                )
            }
        };
        let (_, revision, _) = self
            .write(
                &request,
                "DeleteOriginSet",
                &name,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        Ok(Response::new(v1::DeleteOriginSetResponse { revision }))
    }

    async fn list_origin_set_revisions(
        &self,
        request: Request<v1::ListOriginSetRevisionsRequest>,
    ) -> Result<Response<v1::ListOriginSetRevisionsResponse>, Status> {
        let req = request.into_inner();
        let name =
            parse_origin_set_name(&req.name).map_err(|e| bad_request("name", e.to_string()))?;
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let tokens = &self.shared.page_tokens;
        let before = tokens
            .decode(&req.page_token, "setRevisions", name)?
            .map(|p| p.parse::<i64>())
            .transpose()
            .map_err(|_| bad_request("page_token", "not a page token of this listing"))?;
        let store = &self.shared.store;
        let page = paging::read(
            limit,
            self.shared.pages.bytes,
            before,
            |before: Option<i64>, n| async move { store.list_set_revisions(name, before, n).await },
            set_revision_to_proto,
            |r| r.revision,
        )
        .await
        .map_err(store_status)?;
        if before.is_none() && page.items.is_empty() {
            return Err(write_error_status(&no_set(name)));
        }
        Ok(Response::new(v1::ListOriginSetRevisionsResponse {
            revisions: page.items,
            next_page_token: tokens.next(
                "setRevisions",
                name,
                page.next.map(|r| r.to_string()).as_deref(),
            ),
        }))
    }

    async fn rollback_origin_set(
        &self,
        request: Request<v1::RollbackOriginSetRequest>,
    ) -> Result<Response<v1::OriginSet>, Status> {
        let req = request.get_ref();
        let name =
            parse_origin_set_name(&req.name).map_err(|e| bad_request("name", e.to_string()))?;
        let store = &self.shared.store;
        let target = store
            .get_set_revision(req.revision)
            .await
            .map_err(store_status)?
            .filter(|r| r.name == name)
            .ok_or_else(|| {
                write_error_status(&WriteError::not_found(
                    ResourceKind::OriginSetRevision,
                    names::origin_set_revision_name(name, req.revision),
                    format!("originSets/{name} has no revision {}", req.revision),
                ))
            })?;
        let Some(spec) = target.spec else {
            return Err(write_error_status(&WriteError::FailedPrecondition {
                reason: "REVISION_IS_DELETION",
                message: format!(
                    "revision {} deleted originSets/{name}; roll back to an earlier one",
                    req.revision
                ),
            }));
        };
        // Already in force: nothing to write.
        if let Some(current) = store.get_origin_set(name).await.map_err(store_status)?
            && current.spec == spec
            && check_etag(&current, &req.etag, false, "etag").is_ok()
        {
            let referrers = store.set_referrers(name).await.map_err(store_status)?;
            return Ok(Response::new(wire(&current, &referrers, &[])));
        }
        let findings = Arc::new(Mutex::new(Vec::new()));
        let (etag, acknowledged, out) = (
            req.etag.clone(),
            req.acknowledged_risks.clone(),
            findings.clone(),
        );
        let planner: SetPlanner = Box::new(move |view: SetView<'_>| {
            if let Some(current) = view.current
                && let Err(e) = check_etag(current, &etag, false, "etag")
            {
                return SetPlan::Refuse(e);
            }
            validated_put(&spec, &acknowledged, &view, &out)
        });
        let result = self
            .write(
                &request,
                "RollbackOriginSet",
                name,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written(result, &findings)
    }
}
