//! Per-token rate limits (GCRA, one compare-and-swap per request) and quotas (a count per
//! calendar period), held in memory. Quota counts are flushed to the store with usage and
//! loaded at start, so they survive a restart; a crash loses at most one flush interval.
//!
//! The maps are bounded (issue 12): [`Limiter::prune`] (run with every flush) drops the route
//! buckets that are back at rest (GCRA `tat` ≤ now: a full bucket, the same as no entry) and the
//! quota counts of periods that have ended (once flushed); a shard of route buckets holds at most
//! [`SHARD_CAPACITY`] callers, past which new callers share one bucket per route until buckets
//! come to rest. The locks are `parking_lot`'s, which cannot be poisoned: no check or count is
//! ever skipped because another thread panicked.

use std::collections::HashMap as StdHashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::{Mutex, RwLock};

use keygate_core::ids::TokenId;
use keygate_core::model::QuotaCount;
use keygate_core::policy::{GcraDecision, Quota, QuotaPeriod, RateLimit};
use keygate_core::token_format::PUBLIC_ID_LEN;

const SHARDS: usize = 16;
/// Route buckets per shard (16 shards: about a million callers with a live route bucket).
pub const SHARD_CAPACITY: usize = 65_536;
/// The key callers share past [`SHARD_CAPACITY`] (no public id is all `~`: ids are base62).
const OVERFLOW: [u8; PUBLIC_ID_LEN] = [b'~'; PUBLIC_ID_LEN];

/// Keys are public ids of tokens that passed verification (chosen by the issuer, not by a
/// caller), so a fast keyed hash is enough; per-map random seeds keep it unpredictable anyway.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

type Key = ([u8; PUBLIC_ID_LEN], u32);

fn shard_of(id: &[u8; PUBLIC_ID_LEN]) -> usize {
    id.iter().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(usize::from(*b))) % SHARDS
}

/// What a quota check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDecision {
    pub allowed: bool,
    pub remaining: u64,
    /// Milliseconds until the period ends (`i64::MAX` for `total`).
    pub reset_after_ms: i64,
}

#[derive(Debug, Default)]
struct QuotaState {
    period_start: i64,
    /// When the period ends, once a check has told (counts loaded at start do not say).
    period_end: Option<i64>,
    count: u64,
    /// Counted since the last flush.
    unflushed: u64,
}

impl QuotaState {
    /// Whether the count can be forgotten at `now_ms`: flushed, and of a period that has ended
    /// (a loaded count of unknown kind: a period that began before this month, and so ended,
    /// whether it was a day or a month; a `total` count, which begins at 0, is kept).
    fn at_rest(&self, now_ms: i64) -> bool {
        self.unflushed == 0
            && match self.period_end {
                Some(end) => end <= now_ms,
                None => self.period_start > 0 && self.period_start < QuotaPeriod::Month.window(now_ms).0,
            }
    }
}

/// One shard of route buckets, and when it was last pruned because it was full.
#[derive(Default)]
struct Buckets {
    map: HashMap<Key, AtomicI64>,
    pruned_at_us: i64,
}

/// Rate-limit and quota state of every token seen.
pub struct Limiter {
    /// Key: (token public id, route index + 1, or 0 for the token's own limit).
    tats: Vec<RwLock<Buckets>>,
    quotas: Vec<Mutex<HashMap<[u8; PUBLIC_ID_LEN], QuotaState>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            tats: (0..SHARDS).map(|_| RwLock::new(Buckets::default())).collect(),
            quotas: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
        }
    }
}

impl Limiter {
    /// Checks and, if allowed, takes one request from the bucket of `limit` for `(id, scope)`.
    /// `scope` is 0 for the token's own limit, or a route index + 1.
    pub fn check_rate(&self, id: &[u8; PUBLIC_ID_LEN], scope: u32, limit: &RateLimit, now_us: i64) -> GcraDecision {
        self.with_cell(id, scope, now_us, |cell| cas(cell, limit, now_us))
    }

    /// Takes `cost` requests at once from the bucket of `(id, scope)`, if all of them fit (for
    /// verifications that count a cost).
    pub fn check_rate_cost(
        &self,
        id: &[u8; PUBLIC_ID_LEN],
        scope: u32,
        limit: &RateLimit,
        now_us: i64,
        cost: u32,
    ) -> GcraDecision {
        self.with_cell(id, scope, now_us, |cell| Self::check_cell_cost(cell, limit, now_us, cost))
    }

    /// Settles a cost taken before it was known: `delta` more units (or fewer, when negative)
    /// than were taken, from the bucket of `(id, scope)`. More is taken even beyond the
    /// bucket (the debt delays the next requests); fewer gives back, never beyond a full bucket.
    pub fn settle_cost(&self, id: &[u8; PUBLIC_ID_LEN], scope: u32, limit: &RateLimit, now_us: i64, delta: i64) {
        if delta == 0 {
            return;
        }
        let t = limit.emission_interval_us();
        self.with_cell(id, scope, now_us, |cell| {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(if delta > 0 {
                    tat.max(now_us).saturating_add(t.saturating_mul(delta))
                } else {
                    tat.saturating_add(t.saturating_mul(delta)).max(now_us)
                })
            });
        });
    }

    /// Runs `f` on the bucket of `(id, scope)`, made if new (the overflow bucket of the scope
    /// when the shard is full).
    fn with_cell<R>(&self, id: &[u8; PUBLIC_ID_LEN], scope: u32, now_us: i64, f: impl FnOnce(&AtomicI64) -> R) -> R {
        let Some(shard) = self.tats.get(shard_of(id)) else { return f(&AtomicI64::new(0)) };
        let mut key = (*id, scope);
        if let Some(cell) = shard.read().map.get(&key) {
            return f(cell);
        }
        let mut b = shard.write();
        if b.map.len() >= SHARD_CAPACITY && !b.map.contains_key(&key) {
            // Full: drop the buckets at rest (at most once a second), else share the overflow
            // bucket of the route: limits stay in force, and memory stays bounded.
            if now_us.saturating_sub(b.pruned_at_us) >= 1_000_000 {
                b.pruned_at_us = now_us;
                b.map.retain(|_, tat| tat.load(Ordering::Acquire) > now_us);
            }
            if b.map.len() >= SHARD_CAPACITY {
                key = (OVERFLOW, scope);
            }
        }
        let cell = b.map.entry(key).or_insert_with(|| AtomicI64::new(0));
        f(cell)
    }

    /// Checks and, if allowed, takes one request from the bucket whose state is `cell` (a token's
    /// own limit keeps its state in its index entry).
    pub fn check_cell(cell: &AtomicI64, limit: &RateLimit, now_us: i64) -> GcraDecision {
        cas(cell, limit, now_us)
    }

    /// Counts one request against `quota` for token `id` if it fits.
    pub fn check_quota(&self, id: &[u8; PUBLIC_ID_LEN], quota: &Quota, now_ms: i64) -> QuotaDecision {
        self.check_quota_cost(id, quota, now_ms, 1)
    }

    /// Counts `cost` requests against `quota` for token `id` if all of them fit (a cost of 0
    /// counts nothing and only reads).
    pub fn check_quota_cost(&self, id: &[u8; PUBLIC_ID_LEN], quota: &Quota, now_ms: i64, cost: u64) -> QuotaDecision {
        let (start, end) = quota.period.window(now_ms);
        let reset_after_ms = if end == i64::MAX { i64::MAX } else { end - now_ms };
        let Some(mut map) = self.quotas.get(shard_of(id)).map(Mutex::lock) else {
            return QuotaDecision { allowed: true, remaining: quota.requests, reset_after_ms };
        };
        let st = map.entry(*id).or_default();
        if st.period_start != start {
            st.period_start = start;
            st.count = 0;
        }
        st.period_end = Some(end);
        let left = quota.requests.saturating_sub(st.count);
        if cost > left {
            return QuotaDecision { allowed: false, remaining: left, reset_after_ms };
        }
        st.count += cost;
        st.unflushed += cost;
        QuotaDecision { allowed: true, remaining: quota.requests.saturating_sub(st.count), reset_after_ms }
    }

    /// Counts one request against `quota` for token `id` without checking it (the shared count
    /// decided): this node's count, written to the store with usage.
    pub fn count_quota(&self, id: &[u8; PUBLIC_ID_LEN], quota: &Quota, now_ms: i64) {
        self.count_quota_cost(id, quota, now_ms, 1);
    }

    /// Counts `cost` requests of `quota` without deciding (the shared count decided).
    pub fn count_quota_cost(&self, id: &[u8; PUBLIC_ID_LEN], quota: &Quota, now_ms: i64, cost: u64) {
        let unbounded = Quota { requests: u64::MAX, period: quota.period };
        self.check_quota_cost(id, &unbounded, now_ms, cost);
    }

    /// The count this node knows for token `id` in the period that starts at `period_start`
    /// (loaded from the store at start, plus what it counted since).
    pub fn quota_count(&self, id: &[u8; PUBLIC_ID_LEN], period_start: i64) -> u64 {
        let Some(map) = self.quotas.get(shard_of(id)).map(Mutex::lock) else { return 0 };
        map.get(id).filter(|st| st.period_start == period_start).map_or(0, |st| st.count)
    }

    /// Takes `cost` requests from the bucket whose state is `cell` if all of them fit.
    pub fn check_cell_cost(cell: &AtomicI64, limit: &RateLimit, now_us: i64, cost: u32) -> GcraDecision {
        let mut tat = cell.load(Ordering::Acquire);
        loop {
            let d = limit.gcra_cost(tat, now_us, cost);
            if !d.allowed || d.new_tat == tat {
                return d;
            }
            match cell.compare_exchange_weak(tat, d.new_tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return d,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Loads stored counts (at start).
    pub fn load_quota_counts(&self, counts: &[QuotaCount]) {
        for c in counts {
            let Some(public) = c.token_id.as_str().strip_prefix("tok_") else { continue };
            let Ok(id) = <[u8; PUBLIC_ID_LEN]>::try_from(public.as_bytes()) else { continue };
            if let Some(mut map) = self.quotas.get(shard_of(&id)).map(Mutex::lock) {
                map.insert(
                    id,
                    QuotaState { period_start: c.period_start, period_end: None, count: c.count, unflushed: 0 },
                );
            }
        }
    }

    /// Takes the counts added since the last call, as deltas to add to the store.
    pub fn take_quota_deltas(&self) -> Vec<QuotaCount> {
        let mut out = Vec::new();
        for shard in &self.quotas {
            let mut map = shard.lock();
            for (id, st) in map.iter_mut().filter(|(_, st)| st.unflushed > 0) {
                out.push(QuotaCount {
                    token_id: TokenId::from_public_id(std::str::from_utf8(id).unwrap_or_default()),
                    period_start: st.period_start,
                    count: st.unflushed,
                });
                st.unflushed = 0;
            }
        }
        out
    }
}

fn cas(cell: &AtomicI64, limit: &RateLimit, now_us: i64) -> GcraDecision {
    let mut tat = cell.load(Ordering::Acquire);
    loop {
        let d = limit.gcra(tat, now_us);
        if !d.allowed {
            return d;
        }
        match cell.compare_exchange_weak(tat, d.new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return d,
            Err(actual) => tat = actual,
        }
    }
}

impl Limiter {
    /// Puts deltas back after a failed flush.
    pub fn restore_quota_deltas(&self, deltas: &[QuotaCount]) {
        for c in deltas {
            let Some(public) = c.token_id.as_str().strip_prefix("tok_") else { continue };
            let Ok(id) = <[u8; PUBLIC_ID_LEN]>::try_from(public.as_bytes()) else { continue };
            if let Some(mut map) = self.quotas.get(shard_of(&id)).map(Mutex::lock)
                && let Some(st) = map.get_mut(&id)
                && st.period_start == c.period_start
            {
                st.unflushed += c.count;
            }
        }
    }
}

impl Limiter {
    /// Drops what no longer tells anything: route buckets back at rest at `now_ms` (a full
    /// bucket is what a missing entry means) and flushed quota counts of ended periods. Returns
    /// how many entries went. One pass per shard, each under its own lock.
    pub fn prune(&self, now_ms: i64) -> usize {
        let now_us = now_ms.saturating_mul(1000);
        let mut gone = 0;
        for shard in &self.tats {
            let mut b = shard.write();
            let before = b.map.len();
            b.map.retain(|_, tat| tat.load(Ordering::Acquire) > now_us);
            gone += before - b.map.len();
        }
        for shard in &self.quotas {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, st| !st.at_rest(now_ms));
            gone += before - map.len();
        }
        gone
    }

    /// Route buckets and quota counts held, for tests.
    pub fn len(&self) -> (usize, usize) {
        (self.tats.iter().map(|s| s.read().map.len()).sum(), self.quotas.iter().map(|s| s.lock().len()).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// Shared handle.
pub type SharedLimiter = Arc<Limiter>;

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::policy::QuotaPeriod;

    #[test]
    fn rate_limits_are_per_token_and_route() {
        let l = Limiter::default();
        let rl = RateLimit { requests: 2, per_seconds: 1, burst: 0 };
        let a = *b"aaaaaaaaaaaa";
        let b = *b"bbbbbbbbbbbb";
        assert!(l.check_rate(&a, 0, &rl, 0).allowed);
        assert!(l.check_rate(&a, 0, &rl, 0).allowed);
        assert!(!l.check_rate(&a, 0, &rl, 0).allowed);
        assert!(l.check_rate(&b, 0, &rl, 0).allowed, "another token has its own bucket");
        assert!(l.check_rate(&a, 3, &rl, 0).allowed, "a route limit has its own bucket");
        assert!(l.check_rate(&a, 0, &rl, 500_000).allowed, "refilled after half a second");
    }

    #[test]
    fn costs_take_several_requests_or_none() {
        let l = Limiter::default();
        let q = Quota { requests: 10, period: QuotaPeriod::Total };
        let a = *b"aaaaaaaaaaaa";
        assert_eq!(l.check_quota_cost(&a, &q, 0, 4).remaining, 6);
        let peek = l.check_quota_cost(&a, &q, 0, 0);
        assert!(peek.allowed && peek.remaining == 6, "a cost of 0 only reads");
        let refused = l.check_quota_cost(&a, &q, 0, 7);
        assert!(!refused.allowed && refused.remaining == 6, "a refused cost counts nothing");
        assert!(l.check_quota(&a, &q, 0).allowed, "cost and plain checks share the count");
        assert_eq!(l.take_quota_deltas().first().map(|c| c.count), Some(5));
        let cell = AtomicI64::new(0);
        let rl = RateLimit { requests: 5, per_seconds: 1, burst: 0 };
        assert_eq!(Limiter::check_cell_cost(&cell, &rl, 1_000_000, 3).remaining, 2);
        assert!(!Limiter::check_cell_cost(&cell, &rl, 1_000_000, 3).allowed);
        assert!(Limiter::check_cell(&cell, &rl, 1_000_000).allowed, "the same bucket as the gateway's");
    }

    #[test]
    fn settled_costs_give_back_or_take_more() {
        let l = Limiter::default();
        let rl = RateLimit { requests: 100, per_seconds: 60, burst: 0 };
        let a = *b"aaaaaaaaaaaa";
        let now = 1_000_000_000;
        // Estimated at 90, used 5: three calls fit in 100 because each gives 85 back.
        for _ in 0..3 {
            assert!(l.check_rate_cost(&a, 1, &rl, now, 90).allowed);
            l.settle_cost(&a, 1, &rl, now, 5 - 90);
        }
        assert_eq!(l.check_rate_cost(&a, 1, &rl, now, 0).remaining, 85);
        // Giving back never fills beyond the bucket.
        l.settle_cost(&a, 1, &rl, now, -1000);
        assert_eq!(l.check_rate_cost(&a, 1, &rl, now, 0).remaining, 100);
        // Using more than estimated is debt: beyond the bucket, it delays the next call.
        assert!(l.check_rate_cost(&a, 1, &rl, now, 100).allowed);
        l.settle_cost(&a, 1, &rl, now, 50);
        assert!(!l.check_rate_cost(&a, 1, &rl, now + 20_000_000, 1).allowed, "still in debt after 20 s");
        assert!(l.check_rate_cost(&a, 1, &rl, now + 31_000_000, 1).allowed, "the debt of 50 is paid in 30 s");
    }

    #[test]
    fn buckets_at_rest_and_ended_quota_periods_are_pruned() {
        let l = Limiter::default();
        let rl = RateLimit { requests: 1, per_seconds: 1, burst: 0 };
        let q = Quota { requests: 5, period: QuotaPeriod::Day };
        let day = 86_400_000;
        for i in 0..100u8 {
            let id = [b'a' + i % 26, b'a' + i / 26, b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x'];
            assert!(l.check_rate(&id, 7, &rl, day * 1000).allowed);
            assert!(l.check_quota(&id, &q, day).allowed);
        }
        l.load_quota_counts(&[
            QuotaCount { token_id: TokenId::from_public_id("loadedtotal1"), period_start: 0, count: 3 },
            QuotaCount { token_id: TokenId::from_public_id("loadedoldday"), period_start: day, count: 3 },
        ]);
        assert_eq!(l.len(), (100, 102));
        assert_eq!(l.prune(day), 0, "buckets in use and unflushed counts stay");
        l.take_quota_deltas();
        // A second later every bucket is full again; a month later the day has ended.
        assert_eq!(l.prune(day + 1000), 100);
        assert_eq!(l.len(), (0, 102));
        assert_eq!(l.prune(day * 40), 101);
        assert_eq!(l.len(), (0, 1), "a loaded total count is kept");
        assert!(!l.check_quota(b"loadedtotal1", &Quota { requests: 3, period: QuotaPeriod::Total }, day * 40).allowed);
    }

    #[test]
    fn a_full_shard_shares_an_overflow_bucket() {
        let l = Limiter::default();
        let rl = RateLimit { requests: 1, per_seconds: 3600, burst: 0 };
        // Fill one shard with callers whose buckets are in use.
        let mut n = 0u64;
        let mut in_shard = Vec::new();
        while in_shard.len() < SHARD_CAPACITY + 2 {
            let mut id = [b'0'; PUBLIC_ID_LEN];
            let text = format!("{n:012}");
            id.copy_from_slice(text.as_bytes());
            n += 1;
            if shard_of(&id) == 0 {
                in_shard.push(id);
            }
        }
        for id in in_shard.iter().take(SHARD_CAPACITY) {
            assert!(l.check_rate(id, 1, &rl, 0).allowed);
        }
        let (a, b) = (in_shard[SHARD_CAPACITY], in_shard[SHARD_CAPACITY + 1]);
        assert!(l.check_rate(&a, 1, &rl, 0).allowed, "the first caller past the bound");
        assert!(!l.check_rate(&b, 1, &rl, 0).allowed, "shares its bucket with the next: the limit holds");
        assert_eq!(l.len().0, SHARD_CAPACITY + 1);
    }

    #[test]
    fn quotas_count_per_period_and_flush_deltas() {
        let l = Limiter::default();
        let q = Quota { requests: 2, period: QuotaPeriod::Day };
        let a = *b"aaaaaaaaaaaa";
        assert_eq!(l.check_quota(&a, &q, 1000).remaining, 1);
        assert!(l.check_quota(&a, &q, 1000).allowed);
        let refused = l.check_quota(&a, &q, 1000);
        assert!(!refused.allowed);
        assert_eq!(refused.reset_after_ms, 86_400_000 - 1000);
        let deltas = l.take_quota_deltas();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].count, 2);
        assert!(l.take_quota_deltas().is_empty());
        assert!(l.check_quota(&a, &q, 86_400_000).allowed, "a new day starts over");
        let l2 = Limiter::default();
        l2.load_quota_counts(&[QuotaCount {
            token_id: TokenId::from_public_id("aaaaaaaaaaaa"),
            period_start: 0,
            count: 2,
        }]);
        assert!(!l2.check_quota(&a, &q, 5).allowed, "loaded counts apply after a restart");
    }
}
