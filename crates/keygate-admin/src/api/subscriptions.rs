//! `/admin/v1/apps/{id}/subscriptions` and `/admin/v1/subscriptions…`: apps' subscriptions to
//! APIs (issue 17). An app subscribes with `apps:write`; on an API whose access is `approval`
//! the subscription waits, unless the key also holds `apis:write` (it counts as the provider's
//! owner, as it does for publishing). Approving and rejecting need `apis:write`; cancelling,
//! `apps:write`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::Timestamp;
use keygate_core::ids::{ApiId, PlanId, SubscriptionId};
use keygate_core::model::Permission;
use keygate_core::subscriptions::{Subscription, SubscriptionFilter, SubscriptionStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, ApisWrite, AppsRead, AppsWrite, Auth};
use super::tokens::app_id;
use crate::subscriptions::NewSubscription;

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionStatusBody {
    /// Waiting for an owner or admin (the API's access is `approval`).
    Pending,
    /// The app's tokens may call the API.
    Active,
    /// Refused. Final.
    Rejected,
    /// Ended. Final.
    Cancelled,
}

impl From<SubscriptionStatus> for SubscriptionStatusBody {
    fn from(s: SubscriptionStatus) -> Self {
        match s {
            SubscriptionStatus::Pending => Self::Pending,
            SubscriptionStatus::Active => Self::Active,
            SubscriptionStatus::Rejected => Self::Rejected,
            SubscriptionStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl From<SubscriptionStatusBody> for SubscriptionStatus {
    fn from(s: SubscriptionStatusBody) -> Self {
        match s {
            SubscriptionStatusBody::Pending => Self::Pending,
            SubscriptionStatusBody::Active => Self::Active,
            SubscriptionStatusBody::Rejected => Self::Rejected,
            SubscriptionStatusBody::Cancelled => Self::Cancelled,
        }
    }
}

/// A subscription to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscriptionRequest {
    /// The API: its id (`api_…`) or its name.
    pub api: String,
    /// One version of it (such as `v1`); absent: every version.
    pub version: Option<String>,
    /// The plan it is under (`plan_…`), whose rate limit and quota the app's calls to the API
    /// share; absent: the app's plan. Another plan than the app's needs `apis:write`, unless
    /// the API's subscriptions are approved anyway.
    pub plan_id: Option<String>,
}

/// Why a subscription is rejected or cancelled.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionDecisionRequest {
    /// At most 500 characters, on one line; shown to the app's owner.
    pub reason: Option<String>,
}

/// An app's subscription to an API.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub app_id: String,
    pub api_id: String,
    /// The version; null: every version of the API.
    pub version: Option<String>,
    pub plan_id: Option<String>,
    pub status: SubscriptionStatusBody,
    pub requested_by: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    pub decided_by: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub decided_at: Option<Timestamp>,
    pub reason: Option<String>,
}

impl From<Subscription> for SubscriptionView {
    fn from(s: Subscription) -> Self {
        Self {
            id: s.id.to_string(),
            app_id: s.app_id.to_string(),
            api_id: s.api_id.to_string(),
            version: s.version,
            plan_id: s.plan_id.map(|p| p.to_string()),
            status: s.status.into(),
            requested_by: s.requested_by,
            created_at: s.created_at,
            decided_by: s.decided_by,
            decided_at: s.decided_at,
            reason: s.reason,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    pub data: Vec<SubscriptionView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionQuery {
    /// Only this app's (`app_…`).
    pub app_id: Option<String>,
    /// Only this API's (`api_…`).
    pub api_id: Option<String>,
    /// Only those in this state.
    pub status: Option<SubscriptionStatusBody>,
}

fn subscription_id(raw: &str) -> Result<SubscriptionId, ApiError> {
    SubscriptionId::parse(raw).ok_or_else(|| Error::not_found("subscription").into())
}

/// Subscribes an app to an API (or one of its versions). Active at once, or pending when the
/// API's access is `approval` and the key does not hold `apis:write`.
#[utoipa::path(post, path = "/admin/v1/apps/{id}/subscriptions", tag = "subscriptions",
    params(("id" = String, Path, description = "app_…")), request_body = CreateSubscriptionRequest,
    responses((status = 201, body = SubscriptionView), (status = 400, body = ErrorBody),
        (status = 403, description = "Another plan than the app's, without `apis:write` (`plan_needs_approval`)", body = ErrorBody),
        (status = 404, description = "No such app, API, version or plan", body = ErrorBody),
        (status = 409, description = "A live subscription exists (`subscription_exists`), the API is retired (`api_retired`) or a draft (`api_not_published`)", body = ErrorBody)))]
pub(crate) async fn subscribe(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateSubscriptionRequest>,
) -> Result<(StatusCode, Json<SubscriptionView>), ApiError> {
    let app = app_id(&id)?;
    let plan_id = body
        .plan_id
        .as_deref()
        .map(|p| PlanId::parse(p).ok_or_else(|| ApiError::from(Error::not_found("plan"))))
        .transpose()?;
    let may_approve = auth.key.permissions.contains(&Permission::ApisWrite);
    let new = NewSubscription { api: body.api, version: body.version, plan_id };
    let sub = s.admin.subscribe(&auth.key.workspace_id, &auth.actor, &app, new, may_approve).await?;
    Ok((StatusCode::CREATED, Json(sub.into())))
}

/// The workspace's subscriptions, newest first (at most 1,000), filtered by app, API and status.
#[utoipa::path(get, path = "/admin/v1/subscriptions", tag = "subscriptions", params(SubscriptionQuery),
    responses((status = 200, body = SubscriptionList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_subscriptions(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<SubscriptionQuery>,
) -> Result<Json<SubscriptionList>, ApiError> {
    // A malformed id filters to nothing, as an unknown one does.
    let never = || keygate_core::ids::AppId::from_trusted("app_none".into());
    let f = SubscriptionFilter {
        app_id: q.app_id.as_deref().map(|a| keygate_core::ids::AppId::parse(a).unwrap_or_else(never)),
        api_id: q.api_id.as_deref().map(|a| ApiId::parse(a).unwrap_or_else(|| ApiId::from_trusted("api_none".into()))),
        status: q.status.map(Into::into),
    };
    let list = s.admin.list_subscriptions(&auth.key.workspace_id, &f).await?;
    Ok(Json(SubscriptionList { data: list.into_iter().map(SubscriptionView::from).collect() }))
}

#[utoipa::path(get, path = "/admin/v1/subscriptions/{id}", tag = "subscriptions", params(("id" = String, Path, description = "sub_…")),
    responses((status = 200, body = SubscriptionView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_subscription(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    Ok(Json(s.admin.subscription(&auth.key.workspace_id, &subscription_id(&id)?).await?.into()))
}

/// Approves a pending subscription: the app's tokens may call the API at once, on every node.
#[utoipa::path(post, path = "/admin/v1/subscriptions/{id}/approve", tag = "subscriptions", params(("id" = String, Path)),
    responses((status = 200, body = SubscriptionView), (status = 404, body = ErrorBody),
        (status = 409, description = "Not pending (`invalid_subscription_transition`), or decided meanwhile (`subscription_changed`)", body = ErrorBody)))]
pub(crate) async fn approve_subscription(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = subscription_id(&id)?;
    let sub =
        s.admin.decide_subscription(&auth.key.workspace_id, &auth.actor, &id, SubscriptionStatus::Active, None).await?;
    Ok(Json(sub.into()))
}

/// Rejects a pending subscription, with a reason for the app's owner.
#[utoipa::path(post, path = "/admin/v1/subscriptions/{id}/reject", tag = "subscriptions", params(("id" = String, Path)),
    request_body(content = SubscriptionDecisionRequest, description = "Optional"),
    responses((status = 200, body = SubscriptionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Not pending (`invalid_subscription_transition`), or decided meanwhile (`subscription_changed`)", body = ErrorBody)))]
pub(crate) async fn reject_subscription(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SubscriptionDecisionRequest>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = subscription_id(&id)?;
    let ws = &auth.key.workspace_id;
    let sub = s.admin.decide_subscription(ws, &auth.actor, &id, SubscriptionStatus::Rejected, body.reason).await?;
    Ok(Json(sub.into()))
}

/// Cancels a pending or active subscription: the app's tokens are refused on the API from now
/// on (403 `subscription_required` when the API needs one).
#[utoipa::path(post, path = "/admin/v1/subscriptions/{id}/cancel", tag = "subscriptions", params(("id" = String, Path)),
    request_body(content = SubscriptionDecisionRequest, description = "Optional"),
    responses((status = 200, body = SubscriptionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Already ended (`invalid_subscription_transition`)", body = ErrorBody)))]
pub(crate) async fn cancel_subscription(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SubscriptionDecisionRequest>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let id = subscription_id(&id)?;
    let ws = &auth.key.workspace_id;
    let sub = s.admin.decide_subscription(ws, &auth.actor, &id, SubscriptionStatus::Cancelled, body.reason).await?;
    Ok(Json(sub.into()))
}
