//! [`AccountStore`] for [`SqlStore`]: dashboard users, memberships, recovery codes, sessions,
//! invitations, workspace policies, plan requests and app owners. Same rules as `sql.rs`: `$n` placeholders in
//! the SQL both engines share, booleans as BIGINT 0/1, and every change that takes an audit event
//! writes it in the same transaction. Sessions and recovery codes carry no audit events.

use async_trait::async_trait;
use keygate_core::account::{
    AccountStore, Invitation, Membership, PlanRequest, PlanRequestStatus, Session, User, WorkspacePolicy,
};
use keygate_core::ids::{AppId, InvitationId, PlanRequestId, UserId, WorkspaceId};
use keygate_core::model::NewAuditEvent;
use keygate_core::secret::SecretHash;
use keygate_core::{Error, ErrorKind, Result, Timestamp};
use sqlx::{AssertSqlSafe, Row};

use crate::db_error;
use crate::rows;
use crate::sql::{SqlStore, Tx, insert_audit};

// As in `sql.rs`: SQL passed as `AssertSqlSafe` is built only from these constants.
const USER_COLS: &str =
    "id, email, name, password_hash, totp_sealed, totp_enabled, totp_last_step, disabled, created_at, updated_at";
const MEMBERSHIP_COLS: &str = "workspace_id, user_id, role, created_at";
const SESSION_COLS: &str = "id_hash, user_id, workspace_id, pending_mfa, created_at, last_seen_at, expires_at, ip";
const INVITATION_COLS: &str =
    "id, workspace_id, email, role, code_hash, invited_by, created_at, expires_at, accepted_at";
const PLAN_REQUEST_COLS: &str =
    "id, workspace_id, app_id, plan_id, requested_by, note, status, created_at, decided_by, decided_at";

fn email_taken() -> Error {
    Error::conflict("email_taken", "an account with this email address already exists")
}

/// Inserts the user row; a taken email (the only unique key a fresh random id can hit) is
/// `email_taken`.
async fn insert_user_row(tx: &mut Tx, u: &User) -> Result<()> {
    let sql = format!("INSERT INTO users ({USER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
    sqlx::query(AssertSqlSafe(sql))
        .bind(u.id.as_str())
        .bind(u.email.as_str())
        .bind(u.name.as_str())
        .bind(u.password_hash.as_str())
        .bind(u.totp_sealed.clone())
        .bind(i64::from(u.totp_enabled))
        .bind(u.totp_last_step)
        .bind(i64::from(u.disabled))
        .bind(u.created_at.as_millis())
        .bind(u.updated_at.as_millis())
        .execute(&mut **tx)
        .await
        .map_err(|e| match db_error(e) {
            c if c.kind == ErrorKind::Conflict => email_taken(),
            other => other,
        })?;
    Ok(())
}

/// Inserts a membership that must be new: a person already in the workspace is `already_member`.
async fn insert_membership_row(tx: &mut Tx, m: &Membership) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO memberships (workspace_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (workspace_id, user_id) DO NOTHING",
    )
    .bind(m.workspace_id.as_str())
    .bind(m.user_id.as_str())
    .bind(m.role.as_str())
    .bind(m.created_at.as_millis())
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Err(Error::conflict("already_member", "this person is already a member of the workspace"));
    }
    Ok(())
}

fn hash_bytes(h: &SecretHash) -> Vec<u8> {
    h.as_bytes().to_vec()
}

impl SqlStore {
    async fn one_user(&self, column: &str, value: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE {column} = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(value)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::user)
            .transpose()
    }
}

#[async_trait]
impl AccountStore for SqlStore {
    async fn user_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await.map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn insert_user(&self, user: &User, membership: &Membership, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_user_row(&mut tx, user).await?;
        insert_membership_row(&mut tx, membership).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn user(&self, id: &UserId) -> Result<Option<User>> {
        self.one_user("id", id.as_str()).await
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>> {
        self.one_user("email", email).await
    }

    async fn update_user(&self, user: &User, audit: Option<&NewAuditEvent>) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE users SET name = $1, password_hash = $2, totp_sealed = $3, totp_enabled = $4, \
             totp_last_step = $5, disabled = $6, updated_at = $7 WHERE id = $8",
        )
        .bind(user.name.as_str())
        .bind(user.password_hash.as_str())
        .bind(user.totp_sealed.clone())
        .bind(i64::from(user.totp_enabled))
        .bind(user.totp_last_step)
        .bind(i64::from(user.disabled))
        .bind(user.updated_at.as_millis())
        .bind(user.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("user"));
        }
        if let Some(audit) = audit {
            insert_audit(&mut tx, &self.chain_key(), audit).await?;
        }
        self.commit(tx, None).await
    }

    async fn advance_totp_step(&self, id: &UserId, step: i64) -> Result<bool> {
        // One conditional statement: of two requests with the same code, only one moves the step.
        let done = sqlx::query("UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $3")
            .bind(step)
            .bind(id.as_str())
            .bind(step)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn memberships(&self, user: &UserId) -> Result<Vec<Membership>> {
        let sql =
            format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE user_id = $1 ORDER BY created_at, workspace_id");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(user.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::membership).collect()
    }

    async fn membership(&self, ws: &WorkspaceId, user: &UserId) -> Result<Option<Membership>> {
        let sql = format!("SELECT {MEMBERSHIP_COLS} FROM memberships WHERE workspace_id = $1 AND user_id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::membership)
            .transpose()
    }

    async fn members(&self, ws: &WorkspaceId) -> Result<Vec<(Membership, User)>> {
        let user_cols: Vec<String> = USER_COLS.split(", ").map(|c| format!("u.{c}")).collect();
        let sql = format!(
            "SELECT m.workspace_id, m.user_id, m.role, m.created_at AS member_since, {} FROM memberships m \
             JOIN users u ON u.id = m.user_id WHERE m.workspace_id = $1 ORDER BY m.created_at, m.user_id",
            user_cols.join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(|r| Ok((rows::membership_at(r, "member_since")?, rows::user(r)?))).collect()
    }

    async fn put_membership(&self, m: &Membership, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO memberships (workspace_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(m.workspace_id.as_str())
        .bind(m.user_id.as_str())
        .bind(m.role.as_str())
        .bind(m.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn delete_membership(&self, ws: &WorkspaceId, user: &UserId, audit: &NewAuditEvent) -> Result<bool> {
        self.delete_in_workspace(
            "DELETE FROM memberships WHERE workspace_id = $1 AND user_id = $2",
            &["DELETE FROM sessions WHERE workspace_id = $1 AND user_id = $2"],
            ws,
            user.as_str(),
            audit,
        )
        .await
    }

    async fn set_recovery_codes(&self, user: &UserId, codes: &[SecretHash], at: Timestamp) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        for code in codes {
            sqlx::query("INSERT INTO recovery_codes (user_id, code_hash, created_at) VALUES ($1, $2, $3)")
                .bind(user.as_str())
                .bind(hash_bytes(code))
                .bind(at.as_millis())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        self.commit(tx, None).await
    }

    async fn use_recovery_code(&self, user: &UserId, code: &SecretHash, at: Timestamp) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_at = $1 WHERE user_id = $2 AND code_hash = $3 AND used_at IS NULL",
        )
        .bind(at.as_millis())
        .bind(user.as_str())
        .bind(hash_bytes(code))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn recovery_codes_left(&self, user: &UserId) -> Result<u32> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL")
            .bind(user.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    async fn insert_session(&self, s: &Session) -> Result<()> {
        let sql = format!("INSERT INTO sessions ({SESSION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash_bytes(&s.id_hash))
            .bind(s.user_id.as_str())
            .bind(s.workspace_id.as_str())
            .bind(i64::from(s.pending_mfa))
            .bind(s.created_at.as_millis())
            .bind(s.last_seen_at.as_millis())
            .bind(s.expires_at.as_millis())
            .bind(s.ip.as_deref())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn session(&self, id_hash: &SecretHash) -> Result<Option<Session>> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id_hash = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash_bytes(id_hash))
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::session)
            .transpose()
    }

    async fn update_session(&self, s: &Session) -> Result<()> {
        // A session deleted meanwhile (sign-out, purge) stays deleted: no row, no error.
        sqlx::query("UPDATE sessions SET last_seen_at = $1, pending_mfa = $2, workspace_id = $3 WHERE id_hash = $4")
            .bind(s.last_seen_at.as_millis())
            .bind(i64::from(s.pending_mfa))
            .bind(s.workspace_id.as_str())
            .bind(hash_bytes(&s.id_hash))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn delete_session(&self, id_hash: &SecretHash) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(hash_bytes(id_hash))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn delete_user_sessions(&self, user: &UserId) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user.as_str())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn purge_sessions(&self, now: Timestamp, idle_before: Timestamp) -> Result<u64> {
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at < $2")
            .bind(now.as_millis())
            .bind(idle_before.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn insert_invitation(&self, inv: &Invitation, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let sql = format!("INSERT INTO invitations ({INVITATION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(inv.id.as_str())
            .bind(inv.workspace_id.as_str())
            .bind(inv.email.as_str())
            .bind(inv.role.as_str())
            .bind(hash_bytes(&inv.code_hash))
            .bind(inv.invited_by.as_str())
            .bind(inv.created_at.as_millis())
            .bind(inv.expires_at.as_millis())
            .bind(inv.accepted_at.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn invitation_by_code(&self, code_hash: &SecretHash) -> Result<Option<Invitation>> {
        let sql = format!("SELECT {INVITATION_COLS} FROM invitations WHERE code_hash = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash_bytes(code_hash))
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::invitation)
            .transpose()
    }

    async fn invitations(&self, ws: &WorkspaceId) -> Result<Vec<Invitation>> {
        let sql = format!("SELECT {INVITATION_COLS} FROM invitations WHERE workspace_id = $1 ORDER BY created_at, id");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::invitation).collect()
    }

    async fn accept_invitation(
        &self,
        inv: &Invitation,
        new_user: Option<&User>,
        membership: &Membership,
        audit: &NewAuditEvent,
    ) -> Result<()> {
        if membership.workspace_id != inv.workspace_id {
            return Err(Error::internal("an invitation was accepted into another workspace than its own"));
        }
        let accepted_at = inv.accepted_at.unwrap_or(membership.created_at);
        let mut tx = self.begin().await?;
        // The claim comes first and is conditional: of two concurrent acceptances one updates the
        // row and the other finds `accepted_at` set (PostgreSQL re-checks it after the row lock;
        // SQLite runs one writer at a time).
        let done = sqlx::query(
            "UPDATE invitations SET accepted_at = $1 WHERE id = $2 AND workspace_id = $3 AND accepted_at IS NULL",
        )
        .bind(accepted_at.as_millis())
        .bind(inv.id.as_str())
        .bind(inv.workspace_id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT id FROM invitations WHERE id = $1 AND workspace_id = $2")
                    .bind(inv.id.as_str())
                    .bind(inv.workspace_id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
            return Err(match exists {
                Some(_) => Error::conflict("invitation_accepted", "this invitation has already been accepted"),
                None => Error::not_found("invitation"),
            });
        }
        if let Some(user) = new_user {
            insert_user_row(&mut tx, user).await?;
        }
        insert_membership_row(&mut tx, membership).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn delete_invitation(&self, ws: &WorkspaceId, id: &InvitationId, audit: &NewAuditEvent) -> Result<bool> {
        self.delete_in_workspace(
            "DELETE FROM invitations WHERE workspace_id = $1 AND id = $2",
            &[],
            ws,
            id.as_str(),
            audit,
        )
        .await
    }

    async fn workspace_policy(&self, ws: &WorkspaceId) -> Result<WorkspacePolicy> {
        let row = sqlx::query(
            "SELECT max_token_lifetime_days, require_two_factor, plan_changes_need_approval, exposure_action, \
             max_token_age_days, suspend_unrotated, anomaly_suspend, rules, api_publish_needs_approval \
             FROM workspace_policies WHERE workspace_id = $1",
        )
        .bind(ws.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(row.as_ref().map(rows::workspace_policy).transpose()?.unwrap_or_default())
    }

    async fn record_rotation_notice(
        &self,
        token: &keygate_core::ids::TokenId,
        kind: &str,
        at: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO rotation_notices (token_id, kind, at) VALUES ($1, $2, $3) ON CONFLICT (token_id, kind) DO NOTHING",
        )
        .bind(token.as_str())
        .bind(kind)
        .bind(at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        Ok(true)
    }

    async fn workspace_denylists(&self) -> Result<Vec<(WorkspaceId, Vec<String>)>> {
        let rows = sqlx::query("SELECT workspace_id, rules FROM workspace_policies WHERE rules IS NOT NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        let mut out = Vec::new();
        for r in &rows {
            let rules: keygate_core::account::TokenRules = crate::rows::opt_json(r, "rules")?.unwrap_or_default();
            if !rules.deny.is_empty() {
                let ws: String = r.try_get("workspace_id").map_err(db_error)?;
                out.push((WorkspaceId::from_trusted(ws), rules.deny));
            }
        }
        Ok(out)
    }

    async fn put_workspace_policy(&self, ws: &WorkspaceId, p: &WorkspacePolicy, audit: &NewAuditEvent) -> Result<()> {
        // A change to the denylist is a change of the gateway's route table (every node's). Read
        // before the transaction (see `SqlStore::update_app`: SQLite's lock upgrade).
        let old: Option<keygate_core::account::TokenRules> =
            match sqlx::query("SELECT rules FROM workspace_policies WHERE workspace_id = $1")
                .bind(ws.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?
            {
                Some(r) => crate::rows::opt_json(&r, "rules")?,
                None => None,
            };
        let deny_changed = old.map(|o| o.deny).unwrap_or_default() != p.rules.deny;
        let mut tx = self.begin().await?;
        let seqs = if deny_changed { Some(crate::sql::FeedSeqs::start(&mut tx).await?) } else { None };
        sqlx::query(
            "INSERT INTO workspace_policies \
             (workspace_id, max_token_lifetime_days, require_two_factor, plan_changes_need_approval, exposure_action, \
             max_token_age_days, suspend_unrotated, anomaly_suspend, rules, api_publish_needs_approval) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (workspace_id) DO UPDATE SET \
             max_token_lifetime_days = excluded.max_token_lifetime_days, \
             require_two_factor = excluded.require_two_factor, \
             plan_changes_need_approval = excluded.plan_changes_need_approval, \
             exposure_action = excluded.exposure_action, \
             max_token_age_days = excluded.max_token_age_days, \
             suspend_unrotated = excluded.suspend_unrotated, \
             anomaly_suspend = excluded.anomaly_suspend, \
             rules = excluded.rules, \
             api_publish_needs_approval = excluded.api_publish_needs_approval",
        )
        .bind(ws.as_str())
        .bind(p.max_token_lifetime_days.map(i64::from))
        .bind(i64::from(p.require_two_factor))
        .bind(i64::from(p.plan_changes_need_approval))
        .bind(p.exposure_action.as_str())
        .bind(p.max_token_age_days.map(i64::from))
        .bind(i64::from(p.suspend_unrotated))
        .bind(p.anomaly_suspend.map(|s| s.as_str()))
        .bind(crate::rows::to_json(&p.rules)?)
        .bind(i64::from(p.api_publish_needs_approval))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(seqs) = seqs {
            return crate::routes::commit_change(self, tx, seqs, &format!("policy:{ws}"), audit.at, audit).await;
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn insert_plan_request(&self, r: &PlanRequest, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        // The app and the plan must be the request's workspace's own; the foreign keys alone
        // would accept another workspace's.
        for (table, id, what) in [("apps", r.app_id.as_str(), "app"), ("plans", r.plan_id.as_str(), "plan")] {
            let sql = format!("SELECT id FROM {table} WHERE workspace_id = $1 AND id = $2");
            let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(r.workspace_id.as_str())
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
            if found.is_none() {
                return Err(Error::not_found(what));
            }
        }
        let sql =
            format!("INSERT INTO plan_requests ({PLAN_REQUEST_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(r.id.as_str())
            .bind(r.workspace_id.as_str())
            .bind(r.app_id.as_str())
            .bind(r.plan_id.as_str())
            .bind(r.requested_by.as_str())
            .bind(r.note.as_deref())
            .bind(r.status.as_str())
            .bind(r.created_at.as_millis())
            .bind(r.decided_by.as_ref().map(UserId::as_str))
            .bind(r.decided_at.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn plan_request(&self, ws: &WorkspaceId, id: &PlanRequestId) -> Result<Option<PlanRequest>> {
        let sql = format!("SELECT {PLAN_REQUEST_COLS} FROM plan_requests WHERE workspace_id = $1 AND id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::plan_request)
            .transpose()
    }

    async fn plan_requests(&self, ws: &WorkspaceId, status: Option<PlanRequestStatus>) -> Result<Vec<PlanRequest>> {
        let rows = match status {
            None => {
                let sql = format!(
                    "SELECT {PLAN_REQUEST_COLS} FROM plan_requests WHERE workspace_id = $1 \
                     ORDER BY created_at DESC, id DESC"
                );
                sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await
            }
            Some(status) => {
                let sql = format!(
                    "SELECT {PLAN_REQUEST_COLS} FROM plan_requests WHERE workspace_id = $1 AND status = $2 \
                     ORDER BY created_at DESC, id DESC"
                );
                sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).bind(status.as_str()).fetch_all(&self.pool).await
            }
        }
        .map_err(db_error)?;
        rows.iter().map(rows::plan_request).collect()
    }

    async fn decide_plan_request(
        &self,
        ws: &WorkspaceId,
        id: &PlanRequestId,
        status: PlanRequestStatus,
        by: &UserId,
        at: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<()> {
        if status == PlanRequestStatus::Pending {
            return Err(Error::invalid("invalid_decision", "a plan request is decided by approving or denying it"));
        }
        let mut tx = self.begin().await?;
        // One conditional statement: of two concurrent decisions only one finds the request
        // pending (PostgreSQL re-checks the condition after the row lock; SQLite runs one writer
        // at a time).
        let done = sqlx::query(
            "UPDATE plan_requests SET status = $1, decided_by = $2, decided_at = $3 \
             WHERE workspace_id = $4 AND id = $5 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(by.as_str())
        .bind(at.as_millis())
        .bind(ws.as_str())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT id FROM plan_requests WHERE workspace_id = $1 AND id = $2")
                    .bind(ws.as_str())
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
            return Err(match exists {
                Some(_) => Error::conflict("already_decided", "this plan request has already been decided"),
                None => Error::not_found("plan request"),
            });
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn app_owner(&self, ws: &WorkspaceId, app: &AppId) -> Result<Option<UserId>> {
        let owner: Option<String> =
            sqlx::query_scalar("SELECT user_id FROM app_owners WHERE workspace_id = $1 AND app_id = $2")
                .bind(ws.as_str())
                .bind(app.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(owner.map(UserId::from_trusted))
    }

    async fn set_app_owner(&self, ws: &WorkspaceId, app: &AppId, owner: &UserId) -> Result<()> {
        let mut tx = self.begin().await?;
        // Only an app of this workspace can be given an owner here.
        let found: Option<String> = sqlx::query_scalar("SELECT id FROM apps WHERE workspace_id = $1 AND id = $2")
            .bind(ws.as_str())
            .bind(app.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        if found.is_none() {
            return Err(Error::not_found("app"));
        }
        sqlx::query(
            "INSERT INTO app_owners (workspace_id, app_id, user_id) VALUES ($1, $2, $3) \
             ON CONFLICT (app_id) DO UPDATE SET user_id = excluded.user_id",
        )
        .bind(ws.as_str())
        .bind(app.as_str())
        .bind(owner.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        self.commit(tx, None).await
    }

    async fn owned_apps(&self, ws: &WorkspaceId, user: &UserId) -> Result<Vec<AppId>> {
        let rows =
            sqlx::query("SELECT app_id FROM app_owners WHERE workspace_id = $1 AND user_id = $2 ORDER BY app_id")
                .bind(ws.as_str())
                .bind(user.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        rows.iter().map(|r| Ok(AppId::from_trusted(r.try_get("app_id").map_err(db_error)?))).collect()
    }
}
