//! Upstreams named by DNS host names (`http://orders.internal:8080`), as Envoy's `STRICT_DNS`
//! clusters and nginx's `server … resolve` have them: the name is looked up when the route table
//! is built and again every `dns_refresh_seconds` in the background ([`refresh`], run by
//! [`crate::tasks::spawn_resolver`]), and **each address it resolves to is a balancing target**
//! of the route, with its own health (passive and active), its own in-flight count, and its own
//! idle connections (see [`Upstream::target`]).
//!
//! - When a name's addresses change, the addresses that stay keep their targets (and so their
//!   health and counters), new ones start healthy, removed ones are no longer picked (their
//!   pooled connections are keyed by the address and are not used again).
//! - A lookup that fails (or finds no address) keeps the last addresses; a name that never
//!   resolved has none, and a route whose targets are all such names answers 502
//!   `upstream_unresolved`. Failures are logged once per change of state, not at every try.
//! - At most [`MAX_ADDRESSES`] addresses per name, in the resolver's order.
//! - A request never waits for a lookup: it reads the route's current targets, an
//!   [`ArcSwap`] (routes whose upstreams are all IP literals have none and read nothing).
//! - A table that replaces another takes over its names' addresses and state ([`carry`]), so a
//!   route change neither forgets health nor needs a lookup; the background task always works
//!   on the current table, so removed routes are no longer looked up.
//!
//! - **TTL:** a name is looked up again when its records expire (the smallest TTL among the
//!   answers), but at least [`MIN_REFRESH`] and at most `dns_refresh_seconds` after the last
//!   lookup, so a TTL of 0 does not turn into a lookup storm and a day-long TTL does not pin an
//!   address for a day.
//!
//! The lookups go through a [`Resolve`]: in keygate a [`DnsResolver`] (a stub resolver that
//! reads `/etc/resolv.conf` and `/etc/hosts` as the C library does, or asks the servers of
//! `[gateway] dns_servers`, and tells the records' TTL), falling back to the C library's
//! getaddrinfo ([`SystemResolver`], which tells no TTL) where there is no resolver
//! configuration; a fake one in tests.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::target::Upstream;

/// The most addresses of one name that become targets.
pub const MAX_ADDRESSES: usize = 64;
/// A name that resolves to no address yet is asked again at least this often.
pub const UNRESOLVED_RETRY: Duration = Duration::from_secs(5);
/// How long one lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A name is never looked up again sooner than this, whatever its records' TTL.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Pool keys of targets retired (their address went away) remembered for workers to forget.
const RETIRED_KEPT: usize = 4096;

/// Bumped when a target is retired: each worker then forgets the retired targets' idle
/// connections the next time it looks in its pool.
static RETIRED_EPOCH: AtomicU64 = AtomicU64::new(0);
static RETIRED: parking_lot::Mutex<VecDeque<Arc<str>>> = parking_lot::const_mutex(VecDeque::new());

/// Closes the idle connections, in a worker's `pool` (by pool key), of targets whose address
/// went away since this pool last looked: `seen` is the pool's own record of the retirements it
/// has forgotten (one per pool and thread: the HTTP/1.1 pool and the HTTP/2 one each keep
/// theirs). Costs one atomic load when nothing was retired.
#[inline]
pub fn forget_retired<V, S: BuildHasher>(pool: &mut HashMap<Arc<str>, V, S>, seen: &Cell<u64>) {
    let epoch = RETIRED_EPOCH.load(Ordering::Acquire);
    if seen.get() == epoch {
        return;
    }
    seen.set(epoch);
    for key in RETIRED.lock().iter() {
        pool.remove(key);
    }
}

fn retire(targets: impl Iterator<Item = Arc<Upstream>>) {
    let mut targets = targets.peekable();
    if targets.peek().is_none() {
        return;
    }
    let mut retired = RETIRED.lock();
    for t in targets {
        if retired.len() == RETIRED_KEPT {
            retired.pop_front();
        }
        retired.push_back(t.pool_key.clone());
    }
    drop(retired);
    RETIRED_EPOCH.fetch_add(1, Ordering::Release);
}

/// What a lookup found: the addresses, and how long they may be used (the records' TTL), when
/// the resolver tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub addrs: Vec<SocketAddr>,
    pub ttl: Option<Duration>,
}

impl From<Vec<SocketAddr>> for Resolved {
    /// Addresses of unknown TTL.
    fn from(addrs: Vec<SocketAddr>) -> Self {
        Self { addrs, ttl: None }
    }
}

/// A lookup in progress.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Resolved>> + Send + 'a>>;

/// Looks up a host name's addresses.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// The C library's resolver (getaddrinfo on a blocking thread; `/etc/hosts` first). It does not
/// tell the records' TTL.
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect::<Vec<_>>().into()) })
    }
}

/// keygate's resolver: `/etc/hosts` first (read again at each lookup, so an edit is seen, and
/// all of a name's entries as the C library gives them), then DNS (hickory's stub resolver,
/// configured from `/etc/resolv.conf`: its servers, search domains, `ndots`, timeouts), which
/// tells the records' TTL. A and AAAA are asked at once, IPv4 addresses first, as nginx's
/// resolver does. RFC 6761 names are answered without asking (`localhost` is loopback,
/// `.invalid` does not exist).
pub struct DnsResolver {
    dns: hickory_resolver::TokioResolver,
}

impl DnsResolver {
    /// A resolver configured from `/etc/resolv.conf`, with `servers` instead of its name
    /// servers when given (`[gateway] dns_servers`: a service-discovery DNS such as Consul's,
    /// say). Fails when there is no resolver configuration and no server is given.
    pub fn new(servers: &[SocketAddr]) -> io::Result<Self> {
        use hickory_resolver::config::{
            ConnectionConfig, LookupIpStrategy, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig,
            ResolverOpts,
        };
        let system = hickory_resolver::system_conf::read_system_conf();
        let (mut config, mut opts) = match system {
            Ok(c) => c,
            Err(e) if servers.is_empty() => return Err(io::Error::other(e.to_string())),
            Err(_) => (ResolverConfig::from_name_servers(Vec::new()), ResolverOpts::default()),
        };
        if !servers.is_empty() {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
                    tcp.port = s.port();
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    ns.connections = vec![udp, tcp];
                    ns
                })
                .collect();
            config = ResolverConfig::from_parts(config.domain.clone(), config.search.clone(), name_servers);
        }
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // /etc/hosts is read here at each lookup instead (see `lookup`).
        opts.use_hosts_file = ResolveHosts::Never;
        // Each name is asked again only as its TTL runs out: the resolver's own cache need hold
        // little more than the names being looked up at once.
        opts.cache_size = 256;
        let mut builder = hickory_resolver::TokioResolver::builder_with_config(
            config,
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        );
        *builder.options_mut() = opts;
        let dns = builder.build().map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { dns })
    }

    /// The addresses `/etc/hosts` gives `host`, if it has any.
    fn from_hosts_file(host: &str) -> Option<Vec<std::net::IpAddr>> {
        use hickory_resolver::proto::op::Query;
        use hickory_resolver::proto::rr::{Name, RecordType};
        let hosts = hickory_resolver::Hosts::from_system().ok()?;
        let name = Name::from_ascii(host).ok()?;
        let mut ips = Vec::new();
        for kind in [RecordType::A, RecordType::AAAA] {
            if let Some(found) = hosts.lookup_static_host(&Query::query(name.clone(), kind)) {
                ips.extend(found.answers().iter().filter_map(|r| r.data.ip_addr()));
            }
        }
        (!ips.is_empty()).then_some(ips)
    }
}

impl Resolve for DnsResolver {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move {
            if let Some(ips) = Self::from_hosts_file(host) {
                return Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect::<Vec<_>>().into());
            }
            // A name with a final dot is not searched in the search domains.
            let found = self.dns.lookup_ip(host).await.map_err(|e| {
                let kind = if e.is_no_records_found() || e.is_nx_domain() {
                    io::ErrorKind::NotFound
                } else {
                    io::ErrorKind::Other
                };
                io::Error::new(kind, e.to_string())
            })?;
            let ttl = found.valid_until().saturating_duration_since(std::time::Instant::now());
            let addrs = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
            Ok(Resolved { addrs, ttl: Some(ttl) })
        })
    }
}

/// The resolver keygate uses for upstream names: a [`DnsResolver`] with `servers`, or the C
/// library's (logged) when there is no resolver configuration to read.
pub fn resolver(servers: &[SocketAddr]) -> Arc<dyn Resolve> {
    match DnsResolver::new(servers) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::warn!(error = %e, "no DNS resolver configuration (/etc/resolv.conf); upstream names are looked up with the C library, without TTLs");
            Arc::new(SystemResolver)
        }
    }
}

/// Milliseconds on a monotonic clock that starts with the process: the time [`refresh`] is
/// given by keygate (tests give their own).
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One upstream URL of a route that has DNS names.
#[derive(Debug)]
enum Slot {
    /// An IP literal: one target, always.
    Fixed(Arc<Upstream>),
    Name(Box<DnsName>),
}

/// An upstream URL whose host is a DNS name, and what it resolves to.
#[derive(Debug)]
pub struct DnsName {
    /// Lowercase.
    pub host: Box<str>,
    pub port: u16,
    /// The URL's upstream, from which each address's target is made.
    template: Upstream,
    state: parking_lot::Mutex<NameState>,
    /// Lookups that failed or found nothing.
    failures: AtomicU64,
}

#[derive(Debug, Default)]
struct NameState {
    /// One target per address, in the resolver's order.
    addrs: Vec<Arc<Upstream>>,
    /// A lookup has been made (successful or not).
    asked: bool,
    /// The last lookup failed, and why (logged when this changes).
    failing: Option<String>,
    /// When the name is due to be looked up again, in [`refresh`]'s milliseconds.
    next_ms: u64,
}

impl DnsName {
    /// The addresses it resolves to now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.state.lock().addrs.iter().filter_map(|u| u.addr).collect()
    }

    /// Its targets now (shared with the route's balancing).
    pub fn targets(&self) -> Vec<Arc<Upstream>> {
        self.state.lock().addrs.clone()
    }

    /// Lookups that failed or found no address.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The DNS side of a route that has upstreams named by host names.
#[derive(Debug)]
pub struct RouteDns {
    route: Arc<str>,
    slots: Vec<Slot>,
    refresh: Duration,
    /// Every slot's targets in URL order: what requests balance over.
    targets: ArcSwap<Vec<Arc<Upstream>>>,
    /// Held while `targets` is made and stored, so that of two names updated at once the last
    /// one published sees both.
    publishing: parking_lot::Mutex<()>,
}

impl RouteDns {
    /// The DNS side of route `route` whose upstreams are `upstreams`; `names[i]` is the DNS name
    /// and port of `upstreams[i]`, or `None` for an IP literal. No name has an address yet.
    pub(crate) fn new(
        route: &str,
        upstreams: &[Upstream],
        names: Vec<Option<(String, u16)>>,
        refresh: Duration,
    ) -> Self {
        let slots = upstreams
            .iter()
            .zip(names)
            .map(|(u, name)| match name {
                None => Slot::Fixed(Arc::new(u.target(None))),
                Some((host, port)) => Slot::Name(Box::new(DnsName {
                    host: host.into(),
                    port,
                    template: u.target(None),
                    state: parking_lot::Mutex::new(NameState::default()),
                    failures: AtomicU64::new(0),
                })),
            })
            .collect();
        let dns = Self {
            route: Arc::from(route),
            slots,
            refresh,
            targets: ArcSwap::from_pointee(Vec::new()),
            publishing: parking_lot::Mutex::new(()),
        };
        dns.publish();
        dns
    }

    /// The route's balancing targets now.
    #[inline]
    pub fn targets(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.targets.load_full()
    }

    /// The route's DNS names.
    pub fn names(&self) -> impl Iterator<Item = &DnsName> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Name(n) => Some(&**n),
            Slot::Fixed(_) => None,
        })
    }

    /// How often the names are looked up.
    pub fn refresh(&self) -> Duration {
        self.refresh
    }

    /// Makes the targets of every slot, in URL order, what requests balance over.
    fn publish(&self) {
        let _one_at_a_time = self.publishing.lock();
        let mut all = Vec::new();
        for slot in &self.slots {
            match slot {
                Slot::Fixed(u) => all.push(u.clone()),
                Slot::Name(n) => all.extend(n.state.lock().addrs.iter().cloned()),
            }
        }
        self.targets.store(Arc::new(all));
    }

    /// Takes the result of looking up name number `k` (of [`RouteDns::names`]) at `now_ms`:
    /// addresses that stay keep their targets, new ones get new (healthy) targets, removed ones
    /// go. A failure, or no address, keeps the last addresses. `true` if the targets changed.
    pub fn apply(&self, k: usize, result: io::Result<Resolved>, now_ms: u64) -> bool {
        let Some(name) = self.names().nth(k) else { return false };
        let refresh_ms = u64::try_from(self.refresh.as_millis()).unwrap_or(u64::MAX);
        let mut st = name.state.lock();
        st.asked = true;
        let (found, ttl) = match result {
            Ok(r) if !r.addrs.is_empty() => (r.addrs, r.ttl),
            Ok(_) | Err(_) => {
                let why = match result {
                    Err(e) => e.to_string(),
                    Ok(_) => "no address".to_owned(),
                };
                name.failures.fetch_add(1, Ordering::Relaxed);
                let retry =
                    if st.addrs.is_empty() { refresh_ms.min(UNRESOLVED_RETRY.as_millis() as u64) } else { refresh_ms };
                st.next_ms = now_ms.saturating_add(retry);
                if st.failing.as_deref() != Some(&why) {
                    if st.addrs.is_empty() {
                        tracing::warn!(route = %self.route, upstream = %name.template.authority, error = %why, "upstream name does not resolve; requests for it have no address");
                    } else {
                        tracing::warn!(route = %self.route, upstream = %name.template.authority, error = %why, addresses = ?st.addrs.iter().filter_map(|u| u.addr).collect::<Vec<_>>(), "upstream name does not resolve now; keeping its last addresses");
                    }
                    st.failing = Some(why);
                }
                return false;
            }
        };
        // Due again when the records expire, within [MIN_REFRESH, the refresh interval].
        let due_ms = ttl.map_or(refresh_ms, |t| {
            let t = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
            t.clamp(MIN_REFRESH.as_millis() as u64, refresh_ms.max(MIN_REFRESH.as_millis() as u64))
        });
        st.next_ms = now_ms.saturating_add(due_ms);
        if st.failing.take().is_some() {
            tracing::info!(route = %self.route, upstream = %name.template.authority, "upstream name resolves again");
        }
        let mut addrs: Vec<SocketAddr> = Vec::with_capacity(found.len().min(MAX_ADDRESSES));
        for a in found {
            if addrs.len() == MAX_ADDRESSES {
                break;
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if st.addrs.len() == addrs.len() && st.addrs.iter().zip(&addrs).all(|(u, a)| u.addr == Some(*a)) {
            return false;
        }
        let targets = addrs
            .iter()
            .map(|a| {
                st.addrs
                    .iter()
                    .find(|u| u.addr == Some(*a))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(name.template.target(Some(*a))))
            })
            .collect();
        tracing::info!(route = %self.route, upstream = %name.template.authority, addresses = ?addrs, "upstream name resolved");
        let gone = std::mem::replace(&mut st.addrs, targets);
        drop(st);
        retire(gone.into_iter().filter(|u| !u.addr.is_some_and(|a| addrs.contains(&a))));
        self.publish();
        true
    }

    /// Takes over what `old` (the same route in the table this one replaces) knew of each name
    /// it shares with this one: its addresses, with their targets (so their health and
    /// counters) when the upstream URL is the same in all else, and when it is due again.
    pub fn carry_from(&self, old: &RouteDns) {
        for name in self.names() {
            let Some(prev) = old.names().find(|o| o.host == name.host && o.port == name.port) else { continue };
            let (a, b) = (&name.template, &prev.template);
            let same = a.pool_key == b.pool_key
                && a.host_header == b.host_header
                && a.base_path == b.base_path
                && a.counts_in_flight == b.counts_in_flight;
            let p = prev.state.lock();
            let mut st = name.state.lock();
            st.addrs = if same {
                p.addrs.clone()
            } else {
                p.addrs.iter().filter_map(|u| u.addr).map(|addr| Arc::new(a.target(Some(addr)))).collect()
            };
            st.asked = p.asked;
            st.failing.clone_from(&p.failing);
            st.next_ms = p.next_ms;
            name.failures.store(prev.failures(), Ordering::Relaxed);
        }
        self.publish();
    }
}

/// Which names [`refresh`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Those never looked up (a new table's, at start or after a route change).
    New,
    /// Those due at the time given.
    Due,
}

/// Looks up the names of the routes' DNS sides `dns` (a table's: `RouteTable::dns`) that `which`
/// says, all at once (each within [`LOOKUP_TIMEOUT`]), and applies the results at `now_ms`.
/// Returns how many lookups were made.
pub async fn refresh<'a>(
    dns: impl IntoIterator<Item = &'a Arc<RouteDns>>,
    resolver: &Arc<dyn Resolve>,
    now_ms: u64,
    which: Which,
) -> usize {
    let mut lookups = tokio::task::JoinSet::new();
    for dns in dns {
        for (k, name) in dns.names().enumerate() {
            let due = {
                let st = name.state.lock();
                match which {
                    Which::New => !st.asked,
                    Which::Due => !st.asked || st.next_ms <= now_ms,
                }
            };
            if due {
                let (dns, resolver) = (dns.clone(), resolver.clone());
                lookups.spawn(async move { lookup_and_apply(&dns, &*resolver, k, now_ms).await });
            }
        }
    }
    let n = lookups.len();
    while lookups.join_next().await.is_some() {}
    n
}

async fn lookup_and_apply(dns: &RouteDns, resolver: &dyn Resolve, k: usize, now_ms: u64) {
    let Some(name) = dns.names().nth(k) else { return };
    let result = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(&name.host, name.port))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the lookup timed out")));
    dns.apply(k, result, now_ms);
}

/// The DNS metrics of the routes' DNS sides `dns` (a table's: `RouteTable::dns`), in the
/// Prometheus text format: per route and upstream name, its addresses, how many of them are
/// healthy, and failed lookups.
pub fn render_metrics<'a>(dns: impl IntoIterator<Item = &'a Arc<RouteDns>>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let names: Vec<(&str, &DnsName)> = dns.into_iter().flat_map(|d| d.names().map(move |n| (&*d.route, n))).collect();
    let mut gauge = |metric: &str, kind: &str, help: &str, value: &dyn Fn(&DnsName) -> u64| {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        for (route, name) in &names {
            let _ = writeln!(
                out,
                "{metric}{{route=\"{}\",upstream=\"{}:{}\"}} {}",
                route,
                name.host,
                name.port,
                value(name)
            );
        }
    };
    gauge(
        "keygate_gateway_upstream_addresses",
        "gauge",
        "Addresses an upstream's DNS name resolves to now (each a balancing target), by route and name.",
        &|n| n.state.lock().addrs.len() as u64,
    );
    gauge(
        "keygate_gateway_upstream_healthy_addresses",
        "gauge",
        "Addresses of an upstream's DNS name in rotation (healthy), by route and name.",
        &|n| n.state.lock().addrs.iter().filter(|u| u.is_healthy()).count() as u64,
    );
    gauge(
        "keygate_gateway_upstream_resolution_failures_total",
        "counter",
        "Lookups of an upstream's DNS name that failed or found no address, by route and name.",
        &|n| n.failures(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, GatewayConfig, RouteConfig};
    use crate::routes::{Route, RouteTable};

    /// Answers from a table the test changes; counts lookups.
    #[derive(Default)]
    struct Fake {
        answers: parking_lot::Mutex<HashMap<String, io::Result<Vec<SocketAddr>>>>,
        /// The TTL every answer tells (none: unknown).
        ttl: parking_lot::Mutex<Option<Duration>>,
        asked: AtomicU64,
    }

    impl Fake {
        fn set(&self, host: &str, addrs: &[&str]) {
            let v = addrs.iter().map(|a| a.parse().unwrap()).collect();
            self.answers.lock().insert(host.into(), Ok(v));
        }
        fn fail(&self, host: &str) {
            self.answers.lock().insert(host.into(), Err(io::Error::other("SERVFAIL")));
        }
    }

    impl Resolve for Fake {
        fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            let r = match self.answers.lock().get(host) {
                Some(Ok(v)) => Ok(Resolved {
                    addrs: v.iter().map(|a| SocketAddr::new(a.ip(), port)).collect(),
                    ttl: *self.ttl.lock(),
                }),
                Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
            };
            Box::pin(async move { r })
        }
    }

    fn table(upstreams: &[&str], balance: Balance) -> RouteTable {
        let mut c = RouteConfig::new("r", "/r", upstreams[0]);
        c.upstreams = upstreams[1..].iter().map(|u| (*u).to_owned()).collect();
        c.balance = balance;
        c.dns_refresh_seconds = Some(10);
        RouteTable::build(&[c], &GatewayConfig { demo: false, ..Default::default() }).unwrap()
    }

    fn addrs(route: &Route) -> Vec<String> {
        route.targets().iter().map(|u| u.addr.map_or_else(|| u.authority.to_string(), |a| a.to_string())).collect()
    }

    /// The route's targets, as the resolver made them.
    fn resolved(route: &Route) -> Arc<Vec<Arc<Upstream>>> {
        route.dns.as_ref().unwrap().targets()
    }

    fn fake() -> (Arc<Fake>, Arc<dyn Resolve>) {
        let f = Arc::new(Fake::default());
        (f.clone(), f)
    }

    #[test]
    fn ip_literals_have_no_dns_side_and_names_do() {
        let t = table(&["http://127.0.0.1:9000", "http://[::1]:9001"], Balance::RoundRobin);
        assert!(t.routes[0].dns.is_none(), "IP literals read no address set");
        let t = table(&["http://Orders.Internal:8080/api", "http://127.0.0.1:9"], Balance::RoundRobin);
        let dns = t.routes[0].dns.as_ref().unwrap();
        let names: Vec<_> = dns.names().map(|n| (n.host.to_string(), n.port)).collect();
        assert_eq!(names, [("orders.internal".to_owned(), 8080)]);
        assert_eq!(dns.refresh(), Duration::from_secs(10));
        assert_eq!(addrs(&t.routes[0]), ["127.0.0.1:9"], "unresolved: only the literal serves");
        let mut c = RouteConfig::new("z", "/z", "http://svc.test");
        c.dns_refresh_seconds = Some(0);
        let e = RouteTable::build(&[c], &GatewayConfig::default()).unwrap_err();
        assert!(e.contains("dns_refresh_seconds must be at least 1") && e.contains("\"z\""), "{e}");
        let t = RouteTable::build(
            &[RouteConfig::new("d", "/d", "http://svc.test")],
            &GatewayConfig { dns_refresh_seconds: 7, ..Default::default() },
        )
        .unwrap();
        assert_eq!(t.routes[0].dns.as_ref().unwrap().refresh(), Duration::from_secs(7), "the gateway's default");
    }

    #[tokio::test]
    async fn addresses_are_added_removed_and_kept_with_their_state() {
        let (f, r) = fake();
        let t = table(&["http://svc.test:8080/base"], Balance::RoundRobin);
        let route = &t.routes[0];
        assert!(route.targets().is_empty());
        f.set("svc.test", &["10.0.0.1:0", "10.0.0.2:0", "10.0.0.1:0"]);
        assert_eq!(refresh(t.dns(), &r, 0, Which::New).await, 1);
        assert_eq!(addrs(route), ["10.0.0.1:8080", "10.0.0.2:8080"], "deduplicated, in the resolver's order");
        let first = resolved(route);
        let (a, b) = (&first[0], &first[1]);
        assert_eq!((&*a.host_header, a.base_path.as_str()), ("svc.test:8080", "/base"), "the URL's Host and path");
        assert_ne!(a.pool_key, b.pool_key, "idle connections are pooled per address");
        a.healthy.store(false, Ordering::Relaxed);
        a.failures.store(7, Ordering::Relaxed);

        // Not due before the refresh interval; due after.
        assert_eq!(refresh(t.dns(), &r, 9_999, Which::Due).await, 0);
        f.set("svc.test", &["10.0.0.3:0", "10.0.0.1:0"]);
        assert_eq!(refresh(t.dns(), &r, 10_000, Which::Due).await, 1);
        assert_eq!(addrs(route), ["10.0.0.3:8080", "10.0.0.1:8080"]);
        let now = resolved(route);
        assert!(Arc::ptr_eq(&now[1], a), "10.0.0.1 stays: the same target");
        assert!(!now[1].is_healthy() && now[1].failures.load(Ordering::Relaxed) == 7, "with its state");
        assert!(now[0].is_healthy(), "a new address starts healthy");
        assert!(!now.iter().any(|u| Arc::ptr_eq(u, b)), "10.0.0.2 is gone");
        // Its idle connections are forgotten by each worker's pool; the others' stay.
        let mut pool: HashMap<Arc<str>, u8> = HashMap::from([(b.pool_key.clone(), 1), (a.pool_key.clone(), 2)]);
        let seen = Cell::new(0);
        forget_retired(&mut pool, &seen);
        assert_eq!(pool.into_values().collect::<Vec<_>>(), [2]);
        // Another pool of the same thread forgets them too (each keeps its own record).
        let mut other: HashMap<Arc<str>, u8> = HashMap::from([(b.pool_key.clone(), 1)]);
        forget_retired(&mut other, &Cell::new(0));
        assert!(other.is_empty());
        // The same answer again changes nothing.
        let same = vec!["10.0.0.3:8080".parse().unwrap(), "10.0.0.1:8080".parse().unwrap()];
        assert!(!route.dns.as_ref().unwrap().apply(0, Ok(same.into()), 20_000));
        assert!(Arc::ptr_eq(&resolved(route), &now), "not even republished");
    }

    #[tokio::test]
    async fn a_name_is_asked_again_when_its_ttl_runs_out_within_bounds() {
        let (f, r) = fake();
        let t = table(&["http://svc.test:8080"], Balance::RoundRobin);
        f.set("svc.test", &["10.0.0.1:0"]);
        *f.ttl.lock() = Some(Duration::from_millis(3_500));
        assert_eq!(refresh(t.dns(), &r, 0, Which::New).await, 1);
        assert_eq!(refresh(t.dns(), &r, 3_499, Which::Due).await, 0, "the records are still valid");
        // TTL 0: asked again, but not sooner than MIN_REFRESH.
        *f.ttl.lock() = Some(Duration::ZERO);
        assert_eq!(refresh(t.dns(), &r, 3_500, Which::Due).await, 1, "due when the TTL runs out");
        assert_eq!(refresh(t.dns(), &r, 4_499, Which::Due).await, 0);
        // An hour: asked again at the route's refresh interval (10 s) all the same.
        *f.ttl.lock() = Some(Duration::from_secs(3_600));
        assert_eq!(refresh(t.dns(), &r, 4_500, Which::Due).await, 1, "not sooner than 1 s");
        assert_eq!(refresh(t.dns(), &r, 14_499, Which::Due).await, 0);
        // No TTL told (getaddrinfo, /etc/hosts): the interval.
        *f.ttl.lock() = None;
        assert_eq!(refresh(t.dns(), &r, 14_500, Which::Due).await, 1, "a long TTL is capped at the interval");
        assert_eq!(refresh(t.dns(), &r, 24_499, Which::Due).await, 0);
        assert_eq!(refresh(t.dns(), &r, 24_500, Which::Due).await, 1);
        assert_eq!(f.asked.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_addresses() {
        let (f, r) = fake();
        let t = table(&["http://svc.test:8080"], Balance::RoundRobin);
        let route = &t.routes[0];
        let dns = route.dns.as_ref().unwrap();
        // Never resolved: no address, retried sooner than the refresh interval.
        refresh(t.dns(), &r, 0, Which::New).await;
        assert!(route.targets().is_empty());
        assert_eq!(dns.names().next().unwrap().failures(), 1);
        assert_eq!(refresh(t.dns(), &r, 4_999, Which::Due).await, 0);
        f.set("svc.test", &["10.0.0.1:0"]);
        assert_eq!(refresh(t.dns(), &r, 5_000, Which::Due).await, 1, "an unresolved name is retried after 5 s");
        assert_eq!(addrs(route), ["10.0.0.1:8080"]);
        f.fail("svc.test");
        refresh(t.dns(), &r, 15_000, Which::Due).await;
        assert_eq!(addrs(route), ["10.0.0.1:8080"], "SERVFAIL keeps the last set");
        f.set("svc.test", &[]);
        refresh(t.dns(), &r, 25_000, Which::Due).await;
        assert_eq!(addrs(route), ["10.0.0.1:8080"], "no address keeps the last set");
        assert_eq!(dns.names().next().unwrap().failures(), 3);
        let text = render_metrics(t.dns());
        for line in [
            "keygate_gateway_upstream_addresses{route=\"r\",upstream=\"svc.test:8080\"} 1",
            "keygate_gateway_upstream_healthy_addresses{route=\"r\",upstream=\"svc.test:8080\"} 1",
            "keygate_gateway_upstream_resolution_failures_total{route=\"r\",upstream=\"svc.test:8080\"} 3",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[tokio::test]
    async fn at_most_64_addresses_per_name() {
        let (f, r) = fake();
        let many: Vec<String> = (0..100).map(|i| format!("10.0.{}.{}:0", i / 250, i % 250 + 1)).collect();
        f.set("svc.test", &many.iter().map(String::as_str).collect::<Vec<_>>());
        let t = table(&["http://svc.test:80"], Balance::RoundRobin);
        refresh(t.dns(), &r, 0, Which::New).await;
        assert_eq!(t.routes[0].targets().len(), MAX_ADDRESSES);
    }

    #[tokio::test]
    async fn requests_balance_over_every_address_and_a_failing_one_is_taken_out() {
        let (f, r) = fake();
        f.set("svc.test", &["10.0.0.1:0", "10.0.0.2:0"]);
        let t = table(&["http://svc.test:8080", "http://127.0.0.1:9"], Balance::RoundRobin);
        refresh(t.dns(), &r, 0, Which::New).await;
        let route = &t.routes[0];
        assert_eq!(addrs(route), ["10.0.0.1:8080", "10.0.0.2:8080", "127.0.0.1:9"]);
        let targets = route.targets();
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[targets.pick(route.balance, &[]).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10], "round robin over each address and the literal");
        for _ in 0..crate::proxy::PASSIVE_FAILURE_THRESHOLD {
            crate::proxy::note_failure(targets.get(0).unwrap());
        }
        assert!(!targets.get(0).unwrap().is_healthy());
        for _ in 0..20 {
            assert_ne!(targets.pick(route.balance, &[]), Some(0), "the failing address is out");
        }
        assert_eq!(targets.pick(route.balance, &[1, 2]), Some(0), "all else tried: still try it");
        crate::proxy::note_success(targets.get(0).unwrap());
        assert!(targets.get(0).unwrap().is_healthy());
    }

    #[tokio::test]
    async fn least_requests_counts_per_address() {
        let (f, r) = fake();
        f.set("svc.test", &["10.0.0.1:0", "10.0.0.2:0"]);
        let t = table(&["http://svc.test:8080"], Balance::LeastRequests);
        refresh(t.dns(), &r, 0, Which::New).await;
        let targets = t.routes[0].targets();
        assert!(targets.iter().all(|u| u.counts_in_flight));
        targets.get(0).unwrap().in_flight.store(3, Ordering::Relaxed);
        assert_eq!(targets.pick(Balance::LeastRequests, &[]), Some(1));
    }

    #[tokio::test]
    async fn a_new_table_takes_over_addresses_and_state() {
        let (f, r) = fake();
        f.set("svc.test", &["10.0.0.1:0"]);
        let old = table(&["http://svc.test:8080"], Balance::RoundRobin);
        refresh(old.dns(), &r, 0, Which::New).await;
        resolved(&old.routes[0])[0].healthy.store(false, Ordering::Relaxed);
        let asked = f.asked.load(Ordering::Relaxed);

        let new = table(&["http://svc.test:8080", "http://other.test:80"], Balance::RoundRobin);
        new.carry_dns(&old);
        let kept = resolved(&new.routes[0]);
        assert_eq!(kept.len(), 1);
        assert!(Arc::ptr_eq(&kept[0], &resolved(&old.routes[0])[0]), "the same target, health and all");
        f.set("other.test", &["10.0.0.9:0"]);
        assert_eq!(refresh(new.dns(), &r, 1, Which::New).await, 1, "only the new name is looked up");
        assert_eq!(f.asked.load(Ordering::Relaxed), asked + 1);
        assert_eq!(addrs(&new.routes[0]), ["10.0.0.1:8080", "10.0.0.9:80"]);

        // Another base path: the addresses are kept, with new targets.
        let moved = table(&["http://svc.test:8080/v2"], Balance::RoundRobin);
        moved.carry_dns(&old);
        let t = resolved(&moved.routes[0]);
        assert_eq!(t.len(), 1);
        assert!(!Arc::ptr_eq(&t[0], &resolved(&old.routes[0])[0]) && t[0].is_healthy() && t[0].base_path == "/v2");
    }

    #[test]
    fn https_targets_keep_the_name_for_tls() {
        let t = table(&["https://api.example:8443"], Balance::RoundRobin);
        let dns = t.routes[0].dns.as_ref().unwrap();
        assert!(dns.apply(0, Ok(vec!["192.0.2.1:8443".parse::<SocketAddr>().unwrap()].into()), 0));
        let targets = t.routes[0].targets();
        let u = targets.get(0).unwrap();
        let tls = u.tls.as_ref().unwrap();
        assert_eq!(tls.server_name.to_str(), "api.example", "SNI and verification use the URL's name");
        assert_eq!(&*u.host_header, "api.example:8443");
        assert_eq!(u.addr, Some("192.0.2.1:8443".parse().unwrap()));
        assert!(u.pool_key.starts_with("https://api.example:8443#") && u.pool_key.contains("@192.0.2.1:8443#"));
    }
}
