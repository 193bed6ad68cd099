//! `/admin/v1/apps…`: the API consumers that hold tokens.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::ids::PlanId;
use keygate_core::model::PageRequest;

use super::AdminState;
use super::dto::*;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, AppsRead, AppsWrite, Auth};
use super::tokens::app_id;
use crate::service::{AppUpdate, NewApp};

fn plan_id(raw: &str) -> Result<PlanId, ApiError> {
    PlanId::parse(raw).ok_or_else(|| Error::not_found("plan").into())
}

#[utoipa::path(post, path = "/admin/v1/apps", tag = "apps", request_body = CreateAppRequest,
    responses((status = 201, body = AppView), (status = 400, body = ErrorBody), (status = 404, description = "No such plan", body = ErrorBody)))]
pub(crate) async fn create_app(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<CreateAppRequest>,
) -> Result<(StatusCode, Json<AppView>), ApiError> {
    let new = NewApp {
        name: req.name,
        description: req.description,
        plan_id: req.plan_id.as_deref().map(plan_id).transpose()?,
        metadata: req.metadata,
        rate_limit: req.rate_limit.map(Into::into),
        quota: req.quota.map(Into::into),
        llm_budget: req.llm_budget.map(LlmBudgetBody::to_budget).transpose()?,
    };
    let app = s.admin.create_app(&auth.key.workspace_id, &auth.actor, new).await?;
    Ok((StatusCode::CREATED, Json(AppView::from(&app))))
}

#[utoipa::path(get, path = "/admin/v1/apps", tag = "apps", params(PageQuery), responses((status = 200, body = AppList)))]
pub(crate) async fn list_apps(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<AppList>, ApiError> {
    let page = s
        .admin
        .list_apps(
            &auth.key.workspace_id,
            &PageRequest {
                limit: super::extract::page_limit(q.limit)?,
                cursor: super::extract::time_cursor(q.cursor)?,
            },
        )
        .await?;
    Ok(Json(AppList { data: page.items.iter().map(AppView::from).collect(), next_cursor: page.next_cursor }))
}

#[utoipa::path(get, path = "/admin/v1/apps/{id}", tag = "apps", params(("id" = String, Path, description = "app_…")),
    responses((status = 200, body = AppView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_app(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AppView>, ApiError> {
    let app = s.admin.app(&auth.key.workspace_id, &app_id(&id)?).await?;
    Ok(Json(AppView::from(&app)))
}

#[utoipa::path(patch, path = "/admin/v1/apps/{id}", tag = "apps", params(("id" = String, Path)), request_body = UpdateAppRequest,
    responses((status = 200, body = AppView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn update_app(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateAppRequest>,
) -> Result<Json<AppView>, ApiError> {
    let update = AppUpdate {
        name: req.name,
        description: req.description,
        plan_id: match req.plan_id {
            Some(Some(p)) => Some(Some(plan_id(&p)?)),
            Some(None) => Some(None),
            None => None,
        },
        metadata: req.metadata,
        rate_limit: req.rate_limit.map(|r| r.map(Into::into)),
        quota: req.quota.map(|q| q.map(Into::into)),
        llm_budget: req.llm_budget.map(|b| b.map(LlmBudgetBody::to_budget).transpose()).transpose()?,
    };
    let moved = update.plan_id.is_some();
    let (app, adjusted) =
        s.admin.update_app_adjusting(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, update).await?;
    Ok(Json(AppView { adjusted: moved.then(|| AdjustmentView::list(adjusted)), ..AppView::from(&app) }))
}

/// Deletes an app. An app with tokens is only deleted with `revoke_tokens=true`, which revokes
/// and removes its tokens in the same transaction.
#[utoipa::path(delete, path = "/admin/v1/apps/{id}", tag = "apps", params(("id" = String, Path), DeleteAppQuery),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "The default app, or an app with tokens", body = ErrorBody)))]
pub(crate) async fn delete_app(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeleteAppQuery>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_app(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, q.revoke_tokens).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The app's statement for a calendar month: its usage and what its plan charges for it.
#[utoipa::path(get, path = "/admin/v1/apps/{id}/statement", tag = "apps",
    params(("id" = String, Path, description = "app_…"), StatementQuery),
    responses((status = 200, description = "JSON, or CSV with format=csv",
            content((StatementView = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn statement(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<StatementQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let period = q.period.unwrap_or_else(|| keygate_core::billing::month_of(s.admin.now().as_millis()));
    let statement = s.admin.statement(&auth.key.workspace_id, &app_id(&id)?, &period).await?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(StatementView::from(statement)).into_response()),
        Some("csv") => {
            Ok(([(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")], crate::csv::statement(&statement))
                .into_response())
        }
        Some(_) => Err(Error::invalid("invalid_query", "format is json or csv").into()),
    }
}
