//! The workspace's routes (`/routes`): the routes its credentials can call (its own, then other
//! workspaces' shared ones), and for owners and admins a form to add, replace and delete the
//! routes made through the admin API. A route is written as its `[[routes]]` table in TOML (a
//! JSON object is read too), and goes through the same `Admin` calls as `/admin/v1/routes`, so
//! it is checked by the gateway's own rules (`RouteRules::parse/check`) and audited with the
//! person as actor. The config file's routes are shown read-only: they change in the file.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::Error;
use minijinja::{Value, context};
use serde_json::Map;

use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::routes::RouteEntry;

/// A person who may change the workspace's routes (owners and admins): the handlers that change
/// a route need one, so none can forget the check.
struct RouteEditor<'a>(&'a Viewer);

impl<'a> RouteEditor<'a> {
    fn of(v: &'a Viewer) -> Result<Self, PageError> {
        if v.role.manages_all() { Ok(Self(v)) } else { Err(PageError::forbidden(v, "change routes")) }
    }
}

/// What the form says after a refusal: the service's stable code and message, beside the
/// person's own text (kept, so nothing typed is lost).
struct FormError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl FormError {
    fn from_error(e: &Error) -> Self {
        Self { status: crate::api::status_of(e.kind), code: e.code, message: e.message.to_string() }
    }
}

/// A form's refusal is shown on the form for what the person can fix; anything else (not found,
/// forbidden, the store failing) is an error page.
fn fixable(e: &Error) -> bool {
    matches!(e.kind, keygate_core::ErrorKind::InvalidInput | keygate_core::ErrorKind::Conflict)
}

/// Reads the text of the route form: a TOML table (as in the config file's `[[routes]]`, without
/// the header) or, when it starts with `{`, a JSON object.
fn read_route(text: &str) -> Result<serde_json::Value, Error> {
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text)
            .map_err(|e| Error::invalid("invalid_route", format!("the route is not a valid JSON object: {e}")));
    }
    let table: toml::Table = toml::from_str(text)
        .map_err(|e| Error::invalid("invalid_route", format!("the route is not valid TOML: {}", e.message())))?;
    serde_json::to_value(table).map_err(|e| Error::invalid("invalid_route", e.to_string()))
}

/// Drops `null`s (unset optional fields), which TOML cannot write.
fn without_nulls(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect(),
        ),
        serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// A route's fields as the form shows them: TOML, as the config file would have them.
fn as_toml(config: &Map<String, serde_json::Value>) -> String {
    let clean = without_nulls(&serde_json::Value::Object(config.clone()));
    toml::to_string(&clean).unwrap_or_else(|_| serde_json::to_string_pretty(&clean).unwrap_or_default())
}

fn text_of(v: Option<&serde_json::Value>) -> Option<String> {
    v.and_then(serde_json::Value::as_str).map(str::to_owned)
}

fn route_row(r: &RouteEntry, own_workspace: &str, editor: bool) -> Value {
    let c = &r.config;
    let mut upstreams: Vec<String> = text_of(c.get("upstream")).into_iter().collect();
    upstreams.extend(
        c.get("upstreams")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str().map(str::to_owned)),
    );
    let scopes: Vec<String> = c
        .get("scopes")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten()
        .map(|(m, s)| format!("{m}: {}", s.as_str().unwrap_or_default()))
        .collect();
    // Header conditions as `name: value | value`.
    let headers: Vec<String> = c
        .get("headers")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten()
        .map(|(n, v)| {
            let values: Vec<&str> = match v {
                serde_json::Value::Array(a) => a.iter().filter_map(serde_json::Value::as_str).collect(),
                other => other.as_str().into_iter().collect(),
            };
            format!("{n}: {}", values.join(" | "))
        })
        .collect();
    let ours = r.workspace == own_workspace;
    context! {
        headers,
        id => r.id.clone(),
        path => text_of(c.get("path")),
        host => text_of(c.get("host")),
        upstreams,
        scopes,
        public => c.get("public").and_then(serde_json::Value::as_bool).unwrap_or(false),
        shared => c.get("shared").and_then(serde_json::Value::as_bool).unwrap_or(false),
        description => text_of(c.get("description")),
        source => if r.from_file { "file" } else { "api" },
        workspace => r.workspace.clone(),
        ours,
        editable => editor && ours && !r.from_file,
        updated_at => r.updated_at.map(|t| t.to_rfc3339()),
    }
}

/// What the empty form starts with: the fields most routes need.
const EXAMPLE: &str = "id = \"billing\"\npath = \"/billing\"\nupstream = \"http://127.0.0.1:9000\"\n\n[scopes]\nGET = \"billing:read\"\n\"*\" = \"billing:write\"\n";

async fn list_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    form: Option<(&str, FormError)>,
) -> Result<Response, PageError> {
    let own = st.admin.workspace(v.workspace()).await.map_err(ctx_err(v))?.name;
    let routes = st.admin.visible_routes(v.workspace()).await.map_err(ctx_err(v))?;
    let editor = RouteEditor::of(v).is_ok();
    let rows: Vec<Value> = routes.iter().map(|r| route_row(r, &own, editor)).collect();
    let (status, text, error) = match form {
        Some((text, e)) => (e.status, text.to_owned(), Some(context! { code => e.code, message => e.message })),
        None => (StatusCode::OK, EXAMPLE.to_owned(), None),
    };
    Ok(st.render(
        status,
        "routes.html",
        Some(v),
        "routes",
        context! { title => "Routes", routes => rows, workspace => own, editor, text, error, notice => notice(msg) },
    ))
}

pub async fn list(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    list_inner(&st, &v, q.msg.as_deref(), None).await.unwrap_or_else(|e| st.error(e))
}

pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    let editor = match RouteEditor::of(&v) {
        Ok(e) => e,
        Err(e) => return st.error(e),
    };
    let text = f.get("route");
    let done = match read_route(text) {
        Ok(body) => st.admin.create_route(editor.0.workspace(), &editor.0.actor(), body).await.map(drop),
        Err(e) => Err(e),
    };
    match done {
        Ok(()) => see_other("/routes?msg=route_created"),
        Err(e) if fixable(&e) => {
            list_inner(&st, &v, None, Some((text, FormError::from_error(&e)))).await.unwrap_or_else(|e| st.error(e))
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// One route of the viewer's workspace, or another workspace's shared one (read-only).
async fn route_of(st: &DashboardState, v: &Viewer, id: &str) -> Result<RouteEntry, PageError> {
    let routes = st.admin.visible_routes(v.workspace()).await.map_err(ctx_err(v))?;
    routes.into_iter().find(|r| r.id == id).ok_or_else(|| PageError::not_found(v))
}

async fn page_inner(
    st: &DashboardState,
    v: &Viewer,
    id: &str,
    form: Option<(Option<&str>, FormError)>,
) -> Result<Response, PageError> {
    let own = st.admin.workspace(v.workspace()).await.map_err(ctx_err(v))?.name;
    let route = route_of(st, v, id).await?;
    let row = route_row(&route, &own, RouteEditor::of(v).is_ok());
    let (status, text, error) = match form {
        Some((text, e)) => (
            e.status,
            text.map_or_else(|| as_toml(&route.config), str::to_owned),
            Some(context! { code => e.code, message => e.message }),
        ),
        None => (StatusCode::OK, as_toml(&route.config), None),
    };
    Ok(st.render(
        status,
        "route.html",
        Some(v),
        "routes",
        context! { title => format!("Route {}", route.id), route => row, text, error },
    ))
}

pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Path(id): Path<String>) -> Response {
    page_inner(&st, &v, &id, None).await.unwrap_or_else(|e| st.error(e))
}

pub async fn update(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let editor = match RouteEditor::of(&v) {
        Ok(e) => e,
        Err(e) => return st.error(e),
    };
    let text = f.get("route");
    let done = match read_route(text) {
        Ok(body) => st.admin.update_route(editor.0.workspace(), &editor.0.actor(), &id, body).await.map(drop),
        Err(e) => Err(e),
    };
    match done {
        Ok(()) => see_other("/routes?msg=route_updated"),
        Err(e) if fixable(&e) => page_inner(&st, &v, &id, Some((Some(text), FormError::from_error(&e))))
            .await
            .unwrap_or_else(|e| st.error(e)),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn delete(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    let editor = match RouteEditor::of(&v) {
        Ok(e) => e,
        Err(e) => return st.error(e),
    };
    match st.admin.delete_route(editor.0.workspace(), &editor.0.actor(), &id).await {
        Ok(()) => see_other("/routes?msg=route_deleted"),
        Err(e) if fixable(&e) => {
            page_inner(&st, &v, &id, Some((None, FormError::from_error(&e)))).await.unwrap_or_else(|e| st.error(e))
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;

    #[test]
    fn a_route_shown_as_toml_reads_back_as_it_was_without_its_unset_fields() {
        let config = json!({
            "id": "billing", "path": "/billing", "host": null, "upstream": "http://127.0.0.1:9000",
            "upstreams": [], "retries": 1, "public": false, "scopes": {"GET": "billing:read", "*": "billing:write"},
            "rate_limit": {"requests": 10, "per_seconds": 1}, "cors": null,
        });
        let serde_json::Value::Object(map) = config.clone() else { unreachable!() };
        let text = as_toml(&map);
        assert!(!text.contains("host") && !text.contains("cors"), "{text}");
        assert_eq!(read_route(&text).unwrap(), without_nulls(&config));
    }

    #[test]
    fn json_is_read_too_and_mistakes_say_where() {
        assert_eq!(read_route(" {\"id\": \"x\"} ").unwrap(), json!({"id": "x"}));
        let e = read_route("id = [unclosed").unwrap_err();
        assert_eq!(e.code, "invalid_route");
        assert!(e.message.contains("not valid TOML"), "{}", e.message);
        assert!(read_route("{not json").unwrap_err().message.contains("JSON"));
    }
}
