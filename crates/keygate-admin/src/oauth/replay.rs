//! Replay detection for what the token endpoint accepts once: DPoP proofs (RFC 9449 §11.1) and
//! client assertions (RFC 7523 §3, item 7), partitioned per authenticated client (issue 12).
//!
//! Each client has its own partition, bounded in entries; a full partition refuses only that
//! client, so no client can evict or block another's proofs. Entries are fixed-size digests (a
//! 256-byte `jti` costs what a short one does). Expired entries leave in expiry order, from the
//! partition being written, each once (a `BTreeSet` by expiry beside the set of digests), never by
//! a sweep of every entry under the lock. What is kept is thus bounded by the number of clients
//! that used DPoP or assertions (clients are registered by administrators) times the partition
//! size, and a partition's size by what its client sent in the last replay window.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use super::throttle::{Footprint, Key, key};

#[derive(Default)]
struct Partition {
    /// Digest → until when it counts as used (seconds).
    seen: HashMap<Key, i64>,
    by_expiry: BTreeSet<(i64, Key)>,
}

/// Why a use could not be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Seen before and not yet expired.
    Used,
    /// The client's partition is full of unexpired entries; retry after this many seconds.
    Full(u64),
}

pub(crate) struct ReplayGuard {
    per_client: usize,
    parts: Mutex<HashMap<Key, Partition>>,
}

impl ReplayGuard {
    pub(crate) fn new(per_client: usize) -> Self {
        Self { per_client: per_client.max(1), parts: Mutex::new(HashMap::new()) }
    }

    /// Records the first use of `id` by `client` until `until` (seconds), or says why not.
    pub(crate) fn first_use(&self, client: &str, id: &[&[u8]], until: i64, now: i64) -> Result<(), Replay> {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let part_key = key(&[b"client", client.as_bytes()]);
        let part = parts.entry(part_key).or_default();
        while let Some(&(exp, k)) = part.by_expiry.first() {
            if exp >= now {
                break;
            }
            part.by_expiry.pop_first();
            part.seen.remove(&k);
        }
        let k = key(id);
        if part.seen.get(&k).is_some_and(|exp| *exp >= now) {
            return Err(Replay::Used);
        }
        if part.seen.len() >= self.per_client {
            let wait = part.by_expiry.first().map_or(1, |(exp, _)| exp.saturating_sub(now).saturating_add(1));
            return Err(Replay::Full(u64::try_from(wait).unwrap_or(1)));
        }
        part.seen.insert(k, until);
        part.by_expiry.insert((until, k));
        Ok(())
    }

    /// What the guard holds now (for tests and metrics): digests with their expiry, twice (the
    /// map and the expiry order).
    pub(crate) fn footprint(&self) -> Footprint {
        let parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let entries: usize = parts.values().map(|p| p.seen.len()).sum();
        let each = std::mem::size_of::<(Key, i64)>() * 2;
        Footprint { entries, bytes: entries * each + parts.len() * std::mem::size_of::<(Key, Partition)>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_once_per_client_bounded_per_client() {
        let g = ReplayGuard::new(3);
        assert_eq!(g.first_use("a", &[b"j1"], 10, 0), Ok(()));
        assert_eq!(g.first_use("a", &[b"j1"], 10, 5), Err(Replay::Used));
        g.first_use("a", &[b"j2"], 20, 0).unwrap();
        g.first_use("a", &[b"j3"], 30, 0).unwrap();
        assert_eq!(g.first_use("a", &[b"j4"], 30, 0), Err(Replay::Full(11)));
        assert_eq!(g.first_use("b", &[b"j4"], 30, 0), Ok(()), "another client is not affected");
        // Past j1's expiry it leaves, and a is served again.
        assert_eq!(g.first_use("a", &[b"j4"], 30, 11), Ok(()));
        assert_eq!(g.footprint().entries, 4);
    }
}
