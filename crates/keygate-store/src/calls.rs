//! [`CallStore`] for [`SqlStore`]: the call log, written in multi-row INSERTs.

use async_trait::async_trait;
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::model::{CallFilter, CallRecord, Page, PageRequest};
use keygate_core::store::CallStore;
use keygate_core::{Result, Timestamp};
use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use crate::db_error;
use crate::rows::{get, ts};
use crate::sql::SqlStore;

/// Rows per INSERT: 11 parameters each, far below either engine's limit.
const BATCH: usize = 200;

const COLS: &str =
    "id, workspace_id, at, token_id, app_id, route, method, path, status, latency_us, client_ip, refusal";

fn call(row: &AnyRow) -> Result<CallRecord> {
    Ok(CallRecord {
        id: get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        at: ts(row, "at")?,
        token_id: get::<Option<String>>(row, "token_id")?.map(TokenId::from_trusted),
        app_id: get::<Option<String>>(row, "app_id")?.map(AppId::from_trusted),
        route: get(row, "route")?,
        method: get(row, "method")?,
        path: get(row, "path")?,
        status: u16::try_from(get::<i32>(row, "status")?).unwrap_or(0),
        latency_us: u64::try_from(get::<i64>(row, "latency_us")?).unwrap_or(0),
        client_ip: get(row, "client_ip")?,
        refusal: get(row, "refusal")?,
    })
}

#[async_trait]
impl CallStore for SqlStore {
    async fn insert_calls(&self, calls: &[CallRecord]) -> Result<()> {
        for chunk in calls.chunks(BATCH) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=11).map(|k| format!("${}", i * 11 + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect();
            // Placeholders only: the values are bound.
            let sql = format!(
                "INSERT INTO call_log (workspace_id, at, token_id, app_id, route, method, path, status, latency_us, \
                 client_ip, refusal) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for c in chunk {
                q = q
                    .bind(c.workspace_id.as_str())
                    .bind(c.at.as_millis())
                    .bind(c.token_id.as_ref().map(TokenId::as_str))
                    .bind(c.app_id.as_ref().map(AppId::as_str))
                    .bind(c.route.as_deref())
                    .bind(c.method.as_str())
                    .bind(c.path.as_str())
                    .bind(i32::from(c.status))
                    .bind(i64::try_from(c.latency_us).unwrap_or(i64::MAX))
                    .bind(c.client_ip.as_str())
                    .bind(c.refusal.as_deref());
            }
            q.execute(&self.pool).await.map_err(db_error)?;
        }
        Ok(())
    }

    async fn list_calls(&self, ws: &WorkspaceId, f: &CallFilter, page: &PageRequest) -> Result<Page<CallRecord>> {
        let limit = crate::sql::page_size(page);
        let before = match &page.cursor {
            Some(c) => c.parse::<i64>().map_err(|_| crate::sql::invalid_cursor())?,
            None => i64::MAX,
        };
        let mut cond = vec!["workspace_id = $1".to_owned(), "id < $2".to_owned()];
        let mut text: Vec<String> = Vec::new();
        let mut ints: Vec<i64> = Vec::new();
        // Text parameters first ($3…), then integers; each condition names its own placeholder.
        let mut n = 2;
        for (col, v) in [
            ("token_id", f.token_id.as_ref().map(|t| t.as_str().to_owned())),
            ("app_id", f.app_id.as_ref().map(|a| a.as_str().to_owned())),
            ("route", f.route.clone()),
        ] {
            if let Some(v) = v {
                n += 1;
                cond.push(format!("{col} = ${n}"));
                text.push(v);
            }
        }
        let mut int_cond = |sql: &str, v: i64, cond: &mut Vec<String>| {
            n += 1;
            cond.push(sql.replace('?', &format!("${n}")));
            ints.push(v);
        };
        match f.status {
            Some(s) if s < 10 => {
                int_cond("status >= ?", i64::from(s) * 100, &mut cond);
                int_cond("status < ?", i64::from(s) * 100 + 100, &mut cond);
            }
            Some(s) => int_cond("status = ?", i64::from(s), &mut cond),
            None => {}
        }
        if let Some(from) = f.from {
            int_cond("at >= ?", from.as_millis(), &mut cond);
        }
        if let Some(to) = f.to {
            int_cond("at < ?", to.as_millis(), &mut cond);
        }
        match f.refused {
            Some(true) => cond.push("refusal IS NOT NULL".into()),
            Some(false) => cond.push("refusal IS NULL".into()),
            None => {}
        }
        let sql = format!("SELECT {COLS} FROM call_log WHERE {} ORDER BY id DESC LIMIT ${}", cond.join(" AND "), n + 1);
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).bind(before);
        for t in &text {
            q = q.bind(t.as_str());
        }
        for i in &ints {
            q = q.bind(*i);
        }
        let rows = q.bind(limit + 1).fetch_all(&self.pool).await.map_err(db_error)?;
        crate::sql::paginate(&rows, limit, call, |c: &CallRecord| c.id.to_string())
    }

    async fn trim_calls(&self, before: Timestamp, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM call_log WHERE id IN (SELECT id FROM call_log WHERE at < $1 ORDER BY at LIMIT $2)",
        )
        .bind(before.as_millis())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}
