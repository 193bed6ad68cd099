//! The call log (issue 15): one record per gateway call — when, which token and app, the route,
//! method and normalized path (never the query), the status, the latency, the client's address
//! and the refusal reason — kept in memory per worker thread and written to the store in
//! batches by a background task ([`crate::tasks::spawn_call_writer`]), off the request path.
//!
//! The writer packs each token's calls into a chunk ([`keygate_core::calls`]) that it holds open
//! for [`HOLD_MS`] (or until it is full) before writing it: a token that calls a few times a
//! second costs the store one row per ten seconds rather than one per second, which is what the
//! store's CPU goes into (docs/benchmarks.md). What is held is bounded ([`MAX_HELD_BYTES`];
//! beyond it everything is written at once).
//!
//! A request costs one uncontended lock and a push of 64 bytes (one cache line, [`Kept`]): the
//! workspace, app and route ids are kept once per shard and buffer ([`Names`]) and a call holds
//! their positions, so recording clones no `Arc` that both workers share (an atomic on a cache
//! line the other worker writes too), and the path is appended to the shard's text rather than
//! allocated. A worker gets back the buffer it filled, with its room, so steady traffic does not
//! grow one again each second. A shard's
//! buffer is bounded ([`MAX_PENDING`] calls, [`MAX_PENDING_BYTES`] of paths); calls that find it
//! full are dropped and counted ([`CallLog::dropped`], in `/metrics`), so a store that cannot keep
//! up slows nothing and grows nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use keygate_core::calls::{CallChunk, CallFields, ChunkBuilder};
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::token_format::PUBLIC_ID_LEN;
use parking_lot::Mutex;

const SHARDS: usize = 8;
/// Calls waiting per shard at most (64 bytes each, and their paths).
pub const MAX_PENDING: usize = 65_536;
/// Bytes of paths waiting per shard at most.
pub const MAX_PENDING_BYTES: usize = 8 << 20;
/// How long the writer holds a token's chunk open before writing it.
pub const HOLD_MS: i64 = 10_000;
/// Bytes of open chunks the writer holds at most (about 10–20 per call); beyond it, every open
/// chunk is written at once.
pub const MAX_HELD_BYTES: usize = 32 << 20;

type Key = (Arc<str>, Option<[u8; PUBLIC_ID_LEN]>, Option<Arc<str>>);

/// A token's chunk being written, and when the writer opened it.
struct Open {
    opened_ms: i64,
    builder: ChunkBuilder,
}

fn finish((ws, token, app): Key, b: ChunkBuilder) -> CallChunk {
    CallChunk::new(
        WorkspaceId::from_trusted(ws.to_string()),
        token.map(|t| TokenId::from_public_id(std::str::from_utf8(&t).unwrap_or_default())),
        app.map(|a| AppId::from_trusted(a.to_string())),
        b,
    )
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// One call, as the gateway records it (borrowed: [`CallLog::record`] copies what it keeps).
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub at_ms: i64,
    pub workspace_id: &'a str,
    pub token: Option<[u8; PUBLIC_ID_LEN]>,
    pub app_id: Option<&'a str>,
    pub route: Option<&'a str>,
    pub method: &'a Method,
    /// The normalized path, without the query.
    pub path: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub ip: IpAddr,
    pub refusal: Option<&'static str>,
}

/// A name's position in its buffer's [`Names`]; `NONE` for none.
type NameAt = u32;
const NONE: NameAt = u32::MAX;

/// A call as a shard keeps it, in 64 bytes (one cache line; a busy worker writes tens of
/// thousands a second, and what it stores is memory the writer read a second ago, no longer in
/// cache): the ids (and an extension method's name) as positions in the buffer's [`Names`], the
/// time from the buffer's first call, the path as where it ends in the buffer's text (it begins
/// where the previous call's ends), the refusal as a position in the buffer's list of them.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Milliseconds after the buffer's `base_ms` (a call is recorded when it ends, so an earlier
    /// one can come later: it may be negative).
    at: i32,
    workspace: NameAt,
    app: NameAt,
    route: NameAt,
    /// One of [`METHODS`] by position, or [`METHODS`]`.len()` plus the name's position.
    method: u32,
    path_end: u32,
    latency_us: u64,
    status: u16,
    /// 0 for none, else one more than the refusal's position in the buffer's `refusals`.
    refusal: u8,
    /// The client's address, IPv4 as IPv4-mapped IPv6.
    ip: [u8; 16],
    /// The token's public id; zeros for none (a public id is never zeros: it is base62 text).
    token: [u8; PUBLIC_ID_LEN],
}

const _: () = assert!(size_of::<Kept>() == 64, "a kept call is one cache line");

/// The methods a call names by position rather than by a name of its buffer.
const METHODS: [Method; 9] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

/// The ids (workspace, app, route) a buffer's calls name, each once. A request looks its names
/// up in this shard-local table (in cache, its own) instead of cloning the gateway's shared
/// `Arc`s; a name is allocated once per buffer, by the first call that names it.
#[derive(Default)]
struct Names {
    list: Vec<Arc<str>>,
    at: hashbrown::HashTable<NameAt>,
    hasher: foldhash::fast::FixedState,
}

impl Names {
    fn intern(&mut self, name: &str) -> NameAt {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(name);
        let list = &mut self.list;
        let hasher = &self.hasher;
        *self
            .at
            .entry(hash, |&i| *list[i as usize] == *name, |&i| hasher.hash_one(&*list[i as usize]))
            .or_insert_with(|| {
                list.push(Arc::from(name));
                (list.len() - 1) as NameAt
            })
            .get()
    }

    /// [`Names::intern`], with the number the same field had in the call before: a text equal
    /// to that one (a worker's calls mostly share their workspace, app and route) costs a
    /// comparison instead of a hash and a probe.
    fn intern_after(&mut self, name: &str, before: NameAt) -> NameAt {
        match self.get(before) {
            Some(have) if **have == *name => before,
            _ => self.intern(name),
        }
    }

    fn get(&self, at: NameAt) -> Option<&Arc<str>> {
        self.list.get(at as usize)
    }

    fn clear(&mut self) {
        self.list.clear();
        self.at.clear();
    }
}

/// What a shard holds until the writer takes it.
#[derive(Default)]
struct Pending {
    calls: Vec<Kept>,
    names: Names,
    /// The calls' paths, one after the other.
    paths: String,
    /// The time the calls' `at` counts from: the first call's.
    base_ms: i64,
    /// The refusal reasons the calls name, each once (static text: a few dozen at most).
    refusals: Vec<&'static str>,
    /// Bytes of extension methods' names recorded (counted against [`MAX_PENDING_BYTES`]).
    other_bytes: usize,
}

impl Pending {
    fn at_ms(&self, c: &Kept) -> i64 {
        self.base_ms + i64::from(c.at)
    }

    fn method<'a>(&'a self, c: &Kept) -> &'a str {
        match METHODS.get(c.method as usize) {
            Some(m) => m.as_str(),
            None => self.names.get(c.method - METHODS.len() as u32).map_or("", |m| &**m),
        }
    }

    fn refusal(&self, c: &Kept) -> Option<&'static str> {
        c.refusal.checked_sub(1).and_then(|i| self.refusals.get(usize::from(i)).copied())
    }

    /// Emptied for reuse with the room it used, so that a worker's steady traffic fills a
    /// buffer without growing it (a copy and fresh pages each time, the stores into which the
    /// shard's lock release then waits for: docs/benchmarks.md). Room over twice what it held
    /// (and over [`SPARE_CALLS`] calls') is given back, so one burst does not keep its memory.
    fn recycle(&mut self) {
        let calls = self.calls.len().max(SPARE_CALLS);
        let bytes = self.paths.len().max(SPARE_CALLS * 32);
        self.calls.clear();
        if self.calls.capacity() > 2 * calls {
            self.calls.shrink_to(calls);
        }
        self.names.clear();
        self.refusals.clear();
        self.other_bytes = 0;
        self.paths.clear();
        if self.paths.capacity() > 2 * bytes {
            self.paths.shrink_to(bytes);
        }
    }
}

#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Pending>);

/// A [`Key`] borrowed from a call, to find its open chunk without cloning the key's `Arc`s
/// (hashed as the key is).
#[derive(Hash)]
struct KeyRef<'a>(&'a str, Option<[u8; PUBLIC_ID_LEN]>, Option<&'a str>);

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, k: &Key) -> bool {
        *self.0 == *k.0 && self.1 == k.1 && self.2 == k.2.as_deref()
    }
}

/// Room a recycled buffer keeps at least, in calls (and 32 bytes of path each).
const SPARE_CALLS: usize = 16_384;

/// What only the writer touches.
#[derive(Default)]
struct Writer {
    /// The chunks held open, by workspace, token and app.
    open: hashbrown::HashMap<Key, Open, foldhash::fast::RandomState>,
    /// Each shard's emptied buffer (by shard), swapped for its full one at the next write: a
    /// worker gets back the buffer it filled, with the room its traffic needs already made, and
    /// the writer allocates nothing per call. (One pool for all shards handed an idle shard's
    /// empty buffer to a busy worker every other write, to grow again from nothing.)
    spare: Vec<Pending>,
    /// Client addresses as text, each formatted once per write (a token's calls mostly share
    /// one); emptied with its room kept.
    ips: hashbrown::HashMap<[u8; 16], String, foldhash::fast::RandomState>,
    /// The calls of a write by token, then in time order.
    order: Vec<Ordered>,
}

/// A call's place in a write: what sorting and grouping need of it, gathered in one pass over
/// each shard's buffer in its own order, so that after the sort each call is read once, for its
/// fields. (Sorting bare positions read every call three times in token order, which is no
/// order of the buffers: its token, the previous call's path end, then its fields — a cache miss
/// each, most of the time `ready_chunks` took: docs/benchmarks.md.)
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Ordered {
    /// The token's public id as a big-endian number (its bytes in the high 96 bits): ordered as
    /// the bytes are, compared without a call to `memcmp`.
    token: u128,
    at_ms: i64,
    shard: u32,
    index: u32,
    /// Where the call's path begins in its buffer's text (where the previous call's ends).
    path_from: u32,
    workspace: NameAt,
    app: NameAt,
}

impl Ordered {
    fn token(&self) -> Option<[u8; PUBLIC_ID_LEN]> {
        let mut t = [0; PUBLIC_ID_LEN];
        t.copy_from_slice(&self.token.to_be_bytes()[..PUBLIC_ID_LEN]);
        (t != [0; PUBLIC_ID_LEN]).then_some(t)
    }
}

/// Calls recorded and not yet written.
pub struct CallLog {
    shards: Vec<Shard>,
    writer: Mutex<Writer>,
    /// Calls dropped because their shard's buffer was full.
    pub dropped: AtomicU64,
    /// Calls written to the store.
    pub written: AtomicU64,
}

impl Default for CallLog {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            writer: Mutex::default(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }
}

impl CallLog {
    pub fn record(&self, call: &Call<'_>) {
        let Some(shard) = self.shards.get(SHARD.with(|i| *i)) else { return };
        let mut pending = shard.0.lock();
        // An extension method's name (its text comes from the request) counts against the
        // bytes like a path, each time, so the names a buffer interns stay within the bound.
        let standard = METHODS.iter().position(|m| m == call.method);
        let method_bytes = if standard.is_some() { 0 } else { call.method.as_str().len() };
        let bytes = pending.paths.len() + pending.other_bytes + call.path.len() + method_bytes;
        if pending.calls.len() >= MAX_PENDING || bytes > MAX_PENDING_BYTES {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let p = &mut *pending;
        if p.calls.is_empty() {
            p.base_ms = call.at_ms;
        }
        p.paths.push_str(call.path);
        p.other_bytes += method_bytes;
        let method = match standard {
            Some(i) => i as u32,
            None => METHODS.len() as u32 + p.names.intern(call.method.as_str()),
        };
        let refusal = call.refusal.map_or(0, |r| match p.refusals.iter().position(|have| *have == r) {
            Some(i) => i + 1,
            None => {
                p.refusals.push(r);
                p.refusals.len()
            }
        });
        let before = p.calls.last().map_or((NONE, NONE, NONE), |c| (c.workspace, c.app, c.route));
        let kept = Kept {
            at: i32::try_from(call.at_ms.saturating_sub(p.base_ms)).unwrap_or(if call.at_ms < p.base_ms {
                i32::MIN
            } else {
                i32::MAX
            }),
            workspace: p.names.intern_after(call.workspace_id, before.0),
            app: call.app_id.map_or(NONE, |a| p.names.intern_after(a, before.1)),
            route: call.route.map_or(NONE, |r| p.names.intern_after(r, before.2)),
            method,
            path_end: p.paths.len() as u32,
            latency_us: call.latency_us,
            status: call.status,
            refusal: u8::try_from(refusal).unwrap_or(0),
            ip: match call.ip {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            },
            token: call.token.unwrap_or([0; PUBLIC_ID_LEN]),
        };
        p.calls.push(kept);
    }

    /// Calls waiting to be written (recorded, or held in an open chunk).
    pub fn pending(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().calls.len()).sum::<usize>()
            + self.writer.lock().open.values().map(|o| o.builder.len()).sum::<usize>()
    }

    /// Moves the calls recorded so far into the open chunks, and takes the chunks to write:
    /// those open for [`HOLD_MS`] at `now_ms`, those full, or all of them when `everything` is
    /// set or more than [`MAX_HELD_BYTES`] are held. Ordered by their newest call.
    pub fn ready_chunks(&self, now_ms: i64, everything: bool) -> Vec<CallChunk> {
        use std::fmt::Write as _;
        let mut w = self.writer.lock();
        let w = &mut *w;
        // Each shard's buffer, swapped for an empty one with room.
        w.spare.resize_with(self.shards.len(), Pending::default);
        let taken: Vec<Pending> = self
            .shards
            .iter()
            .zip(&mut w.spare)
            .map(|(shard, spare)| {
                let mut spare = std::mem::take(spare);
                std::mem::swap(&mut *shard.0.lock(), &mut spare);
                spare
            })
            .collect();
        // Oldest first (a worker records a call when it ends, so its buffer is only nearly in
        // order); ties in recording order.
        w.order.clear();
        for (s, p) in taken.iter().enumerate() {
            let mut path_from = 0;
            w.order.extend(p.calls.iter().enumerate().map(|(i, c)| {
                let mut token = [0; 16];
                token[..PUBLIC_ID_LEN].copy_from_slice(&c.token);
                let o = Ordered {
                    token: u128::from_be_bytes(token),
                    at_ms: p.at_ms(c),
                    shard: s as u32,
                    index: i as u32,
                    path_from,
                    workspace: c.workspace,
                    app: c.app,
                };
                path_from = c.path_end;
                o
            }));
        }
        // By token, then oldest first (a worker records a call when it ends, so its buffer is
        // only nearly in order; ties in recording order): a token's calls follow each other, and
        // its open chunk is looked up once per write rather than once per call.
        w.order.sort_unstable();
        let mut ready = Vec::new();
        let ips = &mut w.ips;
        ips.clear();
        // The names lists are small and in cache: grouping reads no call.
        let key_of = |o: &Ordered| {
            let p = &taken[o.shard as usize];
            let key = p.names.get(o.workspace).map(|ws| (ws, o.token(), p.names.get(o.app)));
            (p, key)
        };
        let mut run = 0;
        while let Some(head) = w.order.get(run) {
            // A run: the calls of one workspace, token and app, one after the other.
            let (_, first) = key_of(head);
            let end = run
                + 1
                + w.order[run + 1..]
                    .iter()
                    .take_while(|e| {
                        let (_, k) = key_of(e);
                        k.map(|(ws, t, app)| (&**ws, t, app.map(|a| &**a)))
                            == first.map(|(ws, t, app)| (&**ws, t, app.map(|a| &**a)))
                    })
                    .count();
            let calls = &w.order[run..end];
            run = end;
            let Some((workspace, token, app)) = first else { continue };
            let owned = || (workspace.clone(), token, app.cloned());
            let open = match w.open.get_mut(&KeyRef(workspace, token, app.map(|a| &**a))) {
                Some(o) => o,
                None => w.open.entry(owned()).or_insert(Open { opened_ms: now_ms, builder: ChunkBuilder::default() }),
            };
            for e in calls {
                let p = &taken[e.shard as usize];
                let Some(c) = p.calls.get(e.index as usize) else { continue };
                let ip = ips.entry(c.ip).or_insert_with(|| {
                    let mut s = String::new();
                    let _ = write!(s, "{}", IpAddr::from(c.ip).to_canonical());
                    s
                });
                let fields = CallFields {
                    at_ms: e.at_ms,
                    method: p.method(c),
                    route: p.names.get(c.route).map(|r| &**r),
                    path: p.paths.get(e.path_from as usize..c.path_end as usize).unwrap_or_default(),
                    status: c.status,
                    latency_us: c.latency_us,
                    client_ip: ip,
                    refusal: p.refusal(c),
                };
                if !open.builder.push(&fields) {
                    let full = std::mem::take(&mut open.builder);
                    open.opened_ms = now_ms;
                    open.builder.push(&fields);
                    ready.push(finish(owned(), full));
                }
            }
        }
        for (mut p, spare) in taken.into_iter().zip(&mut w.spare) {
            p.recycle();
            *spare = p;
        }
        let everything = everything || w.open.values().map(|o| o.builder.held_bytes()).sum::<usize>() > MAX_HELD_BYTES;
        ready.extend(
            w.open
                .extract_if(|_, o| everything || now_ms.saturating_sub(o.opened_ms) >= HOLD_MS)
                .map(|(k, o)| finish(k, o.builder)),
        );
        ready.sort_by_key(|c| c.last_at);
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static GET: Method = Method::GET;

    fn call(at_ms: i64) -> Call<'static> {
        Call {
            at_ms,
            workspace_id: "ws_1",
            token: Some(*b"abcdefghijkl"),
            app_id: Some("app_1"),
            route: Some("orders"),
            method: &GET,
            path: "/orders/7",
            status: 200,
            latency_us: 420,
            ip: "::ffff:203.0.113.7".parse().unwrap(),
            refusal: None,
        }
    }

    fn decoded(c: &CallChunk) -> Vec<keygate_core::model::CallRecord> {
        let row = keygate_core::calls::ChunkRow {
            id: 1,
            workspace_id: &c.workspace_id,
            token_id: c.token_id.as_ref(),
            app_id: c.app_id.as_ref(),
        };
        keygate_core::calls::decode_chunk(&c.data, row).unwrap()
    }

    #[test]
    fn calls_become_chunks_in_order() {
        let log = CallLog::default();
        log.record(&call(2));
        log.record(&call(1));
        log.record(&Call { token: None, app_id: None, ..call(3) });
        assert_eq!(log.pending(), 3);
        let chunks = log.ready_chunks(0, true);
        assert_eq!(log.pending(), 0);
        assert_eq!(chunks.len(), 2, "one per token");
        let c = &chunks[0];
        assert_eq!(
            (c.token_id.as_ref().unwrap().as_str(), c.calls, c.first_at, c.last_at),
            ("tok_abcdefghijkl", 2, 1, 2)
        );
        let r = decoded(c);
        assert_eq!(r.iter().map(|r| r.at.as_millis()).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            (r[0].method.as_str(), r[0].path.as_str(), r[0].client_ip.as_str()),
            ("GET", "/orders/7", "203.0.113.7")
        );
        assert_eq!((r[0].app_id.as_ref().unwrap().as_str(), r[0].route.as_deref()), ("app_1", Some("orders")));
        assert_eq!((chunks[1].token_id.clone(), chunks[1].calls), (None, 1));
    }

    #[test]
    fn calls_of_several_workers_are_merged_in_time_order() {
        let log = Arc::new(CallLog::default());
        for round in 0..3i64 {
            let threads: Vec<_> = (0..3i64)
                .map(|t| {
                    let log = log.clone();
                    // Each worker's calls in its own order, interleaved in time with the others'.
                    std::thread::spawn(move || {
                        (0..100).rev().for_each(|i| log.record(&call(round * 1_000 + i * 3 + t)))
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let chunks = log.ready_chunks(0, true);
            assert_eq!(chunks.len(), 1);
            let at: Vec<i64> = decoded(&chunks[0]).iter().map(|r| r.at.as_millis()).collect();
            assert_eq!(at, (0..300).map(|i| round * 1_000 + i).collect::<Vec<_>>(), "round {round}");
        }
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn a_chunk_is_held_until_it_is_old_or_full() {
        let log = CallLog::default();
        log.record(&call(1));
        assert!(log.ready_chunks(1_000, false).is_empty(), "held");
        log.record(&call(2));
        assert!(log.ready_chunks(1_000 + HOLD_MS - 1, false).is_empty());
        assert_eq!(log.pending(), 2);
        let ready = log.ready_chunks(1_000 + HOLD_MS, false);
        assert_eq!(ready.iter().map(|c| c.calls).collect::<Vec<_>>(), [2]);
        // A full chunk goes at once; the call that did not fit opens the next.
        for i in 0..=keygate_core::calls::CHUNK_CALLS {
            log.record(&call(i as i64));
        }
        let ready = log.ready_chunks(50_000, false);
        assert_eq!(ready.iter().map(|c| c.calls).collect::<Vec<_>>(), [keygate_core::calls::CHUNK_CALLS]);
        assert_eq!(log.pending(), 1);
    }

    #[test]
    fn what_is_held_is_bounded() {
        let log = CallLog::default();
        // Long distinct paths: beyond the bound, everything is written at once.
        let long = "x".repeat(4_000);
        let n = MAX_HELD_BYTES / 4_000 / 8 + 1;
        for round in 0..8u8 {
            // A token per round, so that no chunk fills up.
            let mut token = *b"abcdefghijkl";
            token[11] = b'a' + round;
            for i in 0..n {
                log.record(&Call { path: &format!("/{long}/{round}/{i}"), token: Some(token), ..call(1) });
            }
            let ready = log.ready_chunks(1, false);
            if round < 7 {
                assert!(ready.is_empty(), "round {round}");
            } else {
                assert_eq!(ready.iter().map(|c| c.calls).sum::<usize>(), 8 * n, "all written");
            }
        }
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn each_call_keeps_its_own_names_and_path() {
        let log = CallLog::default();
        let paths: Vec<String> = (0..6).map(|i| format!("/p/{i}")).collect();
        for (i, path) in paths.iter().enumerate() {
            let ws = if i % 2 == 0 { "ws_even" } else { "ws_odd" };
            let route = (i % 3 == 0).then_some("r0");
            log.record(&Call { workspace_id: ws, route, path, at_ms: i as i64, ..call(0) });
        }
        let chunks = log.ready_chunks(0, true);
        assert_eq!(chunks.len(), 2);
        for c in &chunks {
            let odd = c.workspace_id.as_str() == "ws_odd";
            let got: Vec<(String, Option<String>)> = decoded(c).into_iter().map(|r| (r.path, r.route)).collect();
            let want: Vec<(String, Option<String>)> = (0..6)
                .filter(|i| (i % 2 == 1) == odd)
                .map(|i| (format!("/p/{i}"), (i % 3 == 0).then(|| "r0".to_owned())))
                .collect();
            assert_eq!(got, want, "{}", c.workspace_id.as_str());
        }
        // The buffers are reused: a second write names its own.
        log.record(&Call { workspace_id: "ws_third", ..call(9) });
        let chunks = log.ready_chunks(0, true);
        assert_eq!(chunks[0].workspace_id.as_str(), "ws_third");
        assert_eq!(decoded(&chunks[0])[0].path, "/orders/7");
    }

    #[test]
    fn each_call_keeps_its_own_workspace_app_and_route_when_the_one_before_differs() {
        // The names a call shares with the call before are reused, the others looked up: calls
        // that alternate every field must each come back with their own.
        let log = CallLog::default();
        let fields =
            [("ws_1", Some("app_1"), Some("orders")), ("ws_2", Some("app_2"), None), ("ws_1", None, Some("users"))];
        for i in 0..9 {
            let (workspace_id, app_id, route) = fields[i % 3];
            let token = *format!("token{i:07}").as_bytes().first_chunk::<PUBLIC_ID_LEN>().unwrap();
            log.record(&Call { workspace_id, app_id, route, token: Some(token), ..call(i as i64) });
        }
        let mut got: Vec<_> = log
            .ready_chunks(0, true)
            .iter()
            .map(|c| {
                let r = decoded(c);
                assert_eq!(r.len(), 1);
                let app = c.app_id.as_ref().map(|a| a.as_str().to_owned());
                (r[0].at.as_millis(), c.workspace_id.as_str().to_owned(), app, r[0].route.clone())
            })
            .collect();
        got.sort();
        for (i, (at, ws, app, route)) in got.into_iter().enumerate() {
            let (w, a, r) = fields[i % 3];
            assert_eq!((at, ws.as_str(), app.as_deref(), route.as_deref()), (i as i64, w, a, r), "call {i}");
        }
    }

    #[test]
    fn a_kept_call_gives_back_every_field_as_recorded() {
        let log = CallLog::default();
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        // Recorded when they end: the second began before the first (a negative offset).
        log.record(&Call {
            at_ms: 1_700_000_000_500,
            method: &propfind,
            status: 401,
            latency_us: u64::MAX,
            refusal: Some("unknown_token"),
            ip: "2001:db8::7".parse().unwrap(),
            ..call(0)
        });
        log.record(&Call { at_ms: 1_700_000_000_100, refusal: Some("rate_limited"), status: 429, ..call(0) });
        log.record(&Call { at_ms: 1_700_000_000_900, refusal: Some("unknown_token"), ..call(0) });
        let chunks = log.ready_chunks(0, true);
        let r = decoded(&chunks[0]);
        let got: Vec<_> = r
            .iter()
            .map(|r| {
                (
                    r.at.as_millis(),
                    r.method.as_str(),
                    r.status,
                    r.latency_us,
                    r.client_ip.as_str(),
                    r.refusal.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1_700_000_000_100, "GET", 429, 420, "203.0.113.7", Some("rate_limited")),
                (1_700_000_000_500, "PROPFIND", 401, u64::MAX, "2001:db8::7", Some("unknown_token")),
                (1_700_000_000_900, "GET", 200, 420, "203.0.113.7", Some("unknown_token")),
            ]
        );
    }

    #[test]
    fn a_worker_gets_back_the_buffer_it_filled_with_its_room() {
        let log = CallLog::default();
        let busy = 3 * SPARE_CALLS;
        let room = |log: &CallLog| -> Vec<usize> { log.shards.iter().map(|s| s.0.lock().calls.capacity()).collect() };
        for round in 0..4 {
            // All recorded from this thread: one shard. From the second write on, the buffer it
            // records into is the one it filled two writes ago, with that room (one pool for all
            // shards handed it an idle shard's empty buffer every other write).
            if round >= 2 {
                assert!(room(&log).iter().any(|r| *r >= busy), "round {round}: {:?}", room(&log));
            }
            for i in 0..busy {
                log.record(&call(i as i64));
            }
            log.ready_chunks(0, true);
        }
        // Room over twice what a write held is given back.
        for _ in 0..2 {
            log.record(&call(1));
            log.ready_chunks(0, true);
        }
        assert!(room(&log).iter().all(|r| *r < busy), "{:?}", room(&log));
    }

    #[test]
    fn the_paths_held_are_bounded() {
        let log = CallLog::default();
        let long = "y".repeat(MAX_PENDING_BYTES / 4);
        for _ in 0..5 {
            log.record(&Call { path: &long, ..call(1) });
        }
        assert_eq!(log.pending(), 4);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn extension_methods_count_against_the_bytes_held() {
        let log = CallLog::default();
        let long = Method::from_bytes("X".repeat(MAX_PENDING_BYTES / 4).as_bytes()).unwrap();
        for _ in 0..5 {
            log.record(&Call { method: &long, path: "/", ..call(1) });
        }
        assert_eq!(log.pending(), 3, "paths and method names within the bound");
        assert_eq!(log.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let log = CallLog::default();
        for i in 0..(MAX_PENDING + 5) {
            log.record(&call(i as i64));
        }
        assert_eq!(log.pending(), MAX_PENDING);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 5);
    }
}
