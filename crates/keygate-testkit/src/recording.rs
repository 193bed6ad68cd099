//! An upstream that records every byte it receives, per connection, and answers each request it
//! reads with `200 OK`. Tests of what reaches an upstream look at these bytes, not at a parsed
//! view of them: a header split by an injected CRLF, or a second request smuggled onto a pooled
//! connection, shows up here as the upstream's own parser saw it.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the recording upstream parsed it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which connection it came on (0 for the first connection accepted, …).
    pub conn: usize,
    /// The raw head, request line to the empty line included.
    pub head: Vec<u8>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Recorded {
    /// The head as text (lossy).
    pub fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    /// The request line.
    pub fn request_line(&self) -> String {
        self.head_text().split("\r\n").next().unwrap_or_default().to_owned()
    }

    /// Every value of the header `name` (any case), as received.
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.head_text()
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// The names of the header fields, as received, in order.
    pub fn header_names(&self) -> Vec<String> {
        self.head_text().split("\r\n").skip(1).filter_map(|l| l.split_once(':')).map(|(k, _)| k.to_owned()).collect()
    }
}

#[derive(Default)]
struct Log {
    /// Every byte received, per connection.
    raw: Vec<Vec<u8>>,
    requests: Vec<Recorded>,
    /// The status of the answers (200 unless set).
    status: Option<u16>,
}

/// The recording upstream, on an ephemeral port.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let conn = {
                    let mut log = l.lock();
                    log.raw.push(Vec::new());
                    log.raw.len() - 1
                };
                tokio::spawn(serve(stream, conn, l.clone()));
            }
        });
        Ok(Self { addr, log, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests parsed so far, in the order they were read.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().requests.clone()
    }

    /// Every byte received so far, per connection.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.log.lock().raw.clone()
    }

    /// Answers every request from now on with `status` (and an empty body unless 200).
    pub fn set_status(&self, status: u16) {
        self.log.lock().status = Some(status);
    }

    /// Forgets what was recorded (connections stay numbered on).
    pub fn clear(&self) {
        let mut l = self.log.lock();
        l.requests.clear();
        for r in &mut l.raw {
            r.clear();
        }
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads requests off one connection (heads by httparse, bodies by `Content-Length` or chunked)
/// and answers each `200 OK` with the request's number on the connection as the body (or with
/// the status set by [`RecordingUpstream::set_status`]).
async fn serve(mut stream: tokio::net::TcpStream, conn: usize, log: Arc<Mutex<Log>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut n = 0usize;
    loop {
        // A whole request in `buf`?
        match parse_one(&buf) {
            Parsed::Request { used, head, body } => {
                buf.drain(..used);
                let status = {
                    let mut log = log.lock();
                    log.requests.push(Recorded { conn, head, body });
                    log.status.unwrap_or(200)
                };
                n += 1;
                let body = if status == 200 { n.to_string() } else { String::new() };
                let answer = format!("HTTP/1.1 {status} Status\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Parsed::Bad => {
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return;
            }
            Parsed::More => {}
        }
        let got = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        let bytes = chunk.get(..got).unwrap_or_default();
        buf.extend_from_slice(bytes);
        if let Some(r) = log.lock().raw.get_mut(conn) {
            r.extend_from_slice(bytes);
        }
    }
}

enum Parsed {
    Request { used: usize, head: Vec<u8>, body: Vec<u8> },
    More,
    Bad,
}

fn parse_one(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::More,
        Err(_) => return Parsed::Bad,
    };
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(f.value).ok().and_then(|v| v.trim().parse().ok()) {
                Some(n) => length = Some(n),
                None => return Parsed::Bad,
            }
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = f.value.eq_ignore_ascii_case(b"chunked");
        }
    }
    let head = buf.get(..head_len).unwrap_or_default().to_vec();
    let rest = buf.get(head_len..).unwrap_or_default();
    if chunked {
        return match dechunk(rest) {
            Some(Some((body, used))) => Parsed::Request { used: head_len + used, head, body },
            Some(None) => Parsed::More,
            None => Parsed::Bad,
        };
    }
    let len = length.unwrap_or(0);
    match rest.get(..len) {
        Some(body) => Parsed::Request { used: head_len + len, head, body: body.to_vec() },
        None => Parsed::More,
    }
}

/// A chunked body at the start of `b`: `Some(Some((body, bytes used)))`, `Some(None)` if it is
/// not all here, `None` if it is malformed.
fn dechunk(b: &[u8]) -> Option<Option<(Vec<u8>, usize)>> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = b.get(at..)?.windows(2).position(|w| w == b"\r\n") else { return Some(None) };
        let line = std::str::from_utf8(b.get(at..at + eol)?).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at += eol + 2;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let Some(eol) = b.get(at..)?.windows(2).position(|w| w == b"\r\n") else { return Some(None) };
                at += eol + 2;
                if eol == 0 {
                    return Some(Some((body, at)));
                }
            }
        }
        let Some(data) = b.get(at..at + size) else { return Some(None) };
        body.extend_from_slice(data);
        at += size;
        match b.get(at..at + 2) {
            Some(b"\r\n") => at += 2,
            Some(_) => return None,
            None => return Some(None),
        }
    }
}
