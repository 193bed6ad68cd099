//! [`CallStore`] for [`SqlStore`]: the call log, stored in chunks (`keygate_core::calls`): one
//! row per workspace, token and app per write, each holding up to 4,096 calls.

use async_trait::async_trait;
use keygate_core::Result;
use keygate_core::Timestamp;
use keygate_core::calls::{CHUNK_CALLS, CallChunk, ChunkRow, decode_chunk, split_call_id};
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::model::{CallFilter, CallRecord, Page, PageRequest};
use keygate_core::store::CallStore;
use sqlx::AssertSqlSafe;

use crate::db_error;
use crate::rows::get;
use crate::sql::SqlStore;

/// Chunks per INSERT statement.
const CHUNKS_PER_INSERT: usize = 1000;
/// Chunk rows read per query while a list fills its page.
const ROWS_PER_READ: i64 = 32;
/// Calls a list examines at most for one page: a filter that matches rarely returns a short
/// (even empty) page with a cursor to go on from, rather than reading the whole log at once.
const SCAN_BUDGET: usize = 200_000;

#[async_trait]
impl CallStore for SqlStore {
    async fn insert_chunks(&self, chunks: &[CallChunk]) -> Result<()> {
        // One statement per batch of chunks, with two parameters: the rows' columns as a JSON
        // array of arrays (unpacked by the engine: json_each in SQLite, json_array_elements in
        // PostgreSQL), and every chunk's bytes one after the other in one blob, each row naming
        // where its bytes begin (from 1) and how many they are. Binding seven values per row
        // instead cost more than the writes: sqlx's SQLite driver looks up each parameter's name
        // with a scan of the statement's parameters (docs/benchmarks.md, the call log's cost);
        // the bytes in hex inside the JSON cost their encoding, the engine's parse of twice as
        // much text and its decoding.
        let sql = match self.engine {
            crate::Engine::Sqlite => {
                "INSERT INTO call_chunks (workspace_id, token_id, app_id, first_at, last_at, calls, data) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, substr($2, value->>6, value->>7) \
                 FROM json_each($1)"
            }
            crate::Engine::Postgres => {
                "INSERT INTO call_chunks (workspace_id, token_id, app_id, first_at, last_at, calls, data) \
                 SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, (e->>4)::bigint, (e->>5)::integer, \
                 substring($2 from (e->>6)::integer for (e->>7)::integer) \
                 FROM json_array_elements($1::json) AS e"
            }
        };
        /// A row's columns, and where its bytes are in the batch's blob.
        type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>, i64, i64, usize, usize, usize);
        let mut rows: Vec<Row<'_>> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        for group in chunks.chunks(CHUNKS_PER_INSERT) {
            rows.clear();
            data.clear();
            for c in group {
                rows.push((
                    c.workspace_id.as_str(),
                    c.token_id.as_ref().map(TokenId::as_str),
                    c.app_id.as_ref().map(AppId::as_str),
                    c.first_at,
                    c.last_at,
                    c.calls,
                    data.len() + 1,
                    c.data.len(),
                ));
                data.extend_from_slice(&c.data);
            }
            let text = serde_json::to_string(&rows).map_err(|e| keygate_core::Error::internal(e.to_string()))?;
            sqlx::query(sql).bind(text).bind(&data[..]).execute(&self.pool).await.map_err(db_error)?;
        }
        Ok(())
    }

    async fn list_calls(&self, ws: &WorkspaceId, f: &CallFilter, page: &PageRequest) -> Result<Page<CallRecord>> {
        let limit = usize::try_from(crate::sql::page_size(page)).unwrap_or(usize::MAX);
        // Calls below the cursor: those of its chunk before its index, and every older chunk.
        let (mut below_chunk, mut below_index) = match &page.cursor {
            Some(c) => split_call_id(c.parse::<i64>().map_err(|_| crate::sql::invalid_cursor())?),
            None => (i64::MAX, CHUNK_CALLS),
        };
        // Conditions on the chunk's columns ($1 the workspace, $2 the chunk id, then these).
        let mut cond = vec!["workspace_id = $1".to_owned(), "id <= $2".to_owned()];
        let mut text: Vec<&str> = Vec::new();
        let mut ints: Vec<i64> = Vec::new();
        let mut n = 2;
        for (col, v) in
            [("token_id", f.token_id.as_ref().map(TokenId::as_str)), ("app_id", f.app_id.as_ref().map(AppId::as_str))]
        {
            if let Some(v) = v {
                n += 1;
                cond.push(format!("{col} = ${n}"));
                text.push(v);
            }
        }
        if let Some(from) = f.from {
            n += 1;
            cond.push(format!("last_at >= ${n}"));
            ints.push(from.as_millis());
        }
        if let Some(to) = f.to {
            n += 1;
            cond.push(format!("first_at < ${n}"));
            ints.push(to.as_millis());
        }
        let sql = format!(
            "SELECT id, token_id, app_id, data FROM call_chunks WHERE {} ORDER BY id DESC LIMIT ${}",
            cond.join(" AND "),
            n + 1
        );
        let mut items: Vec<CallRecord> = Vec::new();
        let mut scanned = 0usize;
        // The id of the last call examined: where the next page starts when this one stops early.
        let mut last_seen: Option<i64> = None;
        loop {
            let mut q = sqlx::query(AssertSqlSafe(sql.as_str())).bind(ws.as_str()).bind(below_chunk);
            for t in &text {
                q = q.bind(*t);
            }
            for i in &ints {
                q = q.bind(*i);
            }
            let rows = q.bind(ROWS_PER_READ).fetch_all(&self.pool).await.map_err(db_error)?;
            for row in &rows {
                let id: i64 = get(row, "id")?;
                let token = get::<Option<String>>(row, "token_id")?.map(TokenId::from_trusted);
                let app = get::<Option<String>>(row, "app_id")?.map(AppId::from_trusted);
                let data: Vec<u8> = get(row, "data")?;
                let calls = match decode_chunk(
                    &data,
                    ChunkRow { id, workspace_id: ws, token_id: token.as_ref(), app_id: app.as_ref() },
                ) {
                    Ok(calls) => calls,
                    Err(e) => {
                        // One damaged chunk must not hide the rest of the log.
                        tracing::warn!(chunk = id, error = %e, "skipping a damaged chunk of the call log");
                        continue;
                    }
                };
                let end = if id == below_chunk { below_index.min(calls.len()) } else { calls.len() };
                for call in calls.into_iter().take(end).rev() {
                    scanned += 1;
                    last_seen = Some(call.id);
                    if matches(f, &call) {
                        items.push(call);
                        if items.len() > limit {
                            items.truncate(limit);
                            let next_cursor = items.last().map(|c| c.id.to_string());
                            return Ok(Page { items, next_cursor });
                        }
                    }
                }
                if scanned >= SCAN_BUDGET {
                    // Stop here; the caller goes on below the last call examined.
                    return Ok(Page { items, next_cursor: last_seen.map(|id| id.to_string()) });
                }
            }
            if i64::try_from(rows.len()).unwrap_or(i64::MAX) < ROWS_PER_READ {
                return Ok(Page { items, next_cursor: None });
            }
            let oldest: i64 = rows.last().map(|r| get(r, "id")).transpose()?.unwrap_or(0);
            below_chunk = oldest - 1;
            below_index = CHUNK_CALLS;
        }
    }

    async fn trim_calls(&self, before: Timestamp, limit: u32) -> Result<u64> {
        // The oldest chunks by id (ids grow with the writes), those of them whose last call is
        // older than `before`: no index on the time to keep up.
        let done = sqlx::query(
            "DELETE FROM call_chunks WHERE id IN (SELECT id FROM call_chunks ORDER BY id LIMIT $2) AND last_at < $1",
        )
        .bind(before.as_millis())
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }
}

/// Whether a call passes the filter's conditions on the call itself (the token, the app and a
/// first cut of the time are conditions on the chunk's row).
fn matches(f: &CallFilter, c: &CallRecord) -> bool {
    let status = match f.status {
        Some(s) if s < 10 => c.status / 100 == s,
        Some(s) => c.status == s,
        None => true,
    };
    status
        && f.route.as_deref().is_none_or(|r| c.route.as_deref() == Some(r))
        && f.refused.is_none_or(|r| c.refusal.is_some() == r)
        && f.from.is_none_or(|t| c.at >= t)
        && f.to.is_none_or(|t| c.at < t)
}
