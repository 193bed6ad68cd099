//! `/admin/v1/root-keys…`: the workspace's admin API credentials, listed (never their secrets) and
//! revoked. Creating one stays with `keygate root-key create` and the dashboard's owners: a key
//! that could mint keys would let one leaked key outlive its own revocation.

use axum::Json;
use axum::extract::{Path, State};
use keygate_core::Error;
use keygate_core::ids::RootKeyId;

use super::AdminState;
use super::dto::{RootKeyList, RootKeyView};
use super::error::{ApiError, ErrorBody};
use super::extract::{Auth, RootKeysRead, RootKeysWrite};

fn root_key_id(raw: &str) -> Result<RootKeyId, ApiError> {
    RootKeyId::parse(raw).ok_or_else(|| Error::not_found("root key").into())
}

/// The workspace's root keys, newest first, revoked and expired ones included.
#[utoipa::path(get, path = "/admin/v1/root-keys", tag = "root keys",
    responses((status = 200, body = RootKeyList)))]
pub(crate) async fn list_root_keys(
    auth: Auth<RootKeysRead>,
    State(s): State<AdminState>,
) -> Result<Json<RootKeyList>, ApiError> {
    let keys = s.admin.list_root_keys(&auth.key.workspace_id).await?;
    let now = s.admin.now();
    let prefix = s.admin.root_prefix();
    Ok(Json(RootKeyList { data: keys.iter().map(|k| RootKeyView::new(k, now, prefix.as_str())).collect() }))
}

/// Revokes a root key of the workspace: refused from the next request on, on every node. Final;
/// revoking a revoked key changes nothing. A key may revoke only keys that hold no permission it
/// lacks (itself included).
#[utoipa::path(delete, path = "/admin/v1/root-keys/{id}", tag = "root keys", params(("id" = String, Path)),
    responses((status = 200, description = "Revoked", body = RootKeyView), (status = 404, body = ErrorBody),
        (status = 403, description = "The key holds permissions the caller lacks", body = ErrorBody)))]
pub(crate) async fn revoke_root_key(
    auth: Auth<RootKeysWrite>,
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<RootKeyView>, ApiError> {
    let key = s.admin.revoke_root_key(&auth.key.workspace_id, &auth.actor, Some(&auth.key), &root_key_id(&id)?).await?;
    Ok(Json(RootKeyView::new(&key, s.admin.now(), s.admin.root_prefix().as_str())))
}
