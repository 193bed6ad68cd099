//! Token verification for services that check tokens themselves (`POST /admin/v1/verify`): what
//! is asked ([`VerifyRequest`]), what is answered ([`Verification`] with a [`VerifyCode`]), and
//! the seam the control plane asks through ([`TokenVerifier`]), implemented by the gateway over
//! its in-memory token index and limiter, so that a verification and the gateway's own traffic
//! count against the same limits.

use std::net::IpAddr;

use crate::Timestamp;
use crate::ids::WorkspaceId;
use crate::scope::Scope;

/// The largest `cost` one verification may count.
pub const MAX_COST: u32 = 1000;

/// The route name verifications are metered under in a token's usage.
pub const VERIFY_ROUTE: &str = "verify";

/// What a verification decided, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyCode {
    Ok,
    /// Not a token of this instance's format (prefix, length, alphabet, checksum).
    MalformedToken,
    /// Well-formed but unknown: never issued, revoked, deleted, or of another workspace than
    /// the asking root key's (never said apart, so that existence does not leak).
    UnknownToken,
    TokenSuspended,
    TokenExpired,
    /// The request's `ip` is not in the token's allowlist.
    IpNotAllowed,
    /// The token holds no scope covering the one asked for.
    InsufficientScope,
    /// The token's rate limit has not `cost` requests left now.
    RateLimited,
    /// The token's quota has not `cost` requests left in its period.
    QuotaExceeded,
}

impl VerifyCode {
    pub const ALL: [VerifyCode; 9] = [
        Self::Ok,
        Self::MalformedToken,
        Self::UnknownToken,
        Self::TokenSuspended,
        Self::TokenExpired,
        Self::IpNotAllowed,
        Self::InsufficientScope,
        Self::RateLimited,
        Self::QuotaExceeded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::MalformedToken => "malformed_token",
            Self::UnknownToken => "unknown_token",
            Self::TokenSuspended => "token_suspended",
            Self::TokenExpired => "token_expired",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::InsufficientScope => "insufficient_scope",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// One verification, asked on behalf of a root key of `workspace`.
#[derive(Debug)]
pub struct VerifyRequest<'a> {
    /// The presented token (a secret: never logged).
    pub token: &'a str,
    /// The scope the caller needs; `None`: any valid token will do.
    pub scope: Option<&'a Scope>,
    /// How many requests this counts against the token's rate limit and quota (0 only reads).
    pub cost: u32,
    /// The address the token was presented from, checked against its allowlist when given.
    pub ip: Option<IpAddr>,
    /// The asking root key's workspace: tokens of other workspaces are unknown to it.
    pub workspace: &'a WorkspaceId,
}

/// The state of one of a token's limits after a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Requests per window (a rate limit's capacity, or a quota's requests).
    pub limit: u64,
    pub remaining: u64,
    /// When the limit is whole again (rate limit) or the quota's period ends; `None` for a quota
    /// that never resets.
    pub reset_at: Option<Timestamp>,
}

/// What is known of a token that is found (it may still be refused for its scope or limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub token_id: String,
    pub app_id: String,
    pub workspace_id: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<Timestamp>,
}

/// The answer to a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub code: VerifyCode,
    /// Set when the token was found in the caller's workspace, active and not expired.
    pub token: Option<VerifiedToken>,
    pub rate_limit: Option<LimitState>,
    pub quota: Option<LimitState>,
}

impl Verification {
    /// A verification refused before the token was known.
    pub fn refused(code: VerifyCode) -> Self {
        Self { code, token: None, rate_limit: None, quota: None }
    }

    pub fn valid(&self) -> bool {
        self.code == VerifyCode::Ok
    }
}

/// What a node's token index knows of the change feed, for its readiness (`GET /readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStatus {
    /// Tokens resident.
    pub tokens: usize,
    /// The change-feed position applied.
    pub position: u64,
    /// How long ago the index last read the feed to its end; `None` if it never did since it
    /// loaded.
    pub caught_up_ago: Option<std::time::Duration>,
}

/// A node's token index, as its readiness sees it.
pub trait IndexReadiness: Send + Sync {
    fn status(&self) -> IndexStatus;
}

/// Verifies tokens from memory (the gateway's index and limiter): it never waits on a store. With
/// shared limits a verification that counts a cost asks the shared state (Redis) once, within the
/// gateway's wait bound.
#[async_trait::async_trait]
pub trait TokenVerifier: Send + Sync {
    async fn verify(&self, req: &VerifyRequest<'_>) -> Verification;
}
