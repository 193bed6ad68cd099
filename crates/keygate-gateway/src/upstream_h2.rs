//! HTTP/2 to upstreams (`upstream_protocol = "http2"`, or `"auto"` when ALPN agrees on `h2`):
//! hyper's HTTP/2 client over the same streams as HTTP/1.1 ([`UpstreamStream`]: h2c with prior
//! knowledge over TCP, `h2` over TLS). What gRPC needs: requests and answers stream both ways at
//! once, and the answer's trailers (`grpc-status`) reach an HTTP/2 client.
//!
//! Each worker keeps one HTTP/2 connection per upstream (pool key as for HTTP/1.1), shared by
//! its requests as streams; a connection the upstream closed (GOAWAY, a broken socket) is
//! replaced by the next request. The request head is the one the forward phase wrote for
//! HTTP/1.1 ([`crate::phase::forward`]), read back into an HTTP/2 request: `Host` becomes
//! `:authority`, and the fields HTTP/2 forbids (connection-specific ones) are left out. `TE:
//! trailers` is passed when the client sent it (gRPC servers ask for it).
//!
//! The request body: a client's HTTP/2 body is handed to the upstream stream as it is (both
//! directions then flow at once); an HTTP/1.1 client's body, which is read from its connection
//! by the front end, is pumped into a small channel while the answer is awaited.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;

use crate::body::{BodySource, BoxError, UpstreamBody};
use crate::proxy::{Answered, HeadSink, SendError, UpstreamError, UpstreamRequest, UpstreamResponseBody};
use crate::target::Upstream;
use crate::upstream_tls::UpstreamStream;

/// The largest answer head (HPACK-decoded field section) accepted from an upstream, as for
/// HTTP/1.1.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// How often an idle HTTP/2 connection is pinged, and how long the answer may take before the
/// connection is given up.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pieces of an HTTP/1.1 client's body in flight to the upstream stream.
const PIPE_DEPTH: usize = 4;

thread_local! {
    /// One HTTP/2 connection per upstream and worker, keyed as the HTTP/1.1 pool.
    static POOL: RefCell<HashMap<Arc<str>, SendRequest<H2Body>, foldhash::fast::FixedState>> =
        RefCell::new(HashMap::with_hasher(foldhash::fast::FixedState::default()));
    /// The retired targets (addresses a DNS name no longer has) this pool has forgotten.
    static FORGOTTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// An HTTP/2 connection to an upstream, for one request.
pub struct H2Conn {
    sender: SendRequest<H2Body>,
    /// It came from the pool (the upstream may have closed it since).
    pooled: bool,
}

/// This worker's connection to `upstream`, if it has one that is still open.
pub fn checkout(upstream: &Upstream) -> Option<H2Conn> {
    POOL.with(|p| {
        let mut pool = p.try_borrow_mut().ok()?;
        FORGOTTEN.with(|seen| crate::resolve::forget_retired(&mut pool, seen));
        let sender = pool.get(&upstream.pool_key)?;
        if sender.is_closed() {
            pool.remove(&upstream.pool_key);
            return None;
        }
        Some(H2Conn { sender: sender.clone(), pooled: true })
    })
}

fn forget(upstream: &Upstream) {
    POOL.with(|p| {
        if let Ok(mut pool) = p.try_borrow_mut() {
            pool.remove(&upstream.pool_key);
        }
    });
}

/// Starts HTTP/2 on a new connection (the client preface and settings; the upstream's settings
/// are read by the connection's task) and makes it this worker's connection to `upstream`.
pub async fn handshake(upstream: &Upstream, stream: UpstreamStream) -> Result<H2Conn, UpstreamError> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_header_list_size(MAX_HEADER_LIST)
        .adaptive_window(true);
    let authority = upstream.authority.clone();
    let (sender, conn) = b
        .handshake::<_, H2Body>(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Connect(format!("HTTP/2 handshake with {authority} failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(upstream = %authority, error = %e, "HTTP/2 connection to the upstream ended");
        }
    });
    POOL.with(|p| {
        if let Ok(mut pool) = p.try_borrow_mut() {
            pool.insert(upstream.pool_key.clone(), sender.clone());
        }
    });
    Ok(H2Conn { sender, pooled: false })
}

/// The body of a request sent over HTTP/2.
pub enum H2Body {
    Empty,
    /// An HTTP/2 client's body, streamed as it comes.
    Client(UpstreamBody),
    /// An HTTP/1.1 client's body, pumped by the request's task.
    Pipe {
        rx: mpsc::Receiver<Piece>,
        len: Option<u64>,
        ended: bool,
    },
}

/// What the pump of an HTTP/1.1 client's body sends.
pub enum Piece {
    Data(Bytes),
    End,
    /// The client's body failed (too large, malformed): the upstream stream is reset.
    Fail,
}

/// An HTTP/1.1 client's body that stopped before its end.
#[derive(Debug)]
struct BodyCut;

impl std::fmt::Display for BodyCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client's body did not arrive whole")
    }
}

impl std::error::Error for BodyCut {}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Client(b) => Pin::new(b).poll_frame(cx),
            Self::Pipe { rx, ended, .. } => {
                if *ended {
                    return Poll::Ready(None);
                }
                match std::task::ready!(rx.poll_recv(cx)) {
                    Some(Piece::Data(d)) => Poll::Ready(Some(Ok(Frame::data(d)))),
                    Some(Piece::End) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Some(Piece::Fail) | None => {
                        *ended = true;
                        Poll::Ready(Some(Err(Box::new(BodyCut))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Client(b) => Body::is_end_stream(b),
            Self::Pipe { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Client(b) => b.size_hint(),
            Self::Pipe { len: Some(n), .. } => SizeHint::with_exact(*n),
            Self::Pipe { .. } => SizeHint::default(),
        }
    }
}

/// Reads the HTTP/1.1 request head the forward phase wrote back into an HTTP/2 request for
/// `upstream`: `Host` becomes the URI's authority; connection-specific fields are dropped
/// (hyper drops them too); `TE: trailers` is added when `te_trailers`.
pub fn request_of(head: &[u8], upstream: &Upstream, te_trailers: bool) -> Result<Request<()>, UpstreamError> {
    let bad = |what: &str| UpstreamError::Failed(format!("the request head for HTTP/2 is not valid: {what}"));
    let lines = head.windows(2).filter(|w| w == b"\r\n").count();
    let mut slots = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("it does not parse")),
    }
    let method = Method::from_bytes(req.method.unwrap_or("GET").as_bytes()).map_err(|_| bad("method"))?;
    let scheme = if upstream.tls.is_some() { "https" } else { "http" };
    let uri: Uri =
        format!("{scheme}://{}{}", upstream.host_header, req.path.unwrap_or("/")).parse().map_err(|_| bad("target"))?;
    let mut out = Request::new(());
    *out.method_mut() = method;
    *out.uri_mut() = uri;
    *out.version_mut() = http::Version::HTTP_2;
    let headers = out.headers_mut();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || crate::proxy::is_hop_by_hop(name)
        {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| bad("a field name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad("a field value"))?;
        headers.append(name, value);
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(out)
}

/// How waiting for an answer ended, other than with one.
enum Waited {
    Timeout,
    Body(BoxError),
    Send(Box<hyper::client::conn::TrySendError<Request<H2Body>>>),
}

/// Sends a request over HTTP/2 (its head written for HTTP/1.1 in `head`, see [`request_of`]) and
/// passes the answer's head to `sink`. A pooled connection found closed before the request left
/// is replaced once by a new one. Passive health is kept as for HTTP/1.1.
#[allow(clippy::too_many_arguments)]
pub async fn send<B: BodySource, S: HeadSink>(
    upstream: &Upstream,
    mut conn: H2Conn,
    req: &UpstreamRequest<'_>,
    head: &[u8],
    te_trailers: bool,
    body: &mut Option<B>,
    sink: &mut S,
) -> Result<Answered, SendError> {
    let request = request_of(head, upstream, te_trailers).map_err(SendError::Upstream)?;
    let has_body = body.as_ref().is_some_and(|b| !b.is_end_stream());
    let owned = body.as_mut().and_then(BodySource::take_owned);
    let (h2_body, pipe) = match owned {
        Some(b) => (H2Body::Client(b), None),
        None if has_body => {
            let (tx, rx) = mpsc::channel(PIPE_DEPTH);
            let len = body.as_ref().and_then(BodySource::exact_len);
            (H2Body::Pipe { rx, len, ended: false }, Some(tx))
        }
        None => (H2Body::Empty, None),
    };
    let mut request = request.map(|()| h2_body);
    let pump = async {
        let (Some(tx), Some(b)) = (pipe, body.as_mut()) else { return Ok(()) };
        while let Some(d) = b.data().await {
            match d {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    if tx.send(Piece::Data(d)).await.is_err() {
                        // The upstream stream is gone; its answer (or error) says why.
                        return Ok(());
                    }
                }
                Err(e) => {
                    let _ = tx.send(Piece::Fail).await;
                    return Err(e);
                }
            }
        }
        let _ = tx.send(Piece::End).await;
        Ok(())
    };
    tokio::pin!(pump);
    let mut pumped = false;
    let mut replaced = !conn.pooled;
    if upstream.counts_in_flight {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    let answer = loop {
        let waiting = conn.sender.try_send_request(request);
        tokio::pin!(waiting);
        let waited = loop {
            tokio::select! {
                r = &mut pump, if !pumped => match r {
                    Ok(()) => pumped = true,
                    Err(e) => break Err(Waited::Body(e)),
                },
                r = &mut waiting => break r.map_err(|e| Waited::Send(Box::new(e))),
                () = tokio::time::sleep_until(req.deadline) => break Err(Waited::Timeout),
            }
        };
        match waited {
            Ok(resp) => break Ok(resp),
            Err(Waited::Send(mut e)) => match e.take_message() {
                // The connection was closed before the request left: the request, its body
                // untouched (or still in its channel), goes on a new connection, once.
                Some(m) if !replaced => {
                    replaced = true;
                    forget(upstream);
                    match crate::proxy::dial(upstream, req.connect_timeout).await {
                        Ok(stream) => match handshake(upstream, stream).await {
                            Ok(c) => {
                                conn = c;
                                request = m;
                            }
                            Err(e) => break Err(SendError::Upstream(e)),
                        },
                        Err(e) => {
                            crate::proxy::note_failure(upstream);
                            break Err(SendError::Upstream(e));
                        }
                    }
                }
                // Refused before the upstream processed it (REFUSED_STREAM, or above a GOAWAY's
                // last stream: RFC 9113 §8.7): a safe request without a body is rebuilt from its
                // head and sent on a new connection, once.
                None if !replaced && !has_body && req.method.is_idempotent() && unprocessed(e.error()) => {
                    replaced = true;
                    forget(upstream);
                    let fresh = match crate::proxy::dial(upstream, req.connect_timeout).await {
                        Ok(stream) => handshake(upstream, stream).await,
                        Err(e) => {
                            crate::proxy::note_failure(upstream);
                            Err(e)
                        }
                    };
                    match (fresh, request_of(head, upstream, te_trailers)) {
                        (Ok(c), Ok(r)) => {
                            conn = c;
                            request = r.map(|()| H2Body::Empty);
                        }
                        (Err(e), _) | (_, Err(e)) => break Err(SendError::Upstream(e)),
                    }
                }
                _ => {
                    let e = e.into_error();
                    if e.is_closed() || e.is_canceled() {
                        forget(upstream);
                    }
                    break Err(SendError::Upstream(UpstreamError::Failed(format!("HTTP/2 request failed: {e}"))));
                }
            },
            Err(Waited::Timeout) => break Err(SendError::Upstream(UpstreamError::Timeout)),
            Err(Waited::Body(e)) => break Err(SendError::Body(e)),
        }
    };
    if upstream.counts_in_flight {
        upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    let resp = answer?;
    crate::proxy::note_success(upstream);
    let (parts, incoming) = resp.into_parts();
    let status = parts.status;
    let no_body = *req.method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    sink.status(status);
    for (name, value) in &parts.headers {
        let n = name.as_str().as_bytes();
        if crate::proxy::is_hop_by_hop(n) || (!no_body && name == http::header::CONTENT_LENGTH) {
            continue;
        }
        sink.field(name.as_str(), value.as_bytes()).map_err(|_| {
            SendError::Upstream(UpstreamError::Failed(format!("the upstream sent a bad header field {name:?}")))
        })?;
    }
    Ok(Answered { status, body: UpstreamResponseBody::from_h2(incoming) })
}

/// Whether an HTTP/2 request failed without the upstream having processed it: refused with
/// `REFUSED_STREAM`, or above the last stream id of a GOAWAY (RFC 9113 §8.7, §6.8).
fn unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// One active health check over HTTP/2 on `stream` (a new connection): `GET path`; a 2xx or 3xx
/// answer passes. The connection is closed afterwards.
pub async fn probe(upstream: &Upstream, stream: UpstreamStream, path: &str) -> bool {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new()).max_header_list_size(MAX_HEADER_LIST);
    let Ok((mut sender, conn)) = b.handshake::<_, H2Body>(TokioIo::new(stream)).await else { return false };
    let task = tokio::spawn(conn);
    let scheme = if upstream.tls.is_some() { "https" } else { "http" };
    let Ok(uri) = format!("{scheme}://{}{path}", upstream.host_header).parse::<Uri>() else { return false };
    let mut req = Request::new(H2Body::Empty);
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    req.headers_mut().insert(http::header::USER_AGENT, HeaderValue::from_static("keygate-health-check"));
    let ok = matches!(sender.send_request(req).await, Ok(r) if r.status().is_success() || r.status().is_redirection());
    task.abort();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GatewayConfig, RouteConfig, UpstreamProtocol};
    use crate::routes::RouteTable;

    #[test]
    fn an_http1_head_becomes_an_http2_request() {
        let cfg = RouteConfig {
            upstream_protocol: UpstreamProtocol::Http2,
            ..RouteConfig::new("g", "/g", "http://127.0.0.1:50051")
        };
        let table = RouteTable::build(&[cfg], &GatewayConfig::default()).unwrap();
        let up = &table.routes[0].upstreams[0];
        let head = b"POST /grpc.health.v1.Health/Check?x=1 HTTP/1.1\r\nhost: 127.0.0.1:50051\r\n\
                     content-type: application/grpc\r\nupgrade: foo\r\nx-keygate-token-id: tok_1\r\n\
                     transfer-encoding: chunked\r\n\r\n";
        let req = request_of(head, up, true).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri().to_string(), "http://127.0.0.1:50051/grpc.health.v1.Health/Check?x=1");
        let names: Vec<&str> = req.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-keygate-token-id", "te"]);
        assert_eq!(req.headers()["te"], "trailers");
        // Without TE: trailers from the client, none is added.
        let req = request_of(head, up, false).unwrap();
        assert!(!req.headers().contains_key("te"));
        assert!(request_of(b"GET / HTTP/1.1\r\n", up, false).is_err());
    }

    #[tokio::test]
    async fn pipe_bodies_end_cleanly_or_fail() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = H2Body::Pipe { rx, len: Some(2), ended: false };
        assert_eq!(body.size_hint().exact(), Some(2));
        tx.send(Piece::Data(Bytes::from_static(b"hi"))).await.unwrap();
        tx.send(Piece::End).await.unwrap();
        let f = http_body_util::BodyExt::frame(&mut body).await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hi");
        assert!(http_body_util::BodyExt::frame(&mut body).await.is_none());
        assert!(body.is_end_stream());
        // A sender dropped before the end is an error, so the upstream stream is reset.
        let (tx, rx) = mpsc::channel(4);
        let mut body = H2Body::Pipe { rx, len: None, ended: false };
        drop(tx);
        assert!(http_body_util::BodyExt::frame(&mut body).await.unwrap().is_err());
    }
}
