//! Record: the last phase, which counts a finished request — the route's metrics (requests,
//! statuses, latency, refusal reasons), the caller's usage for the meter (flushed to the store by
//! [`crate::tasks`]), and the access log line. An answer forwarded over HTTP/2 is recorded when
//! its body has been sent ([`Gateway::completion`]); every other answer when it has been written.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::Method;
use keygate_core::Timestamp;

use crate::answer::{Code, OnComplete};
use crate::body::BodyState;
use crate::ctx::{Caller, Identity, Outcome, RequestCtx, RequestLine, client_ip};
use crate::gateway::{Gateway, Table};
use crate::index::IndexedToken;
use crate::routes::Route;
use crate::usage::Sample;
use crate::watch::Seen;

/// The path recorded for a request refused because its path held a token (`token_in_path`):
/// never the path itself. (The access log writes it; the call log keeps no such call, which is
/// refused before its route is known, but would write this too.)
pub(crate) const REDACTED_PATH: &str = "/[redacted: a token was in the path]";

/// What a finished request is counted against.
#[derive(Clone, Copy)]
struct Metered<'a> {
    table: &'a Table,
    route: Option<&'a Route>,
    caller: Option<&'a Caller>,
    line: Option<&'a RequestLine>,
    start: Instant,
    now: Timestamp,
    /// What the watch needs (anomaly detection): the method, the User-Agent, the refusal, and
    /// a token refused because it is stopped (suspended, expired, rotated away) with the
    /// client's address.
    method: Option<&'a Method>,
    agent: Option<&'a [u8]>,
    refusal: Option<&'static str>,
    stopped: Option<(&'a IndexedToken, std::net::IpAddr)>,
    /// For the call log: the path (normalized once admit has) and the client's address when
    /// no caller says it.
    path: Option<&'a str>,
    client: Option<std::net::IpAddr>,
}

impl Gateway {
    /// Records a request keygate answered itself (a refusal, a CORS preflight, the demo route,
    /// one of its own services): its refusal reason, then as any finished request, logged with
    /// the path as sent.
    pub(crate) fn record_own(&self, ctx: &RequestCtx<'_, '_>, refusal: Option<&'static str>, o: Outcome) {
        if let Some(code) = refusal {
            ctx.table.metrics.refusal(code);
            // Per workspace and reason, for the providers' reports (a route of a workspace).
            if let Some(route) = ctx.route
                && let Some(ws) = &route.workspace_id
            {
                self.meter.refusal(ws, &route.id, code, o.status, ctx.now);
            }
        }
        // A path that holds a token is recorded as a placeholder, in both logs.
        let redacted = refusal == Some(Code::TokenInPath.as_str());
        let path = if redacted { REDACTED_PATH } else { &ctx.path };
        let line = self.line(&ctx.head.method, if redacted { REDACTED_PATH } else { ctx.head.path });
        let client = (ctx.caller.is_none() && (ctx.stopped.is_some() || self.calls.is_some()))
            .then(|| client_ip(ctx.conn.remote, ctx.head, &self.settings.trusted_proxies));
        let mut m = Metered::of(ctx, line.as_ref());
        m.refusal = refusal;
        m.stopped = ctx.stopped.as_deref().zip(client);
        m.client = client;
        m.path = Some(path);
        self.count(&m, o);
    }

    /// Records a request that was forwarded (or refused while forwarding), logged with the
    /// normalized path.
    pub(crate) fn record(&self, ctx: &RequestCtx<'_, '_>, o: Outcome) {
        let line = self.line(&ctx.head.method, &ctx.path);
        let mut m = Metered::of(ctx, line.as_ref());
        m.path = Some(&ctx.path);
        self.count(&m, o);
    }

    /// Records a request whose head could not be read (no route, no caller, no log line).
    pub(crate) fn record_unread(&self, table: &Table, refusal: &'static str, start: Instant, o: Outcome) {
        table.metrics.refusal(refusal);
        let m = Metered {
            table,
            route: None,
            caller: None,
            line: None,
            start,
            now: self.clock.now(),
            method: None,
            agent: None,
            refusal: Some(refusal),
            stopped: None,
            path: None,
            client: None,
        };
        self.count(&m, o);
    }

    /// What records an answer forwarded over HTTP/2 once its body has been sent: the caller
    /// moves out of `ctx` into it.
    pub(crate) fn completion(
        self: &Arc<Self>,
        ctx: &mut RequestCtx<'_, '_>,
        route: &Route,
        status: u16,
        state: Arc<BodyState>,
    ) -> Box<dyn OnComplete> {
        Box::new(Completion {
            gw: self.clone(),
            table: ctx.table.clone(),
            route: route.index,
            caller: ctx.caller.take(),
            status,
            state,
            start: ctx.start,
            now: ctx.now,
            line: self.line(&ctx.head.method, &ctx.path),
            method: ctx.head.method.clone(),
            agent: self.watch.as_ref().and(ctx.head.at(ctx.head.known.user_agent)).map(Box::from),
            path: self.calls.as_ref().map(|_| Box::from(&*ctx.path)),
        })
    }

    /// The request line for the access log, taken only when the log is on.
    fn line(&self, method: &Method, path: &str) -> Option<RequestLine> {
        self.settings.access_log.then(|| RequestLine { method: method.clone(), path: path.to_owned() })
    }

    /// Counts a finished request: route metrics, the caller's usage, and the access log line.
    fn count(&self, m: &Metered<'_>, o: Outcome) {
        let Metered { table, route, caller, line, start, now, .. } = *m;
        let latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        table.metrics.request(route.map(|r| r.index), o.status, latency_us);
        // Usage is metered per API key (a JWT exchanged from a key, as that key); other JWT callers
        // count in the route metrics.
        let sample = match (route, caller) {
            (Some(route), Some(c)) => c.key().map(|token| Sample {
                public_id: token.public_id(),
                workspace_id: &token.workspace_id,
                route_index: route.index,
                route_id: &route.id,
                status: o.status,
                bytes_in: o.bytes_in,
                bytes_out: o.bytes_out,
                latency_us,
                at: now,
                client_ip: c.ip,
            }),
            _ => None,
        };
        self.tally(self.seen(m, o), sample.as_ref(), now.as_millis());
        if let Some(calls) = &self.calls {
            self.log_call(calls, m, o, latency_us);
        }
        if let Some(line) = line {
            // The log line holds only valid field values (no line breaks or other controls),
            // checked as a head's are: a value that is not one is logged as `-`.
            let token_id = caller.map(|c| match &c.who {
                Identity::Key(t) => t.token_id().to_string(),
                Identity::Jwt(j) => format!("jwt:{}", logged(j.jti.as_deref().unwrap_or("-"))),
            });
            tracing::info!(
                target: "keygate::access",
                method = %line.method,
                path = %logged(&line.path),
                route = route.map(|r| &*r.id),
                status = o.status,
                latency_us,
                bytes_in = o.bytes_in,
                bytes_out = o.bytes_out,
                token_id = token_id.as_deref(),
                "request"
            );
        }
    }
}

impl Gateway {
    /// Counts the request for the watch and the usage meter: the two shards locked, the two
    /// entries found, then each counted, so that the lookups' cache misses overlap (see
    /// [`crate::usage::UsageMeter::lock`]; they were most of the two's cost per request).
    fn tally(&self, seen: Option<Seen<'_>>, sample: Option<&Sample<'_>>, now_ms: i64) {
        let mut watch = self.watch.as_ref().zip(seen.as_ref()).and_then(|(w, _)| w.lock());
        let mut meter = sample.and_then(|_| self.meter.lock());
        let watched = watch.as_mut().zip(seen.as_ref()).and_then(|(w, s)| w.find(s, now_ms));
        let metered = meter.as_mut().zip(sample).map(|(m, s)| m.find(s));
        if let (Some(slot), Some(s)) = (watched, &seen) {
            slot.count(s, now_ms);
        }
        if let (Some(slot), Some(s)) = (metered, sample) {
            slot.count(s);
        }
    }

    /// What the watch counts of the request (anomaly detection, [`crate::watch`]): an API key's
    /// (a JWT exchanged from a key, as that key), a stopped token's (its refusal), or the OAuth
    /// client's of one of keygate's own JWT access tokens; `None` for other issuers' JWTs (not
    /// watched), or when the watch is off.
    fn seen<'a>(&self, m: &Metered<'a>, o: Outcome) -> Option<Seen<'a>> {
        let (Some(_), Some(method)) = (&self.watch, m.method) else { return None };
        let now = m.now.as_millis();
        let (key, client, workspace_id, app_id, ip, old_secret) = match (m.caller, m.stopped) {
            (Some(c), _) => match (c.key(), &c.who) {
                (Some(t), _) => (t.public_id(), None, &t.workspace_id, &t.app_id, c.ip, false),
                (None, Identity::Jwt(j)) => match (&j.watch_key, &j.client_id, &j.workspace_id, &j.app_id) {
                    (Some(k), Some(client), Some(ws), Some(app)) => (k, Some(client), ws, app, c.ip, false),
                    _ => return None,
                },
                (None, Identity::Key(_)) => return None,
            },
            (None, Some((t, ip))) => (t.public_id(), None, &t.workspace_id, &t.app_id, ip, t.rotated_away(now)),
            (None, None) => return None,
        };
        Some(Seen {
            public_id: key,
            client,
            workspace_id,
            app_id,
            route: m.route.map(|r| &r.id),
            method,
            status: o.status,
            refused: m.refusal.is_some() && matches!(o.status, 401 | 403),
            old_secret,
            ip,
            agent: m.agent,
        })
    }
}

impl Gateway {
    /// Records the call in the call log, under the caller's workspace or else the route's; a
    /// call that names neither (no route, or a shared route without a credential) is not kept.
    fn log_call(&self, calls: &crate::calls::CallLog, m: &Metered<'_>, o: Outcome, latency_us: u64) {
        let (Some(method), Some(path)) = (m.method, m.path) else { return };
        let key = m.caller.and_then(|c| c.key()).or(m.stopped.map(|(t, _)| t));
        let workspace = match (key, m.caller) {
            (Some(t), _) => Some(&*t.workspace_id),
            (None, Some(c)) => c.workspace_id(),
            (None, None) => None,
        }
        .or_else(|| m.route.and_then(|r| r.workspace_id.as_deref()));
        let Some(workspace_id) = workspace else { return };
        let Some(ip) = m.caller.map(|c| c.ip).or(m.client) else { return };
        calls.record(&crate::calls::Call {
            at_ms: m.now.as_millis(),
            workspace_id,
            token: key.map(|t| *t.public_id()),
            app_id: key.map(|t| &*t.app_id).or_else(|| m.caller.and_then(Caller::app_id)),
            route: m.route.map(|r| &*r.id),
            method,
            path,
            status: o.status,
            latency_us,
            ip,
            refusal: m.refusal,
        });
    }
}

impl<'a> Metered<'a> {
    fn of(ctx: &'a RequestCtx<'_, '_>, line: Option<&'a RequestLine>) -> Self {
        Metered {
            table: ctx.table,
            route: ctx.route,
            caller: ctx.caller.as_ref(),
            line,
            start: ctx.start,
            now: ctx.now,
            method: Some(&ctx.head.method),
            agent: ctx.head.at(ctx.head.known.user_agent),
            refusal: None,
            stopped: None,
            path: None,
            client: None,
        }
    }
}

/// A value for the access log: itself when it is a valid field value (no line break or other
/// control character, see [`crate::answer::is_field_value`]), else `-`.
fn logged(v: &str) -> &str {
    if crate::answer::is_field_value(v.as_bytes()) { v } else { "-" }
}

/// Finishes metering when the response body is done (HTTP/2 answers).
struct Completion {
    gw: Arc<Gateway>,
    table: Arc<Table>,
    /// The route's position in `table`.
    route: usize,
    caller: Option<Caller>,
    status: u16,
    state: Arc<BodyState>,
    start: Instant,
    now: Timestamp,
    line: Option<RequestLine>,
    method: Method,
    /// The User-Agent, kept only when the watch is on.
    agent: Option<Box<[u8]>>,
    /// The normalized path, kept only when the call log is on.
    path: Option<Box<str>>,
}

impl OnComplete for Completion {
    fn complete(self: Box<Self>, bytes_out: u64) {
        let o = Outcome { status: self.status, bytes_in: self.state.seen.load(Ordering::Relaxed), bytes_out };
        let m = Metered {
            table: &self.table,
            route: self.table.routes.routes.get(self.route).map(|r| &**r),
            caller: self.caller.as_ref(),
            line: self.line.as_ref(),
            start: self.start,
            now: self.now,
            method: Some(&self.method),
            agent: self.agent.as_deref(),
            refusal: None,
            stopped: None,
            path: self.path.as_deref(),
            client: None,
        };
        self.gw.count(&m, o);
    }
}
