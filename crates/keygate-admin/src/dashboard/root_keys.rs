//! The workspace's root keys for its owners (`/settings/root-keys`): the list (never a secret),
//! creating a key with permissions and an expiry (its secret shown once), and revoking one after a
//! confirmation. The same service calls as the admin API and `keygate root-key`, audited with the
//! person as actor.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::ids::RootKeyId;
use keygate_core::model::{Permission, RootKey};
use minijinja::{Value, context};

use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::service::NewRootKey;

/// Lifetimes offered when creating a key, in days (0: no expiry).
const LIFETIMES_DAYS: [u32; 6] = [7, 30, 90, 365, 0, 1];

fn owner(v: &Viewer) -> Result<(), PageError> {
    if v.role.is_owner() { Ok(()) } else { Err(PageError::forbidden(v, "manage root keys")) }
}

fn key_row(st: &DashboardState, k: &RootKey) -> Value {
    let status = k.status(st.admin.now());
    let when = |t: Option<keygate_core::Timestamp>| t.map(|t| t.to_rfc3339());
    context! {
        id => k.id.to_string(),
        name => k.name.clone(),
        display => k.display(st.admin.root_prefix().as_str()),
        permissions => k.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "),
        status => status.as_str(),
        created_at => k.created_at.to_rfc3339(),
        expires_at => when(k.expires_at),
        last_used_at => when(k.last_used_at),
        revoked_at => when(k.revoked_at),
    }
}

async fn list_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<String>,
) -> Result<Response, PageError> {
    owner(v)?;
    let keys = st.admin.list_root_keys(v.workspace()).await.map_err(ctx_err(v))?;
    let rows: Vec<Value> = keys.iter().map(|k| key_row(st, k)).collect();
    let permissions: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "root_keys.html",
        Some(v),
        "settings",
        context! {
            title => "Root keys",
            keys => rows,
            permissions,
            lifetimes => LIFETIMES_DAYS,
            notice => error.map(|text| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

pub async fn list(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    match list_inner(&st, &v, q.msg.as_deref(), None).await {
        Ok(r) => r,
        Err(e) => st.error(e),
    }
}

pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if let Err(e) = owner(&v) {
        return st.error(e);
    }
    let permissions = match Permission::parse_list(&f.all("permission")) {
        Ok(p) => p,
        Err(e) => return list_inner(&st, &v, None, Some(e.message.into_owned())).await.unwrap_or_else(|e| st.error(e)),
    };
    let expires_in = match f.opt("lifetime_days").map(str::parse::<u32>) {
        None | Some(Ok(0)) => None,
        Some(Ok(days)) if days <= 3650 => Some(i64::from(days) * 86_400),
        Some(_) => {
            return list_inner(&st, &v, None, Some("choose a lifetime from the list".into()))
                .await
                .unwrap_or_else(|e| st.error(e));
        }
    };
    let Ok(Some(ws)) = st.admin.store().workspace(v.workspace()).await else {
        return st.error(PageError::not_found(&v));
    };
    let new = NewRootKey { name: f.get("name").to_owned(), permissions, expires_in, expires_at: None };
    match st.admin.create_root_key_with(&ws.name, new, &v.actor()).await {
        Ok((key, secret)) => st.render(
            StatusCode::CREATED,
            "root_key_created.html",
            Some(&v),
            "settings",
            context! { title => "Root key created", key => key_row(&st, &key), secret => secret.expose() },
        ),
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput => {
            list_inner(&st, &v, None, Some(e.message.into_owned())).await.unwrap_or_else(|e| st.error(e))
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

async fn key_of(st: &DashboardState, v: &Viewer, id: &str) -> Result<RootKey, PageError> {
    owner(v)?;
    let id = RootKeyId::parse(id).ok_or_else(|| PageError::not_found(v))?;
    st.admin.root_key(v.workspace(), &id).await.map_err(ctx_err(v))
}

pub async fn revoke_page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Path(id): Path<String>) -> Response {
    match key_of(&st, &v, &id).await {
        Ok(k) => st.render(
            StatusCode::OK,
            "root_key_revoke.html",
            Some(&v),
            "settings",
            context! { title => "Revoke a root key", key => key_row(&st, &k) },
        ),
        Err(e) => st.error(e),
    }
}

pub async fn revoke(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    let key = match key_of(&st, &v, &id).await {
        Ok(k) => k,
        Err(e) => return st.error(e),
    };
    // Owners manage every key of their workspace: no permission comparison, as for the CLI.
    match st.admin.revoke_root_key(v.workspace(), &v.actor(), None, &key.id).await {
        Ok(_) => see_other("/settings/root-keys?msg=root_key_revoked"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}
