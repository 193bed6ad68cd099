//! [`SharedLimits`] on Redis: each bucket or quota count is one key, changed by one Lua script
//! per call (atomic on the server, one round trip). Key names carry a hash tag on the token's
//! public id (`{<prefix>:<id>}:…`), so a token's keys share one Redis Cluster slot. The caller
//! passes the time; nodes' clocks are expected to agree (NTP) — a skew of δ lets through δ's
//! worth of a bucket's rate at most.

use std::time::Duration;

use async_trait::async_trait;
use keygate_core::limits::{QuotaGrant, RateGrant, SharedLimits};
use keygate_core::policy::RateLimit;
use keygate_core::{Error, Result};
use redis::aio::ConnectionManager;

/// GCRA, returning unused requests first, then taking as many of `want` as fit.
/// KEYS[1]: the bucket (its theoretical arrival time, microseconds).
/// ARGV: now, emission interval T, tolerance tau = T × (capacity − 1), refund, want, force.
/// Returns {granted, remaining, reset_after, retry_after}.
const GCRA: &str = r"
local now = tonumber(ARGV[1])
local t = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local refund = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
tat = tat - refund * t
if tat < now then tat = now end
tat = tat + tonumber(ARGV[6]) * t
local fits = math.floor((now + tau + t - tat) / t)
if fits < 0 then fits = 0 end
local granted = want
if fits < granted then granted = fits end
local new_tat = tat + granted * t
if new_tat > now then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
local remaining = math.floor((now + tau + t - new_tat) / t)
local retry = 0
if granted == 0 then retry = tat - tau - now end
return {granted, remaining, new_tat - now, retry}
";

/// A quota's count for one period: gives back `refund`, then counts up to `want` more under
/// `limit`. KEYS[1]: the count. ARGV: limit, refund, want, init (the count if the key is new),
/// expire_at (ms since the epoch), force (counted whatever the limit). Returns {granted, count}.
const QUOTA: &str = r"
local limit = tonumber(ARGV[1])
local refund = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local c = tonumber(redis.call('GET', KEYS[1]) or ARGV[4])
c = c - refund
if c < 0 then c = 0 end
c = c + tonumber(ARGV[6])
local granted = limit - c
if granted > want then granted = want end
if granted < 0 then granted = 0 end
c = c + granted
redis.call('SET', KEYS[1], string.format('%d', c), 'PXAT', ARGV[5])
return {granted, c}
";

/// Attempts under several keys at once (sign-in throttling): refused, counting nothing, if any
/// key is at its limit; else each is counted, a new one expiring after the window.
/// KEYS: the counters. ARGV[1]: the window (ms); ARGV[1 + i]: the limit of KEYS[i].
const ATTEMPT: &str = r"
for i, k in ipairs(KEYS) do
  local c = tonumber(redis.call('GET', k) or '0')
  if c >= tonumber(ARGV[i + 1]) then return 0 end
end
for i, k in ipairs(KEYS) do
  if redis.call('INCR', k) == 1 then redis.call('PEXPIRE', k, ARGV[1]) end
end
return 1
";

/// Gives back one attempt under each key that still counts.
const GIVE_BACK: &str = r"
for i, k in ipairs(KEYS) do
  local c = tonumber(redis.call('GET', k) or '0')
  if c > 0 then redis.call('DECR', k) end
end
return 1
";

/// Redis as keygate's shared limit state.
pub struct RedisLimits {
    conn: ConnectionManager,
    gcra: redis::Script,
    quota: redis::Script,
    attempt: redis::Script,
    give_back: redis::Script,
    shown: String,
}

fn unavailable(e: &redis::RedisError) -> Error {
    Error::new(keygate_core::ErrorKind::Unavailable, "redis_unavailable", format!("Redis did not answer: {e}"))
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl RedisLimits {
    /// As [`Self::connect`], but a Redis that does not answer yet is not an error: the first
    /// calls fail (the caller decides alone meanwhile) and the connection is made again on use.
    /// Only a URL that is not one is refused.
    pub async fn connect_lazily(url: &str, connect_timeout: Duration) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid("invalid_redis_url", format!("redis.url is not a Redis URL: {e}")))?;
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config(connect_timeout))
            .map_err(|e| unavailable(&e))?;
        let me = Self::with(conn, url);
        match tokio::time::timeout(connect_timeout, me.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(redis = %me.shown, error = %e, "Redis does not answer yet; limits are decided per node until it does")
            }
            Err(_) => {
                tracing::warn!(redis = %me.shown, "Redis does not answer yet; limits are decided per node until it does")
            }
        }
        Ok(me)
    }

    /// Connects (`redis://`, or `rediss://` for TLS; user and password in the URL). The
    /// connection reconnects by itself; calls fail fast while Redis is gone.
    pub async fn connect(url: &str, connect_timeout: Duration) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::invalid("invalid_redis_url", format!("redis.url is not a Redis URL: {e}")))?;
        let conn = tokio::time::timeout(
            connect_timeout,
            ConnectionManager::new_with_config(client, manager_config(connect_timeout)),
        )
        .await
        .map_err(|_| {
            Error::new(
                keygate_core::ErrorKind::Unavailable,
                "redis_unavailable",
                format!("Redis at {} did not answer", redact(url)),
            )
        })?
        .map_err(|e| unavailable(&e))?;
        Ok(Self::with(conn, url))
    }

    fn with(conn: ConnectionManager, url: &str) -> Self {
        Self {
            conn,
            gcra: redis::Script::new(GCRA),
            quota: redis::Script::new(QUOTA),
            attempt: redis::Script::new(ATTEMPT),
            give_back: redis::Script::new(GIVE_BACK),
            shown: redact(url),
        }
    }
}

fn manager_config(connect_timeout: Duration) -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
}

fn to_i64(v: &[i64], i: usize) -> i64 {
    v.get(i).copied().unwrap_or(0)
}

#[async_trait]
impl SharedLimits for RedisLimits {
    async fn take_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        refund: u32,
        force: u32,
        want: u32,
        now_us: i64,
    ) -> Result<RateGrant> {
        let t = limit.emission_interval_us();
        let capacity = i64::try_from(limit.capacity()).unwrap_or(i64::MAX).max(1);
        let tau = t.saturating_mul(capacity - 1);
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .gcra
            .key(key)
            .arg(now_us)
            .arg(t)
            .arg(tau)
            .arg(refund)
            .arg(want)
            .arg(force)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(RateGrant {
            granted: u32::try_from(to_i64(&v, 0)).unwrap_or(0),
            remaining: u64::try_from(to_i64(&v, 1)).unwrap_or(0),
            reset_after_us: to_i64(&v, 2).max(0),
            retry_after_us: to_i64(&v, 3).max(0),
        })
    }

    async fn take_quota(
        &self,
        key: &str,
        limit: u64,
        refund: u64,
        force: u64,
        want: u64,
        init: u64,
        expire_at_ms: i64,
    ) -> Result<QuotaGrant> {
        let mut conn = self.conn.clone();
        let v: Vec<i64> = self
            .quota
            .key(key)
            .arg(limit)
            .arg(refund)
            .arg(want)
            .arg(init)
            .arg(expire_at_ms)
            .arg(force)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(QuotaGrant {
            granted: u64::try_from(to_i64(&v, 0)).unwrap_or(0),
            count: u64::try_from(to_i64(&v, 1)).unwrap_or(0),
        })
    }

    async fn attempt(&self, keys: &[(&str, u32)], window_ms: i64) -> Result<bool> {
        let mut call = self.attempt.prepare_invoke();
        call.arg(window_ms);
        for (k, limit) in keys {
            call.key(*k).arg(*limit);
        }
        let mut conn = self.conn.clone();
        let ok: i64 = call.invoke_async(&mut conn).await.map_err(|e| unavailable(&e))?;
        Ok(ok == 1)
    }

    async fn give_back(&self, keys: &[&str]) -> Result<()> {
        let mut call = self.give_back.prepare_invoke();
        for k in keys {
            call.key(*k);
        }
        let mut conn = self.conn.clone();
        let _: i64 = call.invoke_async(&mut conn).await.map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn first_use(&self, key: &str, ttl_ms: i64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(set.is_some())
    }

    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| unavailable(&e))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> String {
        std::env::var("KEYGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn key(name: &str) -> String {
        let mut b = [0u8; 8];
        keygate_core::secret::Randomness::fill(&keygate_core::secret::OsRandom, &mut b).unwrap();
        format!("{{kgtest:{}}}:{name}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redact("redis://:s3cret@cache:6379/0"), "redis://…@cache:6379/0");
        assert_eq!(redact("rediss://user:pw@h"), "rediss://…@h");
        assert_eq!(redact("redis://cache:6379"), "redis://cache:6379");
    }

    /// The script is GCRA: the same answers as the in-memory maths, partial grants, refunds.
    #[tokio::test]
    async fn the_shared_bucket_grants_what_fits_and_takes_back_refunds() {
        let r = RedisLimits::connect(&url(), Duration::from_secs(2)).await.expect("Redis must run for this test");
        let k = key("t");
        let rl = RateLimit { requests: 10, per_seconds: 1, burst: 0 };
        let now = 1_900_000_000_000_000i64;
        let g = r.take_rate(&k, &rl, 0, 0, 4, now).await.unwrap();
        assert_eq!((g.granted, g.remaining), (4, 6));
        assert_eq!(g.remaining, rl.gcra_cost(0, now, 4).remaining, "the same maths as the local limiter");
        let g = r.take_rate(&k, &rl, 0, 0, 8, now).await.unwrap();
        assert_eq!((g.granted, g.remaining), (6, 0), "only what fits");
        let g = r.take_rate(&k, &rl, 0, 0, 1, now).await.unwrap();
        assert_eq!(g.granted, 0);
        assert_eq!(g.retry_after_us, 100_000, "one request fits after one emission interval");
        let g = r.take_rate(&k, &rl, 3, 0, 1, now).await.unwrap();
        assert_eq!((g.granted, g.remaining), (1, 2), "three given back, one taken");
        let g = r.take_rate(&k, &rl, 0, 0, 10, now + 1_000_000).await.unwrap();
        assert_eq!(g.granted, 10, "a second later the bucket is full again");

        let q = key("q");
        let end = now / 1000 + 60_000;
        let g = r.take_quota(&q, 5, 0, 0, 3, 1, end).await.unwrap();
        assert_eq!((g.granted, g.count), (3, 4), "a new count starts from what the store knew");
        let g = r.take_quota(&q, 5, 0, 0, 3, 0, end).await.unwrap();
        assert_eq!((g.granted, g.count), (1, 5));
        let g = r.take_quota(&q, 5, 2, 0, 3, 0, end).await.unwrap();
        assert_eq!((g.granted, g.count), (2, 5), "two given back, two taken");
        // Attempts: all or nothing across keys; given back on success.
        let (a, b) = (key("a"), key("b"));
        assert!(r.attempt(&[(&a, 2), (&b, 5)], 60_000).await.unwrap());
        assert!(r.attempt(&[(&a, 2), (&b, 5)], 60_000).await.unwrap());
        assert!(!r.attempt(&[(&a, 2), (&b, 5)], 60_000).await.unwrap(), "a is at its limit");
        assert!(r.attempt(&[(&b, 5)], 60_000).await.unwrap(), "b counted only the two that passed");
        r.give_back(&[&a]).await.unwrap();
        assert!(r.attempt(&[(&a, 2)], 60_000).await.unwrap(), "one given back");
        // One-time values: the first use only.
        let once = key("once");
        assert!(r.first_use(&once, 60_000).await.unwrap());
        assert!(!r.first_use(&once, 60_000).await.unwrap(), "a replay");
        let mut c = r.conn.clone();
        let _: () = redis::cmd("DEL").arg(&k).arg(&q).arg(&a).arg(&b).arg(&once).query_async(&mut c).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_a_clear_error() {
        let Err(e) = RedisLimits::connect("redis://127.0.0.1:1", Duration::from_millis(500)).await else {
            panic!("connected to nothing")
        };
        assert_eq!(e.code, "redis_unavailable", "{e}");
        let Err(e) = RedisLimits::connect("http://x", Duration::from_millis(500)).await else { panic!() };
        assert_eq!(e.code, "invalid_redis_url");
    }
}
