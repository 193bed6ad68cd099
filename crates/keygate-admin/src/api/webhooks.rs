//! `/admin/v1/webhooks…`: the workspace's webhook endpoints (signed per Standard Webhooks), their
//! deliveries with every attempt, redelivery and a test event (docs/notifications.md).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::ids::WebhookId;
use keygate_core::model::PageRequest;
use keygate_core::notify::{Delivery, DeliveryAttempt, WebhookEndpoint};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::AdminState;
use super::dto::PageQuery;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, Auth, WebhooksRead, WebhooksWrite};
use crate::webhooks::{CreatedWebhook, NewWebhook, WebhookUpdate};

fn webhook_id(raw: &str) -> Result<WebhookId, ApiError> {
    WebhookId::parse(raw).ok_or_else(|| Error::not_found("webhook endpoint").into())
}

fn delivery_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| Error::not_found("webhook delivery").into())
}

fn double_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `POST /admin/v1/webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// `https://…` (or `http://…`) on a public address, unless `[webhooks] allow_private`.
    pub url: String,
    pub description: Option<String>,
    /// The event types to send (`GET /admin/v1/webhook-event-types`); absent, empty or `["*"]`:
    /// every event.
    #[serde(default)]
    pub event_types: Vec<String>,
}

/// `PATCH /admin/v1/webhooks/{id}`: the fields given change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhookRequest {
    pub url: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    pub description: Option<Option<String>>,
    pub event_types: Option<Vec<String>>,
    /// `true` enables a disabled endpoint (its pending deliveries are sent again); `false`
    /// disables it (nothing is sent or queued for it meanwhile).
    pub enabled: Option<bool>,
}

/// A webhook endpoint (never its secret).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookView {
    /// `wh_…`
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    /// Empty: every event.
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why it is disabled.
    pub disabled_reason: Option<String>,
    /// Since when every attempt has failed (absent after a success).
    pub failing_since: Option<String>,
    /// Until when the secret a rotation replaced still signs beside the current one (absent:
    /// no overlap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&WebhookEndpoint> for WebhookView {
    fn from(w: &WebhookEndpoint) -> Self {
        Self {
            id: w.id.to_string(),
            url: w.url.clone(),
            description: w.description.clone(),
            event_types: w.event_types.clone(),
            enabled: w.enabled,
            disabled_reason: w.disabled_reason.clone(),
            failing_since: w.failing_since.map(|t| t.to_rfc3339()),
            previous_secret_until: w.previous_secret_until.map(|t| t.to_rfc3339()),
            created_at: w.created_at.to_rfc3339(),
            updated_at: w.updated_at.to_rfc3339(),
        }
    }
}

/// An endpoint with its signing secret: shown in this answer only. Receivers verify
/// `webhook-signature` with it (any Standard Webhooks library takes it as is).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// `whsec_` and the base64 of 32 random bytes.
    pub secret: String,
}

impl From<CreatedWebhook> for WebhookWithSecret {
    fn from(c: CreatedWebhook) -> Self {
        Self { webhook: WebhookView::from(&c.endpoint), secret: c.secret }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub data: Vec<WebhookView>,
}

/// One message to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    pub endpoint_id: String,
    /// The `webhook-id` header: the same on every attempt and redelivery.
    pub message_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (every retry failed).
    pub state: String,
    /// Attempts since it was created or last redelivered.
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        let pending = d.state == keygate_core::notify::DeliveryState::Pending;
        Self {
            id: d.id,
            endpoint_id: d.endpoint_id.to_string(),
            message_id: d.message_id.clone(),
            event_type: d.event_type.clone(),
            state: d.state.as_str().to_owned(),
            attempts: d.attempts,
            next_attempt_at: d.next_at.filter(|_| pending).map(|t| t.to_rfc3339()),
            last_attempt_at: d.last_attempt_at.map(|t| t.to_rfc3339()),
            last_status: d.last_status,
            last_error: d.last_error.clone(),
            created_at: d.created_at.to_rfc3339(),
            delivered_at: d.delivered_at.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub data: Vec<DeliveryView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub at: String,
    /// The endpoint's answer; absent when none came.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u32,
}

impl From<&DeliveryAttempt> for AttemptView {
    fn from(a: &DeliveryAttempt) -> Self {
        Self { at: a.at.to_rfc3339(), status: a.status, error: a.error.clone(), duration_ms: a.duration_ms }
    }
}

/// A delivery, the exact body sent, and every attempt, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetail {
    #[serde(flatten)]
    pub delivery: DeliveryView,
    /// The JSON body, as signed and sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub attempts_log: Vec<AttemptView>,
}

/// An event type a webhook can subscribe to.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeView {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeList {
    pub data: Vec<EventTypeView>,
}

/// The event types webhooks can subscribe to.
#[utoipa::path(get, path = "/admin/v1/webhook-event-types", tag = "webhooks",
    responses((status = 200, body = EventTypeList)))]
pub(crate) async fn list_event_types(_auth: Auth<WebhooksRead>) -> Json<EventTypeList> {
    Json(EventTypeList {
        data: (keygate_core::notify::EVENT_TYPES.iter())
            .map(|t| EventTypeView { name: t.name.to_owned(), description: t.description.to_owned() })
            .collect(),
    })
}

/// Adds an endpoint. The answer holds its signing secret, shown this once.
#[utoipa::path(post, path = "/admin/v1/webhooks", tag = "webhooks", request_body = CreateWebhookRequest,
    responses((status = 201, body = WebhookWithSecret), (status = 409, description = "Too many endpoints", body = ErrorBody)))]
pub(crate) async fn create_webhook(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> Result<(StatusCode, Json<WebhookWithSecret>), ApiError> {
    let new = NewWebhook { url: req.url, description: req.description, event_types: req.event_types };
    let created = s.admin.create_webhook(&auth.key.workspace_id, &auth.actor, new).await?;
    Ok((StatusCode::CREATED, Json(created.into())))
}

/// The workspace's endpoints, oldest first.
#[utoipa::path(get, path = "/admin/v1/webhooks", tag = "webhooks", responses((status = 200, body = WebhookList)))]
pub(crate) async fn list_webhooks(
    auth: Auth<WebhooksRead>,
    State(s): State<AdminState>,
) -> Result<Json<WebhookList>, ApiError> {
    let list = s.admin.list_webhooks(&auth.key.workspace_id).await?;
    Ok(Json(WebhookList { data: list.iter().map(WebhookView::from).collect() }))
}

#[utoipa::path(get, path = "/admin/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "wh_…")),
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_webhook(
    auth: Auth<WebhooksRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>, ApiError> {
    Ok(Json(WebhookView::from(&s.admin.webhook(&auth.key.workspace_id, &webhook_id(&id)?).await?)))
}

/// Changes an endpoint: its URL, description, event types, or whether it is enabled.
#[utoipa::path(patch, path = "/admin/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "wh_…")),
    request_body = UpdateWebhookRequest,
    responses((status = 200, body = WebhookView), (status = 404, body = ErrorBody)))]
pub(crate) async fn update_webhook(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateWebhookRequest>,
) -> Result<Json<WebhookView>, ApiError> {
    let update = WebhookUpdate {
        url: req.url,
        description: req.description,
        event_types: req.event_types,
        enabled: req.enabled,
    };
    let w = s.admin.update_webhook(&auth.key.workspace_id, &auth.actor, &webhook_id(&id)?, update).await?;
    Ok(Json(WebhookView::from(&w)))
}

/// Deletes an endpoint with its deliveries.
#[utoipa::path(delete, path = "/admin/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "wh_…")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_webhook(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_webhook(&auth.key.workspace_id, &auth.actor, &webhook_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook secret's rotation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateWebhookSecretRequest {
    /// How long the replaced secret keeps signing beside the new one, in seconds (every message
    /// then carries both signatures); default 0: it stops at once. At most 604800 (7 days).
    #[serde(default)]
    #[schema(maximum = 604800)]
    pub overlap_seconds: u64,
}

/// Replaces the endpoint's signing secret; the new one is in the answer, once. With
/// `overlap_seconds`, the replaced secret keeps signing beside it until then.
#[utoipa::path(post, path = "/admin/v1/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("id" = String, Path, description = "wh_…")),
    request_body(content = RotateWebhookSecretRequest, description = "Optional"),
    responses((status = 200, body = WebhookWithSecret), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn rotate_webhook_secret(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RotateWebhookSecretRequest>,
) -> Result<Json<WebhookWithSecret>, ApiError> {
    let rotated = s
        .admin
        .rotate_webhook_secret(&auth.key.workspace_id, &auth.actor, &webhook_id(&id)?, req.overlap_seconds)
        .await?;
    Ok(Json(rotated.into()))
}

/// Queues a `webhook.test` event for the endpoint; the answer is its delivery (follow it with
/// `GET /admin/v1/webhook-deliveries/{id}`).
#[utoipa::path(post, path = "/admin/v1/webhooks/{id}/test", tag = "webhooks", params(("id" = String, Path, description = "wh_…")),
    responses((status = 202, body = DeliveryView), (status = 404, body = ErrorBody)))]
pub(crate) async fn test_webhook(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    let ws = &auth.key.workspace_id;
    let delivery = s.admin.test_webhook(ws, &auth.actor, &webhook_id(&id)?).await?;
    let (d, _) = s.admin.delivery(ws, delivery).await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::from(&d))))
}

/// The endpoint's deliveries, newest first.
#[utoipa::path(get, path = "/admin/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path, description = "wh_…"), PageQuery),
    responses((status = 200, body = DeliveryList), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_deliveries(
    auth: Auth<WebhooksRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    let page =
        PageRequest { limit: super::extract::page_limit(q.limit)?, cursor: super::extract::audit_cursor(q.cursor)? };
    let page = s.admin.list_deliveries(&auth.key.workspace_id, Some(&webhook_id(&id)?), &page).await?;
    Ok(Json(DeliveryList { data: page.items.iter().map(DeliveryView::from).collect(), next_cursor: page.next_cursor }))
}

/// A delivery, the body sent, and every attempt.
#[utoipa::path(get, path = "/admin/v1/webhook-deliveries/{id}", tag = "webhooks", params(("id" = i64, Path)),
    responses((status = 200, body = DeliveryDetail), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_delivery(
    auth: Auth<WebhooksRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetail>, ApiError> {
    let (d, attempts) = s.admin.delivery(&auth.key.workspace_id, delivery_id(&id)?).await?;
    Ok(Json(DeliveryDetail {
        delivery: DeliveryView::from(&d),
        payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        attempts_log: attempts.iter().map(AttemptView::from).collect(),
    }))
}

/// Sends a delivery again now (same `webhook-id`), with its retries counted afresh.
#[utoipa::path(post, path = "/admin/v1/webhook-deliveries/{id}/redeliver", tag = "webhooks", params(("id" = i64, Path)),
    responses((status = 202, body = DeliveryView), (status = 404, body = ErrorBody)))]
pub(crate) async fn redeliver(
    auth: Auth<WebhooksWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    let d = s.admin.redeliver(&auth.key.workspace_id, delivery_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::from(&d))))
}
