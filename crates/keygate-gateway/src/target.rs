//! One upstream server of a route, as a balancing target: its URL read (`http://` or
//! `https://`, host, port, base path), its TLS target, the HTTP version spoken to it, its address
//! when it is one of a DNS name's ([`crate::resolve`]), its health and in-flight counters, and the
//! choice among a route's targets ([`Targets::pick`]). A leaf: the route table ([`crate::routes`])
//! and the DNS refresh both build on it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::config::{Balance, UpstreamProtocol};

/// One upstream server of a route: an upstream URL, or one address its DNS name resolved to
/// (see [`crate::resolve`]).
#[derive(Debug)]
pub struct Upstream {
    /// `host:port` of the URL: dialled as it is, unless `addr` is set.
    pub authority: Arc<str>,
    /// The address this balancing target dials: one of the addresses the URL's DNS name
    /// resolved to. `None`: an upstream URL (an IP literal is dialled as `authority`).
    pub addr: Option<SocketAddr>,
    /// What is sent in `Host`: the authority for `http://` (as it always was), the host with
    /// its port only if that is not 443 for `https://`.
    pub host_header: Arc<str>,
    /// The key of this upstream's idle connections in a worker's pool: the authority for
    /// `http://`; for `https://`, the scheme, authority, server name and TLS identity, so that
    /// connections of different identities are never shared.
    pub pool_key: Arc<str>,
    /// `https://`: how to make the TLS handshake.
    pub tls: Option<crate::upstream_tls::TlsTarget>,
    /// The HTTP version spoken to it (the route's `upstream_protocol`): `Http2` over `http://` is
    /// h2c with prior knowledge; `Auto` is only found on `https://` upstreams.
    pub protocol: UpstreamProtocol,
    /// A path prefix the upstream URL carried (`http://h/api` → `/api`), or empty.
    pub base_path: String,
    pub healthy: AtomicBool,
    /// Requests waiting for this upstream's answer; counted only where least-requests balancing
    /// reads it (a counter both workers write costs every request a cache-line transfer).
    pub in_flight: AtomicU32,
    pub counts_in_flight: bool,
    /// Consecutive failures seen by real requests and active checks.
    pub failures: AtomicU32,
    pub successes: AtomicU32,
}

/// An upstream URL read: its scheme, host, `host:port` and base path.
pub(crate) struct UpstreamUrl<'a> {
    pub(crate) https: bool,
    host: &'a str,
    authority: String,
    /// The port was given and is not the scheme's default.
    odd_port: bool,
    path: &'a str,
}

pub(crate) fn parse_upstream_url(raw: &str) -> Result<UpstreamUrl<'_>, String> {
    let (https, rest) = match (raw.strip_prefix("http://"), raw.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => return Err(format!("upstream {raw:?} must be an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("upstream {raw:?} has no usable host"));
    }
    let default_port = if https { "443" } else { "80" };
    let (host, authority, odd_port) = if authority.contains(':') && !authority.ends_with(']') {
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, default_port));
        (host, authority.to_owned(), port != default_port)
    } else {
        (authority, format!("{authority}:{default_port}"), false)
    };
    authority.parse::<http::uri::Authority>().map_err(|_| format!("upstream {raw:?} has an invalid host or port"))?;
    Ok(UpstreamUrl { https, host, authority, odd_port, path })
}

impl Upstream {
    pub(crate) fn from_url(
        url: &UpstreamUrl<'_>,
        tls: Option<&crate::upstream_tls::RouteTls>,
        protocol: UpstreamProtocol,
    ) -> Result<Self, crate::upstream_tls::UpstreamTlsError> {
        let authority: Arc<str> = Arc::from(url.authority.as_str());
        let (host_header, pool_key, tls) = match (url.https, tls) {
            (true, Some(tls)) => {
                let (target, key) = tls.target(url.host, &url.authority)?;
                let host = if url.odd_port { authority.clone() } else { Arc::from(url.host) };
                (host, Arc::from(key), Some(target))
            }
            _ => (authority.clone(), authority.clone(), None),
        };
        Ok(Self {
            authority,
            addr: None,
            host_header,
            pool_key,
            tls,
            protocol,
            base_path: url.path.trim_end_matches('/').to_owned(),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            counts_in_flight: false,
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A balancing target with this upstream's URL (its `Host`, base path, TLS identity and
    /// server name) and state of its own, healthy: one that dials `addr` (an address its name
    /// resolved to, with idle connections pooled apart from the other addresses'), or, without,
    /// a copy of this one.
    pub(crate) fn target(&self, addr: Option<SocketAddr>) -> Self {
        // Numbered, so that connections pooled for an address that went away are never taken
        // for one that comes back later (see `crate::resolve::forget_retired`).
        static TARGETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pool_key = match addr {
            Some(a) => Arc::from(format!("{}@{a}#{}", self.pool_key, TARGETS.fetch_add(1, Ordering::Relaxed))),
            None => self.pool_key.clone(),
        };
        Self {
            authority: self.authority.clone(),
            addr,
            host_header: self.host_header.clone(),
            pool_key,
            tls: self.tls.as_ref().map(|t| crate::upstream_tls::TlsTarget {
                connector: t.connector.clone(),
                server_name: t.server_name.clone(),
            }),
            protocol: self.protocol,
            base_path: self.base_path.clone(),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            counts_in_flight: self.counts_in_flight,
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        }
    }
}

/// The host of an upstream URL and its port, if the host is a DNS name (not an IP literal).
pub(crate) fn dns_name(url: &UpstreamUrl<'_>) -> Option<(String, u16)> {
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let port = match url.authority.rsplit_once(':') {
        Some((_, p)) => p.parse().ok()?,
        None => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The balancing targets of a route, as they are for one request: its upstreams, or, on a route
/// with DNS names, the addresses they resolve to now (and its IP-literal upstreams).
pub enum Targets<'a> {
    Fixed(&'a [Upstream]),
    Resolved(Arc<Vec<Arc<Upstream>>>),
}

impl Targets<'_> {
    pub fn len(&self) -> usize {
        match self {
            Self::Fixed(u) => u.len(),
            Self::Resolved(u) => u.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn get(&self, i: usize) -> Option<&Upstream> {
        match self {
            Self::Fixed(u) => u.get(i),
            Self::Resolved(u) => u.get(i).map(|u| &**u),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Upstream> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Picks a target by `balance`, skipping unhealthy ones (all unhealthy: try them anyway) and
    /// any in `tried`. Round robin turns per worker thread, so the workers share no counter.
    pub fn pick(&self, balance: Balance, tried: &[usize]) -> Option<usize> {
        match self {
            Self::Fixed(u) => pick_in(balance, u.len(), |i| u.get(i), tried),
            Self::Resolved(u) => pick_in(balance, u.len(), |i| u.get(i).map(|u| &**u), tried),
        }
    }
}

#[inline]
fn pick_in<'u>(
    balance: Balance,
    n: usize,
    get: impl Fn(usize) -> Option<&'u Upstream>,
    tried: &[usize],
) -> Option<usize> {
    if n == 1 {
        return tried.is_empty().then_some(0);
    }
    let get = &get;
    let candidates = |healthy_only: bool| {
        (0..n).filter(move |i| !tried.contains(i) && (!healthy_only || get(*i).is_some_and(Upstream::is_healthy)))
    };
    let pick_from = |healthy_only: bool| -> Option<usize> {
        match balance {
            Balance::RoundRobin => {
                let start = NEXT.with(|c| {
                    let v = c.get();
                    c.set(v.wrapping_add(1));
                    v
                });
                (0..n).map(|k| (start + k) % n).find(|i| candidates(healthy_only).any(|c| c == *i))
            }
            Balance::LeastRequests => candidates(healthy_only)
                .min_by_key(|i| get(*i).map_or(u32::MAX, |u| u.in_flight.load(Ordering::Relaxed))),
        }
    };
    pick_from(true).or_else(|| pick_from(false))
}

thread_local! {
    /// Where round robin goes next, per worker thread.
    static NEXT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
