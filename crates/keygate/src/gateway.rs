//! Wiring of the data plane into `keygate serve`: builds the [`Gateway`] from the configuration,
//! reports tokens found in query strings, flushes usage to the store, runs active health
//! checks, reloads routes (on SIGHUP and when the config file changes) and TLS certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use keygate_admin::Admin;
use keygate_admin::oauth::{KeyRing, KeysChanged, OAuth, OAuthSettings};
use keygate_core::Clock;
use keygate_core::jose::PublicJwk;
use keygate_core::model::Actor;
use keygate_core::secret::TokenSecret;
use keygate_core::store::Store;
use keygate_gateway::gateway::{ExposureReporter, Gateway, IdentitySigner, LocalService, Settings, Table};
use keygate_gateway::index::TokenIndex;
use keygate_gateway::jwt::{Issuer, JwtVerifier};
use keygate_gateway::limiter::Limiter;
use keygate_gateway::routes::RouteTable;
use keygate_gateway::server::{TlsSource, load_tls};
use keygate_gateway::usage::UsageMeter;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::live_routes::LiveRoutes;

/// Marks tokens seen in query strings as exposed, on the main runtime, within bounds (issue 12):
/// anyone can put a made-up well-formed token in a URL (the checksum is public), so a report
/// must not cost a store lookup each.
///
/// - **Deduplicated:** a token whose report was queued within the last [`EXPOSURE_RECENT`]
///   distinct reports is not reported again (it is already being marked, or marked).
/// - **Two bounded queues**, drained one report at a time by one task (at most one store lookup
///   in flight): tokens that are in the index (they can authenticate; only a holder of real
///   tokens can send them) and all others (unknown, revoked, expired), which are also limited to
///   [`EXPOSURE_OTHER_RATE`] per second. The task takes resident tokens first, so made-up tokens
///   never crowd out the report of a live one.
/// - A report that finds its queue full, or over the rate, is dropped, and the gateway counts it
///   in `keygate_gateway_exposure_reports_dropped_total`. The request is refused either way.
struct AdminReporter {
    live: tokio::sync::mpsc::Sender<Exposure>,
    other: tokio::sync::mpsc::Sender<Exposure>,
    /// The GCRA state of the rate of other reports, in microseconds.
    other_rate: std::sync::atomic::AtomicI64,
    recent: parking_lot::Mutex<Recent>,
    hash: Arc<Admin>,
    clock: Arc<dyn Clock>,
}

/// One report: the token and where it was found.
struct Exposure {
    token: TokenSecret,
    where_: String,
}

/// Reports kept in each queue, and distinct tokens remembered for deduplication.
const EXPOSURE_LIVE_QUEUE: usize = 1024;
const EXPOSURE_OTHER_QUEUE: usize = 64;
const EXPOSURE_RECENT: usize = 4096;
/// Reports of tokens that are not in the index, per second (with as many at once).
const EXPOSURE_OTHER_RATE: u32 = 10;

/// The keyed hashes of the last tokens reported, oldest first.
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<[u8; 32]>,
    set: std::collections::HashSet<[u8; 32]>,
}

impl Recent {
    /// Remembers `h`; `false` if it was remembered already.
    fn insert(&mut self, h: [u8; 32]) -> bool {
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > EXPOSURE_RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

impl AdminReporter {
    /// The reporter, and its task on the current runtime.
    fn start(admin: Arc<Admin>, clock: Arc<dyn Clock>) -> Self {
        let (live, mut live_rx) = tokio::sync::mpsc::channel::<Exposure>(EXPOSURE_LIVE_QUEUE);
        let (other, mut other_rx) = tokio::sync::mpsc::channel::<Exposure>(EXPOSURE_OTHER_QUEUE);
        let worker = admin.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    Some(e) = live_rx.recv() => e,
                    Some(e) = other_rx.recv() => e,
                    else => return,
                };
                mark_exposed(&worker, next).await;
            }
        });
        Self {
            live,
            other,
            other_rate: std::sync::atomic::AtomicI64::new(0),
            recent: parking_lot::Mutex::new(Recent::default()),
            hash: admin,
            clock,
        }
    }
}

/// The first pause before a report is tried again while the store cannot be reached; doubled
/// up to [`EXPOSURE_RETRY_MAX`]. The report waits in the task (the queues behind it are bounded).
const EXPOSURE_RETRY_FIRST: Duration = Duration::from_millis(500);
const EXPOSURE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Tries of a report that meets a concurrent change of its token (a version conflict).
const EXPOSURE_CONFLICT_TRIES: u32 = 3;

/// Marks the reported token exposed (with its audit event). While the store cannot be reached
/// (PostgreSQL stopped, failing over) the report is kept and tried again with growing pauses, so
/// an outage loses no exposure: the token is marked once the store answers.
async fn mark_exposed(admin: &Admin, Exposure { token, where_ }: Exposure) {
    let hash = admin.hash(token.expose());
    let mut pause = EXPOSURE_RETRY_FIRST;
    let mut conflicts = 0;
    loop {
        let marked = match admin.store().token_by_hash(&hash).await {
            Ok(Some(t)) => {
                let actor = Actor { id: "gateway".into(), source: None, owner: true };
                admin.mark_exposed(&t.workspace_id, &actor, &t, Some(&where_)).await.map(|m| Some(m.id))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match marked {
            Ok(Some(id)) => {
                tracing::warn!(token_id = %id, "a token was sent in a URL and is now marked exposed");
                return;
            }
            Ok(None) => return,
            Err(e) if e.kind == keygate_core::ErrorKind::Unavailable => {
                if pause == EXPOSURE_RETRY_FIRST {
                    tracing::warn!(error = %e, "cannot mark a token seen in a query string exposed yet: the store is not reachable; the report is kept and tried again");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(EXPOSURE_RETRY_MAX);
            }
            Err(e) if e.kind == keygate_core::ErrorKind::Conflict && conflicts + 1 < EXPOSURE_CONFLICT_TRIES => {
                conflicts += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark a token seen in a query string exposed");
                return;
            }
        }
    }
}

impl ExposureReporter for AdminReporter {
    fn token_in_url(&self, token: TokenSecret, where_: String, live: bool) -> bool {
        let hash = *self.hash.hash(token.expose()).as_bytes();
        if self.recent.lock().set.contains(&hash) {
            return true;
        }
        let queue = if live {
            &self.live
        } else {
            let limit = keygate_core::policy::RateLimit {
                requests: EXPOSURE_OTHER_RATE,
                per_seconds: 1,
                burst: EXPOSURE_OTHER_RATE,
            };
            let now_us = self.clock.now().as_millis().saturating_mul(1000);
            if !keygate_gateway::limiter::Limiter::check_cell(&self.other_rate, &limit, now_us).allowed {
                return false;
            }
            &self.other
        };
        // Remembered only once queued: a dropped report is made again at the next sighting.
        let queued = queue.try_send(Exposure { token, where_ }).is_ok();
        if queued {
            self.recent.lock().insert(hash);
        }
        queued
    }
}

/// Brings the local index up to date before the admin API answers, so a revocation, suspension
/// or scope change holds for the very next request. An adapter, and so here: the trait is the
/// control plane's (`keygate-admin`), which the gateway crate does not depend on; the work is the
/// gateway's own ([`keygate_gateway::follow::catch_up`]).
pub struct IndexHook {
    pub index: TokenIndex,
    pub store: Arc<dyn Store>,
    pub cluster: Arc<crate::cluster::Cluster>,
}

#[async_trait::async_trait]
impl keygate_admin::service::TokenChangeHook for IndexHook {
    async fn catch_up(&self) {
        if let Err(e) = keygate_gateway::follow::catch_up(&self.index, &*self.store).await {
            tracing::warn!(error = %e, "token index: cannot read the change feed");
        }
    }

    async fn acknowledge(&self, seq: u64) -> Option<keygate_core::model::Propagation> {
        Some(self.cluster.wait_applied(seq).await)
    }
}

/// The OAuth authorization server's settings from the configuration.
pub fn oauth_settings(cfg: &Config, issuer: &str) -> OAuthSettings {
    let o = &cfg.oauth;
    OAuthSettings {
        audience: o.audience.clone().unwrap_or_else(|| issuer.to_owned()),
        access_token_ttl_seconds: o.access_token_ttl_seconds,
        refresh_token_ttl_seconds: o.refresh_token_ttl_seconds,
        max_access_token_ttl_seconds: o.max_access_token_ttl_seconds,
        exchange_ttl_seconds: o.exchange_ttl_seconds,
        leeway_seconds: o.leeway_seconds,
        key_rotation_days: o.key_rotation_days,
        key_publish_ahead_seconds: o.key_publish_ahead_seconds,
        dpop_nonces: o.dpop_nonces,
        ..OAuthSettings::for_issuer(issuer)
    }
}

/// The OAuth endpoints, served on the gateway listener by the control plane's router. They run
/// on the main runtime (where the store's connections live), not on the gateway worker that
/// received the request.
struct OAuthEndpoints {
    router: axum::Router,
    runtime: tokio::runtime::Handle,
}

impl LocalService for OAuthEndpoints {
    fn serves(&self, path: &str) -> bool {
        keygate_admin::oauth::http::serves(path)
    }

    fn call(
        &self,
        req: http::Request<bytes::Bytes>,
        peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<bytes::Bytes>> + Send>> {
        use tower::ServiceExt as _;
        let router = self.router.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = req.into_parts();
            let mut req = http::Request::from_parts(parts, axum::body::Body::from(body));
            req.extensions_mut().insert(keygate_admin::oauth::http::PeerAddr(peer.ip()));
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            http::Response::from_parts(parts, bytes)
        });
        Box::pin(async move {
            task.await.unwrap_or_else(|_| {
                let mut r = http::Response::new(bytes::Bytes::from_static(b"{\"error\":\"server_error\"}"));
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                r
            })
        })
    }
}

/// Several local services on the gateway listener: a request goes to the first that serves its path.
struct LocalServices(Vec<Arc<dyn LocalService>>);

impl LocalService for LocalServices {
    fn serves(&self, path: &str) -> bool {
        self.0.iter().any(|s| s.serves(path))
    }

    fn call(
        &self,
        req: http::Request<bytes::Bytes>,
        peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<bytes::Bytes>> + Send>> {
        match self.0.iter().find(|s| s.serves(req.uri().path())) {
            Some(s) => s.call(req, peer),
            None => Box::pin(async {
                json_answer(http::StatusCode::NOT_FOUND, problem("route_not_found", "no route serves this path"))
            }),
        }
    }
}

fn problem(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"code": code, "message": message}})
}

fn json_answer(status: http::StatusCode, body: serde_json::Value) -> http::Response<bytes::Bytes> {
    let mut r = http::Response::new(bytes::Bytes::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

/// The secret-scanning partner endpoint (`[secret_scanning]`): a signed POST of found tokens,
/// checked here, handled by the control plane on the main runtime.
struct SecretScanningEndpoint {
    path: String,
    keys: keygate_admin::secret_scanning::PartnerKeys,
    admin: Arc<Admin>,
    runtime: tokio::runtime::Handle,
}

impl LocalService for SecretScanningEndpoint {
    fn serves(&self, path: &str) -> bool {
        path == self.path
    }

    fn call(
        &self,
        req: http::Request<bytes::Bytes>,
        _peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = http::Response<bytes::Bytes>> + Send>> {
        use keygate_admin::secret_scanning::{Found, KEY_ID_HEADER, SIGNATURE_HEADER};
        let refuse = |status, code: &str, message: &str| {
            let answer = json_answer(status, problem(code, message));
            Box::pin(async move { answer }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        };
        if req.method() != http::Method::POST {
            let mut answer = json_answer(
                http::StatusCode::METHOD_NOT_ALLOWED,
                problem("method_not_allowed", "POST the found tokens"),
            );
            answer.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Box::pin(async move { answer });
        }
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let (key_id, signature) = (header(KEY_ID_HEADER), header(SIGNATURE_HEADER));
        if key_id.is_empty() || signature.is_empty() || !self.keys.verify(key_id, signature, req.body()) {
            return refuse(
                http::StatusCode::UNAUTHORIZED,
                "invalid_signature",
                "sign the body with a configured key (Github-Public-Key-Identifier, Github-Public-Key-Signature)",
            );
        }
        let found: Vec<Found> = match serde_json::from_slice(req.body()) {
            Ok(f) => f,
            Err(_) => {
                return refuse(
                    http::StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body is a JSON array of {\"token\", \"type\", \"url\", \"source\"}",
                );
            }
        };
        let admin = self.admin.clone();
        let task = self.runtime.spawn(async move {
            match admin.secret_scanning_report(&found).await {
                Ok(feedback) => json_answer(http::StatusCode::OK, serde_json::to_value(feedback).unwrap_or_default()),
                Err(e) => {
                    let status = match e.kind {
                        keygate_core::ErrorKind::InvalidInput => http::StatusCode::BAD_REQUEST,
                        _ => http::StatusCode::SERVICE_UNAVAILABLE,
                    };
                    json_answer(status, problem(e.code, &e.message))
                }
            }
        });
        Box::pin(async move {
            task.await.unwrap_or_else(|_| {
                json_answer(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    problem("internal", "the report could not be handled"),
                )
            })
        })
    }
}

/// Signs the identity tokens of `identity_token` routes with the authorization server's key.
struct IdentityTokens(Arc<OAuth>);

impl IdentitySigner for IdentityTokens {
    fn issuer(&self) -> &str {
        &self.0.settings().issuer
    }
    fn sign(&self, claims: &serde_json::Value) -> Option<String> {
        self.0
            .sign(keygate_core::jose::Alg::EdDSA, &serde_json::json!({"typ": "JWT"}), claims)
            .map_err(|e| tracing::warn!(error = %e, "cannot sign an identity token"))
            .ok()
    }
}

/// Tells keygate's own issuer at the gateway about the authorization server's keys.
struct GatewayKeys(Arc<Issuer>);

impl KeysChanged for GatewayKeys {
    fn keys_changed(&self, ring: &KeyRing) {
        self.0.set_keys(ring.public_keys());
    }
}

/// Builds the gateway's state from the configuration. `oauth` (with its issuer) makes the
/// gateway serve the OAuth endpoints and accept keygate's JWT access tokens.
pub async fn build(
    cfg: &Config,
    admin: Arc<Admin>,
    index: TokenIndex,
    clock: Arc<dyn Clock>,
    oauth: Option<Arc<OAuth>>,
) -> anyhow::Result<Arc<Gateway>> {
    let routes = RouteTable::build(&cfg.routes, &cfg.gateway).map_err(|e| anyhow::anyhow!("routes: {e}"))?;
    // Upstreams named by DNS names are looked up before the gateway serves; a name that does
    // not resolve is logged and keygate starts anyway (see keygate_gateway::resolve).
    let dns_servers = cfg.gateway.dns_server_addrs().map_err(|e| anyhow::anyhow!(e))?;
    let resolver = keygate_gateway::resolve::resolver(&dns_servers);
    let now = keygate_gateway::resolve::monotonic_ms();
    keygate_gateway::resolve::refresh(routes.dns(), &resolver, now, keygate_gateway::resolve::Which::New).await;
    let limiter = Limiter::default();
    let counts = admin.store().quota_counts().await.map_err(|e| anyhow::anyhow!("cannot load quota counts: {e}"))?;
    limiter.load_quota_counts(&counts);
    let trusted = keygate_core::policy::parse_allowlist(&cfg.gateway.trusted_proxies)
        .map_err(|e| anyhow::anyhow!("gateway.trusted_proxies: {}", e.message))?;
    let api_key_header = cfg
        .gateway
        .api_key_header
        .as_deref()
        .map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()))
        .transpose()
        .map_err(|_| anyhow::anyhow!("gateway.api_key_header is not a header name"))?;
    let dpop_nonces = if cfg.oauth.dpop_nonces {
        Some(keygate_admin::oauth::nonce_key(&admin).map_err(|e| anyhow::anyhow!("DPoP nonces: {}", e.message))?)
    } else {
        None
    };
    let store = admin.store().clone();
    let mut locals: Vec<Arc<dyn LocalService>> = Vec::new();
    if !cfg.secret_scanning.keys.is_empty() {
        let pairs: Vec<(String, String)> =
            cfg.secret_scanning.keys.iter().map(|k| (k.id.clone(), k.pem.clone())).collect();
        let keys = keygate_admin::secret_scanning::PartnerKeys::from_pem(&pairs)
            .map_err(|e| anyhow::anyhow!("secret_scanning.keys: {e}"))?;
        locals.push(Arc::new(SecretScanningEndpoint {
            path: cfg.secret_scanning.path.clone(),
            keys,
            admin: admin.clone(),
            runtime: tokio::runtime::Handle::current(),
        }));
    }
    let reporter: Arc<dyn ExposureReporter> = Arc::new(AdminReporter::start(admin, clock.clone()));
    let mut issuers = Vec::new();
    if let Some(oauth) = &oauth {
        let s = oauth.settings();
        let ours = Arc::new(Issuer::new(&s.issuer, &s.audience, true));
        ours.set_keys(oauth.keys().public_keys());
        oauth.set_keys_listener(Arc::new(GatewayKeys(ours.clone())));
        issuers.push(ours);
        locals.push(Arc::new(OAuthEndpoints {
            router: keygate_admin::oauth::http::router(oauth.clone()),
            runtime: tokio::runtime::Handle::current(),
        }));
    }
    for t in &cfg.oauth.trusted_issuers {
        // Another issuer's tokens carry no workspace: they belong to the one configured.
        let name = t.workspace.as_deref().unwrap_or(keygate_core::model::DEFAULT_WORKSPACE);
        let ws = store
            .workspace_by_name(name)
            .await
            .map_err(|e| anyhow::anyhow!("oauth.trusted_issuers: {}", e.message))?
            .ok_or_else(|| anyhow::anyhow!("oauth.trusted_issuers.workspace: no workspace is named {name:?}"))?;
        issuers
            .push(Arc::new(Issuer::new(&t.issuer, &t.audience, false).with_workspace(Some(Arc::from(ws.id.as_str())))));
    }
    let jwt = (!issuers.is_empty()).then(|| JwtVerifier::new(issuers, cfg.oauth.leeway_seconds));
    let shared = shared_limits(cfg).await?;
    // Always there: providers can also be made through the admin API while keygate runs.
    let env = |var: &str| std::env::var(var).ok();
    let ai = Some(Arc::new(
        keygate_gateway::ai::Ai::new(&cfg.providers, &env).map_err(|e| anyhow::anyhow!("providers: {e}"))?,
    ));
    Ok(Arc::new(Gateway {
        table: ArcSwap::from_pointee(Table::new(routes)),
        index,
        limiter,
        meter: UsageMeter::default(),
        clock,
        settings: Settings { api_key_header, trusted_proxies: trusted, access_log: cfg.gateway.access_log },
        reporter: Some(reporter),
        jwt,
        local: match locals.len() {
            0 => None,
            1 => locals.pop(),
            _ => Some(Arc::new(LocalServices(locals)) as Arc<dyn LocalService>),
        },
        dpop_replay: keygate_core::dpop::ReplayCache::new(keygate_core::dpop::ReplayLimits {
            max_bytes: cfg.gateway.dpop_replay_max_bytes,
            max_per_caller: cfg.gateway.dpop_replay_max_per_caller,
        }),
        dpop_nonces,
        identity: oauth.map(|o| Arc::new(IdentityTokens(o)) as Arc<dyn IdentitySigner>),
        identity_cache: Default::default(),
        resolver,
        shared,
        watch: cfg.anomaly.enabled.then(|| Arc::new(keygate_gateway::watch::Watch::default())),
        calls: cfg.call_log.enabled.then(|| Arc::new(keygate_gateway::calls::CallLog::default())),
        ai,
    }))
}

/// The shared limits of `[redis]`, if configured. A Redis that cannot be reached at start does
/// not stop the node: it starts deciding alone with its share of each limit, and the first
/// lease that Redis grants later takes it back to shared accounting.
async fn shared_limits(cfg: &Config) -> anyhow::Result<Option<Arc<keygate_gateway::shared::SharedLimiter>>> {
    let Some(url) = &cfg.redis.url else { return Ok(None) };
    let r = &cfg.redis;
    let backend =
        keygate_store::redis_limits::RedisLimits::connect_lazily(url, Duration::from_millis(r.connect_timeout_ms))
            .await
            .map_err(|e| anyhow::anyhow!("redis.url: {}", e.message))?;
    let shared =
        keygate_gateway::shared::SharedLimiter::new(Arc::new(backend), &r.key_prefix, Duration::from_millis(r.wait_ms));
    tracing::info!(redis = %shared.describe(), "rate limits and quotas are shared through Redis");
    Ok(Some(Arc::new(shared)))
}

/// Fetches the JWK Sets of the trusted issuers: at start, every 10 minutes, and when a token
/// names a key not known yet (at most every 30 seconds per issuer).
pub fn spawn_jwks_fetchers(gw: &Arc<Gateway>, cfg: &Config) -> Vec<JoinHandle<()>> {
    let Some(verifier) = &gw.jwt else { return Vec::new() };
    let mut tasks = Vec::new();
    for t in &cfg.oauth.trusted_issuers {
        let Some(issuer) = verifier.issuers().iter().find(|i| i.issuer == t.issuer.trim_end_matches('/')).cloned()
        else {
            continue;
        };
        let url = t.jwks_url.clone();
        tasks.push(tokio::spawn(async move {
            let client = match crate::fetch::client() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the JWKS client");
                    return;
                }
            };
            loop {
                match fetch_jwks(&client, &url).await {
                    Ok(keys) => {
                        tracing::info!(issuer = %issuer.issuer, keys = keys.len(), "fetched the issuer's JWKS");
                        issuer.set_keys(keys);
                    }
                    Err(e) => tracing::warn!(issuer = %issuer.issuer, url = %url, error = %e, "cannot fetch the issuer's JWKS"),
                }
                tokio::select! {
                    () = issuer.wants_keys.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(600)) => {}
                }
                // A burst of tokens with unknown keys refetches once, then waits.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }));
    }
    tasks
}

/// The most a JWK Set may weigh: room for dozens of keys with certificate chains.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// The EdDSA and ES256 public keys of a JWK Set (others are skipped: the gateway verifies only
/// those algorithms), fetched as [`crate::fetch`] fetches: no redirects, bounded time and size.
async fn fetch_jwks(client: &reqwest::Client, url: &str) -> anyhow::Result<Vec<(String, PublicJwk)>> {
    let body = crate::fetch::get_bounded(client, url, MAX_JWKS_BYTES).await.map_err(anyhow::Error::msg)?;
    let set: serde_json::Value = serde_json::from_slice(&body)?;
    let keys = set.get("keys").and_then(|k| k.as_array()).ok_or_else(|| anyhow::anyhow!("no keys array"))?;
    Ok(keys
        .iter()
        .filter_map(|k| {
            let jwk = PublicJwk::from_json(&k.to_string()).ok()?;
            Some((jwk.kid().unwrap_or_default().to_owned(), jwk))
        })
        .collect())
}

/// OAuth housekeeping: key rotation on schedule, pruning, and re-reading the keys (another node
/// may have rotated them), every minute.
pub fn spawn_oauth_maintenance(oauth: Arc<OAuth>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        every.tick().await;
        loop {
            every.tick().await;
            if let Err(e) = oauth.maintain().await {
                tracing::warn!(error = %e, "oauth: maintenance failed; retrying in a minute");
            }
        }
    })
}

/// The gateway's unflushed usage, for live usage reports (an adapter: the trait is the control
/// plane's, which the gateway crate does not depend on).
pub struct MeterUsage(pub Arc<Gateway>);

impl keygate_admin::service::PendingUsage for MeterUsage {
    fn pending(&self, token: &keygate_core::ids::TokenId) -> Vec<keygate_core::model::UsageRecord> {
        keygate_gateway::tasks::pending_usage(&self.0, token)
    }

    fn last_uses(&self, tokens: &[keygate_core::ids::TokenId]) -> Vec<keygate_core::model::LastUse> {
        keygate_gateway::tasks::pending_last_uses(&self.0, tokens)
    }

    fn pending_llm(&self, token: &keygate_core::ids::TokenId) -> Vec<keygate_core::llm::LlmUsage> {
        self.0.ai.as_ref().map(|ai| ai.pending_usage(token.as_str())).unwrap_or_default()
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Re-reads the config file; swaps in its routes (with the stored ones) if the table compiles,
/// keeps the old table if not.
pub async fn reload_routes(live: &LiveRoutes, path: &Path) {
    match Config::from_file(path) {
        Ok(cfg) => match live.set_file(cfg.routes, cfg.gateway).await {
            Ok(()) => tracing::info!(file = %path.display(), "routes reloaded"),
            Err(e) => {
                tracing::error!(error = %e, file = %path.display(), "new routes refused; the old ones keep serving")
            }
        },
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), file = %path.display(), "new config refused; the old one keeps serving")
        }
    }
}

/// Watches the config file (every 2 s, and on SIGHUP) and the TLS files.
pub fn spawn_reloader(
    live: Arc<LiveRoutes>,
    config: Option<PathBuf>,
    tls: Option<(TlsSource, PathBuf, PathBuf)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen_cfg = config.as_deref().and_then(modified);
        let mut seen_tls = tls.as_ref().map(|(_, c, k)| (modified(c), modified(k)));
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = tick.tick() => false,
                () = hangup => true,
            };
            if let Some(path) = &config {
                let m = modified(path);
                if forced || m != seen_cfg {
                    seen_cfg = m;
                    reload_routes(&live, path).await;
                }
            }
            if let Some((source, cert, key)) = &tls {
                let m = (modified(cert), modified(key));
                if forced || Some(m) != seen_tls {
                    seen_tls = Some(m);
                    reload_tls(source, cert, key);
                }
            }
        }
    })
}

/// Re-reads the certificate and key; new connections use them if they are valid, otherwise the
/// old ones keep serving.
pub fn reload_tls(source: &TlsSource, cert: &Path, key: &Path) {
    match load_tls(cert, key) {
        Ok(acceptor) => {
            source.store(Some(Arc::new(acceptor)));
            tracing::info!(cert = %cert.display(), "TLS certificate loaded");
        }
        Err(e) => tracing::error!(error = %e, "new TLS certificate refused; the old one keeps serving"),
    }
}

/// The TLS source for the listener, if configured.
pub fn tls_source(cfg: &Config) -> anyhow::Result<Option<(TlsSource, PathBuf, PathBuf)>> {
    let Some(tls) = &cfg.gateway.tls else { return Ok(None) };
    let acceptor = load_tls(&tls.cert, &tls.key).map_err(|e| anyhow::anyhow!("gateway.tls: {e}"))?;
    let source: TlsSource = Arc::new(ArcSwapOption::from_pointee(acceptor));
    Ok(Some((source, tls.cert.clone(), tls.key.clone())))
}
