//! The developer portal: the API catalog from the gateway's routes, each API's documentation
//! from its OpenAPI document, code samples, plans on offer, and an explorer that sends a real
//! request through the gateway with a token the person pastes (keygate keeps only hashes, so it
//! cannot fill one in; the token travels in the form body, never in a URL or a log).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use minijinja::{Value, context};

use super::pages::{Fields, ser};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::catalog::{ApiEntry, TryAnswer};

const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

/// The APIs the viewer's workspace can call: its own routes and shared ones, but those of draft
/// and retired APIs. Another workspace's API is "not found" here, as its tokens and apps are.
fn entries(st: &DashboardState, v: &Viewer) -> Vec<ApiEntry> {
    let ws = v.workspace().as_str();
    st.catalog
        .as_ref()
        .map(|c| c.apis())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.serves_workspace(ws) && a.in_portal())
        .collect()
}

pub async fn catalog(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    let plans = match st.admin.list_plans(v.workspace()).await {
        Ok(p) => p,
        Err(e) => return st.error(PageError::from_error(e, Some(&v))),
    };
    let plans: Vec<Value> = plans
        .iter()
        .map(|p| {
            context! {
                name => p.name.clone(), description => p.description.clone(),
                scopes => p.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                rate_limit => p.rate_limit.map(|r| format!("{} requests per {} s", r.requests, r.per_seconds)),
                quota => p.quota.map(|q| format!("{} requests per {}", q.requests, q.period.as_str())),
            }
        })
        .collect();
    st.render(
        StatusCode::OK,
        "portal.html",
        Some(&v),
        "portal",
        context! { title => "APIs", apis => ser(entries(&st, &v)), plans, can_write => v.role.can_write() },
    )
}

/// The operations of an OpenAPI document, as rows to show.
fn operations(doc: &serde_json::Value) -> Vec<Value> {
    let mut out = Vec::new();
    let Some(paths) = doc.get("paths").and_then(|p| p.as_object()) else { return out };
    for (path, item) in paths {
        for m in METHODS {
            let Some(op) = item.get(m) else { continue };
            let params: Vec<String> = op
                .get("parameters")
                .and_then(|p| p.as_array())
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| {
                            let name = p.get("name")?.as_str()?;
                            let place = p.get("in").and_then(|i| i.as_str()).unwrap_or("");
                            Some(format!("{name} ({place})"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(context! {
                method => m.to_uppercase(),
                path => path.clone(),
                summary => op.get("summary").and_then(|s| s.as_str()).map(str::to_owned),
                description => op.get("description").and_then(|s| s.as_str()).map(str::to_owned),
                params,
            });
        }
    }
    out
}

async fn api_page(
    st: &DashboardState,
    v: &Viewer,
    id: &str,
    answer: Option<TryAnswer>,
    form: Option<&Fields>,
) -> Response {
    let Some(api) = entries(st, v).into_iter().find(|a| a.id == id) else {
        return st.error(PageError::not_found(v));
    };
    let (doc, doc_error) = match (&api.openapi, &st.catalog) {
        (Some(src), Some(c)) => match c.openapi(src).await {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        },
        (None, _) => (api.document.clone(), None),
        _ => (None, None),
    };
    let ops = doc.as_ref().map(operations).unwrap_or_default();
    let info = doc.as_ref().and_then(|d| d.get("info")).map(|i| {
        context! {
            title => i.get("title").and_then(|t| t.as_str()).map(str::to_owned),
            version => i.get("version").and_then(|t| t.as_str()).map(str::to_owned),
            description => i.get("description").and_then(|t| t.as_str()).map(str::to_owned),
        }
    });
    let sample_path = if api.path.is_empty() { "/".to_owned() } else { api.path.clone() };
    let url = format!("{}{}", st.gateway_url.trim_end_matches('/'), sample_path);
    st.render(
        if answer.as_ref().is_some_and(|a| a.status == 0) { StatusCode::BAD_GATEWAY } else { StatusCode::OK },
        "api.html",
        Some(v),
        "portal",
        context! {
            title => format!("API {}", api.id),
            api => ser(&api),
            info,
            operations => ops,
            doc_error,
            url,
            sample_path,
            answer => answer.map(ser),
            can_try => v.role.can_write(),
            form => form.map(|f| context!{ method => f.get("method"), path => f.get("path"), body => f.get("body") }),
        },
    )
}

pub async fn api(State(st): State<DashboardState>, SignedIn(v): SignedIn, Path(id): Path<String>) -> Response {
    api_page(&st, &v, &id, None, None).await
}

pub async fn try_it(
    State(st): State<DashboardState>,
    conn: axum::extract::ConnectInfo<std::net::SocketAddr>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let Some(api) = entries(&st, &v).into_iter().find(|a| a.id == id) else {
        return st.error(PageError::not_found(&v));
    };
    let Some(catalog) = st.catalog.clone() else { return st.error(PageError::not_found(&v)) };
    if !v.role.can_write() {
        return st.error(PageError::forbidden(&v, "send requests from the explorer"));
    }
    let method = f.get("method").to_ascii_uppercase();
    let path = f.get("path").trim().to_owned();
    let answer = if !METHODS.iter().any(|m| m.eq_ignore_ascii_case(&method)) {
        TryAnswer { status: 0, headers: Vec::new(), body: "choose an HTTP method".into(), truncated: false }
    } else {
        let body = f.opt("body").map(str::to_owned);
        // The request is the person's: the gateway checks it against their address.
        match catalog.send(conn.0.ip(), &api.id, &method, &path, f.opt("token"), body).await {
            Ok(a) => a,
            Err(e) => TryAnswer { status: 0, headers: Vec::new(), body: e, truncated: false },
        }
    };
    api_page(&st, &v, &id, Some(answer), Some(&f)).await
}
