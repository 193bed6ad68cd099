//! [`NodeStore`] for [`SqlStore`]: the registry of the nodes that share this store, and the
//! acknowledgements of token changes (how far each had spread when it was answered).

use async_trait::async_trait;
use keygate_core::model::{NodeRecord, Propagation};
use keygate_core::store::NodeStore;
use keygate_core::{Result, Timestamp};

use crate::db_error;
use crate::rows;
use crate::sql::SqlStore;

const NODE_COLS: &str =
    "id, instance, gateway_address, admin_address, version, started_at, applied_seq, heartbeat_at, stopped_at";

fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl NodeStore for SqlStore {
    async fn register_node(&self, n: &NodeRecord) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(n.id.as_str()).execute(&mut *tx).await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO nodes (id, instance, gateway_address, admin_address, version, started_at, applied_seq, \
             heartbeat_at, stopped_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(n.id.as_str())
        .bind(n.instance.as_str())
        .bind(n.gateway_address.as_str())
        .bind(n.admin_address.as_str())
        .bind(n.version.as_str())
        .bind(n.started_at.as_millis())
        .bind(big(n.applied_seq))
        .bind(n.heartbeat_at.as_millis())
        .bind(n.stopped_at.map(Timestamp::as_millis))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        self.commit(tx, None).await
    }

    async fn node_heartbeat(&self, id: &str, instance: &str, applied_seq: u64, at: Timestamp) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE nodes SET applied_seq = CASE WHEN applied_seq < $1 THEN $1 ELSE applied_seq END, \
             heartbeat_at = $2, stopped_at = NULL WHERE id = $3 AND instance = $4",
        )
        .bind(big(applied_seq))
        .bind(at.as_millis())
        .bind(id)
        .bind(instance)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn node_stopped(&self, id: &str, instance: &str, at: Timestamp) -> Result<()> {
        sqlx::query("UPDATE nodes SET stopped_at = $1 WHERE id = $2 AND instance = $3")
            .bind(at.as_millis())
            .bind(id)
            .bind(instance)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {NODE_COLS} FROM nodes ORDER BY id")))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(rows::node).collect()
    }

    async fn prune_nodes(&self, before: Timestamp) -> Result<u64> {
        let done = sqlx::query("DELETE FROM nodes WHERE heartbeat_at < $1")
            .bind(before.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn record_propagation(&self, seq: u64, p: &Propagation, at: Timestamp) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM feed_acks WHERE seq = $1").bind(big(seq)).execute(&mut *tx).await.map_err(db_error)?;
        sqlx::query("INSERT INTO feed_acks (seq, nodes, applied, elapsed_ms, acked_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(big(seq))
            .bind(i64::from(p.nodes))
            .bind(i64::from(p.applied))
            .bind(big(p.elapsed_ms))
            .bind(at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.commit(tx, None).await
    }
}
