//! `corsairctl origin-set …`: read, roll back and delete origin sets, the named origin lists
//! policies share as `set:NAME`; and the planning of a set document for `policy apply` and
//! `policy diff`. A set write changes the effective policy of every policy that references
//! it, so what these commands print names those policies.

use corsair_policy::{OriginSetSpec, lint_set};
use corsair_proto::convert::parse_policy_name;
use corsair_proto::names::{origin_set_name, parse_origin_set_name};
use corsair_proto::v1;
use serde::Serialize;
use tonic::Code;

use crate::client::Client;
use crate::doc::{OriginSetDoc, Sourced};
use crate::error::CliError;
use crate::output::{self, Format, Table};
use crate::policy::{Applied, Change, FindingView, WriteOptions, unified_diff};

/// Page size used when a command reads every page.
const PAGE: i32 = 200;

/// A set as named on the command line: `corp-frontends` or `originSets/corp-frontends`.
fn resource(name: &str) -> String {
    origin_set_name(parse_origin_set_name(name).unwrap_or(name))
}

/// The services of policy resource names (`services/shop/policy` → `shop`).
fn services(referrers: &[String]) -> Vec<String> {
    referrers
        .iter()
        .map(|r| parse_policy_name(r).unwrap_or(r).to_owned())
        .collect()
}

/// `origin-set get NAME`.
pub async fn get(client: &Client, name: &str, format: Format) -> Result<(), CliError> {
    let name = resource(name);
    let set = client
        .call(
            &name,
            client
                .origin_sets()
                .get_origin_set(client.request(v1::GetOriginSetRequest { name: name.clone() })),
        )
        .await?;
    let doc = OriginSetDoc::from_proto(&set)?;
    output::emit(format, &doc, || set_table(std::slice::from_ref(&doc), true))
}

/// `origin-set list`.
pub async fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let mut docs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .call(
                "listing origin sets",
                client
                    .origin_sets()
                    .list_origin_sets(client.request(v1::ListOriginSetsRequest {
                        page_size: PAGE,
                        page_token,
                    })),
            )
            .await?;
        for s in &page.origin_sets {
            docs.push(OriginSetDoc::from_proto(s)?);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    output::emit(format, &docs, || set_table(&docs, false))
}

/// One row per set; `referrers` adds who uses it (a listing does not say).
fn set_table(docs: &[OriginSetDoc], referrers: bool) -> Table {
    let mut header = vec!["NAME", "ENTRIES", "ORIGINS", "REVISION", "UPDATED", "BY"];
    if referrers {
        header.push("USED BY");
    }
    let mut t = Table::new(&header);
    for d in docs {
        let mut row = vec![
            d.name.clone(),
            d.origins.len().to_string(),
            output::list(&d.origins, 60),
            d.revision.map_or_else(|| "-".into(), |r| r.to_string()),
            d.update_time.clone().unwrap_or_else(|| "-".into()),
            d.update_actor.clone().unwrap_or_else(|| "-".into()),
        ];
        if referrers {
            row.push(output::list(&services(&d.referrers), 60));
        }
        t.row(row);
    }
    t
}

/// What `delete` and `rollback` print with `-o json|yaml`.
#[derive(Debug, Serialize)]
struct Written {
    origin_set: String,
    action: &'static str,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<i64>,
    /// The services whose effective policy the write changed (or would).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    affected_services: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    findings: Vec<FindingView>,
}

impl Written {
    /// Prints the result: as JSON or YAML, or as `line` and the services it changed, after
    /// the findings (on stderr).
    fn report(&self, format: Format, line: impl FnOnce() -> String) -> Result<(), CliError> {
        if format != Format::Table {
            return output::emit(format, self, Table::default);
        }
        let name = origin_set_name(&self.origin_set);
        for finding in &self.findings {
            eprintln!("{name}: {}", finding.line(true));
        }
        let mut text = format!("{}\n", line());
        if !self.affected_services.is_empty() {
            let verb = if self.dry_run {
                "would change"
            } else {
                "changes"
            };
            text.push_str(&format!(
                "  {verb} the effective policy of: {}\n",
                self.affected_services.join(", ")
            ));
        }
        output::print(&text)
    }
}

/// `origin-set delete NAME`: refused while a policy references the set.
pub async fn delete(
    client: &Client,
    name: &str,
    etag: Option<String>,
    opts: &WriteOptions,
    format: Format,
) -> Result<(), CliError> {
    let name = resource(name);
    let resp = client
        .call(
            &name,
            client
                .origin_sets()
                .delete_origin_set(client.request(v1::DeleteOriginSetRequest {
                    name: name.clone(),
                    etag: etag.unwrap_or_default(),
                    validate_only: opts.dry_run,
                    reason: opts.reason.clone(),
                })),
        )
        .await?;
    let result = Written {
        origin_set: parse_origin_set_name(&name).unwrap_or(&name).to_owned(),
        action: "deleted",
        dry_run: opts.dry_run,
        revision: (!opts.dry_run).then_some(resp.revision),
        affected_services: Vec::new(),
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

/// `origin-set rollback NAME --to REVISION`.
pub async fn rollback(
    client: &Client,
    name: &str,
    revision: i64,
    etag: Option<String>,
    opts: &WriteOptions,
    format: Format,
) -> Result<(), CliError> {
    let name = resource(name);
    // Read first, to tell a rollback that wrote from one to what was already in force.
    let before = stored(client, &name, &name).await?.map(|s| s.revision);
    let resp = client
        .call(
            &name,
            client.origin_sets().rollback_origin_set(client.request(
                v1::RollbackOriginSetRequest {
                    name: name.clone(),
                    revision,
                    etag: etag.unwrap_or_default(),
                    validate_only: opts.dry_run,
                    reason: opts.reason.clone(),
                    acknowledged_risks: opts.acknowledge.clone(),
                },
            )),
        )
        .await?;
    let wrote = opts.dry_run || before != Some(resp.revision);
    let result = Written {
        origin_set: parse_origin_set_name(&name).unwrap_or(&name).to_owned(),
        action: if wrote { "rolled back" } else { "unchanged" },
        dry_run: opts.dry_run,
        revision: (!opts.dry_run).then_some(resp.revision),
        affected_services: if wrote {
            services(&resp.referrers)
        } else {
            Vec::new()
        },
        findings: resp.findings.iter().map(FindingView::from_proto).collect(),
    };
    result.report(format, || {
        if opts.dry_run {
            format!("{name} would be rolled back to revision {revision} (dry run)")
        } else if wrote {
            format!(
                "{name} rolled back to revision {revision} (now at revision {})",
                resp.revision
            )
        } else {
            format!(
                "{name} unchanged: revision {revision}'s entries are in force already \
                 (revision {})",
                resp.revision
            )
        }
    })
}

/// One revision as `origin-set history` prints it: the API's `OriginSetRevision` and what it
/// changed.
#[derive(Debug, Serialize)]
struct RevisionView {
    revision: i64,
    create_time: String,
    actor: String,
    reason: String,
    deleted: bool,
    audit_sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_set: Option<OriginSetDoc>,
    affected_services: Vec<String>,
    change: String,
}

/// `origin-set history NAME`: newest first, each with what it changed and the services whose
/// effective policy changed with it.
pub async fn history(
    client: &Client,
    name: &str,
    limit: usize,
    format: Format,
) -> Result<(), CliError> {
    let name = resource(name);
    // One more than shown, to say what the oldest shown revision changed.
    let mut revisions = Vec::new();
    let mut page_token = String::new();
    while revisions.len() <= limit {
        let page = client
            .call(
                &name,
                client
                    .origin_sets()
                    .list_origin_set_revisions(client.request(v1::ListOriginSetRevisionsRequest {
                        name: name.clone(),
                        page_size: PAGE,
                        page_token,
                    })),
            )
            .await?;
        revisions.extend(page.revisions);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut views = Vec::new();
    for (i, r) in revisions.iter().enumerate().take(limit) {
        let older = revisions.get(i + 1);
        let change = match (&r.origin_set, older.map(|o| &o.origin_set)) {
            _ if r.deleted => "deleted".to_owned(),
            (Some(_), None) => "created".to_owned(),
            (Some(_), Some(None)) => "recreated".to_owned(),
            (Some(new), Some(Some(old))) => {
                let change = describe(&wire_spec(old), &wire_spec(new));
                if change.is_empty() {
                    "no change".to_owned()
                } else {
                    change.join(",")
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
            origin_set: r
                .origin_set
                .as_ref()
                .map(OriginSetDoc::from_proto)
                .transpose()?,
            affected_services: r.affected_services.clone(),
            change,
        });
    }
    output::emit(format, &views, || {
        let mut t = Table::new(&["REVISION", "TIME", "BY", "CHANGE", "AFFECTED", "REASON"]);
        for v in &views {
            t.row(vec![
                v.revision.to_string(),
                v.create_time.clone(),
                v.actor.clone(),
                v.change.clone(),
                output::list(&v.affected_services, 40),
                v.reason.clone(),
            ]);
        }
        t
    })
}

/// The spec of a wire set (its name as given).
fn wire_spec(s: &v1::OriginSet) -> OriginSetSpec {
    OriginSetSpec {
        name: parse_origin_set_name(&s.name).unwrap_or(&s.name).to_owned(),
        description: s.description.clone(),
        origins: s.origins.clone(),
    }
}

/// The fields that differ between two specs, in the order of the format.
pub fn changed_fields(a: &OriginSetSpec, b: &OriginSetSpec) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if a.description != b.description {
        fields.push("description");
    }
    if a.origins != b.origins {
        fields.push("origins");
    }
    fields
}

/// What changed between two specs, for people: `description`, `origins +2 -1`.
fn describe(old: &OriginSetSpec, new: &OriginSetSpec) -> Vec<String> {
    changed_fields(old, new)
        .into_iter()
        .map(|field| match field {
            "origins" => {
                let added = new.origins.iter().filter(|o| !old.origins.contains(o));
                let removed = old.origins.iter().filter(|o| !new.origins.contains(o));
                format!("origins +{} -{}", added.count(), removed.count())
            }
            field => field.to_owned(),
        })
        .collect()
}

/// The stored set named `name` (`originSets/{set}`), if there is one.
async fn stored(
    client: &Client,
    context: &str,
    name: &str,
) -> Result<Option<v1::OriginSet>, CliError> {
    match client
        .call(
            context,
            client
                .origin_sets()
                .get_origin_set(client.request(v1::GetOriginSetRequest {
                    name: name.to_owned(),
                })),
        )
        .await
    {
        Ok(set) => Ok(Some(set)),
        Err(e) if e.code() == Some(Code::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The stored set `set` as a spec; `None` when there is none or `set` cannot name one.
pub(crate) async fn stored_spec(
    client: &Client,
    context: &str,
    set: &str,
) -> Result<Option<OriginSetSpec>, CliError> {
    if parse_origin_set_name(&origin_set_name(set)) != Ok(set) {
        return Ok(None);
    }
    match stored(client, context, &origin_set_name(set)).await {
        Err(e) if e.code() == Some(Code::InvalidArgument) => Ok(None),
        found => Ok(found?.as_ref().map(wire_spec)),
    }
}

/// One set document checked against the server.
#[derive(Debug)]
pub(crate) struct PlannedSet {
    name: String,
    /// The set as sent (the document's fields, the etag to compare against).
    wire: v1::OriginSet,
    current: Option<OriginSetSpec>,
    current_revision: i64,
    /// The set as the server would store it.
    pub(crate) proposed: OriginSetSpec,
    findings: Vec<FindingView>,
    pub(crate) change: Change,
    /// The policies that reference the set now (`services/{service}/policy`).
    referrers: Vec<String>,
}

/// Reads the stored set and has the server validate the document against it
/// (`validate_only`), which checks the set and, for an update, the effective policy of every
/// policy that references it.
pub(crate) async fn plan(
    client: &Client,
    sourced: &Sourced<OriginSetDoc>,
    acknowledge: &[String],
) -> Result<PlannedSet, CliError> {
    let doc = &sourced.doc;
    let name = origin_set_name(&doc.name);
    let context = format!("{}: {name}", sourced.source);
    let current = stored(client, &context, &name).await?;
    let current_spec = current.as_ref().map(wire_spec);
    let mut wire = v1::OriginSet {
        name: name.clone(),
        description: doc.description.clone(),
        origins: doc.origins.clone(),
        ..v1::OriginSet::default()
    };
    let checked = match &current {
        None => {
            if let Some(etag) = &doc.etag {
                return Err(CliError::Input(format!(
                    "{context}: the file expects etag {etag}, but the origin set no longer \
                     exists; remove the etag to create it again"
                )));
            }
            client
                .call(
                    &context,
                    client.origin_sets().create_origin_set(client.request(
                        v1::CreateOriginSetRequest {
                            origin_set: Some(wire.clone()),
                            validate_only: true,
                            reason: String::new(),
                            acknowledged_risks: acknowledge.to_vec(),
                        },
                    )),
                )
                .await
        }
        Some(stored) => {
            wire.etag = doc.etag.clone().unwrap_or_else(|| stored.etag.clone());
            client
                .call(
                    &context,
                    client.origin_sets().update_origin_set(client.request(
                        v1::UpdateOriginSetRequest {
                            origin_set: Some(wire.clone()),
                            validate_only: true,
                            acknowledged_risks: acknowledge.to_vec(),
                            ..Default::default()
                        },
                    )),
                )
                .await
        }
    };
    let current_revision = current.as_ref().map_or(0, |c| c.revision);
    let referrers = current.map(|c| c.referrers).unwrap_or_default();
    let response = match checked {
        // A risk acknowledged when the set was stored need not be acknowledged again to find
        // that nothing changes.
        Err(e) if e.is_unacknowledged_risk() && unchanged(&doc.spec(), current_spec.as_ref()) => {
            return Ok(PlannedSet {
                name,
                wire,
                proposed: current_spec.clone().expect("a stored set"),
                current: current_spec,
                current_revision,
                findings: Vec::new(),
                change: Change::Unchanged,
                referrers,
            });
        }
        checked => checked?,
    };
    let proposed = OriginSetSpec {
        name: doc.name.clone(),
        ..wire_spec(&response)
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
    Ok(PlannedSet {
        name,
        wire,
        current: current_spec,
        current_revision,
        proposed,
        findings: response
            .findings
            .iter()
            .map(FindingView::from_proto)
            .collect(),
        change,
        referrers,
    })
}

/// Whether `desired`, canonicalized as the server would store it, equals `stored`.
fn unchanged(desired: &OriginSetSpec, stored: Option<&OriginSetSpec>) -> bool {
    match (lint_set(desired).0, stored) {
        (Some(set), Some(stored)) => set.spec() == stored,
        _ => false,
    }
}

/// Applies one set document; returns what happened and the set as stored (or as it would be,
/// in a dry run).
pub(crate) async fn apply_one(
    client: &Client,
    sourced: &Sourced<OriginSetDoc>,
    opts: &WriteOptions,
) -> Result<(Applied, OriginSetSpec), CliError> {
    let planned = plan(client, sourced, &opts.acknowledge).await?;
    let mut applied = Applied::origin_set(sourced, opts.dry_run);
    applied.revision = Some(planned.current_revision).filter(|r| *r != 0);
    applied.findings = planned.findings;
    let context = format!("{}: {}", sourced.source, planned.name);
    match planned.change {
        Change::Unchanged => {}
        Change::Create => {
            applied.action = "created";
            if !opts.dry_run {
                let resp = client
                    .call(
                        &context,
                        client.origin_sets().create_origin_set(client.request(
                            v1::CreateOriginSetRequest {
                                origin_set: Some(planned.wire),
                                validate_only: false,
                                reason: opts.reason.clone(),
                                acknowledged_risks: opts.acknowledge.clone(),
                            },
                        )),
                    )
                    .await?;
                applied.revision = Some(resp.revision);
            }
        }
        Change::Update(fields) => {
            applied.action = "updated";
            applied.changed_fields = fields;
            applied.affected_services = services(&planned.referrers);
            if !opts.dry_run {
                let resp = client
                    .call(
                        &context,
                        client.origin_sets().update_origin_set(client.request(
                            v1::UpdateOriginSetRequest {
                                origin_set: Some(planned.wire),
                                reason: opts.reason.clone(),
                                acknowledged_risks: opts.acknowledge.clone(),
                                ..Default::default()
                            },
                        )),
                    )
                    .await?;
                applied.revision = Some(resp.revision);
                applied.affected_services = services(&resp.referrers);
            }
        }
    }
    Ok((applied, planned.proposed))
}

/// What `policy diff` prints for a set that would change: a unified diff of its YAML form,
/// then the policies whose effective policy changes with it: those that reference it now,
/// and `newly`, those the same files make reference it.
pub(crate) fn diff_text(
    sourced: &Sourced<OriginSetDoc>,
    planned: &PlannedSet,
    newly: &[String],
) -> Result<String, CliError> {
    let old = match &planned.current {
        Some(spec) => output::yaml(&OriginSetDoc::from_spec(spec.clone()))?,
        None => String::new(),
    };
    let new = output::yaml(&OriginSetDoc::from_spec(planned.proposed.clone()))?;
    let old_label = match &planned.current {
        Some(_) => format!("{} (revision {})", planned.name, planned.current_revision),
        None => format!("{} (none)", planned.name),
    };
    let new_label = format!("{} ({})", planned.name, sourced.source);
    let mut text = unified_diff(&old, &new, &old_label, &new_label);
    let newly: Vec<&str> = newly
        .iter()
        .filter(|p| !planned.referrers.contains(p))
        .map(String::as_str)
        .collect();
    let now = planned.referrers.join(", ");
    let line = match (now.is_empty(), newly.is_empty()) {
        (true, true) => "no policy references it; no effective policy changes".to_owned(),
        (false, true) => format!("changes the effective policy of {now}"),
        (true, false) => format!(
            "changes the effective policy of {} (which these files make reference it)",
            newly.join(", ")
        ),
        (false, false) => format!(
            "changes the effective policy of {now}; and of {} (which these files make \
             reference it)",
            newly.join(", ")
        ),
    };
    text.push_str(&format!("{}: {line}\n", planned.name));
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(description: &str, origins: &[&str]) -> OriginSetSpec {
        OriginSetSpec {
            name: "corp".into(),
            description: description.into(),
            origins: origins.iter().map(|o| (*o).to_owned()).collect(),
        }
    }

    #[test]
    fn a_change_names_its_fields_and_counts_entries() {
        let old = spec("a", &["https://a.example", "https://b.example"]);
        let cases = [
            ("nothing", old.clone(), vec![]),
            (
                "an entry added",
                spec(
                    "a",
                    &[
                        "https://a.example",
                        "https://b.example",
                        "https://c.example",
                    ],
                ),
                vec!["origins +1 -0"],
            ),
            (
                "one replaced, and the description",
                spec("b", &["https://a.example", "https://c.example"]),
                vec!["description", "origins +1 -1"],
            ),
        ];
        for (case, new, expected) in cases {
            assert_eq!(describe(&old, &new), expected, "{case}");
        }
    }

    #[test]
    fn a_set_is_named_by_its_name_or_its_resource_name() {
        assert_eq!(resource("corp"), "originSets/corp");
        assert_eq!(resource("originSets/corp"), "originSets/corp");
        assert_eq!(
            services(&["services/shop/policy".into(), "odd".into()]),
            ["shop", "odd"]
        );
    }

    #[test]
    fn only_a_different_canonical_set_is_a_change() {
        let stored = spec("", &["https://a.example.com"]);
        assert!(unchanged(
            &spec("", &["HTTPS://A.example.com"]),
            Some(&stored)
        ));
        assert!(!unchanged(
            &spec("", &["https://b.example.com"]),
            Some(&stored)
        ));
        assert!(!unchanged(&stored, None));
    }
}
