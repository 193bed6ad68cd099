//! The request head as the request path reads it, whichever protocol carried it: keygate's own
//! HTTP/1.1 server hands over the fields it parsed in place, HTTP/2 (hyper) the fields of its
//! header map. The fields the checks need (Host, Authorization, Content-Length, …) are found in
//! one pass when the head is built, so no check scans the fields again. Also what becomes of a
//! field on its way upstream, by its name ([`classify_name`]), including the spellings that
//! upstream frameworks fold together ([`fold`]), and the names `Connection` lists.

use http::{HeaderMap, HeaderName, Method, Version};

/// One header field as received: the name as the client spelled it, the value's bytes.
pub type Field<'a> = httparse::Header<'a>;

/// Where the fields the request path reads are, found in one pass ([`Known::classify`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Known {
    pub host: Option<u16>,
    pub hosts: u8,
    pub authorization: Option<u16>,
    /// The configured API-key header (`gateway.api_key_header`).
    pub api_key: Option<u16>,
    pub origin: Option<u16>,
    pub access_control_request_method: bool,
    pub content_length: Option<u16>,
    pub content_lengths: u8,
    pub transfer_encoding: Option<u16>,
    pub transfer_encodings: u8,
    pub connection: bool,
    pub upgrade: bool,
    pub expect_continue: bool,
    pub forwarded_for: bool,
    pub user_agent: Option<u16>,
    /// Some name needs [`fold`]ing to be compared (it holds `_`, a run of `-`, or a `-` at an
    /// end): only then do the stripping rules look at folded names.
    pub odd_names: bool,
    /// Some name folds to `content-length` or `transfer-encoding` without being spelled so
    /// (`Content_Length`, `Transfer--Encoding`): refused, since an upstream may read it as one.
    pub framing_lookalike: bool,
}

impl Known {
    /// One pass over the fields. `api_key` is the configured API-key header, if any. Names are
    /// told apart by length first, so most fields cost one comparison.
    pub fn classify(fields: &[Field<'_>], api_key: Option<&HeaderName>) -> Self {
        let mut k = Known::default();
        let key = api_key.map(|h| h.as_str().as_bytes());
        for (i, f) in fields.iter().enumerate() {
            let at = u16::try_from(i).ok();
            let name = f.name.as_bytes();
            let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
            match name.len() {
                4 if is("host") => {
                    k.hosts = k.hosts.saturating_add(1);
                    k.host = k.host.or(at);
                }
                6 if is("origin") => k.origin = k.origin.or(at),
                6 if is("expect") => k.expect_continue |= f.value.eq_ignore_ascii_case(b"100-continue"),
                7 if is("upgrade") => k.upgrade = true,
                10 if is("connection") => k.connection = true,
                10 if is("user-agent") => k.user_agent = k.user_agent.or(at),
                13 if is("authorization") => k.authorization = k.authorization.or(at),
                14 if is("content-length") => {
                    k.content_lengths = k.content_lengths.saturating_add(1);
                    k.content_length = k.content_length.or(at);
                }
                15 if is("x-forwarded-for") => k.forwarded_for = true,
                17 if is("transfer-encoding") => {
                    k.transfer_encodings = k.transfer_encodings.saturating_add(1);
                    k.transfer_encoding = k.transfer_encoding.or(at);
                }
                29 if is("access-control-request-method") => k.access_control_request_method = true,
                _ => {}
            }
            if key.is_some_and(|key| name.eq_ignore_ascii_case(key)) {
                k.api_key = k.api_key.or(at);
            }
            if needs_fold(name) {
                k.odd_names = true;
                let mut buf = [0u8; FOLD_LEN];
                let folded = fold(name, &mut buf);
                k.framing_lookalike |= folded == b"content-length" || folded == b"transfer-encoding";
            }
        }
        k
    }
}

/// How much of a folded name is kept: more than the longest name compared whole, and enough for
/// the prefixes compared.
pub const FOLD_LEN: usize = 64;

/// Whether `name` reads differently once folded: it holds `_`, a run of `-`, or a `-` at either
/// end. One pass, no early exit for the common names.
pub fn needs_fold(name: &[u8]) -> bool {
    let mut prev = b'-';
    let mut odd = false;
    for &b in name {
        odd |= b == b'_' || (b == b'-' && prev == b'-');
        prev = b;
    }
    odd || prev == b'-'
}

/// A header name as upstream frameworks may read it: CGI, WSGI, Rack and PHP turn `-` into `_`
/// (`HTTP_CONTENT_LENGTH`), so `Content_Length` and `Content-Length` arrive as one name, and some
/// collapse or trim separators too. The folded form is lowercase, with `_` as `-`, runs of `-`
/// as one, and no `-` at either end; keygate classifies a name by it so that no spelling of a
/// field it strips or refuses gets through as another field (the first [`FOLD_LEN`] bytes are
/// kept: enough to compare every name keygate knows and its prefixes).
pub fn fold<'b>(name: &[u8], buf: &'b mut [u8; FOLD_LEN]) -> &'b [u8] {
    let mut n = 0;
    let mut dash = false;
    for &b in name {
        if b == b'-' || b == b'_' {
            dash = n > 0;
            continue;
        }
        if dash {
            if let Some(slot) = buf.get_mut(n) {
                *slot = b'-';
            }
            n += 1;
            dash = false;
        }
        if let Some(slot) = buf.get_mut(n) {
            *slot = b.to_ascii_lowercase();
        }
        n += 1;
    }
    buf.get(..n.min(FOLD_LEN)).unwrap_or_default()
}

/// What becomes of a client's header field on its way upstream, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameClass {
    /// It passes (unless `Connection` names it, or it carries the credential).
    Passes,
    /// Never forwarded as the client sent it: hop-by-hop fields (RFC 9110 §7.6.1) and
    /// `HTTP2-Settings`, the framing (the body is framed again), `Host` (the upstream's authority is sent), `Expect` (answered
    /// here), keygate's identity fields (`X-Keygate` and every `X-Keygate-*`), the fields keygate writes itself
    /// (`X-Forwarded-For`, `-Proto`, `-Host`, `Forwarded`, `X-Real-IP`), and the fields that make
    /// frameworks act on another URL or method than the one the route and scope checks saw
    /// (`X-Original-URL`, `X-Rewrite-URL`, `X-HTTP-Method-Override`, `X-HTTP-Method`,
    /// `X-Method-Override`).
    Stripped,
    /// Another `X-Forwarded-*` field (`-Port`, `-Prefix`, …): what a proxy asserts, so it passes
    /// only from a trusted proxy.
    FromTrustedProxy,
}

/// The class of a header name, compared without regard to ASCII case: by length first, so most
/// names cost one comparison, then by the `X-Forwarded-` and `X-Keygate-` prefixes. Names that
/// need [`fold`]ing are classified by their folded form.
pub fn classify_name(name: &[u8]) -> NameClass {
    let n = name.len();
    let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
    let stripped = match n {
        2 => is(b"te"),
        4 => is(b"host"),
        6 => is(b"expect"),
        7 => is(b"trailer") || is(b"upgrade"),
        9 => is(b"forwarded") || is(b"x-real-ip") || is(b"x-keygate"),
        10 => is(b"connection") || is(b"keep-alive"),
        13 => is(b"x-http-method") || is(b"x-rewrite-url"),
        // `HTTP2-Settings` belongs to an h2c upgrade, which keygate refuses (RFC 9113 §3.1
        // removed it): connection-specific even when `Connection` does not name it.
        14 => is(b"content-length") || is(b"x-original-url") || is(b"http2-settings"),
        15 => is(b"x-forwarded-for"),
        16 => is(b"proxy-connection") || is(b"x-forwarded-host"),
        17 => is(b"transfer-encoding") || is(b"x-forwarded-proto") || is(b"x-method-override"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        22 => is(b"x-http-method-override"),
        _ => false,
    };
    let prefix = |p: &[u8]| name.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    if stripped || (n >= 10 && prefix(b"x-keygate-")) {
        NameClass::Stripped
    } else if n > 12 && prefix(b"x-forwarded-") {
        NameClass::FromTrustedProxy
    } else {
        NameClass::Passes
    }
}

/// The field names `Connection` headers list (RFC 9110 §7.6.1), however many: the first
/// [`ConnectionNames::KEPT`] are kept at hand, and beyond them the fields are read again.
pub struct ConnectionNames<'a> {
    kept: [&'a [u8]; ConnectionNames::KEPT],
    n: usize,
    /// There were more than `KEPT`.
    more: bool,
    fields: &'a [Field<'a>],
    /// Names are compared in their [`fold`]ed form.
    pub folded: bool,
}

impl<'a> ConnectionNames<'a> {
    const KEPT: usize = 16;

    /// The names listed in the `Connection` fields among `fields`.
    pub fn new(fields: &'a [Field<'a>]) -> Self {
        let mut c = Self { kept: [b""; Self::KEPT], n: 0, more: false, fields, folded: false };
        for t in Self::tokens(fields) {
            match c.kept.get_mut(c.n) {
                Some(slot) => {
                    *slot = t;
                    c.n += 1;
                }
                None => c.more = true,
            }
        }
        c
    }

    fn tokens(fields: &'a [Field<'a>]) -> impl Iterator<Item = &'a [u8]> {
        fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("connection"))
            .flat_map(|f| f.value.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
    }

    /// Whether `name` (folded, if these names are compared folded) is listed.
    pub fn lists(&self, name: &[u8]) -> bool {
        let same = |t: &[u8]| {
            if self.folded {
                let mut buf = [0u8; FOLD_LEN];
                fold(t, &mut buf) == name
            } else {
                t.eq_ignore_ascii_case(name)
            }
        };
        let kept = self.kept.get(..self.n).unwrap_or_default();
        kept.iter().any(|t| same(t)) || (self.more && Self::tokens(self.fields).skip(Self::KEPT).any(same))
    }

    /// Whether a listed name needs folding to be compared.
    pub fn any_odd(&self) -> bool {
        self.kept.get(..self.n).unwrap_or_default().iter().any(|t| needs_fold(t))
            || (self.more && Self::tokens(self.fields).any(needs_fold))
    }
}

/// A header field as a route's header condition reads it ([`ReqHead::routing_header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldRead<'a> {
    Absent,
    /// Sent once: its value, without surrounding white space.
    One(&'a [u8]),
    /// Sent more than once: which one an upstream reads is its own choice.
    Many,
}

/// A request head: method, target, version and fields.
#[derive(Debug)]
pub struct ReqHead<'a> {
    pub method: Method,
    /// The path as sent (not normalized), without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub version: Version,
    /// The authority of an absolute-form target (HTTP/1.1) or of `:authority` (HTTP/2).
    pub authority: Option<&'a str>,
    pub fields: &'a [Field<'a>],
    pub known: Known,
}

impl<'a> ReqHead<'a> {
    /// The value of the field at `at` (a position from [`Known`]).
    pub fn at(&self, at: Option<u16>) -> Option<&'a [u8]> {
        self.fields.get(usize::from(at?)).map(|f| f.value)
    }

    /// Whether this is a gRPC call (`content-type: application/grpc`, `application/grpc+proto`,
    /// …): its refusals are gRPC statuses. Read only on the refusal path.
    pub fn is_grpc(&self) -> bool {
        self.all("content-type").next().is_some_and(|v| {
            let v = v.trim_ascii_start();
            v.len() >= 16
                && v[..16].eq_ignore_ascii_case(b"application/grpc")
                && v.get(16).is_none_or(|b| matches!(b, b'+' | b';' | b' ' | b'-'))
        })
    }

    /// Every value of the fields named `name` (lowercase), in order.
    pub fn all(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields.iter().filter(move |f| f.name.eq_ignore_ascii_case(name)).map(|f| f.value)
    }

    /// The host the request is for, without a port: the target's authority, else `Host`. Route
    /// hosts are compared with it ignoring ASCII case.
    pub fn host(&self) -> Option<&'a str> {
        let raw = match self.authority {
            Some(a) => a,
            None => std::str::from_utf8(self.at(self.known.host)?).ok()?,
        };
        Some(match rsplit_once_ascii(raw, b':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => raw,
        })
    }

    /// The field `name` (lowercase) as a route's header condition reads it.
    pub fn routing_header(&self, name: &str) -> FieldRead<'a> {
        let mut found = self.fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (None, _) => FieldRead::Absent,
            (Some(f), None) => FieldRead::One(f.value.trim_ascii()),
            (Some(_), Some(_)) => FieldRead::Many,
        }
    }

    /// Whether the client wants the connection kept after this request (RFC 9112 §9.3).
    pub fn keep_alive(&self) -> bool {
        let mut close = false;
        let mut keep = false;
        if self.known.connection {
            for v in self.all("connection") {
                for token in v.split(|b| *b == b',') {
                    let t = token.trim_ascii();
                    close |= t.eq_ignore_ascii_case(b"close");
                    keep |= t.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        if close {
            return false;
        }
        self.version == Version::HTTP_11 || keep
    }
}

/// The fields of a header map as [`Field`]s (HTTP/2 requests, served by hyper).
pub fn fields_of(map: &HeaderMap) -> Vec<Field<'_>> {
    map.iter().map(|(k, v)| Field { name: k.as_str(), value: v.as_bytes() }).collect()
}

/// Splits a request target into path and query.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match split_once_ascii(target, b'?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    }
}

/// `s.split_once(c)` for an ASCII `c`, as a plain byte search: `str`'s generic searcher costs
/// more than the whole search on the short strings of a request head.
pub fn split_once_ascii(s: &str, c: u8) -> Option<(&str, &str)> {
    let i = s.as_bytes().iter().position(|b| *b == c)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// `s.rsplit_once(c)` for an ASCII `c` (see [`split_once_ascii`]).
pub fn rsplit_once_ascii(s: &str, c: u8) -> Option<(&str, &str)> {
    let i = s.as_bytes().iter().rposition(|b| *b == c)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
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

/// Whether `v` may be written as a field value (RFC 9110 §5.5): visible characters, spaces,
/// horizontal tabs and obs-text (bytes from 0x80), and no other control byte. A CR or LF in a
/// value would end the field there and let the rest be read as more fields, or a second message
/// (RFC 9112 §2.2); a NUL makes parsers disagree. The loop has no early exit, so it compiles to
/// a vector loop: every value of every head keygate writes passes through it.
pub fn is_field_value(v: &[u8]) -> bool {
    !v.iter().fold(false, |bad, &b| bad | ((b < 0x20) & (b != b'\t')) | (b == 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f<'a>(name: &'a str, value: &'a str) -> Field<'a> {
        Field { name, value: value.as_bytes() }
    }

    #[test]
    fn one_pass_finds_what_the_checks_read() {
        let fields = [
            f("Host", "API.example:8080"),
            f("HOST", "other"),
            f("Authorization", "Bearer x"),
            f("X-Api-Key", "k"),
            f("Content-Length", "3"),
            f("Connection", "close, x-hop"),
            f("Expect", "100-Continue"),
            f("a-very-long-header-name-that-is-longer-than-thirty-two-bytes", "v"),
        ];
        let key = HeaderName::from_static("x-api-key");
        let k = Known::classify(&fields, Some(&key));
        assert_eq!((k.host, k.hosts), (Some(0), 2));
        assert_eq!(k.authorization, Some(2));
        assert_eq!(k.api_key, Some(3));
        assert_eq!((k.content_length, k.content_lengths), (Some(4), 1));
        assert!(k.connection && k.expect_continue && !k.upgrade);
        let head = ReqHead {
            method: Method::GET,
            path: "/",
            query: None,
            version: Version::HTTP_11,
            authority: None,
            fields: &fields,
            known: k,
        };
        assert_eq!(head.host(), Some("API.example"));
        assert!(!head.keep_alive(), "Connection: close");
        assert_eq!(head.all("connection").count(), 1);
    }

    #[test]
    fn names_classify_in_any_case_and_any_spelling_a_framework_folds() {
        let class = |n: &str| {
            let mut buf = [0u8; FOLD_LEN];
            let canon = if needs_fold(n.as_bytes()) { fold(n.as_bytes(), &mut buf) } else { n.as_bytes() };
            classify_name(canon)
        };
        for n in [
            "TE",
            "Host",
            "expect",
            "Trailer",
            "Upgrade",
            "Connection",
            "Keep-Alive",
            "content-length",
            "X-Forwarded-For",
            "Proxy-Connection",
            "x-forwarded-host",
            "Transfer-Encoding",
            "x-forwarded-proto",
            "proxy-authenticate",
            "Proxy-Authorization",
            "Forwarded",
            "X-Real-IP",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
            // Every X-Keygate-* field, not only the ones keygate writes today.
            "x-keygate-app-id",
            "X-Keygate-Scopes",
            "X-Keygate-Token-Id",
            "X-Keygate-Subject",
            "x-keygate-",
            "X-Keygate",
            "X-Keygate-Workspace-Id",
            // Near-spellings.
            "X_Keygate_Subject",
            "x-keygate--subject",
            "X__Forwarded__For",
            "Proxy_Authorization",
            "keep_alive",
            "-Host-",
            "x_real_ip",
            "X-Original_URL",
            "x_http_method_override",
            // An h2c upgrade's settings (RFC 9113 §3.1), in any spelling.
            "HTTP2-Settings",
            "http2_settings",
        ] {
            assert_eq!(class(n), NameClass::Stripped, "{n}");
        }
        for n in ["X-Forwarded-Port", "x-forwarded-prefix", "X_Forwarded_Port", "x-forwarded-ssl"] {
            assert_eq!(class(n), NameClass::FromTrustedProxy, "{n}");
        }
        for n in
            ["accept", "x-custom", "authorization", "content-type", "x-keygatex", "xkeygate-a", "tea", "x-forwarded"]
        {
            assert_eq!(class(n), NameClass::Passes, "{n}");
        }
    }

    #[test]
    fn folding_is_case_separators_and_runs() {
        let folded = |n: &str| {
            let mut buf = [0u8; FOLD_LEN];
            String::from_utf8(fold(n.as_bytes(), &mut buf).to_vec()).unwrap()
        };
        assert_eq!(folded("Content_Length"), "content-length");
        assert_eq!(folded("TRANSFER__ENCODING"), "transfer-encoding");
        assert_eq!(folded("-_Content-_-Length_"), "content-length");
        assert_eq!(folded("x"), "x");
        assert_eq!(folded("__"), "");
        assert_eq!(folded(&"a-".repeat(100)).len(), FOLD_LEN, "long names keep their prefix");
        for plain in ["host", "content-length", "x-a-b", "a"] {
            assert!(!needs_fold(plain.as_bytes()), "{plain}");
        }
        for odd in ["x_a", "x--a", "-x", "x-", "_", "a__b"] {
            assert!(needs_fold(odd.as_bytes()), "{odd}");
        }
        let fields = [f("Content_Length", "3"), f("x-a", "1")];
        assert!(Known::classify(&fields, None).framing_lookalike);
        let fields = [f("Transfer--Encoding", "chunked")];
        assert!(Known::classify(&fields, None).framing_lookalike);
        let fields = [f("X_Forwarded_For", "1.2.3.4"), f("content-length", "3")];
        let k = Known::classify(&fields, None);
        assert!(k.odd_names && !k.framing_lookalike);
        assert!(!Known::classify(&[f("x-a", "1"), f("Content-Length", "1")], None).odd_names);
    }

    #[test]
    fn connection_names_any_number_of_fields() {
        let names: Vec<String> = (0..40).map(|i| format!("x-hop-{i}")).collect();
        let first = names[..25].join(", ");
        let second = names[25..].join(",");
        let fields = [f("Connection", &first), f("connection", &second)];
        let listed = ConnectionNames::new(&fields);
        for n in &names {
            assert!(listed.lists(n.as_bytes()), "{n}");
            assert!(listed.lists(n.to_ascii_uppercase().as_bytes()), "{n}");
        }
        assert!(!listed.lists(b"x-hop-40") && !listed.lists(b"x-hop"));
        assert!(!listed.any_odd());
        let fields = [f("Connection", "close, X_Secret")];
        let mut listed = ConnectionNames::new(&fields);
        assert!(listed.any_odd());
        listed.folded = true;
        assert!(listed.lists(b"x-secret"));
    }

    #[test]
    fn the_host_is_named_without_its_port() {
        for (authority, host) in [
            ("api.example:8080", "api.example"),
            ("api.example", "api.example"),
            ("api.example:", "api.example"),
            ("[::1]:443", "[::1]"),
            ("[::1]", "[::1]"),
            ("api.example:x1", "api.example:x1"),
        ] {
            let head = ReqHead {
                method: Method::GET,
                path: "/",
                query: None,
                version: Version::HTTP_11,
                authority: Some(authority),
                fields: &[],
                known: Known::default(),
            };
            assert_eq!(head.host(), Some(host), "{authority}");
        }
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let ka = [f("connection", "Keep-Alive")];
        let none: [Field<'_>; 0] = [];
        let head = |version, fields: &'static [Field<'static>]| ReqHead {
            method: Method::GET,
            path: "/",
            query: None,
            version,
            authority: None,
            fields,
            known: Known::classify(fields, None),
        };
        let ka: &'static [Field<'static>] = Box::leak(Box::new(ka));
        let none: &'static [Field<'static>] = Box::leak(Box::new(none));
        assert!(head(Version::HTTP_11, none).keep_alive());
        assert!(!head(Version::HTTP_10, none).keep_alive());
        assert!(head(Version::HTTP_10, ka).keep_alive());
    }

    #[test]
    fn ascii_splits_agree_with_str_splits() {
        for s in ["", "?", "a?b?c", "/p", "é?ü", "x:1:2", "Bearer  tok"] {
            for c in [b'?', b':', b' '] {
                assert_eq!(split_once_ascii(s, c), s.split_once(char::from(c)), "{s:?} {c}");
                assert_eq!(rsplit_once_ascii(s, c), s.rsplit_once(char::from(c)), "{s:?} {c}");
            }
        }
    }

    #[test]
    fn targets_split() {
        assert_eq!(split_target("/a?b=1"), ("/a", Some("b=1")));
        assert_eq!(split_target("/a"), ("/a", None));
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
}
