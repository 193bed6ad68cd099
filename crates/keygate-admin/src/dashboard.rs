//! The dashboard: server-rendered pages on the admin listener (`/`), embedded in the binary,
//! loading nothing from any other host. Every flow works without JavaScript; `app.js` only adds
//! copy buttons and confirmations. Sessions live in an HttpOnly, SameSite=Strict cookie (Secure
//! when configured behind TLS); every state change carries a CSRF token derived from the
//! session and is refused from another origin; pages carry a CSP without `unsafe-inline`.

mod ai;
mod alerts;
mod apis;
mod calls;
mod chart;
mod notifications;
mod oauth;
mod pages;
mod portal;
mod reports;
mod root_keys;
mod routes;
mod subscriptions;
mod webhooks;
mod workspaces;

use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use keygate_core::{Error, ErrorKind};
use minijinja::{Environment, Value, context};

use crate::accounts::{Accounts, Viewer};
use crate::service::Admin;

/// The session cookie's name.
pub const COOKIE: &str = "keygate_session";

/// What the dashboard's handlers reach.
#[derive(Clone)]
pub struct DashboardState {
    pub admin: Arc<Admin>,
    pub accounts: Arc<Accounts>,
    templates: Arc<Environment<'static>>,
    /// Mark cookies `Secure` and send HSTS (the dashboard is served over HTTPS, directly or
    /// behind a TLS-terminating proxy).
    pub secure: bool,
    /// The gateway's address as callers reach it, for examples.
    pub gateway_url: String,
    /// The APIs behind the gateway, for the developer portal.
    pub catalog: Option<Arc<dyn crate::catalog::ApiCatalog>>,
    /// Where people reach the dashboard (`https://keys.example.com`), for links sent to them;
    /// `None`: the request's host.
    pub public_url: Option<String>,
    /// The OAuth2 authorization server, for apps' OAuth clients and the signing keys; `None`
    /// hides those screens.
    pub oauth: Option<Arc<crate::oauth::OAuth>>,
    /// The default workspace's id, read once (it is never renamed or deleted): its owners are
    /// the instance's owners, who alone manage workspaces.
    default_workspace: Arc<std::sync::OnceLock<keygate_core::ids::WorkspaceId>>,
}

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../dashboard/templates/base.html")),
    ("apis.html", include_str!("../dashboard/templates/apis.html")),
    ("audit_table.html", include_str!("../dashboard/templates/audit_table.html")),
    ("setup.html", include_str!("../dashboard/templates/setup.html")),
    ("login.html", include_str!("../dashboard/templates/login.html")),
    ("login_2fa.html", include_str!("../dashboard/templates/login_2fa.html")),
    ("home.html", include_str!("../dashboard/templates/home.html")),
    ("security.html", include_str!("../dashboard/templates/security.html")),
    ("apps.html", include_str!("../dashboard/templates/apps.html")),
    ("tokens.html", include_str!("../dashboard/templates/tokens.html")),
    ("token_new.html", include_str!("../dashboard/templates/token_new.html")),
    ("token_created.html", include_str!("../dashboard/templates/token_created.html")),
    ("token.html", include_str!("../dashboard/templates/token.html")),
    ("token_revoke.html", include_str!("../dashboard/templates/token_revoke.html")),
    ("audit.html", include_str!("../dashboard/templates/audit.html")),
    ("members.html", include_str!("../dashboard/templates/members.html")),
    ("invite.html", include_str!("../dashboard/templates/invite.html")),
    ("error.html", include_str!("../dashboard/templates/error.html")),
    ("settings.html", include_str!("../dashboard/templates/settings.html")),
    ("portal.html", include_str!("../dashboard/templates/portal.html")),
    ("api.html", include_str!("../dashboard/templates/api.html")),
    ("scope_picker.html", include_str!("../dashboard/templates/scope_picker.html")),
    ("app.html", include_str!("../dashboard/templates/app.html")),
    ("statement.html", include_str!("../dashboard/templates/statement.html")),
    ("reports.html", include_str!("../dashboard/templates/reports.html")),
    ("oauth_client_created.html", include_str!("../dashboard/templates/oauth_client_created.html")),
    ("signing_keys_rotate.html", include_str!("../dashboard/templates/signing_keys_rotate.html")),
    ("root_keys.html", include_str!("../dashboard/templates/root_keys.html")),
    ("root_key_created.html", include_str!("../dashboard/templates/root_key_created.html")),
    ("root_key_revoke.html", include_str!("../dashboard/templates/root_key_revoke.html")),
    ("routes.html", include_str!("../dashboard/templates/routes.html")),
    ("route.html", include_str!("../dashboard/templates/route.html")),
    ("workspaces.html", include_str!("../dashboard/templates/workspaces.html")),
    ("workspace_delete.html", include_str!("../dashboard/templates/workspace_delete.html")),
    ("nodes.html", include_str!("../dashboard/templates/nodes.html")),
    ("webhooks.html", include_str!("../dashboard/templates/webhooks.html")),
    ("ai.html", include_str!("../dashboard/templates/ai.html")),
    ("alerts.html", include_str!("../dashboard/templates/alerts.html")),
    ("calls.html", include_str!("../dashboard/templates/calls.html")),
    ("alert.html", include_str!("../dashboard/templates/alert.html")),
    ("notifications.html", include_str!("../dashboard/templates/notifications.html")),
    ("webhook.html", include_str!("../dashboard/templates/webhook.html")),
    ("webhook_created.html", include_str!("../dashboard/templates/webhook_created.html")),
    ("webhook_delivery.html", include_str!("../dashboard/templates/webhook_delivery.html")),
];

const CSS: &str = include_str!("../dashboard/assets/app.css");
const JS: &str = include_str!("../dashboard/assets/app.js");

impl DashboardState {
    pub fn new(admin: Arc<Admin>, accounts: Arc<Accounts>, secure: bool, gateway_url: String) -> Result<Self, String> {
        let mut env = Environment::new();
        for (name, source) in TEMPLATES {
            env.add_template(name, source).map_err(|e| format!("dashboard template {name}: {e}"))?;
        }
        Ok(Self {
            admin,
            accounts,
            templates: Arc::new(env),
            secure,
            gateway_url,
            catalog: None,
            public_url: None,
            oauth: None,
            default_workspace: Arc::default(),
        })
    }

    /// Sets the dashboard's public URL, used in invitation links.
    pub fn with_public_url(mut self, url: Option<String>) -> Self {
        self.public_url = url;
        self
    }

    /// Sets the API catalog of the developer portal.
    pub fn with_catalog(mut self, catalog: Arc<dyn crate::catalog::ApiCatalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Sets the OAuth2 authorization server whose clients and signing keys the dashboard shows.
    pub fn with_oauth(mut self, oauth: Arc<crate::oauth::OAuth>) -> Self {
        self.oauth = Some(oauth);
        self
    }

    /// The default workspace's id (read from the store the first time).
    async fn default_workspace(&self) -> keygate_core::Result<&keygate_core::ids::WorkspaceId> {
        if let Some(id) = self.default_workspace.get() {
            return Ok(id);
        }
        let ws = self.admin.bootstrap().await?;
        Ok(self.default_workspace.get_or_init(|| ws.id))
    }

    /// Whether `v` is an owner of the instance: an owner of the default workspace signed in to
    /// it (keygate has no instance-level role apart from that; the first person set up is one).
    fn is_instance_owner(&self, v: &Viewer) -> bool {
        v.role.is_owner() && self.default_workspace.get() == Some(v.workspace())
    }

    /// Renders a page; `base` adds the viewer, CSRF token and navigation to `ctx`.
    fn render(&self, status: StatusCode, name: &str, viewer: Option<&Viewer>, nav: &str, ctx: Value) -> Response {
        let base = context! {
            viewer => viewer.map(|v| context! {
                name => v.user.name.clone(), email => v.user.email.clone(), role => v.role.as_str(),
                instance_owner => self.is_instance_owner(v),
                workspace => v.workspaces.iter().find(|(id, _)| id == v.workspace()).map(|(_, n)| n.clone()),
                workspaces => v.workspaces.iter().map(|(id, n)| context! { id => id.as_str(), name => n, current => id == v.workspace() }).collect::<Vec<_>>(),
            }),
            csrf => viewer.map(|v| v.csrf.clone()),
            nav => nav,
        };
        let merged = context! { ..ctx, ..base };
        match self.templates.get_template(name).and_then(|t| t.render(merged)) {
            Ok(html) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
            Err(e) => {
                tracing::error!(template = name, error = %e, "dashboard page failed to render");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page failed to render; see the server log").into_response()
            }
        }
    }

    fn cookie(&self, secret: &str) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict{secure}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    fn clear_cookie(&self) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// A failed page request, rendered as an error page (or a redirect to sign in).
pub enum PageError {
    SignIn,
    Status(StatusCode, String, Option<Box<Viewer>>),
}

impl PageError {
    fn from_error(e: Error, viewer: Option<&Viewer>) -> Self {
        let status = match e.kind {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Unauthenticated => return PageError::SignIn,
            ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if e.kind == ErrorKind::Internal {
            "something went wrong on our side; the details are in the server log".to_owned()
        } else {
            e.message.to_string()
        };
        if e.kind == ErrorKind::Internal {
            tracing::error!(error = %e, "dashboard request failed");
        }
        PageError::Status(status, message, viewer.map(|v| Box::new(v.clone())))
    }

    fn not_found(viewer: &Viewer) -> Self {
        PageError::Status(
            StatusCode::NOT_FOUND,
            "there is nothing here, or it is not yours to see".into(),
            Some(Box::new(viewer.clone())),
        )
    }

    fn forbidden(viewer: &Viewer, what: &str) -> Self {
        PageError::Status(
            StatusCode::FORBIDDEN,
            format!("your role ({}) cannot {what}", viewer.role.as_str()),
            Some(Box::new(viewer.clone())),
        )
    }
}

impl From<Error> for PageError {
    fn from(e: Error) -> Self {
        Self::from_error(e, None)
    }
}

/// Renders errors; needs the state, so handlers map with [`DashboardState::error`].
impl DashboardState {
    fn error(&self, e: PageError) -> Response {
        match e {
            PageError::SignIn => Redirect::to("/login").into_response(),
            PageError::Status(status, message, viewer) => self.render(
                status,
                "error.html",
                viewer.as_deref(),
                "",
                context! { title => status.canonical_reason().unwrap_or("Error"), status => status.as_u16(), message },
            ),
        }
    }
}

/// The signed-in person; pages that need one take this extractor (no session: to sign-in).
pub struct SignedIn(pub Viewer);

impl FromRequestParts<DashboardState> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &DashboardState) -> Result<Self, Self::Rejection> {
        let Some(cookie) = session_cookie(&parts.headers) else {
            return Err(Redirect::to(if state.accounts.setup_open() { "/setup" } else { "/login" }).into_response());
        };
        match state.accounts.resolve(&cookie).await {
            Ok(Some(v)) => {
                // Known before any page renders, so the navigation can offer Workspaces.
                state.default_workspace().await.map_err(|e| state.error(e.into()))?;
                // A workspace that requires two-factor sign-in opens only the enrolment pages
                // (and sign-out) to members who have not turned it on.
                let path = parts.uri.path();
                let exempt = path.starts_with("/account/") || path == "/logout";
                if !v.user.totp_enabled && !exempt {
                    let policy = state.accounts.policy(v.workspace()).await.map_err(|e| state.error(e.into()))?;
                    if policy.require_two_factor {
                        return Err(Redirect::to("/account/security?msg=2fa_required").into_response());
                    }
                }
                Ok(SignedIn(v))
            }
            Ok(None) => Err(Redirect::to("/login").into_response()),
            Err(e) => Err(state.error(PageError::from(e))),
        }
    }
}

/// The request comes from a page of this dashboard: not a cross-site request (Fetch metadata)
/// and, when the browser sends `Origin`, the same host.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site == Some("cross-site") {
        return false;
    }
    match (headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()), headers.get(header::HOST)) {
        // Browsers send `Origin: null` in some same-origin cases (privacy settings, a stricter
        // referrer policy); Fetch metadata then says whether it really is same-origin.
        (Some("null"), _) => site == Some("same-origin"),
        (Some(o), Some(h)) => {
            let h = h.to_str().unwrap_or("");
            o.strip_prefix("http://").or_else(|| o.strip_prefix("https://")).is_some_and(|rest| rest == h)
        }
        _ => true,
    }
}

/// The fields of a form that changes something, after its CSRF token and origin were checked:
/// handlers that take this cannot forget the check.
struct CsrfForm(pages::Fields);

/// The largest form body read.
const MAX_FORM_BYTES: usize = crate::api::MAX_BODY_BYTES;

impl axum::extract::FromRequest<DashboardState> for CsrfForm {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &DashboardState) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let fields = read_form(state, body).await?;
        match csrf_refusal(state, &parts.headers, fields.get("csrf")) {
            Some(refusal) => Err(refusal),
            None => Ok(CsrfForm(fields)),
        }
    }
}

/// The fields of a form posted before sign-in (setup, sign-in, invitations): no session, so no
/// CSRF token, but read under the same bound.
struct PublicForm(pages::Fields);

impl axum::extract::FromRequest<DashboardState> for PublicForm {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &DashboardState) -> Result<Self, Self::Rejection> {
        read_form(state, req.into_body()).await.map(PublicForm)
    }
}

/// Reads a form body, at most [`MAX_FORM_BYTES`]: the read stops at the bound (the admin
/// listener also refuses a larger `Content-Length` before any handler runs).
async fn read_form(state: &DashboardState, body: axum::body::Body) -> Result<pages::Fields, Response> {
    match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
        Ok(bytes) => Ok(pages::Fields::parse(&bytes)),
        Err(_) => Err(state.error(PageError::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the form is larger than {MAX_FORM_BYTES} bytes (body_too_large)"),
            None,
        ))),
    }
}

/// The refusal of a state change whose CSRF token does not match the session's, or that comes
/// from another origin (defence in depth beside SameSite=Strict); `None` when it may proceed.
fn csrf_refusal(state: &DashboardState, headers: &HeaderMap, submitted: &str) -> Option<Response> {
    let token_ok = session_cookie(headers).is_some_and(|cookie| state.accounts.csrf_ok(&cookie, submitted));
    if token_ok && same_origin(headers) {
        return None;
    }
    tracing::warn!("dashboard: a state change without a valid CSRF token or from another origin was refused");
    Some(
        state.error(PageError::Status(
            StatusCode::FORBIDDEN,
            "this form is stale or did not come from this dashboard (CSRF check failed); reload the page and try again"
                .into(),
            None,
        )),
    )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}

/// The dashboard's routes (no fallback: the admin API's JSON 404 answers unknown paths).
pub fn router(state: DashboardState) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/setup", get(pages::setup_page).post(pages::setup_submit))
        .route("/login", get(pages::login_page).post(pages::login_submit))
        .route("/login/2fa", get(pages::second_factor_page).post(pages::second_factor_submit))
        .route("/logout", post(pages::logout))
        .route("/account/security", get(pages::security))
        .route("/account/notifications", get(notifications::page).post(notifications::save))
        .route("/account/2fa/start", post(pages::totp_start))
        .route("/account/2fa/confirm", post(pages::totp_confirm))
        .route("/apps", get(pages::apps).post(pages::create_app))
        .route("/apps/{id}", get(oauth::app_page))
        .route("/apps/{id}/plan", post(pages::change_plan))
        .route("/apps/{id}/limits", post(oauth::set_limits))
        .route("/apps/{id}/statement", get(oauth::statement_page))
        .route("/apps/{id}/statement.csv", get(oauth::statement_csv))
        .route("/apps/{id}/oauth-client", post(oauth::create_client))
        .route("/apps/{id}/oauth-client/rotate", post(oauth::rotate_secret))
        .route("/apps/{id}/oauth-client/suspend", post(oauth::suspend_client))
        .route("/apps/{id}/oauth-client/resume", post(oauth::resume_client))
        .route("/plan-requests/{id}/approve", post(pages::approve_plan))
        .route("/plan-requests/{id}/deny", post(pages::deny_plan))
        .route("/tokens", get(pages::tokens).post(pages::create_token))
        .route("/tokens/access-review.csv", get(pages::access_review_csv))
        .route("/tokens/new", get(pages::new_token))
        .route("/tokens/{id}", get(pages::token))
        .route("/tokens/{id}/{action}", get(pages::token_action_page).post(pages::token_action))
        .route("/audit", get(pages::audit))
        .route("/audit/export.csv", get(pages::audit_csv))
        .route("/audit/export.json", get(pages::audit_json))
        .route("/settings", get(pages::settings).post(pages::save_settings))
        .route("/settings/plans", post(pages::create_plan))
        .route("/settings/plans/{id}/scopes", post(pages::set_plan_scopes))
        .route("/settings/signing-keys/rotate", get(oauth::rotate_keys_page).post(oauth::rotate_keys))
        .route("/settings/root-keys", get(root_keys::list).post(root_keys::create))
        .route("/settings/root-keys/{id}/revoke", get(root_keys::revoke_page).post(root_keys::revoke))
        .route("/calls", get(calls::page))
        .route("/calls/export", get(calls::export))
        .route("/alerts", get(alerts::list))
        .route("/alerts/{id}", get(alerts::page))
        .route("/alerts/{id}/{action}", post(alerts::action))
        .route("/settings/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/settings/webhooks/{id}", get(webhooks::page))
        .route("/settings/webhooks/{id}/{action}", post(webhooks::action))
        .route("/settings/webhooks/{id}/deliveries/{delivery}", get(webhooks::delivery))
        .route("/settings/webhooks/{id}/deliveries/{delivery}/redeliver", post(webhooks::redeliver))
        .route("/ai", get(ai::page))
        .route("/reports", get(reports::page))
        .route("/reports.csv", get(reports::csv))
        .route("/ai/providers", post(ai::create))
        .route("/ai/providers/{id}/{action}", post(ai::action))
        .route("/apis", get(apis::page).post(apis::create))
        .route("/apis/{id}/state", post(apis::change_state))
        .route("/apis/{id}/delete", post(apis::delete))
        .route("/apis/requests/{id}/{action}", post(apis::decide))
        .route("/apis/{id}/access", post(subscriptions::change_access))
        .route("/apps/{id}/subscriptions", post(subscriptions::subscribe))
        .route("/subscriptions/{id}/{action}", post(subscriptions::decide))
        .route("/routes", get(routes::list).post(routes::create))
        .route("/routes/{id}", get(routes::page).post(routes::update))
        .route("/routes/{id}/delete", post(routes::delete))
        .route("/workspace", post(workspaces::switch))
        .route("/workspaces", get(workspaces::list).post(workspaces::create))
        .route("/nodes", get(workspaces::nodes))
        .route("/workspaces/{id}/rename", post(workspaces::rename))
        .route("/workspaces/{id}/delete", get(workspaces::delete_page).post(workspaces::delete))
        .route("/portal", get(portal::catalog))
        .route("/portal/{id}", get(portal::api))
        .route("/portal/{id}/try", post(portal::try_it))
        .route("/members", get(pages::members))
        .route("/members/invite", post(pages::invite))
        .route("/members/{user}/role", post(pages::set_role))
        .route("/members/{user}/remove", post(pages::remove_member))
        .route("/members/invitations/{id}/withdraw", post(pages::withdraw_invitation))
        .route("/invite/{code}", get(pages::invitation_page).post(pages::invitation_submit))
        .route("/assets/app.css", get(|| async { asset(CSS, "text/css; charset=utf-8") }))
        .route("/assets/app.js", get(|| async { asset(JS, "text/javascript; charset=utf-8") }))
        .with_state(state)
}
