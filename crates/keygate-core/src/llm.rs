//! The AI gateway's records in the store: LLM usage per caller, route, deployment and hour (what
//! a token's page and the API report), and spending per virtual key, route and budget period
//! (what budgets are held to across restarts and nodes: each node adds its own spending, then
//! reads everyone's totals back).

use async_trait::async_trait;

use serde_json::{Map, Value};

use crate::ids::{TokenId, WorkspaceId};
use crate::model::NewAuditEvent;
use crate::{Result, Timestamp};

/// What a token may spend on LLM calls per day or month (UTC), over every `ai` route: its own
/// budget, beside the routes' per-key budgets. Kept in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LlmBudget {
    pub micro_usd: u64,
    pub period: crate::policy::QuotaPeriod,
}

impl LlmBudget {
    /// A budget of `usd` dollars a `period`: 0 to 10^12 dollars, a day or a month.
    pub fn from_usd(usd: f64, period: crate::policy::QuotaPeriod) -> Result<Self> {
        if !usd.is_finite() || !(0.0..=1e12).contains(&usd) {
            return Err(crate::Error::invalid(
                "invalid_llm_budget",
                "llm_budget.usd is a number of dollars from 0 to 10^12",
            ));
        }
        if period == crate::policy::QuotaPeriod::Total {
            return Err(crate::Error::invalid("invalid_llm_budget", "llm_budget.period is \"day\" or \"month\""));
        }
        Ok(Self { micro_usd: (usd * 1e6).round() as u64, period })
    }

    pub fn usd(&self) -> f64 {
        self.micro_usd as f64 / 1e6
    }
}

/// LLM calls of one caller on one route and deployment within one hour, as counted by a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmUsage {
    pub workspace_id: WorkspaceId,
    /// The token (for a JWT, the token it was exchanged from; else `jwt:` and its subject).
    pub caller: String,
    /// The app, or `""`.
    pub app_id: String,
    pub route: String,
    /// `provider/model`.
    pub deployment: String,
    /// The start of the hour, in milliseconds since the epoch.
    pub hour: i64,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub micro_usd: u64,
    /// Deployments that answered 429 or 5xx (or timed out) before the one that served, added
    /// up over the calls.
    pub fallbacks: u64,
}

impl LlmUsage {
    /// A row of these names with every count at zero.
    pub fn zero(
        workspace_id: WorkspaceId,
        caller: &str,
        app_id: &str,
        route: &str,
        deployment: &str,
        hour: i64,
    ) -> Self {
        Self {
            workspace_id,
            caller: caller.to_owned(),
            app_id: app_id.to_owned(),
            route: route.to_owned(),
            deployment: deployment.to_owned(),
            hour,
            requests: 0,
            errors: 0,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            micro_usd: 0,
            fallbacks: 0,
        }
    }

    /// Adds the counts of `other` (a row of the same key) to these.
    pub fn add(&mut self, other: &LlmUsage) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_tokens += other.cached_tokens;
        self.micro_usd += other.micro_usd;
        self.fallbacks += other.fallbacks;
    }
}

/// Spending of one virtual key on one route in one budget period, in micro-dollars: a change to
/// add (what a node wrote), or a total (what the store holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spending {
    /// The key's limit key, in hex.
    pub key: String,
    /// The route's limiter key (a stable number from its id).
    pub route_key: i64,
    pub period_start: i64,
    pub micro_usd: i64,
}

/// An LLM provider made through the admin API or the dashboard: its `[[providers]]` fields but
/// the key's source (`kind`, `base_url`, `api_version`, `prices`), and its key sealed under the
/// pepper (bound to the provider's id), which no answer ever shows.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredProvider {
    /// Unique in the instance (the file's providers included): deployments name it.
    pub id: String,
    /// The workspace whose `ai` routes may call it.
    pub workspace_id: WorkspaceId,
    pub config: Map<String, Value>,
    /// The key, sealed by the admin service; opaque to the store.
    pub sealed_key: Vec<u8>,
    /// The first 12 hex digits of the key's SHA-256: enough to tell which key is in use, not to
    /// find it.
    pub key_fingerprint: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub key_rotated_at: Timestamp,
}

impl std::fmt::Debug for StoredProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredProvider")
            .field("id", &self.id)
            .field("workspace_id", &self.workspace_id)
            .field("config", &self.config)
            .field("sealed_key", &format_args!("<{} bytes>", self.sealed_key.len()))
            .field("key_fingerprint", &self.key_fingerprint)
            .finish_non_exhaustive()
    }
}

/// What one caller spent on one route since the start of the month and of the day (UTC), in
/// micro-dollars, as the stored usage says: what budget notices are drawn from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpentSince {
    pub workspace_id: WorkspaceId,
    pub caller: String,
    pub app_id: String,
    pub route: String,
    pub month_micro_usd: u64,
    pub day_micro_usd: u64,
}

/// One logged LLM call of a route that logs its prompts and answers (`[routes.ai]
/// log_prompts`): what the client sent (its body, never its headers: no credential) and what it
/// got, each cut at [`MAX_LOGGED_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmLog {
    /// Given by the store (0 before it is written).
    pub id: i64,
    pub workspace_id: WorkspaceId,
    pub route: String,
    /// The token (as in [`LlmUsage::caller`]).
    pub caller: String,
    pub app_id: String,
    /// The model the client named.
    pub model: String,
    /// `provider/model` that answered (or was tried last).
    pub deployment: String,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub status: u16,
    pub request: String,
    pub answer: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub micro_usd: u64,
    /// When it is deleted (the route's `log_retention_days` after `at`).
    pub expires_at: i64,
}

/// The most of a request or an answer a log keeps, in bytes.
pub const MAX_LOGGED_BYTES: usize = 64 * 1024;

#[async_trait]
pub trait LlmStore: Send + Sync {
    /// Adds logged calls (their ids are the store's).
    async fn insert_llm_logs(&self, logs: &[LlmLog]) -> Result<()>;
    /// The workspace's logged calls, newest first, with ids below `before` (a cursor), of one
    /// route and one caller if given.
    async fn llm_logs(
        &self,
        ws: &WorkspaceId,
        route: Option<&str>,
        caller: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LlmLog>>;
    /// Deletes the logged calls whose time to be kept ended before `now`; how many went.
    async fn trim_llm_logs(&self, now: i64) -> Result<u64>;
    /// The workspace's tokens that have a budget of their own (not revoked), with it.
    async fn tokens_with_llm_budget(&self, ws: &WorkspaceId) -> Result<Vec<(TokenId, LlmBudget)>>;
    /// Every caller's spending per route since `month_start` (and, of it, since `day_start`).
    async fn llm_spent_since(&self, month_start: i64, day_start: i64) -> Result<Vec<SpentSince>>;
    /// Adds a provider; `conflict` (`provider_exists`) if a stored provider has its id. Like a
    /// route change, it takes a change-feed position, so every node's gateway reloads.
    async fn insert_provider(&self, p: &StoredProvider, audit: &NewAuditEvent) -> Result<()>;
    /// Replaces a provider's fields and key; `not_found` if the workspace has no provider with
    /// its id.
    async fn update_provider(&self, p: &StoredProvider, audit: &NewAuditEvent) -> Result<()>;
    /// Deletes a provider; `false` if the workspace has none with this id.
    async fn delete_provider(&self, ws: &WorkspaceId, id: &str, audit: &NewAuditEvent) -> Result<bool>;
    /// A provider by id, in whichever workspace it is.
    async fn provider(&self, id: &str) -> Result<Option<StoredProvider>>;
    /// Every stored provider, ordered by id.
    async fn list_providers(&self) -> Result<Vec<StoredProvider>>;
    /// The workspace's usage within [from, to), by hour, route and deployment (every caller's
    /// added up): the dashboard's page of providers and models.
    async fn llm_usage_by_deployment(&self, ws: &WorkspaceId, from: i64, to: i64) -> Result<Vec<LlmUsage>>;
    /// Adds `usage` (counts add up per caller, route, deployment and hour) and `spending`
    /// changes, in one transaction.
    async fn record_llm(&self, usage: &[LlmUsage], spending: &[Spending]) -> Result<()>;
    /// The spending totals of every period that starts at or after `since`.
    async fn llm_spending_since(&self, since: i64) -> Result<Vec<Spending>>;
    /// The usage of `caller` (a token id) in the workspace within [from, to), by hour.
    async fn llm_usage(&self, ws: &WorkspaceId, caller: &TokenId, from: i64, to: i64) -> Result<Vec<LlmUsage>>;
}
