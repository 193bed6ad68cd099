//! LLM providers made through the admin API or the dashboard (issue 16): an operator of a
//! workspace gives a provider's URL, kind, prices and key once; the key is sealed under the pepper
//! (AES-256-GCM, bound to the provider's id) and no answer, log line or audit event shows it
//! again — only a fingerprint (the first 12 hex digits of its SHA-256) to tell keys apart. A new
//! key replaces the old one at once (`rotate-key`). Every change takes a change-feed position, so
//! every node's gateway reloads its providers with its routes; the workspace's `ai` routes may
//! call them (the config file's providers serve every workspace).
//!
//! The control plane does not check a provider's fields itself: the gateway does, through
//! [`RouteRules`], with the code that will call it.

use keygate_core::ids::{TokenId, WorkspaceId};
use keygate_core::llm::{LlmUsage, StoredProvider};
use keygate_core::model::{Actor, NewAuditEvent};
use keygate_core::policy::QuotaPeriod;
use keygate_core::{Error, Result, Timestamp};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::routes::RouteRules;
use crate::seal::Sealer;
use crate::service::Admin;

/// The longest provider key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;

/// A provider as the admin API shows it: its fields (never its key), where it is defined, and
/// what is known about its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderEntry {
    pub id: String,
    pub from_file: bool,
    /// `id`, `kind`, `base_url`, `api_version`, `prices` (and, for the file's, the key's source).
    pub config: Map<String, Value>,
    /// Stored providers: the key's fingerprint (`None`: no key).
    pub key_fingerprint: Option<String>,
    pub created_at: Option<Timestamp>,
    pub updated_at: Option<Timestamp>,
    pub key_rotated_at: Option<Timestamp>,
}

/// The fingerprint of a key: the first 12 hex digits of its SHA-256.
fn fingerprint(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn in_use(id: &str, route: &str) -> Error {
    Error::conflict(
        "provider_in_use",
        format!("route {route:?} calls provider {id:?}; change the route's ai.models (or delete the route) first"),
    )
}

/// Whether a route's fields name provider `id` in one of their deployments (`"id/model"`).
fn route_names(config: &Map<String, Value>, id: &str) -> bool {
    let Some(models) = config.get("ai").and_then(|a| a.get("models")).and_then(Value::as_object) else {
        return false;
    };
    models
        .values()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_str)
        .any(|d| d.split_once('/').is_some_and(|(p, _)| p == id))
}

impl Admin {
    fn provider_sealer(&self) -> Result<Sealer> {
        Sealer::new(self, "llm provider keys")
    }

    /// Opens a stored provider's key (for the gateway); `None` for a provider without one.
    pub fn open_provider_key(&self, p: &StoredProvider) -> Result<Option<String>> {
        if p.sealed_key.is_empty() {
            return Ok(None);
        }
        let plain = self.provider_sealer()?.open(&p.id, &p.sealed_key, "an LLM provider's key")?;
        String::from_utf8(plain).map(Some).map_err(|_| Error::internal("a provider's key is not UTF-8"))
    }

    /// Seals `key` for provider `id`: the sealed bytes and the fingerprint (empty for no key).
    fn seal_provider_key(&self, id: &str, key: Option<&str>) -> Result<(Vec<u8>, String)> {
        let Some(key) = key else { return Ok((Vec::new(), String::new())) };
        if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::invalid(
                "invalid_provider_key",
                format!(
                    "api_key must be the provider's key: 1 to {MAX_KEY_BYTES} visible ASCII characters, no spaces (it is sent in a header)"
                ),
            ));
        }
        Ok((self.provider_sealer()?.seal(self, id, key.as_bytes())?, fingerprint(key)))
    }

    fn provider_rules(&self) -> Result<std::sync::Arc<dyn RouteRules>> {
        self.route_rules.get().cloned().ok_or_else(|| {
            Error::new(
                keygate_core::ErrorKind::Unavailable,
                "providers_unavailable",
                "providers cannot be managed on this node: its gateway is not running",
            )
        })
    }

    fn stored_provider_entry(p: StoredProvider) -> ProviderEntry {
        ProviderEntry {
            id: p.id,
            from_file: false,
            config: p.config,
            key_fingerprint: (!p.key_fingerprint.is_empty()).then_some(p.key_fingerprint),
            created_at: Some(p.created_at),
            updated_at: Some(p.updated_at),
            key_rotated_at: (!p.sealed_key.is_empty()).then_some(p.key_rotated_at),
        }
    }

    /// The providers a workspace's routes may call: the config file's, then its own.
    pub async fn list_providers(&self, ws: &WorkspaceId) -> Result<Vec<ProviderEntry>> {
        let rules = self.provider_rules()?;
        let mut out: Vec<ProviderEntry> = rules
            .file_providers()
            .into_iter()
            .map(|config| ProviderEntry {
                id: config.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                from_file: true,
                config,
                key_fingerprint: None,
                created_at: None,
                updated_at: None,
                key_rotated_at: None,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        let stored = self.store.list_providers().await?;
        out.extend(stored.into_iter().filter(|p| &p.workspace_id == ws).map(Self::stored_provider_entry));
        Ok(out)
    }

    /// One of the providers a workspace's routes may call.
    pub async fn provider(&self, ws: &WorkspaceId, id: &str) -> Result<ProviderEntry> {
        self.list_providers(ws).await?.into_iter().find(|p| p.id == id).ok_or_else(|| Error::not_found("provider"))
    }

    /// The stored provider `id` of `ws`; a file provider's id is a conflict (it is changed in the
    /// file).
    async fn editable_provider(&self, rules: &dyn RouteRules, ws: &WorkspaceId, id: &str) -> Result<StoredProvider> {
        if rules.file_providers().iter().any(|c| c.get("id").and_then(Value::as_str) == Some(id)) {
            return Err(Error::conflict(
                "provider_from_file",
                format!("provider {id:?} is defined in the config file; change it there"),
            ));
        }
        match self.store.provider(id).await? {
            Some(p) if &p.workspace_id == ws => Ok(p),
            _ => Err(Error::not_found("provider")),
        }
    }

    /// Reads a provider's fields and its key from a request body: `api_key` taken out (it is
    /// never stored in the clear), the rest checked by the gateway's rules.
    fn provider_fields(rules: &dyn RouteRules, body: Value) -> Result<(Map<String, Value>, Option<String>)> {
        let Value::Object(mut fields) = body else {
            return Err(Error::invalid(
                "invalid_provider",
                "a provider is a JSON object: id, kind, base_url, api_key, and optionally api_version and prices",
            ));
        };
        let key = match fields.remove("api_key") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k),
            Some(_) => return Err(Error::invalid("invalid_provider_key", "api_key is a string: the provider's key")),
        };
        let config = rules.parse_provider(Value::Object(fields)).map_err(|m| Error::invalid("invalid_provider", m))?;
        // The grammar the API states, after the gateway's own checks (whose refusals say more).
        if let Some(url) = config.get("base_url").and_then(Value::as_str)
            && !api_base_url(url)
        {
            return Err(Error::invalid(
                "invalid_provider",
                "base_url is https://host[:port][/path] (http:// to a loopback address), the path of letters, digits and . _ ~ / - only",
            ));
        }
        Ok((config, key))
    }

    /// Adds a provider to workspace `ws`; its key is sealed and never shown again. The
    /// workspace's routes may call it on every node within the change feed's delay (on this one
    /// before this returns).
    pub async fn create_provider(&self, ws: &WorkspaceId, actor: &Actor, body: Value) -> Result<ProviderEntry> {
        let rules = self.provider_rules()?;
        let (config, key) = Self::provider_fields(&*rules, body)?;
        let id = config.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
        if rules.file_providers().iter().any(|c| c.get("id").and_then(Value::as_str) == Some(id.as_str()))
            || self.store.provider(&id).await?.is_some()
        {
            return Err(Error::conflict(
                "provider_exists",
                format!("a provider with id {id:?} already exists; choose another id"),
            ));
        }
        let (sealed_key, key_fingerprint) = self.seal_provider_key(&id, key.as_deref())?;
        let now = self.now();
        let p = StoredProvider {
            id: id.clone(),
            workspace_id: ws.clone(),
            config,
            sealed_key,
            key_fingerprint,
            created_at: now,
            updated_at: now,
            key_rotated_at: now,
        };
        let audit = NewAuditEvent::new(ws, actor, "provider.create", &id, now).with_after(self.provider_audit(&p));
        self.store.insert_provider(&p, &audit).await?;
        rules.apply().await;
        Ok(Self::stored_provider_entry(p))
    }

    /// What an audit event records of a provider: its fields and its key's fingerprint.
    fn provider_audit(&self, p: &StoredProvider) -> Value {
        let mut v = p.config.clone();
        v.insert("key_fingerprint".into(), Value::String(p.key_fingerprint.clone()));
        Value::Object(v)
    }

    /// Changes a stored provider's fields (`kind`, `base_url`, `api_version`, `prices`: those
    /// given replace the old ones); `api_key` is not taken here (see
    /// [`Admin::rotate_provider_key`]).
    pub async fn update_provider(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &str,
        body: Value,
    ) -> Result<ProviderEntry> {
        let rules = self.provider_rules()?;
        let before = self.editable_provider(&*rules, ws, id).await?;
        let Value::Object(changes) = body else {
            return Err(Error::invalid("invalid_provider", "the changes are a JSON object"));
        };
        if changes.contains_key("api_key") {
            return Err(Error::invalid(
                "use_rotate_key",
                format!("a provider's key changes with POST /admin/v1/providers/{id}/rotate-key"),
            ));
        }
        if let Some(k) = changes.keys().find(|k| !["kind", "base_url", "api_version", "prices"].contains(&k.as_str())) {
            return Err(Error::invalid(
                "invalid_provider",
                format!(
                    "{k:?} cannot be changed: a provider's kind, base_url, api_version and prices can (its id cannot)"
                ),
            ));
        }
        let mut fields = before.config.clone();
        for (k, v) in changes {
            if v.is_null() {
                fields.remove(&k);
            } else {
                fields.insert(k, v);
            }
        }
        let (config, _) = Self::provider_fields(&*rules, Value::Object(fields))?;
        let now = self.now();
        let p = StoredProvider { config, updated_at: now, ..before.clone() };
        let audit = NewAuditEvent::new(ws, actor, "provider.update", id, now)
            .with_diff(&self.provider_audit(&before), &self.provider_audit(&p));
        self.store.update_provider(&p, &audit).await?;
        rules.apply().await;
        Ok(Self::stored_provider_entry(p))
    }

    /// Replaces a stored provider's key: the next call on every node uses the new one (after
    /// the change feed's delay on other nodes). The old key should then be revoked at the
    /// provider.
    pub async fn rotate_provider_key(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &str,
        key: Option<&str>,
    ) -> Result<ProviderEntry> {
        let rules = self.provider_rules()?;
        let before = self.editable_provider(&*rules, ws, id).await?;
        let (sealed_key, key_fingerprint) = self.seal_provider_key(id, key)?;
        let now = self.now();
        let p = StoredProvider { sealed_key, key_fingerprint, updated_at: now, key_rotated_at: now, ..before.clone() };
        let audit = NewAuditEvent::new(ws, actor, "provider.rotate_key", id, now)
            .with_diff(&self.provider_audit(&before), &self.provider_audit(&p));
        self.store.update_provider(&p, &audit).await?;
        rules.apply().await;
        Ok(Self::stored_provider_entry(p))
    }

    /// Deletes a stored provider and its sealed key; refused (`provider_in_use`) while a route
    /// names it.
    pub async fn delete_provider(&self, ws: &WorkspaceId, actor: &Actor, id: &str) -> Result<()> {
        let rules = self.provider_rules()?;
        let before = self.editable_provider(&*rules, ws, id).await?;
        let (_, routes) = self.store.list_routes().await?;
        if let Some(r) = routes.iter().find(|r| r.workspace_id == *ws && route_names(&r.config, id)) {
            return Err(in_use(id, &r.id));
        }
        let audit =
            NewAuditEvent::new(ws, actor, "provider.delete", id, self.now()).with_before(self.provider_audit(&before));
        if !self.store.delete_provider(ws, id, &audit).await? {
            return Err(Error::not_found("provider"));
        }
        rules.apply().await;
        Ok(())
    }
}

/// A route's budget per virtual key, and what one key spent of it in the current period.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetUse {
    /// The route whose per-key budget it is; empty for the token's own budget (every route).
    pub route: String,
    pub usd: f64,
    pub period: QuotaPeriod,
    pub spent_micro_usd: u64,
}

/// The LLM usage of a workspace over some days: by deployment (every route and caller added
/// up) and by day.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkspaceLlmUsage {
    pub by_deployment: Vec<LlmUsage>,
    /// (start of the day in ms, the day's counts), every day of the span.
    pub by_day: Vec<(i64, LlmUsage)>,
}

const DAY_MS: i64 = 86_400_000;

fn empty_usage(ws: &WorkspaceId, deployment: &str, hour: i64) -> LlmUsage {
    LlmUsage::zero(ws.clone(), "", "", "", deployment, hour)
}

impl Admin {
    /// The workspace's LLM usage over the last `days` days (UTC, today included), from the
    /// store (written by the gateways every few seconds).
    pub async fn workspace_llm_usage(&self, ws: &WorkspaceId, days: i64) -> Result<WorkspaceLlmUsage> {
        let days = days.clamp(1, 90);
        let now = self.now().as_millis();
        let to = (now.div_euclid(DAY_MS) + 1) * DAY_MS;
        let from = to - days * DAY_MS;
        let rows = self.store.llm_usage_by_deployment(ws, from, to).await?;
        let mut by_dep: std::collections::BTreeMap<String, LlmUsage> = std::collections::BTreeMap::new();
        let mut by_day: Vec<(i64, LlmUsage)> =
            (0..days).map(|d| (from + d * DAY_MS, empty_usage(ws, "", from + d * DAY_MS))).collect();
        for r in rows {
            by_dep.entry(r.deployment.clone()).or_insert_with(|| empty_usage(ws, &r.deployment, from)).add(&r);
            let day = usize::try_from((r.hour - from).div_euclid(DAY_MS)).unwrap_or(usize::MAX);
            if let Some((_, u)) = by_day.get_mut(day) {
                u.add(&r);
            }
        }
        Ok(WorkspaceLlmUsage { by_deployment: by_dep.into_values().collect(), by_day })
    }

    /// What token `id` spent of each per-key budget of the workspace's `ai` routes in the
    /// current period (from its stored and not yet written usage).
    pub async fn token_llm_budgets(&self, ws: &WorkspaceId, id: &TokenId) -> Result<Vec<BudgetUse>> {
        #[derive(serde::Deserialize)]
        struct Budget {
            usd: f64,
            period: QuotaPeriod,
        }
        let own = self.token(ws, id).await?.llm_budget;
        let routes = self.list_routes(ws).await.unwrap_or_default();
        let mut budgets: Vec<(String, Budget)> = routes
            .into_iter()
            .filter_map(|r| {
                let b = r.config.get("ai")?.get("budget")?.clone();
                Some((r.id, serde_json::from_value(b).ok()?))
            })
            .collect();
        if let Some(b) = own {
            budgets.insert(0, (String::new(), Budget { usd: b.usd(), period: b.period }));
        }
        if budgets.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let month_start = QuotaPeriod::Month.window(now.as_millis()).0;
        let (_, rows) =
            self.token_llm_usage(ws, id, Timestamp::from_millis(month_start), now.plus_seconds(3600)).await?;
        Ok(budgets
            .into_iter()
            .map(|(route, b)| {
                let start = b.period.window(now.as_millis()).0;
                let spent = rows
                    .iter()
                    .filter(|u| (route.is_empty() || u.route == route) && u.hour >= start)
                    .map(|u| u.micro_usd)
                    .sum();
                BudgetUse { route, usd: b.usd, period: b.period, spent_micro_usd: spent }
            })
            .collect())
    }
}

/// A route's budgets, as its `ai` fields give them.
#[derive(Debug, Default, serde::Deserialize)]
struct RouteBudgets {
    budget: Option<BudgetField>,
    app_budget: Option<BudgetField>,
    workspace_budget: Option<BudgetField>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
struct BudgetField {
    usd: f64,
    period: QuotaPeriod,
}

impl Admin {
    /// Records `budget.threshold` events not recorded yet: a virtual key (target: the token),
    /// an app (target: the app) or the workspace (target: the route) that spent 80% or 100% of
    /// an `ai` route's budget in the current period, by the stored usage. Each threshold once per
    /// period, whichever node finds it first. Returns how many were recorded.
    pub(crate) async fn sweep_budgets(&self, now: Timestamp) -> Result<usize> {
        let (month, _) = QuotaPeriod::Month.window(now.as_millis());
        let (day, _) = QuotaPeriod::Day.window(now.as_millis());
        let spent = self.store.llm_spent_since(month, day).await?;
        if spent.is_empty() {
            return Ok(0);
        }
        let mut workspaces: Vec<&WorkspaceId> = spent.iter().map(|s| &s.workspace_id).collect();
        workspaces.sort();
        workspaces.dedup();
        let actor = Actor { id: "system".into(), source: None, owner: true };
        let mut recorded = 0;
        // Apps' own budgets (every workspace's, by app id), read once for the sweep.
        let app_budgets: std::collections::HashMap<String, keygate_core::llm::LlmBudget> = self
            .store
            .app_limits()
            .await?
            .into_iter()
            .filter_map(|a| Some((a.app_id.to_string(), a.llm_budget?)))
            .collect();
        for ws in workspaces {
            // Tokens' own budgets: their spending on every route.
            let mut per_token: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
            for s in spent.iter().filter(|s| &s.workspace_id == ws && s.caller.starts_with("tok_")) {
                let e = per_token.entry(s.caller.as_str()).or_default();
                e.0 += s.month_micro_usd;
                e.1 += s.day_micro_usd;
            }
            let own: std::collections::HashMap<TokenId, keygate_core::llm::LlmBudget> = if per_token.is_empty() {
                Default::default()
            } else {
                self.store.tokens_with_llm_budget(ws).await?.into_iter().collect()
            };
            for (caller, (month_spent, day_spent)) in per_token {
                let Some(b) = TokenId::parse(caller).and_then(|t| own.get(&t).copied()) else { continue };
                let field = BudgetField { usd: b.usd(), period: b.period };
                recorded += self
                    .record_budget_notice(ws, &actor, now, ("key", caller, ""), field, (month_spent, day_spent))
                    .await?;
            }
            // Apps' own budgets: their keys' spending on every route.
            if !app_budgets.is_empty() {
                let mut per_app: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
                for s in spent.iter().filter(|s| &s.workspace_id == ws && app_budgets.contains_key(&s.app_id)) {
                    let e = per_app.entry(s.app_id.as_str()).or_default();
                    e.0 += s.month_micro_usd;
                    e.1 += s.day_micro_usd;
                }
                for (app, (month_spent, day_spent)) in per_app {
                    let Some(b) = app_budgets.get(app) else { continue };
                    let field = BudgetField { usd: b.usd(), period: b.period };
                    recorded += self
                        .record_budget_notice(ws, &actor, now, ("app", app, ""), field, (month_spent, day_spent))
                        .await?;
                }
            }
            let Ok(routes) = self.list_routes(ws).await else { continue };
            for r in routes {
                let Some(b) = r.config.get("ai").cloned().and_then(|a| serde_json::from_value::<RouteBudgets>(a).ok())
                else {
                    continue;
                };
                let rows: Vec<&keygate_core::llm::SpentSince> =
                    spent.iter().filter(|s| &s.workspace_id == ws && s.route == r.id).collect();
                // (whose, dedupe key and target, the budget, spent this month, spent today)
                let mut standings: Vec<(&str, String, BudgetField, u64, u64)> = Vec::new();
                if let Some(k) = b.budget {
                    for s in rows.iter().filter(|s| s.caller.starts_with("tok_")) {
                        standings.push(("key", s.caller.clone(), k, s.month_micro_usd, s.day_micro_usd));
                    }
                }
                if let Some(a) = b.app_budget {
                    let mut apps: std::collections::BTreeMap<&str, (u64, u64)> = std::collections::BTreeMap::new();
                    for s in rows.iter().filter(|s| !s.app_id.is_empty()) {
                        let e = apps.entry(s.app_id.as_str()).or_default();
                        e.0 += s.month_micro_usd;
                        e.1 += s.day_micro_usd;
                    }
                    standings.extend(apps.into_iter().map(|(app, (m, d))| ("app", app.to_owned(), a, m, d)));
                }
                if let Some(w) = b.workspace_budget {
                    let (m, d) =
                        rows.iter().fold((0, 0), |acc, s| (acc.0 + s.month_micro_usd, acc.1 + s.day_micro_usd));
                    standings.push(("workspace", r.id.clone(), w, m, d));
                }
                for (whose, target, budget, month_spent, day_spent) in standings {
                    recorded += self
                        .record_budget_notice(
                            ws,
                            &actor,
                            now,
                            (whose, &target, &r.id),
                            budget,
                            (month_spent, day_spent),
                        )
                        .await?;
                }
            }
        }
        Ok(recorded)
    }

    /// Records `budget.threshold` for `(whose, target, route)` (route empty: a token's own budget
    /// over every route) if its spending this period reached a threshold not recorded yet; 1 if
    /// it was recorded.
    async fn record_budget_notice(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        now: Timestamp,
        (whose, target, route): (&str, &str, &str),
        budget: BudgetField,
        (month_spent, day_spent): (u64, u64),
    ) -> Result<usize> {
        let (start, end) = budget.period.window(now.as_millis());
        let used = if budget.period == QuotaPeriod::Day { day_spent } else { month_spent };
        let limit = (budget.usd * 1e6).round() as u64;
        let Some(percent) = keygate_core::notify::quota_threshold_reached(used, limit) else { return Ok(0) };
        let kind = format!("budget{percent}@{route}@{whose}@{start}");
        let audit = NewAuditEvent::new(ws, actor, "budget.threshold", target, now).with_after(serde_json::json!({
            "budget_of": whose,
            "route": (!route.is_empty()).then_some(route),
            "threshold_percent": percent,
            "spent_usd": used as f64 / 1e6,
            "budget_usd": budget.usd,
            "period": budget.period.as_str(),
            "period_start": Timestamp::from_millis(start).to_rfc3339(),
            "resets_at": Timestamp::from_millis(end).to_rfc3339(),
        }));
        // The once-only record is keyed by the target (a token, an app or a route id) and the
        // kind, which names the route, whose budget and the period.
        let key = TokenId::from_trusted(target.to_owned());
        Ok(usize::from(self.store.record_rotation_notice(&key, &kind, now, &audit).await?))
    }
}

impl Admin {
    /// The workspace's logged LLM calls (routes with `log_prompts`), newest first: of one route
    /// and one token if given, below the id `before` (the cursor of the previous page).
    pub async fn llm_logs(
        &self,
        ws: &WorkspaceId,
        route: Option<&str>,
        token: Option<&TokenId>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<keygate_core::llm::LlmLog>> {
        self.store.llm_logs(ws, route, token.map(TokenId::as_str), before, limit.clamp(1, 200)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_short_and_stable() {
        let f = fingerprint("sk-abc");
        assert_eq!(f.len(), 12);
        assert_eq!(f, fingerprint("sk-abc"));
        assert_ne!(f, fingerprint("sk-abd"));
    }

    #[test]
    fn routes_naming_a_provider_are_found() {
        let config: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "id": "llm", "ai": {"models": {"fast": ["other/m", "openai/gpt-4o"]}}
        }))
        .unwrap();
        assert!(route_names(&config, "openai"));
        assert!(!route_names(&config, "open"));
        assert!(!route_names(&Map::new(), "openai"));
    }
}

/// Whether `url` fits the grammar the admin API states for a provider's `base_url` (the OpenAPI
/// document's pattern): `https://` (or `http://`, which the gateway's own check allows to a
/// loopback address only, for a provider on the same machine), a host of letters, digits, `.`
/// and `-` (1–200), an optional port of 1–5 digits, and an optional path of letters, digits and
/// `. _ ~ / -`.
fn api_base_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else { return false };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    // An IPv6 literal in brackets (`[::1]`) is a host too (which addresses may be called is the
    // gateway's check).
    let (host, port, v6) = match authority.strip_prefix('[').and_then(|r| r.split_once(']')) {
        // After the bracket: nothing, or `:` and the port (anything else fails the port's check).
        Some((h, rest)) => (h, (!rest.is_empty()).then(|| rest.strip_prefix(':').unwrap_or(rest)), true),
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p), false),
            None => (authority, None, false),
        },
    };
    let host_ok = if v6 {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    (1..=200).contains(&host.len())
        && host_ok
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'/' | b'-'))
}

#[cfg(test)]
mod base_url_tests {
    #[test]
    fn a_base_url_fits_the_documented_grammar() {
        for ok in [
            "https://api.openai.com",
            "https://h:8443/v1/x-y_z.~",
            "https://a",
            "http://127.0.0.1:8000/v1",
            "https://[::1]:8443",
        ] {
            assert!(super::api_base_url(ok), "{ok}");
        }
        for bad in [
            "ftp://h",
            "https://",
            "https://P/~X*",
            "https://h:123456",
            "https://h:x",
            "https://h/a b",
            "https://u@h",
            "https://[::1]x",
            "https://[zz]",
        ] {
            assert!(!super::api_base_url(bad), "{bad}");
        }
    }
}
