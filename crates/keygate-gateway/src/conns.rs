//! Connection admission: how many client connections a worker holds, and one client address
//! holds, at once. A connection beyond a cap is refused the moment it is accepted, before a byte
//! of it is read, so that neither a flood of connections nor a few slow clients can take every
//! file descriptor and every task of the gateway.
//!
//! Invariant: a connection is counted from its admission until its [`ConnSlot`] drops, whatever
//! ends it (a normal close, an error, a panic unwinding the task), so the counts never drift.
//! The per-address map holds an entry only while that address has a connection open, so it has
//! at most as many entries as there are open connections: (workers × `max_per_worker`) entries of
//! 32 bytes, whoever connects.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

/// Shards of the per-address map (a connection takes one shard's lock twice: open and close).
const ADDRESS_SHARDS: usize = 16;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The worker that accepted it holds `max_connections_per_worker` already.
    Worker,
    /// Its address (IPv6: its /64) holds `max_connections_per_address` already.
    Address,
}

/// One worker's count of open connections, on a cache line of its own: only its worker admits
/// on it and its connections (tasks of that worker) give their place back, so neither the
/// count nor the reference count of its `Arc` is written by another core; `/metrics` reads it.
#[derive(Default)]
#[repr(align(128))]
struct WorkerCount(AtomicUsize);

/// Open connections by client address, sharded (a connection takes one shard's lock twice:
/// when it is admitted and when it ends).
struct AddressCounts {
    shards: Box<[Mutex<HashMap<u128, u32>>]>,
}

impl AddressCounts {
    fn shard(&self, key: u128) -> Option<&Mutex<HashMap<u128, u32>>> {
        // Fold the whole key: what varies between clients is an IPv4 address's low bytes, or an
        // IPv6 /64's bits above the interface half; a client choosing them only spreads its own
        // entries.
        let folded = (key ^ (key >> 64)) as u64;
        let folded = folded ^ (folded >> 32);
        let n = self.shards.len() as u64;
        self.shards.get(usize::try_from(folded % n.max(1)).unwrap_or(0))
    }

    fn lock(&self, key: u128) -> Option<MutexGuard<'_, HashMap<u128, u32>>> {
        // parking_lot's locks do not poison: a panic elsewhere never makes a count be skipped.
        self.shard(key).map(|m| m.lock())
    }
}

/// The connection counts of one gateway listener, shared by its workers.
pub struct ConnStats {
    max_per_worker: usize,
    max_per_address: usize,
    workers: Box<[Arc<WorkerCount>]>,
    /// `None` without a per-address cap: no map is kept.
    addresses: Option<Arc<AddressCounts>>,
    refused_worker: AtomicU64,
    refused_address: AtomicU64,
}

/// The key of an address in the per-address map: an IPv4 address (plain or IPv4-mapped) as
/// itself, an IPv6 address by its /64, the smallest block a single subscriber is usually given
/// (RFC 6177), so that one client cannot escape the cap by changing the low bits.
fn address_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => u128::from(v6) & !u128::from(u64::MAX),
        },
    }
}

impl ConnStats {
    /// Counts for `workers` workers; `max_per_address` 0 means no per-address cap.
    pub fn new(workers: usize, max_per_worker: usize, max_per_address: usize) -> Self {
        Self {
            max_per_worker: max_per_worker.max(1),
            max_per_address,
            workers: (0..workers.max(1)).map(|_| Arc::new(WorkerCount::default())).collect(),
            addresses: (max_per_address > 0).then(|| {
                Arc::new(AddressCounts { shards: (0..ADDRESS_SHARDS).map(|_| Mutex::new(HashMap::new())).collect() })
            }),
            refused_worker: AtomicU64::new(0),
            refused_address: AtomicU64::new(0),
        }
    }

    /// Admits a connection from `ip` on `worker` (called by that worker only), or says why
    /// not. The slot keeps it counted until it drops.
    pub fn admit(&self, worker: usize, ip: IpAddr) -> Result<ConnSlot, Refused> {
        let Some(count) = self.workers.get(worker) else {
            return Err(Refused::Worker);
        };
        if count.0.load(Ordering::Relaxed) >= self.max_per_worker {
            self.refused_worker.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Worker);
        }
        let mut address = None;
        if let Some(counts) = &self.addresses {
            let key = address_key(ip);
            if let Some(mut map) = counts.lock(key) {
                let n = map.entry(key).or_insert(0);
                if usize::try_from(*n).unwrap_or(usize::MAX) >= self.max_per_address {
                    drop(map);
                    self.refused_address.fetch_add(1, Ordering::Relaxed);
                    return Err(Refused::Address);
                }
                *n += 1;
                address = Some((counts.clone(), key));
            }
        }
        // Only this worker admits on its count, so the check above cannot be raced.
        count.0.fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot { worker: count.clone(), address })
    }

    /// Connections open now, over every worker.
    pub fn open(&self) -> usize {
        self.workers.iter().map(|w| w.0.load(Ordering::Relaxed)).sum()
    }

    /// Addresses with a connection open (the per-address map's size).
    pub fn addresses(&self) -> usize {
        self.addresses.as_ref().map_or(0, |a| a.shards.iter().map(|s| s.lock().len()).sum())
    }

    /// Connections refused so far, for one reason.
    pub fn refused(&self, why: Refused) -> u64 {
        match why {
            Refused::Worker => self.refused_worker.load(Ordering::Relaxed),
            Refused::Address => self.refused_address.load(Ordering::Relaxed),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(512);
        let _ = writeln!(out, "# HELP keygate_gateway_connections_open Client connections open now.");
        let _ = writeln!(out, "# TYPE keygate_gateway_connections_open gauge");
        let _ = writeln!(out, "keygate_gateway_connections_open {}", self.open());
        let _ = writeln!(
            out,
            "# HELP keygate_gateway_connections_refused_total Client connections refused at a cap, by cap."
        );
        let _ = writeln!(out, "# TYPE keygate_gateway_connections_refused_total counter");
        let _ = writeln!(
            out,
            "keygate_gateway_connections_refused_total{{cap=\"worker\"}} {}",
            self.refused(Refused::Worker)
        );
        let _ = writeln!(
            out,
            "keygate_gateway_connections_refused_total{{cap=\"address\"}} {}",
            self.refused(Refused::Address)
        );
        out
    }
}

/// An admitted connection; dropping it gives its place back.
pub struct ConnSlot {
    worker: Arc<WorkerCount>,
    address: Option<(Arc<AddressCounts>, u128)>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.worker.0.fetch_sub(1, Ordering::Relaxed);
        if let Some((counts, key)) = &self.address
            && let Some(mut map) = counts.lock(*key)
            && let Some(n) = map.get_mut(key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_worker_admits_up_to_its_cap_and_again_after_a_close() {
        let stats = ConnStats::new(2, 2, 0);
        let a = stats.admit(0, ip("10.0.0.1")).unwrap();
        let _b = stats.admit(0, ip("10.0.0.2")).unwrap();
        assert_eq!(stats.admit(0, ip("10.0.0.3")).err(), Some(Refused::Worker));
        // The other worker has its own count.
        let _c = stats.admit(1, ip("10.0.0.3")).unwrap();
        assert_eq!(stats.open(), 3);
        drop(a);
        assert!(stats.admit(0, ip("10.0.0.3")).is_ok());
        assert_eq!(stats.refused(Refused::Worker), 1);
        assert!(stats.render().contains("keygate_gateway_connections_refused_total{cap=\"worker\"} 1"));
    }

    #[test]
    fn an_address_is_capped_over_workers_and_its_entry_goes_with_its_last_connection() {
        let stats = ConnStats::new(2, 100, 2);
        let a = stats.admit(0, ip("192.0.2.1")).unwrap();
        let b = stats.admit(1, ip("::ffff:192.0.2.1")).unwrap();
        assert_eq!(stats.admit(0, ip("192.0.2.1")).err(), Some(Refused::Address), "IPv4-mapped is the same address");
        assert!(stats.admit(0, ip("192.0.2.2")).is_ok(), "another address has its own count");
        // IPv6: one /64 is one client.
        let _c = stats.admit(0, ip("2001:db8:1:2::1")).unwrap();
        let _d = stats.admit(1, ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(stats.admit(0, ip("2001:db8:1:2::77")).err(), Some(Refused::Address));
        assert!(stats.admit(0, ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(stats.refused(Refused::Address), 2);
        drop((a, b));
        assert_eq!(stats.addresses(), 1, "only the /64 still connected is in the map");
        assert!(stats.admit(0, ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn without_a_per_address_cap_no_map_is_kept() {
        let stats = ConnStats::new(1, 10, 0);
        let _a: Vec<ConnSlot> = (0..5).map(|_| stats.admit(0, ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(stats.addresses(), 0);
    }
}
