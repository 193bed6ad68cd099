//! Upstream connections: keygate's own HTTP/1.1 client for the upstream leg. Each worker thread
//! keeps a pool of idle connections per upstream (each worker runs its own single-threaded
//! runtime, so the pool needs no lock). A request head is sent as the one buffer the forward phase
//! wrote ([`crate::phase::forward`]) and the answer's head is parsed in place, so forwarding costs one
//! write and usually one read, with no connection task and no channel between the request and
//! its connection. The answer's body streams to the client; the connection goes back to the pool
//! the moment that body has been read to its end.
//!
//! The stream is plain TCP or TLS ([`UpstreamStream`], made in [`crate::upstream_tls`]); the pool
//! is keyed by [`Upstream::pool_key`], which holds the whole TLS identity of an `https://`
//! upstream, so connections of different identities are never shared.
//!
//! Also here: connect and answer time-outs, passive health (consecutive failures take an
//! upstream out of rotation) and active health probes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::body::{BodySource, BoxError};
use crate::target::Upstream;
use crate::timer::Deadline;
pub use crate::upstream_tls::UpstreamStream;

/// Idle connections kept per upstream and worker.
const MAX_IDLE: usize = 64;
/// Consecutive failures that take an upstream out until it answers again.
pub const PASSIVE_FAILURE_THRESHOLD: u32 = 5;
/// The largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields accepted in a response head.
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer fields accepted after a chunked body.
const MAX_TRAILERS: u16 = 64;
/// What one read asks the kernel for.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Keyed by [`Upstream::pool_key`] (configured, not chosen by callers), so a fast hash will do.
    static POOL: RefCell<HashMap<Arc<str>, Vec<Conn>, foldhash::fast::FixedState>> =
        RefCell::new(HashMap::with_hasher(foldhash::fast::FixedState::default()));
    /// The retired targets this pool has forgotten ([`crate::resolve::forget_retired`]).
    static FORGOTTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Why forwarding failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect time-out): safe to retry.
    Connect(String),
    /// The request was sent but no answer came in time.
    Timeout,
    /// The connection failed after the request was sent, or the answer did not parse: not safe
    /// to retry.
    Failed(String),
    /// The TLS handshake with an `https://` upstream failed (an untrusted certificate, a name
    /// that does not match, a client certificate refused): nothing was sent, safe to retry.
    Tls(String),
}

impl UpstreamError {
    /// Nothing of the request was sent: another upstream may be tried.
    pub fn before_sending(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Tls(_))
    }
}

/// The largest request-head buffer a pooled connection keeps for the next request.
const KEPT_HEAD_CAPACITY: usize = 16 * 1024;

/// One connection to an upstream, with the bytes read from it and not yet used.
pub struct Conn {
    pool_key: Arc<str>,
    stream: UpstreamStream,
    buf: BytesMut,
    /// The buffer request heads are written into: kept with the connection, so a pooled
    /// connection brings one that is already large enough (a buffer of the worker thread's would
    /// be taken by one request while the next ones on the thread find none).
    head: Vec<u8>,
    /// It came from the pool (it may have been closed by the upstream while idle).
    pooled: bool,
    /// The answer time limit of the request in flight on this connection.
    timer: Deadline,
}

impl Conn {
    /// The stream and the bytes already read past the answer's head (an upgraded connection).
    pub fn into_parts(self) -> (UpstreamStream, Bytes) {
        (self.stream, self.buf.freeze())
    }

    /// Puts an idle connection back in this worker's pool.
    fn release(self) {
        if !self.buf.is_empty() {
            // Bytes past the end of the answer: the upstream is not speaking HTTP/1.1 properly.
            return;
        }
        POOL.with(|p| {
            if let Ok(mut pool) = p.try_borrow_mut() {
                let idle = pool.entry(self.pool_key.clone()).or_default();
                if idle.len() < MAX_IDLE {
                    idle.push(self);
                }
            }
        });
    }

    /// Still open with nothing unread: an idle connection the upstream closed is readable
    /// (end of stream). See [`UpstreamStream::is_reusable`].
    fn is_reusable(&mut self) -> bool {
        self.stream.is_reusable()
    }
}

fn checkout(pool_key: &Arc<str>) -> Option<Conn> {
    POOL.with(|p| {
        let mut pool = p.try_borrow_mut().ok()?;
        FORGOTTEN.with(|seen| crate::resolve::forget_retired(&mut pool, seen));
        let idle = pool.get_mut(pool_key)?;
        while let Some(mut c) = idle.pop() {
            if c.is_reusable() {
                c.pooled = true;
                return Some(c);
            }
        }
        None
    })
}

/// A new connection to `upstream`: TCP, then the TLS handshake of an `https://` upstream (with
/// the ALPN its route's `upstream_protocol` offers).
pub(crate) async fn dial(upstream: &Upstream, timeout: Duration) -> Result<UpstreamStream, UpstreamError> {
    let authority = &upstream.authority;
    // A name's resolved address (see `crate::resolve`), else the URL's authority (an IP literal).
    let dial = async {
        match upstream.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(&**authority).await,
        }
    };
    let stream = tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| UpstreamError::Connect(format!("connecting to {authority} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("cannot connect to {authority}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(match &upstream.tls {
        None => UpstreamStream::Plain(stream),
        Some(target) => {
            // The handshake has a time limit of its own, as long as the connect's.
            let name = target.server_name.to_str();
            tokio::time::timeout(timeout, UpstreamStream::handshake(stream, target))
                .await
                .map_err(|_| UpstreamError::Tls(format!("TLS handshake with {authority} (name {name}) timed out")))?
                .map_err(|e| UpstreamError::Tls(format!("TLS handshake with {authority} (name {name}) failed: {e}")))?
        }
    })
}

async fn connect(upstream: &Upstream, timeout: Duration) -> Result<Conn, UpstreamError> {
    dial(upstream, timeout).await.map(|stream| Conn::new(upstream, stream))
}

impl Conn {
    /// A new connection's state around its stream.
    pub(crate) fn new(upstream: &Upstream, stream: UpstreamStream) -> Self {
        Self {
            pool_key: upstream.pool_key.clone(),
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            head: Vec::new(),
            pooled: false,
            timer: Deadline::new(),
        }
    }
}

/// How a request's body is framed upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no header (GET, HEAD, …).
    None,
    Length(u64),
    Chunked,
}

/// How `body`, of a request with `method`, is framed upstream.
pub fn request_framing<B: BodySource>(method: &Method, body: Option<&B>) -> RequestFraming {
    let Some(body) = body.filter(|b| !b.is_end_stream()) else {
        // An empty POST, PUT or PATCH says so, for upstreams that insist on a length.
        return if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
    };
    match body.exact_len() {
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Streams the request body upstream in the framing announced in the head.
async fn pump_body<B: BodySource, W: tokio::io::AsyncWrite + Unpin>(
    body: &mut B,
    framing: RequestFraming,
    w: &mut W,
) -> Result<(), PumpError> {
    let chunked = matches!(framing, RequestFraming::Chunked);
    while let Some(data) = body.data().await {
        let data = data.map_err(PumpError::Body)?;
        if data.is_empty() {
            continue;
        }
        if chunked {
            let size = format!("{:x}\r\n", data.len());
            w.write_all(size.as_bytes()).await.map_err(PumpError::Write)?;
            w.write_all(&data).await.map_err(PumpError::Write)?;
            w.write_all(b"\r\n").await.map_err(PumpError::Write)?;
        } else {
            w.write_all(&data).await.map_err(PumpError::Write)?;
        }
        // A TLS stream may hold written bytes until flushed; a TCP one flushes for free.
        w.flush().await.map_err(PumpError::Write)?;
    }
    if chunked {
        w.write_all(b"0\r\n\r\n").await.map_err(PumpError::Write)?;
        w.flush().await.map_err(PumpError::Write)?;
    }
    Ok(())
}

enum PumpError {
    /// The client's body failed (too large, malformed, or the client went away).
    Body(BoxError),
    Write(io::Error),
}

/// Where the fields of an upstream's answer head go: a header map (answers through hyper) or
/// HTTP/1.1 bytes (keygate's own listener). Only a final answer's head is given to a sink, and
/// only the fields that may pass to the client.
pub trait HeadSink {
    fn status(&mut self, status: StatusCode);
    /// `Err` if the field cannot be carried (the answer then fails as malformed).
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), BadField>;
}

/// A header field a sink cannot carry.
#[derive(Debug)]
pub struct BadField;

/// Collects an answer head into a header map.
#[derive(Default)]
pub struct MapSink {
    pub headers: HeaderMap,
}

impl HeadSink for MapSink {
    fn status(&mut self, _: StatusCode) {}
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), BadField> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| BadField)?;
        let value = HeaderValue::from_bytes(value).map_err(|_| BadField)?;
        self.headers.append(name, value);
        Ok(())
    }
}

/// An answer's status and how its body ends, from its head.
struct Head {
    status: StatusCode,
    framing: Framing,
}

/// Reads until a whole answer head is buffered, then parses it into `sink`. `Ok(None)`: the
/// connection closed before the first byte of an answer.
async fn read_head<R: tokio::io::AsyncRead + Unpin, S: HeadSink>(
    r: &mut R,
    buf: &mut BytesMut,
    method: &Method,
    sink: &mut S,
) -> Result<Option<Head>, UpstreamError> {
    loop {
        if !buf.is_empty() {
            match parse_head(buf, method, sink)? {
                // 100 Continue, 103 Early Hints: not forwarded; the final answer follows.
                Parsed::Interim => continue,
                Parsed::Final(head) => return Ok(Some(head)),
                Parsed::Partial => {}
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(UpstreamError::Failed("the upstream's answer head is too large".into()));
        }
        buf.reserve(READ_CHUNK);
        let n = r.read_buf(buf).await.map_err(|e| UpstreamError::Failed(format!("reading the answer: {e}")))?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(UpstreamError::Failed("the upstream closed the connection in the middle of its answer".into()))
            };
        }
    }
}

enum Parsed {
    Partial,
    /// An informational answer (not 101), skipped.
    Interim,
    Final(Head),
}

/// Parses one answer head at the start of `buf` and removes it from there. A final answer's
/// status and passing fields go to `sink`: not the hop-by-hop fields, not those named in
/// `Connection`, and not the framing (the listener frames the body for the client again), except
/// the `Content-Length` of an answer that has no body (HEAD, 204, 304), which describes the
/// resource.
fn parse_head<S: HeadSink>(buf: &mut BytesMut, method: &Method, sink: &mut S) -> Result<Parsed, UpstreamError> {
    // Uninitialised slots: zeroing 128 of them (4 KiB) on every answer was a visible share of
    // the profile.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(UpstreamError::Failed(format!("the upstream's answer does not parse: {e}"))),
    };
    if resp.version != Some(1) {
        return Err(UpstreamError::Failed("the upstream does not answer in HTTP/1.1".into()));
    }
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| UpstreamError::Failed("the upstream's status code is not valid".into()))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    let mut connection_close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| UpstreamError::Failed("the upstream sent a bad Content-Length".into()))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(UpstreamError::Failed("the upstream sent two different Content-Lengths".into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The final coding decides (RFC 9112 §6.3); anything but chunked is read to the end.
            for coding in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|c| !c.is_empty()) {
                chunked = coding.eq_ignore_ascii_case(b"chunked");
                other_coding |= !chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection_close |= h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    // RFC 9112 §6.3, in its order.
    let no_body = *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if upgrade {
        Framing::Upgraded
    } else if no_body {
        Framing::Length(0)
    } else if chunked && !other_coding {
        // Transfer-Encoding overrides Content-Length; the length is not passed on.
        Framing::Chunked(Chunked::Size)
    } else if chunked || other_coding {
        Framing::UntilClose
    } else {
        match content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let framing = match framing {
        Framing::Length(n) if connection_close => Framing::LengthThenClose(n),
        Framing::Chunked(c) if connection_close => Framing::ChunkedThenClose(c),
        f => f,
    };
    sink.status(status);
    // Every field the answer's `Connection` names is removed, however many it names.
    let named = crate::head::ConnectionNames::new(resp.headers);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let pass = if name.eq_ignore_ascii_case(b"content-length") {
            no_body
        } else if name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"transfer-encoding") {
            false
        } else if upgrade {
            // A 101 keeps `Upgrade`; what it names is the new protocol.
            name.eq_ignore_ascii_case(b"upgrade") || !(is_hop_by_hop(name) || named.lists(name))
        } else {
            !(is_hop_by_hop(name) || named.lists(name))
        };
        if pass {
            sink.field(h.name, h.value).map_err(|BadField| {
                UpstreamError::Failed(format!("the upstream sent a bad header field {:?}", h.name))
            })?;
        }
    }
    buf.advance(len);
    Ok(Parsed::Final(Head { status, framing }))
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), in any case.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// How the answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain; then the connection can take another request.
    Length(u64),
    /// The same, but the upstream said `Connection: close`.
    LengthThenClose(u64),
    Chunked(Chunked),
    ChunkedThenClose(Chunked),
    /// Until the upstream closes the connection.
    UntilClose,
    /// A 101 answer: the connection now belongs to the upgraded protocol.
    Upgraded,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
    /// The body and its trailer section were read.
    Ended,
}

/// What the buffered bytes gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Data(Bytes),
    /// The body's trailer fields (at the end of a chunked body that has some to pass on): the
    /// next step is [`Step::End`].
    Trailers(http::HeaderMap),
    NeedMore,
    End,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// One step of a chunked body over the buffered bytes (RFC 9112 §7.1). Strict: a chunk size is
/// hex digits (at most 15), optionally followed by extensions, ended by CRLF.
pub(crate) fn step_chunked(state: &mut Chunked, buf: &mut BytesMut) -> io::Result<Step> {
    loop {
        match *state {
            Chunked::Size => {
                // At most MAX_CHUNK_LINE bytes with its CRLF, whether or not the CRLF came in the
                // same read: where a body ends must not depend on how its bytes were cut (fuzz
                // target `chunked`). Without a CRLF yet, the line is refused only once it is
                // sure to be too long (its CR may be the last byte here).
                let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() >= MAX_CHUNK_LINE {
                        return Err(bad("chunk-size line too long"));
                    }
                    return Ok(Step::NeedMore);
                };
                if eol + 2 > MAX_CHUNK_LINE {
                    return Err(bad("chunk-size line too long"));
                }
                let line = &buf[..eol];
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 15 {
                    return Err(bad("bad chunk size"));
                }
                let rest = &line[digits..];
                // Extensions (RFC 9112 §7.1.1) are skipped, but must hold no control byte: no
                // bare CR or LF another parser could end the line at.
                let ext_ok = rest.is_empty() || {
                    let t =
                        rest.iter().position(|b| *b != b' ' && *b != b'\t').map_or(&rest[rest.len()..], |i| &rest[i..]);
                    t.first() == Some(&b';') && crate::head::is_field_value(t)
                };
                if !ext_ok {
                    return Err(bad("bad chunk size"));
                }
                let size = line[..digits]
                    .iter()
                    .fold(0u64, |acc, b| acc * 16 + u64::from(char::from(*b).to_digit(16).unwrap_or(0)));
                buf.advance(eol + 2);
                *state = if size == 0 { Chunked::Trailers } else { Chunked::Data(size) };
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *state = if left == 0 { Chunked::DataEnd } else { Chunked::Data(left) };
                return Ok(Step::Data(data));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                // The trailer section is read whole before it is taken, as strictly as a
                // head (RFC 9112 §7.1.2): each line ends in CRLF and is `name: value`, with a
                // token for a name and a valid field value; a bare LF, a folded line or a
                // control byte is refused, so no other parser can read a message boundary here
                // that keygate did not. At most MAX_TRAILERS fields in MAX_CHUNK_LINE bytes;
                // "too long" is said only once it is sure, whatever the cut of the bytes.
                let mut at = 0;
                let mut fields = 0u16;
                let end = loop {
                    let rest = &buf[at..];
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        // A line not ended yet: the CR, or CRLF, that would end it still to come.
                        let to_come = if rest.last() == Some(&b'\r') { 1 } else { 2 };
                        if rest != b"\r" && !rest.is_empty() && buf.len() + to_come > MAX_CHUNK_LINE {
                            return Err(bad("trailer section too long"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    if eol == 0 {
                        break at;
                    }
                    if at + eol + 2 > MAX_CHUNK_LINE || fields >= MAX_TRAILERS {
                        return Err(bad("trailer section too long"));
                    }
                    if !is_field_line(&rest[..eol]) {
                        return Err(bad("malformed trailer field"));
                    }
                    at += eol + 2;
                    fields += 1;
                };
                let trailers = trailer_fields(&buf[..end]);
                buf.advance(end + 2);
                *state = Chunked::Ended;
                if !trailers.is_empty() {
                    return Ok(Step::Trailers(trailers));
                }
            }
            Chunked::Ended => return Ok(Step::End),
        }
    }
}

/// The fields of a trailer section (`name: value` lines, each ended by CRLF, checked by
/// [`is_field_line`]) that may be passed on: all but those that are hop-by-hop or that frame,
/// route or describe the message ([`may_trail`]).
fn trailer_fields(section: &[u8]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for line in section.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if !may_trail(name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

/// Drops from `trailers` the fields that may not trail ([`may_trail`]).
fn retain_trailing(trailers: &mut http::HeaderMap) {
    let drop: Vec<http::HeaderName> = trailers.keys().filter(|n| !may_trail(n.as_str().as_bytes())).cloned().collect();
    for name in drop {
        trailers.remove(name);
    }
}

/// Whether a trailer field named `name` is passed on: not hop-by-hop, and none of those that
/// frame, route or describe the message, which RFC 9110 §6.5.1 says cannot be trailers
/// (`Content-Length`, `Host`, `Content-Type`, `Content-Encoding`, `Content-Range`,
/// `Authorization`, `Set-Cookie`, `Cache-Control`, …).
fn may_trail(name: &[u8]) -> bool {
    const NOT: [&[u8]; 12] = [
        b"content-length",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"host",
        b"authorization",
        b"set-cookie",
        b"cookie",
        b"cache-control",
        b"expires",
        b"age",
        b"expect",
    ];
    !is_hop_by_hop(name) && !NOT.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether `line` (without its CRLF) is a field line: a token, a colon, and a valid field value
/// (RFC 9110 §5.1, §5.5; RFC 9112 §5).
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else { return false };
    let (name, value) = line.split_at(colon);
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    !name.is_empty() && name.iter().all(tchar) && crate::head::is_field_value(value.get(1..).unwrap_or_default())
}

/// The body of an upstream's answer, read straight from its connection. When it ends, the
/// connection goes back to the pool (or is closed if it cannot take another request).
pub struct UpstreamResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    /// The answer came over HTTP/2: its body (and trailers) from hyper's stream instead.
    h2: Option<hyper::body::Incoming>,
    /// The response cache's part ([`crate::cache`]): the body served from memory (a hit), or a
    /// copy kept as it streams (stored when it ends whole).
    cache: Option<Box<Tap>>,
    /// The trailer fields of a chunked body, read with its last data and not given yet.
    trailers: Option<Box<http::HeaderMap>>,
    /// A body keygate makes as it goes (the AI gateway's streams, [`crate::ai`]).
    made: Option<Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>>,
}

impl UpstreamResponseBody {
    /// The body of an answer that came over HTTP/2.
    pub fn from_h2(body: hyper::body::Incoming) -> Self {
        Self { conn: None, framing: Framing::Done, h2: Some(body), cache: None, trailers: None, made: None }
    }

    /// A body keygate makes as it goes (it ends when `body` does).
    pub fn from_body(body: Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>) -> Self {
        Self { conn: None, framing: Framing::Done, h2: None, cache: None, trailers: None, made: Some(body) }
    }

    /// The connection of a 101 answer, for the upgraded protocol.
    pub fn into_upgraded(mut self) -> Option<Conn> {
        if self.framing == Framing::Upgraded { self.conn.take() } else { None }
    }

    /// A body served from memory (a cache hit).
    pub fn from_memory(body: Bytes) -> Self {
        Self {
            conn: None,
            framing: Framing::Done,
            h2: None,
            cache: Some(Box::new(Tap::Memory(Some(body)))),
            trailers: None,
            made: None,
        }
    }

    /// Keeps a copy of the body as it streams, for the cache. `false` (and nothing kept) when
    /// its end could not be told from a failure (read until the connection closes).
    pub fn tee(&mut self, tap: Tap) -> bool {
        if matches!(self.framing, Framing::UntilClose | Framing::Upgraded) {
            return false;
        }
        self.cache = Some(Box::new(tap));
        true
    }

    /// Of a body served from memory: the bytes not yet given.
    fn memory_len(&self) -> Option<u64> {
        self.cache.as_deref().and_then(Tap::memory_len)
    }

    /// The body's length, when the upstream gave one.
    pub fn exact_len(&self) -> Option<u64> {
        if let Some(n) = self.memory_len() {
            return Some(n);
        }
        if let Some(b) = &self.h2 {
            return if b.is_end_stream() { Some(0) } else { b.size_hint().exact() };
        }
        if let Some(b) = &self.made {
            return if b.is_end_stream() { Some(0) } else { b.size_hint().exact() };
        }
        match self.framing {
            Framing::Length(n) | Framing::LengthThenClose(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    /// Whether the answer has no body to read (a HEAD answer, 204, 304, an empty length).
    pub fn is_empty(&self) -> bool {
        self.memory_len().map_or_else(|| self.ended() && self.trailers.is_none(), |n| n == 0)
    }

    /// The body's bytes that are already buffered, without reading from the connection: for a
    /// small answer, usually the whole body, which then goes out in the same write as the head.
    pub fn buffered(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(d) = self.cache.as_deref_mut().and_then(Tap::take_memory) {
            return Ok(d);
        }
        if self.h2.is_some() || self.made.is_some() {
            return Ok(None);
        }
        match self.step() {
            Ok(Step::Data(d)) => {
                self.copy(&d);
                if self.ended() {
                    self.finish();
                }
                Ok(Some(d))
            }
            Ok(Step::End) => {
                self.finish();
                Ok(None)
            }
            Ok(Step::Trailers(t)) => {
                self.trailers = Some(Box::new(t));
                self.finish();
                Ok(None)
            }
            Ok(Step::NeedMore) => Ok(None),
            Err(e) => {
                self.fail();
                Err(e)
            }
        }
    }

    /// One step over the buffered bytes.
    fn step(&mut self) -> io::Result<Step> {
        let Some(conn) = self.conn.as_mut() else { return Ok(Step::End) };
        let buf = &mut conn.buf;
        match &mut self.framing {
            Framing::Length(0) | Framing::LengthThenClose(0) | Framing::Done | Framing::Upgraded => Ok(Step::End),
            Framing::Length(left) | Framing::LengthThenClose(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                Ok(Step::Data(buf.split_to(take).freeze()))
            }
            Framing::Chunked(state) | Framing::ChunkedThenClose(state) => step_chunked(state, buf),
            Framing::UntilClose => {
                if buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Ok(Step::Data(buf.split().freeze()))
                }
            }
        }
    }

    /// Body bytes on their way to the client: the cache keeps a copy if it wants one.
    fn copy(&mut self, d: &Bytes) {
        if let Some(tap) = self.cache.as_deref_mut() {
            tap.copy(d);
        }
    }

    /// The body is over: a connection that can take another request goes back to the pool.
    fn finish(&mut self) {
        let reusable = matches!(self.framing, Framing::Length(0) | Framing::Chunked(_));
        self.framing = Framing::Done;
        if let Some(tap) = self.cache.take() {
            tap.complete();
        }
        if let Some(conn) = self.conn.take()
            && reusable
        {
            conn.release();
        }
    }

    fn fail(&mut self) {
        self.framing = Framing::Done;
        self.conn = None;
        self.cache = None;
    }

    fn ended(&self) -> bool {
        if let Some(b) = &self.h2 {
            return b.is_end_stream();
        }
        if let Some(b) = &self.made {
            return b.is_end_stream();
        }
        matches!(self.framing, Framing::Length(0) | Framing::LengthThenClose(0) | Framing::Done)
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(d) = this.cache.as_deref_mut().and_then(Tap::take_memory) {
            return Poll::Ready(d.map(|d| Ok(Frame::data(d))));
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*t))));
        }
        if let Some(b) = &mut this.made {
            return b.as_mut().poll_frame(cx);
        }
        if let Some(b) = &mut this.h2 {
            // Data and trailers as they come (an HTTP/2 client gets the trailers; the HTTP/1.1
            // front end takes only the data), each data piece copied for the cache when it
            // keeps one, which completes at the stream's end (the last data frame may be the
            // end: a consumer need not poll again after it).
            let frame = ready!(Pin::new(&mut *b).poll_frame(cx));
            let at_end = b.is_end_stream();
            return Poll::Ready(match frame {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        this.copy(d);
                    }
                    if at_end {
                        this.finish();
                    }
                    // Trailers pass with the fields that may trail, as an HTTP/1.1 upstream's
                    // do ([`trailer_fields`]): one rule whatever the client speaks.
                    Some(Ok(match f.into_trailers() {
                        Ok(mut t) => {
                            retain_trailing(&mut t);
                            Frame::trailers(t)
                        }
                        Err(f) => f,
                    }))
                }
                Some(Err(e)) => {
                    this.fail();
                    Some(Err(Box::new(e)))
                }
                None => {
                    this.finish();
                    None
                }
            });
        }
        loop {
            match this.step() {
                Ok(Step::Data(d)) => {
                    this.copy(&d);
                    if this.ended() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Trailers(t)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            conn.buf.reserve(READ_CHUNK);
            let read = match &mut conn.stream {
                UpstreamStream::Plain(stream) => match stream.try_read_buf(&mut conn.buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Err(e) = ready!(stream.poll_read_ready(cx)) {
                            this.fail();
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                        continue;
                    }
                    r => r,
                },
                UpstreamStream::Tls(stream) => ready!(poll_read_tls(stream, cx, &mut conn.buf)),
            };
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            };
            if n == 0 {
                if this.framing == Framing::UntilClose {
                    this.fail(); // the close is the end; the connection is spent
                    return Poll::Ready(None);
                }
                this.fail();
                return Poll::Ready(Some(Err(Box::new(bad(
                    "the upstream closed the connection before the body ended",
                )))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(n) = self.memory_len() {
            return n == 0;
        }
        (self.ended() && self.trailers.is_none()) || self.framing == Framing::Upgraded
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(n) = self.memory_len() {
            return SizeHint::with_exact(n);
        }
        if let Some(b) = &self.h2 {
            return b.size_hint();
        }
        if let Some(b) = &self.made {
            return b.size_hint();
        }
        match self.framing {
            Framing::Length(n) | Framing::LengthThenClose(n) => SizeHint::with_exact(n),
            Framing::Done | Framing::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// One read of decrypted bytes from a TLS stream onto the end of `buf`. (A plain stream reads
/// into the buffer's spare capacity; without `unsafe` this one zeroes the bytes it lends the
/// reader first, a small cost next to decryption.)
fn poll_read_tls(
    stream: &mut tokio_rustls::client::TlsStream<TcpStream>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    use tokio::io::AsyncRead;
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let mut rb = tokio::io::ReadBuf::new(buf.get_mut(start..).unwrap_or_default());
    let r = Pin::new(stream).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    buf.truncate(start + n);
    r.map_ok(|()| n)
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        // A body read to its end was handed back in `finish`; one dropped earlier (the client
        // went away) leaves its connection in an unknown state, so it is closed. An empty body
        // that was never polled is over, and its connection can be reused.
        if self.conn.is_some() && self.ended() {
            self.finish();
        }
    }
}

/// What went wrong while sending a body, seen by the caller.
pub enum SendError {
    Upstream(UpstreamError),
    /// The client's body failed while it streamed upstream (too large, malformed).
    Body(BoxError),
}

/// What a response cache ([`crate::cache`]) does with an answer's body: serve it from memory (a
/// hit), or keep a copy of it as it streams (a miss being stored). Defined here, with the body,
/// so that the cache depends on the upstream client and not the other way round.
pub enum Tap {
    Memory(Option<Bytes>),
    Tee(Box<dyn BodyCopy>),
}

/// A copy of an answer's body kept as it streams; completed only if the body ended whole.
pub trait BodyCopy: Send {
    /// Body bytes that went to the client.
    fn copy(&mut self, d: &Bytes);
    /// The body ended whole.
    fn complete(self: Box<Self>);
}

impl Tap {
    /// Of a body served from memory: the bytes not yet given.
    pub fn memory_len(&self) -> Option<u64> {
        match self {
            Self::Memory(b) => Some(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Tee(_) => None,
        }
    }

    /// Of a body served from memory: its bytes, once (`Some(None)` after). `None` otherwise.
    pub fn take_memory(&mut self) -> Option<Option<Bytes>> {
        match self {
            Self::Memory(b) => Some(b.take()),
            Self::Tee(_) => None,
        }
    }

    /// Body bytes that went to the client: a copy keeps them.
    pub fn copy(&mut self, d: &Bytes) {
        if let Self::Tee(t) = self {
            t.copy(d);
        }
    }

    /// The body ended whole.
    pub fn complete(self) {
        if let Self::Tee(t) = self {
            t.complete();
        }
    }
}

/// An upstream's answer: its status (its head went to the sink) and its body.
pub struct Answered {
    pub status: StatusCode,
    pub body: UpstreamResponseBody,
}

/// A request for [`send`], whose head the caller wrote whole into the connection
/// ([`Conn::head_buf`]) for the body's framing ([`request_framing`]), and its time limits.
#[derive(Clone, Copy)]
pub struct UpstreamRequest<'a> {
    pub method: &'a Method,
    pub framing: RequestFraming,
    pub connect_timeout: Duration,
    /// When the answer's head must have come.
    pub deadline: tokio::time::Instant,
}

/// An idle pooled HTTP/1.1 connection to `upstream`, else a new one. A failure to connect counts
/// against the upstream's passive health. (Which HTTP version to speak is decided in
/// [`crate::upstream::open`].)
pub async fn open(upstream: &Upstream, connect_timeout: Duration) -> Result<Conn, UpstreamError> {
    if let Some(c) = checkout(&upstream.pool_key) {
        return Ok(c);
    }
    connect(upstream, connect_timeout).await.inspect_err(|_| note_failure(upstream))
}

/// An idle pooled HTTP/1.1 connection to `upstream`, if this worker has one.
pub(crate) fn checkout_idle(upstream: &Upstream) -> Option<Conn> {
    checkout(&upstream.pool_key)
}

impl Conn {
    /// The connection's buffer for the next request head, empty: the caller writes the head
    /// whole, `\r\n\r\n` included, and [`send`] sends it as it is.
    pub fn head_buf(&mut self) -> &mut Vec<u8> {
        self.head.clear();
        &mut self.head
    }
}

/// Sends a request over `conn` (from [`open`], its head written into [`Conn::head_buf`]) and
/// reads the answer's head into `sink`. What passes upstream was decided before, by the request
/// path; this only carries bytes. `body` is taken when it is sent; a request whose body was not
/// consumed can be sent again: a pooled connection found dead before the answer began is
/// replaced by a fresh one once. Connection failures count against the upstream's passive
/// health; a failure after the request was sent is left to the caller, which knows whether the
/// client's body caused it.
pub async fn send<B: BodySource, S: HeadSink>(
    upstream: &Upstream,
    mut conn: Conn,
    req: &UpstreamRequest<'_>,
    body: &mut Option<B>,
    sink: &mut S,
) -> Result<Answered, SendError> {
    let UpstreamRequest { method, connect_timeout, deadline, .. } = *req;
    let authority = &upstream.authority;
    let mut pooled = conn.pooled;
    let head = std::mem::take(&mut conn.head);
    if upstream.counts_in_flight {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    let result = loop {
        let attempt = exchange(&mut conn.stream, &mut conn.buf, (req, &head), body, sink);
        match conn.timer.run(deadline, attempt).await {
            None => break Err(SendError::Upstream(UpstreamError::Timeout)),
            Some(Ok(Some(h))) => break Ok(h),
            // Closed before answering. On a reused connection with nothing consumed, this is the
            // upstream having closed it while idle: try once on a fresh one.
            Some(Ok(None)) if pooled && body.is_some() && method.is_idempotent() => {
                pooled = false;
                match connect(upstream, connect_timeout).await {
                    Ok(c) => conn = c,
                    Err(e) => {
                        note_failure(upstream);
                        break Err(SendError::Upstream(e));
                    }
                }
            }
            Some(Ok(None)) => {
                break Err(SendError::Upstream(UpstreamError::Failed(format!(
                    "{authority} closed the connection without answering"
                ))));
            }
            Some(Err(e)) => break Err(e),
        }
    };
    // Back with the connection that is kept (a retry may have replaced the first), unless an
    // unusually large head made it big: idle pooled connections should not hold much memory.
    if head.capacity() <= KEPT_HEAD_CAPACITY {
        conn.head = head;
    }
    if upstream.counts_in_flight {
        upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    let (head, body_done) = result?;
    note_success(upstream);
    let mut framing = head.framing;
    if !body_done {
        // The upstream answered before taking the whole body: the connection is not reusable.
        framing = match framing {
            Framing::Length(n) => Framing::LengthThenClose(n),
            Framing::Chunked(c) => Framing::ChunkedThenClose(c),
            f => f,
        };
    }
    Ok(Answered {
        status: head.status,
        body: UpstreamResponseBody { conn: Some(conn), framing, h2: None, cache: None, trailers: None, made: None },
    })
}

/// Writes the head and body and reads the answer's head. While the body streams, the answer is
/// read too, so an upstream that answers early (a 413, say) is heard. `Ok(None)`: the connection
/// closed before the first byte of an answer; `body` is still there if none of it was consumed.
async fn exchange<B: BodySource, S: HeadSink>(
    stream: &mut UpstreamStream,
    buf: &mut BytesMut,
    (req, head): (&UpstreamRequest<'_>, &[u8]),
    body: &mut Option<B>,
    sink: &mut S,
) -> Result<Option<(Head, bool)>, SendError> {
    let UpstreamRequest { method, framing, .. } = *req;
    let written = match stream {
        UpstreamStream::Plain(s) => s.write_all(head).await,
        // A TLS stream may keep written bytes until it is flushed.
        UpstreamStream::Tls(s) => {
            async {
                s.write_all(head).await?;
                s.flush().await
            }
            .await
        }
    };
    if let Err(e) = written {
        // Nothing of the answer came; a dead idle connection shows up here or in the read.
        tracing::debug!(error = %e, "writing to the upstream failed");
        return Ok(None);
    }
    let has_body = body.as_ref().is_some_and(|b| !b.is_end_stream());
    if !has_body {
        return Ok(read_head(stream, buf, method, sink).await.map_err(SendError::Upstream)?.map(|h| (h, true)));
    }
    let Some(mut b) = body.take() else { return Ok(None) };
    match stream {
        UpstreamStream::Plain(s) => {
            let (rd, wr) = s.split();
            exchange_body(rd, wr, buf, method, framing, &mut b, sink).await
        }
        UpstreamStream::Tls(s) => {
            let (rd, wr) = tokio::io::split(&mut **s);
            exchange_body(rd, wr, buf, method, framing, &mut b, sink).await
        }
    }
}

/// The body half of [`exchange`]: the body streams out while the answer's head is read.
async fn exchange_body<B, S, R, W>(
    mut rd: R,
    mut wr: W,
    buf: &mut BytesMut,
    method: &Method,
    framing: RequestFraming,
    b: &mut B,
    sink: &mut S,
) -> Result<Option<(Head, bool)>, SendError>
where
    B: BodySource,
    S: HeadSink,
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let pump = pump_body(b, framing, &mut wr);
    tokio::pin!(pump);
    let answer = read_head(&mut rd, buf, method, sink);
    tokio::pin!(answer);
    let mut pumped = false;
    loop {
        tokio::select! {
            r = &mut pump, if !pumped => match r {
                Ok(()) => pumped = true,
                Err(PumpError::Body(e)) => return Err(SendError::Body(e)),
                Err(PumpError::Write(e)) => {
                    return Err(SendError::Upstream(UpstreamError::Failed(format!("sending the body: {e}"))));
                }
            },
            h = &mut answer => {
                return match h.map_err(SendError::Upstream)? {
                    Some(h) => Ok(Some((h, pumped))),
                    None => Err(SendError::Upstream(UpstreamError::Failed(
                        "the upstream closed the connection without answering".into(),
                    ))),
                };
            }
        }
    }
}

/// Records an answer. Reads before it writes: on the usual path (healthy, no failures) both
/// workers only read the upstream's counters, so its cache line is not moved between cores.
pub fn note_success(u: &Upstream) {
    if u.failures.load(Ordering::Relaxed) != 0 {
        u.failures.store(0, Ordering::Relaxed);
    }
    if !u.healthy.load(Ordering::Relaxed) && !u.healthy.swap(true, Ordering::Relaxed) {
        tracing::info!(upstream = %u.authority, address = ?u.addr, "upstream is healthy again");
    }
}

pub fn note_failure(u: &Upstream) {
    let n = u.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= PASSIVE_FAILURE_THRESHOLD && u.healthy.swap(false, Ordering::Relaxed) {
        tracing::warn!(upstream = %u.authority, address = ?u.addr, failures = n, "upstream taken out of rotation");
    }
}

/// One active health check over HTTP/1.1 on `stream` (a new connection): `GET path`; a 2xx or
/// 3xx answer passes.
pub async fn probe_h1(upstream: &Upstream, stream: UpstreamStream, path: &str, timeout: Duration) -> bool {
    let mut conn = Conn::new(upstream, stream);
    let head =
        format!("GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: keygate-health-check\r\n\r\n", upstream.host_header);
    let mut body: Option<crate::body::UpstreamBody> = None;
    let mut sink = MapSink::default();
    let req = UpstreamRequest {
        method: &Method::GET,
        framing: RequestFraming::None,
        connect_timeout: timeout,
        deadline: tokio::time::Instant::now() + timeout,
    };
    let answer = exchange(&mut conn.stream, &mut conn.buf, (&req, head.as_bytes()), &mut body, &mut sink);
    matches!(
        tokio::time::timeout(timeout, answer).await,
        Ok(Ok(Some((h, _)))) if h.status.is_success() || h.status.is_redirection()
    )
}

/// Records an active health check: `healthy` consecutive successes put an upstream back,
/// `unhealthy` consecutive failures take it out.
pub fn note_probe(u: &Upstream, ok: bool, healthy: u32, unhealthy: u32) {
    if ok {
        u.failures.store(0, Ordering::Relaxed);
        let n = u.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= healthy && !u.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(upstream = %u.authority, address = ?u.addr, "upstream passed its health checks; back in rotation");
        }
    } else {
        u.successes.store(0, Ordering::Relaxed);
        let n = u.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= unhealthy && u.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(upstream = %u.authority, address = ?u.addr, "upstream failed its health checks; out of rotation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GatewayConfig, RouteConfig};
    use crate::routes::RouteTable;

    fn table() -> RouteTable {
        let cfg: RouteConfig = serde_json::from_value(serde_json::json!({
            "id": "r", "path": "/r", "upstreams": ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        }))
        .unwrap();
        RouteTable::build(&[cfg], &GatewayConfig { demo: false, ..Default::default() }).unwrap()
    }

    #[test]
    fn passive_failures_take_an_upstream_out_and_a_success_brings_it_back() {
        let t = table();
        let u = &t.routes[0].upstreams[0];
        for _ in 0..PASSIVE_FAILURE_THRESHOLD - 1 {
            note_failure(u);
        }
        assert!(u.is_healthy(), "still in rotation below the threshold");
        note_failure(u);
        assert!(!u.is_healthy());
        assert_eq!(t.routes[0].pick(&[]), Some(1), "traffic goes to the healthy one");
        note_success(u);
        assert!(u.is_healthy());
    }

    #[test]
    fn active_checks_use_their_thresholds() {
        let t = table();
        let u = &t.routes[0].upstreams[1];
        note_probe(u, false, 2, 3);
        note_probe(u, false, 2, 3);
        assert!(u.is_healthy());
        note_probe(u, false, 2, 3);
        assert!(!u.is_healthy(), "3 failed checks take it out");
        note_probe(u, true, 2, 3);
        assert!(!u.is_healthy(), "one success is not enough");
        note_probe(u, true, 2, 3);
        assert!(u.is_healthy(), "2 successes put it back");
    }

    fn chunks(input: &[u8]) -> io::Result<(Vec<u8>, bool)> {
        let mut buf = BytesMut::from(input);
        let mut state = Chunked::Size;
        let mut out = Vec::new();
        loop {
            match step_chunked(&mut state, &mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Trailers(_) => {}
                Step::NeedMore => return Ok((out, false)),
                Step::End => return Ok((out, true)),
            }
        }
    }

    /// Decodes `body` fed in two reads, cut at `cut`: whether it ended, or the refusal.
    fn in_two(body: &[u8], cut: usize) -> io::Result<bool> {
        let (head, tail) = body.split_at(cut);
        let mut buf = BytesMut::from(head);
        let mut state = Chunked::Size;
        let mut ended = false;
        for more in [&[][..], tail] {
            buf.extend_from_slice(more);
            ended = loop {
                match step_chunked(&mut state, &mut buf)? {
                    Step::Data(_) | Step::Trailers(_) => {}
                    Step::NeedMore => break false,
                    Step::End => break true,
                }
            };
        }
        Ok(ended)
    }

    /// The trailer fields a chunked body gives, fed `step` bytes at a time.
    fn trailers_of(input: &[u8], step: usize) -> Option<Vec<(String, String)>> {
        let mut buf = BytesMut::new();
        let mut state = Chunked::Size;
        let mut got = None;
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match step_chunked(&mut state, &mut buf).unwrap() {
                    Step::Data(_) => {}
                    Step::Trailers(t) => {
                        assert!(got.is_none(), "trailers come once");
                        got = Some(
                            t.iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned())).collect::<Vec<_>>(),
                        );
                    }
                    Step::NeedMore => break,
                    Step::End => {
                        assert!(b"NEXT".starts_with(&buf), "what follows is left");
                        return got;
                    }
                }
            }
        }
        panic!("the body did not end")
    }

    #[test]
    fn trailer_fields_are_passed_on_but_not_those_that_frame_or_route() {
        let body = b"5\r\nhello\r\n0\r\nGrpc-Status: 0\r\ncontent-length: 5\r\nX-Sum:  abc \r\nhost: evil\r\nTE: trailers\r\nx-sum: def\r\n\r\nNEXT";
        let want = vec![
            ("grpc-status".to_owned(), "0".to_owned()),
            ("x-sum".to_owned(), "abc".to_owned()),
            ("x-sum".to_owned(), "def".to_owned()),
        ];
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(trailers_of(body, step), Some(want.clone()), "fed {step} bytes at a time");
        }
        assert_eq!(trailers_of(b"0\r\n\r\nNEXT", 1), None, "no trailer section: no trailers");
        assert_eq!(trailers_of(b"0\r\nhost: x\r\n\r\n", 1), None, "none that may be passed on");
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        assert_eq!(chunks(b"5\r\nhello\r\n0\r\n\r\n").unwrap(), (b"hello".to_vec(), true));
        assert_eq!(chunks(b"3;ext=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n").unwrap(), (b"abc".to_vec(), true));
        assert_eq!(chunks(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap().0, b"0123456789");
        assert_eq!(chunks(b"5\r\nhel").unwrap(), (b"hel".to_vec(), false), "partial data is passed on");
        for bad in [
            &b"x\r\nhello\r\n"[..],
            b"-5\r\nhello\r\n",
            b"5 5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"ffffffffffffffff\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
            b"3;a=\x01\r\nabc\r\n0\r\n\r\n",
            b"3;a\nb\r\nabc\r\n0\r\n\r\n",
            // Trailers: a bare LF that another parser ends the section at, a control byte, no
            // colon, a folded line, a name that is not a token.
            b"0\r\nx-t: a\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n",
            b"0\r\nx-t: a\x01b\r\n\r\n",
            b"0\r\nx-t: a\rb\r\n\r\n",
            b"0\r\nx-t\r\n\r\n",
            b"0\r\nx-t: a\r\n b\r\n\r\n",
            b"0\r\nx t: a\r\n\r\n",
            b"0\r\n: a\r\n\r\n",
        ] {
            assert!(chunks(bad).is_err(), "{:?} must be refused", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_line_too_long_is_refused_however_the_bytes_arrive() {
        // Found by the `chunked` fuzz target (fuzz/corpus/chunked/regression-long-line): a size
        // or trailer line longer than MAX_CHUNK_LINE was refused while its CRLF had not arrived
        // yet, but accepted when it came in the same read, so where a body ended depended on how
        // the bytes were cut.
        let mut size_line = b"1;".to_vec();
        size_line.resize(MAX_CHUNK_LINE + 8, b'e');
        size_line.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        let mut trailer = b"0\r\nx-t: ".to_vec();
        trailer.resize(MAX_CHUNK_LINE + 8, b'v');
        trailer.extend_from_slice(b"\r\n\r\n");
        for body in [size_line, trailer] {
            assert!(chunks(&body).is_err(), "whole");
            assert!(in_two(&body, MAX_CHUNK_LINE + 4).is_err(), "in two reads");
        }
    }

    #[test]
    fn a_size_line_at_the_limit_reads_alike_however_it_is_cut() {
        // The limit counts the CRLF: a line of MAX_CHUNK_LINE bytes with it passes, one byte more
        // does not, and a cut anywhere (the CR last in one read, the LF first in the next)
        // changes neither.
        for (len, ok) in [(MAX_CHUNK_LINE - 2, true), (MAX_CHUNK_LINE - 1, false)] {
            let mut body = b"1;".to_vec();
            body.resize(len, b'e');
            body.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
            assert_eq!(chunks(&body).is_ok(), ok, "whole, line of {len}");
            for cut in len - 2..len + 3 {
                assert_eq!(in_two(&body, cut).is_ok(), ok, "line of {len} cut at {cut}");
            }
        }
    }

    #[test]
    fn trailer_sections_are_bounded() {
        let many = [&b"0\r\n"[..], &b"x-t: a\r\n".repeat(usize::from(MAX_TRAILERS) + 1), b"\r\n"].concat();
        assert!(chunks(&many).is_err(), "too many fields");
        let long = [&b"0\r\nx-t: "[..], &b"a".repeat(MAX_CHUNK_LINE), b"\r\n\r\n"].concat();
        assert!(chunks(&long).is_err(), "too many bytes");
        let ok = [&b"0\r\n"[..], &b"x-t: a\r\n".repeat(usize::from(MAX_TRAILERS)), b"\r\n"].concat();
        assert_eq!(chunks(&ok).unwrap(), (Vec::new(), true));
        // A section of MAX_CHUNK_LINE bytes (its lines with their CRLFs) passes, one byte more
        // does not, however the bytes are cut (the section is taken whole).
        for (len, ok) in [(MAX_CHUNK_LINE, true), (MAX_CHUNK_LINE + 1, false)] {
            let mut section = b"x-t: ".to_vec();
            section.resize(len - 2, b'v');
            section.extend_from_slice(b"\r\n");
            let body = [&b"0\r\n"[..], &section, b"\r\n"].concat();
            assert_eq!(chunks(&body).is_ok(), ok, "whole, section of {len}");
            for cut in (3..body.len()).filter(|c| *c < 8 || *c + 6 > body.len()) {
                assert_eq!(in_two(&body, cut).is_ok(), ok, "section of {len} cut at {cut}");
            }
        }
        // Fed a byte at a time, the same limits hold.
        let mut buf = BytesMut::new();
        let mut state = Chunked::Size;
        let mut refused = false;
        for b in &many {
            buf.extend_from_slice(&[*b]);
            match step_chunked(&mut state, &mut buf) {
                Ok(_) => {}
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
    }

    #[test]
    fn answer_heads_drop_every_field_connection_names() {
        let names: Vec<String> = (0..30).map(|i| format!("x-hop-{i}")).collect();
        let mut raw = format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: {}\r\n", names.join(", "));
        for n in &names {
            raw.push_str(&format!("{n}: secret\r\n"));
        }
        raw.push_str("x-kept: 1\r\n\r\n");
        let mut buf = BytesMut::from(raw.as_bytes());
        let mut sink = MapSink::default();
        assert!(matches!(parse_head(&mut buf, &Method::GET, &mut sink), Ok(Parsed::Final(_))));
        assert_eq!(sink.headers.len(), 1, "{:?}", sink.headers);
        assert_eq!(sink.headers["x-kept"], "1");
    }

    #[test]
    fn answer_heads_follow_rfc_9112_framing() {
        let parse = |raw: &[u8], method: &Method| {
            let mut buf = BytesMut::from(raw);
            let mut sink = MapSink::default();
            parse_head(&mut buf, method, &mut sink).map(|p| match p {
                Parsed::Final(h) => Some((h.status, h.framing, sink.headers)),
                _ => None,
            })
        };
        let (s, f, h) =
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok", &Method::GET).unwrap().unwrap();
        assert_eq!((s, f), (StatusCode::OK, Framing::Length(2)));
        assert_eq!(h.get("x-a").unwrap(), "1");
        assert!(h.get("content-length").is_none(), "the listener frames the body itself");
        let (_, f, h) = parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: 5\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(f, Framing::Chunked(Chunked::Size), "Transfer-Encoding wins over Content-Length");
        assert!(h.get("content-length").is_none() && h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get("transfer-encoding").is_none() && h.get("connection").is_none());
        let (_, f, h) = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", &Method::HEAD).unwrap().unwrap();
        assert_eq!(f, Framing::Length(0), "a HEAD answer has no body");
        assert_eq!(h.get("content-length").unwrap(), "5", "but its length describes the resource");
        let (_, f, _) = parse(b"HTTP/1.1 200 OK\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!(f, Framing::UntilClose);
        let (_, f, _) =
            parse(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n", &Method::GET).unwrap().unwrap();
        assert_eq!(f, Framing::LengthThenClose(1));
        let (s, f, h) = parse(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((s, f), (StatusCode::SWITCHING_PROTOCOLS, Framing::Upgraded));
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(
            parse(b"HTTP/1.1 100 Continue\r\n\r\n", &Method::GET).unwrap().is_none(),
            "interim answers are skipped"
        );
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n", &Method::GET).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n", &Method::GET).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET).unwrap().is_none(), "incomplete");
        assert!(parse(b"HTTP/1.0 200 OK\r\n\r\n", &Method::GET).is_err());
    }

    #[test]
    fn hop_by_hop_fields_in_any_case() {
        for n in ["TE", "Trailer", "upgrade", "Connection", "KEEP-ALIVE", "proxy-connection", "Transfer-Encoding"] {
            assert!(is_hop_by_hop(n.as_bytes()), "{n}");
        }
        for n in ["content-length", "x-custom", "tea"] {
            assert!(!is_hop_by_hop(n.as_bytes()), "{n}");
        }
    }
}
