//! The OAuth2 authorization server's records (issue 5): clients, the instance's signing keys,
//! refresh tokens and their families, the access tokens it issued, the revocations it publishes
//! on the change feed, and the store trait that keeps them. Client secrets and refresh tokens are
//! kept only as keyed hashes, and signing keys' private halves only sealed by the service, so a
//! copied database issues nothing.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{AppId, WorkspaceId};
use crate::model::NewAuditEvent;
use crate::scope::Scope;
use crate::secret::SecretHash;

/// A grant a client may use at the token endpoint, named as in the RFCs that define it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GrantType {
    /// RFC 6749 §4.4.
    #[serde(rename = "client_credentials")]
    ClientCredentials,
    /// RFC 6749 §6, rotated on every use.
    #[serde(rename = "refresh_token")]
    RefreshToken,
    /// RFC 8693.
    #[serde(rename = "urn:ietf:params:oauth:grant-type:token-exchange")]
    TokenExchange,
}

impl GrantType {
    pub const ALL: [GrantType; 3] = [Self::ClientCredentials, Self::RefreshToken, Self::TokenExchange];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientCredentials => "client_credentials",
            Self::RefreshToken => "refresh_token",
            Self::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// How a client authenticates at the token endpoint (RFC 7591 §2 `token_endpoint_auth_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// The secret in HTTP Basic authentication (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// The secret in the form body (RFC 6749 §2.3.1).
    ClientSecretPost,
    /// A JWT signed with a key of the client's registered JWK Set (RFC 7523 §2.2).
    PrivateKeyJwt,
}

impl ClientAuthMethod {
    pub const ALL: [ClientAuthMethod; 3] = [Self::ClientSecretBasic, Self::ClientSecretPost, Self::PrivateKeyJwt];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether the client holds a secret (rather than a key pair).
    pub fn uses_secret(self) -> bool {
        self != Self::PrivateKeyJwt
    }
}

/// What kind of access token a client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessTokenFormat {
    /// A signed JWT per RFC 9068, verifiable with the published JWKS.
    Jwt,
    /// A random string whose meaning only introspection reveals.
    Opaque,
}

impl AccessTokenFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Opaque => "opaque",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jwt" => Some(Self::Jwt),
            "opaque" => Some(Self::Opaque),
            _ => None,
        }
    }
}

/// An app's registration as an OAuth2 client. An app has at most one.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthClient {
    /// Globally unique: the token endpoint looks clients up without knowing their workspace.
    pub client_id: String,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub grant_types: Vec<GrantType>,
    /// The most a token issued to this client may hold.
    pub scopes: Vec<Scope>,
    pub auth_method: ClientAuthMethod,
    /// Keyed hash of the current secret (`None` for `private_key_jwt`).
    pub secret_hash: Option<SecretHash>,
    /// The secret's last four characters, for display.
    pub secret_last4: Option<String>,
    /// The secret replaced by the last rotation, still accepted until `previous_secret_expires_at`.
    pub previous_secret_hash: Option<SecretHash>,
    pub previous_secret_expires_at: Option<Timestamp>,
    /// The client's public JWK Set, for `private_key_jwt`.
    pub jwks: Option<Value>,
    pub access_token_format: AccessTokenFormat,
    /// `EdDSA` or `ES256` (the names of [`crate::jose::Alg`]).
    pub signing_alg: String,
    pub access_token_ttl_seconds: u32,
    pub refresh_token_ttl_seconds: u32,
    /// The delegation rule of token exchange (RFC 8693 §1.1): besides the client's own tokens and
    /// its own app's API keys, the apps (of its workspace) whose API keys and OAuth tokens it may
    /// present as `subject_token`. Empty by default: a client cannot act for another's credentials
    /// unless an administrator says so.
    pub exchange_subject_apps: Vec<AppId>,
    /// When the client was suspended (by a person, or the workspace's anomaly policy), `None`
    /// while it is active. A suspended client is issued nothing (the token, introspection and
    /// revocation endpoints refuse it as a caller), its access tokens were revoked when it was
    /// suspended, and its refresh tokens, kept so that resuming it needs no new grant, count as
    /// inactive until then. A person resumes it: a disabled client in Keycloak's or Auth0's
    /// sense, kept whole so that it can be enabled again.
    pub suspended_at: Option<Timestamp>,
    /// Why, as the person or the policy said (the policy names its alert).
    pub suspended_reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Bumped by every change; updates carry the version they read (optimistic concurrency).
    pub version: i64,
}

impl OAuthClient {
    /// The non-secret fields an audit event records, as JSON.
    pub fn audit_view(&self) -> Value {
        serde_json::json!({
            "app_id": self.app_id,
            "grant_types": self.grant_types,
            "scopes": self.scopes,
            "token_endpoint_auth_method": self.auth_method,
            "secret_last4": self.secret_last4,
            "previous_secret_expires_at": self.previous_secret_expires_at,
            "jwks": self.jwks,
            "access_token_format": self.access_token_format,
            "signing_alg": self.signing_alg,
            "access_token_ttl_seconds": self.access_token_ttl_seconds,
            "refresh_token_ttl_seconds": self.refresh_token_ttl_seconds,
            "exchange_subject_apps": self.exchange_subject_apps,
            "suspended_at": self.suspended_at,
            "suspended_reason": self.suspended_reason,
        })
    }

    /// Whether the client is suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended_at.is_some()
    }
}

/// One of the instance's signing keys (they are not per workspace). A key is published in the JWKS
/// from `created_at`, so verifiers know it before it signs; it signs from `signs_from` until
/// `retired_at`, and stays published until `drop_after`, when every token it signed has expired.
#[derive(Clone, PartialEq)]
pub struct SigningKeyRecord {
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub alg: String,
    pub public_jwk: Value,
    /// The PKCS#8 private key sealed by the service; opaque to the store.
    pub sealed_private: Vec<u8>,
    pub created_at: Timestamp,
    pub signs_from: Timestamp,
    pub retired_at: Option<Timestamp>,
    pub drop_after: Option<Timestamp>,
}

impl SigningKeyRecord {
    /// Whether the key may sign at `now`.
    pub fn signs_at(&self, now: Timestamp) -> bool {
        self.signs_from <= now && self.retired_at.is_none_or(|r| now < r)
    }

    /// Whether the key belongs in the JWKS at `now`.
    pub fn published_at(&self, now: Timestamp) -> bool {
        self.created_at <= now && self.drop_after.is_none_or(|d| now <= d)
    }

    /// The fields an audit event records (never the sealed private key).
    pub fn audit_view(&self) -> Value {
        serde_json::json!({
            "kid": self.kid,
            "alg": self.alg,
            "signs_from": self.signs_from,
            "retired_at": self.retired_at,
            "drop_after": self.drop_after,
        })
    }
}

impl fmt::Debug for SigningKeyRecord {
    // Sealed bytes are harmless without the sealing key, but they have no business in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("public_jwk", &self.public_jwk)
            .field("sealed_private", &format_args!("<{} bytes>", self.sealed_private.len()))
            .field("created_at", &self.created_at)
            .field("signs_from", &self.signs_from)
            .field("retired_at", &self.retired_at)
            .field("drop_after", &self.drop_after)
            .finish()
    }
}

/// A refresh token as stored. Every use rotates it: the used token is marked `used_at` and a new
/// one of the same `family_id` replaces it, so presenting a used one again reveals a copy.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshTokenRecord {
    pub hash: SecretHash,
    /// Every token rotated from the same grant, and the access tokens issued with them.
    pub family_id: String,
    pub client_id: String,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub subject: String,
    pub scopes: Vec<Scope>,
    /// RFC 7638 thumbprint of the DPoP key the token is bound to (RFC 9449 §5).
    pub dpop_jkt: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub used_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

impl RefreshTokenRecord {
    /// Whether the token can still be exchanged at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.used_at.is_none() && self.revoked_at.is_none() && now < self.expires_at
    }
}

/// An access token the server issued (JWT or opaque), kept for introspection and so that the
/// tokens of a refresh-token family can be revoked with it.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessTokenRecord {
    pub jti: String,
    pub client_id: String,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    /// The refresh-token family it was issued with, if any.
    pub family_id: Option<String>,
    pub subject: String,
    pub scopes: Vec<Scope>,
    pub dpop_jkt: Option<String>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

impl AccessTokenRecord {
    /// Whether the token is valid at `now` (RFC 7662's `active`).
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// The `subject_token` claim of a token obtained by token exchange (RFC 8693): the credential it
/// was derived from, so that every check of that credential applies to the derived token too. A
/// gateway resolves it at each request; introspection at each call. Exactly one form is set:
///
/// - a JWT access token of keygate's: its `jti` (revoking it ends the derived token) and its
///   `client_id` (the derived token counts against that client's rate limits);
/// - an API key (opaque access tokens are API keys): its id, and `key_ref`, the base64url of its
///   keyed hash (HMAC-SHA256 under the pepper: it reveals nothing of the key, and is how the
///   gateway's index finds the key, so the key's allowlist, limits, quota, suspension and
///   revocation apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangedFrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ref: Option<String>,
}

impl ExchangedFrom {
    /// The name of the claim.
    pub const CLAIM: &'static str = "subject_token";

    /// The keyed hash of the API key this token was derived from, if it was.
    pub fn key_hash(&self) -> Option<SecretHash> {
        let raw = crate::jose::b64url_decode(self.key_ref.as_deref()?).ok()?;
        SecretHash::from_slice(&raw)
    }
}

/// What suspending a client changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSuspension {
    /// The client as it now is.
    pub client: OAuthClient,
    /// The `jti` of every access token the suspension revoked (an opaque access token's is its
    /// API key's id, which the service revokes as a key too).
    pub revoked: Vec<String>,
}

/// What presenting a refresh token found.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshUse {
    /// The token was live and is now used (the record as it now is): issue its successor.
    Fresh(RefreshTokenRecord),
    /// The token had been used before: someone holds a copy, and its family should be revoked.
    Reused(RefreshTokenRecord),
    /// Unknown, revoked or expired.
    Invalid,
}

/// One access-token revocation on the change feed. `seq` comes from the same sequence as the
/// token changes; `expires_at` tells a gateway when it may forget the `jti`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JtiRevocation {
    pub seq: u64,
    pub jti: String,
    pub expires_at: Timestamp,
}

/// Keeps the authorization server's state. Writes that users cause take their audit event and
/// write it in the same transaction; the token endpoint's own bookkeeping (issuing and using
/// tokens) takes none.
#[async_trait]
pub trait OAuthStore: Send + Sync {
    /// Registers `client`. Its app must be in its workspace (`app_not_found`); an app that already
    /// has a client is refused with `oauth_client_exists`.
    async fn insert_oauth_client(&self, client: &OAuthClient, audit: &NewAuditEvent) -> Result<()>;
    /// Any workspace's client with this id (client ids are globally unique).
    async fn oauth_client(&self, client_id: &str) -> Result<Option<OAuthClient>>;
    async fn oauth_client_for_app(&self, ws: &WorkspaceId, app_id: &AppId) -> Result<Option<OAuthClient>>;
    /// Writes `client` (whose `version` is the one read plus one) if the stored version is still
    /// `client.version - 1`; otherwise `concurrent_update` (`oauth_client_not_found` if it is gone).
    async fn update_oauth_client(&self, client: &OAuthClient, audit: &NewAuditEvent) -> Result<()>;
    /// Suspends the client `client_id` of `ws` at `now` for `reason`, and revokes each of its
    /// access tokens that has neither expired nor been revoked, publishing them on the change
    /// feed as a family revocation does (its refresh tokens are kept: suspension is reversible).
    /// The client's row is changed first, and issuing an access token checks the suspension
    /// under that row's lock (see [`Self::insert_access_token`]), so no token issued in a race
    /// with the suspension outlives it. The audit event is written with `access_tokens_revoked`
    /// added to its `after`. `None`, with nothing written, if the client was suspended already;
    /// `oauth_client_not_found` if there is no such client in `ws`.
    async fn suspend_oauth_client(
        &self,
        ws: &WorkspaceId,
        client_id: &str,
        reason: Option<&str>,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<Option<ClientSuspension>>;
    /// Lifts the client's suspension (its refresh tokens work again; its revoked access tokens
    /// stay revoked). The client as it now is, or `None`, with nothing written, if it was not
    /// suspended; `oauth_client_not_found` if there is no such client in `ws`.
    async fn resume_oauth_client(
        &self,
        ws: &WorkspaceId,
        client_id: &str,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<Option<OAuthClient>>;

    async fn insert_signing_key(&self, key: &SigningKeyRecord, audit: &NewAuditEvent) -> Result<()>;
    /// Every stored signing key, oldest first.
    async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>>;
    /// Saves `retired_at` and `drop_after` (the rest of a key never changes);
    /// `signing_key_not_found` if there is no such key.
    async fn update_signing_key(&self, key: &SigningKeyRecord, audit: &NewAuditEvent) -> Result<()>;
    /// Deletes the keys whose `drop_after` is before `now`; returns how many.
    async fn delete_signing_keys_dropped_before(&self, now: Timestamp) -> Result<u64>;

    /// Stores a new refresh token. Its family must not have been revoked: a token issued by a
    /// rotation that raced with the family's revocation is refused with `token_family_revoked`.
    async fn insert_refresh_token(&self, token: &RefreshTokenRecord) -> Result<()>;
    async fn refresh_token(&self, hash: &SecretHash) -> Result<Option<RefreshTokenRecord>>;
    /// Marks the token used, atomically: of two concurrent uses exactly one is `Fresh`. A token
    /// that exists, is not revoked and was used before is `Reused` (even once expired); anything
    /// else is `Invalid`.
    async fn use_refresh_token(&self, hash: &SecretHash, now: Timestamp) -> Result<RefreshUse>;

    /// Records an issued access token; one of a revoked family is refused like a refresh token,
    /// one of a suspended client with `oauth_client_suspended` (and one of a client that no
    /// longer exists with `oauth_client_not_found`), checked under the client row's lock.
    async fn insert_access_token(&self, token: &AccessTokenRecord) -> Result<()>;
    async fn access_token(&self, jti: &str) -> Result<Option<AccessTokenRecord>>;
    /// The access tokens issued from a refresh-token family, oldest first (the service revokes
    /// the opaque ones with the family).
    async fn access_tokens_of_family(&self, family_id: &str) -> Result<Vec<AccessTokenRecord>>;
    /// Revokes the token and publishes its `jti` on the change feed. `false`, with nothing written
    /// (no audit event either), if it is unknown or already revoked.
    async fn revoke_access_token(&self, jti: &str, now: Timestamp, audit: &NewAuditEvent) -> Result<bool>;
    /// Revokes the family (so no token can join it later), each of its refresh tokens, and each of
    /// its access tokens that has neither expired nor been revoked, publishing those on the change
    /// feed. Returns how many access tokens it revoked; the audit event is written only if anything
    /// changed.
    async fn revoke_token_family(&self, family_id: &str, now: Timestamp, audit: &NewAuditEvent) -> Result<u64>;

    /// Deletes what can no longer matter: access tokens and feed revocations past their expiry,
    /// refresh tokens expired for more than a day, and families left with no tokens. Returns how
    /// many rows it deleted.
    async fn prune_oauth(&self, now: Timestamp) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_serialize_as_their_rfc_names() {
        for g in GrantType::ALL {
            assert_eq!(serde_json::to_value(g).unwrap(), Value::String(g.as_str().into()));
            assert_eq!(GrantType::parse(g.as_str()), Some(g));
            assert_eq!(serde_json::from_value::<GrantType>(Value::String(g.as_str().into())).unwrap(), g);
        }
        assert_eq!(GrantType::TokenExchange.as_str(), "urn:ietf:params:oauth:grant-type:token-exchange");
        assert_eq!(GrantType::parse("password"), None, "no resource-owner password grant");
        for m in ClientAuthMethod::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), Value::String(m.as_str().into()));
            assert_eq!(ClientAuthMethod::parse(m.as_str()), Some(m));
        }
        assert_eq!(ClientAuthMethod::parse("none"), None);
        for f in [AccessTokenFormat::Jwt, AccessTokenFormat::Opaque] {
            assert_eq!(serde_json::to_value(f).unwrap(), Value::String(f.as_str().into()));
            assert_eq!(AccessTokenFormat::parse(f.as_str()), Some(f));
        }
    }

    #[test]
    fn signing_key_windows() {
        let t = |s: i64| Timestamp::from_millis(s * 1000);
        let mut k = SigningKeyRecord {
            kid: "k1".into(),
            alg: "EdDSA".into(),
            public_jwk: serde_json::json!({"kty": "OKP"}),
            sealed_private: vec![7; 48],
            created_at: t(0),
            signs_from: t(10),
            retired_at: None,
            drop_after: None,
        };
        assert!(k.published_at(t(0)) && !k.signs_at(t(9)) && k.signs_at(t(10)), "published before it signs");
        k.retired_at = Some(t(20));
        k.drop_after = Some(t(30));
        assert!(k.signs_at(t(19)) && !k.signs_at(t(20)));
        assert!(k.published_at(t(30)) && !k.published_at(t(31)), "published until its tokens expire");
        assert!(!format!("{k:?}").contains("7, 7"), "the sealed key stays out of Debug");
    }
}
