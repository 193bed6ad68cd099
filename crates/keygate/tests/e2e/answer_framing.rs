//! How keygate frames an upstream's answer for an HTTP/1.1 client, seen from outside: an answer
//! with an empty body still says where it ends, and answers that have no body (HEAD, 204) carry
//! the upstream's own fields and nothing more. A raw upstream gives canned answers; the client is
//! a raw socket that keeps its connection for a second request.

use std::time::Duration;

use keygate_testkit::{Options, TestKeygate, route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream answering every request by its path: `/r/empty` 200 with `content-length: 0`,
/// `/r/none` 204, anything else 200 with five bytes (a HEAD request: the head only).
async fn canned_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let answer: &[u8] = if head.starts_with("GET /r/empty ") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                        } else if head.starts_with("GET /r/none ") {
                            b"HTTP/1.1 204 No Content\r\n\r\n"
                        } else if head.starts_with("HEAD ") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Reads one answer head and the body its framing announces (none for HEAD and 204); panics
/// after 5 s, which is what a client does that waits for a body end that never comes.
async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> String {
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let status_204 = head.starts_with("http/1.1 204");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or_else(|| {
                        assert!(head_request || status_204, "the answer says nowhere where its body ends: {head}");
                        0
                    });
                let body = if head_request || status_204 { 0 } else { len };
                while buf.len() < end + 4 + body {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed before the body's end");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let answer = String::from_utf8_lossy(&buf[..end + 4 + body]).into_owned();
                buf.drain(..end + 4 + body);
                return answer;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before an answer");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("the answer's end never came")
}

#[tokio::test]
async fn empty_and_bodiless_answers_are_framed_for_keep_alive_clients() {
    let upstream = canned_upstream().await;
    let mut r = route("r", "/r", &upstream);
    r.public = true;
    let kg = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.unwrap();
    let addr = kg.gateway_addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // An empty 200 says `content-length: 0` (before the fix it said nothing, so the client read
    // until the connection closed), and the connection serves the next request.
    s.write_all(b"GET /r/empty HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let a = read_answer(&mut s, &mut buf, false).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(a.to_ascii_lowercase().contains("\r\ncontent-length: 0\r\n"), "{a}");
    // A HEAD answer keeps the upstream's length and sends no body; a 204 has no length at all.
    s.write_all(b"HEAD /r/thing HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let a = read_answer(&mut s, &mut buf, true).await;
    assert!(a.to_ascii_lowercase().contains("\r\ncontent-length: 5\r\n"), "{a}");
    s.write_all(b"GET /r/none HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let a = read_answer(&mut s, &mut buf, false).await;
    assert!(a.starts_with("HTTP/1.1 204"), "{a}");
    assert!(!a.to_ascii_lowercase().contains("content-length"), "{a}");
    // And the connection is still in step: a body of five bytes, then nothing stray.
    s.write_all(b"GET /r/thing HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let a = read_answer(&mut s, &mut buf, false).await;
    assert!(a.ends_with("\r\n\r\nhello"), "{a}");
    assert!(buf.is_empty(), "stray bytes: {:?}", String::from_utf8_lossy(&buf));
}
