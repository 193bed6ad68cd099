//! `/reports`: the provider's view of the workspace's consumption (owners and admins): the
//! requests of the last days grouped by API, route, app, developer or token, the top consumers
//! first, with errors and latency percentiles, a chart per day drawn on the server, and CSV.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::Timestamp;
use minijinja::{Value, context};
use serde::Deserialize;

use super::chart::{self, Bar};
use super::pages::ser;
use super::{DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::service::{ProviderReport, ReportDimension};

/// The spans the page offers, in days.
const SPANS: [i64; 3] = [7, 30, 90];

#[derive(Deserialize, Default)]
pub struct ReportQuery {
    by: Option<String>,
    days: Option<i64>,
}

async fn report(st: &DashboardState, v: &Viewer, q: &ReportQuery) -> Result<ProviderReport, PageError> {
    if !v.role.manages_all() {
        return Err(PageError::forbidden(v, "read the workspace's reports"));
    }
    let by = q.by.as_deref().and_then(ReportDimension::parse).unwrap_or(ReportDimension::Api);
    let days = q.days.filter(|d| SPANS.contains(d)).unwrap_or(30);
    let to = st.admin.now();
    let from = Timestamp::from_millis(to.as_millis() - days * 86_400_000);
    st.admin.usage_report(v.workspace(), by, from, to).await.map_err(|e| PageError::from_error(e, Some(v)))
}

/// `GET /reports`.
pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<ReportQuery>) -> Response {
    let r = match report(&st, &v, &q).await {
        Ok(r) => r,
        Err(e) => return st.error(e),
    };
    let bars: Vec<Bar> = r
        .days
        .iter()
        .map(|d| Bar { label: d.key.clone(), requests: d.requests, errors: d.client_errors + d.server_errors })
        .collect();
    let svg = chart::requests("report-chart", "Requests and errors per day", &bars);
    let days = q.days.filter(|d| SPANS.contains(d)).unwrap_or(30);
    st.render(
        StatusCode::OK,
        "reports.html",
        Some(&v),
        "reports",
        context! {
            title => "Reports",
            report => ser(&r),
            chart => Value::from_safe_string(svg),
            days,
            spans => SPANS,
        },
    )
}

/// `GET /reports.csv`: the groups of the same report as CSV.
pub async fn csv(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<ReportQuery>) -> Response {
    match report(&st, &v, &q).await {
        Ok(r) => {
            let mut out = String::from(crate::service::ReportLine::CSV_HEADER);
            for line in &r.groups {
                out.push_str(&line.csv_line());
            }
            let mut resp = Response::new(axum::body::Body::from(out));
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            resp
        }
        Err(e) => st.error(e),
    }
}
