//! `POST /admin/v1/verify`: token verification for services that check tokens themselves,
//! answered from the gateway's in-memory index (no store round trip for the token) and counted in
//! the same limits as the gateway's traffic. A well-formed request by an authorized key is always
//! answered 200, with `valid` and a stable `code`; a token of another workspace is
//! `unknown_token`, as a revoked one is, so that existence does not leak.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::scope::Scope;
use keygate_core::verify::{MAX_COST, VerifyRequest};

use super::AdminState;
use super::dto::{VerifyRequestBody, VerifyResponseBody};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Auth, TokensVerify};

/// The longest token string read (tokens are far shorter; a longer one is malformed anyway).
const MAX_TOKEN_LEN: usize = 256;

/// Verifies a token: whether a service may accept it for a call needing `scope`, counting `cost`
/// against the token's rate limit and quota.
#[utoipa::path(post, path = "/admin/v1/verify", tag = "tokens", request_body = VerifyRequestBody,
    responses(
        (status = 200, description = "Verified: `valid` says whether to accept the token, `code` why", body = VerifyResponseBody),
        (status = 400, description = "Invalid input (invalid_body, invalid_scope, invalid_cost, invalid_ip)", body = ErrorBody),
        (status = 403, description = "The root key lacks tokens:verify", body = ErrorBody),
        (status = 503, description = "No token index serves verifications on this node", body = ErrorBody),
    ))]
pub(crate) async fn verify_token(
    auth: Auth<TokensVerify>,
    State(s): State<AdminState>,
    ApiJson(req): ApiJson<VerifyRequestBody>,
) -> Result<Json<VerifyResponseBody>, ApiError> {
    let bad = |code: &'static str, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
    if req.token.is_empty() || req.token.chars().count() > MAX_TOKEN_LEN {
        return Err(bad("invalid_token_field", format!("token must be 1 to {MAX_TOKEN_LEN} characters")));
    }
    // An empty scope is no scope (clients whose languages have no absent string send one).
    let scope = req.scope.as_deref().filter(|s| !s.is_empty()).map(Scope::parse_required).transpose()?;
    let cost = match req.cost {
        None => 1,
        Some(c) => u32::try_from(c)
            .ok()
            .filter(|c| *c <= MAX_COST)
            .ok_or_else(|| bad("invalid_cost", format!("cost must be a whole number from 0 to {MAX_COST}")))?,
    };
    let ip = req
        .ip
        .as_deref()
        .map(|raw| {
            raw.trim()
                .parse::<std::net::IpAddr>()
                .map_err(|_| bad("invalid_ip", "ip must be an IPv4 or IPv6 address, such as 203.0.113.7".into()))
        })
        .transpose()?;
    let Some(verifier) = s.admin.verifier() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "verification_unavailable",
            "this node has no token index; send verifications to a node that runs the gateway",
        ));
    };
    let v = verifier
        .verify(&VerifyRequest {
            token: &req.token,
            scope: scope.as_ref(),
            cost,
            ip,
            workspace: &auth.key.workspace_id,
        })
        .await;
    Ok(Json(v.into()))
}
