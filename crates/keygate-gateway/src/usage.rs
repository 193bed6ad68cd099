//! The usage meter: per token, route and minute, requests by status class, bytes in and out and
//! a latency histogram, counted in memory and flushed to the store in the background (and on
//! graceful shutdown, so that after N requests the usage says N).

use std::collections::HashMap as StdHashMap;
use std::sync::{Arc, Mutex};

use keygate_core::Timestamp;
use keygate_core::ids::{TokenId, WorkspaceId};
use keygate_core::model::{LATENCY_BUCKETS_MS, LastUse, UsageRecord};
use keygate_core::token_format::PUBLIC_ID_LEN;

const SHARDS: usize = 16;

/// Keys are public ids of tokens that passed verification (chosen by the issuer, not by a
/// caller), so a fast keyed hash is enough; per-map random seeds keep it unpredictable anyway.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

type Key = ([u8; PUBLIC_ID_LEN], usize, i64);

/// One finished request, as the meter counts it.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub public_id: &'a [u8; PUBLIC_ID_LEN],
    pub workspace_id: &'a str,
    pub route_index: usize,
    pub route_id: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us: u64,
    pub at: Timestamp,
    pub client_ip: std::net::IpAddr,
}

#[derive(Default)]
struct Shard {
    usage: HashMap<Key, UsageRecord>,
    last_used: HashMap<[u8; PUBLIC_ID_LEN], (Timestamp, std::net::IpAddr)>,
}

/// Counts usage until [`UsageMeter::drain`] takes it.
pub struct UsageMeter {
    shards: Vec<Mutex<Shard>>,
}

impl Default for UsageMeter {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect() }
    }
}

fn shard_of(public_id: &[u8; PUBLIC_ID_LEN]) -> usize {
    public_id.iter().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(usize::from(*b))) % SHARDS
}

fn bucket(latency_us: u64) -> usize {
    let ms = latency_us / 1000;
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms < *b || (ms == *b && latency_us.is_multiple_of(1000)))
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

impl UsageMeter {
    pub fn record(&self, s: &Sample<'_>) {
        let shard_no = shard_of(s.public_id);
        let Some(Ok(mut shard)) = self.shards.get(shard_no).map(Mutex::lock) else { return };
        let minute = s.at.as_millis().div_euclid(60_000) * 60_000;
        let rec = shard.usage.entry((*s.public_id, s.route_index, minute)).or_insert_with(|| UsageRecord {
            token_id: TokenId::from_public_id(std::str::from_utf8(s.public_id).unwrap_or_default()),
            workspace_id: WorkspaceId::from_trusted(s.workspace_id.to_owned()),
            route: s.route_id.to_owned(),
            minute: Timestamp::from_millis(minute),
            ..UsageRecord::default()
        });
        rec.requests += 1;
        if let Some(class) = rec.status.get_mut(usize::from((s.status / 100).clamp(2, 5) - 2)) {
            *class += 1;
        }
        rec.bytes_in += s.bytes_in;
        rec.bytes_out += s.bytes_out;
        rec.latency_us_sum += s.latency_us;
        if let Some(b) = rec.latency.get_mut(bucket(s.latency_us)) {
            *b += 1;
        }
        let last = shard.last_used.entry(*s.public_id).or_insert((s.at, s.client_ip));
        if s.at >= last.0 {
            *last = (s.at, s.client_ip);
        }
    }

    /// A copy of what is counted for one token and not flushed yet (the dashboard shows live
    /// usage by adding this to what the store holds).
    pub fn peek(&self, public_id: &[u8; PUBLIC_ID_LEN]) -> Vec<UsageRecord> {
        let Some(Ok(shard)) = self.shards.get(shard_of(public_id)).map(Mutex::lock) else { return Vec::new() };
        shard.usage.iter().filter(|(k, _)| k.0 == *public_id).map(|(_, v)| v.clone()).collect()
    }

    /// Takes everything counted so far.
    pub fn drain(&self) -> (Vec<UsageRecord>, Vec<LastUse>) {
        self.drain_before(i64::MAX, true)
    }

    /// Takes the minutes that started before `minute_ms` (finished minutes: each row then
    /// reaches the store once, not once per flush), and `last_used` if `with_last_used`.
    pub fn drain_before(&self, minute_ms: i64, with_last_used: bool) -> (Vec<UsageRecord>, Vec<LastUse>) {
        let mut usage = Vec::new();
        let mut last = Vec::new();
        for shard in &self.shards {
            let Ok(mut s) = shard.lock() else { continue };
            if minute_ms == i64::MAX {
                usage.extend(s.usage.drain().map(|(_, v)| v));
            } else {
                let done: Vec<Key> = s.usage.keys().filter(|k| k.2 < minute_ms).copied().collect();
                usage.extend(done.iter().filter_map(|k| s.usage.remove(k)));
            }
            if !with_last_used {
                continue;
            }
            last.extend(s.last_used.drain().map(|(id, (at, ip))| LastUse {
                token_id: TokenId::from_public_id(std::str::from_utf8(&id).unwrap_or_default()),
                at,
                ip: ip.to_string(),
            }));
        }
        (usage, last)
    }

    /// Puts counts back after a failed flush, so nothing is lost.
    pub fn restore(&self, usage: Vec<UsageRecord>, last: Vec<LastUse>) {
        let Some(Ok(mut shard)) = self.shards.first().map(Mutex::lock) else { return };
        for u in usage {
            let id: [u8; PUBLIC_ID_LEN] = u
                .token_id
                .as_str()
                .strip_prefix("tok_")
                .and_then(|p| p.as_bytes().try_into().ok())
                .unwrap_or([b'0'; PUBLIC_ID_LEN]);
            // A restored record keeps its own key space: route index usize::MAX - hash of route.
            let key = (id, usize::MAX - u.route.len(), u.minute.as_millis());
            shard.usage.entry(key).and_modify(|r| r.add(&u)).or_insert(u);
        }
        for l in last {
            if let Some(id) = l
                .token_id
                .as_str()
                .strip_prefix("tok_")
                .and_then(|p| <[u8; PUBLIC_ID_LEN]>::try_from(p.as_bytes()).ok())
                && let Ok(ip) = l.ip.parse()
            {
                shard.last_used.insert(id, (l.at, ip));
            }
        }
    }
}

pub type SharedMeter = Arc<UsageMeter>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_token_route_and_minute() {
        let m = UsageMeter::default();
        let id = *b"abcdefghijkl";
        let mut s = Sample {
            public_id: &id,
            workspace_id: "ws_1",
            route_index: 0,
            route_id: "orders",
            status: 200,
            bytes_in: 10,
            bytes_out: 100,
            latency_us: 1500,
            at: Timestamp::from_millis(60_000),
            client_ip: "10.0.0.1".parse().unwrap(),
        };
        m.record(&s);
        s.status = 503;
        s.latency_us = 2_000_000;
        m.record(&s);
        s.at = Timestamp::from_millis(120_000);
        m.record(&s);
        let (usage, last) = m.drain();
        assert_eq!(usage.len(), 2);
        let first = usage.iter().find(|u| u.minute.as_millis() == 60_000).unwrap();
        assert_eq!(first.requests, 2);
        assert_eq!(first.status, [1, 0, 0, 1]);
        assert_eq!(first.latency[1], 1, "1.5 ms is in the ≤5 ms bucket");
        assert_eq!(first.latency[9], 1);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].at.as_millis(), 120_000);
        assert!(m.drain().0.is_empty());
    }

    #[test]
    fn finished_minutes_drain_first() {
        let m = UsageMeter::default();
        let id = *b"abcdefghijkl";
        for at in [60_000, 125_000] {
            m.record(&Sample {
                public_id: &id,
                workspace_id: "ws_1",
                route_index: 0,
                route_id: "r",
                status: 200,
                bytes_in: 0,
                bytes_out: 0,
                latency_us: 10,
                at: Timestamp::from_millis(at),
                client_ip: "10.0.0.1".parse().unwrap(),
            });
        }
        let (done, last) = m.drain_before(120_000, false);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].minute.as_millis(), 60_000);
        assert!(last.is_empty());
        let (rest, last) = m.drain();
        assert_eq!(rest.len(), 1, "the running minute stays until asked for");
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(999), 0);
        assert_eq!(bucket(1000), 0);
        assert_eq!(bucket(1001), 1);
        assert_eq!(bucket(5_000_000), 9);
    }
}
