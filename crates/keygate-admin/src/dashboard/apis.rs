//! The APIs page (`/apis`, issue 17): the workspace's APIs with their state, versions, sunset and
//! routes; owners and admins create APIs and move them (or one version) through the lifecycle —
//! publish, deprecate with a sunset and a successor, retire. When the workspace wants publishing
//! approved, an admin's publication is filed as a request that an owner approves or rejects here.
//! The same service calls as the admin API, audited with the person as actor.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::Timestamp;
use keygate_core::apis::{ApiState, PublishRequestStatus};
use keygate_core::ids::{ApiId, ApiPublishRequestId};
use minijinja::{Value, context};

use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::apis::{ApiChange, ApiDetails, NewApi, VersionChange};

fn manager(v: &Viewer) -> Result<(), PageError> {
    if v.role.manages_all() { Ok(()) } else { Err(PageError::forbidden(v, "manage APIs")) }
}

fn time(t: Option<Timestamp>) -> Option<String> {
    t.map(Timestamp::to_rfc3339)
}

fn api_row(e: &ApiDetails) -> Value {
    let a = &e.api;
    context! {
        id => a.id.to_string(),
        name => a.name.clone(),
        description => a.description.clone(),
        state => a.state.as_str(),
        deprecated_at => time(a.deprecated_at),
        sunset => time(a.sunset),
        successor => a.successor.clone(),
        versions => a.versions.iter().map(|v| context! {
            name => v.name.clone(),
            state => v.state.as_str(),
            sunset => time(v.sunset),
            successor => v.successor.clone(),
        }).collect::<Vec<_>>(),
        routes => e.routes.iter().map(|r| context! { id => r.id.clone(), path => r.path.clone(), version => r.version.clone() }).collect::<Vec<_>>(),
        pending => !e.pending.is_empty(),
        access => a.access.as_str(),
    }
}

async fn page_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<(StatusCode, String)>,
) -> Result<Response, PageError> {
    let apis = st.admin.list_apis(v.workspace()).await.map_err(ctx_err(v))?;
    let names: std::collections::HashMap<String, String> =
        apis.iter().map(|e| (e.api.id.to_string(), e.api.name.clone())).collect();
    let requests: Vec<Value> = st
        .admin
        .publish_requests(v.workspace(), Some(PublishRequestStatus::Pending))
        .await
        .map_err(ctx_err(v))?
        .into_iter()
        .map(|r| {
            context! {
                id => r.id.to_string(),
                api => names.get(r.api_id.as_str()).cloned().unwrap_or_else(|| r.api_id.to_string()),
                version => r.version,
                requested_by => r.requested_by,
                created_at => r.created_at.to_rfc3339(),
            }
        })
        .collect();
    let subscriptions =
        if v.role.manages_all() { super::subscriptions::pending(st, v, &names).await? } else { Vec::new() };
    Ok(st.render(
        error.as_ref().map_or(StatusCode::OK, |e| e.0),
        "apis.html",
        Some(v),
        "apis",
        context! {
            title => "API lifecycle",
            apis => apis.iter().map(api_row).collect::<Vec<_>>(),
            requests,
            subscriptions,
            manager => v.role.manages_all(),
            owner => v.role.is_owner(),
            notice => error.map(|(_, text)| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page_inner(&st, &v, q.msg.as_deref(), None).await.unwrap_or_else(|e| st.error(e))
}

/// An error the person can fix (a field, a move the lifecycle does not allow): the page again,
/// with the message.
pub(super) async fn again(st: &DashboardState, v: &Viewer, e: keygate_core::Error) -> Response {
    let status = match e.kind {
        keygate_core::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        keygate_core::ErrorKind::Conflict => StatusCode::CONFLICT,
        keygate_core::ErrorKind::NotFound => StatusCode::NOT_FOUND,
        _ => return st.error(PageError::from_error(e, Some(v))),
    };
    page_inner(st, v, None, Some((status, e.message.into_owned()))).await.unwrap_or_else(|e| st.error(e))
}

/// A form's sunset: empty (none), an RFC 3339 time, or a browser's `datetime-local`
/// (`2030-01-31T12:00`, read as UTC).
fn parse_sunset(raw: &str) -> Result<Option<Timestamp>, keygate_core::Error> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    let full = if raw.len() == 16 { format!("{raw}:00Z") } else { raw.to_owned() };
    Timestamp::parse_rfc3339(&full).map(Some).ok_or_else(|| {
        keygate_core::Error::invalid("invalid_sunset", "the sunset is a date and time (UTC), such as 2030-01-31T12:00")
    })
}

/// `POST /apis`: a new API, as a draft.
pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let opt = |k: &str| f.opt(k).map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned);
    let versions: Vec<String> =
        f.get("versions").split([',', ' ']).map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned).collect();
    let new = NewApi {
        name: f.get("name").trim().to_owned(),
        description: opt("description"),
        openapi: None,
        versions,
        successor: opt("successor"),
        access: keygate_core::subscriptions::ApiAccess::parse(f.get("access")),
    };
    match st.admin.create_api(v.workspace(), &v.actor(), new).await {
        Ok(_) => see_other("/apis?msg=api_created"),
        Err(e) => again(&st, &v, e).await,
    }
}

/// `POST /apis/{id}/state`: the API's (or, with `version`, a version's) new state, with its
/// sunset and successor. An owner's publication applies; an admin's waits for an owner when the
/// workspace says so.
pub async fn change_state(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let Some(id) = ApiId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    let Some(state) = ApiState::parse(f.get("state")) else {
        return again(&st, &v, keygate_core::Error::invalid("invalid_state", "choose a state")).await;
    };
    let sunset = match parse_sunset(f.get("sunset")) {
        Ok(s) => s,
        Err(e) => return again(&st, &v, e).await,
    };
    let successor = f.opt("successor").map(str::trim).filter(|x| !x.is_empty()).map(str::to_owned);
    // Leaving the fields empty keeps what is set; they only add to a deprecation.
    let sunset = sunset.map(Some);
    let successor = successor.map(Some);
    let owner = v.role.is_owner();
    let (ws, actor) = (v.workspace(), v.actor());
    let done = match f.opt("version").map(str::trim).filter(|x| !x.is_empty()) {
        Some(version) => {
            let change = VersionChange { state: Some(state), sunset, successor, validate: None };
            st.admin.update_api_version(ws, &actor, &id, version, change, owner).await
        }
        None => {
            let change = ApiChange { state: Some(state), sunset, successor, ..ApiChange::default() };
            st.admin.update_api(ws, &actor, &id, change, owner).await
        }
    };
    match done {
        Ok(out) if out.requested.is_some() => see_other("/apis?msg=api_publish_requested"),
        Ok(_) => see_other("/apis?msg=api_changed"),
        Err(e) => again(&st, &v, e).await,
    }
}

/// `POST /apis/{id}/delete`.
pub async fn delete(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(_f): CsrfForm,
) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let Some(id) = ApiId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    match st.admin.delete_api(v.workspace(), &v.actor(), &id).await {
        Ok(()) => see_other("/apis?msg=api_deleted"),
        Err(e) => again(&st, &v, e).await,
    }
}

/// `POST /apis/requests/{id}/{approve|reject}`: owners only.
pub async fn decide(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    CsrfForm(_f): CsrfForm,
) -> Response {
    if !v.role.is_owner() {
        return st.error(PageError::forbidden(&v, "decide publish requests (owners do)"));
    }
    let approve = match action.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return st.error(PageError::not_found(&v)),
    };
    let Some(id) = ApiPublishRequestId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    match st.admin.decide_publish_request(v.workspace(), &v.actor(), &id, approve).await {
        Ok(_) => see_other("/apis?msg=api_request_decided"),
        Err(e) => again(&st, &v, e).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sunsets_are_read_from_the_form() {
        assert_eq!(parse_sunset("").unwrap(), None);
        assert_eq!(parse_sunset("2030-01-31T12:00").unwrap(), Timestamp::parse_rfc3339("2030-01-31T12:00:00Z"));
        assert_eq!(
            parse_sunset("2030-01-31T12:00:00+01:00").unwrap(),
            Timestamp::parse_rfc3339("2030-01-31T11:00:00Z")
        );
        assert_eq!(parse_sunset("soon").unwrap_err().code, "invalid_sunset");
    }
}
