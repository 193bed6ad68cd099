//! What each token does, counted for anomaly detection (issue 15; the detectors are in
//! [`keygate_core::anomaly`]): per token and window (a second, between two drains), its requests,
//! refusals, server errors, old-secret presentations, source networks, routes with methods and
//! user agents.
//!
//! Like the usage meter, counts live in one shard per worker thread, so a request takes one
//! uncontended lock and one map lookup; a value already in the token's short lists costs a
//! comparison, a new one a push. Everything is bounded: [`MAX_TOKENS`] tokens per shard and
//! window (requests of more are counted as dropped), [`MAX_VALUES`] values per list (more are
//! counted in the token's overflow).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use keygate_core::anomaly::{Activity, agent_label};
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::token_format::PUBLIC_ID_LEN;
use parking_lot::Mutex;
use smallvec::SmallVec;

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
    pub public_id: &'a [u8; PUBLIC_ID_LEN],
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

fn agent_hash(ua: Option<&[u8]>) -> u64 {
    // FNV-1a: stable and cheap; a collision only merges two agents' counts.
    ua.unwrap_or_default()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A token's counts in one window.
struct Counts {
    workspace_id: Arc<str>,
    app_id: Arc<str>,
    from_ms: i64,
    to_ms: i64,
    requests: u64,
    refused: u64,
    errors: u64,
    old_secret: u64,
    // The first value of each list inline: most tokens use one network, route and agent in a
    // window, and a list of its own would cost the request a cache miss each.
    networks: SmallVec<[(u64, u64); 1]>,
    routes: SmallVec<[(Arc<str>, Method, u64); 1]>,
    agents: SmallVec<[(u64, String, u64); 1]>,
}

fn bump<K, const N: usize>(
    list: &mut SmallVec<[K; N]>,
    found: impl Fn(&K) -> bool,
    count: impl Fn(&mut K),
    make: impl FnOnce() -> K,
) {
    let room = list.len() < MAX_VALUES;
    match list.iter_mut().find(|k| found(k)) {
        Some(k) => count(k),
        None if room => list.push(make()),
        None => {}
    }
}

/// One thread's counts, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    counts: Mutex<HashMap<[u8; PUBLIC_ID_LEN], Counts>>,
    /// The map of the previous window, emptied with its room kept (the drain's alone): swapped
    /// in at the next drain, so that neither a worker nor the drain allocates a map per window.
    spare: Mutex<HashMap<[u8; PUBLIC_ID_LEN], Counts>>,
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
    /// Counts one request at `now_ms`.
    pub fn record(&self, s: &Seen<'_>, now_ms: i64) {
        let Some(shard) = self.shards.get(SHARD.with(|i| *i)) else { return };
        let mut map = shard.counts.lock();
        let full = map.len() >= MAX_TOKENS;
        let c = match map.get_mut(s.public_id) {
            Some(c) => c,
            None if full => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            None => map.entry(*s.public_id).or_insert_with(|| Counts {
                workspace_id: s.workspace_id.clone(),
                app_id: s.app_id.clone(),
                from_ms: now_ms,
                to_ms: now_ms,
                requests: 0,
                refused: 0,
                errors: 0,
                old_secret: 0,
                networks: SmallVec::new(),
                routes: SmallVec::new(),
                agents: SmallVec::new(),
            }),
        };
        c.to_ms = c.to_ms.max(now_ms);
        if s.old_secret {
            // Refused as expired; counted apart (not as the token's traffic).
            c.old_secret += 1;
        } else {
            c.requests += 1;
            c.refused += u64::from(s.refused);
            c.errors += u64::from(s.status >= 500);
            if let Some(route) = s.route {
                bump(
                    &mut c.routes,
                    |(r, m, _)| Arc::ptr_eq(r, route) && m == s.method,
                    |(_, _, n)| *n += 1,
                    || (route.clone(), s.method.clone(), 1),
                );
            }
        }
        let net = network_key(s.ip);
        bump(&mut c.networks, |(k, _)| *k == net, |(_, n)| *n += 1, || (net, 1));
        let ua = agent_hash(s.agent);
        bump(
            &mut c.agents,
            |(h, _, _)| *h == ua,
            |(_, _, n)| *n += 1,
            || (ua, agent_label(s.agent.unwrap_or_default()), 1),
        );
    }

    /// Takes what was counted since the last drain, one [`Activity`] per token (the shards'
    /// counts of a token merged).
    pub fn drain(&self) -> Vec<Activity> {
        let mut out: HashMap<[u8; PUBLIC_ID_LEN], Activity> = HashMap::default();
        for shard in &self.shards {
            let mut taken = shard.spare.lock();
            std::mem::swap(&mut *shard.counts.lock(), &mut *taken);
            out.reserve(taken.len());
            for (id, c) in taken.drain() {
                let a = Activity {
                    token_id: TokenId::from_public_id(std::str::from_utf8(&id).unwrap_or_default()),
                    workspace_id: WorkspaceId::from_trusted(c.workspace_id.to_string()),
                    app_id: AppId::from_trusted(c.app_id.to_string()),
                    from_ms: c.from_ms,
                    to_ms: c.to_ms,
                    requests: c.requests,
                    refused: c.refused,
                    errors: c.errors,
                    old_secret: c.old_secret,
                    networks: c.networks.into_iter().map(|(k, n)| (network_label(k), n)).collect(),
                    routes: c.routes.into_iter().map(|(r, m, n)| (format!("{m} {r}"), n)).collect(),
                    agents: c.agents.into_iter().map(|(_, label, n)| (label, n)).collect(),
                };
                match out.get_mut(&id) {
                    Some(have) => have.merge(a),
                    None => {
                        out.insert(id, a);
                    }
                }
            }
        }
        out.into_values().collect()
    }
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
        assert_eq!(a.token_id.as_str(), "tok_abcdefghijkl");
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
