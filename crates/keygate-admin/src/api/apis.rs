//! `/admin/v1/apis…`: the workspace's APIs and their lifecycle (issue 17) — draft, published,
//! deprecated (with a sunset and a successor), retired — as a whole and per version, and the
//! requests to publish them that wait for an owner. A root key holding `apis:write` counts as an
//! owner: its publications apply at once, and it may decide requests filed in the dashboard.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use keygate_core::apis::{Api, ApiPublishRequest, ApiState, ApiVersion, PublishRequestStatus};
use keygate_core::ids::{ApiId, ApiPublishRequestId};
use keygate_core::subscriptions::ApiAccess;
use keygate_core::{Error, Timestamp};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, ApisRead, ApisWrite, Auth, LargeJson};
use crate::apis::{ApiChange, ApiDetails, NewApi, VersionChange};

/// Distinguishes a field that is absent (`None`) from one set to `null` (`Some(None)`).
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Where an API or a version is in its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiStateBody {
    /// Its routes serve only the workspace's own credentials; not in the portal.
    Draft,
    /// In the portal; served to whoever its routes admit.
    Published,
    /// Still served; every answer carries `Deprecation`, `Sunset` and `Link`.
    Deprecated,
    /// Its routes answer 410 `api_retired`. Final.
    Retired,
}

impl From<ApiState> for ApiStateBody {
    fn from(s: ApiState) -> Self {
        match s {
            ApiState::Draft => Self::Draft,
            ApiState::Published => Self::Published,
            ApiState::Deprecated => Self::Deprecated,
            ApiState::Retired => Self::Retired,
        }
    }
}

/// Who may call an API's routes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApiAccessBody {
    /// Every token its routes admit (workspace, scopes, limits).
    Open,
    /// Only tokens of apps subscribed to it (or to the route's version); subscribing is immediate.
    Subscription,
    /// The same, each subscription waiting for an owner's or admin's approval.
    Approval,
}

impl From<ApiAccess> for ApiAccessBody {
    fn from(a: ApiAccess) -> Self {
        match a {
            ApiAccess::Open => Self::Open,
            ApiAccess::Subscription => Self::Subscription,
            ApiAccess::Approval => Self::Approval,
        }
    }
}

impl From<ApiAccessBody> for ApiAccess {
    fn from(a: ApiAccessBody) -> Self {
        match a {
            ApiAccessBody::Open => Self::Open,
            ApiAccessBody::Subscription => Self::Subscription,
            ApiAccessBody::Approval => Self::Approval,
        }
    }
}

/// A new API, made as a draft.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiRequest {
    /// Unique in the workspace; config-file routes name the API by it (`api = "orders"`).
    pub name: String,
    pub description: Option<String>,
    /// Its OpenAPI document (JSON, at most 1 MiB).
    #[schema(value_type = Option<Object>)]
    pub openapi: Option<Value>,
    /// Its versions' names (such as `v1`), each made a draft.
    #[serde(default)]
    pub versions: Vec<String>,
    /// What replaces it: an `http(s)://` URL or an absolute path (the `Link` header's target).
    pub successor: Option<String>,
    /// Who may call its routes (default `open`); `subscription` and `approval` admit only the
    /// tokens of subscribed apps (403 `subscription_required` for the others).
    pub access: Option<ApiAccessBody>,
}

/// Changes to an API: the fields given replace the old ones (`null` removes an optional one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateApiRequest {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<Object>)]
    pub openapi: Option<Option<Value>>,
    /// draft → published → deprecated → retired; deprecated → published withdraws the
    /// deprecation. Other moves: 409 `invalid_state_transition`.
    pub state: Option<String>,
    /// When it goes away (RFC 3339, in the future): the `Sunset` header of a deprecated API.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sunset: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub successor: Option<Option<String>>,
    /// The whole list of versions: new names are added as drafts, missing ones removed (409
    /// `api_in_use` while a route names one).
    pub versions: Option<Vec<String>>,
    /// Who may call its routes; applied on every node at once.
    pub access: Option<ApiAccessBody>,
}

/// Changes to one version of an API.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateApiVersionRequest {
    pub state: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sunset: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub successor: Option<Option<String>>,
    /// The routes serving this version check each request against the API's OpenAPI document
    /// (as a route's own `validate`): an invalid request is answered 400 `request_invalid`.
    /// Turning it on needs a document that compiles (400 `invalid_openapi` otherwise).
    pub validate: Option<bool>,
}

/// A version of an API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiVersionView {
    pub name: String,
    pub state: ApiStateBody,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deprecated_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sunset: Option<Timestamp>,
    pub successor: Option<String>,
    /// Its routes check requests against the API's OpenAPI document.
    pub validate: bool,
}

impl From<&ApiVersion> for ApiVersionView {
    fn from(v: &ApiVersion) -> Self {
        Self {
            name: v.name.clone(),
            state: v.state.into(),
            deprecated_at: v.deprecated_at,
            sunset: v.sunset,
            successor: v.successor.clone(),
            validate: v.validate,
        }
    }
}

/// A route that serves an API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiRouteView {
    pub id: String,
    pub path: String,
    pub version: Option<String>,
}

/// Where a publish request stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PublishRequestStatusBody {
    Pending,
    Approved,
    Rejected,
}

/// A request to publish an API (or a version), for an owner to decide.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublishRequestView {
    pub id: String,
    pub api_id: String,
    /// The version to publish; null: the API as a whole.
    pub version: Option<String>,
    pub requested_by: String,
    pub status: PublishRequestStatusBody,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    pub decided_by: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub decided_at: Option<Timestamp>,
}

impl From<ApiPublishRequest> for PublishRequestView {
    fn from(r: ApiPublishRequest) -> Self {
        Self {
            id: r.id.to_string(),
            api_id: r.api_id.to_string(),
            version: r.version,
            requested_by: r.requested_by,
            status: match r.status {
                PublishRequestStatus::Pending => PublishRequestStatusBody::Pending,
                PublishRequestStatus::Approved => PublishRequestStatusBody::Approved,
                PublishRequestStatus::Rejected => PublishRequestStatusBody::Rejected,
            },
            created_at: r.created_at,
            decided_by: r.decided_by,
            decided_at: r.decided_at,
        }
    }
}

/// An API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub state: ApiStateBody,
    /// When it was deprecated (the `Deprecation` header's date).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub deprecated_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sunset: Option<Timestamp>,
    pub successor: Option<String>,
    pub versions: Vec<ApiVersionView>,
    /// Who may call its routes.
    pub access: ApiAccessBody,
    /// The workspace's routes that name it (`api`), with the version each serves.
    pub routes: Vec<ApiRouteView>,
    /// Requests to publish it that wait for an owner.
    pub pending_publish_requests: Vec<PublishRequestView>,
    /// Its OpenAPI document (in answers about one API; lists leave it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub openapi: Option<Value>,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiList {
    pub data: Vec<ApiView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PublishRequestList {
    pub data: Vec<PublishRequestView>,
}

fn view(e: ApiDetails, with_document: bool) -> ApiView {
    let Api {
        id,
        name,
        description,
        openapi,
        state,
        deprecated_at,
        sunset,
        successor,
        versions,
        access,
        created_at,
        updated_at,
        ..
    } = e.api;
    ApiView {
        id: id.to_string(),
        name,
        description,
        state: state.into(),
        deprecated_at,
        sunset,
        successor,
        versions: versions.iter().map(ApiVersionView::from).collect(),
        access: access.into(),
        routes: e.routes.into_iter().map(|r| ApiRouteView { id: r.id, path: r.path, version: r.version }).collect(),
        pending_publish_requests: e.pending.into_iter().map(PublishRequestView::from).collect(),
        openapi: if with_document { openapi.and_then(|d| serde_json::from_str(&d).ok()) } else { None },
        created_at,
        updated_at,
    }
}

/// An API id of the path; a malformed one is an API that does not exist.
fn api_id(raw: &str) -> Result<ApiId, ApiError> {
    ApiId::parse(raw).ok_or_else(|| Error::not_found("api").into())
}

fn state(raw: Option<String>) -> Result<Option<ApiState>, ApiError> {
    raw.map(|s| {
        ApiState::parse(&s).ok_or_else(|| {
            Error::invalid("invalid_state", "state is one of draft, published, deprecated, retired").into()
        })
    })
    .transpose()
}

fn sunset(raw: Option<Option<String>>) -> Result<Option<Option<Timestamp>>, ApiError> {
    raw.map(|s| {
        s.map(|s| {
            Timestamp::parse_rfc3339(&s).ok_or_else(|| {
                ApiError::from(Error::invalid(
                    "invalid_sunset",
                    "sunset is an RFC 3339 date-time such as 2030-01-31T00:00:00Z",
                ))
            })
        })
        .transpose()
    })
    .transpose()
}

#[utoipa::path(get, path = "/admin/v1/apis", tag = "apis", responses((status = 200, body = ApiList)))]
pub(crate) async fn list_apis(auth: Auth<ApisRead>, State(s): State<AdminState>) -> Result<Json<ApiList>, ApiError> {
    let list = s.admin.list_apis(&auth.key.workspace_id).await?;
    Ok(Json(ApiList { data: list.into_iter().map(|e| view(e, false)).collect() }))
}

#[utoipa::path(post, path = "/admin/v1/apis", tag = "apis", request_body = CreateApiRequest,
    responses((status = 201, body = ApiView), (status = 400, body = ErrorBody),
        (status = 409, description = "The workspace has an API of this name (`api_exists`)", body = ErrorBody)))]
pub(crate) async fn create_api(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    LargeJson(body): LargeJson<CreateApiRequest>,
) -> Result<(StatusCode, Json<ApiView>), ApiError> {
    let new = NewApi {
        name: body.name,
        description: body.description,
        openapi: body.openapi,
        versions: body.versions,
        successor: body.successor,
        access: body.access.map(Into::into),
    };
    let e = s.admin.create_api(&auth.key.workspace_id, &auth.actor, new).await?;
    Ok((StatusCode::CREATED, Json(view(e, true))))
}

#[utoipa::path(get, path = "/admin/v1/apis/{id}", tag = "apis", params(("id" = String, Path, description = "The API's id (api_…)")),
    responses((status = 200, body = ApiView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_api(
    auth: Auth<ApisRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<ApiView>, ApiError> {
    Ok(Json(view(s.admin.api(&auth.key.workspace_id, &api_id(&id)?).await?, true)))
}

/// Changes an API's fields and its state as a whole (which every route of the API follows, on
/// every node).
#[utoipa::path(patch, path = "/admin/v1/apis/{id}", tag = "apis", params(("id" = String, Path)), request_body = UpdateApiRequest,
    responses((status = 200, body = ApiView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A move the lifecycle does not allow (`invalid_state_transition`), a name taken, a version a route names", body = ErrorBody)))]
pub(crate) async fn update_api(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    LargeJson(body): LargeJson<UpdateApiRequest>,
) -> Result<Json<ApiView>, ApiError> {
    let id = api_id(&id)?;
    let change = ApiChange {
        name: body.name,
        description: body.description,
        openapi: body.openapi,
        state: state(body.state)?,
        sunset: sunset(body.sunset)?,
        successor: body.successor,
        versions: body.versions,
        access: body.access.map(Into::into),
    };
    let out = s.admin.update_api(&auth.key.workspace_id, &auth.actor, &id, change, true).await?;
    Ok(Json(view(out.entry, true)))
}

/// Changes one version's state, sunset and successor (the routes naming the version follow it).
#[utoipa::path(patch, path = "/admin/v1/apis/{id}/versions/{version}", tag = "apis",
    params(("id" = String, Path), ("version" = String, Path, description = "The version's name (such as v1)")),
    request_body = UpdateApiVersionRequest,
    responses((status = 200, body = ApiView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A move the lifecycle does not allow (`invalid_state_transition`)", body = ErrorBody)))]
pub(crate) async fn update_api_version(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path((id, version)): Path<(String, String)>,
    LargeJson(body): LargeJson<UpdateApiVersionRequest>,
) -> Result<Json<ApiView>, ApiError> {
    let id = api_id(&id)?;
    let change = VersionChange {
        state: state(body.state)?,
        sunset: sunset(body.sunset)?,
        successor: body.successor,
        validate: body.validate,
    };
    let out = s.admin.update_api_version(&auth.key.workspace_id, &auth.actor, &id, &version, change, true).await?;
    Ok(Json(view(out.entry, true)))
}

#[utoipa::path(delete, path = "/admin/v1/apis/{id}", tag = "apis", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "A route names it (`api_in_use`)", body = ErrorBody)))]
pub(crate) async fn delete_api(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_api(&auth.key.workspace_id, &auth.actor, &api_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PublishRequestQuery {
    /// Only the requests in this state.
    pub status: Option<PublishRequestStatusBody>,
}

/// The workspace's requests to publish APIs, newest first (filed when the workspace's policy
/// wants publishing approved and a member who is not an owner publishes).
#[utoipa::path(get, path = "/admin/v1/api-publish-requests", tag = "apis", params(PublishRequestQuery),
    responses((status = 200, body = PublishRequestList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_publish_requests(
    auth: Auth<ApisRead>,
    State(s): State<AdminState>,
    ApiQuery(q): ApiQuery<PublishRequestQuery>,
) -> Result<Json<PublishRequestList>, ApiError> {
    let status = q.status.map(|s| match s {
        PublishRequestStatusBody::Pending => PublishRequestStatus::Pending,
        PublishRequestStatusBody::Approved => PublishRequestStatus::Approved,
        PublishRequestStatusBody::Rejected => PublishRequestStatus::Rejected,
    });
    let list = s.admin.publish_requests(&auth.key.workspace_id, status).await?;
    Ok(Json(PublishRequestList { data: list.into_iter().map(PublishRequestView::from).collect() }))
}

async fn decide(
    auth: Auth<ApisWrite>,
    s: AdminState,
    id: &str,
    approve: bool,
) -> Result<Json<PublishRequestView>, ApiError> {
    let id = ApiPublishRequestId::parse(id).ok_or_else(|| Error::not_found("publish request"))?;
    let r = s.admin.decide_publish_request(&auth.key.workspace_id, &auth.actor, &id, approve).await?;
    Ok(Json(r.into()))
}

/// Approves a pending request: the API (or version) is published at once.
#[utoipa::path(post, path = "/admin/v1/api-publish-requests/{id}/approve", tag = "apis", params(("id" = String, Path)),
    responses((status = 200, body = PublishRequestView), (status = 404, body = ErrorBody),
        (status = 409, description = "Decided already (`request_decided`), or the API cannot be published now", body = ErrorBody)))]
pub(crate) async fn approve_publish_request(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<PublishRequestView>, ApiError> {
    decide(auth, s, &id, true).await
}

/// Rejects a pending request: the API stays as it is.
#[utoipa::path(post, path = "/admin/v1/api-publish-requests/{id}/reject", tag = "apis", params(("id" = String, Path)),
    responses((status = 200, body = PublishRequestView), (status = 404, body = ErrorBody),
        (status = 409, description = "Decided already (`request_decided`)", body = ErrorBody)))]
pub(crate) async fn reject_publish_request(
    auth: Auth<ApisWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<PublishRequestView>, ApiError> {
    decide(auth, s, &id, false).await
}
