//! `corsair.v1.PolicyService`: reads, the audited writes (create, update, delete, rollback),
//! revision history and `ExplainRequest`.
//!
//! Each write builds a [`Plan`] from the service's current policy while the store holds it
//! locked: etag compare-and-set, field-mask merge and validation all happen there, so what is
//! checked is exactly what is committed. Refusals go through the store too, so they are
//! audited like changes.

use std::sync::{Arc, Mutex};

use corsair_policy::{
    CompiledPolicy, Finding, Policy, PolicySpec, Request as CorsRequest, Scheme, SetLookup,
    lint_with_sets,
};
use corsair_proto::v1::{self, policy_service_server::PolicyService};
use http::{HeaderMap, HeaderValue, Method};
use tonic::{Request, Response, Status};

use super::{Shared, paging};
use crate::convert::{
    self, finding_to_proto, parse_policy_name, policy_name, spec_from_proto, spec_to_proto,
    stored_to_proto, with_findings,
};
use crate::status::{bad_request, page_size, store_status, write_error_status};
use crate::store::{Plan, Planner, ResourceKind, StoredPolicy, WriteError};

const SERVICE: &str = "corsair.v1.PolicyService";

/// The policy service.
#[derive(Debug, Clone)]
pub struct Policies {
    shared: Shared,
}

impl Policies {
    /// A policy service over `shared`.
    pub fn new(shared: Shared) -> Self {
        Policies { shared }
    }

    /// Runs one write: validate-only against the current state, or through the store.
    /// `findings` is filled by the planner with the validated policy's findings.
    async fn write<T>(
        &self,
        request: &Request<T>,
        method: &str,
        service: &str,
        reason: &str,
        validate_only: bool,
        planner: Planner,
    ) -> Result<(Option<StoredPolicy>, i64), Status> {
        let planner = match super::check_reason(reason) {
            Ok(()) => planner,
            Err(e) => refuse(e),
        };
        if validate_only {
            let current = self
                .shared
                .store
                .get_policy(service)
                .await
                .map_err(store_status)?;
            let sets = self
                .shared
                .store
                .resolved_sets()
                .await
                .map_err(store_status)?;
            return match planner(current.as_ref(), &|name: &str| sets.lookup(name)) {
                Plan::Put(spec) => Ok((
                    Some(StoredPolicy {
                        spec,
                        revision: 0,
                        create_time: 0,
                        update_time: 0,
                        update_actor: String::new(),
                    }),
                    0,
                )),
                Plan::Delete => Ok((None, 0)),
                Plan::Refuse(e) => Err(write_error_status(&e)),
                Plan::PutToken { .. } | Plan::RevokeToken(_) => {
                    unreachable!("policy writes plan policy changes")
                }
            };
        }
        let ctx = self
            .shared
            .context(request, &format!("{SERVICE}/{method}"), service, reason);
        let written = self
            .shared
            .store
            .write(ctx, planner)
            .await
            .map_err(store_status)?;
        self.shared.published(&written);
        match &written.result {
            Ok(()) => {
                tracing::info!(
                    service,
                    method,
                    revision = written.event.revision,
                    sequence = written.event.sequence,
                    "policy changed"
                );
                Ok((written.policy, written.event.revision))
            }
            Err(e) => {
                tracing::info!(service, method, error = %e, sequence = written.event.sequence, "write refused");
                Err(write_error_status(e))
            }
        }
    }
}

impl Policies {
    /// The current policy of `service` if writing `spec` would change nothing, with the
    /// etag matching (or none given) and the spec passing validation as it is; `None` when
    /// the write must go ahead (and be checked and audited as usual).
    async fn unchanged_by(
        &self,
        service: &str,
        spec: &PolicySpec,
        etag: &str,
        acknowledged: &[String],
    ) -> Result<Option<StoredPolicy>, Status> {
        let Some(current) = self
            .shared
            .store
            .get_policy(service)
            .await
            .map_err(store_status)?
        else {
            return Ok(None);
        };
        let sets = self
            .shared
            .store
            .resolved_sets()
            .await
            .map_err(store_status)?;
        let unchanged = check_etag(&current, etag, false, "etag").is_ok()
            && Policy::check_with_sets(spec, acknowledged, &|name: &str| sets.lookup(name))
                .is_ok_and(|validated| validated.policy.into_spec() == current.spec);
        Ok(unchanged.then_some(current))
    }
}

/// A planner that refuses with `error` whatever the state.
fn refuse(error: WriteError) -> Planner {
    Box::new(move |_, _| Plan::Refuse(error))
}

/// Validates `spec` with its origin sets resolved: `Put` of the canonical spec, recording its
/// findings in `out`.
fn validated_put(
    spec: &PolicySpec,
    acknowledged: &[String],
    sets: SetLookup<'_>,
    out: &Mutex<Vec<Finding>>,
) -> Plan {
    match Policy::check_with_sets(spec, acknowledged, sets) {
        Ok(validated) => {
            *out.lock().expect("findings lock") = validated.findings;
            Plan::Put(validated.policy.into_spec())
        }
        Err(rejected) => Plan::Refuse(WriteError::Invalid(Box::new(rejected))),
    }
}

/// Checks a caller's etag against the current policy (see [`super::check_etag`]).
fn check_etag(
    current: &StoredPolicy,
    etag: &str,
    required: bool,
    field: &str,
) -> Result<(), WriteError> {
    super::check_etag(
        etag,
        required,
        field,
        (current.etag(), current.revision),
        "policy",
        &format!("the policy of {}", current.spec.service),
    )
}

/// A service that has no policy.
fn no_policy(service: &str, hint: &str) -> WriteError {
    WriteError::not_found(
        ResourceKind::Policy,
        policy_name(service),
        format!("service {service} has no policy{hint}"),
    )
}

/// Fields an update mask may name (wire names). `routes` is the whole list.
const MASK_FIELDS: [&str; 9] = [
    "allowed_origins",
    "allowed_methods",
    "allowed_headers",
    "exposed_headers",
    "allow_credentials",
    "max_age_seconds",
    "allow_private_network",
    "mode",
    "routes",
];

/// Applies the masked fields of `incoming` onto `base`. No mask, or `*`, replaces everything.
fn apply_mask(base: &PolicySpec, incoming: &PolicySpec, mask: &[String]) -> PolicySpec {
    if mask.is_empty() || mask.iter().any(|p| p == "*") {
        return incoming.clone();
    }
    let mut out = base.clone();
    for path in mask {
        match path.as_str() {
            "allowed_origins" => out.allowed_origins = incoming.allowed_origins.clone(),
            "allowed_methods" => out.allowed_methods = incoming.allowed_methods.clone(),
            "allowed_headers" => out.allowed_headers = incoming.allowed_headers.clone(),
            "exposed_headers" => out.exposed_headers = incoming.exposed_headers.clone(),
            "allow_credentials" => out.allow_credentials = incoming.allow_credentials,
            "max_age_seconds" => out.max_age = incoming.max_age,
            "allow_private_network" => out.allow_private_network = incoming.allow_private_network,
            "mode" => out.mode = incoming.mode,
            "routes" => out.routes = incoming.routes.clone(),
            _ => {}
        }
    }
    out
}

/// The policy a write returns: as stored (or as it would be, for validate-only), with the
/// write's findings.
fn written_policy(
    policy: Option<StoredPolicy>,
    findings: &Mutex<Vec<Finding>>,
) -> Result<Response<v1::Policy>, Status> {
    let policy = policy.ok_or_else(|| {
        crate::status::status(
            tonic::Code::Internal,
            "WRITE_STORED_NO_POLICY",
            "the write stored no policy",
            [],
        )
    })?;
    let wire = if policy.revision == 0 {
        spec_to_proto(&policy.spec)
    } else {
        stored_to_proto(&policy)
    };
    let findings = findings.lock().expect("findings lock");
    Ok(Response::new(with_findings(wire, &findings)))
}

#[tonic::async_trait]
impl PolicyService for Policies {
    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let req = request.get_ref();
        let service = parse_policy_name(&req.name).map_err(|e| write_error_status(&e))?;
        let Some(stored) = self
            .shared
            .store
            .get_policy(service)
            .await
            .map_err(store_status)?
        else {
            return Err(write_error_status(&no_policy(service, "")));
        };
        let mut wire = stored_to_proto(&stored);
        if req.view == v1::PolicyView::Effective as i32 {
            let sets = self
                .shared
                .store
                .resolved_sets()
                .await
                .map_err(store_status)?;
            let (policy, _) = lint_with_sets(&stored.spec, &|name: &str| sets.lookup(name));
            let policy = policy.ok_or_else(|| {
                crate::status::status(
                    tonic::Code::Internal,
                    "STORED_POLICY_INVALID",
                    "the stored policy no longer validates with its origin sets",
                    [],
                )
            })?;
            wire.effective_revision = policy
                .all_sets()
                .filter_map(|set| sets.revision(set.name()))
                .fold(stored.revision, i64::max);
            wire.effective_origins = policy
                .effective_origins()
                .into_iter()
                .map(|(origin, set)| v1::EffectiveOrigin {
                    origin: origin.to_owned(),
                    origin_set: set
                        .map(corsair_proto::names::origin_set_name)
                        .unwrap_or_default(),
                })
                .collect();
        }
        Ok(Response::new(wire))
    }

    async fn list_policies(
        &self,
        request: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let tokens = &self.shared.page_tokens;
        let prefix = req.service_prefix.as_str();
        let after = tokens.decode(&req.page_token, "policies", prefix)?;
        let store = &self.shared.store;
        let page = paging::read(
            limit,
            self.shared.pages.bytes,
            after,
            |after: Option<String>, n| async move {
                store.list_policies(prefix, after.as_deref(), n).await
            },
            stored_to_proto,
            |p| p.spec.service.clone(),
        )
        .await
        .map_err(store_status)?;
        Ok(Response::new(v1::ListPoliciesResponse {
            policies: page.items,
            next_page_token: tokens.next("policies", prefix, page.next.as_deref()),
        }))
    }

    async fn create_policy(
        &self,
        request: Request<v1::CreatePolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let req = request.get_ref();
        let findings = Arc::new(Mutex::new(Vec::new()));
        let (service, planner): (String, Planner) = match req.policy.as_ref().map(spec_from_proto) {
            None => (
                String::new(),
                refuse(WriteError::bad_request("policy", "required")),
            ),
            Some(Err(e)) => (
                req.policy
                    .as_ref()
                    .map(|p| p.service.clone())
                    .unwrap_or_default(),
                refuse(e),
            ),
            Some(Ok(spec)) => {
                let acknowledged = req.acknowledged_risks.clone();
                let out = findings.clone();
                let service = spec.service.clone();
                (
                    service,
                    Box::new(move |current: Option<&StoredPolicy>, sets: SetLookup<'_>| {
                        match current {
                            Some(p) => Plan::Refuse(WriteError::AlreadyExists {
                                kind: ResourceKind::Policy,
                                name: policy_name(&p.spec.service),
                                message: format!(
                                    "service {} already has a policy (revision {}); update it instead",
                                    p.spec.service, p.revision
                                ),
                            }),
                            None => validated_put(&spec, &acknowledged, sets, &out),
                        }
                    }),
                )
            }
        };
        let (policy, _) = self
            .write(
                &request,
                "CreatePolicy",
                &service,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written_policy(policy, &findings)
    }

    async fn update_policy(
        &self,
        request: Request<v1::UpdatePolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let req = request.get_ref();
        let findings = Arc::new(Mutex::new(Vec::new()));
        let parsed = match req.policy.as_ref() {
            None => Err(WriteError::bad_request("policy", "required")),
            Some(p) => spec_from_proto(p).map(|spec| (spec, p.etag.clone())),
        }
        .and_then(|parsed| {
            super::mask_paths(req.update_mask.as_ref(), &MASK_FIELDS).map(|mask| (parsed, mask))
        });
        let (service, planner): (String, Planner) = match parsed {
            Err(e) => (
                req.policy
                    .as_ref()
                    .map(|p| p.service.clone())
                    .unwrap_or_default(),
                refuse(e),
            ),
            Ok(((spec, etag), mask)) => {
                let acknowledged = req.acknowledged_risks.clone();
                let allow_missing = req.allow_missing;
                let out = findings.clone();
                let service = spec.service.clone();
                (
                    service,
                    Box::new(move |current: Option<&StoredPolicy>, sets: SetLookup<'_>| {
                        match current {
                            None if allow_missing => {
                                let base = PolicySpec {
                                    service: spec.service.clone(),
                                    ..PolicySpec::default()
                                };
                                validated_put(
                                    &apply_mask(&base, &spec, &mask),
                                    &acknowledged,
                                    sets,
                                    &out,
                                )
                            }
                            None => Plan::Refuse(no_policy(
                                &spec.service,
                                " (set allow_missing to create it)",
                            )),
                            Some(current) => {
                                match check_etag(current, &etag, true, "policy.etag") {
                                    Err(e) => Plan::Refuse(e),
                                    Ok(()) => validated_put(
                                        &apply_mask(&current.spec, &spec, &mask),
                                        &acknowledged,
                                        sets,
                                        &out,
                                    ),
                                }
                            }
                        }
                    }),
                )
            }
        };
        let (policy, _) = self
            .write(
                &request,
                "UpdatePolicy",
                &service,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written_policy(policy, &findings)
    }

    async fn delete_policy(
        &self,
        request: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        let req = request.get_ref();
        let (service, planner): (String, Planner) = match parse_policy_name(&req.name) {
            Err(e) => (req.name.clone(), refuse(e)),
            Ok(service) => {
                let etag = req.etag.clone();
                let service_name = service.to_owned();
                (
                    service.to_owned(),
                    Box::new(
                        move |current: Option<&StoredPolicy>, _sets: SetLookup<'_>| match current {
                            None => Plan::Refuse(no_policy(&service_name, "")),
                            Some(current) => match check_etag(current, &etag, false, "etag") {
                                Err(e) => Plan::Refuse(e),
                                Ok(()) => Plan::Delete,
                            },
                        },
                    ),
                )
            }
        };
        let (_, revision) = self
            .write(
                &request,
                "DeletePolicy",
                &service,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        Ok(Response::new(v1::DeletePolicyResponse { revision }))
    }

    async fn list_policy_revisions(
        &self,
        request: Request<v1::ListPolicyRevisionsRequest>,
    ) -> Result<Response<v1::ListPolicyRevisionsResponse>, Status> {
        let req = request.into_inner();
        let service = parse_policy_name(&req.name).map_err(|e| write_error_status(&e))?;
        let limit = page_size(
            req.page_size,
            self.shared.pages.default,
            self.shared.pages.max,
        )?;
        let tokens = &self.shared.page_tokens;
        let before = tokens
            .decode(&req.page_token, "revisions", service)?
            .map(|p| p.parse::<i64>())
            .transpose()
            .map_err(|_| bad_request("page_token", "not a page token of this listing"))?;
        let store = &self.shared.store;
        let page = paging::read(
            limit,
            self.shared.pages.bytes,
            before,
            |before: Option<i64>, n| async move { store.list_revisions(service, before, n).await },
            convert::revision_to_proto,
            |r| r.revision,
        )
        .await
        .map_err(store_status)?;
        if before.is_none() && page.items.is_empty() {
            return Err(write_error_status(&no_policy(
                service,
                " and never had one",
            )));
        }
        let next = page.next.map(|revision| revision.to_string());
        Ok(Response::new(v1::ListPolicyRevisionsResponse {
            revisions: page.items,
            next_page_token: tokens.next("revisions", service, next.as_deref()),
        }))
    }

    async fn rollback_policy(
        &self,
        request: Request<v1::RollbackPolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let req = request.get_ref();
        let findings = Arc::new(Mutex::new(Vec::new()));
        // Revisions never change once written, so the target is read before the write.
        let target = match parse_policy_name(&req.name) {
            Err(e) => Err(e),
            Ok(service) => match self
                .shared
                .store
                .get_revision(req.revision)
                .await
                .map_err(store_status)?
            {
                Some(r) if r.service == service => match r.spec {
                    Some(spec) => Ok(spec),
                    None => Err(WriteError::FailedPrecondition {
                        reason: "REVISION_IS_DELETION",
                        message: format!(
                            "revision {} deleted the policy; roll back to a revision that set one",
                            req.revision
                        ),
                    }),
                },
                _ => Err(WriteError::not_found(
                    ResourceKind::PolicyRevision,
                    corsair_proto::names::revision_name(service, req.revision),
                    format!("service {service} has no revision {}", req.revision),
                )),
            },
        };
        let service = parse_policy_name(&req.name).map_or_else(|_| req.name.clone(), str::to_owned);
        if let Ok(spec) = &target
            && let Some(current) = self
                .unchanged_by(&service, spec, &req.etag, &req.acknowledged_risks)
                .await?
        {
            return Ok(Response::new(stored_to_proto(&current)));
        }
        let planner: Planner = match target {
            Err(e) => refuse(e),
            Ok(spec) => {
                let (etag, acknowledged, out) = (
                    req.etag.clone(),
                    req.acknowledged_risks.clone(),
                    findings.clone(),
                );
                Box::new(move |current: Option<&StoredPolicy>, sets: SetLookup<'_>| {
                    if let Some(current) = current
                        && let Err(e) = check_etag(current, &etag, false, "etag")
                    {
                        return Plan::Refuse(e);
                    }
                    validated_put(&spec, &acknowledged, sets, &out)
                })
            }
        };
        let (policy, _) = self
            .write(
                &request,
                "RollbackPolicy",
                &service,
                &req.reason,
                req.validate_only,
                planner,
            )
            .await?;
        written_policy(policy, &findings)
    }

    async fn explain_request(
        &self,
        request: Request<v1::ExplainRequestRequest>,
    ) -> Result<Response<v1::ExplainResponse>, Status> {
        let req = request.into_inner();
        let sets = self
            .shared
            .store
            .resolved_sets()
            .await
            .map_err(store_status)?;
        let lookup = |name: &str| sets.lookup(name);
        let (policy, revision, findings) = match req.target {
            Some(v1::explain_request_request::Target::Name(name)) => {
                let service = parse_policy_name(&name).map_err(|e| write_error_status(&e))?;
                match self
                    .shared
                    .store
                    .get_policy(service)
                    .await
                    .map_err(store_status)?
                {
                    None => return Err(write_error_status(&no_policy(service, ""))),
                    Some(stored) => {
                        let (policy, findings) = lint_with_sets(&stored.spec, &lookup);
                        let policy = policy.ok_or_else(|| {
                            crate::status::status(
                                tonic::Code::Internal,
                                "STORED_POLICY_INVALID",
                                "the stored policy no longer validates",
                                [],
                            )
                        })?;
                        (policy, stored.revision, findings)
                    }
                }
            }
            Some(v1::explain_request_request::Target::Policy(p)) => {
                let mut spec = spec_from_proto(&p).map_err(|e| write_error_status(&e))?;
                if spec.service.is_empty() {
                    spec.service = "inline".into();
                }
                let (policy, findings) = lint_with_sets(&spec, &lookup);
                match policy {
                    Some(policy) => (policy, 0, findings),
                    None => {
                        let blocking = findings
                            .iter()
                            .filter(|f| f.severity == corsair_policy::Severity::Error)
                            .cloned()
                            .collect();
                        let rejected = corsair_policy::Rejected { blocking, findings };
                        return Err(crate::status::rejected_status(&rejected, "policy."));
                    }
                }
            }
            None => return Err(bad_request("target", "set service or policy")),
        };
        let explained = req
            .request
            .ok_or_else(|| bad_request("request", "required"))?;
        let engine = CompiledPolicy::new(policy);
        Ok(Response::new(explain(
            &engine, &explained, revision, &findings,
        )?))
    }
}

/// Runs `explained` through `engine` as a sidecar would and describes the result.
fn explain(
    engine: &CompiledPolicy,
    explained: &v1::ExplainedRequest,
    revision: i64,
    findings: &[Finding],
) -> Result<v1::ExplainResponse, Status> {
    let value = |field: &str, v: &str| {
        HeaderValue::from_str(v)
            .map_err(|_| bad_request(field, format!("{v:?} is not a valid header value")))
    };
    let mut headers = HeaderMap::new();
    if !explained.origin.is_empty() {
        headers.insert(
            http::header::ORIGIN,
            value("request.origin", &explained.origin)?,
        );
    }
    let requested_method = if explained.method.is_empty() {
        "GET"
    } else {
        &explained.method
    };
    let method = if explained.preflight {
        headers.insert(
            http::header::ACCESS_CONTROL_REQUEST_METHOD,
            value("request.method", requested_method)?,
        );
        if !explained.request_headers.is_empty() {
            headers.insert(
                http::header::ACCESS_CONTROL_REQUEST_HEADERS,
                value(
                    "request.request_headers",
                    &explained.request_headers.join(", "),
                )?,
            );
        }
        if explained.private_network {
            headers.insert(
                corsair_policy::headers::ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK,
                HeaderValue::from_static("true"),
            );
        }
        Method::OPTIONS
    } else {
        Method::from_bytes(requested_method.as_bytes()).map_err(|_| {
            bad_request(
                "request.method",
                format!("{requested_method:?} is not a method"),
            )
        })?
    };
    let scheme = match explained.scheme.as_str() {
        "https" => Scheme::Https,
        "" | "http" => Scheme::Http,
        other => {
            return Err(bad_request(
                "request.scheme",
                format!("{other:?}: expected http or https"),
            ));
        }
    };
    let authority = (!explained.host.is_empty()).then_some(explained.host.as_str());
    let cors_request = CorsRequest::new(&method, &headers)
        .with_own_origin(scheme, authority)
        .with_path(&explained.path);
    let decision = engine.decide(&cors_request);
    let mut reason = engine.describe(&cors_request, &decision);
    let spec = engine.policy().spec();
    let route = decision.route.map(|i| &spec.routes[i.get()]);

    let response_headers = decision
        .headers
        .as_ref()
        .map(|h| h.to_header_map())
        .unwrap_or_default();
    let mut allowed = decision.allowed;
    // A browser applies one more rule the server cannot see: a credentialed request needs
    // `Access-Control-Allow-Credentials: true` and an origin other than `*`.
    if explained.credentials
        && allowed
        && decision.kind != corsair_policy::Kind::SameOrigin
        && decision.kind != corsair_policy::Kind::NotCors
    {
        if !route
            .and_then(|r| r.allow_credentials)
            .unwrap_or(spec.allow_credentials)
        {
            allowed = false;
            reason.push_str("; but the request carries credentials and the policy does not allow them, so the browser blocks it");
        } else if response_headers
            .get(http::header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_some_and(|v| v == "*")
        {
            allowed = false;
            reason.push_str("; but a credentialed request cannot be answered with Access-Control-Allow-Origin: *");
        }
    }
    let (status, forwarded) = match decision.action {
        corsair_policy::Action::Forward => (0, true),
        corsair_policy::Action::Respond(s) => (i32::from(s.as_u16()), false),
    };
    Ok(v1::ExplainResponse {
        decision: match decision.kind {
            corsair_policy::Kind::NotCors => v1::Decision::NotCors,
            _ if allowed => v1::Decision::Allowed,
            _ => v1::Decision::Denied,
        } as i32,
        kind: match decision.kind {
            corsair_policy::Kind::NotCors => v1::RequestKind::NoOrigin,
            corsair_policy::Kind::SameOrigin => v1::RequestKind::SameOrigin,
            corsair_policy::Kind::Preflight => v1::RequestKind::Preflight,
            corsair_policy::Kind::Actual => v1::RequestKind::Actual,
        } as i32,
        reason,
        status,
        forwarded,
        headers: response_headers
            .iter()
            .map(|(name, value)| v1::Header {
                name: name.as_str().to_owned(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect(),
        revision,
        findings: findings.iter().map(finding_to_proto).collect(),
        route: route.map(|r| r.path.clone()).unwrap_or_default(),
    })
}
