//! [`ApiStore`] for [`SqlStore`]: APIs with a lifecycle and the requests to publish them. Every
//! change of an API takes a change-feed position (`api:<id>` in `route_changes`) in the same
//! transaction as the row and its audit events, so every node's gateway rebuilds its route table
//! with the API's new state.

use async_trait::async_trait;
use keygate_core::apis::{Api, ApiPublishRequest, ApiState, ApiStore, ApiVersion, PublishRequestStatus};
use keygate_core::ids::{ApiId, ApiPublishRequestId, WorkspaceId};
use keygate_core::model::NewAuditEvent;
use keygate_core::subscriptions::ApiAccess;
use keygate_core::{Error, Result};
use sqlx::any::AnyRow;

use crate::db_error;
use crate::routes::{commit_change, delete_in_workspace};
use crate::rows::{get, opt_ts, to_json, ts};
use crate::sql::{FeedSeqs, SqlStore, Tx, insert_audit};

const API_COLS: &str = "id, workspace_id, name, description, openapi, state, deprecated_at, sunset, successor, \
    versions, created_at, updated_at, access";
/// The same without the OpenAPI document (up to 1 MiB each): what lists and the gateway read.
const API_COLS_LEAN: &str = "id, workspace_id, name, description, NULL AS openapi, state, deprecated_at, sunset, \
    successor, versions, created_at, updated_at, access";
const REQ_COLS: &str = "id, workspace_id, api_id, version, requested_by, status, created_at, decided_by, decided_at";

/// What `route_changes` records for a change of API `id`.
fn change_id(id: &ApiId) -> String {
    format!("api:{id}")
}

fn api_exists(name: &str) -> Error {
    Error::conflict("api_exists", format!("this workspace already has an API named {name:?}; choose another name"))
}

fn api_row(row: &AnyRow) -> Result<Api> {
    let state: String = get(row, "state")?;
    let versions: String = get(row, "versions")?;
    Ok(Api {
        id: ApiId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        name: get(row, "name")?,
        description: get(row, "description")?,
        openapi: get(row, "openapi")?,
        state: ApiState::parse(&state).ok_or_else(|| Error::internal("an API has an unknown state"))?,
        deprecated_at: opt_ts(row, "deprecated_at")?,
        sunset: opt_ts(row, "sunset")?,
        successor: get(row, "successor")?,
        versions: serde_json::from_str::<Vec<ApiVersion>>(&versions)
            .map_err(|e| Error::internal(format!("an API's versions are not valid: {e}")))?,
        access: {
            let access: String = get(row, "access")?;
            ApiAccess::parse(&access).ok_or_else(|| Error::internal("an API has an unknown access mode"))?
        },
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

fn request_row(row: &AnyRow) -> Result<ApiPublishRequest> {
    let status: String = get(row, "status")?;
    Ok(ApiPublishRequest {
        id: ApiPublishRequestId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        api_id: ApiId::from_trusted(get(row, "api_id")?),
        version: get(row, "version")?,
        requested_by: get(row, "requested_by")?,
        status: PublishRequestStatus::parse(&status)
            .ok_or_else(|| Error::internal("a publish request has an unknown status"))?,
        created_at: ts(row, "created_at")?,
        decided_by: get(row, "decided_by")?,
        decided_at: opt_ts(row, "decided_at")?,
    })
}

/// Whether another API of the workspace has `name`.
async fn name_taken(tx: &mut Tx, api: &Api) -> Result<bool> {
    let other: Option<String> =
        sqlx::query_scalar("SELECT id FROM apis WHERE workspace_id = $1 AND name = $2 AND id <> $3")
            .bind(api.workspace_id.as_str())
            .bind(api.name.as_str())
            .bind(api.id.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
    Ok(other.is_some())
}

/// Writes every field of `api` but its id, workspace and creation time; `not_found` if the
/// workspace has no such API.
async fn write_api(tx: &mut Tx, api: &Api) -> Result<()> {
    // Another workspace's API is not found, whatever its name would clash with.
    let own: Option<String> = sqlx::query_scalar("SELECT id FROM apis WHERE workspace_id = $1 AND id = $2")
        .bind(api.workspace_id.as_str())
        .bind(api.id.as_str())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db_error)?;
    if own.is_none() {
        return Err(Error::not_found("api"));
    }
    if name_taken(tx, api).await? {
        return Err(api_exists(&api.name));
    }
    let done = sqlx::query(
        "UPDATE apis SET name = $1, description = $2, openapi = $3, state = $4, deprecated_at = $5, sunset = $6, \
         successor = $7, versions = $8, updated_at = $9, access = $12 WHERE workspace_id = $10 AND id = $11",
    )
    .bind(api.name.as_str())
    .bind(api.description.as_str())
    .bind(api.openapi.as_deref())
    .bind(api.state.as_str())
    .bind(api.deprecated_at.map(|t| t.as_millis()))
    .bind(api.sunset.map(|t| t.as_millis()))
    .bind(api.successor.as_deref())
    .bind(to_json(&api.versions)?)
    .bind(api.updated_at.as_millis())
    .bind(api.workspace_id.as_str())
    .bind(api.id.as_str())
    .bind(api.access.as_str())
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Err(Error::not_found("api"));
    }
    Ok(())
}

/// Ends a change of API `api`: all but the last of `audits` written here, the last with the feed
/// position and the commit.
async fn commit_api_change(
    store: &SqlStore,
    mut tx: Tx,
    seqs: FeedSeqs,
    api: &Api,
    audits: &[NewAuditEvent],
) -> Result<()> {
    let Some((last, first)) = audits.split_last() else {
        return Err(Error::internal("an API change without an audit event"));
    };
    for a in first {
        insert_audit(&mut tx, &store.chain_key(), a).await?;
    }
    commit_change(store, tx, seqs, &change_id(&api.id), api.updated_at, last).await
}

#[async_trait]
impl ApiStore for SqlStore {
    async fn insert_api(&self, api: &Api, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        if name_taken(&mut tx, api).await? {
            return Err(api_exists(&api.name));
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO apis ({API_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        )))
        .bind(api.id.as_str())
        .bind(api.workspace_id.as_str())
        .bind(api.name.as_str())
        .bind(api.description.as_str())
        .bind(api.openapi.as_deref())
        .bind(api.state.as_str())
        .bind(api.deprecated_at.map(|t| t.as_millis()))
        .bind(api.sunset.map(|t| t.as_millis()))
        .bind(api.successor.as_deref())
        .bind(to_json(&api.versions)?)
        .bind(api.created_at.as_millis())
        .bind(api.updated_at.as_millis())
        .bind(api.access.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        commit_change(self, tx, seqs, &change_id(&api.id), api.updated_at, audit).await
    }

    async fn update_api(&self, api: &Api, audits: &[NewAuditEvent]) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        write_api(&mut tx, api).await?;
        commit_api_change(self, tx, seqs, api, audits).await
    }

    async fn delete_api(&self, ws: &WorkspaceId, id: &ApiId, audit: &NewAuditEvent) -> Result<bool> {
        // Its requests first (a request of a missing API is nothing to decide); if the API is
        // not the workspace's, nothing of another workspace is touched (the filter names `ws`).
        for table in ["api_publish_requests", "api_subscriptions"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE workspace_id = $1 AND api_id = $2")))
                .bind(ws.as_str())
                .bind(id.as_str())
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
        }
        delete_in_workspace(self, "apis", ws, id.as_str(), &change_id(id), audit).await
    }

    async fn api(&self, ws: &WorkspaceId, id: &ApiId) -> Result<Option<Api>> {
        self.one_in_workspace(&format!("SELECT {API_COLS} FROM apis"), ws, id.as_str(), api_row).await
    }

    async fn list_apis(&self, ws: &WorkspaceId) -> Result<Vec<Api>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {API_COLS_LEAN} FROM apis WHERE workspace_id = $1 ORDER BY name"
        )))
        .bind(ws.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(api_row).collect()
    }

    async fn all_apis(&self) -> Result<Vec<Api>> {
        let rows =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {API_COLS_LEAN} FROM apis ORDER BY workspace_id, name")))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        rows.iter().map(api_row).collect()
    }

    async fn insert_publish_request(&self, r: &ApiPublishRequest, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO api_publish_requests ({REQ_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )))
        .bind(r.id.as_str())
        .bind(r.workspace_id.as_str())
        .bind(r.api_id.as_str())
        .bind(r.version.as_deref())
        .bind(r.requested_by.as_str())
        .bind(r.status.as_str())
        .bind(r.created_at.as_millis())
        .bind(r.decided_by.as_deref())
        .bind(r.decided_at.map(|t| t.as_millis()))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn publish_request(&self, ws: &WorkspaceId, id: &ApiPublishRequestId) -> Result<Option<ApiPublishRequest>> {
        self.one_in_workspace(&format!("SELECT {REQ_COLS} FROM api_publish_requests"), ws, id.as_str(), request_row)
            .await
    }

    async fn publish_requests(
        &self,
        ws: &WorkspaceId,
        status: Option<PublishRequestStatus>,
    ) -> Result<Vec<ApiPublishRequest>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REQ_COLS} FROM api_publish_requests WHERE workspace_id = $1 AND ($2 = '' OR status = $2) \
             ORDER BY created_at DESC, id DESC LIMIT 500"
        )))
        .bind(ws.as_str())
        .bind(status.map(PublishRequestStatus::as_str).unwrap_or_default())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(request_row).collect()
    }

    async fn decide_publish_request(
        &self,
        decided: &ApiPublishRequest,
        api: Option<&Api>,
        audits: &[NewAuditEvent],
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        let seqs = FeedSeqs::start(&mut tx).await?;
        // Only a pending request is decided: whoever decides second finds it decided.
        let done = sqlx::query(
            "UPDATE api_publish_requests SET status = $1, decided_by = $2, decided_at = $3 \
             WHERE workspace_id = $4 AND id = $5 AND status = 'pending'",
        )
        .bind(decided.status.as_str())
        .bind(decided.decided_by.as_deref())
        .bind(decided.decided_at.map(|t| t.as_millis()))
        .bind(decided.workspace_id.as_str())
        .bind(decided.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::conflict("request_decided", "this request was decided already"));
        }
        match api {
            Some(api) => {
                write_api(&mut tx, api).await?;
                commit_api_change(self, tx, seqs, api, audits).await
            }
            None => {
                for a in audits {
                    insert_audit(&mut tx, &self.chain_key(), a).await?;
                }
                self.commit(tx, None).await
            }
        }
    }
}
