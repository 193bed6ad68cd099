//! Wake-ups for change-feed followers: a `watch` channel carrying the highest sequence number this
//! process knows was committed. SQLite writers send after their own commits (all writers are in
//! this process); with PostgreSQL a listener task also forwards `LISTEN` notifications from other
//! nodes and, after any reconnect or every few seconds, reads the current position, so a node
//! that missed notifications converges.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keygate_core::store::ChangeSignal;
use sqlx::AnyPool;
use tokio::sync::watch;

pub(crate) struct WatchSignal(pub(crate) watch::Receiver<u64>);

#[async_trait]
impl ChangeSignal for WatchSignal {
    async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// How often a PostgreSQL node checks the feed position even without notifications.
const CATCH_UP_EVERY: Duration = Duration::from_secs(2);
pub(crate) const CHANNEL: &str = "keygate_token_changes";

/// Follows PostgreSQL notifications for as long as the store lives (the store aborts this task
/// when it is dropped).
pub(crate) async fn follow_postgres(url: String, pool: AnyPool, tx: Arc<watch::Sender<u64>>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "change feed: cannot listen; retrying");
                catch_up(&pool, &tx).await;
                tokio::time::sleep(CATCH_UP_EVERY).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "change feed: LISTEN failed; retrying");
            tokio::time::sleep(CATCH_UP_EVERY).await;
            continue;
        }
        // Anything committed while we were not listening is picked up here.
        catch_up(&pool, &tx).await;
        loop {
            match tokio::time::timeout(CATCH_UP_EVERY, listener.try_recv()).await {
                Ok(Ok(Some(n))) => {
                    let seq = n.payload().parse::<u64>().unwrap_or(0);
                    tx.send_if_modified(|cur| bump(cur, seq));
                }
                // The connection dropped; notifications sent meanwhile are lost, so catch up.
                Ok(Ok(None)) => catch_up(&pool, &tx).await,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "change feed: listener failed; reconnecting");
                    break;
                }
                Err(_elapsed) => catch_up(&pool, &tx).await,
            }
        }
    }
}

/// Reads the committed feed position and wakes followers if it moved.
async fn catch_up(pool: &AnyPool, tx: &watch::Sender<u64>) {
    match sqlx::query_scalar::<_, i64>("SELECT seq FROM feed_state WHERE id = 1").fetch_one(pool).await {
        Ok(seq) => {
            let seq = u64::try_from(seq).unwrap_or(0);
            tx.send_if_modified(|cur| bump(cur, seq));
        }
        Err(e) => tracing::warn!(error = %e, "change feed: cannot read the position"),
    }
}

pub(crate) fn bump(cur: &mut u64, seq: u64) -> bool {
    if seq > *cur {
        *cur = seq;
        true
    } else {
        false
    }
}
