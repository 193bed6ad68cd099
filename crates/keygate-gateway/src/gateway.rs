//! The gateway's state: everything the request path reads ([`Gateway`]: the route table behind
//! an `ArcSwap`, the token index, the limiter, the usage meter, the clock, the caches) and the
//! seams through which the rest of keygate plugs into it ([`ExposureReporter`],
//! [`IdentitySigner`], [`LocalService`]). The request path itself is in [`crate::phase`], driven
//! by the front ends [`crate::h1`] and [`crate::h2`]; the background loops are in
//! [`crate::tasks`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, Response};
use ipnet::IpNet;
use keygate_core::Clock;
use keygate_core::dpop::ReplayCache;
use keygate_core::secret::TokenSecret;

use crate::index::{IndexedToken, TokenIndex};
use crate::jwt::{JwtIdentity, JwtVerifier};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::usage::UsageMeter;

/// Identity headers keygate sets for the upstream; client-supplied copies are removed.
pub const TOKEN_ID_HEADER: &str = "x-keygate-token-id";
pub const APP_ID_HEADER: &str = "x-keygate-app-id";
pub const SCOPES_HEADER: &str = "x-keygate-scopes";

/// Told about tokens found where they must not be (the URL: its query string or path), off the
/// request path.
/// A request can carry a made-up well-formed token (the checksum is public), so an
/// implementation bounds the work reports cause: it may drop a report, and says so.
pub trait ExposureReporter: Send + Sync {
    /// Takes a report of `token`, found at `where_`; `live` when the token is in the index (a
    /// token that can authenticate, which must not be crowded out by made-up ones). `false`
    /// when the report was dropped.
    fn token_in_url(&self, token: TokenSecret, where_: String, live: bool) -> bool;
}

/// A route table and the metrics that go with it; swapped whole on reload.
pub struct Table {
    pub routes: RouteTable,
    pub metrics: Metrics,
    /// The shared limits of apps that have any, by app id (see [`AppLimit`]).
    pub apps: HashMap<Box<str>, AppLimit>,
}

/// An app's shared limits (defined beside the routes, whose subscriptions lend the same kind).
pub use crate::routes::AppLimit;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

impl Table {
    pub fn new(routes: RouteTable) -> Self {
        let metrics = Metrics::new(routes.routes.iter().map(|r| r.id.to_string()));
        Self { routes, metrics, apps: HashMap::default() }
    }

    /// The table with `apps`' shared limits.
    pub fn with_apps(mut self, apps: &[keygate_core::model::AppLimits]) -> Self {
        self.apps = apps
            .iter()
            .map(|a| {
                let key = keygate_core::limits::derived_key(keygate_core::limits::APP_KEY, a.app_id.as_str());
                (
                    a.app_id.as_str().into(),
                    AppLimit { key, rate_limit: a.rate_limit, quota: a.quota, llm_budget: a.llm_budget },
                )
            })
            .collect();
        self
    }

    /// A table that replaces `old`: its counters shared ([`Metrics::succeeding`]), what its
    /// routes knew of their upstreams' DNS names ([`RouteTable::carry_dns`]), and the response
    /// cache of each cached route defined as before ([`RouteTable::carry_caches`]).
    pub fn succeeding(mut routes: RouteTable, old: &Table) -> Self {
        routes.carry_caches(&old.routes);
        let metrics = Metrics::succeeding(routes.routes.iter().map(|r| r.id.to_string()), &old.metrics);
        let table = Self { routes, metrics, apps: HashMap::default() };
        table.routes.carry_dns(&old.routes);
        table
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
    /// Looks up the upstreams named by DNS names ([`crate::resolve`]).
    pub resolver: Arc<dyn crate::resolve::Resolve>,
    /// Rate limits and quotas shared with the other nodes (Redis); `None`: this node's alone.
    pub shared: Option<Arc<crate::shared::SharedLimiter>>,
    /// What each token does, for anomaly detection; `None` when it is off.
    pub watch: Option<Arc<crate::watch::Watch>>,
    /// Every call, for the call log; `None` when it is off.
    pub calls: Option<Arc<crate::calls::CallLog>>,
    /// The AI gateway's providers and state; `None` without `[[providers]]`.
    pub ai: Option<Arc<crate::ai::Ai>>,
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
pub(crate) struct IdentityKey {
    /// The address of the caller's identity entry (pinned by [`Minted::pinned`]).
    pub(crate) who: usize,
    pub(crate) route: Arc<str>,
    pub(crate) ip: IpAddr,
}

pub(crate) struct Minted {
    /// Keeps the identity entry alive, and so its address unique, while cached.
    #[allow(dead_code, reason = "held for its address, never read")]
    pub(crate) pinned: Pinned,
    pub(crate) jwt: Arc<str>,
    /// `exp`, in seconds.
    pub(crate) exp: i64,
}

#[allow(dead_code, reason = "held for its address, never read")]
pub(crate) enum Pinned {
    Key(Arc<IndexedToken>),
    Jwt(Arc<JwtIdentity>),
}

impl IdentityCache {
    pub(crate) fn get(&self, key: &IdentityKey, now_s: i64) -> Option<Arc<str>> {
        let g = self.0.lock();
        let m = g.current.get(key).or_else(|| g.previous.get(key))?;
        (m.exp - now_s >= IDENTITY_REUSE_S).then(|| m.jwt.clone())
    }

    pub(crate) fn put(&self, key: IdentityKey, minted: Minted) {
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
pub(crate) const IDENTITY_TTL_S: i64 = 60;
pub(crate) const IDENTITY_REUSE_S: i64 = 15;

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
