//! The service layer: every change to workspaces, apps, tokens, plans, the scope catalog and root
//! keys goes through [`Admin`], which validates it, mints secrets, and hands the store the record
//! together with the audit event that describes it (written in one transaction).

use std::sync::Arc;

use keygate_core::account::{ExposureAction, WorkspacePolicy};
use keygate_core::ids::{AppId, PlanId, RootKeyId, TokenId, WorkspaceId};
use keygate_core::model::{
    Actor, App, AuditEvent, AuditFilter, DEFAULT_WORKSPACE, NewAuditEvent, Page, PageRequest, Permission, Plan,
    Propagation, RootKey, RootKeyStatus, ScopeEntry, TokenFilter, TokenRecord, TokenState, TokenStatus, UsageRecord,
    Workspace,
};
use keygate_core::oauth::OAuthClient;
use keygate_core::policy::{Quota, RateLimit, parse_allowlist};
use keygate_core::scope::{Scope, parse_scope_list};
use keygate_core::secret::{Pepper, Randomness, TokenSecret};
use keygate_core::store::Store;
use keygate_core::token_format::{self, TokenPrefix};
use keygate_core::{Clock, Error, ErrorKind, Result, Timestamp};
use serde_json::{Map, Value};

/// Settings of the token authority that come from keygate's configuration.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub prefix: TokenPrefix,
    /// The longest `grace_period_seconds` a rotation may ask for.
    pub max_grace_period_seconds: u64,
    /// A node whose last heartbeat is older than this is no longer live (milliseconds).
    pub node_timeout_ms: i64,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { prefix: TokenPrefix::default(), max_grace_period_seconds: 30 * 86_400, node_timeout_ms: 10_000 }
    }
}

const MAX_NAME_LEN: usize = 200;
const MAX_METADATA_BYTES: usize = 8 * 1024;
const MAX_REASON_LEN: usize = 500;
/// The most buckets a usage report holds (a week of minutes).
const MAX_USAGE_BUCKETS: i64 = 10_080;

/// A token to create.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    pub name: String,
    pub app_id: Option<AppId>,
    pub scopes: Vec<String>,
    pub expires_in: Option<i64>,
    pub expires_at: Option<Timestamp>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub metadata: Option<Map<String, Value>>,
    /// Binds the token to a DPoP key: the key's RFC 7638 thumbprint.
    pub dpop_jkt: Option<String>,
    /// What the token may spend on LLM calls per day or month, over every `ai` route.
    pub llm_budget: Option<keygate_core::llm::LlmBudget>,
    /// How many requests the token may make in all (1: single use).
    pub max_uses: Option<u64>,
    /// An opaque access token the OAuth server issues: governed by its client's registration
    /// (grants, scopes, lifetime, DPoP), not by the workspace's token rules nor its count of
    /// tokens per app (short-lived, one per grant).
    pub oauth_access_token: bool,
}

/// Changes to a token, applied without reissuing it. `None`: unchanged; `Some(None)`: cleared.
#[derive(Debug, Clone, Default)]
pub struct TokenUpdate {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub expires_in: Option<i64>,
    pub expires_at: Option<Option<Timestamp>>,
    pub ip_allowlist: Option<Vec<String>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub quota: Option<Option<Quota>>,
    pub metadata: Option<Map<String, Value>>,
    pub dpop_jkt: Option<Option<String>>,
    pub llm_budget: Option<Option<keygate_core::llm::LlmBudget>>,
    pub max_uses: Option<Option<u64>>,
}

/// A root key to create.
#[derive(Debug, Clone, Default)]
pub struct NewRootKey {
    pub name: String,
    pub permissions: Vec<Permission>,
    /// Lifetime in seconds from now; or `expires_at`; neither: no expiry.
    pub expires_in: Option<i64>,
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Default)]
pub struct NewApp {
    pub name: String,
    pub description: Option<String>,
    pub plan_id: Option<PlanId>,
    pub metadata: Option<Map<String, Value>>,
    /// Shared by all of the app's tokens.
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    /// What all of the app's keys may spend on LLM calls together.
    pub llm_budget: Option<keygate_core::llm::LlmBudget>,
}

#[derive(Debug, Clone, Default)]
pub struct AppUpdate {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub plan_id: Option<Option<PlanId>>,
    pub metadata: Option<Map<String, Value>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub quota: Option<Option<Quota>>,
    pub llm_budget: Option<Option<keygate_core::llm::LlmBudget>>,
}

/// The longest a usage report covers.
pub const MAX_REPORT_DAYS: i64 = 90;

/// What a usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportDimension {
    Token,
    Route,
    /// The route's `api` and `version` (routes of no API together).
    Api,
    App,
    /// The owner of the app (routes' apps without one together).
    Developer,
    /// The refusals of the workspace's routes, by their reason (`unknown_token`,
    /// `rate_limited`, …): `requests` are the refused ones.
    Reason,
}

impl ReportDimension {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "token" => Self::Token,
            "route" => Self::Route,
            "api" => Self::Api,
            "app" => Self::App,
            "developer" => Self::Developer,
            "reason" => Self::Reason,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Route => "route",
            Self::Api => "api",
            Self::App => "app",
            Self::Developer => "developer",
            Self::Reason => "reason",
        }
    }
}

/// A provider's usage report.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ProviderReport {
    #[schema(value_type = String, format = DateTime)]
    pub from: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub to: Timestamp,
    /// `token`, `route`, `api`, `app`, `developer` or `reason`.
    #[schema(value_type = String)]
    pub by: &'static str,
    /// Every request of the range (none when nothing was counted).
    pub totals: Option<ReportLine>,
    /// One line per group, the most requests first (the top consumers).
    pub groups: Vec<ReportLine>,
    /// One line per UTC day that had requests (`key`: `YYYY-MM-DD`).
    pub days: Vec<ReportLine>,
}

/// The requests of one group, day or the whole range.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReportLine {
    pub key: String,
    pub requests: u64,
    /// Answered 2xx or 3xx.
    pub ok: u64,
    /// Answered 4xx (keygate's refusals included) and 5xx.
    pub client_errors: u64,
    pub server_errors: u64,
    /// Upper bounds of the latency percentiles from the histogram, in ms (`None`: none counted,
    /// or above a second).
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

impl ReportLine {
    /// The CSV header of a report's lines.
    pub const CSV_HEADER: &'static str = "key,requests,ok,client_errors,server_errors,p50_ms,p95_ms,p99_ms\r\n";

    /// This line as CSV.
    pub fn csv_line(&self) -> String {
        let ms = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let cells = [
            self.key.clone(),
            self.requests.to_string(),
            self.ok.to_string(),
            self.client_errors.to_string(),
            self.server_errors.to_string(),
            ms(self.p50_ms),
            ms(self.p95_ms),
            ms(self.p99_ms),
        ];
        let mut line = cells.iter().map(|c| crate::csv::field(c)).collect::<Vec<_>>().join(",");
        line.push_str("\r\n");
        line
    }

    fn of(key: String, u: &UsageRecord) -> Self {
        let bound =
            |q: f64| u.latency_quantile_bucket(q).and_then(|i| keygate_core::model::LATENCY_BUCKETS_MS.get(i).copied());
        let [s2, s3, s4, s5] = u.status;
        Self {
            key,
            requests: u.requests,
            ok: s2 + s3,
            client_errors: s4,
            server_errors: s5,
            p50_ms: bound(0.5),
            p95_ms: bound(0.95),
            p99_ms: bound(0.99),
        }
    }
}

/// The most tokens an access review lists.
pub const MAX_REVIEW_ROWS: usize = 100_000;

/// One token in an access review.
#[derive(Debug, Clone)]
pub struct AccessReviewRow {
    pub token: TokenRecord,
    pub status: TokenStatus,
    pub app_name: String,
    /// The email of the app's owner, if the app has one.
    pub owner: Option<String>,
    /// Unused for the workspace's `dormant_days`.
    pub dormant: bool,
}

/// What one pass of [`Admin::enforce_dormancy`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DormancySweep {
    /// Tokens newly found dormant.
    pub flagged: u64,
    /// Of those, the ones suspended.
    pub suspended: u64,
}

/// A limit a plan change lowered to the plan's new ceiling (a token's or an app's).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Adjustment {
    /// The token (`tok_…`) or app (`app_…`) changed.
    pub target: String,
    /// `rate_limit` or `quota`.
    pub field: &'static str,
    pub before: Value,
    pub after: Value,
}

impl Adjustment {
    /// What lowering `target`'s rate limit and quota (each `(before, lowered to)`, `None` when
    /// not lowered) changed.
    fn of(
        target: &str,
        (rate_before, rate): (Option<RateLimit>, Option<RateLimit>),
        (quota_before, quota): (Option<Quota>, Option<Quota>),
    ) -> Vec<Self> {
        let mut out = Vec::new();
        if let Some(r) = rate {
            out.push(Self {
                target: target.into(),
                field: "rate_limit",
                before: json_of(&rate_before),
                after: json_of(&r),
            });
        }
        if let Some(q) = quota {
            out.push(Self {
                target: target.into(),
                field: "quota",
                before: json_of(&quota_before),
                after: json_of(&q),
            });
        }
        out
    }
}

/// The most uses a token may be limited to (a count, not a rate: beyond it, use a quota).
pub const MAX_USES_LIMIT: u64 = 1_000_000_000;

fn validate_max_uses(n: u64) -> Result<u64> {
    if n == 0 || n > MAX_USES_LIMIT {
        return Err(Error::invalid(
            "invalid_max_uses",
            format!("max_uses is a number of requests from 1 (a single-use token) to {MAX_USES_LIMIT}"),
        ));
    }
    Ok(n)
}

/// Checks limits given to a token or an app against its plan's ceilings: an actor without an
/// owner's authority cannot give more than the plan allows (nor take a limit off where the plan
/// has one).
fn check_ceilings(
    actor: &Actor,
    plan: Option<&Plan>,
    rate_limit: Option<&RateLimit>,
    quota: Option<&Quota>,
    what: &str,
) -> Result<()> {
    let Some(plan) = plan else { return Ok(()) };
    if actor.owner {
        return Ok(());
    }
    let above = |detail: String| {
        Error::new(
            ErrorKind::Forbidden,
            "limit_above_plan",
            format!(
                "{what} would allow more than its app's plan {:?} ({detail}); stay within the plan, or ask a workspace owner or move the app to a larger plan",
                plan.name
            ),
        )
    };
    if let Some(ceiling) = &plan.rate_limit
        && !rate_limit.is_some_and(|r| r.within(ceiling))
    {
        return Err(above(format!(
            "at most {} requests per {} s with a burst of {}",
            ceiling.requests, ceiling.per_seconds, ceiling.burst
        )));
    }
    if let Some(ceiling) = &plan.quota
        && !quota.is_some_and(|q| q.within(ceiling))
    {
        return Err(above(format!("at most {} requests per {}", ceiling.requests, ceiling.period.as_str())));
    }
    Ok(())
}

/// A change to a plan: a field that is `None` stays as it is; `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct PlanUpdate {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub quota: Option<Option<Quota>>,
    pub pricing: Option<Option<keygate_core::billing::Pricing>>,
}

#[derive(Debug, Clone, Default)]
pub struct NewPlan {
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    /// What an app on the plan is charged per calendar month.
    pub pricing: Option<keygate_core::billing::Pricing>,
}

/// The bucket size of a usage report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Self::Minute),
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }
    pub fn millis(self) -> i64 {
        match self {
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }
}

/// A token's usage over a range.
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub from: Timestamp,
    pub to: Timestamp,
    pub granularity: Granularity,
    /// One record per bucket, `minute` holding the bucket's start.
    pub buckets: Vec<UsageRecord>,
    pub routes: Vec<(String, UsageRecord)>,
    pub total: UsageRecord,
}

/// What an exposure report found for one presented token.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposure {
    /// `kg_<public id>…<last4>` of the presented string (never the secret).
    pub display: String,
    /// The caller's token it matched, if any.
    pub token: Option<TokenRecord>,
    /// `live`, `inactive` (revoked, expired or suspended), `live_root_key`, `unknown` or `malformed`.
    pub verdict: &'static str,
}

/// The token authority's service layer.
pub struct Admin {
    pub(crate) store: Arc<dyn Store>,
    pepper: Pepper,
    settings: AdminSettings,
    root_prefix: TokenPrefix,
    clock: Arc<dyn Clock>,
    rng: Arc<dyn Randomness>,
    /// Told of every committed token change, so the local gateway's index applies it before the
    /// API answers (other nodes follow the change feed).
    hook: std::sync::OnceLock<Arc<dyn TokenChangeHook>>,
    pending_usage: std::sync::OnceLock<Arc<dyn PendingUsage>>,
    /// Compiles and applies API-managed routes (the gateway's; see [`crate::routes`]).
    pub(crate) route_rules: std::sync::OnceLock<Arc<dyn crate::routes::RouteRules>>,
    /// Answers `POST /admin/v1/verify` from memory (the local gateway's index and limits).
    verifier: std::sync::OnceLock<Arc<dyn keygate_core::verify::TokenVerifier>>,
    index: std::sync::OnceLock<Arc<dyn keygate_core::verify::IndexReadiness>>,
    /// `[webhooks]` of the configuration (see [`crate::webhooks`]).
    pub(crate) notify_settings: std::sync::OnceLock<crate::webhooks::NotifySettings>,
}

/// Usage counted in memory and not yet in the store (the local gateway's meter), so reports
/// are live.
/// The most hours an LLM usage report covers (90 days).
pub const MAX_LLM_USAGE_HOURS: i64 = 90 * 24;

pub trait PendingUsage: Send + Sync {
    fn pending(&self, token: &TokenId) -> Vec<UsageRecord>;
    /// The latest use of each of `tokens` counted and not written yet.
    fn last_uses(&self, tokens: &[TokenId]) -> Vec<keygate_core::model::LastUse>;
    /// The AI gateway's usage of `token` counted and not written yet.
    fn pending_llm(&self, _token: &TokenId) -> Vec<keygate_core::llm::LlmUsage> {
        Vec::new()
    }
}

/// Told after every committed token change, before the API answers (the local token index
/// reads the change feed, so the next request already sees the change).
#[async_trait::async_trait]
pub trait TokenChangeHook: Send + Sync {
    async fn catch_up(&self);
    /// Waits (bounded) until every live node has applied the change at feed position `seq`
    /// and says how far it got; `None` where no node registry runs.
    async fn acknowledge(&self, _seq: u64) -> Option<Propagation> {
        None
    }
}

/// A registered node as `GET /admin/v1/nodes` and the dashboard show it.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub node: keygate_core::model::NodeRecord,
    pub state: NodeState,
    /// Feed positions the node has not applied yet (as of its last heartbeat).
    pub lag: u64,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: i64,
}

/// Whether a node takes part: `Live` nodes are waited for when a change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Live,
    /// No heartbeat within the node timeout: crashed, cut off, or its clock is far behind.
    Unreachable,
    /// It stopped gracefully.
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Unreachable => "unreachable",
            Self::Stopped => "stopped",
        }
    }

    /// The state of `n` at `now`.
    pub fn of(n: &keygate_core::model::NodeRecord, now: Timestamp, timeout_ms: i64) -> Self {
        if n.stopped_at.is_some() {
            Self::Stopped
        } else if now.as_millis().saturating_sub(n.heartbeat_at.as_millis()) > timeout_ms {
            Self::Unreachable
        } else {
            Self::Live
        }
    }
}

impl NodeStatus {
    fn of(node: keygate_core::model::NodeRecord, now: Timestamp, timeout_ms: i64, head: u64) -> Self {
        Self {
            state: NodeState::of(&node, now, timeout_ms),
            lag: head.saturating_sub(node.applied_seq),
            heartbeat_age_ms: now.as_millis().saturating_sub(node.heartbeat_at.as_millis()).max(0),
            node,
        }
    }
}

/// A change, and how far it had spread across the nodes when it was answered (`None` when it
/// changed nothing, or nothing waits for nodes here).
/// What one pass of the rotation policy recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationSweep {
    pub reminded: u64,
    pub overdue: u64,
    pub suspended: u64,
}

#[derive(Debug, Clone)]
pub struct Applied<T> {
    pub value: T,
    pub propagation: Option<Propagation>,
}

impl Admin {
    pub fn new(
        store: Arc<dyn Store>,
        pepper: Pepper,
        settings: AdminSettings,
        clock: Arc<dyn Clock>,
        rng: Arc<dyn Randomness>,
    ) -> Self {
        let root_prefix = settings.prefix.root_key_prefix();
        let admin = Self {
            store,
            pepper,
            settings,
            root_prefix,
            clock,
            rng,
            hook: std::sync::OnceLock::new(),
            pending_usage: std::sync::OnceLock::new(),
            route_rules: std::sync::OnceLock::new(),
            verifier: std::sync::OnceLock::new(),
            index: std::sync::OnceLock::new(),
            notify_settings: std::sync::OnceLock::new(),
        };
        // Every audit event written from here on is linked under the pepper's key.
        admin.store.set_audit_chain_key(admin.audit_chain_key());
        admin
    }

    /// The key of the audit trail's hash chain, derived from the pepper.
    fn audit_chain_key(&self) -> [u8; 32] {
        self.derive_key("audit chain")
    }

    /// Sets the hook told of committed token changes (once).
    pub fn set_change_hook(&self, hook: Arc<dyn TokenChangeHook>) {
        let _ = self.hook.set(hook);
    }

    /// Sets where unflushed usage is read from (once).
    pub fn set_pending_usage(&self, source: Arc<dyn PendingUsage>) {
        let _ = self.pending_usage.set(source);
    }

    /// Sets what answers token verifications (once): the local gateway.
    /// The node's token index, whose state `GET /readyz` reports.
    pub fn set_index(&self, index: Arc<dyn keygate_core::verify::IndexReadiness>) {
        let _ = self.index.set(index);
    }

    pub fn index(&self) -> Option<&Arc<dyn keygate_core::verify::IndexReadiness>> {
        self.index.get()
    }

    pub fn set_verifier(&self, verifier: Arc<dyn keygate_core::verify::TokenVerifier>) {
        let _ = self.verifier.set(verifier);
    }

    /// What answers token verifications, if this node has one.
    pub fn verifier(&self) -> Option<&Arc<dyn keygate_core::verify::TokenVerifier>> {
        self.verifier.get()
    }

    /// The nodes registered in the store, each with its state at `now` and how far behind the
    /// newest feed position it is.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let now = self.now();
        let head = self.store.position();
        let mut out: Vec<NodeStatus> = (self.store.list_nodes().await?.into_iter())
            .map(|n| NodeStatus::of(n, now, self.settings.node_timeout_ms, head))
            .collect();
        // The newest position any node applied may be ahead of what this process has heard of.
        let head = out.iter().map(|n| n.node.applied_seq).max().unwrap_or(0).max(head);
        for n in &mut out {
            n.lag = head.saturating_sub(n.node.applied_seq);
        }
        Ok(out)
    }

    /// Tells the hook (the local gateway's index) that something changed, and waits for it.
    pub(crate) async fn changed(&self) {
        if let Some(h) = self.hook.get() {
            h.catch_up().await;
        }
    }

    /// As [`Self::changed`], then waits until the live nodes have applied the change at feed
    /// position `seq` (bounded), records how far it spread, and says so.
    pub(crate) async fn acknowledged(&self, seq: u64) -> Option<Propagation> {
        let h = self.hook.get()?;
        let started = std::time::Instant::now();
        h.catch_up().await;
        let mut p = h.acknowledge(seq).await?;
        // From the commit (this node's own catch-up included) to the answer.
        p.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = self.store.record_propagation(seq, &p, self.now()).await {
            tracing::warn!(error = %e, seq, "cannot record how far a change spread");
        }
        if !p.complete() {
            tracing::warn!(
                seq,
                nodes = p.nodes,
                applied = p.applied,
                elapsed_ms = p.elapsed_ms,
                "a token change was answered before every live node had applied it"
            );
        }
        Some(p)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Fills `dest` from the configured CSPRNG.
    pub fn random(&self, dest: &mut [u8]) -> Result<()> {
        self.rng.fill(dest)
    }

    /// The longest grace period a rotation may ask for (tokens, client secrets).
    pub fn max_grace_period_seconds(&self) -> u64 {
        self.settings.max_grace_period_seconds
    }

    /// The configured CSPRNG.
    pub fn rng(&self) -> &dyn Randomness {
        &*self.rng
    }

    /// A random base62 string of `len` characters from the configured CSPRNG.
    pub fn random_text(&self, len: usize) -> Result<String> {
        keygate_core::token_format::random_base62(&*self.rng, len)
    }

    /// A key for `purpose`, derived from the pepper (HMAC-SHA256 of a label), so it lives
    /// where the pepper lives: never in the database.
    pub fn derive_key(&self, purpose: &str) -> [u8; 32] {
        // The NUL keeps derivation inputs apart from every text keygate hashes (tokens, codes,
        // session secrets), none of which can hold one.
        self.pepper.hash(&format!("\0keygate derived key\0{purpose}")).0
    }

    /// The keyed hash of a presented secret, as the store keeps it.
    pub fn hash(&self, presented: &str) -> keygate_core::secret::SecretHash {
        self.pepper.hash(presented)
    }

    pub fn prefix(&self) -> &TokenPrefix {
        &self.settings.prefix
    }

    /// The prefix of root keys (`kgroot`).
    pub fn root_prefix(&self) -> &TokenPrefix {
        &self.root_prefix
    }

    /// Finds the workspace named `name`, creating it (with its default app) if missing.
    pub async fn ensure_workspace(&self, name: &str) -> Result<Workspace> {
        let name = validate_name(name, "workspace name")?;
        let now = self.now();
        let ws = Workspace { id: WorkspaceId::random(&*self.rng)?, name, created_at: now };
        let app = App {
            id: AppId::random(&*self.rng)?,
            workspace_id: ws.id.clone(),
            name: "Default app".into(),
            description: Some("Holds tokens created without an app".into()),
            plan_id: None,
            is_default: true,
            metadata: Map::new(),
            created_at: now,
            updated_at: now,
            rate_limit: None,
            quota: None,
            llm_budget: None,
        };
        self.store.ensure_workspace(&ws, &app).await
    }

    /// Creates the default workspace at first start.
    pub async fn bootstrap(&self) -> Result<Workspace> {
        let linked = self.store.link_legacy_audit().await?;
        if linked > 0 {
            tracing::info!(events = linked, "linked the audit events written before the audit chain existed");
        }
        self.ensure_workspace(DEFAULT_WORKSPACE).await
    }

    // ---- root keys -------------------------------------------------------------------------

    /// Creates a root key in `workspace` (created if missing), without expiry. The secret is
    /// returned once.
    pub async fn create_root_key(
        &self,
        workspace: &str,
        name: &str,
        permissions: Vec<Permission>,
        actor: &Actor,
    ) -> Result<(RootKey, TokenSecret)> {
        let new = NewRootKey { name: name.to_owned(), permissions, ..NewRootKey::default() };
        self.create_root_key_with(workspace, new, actor).await
    }

    /// Creates a root key in `workspace` (created if missing). The secret is returned once and
    /// never again: the store keeps only its keyed hash.
    pub async fn create_root_key_with(
        &self,
        workspace: &str,
        new: NewRootKey,
        actor: &Actor,
    ) -> Result<(RootKey, TokenSecret)> {
        let now = self.now();
        let expires_at = resolve_expiry(new.expires_in, new.expires_at.map(Some), now)?.flatten();
        let name = validate_name(&new.name, "root key name")?;
        if new.permissions.is_empty() {
            return Err(Error::invalid(
                "invalid_permission",
                "a root key needs at least one permission; * stands for all of them",
            ));
        }
        let ws = self.ensure_workspace(workspace).await?;
        let minted = token_format::mint(&self.root_prefix, &*self.rng)?;
        let mut permissions = new.permissions;
        permissions.sort();
        permissions.dedup();
        let key = RootKey {
            id: RootKeyId::from_public_id(&minted.public_id),
            workspace_id: ws.id.clone(),
            name,
            hash: self.pepper.hash(minted.secret.expose()),
            last4: minted.last4,
            permissions,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        let audit = NewAuditEvent::new(&ws.id, actor, "root_key.create", key.id.as_str(), key.created_at)
            .with_after(root_key_view(&key));
        self.store.insert_root_key(&key, &audit).await?;
        Ok((key, minted.secret))
    }

    /// Checks a presented root key: its format first (no lookup for a malformed key), then the
    /// store by keyed hash, on every request (so a revocation or an expiry holds from the next
    /// request on, on every node), then its state. Notes the use at most once a minute per key.
    pub async fn authenticate(&self, presented: &str) -> Result<RootKey> {
        let unauthenticated = || {
            Error::new(
                ErrorKind::Unauthenticated,
                "invalid_credentials",
                "the root key is not valid; create one with `keygate root-key create`",
            )
        };
        token_format::parse(presented, &self.root_prefix).map_err(|_| unauthenticated())?;
        let key = self.store.root_key_by_hash(&self.pepper.hash(presented)).await?.ok_or_else(unauthenticated)?;
        let now = self.now();
        match key.status(now) {
            RootKeyStatus::Active => {}
            RootKeyStatus::Revoked => {
                return Err(Error::new(
                    ErrorKind::Unauthenticated,
                    "root_key_revoked",
                    "this root key was revoked; use another, or create one with `keygate root-key create`",
                ));
            }
            RootKeyStatus::Expired => {
                return Err(Error::new(
                    ErrorKind::Unauthenticated,
                    "root_key_expired",
                    "this root key has expired; create a new one with `keygate root-key create`",
                ));
            }
        }
        // One conditional write per key and minute, whatever the request rate: the key read above
        // says whether it is due, and the store's condition keeps concurrent requests (and other
        // nodes) from writing it more than once. A failure here must not refuse the request.
        let due = key.last_used_at.is_none_or(|t| now.as_millis() - t.as_millis() >= RootKey::LAST_USED_EVERY_MS);
        if due && let Err(e) = self.store.touch_root_key(&key.id, now, RootKey::LAST_USED_EVERY_MS).await {
            tracing::warn!(root_key_id = %key.id, error = %e, "cannot record a root key's last use");
        }
        Ok(key)
    }

    /// The workspace's root keys, revoked and expired ones included, newest first.
    pub async fn list_root_keys(&self, ws: &WorkspaceId) -> Result<Vec<RootKey>> {
        self.store.list_root_keys(ws).await
    }

    pub async fn root_key(&self, ws: &WorkspaceId, id: &RootKeyId) -> Result<RootKey> {
        self.store.root_key(ws, id).await?.ok_or_else(|| Error::not_found("root key"))
    }

    /// Revokes a root key of `ws` (final; idempotent). `by`: the root key asking, when one is
    /// (the admin API); it may revoke only keys whose permissions it holds all of, so a narrow key
    /// cannot switch off a broader one. People (dashboard owners) and the local command line pass
    /// `None`. Effective from the next request on every node: keys are looked up per request.
    pub async fn revoke_root_key(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        by: Option<&RootKey>,
        id: &RootKeyId,
    ) -> Result<RootKey> {
        let key = self.root_key(ws, id).await?;
        if let Some(by) = by
            && !by.covers(&key)
        {
            let missing: Vec<&str> =
                key.permissions.iter().filter(|p| !by.permissions.contains(p)).map(|p| p.as_str()).collect();
            return Err(Error::new(
                ErrorKind::Forbidden,
                "root_key_outranks",
                format!(
                    "that root key holds permissions this one lacks ({}); revoke it with a key that holds them all, \
                     from the dashboard, or with `keygate root-key revoke`",
                    missing.join(", ")
                ),
            ));
        }
        if key.revoked_at.is_some() {
            return Ok(key); // Revocation is final and idempotent.
        }
        let now = self.now();
        let mut revoked = key.clone();
        revoked.revoked_at = Some(now);
        let audit = NewAuditEvent::new(ws, actor, "root_key.revoke", id.as_str(), now)
            .with_diff(&root_key_view(&key), &root_key_view(&revoked));
        if !self.store.revoke_root_key(&key, now, &audit).await? {
            // Revoked concurrently: report what the store holds now.
            return self.root_key(ws, id).await;
        }
        tracing::info!(root_key_id = %id, actor = %actor.id, "root key revoked");
        Ok(revoked)
    }

    // ---- apps ------------------------------------------------------------------------------

    pub async fn create_app(&self, ws: &WorkspaceId, actor: &Actor, new: NewApp) -> Result<App> {
        let now = self.now();
        let plan = match &new.plan_id {
            Some(plan) => Some(self.plan(ws, plan).await?),
            None => None,
        };
        validate_limits(new.rate_limit.as_ref(), new.quota.as_ref())?;
        if new.rate_limit.is_some() || new.quota.is_some() {
            check_ceilings(
                actor,
                plan.as_ref(),
                new.rate_limit.as_ref(),
                new.quota.as_ref(),
                "the app's shared limit",
            )?;
        }
        let app = App {
            id: AppId::random(&*self.rng)?,
            workspace_id: ws.clone(),
            name: validate_name(&new.name, "name")?,
            description: new.description.map(|d| validate_text(&d, "description", 2000)).transpose()?,
            plan_id: new.plan_id,
            is_default: false,
            metadata: validate_metadata(new.metadata.unwrap_or_default())?,
            created_at: now,
            updated_at: now,
            rate_limit: new.rate_limit,
            quota: new.quota,
            llm_budget: new.llm_budget,
        };
        let audit = NewAuditEvent::new(ws, actor, "app.create", app.id.as_str(), now).with_after(app_view(&app));
        self.store.insert_app(&app, &audit).await?;
        Ok(app)
    }

    pub async fn app(&self, ws: &WorkspaceId, id: &AppId) -> Result<App> {
        self.store.app(ws, id).await?.ok_or_else(|| Error::not_found("app"))
    }

    pub async fn list_apps(&self, ws: &WorkspaceId, page: &PageRequest) -> Result<Page<App>> {
        self.store.list_apps(ws, page).await
    }

    /// Changes an app. Its shared limits are held to its plan's ceilings (for actors below an
    /// owner); moving it to a plan lowers whatever of it and its tokens is above the new plan's
    /// ceilings, and says so ([`Self::update_app_adjusting`]).
    pub async fn update_app(&self, ws: &WorkspaceId, actor: &Actor, id: &AppId, update: AppUpdate) -> Result<App> {
        Ok(self.update_app_adjusting(ws, actor, id, update).await?.0)
    }

    /// [`Self::update_app`], with the limits the change lowered.
    pub async fn update_app_adjusting(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &AppId,
        update: AppUpdate,
    ) -> Result<(App, Vec<Adjustment>)> {
        let before = self.app(ws, id).await?;
        let mut app = before.clone();
        let limits_given = update.rate_limit.is_some() || update.quota.is_some();
        if let Some(r) = update.rate_limit {
            app.rate_limit = r;
        }
        if let Some(q) = update.quota {
            app.quota = q;
        }
        if let Some(b) = update.llm_budget {
            app.llm_budget = b;
        }
        validate_limits(app.rate_limit.as_ref(), app.quota.as_ref())?;
        if let Some(name) = update.name {
            app.name = validate_name(&name, "name")?;
        }
        if let Some(d) = update.description {
            app.description = d.map(|d| validate_text(&d, "description", 2000)).transpose()?;
        }
        if let Some(plan) = update.plan_id {
            if let Some(p) = &plan {
                self.plan(ws, p).await?;
            }
            app.plan_id = plan;
        }
        if let Some(m) = update.metadata {
            app.metadata = validate_metadata(m)?;
        }
        let plan = match &app.plan_id {
            Some(p) => Some(self.plan(ws, p).await?),
            None => None,
        };
        if limits_given && (app.rate_limit.is_some() || app.quota.is_some()) {
            check_ceilings(
                actor,
                plan.as_ref(),
                app.rate_limit.as_ref(),
                app.quota.as_ref(),
                "the app's shared limit",
            )?;
        }
        if app == before {
            return Ok((app, Vec::new()));
        }
        app.updated_at = self.now();
        let audit = NewAuditEvent::new(ws, actor, "app.update", id.as_str(), app.updated_at)
            .with_diff(&app_view(&before), &app_view(&app));
        self.store.update_app(&app, &audit).await?;
        let mut adjusted = Vec::new();
        if app.plan_id != before.plan_id
            && let Some(plan) = &plan
        {
            adjusted = self.lower_to_plan(ws, plan, std::slice::from_ref(&app)).await?;
            if let Ok(a) = self.app(ws, id).await {
                app = a;
            }
        }
        Ok((app, adjusted))
    }

    /// Lowers what of `apps` and their live tokens is above `plan`'s ceilings to the ceiling
    /// (a limit missing where the plan has one becomes the plan's), each change audited under
    /// the actor `plan-policy`; returns what it changed.
    async fn lower_to_plan(&self, ws: &WorkspaceId, plan: &Plan, apps: &[App]) -> Result<Vec<Adjustment>> {
        if plan.rate_limit.is_none() && plan.quota.is_none() {
            return Ok(Vec::new());
        }
        let policy = Actor { id: "plan-policy".into(), source: None, owner: true };
        let lowered_rate = |r: Option<RateLimit>| match (r, plan.rate_limit) {
            (Some(r), Some(c)) if r.within(&c) => None,
            (_, Some(c)) => Some(c),
            (_, None) => None,
        };
        let lowered_quota = |q: Option<Quota>| match (q, plan.quota) {
            (Some(q), Some(c)) if q.within(&c) => None,
            (_, Some(c)) => Some(c),
            (_, None) => None,
        };
        let mut out = Vec::new();
        for app in apps {
            // The app's shared limits: only those it has (none is not "more" for an app: its
            // tokens are held by their own).
            let rate = app.rate_limit.and_then(|r| lowered_rate(Some(r)));
            let quota = app.quota.and_then(|q| lowered_quota(Some(q)));
            if rate.is_some() || quota.is_some() {
                let update = AppUpdate { rate_limit: rate.map(Some), quota: quota.map(Some), ..AppUpdate::default() };
                out.extend(Adjustment::of(app.id.as_str(), (app.rate_limit, rate), (app.quota, quota)));
                Box::pin(self.update_app_adjusting(ws, &policy, &app.id, update)).await?;
            }
            let filter = TokenFilter { app_id: Some(app.id.clone()), ..TokenFilter::default() };
            let mut cursor = None;
            loop {
                let page = self.store.list_tokens(ws, &filter, self.now(), &PageRequest { limit: 500, cursor }).await?;
                for t in &page.items {
                    if t.state == TokenState::Revoked {
                        continue;
                    }
                    let (rate, quota) = (lowered_rate(t.rate_limit), lowered_quota(t.quota));
                    if rate.is_none() && quota.is_none() {
                        continue;
                    }
                    let reason = format!("above the ceiling of the plan {:?}", plan.name);
                    self.change_token_because(ws, &policy, &t.id, "token.update", Some(&reason), |t, _| {
                        if let Some(r) = rate {
                            t.rate_limit = Some(r);
                        }
                        if let Some(q) = quota {
                            t.quota = Some(q);
                        }
                        Ok(())
                    })
                    .await?;
                    out.extend(Adjustment::of(t.id.as_str(), (t.rate_limit, rate), (t.quota, quota)));
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    pub async fn delete_app(&self, ws: &WorkspaceId, actor: &Actor, id: &AppId, revoke_tokens: bool) -> Result<()> {
        let app = self.app(ws, id).await?;
        let now = self.now();
        let audit =
            NewAuditEvent::new(ws, actor, "app.delete", id.as_str(), now).with_diff(&app_view(&app), &Value::Null);
        self.store.delete_app(ws, id, revoke_tokens, now, &audit).await?;
        self.changed().await;
        Ok(())
    }

    // ---- plans and the scope catalog -------------------------------------------------------

    pub async fn create_plan(&self, ws: &WorkspaceId, actor: &Actor, new: NewPlan) -> Result<Plan> {
        if let Some(r) = &new.rate_limit {
            r.validate()?;
        }
        if let Some(q) = &new.quota {
            q.validate()?;
        }
        let plan = Plan {
            id: PlanId::random(&*self.rng)?,
            workspace_id: ws.clone(),
            name: validate_name(&new.name, "name")?,
            description: new.description.map(|d| validate_text(&d, "description", 2000)).transpose()?,
            scopes: checked_scopes(&new.scopes)?,
            rate_limit: new.rate_limit,
            quota: new.quota,
            created_at: self.now(),
            pricing: new.pricing,
        };
        let after = serde_json::to_value(&plan).unwrap_or(Value::Null);
        let audit = NewAuditEvent::new(ws, actor, "plan.create", plan.id.as_str(), plan.created_at).with_after(after);
        self.store.insert_plan(&plan, &audit).await.map_err(|e| match e.code {
            "already_exists" => Error::conflict("plan_exists", "a plan with this name already exists in the workspace"),
            _ => e,
        })?;
        Ok(plan)
    }

    /// Changes a plan. Its rate limit and quota are the defaults of new tokens and the ceilings
    /// of every token and app on it: whatever is above the new ceilings is lowered to them
    /// ([`Self::update_plan_adjusting`] says what). Tokens keep their scopes (the next change to
    /// such a token is checked against the new scopes). A change that changes nothing writes
    /// nothing.
    pub async fn update_plan(&self, ws: &WorkspaceId, actor: &Actor, id: &PlanId, update: PlanUpdate) -> Result<Plan> {
        Ok(self.update_plan_adjusting(ws, actor, id, update).await?.0)
    }

    /// [`Self::update_plan`], with the limits of tokens and apps it lowered.
    pub async fn update_plan_adjusting(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &PlanId,
        update: PlanUpdate,
    ) -> Result<(Plan, Vec<Adjustment>)> {
        let before = self.plan(ws, id).await?;
        let mut plan = before.clone();
        if let Some(name) = update.name {
            plan.name = validate_name(&name, "name")?;
        }
        if let Some(d) = update.description {
            plan.description = d.map(|d| validate_text(&d, "description", 2000)).transpose()?;
        }
        if let Some(scopes) = update.scopes {
            plan.scopes = checked_scopes(&scopes)?;
        }
        if let Some(r) = update.rate_limit {
            if let Some(r) = &r {
                r.validate()?;
            }
            plan.rate_limit = r;
        }
        if let Some(q) = update.quota {
            if let Some(q) = &q {
                q.validate()?;
            }
            plan.quota = q;
        }
        if let Some(p) = update.pricing {
            plan.pricing = p;
        }
        if plan == before {
            return Ok((plan, Vec::new()));
        }
        let view = |p: &Plan| serde_json::to_value(p).unwrap_or(Value::Null);
        let audit = NewAuditEvent::new(ws, actor, "plan.update", id.as_str(), self.now())
            .with_diff(&view(&before), &view(&plan));
        self.store.update_plan(&plan, &audit).await.map_err(|e| match e.code {
            "already_exists" => Error::conflict("plan_exists", "a plan with this name already exists in the workspace"),
            _ => e,
        })?;
        if plan.rate_limit == before.rate_limit && plan.quota == before.quota {
            return Ok((plan, Vec::new()));
        }
        let mut on_plan = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.store.list_apps(ws, &PageRequest { limit: 500, cursor }).await?;
            on_plan.extend(page.items.into_iter().filter(|a| a.plan_id.as_ref() == Some(id)));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let adjusted = self.lower_to_plan(ws, &plan, &on_plan).await?;
        Ok((plan, adjusted))
    }

    /// Changes the scopes a plan allows. Tokens already issued keep theirs (the next change to
    /// such a token is checked against the new list).
    pub async fn set_plan_scopes(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &PlanId,
        scopes: &[String],
    ) -> Result<Plan> {
        let mut plan = self.plan(ws, id).await?;
        let before = serde_json::json!({"scopes": plan.scopes});
        plan.scopes = checked_scopes(scopes)?;
        let mut audit = NewAuditEvent::new(ws, actor, "plan.update", plan.id.as_str(), self.now());
        audit.before = Some(before);
        audit.after = Some(serde_json::json!({"scopes": plan.scopes}));
        self.store.update_plan(&plan, &audit).await?;
        Ok(plan)
    }

    pub async fn plan(&self, ws: &WorkspaceId, id: &PlanId) -> Result<Plan> {
        self.store.plan(ws, id).await?.ok_or_else(|| Error::not_found("plan"))
    }

    pub async fn list_plans(&self, ws: &WorkspaceId) -> Result<Vec<Plan>> {
        self.store.list_plans(ws).await
    }

    pub async fn put_scope(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        scope: &str,
        description: Option<String>,
        api: Option<String>,
    ) -> Result<ScopeEntry> {
        let entry = ScopeEntry {
            workspace_id: ws.clone(),
            scope: Scope::parse_required(scope)?,
            description: description.map(|d| validate_text(&d, "description", 2000)).transpose()?,
            api: api.map(|a| validate_name(&a, "api")).transpose()?,
            created_at: self.now(),
        };
        let after = serde_json::json!({"description": entry.description, "api": entry.api});
        let audit =
            NewAuditEvent::new(ws, actor, "scope.put", entry.scope.as_str(), entry.created_at).with_after(after);
        self.store.put_scope(&entry, &audit).await?;
        Ok(entry)
    }

    pub async fn list_scopes(&self, ws: &WorkspaceId) -> Result<Vec<ScopeEntry>> {
        self.store.list_scopes(ws).await
    }

    pub async fn delete_scope(&self, ws: &WorkspaceId, actor: &Actor, scope: &str) -> Result<()> {
        let scope = Scope::parse(scope)
            .map_err(|_| Error::new(ErrorKind::NotFound, "scope_not_found", "no such scope in the catalog"))?;
        let audit = NewAuditEvent::new(ws, actor, "scope.delete", scope.as_str(), self.now());
        if self.store.delete_scope(ws, &scope, &audit).await? {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::NotFound, "scope_not_found", "no such scope in the catalog"))
        }
    }

    /// Checks granted scopes against the workspace's catalog (when it has one) and the app's plan.
    pub(crate) async fn check_scopes_allowed(
        &self,
        ws: &WorkspaceId,
        app: &App,
        scopes: &[Scope],
    ) -> Result<Option<Plan>> {
        let catalog = self.store.list_scopes(ws).await?;
        if !catalog.is_empty() {
            for s in scopes {
                let known = catalog.iter().any(|e| s.covers(&e.scope) || e.scope.covers(s));
                // 409, not 400: the request is well formed; the workspace's catalog (its current
                // state) does not hold the scope, and it may tomorrow.
                if !known {
                    return Err(Error::conflict(
                        "unknown_scope",
                        format!(
                            "{s} is not in the workspace's scope catalog; add it there first or pick a listed scope"
                        ),
                    ));
                }
            }
        }
        let plan = match &app.plan_id {
            Some(p) => Some(self.plan(ws, p).await?),
            None => None,
        };
        if let Some(plan) = &plan {
            for s in scopes {
                if !plan.scopes.iter().any(|p| p.covers(s)) {
                    return Err(Error::conflict(
                        "scope_not_in_plan",
                        format!(
                            "the app's plan {:?} does not include {s}; move the app to a plan that does",
                            plan.name
                        ),
                    ));
                }
            }
        }
        Ok(plan)
    }

    /// The workspace's token rules and denylist.
    pub async fn token_rules(&self, ws: &WorkspaceId) -> Result<keygate_core::account::TokenRules> {
        Ok(self.store.workspace_policy(ws).await?.rules)
    }

    /// Replaces the workspace's token rules and denylist (the rest of its policy stays), audited
    /// as `workspace.policy_changed`. New rules bind tokens from their next creation or change;
    /// a new denylist reaches every node's gateway through the change feed.
    pub async fn set_token_rules(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        rules: keygate_core::account::TokenRules,
    ) -> Result<keygate_core::account::TokenRules> {
        rules.validate()?;
        let mut policy = self.store.workspace_policy(ws).await?;
        if policy.rules == rules {
            return Ok(rules);
        }
        let mut audit = NewAuditEvent::new(ws, actor, "workspace.policy_changed", ws.as_str(), self.now());
        audit.before = serde_json::to_value(&policy.rules).ok();
        audit.after = serde_json::to_value(&rules).ok();
        policy.rules = rules;
        self.store.put_workspace_policy(ws, &policy, &audit).await?;
        Ok(policy.rules)
    }

    /// Changes the workspace's policy with `change` (which may refuse it), audited as
    /// `workspace.policy_changed` with the policy before and after; nothing is written when
    /// nothing changes.
    pub async fn set_policy_settings(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        change: impl FnOnce(WorkspacePolicy) -> Result<WorkspacePolicy>,
    ) -> Result<WorkspacePolicy> {
        let before = self.store.workspace_policy(ws).await?;
        let after = change(before.clone())?;
        if after == before {
            return Ok(after);
        }
        let mut audit = NewAuditEvent::new(ws, actor, "workspace.policy_changed", ws.as_str(), self.now());
        audit.before = serde_json::to_value(&before).ok();
        audit.after = serde_json::to_value(&after).ok();
        self.store.put_workspace_policy(ws, &after, &audit).await?;
        Ok(after)
    }

    /// Refuses a new token for `app` when the workspace's policy caps its active tokens and the
    /// app holds that many already (the OAuth server's opaque access tokens aside).
    async fn check_token_count(&self, ws: &WorkspaceId, policy: &WorkspacePolicy, app: &AppId) -> Result<()> {
        let Some(max) = policy.rules.max_active_tokens_per_app else { return Ok(()) };
        let filter =
            TokenFilter { app_id: Some(app.clone()), status: Some(TokenStatus::Active), ..TokenFilter::default() };
        let (mut held, mut cursor) = (0u64, None);
        loop {
            let page = self.store.list_tokens(ws, &filter, self.now(), &PageRequest { limit: 500, cursor }).await?;
            // The OAuth server's opaque access tokens are not counted (see `NewToken`).
            held += page.items.iter().filter(|t| !t.metadata.contains_key("oauth_client_id")).count() as u64;
            match page.next_cursor {
                Some(c) if held < u64::from(max) => cursor = Some(c),
                _ => break,
            }
        }
        if held >= u64::from(max) {
            return Err(Error::conflict(
                "too_many_tokens",
                format!(
                    "this workspace allows at most {max} active tokens per app; revoke one of the app's tokens first"
                ),
            ));
        }
        Ok(())
    }

    // ---- tokens ----------------------------------------------------------------------------

    pub async fn create_token(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        new: NewToken,
    ) -> Result<(TokenRecord, TokenSecret)> {
        let now = self.now();
        let app = match &new.app_id {
            Some(id) => self.app(ws, id).await?,
            None => self.store.default_app(ws).await?,
        };
        let scopes = checked_scopes(&new.scopes)?;
        let plan = self.check_scopes_allowed(ws, &app, &scopes).await?;
        let expires_at = resolve_expiry(new.expires_in, new.expires_at.map(Some), now)?.flatten();
        let policy = self.store.workspace_policy(ws).await?;
        let rate_limit = new.rate_limit.or_else(|| plan.as_ref().and_then(|p| p.rate_limit));
        let quota = new.quota.or_else(|| plan.as_ref().and_then(|p| p.quota));
        validate_limits(rate_limit.as_ref(), quota.as_ref())?;
        check_ceilings(actor, plan.as_ref(), rate_limit.as_ref(), quota.as_ref(), "the token")?;
        let max_uses = new.max_uses.map(validate_max_uses).transpose()?;
        let minted = token_format::mint(&self.settings.prefix, &*self.rng)?;
        let token = TokenRecord {
            id: TokenId::from_public_id(&minted.public_id),
            workspace_id: ws.clone(),
            app_id: app.id,
            name: validate_name(&new.name, "name")?,
            hash: self.pepper.hash(minted.secret.expose()),
            prefix: self.settings.prefix.as_str().to_owned(),
            last4: minted.last4,
            scopes,
            state: TokenState::Active,
            expires_at,
            ip_allowlist: parse_allowlist(&new.ip_allowlist)?,
            rate_limit,
            quota,
            metadata: validate_metadata(new.metadata.unwrap_or_default())?,
            dpop_jkt: new.dpop_jkt.map(|j| validate_jkt(&j)).transpose()?,
            llm_budget: new.llm_budget,
            max_uses,
            created_at: now,
            updated_at: now,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoke_reason: None,
            rotated_from: None,
            replaced_by: None,
            exposed_at: None,
            version: 1,
        };
        if new.oauth_access_token {
            check_policy(&WorkspacePolicy { rules: Default::default(), ..policy }, &token, now, true)?;
        } else {
            check_policy(&policy, &token, now, true)?;
            self.check_token_count(ws, &policy, &token.app_id).await?;
        }
        let audit =
            NewAuditEvent::new(ws, actor, "token.create", token.id.as_str(), now).with_after(token.audit_view());
        self.store.insert_token(&token, &audit).await?;
        self.changed().await;
        Ok((token, minted.secret))
    }

    pub async fn token(&self, ws: &WorkspaceId, id: &TokenId) -> Result<TokenRecord> {
        let mut t = self.store.token(ws, id).await?.ok_or_else(|| Error::not_found("token"))?;
        self.with_pending_last_use(std::slice::from_mut(&mut t));
        Ok(t)
    }

    pub async fn list_tokens(
        &self,
        ws: &WorkspaceId,
        filter: &TokenFilter,
        page: &PageRequest,
    ) -> Result<Page<TokenRecord>> {
        let mut page = self.store.list_tokens(ws, filter, self.now(), page).await?;
        self.with_pending_last_use(&mut page.items);
        // A use the gateway has not written yet makes a token not dormant.
        if let Some(since) = filter.unused_since {
            page.items.retain(|t| t.last_used_at.unwrap_or(t.created_at) < since);
        }
        Ok(page)
    }

    /// The last use is written with the usage, once a minute; the gateway's uses since then are
    /// added here, so a token shows its last use as soon as its usage shows the request.
    fn with_pending_last_use(&self, tokens: &mut [TokenRecord]) {
        let Some(p) = self.pending_usage.get() else { return };
        let ids: Vec<TokenId> = tokens.iter().map(|t| t.id.clone()).collect();
        for seen in p.last_uses(&ids) {
            if let Some(t) = tokens.iter_mut().find(|t| t.id == seen.token_id)
                && t.last_used_at.is_none_or(|at| at < seen.at)
            {
                t.last_used_at = Some(seen.at);
                t.last_used_ip = Some(seen.ip);
            }
        }
    }

    /// Reads the token, lets `change` edit a copy, and writes it with an audit event holding
    /// the fields that changed. A change that changes nothing writes nothing.
    async fn change_token(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        action: &str,
        change: impl FnOnce(&mut TokenRecord, Timestamp) -> Result<()>,
    ) -> Result<Applied<TokenRecord>> {
        self.change_token_because(ws, actor, id, action, None, change).await
    }

    /// [`Self::change_token`] with a reason, recorded in the audit event (`after.reason`).
    async fn change_token_because(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        action: &str,
        reason: Option<&str>,
        change: impl FnOnce(&mut TokenRecord, Timestamp) -> Result<()>,
    ) -> Result<Applied<TokenRecord>> {
        let before = self.token(ws, id).await?;
        let now = self.now();
        let mut token = before.clone();
        change(&mut token, now)?;
        if token == before {
            return Ok(Applied { value: token, propagation: None });
        }
        token.updated_at = now;
        token.version = before.version + 1;
        let mut audit = NewAuditEvent::new(ws, actor, action, id.as_str(), now)
            .with_diff(&before.audit_view(), &token.audit_view());
        if let (Some(reason), Some(serde_json::Value::Object(after))) = (reason, audit.after.as_mut()) {
            after.insert("reason".into(), reason.into());
        }
        let seq = self.store.update_token(&token, &audit).await?;
        let propagation = self.acknowledged(seq).await;
        Ok(Applied { value: token, propagation })
    }

    pub async fn update_token(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        update: TokenUpdate,
    ) -> Result<Applied<TokenRecord>> {
        // Validation that needs the store happens before the read-modify-write.
        let current = self.token(ws, id).await?;
        let scopes = match &update.scopes {
            Some(raw) => {
                let scopes = checked_scopes(raw)?;
                let app = self.app(ws, &current.app_id).await?;
                self.check_scopes_allowed(ws, &app, &scopes).await?;
                Some(scopes)
            }
            None => None,
        };
        // A change of limits is held to the plan's ceilings (the result, as it will be).
        let plan = if update.rate_limit.is_some() || update.quota.is_some() {
            match self.app(ws, &current.app_id).await?.plan_id {
                Some(p) => Some(self.plan(ws, &p).await?),
                None => None,
            }
        } else {
            None
        };
        let max_uses = update.max_uses.map(|m| m.map(validate_max_uses).transpose()).transpose()?;
        // The workspace's policy, for the fields it concerns: the lifetime when the expiry
        // changes, the token rules when the expiry, scopes, allowlist or DPoP binding do.
        let expiry_changes = update.expires_in.is_some() || update.expires_at.is_some();
        let rules_apply =
            expiry_changes || update.scopes.is_some() || update.ip_allowlist.is_some() || update.dpop_jkt.is_some();
        let policy = if rules_apply { Some(self.store.workspace_policy(ws).await?) } else { None };
        self.change_token(ws, actor, id, "token.update", |t, now| {
            refuse_if_revoked(t)?;
            if let Some(name) = &update.name {
                t.name = validate_name(name, "name")?;
            }
            if let Some(scopes) = scopes {
                t.scopes = scopes;
            }
            if let Some(expiry) = resolve_expiry(update.expires_in, update.expires_at, now)? {
                if let Some(next) = &t.replaced_by {
                    return Err(Error::conflict(
                        "token_rotated",
                        format!("the token was rotated to {next} and stops when its grace period ends; change that token instead"),
                    ));
                }
                t.expires_at = expiry;
            }
            if let Some(list) = &update.ip_allowlist {
                t.ip_allowlist = parse_allowlist(list)?;
            }
            if let Some(r) = update.rate_limit {
                if let Some(r) = &r {
                    r.validate()?;
                }
                t.rate_limit = r;
            }
            if let Some(q) = update.quota {
                if let Some(q) = &q {
                    q.validate()?;
                }
                t.quota = q;
            }
            if let Some(m) = update.metadata {
                t.metadata = validate_metadata(m)?;
            }
            if let Some(j) = &update.dpop_jkt {
                t.dpop_jkt = j.as_deref().map(validate_jkt).transpose()?;
            }
            if let Some(b) = update.llm_budget {
                t.llm_budget = b;
            }
            if let Some(m) = max_uses {
                t.max_uses = m;
            }
            check_ceilings(actor, plan.as_ref(), t.rate_limit.as_ref(), t.quota.as_ref(), "the token")?;
            if let Some(policy) = &policy {
                check_policy(policy, t, now, expiry_changes)?;
            }
            Ok(())
        })
        .await
    }

    pub async fn suspend_token(&self, ws: &WorkspaceId, actor: &Actor, id: &TokenId) -> Result<Applied<TokenRecord>> {
        self.change_token(ws, actor, id, "token.suspend", |t, _| {
            refuse_if_revoked(t)?;
            t.state = TokenState::Suspended;
            Ok(())
        })
        .await
    }

    /// Suspends a token for a reason that the audit event records (a policy's).
    pub async fn suspend_token_because(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        reason: &str,
    ) -> Result<Applied<TokenRecord>> {
        self.change_token_because(ws, actor, id, "token.suspend", Some(reason), |t, _| {
            refuse_if_revoked(t)?;
            t.state = TokenState::Suspended;
            Ok(())
        })
        .await
    }

    /// [`Self::resume_token`], only if the token is still at `version` (nothing has changed it
    /// since the caller decided it may be resumed): 409 `token_changed` otherwise.
    pub(crate) async fn resume_token_at(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        version: i64,
    ) -> Result<Applied<TokenRecord>> {
        self.change_token(ws, actor, id, "token.resume", |t, _| {
            if t.version != version {
                return Err(Error::conflict(
                    "token_changed",
                    "the token changed while it was being resumed (it may have been found exposed): look at it again",
                ));
            }
            refuse_if_revoked(t)?;
            t.state = TokenState::Active;
            Ok(())
        })
        .await
    }

    pub async fn resume_token(&self, ws: &WorkspaceId, actor: &Actor, id: &TokenId) -> Result<Applied<TokenRecord>> {
        self.change_token(ws, actor, id, "token.resume", |t, _| {
            refuse_if_revoked(t)?;
            t.state = TokenState::Active;
            Ok(())
        })
        .await
    }

    /// Any workspace's OAuth client with this id, if it is `ws`'s (another's is not found).
    pub async fn oauth_client(&self, ws: &WorkspaceId, client_id: &str) -> Result<OAuthClient> {
        self.store
            .oauth_client(client_id)
            .await?
            .filter(|c| c.workspace_id == *ws)
            .ok_or_else(|| Error::not_found("oauth client"))
    }

    /// Suspends an OAuth client, for a reason a person gave (checked like a revocation's): see
    /// [`Self::suspend_oauth_client_because`].
    pub async fn suspend_oauth_client(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        client_id: &str,
        reason: Option<String>,
    ) -> Result<OAuthClient> {
        let reason = reason.map(|r| validate_text(&r, "reason", MAX_REASON_LEN)).transpose()?;
        self.suspend_oauth_client_because(ws, actor, client_id, reason.as_deref()).await
    }

    /// Suspends an OAuth client for `reason` (a person's, or a policy's naming its alert): the
    /// token endpoint issues it nothing until a person resumes it, and its live access tokens stop
    /// at every gateway — the JWTs through the change feed, the opaque ones (API keys) revoked as
    /// keys — before this answers (bounded, as a token change is). Its refresh tokens are kept,
    /// refused while it is suspended. Audited as `oauth_client.suspend`, whose `after` holds
    /// `suspended_at`, `suspended_reason` and `access_tokens_revoked`. Suspending a suspended
    /// client changes nothing: its first suspension's time and reason stay.
    pub async fn suspend_oauth_client_because(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        client_id: &str,
        reason: Option<&str>,
    ) -> Result<OAuthClient> {
        let current = self.oauth_client(ws, client_id).await?;
        if current.is_suspended() {
            return Ok(current);
        }
        let now = self.now();
        let next =
            OAuthClient { suspended_at: Some(now), suspended_reason: reason.map(str::to_owned), ..current.clone() };
        let audit = client_change(ws, actor, "oauth_client.suspend", &current, &next, now);
        let Some(done) = self.store.suspend_oauth_client(ws, client_id, reason, now, &audit).await? else {
            // Suspended meanwhile (by the policy, or by another person): as it is now.
            return self.oauth_client(ws, client_id).await;
        };
        for jti in &done.revoked {
            if let Some(id) = TokenId::parse(jti) {
                self.revoke_oauth_access_key(ws, &id, "its OAuth client was suspended").await?;
            }
        }
        if !done.revoked.is_empty() {
            // Every live node refuses the client's JWTs before this answers (bounded wait).
            self.acknowledged(self.store.position()).await;
        }
        Ok(done.client)
    }

    /// Lifts an OAuth client's suspension: the token endpoint serves it again, its refresh tokens
    /// work again (the access tokens revoked by the suspension stay revoked). Audited as
    /// `oauth_client.resume`. Resuming an active client changes nothing.
    pub async fn resume_oauth_client(&self, ws: &WorkspaceId, actor: &Actor, client_id: &str) -> Result<OAuthClient> {
        let current = self.oauth_client(ws, client_id).await?;
        if !current.is_suspended() {
            return Ok(current);
        }
        let now = self.now();
        let next = OAuthClient { suspended_at: None, suspended_reason: None, ..current.clone() };
        let audit = client_change(ws, actor, "oauth_client.resume", &current, &next, now);
        match self.store.resume_oauth_client(ws, client_id, now, &audit).await? {
            Some(client) => Ok(client),
            // Resumed meanwhile: as it is now.
            None => self.oauth_client(ws, client_id).await,
        }
    }

    /// Revokes an opaque OAuth access token (an API key) as the authorization server (actor
    /// `oauth`), for `reason`; one that is gone already is no error.
    pub(crate) async fn revoke_oauth_access_key(&self, ws: &WorkspaceId, id: &TokenId, reason: &str) -> Result<()> {
        let actor = Actor { id: "oauth".into(), source: None, owner: true };
        match self.revoke_token(ws, &actor, id, Some(reason.to_owned())).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn revoke_token(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        reason: Option<String>,
    ) -> Result<Applied<TokenRecord>> {
        let reason = reason.map(|r| validate_text(&r, "reason", MAX_REASON_LEN)).transpose()?;
        self.change_token(ws, actor, id, "token.revoke", |t, now| {
            if t.state == TokenState::Revoked {
                return Ok(()); // Revocation is final and idempotent.
            }
            t.state = TokenState::Revoked;
            t.revoked_at = Some(now);
            t.revoke_reason = reason;
            Ok(())
        })
        .await
    }

    /// Issues a new secret for the token. The old one keeps working for `grace_period_seconds`
    /// and then expires; the two records point at each other.
    pub async fn rotate_token(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &TokenId,
        grace_period_seconds: u64,
    ) -> Result<(Applied<TokenRecord>, TokenSecret)> {
        if grace_period_seconds > self.settings.max_grace_period_seconds {
            return Err(Error::invalid(
                "invalid_grace_period",
                format!("grace_period_seconds is at most {}", self.settings.max_grace_period_seconds),
            ));
        }
        let before = self.token(ws, id).await?;
        let now = self.now();
        match before.status(now) {
            TokenStatus::Active => {}
            TokenStatus::Revoked => return Err(token_revoked()),
            TokenStatus::Expired => {
                return Err(Error::conflict("token_expired", "the token has expired; create a new token instead"));
            }
            TokenStatus::Suspended => {
                return Err(Error::conflict("token_suspended", "the token is suspended; resume it before rotating"));
            }
        }
        if let Some(next) = &before.replaced_by {
            return Err(Error::conflict(
                "token_already_rotated",
                format!("the token was already rotated to {next}; rotate that one instead"),
            ));
        }
        let minted = token_format::mint(&self.settings.prefix, &*self.rng)?;
        let new_id = TokenId::from_public_id(&minted.public_id);
        let new = TokenRecord {
            id: new_id.clone(),
            hash: self.pepper.hash(minted.secret.expose()),
            prefix: self.settings.prefix.as_str().to_owned(),
            last4: minted.last4,
            created_at: now,
            updated_at: now,
            last_used_at: None,
            last_used_ip: None,
            rotated_from: Some(before.id.clone()),
            replaced_by: None,
            exposed_at: None,
            version: 1,
            ..before.clone()
        };
        let mut old = before.clone();
        let grace_end = now.plus_seconds(i64::try_from(grace_period_seconds).unwrap_or(i64::MAX));
        old.expires_at = Some(old.expires_at.map_or(grace_end, |e| e.min(grace_end)));
        old.replaced_by = Some(new_id.clone());
        old.updated_at = now;
        old.version = before.version + 1;
        let (b, mut a) = keygate_core::model::changed_fields(&before.audit_view(), &old.audit_view());
        if let Some(obj) = a.as_object_mut() {
            obj.insert("grace_period_seconds".into(), grace_period_seconds.into());
        }
        let mut audit = NewAuditEvent::new(ws, actor, "token.rotate", id.as_str(), now);
        audit.before = Some(b);
        audit.after = Some(a);
        let created = NewAuditEvent::new(ws, actor, "token.create", new.id.as_str(), now).with_after(new.audit_view());
        let seq = self.store.rotate_token(&old, &new, &audit, &created).await?;
        let propagation = self.acknowledged(seq).await;
        Ok((Applied { value: new, propagation }, minted.secret))
    }

    /// Marks the caller's tokens among `found` (token, where it was found) as exposed, with the
    /// location in the audit trail, and says which are live. Root keys of the caller's workspace
    /// are reported too (verdict `live_root_key`). Anything of another workspace is `unknown`.
    pub async fn report_exposed(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        found: &[(String, Option<String>)],
    ) -> Result<Vec<Exposure>> {
        // Every location is checked before anything is written, so a bad one changes nothing.
        for (_, location) in found {
            if let Some(l) = location {
                validate_text(l, "location", 500)?;
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (presented, location) in found {
            let location = location.clone();
            let token_parse = token_format::parse(presented, &self.settings.prefix);
            let root_parse = token_format::parse(presented, &self.root_prefix);
            let Some(parsed) = token_parse.ok().or(root_parse.ok()) else {
                out.push(Exposure { display: "(malformed)".into(), token: None, verdict: "malformed" });
                continue;
            };
            let display = format!("{}_{}…{}", parsed.prefix, parsed.public_id, parsed.last4);
            let hash = self.pepper.hash(presented);
            if token_parse.is_err() {
                let key = self.store.root_key_by_hash(&hash).await?.filter(|k| &k.workspace_id == ws);
                let verdict = if key.is_some() { "live_root_key" } else { "unknown" };
                if let Some(k) = key {
                    tracing::warn!(root_key_id = %k.id, location = location.as_deref().unwrap_or("-"), "a root key was reported exposed");
                }
                out.push(Exposure { display, token: None, verdict });
                continue;
            }
            let Some(token) = self.store.token_by_hash(&hash).await?.filter(|t| &t.workspace_id == ws) else {
                out.push(Exposure { display, token: None, verdict: "unknown" });
                continue;
            };
            let marked = self.mark_exposed(ws, actor, &token, location.as_deref()).await?;
            let verdict = if marked.status(self.now()) == TokenStatus::Active { "live" } else { "inactive" };
            out.push(Exposure { display, token: Some(marked), verdict });
        }
        Ok(out)
    }

    /// Marks `token` exposed (found in a URL, a file, a log) with an audit event that says where,
    /// then applies the workspace's `exposure_action`: a token still usable is suspended or
    /// revoked (actor `exposure-policy`, the location in the revoke reason). Reporting it again
    /// adds another event but keeps the first `exposed_at`. Returns the token as it ends up.
    pub async fn mark_exposed(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        token: &TokenRecord,
        location: Option<&str>,
    ) -> Result<TokenRecord> {
        let marked = self.record_exposure(ws, actor, token, location).await?;
        let action = self.store.workspace_policy(ws).await?.exposure_action;
        let policy = Actor { id: "exposure-policy".into(), source: actor.source.clone(), owner: true };
        // The location, as a valid reason: no control characters, at most MAX_REASON_LEN.
        let reason = || {
            format!("exposed: {}", location.unwrap_or("reported"))
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_REASON_LEN)
                .collect::<String>()
        };
        let applied = match action {
            ExposureAction::Notify => return Ok(marked),
            ExposureAction::Suspend if marked.state == TokenState::Active => {
                self.suspend_token(ws, &policy, &marked.id).await?
            }
            ExposureAction::Revoke if marked.state != TokenState::Revoked => {
                self.revoke_token(ws, &policy, &marked.id, Some(reason())).await?
            }
            ExposureAction::Suspend | ExposureAction::Revoke => return Ok(marked),
        };
        tracing::warn!(token_id = %marked.id, action = action.as_str(), "a token found exposed was stopped by the workspace's exposure policy");
        Ok(applied.value)
    }

    /// The rotation policy of every workspace that has one (`max_token_age_days`): an active
    /// token not replaced yet gets a `token.rotation_due` event 7 days (at most the age) before
    /// its age runs out, and a `token.rotation_overdue` event when it has (suspended too if the
    /// policy says so; actor `rotation-policy`). A token that expires before it is due is left
    /// alone. Each event is recorded once, whichever node runs this first; every node runs it
    /// hourly.
    pub async fn enforce_rotation(&self) -> Result<RotationSweep> {
        let now = self.now();
        let mut sweep = RotationSweep::default();
        let actor = Actor { id: "rotation-policy".into(), source: None, owner: true };
        for ws in self.store.list_workspaces().await? {
            let policy = self.store.workspace_policy(&ws.id).await?;
            let Some(days) = policy.max_token_age_days else { continue };
            let age_ms = i64::from(days).saturating_mul(86_400_000);
            let remind_ms =
                i64::from(keygate_core::account::ROTATION_REMINDER_DAYS.min(days)).saturating_mul(86_400_000);
            let filter = TokenFilter {
                status: Some(TokenStatus::Active),
                created_before: Some(Timestamp::from_millis(now.as_millis().saturating_sub(age_ms - remind_ms))),
                ..TokenFilter::default()
            };
            let mut cursor = None;
            loop {
                let page = self.store.list_tokens(&ws.id, &filter, now, &PageRequest { limit: 500, cursor }).await?;
                for t in &page.items {
                    let due_at = Timestamp::from_millis(t.created_at.as_millis().saturating_add(age_ms));
                    if t.replaced_by.is_some() || t.expires_at.is_some_and(|e| e <= due_at) {
                        continue;
                    }
                    let overdue = now >= due_at;
                    let (kind, action) =
                        if overdue { ("overdue", "token.rotation_overdue") } else { ("due", "token.rotation_due") };
                    let audit = NewAuditEvent::new(&ws.id, &actor, action, t.id.as_str(), now).with_after(
                        serde_json::json!({"rotation_due_at": due_at.to_rfc3339(), "max_token_age_days": days}),
                    );
                    if !self.store.record_rotation_notice(&t.id, kind, now, &audit).await? {
                        continue;
                    }
                    if !overdue {
                        sweep.reminded += 1;
                        continue;
                    }
                    sweep.overdue += 1;
                    if policy.suspend_unrotated {
                        self.suspend_token(&ws.id, &actor, &t.id).await?;
                        sweep.suspended += 1;
                    }
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(sweep)
    }

    /// A provider's usage report of the workspace over [from, to) (at most [`MAX_REPORT_DAYS`]:
    /// a longer range starts that long before `to`; an empty one counts nothing):
    /// the totals, the groups `by` a dimension (token, route, app, developer — the app's owner —,
    /// api — the route's `api` and `version`), the top consumers first, and the requests per
    /// UTC day.
    pub async fn usage_report(
        &self,
        ws: &WorkspaceId,
        by: ReportDimension,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<ProviderReport> {
        use keygate_core::model::UsageGrouping as G;
        let from = from.max(Timestamp::from_millis(to.as_millis().saturating_sub(MAX_REPORT_DAYS * 86_400_000)));
        if by == ReportDimension::Reason {
            return self.refusal_report(ws, from, to).await;
        }
        let grouping = match by {
            ReportDimension::Token => G::Token,
            ReportDimension::Route | ReportDimension::Api => G::Route,
            ReportDimension::App | ReportDimension::Developer | ReportDimension::Reason => G::App,
        };
        let rows = self.store.usage_groups(ws, grouping, from, to).await?;
        // What each group key stands for in the dimension asked (routes to their API, apps to
        // their owner), merged where several keys stand for one.
        let mut names: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        match by {
            ReportDimension::Api => {
                let apis = self.store.list_apis(ws).await?;
                let label = |v: &serde_json::Map<String, Value>| {
                    let api = v.get("api").and_then(Value::as_str)?;
                    let api =
                        apis.iter().find(|a| a.id.as_str() == api || a.name == api).map_or(api, |a| a.name.as_str());
                    Some(match v.get("version").and_then(Value::as_str) {
                        Some(ver) => format!("{api} {ver}"),
                        None => api.to_owned(),
                    })
                };
                let (_, stored) = self.store.list_routes().await?;
                for r in stored.iter().filter(|r| &r.workspace_id == ws) {
                    if let Some(l) = label(&r.config) {
                        names.insert(r.id.clone(), l);
                    }
                }
                if let Some(rules) = self.route_rules.get() {
                    for f in rules.file_routes() {
                        if let (Some(id), Some(l)) = (f.config.get("id").and_then(Value::as_str), label(&f.config)) {
                            names.insert(id.to_owned(), l);
                        }
                    }
                }
            }
            ReportDimension::Developer => {
                for (app, _) in &rows {
                    let Some(id) = AppId::parse(app) else { continue };
                    if let Some(u) = self.store.app_owner(ws, &id).await?
                        && let Some(user) = self.store.user(&u).await?
                    {
                        names.insert(app.clone(), user.email);
                    }
                }
            }
            _ => {}
        }
        let mut groups: std::collections::BTreeMap<String, UsageRecord> = Default::default();
        let mut totals: Option<UsageRecord> = None;
        for (key, u) in &rows {
            let key = match by {
                ReportDimension::Api => names.get(key).cloned().unwrap_or_else(|| "(no API)".into()),
                ReportDimension::Developer => names.get(key).cloned().unwrap_or_else(|| "(no owner)".into()),
                _ if key.is_empty() => "(deleted)".into(),
                _ => key.clone(),
            };
            match groups.get_mut(&key) {
                Some(g) => g.add(u),
                None => {
                    groups.insert(key, u.clone());
                }
            }
            match totals.as_mut() {
                Some(t) => t.add(u),
                None => totals = Some(u.clone()),
            }
        }
        let mut groups: Vec<ReportLine> = groups.into_iter().map(|(k, u)| ReportLine::of(k, &u)).collect();
        groups.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
        let days = self.store.usage_groups(ws, G::Day, from, to).await?;
        let mut days: Vec<ReportLine> = days
            .iter()
            .filter_map(|(k, u)| {
                let day = k.parse::<i64>().ok()?;
                let date = Timestamp::from_millis(day * 86_400_000).to_rfc3339().get(..10)?.to_owned();
                Some(ReportLine::of(date, u))
            })
            .collect();
        days.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(ProviderReport {
            from,
            to,
            by: by.as_str(),
            totals: totals.map(|t| ReportLine::of("total".into(), &t)),
            groups,
            days,
        })
    }

    /// The report by reason: the workspace's refusals within [from, to) (whole hours, as they
    /// are counted), per reason (the most first) and per UTC day.
    async fn refusal_report(&self, ws: &WorkspaceId, from: Timestamp, to: Timestamp) -> Result<ProviderReport> {
        let rows = self.store.refusals_by_day(ws, from, to).await?;
        // A refusal's count as a usage record: its requests in its status class.
        let record = |status: u16, n: u64| {
            let mut u = UsageRecord {
                token_id: keygate_core::ids::TokenId::from_trusted(String::new()),
                workspace_id: ws.clone(),
                route: String::new(),
                minute: from,
                requests: n,
                status: [0; 4],
                bytes_in: 0,
                bytes_out: 0,
                latency_us_sum: 0,
                latency: [0; 10],
            };
            if let Some(c) = u.status.get_mut(usize::from((status / 100).clamp(2, 5) - 2)) {
                *c = n;
            }
            u
        };
        let mut groups: std::collections::BTreeMap<String, UsageRecord> = Default::default();
        let mut days: std::collections::BTreeMap<String, UsageRecord> = Default::default();
        let mut totals: Option<UsageRecord> = None;
        for r in &rows {
            let u = record(r.status, r.requests);
            let day = r.hour.to_rfc3339().get(..10).unwrap_or_default().to_owned();
            for (map, key) in [(&mut groups, r.reason.clone()), (&mut days, day)] {
                match map.get_mut(&key) {
                    Some(g) => g.add(&u),
                    None => {
                        map.insert(key, u.clone());
                    }
                }
            }
            match totals.as_mut() {
                Some(t) => t.add(&u),
                None => totals = Some(u),
            }
        }
        let mut groups: Vec<ReportLine> = groups.into_iter().map(|(k, u)| ReportLine::of(k, &u)).collect();
        groups.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
        Ok(ProviderReport {
            from,
            to,
            by: ReportDimension::Reason.as_str(),
            totals: totals.map(|t| ReportLine::of("total".into(), &t)),
            groups,
            days: days.into_iter().map(|(k, u)| ReportLine::of(k, &u)).collect(),
        })
    }

    /// The statement of app `id` for the calendar month `period` (`YYYY-MM`): every request its
    /// tokens made in the month as the gateway counted them (what has been written: usage is
    /// flushed every few seconds), charged by its plan's prices — those recorded when the month
    /// was closed (`billing.period_closed`), or the plan's current ones while it is open.
    pub async fn statement(
        &self,
        ws: &WorkspaceId,
        id: &AppId,
        period: &str,
    ) -> Result<keygate_core::billing::Statement> {
        use keygate_core::billing::{self, Statement, StatementLine, UsageLine};
        let (from, to) = billing::month(period)?;
        let app = self.app(ws, id).await?;
        let closed = self.closed_period(ws, id, period).await?;
        let (plan_id, plan_name, pricing) = match &closed {
            Some(after) => (
                after["plan_id"].as_str().map(str::to_owned),
                after["plan_name"].as_str().map(str::to_owned),
                serde_json::from_value::<billing::Pricing>(after["pricing"].clone()).ok(),
            ),
            None => match &app.plan_id {
                Some(p) => {
                    let plan = self.plan(ws, p).await?;
                    (Some(plan.id.to_string()), Some(plan.name), plan.pricing)
                }
                None => (None, None, None),
            },
        };
        let usage = self.store.app_usage(ws, id, Timestamp::from_millis(from), Timestamp::from_millis(to)).await?;
        let mut tokens: std::collections::BTreeMap<String, UsageLine> = Default::default();
        let mut routes: std::collections::BTreeMap<String, UsageLine> = Default::default();
        let (mut requests, mut billable, mut client, mut server) = (0u64, 0u64, 0u64, 0u64);
        for u in &usage {
            let [s2, s3, s4, s5] = u.status;
            let ok = s2 + s3;
            requests += u.requests;
            billable += ok;
            client += s4;
            server += s5;
            for (map, key) in [(&mut tokens, u.token_id.to_string()), (&mut routes, u.route.clone())] {
                let line = map.entry(key.clone()).or_insert(UsageLine { id: key, requests: 0, billable_requests: 0 });
                line.requests += u.requests;
                line.billable_requests += ok;
            }
        }
        let (lines, total) = match &pricing {
            Some(p) => billing::charge(p, billable),
            None => (Vec::new(), 0),
        };
        Ok(Statement {
            app_id: app.id.to_string(),
            app_name: app.name,
            plan_id,
            plan_name,
            period: period.to_owned(),
            from: Timestamp::from_millis(from).to_rfc3339(),
            to: Timestamp::from_millis(to).to_rfc3339(),
            closed: closed.is_some(),
            currency: pricing.map(|p| p.currency),
            requests,
            billable_requests: billable,
            client_errors: client,
            server_errors: server,
            lines: lines.iter().map(StatementLine::from).collect(),
            total: billing::decimal(total),
            total_micros: total,
            tokens: tokens.into_values().collect(),
            routes: routes.into_values().collect(),
        })
    }

    /// The `billing.period_closed` event of app `id` for `period`, if recorded: its `after`.
    async fn closed_period(&self, ws: &WorkspaceId, id: &AppId, period: &str) -> Result<Option<Value>> {
        let filter = AuditFilter {
            action: Some("billing.period_closed".into()),
            target: Some(id.to_string()),
            ..AuditFilter::default()
        };
        let mut cursor = None;
        loop {
            let page = self.store.list_audit(ws, &filter, &PageRequest { limit: 500, cursor }).await?;
            if let Some(e) = page.items.iter().find(|e| e.after.as_ref().is_some_and(|a| a["period"] == period)) {
                return Ok(e.after.clone());
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(None),
            }
        }
    }

    /// Closes the last calendar month of every app on a priced plan, once: 15 minutes after the
    /// month ended (every node has flushed its usage by then), records `billing.period_closed`
    /// with the statement's totals and the prices it was charged by. Apps created after the
    /// month are left out. Returns how many periods it closed.
    pub async fn close_billing_periods(&self) -> Result<u64> {
        use keygate_core::billing;
        const GRACE_MS: i64 = 15 * 60_000;
        let now = self.now();
        let (current_start, _) = billing::month(&billing::month_of(now.as_millis() - GRACE_MS))?;
        let period = billing::month_of(current_start - 1);
        let (_, period_end) = billing::month(&period)?;
        let actor = Actor { id: "billing".into(), source: None, owner: true };
        let mut closed = 0;
        for ws in self.store.list_workspaces().await? {
            let plans: std::collections::HashMap<PlanId, Plan> =
                self.store.list_plans(&ws.id).await?.into_iter().map(|p| (p.id.clone(), p)).collect();
            if plans.values().all(|p| p.pricing.is_none()) {
                continue;
            }
            let mut cursor = None;
            loop {
                let page = self.store.list_apps(&ws.id, &PageRequest { limit: 500, cursor }).await?;
                for app in &page.items {
                    let Some(plan) = app.plan_id.as_ref().and_then(|p| plans.get(p)) else { continue };
                    let Some(pricing) = &plan.pricing else { continue };
                    if app.created_at.as_millis() >= period_end {
                        continue;
                    }
                    let kind = format!("billing:{period}");
                    let key = TokenId::from_trusted(app.id.to_string());
                    // Cheap check first: closed already (by this node or another)?
                    if self.closed_period(&ws.id, &app.id, &period).await?.is_some() {
                        continue;
                    }
                    let s = self.statement(&ws.id, &app.id, &period).await?;
                    let (lines, total) = billing::charge(pricing, s.billable_requests);
                    let audit = NewAuditEvent::new(&ws.id, &actor, "billing.period_closed", app.id.as_str(), now)
                        .with_after(serde_json::json!({
                            "period": period,
                            "plan_id": plan.id,
                            "plan_name": plan.name,
                            "pricing": pricing,
                            "currency": pricing.currency,
                            "requests": s.requests,
                            "billable_requests": s.billable_requests,
                            "lines": lines.iter().map(billing::StatementLine::from).collect::<Vec<_>>(),
                            "total": billing::decimal(total),
                            "total_micros": total,
                        }));
                    if self.store.record_rotation_notice(&key, &kind, now, &audit).await? {
                        closed += 1;
                    }
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(closed)
    }

    /// The access review of a workspace: every token that is not revoked — who holds it (its app
    /// and the app's owner), which scopes, when it was last used, whether it is dormant under
    /// the workspace's rule — oldest use first, at most [`MAX_REVIEW_ROWS`] (`true` when more
    /// were left out).
    pub async fn access_review(&self, ws: &WorkspaceId) -> Result<(Vec<AccessReviewRow>, bool)> {
        let now = self.now();
        let dormant_days = self.store.workspace_policy(ws).await?.rules.dormant_days;
        let mut apps = std::collections::HashMap::new();
        let mut cursor = None;
        loop {
            let page = self.store.list_apps(ws, &PageRequest { limit: 500, cursor }).await?;
            for a in page.items {
                let owner = match self.store.app_owner(ws, &a.id).await? {
                    Some(u) => self.store.user(&u).await?.map(|u| u.email),
                    None => None,
                };
                apps.insert(a.id.clone(), (a.name, owner));
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let (mut rows, mut truncated, mut cursor) = (Vec::new(), false, None);
        loop {
            let mut page =
                self.store.list_tokens(ws, &TokenFilter::default(), now, &PageRequest { limit: 500, cursor }).await?;
            self.with_pending_last_use(&mut page.items);
            for t in page.items.into_iter().filter(|t| t.state != TokenState::Revoked) {
                if rows.len() >= MAX_REVIEW_ROWS {
                    truncated = true;
                    break;
                }
                let (app_name, owner) = apps.get(&t.app_id).cloned().unwrap_or_default();
                let idle_from = t.last_used_at.unwrap_or(t.created_at);
                let dormant =
                    dormant_days.is_some_and(|d| idle_from.as_millis() < now.as_millis() - i64::from(d) * 86_400_000);
                rows.push(AccessReviewRow { status: t.status(now), dormant, app_name, owner, token: t });
            }
            match page.next_cursor {
                Some(c) if !truncated => cursor = Some(c),
                _ => break,
            }
        }
        rows.sort_by_key(|r| r.token.last_used_at.unwrap_or(r.token.created_at));
        Ok((rows, truncated))
    }

    /// Applies every workspace's dormancy rule: an active token unused for `dormant_days` (never
    /// used: created that long ago) gets a `token.dormant` event — once per dormant spell (a
    /// token used again and dormant again gets another) — and, with `suspend_dormant`, is
    /// suspended with the reason.
    pub async fn enforce_dormancy(&self) -> Result<DormancySweep> {
        let now = self.now();
        let mut sweep = DormancySweep::default();
        let actor = Actor { id: "dormancy-policy".into(), source: None, owner: true };
        for ws in self.store.list_workspaces().await? {
            let rules = self.store.workspace_policy(&ws.id).await?.rules;
            let Some(days) = rules.dormant_days else { continue };
            let since = Timestamp::from_millis(now.as_millis().saturating_sub(i64::from(days) * 86_400_000));
            let filter =
                TokenFilter { status: Some(TokenStatus::Active), unused_since: Some(since), ..TokenFilter::default() };
            let mut cursor = None;
            loop {
                let mut page =
                    self.store.list_tokens(&ws.id, &filter, now, &PageRequest { limit: 500, cursor }).await?;
                // A use the gateway has not written yet counts.
                self.with_pending_last_use(&mut page.items);
                for t in page.items.iter().filter(|t| t.last_used_at.unwrap_or(t.created_at) < since) {
                    let idle_from = t.last_used_at.unwrap_or(t.created_at);
                    let audit = NewAuditEvent::new(&ws.id, &actor, "token.dormant", t.id.as_str(), now)
                        .with_after(serde_json::json!({"unused_since": idle_from.to_rfc3339(), "dormant_days": days}));
                    let kind = format!("dormant:{}", idle_from.as_millis());
                    if !self.store.record_rotation_notice(&t.id, &kind, now, &audit).await? {
                        continue;
                    }
                    sweep.flagged += 1;
                    if rules.suspend_dormant {
                        let reason = format!("dormant: unused for {days} days");
                        self.suspend_token_because(&ws.id, &actor, &t.id, &reason).await?;
                        sweep.suspended += 1;
                    }
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
        }
        Ok(sweep)
    }

    /// Marks `token` exposed, with its audit event.
    async fn record_exposure(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        token: &TokenRecord,
        location: Option<&str>,
    ) -> Result<TokenRecord> {
        let now = self.now();
        let mut marked = token.clone();
        if marked.exposed_at.is_none() {
            marked.exposed_at = Some(now);
        }
        marked.updated_at = now;
        marked.version = token.version + 1;
        let mut audit = NewAuditEvent::new(ws, actor, "token.exposed", token.id.as_str(), now)
            .with_diff(&token.audit_view(), &marked.audit_view());
        if let Some(after) = audit.after.as_mut().and_then(|a| a.as_object_mut()) {
            after.insert("location".into(), location.map_or(Value::Null, |l| Value::String(l.to_owned())));
        }
        self.store.update_token(&marked, &audit).await?;
        self.changed().await;
        Ok(marked)
    }

    /// A token's LLM usage through the AI gateway in [from, to) (whole hours; at most
    /// [`MAX_LLM_USAGE_HOURS`], the last ones), per hour, route and deployment, the counts not
    /// written yet included.
    pub async fn token_llm_usage(
        &self,
        ws: &WorkspaceId,
        id: &TokenId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<(Timestamp, Vec<keygate_core::llm::LlmUsage>)> {
        self.token(ws, id).await?;
        const HOUR: i64 = 3_600_000;
        let from = from.as_millis().div_euclid(HOUR) * HOUR;
        let from = from.max(to.as_millis().saturating_sub(MAX_LLM_USAGE_HOURS * HOUR));
        let mut rows = self.store.llm_usage(ws, id, from, to.as_millis()).await?;
        if let Some(p) = self.pending_usage.get() {
            rows.extend(
                p.pending_llm(id)
                    .into_iter()
                    .filter(|r| r.workspace_id == *ws && r.hour >= from && r.hour < to.as_millis()),
            );
        }
        let mut merged: std::collections::BTreeMap<(i64, String, String), keygate_core::llm::LlmUsage> =
            std::collections::BTreeMap::new();
        for r in rows {
            match merged.get_mut(&(r.hour, r.route.clone(), r.deployment.clone())) {
                Some(m) => m.add(&r),
                None => {
                    merged.insert((r.hour, r.route.clone(), r.deployment.clone()), r);
                }
            }
        }
        Ok((Timestamp::from_millis(from), merged.into_values().collect()))
    }

    /// A token's usage in [from, to), summed per `granularity` bucket (zero-filled) and per route.
    pub async fn token_usage(
        &self,
        ws: &WorkspaceId,
        id: &TokenId,
        from: Timestamp,
        to: Timestamp,
        granularity: Granularity,
    ) -> Result<UsageReport> {
        self.token(ws, id).await?;
        let step = granularity.millis();
        let from = Timestamp::from_millis(from.as_millis().div_euclid(step) * step);
        // An empty range (`to` not after `from`) has no buckets and counts nothing.
        let mut buckets = ((to.as_millis() - from.as_millis() + step - 1) / step).max(0);
        // At most MAX_USAGE_BUCKETS buckets, the last ones of the range: a longer range is cut at
        // its start, and the answer's `from` says where it begins (the work a request causes is
        // bounded whatever range it names).
        let from = if buckets > MAX_USAGE_BUCKETS {
            buckets = MAX_USAGE_BUCKETS;
            let last = (to.as_millis() - 1).div_euclid(step) * step;
            Timestamp::from_millis(last - (MAX_USAGE_BUCKETS - 1) * step)
        } else {
            from
        };
        let mut records = self.store.usage(ws, id, from, to).await?;
        if let Some(p) = self.pending_usage.get() {
            records.extend(
                p.pending(id).into_iter().filter(|r| r.workspace_id == *ws && r.minute >= from && r.minute < to),
            );
        }
        let mut series: Vec<UsageRecord> = (0..buckets)
            .map(|i| UsageRecord {
                minute: Timestamp::from_millis(from.as_millis() + i * step),
                ..UsageRecord::default()
            })
            .collect();
        let mut routes: std::collections::BTreeMap<String, UsageRecord> = Default::default();
        let mut total = UsageRecord::default();
        for r in &records {
            let i = usize::try_from((r.minute.as_millis() - from.as_millis()) / step).unwrap_or(usize::MAX);
            if let Some(b) = series.get_mut(i) {
                b.add(r);
            }
            routes.entry(r.route.clone()).or_default().add(r);
            total.add(r);
        }
        Ok(UsageReport { from, to, granularity, buckets: series, routes: routes.into_iter().collect(), total })
    }

    pub async fn audit_events(
        &self,
        ws: &WorkspaceId,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>> {
        self.store.list_audit(ws, filter, page).await
    }

    /// The latest audit event of `ws` with this action and target, if any (the store's index
    /// on workspace, target, action and id finds it without reading the trail).
    pub(crate) async fn latest_audit_event(
        &self,
        ws: &WorkspaceId,
        action: &str,
        target: &str,
    ) -> Result<Option<AuditEvent>> {
        let filter =
            AuditFilter { action: Some(action.to_owned()), target: Some(target.to_owned()), ..AuditFilter::default() };
        let page = self.store.list_audit(ws, &filter, &PageRequest { limit: 1, cursor: None }).await?;
        Ok(page.items.into_iter().next())
    }

    /// The head of `ws`'s audit chain: keep it somewhere else to compare later
    /// ([`Admin::verify_audit_chain`] with it as the checkpoint).
    pub async fn audit_chain_head(&self, ws: &WorkspaceId) -> Result<keygate_core::audit_chain::ChainHead> {
        self.store.audit_chain_head(ws).await
    }

    /// Checks every link of `ws`'s audit trail, and that `checkpoint` (a head recorded earlier)
    /// is still in it; names the first broken link.
    pub async fn verify_audit_chain(
        &self,
        ws: &WorkspaceId,
        checkpoint: Option<keygate_core::audit_chain::Checkpoint>,
    ) -> Result<keygate_core::audit_chain::ChainReport> {
        self.store.verify_audit_chain(ws, self.audit_chain_key(), checkpoint).await
    }
}

fn token_revoked() -> Error {
    Error::conflict("token_revoked", "the token is revoked, which is final; create a new token instead")
}

fn refuse_if_revoked(t: &TokenRecord) -> Result<()> {
    if t.state == TokenState::Revoked { Err(token_revoked()) } else { Ok(()) }
}

/// What an audit event records of a root key (never its hash).
fn root_key_view(key: &RootKey) -> Value {
    let perms: Vec<&str> = key.permissions.iter().map(|p| p.as_str()).collect();
    serde_json::json!({
        "name": key.name,
        "permissions": perms,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    })
}

fn app_view(app: &App) -> Value {
    serde_json::json!({
        "name": app.name,
        "description": app.description,
        "plan_id": app.plan_id,
        "metadata": app.metadata,
    })
}

fn checked_scopes(raw: &[String]) -> Result<Vec<Scope>> {
    parse_scope_list(raw)
}

/// Turns `expires_in` / `expires_at` into the new expiry: `None` when neither is given,
/// `Some(None)` to clear it.
fn resolve_expiry(
    expires_in: Option<i64>,
    expires_at: Option<Option<Timestamp>>,
    now: Timestamp,
) -> Result<Option<Option<Timestamp>>> {
    match (expires_in, expires_at) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "conflicting_expiry",
            "give either expires_in (seconds from now) or expires_at (a date-time), not both",
        )),
        (Some(secs), None) if secs <= 0 => Err(Error::invalid(
            "invalid_expiry",
            "expires_in must be a positive number of seconds; to make a token stop now, revoke it",
        )),
        (Some(secs), None) if secs > 100 * 365 * 86_400 => Err(Error::invalid(
            "invalid_expiry",
            "expires_in is at most 100 years; omit it for a token that does not expire",
        )),
        (Some(secs), None) => Ok(Some(Some(now.plus_seconds(secs)))),
        // A conflict with the clock, not a malformed request: the same body is valid a moment
        // earlier (409, like other conflicts with the current state).
        (None, Some(Some(at))) if at <= now => Err(Error::conflict(
            "expiry_in_past",
            "expires_at is in the past; give a future date-time, or revoke the token to stop it now",
        )),
        (None, other) => Ok(other),
    }
}

pub(crate) fn validate_name(name: &str, what: &str) -> Result<String> {
    let trimmed = name.trim();
    // The length is the given one's, before trimming, as the API's document states it.
    if trimmed.is_empty() || name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "invalid_name",
            format!("{what} must be 1 to {MAX_NAME_LEN} characters without control characters"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// The audit event of a change of an OAuth client's state: the fields that changed, and the
/// client's app in `after` (the event's target is the client; its email links the app's page).
fn client_change(
    ws: &WorkspaceId,
    actor: &Actor,
    action: &str,
    before: &OAuthClient,
    after: &OAuthClient,
    now: Timestamp,
) -> NewAuditEvent {
    let mut audit = NewAuditEvent::new(ws, actor, action, &before.client_id, now)
        .with_diff(&before.audit_view(), &after.audit_view());
    if let Some(Value::Object(a)) = audit.after.as_mut() {
        a.insert("app_id".into(), Value::from(after.app_id.as_str()));
    }
    audit
}

fn validate_text(text: &str, what: &str, max: usize) -> Result<String> {
    if text.chars().count() > max || text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::invalid(
            "invalid_text",
            format!("{what} must be at most {max} characters without control characters"),
        ));
    }
    Ok(text.to_owned())
}

/// A DPoP key thumbprint (RFC 7638): 43 base64url characters (a SHA-256).
fn validate_jkt(jkt: &str) -> Result<String> {
    let ok = jkt.len() == 43 && jkt.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(Error::invalid(
            "invalid_dpop_jkt",
            "dpop_jkt must be the RFC 7638 thumbprint of the client's DPoP key: 43 base64url characters",
        ));
    }
    Ok(jkt.to_owned())
}

fn validate_metadata(m: Map<String, Value>) -> Result<Map<String, Value>> {
    let size = serde_json::to_vec(&m).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            "metadata_too_large",
            format!("metadata is at most {MAX_METADATA_BYTES} bytes of JSON"),
        ));
    }
    Ok(m)
}

/// Checks a rate limit and a quota given together.
fn validate_limits(rate_limit: Option<&RateLimit>, quota: Option<&Quota>) -> Result<()> {
    if let Some(r) = rate_limit {
        r.validate()?;
    }
    if let Some(q) = quota {
        q.validate()?;
    }
    Ok(())
}

/// A value as JSON, for what a change reports.
fn json_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The workspace policy's checks of one token, as it will be stored — the one place the API, the
/// dashboard and the CLI go through: its longest lifetime (when `lifetime`: on creation and when
/// the expiry changes) and its token rules (expiry required, an allowlist or a DPoP binding for
/// given scopes).
fn check_policy(policy: &WorkspacePolicy, token: &TokenRecord, now: Timestamp, lifetime: bool) -> Result<()> {
    if lifetime && let Some(days) = policy.max_token_lifetime_days {
        let limit = now.plus_seconds(i64::from(days) * 86_400);
        if token.expires_at.is_none_or(|e| e > limit) {
            return Err(Error::invalid(
                "lifetime_too_long",
                format!("this workspace allows tokens of at most {days} days; set an expiry within that"),
            ));
        }
    }
    policy.rules.check(token)
}

impl AccessReviewRow {
    /// The CSV header of an access review.
    pub const CSV_HEADER: &'static str = "token_id,name,app_id,app_name,owner,scopes,status,dormant,exposed,created_at,last_used_at,last_used_ip,expires_at\r\n";

    /// This row as a CSV line (RFC 4180, formulas defused).
    pub fn csv_line(&self) -> String {
        let t = &self.token;
        let time = |ts: Option<Timestamp>| ts.map(|t| t.to_rfc3339()).unwrap_or_default();
        let scopes: Vec<String> = t.scopes.iter().map(ToString::to_string).collect();
        let status =
            serde_json::to_value(self.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let cells = [
            t.id.to_string(),
            t.name.clone(),
            t.app_id.to_string(),
            self.app_name.clone(),
            self.owner.clone().unwrap_or_default(),
            scopes.join(" "),
            status,
            self.dormant.to_string(),
            t.exposed_at.is_some().to_string(),
            t.created_at.to_rfc3339(),
            time(t.last_used_at),
            t.last_used_ip.clone().unwrap_or_default(),
            time(t.expires_at),
        ];
        let mut line = cells.iter().map(|c| crate::csv::field(c)).collect::<Vec<_>>().join(",");
        line.push_str("\r\n");
        line
    }
}
