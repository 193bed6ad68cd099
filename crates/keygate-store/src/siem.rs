//! [`SiemStore`] for [`SqlStore`]: the outbox of audit events streamed to SIEM sinks.

use async_trait::async_trait;
use keygate_core::siem::{Batch, SiemStore, Sink, StreamedEvent, event_json};
use keygate_core::{Result, Timestamp};
use sqlx::AssertSqlSafe;

use crate::db_error;
use crate::rows;
use crate::sql::{SqlStore, Tx};

fn bit(sink: Sink) -> u8 {
    match sink {
        Sink::Syslog => 1,
        Sink::Http => 2,
    }
}

/// Writes `e` once for each sink in `sinks` (bits), in the audit event's transaction.
pub(crate) async fn enqueue(tx: &mut Tx, sinks: u8, e: &StreamedEvent<'_>) -> Result<()> {
    let json = event_json(e).to_string();
    for sink in Sink::ALL.into_iter().filter(|s| sinks & bit(*s) != 0) {
        sqlx::query("INSERT INTO siem_outbox (sink, event, created_at, next_at) VALUES ($1, $2, $3, $3)")
            .bind(sink.as_str())
            .bind(json.as_str())
            .bind(e.at.as_millis())
            .execute(&mut **tx)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

#[async_trait]
impl SiemStore for SqlStore {
    fn set_siem_sinks(&self, sinks: &[Sink]) {
        let bits = sinks.iter().fold(0u8, |acc, s| acc | bit(*s));
        self.siem_sinks.store(bits, std::sync::atomic::Ordering::Relaxed);
    }

    async fn claim_siem(&self, sink: Sink, now: Timestamp, lease_ms: i64, owner: &str, limit: u32) -> Result<Batch> {
        let pick = "SELECT id FROM siem_outbox WHERE sink = $5 AND next_at <= $3 \
             AND (lease_until IS NULL OR lease_until <= $3) ORDER BY id";
        let rows = crate::notify::lease_rows(
            self,
            "siem_outbox",
            pick,
            "",
            "id, event, attempts",
            owner,
            now,
            lease_ms,
            limit,
            Some(sink.as_str()),
        )
        .await?;
        let mut got: Vec<(i64, String, i64)> = rows
            .iter()
            .map(|r| Ok((rows::get(r, "id")?, rows::get(r, "event")?, rows::get(r, "attempts")?)))
            .collect::<Result<_>>()?;
        got.sort_by_key(|r| r.0);
        Ok(Batch {
            attempts: got.first().map_or(0, |r| u32::try_from(r.2).unwrap_or(u32::MAX)),
            ids: got.iter().map(|r| r.0).collect(),
            events: got.into_iter().map(|r| r.1).collect(),
        })
    }

    async fn ack_siem(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // Ids are integers from the store: the list is built from numbers only.
        let sql = format!("DELETE FROM siem_outbox WHERE id IN ({})", id_list(ids));
        sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }

    async fn retry_siem(&self, ids: &[i64], next_at: Timestamp, error: &str) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE siem_outbox SET attempts = attempts + 1, next_at = $1, last_error = $2, lease_owner = NULL, \
             lease_until = NULL WHERE id IN ({})",
            id_list(ids)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(next_at.as_millis())
            .bind(error)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn trim_siem(&self, sink: Sink, keep: u64) -> Result<u64> {
        // The id of the newest row to drop: everything at or below it goes.
        let cut: Option<i64> =
            sqlx::query_scalar("SELECT id FROM siem_outbox WHERE sink = $1 ORDER BY id DESC LIMIT 1 OFFSET $2")
                .bind(sink.as_str())
                .bind(i64::try_from(keep).unwrap_or(i64::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        let Some(cut) = cut else { return Ok(0) };
        let done = sqlx::query("DELETE FROM siem_outbox WHERE sink = $1 AND id <= $2")
            .bind(sink.as_str())
            .bind(cut)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn siem_backlog(&self, sink: Sink) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM siem_outbox WHERE sink = $1")
            .bind(sink.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
