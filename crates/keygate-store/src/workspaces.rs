//! Workspaces as the instance's operator manages them: listed, renamed, and deleted in one
//! transaction that leaves nothing of the workspace able to authenticate (see
//! [`WorkspaceStore::delete_workspace`](keygate_core::store::WorkspaceStore::delete_workspace)).

use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::model::{NewAuditEvent, Workspace};
use keygate_core::secret::SecretHash;
use keygate_core::store::WorkspaceDeletion;
use keygate_core::{Error, Result, Timestamp};
use sqlx::Row;

use crate::db_error;
use crate::rows;
use crate::sql::{FeedSeqs, SqlStore, insert_audit, record_change};

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) async fn list(s: &SqlStore) -> Result<Vec<Workspace>> {
    let rows = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE deleted_at IS NULL ORDER BY name")
        .fetch_all(&s.pool)
        .await
        .map_err(db_error)?;
    rows.iter().map(rows::workspace).collect()
}

pub(crate) async fn rename(s: &SqlStore, id: &WorkspaceId, name: &str, audit: &NewAuditEvent) -> Result<()> {
    let mut tx = s.begin().await?;
    let taken: Option<String> = sqlx::query_scalar("SELECT id FROM workspaces WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if taken.is_some_and(|t| t != id.as_str()) {
        return Err(Error::conflict("workspace_exists", format!("a workspace is already named {name:?}")));
    }
    let done = sqlx::query("UPDATE workspaces SET name = $1 WHERE id = $2 AND deleted_at IS NULL")
        .bind(name)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Err(Error::not_found("workspace"));
    }
    insert_audit(&mut tx, &s.chain_key(), audit).await?;
    s.commit(tx, None).await
}

pub(crate) async fn delete(
    s: &SqlStore,
    id: &WorkspaceId,
    now: Timestamp,
    revoke_tokens: bool,
    audit: &NewAuditEvent,
) -> Result<WorkspaceDeletion> {
    let mut tx = s.begin().await?;
    // The first write: this transaction is a feed writer from its start.
    let mut seqs = FeedSeqs::start(&mut tx).await?;
    let ws = id.as_str();
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM workspaces WHERE id = $1 AND deleted_at IS NULL")
        .bind(ws)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
    if exists.is_none() {
        return Err(Error::not_found("workspace"));
    }
    let mut done = WorkspaceDeletion::default();

    // Tokens: revoked, each on the feed (the index drops it) and in the audit trail.
    let live = sqlx::query("SELECT id, hash FROM tokens WHERE workspace_id = $1 AND state <> 'revoked'")
        .bind(ws)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    if !live.is_empty() && !revoke_tokens {
        return Err(Error::conflict(
            "workspace_has_tokens",
            format!(
                "the workspace still has {} token(s) that can authenticate; delete it with ?revoke_tokens=true to revoke them with it",
                live.len()
            ),
        ));
    }
    sqlx::query(
        "UPDATE tokens SET state = 'revoked', revoked_at = $1, revoke_reason = 'workspace deleted', updated_at = $1, \
         version = version + 1 WHERE workspace_id = $2 AND state <> 'revoked'",
    )
    .bind(now.as_millis())
    .bind(ws)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    let positions = seqs.take(&mut tx, u64::try_from(live.len()).unwrap_or(u64::MAX)).await?;
    for (row, seq) in live.iter().zip(positions) {
        let tid = TokenId::from_trusted(row.try_get::<String, _>("id").map_err(db_error)?);
        let hash: Vec<u8> = row.try_get("hash").map_err(db_error)?;
        let hash =
            SecretHash::from_slice(&hash).ok_or_else(|| Error::internal("a stored token hash is not 32 bytes"))?;
        record_change(&mut tx, seq, &tid, &hash, now).await?;
        let mut ev = audit.clone();
        ev.action = "token.revoke".into();
        ev.target = tid.as_str().to_owned();
        ev.before = None;
        ev.after = Some(serde_json::json!({"state": "revoked", "revoke_reason": "workspace deleted"}));
        insert_audit(&mut tx, &s.chain_key(), &ev).await?;
        done.tokens_revoked += 1;
    }

    // OAuth: every app's client, refresh tokens and live access tokens.
    let apps: Vec<String> = sqlx::query_scalar("SELECT id FROM apps WHERE workspace_id = $1")
        .bind(ws)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    for app in apps {
        if crate::oauth::delete_app_oauth(&mut tx, &s.chain_key(), &mut seqs, id, &AppId::from_trusted(app), now, audit)
            .await?
        {
            done.oauth_clients_deleted += 1;
        }
    }

    // Root keys: revoked (they are looked up in the store on every admin request).
    let keys = sqlx::query("UPDATE root_keys SET revoked_at = $1 WHERE workspace_id = $2 AND revoked_at IS NULL")
        .bind(now.as_millis())
        .bind(ws)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    done.root_keys_revoked = keys.rows_affected();

    // Routes: deleted, each on the feed (every node's gateway drops it).
    let routes: Vec<String> = sqlx::query_scalar("DELETE FROM routes WHERE workspace_id = $1 RETURNING id")
        .bind(ws)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    // LLM providers: deleted with their sealed keys, on the feed like routes.
    let providers: Vec<String> = sqlx::query_scalar("DELETE FROM llm_providers WHERE workspace_id = $1 RETURNING id")
        .bind(ws)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    // APIs and their publish requests: deleted, on the feed like routes.
    sqlx::query("DELETE FROM api_publish_requests WHERE workspace_id = $1")
        .bind(ws)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let apis: Vec<String> = sqlx::query_scalar("DELETE FROM apis WHERE workspace_id = $1 RETURNING id")
        .bind(ws)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let changed: Vec<String> = routes
        .iter()
        .cloned()
        .chain(providers.iter().map(|p| format!("provider:{p}")))
        .chain(apis.iter().map(|a| format!("api:{a}")))
        .collect();
    let positions = seqs.take(&mut tx, u64::try_from(changed.len()).unwrap_or(u64::MAX)).await?;
    for (route, seq) in changed.iter().zip(positions) {
        sqlx::query("INSERT INTO route_changes (seq, route_id, at) VALUES ($1, $2, $3)")
            .bind(count(seq))
            .bind(route.as_str())
            .bind(now.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    done.routes_deleted = u64::try_from(routes.len()).unwrap_or(u64::MAX);

    // People: no one is a member any more, and no invitation can make anyone one.
    // Webhooks: no endpoint of a deleted workspace is called again (the token events above
    // queued nothing either, since their deliveries go with the endpoints).
    sqlx::query(
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE workspace_id = $1)",
    )
    .bind(ws)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    for table in [
        "memberships",
        "invitations",
        "app_owners",
        "webhook_deliveries",
        "webhook_endpoints",
        "email_outbox",
        "notification_prefs",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE workspace_id = $1")))
            .bind(ws)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    // The row stays, under a name no one can ask for, so the name is free again.
    sqlx::query("UPDATE workspaces SET deleted_at = $1, name = $2 WHERE id = $3")
        .bind(now.as_millis())
        .bind(format!("\u{1}deleted:{ws}"))
        .bind(ws)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let mut ev = audit.clone();
    ev.after = Some(serde_json::to_value(done).unwrap_or_default());
    insert_audit(&mut tx, &s.chain_key(), &ev).await?;
    s.commit(tx, seqs.last()).await?;
    Ok(done)
}
