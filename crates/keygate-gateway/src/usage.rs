//! The usage meter: per token, route and minute, requests by status class, bytes in and out and
//! a latency histogram, counted in memory and flushed to the store in the background (and on
//! graceful shutdown, so that after N requests the usage says N).
//!
//! Counts live in one shard per thread (each gateway worker has its own), so a worker's lock
//! and table stay in its own core's cache and the workers never contend; `last_used_at` rides in
//! the same entry, so a request costs one lookup. An entry holds its key and every counter in
//! 128 bytes aligned to 128 (one adjacent pair of cache lines, which the CPU fetches together):
//! route and workspace are named by small per-shard numbers, the request count is the sum of the
//! status classes. Shards are merged when usage is drained.

use std::collections::HashMap as StdHashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;
use keygate_core::Timestamp;
use keygate_core::ids::{TokenId, WorkspaceId};
use keygate_core::model::{LastUse, UsageRecord, latency_bucket};
use keygate_core::token_format::PUBLIC_ID_LEN;

const SHARDS: usize = 8;
/// Usage records kept after failed flushes before they are folded into coarser time.
pub const RESTORED_CAP: usize = 100_000;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// Keys are public ids of tokens that passed verification (chosen by the issuer, not by a
/// caller), so a fast keyed hash is enough; per-map random seeds keep it unpredictable anyway.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

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
/// since the last drain. Counters saturate instead of wrapping.
#[repr(C, align(128))]
struct Entry {
    bytes_in: u64,
    bytes_out: u64,
    latency_us_sum: u64,
    public_id: [u8; PUBLIC_ID_LEN],
    /// Minutes since the epoch.
    minute: i32,
    route_index: u32,
    /// The route's and the workspace's ids, as numbers of the shard's [`Names`].
    route: u32,
    workspace: u32,
    /// Requests by status class: 2xx (and 1xx), 3xx, 4xx, 5xx. Their sum is the request count.
    status: [u32; 4],
    latency: [u32; 10],
    /// The last use: milliseconds into the minute, plus one (0: none since the last drain).
    last_ms: u16,
    /// The last use's client address, IPv4 as IPv4-mapped IPv6.
    last_ip: [u8; 16],
}

const _: () = assert!(size_of::<Entry>() == 128, "an entry is one pair of cache lines");

impl Entry {
    fn key(&self) -> (&[u8; PUBLIC_ID_LEN], u32, i32) {
        (&self.public_id, self.route_index, self.minute)
    }
    fn minute_ms(&self) -> i64 {
        i64::from(self.minute) * 60_000
    }
    fn token_id(&self) -> TokenId {
        TokenId::from_public_id(std::str::from_utf8(&self.public_id).unwrap_or_default())
    }
    fn record(&self, names: &Names) -> UsageRecord {
        UsageRecord {
            token_id: self.token_id(),
            workspace_id: WorkspaceId::from_trusted(names.get(self.workspace).to_owned()),
            route: names.get(self.route).to_owned(),
            minute: Timestamp::from_millis(self.minute_ms()),
            requests: self.status.iter().map(|n| u64::from(*n)).sum(),
            status: self.status.map(u64::from),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            latency_us_sum: self.latency_us_sum,
            latency: self.latency.map(u64::from),
        }
    }
    /// The last use seen since the last drain.
    fn last_use(&self) -> Option<(Timestamp, IpAddr)> {
        (self.last_ms > 0).then(|| {
            let at = Timestamp::from_millis(self.minute_ms() + i64::from(self.last_ms) - 1);
            (at, IpAddr::V6(Ipv6Addr::from(self.last_ip)).to_canonical())
        })
    }
    /// The last use seen since the last drain, taking it.
    fn take_last_use(&mut self) -> Option<(Timestamp, IpAddr)> {
        let seen = self.last_use();
        self.last_ms = 0;
        seen
    }
}

/// Route and workspace ids, numbered per shard so that an entry holds 4 bytes for each instead
/// of a pointer pair (looked up only when an entry is made). Every drain numbers again the names
/// that the entries it leaves still use, so the list holds only the ids of the current minute's
/// entries (issue 12: it was never pruned under constant traffic).
#[derive(Default)]
struct Names {
    list: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u32>,
}

impl Names {
    fn number(&mut self, name: &Arc<str>) -> u32 {
        if let Some(n) = self.numbers.get(name) {
            return *n;
        }
        let n = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        self.list.push(name.clone());
        self.numbers.insert(name.clone(), n);
        n
    }
    fn get(&self, n: u32) -> &str {
        self.list.get(n as usize).map_or("", |s| s)
    }
}

#[derive(Default)]
struct Counts {
    table: HashTable<Entry>,
    hasher: foldhash::fast::RandomState,
    names: Names,
}

/// One thread's counts, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Counts>);

/// Counts usage until [`UsageMeter::drain`] takes it.
pub struct UsageMeter {
    shards: Vec<Shard>,
    /// Counts a failed flush gave back, written with the next one.
    restored: Mutex<(Vec<UsageRecord>, Vec<LastUse>)>,
    /// Refusals on workspaces' routes, by reason ([`UsageMeter::refusal`]).
    refusals: Vec<RefusalShard>,
    /// Refusals not counted because their shard held [`MAX_REFUSAL_KEYS`] keys.
    pub refusals_dropped: std::sync::atomic::AtomicU64,
}

impl Default for UsageMeter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            restored: Mutex::default(),
            refusals: (0..SHARDS).map(|_| RefusalShard::default()).collect(),
            refusals_dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// A refusal's key: the workspace, the route, the reason and the hour (its start, in ms).
type RefusalKey = (Arc<str>, Arc<str>, &'static str, i64);

/// Keys of refusal counts one shard holds at most between two flushes (workspaces × routes ×
/// reasons × hours: a flush empties it every few seconds, so this is only reached when the
/// store has been away for long); beyond, refusals are counted in `refusals_dropped` only.
pub const MAX_REFUSAL_KEYS: usize = 4096;

/// A [`RefusalKey`] borrowed, to count into an existing key without cloning its `Arc`s (hashed
/// as the key is).
#[derive(Hash)]
struct RefusalKeyRef<'a>(&'a str, &'a str, &'static str, i64);

impl hashbrown::Equivalent<RefusalKey> for RefusalKeyRef<'_> {
    fn equivalent(&self, k: &RefusalKey) -> bool {
        *self.0 == *k.0 && *self.1 == *k.1 && self.2 == k.2 && self.3 == k.3
    }
}

#[repr(align(128))]
#[derive(Default)]
struct RefusalShard(Mutex<hashbrown::HashMap<RefusalKey, (u16, u64), foldhash::fast::RandomState>>);

impl UsageMeter {
    /// Counts a refusal with `reason` (answered `status`) on `route` of workspace `ws`, for the
    /// reports by reason. Refused requests are few next to served ones; the key's `Arc`s are
    /// cloned only for a new key.
    pub fn refusal(&self, ws: &Arc<str>, route: &Arc<str>, reason: &'static str, status: u16, at: Timestamp) {
        let Some(shard) = self.refusals.get(SHARD.with(|i| *i)) else { return };
        let hour = at.as_millis().div_euclid(3_600_000) * 3_600_000;
        let mut map = shard.0.lock();
        let full = map.len() >= MAX_REFUSAL_KEYS;
        match map.get_mut(&RefusalKeyRef(ws, route, reason, hour)) {
            Some(e) => {
                e.0 = status;
                e.1 = e.1.saturating_add(1);
            }
            None if full => {
                self.refusals_dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                map.insert((ws.clone(), route.clone(), reason, hour), (status, 1));
            }
        }
    }

    /// Takes the refusals counted so far.
    pub fn drain_refusals(&self) -> Vec<keygate_core::model::RefusalCount> {
        let mut out = Vec::new();
        for shard in &self.refusals {
            for ((ws, route, reason, hour), (status, n)) in shard.0.lock().drain() {
                out.push(keygate_core::model::RefusalCount {
                    workspace_id: WorkspaceId::from_trusted(ws.to_string()),
                    route: route.to_string(),
                    reason: reason.to_owned(),
                    hour: Timestamp::from_millis(hour),
                    status,
                    requests: n,
                });
            }
        }
        out
    }

    /// Gives back refusal counts a flush could not write (within the shards' bound; beyond it
    /// they are dropped and counted).
    pub fn restore_refusals(&self, counts: Vec<keygate_core::model::RefusalCount>) {
        let Some(shard) = self.refusals.first() else { return };
        let mut map = shard.0.lock();
        for c in counts {
            let Some(reason) = crate::metrics::REASONS.iter().find(|r| **r == c.reason) else { continue };
            let key: RefusalKey = (c.workspace_id.as_str().into(), c.route.as_str().into(), reason, c.hour.as_millis());
            let full = map.len() >= MAX_REFUSAL_KEYS;
            match map.get_mut(&key) {
                Some(e) => e.1 = e.1.saturating_add(c.requests),
                None if full => {
                    self.refusals_dropped.fetch_add(c.requests, Ordering::Relaxed);
                }
                None => {
                    map.insert(key, (c.status, c.requests));
                }
            }
        }
    }
}

fn last_use(id: &[u8; PUBLIC_ID_LEN], (at, ip): (Timestamp, IpAddr)) -> LastUse {
    LastUse { token_id: TokenId::from_public_id(std::str::from_utf8(id).unwrap_or_default()), at, ip: ip.to_string() }
}

fn bump(n: &mut u32) {
    *n = n.saturating_add(1);
}

/// Keeps the latest of the last uses seen for each token.
fn keep_latest(
    latest: &mut HashMap<[u8; PUBLIC_ID_LEN], (Timestamp, IpAddr)>,
    id: [u8; PUBLIC_ID_LEN],
    seen: (Timestamp, IpAddr),
) {
    let l = latest.entry(id).or_insert(seen);
    if seen.0 > l.0 {
        *l = seen;
    }
}

/// The calling thread's shard of the meter, locked ([`UsageMeter::lock`]).
pub struct MeterShard<'a>(parking_lot::MutexGuard<'a, Counts>);

/// A request's entry, found and not yet counted ([`MeterShard::find`]).
pub struct MeterSlot<'a>(&'a mut Entry);

impl UsageMeter {
    pub fn record(&self, s: &Sample<'_>) {
        if let Some(mut shard) = self.lock() {
            shard.find(s).count(s);
        }
    }

    /// The calling thread's shard, locked. A request's last phase locks it together with the
    /// watch's ([`crate::watch::Watch::lock`]) and finds both entries before counting into
    /// either, so that the two lookups' cache misses overlap: a lock taken between them would
    /// wait for the first miss (a locked instruction lets no load pass it).
    pub fn lock(&self) -> Option<MeterShard<'_>> {
        self.shards.get(SHARD.with(|i| *i)).map(|s| MeterShard(s.0.lock()))
    }
}

impl MeterShard<'_> {
    /// The entry of the sample's token, route and minute, made if new.
    pub fn find(&mut self, s: &Sample<'_>) -> MeterSlot<'_> {
        let Counts { table, hasher, names } = &mut *self.0;
        let at = s.at.as_millis();
        let minute = i32::try_from(at.div_euclid(60_000)).unwrap_or(i32::MAX);
        let route_index = u32::try_from(s.route_index).unwrap_or(u32::MAX);
        let key = (s.public_id, route_index, minute);
        let e = match table.entry(hasher.hash_one(key), |e| e.key() == key, |e| hasher.hash_one(e.key())) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => v
                .insert(Entry {
                    bytes_in: 0,
                    bytes_out: 0,
                    latency_us_sum: 0,
                    public_id: *s.public_id,
                    minute,
                    route_index,
                    route: names.number(s.route_id),
                    workspace: names.number(s.workspace_id),
                    status: [0; 4],
                    latency: [0; 10],
                    last_ms: 0,
                    last_ip: [0; 16],
                })
                .into_mut(),
        };
        MeterSlot(e)
    }
}

impl MeterSlot<'_> {
    /// Counts the sample into its entry.
    pub fn count(self, s: &Sample<'_>) {
        let e = self.0;
        let at = s.at.as_millis();
        if let Some(class) = e.status.get_mut(usize::from((s.status / 100).clamp(2, 5) - 2)) {
            bump(class);
        }
        e.bytes_in = e.bytes_in.saturating_add(s.bytes_in);
        e.bytes_out = e.bytes_out.saturating_add(s.bytes_out);
        e.latency_us_sum = e.latency_us_sum.saturating_add(s.latency_us);
        if let Some(b) = e.latency.get_mut(latency_bucket(s.latency_us)) {
            bump(b);
        }
        // Milliseconds into the minute (below 60,000), plus one.
        let ms = u16::try_from(at.rem_euclid(60_000) + 1).unwrap_or(u16::MAX);
        if ms >= e.last_ms {
            e.last_ms = ms;
            e.last_ip = match s.client_ip {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
        }
    }
}

impl UsageMeter {
    /// A copy of what is counted for one token and not flushed yet (the dashboard shows live
    /// usage by adding this to what the store holds).
    pub fn peek(&self, public_id: &[u8; PUBLIC_ID_LEN]) -> Vec<UsageRecord> {
        let mut out: Vec<UsageRecord> = Vec::new();
        for shard in &self.shards {
            let c = shard.0.lock();
            out.extend(c.table.iter().filter(|e| e.public_id == *public_id).map(|e| e.record(&c.names)));
        }
        let id = TokenId::from_public_id(std::str::from_utf8(public_id).unwrap_or_default());
        out.extend(self.restored.lock().0.iter().filter(|u| u.token_id == id).cloned());
        merge(out)
    }

    /// The latest use of each of `tokens` seen and not flushed yet (so `last_used_at` is shown as
    /// soon as the usage is, not a flush later). One pass over the counts, whatever the number of
    /// tokens asked about.
    pub fn peek_last_uses(&self, tokens: &[TokenId]) -> Vec<LastUse> {
        let wanted: std::collections::HashSet<&str> =
            tokens.iter().filter_map(|t| t.as_str().strip_prefix("tok_")).collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        let mut latest: HashMap<[u8; PUBLIC_ID_LEN], (Timestamp, IpAddr)> = HashMap::default();
        for shard in &self.shards {
            let c = shard.0.lock();
            for e in c.table.iter() {
                if let Some(seen) = e.last_use()
                    && std::str::from_utf8(&e.public_id).is_ok_and(|id| wanted.contains(id))
                {
                    keep_latest(&mut latest, e.public_id, seen);
                }
            }
        }
        let mut out: Vec<LastUse> = latest.iter().map(|(id, seen)| last_use(id, *seen)).collect();
        out.extend(self.restored.lock().1.iter().filter(|u| tokens.contains(&u.token_id)).cloned());
        merge_last(out)
    }

    /// Takes everything counted so far.
    pub fn drain(&self) -> (Vec<UsageRecord>, Vec<LastUse>) {
        self.drain_before(i64::MAX, true)
    }

    /// Takes the minutes that started before `minute_ms` (finished minutes: each row then
    /// reaches the store once, not once per flush), and `last_used` if `with_last_used`.
    pub fn drain_before(&self, minute_ms: i64, with_last_used: bool) -> (Vec<UsageRecord>, Vec<LastUse>) {
        let (mut usage, mut last) = {
            let mut r = self.restored.lock();
            let last = if with_last_used { std::mem::take(&mut r.1) } else { Vec::new() };
            (std::mem::take(&mut r.0), last)
        };
        let mut latest: HashMap<[u8; PUBLIC_ID_LEN], (Timestamp, IpAddr)> = HashMap::default();
        for shard in &self.shards {
            let mut guard = shard.0.lock();
            let Counts { table, names, .. } = &mut *guard;
            table.retain(|e| {
                let finished = e.minute_ms() < minute_ms;
                // A finished minute's last use leaves with it.
                if (with_last_used || finished)
                    && let Some(seen) = e.take_last_use()
                {
                    keep_latest(&mut latest, e.public_id, seen);
                }
                if finished {
                    usage.push(e.record(names));
                }
                !finished
            });
            // Number again the names the entries left (the running minute's) still use, so the
            // list never holds ids no entry refers to (routes reloaded away, workspaces gone).
            let old = std::mem::take(names);
            for e in table.iter_mut() {
                e.route = old.list.get(e.route as usize).map_or(u32::MAX, |n| names.number(n));
                e.workspace = old.list.get(e.workspace as usize).map_or(u32::MAX, |n| names.number(n));
            }
        }
        let latest = latest.iter().map(|(id, seen)| last_use(id, *seen));
        if with_last_used {
            last.extend(latest);
            last = merge_last(last);
        } else {
            // Last uses that left with their minute wait for the next drain that takes them.
            self.restored.lock().1.extend(latest);
        }
        (merge(usage), last)
    }

    /// Puts counts back after a failed flush, so nothing is lost.
    pub fn restore(&self, usage: Vec<UsageRecord>, last: Vec<LastUse>) {
        self.restore_within(usage, last, RESTORED_CAP);
    }

    fn restore_within(&self, usage: Vec<UsageRecord>, last: Vec<LastUse>, cap: usize) {
        let mut r = self.restored.lock();
        r.0.extend(usage);
        r.1.extend(last);
        if r.0.len() > cap {
            // A long store outage: keep every count, in coarser time (an hour's, then a day's
            // requests in the period's first minute), so memory stays bounded by tokens × routes
            // × periods rather than by minutes.
            let mut held = merge(std::mem::take(&mut r.0));
            for period_ms in [3_600_000, 86_400_000] {
                if held.len() <= cap {
                    break;
                }
                for u in &mut held {
                    u.minute = Timestamp::from_millis(u.minute.as_millis().div_euclid(period_ms) * period_ms);
                }
                held = merge(held);
                tracing::warn!(records = held.len(), period_ms, "usage kept while the store is away, in coarser time");
            }
            r.0 = held;
        }
        if r.1.len() > cap {
            r.1 = merge_last(std::mem::take(&mut r.1));
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
    fn refusals_are_counted_per_workspace_route_reason_and_hour_within_a_bound() {
        let m = UsageMeter::default();
        let (ws, route): (Arc<str>, Arc<str>) = ("ws_1".into(), "orders".into());
        let at = Timestamp::from_millis(7_200_000 + 5);
        for _ in 0..3 {
            m.refusal(&ws, &route, "unknown_token", 401, at);
        }
        m.refusal(&ws, &route, "rate_limited", 429, at);
        m.refusal(&ws, &route, "unknown_token", 401, Timestamp::from_millis(10_800_000));
        let mut got: Vec<(String, i64, u16, u64)> =
            m.drain_refusals().into_iter().map(|c| (c.reason, c.hour.as_millis(), c.status, c.requests)).collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("rate_limited".into(), 7_200_000, 429, 1),
                ("unknown_token".into(), 7_200_000, 401, 3),
                ("unknown_token".into(), 10_800_000, 401, 1)
            ]
        );
        assert!(m.drain_refusals().is_empty(), "drained");
        // Beyond the bound of keys, refusals are dropped and counted; known keys still count.
        for h in 0..(MAX_REFUSAL_KEYS as i64 + 10) {
            m.refusal(&ws, &route, "unknown_token", 401, Timestamp::from_millis(h * 3_600_000));
        }
        assert_eq!(m.refusals_dropped.load(Ordering::Relaxed), 10);
        let back = m.drain_refusals();
        assert_eq!(back.len(), MAX_REFUSAL_KEYS);
        // What a failed flush gives back is written with the next.
        m.restore_refusals(back);
        assert_eq!(m.drain_refusals().iter().map(|c| c.requests).sum::<u64>(), MAX_REFUSAL_KEYS as u64);
    }

    /// A token, its workspace and a route, and requests of it.
    struct Fixture {
        id: [u8; PUBLIC_ID_LEN],
        ws: Arc<str>,
        route: Arc<str>,
    }

    impl Fixture {
        fn new(route: &str) -> Self {
            Self { id: *b"abcdefghijkl", ws: "ws_1".into(), route: route.into() }
        }
        /// A 200 answered in 10 µs at `at_ms` to `ip`, no bytes.
        fn sample(&self, at_ms: i64, ip: &str) -> Sample<'_> {
            Sample {
                public_id: &self.id,
                workspace_id: &self.ws,
                route_index: 0,
                route_id: &self.route,
                status: 200,
                bytes_in: 0,
                bytes_out: 0,
                latency_us: 10,
                at: Timestamp::from_millis(at_ms),
                client_ip: ip.parse().unwrap(),
            }
        }
    }

    #[test]
    fn counts_per_token_route_and_minute() {
        let m = UsageMeter::default();
        let f = Fixture::new("orders");
        let mut s = Sample { bytes_in: 10, bytes_out: 100, latency_us: 1500, ..f.sample(60_000, "10.0.0.1") };
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
        let f = Fixture::new("r");
        for at in [60_000, 125_000] {
            m.record(&f.sample(at, "10.0.0.1"));
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
        let id = Fixture::new("r").id;
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let f = Fixture::new("r");
                    for _ in 0..10 {
                        m.record(&Sample { bytes_in: 1, bytes_out: 2, ..f.sample(60_000 + i, &format!("10.0.0.{i}")) });
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

    /// A long store outage: failed flushes keep coming back, and what is kept stays bounded —
    /// every count exact, in coarser time once there are too many minutes.
    #[test]
    fn usage_kept_through_a_long_outage_is_bounded_and_exact() {
        let m = UsageMeter::default();
        // Two days of minutes for 10 tokens, an hour at a time: 28,800 records, far more than a
        // cap of 1,000.
        const CAP: usize = 1_000;
        let mut sent = 0u64;
        for hour in 0..48 {
            let mut batch = Vec::with_capacity(600);
            for minute in hour * 60..(hour + 1) * 60 {
                for t in 0..10u32 {
                    batch.push(UsageRecord {
                        token_id: TokenId::from_public_id(&format!("tok{t:09}")),
                        workspace_id: keygate_core::ids::WorkspaceId::from_trusted("ws_1".into()),
                        route: "r".into(),
                        minute: Timestamp::from_millis(minute * 60_000),
                        requests: 2,
                        status: [2, 0, 0, 0],
                        bytes_in: 0,
                        bytes_out: 0,
                        latency_us_sum: 20,
                        latency: [2, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    });
                    sent += 2;
                }
            }
            m.restore_within(batch, Vec::new(), CAP);
            assert!(m.restored.lock().0.len() <= CAP);
        }
        let (held, _) = m.drain();
        assert!(held.len() <= CAP, "{} records kept", held.len());
        assert_eq!(held.iter().map(|u| u.requests).sum::<u64>(), sent, "no request lost");
        assert_eq!(held.iter().map(|u| u.latency[0]).sum::<u64>(), sent, "nor any other count");
    }

    #[test]
    fn last_use_keeps_the_address_family_and_the_millisecond() {
        let m = UsageMeter::default();
        let f = Fixture::new("r");
        let sample = |at, ip| f.sample(at, ip);
        m.record(&sample(-59_999, "2001:db8::7"));
        m.record(&sample(120_000, "2001:db8::8"));
        m.record(&sample(179_999, "192.0.2.9"));
        m.record(&sample(150_000, "2001:db8::9"));
        let (usage, last) = m.drain();
        assert_eq!(usage.len(), 2, "a minute before the epoch is a minute like any other");
        assert!(usage.iter().any(|u| u.minute.as_millis() == -60_000 && u.requests == 1));
        assert_eq!(last.len(), 1);
        assert_eq!(
            (last[0].at.as_millis(), last[0].ip.as_str()),
            (179_999, "192.0.2.9"),
            "the later use, IPv4 as IPv4"
        );
        m.record(&sample(0, "::ffff:192.0.2.1"));
        m.record(&sample(1, "2001:db8::1"));
        let (_, last) = m.drain();
        assert_eq!((last[0].at.as_millis(), last[0].ip.as_str()), (1, "2001:db8::1"));
    }

    #[test]
    fn names_are_numbered_per_shard_and_let_go_when_drained() {
        let m = UsageMeter::default();
        let (f, b) = (Fixture::new("orders"), Arc::<str>::from("status"));
        for (i, route) in [&f.route, &b, &f.route].into_iter().enumerate() {
            m.record(&Sample { route_index: i, route_id: route, status: 404, ..f.sample(1000, "10.0.0.1") });
        }
        let mut routes: Vec<_> = m.peek(b"abcdefghijkl").into_iter().map(|u| (u.route, u.status[2])).collect();
        routes.sort();
        assert_eq!(
            routes,
            [("orders".to_owned(), 2), ("status".to_owned(), 1)],
            "a reloaded route at a new position keeps its id"
        );
        let (usage, _) = m.drain();
        assert!(usage.iter().all(|u| u.workspace_id.as_str() == "ws_1"));
        assert!(m.shards.iter().all(|s| s.0.lock().names.list.is_empty()), "an empty shard holds no names");
        // Under constant traffic (the shard never empties), names of the minutes gone go too.
        let other: Arc<str> = "gone".into();
        m.record(&Sample { route_id: &other, route_index: 9, ..f.sample(60_000, "10.0.0.1") });
        m.record(&f.sample(120_000, "10.0.0.1"));
        let (usage, _) = m.drain_before(120_000, false);
        assert_eq!(usage.len(), 1);
        let names: Vec<Vec<String>> =
            m.shards.iter().map(|s| s.0.lock().names.list.iter().map(|n| n.to_string()).collect()).collect();
        assert!(names.iter().flatten().all(|n| n != "gone"), "{names:?}");
        let left = m.peek(b"abcdefghijkl");
        assert_eq!((left.len(), left[0].route.as_str(), left[0].workspace_id.as_str()), (1, "orders", "ws_1"));
    }
}
