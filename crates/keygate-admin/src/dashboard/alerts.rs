//! Anomaly alerts for the workspace's owners and admins (`/alerts`): the list by status (open,
//! acknowledged, resolved), an alert's page with its evidence, and acknowledge, resolve, and
//! resume the token (the one click for a false alarm). An alert is about an API key or an OAuth
//! client (whose JWT access tokens the gateway saw). The same service calls as the admin API,
//! audited with the person as actor.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::anomaly::{Alert, AlertFilter, AlertStatus, Watched};
use keygate_core::ids::AlertId;
use keygate_core::model::PageRequest;
use minijinja::{Value, context};
use serde::Deserialize;

use super::pages::{ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;

fn manager(v: &Viewer) -> Result<(), PageError> {
    if v.role.manages_all() { Ok(()) } else { Err(PageError::forbidden(v, "see the workspace's alerts")) }
}

fn row(a: &Alert) -> Value {
    let evidence = serde_json::to_string_pretty(&a.evidence).unwrap_or_default();
    context! {
        id => a.id.to_string(),
        token_id => a.subject.token().map(ToString::to_string),
        client_id => a.subject.client(),
        app_id => a.app_id.to_string(),
        kind => a.kind.as_str(),
        kind_text => a.kind.describe(),
        severity => a.severity.as_str(),
        status => a.status.as_str(),
        key => a.key.clone(),
        summary => a.summary.clone(),
        evidence,
        created_at => a.created_at.to_rfc3339(),
        last_seen_at => a.last_seen_at.to_rfc3339(),
        occurrences => a.occurrences,
        action => a.action.clone(),
        acknowledged_by => a.acknowledged_by.clone(),
        resolved_by => a.resolved_by.clone(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    pub msg: Option<String>,
}

pub async fn list(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<ListQuery>) -> Response {
    let run = async {
        manager(&v)?;
        let status = q.status.as_deref().map_or(Some(AlertStatus::Open), |s| {
            if s == "all" { None } else { AlertStatus::parse(s).or(Some(AlertStatus::Open)) }
        });
        let filter = AlertFilter { status, ..AlertFilter::default() };
        let page = st
            .admin
            .list_alerts(v.workspace(), &filter, &PageRequest { limit: 100, cursor: None })
            .await
            .map_err(ctx_err(&v))?;
        Ok::<_, PageError>(st.render(
            StatusCode::OK,
            "alerts.html",
            Some(&v),
            "alerts",
            context! {
                title => "Alerts",
                alerts => page.items.iter().map(row).collect::<Vec<_>>(),
                status => status.map_or("all", AlertStatus::as_str),
                notice => notice(q.msg.as_deref()),
            },
        ))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

fn id_of(v: &Viewer, raw: &str) -> Result<AlertId, PageError> {
    AlertId::parse(raw).ok_or_else(|| PageError::not_found(v))
}

pub async fn page(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let run = async {
        manager(&v)?;
        let a = st.admin.alert(v.workspace(), &id_of(&v, &id)?).await.map_err(ctx_err(&v))?;
        // The state of what the alert is about: a token's status, or whether the client is
        // suspended (what the "Resume … and resolve" button is for).
        let status = match &a.subject {
            Watched::Token(t) => st
                .admin
                .token(v.workspace(), t)
                .await
                .ok()
                .and_then(|t| serde_json::to_value(t.status(st.admin.now())).ok())
                .and_then(|v| v.as_str().map(str::to_owned)),
            Watched::Client(c) => st
                .admin
                .oauth_client(v.workspace(), c)
                .await
                .ok()
                .map(|c| if c.is_suspended() { "suspended" } else { "active" }.to_owned()),
        };
        // Why the button would be refused: suspended, but not by this alert's policy (a leak
        // response, a person, another alert).
        let refusal = st.admin.resume_refusal(v.workspace(), &a).await.map_err(ctx_err(&v))?.map(|e| e.message);
        Ok::<_, PageError>(st.render(
            StatusCode::OK,
            "alert.html",
            Some(&v),
            "alerts",
            context! {
                title => "Alert",
                alert => row(&a),
                token_status => status,
                resume_refusal => refusal,
                notice => notice(q.msg.as_deref()),
            },
        ))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

/// `POST /alerts/{id}/{action}`: `acknowledge`, `resolve`, `resume`.
pub async fn action(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    _form: CsrfForm,
) -> Response {
    let run = async {
        manager(&v)?;
        let id = id_of(&v, &id)?;
        let (ws, actor) = (v.workspace(), v.actor());
        let status = match action.as_str() {
            "acknowledge" => Some(AlertStatus::Acknowledged),
            "resolve" => Some(AlertStatus::Resolved),
            "resume" => None,
            _ => return Err(PageError::not_found(&v)),
        };
        let msg = match status {
            Some(s) => {
                st.admin.set_alert_status(ws, &actor, &id, s).await.map_err(ctx_err(&v))?;
                if s == AlertStatus::Resolved { "alert_resolved" } else { "alert_acknowledged" }
            }
            None => {
                st.admin.resume_from_alert(ws, &actor, &id).await.map_err(ctx_err(&v))?;
                "alert_resumed"
            }
        };
        Ok::<_, PageError>(see_other(&format!("/alerts/{id}?msg={msg}")))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}
