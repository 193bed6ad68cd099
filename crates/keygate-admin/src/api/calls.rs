//! `/admin/v1/calls…`: the call log (docs/operations.md): every gateway call of the workspace,
//! searched by token, app, route, status, refusal and time, and exported as JSON lines or CSV.

use axum::Json;
use axum::extract::State;
use keygate_core::Error;
use keygate_core::ids::{AppId, TokenId};
use keygate_core::model::{CallFilter, CallRecord, PageRequest};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, AuditRead, Auth, time_param};

/// One gateway call.
#[derive(Debug, Serialize, ToSchema)]
pub struct CallView {
    pub id: i64,
    pub at: String,
    pub token_id: Option<String>,
    pub app_id: Option<String>,
    /// The route's id, when one matched.
    pub route: Option<String>,
    pub method: String,
    /// The normalized path, never the query.
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    pub client_ip: String,
    /// The refusal's code when keygate refused the call (`insufficient_scope`, `rate_limited`, …).
    pub refusal: Option<String>,
}

impl From<&CallRecord> for CallView {
    fn from(c: &CallRecord) -> Self {
        Self {
            id: c.id,
            at: c.at.to_rfc3339(),
            token_id: c.token_id.as_ref().map(ToString::to_string),
            app_id: c.app_id.as_ref().map(ToString::to_string),
            route: c.route.clone(),
            method: c.method.clone(),
            path: c.path.clone(),
            status: c.status,
            latency_us: c.latency_us,
            client_ip: c.client_ip.clone(),
            refusal: c.refusal.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CallList {
    pub data: Vec<CallView>,
    pub next_cursor: Option<String>,
}

/// The filters of a list or an export: each query type below lists them (serde's `flatten` and
/// `deny_unknown_fields` do not go together), and [`Filters`] reads them alike.
macro_rules! calls_query {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Deserialize, IntoParams)]
        #[serde(deny_unknown_fields)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// Only this token's calls (`tok_…`).
            pub token_id: Option<String>,
            /// Only this app's (`app_…`).
            pub app_id: Option<String>,
            /// Only this route's (its id).
            pub route: Option<String>,
            /// A status (`404`) or a class (`4xx`).
            pub status: Option<String>,
            /// `true`: only calls keygate refused; `false`: only the others.
            pub refused: Option<bool>,
            /// Calls at or after this RFC 3339 date-time.
            pub from: Option<String>,
            /// Calls before this RFC 3339 date-time.
            pub to: Option<String>,
            pub cursor: Option<String>,
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl $name {
            fn filter(&self) -> Result<CallFilter, ApiError> {
                call_filter(
                    self.token_id.as_deref(),
                    self.app_id.as_deref(),
                    self.route.as_deref(),
                    self.status.as_deref(),
                    self.refused,
                    self.from.as_deref(),
                    self.to.as_deref(),
                )
            }
        }
    };
}

calls_query!(
    /// `GET /admin/v1/calls`.
    ListCallsQuery { limit: Option<u32>, }
);
calls_query!(
    /// `GET /admin/v1/calls/export`.
    ExportCallsQuery {
        /// `jsonl` (one call per line, as the list gives it; the default) or `csv`.
        format: Option<String>,
    }
);

fn bad(message: &'static str) -> ApiError {
    Error::invalid("invalid_query", message).into()
}

/// The filter a query asks for; shared by the list, the export and the dashboard.
pub(crate) fn call_filter(
    token_id: Option<&str>,
    app_id: Option<&str>,
    route: Option<&str>,
    status: Option<&str>,
    refused: Option<bool>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<CallFilter, ApiError> {
    let status = match status {
        None => None,
        Some(s) => {
            let class = s.strip_suffix("xx").and_then(|d| d.parse::<u16>().ok()).filter(|d| (1..=5).contains(d));
            match class.or_else(|| s.parse::<u16>().ok().filter(|n| (100..=599).contains(n))) {
                Some(n) => Some(n),
                None => return Err(bad("status is a status code (404) or a class (4xx)")),
            }
        }
    };
    Ok(CallFilter {
        token_id: token_id
            .map(|t| TokenId::parse(t).ok_or_else(|| bad("token_id is a token's id (tok_…)")))
            .transpose()?,
        app_id: app_id.map(|a| AppId::parse(a).ok_or_else(|| bad("app_id is an app's id (app_…)"))).transpose()?,
        route: route.map(str::to_owned),
        status,
        refused,
        from: time_param(from, "from")?,
        to: time_param(to, "to")?,
    })
}

/// The workspace's calls, newest first.
#[utoipa::path(get, path = "/admin/v1/calls", tag = "calls", params(ListCallsQuery),
    responses((status = 200, body = CallList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_calls(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ListCallsQuery>,
) -> Result<Json<CallList>, ApiError> {
    let filter = q.filter()?;
    let page =
        PageRequest { limit: super::extract::page_limit(q.limit)?, cursor: super::extract::audit_cursor(q.cursor)? };
    let page = s.admin.store().list_calls(&auth.key.workspace_id, &filter, &page).await?;
    Ok(Json(CallList { data: page.items.iter().map(CallView::from).collect(), next_cursor: page.next_cursor }))
}

/// Calls per export answer; more continue through the `next` link.
pub(crate) const EXPORT_BATCH: usize = 10_000;
/// Store pages one export answer reads at most.
const EXPORT_PAGES: usize = 25;

/// The calls as a file, newest first: JSON lines or CSV, at most 10,000 per answer, with a
/// `Link: <…>; rel="next"` header while there are more.
#[utoipa::path(get, path = "/admin/v1/calls/export", tag = "calls", params(ExportCallsQuery),
    responses((status = 200, description = "JSON lines (format=jsonl) or CSV (format=csv)", content((String = "application/x-ndjson"), (String = "text/csv"))),
        (status = 400, body = ErrorBody)))]
pub(crate) async fn export_calls(
    auth: Auth<AuditRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<ExportCallsQuery>,
) -> Result<axum::response::Response, ApiError> {
    let csv = match q.format.as_deref() {
        None | Some("jsonl") => false,
        Some("csv") => true,
        Some(_) => return Err(bad("format is jsonl or csv")),
    };
    let filter = q.filter()?;
    let cursor = super::extract::audit_cursor(q.cursor.clone())?;
    let (body, next) = export_body(&s.admin, &auth.key.workspace_id, &filter, cursor, csv).await?;
    let mut resp = axum::response::Response::new(axum::body::Body::from(body));
    let headers = resp.headers_mut();
    let content_type = if csv { "text/csv; charset=utf-8" } else { "application/x-ndjson" };
    headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static(content_type));
    if let Some(next) = next {
        let mut link = form_urlencoded::Serializer::new(String::new());
        link.append_pair("format", if csv { "csv" } else { "jsonl" });
        for (k, v) in [
            ("token_id", &q.token_id),
            ("app_id", &q.app_id),
            ("route", &q.route),
            ("status", &q.status),
            ("from", &q.from),
            ("to", &q.to),
        ] {
            if let Some(v) = v {
                link.append_pair(k, v);
            }
        }
        if let Some(r) = q.refused {
            link.append_pair("refused", if r { "true" } else { "false" });
        }
        link.append_pair("cursor", &next);
        let value = format!("</admin/v1/calls/export?{}>; rel=\"next\"", link.finish());
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            headers.insert(axum::http::header::LINK, v);
        }
    }
    Ok(resp)
}

/// Up to [`EXPORT_BATCH`] calls from `cursor` on, as JSON lines or CSV, and the cursor of the
/// rest (the API's export and the dashboard's download).
pub(crate) async fn export_body(
    admin: &crate::service::Admin,
    ws: &keygate_core::ids::WorkspaceId,
    filter: &CallFilter,
    mut cursor: Option<String>,
    csv: bool,
) -> keygate_core::Result<(String, Option<String>)> {
    let mut out = String::new();
    if csv {
        out.push_str("id,at,token_id,app_id,route,method,path,status,latency_us,client_ip,refusal\r\n");
    }
    let mut count = 0;
    // A filter that matches rarely makes short pages (each examines a bounded number of calls):
    // one answer reads this many pages at most, then links to the rest.
    let mut pages = 0;
    loop {
        let page = admin
            .store()
            .list_calls(ws, filter, &PageRequest { limit: keygate_core::model::MAX_PAGE_SIZE, cursor: cursor.clone() })
            .await?;
        for c in &page.items {
            let v = CallView::from(c);
            if csv {
                let cells = [
                    v.id.to_string(),
                    v.at.clone(),
                    v.token_id.clone().unwrap_or_default(),
                    v.app_id.clone().unwrap_or_default(),
                    v.route.clone().unwrap_or_default(),
                    v.method.clone(),
                    v.path.clone(),
                    v.status.to_string(),
                    v.latency_us.to_string(),
                    v.client_ip.clone(),
                    v.refusal.clone().unwrap_or_default(),
                ];
                let row: Vec<String> = cells.iter().map(|c| crate::csv::field(c)).collect();
                out.push_str(&row.join(","));
                out.push_str("\r\n");
            } else {
                out.push_str(&serde_json::to_string(&v).unwrap_or_default());
                out.push('\n');
            }
        }
        count += page.items.len();
        pages += 1;
        cursor = page.next_cursor;
        if cursor.is_none() || count >= EXPORT_BATCH || pages >= EXPORT_PAGES {
            return Ok((out, cursor));
        }
    }
}
