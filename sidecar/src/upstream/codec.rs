//! HTTP/1.1 as the upstream connection speaks it (RFC 9112): the request head written, the
//! response head read and how its body is framed, and the chunked coding both ways.
//!
//! Pure functions over buffers, no I/O. Anything ambiguous in a response is refused rather
//! than guessed at, since a connection that goes back to the pool with a wrong idea of where a
//! response ended would hand the rest of it to the next request: `Content-Length` together
//! with `Transfer-Encoding`, differing lengths, a transfer coding other than `chunked`, bare
//! line feeds in the chunked coding.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// The most fields a response head (or a chunked body's trailer section) may carry; hyper's
/// limit too.
pub(crate) const MAX_HEADERS: usize = 100;

/// The longest response head (or trailer section) read; past it the response is refused.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// Room left in a response's header map for the CORS headers the proxy adds.
const ADDED_HEADERS: usize = 4;

/// Why a response from the upstream cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed response from the upstream: {0}")]
pub struct Malformed(pub &'static str);

/// How a request's body goes to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body, and no framing header.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes the request head into `out` (cleared first): `target` must be in origin form, and
/// `headers` are written as they are, then `appended`, except `Content-Length` and
/// `Transfer-Encoding`, which `framing` replaces.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    appended: &[(&HeaderName, &HeaderValue)],
    framing: RequestFraming,
) {
    out.clear();
    out.reserve(64 + target.len() + (headers.len() + appended.len()) * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter().chain(appended.iter().copied()) {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            let mut digits = [0u8; 20];
            out.extend_from_slice(decimal(n, &mut digits));
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `digits`.
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

/// The line that opens a chunk of `len` bytes: its size in hexadecimal and CRLF.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkLine {
    bytes: [u8; 18],
    start: u8,
}

impl ChunkLine {
    pub(crate) fn new(len: usize) -> Self {
        let mut bytes = [0u8; 18];
        bytes[16] = b'\r';
        bytes[17] = b'\n';
        let mut at = 16;
        let mut n = len as u64;
        loop {
            at -= 1;
            bytes[at] = b"0123456789abcdef"[(n & 0xf) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        ChunkLine {
            bytes,
            start: at as u8,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[usize::from(self.start)..]
    }
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (`HEAD`, `204`, `304`, a length of 0, a `101`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// A response head, ready for the client.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    /// The reason phrase, when it is not the status code's usual one.
    pub(crate) reason: Option<Bytes>,
    /// The fields to forward: hop-by-hop ones (and those `Connection` names) left out, but for
    /// a `101`'s `Upgrade`, with room for the CORS headers.
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// Whether the connection can carry another exchange once this one has ended.
    pub(crate) keep_alive: bool,
}

/// What the request was, as far as reading its response goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asked {
    /// `HEAD`: the response has no body, whatever its fields say.
    Head,
    /// `CONNECT`: a `2xx` turns the connection into a tunnel.
    Connect,
    /// Any other method.
    Other,
}

impl Asked {
    pub(crate) fn of(method: &Method) -> Self {
        if method == Method::HEAD {
            Asked::Head
        } else if method == Method::CONNECT {
            Asked::Connect
        } else {
            Asked::Other
        }
    }
}

/// Where a field sits in the head: name and value as offsets.
#[derive(Debug, Clone, Copy, Default)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// Reads the response head at the start of `buf`, taking it (and any interim `1xx` responses
/// before it but a `101`) out of `buf`, which keeps what follows. Its fields go into `spare`,
/// an empty map taken for the head, so that its allocation serves again. `Ok(None)`: the head
/// is not complete yet.
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    asked: Asked,
    spare: &mut HeaderMap,
) -> Result<Option<Head>, Malformed> {
    loop {
        let mut fields = [Field::default(); MAX_HEADERS];
        let (len, count, code, version, reason) = {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                buf,
                &mut slots,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(Malformed("response head too large"));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Malformed("too many header fields"));
                }
                Err(_) => return Err(Malformed("invalid response head")),
            };
            if len > MAX_HEAD {
                return Err(Malformed("response head too large"));
            }
            let base = buf.as_ptr() as usize;
            let offset = |part: &[u8]| {
                let start = (part.as_ptr() as usize).wrapping_sub(base);
                (start as u32, (start + part.len()) as u32)
            };
            for (field, header) in fields.iter_mut().zip(response.headers.iter()) {
                *field = Field {
                    name: offset(header.name.as_bytes()),
                    value: offset(header.value),
                };
            }
            let reason = response.reason.map(|r| offset(r.as_bytes()));
            (
                len,
                response.headers.len(),
                response.code.unwrap_or_default(),
                response.version.unwrap_or_default(),
                reason,
            )
        };
        let status = StatusCode::from_u16(code).map_err(|_| Malformed("invalid status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // `100 Continue`, `103 Early Hints`: the final response follows.
            buf.advance(len);
            continue;
        }
        let head = buf.split_to(len).freeze();
        let fields = &fields[..count];
        let headers = std::mem::take(spare);
        return build_head(&head, fields, headers, status, version, reason, asked).map(Some);
    }
}

/// The response head from its parsed fields (offsets into `head`).
fn build_head(
    head: &Bytes,
    fields: &[Field],
    mut headers: HeaderMap,
    status: StatusCode,
    version: u8,
    reason: Option<(u32, u32)>,
    asked: Asked,
) -> Result<Head, Malformed> {
    let bytes = |span: (u32, u32)| at(head, span);
    // What framing and `Connection` say, in one pass over the names.
    let mut length: Option<u64> = None;
    // More than one value (in one field or several) is forwarded as one.
    let mut lengths = 0;
    let mut chunked = false;
    let mut connection = Connection::default();
    for field in fields {
        let name = bytes(field.name);
        let value = bytes(field.value);
        if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|&b| b == b',') {
                lengths += 1;
                let n = parse_length(trim(item))?;
                if length.is_some_and(|known| known != n) {
                    return Err(Malformed("differing content lengths"));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only `chunked`, once: any other coding would reach the client still applied,
            // with the field that says so stripped as hop-by-hop.
            if chunked || !trim(value).eq_ignore_ascii_case(b"chunked") {
                return Err(Malformed("unsupported transfer coding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection.add(field.value, value)?;
        }
    }
    let http10 = version == 0;
    if chunked && length.is_some() {
        return Err(Malformed("both content-length and transfer-encoding"));
    }
    if chunked && http10 {
        return Err(Malformed("transfer-encoding in an HTTP/1.0 response"));
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let no_body = asked == Asked::Head
        || switching
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (asked == Asked::Connect && status.is_success());
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let tunnel = switching || (asked == Asked::Connect && status.is_success());
    let closes = connection.close || (http10 && !connection.keep_alive);
    // A `204` may not have a body (RFC 9110 §15.3.5), so one whose head announces one is
    // read without it, and its connection not trusted with another request.
    let body_after_204 = status == StatusCode::NO_CONTENT && (chunked || length.unwrap_or(0) > 0);
    let keep_alive = !(closes || tunnel || body_after_204 || framing == Framing::Close);

    debug_assert!(headers.is_empty());
    headers.reserve(fields.len() + ADDED_HEADERS);
    for field in fields {
        let name = bytes(field.name);
        let upgrade = switching && name.eq_ignore_ascii_case(b"upgrade");
        if !upgrade && (is_hop_by_hop(name) || connection.names(name, head)) {
            continue;
        }
        if lengths > 1 && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| Malformed("invalid field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(bytes(field.value)))
            .map_err(|_| Malformed("invalid field value"))?;
        headers.append(name, value);
    }
    if let Some(length) = length.filter(|_| lengths > 1) {
        headers.append(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    if switching && connection.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let reason = reason
        .map(bytes)
        .filter(|r| Some(*r) != status.canonical_reason().map(str::as_bytes))
        .map(|r| head.slice_ref(r));
    Ok(Head {
        status,
        reason,
        headers,
        framing,
        keep_alive,
    })
}

/// What a response's `Connection` fields say: the options the proxy reads, and where the
/// values sit, for the field names they list (which are hop-by-hop).
#[derive(Debug, Default)]
struct Connection {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    values: [(u32, u32); 4],
    count: usize,
}

impl Connection {
    fn add(&mut self, at: (u32, u32), value: &[u8]) -> Result<(), Malformed> {
        if self.count == self.values.len() {
            return Err(Malformed("too many connection fields"));
        }
        self.values[self.count] = at;
        self.count += 1;
        for token in value.split(|&b| b == b',').map(trim) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            }
        }
        Ok(())
    }

    /// Whether a `Connection` field lists `name` (`head` holds the values).
    fn names(&self, name: &[u8], head: &[u8]) -> bool {
        self.values[..self.count].iter().any(|&v| {
            at(head, v)
                .split(|&b| b == b',')
                .any(|token| trim(token).eq_ignore_ascii_case(name))
        })
    }
}

/// The bytes of `head` at `span`.
fn at(head: &[u8], (start, end): (u32, u32)) -> &[u8] {
    &head[start as usize..end as usize]
}

/// Whether `name`, in any case, is one of the fields that concern only one connection
/// (RFC 9110 §7.6.1), or `Upgrade`: for requests and responses alike.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A `Content-Length` value: digits only.
fn parse_length(digits: &[u8]) -> Result<u64, Malformed> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Malformed("invalid content-length"));
    }
    Ok(digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// `bytes` without the spaces and tabs around it.
fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Decodes a chunked body as its bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section, maybe empty, of which this many bytes have
    /// been looked at already.
    Trailers(usize),
    /// The body has ended.
    Done,
}

/// What the decoder made of the bytes it had.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body has ended: nothing after it was taken from the buffer.
    End,
    /// More bytes are needed.
    More,
}

impl Chunked {
    /// Takes what it can from the front of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(Malformed("chunk-size line too long"));
                        }
                        return Ok(Decoded::More);
                    };
                    let size = chunk_size(&buf[..lf])?;
                    buf.advance(lf + 1);
                    *self = if size == 0 {
                        Chunked::Trailers(0)
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(Malformed("chunk data not followed by CRLF"));
                        }
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers(scanned) => return self.trailers(buf, scanned),
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut, scanned: usize) -> Result<Decoded, Malformed> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            *self = Chunked::Done;
            return Ok(Decoded::End);
        }
        // Every line ends in CRLF: a bare LF is refused as soon as it arrives. Only what came
        // since the last look is scanned (with the three bytes before it, for an end of the
        // section that spans the two).
        let seen = &buf[..buf.len().min(MAX_HEAD)];
        let mut end = None;
        for i in scanned.saturating_sub(3)..seen.len() {
            if seen[i] != b'\n' {
                continue;
            }
            if i == 0 || seen[i - 1] != b'\r' {
                return Err(Malformed("bare LF in the trailer section"));
            }
            if i >= 3 && &seen[i - 3..i - 1] == b"\r\n" {
                end = Some(i - 3);
                break;
            }
        }
        let Some(end) = end else {
            if buf.len() >= MAX_HEAD {
                return Err(Malformed("trailer section too large"));
            }
            *self = Chunked::Trailers(seen.len());
            return Ok(Decoded::More);
        };
        let section = &buf[..end + 4];
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = match httparse::parse_headers(section, &mut slots) {
            Ok(httparse::Status::Complete((_, fields))) => fields,
            _ => return Err(Malformed("invalid trailer section")),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| Malformed("invalid trailer name"))?;
            let value =
                HeaderValue::from_bytes(field.value).map_err(|_| Malformed("invalid trailer"))?;
            trailers.append(name, value);
        }
        buf.advance(end + 4);
        *self = Chunked::Done;
        Ok(Decoded::Trailers(trailers))
    }
}

/// The size on a chunk-size line (its line feed excluded): hexadecimal digits, then optional
/// extensions, which are ignored, then CR.
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(Malformed("chunk-size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Malformed("invalid chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let d = (d as char).to_digit(16).unwrap_or_default();
        (n << 4) | u64::from(d)
    });
    // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ): ignored, but it must be
    // one, and holds no control character.
    let rest = trim(&line[digits..]);
    if !rest.is_empty()
        && (rest[0] != b';' || rest.iter().any(|&b| b.is_ascii_control() && b != b'\t'))
    {
        return Err(Malformed("invalid chunk extension"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests;
