//! A person's notification settings (`/account/notifications`): which events of the current
//! workspace they are emailed about. Each event type has a default audience (the owner of the
//! app a token belongs to, the workspace's owners); anyone can opt out of a default or opt in.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::account::Role;
use minijinja::context;

use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;

async fn roles(st: &DashboardState, v: &Viewer) -> Result<(bool, bool), PageError> {
    let owns = st.admin.store().owned_apps(v.workspace(), &v.user.id).await.map_err(ctx_err(v))?;
    Ok((v.role == Role::Owner, !owns.is_empty()))
}

async fn page_inner(st: &DashboardState, v: &Viewer, msg: Option<&str>) -> Result<Response, PageError> {
    let (is_owner, owns_apps) = roles(st, v).await?;
    let settings =
        st.admin.notification_settings(v.workspace(), &v.user.id, is_owner, owns_apps).await.map_err(ctx_err(v))?;
    let rows: Vec<_> = settings
        .iter()
        .map(
            |s| context! { name => s.event_type, description => s.description, email => s.email, default => s.default },
        )
        .collect();
    Ok(st.render(
        StatusCode::OK,
        "notifications.html",
        Some(v),
        "notifications",
        context! { title => "Notifications", events => rows, address => v.user.email.clone(), notice => notice(msg) },
    ))
}

pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page_inner(&st, &v, q.msg.as_deref()).await.unwrap_or_else(|e| st.error(e))
}

pub async fn save(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    let run = async {
        let (is_owner, owns_apps) = roles(&st, &v).await?;
        st.admin
            .set_notification_settings(v.workspace(), &v.user.id, is_owner, owns_apps, &f.all("email"))
            .await
            .map_err(ctx_err(&v))?;
        Ok::<_, PageError>(see_other("/account/notifications?msg=notifications_saved"))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}
