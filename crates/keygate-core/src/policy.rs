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
    fn limits_are_validated() {
        assert!(RateLimit { requests: 0, per_seconds: 1, burst: 0 }.validate().is_err());
        assert!(RateLimit { requests: 1, per_seconds: 0, burst: 0 }.validate().is_err());
        assert!(RateLimit { requests: 10, per_seconds: 60, burst: 5 }.validate().is_ok());
        assert!(Quota { requests: 0, period: QuotaPeriod::Day }.validate().is_err());
    }
}
