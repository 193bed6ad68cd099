//! What keygate says itself, and the one place where anything that stops a request becomes an
//! answer: a refusal of keygate's own ([`Refuse`]: framing, path, credential, scope, limits…)
//! and an upstream failure ([`Refuse::forward_failed`]: time-out, no connection, a malformed
//! answer, the client's own body) get their status, stable code, message and headers here, for
//! HTTP/1.1 and HTTP/2 alike. Also keygate's own answers (CORS preflights, the demo route), the
//! body of every HTTP/2 answer ([`GatewayBody`]), and the
//! headers it adds to every answer on a route (`RateLimit`, `RateLimit-Policy`, CORS), rendered
//! either as HTTP/1.1 bytes for keygate's own listener or into a header map for hyper (HTTP/2).
//! Also the one writer of HTTP/1.1 header fields ([`line`], [`begin`]), which writes a field only
//! when its value is a valid field value, for every head keygate writes.

use std::borrow::Cow;
use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use keygate_core::dpop;

use crate::body::{BodyState, BoxError};
use crate::head::ReqHead;
pub use crate::head::is_field_value;
use crate::index::Refusal;
use crate::jwt::JwtRefusal;
use crate::proxy::{UpstreamError, UpstreamResponseBody};
use crate::routes::PathError;

/// keygate's own refusal codes on the data plane and the status each is answered with: the one
/// table of them. (A refused token, JWT or DPoP proof is a 401 whose code its check names, a path
/// that cannot be read unambiguously a 400 with the code of its [`PathError`]: see the
/// constructors of [`Refuse`] below.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Code {
    /// Framing, request line or target that cannot be read as one request.
    BadRequest,
    HeaderTooLarge,
    RequestTimeout,
    BodyTooLarge,
    RouteNotFound,
    TokenInQuery,
    /// A well-formed token in the request's path: refused before anything else, and the path is
    /// never recorded (the record phase writes a placeholder in its place).
    TokenInPath,
    MissingToken,
    /// A credential of another workspace than the route's (and the route is not shared).
    RouteNotInWorkspace,
    /// The client's address is on `[gateway] deny` or the route's `deny`.
    AddressDenied,
    /// The route's API (or version) is retired (issue 17): 410, before any token work.
    ApiRetired,
    /// The route's API needs a subscription and the token's app holds none (issue 17).
    SubscriptionRequired,
    IpNotAllowed,
    InsufficientScope,
    CorsOriginNotAllowed,
    UpgradeNotAllowed,
    RateLimited,
    QuotaExceeded,
    /// The token's `max_uses` are used up: it can never be used again.
    UsesExhausted,
    TooManyConnections,
    UpstreamTimeout,
    UpstreamUnavailable,
    /// The TLS handshake with an `https://` upstream failed (its certificate not trusted or not
    /// for its name, keygate's client certificate refused).
    UpstreamTlsFailed,
    /// Every upstream of the route is named by a DNS host name that has not resolved to any
    /// address yet (see [`crate::resolve`]).
    UpstreamUnresolved,
    /// Request validation (issue 17, [`crate::validate`]): a parameter or the JSON body does not
    /// match the operation's schema (400, an RFC 9457 problem document naming the fields).
    RequestInvalid,
    /// Request validation: no path of the API's OpenAPI document matches (404).
    OperationNotFound,
    /// Request validation: the path matches, not the method (405, with `Allow`).
    MethodNotAllowed,
    /// Request validation: the body's media type is not one the operation takes (415).
    UnsupportedMediaType,
    /// Request validation: the route validates but has no document to check with (503).
    ValidationUnavailable,
}

impl Code {
    /// Every code, for the test that they are distinct (keep in step with the enum).
    #[cfg(test)]
    const ALL: [Code; 29] = [
        Code::BadRequest,
        Code::HeaderTooLarge,
        Code::RequestTimeout,
        Code::BodyTooLarge,
        Code::RouteNotFound,
        Code::TokenInQuery,
        Code::TokenInPath,
        Code::MissingToken,
        Code::RouteNotInWorkspace,
        Code::AddressDenied,
        Code::ApiRetired,
        Code::SubscriptionRequired,
        Code::IpNotAllowed,
        Code::InsufficientScope,
        Code::CorsOriginNotAllowed,
        Code::UpgradeNotAllowed,
        Code::RateLimited,
        Code::QuotaExceeded,
        Code::UsesExhausted,
        Code::TooManyConnections,
        Code::UpstreamTimeout,
        Code::UpstreamUnavailable,
        Code::UpstreamTlsFailed,
        Code::UpstreamUnresolved,
        Code::RequestInvalid,
        Code::OperationNotFound,
        Code::MethodNotAllowed,
        Code::UnsupportedMediaType,
        Code::ValidationUnavailable,
    ];

    /// The stable code clients see (`{"error": {"code": …}}`) and the refusal metrics count.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::HeaderTooLarge => "header_too_large",
            Code::RequestTimeout => "request_timeout",
            Code::BodyTooLarge => "body_too_large",
            Code::RouteNotFound => "route_not_found",
            Code::TokenInQuery => "token_in_query",
            Code::TokenInPath => "token_in_path",
            Code::MissingToken => "missing_token",
            Code::RouteNotInWorkspace => "route_not_in_workspace",
            Code::AddressDenied => "address_denied",
            Code::ApiRetired => "api_retired",
            Code::SubscriptionRequired => "subscription_required",
            Code::IpNotAllowed => "ip_not_allowed",
            Code::InsufficientScope => "insufficient_scope",
            Code::CorsOriginNotAllowed => "cors_origin_not_allowed",
            Code::UpgradeNotAllowed => "upgrade_not_allowed",
            Code::RateLimited => "rate_limited",
            Code::QuotaExceeded => "quota_exceeded",
            Code::UsesExhausted => "uses_exhausted",
            Code::TooManyConnections => "too_many_connections",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamTlsFailed => "upstream_tls_failed",
            Code::UpstreamUnresolved => "upstream_unresolved",
            Code::RequestInvalid => "request_invalid",
            Code::OperationNotFound => "operation_not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::ValidationUnavailable => "validation_unavailable",
        }
    }

    pub(crate) const fn status(self) -> StatusCode {
        match self {
            Code::BadRequest
            | Code::TokenInQuery
            | Code::TokenInPath
            | Code::UpgradeNotAllowed
            | Code::RequestInvalid => StatusCode::BAD_REQUEST,
            Code::OperationNotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::ValidationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::MissingToken => StatusCode::UNAUTHORIZED,
            Code::IpNotAllowed
            | Code::InsufficientScope
            | Code::CorsOriginNotAllowed
            | Code::RouteNotInWorkspace
            | Code::AddressDenied
            | Code::SubscriptionRequired
            | Code::UsesExhausted => StatusCode::FORBIDDEN,
            Code::RouteNotFound => StatusCode::NOT_FOUND,
            Code::ApiRetired => StatusCode::GONE,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RateLimited | Code::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Code::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::UpstreamUnavailable | Code::UpstreamTlsFailed | Code::UpstreamUnresolved => StatusCode::BAD_GATEWAY,
            Code::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A refusal: the status, a stable code, a message, and how to say it. The common refusals are
/// made of static text, so refusing costs about as little as forwarding.
#[derive(Debug)]
pub(crate) struct Refuse {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: Cow<'static, str>,
    pub(crate) www_authenticate: Option<Cow<'static, str>>,
    pub(crate) close: bool,
    pub(crate) retry_after: Option<u64>,
    /// The nonce for the next DPoP proof (RFC 9449 §9), sent as `DPoP-Nonce`.
    pub(crate) dpop_nonce: Option<String>,
    /// Answered as an RFC 9457 problem document (request validation's refusals).
    pub(crate) problem: Option<Box<Problem>>,
}

/// What a refusal of request validation says besides its code and message: the fields that are
/// wrong, and the methods a path takes (`Allow`, with a 405).
#[derive(Debug, Default)]
pub(crate) struct Problem {
    pub(crate) errors: Vec<crate::validate::Violation>,
    pub(crate) allow: Option<String>,
}

/// An RFC 6750 §3 `invalid_token` challenge with a fixed description.
macro_rules! invalid_token_challenge {
    ($description:literal) => {
        concat!("Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"", $description, "\"")
    };
}

impl Refuse {
    /// A refusal with one of keygate's own codes, answered with the status of [`Code::status`].
    pub(crate) fn of(code: Code, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(code.status(), code.as_str(), message)
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            www_authenticate: None,
            close: false,
            retry_after: None,
            dpop_nonce: None,
            problem: None,
        }
    }

    /// A refusal of request validation: an RFC 9457 problem document (`application/
    /// problem+json`) with `type`, `title`, `status`, `detail` (the message), keygate's `code`
    /// and `error` object as every refusal has them, and the `errors` found.
    pub(crate) fn problem(code: Code, message: impl Into<Cow<'static, str>>, problem: Problem) -> Self {
        Self { problem: Some(Box::new(problem)), ..Self::of(code, message) }
    }
    pub(crate) fn bad_framing(message: impl Into<Cow<'static, str>>) -> Self {
        Self { close: true, ..Self::of(Code::BadRequest, message) }
    }
    /// RFC 6750 §3: 401 with `error="invalid_token"`.
    pub(crate) fn invalid_token(refusal: Refusal) -> Self {
        let (code, message, challenge) = match refusal {
            Refusal::Malformed(_) => (
                "malformed_token",
                "the token is malformed (wrong prefix, length or checksum)",
                invalid_token_challenge!("the token is malformed (wrong prefix, length or checksum)"),
            ),
            Refusal::Unknown => (
                "unknown_token",
                "the token is not valid: unknown or revoked",
                invalid_token_challenge!("the token is not valid: unknown or revoked"),
            ),
            Refusal::Suspended => {
                ("token_suspended", "the token is suspended", invalid_token_challenge!("the token is suspended"))
            }
            Refusal::Expired => {
                ("token_expired", "the token has expired", invalid_token_challenge!("the token has expired"))
            }
        };
        Self { www_authenticate: Some(challenge.into()), ..Self::new(StatusCode::UNAUTHORIZED, code, message) }
    }

    /// A JWT refused (RFC 6750 §3 `invalid_token`).
    pub(crate) fn jwt(r: JwtRefusal) -> Self {
        let challenge =
            format!("Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"{}\"", r.message());
        Self { www_authenticate: Some(challenge.into()), ..Self::new(StatusCode::UNAUTHORIZED, r.code(), r.message()) }
    }

    /// A DPoP failure (RFC 9449 §7.1): 401 with a `DPoP` challenge naming the error.
    /// A DPoP proof seen before (on this node, or on another one through the shared memory).
    pub(crate) fn dpop_replayed() -> Self {
        Self::dpop("invalid_dpop_proof", "this DPoP proof was already used; make a new proof for each request")
    }

    pub(crate) fn dpop(code: &'static str, message: &str) -> Self {
        let error = match code {
            "invalid_token" | dpop::USE_DPOP_NONCE => code,
            _ => "invalid_dpop_proof",
        };
        let challenge = format!(
            "DPoP algs=\"EdDSA Ed25519 ES256\", error=\"{error}\", error_description=\"{}\"",
            message.replace('"', "'")
        );
        Self {
            www_authenticate: Some(challenge.into()),
            ..Self::new(StatusCode::UNAUTHORIZED, code, message.to_owned())
        }
    }

    /// A path that cannot be normalized or routed unambiguously: 400, the connection kept.
    pub(crate) fn path(e: PathError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    }

    /// Why forwarding failed, as the client is told: its own body (malformed, or larger than the
    /// route's `max_body` bytes: the connection closes, the rest is unread), else the upstream
    /// (a time-out is 504, anything else — no connection, a malformed or missing answer — 502).
    /// 5xx details are logged where they happen, never returned.
    pub(crate) fn forward_failed(err: &UpstreamError, body: &BodyState, max_body: u64) -> Self {
        if body.broken.load(Ordering::Relaxed) {
            Self::bad_framing("the request body is malformed (such as a bad chunk size)")
        } else if body.too_large.load(Ordering::Relaxed) {
            Self {
                close: true,
                ..Self::of(Code::BodyTooLarge, format!("this route takes bodies up to {max_body} bytes"))
            }
        } else {
            match err {
                UpstreamError::Timeout => Self::of(Code::UpstreamTimeout, "the upstream did not answer in time"),
                UpstreamError::Tls(_) => Self::of(
                    Code::UpstreamTlsFailed,
                    "the TLS handshake with the upstream failed (the gateway's log says why)",
                ),
                _ => Self::of(Code::UpstreamUnavailable, "the upstream could not be reached"),
            }
        }
    }

    /// The route's upstreams are DNS names none of which resolves to an address yet.
    pub(crate) fn upstream_unresolved() -> Self {
        Self::of(
            Code::UpstreamUnresolved,
            "the upstream's host name does not resolve to any address (the gateway's log says why)",
        )
    }

    /// An upstream that answered `101` without being asked, or switched to a protocol not asked
    /// for: not followed (RFC 9110 §7.8), and the connection closes.
    pub(crate) fn unasked_switch() -> Self {
        Self {
            close: true,
            ..Self::of(
                Code::UpstreamUnavailable,
                "the upstream switched protocols without being asked, or to one not asked for",
            )
        }
    }

    /// Whether the connection must close after this refusal.
    pub(crate) fn closes(&self) -> bool {
        self.close
    }

    /// The answer for this request: a gRPC status for a gRPC call (its client reads no JSON),
    /// the JSON answer otherwise.
    pub(crate) fn answer_to(&self, head: &ReqHead<'_>) -> Answer {
        if head.is_grpc() { self.grpc_answer() } else { self.answer() }
    }

    /// The gRPC status a refusal is (gRPC's status codes, doc/statuscodes.md): what a gRPC client
    /// reports to its caller.
    pub(crate) fn grpc_status(&self) -> u8 {
        match self.status.as_u16() {
            400 | 415 => 3,       // INVALID_ARGUMENT
            401 => 16,            // UNAUTHENTICATED
            403 => 7,             // PERMISSION_DENIED
            404 | 405 => 12,      // UNIMPLEMENTED: no such service (or method) here
            408 | 504 => 4,       // DEADLINE_EXCEEDED
            413 | 429 | 431 => 8, // RESOURCE_EXHAUSTED
            502 | 503 => 14,      // UNAVAILABLE
            _ => 13,              // INTERNAL
        }
    }

    /// A gRPC "Trailers-Only" answer (gRPC over HTTP/2, PROTOCOL-HTTP2.md): HTTP 200 whose only
    /// HEADERS frame ends the stream and carries `grpc-status` and `grpc-message` (the stable code
    /// and the message, percent-encoded as the protocol says), and the challenge and limit
    /// headers a JSON refusal has.
    pub(crate) fn grpc_answer(&self) -> Answer {
        let mut a = self.answer();
        a.status = StatusCode::OK;
        a.body = Bytes::new();
        a.headers.retain(|(name, _)| name != header::CONTENT_TYPE);
        a.headers.push((header::CONTENT_TYPE, HeaderValue::from_static("application/grpc")));
        a.headers.push((HeaderName::from_static("grpc-status"), HeaderValue::from(u16::from(self.grpc_status()))));
        let message = grpc_percent_encode(&format!("{}: {}", self.code, self.message));
        if let Ok(v) = HeaderValue::from_str(&message) {
            a.headers.push((HeaderName::from_static("grpc-message"), v));
        }
        a
    }

    /// The JSON answer: `{"error": {"code", "message"}}`.
    pub(crate) fn answer(&self) -> Answer {
        if let Some(p) = &self.problem {
            return self.problem_answer(p);
        }
        let mut body = Vec::with_capacity(48 + self.code.len() + self.message.len());
        body.extend_from_slice(b"{\"error\":{\"code\":\"");
        body.extend_from_slice(self.code.as_bytes());
        body.extend_from_slice(b"\",\"message\":");
        let _ = serde_json::to_writer(&mut body, &*self.message);
        body.extend_from_slice(b"}}");
        let mut a = Answer::json(self.status, body).header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let challenge = match &self.www_authenticate {
            Some(Cow::Borrowed(w)) => Some(HeaderValue::from_static(w)),
            Some(Cow::Owned(w)) => HeaderValue::from_str(w).ok(),
            None => None,
        };
        if let Some(v) = challenge {
            a.headers.push((header::WWW_AUTHENTICATE, v));
        }
        if let Some(s) = self.retry_after {
            a.headers.push((header::RETRY_AFTER, HeaderValue::from(s)));
        }
        if let Some(v) = self.dpop_nonce.as_deref().and_then(|n| HeaderValue::from_str(n).ok()) {
            a.headers.push((HeaderName::from_static("dpop-nonce"), v));
        }
        a.close = self.close;
        a
    }
}

impl Refuse {
    fn problem_answer(&self, p: &Problem) -> Answer {
        let errors: Vec<serde_json::Value> = p
            .errors
            .iter()
            .map(|v| {
                let mut e = serde_json::Map::new();
                e.insert("location".into(), v.location.as_str().into());
                if !v.name.is_empty() {
                    e.insert("name".into(), v.name.clone().into());
                }
                if v.location == crate::validate::Location::Body || !v.pointer.is_empty() {
                    e.insert("pointer".into(), v.pointer.clone().into());
                }
                e.insert("message".into(), v.message.clone().into());
                serde_json::Value::Object(e)
            })
            .collect();
        let mut doc = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": &*self.message,
            "code": self.code,
            "error": {"code": self.code, "message": &*self.message},
        });
        if !errors.is_empty() {
            doc["errors"] = serde_json::Value::Array(errors);
        }
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        let mut a = Answer::new(self.status);
        a.headers.push((header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json")));
        a.headers.push((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
        if let Some(v) = p.allow.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
            a.headers.push((header::ALLOW, v));
        }
        a.body = body.into();
        a.close = self.close;
        a
    }
}

/// `grpc-message`'s encoding: every byte outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One `RateLimit-Policy` / `RateLimit` pair (draft-ietf-httpapi-ratelimit-headers).
#[derive(Debug, Clone, Copy)]
struct LimitHeader {
    name: &'static str,
    quota: u64,
    window_s: u64,
    remaining: u64,
    reset_s: u64,
}

/// Headers added to every answer on a route, whoever answers: the limits that applied and, on
/// a CORS route, the allow headers (or a DPoP nonce). Holds no heap memory unless one of those
/// few is there.
#[derive(Debug, Default)]
pub struct AnswerExtra {
    limits: [Option<LimitHeader>; 4],
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl AnswerExtra {
    /// Adds a limit: its policy (`q` requests per `w` seconds) and what is left (`r` requests,
    /// reset in `t` seconds).
    pub fn limit(&mut self, name: &'static str, quota: u64, window_s: u64, remaining: u64, reset_s: u64) {
        if let Some(slot) = self.limits.iter_mut().find(|l| l.is_none()) {
            *slot = Some(LimitHeader { name, quota, window_s, remaining, reset_s });
        }
    }

    /// Adds a header field (CORS, `DPoP-Nonce`).
    pub fn header(&mut self, name: HeaderName, value: HeaderValue) {
        self.headers.push((name, value));
    }

    /// As HTTP/1.1 header lines. The limits go on one `RateLimit-Policy` and one `RateLimit`
    /// line, their members separated by commas: both fields are structured-field lists, so this
    /// is what a line per limit means (RFC 9110, section 5.3), in fewer bytes for every client
    /// to read, and a client that reads only a field's first line still sees every limit.
    pub fn write_h1(&self, out: &mut Vec<u8>) {
        if self.limits.iter().any(Option::is_some) {
            for (name, params, values) in LIMIT_FIELDS {
                let f = begin(out, name.as_bytes());
                self.members(f.out, params, values);
                f.end();
            }
        }
        for (k, v) in &self.headers {
            line(out, k.as_str().as_bytes(), v.as_bytes());
        }
    }

    /// Into a header map (answers through hyper): the same fields as [`AnswerExtra::write_h1`].
    pub fn to_map(&self, h: &mut HeaderMap) {
        if self.limits.iter().any(Option::is_some) {
            for (name, params, values) in LIMIT_FIELDS {
                let mut v = Vec::new();
                self.members(&mut v, params, values);
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append(HeaderName::from_static(name), v);
                }
            }
        }
        for (k, v) in &self.headers {
            h.append(k.clone(), v.clone());
        }
    }

    /// Appends one field's value: a member per limit, `"name";p1=v1;p2=v2`, comma-separated.
    fn members(&self, out: &mut Vec<u8>, params: [&[u8]; 2], values: fn(&LimitHeader) -> [u64; 2]) {
        let mut n = itoa::Buffer::new();
        for (i, l) in self.limits.iter().flatten().enumerate() {
            out.extend_from_slice(if i == 0 { b"\"" } else { b", \"" });
            out.extend_from_slice(l.name.as_bytes());
            out.push(b'"');
            for (param, value) in params.iter().zip(values(l)) {
                out.extend_from_slice(param);
                out.extend_from_slice(n.format(value).as_bytes());
            }
        }
    }
}

/// The two fields of the limits: each one's name, its two parameters, and their values.
type LimitField = (&'static str, [&'static [u8]; 2], fn(&LimitHeader) -> [u64; 2]);
const LIMIT_FIELDS: [LimitField; 2] = [
    ("ratelimit-policy", [b";q=", b";w="], |l| [l.quota, l.window_s]),
    ("ratelimit", [b";r=", b";t="], |l| [l.remaining, l.reset_s]),
];

/// Appends `name: value\r\n` when `value` is a valid field value ([`is_field_value`]), and
/// nothing otherwise; returns whether the field was written. Every head keygate writes (the
/// upstream's request head, its own answers, the upstream's answers relayed) writes its fields
/// through this function or [`begin`], so no value can break a head, whoever made it.
pub fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) -> bool {
    if !is_field_value(value) {
        return false;
    }
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    true
}

/// A field whose value is written in parts ([`FieldLine::push`]) and checked whole when it
/// ends ([`FieldLine::end`]), as [`line`] checks one written at once.
pub struct FieldLine<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
    value: usize,
}

/// Starts the field `name` in `out`.
pub fn begin<'o>(out: &'o mut Vec<u8>, name: &[u8]) -> FieldLine<'o> {
    let start = out.len();
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    let value = out.len();
    FieldLine { out, start, value }
}

impl FieldLine<'_> {
    /// Appends a part of the value.
    pub fn push(&mut self, part: &[u8]) -> &mut Self {
        self.out.extend_from_slice(part);
        self
    }

    /// Ends the field: kept if its value is a valid field value, removed otherwise. Returns
    /// whether it was kept.
    pub fn end(self) -> bool {
        if self.out.get(self.value..).is_some_and(is_field_value) {
            self.out.extend_from_slice(b"\r\n");
            true
        } else {
            self.out.truncate(self.start);
            false
        }
    }
}

/// An answer keygate gives itself (not the upstream's).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// The connection must close after it (the request's framing could not be trusted).
    pub close: bool,
}

impl Answer {
    pub fn new(status: StatusCode) -> Self {
        Self { status, headers: Vec::new(), body: Bytes::new(), close: false }
    }

    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        let mut a = Self::new(status);
        a.headers.push((header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
        a.body = body.into();
        a
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// For hyper (HTTP/2).
    pub fn into_response(self, extra: &AnswerExtra) -> Response<GatewayBody> {
        // No body: the HEADERS frame ends the stream (a gRPC Trailers-Only answer needs that).
        let body = if self.body.is_empty() { GatewayBody::empty() } else { GatewayBody::full(self.body) };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        for (k, v) in self.headers {
            h.append(k, v);
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        extra.to_map(h);
        resp
    }

    /// As HTTP/1.1 bytes, whole. `head` leaves the body out (the answer to a HEAD request);
    /// `connection` is the `Connection` field to send, if any (see [`connection_field`]).
    pub fn write_h1(&self, extra: &AnswerExtra, head: bool, connection: Option<&str>, out: &mut Vec<u8>) {
        status_line(out, self.status);
        date_line(out);
        for (k, v) in &self.headers {
            line(out, k.as_str().as_bytes(), v.as_bytes());
        }
        extra.write_h1(out);
        if let Some(c) = connection {
            line(out, b"connection", c.as_bytes());
        }
        if self.status != StatusCode::NO_CONTENT && self.status != StatusCode::NOT_MODIFIED {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(self.body.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head {
            out.extend_from_slice(&self.body);
        }
    }
}

/// The `Connection` field an HTTP/1.1 answer needs: `close` when the connection ends after it,
/// `keep-alive` when an HTTP/1.0 client's connection stays open, none otherwise.
pub fn connection_field(keep: bool, client_11: bool) -> Option<&'static str> {
    match (keep, client_11) {
        (false, _) => Some("close"),
        (true, false) => Some("keep-alive"),
        (true, true) => None,
    }
}

/// `HTTP/1.1 <code> <reason>\r\n`.
pub fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value of the current second (RFC 9110 §5.6.7), formatted once per second.
    static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
}

/// `date: <IMF-fixdate>\r\n` for answers keygate gives itself (RFC 9110 §6.6.1).
pub fn date_line(out: &mut Vec<u8>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let value = DATE.with(|c| {
        let (at, v) = c.get();
        if at == now {
            return v;
        }
        let v = keygate_core::clock::imf_fixdate(now);
        c.set((now, v));
        v
    });
    line(out, b"date", &value);
}

/// Runs once when a response body has been sent in full or dropped.
pub trait OnComplete: Send + 'static {
    fn complete(self: Box<Self>, bytes_out: u64);
}

/// What the gateway answers with.
#[allow(
    clippy::large_enum_variant,
    reason = "Upstream is the answer of nearly every request: boxing it would allocate once per forwarded answer"
)]
pub enum GatewayBody {
    Full(Option<Bytes>),
    Upstream { inner: UpstreamResponseBody, sent: u64, done: Option<Box<dyn OnComplete>> },
}

impl GatewayBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
    pub fn empty() -> Self {
        Self::Full(None)
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream { inner, sent, done } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        *sent += d.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(d) = done.take() {
                        d.complete(*sent);
                    }
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    if let Some(d) = done.take() {
                        d.complete(*sent);
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        if let Self::Upstream { sent, done, .. } = self
            && let Some(d) = done.take()
        {
            d.complete(*sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes_are_distinct_and_errors() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "{c:?}");
            assert!(c.status().is_client_error() || c.status().is_server_error(), "{c:?}");
            let r = Refuse::of(c, "m");
            assert_eq!((r.status, r.code), (c.status(), c.as_str()));
        }
        assert_eq!(Code::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(Code::TooManyConnections.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn grpc_messages_are_percent_encoded_and_statuses_mapped() {
        assert_eq!(grpc_percent_encode("a b: 100% ok"), "a b: 100%25 ok");
        assert_eq!(grpc_percent_encode("caf\u{e9}\n"), "caf%C3%A9%0A");
        let status = |code| Refuse::of(code, "m").grpc_status();
        assert_eq!(
            [status(Code::MissingToken), status(Code::InsufficientScope), status(Code::RateLimited)],
            [16, 7, 8]
        );
        assert_eq!([status(Code::RouteNotFound), status(Code::UpstreamUnavailable)], [12, 14]);
        let a = Refuse::of(Code::RateLimited, "slow down").grpc_answer();
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.is_empty());
        let has = |n: &str, v: &str| a.headers.iter().any(|(k, x)| k == n && x == v);
        assert!(
            has("grpc-status", "8")
                && has("grpc-message", "rate_limited: slow down")
                && has("content-type", "application/grpc")
        );
    }

    #[test]
    fn only_field_values_are_written() {
        for ok in [&b""[..], b"a b\tc", b"J\xc3\xbcrgen", b"\x80\xff", b"~!\"#"] {
            let mut out = b"x".to_vec();
            assert!(line(&mut out, b"n", ok), "{ok:?}");
            assert_eq!(out, [&b"xn: "[..], ok, b"\r\n"].concat());
        }
        for bad in [&b"a\r\nx-forged: 1"[..], b"a\nb", b"a\rb", b"\0", b"a\x01", b"\x7f", b"\x1b[31m"] {
            let mut out = b"x".to_vec();
            assert!(!line(&mut out, b"n", bad), "{bad:?}");
            assert_eq!(out, b"x", "nothing written for {bad:?}");
            let mut f = begin(&mut out, b"n");
            f.push(b"good, ").push(bad);
            assert!(!f.end());
            assert_eq!(out, b"x", "a field written in parts is removed whole: {bad:?}");
        }
        let mut out = Vec::new();
        let mut f = begin(&mut out, b"n");
        f.push(b"a").push(b", b");
        assert!(f.end());
        assert_eq!(out, b"n: a, b\r\n");
    }

    #[test]
    fn every_limit_goes_on_one_line_of_each_field() {
        let mut extra = AnswerExtra::default();
        extra.limit("token", 10, 1, 9, 1);
        extra.limit("quota", 1000, 2_592_000, 412, 86_400);
        let mut out = Vec::new();
        extra.write_h1(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ratelimit-policy: \"token\";q=10;w=1, \"quota\";q=1000;w=2592000\r\n\
             ratelimit: \"token\";r=9;t=1, \"quota\";r=412;t=86400\r\n"
        );
        let mut h = HeaderMap::new();
        extra.to_map(&mut h);
        assert_eq!(h.get_all("ratelimit-policy").iter().count(), 1);
        assert_eq!(h["ratelimit-policy"], "\"token\";q=10;w=1, \"quota\";q=1000;w=2592000");
        assert_eq!(h["ratelimit"], "\"token\";r=9;t=1, \"quota\";r=412;t=86400");
        // No limit, no field.
        let mut out = Vec::new();
        AnswerExtra::default().write_h1(&mut out);
        assert!(out.is_empty());
        let mut h = HeaderMap::new();
        AnswerExtra::default().to_map(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn own_answers_render_whole() {
        let mut extra = AnswerExtra::default();
        extra.limit("token", 10, 1, 9, 1);
        let a = Answer::json(StatusCode::TOO_MANY_REQUESTS, "{}").header(header::RETRY_AFTER, HeaderValue::from(3));
        let mut out = Vec::new();
        a.write_h1(&extra, false, None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\ndate: "), "{text}");
        assert!(text.contains("\r\nretry-after: 3\r\n"));
        assert!(text.contains("\r\nratelimit-policy: \"token\";q=10;w=1\r\nratelimit: \"token\";r=9;t=1\r\n"));
        assert!(text.ends_with("content-length: 2\r\n\r\n{}"));
        let mut out = Vec::new();
        a.write_h1(&extra, true, Some("close"), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("connection: close\r\ncontent-length: 2\r\n\r\n"), "HEAD: no body");
        let resp = a.into_response(&extra);
        assert_eq!(resp.headers()["ratelimit"], "\"token\";r=9;t=1");
    }
}
