//! [`SubscriptionStore`] for [`SqlStore`]: apps' subscriptions to APIs. Every change takes a
//! change-feed position (`subscription:<id>` in `route_changes`) in the same transaction as the
//! row and its audit event, so every node's gateway rebuilds its table with the subscriptions
//! that are active.

use async_trait::async_trait;
use keygate_core::ids::{ApiId, AppId, PlanId, SubscriptionId, WorkspaceId};
use keygate_core::model::NewAuditEvent;
use keygate_core::subscriptions::{
    Subscription, SubscriptionFilter, SubscriptionGrant, SubscriptionStatus, SubscriptionStore,
};
use keygate_core::{Error, Result};
use sqlx::any::AnyRow;

use crate::db_error;
use crate::routes::commit_change;
use crate::rows::{get, opt_json, opt_ts, ts};
use crate::sql::{FeedSeqs, SqlStore};

const COLS: &str = "id, workspace_id, app_id, api_id, version, plan_id, status, requested_by, created_at, decided_by, decided_at, reason";

/// What `route_changes` records for a change of subscription `id`.
fn change_id(id: &SubscriptionId) -> String {
    format!("subscription:{id}")
}

fn subscription_exists() -> Error {
    Error::conflict(
        "subscription_exists",
        "this app already has a pending or active subscription to this API (and version); cancel it first",
    )
}

fn row(r: &AnyRow) -> Result<Subscription> {
    let status: String = get(r, "status")?;
    Ok(Subscription {
        id: SubscriptionId::from_trusted(get(r, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(r, "workspace_id")?),
        app_id: AppId::from_trusted(get(r, "app_id")?),
        api_id: ApiId::from_trusted(get(r, "api_id")?),
        version: get(r, "version")?,
        plan_id: get::<Option<String>>(r, "plan_id")?.map(PlanId::from_trusted),
        status: SubscriptionStatus::parse(&status)
            .ok_or_else(|| Error::internal("a subscription has an unknown status"))?,
        requested_by: get(r, "requested_by")?,
        created_at: ts(r, "created_at")?,
        decided_by: get(r, "decided_by")?,
        decided_at: opt_ts(r, "decided_at")?,
        reason: get(r, "reason")?,
    })
}

#[async_trait]
impl SubscriptionStore for SqlStore {
    async fn insert_subscription(&self, s: &Subscription, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        // The unique index decides between two nodes; this check gives the common case its
        // own message without relying on the engine's error.
        if s.status.is_live() {
            let live: Option<String> = sqlx::query_scalar(
                "SELECT id FROM api_subscriptions WHERE app_id = $1 AND api_id = $2 AND COALESCE(version, '') = $3 \
                 AND status IN ('pending', 'active')",
            )
            .bind(s.app_id.as_str())
            .bind(s.api_id.as_str())
            .bind(s.version.as_deref().unwrap_or_default())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            if live.is_some() {
                return Err(subscription_exists());
            }
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO api_subscriptions ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        )))
        .bind(s.id.as_str())
        .bind(s.workspace_id.as_str())
        .bind(s.app_id.as_str())
        .bind(s.api_id.as_str())
        .bind(s.version.as_deref())
        .bind(s.plan_id.as_ref().map(PlanId::as_str))
        .bind(s.status.as_str())
        .bind(s.requested_by.as_str())
        .bind(s.created_at.as_millis())
        .bind(s.decided_by.as_deref())
        .bind(s.decided_at.map(|t| t.as_millis()))
        .bind(s.reason.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(|e| match db_error(e) {
            e if e.code == "already_exists" => subscription_exists(),
            e => e,
        })?;
        commit_change(self, tx, seqs, &change_id(&s.id), s.created_at, audit).await
    }

    async fn update_subscription(
        &self,
        s: &Subscription,
        from: SubscriptionStatus,
        audit: &NewAuditEvent,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        // Only from the state the caller saw: whoever decides second finds it changed.
        let done = sqlx::query(
            "UPDATE api_subscriptions SET status = $1, decided_by = $2, decided_at = $3, reason = $4 \
             WHERE workspace_id = $5 AND id = $6 AND status = $7",
        )
        .bind(s.status.as_str())
        .bind(s.decided_by.as_deref())
        .bind(s.decided_at.map(|t| t.as_millis()))
        .bind(s.reason.as_deref())
        .bind(s.workspace_id.as_str())
        .bind(s.id.as_str())
        .bind(from.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict(
                "subscription_changed",
                "this subscription was changed meanwhile (approved, rejected or cancelled); read it again",
            ));
        }
        let at = s.decided_at.unwrap_or(audit.at);
        commit_change(self, tx, seqs, &change_id(&s.id), at, audit).await
    }

    async fn subscription(&self, ws: &WorkspaceId, id: &SubscriptionId) -> Result<Option<Subscription>> {
        self.one_in_workspace(&format!("SELECT {COLS} FROM api_subscriptions"), ws, id.as_str(), row).await
    }

    async fn list_subscriptions(&self, ws: &WorkspaceId, f: &SubscriptionFilter) -> Result<Vec<Subscription>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM api_subscriptions WHERE workspace_id = $1 AND ($2 = '' OR app_id = $2) \
             AND ($3 = '' OR api_id = $3) AND ($4 = '' OR status = $4) ORDER BY created_at DESC, id DESC LIMIT 1000"
        )))
        .bind(ws.as_str())
        .bind(f.app_id.as_ref().map(AppId::as_str).unwrap_or_default())
        .bind(f.api_id.as_ref().map(ApiId::as_str).unwrap_or_default())
        .bind(f.status.map(SubscriptionStatus::as_str).unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(row).collect()
    }

    async fn count_app_subscriptions(&self, ws: &WorkspaceId, app: &AppId) -> Result<usize> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM api_subscriptions WHERE workspace_id = $1 AND app_id = $2")
                .bind(ws.as_str())
                .bind(app.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn active_subscriptions(&self) -> Result<Vec<SubscriptionGrant>> {
        // The plan's limits as the plans table keeps them (JSON text); a deleted plan, none.
        let rows = sqlx::query(
            "SELECT s.id, s.workspace_id, s.app_id, s.api_id, s.version, p.rate_limit, p.quota \
             FROM api_subscriptions s LEFT JOIN plans p ON p.id = s.plan_id AND p.workspace_id = s.workspace_id \
             WHERE s.status = 'active' ORDER BY s.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(SubscriptionGrant {
                    id: SubscriptionId::from_trusted(get(r, "id")?),
                    workspace_id: WorkspaceId::from_trusted(get(r, "workspace_id")?),
                    app_id: AppId::from_trusted(get(r, "app_id")?),
                    api_id: ApiId::from_trusted(get(r, "api_id")?),
                    version: get(r, "version")?,
                    rate_limit: opt_json(r, "rate_limit")?,
                    quota: opt_json(r, "quota")?,
                })
            })
            .collect()
    }
}
