//! The per-request context ([`RequestCtx`]): what a front end knows of a request when it hands
//! it to the phases (the route table it runs against, the connection, the parsed head, when it
//! began), and what the phases learn on the way (the normalized path, the route, the caller, the
//! headers every answer on the route carries). One is made per request by [`crate::h1`] or
//! [`crate::h2`] and passed `&mut` through [`crate::phase`]'s admit, forward and record, in that
//! order. Also here: who the caller is ([`Caller`]), and the readings of the head that say where
//! the request came from (the client's address behind trusted proxies, the scheme and host it
//! asked for), which more than one phase needs.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::Method;
use ipnet::IpNet;
use keygate_core::Timestamp;
use keygate_core::scope::Scope;
use keygate_core::token_format::PUBLIC_ID_LEN;

use crate::answer::AnswerExtra;
use crate::gateway::Table;
use crate::head::{self, ReqHead};
use crate::index::IndexedToken;
use crate::jwt::JwtIdentity;
use crate::routes::Route;

/// One request on its way through the phases.
pub(crate) struct RequestCtx<'a, 'h> {
    /// The route table this request runs against (a reload during the request does not change it).
    pub(crate) table: &'a Arc<Table>,
    pub(crate) conn: ConnInfo,
    pub(crate) head: &'a ReqHead<'h>,
    /// When the request began (its first bytes were read), for the latency metered.
    pub(crate) start: Instant,
    /// The time its checks run at (expiry, limits, DPoP).
    pub(crate) now: Timestamp,
    /// The path as normalized by admit (RFC 3986 §6.2.2); the path as sent until then.
    pub(crate) path: Cow<'h, str>,
    /// The route, once admit found it.
    pub(crate) route: Option<&'a Route>,
    /// Who sent it, once admit knows.
    pub(crate) caller: Option<Caller>,
    /// A token refused because it is suspended or expired (or rotated away), when the watch is
    /// on: its refusals count for it in anomaly detection.
    pub(crate) stopped: Option<Arc<crate::index::IndexedToken>>,
    /// Headers every answer on the route carries, whoever answers (limits, CORS, a DPoP nonce).
    pub(crate) extra: AnswerExtra,
}

impl<'a, 'h> RequestCtx<'a, 'h> {
    pub(crate) fn new(
        table: &'a Arc<Table>,
        conn: ConnInfo,
        head: &'a ReqHead<'h>,
        start: Instant,
        now: Timestamp,
    ) -> Self {
        Self {
            table,
            conn,
            head,
            start,
            now,
            path: Cow::Borrowed(head.path),
            route: None,
            caller: None,
            stopped: None,
            extra: AnswerExtra::default(),
        }
    }
}

/// Method and path, for the access log.
pub(crate) struct RequestLine {
    pub(crate) method: Method,
    pub(crate) path: String,
}

/// How a request ended, for metering.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// The connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The remote address as text, formatted once per connection (`X-Forwarded-For`).
    pub(crate) ip_text: IpText,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, tls: bool) -> Self {
        Self { remote, tls, ip_text: IpText::new(remote.ip()) }
    }
}

/// An IP address as text, without a heap allocation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IpText {
    buf: [u8; 46],
    len: u8,
}

impl IpText {
    pub(crate) fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; 46];
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cur, "{ip}");
        let len = u8::try_from(cur.position()).unwrap_or(0);
        Self { buf, len }
    }
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.buf.get(..usize::from(self.len)).unwrap_or_default()
    }
}

pub(crate) fn is_trusted(trusted: &[IpNet], ip: &IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// The client's address: the socket's, or — when the socket is a trusted proxy — the nearest
/// untrusted hop of `X-Forwarded-For`, read from the right. Each entry is an address, with or
/// without a port (`203.0.113.7:5555`, `[2001:db8::1]:443`, `[2001:db8::1]`, `2001:db8::1`).
/// An entry that is not one of these ends the walk where it is: the address is then the
/// trusted hop that passed it on, never one further left, where the client writes.
pub(crate) fn client_ip(remote: SocketAddr, head: &ReqHead<'_>, trusted: &[IpNet]) -> IpAddr {
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
pub(crate) fn origin<'h>(head: &ReqHead<'h>, conn: &ConnInfo, peer_trusted: bool) -> (&'static str, Option<&'h [u8]>) {
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
    pub(crate) fn has_scope(&self, s: &Scope) -> bool {
        match &self.who {
            Identity::Key(t) => t.has_scope(s),
            Identity::Jwt(j) => j.has_scope(s) && self.subject.as_ref().is_none_or(|t| t.has_scope(s)),
        }
    }
    pub(crate) fn dpop_jkt(&self) -> Option<&str> {
        match &self.who {
            Identity::Key(t) => t.dpop_jkt(),
            Identity::Jwt(j) => self.subject.as_ref().and_then(|t| t.dpop_jkt()).or(j.jkt.as_deref()),
        }
    }
    pub(crate) fn allows_ip(&self, ip: IpAddr) -> bool {
        match &self.who {
            Identity::Key(t) => t.allows_ip(ip),
            Identity::Jwt(_) => self.subject.as_ref().is_none_or(|t| t.allows_ip(ip)),
        }
    }
    /// The API key whose own rate limit, quota and usage the request counts against.
    pub(crate) fn key(&self) -> Option<&IndexedToken> {
        match &self.who {
            Identity::Key(t) => Some(t),
            Identity::Jwt(_) => self.subject.as_deref(),
        }
    }
    /// The app the credential belongs to, if known: an API key's, the app of a JWT's client (or
    /// of the key it was exchanged from).
    pub(crate) fn app_id(&self) -> Option<&str> {
        match (&self.who, &self.subject) {
            (Identity::Key(t), _) | (Identity::Jwt(_), Some(t)) => Some(&t.app_id),
            (Identity::Jwt(j), None) => j.app_id.as_deref(),
        }
    }
    /// The key of per-caller limiter state.
    pub(crate) fn limit_key(&self) -> &[u8; PUBLIC_ID_LEN] {
        match (&self.who, &self.subject) {
            (Identity::Key(t), _) | (Identity::Jwt(_), Some(t)) => t.public_id(),
            (Identity::Jwt(j), None) => &j.limit_key,
        }
    }
    /// The workspace the credential belongs to (`None`: a JWT of an issuer with no workspace).
    pub(crate) fn workspace_id(&self) -> Option<&str> {
        match &self.who {
            Identity::Key(t) => Some(&t.workspace_id),
            Identity::Jwt(j) => j.workspace_id.as_deref(),
        }
    }
    pub(crate) fn scopes(&self) -> &[Scope] {
        match &self.who {
            Identity::Key(t) => &t.scopes,
            Identity::Jwt(j) => &j.scopes,
        }
    }
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
    fn ip_text_is_the_display_form() {
        for ip in ["127.0.0.1", "::1", "2001:db8::ffff:1:2:3", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"] {
            let t = IpText::new(ip.parse().unwrap());
            assert_eq!(std::str::from_utf8(t.as_bytes()).unwrap(), ip.parse::<IpAddr>().unwrap().to_string());
        }
    }
}
