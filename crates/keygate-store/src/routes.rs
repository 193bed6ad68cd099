//! [`RouteStore`] for [`SqlStore`]: routes managed through the admin API. Every change takes a
//! change-feed position, recorded in `route_changes` in the same transaction as the route and its
//! audit event, so that a follower that sees the position also sees the route table it belongs to.

use async_trait::async_trait;
use keygate_core::ids::WorkspaceId;
use keygate_core::model::{NewAuditEvent, StoredRoute};
use keygate_core::store::RouteStore;
use keygate_core::{Error, Result, Timestamp};

use crate::db_error;
use crate::rows::{self, to_json};
use crate::sql::{FeedSeqs, SqlStore, Tx, insert_audit};

const ROUTE_COLS: &str = "id, workspace_id, config, created_at, updated_at";

fn route_exists(id: &str) -> Error {
    Error::conflict("route_exists", format!("a route with id {id:?} already exists; choose another id"))
}

/// Takes a feed position for the change of route `id` and records it.
async fn record_change(tx: &mut Tx, seqs: &mut FeedSeqs, id: &str, at: Timestamp) -> Result<()> {
    let seq = seqs.take(tx, 1).await?.start;
    sqlx::query("INSERT INTO route_changes (seq, route_id, at) VALUES ($1, $2, $3)")
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(id)
        .bind(at.as_millis())
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Ends a change of the route table (a route's or a provider's, named `id` in the feed): its feed
/// position, its audit event, and the commit, which wakes the followers.
pub(crate) async fn commit_change(
    store: &SqlStore,
    mut tx: Tx,
    mut seqs: FeedSeqs,
    id: &str,
    at: Timestamp,
    audit: &NewAuditEvent,
) -> Result<()> {
    record_change(&mut tx, &mut seqs, id, at).await?;
    insert_audit(&mut tx, &store.chain_key(), audit).await?;
    store.commit(tx, seqs.last()).await
}

/// Deletes row `id` of the workspace from `table` (routes, llm_providers) as a change of the
/// route table named `change` in the feed; `false` if the workspace has no such row.
pub(crate) async fn delete_in_workspace(
    store: &SqlStore,
    table: &'static str,
    ws: &WorkspaceId,
    id: &str,
    change: &str,
    audit: &NewAuditEvent,
) -> Result<bool> {
    let mut tx = store.begin().await?;
    let seqs = FeedSeqs::start(&mut tx).await?;
    let done = sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE workspace_id = $1 AND id = $2")))
        .bind(ws.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    commit_change(store, tx, seqs, change, audit.at, audit).await?;
    Ok(true)
}

#[async_trait]
impl RouteStore for SqlStore {
    async fn insert_route(&self, route: &StoredRoute, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM routes WHERE id = $1")
            .bind(route.id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        if taken.is_some() {
            return Err(route_exists(&route.id));
        }
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO routes ({ROUTE_COLS}) VALUES ($1, $2, $3, $4, $5)")))
            .bind(route.id.as_str())
            .bind(route.workspace_id.as_str())
            .bind(to_json(&route.config)?)
            .bind(route.created_at.as_millis())
            .bind(route.updated_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        commit_change(self, tx, seqs, &route.id, route.updated_at, audit).await
    }

    async fn update_route(&self, route: &StoredRoute, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        let done = sqlx::query("UPDATE routes SET config = $1, updated_at = $2 WHERE workspace_id = $3 AND id = $4")
            .bind(to_json(&route.config)?)
            .bind(route.updated_at.as_millis())
            .bind(route.workspace_id.as_str())
            .bind(route.id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("route"));
        }
        commit_change(self, tx, seqs, &route.id, route.updated_at, audit).await
    }

    async fn delete_route(&self, ws: &WorkspaceId, id: &str, audit: &NewAuditEvent) -> Result<bool> {
        delete_in_workspace(self, "routes", ws, id, id, audit).await
    }

    async fn route(&self, id: &str) -> Result<Option<StoredRoute>> {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {ROUTE_COLS} FROM routes WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::route)
            .transpose()
    }

    async fn list_routes(&self) -> Result<(u64, Vec<StoredRoute>)> {
        // The position is read first: the rows are then at least as new as it says (a change
        // committed in between is seen again at the next position, and reloading twice is
        // harmless), never older.
        let pos = self.routes_position().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {ROUTE_COLS} FROM routes ORDER BY id")))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        Ok((pos, rows.iter().map(rows::route).collect::<Result<_>>()?))
    }

    async fn routes_position(&self) -> Result<u64> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT MAX(seq) FROM route_changes").fetch_one(&self.pool).await.map_err(db_error)?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }
}
