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
//! A request costs one uncontended lock and a push of about 60 bytes: the workspace, app and
//! route ids are kept once per shard and buffer ([`Names`]) and a call holds their positions, so
//! recording clones no `Arc` that both workers share (an atomic on a cache line the other worker
//! writes too), and the path is appended to the shard's text rather than allocated. A shard's
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
/// Calls waiting per shard at most (about 60 bytes each, and their paths).
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

/// A call as a shard keeps it: the ids as positions in the shard's [`Names`], the path as a
/// range of its text.
#[derive(Debug, Clone)]
struct Kept {
    at_ms: i64,
    token: Option<[u8; PUBLIC_ID_LEN]>,
    workspace: NameAt,
    app: NameAt,
    route: NameAt,
    method: Method,
    path: (u32, u32),
    status: u16,
    latency_us: u64,
    ip: IpAddr,
    refusal: Option<&'static str>,
}

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
}

impl Pending {
    fn path(&self, (from, len): (u32, u32)) -> &str {
        self.paths.get(from as usize..(from + len) as usize).unwrap_or_default()
    }

    /// Emptied for reuse, keeping at most [`SPARE_CALLS`] calls' room.
    fn recycle(&mut self) {
        self.calls.clear();
        self.calls.shrink_to(SPARE_CALLS);
        self.names.clear();
        self.paths.clear();
        self.paths.shrink_to(SPARE_CALLS * 32);
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

/// Buffers a shard gives back to the writer keep at most this many calls' room, so that one
/// burst does not hold its memory for good.
const SPARE_CALLS: usize = 16_384;

/// What only the writer touches.
#[derive(Default)]
struct Writer {
    /// The chunks held open, by workspace, token and app.
    open: hashbrown::HashMap<Key, Open, foldhash::fast::RandomState>,
    /// Emptied shard buffers, swapped for the full ones at the next write: a worker keeps a
    /// buffer with room already made, and the writer allocates nothing per call.
    spare: Vec<Pending>,
    /// The calls of a write by token, then in time order: (token, time, shard, index).
    order: Vec<(Option<[u8; PUBLIC_ID_LEN]>, i64, u32, u32)>,
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
        if pending.calls.len() >= MAX_PENDING || pending.paths.len() + call.path.len() > MAX_PENDING_BYTES {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let p = &mut *pending;
        let from = p.paths.len() as u32;
        p.paths.push_str(call.path);
        let kept = Kept {
            at_ms: call.at_ms,
            token: call.token,
            workspace: p.names.intern(call.workspace_id),
            app: call.app_id.map_or(NONE, |a| p.names.intern(a)),
            route: call.route.map_or(NONE, |r| p.names.intern(r)),
            method: call.method.clone(),
            path: (from, call.path.len() as u32),
            status: call.status,
            latency_us: call.latency_us,
            ip: call.ip,
            refusal: call.refusal,
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
        let taken: Vec<Pending> = self
            .shards
            .iter()
            .map(|shard| {
                let mut spare = w.spare.pop().unwrap_or_default();
                std::mem::swap(&mut *shard.0.lock(), &mut spare);
                spare
            })
            .collect();
        // Oldest first (a worker records a call when it ends, so its buffer is only nearly in
        // order); ties in recording order.
        w.order.clear();
        for (s, p) in taken.iter().enumerate() {
            w.order.extend(p.calls.iter().enumerate().map(|(i, c)| (c.token, c.at_ms, s as u32, i as u32)));
        }
        // By token, then oldest first (a worker records a call when it ends, so its buffer is
        // only nearly in order; ties in recording order): a token's calls follow each other, and
        // its open chunk is looked up once per write rather than once per call.
        w.order.sort_unstable();
        let mut ready = Vec::new();
        // Addresses as text, each formatted once per write (a token's calls mostly share one).
        let mut ips: hashbrown::HashMap<IpAddr, String, foldhash::fast::RandomState> = Default::default();
        let key_of = |&(_, _, s, i): &(Option<[u8; PUBLIC_ID_LEN]>, i64, u32, u32)| {
            let p = &taken[s as usize];
            let c = &p.calls[i as usize];
            let key = p.names.get(c.workspace).map(|ws| (ws, c.token, p.names.get(c.app)));
            (p, c, key)
        };
        let mut run = 0;
        while let Some(head) = w.order.get(run) {
            // A run: the calls of one workspace, token and app, one after the other.
            let (_, _, first) = key_of(head);
            let end = run
                + 1
                + w.order[run + 1..]
                    .iter()
                    .take_while(|e| {
                        let (_, _, k) = key_of(e);
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
                let (p, c, _) = key_of(e);
                let ip = ips.entry(c.ip).or_insert_with(|| {
                    let mut s = String::new();
                    let _ = write!(s, "{}", c.ip.to_canonical());
                    s
                });
                let fields = CallFields {
                    at_ms: c.at_ms,
                    method: c.method.as_str(),
                    route: p.names.get(c.route).map(|r| &**r),
                    path: p.path(c.path),
                    status: c.status,
                    latency_us: c.latency_us,
                    client_ip: ip,
                    refusal: c.refusal,
                };
                if !open.builder.push(&fields) {
                    let full = std::mem::take(&mut open.builder);
                    open.opened_ms = now_ms;
                    open.builder.push(&fields);
                    ready.push(finish(owned(), full));
                }
            }
        }
        for mut p in taken {
            p.recycle();
            w.spare.push(p);
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
    fn a_full_buffer_drops_and_counts() {
        let log = CallLog::default();
        for i in 0..(MAX_PENDING + 5) {
            log.record(&call(i as i64));
        }
        assert_eq!(log.pending(), MAX_PENDING);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 5);
    }
}
