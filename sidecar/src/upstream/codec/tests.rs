use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;

use super::*;

#[test]
fn request_heads_carry_their_own_framing() {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("shop"));
    headers.append("x-a", HeaderValue::from_static("1"));
    headers.append("x-a", HeaderValue::from_static("2"));
    headers.insert("content-length", HeaderValue::from_static("999"));
    headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    let mut out = b"left over".to_vec();
    let cases = [
        (RequestFraming::None, ""),
        (RequestFraming::Length(0), "content-length: 0\r\n"),
        (
            RequestFraming::Length(18_446_744_073_709_551_615),
            "content-length: 18446744073709551615\r\n",
        ),
        (RequestFraming::Chunked, "transfer-encoding: chunked\r\n"),
    ];
    let appended = HeaderValue::from_static("10.0.0.1");
    let appended = [(&HeaderName::from_static("x-forwarded-for"), &appended)];
    for (framing, line) in cases {
        encode_request(
            &mut out,
            &Method::PUT,
            "/a?b=c",
            &headers,
            &appended,
            framing,
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            format!(
                "PUT /a?b=c HTTP/1.1\r\nhost: shop\r\nx-a: 1\r\nx-a: 2\r\n\
                 x-forwarded-for: 10.0.0.1\r\n{line}\r\n"
            ),
        );
    }
}

#[test]
fn chunk_lines_are_hexadecimal() {
    for (len, line) in [
        (0, "0\r\n"),
        (1, "1\r\n"),
        (255, "ff\r\n"),
        (4096, "1000\r\n"),
        (usize::MAX, "ffffffffffffffff\r\n"),
    ] {
        assert_eq!(ChunkLine::new(len).as_bytes(), line.as_bytes(), "{len}");
    }
}

/// One response head, and what it must come to.
struct Case {
    name: &'static str,
    raw: &'static str,
    asked: Asked,
    expect: Result<Expect, &'static str>,
}

#[derive(Debug, PartialEq)]
struct Expect {
    status: u16,
    framing: Framing,
    keep_alive: bool,
    /// The fields forwarded, in order, as `name: value`.
    fields: &'static [&'static str],
    /// What is left in the buffer after the head.
    rest: &'static str,
}

fn ok(
    status: u16,
    framing: Framing,
    keep_alive: bool,
    fields: &'static [&'static str],
    rest: &'static str,
) -> Result<Expect, &'static str> {
    Ok(Expect {
        status,
        framing,
        keep_alive,
        fields,
        rest,
    })
}

fn case(name: &'static str, raw: &'static str, expect: Result<Expect, &'static str>) -> Case {
    Case {
        name,
        raw,
        asked: Asked::Other,
        expect,
    }
}

#[test]
fn response_heads_are_framed_or_refused() {
    use Framing::*;
    let cases = [
        case(
            "length, body read along",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            ok(
                200,
                Length(5),
                true,
                &["content-length: 5", "x-a: 1"],
                "hello",
            ),
        ),
        case(
            "the same length twice, in one field and in two",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nX-A: 1\r\ncontent-length:5\r\n\r\n",
            ok(200, Length(5), true, &["x-a: 1", "content-length: 5"], ""),
        ),
        case(
            "a length of 0 is no body",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ok(200, Empty, true, &["content-length: 0"], ""),
        ),
        case(
            "chunked, its field not forwarded",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\n",
            ok(200, Chunked, true, &[], "5\r\n"),
        ),
        case(
            "neither: until the upstream closes",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall",
            ok(200, Close, false, &["x-a: 1"], "all"),
        ),
        case(
            "no body for 204 and 304",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            ok(304, Empty, true, &["content-length: 10"], ""),
        ),
        case(
            "a 204 that announces a body is read without one, and not trusted again",
            "HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n",
            ok(204, Empty, false, &["content-length: 4"], ""),
        ),
        case(
            "Connection: close",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            ok(200, Empty, false, &["content-length: 0"], ""),
        ),
        case(
            "HTTP/1.0 closes unless asked to keep alive",
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            ok(200, Empty, false, &["content-length: 0"], ""),
        ),
        case(
            "HTTP/1.0 with keep-alive",
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            ok(200, Empty, true, &["content-length: 0"], ""),
        ),
        case(
            "hop-by-hop fields and those Connection names are not forwarded",
            "HTTP/1.1 200 OK\r\nConnection: x-private, Keep-Alive\r\nX-Private: 1\r\nKeep-Alive: 5\r\n\
             Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x-t\r\nUpgrade: h2c\r\n\
             Proxy-Authenticate: Basic\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n",
            ok(200, Empty, true, &["x-kept: 2", "content-length: 0"], ""),
        ),
        case(
            "interim responses are passed over",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
             HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            ok(201, Length(2), true, &["content-length: 2"], "ok"),
        ),
        case(
            "101 keeps Upgrade, asks for it in Connection, and ends HTTP",
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nbytes",
            ok(
                101,
                Empty,
                false,
                &["upgrade: echo", "connection: upgrade"],
                "bytes",
            ),
        ),
        case(
            "Content-Length with Transfer-Encoding",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err("both content-length and transfer-encoding"),
        ),
        case(
            "differing lengths",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Err("differing content lengths"),
        ),
        case(
            "differing lengths in one field",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            Err("differing content lengths"),
        ),
        case(
            "a signed length",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            Err("invalid content-length"),
        ),
        case(
            "an empty length",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            Err("invalid content-length"),
        ),
        case(
            "a length past 64 bits",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            Err("invalid content-length"),
        ),
        case(
            "a coding other than chunked",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Err("unsupported transfer coding"),
        ),
        case(
            "chunked twice",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err("unsupported transfer coding"),
        ),
        case(
            "Transfer-Encoding in HTTP/1.0",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err("transfer-encoding in an HTTP/1.0 response"),
        ),
        case(
            "not HTTP",
            "SSH-2.0-OpenSSH_9.2\r\n\r\n",
            Err("invalid response head"),
        ),
        case(
            "a field folded over two lines",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n",
            Err("invalid response head"),
        ),
        case(
            "a bare CR in a value",
            "HTTP/1.1 200 OK\r\nX-A: 1\r2\r\nContent-Length: 0\r\n\r\n",
            Err("invalid response head"),
        ),
    ];
    for case in cases {
        let mut buf = BytesMut::from(case.raw);
        let got = parse_response(&mut buf, case.asked, &mut HeaderMap::new())
            .map(|head| {
                let head = head.unwrap_or_else(|| panic!("{}: incomplete", case.name));
                Expect {
                    status: head.status.as_u16(),
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                    fields: Vec::leak(
                        head.headers
                            .iter()
                            .map(|(n, v)| &*format!("{n}: {}", v.to_str().unwrap()).leak())
                            .collect(),
                    ),
                    rest: String::from_utf8(buf.to_vec()).unwrap().leak(),
                }
            })
            .map_err(|Malformed(why)| why);
        assert_eq!(got, case.expect, "{}", case.name);
    }
}

#[test]
fn what_was_asked_decides_whether_there_is_a_body() {
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
    let framing = |asked| {
        let mut buf = BytesMut::from(head);
        let head = parse_response(&mut buf, asked, &mut HeaderMap::new())
            .unwrap()
            .unwrap();
        (head.framing, head.keep_alive)
    };
    assert_eq!(framing(Asked::Other), (Framing::Length(12), true));
    assert_eq!(framing(Asked::Head), (Framing::Empty, true));
    // A CONNECT's 2xx is a tunnel, not something to pool.
    assert_eq!(framing(Asked::Connect), (Framing::Empty, false));
}

#[test]
fn a_head_is_read_once_whole() {
    let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let mut buf = BytesMut::new();
    for (i, byte) in raw.iter().enumerate() {
        buf.put_u8(*byte);
        let parsed = parse_response(&mut buf, Asked::Other, &mut HeaderMap::new()).unwrap();
        assert_eq!(
            parsed.is_some(),
            i + 1 >= raw.len() - 2,
            "after {} bytes",
            i + 1
        );
        if parsed.is_some() {
            break;
        }
    }
}

#[test]
fn oversized_heads_are_refused() {
    let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nX-Big: ");
    buf.put_bytes(b'a', MAX_HEAD);
    assert_eq!(
        parse_response(&mut buf, Asked::Other, &mut HeaderMap::new()).unwrap_err(),
        Malformed("response head too large")
    );
    let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\n");
    for i in 0..=MAX_HEADERS {
        buf.put_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    buf.put_slice(b"\r\n");
    assert_eq!(
        parse_response(&mut buf, Asked::Other, &mut HeaderMap::new()).unwrap_err(),
        Malformed("too many header fields")
    );
}

#[test]
fn reason_phrases_other_than_the_usual_are_kept() {
    let reason = |raw: &str| {
        let mut buf = BytesMut::from(raw);
        parse_response(&mut buf, Asked::Other, &mut HeaderMap::new())
            .unwrap()
            .unwrap()
            .reason
    };
    assert_eq!(reason("HTTP/1.1 200 OK\r\n\r\n"), None);
    assert_eq!(
        reason("HTTP/1.1 200 Fine Thanks\r\n\r\n").as_deref(),
        Some(&b"Fine Thanks"[..])
    );
}

/// Decodes `input` fed in pieces of `step` bytes: the data, the trailers, and what followed the
/// body.
fn decode_in_steps(input: &[u8], step: usize) -> Result<(Vec<u8>, HeaderMap, Vec<u8>), Malformed> {
    let mut chunked = Chunked::default();
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), HeaderMap::new());
    let mut fed = 0;
    loop {
        match chunked.decode(&mut buf)? {
            Decoded::Data(bytes) => data.extend_from_slice(&bytes),
            Decoded::Trailers(t) => trailers = t,
            Decoded::End => {
                buf.extend_from_slice(&input[fed..]);
                return Ok((data, trailers, buf.to_vec()));
            }
            Decoded::More if fed == input.len() => return Err(Malformed("input ended")),
            Decoded::More => {
                let end = (fed + step).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }
}

#[test]
fn chunked_bodies_decode_with_extensions_and_trailers() {
    let input =
        b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nX-Sum: 1\r\nX-Other: 2\r\n\r\nNEXT";
    for step in [1, 2, 3, 7, input.len()] {
        let (data, trailers, rest) = decode_in_steps(input, step).unwrap();
        assert_eq!(data, b"hello world", "step {step}");
        assert_eq!(trailers["x-sum"], "1");
        assert_eq!(trailers["x-other"], "2");
        assert_eq!(rest, b"NEXT", "nothing after the body is taken");
    }
    let (data, trailers, rest) = decode_in_steps(b"0\r\n\r\n", 1).unwrap();
    assert!(data.is_empty() && trailers.is_empty() && rest.is_empty());
}

#[test]
fn malformed_chunked_bodies_are_refused() {
    for (input, why) in [
        (
            &b"5\nhello\r\n0\r\n\r\n"[..],
            "chunk-size line not ended by CRLF",
        ),
        (
            b"5\r\nhelloX\r\n0\r\n\r\n",
            "chunk data not followed by CRLF",
        ),
        (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"g\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"10000000000000000\r\n", "invalid chunk size"),
        (b"5 x\r\nhello\r\n", "invalid chunk extension"),
        (b"5;a\x01b\r\nhello\r\n", "invalid chunk extension"),
        (b"0\r\nX: 1\n\r\n", "bare LF in the trailer section"),
        (b"0\r\n\n", "bare LF in the trailer section"),
        (b"0\r\nX 1\r\n\r\n", "invalid trailer section"),
    ] {
        let got = decode_in_steps(input, 1).map(|_| ()).unwrap_err();
        assert_eq!(got, Malformed(why), "{}", String::from_utf8_lossy(input));
    }
    let mut long = b"5;".to_vec();
    long.resize(MAX_CHUNK_LINE + 1, b'a');
    assert_eq!(
        decode_in_steps(&long, 64).unwrap_err(),
        Malformed("chunk-size line too long")
    );
}

proptest! {
    /// Whatever the chunk sizes and however the bytes arrive, the body comes out whole, and
    /// nothing after it is taken.
    #[test]
    fn chunked_bodies_decode_whole(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        sizes in proptest::collection::vec(1usize..300, 1..20),
        step in 1usize..64,
        uppercase in any::<bool>(),
    ) {
        let mut input = Vec::new();
        let mut rest = &body[..];
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at((*size).min(rest.len()));
            let line = format!("{:x}", chunk.len());
            let line = if uppercase { line.to_uppercase() } else { line };
            input.extend_from_slice(format!("{line};n=v\r\n").as_bytes());
            input.extend_from_slice(chunk);
            input.extend_from_slice(b"\r\n");
            rest = after;
        }
        input.extend_from_slice(b"0\r\n\r\nafter");
        let (data, trailers, after) = decode_in_steps(&input, step).unwrap();
        prop_assert_eq!(data, body);
        prop_assert!(trailers.is_empty());
        prop_assert_eq!(after, b"after".to_vec());
    }
}

#[test]
fn the_fields_go_into_the_spare_map() {
    let mut spare = HeaderMap::with_capacity(64);
    let capacity = spare.capacity();
    let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n");
    let head = parse_response(&mut buf, Asked::Other, &mut spare)
        .unwrap()
        .unwrap();
    assert_eq!(head.headers.capacity(), capacity);
    assert_eq!(head.headers["x-a"], "1");
    assert!(spare.is_empty() && spare.capacity() == 0);
}
