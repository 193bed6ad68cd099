//! Admit: the first phase, which decides from the request head alone whether a request goes on
//! — every step in memory, in this order: framing checks (RFC 9112 §6), path normalization,
//! route match, CORS preflight (answered without a token), keygate's own services on this
//! listener, refusal of tokens in the query string, the credential, the token (index or JWT),
//! DPoP, the IP allowlist, the scope, an upgrade's protocol, rate limits and quota, the body's
//! announced size. What it learns goes into the [`RequestCtx`] (route, caller, the headers every
//! answer on the route carries); what it refuses is a [`Refuse`], which [`crate::answer`] turns
//! into an answer. Also here: the demo route's answer, and the re-admission of an open tunnel
//! ([`Gateway::until_refused`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use keygate_core::Timestamp;
use keygate_core::dpop::{self, ProofCheck};
use keygate_core::policy::{GcraDecision, Quota, RateLimit};
use keygate_core::secret::TokenSecret;
use keygate_core::token_format::PUBLIC_ID_LEN;

use crate::answer::{Answer, AnswerExtra, Code, Refuse};
use crate::ctx::{Caller, ConnInfo, Identity, RequestCtx, client_ip, is_trusted, origin};
use crate::gateway::{Gateway, LocalService, Table};
use crate::head::{ReqHead, parse_length, upgrade_protocols, upgrade_requested};
use crate::index::{IndexedToken, Refusal, TokenIndex};
use crate::jwt::{JwtRefusal, looks_like_jwt};
use crate::limiter::{Limiter, QuotaDecision};
use crate::routes::{Route, normalize_path};
use crate::shared::Take;

/// How long a DPoP proof is accepted after its `iat`, and the clock skew allowed, in seconds.
const DPOP_MAX_AGE_S: u32 = 300;
const DPOP_LEEWAY_S: u32 = 30;

/// What admit decided about a request.
pub(crate) enum Verdict<'a> {
    /// Forward it to this route's upstreams (the route and caller are in the context).
    Forward(&'a Route),
    /// keygate answers itself: a refusal (with its code, for the refusal metrics), a CORS
    /// preflight, the demo route.
    Answer { answer: Answer, refusal: Option<&'static str> },
    /// A request for one of keygate's own services on this listener (the OAuth endpoints).
    Local(Arc<dyn LocalService>),
}

/// What [`Gateway::admit`] decided from the head alone.
pub(crate) enum Admission<'a> {
    Ready(Verdict<'a>),
    /// Every check passed so far but one needs the shared state (a DPoP proof's first use on
    /// every node, a limit's lease being refilled): finish with [`Gateway::admit_after_wait`].
    Wait(&'a Route, Resume),
}

/// Where the checks of a request stopped to wait for the shared state.
pub(crate) enum Resume {
    /// The DPoP proof was new to this node; the shared memory is asked whether another node saw
    /// it. Every check after DPoP follows.
    Replay(crate::shared::ReplayCheck),
    /// A limit's lease is being refilled.
    Limits(LimitWait),
}

impl<'a> From<Verdict<'a>> for Admission<'a> {
    fn from(v: Verdict<'a>) -> Self {
        Admission::Ready(v)
    }
}

/// Where the limit checks of a request stopped to wait for a shared lease.
pub(crate) struct LimitWait {
    /// The check to start again from (a [`Step`]).
    step: u8,
    pending: crate::shared::Pending,
}

/// The refusal of a caller whose app is not subscribed to the route's API.
#[cold]
fn subscription_message(route: &Route) -> String {
    let what = match route.lifecycle.as_ref() {
        Some(l) => match &l.version {
            Some(v) => format!("version {v} of the API {:?}", l.api),
            None => format!("the API {:?}", l.api),
        },
        None => "this API".to_owned(),
    };
    format!(
        "{what} is open only to apps subscribed to it, and this token's app is not (or its subscription awaits approval); subscribe the app in the developer portal or through POST /admin/v1/apps/{{id}}/subscriptions"
    )
}

/// The limit checks of a request, in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    TokenRate = 0,
    AppRate = 1,
    /// The limits the app's subscription to the route's API lends it (its plan's).
    SubRate = 2,
    RouteRate = 3,
    TokenQuota = 4,
    AppQuota = 5,
    SubQuota = 6,
    Uses = 7,
}

/// The `RateLimit` header pair of a rate limit.
fn add_rate_header(extra: &mut AnswerExtra, name: &'static str, limit: &RateLimit, d: &GcraDecision) {
    extra.limit(name, limit.capacity(), u64::from(limit.per_seconds), d.remaining, ceil_secs_us(d.reset_after));
}

/// Seconds until a quota's period ends, rounded up; `None` for a `total` quota (it never does).
fn quota_reset_s(d: &QuotaDecision) -> Option<u64> {
    (d.reset_after_ms != i64::MAX).then(|| u64::try_from((d.reset_after_ms + 999) / 1000).unwrap_or(0))
}

/// The `RateLimit` header pair of a quota (`w` and `t` are 0 for a `total` quota).
fn add_quota_header(extra: &mut AnswerExtra, name: &'static str, q: &Quota, d: &QuotaDecision, now_ms: i64) {
    let (start, end) = q.period.window(now_ms);
    let window_s = if end == i64::MAX { 0 } else { u64::try_from((end - start) / 1000).unwrap_or(0) };
    extra.limit(name, q.requests, window_s, d.remaining, quota_reset_s(d).unwrap_or(0));
}

impl Verdict<'_> {
    fn refused(r: &Refuse, head: &ReqHead<'_>) -> Self {
        Verdict::Answer { answer: r.answer_to(head), refusal: Some(r.code) }
    }
}

/// RFC 9112 §6: refuse framing two parsers could read differently.
pub(crate) fn check_framing(head: &ReqHead<'_>) -> Result<(), Refuse> {
    let k = &head.known;
    if k.hosts > 1 {
        return Err(Refuse::bad_framing("more than one Host header"));
    }
    if k.transfer_encodings > 0 {
        if k.content_lengths > 0 {
            return Err(Refuse::bad_framing("both Transfer-Encoding and Content-Length"));
        }
        if head.version == http::Version::HTTP_10 {
            return Err(Refuse::bad_framing("Transfer-Encoding in HTTP/1.0"));
        }
        let ok = k.transfer_encodings == 1
            && head.at(k.transfer_encoding).is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
        if !ok {
            return Err(Refuse::bad_framing("Transfer-Encoding other than a single \"chunked\""));
        }
    }
    if k.content_lengths > 1 || head.at(k.content_length).is_some_and(|v| parse_length(v).is_none()) {
        return Err(Refuse::bad_framing("Content-Length must be one plain number below 2^64"));
    }
    if k.framing_lookalike {
        // `Content_Length` or `Transfer--Encoding`: frameworks that fold `_` into `-` (CGI,
        // WSGI, Rack) could read the body's length from a field keygate did not frame it by.
        return Err(Refuse::bad_framing(
            "a header name is a near-spelling of Content-Length or Transfer-Encoding (such as Content_Length); send the field under its own name",
        ));
    }
    Ok(())
}

/// Refuses an upgrade to `h2c`, always (RFC 9113 §3.1 removed it: after its 101 the client
/// would speak HTTP/2 straight to the upstream, and its requests there would pass no check), and
/// to any protocol the route's `upgrades` does not list.
fn check_upgrade(head: &ReqHead<'_>, route: &Route) -> Result<(), Refuse> {
    let refuse = |m: Cow<'static, str>| Refuse { close: true, ..Refuse::of(Code::UpgradeNotAllowed, m) };
    for name in upgrade_protocols(head.all("upgrade")) {
        if name.eq_ignore_ascii_case(b"h2c") {
            return Err(refuse(Cow::Borrowed(
                "upgrading to h2c is not supported (RFC 9113 §3.1): use HTTP/2 with prior knowledge, or TLS with ALPN h2",
            )));
        }
        if !route.upgrades.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(name)) {
            let allowed = if route.upgrades.is_empty() { "none".to_owned() } else { route.upgrades.join(", ") };
            return Err(refuse(Cow::Owned(format!(
                "this route does not allow upgrading to {:?} (allowed: {allowed}); list it in the route's upgrades",
                String::from_utf8_lossy(name)
            ))));
        }
    }
    Ok(())
}

/// The longest a tunnel waits between two checks of its token when nothing changes in the index
/// (a clock set back or forward is noticed within it).
const TUNNEL_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// How the credential came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bearer,
    /// `Authorization: DPoP`, with a `DPoP` proof (RFC 9449 §7.1).
    Dpop,
    /// The configured API-key header.
    ApiKey,
}

/// The credential: `Authorization: Bearer …`, `Authorization: DPoP …` or the configured API-key
/// header.
fn credential<'a>(head: &ReqHead<'a>) -> Option<(Scheme, &'a str)> {
    if let Some(v) = head.at(head.known.authorization) {
        let v = std::str::from_utf8(v).ok()?;
        let (scheme, rest) = crate::head::split_once_ascii(v, b' ')?;
        let scheme = if scheme.eq_ignore_ascii_case("bearer") {
            Scheme::Bearer
        } else if scheme.eq_ignore_ascii_case("dpop") {
            Scheme::Dpop
        } else {
            return None;
        };
        return Some((scheme, rest.trim()));
    }
    head.at(head.known.api_key).and_then(|v| std::str::from_utf8(v).ok()).map(|v| (Scheme::ApiKey, v.trim()))
}

/// A well-formed token anywhere in a part of the URL (the query string, or the path): in a name
/// or a value, alone or inside a longer text (`Bearer kg_…`, JSON), with its characters
/// percent-encoded or not and `+` read as a space, as application/x-www-form-urlencoded parsers
/// read a query (issue 12 #4). A part without escapes is searched as it is; one with escapes is
/// decoded first, on the stack when it is short.
fn token_in_url(part: &str, index: &TokenIndex) -> Option<String> {
    let raw = part.as_bytes();
    if !raw.contains(&b'%') {
        // `+` is not a character of tokens: reading it as a space changes no match.
        return index.find_well_formed(raw).map(str::to_owned);
    }
    let mut stack = [0u8; 1024];
    let mut heap = Vec::new();
    let buf: &mut [u8] = match stack.get_mut(..raw.len()) {
        Some(s) => s,
        None => {
            heap.resize(raw.len(), 0);
            &mut heap
        }
    };
    let n = decode_query(raw, buf);
    index.find_well_formed(buf.get(..n).unwrap_or_default()).map(str::to_owned)
}

/// Percent-decodes `raw` into `out` (at least as long) and returns the decoded length; a `%`
/// not followed by two hex digits stays as it is.
fn decode_query(raw: &[u8], out: &mut [u8]) -> usize {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let (mut i, mut n) = (0, 0);
    while let Some(&b) = raw.get(i) {
        let escaped = (b == b'%').then(|| Some(hex(*raw.get(i + 1)?)? << 4 | hex(*raw.get(i + 2)?)?)).flatten();
        let (byte, step) = escaped.map_or((b, 1), |v| (v, 3));
        if let Some(slot) = out.get_mut(n) {
            *slot = byte;
            n += 1;
        }
        i += step;
    }
    n
}

fn ceil_secs_us(us: i64) -> u64 {
    u64::try_from((us + 999_999) / 1_000_000).unwrap_or(0)
}

/// The request's URL as the client addressed it, for DPoP's `htu` (RFC 9449 §4.3): the scheme
/// and host it asked for ([`origin`]: behind a trusted TLS-terminating proxy, the proxy's), both
/// lowercase, the scheme's default port left out, the path as sent, no query.
fn request_url(head: &ReqHead<'_>, conn: &ConnInfo, peer_trusted: bool) -> String {
    let (scheme, host) = origin(head, conn, peer_trusted);
    let host = String::from_utf8_lossy(host.unwrap_or_default()).to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    let host = host.strip_suffix(default).unwrap_or(&host);
    format!("{scheme}://{host}{}", head.path)
}

impl Gateway {
    /// Admit: decides about a request from its head, forward it or answer it here. Fills in the
    /// context's path, route and caller as it learns them (a refusal is metered with what was
    /// known), and the headers every answer on the route carries (limits, CORS).
    pub(crate) fn admit<'a>(&self, ctx: &mut RequestCtx<'a, '_>) -> Admission<'a> {
        let head = ctx.head;
        // A token in the path first: the path goes into the access log, and every refusal below
        // records it; this one records a placeholder instead. The framing is not checked yet, so
        // the connection is closed after the answer: whatever follows the head (a body whose
        // length two parsers would read differently) is never read as another request.
        if let Some(tok) = token_in_url(head.path, &self.index) {
            self.report_in_url(ctx.table, tok, || format!("gateway: path of a {} request", head.method));
            let r = Refuse {
                close: true,
                ..Refuse::of(
                    Code::TokenInPath,
                    "tokens must not be sent in the URL, which ends up in logs; the token is now marked exposed: rotate it and send it as Authorization: Bearer",
                )
            };
            return Verdict::refused(&r, head).into();
        }
        match check_framing(head).and_then(|()| normalize_path(head.path).map_err(Refuse::path)) {
            Ok(p) => ctx.path = p,
            Err(r) => return Verdict::refused(&r, head).into(),
        }
        // CORS: preflights are answered here, without a token; other answers on a CORS route
        // carry the allow headers (errors too, so a browser can read them).
        if let Some(origin) = head.at(head.known.origin)
            && let Ok(Some(route)) = ctx.table.routes.resolve(|| head.host(), &|n| head.routing_header(n), &ctx.path)
            && let Some(cors) = &route.cors
        {
            let allowed = cors_allows(cors, origin);
            if allowed {
                add_cors_headers(cors, origin, &mut ctx.extra);
            }
            if head.method == Method::OPTIONS && head.known.access_control_request_method {
                ctx.route = Some(route);
                if allowed {
                    return Verdict::Answer { answer: preflight(cors), refusal: None }.into();
                }
                let r = Refuse::of(Code::CorsOriginNotAllowed, "this origin may not call this API");
                return Verdict::refused(&r, head).into();
            }
        }
        if let Some(local) = &self.local
            && local.serves(&ctx.path)
        {
            return Verdict::Local(local.clone()).into();
        }
        match self.check(ctx) {
            Ok((route, None)) => self.admitted(ctx, route).into(),
            Ok((route, Some(wait))) => Admission::Wait(route, wait),
            Err(r) => Verdict::refused(&r, head).into(),
        }
    }

    /// Reports a token found in the URL (`where_`: where, never the URL itself) to be marked
    /// exposed, counting a report the reporter could not take.
    fn report_in_url(&self, table: &Table, tok: String, where_: impl FnOnce() -> String) {
        if let Some(rep) = &self.reporter {
            let live = self.index.contains(&tok);
            if !rep.token_in_url(TokenSecret::new(tok), where_(), live) {
                table.metrics.exposure_report_dropped();
            }
        }
    }

    /// The verdict for a request every check let through.
    fn admitted<'a>(&self, ctx: &RequestCtx<'a, '_>, route: &'a Route) -> Verdict<'a> {
        if route.demo {
            Verdict::Answer { answer: demo_echo(ctx.head, ctx.caller.as_ref(), &self.index), refusal: None }
        } else {
            Verdict::Forward(route)
        }
    }

    /// Finishes the checks of a request that waits for the shared state: the answer about its
    /// DPoP proof, a limit's lease being refilled. Waits at most the configured bound in all,
    /// then decides alone: with this node's memory of DPoP proofs, with this node's share of
    /// each limit.
    pub(crate) async fn admit_after_wait<'a>(
        &self,
        ctx: &mut RequestCtx<'a, '_>,
        route: &'a Route,
        resume: Resume,
    ) -> Verdict<'a> {
        let bound = self.shared.as_ref().map_or(Duration::ZERO, |s| s.wait);
        let deadline = tokio::time::Instant::now() + bound;
        let mut wait = match resume {
            Resume::Limits(wait) => wait,
            Resume::Replay(first_use) => {
                match tokio::time::timeout_at(deadline, first_use).await {
                    Ok(Some(false)) => return Verdict::refused(&Refuse::dpop_replayed(), ctx.head),
                    // New everywhere, or the backend failed (it is then marked down).
                    Ok(_) => {}
                    Err(_) => {
                        if let Some(s) = &self.shared {
                            s.waited_too_long();
                        }
                    }
                }
                match self.check_after_dpop(ctx, route) {
                    Ok(None) => return self.admitted(ctx, route),
                    Ok(Some(wait)) => wait,
                    Err(r) => return Verdict::refused(&r, ctx.head),
                }
            }
        };
        if let Some(s) = &self.shared {
            s.stats.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        loop {
            let alone = tokio::time::timeout_at(deadline, wait.pending.wait()).await.is_err();
            if alone && let Some(s) = &self.shared {
                s.waited_too_long();
            }
            match self.check_limits(ctx, route, wait.step, alone) {
                Ok(None) => return self.admitted(ctx, route),
                Ok(Some(again)) => wait = again,
                Err(r) => return Verdict::refused(&r, ctx.head),
            }
        }
    }

    /// Runs every check of a routed request, setting the context's route and caller as they
    /// become known. (The refusal path is the slow path; its large error value is not worth a
    /// box.)
    #[allow(clippy::result_large_err)]
    fn check<'a>(&self, ctx: &mut RequestCtx<'a, '_>) -> Result<(&'a Route, Option<Resume>), Refuse> {
        let head = ctx.head;
        // Denied addresses first: before routing, and before any token work.
        let denied = |set: Option<&keygate_core::policy::AddressSet>| {
            set.is_some_and(|s| s.contains(client_ip(ctx.conn.remote, head, &self.settings.trusted_proxies)))
        };
        let refuse_denied = || Refuse::of(Code::AddressDenied, "requests from this address are refused");
        if denied(ctx.table.routes.deny.as_deref()) {
            return Err(refuse_denied());
        }
        let route = match ctx.table.routes.resolve(|| head.host(), &|n| head.routing_header(n), &ctx.path) {
            Ok(Some(route)) => route,
            Ok(None) => return Err(Refuse::of(Code::RouteNotFound, "no route serves this path")),
            Err(e) => return Err(Refuse::path(e)),
        };
        ctx.route = Some(route);
        if denied(route.deny.as_deref()) {
            return Err(refuse_denied());
        }
        // The route's API lifecycle (issue 17): a retired one is gone for everyone, before any
        // token work; a deprecated one says so on every answer, refusals included.
        if let Some(l) = &route.lifecycle {
            if l.retired {
                return Err(Refuse::of(Code::ApiRetired, l.retired_message()));
            }
            for (name, value) in &l.headers {
                ctx.extra.header(name.clone(), value.clone());
            }
        }
        if let Some(q) = head.query
            && let Some(tok) = token_in_url(q, &self.index)
        {
            self.report_in_url(ctx.table, tok, || format!("gateway: query string of {} {}", head.method, ctx.path));
            return Err(Refuse::of(
                Code::TokenInQuery,
                "tokens must not be sent in the URL, which ends up in logs; the token is now marked exposed: rotate it and send it as Authorization: Bearer",
            ));
        }
        if route.public {
            if upgrade_requested(head) {
                check_upgrade(head, route)?;
            }
            return Ok((route, None));
        }
        let Some((scheme, presented)) = credential(head) else {
            return Err(Refuse {
                www_authenticate: Some(Cow::Borrowed("Bearer realm=\"keygate\"")),
                ..Refuse::of(Code::MissingToken, "send a token as Authorization: Bearer <token>")
            });
        };
        let now = ctx.now;
        let (who, subject) = if looks_like_jwt(presented) {
            let Some(verifier) = &self.jwt else {
                return Err(Refuse::jwt(JwtRefusal::UnknownIssuer));
            };
            let jwt = verifier.verify(presented, now, &self.index).map_err(Refuse::jwt)?;
            let subject = jwt.exchanged_from(&self.index, now).map_err(Refuse::jwt)?;
            (Identity::Jwt(jwt), subject)
        } else {
            let key = match self.index.verify(presented, now) {
                Ok(key) => key,
                Err(r) => {
                    // A stopped token's refusals count for it in anomaly detection.
                    if self.watch.is_some() && matches!(r, Refusal::Suspended | Refusal::Expired) {
                        ctx.stopped = self.index.resident(presented);
                    }
                    return Err(Refuse::invalid_token(r));
                }
            };
            (Identity::Key(key), None)
        };
        let ip = client_ip(ctx.conn.remote, head, &self.settings.trusted_proxies);
        let caller = ctx.caller.insert(Caller { who, ip, subject });
        // Tenants apart: a credential works only on its own workspace's routes and on shared
        // ones. Before DPoP and the rest, so another workspace learns nothing of the route.
        if !route.admits_workspace(caller.workspace_id()) {
            return Err(Refuse::of(
                Code::RouteNotInWorkspace,
                "this route is not open to this token's workspace; use a token of the route's workspace",
            ));
        }
        // An API that needs a subscription admits only its subscribers' tokens (issue 17).
        if let Some(subs) = route.lifecycle.as_ref().and_then(|l| l.subscribers.as_deref())
            && subs.required
            && subs.of(caller.app_id()).is_none()
        {
            return Err(Refuse::of(Code::SubscriptionRequired, subscription_message(route)));
        }
        let shared_replay = self.check_dpop(head, &ctx.conn, (scheme, presented), caller, now)?;
        // RFC 9449 §9: the nonce for the next proof, with the answer.
        if scheme == Scheme::Dpop
            && let Some(k) = &self.dpop_nonces
            && let Ok(v) = HeaderValue::from_str(&k.current(now.as_millis() / 1000))
        {
            ctx.extra.header(HeaderName::from_static("dpop-nonce"), v);
        }
        if let Some(first_use) = shared_replay {
            return Ok((route, Some(Resume::Replay(first_use))));
        }
        Ok((route, self.check_after_dpop(ctx, route)?.map(Resume::Limits)))
    }

    /// The checks after the credential and its DPoP proof: the IP allowlist, the scope, an
    /// upgrade, the body's size, then the limits.
    #[allow(clippy::result_large_err)]
    fn check_after_dpop(&self, ctx: &mut RequestCtx<'_, '_>, route: &Route) -> Result<Option<LimitWait>, Refuse> {
        let head = ctx.head;
        let Some(caller) = ctx.caller.as_ref() else { return Ok(None) };
        let ip = caller.ip;
        if !caller.allows_ip(ip) {
            return Err(Refuse::of(Code::IpNotAllowed, format!("the token may not be used from {ip}")));
        }
        if let Some(scope) = route.required_scope(&head.method)
            && !caller.has_scope(scope)
        {
            let challenge = format!(
                "Bearer realm=\"keygate\", error=\"insufficient_scope\", error_description=\"this request needs the scope {scope}\", scope=\"{scope}\""
            );
            return Err(Refuse {
                www_authenticate: Some(challenge.into()),
                ..Refuse::of(Code::InsufficientScope, format!("this request needs the scope {scope}"))
            });
        }
        // After the credential and the scope (so a caller without them learns nothing of the
        // route's list), before the limits (a refused upgrade costs the caller nothing).
        if upgrade_requested(head) {
            check_upgrade(head, route)?;
        }
        // Before the limits: a body refused for its size costs the caller nothing.
        if let Some(len) = head.at(head.known.content_length).and_then(parse_length)
            && len > route.max_body_bytes
        {
            return Err(Refuse::of(
                Code::BodyTooLarge,
                format!("this route takes bodies up to {} bytes", route.max_body_bytes),
            ));
        }
        self.check_limits(ctx, route, 0, false)
    }

    /// RFC 9449 §7: a token bound to a DPoP key must come as `Authorization: DPoP` with a proof
    /// of that key for this request (method, URL, the token's hash), used once; a proof sent
    /// with an unbound token must be valid too. With shared limits, a proof new to this node is
    /// then asked about on every node: the check to wait for is returned.
    #[allow(clippy::result_large_err)]
    fn check_dpop(
        &self,
        head: &ReqHead<'_>,
        conn: &ConnInfo,
        (scheme, token): (Scheme, &str),
        caller: &Caller,
        now: Timestamp,
    ) -> Result<Option<crate::shared::ReplayCheck>, Refuse> {
        let bound = caller.dpop_jkt();
        if scheme != Scheme::Dpop {
            return match bound {
                Some(_) => Err(Refuse::dpop(
                    "invalid_token",
                    "this token is bound to a DPoP key: send it as Authorization: DPoP with a DPoP proof",
                )),
                None => Ok(None),
            };
        }
        let mut proofs = head.all("dpop");
        let (Some(proof), None) = (proofs.next(), proofs.next()) else {
            return Err(Refuse::dpop("invalid_dpop_proof", "send exactly one DPoP header with the proof"));
        };
        let proof =
            std::str::from_utf8(proof).map_err(|_| Refuse::dpop("invalid_dpop_proof", "the DPoP proof is not text"))?;
        let peer_trusted = is_trusted(&self.settings.trusted_proxies, &conn.remote.ip());
        let htu = request_url(head, conn, peer_trusted);
        let now_s = now.as_millis() / 1000;
        let accepted = self.dpop_nonces.as_ref().map(|k| k.accepted(now_s));
        let accepted: Vec<&str> = accepted.iter().flatten().map(String::as_str).collect();
        let check = ProofCheck {
            method: head.method.as_str(),
            uri: &htu,
            now: now_s,
            max_age: DPOP_MAX_AGE_S,
            leeway: DPOP_LEEWAY_S,
            access_token: Some(token),
            expected_jkt: bound,
            nonces: &accepted,
        };
        let v = dpop::verify_proof(proof, &check).map_err(|e| {
            let mut r = Refuse::dpop(e.code, e.message.as_ref());
            if e.code == dpop::USE_DPOP_NONCE {
                r.dpop_nonce = accepted.first().map(|n| (*n).to_owned());
            }
            r
        })?;
        // Remembered in the caller's own partition (issue 12 #6): a flood of proofs from one
        // token can neither fill the cache for others nor make it forget their proofs.
        if !self.dpop_replay.first_use(caller.limit_key(), &v.jkt, &v.jti, v.replay_until, now_s) {
            return Err(Refuse::dpop_replayed());
        }
        Ok(self.shared.as_ref().and_then(|shared| {
            let key = keygate_core::limits::replay_key(shared.prefix(), caller.limit_key(), &v.jkt, &v.jti);
            shared.first_use(
                key,
                keygate_core::limits::replay_ttl_ms(v.replay_until, now_s),
                now.as_millis().saturating_mul(1000),
            )
        }))
    }

    /// The limits of a request, from check `from` on (see [`Step`]): the token's rate limit,
    /// its app's shared one, the route's (it can only tighten), the token's quota, its app's
    /// shared one, and the token's uses; adds the limit headers (of a token's and its app's
    /// limit, the tighter one). With shared limits, a check whose lease is being refilled stops
    /// there and says where to start again; `alone` decides with this node's share instead.
    #[allow(clippy::result_large_err)]
    fn check_limits(
        &self,
        ctx: &mut RequestCtx<'_, '_>,
        route: &Route,
        from: u8,
        alone: bool,
    ) -> Result<Option<LimitWait>, Refuse> {
        let RequestCtx { table, now, caller, extra, .. } = ctx;
        let (now, extra) = (*now, extra);
        let Some(caller) = caller.as_ref() else { return Ok(None) };
        let id: &[u8; PUBLIC_ID_LEN] = caller.limit_key();
        let token = caller.key();
        let app = if table.apps.is_empty() { None } else { caller.app_id().and_then(|a| table.apps.get(a)) };
        let sub = route.lifecycle.as_ref().and_then(|l| l.subscribers.as_deref()).and_then(|s| s.of(caller.app_id()));
        let now_us = now.as_millis().saturating_mul(1000);
        let now_ms = now.as_millis();

        // Rate limits: the token's, its app's and its subscription's (one header: the tightest),
        // then the route's.
        let mut shown: Option<(&'static str, RateLimit, GcraDecision)> = None;
        let rates = [
            (Step::TokenRate, "token", id, 0u32, token.and_then(|t| t.rate_limit)),
            (Step::AppRate, "app", app.map_or(id, |a| &a.key), 0, app.and_then(|a| a.rate_limit)),
            (Step::SubRate, "subscription", sub.map_or(id, |s| &s.key), 0, sub.and_then(|s| s.rate_limit)),
            (Step::RouteRate, "route", id, route.limiter_key, route.rate_limit),
        ];
        for (step, name, key, scope, limit) in rates {
            let Some(limit) = limit else { continue };
            if (step as u8) < from {
                continue;
            }
            // The token's own bucket lives in its index entry when nothing is shared.
            let cell = (step == Step::TokenRate).then(|| token.map(IndexedToken::rate_state)).flatten();
            let d = match self.rate_step(key, scope, &limit, cell, alone, now_us) {
                Ok(d) => d,
                Err(pending) => {
                    if let Some((name, limit, d)) = shown.take() {
                        add_rate_header(extra, name, &limit, &d);
                    }
                    return Ok(Some(LimitWait { step: step as u8, pending }));
                }
            };
            table.metrics.limiter(d.allowed);
            if step == Step::RouteRate {
                if let Some((name, limit, d)) = shown.take() {
                    add_rate_header(extra, name, &limit, &d);
                }
                add_rate_header(extra, name, &limit, &d);
            } else if shown.as_ref().is_none_or(|(_, _, s)| !d.allowed || d.remaining < s.remaining) {
                shown = Some((name, limit, d));
            }
            if !d.allowed {
                if let Some((name, limit, d)) = shown.take() {
                    add_rate_header(extra, name, &limit, &d);
                }
                return Err(Refuse {
                    retry_after: Some(ceil_secs_us(d.retry_after).max(1)),
                    ..Refuse::of(Code::RateLimited, "too many requests; retry after the time in Retry-After")
                });
            }
        }
        if let Some((name, limit, d)) = shown.take() {
            add_rate_header(extra, name, &limit, &d);
        }

        // Quotas: the token's, its app's and its subscription's (one header: the tightest), then
        // the token's uses.
        let mut shown: Option<(&'static str, Quota, QuotaDecision)> = None;
        let uses = token.and_then(IndexedToken::max_uses);
        let quotas = [
            (Step::TokenQuota, "quota", id, token.and_then(|t| t.quota)),
            (Step::AppQuota, "app_quota", app.map_or(id, |a| &a.key), app.and_then(|a| a.quota)),
            (Step::SubQuota, "subscription_quota", sub.map_or(id, |s| &s.key), sub.and_then(|s| s.quota)),
            (
                Step::Uses,
                "uses",
                uses.map_or(id, |(_, k)| k),
                uses.map(|(n, _)| Quota { requests: n, period: keygate_core::policy::QuotaPeriod::Total }),
            ),
        ];
        for (step, name, key, quota) in quotas {
            let Some(q) = quota else { continue };
            if (step as u8) < from {
                continue;
            }
            let d = match self.quota_step(key, &q, alone, now_ms) {
                Ok(d) => d,
                Err(pending) => {
                    if let Some((name, q, d)) = shown.take() {
                        add_quota_header(extra, name, &q, &d, now_ms);
                    }
                    return Ok(Some(LimitWait { step: step as u8, pending }));
                }
            };
            table.metrics.limiter(d.allowed);
            if step == Step::Uses {
                if let Some((name, q, d)) = shown.take() {
                    add_quota_header(extra, name, &q, &d, now_ms);
                }
                add_quota_header(extra, name, &q, &d, now_ms);
            } else if shown.as_ref().is_none_or(|(_, _, s)| !d.allowed || d.remaining < s.remaining) {
                shown = Some((name, q, d));
            }
            if !d.allowed {
                if let Some((name, q, d)) = shown.take() {
                    add_quota_header(extra, name, &q, &d, now_ms);
                }
                return Err(match step {
                    Step::Uses => Refuse::of(
                        Code::UsesExhausted,
                        format!("this token was good for {} requests and they are used; use a new token", q.requests),
                    ),
                    _ => {
                        let whose = match step {
                            Step::AppQuota => "app's shared",
                            Step::SubQuota => "subscription's shared",
                            _ => "token's",
                        };
                        Refuse {
                            retry_after: quota_reset_s(&d).filter(|s| *s > 0),
                            ..Refuse::of(
                                Code::QuotaExceeded,
                                format!(
                                    "the {whose} quota of {} requests per {} is used up",
                                    q.requests,
                                    q.period.as_str()
                                ),
                            )
                        }
                    }
                });
            }
        }
        if let Some((name, q, d)) = shown.take() {
            add_quota_header(extra, name, &q, &d, now_ms);
        }
        Ok(None)
    }

    /// Takes one request from the bucket of `limit` under `(key, scope)`: the shared one through
    /// this node's lease (`Err`: the lease is being refilled; wait for it), this node's share
    /// when `alone` or the backend is down, or this node's own bucket (`cell`, if the state
    /// lives elsewhere than the limiter's map) when nothing is shared.
    fn rate_step(
        &self,
        key: &[u8; PUBLIC_ID_LEN],
        scope: u32,
        limit: &RateLimit,
        cell: Option<&std::sync::atomic::AtomicI64>,
        alone: bool,
        now_us: i64,
    ) -> Result<GcraDecision, crate::shared::Pending> {
        let Some(shared) = &self.shared else {
            return Ok(match cell {
                Some(cell) => Limiter::check_cell(cell, limit, now_us),
                None => self.limiter.check_rate(key, scope, limit, now_us),
            });
        };
        let take = if alone { Take::Local } else { shared.take_rate(key, scope, limit, now_us) };
        Ok(match take {
            Take::Allowed { remaining, reset_after_us } => {
                GcraDecision { allowed: true, new_tat: 0, remaining, reset_after: reset_after_us, retry_after: 0 }
            }
            Take::Refused { retry_after_us, reset_after_us } => GcraDecision {
                allowed: false,
                new_tat: 0,
                remaining: 0,
                reset_after: reset_after_us,
                retry_after: retry_after_us,
            },
            Take::Pending(pending) => return Err(pending),
            Take::Local => {
                let d = self.limiter.check_rate(key, scope, &shared.scaled(limit), now_us);
                if alone && d.allowed {
                    shared.charge_rate(key, scope);
                }
                d
            }
        })
    }

    /// Counts one request against `quota` under `key`, as [`Self::rate_step`] does for rates
    /// (this node's count is kept in every case: it is what the store and a restart know).
    fn quota_step(
        &self,
        key: &[u8; PUBLIC_ID_LEN],
        q: &Quota,
        alone: bool,
        now_ms: i64,
    ) -> Result<QuotaDecision, crate::shared::Pending> {
        let Some(shared) = &self.shared else {
            return Ok(self.limiter.check_quota(key, q, now_ms));
        };
        let (start, _) = q.period.window(now_ms);
        let known = self.limiter.quota_count(key, start);
        let take = if alone { Take::Local } else { shared.take_quota(key, q, now_ms, known) };
        let ms = |us: i64| if us == i64::MAX { i64::MAX } else { us / 1000 };
        Ok(match take {
            Take::Allowed { remaining, reset_after_us } => {
                // Counted here too, for the store (usage and the count a restart loads).
                self.limiter.count_quota(key, q, now_ms);
                QuotaDecision { allowed: true, remaining, reset_after_ms: ms(reset_after_us) }
            }
            Take::Refused { reset_after_us, .. } => {
                QuotaDecision { allowed: false, remaining: 0, reset_after_ms: ms(reset_after_us) }
            }
            Take::Pending(pending) => return Err(pending),
            Take::Local => {
                let d = self.limiter.check_quota(key, &shared.scaled_quota(q), now_ms);
                if alone && d.allowed {
                    shared.charge_quota(key, start);
                }
                d
            }
        })
    }

    /// Completes when `caller`, who opened an upgraded tunnel on `route` with `method`, would no
    /// longer be let through: its token revoked, suspended or expired, its scopes or allowlist
    /// changed so that the request would be refused now, or its JWT revoked or expired. It wakes
    /// at each change to the token index and when the token's expiry comes (at least every
    /// [`TUNNEL_RECHECK`]), never for the bytes that pass, so a tunnel costs nothing per byte.
    pub(crate) async fn until_refused(&self, route: &Route, method: &Method, caller: &Caller) {
        let mut changes = self.index.changes();
        let mut entry = match &caller.who {
            Identity::Key(t) => Some(t.clone()),
            Identity::Jwt(_) => None,
        };
        loop {
            let now = self.clock.now();
            let expires_ms = match (&caller.who, entry.as_mut()) {
                (Identity::Key(_), Some(held)) => match self.index.recheck(held, now) {
                    Ok(current) => {
                        let ok = current.allows_ip(caller.ip)
                            && route.required_scope(method).is_none_or(|s| current.has_scope(s));
                        if !ok {
                            return;
                        }
                        let exp = current.expires_at().map_or(i64::MAX, Timestamp::as_millis);
                        *held = current;
                        exp
                    }
                    Err(_) => return,
                },
                (Identity::Jwt(j), _) => {
                    if now.as_millis() >= j.exp_ms || j.jti.as_deref().is_some_and(|id| self.index.is_jti_revoked(id)) {
                        return;
                    }
                    j.exp_ms
                }
                (Identity::Key(_), None) => return,
            };
            let left = u64::try_from(expires_ms.saturating_sub(now.as_millis())).unwrap_or(0);
            let wait = std::time::Duration::from_millis(left).min(TUNNEL_RECHECK);
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        // The index is gone (never while the gateway runs): time alone wakes.
                        tokio::time::sleep(wait).await;
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn cors_allows(cors: &crate::config::CorsConfig, origin: &[u8]) -> bool {
    cors.allow_origins.iter().any(|o| o == "*" || o.as_bytes() == origin)
}

fn add_cors_headers(cors: &crate::config::CorsConfig, origin: &[u8], extra: &mut AnswerExtra) {
    let wildcard = cors.allow_origins.iter().any(|o| o == "*") && !cors.allow_credentials;
    let allow = if wildcard { Ok(HeaderValue::from_static("*")) } else { HeaderValue::from_bytes(origin) };
    if let Ok(v) = allow {
        extra.header(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    extra.header(header::VARY, HeaderValue::from_static("Origin"));
    if cors.allow_credentials {
        extra.header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if !cors.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
    {
        extra.header(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

/// Answers an allowed CORS preflight (no token needed: browsers send none). The allow-origin
/// headers come with the route's other answer headers.
fn preflight(cors: &crate::config::CorsConfig) -> Answer {
    let mut a = Answer::new(StatusCode::NO_CONTENT);
    if let Ok(v) = HeaderValue::from_str(&cors.allow_methods.join(", ")) {
        a.headers.push((header::ACCESS_CONTROL_ALLOW_METHODS, v));
    }
    if let Ok(v) = HeaderValue::from_str(&cors.allow_headers.join(", ")) {
        a.headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, v));
    }
    a.headers.push((header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cors.max_age_seconds)));
    a
}

fn demo_echo(head: &ReqHead<'_>, caller: Option<&Caller>, index: &TokenIndex) -> Answer {
    let headers: serde_json::Map<String, serde_json::Value> = head
        .fields
        .iter()
        // Never echo a credential: not Authorization, nor any header whose value is a token.
        .filter(|f| {
            !f.name.eq_ignore_ascii_case("authorization")
                && !std::str::from_utf8(f.value).is_ok_and(|v| index.is_well_formed(v.trim()))
        })
        .map(|f| {
            (f.name.to_ascii_lowercase(), serde_json::Value::String(String::from_utf8_lossy(f.value).into_owned()))
        })
        .collect();
    let identity = caller.map(|c| {
        let scopes: Vec<&str> = c.scopes().iter().map(|s| s.as_str()).collect();
        match &c.who {
            Identity::Key(t) => serde_json::json!({
                "token_id": t.token_id().to_string(),
                "app_id": &*t.app_id,
                "workspace_id": &*t.workspace_id,
                "scopes": scopes,
                "client_ip": c.ip.to_string(),
            }),
            Identity::Jwt(j) => serde_json::json!({
                "token_id": j.jti.as_deref(),
                "app_id": j.app_id.as_deref(),
                "client_id": j.client_id.as_deref(),
                "sub": &*j.sub,
                "issuer": &*j.issuer,
                "scopes": scopes,
                "dpop_bound": j.jkt.is_some(),
                "client_ip": c.ip.to_string(),
            }),
        }
    });
    let body = serde_json::json!({
        "method": head.method.as_str(),
        "path": head.path,
        "query": head.query,
        "headers": headers,
        "identity": identity,
        "note": "answered by keygate's built-in demo route; configure [[routes]] to forward to your API",
    });
    Answer::json(StatusCode::OK, Bytes::from(body.to_string()))
}
