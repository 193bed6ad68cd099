//! The request path: every step in memory, in this order — CORS preflight (answered without a
//! token), framing checks, path normalization, route match, refusal of tokens in the query string,
//! credential, token index, IP allowlist, scope, rate limit and quota, then forwarding with
//! metering. This module is the
//! one place where data-plane refusals become HTTP answers (RFC 6750 for token errors).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use ipnet::IpNet;
use keygate_core::policy::GcraDecision;
use keygate_core::secret::TokenSecret;
use keygate_core::token_format::PUBLIC_ID_LEN;
use keygate_core::{Clock, Timestamp};

use crate::body::{BodyState, GatewayBody, OnComplete, UpstreamBody};
use crate::index::{IndexedToken, Refusal, TokenIndex};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::proxy::{self, UpstreamError, UpstreamResponseBody, is_hop_by_hop};
use crate::routes::{Route, RouteTable, normalize_path};
use crate::usage::{Sample, UsageMeter};

/// Identity headers keygate sets for the upstream; client-supplied copies are removed.
pub const TOKEN_ID_HEADER: &str = "x-keygate-token-id";
pub const APP_ID_HEADER: &str = "x-keygate-app-id";
pub const SCOPES_HEADER: &str = "x-keygate-scopes";

/// Told about tokens found where they must not be (the query string), off the request path.
pub trait ExposureReporter: Send + Sync {
    fn token_in_query(&self, token: TokenSecret, where_: String);
}

/// A route table and the metrics that go with it; swapped whole on reload.
pub struct Table {
    pub routes: RouteTable,
    pub metrics: Metrics,
}

impl Table {
    pub fn new(routes: RouteTable) -> Self {
        let metrics = Metrics::new(routes.routes.iter().map(|r| r.id.to_string()));
        Self { routes, metrics }
    }
}

/// Settings of the request path that do not change with reloads of routes.
pub struct Settings {
    pub api_key_header: Option<HeaderName>,
    pub trusted_proxies: Vec<IpNet>,
    pub access_log: bool,
}

/// Everything the request path reads.
pub struct Gateway {
    pub table: ArcSwap<Table>,
    pub index: TokenIndex,
    pub limiter: Limiter,
    pub meter: UsageMeter,
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    pub reporter: Option<Arc<dyn ExposureReporter>>,
}

/// The connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
}

/// A refusal: the status, a stable code, a message, and how to say it.
struct Refuse {
    status: StatusCode,
    code: &'static str,
    message: String,
    www_authenticate: Option<String>,
    close: bool,
    retry_after: Option<u64>,
}

impl Refuse {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), www_authenticate: None, close: false, retry_after: None }
    }
    fn bad_framing(message: &str) -> Self {
        Self { close: true, ..Self::new(StatusCode::BAD_REQUEST, "bad_request", message) }
    }
    /// RFC 6750 §3: 401 with `error="invalid_token"`.
    fn invalid_token(code: &'static str, message: &str) -> Self {
        let challenge = format!("Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"{message}\"");
        Self { www_authenticate: Some(challenge), ..Self::new(StatusCode::UNAUTHORIZED, code, message) }
    }
}

fn error_response(r: &Refuse, extra: &HeaderMap) -> Response<GatewayBody> {
    let body = serde_json::json!({"error": {"code": r.code, "message": r.message}}).to_string();
    let mut resp = Response::new(GatewayBody::full(body));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(w) = &r.www_authenticate
        && let Ok(v) = HeaderValue::from_str(w)
    {
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    if let Some(s) = r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if r.close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    for (k, v) in extra {
        h.insert(k.clone(), v.clone());
    }
    resp
}

/// RFC 9112 §6: refuse framing two parsers could read differently.
fn check_framing(req: &Request<Incoming>) -> Result<(), Refuse> {
    let h = req.headers();
    if h.get_all(header::HOST).iter().count() > 1 {
        return Err(Refuse::bad_framing("more than one Host header"));
    }
    let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !te.is_empty() {
        if h.contains_key(header::CONTENT_LENGTH) {
            return Err(Refuse::bad_framing("both Transfer-Encoding and Content-Length"));
        }
        if req.version() == Version::HTTP_10 {
            return Err(Refuse::bad_framing("Transfer-Encoding in HTTP/1.0"));
        }
        let ok = te.len() == 1 && te.first().is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if !ok {
            return Err(Refuse::bad_framing("Transfer-Encoding other than a single \"chunked\""));
        }
    }
    let cls: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
    if cls.len() > 1 || cls.iter().any(|v| v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit)) {
        return Err(Refuse::bad_framing("Content-Length must be one plain number"));
    }
    Ok(())
}

fn host_of(req: &Request<Incoming>) -> Option<String> {
    let raw = req.uri().authority().map(|a| a.host().to_owned()).or_else(|| {
        let h = req.headers().get(header::HOST)?.to_str().ok()?;
        Some(match h.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
            _ => h.to_owned(),
        })
    })?;
    Some(raw.to_ascii_lowercase())
}

/// The credential: `Authorization: Bearer …` or the configured API-key header.
fn credential<'a>(req: &'a Request<Incoming>, api_key_header: Option<&HeaderName>) -> Option<&'a str> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, rest) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim());
    }
    api_key_header.and_then(|h| req.headers().get(h)).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A well-formed token anywhere in the query string, in any parameter.
fn token_in_query(query: &str, index: &TokenIndex) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(_, v)| v))
        .find(|v| index.is_well_formed(v))
        .map(str::to_owned)
}

fn client_ip(remote: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut ip = remote.ip();
    if !is_trusted(&ip) {
        return ip;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for hop in hops.iter().rev() {
        ip = *hop;
        if !is_trusted(hop) {
            break;
        }
    }
    ip
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in `Connection`, in one pass over
/// the names (usually one or none are present, so this beats removing each by hash).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let doomed: Vec<HeaderName> = h
        .keys()
        .filter(|k| (is_hop_by_hop(k) || named.contains(k)) && !(keep_upgrade && *k == header::UPGRADE))
        .cloned()
        .collect();
    for n in doomed {
        h.remove(n);
    }
}

/// The limit answer headers (draft-ietf-httpapi-ratelimit-headers): the policy and what is left.
fn rate_limit_headers(h: &mut HeaderMap, name: &str, quota: u64, window_s: u64, remaining: u64, reset_s: u64) {
    // The strings are moved into the header values, not copied again.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(format!("\"{name}\";q={quota};w={window_s}"))) {
        h.append("ratelimit-policy", v);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(format!("\"{name}\";r={remaining};t={reset_s}"))) {
        h.append("ratelimit", v);
    }
}

fn ceil_secs_us(us: i64) -> u64 {
    u64::try_from((us + 999_999) / 1_000_000).unwrap_or(0)
}

/// What was decided about an authenticated request, carried to metering.
struct Caller {
    token: Arc<IndexedToken>,
    ip: IpAddr,
}

impl Gateway {
    /// Answers one request.
    pub async fn handle(self: &Arc<Self>, conn: ConnInfo, req: Request<Incoming>) -> Response<GatewayBody> {
        let start = Instant::now();
        let table = self.table.load_full();
        let now = self.clock.now();
        let mut limit_headers = HeaderMap::new();
        // CORS: preflights are answered here, without a token; other answers on a CORS route
        // carry the allow headers (errors too, so a browser can read them).
        if let Some(origin) = req.headers().get(header::ORIGIN).cloned()
            && let Ok(path) = normalize_path(req.uri().path())
            && let Some(route) = table.routes.find(host_of(&req).as_deref(), &path)
            && let Some(cors) = &route.cors
        {
            let allowed = cors_allows(cors, &origin);
            if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
                let resp = preflight(cors, &origin, allowed);
                if !allowed {
                    table.metrics.refusal("cors_origin_not_allowed");
                }
                let o = Outcome { status: resp.status().as_u16(), bytes_in: 0, bytes_out: 0, start, now };
                self.record(&table, Some(route), None, &o, self.line(req.method(), req.uri().path()).as_ref());
                return resp;
            }
            if allowed {
                add_cors_headers(cors, &origin, &mut limit_headers);
            }
        }
        let route_and_caller = self.admit(&table, conn, &req, now, &mut limit_headers);
        let (route, caller) = match route_and_caller {
            Ok(rc) => rc,
            Err((route, caller, refusal)) => {
                table.metrics.refusal(refusal.code);
                let resp = error_response(&refusal, &limit_headers);
                let o = Outcome { status: refusal.status.as_u16(), bytes_in: 0, bytes_out: 0, start, now };
                self.record(
                    &table,
                    route.as_deref(),
                    caller.as_ref(),
                    &o,
                    self.line(req.method(), req.uri().path()).as_ref(),
                );
                return resp;
            }
        };
        if route.demo {
            let resp = demo_echo(&req, caller.as_ref(), &limit_headers, &self.index);
            let o = Outcome { status: 200, bytes_in: 0, bytes_out: 0, start, now };
            self.record(&table, Some(&route), caller.as_ref(), &o, self.line(req.method(), req.uri().path()).as_ref());
            return resp;
        }
        self.forward(table, route, caller, conn, req, limit_headers, start, now).await
    }

    /// Runs every check; on refusal returns the route and caller known so far, for metering.
    /// (The refusal path is the slow path; its large error value is not worth a box.)
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn admit(
        &self,
        table: &Table,
        conn: ConnInfo,
        req: &Request<Incoming>,
        now: Timestamp,
        limit_headers: &mut HeaderMap,
    ) -> Result<(Arc<Route>, Option<Caller>), (Option<Arc<Route>>, Option<Caller>, Refuse)> {
        check_framing(req).map_err(|r| (None, None, r))?;
        let path = normalize_path(req.uri().path())
            .map_err(|e| (None, None, Refuse::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())))?;
        let host = host_of(req);
        let Some(route) = table.routes.find(host.as_deref(), &path).cloned() else {
            return Err((
                None,
                None,
                Refuse::new(StatusCode::NOT_FOUND, "route_not_found", "no route serves this path"),
            ));
        };
        let fail = |route: &Arc<Route>, caller: Option<Caller>, r: Refuse| (Some(route.clone()), caller, r);
        if let Some(q) = req.uri().query()
            && let Some(tok) = token_in_query(q, &self.index)
        {
            if let Some(rep) = &self.reporter {
                rep.token_in_query(TokenSecret::new(tok), format!("gateway: query string of {} {path}", req.method()));
            }
            return Err(fail(
                &route,
                None,
                Refuse::new(
                    StatusCode::BAD_REQUEST,
                    "token_in_query",
                    "tokens must not be sent in the URL, which ends up in logs; the token is now marked exposed: rotate it and send it as Authorization: Bearer",
                ),
            ));
        }
        if route.public {
            return Ok((route, None));
        }
        let Some(presented) = credential(req, self.settings.api_key_header.as_ref()) else {
            let r = Refuse {
                www_authenticate: Some("Bearer realm=\"keygate\"".into()),
                ..Refuse::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_token",
                    "send a token as Authorization: Bearer <token>",
                )
            };
            return Err(fail(&route, None, r));
        };
        let token = self.index.verify(presented, now).map_err(|e| {
            let (code, msg) = match e {
                Refusal::Malformed(_) => {
                    ("malformed_token", "the token is malformed (wrong prefix, length or checksum)")
                }
                Refusal::Unknown => ("unknown_token", "the token is not valid: unknown or revoked"),
                Refusal::Suspended => ("token_suspended", "the token is suspended"),
                Refusal::Expired => ("token_expired", "the token has expired"),
            };
            fail(&route, None, Refuse::invalid_token(code, msg))
        })?;
        let ip = client_ip(conn.remote, req.headers(), &self.settings.trusted_proxies);
        let caller = Caller { token, ip };
        if !caller.token.allows_ip(ip) {
            let r =
                Refuse::new(StatusCode::FORBIDDEN, "ip_not_allowed", format!("the token may not be used from {ip}"));
            return Err(fail(&route, Some(caller), r));
        }
        if let Some(scope) = route.required_scope(req.method())
            && !caller.token.has_scope(scope)
        {
            let challenge = format!(
                "Bearer realm=\"keygate\", error=\"insufficient_scope\", error_description=\"this request needs the scope {scope}\", scope=\"{scope}\""
            );
            let r = Refuse {
                www_authenticate: Some(challenge),
                ..Refuse::new(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    format!("this request needs the scope {scope}"),
                )
            };
            return Err(fail(&route, Some(caller), r));
        }
        if let Some(r) = self.check_limits(table, &route, &caller.token, now, limit_headers) {
            return Err(fail(&route, Some(caller), r));
        }
        if let Some(len) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > route.max_body_bytes
        {
            let r = Refuse::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("this route takes bodies up to {} bytes", route.max_body_bytes),
            );
            return Err(fail(&route, Some(caller), r));
        }
        Ok((route, Some(caller)))
    }

    /// Token rate limit, route rate limit (it can only tighten) and quota; adds the limit headers.
    fn check_limits(
        &self,
        table: &Table,
        route: &Route,
        token: &IndexedToken,
        now: Timestamp,
        headers: &mut HeaderMap,
    ) -> Option<Refuse> {
        let id: &[u8; PUBLIC_ID_LEN] = token.public_id();
        let now_us = now.as_millis().saturating_mul(1000);
        let mut refused: Option<GcraDecision> = None;
        for (name, scope, limit) in [("token", 0u32, token.rate_limit), ("route", route.limiter_key, route.rate_limit)]
        {
            let Some(limit) = limit else { continue };
            let d = if scope == 0 {
                Limiter::check_cell(token.rate_state(), &limit, now_us)
            } else {
                self.limiter.check_rate(id, scope, &limit, now_us)
            };
            rate_limit_headers(
                headers,
                name,
                limit.capacity(),
                u64::from(limit.per_seconds),
                d.remaining,
                ceil_secs_us(d.reset_after),
            );
            table.metrics.limiter(d.allowed);
            if !d.allowed {
                refused = Some(d);
                break;
            }
        }
        if let Some(d) = refused {
            return Some(Refuse {
                retry_after: Some(ceil_secs_us(d.retry_after).max(1)),
                ..Refuse::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests; retry after the time in Retry-After",
                )
            });
        }
        if let Some(q) = token.quota {
            let d = self.limiter.check_quota(id, &q, now.as_millis());
            let (start, end) = q.period.window(now.as_millis());
            let window_s = if end == i64::MAX { 0 } else { u64::try_from((end - start) / 1000).unwrap_or(0) };
            let reset_s = if d.reset_after_ms == i64::MAX {
                0
            } else {
                u64::try_from((d.reset_after_ms + 999) / 1000).unwrap_or(0)
            };
            rate_limit_headers(headers, "quota", q.requests, window_s, d.remaining, reset_s);
            table.metrics.limiter(d.allowed);
            if !d.allowed {
                return Some(Refuse {
                    retry_after: (reset_s > 0).then_some(reset_s),
                    ..Refuse::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "quota_exceeded",
                        format!("the token's quota of {} requests per {} is used up", q.requests, q.period.as_str()),
                    )
                });
            }
        }
        None
    }

    /// The request line for the access log, taken only when the log is on.
    fn line(&self, method: &Method, path: &str) -> Option<RequestLine> {
        self.settings.access_log.then(|| RequestLine { method: method.clone(), path: path.to_owned() })
    }

    /// Counts a finished request: route metrics, the caller's usage, and the access log line.
    fn record(
        &self,
        table: &Table,
        route: Option<&Route>,
        caller: Option<&Caller>,
        o: &Outcome,
        line: Option<&RequestLine>,
    ) {
        let latency_us = u64::try_from(o.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        table.metrics.request(route.map(|r| r.index), o.status, latency_us);
        if let (Some(route), Some(c)) = (route, caller) {
            self.meter.record(&Sample {
                public_id: c.token.public_id(),
                workspace_id: &c.token.workspace_id,
                route_index: route.index,
                route_id: &route.id,
                status: o.status,
                bytes_in: o.bytes_in,
                bytes_out: o.bytes_out,
                latency_us,
                at: o.now,
                client_ip: c.ip,
            });
        }
        if let Some(line) = line {
            let token_id = caller.map(|c| c.token.token_id().to_string());
            tracing::info!(
                target: "keygate::access",
                method = %line.method,
                path = %line.path,
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

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        table: Arc<Table>,
        route: Arc<Route>,
        caller: Option<Caller>,
        conn: ConnInfo,
        mut req: Request<Incoming>,
        limit_headers: HeaderMap,
        start: Instant,
        now: Timestamp,
    ) -> Response<GatewayBody> {
        let wants_upgrade = req.headers().contains_key(header::UPGRADE);
        let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let path = normalize_path(req.uri().path()).unwrap_or_else(|_| "/".into());
        let query = req.uri().query().map(str::to_owned);
        let original_host = req.headers().get(header::HOST).cloned();
        let mut headers = std::mem::take(req.headers_mut());
        strip_hop_by_hop(&mut headers, wants_upgrade);
        if wants_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        for n in [TOKEN_ID_HEADER, APP_ID_HEADER, SCOPES_HEADER] {
            headers.remove(n);
        }
        if !route.public {
            headers.remove(header::AUTHORIZATION);
            if let Some(h) = &self.settings.api_key_header {
                headers.remove(h);
            }
        }
        let remote_ip = conn.remote.ip();
        let trusted = self.settings.trusted_proxies.iter().any(|n| n.contains(&remote_ip));
        let xff = match (trusted, headers.get("x-forwarded-for").and_then(|v| v.to_str().ok())) {
            (true, Some(prev)) => format!("{prev}, {remote_ip}"),
            _ => remote_ip.to_string(),
        };
        headers.remove("x-forwarded-for");
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
        if let Some(h) =
            original_host.or_else(|| req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()))
        {
            headers.insert("x-forwarded-host", h);
        }
        if let Some(c) = &caller {
            let mut id = [0u8; 4 + PUBLIC_ID_LEN];
            id[..4].copy_from_slice(b"tok_");
            id[4..].copy_from_slice(c.token.public_id());
            if let Ok(v) = HeaderValue::from_bytes(&id) {
                headers.insert(TOKEN_ID_HEADER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&c.token.app_id) {
                headers.insert(APP_ID_HEADER, v);
            }
            let mut scopes = String::with_capacity(c.token.scopes.iter().map(|s| s.as_str().len() + 1).sum());
            for (i, sc) in c.token.scopes.iter().enumerate() {
                if i > 0 {
                    scopes.push(' ');
                }
                scopes.push_str(sc.as_str());
            }
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(scopes)) {
                headers.insert(SCOPES_HEADER, v);
            }
        }

        let state = Arc::new(BodyState::default());
        let incoming = req.into_body();
        let has_body = !http_body::Body::is_end_stream(&incoming);
        let idempotent = method.is_idempotent();
        let mut body = Some(if has_body {
            UpstreamBody::Stream { inner: incoming, limit: route.max_body_bytes, state: state.clone() }
        } else {
            UpstreamBody::Empty
        });
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err = UpstreamError::Connect("no upstream".into());
        // Only a request without a body can be sent again, and only a safe one after it left.
        let attempts = if has_body || !idempotent { 1 } else { route.retries as usize + 1 };
        for _ in 0..attempts {
            let Some(ui) = route.pick(&tried) else { break };
            tried.push(ui);
            let Some(upstream) = route.upstreams.get(ui) else { break };
            let mut target = route.upstream_path(upstream, &path);
            if let Some(q) = &query {
                target.push('?');
                target.push_str(q);
            }
            let out = proxy::Outgoing { method: &method, target: &target, headers: &headers };
            let attempt_body = body.take().unwrap_or(UpstreamBody::Empty);
            match proxy::send(upstream, &out, attempt_body, route.connect_timeout, route.request_timeout).await {
                Ok(resp) => {
                    return self.respond(
                        table,
                        route,
                        caller,
                        resp,
                        client_upgrade,
                        limit_headers,
                        state,
                        start,
                        now,
                        self.line(&method, &path),
                    );
                }
                // The client's own body failed (too large, malformed): nothing to say about the
                // upstream.
                Err(proxy::SendError::Body(_)) => break,
                Err(proxy::SendError::Upstream(e)) => {
                    let client_fault = state.broken.load(Ordering::Relaxed) || state.too_large.load(Ordering::Relaxed);
                    if !client_fault && !matches!(e, UpstreamError::Connect(_)) {
                        proxy::note_failure(upstream);
                    }
                    if !client_fault {
                        table.metrics.upstream_error(route.index, matches!(e, UpstreamError::Timeout));
                        tracing::warn!(route = %route.id, upstream = %upstream.authority, error = ?e, "upstream request failed");
                    }
                    let retry = matches!(e, UpstreamError::Connect(_));
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        let refusal = if state.broken.load(Ordering::Relaxed) {
            Refuse::bad_framing("the request body is malformed (such as a bad chunk size)")
        } else if state.too_large.load(Ordering::Relaxed) {
            Refuse::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("this route takes bodies up to {} bytes", route.max_body_bytes),
            )
        } else {
            match last_err {
                UpstreamError::Timeout => {
                    Refuse::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "the upstream did not answer in time")
                }
                _ => Refuse::new(StatusCode::BAD_GATEWAY, "upstream_unavailable", "the upstream could not be reached"),
            }
        };
        let resp = error_response(&refusal, &limit_headers);
        let o = Outcome {
            status: refusal.status.as_u16(),
            bytes_in: state.seen.load(Ordering::Relaxed),
            bytes_out: 0,
            start,
            now,
        };
        self.record(&table, Some(&route), caller.as_ref(), &o, self.line(&method, &path).as_ref());
        resp
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        self: &Arc<Self>,
        table: Arc<Table>,
        route: Arc<Route>,
        caller: Option<Caller>,
        resp: Response<UpstreamResponseBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        limit_headers: HeaderMap,
        state: Arc<BodyState>,
        start: Instant,
        now: Timestamp,
        line: Option<RequestLine>,
    ) -> Response<GatewayBody> {
        let status = resp.status();
        let (mut parts, body) = resp.into_parts();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client), Some(upstream)) = (client_upgrade, body.into_upgraded()) else {
                table.metrics.upstream_error(route.index, false);
                let r = Refuse::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the upstream switched protocols without being asked",
                );
                let o = Outcome { status: 502, bytes_in: state.seen.load(Ordering::Relaxed), bytes_out: 0, start, now };
                self.record(&table, Some(&route), caller.as_ref(), &o, line.as_ref());
                return error_response(&r, &limit_headers);
            };
            tokio::spawn(async move {
                let Ok(c) = client.await else { return };
                let mut c = hyper_util::rt::TokioIo::new(c);
                let (mut u, early) = upstream.into_parts();
                // Bytes the upstream sent right after its 101 belong to the new protocol.
                if !early.is_empty() && tokio::io::AsyncWriteExt::write_all(&mut c, &early).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
            let mut out = Response::from_parts(parts, GatewayBody::empty());
            out.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            let o = Outcome { status: 101, bytes_in: state.seen.load(Ordering::Relaxed), bytes_out: 0, start, now };
            self.record(&table, Some(&route), caller.as_ref(), &o, line.as_ref());
            return out;
        }
        for (k, v) in &limit_headers {
            parts.headers.append(k.clone(), v.clone());
        }
        let done =
            Completion { gw: self.clone(), table, route, caller, status: status.as_u16(), state, start, now, line };
        Response::from_parts(parts, GatewayBody::Upstream { inner: body, sent: 0, done: Some(Box::new(done)) })
    }
}

/// Finishes metering when the response body is done, and returns the connection to the pool.
struct Completion {
    gw: Arc<Gateway>,
    table: Arc<Table>,
    route: Arc<Route>,
    caller: Option<Caller>,
    status: u16,
    state: Arc<BodyState>,
    start: Instant,
    now: Timestamp,
    line: Option<RequestLine>,
}

/// Method and path, for the access log.
struct RequestLine {
    method: Method,
    path: String,
}

/// How a request ended, for metering.
struct Outcome {
    status: u16,
    bytes_in: u64,
    bytes_out: u64,
    start: Instant,
    now: Timestamp,
}

impl OnComplete for Completion {
    fn complete(self: Box<Self>, bytes_out: u64) {
        let o = Outcome {
            status: self.status,
            bytes_in: self.state.seen.load(Ordering::Relaxed),
            bytes_out,
            start: self.start,
            now: self.now,
        };
        self.gw.record(&self.table, Some(&self.route), self.caller.as_ref(), &o, self.line.as_ref());
    }
}

fn cors_allows(cors: &crate::config::CorsConfig, origin: &HeaderValue) -> bool {
    cors.allow_origins.iter().any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
}

fn add_cors_headers(cors: &crate::config::CorsConfig, origin: &HeaderValue, h: &mut HeaderMap) {
    let wildcard = cors.allow_origins.iter().any(|o| o == "*") && !cors.allow_credentials;
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        if wildcard { HeaderValue::from_static("*") } else { origin.clone() },
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if cors.allow_credentials {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    if !cors.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
    {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

/// Answers a CORS preflight (no token needed: browsers send none).
fn preflight(cors: &crate::config::CorsConfig, origin: &HeaderValue, allowed: bool) -> Response<GatewayBody> {
    if !allowed {
        let r = Refuse::new(StatusCode::FORBIDDEN, "cors_origin_not_allowed", "this origin may not call this API");
        return error_response(&r, &HeaderMap::new());
    }
    let mut h = HeaderMap::new();
    add_cors_headers(cors, origin, &mut h);
    if let Ok(v) = HeaderValue::from_str(&cors.allow_methods.join(", ")) {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cors.allow_headers.join(", ")) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(cors.max_age_seconds));
    let mut resp = Response::new(GatewayBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    *resp.headers_mut() = h;
    resp
}

/// `/demo/echo`: the request as keygate saw it and the identity it would attach.
fn demo_echo(
    req: &Request<Incoming>,
    caller: Option<&Caller>,
    limit_headers: &HeaderMap,
    index: &TokenIndex,
) -> Response<GatewayBody> {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        // Never echo a credential: not Authorization, nor any header whose value is a token.
        .filter(|(k, v)| *k != header::AUTHORIZATION && !v.to_str().is_ok_and(|v| index.is_well_formed(v.trim())))
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
        .collect();
    let identity = caller.map(|c| {
        serde_json::json!({
            "token_id": c.token.token_id().to_string(),
            "app_id": &*c.token.app_id,
            "workspace_id": &*c.token.workspace_id,
            "scopes": c.token.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "client_ip": c.ip.to_string(),
        })
    });
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "identity": identity,
        "note": "answered by keygate's built-in demo route; configure [[routes]] to forward to your API",
    });
    let mut resp = Response::new(GatewayBody::full(Bytes::from(body.to_string())));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (k, v) in limit_headers {
        resp.headers_mut().append(k.clone(), v.clone());
    }
    resp
}
