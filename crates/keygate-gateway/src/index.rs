//! The in-memory token index: every token that may authenticate, keyed by its keyed hash, so a
//! presented token is checked with no store round trip: format and checksum first (no lookup for
//! a malformed token), then HMAC-SHA256 under the pepper, then one hash-map read.
//!
//! Memory matters at a million tokens: entries are compact (ids and scope sets are interned and
//! shared), and each shard is a set of pointers to entries keyed by the full hash kept in the
//! entry: the set hashes it as its first 8 bytes (already uniformly random, so no re-hashing) and
//! compares all 32 in constant time. A bucket is one pointer, and entries whose first 8 bytes
//! collide need no second map. `docs/benchmarks.md` has the figures.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};

use ipnet::IpNet;
use keygate_core::Timestamp;
use keygate_core::ids::TokenId;
use keygate_core::model::{TokenRecord, TokenState};
use keygate_core::policy::{Quota, RateLimit, allowlist_permits};
use keygate_core::scope::{Scope, any_covers};
use keygate_core::secret::{Pepper, SecretHash};
use keygate_core::token_format::{self, FormatError, PUBLIC_ID_LEN, TokenPrefix};

const SHARDS: usize = 16;

/// Hashes a u64 key that is already uniformly random (a slice of an HMAC) as itself.
#[derive(Default, Clone, Copy)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A token's keyed hash as the shards key it: hashed as its first 8 bytes, compared whole and in
/// constant time (`SecretHash`'s equality).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HashKey(SecretHash);

impl Hash for HashKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let first = self.0.as_bytes().first_chunk::<8>().copied().unwrap_or_default();
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A resident entry, found in its shard by its hash.
struct Slot(Arc<IndexedToken>);

impl Borrow<HashKey> for Slot {
    fn borrow(&self) -> &HashKey {
        &self.0.hash
    }
}

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash.hash(state);
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.0.hash == other.0.hash
    }
}

impl Eq for Slot {}

type Shard = HashSet<Slot, BuildHasherDefault<IdentityHasher>>;

/// How long a secret replaced by a rotation is remembered after its grace period ended (see
/// [`IndexedToken::rotated_away`]); the store's snapshot includes such tokens for as long.
pub const ROTATED_KEPT_MS: i64 = keygate_core::model::ROTATED_KEPT_MS;

/// A token as the gateway needs it.
///
/// `repr(C)` keeps the fields every check reads (hash, expiry, suspension) together at the
/// start, beside the `Arc`'s counts, so a lookup touches one or two cache lines of the entry
/// instead of three; the order also leaves no padding beyond the end (152 bytes).
#[derive(Debug)]
#[repr(C)]
pub struct IndexedToken {
    hash: HashKey,
    /// Milliseconds; `i64::MAX` for none.
    expires_at: i64,
    suspended: bool,
    /// Replaced by a rotation: once `expires_at` (the grace's end) is past, the entry stays
    /// [`ROTATED_KEPT_MS`] longer so that a presentation of the old secret is recognized (and
    /// refused as expired) for anomaly detection. In padding too.
    rotated: bool,
    /// Set when the entry leaves the index (replaced by a change, removed by a revocation or a
    /// deletion, swept at expiry): whoever still holds it (an upgraded tunnel) must look the
    /// token up again. It sits in padding, so the entry does not grow.
    retired: AtomicBool,
    public_id: [u8; PUBLIC_ID_LEN],
    pub workspace_id: Arc<str>,
    pub app_id: Arc<str>,
    pub scopes: Arc<[Scope]>,
    /// What few tokens have (an IP allowlist, a DPoP binding), behind one pointer so the
    /// entry stays in its allocation class.
    extras: Option<Arc<Extras>>,
    pub quota: Option<Quota>,
    pub rate_limit: Option<RateLimit>,
    /// The GCRA theoretical arrival time of the token's own rate limit, in microseconds: kept in
    /// the entry the verify has just read, so the limit costs one compare-and-swap on a cache
    /// line already loaded (no map lookup). Carried over when the entry is replaced.
    tat: AtomicI64,
}

impl IndexedToken {
    /// The token's own rate-limit state (see [`crate::limiter::Limiter::check_cell`]).
    pub fn rate_state(&self) -> &AtomicI64 {
        &self.tat
    }
    /// The token's public id (the 12 characters after the prefix), a cheap key for per-token state.
    pub fn public_id(&self) -> &[u8; PUBLIC_ID_LEN] {
        &self.public_id
    }
    pub fn token_id(&self) -> TokenId {
        TokenId::from_public_id(std::str::from_utf8(&self.public_id).unwrap_or_default())
    }
    pub fn expires_at(&self) -> Option<Timestamp> {
        (self.expires_at != i64::MAX).then_some(Timestamp::from_millis(self.expires_at))
    }
    /// Whether this is a secret a rotation replaced, presented after its grace period.
    pub fn rotated_away(&self, now_ms: i64) -> bool {
        self.rotated && now_ms >= self.expires_at
    }
    /// Whether `addr` may use this token.
    pub fn allows_ip(&self, addr: IpAddr) -> bool {
        self.extras.as_deref().is_none_or(|e| e.ip_allowlist.is_empty() || allowlist_permits(&e.ip_allowlist, addr))
    }
    /// The RFC 7638 thumbprint of the DPoP key the token is bound to, if any.
    pub fn dpop_jkt(&self) -> Option<&str> {
        self.extras.as_deref().and_then(|e| e.dpop_jkt.as_deref())
    }
    /// What the token may spend on LLM calls, over every `ai` route, if it has a budget.
    pub fn llm_budget(&self) -> Option<keygate_core::llm::LlmBudget> {
        self.extras.as_deref().and_then(|e| e.llm_budget)
    }
    /// How many requests the token may make in all, and the limiter key that counts them.
    pub fn max_uses(&self) -> Option<(u64, &[u8; PUBLIC_ID_LEN])> {
        self.extras.as_deref().and_then(|e| e.max_uses.as_ref()).map(|(n, k)| (*n, k))
    }
    /// Whether the token holds a scope that covers `required`.
    pub fn has_scope(&self, required: &Scope) -> bool {
        any_covers(&self.scopes, required)
    }
}

/// The rarely set parts of a token.
#[derive(Debug)]
struct Extras {
    ip_allowlist: Box<[IpNet]>,
    dpop_jkt: Option<Box<str>>,
    llm_budget: Option<keygate_core::llm::LlmBudget>,
    /// `max_uses`, and the limiter key its count is kept under.
    max_uses: Option<(u64, [u8; PUBLIC_ID_LEN])>,
}

/// Why a presented token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong prefix, length, alphabet or checksum: refused without a lookup.
    Malformed(FormatError),
    /// Well-formed but not a token this index knows (never issued, revoked or deleted).
    Unknown,
    Suspended,
    Expired,
}

impl Refusal {
    /// A stable code for logs and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_token",
            Self::Unknown => "unknown_token",
            Self::Suspended => "token_suspended",
            Self::Expired => "token_expired",
        }
    }
}

/// Interned values many tokens share. A value no entry refers to any more (its only owner is
/// the interner) is let go of by [`Interner::prune`], so the interner holds what the resident
/// tokens use, not every id and scope set ever seen.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    scope_sets: HashSet<Arc<[Scope]>>,
}

impl Interner {
    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(v) = self.strings.get(s) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(s);
        self.strings.insert(v.clone());
        v
    }
    fn scopes(&mut self, s: &[Scope]) -> Arc<[Scope]> {
        if let Some(v) = self.scope_sets.get(s) {
            return v.clone();
        }
        let v: Arc<[Scope]> = Arc::from(s);
        self.scope_sets.insert(v.clone());
        v
    }
    /// Drops the values only the interner holds.
    fn prune(&mut self) {
        self.strings.retain(|v| Arc::strong_count(v) > 1);
        self.scope_sets.retain(|v| Arc::strong_count(v) > 1);
    }
}

struct Inner {
    prefix: TokenPrefix,
    pepper: Pepper,
    /// `parking_lot` locks: they cannot be poisoned, so a panic elsewhere can never make a
    /// later change (a revocation) skip its work.
    shards: Vec<RwLock<Shard>>,
    interner: Mutex<Interner>,
    len: AtomicUsize,
    seq: AtomicU64,
    /// When the feed was last read to its end ([`crate::resolve::monotonic_ms`] + 1; 0: never).
    caught_up: AtomicU64,
    /// Ids (`jti`) of revoked JWT access tokens, until they expire (milliseconds), and the feed
    /// position of the revocations applied. Revocations are rare and every JWT request reads
    /// the set, so it is copied on write and read without a lock.
    revoked_jtis: arc_swap::ArcSwap<HashMap<Box<str>, i64>>,
    jti_seq: AtomicU64,
    /// Held while a batch of changes is read from the feed and applied, so that a batch read
    /// before a commit can never be applied after a batch read after it.
    apply: tokio::sync::Mutex<()>,
    /// Counts the changes applied, for those that hold a token for longer than a request (see
    /// [`TokenIndex::changes`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// The feed position every change up to which (token changes and JWT revocations) is
    /// applied: what this node acknowledges to the others (see `follow::catch_up`).
    applied: tokio::sync::watch::Sender<u64>,
}

/// The index; clones share it.
#[derive(Clone)]
pub struct TokenIndex(Arc<Inner>);

impl keygate_core::verify::IndexReadiness for TokenIndex {
    fn status(&self) -> keygate_core::verify::IndexStatus {
        TokenIndex::status(self)
    }
}

/// The shard a hash lives in, from a byte the in-shard hash does not use.
fn shard_of(hash: &SecretHash) -> usize {
    usize::from(hash.as_bytes().get(8).copied().unwrap_or(0)) % SHARDS
}

impl TokenIndex {
    pub fn new(prefix: TokenPrefix, pepper: Pepper) -> Self {
        Self(Arc::new(Inner {
            prefix,
            pepper,
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            interner: Mutex::new(Interner::default()),
            len: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            revoked_jtis: arc_swap::ArcSwap::from_pointee(HashMap::new()),
            jti_seq: AtomicU64::new(0),
            apply: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
            applied: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// A receiver that sees a new value whenever the index changes (an entry added, replaced or
    /// removed, a JWT revoked): what holds a token beyond one request (an upgraded tunnel) waits
    /// on it and then asks [`TokenIndex::recheck`], so a revocation reaches it without a check
    /// per byte.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// Marks `old` as no longer the index's entry and tells the waiters of [`Self::changes`]
    /// (nobody is told while nobody waits, so a bulk load pays one atomic read per token).
    fn retire(&self, old: &IndexedToken) {
        old.retired.store(true, Ordering::Release);
        self.changed();
    }

    fn changed(&self) {
        if self.0.changes.receiver_count() > 0 {
            self.0.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Checks again a token that was verified earlier and is still in use: the index's current
    /// entry for the same token (the same one while nothing changed), refused as
    /// [`Self::verify`] would refuse it at `now`.
    pub fn recheck(&self, held: &Arc<IndexedToken>, now: Timestamp) -> Result<Arc<IndexedToken>, Refusal> {
        let entry = if held.retired.load(Ordering::Acquire) {
            self.get(&held.hash.0).ok_or(Refusal::Unknown)?
        } else {
            held.clone()
        };
        if entry.suspended {
            return Err(Refusal::Suspended);
        }
        if now.as_millis() >= entry.expires_at {
            return Err(Refusal::Expired);
        }
        Ok(entry)
    }

    /// Serializes readers-and-appliers of the change feed (see `follow::catch_up`).
    pub async fn apply_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.apply.lock().await
    }

    /// How many tokens are resident.
    pub fn len(&self) -> usize {
        self.0.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The change-feed position the index is current to.
    pub fn seq(&self) -> u64 {
        self.0.seq.load(Ordering::Acquire)
    }

    pub fn set_seq(&self, seq: u64) {
        self.0.seq.store(seq, Ordering::Release);
    }

    /// The feed position every change up to which is applied (token changes and JWT
    /// revocations alike).
    pub fn applied(&self) -> u64 {
        *self.0.applied.borrow()
    }

    /// A receiver that sees [`Self::applied`] move.
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.applied.subscribe()
    }

    /// Records that every change up to `seq` is applied (never moves back).
    pub fn set_applied(&self, seq: u64) {
        self.0.applied.send_if_modified(|cur| {
            let moved = seq > *cur;
            if moved {
                *cur = seq;
            }
            moved
        });
    }

    /// Notes that the change feed was just read to its end (`follow::catch_up`).
    pub fn mark_caught_up(&self) {
        self.0.caught_up.store(crate::resolve::monotonic_ms().saturating_add(1), Ordering::Release);
    }

    /// What the index knows of the feed, for readiness.
    pub fn status(&self) -> keygate_core::verify::IndexStatus {
        let at = self.0.caught_up.load(Ordering::Acquire);
        keygate_core::verify::IndexStatus {
            tokens: self.len(),
            position: self.seq(),
            caught_up_ago: (at > 0)
                .then(|| std::time::Duration::from_millis(crate::resolve::monotonic_ms().saturating_sub(at - 1))),
        }
    }

    /// Checks a presented token: format, then the index, then status and expiry at `now`.
    pub fn verify(&self, presented: &str, now: Timestamp) -> Result<Arc<IndexedToken>, Refusal> {
        token_format::parse(presented, &self.0.prefix).map_err(Refusal::Malformed)?;
        self.verify_hash(&self.0.pepper.hash(presented), now)
    }

    /// Checks the token with this keyed hash (one a JWT obtained by token exchange names): in the
    /// index, then status and expiry at `now`.
    pub fn verify_hash(&self, hash: &SecretHash, now: Timestamp) -> Result<Arc<IndexedToken>, Refusal> {
        let entry = self.get(hash).ok_or(Refusal::Unknown)?;
        if entry.suspended {
            return Err(Refusal::Suspended);
        }
        if now.as_millis() >= entry.expires_at {
            return Err(Refusal::Expired);
        }
        Ok(entry)
    }

    /// [`Self::verify`] for a caller that may only know the tokens of `workspace_id`: a token
    /// of another workspace is [`Refusal::Unknown`] whatever its state, so that its suspension or
    /// expiry tells nothing of its existence.
    pub fn verify_in(&self, presented: &str, now: Timestamp, workspace_id: &str) -> Result<Arc<IndexedToken>, Refusal> {
        token_format::parse(presented, &self.0.prefix).map_err(Refusal::Malformed)?;
        let entry = self.get(&self.0.pepper.hash(presented)).ok_or(Refusal::Unknown)?;
        if &*entry.workspace_id != workspace_id {
            return Err(Refusal::Unknown);
        }
        if entry.suspended {
            return Err(Refusal::Suspended);
        }
        if now.as_millis() >= entry.expires_at {
            return Err(Refusal::Expired);
        }
        Ok(entry)
    }

    /// Whether `presented` is the prefix of this server's tokens followed by a valid checksum
    /// (no lookup).
    pub fn is_well_formed(&self, presented: &str) -> bool {
        token_format::parse(presented, &self.0.prefix).is_ok()
    }

    /// The first well-formed token of this server's format anywhere in `text` (a decoded query
    /// string, say): each place where `<prefix>_` starts is checked for a whole token after it,
    /// whatever comes before or after (no lookup).
    pub fn find_well_formed<'t>(&self, text: &'t [u8]) -> Option<&'t str> {
        let prefix = self.0.prefix.as_str().as_bytes();
        let len = prefix.len() + 1 + token_format::BODY_LEN;
        let first = *prefix.first()?;
        (0..text.len().saturating_sub(len - 1))
            .filter(|i| text.get(*i) == Some(&first))
            .filter_map(|i| text.get(i..i + len))
            .filter(|cand| cand.starts_with(prefix) && cand.get(prefix.len()) == Some(&b'_'))
            .filter_map(|cand| std::str::from_utf8(cand).ok())
            .find(|cand| self.is_well_formed(cand))
    }

    /// Whether `presented` is a token resident in the index (active, suspended, or expired
    /// but not swept yet).
    pub fn contains(&self, presented: &str) -> bool {
        self.is_well_formed(presented) && self.get(&self.0.pepper.hash(presented)).is_some()
    }

    fn get(&self, hash: &SecretHash) -> Option<Arc<IndexedToken>> {
        let shard = self.0.shards.get(shard_of(hash))?.read();
        shard.get(&HashKey(*hash)).map(|slot| slot.0.clone())
    }

    /// Inserts or replaces a token. Revoked tokens are removed instead.
    pub fn upsert(&self, t: &TokenRecord) {
        if t.state == TokenState::Revoked {
            self.remove(&t.hash);
            return;
        }
        let mut interner = self.0.interner.lock();
        let mut public_id = [0u8; PUBLIC_ID_LEN];
        let pid = t.public_id().as_bytes();
        if pid.len() == PUBLIC_ID_LEN {
            public_id.copy_from_slice(pid);
        }
        // `shard_of` is below SHARDS, so the shard exists.
        let Some(lock) = self.0.shards.get(shard_of(&t.hash)) else {
            return;
        };
        let mut set = lock.write();
        let tat = set.get(&HashKey(t.hash)).map_or(0, |old| old.0.tat.load(Ordering::Acquire));
        let entry = Arc::new(IndexedToken {
            retired: AtomicBool::new(false),
            tat: AtomicI64::new(tat),
            hash: HashKey(t.hash),
            public_id,
            workspace_id: interner.string(t.workspace_id.as_str()),
            app_id: interner.string(t.app_id.as_str()),
            scopes: interner.scopes(&t.scopes),
            extras: (!t.ip_allowlist.is_empty()
                || t.dpop_jkt.is_some()
                || t.llm_budget.is_some()
                || t.max_uses.is_some())
            .then(|| {
                Arc::new(Extras {
                    ip_allowlist: t.ip_allowlist.clone().into(),
                    dpop_jkt: t.dpop_jkt.as_deref().map(Into::into),
                    llm_budget: t.llm_budget,
                    max_uses: t
                        .max_uses
                        .map(|n| (n, keygate_core::limits::derived_key(keygate_core::limits::USES_KEY, t.id.as_str()))),
                })
            }),
            suspended: t.state == TokenState::Suspended,
            rotated: t.replaced_by.is_some() && t.expires_at.is_some(),
            expires_at: t.expires_at.map_or(i64::MAX, Timestamp::as_millis),
            rate_limit: t.rate_limit,
            quota: t.quota,
        });
        drop(interner);
        match set.replace(Slot(entry)) {
            Some(old) => self.retire(&old.0),
            None => {
                self.0.len.fetch_add(1, Ordering::Relaxed);
                self.changed();
            }
        }
    }

    /// Drops the token with this hash, if resident.
    /// Whether the JWT access token `jti` was revoked.
    pub fn is_jti_revoked(&self, jti: &str) -> bool {
        self.0.revoked_jtis.load().contains_key(jti)
    }

    /// Records revoked JWT ids (with their expiry, after which they are forgotten).
    pub fn revoke_jtis(&self, revoked: impl IntoIterator<Item = (String, Timestamp)>) {
        let added: Vec<(Box<str>, i64)> =
            revoked.into_iter().map(|(jti, exp)| (jti.into_boxed_str(), exp.as_millis())).collect();
        if added.is_empty() {
            return;
        }
        self.0.revoked_jtis.rcu(|cur| {
            let mut next = HashMap::clone(cur);
            next.extend(added.iter().cloned());
            next
        });
        self.changed();
    }

    /// The change-feed position of the JWT revocations applied.
    pub fn jti_seq(&self) -> u64 {
        self.0.jti_seq.load(Ordering::Acquire)
    }

    pub fn set_jti_seq(&self, seq: u64) {
        self.0.jti_seq.store(seq, Ordering::Release);
    }

    pub fn remove(&self, hash: &SecretHash) {
        let Some(lock) = self.0.shards.get(shard_of(hash)) else {
            return;
        };
        let old = lock.write().take(&HashKey(*hash));
        if let Some(old) = old {
            self.0.len.fetch_sub(1, Ordering::Relaxed);
            self.retire(&old.0);
        }
    }

    /// Drops tokens that expired before `now`; they would be refused anyway (a secret a rotation
    /// replaced stays [`ROTATED_KEPT_MS`] past its grace, refused as expired, so that its use is
    /// noticed). So are the ids of revoked JWTs that have expired.
    pub fn sweep_expired(&self, now: Timestamp) -> usize {
        if self.0.revoked_jtis.load().values().any(|exp| *exp <= now.as_millis()) {
            self.0.revoked_jtis.rcu(|cur| {
                let mut next = HashMap::clone(cur);
                next.retain(|_, exp| *exp > now.as_millis());
                next
            });
        }
        let now = now.as_millis();
        self.keep_only(|t| t.expires_at > now || (t.rotated && t.expires_at > now.saturating_sub(ROTATED_KEPT_MS)))
    }

    /// The resident entry of `presented` whatever its state (a refused token's, for anomaly
    /// detection); `None` if it is malformed or not resident.
    pub fn resident(&self, presented: &str) -> Option<Arc<IndexedToken>> {
        token_format::parse(presented, &self.0.prefix).ok()?;
        self.get(&self.0.pepper.hash(presented))
    }

    /// Drops every entry `keep` says no to (retired, so that holders see it), tells the waiters
    /// of [`Self::changes`], and lets go of the ids and scope sets no entry uses any more
    /// (tokens expired, revoked or changed). Returns how many went.
    fn keep_only(&self, keep: impl Fn(&IndexedToken) -> bool) -> usize {
        let mut dropped = 0;
        for lock in &self.0.shards {
            let mut set = lock.write();
            let before = set.len();
            set.retain(|slot| {
                let kept = keep(&slot.0);
                if !kept {
                    slot.0.retired.store(true, Ordering::Release);
                }
                kept
            });
            dropped += before - set.len();
        }
        self.0.len.fetch_sub(dropped, Ordering::Relaxed);
        if dropped > 0 {
            self.changed();
        }
        self.0.interner.lock().prune();
        dropped
    }

    /// Drops every token whose hash `keep` does not hold (after a snapshot reload); returns how
    /// many went.
    pub fn retain_only(&self, keep: &std::collections::HashSet<[u8; 32]>) -> usize {
        self.keep_only(|t| keep.contains(&t.hash.0.0))
    }

    /// Releases spare capacity after a bulk load.
    pub fn shrink_to_fit(&self) {
        for lock in &self.0.shards {
            lock.write().shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::ids::{AppId, WorkspaceId};
    use keygate_core::secret::OsRandom;
    use keygate_core::token_format::{MintedToken, mint};

    /// An index (under a pepper of `seed` bytes) and a minted token with its record, not yet in it.
    fn one_token(seed: u8) -> (TokenIndex, MintedToken, TokenRecord) {
        let pepper = Pepper::new(&[seed; 32]).unwrap();
        let index = TokenIndex::new(TokenPrefix::default(), pepper.clone());
        let m = mint(&TokenPrefix::default(), &OsRandom).unwrap();
        let r = record(&pepper, m.secret.expose(), &m.public_id);
        (index, m, r)
    }

    pub(crate) fn record(pepper: &Pepper, secret: &str, public_id: &str) -> TokenRecord {
        let t0 = Timestamp::from_millis(0);
        TokenRecord {
            id: TokenId::from_public_id(public_id),
            workspace_id: WorkspaceId::from_trusted("ws_1".into()),
            app_id: AppId::from_trusted("app_1".into()),
            name: "t".into(),
            hash: pepper.hash(secret),
            prefix: "kg".into(),
            last4: "abcd".into(),
            scopes: vec![Scope::parse("orders:*").unwrap()],
            state: TokenState::Active,
            expires_at: None,
            ip_allowlist: vec![],
            rate_limit: None,
            quota: None,
            metadata: Default::default(),
            created_at: t0,
            updated_at: t0,
            last_used_at: None,
            last_used_ip: None,
            revoked_at: None,
            revoke_reason: None,
            rotated_from: None,
            replaced_by: None,
            exposed_at: None,
            dpop_jkt: None,
            llm_budget: None,
            max_uses: None,
            version: 1,
        }
    }

    #[test]
    fn verifies_and_refuses_for_each_reason() {
        let (index, m, mut r) = one_token(1);
        let now = Timestamp::from_millis(1000);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Unknown);
        index.upsert(&r);
        assert_eq!(index.len(), 1);
        let ok = index.verify(m.secret.expose(), now).unwrap();
        assert_eq!(ok.token_id(), r.id);
        assert!(ok.has_scope(&Scope::parse("orders:read").unwrap()));
        assert!(!ok.has_scope(&Scope::parse("users:read").unwrap()));

        assert!(matches!(index.verify("kg_nope", now), Err(Refusal::Malformed(_))));
        r.state = TokenState::Suspended;
        index.upsert(&r);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Suspended);
        r.state = TokenState::Active;
        r.expires_at = Some(now);
        index.upsert(&r);
        assert_eq!(index.len(), 1);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Expired);
        assert_eq!(index.sweep_expired(now), 1);
        assert!(index.is_empty());
        r.expires_at = None;
        index.upsert(&r);
        r.state = TokenState::Revoked;
        index.upsert(&r);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Unknown);
        assert!(index.is_empty());
    }

    #[test]
    fn a_change_is_never_dropped_after_a_panic_under_a_lock() {
        // A thread that panics while it holds the index's locks must not make later changes
        // skip: a suspension or a revocation must take effect whatever happened before.
        let (index, m, mut r) = one_token(3);
        index.upsert(&r);
        let now = Timestamp::from_millis(1000);
        assert!(index.verify(m.secret.expose(), now).is_ok());
        let held = index.clone();
        let shard = shard_of(&r.hash);
        let panicked = std::thread::spawn(move || {
            let _interner = held.0.interner.lock();
            let _shard = held.0.shards[shard].write();
            panic!("a bug while the locks are held");
        })
        .join();
        assert!(panicked.is_err());
        r.state = TokenState::Suspended;
        index.upsert(&r);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Suspended, "the suspension was dropped");
        r.scopes = vec![Scope::parse("users:read").unwrap()];
        r.state = TokenState::Active;
        index.upsert(&r);
        let t = index.verify(m.secret.expose(), now).unwrap();
        assert!(!t.has_scope(&Scope::parse("orders:read").unwrap()), "the scope change was dropped");
        r.state = TokenState::Revoked;
        index.upsert(&r);
        assert_eq!(index.verify(m.secret.expose(), now).unwrap_err(), Refusal::Unknown);
        assert!(index.is_empty(), "the revocation was dropped");
    }

    #[test]
    fn interned_values_no_token_uses_are_let_go() {
        let (index, _, mut r) = one_token(4);
        let now = Timestamp::from_millis(1000);
        for s in ["a:1", "a:2", "a:3"] {
            r.scopes = vec![Scope::parse(s).unwrap()];
            index.upsert(&r);
        }
        index.sweep_expired(now);
        let sizes = |i: &TokenIndex| {
            let g = i.0.interner.lock();
            (g.strings.len(), g.scope_sets.len())
        };
        assert_eq!(sizes(&index), (2, 1), "the workspace, the app and the scope set in use");
        index.remove(&r.hash);
        index.sweep_expired(now);
        assert_eq!(sizes(&index), (0, 0));
    }

    #[test]
    fn an_entry_stays_in_its_allocation_class() {
        // The 196-bytes-per-token goal rests on the entry and the Arc's counts (16 bytes)
        // fitting malloc's 176-byte class; a new field must not push it into the next one.
        let size = std::mem::size_of::<IndexedToken>();
        println!("IndexedToken: {size} bytes");
        assert!(size + 16 <= 176, "{size}");
    }

    #[test]
    fn rate_state_survives_a_change_to_the_token() {
        let (index, minted, mut rec) = one_token(7);
        index.upsert(&rec);
        let now = Timestamp::from_millis(1_000);
        index.verify(minted.secret.expose(), now).unwrap().rate_state().store(42, Ordering::Release);
        rec.scopes = vec![Scope::parse("a:b").unwrap()];
        index.upsert(&rec);
        let after = index.verify(minted.secret.expose(), now).unwrap();
        assert!(after.has_scope(&Scope::parse("a:b").unwrap()), "the change applied");
        assert_eq!(after.rate_state().load(Ordering::Acquire), 42, "the limiter's state carried over");
    }

    #[test]
    fn a_held_entry_is_rechecked_after_every_change_and_the_holders_are_told() {
        let (index, m, mut r) = one_token(3);
        index.upsert(&r);
        let now = Timestamp::from_millis(1000);
        let held = index.verify(m.secret.expose(), now).unwrap();
        let mut changes = index.changes();
        assert!(Arc::ptr_eq(&index.recheck(&held, now).unwrap(), &held), "unchanged: the same entry");
        assert!(!changes.has_changed().unwrap());
        // A change replaces the entry: the holder is told and gets the new one.
        r.scopes = vec![Scope::parse("a:b").unwrap()];
        index.upsert(&r);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let held = index.recheck(&held, now).unwrap();
        assert!(held.has_scope(&Scope::parse("a:b").unwrap()));
        r.state = TokenState::Suspended;
        index.upsert(&r);
        assert_eq!(index.recheck(&held, now).unwrap_err(), Refusal::Suspended);
        let held = index.get(&r.hash).unwrap();
        r.state = TokenState::Revoked;
        index.upsert(&r);
        assert!(changes.has_changed().unwrap());
        assert_eq!(index.recheck(&held, now).unwrap_err(), Refusal::Unknown, "revoked");
        // Expiry, at the time it comes.
        r.state = TokenState::Active;
        r.expires_at = Some(Timestamp::from_millis(2000));
        index.upsert(&r);
        let held = index.get(&r.hash).unwrap();
        assert!(index.recheck(&held, now).is_ok());
        assert_eq!(index.recheck(&held, Timestamp::from_millis(2000)).unwrap_err(), Refusal::Expired);
    }

    #[test]
    fn ip_allowlist_is_checked() {
        let (index, m, mut r) = one_token(1);
        r.ip_allowlist = vec!["10.0.0.0/8".parse().unwrap()];
        index.upsert(&r);
        let t = index.verify(m.secret.expose(), Timestamp::from_millis(0)).unwrap();
        assert!(t.allows_ip("10.1.1.1".parse().unwrap()));
        assert!(!t.allows_ip("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn hashes_sharing_their_first_bytes_stay_apart() {
        // Same first 9 bytes (so the same shard and the same in-shard hash), different rest.
        let pepper = Pepper::new(&[1; 32]).unwrap();
        let index = TokenIndex::new(TokenPrefix::default(), pepper.clone());
        let mut a = record(&pepper, "unused", "aaaaaaaaaaaa");
        let mut b = record(&pepper, "unused", "bbbbbbbbbbbb");
        a.hash = SecretHash([7; 32]);
        let mut hb = [7; 32];
        hb[31] = 8;
        b.hash = SecretHash(hb);
        index.upsert(&a);
        index.upsert(&b);
        index.upsert(&a);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get(&a.hash).unwrap().token_id(), a.id);
        assert_eq!(index.get(&b.hash).unwrap().token_id(), b.id);
        let mut hc = [7; 32];
        hc[20] = 9;
        assert!(index.get(&SecretHash(hc)).is_none());
        index.remove(&a.hash);
        assert_eq!(index.len(), 1);
        assert!(index.get(&a.hash).is_none());
        assert_eq!(index.get(&b.hash).unwrap().token_id(), b.id);
    }
}
