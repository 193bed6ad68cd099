//! A token's policy: its IP allowlist, rate limit and quota, validated as values. The checks
//! against a request (and the GCRA and quota maths) are done by the gateway from these values.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most CIDR entries one token's allowlist may hold.
pub const MAX_ALLOWLIST_ENTRIES: usize = 256;

/// Parses an allowlist of IPv4/IPv6 CIDRs or single addresses, normalized (`10.0.0.7/8` →
/// `10.0.0.0/8`) and deduplicated. An empty list allows every address.
pub fn parse_allowlist(raw: &[String]) -> Result<Vec<IpNet>> {
    if raw.len() > MAX_ALLOWLIST_ENTRIES {
        return Err(Error::invalid(
            "invalid_ip_allowlist",
            format!("an IP allowlist holds at most {MAX_ALLOWLIST_ENTRIES} entries"),
        ));
    }
    let mut out = Vec::with_capacity(raw.len());
    for entry in raw {
        let net = entry.parse::<IpNet>().or_else(|_| entry.parse::<IpAddr>().map(IpNet::from)).map_err(|_| {
            Error::invalid(
                "invalid_ip_allowlist",
                format!("{entry:?} is not an IPv4 or IPv6 address or CIDR (such as 203.0.113.0/24 or 2001:db8::/32)"),
            )
        })?;
        out.push(net.trunc());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether `addr` is allowed by `allowlist` (empty: everyone). IPv4-mapped IPv6 addresses
/// (`::ffff:203.0.113.9`) are checked as the IPv4 address they carry.
pub fn allowlist_permits(allowlist: &[IpNet], addr: IpAddr) -> bool {
    if allowlist.is_empty() {
        return true;
    }
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    allowlist.iter().any(|net| net.contains(&addr))
}

/// At most `requests` per `per_seconds`, with up to `burst` extra requests at once (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub per_seconds: u32,
    #[serde(default)]
    pub burst: u32,
}

impl RateLimit {
    pub fn validate(&self) -> Result<()> {
        if self.requests == 0 || self.per_seconds == 0 {
            return Err(Error::invalid(
                "invalid_rate_limit",
                "rate_limit.requests and rate_limit.per_seconds must both be at least 1",
            ));
        }
        if self.per_seconds > 31 * 86_400 {
            return Err(Error::invalid(
                "invalid_rate_limit",
                "rate_limit.per_seconds is at most 2678400 (31 days); use a quota for longer periods",
            ));
        }
        Ok(())
    }
}

/// The outcome of one GCRA check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraDecision {
    pub allowed: bool,
    /// The theoretical arrival time to store (unchanged when refused), in microseconds.
    pub new_tat: i64,
    /// Requests that could still be made right now.
    pub remaining: u64,
    /// Microseconds until the bucket is full again.
    pub reset_after: i64,
    /// When refused: microseconds until one request is allowed.
    pub retry_after: i64,
}

impl RateLimit {
    /// Microseconds between two requests at the sustained rate (at least 1).
    pub fn emission_interval_us(&self) -> i64 {
        (i64::from(self.per_seconds) * 1_000_000 / i64::from(self.requests.max(1))).max(1)
    }

    /// How many requests fit at once from idle: `requests + burst`.
    pub fn capacity(&self) -> u64 {
        u64::from(self.requests) + u64::from(self.burst)
    }

    /// GCRA (the generic cell rate algorithm, a token bucket without a timer): a bucket of
    /// `requests + burst` that refills at `requests` per `per_seconds`. `tat` is the stored
    /// theoretical arrival time and `now` the current time, both in microseconds.
    pub fn gcra(&self, tat: i64, now: i64) -> GcraDecision {
        self.gcra_cost(tat, now, 1)
    }

    /// [`Self::gcra`] for a request that weighs `cost` requests (the verification endpoint's
    /// `cost`): allowed when `cost` requests fit in the bucket now, taking all of them; a cost of
    /// 0 takes nothing and is never refused (it only reads the bucket).
    pub fn gcra_cost(&self, tat: i64, now: i64, cost: u32) -> GcraDecision {
        let t = self.emission_interval_us();
        let capacity = i64::try_from(self.capacity()).unwrap_or(i64::MAX).max(1);
        let tau = t.saturating_mul(capacity - 1);
        let tat = tat.max(now);
        let increment = t.saturating_mul(i64::from(cost));
        let new_tat = tat.saturating_add(increment);
        // The bucket holds `now + tau + t - tat` worth of requests; `cost` of them must fit.
        let allow_at = new_tat.saturating_sub(tau).saturating_sub(t);
        if now < allow_at {
            let remaining_span = now.saturating_add(tau).saturating_add(t).saturating_sub(tat);
            return GcraDecision {
                allowed: false,
                new_tat: tat,
                remaining: u64::try_from(remaining_span / t).unwrap_or(0),
                reset_after: tat - now,
                retry_after: allow_at - now,
            };
        }
        let span = now.saturating_add(tau).saturating_add(t).saturating_sub(new_tat);
        GcraDecision {
            allowed: true,
            new_tat,
            remaining: u64::try_from(span / t).unwrap_or(0),
            reset_after: new_tat - now,
            retry_after: 0,
        }
    }
}

/// How long a quota's count runs before it starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    /// Calendar day, UTC.
    Day,
    /// Calendar month, UTC.
    Month,
    /// Never resets.
    Total,
}

impl QuotaPeriod {
    /// The period that holds `now` (milliseconds since the epoch, UTC), as [start, end) in
    /// milliseconds. `Total` never ends.
    pub fn window(self, now_ms: i64) -> (i64, i64) {
        const DAY: i64 = 86_400_000;
        match self {
            Self::Total => (0, i64::MAX),
            Self::Day => {
                let start = now_ms.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            Self::Month => {
                let days = now_ms.div_euclid(DAY);
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1) * DAY;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start, days_from_civil(ny, nm, 1) * DAY)
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "total",
        }
    }
}

/// At most `requests` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub requests: u64,
    pub period: QuotaPeriod,
}

impl Quota {
    pub fn validate(&self) -> Result<()> {
        if self.requests == 0 {
            return Err(Error::invalid("invalid_quota", "quota.requests must be at least 1"));
        }
        Ok(())
    }
}

impl RateLimit {
    /// Whether this limit lets through no more than `ceiling` does: a sustained rate no higher
    /// and a bucket no larger (so neither a steady caller nor a burst gets more).
    pub fn within(&self, ceiling: &RateLimit) -> bool {
        // requests / per_seconds <= ceiling.requests / ceiling.per_seconds, without division.
        let rate_ok = u64::from(self.requests) * u64::from(ceiling.per_seconds)
            <= u64::from(ceiling.requests) * u64::from(self.per_seconds);
        rate_ok && self.capacity() <= ceiling.capacity()
    }
}

impl Quota {
    /// The most requests this quota can let through in any one period of `other`: a count per
    /// month also bounds every day in it, a day's count times 31 bounds a month, and a total
    /// bounds every period; a daily or monthly count bounds no total (`None`: unbounded).
    pub fn most_in(&self, other: QuotaPeriod) -> Option<u64> {
        use QuotaPeriod::{Day, Month, Total};
        match (self.period, other) {
            (Total, _) | (Day, Day) | (Month, Month) | (Month, Day) => Some(self.requests),
            (Day, Month) => Some(self.requests.saturating_mul(31)),
            (Day | Month, Total) => None,
        }
    }

    /// Whether this quota lets through no more than `ceiling` in every period of the ceiling's.
    pub fn within(&self, ceiling: &Quota) -> bool {
        self.most_in(ceiling.period).is_some_and(|n| n <= ceiling.requests)
    }
}

// Howard Hinnant's days-from-civil algorithms (public domain), for calendar months in UTC.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn allowlists_parse_normalize_and_match() {
        let nets = parse_allowlist(&list(&["10.1.2.3/8", "203.0.113.9", "2001:db8::/32", "10.0.0.0/8"])).unwrap();
        assert_eq!(nets.len(), 3);
        assert!(allowlist_permits(&nets, "10.200.0.1".parse().unwrap()));
        assert!(allowlist_permits(&nets, "203.0.113.9".parse().unwrap()));
        assert!(!allowlist_permits(&nets, "203.0.113.10".parse().unwrap()));
        assert!(allowlist_permits(&nets, "2001:db8::1".parse().unwrap()));
        assert!(allowlist_permits(&nets, "::ffff:10.9.9.9".parse().unwrap()));
        assert!(!allowlist_permits(&nets, "2001:db9::1".parse().unwrap()));
        assert!(allowlist_permits(&[], "192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn invalid_cidrs_are_refused() {
        for bad in ["10.0.0.0/33", "300.1.1.1", "::/129", "localhost", "", "10.0.0.0/8 "] {
            let e = parse_allowlist(&list(&[bad])).unwrap_err();
            assert_eq!(e.code, "invalid_ip_allowlist", "{bad}");
        }
    }

    #[test]
    fn ceilings_compare_rates_buckets_and_periods() {
        let plan = RateLimit { requests: 100, per_seconds: 60, burst: 10 };
        assert!(plan.within(&plan));
        assert!(RateLimit { requests: 1, per_seconds: 1, burst: 0 }.within(&plan), "60/min, bucket 1");
        assert!(!RateLimit { requests: 2, per_seconds: 1, burst: 0 }.within(&plan), "120/min is more");
        assert!(!RateLimit { requests: 100, per_seconds: 60, burst: 11 }.within(&plan), "a larger bucket");
        assert!(!RateLimit { requests: 50, per_seconds: 30, burst: 61 }.within(&plan), "same rate, larger bucket");
        let q = |requests, period| Quota { requests, period };
        use QuotaPeriod::{Day, Month, Total};
        assert!(q(1000, Month).within(&q(1000, Month)));
        assert!(!q(1001, Month).within(&q(1000, Month)));
        assert!(q(32, Day).within(&q(1000, Month)), "32 a day is at most 992 a month");
        assert!(!q(33, Day).within(&q(1000, Month)), "33 a day can be 1023 a month");
        assert!(q(50, Month).within(&q(50, Day)), "a month's 50 bound every day");
        assert!(!q(51, Month).within(&q(50, Day)));
        assert!(q(10, Total).within(&q(10, Day)));
        assert!(!q(1, Day).within(&q(1_000_000, Total)), "a daily count never bounds a total");
    }

    #[test]
    fn gcra_allows_a_full_bucket_then_the_sustained_rate() {
        let rl = RateLimit { requests: 10, per_seconds: 1, burst: 5 };
        let mut tat = 0;
        let now = 1_000_000_000;
        let mut allowed = 0;
        for _ in 0..20 {
            let d = rl.gcra(tat, now);
            if d.allowed {
                allowed += 1;
                tat = d.new_tat;
            }
        }
        assert_eq!(allowed, 15, "requests + burst at once");
        let refused = rl.gcra(tat, now);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, 100_000, "one request every 100 ms");
        assert!(rl.gcra(tat, now + 100_000).allowed);
        let fresh = rl.gcra(0, now);
        assert_eq!(fresh.remaining, 14);
    }

    #[test]
    fn gcra_cost_takes_several_at_once_and_zero_only_reads() {
        let rl = RateLimit { requests: 10, per_seconds: 1, burst: 0 };
        let now = 1_000_000_000;
        let d = rl.gcra_cost(0, now, 4);
        assert!(d.allowed);
        assert_eq!(d.remaining, 6);
        let peek = rl.gcra_cost(d.new_tat, now, 0);
        assert!(peek.allowed);
        assert_eq!((peek.new_tat, peek.remaining), (d.new_tat, 6), "a cost of 0 takes nothing");
        let too_much = rl.gcra_cost(d.new_tat, now, 7);
        assert!(!too_much.allowed);
        assert_eq!(too_much.remaining, 6, "a refused cost leaves the bucket as it was");
        assert_eq!(too_much.retry_after, 100_000, "one more request's worth refills in 100 ms");
        let all = rl.gcra_cost(d.new_tat, now, 6);
        assert!(all.allowed && all.remaining == 0);
        for tat in [0, now - 1, now + 300_000] {
            assert_eq!(rl.gcra(tat, now), rl.gcra_cost(tat, now, 1), "cost 1 is the plain check");
        }
    }

    #[test]
    fn quota_windows_are_calendar_periods() {
        let ms = |s: &str| crate::Timestamp::parse_rfc3339(s).unwrap().as_millis();
        let now = ms("2026-02-14T13:00:00Z");
        assert_eq!(QuotaPeriod::Day.window(now), (ms("2026-02-14T00:00:00Z"), ms("2026-02-15T00:00:00Z")));
        assert_eq!(QuotaPeriod::Month.window(now), (ms("2026-02-01T00:00:00Z"), ms("2026-03-01T00:00:00Z")));
        let dec = ms("2026-12-31T23:59:59Z");
        assert_eq!(QuotaPeriod::Month.window(dec), (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z")));
        assert_eq!(QuotaPeriod::Total.window(now).1, i64::MAX);
    }

    #[test]
    fn limits_are_validated() {
        assert!(RateLimit { requests: 0, per_seconds: 1, burst: 0 }.validate().is_err());
        assert!(RateLimit { requests: 1, per_seconds: 0, burst: 0 }.validate().is_err());
        assert!(RateLimit { requests: 10, per_seconds: 60, burst: 5 }.validate().is_ok());
        assert!(Quota { requests: 0, period: QuotaPeriod::Day }.validate().is_err());
    }
}

/// A set of IPv4/IPv6 networks to test addresses against quickly, however many: one hash
/// lookup per distinct prefix length in the set (a denylist of thousands of /32s and /24s costs
/// two lookups). IPv4-mapped IPv6 addresses are tested as the IPv4 address they carry.
#[derive(Debug, Default, Clone)]
pub struct AddressSet {
    v4: Vec<(u8, std::collections::HashSet<u32>)>,
    v6: Vec<(u8, std::collections::HashSet<u128>)>,
}

/// The most entries an [`AddressSet`] is read from.
pub const MAX_ADDRESS_SET_ENTRIES: usize = 100_000;

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(len))) }
}

fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(len))) }
}

impl AddressSet {
    /// Reads addresses and CIDRs (`203.0.113.7`, `198.51.100.0/24`, `2001:db8::/32`); the error
    /// names the entry that is neither.
    pub fn parse(raw: &[String]) -> std::result::Result<Self, String> {
        if raw.len() > MAX_ADDRESS_SET_ENTRIES {
            return Err(format!("at most {MAX_ADDRESS_SET_ENTRIES} addresses or CIDRs"));
        }
        let mut set = Self::default();
        for entry in raw {
            let net =
                entry.trim().parse::<IpNet>().or_else(|_| entry.trim().parse::<IpAddr>().map(IpNet::from)).map_err(
                    |_| format!("{entry:?} is not an IPv4 or IPv6 address or CIDR (such as 203.0.113.0/24)"),
                )?;
            match net {
                IpNet::V4(n) => {
                    let len = n.prefix_len();
                    let key = mask4(u32::from(n.addr()), len);
                    match set.v4.iter_mut().find(|(l, _)| *l == len) {
                        Some((_, s)) => {
                            s.insert(key);
                        }
                        None => set.v4.push((len, std::iter::once(key).collect())),
                    }
                }
                IpNet::V6(n) => {
                    let len = n.prefix_len();
                    let key = mask6(u128::from(n.addr()), len);
                    match set.v6.iter_mut().find(|(l, _)| *l == len) {
                        Some((_, s)) => {
                            s.insert(key);
                        }
                        None => set.v6.push((len, std::iter::once(key).collect())),
                    }
                }
            }
        }
        Ok(set)
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether `addr` is in one of the set's networks.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            a => a,
        };
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|(len, s)| s.contains(&mask4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|(len, s)| s.contains(&mask6(a, *len)))
            }
        }
    }
}

#[cfg(test)]
mod address_set_tests {
    use super::*;

    fn set(entries: &[&str]) -> AddressSet {
        AddressSet::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn addresses_and_networks_of_both_families_are_found() {
        let s = set(&["203.0.113.7", "198.51.100.0/24", "2001:db8::/32", "10.0.0.9/8"]);
        for yes in ["203.0.113.7", "198.51.100.200", "2001:db8:1::5", "10.255.1.1", "::ffff:198.51.100.3"] {
            assert!(s.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["203.0.113.8", "198.51.101.1", "2001:db9::1", "11.0.0.1", "::1"] {
            assert!(!s.contains(no.parse().unwrap()), "{no}");
        }
        assert!(set(&["0.0.0.0/0"]).contains("8.8.8.8".parse().unwrap()));
        assert!(set(&[]).is_empty() && !set(&[]).contains("1.2.3.4".parse().unwrap()));
        assert!(AddressSet::parse(&["nope".to_owned()]).unwrap_err().contains("\"nope\""));
    }
}
