//! README.md's tables of flags against what the binaries say in `--help`, both ways: every
//! flag the README documents exists, and every flag a binary takes is documented.
//!
//! Which table is whose:
//! - A table whose first column is `flag` lists one binary's flags: the binary named by the
//!   nearest heading above it (see [`FLAG_TABLES`]; a flag table under another heading fails).
//!   Its rows name, in that column, exactly the options of `BINARY --help` but `--help` and
//!   `--version`; a row's `env` column names exactly the variables `--help` gives for its
//!   flags. A row without a flag (a variable alone) is not checked against `--help`.
//! - `corsairctl`'s flag table holds its global flags, so it is checked against
//!   `corsairctl --help`, whose options are exactly those.
//! - `corsairctl`'s table whose first column is `command` has a row for every command
//!   (every leaf of the `corsairctl <group> --help` tree but `help`). A row names its
//!   commands at the start of the spans of its first cell (`policy get SERVICE` /
//!   `policy list [--prefix P]`), and must mention, anywhere in the row, every flag those
//!   commands take beyond the global ones; every flag it mentions must be one they take
//!   (global flags included).
//!
//! Flags count only inside `code spans`: `--name`, or `-x` for a short one. The control plane
//! and sidecar asked are the binaries built beside `corsairctl` (see `support::sibling`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use support::{CTL, sibling};

/// The headings whose flag tables belong to each binary.
const FLAG_TABLES: [(&str, &str); 3] = [
    ("Control plane configuration", "corsair-control-plane"),
    ("Sidecar configuration", "corsair-sidecar"),
    ("corsairctl", "corsairctl"),
];

/// One option as `--help` lists it.
#[derive(Debug, Clone, Default)]
struct Opt {
    /// `--long` and `-s`, as written.
    names: Vec<String>,
    /// Its environment variable.
    env: Option<String>,
}

/// A binary's `--help`: its options (but help and version) and its subcommands.
#[derive(Debug, Default)]
struct Help {
    options: Vec<Opt>,
    commands: Vec<String>,
}

impl Help {
    fn option(&self, name: &str) -> Option<&Opt> {
        self.options
            .iter()
            .find(|o| o.names.iter().any(|n| n == name))
    }
}

fn help(bin: &std::path::Path, path: &[&str]) -> Help {
    let out = Command::new(bin).args(path).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{} {path:?} --help: {out:?}",
        bin.display()
    );
    parse_help(&String::from_utf8(out.stdout).unwrap())
}

/// Reads clap's help: option lines are indented at most six spaces in `Options:` (their
/// descriptions more), commands are the first word of each line in `Commands:`.
fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            section = line.trim_end();
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        match section {
            "Options:" if indent <= 6 && trimmed.starts_with('-') => {
                let spec = trimmed.split("  ").next().unwrap();
                let names = spec
                    .split([',', ' '])
                    .filter(|w| w.starts_with('-'))
                    .map(str::to_owned)
                    .collect();
                help.options.push(Opt { names, env: None });
            }
            "Options:" => {}
            "Commands:" if indent <= 2 => {
                let name = trimmed.split_whitespace().next().unwrap();
                if name != "help" {
                    help.commands.push(name.to_owned());
                }
                continue;
            }
            _ => continue,
        }
        if let Some(at) = line.find("[env: ") {
            let rest = &line[at + "[env: ".len()..];
            let end = rest.find(['=', ']']).unwrap();
            help.options.last_mut().unwrap().env = Some(rest[..end].to_owned());
        }
    }
    help.options.retain(|o| {
        !o.names
            .iter()
            .any(|n| ["--help", "--version"].contains(&n.as_str()))
    });
    help
}

/// A table of the README, under its nearest heading.
#[derive(Debug)]
struct Table {
    heading: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }
}

fn readme() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap()
}

fn tables(markdown: &str) -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    let mut heading = String::new();
    let mut in_table = false;
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_owned();
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells = cells(line);
        if !in_table {
            in_table = true;
            tables.push(Table {
                heading: heading.clone(),
                header: cells,
                rows: Vec::new(),
            });
        } else if !cells
            .iter()
            .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-'))
        {
            tables.last_mut().unwrap().rows.push(cells);
        }
    }
    tables
}

/// The cells of a table row; `\|` is a `|` inside a cell.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push(chars.next().unwrap());
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_owned()).collect()
}

/// The `code spans` of a cell.
fn spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// The flags mentioned in code spans of `cells`.
fn flags<'a>(cells: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for cell in cells {
        for span in spans(cell) {
            for word in span.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
                let long = word.len() > 2
                    && word.starts_with("--")
                    && word[2..].starts_with(|c: char| c.is_ascii_lowercase());
                let short = word.len() == 2
                    && word.starts_with('-')
                    && word[1..].starts_with(|c: char| c.is_ascii_alphabetic());
                if long || short {
                    flags.insert(word.to_owned());
                }
            }
        }
    }
    flags
}

/// The variables named in code spans of a cell.
fn envs(cell: &str) -> BTreeSet<String> {
    spans(cell)
        .into_iter()
        .flat_map(|s| s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| {
            w.contains('_')
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
        .collect()
}

/// Checks one binary's flag table against its help; returns what is wrong.
fn check_flag_table(bin: &str, table: &Table, help: &Help) -> Vec<String> {
    let mut wrong = Vec::new();
    let env_column = table.column("env");
    let mut documented = BTreeSet::new();
    for row in &table.rows {
        let row_flags = flags(std::iter::once(&row[0]));
        let mut help_envs = BTreeSet::new();
        for flag in &row_flags {
            match help.option(flag) {
                Some(opt) => {
                    documented.extend(opt.names.iter().cloned());
                    help_envs.extend(opt.env.clone());
                }
                None => wrong.push(format!(
                    "README ({}) lists `{flag}`, which `{bin} --help` does not have",
                    table.heading
                )),
            }
        }
        if let Some(column) = env_column
            && !row_flags.is_empty()
        {
            let readme_envs = envs(&row[column]);
            if readme_envs != help_envs {
                wrong.push(format!(
                    "README ({}) gives {row_flags:?} the variables {readme_envs:?}; \
                     `{bin} --help` gives {help_envs:?}",
                    table.heading
                ));
            }
        }
    }
    for opt in &help.options {
        if !opt.names.iter().any(|n| documented.contains(n)) {
            wrong.push(format!(
                "`{bin} --help` has {}, which the README's table under \"{}\" does not list",
                opt.names.join(", "),
                table.heading
            ));
        }
    }
    wrong
}

/// Every command of corsairctl, as its words (`policy apply`), with its help.
fn ctl_commands() -> BTreeMap<String, Help> {
    let mut leaves = BTreeMap::new();
    let mut pending = vec![Vec::<String>::new()];
    while let Some(path) = pending.pop() {
        let words: Vec<&str> = path.iter().map(String::as_str).collect();
        let help = help(CTL.as_ref(), &words);
        if help.commands.is_empty() {
            leaves.insert(path.join(" "), help);
        } else {
            for command in &help.commands {
                let mut sub = path.clone();
                sub.push(command.clone());
                pending.push(sub);
            }
        }
    }
    leaves
}

/// Checks corsairctl's command table; returns what is wrong.
fn check_command_table(table: &Table, globals: &Help) -> Vec<String> {
    let commands = ctl_commands();
    let global: BTreeSet<&String> = globals.options.iter().flat_map(|o| &o.names).collect();
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &table.rows {
        let mut named = Vec::new();
        for span in spans(&row[0]) {
            let words: Vec<&str> = span.split_whitespace().collect();
            let command = (1..=words.len())
                .rev()
                .map(|n| words[..n].join(" "))
                .find(|c| commands.contains_key(c));
            match command {
                Some(c) => named.push(c),
                None => wrong.push(format!("README row `{span}` names no corsairctl command")),
            }
        }
        let row_flags = flags(row);
        for command in &named {
            seen.insert(command.clone());
            for opt in &commands[command].options {
                let is_global = opt.names.iter().any(|n| global.contains(n));
                if !is_global && !opt.names.iter().any(|n| row_flags.contains(n)) {
                    wrong.push(format!(
                        "`corsairctl {command}` takes {}, which its README row does not mention",
                        opt.names.join(", ")
                    ));
                }
            }
        }
        for flag in &row_flags {
            let known = named.iter().any(|c| commands[c].option(flag).is_some());
            if !known {
                wrong.push(format!(
                    "README row for {named:?} mentions `{flag}`, which none of them takes"
                ));
            }
        }
    }
    for command in commands.keys() {
        if !seen.contains(command) {
            wrong.push(format!("`corsairctl {command}` has no row in the README"));
        }
    }
    wrong
}

#[test]
fn readme_flag_tables_match_every_binarys_help_both_ways() {
    let readme = readme();
    let tables = tables(&readme);
    let mut wrong = Vec::new();
    let mut checked = BTreeSet::new();
    for table in tables.iter().filter(|t| t.header[0] == "flag") {
        let Some((_, bin)) = FLAG_TABLES.iter().find(|(h, _)| *h == table.heading) else {
            wrong.push(format!(
                "a flag table under \"{}\", which names no binary (see FLAG_TABLES)",
                table.heading
            ));
            continue;
        };
        let path = if *bin == "corsairctl" {
            PathBuf::from(CTL)
        } else {
            sibling(bin)
        };
        wrong.extend(check_flag_table(bin, table, &help(&path, &[])));
        checked.insert(*bin);
    }
    for (heading, bin) in FLAG_TABLES {
        if !checked.contains(bin) {
            wrong.push(format!("no flag table for {bin} under \"{heading}\""));
        }
    }
    let commands: Vec<&Table> = tables.iter().filter(|t| t.header[0] == "command").collect();
    assert_eq!(commands.len(), 1, "one table of corsairctl's commands");
    wrong.extend(check_command_table(commands[0], &help(CTL.as_ref(), &[])));
    assert!(wrong.is_empty(), "README.md:\n{}", wrong.join("\n"));
}

#[test]
fn help_and_tables_parse_as_expected() {
    let help = parse_help(
        "Does things\n\nUsage: x [OPTIONS]\n\nCommands:\n  get   Gets\n  help  Help\n\n\
         Options:\n  -o, --output <OUTPUT>\n          Format\n\n          [env: X_OUT=]\n\
         \x20     --token <TOKEN>\n          A token; see --output\n          [env: X_TOKEN]\n\
         \x20 -h, --help\n          Print help\n",
    );
    assert_eq!(help.commands, ["get"]);
    assert_eq!(help.options.len(), 2);
    assert_eq!(help.options[0].names, ["-o", "--output"]);
    assert_eq!(help.options[0].env.as_deref(), Some("X_OUT"));
    assert_eq!(help.options[1].env.as_deref(), Some("X_TOKEN"));

    let tables = tables(
        "## A\n\n| flag | env |\n|---|---|\n| `--a`, `-b` | `X_A` |\n\n### B\n\n\
         | command | does |\n|---|---|\n| `c (--d \\| -e)` | `-` alone, `--f N` |\n",
    );
    assert_eq!(tables.len(), 2);
    assert_eq!(
        (tables[0].heading.as_str(), tables[1].heading.as_str()),
        ("A", "B")
    );
    assert_eq!(
        flags(&tables[0].rows[0]),
        ["--a", "-b"].map(String::from).into()
    );
    assert_eq!(envs(&tables[0].rows[0][1]), ["X_A".to_owned()].into());
    assert_eq!(tables[1].rows[0][0], "`c (--d | -e)`");
    assert_eq!(
        flags(&tables[1].rows[0]),
        ["--d", "--f", "-e"].map(String::from).into()
    );
}
