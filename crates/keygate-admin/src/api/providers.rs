//! `/admin/v1/providers…`: the LLM providers the workspace's `ai` routes call. Those of the
//! config file are listed (`"source": "file"`) and refuse changes (409 `provider_from_file`);
//! those made here have their key sealed under the pepper and never shown again (a fingerprint
//! tells keys apart), are applied on every node without a restart, and are audited.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::AdminState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Auth, ProvidersRead, ProvidersWrite};
use crate::providers::ProviderEntry;

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKindBody {
    /// OpenAI and every OpenAI-compatible server (vLLM, Ollama, LM Studio, Mistral, Groq,
    /// DeepSeek).
    Openai,
    Anthropic,
    /// Azure OpenAI: deployments in the URL, an `api-key` header, `api_version` required.
    Azure,
}

/// What a model costs, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelPriceBody {
    #[schema(minimum = 0, maximum = 1000000)]
    pub input: f64,
    #[schema(minimum = 0, maximum = 1000000)]
    pub output: f64,
    /// Input tokens read from the provider's prompt cache. Default: `input`.
    #[schema(minimum = 0, maximum = 1000000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
}

/// A provider to make: the fields of a `[[providers]]` table, with the key itself (`api_key`)
/// instead of where to read it. The key is sealed under the pepper and never shown again.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // The document's shape; the service reads the JSON itself.
pub struct CreateProviderRequest {
    /// The name deployments start with (`openai` in `"openai/gpt-4o-mini"`), unique in the
    /// instance.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub id: String,
    pub kind: ProviderKindBody,
    /// `https://…` (such as `https://api.openai.com/v1`); a public host unless `[ai]
    /// allow_private_providers` is set.
    #[schema(pattern = "^https://[A-Za-z0-9.-]{1,200}(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")]
    pub base_url: String,
    /// The provider's key; absent for a server that needs none.
    #[schema(pattern = "^[!-~]{1,4096}$")]
    pub api_key: Option<String>,
    /// Anthropic: `anthropic-version` (default `2023-06-01`); Azure: `api-version` (required).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub api_version: Option<String>,
    /// Prices per model, in US dollars per million tokens.
    #[serde(default)]
    pub prices: BTreeMap<String, ModelPriceBody>,
}

/// Changes to a provider made here: the fields given replace the old ones (`null` removes an
/// optional one). The key changes with `rotate-key`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // The document's shape; the service reads the JSON itself.
pub struct UpdateProviderRequest {
    pub kind: Option<ProviderKindBody>,
    #[schema(pattern = "^https://[A-Za-z0-9.-]{1,200}(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")]
    pub base_url: Option<String>,
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub api_version: Option<String>,
    pub prices: Option<BTreeMap<String, ModelPriceBody>>,
}

/// A provider's new key (or none: `null`, for a server that needs none).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateProviderKeyRequest {
    #[schema(pattern = "^[!-~]{1,4096}$")]
    pub api_key: Option<String>,
}

/// Where a provider is defined.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderSourceBody {
    /// The config file's `[[providers]]`: change it there.
    File,
    /// The admin API or the dashboard.
    Api,
}

/// A provider, never with its key.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderView {
    pub id: String,
    pub kind: ProviderKindBody,
    pub base_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    pub prices: BTreeMap<String, ModelPriceBody>,
    pub source: ProviderSourceBody,
    /// File providers: the environment variable the key is read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File providers: the file the key is read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// Providers made here: the first 12 hex digits of the key's SHA-256 (null: no key).
    pub key_fingerprint: Option<String>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub key_rotated_at: Option<keygate_core::Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created_at: Option<keygate_core::Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub updated_at: Option<keygate_core::Timestamp>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderList {
    pub data: Vec<ProviderView>,
}

/// The view of a provider (its fields as the gateway wrote them back).
pub(crate) fn view(e: ProviderEntry) -> Result<ProviderView, ApiError> {
    #[derive(Deserialize)]
    struct Fields {
        kind: ProviderKindBody,
        base_url: String,
        #[serde(default)]
        api_version: Option<String>,
        #[serde(default)]
        prices: BTreeMap<String, ModelPriceBody>,
        #[serde(default)]
        api_key_env: Option<String>,
        #[serde(default)]
        api_key_file: Option<String>,
    }
    let f: Fields = serde_json::from_value(Value::Object(e.config.clone()))
        .map_err(|err| keygate_core::Error::internal(format!("a provider does not fit its own document: {err}")))?;
    Ok(ProviderView {
        id: e.id,
        kind: f.kind,
        base_url: f.base_url,
        api_version: f.api_version,
        prices: f.prices,
        source: if e.from_file { ProviderSourceBody::File } else { ProviderSourceBody::Api },
        api_key_env: f.api_key_env,
        api_key_file: f.api_key_file,
        key_fingerprint: e.key_fingerprint,
        key_rotated_at: e.key_rotated_at,
        created_at: e.created_at,
        updated_at: e.updated_at,
    })
}

#[utoipa::path(get, path = "/admin/v1/providers", tag = "providers",
    responses((status = 200, body = ProviderList)))]
pub(crate) async fn list_providers(
    auth: Auth<ProvidersRead>,
    State(s): State<AdminState>,
) -> Result<Json<ProviderList>, ApiError> {
    let list = s.admin.list_providers(&auth.key.workspace_id).await?;
    Ok(Json(ProviderList { data: list.into_iter().map(view).collect::<Result<_, _>>()? }))
}

#[utoipa::path(post, path = "/admin/v1/providers", tag = "providers", request_body = CreateProviderRequest,
    responses((status = 201, body = ProviderView), (status = 400, body = ErrorBody),
        (status = 409, description = "The id is taken (by a provider made here or one of the config file)", body = ErrorBody)))]
pub(crate) async fn create_provider(
    auth: Auth<ProvidersWrite>,
    State(s): State<AdminState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<ProviderView>), ApiError> {
    let p = s.admin.create_provider(&auth.key.workspace_id, &auth.actor, body).await?;
    Ok((StatusCode::CREATED, Json(view(p)?)))
}

#[utoipa::path(get, path = "/admin/v1/providers/{id}", tag = "providers", params(("id" = String, Path, description = "The provider's id")),
    responses((status = 200, body = ProviderView), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_provider(
    auth: Auth<ProvidersRead>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<ProviderView>, ApiError> {
    Ok(Json(view(s.admin.provider(&auth.key.workspace_id, &id).await?)?))
}

#[utoipa::path(patch, path = "/admin/v1/providers/{id}", tag = "providers", params(("id" = String, Path)), request_body = UpdateProviderRequest,
    responses((status = 200, body = ProviderView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A provider of the config file", body = ErrorBody)))]
pub(crate) async fn update_provider(
    auth: Auth<ProvidersWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<ProviderView>, ApiError> {
    Ok(Json(view(s.admin.update_provider(&auth.key.workspace_id, &auth.actor, &id, body).await?)?))
}

/// Gives a provider made here a new key, used from the next call on (on other nodes, within the
/// change feed's delay). Revoke the old key at the provider afterwards.
#[utoipa::path(post, path = "/admin/v1/providers/{id}/rotate-key", tag = "providers", params(("id" = String, Path)),
    request_body = RotateProviderKeyRequest,
    responses((status = 200, body = ProviderView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A provider of the config file", body = ErrorBody)))]
pub(crate) async fn rotate_provider_key(
    auth: Auth<ProvidersWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RotateProviderKeyRequest>,
) -> Result<Json<ProviderView>, ApiError> {
    let p = s.admin.rotate_provider_key(&auth.key.workspace_id, &auth.actor, &id, body.api_key.as_deref()).await?;
    Ok(Json(view(p)?))
}

#[utoipa::path(delete, path = "/admin/v1/providers/{id}", tag = "providers", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted, with its sealed key"), (status = 404, body = ErrorBody),
        (status = 409, description = "A provider of the config file, or one a route calls", body = ErrorBody)))]
pub(crate) async fn delete_provider(
    auth: Auth<ProvidersWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.admin.delete_provider(&auth.key.workspace_id, &auth.actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A logged LLM call (a route with `log_prompts`): the request body the client sent and the
/// answer it got, each cut at 64 KiB; never a header, so never a credential.
#[derive(Debug, Serialize, ToSchema)]
pub struct LlmLogView {
    pub id: i64,
    pub at: String,
    pub route: String,
    /// The token that made the call.
    pub token_id: String,
    pub app_id: String,
    /// The model the client named, and the deployment that answered (or was tried last).
    pub model: String,
    pub deployment: String,
    pub status: u16,
    pub request: String,
    pub answer: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// When it is deleted (the route's `log_retention_days`).
    pub expires_at: String,
}

impl From<keygate_core::llm::LlmLog> for LlmLogView {
    fn from(l: keygate_core::llm::LlmLog) -> Self {
        let time = |ms: i64| keygate_core::Timestamp::from_millis(ms).to_rfc3339();
        Self {
            id: l.id,
            at: time(l.at),
            route: l.route,
            token_id: l.caller,
            app_id: l.app_id,
            model: l.model,
            deployment: l.deployment,
            status: l.status,
            request: l.request,
            answer: l.answer,
            input_tokens: l.input_tokens,
            output_tokens: l.output_tokens,
            cost_usd: l.micro_usd as f64 / 1e6,
            expires_at: time(l.expires_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LlmLogList {
    pub data: Vec<LlmLogView>,
    /// Give it as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LlmLogQuery {
    /// Only this route's calls.
    pub route: Option<String>,
    /// Only this token's calls.
    pub token_id: Option<String>,
    /// From `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<u32>,
}

/// The workspace's logged LLM calls, newest first (routes with `log_prompts` only).
#[utoipa::path(get, path = "/admin/v1/llm-logs", tag = "providers", params(LlmLogQuery),
    responses((status = 200, body = LlmLogList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_llm_logs(
    auth: Auth<super::extract::AuditRead>,
    State(s): State<AdminState>,
    super::extract::ApiQuery(q): super::extract::ApiQuery<LlmLogQuery>,
) -> Result<Json<LlmLogList>, ApiError> {
    let bad = |m: &str| ApiError::from(keygate_core::Error::invalid("invalid_query", m.to_owned()));
    let token = match q.token_id.as_deref() {
        Some(t) => Some(keygate_core::ids::TokenId::parse(t).ok_or_else(|| bad("token_id is a token's id (tok_…)"))?),
        None => None,
    };
    let before = match q.cursor.as_deref() {
        Some(c) => {
            Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| bad("cursor is the next_cursor of a page"))?)
        }
        None => None,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(bad("limit is from 1 to 200"));
    }
    let logs = s.admin.llm_logs(&auth.key.workspace_id, q.route.as_deref(), token.as_ref(), before, limit).await?;
    let next_cursor = (logs.len() == limit as usize).then(|| logs.last().map(|l| l.id.to_string())).flatten();
    Ok(Json(LlmLogList { data: logs.into_iter().map(LlmLogView::from).collect(), next_cursor }))
}
