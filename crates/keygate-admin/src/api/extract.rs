//! Extractors whose failures are admin API errors with stable codes: JSON bodies (size limit,
//! syntax, unknown fields, wrong types), query strings, and root-key authentication with the
//! permission each handler names in its signature.

use std::marker::PhantomData;
use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use keygate_core::model::{Actor, Permission, RootKey};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AdminState, MAX_BODY_BYTES};

/// A JSON body, read up to [`MAX_BODY_BYTES`]. An empty body reads as `{}` when `T` allows it.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        read_json(req, state, MAX_BODY_BYTES).await.map(ApiJson)
    }
}

/// The largest body [`LargeJson`] reads: an API with its OpenAPI document (1 MiB) and the rest.
pub const MAX_LARGE_BODY_BYTES: usize = keygate_core::apis::MAX_OPENAPI_BYTES + 64 * 1024;

/// A JSON body that may carry a document (an API's OpenAPI document), read up to
/// [`MAX_LARGE_BODY_BYTES`]; otherwise as [`ApiJson`].
pub struct LargeJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for LargeJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        read_json(req, state, MAX_LARGE_BODY_BYTES).await.map(LargeJson)
    }
}

/// Reads a JSON object body of at most `limit` bytes into `T`.
async fn read_json<T: DeserializeOwned, S: Send + Sync>(req: Request, state: &S, limit: usize) -> Result<T, ApiError> {
    let has_json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    let has_type = req.headers().contains_key(header::CONTENT_TYPE);
    let bytes = Bytes::from_request(req, state).await.map_err(|_| body_unreadable())?;
    if bytes.len() > limit {
        return Err(too_large());
    }
    if has_type && !has_json_type && !bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON ({e})"))
    })?;
    // Every body is an object: serde would also read a struct from an array of its fields.
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "the body must be a JSON object"));
    }
    integral_numbers(&mut value);
    serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("the body does not fit: {e}")))
}

/// Turns numbers written with a zero fraction (`60.0`, `6e1`) into the integers they are. JSON
/// has one number type, and JSON Schema's `integer` is any number whose fraction is zero (JSON
/// Schema 2020-12 §6.1.1), so the document's integer fields accept `60.0`; serde's integer types do
/// not. Done once here, for every body, rather than field by field — except inside `metadata`,
/// which is the caller's own free-form JSON and is kept exactly as sent.
fn integral_numbers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.is_finite()) {
                // Exactly representable integers only (|f| < 2^53); larger ones stay as they are
                // and are refused by the field's type.
                if f.abs() < 9_007_199_254_740_992.0 {
                    #[allow(clippy::cast_possible_truncation, reason = "integral and below 2^53: exact")]
                    let i = f as i64;
                    *v = serde_json::Value::from(i);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(map) => {
            map.iter_mut().filter(|(k, _)| k.as_str() != "metadata").for_each(|(_, v)| integral_numbers(v));
        }
        _ => {}
    }
}

/// A page size given as `limit`: 1 to 500; none gives the default.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    use keygate_core::model::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
    match limit {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("limit is a page size from 1 to {MAX_PAGE_SIZE}"),
        )),
    }
}

/// A list cursor by creation time, as the API hands them out: `<ms>.<id>` (the document's
/// pattern, checked here too, so that what it refuses is refused).
pub fn time_cursor(cursor: Option<String>) -> Result<Option<String>, ApiError> {
    let ok = |c: &str| {
        c.split_once('.').is_some_and(|(ms, id)| {
            (1..=15).contains(&ms.len())
                && ms.bytes().all(|b| b.is_ascii_digit())
                && id.split_once('_').is_some_and(|(kind, rest)| {
                    (2..=4).contains(&kind.len())
                        && kind.bytes().all(|b| b.is_ascii_lowercase())
                        && (1..=64).contains(&rest.len())
                        && rest.bytes().all(|b| b.is_ascii_alphanumeric())
                })
        })
    };
    cursor_checked(cursor, ok)
}

/// An audit-trail cursor: an event id of 1 to 15 digits.
pub fn audit_cursor(cursor: Option<String>) -> Result<Option<String>, ApiError> {
    cursor_checked(cursor, |c| (1..=15).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_digit()))
}

fn cursor_checked(cursor: Option<String>, ok: impl Fn(&str) -> bool) -> Result<Option<String>, ApiError> {
    match cursor {
        Some(c) if !ok(&c) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "the cursor is not one this API returned; start again without it",
        )),
        other => Ok(other),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

fn body_unreadable() -> ApiError {
    // Bytes::from_request only fails on a body it could not read in full (or over a limit).
    too_large()
}

/// A query string whose failures name the parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri).map(|q| ApiQuery(q.0)).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("the query string does not fit: {}", e.body_text()),
            )
        })
    }
}

/// A permission a handler requires, named as a type so a route cannot forget it.
pub trait RequiredPermission {
    const PERMISSION: Permission;
}

macro_rules! permission_marker {
    ($($name:ident => $perm:ident),* $(,)?) => {$(
        #[doc = concat!("Requires `", stringify!($perm), "`.")]
        pub struct $name;
        impl RequiredPermission for $name {
            const PERMISSION: Permission = Permission::$perm;
        }
    )*};
}

permission_marker!(
    TokensRead => TokensRead,
    TokensWrite => TokensWrite,
    AppsRead => AppsRead,
    AppsWrite => AppsWrite,
    PlansRead => PlansRead,
    PlansWrite => PlansWrite,
    AuditRead => AuditRead,
    KeysWrite => KeysWrite,
    RootKeysRead => RootKeysRead,
    RootKeysWrite => RootKeysWrite,
    RoutesRead => RoutesRead,
    RoutesWrite => RoutesWrite,
    WorkspacesRead => WorkspacesRead,
    WorkspacesWrite => WorkspacesWrite,
    TokensVerify => TokensVerify,
    WebhooksRead => WebhooksRead,
    WebhooksWrite => WebhooksWrite,
    ProvidersRead => ProvidersRead,
    ProvidersWrite => ProvidersWrite,
    ApisRead => ApisRead,
    ApisWrite => ApisWrite,
);

/// Refuses a root key that lacks `permission`: for an action whose permission depends on what it
/// acts on (beside the one its route requires, [`Auth`]).
pub fn require(key: &RootKey, permission: Permission) -> Result<(), ApiError> {
    if key.permissions.contains(&permission) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "missing_permission",
        format!("this root key lacks the permission {}; use a key that has it", permission.as_str()),
    ))
}

/// An authenticated root key holding permission `P`.
pub struct Auth<P> {
    pub key: RootKey,
    pub actor: Actor,
    _permission: PhantomData<P>,
}

impl<P: RequiredPermission> FromRequestParts<AdminState> for Auth<P> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "send a root key as `Authorization: Bearer <key>`; create one with `keygate root-key create`",
            )
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_credentials",
                    "the Authorization header must be `Bearer <root key>`",
                )
            })?;
        let key = state.admin.authenticate(presented).await?;
        require(&key, P::PERMISSION)?;
        let source = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ci| ci.0.ip().to_string());
        // A key that may change plans may also give a token more than its plan: it could raise the
        // plan itself.
        let owner = key.permissions.contains(&keygate_core::model::Permission::PlansWrite);
        let actor = Actor { id: key.id.to_string(), source, owner };
        Ok(Self { key, actor, _permission: PhantomData })
    }
}

/// An optional RFC 3339 date-time query parameter named `name`.
pub fn time_param(raw: Option<&str>, name: &str) -> Result<Option<keygate_core::Timestamp>, ApiError> {
    raw.map(|r| {
        keygate_core::Timestamp::parse_rfc3339(r).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("{name} must be an RFC 3339 date-time such as 2030-01-31T00:00:00Z"),
            )
        })
    })
    .transpose()
}
