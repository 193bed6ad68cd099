//! The OAuth2 authorization server's screens (issue 5): an app's page with its OAuth client
//! (register one, rotate its secret, suspend and resume it), and the instance's signing keys in the workspace settings
//! (owners of the default workspace: the keys sign for every workspace). The service
//! ([`crate::oauth::OAuth`]) checks the input and writes the audit events; these handlers check
//! who may ask, as the token pages do.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::ids::AppId;
use keygate_core::model::{App, DEFAULT_WORKSPACE};
use keygate_core::oauth::{AccessTokenFormat, ClientAuthMethod, GrantType, OAuthClient, SigningKeyRecord};
use keygate_core::{Error, ErrorKind, Timestamp};
use minijinja::{Value, context};

use super::pages::{
    Fields, MsgQuery, ctx_err, developer_may_issue, notice, owned_apps, scope_groups, scopes_from, see_other, ser,
    visible,
};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::oauth::{NewClient, OAuth};

/// The grace periods a rotated secret may keep working for, as the form offers them.
const GRACE_CHOICES: [u64; 4] = [0, 3_600, 86_400, 604_800];

fn show(st: &DashboardState, r: Result<Response, PageError>) -> Response {
    r.unwrap_or_else(|e| st.error(e))
}

fn service<'a>(st: &'a DashboardState, v: &Viewer) -> Result<&'a Arc<OAuth>, PageError> {
    st.oauth.as_ref().ok_or_else(|| {
        PageError::Status(
            StatusCode::NOT_FOUND,
            "the OAuth authorization server does not run on this keygate".into(),
            Some(Box::new(v.clone())),
        )
    })
}

/// The app by id, if this person may see it (another developer's app is "not found").
async fn app_for(st: &DashboardState, v: &Viewer, id: &str) -> Result<App, PageError> {
    let id = AppId::parse(id).ok_or_else(|| PageError::not_found(v))?;
    let app = st.admin.app(v.workspace(), &id).await.map_err(ctx_err(v))?;
    if !visible(&owned_apps(st, v).await?, &app.id) {
        return Err(PageError::not_found(v));
    }
    Ok(app)
}

/// An app whose OAuth client this person may change: owners and admins, and developers for
/// their own apps (the rules of token creation).
pub(super) async fn writable_app(st: &DashboardState, v: &Viewer, id: &str) -> Result<App, PageError> {
    if !v.role.can_write() {
        return Err(PageError::forbidden(v, "change OAuth clients"));
    }
    app_for(st, v, id).await
}

fn grant_label(g: GrantType) -> &'static str {
    match g {
        GrantType::ClientCredentials => "client credentials",
        GrantType::RefreshToken => "refresh token",
        GrantType::TokenExchange => "token exchange (RFC 8693)",
    }
}

fn client_view(c: &OAuthClient, now: Timestamp) -> Value {
    context! {
        client_id => c.client_id.clone(),
        auth_method => c.auth_method.as_str(),
        uses_secret => c.auth_method.uses_secret(),
        grant_types => c.grant_types.iter().map(|g| context! { value => g.as_str(), label => grant_label(*g) }).collect::<Vec<_>>(),
        scopes => c.scopes.iter().map(ToString::to_string).collect::<Vec<_>>(),
        secret_last4 => c.secret_last4.clone(),
        previous_secret_expires_at => c.previous_secret_expires_at.map(ser),
        previous_secret_works => c.previous_secret_expires_at.is_some_and(|t| t > now),
        jwks_keys => c.jwks.as_ref().and_then(|j| j.get("keys")).and_then(|k| k.as_array()).map_or(0, Vec::len),
        access_token_format => c.access_token_format.as_str(),
        jwt => c.access_token_format == AccessTokenFormat::Jwt,
        signing_alg => c.signing_alg.clone(),
        access_token_ttl_seconds => c.access_token_ttl_seconds,
        refresh_token_ttl_seconds => c.refresh_token_ttl_seconds,
        refresh => c.grant_types.contains(&GrantType::RefreshToken),
        suspended_at => c.suspended_at.map(ser),
        suspended_reason => c.suspended_reason.clone(),
        created_at => ser(c.created_at),
    }
}

/// The registration form's choices, with what was submitted checked again after an error.
fn register_form(oauth: &OAuth, form: Option<&Fields>, groups: Vec<Value>) -> Value {
    let chosen = |name: &str, value: &str, default: bool| form.map_or(default, |f| f.get(name) == value);
    let grants: Vec<Value> = GrantType::ALL
        .iter()
        .map(|g| {
            let checked = form
                .map_or(*g == GrantType::ClientCredentials, |f| f.all("grant_types").iter().any(|v| v == g.as_str()));
            context! { value => g.as_str(), label => grant_label(*g), checked }
        })
        .collect();
    let methods: Vec<Value> = ClientAuthMethod::ALL
        .iter()
        .map(|m| {
            let selected = chosen("auth_method", m.as_str(), *m == ClientAuthMethod::ClientSecretBasic);
            context! { value => m.as_str(), selected }
        })
        .collect();
    let s = oauth.settings();
    context! {
        grants,
        methods,
        groups,
        opaque => chosen("access_token_format", "opaque", false),
        es256 => chosen("signing_alg", "ES256", false),
        form => form.map(|f| context! { scopes_text => f.get("scopes_text"), scopes => f.all("scopes"),
                                          jwks => f.get("jwks"), ttl => f.get("access_token_ttl") }),
        default_ttl => s.access_token_ttl_seconds,
        max_ttl => s.max_access_token_ttl_seconds,
    }
}

pub(super) async fn app_inner(
    st: &DashboardState,
    v: &Viewer,
    id: &str,
    msg: Option<&str>,
    error: Option<String>,
    form: Option<&Fields>,
) -> Result<Response, PageError> {
    let app = app_for(st, v, id).await?;
    let ws = v.workspace();
    let now = st.admin.now();
    let plan = match &app.plan_id {
        Some(p) => st.admin.list_plans(ws).await.map_err(ctx_err(v))?.into_iter().find(|x| x.id == *p).map(|x| x.name),
        None => None,
    };
    let writable = v.role.can_write();
    let (client, register, token_endpoint) = match &st.oauth {
        None => (None, None, None),
        Some(oauth) => {
            let client = match oauth.client_for_app(ws, &app.id).await {
                Ok(c) => Some(client_view(&c, now)),
                Err(e) if e.kind == ErrorKind::NotFound => None,
                Err(e) => return Err(PageError::from_error(e, Some(v))),
            };
            let register = if client.is_none() && writable {
                Some(register_form(oauth, form, scope_groups(st, v).await?))
            } else {
                None
            };
            (client, register, Some(oauth.settings().token_endpoint()))
        }
    };
    let notice = match error {
        Some(text) => context! { kind => "error", text },
        None => notice(msg),
    };
    let (subscriptions, subscribable, sub_plans) = super::subscriptions::for_app(st, v, &app.id).await?;
    Ok(st.render(
        if notice.get_attr("kind").ok().and_then(|k| k.as_str().map(str::to_owned)).as_deref() == Some("error") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        "app.html",
        Some(v),
        "apps",
        context! {
            title => format!("App {}", app.name),
            app => context! { id => app.id.to_string(), name => app.name.clone(), description => app.description.clone(),
                              default => app.is_default, plan, created_at => ser(app.created_at) },
            limits => context! {
                rate => app.rate_limit.map(|r| r.requests * 60 / r.per_seconds.max(1)),
                rate_text => app.rate_limit.map(|r| format!("{} requests per {} s", r.requests, r.per_seconds)),
                quota => app.quota.map(|q| q.requests),
                quota_period => app.quota.map(|q| q.period.as_str()),
            },
            oauth => st.oauth.is_some(),
            subscriptions,
            subscribable,
            sub_plans,
            client,
            register,
            writable,
            token_endpoint,
            grace_choices => GRACE_CHOICES,
            notice,
        },
    ))
}

/// `GET /apps/{id}`: the app, and its OAuth client or the form that registers one.
pub async fn app_page(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<MsgQuery>,
) -> Response {
    show(&st, app_inner(&st, &v, &id, q.msg.as_deref(), None, None).await)
}

/// The client the form asks for. What the service checks (grants, scopes against the catalog and
/// the app's plan, the JWKS, the lifetime) it reports itself.
fn client_from(f: &Fields) -> Result<NewClient, Error> {
    let grant_types = f.all("grant_types");
    if grant_types.is_empty() {
        return Err(Error::invalid("invalid_grant_type", "choose at least one grant type"));
    }
    let auth_method = f.opt("auth_method").map(str::to_owned);
    // The JWKS field is for private_key_jwt only (without JavaScript it is always on the page).
    let jwks = match (auth_method.as_deref(), f.opt("jwks")) {
        (Some("private_key_jwt"), Some(text)) => Some(
            serde_json::from_str(text)
                .map_err(|e| Error::invalid("invalid_jwks", format!("the JWKS is not valid JSON: {e}")))?,
        ),
        _ => None,
    };
    let access_token_ttl_seconds = match f.opt("access_token_ttl") {
        None => None,
        Some(n) => Some(
            n.parse::<u32>()
                .map_err(|_| Error::invalid("invalid_ttl", "the access-token lifetime is a whole number of seconds"))?,
        ),
    };
    Ok(NewClient {
        grant_types,
        scopes: scopes_from(f),
        auth_method,
        jwks,
        access_token_format: f.opt("access_token_format").map(str::to_owned),
        signing_alg: f.opt("signing_alg").map(str::to_owned),
        access_token_ttl_seconds,
        refresh_token_ttl_seconds: None,
        exchange_subject_apps: Vec::new(),
    })
}

/// The page that shows a new client secret, once (every dashboard page is `no-store`).
fn client_created(
    st: &DashboardState,
    v: &Viewer,
    app: &App,
    oauth: &OAuth,
    client: &OAuthClient,
    secret: Option<&str>,
    rotated: bool,
) -> Response {
    st.render(
        StatusCode::OK,
        "oauth_client_created.html",
        Some(v),
        "apps",
        context! {
            title => if rotated { "Client secret rotated" } else { "OAuth client registered" },
            app => context! { id => app.id.to_string(), name => app.name.clone() },
            client => client_view(client, st.admin.now()),
            secret,
            rotated,
            token_endpoint => oauth.settings().token_endpoint(),
        },
    )
}

/// Service refusals the person can correct are shown on the app's page, with what they typed.
fn correctable(e: &Error) -> bool {
    matches!(e.kind, ErrorKind::InvalidInput | ErrorKind::Conflict)
}

/// `POST /apps/{id}/oauth-client`: registers the app's OAuth client.
pub async fn create_client(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (app, oauth) = match writable_app(&st, &v, &id).await.and_then(|a| Ok((a, service(&st, &v)?.clone()))) {
        Ok(x) => x,
        Err(e) => return st.error(e),
    };
    let result = async {
        developer_may_issue(&st, &v, &app.id, "before registering its OAuth client").await?;
        oauth.create_client(v.workspace(), &v.actor(), &app.id, client_from(&f)?).await
    }
    .await;
    match result {
        Ok((client, secret)) => {
            client_created(&st, &v, &app, &oauth, &client, secret.as_ref().map(|s| s.expose()), false)
        }
        Err(e) if correctable(&e) => {
            show(&st, app_inner(&st, &v, &id, None, Some(e.message.to_string()), Some(&f)).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// `POST /apps/{id}/oauth-client/rotate`: a new client secret; the old one keeps working for the
/// grace period chosen.
pub async fn rotate_secret(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let (app, oauth) = match writable_app(&st, &v, &id).await.and_then(|a| Ok((a, service(&st, &v)?.clone()))) {
        Ok(x) => x,
        Err(e) => return st.error(e),
    };
    let result = async {
        let grace = f
            .get("grace")
            .parse::<u64>()
            .ok()
            .filter(|g| GRACE_CHOICES.contains(g))
            .ok_or_else(|| Error::invalid("invalid_grace_period", "choose one of the grace periods"))?;
        oauth.rotate_client_secret(v.workspace(), &v.actor(), &app.id, grace).await
    }
    .await;
    match result {
        Ok((client, secret)) => client_created(&st, &v, &app, &oauth, &client, Some(secret.expose()), true),
        Err(e) if correctable(&e) => show(&st, app_inner(&st, &v, &id, None, Some(e.message.to_string()), None).await),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

/// `POST /apps/{id}/oauth-client/suspend`: suspends the app's OAuth client, for the reason typed
/// (if any).
pub async fn suspend_client(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    client_state(&st, &v, &id, Some(f.opt("reason").map(str::to_owned))).await
}

/// `POST /apps/{id}/oauth-client/resume`: resumes the app's suspended OAuth client.
pub async fn resume_client(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    _form: CsrfForm,
) -> Response {
    client_state(&st, &v, &id, None).await
}

/// Suspends (`Some(reason)`) or resumes (`None`) the OAuth client of the app `id`, for whoever may
/// rotate its secret; a refusal the person can correct (a reason too long) is shown on the app's
/// page.
async fn client_state(st: &DashboardState, v: &Viewer, id: &str, suspend: Option<Option<String>>) -> Response {
    let (app, oauth) = match writable_app(st, v, id).await.and_then(|a| Ok((a, service(st, v)?.clone()))) {
        Ok(x) => x,
        Err(e) => return st.error(e),
    };
    let result = match suspend {
        Some(reason) => {
            oauth.suspend_client(v.workspace(), &v.actor(), &app.id, reason).await.map(|_| "client_suspended")
        }
        None => oauth.resume_client(v.workspace(), &v.actor(), &app.id).await.map(|_| "client_resumed"),
    };
    match result {
        Ok(msg) => see_other(&format!("/apps/{}?msg={msg}", app.id)),
        Err(e) if correctable(&e) => show(st, app_inner(st, v, id, None, Some(e.message.to_string()), None).await),
        Err(e) => st.error(PageError::from_error(e, Some(v))),
    }
}

/// `POST /apps/{id}/limits`: the rate limit and quota all of the app's tokens share (an empty
/// field takes that limit off). Held to the app's plan like a token's own.
pub async fn set_limits(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let app = match writable_app(&st, &v, &id).await {
        Ok(a) => a,
        Err(e) => return st.error(e),
    };
    let result = async {
        let (rate_limit, quota) = super::pages::limits_from(&f)?;
        let update = crate::service::AppUpdate {
            rate_limit: Some(rate_limit),
            quota: Some(quota),
            ..crate::service::AppUpdate::default()
        };
        st.admin.update_app(v.workspace(), &v.actor(), &app.id, update).await
    }
    .await;
    match result {
        Ok(_) => super::pages::see_other(&format!("/apps/{}?msg=limits_saved", app.id)),
        Err(e) if correctable(&e) || e.code == "limit_above_plan" => {
            show(&st, app_inner(&st, &v, &id, None, Some(e.message.to_string()), None).await)
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

#[derive(serde::Deserialize, Default)]
pub struct PeriodQuery {
    period: Option<String>,
}

/// The statement of an app the person may see, for the month asked (default: this one).
async fn statement_for(
    st: &DashboardState,
    v: &Viewer,
    id: &str,
    q: &PeriodQuery,
) -> Result<keygate_core::billing::Statement, PageError> {
    let app = app_for(st, v, id).await?;
    let period = q
        .period
        .clone()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| keygate_core::billing::month_of(st.admin.now().as_millis()));
    st.admin.statement(v.workspace(), &app.id, period.trim()).await.map_err(|e| PageError::from_error(e, Some(v)))
}

/// `GET /apps/{id}/statement`: the app's statement for a month.
pub async fn statement_page(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<PeriodQuery>,
) -> Response {
    match statement_for(&st, &v, &id, &q).await {
        Ok(s) => st.render(
            StatusCode::OK,
            "statement.html",
            Some(&v),
            "apps",
            context! { title => format!("Statement {}", s.period), s => ser(&s) },
        ),
        Err(e) => st.error(e),
    }
}

/// `GET /apps/{id}/statement.csv`: the same as CSV.
pub async fn statement_csv(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<PeriodQuery>,
) -> Response {
    match statement_for(&st, &v, &id, &q).await {
        Ok(s) => {
            let mut resp = Response::new(axum::body::Body::from(crate::csv::statement(&s)));
            resp.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            resp
        }
        Err(e) => st.error(e),
    }
}

// ---- signing keys ---------------------------------------------------------------------------

/// The signing keys may be seen and rotated by owners of the default workspace only: they are
/// the instance's, and sign for every workspace.
async fn may_manage_keys(st: &DashboardState, v: &Viewer) -> Result<bool, PageError> {
    if !v.role.is_owner() || st.oauth.is_none() {
        return Ok(false);
    }
    let default = st.admin.store().workspace_by_name(DEFAULT_WORKSPACE).await.map_err(ctx_err(v))?;
    Ok(default.is_some_and(|w| w.id == *v.workspace()))
}

fn key_view(k: &SigningKeyRecord, now: Timestamp) -> Value {
    let (status, badge) = if k.signs_at(now) {
        ("signing", "active")
    } else if k.signs_from > now {
        ("published, signs later", "suspended")
    } else if k.drop_after.is_some_and(|d| d < now) {
        ("left the JWKS", "revoked")
    } else {
        ("retired, verifies only", "expired")
    };
    context! {
        kid => k.kid.clone(), alg => k.alg.clone(), status, badge,
        created_at => ser(k.created_at), signs_from => ser(k.signs_from),
        retired_at => k.retired_at.map(ser), drop_after => k.drop_after.map(ser),
    }
}

/// The signing keys for the settings page, the one that signs last first; `None` when this person may not manage
/// them (the section is then left out).
pub(super) async fn signing_keys(st: &DashboardState, v: &Viewer) -> Result<Option<Vec<Value>>, PageError> {
    if !may_manage_keys(st, v).await? {
        return Ok(None);
    }
    let now = st.admin.now();
    let mut keys = st.admin.store().signing_keys().await.map_err(ctx_err(v))?;
    keys.sort_by(|a, b| {
        (b.signs_from, b.created_at).cmp(&(a.signs_from, a.created_at)).then_with(|| a.kid.cmp(&b.kid))
    });
    Ok(Some(keys.iter().map(|k| key_view(k, now)).collect()))
}

async fn keys_manager<'a>(st: &'a DashboardState, v: &Viewer) -> Result<&'a Arc<OAuth>, PageError> {
    if !v.role.is_owner() {
        return Err(PageError::forbidden(v, "rotate the signing keys"));
    }
    let oauth = service(st, v)?;
    if !may_manage_keys(st, v).await? {
        return Err(PageError::Status(
            StatusCode::FORBIDDEN,
            "the signing keys are the instance's: owners of the default workspace rotate them".into(),
            Some(Box::new(v.clone())),
        ));
    }
    Ok(oauth)
}

/// `GET /settings/signing-keys/rotate`: the confirmation before a rotation.
pub async fn rotate_keys_page(State(st): State<DashboardState>, SignedIn(v): SignedIn) -> Response {
    let oauth = match keys_manager(&st, &v).await {
        Ok(o) => o,
        Err(e) => return st.error(e),
    };
    let s = oauth.settings();
    st.render(
        StatusCode::OK,
        "signing_keys_rotate.html",
        Some(&v),
        "settings",
        context! {
            title => "Rotate signing keys",
            publish_ahead_minutes => s.key_publish_ahead_seconds.div_ceil(60),
            max_ttl_minutes => s.max_access_token_ttl_seconds.div_ceil(60),
        },
    )
}

/// `POST /settings/signing-keys/rotate`: a new key of every algorithm in use.
pub async fn rotate_keys(State(st): State<DashboardState>, SignedIn(v): SignedIn, _form: CsrfForm) -> Response {
    let oauth = match keys_manager(&st, &v).await {
        Ok(o) => o.clone(),
        Err(e) => return st.error(e),
    };
    match oauth.rotate_keys(&v.actor(), None).await {
        Ok(_) => see_other("/settings?msg=keys_rotated"),
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}
