//! The AI gateway's records in the store: LLM usage per caller, route, deployment and hour (what
//! a token's page and the API report), and spending per virtual key, route and budget period
//! (what budgets are held to across restarts and nodes: each node adds its own spending, then
//! reads everyone's totals back).

use async_trait::async_trait;

use crate::Result;
use crate::ids::{TokenId, WorkspaceId};

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
}

impl LlmUsage {
    /// Adds the counts of `other` (a row of the same key) to these.
    pub fn add(&mut self, other: &LlmUsage) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_tokens += other.cached_tokens;
        self.micro_usd += other.micro_usd;
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

#[async_trait]
pub trait LlmStore: Send + Sync {
    /// Adds `usage` (counts add up per caller, route, deployment and hour) and `spending`
    /// changes, in one transaction.
    async fn record_llm(&self, usage: &[LlmUsage], spending: &[Spending]) -> Result<()>;
    /// The spending totals of every period that starts at or after `since`.
    async fn llm_spending_since(&self, since: i64) -> Result<Vec<Spending>>;
    /// The usage of `caller` (a token id) in the workspace within [from, to), by hour.
    async fn llm_usage(&self, ws: &WorkspaceId, caller: &TokenId, from: i64, to: i64) -> Result<Vec<LlmUsage>>;
}
