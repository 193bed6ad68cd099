//! The route table: routes compiled from `[[routes]]`, path normalization, and matching on
//! whole path segments (host-specific routes first, then the longest prefix).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use http::Method;
use keygate_core::policy::RateLimit;
use keygate_core::scope::Scope;

use crate::config::{Balance, CorsConfig, GatewayConfig, HealthCheckConfig, RouteConfig};

/// One upstream server of a route.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port`, as dialled and sent in `Host`.
    pub authority: Arc<str>,
    /// A path prefix the upstream URL carried (`http://h/api` → `/api`), or empty.
    pub base_path: String,
    pub healthy: AtomicBool,
    /// Requests waiting for this upstream's answer; counted only where least-requests balancing
    /// reads it (a counter both workers write costs every request a cache-line transfer).
    pub in_flight: AtomicU32,
    pub counts_in_flight: bool,
    /// Consecutive failures seen by real requests and active checks.
    pub failures: AtomicU32,
    pub successes: AtomicU32,
}

impl Upstream {
    fn parse(raw: &str) -> Result<Self, String> {
        let rest = raw.strip_prefix("http://").ok_or_else(|| {
            format!("upstream {raw:?} must be an http:// URL (TLS to upstreams is not supported yet)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("upstream {raw:?} has no usable host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        authority
            .parse::<http::uri::Authority>()
            .map_err(|_| format!("upstream {raw:?} has an invalid host or port"))?;
        Ok(Self {
            authority: Arc::from(authority),
            base_path: path.trim_end_matches('/').to_owned(),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            counts_in_flight: false,
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// Where round robin goes next, per worker thread.
    static NEXT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    pub id: Arc<str>,
    /// Position in the table; indexes per-route metrics.
    pub index: usize,
    /// A stable number from the route's id (never 0), keying per-route limiter state so that a
    /// reload that reorders routes keeps each route's buckets.
    pub limiter_key: u32,
    /// Normalized prefix without a trailing slash (`""` for the root).
    pub prefix: String,
    pub host: Option<String>,
    pub upstreams: Vec<Upstream>,
    pub balance: Balance,
    pub public: bool,
    pub scopes: HashMap<Method, Scope>,
    pub default_scope: Option<Scope>,
    pub strip_prefix: bool,
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retries: u32,
    pub rate_limit: Option<RateLimit>,
    pub cors: Option<CorsConfig>,
    pub health_check: Option<HealthCheckConfig>,
    /// The built-in demo route: answered by the gateway itself.
    pub demo: bool,
    /// Upstreams get a keygate-signed identity JWT instead of the caller's credential.
    pub identity_token: bool,
    /// The protocols an `Upgrade` may name on this route, lowercase (`upgrades`).
    pub upgrades: Box<[Box<str>]>,
    /// For the developer portal: what this API is, and where its OpenAPI document is.
    pub description: Option<String>,
    pub openapi: Option<String>,
}

impl Route {
    /// The scope `method` requires on this route, if any.
    pub fn required_scope(&self, method: &Method) -> Option<&Scope> {
        self.scopes.get(method).or(self.default_scope.as_ref())
    }

    /// Picks an upstream, skipping unhealthy ones (all unhealthy: try them anyway) and any in
    /// `tried`. Round robin turns per worker thread, so the workers share no counter.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        if n == 1 {
            return tried.is_empty().then_some(0);
        }
        let candidates = |healthy_only: bool| {
            (0..n).filter(move |i| {
                !tried.contains(i) && (!healthy_only || self.upstreams.get(*i).is_some_and(Upstream::is_healthy))
            })
        };
        let pick_from = |healthy_only: bool| -> Option<usize> {
            match self.balance {
                Balance::RoundRobin => {
                    let start = NEXT.with(|c| {
                        let v = c.get();
                        c.set(v.wrapping_add(1));
                        v
                    });
                    (0..n).map(|k| (start + k) % n).find(|i| candidates(healthy_only).any(|c| c == *i))
                }
                Balance::LeastRequests => candidates(healthy_only)
                    .min_by_key(|i| self.upstreams.get(*i).map_or(u32::MAX, |u| u.in_flight.load(Ordering::Relaxed))),
            }
        };
        pick_from(true).or_else(|| pick_from(false))
    }

    /// Whether `path` (normalized) is under this route's prefix.
    fn covers(&self, path: &str) -> bool {
        self.prefix.is_empty()
            || path == self.prefix
            || (path.starts_with(&self.prefix) && path.as_bytes().get(self.prefix.len()) == Some(&b'/'))
    }

    /// The path to send upstream.
    pub fn upstream_path(&self, upstream: &Upstream, path: &str) -> String {
        let rest = if self.strip_prefix { path.get(self.prefix.len()..).unwrap_or(path) } else { path };
        let rest = if rest.is_empty() { "/" } else { rest };
        format!("{}{rest}", upstream.base_path)
    }
}

/// The demo route's path.
pub const DEMO_PATH: &str = "/demo/echo";

/// All routes, immutable once built; swapped whole on reload.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Compiles and validates routes. Errors name the route.
    pub fn build(cfgs: &[RouteConfig], gw: &GatewayConfig) -> Result<Self, String> {
        let mut routes = Vec::with_capacity(cfgs.len() + 1);
        let mut ids = std::collections::HashSet::new();
        for (index, c) in cfgs.iter().enumerate() {
            let err = |m: String| format!("route {:?}: {m}", c.id);
            if c.id.is_empty() || !c.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
                return Err(err("id must be letters, digits, - _ . (not empty)".into()));
            }
            if !ids.insert(c.id.clone()) {
                return Err(err("another route has the same id".into()));
            }
            let prefix = normalize_path(&c.path).map_err(|e| err(format!("path: {e}")))?.into_owned();
            if prefix.contains('?') {
                return Err(err("path must not contain a query".into()));
            }
            let mut raw_upstreams = c.upstreams.clone();
            if let Some(u) = &c.upstream {
                raw_upstreams.insert(0, u.clone());
            }
            if raw_upstreams.is_empty() {
                return Err(err("needs an upstream (or upstreams)".into()));
            }
            let mut upstreams =
                raw_upstreams.iter().map(|u| Upstream::parse(u)).collect::<Result<Vec<_>, _>>().map_err(err)?;
            if c.balance == Balance::LeastRequests {
                for u in &mut upstreams {
                    u.counts_in_flight = true;
                }
            }
            let mut scopes = HashMap::new();
            let mut default_scope = None;
            for (method, scope) in &c.scopes {
                let scope = Scope::parse_required(scope).map_err(|e| err(format!("scopes.{method}: {}", e.message)))?;
                if method == "*" {
                    default_scope = Some(scope);
                } else {
                    let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                        .map_err(|_| err(format!("scopes: {method:?} is not an HTTP method")))?;
                    scopes.insert(m, scope);
                }
            }
            if c.public && (!scopes.is_empty() || default_scope.is_some()) {
                return Err(err("a public route cannot require scopes".into()));
            }
            if let Some(r) = &c.rate_limit {
                r.validate().map_err(|e| err(e.message.into_owned()))?;
            }
            if let Some(cors) = &c.cors {
                cors.validate().map_err(err)?;
            }
            if let Some(h) = &c.health_check
                && (!h.path.starts_with('/') || h.interval_seconds == 0)
            {
                return Err(err("health_check.path must start with / and interval_seconds be at least 1".into()));
            }
            let upgrades = crate::config::upgrade_allowlist(&c.upgrades).map_err(err)?;
            routes.push(Arc::new(Route {
                id: Arc::from(c.id.as_str()),
                index,
                limiter_key: limiter_key(&c.id),
                prefix: if prefix == "/" { String::new() } else { prefix.trim_end_matches('/').to_owned() },
                host: c.host.as_ref().map(|h| h.to_ascii_lowercase()),
                upstreams,
                balance: c.balance,
                public: c.public,
                scopes,
                default_scope,
                strip_prefix: c.strip_prefix,
                max_body_bytes: c.max_body_bytes.unwrap_or(gw.max_body_bytes),
                connect_timeout: Duration::from_millis(c.connect_timeout_ms.unwrap_or(gw.connect_timeout_ms)),
                request_timeout: Duration::from_millis(c.request_timeout_ms.unwrap_or(gw.request_timeout_ms)),
                retries: c.retries,
                rate_limit: c.rate_limit,
                cors: c.cors.clone(),
                health_check: c.health_check.clone(),
                demo: false,
                identity_token: c.identity_token,
                upgrades,
                description: c.description.clone(),
                openapi: c.openapi.clone(),
            }));
        }
        if gw.demo {
            routes.push(Arc::new(Route {
                id: Arc::from("demo"),
                index: routes.len(),
                limiter_key: limiter_key("demo"),
                prefix: DEMO_PATH.into(),
                host: None,
                upstreams: Vec::new(),
                balance: Balance::RoundRobin,
                public: false,
                scopes: HashMap::new(),
                default_scope: None,
                strip_prefix: false,
                max_body_bytes: 64 * 1024,
                connect_timeout: Duration::ZERO,
                request_timeout: Duration::ZERO,
                retries: 0,
                rate_limit: None,
                cors: None,
                health_check: None,
                demo: true,
                identity_token: false,
                upgrades: Box::default(),
                description: Some(
                    "keygate's built-in demo: answers with the request it saw and the identity keygate attached to it"
                        .into(),
                ),
                openapi: None,
            }));
        }
        Ok(Self { routes })
    }

    /// The route for the request's host and normalized `path`: host-specific routes win, then
    /// the longest prefix; configured routes win over the demo route. `host` is asked for only
    /// when a route with a `host` covers the path (most tables have none, and finding the host
    /// means reading and checking the `Host` field).
    pub fn find<'h>(&self, host: impl FnOnce() -> Option<&'h str>, path: &str) -> Option<&Arc<Route>> {
        let mut host = Some(host);
        let mut known: Option<Option<&'h str>> = None;
        let mut best: Option<&Arc<Route>> = None;
        let rank = |r: &Route| (r.host.is_some(), !r.demo, r.prefix.len());
        for r in &self.routes {
            if !r.covers(path) {
                continue;
            }
            if let Some(want) = r.host.as_deref() {
                let got = *known.get_or_insert_with(|| host.take().and_then(|f| f()));
                if !got.is_some_and(|h| h.eq_ignore_ascii_case(want)) {
                    continue;
                }
            }
            // The last of equal rank wins, as with `Iterator::max_by_key`.
            if best.is_none_or(|b| rank(r) >= rank(b)) {
                best = Some(r);
            }
        }
        best
    }
}

/// FNV-1a of the route id, never 0 (0 keys a token's own limit).
fn limiter_key(id: &str) -> u32 {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h.max(1)
}

/// Why a path cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    /// `%00`, a backslash, or a malformed `%` escape.
    Forbidden,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path must start with /",
            Self::Forbidden => "the path holds a NUL, a backslash or a malformed % escape",
        })
    }
}

/// Normalizes a request path (without its query) so that a scope check cannot be bypassed by
/// spelling: `%2e`/`%2E` and `%2f`/`%2F` are decoded, empty segments (`//`) and `.` are
/// dropped, `..` removes the previous segment (never above the root). Other `%` escapes stay as
/// they are. A trailing slash is kept. A path that is already normal (the usual case) is
/// returned as it is, without a copy.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw.as_bytes()) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut decoded = String::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                // Exactly two hex digits (RFC 3986 §2.1); `u8::from_str_radix` would also take a
                // sign before one digit (`%+2`), which the fuzz target `path` found.
                let (hi, lo) = match bytes.get(i + 1..i + 3) {
                    Some(&[hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => (hi, lo),
                    _ => return Err(PathError::Forbidden),
                };
                match hex_value(hi) << 4 | hex_value(lo) {
                    b'.' => decoded.push('.'),
                    b'/' => decoded.push('/'),
                    0 | b'\\' => return Err(PathError::Forbidden),
                    _ => {
                        decoded.push('%');
                        decoded.push(char::from(hi));
                        decoded.push(char::from(lo));
                    }
                }
                i += 3;
            }
            b'\\' | 0 => return Err(PathError::Forbidden),
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // Bytes above 0x7f were pushed one by one as chars above: rebuild from the raw bytes instead.
    if !raw.is_ascii() {
        return Err(PathError::Forbidden);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (trailing && !out.is_empty()) {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

/// The value of an ASCII hex digit (0 for any other byte; callers check `is_ascii_hexdigit`).
fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

/// Whether `raw` (which starts with `/`) is already what [`normalize_path`] would make of it:
/// ASCII without `%`, a backslash or NUL, and no empty, `.` or `..` segment (a trailing slash is fine).
fn is_normal(raw: &[u8]) -> bool {
    let mut seg_start = 1;
    for i in 1..=raw.len() {
        match raw.get(i) {
            None | Some(b'/') => {
                let seg = raw.get(seg_start..i).unwrap_or_default();
                let last = i == raw.len();
                if (seg.is_empty() && !last) || seg == b"." || seg == b".." {
                    return false;
                }
                seg_start = i + 1;
            }
            Some(b'%' | b'\\' | 0 | 0x80..=0xff) => return false,
            Some(_) => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize() {
        for (raw, want) in [
            ("/", "/"),
            ("/orders", "/orders"),
            ("/orders/", "/orders/"),
            ("/a/../b", "/b"),
            ("//admin", "/admin"),
            ("/orders/%2e%2e/admin", "/admin"),
            ("/orders/%2E%2E/admin", "/admin"),
            ("/orders%2F..%2Fadmin", "/admin"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/./b//c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/x%20y", "/x%20y"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        for bad in ["orders", "", "/a%00b", "/a\\b", "/a%5cb", "/a%zz", "/a%2", "/é"] {
            assert!(normalize_path(bad).is_err(), "{bad}");
        }
        for already in ["/", "/orders", "/orders/", "/a/b.c/..d/.e"] {
            assert!(matches!(normalize_path(already), Ok(Cow::Borrowed(_))), "{already}");
        }
        for changed in ["//a", "/a//b", "/a/./b", "/a/..", "/.", "/a%41"] {
            assert!(!is_normal(changed.as_bytes()), "{changed}");
        }
    }

    #[test]
    fn an_escape_is_a_percent_and_two_hex_digits() {
        // Found by the `path` fuzz target (fuzz/corpus/path/regression-plus-escape): a `+` or `-`
        // before one hex digit passed as an escape (`u8::from_str_radix` takes a sign), so
        // `%+2` stayed in the normalized path, spelled in a way no upstream decodes alike.
        for bad in ["/a/%+2e", "/a%+f", "/a%-1", "/a%+0", "/a% f"] {
            assert_eq!(normalize_path(bad), Err(PathError::Forbidden), "{bad}");
        }
    }

    fn route(id: &str, path: &str, host: Option<&str>) -> RouteConfig {
        RouteConfig { host: host.map(Into::into), ..RouteConfig::new(id, path, "http://127.0.0.1:9") }
    }

    #[test]
    fn matching_is_on_whole_segments_longest_prefix_host_first() {
        let gw = GatewayConfig::default();
        let t = RouteTable::build(
            &[
                route("orders", "/orders", None),
                route("admin", "/orders/admin", None),
                route("b2b", "/orders", Some("b2b.example")),
            ],
            &gw,
        )
        .unwrap();
        let id = |host: Option<&str>, p: &str| t.find(|| host, p).map(|r| r.id.to_string());
        assert_eq!(id(None, "/orders"), Some("orders".into()));
        assert_eq!(id(None, "/orders/7"), Some("orders".into()));
        assert_eq!(id(None, "/orders-old"), None);
        assert_eq!(id(None, "/orders/admin/x"), Some("admin".into()));
        assert_eq!(id(Some("b2b.example"), "/orders/7"), Some("b2b".into()));
        assert_eq!(id(Some("B2B.example"), "/orders/7"), Some("b2b".into()), "hosts compare ignoring case");
        assert_eq!(id(Some("other.example"), "/orders/7"), Some("orders".into()));
        assert_eq!(id(None, "/demo/echo"), Some("demo".into()));
        let asked = std::cell::Cell::new(0);
        let ask = || {
            asked.set(asked.get() + 1);
            Some("b2b.example")
        };
        assert_eq!(t.find(ask, "/demo/echo").map(|r| &*r.id), Some("demo"));
        assert_eq!(asked.get(), 0, "no route with a host covers the path: the host is not read");
        assert_eq!(t.find(ask, "/orders/admin/1").map(|r| &*r.id), Some("b2b"), "a host route wins");
        assert_eq!(asked.get(), 1);
    }

    #[test]
    fn invalid_routes_are_named() {
        let gw = GatewayConfig::default();
        let mut r = route("x", "/x", None);
        r.upstream = Some("ftp://a".into());
        assert!(RouteTable::build(&[r], &gw).unwrap_err().contains("\"x\""));
        let mut r = route("y", "/y", None);
        r.scopes.insert("GET".into(), "orders:*".into());
        assert!(RouteTable::build(&[r], &gw).is_err());
        assert!(RouteTable::build(&[route("d", "/a", None), route("d", "/b", None)], &gw).is_err());
        let mut r = route("p", "/p", None);
        r.public = true;
        r.scopes.insert("*".into(), "a:b".into());
        assert!(RouteTable::build(&[r], &gw).is_err());
    }

    #[test]
    fn upstream_paths_and_balancing() {
        let gw = GatewayConfig::default();
        let mut c = route("o", "/orders", None);
        c.upstream = Some("http://127.0.0.1:9000/api".into());
        c.upstreams = vec!["http://127.0.0.1:9001".into()];
        c.strip_prefix = true;
        let t = RouteTable::build(&[c], &gw).unwrap();
        let r = &t.routes[0];
        assert_eq!(r.upstream_path(&r.upstreams[0], "/orders/7"), "/api/7");
        assert_eq!(r.upstream_path(&r.upstreams[1], "/orders"), "/");
        let a = r.pick(&[]).unwrap();
        let b = r.pick(&[]).unwrap();
        assert_ne!(a, b, "round robin");
        r.upstreams[1].healthy.store(false, Ordering::Relaxed);
        assert_eq!(r.pick(&[]), Some(0));
        assert_eq!(r.pick(&[0]), Some(1), "all unhealthy: still try");
    }
}
