//! The route table: routes compiled from `[[routes]]`, path normalization, and matching on
//! whole path segments (host-specific routes first, then the longest prefix).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::header::{HeaderName, HeaderValue};
use keygate_core::policy::RateLimit;
use keygate_core::scope::Scope;

use crate::config::{Balance, CorsConfig, GatewayConfig, HealthCheckConfig, RouteConfig, UpstreamProtocol};
use crate::head::FieldRead;
pub use crate::target::{Targets, Upstream};
use crate::target::{dns_name, parse_upstream_url};

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
    /// Header fields a request must have, with one of the values given (`headers`); empty: none.
    pub headers: Box<[HeaderCondition]>,
    /// One per upstream URL. On a route without DNS names these are its balancing targets;
    /// on one with names, see [`Route::targets`].
    pub upstreams: Vec<Upstream>,
    /// The upstreams named by DNS host names and the addresses they resolve to; `None` when
    /// every upstream is an IP literal (the common case, which reads no address set).
    pub dns: Option<Arc<crate::resolve::RouteDns>>,
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
    /// Client addresses refused on this route (`deny`); `None`: none.
    pub deny: Option<Arc<keygate_core::policy::AddressSet>>,
    /// For the developer portal: what this API is, and where its OpenAPI document is.
    pub description: Option<String>,
    pub openapi: Option<String>,
    /// The workspace whose credentials the route accepts (unless `shared`). `None` only in
    /// tables built without a store (`keygate config check`, tests): keygate's gateway always
    /// builds its table with every route's workspace known ([`RouteSpec`]).
    pub workspace_id: Option<Arc<str>>,
    /// Accepts the credentials of every workspace.
    pub shared: bool,
    /// Where the route is defined.
    pub source: RouteSource,
    /// The route's response cache (`[routes.cache]`), if it has one.
    pub cache: Option<Arc<crate::cache::RouteCache>>,
    /// An `ai` route's models and limits: keygate answers it itself ([`crate::ai`]).
    pub ai: Option<Arc<crate::ai::AiRoute>>,
    /// The lifecycle of the API (and version) the route serves (`api`, `version`); `None`: a
    /// route of no API, or of one its workspace does not have.
    pub lifecycle: Option<Arc<RouteLifecycle>>,
    /// Request validation against the API's OpenAPI document (`validate`, or the version's):
    /// `None`, the route does not validate.
    pub validation: Option<crate::validate::RouteValidation>,
}

/// A route's condition on one header field: sent once, with one of `values` (compared exactly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCondition {
    /// Lowercase.
    pub name: Box<str>,
    pub values: Box<[Box<str>]>,
}

/// Header fields a condition cannot name: framing and connection fields (read by keygate and
/// rewritten on the way), the host (`host` says it) and credentials (their values would sit in
/// the configuration).
const UNROUTABLE_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "authorization",
    "proxy-authorization",
    "cookie",
];
/// Header conditions per route, and values per condition, at most.
const MAX_HEADER_CONDITIONS: usize = 8;
const MAX_HEADER_VALUES: usize = 16;

fn header_conditions(raw: &BTreeMap<String, crate::config::HeaderValues>) -> Result<Box<[HeaderCondition]>, String> {
    if raw.len() > MAX_HEADER_CONDITIONS {
        return Err(format!("headers: at most {MAX_HEADER_CONDITIONS} header fields"));
    }
    let mut out: Vec<HeaderCondition> = Vec::with_capacity(raw.len());
    for (name, values) in raw {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(format!("headers: {name:?} is not a header field name"));
        }
        if UNROUTABLE_HEADERS.contains(&lower.as_str()) || lower.starts_with(':') {
            return Err(format!(
                "headers: {name:?} cannot select a route (framing, connection, host and credential fields cannot; use host for the host)"
            ));
        }
        if out.iter().any(|c| *c.name == *lower) {
            return Err(format!("headers: {name:?} is named twice (names compare ignoring case)"));
        }
        if values.0.is_empty() || values.0.len() > MAX_HEADER_VALUES {
            return Err(format!("headers.{name}: give 1 to {MAX_HEADER_VALUES} values"));
        }
        for v in &values.0 {
            // A value a field can carry whole: visible ASCII and inner spaces, not a list.
            let ok = !v.is_empty()
                && v.trim() == v
                && v.len() <= 256
                && v.bytes().all(|b| (b.is_ascii_graphic() || b == b' ') && b != b',');
            if !ok {
                return Err(format!(
                    "headers.{name}: {v:?} must be 1 to 256 visible ASCII characters, with no comma and no space at either end"
                ));
            }
        }
        out.push(HeaderCondition {
            name: lower.into(),
            values: values.0.iter().map(|v| Box::from(v.as_str())).collect(),
        });
    }
    Ok(out.into())
}

/// How a route's header conditions read a request.
enum HeaderMatch {
    Yes,
    No,
    /// A field the conditions name is sent more than once, or with a value that equals one of
    /// theirs only ignoring case: an upstream may read it otherwise than keygate.
    Ambiguous,
}

impl Route {
    fn headers_match<'h>(&self, header: &dyn Fn(&str) -> FieldRead<'h>) -> HeaderMatch {
        let mut out = HeaderMatch::Yes;
        for c in &self.headers {
            match header(&c.name) {
                FieldRead::Absent => out = HeaderMatch::No,
                FieldRead::Many => return HeaderMatch::Ambiguous,
                FieldRead::One(v) => {
                    if c.values.iter().any(|want| want.as_bytes() == v) {
                        continue;
                    }
                    if c.values.iter().any(|want| want.as_bytes().eq_ignore_ascii_case(v)) {
                        return HeaderMatch::Ambiguous;
                    }
                    out = HeaderMatch::No;
                }
            }
        }
        out
    }
}

/// What a route does because of its API's state (issue 17), worked out when the table is built
/// so that a request only reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteLifecycle {
    /// The API's name and the version's, for the portal and the refusal's message.
    pub api: String,
    pub version: Option<String>,
    /// The state the route follows: the stricter of the API's and the version's.
    pub state: keygate_core::apis::ApiState,
    pub sunset: Option<keygate_core::Timestamp>,
    pub successor: Option<String>,
    /// Answered 410 `api_retired` before any token work.
    pub retired: bool,
    /// Serves only its own workspace's credentials, and is not in the portal.
    pub draft: bool,
    /// The header fields every answer of a deprecated route carries: `Deprecation: @<seconds>`
    /// (RFC 9745 §2.1, a structured-field date), `Sunset: <IMF-fixdate>` (RFC 8594 §3) and
    /// `Link: <successor>; rel="successor-version"` (RFC 5829).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The apps subscribed to the route's API (or version), when any are or the API needs a
    /// subscription; `None`: an open API no app subscribed to.
    pub subscribers: Option<Arc<Subscribers>>,
}

/// A rate limit and a quota shared by all of an app's tokens (or lent by a subscription's
/// plan), and the limiter key they are kept under ([`keygate_core::limits::derived_key`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AppLimit {
    pub key: [u8; keygate_core::token_format::PUBLIC_ID_LEN],
    pub rate_limit: Option<keygate_core::policy::RateLimit>,
    pub quota: Option<keygate_core::policy::Quota>,
    /// What all of the app's keys may spend on LLM calls together, over every ai route (an
    /// app's own; a subscription lends none).
    pub llm_budget: Option<keygate_core::llm::LlmBudget>,
}

/// The apps with an active subscription to a route's API (or its version), and whether the
/// route admits only them ([`keygate_core::subscriptions::ApiAccess`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Subscribers {
    /// The API needs a subscription: other apps' tokens are refused `subscription_required`.
    pub required: bool,
    /// By app id: the limits of the subscription's plan, shared by the app's tokens on the
    /// route's API, under the subscription's own limiter key.
    pub apps: std::collections::HashMap<Box<str>, AppLimit, foldhash::fast::RandomState>,
}

impl Subscribers {
    /// The subscription of `app`, if it holds one; `None` for a caller without an app.
    #[inline]
    pub fn of(&self, app: Option<&str>) -> Option<&AppLimit> {
        app.and_then(|a| self.apps.get(a))
    }
}

impl RouteLifecycle {
    /// The lifecycle of a route of API `api` (`version`), from the API's state. A successor that
    /// is not a valid field value (the API checks it, so never) is left out of the headers.
    pub fn new(api: &str, version: Option<&str>, l: &keygate_core::apis::Lifecycle) -> Self {
        use keygate_core::apis::ApiState;
        let state = if l.retired {
            ApiState::Retired
        } else if l.deprecated() {
            ApiState::Deprecated
        } else if l.draft {
            ApiState::Draft
        } else {
            ApiState::Published
        };
        let mut headers = Vec::new();
        if state == ApiState::Deprecated {
            if let Some(at) = l.deprecated_at
                && let Ok(v) = HeaderValue::from_str(&format!("@{}", at.as_millis().div_euclid(1000)))
            {
                headers.push((HeaderName::from_static("deprecation"), v));
            }
            if let Some(sunset) = l.sunset {
                let secs = u64::try_from(sunset.as_millis().div_euclid(1000)).unwrap_or(0);
                if let Ok(v) = HeaderValue::from_bytes(&keygate_core::clock::imf_fixdate(secs)) {
                    headers.push((HeaderName::from_static("sunset"), v));
                }
            }
            if let Some(s) = &l.successor
                && let Ok(v) = HeaderValue::from_str(&format!("<{s}>; rel=\"successor-version\""))
            {
                headers.push((http::header::LINK, v));
            }
        }
        Self {
            api: api.to_owned(),
            version: version.map(str::to_owned),
            state,
            sunset: l.sunset,
            successor: l.successor.clone(),
            retired: l.retired,
            draft: l.draft && !l.retired,
            headers,
            subscribers: None,
        }
    }

    /// The message of a retired route's 410: what it was, and what to use instead.
    pub fn retired_message(&self) -> String {
        let what = match &self.version {
            Some(v) => format!("version {v} of the API {:?}", self.api),
            None => format!("the API {:?}", self.api),
        };
        match &self.successor {
            Some(s) => format!("{what} was retired and no longer answers; use its successor, {s}"),
            None => {
                format!("{what} was retired and no longer answers; ask its provider for the version that replaces it")
            }
        }
    }
}

impl Route {
    /// Whether a credential of workspace `ws` may be used on this route.
    #[inline]
    pub fn admits_workspace(&self, ws: Option<&str>) -> bool {
        self.shared || self.workspace_id.as_deref().is_none_or(|own| ws == Some(own))
    }
}

/// Where a route is defined: the config file, or the admin API (stored, changed live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteSource {
    #[default]
    File,
    Api,
}

/// One route to compile: its config, the id of its workspace, and where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec<'a> {
    pub config: &'a RouteConfig,
    pub workspace_id: Option<&'a str>,
    pub source: RouteSource,
    /// The lifecycle of the route's API, if it names one its workspace has.
    pub lifecycle: Option<&'a RouteLifecycle>,
    /// The route validates requests (its `validate`, or its API version's): with the compiled
    /// document, or why there is none. `None` on a route that validates (tables built without
    /// a store: `keygate config check`, tests) leaves it not validating.
    pub validation: Option<&'a crate::validate::RouteValidation>,
}

impl Route {
    /// The scope `method` requires on this route, if any.
    pub fn required_scope(&self, method: &Method) -> Option<&Scope> {
        self.scopes.get(method).or(self.default_scope.as_ref())
    }

    /// The balancing targets now: the upstreams, or on a route with DNS names the addresses
    /// they resolve to (read without a lock).
    #[inline]
    pub fn targets(&self) -> Targets<'_> {
        match &self.dns {
            None => Targets::Fixed(&self.upstreams),
            Some(dns) => Targets::Resolved(dns.targets()),
        }
    }

    /// Picks a balancing target (an index into [`Route::targets`]), skipping unhealthy ones
    /// (all unhealthy: try them anyway) and any in `tried`.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        self.targets().pick(self.balance, tried)
    }

    /// Whether `path` (normalized) is under this route's prefix.
    fn covers(&self, path: &str) -> bool {
        self.prefix.is_empty()
            || path == self.prefix
            || (path.starts_with(&self.prefix) && path.as_bytes().get(self.prefix.len()) == Some(&b'/'))
    }

    /// Whether `path` is under this route's prefix when letters are compared ignoring case.
    fn covers_folded(&self, path: &str) -> bool {
        let (p, prefix) = (path.as_bytes(), self.prefix.as_bytes());
        p.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix))
            && matches!(p.get(prefix.len()), None | Some(b'/'))
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
    /// Client addresses refused on every route (`[gateway] deny`); `None`: none.
    pub deny: Option<Arc<keygate_core::policy::AddressSet>>,
}

impl RouteTable {
    /// The response caches of the cached routes, with their routes' ids.
    pub fn caches(&self) -> impl Iterator<Item = (&str, &crate::cache::RouteCache)> {
        self.routes.iter().filter_map(|r| r.cache.as_deref().map(|c| (&*r.id, c)))
    }

    /// The DNS sides of the routes that name upstreams by DNS host names
    /// ([`crate::resolve::refresh`], [`crate::resolve::render_metrics`]).
    pub fn dns(&self) -> impl Iterator<Item = &Arc<crate::resolve::RouteDns>> {
        self.routes.iter().filter_map(|r| r.dns.as_ref())
    }

    /// Before this table replaces `old`: what each route that `old` also has (by id) knew of its
    /// names ([`crate::resolve::RouteDns::carry_from`]).
    pub fn carry_dns(&self, old: &RouteTable) {
        for route in &self.routes {
            let Some(dns) = &route.dns else { continue };
            if let Some(prev) = old.routes.iter().find(|o| o.id == route.id).and_then(|o| o.dns.as_deref()) {
                dns.carry_from(prev);
            }
        }
    }

    /// Before this table replaces `old`: each cached route keeps the cache of the same route in
    /// `old` if it is defined as before ([`crate::cache::carry`]).
    pub fn carry_caches(&mut self, old: &RouteTable) {
        for r in &mut self.routes {
            let Some(route) = Arc::get_mut(r) else { continue };
            let id = route.id.clone();
            let Some(cache) = route.cache.as_mut() else { continue };
            if let Some(prev) = old.routes.iter().find(|o| o.id == id).and_then(|o| o.cache.as_ref()) {
                crate::cache::carry(cache, prev);
            }
        }
    }

    /// Compiles and validates routes of the config file, without their workspaces (see
    /// [`Route::workspace_id`]). Errors name the route.
    pub fn build(cfgs: &[RouteConfig], gw: &GatewayConfig) -> Result<Self, String> {
        let specs: Vec<RouteSpec<'_>> = cfgs
            .iter()
            .map(|config| RouteSpec {
                config,
                workspace_id: None,
                source: RouteSource::File,
                lifecycle: None,
                validation: None,
            })
            .collect();
        Self::build_specs(&specs, gw)
    }

    /// Compiles and validates routes, each with its workspace and source. Errors name the route.
    pub fn build_specs(specs: &[RouteSpec<'_>], gw: &GatewayConfig) -> Result<Self, String> {
        let mut routes = Vec::with_capacity(specs.len() + 1);
        let mut ids = std::collections::HashSet::new();
        for (index, spec) in specs.iter().enumerate() {
            let c = spec.config;
            let err = |m: String| format!("route {:?}: {m}", c.id);
            // Not dots alone: `.` and `..` are path segments a URL normalizes away (so
            // /admin/v1/routes/{id} could not name the route).
            if c.id.is_empty()
                || !c.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                || c.id.bytes().all(|b| b == b'.')
            {
                return Err(err("id must be letters, digits, - _ . (not empty, not dots alone)".into()));
            }
            if !ids.insert(c.id.clone()) {
                return Err(err("another route has the same id".into()));
            }
            let prefix = normalize_path(&c.path).map_err(|e| err(format!("path: {e}")))?.into_owned();
            if prefix.contains('?') {
                return Err(err("path must not contain a query".into()));
            }
            // Such a prefix could not be told apart from the readings `resolve` compares.
            let upper = prefix.to_ascii_uppercase();
            if prefix.contains(';') || upper.contains("%3B") || upper.contains("%25") {
                return Err(err("path must not hold ';' (path parameters), %3B or %25".into()));
            }
            let mut raw_upstreams = c.upstreams.clone();
            if let Some(u) = &c.upstream {
                raw_upstreams.insert(0, u.clone());
            }
            let ai = crate::ai::AiRoute::from_config(c).map_err(err)?.map(Arc::new);
            if ai.is_some() && !raw_upstreams.is_empty() {
                return Err(err("an ai route calls its models' providers: it takes no upstream".into()));
            }
            if ai.is_none() && raw_upstreams.is_empty() {
                return Err(err("needs an upstream (or upstreams)".into()));
            }
            if c.validate && c.api.is_none() {
                return Err(err(
                    "validate checks requests against the OpenAPI document of the route's api: give api too".into(),
                ));
            }
            if c.validate && ai.is_some() {
                return Err(err("an ai route checks its own requests: it cannot validate".into()));
            }
            // An ai route of a version that validates: its own checks apply, not the document's.
            let validation = if ai.is_some() { None } else { spec.validation.cloned() };
            let urls =
                raw_upstreams.iter().map(|u| parse_upstream_url(u)).collect::<Result<Vec<_>, _>>().map_err(err)?;
            if c.upstream_protocol == UpstreamProtocol::Auto && urls.iter().any(|u| !u.https) {
                return Err(err(
                    "upstream_protocol_auto_needs_https: upstream_protocol = \"auto\" negotiates the HTTP version by \
                     TLS ALPN, so every upstream must be https://; for HTTP/2 over http:// (h2c) use \"http2\""
                        .into(),
                ));
            }
            let tls_err = |e: crate::upstream_tls::UpstreamTlsError| err(e.to_string());
            let tls = crate::upstream_tls::RouteTls::from_config(
                c,
                urls.iter().any(|u| u.https),
                urls.iter().any(|u| !u.https),
            )
            .map_err(tls_err)?;
            let mut upstreams = urls
                .iter()
                .map(|u| Upstream::from_url(u, tls.as_ref(), c.upstream_protocol))
                .collect::<Result<Vec<_>, _>>()
                .map_err(tls_err)?;
            if c.balance == Balance::LeastRequests {
                for u in &mut upstreams {
                    u.counts_in_flight = true;
                }
            }
            if c.dns_refresh_seconds == Some(0) {
                return Err(err("dns_refresh_seconds must be at least 1".into()));
            }
            let names: Vec<Option<(String, u16)>> = urls.iter().map(dns_name).collect();
            let dns = names.iter().any(Option::is_some).then(|| {
                let refresh = Duration::from_secs(c.dns_refresh_seconds.unwrap_or(gw.dns_refresh_seconds).max(1));
                Arc::new(crate::resolve::RouteDns::new(&c.id, &upstreams, names, refresh))
            });
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
            if c.version.is_some() && c.api.is_none() {
                return Err(err("version names a version of the route's api: give api too".into()));
            }
            let upgrades = crate::config::upgrade_allowlist(&c.upgrades).map_err(err)?;
            let headers = header_conditions(&c.headers).map_err(err)?;
            let cache = crate::cache::RouteCache::for_route(c, spec.workspace_id).map_err(err)?;
            routes.push(Arc::new(Route {
                id: Arc::from(c.id.as_str()),
                index,
                limiter_key: limiter_key(&c.id),
                prefix: if prefix == "/" { String::new() } else { prefix.trim_end_matches('/').to_owned() },
                host: c.host.as_ref().map(|h| h.to_ascii_lowercase()),
                headers,
                upstreams,
                dns,
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
                deny: deny_set(&c.deny).map_err(|e| err(format!("deny: {e}")))?,
                description: c.description.clone(),
                openapi: c.openapi.clone(),
                workspace_id: spec.workspace_id.map(Arc::from),
                // A draft API's routes serve their own workspace only, shared or not.
                shared: c.shared && !spec.lifecycle.is_some_and(|l| l.draft),
                source: spec.source,
                cache,
                ai,
                lifecycle: spec.lifecycle.map(|l| Arc::new(l.clone())),
                validation,
            }));
        }
        // Two prefixes that differ only in letter case would make every request to either one
        // ambiguous (see `resolve`).
        for (i, a) in routes.iter().enumerate() {
            for b in routes.iter().skip(i + 1) {
                let same_host = match (&a.host, &b.host) {
                    (None, None) => true,
                    (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
                    _ => false,
                };
                if same_host && a.prefix != b.prefix && a.prefix.eq_ignore_ascii_case(&b.prefix) {
                    return Err(format!(
                        "routes {:?} and {:?}: paths that differ only in letter case cannot be told apart",
                        a.id, b.id
                    ));
                }
                if same_host && a.prefix == b.prefix && !a.headers.is_empty() && headers_overlap(&a.headers, &b.headers)
                {
                    return Err(format!(
                        "routes {:?} and {:?}: the same host, path and header fields with a value in common: a request with it could not tell them apart",
                        a.id, b.id
                    ));
                }
            }
        }
        if gw.demo {
            routes.push(Arc::new(Route {
                id: Arc::from("demo"),
                index: routes.len(),
                limiter_key: limiter_key("demo"),
                prefix: DEMO_PATH.into(),
                host: None,
                headers: Box::default(),
                upstreams: Vec::new(),
                dns: None,
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
                deny: None,
                description: Some(
                    "keygate's built-in demo: answers with the request it saw and the identity keygate attached to it"
                        .into(),
                ),
                openapi: None,
                workspace_id: None,
                shared: true,
                source: RouteSource::File,
                cache: None,
                ai: None,
                lifecycle: None,
                validation: None,
            }));
        }
        let deny = deny_set(&gw.deny).map_err(|e| format!("gateway.deny: {e}"))?;
        Ok(Self { routes, deny })
    }

    /// The route for the request's host, header fields and normalized `path`, as keygate reads
    /// the path: host-specific routes win, then those with more header conditions, then the
    /// longest prefix; configured routes win over the demo route. `host` is asked for only when
    /// a route with a `host` covers the path (most tables have none, and finding the host means
    /// reading and checking the `Host` field), `header` only for a route with `headers`. `None`
    /// also when a header field reads ambiguously (see [`RouteTable::resolve`]).
    pub fn find<'h>(
        &self,
        host: impl FnOnce() -> Option<&'h str>,
        header: &dyn Fn(&str) -> FieldRead<'h>,
        path: &str,
    ) -> Option<&Arc<Route>> {
        let mut host = Some(host);
        let mut known: Option<Option<&'h str>> = None;
        self.matches(&mut || *known.get_or_insert_with(|| host.take().and_then(|f| f())), header, path).ok()?.0
    }

    /// The route for the request ([`RouteTable::find`]), provided every way an upstream may read
    /// the path selects the same route; otherwise [`PathError::Ambiguous`]. The readings: letters
    /// in either case (Express and ASP.NET match routes ignoring case), and, for paths that hold
    /// `;`, `%3B` or `%25`, the path without its path parameters and with its escapes decoded
    /// twice (see `other_readings`). So a spelling can never reach, at the upstream, a route other
    /// than the one whose scope was checked (issue 12 #4). The usual path holds none of those,
    /// and costs one pass over the routes. A header field that a covering route's condition names
    /// must be sent once and spelled as the condition spells it ([`PathError::AmbiguousHeader`]),
    /// for the same reason.
    pub fn resolve<'h>(
        &self,
        host: impl FnOnce() -> Option<&'h str>,
        header: &dyn Fn(&str) -> FieldRead<'h>,
        path: &str,
    ) -> Result<Option<&Arc<Route>>, PathError> {
        let mut host = Some(host);
        let mut known: Option<Option<&'h str>> = None;
        let mut host = || *known.get_or_insert_with(|| host.take().and_then(|f| f()));
        let (exact, folded) = self.matches(&mut host, header, path)?;
        let Some(route) = exact else { return Ok(None) };
        let same = |r: Option<&Arc<Route>>| r.is_some_and(|r| Arc::ptr_eq(r, route));
        if !same(folded) {
            return Err(PathError::Ambiguous);
        }
        if path.bytes().any(|b| b == b';' || b == b'%') {
            for reading in other_readings(path) {
                let p = reading.map_err(|_| PathError::Ambiguous)?;
                let (e, f) = self.matches(&mut host, header, &p)?;
                if !same(e) || !same(f) {
                    return Err(PathError::Ambiguous);
                }
            }
        }
        Ok(Some(route))
    }

    /// The best route for `path` compared exactly, and the best compared ignoring ASCII case,
    /// in one pass.
    fn matches<'h>(
        &self,
        host: &mut dyn FnMut() -> Option<&'h str>,
        header: &dyn Fn(&str) -> FieldRead<'h>,
        path: &str,
    ) -> Result<Readings<'_>, PathError> {
        let rank = |r: &Route| (r.host.is_some(), r.headers.len(), !r.demo, r.prefix.len());
        let (mut exact, mut folded): (Option<&Arc<Route>>, Option<&Arc<Route>>) = (None, None);
        for r in &self.routes {
            let covers = r.covers(path);
            if !covers && !r.covers_folded(path) {
                continue;
            }
            if let Some(want) = r.host.as_deref()
                && !host().is_some_and(|h| h.eq_ignore_ascii_case(want))
            {
                continue;
            }
            if !r.headers.is_empty() {
                match r.headers_match(header) {
                    HeaderMatch::Yes => {}
                    HeaderMatch::No => continue,
                    HeaderMatch::Ambiguous => return Err(PathError::AmbiguousHeader),
                }
            }
            // The last of equal rank wins, as with `Iterator::max_by_key`.
            if covers && exact.is_none_or(|b| rank(r) >= rank(b)) {
                exact = Some(r);
            }
            if folded.is_none_or(|b| rank(r) >= rank(b)) {
                folded = Some(r);
            }
        }
        Ok((exact, folded))
    }
}

/// The best route for a path as written and the best ignoring letter case.
type Readings<'t> = (Option<&'t Arc<Route>>, Option<&'t Arc<Route>>);

/// Whether some request satisfies both routes' header conditions with neither ranking above the
/// other: the same field names, each with a value in common.
fn headers_overlap(a: &[HeaderCondition], b: &[HeaderCondition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter().any(|y| {
                x.name == y.name && x.values.iter().any(|v| y.values.iter().any(|w| v.eq_ignore_ascii_case(w)))
            })
        })
}

/// FNV-1a of the route id, never 0 (0 keys a token's own limit).
/// An address set of a `deny` list; `None` for an empty list.
fn deny_set(raw: &[String]) -> Result<Option<Arc<keygate_core::policy::AddressSet>>, String> {
    if raw.is_empty() {
        return Ok(None);
    }
    keygate_core::policy::AddressSet::parse(raw).map(|s| Some(Arc::new(s)))
}

fn limiter_key(id: &str) -> u32 {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h.max(1)
}

/// Why a path cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    /// `%00` or a backslash (raw or `%5C`): refused, as upstreams disagree on what they mean.
    Forbidden,
    /// A `%` not followed by two hex digits.
    MalformedEscape,
    /// Escapes of bytes above 0x7f that are not UTF-8 (overlong forms such as `%C0%AE` included),
    /// or a raw byte above 0x7f.
    NotUtf8,
    /// The route the path selects depends on how the upstream reads it (see
    /// [`RouteTable::resolve`]).
    Ambiguous,
    /// A header field that selects among routes is sent more than once, or spelled otherwise
    /// than the route's condition (letter case only).
    AmbiguousHeader,
}

impl PathError {
    /// The stable code of the refusal.
    pub fn code(self) -> &'static str {
        match self {
            Self::Ambiguous => "ambiguous_path",
            Self::AmbiguousHeader => "ambiguous_header",
            _ => "bad_request",
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path must start with /",
            Self::Forbidden => "the path holds a NUL or a backslash (raw or percent-encoded); send neither",
            Self::MalformedEscape => "the path holds a % that is not followed by two hex digits; encode a % as %25",
            Self::NotUtf8 => {
                "the path holds a byte above 0x7f, raw or in escapes that are not UTF-8; percent-encode the UTF-8 bytes of the text"
            }
            Self::Ambiguous => {
                "the path can be read as another route's (path parameters after ';', letter case, or an escape encoded twice); send it in its plain form"
            }
            Self::AmbiguousHeader => {
                "a header field that selects the route (such as the API version) is sent more than once, or in another letter case than the route's; send it once, spelled as the API documents it"
            }
        })
    }
}

/// Bytes a normalized path holds as they are: RFC 3986 §3.3 `pchar` without `%` (unreserved,
/// sub-delims, `:` and `@`) and `/`. Everything else is percent-encoded or refused.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~')
            || matches!(c, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
            || matches!(c, b':' | b'@' | b'/');
        b += 1;
    }
    t
};

/// RFC 3986 §2.3: characters whose escapes are decoded (§6.2.2.2).
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

/// The byte a `%XX` escape at `bytes[i]` stands for.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hex = bytes.get(i + 1..i + 3)?;
    let digit = |h: u8| char::from(h).to_digit(16).and_then(|d| u8::try_from(d).ok());
    Some(digit(*hex.first()?)? << 4 | digit(*hex.get(1)?)?)
}

/// Normalizes a request path (without its query) so that a scope check cannot be bypassed by
/// spelling (RFC 3986 §6.2.2), and returns the form that is matched **and forwarded**:
///
/// - escapes of unreserved characters are decoded (`%61` → `a`, `%2E` → `.`, `%7E` → `~`),
///   and so is `%2F` (to `/`, so that a slash is one whatever its spelling);
/// - other escapes stay escaped, with uppercase hex (`%2b` → `%2B`); escapes of bytes above 0x7f
///   must spell UTF-8 (no overlong `%C0%AE`, no surrogates);
/// - bytes a path may not hold raw (space, `"`, `#`, `<`, `>`, `[`, `]`, `^`, `` ` ``, `{`, `|`,
///   `}`, control bytes) are percent-encoded;
/// - NUL and backslash, raw or encoded, and raw bytes above 0x7f are refused;
/// - empty segments (`//`) and `.` are dropped, `..` removes the previous segment (never above the
///   root); a trailing slash is kept.
///
/// Path parameters (`;`) are left as they are here: [`RouteTable::resolve`] refuses a path whose
/// route depends on them. A path that is already normal (the usual case) is returned as it is,
/// without a copy.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(raw.as_bytes()) {
        return Ok(Cow::Borrowed(raw));
    }
    let mut decoded = String::with_capacity(raw.len() + 8);
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let v = escape_at(bytes, i).ok_or(PathError::MalformedEscape)?;
                match v {
                    0 | b'\\' => return Err(PathError::Forbidden),
                    b'/' => decoded.push('/'),
                    v if is_unreserved(v) => decoded.push(char::from(v)),
                    0x80..=0xff => {
                        // A UTF-8 sequence spelled as escapes: its length from the lead byte,
                        // then std's validation (which refuses overlong forms and surrogates).
                        let len = match v {
                            0xc2..=0xdf => 2,
                            0xe0..=0xef => 3,
                            0xf0..=0xf4 => 4,
                            _ => return Err(PathError::NotUtf8),
                        };
                        let mut seq = [0u8; 4];
                        for (k, slot) in seq.iter_mut().take(len).enumerate() {
                            *slot = escape_at(bytes, i + 3 * k).ok_or(PathError::NotUtf8)?;
                        }
                        if std::str::from_utf8(seq.get(..len).unwrap_or_default()).is_err() {
                            return Err(PathError::NotUtf8);
                        }
                        for b in seq.iter().take(len) {
                            push_escape(&mut decoded, *b);
                        }
                        i += 3 * len;
                        continue;
                    }
                    v => push_escape(&mut decoded, v),
                }
                i += 3;
            }
            b'\\' | 0 => return Err(PathError::Forbidden),
            0x80..=0xff => return Err(PathError::NotUtf8),
            b if PLAIN[usize::from(b)] => {
                decoded.push(char::from(b));
                i += 1;
            }
            b => {
                push_escape(&mut decoded, b);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Drops empty and `.` segments and resolves `..` (never above the root), keeping a trailing
/// slash (RFC 3986 §5.2.4, with empty segments dropped as well).
fn remove_dot_segments(decoded: &str) -> String {
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
    path
}

/// Whether `raw` (which starts with `/`) is already what [`normalize_path`] would make of it:
/// only bytes a path holds as they are (no `%`), and no empty, `.` or `..` segment (a trailing
/// slash is fine). One table lookup per byte: the fast path of every request.
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
            Some(b) if PLAIN[usize::from(*b)] => {}
            Some(_) => return false,
        }
    }
    true
}

/// The other ways an upstream may read a normalized path, each itself normalized: without the
/// path parameters of each segment (`;…`, as servlet containers such as Tomcat and Jetty, and
/// Spring, read them; also with `%3B` taken as `;`, for servers that decode before they split),
/// and with its escapes decoded a second time (`%2561` → `%61` → `a`), alone and together. Only
/// paths that hold `;`, `%3B` or `%25` have any. A reading that cannot be normalized is an
/// `Err`: some upstream would see something keygate refuses.
fn other_readings(path: &str) -> Vec<Result<String, PathError>> {
    let has = |s: &str, pat: &str| s.as_bytes().windows(pat.len()).any(|w| w.eq_ignore_ascii_case(pat.as_bytes()));
    let mut out = Vec::new();
    let params = |p: &str, out: &mut Vec<Result<String, PathError>>| {
        if p.contains(';') {
            out.push(Ok(remove_dot_segments(&strip_params(p, false))));
        }
        if has(p, "%3B") {
            out.push(Ok(remove_dot_segments(&strip_params(p, true))));
        }
    };
    params(path, &mut out);
    if has(path, "%25") {
        match decode_percent_escapes(path).and_then(|p| normalize_path(&p).map(Cow::into_owned)) {
            Ok(twice) => {
                params(&twice, &mut out);
                out.push(Ok(twice));
            }
            Err(_) => out.push(Err(PathError::Ambiguous)),
        }
    }
    out
}

/// `path` with each segment cut at its first `;` (and, if `escaped`, its first `%3B`).
fn strip_params(path: &str, escaped: bool) -> String {
    let mut out = String::with_capacity(path.len());
    for (k, seg) in path.split('/').enumerate() {
        if k > 0 {
            out.push('/');
        }
        let mut end = seg.find(';').unwrap_or(seg.len());
        if escaped && let Some(e) = seg.as_bytes().windows(3).position(|w| w.eq_ignore_ascii_case(b"%3B")) {
            end = end.min(e);
        }
        out.push_str(seg.get(..end).unwrap_or(seg));
    }
    out
}

/// `%25XX` → `%XX` (XX hex): the escapes of `%` decoded once more (the others are already in
/// normal form).
fn decode_percent_escapes(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let byte = |k: usize| bytes.get(k).copied().unwrap_or(0);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        // Only an escape of `%` that is followed by two hex digits spells another escape.
        if escape_at(bytes, i) == Some(b'%') && escape_at(&[b'%', byte(i + 3), byte(i + 4)], 0).is_some() {
            out.push(b'%');
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

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
            // RFC 3986 §6.2.2.2: unreserved characters decoded; §6.2.2.1: other escapes uppercase.
            ("/orders/%61dmin", "/orders/admin"),
            ("/%7euser/%2D%5F%2e", "/~user/-_."),
            ("/a%2bb%3a", "/a%2Bb%3A"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%F0%9F%98%80", "/%F0%9F%98%80"),
            // Double encoding stays what it says: a literal %61.
            ("/%2561", "/%2561"),
            ("/100%25", "/100%25"),
            // What a path may not hold raw is escaped.
            ("/a b", "/a%20b"),
            ("/a#b", "/a%23b"),
            ("/{x}|[y]^`\"<>", "/%7Bx%7D%7C%5By%5D%5E%60%22%3C%3E"),
            ("/a\u{7f}", "/a%7F"),
            // Path parameters and sub-delims stay.
            ("/a;b=c/d", "/a;b=c/d"),
            ("/a!$&'()*+,=:@", "/a!$&'()*+,=:@"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        for (bad, why) in [
            ("orders", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/a%00b", PathError::Forbidden),
            ("/a\\b", PathError::Forbidden),
            ("/a%5cb", PathError::Forbidden),
            ("/a%zz", PathError::MalformedEscape),
            ("/a%2", PathError::MalformedEscape),
            ("/a%", PathError::MalformedEscape),
            ("/é", PathError::NotUtf8),
            // Overlong `.` and `/`, a surrogate, a lone continuation byte, a cut sequence.
            ("/%C0%AE%C0%AE/", PathError::NotUtf8),
            ("/%c0%af", PathError::NotUtf8),
            ("/%E0%80%AE", PathError::NotUtf8),
            ("/%ED%A0%80", PathError::NotUtf8),
            ("/%80", PathError::NotUtf8),
            ("/%C3", PathError::NotUtf8),
            ("/%C3x", PathError::NotUtf8),
            ("/%C3%28", PathError::NotUtf8),
            ("/%F5%80%80%80", PathError::NotUtf8),
        ] {
            assert_eq!(normalize_path(bad), Err(why), "{bad}");
        }
        for already in ["/", "/orders", "/orders/", "/a/b.c/..d/.e", "/a;b=1/~x", "/a+b@c:d"] {
            assert!(matches!(normalize_path(already), Ok(Cow::Borrowed(_))), "{already}");
        }
        for changed in ["//a", "/a//b", "/a/./b", "/a/..", "/.", "/a%41", "/a b", "/a#", "/a|b"] {
            assert!(!is_normal(changed.as_bytes()), "{changed}");
        }
        // Normalizing is idempotent.
        for raw in ["/a%2561/%3b;x/..;/b", "/caf%c3%a9/%7e", "/x/%2e%2e/y//z/"] {
            let once = normalize_path(raw).unwrap().into_owned();
            assert_eq!(normalize_path(&once).unwrap(), once, "{raw}");
        }
    }

    #[test]
    fn other_readings_strip_parameters_and_decode_twice() {
        let readings = |p: &str| other_readings(p).into_iter().map(Result::unwrap).collect::<Vec<_>>();
        assert!(readings("/orders/admin/users").is_empty());
        assert_eq!(readings("/orders/admin;x/users"), ["/orders/admin/users"]);
        assert_eq!(readings("/a/..;/b"), ["/b"]);
        assert_eq!(readings("/a;/b"), ["/a/b"]);
        assert_eq!(readings("/a%3Bx/b"), ["/a/b"]);
        assert_eq!(readings("/a;y%3Bx/b"), ["/a/b", "/a/b"]);
        assert_eq!(readings("/%2561dmin"), ["/admin"]);
        assert_eq!(readings("/%252e%252e/x"), ["/x"]);
        assert_eq!(readings("/a%253Bx/b"), ["/a/b", "/a%3Bx/b"]);
        assert_eq!(readings("/100%25"), ["/100%25"], "a % escape before no hex digits stays");
        assert!(other_readings("/a%255C").iter().all(Result::is_err), "a backslash once decoded twice");
    }

    #[test]
    fn an_escape_is_a_percent_and_two_hex_digits() {
        // Found by the `path` fuzz target (fuzz/corpus/path/regression-plus-escape): a `+` or `-`
        // before one hex digit passed as an escape (`u8::from_str_radix` takes a sign), so
        // `%+2` stayed in the normalized path, spelled in a way no upstream decodes alike.
        for bad in ["/a/%+2e", "/a%+f", "/a%-1", "/a%+0", "/a% f"] {
            assert_eq!(normalize_path(bad), Err(PathError::MalformedEscape), "{bad}");
        }
    }

    fn no_headers<'h>(_: &str) -> FieldRead<'h> {
        FieldRead::Absent
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
        let id = |host: Option<&str>, p: &str| t.find(|| host, &no_headers, p).map(|r| r.id.to_string());
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
        assert_eq!(t.find(ask, &no_headers, "/demo/echo").map(|r| &*r.id), Some("demo"));
        assert_eq!(asked.get(), 0, "no route with a host covers the path: the host is not read");
        assert_eq!(t.find(ask, &no_headers, "/orders/admin/1").map(|r| &*r.id), Some("b2b"), "a host route wins");
        assert_eq!(asked.get(), 1);
    }

    fn with_headers(mut r: RouteConfig, headers: &[(&str, &[&str])]) -> RouteConfig {
        r.headers = headers
            .iter()
            .map(|(n, vs)| ((*n).to_owned(), crate::config::HeaderValues(vs.iter().map(|v| (*v).to_owned()).collect())))
            .collect();
        r
    }

    #[test]
    fn header_conditions_select_among_routes_of_one_path() {
        let gw = GatewayConfig::default();
        let t = RouteTable::build(
            &[
                route("v1", "/orders", None),
                with_headers(route("v2", "/orders", None), &[("Accept-Version", &["2", "2.0"])]),
                with_headers(route("v3", "/orders", None), &[("accept-version", &["3"]), ("x-tenant", &["acme"])]),
                route("special", "/orders/special", None),
                with_headers(route("b2b-v2", "/orders", Some("b2b.example")), &[("accept-version", &["2"])]),
            ],
            &gw,
        )
        .unwrap();
        let id = |host: Option<&str>, fields: &[(&str, &str)], p: &str| {
            let fields: Vec<(String, String)> =
                fields.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            let read = |name: &str| {
                let mut found = fields.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
                match (found.next(), found.next()) {
                    (None, _) => FieldRead::Absent,
                    (Some((_, v)), None) => FieldRead::One(v.as_bytes()),
                    _ => FieldRead::Many,
                }
            };
            t.resolve(|| host, &read, p).map(|r| r.map(|r| r.id.to_string()))
        };
        let some = |s: &str| Ok(Some(s.to_owned()));
        assert_eq!(id(None, &[], "/orders/7"), some("v1"), "no header: the route without a condition");
        assert_eq!(id(None, &[("accept-version", "2")], "/orders/7"), some("v2"));
        assert_eq!(
            id(None, &[("ACCEPT-VERSION", "2.0")], "/orders/7"),
            some("v2"),
            "names ignore case; any listed value"
        );
        assert_eq!(
            id(None, &[("accept-version", "9")], "/orders/7"),
            some("v1"),
            "an unknown version: the default route"
        );
        assert_eq!(id(None, &[("accept-version", "3")], "/orders/7"), some("v1"), "v3 needs both fields");
        assert_eq!(id(None, &[("accept-version", "3"), ("x-tenant", "acme")], "/orders/7"), some("v3"));
        assert_eq!(
            id(None, &[("accept-version", "2")], "/orders/special/1"),
            some("v2"),
            "a header condition ranks above a longer prefix"
        );
        assert_eq!(id(None, &[], "/orders/special/1"), some("special"));
        assert_eq!(id(Some("b2b.example"), &[("accept-version", "2")], "/orders/1"), some("b2b-v2"), "the host first");
        assert_eq!(id(Some("b2b.example"), &[], "/orders/1"), some("v1"));
        // Readings an upstream may make otherwise: refused, never routed.
        assert_eq!(
            id(None, &[("accept-version", "1"), ("accept-version", "2")], "/orders/7"),
            Err(PathError::AmbiguousHeader),
            "sent twice"
        );
        assert_eq!(
            id(None, &[("x-tenant", "ACME"), ("accept-version", "3")], "/orders/7"),
            Err(PathError::AmbiguousHeader)
        );
        assert_eq!(id(None, &[("accept-version", "2")], "/elsewhere"), Ok(None));
        assert_eq!(PathError::AmbiguousHeader.code(), "ambiguous_header");
    }

    #[test]
    fn header_conditions_are_checked_when_the_table_is_built() {
        let gw = GatewayConfig::default();
        let build = |routes: &[RouteConfig]| RouteTable::build(routes, &gw).err().unwrap_or_default();
        let v2 = |id: &str, vs: &[&str]| with_headers(route(id, "/orders", None), &[("accept-version", vs)]);
        assert!(build(&[v2("a", &["2"]), v2("b", &["2", "3"])]).contains("a value in common"));
        assert!(
            build(&[v2("a", &["v2"]), v2("b", &["V2"])]).contains("a value in common"),
            "values a request could not tell apart"
        );
        assert_eq!(build(&[v2("a", &["2"]), v2("b", &["3"]), route("c", "/orders", None)]), "");
        for (name, vs, want) in [
            ("authorization", &["x"][..], "cannot select a route"),
            ("Host", &["a"], "cannot select a route"),
            ("transfer-encoding", &["chunked"], "cannot select a route"),
            ("bad name", &["1"], "not a header field name"),
            ("accept-version", &[], "1 to 16 values"),
            ("accept-version", &["1, 2"], "no comma"),
            ("accept-version", &[" 2"], "no space at either end"),
            ("accept-version", &["caf\u{e9}"], "visible ASCII"),
        ] {
            let r = with_headers(route("a", "/orders", None), &[(name, vs)]);
            assert!(
                build(&[r]).contains(want),
                "{name} {vs:?}: {}",
                build(&[with_headers(route("a", "/orders", None), &[(name, vs)])])
            );
        }
        let mut twice = route("a", "/orders", None);
        twice.headers.insert("X-V".into(), crate::config::HeaderValues(vec!["1".into()]));
        twice.headers.insert("x-v".into(), crate::config::HeaderValues(vec!["1".into()]));
        assert!(build(&[twice]).contains("named twice"));
        // As a file or the admin API gives them: one value or a list.
        let c: RouteConfig = serde_json::from_value(serde_json::json!({
            "id": "v2", "path": "/orders", "upstream": "http://127.0.0.1:9",
            "headers": {"accept-version": "2", "x-tier": ["gold", "silver"]}
        }))
        .unwrap();
        assert_eq!(c.headers["accept-version"].0, ["2"]);
        assert_eq!(c.headers["x-tier"].0, ["gold", "silver"]);
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["headers"], serde_json::json!({"accept-version": "2", "x-tier": ["gold", "silver"]}));
        let bad = serde_json::from_value::<RouteConfig>(serde_json::json!({
            "id": "v2", "path": "/", "upstream": "http://127.0.0.1:9", "headers": {"v": 2}
        }));
        assert!(bad.unwrap_err().to_string().contains("a header value (a string) or a list of them"));
    }

    #[test]
    fn a_route_is_resolved_only_when_every_reading_agrees() {
        let gw = GatewayConfig::default();
        let mut root = route("root", "/", None);
        root.public = true;
        let t =
            RouteTable::build(&[route("orders", "/orders", None), route("admin", "/orders/admin", None), root], &gw)
                .unwrap();
        let id = |p: &str| t.resolve(|| None, &no_headers, p).map(|r| r.map(|r| r.id.to_string()));
        let some = |s: &str| Ok(Some(s.to_owned()));
        assert_eq!(id("/orders/7"), some("orders"));
        assert_eq!(id("/orders/admin/x"), some("admin"));
        assert_eq!(id("/orders/7;v=2/x"), some("orders"), "a parameter that changes nothing");
        assert_eq!(id("/orders/admin;v=2/x"), Err(PathError::Ambiguous));
        assert_eq!(id("/orders;v=2"), Err(PathError::Ambiguous), "root, or orders without the parameter");
        assert_eq!(id("/orders/x/..;/admin"), Err(PathError::Ambiguous));
        assert_eq!(id("/x/..;/orders"), Err(PathError::Ambiguous));
        assert_eq!(id("/orders/ADMIN"), Err(PathError::Ambiguous));
        assert_eq!(id("/Orders/7"), Err(PathError::Ambiguous));
        assert_eq!(id("/orders/%2561dmin"), Err(PathError::Ambiguous));
        assert_eq!(id("/orders/a%3Bb"), some("orders"));
        assert_eq!(id("/orders/admin%3Bb"), Err(PathError::Ambiguous));
        assert_eq!(id("/orders/%2561"), some("orders"), "decoded twice it is still an order");
        assert_eq!(id("/orders/%255C"), Err(PathError::Ambiguous));
        assert_eq!(id("/elsewhere"), some("root"));
        let t = RouteTable::build(&[route("orders", "/orders", None)], &GatewayConfig { demo: false, ..gw.clone() })
            .unwrap();
        assert!(
            matches!(t.resolve(|| None, &no_headers, "/Orders"), Ok(None)),
            "no route as keygate reads it: 404 whatever else"
        );
        assert_eq!(t.resolve(|| None, &no_headers, "/x/..;/orders").map(|r| r.is_some()), Ok(false));
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
        for p in ["/a;b", "/a%3bb", "/a%25"] {
            let e = RouteTable::build(&[route("semi", p, None)], &gw).unwrap_err();
            assert!(e.contains("\"semi\""), "{p}: {e}");
        }
        let e = RouteTable::build(&[route("a", "/Orders", None), route("b", "/orders", None)], &gw).unwrap_err();
        assert!(e.contains("letter case"), "{e}");
        assert!(
            RouteTable::build(&[route("a", "/Orders", Some("a.example")), route("b", "/orders", None)], &gw).is_ok(),
            "on different hosts"
        );
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

    #[test]
    fn https_upstreams_have_their_host_their_port_and_a_pool_key_of_their_identity() {
        let gw = GatewayConfig::default();
        let mut c = route("s", "/s", None);
        c.upstream = Some("https://api.example".into());
        c.upstreams = vec!["https://api.example:8443/v1".into(), "https://[::1]".into()];
        let t = RouteTable::build(&[c.clone()], &gw).unwrap();
        let u = &t.routes[0].upstreams;
        assert_eq!((&*u[0].authority, &*u[0].host_header), ("api.example:443", "api.example"));
        assert_eq!((&*u[1].authority, &*u[1].host_header), ("api.example:8443", "api.example:8443"));
        assert_eq!(u[1].base_path, "/v1");
        assert_eq!(&*u[2].host_header, "[::1]");
        assert!(u[0].pool_key.starts_with("https://api.example:443#api.example#"), "{}", u[0].pool_key);
        assert!(u.iter().all(|u| u.tls.is_some()));
        // Another identity (skipped verification here), another pool key.
        c.tls_insecure_skip_verify = true;
        let other = RouteTable::build(&[c.clone()], &gw).unwrap();
        assert_ne!(other.routes[0].upstreams[0].pool_key, u[0].pool_key);
        // Plain upstreams keep their authority as Host and as pool key.
        let mut p = route("p", "/p", None);
        p.upstream = Some("http://api.example".into());
        let plain = RouteTable::build(&[p.clone()], &gw).unwrap();
        let u = &plain.routes[0].upstreams[0];
        assert_eq!((&*u.host_header, &*u.pool_key), ("api.example:80", "api.example:80"));
        assert!(u.tls.is_none());
        // tls_* on http, a key without its certificate: refused with their codes.
        p.tls_server_name = Some("x".into());
        assert!(RouteTable::build(&[p], &gw).unwrap_err().contains("upstream_tls_on_http"));
        c.tls_client_key = Some("/k.pem".into());
        assert!(RouteTable::build(&[c], &gw).unwrap_err().contains("upstream_tls_key_without_cert"));
    }
}
