//! The usage meter: per token, route and minute, requests by status class, bytes in and out and
//! a latency histogram, counted in memory and flushed to the store in the background (and on
//! graceful shutdown, so that after N requests the usage says N).
//!
//! Counts live in one shard per thread (each gateway worker has its own), so a worker's lock
//! and map stay in its own core's cache and the workers never contend; `last_used_at` rides in
//! the same entry, so a request costs one lookup. Shards are merged when usage is drained.

use std::collections::HashMap as StdHashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use keygate_core::Timestamp;
use keygate_core::ids::{TokenId, WorkspaceId};
use keygate_core::model::{LATENCY_BUCKETS_MS, LastUse, UsageRecord};
use keygate_core::token_format::PUBLIC_ID_LEN;

const SHARDS: usize = 8;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// Keys are public ids of tokens that passed verification (chosen by the issuer, not by a
/// caller), so a fast keyed hash is enough; per-map random seeds keep it unpredictable anyway.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

/// (token public id, route position, minute start in ms).
type Key = ([u8; PUBLIC_ID_LEN], usize, i64);

/// One finished request, as the meter counts it.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub public_id: &'a [u8; PUBLIC_ID_LEN],
    pub workspace_id: &'a Arc<str>,
    pub route_index: usize,
    pub route_id: &'a Arc<str>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub latency_us: u64,
    pub at: Timestamp,
    pub client_ip: IpAddr,
}

/// The counts of one token on one route in one minute, and the token's last use seen there
/// since the last drain.
struct Entry {
    workspace_id: Arc<str>,
    route: Arc<str>,
    requests: u64,
    status: [u32; 4],
    bytes_in: u64,
    bytes_out: u64,
    latency_us_sum: u64,
    latency: [u32; 10],
    last_use: Option<(Timestamp, IpAddr)>,
}

impl Entry {
    fn record(&self, key: &Key) -> UsageRecord {
        UsageRecord {
            token_id: TokenId::from_public_id(std::str::from_utf8(&key.0).unwrap_or_default()),
            workspace_id: WorkspaceId::from_trusted(self.workspace_id.to_string()),
            route: self.route.to_string(),
            minute: Timestamp::from_millis(key.2),
            requests: self.requests,
            status: self.status.map(u64::from),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            latency_us_sum: self.latency_us_sum,
            latency: self.latency.map(u64::from),
        }
    }
}

/// One thread's counts, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<HashMap<Key, Entry>>);

/// Counts usage until [`UsageMeter::drain`] takes it.
pub struct UsageMeter {
    shards: Vec<Shard>,
    /// Counts a failed flush gave back, written with the next one.
    restored: Mutex<(Vec<UsageRecord>, Vec<LastUse>)>,
}

impl Default for UsageMeter {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Shard::default()).collect(), restored: Mutex::default() }
    }
}

fn bucket(latency_us: u64) -> usize {
    let ms = latency_us / 1000;
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms < *b || (ms == *b && latency_us.is_multiple_of(1000)))
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

fn last_use(id: &[u8; PUBLIC_ID_LEN], (at, ip): (Timestamp, IpAddr)) -> LastUse {
    LastUse { token_id: TokenId::from_public_id(std::str::from_utf8(id).unwrap_or_default()), at, ip: ip.to_string() }
}

impl UsageMeter {
    pub fn record(&self, s: &Sample<'_>) {
        let Some(Ok(mut map)) = self.shards.get(SHARD.with(|i| *i)).map(|s| s.0.lock()) else { return };
        let minute = s.at.as_millis().div_euclid(60_000) * 60_000;
        let e = map.entry((*s.public_id, s.route_index, minute)).or_insert_with(|| Entry {
            workspace_id: s.workspace_id.clone(),
            route: s.route_id.clone(),
            requests: 0,
            status: [0; 4],
            bytes_in: 0,
            bytes_out: 0,
            latency_us_sum: 0,
            latency: [0; 10],
            last_use: None,
        });
        e.requests += 1;
        if let Some(class) = e.status.get_mut(usize::from((s.status / 100).clamp(2, 5) - 2)) {
            *class += 1;
        }
        e.bytes_in += s.bytes_in;
        e.bytes_out += s.bytes_out;
        e.latency_us_sum += s.latency_us;
        if let Some(b) = e.latency.get_mut(bucket(s.latency_us)) {
            *b += 1;
        }
        if e.last_use.is_none_or(|(at, _)| s.at >= at) {
            e.last_use = Some((s.at, s.client_ip));
        }
    }

    /// A copy of what is counted for one token and not flushed yet (the dashboard shows live
    /// usage by adding this to what the store holds).
    pub fn peek(&self, public_id: &[u8; PUBLIC_ID_LEN]) -> Vec<UsageRecord> {
        let mut out: Vec<UsageRecord> = Vec::new();
        for shard in &self.shards {
            let Ok(map) = shard.0.lock() else { continue };
            out.extend(map.iter().filter(|(k, _)| k.0 == *public_id).map(|(k, e)| e.record(k)));
        }
        if let Ok(r) = self.restored.lock() {
            let id = TokenId::from_public_id(std::str::from_utf8(public_id).unwrap_or_default());
            out.extend(r.0.iter().filter(|u| u.token_id == id).cloned());
        }
        merge(out)
    }

    /// Takes everything counted so far.
    pub fn drain(&self) -> (Vec<UsageRecord>, Vec<LastUse>) {
        self.drain_before(i64::MAX, true)
    }

    /// Takes the minutes that started before `minute_ms` (finished minutes: each row then
    /// reaches the store once, not once per flush), and `last_used` if `with_last_used`.
    pub fn drain_before(&self, minute_ms: i64, with_last_used: bool) -> (Vec<UsageRecord>, Vec<LastUse>) {
        let (mut usage, mut last) = self
            .restored
            .lock()
            .map(|mut r| {
                let last = if with_last_used { std::mem::take(&mut r.1) } else { Vec::new() };
                (std::mem::take(&mut r.0), last)
            })
            .unwrap_or_default();
        let mut latest: HashMap<[u8; PUBLIC_ID_LEN], (Timestamp, IpAddr)> = HashMap::default();
        for shard in &self.shards {
            let Ok(mut map) = shard.0.lock() else { continue };
            if with_last_used {
                for (k, e) in map.iter_mut() {
                    if let Some(seen) = e.last_use.take() {
                        let l = latest.entry(k.0).or_insert(seen);
                        if seen.0 > l.0 {
                            *l = seen;
                        }
                    }
                }
            }
            map.retain(|k, e| {
                if k.2 < minute_ms {
                    usage.push(e.record(k));
                    if let Some(seen) = e.last_use {
                        // A finished minute's last use leaves with it.
                        let l = latest.entry(k.0).or_insert(seen);
                        if seen.0 > l.0 {
                            *l = seen;
                        }
                    }
                    false
                } else {
                    true
                }
            });
        }
        let latest = latest.iter().map(|(id, seen)| last_use(id, *seen));
        if with_last_used {
            last.extend(latest);
            last = merge_last(last);
        } else if let Ok(mut r) = self.restored.lock() {
            // Last uses that left with their minute wait for the next drain that takes them.
            r.1.extend(latest);
        }
        (merge(usage), last)
    }

    /// Puts counts back after a failed flush, so nothing is lost.
    pub fn restore(&self, usage: Vec<UsageRecord>, last: Vec<LastUse>) {
        if let Ok(mut r) = self.restored.lock() {
            r.0.extend(usage);
            r.1.extend(last);
        }
    }
}

/// One record per (token, route, minute): shards (and restored counts) may each hold a part.
fn merge(records: Vec<UsageRecord>) -> Vec<UsageRecord> {
    let mut by_key: HashMap<(TokenId, String, i64), UsageRecord> = HashMap::default();
    for r in records {
        match by_key.entry((r.token_id.clone(), r.route.clone(), r.minute.as_millis())) {
            std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().add(&r),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(r);
            }
        }
    }
    by_key.into_values().collect()
}

/// One last use per token: the latest.
fn merge_last(uses: Vec<LastUse>) -> Vec<LastUse> {
    let mut by_token: HashMap<TokenId, LastUse> = HashMap::default();
    for u in uses {
        match by_token.entry(u.token_id.clone()) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if u.at > o.get().at {
                    o.insert(u);
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(u);
            }
        }
    }
    by_token.into_values().collect()
}

pub type SharedMeter = Arc<UsageMeter>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_token_route_and_minute() {
        let m = UsageMeter::default();
        let id = *b"abcdefghijkl";
        let (ws, route): (Arc<str>, Arc<str>) = ("ws_1".into(), "orders".into());
        let mut s = Sample {
            public_id: &id,
            workspace_id: &ws,
            route_index: 0,
            route_id: &route,
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
        let (ws, route): (Arc<str>, Arc<str>) = ("ws_1".into(), "r".into());
        for at in [60_000, 125_000] {
            m.record(&Sample {
                public_id: &id,
                workspace_id: &ws,
                route_index: 0,
                route_id: &route,
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
    fn threads_count_apart_and_drain_together_and_failed_flushes_come_back() {
        let m = Arc::new(UsageMeter::default());
        let id = *b"abcdefghijkl";
        let (ws, route): (Arc<str>, Arc<str>) = ("ws_1".into(), "r".into());
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let (m, ws, route) = (m.clone(), ws.clone(), route.clone());
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        m.record(&Sample {
                            public_id: &id,
                            workspace_id: &ws,
                            route_index: 0,
                            route_id: &route,
                            status: 200,
                            bytes_in: 1,
                            bytes_out: 2,
                            latency_us: 10,
                            at: Timestamp::from_millis(60_000 + i),
                            client_ip: format!("10.0.0.{i}").parse().unwrap(),
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.peek(&id).iter().map(|u| u.requests).sum::<u64>(), 30);
        let (usage, last) = m.drain();
        assert_eq!(usage.len(), 1, "one row per token, route and minute");
        assert_eq!((usage[0].requests, usage[0].bytes_in, usage[0].bytes_out), (30, 30, 60));
        assert_eq!(last.len(), 1);
        assert_eq!((last[0].at.as_millis(), last[0].ip.as_str()), (60_002, "10.0.0.2"), "the latest use wins");
        m.restore(usage, last);
        assert_eq!(m.peek(&id)[0].requests, 30, "restored counts are visible");
        let (again, last) = m.drain();
        assert_eq!((again.len(), again[0].requests, last.len()), (1, 30, 1));
        assert!(m.drain().0.is_empty());
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
