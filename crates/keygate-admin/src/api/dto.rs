//! The JSON shapes of the admin API. Requests refuse unknown fields; responses never carry a
//! secret except the `token` of a create or rotate answer, shown that once.

use crate::service::Applied;
use keygate_core::Timestamp;
use keygate_core::model::{
    App, AuditEvent, LATENCY_BUCKETS_MS, Plan, Propagation, RootKey, RootKeyStatus, ScopeEntry, TokenRecord,
};
use keygate_core::policy::{Quota, QuotaPeriod, RateLimit};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

/// Distinguishes a field that is absent (`None`) from one set to `null` (`Some(None)`).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// At most `requests` per `per_seconds` seconds, with `burst` extra requests allowed at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    #[schema(minimum = 1)]
    pub requests: u32,
    #[schema(minimum = 1)]
    pub per_seconds: u32,
    #[serde(default)]
    pub burst: u32,
}

impl From<RateLimitBody> for RateLimit {
    fn from(b: RateLimitBody) -> Self {
        RateLimit { requests: b.requests, per_seconds: b.per_seconds, burst: b.burst }
    }
}

impl From<RateLimit> for RateLimitBody {
    fn from(r: RateLimit) -> Self {
        Self { requests: r.requests, per_seconds: r.per_seconds, burst: r.burst }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriodBody {
    Day,
    Month,
    Total,
}

/// At most `requests` per calendar `period` (UTC); `total` never resets.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    #[schema(minimum = 1)]
    pub requests: u64,
    pub period: QuotaPeriodBody,
}

impl From<QuotaBody> for Quota {
    fn from(b: QuotaBody) -> Self {
        let period = match b.period {
            QuotaPeriodBody::Day => QuotaPeriod::Day,
            QuotaPeriodBody::Month => QuotaPeriod::Month,
            QuotaPeriodBody::Total => QuotaPeriod::Total,
        };
        Quota { requests: b.requests, period }
    }
}

impl From<Quota> for QuotaBody {
    fn from(q: Quota) -> Self {
        let period = match q.period {
            QuotaPeriod::Day => QuotaPeriodBody::Day,
            QuotaPeriod::Month => QuotaPeriodBody::Month,
            QuotaPeriod::Total => QuotaPeriodBody::Total,
        };
        Self { requests: q.requests, period }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A name to recognize the token by (1–200 characters).
    pub name: String,
    /// The app that holds the token; the workspace's default app when omitted.
    pub app_id: Option<String>,
    /// Granted scopes, such as `orders:read` or `orders:*`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Lifetime in seconds from now. Give this or `expires_at`, not both.
    pub expires_in: Option<i64>,
    /// Expiry as an RFC 3339 date-time in the future.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// IPv4/IPv6 addresses or CIDRs the token may be used from; empty allows any address.
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitBody>,
    pub quota: Option<QuotaBody>,
    /// Free-form JSON object (at most 8 KiB).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Binds the token to a DPoP key (RFC 9449): the RFC 7638 thumbprint of the client's public
    /// key. Every request with the token must then carry a DPoP proof signed by that key.
    pub dpop_jkt: Option<String>,
    /// What the token may spend on LLM calls (the AI gateway) per day or month, over every `ai`
    /// route, priced by the providers' price tables.
    pub llm_budget: Option<LlmBudgetBody>,
    /// How many requests the token may make in all: `1` for a single-use token. Counted
    /// exactly across the nodes; once used up, requests are refused with `uses_exhausted`.
    #[schema(minimum = 1, maximum = 1000000000)]
    pub max_uses: Option<u64>,
}

/// Fields to change; omitted fields stay as they are, `null` clears an optional one.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTokenRequest {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    /// New lifetime in seconds from now.
    pub expires_in: Option<i64>,
    /// New expiry, or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime, nullable)]
    pub expires_at: Option<Option<Timestamp>>,
    pub ip_allowlist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub rate_limit: Option<Option<RateLimitBody>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub quota: Option<Option<QuotaBody>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// A DPoP key thumbprint to bind the token to, or `null` to unbind it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub dpop_jkt: Option<Option<String>>,
    /// A new LLM budget, or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub llm_budget: Option<Option<LlmBudgetBody>>,
    /// A new limit on uses in all (counted from the token's first use), or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable, minimum = 1, maximum = 1000000000)]
    pub max_uses: Option<Option<u64>>,
}

/// What a token may spend on LLM calls: `usd` dollars a `day` or `month` (UTC).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmBudgetBody {
    #[schema(minimum = 0, maximum = 1000000000000.0)]
    pub usd: f64,
    pub period: BudgetPeriodBody,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriodBody {
    Day,
    Month,
}

impl LlmBudgetBody {
    pub fn to_budget(self) -> keygate_core::Result<keygate_core::llm::LlmBudget> {
        let period = match self.period {
            BudgetPeriodBody::Day => keygate_core::policy::QuotaPeriod::Day,
            BudgetPeriodBody::Month => keygate_core::policy::QuotaPeriod::Month,
        };
        keygate_core::llm::LlmBudget::from_usd(self.usd, period)
    }

    pub fn of(b: &keygate_core::llm::LlmBudget) -> Self {
        let period = match b.period {
            keygate_core::policy::QuotaPeriod::Day => BudgetPeriodBody::Day,
            _ => BudgetPeriodBody::Month,
        };
        Self { usd: b.usd(), period }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeTokenRequest {
    /// Why the token is revoked; kept in the token and its audit trail.
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateTokenRequest {
    /// How long the old secret keeps working, in seconds (default 0: it stops at once).
    #[serde(default)]
    pub grace_period_seconds: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportExposuresRequest {
    /// Tokens (or root keys) found somewhere they should not be (at most 100).
    pub findings: Vec<FindingBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FindingBody {
    /// The whole token as found.
    pub token: String,
    /// Where it was found, kept in the token's audit trail (such as `repo/app.env:3`).
    pub location: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExposureView {
    /// The presented token's display form (`kg_<public id>…<last4>`), never the secret.
    pub display: String,
    /// `live`, `inactive` (revoked, expired or suspended), `live_root_key`, `unknown` (not a
    /// credential of this workspace) or `malformed`.
    pub verdict: String,
    pub token_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExposuresResponse {
    pub data: Vec<ExposureView>,
}

/// A token as the API shows it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub app_id: String,
    /// `kg_<public id>…<last4>`: enough to recognize the token.
    pub display: String,
    pub prefix: String,
    pub last4: String,
    /// `active`, `suspended`, `revoked` or `expired`.
    pub status: String,
    pub scopes: Vec<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    pub ip_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimitBody>,
    pub quota: Option<QuotaBody>,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<Timestamp>,
    pub last_used_ip: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
    pub revoke_reason: Option<String>,
    pub rotated_from: Option<String>,
    pub replaced_by: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub exposed_at: Option<Timestamp>,
    /// The DPoP key the token is bound to (RFC 7638 thumbprint), if any.
    pub dpop_jkt: Option<String>,
    /// What the token may spend on LLM calls per day or month, if it has a budget of its own.
    pub llm_budget: Option<LlmBudgetBody>,
    /// How many requests the token may make in all, if limited.
    pub max_uses: Option<u64>,
    /// In the answer to a change (update, suspend, resume, revoke, rotate): how many of the
    /// live nodes had applied it when the answer was sent. Absent elsewhere, and when the
    /// change changed nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation: Option<PropagationView>,
}

/// How far a change had spread when it was answered.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PropagationView {
    /// Live nodes when the change was answered, this one included.
    pub nodes: u32,
    /// Of those, the nodes whose token index had applied it.
    pub applied: u32,
    /// Milliseconds from the commit to the answer.
    pub elapsed_ms: u64,
}

impl From<Propagation> for PropagationView {
    fn from(p: Propagation) -> Self {
        Self { nodes: p.nodes, applied: p.applied, elapsed_ms: p.elapsed_ms }
    }
}

impl TokenView {
    /// The answer to a change: the token and how far the change spread.
    pub fn applied(a: &Applied<TokenRecord>, now: Timestamp) -> Self {
        Self { propagation: a.propagation.map(Into::into), ..Self::new(&a.value, now) }
    }

    pub fn new(t: &TokenRecord, now: Timestamp) -> Self {
        let status =
            serde_json::to_value(t.status(now)).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        Self {
            id: t.id.to_string(),
            name: t.name.clone(),
            app_id: t.app_id.to_string(),
            display: t.display(),
            prefix: t.prefix.clone(),
            last4: t.last4.clone(),
            status,
            scopes: t.scopes.iter().map(ToString::to_string).collect(),
            expires_at: t.expires_at,
            ip_allowlist: t.ip_allowlist.iter().map(ToString::to_string).collect(),
            rate_limit: t.rate_limit.map(Into::into),
            quota: t.quota.map(Into::into),
            metadata: t.metadata.clone(),
            created_at: t.created_at,
            updated_at: t.updated_at,
            last_used_at: t.last_used_at,
            last_used_ip: t.last_used_ip.clone(),
            revoked_at: t.revoked_at,
            revoke_reason: t.revoke_reason.clone(),
            rotated_from: t.rotated_from.as_ref().map(ToString::to_string),
            replaced_by: t.replaced_by.as_ref().map(ToString::to_string),
            exposed_at: t.exposed_at,
            dpop_jkt: t.dpop_jkt.clone(),
            llm_budget: t.llm_budget.as_ref().map(LlmBudgetBody::of),
            max_uses: t.max_uses,
            propagation: None,
        }
    }
}

/// A token just created or rotated, with its secret: store it now, it is never shown again.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenWithSecret {
    #[serde(flatten)]
    pub record: TokenView,
    /// The whole token. It is returned only in this answer.
    pub token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub data: Vec<TokenView>,
    /// Pass as `cursor` to read the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListTokensQuery {
    /// Only tokens of this app.
    pub app_id: Option<String>,
    /// `active`, `suspended`, `revoked` or `expired`.
    pub status: Option<String>,
    /// Case-insensitive part of the name.
    pub q: Option<String>,
    /// Only tokens expiring within this many seconds.
    pub expiring_within: Option<i64>,
    /// `true`: only tokens marked exposed; `false`: only the others.
    pub exposed: Option<bool>,
    /// Only tokens unused for this many days (never used: created that long ago): dormant ones.
    pub unused_days: Option<u32>,
    /// Page size, 1–500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAppRequest {
    pub name: String,
    pub description: Option<String>,
    pub plan_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// A rate limit shared by all of the app's tokens (each token's own applies too).
    pub rate_limit: Option<RateLimitBody>,
    /// A quota shared by all of the app's tokens (each token's own applies too).
    pub quota: Option<QuotaBody>,
    /// What all of the app's keys may spend on LLM calls together, over every ai route (each
    /// key's own budget applies too); refused with 429 `budget_exceeded` once spent.
    pub llm_budget: Option<LlmBudgetBody>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAppRequest {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub plan_id: Option<Option<String>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// The shared rate limit, or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub rate_limit: Option<Option<RateLimitBody>>,
    /// The shared quota, or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub quota: Option<Option<QuotaBody>>,
    /// The app's LLM budget, or `null` for none.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub llm_budget: Option<Option<LlmBudgetBody>>,
}

/// A root key as the API shows it: never its secret, which was shown once, at creation.
#[derive(Debug, Serialize, ToSchema)]
pub struct RootKeyView {
    pub id: String,
    pub name: String,
    /// `kgroot_<public id>…<last 4>`: enough to recognize the key.
    pub display: String,
    pub permissions: Vec<String>,
    #[schema(value_type = String)]
    pub status: RootKeyStatus,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
    /// When the key last authenticated, to within a minute.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<Timestamp>,
}

impl RootKeyView {
    pub fn new(k: &RootKey, now: Timestamp, prefix: &str) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name.clone(),
            display: k.display(prefix),
            permissions: k.permissions.iter().map(|p| p.as_str().to_owned()).collect(),
            status: k.status(now),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RootKeyList {
    pub data: Vec<RootKeyView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub plan_id: Option<String>,
    /// The app that holds tokens created without an `app_id`.
    pub is_default: bool,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// A rate limit shared by all of the app's tokens.
    pub rate_limit: Option<RateLimitBody>,
    /// A quota shared by all of the app's tokens.
    pub quota: Option<QuotaBody>,
    /// What all of the app's keys may spend on LLM calls together.
    pub llm_budget: Option<LlmBudgetBody>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    /// In the answer to a move to another plan: the limits of the app and its tokens that were
    /// above the new plan's ceilings and were lowered to them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjusted: Option<Vec<AdjustmentView>>,
}

/// A limit lowered to a plan's ceiling.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentView {
    /// The token (`tok_…`) or app (`app_…`) changed.
    pub target: String,
    /// `rate_limit` or `quota`.
    pub field: String,
    #[schema(value_type = Object, nullable)]
    pub before: Value,
    #[schema(value_type = Object)]
    pub after: Value,
}

impl AdjustmentView {
    pub fn list(adjusted: Vec<crate::service::Adjustment>) -> Vec<Self> {
        adjusted
            .into_iter()
            .map(|a| Self { target: a.target, field: a.field.to_owned(), before: a.before, after: a.after })
            .collect()
    }
}

impl From<&App> for AppView {
    fn from(a: &App) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.name.clone(),
            description: a.description.clone(),
            plan_id: a.plan_id.as_ref().map(ToString::to_string),
            is_default: a.is_default,
            metadata: a.metadata.clone(),
            rate_limit: a.rate_limit.map(Into::into),
            quota: a.quota.map(Into::into),
            llm_budget: a.llm_budget.as_ref().map(LlmBudgetBody::of),
            created_at: a.created_at,
            updated_at: a.updated_at,
            adjusted: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppList {
    pub data: Vec<AppView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteAppQuery {
    /// Revoke and remove the app's tokens with it (otherwise an app with tokens is not deleted).
    #[serde(default)]
    pub revoke_tokens: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlanRequest {
    pub name: String,
    pub description: Option<String>,
    /// The scopes an app on this plan may grant its tokens.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Default rate limit of tokens of apps on this plan.
    pub rate_limit: Option<RateLimitBody>,
    /// Default quota of tokens of apps on this plan.
    pub quota: Option<QuotaBody>,
    /// What an app on this plan is charged per calendar month (its statement).
    pub pricing: Option<PricingBody>,
}

/// A plan's prices: a flat fee per month, requests it includes, and a price per billable
/// request beyond them (amounts in the currency's unit, up to six decimals).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PricingBody {
    /// ISO 4217 code, such as `USD`.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000000000.0)]
    pub flat_fee: f64,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000000000000000_u64)]
    pub included_requests: u64,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000000000.0)]
    pub price_per_request: f64,
}

impl PricingBody {
    pub fn to_pricing(&self) -> Result<keygate_core::billing::Pricing, keygate_core::Error> {
        keygate_core::billing::Pricing::new(
            &self.currency,
            self.flat_fee,
            self.included_requests,
            self.price_per_request,
        )
    }
    pub fn of(p: &keygate_core::billing::Pricing) -> Self {
        Self {
            currency: p.currency.clone(),
            flat_fee: p.flat_micros as f64 / 1e6,
            included_requests: p.included_requests,
            price_per_request: p.per_request_micros as f64 / 1e6,
        }
    }
}

/// A change to a plan. Absent fields stay as they are; `null` clears `description`, `rate_limit`
/// or `quota`; `scopes` replaces the whole list.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePlanRequest {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub description: Option<Option<String>>,
    /// The scopes an app on this plan may grant its tokens.
    pub scopes: Option<Vec<String>>,
    /// Default rate limit of tokens created from now on for apps on this plan.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub rate_limit: Option<Option<RateLimitBody>>,
    /// Default quota of tokens created from now on for apps on this plan.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub quota: Option<Option<QuotaBody>>,
    /// New prices, or `null`: not priced.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(nullable)]
    pub pricing: Option<Option<PricingBody>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub rate_limit: Option<RateLimitBody>,
    pub quota: Option<QuotaBody>,
    pub pricing: Option<PricingBody>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// In the answer to a change of the plan's limits: the limits of its apps and their tokens
    /// that were above the new ceilings and were lowered to them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjusted: Option<Vec<AdjustmentView>>,
}

impl From<&Plan> for PlanView {
    fn from(p: &Plan) -> Self {
        Self {
            id: p.id.to_string(),
            name: p.name.clone(),
            description: p.description.clone(),
            scopes: p.scopes.iter().map(ToString::to_string).collect(),
            rate_limit: p.rate_limit.map(Into::into),
            quota: p.quota.map(Into::into),
            pricing: p.pricing.as_ref().map(PricingBody::of),
            created_at: p.created_at,
            adjusted: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub data: Vec<PlanView>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutScopeRequest {
    pub description: Option<String>,
    /// The API the scope belongs to, for grouping.
    pub api: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeView {
    pub scope: String,
    pub description: Option<String>,
    pub api: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
}

impl From<&ScopeEntry> for ScopeView {
    fn from(e: &ScopeEntry) -> Self {
        Self {
            scope: e.scope.to_string(),
            description: e.description.clone(),
            api: e.api.clone(),
            created_at: e.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ScopeList {
    pub data: Vec<ScopeView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `rk_…` (a root key), `cli` or `system`.
    pub actor: Option<String>,
    /// Such as `token.create`, `token.revoke`, `app.update`.
    pub action: Option<String>,
    /// The id of the object changed.
    pub target: Option<String>,
    /// Events at or after this RFC 3339 date-time.
    pub from: Option<String>,
    /// Events before this RFC 3339 date-time.
    pub to: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// `GET /admin/v1/audit-events/export`: the list's filters, a format, and the cursor of a `next`
/// link.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditExportQuery {
    /// `jsonl` (one event per line, as the list gives it; the default) or `csv`.
    #[param(pattern = "^(jsonl|csv)$")]
    pub format: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    /// Events at or after this RFC 3339 date-time.
    pub from: Option<String>,
    /// Events before this RFC 3339 date-time.
    pub to: Option<String>,
    /// From a `next` link.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// The changed non-secret fields before the change.
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    /// The changed non-secret fields after the change.
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
    /// The address the change came from.
    pub source: Option<String>,
    /// For a token change: how many of the live nodes had applied it when it was answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation: Option<PropagationView>,
}

impl From<&AuditEvent> for AuditEventView {
    fn from(e: &AuditEvent) -> Self {
        Self {
            id: e.id,
            at: e.at,
            actor: e.actor.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            before: e.before.clone(),
            after: e.after.clone(),
            source: e.source.clone(),
            propagation: e.propagation.map(Into::into),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventList {
    pub data: Vec<AuditEventView>,
    pub next_cursor: Option<String>,
}

/// `GET /admin/v1/audit-chain`: the head of the workspace's audit chain. Keep it outside keygate
/// (`keygate audit head > head.json`) and give its seq and link to `GET /audit-chain/verify` later: a
/// trail rewritten in between, even by someone holding the pepper, no longer contains it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditChainHead {
    pub workspace_id: String,
    /// The last event's position in the chain (0: none yet).
    pub seq: u64,
    /// The last event's link: 64 hex digits.
    pub link: String,
    /// Events up to this position were deleted by `audit.retention_days`.
    pub anchor_seq: u64,
    /// The link of the last deleted event, where verification starts.
    pub anchor_link: String,
}

impl From<keygate_core::audit_chain::ChainHead> for AuditChainHead {
    fn from(h: keygate_core::audit_chain::ChainHead) -> Self {
        Self {
            workspace_id: h.workspace_id,
            seq: h.seq,
            link: h.link,
            anchor_seq: h.anchor_seq,
            anchor_link: h.anchor_link,
        }
    }
}

/// `GET /admin/v1/audit-chain/verify`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditChainVerifyQuery {
    /// A head recorded earlier (`GET /audit-chain`) to find in the chain, as `<seq>:<link>`.
    #[param(pattern = "^[0-9]{1,19}:[0-9a-f]{64}$")]
    pub checkpoint: Option<String>,
}

/// The first broken link.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditChainBreak {
    /// The stored event where it shows, if one does.
    pub event_id: Option<i64>,
    /// The chain position where it shows.
    pub seq: u64,
    /// `unlinked`, `missing`, `out_of_order`, `altered`, `truncated`, `head_mismatch`,
    /// `checkpoint_mismatch` or `checkpoint_missing`.
    pub code: String,
    pub message: String,
}

/// What a verification of the audit chain found.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditChainReport {
    pub workspace_id: String,
    /// Every link holds, and the checkpoint (if given) is in the chain.
    pub intact: bool,
    /// Events whose links were checked.
    pub checked: u64,
    /// Where verification started (events up to it were deleted by retention).
    pub from_seq: u64,
    pub head_seq: u64,
    pub head_link: String,
    pub broken: Option<AuditChainBreak>,
    /// `matched`, or `pruned` (older than the retention kept: not comparable); absent without a
    /// checkpoint or after a break.
    pub checkpoint: Option<String>,
}

impl From<keygate_core::audit_chain::ChainReport> for AuditChainReport {
    fn from(r: keygate_core::audit_chain::ChainReport) -> Self {
        Self {
            workspace_id: r.workspace_id,
            intact: r.intact,
            checked: r.checked,
            from_seq: r.from_seq,
            head_seq: r.head_seq,
            head_link: r.head_link,
            broken: r.broken.map(|b| AuditChainBreak {
                event_id: b.event_id,
                seq: b.seq,
                code: b.code.to_owned(),
                message: b.message,
            }),
            checkpoint: r.checkpoint.map(str::to_owned),
        }
    }
}

/// `GET /healthz`: the process answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Liveness {
    /// Always `alive`.
    pub status: String,
}

/// `GET /readyz`: whether this node should get traffic, and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` (HTTP 200) or `not_ready` (HTTP 503).
    pub status: String,
    /// Why not ready; or, when ready, what is degraded (the store not answering: the node serves
    /// from memory). Absent when all is well.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub token_index: IndexReadinessView,
    pub store: StoreReadinessView,
    pub version: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IndexReadinessView {
    /// The token index is loaded.
    pub loaded: bool,
    /// Tokens resident.
    pub tokens: u64,
    /// The change-feed position applied.
    pub position: u64,
    /// Milliseconds since the index last read the change feed to its end.
    pub caught_up_ms_ago: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoreReadinessView {
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// The store answered a query within 2 seconds.
    pub reachable: bool,
    /// Why it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the store answers.
    pub status: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    pub version: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start (RFC 3339); default 24 hours before `to`.
    pub from: Option<String>,
    /// End (RFC 3339, exclusive); default now.
    pub to: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    pub granularity: Option<String>,
}

/// The range of an LLM usage report.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LlmUsageQuery {
    /// Start (RFC 3339, rounded down to the hour); default 24 hours before `to`; at most 90 days
    /// before `to`.
    pub from: Option<String>,
    /// End (RFC 3339, exclusive); default now.
    pub to: Option<String>,
}

/// LLM calls of one hour on one route and deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct LlmUsageRow {
    #[schema(value_type = String, format = DateTime)]
    pub hour: Timestamp,
    pub route: String,
    /// `provider/model`.
    pub deployment: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    /// By the providers' price tables.
    pub cost_usd: f64,
    /// Deployments that answered 429 or 5xx (or timed out) before the one that served.
    pub fallbacks: u64,
}

/// A token's LLM usage through the AI gateway.
#[derive(Debug, Serialize, ToSchema)]
pub struct LlmUsageResponse {
    pub token_id: String,
    #[schema(value_type = String, format = DateTime)]
    pub from: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub to: Timestamp,
    pub data: Vec<LlmUsageRow>,
    pub total_requests: u64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub total_cost_usd: f64,
}

/// Counts of one bucket, route or the whole range.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageCounts {
    pub requests: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Mean time to answer, in milliseconds.
    pub latency_ms_avg: f64,
    /// Upper bound of the histogram bucket holding the median (ms; above 1000 ms, the mean);
    /// `null` without requests.
    pub latency_ms_p50: Option<u64>,
    /// Upper bound of the histogram bucket holding the 95th percentile (ms).
    pub latency_ms_p95: Option<u64>,
}

impl From<&keygate_core::model::UsageRecord> for UsageCounts {
    fn from(r: &keygate_core::model::UsageRecord) -> Self {
        let pct = |q: f64| -> Option<u64> {
            let i = r.latency_quantile_bucket(q)?;
            // Above the last bound (1 s) the histogram has no upper edge: the mean stands in.
            let last = LATENCY_BUCKETS_MS.last().copied().unwrap_or(1000);
            let mean_ms = r.latency_us_sum / r.requests.max(1) / 1000;
            Some(LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(mean_ms.max(last)))
        };
        Self {
            requests: r.requests,
            status_2xx: r.status[0],
            status_3xx: r.status[1],
            status_4xx: r.status[2],
            status_5xx: r.status[3],
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            latency_ms_avg: if r.requests == 0 { 0.0 } else { r.latency_us_sum as f64 / r.requests as f64 / 1000.0 },
            latency_ms_p50: pct(0.5),
            latency_ms_p95: pct(0.95),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBucket {
    #[schema(value_type = String, format = DateTime)]
    pub start: Timestamp,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteUsage {
    pub route: String,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    pub token_id: String,
    #[schema(value_type = String, format = DateTime)]
    pub from: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub to: Timestamp,
    pub granularity: String,
    pub buckets: Vec<UsageBucket>,
    /// Totals per route, for "top routes".
    pub routes: Vec<RouteUsage>,
    pub total: UsageCounts,
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::model::UsageRecord;

    #[test]
    fn usage_percentiles_are_bucket_bounds_and_the_mean_past_the_last() {
        let empty = UsageCounts::from(&UsageRecord::default());
        assert_eq!((empty.latency_ms_p50, empty.latency_ms_p95), (None, None));
        let mut r = UsageRecord { requests: 20, latency_us_sum: 20 * 3_000_000, ..UsageRecord::default() };
        r.latency[1] = 10;
        r.latency[9] = 10;
        let c = UsageCounts::from(&r);
        assert_eq!(c.latency_ms_p50, Some(5), "the median is in the ≤ 5 ms bucket");
        assert_eq!(c.latency_ms_p95, Some(3000), "past 1 s, the mean (3 s) stands in");
        r.latency_us_sum = 20 * 1000;
        assert_eq!(UsageCounts::from(&r).latency_ms_p95, Some(1000), "never below the last bound");
    }
}

/// A token to verify, on behalf of a service that checks tokens itself.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequestBody {
    /// The token as presented to the service (never logged).
    #[schema(min_length = 1, max_length = 256, example = "kg_…")]
    pub token: String,
    /// The scope the service needs for this call, such as `orders:read`; without it any valid
    /// token of the workspace is `ok`.
    #[serde(default)]
    #[schema(example = "orders:read")]
    pub scope: Option<String>,
    /// How many requests this verification counts against the token's rate limit and quota (the
    /// same ones the gateway counts its requests in); 0 only reads them. Default 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1000)]
    pub cost: Option<i64>,
    /// The client address the token was presented from, checked against the token's IP
    /// allowlist when given.
    #[serde(default)]
    #[schema(example = "203.0.113.7")]
    pub ip: Option<String>,
}

/// What a verification decided: `ok`, or why the token must not be accepted.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyCodeBody {
    Ok,
    MalformedToken,
    UnknownToken,
    TokenSuspended,
    TokenExpired,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
    QuotaExceeded,
}

impl From<keygate_core::verify::VerifyCode> for VerifyCodeBody {
    fn from(c: keygate_core::verify::VerifyCode) -> Self {
        use keygate_core::verify::VerifyCode as C;
        match c {
            C::Ok => Self::Ok,
            C::MalformedToken => Self::MalformedToken,
            C::UnknownToken => Self::UnknownToken,
            C::TokenSuspended => Self::TokenSuspended,
            C::TokenExpired => Self::TokenExpired,
            C::IpNotAllowed => Self::IpNotAllowed,
            C::InsufficientScope => Self::InsufficientScope,
            C::RateLimited => Self::RateLimited,
            C::QuotaExceeded => Self::QuotaExceeded,
        }
    }
}

/// One of the token's limits after this verification.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyLimit {
    /// Requests per window (the rate limit's `requests + burst`, or the quota's `requests`).
    pub limit: u64,
    /// Requests left now.
    pub remaining: u64,
    /// When the limit is whole again (rate limit) or the quota's period ends; absent for a
    /// `total` quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<String>,
}

impl From<keygate_core::verify::LimitState> for VerifyLimit {
    fn from(l: keygate_core::verify::LimitState) -> Self {
        Self { limit: l.limit, remaining: l.remaining, reset_at: l.reset_at.map(Timestamp::to_rfc3339) }
    }
}

/// The answer to a verification. The token's fields are present when the token was found in the
/// root key's workspace, active and not expired (also when it is then refused for its scope,
/// address or limits).
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyResponseBody {
    /// Whether the service may accept the token for this call (`code` is `ok`).
    pub valid: bool,
    pub code: VerifyCodeBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// When the token expires; absent for a token that does not, or one not found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The token's own rate limit, if it has one (and the check reached it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<VerifyLimit>,
    /// The token's quota, if it has one (and the check reached it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<VerifyLimit>,
}

impl From<keygate_core::verify::Verification> for VerifyResponseBody {
    fn from(v: keygate_core::verify::Verification) -> Self {
        let valid = v.valid();
        let t = v.token;
        Self {
            valid,
            code: v.code.into(),
            token_id: t.as_ref().map(|t| t.token_id.clone()),
            app_id: t.as_ref().map(|t| t.app_id.clone()),
            workspace_id: t.as_ref().map(|t| t.workspace_id.clone()),
            expires_at: t.as_ref().and_then(|t| t.expires_at).map(Timestamp::to_rfc3339),
            scopes: t.map(|t| t.scopes),
            rate_limit: v.rate_limit.map(Into::into),
            quota: v.quota.map(Into::into),
        }
    }
}

/// What happens to a token found exposed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExposureActionBody {
    /// Marked exposed, and its owners told; it keeps working.
    #[default]
    Notify,
    /// Marked exposed and suspended.
    Suspend,
    /// Marked exposed and revoked.
    Revoke,
}

/// An anomaly alert's severity.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SeverityBody {
    Low,
    Medium,
    High,
}

/// A workspace's security and governance settings (`GET`/`PUT /admin/v1/policy/settings`): what
/// the dashboard's Settings page holds besides the token rules.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySettingsBody {
    /// What happens to a token found exposed (in a query string, by `keygate scan --online`, by
    /// a secret-scanning partner): always marked exposed; `suspend` and `revoke` stop it too.
    #[serde(default)]
    pub exposure_action: ExposureActionBody,
    /// Anomaly alerts of this severity or above suspend their token or OAuth client at once;
    /// `null`: alerts only notify.
    pub anomaly_suspend: Option<SeverityBody>,
    /// Tokens are to be rotated within this many days of their creation; `null`: no rotation
    /// policy.
    #[schema(minimum = 1, maximum = 3650)]
    pub max_token_age_days: Option<u32>,
    /// A token past that age is suspended (otherwise only flagged); without
    /// `max_token_age_days`, nothing is.
    #[serde(default)]
    pub suspend_unrotated: bool,
    /// The longest lifetime a new token may be given, in days; `null`: no limit.
    #[schema(minimum = 1, maximum = 36500)]
    pub max_token_lifetime_days: Option<u32>,
    /// Developers' requests to move an app to another plan wait for an admin's approval.
    #[serde(default)]
    pub plan_changes_need_approval: bool,
    /// Publishing an API or a version by anyone but an owner files a request an owner decides.
    #[serde(default)]
    pub api_publish_needs_approval: bool,
}

impl PolicySettingsBody {
    pub fn of(p: &keygate_core::account::WorkspacePolicy) -> Self {
        use keygate_core::account::ExposureAction as E;
        use keygate_core::anomaly::Severity as S;
        Self {
            exposure_action: match p.exposure_action {
                E::Notify => ExposureActionBody::Notify,
                E::Suspend => ExposureActionBody::Suspend,
                E::Revoke => ExposureActionBody::Revoke,
            },
            anomaly_suspend: p.anomaly_suspend.map(|s| match s {
                S::Low => SeverityBody::Low,
                S::Medium => SeverityBody::Medium,
                S::High => SeverityBody::High,
            }),
            max_token_age_days: p.max_token_age_days,
            suspend_unrotated: p.suspend_unrotated,
            max_token_lifetime_days: p.max_token_lifetime_days,
            plan_changes_need_approval: p.plan_changes_need_approval,
            api_publish_needs_approval: p.api_publish_needs_approval,
        }
    }

    /// `policy` with these settings (its token rules and two-factor requirement kept).
    pub fn apply_to(
        self,
        mut policy: keygate_core::account::WorkspacePolicy,
    ) -> Result<keygate_core::account::WorkspacePolicy, keygate_core::Error> {
        use keygate_core::account::ExposureAction as E;
        use keygate_core::anomaly::Severity as S;
        let days = |v: Option<u32>, max: u32, field: &str| match v {
            Some(d) if d == 0 || d > max => Err(keygate_core::Error::invalid(
                "invalid_policy",
                format!("{field} is a number of days from 1 to {max}, or null for none"),
            )),
            _ => Ok(v),
        };
        policy.max_token_age_days = days(self.max_token_age_days, 3650, "max_token_age_days")?;
        policy.max_token_lifetime_days = days(self.max_token_lifetime_days, 36500, "max_token_lifetime_days")?;
        policy.exposure_action = match self.exposure_action {
            ExposureActionBody::Notify => E::Notify,
            ExposureActionBody::Suspend => E::Suspend,
            ExposureActionBody::Revoke => E::Revoke,
        };
        policy.anomaly_suspend = self.anomaly_suspend.map(|s| match s {
            SeverityBody::Low => S::Low,
            SeverityBody::Medium => S::Medium,
            SeverityBody::High => S::High,
        });
        policy.suspend_unrotated = self.suspend_unrotated;
        policy.plan_changes_need_approval = self.plan_changes_need_approval;
        policy.api_publish_needs_approval = self.api_publish_needs_approval;
        Ok(policy)
    }
}

/// A workspace's token rules (`GET`/`PUT /admin/v1/policy/rules`).
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRulesBody {
    /// Every token must have an expiry (`expiry_required`).
    #[serde(default)]
    pub require_expiry: bool,
    /// A token granted a scope that covers one of these, or is covered by one, must have an IP
    /// allowlist (`allowlist_required`).
    #[serde(default)]
    #[schema(max_items = 100)]
    pub allowlist_required_for: Vec<String>,
    /// Such a token must be bound to a DPoP key (`dpop_required`).
    #[serde(default)]
    #[schema(max_items = 100)]
    pub dpop_required_for: Vec<String>,
    /// The most active tokens one app may hold (`too_many_tokens`).
    #[schema(minimum = 1, maximum = 1000000)]
    pub max_active_tokens_per_app: Option<u32>,
    /// Addresses and CIDRs refused on every route of the workspace (403 `address_denied`).
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub deny: Vec<String>,
    /// A token unused for this many days is dormant.
    #[schema(minimum = 1, maximum = 3650)]
    pub dormant_days: Option<u32>,
    /// Dormant tokens are suspended (otherwise only flagged).
    #[serde(default)]
    pub suspend_dormant: bool,
}

impl TokenRulesBody {
    pub fn of(r: &keygate_core::account::TokenRules) -> Self {
        Self {
            require_expiry: r.require_expiry,
            allowlist_required_for: r.allowlist_required_for.iter().map(ToString::to_string).collect(),
            dpop_required_for: r.dpop_required_for.iter().map(ToString::to_string).collect(),
            max_active_tokens_per_app: r.max_active_tokens_per_app,
            deny: r.deny.clone(),
            dormant_days: r.dormant_days,
            suspend_dormant: r.suspend_dormant,
        }
    }

    pub fn to_rules(self) -> Result<keygate_core::account::TokenRules, keygate_core::Error> {
        let scopes = |raw: Vec<String>| -> Result<Vec<keygate_core::scope::Scope>, keygate_core::Error> {
            raw.iter()
                .map(|s| {
                    keygate_core::scope::Scope::parse(s).map_err(|_| {
                        keygate_core::Error::invalid(
                            "invalid_policy",
                            format!("{s:?} is not a scope (such as orders:write)"),
                        )
                    })
                })
                .collect()
        };
        Ok(keygate_core::account::TokenRules {
            require_expiry: self.require_expiry,
            allowlist_required_for: scopes(self.allowlist_required_for)?,
            dpop_required_for: scopes(self.dpop_required_for)?,
            max_active_tokens_per_app: self.max_active_tokens_per_app,
            deny: self.deny,
            dormant_days: self.dormant_days,
            suspend_dormant: self.suspend_dormant,
        })
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AccessReviewQuery {
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// One token in an access review.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessReviewEntry {
    pub token: TokenView,
    pub app_name: String,
    /// The email of the app's owner, if it has one.
    pub owner: Option<String>,
    /// Unused for the workspace's `dormant_days`.
    pub dormant: bool,
}

/// Every token that is not revoked, oldest use first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessReview {
    pub data: Vec<AccessReviewEntry>,
    /// More tokens than one review lists (100,000) exist; the oldest-used are listed.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// The calendar month, `YYYY-MM` (UTC); default: the current one.
    pub period: Option<String>,
    /// `json` (default) or `csv` (one row per charged line, then the total).
    pub format: Option<String>,
}

/// What one app used in one calendar month and what it is charged (see docs/api.md,
/// "Statements").
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementView {
    pub app_id: String,
    pub app_name: String,
    pub plan_id: Option<String>,
    pub plan_name: Option<String>,
    /// `YYYY-MM`.
    pub period: String,
    pub from: String,
    pub to: String,
    /// Closed: final, priced as when the month was closed; open: priced by the plan as it is.
    pub closed: bool,
    pub currency: Option<String>,
    pub requests: u64,
    /// Answered 2xx or 3xx: the requests charged.
    pub billable_requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    /// `{item, quantity, unit_price, amount, unit_price_micros, amount_micros}`.
    #[schema(value_type = Vec<Object>)]
    pub lines: Vec<keygate_core::billing::StatementLine>,
    /// A decimal, such as `50.1725`.
    pub total: String,
    pub total_micros: u64,
    /// `{id, requests, billable_requests}` per token.
    #[schema(value_type = Vec<Object>)]
    pub tokens: Vec<keygate_core::billing::UsageLine>,
    /// `{id, requests, billable_requests}` per route.
    #[schema(value_type = Vec<Object>)]
    pub routes: Vec<keygate_core::billing::UsageLine>,
}

impl From<keygate_core::billing::Statement> for StatementView {
    fn from(s: keygate_core::billing::Statement) -> Self {
        Self {
            app_id: s.app_id,
            app_name: s.app_name,
            plan_id: s.plan_id,
            plan_name: s.plan_name,
            period: s.period,
            from: s.from,
            to: s.to,
            closed: s.closed,
            currency: s.currency,
            requests: s.requests,
            billable_requests: s.billable_requests,
            client_errors: s.client_errors,
            server_errors: s.server_errors,
            lines: s.lines,
            total: s.total,
            total_micros: s.total_micros,
            tokens: s.tokens,
            routes: s.routes,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageReportQuery {
    /// `token`, `route`, `api` (the route's API and version), `app` or `developer` (the app's
    /// owner); default `route`.
    pub by: Option<String>,
    /// Start (RFC 3339); default 30 days before `to`.
    pub from: Option<String>,
    /// End (RFC 3339, exclusive); default now. At most 90 days after `from`.
    pub to: Option<String>,
    /// `json` (default) or `csv` (the groups, one row each).
    pub format: Option<String>,
}
