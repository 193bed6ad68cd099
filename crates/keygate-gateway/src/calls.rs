//! The call log (issue 15): one record per gateway call — when, which token and app, the route,
//! method and normalized path (never the query), the status, the latency, the client's address
//! and the refusal reason — kept in memory per worker thread and written to the store in
//! batches by a background task ([`crate::tasks::spawn_call_writer`]), off the request path.
//!
//! A request costs one uncontended lock and a push of about 100 bytes (the path is the only
//! allocation). The buffer of a shard is bounded ([`MAX_PENDING`] calls per shard); calls that
//! find it full are dropped and counted ([`CallLog::dropped`], in `/metrics`), so a store that
//! cannot keep up slows nothing and grows nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use keygate_core::Timestamp;
use keygate_core::ids::{AppId, TokenId, WorkspaceId};
use keygate_core::model::CallRecord;
use keygate_core::token_format::PUBLIC_ID_LEN;
use parking_lot::Mutex;

const SHARDS: usize = 8;
/// Calls waiting per shard at most (about 100 bytes each).
pub const MAX_PENDING: usize = 65_536;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// One call, as the gateway records it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at_ms: i64,
    pub workspace_id: Arc<str>,
    pub token: Option<[u8; PUBLIC_ID_LEN]>,
    pub app_id: Option<Arc<str>>,
    pub route: Option<Arc<str>>,
    pub method: Method,
    /// The normalized path, without the query.
    pub path: Box<str>,
    pub status: u16,
    pub latency_us: u64,
    pub ip: IpAddr,
    pub refusal: Option<&'static str>,
}

impl Call {
    pub fn into_record(self) -> CallRecord {
        CallRecord {
            id: 0,
            workspace_id: WorkspaceId::from_trusted(self.workspace_id.to_string()),
            at: Timestamp::from_millis(self.at_ms),
            token_id: self.token.map(|t| TokenId::from_public_id(std::str::from_utf8(&t).unwrap_or_default())),
            app_id: self.app_id.map(|a| AppId::from_trusted(a.to_string())),
            route: self.route.map(|r| r.to_string()),
            method: self.method.as_str().to_owned(),
            path: self.path.into_string(),
            status: self.status,
            latency_us: self.latency_us,
            client_ip: self.ip.to_canonical().to_string(),
            refusal: self.refusal.map(str::to_owned),
        }
    }
}

#[repr(align(128))]
#[derive(Default)]
struct Shard(Mutex<Vec<Call>>);

/// Calls recorded and not yet written.
pub struct CallLog {
    shards: Vec<Shard>,
    /// Calls dropped because their shard's buffer was full.
    pub dropped: AtomicU64,
    /// Calls written to the store.
    pub written: AtomicU64,
}

impl Default for CallLog {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }
}

impl CallLog {
    pub fn record(&self, call: Call) {
        let Some(shard) = self.shards.get(SHARD.with(|i| *i)) else { return };
        let mut pending = shard.0.lock();
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.push(call);
    }

    /// Takes every call recorded so far, oldest first within a shard.
    pub fn drain(&self) -> Vec<Call> {
        let mut out = Vec::new();
        for shard in &self.shards {
            out.append(&mut shard.0.lock());
        }
        out.sort_by_key(|c| c.at_ms);
        out
    }

    /// Calls waiting to be written.
    pub fn pending(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(at_ms: i64) -> Call {
        Call {
            at_ms,
            workspace_id: "ws_1".into(),
            token: Some(*b"abcdefghijkl"),
            app_id: Some("app_1".into()),
            route: Some("orders".into()),
            method: Method::GET,
            path: "/orders/7".into(),
            status: 200,
            latency_us: 420,
            ip: "::ffff:203.0.113.7".parse().unwrap(),
            refusal: None,
        }
    }

    #[test]
    fn calls_are_drained_in_order_and_become_records() {
        let log = CallLog::default();
        log.record(call(2));
        log.record(call(1));
        assert_eq!(log.pending(), 2);
        let got = log.drain();
        assert_eq!(got.iter().map(|c| c.at_ms).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(log.pending(), 0);
        let r = got[0].clone().into_record();
        assert_eq!(r.token_id.unwrap().as_str(), "tok_abcdefghijkl");
        assert_eq!((r.method.as_str(), r.path.as_str(), r.client_ip.as_str()), ("GET", "/orders/7", "203.0.113.7"));
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let log = CallLog::default();
        for i in 0..(MAX_PENDING + 5) {
            log.record(call(i as i64));
        }
        assert_eq!(log.pending(), MAX_PENDING);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 5);
    }
}
