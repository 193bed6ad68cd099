//! keygate's one validated configuration: defaults, then the TOML file, then `KEYGATE_*`
//! environment variables, then command-line flags. Unknown keys in the file are errors that name
//! the key. Every field's doc comment is its user documentation (`docs/configuration.md`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keygate_core::token_format::TokenPrefix;
pub use keygate_gateway::config::{GatewayConfig, RouteConfig};
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded SQLite database and the pepper file live; created at first start.
    /// Env: `KEYGATE_DATA_DIR`; flag: `--data-dir`. Default `./keygate-data`.
    pub data_dir: PathBuf,
    /// A `postgres://` URL selects PostgreSQL instead of SQLite. Env: `KEYGATE_DATABASE_URL`.
    pub database_url: Option<String>,
    pub admin: AdminConfig,
    pub health: HealthConfig,
    pub dashboard: DashboardConfig,
    pub gateway: GatewayConfig,
    /// The APIs behind the gateway (`[[routes]]`); see `docs/configuration.md`.
    pub routes: Vec<RouteConfig>,
    /// The LLM providers that routes of kind `ai` call (`[[providers]]`); see
    /// `docs/ai-gateway.md`.
    pub providers: Vec<keygate_gateway::config::ProviderConfig>,
    /// `[ai]`: settings of the AI gateway.
    pub ai: AiConfig,
    /// Seconds between flushes of quota counts to the store (default 5): a crash can let this
    /// much of a quota's use through again. Usage counts and `last_used_at` are written once a
    /// minute, for the minutes that have ended, so a crash loses at most the running minute and
    /// this interval of usage. A graceful stop writes everything.
    pub usage_flush_seconds: u64,
    pub tokens: TokensConfig,
    pub oauth: OAuthConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
    pub redis: RedisConfig,
    pub audit: AuditConfig,
    pub secret_scanning: SecretScanningConfig,
    pub webhooks: WebhooksConfig,
    pub notifications: NotificationsConfig,
    pub email: EmailConfig,
    pub siem: SiemConfig,
    pub anomaly: AnomalyConfig,
    pub call_log: CallLogConfig,
    /// How long a graceful shutdown waits for in-flight requests, in seconds. Default 30.
    pub shutdown_grace_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API (and, later, the dashboard). Keep it on loopback or a private
    /// network. Env: `KEYGATE_ADMIN_LISTEN`. Default `127.0.0.1:8081`.
    pub listen: SocketAddr,
}

/// `[health]`: a listener with only `GET /healthz` and `GET /readyz`, for load balancers and
/// orchestrators that must not reach the admin API (which stays on loopback).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Its address, such as `0.0.0.0:8082`. Env: `KEYGATE_HEALTH_LISTEN`. Default unset (the
    /// probes are on the admin listener only).
    pub listen: Option<SocketAddr>,
}

/// The web dashboard, served on the admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// Mark the session cookie `Secure` and send HSTS: set it when people reach the dashboard
    /// over HTTPS (through a TLS-terminating proxy). Default false (loopback, plain HTTP).
    pub secure_cookies: bool,
    /// A session unused for this many minutes ends. Default 30.
    pub idle_timeout_minutes: u32,
    /// A session ends this many hours after sign-in, whatever the activity. Default 12.
    pub session_hours: u32,
    /// The gateway's address as callers reach it, shown in examples. Default: the gateway's
    /// listen address.
    pub gateway_url: Option<String>,
    /// Where people reach the dashboard (such as `https://keys.example.com`), used in invitation
    /// links. Default: the host each request names.
    pub public_url: Option<String>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self { secure_cookies: false, idle_timeout_minutes: 30, session_hours: 12, gateway_url: None, public_url: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensConfig {
    /// The prefix of issued tokens (2–8 lowercase letters and digits, starting with a letter);
    /// root keys use `<prefix>root`. Env: `KEYGATE_TOKEN_PREFIX`. Default `kg`.
    pub prefix: String,
    /// The longest grace period a rotation may ask for, in seconds. Default 2592000 (30 days).
    pub max_grace_period_seconds: u64,
}

/// `[oauth]`: the OAuth2 authorization server and the JWT access tokens the gateway accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// The issuer (`iss` of keygate's tokens, and the base of the endpoint URLs in the metadata):
    /// the gateway's URL as clients reach it. Default `http://` + `gateway.listen`.
    pub issuer: Option<String>,
    /// The audience (`aud`) of access tokens when a client names none, and the one the gateway
    /// requires of keygate's tokens. Default: the issuer.
    pub audience: Option<String>,
    /// Access-token lifetime for clients that set none, in seconds. Default 900.
    pub access_token_ttl_seconds: u32,
    /// Refresh-token lifetime for clients that set none, in seconds. Default 2592000 (30 days).
    pub refresh_token_ttl_seconds: u32,
    /// The longest access-token lifetime a client may set, in seconds. Default 86400.
    pub max_access_token_ttl_seconds: u32,
    /// The longest lifetime of a token from token exchange, in seconds. Default 300.
    pub exchange_ttl_seconds: u32,
    /// Clock skew allowed when checking tokens and proofs, in seconds. Default 30.
    pub leeway_seconds: u32,
    /// Signing keys are replaced after this many days. Default 90.
    pub key_rotation_days: u32,
    /// A new signing key is in the JWKS this long before it signs, in seconds. Default 3600.
    pub key_publish_ahead_seconds: u32,
    /// Require server-provided nonces in DPoP proofs (RFC 9449 §8 and §9), at the token endpoint
    /// and the gateway; clients get them in `DPoP-Nonce`. Default false.
    pub dpop_nonces: bool,
    /// Other issuers whose JWT access tokens the gateway accepts.
    pub trusted_issuers: Vec<TrustedIssuerConfig>,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            access_token_ttl_seconds: 900,
            refresh_token_ttl_seconds: 30 * 86_400,
            max_access_token_ttl_seconds: 86_400,
            exchange_ttl_seconds: 300,
            leeway_seconds: 30,
            key_rotation_days: 90,
            key_publish_ahead_seconds: 3_600,
            dpop_nonces: false,
            trusted_issuers: Vec::new(),
        }
    }
}

/// `[[oauth.trusted_issuers]]`: an identity provider whose access tokens (EdDSA or ES256 JWTs)
/// the gateway accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuerConfig {
    /// Its `iss`.
    pub issuer: String,
    /// The `aud` its tokens must carry for this gateway.
    pub audience: String,
    /// Where its JWK Set is fetched (at start, every 10 minutes, and — at most every 30 s — when a
    /// token names a key not yet known). Keys named inside tokens are never fetched.
    pub jwks_url: String,
    /// The workspace (by name) its tokens belong to: they are accepted on that workspace's routes
    /// and on shared ones. Default: the default workspace.
    #[serde(default)]
    pub workspace: Option<String>,
}

/// `[cluster]`: how the nodes that share one PostgreSQL know each other. Each node registers
/// itself in the store and beats with the change-feed position it has applied; the answer to a
/// token change waits until every live node has applied it. One node (SQLite) needs none of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in the registry, stable across restarts (1–128 of `A-Z a-z 0-9 . _ : -`).
    /// Env: `KEYGATE_NODE_ID`. Default: the host name and the gateway port (`web-1:8080`).
    pub node_id: Option<String>,
    /// Seconds between heartbeats. Default 2.
    pub heartbeat_seconds: u64,
    /// A node whose last heartbeat is older than this many seconds is no longer live: it is
    /// listed as `unreachable` and not waited for. At least twice `heartbeat_seconds`. Default 10.
    pub node_timeout_seconds: u64,
    /// How long the answer to a token change (revoke, suspend, resume, update, rotate; OAuth
    /// revocations) waits for every live node to apply it, in milliseconds; the answer says how
    /// many did. 0 answers at once. Env: `KEYGATE_PROPAGATION_TIMEOUT_MS`. Default 1000.
    pub propagation_timeout_ms: u64,
    /// How long the change feed keeps token changes, in hours; older ones are deleted (hourly, by
    /// any node). A node that was away longer reloads a snapshot instead of replaying. Default
    /// 168 (7 days).
    pub feed_retention_hours: u64,
}

/// `[secret_scanning]`: the endpoint on the gateway listener where code-hosting platforms report
/// keygate tokens they found in public code (GitHub's secret-scanning partner format). Off until a
/// platform's key is configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretScanningConfig {
    /// The path on the gateway listener. Default `/.well-known/keygate/secret-scanning`.
    pub path: String,
    /// The platform's public keys (`[[secret_scanning.keys]]` with `id` and `pem`), as the
    /// platform publishes them (GitHub: `https://api.github.com/meta/public_keys/secret_scanning`).
    pub keys: Vec<PartnerKeyConfig>,
}

impl Default for SecretScanningConfig {
    fn default() -> Self {
        Self { path: "/.well-known/keygate/secret-scanning".into(), keys: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerKeyConfig {
    /// The key's identifier, as the platform sends it in `Github-Public-Key-Identifier`.
    pub id: String,
    /// The ECDSA P-256 public key, PEM (`-----BEGIN PUBLIC KEY-----`).
    pub pem: String,
}

impl SecretScanningConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !self.path.starts_with('/') || self.path.len() > 200 || self.path.bytes().any(|b| !b.is_ascii_graphic()) {
            bail!("secret_scanning.path must be a path starting with /, of visible ASCII, at most 200 characters");
        }
        let pairs: Vec<(String, String)> = self.keys.iter().map(|k| (k.id.clone(), k.pem.clone())).collect();
        keygate_admin::secret_scanning::PartnerKeys::from_pem(&pairs)
            .map_err(|e| anyhow::anyhow!("secret_scanning.keys: {e}"))?;
        Ok(())
    }
}

/// `[ai]`: settings of the AI gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AiConfig {
    /// Allow providers made through the admin API or the dashboard on loopback, private and
    /// link-local addresses (an Ollama or vLLM inside your network). Default false: their
    /// `base_url` must name a public host, so that a workspace's administrator cannot make the
    /// gateway call into the network it runs in. (The config file's `[[providers]]` are the
    /// operator's and may name any host.)
    pub allow_private_providers: bool,
}

/// `[webhooks]`: how signed events are delivered to the workspaces' endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Allow endpoints on private, loopback and link-local addresses (a receiver inside your
    /// network). Default false: URLs and the addresses their names resolve to must be public, so
    /// that nobody can make keygate call into the network it runs in.
    pub allow_private: bool,
    /// An endpoint every attempt to which failed for this many hours is disabled, with a
    /// `webhook.disabled` notice. Default 24.
    pub disable_after_hours: u64,
    /// Seconds an attempt may take (connecting, sending, the answer's status). Default 10.
    pub timeout_seconds: u64,
    /// Days delivered and failed deliveries are kept in the delivery log. Default 30.
    pub retention_days: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self { allow_private: false, disable_after_hours: 24, timeout_seconds: 10, retention_days: 30 }
    }
}

impl WebhooksConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=720).contains(&self.disable_after_hours) {
            bail!("webhooks.disable_after_hours must be between 1 and 720 (30 days)");
        }
        if !(1..=60).contains(&self.timeout_seconds) {
            bail!("webhooks.timeout_seconds must be between 1 and 60");
        }
        if !(1..=3_650).contains(&self.retention_days) {
            bail!("webhooks.retention_days must be between 1 and 3650");
        }
        Ok(())
    }

    fn settings(&self, notifications: &NotificationsConfig) -> keygate_admin::webhooks::NotifySettings {
        keygate_admin::webhooks::NotifySettings {
            expiring_days: notifications.expiring_days,
            dashboard_url: None,
            allow_private: self.allow_private,
            disable_after_ms: i64::try_from(self.disable_after_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX),
            retention_ms: i64::try_from(self.retention_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX),
        }
    }
}

/// `[notifications]`: when the events that are not changes happen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// `token.expiring` is sent this many days before a token expires. Default 7.
    pub expiring_days: u32,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self { expiring_days: 7 }
    }
}

impl NotificationsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=365).contains(&self.expiring_days) {
            bail!("notifications.expiring_days must be between 1 and 365");
        }
        Ok(())
    }
}

/// `[call_log]`: every gateway call recorded, for forensics (docs/operations.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallLogConfig {
    /// Record every call. Default true.
    pub enabled: bool,
    /// Calls older than this many days are deleted. Default 7.
    pub retention_days: u32,
}

impl Default for CallLogConfig {
    fn default() -> Self {
        Self { enabled: true, retention_days: 7 }
    }
}

impl CallLogConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=3650).contains(&self.retention_days) {
            bail!("call_log.retention_days must be between 1 and 3650");
        }
        Ok(())
    }
}

/// `[anomaly]`: anomaly detection on tokens' usage (docs/notifications.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// The gateway counts what each token does and the detectors raise alerts. Default true.
    pub enabled: bool,
    /// `low` (fewer alerts), `normal` or `high` (more). Default `normal`.
    pub sensitivity: String,
    /// Baselines each node holds in memory (the least recently seen written back and let go of
    /// beyond it). Default 100,000.
    pub max_tokens: usize,
    /// Resolved alerts are deleted this many days after their resolution (the audit trail keeps
    /// their `anomaly.detected` events). Default 365.
    pub alert_retention_days: u32,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self { enabled: true, sensitivity: "normal".into(), max_tokens: 100_000, alert_retention_days: 365 }
    }
}

impl AnomalyConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if keygate_core::anomaly::Sensitivity::preset(&self.sensitivity).is_none() {
            bail!("anomaly.sensitivity must be one of low, normal, high (got {:?})", self.sensitivity);
        }
        if !(1_000..=10_000_000).contains(&self.max_tokens) {
            bail!("anomaly.max_tokens must be between 1000 and 10000000");
        }
        if !(1..=3650).contains(&self.alert_retention_days) {
            bail!("anomaly.alert_retention_days must be between 1 and 3650");
        }
        Ok(())
    }

    pub fn settings(&self) -> keygate_admin::alerts::AnomalySettings {
        keygate_admin::alerts::AnomalySettings {
            sensitivity: keygate_core::anomaly::Sensitivity::preset(&self.sensitivity).unwrap_or_default(),
            max_tokens: self.max_tokens,
        }
    }
}

/// `[email]`: email notifications through an SMTP server. Off unless `smtp_url` is set.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// `smtps://user:password@host:465` (TLS), `smtp://user:password@host:587?tls=required`
    /// (STARTTLS), or `smtp://host:25` (plain, for a relay on the same host). A user and password
    /// need TLS (`smtps://` or `?tls=required`) unless the host is loopback (`localhost`,
    /// 127.0.0.0/8, `::1`): otherwise the configuration is refused (`smtp_credentials_without_tls`).
    /// Percent-encode special characters of the user and password. Env: `KEYGATE_SMTP_URL` (keeps
    /// the password out of the file). Never logged.
    pub smtp_url: Option<String>,
    /// The sender, such as `keygate <keygate@example.com>`. Required with `smtp_url`.
    pub from: Option<String>,
    /// Seconds one message's send may take, start to end (connect, greeting, every answer):
    /// past it the attempt fails and is retried, and the other emails go on. Default 15.
    pub timeout_seconds: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self { smtp_url: None, from: None, timeout_seconds: 15 }
    }
}

impl std::fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold the SMTP password.
        f.debug_struct("EmailConfig")
            .field("smtp_url", &self.smtp_url.as_ref().map(|_| "<set>"))
            .field("from", &self.from)
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

impl EmailConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let Some(url) = &self.smtp_url else { return Ok(()) };
        if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
            bail!("email.smtp_url must start with smtps:// (TLS) or smtp:// (add ?tls=required for STARTTLS)");
        }
        smtp_credentials_protected(url)?;
        let Some(from) = &self.from else {
            bail!("email.from is required with email.smtp_url: the sender, such as \"keygate <keygate@example.com>\"");
        };
        if from.parse::<lettre::message::Mailbox>().is_err() {
            bail!("email.from {from:?} is not an address such as \"keygate <keygate@example.com>\"");
        }
        if !(1..=120).contains(&self.timeout_seconds) {
            bail!("email.timeout_seconds must be between 1 and 120");
        }
        Ok(())
    }
}

/// Refuses an SMTP URL that would send its user and password in the clear: credentials go only
/// over TLS from the start (`smtps://`) or STARTTLS that must succeed before AUTH
/// (`?tls=required`; lettre's `opportunistic` carries on in the clear when the server offers no
/// STARTTLS, or when someone on the path strips it), unless the server is on loopback (a relay
/// on the same host, where nothing on the way can read them). The error never quotes the URL,
/// which holds the password.
fn smtp_credentials_protected(url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|_| {
        anyhow::anyhow!(
            "email.smtp_url is not a valid URL: use smtps://user:password@host:465 or smtp://user:password@host:587?tls=required (percent-encode special characters of the user and password)"
        )
    })?;
    // lettre sends AUTH when the URL has a password (the user may be empty).
    if parsed.password().is_none() {
        return Ok(());
    }
    let tls = parsed.scheme() == "smtps"
        || parsed.query_pairs().find(|(k, _)| k == "tls").is_some_and(|(_, v)| v == "required");
    let host = parsed.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback =
        bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if tls || loopback {
        return Ok(());
    }
    bail!(
        "smtp_credentials_without_tls: email.smtp_url would send its user and password to {host} without TLS, readable by anyone on the way; use smtps://user:password@{host}:465 (TLS) or add ?tls=required (STARTTLS, e.g. smtp://user:password@{host}:587?tls=required). Credentials without TLS are allowed only to a relay on loopback (localhost, 127.0.0.0/8, ::1)"
    )
}

/// `[siem]`: the audit trail streamed, as it is written, to a syslog receiver and/or an HTTP
/// collector.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiemConfig {
    /// `tcp://host:514` or `tls://host:6514`: RFC 5424 messages, octet-counted (RFC 6587).
    pub syslog_url: Option<String>,
    /// A PEM file of the CA certificates to trust for `tls://` instead of the system's.
    pub syslog_ca_file: Option<String>,
    /// `https://…` (or `http://…`): each batch of events one POST of JSON lines.
    pub http_url: Option<String>,
    /// The `Authorization` header value the collector wants (such as `Splunk <token>` or
    /// `Bearer <token>`). Env: `KEYGATE_SIEM_HTTP_AUTHORIZATION`. Never logged.
    pub http_authorization: Option<String>,
    /// The most events kept waiting per sink while its receiver is down; beyond it the oldest
    /// are dropped (and logged). Default 1,000,000.
    pub max_backlog: u64,
}

impl Default for SiemConfig {
    fn default() -> Self {
        Self {
            syslog_url: None,
            syslog_ca_file: None,
            http_url: None,
            http_authorization: None,
            max_backlog: 1_000_000,
        }
    }
}

impl std::fmt::Debug for SiemConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiemConfig")
            .field("syslog_url", &self.syslog_url)
            .field("syslog_ca_file", &self.syslog_ca_file)
            .field("http_url", &self.http_url)
            .field("http_authorization", &self.http_authorization.as_ref().map(|_| "<set>"))
            .field("max_backlog", &self.max_backlog)
            .finish()
    }
}

impl SiemConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(u) = &self.syslog_url
            && !(u.starts_with("tcp://") || u.starts_with("tls://"))
        {
            bail!("siem.syslog_url must be tcp://host:port or tls://host:port");
        }
        if let Some(u) = &self.http_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            bail!("siem.http_url must be an http:// or https:// URL");
        }
        if let Some(a) = &self.http_authorization
            && (a.is_empty() || a.chars().any(|c| c.is_control()))
        {
            bail!("siem.http_authorization must be a header value without control characters");
        }
        if !(1_000..=100_000_000).contains(&self.max_backlog) {
            bail!("siem.max_backlog must be between 1000 and 100000000");
        }
        Ok(())
    }
}

/// `[audit]`: the audit trail.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days audit events are kept; older ones are deleted (hourly, by any node), the link of the
    /// last one deleted kept as its chain's anchor. 0 keeps them for ever. Default 0.
    pub retention_days: u64,
}

impl AuditConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.retention_days > 36_500 {
            bail!("audit.retention_days must be 0 (keep for ever) or at most 36500 (a hundred years)");
        }
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            heartbeat_seconds: 2,
            node_timeout_seconds: 10,
            propagation_timeout_ms: 1_000,
            feed_retention_hours: 168,
        }
    }
}

/// `[redis]`: shared rate limits and quotas for several nodes. Without `url` every node counts
/// alone (a token used through three nodes gets three times its limit); with it, the nodes draw
/// from one bucket per limit (see `docs/operations.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS. Env: `KEYGATE_REDIS_URL`.
    /// Default unset.
    pub url: Option<String>,
    /// Prefix of keygate's keys, so that several deployments can share one Redis. Default `kg`.
    pub key_prefix: String,
    /// The longest a request waits for its share of a limit from Redis, in milliseconds; past
    /// it the node decides alone with its share of the limit. Default 5.
    pub wait_ms: u64,
    /// How long connecting may take at start, in milliseconds. Default 2000.
    pub connect_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: None, key_prefix: "kg".into(), wait_ms: 5, connect_timeout_ms: 2_000 }
    }
}

impl RedisConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(url) = &self.url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            bail!("redis.url must be a redis:// or rediss:// URL");
        }
        let p = &self.key_prefix;
        if p.is_empty()
            || p.len() > 32
            || !p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            bail!("redis.key_prefix {p:?} must be 1 to 32 of A-Z a-z 0-9 _ - .");
        }
        if !(1..=1_000).contains(&self.wait_ms) {
            bail!("redis.wait_ms must be between 1 and 1000");
        }
        if !(100..=60_000).contains(&self.connect_timeout_ms) {
            bail!("redis.connect_timeout_ms must be between 100 and 60000");
        }
        Ok(())
    }
}

impl ClusterConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if let Some(id) = &self.node_id {
            let ok = !id.is_empty()
                && id.len() <= 128
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
            if !ok {
                bail!("cluster.node_id {id:?} must be 1 to 128 of A-Z a-z 0-9 . _ : -");
            }
        }
        if !(1..=60).contains(&self.heartbeat_seconds) {
            bail!("cluster.heartbeat_seconds must be between 1 and 60");
        }
        if self.node_timeout_seconds < 2 * self.heartbeat_seconds || self.node_timeout_seconds > 3_600 {
            bail!("cluster.node_timeout_seconds must be at least twice cluster.heartbeat_seconds and at most 3600");
        }
        if !(1..=87_600).contains(&self.feed_retention_hours) {
            bail!("cluster.feed_retention_hours must be between 1 and 87600 (ten years)");
        }
        if self.propagation_timeout_ms > 30_000 {
            bail!("cluster.propagation_timeout_ms must be at most 30000");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `keygate=debug,info`. Env: `KEYGATE_LOG`. Default `info`.
    pub level: String,
    /// `auto` (readable text when stderr is a terminal, JSON otherwise), `json` (one object per
    /// line) or `text`. Env: `KEYGATE_LOG_FORMAT`. Default `auto`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `text` on a terminal, `json` otherwise (a service manager, a pipe, a file).
    Auto,
    Json,
    Text,
}

impl LogFormat {
    /// The format to write: `Auto` decided by whether stderr is a terminal.
    pub fn resolve(self, stderr_is_terminal: bool) -> LogFormat {
        match self {
            Self::Auto if stderr_is_terminal => Self::Text,
            Self::Auto => Self::Json,
            other => other,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./keygate-data"),
            database_url: None,
            admin: AdminConfig::default(),
            health: HealthConfig::default(),
            dashboard: DashboardConfig::default(),
            gateway: GatewayConfig::default(),
            routes: Vec::new(),
            providers: Vec::new(),
            ai: AiConfig::default(),
            usage_flush_seconds: 5,
            tokens: TokensConfig::default(),
            oauth: OAuthConfig::default(),
            log: LogConfig::default(),
            cluster: ClusterConfig::default(),
            redis: RedisConfig::default(),
            audit: AuditConfig::default(),
            secret_scanning: SecretScanningConfig::default(),
            webhooks: WebhooksConfig::default(),
            notifications: NotificationsConfig::default(),
            email: EmailConfig::default(),
            siem: SiemConfig::default(),
            anomaly: AnomalyConfig::default(),
            call_log: CallLogConfig::default(),
            shutdown_grace_seconds: 30,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 8081)) }
    }
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self { prefix: "kg".into(), max_grace_period_seconds: 30 * 86_400 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Auto }
    }
}

/// Values given on the command line, which win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
}

impl Config {
    /// `[[providers]]` (their keys' variables are not read here: `keygate config check` runs
    /// where they may not be set), and the providers the `ai` routes' models name.
    fn validate_providers(&self) -> anyhow::Result<()> {
        let any_key = |_: &str| Some("set".to_owned());
        let mut ids = std::collections::HashSet::new();
        for p in &self.providers {
            keygate_gateway::ai::Provider::from_config(p, &any_key, false)
                .map_err(|e| anyhow::anyhow!("providers: {e}"))?;
            if !ids.insert(p.id.as_str()) {
                bail!("providers: {:?}: another provider has the same id", p.id);
            }
        }
        for r in &self.routes {
            for (alias, deployments) in r.ai.iter().flat_map(|a| &a.models) {
                for d in deployments {
                    let provider = d.split('/').next().unwrap_or_default();
                    if !ids.contains(provider) {
                        bail!(
                            "routes: route {:?}: ai.models.{alias}: {d:?} names the provider {provider:?}, which \
                             [[providers]] does not define",
                            r.id
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Loads the configuration from its layers. `env` is passed in so tests need not touch the
    /// process environment.
    pub fn load(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>, flags: &Overrides) -> anyhow::Result<Self> {
        let mut cfg = match file {
            Some(f) => Self::from_file(f)?,
            None => Self::default(),
        };
        if let Some(v) = env("KEYGATE_DATA_DIR") {
            cfg.data_dir = v.into();
        }
        if let Some(v) = env("KEYGATE_DATABASE_URL") {
            cfg.database_url = Some(v);
        }
        if let Some(v) = env("KEYGATE_ADMIN_LISTEN") {
            cfg.admin.listen = v
                .parse()
                .with_context(|| format!("KEYGATE_ADMIN_LISTEN={v:?} is not an address like 127.0.0.1:8081"))?;
        }
        if let Some(v) = env("KEYGATE_HEALTH_LISTEN") {
            cfg.health.listen = Some(
                v.parse()
                    .with_context(|| format!("KEYGATE_HEALTH_LISTEN={v:?} is not an address like 0.0.0.0:8082"))?,
            );
        }
        if let Some(v) = env("KEYGATE_GATEWAY_LISTEN") {
            cfg.gateway.listen = v
                .parse()
                .with_context(|| format!("KEYGATE_GATEWAY_LISTEN={v:?} is not an address like 127.0.0.1:8080"))?;
        }
        if let Some(v) = env("KEYGATE_SIEM_HTTP_AUTHORIZATION") {
            cfg.siem.http_authorization = Some(v);
        }
        if let Some(v) = env("KEYGATE_SMTP_URL") {
            cfg.email.smtp_url = Some(v);
        }
        if let Some(v) = env("KEYGATE_REDIS_URL") {
            cfg.redis.url = Some(v);
        }
        if let Some(v) = env("KEYGATE_NODE_ID") {
            cfg.cluster.node_id = Some(v);
        }
        if let Some(v) = env("KEYGATE_PROPAGATION_TIMEOUT_MS") {
            cfg.cluster.propagation_timeout_ms = v.parse().with_context(|| {
                format!("KEYGATE_PROPAGATION_TIMEOUT_MS={v:?} is not a number of milliseconds such as 1000")
            })?;
        }
        if let Some(v) = env("KEYGATE_TOKEN_PREFIX") {
            cfg.tokens.prefix = v;
        }
        if let Some(v) = env("KEYGATE_LOG") {
            cfg.log.level = v;
        }
        if let Some(v) = env("KEYGATE_LOG_FORMAT") {
            cfg.log.format = match v.as_str() {
                "auto" => LogFormat::Auto,
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => bail!("KEYGATE_LOG_FORMAT must be auto, json or text, not {v:?}"),
            };
        }
        if let Some(v) = &flags.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = &flags.database_url {
            cfg.database_url = Some(v.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.prefix()?;
        keygate_store::StoreLocation::from_settings(self.database_url.as_deref(), &self.data_dir)
            .map_err(|e| anyhow::anyhow!("database_url: {}", e.message))?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            anyhow::anyhow!("log.level {:?} is not a valid filter (such as \"info\"): {e}", self.log.level)
        })?;
        self.gateway.validate().map_err(|e| anyhow::anyhow!(e))?;
        self.cluster.validate()?;
        self.audit.validate()?;
        self.secret_scanning.validate()?;
        self.webhooks.validate()?;
        self.notifications.validate()?;
        self.email.validate()?;
        self.siem.validate()?;
        self.anomaly.validate()?;
        self.call_log.validate()?;
        self.redis.validate()?;
        keygate_gateway::routes::RouteTable::build(&self.routes, &self.gateway)
            .map_err(|e| anyhow::anyhow!("routes: {e}"))?;
        self.validate_providers()?;
        for p in &self.gateway.trusted_proxies {
            keygate_core::policy::parse_allowlist(std::slice::from_ref(p))
                .map_err(|_| anyhow::anyhow!("gateway.trusted_proxies: {p:?} is not an address or CIDR"))?;
        }
        if let Some(h) = &self.gateway.api_key_header {
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| anyhow::anyhow!("gateway.api_key_header: {h:?} is not a header name"))?;
        }
        if self.usage_flush_seconds == 0 {
            bail!("usage_flush_seconds must be at least 1");
        }
        let issuers: Vec<(&str, Option<String>)> = self
            .oauth
            .trusted_issuers
            .iter()
            .map(|t| ("oauth.trusted_issuers.jwks_url", Some(t.jwks_url.clone())))
            .collect();
        for (key, url) in [
            ("dashboard.public_url", &self.dashboard.public_url),
            ("dashboard.gateway_url", &self.dashboard.gateway_url),
            ("oauth.issuer", &self.oauth.issuer),
        ]
        .into_iter()
        .chain(issuers.iter().map(|(k, u)| (*k, u)))
        {
            if let Some(u) = url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                bail!("{key} must be an http:// or https:// URL, such as https://keys.example.com");
            }
        }
        // Documents keygate fetches decide whose tokens it accepts (and what the portal shows):
        // https://, or http:// only to a loopback host.
        for t in &self.oauth.trusted_issuers {
            crate::fetch::check_url(&t.jwks_url).map_err(|e| anyhow::anyhow!("oauth.trusted_issuers.jwks_url: {e}"))?;
        }
        for r in &self.routes {
            if let Some(doc) = r.openapi.as_deref().filter(|d| d.starts_with("http://") || d.starts_with("https://")) {
                crate::fetch::check_url(doc).map_err(|e| anyhow::anyhow!("routes.openapi of {}: {e}", r.id))?;
            }
        }
        if self.dashboard.idle_timeout_minutes == 0 || self.dashboard.session_hours == 0 {
            bail!("dashboard.idle_timeout_minutes and dashboard.session_hours must be at least 1");
        }
        let o = &self.oauth;
        if o.access_token_ttl_seconds == 0
            || o.access_token_ttl_seconds > o.max_access_token_ttl_seconds
            || o.refresh_token_ttl_seconds == 0
            || o.exchange_ttl_seconds == 0
            || o.key_rotation_days == 0
        {
            bail!(
                "oauth: the lifetimes and key_rotation_days must be at least 1, and access_token_ttl_seconds at most max_access_token_ttl_seconds"
            );
        }
        if self.admin.listen == self.gateway.listen && self.admin.listen.port() != 0 {
            bail!("admin.listen and gateway.listen must differ (both are {})", self.admin.listen);
        }
        Ok(())
    }

    /// The OAuth issuer: as configured, else the gateway's listen address.
    pub fn oauth_issuer(&self, gateway: SocketAddr) -> String {
        self.oauth.issuer.clone().unwrap_or_else(|| format!("http://{gateway}")).trim_end_matches('/').to_owned()
    }

    /// What the admin service needs of `[webhooks]` and `[notifications]`.
    pub fn notify_settings(&self) -> keygate_admin::webhooks::NotifySettings {
        keygate_admin::webhooks::NotifySettings {
            dashboard_url: self.dashboard.public_url.clone(),
            ..self.webhooks.settings(&self.notifications)
        }
    }

    pub fn prefix(&self) -> anyhow::Result<TokenPrefix> {
        TokenPrefix::for_issuing(&self.tokens.prefix).map_err(|e| anyhow::anyhow!("tokens.prefix: {}", e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::load(None, &no_env, &Overrides::default()).unwrap();
        assert!(c.admin.listen.ip().is_loopback());
        assert!(c.gateway.listen.ip().is_loopback());
        assert_eq!(c.data_dir, PathBuf::from("./keygate-data"));
    }

    #[test]
    fn fetched_documents_need_https_or_a_loopback_host() {
        let issuer = |url: &str| {
            Config::from_toml(&format!(
                "[[oauth.trusted_issuers]]\nissuer = \"https://idp.example.com\"\naudience = \"api\"\njwks_url = \"{url}\"\n"
            ))
        };
        let e = issuer("http://idp.example.com/jwks").unwrap_err().to_string();
        assert!(e.contains("oauth.trusted_issuers.jwks_url") && e.contains("https://"), "{e}");
        for ok in ["https://idp.example.com/jwks", "http://127.0.0.1:9/jwks", "http://localhost:9/jwks"] {
            assert!(issuer(ok).is_ok(), "{ok}");
        }
        let route = |doc: &str| {
            Config::from_toml(&format!(
                "[[routes]]\nid = \"orders\"\npath = \"/orders\"\nupstream = \"http://127.0.0.1:9\"\nopenapi = \"{doc}\"\n"
            ))
        };
        let e = route("http://docs.example.com/openapi.json").unwrap_err().to_string();
        assert!(e.contains("routes.openapi of orders"), "{e}");
        assert!(route("https://docs.example.com/openapi.json").is_ok());
        assert!(route("openapi/orders.json").is_ok(), "a file");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml("[admin]\nlisten = \"127.0.0.1:9\"\nlisen = 1\n").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = Config::from_toml("colour = \"red\"\n").unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::from_toml("[tokens]\nprefix = \"Bad_Prefix\"\n").is_err());
        assert!(Config::from_toml("database_url = \"mysql://x\"\n").is_err());
        assert!(Config::from_toml("[admin]\nlisten = \"nowhere\"\n").is_err());
        assert!(Config::from_toml("shutdown_grace_seconds = -1\n").is_err());
        assert!(Config::from_toml("[log]\nformat = \"xml\"\n").is_err());
        assert!(Config::from_toml("[log]\nlevel = \"info,[[\"\n").is_err());
        assert!(Config::from_toml("[tokens]\nprefix = \"abcdefghi\"\n").is_err());
    }

    #[test]
    fn log_format_is_auto_json_or_text() {
        assert_eq!(Config::default().log.format, LogFormat::Auto);
        for (text, want) in [("auto", LogFormat::Auto), ("json", LogFormat::Json), ("text", LogFormat::Text)] {
            let c = Config::from_toml(&format!("[log]\nformat = \"{text}\"\n")).unwrap();
            assert_eq!(c.log.format, want, "{text}");
        }
        let e = Config::from_toml("[log]\nformat = \"pretty\"\n").unwrap_err().to_string();
        assert!(e.contains("pretty") || e.contains("auto"), "the value or the choices are named: {e}");
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text, "readable on a terminal");
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json, "JSON in a pipe or a file");
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json, "a configured format wins");
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
        let env = |k: &str| (k == "KEYGATE_LOG_FORMAT").then(|| "xml".to_owned());
        assert!(Config::load(None, &env, &Overrides::default()).is_err());
        let env = |k: &str| (k == "KEYGATE_LOG_FORMAT").then(|| "auto".to_owned());
        assert_eq!(Config::load(None, &env, &Overrides::default()).unwrap().log.format, LogFormat::Auto);
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keygate.toml");
        std::fs::write(&file, "data_dir = \"/from-file\"\n[tokens]\nprefix = \"acme\"\n").unwrap();
        let env = |k: &str| match k {
            "KEYGATE_DATA_DIR" => Some("/from-env".to_owned()),
            "KEYGATE_ADMIN_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            _ => None,
        };
        let c = Config::load(Some(&file), &env, &Overrides::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from-env"));
        assert_eq!(c.tokens.prefix, "acme");
        assert_eq!(c.admin.listen.port(), 9999);
        let flags = Overrides { data_dir: Some("/from-flag".into()), database_url: None };
        let c = Config::load(Some(&file), &env, &flags).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from-flag"));
        let bad_env = |k: &str| (k == "KEYGATE_ADMIN_LISTEN").then(|| "x".to_owned());
        assert!(Config::load(None, &bad_env, &Overrides::default()).is_err());
    }

    #[test]
    fn routes_are_validated_with_the_route_named() {
        let ok = "[[routes]]\nid = \"orders\"\npath = \"/orders\"\nupstream = \"http://127.0.0.1:9000\"\n[routes.scopes]\nGET = \"orders:read\"\n\"*\" = \"orders:write\"\n\n[[routes]]\nid = \"status\"\npath = \"/status\"\nupstream = \"http://127.0.0.1:9000\"\npublic = true\n";
        let c = Config::from_toml(ok).unwrap();
        assert_eq!(c.routes.len(), 2);
        let e = Config::from_toml("[[routes]]\nid = \"x\"\npath = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("\"x\"") && e.contains("upstream"), "{e}");
        let e = Config::from_toml("[[routes]]\nid = \"x\"\npath = \"/x\"\nupstream = \"http://a:1\"\nupstram = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstram"), "{e}");
    }

    #[test]
    fn connection_limits_and_upgrades_are_validated() {
        let c = Config::from_toml("[gateway]\nbody_timeout_ms = 500\nmax_connections_per_address = 8\n").unwrap();
        assert_eq!(c.gateway.conn_settings().timeouts.body, std::time::Duration::from_millis(500));
        for (bad, key) in [
            ("[gateway]\nbody_timeout_ms = 0\n", "body_timeout_ms"),
            ("[gateway]\nsend_timeout_ms = 0\n", "send_timeout_ms"),
            ("[gateway]\nhttp2_idle_timeout_ms = 0\n", "http2_idle_timeout_ms"),
            ("[gateway]\nhttp2_keep_alive_timeout_ms = 0\n", "http2_keep_alive_timeout_ms"),
            ("[gateway]\nhttp2_max_concurrent_streams = 0\n", "http2_max_concurrent_streams"),
            ("[gateway]\nmax_connections_per_worker = 0\n", "max_connections_per_worker"),
            ("[gateway]\nkeep_alive_timeout_seconds = 0\n", "keep_alive_timeout_seconds"),
        ] {
            let e = Config::from_toml(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        // Keep-alive PINGs can be turned off.
        let c = Config::from_toml("[gateway]\nhttp2_keep_alive_interval_ms = 0\n").unwrap();
        assert!(c.gateway.conn_settings().http2.keep_alive_interval.is_none());
        let route = "[[routes]]\nid = \"ws\"\npath = \"/ws\"\nupstream = \"http://127.0.0.1:9\"\n";
        assert!(Config::from_toml(&format!("{route}upgrades = [\"websocket\", \"x-custom\"]\n")).is_ok());
        assert!(Config::from_toml(&format!("{route}upgrades = []\n")).is_ok());
        let e = Config::from_toml(&format!("{route}upgrades = [\"H2C\"]\n")).unwrap_err().to_string();
        assert!(e.contains("\"ws\"") && e.contains("h2c"), "{e}");
        let e = Config::from_toml(&format!("{route}upgrades = [\"web socket\"]\n")).unwrap_err().to_string();
        assert!(e.contains("not a protocol name"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../../docs/keygate.example.toml");
        Config::from_toml(text).unwrap();
    }
}
