//! The HTTP/2 front end: each request hyper hands over (`crate::server` serves HTTP/2 with
//! hyper, on TLS with ALPN `h2` or with prior knowledge) gets its context and goes through the
//! same phases, in the same order, as an HTTP/1.1 request in [`crate::h1`]: admit, then forward
//! or an answer of keygate's own, then record (when the answer's body has been sent).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::answer::{Code, GatewayBody, Refuse};
use crate::body::{BodyState, UpstreamBody};
use crate::ctx::{ConnInfo, Outcome, RequestCtx};
use crate::gateway::{Gateway, LocalService, MAX_LOCAL_BODY};
use crate::head::{self, Known, ReqHead};
use crate::phase::admit::{Admission, Verdict};
use crate::proxy::MapSink;

impl Gateway {
    /// Answers one request that came through hyper (HTTP/2). The body of a request keygate
    /// answers itself must arrive within `local_body_timeout`.
    pub async fn handle(
        self: &Arc<Self>,
        conn: ConnInfo,
        req: Request<Incoming>,
        local_body_timeout: Duration,
    ) -> Response<GatewayBody> {
        let start = Instant::now();
        let table = self.table.load_full();
        let now = self.clock.now();
        let (parts, body) = req.into_parts();
        let fields = head::fields_of(&parts.headers);
        let head = ReqHead {
            method: parts.method.clone(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            version: parts.version,
            authority: parts.uri.authority().map(|a| a.as_str()),
            fields: &fields,
            known: Known::classify(&fields, self.settings.api_key_header.as_ref()),
        };
        let mut ctx = RequestCtx::new(&table, conn, &head, start, now);
        let verdict = match self.admit(&mut ctx) {
            Admission::Wait(route, wait) => self.admit_after_wait(&mut ctx, route, wait).await,
            Admission::Ready(v) => v,
        };
        let route = match verdict {
            Verdict::Forward(route) => route,
            Verdict::Answer { answer, refusal } => {
                let o = Outcome { status: answer.status.as_u16(), bytes_in: 0, bytes_out: 0 };
                self.record_own(&ctx, refusal, o);
                return answer.into_response(&ctx.extra);
            }
            Verdict::Local(service) => {
                return self.local(&ctx, &*service, &parts, body, local_body_timeout).await;
            }
        };
        let state = Arc::new(BodyState::default());
        let mut upstream_body = Some(UpstreamBody::new(body, route.max_body_bytes, state.clone()));
        let mut sink = MapSink::default();
        match self.forward(&ctx, route, &mut upstream_body, &state, &mut sink).await {
            Ok(answered) => {
                let status = answered.status;
                let mut resp = Response::new(());
                *resp.status_mut() = status;
                *resp.headers_mut() = sink.headers;
                ctx.extra.to_map(resp.headers_mut());
                let done = self.completion(&mut ctx, route, status.as_u16(), state);
                resp.map(|()| GatewayBody::Upstream { inner: answered.body, sent: 0, done: Some(done) })
            }
            Err(refusal) => {
                let o = Outcome {
                    status: refusal.status.as_u16(),
                    bytes_in: state.seen.load(Ordering::Relaxed),
                    bytes_out: 0,
                };
                self.record(&ctx, o);
                refusal.answer_to(ctx.head).into_response(&ctx.extra)
            }
        }
    }

    /// A request for one of keygate's own services: its whole body (at most
    /// [`MAX_LOCAL_BODY`]) within one deadline (a stream fed a byte now and then must not hold a
    /// task of the control plane's forever), then the service's answer.
    async fn local(
        &self,
        ctx: &RequestCtx<'_, '_>,
        service: &dyn LocalService,
        parts: &http::request::Parts,
        body: Incoming,
        body_timeout: Duration,
    ) -> Response<GatewayBody> {
        let limited = http_body_util::Limited::new(body, usize::try_from(MAX_LOCAL_BODY).unwrap_or(usize::MAX));
        let collected = match tokio::time::timeout(body_timeout, http_body_util::BodyExt::collect(limited)).await {
            Ok(Ok(c)) => c,
            Ok(Err(_)) => {
                let r = Refuse::of(Code::BodyTooLarge, "this endpoint takes bodies up to 64 KiB");
                return r.answer().into_response(&ctx.extra);
            }
            Err(_elapsed) => {
                let r = Refuse::of(Code::RequestTimeout, "the request body did not arrive in time");
                let o = Outcome { status: r.status.as_u16(), bytes_in: 0, bytes_out: 0 };
                self.record_own(ctx, Some(r.code), o);
                return r.answer().into_response(&ctx.extra);
            }
        };
        let mut req = Request::new(collected.to_bytes());
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.headers_mut() = parts.headers.clone();
        let resp = service.call(req, ctx.conn.remote).await;
        let o = Outcome { status: resp.status().as_u16(), bytes_in: 0, bytes_out: 0 };
        self.record_own(ctx, None, o);
        resp.map(GatewayBody::full)
    }
}
