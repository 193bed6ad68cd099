//! The audit trail's hash chain in SQL (issue 15; the links themselves are keygate-core's
//! `audit_chain`). Each workspace's head lives in a row of `audit_chains`, which every writer of an
//! event takes first (an upsert that changes nothing, so it locks the row on PostgreSQL; SQLite has
//! one writer): events of a workspace are therefore linked in the order their ids are given, and
//! verification reads them by id.

use keygate_core::audit_chain::{self, ChainHead, ChainReport, Checkpoint, GENESIS, StoredEvent, Verifier};
use keygate_core::ids::WorkspaceId;
use keygate_core::{Result, Timestamp};
use sqlx::Row;

use crate::db_error;
use crate::rows::get;
use crate::sql::{SqlStore, Tx};

/// Events linked per statement batch when linking the events written before the chain.
const LEGACY_PAGE: i64 = 1_000;
/// Events read per page when verifying.
const VERIFY_PAGE: i64 = 2_000;

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Takes `ws`'s chain head (made if new) for this transaction: the next event's position and the
/// link it follows. A head whose link is not one (changed in the database) is followed from the
/// genesis link, which verification then reports.
pub(crate) async fn lock_head(tx: &mut Tx, ws: &str) -> Result<(u64, [u8; 32])> {
    let genesis = audit_chain::to_hex(&GENESIS);
    let row = sqlx::query(
        "INSERT INTO audit_chains (workspace_id, seq, link, anchor_seq, anchor_link) VALUES ($1, 0, $2, 0, $2) \
         ON CONFLICT (workspace_id) DO UPDATE SET seq = audit_chains.seq RETURNING seq, link",
    )
    .bind(ws)
    .bind(genesis.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)?;
    let seq: i64 = row.try_get("seq").map_err(db_error)?;
    let link: String = row.try_get("link").map_err(db_error)?;
    let prev = audit_chain::from_hex(&link).unwrap_or_else(|| {
        tracing::error!(
            workspace = ws,
            "the audit chain's head link is not a link; `keygate audit verify` will report it"
        );
        GENESIS
    });
    Ok((seq_of(seq) + 1, prev))
}

/// Moves `ws`'s head to the event just written at `seq` with `link`.
pub(crate) async fn move_head(tx: &mut Tx, ws: &str, seq: u64, link: &str) -> Result<()> {
    sqlx::query("UPDATE audit_chains SET seq = $1, link = $2 WHERE workspace_id = $3")
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(link)
        .bind(ws)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
}

async fn read_head(conn: &mut sqlx::AnyConnection, ws: &str) -> Result<ChainHead> {
    let row =
        sqlx::query("SELECT seq, link, anchor_seq, anchor_link, anchor_mac FROM audit_chains WHERE workspace_id = $1")
            .bind(ws)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
    let Some(row) = row else { return Ok(ChainHead::empty(ws)) };
    Ok(ChainHead {
        workspace_id: ws.to_owned(),
        seq: seq_of(row.try_get("seq").map_err(db_error)?),
        link: row.try_get("link").map_err(db_error)?,
        anchor_seq: seq_of(row.try_get("anchor_seq").map_err(db_error)?),
        anchor_link: row.try_get("anchor_link").map_err(db_error)?,
        anchor_mac: get(&row, "anchor_mac")?,
    })
}

/// Checks the links of the events retention is about to delete from `ws` — those after its anchor
/// up to `upto`, whose stored link is `link` — before their last becomes the anchor, authenticated
/// by [`audit_chain::anchor_mac`]: the code must never bless a trail changed in the database
/// (events dated back so that retention deletes them, an anchor moved). An anchor without a code,
/// written before keygate authenticated anchors, is taken as the start: what follows it must still
/// verify, and events old enough to delete now were due for deletion before it anyway. `Err` is
/// the break, which stays for `keygate audit verify` to report.
async fn check_before_prune(
    tx: &mut Tx,
    key: &[u8; 32],
    head: &ChainHead,
    upto: u64,
    link: &str,
) -> Result<std::result::Result<(), String>> {
    let mut start = head.clone();
    if start.anchor_seq > 0
        && start.anchor_mac.is_none()
        && let Some(anchor) = audit_chain::from_hex(&start.anchor_link)
    {
        tracing::warn!(
            workspace = head.workspace_id.as_str(),
            anchor_seq = start.anchor_seq,
            "the audit chain's anchor has no authentication code (written before keygate had one); \
             retention replaces it with an authenticated anchor if the events after it verify"
        );
        let mac = audit_chain::anchor_mac(key, &head.workspace_id, start.anchor_seq, &anchor);
        start.anchor_mac = Some(audit_chain::to_hex(&mac));
    }
    let from = i64::try_from(start.anchor_seq).unwrap_or(i64::MAX);
    let to = i64::try_from(upto).unwrap_or(i64::MAX);
    let mut verifier = Verifier::new(*key, ChainHead { seq: upto, link: link.to_owned(), ..start }, None);
    feed_events(tx, &mut verifier, &head.workspace_id, Some((from, to))).await?;
    Ok(match verifier.finish().broken {
        None => Ok(()),
        Some(b) => Err(b.message),
    })
}

/// Feeds `verifier` the events of workspace `ws` in the order they were written, a page at a
/// time, until they end or the chain is broken; `seqs`: only those with a chain position in
/// (from, to].
async fn feed_events(tx: &mut Tx, verifier: &mut Verifier, ws: &str, seqs: Option<(i64, i64)>) -> Result<()> {
    // Placeholders numbered in the order they appear (SQLite numbers `$N` by appearance).
    let sql = match seqs {
        Some(_) => format!(
            "SELECT {STORED_COLS} FROM audit_events WHERE workspace_id = $1 AND chain_seq > $2 AND chain_seq <= $3 \
             AND id > $4 ORDER BY id LIMIT $5"
        ),
        None => {
            format!("SELECT {STORED_COLS} FROM audit_events WHERE workspace_id = $1 AND id > $2 ORDER BY id LIMIT $3")
        }
    };
    let mut after = 0i64;
    while !verifier.is_broken() {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(ws);
        if let Some((from, to)) = seqs {
            q = q.bind(from).bind(to);
        }
        let rows = q.bind(after).bind(VERIFY_PAGE).fetch_all(&mut **tx).await.map_err(db_error)?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("id").map_err(db_error)?;
        for row in &rows {
            verifier.feed(&stored(row)?);
        }
    }
    Ok(())
}

const STORED_COLS: &str = "id, workspace_id, chain_seq, link, at, actor, action, target, before_json, after_json, \
    source, feed_seq";

fn stored(row: &sqlx::any::AnyRow) -> Result<StoredEvent> {
    Ok(StoredEvent {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        chain_seq: get(row, "chain_seq")?,
        link: get(row, "link")?,
        at_ms: get(row, "at")?,
        actor: get(row, "actor")?,
        action: get(row, "action")?,
        target: get(row, "target")?,
        before: get(row, "before_json")?,
        after: get(row, "after_json")?,
        source: get(row, "source")?,
        feed_seq: get(row, "feed_seq")?,
    })
}

impl SqlStore {
    /// See `AuditStore::link_legacy_audit`.
    pub(crate) async fn link_legacy(&self) -> Result<u64> {
        let through: Option<i64> = sqlx::query_scalar("SELECT legacy_through FROM audit_chain_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        let through = through.unwrap_or(0);
        if through == 0 {
            return Ok(0);
        }
        let workspaces: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT workspace_id FROM audit_events WHERE link IS NULL AND id <= $1 ORDER BY workspace_id",
        )
        .bind(through)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let key = self.chain_key().chain;
        let mut linked = 0u64;
        for ws in workspaces {
            let mut tx = self.begin().await?;
            let (mut seq, mut prev) = lock_head(&mut tx, &ws).await?;
            if seq != 1 {
                // The workspace's chain has begun (another node linked these first, or events
                // were written since): they stay unlinked, and verification says so.
                continue;
            }
            let mut after = 0i64;
            let mut last_link = None;
            loop {
                let sql = format!(
                    "SELECT {STORED_COLS} FROM audit_events WHERE workspace_id = $1 AND link IS NULL AND id <= $2 \
                     AND id > $3 ORDER BY id LIMIT $4"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(ws.as_str())
                    .bind(through)
                    .bind(after)
                    .bind(LEGACY_PAGE)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_error)?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    let e = stored(row)?;
                    let link = audit_chain::link(&key, &prev, &e.fields(seq));
                    let hex = audit_chain::to_hex(&link);
                    sqlx::query("UPDATE audit_events SET chain_seq = $1, link = $2 WHERE id = $3")
                        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
                        .bind(hex.as_str())
                        .bind(e.id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                    after = e.id;
                    prev = link;
                    last_link = Some((seq, hex));
                    seq += 1;
                    linked += 1;
                }
            }
            if let Some((seq, hex)) = last_link {
                move_head(&mut tx, &ws, seq, &hex).await?;
            }
            tx.commit().await.map_err(db_error)?;
        }
        Ok(linked)
    }

    pub(crate) async fn chain_head(&self, ws: &WorkspaceId) -> Result<ChainHead> {
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        read_head(&mut conn, ws.as_str()).await
    }

    /// See `AuditStore::verify_audit_chain`: one read-only transaction, a snapshot on both
    /// engines (PostgreSQL's repeatable read; SQLite's WAL read transaction), read in pages.
    pub(crate) async fn verify_chain(
        &self,
        ws: &WorkspaceId,
        key: [u8; 32],
        checkpoint: Option<Checkpoint>,
    ) -> Result<ChainReport> {
        let mut tx = self.begin().await?;
        if self.engine == crate::Engine::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        let head = read_head(&mut tx, ws.as_str()).await?;
        let mut verifier = Verifier::new(key, head, checkpoint);
        feed_events(&mut tx, &mut verifier, ws.as_str(), None).await?;
        tx.rollback().await.map_err(db_error)?;
        Ok(verifier.finish())
    }

    /// See `AuditStore::prune_audit`. The events deleted are checked first and the anchor they
    /// leave is authenticated ([`check_before_prune`]); a workspace whose events due for deletion
    /// do not verify is left as it is (logged), so the break stays to be reported.
    pub(crate) async fn prune_chain(&self, before: Timestamp) -> Result<u64> {
        let key = self.chain_key().chain;
        let workspaces: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT workspace_id FROM audit_events WHERE at < $1 ORDER BY workspace_id")
                .bind(before.as_millis())
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        let mut deleted = 0u64;
        for ws in workspaces {
            // A step at a time, each in its own transaction, so that the head's lock (which every
            // audited write of the workspace waits for) is held for one step's check and delete.
            loop {
                match self.prune_step(&key, &ws, before).await? {
                    Pruned::More(n) => deleted += n,
                    Pruned::Done(n) => {
                        deleted += n;
                        break;
                    }
                    Pruned::Broken => break,
                }
            }
        }
        Ok(deleted)
    }

    /// One step of [`Self::prune_chain`] for workspace `ws`: deletes the events older than
    /// `before`, at most [`PRUNE_STEP`] linked ones past the anchor, once their links verify, and
    /// moves the anchor (authenticated) to the last deleted.
    async fn prune_step(&self, key: &[u8; 32], ws: &str, before: Timestamp) -> Result<Pruned> {
        let mut tx = self.begin().await?;
        lock_head(&mut tx, ws).await?;
        let head = read_head(&mut tx, ws).await?;
        let limit = i64::try_from(head.anchor_seq.saturating_add(PRUNE_STEP)).unwrap_or(i64::MAX);
        // The last linked event old enough, in chain order, within the step: it and every event
        // before it go.
        let last = sqlx::query(
            "SELECT chain_seq, link FROM audit_events WHERE workspace_id = $1 AND at < $2 \
             AND chain_seq IS NOT NULL AND chain_seq <= $3 ORDER BY chain_seq DESC LIMIT 1",
        )
        .bind(ws)
        .bind(before.as_millis())
        .bind(limit)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let (upto, link): (i64, String) = match &last {
            Some(row) => (row.try_get("chain_seq").map_err(db_error)?, row.try_get("link").map_err(db_error)?),
            None => (0, String::new()),
        };
        let upto_seq = seq_of(upto);
        if upto_seq > head.anchor_seq
            && let Err(why) = check_before_prune(&mut tx, key, &head, upto_seq, &link).await?
        {
            tracing::error!(
                workspace = ws,
                reason = why.as_str(),
                "the audit events due for deletion by audit.retention_days do not verify; none of this workspace's are deleted, so that `keygate audit verify` can show the break"
            );
            tx.rollback().await.map_err(db_error)?;
            return Ok(Pruned::Broken);
        }
        let mac =
            audit_chain::from_hex(&link).map(|l| audit_chain::to_hex(&audit_chain::anchor_mac(key, ws, upto_seq, &l)));
        // Their propagation records go with them (first: they are found through the events).
        let mut gone = 0;
        for sql in [
            "DELETE FROM feed_acks WHERE seq IN (SELECT feed_seq FROM audit_events WHERE workspace_id = $1 \
             AND feed_seq IS NOT NULL AND (chain_seq <= $2 OR (chain_seq IS NULL AND at < $3)))",
            "DELETE FROM audit_events WHERE workspace_id = $1 AND (chain_seq <= $2 OR (chain_seq IS NULL AND at < $3))",
        ] {
            let done = sqlx::query(sql)
                .bind(ws)
                .bind(upto)
                .bind(before.as_millis())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            gone = done.rows_affected(); // the last statement's: the events deleted
        }
        if upto > 0 {
            sqlx::query(
                "UPDATE audit_chains SET anchor_seq = $1, anchor_link = $2, anchor_mac = $3 \
                 WHERE workspace_id = $4 AND anchor_seq < $1",
            )
            .bind(upto)
            .bind(link.as_str())
            .bind(mac)
            .bind(ws)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        let n = gone;
        // A full step may have left more behind it.
        Ok(if upto_seq > head.anchor_seq && upto == limit { Pruned::More(n) } else { Pruned::Done(n) })
    }
}

/// Linked audit events one step of retention checks and deletes at most (one transaction); one
/// in the store's own tests, so that their few events take several steps.
const PRUNE_STEP: u64 = if cfg!(test) { 1 } else { 20_000 };

/// What one step of retention did.
enum Pruned {
    /// Deleted this many; more may be due.
    More(u64),
    /// Deleted this many; nothing more is due.
    Done(u64),
    /// The events due do not verify: nothing deleted (logged).
    Broken,
}
