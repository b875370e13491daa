//! `corsairctl policy …`: read, write, compare and explain policies.

use std::path::PathBuf;

use corsair_policy::PolicySpec;
use corsair_proto::convert::policy_name;
use corsair_proto::v1;
use serde::Serialize;
use tonic::Code;

use crate::client::Client;
use crate::doc::{self, PolicyDoc, Sourced};
use crate::error::CliError;
use crate::output::{self, Format, Table};

/// Page size used when a command reads every page.
const PAGE: i32 = 200;

/// `policy get SERVICE`.
pub async fn get(client: &Client, service: &str, format: Format) -> Result<(), CliError> {
    let name = policy_name(service);
    let policy = client
        .call(
            &name,
            client
                .policies()
                .get_policy(client.request(v1::GetPolicyRequest { name: name.clone() })),
        )
        .await?;
    let doc = PolicyDoc::from_proto(&policy)?;
    output::emit(format, &doc, || policy_table(std::slice::from_ref(&doc)))
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
#[derive(Debug)]
enum Change {
    Create,
    Update(Vec<&'static str>),
    Unchanged,
}

/// One document checked against the server.
#[derive(Debug)]
struct Planned {
    name: String,
    /// The policy as sent (the document's fields, the etag to compare against).
    wire: v1::Policy,
    /// The stored policy, if any.
    current: Option<PolicySpec>,
    current_revision: i64,
    /// The policy as the server would store it.
    proposed: PolicySpec,
    findings: Vec<v1::Finding>,
    change: Change,
}

/// Reads the stored policy and has the server validate the document against it
/// (`validate_only`: nothing is stored or audited), so that normalization, validation and
/// the etag check are exactly the server's.
async fn plan(
    client: &Client,
    sourced: &Sourced,
    acknowledge: &[String],
) -> Result<Planned, CliError> {
    let doc = &sourced.doc;
    let name = policy_name(&doc.service);
    let context = format!("{}: {name}", sourced.source);
    let current = match client
        .call(
            &context,
            client
                .policies()
                .get_policy(client.request(v1::GetPolicyRequest { name: name.clone() })),
        )
        .await
    {
        Ok(p) => Some(p),
        Err(e) if e.code() == Some(Code::NotFound) => None,
        Err(e) => return Err(e),
    };
    let mut wire = v1::Policy::from(&doc.spec());
    let current_spec = current
        .as_ref()
        .map(PolicySpec::try_from)
        .transpose()
        .map_err(|e| CliError::Protocol(format!("{context}: {e}")))?;
    let response = match &current {
        None => {
            if let Some(etag) = &doc.etag {
                return Err(CliError::Input(format!(
                    "{context}: the file expects etag {etag}, but the policy no longer exists; \
                     remove the etag to create it again"
                )));
            }
            client
                .call(
                    &context,
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
        }
        Some(stored) => {
            wire.etag = doc.etag.clone().unwrap_or_else(|| stored.etag.clone());
            let checked = client
                .call(
                    &context,
                    client
                        .policies()
                        .update_policy(client.request(v1::UpdatePolicyRequest {
                            policy: Some(wire.clone()),
                            validate_only: true,
                            acknowledged_risks: acknowledge.to_vec(),
                            ..Default::default()
                        })),
                )
                .await;
            match checked {
                // A risk acknowledged when the policy was stored need not be acknowledged
                // again to find that nothing changes.
                Err(e)
                    if e.is_unacknowledged_risk()
                        && unchanged(&doc.spec(), current_spec.as_ref()) =>
                {
                    let stored = current.expect("a stored policy");
                    return Ok(Planned {
                        name,
                        wire,
                        proposed: current_spec.clone().expect("a stored spec"),
                        current: current_spec,
                        current_revision: stored.revision,
                        findings: Vec::new(),
                        change: Change::Unchanged,
                    });
                }
                checked => checked?,
            }
        }
    };
    let proposed = PolicySpec::try_from(&response)
        .map_err(|e| CliError::Protocol(format!("{context}: {e}")))?;
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
        current_revision: current.map_or(0, |c| c.revision),
        proposed,
        findings: response.findings,
        change,
    })
}

/// Whether `desired`, canonicalized as the server would store it, equals `stored`.
fn unchanged(desired: &PolicySpec, stored: Option<&PolicySpec>) -> bool {
    let (Some(stored), (Some(policy), _)) = (stored, corsair_policy::lint(desired)) else {
        return false;
    };
    changed_fields(stored, &policy.into_spec()).is_empty()
}

/// One document's outcome, as `apply -o json|yaml` prints it.
#[derive(Debug, Serialize)]
struct Applied {
    service: String,
    source: String,
    /// `created`, `updated`, `unchanged`, or `failed`.
    action: &'static str,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changed_fields: Vec<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    findings: Vec<FindingView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `policy apply -f …`: creates or updates every policy in the inputs, compare-and-set on
/// the etag; policies that would not change are not written. Returns whether all succeeded.
pub async fn apply(
    client: &Client,
    inputs: &[PathBuf],
    opts: &WriteOptions,
    format: Format,
) -> Result<bool, CliError> {
    let docs = doc::load(inputs)?;
    let mut results = Vec::new();
    for sourced in &docs {
        // Over the server's per-identity write rate: wait and re-plan (apply is idempotent).
        let mut result = apply_one(client, sourced, opts).await;
        let mut attempt = 0u32;
        while attempt < 8 && matches!(&result, Err(e) if e.code() == Some(Code::ResourceExhausted))
        {
            tokio::time::sleep(std::time::Duration::from_millis(250 << attempt.min(3))).await;
            attempt += 1;
            result = apply_one(client, sourced, opts).await;
        }
        let applied = match result {
            Ok(applied) => applied,
            Err(e) => Applied {
                service: sourced.doc.service.clone(),
                source: sourced.source.clone(),
                action: "failed",
                dry_run: opts.dry_run,
                revision: None,
                changed_fields: Vec::new(),
                findings: Vec::new(),
                error: Some(e.to_string()),
            },
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
) -> Result<Applied, CliError> {
    let planned = plan(client, sourced, &opts.acknowledge).await?;
    let findings = planned
        .findings
        .iter()
        .map(FindingView::from_proto)
        .collect();
    let mut applied = Applied {
        service: sourced.doc.service.clone(),
        source: sourced.source.clone(),
        action: "unchanged",
        dry_run: opts.dry_run,
        revision: Some(planned.current_revision).filter(|r| *r != 0),
        changed_fields: Vec::new(),
        findings,
        error: None,
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
    let name = policy_name(&a.service);
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
    for f in &a.findings {
        line.push_str(&format!("  {}\n", f.line(true)));
    }
    output::print(&line)
}

/// A lint finding as printed: the API's `Finding`, its severity without the prefix (`RISK`).
#[derive(Debug, Serialize)]
struct FindingView {
    field: String,
    code: String,
    severity: String,
    message: String,
}

impl FindingView {
    fn from_proto(f: &v1::Finding) -> Self {
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

    /// One line for people: `acknowledged risk: allowed_origins[0]: why [CODE]`. A `written`
    /// policy's risks were accepted (an unacknowledged one refuses the write); `explain` only
    /// reports them.
    fn line(&self, written: bool) -> String {
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

/// `policy diff -f …`: prints, as a unified diff of the YAML form, what `apply` would change.
pub async fn diff(
    client: &Client,
    inputs: &[PathBuf],
    acknowledge: &[String],
) -> Result<DiffOutcome, CliError> {
    let docs = doc::load(inputs)?;
    let mut changes = false;
    let mut failed = false;
    for sourced in &docs {
        match plan(client, sourced, acknowledge).await {
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
            Ok(planned) => {
                if matches!(planned.change, Change::Unchanged) {
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
                let text = similar::TextDiff::from_lines(&old, &new)
                    .unified_diff()
                    .context_radius(50)
                    .header(&old_label, &new_label)
                    .to_string();
                output::print(&text)?;
            }
        }
    }
    Ok(if failed {
        DiffOutcome::Failed
    } else if changes {
        DiffOutcome::Changes
    } else {
        DiffOutcome::Same
    })
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
            let [one] = docs.as_slice() else {
                return Err(CliError::Input(format!(
                    "{}: holds {} policies; explain needs exactly one",
                    file.display(),
                    docs.len()
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
