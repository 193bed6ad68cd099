//! The HTTP/1.1 request head as keygate's own server reads it (httparse, `Known::classify`, the
//! framing checks of RFC 9112 §6, the target split). Besides "never panics", an accepted head
//! must have one framing that any other parser would agree on, and the same bytes must not be
//! refused when they arrive in pieces.
#![no_main]

use http::{HeaderName, Version};
use keygate_gateway::fuzz_api::{AcceptedHead, HeadOutcome, RequestBody, request_head};
use libfuzzer_sys::fuzz_target;

const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

fuzz_target!(|data: &[u8]| {
    let outcome = request_head(data, Some(&API_KEY));
    match &outcome {
        HeadOutcome::Partial => {}
        HeadOutcome::Refused { status, code, closes } => {
            assert!(matches!(status, 400 | 431), "a head is refused with 400 or 431, not {status}");
            assert!(!code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{code}");
            // After a refused head the next bytes cannot be trusted: the connection ends.
            assert!(*closes, "a refused head keeps the connection open: {code}");
        }
        HeadOutcome::Accepted(head) => {
            accepted_is_consistent(data, head);
            // The same head arriving in pieces: the server parses from the start again after
            // each read, so every strict prefix must read as "not all here yet".
            for cut in [head.len - 1, head.len / 2, usize::from(data[0]) % head.len] {
                let prefix = request_head(&data[..cut], Some(&API_KEY));
                assert!(
                    matches!(prefix, HeadOutcome::Partial),
                    "the first {cut} bytes of an accepted {}-byte head gave {prefix:?}",
                    head.len
                );
            }
        }
    }
});

fn named<'a>(head: &'a AcceptedHead, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
    let name = name.to_owned();
    head.fields.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(&name)).map(|(_, v)| v.as_slice())
}

fn accepted_is_consistent(data: &[u8], head: &AcceptedHead) {
    assert!(head.len > 0 && head.len <= data.len());
    assert!(data[..head.len].ends_with(b"\n"), "a head ends with an empty line");
    assert!(head.path.starts_with('/'), "path {:?}", head.path);
    // Counted here independently of `Known::classify`.
    let te: Vec<&[u8]> = named(head, "transfer-encoding").collect();
    let cl: Vec<&[u8]> = named(head, "content-length").collect();
    assert!(named(head, "host").count() <= 1, "more than one Host accepted");
    assert_eq!(usize::from(head.known.transfer_encodings), te.len());
    assert_eq!(usize::from(head.known.content_lengths), cl.len().min(255));
    for (at, name) in [
        (head.known.host, "host"),
        (head.known.authorization, "authorization"),
        (head.known.api_key, "x-api-key"),
        (head.known.origin, "origin"),
        (head.known.content_length, "content-length"),
        (head.known.transfer_encoding, "transfer-encoding"),
    ] {
        if let Some(at) = at {
            let (n, _) = &head.fields[usize::from(at)];
            assert!(n.eq_ignore_ascii_case(name), "Known points {name} at {n}");
        }
    }
    match head.body {
        RequestBody::Chunked => {
            assert_eq!(te.len(), 1, "chunked with {} Transfer-Encoding fields", te.len());
            assert!(te[0].eq_ignore_ascii_case(b"chunked"), "Transfer-Encoding {:?}", te[0]);
            assert!(cl.is_empty(), "both Transfer-Encoding and Content-Length accepted");
            assert_eq!(head.version, Version::HTTP_11, "Transfer-Encoding accepted in HTTP/1.0");
        }
        RequestBody::Length(n) => {
            assert!(te.is_empty());
            assert_eq!(cl.len(), 1, "a length from {} Content-Length fields", cl.len());
            let value = std::str::from_utf8(cl[0]).expect("an accepted Content-Length is ASCII");
            assert!(!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()), "Content-Length {value:?}");
            // The length forwarded is the one the client sent, never a stand-in.
            assert_eq!(value.parse::<u64>().ok(), Some(n), "Content-Length {value:?} forwarded as {n}");
        }
        RequestBody::None => assert!(te.is_empty() && cl.is_empty()),
    }
}
