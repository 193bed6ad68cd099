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
        pricing: req.pricing.as_ref().map(PricingBody::to_pricing).transpose()?,
    };
    let plan = s.admin.create_plan(&auth.key.workspace_id, &auth.actor, new).await?;
    Ok((StatusCode::CREATED, Json(PlanView::from(&plan))))
}

/// Changes a plan. Its rate limit and quota are the defaults of new tokens and the ceilings of
/// its apps and their tokens: what is above new ceilings is lowered to them, listed in
/// `adjusted`. Tokens keep their scopes: the plan's bound their next change.
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
        pricing: req.pricing.map(|p| p.as_ref().map(PricingBody::to_pricing).transpose()).transpose()?,
    };
    let (plan, adjusted) = s.admin.update_plan_adjusting(&auth.key.workspace_id, &auth.actor, &id, update).await?;
    Ok(Json(PlanView { adjusted: Some(AdjustmentView::list(adjusted)), ..PlanView::from(&plan) }))
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

/// Events per export answer; a longer trail continues through the `next` link.
const EXPORT_BATCH: usize = 5_000;

/// The workspace's audit trail as a file, newest first: JSON lines or CSV, at most 5,000 events
/// per answer, with a `Link: <…>; rel="next"` header while there are more.
#[utoipa::path(get, path = "/admin/v1/audit-events/export", tag = "audit", params(AuditExportQuery),
    responses((status = 200, description = "JSON lines (format=jsonl) or CSV (format=csv)", content((String = "application/x-ndjson"), (String = "text/csv"))),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn export_audit_events(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<AuditExportQuery>,
) -> Result<axum::response::Response, ApiError> {
    let csv = match q.format.as_deref() {
        None | Some("jsonl") => false,
        Some("csv") => true,
        Some(_) => return Err(Error::invalid("invalid_query", "format is jsonl or csv").into()),
    };
    let filter = AuditFilter {
        actor: q.actor.clone(),
        action: q.action.clone(),
        target: q.target.clone(),
        from: time_param(q.from.as_deref(), "from")?,
        to: time_param(q.to.as_deref(), "to")?,
    };
    let mut cursor = super::extract::audit_cursor(q.cursor.clone())?;
    let mut out = String::new();
    if csv {
        out.push_str("id,at,actor,action,target,source,before,after\r\n");
    }
    let mut count = 0;
    loop {
        let page = s
            .admin
            .audit_events(
                &auth.key.workspace_id,
                &filter,
                &PageRequest { limit: keygate_core::model::MAX_PAGE_SIZE, cursor: cursor.clone() },
            )
            .await?;
        for e in &page.items {
            let view = AuditEventView::from(e);
            if csv {
                let json = |v: &Option<serde_json::Value>| v.as_ref().map(ToString::to_string).unwrap_or_default();
                let cells = [
                    view.id.to_string(),
                    view.at.to_rfc3339(),
                    view.actor.clone(),
                    view.action.clone(),
                    view.target.clone(),
                    view.source.clone().unwrap_or_default(),
                    json(&view.before),
                    json(&view.after),
                ];
                let row: Vec<String> = cells.iter().map(|c| crate::csv::field(c)).collect();
                out.push_str(&row.join(","));
                out.push_str("\r\n");
            } else {
                out.push_str(&serde_json::to_string(&view).unwrap_or_default());
                out.push('\n');
            }
        }
        count += page.items.len();
        cursor = page.next_cursor;
        if cursor.is_none() || count >= EXPORT_BATCH {
            break;
        }
    }
    let content_type = if csv { "text/csv; charset=utf-8" } else { "application/x-ndjson" };
    let mut resp = axum::response::Response::new(axum::body::Body::from(out));
    let headers = resp.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static(content_type));
    if let Some(next) = cursor {
        let mut link = form_urlencoded::Serializer::new(String::new());
        link.append_pair("format", if csv { "csv" } else { "jsonl" });
        for (k, v) in
            [("actor", &q.actor), ("action", &q.action), ("target", &q.target), ("from", &q.from), ("to", &q.to)]
        {
            if let Some(v) = v {
                link.append_pair(k, v);
            }
        }
        link.append_pair("cursor", &next);
        let value = format!("</admin/v1/audit-events/export?{}>; rel=\"next\"", link.finish());
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            headers.insert(axum::http::header::LINK, v);
        }
    }
    Ok(resp)
}

/// The head of the workspace's audit chain (see `docs/security.md`, "Tamper-evident audit trail").
#[utoipa::path(get, path = "/admin/v1/audit-chain", tag = "audit",
    responses((status = 200, body = AuditChainHead)))]
pub(crate) async fn audit_chain_head(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
) -> Result<Json<AuditChainHead>, ApiError> {
    Ok(Json(s.admin.audit_chain_head(&auth.key.workspace_id).await?.into()))
}

/// Checks every link of the workspace's audit chain (and a head recorded earlier, if given):
/// `intact`, or the first broken link named.
#[utoipa::path(get, path = "/admin/v1/audit-chain/verify", tag = "audit", params(AuditChainVerifyQuery),
    responses((status = 200, body = AuditChainReport), (status = 400, body = ErrorBody)))]
pub(crate) async fn verify_audit_chain(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<AuditChainVerifyQuery>,
) -> Result<Json<AuditChainReport>, ApiError> {
    let checkpoint = match q.checkpoint.as_deref() {
        None => None,
        Some(text) => {
            let parsed = text.split_once(':').and_then(|(seq, link)| {
                let seq = seq.parse::<u64>().ok()?;
                Some(keygate_core::audit_chain::Checkpoint { seq, link: keygate_core::audit_chain::from_hex(link)? })
            });
            Some(parsed.ok_or_else(|| {
                Error::invalid(
                    "invalid_checkpoint",
                    "checkpoint is <seq>:<link>, the seq and the 64 hex digits of the link of a head from GET /audit-chain",
                )
            })?)
        }
    };
    Ok(Json(s.admin.verify_audit_chain(&auth.key.workspace_id, checkpoint).await?.into()))
}

/// How long the token index may go without reading the change feed to its end while the store
/// answers, before the node is not ready: three times the follower's poll interval (5 s).
pub(crate) const FEED_LAG_BOUND: std::time::Duration = std::time::Duration::from_secs(15);

/// How long `GET /readyz` waits for the store.
const STORE_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Liveness: the process answers HTTP. Asks nothing of the store. Needs no credential.
#[utoipa::path(get, path = "/healthz", tag = "system", security(()),
    responses((status = 200, body = Liveness)))]
pub(crate) async fn healthz() -> Json<Liveness> {
    Json(Liveness { status: "alive".into() })
}

/// Whether a node should get traffic: not ready (`None`) with the reason, or ready with what is
/// degraded. Ready needs the token index loaded and, while the store answers, the change feed
/// read to its end within [`FEED_LAG_BOUND`] (a node whose follower is stuck would serve stale
/// token states). A store that does not answer leaves the node ready: every node would see the
/// same outage, and the gateway serves from memory by design.
pub(crate) fn readiness(
    index: Option<keygate_core::verify::IndexStatus>,
    store: &Result<(), String>,
) -> Result<Option<String>, String> {
    let Some(index) = index else { return Err("the token index is not loaded yet".into()) };
    match store {
        Err(e) => Ok(Some(format!("the store does not answer ({e}); serving from memory"))),
        Ok(()) => match index.caught_up_ago {
            Some(ago) if ago <= FEED_LAG_BOUND => Ok(None),
            Some(ago) => Err(format!(
                "the token index has not read the change feed for {} s although the store answers",
                ago.as_secs()
            )),
            None => Err("the token index has not read the change feed since it loaded".into()),
        },
    }
}

/// Readiness, for load balancers and orchestrators: 200 when this node should get traffic, 503
/// with the reason when not. Needs no credential.
#[utoipa::path(get, path = "/readyz", tag = "system", security(()),
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(crate) async fn readyz(State(s): State<AdminState>) -> (StatusCode, Json<Readiness>) {
    let store = s.admin.store();
    let ping = match tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.message.into_owned()),
        Err(_) => Err(format!("no answer within {} s", STORE_PING_TIMEOUT.as_secs())),
    };
    let index = s.admin.index().map(|i| i.status());
    let verdict = readiness(index, &ping);
    let (code, status, reason) = match verdict {
        Ok(degraded) => (StatusCode::OK, "ready", degraded),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", Some(why)),
    };
    let body = Readiness {
        status: status.into(),
        reason,
        token_index: IndexReadinessView {
            loaded: index.is_some(),
            tokens: index.map_or(0, |i| i.tokens as u64),
            position: index.map_or(0, |i| i.position),
            caught_up_ms_ago: index
                .and_then(|i| i.caught_up_ago)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        },
        store: StoreReadinessView { engine: store.engine().into(), reachable: ping.is_ok(), error: ping.err() },
        version: env!("CARGO_PKG_VERSION").into(),
    };
    (code, Json(body))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keygate_core::verify::IndexStatus;

    use super::{FEED_LAG_BOUND, readiness};

    fn index(ago: Option<u64>) -> Option<IndexStatus> {
        Some(IndexStatus { tokens: 3, position: 7, caught_up_ago: ago.map(Duration::from_secs) })
    }

    #[test]
    fn a_node_is_ready_with_its_index_current_or_its_store_down() {
        assert_eq!(readiness(index(Some(1)), &Ok(())), Ok(None), "all is well");
        let bound = FEED_LAG_BOUND.as_secs();
        assert_eq!(readiness(index(Some(bound)), &Ok(())), Ok(None), "at the bound");
        let late = readiness(index(Some(bound + 1)), &Ok(())).unwrap_err();
        assert!(late.contains("has not read the change feed for 16 s"), "{late}");
        let never = readiness(index(None), &Ok(())).unwrap_err();
        assert!(never.contains("since it loaded"), "{never}");
        let unloaded = readiness(None, &Ok(())).unwrap_err();
        assert!(unloaded.contains("not loaded"), "{unloaded}");
        // The store down: ready (serving from memory), however old the index's reading.
        let down = Err("connection refused".to_owned());
        let degraded = readiness(index(Some(600)), &down).unwrap().unwrap();
        assert!(degraded.contains("connection refused") && degraded.contains("serving from memory"), "{degraded}");
        assert!(readiness(None, &down).is_err(), "but not without an index");
    }
}

/// The workspace's token rules: what every token creation and change is checked against, and the
/// addresses its routes refuse before any token work.
#[utoipa::path(get, path = "/admin/v1/policy/rules", tag = "plans",
    responses((status = 200, body = TokenRulesBody)))]
pub(crate) async fn get_token_rules(
    auth: Auth<PlansRead>,
    State(s): State<AdminState>,
) -> Result<Json<TokenRulesBody>, ApiError> {
    Ok(Json(TokenRulesBody::of(&s.admin.token_rules(&auth.key.workspace_id).await?)))
}

/// Replaces the workspace's token rules (the whole object: an absent field takes its default).
#[utoipa::path(put, path = "/admin/v1/policy/rules", tag = "plans", request_body = TokenRulesBody,
    responses((status = 200, body = TokenRulesBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn put_token_rules(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<TokenRulesBody>,
) -> Result<Json<TokenRulesBody>, ApiError> {
    let rules = req.to_rules()?;
    let rules = s.admin.set_token_rules(&auth.key.workspace_id, &auth.actor, rules).await?;
    Ok(Json(TokenRulesBody::of(&rules)))
}

/// The workspace's security and governance settings: the exposure and anomaly policies, the
/// rotation policy, the longest token lifetime, and which changes wait for approval.
#[utoipa::path(get, path = "/admin/v1/policy/settings", tag = "plans",
    responses((status = 200, body = PolicySettingsBody)))]
pub(crate) async fn get_policy_settings(
    auth: Auth<PlansRead>,
    State(s): State<AdminState>,
) -> Result<Json<PolicySettingsBody>, ApiError> {
    Ok(Json(PolicySettingsBody::of(&s.admin.store().workspace_policy(&auth.key.workspace_id).await?)))
}

/// Replaces the workspace's settings (the whole object: an absent field takes its default);
/// the token rules and the two-factor requirement stay as they are. Audited as
/// `workspace.policy_changed`.
#[utoipa::path(put, path = "/admin/v1/policy/settings", tag = "plans", request_body = PolicySettingsBody,
    responses((status = 200, body = PolicySettingsBody), (status = 400, body = ErrorBody)))]
pub(crate) async fn put_policy_settings(
    auth: Auth<PlansWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<PolicySettingsBody>,
) -> Result<Json<PolicySettingsBody>, ApiError> {
    let policy = s.admin.set_policy_settings(&auth.key.workspace_id, &auth.actor, |p| req.apply_to(p)).await?;
    Ok(Json(PolicySettingsBody::of(&policy)))
}
