//! The instance's workspaces (`/workspaces`), for the instance's owners only: the owners of the
//! default workspace, signed in to it (keygate has no other instance-level role; the person who
//! ran the first setup is one). Listed, created, renamed and deleted through the same `Admin`
//! calls as `/admin/v1/workspaces`, audited with the person as actor. Deleting a workspace that
//! still holds tokens needs the "revoke its tokens" box ticked (the API's `revoke_tokens=true`);
//! the default workspace cannot be renamed or deleted.
//!
//! Also here, for everyone signed in: the switch between the workspaces a person is a member of
//! (`POST /workspace`, the selector in the page header).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::ids::WorkspaceId;
use keygate_core::model::{DEFAULT_WORKSPACE, Workspace};
use keygate_core::{Error, ErrorKind};
use minijinja::{Value, context};

use super::pages::{MsgQuery, ctx_err, notice, see_other, signed_in_redirect};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;

/// An owner of the instance: every handler here needs one, so none can forget the check.
struct InstanceOwner<'a>(&'a Viewer);

impl<'a> InstanceOwner<'a> {
    async fn of(st: &DashboardState, v: &'a Viewer) -> Result<Self, PageError> {
        let default = st.default_workspace().await.map_err(ctx_err(v))?;
        if v.role.is_owner() && v.workspace() == default {
            Ok(Self(v))
        } else {
            Err(PageError::forbidden(v, "manage workspaces (only owners of the default workspace can)"))
        }
    }
}

fn row(w: &Workspace) -> Value {
    context! {
        id => w.id.to_string(),
        name => w.name.clone(),
        created_at => w.created_at.to_rfc3339(),
        default => w.name == DEFAULT_WORKSPACE,
    }
}

/// A refusal the person can act on (shown on the page, with its code), or an error page.
fn fixable(e: &Error) -> bool {
    matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::Conflict)
}

fn refusal(e: &Error) -> Value {
    context! { kind => "error", text => format!("{} ({})", e.message, e.code) }
}

async fn list_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<&Error>,
) -> Result<Response, PageError> {
    let _owner = InstanceOwner::of(st, v).await?;
    let all = st.admin.list_workspaces().await.map_err(ctx_err(v))?;
    let rows: Vec<Value> = all.iter().map(row).collect();
    Ok(st.render(
        error.map_or(StatusCode::OK, |e| crate::api::status_of(e.kind)),
        "workspaces.html",
        Some(v),
        "workspaces",
        context! { title => "Workspaces", workspaces => rows, notice => error.map(refusal).unwrap_or_else(|| notice(msg)) },
    ))
}

pub async fn list(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    list_inner(&st, &v, q.msg.as_deref(), None).await.unwrap_or_else(|e| st.error(e))
}

pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    let owner = match InstanceOwner::of(&st, &v).await {
        Ok(o) => o,
        Err(e) => return st.error(e),
    };
    match st.admin.create_workspace(&owner.0.actor(), f.get("name")).await {
        Ok(_) => see_other("/workspaces?msg=workspace_created"),
        Err(e) if fixable(&e) => list_inner(&st, &v, None, Some(&e)).await.unwrap_or_else(|e| st.error(e)),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

fn workspace_id(v: &Viewer, id: &str) -> Result<WorkspaceId, PageError> {
    WorkspaceId::parse(id).ok_or_else(|| PageError::not_found(v))
}

/// What a change to one workspace needs: an instance owner, and the workspace's id.
async fn owner_and_id<'a>(
    st: &DashboardState,
    v: &'a Viewer,
    id: &str,
) -> Result<(InstanceOwner<'a>, WorkspaceId), PageError> {
    Ok((InstanceOwner::of(st, v).await?, workspace_id(v, id)?))
}

pub async fn rename(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (owner, id) = match owner_and_id(&st, &v, &id).await {
        Ok(o) => o,
        Err(e) => return st.error(e),
    };
    match st.admin.rename_workspace(&owner.0.actor(), &id, f.get("name")).await {
        Ok(_) => see_other("/workspaces?msg=workspace_renamed"),
        Err(e) if fixable(&e) => list_inner(&st, &v, None, Some(&e)).await.unwrap_or_else(|e| st.error(e)),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

async fn delete_inner(st: &DashboardState, v: &Viewer, id: &str, error: Option<&Error>) -> Result<Response, PageError> {
    let _owner = InstanceOwner::of(st, v).await?;
    let ws = st.admin.workspace(&workspace_id(v, id)?).await.map_err(ctx_err(v))?;
    Ok(st.render(
        error.map_or(StatusCode::OK, |e| crate::api::status_of(e.kind)),
        "workspace_delete.html",
        Some(v),
        "workspaces",
        context! {
            title => format!("Delete workspace {}", ws.name),
            workspace => row(&ws),
            holds_tokens => error.is_some_and(|e| e.code == "workspace_has_tokens"),
            notice => error.map(refusal),
        },
    ))
}

pub async fn delete_page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Path(id): Path<String>) -> Response {
    delete_inner(&st, &v, &id, None).await.unwrap_or_else(|e| st.error(e))
}

pub async fn delete(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (owner, ws) = match owner_and_id(&st, &v, &id).await {
        Ok(o) => o,
        Err(e) => return st.error(e),
    };
    // Tokens are revoked only when the box saying so was ticked.
    let revoke_tokens = f.get("revoke_tokens") == "yes";
    match st.admin.delete_workspace(&owner.0.actor(), &ws, revoke_tokens).await {
        Ok(_) => see_other("/workspaces?msg=workspace_deleted"),
        Err(e) if fixable(&e) => delete_inner(&st, &v, &id, Some(&e)).await.unwrap_or_else(|e| st.error(e)),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// Moves the signed-in person to another of their workspaces (the header's selector): a new
/// session there, the home page of that workspace.
pub async fn switch(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    match st.accounts.switch_workspace(&v, f.get("workspace")).await {
        Ok(secret) => signed_in_redirect(&st, &secret, "/"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// `GET /nodes`: the keygate processes sharing the store, for the instance's owners (the same
/// list as `GET /admin/v1/nodes`).
pub async fn nodes(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    nodes_inner(&st, &v).await.unwrap_or_else(|e| st.error(e))
}

async fn nodes_inner(st: &DashboardState, v: &Viewer) -> Result<Response, PageError> {
    let _owner = InstanceOwner::of(st, v).await?;
    let all = st.admin.nodes().await.map_err(ctx_err(v))?;
    let live = all.iter().filter(|n| n.state == crate::service::NodeState::Live).count();
    let rows: Vec<Value> = all
        .iter()
        .map(|n| {
            context! {
                id => n.node.id.clone(),
                state => n.state.as_str(),
                gateway => n.node.gateway_address.clone(),
                admin => n.node.admin_address.clone(),
                version => n.node.version.clone(),
                started_at => n.node.started_at.to_rfc3339(),
                heartbeat_age_s => format!("{:.1}", n.heartbeat_age_ms as f64 / 1000.0),
                applied => n.node.applied_seq,
                lag => n.lag,
            }
        })
        .collect();
    Ok(st.render(
        StatusCode::OK,
        "nodes.html",
        Some(v),
        "nodes",
        context! { title => "Nodes", nodes => rows, live, total => all.len() },
    ))
}
