//! Output: aligned tables for people, JSON and YAML for scripts.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde::Serialize;
use tabwriter::TabWriter;

use crate::error::CliError;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON; a streaming command prints one object per line.
    Json,
    /// YAML; a streaming command prints one document per event.
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` for the table format.
pub fn emit<T: Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce() -> Table,
) -> Result<(), CliError> {
    let text = match format {
        Format::Table => table().render(),
        Format::Json => json(value)? + "\n",
        Format::Yaml => yaml(value)?,
    };
    print(&text)
}

/// `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(value).map_err(|e| CliError::Local(format!("cannot print: {e}")))
}

/// `value` as YAML.
pub fn yaml<T: Serialize>(value: &T) -> Result<String, CliError> {
    serde_saphyr::to_string(value).map_err(|e| CliError::Local(format!("cannot print: {e}")))
}

/// Writes `text` to standard output. A closed pipe (`| head`) is
/// [`CliError::OutputClosed`], which ends the command quietly and successfully.
pub fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::OutputClosed),
        Err(e) => Err(CliError::Local(format!("cannot write output: {e}"))),
    }
}

/// Rows under a header, aligned on render.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The aligned text, two spaces between columns.
    pub fn render(&self) -> String {
        let mut tw = TabWriter::new(Vec::new()).padding(2);
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace(['\t', '\n'], " ")).collect();
            // Writing to a Vec cannot fail.
            let _ = writeln!(tw, "{}", cells.join("\t"));
        }
        let bytes = tw.into_inner().unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The last second RFC 3339 can write, 9999-12-31T23:59:59Z.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

/// A timestamp as RFC 3339 in UTC, to the second; one outside years 1970 to 9999 (which a
/// well-behaved server never sends) as its seconds since the epoch, `@<seconds>`.
pub fn timestamp(t: &prost_types::Timestamp) -> String {
    if !(0..=LAST_RFC3339_SECOND).contains(&t.seconds) {
        return format!("@{}", t.seconds);
    }
    humantime::format_rfc3339_seconds(system_time(t)).to_string()
}

/// An optional timestamp, `-` when absent.
pub fn timestamp_or_dash(t: Option<&prost_types::Timestamp>) -> String {
    t.map_or_else(|| "-".to_owned(), timestamp)
}

fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    let nanos = Duration::new(
        t.seconds.unsigned_abs(),
        t.nanos.clamp(0, 999_999_999) as u32,
    );
    let time = if t.seconds >= 0 {
        UNIX_EPOCH.checked_add(nanos)
    } else {
        UNIX_EPOCH.checked_sub(nanos)
    };
    time.unwrap_or(UNIX_EPOCH)
}

/// How long ago `t` was, shortly: `42s`, `5m`, `3h`, `2d`.
pub fn age(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return "-".to_owned();
    };
    let secs = SystemTime::now()
        .duration_since(system_time(t))
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// A list cut to `max` characters, with how many entries were left out.
pub fn list(items: &[String], max: usize) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        if !out.is_empty() && out.len() + sep.len() + item.len() > max {
            out.push_str(&format!(",+{} more", items.len() - i));
            break;
        }
        out.push_str(sep);
        out.push_str(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_out_of_range_print_without_panicking() {
        let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(timestamp(&at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(&at(LAST_RFC3339_SECOND + 1)), "@253402300800");
        assert_eq!(timestamp(&at(i64::MAX)), format!("@{}", i64::MAX));
        assert_eq!(timestamp(&at(i64::MIN)), format!("@{}", i64::MIN));
        assert_eq!(age(Some(&at(i64::MAX))), "0s");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["SERVICE", "MODE"]);
        t.row(vec!["a-long-name".into(), "standard".into()]);
        t.row(vec!["b".into(), "shadow".into()]);
        assert_eq!(
            t.render(),
            "SERVICE      MODE\na-long-name  standard\nb            shadow\n"
        );
    }

    #[test]
    fn long_lists_are_cut() {
        let items: Vec<String> = [
            "https://a.example",
            "https://b.example",
            "https://c.example",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            list(&items, 40),
            "https://a.example,https://b.example,+1 more"
        );
        assert_eq!(list(&[], 40), "-");
    }

    #[test]
    fn timestamps_are_utc_seconds() {
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        };
        assert_eq!(timestamp(&t), "2023-11-14T22:13:20Z");
    }
}
