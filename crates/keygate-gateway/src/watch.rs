//! What each token does, counted for anomaly detection (issue 15; the detectors are in
//! [`keygate_core::anomaly`]): per API key (or OAuth client, for its JWT access tokens) and window (a second, between two drains), its requests,
//! refusals, server errors, old-secret presentations, source networks, routes with methods and
//! user agents.
//!
//! Like the usage meter, counts live in one shard per worker thread, so a request takes one
//! uncontended lock and one lookup of an entry of one cache-line pair ([`Counts`]); a value
//! already in the token's short lists costs a comparison, a new one a push. Everything is bounded: [`MAX_TOKENS`] tokens per shard and
//! window (requests of more are counted as dropped), [`MAX_VALUES`] values per list (more are
//! counted in the token's overflow).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use keygate_core::anomaly::{Activity, Watched, agent_label};
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::token_format::PUBLIC_ID_LEN;
use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as Slot;
use parking_lot::Mutex;

const SHARDS: usize = 8;
/// Tokens counted per shard and window (a window is one to five seconds, the detector's turn).
pub const MAX_TOKENS: usize = 32_768;
/// Networks, routes and user agents kept per token and window.
pub const MAX_VALUES: usize = 16;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// One request, as the watch counts it.
pub struct Seen<'a> {
    /// An API key's public id, or an OAuth client's watch key (`JwtIdentity::watch_key`).
    pub public_id: &'a [u8; PUBLIC_ID_LEN],
    /// For an OAuth client's JWT access token: the client's id.
    pub client: Option<&'a Arc<str>>,
    pub workspace_id: &'a Arc<str>,
    pub app_id: &'a Arc<str>,
    /// The route's id; `None` for a request refused before its route was known.
    pub route: Option<&'a Arc<str>>,
    pub method: &'a Method,
    pub status: u16,
    /// Refused for the token's scope or address, or because it is stopped.
    pub refused: bool,
    /// The secret was replaced by a rotation and its grace is over.
    pub old_secret: bool,
    pub ip: IpAddr,
    pub agent: Option<&'a [u8]>,
}

/// A network as a number: the /24 of an IPv4 address, the /48 of an IPv6 one, tagged.
fn network_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            (4 << 56) | (u64::from(a) << 16) | (u64::from(b) << 8) | u64::from(c)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (6 << 56) | (u64::from(s[0]) << 32) | (u64::from(s[1]) << 16) | u64::from(s[2])
        }
    }
}

fn network_label(key: u64) -> String {
    let ip = if key >> 56 == 4 {
        IpAddr::from([(key >> 16) as u8, (key >> 8) as u8, key as u8, 0])
    } else {
        IpAddr::from(std::net::Ipv6Addr::new((key >> 32) as u16, (key >> 16) as u16, key as u16, 0, 0, 0, 0, 0))
    };
    keygate_core::anomaly::network_of(ip)
}

/// What a token's entry keeps beyond the fields every request touches: made once per token and
/// window, read at the drain.
struct Rest {
    /// The OAuth client, for its JWT access tokens' counts.
    client: Option<Arc<str>>,
    workspace_id: Arc<str>,
    app_id: Arc<str>,
    from_ms: i64,
    /// The first agent's label (its hash is in the entry).
    agent0_label: String,
    /// Values after the first of each list.
    networks: Vec<(u64, u64)>,
    routes: Vec<(Arc<str>, Method, u64)>,
    agents: Vec<(u64, String, u64)>,
}

/// A token's counts in one window. What a request reads and writes when the token uses one
/// network, route and agent — most tokens in most windows — sits in the entry's first cache line,
/// the first route in the second; the entry is 128 bytes aligned to 128, one adjacent pair of
/// lines that the CPU fetches together (a map of `(id, counts)` with the lists inline took 248
/// bytes over four lines, and its lookup was a cache miss per request: docs/benchmarks.md).
#[repr(C, align(128))]
struct Counts {
    public_id: [u8; PUBLIC_ID_LEN],
    requests: u32,
    to_ms: i64,
    refused: u32,
    errors: u32,
    old_secret: u32,
    net0_n: u32,
    /// The first network ([`network_key`]) and agent (its hash under the table's seed: a
    /// collision only merges two agents' counts) and their counts.
    net0: u64,
    agent0: u64,
    agent0_n: u32,
    route0_n: u32,
    /// The first route and method; `None` until a request names a route.
    route0: Option<(Arc<str>, Method)>,
    rest: Box<Rest>,
}

const _: () = assert!(size_of::<Counts>() == 128, "a token's counts are one pair of cache lines");

/// Counts one value: the entry's own first (`first`, with its count), else in `more`, which
/// holds at most [`MAX_VALUES`] values with the first.
fn bump_value<K>(
    first: bool,
    first_n: &mut u32,
    more: &mut Vec<K>,
    found: impl Fn(&K) -> bool,
    count: impl Fn(&mut K),
    make: impl FnOnce() -> K,
) {
    if first {
        *first_n = first_n.saturating_add(1);
        return;
    }
    let room = more.len() + 1 < MAX_VALUES;
    match more.iter_mut().find(|k| found(k)) {
        Some(k) => count(k),
        None if room => more.push(make()),
        None => {}
    }
}

/// One thread's counts, on cache lines of its own.
#[derive(Default)]
struct Table {
    entries: HashTable<Counts>,
    hasher: foldhash::fast::RandomState,
}

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    counts: Mutex<Table>,
    /// The table of the previous window, emptied with its room kept (the drain's alone): swapped
    /// in at the next drain, so that neither a worker nor the drain allocates a table per window.
    spare: Mutex<Table>,
}

/// Counts what tokens do until [`Watch::drain`] takes it.
pub struct Watch {
    shards: Vec<Shard>,
    /// Requests not counted because a shard's window was full.
    pub dropped: AtomicU64,
}

impl Default for Watch {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Shard::default()).collect(), dropped: AtomicU64::new(0) }
    }
}

impl Watch {
    /// Counts one request at `now_ms` (for tests; the request path locks the shard beside the
    /// usage meter's: [`Watch::lock`]).
    #[cfg(test)]
    pub fn record(&self, s: &Seen<'_>, now_ms: i64) {
        if let Some(mut shard) = self.lock()
            && let Some(slot) = shard.find(s, now_ms)
        {
            slot.count(s, now_ms);
        }
    }

    /// The calling thread's shard, locked: see [`crate::usage::UsageMeter::lock`], with which
    /// a request's last phase takes it.
    pub fn lock(&self) -> Option<WatchShard<'_>> {
        let shard = self.shards.get(SHARD.with(|i| *i))?;
        Some(WatchShard { table: shard.counts.lock(), dropped: &self.dropped })
    }
}

/// The calling thread's shard of the watch, locked ([`Watch::lock`]).
pub struct WatchShard<'a> {
    table: parking_lot::MutexGuard<'a, Table>,
    dropped: &'a AtomicU64,
}

/// A request's entry, found and not yet counted ([`WatchShard::find`]), with the request's
/// network and agent as numbers.
pub struct WatchSlot<'a> {
    c: &'a mut Counts,
    net: u64,
    ua: u64,
}

impl WatchShard<'_> {
    /// The entry of the request's token, made if new; `None` when the window already counts
    /// [`MAX_TOKENS`] tokens (the request is counted as dropped).
    pub fn find(&mut self, s: &Seen<'_>, now_ms: i64) -> Option<WatchSlot<'_>> {
        let Table { entries, hasher } = &mut *self.table;
        let full = entries.len() >= MAX_TOKENS;
        let net = network_key(s.ip);
        // foldhash takes the agent 16 bytes at a step (a byte-at-a-time hash of a browser's
        // 100-byte User-Agent was a chain of 100 dependent multiplications per request).
        let ua = hasher.hash_one(s.agent.unwrap_or_default());
        let c = match entries.entry(
            hasher.hash_one(s.public_id),
            |c| c.public_id == *s.public_id,
            |c| hasher.hash_one(c.public_id),
        ) {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(_) if full => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Slot::Vacant(v) => v
                .insert(Counts {
                    public_id: *s.public_id,
                    requests: 0,
                    to_ms: now_ms,
                    refused: 0,
                    errors: 0,
                    old_secret: 0,
                    net0_n: 0,
                    net0: net,
                    agent0: ua,
                    agent0_n: 0,
                    route0_n: 0,
                    route0: None,
                    rest: Box::new(Rest {
                        client: s.client.cloned(),
                        workspace_id: s.workspace_id.clone(),
                        app_id: s.app_id.clone(),
                        from_ms: now_ms,
                        agent0_label: agent_label(s.agent.unwrap_or_default()),
                        networks: Vec::new(),
                        routes: Vec::new(),
                        agents: Vec::new(),
                    }),
                })
                .into_mut(),
        };
        Some(WatchSlot { c, net, ua })
    }
}

impl WatchSlot<'_> {
    /// Counts the request into its token's entry.
    pub fn count(self, s: &Seen<'_>, now_ms: i64) {
        let WatchSlot { c, net, ua } = self;
        if c.requests == 0 && c.old_secret == 0 {
            // The token's first request in this window: the entry is new, or kept from the
            // window before last with its counts taken ([`Watch::drain`]).
            c.to_ms = now_ms;
            c.rest.from_ms = now_ms;
            c.net0 = net;
            if c.agent0 != ua {
                c.agent0 = ua;
                c.rest.agent0_label = agent_label(s.agent.unwrap_or_default());
            }
        }
        c.to_ms = c.to_ms.max(now_ms);
        if s.old_secret {
            // Refused as expired; counted apart (not as the token's traffic).
            c.old_secret = c.old_secret.saturating_add(1);
        } else {
            c.requests = c.requests.saturating_add(1);
            c.refused = c.refused.saturating_add(u32::from(s.refused));
            c.errors = c.errors.saturating_add(u32::from(s.status >= 500));
            if let Some(route) = s.route {
                let first = match &c.route0 {
                    Some((r, m)) if Arc::ptr_eq(r, route) && m == s.method => true,
                    // None yet, or a kept entry's from an earlier window (no counts).
                    _ if c.route0_n == 0 => {
                        c.route0 = Some((route.clone(), s.method.clone()));
                        true
                    }
                    _ => false,
                };
                bump_value(
                    first,
                    &mut c.route0_n,
                    &mut c.rest.routes,
                    |(r, m, _)| Arc::ptr_eq(r, route) && m == s.method,
                    |(_, _, n)| *n += 1,
                    || (route.clone(), s.method.clone(), 1),
                );
            }
        }
        bump_value(
            c.net0 == net,
            &mut c.net0_n,
            &mut c.rest.networks,
            |(k, _)| *k == net,
            |(_, n)| *n += 1,
            || (net, 1),
        );
        bump_value(
            c.agent0 == ua,
            &mut c.agent0_n,
            &mut c.rest.agents,
            |(h, _, _)| *h == ua,
            |(_, _, n)| *n += 1,
            || (ua, agent_label(s.agent.unwrap_or_default()), 1),
        );
    }
}

impl Watch {
    /// Takes what was counted since the last drain, one [`Activity`] per token (the shards'
    /// counts of a token merged).
    ///
    /// A token's entry stays in its table with its counts taken, so that when the table comes
    /// back to its worker (at the next drain but one) the token's requests count into it again
    /// rather than each making an entry, its lists and its agent's label anew; an entry that
    /// counted nothing in its window is removed, and a table left with more than half of
    /// [`MAX_TOKENS`] entries is emptied, so that kept entries never crowd out new tokens.
    pub fn drain(&self) -> Vec<Activity> {
        let mut out: HashMap<[u8; PUBLIC_ID_LEN], Activity> = HashMap::default();
        for shard in &self.shards {
            let mut taken = shard.spare.lock();
            std::mem::swap(&mut *shard.counts.lock(), &mut *taken);
            out.reserve(taken.entries.len());
            taken.entries.retain(|c| {
                if c.requests == 0 && c.old_secret == 0 {
                    return false;
                }
                let a = take_activity(c);
                match out.get_mut(&c.public_id) {
                    Some(have) => have.merge(a),
                    None => {
                        out.insert(c.public_id, a);
                    }
                }
                true
            });
            if taken.entries.len() > MAX_TOKENS / 2 {
                taken.entries.clear();
            }
        }
        out.into_values().collect()
    }
}

/// A token's window as an [`Activity`], its counts taken (zeroed, the lists emptied with their
/// room kept).
fn take_activity(c: &mut Counts) -> Activity {
    let counted = |n: u32| (n > 0).then_some(u64::from(n));
    let rest = &mut *c.rest;
    let subject = match &rest.client {
        Some(client) => Watched::Client(client.to_string()),
        None => Watched::Token(TokenId::from_public_id(std::str::from_utf8(&c.public_id).unwrap_or_default())),
    };
    let a = Activity {
        subject,
        workspace_id: WorkspaceId::from_trusted(rest.workspace_id.to_string()),
        app_id: AppId::from_trusted(rest.app_id.to_string()),
        from_ms: rest.from_ms,
        to_ms: c.to_ms,
        requests: u64::from(c.requests),
        refused: u64::from(c.refused),
        errors: u64::from(c.errors),
        old_secret: u64::from(c.old_secret),
        networks: counted(c.net0_n)
            .map(|n| (c.net0, n))
            .into_iter()
            .chain(rest.networks.drain(..))
            .map(|(k, n)| (network_label(k), n))
            .collect(),
        routes: c
            .route0
            .as_ref()
            .and_then(|(r, m)| counted(c.route0_n).map(|n| (format!("{m} {r}"), n)))
            .into_iter()
            .chain(rest.routes.drain(..).map(|(r, m, n)| (format!("{m} {r}"), n)))
            .collect(),
        agents: counted(c.agent0_n)
            .map(|n| (rest.agent0_label.clone(), n))
            .into_iter()
            .chain(rest.agents.drain(..).map(|(_, label, n)| (label, n)))
            .collect(),
    };
    c.requests = 0;
    c.refused = 0;
    c.errors = 0;
    c.old_secret = 0;
    c.net0_n = 0;
    c.agent0_n = 0;
    c.route0_n = 0;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(
        id: &'a [u8; PUBLIC_ID_LEN],
        ws: &'a Arc<str>,
        route: &'a Arc<str>,
        method: &'a Method,
        ip: &str,
    ) -> Seen<'a> {
        Seen {
            public_id: id,
            client: None,
            workspace_id: ws,
            app_id: ws,
            route: Some(route),
            method,
            status: 200,
            refused: false,
            old_secret: false,
            ip: ip.parse().unwrap(),
            agent: Some(b"curl/8.0\n"),
        }
    }

    #[test]
    fn a_window_holds_each_token_once_with_its_networks_routes_and_agents() {
        let w = Watch::default();
        let (id, ws, route): ([u8; 12], Arc<str>, Arc<str>) = (*b"abcdefghijkl", "ws_1".into(), "orders".into());
        let get = Method::GET;
        w.record(&seen(&id, &ws, &route, &get, "203.0.113.7"), 1000);
        w.record(&seen(&id, &ws, &route, &get, "203.0.113.9"), 1500);
        let post = Method::POST;
        let mut s = seen(&id, &ws, &route, &post, "2001:db8:5:1::1");
        s.refused = true;
        s.status = 403;
        w.record(&s, 1700);
        let a = w.drain();
        assert_eq!(a.len(), 1);
        let a = &a[0];
        assert_eq!(a.subject, Watched::Token(TokenId::from_public_id("abcdefghijkl")));
        assert_eq!((a.from_ms, a.to_ms, a.requests, a.refused), (1000, 1700, 3, 1));
        assert_eq!(a.networks, vec![("203.0.113.0/24".to_owned(), 2), ("2001:db8:5::/48".to_owned(), 1)]);
        assert_eq!(a.routes, vec![("GET orders".to_owned(), 2), ("POST orders".to_owned(), 1)]);
        assert_eq!(a.agents, vec![("curl/8.0?".to_owned(), 3)]);
        assert!(w.drain().is_empty(), "a drain takes the counts");
    }

    #[test]
    fn lists_and_tokens_are_bounded() {
        let w = Watch::default();
        let (ws, route): (Arc<str>, Arc<str>) = ("ws_1".into(), "r".into());
        let get = Method::GET;
        let id = *b"abcdefghijkl";
        for i in 0..100u8 {
            w.record(&seen(&id, &ws, &route, &get, &format!("10.0.{i}.1")), 1);
        }
        let a = w.drain();
        assert_eq!(a[0].networks.len(), MAX_VALUES);
        assert_eq!(a[0].requests, 100);
        // All from one thread, so one shard: MAX_TOKENS tokens, the rest dropped.
        for i in 0..(MAX_TOKENS + 10) {
            let id: [u8; 12] = format!("{i:012}").into_bytes().try_into().unwrap();
            w.record(&seen(&id, &ws, &route, &get, "10.0.0.1"), 1);
        }
        assert_eq!(w.drain().len(), MAX_TOKENS);
        assert_eq!(w.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn values_after_the_first_are_counted_in_order_and_shards_merge() {
        let w = Arc::new(Watch::default());
        let (id, ws): ([u8; 12], Arc<str>) = (*b"abcdefghijkl", "ws_1".into());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let get = Method::GET;
        // Refused before its route was known: no route yet.
        let mut s = seen(&id, &ws, &a, &get, "10.0.0.1");
        s.route = None;
        s.refused = true;
        s.status = 401;
        w.record(&s, 1);
        for (route, agent) in [(&b, &b"curl/8"[..]), (&a, b"python"), (&b, b"curl/8"), (&a, b"go")] {
            let mut s = seen(&id, &ws, route, &get, "10.0.0.1");
            s.agent = Some(agent);
            w.record(&s, 2);
        }
        // The same token from another worker thread (another shard), merged at the drain.
        let other = w.clone();
        let (ws2, b2) = (ws.clone(), b.clone());
        std::thread::spawn(move || other.record(&seen(&id, &ws2, &b2, &Method::GET, "10.0.1.1"), 3)).join().unwrap();
        let got = w.drain();
        assert_eq!(got.len(), 1);
        let a = &got[0];
        assert_eq!((a.requests, a.refused, a.from_ms, a.to_ms), (6, 1, 1, 3));
        let mut routes = a.routes.clone();
        routes.sort();
        assert_eq!(routes, [("GET a".to_owned(), 2), ("GET b".to_owned(), 3)]);
        let mut nets = a.networks.clone();
        nets.sort();
        assert_eq!(nets, [("10.0.0.0/24".to_owned(), 5), ("10.0.1.0/24".to_owned(), 1)]);
        let mut agents = a.agents.clone();
        agents.sort();
        assert_eq!(
            agents,
            [("curl/8".to_owned(), 2), ("curl/8.0?".to_owned(), 2), ("go".to_owned(), 1), ("python".to_owned(), 1)]
        );
    }

    #[test]
    fn a_kept_entry_counts_its_next_window_afresh_and_an_idle_one_goes() {
        let w = Watch::default();
        let (id, other, ws): ([u8; 12], [u8; 12], Arc<str>) = (*b"abcdefghijkl", *b"mnopqrstuvwx", "ws_1".into());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (get, post) = (Method::GET, Method::POST);
        // Window 1 (table one): two networks, two routes, two agents; another token too.
        w.record(&seen(&id, &ws, &a, &get, "10.0.0.1"), 1_000);
        let mut s = seen(&id, &ws, &b, &post, "10.0.1.1");
        s.agent = Some(b"go");
        w.record(&s, 1_100);
        w.record(&seen(&other, &ws, &a, &get, "10.9.0.1"), 1_200);
        assert_eq!(w.drain().len(), 2);
        // Window 2 (table two): only `id`, once.
        w.record(&seen(&id, &ws, &a, &get, "10.0.0.1"), 2_000);
        assert_eq!(w.drain().len(), 1);
        // Window 3: table one again, with the two tokens' entries kept. `id` comes from another
        // network, route and agent first: its window starts now and counts only what is new.
        let mut s = seen(&id, &ws, &b, &post, "10.0.7.1");
        s.agent = Some(b"python");
        w.record(&s, 3_000);
        w.record(&seen(&id, &ws, &a, &get, "10.0.0.1"), 3_500);
        let got = w.drain();
        assert_eq!(got.len(), 1, "the other token counted nothing: no activity");
        let a3 = &got[0];
        assert_eq!(a3.subject, Watched::Token(TokenId::from_public_id("abcdefghijkl")));
        assert_eq!((a3.from_ms, a3.to_ms, a3.requests, a3.refused), (3_000, 3_500, 2, 0));
        assert_eq!(a3.networks, [("10.0.7.0/24".to_owned(), 1), ("10.0.0.0/24".to_owned(), 1)]);
        assert_eq!(a3.routes, [("POST b".to_owned(), 1), ("GET a".to_owned(), 1)]);
        assert_eq!(a3.agents, [("python".to_owned(), 1), ("curl/8.0?".to_owned(), 1)]);
        // The idle token's entry went with that drain; `id`'s stays for its next window.
        let held: Vec<usize> = w.shards.iter().map(|s| s.spare.lock().entries.len()).collect();
        assert_eq!(held.iter().sum::<usize>(), 1, "{held:?}");
    }

    #[test]
    fn an_old_secret_is_counted_apart_from_traffic() {
        let w = Watch::default();
        let (id, ws, route): ([u8; 12], Arc<str>, Arc<str>) = (*b"abcdefghijkl", "ws_1".into(), "orders".into());
        let get = Method::GET;
        let mut s = seen(&id, &ws, &route, &get, "203.0.113.7");
        s.old_secret = true;
        s.status = 401;
        w.record(&s, 5);
        let a = w.drain();
        assert_eq!((a[0].requests, a[0].old_secret), (0, 1));
        assert_eq!(a[0].networks.len(), 1);
    }
}
