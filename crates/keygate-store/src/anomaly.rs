//! [`AlertStore`] for [`SqlStore`]: token baselines, first sightings and anomaly alerts.

use async_trait::async_trait;
use keygate_core::anomaly::{
    Activity, Alert, AlertFilter, AlertKind, AlertStatus, AlertStore, Baseline, KnownValues, Purged, Raised, Severity,
    Watched,
};
use keygate_core::ids::{AlertId, AppId, WorkspaceId};
use keygate_core::model::{NewAuditEvent, Page, PageRequest};
use keygate_core::{Result, Timestamp};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::db_error;
use crate::rows::{corrupt, get, json, opt_ts, ts};
use crate::sql::{Arg, Conditions, SqlStore, insert_audit};

/// Baselines written per statement (each a few hundred bytes of JSON).
const BASELINES_PER_INSERT: usize = 1_000;
/// Activities per shipped row (each a few hundred bytes of JSON).
const ACTIVITIES_PER_ROW: usize = 2_000;

const ALERT_COLS: &str = "id, workspace_id, token_id, app_id, kind, severity, status, dedup, summary, evidence, \
     created_at, last_at, occurrences, action, acknowledged_by, acknowledged_at, resolved_by, resolved_at";

fn alert(row: &AnyRow) -> Result<Alert> {
    let kind: String = get(row, "kind")?;
    let severity: String = get(row, "severity")?;
    let status: String = get(row, "status")?;
    Ok(Alert {
        id: AlertId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        subject: Watched::from_stored(get(row, "token_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        kind: AlertKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        severity: Severity::parse(&severity).ok_or_else(|| corrupt("severity", &severity))?,
        status: AlertStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        key: get(row, "dedup")?,
        summary: get(row, "summary")?,
        evidence: json(row, "evidence")?,
        created_at: ts(row, "created_at")?,
        last_seen_at: ts(row, "last_at")?,
        occurrences: u64::try_from(get::<i64>(row, "occurrences")?).unwrap_or(0),
        action: get(row, "action")?,
        acknowledged_by: get(row, "acknowledged_by")?,
        acknowledged_at: opt_ts(row, "acknowledged_at")?,
        resolved_by: get(row, "resolved_by")?,
        resolved_at: opt_ts(row, "resolved_at")?,
    })
}

/// The `token_id` columns of the anomaly tables hold a [`Watched`]: a token's id or an OAuth
/// client's.
///
/// A token that can still be used (or present an old secret worth an alert): not revoked, and
/// not expired before `$1`; or a client not deleted.
const USABLE_TOKEN: &str = "SELECT 1 FROM tokens t WHERE t.id = {table}.token_id AND t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at >= $1) \
     UNION ALL SELECT 1 FROM oauth_clients c WHERE c.client_id = {table}.token_id";

#[async_trait]
impl AlertStore for SqlStore {
    async fn claim_detector(&self, node: &str, now: Timestamp, until: Timestamp) -> Result<bool> {
        // Taken when there is no holder, renewed by the holder, taken over once it ran out.
        let done = sqlx::query(
            "INSERT INTO anomaly_detector (id, owner, lease_until) VALUES (1, $1, $3) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until \
             WHERE anomaly_detector.owner = excluded.owner OR anomaly_detector.lease_until <= $2",
        )
        .bind(node)
        .bind(now.as_millis())
        .bind(until.as_millis())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    async fn release_detector(&self, node: &str) -> Result<()> {
        sqlx::query("DELETE FROM anomaly_detector WHERE owner = $1")
            .bind(node)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn ship_activity(&self, node: &str, activities: &[Activity], now: Timestamp) -> Result<()> {
        for group in activities.chunks(ACTIVITIES_PER_ROW) {
            let batch = serde_json::to_string(group).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
            sqlx::query("INSERT INTO anomaly_activity (node, at, batch) VALUES ($1, $2, $3)")
                .bind(node)
                .bind(now.as_millis())
                .bind(batch)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
        }
        Ok(())
    }

    async fn take_activity(&self, limit: u32, stale_before: Timestamp) -> Result<(Vec<Activity>, u64)> {
        let stale = sqlx::query("DELETE FROM anomaly_activity WHERE at < $1")
            .bind(stale_before.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
        let rows = sqlx::query(
            "DELETE FROM anomaly_activity WHERE id IN (SELECT id FROM anomaly_activity ORDER BY id LIMIT $1) \
             RETURNING id, batch",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut turns = Vec::with_capacity(rows.len());
        for r in &rows {
            turns.push((get::<i64>(r, "id")?, get::<String>(r, "batch")?));
        }
        turns.sort_by_key(|(id, _)| *id);
        let mut out = Vec::new();
        for (_, batch) in turns {
            // A row that does not read (written by another version) is skipped, not fatal.
            match serde_json::from_str::<Vec<Activity>>(&batch) {
                Ok(a) => out.extend(a),
                Err(e) => {
                    tracing::warn!(error = %e, "anomaly detection: a shipped activity row does not read; skipped")
                }
            }
        }
        Ok((out, stale))
    }

    async fn purge_anomaly_state(&self, expired_before: Timestamp, resolved_before: Timestamp) -> Result<Purged> {
        let mut done = [0u64; 2];
        for (n, table) in ["token_baselines", "token_sightings"].into_iter().enumerate() {
            let usable = USABLE_TOKEN.replace("{table}", table);
            let sql = format!("DELETE FROM {table} WHERE NOT EXISTS ({usable})");
            done[n] = sqlx::query(AssertSqlSafe(sql))
                .bind(expired_before.as_millis())
                .execute(&self.pool)
                .await
                .map_err(db_error)?
                .rows_affected();
        }
        let alerts = sqlx::query("DELETE FROM alerts WHERE status = 'resolved' AND resolved_at < $1")
            .bind(resolved_before.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
        Ok(Purged { baselines: done[0], sightings: done[1], alerts })
    }

    async fn load_baseline(&self, token: &Watched) -> Result<(Option<Baseline>, KnownValues)> {
        let row = sqlx::query("SELECT baseline FROM token_baselines WHERE token_id = $1")
            .bind(token.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        // A baseline that does not read (an older layout) starts afresh rather than failing.
        let baseline = row.as_ref().and_then(|r| json::<Baseline>(r, "baseline").ok());
        let rows = sqlx::query("SELECT kind, value FROM token_sightings WHERE token_id = $1")
            .bind(token.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut known = KnownValues::default();
        for r in &rows {
            let kind: String = get(r, "kind")?;
            known.insert(&kind, get(r, "value")?);
        }
        Ok((baseline, known))
    }

    async fn save_baselines(&self, rows: &[(Watched, WorkspaceId, Baseline)], now: Timestamp) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // One statement per batch, the rows as one JSON parameter unpacked by the engine (as
        // the call log's chunks are written): a statement per token cost the store's thread a
        // burst of ten thousand statements once a minute under the benchmark's load.
        let sql = match self.engine {
            crate::Engine::Sqlite => {
                "INSERT INTO token_baselines (token_id, workspace_id, baseline, updated_at) \
                 SELECT value->>0, value->>1, value->>2, $2 FROM json_each($1) WHERE true \
                 ON CONFLICT (token_id) DO UPDATE SET baseline = excluded.baseline, updated_at = excluded.updated_at"
            }
            crate::Engine::Postgres => {
                "INSERT INTO token_baselines (token_id, workspace_id, baseline, updated_at) \
                 SELECT e->>0, e->>1, e->>2, $2 FROM json_array_elements($1::json) AS e \
                 ON CONFLICT (token_id) DO UPDATE SET baseline = excluded.baseline, updated_at = excluded.updated_at"
            }
        };
        for group in rows.chunks(BASELINES_PER_INSERT) {
            let mut batch = Vec::with_capacity(group.len());
            for (token, ws, b) in group {
                let text = serde_json::to_string(b).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
                batch.push(serde_json::json!([token.as_str(), ws.as_str(), text]));
            }
            let text = serde_json::to_string(&batch).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
            sqlx::query(sql).bind(text).bind(now.as_millis()).execute(&self.pool).await.map_err(db_error)?;
        }
        Ok(())
    }

    async fn record_sightings(
        &self,
        token: &Watched,
        values: &[(&'static str, String)],
        now: Timestamp,
    ) -> Result<Vec<(&'static str, String)>> {
        let mut new = Vec::new();
        for (kind, value) in values {
            let done = sqlx::query(
                "INSERT INTO token_sightings (token_id, kind, value, first_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (token_id, kind, value) DO NOTHING",
            )
            .bind(token.as_str())
            .bind(*kind)
            .bind(value.as_str())
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            if done.rows_affected() > 0 {
                new.push((*kind, value.clone()));
            }
        }
        Ok(new)
    }

    async fn raise_alert(&self, a: &Alert, audit: &NewAuditEvent) -> Result<Raised> {
        let mut tx = self.begin().await?;
        let evidence = serde_json::to_string(&a.evidence).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
        // A repeat of an unresolved alert: counted, its evidence the latest, its severity the
        // highest seen.
        let sql = format!(
            "SELECT {ALERT_COLS} FROM alerts WHERE token_id = $1 AND kind = $2 AND dedup = $3 AND status <> 'resolved'"
        );
        let open = sqlx::query(AssertSqlSafe(sql))
            .bind(a.subject.as_str())
            .bind(a.kind.as_str())
            .bind(a.key.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        if let Some(row) = open {
            let mut have = alert(&row)?;
            have.occurrences += 1;
            have.last_seen_at = a.last_seen_at;
            have.severity = have.severity.max(a.severity);
            have.evidence = a.evidence.clone();
            sqlx::query(
                "UPDATE alerts SET occurrences = occurrences + 1, last_at = $2, severity = $3, evidence = $4 WHERE id = $1",
            )
            .bind(have.id.as_str())
            .bind(a.last_seen_at.as_millis())
            .bind(have.severity.as_str())
            .bind(evidence)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            return Ok(Raised::Repeat(have));
        }
        let inserted = sqlx::query(
            "INSERT INTO alerts (id, workspace_id, token_id, app_id, kind, severity, status, dedup, summary, evidence, \
             created_at, last_at, occurrences) VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $8, $9, $10, $10, 1) \
             ON CONFLICT DO NOTHING",
        )
        .bind(a.id.as_str())
        .bind(a.workspace_id.as_str())
        .bind(a.subject.as_str())
        .bind(a.app_id.as_str())
        .bind(a.kind.as_str())
        .bind(a.severity.as_str())
        .bind(a.key.as_str())
        .bind(a.summary.as_str())
        .bind(evidence)
        .bind(a.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if inserted.rows_affected() == 0 {
            // Another node opened the same alert meanwhile: a repeat of it.
            drop(tx);
            return self.raise_alert(a, audit).await;
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        let mut new = a.clone();
        new.status = AlertStatus::Open;
        new.occurrences = 1;
        Ok(Raised::New(new))
    }

    async fn set_alert_action(&self, id: &AlertId, action: &str) -> Result<()> {
        sqlx::query("UPDATE alerts SET action = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(action)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn alert(&self, ws: &WorkspaceId, id: &AlertId) -> Result<Option<Alert>> {
        let sql = format!("SELECT {ALERT_COLS} FROM alerts WHERE workspace_id = $1 AND id = $2");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        row.as_ref().map(alert).transpose()
    }

    async fn list_alerts(&self, ws: &WorkspaceId, filter: &AlertFilter, page: &PageRequest) -> Result<Page<Alert>> {
        let mut c = Conditions::new();
        c.push("workspace_id = ?", vec![Arg::Text(ws.as_str().to_owned())]);
        if let Some(s) = filter.status {
            c.push("status = ?", vec![Arg::Text(s.as_str().to_owned())]);
        }
        if let Some(s) = filter.severity {
            c.push("severity = ?", vec![Arg::Text(s.as_str().to_owned())]);
        }
        if let Some(t) = &filter.subject {
            c.push("token_id = ?", vec![Arg::Text(t.as_str().to_owned())]);
        }
        self.newest_first(&format!("SELECT {ALERT_COLS} FROM alerts"), c, page, alert, |a: &Alert| {
            (a.created_at, a.id.as_str().to_owned())
        })
        .await
    }

    async fn set_alert_status(
        &self,
        ws: &WorkspaceId,
        id: &AlertId,
        status: AlertStatus,
        by: &str,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<bool> {
        let sql = match status {
            AlertStatus::Acknowledged => {
                "UPDATE alerts SET status = 'acknowledged', acknowledged_by = $3, acknowledged_at = $4 \
                 WHERE workspace_id = $1 AND id = $2 AND status = 'open'"
            }
            AlertStatus::Resolved => {
                "UPDATE alerts SET status = 'resolved', resolved_by = $3, resolved_at = $4 \
                 WHERE workspace_id = $1 AND id = $2 AND status <> 'resolved'"
            }
            AlertStatus::Open => {
                return Err(keygate_core::Error::invalid(
                    "invalid_alert_status",
                    "an alert can be acknowledged or resolved; a new finding opens a new one",
                ));
            }
        };
        let mut tx = self.begin().await?;
        let done = sqlx::query(sql)
            .bind(ws.as_str())
            .bind(id.as_str())
            .bind(by)
            .bind(now.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        Ok(true)
    }

    async fn alert_counts(&self) -> Result<Vec<(Severity, AlertStatus, u64)>> {
        let rows = sqlx::query("SELECT severity, status, COUNT(*) AS n FROM alerts GROUP BY severity, status")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut out = Vec::new();
        for r in &rows {
            let (sev, st): (String, String) = (r.try_get("severity").map_err(db_error)?, get(r, "status")?);
            let (Some(sev), Some(st)) = (Severity::parse(&sev), AlertStatus::parse(&st)) else { continue };
            out.push((sev, st, u64::try_from(get::<i64>(r, "n")?).unwrap_or(0)));
        }
        Ok(out)
    }
}
