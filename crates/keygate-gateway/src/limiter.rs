//! Per-token rate limits (GCRA, one compare-and-swap per request) and quotas (a count per
//! calendar period), held in memory. Quota counts are flushed to the store with usage and
//! loaded at start, so they survive a restart; a crash loses at most one flush interval.

use std::collections::HashMap as StdHashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use keygate_core::ids::TokenId;
use keygate_core::model::QuotaCount;
use keygate_core::policy::{GcraDecision, Quota, RateLimit};
use keygate_core::token_format::PUBLIC_ID_LEN;

const SHARDS: usize = 16;

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
    count: u64,
    /// Counted since the last flush.
    unflushed: u64,
}

/// Rate-limit and quota state of every token seen.
pub struct Limiter {
    /// Key: (token public id, route index + 1, or 0 for the token's own limit).
    tats: Vec<RwLock<HashMap<Key, AtomicI64>>>,
    quotas: Vec<Mutex<HashMap<[u8; PUBLIC_ID_LEN], QuotaState>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            tats: (0..SHARDS).map(|_| RwLock::new(HashMap::default())).collect(),
            quotas: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
        }
    }
}

impl Limiter {
    /// Checks and, if allowed, takes one request from the bucket of `limit` for `(id, scope)`.
    /// `scope` is 0 for the token's own limit, or a route index + 1.
    pub fn check_rate(&self, id: &[u8; PUBLIC_ID_LEN], scope: u32, limit: &RateLimit, now_us: i64) -> GcraDecision {
        let Some(shard) = self.tats.get(shard_of(id)) else { return limit.gcra(0, now_us) };
        let key = (*id, scope);
        if let Ok(map) = shard.read()
            && let Some(cell) = map.get(&key)
        {
            return cas(cell, limit, now_us);
        }
        let Ok(mut map) = shard.write() else { return limit.gcra(0, now_us) };
        let cell = map.entry(key).or_insert_with(|| AtomicI64::new(0));
        cas(cell, limit, now_us)
    }

    /// Checks and, if allowed, takes one request from the bucket whose state is `cell` (a token's
    /// own limit keeps its state in its index entry).
    pub fn check_cell(cell: &AtomicI64, limit: &RateLimit, now_us: i64) -> GcraDecision {
        cas(cell, limit, now_us)
    }

    /// Counts one request against `quota` for token `id` if it fits.
    pub fn check_quota(&self, id: &[u8; PUBLIC_ID_LEN], quota: &Quota, now_ms: i64) -> QuotaDecision {
        let (start, end) = quota.period.window(now_ms);
        let reset_after_ms = if end == i64::MAX { i64::MAX } else { end - now_ms };
        let Some(Ok(mut map)) = self.quotas.get(shard_of(id)).map(Mutex::lock) else {
            return QuotaDecision { allowed: true, remaining: quota.requests, reset_after_ms };
        };
        let st = map.entry(*id).or_default();
        if st.period_start != start {
            st.period_start = start;
            st.count = 0;
        }
        if st.count >= quota.requests {
            return QuotaDecision { allowed: false, remaining: 0, reset_after_ms };
        }
        st.count += 1;
        st.unflushed += 1;
        QuotaDecision { allowed: true, remaining: quota.requests - st.count, reset_after_ms }
    }

    /// Loads stored counts (at start).
    pub fn load_quota_counts(&self, counts: &[QuotaCount]) {
        for c in counts {
            let Some(public) = c.token_id.as_str().strip_prefix("tok_") else { continue };
            let Ok(id) = <[u8; PUBLIC_ID_LEN]>::try_from(public.as_bytes()) else { continue };
            if let Some(Ok(mut map)) = self.quotas.get(shard_of(&id)).map(Mutex::lock) {
                map.insert(id, QuotaState { period_start: c.period_start, count: c.count, unflushed: 0 });
            }
        }
    }

    /// Takes the counts added since the last call, as deltas to add to the store.
    pub fn take_quota_deltas(&self) -> Vec<QuotaCount> {
        let mut out = Vec::new();
        for shard in &self.quotas {
            let Ok(mut map) = shard.lock() else { continue };
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
            if let Some(Ok(mut map)) = self.quotas.get(shard_of(&id)).map(Mutex::lock)
                && let Some(st) = map.get_mut(&id)
                && st.period_start == c.period_start
            {
                st.unflushed += c.count;
            }
        }
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
