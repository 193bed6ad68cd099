//! Plans, the scope catalog, the audit trail and health.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::ids::PlanId;
use keygate_core::model::{AuditFilter, PageRequest};

use super::AdminState;
use super::dto::*;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, AuditRead, Auth, PlansRead, PlansWrite, time_param};
use crate::service::{NewPlan, PlanUpdate};

#[utoipa::path(post, path = "/admin/v1/plans", tag = "plans", request_body = CreatePlanRequest,
    responses((status = 201, body = PlanView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn create_plan(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<CreatePlanRequest>,
) -> Result<(StatusCode, Json<PlanView>), ApiError> {
    let new = NewPlan {
        name: req.name,
        description: req.description,
        scopes: req.scopes,
        rate_limit: req.rate_limit.map(Into::into),
        quota: req.quota.map(Into::into),
    };
    let plan = s.admin.create_plan(&auth.key.workspace_id, &auth.actor, new).await?;
    Ok((StatusCode::CREATED, Json(PlanView::from(&plan))))
}

/// Changes a plan. Its apps' tokens keep their scopes and limits: the scopes bound their next
/// change, the limits are the defaults of tokens created from now on.
#[utoipa::path(patch, path = "/admin/v1/plans/{id}", tag = "plans", params(("id" = String, Path, description = "plan_…")),
    request_body = UpdatePlanRequest,
    responses((status = 200, body = PlanView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Another plan has this name", body = ErrorBody)))]
pub(crate) async fn update_plan(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdatePlanRequest>,
) -> Result<Json<PlanView>, ApiError> {
    let id = PlanId::parse(&id).ok_or_else(|| Error::not_found("plan"))?;
    let update = PlanUpdate {
        name: req.name,
        description: req.description,
        scopes: req.scopes,
        rate_limit: req.rate_limit.map(|r| r.map(Into::into)),
        quota: req.quota.map(|q| q.map(Into::into)),
    };
    let plan = s.admin.update_plan(&auth.key.workspace_id, &auth.actor, &id, update).await?;
    Ok(Json(PlanView::from(&plan)))
}

#[utoipa::path(get, path = "/admin/v1/plans", tag = "plans", responses((status = 200, body = PlanList)))]
pub(crate) async fn list_plans(auth: Auth<PlansRead>, State(s): State<AdminState>) -> Result<Json<PlanList>, ApiError> {
    let plans = s.admin.list_plans(&auth.key.workspace_id).await?;
    Ok(Json(PlanList { data: plans.iter().map(PlanView::from).collect() }))
}

#[utoipa::path(get, path = "/admin/v1/scopes", tag = "plans", responses((status = 200, body = ScopeList)))]
pub(crate) async fn list_scopes(
    auth: Auth<PlansRead>,
    State(s): State<AdminState>,
) -> Result<Json<ScopeList>, ApiError> {
    let scopes = s.admin.list_scopes(&auth.key.workspace_id).await?;
    Ok(Json(ScopeList { data: scopes.iter().map(ScopeView::from).collect() }))
}

/// Adds a scope to the catalog, or replaces its description. Once the catalog has entries, tokens
/// may only be granted scopes it lists.
#[utoipa::path(put, path = "/admin/v1/scopes/{scope}", tag = "plans", params(("scope" = String, Path, description = "such as orders:read")),
    request_body = PutScopeRequest, responses((status = 200, body = ScopeView), (status = 400, body = ErrorBody)))]
pub(crate) async fn put_scope(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    Path(scope): Path<String>,
    ApiJson(req): ApiJson<PutScopeRequest>,
) -> Result<Json<ScopeView>, ApiError> {
    let entry = s.admin.put_scope(&auth.key.workspace_id, &auth.actor, &scope, req.description, req.api).await?;
    Ok(Json(ScopeView::from(&entry)))
}

#[utoipa::path(delete, path = "/admin/v1/scopes/{scope}", tag = "plans", params(("scope" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_scope(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    Path(scope): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_scope(&auth.key.workspace_id, &auth.actor, &scope).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The workspace's audit trail, newest first.
#[utoipa::path(get, path = "/admin/v1/audit-events", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditEventList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_audit_events(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditEventList>, ApiError> {
    let filter = AuditFilter {
        actor: q.actor,
        action: q.action,
        target: q.target,
        from: time_param(q.from.as_deref(), "from")?,
        to: time_param(q.to.as_deref(), "to")?,
    };
    let page = s
        .admin
        .audit_events(
            &auth.key.workspace_id,
            &filter,
            &PageRequest {
                limit: super::extract::page_limit(q.limit)?,
                cursor: super::extract::audit_cursor(q.cursor)?,
            },
        )
        .await?;
    Ok(Json(AuditEventList {
        data: page.items.iter().map(AuditEventView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Whether the server and its store answer. Needs no credential.
#[utoipa::path(get, path = "/admin/v1/health", tag = "system", security(()),
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
pub(crate) async fn health(State(s): State<AdminState>) -> Result<Json<Health>, ApiError> {
    s.admin.store().ping().await?;
    Ok(Json(Health {
        status: "ok".into(),
        store: s.admin.store().engine().into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }))
}
