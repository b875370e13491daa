//! Routes: the canonical form of a route path, the readings of a request path, and the
//! route table that finds the route of a request.
//!
//! A request path is matched in every way a server might read it: the steps servers take
//! before routing (dropping `;parameters`, decoding escapes — RFC 3986's unreserved ones,
//! every one, or every one twice —, reading `\` as `/`, removing dot segments, merging `//`,
//! ignoring letter case), each taken or not. When the readings select different routes the
//! request is ambiguous and denied: a route never applies to a path the upstream may serve
//! as another. A plain path (literal bytes only, no `//`, no dot segment: what browsers send)
//! reads one way, or two where case matters, and is looked up without allocating, at one hash
//! probe per `/` whatever the number of routes.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU16;

use foldhash::fast::RandomState;

/// At most this many routes in a policy.
pub const MAX_ROUTES: usize = 1000;
/// At most this many bytes in a route path.
pub const MAX_ROUTE_PATH_BYTES: usize = 1024;

/// A route of a policy, by its place in the policy's `routes`. Two bytes, so that a
/// [`Decision`](crate::Decision) can name its route and stay as small as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteIndex(NonZeroU16);

impl RouteIndex {
    /// The route at `index`, if `index` is below [`MAX_ROUTES`].
    pub fn new(index: usize) -> Option<RouteIndex> {
        if index >= MAX_ROUTES {
            return None;
        }
        u16::try_from(index + 1)
            .ok()
            .and_then(NonZeroU16::new)
            .map(RouteIndex)
    }

    /// The index into the policy's `routes`.
    pub fn get(self) -> usize {
        usize::from(self.0.get() - 1)
    }
}

impl fmt::Display for RouteIndex {
    /// The route's field path, `routes[2]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "routes[{}]", self.get())
    }
}

/// Bytes a canonical path holds as they are: unreserved characters, sub-delimiters except
/// `;`, `:`, `@` and `/` (RFC 3986 `pchar` and the separator). Every other byte is
/// percent-encoded.
const LITERAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
            );
        b += 1;
    }
    table
};

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte a valid escape at `bytes[i..]` stands for.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let high = hex_value(*bytes.get(i + 1)?)?;
    let low = hex_value(*bytes.get(i + 2)?)?;
    Some(high << 4 | low)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

/// Why `path` is not a canonical route path; `Ok` when it is one.
///
/// Canonical: starts with `/`, at most [`MAX_ROUTE_PATH_BYTES`] bytes, no query or
/// fragment, no empty segment (`//`) or dot segment (`.`, `..`), no `\` or `;`, and
/// percent-escapes in uppercase only for bytes that need one, never for `/`, `\`, `;` or `%`
/// (servers disagree on what those mean).
pub fn check_path(path: &str) -> Result<(), String> {
    let problem = path_problem(path);
    match problem {
        None => Ok(()),
        Some(problem) => {
            let suggestion = String::from_utf8(normalized(path.as_bytes()))
                .ok()
                .filter(|s| s != path && path.starts_with('/') && path_problem(s).is_none());
            Err(match suggestion {
                Some(s) => format!("{problem}; write {s}"),
                None => problem,
            })
        }
    }
}

fn path_problem(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    if !path.starts_with('/') {
        return Some(format!("{path:?} does not start with /"));
    }
    if path.len() > MAX_ROUTE_PATH_BYTES {
        return Some(format!(
            "the path has {} bytes; the limit is {MAX_ROUTE_PATH_BYTES}",
            path.len()
        ));
    }
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'?' | b'#' => {
                return Some("a route matches paths only: no query (?) or fragment (#)".to_owned());
            }
            b'\\' => {
                return Some(
                    "\\ is read as / by some servers and not by others: a route cannot contain it"
                        .to_owned(),
                );
            }
            b';' => {
                return Some(
                    "; starts a path parameter that some servers drop: a route cannot contain it"
                        .to_owned(),
                );
            }
            b'%' => {
                let Some(decoded) = escape_at(bytes, i) else {
                    return Some("% must start an escape of two hex digits".to_owned());
                };
                let escape = &path[i..i + 3];
                if matches!(decoded, b'/' | b'\\' | b';' | b'%') {
                    return Some(format!(
                        "{escape} (an encoded {}) is decoded by some servers and not by others: a route cannot contain it",
                        decoded as char
                    ));
                }
                if LITERAL[usize::from(decoded)] {
                    return Some(format!(
                        "{escape} escapes {:?}, which needs no escape",
                        decoded as char
                    ));
                }
                if escape.bytes().any(|b| b.is_ascii_lowercase()) {
                    return Some(format!("escapes are written in uppercase: {escape}"));
                }
            }
            _ if !LITERAL[usize::from(b)] => {
                return Some(format!(
                    "{:?} must be percent-encoded",
                    String::from_utf8_lossy(&[b])
                ));
            }
            _ => {}
        }
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" if segments.peek().is_some() => {
                return Some("empty segment (//)".to_owned());
            }
            "." | ".." => {
                return Some(
                    "dot segments (. and ..) are resolved before matching: write the path they lead to"
                        .to_owned(),
                );
            }
            _ => {}
        }
    }
    None
}

/// Byte classes for [`scan`]: one table lookup per byte of a path.
const NOT_LITERAL: u8 = 1;
const UPPER: u8 = 2;
/// `/`; shifted left once, it lands on [`AFTER_SLASH`].
const SLASH: u8 = 4;
/// `/` and `.`: a path is not plain where one follows a `/` (`//`, maybe a dot segment).
const AFTER_SLASH: u8 = 8;
const END: u8 = 16;

const CLASS: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'?' | b'#' => END,
            b'/' => SLASH | AFTER_SLASH,
            b'.' => AFTER_SLASH,
            b'A'..=b'Z' => UPPER,
            _ if LITERAL[b] => 0,
            _ => NOT_LITERAL,
        };
        b += 1;
    }
    table
};

/// Scans a request target up to its query or fragment: the path's length, whether the path
/// is plain (every reading of it is itself: literal bytes only, no `//`, no dot segment), and
/// whether it has an uppercase letter. A table lookup and a few bit operations per byte, with
/// no branch but the end's.
#[inline]
fn scan(target: &[u8]) -> (usize, bool, bool) {
    let mut seen = 0u8;
    let mut pairs = 0u8;
    let mut previous = 0u8;
    let mut end = target.len();
    for (i, &b) in target.iter().enumerate() {
        let class = CLASS[usize::from(b)];
        if class & END != 0 {
            end = i;
            break;
        }
        seen |= class;
        pairs |= (previous << 1) & class;
        previous = class;
    }
    let path = &target[..end];
    let plain =
        seen & NOT_LITERAL == 0 && (pairs & AFTER_SLASH == 0 || !has_empty_or_dot_segment(path));
    (end, plain, seen & UPPER != 0)
}

/// Whether a path has an empty segment (`//`) or a `.` or `..` segment.
#[cold]
fn has_empty_or_dot_segment(path: &[u8]) -> bool {
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == b"." || segment == b".." {
            return true;
        }
    }
    false
}

/// Removes dot segments (RFC 3986 §5.2.4) from a path starting with `/`; with `merge`, also
/// empty segments (`//` read as `/`, as nginx does).
fn resolve_segments(path: &[u8], merge: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    // Where each segment kept so far starts in `out`, for `..` to pop it.
    let mut starts = Vec::new();
    let mut trailing = false;
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        match segment {
            b"" if merge || segments.peek().is_none() => trailing = true,
            b"." => trailing = true,
            b".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                trailing = true;
            }
            _ => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(segment);
                trailing = false;
            }
        }
    }
    if trailing || out.is_empty() {
        out.push(b'/');
    }
    out
}

/// `//` read as `/`, nothing else changed.
fn merge_slashes(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if !(b == b'/' && out.last() == Some(&b'/')) {
            out.push(b);
        }
    }
    out
}

/// The RFC 3986 normalization of a path's escapes (§6.2.2): escapes of unreserved
/// characters decoded (`%2e` is `.`), the others in uppercase, and every byte that needs an
/// escape given one.
fn normalize_escapes(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match escape_at(path, i) {
            Some(b) if is_unreserved(b) => {
                out.push(b);
                i += 3;
            }
            Some(b) => {
                push_escaped(&mut out, b);
                i += 3;
            }
            None => {
                let b = path[i];
                if LITERAL[usize::from(b)] {
                    out.push(b);
                } else {
                    push_escaped(&mut out, b);
                }
                i += 1;
            }
        }
    }
    out
}

/// The RFC 3986 normalization of a path (§6.2.2): escapes normalized, dot segments removed,
/// `//` merged. Suggests the canonical form of a route path that is not one.
fn normalized(path: &[u8]) -> Vec<u8> {
    resolve_segments(&normalize_escapes(path), true)
}

/// Decodes every valid escape.
fn decode_all(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match escape_at(input, i) {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(input[i]);
                i += 1;
            }
        }
    }
    out
}

/// Every byte that needs an escape given one: decoded bytes in canonical form.
fn encode(decoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(decoded.len());
    for &b in decoded {
        if LITERAL[usize::from(b)] {
            out.push(b);
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// `;parameters` dropped from each segment (`/a;x=1/b` is `/a/b`).
fn strip_parameters(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut in_parameter = false;
    for &b in path {
        match b {
            b'/' => {
                in_parameter = false;
                out.push(b);
            }
            b';' => in_parameter = true,
            _ if in_parameter => {}
            _ => out.push(b),
        }
    }
    out
}

/// `path` with its ASCII letters lowercased, except the hex digits of escapes (when it has
/// escapes still).
fn folded(path: &[u8], decoded: bool) -> Vec<u8> {
    let mut out = path.to_vec();
    if decoded {
        out.make_ascii_lowercase();
        return out;
    }
    let mut i = 0;
    while i < out.len() {
        if escape_at(&out, i).is_some() {
            i += 3;
        } else {
            out[i].make_ascii_lowercase();
            i += 1;
        }
    }
    out
}

/// Whether `path` has an uppercase letter outside escapes.
fn has_upper(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        if escape_at(path, i).is_some() {
            i += 3;
        } else {
            if path[i].is_ascii_uppercase() {
                return true;
            }
            i += 1;
        }
    }
    false
}

/// A path that is not plain and longer than this is refused rather than read every way (a
/// route path is at most [`MAX_ROUTE_PATH_BYTES`]).
pub const MAX_READ_PATH_BYTES: usize = 2 * MAX_ROUTE_PATH_BYTES;
/// A path that reads more ways than this is refused.
pub const MAX_READINGS: usize = 32;
/// A path whose readings would hold more bytes than this in all is refused: what a hostile
/// path costs to read is bounded by it, not by the path's length times [`MAX_READINGS`].
pub const MAX_READ_BYTES: usize = 16 * 1024;

/// How many ways a path of `len` bytes may read.
fn readings_limit(len: usize) -> usize {
    (MAX_READ_BYTES / len.max(1)).min(MAX_READINGS)
}

/// One way a server may read a path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reading {
    bytes: Vec<u8>,
    /// Whether its escapes were decoded (it is then compared in canonical form).
    decoded: bool,
    /// Whether its letters were lowercased (it is then looked up among the lowercased route
    /// paths).
    folded: bool,
}

impl Reading {
    /// The reading in the form route paths are written in.
    fn key(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.decoded {
            encode(&self.bytes).into()
        } else {
            self.bytes.as_slice().into()
        }
    }

    /// Another reading made the same way, of `bytes`.
    fn with(&self, bytes: Vec<u8>) -> Reading {
        Reading {
            bytes,
            decoded: self.decoded,
            folded: self.folded,
        }
    }
}

/// Adds to `readings` what `step` makes of each of them, if new; `None` beyond `limit`.
fn grow(
    readings: &mut Vec<Reading>,
    limit: usize,
    step: impl Fn(&Reading) -> Vec<Reading>,
) -> Option<()> {
    for i in 0..readings.len() {
        for made in step(&readings[i]) {
            if !readings.contains(&made) {
                readings.push(made);
            }
        }
        if readings.len() > limit {
            return None;
        }
    }
    Some(())
}

/// Every way a server may read `path`: the steps servers take, each taken or not, in the
/// order they take them: `;parameters` dropped; escapes decoded (none, RFC 3986's
/// unreserved only, every one once, or twice); `\` read as `/`; `;parameters` dropped (after
/// decoding); dot segments removed, `//` merged, or both; letters lowercased (where `fold`,
/// or where a reading has an uppercase letter). `None` when there are more different ones
/// than [`MAX_READINGS`], or than fit in [`MAX_READ_BYTES`].
fn all_readings(path: &[u8], fold: bool) -> Option<Vec<Reading>> {
    let limit = readings_limit(path.len());
    let mut readings = vec![Reading {
        bytes: path.to_vec(),
        decoded: false,
        folded: false,
    }];
    let parameters = |r: &Reading| {
        if r.bytes.contains(&b';') {
            vec![r.with(strip_parameters(&r.bytes))]
        } else {
            Vec::new()
        }
    };
    grow(&mut readings, limit, parameters)?;
    grow(&mut readings, limit, |r| {
        if !r.bytes.contains(&b'%') {
            return Vec::new();
        }
        let once = decode_all(&r.bytes);
        let twice = once.contains(&b'%').then(|| decode_all(&once));
        let decoded = |bytes| Reading {
            bytes,
            decoded: true,
            folded: false,
        };
        let mut made = vec![r.with(normalize_escapes(&r.bytes)), decoded(once)];
        made.extend(twice.map(decoded));
        made
    })?;
    grow(&mut readings, limit, |r| {
        if r.bytes.contains(&b'\\') {
            let slashes = r.bytes.iter().map(|&b| if b == b'\\' { b'/' } else { b });
            vec![r.with(slashes.collect())]
        } else {
            Vec::new()
        }
    })?;
    grow(&mut readings, limit, parameters)?;
    grow(&mut readings, limit, |r| {
        if has_empty_or_dot_segment(&r.bytes) {
            vec![
                r.with(resolve_segments(&r.bytes, false)),
                r.with(resolve_segments(&r.bytes, true)),
                r.with(merge_slashes(&r.bytes)),
            ]
        } else {
            Vec::new()
        }
    })?;
    grow(&mut readings, limit, |r| {
        if fold || has_upper(&r.bytes) || (r.decoded && r.bytes.iter().any(u8::is_ascii_uppercase))
        {
            vec![Reading {
                bytes: folded(&r.bytes, r.decoded),
                decoded: r.decoded,
                folded: true,
            }]
        } else {
            Vec::new()
        }
    })?;
    Some(readings)
}

/// The distinct readings of a request target's path (query and fragment dropped), in the
/// form route paths are written in, as sent first (see the module's documentation). A
/// target that is not a path (`*`, empty) has none; one that reads too many ways, only
/// itself.
pub fn readings(target: &str) -> Vec<String> {
    let (end, _, _) = scan(target.as_bytes());
    let path = &target.as_bytes()[..end];
    if path.first() != Some(&b'/') {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    let all = all_readings(path, false).unwrap_or_else(|| {
        vec![Reading {
            bytes: path.to_vec(),
            decoded: false,
            folded: false,
        }]
    });
    for reading in all.iter().filter(|r| !r.folded) {
        let reading = String::from_utf8_lossy(&reading.key()).into_owned();
        if !out.contains(&reading) {
            out.push(reading);
        }
    }
    out
}

/// A set of lengths up to [`MAX_ROUTE_PATH_BYTES`].
#[derive(Debug, Default)]
struct Lengths([u64; MAX_ROUTE_PATH_BYTES / 64 + 1]);

impl Lengths {
    fn insert(&mut self, len: usize) {
        self.0[len / 64] |= 1 << (len % 64);
    }

    #[inline]
    fn contains(&self, len: usize) -> bool {
        self.0
            .get(len / 64)
            .is_some_and(|w| w & (1 << (len % 64)) != 0)
    }
}

/// A route in a [`Paths`] map.
#[derive(Debug, Clone, Copy)]
struct Slot {
    route: RouteIndex,
    /// For a prefix: whether an exact route lies under it. When none does, a path whose
    /// longest prefix this is needs no exact lookup: an exact route for it would lie under.
    exact_beneath: bool,
}

/// Route paths of one kind (exact or prefix), by bytes.
#[derive(Debug, Default)]
struct Paths {
    map: HashMap<Box<[u8]>, Slot, RandomState>,
    /// The lengths present, so a probe for a length no route has hashes nothing.
    lengths: Lengths,
    /// The longest path.
    max_len: usize,
}

impl Paths {
    fn insert(&mut self, path: &[u8], route: RouteIndex) {
        if path.len() <= MAX_ROUTE_PATH_BYTES {
            self.map.entry(path.into()).or_insert(Slot {
                route,
                exact_beneath: false,
            });
            self.lengths.insert(path.len());
            self.max_len = self.max_len.max(path.len());
        }
    }

    #[inline]
    fn get(&self, path: &[u8]) -> Option<Slot> {
        if !self.lengths.contains(path.len()) {
            return None;
        }
        self.map.get(path).copied()
    }
}

/// Exact paths and prefixes.
#[derive(Debug, Default)]
struct Table {
    exact: Paths,
    prefixes: Paths,
}

impl Table {
    /// A table of paths (the first of equal paths wins).
    fn new<'a>(paths: impl Iterator<Item = (RouteIndex, &'a [u8])> + Clone) -> Table {
        let mut table = Table::default();
        for (route, path) in paths.clone() {
            if path.ends_with(b"/") {
                table.prefixes.insert(path, route);
            } else {
                table.exact.insert(path, route);
            }
        }
        for (_, path) in paths.filter(|(_, p)| !p.ends_with(b"/")) {
            for (k, _) in path.iter().enumerate().filter(|&(_, &b)| b == b'/') {
                if let Some(slot) = table.prefixes.map.get_mut(&path[..=k]) {
                    slot.exact_beneath = true;
                }
            }
        }
        table
    }

    /// The route of a path in canonical form: its exact route, else the longest prefix
    /// ending at one of its `/`.
    #[inline]
    fn find(&self, path: &[u8]) -> Option<RouteIndex> {
        match self.find_prefix(path) {
            Some(prefix) if !prefix.exact_beneath => Some(prefix.route),
            prefix => self.exact.get(path).or(prefix).map(|slot| slot.route),
        }
    }

    #[inline]
    fn find_prefix(&self, path: &[u8]) -> Option<Slot> {
        // Every `/` within reach of the longest prefix, longest prefix first.
        let limit = path.len().min(self.prefixes.max_len);
        (0..limit)
            .rev()
            .filter(|&k| path[k] == b'/')
            .find_map(|k| self.prefixes.get(&path[..=k]))
    }
}

/// Two routes that readings of one path select (`None`: the policy's own rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Disagreement(pub(crate) Option<RouteIndex>, pub(crate) Option<RouteIndex>);

/// The routes of a policy, for finding the route of a request.
#[derive(Debug)]
pub(crate) struct RouteTable {
    table: Table,
    /// The paths lowercased, when some route path has an uppercase letter (otherwise a
    /// lowercased reading is looked up in `table`).
    folded: Option<Table>,
}

impl RouteTable {
    /// A table of route paths (canonical, as lint requires, and at most [`MAX_ROUTES`]), by
    /// index.
    pub(crate) fn new<'a>(paths: impl Iterator<Item = &'a str>) -> RouteTable {
        let paths: Vec<(RouteIndex, &str)> = paths
            .enumerate()
            .map_while(|(i, path)| Some((RouteIndex::new(i)?, path)))
            .collect();
        let table = Table::new(paths.iter().map(|&(i, p)| (i, p.as_bytes())));
        let folded = paths.iter().any(|(_, p)| has_upper(p.as_bytes())).then(|| {
            let lowered: Vec<(RouteIndex, Vec<u8>)> = paths
                .iter()
                .map(|&(i, p)| (i, folded(p.as_bytes(), false)))
                .collect();
            Table::new(lowered.iter().map(|(i, p)| (*i, p.as_slice())))
        });
        RouteTable { table, folded }
    }

    fn folded_table(&self) -> &Table {
        self.folded.as_ref().unwrap_or(&self.table)
    }

    /// The route of a request target (its path and query): `Ok` with the route every reading
    /// of the path selects (`None`: no route, the policy's own rules), or `Err` with two
    /// routes readings disagree on.
    #[inline]
    pub(crate) fn select(&self, target: &str) -> Result<Option<RouteIndex>, Disagreement> {
        let bytes = target.as_bytes();
        let (end, plain, upper) = scan(bytes);
        let path = &bytes[..end];
        if path.first() != Some(&b'/') {
            return Ok(None);
        }
        if !plain {
            return self.select_readings(path);
        }
        let found = self.table.find(path);
        if !upper && self.folded.is_none() {
            return Ok(found);
        }
        // A server that ignores case: the path lowercased, on the stack. An exact route is
        // never longer than the buffer, and prefixes need no more than it holds.
        let mut buffer = [0u8; MAX_ROUTE_PATH_BYTES];
        let n = path.len().min(MAX_ROUTE_PATH_BYTES);
        for (to, from) in buffer.iter_mut().zip(path) {
            *to = from.to_ascii_lowercase();
        }
        let table = self.folded_table();
        let lowered = &buffer[..n];
        let found_lowered = if path.len() <= MAX_ROUTE_PATH_BYTES {
            table.find(lowered)
        } else {
            table.find_prefix(lowered).map(|slot| slot.route)
        };
        if found_lowered == found {
            Ok(found)
        } else {
            Err(Disagreement(found, found_lowered))
        }
    }

    /// Every reading of a path that is not plain. One too long, or that reads too many
    /// ways, is refused (as a disagreement of its literal reading with itself).
    #[cold]
    fn select_readings(&self, path: &[u8]) -> Result<Option<RouteIndex>, Disagreement> {
        let literal = self.table.find(path);
        let readings = (path.len() <= MAX_READ_PATH_BYTES)
            .then(|| all_readings(path, self.folded.is_some()))
            .flatten();
        let Some(readings) = readings else {
            return Err(Disagreement(literal, literal));
        };
        for reading in &readings {
            let table = if reading.folded {
                self.folded_table()
            } else {
                &self.table
            };
            let route = table.find(&reading.key());
            if route != literal {
                return Err(Disagreement(literal, route));
            }
        }
        Ok(literal)
    }

    /// Every route the readings of a path select, for explaining an ambiguous path.
    pub(crate) fn routes_of(&self, target: &str) -> Vec<Option<RouteIndex>> {
        let (end, _, _) = scan(target.as_bytes());
        let path = &target.as_bytes()[..end];
        let mut routes = vec![self.table.find(path)];
        for reading in all_readings(path, self.folded.is_some()).unwrap_or_default() {
            let table = if reading.folded {
                self.folded_table()
            } else {
                &self.table
            };
            let route = table.find(&reading.key());
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
        routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized_str(path: &str) -> String {
        String::from_utf8(normalized(path.as_bytes())).unwrap()
    }

    #[test]
    fn segments_resolve_as_rfc_3986_says() {
        for (path, merged, kept) in [
            ("/", "/", "/"),
            ("/a/b", "/a/b", "/a/b"),
            ("/a/b/", "/a/b/", "/a/b/"),
            ("/a//b", "/a/b", "/a//b"),
            ("//a", "/a", "//a"),
            ("/a/./b", "/a/b", "/a/b"),
            ("/a/../b", "/b", "/b"),
            ("/a//../b", "/b", "/a/b"),
            ("/a/..", "/", "/"),
            ("/a/b/..", "/a/", "/a/"),
            ("/a/.", "/a/", "/a/"),
            ("/..", "/", "/"),
            ("/a/b/../../../c", "/c", "/c"),
            ("/a/.b/..c", "/a/.b/..c", "/a/.b/..c"),
        ] {
            let resolve =
                |merge| String::from_utf8(resolve_segments(path.as_bytes(), merge)).unwrap();
            assert_eq!(resolve(true), merged, "{path}, merged");
            assert_eq!(resolve(false), kept, "{path}, kept");
        }
    }

    #[test]
    fn normalized_decodes_only_unreserved_escapes() {
        assert_eq!(normalized_str("/%61pi/%2e%2e/x"), "/x");
        assert_eq!(normalized_str("/a%2fb"), "/a%2Fb");
        assert_eq!(normalized_str("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(normalized_str("/a;b\\c"), "/a%3Bb%5Cc");
        assert_eq!(normalized_str("/a%zz"), "/a%25zz");
    }

    #[test]
    fn a_path_reads_every_way_a_server_may_read_it() {
        let has = |target: &str, reading: &str| {
            let all = readings(target);
            assert!(all.contains(&reading.to_owned()), "{target}: {all:?}");
        };
        has("/api/..%2Fpublic/x", "/api/..%2Fpublic/x");
        has("/api/..%2Fpublic/x", "/public/x");
        has("/api%2f..%5c", "/api/..%5C");
        has("/api%2f..%5c", "/");
        has("/api\\..\\public\\x", "/public/x");
        has("/api%5C..%5Cpublic", "/public");
        has("/public/..;/api/x", "/api/x");
        has("/public/..;/api/x", "/public/../api/x");
        has("/api;jsessionid=1/x;a=b", "/api/x");
        has("/api/%252e%252e/public", "/api/%252e%252e/public");
        has("/api/%252e%252e/public", "/public");
        has("/a//../b", "/a/b");
        has("/a//../b", "/b");
        has("/a%20b/./c", "/a%20b/c");
        has("/a%3Fb?q", "/a%3Fb");
        has("/a%21", "/a!");
        assert_eq!(readings("/plain/path?x"), ["/plain/path"]);
        assert!(readings("*").is_empty());
    }

    #[test]
    fn a_path_that_reads_too_many_ways_has_no_readings_beyond_itself() {
        let wild = "/a%2F..;b\\%252e//..%5C;/%41/../..";
        assert!(all_readings(wild.as_bytes(), true).is_none());
        assert_eq!(readings(wild), [wild]);
    }

    #[test]
    fn plain_paths_are_recognized() {
        for (target, plain) in [
            ("/api/v1/items", true),
            ("/api/v1/items?x=/../y", true),
            ("/.well-known/x", true),
            ("/a/...", true),
            ("/a/./b", false),
            ("/a/../b", false),
            ("/a/..", false),
            ("/a/.?x", false),
            ("/a//b", false),
            ("/a%2Fb", false),
            ("/a\\b", false),
            ("/a;b", false),
            ("/a b", false),
        ] {
            assert_eq!(scan(target.as_bytes()).1, plain, "{target}");
        }
    }

    #[test]
    fn canonical_paths() {
        for ok in [
            "/",
            "/api/",
            "/api/health",
            "/caf%C3%A9/",
            "/a:b@c!$&'()*+,=/",
            "/.well-known/",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("", "does not start with /"),
            ("api/", "does not start with /"),
            ("/a//b", "empty segment (//); write /a/b"),
            ("/a/./b", "dot segments"),
            ("/a/../b", "write /b"),
            ("/a\\b", "\\ is read as /"),
            ("/a;b", "path parameter"),
            ("/a?b", "no query"),
            ("/a#b", "fragment"),
            ("/a%2Fb", "encoded /"),
            ("/a%2fb", "encoded /"),
            ("/a%25b", "encoded %"),
            ("/a%3Bb", "encoded ;"),
            ("/a%5Cb", "encoded \\"),
            ("/%61pi/", "needs no escape; write /api/"),
            ("/%21", "needs no escape"),
            ("/caf%c3%a9", "uppercase: %c3; write /caf%C3%A9"),
            ("/a b", "must be percent-encoded; write /a%20b"),
            ("/a%zz", "two hex digits"),
        ] {
            let err = check_path(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_ROUTE_PATH_BYTES))).is_err());
    }
}
