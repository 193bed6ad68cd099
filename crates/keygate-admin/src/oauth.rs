//! The OAuth2 authorization server (issue 5): OAuth clients of apps, the instance's signing keys,
//! and the token endpoint's grants — client credentials (RFC 6749 §4.4), refresh tokens rotated
//! on every use with reuse detection (RFC 6819 §5.2.2.3, RFC 9700 §4.14), and token exchange (RFC
//! 8693) for down-scoped, short-lived tokens — with JWT access tokens per RFC 9068, DPoP binding
//! (RFC 9449), introspection (RFC 7662), revocation (RFC 7009), metadata (RFC 8414) and the JWKS.
//! The HTTP surface is [`http`]; the admin API's client and key operations call this module too.
//!
//! Secrets: client secrets and refresh tokens are minted in keygate's checksummed token format
//! (prefixes `<prefix>cs` and `<prefix>rt`), shown once and stored as keyed hashes; signing keys'
//! private halves are stored sealed under a pepper-derived key ([`crate::seal`]).

pub mod http;
mod throttle;

use throttle::KeyedRate;
pub use throttle::{Footprint, THROTTLE_CAPACITY};

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keygate_core::dpop::{self, ProofCheck, ReplayCache};
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::jose::{self, Alg, Audience, Claims, Confirmation, PublicJwk, SigningKey};
use keygate_core::model::{Actor, NewAuditEvent, TokenState, TokenStatus};
use keygate_core::oauth::{
    AccessTokenFormat, AccessTokenRecord, ClientAuthMethod, ExchangedFrom, GrantType, OAuthClient, RefreshTokenRecord,
    RefreshUse, SigningKeyRecord,
};
use keygate_core::policy::RateLimit;
use keygate_core::scope::{Scope, any_covers};
use keygate_core::secret::{SecretHash, TokenSecret};
use keygate_core::token_format::{self, TokenPrefix};
use keygate_core::{Error, ErrorKind, Result, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::seal::Sealer;
use crate::service::{Admin, NewToken};

/// `subject_token_type` / `issued_token_type` of an access token (RFC 8693 §3).
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `subject_token_type` of a JWT (RFC 8693 §3).
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `client_assertion_type` of RFC 7523 §2.2.
pub const CLIENT_ASSERTION_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The authorization server's settings (`[oauth]` in keygate's configuration).
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    /// `iss` of every token, and the base URL of the endpoints in the metadata: the public URL
    /// of the gateway listener, as clients reach it.
    pub issuer: String,
    /// `aud` of access tokens when the client names none.
    pub audience: String,
    /// Access-token lifetime for clients that set none, in seconds.
    pub access_token_ttl_seconds: u32,
    /// Refresh-token lifetime for clients that set none, in seconds.
    pub refresh_token_ttl_seconds: u32,
    /// The longest access-token lifetime a client may have, in seconds.
    pub max_access_token_ttl_seconds: u32,
    /// The longest lifetime of a token obtained by token exchange, in seconds.
    pub exchange_ttl_seconds: u32,
    /// Allowed clock skew, in seconds.
    pub leeway_seconds: u32,
    /// A signing key older than this is replaced (the old one keeps verifying until its tokens
    /// expire).
    pub key_rotation_days: u32,
    /// A new signing key is published in the JWKS this long before it signs, so that verifiers
    /// that cache the JWKS know it before they meet it.
    pub key_publish_ahead_seconds: u32,
    /// Requests per authenticated client at the token, introspection and revocation endpoints.
    pub client_rate: RateLimit,
    /// Requests per client address at those endpoints (an IPv6 address counts as its /64).
    pub address_rate: RateLimit,
    /// Failed client authentications per (address, claimed client id): guessing from one place
    /// is slowed, and nobody elsewhere can lock a client out by its public id.
    pub failure_rate: RateLimit,
    /// How old a DPoP proof may be, in seconds.
    pub dpop_max_age_seconds: u32,
    /// Require server-provided nonces in DPoP proofs (RFC 9449 §8), handed out in `DPoP-Nonce`.
    pub dpop_nonces: bool,
    /// Unexpired DPoP proofs and client assertions remembered per client (replay detection).
    pub replay_per_client: usize,
}

impl OAuthSettings {
    pub fn for_issuer(issuer: &str) -> Self {
        let issuer = issuer.trim_end_matches('/').to_owned();
        Self {
            audience: issuer.clone(),
            issuer,
            access_token_ttl_seconds: 900,
            refresh_token_ttl_seconds: 30 * 86_400,
            max_access_token_ttl_seconds: 86_400,
            exchange_ttl_seconds: 300,
            leeway_seconds: 30,
            key_rotation_days: 90,
            key_publish_ahead_seconds: 3_600,
            client_rate: RateLimit { requests: 20, per_seconds: 1, burst: 40 },
            address_rate: RateLimit { requests: 50, per_seconds: 1, burst: 100 },
            failure_rate: RateLimit { requests: 1, per_seconds: 1, burst: 19 },
            dpop_max_age_seconds: 300,
            dpop_nonces: false,
            replay_per_client: 20_000,
        }
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth2/token", self.issuer)
    }
}

/// An error of the OAuth endpoints, in RFC 6749 §5.2 form: `{"error", "error_description"}`.
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub status: u16,
    /// The RFC 6749 (or RFC 9449) error code.
    pub error: &'static str,
    pub description: Cow<'static, str>,
    /// Sent with 401 `invalid_client` when the client tried HTTP Basic (RFC 6749 §5.2).
    pub www_authenticate: Option<&'static str>,
    pub retry_after: Option<u64>,
    /// A nonce to use in the next DPoP proof (RFC 9449 §8), sent as `DPoP-Nonce`.
    pub dpop_nonce: Option<String>,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            www_authenticate: None,
            retry_after: None,
            dpop_nonce: None,
        }
    }
    fn invalid_request(d: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, "invalid_request", d)
    }
    fn invalid_client(d: impl Into<Cow<'static, str>>) -> Self {
        Self::new(401, "invalid_client", d)
    }
    fn invalid_grant(d: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, "invalid_grant", d)
    }
    fn invalid_scope(d: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, "invalid_scope", d)
    }
    fn server(e: &Error) -> Self {
        tracing::error!(error = %e, "oauth: internal error");
        Self::new(500, "server_error", "the authorization server failed; try again")
    }
    fn dpop(e: &Error) -> Self {
        Self::new(400, "invalid_dpop_proof", e.message.clone())
    }
}

/// Internal failures become `server_error` (their detail goes to the log, not the client).
impl From<Error> for OAuthError {
    fn from(e: Error) -> Self {
        OAuthError::server(&e)
    }
}

type OResult<T> = std::result::Result<T, OAuthError>;

/// A parsed request to one of the OAuth endpoints: its form parameters (each at most once,
/// RFC 6749 §3.2), the `Authorization` and `DPoP` headers, and the client's address.
#[derive(Debug, Default, Clone)]
pub struct OAuthRequest {
    pub form: HashMap<String, String>,
    pub authorization: Option<String>,
    pub dpop: Option<String>,
    pub peer: Option<std::net::IpAddr>,
}

impl OAuthRequest {
    fn param(&self, name: &str) -> Option<&str> {
        self.form.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
    fn required(&self, name: &'static str) -> OResult<&str> {
        self.param(name).ok_or_else(|| OAuthError::invalid_request(format!("the parameter {name} is missing")))
    }
}

/// A token endpoint answer (RFC 6749 §5.1).
#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_token_type: Option<&'static str>,
}

/// A client to register for an app.
#[derive(Debug, Clone, Default)]
pub struct NewClient {
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub auth_method: Option<String>,
    pub jwks: Option<Value>,
    pub access_token_format: Option<String>,
    pub signing_alg: Option<String>,
    pub access_token_ttl_seconds: Option<u32>,
    pub refresh_token_ttl_seconds: Option<u32>,
    /// Apps whose credentials the client may exchange (see [`OAuthClient::exchange_subject_apps`]).
    pub exchange_subject_apps: Vec<String>,
}

/// The most apps a client's delegation rule may name.
pub const MAX_EXCHANGE_SUBJECT_APPS: usize = 100;

/// The instance's signing keys as the server uses them: every published key's public half, and
/// the private half of those that sign now.
#[derive(Default)]
pub struct KeyRing {
    pub records: Vec<SigningKeyRecord>,
    signers: Vec<Arc<SigningKey>>,
}

impl KeyRing {
    /// The public keys by `kid`, for verification.
    pub fn public_keys(&self) -> Vec<(String, PublicJwk)> {
        self.records
            .iter()
            .filter_map(|r| {
                let jwk = PublicJwk::from_json(&r.public_jwk.to_string()).ok()?;
                Some((r.kid.clone(), jwk))
            })
            .collect()
    }
}

/// Told when the signing keys change, so the local gateway verifies with the new set at once.
pub trait KeysChanged: Send + Sync {
    fn keys_changed(&self, ring: &KeyRing);
}

/// The authorization server.
pub struct OAuth {
    admin: Arc<Admin>,
    settings: OAuthSettings,
    sealer: Sealer,
    keys: ArcSwap<KeyRing>,
    /// DPoP proofs and client assertions seen, each accepted once, partitioned by client (one
    /// client's flood shortens only its own memory: [`ReplayCache`]).
    replay: ReplayCache,
    /// The same, shared by every node (Redis), with its key prefix, when configured.
    shared_replay: std::sync::OnceLock<(Arc<dyn keygate_core::limits::SharedLimits>, String)>,
    per_client: KeyedRate,
    per_address: KeyedRate,
    failures: KeyedRate,
    /// Server-provided DPoP nonces, when required.
    nonces: Option<dpop::NonceKey>,
    client_secret_prefix: TokenPrefix,
    refresh_prefix: TokenPrefix,
    listener: std::sync::OnceLock<Arc<dyn KeysChanged>>,
}

fn actor_of(client: &OAuthClient) -> Actor {
    Actor { id: format!("oauth-client:{}", client.client_id), source: None, owner: false }
}

fn prefix_with(base: &TokenPrefix, suffix: &str) -> Result<TokenPrefix> {
    TokenPrefix::new(&format!("{}{suffix}", base.as_str()))
}

fn scope_string(scopes: &[Scope]) -> String {
    scopes.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
}

/// Parses a space-separated `scope` parameter (RFC 6749 §3.3).
fn parse_scope_param(raw: &str) -> OResult<Vec<Scope>> {
    raw.split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| Scope::parse(s).map_err(|e| OAuthError::invalid_scope(e.message)))
        .collect()
}

/// The scopes granted: those asked for, each covered by one of `allowed`; all of `allowed` when
/// none are asked for.
fn grant_scopes(asked: Option<&str>, allowed: &[Scope]) -> OResult<Vec<Scope>> {
    let Some(raw) = asked else { return Ok(allowed.to_vec()) };
    let asked = parse_scope_param(raw)?;
    if asked.is_empty() {
        return Ok(allowed.to_vec());
    }
    for s in &asked {
        if !any_covers(allowed, s) {
            return Err(OAuthError::invalid_scope(format!("the scope {s} is not granted to this client or token")));
        }
    }
    Ok(asked)
}

/// The scopes both sets grant (each scope of either that the other covers): what a token
/// exchange may pass on, since the new token must hold neither more than its subject nor more
/// than the exchanging client was registered for.
fn intersect_scopes(a: &[Scope], b: &[Scope]) -> Vec<Scope> {
    let mut out: Vec<Scope> =
        a.iter().filter(|s| any_covers(b, s)).chain(b.iter().filter(|s| any_covers(a, s))).cloned().collect();
    out.sort();
    out.dedup();
    out
}

impl OAuth {
    pub fn new(admin: Arc<Admin>, settings: OAuthSettings) -> Result<Self> {
        let sealer = Sealer::new(&admin, "oauth signing key seal v1")?;
        let client_secret_prefix = prefix_with(admin.prefix(), "cs")?;
        let refresh_prefix = prefix_with(admin.prefix(), "rt")?;
        let nonces = if settings.dpop_nonces { Some(nonce_key(&admin)?) } else { None };
        Ok(Self {
            nonces,
            per_client: KeyedRate::new(settings.client_rate, THROTTLE_CAPACITY),
            per_address: KeyedRate::new(settings.address_rate, THROTTLE_CAPACITY),
            failures: KeyedRate::new(settings.failure_rate, THROTTLE_CAPACITY),
            replay: ReplayCache::new(dpop::ReplayLimits {
                max_per_caller: settings.replay_per_client,
                ..dpop::ReplayLimits::default()
            }),
            shared_replay: std::sync::OnceLock::new(),
            admin,
            settings,
            sealer,
            keys: ArcSwap::from_pointee(KeyRing::default()),
            client_secret_prefix,
            refresh_prefix,
            listener: std::sync::OnceLock::new(),
        })
    }

    pub fn settings(&self) -> &OAuthSettings {
        &self.settings
    }

    /// What the rate limits and failure throttles of the endpoints hold now.
    pub fn throttle_footprint(&self) -> Footprint {
        self.per_client.footprint() + self.per_address.footprint() + self.failures.footprint()
    }

    /// What replay detection (DPoP proofs, client assertions) holds now.
    pub fn replay_footprint(&self) -> Footprint {
        let (callers, entries) = self.replay.len();
        Footprint { entries, bytes: entries * ReplayCache::ENTRY_BYTES + callers * ReplayCache::CALLER_BYTES }
    }

    /// The DPoP nonce to hand out now, when nonces are required.
    pub fn dpop_nonce(&self) -> Option<String> {
        let now_s = self.now().as_millis() / 1000;
        self.nonces.as_ref().map(|k| k.current(now_s))
    }

    /// Sets who hears about key changes (once).
    pub fn set_keys_listener(&self, l: Arc<dyn KeysChanged>) {
        let _ = self.listener.set(l);
    }

    pub fn keys(&self) -> arc_swap::Guard<Arc<KeyRing>> {
        self.keys.load()
    }

    fn now(&self) -> Timestamp {
        self.admin.now()
    }

    // ---- signing keys ------------------------------------------------------------------------

    /// Reads the signing keys from the store, opening the private halves of those that sign,
    /// and tells the listener.
    pub async fn reload_keys(&self) -> Result<()> {
        let now = self.now();
        let records: Vec<SigningKeyRecord> =
            self.admin.store().signing_keys().await?.into_iter().filter(|k| k.published_at(now)).collect();
        let mut signers = Vec::new();
        for r in &records {
            if r.retired_at.is_some_and(|t| t <= now) {
                continue;
            }
            let alg = Alg::parse(&r.alg)?;
            let der = self.sealer.open(&r.kid, &r.sealed_private, "an OAuth signing key")?;
            signers.push(Arc::new(SigningKey::from_pkcs8(alg, &der, r.kid.clone())?));
        }
        let ring = KeyRing { records, signers };
        if let Some(l) = self.listener.get() {
            l.keys_changed(&ring);
        }
        self.keys.store(Arc::new(ring));
        Ok(())
    }

    async fn new_key(&self, alg: Alg, signs_from: Timestamp, actor: &Actor) -> Result<SigningKeyRecord> {
        let now = self.now();
        let kid = format!("{}-{}", alg.as_str().to_ascii_lowercase(), self.admin.random_text(12)?);
        let key = SigningKey::generate(alg, kid.clone())?;
        let public_jwk: Value = serde_json::from_str(&key.public_jwk().to_json())
            .map_err(|_| Error::internal("a public JWK does not serialize"))?;
        let record = SigningKeyRecord {
            sealed_private: self.sealer.seal(&self.admin, &kid, &key.to_pkcs8()?)?,
            kid,
            alg: alg.as_str().to_owned(),
            public_jwk,
            created_at: now,
            signs_from,
            retired_at: None,
            drop_after: None,
        };
        let ws = self.admin.bootstrap().await?;
        let audit = NewAuditEvent::new(&ws.id, actor, "oauth.signing_key.create", &record.kid, now)
            .with_after(record.audit_view());
        self.admin.store().insert_signing_key(&record, &audit).await?;
        Ok(record)
    }

    /// Makes sure a key of `alg` signs now (the first key of an algorithm signs at once: nobody
    /// can have cached a JWKS without it).
    pub async fn ensure_key(&self, alg: Alg) -> Result<()> {
        let now = self.now();
        let any = self.admin.store().signing_keys().await?;
        if !any.iter().any(|k| k.alg == alg.as_str() && k.retired_at.is_none_or(|r| r > now)) {
            self.new_key(alg, now, &Actor::system()).await?;
            self.reload_keys().await?;
        }
        Ok(())
    }

    /// Rotates the signing keys of every algorithm in use (or of `only`): a new key is
    /// published now and signs after `key_publish_ahead_seconds`; then the old one stops
    /// signing, and it leaves the JWKS once the last token it signed has expired.
    pub async fn rotate_keys(&self, actor: &Actor, only: Option<Alg>) -> Result<Vec<SigningKeyRecord>> {
        let now = self.now();
        let signs_from = now.plus_seconds(i64::from(self.settings.key_publish_ahead_seconds));
        let keys = self.admin.store().signing_keys().await?;
        let mut algs: Vec<Alg> = keys.iter().filter_map(|k| Alg::parse(&k.alg).ok()).collect();
        algs.sort_by_key(|a| a.as_str());
        algs.dedup();
        if algs.is_empty() {
            algs.push(Alg::EdDSA);
        }
        let ws = self.admin.bootstrap().await?;
        let mut made = Vec::new();
        for alg in algs.into_iter().filter(|a| only.is_none_or(|o| o == *a)) {
            let new = self.new_key(alg, signs_from, actor).await?;
            for mut old in keys.iter().filter(|k| k.alg == alg.as_str() && k.retired_at.is_none()).cloned() {
                old.retired_at = Some(signs_from);
                let grace = i64::from(self.settings.max_access_token_ttl_seconds + self.settings.leeway_seconds);
                old.drop_after = Some(signs_from.plus_seconds(grace));
                let audit = NewAuditEvent::new(&ws.id, actor, "oauth.signing_key.retire", &old.kid, now)
                    .with_after(old.audit_view());
                self.admin.store().update_signing_key(&old, &audit).await?;
            }
            made.push(new);
        }
        self.reload_keys().await?;
        Ok(made)
    }

    /// Housekeeping, run periodically: rotates keys older than `key_rotation_days`, removes keys
    /// no token can need any more, prunes expired OAuth records, and re-reads the keys (another
    /// node may have rotated them).
    pub async fn maintain(&self) -> Result<()> {
        let now = self.now();
        let keys = self.admin.store().signing_keys().await?;
        let max_age = i64::from(self.settings.key_rotation_days) * 86_400;
        let mut stale: Vec<Alg> = Vec::new();
        for alg in [Alg::EdDSA, Alg::ES256] {
            let newest = keys.iter().filter(|k| k.alg == alg.as_str()).map(|k| k.created_at).max();
            if newest.is_some_and(|t| t.plus_seconds(max_age) <= now) {
                stale.push(alg);
            }
        }
        for alg in stale {
            self.rotate_keys(&Actor::system(), Some(alg)).await?;
        }
        self.admin.store().delete_signing_keys_dropped_before(now).await?;
        self.admin.store().prune_oauth(now).await?;
        self.reload_keys().await
    }

    /// The JWK Set of every published key (RFC 7517 §5).
    pub fn jwks(&self) -> Value {
        let ring = self.keys.load();
        let keys: Vec<Value> = ring
            .records
            .iter()
            .map(|r| {
                let mut k = r.public_jwk.clone();
                if let Some(o) = k.as_object_mut() {
                    o.insert("alg".into(), Value::from(r.alg.clone()));
                    o.insert("use".into(), Value::from("sig"));
                }
                k
            })
            .collect();
        json!({ "keys": keys })
    }

    /// The authorization server metadata (RFC 8414).
    pub fn metadata(&self) -> Value {
        let iss = &self.settings.issuer;
        let auth_methods = ["client_secret_basic", "client_secret_post", "private_key_jwt"];
        json!({
            "issuer": iss,
            "token_endpoint": self.settings.token_endpoint(),
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "introspection_endpoint": format!("{iss}/oauth2/introspect"),
            "revocation_endpoint": format!("{iss}/oauth2/revoke"),
            "grant_types_supported": GrantType::ALL.map(GrantType::as_str),
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": auth_methods,
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "Ed25519", "ES256"],
            "introspection_endpoint_auth_methods_supported": auth_methods,
            "revocation_endpoint_auth_methods_supported": auth_methods,
            "dpop_signing_alg_values_supported": ["EdDSA", "Ed25519", "ES256"],
            "access_token_signing_alg_values_supported": ["EdDSA", "ES256"],
        })
    }

    /// Signs a claims set with the instance's current key of `alg` (the gateway's identity
    /// tokens for upstreams use it). `header_extra` adds header members such as `typ`.
    pub fn sign(&self, alg: Alg, header_extra: &Value, claims: &Value) -> Result<String> {
        let signer = self
            .signer(alg.as_str())
            .ok_or_else(|| Error::internal(format!("no {} signing key signs now", alg.as_str())))?;
        signer.sign_claims(header_extra, claims)
    }

    fn signer(&self, alg: &str) -> Option<Arc<SigningKey>> {
        let now = self.now();
        let ring = self.keys.load();
        // The newest key of the algorithm that signs now.
        ring.records
            .iter()
            .filter(|r| r.alg == alg && r.signs_at(now))
            .max_by_key(|r| r.signs_from)
            .and_then(|r| ring.signers.iter().find(|s| s.kid() == r.kid).cloned())
    }

    // ---- clients -----------------------------------------------------------------------------

    /// Registers the OAuth client of an app. The secret (for the secret methods) is returned
    /// once.
    pub async fn create_client(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        app_id: &AppId,
        new: NewClient,
    ) -> Result<(OAuthClient, Option<TokenSecret>)> {
        let app = self.admin.app(ws, app_id).await?;
        let now = self.now();
        let mut grant_types = Vec::new();
        for g in if new.grant_types.is_empty() { vec!["client_credentials".to_owned()] } else { new.grant_types } {
            let g = GrantType::parse(&g).ok_or_else(|| {
                Error::invalid(
                    "invalid_grant_type",
                    format!("{g:?} is not a grant keygate serves; use client_credentials, refresh_token or urn:ietf:params:oauth:grant-type:token-exchange"),
                )
            })?;
            if !grant_types.contains(&g) {
                grant_types.push(g);
            }
        }
        let scopes = keygate_core::scope::parse_scope_list(&new.scopes)?;
        self.admin.check_scopes_allowed(ws, &app, &scopes).await?;
        let auth_method = match new.auth_method.as_deref() {
            None => ClientAuthMethod::ClientSecretBasic,
            Some(m) => ClientAuthMethod::parse(m).ok_or_else(|| {
                Error::invalid(
                    "invalid_auth_method",
                    "token_endpoint_auth_method must be client_secret_basic, client_secret_post or private_key_jwt",
                )
            })?,
        };
        let jwks = match (auth_method, new.jwks) {
            (ClientAuthMethod::PrivateKeyJwt, Some(set)) => Some(validate_client_jwks(set)?),
            (ClientAuthMethod::PrivateKeyJwt, None) => {
                return Err(Error::invalid("jwks_required", "private_key_jwt needs the client's public keys in jwks"));
            }
            (_, Some(_)) => {
                return Err(Error::invalid(
                    "jwks_unexpected",
                    "jwks is only for token_endpoint_auth_method private_key_jwt",
                ));
            }
            (_, None) => None,
        };
        let access_token_format = match new.access_token_format.as_deref() {
            None => AccessTokenFormat::Jwt,
            Some(f) => AccessTokenFormat::parse(f)
                .ok_or_else(|| Error::invalid("invalid_token_format", "access_token_format must be jwt or opaque"))?,
        };
        let signing_alg = match new.signing_alg.as_deref() {
            None => Alg::EdDSA,
            Some(a) => Alg::parse(a)
                .map_err(|_| Error::invalid("invalid_signing_alg", "signing_alg must be EdDSA or ES256"))?,
        };
        let ttl = new.access_token_ttl_seconds.unwrap_or(self.settings.access_token_ttl_seconds);
        if ttl == 0 || ttl > self.settings.max_access_token_ttl_seconds {
            return Err(Error::invalid(
                "invalid_ttl",
                format!(
                    "access_token_ttl_seconds must be between 1 and {}",
                    self.settings.max_access_token_ttl_seconds
                ),
            ));
        }
        let refresh_ttl = new.refresh_token_ttl_seconds.unwrap_or(self.settings.refresh_token_ttl_seconds);
        if refresh_ttl == 0 {
            return Err(Error::invalid("invalid_ttl", "refresh_token_ttl_seconds must be at least 1"));
        }
        let exchange_subject_apps = self.delegation_apps(ws, &app.id, &new.exchange_subject_apps).await?;
        let minted = if auth_method.uses_secret() {
            Some(token_format::mint(&self.client_secret_prefix, self.admin.rng())?)
        } else {
            None
        };
        let client = OAuthClient {
            client_id: format!("{}c_{}", self.admin.prefix().as_str(), self.admin.random_text(20)?),
            workspace_id: ws.clone(),
            app_id: app.id.clone(),
            grant_types,
            scopes,
            auth_method,
            secret_hash: minted.as_ref().map(|m| self.admin.hash(m.secret.expose())),
            secret_last4: minted.as_ref().map(|m| m.last4.clone()),
            previous_secret_hash: None,
            previous_secret_expires_at: None,
            jwks,
            access_token_format,
            signing_alg: signing_alg.as_str().to_owned(),
            access_token_ttl_seconds: ttl,
            refresh_token_ttl_seconds: refresh_ttl,
            exchange_subject_apps,
            suspended_at: None,
            suspended_reason: None,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        if access_token_format == AccessTokenFormat::Jwt {
            self.ensure_key(signing_alg).await?;
        }
        let audit = NewAuditEvent::new(ws, actor, "oauth_client.create", &client.client_id, now)
            .with_after(client.audit_view());
        self.admin.store().insert_oauth_client(&client, &audit).await?;
        Ok((client, minted.map(|m| m.secret)))
    }

    /// Validates a delegation rule: apps of the workspace, named once each (the client's own app
    /// needs no naming).
    async fn delegation_apps(&self, ws: &WorkspaceId, own: &AppId, raw: &[String]) -> Result<Vec<AppId>> {
        if raw.len() > MAX_EXCHANGE_SUBJECT_APPS {
            return Err(Error::invalid(
                "invalid_exchange_subject_apps",
                format!("exchange_subject_apps names at most {MAX_EXCHANGE_SUBJECT_APPS} apps"),
            ));
        }
        let mut apps = Vec::new();
        for id in raw {
            let Some(id) = AppId::parse(id) else {
                return Err(Error::invalid(
                    "invalid_exchange_subject_apps",
                    "exchange_subject_apps takes app ids (app_…) of this workspace",
                ));
            };
            // Another workspace's app is as unknown as one that does not exist.
            let app = self.admin.app(ws, &id).await.map_err(|e| {
                if e.kind == ErrorKind::NotFound {
                    Error::invalid(
                        "invalid_exchange_subject_apps",
                        format!("exchange_subject_apps names {id}, which is not an app of this workspace"),
                    )
                } else {
                    e
                }
            })?;
            if app.id != *own && !apps.contains(&app.id) {
                apps.push(app.id);
            }
        }
        Ok(apps)
    }

    pub async fn client_for_app(&self, ws: &WorkspaceId, app_id: &AppId) -> Result<OAuthClient> {
        self.admin.store().oauth_client_for_app(ws, app_id).await?.ok_or_else(|| Error::not_found("oauth client"))
    }

    /// Changes a client's delegation rule (`None` leaves it); a change that changes nothing is
    /// not written.
    pub async fn update_client(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        app_id: &AppId,
        exchange_subject_apps: Option<Vec<String>>,
    ) -> Result<OAuthClient> {
        let mut client = self.client_for_app(ws, app_id).await?;
        let Some(raw) = exchange_subject_apps else { return Ok(client) };
        let apps = self.delegation_apps(ws, &client.app_id, &raw).await?;
        if apps == client.exchange_subject_apps {
            return Ok(client);
        }
        let before = client.audit_view();
        client.exchange_subject_apps = apps;
        client.updated_at = self.now();
        client.version += 1;
        let audit = NewAuditEvent::new(ws, actor, "oauth_client.update", &client.client_id, client.updated_at)
            .with_diff(&before, &client.audit_view());
        self.admin.store().update_oauth_client(&client, &audit).await?;
        Ok(client)
    }

    /// Issues a new client secret; the old one keeps working for `grace_seconds`.
    pub async fn rotate_client_secret(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        app_id: &AppId,
        grace_seconds: u64,
    ) -> Result<(OAuthClient, TokenSecret)> {
        if grace_seconds > self.admin.max_grace_period_seconds() {
            return Err(Error::invalid(
                "invalid_grace_period",
                format!("grace_period_seconds is at most {}", self.admin.max_grace_period_seconds()),
            ));
        }
        let mut client = self.client_for_app(ws, app_id).await?;
        if !client.auth_method.uses_secret() {
            return Err(Error::invalid(
                "no_client_secret",
                "this client authenticates with private_key_jwt; it has no secret",
            ));
        }
        let now = self.now();
        let minted = token_format::mint(&self.client_secret_prefix, self.admin.rng())?;
        let before = client.audit_view();
        client.previous_secret_hash = if grace_seconds > 0 { client.secret_hash } else { None };
        client.previous_secret_expires_at =
            (grace_seconds > 0).then(|| now.plus_seconds(i64::try_from(grace_seconds).unwrap_or(i64::MAX)));
        client.secret_hash = Some(self.admin.hash(minted.secret.expose()));
        client.secret_last4 = Some(minted.last4.clone());
        client.updated_at = now;
        client.version += 1;
        let audit = NewAuditEvent::new(ws, actor, "oauth_client.rotate_secret", &client.client_id, now)
            .with_diff(&before, &client.audit_view());
        self.admin.store().update_oauth_client(&client, &audit).await?;
        Ok((client, minted.secret))
    }

    /// Suspends the OAuth client of an app, for a reason a person gave (see
    /// [`Admin::suspend_oauth_client_because`]).
    pub async fn suspend_client(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        app_id: &AppId,
        reason: Option<String>,
    ) -> Result<OAuthClient> {
        let client = self.client_for_app(ws, app_id).await?;
        self.admin.suspend_oauth_client(ws, actor, &client.client_id, reason).await
    }

    /// Resumes the OAuth client of an app (see [`Admin::resume_oauth_client`]).
    pub async fn resume_client(&self, ws: &WorkspaceId, actor: &Actor, app_id: &AppId) -> Result<OAuthClient> {
        let client = self.client_for_app(ws, app_id).await?;
        self.admin.resume_oauth_client(ws, actor, &client.client_id).await
    }

    // ---- the endpoints -----------------------------------------------------------------------

    fn now_us(&self) -> i64 {
        self.now().as_millis().saturating_mul(1000)
    }

    /// The first throttle of every request: its address.
    fn check_address(&self, req: &OAuthRequest) -> OResult<()> {
        let Some(ip) = req.peer else { return Ok(()) };
        let key = throttle::key(&[b"address", &throttle::address_bytes(ip)]);
        self.per_address.check(&key, self.now_us()).map_err(slow_down)
    }

    /// The per-client limit, counted once the client is authenticated: a claimed id costs its
    /// claimant nothing here, so no one can use up another client's allowance.
    fn check_client(&self, client: &OAuthClient) -> OResult<()> {
        let key = throttle::key(&[b"client", client.client_id.as_bytes()]);
        self.per_client.check(&key, self.now_us()).map_err(slow_down)
    }

    /// The failure throttle's shared bucket for `key` (hex of a digest: nothing the request sent).
    fn shared_failure_key(prefix: &str, key: &throttle::Key) -> String {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!("{{{prefix}:oauth-failures}}:{hex}")
    }

    /// Whether another failed authentication under `key` may be tried now: on this node, and,
    /// when the nodes share state, in the bucket every node counts into — so several nodes give a
    /// guesser no more tries than one. A shared state that does not answer within a second
    /// leaves this node's answer.
    async fn failures_allow(&self, key: &throttle::Key) -> OResult<()> {
        self.failures.allows(key, self.now_us()).map_err(slow_down)?;
        let Some((shared, prefix)) = self.shared_replay.get() else { return Ok(()) };
        let bucket = Self::shared_failure_key(prefix, key);
        let limit = self.failures.limit();
        let peek = shared.take_rate(&bucket, &limit, 0, 0, 0, self.now_us());
        match tokio::time::timeout(std::time::Duration::from_secs(1), peek).await {
            Ok(Ok(g)) if g.remaining == 0 => {
                let secs = u64::try_from(g.retry_after_us.max(1)).unwrap_or(1).div_ceil(1_000_000);
                Err(slow_down(secs))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "OAuth failure throttle: Redis failed; this node's count decides");
                Ok(())
            }
            Err(_) => {
                tracing::warn!("OAuth failure throttle: Redis did not answer; this node's count decides");
                Ok(())
            }
        }
    }

    /// Counts a failed authentication under `key`, here and in the shared bucket.
    async fn failed(&self, key: &throttle::Key) {
        let _ = self.failures.check(key, self.now_us());
        let Some((shared, prefix)) = self.shared_replay.get() else { return };
        let bucket = Self::shared_failure_key(prefix, key);
        let limit = self.failures.limit();
        let count = shared.take_rate(&bucket, &limit, 0, 1, 0, self.now_us());
        if let Ok(Err(e)) = tokio::time::timeout(std::time::Duration::from_secs(1), count).await {
            tracing::warn!(error = %e, "OAuth failure throttle: cannot count a failure in Redis");
        }
    }

    /// The failure throttle's key: the caller's address with the client id it claims.
    fn failure_key(req: &OAuthRequest, claimed: &str) -> throttle::Key {
        let addr = req.peer.map(throttle::address_bytes).unwrap_or_default();
        throttle::key(&[b"failure", &addr, claimed.as_bytes()])
    }

    /// The client id the request claims, from HTTP Basic, the form, or a client assertion.
    fn claimed_client(req: &OAuthRequest) -> Option<String> {
        if let Some((id, _)) = basic_credentials(req.authorization.as_deref()) {
            return Some(id);
        }
        if let Some(id) = req.param("client_id") {
            return Some(id.to_owned());
        }
        let assertion = req.param("client_assertion")?;
        let jws = jose::split(assertion).ok()?;
        let claims: Value = serde_json::from_slice(&jose::b64url_decode(jws.payload_b64()).ok()?).ok()?;
        claims.get("iss").and_then(Value::as_str).map(str::to_owned)
    }

    /// Authenticates the client by the one method it registered (RFC 6749 §2.3, RFC 7523 §3).
    async fn authenticate_client(&self, req: &OAuthRequest) -> OResult<OAuthClient> {
        let basic = basic_credentials(req.authorization.as_deref());
        let post = req.param("client_secret");
        let assertion = req.param("client_assertion");
        let used = usize::from(basic.is_some()) + usize::from(post.is_some()) + usize::from(assertion.is_some());
        let challenge = |mut e: OAuthError| {
            if basic.is_some() || req.authorization.is_none() {
                e.www_authenticate = Some("Basic realm=\"keygate\"");
            }
            e
        };
        if used != 1 {
            return Err(challenge(OAuthError::invalid_client(if used == 0 {
                "authenticate the client (client_secret_basic, client_secret_post or private_key_jwt)"
            } else {
                "use exactly one client authentication method"
            })));
        }
        let claimed = Self::claimed_client(req).ok_or_else(|| challenge(OAuthError::invalid_client("no client_id")))?;
        // A claimed id is checked for form before anything is looked up or kept for it.
        if !plausible_client_id(&claimed) {
            return Err(challenge(OAuthError::invalid_client("client authentication failed")));
        }
        let failures = Self::failure_key(req, &claimed);
        self.failures_allow(&failures).await?;
        match self.verify_client(req, &claimed, basic.as_ref(), post, assertion).await {
            // Authenticated, and only then told it is suspended: a guesser learns nothing.
            Ok(client) if client.is_suspended() => Err(client_suspended()),
            Ok(client) => Ok(client),
            Err(e) if e.status == 401 => {
                // Counted per (address, claimed id): a flood elsewhere does not slow the real client.
                self.failed(&failures).await;
                Err(challenge(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks the credentials of the client `claimed` (its form already checked).
    async fn verify_client(
        &self,
        req: &OAuthRequest,
        claimed: &str,
        basic: Option<&(String, String)>,
        post: Option<&str>,
        assertion: Option<&str>,
    ) -> OResult<OAuthClient> {
        if let (Some((basic_id, _)), Some(form_id)) = (basic, req.param("client_id"))
            && basic_id != form_id
        {
            return Err(OAuthError::invalid_client("client_id differs from the authenticated client"));
        }
        let unknown = || OAuthError::invalid_client("client authentication failed");
        let Some(client) = self.admin.store().oauth_client(claimed).await? else {
            // Spend the same hash as a real check, so an unknown client answers in the same time.
            let _ = self.admin.hash(post.or(basic.map(|b| b.1.as_str())).unwrap_or(""));
            return Err(unknown());
        };
        let now = self.now();
        let ok = match (client.auth_method, basic, post, assertion) {
            (ClientAuthMethod::ClientSecretBasic, Some((_, secret)), None, None) => {
                self.secret_matches(&client, secret, now)
            }
            (ClientAuthMethod::ClientSecretPost, None, Some(secret), None) => self.secret_matches(&client, secret, now),
            (ClientAuthMethod::PrivateKeyJwt, None, None, Some(a)) => {
                if req.param("client_assertion_type") != Some(CLIENT_ASSERTION_JWT) {
                    return Err(OAuthError::invalid_client(format!(
                        "client_assertion_type must be {CLIENT_ASSERTION_JWT}"
                    )));
                }
                self.check_assertion(&client, a, now).await?;
                true
            }
            _ => false,
        };
        if ok { Ok(client) } else { Err(unknown()) }
    }

    fn secret_matches(&self, client: &OAuthClient, presented: &str, now: Timestamp) -> bool {
        let hash = self.admin.hash(presented);
        let eq = |h: &Option<SecretHash>| h.as_ref().is_some_and(|h| bool::from(h.as_bytes().ct_eq(hash.as_bytes())));
        eq(&client.secret_hash)
            || (client.previous_secret_expires_at.is_some_and(|t| now < t) && eq(&client.previous_secret_hash))
    }

    /// RFC 7523 §3: signed by a key of the client's JWKS, `iss` = `sub` = client id, `aud` the
    /// token endpoint or the issuer, unexpired, and its `jti` used once.
    async fn check_assertion(&self, client: &OAuthClient, assertion: &str, now: Timestamp) -> OResult<()> {
        let bad = |why: &'static str| OAuthError::invalid_client(why);
        let jws = jose::split(assertion).map_err(|_| bad("the client assertion is not a JWS"))?;
        let kid = jws.header().kid.clone();
        let alg = jws.header().alg;
        let keys =
            client.jwks.as_ref().and_then(|s| s.get("keys")).and_then(Value::as_array).cloned().unwrap_or_default();
        let key = keys
            .iter()
            .filter_map(|k| PublicJwk::from_json(&k.to_string()).ok())
            .find(|k| k.alg() == alg && (kid.is_none() || k.kid() == kid.as_deref()))
            .ok_or_else(|| bad("no registered key of the client verifies the assertion"))?;
        let verified =
            jose::verify(assertion, &key, alg).map_err(|_| bad("the client assertion's signature is not valid"))?;
        let claims: Value = verified.claims().map_err(|_| bad("the client assertion's claims are malformed"))?;
        let s = |n: &str| claims.get(n).and_then(Value::as_str);
        if s("iss") != Some(client.client_id.as_str()) || s("sub") != Some(client.client_id.as_str()) {
            return Err(bad("the client assertion's iss and sub must be the client id"));
        }
        let endpoint = self.settings.token_endpoint();
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == endpoint || *a == self.settings.issuer,
            Some(Value::Array(all)) => {
                all.iter().any(|a| a.as_str().is_some_and(|a| a == endpoint || a == self.settings.issuer))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(bad("the client assertion's aud must be the token endpoint or the issuer"));
        }
        let now_s = now.as_millis() / 1000;
        let leeway = i64::from(self.settings.leeway_seconds);
        let exp = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| bad("the client assertion has no exp"))?;
        if now_s >= exp + leeway || exp > now_s + 3_600 {
            return Err(bad("the client assertion is expired or lives longer than an hour"));
        }
        let jti = s("jti").ok_or_else(|| bad("the client assertion has no jti"))?;
        if !self.first_use(client.client_id.as_bytes(), "client-assertion", jti, exp + leeway, now_s).await {
            return Err(bad("the client assertion was already used"));
        }
        Ok(())
    }

    /// Shares the memory of one-time values (DPoP proofs, client assertions) and the count of
    /// failed client authentications with the other nodes through `backend` (set once).
    pub fn set_shared_replay(&self, backend: Arc<dyn keygate_core::limits::SharedLimits>, prefix: &str) {
        let _ = self.shared_replay.set((backend, prefix.to_owned()));
    }

    /// Records the one-time `jti` of `caller` within `scope` until `until` (seconds): `false` if
    /// it was used already — on this node, or, when shared, on any node. A shared memory that
    /// does not answer within a second leaves this node's answer.
    async fn first_use(&self, caller: &[u8], scope: &str, jti: &str, until: i64, now: i64) -> bool {
        if !self.replay.first_use(caller, scope, jti, until, now) {
            return false;
        }
        let Some((shared, prefix)) = self.shared_replay.get() else { return true };
        let key = keygate_core::limits::replay_key(prefix, caller, scope, jti);
        let ttl_ms = keygate_core::limits::replay_ttl_ms(until, now);
        match tokio::time::timeout(std::time::Duration::from_secs(1), shared.first_use(&key, ttl_ms)).await {
            Ok(Ok(first)) => first,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "replay memory: Redis failed; this node's memory decides");
                true
            }
            Err(_) => {
                tracing::warn!("replay memory: Redis did not answer; this node's memory decides");
                true
            }
        }
    }

    /// Checks a DPoP proof sent to the token endpoint (RFC 9449 §5); `Some(jkt)` when there is one.
    async fn token_endpoint_dpop(
        &self,
        client: &OAuthClient,
        req: &OAuthRequest,
        bound_to: Option<&str>,
    ) -> OResult<Option<String>> {
        let Some(proof) = req.dpop.as_deref() else {
            if bound_to.is_some() {
                return Err(OAuthError::new(
                    400,
                    "invalid_dpop_proof",
                    "this token is bound to a DPoP key; send a DPoP proof of that key",
                ));
            }
            return Ok(None);
        };
        let now_s = self.now().as_millis() / 1000;
        let endpoint = self.settings.token_endpoint();
        let check = ProofCheck {
            method: "POST",
            uri: &endpoint,
            now: now_s,
            max_age: self.settings.dpop_max_age_seconds,
            leeway: self.settings.leeway_seconds,
            access_token: None,
            expected_jkt: bound_to,
            nonces: &[],
        };
        let accepted = self.nonces.as_ref().map(|k| k.accepted(now_s));
        let accepted: Vec<&str> = accepted.iter().flatten().map(String::as_str).collect();
        let check = ProofCheck { nonces: &accepted, ..check };
        let v = dpop::verify_proof(proof, &check).map_err(|e| {
            if e.code == dpop::USE_DPOP_NONCE {
                // RFC 9449 §8: a 400 use_dpop_nonce with the nonce to use.
                OAuthError {
                    dpop_nonce: self.dpop_nonce(),
                    ..OAuthError::new(400, "use_dpop_nonce", e.message.clone())
                }
            } else {
                OAuthError::dpop(&e)
            }
        })?;
        // Remembered in the authenticated client's own partition (issue 12 #6).
        if !self.first_use(client.client_id.as_bytes(), &v.jkt, &v.jti, v.replay_until, now_s).await {
            return Err(OAuthError::new(400, "invalid_dpop_proof", "the DPoP proof was already used"));
        }
        Ok(Some(v.jkt))
    }

    /// `POST /oauth2/token`.
    pub async fn token(&self, req: &OAuthRequest) -> OResult<TokenResponse> {
        self.check_address(req)?;
        let grant = req.required("grant_type")?;
        let client = self.authenticate_client(req).await?;
        self.check_client(&client)?;
        let grant = GrantType::parse(grant).ok_or_else(|| {
            OAuthError::new(400, "unsupported_grant_type", format!("the grant type {grant} is not supported"))
        })?;
        if !client.grant_types.contains(&grant) {
            return Err(OAuthError::new(
                400,
                "unauthorized_client",
                format!("this client may not use {}", grant.as_str()),
            ));
        }
        match grant {
            GrantType::ClientCredentials => self.client_credentials(&client, req).await,
            GrantType::RefreshToken => self.refresh(&client, req).await,
            GrantType::TokenExchange => self.exchange(&client, req).await,
        }
    }

    fn audience(&self, req: &OAuthRequest) -> OResult<String> {
        let aud = req.param("resource").or_else(|| req.param("audience")).unwrap_or(&self.settings.audience);
        if aud.len() > 512 || aud.chars().any(char::is_control) {
            return Err(OAuthError::new(400, "invalid_target", "the resource or audience is not valid"));
        }
        Ok(aud.to_owned())
    }

    async fn client_credentials(&self, client: &OAuthClient, req: &OAuthRequest) -> OResult<TokenResponse> {
        let scopes = grant_scopes(req.param("scope"), &client.scopes)?;
        let jkt = self.token_endpoint_dpop(client, req, None).await?;
        let aud = self.audience(req)?;
        let family =
            client.grant_types.contains(&GrantType::RefreshToken).then(|| self.admin.random_text(22)).transpose()?;
        let issued = Issue {
            client,
            scopes: &scopes,
            aud: &aud,
            jkt: jkt.as_deref(),
            family: family.as_deref(),
            subject: &client.client_id,
            ttl: client.access_token_ttl_seconds,
            act: None,
            format: client.access_token_format,
            exchanged_from: None,
        };
        let mut resp = self.issue(&issued).await?;
        if let Some(family) = &family {
            resp.refresh_token =
                Some(self.new_refresh(client, &scopes, family, jkt.as_deref(), &client.client_id).await?);
        }
        Ok(resp)
    }

    async fn new_refresh(
        &self,
        client: &OAuthClient,
        scopes: &[Scope],
        family: &str,
        jkt: Option<&str>,
        subject: &str,
    ) -> OResult<String> {
        let now = self.now();
        let minted = token_format::mint(&self.refresh_prefix, self.admin.rng())?;
        let record = RefreshTokenRecord {
            hash: self.admin.hash(minted.secret.expose()),
            family_id: family.to_owned(),
            client_id: client.client_id.clone(),
            workspace_id: client.workspace_id.clone(),
            app_id: client.app_id.clone(),
            subject: subject.to_owned(),
            scopes: scopes.to_vec(),
            dpop_jkt: jkt.map(str::to_owned),
            created_at: now,
            expires_at: now.plus_seconds(i64::from(client.refresh_token_ttl_seconds)),
            used_at: None,
            revoked_at: None,
        };
        match self.admin.store().insert_refresh_token(&record).await {
            Ok(()) => Ok(minted.secret.expose().to_owned()),
            Err(e) if e.code == "token_family_revoked" => {
                Err(OAuthError::invalid_grant("the refresh token's family was revoked"))
            }
            Err(e) => Err(OAuthError::server(&e)),
        }
    }

    async fn refresh(&self, client: &OAuthClient, req: &OAuthRequest) -> OResult<TokenResponse> {
        let presented = req.required("refresh_token")?;
        let invalid = || OAuthError::invalid_grant("the refresh token is not valid");
        token_format::parse(presented, &self.refresh_prefix).map_err(|_| invalid())?;
        let hash = self.admin.hash(presented);
        let store = self.admin.store();
        // Ownership first, so another client presenting it does not burn it.
        let Some(found) = store.refresh_token(&hash).await? else { return Err(invalid()) };
        if found.client_id != client.client_id {
            return Err(invalid());
        }
        let jkt = self.token_endpoint_dpop(client, req, found.dpop_jkt.as_deref()).await?;
        let now = self.now();
        let rt = match store.use_refresh_token(&hash, now).await? {
            RefreshUse::Fresh(rt) => rt,
            RefreshUse::Reused(rt) => {
                // RFC 9700 §4.14.2: a used refresh token came back — someone holds a copy. The
                // whole family goes.
                let audit = NewAuditEvent::new(
                    &rt.workspace_id,
                    &actor_of(client),
                    "oauth.refresh_token.reuse",
                    &rt.family_id,
                    now,
                )
                .with_after(json!({"client_id": rt.client_id, "family_id": rt.family_id}));
                self.revoke_family(&rt.family_id, &audit).await?;
                tracing::warn!(client_id = %rt.client_id, family = %rt.family_id, "a used refresh token was presented again; its family is revoked");
                return Err(OAuthError::invalid_grant(
                    "the refresh token was already used; every token issued from it is now revoked",
                ));
            }
            RefreshUse::Invalid => return Err(invalid()),
        };
        let scopes = grant_scopes(req.param("scope"), &rt.scopes)?;
        let aud = self.audience(req)?;
        let jkt = jkt.or(rt.dpop_jkt.clone());
        let issued = Issue {
            client,
            scopes: &scopes,
            aud: &aud,
            jkt: jkt.as_deref(),
            family: Some(&rt.family_id),
            subject: &rt.subject,
            ttl: client.access_token_ttl_seconds,
            act: None,
            format: client.access_token_format,
            exchanged_from: None,
        };
        let mut resp = self.issue(&issued).await?;
        // The rotated token keeps the family's scopes: narrowing one access token does not narrow
        // what the grant allows.
        resp.refresh_token =
            Some(self.new_refresh(client, &rt.scopes, &rt.family_id, jkt.as_deref(), &rt.subject).await?);
        Ok(resp)
    }

    /// Revokes a refresh-token family: its refresh tokens, its JWT access tokens (through the
    /// change feed) and its opaque access tokens.
    async fn revoke_family(&self, family: &str, audit: &NewAuditEvent) -> Result<()> {
        let store = self.admin.store();
        store.revoke_token_family(family, self.now(), audit).await?;
        for at in store.access_tokens_of_family(family).await? {
            if let Some(id) = TokenId::parse(&at.jti) {
                self.admin
                    .revoke_oauth_access_key(&at.workspace_id, &id, "its refresh-token family was revoked")
                    .await?;
            }
        }
        // Every live node refuses the family's JWTs before this answers (bounded wait).
        self.admin.acknowledged(store.position()).await;
        Ok(())
    }

    /// Token exchange (RFC 8693 §2). The new token may do no more than its subject: it holds at
    /// most the scopes both the subject and the exchanging client hold, lives no longer than the
    /// subject, keeps the subject's DPoP key, and names the subject in its `subject_token` claim,
    /// through which the gateway applies the subject's IP allowlist, rate limit, quota, suspension
    /// and revocation at every request (and introspection its revocation). Which subjects a client
    /// may present is the server's policy (RFC 8693 §2.1, §5): its own tokens and its own app's
    /// API keys, and those of the apps its `exchange_subject_apps` names; never a refresh token
    /// (a credential for this endpoint, not for APIs), nor a token that is itself the result of
    /// an exchange.
    async fn exchange(&self, client: &OAuthClient, req: &OAuthRequest) -> OResult<TokenResponse> {
        let subject_token = req.required("subject_token")?;
        let kind = req.required("subject_token_type")?;
        if kind != TOKEN_TYPE_ACCESS && kind != TOKEN_TYPE_JWT {
            return Err(OAuthError::invalid_request(format!(
                "subject_token_type must be {TOKEN_TYPE_ACCESS} (or {TOKEN_TYPE_JWT})"
            )));
        }
        if let Some(t) = req.param("requested_token_type")
            && t != TOKEN_TYPE_ACCESS
        {
            return Err(OAuthError::invalid_request(format!("requested_token_type must be {TOKEN_TYPE_ACCESS}")));
        }
        let Some(subject) = self.active_token(subject_token).await? else {
            return Err(OAuthError::invalid_grant("the subject token is not active"));
        };
        if subject.workspace_id != client.workspace_id {
            return Err(OAuthError::invalid_grant("the subject token is not active"));
        }
        let from = match &subject.origin {
            Origin::Refresh => {
                return Err(OAuthError::invalid_grant(
                    "a refresh token cannot be a subject token; exchange an access token or an API key",
                ));
            }
            Origin::Exchanged => {
                return Err(OAuthError::invalid_grant(
                    "a token obtained by token exchange cannot be exchanged again; exchange the token it came from",
                ));
            }
            Origin::Jwt { jti, client_id } => {
                ExchangedFrom { jti: Some(jti.clone()), client_id: Some(client_id.clone()), ..ExchangedFrom::default() }
            }
            Origin::Key { id, hash } => ExchangedFrom {
                token_id: Some(id.to_string()),
                key_ref: Some(jose::b64url_encode(hash.as_bytes())),
                ..ExchangedFrom::default()
            },
        };
        // The delegation rule: another app's credentials only where an administrator allowed it.
        if subject.app_id != client.app_id && !client.exchange_subject_apps.contains(&subject.app_id) {
            return Err(OAuthError::invalid_grant(format!(
                "the subject token belongs to the app {}; this client may exchange it only if its exchange_subject_apps names that app",
                subject.app_id
            )));
        }
        let allowed = intersect_scopes(&subject.scopes, &client.scopes);
        if allowed.is_empty() {
            return Err(OAuthError::invalid_scope(
                "this client and the subject token have no scope in common; the client's registered scopes cap what an exchange can grant",
            ));
        }
        let scopes = grant_scopes(req.param("scope"), &allowed)?;
        let aud = self.audience(req)?;
        // RFC 9449 §5: a subject bound to a key needs a proof of that key, and so does its heir.
        let jkt = self.token_endpoint_dpop(client, req, subject.jkt.as_deref()).await?;
        let now_s = self.now().as_millis() / 1000;
        // An API key without an expiry has `exp` i64::MAX: its time left saturates, it does not
        // overflow into a refusal.
        let left = u32::try_from(subject.exp.saturating_sub(now_s).max(0)).unwrap_or(u32::MAX);
        let ttl = self.settings.exchange_ttl_seconds.min(client.access_token_ttl_seconds).min(left);
        if ttl == 0 {
            return Err(OAuthError::invalid_grant("the subject token expires too soon"));
        }
        // An exchanged token is always a JWT: the gateway finds its subject through the claim.
        let alg = Alg::parse(&client.signing_alg).map_err(|e| OAuthError::server(&e))?;
        if self.signer(&client.signing_alg).is_none() {
            self.ensure_key(alg).await?;
        }
        // RFC 8693 §4.1: the client acting for the subject.
        let act =
            (subject.client_id.as_deref() != Some(client.client_id.as_str())).then(|| json!({"sub": client.client_id}));
        let issued = Issue {
            client,
            scopes: &scopes,
            aud: &aud,
            jkt: jkt.as_deref(),
            family: None,
            subject: &subject.sub,
            ttl,
            act,
            format: AccessTokenFormat::Jwt,
            exchanged_from: Some(from),
        };
        let mut resp = self.issue(&issued).await?;
        resp.issued_token_type = Some(TOKEN_TYPE_ACCESS);
        Ok(resp)
    }

    /// Mints an access token (a JWT, or an opaque keygate token) and records it.
    async fn issue(&self, i: &Issue<'_>) -> OResult<TokenResponse> {
        let now = self.now();
        let now_s = now.as_millis() / 1000;
        let client = i.client;
        let (access_token, jti) = match i.format {
            AccessTokenFormat::Jwt => {
                let jti = self.admin.random_text(22)?;
                let signer = self.signer(&client.signing_alg).ok_or_else(|| {
                    OAuthError::server(&Error::internal(format!("no {} signing key signs now", client.signing_alg)))
                })?;
                let claims = AccessClaims {
                    claims: Claims {
                        iss: self.settings.issuer.clone(),
                        sub: i.subject.to_owned(),
                        aud: Audience::One(i.aud.to_owned()),
                        exp: now_s + i64::from(i.ttl),
                        nbf: None,
                        iat: now_s,
                        jti: jti.clone(),
                        client_id: client.client_id.clone(),
                        scope: Some(scope_string(i.scopes)),
                        cnf: i.jkt.map(|j| Confirmation { jkt: Some(j.to_owned()) }),
                    },
                    act: i.act.clone(),
                    app_id: client.app_id.to_string(),
                    workspace_id: client.workspace_id.to_string(),
                    subject_token: i.exchanged_from.clone(),
                };
                let jwt = signer.sign_claims(&json!({"typ": jose::ACCESS_TOKEN_TYP}), &claims)?;
                (jwt, jti)
            }
            AccessTokenFormat::Opaque => {
                let mut metadata = serde_json::Map::new();
                metadata.insert("oauth_client_id".into(), Value::from(client.client_id.clone()));
                let new = NewToken {
                    name: format!("OAuth access token of {}", client.client_id),
                    app_id: Some(client.app_id.clone()),
                    scopes: i.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
                    expires_in: Some(i64::from(i.ttl)),
                    metadata: Some(metadata),
                    dpop_jkt: i.jkt.map(str::to_owned),
                    oauth_access_token: true,
                    ..NewToken::default()
                };
                let (record, secret) = self.admin.create_token(&client.workspace_id, &actor_of(client), new).await?;
                (secret.expose().to_owned(), record.id.as_str().to_owned())
            }
        };
        let record = AccessTokenRecord {
            jti,
            client_id: client.client_id.clone(),
            workspace_id: client.workspace_id.clone(),
            app_id: client.app_id.clone(),
            family_id: i.family.map(str::to_owned),
            subject: i.subject.to_owned(),
            scopes: i.scopes.to_vec(),
            dpop_jkt: i.jkt.map(str::to_owned),
            issued_at: now,
            expires_at: now.plus_seconds(i64::from(i.ttl)),
            revoked_at: None,
        };
        if let Err(e) = self.admin.store().insert_access_token(&record).await {
            // Nothing is issued. The client was suspended (or deleted) since it authenticated, or
            // the family revoked meanwhile; an opaque token, already an API key, is revoked.
            if i.format == AccessTokenFormat::Opaque
                && let Some(id) = TokenId::parse(&record.jti)
            {
                let why = "not issued: its client was suspended or deleted, or its family revoked, meanwhile";
                self.admin.revoke_oauth_access_key(&client.workspace_id, &id, why).await?;
            }
            return Err(match e.code {
                "oauth_client_suspended" => client_suspended(),
                "oauth_client_not_found" => OAuthError::invalid_client("client authentication failed"),
                "token_family_revoked" => OAuthError::invalid_grant("the refresh token's family was revoked"),
                _ => OAuthError::server(&e),
            });
        }
        Ok(TokenResponse {
            access_token,
            token_type: if i.jkt.is_some() { "DPoP" } else { "Bearer" },
            expires_in: i.ttl,
            scope: Some(scope_string(i.scopes)),
            refresh_token: None,
            issued_token_type: None,
        })
    }

    /// What an active token presented to introspection, exchange or revocation is: none issued to
    /// a suspended client is active. (Its access tokens were revoked when it was suspended; its
    /// refresh tokens are kept for when it is resumed, and are inactive until then.)
    async fn active_token(&self, token: &str) -> Result<Option<ActiveToken>> {
        let Some(t) = self.found_token(token).await? else { return Ok(None) };
        if let Some(id) = &t.client_id
            && self.admin.store().oauth_client(id).await?.is_some_and(|c| c.is_suspended())
        {
            return Ok(None);
        }
        Ok(Some(t))
    }

    /// What a token is, if it is one of ours that is neither expired nor revoked.
    async fn found_token(&self, token: &str) -> Result<Option<ActiveToken>> {
        let now = self.now();
        let now_s = now.as_millis() / 1000;
        if token.matches('.').count() == 2 {
            let Ok(jws) = jose::split(token) else { return Ok(None) };
            let kid = jws.header().kid.clone();
            let ring = self.keys.load();
            let Some(record) = ring.records.iter().find(|r| Some(&r.kid) == kid.as_ref()) else { return Ok(None) };
            let Ok(key) = PublicJwk::from_json(&record.public_jwk.to_string()) else { return Ok(None) };
            let Ok(alg) = Alg::parse(&record.alg) else { return Ok(None) };
            let Ok(at) = jose::verify_access_token(
                token,
                &key,
                alg,
                now_s,
                self.settings.leeway_seconds,
                &self.settings.issuer,
                &self.settings.audience,
            )
            .or_else(|_| {
                // A token for another audience is still ours to describe.
                let v = jose::verify(token, &key, alg)?;
                if !v.header.typ_is(jose::ACCESS_TOKEN_TYP) {
                    return Err(Error::invalid("invalid_token_type", "not an access token"));
                }
                let claims: Claims = v.claims()?;
                claims.validate(now_s, self.settings.leeway_seconds, &self.settings.issuer, &audience_of(&claims))?;
                Ok(jose::AccessToken { header: v.header, claims })
            }) else {
                return Ok(None);
            };
            let Some(rec) = self.admin.store().access_token(&at.claims.jti).await? else { return Ok(None) };
            if !rec.is_active(now) {
                return Ok(None);
            }
            // An exchanged token lives only as long as the credential it came from.
            let from = exchanged_from(token);
            if let Some(from) = &from
                && !self.subject_still_active(from, now).await?
            {
                return Ok(None);
            }
            let c = at.claims;
            let origin = match from {
                Some(_) => Origin::Exchanged,
                None => Origin::Jwt { jti: c.jti.clone(), client_id: c.client_id.clone() },
            };
            return Ok(Some(ActiveToken {
                kind: "access_token",
                origin,
                workspace_id: rec.workspace_id,
                app_id: rec.app_id,
                client_id: Some(c.client_id.clone()),
                scopes: rec.scopes,
                exp: c.exp,
                iat: Some(c.iat),
                sub: c.sub,
                aud: Some(c.aud),
                jti: Some(c.jti),
                jkt: c.cnf.and_then(|c| c.jkt),
            }));
        }
        if token_format::parse(token, &self.refresh_prefix).is_ok() {
            let Some(rt) = self.admin.store().refresh_token(&self.admin.hash(token)).await? else { return Ok(None) };
            if !rt.is_active(now) {
                return Ok(None);
            }
            return Ok(Some(ActiveToken {
                kind: "refresh_token",
                origin: Origin::Refresh,
                workspace_id: rt.workspace_id,
                app_id: rt.app_id,
                client_id: Some(rt.client_id),
                scopes: rt.scopes,
                exp: rt.expires_at.as_millis() / 1000,
                iat: Some(rt.created_at.as_millis() / 1000),
                sub: rt.subject,
                aud: None,
                jti: None,
                jkt: rt.dpop_jkt,
            }));
        }
        if token_format::parse(token, self.admin.prefix()).is_ok() {
            let Some(t) = self.admin.store().token_by_hash(&self.admin.hash(token)).await? else { return Ok(None) };
            if t.status(now) != TokenStatus::Active || t.state != TokenState::Active {
                return Ok(None);
            }
            let client_id = t.metadata.get("oauth_client_id").and_then(Value::as_str).map(str::to_owned);
            return Ok(Some(ActiveToken {
                kind: "access_token",
                origin: Origin::Key { id: t.id.clone(), hash: t.hash },
                workspace_id: t.workspace_id.clone(),
                app_id: t.app_id.clone(),
                client_id,
                scopes: t.scopes.clone(),
                exp: t.expires_at.map_or(i64::MAX, |e| e.as_millis() / 1000),
                iat: Some(t.created_at.as_millis() / 1000),
                sub: t.app_id.as_str().to_owned(),
                aud: None,
                jti: Some(t.id.as_str().to_owned()),
                jkt: t.dpop_jkt.clone(),
            }));
        }
        Ok(None)
    }

    /// Whether the credential an exchanged token came from is still good: the API key active
    /// (not revoked, suspended or expired), or the JWT not revoked and unexpired.
    async fn subject_still_active(&self, from: &ExchangedFrom, now: Timestamp) -> Result<bool> {
        if let Some(hash) = from.key_hash() {
            let Some(t) = self.admin.store().token_by_hash(&hash).await? else { return Ok(false) };
            return Ok(t.status(now) == TokenStatus::Active && t.state == TokenState::Active);
        }
        if let Some(jti) = &from.jti {
            return Ok(self.admin.store().access_token(jti).await?.is_some_and(|r| r.is_active(now)));
        }
        // A claim naming nothing we know: treat the token as inactive.
        Ok(false)
    }

    /// `POST /oauth2/introspect` (RFC 7662): the caller is a client (of the token's workspace)
    /// or a root key with `tokens:read`; an inactive, unknown or foreign token is only
    /// `{"active": false}`.
    pub async fn introspect(&self, req: &OAuthRequest) -> OResult<Value> {
        self.check_address(req)?;
        let token = req.required("token")?.to_owned();
        let ws = self.introspection_caller(req).await?;
        let Some(t) = self.active_token(&token).await? else { return Ok(json!({"active": false})) };
        if t.workspace_id != ws {
            return Ok(json!({"active": false}));
        }
        let mut out = json!({
            "active": true,
            "scope": scope_string(&t.scopes),
            "exp": t.exp,
            "sub": t.sub,
            "iss": self.settings.issuer,
            "token_type": if t.kind == "refresh_token" { "refresh_token" } else if t.jkt.is_some() { "DPoP" } else { "Bearer" },
        });
        if let Some(o) = out.as_object_mut() {
            if let Some(c) = t.client_id {
                o.insert("client_id".into(), Value::from(c));
            }
            if let Some(iat) = t.iat {
                o.insert("iat".into(), Value::from(iat));
            }
            if let Some(aud) = t.aud {
                o.insert("aud".into(), serde_json::to_value(aud).unwrap_or(Value::Null));
            }
            if let Some(jti) = t.jti {
                o.insert("jti".into(), Value::from(jti));
            }
            if let Some(jkt) = t.jkt {
                o.insert("cnf".into(), json!({"jkt": jkt}));
            }
        }
        Ok(out)
    }

    /// Who may introspect: the workspace they belong to.
    async fn introspection_caller(&self, req: &OAuthRequest) -> OResult<WorkspaceId> {
        if let Some(bearer) = req.authorization.as_deref().and_then(|a| {
            let (scheme, rest) = a.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        }) {
            // Root-key guesses are throttled per address like client secrets.
            let failures = Self::failure_key(req, "root key");
            self.failures_allow(&failures).await?;
            let Ok(key) = self.admin.authenticate(bearer).await else {
                self.failed(&failures).await;
                return Err(OAuthError::invalid_client("the bearer key is not valid"));
            };
            if !key.permissions.contains(&keygate_core::model::Permission::TokensRead) {
                return Err(OAuthError::new(403, "insufficient_scope", "the root key lacks tokens:read"));
            }
            return Ok(key.workspace_id);
        }
        let client = self.authenticate_client(req).await?;
        self.check_client(&client)?;
        Ok(client.workspace_id)
    }

    /// `POST /oauth2/revoke` (RFC 7009): 200 whether or not the token was known; a refresh token
    /// takes its family's access tokens with it. A token of another client is left alone and
    /// answered exactly like an unknown one (RFC 7009 §2.2: the answer says nothing of a token the
    /// caller may not revoke), so the endpoint tells no client which tokens exist.
    pub async fn revoke(&self, req: &OAuthRequest) -> OResult<()> {
        self.check_address(req)?;
        let client = self.authenticate_client(req).await?;
        self.check_client(&client)?;
        let token = req.required("token")?;
        let now = self.now();
        let actor = actor_of(&client);
        let store = self.admin.store();
        if token_format::parse(token, &self.refresh_prefix).is_ok() {
            if let Some(rt) = store.refresh_token(&self.admin.hash(token)).await? {
                // RFC 7009 §2.1: only the client's own tokens; another's is left alone, silently.
                if rt.client_id != client.client_id {
                    return Ok(());
                }
                let audit =
                    NewAuditEvent::new(&rt.workspace_id, &actor, "oauth.refresh_token.revoke", &rt.family_id, now)
                        .with_after(json!({"client_id": rt.client_id, "family_id": rt.family_id}));
                self.revoke_family(&rt.family_id, &audit).await?;
            }
            return Ok(());
        }
        let Some(t) = self.active_token(token).await? else { return Ok(()) };
        if t.client_id.as_deref() != Some(client.client_id.as_str()) {
            return Ok(());
        }
        if let Some(jti) = &t.jti {
            let audit = NewAuditEvent::new(&t.workspace_id, &actor, "oauth.access_token.revoke", jti, now);
            store.revoke_access_token(jti, now, &audit).await?;
            if let Some(id) = TokenId::parse(jti) {
                self.admin.revoke_oauth_access_key(&t.workspace_id, &id, "revoked by its client").await?;
            }
            self.admin.acknowledged(store.position()).await;
        }
        Ok(())
    }
}

/// The `subject_token` claim of a JWT whose signature was verified, if it has one.
fn exchanged_from(jwt: &str) -> Option<ExchangedFrom> {
    let jws = jose::split(jwt).ok()?;
    let payload: Value = serde_json::from_slice(&jose::b64url_decode(jws.payload_b64()).ok()?).ok()?;
    let claim = payload.get(ExchangedFrom::CLAIM)?;
    // A claim that does not parse still marks the token as exchanged (and so inactive).
    Some(serde_json::from_value(claim.clone()).unwrap_or_default())
}

/// The expected audience to validate a token of ours against: its own (we describe tokens for
/// any audience at introspection).
fn audience_of(c: &Claims) -> String {
    match &c.aud {
        Audience::One(a) => a.clone(),
        Audience::Many(all) => all.first().cloned().unwrap_or_default(),
    }
}

/// What [`OAuth::issue`] mints.
struct Issue<'a> {
    client: &'a OAuthClient,
    scopes: &'a [Scope],
    aud: &'a str,
    jkt: Option<&'a str>,
    family: Option<&'a str>,
    subject: &'a str,
    ttl: u32,
    act: Option<Value>,
    /// The client's format, except for exchanged tokens (always JWTs).
    format: AccessTokenFormat,
    /// For an exchanged token: its subject (the `subject_token` claim).
    exchanged_from: Option<ExchangedFrom>,
}

/// RFC 9068 claims plus the RFC 8693 `act` claim, the client's app (which keygate's gateway
/// passes to upstreams as `X-Keygate-App-Id`), its workspace (so that a resource server trusting
/// the JWKS, which signs for every workspace, can tell tenants apart), and, for an exchanged
/// token, the credential it came from.
#[derive(Serialize)]
struct AccessClaims {
    #[serde(flatten)]
    claims: Claims,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<Value>,
    app_id: String,
    workspace_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_token: Option<ExchangedFrom>,
}

/// What kind of credential an active token is, and where it came from.
enum Origin {
    /// A JWT access token keygate issued.
    Jwt { jti: String, client_id: String },
    /// An API key (an opaque access token is one).
    Key { id: TokenId, hash: SecretHash },
    /// A refresh token.
    Refresh,
    /// An access token obtained by token exchange.
    Exchanged,
}

/// A token found active.
struct ActiveToken {
    kind: &'static str,
    origin: Origin,
    workspace_id: WorkspaceId,
    app_id: AppId,
    client_id: Option<String>,
    scopes: Vec<Scope>,
    exp: i64,
    iat: Option<i64>,
    sub: String,
    aud: Option<Audience>,
    jti: Option<String>,
    jkt: Option<String>,
}

/// The key of the server's DPoP nonces: derived from the pepper, so every node issues and
/// accepts the same nonces (the gateway derives the same one through [`Admin::derive_key`]).
pub fn nonce_key(admin: &Admin) -> Result<dpop::NonceKey> {
    dpop::NonceKey::new(&admin.derive_key("dpop nonce v1"), NONCE_WINDOW_S)
}

/// How long a DPoP nonce is handed out; it is accepted for as long again after that.
pub const NONCE_WINDOW_S: i64 = 300;

/// A suspended client's answer at every endpoint: 400 `unauthorized_client`, RFC 6749 §5.2's
/// "the authenticated client is not authorized to use this authorization grant type" (for any
/// grant). Not `invalid_client`: its credentials are good, and that code would send its operators
/// to check a secret that is not the problem. The suspension's reason is not told: it may
/// describe what the anomaly detector saw, and whoever holds the secret may be who it saw.
fn client_suspended() -> OAuthError {
    OAuthError::new(
        400,
        "unauthorized_client",
        "this client is suspended: it is issued no token until a person resumes it (on its app's page in the dashboard, or POST /admin/v1/apps/{id}/oauth-client/resume)",
    )
}

/// 429 `slow_down` with the seconds to wait.
fn slow_down(retry_after: u64) -> OAuthError {
    OAuthError {
        retry_after: Some(retry_after),
        ..OAuthError::new(429, "slow_down", "too many requests; retry after the time in Retry-After")
    }
}

/// Whether a claimed client id could be one: 1 to 128 visible ASCII characters. Anything else is
/// refused before a lookup, and never kept.
fn plausible_client_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `Authorization: Basic` credentials, form-decoded as RFC 6749 §2.3.1 requires.
fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let (scheme, b64) = header?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((decode(id)?, decode(secret)?))
}

/// A client's JWK Set for private_key_jwt: public EdDSA or ES256 keys only.
fn validate_client_jwks(set: Value) -> Result<Value> {
    let keys = set.get("keys").and_then(Value::as_array).filter(|k| !k.is_empty()).ok_or_else(|| {
        Error::invalid("invalid_jwks", "jwks must be a JWK Set: {\"keys\": [ ... ]} with at least one key")
    })?;
    if keys.len() > 10 {
        return Err(Error::invalid("invalid_jwks", "register at most 10 keys"));
    }
    for k in keys {
        PublicJwk::from_json(&k.to_string()).map_err(|e| {
            Error::invalid("invalid_jwks", format!("a key of jwks is not a public EdDSA or ES256 JWK: {}", e.message))
        })?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests;
