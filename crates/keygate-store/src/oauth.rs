//! [`OAuthStore`] for [`SqlStore`]: OAuth clients, signing keys, refresh tokens and their families,
//! issued access tokens, and the access-token revocations published on the change feed
//! (`jti_revocations`). Same rules as `sql.rs`: `$n` placeholders in the SQL both engines share,
//! and every change that takes an audit event writes it in the same transaction.

use async_trait::async_trait;
use keygate_core::ids::{AppId, WorkspaceId};
use keygate_core::model::NewAuditEvent;
use keygate_core::oauth::{
    AccessTokenRecord, ClientSuspension, OAuthClient, OAuthStore, RefreshTokenRecord, RefreshUse, SigningKeyRecord,
};
use keygate_core::secret::SecretHash;
use keygate_core::{Error, Result, Timestamp};
use sqlx::{AssertSqlSafe, Row};

use crate::db_error;
use crate::rows::{self, opt_to_json, to_json};
use crate::sql::{AnyQuery, FeedSeqs, SqlStore, Tx, insert_audit};

// As in `sql.rs`: SQL passed as `AssertSqlSafe` is built only from these constants and numbered
// placeholders.
const CLIENT_COLS: &str = "client_id, workspace_id, app_id, grant_types, scopes, auth_method, secret_hash, \
    secret_last4, previous_secret_hash, previous_secret_expires_at, jwks, access_token_format, signing_alg, \
    access_token_ttl_seconds, refresh_token_ttl_seconds, created_at, updated_at, version, exchange_subject_apps, \
    suspended_at, suspended_reason";
const SIGNING_KEY_COLS: &str = "kid, alg, public_jwk, sealed_private, created_at, signs_from, retired_at, drop_after";
const REFRESH_COLS: &str = "hash, family_id, client_id, workspace_id, app_id, subject, scopes, dpop_jkt, created_at, \
    expires_at, used_at, revoked_at";
const ACCESS_COLS: &str = "jti, client_id, workspace_id, app_id, family_id, subject, scopes, dpop_jkt, issued_at, \
    expires_at, revoked_at";

/// Refresh tokens are kept this long after they expire, so that a late replay of a stolen one is
/// still recognized as reuse for a while rather than as an unknown token.
const REFRESH_KEPT_AFTER_EXPIRY_MS: i64 = 86_400_000;

/// Rows per statement when publishing revocations (3 parameters each; see `SMALL_ROWS` in sql.rs).
const REVOCATION_ROWS: usize = 32;

fn hash_bytes(h: &SecretHash) -> Vec<u8> {
    h.as_bytes().to_vec()
}

fn opt_hash_bytes(h: &Option<SecretHash>) -> Option<Vec<u8>> {
    h.as_ref().map(hash_bytes)
}

fn oauth_client_exists() -> Error {
    Error::conflict("oauth_client_exists", "this app is already an OAuth client; change that client instead")
}

fn family_revoked() -> Error {
    Error::conflict(
        "token_family_revoked",
        "this token's refresh-token family has been revoked; the client must obtain a new grant",
    )
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Makes `family_id` a live family that tokens may join: creates it, or takes its row lock and
/// checks it has not been revoked (`token_family_revoked`). Revoking a family updates this row
/// first, so on PostgreSQL an issue and a revocation of the same family are serialized by the row
/// lock and the issue sees the revocation (SQLite runs one writer at a time anyway).
async fn join_family(tx: &mut Tx, family_id: &str, ws: &WorkspaceId, app: &AppId, at: Timestamp) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO oauth_token_families (family_id, workspace_id, app_id, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (family_id) DO UPDATE SET created_at = oauth_token_families.created_at \
         WHERE oauth_token_families.revoked_at IS NULL",
    )
    .bind(family_id)
    .bind(ws.as_str())
    .bind(app.as_str())
    .bind(at.as_millis())
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Err(family_revoked());
    }
    Ok(())
}

/// Decodes the `jti, expires_at` pairs of `RETURNING jti, expires_at`.
fn revoked_pairs(found: &[sqlx::any::AnyRow]) -> Result<Vec<(String, Timestamp)>> {
    found
        .iter()
        .map(|r| {
            let jti: String = r.try_get("jti").map_err(db_error)?;
            let exp: i64 = r.try_get("expires_at").map_err(db_error)?;
            Ok((jti, Timestamp::from_millis(exp)))
        })
        .collect()
}

/// Publishes revoked access tokens on the change feed: one `jti_revocations` row each, at feed
/// positions taken from `seqs` (so the caller's transaction took its first position first).
pub(crate) async fn publish_revocations(
    tx: &mut Tx,
    seqs: &mut FeedSeqs,
    revoked: &[(String, Timestamp)],
) -> Result<()> {
    let n = u64::try_from(revoked.len()).unwrap_or(u64::MAX);
    let mut positions = seqs.take(tx, n).await?;
    for chunk in revoked.chunks(REVOCATION_ROWS) {
        let rows: Vec<String> =
            (0..chunk.len()).map(|r| format!("(${}, ${}, ${})", 3 * r + 1, 3 * r + 2, 3 * r + 3)).collect();
        let sql = format!("INSERT INTO jti_revocations (seq, jti, expires_at) VALUES {}", rows.join(", "));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (jti, expires_at) in chunk {
            let seq = positions.next().ok_or_else(|| Error::internal("fewer feed positions than revocations"))?;
            q = q.bind(count(seq)).bind(jti.as_str()).bind(expires_at.as_millis());
        }
        q.execute(&mut **tx).await.map_err(db_error)?;
    }
    Ok(())
}

/// Revokes each access token of the app `app` of `ws` (those its one client was issued) that has
/// neither expired nor been revoked, and publishes them on the change feed at positions taken from
/// `seqs`: how deleting an app and suspending its client stop its tokens at every gateway at once.
/// Returns them (`jti`, expiry).
async fn revoke_live_access_tokens(
    tx: &mut Tx,
    seqs: &mut FeedSeqs,
    ws: &WorkspaceId,
    app: &AppId,
    now: Timestamp,
) -> Result<Vec<(String, Timestamp)>> {
    let found = sqlx::query(
        "UPDATE oauth_access_tokens SET revoked_at = $1 WHERE workspace_id = $2 AND app_id = $3 \
         AND revoked_at IS NULL AND expires_at > $4 RETURNING jti, expires_at",
    )
    .bind(now.as_millis())
    .bind(ws.as_str())
    .bind(app.as_str())
    .bind(now.as_millis())
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    let revoked = revoked_pairs(&found)?;
    publish_revocations(tx, seqs, &revoked).await?;
    Ok(revoked)
}

/// Whether `ws` has the client `client_id`: what a conditional change of the client that found
/// no row tells apart (a state that forbids the change, or no such client).
async fn client_exists(tx: &mut Tx, ws: &WorkspaceId, client_id: &str) -> Result<bool> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT client_id FROM oauth_clients WHERE client_id = $1 AND workspace_id = $2")
            .bind(client_id)
            .bind(ws.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
    Ok(found.is_some())
}

/// What a conditional change of the client (suspend, resume) that found no row answers: `None`
/// (nothing to change) when the client exists, else `oauth_client_not_found`.
async fn unchanged_or_missing<T>(tx: &mut Tx, ws: &WorkspaceId, client_id: &str) -> Result<Option<T>> {
    if client_exists(tx, ws, client_id).await? { Ok(None) } else { Err(Error::not_found("oauth client")) }
}

fn client_suspended() -> Error {
    Error::conflict(
        "oauth_client_suspended",
        "the OAuth client is suspended; a person must resume it before it is issued tokens again",
    )
}

/// The OAuth part of deleting an app, inside `delete_app`'s transaction (whose first write took
/// the feed position): revokes the app's token families first (so a rotation in flight cannot add
/// to them afterwards), revokes its live access tokens on the feed, deletes its refresh tokens and
/// then its client, with an `oauth_client.delete` event (a copy of `audit` retargeted). Returns
/// whether the app had a client.
pub(crate) async fn delete_app_oauth(
    tx: &mut Tx,
    chain_key: &crate::sql::AuditKeys,
    seqs: &mut FeedSeqs,
    ws: &WorkspaceId,
    app: &AppId,
    now: Timestamp,
    audit: &NewAuditEvent,
) -> Result<bool> {
    sqlx::query(
        "UPDATE oauth_token_families SET revoked_at = $1 WHERE workspace_id = $2 AND app_id = $3 AND revoked_at IS NULL",
    )
    .bind(now.as_millis())
    .bind(ws.as_str())
    .bind(app.as_str())
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    let revoked = revoke_live_access_tokens(tx, seqs, ws, app, now).await?;
    // Refresh tokens reference the client: they go first.
    let refresh = sqlx::query("DELETE FROM oauth_refresh_tokens WHERE workspace_id = $1 AND app_id = $2")
        .bind(ws.as_str())
        .bind(app.as_str())
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    let client: Option<String> =
        sqlx::query_scalar("DELETE FROM oauth_clients WHERE workspace_id = $1 AND app_id = $2 RETURNING client_id")
            .bind(ws.as_str())
            .bind(app.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
    let deleted = client.is_some();
    if let Some(client_id) = client {
        let mut ev = audit.clone();
        ev.action = "oauth_client.delete".into();
        ev.target = client_id;
        ev.before = None;
        ev.after = Some(serde_json::json!({
            "reason": if audit.action == "workspace.delete" { "workspace deleted" } else { "app deleted" },
            "access_tokens_revoked": revoked.len(),
            "refresh_tokens_deleted": refresh.rows_affected(),
        }));
        insert_audit(tx, chain_key, &ev).await?;
    }
    Ok(deleted)
}

fn bind_client<'q>(q: AnyQuery<'q>, c: &'q OAuthClient) -> Result<AnyQuery<'q>> {
    Ok(q.bind(c.client_id.as_str())
        .bind(c.workspace_id.as_str())
        .bind(c.app_id.as_str())
        .bind(to_json(&c.grant_types)?)
        .bind(to_json(&c.scopes)?)
        .bind(c.auth_method.as_str())
        .bind(opt_hash_bytes(&c.secret_hash))
        .bind(c.secret_last4.as_deref())
        .bind(opt_hash_bytes(&c.previous_secret_hash))
        .bind(c.previous_secret_expires_at.map(Timestamp::as_millis))
        .bind(opt_to_json(&c.jwks)?)
        .bind(c.access_token_format.as_str())
        .bind(c.signing_alg.as_str())
        .bind(i64::from(c.access_token_ttl_seconds))
        .bind(i64::from(c.refresh_token_ttl_seconds))
        .bind(c.created_at.as_millis())
        .bind(c.updated_at.as_millis())
        .bind(c.version)
        .bind(to_json(&c.exchange_subject_apps)?)
        .bind(c.suspended_at.map(Timestamp::as_millis))
        .bind(c.suspended_reason.as_deref()))
}

#[async_trait]
impl OAuthStore for SqlStore {
    async fn insert_oauth_client(&self, client: &OAuthClient, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        // One statement that writes first: the app must be the client's workspace's own (the
        // foreign key alone would accept another workspace's), and a second client for the app
        // is skipped rather than failing the transaction.
        let sql = format!(
            "INSERT INTO oauth_clients ({CLIENT_COLS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15, $16, $17, $18, $19, $20, $21 WHERE EXISTS (SELECT 1 FROM apps WHERE id = $22 AND workspace_id = $23) \
             ON CONFLICT (app_id) DO NOTHING"
        );
        let done = bind_client(sqlx::query(AssertSqlSafe(sql)), client)?
            .bind(client.app_id.as_str())
            .bind(client.workspace_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 0 {
            let app: Option<String> = sqlx::query_scalar("SELECT id FROM apps WHERE id = $1 AND workspace_id = $2")
                .bind(client.app_id.as_str())
                .bind(client.workspace_id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
            return Err(if app.is_some() { oauth_client_exists() } else { Error::not_found("app") });
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn oauth_client(&self, client_id: &str) -> Result<Option<OAuthClient>> {
        let sql = format!("SELECT {CLIENT_COLS} FROM oauth_clients WHERE client_id = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(client_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::oauth_client)
            .transpose()
    }

    async fn oauth_client_for_app(&self, ws: &WorkspaceId, app_id: &AppId) -> Result<Option<OAuthClient>> {
        let sql = format!("SELECT {CLIENT_COLS} FROM oauth_clients WHERE workspace_id = $1 AND app_id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(app_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::oauth_client)
            .transpose()
    }

    async fn update_oauth_client(&self, c: &OAuthClient, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE oauth_clients SET grant_types = $1, scopes = $2, auth_method = $3, secret_hash = $4, \
             secret_last4 = $5, previous_secret_hash = $6, previous_secret_expires_at = $7, jwks = $8, \
             access_token_format = $9, signing_alg = $10, access_token_ttl_seconds = $11, \
             refresh_token_ttl_seconds = $12, updated_at = $13, version = $14, exchange_subject_apps = $15 \
             WHERE client_id = $16 AND workspace_id = $17 AND version = $18",
        )
        .bind(to_json(&c.grant_types)?)
        .bind(to_json(&c.scopes)?)
        .bind(c.auth_method.as_str())
        .bind(opt_hash_bytes(&c.secret_hash))
        .bind(c.secret_last4.as_deref())
        .bind(opt_hash_bytes(&c.previous_secret_hash))
        .bind(c.previous_secret_expires_at.map(Timestamp::as_millis))
        .bind(opt_to_json(&c.jwks)?)
        .bind(c.access_token_format.as_str())
        .bind(c.signing_alg.as_str())
        .bind(i64::from(c.access_token_ttl_seconds))
        .bind(i64::from(c.refresh_token_ttl_seconds))
        .bind(c.updated_at.as_millis())
        .bind(c.version)
        .bind(to_json(&c.exchange_subject_apps)?)
        .bind(c.client_id.as_str())
        .bind(c.workspace_id.as_str())
        .bind(c.version - 1)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(if client_exists(&mut tx, &c.workspace_id, &c.client_id).await? {
                Error::conflict(
                    "concurrent_update",
                    "the OAuth client changed while this request was processed; read it again and retry",
                )
            } else {
                Error::not_found("oauth client")
            });
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn suspend_oauth_client(
        &self,
        ws: &WorkspaceId,
        client_id: &str,
        reason: Option<&str>,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<Option<ClientSuspension>> {
        let mut tx = self.begin().await?;
        // Taken first, as by every change that may publish on the feed (see delete_app).
        let mut seqs = FeedSeqs::start(&mut tx).await?;
        // The client's row first: from here on no access token can be issued to it (see
        // insert_access_token), so the revocation below leaves none behind.
        let sql = format!(
            "UPDATE oauth_clients SET suspended_at = $1, suspended_reason = $2, updated_at = $1, version = version + 1 \
             WHERE client_id = $3 AND workspace_id = $4 AND suspended_at IS NULL RETURNING {CLIENT_COLS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(now.as_millis())
            .bind(reason)
            .bind(client_id)
            .bind(ws.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        let Some(row) = row else {
            // Dropping the transaction rolls the feed position back too.
            return unchanged_or_missing(&mut tx, ws, client_id).await;
        };
        let client = rows::oauth_client(&row)?;
        let revoked = revoke_live_access_tokens(&mut tx, &mut seqs, ws, &client.app_id, now).await?;
        let mut ev = audit.clone();
        let after = ev.after.get_or_insert_with(|| serde_json::json!({}));
        if let Some(after) = after.as_object_mut() {
            after.insert("access_tokens_revoked".into(), revoked.len().into());
        }
        insert_audit(&mut tx, &self.chain_key(), &ev).await?;
        self.commit(tx, seqs.last()).await?;
        Ok(Some(ClientSuspension { client, revoked: revoked.into_iter().map(|(jti, _)| jti).collect() }))
    }

    async fn resume_oauth_client(
        &self,
        ws: &WorkspaceId,
        client_id: &str,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<Option<OAuthClient>> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "UPDATE oauth_clients SET suspended_at = NULL, suspended_reason = NULL, updated_at = $1, \
             version = version + 1 WHERE client_id = $2 AND workspace_id = $3 AND suspended_at IS NOT NULL \
             RETURNING {CLIENT_COLS}"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(now.as_millis())
            .bind(client_id)
            .bind(ws.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        let Some(row) = row else { return unchanged_or_missing(&mut tx, ws, client_id).await };
        let client = rows::oauth_client(&row)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        Ok(Some(client))
    }

    async fn insert_signing_key(&self, key: &SigningKeyRecord, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let sql =
            format!("INSERT INTO oauth_signing_keys ({SIGNING_KEY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(key.kid.as_str())
            .bind(key.alg.as_str())
            .bind(to_json(&key.public_jwk)?)
            .bind(key.sealed_private.clone())
            .bind(key.created_at.as_millis())
            .bind(key.signs_from.as_millis())
            .bind(key.retired_at.map(Timestamp::as_millis))
            .bind(key.drop_after.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>> {
        let sql = format!("SELECT {SIGNING_KEY_COLS} FROM oauth_signing_keys ORDER BY created_at, kid");
        let found = sqlx::query(AssertSqlSafe(sql)).fetch_all(&self.pool).await.map_err(db_error)?;
        found.iter().map(rows::signing_key).collect()
    }

    async fn update_signing_key(&self, key: &SigningKeyRecord, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("UPDATE oauth_signing_keys SET retired_at = $1, drop_after = $2 WHERE kid = $3")
            .bind(key.retired_at.map(Timestamp::as_millis))
            .bind(key.drop_after.map(Timestamp::as_millis))
            .bind(key.kid.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("signing key"));
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn delete_signing_keys_dropped_before(&self, now: Timestamp) -> Result<u64> {
        let done = sqlx::query("DELETE FROM oauth_signing_keys WHERE drop_after IS NOT NULL AND drop_after < $1")
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn insert_refresh_token(&self, t: &RefreshTokenRecord) -> Result<()> {
        let mut tx = self.begin().await?;
        join_family(&mut tx, &t.family_id, &t.workspace_id, &t.app_id, t.created_at).await?;
        let sql = format!(
            "INSERT INTO oauth_refresh_tokens ({REFRESH_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash_bytes(&t.hash))
            .bind(t.family_id.as_str())
            .bind(t.client_id.as_str())
            .bind(t.workspace_id.as_str())
            .bind(t.app_id.as_str())
            .bind(t.subject.as_str())
            .bind(to_json(&t.scopes)?)
            .bind(t.dpop_jkt.as_deref())
            .bind(t.created_at.as_millis())
            .bind(t.expires_at.as_millis())
            .bind(t.used_at.map(Timestamp::as_millis))
            .bind(t.revoked_at.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.commit(tx, None).await
    }

    async fn refresh_token(&self, hash: &SecretHash) -> Result<Option<RefreshTokenRecord>> {
        let sql = format!("SELECT {REFRESH_COLS} FROM oauth_refresh_tokens WHERE hash = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash_bytes(hash))
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::refresh_token)
            .transpose()
    }

    async fn use_refresh_token(&self, hash: &SecretHash, now: Timestamp) -> Result<RefreshUse> {
        // One conditional statement: of two concurrent uses only one finds the token unused
        // (PostgreSQL re-checks the condition after the row lock; SQLite runs one writer at a time).
        let sql = format!(
            "UPDATE oauth_refresh_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL \
             AND revoked_at IS NULL AND expires_at > $3 RETURNING {REFRESH_COLS}"
        );
        let fresh = sqlx::query(AssertSqlSafe(sql))
            .bind(now.as_millis())
            .bind(hash_bytes(hash))
            .bind(now.as_millis())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        if let Some(row) = fresh {
            return Ok(RefreshUse::Fresh(rows::refresh_token(&row)?));
        }
        Ok(match self.refresh_token(hash).await? {
            Some(t) if t.revoked_at.is_none() && t.used_at.is_some() => RefreshUse::Reused(t),
            _ => RefreshUse::Invalid,
        })
    }

    async fn insert_access_token(&self, t: &AccessTokenRecord) -> Result<()> {
        let mut tx = self.begin().await?;
        if let Some(family) = &t.family_id {
            join_family(&mut tx, family, &t.workspace_id, &t.app_id, t.issued_at).await?;
        }
        // The client's row lock, with its suspension checked under it. Suspending a client changes
        // this row before it revokes the client's access tokens, so on PostgreSQL an issue and a
        // suspension of the same client are serialized by the row lock: a token recorded first
        // is revoked with the rest, and one recorded after is refused here (SQLite runs one writer
        // at a time anyway). The same rule as join_family's for a family's revocation.
        let live =
            sqlx::query("UPDATE oauth_clients SET version = version WHERE client_id = $1 AND suspended_at IS NULL")
                .bind(t.client_id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        if live.rows_affected() == 0 {
            return Err(if client_exists(&mut tx, &t.workspace_id, &t.client_id).await? {
                client_suspended()
            } else {
                Error::not_found("oauth client")
            });
        }
        let sql = format!(
            "INSERT INTO oauth_access_tokens ({ACCESS_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(t.jti.as_str())
            .bind(t.client_id.as_str())
            .bind(t.workspace_id.as_str())
            .bind(t.app_id.as_str())
            .bind(t.family_id.as_deref())
            .bind(t.subject.as_str())
            .bind(to_json(&t.scopes)?)
            .bind(t.dpop_jkt.as_deref())
            .bind(t.issued_at.as_millis())
            .bind(t.expires_at.as_millis())
            .bind(t.revoked_at.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.commit(tx, None).await
    }

    async fn access_token(&self, jti: &str) -> Result<Option<AccessTokenRecord>> {
        let sql = format!("SELECT {ACCESS_COLS} FROM oauth_access_tokens WHERE jti = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(jti)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::access_token)
            .transpose()
    }

    async fn access_tokens_of_family(&self, family_id: &str) -> Result<Vec<AccessTokenRecord>> {
        let sql = format!("SELECT {ACCESS_COLS} FROM oauth_access_tokens WHERE family_id = $1 ORDER BY issued_at, jti");
        let found = sqlx::query(AssertSqlSafe(sql)).bind(family_id).fetch_all(&self.pool).await.map_err(db_error)?;
        found.iter().map(rows::access_token).collect()
    }

    async fn revoke_access_token(&self, jti: &str, now: Timestamp, audit: &NewAuditEvent) -> Result<bool> {
        let mut tx = self.begin().await?;
        let mut seqs = FeedSeqs::start(&mut tx).await?;
        let found = sqlx::query(
            "UPDATE oauth_access_tokens SET revoked_at = $1 WHERE jti = $2 AND revoked_at IS NULL \
             RETURNING jti, expires_at",
        )
        .bind(now.as_millis())
        .bind(jti)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        if found.is_empty() {
            // Dropping the transaction rolls the feed position back too.
            return Ok(false);
        }
        publish_revocations(&mut tx, &mut seqs, &revoked_pairs(&found)?).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, seqs.last()).await?;
        Ok(true)
    }

    async fn revoke_token_family(&self, family_id: &str, now: Timestamp, audit: &NewAuditEvent) -> Result<u64> {
        let mut tx = self.begin().await?;
        let mut seqs = FeedSeqs::start(&mut tx).await?;
        // The family row first: from here on no rotation can add a token to it (see join_family).
        let family =
            sqlx::query("UPDATE oauth_token_families SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
                .bind(now.as_millis())
                .bind(family_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        let refresh =
            sqlx::query("UPDATE oauth_refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
                .bind(now.as_millis())
                .bind(family_id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        let found = sqlx::query(
            "UPDATE oauth_access_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL \
             AND expires_at > $3 RETURNING jti, expires_at",
        )
        .bind(now.as_millis())
        .bind(family_id)
        .bind(now.as_millis())
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        if family.rows_affected() == 0 && refresh.rows_affected() == 0 && found.is_empty() {
            return Ok(0);
        }
        let revoked = revoked_pairs(&found)?;
        publish_revocations(&mut tx, &mut seqs, &revoked).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, seqs.last()).await?;
        Ok(u64::try_from(revoked.len()).unwrap_or(u64::MAX))
    }

    async fn prune_oauth(&self, now: Timestamp) -> Result<u64> {
        let day_ago = now.as_millis().saturating_sub(REFRESH_KEPT_AFTER_EXPIRY_MS);
        let mut deleted = 0;
        // Separate statements, not one transaction: each is complete on its own, and SQLite's
        // single writer is not held across all of them.
        for (sql, at) in [
            ("DELETE FROM oauth_refresh_tokens WHERE expires_at < $1", day_ago),
            ("DELETE FROM oauth_access_tokens WHERE expires_at <= $1", now.as_millis()),
            ("DELETE FROM jti_revocations WHERE expires_at <= $1", now.as_millis()),
            // Last, once their tokens are gone. A family this old with no token left cannot be
            // joined again: a rotation needs a refresh token of the family that has not expired.
            (
                "DELETE FROM oauth_token_families WHERE created_at < $1 \
                 AND NOT EXISTS (SELECT 1 FROM oauth_refresh_tokens r WHERE r.family_id = oauth_token_families.family_id) \
                 AND NOT EXISTS (SELECT 1 FROM oauth_access_tokens a WHERE a.family_id = oauth_token_families.family_id)",
                day_ago,
            ),
        ] {
            let done = sqlx::query(sql).bind(at).execute(&self.pool).await.map_err(db_error)?;
            deleted += done.rows_affected();
        }
        Ok(deleted)
    }
}
