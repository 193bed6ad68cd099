//! JWT access tokens at the gateway (issue 5): keygate's own (RFC 9068, from this instance's
//! authorization server) and, when configured, other issuers'. A token is verified with local
//! keys only — never a key or URL the token names (`jku`, `x5u`, embedded `jwk` are ignored) —
//! and then cached by the SHA-256 of the token until its `exp`, so each further request costs a
//! hash and a lookup, not a signature check. Every request, cached or not, is checked against
//! the revoked `jti`s the change feed delivers ([`TokenIndex::is_jti_revoked`]), so a revoked
//! JWT is refused on the next request.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use keygate_core::Timestamp;
use keygate_core::jose::{self, Alg, Audience, PublicJwk};
use keygate_core::oauth::ExchangedFrom;
use keygate_core::scope::Scope;
use keygate_core::secret::SecretHash;
use keygate_core::token_format::PUBLIC_ID_LEN;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::index::{IndexedToken, TokenIndex};

/// Entries kept per cache shard, in two generations of half as many each: when the current one
/// is full (in entries or bytes) it becomes the previous one and the previous one goes, whole, in
/// O(1) under the lock (no scan; issue 12). An entry of the previous generation stays usable until
/// then.
const SHARD_CAPACITY: usize = 16 * 1024;
const SHARDS: usize = 16;
/// Bytes the cache may hold in all. Each entry counts as its token's length, which bounds what its
/// claims hold, plus the entry itself: verified tokens of up to `MAX_TOKEN_LEN` cannot make the
/// cache grow past this.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// One generation of a shard: identities by the SHA-256 of their token, and the bytes they count
/// for.
#[derive(Default)]
struct Generation {
    map: HashMap<[u8; 32], Arc<JwtIdentity>>,
    bytes: usize,
}

/// One shard of verified tokens.
#[derive(Default)]
struct CacheShard {
    current: Generation,
    previous: Generation,
}

/// A verified access token, as the request path needs it.
#[derive(Debug)]
pub struct JwtIdentity {
    /// `exp`, in milliseconds.
    pub exp_ms: i64,
    pub jti: Option<Arc<str>>,
    pub sub: Arc<str>,
    pub client_id: Option<Arc<str>>,
    pub scopes: Arc<[Scope]>,
    /// `cnf.jkt`: the DPoP key the token is bound to.
    pub jkt: Option<Arc<str>>,
    /// The issuer, for logs.
    pub issuer: Arc<str>,
    /// The app of the client (a claim of keygate's own tokens).
    pub app_id: Option<Arc<str>>,
    /// The workspace of the client (a claim of keygate's own tokens).
    pub workspace_id: Option<Arc<str>>,
    /// Per-caller limiter state is keyed by this: a digest of the client (or subject). An
    /// exchanged token of a JWT counts against that JWT's client.
    pub limit_key: [u8; PUBLIC_ID_LEN],
    /// The anomaly watch's key for the client of one of keygate's own tokens (of a known
    /// workspace and app): a digest of the client's id with the high bit of its first byte set,
    /// so that it never equals an API key's public id (ASCII). `None` for other issuers' tokens.
    pub watch_key: Option<[u8; PUBLIC_ID_LEN]>,
    /// For a token exchanged from an API key: the key's keyed hash, resolved in the index at
    /// every request ([`JwtIdentity::exchanged_from`]).
    pub subject_key: Option<SecretHash>,
    /// For a token exchanged from a JWT: that JWT's `jti`, checked for revocation at every
    /// request.
    pub subject_jti: Option<Arc<str>>,
}

impl JwtIdentity {
    pub fn has_scope(&self, required: &Scope) -> bool {
        keygate_core::scope::any_covers(&self.scopes, required)
    }

    /// The API key a token obtained by token exchange stands for, as the index has it now: the
    /// key's allowlist, limits, quota and DPoP binding apply to the token, and the key's
    /// revocation, suspension or expiry ends it (RFC 8693 leaves the derived token's life to the
    /// server; keygate ties it to its subject's). `None` for every other token.
    pub fn exchanged_from(&self, index: &TokenIndex, now: Timestamp) -> Result<Option<Arc<IndexedToken>>, JwtRefusal> {
        let Some(hash) = &self.subject_key else { return Ok(None) };
        index.verify_hash(hash, now).map(Some).map_err(|_| JwtRefusal::SubjectInactive)
    }
}

/// Why a JWT is refused; each maps to an RFC 6750 `invalid_token` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRefusal {
    /// Not a JWS, or its header or claims do not parse.
    Malformed,
    /// Signed with a key this gateway does not know (a JWKS refetch is asked for).
    UnknownKey,
    /// From an issuer this gateway does not accept.
    UnknownIssuer,
    BadSignature,
    /// Wrong `typ`, audience or required claims.
    Invalid,
    /// A claim copied into headers (`sub`, `jti`, `client_id`, `azp`, `app_id`) holds a
    /// control character ([`jose::is_identity_text`]).
    IdentityClaim,
    Expired,
    NotYetValid,
    Revoked,
    /// Obtained by token exchange from a credential that is no longer valid.
    SubjectInactive,
}

impl JwtRefusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed_token",
            Self::UnknownKey => "unknown_signing_key",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadSignature => "invalid_signature",
            Self::Invalid => "invalid_token_claims",
            Self::IdentityClaim => jose::INVALID_IDENTITY_CLAIM,
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::Revoked => "token_revoked",
            Self::SubjectInactive => "subject_token_inactive",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Malformed => "the token is not a well-formed JWT",
            Self::UnknownKey => "the token is signed with an unknown key",
            Self::UnknownIssuer => "the token is from an issuer this gateway does not accept",
            Self::BadSignature => "the token's signature is not valid",
            Self::Invalid => "the token is not an access token for this API (typ, audience or claims)",
            Self::IdentityClaim => {
                "a claim naming the token's subject, id or client (sub, jti, client_id, azp, app_id) holds a control character"
            }
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::Revoked => "the token was revoked",
            Self::SubjectInactive => {
                "the token it was exchanged from is no longer valid (revoked, suspended or expired)"
            }
        }
    }
}

/// An issuer whose tokens are accepted, with its verification keys by `kid`.
pub struct Issuer {
    pub issuer: String,
    pub audience: String,
    /// keygate's own tokens are RFC 9068 (`typ` `at+jwt`, `client_id`, `jti`); other issuers'
    /// may be any JWT with `iss`, `sub`, `aud` and `exp`.
    pub strict: bool,
    keys: ArcSwap<HashMap<String, PublicJwk>>,
    /// Set when a token named a key this issuer does not have; the key fetcher watches it.
    pub wants_keys: tokio::sync::Notify,
    /// The workspace another issuer's tokens belong to (keygate's own tokens name theirs in a
    /// claim). `None`: they are accepted only on shared routes.
    pub workspace_id: Option<Arc<str>>,
}

impl Issuer {
    pub fn new(issuer: &str, audience: &str, strict: bool) -> Self {
        Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            strict,
            keys: ArcSwap::from_pointee(HashMap::new()),
            wants_keys: tokio::sync::Notify::new(),
            workspace_id: None,
        }
    }

    /// The workspace this issuer's tokens belong to (for another issuer's tokens, which carry no
    /// workspace of their own).
    #[must_use]
    pub fn with_workspace(mut self, workspace_id: Option<Arc<str>>) -> Self {
        self.workspace_id = workspace_id;
        self
    }

    /// Replaces the verification keys (keys without a `kid` are kept under `""`).
    pub fn set_keys(&self, keys: impl IntoIterator<Item = (String, PublicJwk)>) {
        self.keys.store(Arc::new(keys.into_iter().collect()));
    }

    pub fn key_count(&self) -> usize {
        self.keys.load().len()
    }
}

/// The claims read from a token of another issuer.
#[derive(Deserialize)]
struct LooseClaims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    /// Keycloak and others name the client `azp`.
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, deserialize_with = "cnf_jkt")]
    cnf: Option<String>,
}

fn cnf_jkt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Cnf {
        jkt: Option<String>,
    }
    Ok(Option::<Cnf>::deserialize(d)?.and_then(|c| c.jkt))
}

/// The `iss` of a token, read before its signature to pick the issuer's keys, and keygate's
/// own claims (used only once the signature is verified, and only for keygate's own tokens).
#[derive(Deserialize)]
struct Peek {
    iss: Option<String>,
    #[serde(default)]
    app_id: Option<String>,
    /// Read as any JSON (another issuer may use these names for other things) and interpreted
    /// only for keygate's own tokens.
    #[serde(default)]
    workspace_id: Option<serde_json::Value>,
    #[serde(default)]
    subject_token: Option<serde_json::Value>,
}

fn limit_key(client_or_sub: &str) -> [u8; PUBLIC_ID_LEN] {
    let d = Sha256::digest(client_or_sub.as_bytes());
    let mut k = [0u8; PUBLIC_ID_LEN];
    k.copy_from_slice(d.get(..PUBLIC_ID_LEN).unwrap_or(&[0; PUBLIC_ID_LEN]));
    k
}

fn watch_key(client_id: &str) -> [u8; PUBLIC_ID_LEN] {
    let mut k = limit_key(client_id);
    k[0] |= 0x80;
    k
}

/// Verifies JWT access tokens and caches what it verified.
pub struct JwtVerifier {
    issuers: Vec<Arc<Issuer>>,
    leeway_s: i64,
    /// `parking_lot` locks: never poisoned, so no lookup or insert is skipped after a panic.
    cache: Vec<parking_lot::Mutex<CacheShard>>,
    /// Bytes one shard may hold (both generations).
    shard_bytes: usize,
}

/// Whether `presented` looks like a JWT (three base64url segments) rather than an API key.
pub fn looks_like_jwt(presented: &str) -> bool {
    presented.starts_with("eyJ") && presented.bytes().filter(|b| *b == b'.').count() == 2
}

impl JwtVerifier {
    pub fn new(issuers: Vec<Arc<Issuer>>, leeway_s: u32) -> Self {
        Self {
            issuers,
            leeway_s: i64::from(leeway_s),
            cache: (0..SHARDS).map(|_| parking_lot::Mutex::new(CacheShard::default())).collect(),
            shard_bytes: CACHE_BYTES / SHARDS,
        }
    }

    /// The same verifier with a cache of at most `bytes` (tests use a small one).
    pub fn with_cache_bytes(mut self, bytes: usize) -> Self {
        self.shard_bytes = bytes / SHARDS;
        self
    }

    /// Entries and bytes (as counted against [`CACHE_BYTES`]) the cache holds.
    pub fn cache_footprint(&self) -> (usize, usize) {
        self.cache.iter().map(|s| s.lock()).fold((0, 0), |(n, b), s| {
            (n + s.current.map.len() + s.previous.map.len(), b + s.current.bytes + s.previous.bytes)
        })
    }

    pub fn issuers(&self) -> &[Arc<Issuer>] {
        &self.issuers
    }

    /// Checks a token: from the cache when it was verified before, else in full. Revocation is
    /// checked either way.
    pub fn verify(&self, token: &str, now: Timestamp, index: &TokenIndex) -> Result<Arc<JwtIdentity>, JwtRefusal> {
        if token.len() > jose::MAX_TOKEN_LEN {
            return Err(JwtRefusal::Malformed);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let shard = self.cache.get(usize::from(key[0]) % SHARDS);
        let cached = shard.and_then(|s| {
            let s = s.lock();
            s.current.map.get(&key).or_else(|| s.previous.map.get(&key)).cloned()
        });
        let id = match cached {
            Some(id) => id,
            None => {
                let id = Arc::new(self.verify_fully(token, now)?);
                let cost = token.len() + std::mem::size_of::<JwtIdentity>();
                if let Some(s) = shard
                    && cost <= self.shard_bytes / 2
                {
                    let mut s = s.lock();
                    let full =
                        s.current.map.len() >= SHARD_CAPACITY / 2 || s.current.bytes + cost > self.shard_bytes / 2;
                    let gone = if full {
                        let full = std::mem::take(&mut s.current);
                        Some(std::mem::replace(&mut s.previous, full))
                    } else {
                        None
                    };
                    if s.current.map.insert(key, id.clone()).is_none() {
                        s.current.bytes += cost;
                    }
                    drop(s);
                    // The generation let go of is freed outside the lock.
                    drop(gone);
                }
                id
            }
        };
        if now.as_millis() >= id.exp_ms.saturating_add(self.leeway_s * 1000) {
            return Err(JwtRefusal::Expired);
        }
        if let Some(jti) = &id.jti
            && index.is_jti_revoked(jti)
        {
            return Err(JwtRefusal::Revoked);
        }
        if let Some(jti) = &id.subject_jti
            && index.is_jti_revoked(jti)
        {
            return Err(JwtRefusal::SubjectInactive);
        }
        Ok(id)
    }

    fn verify_fully(&self, token: &str, now: Timestamp) -> Result<JwtIdentity, JwtRefusal> {
        let jws = jose::split(token).map_err(|_| JwtRefusal::Malformed)?;
        let payload = jose::b64url_decode(jws.payload_b64()).map_err(|_| JwtRefusal::Malformed)?;
        let Peek { iss, app_id, workspace_id, subject_token } =
            serde_json::from_slice::<Peek>(&payload).map_err(|_| JwtRefusal::Malformed)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| iss.as_deref().map(|s| s.trim_end_matches('/')) == Some(i.issuer.as_str()))
            .ok_or(JwtRefusal::UnknownIssuer)?;
        let kid = jws.header().kid.clone().unwrap_or_default();
        let key = {
            let keys = issuer.keys.load();
            match keys.get(&kid) {
                Some(k) => k.clone(),
                None => {
                    issuer.wants_keys.notify_one();
                    return Err(JwtRefusal::UnknownKey);
                }
            }
        };
        let alg: Alg = key.alg();
        let now_s = now.as_millis() / 1000;
        let leeway = u32::try_from(self.leeway_s).unwrap_or(0);
        if issuer.strict {
            let at = jose::verify_access_token(token, &key, alg, now_s, leeway, &issuer.issuer, &issuer.audience)
                .map_err(refusal_of)?;
            if app_id.as_deref().is_some_and(|a| !jose::is_identity_text(a)) {
                return Err(JwtRefusal::IdentityClaim);
            }
            let c = at.claims;
            let scopes: Vec<Scope> = c.scopes().filter_map(|s| Scope::parse(s).ok()).collect();
            // An exchanged token names its subject: an API key by its keyed hash, or a JWT by its
            // `jti` (and counts against that JWT's client). A claim naming neither is refused.
            let subject_token = subject_token
                .map(serde_json::from_value::<ExchangedFrom>)
                .transpose()
                .map_err(|_| JwtRefusal::Invalid)?;
            let (subject_key, subject_jti, limit_key) = match subject_token {
                None => (None, None, limit_key(&c.client_id)),
                Some(from) => match (from.key_hash(), from.jti.as_deref()) {
                    (Some(hash), _) => (Some(hash), None, limit_key(&c.client_id)),
                    (None, Some(jti)) => (
                        None,
                        Some(Arc::from(jti)),
                        limit_key(from.client_id.as_deref().unwrap_or(c.client_id.as_str())),
                    ),
                    (None, None) => return Err(JwtRefusal::Invalid),
                },
            };
            let watch_key = (app_id.is_some() && workspace_id.as_ref().is_some_and(serde_json::Value::is_string))
                .then(|| watch_key(&c.client_id));
            return Ok(JwtIdentity {
                exp_ms: c.exp.saturating_mul(1000),
                jti: Some(c.jti.into()),
                limit_key,
                watch_key,
                subject_key,
                subject_jti,
                workspace_id: workspace_id.as_ref().and_then(serde_json::Value::as_str).map(Into::into),
                sub: c.sub.into(),
                client_id: Some(c.client_id.into()),
                scopes: scopes.into(),
                jkt: c.cnf.and_then(|c| c.jkt).map(Into::into),
                issuer: issuer.issuer.as_str().into(),
                app_id: app_id.map(Into::into),
            });
        }
        let verified = jws.verify(&key, alg).map_err(|_| JwtRefusal::BadSignature)?;
        let typ_ok = verified.header.typ.as_deref().is_none_or(|t| {
            t.eq_ignore_ascii_case("at+jwt")
                || t.eq_ignore_ascii_case("application/at+jwt")
                || t.eq_ignore_ascii_case("jwt")
        });
        if !typ_ok {
            return Err(JwtRefusal::Invalid);
        }
        let c: LooseClaims = serde_json::from_slice(&verified.payload).map_err(|_| JwtRefusal::Invalid)?;
        if c.iss.trim_end_matches('/') != issuer.issuer || !c.aud.contains(&issuer.audience) {
            return Err(JwtRefusal::Invalid);
        }
        let identity = [Some(&c.sub), c.jti.as_ref(), c.client_id.as_ref(), c.azp.as_ref()];
        if !identity.into_iter().flatten().all(|v| jose::is_identity_text(v)) {
            return Err(JwtRefusal::IdentityClaim);
        }
        if now_s >= c.exp.saturating_add(self.leeway_s) {
            return Err(JwtRefusal::Expired);
        }
        let later = now_s.saturating_add(self.leeway_s);
        if c.nbf.is_some_and(|n| later < n) || c.iat.is_some_and(|i| i > later) {
            return Err(JwtRefusal::NotYetValid);
        }
        let scopes: Vec<Scope> =
            c.scope.as_deref().unwrap_or("").split(' ').filter_map(|s| Scope::parse(s).ok()).collect();
        let client_id = c.client_id.or(c.azp);
        Ok(JwtIdentity {
            exp_ms: c.exp.saturating_mul(1000),
            jti: c.jti.map(Into::into),
            limit_key: limit_key(&format!("{}\0{}", issuer.issuer, client_id.as_deref().unwrap_or(&c.sub))),
            watch_key: None,
            sub: c.sub.into(),
            client_id: client_id.map(Into::into),
            scopes: scopes.into(),
            jkt: c.cnf.map(Into::into),
            issuer: issuer.issuer.as_str().into(),
            app_id: None,
            workspace_id: issuer.workspace_id.clone(),
            subject_key: None,
            subject_jti: None,
        })
    }
}

fn refusal_of(e: keygate_core::Error) -> JwtRefusal {
    match e.code {
        jose::TOKEN_EXPIRED => JwtRefusal::Expired,
        jose::TOKEN_NOT_YET_VALID => JwtRefusal::NotYetValid,
        jose::INVALID_TOKEN_SIGNATURE | jose::INVALID_TOKEN_ALG => JwtRefusal::BadSignature,
        jose::INVALID_TOKEN => JwtRefusal::Malformed,
        jose::INVALID_IDENTITY_CLAIM => JwtRefusal::IdentityClaim,
        _ => JwtRefusal::Invalid,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use keygate_core::jose::{Alg, SigningKey};
    use keygate_core::secret::Pepper;
    use keygate_core::token_format::TokenPrefix;
    use serde_json::{Value, json};

    use super::*;

    const NOW: i64 = 1_900_000_000;

    fn verifier(strict: bool) -> (JwtVerifier, SigningKey) {
        let key = SigningKey::generate(Alg::EdDSA, "k1").unwrap();
        let issuer = Issuer::new("https://iss.example", "api", strict);
        issuer.set_keys([("k1".to_owned(), key.public_jwk().clone())]);
        (JwtVerifier::new(vec![Arc::new(issuer)], 30), key)
    }

    fn token(key: &SigningKey, strict: bool, extra: &Value) -> String {
        let mut c = json!({"iss": "https://iss.example", "sub": "s", "aud": "api", "exp": NOW + 60, "iat": NOW,
            "jti": "j", "client_id": "c", "azp": "c", "app_id": "app_1"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        key.sign_claims(&json!({"typ": if strict { "at+jwt" } else { "JWT" }}), &c).unwrap()
    }

    #[test]
    fn identity_claims_with_control_characters_are_refused_for_every_issuer() {
        let now = Timestamp::from_millis(NOW * 1000);
        for strict in [true, false] {
            let (v, key) = verifier(strict);
            assert!(v.verify_fully(&token(&key, strict, &json!({})), now).is_ok(), "strict={strict}");
            let claims: &[&str] =
                if strict { &["sub", "jti", "client_id", "app_id"] } else { &["sub", "jti", "client_id", "azp"] };
            for claim in claims {
                let t = token(&key, strict, &json!({ *claim: "a\r\nx-forged: 1" }));
                let r = v.verify_fully(&t, now).unwrap_err();
                assert_eq!(
                    (r, r.code()),
                    (JwtRefusal::IdentityClaim, "invalid_identity_claim"),
                    "{claim} strict={strict}"
                );
            }
        }
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let key = SigningKey::generate(Alg::ES256, "k1").unwrap();
        let issuer = Arc::new(Issuer::new("https://idp.test", "api", false));
        issuer.set_keys([("k1".to_owned(), key.public_jwk().clone())]);
        let budget = 256 * 1024;
        let v = JwtVerifier::new(vec![issuer], 30).with_cache_bytes(budget);
        let index = TokenIndex::new(TokenPrefix::new("kg").unwrap(), Pepper::new(&[1; 32]).unwrap());
        let now = Timestamp::from_millis(1_900_000_000_000);
        // Verified tokens with 4 KB claims, each distinct: as many as fit stay, never more.
        for i in 0..400 {
            let claims = json!({"iss": "https://idp.test", "aud": "api", "exp": 1_900_000_600, "sub": format!("{i}{}", "s".repeat(4000))});
            let t = key.sign_claims(&json!({"typ": "JWT"}), &claims).unwrap();
            v.verify(&t, now, &index).unwrap();
            let (n, bytes) = v.cache_footprint();
            assert!(bytes <= budget && n > 0, "{n} entries, {bytes} bytes");
        }
    }
}
