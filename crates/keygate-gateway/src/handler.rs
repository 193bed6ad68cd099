//! The request path: every step in memory, in this order — CORS preflight (answered without a
//! token), framing checks, path normalization, route match, refusal of tokens in the query string,
//! credential, token index, IP allowlist, scope, rate limit and quota, then forwarding with
//! metering. This module is the one place where data-plane refusals become answers (RFC 6750 for
//! token errors); the protocol front ends ([`crate::h1`] for HTTP/1.1, [`Gateway::handle`] for
//! HTTP/2 through hyper) only carry them.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use ipnet::IpNet;
use keygate_core::dpop::{self, ProofCheck, ReplayCache};
use keygate_core::policy::GcraDecision;
use keygate_core::scope::Scope;
use keygate_core::secret::TokenSecret;
use keygate_core::token_format::PUBLIC_ID_LEN;
use keygate_core::{Clock, Timestamp};

use crate::answer::{Answer, AnswerExtra};
use crate::body::{BodySource, BodyState, GatewayBody, OnComplete, UpstreamBody};
use crate::head::{self, Known, ReqHead};
use crate::index::{IndexedToken, Refusal, TokenIndex};
use crate::jwt::{JwtIdentity, JwtRefusal, JwtVerifier, looks_like_jwt};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::proxy::{self, Answered, HeadSink, MapSink, RequestFraming, UpstreamError};
use crate::routes::{PathError, Route, RouteTable, Upstream, normalize_path};
use crate::usage::{Sample, UsageMeter};

/// Identity headers keygate sets for the upstream; client-supplied copies are removed.
pub const TOKEN_ID_HEADER: &str = "x-keygate-token-id";
pub const APP_ID_HEADER: &str = "x-keygate-app-id";
pub const SCOPES_HEADER: &str = "x-keygate-scopes";

/// Told about tokens found where they must not be (the query string), off the request path.
/// A request can carry a made-up well-formed token (the checksum is public), so an
/// implementation bounds the work reports cause: it may drop a report, and says so.
pub trait ExposureReporter: Send + Sync {
    /// Takes a report of `token`, found at `where_`; `live` when the token is in the index (a
    /// token that can authenticate, which must not be crowded out by made-up ones). `false`
    /// when the report was dropped.
    fn token_in_query(&self, token: TokenSecret, where_: String, live: bool) -> bool;
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
    /// JWT access tokens: keygate's own and configured issuers'. `None`: API keys only.
    pub jwt: Option<JwtVerifier>,
    /// Requests keygate answers itself on this listener (the OAuth endpoints).
    pub local: Option<Arc<dyn LocalService>>,
    /// DPoP proofs seen at the gateway, each accepted once (RFC 9449 §11.1).
    pub dpop_replay: ReplayCache,
    /// Server-provided DPoP nonces (RFC 9449 §9), when required.
    pub dpop_nonces: Option<keygate_core::dpop::NonceKey>,
    /// Signs the identity tokens of routes with `identity_token`.
    pub identity: Option<Arc<dyn IdentitySigner>>,
    /// Identity tokens minted, by caller and route, reused while they have a while to live.
    pub identity_cache: IdentityCache,
}

/// Identity tokens minted for upstreams, reused while they have [`IDENTITY_REUSE_S`] to live.
///
/// Keyed by the caller's identity **entry** (an index entry, or a verified JWT), the route's id
/// and the client address, all of which the token states (issue 12): any change to a token
/// (scopes, say) replaces its index entry, so the next request mints a token with the new
/// claims, and a reload that moves routes cannot hand one route's token to another. Each cached
/// token holds the entry it was minted for, so that entry's address cannot be reused by another
/// while cached. Bounded: two generations of [`IDENTITY_CACHE`] / 2 entries, the older let go of
/// whole when the newer is full (no scan under the lock).
#[derive(Default)]
pub struct IdentityCache(parking_lot::Mutex<IdentityGenerations>);

/// Identity tokens cached at most.
pub const IDENTITY_CACHE: usize = 65_536;

#[derive(Default)]
struct IdentityGenerations {
    current: std::collections::HashMap<IdentityKey, Minted>,
    previous: std::collections::HashMap<IdentityKey, Minted>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct IdentityKey {
    /// The address of the caller's identity entry (pinned by [`Minted::pinned`]).
    who: usize,
    route: Arc<str>,
    ip: IpAddr,
}

struct Minted {
    /// Keeps the identity entry alive, and so its address unique, while cached.
    #[allow(dead_code, reason = "held for its address, never read")]
    pinned: Pinned,
    jwt: Arc<str>,
    /// `exp`, in seconds.
    exp: i64,
}

#[allow(dead_code, reason = "held for its address, never read")]
enum Pinned {
    Key(Arc<IndexedToken>),
    Jwt(Arc<JwtIdentity>),
}

impl IdentityCache {
    fn get(&self, key: &IdentityKey, now_s: i64) -> Option<Arc<str>> {
        let g = self.0.lock();
        let m = g.current.get(key).or_else(|| g.previous.get(key))?;
        (m.exp - now_s >= IDENTITY_REUSE_S).then(|| m.jwt.clone())
    }

    fn put(&self, key: IdentityKey, minted: Minted) {
        let mut g = self.0.lock();
        let gone = if g.current.len() >= IDENTITY_CACHE / 2 {
            let full = std::mem::take(&mut g.current);
            Some(std::mem::replace(&mut g.previous, full))
        } else {
            None
        };
        g.current.insert(key, minted);
        drop(g);
        drop(gone);
    }
}

/// Signs the short-lived identity tokens upstreams receive on routes with `identity_token` (the
/// phantom-token pattern), with keygate's own signing key.
pub trait IdentitySigner: Send + Sync {
    /// The `iss` of the tokens.
    fn issuer(&self) -> &str;
    /// A compact JWS of `claims`; `None` if no key signs now.
    fn sign(&self, claims: &serde_json::Value) -> Option<String>;
}

/// How long an identity token lives, and how much life it must have left to be reused, in
/// seconds.
const IDENTITY_TTL_S: i64 = 60;
const IDENTITY_REUSE_S: i64 = 15;

/// Requests keygate answers itself on the gateway listener, with the whole (small) body read:
/// its OAuth endpoints, served by the control plane.
pub trait LocalService: Send + Sync {
    /// Whether `path` (normalized) is one of them.
    fn serves(&self, path: &str) -> bool;
    fn call(
        &self,
        req: Request<Bytes>,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Bytes>> + Send>>;
}

/// The largest body read for a [`LocalService`].
pub const MAX_LOCAL_BODY: u64 = 64 * 1024;

/// How long a DPoP proof is accepted after its `iat`, and the clock skew allowed, in seconds.
const DPOP_MAX_AGE_S: u32 = 300;
const DPOP_LEEWAY_S: u32 = 30;

/// The connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The remote address as text, formatted once per connection (`X-Forwarded-For`).
    ip_text: IpText,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, tls: bool) -> Self {
        Self { remote, tls, ip_text: IpText::new(remote.ip()) }
    }
}

/// An IP address as text, without a heap allocation.
#[derive(Debug, Clone, Copy)]
struct IpText {
    buf: [u8; 46],
    len: u8,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 46];
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cur, "{ip}");
        let len = u8::try_from(cur.position()).unwrap_or(0);
        Self { buf, len }
    }
    fn as_bytes(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// A refusal: the status, a stable code, a message, and how to say it. The common refusals are
/// made of static text, so refusing costs about as little as forwarding.
#[derive(Debug)]
pub(crate) struct Refuse {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    message: Cow<'static, str>,
    www_authenticate: Option<Cow<'static, str>>,
    close: bool,
    retry_after: Option<u64>,
    /// The nonce for the next DPoP proof (RFC 9449 §9), sent as `DPoP-Nonce`.
    dpop_nonce: Option<String>,
}

/// An RFC 6750 §3 `invalid_token` challenge with a fixed description.
macro_rules! invalid_token_challenge {
    ($description:literal) => {
        concat!("Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"", $description, "\"")
    };
}

impl Refuse {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            www_authenticate: None,
            close: false,
            retry_after: None,
            dpop_nonce: None,
        }
    }
    pub(crate) fn bad_framing(message: impl Into<Cow<'static, str>>) -> Self {
        Self { close: true, ..Self::new(StatusCode::BAD_REQUEST, "bad_request", message) }
    }
    /// RFC 6750 §3: 401 with `error="invalid_token"`.
    fn invalid_token(refusal: Refusal) -> Self {
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
    fn jwt(r: JwtRefusal) -> Self {
        let challenge =
            format!("Bearer realm=\"keygate\", error=\"invalid_token\", error_description=\"{}\"", r.message());
        Self { www_authenticate: Some(challenge.into()), ..Self::new(StatusCode::UNAUTHORIZED, r.code(), r.message()) }
    }

    /// A DPoP failure (RFC 9449 §7.1): 401 with a `DPoP` challenge naming the error.
    fn dpop(code: &'static str, message: &str) -> Self {
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
    fn path(e: PathError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.code(), e.to_string())
    }

    /// Whether the connection must close after this refusal.
    pub(crate) fn closes(&self) -> bool {
        self.close
    }

    /// The JSON answer: `{"error": {"code", "message"}}`.
    pub(crate) fn answer(&self) -> Answer {
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

/// Whether the request asks to switch protocols (RFC 9110 §7.8): an `Upgrade` field, and
/// `Connection` naming `upgrade` (the field is hop-by-hop, so without that it is not meant for
/// this hop). The one definition of an upgrade: what is checked is exactly what is forwarded and
/// tunnelled.
pub(crate) fn upgrade_requested(head: &ReqHead<'_>) -> bool {
    head.known.upgrade
        && head.known.connection
        && head
            .all("connection")
            .flat_map(|v| v.split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// The protocol names of an `Upgrade` list (`name[/version]`, RFC 9110 §7.8), in order.
pub(crate) fn upgrade_protocols<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values.flat_map(|v| v.split(|b| *b == b',')).map(|p| {
        let p = p.trim_ascii();
        p.split(|b| *b == b'/').next().unwrap_or(p).trim_ascii()
    })
}

/// Refuses an upgrade to `h2c`, always (RFC 9113 §3.1 removed it: after its 101 the client
/// would speak HTTP/2 straight to the upstream, and its requests there would pass no check), and
/// to any protocol the route's `upgrades` does not list.
fn check_upgrade(head: &ReqHead<'_>, route: &Route) -> Result<(), Refuse> {
    let refuse =
        |m: Cow<'static, str>| Refuse { close: true, ..Refuse::new(StatusCode::BAD_REQUEST, UPGRADE_NOT_ALLOWED, m) };
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

/// The code of an upgrade refused.
pub(crate) const UPGRADE_NOT_ALLOWED: &str = "upgrade_not_allowed";

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

/// A well-formed token anywhere in the query string: in a name or a value, alone or inside a
/// longer text (`Bearer kg_…`, JSON), with its characters percent-encoded or not and `+` read
/// as a space, as application/x-www-form-urlencoded parsers read a query (issue 12 #4). A query
/// without escapes is searched as it is; one with escapes is decoded first, on the stack when
/// it is short.
fn token_in_query(query: &str, index: &TokenIndex) -> Option<String> {
    let raw = query.as_bytes();
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

fn is_trusted(trusted: &[IpNet], ip: &IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// The client's address: the socket's, or — when the socket is a trusted proxy — the nearest
/// untrusted hop of `X-Forwarded-For`, read from the right. Each entry is an address, with or
/// without a port (`203.0.113.7:5555`, `[2001:db8::1]:443`, `[2001:db8::1]`, `2001:db8::1`).
/// An entry that is not one of these ends the walk where it is: the address is then the
/// trusted hop that passed it on, never one further left, where the client writes.
fn client_ip(remote: SocketAddr, head: &ReqHead<'_>, trusted: &[IpNet]) -> IpAddr {
    let mut ip = remote.ip();
    if !head.known.forwarded_for || !is_trusted(trusted, &ip) {
        return ip;
    }
    let lines = head.fields.iter().rev().filter(|f| f.name.eq_ignore_ascii_case("x-forwarded-for"));
    for entry in lines.flat_map(|f| f.value.rsplit(|b| *b == b',')) {
        let Some(hop) = parse_hop(entry) else { return ip };
        ip = hop;
        if !is_trusted(trusted, &hop) {
            break;
        }
    }
    ip
}

/// One `X-Forwarded-For` entry: an IPv4 or IPv6 address, an IPv4 address with a port, or a
/// bracketed IPv6 address with or without a port.
fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry.trim_ascii()).ok()?;
    let is_port = |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = head::split_once_ascii(rest, b']')?;
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        return addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let (addr, port) = head::split_once_ascii(s, b':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The scheme and host the client asked for: from a trusted proxy, its single
/// `X-Forwarded-Proto` (`http` or `https`) and single `X-Forwarded-Host` (a host with an
/// optional port) when they are valid, else the `proto` and `host` of the element it added last
/// to `Forwarded` (RFC 7239 §5.3, §5.4), when valid; otherwise — and from anyone else, always —
/// this listener's scheme and the request's own authority (`Host` or `:authority`).
fn origin<'h>(head: &ReqHead<'h>, conn: &ConnInfo, peer_trusted: bool) -> (&'static str, Option<&'h [u8]>) {
    let own_scheme = if conn.tls { "https" } else { "http" };
    let own_host = head.authority.map(str::as_bytes).or_else(|| head.at(head.known.host));
    if !peer_trusted {
        return (own_scheme, own_host);
    }
    let single = |name: &'static str| {
        let mut all = head.all(name);
        match (all.next(), all.next()) {
            (Some(v), None) => Some(v.trim_ascii()),
            _ => None,
        }
    };
    let scheme_of = |v: &[u8]| {
        if v.eq_ignore_ascii_case(b"https") {
            Some("https")
        } else if v.eq_ignore_ascii_case(b"http") {
            Some("http")
        } else {
            None
        }
    };
    // The element the trusted proxy appended: the last of the last `Forwarded` field.
    let forwarded = head.fields.iter().rev().find(|f| f.name.eq_ignore_ascii_case("forwarded"));
    let element = forwarded.and_then(|f| f.value.rsplit(|b| *b == b',').next());
    let param = |key: &[u8]| element.and_then(|e| forwarded_param(e, key));
    let scheme = single("x-forwarded-proto")
        .and_then(scheme_of)
        .or_else(|| param(b"proto").and_then(scheme_of))
        .unwrap_or(own_scheme);
    let host = single("x-forwarded-host")
        .filter(|h| is_authority(h))
        .or_else(|| param(b"host").filter(|h| is_authority(h)))
        .or(own_host);
    (scheme, host)
}

/// The value of `key` in one `Forwarded` element (`for=…;proto=https;host="api.example"`),
/// unquoted; `None` when absent, or quoted with an escape (not worth reading for a host).
fn forwarded_param<'v>(element: &'v [u8], key: &[u8]) -> Option<&'v [u8]> {
    element.split(|b| *b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (k, v) = (pair.get(..eq)?, pair.get(eq + 1..)?);
        if !k.trim_ascii().eq_ignore_ascii_case(key) {
            return None;
        }
        let v = v.trim_ascii();
        match v.strip_prefix(b"\"").and_then(|q| q.strip_suffix(b"\"")) {
            Some(q) if q.contains(&b'\\') => None,
            Some(q) => Some(q),
            None => Some(v),
        }
    })
}

/// Whether `v` is a host with an optional port (RFC 3986 §3.2.2): a name of letters, digits,
/// `-`, `.`, `_` and `~`, or a bracketed IPv6 address; nothing else (no path, no user, no list).
fn is_authority(v: &[u8]) -> bool {
    let port_ok = |p: &[u8]| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit);
    if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else { return false };
        let (addr, after) = (rest.get(..end).unwrap_or_default(), rest.get(end + 1..).unwrap_or_default());
        let addr_ok = std::str::from_utf8(addr).is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        return addr_ok && (after.is_empty() || after.strip_prefix(b":").is_some_and(port_ok));
    }
    let (host, port) = match v.iter().position(|b| *b == b':') {
        Some(i) => (v.get(..i).unwrap_or_default(), v.get(i + 1..)),
        None => (v, None),
    };
    !host.is_empty()
        && host.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        && port.is_none_or(port_ok)
}

fn ceil_secs_us(us: i64) -> u64 {
    u64::try_from((us + 999_999) / 1_000_000).unwrap_or(0)
}

/// Who a request comes from.
pub(crate) enum Identity {
    /// An API key (or an opaque OAuth access token), from the token index.
    Key(Arc<IndexedToken>),
    /// A JWT access token.
    Jwt(Arc<JwtIdentity>),
}

/// What was decided about an authenticated request, carried to metering.
pub(crate) struct Caller {
    pub(crate) who: Identity,
    pub(crate) ip: IpAddr,
    /// For a JWT obtained by token exchange from an API key: that key, as the index has it now.
    /// Its allowlist, DPoP binding, scopes, rate limit and quota bind the JWT too, so an exchange
    /// never launders a restricted key into an unrestricted token.
    pub(crate) subject: Option<Arc<IndexedToken>>,
}

impl Caller {
    fn has_scope(&self, s: &Scope) -> bool {
        match &self.who {
            Identity::Key(t) => t.has_scope(s),
            Identity::Jwt(j) => j.has_scope(s) && self.subject.as_ref().is_none_or(|t| t.has_scope(s)),
        }
    }
    fn dpop_jkt(&self) -> Option<&str> {
        match &self.who {
            Identity::Key(t) => t.dpop_jkt(),
            Identity::Jwt(j) => self.subject.as_ref().and_then(|t| t.dpop_jkt()).or(j.jkt.as_deref()),
        }
    }
    fn allows_ip(&self, ip: IpAddr) -> bool {
        match &self.who {
            Identity::Key(t) => t.allows_ip(ip),
            Identity::Jwt(_) => self.subject.as_ref().is_none_or(|t| t.allows_ip(ip)),
        }
    }
    /// The API key whose own rate limit, quota and usage the request counts against.
    fn key(&self) -> Option<&IndexedToken> {
        match &self.who {
            Identity::Key(t) => Some(t),
            Identity::Jwt(_) => self.subject.as_deref(),
        }
    }
    /// The key of per-caller limiter state.
    fn limit_key(&self) -> &[u8; PUBLIC_ID_LEN] {
        match (&self.who, &self.subject) {
            (Identity::Key(t), _) | (Identity::Jwt(_), Some(t)) => t.public_id(),
            (Identity::Jwt(j), None) => &j.limit_key,
        }
    }
    fn scopes(&self) -> &[Scope] {
        match &self.who {
            Identity::Key(t) => &t.scopes,
            Identity::Jwt(j) => &j.scopes,
        }
    }
}

/// What to do with a request.
pub(crate) enum Decision<'t, 'h> {
    /// Forward it to the route's upstreams; `path` is the normalized path.
    Forward { route: &'t Route, caller: Option<Caller>, path: Cow<'h, str> },
    /// keygate answers itself: a refusal (with its code, for the refusal metrics), a CORS
    /// preflight, the demo route.
    Answer { answer: Answer, refusal: Option<&'static str>, route: Option<&'t Route>, caller: Option<Caller> },
    /// A request for one of keygate's own services on this listener (the OAuth endpoints).
    Local(Arc<dyn LocalService>),
}

/// Method and path, for the access log.
pub(crate) struct RequestLine {
    method: Method,
    path: String,
}

/// How a request ended, for metering.
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) start: Instant,
    pub(crate) now: Timestamp,
}

impl Gateway {
    /// Answers one request that came through hyper (HTTP/2). The body of a request keygate
    /// answers itself must arrive within `local_body_timeout`.
    pub async fn handle(
        self: &Arc<Self>,
        conn: ConnInfo,
        req: Request<Incoming>,
        local_body_timeout: std::time::Duration,
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
        let mut extra = AnswerExtra::default();
        let (route, caller, path) = match self.decide(&table, conn, &head, now, &mut extra) {
            Decision::Forward { route, caller, path } => (route, caller, path),
            Decision::Answer { answer, refusal, route, caller } => {
                let o = Outcome { status: answer.status.as_u16(), bytes_in: 0, bytes_out: 0, start, now };
                self.finish_own(&table, refusal, route, caller.as_ref(), &o, &head);
                return answer.into_response(&extra);
            }
            Decision::Local(service) => {
                let limited = http_body_util::Limited::new(body, usize::try_from(MAX_LOCAL_BODY).unwrap_or(usize::MAX));
                // The whole body within one deadline (a stream fed a byte now and then must
                // not hold a task of the control plane's forever).
                let collected =
                    match tokio::time::timeout(local_body_timeout, http_body_util::BodyExt::collect(limited)).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(_)) => {
                            let r = Refuse::new(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "body_too_large",
                                "this endpoint takes bodies up to 64 KiB",
                            );
                            return r.answer().into_response(&extra);
                        }
                        Err(_elapsed) => {
                            let r = Refuse::new(
                                StatusCode::REQUEST_TIMEOUT,
                                "request_timeout",
                                "the request body did not arrive in time",
                            );
                            let o = Outcome { status: r.status.as_u16(), bytes_in: 0, bytes_out: 0, start, now };
                            self.finish_own(&table, Some(r.code), None, None, &o, &head);
                            return r.answer().into_response(&extra);
                        }
                    };
                let mut req = Request::new(collected.to_bytes());
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.headers_mut() = parts.headers.clone();
                let resp = service.call(req, conn.remote).await;
                let o = Outcome { status: resp.status().as_u16(), bytes_in: 0, bytes_out: 0, start, now };
                self.record(&table, None, None, &o, self.line(&head.method, head.path).as_ref());
                return resp.map(GatewayBody::full);
            }
        };
        let state = Arc::new(BodyState::default());
        let mut upstream_body = Some(UpstreamBody::new(body, route.max_body_bytes, state.clone()));
        let mut sink = MapSink::default();
        let line = self.line(&head.method, &path);
        match self
            .exchange(&table, route, &head, &path, caller.as_ref(), &conn, start, &mut upstream_body, &state, &mut sink)
            .await
        {
            Ok(answered) => {
                let status = answered.status;
                let mut resp = Response::new(());
                *resp.status_mut() = status;
                *resp.headers_mut() = sink.headers;
                extra.to_map(resp.headers_mut());
                let done = Completion {
                    gw: self.clone(),
                    route: route.index,
                    table,
                    caller,
                    status: status.as_u16(),
                    state,
                    start,
                    now,
                    line,
                };
                resp.map(|()| GatewayBody::Upstream { inner: answered.body, sent: 0, done: Some(Box::new(done)) })
            }
            Err(refusal) => {
                let o = Outcome {
                    status: refusal.status.as_u16(),
                    bytes_in: state.seen.load(Ordering::Relaxed),
                    bytes_out: 0,
                    start,
                    now,
                };
                self.record(&table, Some(route), caller.as_ref(), &o, line.as_ref());
                refusal.answer().into_response(&extra)
            }
        }
    }

    /// Decides about a request from its head: forward it, or answer it here. Adds the headers
    /// every answer on the route carries (limits, CORS) to `extra`.
    pub(crate) fn decide<'t, 'h>(
        &self,
        table: &'t Table,
        conn: ConnInfo,
        head: &ReqHead<'h>,
        now: Timestamp,
        extra: &mut AnswerExtra,
    ) -> Decision<'t, 'h> {
        let checked = check_framing(head).and_then(|()| normalize_path(head.path).map_err(Refuse::path));
        let path = match checked {
            Ok(p) => p,
            Err(r) => return Decision::Answer { answer: r.answer(), refusal: Some(r.code), route: None, caller: None },
        };
        // CORS: preflights are answered here, without a token; other answers on a CORS route
        // carry the allow headers (errors too, so a browser can read them).
        if let Some(origin) = head.at(head.known.origin)
            && let Ok(Some(route)) = table.routes.resolve(|| head.host(), &path)
            && let Some(cors) = &route.cors
        {
            let allowed = cors_allows(cors, origin);
            if allowed {
                add_cors_headers(cors, origin, extra);
            }
            if head.method == Method::OPTIONS && head.known.access_control_request_method {
                let (answer, refusal) = if allowed {
                    (preflight(cors), None)
                } else {
                    let r = Refuse::new(
                        StatusCode::FORBIDDEN,
                        "cors_origin_not_allowed",
                        "this origin may not call this API",
                    );
                    (r.answer(), Some(r.code))
                };
                return Decision::Answer { answer, refusal, route: Some(route), caller: None };
            }
        }
        if let Some(local) = &self.local
            && local.serves(&path)
        {
            return Decision::Local(local.clone());
        }
        match self.admit(table, conn, head, path, now, extra) {
            Ok((route, caller, path)) if route.demo => {
                let answer = demo_echo(head, caller.as_ref(), &self.index);
                let _ = path;
                Decision::Answer { answer, refusal: None, route: Some(route), caller }
            }
            Ok((route, caller, path)) => Decision::Forward { route, caller, path },
            Err((route, caller, refusal)) => {
                Decision::Answer { answer: refusal.answer(), refusal: Some(refusal.code), route, caller }
            }
        }
    }

    /// Runs every check; on refusal returns the route and caller known so far, for metering.
    /// (The refusal path is the slow path; its large error value is not worth a box.)
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn admit<'t, 'h>(
        &self,
        table: &'t Table,
        conn: ConnInfo,
        head: &ReqHead<'h>,
        path: Cow<'h, str>,
        now: Timestamp,
        extra: &mut AnswerExtra,
    ) -> Result<(&'t Route, Option<Caller>, Cow<'h, str>), (Option<&'t Route>, Option<Caller>, Refuse)> {
        let route = match table.routes.resolve(|| head.host(), &path) {
            Ok(Some(route)) => route,
            Ok(None) => {
                let r = Refuse::new(StatusCode::NOT_FOUND, "route_not_found", "no route serves this path");
                return Err((None, None, r));
            }
            Err(e) => return Err((None, None, Refuse::path(e))),
        };
        let fail = |route: &'t Route, caller: Option<Caller>, r: Refuse| (Some(route), caller, r);
        if let Some(q) = head.query
            && let Some(tok) = token_in_query(q, &self.index)
        {
            if let Some(rep) = &self.reporter {
                let live = self.index.contains(&tok);
                let where_ = format!("gateway: query string of {} {path}", head.method);
                if !rep.token_in_query(TokenSecret::new(tok), where_, live) {
                    table.metrics.exposure_report_dropped();
                }
            }
            return Err(fail(
                route,
                None,
                Refuse::new(
                    StatusCode::BAD_REQUEST,
                    "token_in_query",
                    "tokens must not be sent in the URL, which ends up in logs; the token is now marked exposed: rotate it and send it as Authorization: Bearer",
                ),
            ));
        }
        if route.public {
            if upgrade_requested(head)
                && let Err(r) = check_upgrade(head, route)
            {
                return Err(fail(route, None, r));
            }
            return Ok((route, None, path));
        }
        let Some((scheme, presented)) = credential(head) else {
            let r = Refuse {
                www_authenticate: Some(Cow::Borrowed("Bearer realm=\"keygate\"")),
                ..Refuse::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_token",
                    "send a token as Authorization: Bearer <token>",
                )
            };
            return Err(fail(route, None, r));
        };
        let (who, subject) = if looks_like_jwt(presented) {
            let Some(verifier) = &self.jwt else {
                return Err(fail(route, None, Refuse::jwt(JwtRefusal::UnknownIssuer)));
            };
            let jwt = verifier.verify(presented, now, &self.index).map_err(|e| fail(route, None, Refuse::jwt(e)))?;
            let subject = jwt.exchanged_from(&self.index, now).map_err(|e| fail(route, None, Refuse::jwt(e)))?;
            (Identity::Jwt(jwt), subject)
        } else {
            let key = self.index.verify(presented, now).map_err(|e| fail(route, None, Refuse::invalid_token(e)))?;
            (Identity::Key(key), None)
        };
        let ip = client_ip(conn.remote, head, &self.settings.trusted_proxies);
        let caller = Caller { who, ip, subject };
        if let Err(r) = self.check_dpop(head, &conn, scheme, presented, &caller, now) {
            return Err(fail(route, Some(caller), r));
        }
        // RFC 9449 §9: the nonce for the next proof, with the answer.
        if scheme == Scheme::Dpop
            && let Some(k) = &self.dpop_nonces
            && let Ok(v) = HeaderValue::from_str(&k.current(now.as_millis() / 1000))
        {
            extra.header(HeaderName::from_static("dpop-nonce"), v);
        }
        if !caller.allows_ip(ip) {
            let r =
                Refuse::new(StatusCode::FORBIDDEN, "ip_not_allowed", format!("the token may not be used from {ip}"));
            return Err(fail(route, Some(caller), r));
        }
        if let Some(scope) = route.required_scope(&head.method)
            && !caller.has_scope(scope)
        {
            let challenge = format!(
                "Bearer realm=\"keygate\", error=\"insufficient_scope\", error_description=\"this request needs the scope {scope}\", scope=\"{scope}\""
            );
            let r = Refuse {
                www_authenticate: Some(challenge.into()),
                ..Refuse::new(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    format!("this request needs the scope {scope}"),
                )
            };
            return Err(fail(route, Some(caller), r));
        }
        // After the credential and the scope (so a caller without them learns nothing of the
        // route's list), before the limits (a refused upgrade costs the caller nothing).
        if upgrade_requested(head)
            && let Err(r) = check_upgrade(head, route)
        {
            return Err(fail(route, Some(caller), r));
        }
        if let Some(r) = self.check_limits(table, route, &caller, now, extra) {
            return Err(fail(route, Some(caller), r));
        }
        if let Some(len) = head.at(head.known.content_length).and_then(parse_length)
            && len > route.max_body_bytes
        {
            let r = Refuse::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("this route takes bodies up to {} bytes", route.max_body_bytes),
            );
            return Err(fail(route, Some(caller), r));
        }
        Ok((route, Some(caller), path))
    }

    /// RFC 9449 §7: a token bound to a DPoP key must come as `Authorization: DPoP` with a proof
    /// of that key for this request (method, URL, the token's hash), used once; a proof sent
    /// with an unbound token must be valid too.
    fn check_dpop(
        &self,
        head: &ReqHead<'_>,
        conn: &ConnInfo,
        scheme: Scheme,
        token: &str,
        caller: &Caller,
        now: Timestamp,
    ) -> Result<(), Refuse> {
        let bound = caller.dpop_jkt();
        if scheme != Scheme::Dpop {
            return match bound {
                Some(_) => Err(Refuse::dpop(
                    "invalid_token",
                    "this token is bound to a DPoP key: send it as Authorization: DPoP with a DPoP proof",
                )),
                None => Ok(()),
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
            return Err(Refuse::dpop("invalid_dpop_proof", "this DPoP proof was already used"));
        }
        Ok(())
    }

    /// Token rate limit, route rate limit (it can only tighten) and quota; adds the limit headers.
    fn check_limits(
        &self,
        table: &Table,
        route: &Route,
        caller: &Caller,
        now: Timestamp,
        extra: &mut AnswerExtra,
    ) -> Option<Refuse> {
        let id: &[u8; PUBLIC_ID_LEN] = caller.limit_key();
        let token = caller.key();
        let now_us = now.as_millis().saturating_mul(1000);
        let mut refused: Option<GcraDecision> = None;
        let own = token.and_then(|t| t.rate_limit);
        for (name, scope, limit) in [("token", 0u32, own), ("route", route.limiter_key, route.rate_limit)] {
            let Some(limit) = limit else { continue };
            let d = match token {
                Some(t) if scope == 0 => Limiter::check_cell(t.rate_state(), &limit, now_us),
                _ => self.limiter.check_rate(id, scope, &limit, now_us),
            };
            extra.limit(name, limit.capacity(), u64::from(limit.per_seconds), d.remaining, ceil_secs_us(d.reset_after));
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
        if let Some(q) = token.and_then(|t| t.quota) {
            let d = self.limiter.check_quota(id, &q, now.as_millis());
            let (start, end) = q.period.window(now.as_millis());
            let window_s = if end == i64::MAX { 0 } else { u64::try_from((end - start) / 1000).unwrap_or(0) };
            let reset_s = if d.reset_after_ms == i64::MAX {
                0
            } else {
                u64::try_from((d.reset_after_ms + 999) / 1000).unwrap_or(0)
            };
            extra.limit("quota", q.requests, window_s, d.remaining, reset_s);
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

    /// Sends the request to the route's upstreams: one attempt, or more for a request without a
    /// body when a connection cannot be made. The answer's head goes to `sink`; on failure, the
    /// refusal to give the client.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn exchange<B: BodySource, S: HeadSink>(
        &self,
        table: &Table,
        route: &Route,
        head: &ReqHead<'_>,
        path: &str,
        caller: Option<&Caller>,
        conn: &ConnInfo,
        start: Instant,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        let has_body = body.as_ref().is_some_and(|b| !b.is_end_stream());
        let trusted = &self.settings.trusted_proxies;
        let peer_trusted = !trusted.is_empty() && is_trusted(trusted, &conn.remote.ip());
        let client = match caller {
            Some(c) => c.ip,
            None if peer_trusted => client_ip(conn.remote, head, trusted),
            None => conn.remote.ip(),
        };
        let identity = if route.identity_token { caller.and_then(|c| self.identity_token(c, route)) } else { None };
        let out = UpstreamHead {
            head,
            path,
            route,
            caller,
            conn,
            api_key: self.settings.api_key_header.as_ref(),
            peer_trusted,
            client,
            identity: identity.as_deref(),
        };
        // Upstreams already tried; allocated only when a retry happens.
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err = UpstreamError::Connect("no upstream".into());
        // Only a request without a body can be sent again, and only a safe one after it left.
        let attempts = if has_body || !head.method.is_idempotent() { 1 } else { route.retries as usize + 1 };
        for _ in 0..attempts {
            let Some(ui) = route.pick(&tried) else { break };
            let Some(upstream) = route.upstreams.get(ui) else { break };
            let write_head = |framing: RequestFraming, buf: &mut Vec<u8>| out.write(upstream, framing, buf);
            match proxy::send(
                upstream,
                &head.method,
                &write_head,
                body,
                sink,
                route.connect_timeout,
                tokio::time::Instant::from_std(start) + route.request_timeout,
            )
            .await
            {
                Ok(answered) => return Ok(answered),
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
                    tried.push(ui);
                }
            }
        }
        Err(if state.broken.load(Ordering::Relaxed) {
            Refuse::bad_framing("the request body is malformed (such as a bad chunk size)")
        } else if state.too_large.load(Ordering::Relaxed) {
            Refuse {
                close: true,
                ..Refuse::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("this route takes bodies up to {} bytes", route.max_body_bytes),
                )
            }
        } else {
            match last_err {
                UpstreamError::Timeout => {
                    Refuse::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", "the upstream did not answer in time")
                }
                _ => Refuse::new(StatusCode::BAD_GATEWAY, "upstream_unavailable", "the upstream could not be reached"),
            }
        })
    }

    /// The identity token for `caller` on `route`: reused from the cache while it has at least
    /// [`IDENTITY_REUSE_S`] to live, else minted.
    fn identity_token(&self, caller: &Caller, route: &Route) -> Option<Arc<str>> {
        let signer = self.identity.as_ref()?;
        let now_s = self.clock.now().as_millis() / 1000;
        let (who, pinned) = match &caller.who {
            Identity::Key(t) => (Arc::as_ptr(t) as usize, Pinned::Key(t.clone())),
            Identity::Jwt(j) => (Arc::as_ptr(j) as usize, Pinned::Jwt(j.clone())),
        };
        let key = IdentityKey { who, route: route.id.clone(), ip: caller.ip };
        if let Some(jwt) = self.identity_cache.get(&key, now_s) {
            return Some(jwt);
        }
        let (id, sub, extra) = match &caller.who {
            Identity::Key(t) => (
                t.token_id().to_string(),
                t.app_id.to_string(),
                serde_json::json!({"token_id": t.token_id().to_string(), "workspace_id": &*t.workspace_id}),
            ),
            Identity::Jwt(j) => (
                format!("jwt:{}", j.jti.as_deref().unwrap_or(&j.sub)),
                j.app_id.as_deref().unwrap_or(&j.sub).to_owned(),
                serde_json::json!({"token_id": j.jti.as_deref(), "client_id": j.client_id.as_deref(), "token_issuer": &*j.issuer, "workspace_id": j.workspace_id.as_deref()}),
            ),
        };
        let scopes: Vec<&str> = caller.scopes().iter().map(Scope::as_str).collect();
        let mut claims = serde_json::json!({
            "iss": signer.issuer(),
            "sub": sub,
            "aud": format!("keygate-route:{}", route.id),
            "iat": now_s,
            "exp": now_s + IDENTITY_TTL_S,
            "jti": format!("{id}.{}.{now_s}", route.id),
            "scope": scopes.join(" "),
            "client_ip": caller.ip.to_string(),
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())));
        }
        let jwt: Arc<str> = signer.sign(&claims)?.into();
        self.identity_cache.put(key, Minted { pinned, jwt: jwt.clone(), exp: now_s + IDENTITY_TTL_S });
        Some(jwt)
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

    /// Counts an answer keygate gave itself: its refusal reason, then as any finished request.
    pub(crate) fn finish_own(
        &self,
        table: &Table,
        refusal: Option<&'static str>,
        route: Option<&Route>,
        caller: Option<&Caller>,
        o: &Outcome,
        head: &ReqHead<'_>,
    ) {
        if let Some(code) = refusal {
            table.metrics.refusal(code);
        }
        self.record(table, route, caller, o, self.line(&head.method, head.path).as_ref());
    }

    /// The request line for the access log, taken only when the log is on.
    pub(crate) fn line(&self, method: &Method, path: &str) -> Option<RequestLine> {
        self.settings.access_log.then(|| RequestLine { method: method.clone(), path: path.to_owned() })
    }

    /// Counts a finished request: route metrics, the caller's usage, and the access log line.
    pub(crate) fn record(
        &self,
        table: &Table,
        route: Option<&Route>,
        caller: Option<&Caller>,
        o: &Outcome,
        line: Option<&RequestLine>,
    ) {
        let latency_us = u64::try_from(o.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        table.metrics.request(route.map(|r| r.index), o.status, latency_us);
        // Usage is metered per API key (a JWT exchanged from a key, as that key); other JWT callers
        // count in the route metrics.
        if let (Some(route), Some(c)) = (route, caller)
            && let Some(token) = c.key()
        {
            let ip = &c.ip;
            self.meter.record(&Sample {
                public_id: token.public_id(),
                workspace_id: &token.workspace_id,
                route_index: route.index,
                route_id: &route.id,
                status: o.status,
                bytes_in: o.bytes_in,
                bytes_out: o.bytes_out,
                latency_us,
                at: o.now,
                client_ip: *ip,
            });
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

/// A value for the access log: itself when it is a valid field value (no line break or other
/// control character, see [`crate::answer::is_field_value`]), else `-`.
fn logged(v: &str) -> &str {
    if crate::answer::is_field_value(v.as_bytes()) { v } else { "-" }
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

/// A `Content-Length` value (RFC 9110 §8.6): one or more digits, and a number that fits in 64
/// bits. Anything else (a sign, spaces, hex, a length past 2⁶⁴−1) is `None`.
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(
        0u64,
        |n, &b| {
            if b.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(b - b'0')) } else { None }
        },
    )
}

/// Everything the request head sent upstream is made from.
pub(crate) struct UpstreamHead<'a, 'h> {
    head: &'a ReqHead<'h>,
    /// Normalized.
    path: &'a str,
    route: &'a Route,
    caller: Option<&'a Caller>,
    conn: &'a ConnInfo,
    api_key: Option<&'a HeaderName>,
    /// The socket's peer is a trusted proxy (`gateway.trusted_proxies`): its `X-Forwarded-For`
    /// and `Forwarded` are extended, the other `X-Forwarded-*` fields it sends pass, and the
    /// scheme and host it was asked for are believed.
    peer_trusted: bool,
    /// The client's address as keygate decided it ([`client_ip`]).
    client: IpAddr,
    /// The identity token to send in `Authorization` (routes with `identity_token`).
    identity: Option<&'a str>,
}

impl UpstreamHead<'_, '_> {
    /// Writes the request head for `upstream` in one buffer: the client's fields minus those
    /// that must not pass (hop-by-hop ones and any named in `Connection` are removed before
    /// keygate's own are added, see [`head::classify_name`]), then `X-Forwarded-*`,
    /// `Forwarded`, `X-Real-IP`, the identity fields and the framing. Every field goes through
    /// [`crate::answer::line`] (or [`crate::answer::begin`]), which writes only valid field
    /// values.
    pub(crate) fn write(&self, upstream: &Upstream, framing: RequestFraming, buf: &mut Vec<u8>) {
        use crate::answer::{begin, line};
        let head = self.head;
        buf.extend_from_slice(head.method.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(upstream.base_path.as_bytes());
        let rest =
            if self.route.strip_prefix { self.path.get(self.route.prefix.len()..).unwrap_or("") } else { self.path };
        buf.extend_from_slice(if rest.is_empty() { b"/" } else { rest.as_bytes() });
        if let Some(q) = head.query {
            buf.push(b'?');
            buf.extend_from_slice(q.as_bytes());
        }
        buf.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        buf.extend_from_slice(upstream.authority.as_bytes());
        buf.extend_from_slice(b"\r\n");
        let upgrade = upgrade_requested(head);
        let strip_credential = !self.route.public;
        let api_key = self.api_key.filter(|_| strip_credential).map(|k| k.as_str().as_bytes());
        // Fields named in `Connection` (RFC 9110 §7.6.1), looked at only when there is one.
        let mut named = head.known.connection.then(|| head::ConnectionNames::new(head.fields));
        // Names are compared folded (`X_Keygate_Subject` as `x-keygate-subject`) only when some
        // name needs it; the common request takes the plain comparisons.
        let folded = head.known.odd_names
            || api_key.is_some_and(head::needs_fold)
            || named.as_ref().is_some_and(head::ConnectionNames::any_odd);
        if let Some(n) = named.as_mut() {
            n.folded = folded;
        }
        let mut key_buf = [0u8; head::FOLD_LEN];
        let api_key = match api_key {
            Some(k) if folded => Some(head::fold(k, &mut key_buf)),
            k => k,
        };
        let mut name_buf = [0u8; head::FOLD_LEN];
        for f in head.fields {
            let name = f.name.as_bytes();
            let canon = if folded { head::fold(name, &mut name_buf) } else { name };
            let passes = match head::classify_name(canon) {
                head::NameClass::Passes => true,
                head::NameClass::Stripped => false,
                head::NameClass::FromTrustedProxy => self.peer_trusted,
            };
            if !passes
                || named.as_ref().is_some_and(|n| n.lists(canon))
                || (strip_credential
                    && (canon.eq_ignore_ascii_case(b"authorization")
                        || api_key.is_some_and(|k| canon.eq_ignore_ascii_case(k))))
            {
                continue;
            }
            line(buf, name, f.value);
        }
        if upgrade {
            for v in head.all("upgrade") {
                line(buf, b"upgrade", v);
            }
            buf.extend_from_slice(b"connection: upgrade\r\n");
        }
        // X-Forwarded-For: a trusted proxy's chain, extended with the socket's address.
        let mut xff = begin(buf, b"x-forwarded-for");
        if self.peer_trusted && head.known.forwarded_for {
            for v in head.all("x-forwarded-for") {
                xff.push(v).push(b", ");
            }
        }
        xff.push(self.conn.ip_text.as_bytes());
        xff.end();
        let (scheme, host) = origin(head, self.conn, self.peer_trusted);
        line(buf, b"x-forwarded-proto", scheme.as_bytes());
        if let Some(h) = host {
            line(buf, b"x-forwarded-host", h);
        }
        // Forwarded (RFC 7239 §4): a trusted proxy's, extended with this hop; nobody else's.
        if self.peer_trusted && head.fields.iter().any(|f| f.name.eq_ignore_ascii_case("forwarded")) {
            let mut fwd = begin(buf, b"forwarded");
            for v in head.all("forwarded") {
                fwd.push(v).push(b", ");
            }
            // RFC 7239 §6: an IPv6 node is quoted and bracketed.
            match self.conn.remote.ip() {
                IpAddr::V4(_) => fwd.push(b"for=").push(self.conn.ip_text.as_bytes()),
                IpAddr::V6(_) => fwd.push(b"for=\"[").push(self.conn.ip_text.as_bytes()).push(b"]\""),
            };
            fwd.end();
        }
        // X-Real-IP: the client's address as keygate decided it (formatted again only when a
        // trusted proxy's X-Forwarded-For named another).
        if self.client == self.conn.remote.ip() {
            line(buf, b"x-real-ip", self.conn.ip_text.as_bytes());
        } else {
            line(buf, b"x-real-ip", IpText::new(self.client).as_bytes());
        }
        if let Some(c) = self.caller {
            match &c.who {
                Identity::Key(t) => {
                    let mut id = begin(buf, b"x-keygate-token-id");
                    id.push(b"tok_").push(t.public_id());
                    id.end();
                    line(buf, b"x-keygate-app-id", t.app_id.as_bytes());
                }
                Identity::Jwt(j) => {
                    // A JWT's id and its client (keygate's tokens name the app the client belongs
                    // to). Claims with control characters were refused when the token was
                    // verified; `line` would leave them out anyway.
                    line(buf, b"x-keygate-token-id", j.jti.as_deref().unwrap_or("").as_bytes());
                    let app = j.app_id.as_deref().or(j.client_id.as_deref()).unwrap_or(&j.sub);
                    line(buf, b"x-keygate-app-id", app.as_bytes());
                    line(buf, b"x-keygate-subject", j.sub.as_bytes());
                }
            }
            let mut scopes = begin(buf, b"x-keygate-scopes");
            for (i, sc) in c.scopes().iter().enumerate() {
                if i > 0 {
                    scopes.push(b" ");
                }
                scopes.push(sc.as_str().as_bytes());
            }
            scopes.end();
        }
        if let Some(jwt) = self.identity {
            let mut auth = begin(buf, b"authorization");
            auth.push(b"Bearer ").push(jwt.as_bytes());
            auth.end();
        }
        match framing {
            RequestFraming::None => {}
            RequestFraming::Length(n) => {
                buf.extend_from_slice(b"content-length: ");
                buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        buf.extend_from_slice(b"\r\n");
    }
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
        let route = self.table.routes.routes.get(self.route).map(|r| &**r);
        self.gw.record(&self.table, route, self.caller.as_ref(), &o, self.line.as_ref());
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

/// `/demo/echo`: the request as keygate saw it and the identity it would attach.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_entries_parse_with_ports() {
        for (entry, ip) in [
            ("203.0.113.7", Some("203.0.113.7")),
            (" 203.0.113.7:5555 ", Some("203.0.113.7")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("::ffff:203.0.113.7", Some("::ffff:203.0.113.7")),
            ("203.0.113.7:", None),
            ("203.0.113.7:99999", None),
            ("203.0.113.7:+1", None),
            ("[2001:db8::1]x", None),
            ("[2001:db8::1", None),
            ("[203.0.113.7]", None),
            ("2001:db8::1:443x", None),
            ("unknown", None),
            ("_hidden", None),
            ("", None),
            ("fe80::1%eth0", None),
        ] {
            assert_eq!(parse_hop(entry.as_bytes()), ip.map(|i| i.parse().unwrap()), "{entry:?}");
        }
    }

    #[test]
    fn forwarded_elements_name_proto_and_host() {
        let e = br#"for=192.0.2.60;Proto=https;host="api.example:8443""#;
        assert_eq!(forwarded_param(e, b"proto"), Some(&b"https"[..]));
        assert_eq!(forwarded_param(e, b"host"), Some(&b"api.example:8443"[..]));
        assert_eq!(forwarded_param(e, b"by"), None);
        assert_eq!(forwarded_param(br#"host="a\"b""#, b"host"), None);
        assert_eq!(forwarded_param(b" proto = http ", b"proto"), Some(&b"http"[..]));
    }

    #[test]
    fn forwarded_hosts_are_authorities() {
        for ok in ["api.example", "api.example:443", "[2001:db8::1]", "[2001:db8::1]:8443", "a_b~c-d.e"] {
            assert!(is_authority(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "api.example/x", "a@b", "a b", "api.example:", "a:b", "a,b", "[::1", "[zz]", "a:1:2", "[::1]x"]
        {
            assert!(!is_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn content_lengths_are_plain_numbers_below_2_to_the_64() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"007"), Some(7));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"18446744073709551616", b"99999999999999999999999", b"+5", b"-1", b"0x5", b"5 ", b"1_0"]
        {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn upstream_heads_carry_what_may_pass_and_keygate_fields() {
        let cfg = crate::config::RouteConfig {
            strip_prefix: true,
            ..crate::config::RouteConfig::new("o", "/orders", "http://127.0.0.1:9000/api")
        };
        let table = RouteTable::build(&[cfg], &crate::config::GatewayConfig::default()).unwrap();
        let route = &table.routes[0];
        let f = |name, value: &'static str| head::Field { name, value: value.as_bytes() };
        let fields = [
            f("Host", "client.example"),
            f("Authorization", "Bearer kg_secret"),
            f("X-Api-Key", "kg_secret"),
            f("Connection", "x-hop, keep-alive"),
            f("X-Hop", "1"),
            f("Keep-Alive", "5"),
            f("Content-Length", "99"),
            f("Expect", "100-continue"),
            f("X-Keygate-Token-Id", "tok_forged"),
            f("X-Forwarded-For", "6.6.6.6"),
            f("X-Custom", "kept"),
        ];
        let key = HeaderName::from_static("x-api-key");
        let head = ReqHead {
            method: Method::POST,
            path: "/orders/7",
            query: Some("a=1"),
            version: http::Version::HTTP_11,
            authority: None,
            fields: &fields,
            known: Known::classify(&fields, Some(&key)),
        };
        let conn = ConnInfo::new("10.0.0.9:5000".parse().unwrap(), true);
        let out = UpstreamHead {
            head: &head,
            path: "/orders/7",
            route,
            caller: None,
            conn: &conn,
            api_key: Some(&key),
            peer_trusted: false,
            client: conn.remote.ip(),
            identity: None,
        };
        let mut buf = Vec::new();
        out.write(&route.upstreams[0], RequestFraming::Length(3), &mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "POST /api/7?a=1 HTTP/1.1\r\nhost: 127.0.0.1:9000\r\nX-Custom: kept\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: client.example\r\nx-real-ip: 10.0.0.9\r\n\
             content-length: 3\r\n\r\n"
        );
        // From a trusted proxy, its X-Forwarded-For is extended.
        let out = UpstreamHead { peer_trusted: true, ..out };
        let mut buf = Vec::new();
        out.write(&route.upstreams[0], RequestFraming::None, &mut buf);
        assert!(String::from_utf8(buf).unwrap().contains("\r\nx-forwarded-for: 6.6.6.6, 10.0.0.9\r\n"));
    }

    #[test]
    fn ip_text_is_the_display_form() {
        for ip in ["127.0.0.1", "::1", "2001:db8::ffff:1:2:3", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"] {
            let t = IpText::new(ip.parse().unwrap());
            assert_eq!(std::str::from_utf8(t.as_bytes()).unwrap(), ip.parse::<IpAddr>().unwrap().to_string());
        }
    }
}
