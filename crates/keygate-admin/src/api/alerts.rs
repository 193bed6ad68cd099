//! `/admin/v1/alerts…`: anomaly alerts raised on the workspace's tokens and OAuth clients
//! (docs/notifications.md):
//! list and read them, acknowledge, resolve, and resume a token the policy suspended.

use axum::Json;
use axum::extract::{Path, State};
use keygate_core::Error;
use keygate_core::anomaly::{Alert, AlertFilter, AlertStatus, Severity, Watched};
use keygate_core::ids::{AlertId, TokenId};
use keygate_core::model::{PageRequest, Permission};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, Auth, TokensRead, TokensWrite, require};

fn alert_id(raw: &str) -> Result<AlertId, ApiError> {
    AlertId::parse(raw).ok_or_else(|| Error::not_found("alert").into())
}

/// An anomaly alert.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AlertView {
    /// `al_…`
    pub id: String,
    /// The API key the alert is about (`tok_…`); `null` for an OAuth client's alert.
    pub token_id: Option<String>,
    /// The OAuth client the alert is about, whose JWT access tokens the gateway saw; `null` for
    /// an API key's alert.
    pub client_id: Option<String>,
    pub app_id: String,
    /// `rate_spike`, `new_network`, `many_networks`, `new_route`, `refusal_burst`, `dormant_use`,
    /// `old_secret`.
    pub kind: String,
    /// `low`, `medium` or `high`.
    pub severity: String,
    /// `open`, `acknowledged` or `resolved`.
    pub status: String,
    /// What makes repeats the same alert (the network, the route); empty for the other kinds.
    pub key: String,
    pub summary: String,
    /// The numbers behind it: rates, networks, times.
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
    pub created_at: String,
    pub last_seen_at: String,
    /// Times it was found while not resolved.
    pub occurrences: u64,
    /// What the workspace's policy did (`suspended`).
    pub action: Option<String>,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<String>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<String>,
}

impl From<&Alert> for AlertView {
    fn from(a: &Alert) -> Self {
        Self {
            id: a.id.to_string(),
            token_id: a.subject.token().map(ToString::to_string),
            client_id: a.subject.client().map(str::to_owned),
            app_id: a.app_id.to_string(),
            kind: a.kind.as_str().to_owned(),
            severity: a.severity.as_str().to_owned(),
            status: a.status.as_str().to_owned(),
            key: a.key.clone(),
            summary: a.summary.clone(),
            evidence: a.evidence.clone(),
            created_at: a.created_at.to_rfc3339(),
            last_seen_at: a.last_seen_at.to_rfc3339(),
            occurrences: a.occurrences,
            action: a.action.clone(),
            acknowledged_by: a.acknowledged_by.clone(),
            acknowledged_at: a.acknowledged_at.map(|t| t.to_rfc3339()),
            resolved_by: a.resolved_by.clone(),
            resolved_at: a.resolved_at.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    pub data: Vec<AlertView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAlertsQuery {
    /// `open`, `acknowledged` or `resolved`.
    pub status: Option<String>,
    /// `low`, `medium` or `high`.
    pub severity: Option<String>,
    /// Only this token's (`tok_…`).
    pub token_id: Option<String>,
    /// Only this OAuth client's.
    pub client_id: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// The shape of the ids keygate gives OAuth clients (`{prefix}c_…`), loosely.
fn is_client_id(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An optional query parameter read by `parse`; one it cannot read is a 400 `invalid_query`
/// with `message`.
fn param<T>(
    raw: Option<String>,
    parse: impl FnOnce(&str) -> Option<T>,
    message: &'static str,
) -> Result<Option<T>, ApiError> {
    raw.map(|v| parse(&v).ok_or_else(|| ApiError::new(axum::http::StatusCode::BAD_REQUEST, "invalid_query", message)))
        .transpose()
}

/// The workspace's alerts, newest first.
#[utoipa::path(get, path = "/admin/v1/alerts", tag = "alerts", params(ListAlertsQuery),
    responses((status = 200, body = AlertList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_alerts(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ListAlertsQuery>,
) -> Result<Json<AlertList>, ApiError> {
    // Every parameter is checked before any is acted on: a bad one is a 400 whatever the others
    // say (answering "nothing about both" first let a malformed cursor through).
    let status = param(q.status, AlertStatus::parse, "status is open, acknowledged or resolved")?;
    let severity = param(q.severity, Severity::parse, "severity is low, medium or high")?;
    let token = param(q.token_id, TokenId::parse, "token_id is a token's id (tok_…)")?;
    let client = param(
        q.client_id,
        |v| is_client_id(v).then(|| v.to_owned()),
        "client_id is an OAuth client's id (letters, digits, _ and -)",
    )?;
    let page =
        PageRequest { limit: super::extract::page_limit(q.limit)?, cursor: super::extract::time_cursor(q.cursor)? };
    let subject = match (token, client) {
        // No alert is about a token and a client at once.
        (Some(_), Some(_)) => return Ok(Json(AlertList { data: Vec::new(), next_cursor: None })),
        (Some(t), None) => Some(Watched::Token(t)),
        (None, Some(c)) => Some(Watched::Client(c)),
        (None, None) => None,
    };
    let filter = AlertFilter { status, severity, subject };
    let page = s.admin.list_alerts(&auth.key.workspace_id, &filter, &page).await?;
    Ok(Json(AlertList { data: page.items.iter().map(AlertView::from).collect(), next_cursor: page.next_cursor }))
}

#[utoipa::path(get, path = "/admin/v1/alerts/{id}", tag = "alerts", params(("id" = String, Path, description = "al_…")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_alert(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AlertView>, ApiError> {
    Ok(Json(AlertView::from(&s.admin.alert(&auth.key.workspace_id, &alert_id(&id)?).await?)))
}

/// Marks an open alert acknowledged (someone is looking into it).
#[utoipa::path(post, path = "/admin/v1/alerts/{id}/acknowledge", tag = "alerts",
    params(("id" = String, Path, description = "al_…")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn acknowledge_alert(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AlertView>, ApiError> {
    let id = alert_id(&id)?;
    let a = s.admin.set_alert_status(&auth.key.workspace_id, &auth.actor, &id, AlertStatus::Acknowledged).await?;
    Ok(Json(AlertView::from(&a)))
}

/// Resolves an alert; the same finding later opens a new one.
#[utoipa::path(post, path = "/admin/v1/alerts/{id}/resolve", tag = "alerts",
    params(("id" = String, Path, description = "al_…")),
    responses((status = 200, body = AlertView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn resolve_alert(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AlertView>, ApiError> {
    let id = alert_id(&id)?;
    let a = s.admin.set_alert_status(&auth.key.workspace_id, &auth.actor, &id, AlertStatus::Resolved).await?;
    Ok(Json(AlertView::from(&a)))
}

/// A false alarm: resumes the alert's token or OAuth client if it is suspended, and resolves the
/// alert. An OAuth client's alert needs `apps:write` as well, as the client's own resume does
/// (`POST /admin/v1/apps/{id}/oauth-client/resume`).
#[utoipa::path(post, path = "/admin/v1/alerts/{id}/resume-token", tag = "alerts",
    params(("id" = String, Path, description = "al_…")),
    responses((status = 200, body = AlertView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(crate) async fn resume_from_alert(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<AlertView>, ApiError> {
    let (ws, id) = (&auth.key.workspace_id, alert_id(&id)?);
    if let Watched::Client(_) = s.admin.alert(ws, &id).await?.subject {
        require(&auth.key, Permission::AppsWrite)?;
    }
    let a = s.admin.resume_from_alert(ws, &auth.actor, &id).await?;
    Ok(Json(AlertView::from(&a)))
}
