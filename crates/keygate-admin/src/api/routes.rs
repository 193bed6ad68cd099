//! `/admin/v1/routes…`: the gateway's routes. Those of the config file are listed
//! (`"source": "file"`) and refuse changes (409 `route_from_file`); those made here are stored,
//! applied on every node without a restart, and audited.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AdminState;
use super::dto::RateLimitBody;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Auth, RoutesRead, RoutesWrite};
use crate::routes::RouteEntry;

/// How a route spreads requests over its upstreams.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BalanceBody {
    RoundRobin,
    LeastRequests,
}

/// The fields of a `[[routes]]` table of the config file (docs/configuration.md#routes), exactly
/// those: an unknown field is refused. The answers carry them all, defaults filled in, plus the
/// read-only `source`, `created_at` and `updated_at` (accepted back and ignored, so an answer can
/// be edited and sent again).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RouteBody {
    /// Unique in the instance: letters, digits, `-`, `_`, `.`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,100}$")]
    pub id: String,
    /// A path prefix, matched on whole segments.
    #[schema(pattern = "^/")]
    pub path: String,
    pub host: Option<String>,
    /// Header fields the request must have, each with one of the values given (a string or a
    /// list): how an API's versions are told apart by a header (`{"Accept-Version": "2"}`).
    /// Names compare ignoring case, values exactly; a field sent twice, or in another letter
    /// case than a value here, is refused 400 `ambiguous_header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, HeaderValuesBody>>,
    /// `http://host[:port][/base]` or `https://host[:port][/base]`. Give this or `upstreams`.
    pub upstream: Option<String>,
    #[serde(default)]
    pub upstreams: Vec<String>,
    pub balance: Option<BalanceBody>,
    #[serde(default)]
    pub public: bool,
    /// The scope each method requires; `"*"` covers the other methods.
    #[serde(default)]
    pub scopes: BTreeMap<String, String>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub max_body_bytes: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    /// Upstreams named by DNS host names: how often they are looked up again, in seconds.
    pub dns_refresh_seconds: Option<u64>,
    pub retries: Option<u32>,
    pub rate_limit: Option<RateLimitBody>,
    /// `[routes.cors]`: `allow_origins` and the rest.
    #[schema(value_type = Option<Object>)]
    pub cors: Option<Value>,
    /// `[routes.health_check]`: `path`, `interval_seconds`, thresholds.
    #[schema(value_type = Option<Object>)]
    pub health_check: Option<Value>,
    #[serde(default)]
    pub identity_token: bool,
    pub upgrades: Option<Vec<String>>,
    /// Client addresses and CIDRs refused on this route before any token work (403
    /// `address_denied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
    /// The API this route serves (an id `api_…` or a name, of the route's workspace): the route
    /// follows its lifecycle (draft, published, deprecated, retired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The version of `api` this route serves (such as `v1`); needs `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Check each request against the OpenAPI document of `api` (parameters and JSON body)
    /// before forwarding it; an invalid one is answered 400 `request_invalid`. Needs `api`, and
    /// the API needs a document that compiles (else 400 `invalid_route`).
    #[serde(default)]
    pub validate: bool,
    pub description: Option<String>,
    pub openapi: Option<String>,
    /// The workspace's name: the root key's own (the only one allowed here).
    pub workspace: Option<String>,
    /// Accept every workspace's credentials on this route.
    #[serde(default)]
    pub shared: bool,
    /// `https://` upstreams: a PEM file (on the gateway's hosts) of the CA certificates to trust
    /// instead of the system's trust store.
    pub tls_ca_file: Option<String>,
    /// `https://` upstreams: the name sent in SNI and verified, instead of the URL's host.
    pub tls_server_name: Option<String>,
    /// `https://` upstreams: a PEM client certificate chain (mTLS); needs `tls_client_key`.
    pub tls_client_cert: Option<String>,
    /// `https://` upstreams: the PEM private key of `tls_client_cert`.
    pub tls_client_key: Option<String>,
    /// DANGEROUS: accept any certificate for any name from this route's `https://` upstreams.
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
    /// `[routes.cache]`: the route's response cache, `{max_bytes, max_entry_bytes, key_by}`
    /// (`key_by`: `token`, `app` or `route`); absent or null: no cache.
    #[schema(value_type = Option<Object>)]
    pub cache: Option<Value>,
    /// The HTTP version spoken to the upstreams: `http1` (default), `http2` (h2 over TLS, h2c
    /// over `http://`; what gRPC needs) or `auto` (`https://` only, negotiated by ALPN).
    pub upstream_protocol: Option<UpstreamProtocolBody>,
    /// `http` (default): forwarded to the upstreams; `ai`: keygate's AI gateway serves the
    /// OpenAI- and Anthropic-compatible APIs under the path and calls the configured LLM
    /// providers (docs/ai-gateway.md); such a route has no upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<RouteKindBody>,
    /// `[routes.ai]` of an `ai` route: `{models, aliases_only, tokens_per_minute, budget,
    /// first_byte_timeout_ms}`.
    #[schema(value_type = Option<Object>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ai: Option<Value>,
}

/// A header condition's values: one, or a list any of which matches.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum HeaderValuesBody {
    One(String),
    Many(Vec<String>),
}

/// What a route does with the requests it admits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteKindBody {
    Http,
    Ai,
}

/// The HTTP version keygate speaks to a route's upstreams.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocolBody {
    Http1,
    Http2,
    Auto,
}

/// Where a route is defined.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteSourceBody {
    /// The config file: change it there.
    File,
    /// The admin API.
    Api,
}

/// A route: its `[[routes]]` fields, its workspace, and where it is defined.
#[derive(Debug, Serialize, ToSchema)]
pub struct RouteView {
    #[serde(flatten)]
    pub fields: RouteBody,
    pub source: RouteSourceBody,
    /// For API-managed routes.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created_at: Option<keygate_core::Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub updated_at: Option<keygate_core::Timestamp>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RouteList {
    pub data: Vec<RouteView>,
}

fn view(e: RouteEntry) -> Result<RouteView, ApiError> {
    let mut config = e.config;
    config.insert("workspace".into(), Value::String(e.workspace));
    let fields: RouteBody = serde_json::from_value(Value::Object(config))
        .map_err(|err| keygate_core::Error::internal(format!("a route does not fit its own document: {err}")))?;
    Ok(RouteView {
        fields,
        source: if e.from_file { RouteSourceBody::File } else { RouteSourceBody::Api },
        created_at: e.created_at,
        updated_at: e.updated_at,
    })
}

#[utoipa::path(get, path = "/admin/v1/routes", tag = "routes",
    responses((status = 200, body = RouteList)))]
pub(crate) async fn list_routes(
    auth: Auth<RoutesRead>,
    State(s): State<AdminState>,
) -> Result<Json<RouteList>, ApiError> {
    let routes = s.admin.list_routes(&auth.key.workspace_id).await?;
    Ok(Json(RouteList { data: routes.into_iter().map(view).collect::<Result<_, _>>()? }))
}

#[utoipa::path(post, path = "/admin/v1/routes", tag = "routes", request_body = RouteBody,
    responses((status = 201, body = RouteView), (status = 400, body = ErrorBody),
        (status = 409, description = "The id is taken (by a stored route or one of the config file)", body = ErrorBody)))]
pub(crate) async fn create_route(
    auth: Auth<RoutesWrite>,
    State(s): State<AdminState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<RouteView>), ApiError> {
    let route = s.admin.create_route(&auth.key.workspace_id, &auth.actor, body).await?;
    Ok((StatusCode::CREATED, Json(view(route)?)))
}

#[utoipa::path(get, path = "/admin/v1/routes/{id}", tag = "routes", params(("id" = String, Path, description = "The route's id")),
    responses((status = 200, body = RouteView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_route(
    auth: Auth<RoutesRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<RouteView>, ApiError> {
    Ok(Json(view(s.admin.route(&auth.key.workspace_id, &id).await?)?))
}

/// Replaces an API-managed route's fields (all of them: a field left out takes its default).
#[utoipa::path(put, path = "/admin/v1/routes/{id}", tag = "routes", params(("id" = String, Path)), request_body = RouteBody,
    responses((status = 200, body = RouteView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A route of the config file", body = ErrorBody)))]
pub(crate) async fn update_route(
    auth: Auth<RoutesWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<RouteView>, ApiError> {
    Ok(Json(view(s.admin.update_route(&auth.key.workspace_id, &auth.actor, &id, body).await?)?))
}

#[utoipa::path(delete, path = "/admin/v1/routes/{id}", tag = "routes", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "A route of the config file", body = ErrorBody)))]
pub(crate) async fn delete_route(
    auth: Auth<RoutesWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_route(&auth.key.workspace_id, &auth.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
