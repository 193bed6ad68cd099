//! The chunked decoder of request and answer bodies (RFC 9112 §7.1). Where a chunked body ends
//! decides where the next request begins, so the decoder must give the same answer however the
//! bytes arrive: the input is decoded whole, in pieces (of a few bytes, or cut at a few places)
//! and cut in two, and the runs must agree on the data, the outcome and how many bytes the body
//! took. It never yields more bytes than it was given, a refusal stays a refusal when more bytes
//! come, and a body that a plain encoder wrote decodes to what was encoded.
//!
//! Input: the first byte picks the mode and the cuts; the rest is the body (mode "decode") or
//! the data to encode (mode "round trip").
#![no_main]

use bytes::BytesMut;
use keygate_gateway::fuzz_api::{ChunkedDecoder, ChunkedStep};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The body ended after this many bytes of input.
    End(usize),
    NeedMore,
    Refused,
}

#[derive(Debug, PartialEq, Eq)]
struct Run {
    data: Vec<u8>,
    /// The trailer fields passed on.
    trailers: Option<Vec<(String, Vec<u8>)>>,
    outcome: Outcome,
}

/// Decodes `input` fed in the pieces that `cuts` (increasing offsets) mark.
fn run(input: &[u8], cuts: &[usize]) -> Run {
    let mut dec = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut trailers = None;
    let mut fed = 0;
    let ends = cuts.iter().copied().filter(|&c| c > 0 && c < input.len()).chain([input.len()]);
    for end in ends {
        if end <= fed {
            continue;
        }
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            match dec.step(&mut buf) {
                Ok(ChunkedStep::Data(d)) => {
                    assert!(!d.is_empty(), "a data step that yields nothing");
                    data.extend_from_slice(&d);
                    assert!(data.len() <= input.len(), "more body bytes out than input in");
                }
                Ok(ChunkedStep::Trailers(t)) => {
                    assert!(!t.is_empty() && trailers.is_none(), "trailers once, when there are some");
                    trailers = Some(t);
                }
                Ok(ChunkedStep::NeedMore) => break,
                Ok(ChunkedStep::End) => return Run { data, trailers, outcome: Outcome::End(fed - buf.len()) },
                Err(_) => {
                    // Refused stays refused, whatever comes next.
                    buf.extend_from_slice(&input[fed..]);
                    buf.extend_from_slice(b"\r\n0\r\n\r\n");
                    assert!(dec.step(&mut buf).is_err(), "a refused body was taken up again");
                    return Run { data, trailers, outcome: Outcome::Refused };
                }
            }
        }
    }
    Run { data, trailers, outcome: Outcome::NeedMore }
}

fn decode_three_ways(input: &[u8], seed: u8) -> Run {
    let whole = run(input, &[]);
    // Pieces of 1 to 7 bytes for short inputs; for long ones (each step looks for the line end
    // from the start of what is buffered, so tiny pieces cost quadratic time) a few cuts spread
    // by the seed.
    let step = usize::from(seed % 7) + 1;
    let cuts: Vec<usize> = if input.len() <= 512 {
        (step..input.len()).step_by(step).collect()
    } else {
        let mut x = u64::from(seed) + 1;
        let mut cuts: Vec<usize> = (0..16)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                usize::try_from(x >> 33).unwrap_or(0) % input.len()
            })
            .collect();
        cuts.sort_unstable();
        cuts
    };
    let in_pieces = run(input, &cuts);
    assert_eq!(whole, in_pieces, "whole vs cuts {cuts:?}");
    let cut = usize::from(seed) * input.len() / 256;
    let halves = run(input, &[cut]);
    assert_eq!(whole, halves, "whole vs cut at {cut}");
    whole
}

fn round_trip(seed: u8, payload: &[u8]) {
    let mut body = Vec::new();
    let mut rest = payload;
    let mut size = usize::from(seed % 13) + 1;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        body.extend_from_slice(format!("{:x}", chunk.len()).as_bytes());
        if seed & 0x10 != 0 {
            body.extend_from_slice(b";name=value");
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
        rest = tail;
        size = size * 3 % 97 + 1;
    }
    body.extend_from_slice(b"0\r\n");
    if seed & 0x20 != 0 {
        body.extend_from_slice(b"x-checksum: 1\r\n");
    }
    body.extend_from_slice(b"\r\n");
    let len = body.len();
    body.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
    let decoded = decode_three_ways(&body, seed);
    assert_eq!(decoded.data, payload, "a well-formed body decodes to what was encoded");
    assert_eq!(decoded.outcome, Outcome::End(len), "and ends where its encoder ended it");
    let trailers = (seed & 0x20 != 0).then(|| vec![("x-checksum".to_owned(), b"1".to_vec())]);
    assert_eq!(decoded.trailers, trailers, "with the trailer fields it was given");
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, rest)) = input.split_first() else { return };
    if seed & 0x80 == 0 {
        let decoded = decode_three_ways(rest, seed);
        if let Outcome::End(n) = decoded.outcome {
            assert!(n <= rest.len());
        }
    } else {
        round_trip(seed, rest);
    }
});
