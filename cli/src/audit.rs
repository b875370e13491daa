//! `corsairctl audit …`: query, tail and verify the audit log.

use std::time::SystemTime;

use clap::ValueEnum;
use corsair_proto::v1;
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::doc::{OriginSetDoc, PolicyDoc};
use crate::error::CliError;
use crate::output::{self, Format, Table};
use crate::policy::enum_name;

/// An outcome to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutcomeArg {
    /// The call succeeded.
    Ok,
    /// The request or policy was invalid.
    Invalid,
    /// The etag did not match.
    Conflict,
    /// The policy or revision did not exist.
    NotFound,
    /// The policy already existed.
    AlreadyExists,
    /// Risks were not acknowledged.
    RiskNotAcknowledged,
    /// The caller was not allowed.
    Denied,
    /// Another failure.
    Error,
    /// The request did not fit the current state.
    FailedPrecondition,
}

impl OutcomeArg {
    fn proto(self) -> v1::Outcome {
        match self {
            OutcomeArg::Ok => v1::Outcome::Ok,
            OutcomeArg::Invalid => v1::Outcome::Invalid,
            OutcomeArg::Conflict => v1::Outcome::Conflict,
            OutcomeArg::NotFound => v1::Outcome::NotFound,
            OutcomeArg::AlreadyExists => v1::Outcome::AlreadyExists,
            OutcomeArg::RiskNotAcknowledged => v1::Outcome::RiskNotAcknowledged,
            OutcomeArg::Denied => v1::Outcome::Denied,
            OutcomeArg::Error => v1::Outcome::Error,
            OutcomeArg::FailedPrecondition => v1::Outcome::FailedPrecondition,
        }
    }
}

/// A point in time on the command line: a duration ago (`24h`, `15m`, `7d`) or an RFC 3339
/// timestamp (`2026-11-24T09:00:00Z`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text} ago is before the epoch"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!("{text:?} is neither a duration (24h, 15m, 7d) nor a time (2026-11-24T09:00:00Z)")
    })
}

fn proto_time(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// The filters of `audit list`.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    /// Only this service.
    pub service: String,
    /// Only this actor.
    pub actor: String,
    /// Only this method: a full gRPC method or its last part (`UpdatePolicy`).
    pub method: String,
    /// Only this outcome.
    pub outcome: Option<OutcomeArg>,
    /// Only events at or after.
    pub since: Option<SystemTime>,
    /// Only events before.
    pub until: Option<SystemTime>,
}

impl Filters {
    fn matches(&self, e: &v1::AuditEvent) -> bool {
        let time = e
            .create_time
            .map(|t| SystemTime::try_from(t).unwrap_or(SystemTime::UNIX_EPOCH));
        self.outcome.is_none_or(|o| e.outcome == o.proto() as i32)
            && self.since.is_none_or(|s| time.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| time.is_some_and(|t| t < u))
    }
}

/// One event as printed: the API's `AuditEvent` (its time as `create_time`), hashes in hex.
#[derive(Debug, Serialize)]
struct EventView {
    sequence: u64,
    create_time: String,
    actor: String,
    method: String,
    service: String,
    revision: i64,
    outcome: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    changed_fields: Vec<String>,
    reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    request_id: String,
    peer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<PolicyDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<PolicyDoc>,
    /// For an origin set write: the set (`originSets/{set}`), before and after, and the
    /// services whose effective policy it changed.
    #[serde(skip_serializing_if = "String::is_empty")]
    origin_set: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_set_before: Option<OriginSetDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin_set_after: Option<OriginSetDoc>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    affected_services: Vec<String>,
    hash: String,
    prev_hash: String,
}

fn view(e: &v1::AuditEvent) -> Result<EventView, CliError> {
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(EventView {
        sequence: e.sequence,
        create_time: output::timestamp_or_dash(e.create_time.as_ref()),
        actor: e.actor.clone(),
        method: e.method.clone(),
        service: e.service.clone(),
        revision: e.revision,
        outcome: enum_name(
            v1::Outcome::try_from(e.outcome).map(|o| o.as_str_name()),
            "OUTCOME_",
        ),
        changed_fields: e.changed_fields.clone(),
        reason: e.reason.clone(),
        error: e.error.clone(),
        request_id: e.request_id.clone(),
        peer: e.peer.clone(),
        before: e.before.as_ref().map(PolicyDoc::from_proto).transpose()?,
        after: e.after.as_ref().map(PolicyDoc::from_proto).transpose()?,
        origin_set: e.origin_set.clone(),
        origin_set_before: e
            .origin_set_before
            .as_ref()
            .map(OriginSetDoc::from_proto)
            .transpose()?,
        origin_set_after: e
            .origin_set_after
            .as_ref()
            .map(OriginSetDoc::from_proto)
            .transpose()?,
        affected_services: e.affected_services.clone(),
        hash: hex(&e.hash),
        prev_hash: hex(&e.prev_hash),
    })
}

/// `RESOURCE` is the service whose policy the event concerns, or `originSets/{set}`.
const HEADER: [&str; 9] = [
    "SEQ", "TIME", "BY", "ACTION", "RESOURCE", "REVISION", "OUTCOME", "DETAIL", "REASON",
];

/// Widths of the columns of a followed table, all but the last (the reason, which runs free):
/// rows are printed as they come, so the columns cannot fit what is not known yet. Wide
/// enough for every time and outcome, the control plane's own actor name, every write's
/// action and an origin set's short name; a longer cell is cut (`-o json` has it whole).
const FOLLOW_WIDTHS: [usize; 8] = [8, 20, 21, 17, 24, 8, 21, 20];

fn row(v: &EventView) -> Vec<String> {
    let action = v.method.rsplit('/').next().unwrap_or(&v.method).to_owned();
    let mut detail = if !v.error.is_empty() {
        v.error.clone()
    } else {
        v.changed_fields.join(",")
    };
    if !v.affected_services.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str("affects ");
        detail.push_str(&v.affected_services.join(","));
    }
    let resource = if v.origin_set.is_empty() {
        v.service.clone()
    } else {
        v.origin_set.clone()
    };
    let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    vec![
        v.sequence.to_string(),
        v.create_time.clone(),
        or_dash(v.actor.clone()),
        or_dash(action),
        or_dash(resource),
        if v.revision == 0 {
            "-".to_owned()
        } else {
            v.revision.to_string()
        },
        v.outcome.clone(),
        or_dash(detail),
        or_dash(v.reason.clone()),
    ]
}

/// One line of a followed table: each cell but the last padded to its column, or cut to it
/// with `…`, and two spaces between columns.
fn fixed_line(cells: &[String]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let cell = cell.replace(['\t', '\n'], " ");
        let Some(&width) = FOLLOW_WIDTHS.get(i) else {
            line.push_str(&cell);
            break;
        };
        if cell.chars().count() > width {
            line.extend(cell.chars().take(width - 1));
            line.push('…');
        } else {
            line.push_str(&format!("{cell:<width$}"));
        }
        line.push_str("  ");
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
}

/// `audit list`: up to `limit` matching events, newest first. With `follow`, the same events
/// oldest first, then every new matching event as it is recorded, until interrupted.
pub async fn list(
    client: &Client,
    filters: &Filters,
    limit: usize,
    follow: bool,
    format: Format,
) -> Result<(), CliError> {
    // Where a tail starts: the newest event of all, read before the listing so that no event
    // falls between the two.
    let tail_from = if follow {
        let newest = page(client, &Filters::default(), 1, String::new()).await?;
        newest.events.first().map_or(0, |e| e.sequence)
    } else {
        0
    };
    let mut events = Vec::new();
    let mut token = String::new();
    while events.len() < limit {
        let want = (limit - events.len()).min(500);
        let resp = page(client, filters, want, token).await?;
        events.extend(resp.events.into_iter().filter(|e| filters.matches(e)));
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    events.truncate(limit);
    if !follow {
        let views = events.iter().map(view).collect::<Result<Vec<_>, _>>()?;
        return output::emit(format, &views, || {
            let mut t = Table::new(&HEADER);
            for v in &views {
                t.row(row(v));
            }
            t
        });
    }
    let mut printer = Follower::new(format);
    let last_listed = events.first().map_or(0, |e| e.sequence);
    for e in events.iter().rev() {
        printer.event(&view(e)?)?;
    }
    let after = tail_from.max(last_listed);
    let mut stream = client
        .audit()
        .watch_audit_events(client.streaming(v1::WatchAuditEventsRequest {
            after_sequence: after,
            service: filters.service.clone(),
            actor: filters.actor.clone(),
            method: filters.method.clone(),
        }))
        .await
        .map_err(|s| CliError::status("following the audit log", s))?
        .into_inner();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = &mut interrupted => return Ok(()),
        };
        match next {
            None => {
                return Err(CliError::Local(
                    "the control plane closed the audit stream (it is shutting down)".into(),
                ));
            }
            Some(Err(status)) => return Err(CliError::status("following the audit log", status)),
            Some(Ok(e)) if e.sequence > after && filters.matches(&e) => {
                printer.event(&view(&e)?)?;
            }
            Some(Ok(_)) => {}
        }
    }
}

async fn page(
    client: &Client,
    filters: &Filters,
    size: usize,
    page_token: String,
) -> Result<v1::ListAuditEventsResponse, CliError> {
    client
        .call(
            "listing audit events",
            client
                .audit()
                .list_audit_events(client.request(v1::ListAuditEventsRequest {
                    page_size: i32::try_from(size).unwrap_or(i32::MAX),
                    page_token,
                    service: filters.service.clone(),
                    actor: filters.actor.clone(),
                    method: filters.method.clone(),
                    outcome: filters.outcome.map_or(0, |o| o.proto() as i32),
                    start_time: filters.since.map(proto_time),
                    end_time: filters.until.map(proto_time),
                })),
        )
        .await
}

/// Prints a stream of events: table rows in fixed columns under the header, one JSON object
/// per line, or one YAML document per event.
struct Follower {
    format: Format,
    header_done: bool,
}

impl Follower {
    fn new(format: Format) -> Self {
        Follower {
            format,
            header_done: false,
        }
    }

    fn event(&mut self, v: &EventView) -> Result<(), CliError> {
        match self.format {
            Format::Json => {
                let line = serde_json::to_string(v)
                    .map_err(|e| CliError::Local(format!("cannot print: {e}")))?;
                output::print(&(line + "\n"))
            }
            Format::Yaml => output::print(&format!("---\n{}", output::yaml(v)?)),
            Format::Table => {
                let mut text = String::new();
                if !self.header_done {
                    let header: Vec<String> = HEADER.iter().map(|h| (*h).to_owned()).collect();
                    text.push_str(&fixed_line(&header));
                    self.header_done = true;
                }
                text.push_str(&fixed_line(&row(v)));
                output::print(&text)
            }
        }
    }
}

/// What `audit verify` reports.
#[derive(Debug, Serialize)]
struct Verified {
    ok: bool,
    verified_events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_bad_sequence: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

/// `audit verify`: recomputes the hash chain, in as many calls as the server needs for the
/// range. Returns whether it verified.
pub async fn verify(client: &Client, from: u64, to: u64, format: Format) -> Result<bool, CliError> {
    let mut start = from;
    let mut verified_events = 0;
    let resp = loop {
        let resp = client
            .call(
                "verifying the audit log",
                client
                    .audit()
                    .verify_audit_chain(client.request(v1::VerifyAuditChainRequest {
                        start_sequence: start,
                        end_sequence: to,
                    })),
            )
            .await?;
        verified_events += resp.verified_events;
        if !resp.ok || resp.next_start_sequence == 0 {
            break resp;
        }
        start = resp.next_start_sequence;
    };
    let v = Verified {
        ok: resp.ok,
        verified_events,
        first_bad_sequence: (!resp.ok).then_some(resp.first_bad_sequence),
        error: resp.error,
    };
    match format {
        Format::Table if v.ok => output::print(&format!(
            "audit log verified: {} event{}, hash chain intact\n",
            v.verified_events,
            if v.verified_events == 1 { "" } else { "s" }
        ))?,
        Format::Table => output::print(&format!(
            "audit log does NOT verify: event {} is wrong ({}); {} events before it verified\n",
            v.first_bad_sequence.unwrap_or_default(),
            v.error,
            v.verified_events
        ))?,
        _ => output::emit(format, &v, Table::default)?,
    }
    Ok(v.ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_durations_ago_or_timestamps() {
        let ago = parse_time("24h").unwrap();
        let elapsed = SystemTime::now().duration_since(ago).unwrap();
        assert!(elapsed >= Duration::from_secs(24 * 3600));
        let at = parse_time("2026-11-24T09:00:00Z").unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(at).to_string(),
            "2026-11-24T09:00:00Z"
        );
        let err = parse_time("yesterday").unwrap_err();
        assert!(err.contains("neither a duration"), "{err}");
    }

    #[test]
    fn followed_rows_line_up_with_the_header_whatever_their_cells() {
        let header: Vec<String> = HEADER.iter().map(|h| (*h).to_owned()).collect();
        let head: Vec<char> = fixed_line(&header).chars().collect();
        // Where each column but the first starts in the header.
        let starts: Vec<usize> = (2..head.len())
            .filter(|&i| head[i] != ' ' && head[i - 1] == ' ' && head[i - 2] == ' ')
            .collect();
        assert_eq!(starts.len(), HEADER.len() - 1);
        let long = "x".repeat(70);
        let rows = [
            [
                "1",
                "2026-01-01T00:00:00Z",
                "a",
                "UpdatePolicy",
                "shop",
                "1",
                "OK",
                "-",
                "why",
            ],
            [
                "123456789012",
                "2026-01-01T00:00:00Z",
                &long,
                "ListPolicyRevisions",
                &long,
                "1234567890",
                "RISK_NOT_ACKNOWLEDGED",
                &long,
                "a reason\twith a tab",
            ],
        ];
        for cells in rows {
            let cells: Vec<String> = cells.iter().map(|c| (*c).to_owned()).collect();
            let text = fixed_line(&cells);
            let line: Vec<char> = text.chars().collect();
            for &p in &starts {
                assert!(
                    line[p - 2..p] == [' ', ' '] && line[p] != ' ',
                    "column at {p} does not line up:\n{}{text}",
                    head.iter().collect::<String>()
                );
            }
        }
        let cut = fixed_line(&[long.clone(), "b".into()]);
        assert_eq!(cut, format!("{}…  b\n", "x".repeat(7)));
    }
}
