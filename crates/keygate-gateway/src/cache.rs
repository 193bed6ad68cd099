//! The per-route response cache (`[routes.cache]`): answers an upstream marks cacheable for
//! shared caches (RFC 9111) kept in memory and served again, in the forward phase, to callers the
//! route admits. A hit is authenticated, scope-checked, limited and metered like any request: it
//! is looked up after admit, and recorded as a forwarded answer.
//!
//! What is stored (RFC 9111 §3, §3.5): only the answer to a GET, with a status this cache
//! understands, explicit freshness (`s-maxage`, else `max-age`, else `Expires` minus `Date`; no
//! heuristic freshness), and none of `no-store`, `private`, `no-cache`, `Set-Cookie` or `Vary: *`.
//! A request that carries a credential (every request on a route that is not public) is stored
//! only when the answer says `public`, `s-maxage` or `must-revalidate` (§3.5). A request's
//! `no-store` keeps its answer out; `no-cache`, `max-age` and `min-fresh` send it upstream (and the
//! answer may replace the entry). `If-None-Match` and `If-Modified-Since` are evaluated against
//! a fresh entry (a 304 from the cache); a request with another precondition or a `Range` passes
//! through. A successful unsafe request (POST, PUT, PATCH, DELETE…) empties its URI's entries
//! (§4.4). An answer whose `Vary` names a field keygate writes for the upstream is not stored.
//!
//! This module is a leaf: the forward phase drives it ([`crate::phase::cache`]).
//!
//! The key: the host asked for, the normalized path and the query, then a partition by who asks
//! ([`CacheKeyBy`]: each token by default), then the values of the request fields the stored
//! answer's `Vary` names (as digests). Bounded memory: each route's cache counts its entries' keys, fields and
//! bodies, and drops the least recently used to stay within `max_bytes`. A cache lives with its
//! route: a table rebuilt with the route unchanged keeps it ([`carry`], walked by `RouteTable::carry_caches`), a changed route starts
//! empty, so no answer of an old definition is ever served.
//!
//! Every answer on a cached route says what the cache did in `Cache-Status` (RFC 9211).
//! Bodies stream to the client while a copy is kept ([`Tee`]); the copy is stored only when the
//! body ended whole, within `max_entry_bytes`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};

use crate::config::{CacheConfig, CacheKeyBy, RouteConfig};
use crate::head::ReqHead;
use crate::proxy::{Answered, BadField, BodyCopy, HeadSink, Tap, UpstreamResponseBody};

/// Variants (by `Vary`) kept per URI and partition; the least recently used goes beyond.
const MAX_VARIANTS: usize = 16;
/// The most field names an answer's `Vary` may name to be stored.
const MAX_VARY_NAMES: usize = 16;
/// Bytes counted per entry besides its key, fields and body (the bookkeeping).
const ENTRY_OVERHEAD: u64 = 256;
/// Bytes counted per stored header field besides its name and value.
const FIELD_OVERHEAD: u64 = 32;
/// RFC 9111 §1.2.2: a delta-seconds too large is taken as 2^31.
const DELTA_MAX: u64 = 2_147_483_648;
/// Slots of invalidation generations (an answer in flight while its URI was invalidated is not
/// stored).
const GENERATION_SLOTS: usize = 64;

/// One route's cache: its entries and counters.
pub struct RouteCache {
    config: CacheConfig,
    /// What the route was built from (and its workspace): a new table keeps this cache only for
    /// a route defined the same way.
    definition: RouteConfig,
    workspace: Option<Arc<str>>,
    store: parking_lot::Mutex<Store>,
    generations: [AtomicU64; GENERATION_SLOTS],
    stats: Stats,
}

impl std::fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCache").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Counters of a route's cache, for `/metrics`.
#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
}

impl Stats {
    fn add_from(&self, old: &Stats) {
        for (to, from) in [
            (&self.hits, &old.hits),
            (&self.misses, &old.misses),
            (&self.stores, &old.stores),
            (&self.evictions, &old.evictions),
        ] {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct Store {
    /// By URI (host, path and query), then partition: the variants kept.
    uris: HashMap<Arc<str>, HashMap<Arc<str>, Vec<Entry>>>,
    /// Least recently used first: an entry's tick, and where it is.
    lru: BTreeMap<u64, (Arc<str>, Arc<str>)>,
    tick: u64,
    bytes: u64,
    entries: u64,
}

struct Entry {
    /// Its place in the LRU order (unique).
    tick: u64,
    /// The request's values of the fields the answer's `Vary` names, as digests (`None`:
    /// absent).
    vary: Vary,
    answer: Arc<Stored>,
    size: u64,
}

/// Each field a stored answer's `Vary` names, and the SHA-256 of the request's values of it: a
/// digest, so that a field such as `Authorization` never stays in memory as it was sent, and
/// every value costs the same 32 bytes.
type Vary = Box<[(Box<str>, Option<[u8; 32]>)]>;

/// A stored answer.
pub(crate) struct Stored {
    status: StatusCode,
    /// The fields as the upstream sent them (those that pass to the client), `Age` left out.
    fields: Box<[(Box<str>, Bytes)]>,
    body: Bytes,
    /// When it arrived (the gateway's clock, milliseconds).
    response_time_ms: i64,
    /// Its age when it arrived: the upstream's `Age` plus the time the request took (RFC 9111
    /// §4.2.3's corrected age; the upstream's `Date` is not compared with keygate's clock).
    initial_age_ms: u64,
    /// How long it is fresh from its birth (RFC 9111 §4.2.1).
    lifetime_ms: u64,
}

impl Stored {
    fn age_ms(&self, now_ms: i64) -> u64 {
        let resident = u64::try_from(now_ms.saturating_sub(self.response_time_ms)).unwrap_or(0);
        self.initial_age_ms.saturating_add(resident)
    }
}

/// Why a request was forwarded (RFC 9211 §2.2 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// Nothing stored for the URI (for this caller).
    UriMiss,
    /// Something stored for the URI, but not for the request's `Vary` values.
    VaryMiss,
    /// What was stored is stale (and is dropped: keygate does not revalidate).
    Stale,
    /// A fresh answer was there, but the request's directives did not allow it.
    Request,
    /// A precondition or a range: passed through.
    Bypass,
    /// Not a GET or HEAD.
    Method,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Self::UriMiss => "uri-miss",
            Self::VaryMiss => "vary-miss",
            Self::Stale => "stale",
            Self::Request => "request",
            Self::Bypass => "bypass",
            Self::Method => "method",
        }
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    Hit { answer: Arc<Stored>, age_s: u64, ttl_s: u64 },
    Miss(Fwd),
}

impl RouteCache {
    /// The cache of a route being built, if it has a `[routes.cache]`: checked, empty.
    pub(crate) fn for_route(config: &RouteConfig, workspace_id: Option<&str>) -> Result<Option<Arc<Self>>, String> {
        let Some(cfg) = &config.cache else { return Ok(None) };
        cfg.validate()?;
        Ok(Some(Arc::new(Self::new(cfg.clone(), config.clone(), workspace_id.map(Arc::from)))))
    }

    fn new(config: CacheConfig, definition: RouteConfig, workspace: Option<Arc<str>>) -> Self {
        Self {
            config,
            definition,
            workspace,
            store: parking_lot::Mutex::default(),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            stats: Stats::default(),
        }
    }

    /// The entry for the request, if fresh and allowed; else why not. A stale entry is dropped.
    pub(crate) fn lookup(
        &self,
        uri: &str,
        partition: &str,
        head: &ReqHead<'_>,
        req: &Directives,
        now_ms: i64,
    ) -> Lookup {
        let mut s = self.store.lock();
        let Some(variants) = s.uris.get(uri).and_then(|p| p.get(partition)) else { return Lookup::Miss(Fwd::UriMiss) };
        let Some(i) = variants.iter().position(|e| vary_matches(&e.vary, head)) else {
            return Lookup::Miss(Fwd::VaryMiss);
        };
        let Some(answer) = variants.get(i).map(|e| e.answer.clone()) else { return Lookup::Miss(Fwd::UriMiss) };
        let age = answer.age_ms(now_ms);
        if age >= answer.lifetime_ms {
            s.remove(uri, partition, i);
            return Lookup::Miss(Fwd::Stale);
        }
        let left = answer.lifetime_ms - age;
        if req.no_cache
            || req.max_age.is_some_and(|m| age > m.saturating_mul(1000))
            || req.min_fresh.is_some_and(|m| left < m.saturating_mul(1000))
        {
            return Lookup::Miss(Fwd::Request);
        }
        s.touch(uri, partition, i);
        Lookup::Hit { answer, age_s: age / 1000, ttl_s: left / 1000 }
    }

    /// Drops every entry of `uri`, for every caller and variant (RFC 9111 §4.4).
    pub(crate) fn invalidate(&self, uri: &str) {
        // Under the lock, as `insert` compares it: an answer on its way meanwhile is not stored.
        let mut s = self.store.lock();
        if let Some(g) = self.generations.get(slot(uri)) {
            g.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(parts) = s.uris.remove(uri) {
            for e in parts.into_values().flatten() {
                s.lru.remove(&e.tick);
                s.bytes = s.bytes.saturating_sub(e.size);
                s.entries = s.entries.saturating_sub(1);
            }
        }
    }

    fn generation(&self, uri: &str) -> u64 {
        self.generations.get(slot(uri)).map_or(0, |g| g.load(Ordering::Relaxed))
    }

    /// Stores an answer whose body arrived whole, replacing the entry of the same variant and
    /// making room by dropping the least recently used entries.
    fn insert(&self, p: Pending, body: Bytes) {
        let size = p.size + body.len() as u64;
        if size > self.config.max_entry_bytes {
            return;
        }
        let answer = Arc::new(Stored {
            status: p.status,
            fields: p.fields,
            body,
            response_time_ms: p.response_time_ms,
            initial_age_ms: p.initial_age_ms,
            lifetime_ms: p.lifetime_ms,
        });
        let mut s = self.store.lock();
        if self.generation(&p.uri) != p.generation {
            return;
        }
        let same = s.uris.get(&p.uri).and_then(|m| m.get(&p.partition)).map(|v| {
            let same = v.iter().position(|e| e.vary == p.vary);
            let oldest = v.iter().enumerate().min_by_key(|(_, e)| e.tick).map(|(i, _)| i);
            (same, v.len(), oldest)
        });
        match same {
            Some((Some(i), _, _)) => s.remove(&p.uri, &p.partition, i),
            Some((None, n, Some(oldest))) if n >= MAX_VARIANTS => {
                s.remove(&p.uri, &p.partition, oldest);
                bump(&self.stats.evictions);
            }
            _ => {}
        }
        while s.bytes + size > self.config.max_bytes {
            let Some((uri, part)) = s.lru.first_key_value().map(|(_, (u, q))| (u.clone(), q.clone())) else { break };
            let Some(i) = s.uris.get(&uri).and_then(|m| m.get(&part)).and_then(|v| {
                let first = s.lru.first_key_value().map(|(t, _)| *t);
                v.iter().position(|e| Some(e.tick) == first)
            }) else {
                // Cannot happen: the order and the map hold the same entries.
                s.lru.pop_first();
                continue;
            };
            s.remove(&uri, &part, i);
            bump(&self.stats.evictions);
        }
        s.tick += 1;
        let tick = s.tick;
        s.lru.insert(tick, (p.uri.clone(), p.partition.clone()));
        s.bytes += size;
        s.entries += 1;
        s.uris.entry(p.uri).or_default().entry(p.partition).or_default().push(Entry {
            tick,
            vary: p.vary,
            answer,
            size,
        });
        bump(&self.stats.stores);
    }

    /// Bytes held and entries, for `/metrics`.
    fn held(&self) -> (u64, u64) {
        let s = self.store.lock();
        (s.bytes, s.entries)
    }
}

impl Store {
    fn remove(&mut self, uri: &str, partition: &str, i: usize) {
        let Some(parts) = self.uris.get_mut(uri) else { return };
        let Some(v) = parts.get_mut(partition) else { return };
        if i >= v.len() {
            return;
        }
        let e = v.swap_remove(i);
        if v.is_empty() {
            parts.remove(partition);
            if parts.is_empty() {
                self.uris.remove(uri);
            }
        }
        self.lru.remove(&e.tick);
        self.bytes = self.bytes.saturating_sub(e.size);
        self.entries = self.entries.saturating_sub(1);
    }

    /// Marks an entry most recently used.
    fn touch(&mut self, uri: &str, partition: &str, i: usize) {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.uris.get_mut(uri).and_then(|m| m.get_mut(partition)).and_then(|v| v.get_mut(i)) else {
            return;
        };
        let old = std::mem::replace(&mut e.tick, tick);
        if let Some(place) = self.lru.remove(&old) {
            self.lru.insert(tick, place);
        }
    }
}

fn slot(uri: &str) -> usize {
    let h = uri.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h as usize % GENERATION_SLOTS
}

/// Whether the request's values of the fields named in `vary` are those stored.
fn vary_matches(vary: &Vary, head: &ReqHead<'_>) -> bool {
    vary.iter().all(|(name, want)| request_value(head, name) == *want)
}

/// The SHA-256 of all values of the request field `name` (each trimmed, joined by `, `);
/// `None` when absent.
fn request_value(head: &ReqHead<'_>, name: &str) -> Option<[u8; 32]> {
    use sha2::Digest;
    let mut out: Option<sha2::Sha256> = None;
    for f in head.fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name)) {
        match out.as_mut() {
            Some(h) => h.update(b", "),
            None => out = Some(sha2::Sha256::new()),
        }
        if let Some(h) = out.as_mut() {
            h.update(f.value.trim_ascii());
        }
    }
    out.map(|h| h.finalize().into())
}

/// Before a new route table replaces the old one, for a cached route of both (by id): defined
/// exactly as before (every key, the workspace), it keeps `prev`'s cache and entries; changed, it
/// starts empty, its counters carried. (The table walk is `RouteTable::carry_caches`.)
pub fn carry(cache: &mut Arc<RouteCache>, prev: &Arc<RouteCache>) {
    if prev.definition == cache.definition && prev.workspace == cache.workspace {
        *cache = prev.clone();
    } else {
        cache.stats.add_from(&prev.stats);
    }
}

/// Picks one of a cache's counters.
type Counter = fn(&Stats) -> &AtomicU64;

/// The cache metrics of every cached route (route id and cache, as `RouteTable::caches` gives
/// them), in the Prometheus text format.
pub fn render<'a>(caches: impl IntoIterator<Item = (&'a str, &'a RouteCache)>) -> String {
    let cached: Vec<(&str, &RouteCache)> = caches.into_iter().collect();
    let mut out = String::new();
    let counters: [(&str, &str, Counter); 4] = [
        ("hits", "Answers served from the route's response cache.", |s| &s.hits),
        ("misses", "GET and HEAD requests on a cached route sent upstream.", |s| &s.misses),
        ("stores", "Answers stored in the route's response cache.", |s| &s.stores),
        ("evictions", "Entries dropped to make room (least recently used first).", |s| &s.evictions),
    ];
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP keygate_gateway_cache_{name}_total {help}");
        let _ = writeln!(out, "# TYPE keygate_gateway_cache_{name}_total counter");
        for (id, c) in &cached {
            let n = get(&c.stats).load(Ordering::Relaxed);
            let _ = writeln!(out, "keygate_gateway_cache_{name}_total{{route=\"{id}\"}} {n}");
        }
    }
    let held: Vec<(u64, u64)> = cached.iter().map(|(_, c)| c.held()).collect();
    for (name, help, pick) in [
        ("bytes", "Bytes held by the route's response cache (keys, fields and bodies).", 0),
        ("entries", "Answers held by the route's response cache.", 1),
    ] {
        let _ = writeln!(out, "# HELP keygate_gateway_cache_{name} {help}");
        let _ = writeln!(out, "# TYPE keygate_gateway_cache_{name} gauge");
        for ((id, _), (bytes, entries)) in cached.iter().zip(&held) {
            let v = if pick == 0 { bytes } else { entries };
            let _ = writeln!(out, "keygate_gateway_cache_{name}{{route=\"{id}\"}} {v}");
        }
    }
    out
}

/// The cache-relevant directives of `Cache-Control` (RFC 9111 §5.2), request's or answer's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Directives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) min_fresh: Option<u64>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl Directives {
    /// Reads every value of `Cache-Control`. Names compare ignoring case; a directive that
    /// appears twice keeps its smaller value; a `max-age`, `s-maxage` or `min-fresh` whose value
    /// is not delta-seconds counts as 0 (the answer is stale: RFC 9111 §4.2.1), one too large
    /// as 2^31 (§1.2.2); anything not understood is ignored (§5.2.3).
    pub(crate) fn parse<'v>(values: impl IntoIterator<Item = &'v [u8]>) -> Self {
        let mut d = Self::default();
        for v in values {
            d.read(v);
        }
        d
    }

    fn read(&mut self, v: &[u8]) {
        let at = |i: usize| v.get(i).copied();
        let mut i = 0;
        while i < v.len() {
            while matches!(at(i), Some(b' ' | b'\t' | b',')) {
                i += 1;
            }
            let start = i;
            while at(i).is_some_and(is_tchar) {
                i += 1;
            }
            let name = v.get(start..i).unwrap_or_default();
            while matches!(at(i), Some(b' ' | b'\t')) {
                i += 1;
            }
            let mut value: Option<Vec<u8>> = None;
            if at(i) == Some(b'=') {
                i += 1;
                while matches!(at(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
                let mut s = Vec::new();
                if at(i) == Some(b'"') {
                    i += 1;
                    while let Some(b) = at(i) {
                        i += 1;
                        match b {
                            b'"' => break,
                            b'\\' => {
                                if let Some(e) = at(i) {
                                    s.push(e);
                                    i += 1;
                                }
                            }
                            b => s.push(b),
                        }
                    }
                } else {
                    while let Some(b) = at(i).filter(|b| is_tchar(*b)) {
                        s.push(b);
                        i += 1;
                    }
                }
                value = Some(s);
            }
            // What is left before the next comma is not understood.
            let mut clean = true;
            while let Some(b) = at(i) {
                if b == b',' {
                    break;
                }
                clean &= b == b' ' || b == b'\t';
                i += 1;
            }
            if name.is_empty() {
                i += 1;
                continue;
            }
            self.apply(name, value.as_deref(), clean);
        }
    }

    fn apply(&mut self, name: &[u8], value: Option<&[u8]>, clean: bool) {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        let seconds = || -> u64 {
            match value {
                Some(v) if clean && !v.is_empty() && v.iter().all(u8::is_ascii_digit) => {
                    let digits = std::str::from_utf8(v).unwrap_or("0");
                    digits.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX)
                }
                _ => 0,
            }
        };
        let keep_min = |slot: &mut Option<u64>, n: u64| *slot = Some(slot.map_or(n, |o| o.min(n)));
        if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            self.no_cache = true;
        } else if is("private") {
            self.private = true;
        } else if is("public") {
            self.public = true;
        } else if is("must-revalidate") || is("proxy-revalidate") {
            self.must_revalidate = true;
        } else if is("max-age") {
            keep_min(&mut self.max_age, seconds());
        } else if is("s-maxage") {
            keep_min(&mut self.s_maxage, seconds());
        } else if is("min-fresh") {
            keep_min(&mut self.min_fresh, seconds());
        }
    }

    /// A request's directives: `Cache-Control`, or `Pragma: no-cache` without it (RFC 9111 §5.4).
    pub(crate) fn of_request(head: &ReqHead<'_>) -> Self {
        let mut cc = head.fields.iter().filter(|f| f.name.eq_ignore_ascii_case("cache-control")).peekable();
        if cc.peek().is_some() {
            return Self::parse(cc.map(|f| f.value));
        }
        let pragma = head.fields.iter().filter(|f| f.name.eq_ignore_ascii_case("pragma"));
        let no_cache = pragma
            .flat_map(|f| f.value.split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"no-cache"));
        Self { no_cache, ..Self::default() }
    }
}

/// The statuses whose answers may be stored (RFC 9110 §15.1's heuristically cacheable ones,
/// without 206: ranges are not kept).
fn cacheable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// How an answer is stored: its freshness, its age when it arrived, the `Vary` names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) lifetime_ms: u64,
    pub(crate) initial_age_ms: u64,
    pub(crate) vary: Vec<String>,
}

/// Whether an answer to a GET may be stored (RFC 9111 §3, §3.5), and how; else why not, as an
/// RFC 9211 `detail` token. `authenticated`: the request carried a credential.
pub(crate) fn decide(
    status: StatusCode,
    fields: &[(Box<str>, Bytes)],
    authenticated: bool,
    req: &Directives,
    (request_ms, response_ms): (i64, i64),
) -> Result<Plan, &'static str> {
    if req.no_store {
        return Err("request-no-store");
    }
    if !cacheable_status(status) {
        return Err("status");
    }
    let all =
        |name: &'static str| fields.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_ref());
    let d = Directives::parse(all("cache-control"));
    if d.no_store {
        return Err("no-store");
    }
    if d.private {
        return Err("private");
    }
    if d.no_cache {
        return Err("no-cache");
    }
    if all("set-cookie").next().is_some() {
        return Err("set-cookie");
    }
    if authenticated && !(d.public || d.s_maxage.is_some() || d.must_revalidate) {
        return Err("authenticated");
    }
    let date = |name: &'static str| -> Option<Option<i64>> {
        let v = all(name).next()?;
        let t = std::str::from_utf8(v).ok().and_then(|s| httpdate::parse_http_date(s.trim()).ok());
        Some(
            t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_millis()).ok()),
        )
    };
    let lifetime_ms = match d.s_maxage.or(d.max_age) {
        Some(s) => s.saturating_mul(1000),
        None => match date("expires") {
            // An invalid Expires is a time in the past (RFC 9111 §5.3).
            Some(None) => 0,
            Some(Some(expires)) => {
                let date = date("date").flatten().unwrap_or(response_ms);
                u64::try_from(expires.saturating_sub(date)).unwrap_or(0)
            }
            None => return Err("no-freshness"),
        },
    };
    let mut vary: Vec<String> = Vec::new();
    for name in all("vary").flat_map(|v| v.split(|b| *b == b',')).map(<[u8]>::trim_ascii).filter(|n| !n.is_empty()) {
        if name == b"*" {
            return Err("vary-star");
        }
        if !name.iter().all(|b| is_tchar(*b)) {
            return Err("vary-invalid");
        }
        // A field keygate writes for the upstream (`X-Keygate-*`, `X-Forwarded-*`, `X-Real-IP`,
        // `Forwarded`…): the upstream varied on keygate's value, not on the client's, which the
        // key would hold. (`Host` is in the key already.)
        if !name.eq_ignore_ascii_case(b"host")
            && !matches!(crate::head::classify_name(name), crate::head::NameClass::Passes)
        {
            return Err("vary-gateway-field");
        }
        let lower = String::from_utf8_lossy(name).to_ascii_lowercase();
        if !vary.contains(&lower) {
            vary.push(lower);
        }
    }
    if vary.len() > MAX_VARY_NAMES {
        return Err("vary-too-many");
    }
    let age_s = all("age")
        .next()
        .and_then(|v| std::str::from_utf8(v.trim_ascii()).ok())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .map_or(0, |s| s.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX));
    let delay = u64::try_from(response_ms.saturating_sub(request_ms)).unwrap_or(0);
    let initial_age_ms = age_s.saturating_mul(1000).saturating_add(delay);
    if initial_age_ms >= lifetime_ms {
        return Err("stale");
    }
    Ok(Plan { lifetime_ms, initial_age_ms, vary })
}

/// The URI part of the key: the host asked for (lowercase), the normalized path, the query.
fn uri_key(head: &ReqHead<'_>, path: &str) -> String {
    let host = head.authority.map(str::as_bytes).or_else(|| head.at(head.known.host)).unwrap_or_default();
    let mut k = String::with_capacity(host.len() + path.len() + head.query.map_or(0, |q| q.len() + 1));
    k.push_str(&String::from_utf8_lossy(host).to_ascii_lowercase());
    k.push_str(path);
    if let Some(q) = head.query {
        k.push('?');
        k.push_str(q);
    }
    k
}

/// A request whose answer the cache cannot serve or keep whole: a range (RFC 9110 §14.2), a
/// precondition (§13.1) other than `If-None-Match` and `If-Modified-Since`, which the cache
/// evaluates itself ([`not_modified`]), or a request to switch protocols (a WebSocket's GET).
fn bypasses(head: &ReqHead<'_>) -> bool {
    head.fields.iter().any(|f| {
        let n = f.name.as_bytes();
        let precondition = n.len() > 3
            && n.get(..3).is_some_and(|p| p.eq_ignore_ascii_case(b"if-"))
            && !n.eq_ignore_ascii_case(b"if-none-match")
            && !n.eq_ignore_ascii_case(b"if-modified-since");
        precondition || n.eq_ignore_ascii_case(b"range") || n.eq_ignore_ascii_case(b"upgrade")
    })
}

/// The entity tags of an `If-None-Match` value (`*`, `"x"`, `W/"x"`), a comma inside quotes
/// included; anything else is skipped.
fn entity_tags(v: &[u8]) -> Vec<&[u8]> {
    let at = |i: usize| v.get(i).copied();
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        while matches!(at(i), Some(b' ' | b'\t' | b',')) {
            i += 1;
        }
        let start = i;
        if at(i) == Some(b'*') {
            out.push(v.get(i..=i).unwrap_or_default());
            i += 1;
            continue;
        }
        if v.get(i..i + 2) == Some(b"W/") {
            i += 2;
        }
        if at(i) != Some(b'"') {
            while at(i).is_some_and(|b| b != b',') {
                i += 1;
            }
            continue;
        }
        i += 1;
        while at(i).is_some_and(|b| b != b'"') {
            i += 1;
        }
        if at(i).is_none() {
            break;
        }
        i += 1;
        out.push(v.get(start..i).unwrap_or_default());
    }
    out
}

/// Whether the request's `If-None-Match` (weak comparison, RFC 9110 §13.1.2), or else its
/// `If-Modified-Since` (§13.1.3), says the client's copy is the stored one: a 304 then. Only
/// for a stored 200 or 203.
fn not_modified(a: &Stored, head: &ReqHead<'_>) -> bool {
    if a.status != StatusCode::OK && a.status != StatusCode::NON_AUTHORITATIVE_INFORMATION {
        return false;
    }
    let stored = |name: &str| a.fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_ref());
    let weak = |t: &[u8]| -> Vec<u8> { t.strip_prefix(b"W/").unwrap_or(t).to_vec() };
    let mut inm = head.fields.iter().filter(|f| f.name.eq_ignore_ascii_case("if-none-match")).peekable();
    if inm.peek().is_some() {
        let Some(etag) = stored("etag").map(<[u8]>::trim_ascii) else { return false };
        let etag = weak(etag);
        return inm.flat_map(|f| entity_tags(f.value)).any(|t| t == b"*" || weak(t) == etag);
    }
    let date = |v: &[u8]| std::str::from_utf8(v).ok().and_then(|s| httpdate::parse_http_date(s.trim()).ok());
    let since =
        head.fields.iter().find(|f| f.name.eq_ignore_ascii_case("if-modified-since")).and_then(|f| date(f.value));
    match (since, stored("last-modified").and_then(date)) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// A head sink that also keeps the fields, for the entry.
pub(crate) struct Collect<'s, S> {
    inner: &'s mut S,
    fields: Vec<(Box<str>, Bytes)>,
}

impl<'s, S> Collect<'s, S> {
    pub(crate) fn new(inner: &'s mut S) -> Self {
        Self { inner, fields: Vec::new() }
    }

    /// The sink, and the fields it was given.
    pub(crate) fn into_parts(self) -> (&'s mut S, Vec<(Box<str>, Bytes)>) {
        (self.inner, self.fields)
    }
}

impl<S: HeadSink> HeadSink for Collect<'_, S> {
    fn status(&mut self, status: StatusCode) {
        self.fields.clear();
        self.inner.status(status);
    }
    fn field(&mut self, name: &str, value: &[u8]) -> Result<(), BadField> {
        self.inner.field(name, value)?;
        self.fields.push((name.into(), Bytes::copy_from_slice(value)));
        Ok(())
    }
}

/// An answer being kept while its body streams: stored by [`BodyCopy::complete`] if it ends whole.
pub struct Tee {
    cache: Arc<RouteCache>,
    pending: Option<Box<Pending>>,
    chunks: Vec<Bytes>,
    len: u64,
    /// Body bytes the entry may hold.
    limit: u64,
}

struct Pending {
    uri: Arc<str>,
    partition: Arc<str>,
    vary: Vary,
    status: StatusCode,
    fields: Box<[(Box<str>, Bytes)]>,
    response_time_ms: i64,
    initial_age_ms: u64,
    lifetime_ms: u64,
    /// Its key and fields, counted.
    size: u64,
    /// The URI's invalidation generation when the request was sent.
    generation: u64,
}

impl BodyCopy for Tee {
    /// Body bytes that went to the client: a copy is kept, up to the entry's limit.
    fn copy(&mut self, d: &Bytes) {
        if self.pending.is_none() || d.is_empty() {
            return;
        }
        self.len += d.len() as u64;
        if self.len > self.limit {
            self.pending = None;
            self.chunks = Vec::new();
            return;
        }
        self.chunks.push(d.clone());
    }

    /// The body ended whole: the answer is stored. (A body that failed or was dropped before
    /// its end never gets here.)
    fn complete(self: Box<Self>) {
        let Some(p) = self.pending else { return };
        let body = match self.chunks.as_slice() {
            [] => Bytes::new(),
            // A copy of its own: the entry must not hold a connection's read buffer.
            chunks => {
                let mut b = BytesMut::with_capacity(usize::try_from(self.len).unwrap_or(0));
                for c in chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        self.cache.insert(*p, body);
    }
}

/// Adds our `Cache-Status` entry (after any the upstream's caches wrote).
fn cache_status<S: HeadSink>(sink: &mut S, value: &str) {
    let _ = sink.field("cache-status", value.as_bytes());
}

/// What the cache makes of a GET or HEAD before it would be forwarded.
pub(crate) enum Before {
    /// A fresh entry answered (its head went to the sink).
    Hit(Answered),
    /// It goes upstream; [`RouteCache::after`] then decides about its answer.
    Forward(Miss),
}

/// A GET or HEAD on its way upstream, as the cache saw it.
pub(crate) struct Miss {
    fwd: Fwd,
    uri: String,
    partition: String,
    req: Directives,
    bypass: bool,
    is_get: bool,
    request_ms: i64,
    generation: u64,
}

impl RouteCache {
    /// Who shares entries on this route.
    pub(crate) fn key_by(&self) -> CacheKeyBy {
        self.config.key_by
    }

    /// A GET or HEAD at `now_ms`, whose caller's entries are `partition` (`""`: everyone's): a
    /// fresh entry answers into `sink`, else it is to be forwarded.
    pub(crate) fn before<S: HeadSink>(
        &self,
        head: &ReqHead<'_>,
        path: &str,
        partition: String,
        now_ms: i64,
        sink: &mut S,
    ) -> Before {
        let uri = uri_key(head, path);
        let is_get = head.method == Method::GET;
        let req = Directives::of_request(head);
        let bypass = bypasses(head);
        let fwd = if bypass {
            Fwd::Bypass
        } else {
            match self.lookup(&uri, &partition, head, &req, now_ms) {
                Lookup::Hit { answer, age_s, ttl_s } => {
                    bump(&self.stats.hits);
                    let hit = Hit { age_s, ttl_s, head_req: !is_get, not_modified: not_modified(&answer, head) };
                    return Before::Hit(serve_hit(&answer, &hit, sink));
                }
                Lookup::Miss(f) => f,
            }
        };
        bump(&self.stats.misses);
        let generation = self.generation(&uri);
        Before::Forward(Miss { fwd, uri, partition, req, bypass, is_get, request_ms: now_ms, generation })
    }

    /// The upstream's answer to a forwarded GET or HEAD (its head's fields in `fields`, as
    /// [`Collect`] kept them), at `now_ms`: kept as its body streams when RFC 9111 allows
    /// (`authenticated`: the request carried a credential), and `Cache-Status` says so.
    pub(crate) fn after<S: HeadSink>(
        self: &Arc<Self>,
        miss: Miss,
        head: &ReqHead<'_>,
        authenticated: bool,
        (answered, fields): (&mut Answered, Vec<(Box<str>, Bytes)>),
        now_ms: i64,
        sink: &mut S,
    ) {
        let Miss { fwd, uri, partition, req, bypass, is_get, request_ms, generation } = miss;
        if answered.status.is_informational() {
            // A 101: the connection is another protocol's now.
            return;
        }
        let mut status = format!("keygate; fwd={}", fwd.as_str());
        if is_get && !bypass {
            match decide(answered.status, &fields, authenticated, &req, (request_ms, now_ms)) {
                Ok(plan) => {
                    let vary: Vary =
                        plan.vary.iter().map(|n| (n.clone().into_boxed_str(), request_value(head, n))).collect();
                    let size = ENTRY_OVERHEAD
                        + (uri.len() + partition.len()) as u64
                        + vary.iter().map(|(n, _)| n.len() as u64 + 33).sum::<u64>()
                        + fields.iter().map(|(n, v)| (n.len() + v.len()) as u64 + FIELD_OVERHEAD).sum::<u64>();
                    let limit = self.config.max_entry_bytes.saturating_sub(size);
                    let ttl_s = (plan.lifetime_ms - plan.initial_age_ms) / 1000;
                    if size > self.config.max_entry_bytes || answered.body.exact_len().is_some_and(|n| n > limit) {
                        status.push_str("; detail=too-large");
                    } else {
                        let tee = Tee {
                            cache: self.clone(),
                            pending: Some(Box::new(Pending {
                                uri: Arc::from(uri),
                                partition: Arc::from(partition),
                                vary,
                                status: answered.status,
                                fields: fields.into_boxed_slice(),
                                response_time_ms: now_ms,
                                initial_age_ms: plan.initial_age_ms,
                                lifetime_ms: plan.lifetime_ms,
                                size,
                                generation,
                            })),
                            chunks: Vec::new(),
                            len: 0,
                            limit,
                        };
                        if answered.body.tee(Tap::Tee(Box::new(tee))) {
                            let _ = write!(status, "; stored; ttl={ttl_s}");
                        } else {
                            status.push_str("; detail=close-delimited");
                        }
                    }
                }
                Err(why) => {
                    status.push_str("; detail=");
                    status.push_str(why);
                }
            }
        }
        cache_status(sink, &status);
    }

    /// The answer to a request that is not a GET or HEAD: a successful unsafe one drops its
    /// URI's entries (RFC 9111 §4.4).
    pub(crate) fn after_other<S: HeadSink>(&self, head: &ReqHead<'_>, path: &str, status: StatusCode, sink: &mut S) {
        if !head.method.is_safe() && (status.is_success() || status.is_redirection()) {
            self.invalidate(&uri_key(head, path));
        }
        cache_status(sink, &format!("keygate; fwd={}", Fwd::Method.as_str()));
    }
}

/// A hit: the stored head (its `Age` now, RFC 9111 §5.1), and the body from memory (none to a
/// HEAD, whose `Content-Length` says the stored body's).
/// How a hit is answered.
struct Hit {
    age_s: u64,
    ttl_s: u64,
    /// A HEAD: no body.
    head_req: bool,
    /// The client's copy is the stored one: 304, with the fields RFC 9110 §15.4.5 names.
    not_modified: bool,
}

fn serve_hit<S: HeadSink>(a: &Stored, hit: &Hit, sink: &mut S) -> Answered {
    const OF_304: [&str; 7] = ["cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified"];
    let status = if hit.not_modified { StatusCode::NOT_MODIFIED } else { a.status };
    sink.status(status);
    let mut has_len = false;
    for (n, v) in &a.fields {
        if n.eq_ignore_ascii_case("age") || (hit.not_modified && !OF_304.iter().any(|k| n.eq_ignore_ascii_case(k))) {
            continue;
        }
        has_len |= n.eq_ignore_ascii_case("content-length");
        let _ = sink.field(n, v);
    }
    let mut num = itoa::Buffer::new();
    let _ = sink.field("age", num.format(hit.age_s).as_bytes());
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if hit.head_req && !has_len && !bodiless {
        let _ = sink.field("content-length", num.format(a.body.len()).as_bytes());
    }
    cache_status(sink, &format!("keygate; hit; ttl={}", hit.ttl_s));
    let body = if hit.head_req || bodiless { Bytes::new() } else { a.body.clone() };
    Answered { status, body: UpstreamResponseBody::from_memory(body) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::head::{Field, Known};

    fn cc(v: &str) -> Directives {
        Directives::parse([v.as_bytes()])
    }

    #[test]
    fn cache_control_parses_odd_input() {
        let d = cc("public, max-age=60, s-maxage=\"30\"");
        assert!(d.public && !d.private);
        assert_eq!((d.max_age, d.s_maxage), (Some(60), Some(30)));
        let d = cc("  MAX-AGE = 5 ,,, No-Store ");
        assert_eq!(d.max_age, Some(5));
        assert!(d.no_store);
        assert_eq!(cc("max-age=abc").max_age, Some(0), "not delta-seconds: stale");
        assert_eq!(cc("max-age=-1").max_age, Some(0));
        assert_eq!(cc("max-age=1.5").max_age, Some(0), "garbage after the value");
        assert_eq!(cc("max-age").max_age, Some(0), "no value");
        assert_eq!(cc("max-age=99999999999999999999999").max_age, Some(DELTA_MAX));
        assert_eq!(cc("max-age=60, max-age=10").max_age, Some(10), "twice: the smaller");
        let d = cc("private=\"set-cookie, x-a\", max-age=9");
        assert!(d.private, "with field names: still private");
        assert_eq!(d.max_age, Some(9), "a comma inside quotes does not end the directive");
        let d = cc("x-ext=\"a\\\"b, no-store\", public");
        assert!(!d.no_store && d.public, "an escaped quote stays inside");
        assert!(cc("\"unterminated, no-store").no_store, "garbage does not hide what follows its comma");
        assert_eq!(cc(""), Directives::default());
        assert_eq!(cc(",,,"), Directives::default());
        assert!(cc("no-cache=\"x\"").no_cache);
        assert!(cc("proxy-revalidate").must_revalidate);
        let d = Directives::parse([&b"max-age=5"[..], b"public"]);
        assert!(d.public && d.max_age == Some(5), "several fields");
        // Bytes that are not UTF-8 or are control characters do not panic and are ignored.
        let d = Directives::parse([&b"\xff\xfe, max-age=\x01, public"[..]]);
        assert!(d.public);
    }

    fn fields(list: &[(&str, &str)]) -> Vec<(Box<str>, Bytes)> {
        list.iter().map(|(n, v)| ((*n).into(), Bytes::copy_from_slice(v.as_bytes()))).collect()
    }

    fn decide_with(list: &[(&str, &str)], authenticated: bool) -> Result<Plan, &'static str> {
        decide(StatusCode::OK, &fields(list), authenticated, &Directives::default(), (0, 0))
    }

    #[test]
    fn only_explicitly_shareable_answers_are_stored() {
        let ok = |l: &[(&str, &str)]| decide_with(l, true).map(|p| p.lifetime_ms);
        assert_eq!(ok(&[("Cache-Control", "public, max-age=60")]), Ok(60_000));
        assert_eq!(ok(&[("cache-control", "s-maxage=30, max-age=60")]), Ok(30_000), "s-maxage wins");
        assert_eq!(ok(&[("cache-control", "must-revalidate, max-age=60")]), Ok(60_000));
        assert_eq!(ok(&[("cache-control", "max-age=60")]), Err("authenticated"), "RFC 9111 §3.5");
        assert_eq!(decide_with(&[("cache-control", "max-age=60")], false).map(|p| p.lifetime_ms), Ok(60_000));
        assert_eq!(ok(&[]), Err("authenticated"));
        assert_eq!(decide_with(&[], false), Err("no-freshness"), "no heuristic freshness");
        assert_eq!(ok(&[("cache-control", "public")]), Err("no-freshness"));
        assert_eq!(ok(&[("cache-control", "public, max-age=60, private")]), Err("private"));
        assert_eq!(ok(&[("cache-control", "public, no-store, max-age=60")]), Err("no-store"));
        assert_eq!(ok(&[("cache-control", "public, no-cache, max-age=60")]), Err("no-cache"));
        assert_eq!(ok(&[("cache-control", "public, max-age=60"), ("set-cookie", "a=b")]), Err("set-cookie"));
        assert_eq!(ok(&[("cache-control", "public, max-age=60"), ("vary", "accept, *")]), Err("vary-star"));
        assert_eq!(ok(&[("cache-control", "public, max-age=0")]), Err("stale"));
        assert_eq!(ok(&[("cache-control", "public, max-age=60"), ("age", "60")]), Err("stale"));
        let p = decide_with(&[("cache-control", "public, max-age=60"), ("age", "10")], true).unwrap();
        assert_eq!(p.initial_age_ms, 10_000);
        let p = decide(
            StatusCode::OK,
            &fields(&[("cache-control", "public, max-age=60")]),
            true,
            &Directives::default(),
            (1_000, 3_500),
        )
        .unwrap();
        assert_eq!(p.initial_age_ms, 2_500, "the time the request took counts as age");
        let vary = decide_with(
            &[("cache-control", "public, max-age=1"), ("Vary", "Accept, accept-language"), ("vary", "ACCEPT")],
            true,
        );
        assert_eq!(vary.unwrap().vary, ["accept", "accept-language"]);
        for name in ["X-Keygate-App-Id", "x-forwarded-for", "X-Real-IP", "forwarded", "x-forwarded-port"] {
            let v = decide_with(&[("cache-control", "public, max-age=1"), ("vary", name)], true);
            assert_eq!(v, Err("vary-gateway-field"), "{name}: the upstream saw keygate's value, not the client's");
        }
        assert!(decide_with(&[("cache-control", "public, max-age=1"), ("vary", "Host, Authorization")], true).is_ok());
        // Expires minus Date.
        let e = decide_with(
            &[
                ("cache-control", "public"),
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
            ],
            true,
        );
        assert_eq!(e.map(|p| p.lifetime_ms), Ok(60_000));
        assert_eq!(ok(&[("cache-control", "public"), ("expires", "0")]), Err("stale"), "an invalid Expires is past");
        let status = |s: u16| {
            decide(
                StatusCode::from_u16(s).unwrap(),
                &fields(&[("cache-control", "public, max-age=5")]),
                true,
                &Directives::default(),
                (0, 0),
            )
            .is_ok()
        };
        assert!(status(200) && status(404) && status(301) && status(204));
        assert!(!status(206) && !status(500) && !status(302) && !status(201));
        let no_store = Directives { no_store: true, ..Directives::default() };
        assert_eq!(
            decide(StatusCode::OK, &fields(&[("cache-control", "public, max-age=5")]), true, &no_store, (0, 0)),
            Err("request-no-store")
        );
    }

    fn head<'a>(fields: &'a [Field<'a>], method: Method) -> ReqHead<'a> {
        ReqHead {
            method,
            path: "/r/1",
            query: None,
            version: http::Version::HTTP_11,
            authority: None,
            fields,
            known: Known::classify(fields, None),
        }
    }

    fn cache(max_bytes: u64, max_entry_bytes: u64) -> Arc<RouteCache> {
        let config = CacheConfig { max_bytes, max_entry_bytes, key_by: CacheKeyBy::Token };
        Arc::new(RouteCache::new(config, RouteConfig::new("r", "/r", "http://127.0.0.1:1"), None))
    }

    /// Stores `body` for `uri` (partition `part`) at `now_ms`, fresh for `ttl_s`, the request's
    /// `vary` values given.
    fn put(c: &Arc<RouteCache>, uri: &str, part: &str, vary: Vary, body: &'static [u8], now_ms: i64, ttl_s: u64) {
        let p = Pending {
            uri: uri.into(),
            partition: part.into(),
            vary,
            status: StatusCode::OK,
            fields: fields(&[("x-a", "1"), ("age", "3")]).into_boxed_slice(),
            response_time_ms: now_ms,
            initial_age_ms: 0,
            lifetime_ms: ttl_s * 1000,
            size: ENTRY_OVERHEAD + uri.len() as u64,
            generation: c.generation(uri),
        };
        let mut tap = Tap::Tee(Box::new(Tee {
            cache: c.clone(),
            pending: Some(Box::new(p)),
            chunks: Vec::new(),
            len: 0,
            limit: c.config.max_entry_bytes,
        }));
        let (a, b) = body.split_at(body.len() / 2);
        tap.copy(&Bytes::from_static(a));
        tap.copy(&Bytes::from_static(b));
        tap.complete();
    }

    fn hit(c: &RouteCache, uri: &str, part: &str, h: &ReqHead<'_>, now_ms: i64) -> Result<(Bytes, u64, u64), Fwd> {
        match c.lookup(uri, part, h, &Directives::default(), now_ms) {
            Lookup::Hit { answer, age_s, ttl_s } => Ok((answer.body.clone(), age_s, ttl_s)),
            Lookup::Miss(f) => Err(f),
        }
    }

    #[test]
    fn entries_are_fresh_for_their_lifetime_then_dropped() {
        let c = cache(1 << 20, 1 << 16);
        let none: [Field<'_>; 0] = [];
        let h = head(&none, Method::GET);
        assert_eq!(hit(&c, "/r/1", "", &h, 0), Err(Fwd::UriMiss));
        put(&c, "/r/1", "", Box::default(), b"hello", 1_000, 60);
        assert_eq!(hit(&c, "/r/1", "", &h, 1_000), Ok((Bytes::from_static(b"hello"), 0, 60)));
        assert_eq!(hit(&c, "/r/1", "", &h, 11_500), Ok((Bytes::from_static(b"hello"), 10, 49)));
        assert_eq!(hit(&c, "/r/1", "other", &h, 11_500), Err(Fwd::UriMiss), "another caller's partition");
        let no_cache = Directives { no_cache: true, ..Directives::default() };
        assert!(matches!(c.lookup("/r/1", "", &h, &no_cache, 2_000), Lookup::Miss(Fwd::Request)));
        let young = Directives { max_age: Some(5), ..Directives::default() };
        assert!(matches!(c.lookup("/r/1", "", &h, &young, 7_000), Lookup::Miss(Fwd::Request)));
        assert!(matches!(c.lookup("/r/1", "", &h, &young, 6_000), Lookup::Hit { .. }));
        let min_fresh = Directives { min_fresh: Some(30), ..Directives::default() };
        assert!(matches!(c.lookup("/r/1", "", &h, &min_fresh, 40_000), Lookup::Miss(Fwd::Request)));
        assert_eq!(hit(&c, "/r/1", "", &h, 61_000), Err(Fwd::Stale));
        assert_eq!(hit(&c, "/r/1", "", &h, 61_000), Err(Fwd::UriMiss), "a stale entry is dropped");
        assert_eq!(c.held(), (0, 0));
    }

    #[test]
    fn vary_selects_the_variant() {
        let c = cache(1 << 20, 1 << 16);
        let vary = |v: Option<&str>| -> Vary {
            let f = v.map(|v| [Field { name: "accept-language", value: v.as_bytes() }]);
            let value = f.as_ref().and_then(|f| request_value(&head(f, Method::GET), "accept-language"));
            vec![("accept-language".into(), value)].into_boxed_slice()
        };
        put(&c, "/r/1", "", vary(Some("fr")), b"bonjour", 0, 60);
        put(&c, "/r/1", "", vary(None), b"hello", 0, 60);
        let fr = [Field { name: "Accept-Language", value: b" fr " }];
        let de = [Field { name: "accept-language", value: b"de" }];
        let none: [Field<'_>; 0] = [];
        assert_eq!(hit(&c, "/r/1", "", &head(&fr, Method::GET), 0).unwrap().0, "bonjour");
        assert_eq!(hit(&c, "/r/1", "", &head(&none, Method::GET), 0).unwrap().0, "hello");
        assert_eq!(hit(&c, "/r/1", "", &head(&de, Method::GET), 0), Err(Fwd::VaryMiss));
        let two = [Field { name: "accept-language", value: b"fr" }, Field { name: "Accept-Language", value: b" de" }];
        let one = [Field { name: "accept-language", value: b"fr, de" }];
        let value = |f: &[Field<'_>]| request_value(&head(f, Method::GET), "accept-language");
        assert_eq!(value(&two), value(&one), "several fields read as one list");
        assert_ne!(value(&one), value(&fr));
        // The same variant again replaces the entry.
        put(&c, "/r/1", "", vary(Some("fr")), b"salut", 0, 60);
        assert_eq!(hit(&c, "/r/1", "", &head(&fr, Method::GET), 0).unwrap().0, "salut");
        assert_eq!(c.held().1, 2);
    }

    #[test]
    fn memory_is_bounded_least_recently_used_first() {
        let one = ENTRY_OVERHEAD + 4 + 100;
        let c = cache(3 * one, one);
        let none: [Field<'_>; 0] = [];
        let h = head(&none, Method::GET);
        const BODY: &[u8] = &[b'x'; 100];
        for uri in ["/r/1", "/r/2", "/r/3"] {
            put(&c, uri, "", Box::default(), BODY, 0, 60);
        }
        assert_eq!(c.held(), (3 * one, 3));
        assert!(hit(&c, "/r/1", "", &h, 0).is_ok(), "/r/1 used: /r/2 is now the least recent");
        put(&c, "/r/4", "", Box::default(), BODY, 0, 60);
        assert_eq!(c.held(), (3 * one, 3));
        assert_eq!(hit(&c, "/r/2", "", &h, 0), Err(Fwd::UriMiss), "evicted");
        assert!(hit(&c, "/r/1", "", &h, 0).is_ok() && hit(&c, "/r/3", "", &h, 0).is_ok());
        assert_eq!(c.stats.evictions.load(Ordering::Relaxed), 1);
        // Too large for an entry: not stored, nothing evicted.
        put(&c, "/r/5", "", Box::default(), &[b'y'; 101], 0, 60);
        assert_eq!(hit(&c, "/r/5", "", &h, 0), Err(Fwd::UriMiss));
        assert_eq!(c.held().1, 3);
        // A body that grows past the limit while streaming is dropped at once.
        let mut tee = Tee { cache: c.clone(), pending: None, chunks: Vec::new(), len: 0, limit: 10 };
        tee.copy(&Bytes::from_static(b"0123456789abc"));
        assert!(tee.chunks.is_empty());
    }

    #[test]
    fn unsafe_requests_invalidate_every_variant_and_caller() {
        let c = cache(1 << 20, 1 << 16);
        let none: [Field<'_>; 0] = [];
        let h = head(&none, Method::GET);
        put(&c, "/r/1", "tok:a", Box::default(), b"a", 0, 60);
        put(&c, "/r/1", "tok:b", Box::default(), b"b", 0, 60);
        put(&c, "/r/1?x=1", "tok:a", Box::default(), b"q", 0, 60);
        c.invalidate("/r/1");
        assert_eq!(hit(&c, "/r/1", "tok:a", &h, 0), Err(Fwd::UriMiss));
        assert_eq!(hit(&c, "/r/1", "tok:b", &h, 0), Err(Fwd::UriMiss));
        assert!(hit(&c, "/r/1?x=1", "tok:a", &h, 0).is_ok(), "another query is another URI");
        // An answer in flight while its URI was invalidated is not stored.
        let p = Pending {
            uri: "/r/2".into(),
            partition: "".into(),
            vary: Box::default(),
            status: StatusCode::OK,
            fields: Box::default(),
            response_time_ms: 0,
            initial_age_ms: 0,
            lifetime_ms: 60_000,
            size: ENTRY_OVERHEAD,
            generation: c.generation("/r/2"),
        };
        c.invalidate("/r/2");
        c.insert(p, Bytes::from_static(b"old"));
        assert_eq!(hit(&c, "/r/2", "", &h, 0), Err(Fwd::UriMiss));
    }

    #[test]
    fn requests_with_preconditions_or_ranges_pass_through() {
        for (name, bypass) in [
            ("If-None-Match", false),
            ("if-modified-since", false),
            ("range", true),
            ("If-Match", true),
            ("if-unmodified-since", true),
            ("If-Range", true),
            ("Upgrade", true),
            ("iffy", false),
            ("if", false),
        ] {
            let f = [Field { name, value: b"x" }];
            assert_eq!(bypasses(&head(&f, Method::GET)), bypass, "{name}");
        }
        let f = [Field { name: "Pragma", value: b"no-cache" }];
        assert!(Directives::of_request(&head(&f, Method::GET)).no_cache);
        let f = [Field { name: "Pragma", value: b"no-cache" }, Field { name: "cache-control", value: b"max-age=5" }];
        let d = Directives::of_request(&head(&f, Method::GET));
        assert!(!d.no_cache && d.max_age == Some(5), "Cache-Control wins over Pragma");
    }

    #[test]
    fn preconditions_are_evaluated_against_the_stored_answer() {
        assert_eq!(entity_tags(br#""a", W/"b,c" , *, junk, "unterminated"#), [&br#""a""#[..], br#"W/"b,c""#, b"*"]);
        assert!(entity_tags(b"").is_empty() && entity_tags(b",,").is_empty());
        let stored = |status: u16, list: &[(&str, &str)]| Stored {
            status: StatusCode::from_u16(status).unwrap(),
            fields: fields(list).into_boxed_slice(),
            body: Bytes::new(),
            response_time_ms: 0,
            initial_age_ms: 0,
            lifetime_ms: 1,
        };
        let tagged = stored(200, &[("ETag", "W/\"v1\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        let ask = |name: &'static str, value: &'static str, a: &Stored| {
            let f = [Field { name, value: value.as_bytes() }];
            not_modified(a, &head(&f, Method::GET))
        };
        assert!(ask("If-None-Match", "\"v1\"", &tagged), "weak comparison");
        assert!(ask("if-none-match", "\"v0\", W/\"v1\"", &tagged));
        assert!(ask("if-none-match", "*", &tagged));
        assert!(!ask("if-none-match", "\"v2\"", &tagged));
        assert!(!ask("if-none-match", "\"v1\"", &stored(200, &[])), "nothing to compare with");
        assert!(!ask("if-none-match", "\"v1\"", &stored(404, &[("etag", "\"v1\"")])), "only a 200 or 203");
        assert!(ask("If-Modified-Since", "Sun, 06 Nov 1994 08:49:37 GMT", &tagged));
        assert!(ask("if-modified-since", "Mon, 07 Nov 1994 08:49:37 GMT", &tagged));
        assert!(!ask("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT", &tagged));
        assert!(!ask("if-modified-since", "yesterday", &tagged), "an invalid date is ignored");
        // If-None-Match decides when both are there.
        let both = [
            Field { name: "if-none-match", value: b"\"v2\"" },
            Field { name: "if-modified-since", value: b"Mon, 07 Nov 1994 08:49:37 GMT" },
        ];
        assert!(!not_modified(&tagged, &head(&both, Method::GET)));
    }

    #[test]
    fn header_parsers_take_any_bytes() {
        // Deterministic noise from the characters these grammars care about.
        const ALPHABET: &[u8] = b"aZ09=,;\"\\/W* \t-\x00\x7f\xff";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| ALPHABET[((x >> (i % 56)) as usize + i) % ALPHABET.len()]).collect();
            let d = Directives::parse([bytes.as_slice()]);
            assert!(d.max_age.is_none_or(|m| m <= DELTA_MAX));
            for t in entity_tags(&bytes) {
                assert!(t == b"*" || t.ends_with(b"\""), "{t:?}");
            }
        }
    }

    #[test]
    fn memory_bodies_are_given_once() {
        let mut t = Tap::Memory(Some(Bytes::from_static(b"abc")));
        assert_eq!(t.memory_len(), Some(3));
        assert_eq!(t.take_memory(), Some(Some(Bytes::from_static(b"abc"))));
        assert_eq!(t.memory_len(), Some(0));
        assert_eq!(t.take_memory(), Some(None));
    }
}
