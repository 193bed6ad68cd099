//! The records of the data model: workspaces, apps, tokens, plans, the scope catalog, root keys
//! and audit events. Every object belongs to exactly one workspace.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::Timestamp;
use crate::ids::{AppId, PlanId, RootKeyId, TokenId, WorkspaceId};
use crate::policy::{Quota, RateLimit};
use crate::scope::Scope;
use crate::secret::SecretHash;

/// The name of the workspace created at first start.
pub const DEFAULT_WORKSPACE: &str = "default";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    pub created_at: Timestamp,
}

/// An API consumer that holds tokens. Each workspace has one default app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct App {
    pub id: AppId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub description: Option<String>,
    pub plan_id: Option<PlanId>,
    pub is_default: bool,
    pub metadata: Map<String, Value>,
    /// A rate limit shared by all of the app's tokens (on top of each token's own).
    pub rate_limit: Option<RateLimit>,
    /// A quota shared by all of the app's tokens (on top of each token's own).
    pub quota: Option<Quota>,
    /// What all of the app's keys may spend on LLM calls together, over every ai route.
    pub llm_budget: Option<crate::llm::LlmBudget>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// An app's shared limits, as the gateway needs them.
#[derive(Debug, Clone, PartialEq)]
pub struct AppLimits {
    pub app_id: AppId,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub llm_budget: Option<crate::llm::LlmBudget>,
}

/// The stored lifecycle state of a token. Expiry is not stored as a state: it follows from
/// `expires_at` and the clock (see [`TokenRecord::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Active,
    Suspended,
    Revoked,
}

impl TokenState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// What a token is at a given instant, as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    Active,
    Suspended,
    Revoked,
    Expired,
}

impl TokenStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "revoked" => Some(Self::Revoked),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A token as stored: never the secret, only its keyed hash and its public parts.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub id: TokenId,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub name: String,
    pub hash: SecretHash,
    /// The token prefix it was minted with (`kg`).
    pub prefix: String,
    /// The token's last four characters, for display.
    pub last4: String,
    pub scopes: Vec<Scope>,
    pub state: TokenState,
    pub expires_at: Option<Timestamp>,
    pub ip_allowlist: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub metadata: Map<String, Value>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub last_used_at: Option<Timestamp>,
    pub last_used_ip: Option<String>,
    pub revoked_at: Option<Timestamp>,
    pub revoke_reason: Option<String>,
    /// The token this one replaced by rotation.
    pub rotated_from: Option<TokenId>,
    /// The token that replaced this one; this one stops at `expires_at` (the grace period's end).
    pub replaced_by: Option<TokenId>,
    /// When the token was found somewhere it should not be (a URL, a scanned file).
    pub exposed_at: Option<Timestamp>,
    /// The RFC 7638 thumbprint of the DPoP key the token is bound to (RFC 9449): a request with
    /// it must carry a DPoP proof signed by that key, so a leaked copy alone is useless.
    pub dpop_jkt: Option<String>,
    /// What the token may spend on LLM calls per day or month, over every `ai` route.
    pub llm_budget: Option<crate::llm::LlmBudget>,
    /// How many requests the token may make in all (a single-use token: 1); the gateway
    /// refuses it with `uses_exhausted` after that, counted once across every node.
    pub max_uses: Option<u64>,
    /// Bumped by every change; updates carry the version they read (optimistic concurrency).
    pub version: i64,
}

impl TokenRecord {
    pub fn public_id(&self) -> &str {
        self.id.as_str().strip_prefix("tok_").unwrap_or_default()
    }

    /// `kg_3kT9xQ2mZp7A…Ab12`: enough to recognize the token, useless to an attacker.
    pub fn display(&self) -> String {
        format!("{}_{}…{}", self.prefix, self.public_id(), self.last4)
    }

    pub fn status(&self, now: Timestamp) -> TokenStatus {
        match self.state {
            TokenState::Revoked => TokenStatus::Revoked,
            _ if self.expires_at.is_some_and(|e| e <= now) => TokenStatus::Expired,
            TokenState::Suspended => TokenStatus::Suspended,
            TokenState::Active => TokenStatus::Active,
        }
    }

    /// The non-secret fields an audit event records, as JSON.
    pub fn audit_view(&self) -> Value {
        serde_json::json!({
            "name": self.name,
            "app_id": self.app_id,
            "scopes": self.scopes,
            "state": self.state,
            "expires_at": self.expires_at,
            "ip_allowlist": self.ip_allowlist.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "rate_limit": self.rate_limit,
            "quota": self.quota,
            "metadata": self.metadata,
            "revoke_reason": self.revoke_reason,
            "replaced_by": self.replaced_by,
            "rotated_from": self.rotated_from,
            "exposed_at": self.exposed_at,
            "dpop_jkt": self.dpop_jkt,
            "llm_budget": self.llm_budget,
            "max_uses": self.max_uses,
        })
    }
}

/// A tier: the scopes an app on it may hold, and default limits for its tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub id: PlanId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<Scope>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub created_at: Timestamp,
    /// What an app on the plan is charged per calendar month (statements), if priced.
    pub pricing: Option<crate::billing::Pricing>,
}

/// One entry of a workspace's scope catalog. When a workspace's catalog is not empty, tokens may
/// only be granted scopes that the catalog covers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScopeEntry {
    pub workspace_id: WorkspaceId,
    pub scope: Scope,
    pub description: Option<String>,
    /// The API this scope belongs to, for grouping in the dashboard.
    pub api: Option<String>,
    pub created_at: Timestamp,
}

/// A route managed through the admin API (routes from the config file are not stored). `config`
/// holds the fields of a `[[routes]]` table as JSON, without `workspace` (the route's workspace is
/// `workspace_id`); the gateway validates and compiles it, the store only keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredRoute {
    /// The route's id, unique in the instance (file routes included): it names the route in
    /// metrics, logs and usage.
    pub id: String,
    pub workspace_id: WorkspaceId,
    pub config: Map<String, Value>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What a root key may do through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    TokensRead,
    TokensWrite,
    AppsRead,
    AppsWrite,
    PlansRead,
    PlansWrite,
    AuditRead,
    /// Rotate the instance's OAuth signing keys (root keys of the default workspace only).
    KeysWrite,
    /// List the workspace's root keys (never their secrets).
    RootKeysRead,
    /// Revoke the workspace's root keys, each only if it holds no permission the revoking key
    /// lacks (so a narrow key cannot switch off a broader one).
    RootKeysWrite,
    /// List the routes (file and API-managed) of the workspace.
    RoutesRead,
    /// Create, change and delete the workspace's API-managed routes.
    RoutesWrite,
    /// List the instance's workspaces (root keys of the default workspace only).
    WorkspacesRead,
    /// Create, rename and delete workspaces (root keys of the default workspace only).
    WorkspacesWrite,
    /// Verify tokens through `POST /admin/v1/verify` (for services that check tokens
    /// themselves): nothing else, so a service holding it can neither read nor change tokens.
    TokensVerify,
    /// List the workspace's webhook endpoints and their deliveries.
    WebhooksRead,
    /// Create, change, test and delete webhook endpoints; redeliver messages.
    WebhooksWrite,
    /// List the LLM providers the workspace's `ai` routes may call (never their keys).
    ProvidersRead,
    /// Create, change, give a new key to and delete the workspace's LLM providers.
    ProvidersWrite,
    /// List the workspace's APIs, their versions and publish requests.
    ApisRead,
    /// Create, change and delete APIs, move them through their lifecycle, decide publish
    /// requests (a root key holding it counts as a workspace owner).
    ApisWrite,
}

impl Permission {
    pub const ALL: [Permission; 21] = [
        Self::TokensRead,
        Self::TokensWrite,
        Self::AppsRead,
        Self::AppsWrite,
        Self::PlansRead,
        Self::PlansWrite,
        Self::AuditRead,
        Self::KeysWrite,
        Self::RootKeysRead,
        Self::RootKeysWrite,
        Self::RoutesRead,
        Self::RoutesWrite,
        Self::WorkspacesRead,
        Self::WorkspacesWrite,
        Self::TokensVerify,
        Self::WebhooksRead,
        Self::WebhooksWrite,
        Self::ProvidersRead,
        Self::ProvidersWrite,
        Self::ApisRead,
        Self::ApisWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokensRead => "tokens:read",
            Self::TokensWrite => "tokens:write",
            Self::AppsRead => "apps:read",
            Self::AppsWrite => "apps:write",
            Self::PlansRead => "plans:read",
            Self::PlansWrite => "plans:write",
            Self::AuditRead => "audit:read",
            Self::KeysWrite => "keys:write",
            Self::RootKeysRead => "root_keys:read",
            Self::RootKeysWrite => "root_keys:write",
            Self::RoutesRead => "routes:read",
            Self::RoutesWrite => "routes:write",
            Self::WorkspacesRead => "workspaces:read",
            Self::WorkspacesWrite => "workspaces:write",
            Self::TokensVerify => "tokens:verify",
            Self::WebhooksRead => "webhooks:read",
            Self::WebhooksWrite => "webhooks:write",
            Self::ProvidersRead => "providers:read",
            Self::ProvidersWrite => "providers:write",
            Self::ApisRead => "apis:read",
            Self::ApisWrite => "apis:write",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Parses a list of permissions; `*` stands for all of them.
    pub fn parse_list(raw: &[String]) -> crate::Result<Vec<Self>> {
        let mut out = Vec::new();
        for p in raw {
            if p == "*" {
                out.extend(Self::ALL);
            } else {
                out.push(Self::parse(p).ok_or_else(|| {
                    crate::Error::invalid(
                        "invalid_permission",
                        format!(
                            "unknown permission {p:?}; known permissions: {}, or * for all",
                            Self::ALL.map(Self::as_str).join(", ")
                        ),
                    )
                })?);
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// A credential for the admin API, bound to one workspace. Looked up in the store on every
/// request, so a revocation or an expiry holds from the next request on, on every node.
#[derive(Debug, Clone, PartialEq)]
pub struct RootKey {
    pub id: RootKeyId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub hash: SecretHash,
    pub last4: String,
    pub permissions: Vec<Permission>,
    pub created_at: Timestamp,
    /// When the key stops working by itself; `None`: never.
    pub expires_at: Option<Timestamp>,
    /// When it was revoked (final); a revoked key is kept for the audit trail and the list.
    pub revoked_at: Option<Timestamp>,
    /// When it last authenticated, to within [`RootKey::LAST_USED_EVERY_MS`]: written at most
    /// once per that interval, not on every request.
    pub last_used_at: Option<Timestamp>,
}

/// A root key's state at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootKeyStatus {
    Active,
    Expired,
    Revoked,
}

impl RootKeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

impl RootKey {
    /// How stale `last_used_at` may get before a request writes it again (one minute).
    pub const LAST_USED_EVERY_MS: i64 = 60_000;

    pub fn status(&self, now: Timestamp) -> RootKeyStatus {
        if self.revoked_at.is_some() {
            RootKeyStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            RootKeyStatus::Expired
        } else {
            RootKeyStatus::Active
        }
    }

    /// `kgroot_3kT9xQ2mZp7A…Ab12`: enough to recognize the key, useless to an attacker.
    pub fn display(&self, prefix: &str) -> String {
        format!("{prefix}_{}…{}", self.id.as_str().strip_prefix("rk_").unwrap_or_default(), self.last4)
    }

    /// Whether this key holds every permission `other` holds: only then may it revoke `other`.
    pub fn covers(&self, other: &RootKey) -> bool {
        other.permissions.iter().all(|p| self.permissions.contains(p))
    }
}

/// Who made a change, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `rk_…` for a root key, `cli` for the local command line, `system` for keygate itself.
    pub id: String,
    pub source: Option<String>,
    /// Acts with a workspace owner's authority over limits: may give a token or an app more
    /// than its plan allows (an owner in the dashboard, a root key that may change plans, the
    /// local command line, keygate itself). Everyone else is held to the plan's ceilings.
    pub owner: bool,
}

impl Actor {
    pub fn cli() -> Self {
        Self { id: "cli".into(), source: Some("local".into()), owner: true }
    }
    pub fn system() -> Self {
        Self { id: "system".into(), source: None, owner: true }
    }
}

/// An audit event about to be written, in the same transaction as the change it records.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEvent {
    pub workspace_id: WorkspaceId,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub source: Option<String>,
}

impl NewAuditEvent {
    pub fn new(workspace_id: &WorkspaceId, actor: &Actor, action: &str, target: &str, at: Timestamp) -> Self {
        Self {
            workspace_id: workspace_id.clone(),
            at,
            actor: actor.id.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            before: None,
            after: None,
            source: actor.source.clone(),
        }
    }

    /// Records only the fields that differ between `before` and `after` (both JSON objects).
    pub fn with_diff(mut self, before: &Value, after: &Value) -> Self {
        let (b, a) = changed_fields(before, after);
        self.before = Some(b);
        self.after = Some(a);
        self
    }

    pub fn with_after(mut self, after: Value) -> Self {
        self.after = Some(after);
        self
    }

    pub fn with_before(mut self, before: Value) -> Self {
        self.before = Some(before);
        self
    }
}

/// The fields of two JSON objects that differ, as two objects holding the old and new values.
pub fn changed_fields(before: &Value, after: &Value) -> (Value, Value) {
    let empty = Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut old = Map::new();
    let mut new = Map::new();
    for key in b.keys().chain(a.keys().filter(|k| !b.contains_key(*k))) {
        let (bv, av) = (b.get(key), a.get(key));
        if bv != av {
            old.insert(key.clone(), bv.cloned().unwrap_or(Value::Null));
            new.insert(key.clone(), av.cloned().unwrap_or(Value::Null));
        }
    }
    (Value::Object(old), Value::Object(new))
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub workspace_id: WorkspaceId,
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub source: Option<String>,
    /// For a change to a token: how far it had reached the cluster's nodes when the change was
    /// answered (see [`Propagation`]).
    pub propagation: Option<Propagation>,
}

/// How far one change had spread when its answer was sent: of the `nodes` live then (this one
/// included), `applied` had applied it to their token index, `elapsed_ms` after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propagation {
    pub nodes: u32,
    pub applied: u32,
    pub elapsed_ms: u64,
}

impl Propagation {
    /// Every live node has the change.
    pub fn complete(&self) -> bool {
        self.applied >= self.nodes
    }
}

/// One keygate process as it registers itself in the store: what it serves and how far it has
/// read the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    /// Stable across restarts of the same node (configured, or the host name and gateway port).
    pub id: String,
    /// Random per process start: tells two processes that share an `id` apart.
    pub instance: String,
    /// The gateway listener's address as the node advertises it.
    pub gateway_address: String,
    pub admin_address: String,
    pub version: String,
    pub started_at: Timestamp,
    /// The change-feed position every change up to which is applied to the node's index.
    pub applied_seq: u64,
    pub heartbeat_at: Timestamp,
    /// Set when the node stopped gracefully; a stopped node is not waited for.
    pub stopped_at: Option<Timestamp>,
}

/// One page of a list, and the cursor of the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Which page to read. The cursor is opaque to callers; stores define it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageRequest {
    pub limit: u32,
    pub cursor: Option<String>,
}

/// One gateway call, as the call log keeps it (issue 15): never a secret, a query or a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallRecord {
    /// The store's id (0 before it is written); the list's cursor.
    #[serde(skip_serializing_if = "is_zero")]
    pub id: i64,
    #[serde(skip)]
    pub workspace_id: WorkspaceId,
    pub at: Timestamp,
    pub token_id: Option<TokenId>,
    pub app_id: Option<AppId>,
    /// The route's id, when one matched.
    pub route: Option<String>,
    pub method: String,
    /// The normalized path, without the query.
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    pub client_ip: String,
    /// The refusal's code (`insufficient_scope`, `rate_limited`, …) when keygate refused it.
    pub refusal: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Which calls a list or an export shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallFilter {
    pub token_id: Option<TokenId>,
    pub app_id: Option<AppId>,
    pub route: Option<String>,
    /// An exact status, or a class (`4` for 4xx) when below 10.
    pub status: Option<u16>,
    /// Only refused calls (`true`) or only forwarded ones (`false`).
    pub refused: Option<bool>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
}

/// How long after its grace period a secret replaced by a rotation is still known to the
/// gateway (refused as expired), so that its use raises an `old_secret` alert: 30 days.
pub const ROTATED_KEPT_MS: i64 = 30 * 86_400_000;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenFilter {
    pub app_id: Option<AppId>,
    pub status: Option<TokenStatus>,
    /// Case-insensitive substring of the name.
    pub name_contains: Option<String>,
    /// Only tokens that expire before this instant (and have not yet).
    pub expiring_before: Option<Timestamp>,
    pub exposed: Option<bool>,
    /// Only tokens created before this instant.
    pub created_before: Option<Timestamp>,
    /// Only tokens that have an expiry after this instant (with status `expired`: those that
    /// expired since).
    pub expired_after: Option<Timestamp>,
    /// Only tokens not used since this instant (never used: created before it): dormant ones.
    pub unused_since: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changed_fields_keeps_only_differences() {
        let (b, a) = changed_fields(
            &json!({"name": "a", "scopes": ["x:y"], "gone": 1}),
            &json!({"name": "b", "scopes": ["x:y"], "new": 2}),
        );
        assert_eq!(b, json!({"name": "a", "gone": 1, "new": null}));
        assert_eq!(a, json!({"name": "b", "gone": null, "new": 2}));
    }

    #[test]
    fn permissions_parse() {
        let all = Permission::parse_list(&["*".into()]).unwrap();
        assert_eq!(all.len(), Permission::ALL.len());
        assert_eq!(
            Permission::parse_list(&["tokens:read".into(), "tokens:read".into()]).unwrap(),
            vec![Permission::TokensRead]
        );
        assert_eq!(Permission::parse_list(&["tokens:delete".into()]).unwrap_err().code, "invalid_permission");
    }

    #[test]
    fn latency_bounds_are_inclusive() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(999), 0);
        assert_eq!(latency_bucket(1000), 0, "exactly 1 ms is within the 1 ms bound");
        assert_eq!(latency_bucket(1001), 1);
        assert_eq!(latency_bucket(5000), 1);
        assert_eq!(latency_bucket(1_000_000), 8);
        assert_eq!(latency_bucket(1_000_001), 9);
        assert_eq!(latency_bucket(u64::MAX), 9);
    }

    #[test]
    fn quantiles_come_from_the_histogram_by_nearest_rank() {
        let mut r = UsageRecord::default();
        assert_eq!(r.latency_quantile_bucket(0.5), None, "nothing counted");
        // 10 answers: 5 within 1 ms, 4 within 5 ms, 1 over 1 s.
        r.latency[0] = 5;
        r.latency[1] = 4;
        r.latency[9] = 1;
        assert_eq!(r.latency_quantile_bucket(0.5), Some(0), "rank 5 is the last of the first bucket");
        assert_eq!(r.latency_quantile_bucket(0.51), Some(1));
        assert_eq!(r.latency_quantile_bucket(0.9), Some(1));
        assert_eq!(r.latency_quantile_bucket(0.95), Some(9));
        assert_eq!(r.latency_quantile_bucket(1.0), Some(9));
        assert_eq!(r.latency_quantile_bucket(0.0), Some(0), "rank 0 is taken as the first answer");
    }
}

/// Upper bounds (milliseconds) of the latency histogram buckets; the last bucket is unbounded.
pub const LATENCY_BUCKETS_MS: [u64; 9] = [1, 5, 10, 25, 50, 100, 250, 500, 1000];

/// The bucket of [`LATENCY_BUCKETS_MS`] a latency is counted in: the first whose bound it does
/// not exceed (bounds are inclusive, like Prometheus's `le`), or the last, unbounded one. The
/// usage meter and the `/metrics` histograms both count with it, so they agree on every answer.
pub fn latency_bucket(latency_us: u64) -> usize {
    LATENCY_BUCKETS_MS.iter().position(|ms| latency_us <= ms.saturating_mul(1000)).unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// Usage of one token on one route during one minute.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UsageRecord {
    pub token_id: TokenId,
    pub workspace_id: WorkspaceId,
    pub route: String,
    /// The minute's start.
    pub minute: Timestamp,
    pub requests: u64,
    /// Answers by status class: 2xx, 3xx, 4xx, 5xx.
    pub status: [u64; 4],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us_sum: u64,
    /// Counts per bucket of [`LATENCY_BUCKETS_MS`], plus one for slower answers.
    pub latency: [u64; 10],
}

impl UsageRecord {
    /// The histogram bucket holding the `q` quantile (`0 < q ≤ 1`) of the latencies counted, as
    /// an index into [`UsageRecord::latency`]; `None` when nothing was counted. Its bound in
    /// [`LATENCY_BUCKETS_MS`] is an upper bound of the quantile (none for the last bucket).
    pub fn latency_quantile_bucket(&self, q: f64) -> Option<usize> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // The rank of the quantile among the answers, 1-based (nearest-rank method).
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        self.latency.iter().position(|n| {
            seen += n;
            seen >= rank
        })
    }

    /// Adds `other`'s counts to this record's.
    pub fn add(&mut self, other: &UsageRecord) {
        self.requests += other.requests;
        for (a, b) in self.status.iter_mut().zip(other.status) {
            *a += b;
        }
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.latency_us_sum += other.latency_us_sum;
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a += b;
        }
    }
}

/// How a usage report groups the requests it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGrouping {
    Token,
    Route,
    App,
    /// Per UTC day; the key is the day's number since 1970-01-01.
    Day,
}

/// Requests the gateway refused on one of a workspace's routes for one reason within one hour,
/// as a node counted them (added to what is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount {
    pub workspace_id: WorkspaceId,
    pub route: String,
    /// The refusal's stable code (`unknown_token`, `rate_limited`, …).
    pub reason: String,
    /// The hour's start.
    pub hour: Timestamp,
    /// The status the refusal was answered with.
    pub status: u16,
    pub requests: u64,
}

/// When a token was last used and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastUse {
    pub token_id: TokenId,
    pub at: Timestamp,
    pub ip: String,
}

/// Requests counted against a token's quota in the period starting at `period_start` (ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCount {
    pub token_id: TokenId,
    pub period_start: i64,
    pub count: u64,
}
