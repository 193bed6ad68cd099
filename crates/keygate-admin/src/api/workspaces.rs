//! `/admin/v1/workspaces…`: the instance's workspaces, managed with a root key of the default
//! workspace (`workspaces:read`, `workspaces:write`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::ids::WorkspaceId;
use keygate_core::model::Workspace;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, Auth, WorkspacesRead, WorkspacesWrite};

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceView {
    pub id: String,
    pub name: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: keygate_core::Timestamp,
}

impl From<&Workspace> for WorkspaceView {
    fn from(w: &Workspace) -> Self {
        Self { id: w.id.to_string(), name: w.name.clone(), created_at: w.created_at }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceList {
    pub data: Vec<WorkspaceView>,
}

/// A workspace's name: 1 to 200 characters, no control characters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceNameRequest {
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteWorkspaceQuery {
    /// Revoke the workspace's tokens with it. Without it, a workspace that still holds tokens
    /// that can authenticate is not deleted (409 `workspace_has_tokens`).
    #[serde(default)]
    pub revoke_tokens: bool,
}

/// What deleting a workspace revoked and removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceDeletionView {
    pub tokens_revoked: u64,
    pub root_keys_revoked: u64,
    pub routes_deleted: u64,
    pub oauth_clients_deleted: u64,
}

fn workspace_id(raw: &str) -> Result<WorkspaceId, ApiError> {
    WorkspaceId::parse(raw).ok_or_else(|| Error::not_found("workspace").into())
}

#[utoipa::path(get, path = "/admin/v1/workspaces", tag = "workspaces",
    responses((status = 200, body = WorkspaceList)))]
pub(crate) async fn list_workspaces(
    auth: Auth<WorkspacesRead>,
    State(s): State<AdminState>,
) -> Result<Json<WorkspaceList>, ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    let all = s.admin.list_workspaces().await?;
    Ok(Json(WorkspaceList { data: all.iter().map(WorkspaceView::from).collect() }))
}

#[utoipa::path(post, path = "/admin/v1/workspaces", tag = "workspaces", request_body = WorkspaceNameRequest,
    responses((status = 201, body = WorkspaceView), (status = 400, body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody)))]
pub(crate) async fn create_workspace(
    auth: Auth<WorkspacesWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<WorkspaceNameRequest>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    let ws = s.admin.create_workspace(&auth.actor, &req.name).await?;
    Ok((StatusCode::CREATED, Json(WorkspaceView::from(&ws))))
}

#[utoipa::path(get, path = "/admin/v1/workspaces/{id}", tag = "workspaces", params(("id" = String, Path, description = "ws_…")),
    responses((status = 200, body = WorkspaceView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_workspace(
    auth: Auth<WorkspacesRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<WorkspaceView>, ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    Ok(Json(WorkspaceView::from(&s.admin.workspace(&workspace_id(&id)?).await?)))
}

#[utoipa::path(patch, path = "/admin/v1/workspaces/{id}", tag = "workspaces", params(("id" = String, Path)),
    request_body = WorkspaceNameRequest,
    responses((status = 200, body = WorkspaceView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The name is taken, the default workspace, or one the configuration names", body = ErrorBody)))]
pub(crate) async fn rename_workspace(
    auth: Auth<WorkspacesWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<WorkspaceNameRequest>,
) -> Result<Json<WorkspaceView>, ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    let ws = s.admin.rename_workspace(&auth.actor, &workspace_id(&id)?, &req.name).await?;
    Ok(Json(WorkspaceView::from(&ws)))
}

/// Deletes a workspace. One that still holds tokens is deleted only with `revoke_tokens=true`,
/// which revokes them (and its root keys, OAuth tokens and routes) in the same transaction.
#[utoipa::path(delete, path = "/admin/v1/workspaces/{id}", tag = "workspaces", params(("id" = String, Path), DeleteWorkspaceQuery),
    responses((status = 200, body = WorkspaceDeletionView), (status = 404, body = ErrorBody),
        (status = 409, description = "The default workspace, one with tokens, or one the configuration names", body = ErrorBody)))]
pub(crate) async fn delete_workspace(
    auth: Auth<WorkspacesWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeleteWorkspaceQuery>,
) -> Result<Json<WorkspaceDeletionView>, ApiError> {
    s.admin.require_instance_key(&auth.key).await?;
    let d = s.admin.delete_workspace(&auth.actor, &workspace_id(&id)?, q.revoke_tokens).await?;
    Ok(Json(WorkspaceDeletionView {
        tokens_revoked: d.tokens_revoked,
        root_keys_revoked: d.root_keys_revoked,
        routes_deleted: d.routes_deleted,
        oauth_clients_deleted: d.oauth_clients_deleted,
    }))
}
