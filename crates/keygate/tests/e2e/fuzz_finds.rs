//! What the fuzz targets found (docs/fuzzing.md), checked from outside: raw bytes on a socket to
//! a whole keygate in front of the mock upstream, as a client would send them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use keygate_testkit::{MockUpstream, Options, TestKeygate, route};

async fn kit(upstream: &MockUpstream) -> TestKeygate {
    let mut open = route("open", "/open", &upstream.url());
    open.public = true;
    TestKeygate::start_with(Options { routes: vec![open], ..Options::default() }).await.unwrap()
}

/// Writes `bytes` and returns everything keygate answers until it closes the connection (or
/// goes quiet for 5 s).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_beyond_u64_is_refused() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    // Was framed as 18446744073709551615 bytes and forwarded so.
    let req = b"POST /open HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\nabc";
    let answer = exchange(kg.gateway_addr, req);
    assert!(status_line(&answer).starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"bad_request\""), "{answer}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_chunk_line_is_refused_however_it_arrives() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let head = b"POST /open HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let mut body = b"1;".to_vec();
    body.resize(5000, b'e');
    body.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
    let mut whole = head.to_vec();
    whole.extend_from_slice(&body);
    // When the line's end came in the same read as the line, the body was forwarded; when the
    // first read ended inside the line, it was refused. Refused now, however the bytes arrive.
    let answer = exchange(kg.gateway_addr, &whole);
    assert!(!status_line(&answer).starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("\"body_len\""), "the upstream answered: {answer}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_sign_with_a_sign_is_not_an_escape() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    // `%+2e` passed path normalization as an escape and reached the upstream as spelled.
    let answer = exchange(kg.gateway_addr, b"GET /open/%+2e%+2e/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert!(status_line(&answer).starts_with("HTTP/1.1 400"), "{answer}");
    let answer = exchange(kg.gateway_addr, b"GET /open/%2e%2e/open/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert!(status_line(&answer).starts_with("HTTP/1.1 200"), "a real escape still passes: {answer}");
    kg.stop().await;
}
