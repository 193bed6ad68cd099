//! The call log in the dashboard (`/calls`): the latest calls of the workspace, a token or an app,
//! filtered by status and refusal, with a download of the same selection as CSV or JSON lines.
//! Developers see the calls of their own apps' tokens only (they must pick one); the other roles
//! see the whole workspace.

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keygate_core::model::{CallFilter, CallRecord, PageRequest};
use minijinja::{Value, context};
use serde::Deserialize;

use super::pages::{owned_apps, visible};
use super::{DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;

#[derive(Debug, Default, Deserialize)]
pub struct CallsQuery {
    pub token_id: Option<String>,
    pub app_id: Option<String>,
    pub status: Option<String>,
    pub refused: Option<String>,
    pub format: Option<String>,
}

fn blank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn row(c: &CallRecord) -> Value {
    context! {
        at => c.at.to_rfc3339(),
        token_id => c.token_id.as_ref().map(ToString::to_string),
        app_id => c.app_id.as_ref().map(ToString::to_string),
        route => c.route.clone(),
        method => c.method.clone(),
        path => c.path.clone(),
        status => c.status,
        latency_ms => format!("{:.1}", c.latency_us as f64 / 1000.0),
        client_ip => c.client_ip.clone(),
        refusal => c.refusal.clone(),
    }
}

/// The filter the query asks for, if this person may see it: `Ok(None)` when a developer has not
/// picked a token or app of their own yet.
async fn filter(
    st: &DashboardState,
    v: &Viewer,
    q: &CallsQuery,
) -> Result<Result<Option<CallFilter>, String>, PageError> {
    let refused = match blank(&q.refused) {
        Some("yes") => Some(true),
        Some("no") => Some(false),
        _ => None,
    };
    let f = match crate::api::calls::call_filter(
        blank(&q.token_id),
        blank(&q.app_id),
        None,
        blank(&q.status),
        refused,
        None,
        None,
    ) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e.message)),
    };
    let owned = owned_apps(st, v).await?;
    if owned.is_none() {
        return Ok(Ok(Some(f)));
    }
    if let Some(app) = &f.app_id {
        return Ok(if visible(&owned, app) { Ok(Some(f)) } else { Err("that app is not one of yours".into()) });
    }
    if let Some(t) = &f.token_id {
        let mine = match st.admin.token(v.workspace(), t).await {
            Ok(token) => visible(&owned, &token.app_id),
            Err(_) => false,
        };
        return Ok(if mine { Ok(Some(f)) } else { Err("that token is not one of your apps'".into()) });
    }
    Ok(Ok(None))
}

pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<CallsQuery>) -> Response {
    let run = async {
        let (f, error) = match filter(&st, &v, &q).await? {
            Ok(f) => (f, None),
            Err(e) => (None, Some(e)),
        };
        let calls = match &f {
            Some(f) => {
                st.admin
                    .store()
                    .list_calls(v.workspace(), f, &PageRequest { limit: 100, cursor: None })
                    .await
                    .map_err(|e| PageError::from_error(e, Some(&v)))?
                    .items
            }
            None => Vec::new(),
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, val) in
            [("token_id", &q.token_id), ("app_id", &q.app_id), ("status", &q.status), ("refused", &q.refused)]
        {
            if let Some(val) = blank(val) {
                query.append_pair(k, val);
            }
        }
        Ok::<_, PageError>(st.render(
            if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
            "calls.html",
            Some(&v),
            "calls",
            context! {
                title => "Calls",
                calls => calls.iter().map(row).collect::<Vec<_>>(),
                chosen => f.is_some(),
                token_id => blank(&q.token_id),
                app_id => blank(&q.app_id),
                status => blank(&q.status),
                refused => blank(&q.refused),
                query => query.finish(),
                notice => error.map(|text| context! { kind => "error", text }),
            },
        ))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

/// `GET /calls/export?format=csv|jsonl&…`: the selection as a file (at most 10,000 calls, the
/// newest; the admin API's export pages through more).
pub async fn export(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<CallsQuery>) -> Response {
    let run = async {
        let csv = match blank(&q.format) {
            Some("csv") | None => true,
            Some("jsonl") => false,
            Some(_) => return Err(PageError::not_found(&v)),
        };
        let Ok(Some(f)) = filter(&st, &v, &q).await? else { return Err(PageError::not_found(&v)) };
        let (body, _) = crate::api::calls::export_body(&st.admin, v.workspace(), &f, None, csv)
            .await
            .map_err(|e| PageError::from_error(e, Some(&v)))?;
        let (ct, name) =
            if csv { ("text/csv; charset=utf-8", "calls.csv") } else { ("application/x-ndjson", "calls.jsonl") };
        let mut resp = body.into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        if let Ok(d) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, d);
        }
        Ok(resp)
    };
    run.await.unwrap_or_else(|e| st.error(e))
}
