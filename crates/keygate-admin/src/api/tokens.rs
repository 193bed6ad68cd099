//! `/admin/v1/tokens…`: the token lifecycle.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::Error;
use keygate_core::ids::{AppId, TokenId};
use keygate_core::model::{PageRequest, TokenFilter, TokenStatus};

use super::AdminState;
use super::dto::*;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiQuery, Auth, TokensRead, TokensWrite, time_param};
use crate::service::{NewToken, TokenUpdate};

/// The longest `expiring_within` (100 years), as the document states.
const MAX_EXPIRING_WITHIN: i64 = 100 * 365 * 86_400;

pub(crate) fn token_id(raw: &str) -> Result<TokenId, ApiError> {
    TokenId::parse(raw).ok_or_else(|| Error::not_found("token").into())
}

pub(crate) fn app_id(raw: &str) -> Result<AppId, ApiError> {
    AppId::parse(raw).ok_or_else(|| Error::not_found("app").into())
}

/// Creates a token. The answer holds the secret (`token`) this once.
#[utoipa::path(post, path = "/admin/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses(
        (status = 201, description = "Created; `token` is the secret, shown only now", body = TokenWithSecret),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "No valid root key", body = ErrorBody),
        (status = 403, description = "The root key lacks tokens:write", body = ErrorBody),
        (status = 404, description = "No such app", body = ErrorBody),
        (status = 409, description = "expires_at has passed (expiry_in_past)", body = ErrorBody),
    ))]
pub(crate) async fn create_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<TokenWithSecret>), ApiError> {
    let new = NewToken {
        name: req.name,
        app_id: req.app_id.as_deref().map(app_id).transpose()?,
        scopes: req.scopes,
        expires_in: req.expires_in,
        expires_at: req.expires_at,
        ip_allowlist: req.ip_allowlist,
        rate_limit: req.rate_limit.map(Into::into),
        quota: req.quota.map(Into::into),
        metadata: req.metadata,
        dpop_jkt: req.dpop_jkt,
        llm_budget: req.llm_budget.map(LlmBudgetBody::to_budget).transpose()?,
        max_uses: req.max_uses,
        oauth_access_token: false,
    };
    let (record, secret) = s.admin.create_token(&auth.key.workspace_id, &auth.actor, new).await?;
    let view = TokenView::new(&record, s.admin.now());
    Ok((StatusCode::CREATED, Json(TokenWithSecret { record: view, token: secret.expose().to_owned() })))
}

/// Lists tokens, newest first, with filters and cursor pagination.
#[utoipa::path(get, path = "/admin/v1/tokens", tag = "tokens", params(ListTokensQuery),
    responses(
        (status = 200, body = TokenList),
        (status = 400, description = "Invalid filter", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    ))]
pub(crate) async fn list_tokens(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ListTokensQuery>,
) -> Result<Json<TokenList>, ApiError> {
    let now = s.admin.now();
    let status = q
        .status
        .as_deref()
        .map(|st| {
            TokenStatus::parse(st)
                .ok_or_else(|| Error::invalid("invalid_query", "status is one of active, suspended, revoked, expired"))
        })
        .transpose()?;
    let expiring_before = match q.expiring_within {
        Some(secs) if secs <= 0 || secs > MAX_EXPIRING_WITHIN => {
            return Err(Error::invalid(
                "invalid_query",
                "expiring_within is a number of seconds from 1 to 3153600000 (100 years)",
            )
            .into());
        }
        Some(secs) => Some(now.plus_seconds(secs)),
        None => None,
    };
    // An app id that cannot exist matches nothing, like any other unknown app (answered once
    // every other parameter has been checked, below).
    let app = q.app_id.as_deref().map(AppId::parse);
    let no_such_app = matches!(app, Some(None));
    let filter = TokenFilter {
        app_id: app.flatten(),
        status,
        name_contains: q.q,
        expiring_before,
        exposed: q.exposed,
        created_before: None,
        expired_after: None,
        unused_since: match q.unused_days {
            Some(d) if !(1..=3650).contains(&d) => {
                return Err(Error::invalid("invalid_query", "unused_days is a number of days from 1 to 3650").into());
            }
            Some(d) => Some(keygate_core::Timestamp::from_millis(now.as_millis() - i64::from(d) * 86_400_000)),
            None => None,
        },
    };
    let page =
        PageRequest { limit: super::extract::page_limit(q.limit)?, cursor: super::extract::time_cursor(q.cursor)? };
    if no_such_app {
        return Ok(Json(TokenList { data: vec![], next_cursor: None }));
    }
    let page = s.admin.list_tokens(&auth.key.workspace_id, &filter, &page).await?;
    Ok(Json(TokenList {
        data: page.items.iter().map(|t| TokenView::new(t, now)).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Shows a token (never its secret).
#[utoipa::path(get, path = "/admin/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "tok_…")),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn get_token(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let t = s.admin.token(&auth.key.workspace_id, &token_id(&id)?).await?;
    Ok(Json(TokenView::new(&t, s.admin.now())))
}

/// Changes a token's name, scopes, expiry, allowlist, limits or metadata without reissuing it.
#[utoipa::path(patch, path = "/admin/v1/tokens/{id}", tag = "tokens", request_body = UpdateTokenRequest,
    params(("id" = String, Path, description = "tok_…")),
    responses((status = 200, body = TokenView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Revoked, or changed concurrently", body = ErrorBody)))]
pub(crate) async fn update_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateTokenRequest>,
) -> Result<Json<TokenView>, ApiError> {
    let update = TokenUpdate {
        name: req.name,
        scopes: req.scopes,
        expires_in: req.expires_in,
        expires_at: req.expires_at,
        ip_allowlist: req.ip_allowlist,
        rate_limit: req.rate_limit.map(|r| r.map(Into::into)),
        quota: req.quota.map(|q| q.map(Into::into)),
        metadata: req.metadata,
        dpop_jkt: req.dpop_jkt,
        llm_budget: req.llm_budget.map(|b| b.map(LlmBudgetBody::to_budget).transpose()).transpose()?,
        max_uses: req.max_uses,
    };
    let t = s.admin.update_token(&auth.key.workspace_id, &auth.actor, &token_id(&id)?, update).await?;
    Ok(Json(TokenView::applied(&t, s.admin.now())))
}

/// Suspends a token: it is refused until resumed.
#[utoipa::path(post, path = "/admin/v1/tokens/{id}/suspend", tag = "tokens", params(("id" = String, Path)),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn suspend_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let t = s.admin.suspend_token(&auth.key.workspace_id, &auth.actor, &token_id(&id)?).await?;
    Ok(Json(TokenView::applied(&t, s.admin.now())))
}

/// Resumes a suspended token.
#[utoipa::path(post, path = "/admin/v1/tokens/{id}/resume", tag = "tokens", params(("id" = String, Path)),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn resume_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let t = s.admin.resume_token(&auth.key.workspace_id, &auth.actor, &token_id(&id)?).await?;
    Ok(Json(TokenView::applied(&t, s.admin.now())))
}

/// Revokes a token, for good. Revoking a revoked token changes nothing.
#[utoipa::path(post, path = "/admin/v1/tokens/{id}/revoke", tag = "tokens", params(("id" = String, Path)),
    request_body(content = RevokeTokenRequest, description = "Optional"),
    responses((status = 200, body = TokenView), (status = 404, body = ErrorBody)))]
pub(crate) async fn revoke_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RevokeTokenRequest>,
) -> Result<Json<TokenView>, ApiError> {
    let t = s.admin.revoke_token(&auth.key.workspace_id, &auth.actor, &token_id(&id)?, req.reason).await?;
    Ok(Json(TokenView::applied(&t, s.admin.now())))
}

/// Issues a new secret; the old one keeps working for `grace_period_seconds`, then expires.
#[utoipa::path(post, path = "/admin/v1/tokens/{id}/rotate", tag = "tokens", params(("id" = String, Path)),
    request_body(content = RotateTokenRequest, description = "Optional"),
    responses((status = 201, description = "The new token, with its secret shown only now", body = TokenWithSecret),
        (status = 404, body = ErrorBody), (status = 409, description = "Revoked, expired, suspended or already rotated", body = ErrorBody)))]
pub(crate) async fn rotate_token(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RotateTokenRequest>,
) -> Result<(StatusCode, Json<TokenWithSecret>), ApiError> {
    let (record, secret) =
        s.admin.rotate_token(&auth.key.workspace_id, &auth.actor, &token_id(&id)?, req.grace_period_seconds).await?;
    let view = TokenView::applied(&record, s.admin.now());
    Ok((StatusCode::CREATED, Json(TokenWithSecret { record: view, token: secret.expose().to_owned() })))
}

/// Reports tokens found where they should not be (`keygate scan --online`): the workspace's own
/// tokens among them are marked exposed in their audit trail, and the answer says which are live.
#[utoipa::path(post, path = "/admin/v1/tokens/exposures", tag = "tokens", request_body = ReportExposuresRequest,
    responses((status = 200, body = ExposuresResponse), (status = 400, body = ErrorBody)))]
pub(crate) async fn report_exposures(
    auth: Auth<TokensWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<ReportExposuresRequest>,
) -> Result<Json<ExposuresResponse>, ApiError> {
    if req.findings.len() > 100 {
        return Err(Error::invalid("too_many_tokens", "report at most 100 findings per request").into());
    }
    let found: Vec<(String, Option<String>)> = req.findings.into_iter().map(|f| (f.token, f.location)).collect();
    let found = s.admin.report_exposed(&auth.key.workspace_id, &auth.actor, &found).await?;
    Ok(Json(ExposuresResponse {
        data: found
            .into_iter()
            .map(|e| ExposureView {
                display: e.display,
                verdict: e.verdict.to_owned(),
                token_id: e.token.map(|t| t.id.to_string()),
            })
            .collect(),
    }))
}

/// A token's LLM usage through the AI gateway, per hour, route and deployment (`provider/model`):
/// calls, errors, input, output and cached tokens, and what they cost by the providers' price
/// tables. The counts of the last seconds are included before they reach the store.
#[utoipa::path(get, path = "/admin/v1/tokens/{id}/llm-usage", tag = "tokens", params(("id" = String, Path), LlmUsageQuery),
    responses((status = 200, body = LlmUsageResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn token_llm_usage(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LlmUsageQuery>,
) -> Result<Json<LlmUsageResponse>, ApiError> {
    let to = time_param(q.to.as_deref(), "to")?.unwrap_or_else(|| s.admin.now());
    let from = time_param(q.from.as_deref(), "from")?.unwrap_or_else(|| to.plus_seconds(-86_400));
    let id = token_id(&id)?;
    let (from, rows) = s.admin.token_llm_usage(&auth.key.workspace_id, &id, from, to).await?;
    let usd = |m: u64| m as f64 / 1e6;
    Ok(Json(LlmUsageResponse {
        token_id: id.to_string(),
        from,
        to,
        total_requests: rows.iter().map(|r| r.requests).sum(),
        total_input_tokens: rows.iter().map(|r| r.input_tokens).sum(),
        total_output_tokens: rows.iter().map(|r| r.output_tokens).sum(),
        total_cost_usd: usd(rows.iter().map(|r| r.micro_usd).sum()),
        data: rows
            .into_iter()
            .map(|r| LlmUsageRow {
                hour: keygate_core::Timestamp::from_millis(r.hour),
                route: r.route,
                deployment: r.deployment,
                requests: r.requests,
                errors: r.errors,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cached_tokens: r.cached_tokens,
                cost_usd: usd(r.micro_usd),
                fallbacks: r.fallbacks,
            })
            .collect(),
    }))
}

/// A token's usage: requests, status classes, bytes and latency per minute, hour or day, and
/// per route. Usage reaches the store every few seconds (`usage_flush_seconds`).
#[utoipa::path(get, path = "/admin/v1/tokens/{id}/usage", tag = "tokens", params(("id" = String, Path), UsageQuery),
    responses((status = 200, body = UsageResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn token_usage(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<Json<UsageResponse>, ApiError> {
    let granularity = match q.granularity.as_deref() {
        None => crate::service::Granularity::Hour,
        Some(g) => crate::service::Granularity::parse(g)
            .ok_or_else(|| Error::invalid("invalid_query", "granularity is minute, hour or day"))?,
    };
    let to = time_param(q.to.as_deref(), "to")?.unwrap_or_else(|| s.admin.now());
    let from = time_param(q.from.as_deref(), "from")?.unwrap_or_else(|| to.plus_seconds(-86_400));
    let id = token_id(&id)?;
    let r = s.admin.token_usage(&auth.key.workspace_id, &id, from, to, granularity).await?;
    Ok(Json(UsageResponse {
        token_id: id.to_string(),
        from: r.from,
        to: r.to,
        granularity: r.granularity.as_str().into(),
        buckets: r.buckets.iter().map(|b| UsageBucket { start: b.minute, counts: b.into() }).collect(),
        routes: r.routes.iter().map(|(route, u)| RouteUsage { route: route.clone(), counts: u.into() }).collect(),
        total: (&r.total).into(),
    }))
}

/// The access review: every token that is not revoked, who holds it, its scopes and last use, and
/// whether it is dormant, oldest use first; JSON or CSV (`format=csv`).
#[utoipa::path(get, path = "/admin/v1/access-review", tag = "tokens", params(AccessReviewQuery),
    responses((status = 200, description = "JSON, or CSV with format=csv",
            content((AccessReview = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn access_review(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<AccessReviewQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let (rows, truncated) = s.admin.access_review(&auth.key.workspace_id).await?;
    match q.format.as_deref() {
        Some("csv") => {
            Ok(([(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")], crate::csv::access_review(&rows))
                .into_response())
        }
        None | Some("json") => {
            let now = s.admin.now();
            let data = rows
                .iter()
                .map(|r| AccessReviewEntry {
                    token: TokenView::new(&r.token, now),
                    app_name: r.app_name.clone(),
                    owner: r.owner.clone(),
                    dormant: r.dormant,
                })
                .collect();
            Ok(Json(AccessReview { data, truncated }).into_response())
        }
        Some(_) => Err(Error::invalid("invalid_query", "format is json or csv").into()),
    }
}

/// A provider's usage report: the requests of the workspace's tokens over a range (up to 90
/// days), grouped by token, route, API, app or developer, the top consumers first, with errors
/// and latency percentiles, and per UTC day.
#[utoipa::path(get, path = "/admin/v1/reports/usage", tag = "tokens", params(UsageReportQuery),
    responses((status = 200, description = "JSON, or CSV of the groups with format=csv",
            content((crate::service::ProviderReport = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn usage_report(
    auth: Auth<TokensRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<UsageReportQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let by = match q.by.as_deref() {
        None => crate::service::ReportDimension::Route,
        Some(b) => crate::service::ReportDimension::parse(b)
            .ok_or_else(|| Error::invalid("invalid_query", "by is one of token, route, api, app, developer, reason"))?,
    };
    let to = super::extract::time_param(q.to.as_deref(), "to")?.unwrap_or_else(|| s.admin.now());
    let from = super::extract::time_param(q.from.as_deref(), "from")?
        .unwrap_or_else(|| keygate_core::Timestamp::from_millis(to.as_millis() - 30 * 86_400_000));
    let report = s.admin.usage_report(&auth.key.workspace_id, by, from, to).await?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(report).into_response()),
        Some("csv") => {
            let mut out = String::from(crate::service::ReportLine::CSV_HEADER);
            for line in &report.groups {
                out.push_str(&line.csv_line());
            }
            Ok(([(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response())
        }
        Some(_) => Err(Error::invalid("invalid_query", "format is json or csv").into()),
    }
}
