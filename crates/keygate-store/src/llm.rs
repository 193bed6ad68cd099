//! [`LlmStore`] for [`SqlStore`]: the AI gateway's usage and spending. Each write is one
//! statement per table and batch, its rows a JSON array parameter unpacked by the engine (as the
//! call log's chunks are), counts added to the stored ones.

use std::collections::BTreeMap;

use async_trait::async_trait;
use keygate_core::ids::{TokenId, WorkspaceId};
use keygate_core::llm::{LlmBudget, LlmLog, LlmStore, LlmUsage, Spending, SpentSince, StoredProvider};
use keygate_core::model::NewAuditEvent;
use keygate_core::{Error, Result};
use sqlx::Row;

use crate::db_error;
use crate::routes::{commit_change, delete_in_workspace};
use crate::rows::{self, to_json};
use crate::sql::{FeedSeqs, SqlStore};

const PROVIDER_COLS: &str =
    "id, workspace_id, config, sealed_key, key_fingerprint, created_at, updated_at, key_rotated_at";

/// What `route_changes` records for a change of provider `id`.
fn change_id(id: &str) -> String {
    format!("provider:{id}")
}

/// A count column (a non-negative BIGINT) as a number.
fn count_col(r: &sqlx::any::AnyRow, c: &str) -> Result<u64> {
    let v: i64 = r.try_get(c).map_err(db_error)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn usage_row(r: &sqlx::any::AnyRow, ws: &WorkspaceId) -> Result<LlmUsage> {
    Ok(LlmUsage {
        workspace_id: ws.clone(),
        caller: r.try_get("caller").map_err(db_error)?,
        app_id: r.try_get("app_id").map_err(db_error)?,
        route: r.try_get("route").map_err(db_error)?,
        deployment: r.try_get("deployment").map_err(db_error)?,
        hour: r.try_get("hour").map_err(db_error)?,
        requests: count_col(r, "requests")?,
        errors: count_col(r, "errors")?,
        input_tokens: count_col(r, "input_tokens")?,
        output_tokens: count_col(r, "output_tokens")?,
        cached_tokens: count_col(r, "cached_tokens")?,
        micro_usd: count_col(r, "micro_usd")?,
        fallbacks: count_col(r, "fallbacks")?,
    })
}

/// Rows per statement.
const ROWS: usize = 1000;

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn json_text(rows: &[serde_json::Value]) -> Result<String> {
    serde_json::to_string(rows).map_err(|e| keygate_core::Error::internal(e.to_string()))
}

#[async_trait]
impl LlmStore for SqlStore {
    async fn record_llm(&self, usage: &[LlmUsage], spending: &[Spending]) -> Result<()> {
        if usage.is_empty() && spending.is_empty() {
            return Ok(());
        }
        // Rows of one key merged (an upsert may touch a row once per statement), in key order
        // (two nodes writing at once wait on each other rather than deadlock).
        let mut u: BTreeMap<(&str, &str, &str, &str, i64), LlmUsage> = BTreeMap::new();
        for r in usage {
            let k = (r.workspace_id.as_str(), r.caller.as_str(), r.route.as_str(), r.deployment.as_str(), r.hour);
            match u.get_mut(&k) {
                Some(e) => e.add(r),
                None => {
                    u.insert(k, r.clone());
                }
            }
        }
        let mut sp: BTreeMap<(&str, i64, i64), i64> = BTreeMap::new();
        for s in spending {
            *sp.entry((s.key.as_str(), s.route_key, s.period_start)).or_default() += s.micro_usd;
        }
        let (usage_sql, spend_sql) = match self.engine {
            crate::Engine::Sqlite => (
                "INSERT INTO llm_usage (workspace_id, caller, app_id, route, deployment, hour, requests, errors, \
                 input_tokens, output_tokens, cached_tokens, micro_usd, fallbacks) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, \
                 value->>8, value->>9, value->>10, value->>11, value->>12 FROM json_each($1) WHERE true \
                 ON CONFLICT (workspace_id, caller, route, deployment, hour) DO UPDATE SET \
                 app_id = excluded.app_id, requests = llm_usage.requests + excluded.requests, \
                 errors = llm_usage.errors + excluded.errors, \
                 input_tokens = llm_usage.input_tokens + excluded.input_tokens, \
                 output_tokens = llm_usage.output_tokens + excluded.output_tokens, \
                 cached_tokens = llm_usage.cached_tokens + excluded.cached_tokens, \
                 micro_usd = llm_usage.micro_usd + excluded.micro_usd, \
                 fallbacks = llm_usage.fallbacks + excluded.fallbacks",
                "INSERT INTO llm_spending (spend_key, route_key, period_start, micro_usd) \
                 SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each($1) WHERE true \
                 ON CONFLICT (spend_key, route_key, period_start) DO UPDATE SET \
                 micro_usd = llm_spending.micro_usd + excluded.micro_usd",
            ),
            crate::Engine::Postgres => (
                "INSERT INTO llm_usage (workspace_id, caller, app_id, route, deployment, hour, requests, errors, \
                 input_tokens, output_tokens, cached_tokens, micro_usd, fallbacks) \
                 SELECT e->>0, e->>1, e->>2, e->>3, e->>4, (e->>5)::bigint, (e->>6)::bigint, (e->>7)::bigint, \
                 (e->>8)::bigint, (e->>9)::bigint, (e->>10)::bigint, (e->>11)::bigint, (e->>12)::bigint \
                 FROM json_array_elements($1::json) AS e \
                 ON CONFLICT (workspace_id, caller, route, deployment, hour) DO UPDATE SET \
                 app_id = excluded.app_id, requests = llm_usage.requests + excluded.requests, \
                 errors = llm_usage.errors + excluded.errors, \
                 input_tokens = llm_usage.input_tokens + excluded.input_tokens, \
                 output_tokens = llm_usage.output_tokens + excluded.output_tokens, \
                 cached_tokens = llm_usage.cached_tokens + excluded.cached_tokens, \
                 micro_usd = llm_usage.micro_usd + excluded.micro_usd, \
                 fallbacks = llm_usage.fallbacks + excluded.fallbacks",
                "INSERT INTO llm_spending (spend_key, route_key, period_start, micro_usd) \
                 SELECT e->>0, (e->>1)::bigint, (e->>2)::bigint, (e->>3)::bigint \
                 FROM json_array_elements($1::json) AS e \
                 ON CONFLICT (spend_key, route_key, period_start) DO UPDATE SET \
                 micro_usd = llm_spending.micro_usd + excluded.micro_usd",
            ),
        };
        let usage_rows: Vec<serde_json::Value> = u
            .values()
            .map(|r| {
                serde_json::json!([
                    r.workspace_id.as_str(),
                    r.caller,
                    r.app_id,
                    r.route,
                    r.deployment,
                    r.hour,
                    count(r.requests),
                    count(r.errors),
                    count(r.input_tokens),
                    count(r.output_tokens),
                    count(r.cached_tokens),
                    count(r.micro_usd),
                    count(r.fallbacks),
                ])
            })
            .collect();
        let spend_rows: Vec<serde_json::Value> =
            sp.iter().map(|((k, r, p), m)| serde_json::json!([k, r, p, m])).collect();
        let mut tx = self.begin().await?;
        for group in usage_rows.chunks(ROWS) {
            sqlx::query(usage_sql).bind(json_text(group)?).execute(&mut *tx).await.map_err(db_error)?;
        }
        for group in spend_rows.chunks(ROWS) {
            sqlx::query(spend_sql).bind(json_text(group)?).execute(&mut *tx).await.map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(())
    }

    async fn llm_spending_since(&self, since: i64) -> Result<Vec<Spending>> {
        let rows = sqlx::query(
            "SELECT spend_key, route_key, period_start, micro_usd FROM llm_spending WHERE period_start >= $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(Spending {
                    key: r.try_get("spend_key").map_err(db_error)?,
                    route_key: r.try_get("route_key").map_err(db_error)?,
                    period_start: r.try_get("period_start").map_err(db_error)?,
                    micro_usd: r.try_get("micro_usd").map_err(db_error)?,
                })
            })
            .collect()
    }

    async fn llm_usage(&self, ws: &WorkspaceId, caller: &TokenId, from: i64, to: i64) -> Result<Vec<LlmUsage>> {
        let rows = sqlx::query(
            "SELECT caller, app_id, route, deployment, hour, requests, errors, input_tokens, output_tokens, \
             cached_tokens, micro_usd, fallbacks FROM llm_usage WHERE workspace_id = $1 AND caller = $2 AND hour >= $3 \
             AND hour < $4 ORDER BY hour, route, deployment",
        )
        .bind(ws.as_str())
        .bind(caller.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(|r| usage_row(r, ws)).collect()
    }

    async fn insert_llm_logs(&self, logs: &[LlmLog]) -> Result<()> {
        if logs.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for l in logs {
            sqlx::query(
                "INSERT INTO llm_logs (workspace_id, route, caller, app_id, model, deployment, at, status, request, \
                 answer, input_tokens, output_tokens, micro_usd, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind(l.workspace_id.as_str())
            .bind(l.route.as_str())
            .bind(l.caller.as_str())
            .bind(l.app_id.as_str())
            .bind(l.model.as_str())
            .bind(l.deployment.as_str())
            .bind(l.at)
            .bind(i64::from(l.status))
            .bind(l.request.as_str())
            .bind(l.answer.as_str())
            .bind(count(l.input_tokens))
            .bind(count(l.output_tokens))
            .bind(count(l.micro_usd))
            .bind(l.expires_at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(())
    }

    async fn llm_logs(
        &self,
        ws: &WorkspaceId,
        route: Option<&str>,
        caller: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LlmLog>> {
        let rows = sqlx::query(
            "SELECT id, route, caller, app_id, model, deployment, at, status, request, answer, input_tokens, \
             output_tokens, micro_usd, expires_at FROM llm_logs WHERE workspace_id = $1 \
             AND ($2 = '' OR route = $2) AND ($3 = '' OR caller = $3) AND id < $4 ORDER BY id DESC LIMIT $5",
        )
        .bind(ws.as_str())
        .bind(route.unwrap_or_default())
        .bind(caller.unwrap_or_default())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit.clamp(1, 500)))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(LlmLog {
                    id: r.try_get("id").map_err(db_error)?,
                    workspace_id: ws.clone(),
                    route: r.try_get("route").map_err(db_error)?,
                    caller: r.try_get("caller").map_err(db_error)?,
                    app_id: r.try_get("app_id").map_err(db_error)?,
                    model: r.try_get("model").map_err(db_error)?,
                    deployment: r.try_get("deployment").map_err(db_error)?,
                    at: r.try_get("at").map_err(db_error)?,
                    status: u16::try_from(count_col(r, "status")?).unwrap_or(0),
                    request: r.try_get("request").map_err(db_error)?,
                    answer: r.try_get("answer").map_err(db_error)?,
                    input_tokens: count_col(r, "input_tokens")?,
                    output_tokens: count_col(r, "output_tokens")?,
                    micro_usd: count_col(r, "micro_usd")?,
                    expires_at: r.try_get("expires_at").map_err(db_error)?,
                })
            })
            .collect()
    }

    async fn trim_llm_logs(&self, now: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM llm_logs WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn tokens_with_llm_budget(&self, ws: &WorkspaceId) -> Result<Vec<(TokenId, LlmBudget)>> {
        let rows = sqlx::query(
            "SELECT id, llm_budget FROM tokens WHERE workspace_id = $1 AND llm_budget IS NOT NULL \
             AND state <> 'revoked'",
        )
        .bind(ws.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id").map_err(db_error)?;
                let b: String = r.try_get("llm_budget").map_err(db_error)?;
                let b: LlmBudget = serde_json::from_str(&b)
                    .map_err(|e| keygate_core::Error::internal(format!("a token's llm_budget is not valid: {e}")))?;
                Ok((TokenId::from_trusted(id), b))
            })
            .collect()
    }

    async fn llm_spent_since(&self, month_start: i64, day_start: i64) -> Result<Vec<SpentSince>> {
        let rows = sqlx::query(
            "SELECT workspace_id, caller, app_id, route, CAST(SUM(micro_usd) AS BIGINT) AS month_total, \
             CAST(SUM(CASE WHEN hour >= $2 THEN micro_usd ELSE 0 END) AS BIGINT) AS day_total \
             FROM llm_usage WHERE hour >= $1 GROUP BY workspace_id, caller, app_id, route",
        )
        .bind(month_start)
        .bind(day_start)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(SpentSince {
                    workspace_id: WorkspaceId::from_trusted(r.try_get("workspace_id").map_err(db_error)?),
                    caller: r.try_get("caller").map_err(db_error)?,
                    app_id: r.try_get("app_id").map_err(db_error)?,
                    route: r.try_get("route").map_err(db_error)?,
                    month_micro_usd: count_col(r, "month_total")?,
                    day_micro_usd: count_col(r, "day_total")?,
                })
            })
            .collect()
    }

    async fn llm_usage_by_deployment(&self, ws: &WorkspaceId, from: i64, to: i64) -> Result<Vec<LlmUsage>> {
        let rows = sqlx::query(
            "SELECT '' AS caller, '' AS app_id, route, deployment, hour, CAST(SUM(requests) AS BIGINT) AS requests, \
             CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, \
             CAST(SUM(cached_tokens) AS BIGINT) AS cached_tokens, CAST(SUM(micro_usd) AS BIGINT) AS micro_usd, \
             CAST(SUM(fallbacks) AS BIGINT) AS fallbacks FROM llm_usage \
             WHERE workspace_id = $1 AND hour >= $2 AND hour < $3 \
             GROUP BY hour, route, deployment ORDER BY hour, route, deployment",
        )
        .bind(ws.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(|r| usage_row(r, ws)).collect()
    }

    async fn insert_provider(&self, p: &StoredProvider, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM llm_providers WHERE id = $1")
            .bind(p.id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        if taken.is_some() {
            return Err(Error::conflict(
                "provider_exists",
                format!("a provider with id {:?} already exists; choose another id", p.id),
            ));
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO llm_providers ({PROVIDER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )))
        .bind(p.id.as_str())
        .bind(p.workspace_id.as_str())
        .bind(to_json(&p.config)?)
        .bind(p.sealed_key.clone())
        .bind(p.key_fingerprint.as_str())
        .bind(p.created_at.as_millis())
        .bind(p.updated_at.as_millis())
        .bind(p.key_rotated_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        commit_change(self, tx, seqs, &change_id(&p.id), p.updated_at, audit).await
    }

    async fn update_provider(&self, p: &StoredProvider, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        let done = sqlx::query(
            "UPDATE llm_providers SET config = $1, sealed_key = $2, key_fingerprint = $3, updated_at = $4, \
             key_rotated_at = $5 WHERE workspace_id = $6 AND id = $7",
        )
        .bind(to_json(&p.config)?)
        .bind(p.sealed_key.clone())
        .bind(p.key_fingerprint.as_str())
        .bind(p.updated_at.as_millis())
        .bind(p.key_rotated_at.as_millis())
        .bind(p.workspace_id.as_str())
        .bind(p.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("provider"));
        }
        commit_change(self, tx, seqs, &change_id(&p.id), p.updated_at, audit).await
    }

    async fn delete_provider(&self, ws: &WorkspaceId, id: &str, audit: &NewAuditEvent) -> Result<bool> {
        delete_in_workspace(self, "llm_providers", ws, id, &change_id(id), audit).await
    }

    async fn provider(&self, id: &str) -> Result<Option<StoredProvider>> {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PROVIDER_COLS} FROM llm_providers WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::provider)
            .transpose()
    }

    async fn list_providers(&self) -> Result<Vec<StoredProvider>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {PROVIDER_COLS} FROM llm_providers ORDER BY id")))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(rows::provider).collect()
    }
}
