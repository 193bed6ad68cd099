//! keygate's own HTTP/1.1 server side. Each connection is one task that reads a request head,
//! parses it in place (httparse), makes the request's context and runs the phases
//! ([`crate::phase`]: admit, forward, record, as [`crate::h2`] does for HTTP/2), and then either answers itself
//! or forwards: the upstream's request head is written straight from the client's fields, the
//! answer's head straight from the upstream's, and a small answer goes back to the client in the
//! same write as its head. No header map is built and no task or channel sits between the two
//! legs; this is where most of a proxied request's user-space time went with a general-purpose
//! server (`docs/benchmarks.md`).
//!
//! Framing is strict (RFC 9112): a request whose framing two parsers could read differently is
//! refused and the connection closed (the admit phase, [`crate::phase::admit`], decides which); request bodies are
//! counted, cut at the route's limit and re-framed for the upstream; a body that is not read to
//! its end (a refusal, an early answer) ends the connection after the answer, so the next bytes
//! are never taken for a request. Pipelined requests are answered in order. `Upgrade`
//! (WebSocket) becomes a tunnel after the upstream's 101.

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, Method, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::answer::{AnswerExtra, Code, Refuse, connection_field, line, status_line};
use crate::body::{BodySource, BodyState, BodyTooLarge, BoxError};
use crate::ctx::{ConnInfo, Outcome, RequestCtx};
use crate::gateway::{Gateway, LocalService, MAX_LOCAL_BODY, Table};
use crate::head::{Field, Known, ReqHead, parse_length, split_target, upgrade_protocols, upgrade_requested};
use crate::phase::admit::{Admission, Verdict};
use crate::proxy::{BadField, Chunked, HeadSink, Step, UpstreamResponseBody, step_chunked};
use crate::timer::{Deadline, SendDeadline, Shutdown};

/// The largest request head accepted (431 beyond).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most header fields accepted in a request (431 beyond).
pub(crate) const MAX_FIELDS: usize = 100;
/// What one read asks the kernel for.
const READ_CHUNK: usize = 16 * 1024;

pub use crate::config::Timeouts;

/// What became of the bytes at the start of the read buffer.
enum Served {
    /// They are not a whole request head yet.
    Partial,
    /// A request was answered; `true` if the connection can take another.
    Done(bool),
}

/// One client connection: what its requests share.
struct H1Conn<'c, R, W> {
    gw: &'c Arc<Gateway>,
    info: ConnInfo,
    rd: R,
    /// Every write to the client, answers and tunnels alike, fails when the client has read
    /// nothing of it for the send time-out.
    wr: SendDeadline<W>,
    /// Bytes after the current request's head (its body, pipelined requests).
    body_buf: BytesMut,
    /// What is written next to the client.
    out: Vec<u8>,
    shutdown: &'c Shutdown,
    timeouts: Timeouts,
}

/// Serves one client connection, read from `rd` and written to `wr`, until it closes. `rbuf`
/// holds bytes already read from it.
pub(crate) async fn serve<R, W>(
    gw: Arc<Gateway>,
    info: ConnInfo,
    (rd, wr): (R, W),
    mut rbuf: BytesMut,
    shutdown: Arc<Shutdown>,
    timeouts: Timeouts,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut c = H1Conn {
        gw: &gw,
        info,
        rd,
        wr: SendDeadline::new(wr, timeouts.send),
        body_buf: BytesMut::new(),
        out: Vec::with_capacity(1024),
        shutdown: &shutdown,
        timeouts,
    };
    let mut table = gw.table.load_full();
    // When the head being read began to arrive (set only once one read was not enough).
    let mut began: Option<Instant> = None;
    let mut idle_time = Deadline::new();
    let mut stopping = shutdown.waiter();
    // When the current request began (its first bytes were read); the keep-alive wait after a
    // request runs from there, which saves reading the clock again.
    let mut start = Instant::now();
    loop {
        if rbuf.is_empty() {
            if shutdown.is_set() {
                return;
            }
            reserve(&mut rbuf);
            let deadline = tokio::time::Instant::from_std(start) + timeouts.keep_alive;
            let read = tokio::select! {
                biased;
                r = idle_time.run(deadline, c.rd.read_buf(&mut rbuf)) => matches!(r, Some(Ok(n)) if n > 0),
                () = &mut stopping => false,
            };
            if !read {
                return;
            }
            start = Instant::now();
        }
        // The route table of this request: the connection keeps its own reference and renews
        // it when a reload swapped the table (no shared reference count touched per request).
        {
            let cur = gw.table.load();
            if !Arc::ptr_eq(&cur, &table) {
                table = arc_swap::Guard::into_inner(cur);
            }
        }
        match c.request(&table, &rbuf, start).await {
            Ok(Served::Partial) => {
                // MAX_HEAD bytes without the head's end: the head is longer than the limit.
                let refusal = if rbuf.len() >= MAX_HEAD {
                    Some(head_too_large())
                } else {
                    let began = *began.get_or_insert_with(Instant::now);
                    let left = timeouts.header.saturating_sub(began.elapsed());
                    reserve(&mut rbuf);
                    match tokio::time::timeout(left, c.rd.read_buf(&mut rbuf)).await {
                        Ok(Ok(n)) if n > 0 => None,
                        Ok(_) => return,
                        Err(_elapsed) => {
                            Some(Refuse::of(Code::RequestTimeout, "the request head did not arrive in time"))
                        }
                    }
                };
                if let Some(r) = refusal {
                    let _ = c.refuse_unread(&table, r, Instant::now()).await;
                    let _ = c.wr.shutdown().await;
                    return;
                }
            }
            Ok(Served::Done(keep)) => {
                began = None;
                rbuf.clear();
                if !c.body_buf.is_empty() {
                    rbuf.extend_from_slice(&c.body_buf);
                    c.body_buf.clear();
                }
                if !keep || shutdown.is_set() {
                    let _ = c.wr.shutdown().await;
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Makes room for a read of [`READ_CHUNK`] when little is left.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
}

fn head_too_large() -> Refuse {
    Refuse::of(Code::HeaderTooLarge, "the request head is larger than 64 KiB; send fewer or shorter header fields")
}

fn parse_error(e: httparse::Error) -> Refuse {
    match e {
        httparse::Error::TooManyHeaders => {
            Refuse::of(Code::HeaderTooLarge, "the request has more than 100 header fields")
        }
        httparse::Error::Version => Refuse::bad_framing("only HTTP/1.0 and HTTP/1.1 are served here"),
        e => Refuse::bad_framing(format!("the request head does not parse: {e}")),
    }
}

/// The target's parts: `(authority, path, query)`. Origin form (`/p?q`) and absolute form
/// (`http://host/p?q`); other forms are not requests for a route.
fn target_parts(target: &str) -> Option<(Option<&str>, &str, Option<&str>)> {
    if target.starts_with('/') {
        let (path, query) = split_target(target);
        return Some((None, path, query));
    }
    let rest = target.strip_prefix("http://").or_else(|| target.strip_prefix("https://"))?;
    let (authority, path_query) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (path, query) = split_target(path_query);
    Some((Some(authority), if path.is_empty() { "/" } else { path }, query))
}

/// How the client frames its request body.
pub(crate) enum BodyFraming {
    Length(u64),
    Chunked(Chunked),
    Done,
}

impl BodyFraming {
    /// How the body of `head` is framed, once the request path let its framing through
    /// (`phase::admit::check_framing` refuses the framings it cannot trust, so this need not look at
    /// them twice).
    pub(crate) fn of(head: &ReqHead<'_>) -> Self {
        if head.known.transfer_encodings > 0 {
            return BodyFraming::Chunked(Chunked::Size);
        }
        // A length that does not parse is refused by the request path; until then, none.
        match head.at(head.known.content_length).map(parse_length) {
            Some(Some(n)) => BodyFraming::Length(n),
            Some(None) | None => BodyFraming::Done,
        }
    }
}

/// The request head at the start of `buf`, parsed in place into `slots`: `Ok(None)` while it is
/// not all there, else its length in bytes and the head. Refused here: a head that does not
/// parse or is larger than [`MAX_HEAD`], an incomplete request line, a target that is neither a
/// path nor an absolute URL, an invalid method. The framing checks come next, in the admit phase.
/// The server and the fuzz target of the head (`fuzz/`, through [`crate::fuzz_api`]) both read
/// heads with this one function.
pub(crate) fn parse_head<'b>(
    buf: &'b [u8],
    slots: &'b mut [MaybeUninit<Field<'b>>],
    api_key: Option<&HeaderName>,
) -> Result<Option<(usize, ReqHead<'b>)>, Refuse> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        // The limit is on the head itself, however its bytes arrived: a read can bring more than
        // was asked for, so a head can be whole only past the limit.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e)),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refuse::bad_framing("the request line is incomplete"));
    };
    let Some((authority, path, query)) = target_parts(target) else {
        return Err(Refuse::of(Code::BadRequest, "the request target must be a path (or an absolute URL)"));
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(Refuse::bad_framing("the method is not valid"));
    };
    let fields: &'b [Field<'b>] = req.headers;
    let head = ReqHead {
        method,
        path,
        query,
        version: if version == 0 { Version::HTTP_10 } else { Version::HTTP_11 },
        authority,
        fields,
        known: Known::classify(fields, api_key),
    };
    Ok(Some((len, head)))
}

/// A request body read from the client connection as it is forwarded: counted, cut at the
/// route's limit, de-chunked. A `100 Continue` is sent when the body is first wanted.
struct ClientBody<'c, R, W> {
    rd: &'c mut R,
    buf: &'c mut BytesMut,
    framing: BodyFraming,
    limit: u64,
    state: &'c BodyState,
    /// Where to send `100 Continue` if the client asked for it and it is still owed.
    continue_to: Option<&'c mut W>,
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> ClientBody<'_, R, W> {
    /// Counts `n` more bytes of body against the route's limit.
    fn count(&mut self, n: usize) -> Result<(), BoxError> {
        let total = self.state.seen.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.limit {
            self.state.too_large.store(true, Ordering::Relaxed);
            return Err(Box::new(BodyTooLarge));
        }
        Ok(())
    }

    fn end(&mut self) {
        self.framing = BodyFraming::Done;
        self.state.finished.store(true, Ordering::Relaxed);
    }

    fn broken(&mut self, e: io::Error) -> BoxError {
        self.state.broken.store(true, Ordering::Relaxed);
        Box::new(e)
    }
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> BodySource for ClientBody<'_, R, W> {
    fn is_end_stream(&self) -> bool {
        matches!(self.framing, BodyFraming::Length(0) | BodyFraming::Done)
    }

    fn exact_len(&self) -> Option<u64> {
        match self.framing {
            BodyFraming::Length(n) => Some(n),
            BodyFraming::Done => Some(0),
            BodyFraming::Chunked(_) => None,
        }
    }

    async fn data(&mut self) -> Option<Result<Bytes, BoxError>> {
        if let Some(w) = self.continue_to.take()
            && let Err(e) = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await
        {
            return Some(Err(Box::new(e)));
        }
        loop {
            match &mut self.framing {
                BodyFraming::Done | BodyFraming::Length(0) => {
                    self.end();
                    return None;
                }
                BodyFraming::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(self.buf.len());
                        *left -= n as u64;
                        let data = self.buf.split_to(n).freeze();
                        if matches!(self.framing, BodyFraming::Length(0)) {
                            self.end();
                        }
                        return Some(self.count(n).map(|()| data));
                    }
                }
                BodyFraming::Chunked(state) => match step_chunked(state, self.buf) {
                    Ok(Step::Data(d)) => return Some(self.count(d.len()).map(|()| d)),
                    // A request's trailer fields are not passed on (the body is what the
                    // upstream gets); the body ends with the next step.
                    Ok(Step::Trailers(_)) => continue,
                    Ok(Step::End) => {
                        self.end();
                        return None;
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => return Some(Err(self.broken(e))),
                },
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.rd.read_buf(self.buf).await {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the client closed before its body ended");
                    return Some(Err(self.broken(e)));
                }
                Ok(_) => {}
                Err(e) => return Some(Err(self.broken(e))),
            }
        }
    }
}

/// Writes an upstream's answer head as HTTP/1.1 bytes. Of a 101 answer it also checks that the
/// protocols switched to are ones the client asked for.
struct H1Sink<'o, 'h> {
    out: &'o mut Vec<u8>,
    /// The request, when it asked to upgrade.
    upgrade_of: Option<&'o ReqHead<'h>>,
    /// The answer is a 101.
    switching: bool,
    /// Of a 101: every protocol its `Upgrade` names was asked for (and so allowed on the route),
    /// and it names one.
    switched_as_asked: bool,
}

impl HeadSink for H1Sink<'_, '_> {
    fn status(&mut self, status: StatusCode) {
        self.switching = status == StatusCode::SWITCHING_PROTOCOLS;
        status_line(self.out, status);
    }
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), BadField> {
        if self.switching
            && name.eq_ignore_ascii_case("upgrade")
            && let Some(head) = self.upgrade_of
        {
            // RFC 9110 §7.8: a server must not switch to a protocol the client did not name;
            // an upstream that does is not followed (after the switch nothing is checked).
            let asked = |p: &[u8]| upgrade_protocols(head.all("upgrade")).any(|a| a.eq_ignore_ascii_case(p));
            let mut named = upgrade_protocols(std::iter::once(value)).peekable();
            self.switched_as_asked = named.peek().is_some() && named.all(|p| !p.is_empty() && asked(p));
        }
        if line(self.out, name.as_bytes(), value) { Ok(()) } else { Err(BadField) }
    }
}

impl<R, W> H1Conn<'_, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Answers the request at the start of `rbuf`, if its head is all there: the phases in their
    /// order (admit, then forward or keygate's own answer, then record), as for HTTP/2 in
    /// [`crate::h2`]. Bytes after the head (a body, pipelined requests) move to `body_buf`, so
    /// that the head stays borrowed while the body is read.
    async fn request(&mut self, table: &Arc<Table>, rbuf: &[u8], start: Instant) -> io::Result<Served> {
        let gw = self.gw;
        let now = gw.clock.now();
        let mut slots = [const { MaybeUninit::<Field<'_>>::uninit() }; MAX_FIELDS];
        let (len, head) = match parse_head(rbuf, &mut slots, gw.settings.api_key_header.as_ref()) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(Served::Partial),
            Err(r) => return self.refuse_unread(table, r, start).await,
        };
        if let Some(rest) = rbuf.get(len..)
            && !rest.is_empty()
        {
            self.body_buf.extend_from_slice(rest);
        }
        let head_req = head.method == Method::HEAD;
        let client_11 = head.version == Version::HTTP_11;
        let mut keep = head.keep_alive();
        let framing = BodyFraming::of(&head);
        let mut ctx = RequestCtx::new(table, self.info, &head, start, now);
        let verdict = match gw.admit(&mut ctx) {
            Admission::Wait(route, wait) => gw.admit_after_wait(&mut ctx, route, wait).await,
            Admission::Ready(v) => v,
        };
        let route = match verdict {
            Verdict::Forward(route) => route,
            Verdict::Answer { answer, refusal } => {
                // A body nobody read: skip it if it is all here, else end the connection after.
                keep &= !answer.close && !self.shutdown.is_set() && skip_body(&framing, &mut self.body_buf);
                self.out.clear();
                answer.write_h1(&ctx.extra, head_req, connection_field(keep, client_11), &mut self.out);
                let r = self.wr.write_all(&self.out).await;
                let o = Outcome { status: answer.status.as_u16(), bytes_in: 0, bytes_out: answer.body.len() as u64 };
                gw.record_own(&ctx, refusal, o);
                r?;
                return Ok(Served::Done(keep));
            }
            Verdict::Local(service) => {
                let state = BodyState::default();
                let keep = keep && !self.shutdown.is_set();
                let r = self.local(&ctx, &*service, framing, &state, keep).await;
                let status = r.as_ref().map_or(500, |(s, _)| *s);
                let o = Outcome { status, bytes_in: state.seen.load(Ordering::Relaxed), bytes_out: 0 };
                gw.record_own(&ctx, None, o);
                return r.map(|(_, keep)| Served::Done(keep));
            }
        };
        let upgrade = upgrade_requested(&head);
        let state = BodyState::default();
        let has_body = !matches!(framing, BodyFraming::Done | BodyFraming::Length(0));
        if !has_body {
            state.finished.store(true, Ordering::Relaxed);
        }
        let expect = head.known.expect_continue && head.version == Version::HTTP_11 && has_body;
        self.out.clear();
        let (answered, switched_as_asked) = {
            let mut body = Some(ClientBody {
                rd: &mut self.rd,
                buf: &mut self.body_buf,
                framing,
                limit: route.max_body_bytes,
                state: &state,
                continue_to: if expect { Some(&mut self.wr) } else { None },
            });
            let mut sink = H1Sink {
                out: &mut self.out,
                upgrade_of: upgrade.then_some(&head),
                switching: false,
                switched_as_asked: false,
            };
            let a = gw.forward(&ctx, route, &mut body, &state, &mut sink).await;
            (a, sink.switched_as_asked)
        };
        let body_read = state.finished.load(Ordering::Relaxed);
        let bytes_in = state.seen.load(Ordering::Relaxed);
        let mut answered = match answered {
            Ok(a) => a,
            Err(refusal) => {
                keep &= body_read && !refusal.closes() && !self.shutdown.is_set();
                self.out.clear();
                refusal.answer().write_h1(&ctx.extra, head_req, connection_field(keep, client_11), &mut self.out);
                let r = self.wr.write_all(&self.out).await;
                gw.record(&ctx, Outcome { status: refusal.status.as_u16(), bytes_in, bytes_out: 0 });
                r?;
                return Ok(Served::Done(keep));
            }
        };
        let status = answered.status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let o = Outcome { status: 101, bytes_in, bytes_out: 0 };
            let result = if upgrade
                && switched_as_asked
                && let Some(conn) = answered.body.into_upgraded()
            {
                self.out.extend_from_slice(b"connection: upgrade\r\n\r\n");
                gw.record(&ctx, o);
                // The tunnel lives while its caller would still be let through, and while the
                // worker runs; after the 101 keygate sees no requests, so this is the only check
                // left.
                let shutdown = self.shutdown;
                let caller = ctx.caller.as_ref();
                let ends = async {
                    let mut stopping = shutdown.waiter();
                    if shutdown.is_set() {
                        return;
                    }
                    match caller {
                        Some(c) => tokio::select! {
                            () = gw.until_refused(route, &head.method, c) => {
                                tracing::info!(route = %route.id, "tunnel closed: its token is no longer valid for the route");
                            }
                            () = &mut stopping => {}
                        },
                        None => stopping.await,
                    }
                };
                tunnel(&mut self.rd, &mut self.wr, &mut self.body_buf, &self.out, conn, ends).await
            } else {
                table.metrics.upstream_error(route.index, false);
                let r = Refuse::unasked_switch();
                self.out.clear();
                r.answer().write_h1(&ctx.extra, head_req, Some("close"), &mut self.out);
                gw.record(&ctx, Outcome { status: 502, ..o });
                self.wr.write_all(&self.out).await
            };
            return result.map(|()| Served::Done(false));
        }
        keep &= body_read && !self.shutdown.is_set();
        // Answers that cannot have a body (RFC 9112 §6.3) keep the upstream's fields as they are;
        // every other answer says where its body ends, an empty one included.
        let bodiless = head_req
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framed = Framed { extra: &ctx.extra, client_11, bodiless };
        let (result, sent) = relay(&mut self.wr, &mut self.out, &mut answered.body, &framed, &mut keep).await;
        gw.record(&ctx, Outcome { status: status.as_u16(), bytes_in, bytes_out: sent });
        result.map(|()| Served::Done(keep))
    }

    /// Serves a request for one of keygate's own services (the OAuth endpoints): its body is
    /// read whole (at most [`MAX_LOCAL_BODY`], within the body time-out of the head), the
    /// service answers, the answer goes out whole. Returns the status and whether the
    /// connection can take another request.
    async fn local(
        &mut self,
        ctx: &RequestCtx<'_, '_>,
        service: &dyn LocalService,
        framing: BodyFraming,
        state: &BodyState,
        mut keep: bool,
    ) -> io::Result<(u16, bool)> {
        let head = ctx.head;
        let client_11 = head.version == Version::HTTP_11;
        let expect =
            head.known.expect_continue && client_11 && !matches!(framing, BodyFraming::Done | BodyFraming::Length(0));
        let mut body = ClientBody {
            rd: &mut self.rd,
            buf: &mut self.body_buf,
            framing,
            limit: MAX_LOCAL_BODY,
            state,
            continue_to: if expect { Some(&mut self.wr) } else { None },
        };
        let mut bytes = Vec::new();
        // The whole body within one deadline from the end of the head: a client that sends a
        // byte now and then must not hold the connection, and a task of the control plane's,
        // forever.
        let read_all = async {
            while let Some(piece) = body.data().await {
                match piece {
                    Ok(d) => bytes.extend_from_slice(&d),
                    Err(_) => return false,
                }
            }
            true
        };
        let read = tokio::time::timeout(self.timeouts.body, read_all).await;
        let out = &mut self.out;
        out.clear();
        if !matches!(read, Ok(true)) {
            let r = if read.is_err() {
                Refuse::of(Code::RequestTimeout, "the request body did not arrive in time")
            } else if state.too_large.load(Ordering::Relaxed) {
                Refuse::of(Code::BodyTooLarge, "this endpoint takes bodies up to 64 KiB")
            } else {
                Refuse::bad_framing("the request body is malformed")
            };
            r.answer().write_h1(&AnswerExtra::default(), false, Some("close"), out);
            self.wr.write_all(out).await?;
            return Ok((r.status.as_u16(), false));
        }
        let mut req = http::Request::new(Bytes::from(bytes));
        *req.method_mut() = head.method.clone();
        let target = match head.query {
            Some(q) => format!("{}?{q}", head.path),
            None => head.path.to_owned(),
        };
        if let Ok(uri) = target.parse() {
            *req.uri_mut() = uri;
        }
        for f in head.fields {
            if let (Ok(k), Ok(v)) =
                (http::HeaderName::from_bytes(f.name.as_bytes()), http::HeaderValue::from_bytes(f.value))
            {
                req.headers_mut().append(k, v);
            }
        }
        let resp = service.call(req, ctx.conn.remote).await;
        let status = resp.status();
        keep &= state.finished.load(Ordering::Relaxed);
        status_line(out, status);
        crate::answer::date_line(out);
        for (k, v) in resp.headers() {
            if k != http::header::CONTENT_LENGTH
                && k != http::header::TRANSFER_ENCODING
                && k != http::header::CONNECTION
            {
                line(out, k.as_str().as_bytes(), v.as_bytes());
            }
        }
        if let Some(c) = connection_field(keep, client_11) {
            line(out, b"connection", c.as_bytes());
        }
        let body = resp.into_body();
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        if head.method != Method::HEAD {
            out.extend_from_slice(&body);
        }
        self.wr.write_all(out).await?;
        Ok((status.as_u16(), keep))
    }

    /// Answers a request whose head could not be used, and ends the connection.
    async fn refuse_unread(&mut self, table: &Table, r: Refuse, start: Instant) -> io::Result<Served> {
        self.out.clear();
        r.answer().write_h1(&AnswerExtra::default(), false, Some("close"), &mut self.out);
        let o = Outcome { status: r.status.as_u16(), bytes_in: 0, bytes_out: 0 };
        self.gw.record_unread(table, r.code, start, o);
        self.wr.write_all(&self.out).await?;
        Ok(Served::Done(false))
    }
}

/// Whether an unread request body can be skipped so the connection stays usable: it can when
/// it has a length and is already all buffered.
fn skip_body(framing: &BodyFraming, buf: &mut BytesMut) -> bool {
    match framing {
        BodyFraming::Done => true,
        BodyFraming::Length(n) => match usize::try_from(*n) {
            Ok(n) if n <= buf.len() => {
                buf.advance(n);
                true
            }
            _ => false,
        },
        BodyFraming::Chunked(_) => false,
    }
}

/// Sends the upstream's answer to the client: the head (already in `out`, status line and
/// fields) completed with keygate's headers and the framing, then the body as it arrives.
/// `bodiless` is for answers that have no body whatever their fields say (to HEAD, 1xx, 204,
/// 304): they get no framing of keygate's; every other answer gets one, `content-length: 0`
/// for an empty body, so that a keep-alive client knows where it ends. Returns how many body
/// bytes were sent.
async fn relay<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &mut Vec<u8>,
    body: &mut UpstreamResponseBody,
    framed: &Framed<'_>,
    keep: &mut bool,
) -> (io::Result<()>, u64) {
    let Framed { extra, client_11, bodiless } = *framed;
    extra.write_h1(out);
    let no_body = body.is_empty();
    let mut chunked = false;
    if !bodiless {
        match body.exact_len() {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            // A body of unknown length: chunked to an HTTP/1.1 client, until close otherwise.
            None if client_11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
            None => *keep = false,
        }
    }
    if let Some(c) = connection_field(*keep, client_11) {
        line(out, b"connection", c.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let mut sent = 0u64;
    if !no_body {
        match body.buffered() {
            Ok(Some(d)) => {
                sent += d.len() as u64;
                frame_data(out, &d, chunked);
            }
            Ok(None) => {}
            Err(_) => {
                // The upstream's body is malformed: what was sent cannot be completed.
                *keep = false;
                let r = wr.write_all(out).await;
                return (r.and(Err(io::Error::other("the upstream's body is malformed"))), sent);
            }
        }
    }
    let mut ended = no_body || http_body::Body::is_end_stream(body);
    if ended && chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if let Err(e) = wr.write_all(out).await {
        return (Err(e), sent);
    }
    // The last chunk went out with trailer fields.
    let mut trailed = false;
    while !ended {
        match body.frame().await {
            Some(Ok(frame)) => {
                let d = match frame.into_data() {
                    Ok(d) => d,
                    Err(frame) => {
                        // Trailer fields (an HTTP/2 upstream's, or a chunked HTTP/1.1 one's)
                        // end a chunked answer; an answer of known length cannot carry them.
                        if let (true, Ok(t)) = (chunked, frame.into_trailers()) {
                            out.clear();
                            last_chunk_with(out, &t);
                            if let Err(e) = wr.write_all(out).await {
                                return (Err(e), sent);
                            }
                            trailed = true;
                        }
                        continue;
                    }
                };
                sent += d.len() as u64;
                out.clear();
                frame_data(out, &d, chunked);
                if let Err(e) = wr.write_all(out).await {
                    return (Err(e), sent);
                }
            }
            Some(Err(e)) => {
                // The upstream failed in the middle of the body: the client sees the connection
                // close before the body's end, as the framing tells it.
                *keep = false;
                return (Err(io::Error::other(e)), sent);
            }
            None => {
                ended = true;
                if chunked
                    && !trailed
                    && let Err(e) = wr.write_all(b"0\r\n\r\n").await
                {
                    return (Err(e), sent);
                }
            }
        }
    }
    (Ok(()), sent)
}

/// How a relayed answer is completed: keygate's headers, and what the framing depends on.
#[derive(Clone, Copy)]
struct Framed<'a> {
    extra: &'a AnswerExtra,
    /// The client speaks HTTP/1.1 (chunked is possible, keep-alive is the default).
    client_11: bool,
    /// The answer has no body whatever its fields say (to HEAD, 1xx, 204, 304).
    bodiless: bool,
}

/// Appends the last chunk of a chunked answer with its trailer section (the upstream's body
/// gives only the fields that may trail: `proxy::may_trail`; each value is checked again by
/// [`line`]).
fn last_chunk_with(out: &mut Vec<u8>, trailers: &http::HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends body data, as a chunk when the answer is chunked.
fn frame_data(out: &mut Vec<u8>, d: &[u8], chunked: bool) {
    if d.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
        out.extend_from_slice(d);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(d);
    }
}

/// After a 101: the head to the client, then bytes both ways until either side closes or `ends`
/// completes (its caller's token is no longer valid, the worker stops); both connections are
/// closed then.
async fn tunnel<R, W>(
    rd: &mut R,
    wr: &mut W,
    client_early: &mut BytesMut,
    out: &[u8],
    upstream: crate::proxy::Conn,
    ends: impl std::future::Future<Output = ()>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    wr.write_all(out).await?;
    let (mut up, upstream_early) = upstream.into_parts();
    // Bytes the upstream sent right after its 101 belong to the new protocol.
    if !upstream_early.is_empty() {
        wr.write_all(&upstream_early).await?;
    }
    let (mut ur, mut uw) = tokio::io::split(&mut up);
    if !client_early.is_empty() {
        uw.write_all(client_early).await?;
        client_early.clear();
    }
    let to_upstream = async {
        let _ = tokio::io::copy(rd, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut ur, wr).await;
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = async { tokio::join!(to_upstream, to_client) } => {}
        () = ends => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(target_parts("/a/b?c=1"), Some((None, "/a/b", Some("c=1"))));
        assert_eq!(target_parts("http://h:1/a?x"), Some((Some("h:1"), "/a", Some("x"))));
        assert_eq!(target_parts("http://h"), Some((Some("h"), "/", None)));
        assert_eq!(target_parts("http://h?q"), Some((Some("h"), "/", Some("q"))));
        assert_eq!(target_parts("*"), None);
        assert_eq!(target_parts("h:443"), None);
        assert_eq!(target_parts("http://u@h/"), None);
    }

    #[test]
    fn a_content_length_is_a_number_that_fits() {
        use crate::fuzz_api::{HeadOutcome, RequestBody, request_head};
        // Found by the `h1_head` fuzz target (fuzz/corpus/h1_head/regression-length-overflow): a
        // Content-Length of digits beyond u64 passed the framing check and was read as
        // 18446744073709551615, a length the client never sent (RFC 9112 §6.3: an invalid
        // Content-Length is an unrecoverable framing error).
        for raw in [&b"99999999999999999999999"[..], b"18446744073709551616"] {
            let mut head = b"POST /o HTTP/1.1\r\nHost: h\r\nContent-Length: ".to_vec();
            head.extend_from_slice(raw);
            head.extend_from_slice(b"\r\n\r\n");
            assert!(
                matches!(request_head(&head, None), HeadOutcome::Refused { status: 400, closes: true, .. }),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let max = b"POST /o HTTP/1.1\r\nContent-Length: 018446744073709551615\r\n\r\n";
        assert!(matches!(
            request_head(max, None),
            HeadOutcome::Accepted(h) if h.body == RequestBody::Length(u64::MAX)
        ));
    }

    #[test]
    fn unread_bodies_are_skipped_only_when_all_here() {
        let mut buf = BytesMut::from(&b"abcdeGET"[..]);
        assert!(skip_body(&BodyFraming::Length(5), &mut buf));
        assert_eq!(&buf[..], b"GET");
        assert!(!skip_body(&BodyFraming::Length(10), &mut buf));
        assert!(!skip_body(&BodyFraming::Chunked(Chunked::Size), &mut buf));
        assert!(skip_body(&BodyFraming::Done, &mut buf));
    }
}
