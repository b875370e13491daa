//! `corsairctl policy …`: read, write, compare and explain policies; and `apply` and `diff`,
//! which take origin sets from the same files (see [`crate::origin_set`]) and write them
//! before the policies that may use them.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;

use corsair_policy::{OriginSetSpec, PolicySpec, SET_PREFIX, Severity, lint_set, lint_with_sets};
use corsair_proto::convert::policy_name;
use corsair_proto::names::{origin_set_name, parse_origin_set_name};
use corsair_proto::v1;
use serde::Serialize;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::client::Client;
use crate::doc::{self, OriginSetDoc, PolicyDoc, Sourced};
use crate::error::CliError;
use crate::origin_set;
use crate::output::{self, Format, Table};

/// Page size used when a command reads every page.
const PAGE: i32 = 200;

/// `policy get SERVICE [--effective]`. Effective: with every allowed origin the policy's
/// sets resolve to, each with the set it came from.
pub async fn get(
    client: &Client,
    service: &str,
    effective: bool,
    format: Format,
) -> Result<(), CliError> {
    let name = policy_name(service);
    let view = if effective {
        v1::PolicyView::Effective
    } else {
        v1::PolicyView::Basic
    };
    let policy = client
        .call(
            &name,
            client
                .policies()
                .get_policy(client.request(v1::GetPolicyRequest {
                    name: name.clone(),
                    view: view as i32,
                })),
        )
        .await?;
    let doc = PolicyDoc::from_proto(&policy)?;
    if effective {
        return output::emit(format, &doc, || effective_table(&doc));
    }
    output::emit(format, &doc, || policy_table(std::slice::from_ref(&doc)))
}

/// `ORIGIN  FROM`: each origin in force, from the policy itself or from `set:NAME`.
fn effective_table(doc: &PolicyDoc) -> Table {
    let mut t = Table::new(&["ORIGIN", "FROM"]);
    for o in &doc.effective_origins {
        let from = if o.origin_set.is_empty() {
            "policy".to_owned()
        } else {
            let set = parse_origin_set_name(&o.origin_set).unwrap_or(&o.origin_set);
            format!("{SET_PREFIX}{set}")
        };
        t.row(vec![o.origin.clone(), from]);
    }
    t
}

/// `policy list [--prefix P]`.
pub async fn list(client: &Client, prefix: &str, format: Format) -> Result<(), CliError> {
    let mut docs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .call(
                "listing policies",
                client
                    .policies()
                    .list_policies(client.request(v1::ListPoliciesRequest {
                        page_size: PAGE,
                        page_token,
                        service_prefix: prefix.to_owned(),
                    })),
            )
            .await?;
        for p in &page.policies {
            docs.push(PolicyDoc::from_proto(p)?);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    output::emit(format, &docs, || policy_table(&docs))
}

fn policy_table(docs: &[PolicyDoc]) -> Table {
    let mut t = Table::new(&[
        "SERVICE",
        "MODE",
        "ORIGINS",
        "CREDENTIALS",
        "ROUTES",
        "REVISION",
        "UPDATED",
        "BY",
    ]);
    for d in docs {
        t.row(vec![
            d.service.clone(),
            format!("{:?}", d.mode).to_lowercase(),
            output::list(&d.allowed_origins, 60),
            if d.allow_credentials { "yes" } else { "no" }.into(),
            d.routes.len().to_string(),
            d.revision.map_or_else(|| "-".into(), |r| r.to_string()),
            d.update_time.clone().unwrap_or_else(|| "-".into()),
            d.update_actor.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

/// What a write command was asked to record and accept.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Why: recorded in the history and the audit log.
    pub reason: String,
    /// Risk codes accepted.
    pub acknowledge: Vec<String>,
    /// Check on the server, change nothing.
    pub dry_run: bool,
}

/// What `delete` and `rollback` print with `-o json|yaml`.
#[derive(Debug, Serialize)]
struct Written {
    service: String,
    action: &'static str,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    findings: Vec<FindingView>,
}

impl Written {
    /// Prints the result: as JSON or YAML, or as `line` after the findings (on stderr).
    fn report(&self, format: Format, line: impl FnOnce() -> String) -> Result<(), CliError> {
        if format != Format::Table {
            return output::emit(format, self, Table::default);
        }
        for finding in &self.findings {
            eprintln!("{}: {}", policy_name(&self.service), finding.line(true));
        }
        output::print(&format!("{}\n", line()))
    }
}

/// `policy delete SERVICE`.
pub async fn delete(
    client: &Client,
    service: &str,
    etag: Option<String>,
    opts: &WriteOptions,
    format: Format,
) -> Result<(), CliError> {
    let name = policy_name(service);
    let resp = client
        .call(
            &name,
            client
                .policies()
                .delete_policy(client.request(v1::DeletePolicyRequest {
                    name: name.clone(),
                    etag: etag.unwrap_or_default(),
                    validate_only: opts.dry_run,
                    reason: opts.reason.clone(),
                })),
        )
        .await?;
    let result = Written {
        service: service.to_owned(),
        action: "deleted",
        dry_run: opts.dry_run,
        revision: (!opts.dry_run).then_some(resp.revision),
        findings: Vec::new(),
    };
    result.report(format, || {
        if opts.dry_run {
            format!("{name} would be deleted (dry run)")
        } else {
            format!("{name} deleted (revision {})", resp.revision)
        }
    })
}

/// `policy rollback SERVICE --to REVISION`.
pub async fn rollback(
    client: &Client,
    service: &str,
    revision: i64,
    etag: Option<String>,
    opts: &WriteOptions,
    format: Format,
) -> Result<(), CliError> {
    let name = policy_name(service);
    let resp = client
        .call(
            &name,
            client
                .policies()
                .rollback_policy(client.request(v1::RollbackPolicyRequest {
                    name: name.clone(),
                    revision,
                    etag: etag.unwrap_or_default(),
                    validate_only: opts.dry_run,
                    reason: opts.reason.clone(),
                    acknowledged_risks: opts.acknowledge.clone(),
                })),
        )
        .await?;
    let result = Written {
        service: service.to_owned(),
        action: "rolled back",
        dry_run: opts.dry_run,
        revision: (!opts.dry_run).then_some(resp.revision),
        findings: resp.findings.iter().map(FindingView::from_proto).collect(),
    };
    result.report(format, || {
        if opts.dry_run {
            format!("{name} would be rolled back to revision {revision} (dry run)")
        } else {
            format!(
                "{name} rolled back to revision {revision} (now at revision {})",
                resp.revision
            )
        }
    })
}

/// One revision as `policy history` prints it: the API's `PolicyRevision` (its time as
/// `create_time`), and what it changed.
#[derive(Debug, Serialize)]
struct RevisionView {
    revision: i64,
    create_time: String,
    actor: String,
    reason: String,
    deleted: bool,
    audit_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyDoc>,
    change: String,
}

/// `policy history SERVICE`: newest first, each with what it changed.
pub async fn history(
    client: &Client,
    service: &str,
    limit: usize,
    format: Format,
) -> Result<(), CliError> {
    let name = policy_name(service);
    // One more than shown, to say what the oldest shown revision changed.
    let mut revisions = Vec::new();
    let mut page_token = String::new();
    while revisions.len() <= limit {
        let page = client
            .call(
                &name,
                client.policies().list_policy_revisions(client.request(
                    v1::ListPolicyRevisionsRequest {
                        name: name.clone(),
                        page_size: PAGE,
                        page_token,
                    },
                )),
            )
            .await?;
        revisions.extend(page.revisions);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let specs: Vec<Option<PolicySpec>> = revisions
        .iter()
        .map(|r| r.policy.as_ref().and_then(|p| PolicySpec::try_from(p).ok()))
        .collect();
    let mut views = Vec::new();
    for (i, r) in revisions.iter().enumerate().take(limit) {
        let older = specs.get(i + 1);
        let change = match (&specs[i], older) {
            _ if r.deleted => "deleted".to_owned(),
            (Some(_), None) => "created".to_owned(),
            (Some(_), Some(None)) => "recreated".to_owned(),
            (Some(new), Some(Some(old))) => {
                let fields = changed_fields(old, new);
                if fields.is_empty() {
                    "no change".to_owned()
                } else {
                    fields.join(",")
                }
            }
            (None, _) => "-".to_owned(),
        };
        views.push(RevisionView {
            revision: r.revision,
            create_time: output::timestamp_or_dash(r.create_time.as_ref()),
            actor: r.actor.clone(),
            reason: r.reason.clone(),
            deleted: r.deleted,
            audit_sequence: r.audit_sequence,
            policy: r.policy.as_ref().map(PolicyDoc::from_proto).transpose()?,
            change,
        });
    }
    output::emit(format, &views, || {
        let mut t = Table::new(&["REVISION", "TIME", "BY", "CHANGE", "REASON"]);
        for v in &views {
            t.row(vec![
                v.revision.to_string(),
                v.create_time.clone(),
                v.actor.clone(),
                v.change.clone(),
                v.reason.clone(),
            ]);
        }
        t
    })
}

/// The top-level fields that differ between two specs, in the order of the format.
pub fn changed_fields(a: &PolicySpec, b: &PolicySpec) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut check = |differs: bool, name| {
        if differs {
            fields.push(name);
        }
    };
    check(a.allowed_origins != b.allowed_origins, "allowed_origins");
    check(a.allowed_methods != b.allowed_methods, "allowed_methods");
    check(a.allowed_headers != b.allowed_headers, "allowed_headers");
    check(a.exposed_headers != b.exposed_headers, "exposed_headers");
    check(
        a.allow_credentials != b.allow_credentials,
        "allow_credentials",
    );
    check(a.max_age != b.max_age, "max_age");
    check(
        a.allow_private_network != b.allow_private_network,
        "allow_private_network",
    );
    check(a.mode != b.mode, "mode");
    check(a.routes != b.routes, "routes");
    fields
}

/// What applying one document would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Create,
    Update(Vec<&'static str>),
    Unchanged,
}

/// Origin sets that a dry run or a diff would write but has not, as the server would store
/// them, by name. The server checks a policy against the stored sets only, so a policy that
/// references one of these is checked here instead (see [`check_here`]).
pub(crate) type PendingSets = BTreeMap<String, OriginSetSpec>;

/// One document checked against the server.
#[derive(Debug)]
pub(crate) struct Planned {
    pub(crate) name: String,
    /// The policy as sent (the document's fields, the etag to compare against).
    wire: v1::Policy,
    /// The stored policy, if any.
    pub(crate) current: Option<PolicySpec>,
    current_revision: i64,
    /// The policy as the server would store it.
    pub(crate) proposed: PolicySpec,
    findings: Vec<FindingView>,
    pub(crate) change: Change,
}

impl Planned {
    /// Whether applying makes the policy reference the set `name`, which it does not now.
    pub(crate) fn newly_references(&self, name: &str) -> bool {
        let reference = format!("{SET_PREFIX}{name}");
        let has = |spec: &PolicySpec| spec.allowed_origins.contains(&reference);
        has(&self.proposed) && !self.current.as_ref().is_some_and(has)
    }
}

/// Reads the stored policy and has the server validate the document against it
/// (`validate_only`: nothing is stored or audited), so that normalization, validation and
/// the etag check are exactly the server's; or, when it references a set in `pending`,
/// checks it here against that set as it would be.
async fn plan(
    client: &Client,
    sourced: &Sourced,
    acknowledge: &[String],
    pending: &PendingSets,
) -> Result<Planned, CliError> {
    let doc = &sourced.doc;
    let name = policy_name(&doc.service);
    let context = format!("{}: {name}", sourced.source);
    let current = match client
        .call(
            &context,
            client
                .policies()
                .get_policy(client.request(v1::GetPolicyRequest {
                    name: name.clone(),
                    ..Default::default()
                })),
        )
        .await
    {
        Ok(p) => Some(p),
        Err(e) if e.code() == Some(Code::NotFound) => None,
        Err(e) => return Err(e),
    };
    let current_spec = current
        .as_ref()
        .map(PolicySpec::try_from)
        .transpose()
        .map_err(|e| CliError::Protocol(format!("{context}: {e}")))?;
    let mut wire = v1::Policy::from(&doc.spec());
    match (&current, &doc.etag) {
        (None, Some(etag)) => {
            return Err(CliError::Input(format!(
                "{context}: the file expects etag {etag}, but the policy no longer exists; \
                 remove the etag to create it again"
            )));
        }
        (None, None) => {}
        (Some(stored), etag) => {
            wire.etag = etag.clone().unwrap_or_else(|| stored.etag.clone());
        }
    }
    let pending_reference = doc
        .allowed_origins
        .iter()
        .filter_map(|o| o.strip_prefix(SET_PREFIX))
        .any(|set| pending.contains_key(set));
    let checked = if pending_reference {
        check_here(
            client,
            &context,
            &wire,
            current.as_ref(),
            acknowledge,
            pending,
        )
        .await
    } else {
        check_on_server(client, &context, &wire, current.is_some(), acknowledge).await
    };
    let current_revision = current.as_ref().map_or(0, |c| c.revision);
    let (proposed, findings) = match checked {
        // A risk acknowledged when the policy was stored need not be acknowledged again to
        // find that nothing changes.
        Err(e) if e.is_unacknowledged_risk() && unchanged(&doc.spec(), current_spec.as_ref()) => {
            return Ok(Planned {
                name,
                wire,
                proposed: current_spec.clone().expect("a stored spec"),
                current: current_spec,
                current_revision,
                findings: Vec::new(),
                change: Change::Unchanged,
            });
        }
        checked => checked?,
    };
    let change = match &current_spec {
        None => Change::Create,
        Some(c) => {
            let fields = changed_fields(c, &proposed);
            if fields.is_empty() {
                Change::Unchanged
            } else {
                Change::Update(fields)
            }
        }
    };
    Ok(Planned {
        name,
        wire,
        current: current_spec,
        current_revision,
        proposed,
        findings,
        change,
    })
}

/// The server's check of a write (`validate_only`): the policy as it would store it, and
/// the findings.
async fn check_on_server(
    client: &Client,
    context: &str,
    wire: &v1::Policy,
    exists: bool,
    acknowledge: &[String],
) -> Result<(PolicySpec, Vec<FindingView>), CliError> {
    let response = if exists {
        client
            .call(
                context,
                client
                    .policies()
                    .update_policy(client.request(v1::UpdatePolicyRequest {
                        policy: Some(wire.clone()),
                        validate_only: true,
                        acknowledged_risks: acknowledge.to_vec(),
                        ..Default::default()
                    })),
            )
            .await?
    } else {
        client
            .call(
                context,
                client
                    .policies()
                    .create_policy(client.request(v1::CreatePolicyRequest {
                        policy: Some(wire.clone()),
                        validate_only: true,
                        reason: String::new(),
                        acknowledged_risks: acknowledge.to_vec(),
                    })),
            )
            .await?
    };
    let proposed = PolicySpec::try_from(&response)
        .map_err(|e| CliError::Protocol(format!("{context}: {e}")))?;
    let findings = response
        .findings
        .iter()
        .map(FindingView::from_proto)
        .collect();
    Ok((proposed, findings))
}

/// The server's check, done here for a policy that references a set this run would write
/// but has not (a dry run, a diff): the same lint the server runs, against the pending sets
/// as they would be stored and the other sets as they are, and the same etag comparison.
async fn check_here(
    client: &Client,
    context: &str,
    wire: &v1::Policy,
    current: Option<&v1::Policy>,
    acknowledge: &[String],
    pending: &PendingSets,
) -> Result<(PolicySpec, Vec<FindingView>), CliError> {
    let context = format!("{context} (checked here, with the origin sets these files would write)");
    if let Some(stored) = current
        && wire.etag.trim_matches('"') != stored.etag.trim_matches('"')
    {
        let stale = format!(
            "etag {} is stale: {} is now at revision {} (etag {})",
            wire.etag, stored.name, stored.revision, stored.etag
        );
        return Err(CliError::status(context, Status::aborted(stale)));
    }
    let spec =
        PolicySpec::try_from(wire).map_err(|e| CliError::Protocol(format!("{context}: {e}")))?;
    let mut sets = BTreeMap::new();
    for set in spec
        .allowed_origins
        .iter()
        .filter_map(|o| o.strip_prefix(SET_PREFIX))
    {
        let fetched;
        let set_spec = match pending.get(set) {
            Some(spec) => Some(spec),
            None => {
                fetched = origin_set::stored_spec(client, &context, set).await?;
                fetched.as_ref()
            }
        };
        // A set that does not exist (or a name that cannot be one) is left out, and the lint
        // names the reference.
        if let Some((Some(compiled), _)) = set_spec.map(lint_set) {
            sets.insert(set.to_owned(), compiled);
        }
    }
    let (policy, findings) = lint_with_sets(&spec, &|name| sets.get(name).cloned());
    let blocking = corsair_policy::blocking(&findings, acknowledge);
    let Some(policy) = policy.filter(|_| blocking.is_empty()) else {
        return Err(refused(context, &blocking));
    };
    let findings = findings.iter().map(FindingView::from_finding).collect();
    Ok((policy.into_spec(), findings))
}

/// A refusal found here, in the form the server gives its own: one field violation per
/// blocking finding, and whether only risks refused it.
fn refused(context: String, blocking: &[corsair_policy::Finding]) -> CliError {
    let violations = blocking
        .iter()
        .map(|f| {
            let field = if f.field.is_empty() {
                "policy".to_owned()
            } else {
                format!("policy.{}", f.field)
            };
            let mut violation = FieldViolation::new(field, f.message.clone());
            violation.reason = f.code.as_str().to_owned();
            violation
        })
        .collect::<Vec<_>>();
    let only_risks = blocking.iter().all(|f| f.severity == Severity::Risk);
    let mut details = ErrorDetails::with_bad_request(violations);
    let reason = if only_risks {
        "RISK_NOT_ACKNOWLEDGED"
    } else {
        "INVALID_POLICY"
    };
    details.set_error_info(reason, "corsair.dev", HashMap::new());
    let status = Status::with_error_details(Code::InvalidArgument, "refused", details);
    CliError::status(context, status)
}

/// Whether `desired`, canonicalized as the server would store it, equals `stored`.
fn unchanged(desired: &PolicySpec, stored: Option<&PolicySpec>) -> bool {
    let Some(stored) = stored else {
        return false;
    };
    // The canonical form of a policy does not depend on what its sets hold: an empty set of
    // each name will do.
    let any_set = |name: &str| {
        lint_set(&OriginSetSpec {
            name: name.to_owned(),
            ..OriginSetSpec::default()
        })
        .0
    };
    let (Some(policy), _) = lint_with_sets(desired, &any_set) else {
        return false;
    };
    changed_fields(stored, &policy.into_spec()).is_empty()
}

/// One document's outcome, as `apply -o json|yaml` prints it.
#[derive(Debug, Serialize)]
pub(crate) struct Applied {
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_set: Option<String>,
    source: String,
    /// `created`, `updated`, `unchanged`, or `failed`.
    pub(crate) action: &'static str,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) revision: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) changed_fields: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) findings: Vec<FindingView>,
    /// For an origin set: the services whose effective policy the write changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) affected_services: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Applied {
    /// A policy document not yet applied.
    fn policy(sourced: &Sourced, dry_run: bool) -> Self {
        Applied {
            service: Some(sourced.doc.service.clone()),
            origin_set: None,
            ..Applied::blank(&sourced.source, dry_run)
        }
    }

    /// An origin set document not yet applied.
    pub(crate) fn origin_set(sourced: &Sourced<OriginSetDoc>, dry_run: bool) -> Self {
        Applied {
            service: None,
            origin_set: Some(sourced.doc.name.clone()),
            ..Applied::blank(&sourced.source, dry_run)
        }
    }

    fn blank(source: &str, dry_run: bool) -> Self {
        Applied {
            service: None,
            origin_set: None,
            source: source.to_owned(),
            action: "unchanged",
            dry_run,
            revision: None,
            changed_fields: Vec::new(),
            findings: Vec::new(),
            affected_services: Vec::new(),
            error: None,
        }
    }

    fn failed(self, error: &CliError) -> Self {
        Applied {
            action: "failed",
            revision: None,
            changed_fields: Vec::new(),
            findings: Vec::new(),
            affected_services: Vec::new(),
            error: Some(error.to_string()),
            ..self
        }
    }

    /// The resource name: `services/{service}/policy` or `originSets/{set}`.
    fn resource(&self) -> String {
        match (&self.service, &self.origin_set) {
            (Some(service), _) => policy_name(service),
            (None, Some(set)) => origin_set_name(set),
            (None, None) => String::new(),
        }
    }
}

/// Runs `attempt` again, backing off, while the server says the caller writes faster than
/// its per-identity rate (`RESOURCE_EXHAUSTED`); applying is idempotent, as every attempt
/// plans anew.
async fn retrying<T, F>(mut attempt: impl FnMut() -> F) -> Result<T, CliError>
where
    F: Future<Output = Result<T, CliError>>,
{
    let mut result = attempt().await;
    let mut tries = 0u32;
    while tries < 8 && matches!(&result, Err(e) if e.code() == Some(Code::ResourceExhausted)) {
        tokio::time::sleep(std::time::Duration::from_millis(250 << tries.min(3))).await;
        tries += 1;
        result = attempt().await;
    }
    result
}

/// `policy apply -f …`: creates or updates every origin set and then every policy in the
/// inputs, compare-and-set on the etag; documents that would not change are not written.
/// Sets go first, so that a policy can use a set the same files add or change. Returns
/// whether all succeeded.
pub async fn apply(
    client: &Client,
    inputs: &[PathBuf],
    opts: &WriteOptions,
    format: Format,
) -> Result<bool, CliError> {
    let docs = doc::load(inputs)?;
    let mut results = Vec::new();
    // In a dry run, the sets that would change, for the policies to be checked against.
    let mut pending = PendingSets::new();
    for sourced in &docs.origin_sets {
        let applied = match retrying(|| origin_set::apply_one(client, sourced, opts)).await {
            Ok((applied, proposed)) => {
                if opts.dry_run && applied.action != "unchanged" {
                    pending.insert(proposed.name.clone(), proposed);
                }
                applied
            }
            Err(e) => Applied::origin_set(sourced, opts.dry_run).failed(&e),
        };
        if format == Format::Table {
            report(&applied)?;
        }
        results.push(applied);
    }
    for sourced in &docs.policies {
        let applied = match retrying(|| apply_one(client, sourced, opts, &pending)).await {
            Ok(applied) => applied,
            Err(e) => Applied::policy(sourced, opts.dry_run).failed(&e),
        };
        if format == Format::Table {
            report(&applied)?;
        }
        results.push(applied);
    }
    match format {
        Format::Table => {}
        Format::Json => output::print(&(output::json(&results)? + "\n"))?,
        Format::Yaml => output::print(&output::yaml(&results)?)?,
    }
    Ok(results.iter().all(|r| r.error.is_none()))
}

async fn apply_one(
    client: &Client,
    sourced: &Sourced,
    opts: &WriteOptions,
    pending: &PendingSets,
) -> Result<Applied, CliError> {
    let planned = plan(client, sourced, &opts.acknowledge, pending).await?;
    let mut applied = Applied {
        revision: Some(planned.current_revision).filter(|r| *r != 0),
        findings: planned.findings,
        ..Applied::policy(sourced, opts.dry_run)
    };
    let context = format!("{}: {}", sourced.source, planned.name);
    match planned.change {
        Change::Unchanged => {}
        Change::Create => {
            applied.action = "created";
            if !opts.dry_run {
                let resp = client
                    .call(
                        &context,
                        client
                            .policies()
                            .create_policy(client.request(v1::CreatePolicyRequest {
                                policy: Some(planned.wire),
                                validate_only: false,
                                reason: opts.reason.clone(),
                                acknowledged_risks: opts.acknowledge.clone(),
                            })),
                    )
                    .await?;
                applied.revision = Some(resp.revision);
            }
        }
        Change::Update(fields) => {
            applied.action = "updated";
            applied.changed_fields = fields;
            if !opts.dry_run {
                let resp = client
                    .call(
                        &context,
                        client
                            .policies()
                            .update_policy(client.request(v1::UpdatePolicyRequest {
                                policy: Some(planned.wire),
                                reason: opts.reason.clone(),
                                acknowledged_risks: opts.acknowledge.clone(),
                                ..Default::default()
                            })),
                    )
                    .await?;
                applied.revision = Some(resp.revision);
            }
        }
    }
    Ok(applied)
}

fn report(a: &Applied) -> Result<(), CliError> {
    let name = a.resource();
    if let Some(error) = &a.error {
        eprintln!("error: {error}");
        return Ok(());
    }
    let mut line = match (a.action, a.dry_run) {
        ("unchanged", _) => format!("{name} unchanged"),
        (action, true) => format!("{name} would be {action} (dry run)"),
        (action, false) => format!(
            "{name} {action} (revision {})",
            a.revision.unwrap_or_default()
        ),
    };
    if !a.changed_fields.is_empty() {
        line.push_str(": ");
        line.push_str(&a.changed_fields.join(", "));
    }
    line.push('\n');
    if !a.affected_services.is_empty() {
        let verb = if a.dry_run { "would change" } else { "changes" };
        line.push_str(&format!(
            "  {verb} the effective policy of: {}\n",
            a.affected_services.join(", ")
        ));
    }
    for f in &a.findings {
        line.push_str(&format!("  {}\n", f.line(true)));
    }
    output::print(&line)
}

/// A lint finding as printed: the API's `Finding`, its severity without the prefix (`RISK`).
#[derive(Debug, Serialize)]
pub(crate) struct FindingView {
    field: String,
    code: String,
    severity: String,
    message: String,
}

impl FindingView {
    pub(crate) fn from_proto(f: &v1::Finding) -> Self {
        FindingView {
            field: f.field.clone(),
            code: f.code.clone(),
            severity: enum_name(
                v1::Severity::try_from(f.severity).map(|s| s.as_str_name()),
                "SEVERITY_",
            ),
            message: f.message.clone(),
        }
    }

    /// A finding of the lint run here.
    fn from_finding(f: &corsair_policy::Finding) -> Self {
        FindingView {
            field: f.field.clone(),
            code: f.code.as_str().to_owned(),
            severity: f.severity.as_str().to_ascii_uppercase(),
            message: f.message.clone(),
        }
    }

    /// One line for people: `acknowledged risk: allowed_origins[0]: why [CODE]`. A `written`
    /// policy's risks were accepted (an unacknowledged one refuses the write); `explain` only
    /// reports them.
    pub(crate) fn line(&self, written: bool) -> String {
        let severity = match self.severity.as_str() {
            "RISK" if written => "acknowledged risk",
            "RISK" => "risk",
            "NOTICE" => "notice",
            _ => "finding",
        };
        let field = if self.field.is_empty() {
            "(policy)"
        } else {
            &self.field
        };
        format!("{severity}: {field}: {} [{}]", self.message, self.code)
    }
}

/// What `policy diff` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffOutcome {
    /// Applying would change nothing.
    Same,
    /// Applying would change something.
    Changes,
    /// Some document could not be compared.
    Failed,
}

/// `policy diff -f …`: prints, as a unified diff of the YAML form, what `apply` would change:
/// origin sets first, each followed by the policies whose effective policy it changes, then
/// policies.
pub async fn diff(
    client: &Client,
    inputs: &[PathBuf],
    acknowledge: &[String],
) -> Result<DiffOutcome, CliError> {
    let docs = doc::load(inputs)?;
    let mut failed = false;
    let mut sets = Vec::new();
    let mut pending = PendingSets::new();
    for sourced in &docs.origin_sets {
        match origin_set::plan(client, sourced, acknowledge).await {
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
            Ok(planned) => {
                if planned.change != Change::Unchanged {
                    pending.insert(planned.proposed.name.clone(), planned.proposed.clone());
                }
                sets.push((sourced, planned));
            }
        }
    }
    let mut policies = Vec::new();
    for sourced in &docs.policies {
        match plan(client, sourced, acknowledge, &pending).await {
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
            Ok(planned) => policies.push((sourced, planned)),
        }
    }
    let mut changes = false;
    for (sourced, planned) in &sets {
        if planned.change == Change::Unchanged {
            continue;
        }
        changes = true;
        let newly: Vec<String> = policies
            .iter()
            .filter(|(_, p)| p.newly_references(&planned.proposed.name))
            .map(|(_, p)| p.name.clone())
            .collect();
        output::print(&origin_set::diff_text(sourced, planned, &newly)?)?;
    }
    for (sourced, planned) in &policies {
        if planned.change == Change::Unchanged {
            continue;
        }
        changes = true;
        let old = match &planned.current {
            Some(spec) => output::yaml(&PolicyDoc::from_spec(spec.clone()))?,
            None => String::new(),
        };
        let new = output::yaml(&PolicyDoc::from_spec(planned.proposed.clone()))?;
        let old_label = match &planned.current {
            Some(_) => format!("{} (revision {})", planned.name, planned.current_revision),
            None => format!("{} (none)", planned.name),
        };
        let new_label = format!("{} ({})", planned.name, sourced.source);
        output::print(&unified_diff(&old, &new, &old_label, &new_label))?;
    }
    Ok(if failed {
        DiffOutcome::Failed
    } else if changes {
        DiffOutcome::Changes
    } else {
        DiffOutcome::Same
    })
}

/// A unified diff of two YAML texts.
pub(crate) fn unified_diff(old: &str, new: &str, old_label: &str, new_label: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(50)
        .header(old_label, new_label)
        .to_string()
}

/// The request `policy explain` describes.
#[derive(Debug, Clone, Default)]
pub struct ExplainArgs {
    /// A stored policy's service, or
    pub service: Option<String>,
    /// a policy file (its single policy), evaluated without storing it.
    pub file: Option<PathBuf>,
    /// The `Origin` header.
    pub origin: String,
    /// The method (for a preflight, the requested one).
    pub method: String,
    /// Request header names.
    pub headers: Vec<String>,
    /// Whether the request carries credentials.
    pub credentials: bool,
    /// Force a preflight (otherwise decided as a browser would).
    pub preflight: bool,
    /// Whether the preflight asks for private network access.
    pub private_network: bool,
    /// The request's path (which picks the policy's route).
    pub path: String,
}

/// A method as a browser sends it: the six methods fetch normalizes are uppercased, any other
/// is kept as written (methods are case-sensitive, and `patch` is not `PATCH`).
pub fn normalize_method(method: &str) -> String {
    const NORMALIZED: [&str; 6] = ["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"];
    let upper = method.to_ascii_uppercase();
    if NORMALIZED.contains(&upper.as_str()) {
        upper
    } else {
        method.to_owned()
    }
}

/// Whether a browser would send a preflight before this request: a method other than GET,
/// HEAD and POST, or a header outside the CORS-safelisted ones.
pub fn needs_preflight(method: &str, headers: &[String]) -> bool {
    const SAFELISTED: [&str; 4] = ["accept", "accept-language", "content-language", "range"];
    !matches!(method, "GET" | "HEAD" | "POST")
        || headers
            .iter()
            .any(|h| !SAFELISTED.contains(&h.to_ascii_lowercase().as_str()))
}

/// What `policy explain` prints: the API's `ExplainResponse`.
#[derive(Debug, Serialize)]
struct Explained {
    decision: String,
    kind: String,
    reason: String,
    /// The status the sidecar answers with itself; absent when forwarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<i32>,
    forwarded: bool,
    headers: Vec<HeaderView>,
    revision: i64,
    findings: Vec<FindingView>,
    /// The path of the route that decided; absent when the policy's own rules did.
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<String>,
}

/// A response header: the API's `Header`.
#[derive(Debug, Serialize)]
struct HeaderView {
    name: String,
    value: String,
}

/// `policy explain`: how a sidecar would answer one request.
pub async fn explain(client: &Client, args: &ExplainArgs, format: Format) -> Result<(), CliError> {
    let (target, context) = match (&args.service, &args.file) {
        (Some(service), None) => (
            v1::explain_request_request::Target::Name(policy_name(service)),
            policy_name(service),
        ),
        (None, Some(file)) => {
            let docs = doc::load(std::slice::from_ref(file))?;
            if !docs.origin_sets.is_empty() {
                return Err(CliError::Input(format!(
                    "{}: holds origin sets; explain evaluates one policy, with the sets it \
                     references as the control plane holds them (apply the sets first)",
                    file.display()
                )));
            }
            let [one] = docs.policies.as_slice() else {
                return Err(CliError::Input(format!(
                    "{}: holds {} policies; explain needs exactly one",
                    file.display(),
                    docs.policies.len()
                )));
            };
            (
                v1::explain_request_request::Target::Policy(v1::Policy::from(&one.doc.spec())),
                one.source.clone(),
            )
        }
        _ => {
            return Err(CliError::Input(
                "give either --service or --file (-f)".into(),
            ));
        }
    };
    let method = normalize_method(&args.method);
    let preflight =
        args.preflight || args.private_network || needs_preflight(&method, &args.headers);
    let resp = client
        .call(
            &context,
            client
                .policies()
                .explain_request(client.request(v1::ExplainRequestRequest {
                    target: Some(target),
                    request: Some(v1::ExplainedRequest {
                        origin: args.origin.clone(),
                        method,
                        request_headers: args.headers.clone(),
                        preflight,
                        credentials: args.credentials,
                        private_network: args.private_network,
                        host: String::new(),
                        scheme: String::new(),
                        path: args.path.clone(),
                    }),
                })),
        )
        .await?;
    let view = Explained {
        decision: enum_name(
            v1::Decision::try_from(resp.decision).map(|d| d.as_str_name()),
            "DECISION_",
        ),
        kind: enum_name(
            v1::RequestKind::try_from(resp.kind).map(|k| k.as_str_name()),
            "REQUEST_KIND_",
        ),
        reason: resp.reason,
        status: (resp.status != 0).then_some(resp.status),
        forwarded: resp.forwarded,
        headers: resp
            .headers
            .into_iter()
            .map(|h| HeaderView {
                name: h.name,
                value: h.value,
            })
            .collect(),
        revision: resp.revision,
        findings: resp.findings.iter().map(FindingView::from_proto).collect(),
        route: (!resp.route.is_empty()).then_some(resp.route),
    };
    if format != Format::Table {
        return output::emit(format, &view, Table::default);
    }
    let mut t = Table::default();
    t.row(vec!["decision:".into(), view.decision.clone()]);
    t.row(vec!["request:".into(), view.kind.clone()]);
    if let Some(route) = &view.route {
        t.row(vec!["route:".into(), route.clone()]);
    }
    t.row(vec!["reason:".into(), view.reason.clone()]);
    let answer = match view.status {
        Some(status) => format!("{status} from the sidecar; the service never sees it"),
        None if view.forwarded => "forwarded to the service".into(),
        None => "not forwarded".into(),
    };
    t.row(vec!["answer:".into(), answer]);
    if view.revision != 0 {
        t.row(vec!["revision:".into(), view.revision.to_string()]);
    }
    let mut text = t.render();
    if view.headers.is_empty() {
        text.push_str("headers:   (none)\n");
    } else {
        text.push_str("headers:\n");
        for h in &view.headers {
            text.push_str(&format!("  {}: {}\n", h.name, h.value));
        }
    }
    for f in &view.findings {
        text.push_str(&format!("{}\n", f.line(false)));
    }
    output::print(&text)
}

/// A protobuf enum's name without its prefix (`DECISION_ALLOWED` → `ALLOWED`).
pub fn enum_name<E>(name: Result<&str, E>, prefix: &str) -> String {
    match name {
        Ok(name) => name.strip_prefix(prefix).unwrap_or(name).to_owned(),
        Err(_) => "UNKNOWN".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preflights_are_decided_as_a_browser_does() {
        assert!(!needs_preflight("GET", &[]));
        assert!(!needs_preflight("POST", &["Accept-Language".into()]));
        assert!(needs_preflight("PUT", &[]));
        assert!(needs_preflight("GET", &["X-Token".into()]));
        assert!(needs_preflight("POST", &["content-type".into()]));
    }

    #[test]
    fn methods_are_normalized_as_fetch_does() {
        assert_eq!(normalize_method("delete"), "DELETE");
        assert_eq!(normalize_method("patch"), "patch");
        assert_eq!(normalize_method("PATCH"), "PATCH");
    }

    #[test]
    fn changed_fields_are_named_in_format_order() {
        let a = PolicySpec {
            service: "s".into(),
            ..PolicySpec::default()
        };
        let b = PolicySpec {
            max_age: Some(1),
            allowed_origins: vec!["https://a.example".into()],
            ..a.clone()
        };
        assert_eq!(changed_fields(&a, &b), ["allowed_origins", "max_age"]);
        assert!(changed_fields(&a, &a).is_empty());
        let c = PolicySpec {
            routes: vec![corsair_policy::RouteSpec {
                path: "/api/".into(),
                ..Default::default()
            }],
            ..a.clone()
        };
        assert_eq!(changed_fields(&a, &c), ["routes"]);
    }
}
