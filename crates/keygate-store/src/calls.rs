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

/// Rows per INSERT.
const BATCH: usize = 1000;

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
        // One parameter per batch: the rows as a JSON array of arrays, unpacked by the engine
        // (json_each in SQLite, json_array_elements in PostgreSQL). Binding eleven values per row
        // cost more than the inserts themselves (docs/benchmarks.md, the call log's cost).
        let sql = match self.engine {
            crate::Engine::Sqlite => {
                "INSERT INTO call_log (workspace_id, at, token_id, app_id, route, method, path, status, latency_us, \
                 client_ip, refusal) SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, \
                 value->>6, value->>7, value->>8, value->>9, value->>10 FROM json_each($1)"
            }
            crate::Engine::Postgres => {
                "INSERT INTO call_log (workspace_id, at, token_id, app_id, route, method, path, status, latency_us, \
                 client_ip, refusal) SELECT e->>0, (e->>1)::bigint, e->>2, e->>3, e->>4, e->>5, e->>6, \
                 (e->>7)::integer, (e->>8)::bigint, e->>9, e->>10 FROM json_array_elements($1::json) AS e"
            }
        };
        for chunk in calls.chunks(BATCH) {
            let rows: Vec<serde_json::Value> = chunk
                .iter()
                .map(|c| {
                    serde_json::json!([
                        c.workspace_id.as_str(),
                        c.at.as_millis(),
                        c.token_id.as_ref().map(TokenId::as_str),
                        c.app_id.as_ref().map(AppId::as_str),
                        c.route.as_deref(),
                        c.method.as_str(),
                        c.path.as_str(),
                        c.status,
                        c.latency_us,
                        c.client_ip.as_str(),
                        c.refusal.as_deref(),
                    ])
                })
                .collect();
            let text = serde_json::to_string(&rows).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
            sqlx::query(sql).bind(text).execute(&self.pool).await.map_err(db_error)?;
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
        // The oldest rows by id (the primary key; ids grow with time, give or take the seconds
        // a batch waits), those of them older than `before`: no index on `at` to keep up.
        let done =
            sqlx::query("DELETE FROM call_log WHERE id IN (SELECT id FROM call_log ORDER BY id LIMIT $2) AND at < $1")
                .bind(before.as_millis())
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}
