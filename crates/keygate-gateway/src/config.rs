//! The gateway's configuration: the `[gateway]` table and the `[[routes]]` array of keygate's
//! config file. Each field's doc comment is its user documentation. The shape of `[[routes]]` is
//! a stable contract (see `docs/configuration.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use keygate_core::policy::RateLimit;
use serde::{Deserialize, Serialize};

/// `[gateway]`: the listener and what applies to every route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the gateway listener. Env: `KEYGATE_GATEWAY_LISTEN`. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// A header that carries the token besides `Authorization: Bearer`, such as `X-API-Key`.
    pub api_key_header: Option<String>,
    /// Proxies (addresses or CIDRs) whose forwarding headers are believed: `X-Forwarded-For` (the
    /// client address), a valid `X-Forwarded-Proto` and `X-Forwarded-Host` (the scheme and host
    /// asked for), `Forwarded` and the other `X-Forwarded-*` fields. From anyone else, the client
    /// address is the socket's and those headers are removed or rewritten.
    pub trusted_proxies: Vec<String>,
    /// Client addresses refused on every route (addresses and CIDRs), before any token work:
    /// 403 `address_denied`. The client address is the one `trusted_proxies` lets through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Worker threads, each with its own listener socket and upstream connections. 0: one per
    /// CPU core.
    pub threads: usize,
    /// Largest request body, in bytes, unless a route says otherwise. Default 10 MiB.
    pub max_body_bytes: u64,
    /// Time to connect to an upstream, in milliseconds, unless a route says otherwise. Default 2000.
    pub connect_timeout_ms: u64,
    /// Time for an upstream to answer with headers, in milliseconds, unless a route says
    /// otherwise. Default 30000.
    pub request_timeout_ms: u64,
    /// The longest an upstream named by a DNS host name goes without being looked up again,
    /// in seconds, unless a route says otherwise (`dns_refresh_seconds`). A name is looked up
    /// again when its records' TTL runs out, if that is sooner (but not sooner than 1 s); names
    /// from `/etc/hosts` have no TTL and are read again at this interval. Default 30.
    pub dns_refresh_seconds: u64,
    /// DNS servers (`"10.0.0.2"`, `"127.0.0.1:8600"`; port 53 when none is given) to ask for
    /// upstream names instead of `/etc/resolv.conf`'s (whose search domains and options still
    /// apply). Default: none, `/etc/resolv.conf`'s servers.
    pub dns_servers: Vec<String>,
    /// Serve the built-in demo route `/demo/echo` (answers with the request and identity it saw)
    /// when no route claims that path. Default true.
    pub demo: bool,
    /// Log one JSON line per request (token id, never the token). Default true.
    pub access_log: bool,
    /// How long an idle HTTP/1.1 keep-alive connection is kept open waiting for its next
    /// request, in seconds. Default 60.
    pub keep_alive_timeout_seconds: u64,
    /// How long a request head may take to arrive once it has begun, in seconds (a defence
    /// against slow-header attacks; also the TLS handshake's limit). Default 10.
    pub header_timeout_seconds: u64,
    /// How long the body of a request keygate answers itself (the OAuth endpoints on this
    /// listener) may take to arrive once its head has, in milliseconds; 408 `request_timeout`
    /// and the connection closed after that. Forwarded bodies are bounded by the route's
    /// `request_timeout_ms` instead. Default 10000.
    pub body_timeout_ms: u64,
    /// How long an answer may wait for its client to take any of it, in milliseconds, before
    /// the connection is closed: an HTTP/1.1 write (an answer, a tunnel) that makes no
    /// progress, an HTTP/2 answer waiting for its flow-control window. Default 60000.
    pub send_timeout_ms: u64,
    /// HTTP/2: a connection with no open stream for this long is closed (GOAWAY), in
    /// milliseconds. Default 60000.
    pub http2_idle_timeout_ms: u64,
    /// HTTP/2: how often keygate sends a PING to check that the client is still there, in
    /// milliseconds; 0 sends none. Default 30000.
    pub http2_keep_alive_interval_ms: u64,
    /// HTTP/2: how long a PING may go unanswered before the connection is closed, in
    /// milliseconds. Default 10000.
    pub http2_keep_alive_timeout_ms: u64,
    /// HTTP/2: how many streams a client may have open at once on one connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`, RFC 9113 §6.5.2). Default 128.
    pub http2_max_concurrent_streams: u32,
    /// How many client connections one worker thread serves at once; a new connection beyond
    /// it is refused at once (503 `too_many_connections` on a plain listener, closed under TLS)
    /// and counted in `/metrics`. Default 10000.
    pub max_connections_per_worker: usize,
    /// How many connections one client address (an IPv6 address counts by its /64) may hold
    /// open at once, over all workers; 0: no such cap. Leave it at 0 behind a proxy, whose
    /// address every client shares. Default 0.
    pub max_connections_per_address: usize,
    /// TLS from PEM files; the files are re-read when they change. Without it the listener
    /// speaks plain HTTP/1.1 and h2c.
    pub tls: Option<TlsConfig>,
    /// The memory for DPoP proofs seen (each is accepted once), in bytes, for all callers
    /// together. Beyond it, the caller with the most proofs remembered forgets its oldest.
    /// Default 32 MiB (about 260,000 proofs).
    pub dpop_replay_max_bytes: usize,
    /// DPoP proofs remembered per caller (a token, or a JWT's client); beyond it the caller's
    /// own oldest proof is forgotten. Default 65536.
    pub dpop_replay_max_per_caller: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key_header: None,
            trusted_proxies: Vec::new(),
            deny: Vec::new(),
            threads: 0,
            max_body_bytes: 10 * 1024 * 1024,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 30_000,
            dns_refresh_seconds: 30,
            dns_servers: Vec::new(),
            demo: true,
            access_log: true,
            keep_alive_timeout_seconds: 60,
            header_timeout_seconds: 10,
            body_timeout_ms: 10_000,
            send_timeout_ms: 60_000,
            http2_idle_timeout_ms: 60_000,
            http2_keep_alive_interval_ms: 30_000,
            http2_keep_alive_timeout_ms: 10_000,
            http2_max_concurrent_streams: 128,
            max_connections_per_worker: 10_000,
            max_connections_per_address: 0,
            tls: None,
            dpop_replay_max_bytes: keygate_core::dpop::ReplayLimits::default().max_bytes,
            dpop_replay_max_per_caller: keygate_core::dpop::ReplayLimits::default().max_per_caller,
        }
    }
}

/// Time limits of a client connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long an idle keep-alive connection waits for its next request.
    pub keep_alive: std::time::Duration,
    /// How long a request head may take to arrive once it has begun (slow-header attacks).
    pub header: std::time::Duration,
    /// How long the body of a request keygate answers itself may take to arrive once its head
    /// has (slow-body attacks on the OAuth endpoints).
    pub body: std::time::Duration,
    /// How long an answer may wait for the client to take any of it (a client that stops
    /// reading): an HTTP/1.1 write without progress, an HTTP/2 answer without window.
    pub send: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            keep_alive: std::time::Duration::from_secs(60),
            header: std::time::Duration::from_secs(10),
            body: std::time::Duration::from_secs(10),
            send: std::time::Duration::from_secs(60),
        }
    }
}

/// The HTTP/2 settings of client connections.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    /// A connection with no open stream for this long is closed.
    pub idle: std::time::Duration,
    /// How often a PING checks the client is there; `None` sends none.
    pub keep_alive_interval: Option<std::time::Duration>,
    /// How long a PING may go unanswered.
    pub keep_alive_timeout: std::time::Duration,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
}

/// Everything about client connections: time limits, HTTP/2 and the connection caps.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub timeouts: Timeouts,
    pub http2: Http2Settings,
    /// Connections one worker serves at once.
    pub max_per_worker: usize,
    /// Connections one address (IPv6: /64) holds at once over all workers; 0: no cap.
    pub max_per_address: usize,
}

impl Default for ConnSettings {
    fn default() -> Self {
        GatewayConfig::default().conn_settings()
    }
}

impl GatewayConfig {
    /// The client connection time limits.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            keep_alive: std::time::Duration::from_secs(self.keep_alive_timeout_seconds.max(1)),
            header: std::time::Duration::from_secs(self.header_timeout_seconds.max(1)),
            body: std::time::Duration::from_millis(self.body_timeout_ms.max(1)),
            send: std::time::Duration::from_millis(self.send_timeout_ms.max(1)),
        }
    }

    /// Everything about client connections: time limits, HTTP/2 settings and caps.
    pub fn conn_settings(&self) -> ConnSettings {
        let ms = std::time::Duration::from_millis;
        ConnSettings {
            timeouts: self.timeouts(),
            http2: Http2Settings {
                idle: ms(self.http2_idle_timeout_ms.max(1)),
                keep_alive_interval: (self.http2_keep_alive_interval_ms > 0)
                    .then(|| ms(self.http2_keep_alive_interval_ms)),
                keep_alive_timeout: ms(self.http2_keep_alive_timeout_ms.max(1)),
                max_concurrent_streams: self.http2_max_concurrent_streams.max(1),
            },
            max_per_worker: self.max_connections_per_worker.max(1),
            max_per_address: self.max_connections_per_address,
        }
    }

    /// The DNS servers of `dns_servers`, with their ports (53 when not given).
    pub fn dns_server_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        const MAX_DNS_SERVERS: usize = 8;
        if self.dns_servers.len() > MAX_DNS_SERVERS {
            return Err(format!("gateway.dns_servers: at most {MAX_DNS_SERVERS} servers"));
        }
        self.dns_servers
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        format!(
                            "gateway.dns_servers: {s:?} is not an IP address or IP:port (for example \"10.0.0.2\" or \"127.0.0.1:8600\")"
                        )
                    })
            })
            .collect()
    }

    /// Checks the listener settings; the error names the key and what to do.
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("keep_alive_timeout_seconds", self.keep_alive_timeout_seconds),
            ("header_timeout_seconds", self.header_timeout_seconds),
            ("body_timeout_ms", self.body_timeout_ms),
            ("send_timeout_ms", self.send_timeout_ms),
            ("http2_idle_timeout_ms", self.http2_idle_timeout_ms),
            ("http2_keep_alive_timeout_ms", self.http2_keep_alive_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!("gateway.{key} must be at least 1"));
            }
        }
        if self.dns_refresh_seconds == 0 {
            return Err("gateway.dns_refresh_seconds must be at least 1".into());
        }
        self.dns_server_addrs()?;
        if self.http2_max_concurrent_streams == 0 {
            return Err("gateway.http2_max_concurrent_streams must be at least 1".into());
        }
        if self.max_connections_per_worker == 0 {
            return Err("gateway.max_connections_per_worker must be at least 1 (it bounds what a worker holds)".into());
        }
        Ok(())
    }
}

/// `[gateway.tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How a route spreads requests over its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastRequests,
}

/// The HTTP version keygate speaks to a route's upstreams (`upstream_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (ALPN `http/1.1` on `https://`).
    #[default]
    Http1,
    /// HTTP/2 only: ALPN `h2` on `https://`, prior knowledge (h2c) on `http://`. What gRPC
    /// upstreams need.
    Http2,
    /// `https://` only: ALPN offers `h2` and `http/1.1`, and the upstream's choice is used.
    Auto,
}

/// `[[routes]]`: one API behind the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A unique name, used in metrics, logs and usage.
    pub id: String,
    /// A path prefix, matched on whole segments after normalization (`/orders` matches
    /// `/orders` and `/orders/7`, not `/orders-old`).
    pub path: String,
    /// Match only requests for this host (the `Host` header or `:authority`, without port).
    pub host: Option<String>,
    /// Match only requests whose header fields have these values (`headers = {
    /// accept-version = "2" }`; a list gives values any of which matches): how an API's versions
    /// are told apart by a header. Names compare ignoring case, values exactly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, HeaderValues>,
    /// The upstream, such as `http://127.0.0.1:9000`. Give this or `upstreams`.
    pub upstream: Option<String>,
    /// Several upstreams, balanced by `balance`.
    #[serde(default)]
    pub upstreams: Vec<String>,
    #[serde(default)]
    pub balance: Balance,
    /// No token needed.
    #[serde(default)]
    pub public: bool,
    /// The scope each method requires (`GET = "orders:read"`); `"*"` covers the other
    /// methods. A method with no entry needs only a valid token.
    #[serde(default)]
    pub scopes: BTreeMap<String, String>,
    /// Remove the route's path prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Largest request body for this route, in bytes.
    pub max_body_bytes: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    /// Upstreams named by DNS host names: how often the names are looked up again, in seconds.
    /// Default: `[gateway] dns_refresh_seconds` (30).
    #[serde(default)]
    pub dns_refresh_seconds: Option<u64>,
    /// How many times an idempotent request (GET, HEAD, OPTIONS, PUT, DELETE) is retried on
    /// another upstream when the connection fails. Default 1.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// A per-token limit on this route; it can only tighten the token's own.
    pub rate_limit: Option<RateLimit>,
    pub cors: Option<CorsConfig>,
    pub health_check: Option<HealthCheckConfig>,
    /// Send the upstream a short-lived JWT signed by keygate (`Authorization: Bearer`, 60
    /// seconds, verifiable with keygate's JWKS) that says who called, instead of the caller's
    /// credential — the "phantom token" pattern: upstreams never see tokens.
    #[serde(default)]
    pub identity_token: bool,
    /// The protocols a request may switch to with `Upgrade` on this route (RFC 9110 §7.8),
    /// compared by name, ignoring case (a `/version` suffix of the request is ignored). Default
    /// `["websocket"]`; `[]` allows none. `h2c` is never allowed (RFC 9113 §3.1 removed it, and
    /// after its 101 a client could send the upstream requests keygate never checked).
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// Client addresses refused on this route (addresses and CIDRs), before any token work:
    /// 403 `address_denied`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// The API (of the route's workspace, by id `api_…` or by name) this route serves: the
    /// route follows its lifecycle — a draft serves only its own workspace, a deprecated one
    /// answers with `Deprecation`, `Sunset` and `Link`, a retired one answers 410 `api_retired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The version of `api` this route serves (such as `v1`): the route follows the stricter of
    /// the API's state and the version's. Needs `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Check each request against the OpenAPI document of `api` (its parameters and JSON body)
    /// before forwarding it: an invalid one is answered 400 `request_invalid` (docs/gateway.md,
    /// "Request validation"). Needs `api`. The version's `validate` turns it on too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub validate: bool,
    /// For the developer portal: what this API is.
    pub description: Option<String>,
    /// For the developer portal: an OpenAPI document (file path or URL).
    pub openapi: Option<String>,
    /// The workspace (by name) the route belongs to: only its tokens, API keys and JWTs are
    /// accepted here, unless the route is `shared`. Default: the default workspace. Routes made
    /// through the admin API belong to the caller's workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// Accept the credentials of every workspace on this route (the demo route is shared).
    #[serde(default)]
    pub shared: bool,
    /// `https://` upstreams: a PEM file of the CA certificates to trust instead of the
    /// operating system's trust store.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// `https://` upstreams: the name sent in SNI and verified in the upstream's certificate,
    /// instead of the upstream URL's host.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// `https://` upstreams: a PEM certificate chain keygate presents as a client (mTLS); needs
    /// `tls_client_key`.
    #[serde(default)]
    pub tls_client_cert: Option<String>,
    /// `https://` upstreams: the PEM private key of `tls_client_cert`.
    #[serde(default)]
    pub tls_client_key: Option<String>,
    /// DANGEROUS: accept any certificate for any name from this route's `https://` upstreams
    /// (anyone on the path can then read and change the traffic). Off by default; a warning
    /// names the route at every start. For tests only: prefer `tls_ca_file`.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// The HTTP version spoken to the upstreams: `http1` (default), `http2` (h2 over TLS, or
    /// h2c with prior knowledge over `http://`; needed for gRPC), or `auto` (`https://` only:
    /// negotiated by ALPN).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// `[routes.cache]`: keep answers the upstream marks cacheable for shared caches (RFC
    /// 9111) in memory, and serve them again to callers the route admits. Off without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// `http` (default): requests are forwarded to the upstreams. `ai`: keygate serves the
    /// OpenAI- and Anthropic-compatible APIs under the route's path and calls the providers
    /// (`[[providers]]`) itself; the route needs no upstream ([`crate::ai`]).
    #[serde(default, skip_serializing_if = "RouteKind::is_http")]
    pub kind: RouteKind,
    /// `[routes.ai]`: the models of an `ai` route and its limits per virtual key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai: Option<AiRouteConfig>,
}

/// What a route does with the requests it admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Forwarded to the route's upstreams.
    #[default]
    Http,
    /// Served by keygate's AI gateway: a keygate token is a virtual key for LLM providers.
    Ai,
}

impl RouteKind {
    pub fn is_http(&self) -> bool {
        *self == Self::Http
    }
}

/// `[routes.ai]`: the models an `ai` route offers and what each virtual key may spend on it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AiRouteConfig {
    /// Model names callers use → the deployments that serve them (`"provider/model"`), in order
    /// of preference: the next is tried when one answers 429 or 5xx or cannot be reached. A
    /// caller may also name a deployment itself (`"openai/gpt-4o-mini"`) unless
    /// `aliases_only`.
    #[serde(default)]
    pub models: BTreeMap<String, Vec<String>>,
    /// Only the names in `models` may be called.
    #[serde(default)]
    pub aliases_only: bool,
    /// How a model's deployments are used: `fallback` (default) tries them in their order, each
    /// call starting with the first; `round_robin` starts each call with the next one in turn
    /// (spreading calls over several deployments or keys of one model), the others following
    /// as fallbacks.
    #[serde(default)]
    pub balance: AiBalance,
    /// LLM tokens (input and output) each virtual key may use per minute on this route: the
    /// cost is estimated before the call and settled from the answer's `usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u32>,
    /// What each virtual key may spend on this route, in US dollars, per `day` or `month`
    /// (UTC), priced by the providers' `prices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<AiBudget>,
    /// What all the keys of one app may spend on this route together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_budget: Option<AiBudget>,
    /// What all the keys of the workspace may spend on this route together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_budget: Option<AiBudget>,
    /// How long a provider may take to start its answer before the next deployment is tried,
    /// in milliseconds. Default 120,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout_ms: Option<u64>,
    /// Log each call's request body and answer (never headers, so never a credential), each cut
    /// at 64 KiB, readable by the workspace's admins. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_prompts: bool,
    /// Days a logged call is kept (default 7, at most 3650).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_retention_days: Option<u32>,
    /// Prompts published as plain REST endpoints: `POST {path}/{name}` with a JSON object of the
    /// template's fields answers with the model's answer (as JSON with `json = true`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, AiPromptConfig>,
}

/// `[routes.ai.prompts.NAME]`: a prompt template, a model and its parameters behind a REST
/// endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AiPromptConfig {
    /// The model called: one of the route's names (an alias, or a deployment if the route
    /// allows those).
    pub model: String,
    /// The system prompt (no fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The user message, with `{{field}}` where the request's fields go.
    pub template: String,
    /// Ask the model for a JSON object and answer with it (parsed); otherwise the answer is
    /// `{"text": …}`.
    #[serde(default)]
    pub json: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The scope a token needs to call the endpoint (instead of the model's `llm:` scope).
    /// Default `prompt:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Shown in the developer portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// How an `ai` route uses a model's deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AiBalance {
    #[default]
    Fallback,
    RoundRobin,
}

/// A budget in money: `{ usd = 5.0, period = "month" }`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AiBudget {
    pub usd: f64,
    pub period: keygate_core::policy::QuotaPeriod,
}

/// `[[providers]]`: an LLM provider that `ai` routes call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The name models are prefixed with (`openai` in `"openai/gpt-4o-mini"`): letters, digits,
    /// `-`, `_`.
    pub id: String,
    /// `openai` (and every OpenAI-compatible server: vLLM, Ollama, LM Studio, Mistral, Groq,
    /// DeepSeek), `anthropic`, or `azure` (Azure OpenAI: deployments in the URL, an `api-key`
    /// header, `api_version`).
    pub kind: ProviderKind,
    /// Such as `https://api.openai.com/v1`, `https://api.anthropic.com/v1`,
    /// `https://NAME.openai.azure.com/openai`. `http://` only for loopback addresses.
    pub base_url: String,
    /// The environment variable that holds the provider's key (never the key itself in the
    /// file). None: the provider needs no key (a local server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Or a file that holds the key (a mounted secret), read at start; trailing white space is
    /// not part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Anthropic: the `anthropic-version` sent (default `2023-06-01`); Azure: the
    /// `api-version` query parameter (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Prices per model, in US dollars per million tokens.
    #[serde(default)]
    pub prices: BTreeMap<String, ModelPrice>,
}

/// The kind of API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Azure,
}

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
    /// Input tokens read from the provider's prompt cache. Default: `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
}

impl RouteConfig {
    /// A route of `path` to one `upstream`, everything else at its default (as in a file that
    /// names only `id`, `path` and `upstream`).
    pub fn new(id: &str, path: &str, upstream: &str) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            host: None,
            headers: BTreeMap::new(),
            upstream: Some(upstream.into()),
            upstreams: Vec::new(),
            balance: Balance::default(),
            public: false,
            scopes: BTreeMap::new(),
            strip_prefix: false,
            max_body_bytes: None,
            connect_timeout_ms: None,
            request_timeout_ms: None,
            dns_refresh_seconds: None,
            retries: default_retries(),
            rate_limit: None,
            cors: None,
            health_check: None,
            identity_token: false,
            upgrades: default_upgrades(),
            deny: Vec::new(),
            api: None,
            version: None,
            validate: false,
            description: None,
            openapi: None,
            workspace: None,
            shared: false,
            tls_ca_file: None,
            tls_server_name: None,
            tls_client_cert: None,
            tls_client_key: None,
            tls_insecure_skip_verify: false,
            upstream_protocol: UpstreamProtocol::Http1,
            cache: None,
            kind: RouteKind::Http,
            ai: None,
        }
    }
}

/// The values a route's header condition accepts: one (`"2"`) or several (`["2", "2.0"]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderValues(pub Vec<String>);

impl Serialize for HeaderValues {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for HeaderValues {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = HeaderValues;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a header value (a string) or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HeaderValues, E> {
                Ok(HeaderValues(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderValues, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    out.push(v);
                }
                Ok(HeaderValues(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

fn default_retries() -> u32 {
    1
}

fn default_upgrades() -> Vec<String> {
    vec!["websocket".into()]
}

/// `[routes.cors]`: answered by the gateway; preflight requests need no token.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins, or `["*"]`.
    pub allow_origins: Vec<String>,
    #[serde(default = "default_cors_methods")]
    pub allow_methods: Vec<String>,
    #[serde(default = "default_cors_headers")]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    /// Seconds a browser may cache a preflight answer. Default 600.
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
}

impl CorsConfig {
    /// Refuses what a browser would turn into a hole. `allow_credentials` with a `"*"` origin
    /// would make the gateway send the caller's own origin back with
    /// `Access-Control-Allow-Credentials: true` (the Fetch standard forbids `*` with credentials,
    /// so the only way to "allow every origin with credentials" is reflection): any site a signed-in
    /// user visits could then read answers made with that user's cookies or client certificate.
    /// The error names the key, for `keygate config check`.
    pub fn validate(&self) -> Result<(), String> {
        if self.allow_credentials && self.allow_origins.iter().any(|o| o == "*") {
            return Err("cors.allow_credentials = true cannot be combined with allow_origins = [\"*\"]: \
                 list the origins that may send credentials (such as \"https://app.example\"), or drop \
                 allow_credentials"
                .into());
        }
        if self.allow_origins.is_empty() {
            return Err("cors.allow_origins is empty; list the allowed origins, or remove the cors table".into());
        }
        let lists = [
            ("allow_origins", &self.allow_origins),
            ("allow_methods", &self.allow_methods),
            ("allow_headers", &self.allow_headers),
            ("expose_headers", &self.expose_headers),
        ];
        for (key, list) in lists {
            // Each entry is written into an answer's head: it must be a field value with no
            // separators of its own (RFC 9110 §5.5), or the header would be dropped or split.
            if let Some(bad) =
                list.iter().find(|v| v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            {
                return Err(format!(
                    "cors.{key}: {bad:?} is not a single value without spaces, commas or control characters"
                ));
            }
        }
        Ok(())
    }
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].map(String::from).to_vec()
}

fn default_cors_headers() -> Vec<String> {
    ["authorization", "content-type"].map(String::from).to_vec()
}

fn default_max_age() -> u64 {
    600
}

/// `[routes.cache]`: the route's response cache (see `docs/gateway.md#response-cache`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The memory the route's cache may hold, in bytes, counting each entry's key, header fields
    /// and body; beyond it the least recently used entries go. Default 16 MiB.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
    /// The largest entry kept, in bytes (key, fields and body); a larger answer is passed on
    /// and not kept. Default 1 MiB.
    #[serde(default = "default_cache_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Who shares an entry: `token` (default: each token its own), `app` (the tokens of one
    /// app), or `route` (every caller the route admits).
    #[serde(default)]
    pub key_by: CacheKeyBy,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_cache_max_bytes(),
            max_entry_bytes: default_cache_max_entry_bytes(),
            key_by: CacheKeyBy::default(),
        }
    }
}

/// Who shares the entries of a route's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKeyBy {
    /// Each token (an API key, a JWT by its id) has entries of its own.
    #[default]
    Token,
    /// The tokens of one app share entries.
    App,
    /// Every caller the route admits shares entries.
    Route,
}

/// The smallest `max_bytes` accepted.
pub const CACHE_MIN_BYTES: u64 = 1024;

impl CacheConfig {
    /// Checks the sizes; the error starts with its stable code and names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes < CACHE_MIN_BYTES {
            return Err(format!(
                "cache_max_bytes_too_small: cache.max_bytes must be at least {CACHE_MIN_BYTES} (it is {})",
                self.max_bytes
            ));
        }
        if self.max_entry_bytes == 0 {
            return Err("cache_max_entry_bytes_zero: cache.max_entry_bytes must be at least 1".into());
        }
        if self.max_entry_bytes > self.max_bytes {
            return Err(format!(
                "cache_entry_larger_than_cache: cache.max_entry_bytes ({}) must not exceed cache.max_bytes ({})",
                self.max_entry_bytes, self.max_bytes
            ));
        }
        Ok(())
    }
}

fn default_cache_max_bytes() -> u64 {
    16 * 1024 * 1024
}

fn default_cache_max_entry_bytes() -> u64 {
    1024 * 1024
}

/// `[routes.health_check]`: active checks; passive checks (failures of real requests) always run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested on each upstream, such as `/healthz`; any 2xx or 3xx is healthy.
    pub path: String,
    /// Seconds between checks. Default 5.
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    /// Consecutive failures before an upstream is taken out. Default 3.
    #[serde(default = "default_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive successes before it is put back. Default 2.
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
}

fn default_interval() -> u64 {
    5
}

fn default_threshold() -> u32 {
    3
}

fn default_healthy() -> u32 {
    2
}

/// A route's `upgrades`, checked and lowercased: each a protocol name (an RFC 9110 token),
/// never `h2c`.
pub(crate) fn upgrade_allowlist(names: &[String]) -> Result<Box<[Box<str>]>, String> {
    names
        .iter()
        .map(|n| {
            let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if n.is_empty() || !n.bytes().all(tchar) {
                return Err(format!("upgrades: {n:?} is not a protocol name (such as \"websocket\")"));
            }
            if n.eq_ignore_ascii_case("h2c") {
                return Err("upgrades: h2c cannot be allowed (RFC 9113 §3.1); HTTP/2 clients connect with prior knowledge or ALPN".into());
            }
            Ok(n.to_ascii_lowercase().into_boxed_str())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn cors(origins: &[&str], credentials: bool) -> CorsConfig {
        CorsConfig {
            allow_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allow_methods: default_cors_methods(),
            allow_headers: default_cors_headers(),
            expose_headers: Vec::new(),
            allow_credentials: credentials,
            max_age_seconds: default_max_age(),
        }
    }

    #[test]
    fn cors_wildcard_with_credentials_is_refused_and_names_the_key() {
        let e = cors(&["*"], true).validate().unwrap_err();
        assert!(e.contains("cors.allow_credentials"), "{e}");
        assert!(cors(&["https://a.example", "*"], true).validate().is_err());
        assert!(cors(&["*"], false).validate().is_ok());
        assert!(cors(&["https://a.example"], true).validate().is_ok());
        assert!(cors(&[], false).validate().unwrap_err().contains("cors.allow_origins"));
        assert!(cors(&["https://a.example\r\nx: y"], false).validate().unwrap_err().contains("cors.allow_origins"));
        let mut spaced = cors(&["https://a.example"], false);
        spaced.expose_headers = vec!["a, b".into()];
        assert!(spaced.validate().unwrap_err().contains("cors.expose_headers"));
    }

    #[test]
    fn cache_sizes_are_checked_with_stable_codes() {
        assert!(CacheConfig::default().validate().is_ok());
        let c = |max_bytes, max_entry_bytes| CacheConfig { max_bytes, max_entry_bytes, ..Default::default() };
        assert!(c(1023, 1).validate().unwrap_err().starts_with("cache_max_bytes_too_small: cache.max_bytes"));
        assert!(c(4096, 0).validate().unwrap_err().starts_with("cache_max_entry_bytes_zero:"));
        assert!(c(4096, 4097).validate().unwrap_err().starts_with("cache_entry_larger_than_cache:"));
        assert!(c(4096, 4096).validate().is_ok());
        let parsed: RouteConfig = serde_json::from_value(serde_json::json!({
            "id": "r", "path": "/r", "upstream": "http://127.0.0.1:1", "cache": {"key_by": "app"}
        }))
        .unwrap();
        assert_eq!(parsed.cache, Some(CacheConfig { key_by: CacheKeyBy::App, ..Default::default() }));
        let unknown = serde_json::from_value::<RouteConfig>(serde_json::json!({
            "id": "r", "path": "/r", "upstream": "http://127.0.0.1:1", "cache": {"ttl": 5}
        }));
        assert!(unknown.is_err(), "unknown keys are refused");
        let back = serde_json::to_value(RouteConfig::new("r", "/r", "http://127.0.0.1:1")).unwrap();
        assert!(back.get("cache").is_none(), "no cache table: none written");
    }
}
