//! Rate limits and quotas shared by the nodes of a deployment (Redis, in `keygate-store`). The
//! gateway never calls these on a request's path unless its local lease of the budget is used
//! up: it takes a small share of a bucket at a time ([`SharedLimits::take_rate`]) and spends it
//! from memory, so a shared limit costs one round trip per lease, not per request. Whatever is
//! admitted was first taken from the shared bucket, so nodes together admit at most the limit
//! plus the small leases they hold; a lease not spent in time is handed back with the next one.

use async_trait::async_trait;

use crate::error::Result;
use crate::policy::RateLimit;

/// What a shared GCRA bucket granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    /// Requests taken for the caller (0 ..= what it asked for).
    pub granted: u32,
    /// Requests that could still be taken right after.
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub reset_after_us: i64,
    /// When nothing was granted: microseconds until one request fits.
    pub retry_after_us: i64,
}

/// What a shared quota count granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaGrant {
    pub granted: u64,
    /// The period's count after the grant (every node's).
    pub count: u64,
}

/// The marker of an app's shared rate limit and quota in limiter keys ([`derived_key`]).
pub const APP_KEY: u8 = b'.';
/// The marker of a token's count of uses (`max_uses`) in limiter keys ([`derived_key`]).
pub const USES_KEY: u8 = b'!';
/// The marker of the limits a subscription's plan lends to an app's calls to an API
/// ([`derived_key`] of the subscription's id).
pub const SUB_KEY: u8 = b'~';

/// The limiter key of state that is not a token's own bucket: an app's shared limits
/// ([`APP_KEY`]), a token's uses ([`USES_KEY`]), a subscription's ([`SUB_KEY`]). A marker byte no public id holds (those are
/// base62), then 11 base62 characters of a SHA-256 of `id`: as long as a token's public id, so
/// it lives in the same maps, and text, so its count is stored like a token's (as `tok_` and the
/// key). Two ids meet on one key with odds of 62^-11 per pair: they would share a count, which
/// can only refuse early, never admit more.
pub fn derived_key(marker: u8, id: &str) -> [u8; crate::token_format::PUBLIC_ID_LEN] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    let mut key = [marker; crate::token_format::PUBLIC_ID_LEN];
    for (k, d) in key.iter_mut().skip(1).zip(digest.iter()) {
        *k = crate::token_format::ALPHABET[usize::from(*d) % 62];
    }
    key
}

/// Shared limit state: one implementation per backend, held as `Arc<dyn SharedLimits>`.
#[async_trait]
pub trait SharedLimits: Send + Sync {
    /// Gives back `refund` requests taken earlier and not used, charges `force` requests a node
    /// admitted on its own while it could not wait for the bucket (whether they fit or not),
    /// then takes up to `want` from the GCRA bucket `key` of `limit` at `now_us` (as many as
    /// fit), atomically.
    async fn take_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        refund: u32,
        force: u32,
        want: u32,
        now_us: i64,
    ) -> Result<RateGrant>;
    /// Gives back `refund`, charges `force` (admitted without the count), then counts up to
    /// `want` more against the quota `limit` whose period count is `key` (starting from `init` if
    /// the key is new: the count the store knows), kept until `expire_at_ms`.
    #[allow(clippy::too_many_arguments)]
    async fn take_quota(
        &self,
        key: &str,
        limit: u64,
        refund: u64,
        force: u64,
        want: u64,
        init: u64,
        expire_at_ms: i64,
    ) -> Result<QuotaGrant>;
    /// Counts one attempt under each of `keys` (each `(key, limit)`; a key's window of
    /// `window_ms` starts at its first attempt) unless one of them has reached its limit:
    /// `false` then, and nothing is counted. All or nothing, atomically.
    async fn attempt(&self, keys: &[(&str, u32)], window_ms: i64) -> Result<bool>;
    /// Gives back one attempt under each of `keys` (it succeeded).
    async fn give_back(&self, keys: &[&str]) -> Result<()>;
    /// Records the one-time value `key` for `ttl_ms`: `false` if it was recorded already and
    /// has not expired (a replay).
    async fn first_use(&self, key: &str, ttl_ms: i64) -> Result<bool>;
    /// Succeeds when the backend answers.
    async fn ping(&self) -> Result<()>;
    /// Where the state lives, for logs (never a password).
    fn describe(&self) -> String;
}

/// The shared key under which the one-time value `jti` of `caller` within `scope` (a DPoP key
/// thumbprint, "client-assertion") is remembered: a digest, so no caller-chosen text reaches
/// the backend's key space, hash-tagged under `prefix`.
pub fn replay_key(prefix: &str, caller: &[u8], scope: &str, jti: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [caller, scope.as_bytes(), jti.as_bytes()] {
        h.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(part);
    }
    let digest: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{{{prefix}:replay}}:{digest}")
}

/// How long a one-time value valid until `until` (seconds) is remembered at `now` (seconds),
/// in milliseconds: past its end, and at least a second.
pub fn replay_ttl_ms(until: i64, now: i64) -> i64 {
    until.saturating_sub(now).saturating_add(1).saturating_mul(1000).max(1000)
}
