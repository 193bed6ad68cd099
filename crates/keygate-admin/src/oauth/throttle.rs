//! The OAuth endpoints' throttles (issue 12): GCRA limits per client address, per authenticated
//! client, and on failed client authentications per (address, claimed client id).
//!
//! Nothing a request claims is stored as sent. Every key is a fixed-size digest, so an entry is 24
//! bytes whatever the request held, and every map is bounded in entries: two generations of at
//! most half the capacity each. A key is written to the current generation; when that is full it
//! becomes the previous one (the older previous is dropped), so making room is O(1) amortized,
//! with no sweep of the map under its lock. What a full map forgets is the state of keys not seen
//! for a generation: a caller spraying fresh keys can at worst reset throttles, never grow memory
//! or block another caller's key.

use std::collections::HashMap;
use std::net::IpAddr;

use keygate_core::policy::RateLimit;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// A throttle key: the first 16 bytes of a SHA-256 digest.
pub(crate) type Key = [u8; 16];

/// Entries each throttle keeps at most.
pub const THROTTLE_CAPACITY: usize = 65_536;

/// What the throttles hold (for tests and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub entries: usize,
    /// Keys and values, excluding the maps' own spare capacity.
    pub bytes: usize,
}

impl std::ops::Add for Footprint {
    type Output = Footprint;
    fn add(self, o: Footprint) -> Footprint {
        Footprint { entries: self.entries + o.entries, bytes: self.bytes + o.bytes }
    }
}

/// The digest key of some parts (each length-prefixed, so no two lists of parts collide).
pub(crate) fn key(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update(u64::try_from(p.len()).unwrap_or(u64::MAX).to_be_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(d.get(..16).unwrap_or(&[0; 16]));
    k
}

/// The part of an address that one party holds: an IPv4 address, or an IPv6 /64 (the smallest
/// prefix a site is normally given, RFC 6177), so that one host cannot pose as 2^64 callers.
pub(crate) fn address_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets().get(..8).map(<[u8]>::to_vec).unwrap_or_default(),
        },
    }
}

#[derive(Default)]
struct Generations {
    current: HashMap<Key, i64>,
    previous: HashMap<Key, i64>,
}

/// A GCRA limit per key, bounded to `capacity` entries.
pub(crate) struct KeyedRate {
    limit: RateLimit,
    half: usize,
    gens: Mutex<Generations>,
}

impl KeyedRate {
    pub(crate) fn new(limit: RateLimit, capacity: usize) -> Self {
        Self { limit, half: (capacity / 2).max(1), gens: Mutex::new(Generations::default()) }
    }

    /// The limit each key has.
    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Counts a request against `key`: `Err(retry_after_seconds)` when over the limit.
    pub(crate) fn check(&self, key: &Key, now_us: i64) -> Result<(), u64> {
        self.decide(key, now_us, true)
    }

    /// Whether a request of `key` would be allowed now, without counting it.
    pub(crate) fn allows(&self, key: &Key, now_us: i64) -> Result<(), u64> {
        self.decide(key, now_us, false)
    }

    fn decide(&self, key: &Key, now_us: i64, count: bool) -> Result<(), u64> {
        // parking_lot's lock does not poison: a panic elsewhere never stops the throttling.
        let mut g = self.gens.lock();
        let tat = g.current.get(key).or_else(|| g.previous.get(key)).copied().unwrap_or(0);
        let d = self.limit.gcra(tat, now_us);
        // Counted requests keep their key in the current generation (a refused one too, so that
        // being throttled is not forgotten sooner than being allowed).
        if count {
            if g.current.len() >= self.half && !g.current.contains_key(key) {
                g.previous = std::mem::take(&mut g.current);
            }
            g.current.insert(*key, d.new_tat);
        }
        if d.allowed { Ok(()) } else { Err(u64::try_from((d.retry_after + 999_999) / 1_000_000).unwrap_or(1).max(1)) }
    }

    pub(crate) fn footprint(&self) -> Footprint {
        let g = self.gens.lock();
        let entries = g.current.len() + g.previous.len();
        Footprint { entries, bytes: entries * std::mem::size_of::<(Key, i64)>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn a_full_map_makes_room_without_growing() {
        let r = KeyedRate::new(RateLimit { requests: 1, per_seconds: 60, burst: 0 }, 100);
        for i in 0u32..10_000 {
            r.check(&key(&[&i.to_be_bytes()]), 0).unwrap();
            assert!(r.footprint().entries <= 100);
        }
        assert_eq!(r.footprint().bytes, r.footprint().entries * 24);
        // A key of the current generation keeps its state.
        let k = key(&[b"kept"]);
        r.check(&k, 0).unwrap();
        assert!(r.check(&k, SECOND).is_err());
    }

    #[test]
    fn allows_does_not_count() {
        let r = KeyedRate::new(RateLimit { requests: 1, per_seconds: 60, burst: 1 }, 100);
        let k = key(&[b"a"]);
        for _ in 0..5 {
            r.allows(&k, 0).unwrap();
        }
        r.check(&k, 0).unwrap();
        r.check(&k, 0).unwrap();
        assert_eq!(r.allows(&k, 0), Err(60));
        assert!(r.allows(&key(&[b"b"]), 0).is_ok(), "another key is not affected");
    }

    #[test]
    fn keys_are_fixed_size_and_unambiguous() {
        assert_ne!(key(&[b"ab", b"c"]), key(&[b"a", b"bc"]));
        let v6 = |s: &str| address_bytes(s.parse().unwrap());
        assert_eq!(v6("2001:db8::1"), v6("2001:db8::ffff:1"), "one /64");
        assert_ne!(v6("2001:db8::1"), v6("2001:db8:0:1::1"));
        assert_eq!(v6("::ffff:10.0.0.1"), v6("10.0.0.1"));
    }
}
