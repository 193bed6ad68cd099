//! The request head as the request path reads it, whichever protocol carried it: keygate's own
//! HTTP/1.1 server hands over the fields it parsed in place, HTTP/2 (hyper) the fields of its
//! header map. The fields the checks need (Host, Authorization, Content-Length, …) are found in
//! one pass when the head is built, so no check scans the fields again.

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
        }
        k
    }
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
}
