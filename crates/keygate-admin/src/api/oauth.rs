//! `/admin/v1/apps/{id}/oauth-client…` and `/admin/v1/oauth/keys…`: an app's OAuth2 client and
//! the instance's signing keys (issue 5).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::jose::Alg;
use keygate_core::oauth::{OAuthClient, SigningKeyRecord};
use keygate_core::{Error, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, AppsRead, AppsWrite, Auth, KeysWrite};
use super::tokens::app_id;
use crate::oauth::NewClient;

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClientRequest {
    /// `client_credentials` (the default), `refresh_token` (a refresh token comes with each
    /// client-credentials answer, rotated on every use), and
    /// `urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693).
    #[serde(default)]
    pub grant_types: Vec<String>,
    /// The scopes the client may ask for (within the app's plan).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `client_secret_basic` (the default), `client_secret_post` or `private_key_jwt` (RFC 7523).
    pub token_endpoint_auth_method: Option<String>,
    /// For `private_key_jwt`: the client's public keys, a JWK Set of EdDSA or ES256 keys.
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
    /// `jwt` (RFC 9068, the default) or `opaque`.
    pub access_token_format: Option<String>,
    /// `EdDSA` (the default) or `ES256`.
    pub signing_alg: Option<String>,
    pub access_token_ttl_seconds: Option<u32>,
    pub refresh_token_ttl_seconds: Option<u32>,
    /// Token exchange's delegation rule: the apps (`app_…` of this workspace, at most 100) whose
    /// API keys and OAuth tokens this client may present as `subject_token`, besides its own
    /// app's. Empty by default: the client exchanges only its own tokens and its app's keys.
    #[serde(default)]
    pub exchange_subject_apps: Vec<String>,
}

/// An OAuth client as the API shows it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub app_id: String,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub token_endpoint_auth_method: String,
    /// The secret's last four characters, to recognize it.
    pub client_secret_last4: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
    pub access_token_format: String,
    pub signing_alg: String,
    pub access_token_ttl_seconds: u32,
    pub refresh_token_ttl_seconds: u32,
    /// The apps whose credentials this client may exchange, besides its own app's.
    pub exchange_subject_apps: Vec<String>,
    /// Until when the previous secret still works after a rotation.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<Timestamp>,
    /// When the client was suspended (by a person, or the workspace's anomaly policy); `null`
    /// while it is active. A suspended client is issued no token until it is resumed.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub suspended_at: Option<Timestamp>,
    /// Why it was suspended, as the person or the policy said; `null` when no reason was given.
    pub suspended_reason: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
}

impl From<&OAuthClient> for ClientView {
    fn from(c: &OAuthClient) -> Self {
        Self {
            client_id: c.client_id.clone(),
            app_id: c.app_id.to_string(),
            grant_types: c.grant_types.iter().map(|g| g.as_str().to_owned()).collect(),
            scopes: c.scopes.iter().map(ToString::to_string).collect(),
            token_endpoint_auth_method: c.auth_method.as_str().to_owned(),
            client_secret_last4: c.secret_last4.clone(),
            jwks: c.jwks.clone(),
            access_token_format: c.access_token_format.as_str().to_owned(),
            signing_alg: c.signing_alg.clone(),
            access_token_ttl_seconds: c.access_token_ttl_seconds,
            refresh_token_ttl_seconds: c.refresh_token_ttl_seconds,
            exchange_subject_apps: c.exchange_subject_apps.iter().map(ToString::to_string).collect(),
            previous_secret_expires_at: c.previous_secret_expires_at,
            suspended_at: c.suspended_at,
            suspended_reason: c.suspended_reason.clone(),
            created_at: c.created_at,
        }
    }
}

/// A client just registered (or its secret rotated), with the secret: store it now, it is never
/// shown again.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientWithSecret {
    #[serde(flatten)]
    pub client: ClientView,
    /// Absent for `private_key_jwt` clients.
    pub client_secret: Option<String>,
}

/// A change to an OAuth client: the fields named are replaced.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClientRequest {
    /// Token exchange's delegation rule (see the registration's field of the same name).
    pub exchange_subject_apps: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecretRequest {
    /// How long the old secret keeps working, in seconds (default 0: it stops at once).
    #[serde(default)]
    pub grace_period_seconds: u64,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspendClientRequest {
    /// Why (at most 500 characters, no control characters other than a newline): shown with the
    /// client and recorded in the audit trail.
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeyView {
    pub kid: String,
    pub alg: String,
    /// In the JWKS from this time.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Signs from this time (a new key is published first).
    #[schema(value_type = String, format = DateTime)]
    pub signs_from: Timestamp,
    /// Stops signing at this time.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub retired_at: Option<Timestamp>,
    /// Leaves the JWKS after this time, when every token it signed has expired.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub drop_after: Option<Timestamp>,
}

impl From<&SigningKeyRecord> for SigningKeyView {
    fn from(k: &SigningKeyRecord) -> Self {
        Self {
            kid: k.kid.clone(),
            alg: k.alg.clone(),
            created_at: k.created_at,
            signs_from: k.signs_from,
            retired_at: k.retired_at,
            drop_after: k.drop_after,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeyList {
    pub data: Vec<SigningKeyView>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeysRequest {
    /// Only this algorithm's key (`EdDSA` or `ES256`); every algorithm in use when omitted.
    pub alg: Option<String>,
}

#[utoipa::path(post, path = "/admin/v1/apps/{id}/oauth-client", tag = "oauth",
    params(("id" = String, Path, description = "app_…")), request_body = CreateClientRequest,
    responses((status = 201, body = ClientWithSecret), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The app already has a client", body = ErrorBody)))]
pub(crate) async fn create_client(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateClientRequest>,
) -> Result<(StatusCode, Json<ClientWithSecret>), ApiError> {
    let new = NewClient {
        grant_types: req.grant_types,
        scopes: req.scopes,
        auth_method: req.token_endpoint_auth_method,
        jwks: req.jwks,
        access_token_format: req.access_token_format,
        signing_alg: req.signing_alg,
        access_token_ttl_seconds: req.access_token_ttl_seconds,
        refresh_token_ttl_seconds: req.refresh_token_ttl_seconds,
        exchange_subject_apps: req.exchange_subject_apps,
    };
    let (client, secret) = s.oauth.create_client(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, new).await?;
    let client_secret = secret.map(|s| s.expose().to_owned());
    Ok((StatusCode::CREATED, Json(ClientWithSecret { client: ClientView::from(&client), client_secret })))
}

#[utoipa::path(get, path = "/admin/v1/apps/{id}/oauth-client", tag = "oauth",
    params(("id" = String, Path, description = "app_…")),
    responses((status = 200, body = ClientView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_client(
    auth: Auth<AppsRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<ClientView>, ApiError> {
    let client = s.oauth.client_for_app(&auth.key.workspace_id, &app_id(&id)?).await?;
    Ok(Json(ClientView::from(&client)))
}

#[utoipa::path(patch, path = "/admin/v1/apps/{id}/oauth-client", tag = "oauth",
    params(("id" = String, Path, description = "app_…")), request_body = UpdateClientRequest,
    responses((status = 200, body = ClientView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The client changed meanwhile", body = ErrorBody)))]
pub(crate) async fn update_client(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateClientRequest>,
) -> Result<Json<ClientView>, ApiError> {
    let client =
        s.oauth.update_client(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, req.exchange_subject_apps).await?;
    Ok(Json(ClientView::from(&client)))
}

#[utoipa::path(post, path = "/admin/v1/apps/{id}/oauth-client/rotate-secret", tag = "oauth",
    params(("id" = String, Path, description = "app_…")), request_body = RotateSecretRequest,
    responses((status = 201, body = ClientWithSecret), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn rotate_client_secret(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RotateSecretRequest>,
) -> Result<(StatusCode, Json<ClientWithSecret>), ApiError> {
    let (client, secret) = s
        .oauth
        .rotate_client_secret(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, req.grace_period_seconds)
        .await?;
    let view = ClientView::from(&client);
    Ok((StatusCode::CREATED, Json(ClientWithSecret { client: view, client_secret: Some(secret.expose().to_owned()) })))
}

/// Suspends the app's OAuth client: the token endpoint issues it nothing (400
/// `unauthorized_client`) until it is resumed, and its live access tokens are revoked at every
/// gateway before this answers; its refresh tokens are kept. Suspending a suspended client
/// changes nothing (200, its first suspension's time and reason stay).
#[utoipa::path(post, path = "/admin/v1/apps/{id}/oauth-client/suspend", tag = "oauth",
    params(("id" = String, Path, description = "app_…")),
    request_body(content = SuspendClientRequest, description = "Optional"),
    responses((status = 200, body = ClientView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn suspend_client(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SuspendClientRequest>,
) -> Result<Json<ClientView>, ApiError> {
    let client = s.oauth.suspend_client(&auth.key.workspace_id, &auth.actor, &app_id(&id)?, req.reason).await?;
    Ok(Json(ClientView::from(&client)))
}

/// Resumes the app's suspended OAuth client: it is issued tokens again, and its refresh tokens
/// work again. Resuming an active client changes nothing (200).
#[utoipa::path(post, path = "/admin/v1/apps/{id}/oauth-client/resume", tag = "oauth",
    params(("id" = String, Path, description = "app_…")),
    responses((status = 200, body = ClientView), (status = 404, body = ErrorBody)))]
pub(crate) async fn resume_client(
    auth: Auth<AppsWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<ClientView>, ApiError> {
    let client = s.oauth.resume_client(&auth.key.workspace_id, &auth.actor, &app_id(&id)?).await?;
    Ok(Json(ClientView::from(&client)))
}

#[utoipa::path(get, path = "/admin/v1/oauth/keys", tag = "oauth",
    responses((status = 200, body = SigningKeyList)))]
pub(crate) async fn list_keys(
    _auth: Auth<AppsRead>,
    State(s): State<AdminState>,
) -> Result<Json<SigningKeyList>, ApiError> {
    let keys = s.admin.store().signing_keys().await.map_err(ApiError::from)?;
    Ok(Json(SigningKeyList { data: keys.iter().map(SigningKeyView::from).collect() }))
}

#[utoipa::path(post, path = "/admin/v1/oauth/keys/rotate", tag = "oauth", request_body = RotateKeysRequest,
    responses((status = 201, body = SigningKeyList), (status = 400, body = ErrorBody),
        (status = 403, description = "Not a root key of the default workspace with keys:write", body = ErrorBody)))]
pub(crate) async fn rotate_keys(
    auth: Auth<KeysWrite>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<RotateKeysRequest>,
) -> Result<(StatusCode, Json<SigningKeyList>), ApiError> {
    // The keys sign for every workspace: only the instance's own (default) workspace may
    // rotate them.
    let default = s.admin.bootstrap().await?;
    if auth.key.workspace_id != default.id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "missing_permission",
            "signing keys are the instance's: rotate them with a root key of the default workspace",
        ));
    }
    let alg = req
        .alg
        .as_deref()
        .map(|a| Alg::parse(a).map_err(|_| Error::invalid("invalid_signing_alg", "alg must be EdDSA or ES256")))
        .transpose()?;
    let made = s.oauth.rotate_keys(&auth.actor, alg).await?;
    Ok((StatusCode::CREATED, Json(SigningKeyList { data: made.iter().map(SigningKeyView::from).collect() })))
}
