//! DPoP proof verification (RFC 9449 §4.3). The caller normalizes the request URI, supplies the
//! time, and keeps the `jti` replay cache: [`verify_proof`] returns the `jti` and how long it must
//! be remembered, and the key thumbprint (`jkt`) to compare with the token's `cnf.jkt`.
//!
//! # Error codes
//! All are [`ErrorKind::Unauthenticated`](crate::ErrorKind::Unauthenticated). On the wire every code
//! but `use_dpop_nonce` is the OAuth error `invalid_dpop_proof` (see [`crate::jose::oauth_error`]):
//!
//! | code | meaning |
//! |---|---|
//! | `invalid_dpop_proof` | malformed proof, `typ` not `dpop+jwt`, `alg` not EdDSA/ES256, `jwk` missing, private or not matching `alg`, bad signature, missing or ill-typed `jti`/`htm`/`htu`/`iat` |
//! | `dpop_method_mismatch` | `htm` is not the request's method |
//! | `dpop_url_mismatch` | `htu` is not the request's URI (query and fragment ignored) |
//! | `dpop_proof_expired` | `iat` is older than `max_age` |
//! | `dpop_proof_not_yet_valid` | `iat` is further in the future than `leeway` |
//! | `dpop_ath_mismatch` | `ath` is missing or is not the hash of the presented access token |
//! | `dpop_key_mismatch` | the proof's key is not the one the token is bound to (`cnf.jkt`) |
//! | `use_dpop_nonce` | the server requires a nonce and the proof has none or another one |

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::jose::{self, PublicJwk, token_err};

/// Malformed proof, wrong `typ`/`alg`/`jwk`, bad signature, missing claims.
pub const INVALID_DPOP_PROOF: &str = "invalid_dpop_proof";
/// `htm` differs from the request method.
pub const DPOP_METHOD_MISMATCH: &str = "dpop_method_mismatch";
/// `htu` differs from the request URI.
pub const DPOP_URL_MISMATCH: &str = "dpop_url_mismatch";
/// `iat` too old.
pub const DPOP_PROOF_EXPIRED: &str = "dpop_proof_expired";
/// `iat` too far in the future.
pub const DPOP_PROOF_NOT_YET_VALID: &str = "dpop_proof_not_yet_valid";
/// `ath` missing or not matching the access token.
pub const DPOP_ATH_MISMATCH: &str = "dpop_ath_mismatch";
/// The proof's key is not the token's `cnf.jkt`.
pub const DPOP_KEY_MISMATCH: &str = "dpop_key_mismatch";
/// A server nonce is required (RFC 9449 §8).
pub const USE_DPOP_NONCE: &str = "use_dpop_nonce";

/// The `typ` of a DPoP proof.
pub const DPOP_TYP: &str = "dpop+jwt";
/// The longest `jti` accepted (it goes into the replay cache).
pub const MAX_JTI_LEN: usize = 256;

fn err(code: &'static str, message: &'static str) -> Error {
    token_err(code, message)
}

/// What the proof must match.
#[derive(Debug, Clone, Copy)]
pub struct ProofCheck<'a> {
    /// The request's method, e.g. `GET` (compared case-sensitively).
    pub method: &'a str,
    /// The request's URI as the caller normalized it (scheme and host lowercase, default port
    /// removed); its query and fragment are ignored, as are the proof's.
    pub uri: &'a str,
    /// The current time in seconds since the epoch.
    pub now: i64,
    /// How many seconds after its `iat` a proof is still accepted.
    pub max_age: u32,
    /// How many seconds into the future an `iat` may be (clock skew).
    pub leeway: u32,
    /// The access token sent with the proof, if any: then `ath` must be its hash.
    pub access_token: Option<&'a str>,
    /// The thumbprint the access token is bound to (`cnf.jkt`), if any.
    pub expected_jkt: Option<&'a str>,
    /// The nonces the server accepts now (RFC 9449 §8), if it requires one: the current one and
    /// an earlier one still honoured. Empty: no nonce required.
    pub nonces: &'a [&'a str],
}

/// A verified proof: what the caller needs for the binding check and the replay cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// The RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    /// The proof's unique id: refuse a second proof with the same `jti` (per `jkt`) until
    /// `replay_until`.
    pub jti: String,
    pub iat: i64,
    /// After this time the proof is refused as expired anyway, so the cache may forget the `jti`.
    pub replay_until: i64,
}

#[derive(Deserialize)]
struct ProofClaims {
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    htm: Option<String>,
    #[serde(default)]
    htu: Option<String>,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    ath: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
}

/// The DPoP `jkt` of a key: its RFC 7638 thumbprint.
pub fn jkt(jwk: &PublicJwk) -> String {
    jwk.thumbprint()
}

/// The `ath` of an access token: base64url(SHA-256(token)).
pub fn ath(access_token: &str) -> String {
    jose::sha256_b64url(access_token.as_bytes())
}

/// The URI without its query and fragment, normalized as RFC 9449 §4.3 asks (RFC 3986 §6.2.2
/// and §6.2.3): scheme and host in lowercase, the scheme's default port left out, an empty path
/// as `/`, percent-escapes of unreserved characters decoded and the others in uppercase, and
/// `.` and `..` segments resolved. So `HTTP://Example.com:80/a/%7Euser/./b` and
/// `http://example.com/a/~user/b` are the same `htu`.
pub fn normalize_htu(uri: &str) -> String {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    let uri = uri.get(..end).unwrap_or(uri);
    let Some((scheme, rest)) = uri.split_once("://") else { return uri.to_owned() };
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let mut authority = authority.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => Some(":80"),
        "https" => Some(":443"),
        _ => None,
    };
    if let Some(port) = default
        && authority.ends_with(port)
    {
        authority.truncate(authority.len() - port.len());
    }
    // Percent-escapes: unreserved characters decoded, the rest with uppercase hex.
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        // Exactly two hex digits (RFC 3986 §2.1): `u8::from_str_radix` would also take a sign
        // before one digit, reading `%+a` as `%0A`.
        let hex = match bytes.get(i + 1..i + 3) {
            Some(&[hi, lo]) if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() => {
                std::str::from_utf8(&[hi, lo]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            }
            _ => None,
        };
        match (b, hex) {
            (b'%', Some(v)) if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') => {
                decoded.push(char::from(v));
                i += 3;
            }
            (b'%', Some(v)) => {
                decoded.push_str(&format!("%{v:02X}"));
                i += 3;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // Dot segments (RFC 3986 §5.2.4).
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (trailing && !path.ends_with('/')) {
        path.push('/');
    }
    format!("{scheme}://{authority}{path}")
}

/// Verifies a DPoP proof against the request (RFC 9449 §4.3 checks 1–12, the replay check
/// excepted, which is the caller's with the returned `jti`).
pub fn verify_proof(proof: &str, check: &ProofCheck<'_>) -> Result<VerifiedProof> {
    let jws = jose::split(proof).map_err(|e| err(INVALID_DPOP_PROOF, proof_message(&e)))?;
    let header = jws.header();
    if header.typ.as_deref() != Some(DPOP_TYP) {
        return Err(err(INVALID_DPOP_PROOF, "the proof's typ is not dpop+jwt"));
    }
    let Some(key) = header.jwk.clone() else {
        return Err(err(INVALID_DPOP_PROOF, "the proof has no jwk header"));
    };
    let alg = header.alg;
    if key.alg() != alg {
        return Err(err(INVALID_DPOP_PROOF, "the proof's alg does not match its jwk"));
    }
    let verified = jws.verify(&key, alg).map_err(|e| err(INVALID_DPOP_PROOF, proof_message(&e)))?;
    if !jose::is_json_object(&verified.payload) {
        return Err(err(INVALID_DPOP_PROOF, "the proof's claims are not a JSON object"));
    }
    let claims: ProofClaims = serde_json::from_slice(&verified.payload)
        .map_err(|_| err(INVALID_DPOP_PROOF, "the proof's claims are malformed"))?;

    let jti = claims.jti.ok_or_else(|| err(INVALID_DPOP_PROOF, "the proof has no jti"))?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(err(INVALID_DPOP_PROOF, "the proof's jti is empty or too long"));
    }
    let htm = claims.htm.ok_or_else(|| err(INVALID_DPOP_PROOF, "the proof has no htm"))?;
    let htu = claims.htu.ok_or_else(|| err(INVALID_DPOP_PROOF, "the proof has no htu"))?;
    let iat = claims.iat.ok_or_else(|| err(INVALID_DPOP_PROOF, "the proof has no integer iat"))?;

    if htm != check.method {
        return Err(err(DPOP_METHOD_MISMATCH, "the proof is for another HTTP method"));
    }
    if normalize_htu(&htu) != normalize_htu(check.uri) {
        return Err(err(DPOP_URL_MISMATCH, "the proof is for another URL"));
    }
    if check.now.saturating_sub(iat) > i64::from(check.max_age) {
        return Err(err(DPOP_PROOF_EXPIRED, "the proof is too old"));
    }
    if iat.saturating_sub(check.now) > i64::from(check.leeway) {
        return Err(err(DPOP_PROOF_NOT_YET_VALID, "the proof's iat is in the future"));
    }
    if !check.nonces.is_empty()
        && !claims
            .nonce
            .as_deref()
            .is_some_and(|n| check.nonces.iter().any(|ok| bool::from(ok.as_bytes().ct_eq(n.as_bytes()))))
    {
        return Err(err(USE_DPOP_NONCE, "the server requires a DPoP nonce"));
    }
    if let Some(token) = check.access_token {
        let expected = ath(token);
        let matches = claims.ath.as_deref().is_some_and(|a| bool::from(a.as_bytes().ct_eq(expected.as_bytes())));
        if !matches {
            return Err(err(DPOP_ATH_MISMATCH, "the proof's ath is not the access token's hash"));
        }
    }
    let jkt = key.thumbprint();
    if let Some(expected) = check.expected_jkt
        && expected != jkt
    {
        return Err(err(DPOP_KEY_MISMATCH, "the proof is signed by another key than the token is bound to"));
    }
    let replay_until = iat.saturating_add(i64::from(check.max_age));
    Ok(VerifiedProof { jkt, jti, iat, replay_until })
}

/// Server-provided DPoP nonces (RFC 9449 §8 and §9) without server state: a nonce is an HMAC of
/// the current time window under a key derived from the pepper, so every node of a deployment
/// issues and accepts the same nonces. The current window's nonce and the previous one are
/// accepted, so a nonce lives between one and two windows.
#[derive(Clone)]
pub struct NonceKey {
    mac: hmac::Hmac<sha2::Sha256>,
    window_s: i64,
}

impl NonceKey {
    /// Nonces from `key` (32 bytes derived for this purpose) that change every `window_s` seconds.
    pub fn new(key: &[u8; 32], window_s: i64) -> Result<Self> {
        use hmac::Mac;
        let mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .map_err(|_| Error::internal("HMAC refused the nonce key"))?;
        Ok(Self { mac, window_s: window_s.max(1) })
    }

    fn for_window(&self, window: i64) -> String {
        use hmac::Mac;
        let mut mac = self.mac.clone();
        mac.update(&window.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        jose::b64url_encode(tag.get(..18).unwrap_or_default())
    }

    /// The nonce to hand out at `now_s`.
    pub fn current(&self, now_s: i64) -> String {
        self.for_window(now_s.div_euclid(self.window_s))
    }

    /// The nonces accepted at `now_s`: the current one, then the previous window's.
    pub fn accepted(&self, now_s: i64) -> [String; 2] {
        let w = now_s.div_euclid(self.window_s);
        [self.for_window(w), self.for_window(w - 1)]
    }
}

/// How much a [`ReplayCache`] may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// The whole cache, in bytes (counted as [`ReplayCache::ENTRY_BYTES`] per remembered `jti`
    /// and [`ReplayCache::CALLER_BYTES`] per caller).
    pub max_bytes: usize,
    /// The `jti`s remembered for one caller.
    pub max_per_caller: usize,
}

impl Default for ReplayLimits {
    /// 32 MiB in all (about 260,000 proofs), 65,536 proofs per caller (a client sending 200
    /// requests a second for the 330 seconds a proof lives).
    fn default() -> Self {
        Self { max_bytes: 32 << 20, max_per_caller: 65_536 }
    }
}

/// A remembered `jti`: the first 16 bytes of a SHA-256 (collisions are out of reach).
type Digest = [u8; 16];

/// One caller's remembered `jti`s: when each may be forgotten, and the same ordered by that time
/// and then by arrival (a min-heap), so expired and oldest entries leave without a scan.
#[derive(Default)]
struct Partition {
    seen: std::collections::HashMap<Digest, i64>,
    order: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u64, Digest)>>,
}

impl Partition {
    /// Forgets the entry that may be forgotten first.
    fn pop_oldest(&mut self) -> Option<i64> {
        let std::cmp::Reverse((until, _, d)) = self.order.pop()?;
        self.seen.remove(&d);
        Some(until)
    }
    fn earliest(&self) -> Option<i64> {
        self.order.peek().map(|std::cmp::Reverse((until, _, _))| *until)
    }
}

#[derive(Default)]
struct Replays {
    callers: std::collections::HashMap<Digest, Partition>,
    /// Every caller with entries, by the time its first entry may be forgotten.
    by_expiry: std::collections::BTreeSet<(i64, Digest)>,
    /// Every caller with entries, by how many it has.
    by_size: std::collections::BTreeSet<(usize, Digest)>,
    entries: usize,
    /// Entries made so far: the arrival order of entries that expire in the same second.
    arrivals: u64,
}

impl Replays {
    /// Takes `caller` out of the two orders before it changes.
    fn detach(&mut self, caller: &Digest) {
        if let Some(p) = self.callers.get(caller) {
            if let Some(e) = p.earliest() {
                self.by_expiry.remove(&(e, *caller));
            }
            self.by_size.remove(&(p.seen.len(), *caller));
        }
    }
    /// Puts `caller` back into the two orders after it changed, or drops it when empty.
    fn attach(&mut self, caller: &Digest) {
        match self.callers.get(caller) {
            Some(p) if !p.seen.is_empty() => {
                if let Some(e) = p.earliest() {
                    self.by_expiry.insert((e, *caller));
                }
                self.by_size.insert((p.seen.len(), *caller));
            }
            Some(_) => {
                self.callers.remove(caller);
            }
            None => {}
        }
    }
    /// Forgets, in `caller`'s partition, what expired before `now` (at most `budget` entries)
    /// and, if `oldest`, one more: its oldest. Returns how many went.
    fn forget(&mut self, caller: &Digest, now: i64, budget: usize, oldest: bool) -> usize {
        self.detach(caller);
        let mut gone = 0;
        if let Some(p) = self.callers.get_mut(caller) {
            while gone < budget && p.earliest().is_some_and(|e| e < now) {
                p.pop_oldest();
                gone += 1;
            }
            if oldest && p.pop_oldest().is_some() {
                gone += 1;
            }
        }
        self.entries = self.entries.saturating_sub(gone);
        self.attach(caller);
        gone
    }
    fn bytes(&self) -> usize {
        self.entries
            .saturating_mul(ReplayCache::ENTRY_BYTES)
            .saturating_add(self.callers.len().saturating_mul(ReplayCache::CALLER_BYTES))
    }
}

/// Remembers the `jti`s of proofs (and other one-time JWTs, such as client assertions) until
/// they would be refused as expired anyway, so each is accepted once (RFC 9449 §11.1).
///
/// **Partitioned by caller** (issue 12 #6): each `jti` is remembered in the partition of the
/// authenticated caller that sent it (a token, a client), which holds at most
/// [`ReplayLimits::max_per_caller`] entries; beyond that the caller's own oldest entry goes. The
/// whole cache holds at most [`ReplayLimits::max_bytes`]; beyond that an entry of the caller with
/// the most entries goes, which is always a caller at or above its fair share (the bound divided
/// by the number of callers). So no caller can make the cache refuse or forget another caller's
/// proofs while that caller keeps within its share, and a caller that floods the cache only
/// shortens its own memory. Nothing is ever refused for want of room.
///
/// **Expiry without a sweep:** each partition keeps its entries ordered by expiry (a min-heap),
/// and the callers are ordered by their first expiry, so every call forgets a bounded number of
/// expired entries ([`ReplayCache::EXPIRE_PER_CALL`]) in O(log n) each, never scanning the cache
/// under its lock.
pub struct ReplayCache {
    inner: parking_lot::Mutex<Replays>,
    limits: ReplayLimits,
}

impl ReplayCache {
    /// What one remembered `jti` is counted as: its slots in the partition's map (24 bytes) and
    /// heap (40 bytes), each with up to as much again of spare capacity.
    pub const ENTRY_BYTES: usize = 128;
    /// What one caller is counted as: its partition and its places in the two orders.
    pub const CALLER_BYTES: usize = 256;
    /// Expired entries forgotten per call, at most (besides the caller's own).
    pub const EXPIRE_PER_CALL: usize = 64;

    pub fn new(limits: ReplayLimits) -> Self {
        Self { inner: parking_lot::Mutex::new(Replays::default()), limits }
    }

    /// Records that `caller` (an authenticated caller's stable id) used the one-time `jti`,
    /// unique within `scope` (a proof's key thumbprint, or a kind such as `client-assertion`),
    /// until `until` (seconds). `false` if it was used already and has not expired (`until` of
    /// the first use at or after `now`): a replay.
    pub fn first_use(&self, caller: &[u8], scope: &str, jti: &str, until: i64, now: i64) -> bool {
        let c = digest(&[caller]);
        let d = digest(&[scope.as_bytes(), jti.as_bytes()]);
        let mut r = self.inner.lock();
        // Due partitions first, a bounded amount, then the caller's own expired entries.
        let mut budget = Self::EXPIRE_PER_CALL;
        while budget > 0
            && let Some(&(earliest, due)) = r.by_expiry.first()
            && earliest < now
        {
            budget -= r.forget(&due, now, budget, false).max(1);
        }
        r.forget(&c, now, usize::MAX, false);
        if r.callers.get(&c).is_some_and(|p| p.seen.contains_key(&d)) {
            return false;
        }
        r.detach(&c);
        r.arrivals += 1;
        let arrival = r.arrivals;
        let p = r.callers.entry(c).or_default();
        p.seen.insert(d, until);
        p.order.push(std::cmp::Reverse((until, arrival, d)));
        let over_own = p.seen.len() > self.limits.max_per_caller.max(1);
        r.entries += 1;
        r.attach(&c);
        if over_own {
            r.forget(&c, now, 0, true);
        }
        // Over the whole bound: the caller with the most entries gives up its oldest (it may be
        // this caller).
        while r.bytes() > self.limits.max_bytes
            && let Some(&(_, largest)) = r.by_size.last()
        {
            if r.forget(&largest, now, 0, true) == 0 {
                break;
            }
        }
        true
    }

    /// The callers and entries held, for tests and metrics.
    pub fn len(&self) -> (usize, usize) {
        let r = self.inner.lock();
        (r.callers.len(), r.entries)
    }

    pub fn is_empty(&self) -> bool {
        self.inner.lock().entries == 0
    }
}

/// SHA-256 of length-prefixed `parts`, cut to 16 bytes.
fn digest(parts: &[&[u8]]) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(full.get(..16).unwrap_or(&[0; 16]));
    out
}

/// Keeps the precise reason from the JOSE layer in the message (its messages are static).
fn proof_message(e: &Error) -> &'static str {
    match &e.message {
        std::borrow::Cow::Borrowed(m) => m,
        std::borrow::Cow::Owned(_) => "the proof is not a valid JWS",
    }
}

#[cfg(test)]
#[path = "dpop_tests.rs"]
mod tests;
