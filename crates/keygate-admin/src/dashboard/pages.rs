//! The dashboard's page handlers. Each reads the signed-in person (or sends them to sign in),
//! checks what their role allows, calls the service layer and renders a template. Forms post
//! back and redirect (POST/redirect/GET), with a message code in the query string.

use std::collections::HashSet;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use keygate_core::account::Role;
use keygate_core::ids::{AppId, TokenId, UserId};
use keygate_core::model::{
    AuditFilter, DEFAULT_PAGE_SIZE, LATENCY_BUCKETS_MS, PageRequest, TokenFilter, TokenRecord, TokenStatus, UsageRecord,
};
use keygate_core::policy::{Quota, QuotaPeriod, RateLimit};
use keygate_core::{Error, Timestamp};
use minijinja::{Value, context};
use serde::Deserialize;

use super::chart::{self, Bar};
use super::{CsrfForm, DashboardState, PageError, PublicForm, SignedIn, same_origin, session_cookie};
use crate::accounts::{SignIn, Viewer};
use crate::api::{AuditEventView, TokenView};
use crate::service::{Granularity, NewApp, NewToken, TokenUpdate};

/// A serializable value for a template.
pub(super) fn ser<T: serde::Serialize>(t: T) -> Value {
    Value::from(minijinja::value::Serde(t))
}

/// The fields of a submitted form (repeated names allowed, e.g. scope checkboxes).
pub(super) struct Fields(Vec<(String, String)>);

impl Fields {
    pub(super) fn parse(body: &Bytes) -> Self {
        Self(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
    }
    pub(super) fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
    }
    pub(super) fn opt(&self, name: &str) -> Option<&str> {
        Some(self.get(name).trim()).filter(|v| !v.is_empty())
    }
    pub(super) fn all(&self, name: &str) -> Vec<String> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    }
}

fn client_ip(conn: &ConnectInfo<SocketAddr>) -> Option<String> {
    Some(conn.0.ip().to_string())
}

/// A notice from the `msg` query parameter: fixed texts only, nothing reflected.
pub(super) fn notice(msg: Option<&str>) -> Value {
    let (kind, text) = match msg.unwrap_or("") {
        "2fa_on" => ("ok", "Two-factor sign-in is on."),
        "app_created" => ("ok", "App created."),
        "token_updated" => ("ok", "Token updated."),
        "token_suspended" => ("ok", "Token suspended: the gateway refuses it until it is resumed."),
        "token_resumed" => ("ok", "Token resumed."),
        "alert_acknowledged" => ("ok", "Alert acknowledged."),
        "alert_resolved" => ("ok", "Alert resolved."),
        "alert_resumed" => ("ok", "Resumed, and the alert resolved."),
        "client_suspended" => (
            "ok",
            "OAuth client suspended: it is issued no token, and its access tokens are refused, until it is resumed.",
        ),
        "client_resumed" => ("ok", "OAuth client resumed: it is issued tokens again."),
        "token_revoked" => ("ok", "Token revoked: the gateway refuses it from now on."),
        "role_changed" => ("ok", "Role changed."),
        "member_removed" => ("ok", "Member removed."),
        "invitation_withdrawn" => ("ok", "Invitation withdrawn: its link no longer works."),
        "signed_out" => ("ok", "You are signed out."),
        "settings_saved" => ("ok", "Settings saved."),
        "plan_applied" => ("ok", "The app is on its new plan."),
        "plan_saved" => ("ok", "Plan saved."),
        "limits_saved" => ("ok", "Shared limits saved: the gateway holds the app's tokens to them now."),
        "plan_requested" => ("ok", "Plan change requested: an admin will approve or deny it."),
        "plan_decided" => ("ok", "Plan request decided."),
        "keys_rotated" => (
            "ok",
            "Signing keys rotated: the new keys are in the JWKS now and sign once the publish-ahead time has passed.",
        ),
        "route_created" => ("ok", "Route added: the gateway serves it now, on every node."),
        "route_updated" => ("ok", "Route saved: the gateway serves the new version now."),
        "route_deleted" => ("ok", "Route deleted: the gateway no longer serves it."),
        "workspace_created" => ("ok", "Workspace created."),
        "workspace_renamed" => ("ok", "Workspace renamed."),
        "workspace_deleted" => ("ok", "Workspace deleted: its tokens, root keys and routes no longer work."),
        "root_key_revoked" => ("ok", "Root key revoked: it is refused from its next request on."),
        "notifications_saved" => ("ok", "Notification settings saved."),
        "webhook_test_sent" => ("ok", "Test event queued: it shows in the deliveries within seconds."),
        "webhook_enabled" => ("ok", "Endpoint enabled: its pending deliveries are sent now."),
        "webhook_disabled" => ("ok", "Endpoint disabled: nothing is sent or queued for it until it is enabled."),
        "webhook_deleted" => ("ok", "Endpoint deleted, with its deliveries."),
        "api_created" => ("ok", "API created, as a draft: its routes serve this workspace only until it is published."),
        "api_changed" => ("ok", "API changed: the gateway applies its new state now, on every node."),
        "api_publish_requested" => ("ok", "Publishing requested: an owner will approve or reject it."),
        "api_request_decided" => ("ok", "Publish request decided."),
        "api_access_changed" => ("ok", "Access changed: every node applies it now."),
        "subscribed" => ("ok", "Subscribed: the app's tokens may call the API."),
        "subscription_requested" => (
            "ok",
            "Subscription requested: an owner or admin approves it; until then the app's tokens are refused on the API.",
        ),
        "subscription_approved" => ("ok", "Subscription approved: the app's tokens may call the API."),
        "subscription_rejected" => ("ok", "Subscription rejected."),
        "subscription_cancelled" => {
            ("ok", "Subscription cancelled: the app's tokens are refused on the API from now on.")
        }
        "api_deleted" => ("ok", "API deleted."),
        "provider_created" => ("ok", "Provider added; its key is sealed and will not be shown again."),
        "provider_key_rotated" => {
            ("ok", "The provider's new key is in use from the next call; revoke the old one at the provider.")
        }
        "provider_deleted" => ("ok", "Provider deleted, with its sealed key."),
        "webhook_redelivered" => ("ok", "Delivery queued again: it is sent within seconds, with the same webhook-id."),
        "2fa_required" => ("warn", "This workspace requires two-factor sign-in: turn it on to continue."),
        _ => return Value::from(()),
    };
    context! { kind, text }
}

#[derive(Deserialize, Default)]
pub struct MsgQuery {
    pub(super) msg: Option<String>,
}

pub(super) fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// Apps a developer owns; `None` for roles that see the whole workspace.
pub(super) async fn owned_apps(st: &DashboardState, v: &Viewer) -> Result<Option<HashSet<AppId>>, PageError> {
    if v.role != Role::Developer {
        return Ok(None);
    }
    let apps =
        st.admin.store().owned_apps(v.workspace(), &v.user.id).await.map_err(|e| PageError::from_error(e, Some(v)))?;
    Ok(Some(apps.into_iter().collect()))
}

pub(super) fn visible(owned: &Option<HashSet<AppId>>, app: &AppId) -> bool {
    owned.as_ref().is_none_or(|o| o.contains(app))
}

/// The token by id, if this person may see it (others' tokens are "not found", not "forbidden").
async fn token_for(st: &DashboardState, v: &Viewer, id: &str) -> Result<TokenRecord, PageError> {
    let id = TokenId::parse(id).ok_or_else(|| PageError::not_found(v))?;
    let t = st.admin.token(v.workspace(), &id).await.map_err(|e| PageError::from_error(e, Some(v)))?;
    if !visible(&owned_apps(st, v).await?, &t.app_id) {
        return Err(PageError::not_found(v));
    }
    Ok(t)
}

/// A token this person may change.
async fn writable_token(st: &DashboardState, v: &Viewer, id: &str) -> Result<TokenRecord, PageError> {
    if !v.role.can_write() {
        return Err(PageError::forbidden(v, "change tokens"));
    }
    token_for(st, v, id).await
}

macro_rules! page {
    ($st:expr, $body:expr) => {
        match $body {
            Ok(r) => r,
            Err(e) => $st.error(e),
        }
    };
}

pub(super) fn ctx_err(v: &Viewer) -> impl Fn(Error) -> PageError + '_ {
    move |e| PageError::from_error(e, Some(v))
}

// ---- first run and sign-in ------------------------------------------------------------------

pub async fn setup_page(State(st): State<DashboardState>) -> Response {
    if !st.accounts.setup_open() {
        return see_other("/login");
    }
    st.render(StatusCode::OK, "setup.html", None, "", context! { title => "Set up keygate", form => context!{} })
}

pub async fn setup_submit(
    State(st): State<DashboardState>,
    conn: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    PublicForm(f): PublicForm,
) -> Response {
    if !same_origin(&headers) {
        return st.error(PageError::Status(StatusCode::FORBIDDEN, "cross-site form refused".into(), None));
    }
    match st
        .accounts
        .complete_setup(f.get("code"), f.get("email"), f.get("name"), f.get("password"), client_ip(&conn))
        .await
    {
        Ok(secret) => {
            end_previous_session(&st, &headers).await;
            signed_in_redirect(&st, &secret, "/")
        }
        Err(e) => st.render(
            StatusCode::BAD_REQUEST,
            "setup.html",
            None,
            "",
            context! { title => "Set up keygate", notice => context!{ kind => "error", text => public_message(&e) },
            form => context!{ name => f.get("name"), email => f.get("email") } },
        ),
    }
}

/// The text of an error shown before sign-in: internal errors are logged, not shown.
fn public_message(e: &Error) -> String {
    if e.kind == keygate_core::ErrorKind::Internal || e.kind == keygate_core::ErrorKind::Unavailable {
        tracing::error!(error = %e, "dashboard sign-in step failed");
        "something went wrong on our side; try again, and see the server log if it persists".into()
    } else {
        e.message.to_string()
    }
}

/// Ends the session the browser held before signing in again (a new secret at every sign-in).
async fn end_previous_session(st: &DashboardState, headers: &HeaderMap) {
    if let Some(old) = session_cookie(headers)
        && let Err(e) = st.accounts.sign_out(&old).await
    {
        tracing::warn!(error = %e, "could not end the previous dashboard session");
    }
}

pub(super) fn signed_in_redirect(st: &DashboardState, secret: &str, to: &str) -> Response {
    let mut r = see_other(to);
    r.headers_mut().insert(header::SET_COOKIE, st.cookie(secret));
    r
}

pub async fn login_page(State(st): State<DashboardState>, Query(q): Query<MsgQuery>) -> Response {
    if st.accounts.setup_open() {
        return see_other("/setup");
    }
    st.render(
        StatusCode::OK,
        "login.html",
        None,
        "",
        context! { title => "Sign in", form => context!{}, notice => notice(q.msg.as_deref()) },
    )
}

pub async fn login_submit(
    State(st): State<DashboardState>,
    conn: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    PublicForm(f): PublicForm,
) -> Response {
    if !same_origin(&headers) {
        return st.error(PageError::Status(StatusCode::FORBIDDEN, "cross-site form refused".into(), None));
    }
    match st.accounts.sign_in(f.get("email"), f.get("password"), client_ip(&conn)).await {
        Ok(SignIn::Done(secret)) => {
            end_previous_session(&st, &headers).await;
            signed_in_redirect(&st, &secret, "/")
        }
        Ok(SignIn::NeedsSecondFactor(secret)) => {
            end_previous_session(&st, &headers).await;
            signed_in_redirect(&st, &secret, "/login/2fa")
        }
        Err(e) => {
            let status =
                if e.code == "too_many_attempts" { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::UNAUTHORIZED };
            st.render(
                status,
                "login.html",
                None,
                "",
                context! { title => "Sign in", notice => context!{ kind => "error", text => public_message(&e) },
                form => context!{ email => f.get("email") } },
            )
        }
    }
}

pub async fn second_factor_page(State(st): State<DashboardState>, headers: HeaderMap) -> Response {
    let Some(cookie) = session_cookie(&headers) else { return see_other("/login") };
    match st.accounts.pending(&cookie).await {
        Ok(true) => st.render(
            StatusCode::OK,
            "login_2fa.html",
            None,
            "",
            context! { title => "Two-factor sign-in", pending_csrf => st.accounts.csrf_token(&cookie) },
        ),
        _ => see_other("/login"),
    }
}

pub async fn second_factor_submit(
    State(st): State<DashboardState>,
    headers: HeaderMap,
    CsrfForm(f): CsrfForm,
) -> Response {
    let Some(cookie) = session_cookie(&headers) else { return see_other("/login") };
    match st.accounts.second_factor(&cookie, f.get("code")).await {
        Ok(secret) => signed_in_redirect(&st, &secret, "/"),
        Err(e) if e.code == "session_expired" => see_other("/login"),
        Err(e) => st.render(
            StatusCode::UNAUTHORIZED,
            "login_2fa.html",
            None,
            "",
            context! { title => "Two-factor sign-in", pending_csrf => st.accounts.csrf_token(&cookie),
            notice => context!{ kind => "error", text => public_message(&e) } },
        ),
    }
}

pub async fn logout(State(st): State<DashboardState>, headers: HeaderMap, _form: CsrfForm) -> Response {
    if let Some(cookie) = session_cookie(&headers)
        && let Err(e) = st.accounts.sign_out(&cookie).await
    {
        return st.error(e.into());
    }
    let mut r = see_other("/login?msg=signed_out");
    r.headers_mut().insert(header::SET_COOKIE, st.clear_cookie());
    r
}

// ---- home -----------------------------------------------------------------------------------

fn start_of_day(now: Timestamp) -> Timestamp {
    Timestamp::from_millis(now.as_millis().div_euclid(86_400_000) * 86_400_000)
}

pub async fn home(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    page!(st, home_inner(&st, &v).await)
}

async fn home_inner(st: &DashboardState, v: &Viewer) -> Result<Response, PageError> {
    let ws = v.workspace();
    let now = st.admin.now();
    let owned = owned_apps(st, v).await?;
    let apps: Vec<_> = st
        .admin
        .list_apps(ws, &PageRequest { limit: 500, cursor: None })
        .await
        .map_err(ctx_err(v))?
        .items
        .into_iter()
        .filter(|a| visible(&owned, &a.id))
        .collect();
    let active =
        list_visible(st, v, &owned, TokenFilter { status: Some(TokenStatus::Active), ..Default::default() }).await?;
    let soon = Timestamp::from_millis(now.as_millis() + 7 * 86_400_000);
    let expiring =
        list_visible(st, v, &owned, TokenFilter { expiring_before: Some(soon), ..Default::default() }).await?;
    let exposed = list_visible(st, v, &owned, TokenFilter { exposed: Some(true), ..Default::default() }).await?;
    // Requests today over the person's active tokens (the first page of them).
    let mut today = UsageRecord::default();
    for t in active.iter().take(50) {
        let r = st.admin.token_usage(ws, &t.id, start_of_day(now), now.plus_seconds(1), Granularity::Day).await;
        if let Ok(r) = r {
            today.add(&r.total);
        }
    }
    let errors = today.status[2] + today.status[3];
    let error_rate = if today.requests == 0 {
        "—".to_owned()
    } else {
        format!("{:.1}%", errors as f64 * 100.0 / today.requests as f64)
    };
    let events = match &owned {
        // Developers see the trail of their own actions.
        Some(_) => AuditFilter { actor: Some(v.user.id.to_string()), ..Default::default() },
        None => AuditFilter::default(),
    };
    let events =
        st.admin.audit_events(ws, &events, &PageRequest { limit: 10, cursor: None }).await.map_err(ctx_err(v))?;
    let events: Vec<AuditEventView> = events.items.iter().map(Into::into).collect();
    let events = with_actor_names(st, v, events).await;
    let view = |ts: &[TokenRecord]| ts.iter().map(|t| TokenView::new(t, now)).collect::<Vec<_>>();
    Ok(st.render(
        StatusCode::OK,
        "home.html",
        Some(v),
        "home",
        context! {
            title => "Home",
            apps => apps.iter().map(|a| context!{ id => a.id.to_string(), name => a.name.clone() }).collect::<Vec<_>>(),
            active_tokens => active.len(),
            requests_today => today.requests,
            error_rate,
            expiring => ser(view(&expiring)),
            exposed => ser(view(&exposed)),
            events,
            can_write => v.role.can_write(),
            needs_2fa => !v.user.totp_enabled,
        },
    ))
}

async fn list_visible(
    st: &DashboardState,
    v: &Viewer,
    owned: &Option<HashSet<AppId>>,
    filter: TokenFilter,
) -> Result<Vec<TokenRecord>, PageError> {
    let page = st
        .admin
        .list_tokens(v.workspace(), &filter, &PageRequest { limit: 500, cursor: None })
        .await
        .map_err(ctx_err(v))?;
    Ok(page.items.into_iter().filter(|t| visible(owned, &t.app_id)).collect())
}

// ---- two-factor enrolment -------------------------------------------------------------------

fn qr_data_uri(text: &str) -> String {
    use base64::Engine;
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => {
            let svg = code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).build();
            format!("data:image/svg+xml;base64,{}", base64::engine::general_purpose::STANDARD.encode(svg))
        }
        Err(_) => String::new(),
    }
}

pub async fn security(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page!(st, security_inner(&st, &v, q.msg.as_deref(), None).await)
}

async fn security_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    recovery: Option<Vec<String>>,
) -> Result<Response, PageError> {
    let pending = st.accounts.pending_totp(v).await.map_err(ctx_err(v))?;
    let left = st.accounts.recovery_codes_left(&v.user.id).await.map_err(ctx_err(v))?;
    let enrol = pending.map(|(uri, secret)| context! { qr => qr_data_uri(&uri), secret, uri });
    let user = st.admin.store().user(&v.user.id).await.map_err(ctx_err(v))?;
    Ok(st.render(
        StatusCode::OK,
        "security.html",
        Some(v),
        "security",
        context! {
            title => "Security",
            enabled => user.is_some_and(|u| u.totp_enabled),
            enrol,
            recovery_codes => recovery,
            codes_left => left,
            notice => notice(msg),
        },
    ))
}

pub async fn totp_start(State(st): State<DashboardState>, SignedIn(v): SignedIn, _form: CsrfForm) -> Response {
    match st.accounts.begin_totp(&v).await {
        Ok(_) => see_other("/account/security"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn totp_confirm(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    match st.accounts.confirm_totp(&v, f.get("code")).await {
        Ok(codes) => page!(st, security_inner(&st, &v, Some("2fa_on"), Some(codes)).await),
        Err(e) if e.code == "bad_code" => {
            let mut r = page!(st, security_inner(&st, &v, None, None).await);
            *r.status_mut() = StatusCode::BAD_REQUEST;
            // The enrolment page again, with the error; rendering once more keeps it simple.
            let pending = st.accounts.pending_totp(&v).await.ok().flatten();
            let enrol = pending.map(|(uri, secret)| context! { qr => qr_data_uri(&uri), secret, uri });
            st.render(
                StatusCode::BAD_REQUEST,
                "security.html",
                Some(&v),
                "security",
                context! { title => "Security", enabled => false, enrol, codes_left => 0,
                notice => context!{ kind => "error", text => e.message.to_string() } },
            )
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

// ---- apps -----------------------------------------------------------------------------------

pub async fn apps(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page!(st, apps_inner(&st, &v, q.msg.as_deref(), None).await)
}

async fn apps_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<String>,
) -> Result<Response, PageError> {
    let owned = owned_apps(st, v).await?;
    let apps =
        st.admin.list_apps(v.workspace(), &PageRequest { limit: 500, cursor: None }).await.map_err(ctx_err(v))?;
    let plans = st.admin.list_plans(v.workspace()).await.map_err(ctx_err(v))?;
    let plan_name = |id: &keygate_core::ids::PlanId| plans.iter().find(|p| p.id == *id).map(|p| p.name.clone());
    let app_name = |id: &AppId| apps.items.iter().find(|a| a.id == *id).map(|a| a.name.clone());
    let rows: Vec<Value> = apps
        .items
        .iter()
        .filter(|a| visible(&owned, &a.id))
        .map(|a| {
            let changeable =
                v.role.manages_all() || (v.role.can_write() && owned.as_ref().is_some_and(|o| o.contains(&a.id)));
            context! { id => a.id.to_string(), name => a.name.clone(), description => a.description.clone(),
            default => a.is_default, created_at => ser(a.created_at),
            plan => a.plan_id.as_ref().and_then(plan_name), changeable }
        })
        .collect();
    let requests: Vec<Value> = st
        .accounts
        .plan_requests(v)
        .await
        .map_err(ctx_err(v))?
        .iter()
        .map(|r| {
            context! { id => r.id.to_string(), app => app_name(&r.app_id).unwrap_or_else(|| r.app_id.to_string()),
            plan => plan_name(&r.plan_id).unwrap_or_else(|| r.plan_id.to_string()), note => r.note.clone(),
            status => r.status.as_str(), created_at => ser(r.created_at) }
        })
        .collect();
    let plan_options: Vec<Value> =
        plans.iter().map(|p| context! { id => p.id.to_string(), name => p.name.clone() }).collect();
    let notice = match error {
        Some(text) => context! { kind => "error", text },
        None => notice(msg),
    };
    Ok(st.render(
        if notice.get_attr("kind").ok().and_then(|k| k.as_str().map(str::to_owned)).as_deref() == Some("error") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        "apps.html",
        Some(v),
        "apps",
        context! { title => "Apps", apps => rows, can_write => v.role.can_write(), notice, plans => plan_options, requests,
                   can_decide => v.role.manages_all() },
    ))
}

pub async fn create_app(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if !v.role.can_write() {
        return st.error(PageError::forbidden(&v, "create apps"));
    }
    let new = NewApp {
        name: f.get("name").to_owned(),
        description: f.opt("description").map(str::to_owned),
        ..Default::default()
    };
    match st.admin.create_app(v.workspace(), &v.actor(), new).await {
        Ok(app) => {
            if let Err(e) = st.admin.store().set_app_owner(v.workspace(), &app.id, &v.user.id).await {
                return st.error(PageError::from_error(e, Some(&v)));
            }
            see_other("/apps?msg=app_created")
        }
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput || e.kind == keygate_core::ErrorKind::Conflict => {
            page!(st, apps_inner(&st, &v, None, Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

// ---- tokens ---------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct TokenListQuery {
    status: Option<String>,
    app: Option<String>,
    q: Option<String>,
    expiring: Option<String>,
    msg: Option<String>,
}

pub async fn tokens(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Query(q): Query<TokenListQuery>,
) -> Response {
    page!(st, tokens_inner(&st, &v, q).await)
}

async fn tokens_inner(st: &DashboardState, v: &Viewer, q: TokenListQuery) -> Result<Response, PageError> {
    let now = st.admin.now();
    let owned = owned_apps(st, v).await?;
    let filter = TokenFilter {
        app_id: q.app.as_deref().and_then(AppId::parse),
        status: q.status.as_deref().and_then(TokenStatus::parse),
        name_contains: q.q.clone().filter(|s| !s.trim().is_empty()),
        expiring_before: q.expiring.as_deref().filter(|e| *e == "7d").map(|_| now.plus_seconds(7 * 86_400)),
        exposed: None,
        created_before: None,
        expired_after: None,
        unused_since: None,
    };
    let list = list_visible(st, v, &owned, filter).await?;
    let policy = st.accounts.policy(v.workspace()).await.map_err(ctx_err(v))?;
    let (max_age, dormant_days) = (policy.max_token_age_days, policy.rules.dormant_days);
    let apps =
        st.admin.list_apps(v.workspace(), &PageRequest { limit: 500, cursor: None }).await.map_err(ctx_err(v))?;
    let app_names: std::collections::HashMap<String, String> =
        apps.items.iter().map(|a| (a.id.to_string(), a.name.clone())).collect();
    let rows: Vec<Value> = list
        .iter()
        .map(|t| {
            let view = TokenView::new(t, now);
            let app_name = app_names.get(&view.app_id).cloned().unwrap_or_default();
            let rotation_overdue = rotation_overdue(t, max_age, now);
            let dormant = dormant_days.is_some_and(|d| {
                t.status(now) == TokenStatus::Active
                    && t.last_used_at.unwrap_or(t.created_at).as_millis() < now.as_millis() - i64::from(d) * 86_400_000
            });
            context! { ..ser(&view), ..context!{ app_name, rotation_overdue, dormant } }
        })
        .collect();
    let app_options: Vec<Value> = apps
        .items
        .iter()
        .filter(|a| visible(&owned, &a.id))
        .map(|a| context! { id => a.id.to_string(), name => a.name.clone() })
        .collect();
    Ok(st.render(
        StatusCode::OK,
        "tokens.html",
        Some(v),
        "tokens",
        context! {
            title => "Tokens",
            tokens => rows,
            apps => app_options,
            q => context!{ status => q.status, app => q.app, q => q.q, expiring => q.expiring },
            can_write => v.role.can_write(),
            can_review => v.role.manages_all(),
            notice => notice(q.msg.as_deref()),
        },
    ))
}

/// `GET /tokens/access-review.csv`: the workspace's access review (owners and admins: it lists
/// every app's tokens).
pub async fn access_review_csv(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    if !v.role.manages_all() {
        return st.error(PageError::forbidden(&v, "export the access review"));
    }
    match st.admin.access_review(v.workspace()).await {
        Ok((rows, _)) => {
            let mut resp = Response::new(axum::body::Body::from(crate::csv::access_review(&rows)));
            let h = resp.headers_mut();
            h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/csv; charset=utf-8"));
            h.insert(
                axum::http::header::CONTENT_DISPOSITION,
                axum::http::HeaderValue::from_static("attachment; filename=\"access-review.csv\""),
            );
            resp
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// Whether an active token is past the workspace's `max_token_age_days` without being replaced.
fn rotation_overdue(t: &keygate_core::model::TokenRecord, max_age_days: Option<u32>, now: Timestamp) -> bool {
    max_age_days.is_some_and(|days| {
        t.replaced_by.is_none()
            && t.status(now) == TokenStatus::Active
            && now.as_millis() >= t.created_at.as_millis().saturating_add(i64::from(days) * 86_400_000)
    })
}

pub async fn new_token(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    page!(st, new_token_inner(&st, &v, None, None).await)
}

async fn new_token_inner(
    st: &DashboardState,
    v: &Viewer,
    error: Option<String>,
    form: Option<&Fields>,
) -> Result<Response, PageError> {
    if !v.role.can_write() {
        return Err(PageError::forbidden(v, "create tokens"));
    }
    let owned = owned_apps(st, v).await?;
    let apps =
        st.admin.list_apps(v.workspace(), &PageRequest { limit: 500, cursor: None }).await.map_err(ctx_err(v))?;
    let apps: Vec<Value> = apps
        .items
        .iter()
        .filter(|a| visible(&owned, &a.id))
        .map(|a| context! { id => a.id.to_string(), name => a.name.clone() })
        .collect();
    if apps.is_empty() {
        return Err(PageError::Status(
            StatusCode::CONFLICT,
            "you have no app to hold the token yet: create an app first".into(),
            Some(Box::new(v.clone())),
        ));
    }
    let groups = scope_groups(st, v).await?;
    let policy = st.accounts.policy(v.workspace()).await.map_err(ctx_err(v))?;
    let form = form.map(|f| {
        context! { name => f.get("name"), app => f.get("app"), scopes_text => f.get("scopes_text"), scopes => f.all("scopes"),
        ip_allowlist => f.get("ip_allowlist"), rate_limit => f.get("rate_limit"), quota => f.get("quota"),
        expiry => f.get("expiry"), expires_on => f.get("expires_on") }
    });
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "token_new.html",
        Some(v),
        "tokens",
        context! {
            title => "Create a token",
            apps,
            groups,
            max_days => policy.max_token_lifetime_days,
            form,
            notice => error.map(|text| context!{ kind => "error", text }),
        },
    ))
}

/// The scope catalog for the scope picker (`scope_picker.html`), grouped by API; empty when the
/// workspace has no catalog (the picker is then a text field).
pub(super) async fn scope_groups(st: &DashboardState, v: &Viewer) -> Result<Vec<Value>, PageError> {
    let scopes = st.admin.list_scopes(v.workspace()).await.map_err(ctx_err(v))?;
    let mut groups: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for s in &scopes {
        let name = s.scope.to_string();
        // The catalog entry's API, or the part of the scope before its first colon.
        let api = s.api.clone().unwrap_or_else(|| name.split(':').next().unwrap_or("").to_owned());
        groups.entry(api).or_default().push(context! { name, description => s.description.clone() });
    }
    Ok(groups.into_iter().map(|(api, scopes)| context! { api, scopes }).collect())
}

/// Where plans need an admin's approval, an app without a plan would let a developer pick any
/// scope from the catalog: its credentials (tokens, its OAuth client) wait until it is on a plan.
/// `what` ends the refusal ("before creating its tokens").
pub(super) async fn developer_may_issue(st: &DashboardState, v: &Viewer, app: &AppId, what: &str) -> Result<(), Error> {
    if v.role != Role::Developer {
        return Ok(());
    }
    let policy = st.accounts.policy(v.workspace()).await?;
    if policy.plan_changes_need_approval && st.admin.app(v.workspace(), app).await?.plan_id.is_none() {
        return Err(Error::invalid(
            "app_needs_plan",
            format!("this workspace approves plans: request a plan for this app (Apps → Change plan) {what}"),
        ));
    }
    Ok(())
}

/// Expiry from the form: a preset number of days, a date, or never.
fn expiry_from(f: &Fields, now: Timestamp) -> Result<Option<Timestamp>, Error> {
    let days = |d: i64| Some(now.plus_seconds(d * 86_400));
    match f.get("expiry") {
        "" | "never" => Ok(None),
        "7d" => Ok(days(7)),
        "30d" => Ok(days(30)),
        "90d" => Ok(days(90)),
        "365d" => Ok(days(365)),
        "date" => {
            let date = f.get("expires_on");
            Timestamp::parse_rfc3339(&format!("{date}T23:59:59Z"))
                .filter(|t| *t > now)
                .map(Some)
                .ok_or_else(|| Error::invalid("invalid_expiry", "choose an expiry date in the future (YYYY-MM-DD)"))
        }
        _ => Err(Error::invalid("invalid_expiry", "choose one of the expiry options")),
    }
}

pub(super) fn limits_from(f: &Fields) -> Result<(Option<RateLimit>, Option<Quota>), Error> {
    let rate = match f.opt("rate_limit") {
        None => None,
        Some(n) => {
            let requests: u32 = n.parse().map_err(|_| {
                Error::invalid("invalid_rate_limit", "the rate limit is a whole number of requests per minute")
            })?;
            Some(RateLimit { requests, per_seconds: 60, burst: 0 })
        }
    };
    let quota = match f.opt("quota") {
        None => None,
        Some(n) => {
            let requests: u64 =
                n.parse().map_err(|_| Error::invalid("invalid_quota", "the quota is a whole number of requests"))?;
            let period = match f.get("quota_period") {
                "month" => QuotaPeriod::Month,
                "total" => QuotaPeriod::Total,
                _ => QuotaPeriod::Day,
            };
            Some(Quota { requests, period })
        }
    };
    Ok((rate, quota))
}

pub(super) fn scopes_from(f: &Fields) -> Vec<String> {
    let mut scopes = f.all("scopes");
    scopes.extend(f.get("scopes_text").split_whitespace().map(str::to_owned));
    scopes
}

fn allowlist_from(f: &Fields) -> Vec<String> {
    f.get("ip_allowlist")
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub async fn create_token(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if !v.role.can_write() {
        return st.error(PageError::forbidden(&v, "create tokens"));
    }
    let result = async {
        let owned = owned_apps(&st, &v).await.map_err(|_| Error::internal("cannot read app ownership"))?;
        let app = AppId::parse(f.get("app"))
            .filter(|a| visible(&owned, a))
            .ok_or_else(|| Error::invalid("invalid_app", "choose one of your apps"))?;
        developer_may_issue(&st, &v, &app, "before creating its tokens").await?;
        let now = st.admin.now();
        let expires_at = expiry_from(&f, now)?;
        let (rate_limit, quota) = limits_from(&f)?;
        let new = NewToken {
            name: f.get("name").to_owned(),
            app_id: Some(app),
            scopes: scopes_from(&f),
            expires_in: None,
            expires_at,
            ip_allowlist: allowlist_from(&f),
            rate_limit,
            quota,
            metadata: None,
            dpop_jkt: None,
            llm_budget: None,
            max_uses: None,
            oauth_access_token: false,
        };
        st.admin.create_token(v.workspace(), &v.actor(), new).await
    }
    .await;
    match result {
        Ok((record, secret)) => token_created(&st, &v, &record, secret.expose(), false),
        Err(e)
            if matches!(e.kind, keygate_core::ErrorKind::InvalidInput | keygate_core::ErrorKind::NotFound)
                || e.code == "limit_above_plan" =>
        {
            page!(st, new_token_inner(&st, &v, Some(e.message.to_string()), Some(&f)).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// The page that shows a new secret, once. Not cached anywhere.
fn token_created(st: &DashboardState, v: &Viewer, record: &TokenRecord, secret: &str, rotated: bool) -> Response {
    let now = st.admin.now();
    let gw = &st.gateway_url;
    st.render(
        StatusCode::OK,
        "token_created.html",
        Some(v),
        "tokens",
        context! {
            title => "Token created",
            token => ser(TokenView::new(record, now)),
            secret,
            rotated,
            gateway => gw,
        },
    )
}

#[derive(Deserialize, Default)]
pub struct TokenPageQuery {
    g: Option<String>,
    msg: Option<String>,
}

pub async fn token(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<TokenPageQuery>,
) -> Response {
    page!(st, token_inner(&st, &v, &id, q, None).await)
}

/// p50 and p95 from the latency histogram (upper bounds of the buckets, in ms).
fn percentile(rec: &UsageRecord, p: f64) -> String {
    match rec.latency_quantile_bucket(p) {
        None => "—".into(),
        Some(i) => match LATENCY_BUCKETS_MS.get(i) {
            Some(ms) => format!("≤ {ms} ms"),
            None => "> 1 s".into(),
        },
    }
}

async fn token_inner(
    st: &DashboardState,
    v: &Viewer,
    id: &str,
    q: TokenPageQuery,
    error: Option<String>,
) -> Result<Response, PageError> {
    let t = token_for(st, v, id).await?;
    let now = st.admin.now();
    let g = q.g.as_deref().and_then(Granularity::parse).unwrap_or(Granularity::Minute);
    let span = match g {
        Granularity::Minute => 60,
        Granularity::Hour => 48,
        Granularity::Day => 30,
    };
    let to = Timestamp::from_millis((now.as_millis() / g.millis() + 1) * g.millis());
    let from = Timestamp::from_millis(to.as_millis() - span * g.millis());
    let report = st.admin.token_usage(v.workspace(), &t.id, from, to, g).await.map_err(ctx_err(v))?;
    let label = |ts: Timestamp| {
        let s = ts.to_rfc3339();
        match g {
            Granularity::Minute | Granularity::Hour => s.get(11..16).unwrap_or(&s).to_owned(),
            Granularity::Day => s.get(..10).unwrap_or(&s).to_owned(),
        }
    };
    let bars: Vec<Bar> = report
        .buckets
        .iter()
        .map(|b| Bar { label: label(b.minute), requests: b.requests, errors: b.status[2] + b.status[3] })
        .collect();
    let svg = chart::requests("usage-chart", &format!("Requests and errors per {}", g.as_str()), &bars);
    let mut routes: Vec<Value> = report
        .routes
        .iter()
        .map(|(r, u)| context! { route => r.clone(), requests => u.requests, errors => u.status[2] + u.status[3] })
        .collect();
    routes.sort_by_key(|r| {
        std::cmp::Reverse(r.get_attr("requests").ok().and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    });
    routes.truncate(5);
    // Its LLM usage (on `ai` routes) over 30 days, by provider and model, and its budgets.
    let (_, llm_rows) = st
        .admin
        .token_llm_usage(v.workspace(), &t.id, now.plus_seconds(-30 * 86_400), now.plus_seconds(3600))
        .await
        .map_err(ctx_err(v))?;
    let mut llm: std::collections::BTreeMap<String, keygate_core::llm::LlmUsage> = std::collections::BTreeMap::new();
    for r in llm_rows {
        match llm.get_mut(&r.deployment) {
            Some(u) => u.add(&r),
            None => {
                llm.insert(r.deployment.clone(), r);
            }
        }
    }
    let llm: Vec<Value> = llm
        .values()
        .map(|u| context! { deployment => u.deployment.clone(), requests => u.requests, errors => u.errors, input_tokens => u.input_tokens, output_tokens => u.output_tokens, cost => super::ai::usd(u.micro_usd) })
        .collect();
    let budgets: Vec<Value> = st
        .admin
        .token_llm_budgets(v.workspace(), &t.id)
        .await
        .map_err(ctx_err(v))?
        .iter()
        .map(|b| {
            let limit = (b.usd * 1e6).round() as u64;
            context! {
                route => b.route.clone(),
                spent => super::ai::usd(b.spent_micro_usd),
                budget => format!("${:.2}", b.usd),
                period => b.period.as_str(),
                remaining => super::ai::usd(limit.saturating_sub(b.spent_micro_usd)),
                exhausted => b.spent_micro_usd >= limit,
            }
        })
        .collect();
    let view = TokenView::new(&t, now);
    let writable = v.role.can_write() && view.status != "revoked";
    // How far the token's latest acknowledged change spread ("revoked on 3/3 nodes").
    let recent = AuditFilter { target: Some(t.id.to_string()), ..AuditFilter::default() };
    let spread = (st.admin.audit_events(v.workspace(), &recent, &PageRequest { limit: 5, cursor: None }).await)
        .map_err(ctx_err(v))?
        .items
        .iter()
        .find_map(|e| e.propagation.map(|p| (e, p)))
        .map(|(e, p)| {
            let done = match e.action.as_str() {
                "token.revoke" => "Revoked",
                "token.suspend" => "Suspended",
                "token.resume" => "Resumed",
                "token.rotate" => "Rotated",
                "token.create" => "Created",
                _ => "Last change applied",
            };
            context! { done, nodes => p.nodes, applied => p.applied, elapsed_ms => p.elapsed_ms, complete => p.complete() }
        });
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "token.html",
        Some(v),
        "tokens",
        context! {
            title => format!("Token {}", t.name),
            token => ser(&view),
            chart => Value::from_safe_string(svg),
            granularity => g.as_str(),
            total => report.total.requests,
            errors => report.total.status[2] + report.total.status[3],
            p50 => percentile(&report.total, 0.5),
            p95 => percentile(&report.total, 0.95),
            routes,
            llm,
            budgets,
            writable,
            scopes_text => view.scopes.join(" "),
            allowlist_text => view.ip_allowlist.join(", "),
            rate_limit => t.rate_limit.filter(|r| r.per_seconds == 60).map(|r| r.requests),
            quota => t.quota.map(|q| q.requests),
            quota_period => t.quota.map(|q| q.period.as_str()),
            spread,
            notice => error.map(|text| context!{ kind => "error", text }).unwrap_or_else(|| notice(q.msg.as_deref())),
        },
    ))
}

/// What a form on a token's page asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenAction {
    Edit,
    Suspend,
    Resume,
    Rotate,
    Revoke,
}

impl TokenAction {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "edit" => Some(Self::Edit),
            "suspend" => Some(Self::Suspend),
            "resume" => Some(Self::Resume),
            "rotate" => Some(Self::Rotate),
            "revoke" => Some(Self::Revoke),
            _ => None,
        }
    }
}

/// `POST /tokens/{id}/{edit|suspend|resume|rotate|revoke}`: one place that checks the person
/// may change the token, does the change, and shows a refused change on the token's page.
pub async fn token_action(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let Some(action) = TokenAction::parse(&action) else { return st.error(PageError::not_found(&v)) };
    let t = match writable_token(&st, &v, &id).await {
        Ok(t) => t,
        Err(e) => return st.error(e),
    };
    let (ws, actor) = (v.workspace(), v.actor());
    let done = match action {
        TokenAction::Edit => {
            async {
                let (rate_limit, quota) = limits_from(&f)?;
                let update = TokenUpdate {
                    name: f.opt("name").map(str::to_owned),
                    scopes: Some(scopes_from(&f)),
                    ip_allowlist: Some(allowlist_from(&f)),
                    rate_limit: Some(rate_limit),
                    quota: Some(quota),
                    ..Default::default()
                };
                st.admin.update_token(ws, &actor, &t.id, update).await.map(|_| "token_updated")
            }
            .await
        }
        TokenAction::Suspend => st.admin.suspend_token(ws, &actor, &t.id).await.map(|_| "token_suspended"),
        TokenAction::Resume => st.admin.resume_token(ws, &actor, &t.id).await.map(|_| "token_resumed"),
        TokenAction::Revoke => {
            st.admin.revoke_token(ws, &actor, &t.id, f.opt("reason").map(str::to_owned)).await.map(|_| "token_revoked")
        }
        TokenAction::Rotate => {
            let grace: u64 = f.get("grace").parse().unwrap_or(0);
            match st.admin.rotate_token(ws, &actor, &t.id, grace).await {
                Ok((record, secret)) => return token_created(&st, &v, &record.value, secret.expose(), true),
                Err(e) => Err(e),
            }
        }
    };
    match done {
        Ok(msg) => see_other(&format!("/tokens/{}?msg={msg}", t.id)),
        Err(e) if matches!(e.kind, keygate_core::ErrorKind::InvalidInput | keygate_core::ErrorKind::Conflict) => {
            page!(st, token_inner(&st, &v, &id, TokenPageQuery::default(), Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// `GET /tokens/{id}/revoke`: the confirmation page before a revocation (other actions have no
/// page of their own).
pub async fn token_action_page(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if TokenAction::parse(&action) != Some(TokenAction::Revoke) {
        return st.error(PageError::not_found(&v));
    }
    revoke_page(&st, &v, &id).await
}

async fn revoke_page(st: &DashboardState, v: &Viewer, id: &str) -> Response {
    match writable_token(st, v, id).await {
        Ok(t) => st.render(
            StatusCode::OK,
            "token_revoke.html",
            Some(v),
            "tokens",
            context! { title => "Revoke token", token => ser(TokenView::new(&t, st.admin.now())) },
        ),
        Err(e) => st.error(e),
    }
}

// ---- audit ----------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// `1`: check the workspace's audit chain and say what was found (not for developers).
    verify: Option<String>,
}

fn day_param(s: Option<&str>, end: bool) -> Option<Timestamp> {
    let s = s?.trim();
    if s.is_empty() {
        return None;
    }
    Timestamp::parse_rfc3339(s)
        .or_else(|| Timestamp::parse_rfc3339(&format!("{s}T{}Z", if end { "23:59:59" } else { "00:00:00" })))
}

/// What this person may read of the audit trail: all of it, or (developers) their own actions.
fn audit_filter(v: &Viewer, q: &AuditQuery) -> AuditFilter {
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    let mut f = AuditFilter {
        actor: nonempty(&q.actor),
        action: nonempty(&q.action),
        target: nonempty(&q.target),
        from: day_param(q.from.as_deref(), false),
        to: day_param(q.to.as_deref(), true),
    };
    if v.role == Role::Developer {
        f.actor = Some(v.user.id.to_string());
    }
    f
}

/// Audit rows for a template, with the names of the people behind `usr_…` actors.
async fn with_actor_names(st: &DashboardState, v: &Viewer, events: Vec<AuditEventView>) -> Vec<Value> {
    let names: std::collections::HashMap<String, String> =
        st.accounts.members(v).await.unwrap_or_default().into_iter().map(|(_, u)| (u.id.to_string(), u.name)).collect();
    events
        .into_iter()
        .map(|e| {
            let actor_name = names.get(&e.actor).cloned();
            context! { ..ser(e), ..context!{ actor_name } }
        })
        .collect()
}

async fn audit_events(
    st: &DashboardState,
    v: &Viewer,
    q: &AuditQuery,
    limit: u32,
) -> Result<Vec<AuditEventView>, PageError> {
    let page = st
        .admin
        .audit_events(v.workspace(), &audit_filter(v, q), &PageRequest { limit, cursor: None })
        .await
        .map_err(ctx_err(v))?;
    Ok(page.items.iter().map(Into::into).collect())
}

pub async fn audit(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<AuditQuery>) -> Response {
    let events = match audit_events(&st, &v, &q, DEFAULT_PAGE_SIZE * 4).await {
        Ok(e) => e,
        Err(e) => return st.error(e),
    };
    let can_verify = v.role != Role::Developer;
    let chain = if can_verify && q.verify.as_deref() == Some("1") {
        match st.admin.verify_audit_chain(v.workspace(), None).await {
            Ok(r) if r.intact => context! { kind => "ok", text => format!(
            "The audit chain is intact: {} events checked, from #{} to #{}; no event was changed, deleted or inserted in the database.",
            r.checked, r.from_seq + 1, r.head_seq) },
            Ok(r) => context! { kind => "error", text => format!(
            "The audit chain is broken: {}",
            r.broken.map_or_else(String::new, |b| b.message)) },
            Err(e) => return st.error(ctx_err(&v)(e)),
        }
    } else {
        Value::from(())
    };
    let qs = form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("actor", q.actor.clone().unwrap_or_default()),
            ("action", q.action.clone().unwrap_or_default()),
            ("target", q.target.clone().unwrap_or_default()),
            ("from", q.from.clone().unwrap_or_default()),
            ("to", q.to.clone().unwrap_or_default()),
        ])
        .finish();
    st.render(
        StatusCode::OK,
        "audit.html",
        Some(&v),
        "audit",
        context! { title => "Audit log", events => with_actor_names(&st, &v, events).await, q => context!{ actor => q.actor, action => q.action, target => q.target, from => q.from, to => q.to }, qs, notice => chain, can_verify },
    )
}

const EXPORT_LIMIT: u32 = 10_000;

pub async fn audit_csv(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Query(q): Query<AuditQuery>,
) -> Response {
    let events = match audit_events(&st, &v, &q, EXPORT_LIMIT).await {
        Ok(e) => e,
        Err(e) => return st.error(e),
    };
    let mut out = String::from("at,actor,action,target,source,before,after\r\n");
    for e in &events {
        let fields = [
            e.at.to_rfc3339(),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            e.source.clone().unwrap_or_default(),
            e.before.as_ref().map(ToString::to_string).unwrap_or_default(),
            e.after.as_ref().map(ToString::to_string).unwrap_or_default(),
        ];
        out.push_str(&fields.iter().map(|f| crate::csv::field(f)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    download(out, "text/csv; charset=utf-8", "keygate-audit.csv")
}

pub async fn audit_json(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Query(q): Query<AuditQuery>,
) -> Response {
    match audit_events(&st, &v, &q, EXPORT_LIMIT).await {
        Ok(events) => download(
            serde_json::to_string_pretty(&events).unwrap_or_default(),
            "application/json",
            "keygate-audit.json",
        ),
        Err(e) => st.error(e),
    }
}

fn download(body: String, content_type: &'static str, name: &'static str) -> Response {
    let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

// ---- members and invitations ----------------------------------------------------------------

pub async fn members(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page!(st, members_inner(&st, &v, q.msg.as_deref(), None, None).await)
}

async fn members_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<String>,
    invite_link: Option<String>,
) -> Result<Response, PageError> {
    if !v.role.is_owner() {
        return Err(PageError::forbidden(v, "manage members"));
    }
    let members = st.accounts.members(v).await.map_err(ctx_err(v))?;
    let rows: Vec<Value> = members
        .iter()
        .map(|(m, u)| context! { id => u.id.to_string(), name => u.name.clone(), email => u.email.clone(), role => m.role.as_str(),
                                 two_factor => u.totp_enabled, me => u.id == v.user.id })
        .collect();
    let now = st.admin.now();
    let invitations: Vec<Value> = st
        .accounts
        .invitations(v)
        .await
        .map_err(ctx_err(v))?
        .iter()
        .filter(|i| i.accepted_at.is_none() && i.expires_at > now)
        .map(|i| context! { id => i.id.to_string(), email => i.email.clone(), role => i.role.as_str(), expires_at => ser(i.expires_at) })
        .collect();
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "members.html",
        Some(v),
        "members",
        context! {
            title => "Members",
            members => rows,
            invitations,
            roles => Role::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            invite_link,
            notice => error.map(|text| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

/// Where people reach the dashboard: the configured public URL, or this request's host.
fn origin_of(st: &DashboardState, headers: &HeaderMap) -> String {
    if let Some(url) = &st.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("{}://{host}", if st.secure { "https" } else { "http" })
}

pub async fn invite(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    headers: HeaderMap,
    CsrfForm(f): CsrfForm,
) -> Response {
    let Some(role) = Role::parse(f.get("role")) else {
        return page!(st, members_inner(&st, &v, None, Some("choose a role".into()), None).await);
    };
    match st.accounts.invite(&v, f.get("email"), role).await {
        Ok((_, code)) => {
            let link = format!("{}/invite/{code}", origin_of(&st, &headers));
            page!(st, members_inner(&st, &v, None, None, Some(link)).await)
        }
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput => {
            page!(st, members_inner(&st, &v, None, Some(e.message.to_string()), None).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn set_role(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(user): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (Some(user), Some(role)) = (UserId::parse(&user), Role::parse(f.get("role"))) else {
        return st.error(PageError::not_found(&v));
    };
    match st.accounts.set_role(&v, &user, role).await {
        Ok(()) => see_other("/members?msg=role_changed"),
        Err(e) if e.kind == keygate_core::ErrorKind::Conflict => {
            page!(st, members_inner(&st, &v, None, Some(e.message.to_string()), None).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn remove_member(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(user): Path<String>,
    _form: CsrfForm,
) -> Response {
    let Some(user) = UserId::parse(&user) else { return st.error(PageError::not_found(&v)) };
    match st.accounts.remove_member(&v, &user).await {
        Ok(()) => see_other("/members?msg=member_removed"),
        Err(e) if e.kind == keygate_core::ErrorKind::Conflict => {
            page!(st, members_inner(&st, &v, None, Some(e.message.to_string()), None).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn invitation_page(State(st): State<DashboardState>, Path(code): Path<String>) -> Response {
    match st.accounts.invitation(&code).await {
        Ok(inv) => {
            let existing = st.admin.store().user_by_email(&inv.email).await.ok().flatten().is_some();
            st.render(
                StatusCode::OK,
                "invite.html",
                None,
                "",
                context! { title => "Join a workspace", email => inv.email, role => inv.role.as_str(), existing, code },
            )
        }
        Err(e) => st.error(e.into()),
    }
}

pub async fn invitation_submit(
    State(st): State<DashboardState>,
    Path(code): Path<String>,
    conn: ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    PublicForm(f): PublicForm,
) -> Response {
    if !same_origin(&headers) {
        return st.error(PageError::Status(StatusCode::FORBIDDEN, "cross-site form refused".into(), None));
    }
    match st.accounts.accept_invitation(&code, f.get("name"), f.get("password"), client_ip(&conn)).await {
        Ok(secret) => {
            end_previous_session(&st, &headers).await;
            let pending = st.accounts.pending(&secret).await.unwrap_or(false);
            signed_in_redirect(&st, &secret, if pending { "/login/2fa" } else { "/" })
        }
        Err(e) => match st.accounts.invitation(&code).await {
            Ok(inv) => {
                let existing = st.admin.store().user_by_email(&inv.email).await.ok().flatten().is_some();
                st.render(
                StatusCode::BAD_REQUEST,
                "invite.html",
                None,
                "",
                context! { title => "Join a workspace", email => inv.email, role => inv.role.as_str(), existing, code,
                           notice => context!{ kind => "error", text => public_message(&e) } },
                )
            }
            Err(e2) => st.error(e2.into()),
        },
    }
}

// ---- workspace settings ---------------------------------------------------------------------

pub async fn settings(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page!(st, settings_inner(&st, &v, q.msg.as_deref(), None).await)
}

async fn settings_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<String>,
) -> Result<Response, PageError> {
    if !v.role.is_owner() {
        return Err(PageError::forbidden(v, "change workspace settings"));
    }
    let policy = st.accounts.policy(v.workspace()).await.map_err(ctx_err(v))?;
    let plans = st.admin.list_plans(v.workspace()).await.map_err(ctx_err(v))?;
    let plans: Vec<Value> = plans
        .iter()
        .map(|p| {
            let scopes: Vec<String> = p.scopes.iter().map(ToString::to_string).collect();
            context! { id => p.id.to_string(), name => p.name.clone(), scopes_text => scopes.join(" "), scopes }
        })
        .collect();
    let signing_keys = super::oauth::signing_keys(st, v).await?;
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "settings.html",
        Some(v),
        "settings",
        context! {
            title => "Workspace settings",
            max_days => policy.max_token_lifetime_days,
            require_two_factor => policy.require_two_factor,
            plan_approval => policy.plan_changes_need_approval,
            api_publish_approval => policy.api_publish_needs_approval,
            exposure_action => policy.exposure_action.as_str(),
            rules => context! {
                require_expiry => policy.rules.require_expiry,
                allowlist_for => policy.rules.allowlist_required_for.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                dpop_for => policy.rules.dpop_required_for.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                max_tokens => policy.rules.max_active_tokens_per_app,
                deny => policy.rules.deny.join("\n"),
                dormant_days => policy.rules.dormant_days,
                suspend_dormant => policy.rules.suspend_dormant,
            },
            max_age => policy.max_token_age_days,
            suspend_unrotated => policy.suspend_unrotated,
            anomaly_suspend => policy.anomaly_suspend.map(|s| s.as_str()),
            plans,
            signing_keys,
            notice => error.map(|text| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

/// A plan's prices from the settings form: none when every field is empty.
fn pricing_from(f: &Fields) -> Result<Option<keygate_core::billing::Pricing>, Error> {
    let fields = ["currency", "flat_fee", "included_requests", "price_per_request"];
    if fields.iter().all(|k| f.opt(k).is_none()) {
        return Ok(None);
    }
    let amount = |k: &str| -> Result<f64, Error> {
        f.opt(k)
            .map(|v| v.parse::<f64>().map_err(|_| Error::invalid("invalid_pricing", format!("{v:?} is not an amount"))))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let included = f
        .opt("included_requests")
        .map(|v| v.parse::<u64>().map_err(|_| Error::invalid("invalid_pricing", "requests included is a whole number")))
        .transpose()?
        .unwrap_or(0);
    keygate_core::billing::Pricing::new(
        f.opt("currency").unwrap_or("USD"),
        amount("flat_fee")?,
        included,
        amount("price_per_request")?,
    )
    .map(Some)
}

/// The token rules of the settings form (scopes space-separated, the denylist one entry a line).
fn rules_from(f: &Fields) -> Result<keygate_core::account::TokenRules, Error> {
    let scopes = |name: &str| -> Result<Vec<keygate_core::scope::Scope>, Error> {
        f.get(name)
            .split_whitespace()
            .map(|s| {
                keygate_core::scope::Scope::parse(s).map_err(|_| {
                    Error::invalid("invalid_policy", format!("{s:?} is not a scope (such as orders:write)"))
                })
            })
            .collect()
    };
    let number = |name: &str, what: &str| -> Result<Option<u32>, Error> {
        f.opt(name)
            .map(|n| {
                n.parse::<u32>().map_err(|_| Error::invalid("invalid_policy", format!("{what} is a whole number")))
            })
            .transpose()
    };
    let rules = keygate_core::account::TokenRules {
        require_expiry: f.get("require_expiry") == "on",
        allowlist_required_for: scopes("allowlist_required_for")?,
        dpop_required_for: scopes("dpop_required_for")?,
        max_active_tokens_per_app: number("max_active_tokens_per_app", "the most active tokens per app")?,
        deny: f
            .get("deny")
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        dormant_days: number("dormant_days", "the days after which an unused token is dormant")?,
        suspend_dormant: f.get("suspend_dormant") == "on",
    };
    rules.validate()?;
    Ok(rules)
}

pub async fn save_settings(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    let max = match f.opt("max_token_lifetime_days").map(str::parse::<u32>) {
        None => None,
        Some(Ok(d)) if (1..=3650).contains(&d) => Some(d),
        Some(_) => {
            return page!(
                st,
                settings_inner(
                    &st,
                    &v,
                    None,
                    Some("the longest token lifetime is a number of days from 1 to 3650".into())
                )
                .await
            );
        }
    };
    let Some(exposure_action) =
        keygate_core::account::ExposureAction::parse(f.opt("exposure_action").unwrap_or("notify"))
    else {
        return page!(
            st,
            settings_inner(&st, &v, None, Some("a token found exposed is marked, suspended or revoked".into())).await
        );
    };
    let max_age = match f.opt("max_token_age_days").map(str::parse::<u32>) {
        None => None,
        Some(Ok(d)) if (1..=3650).contains(&d) => Some(d),
        Some(_) => {
            return page!(
                st,
                settings_inner(&st, &v, None, Some("the rotation age is a number of days from 1 to 3650".into())).await
            );
        }
    };
    let anomaly_suspend = match f.opt("anomaly_suspend") {
        None => None,
        Some(s) => match keygate_core::anomaly::Severity::parse(s) {
            Some(s) => Some(s),
            None => {
                return page!(
                    st,
                    settings_inner(
                        &st,
                        &v,
                        None,
                        Some("an anomaly alert only notifies, or suspends from a severity: low, medium or high".into())
                    )
                    .await
                );
            }
        },
    };
    let rules = match rules_from(&f) {
        Ok(r) => r,
        Err(e) => return page!(st, settings_inner(&st, &v, None, Some(e.message.to_string())).await),
    };
    let policy = keygate_core::account::WorkspacePolicy {
        rules,
        anomaly_suspend,
        max_token_lifetime_days: max,
        require_two_factor: f.get("require_two_factor") == "on",
        plan_changes_need_approval: f.get("plan_changes_need_approval") == "on",
        api_publish_needs_approval: f.get("api_publish_needs_approval") == "on",
        exposure_action,
        max_token_age_days: max_age,
        suspend_unrotated: f.get("suspend_unrotated") == "on",
    };
    if policy.require_two_factor && !v.user.totp_enabled {
        return page!(
            st,
            settings_inner(
                &st,
                &v,
                None,
                Some("turn on two-factor sign-in for your own account first, so you are not locked out".into())
            )
            .await
        );
    }
    match st.accounts.set_policy(&v, &policy).await {
        Ok(()) => see_other("/settings?msg=settings_saved"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

// ---- plans ----------------------------------------------------------------------------------

pub async fn change_plan(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (Some(app), Some(plan)) = (AppId::parse(&id), keygate_core::ids::PlanId::parse(f.get("plan"))) else {
        return page!(st, apps_inner(&st, &v, None, Some("choose a plan".into())).await);
    };
    match st.accounts.change_plan(&v, &app, &plan, f.opt("note").map(str::to_owned)).await {
        Ok(crate::accounts::PlanChange::Applied) => see_other("/apps?msg=plan_applied"),
        Ok(crate::accounts::PlanChange::Requested) => see_other("/apps?msg=plan_requested"),
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput => {
            page!(st, apps_inner(&st, &v, None, Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

async fn decide(st: DashboardState, v: Viewer, id: String, approve: bool) -> Response {
    let Some(id) = keygate_core::ids::PlanRequestId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    match st.accounts.decide_plan_request(&v, &id, approve).await {
        Ok(()) => see_other("/apps?msg=plan_decided"),
        Err(e) if matches!(e.kind, keygate_core::ErrorKind::Conflict | keygate_core::ErrorKind::InvalidInput) => {
            page!(st, apps_inner(&st, &v, None, Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn approve_plan(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    decide(st, v, id, true).await
}

pub async fn deny_plan(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    decide(st, v, id, false).await
}

pub async fn create_plan(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if !v.role.is_owner() {
        return st.error(PageError::forbidden(&v, "change plans"));
    }
    let result = async {
        let (rate_limit, quota) = limits_from(&f)?;
        let new = crate::service::NewPlan {
            name: f.get("name").to_owned(),
            description: f.opt("description").map(str::to_owned),
            scopes: scopes_from(&f),
            rate_limit,
            quota,
            pricing: pricing_from(&f)?,
        };
        st.admin.create_plan(v.workspace(), &v.actor(), new).await
    }
    .await;
    match result {
        Ok(_) => see_other("/settings?msg=plan_saved"),
        Err(e) if matches!(e.kind, keygate_core::ErrorKind::InvalidInput | keygate_core::ErrorKind::Conflict) => {
            page!(st, settings_inner(&st, &v, None, Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn set_plan_scopes(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    if !v.role.is_owner() {
        return st.error(PageError::forbidden(&v, "change plans"));
    }
    let Some(id) = keygate_core::ids::PlanId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    match st.admin.set_plan_scopes(v.workspace(), &v.actor(), &id, &scopes_from(&f)).await {
        Ok(_) => see_other("/settings?msg=plan_saved"),
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput => {
            page!(st, settings_inner(&st, &v, None, Some(e.message.to_string())).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

pub async fn withdraw_invitation(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    let Some(id) = keygate_core::ids::InvitationId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    match st.accounts.withdraw_invitation(&v, &id).await {
        Ok(()) => see_other("/members?msg=invitation_withdrawn"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}
