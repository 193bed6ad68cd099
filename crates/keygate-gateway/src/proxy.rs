//! Upstream connections: a pool of HTTP/1.1 client connections per worker thread (each worker
//! runs its own single-threaded runtime, so the pool needs no lock), connect and answer
//! time-outs, and passive health (consecutive failures take an upstream out of rotation).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;
use crate::routes::Upstream;

/// Idle connections kept per upstream and worker.
const MAX_IDLE: usize = 64;
/// Consecutive failures that take an upstream out until it answers again.
pub const PASSIVE_FAILURE_THRESHOLD: u32 = 5;

type Sender = SendRequest<UpstreamBody>;

thread_local! {
    static POOL: RefCell<HashMap<Arc<str>, Vec<Sender>>> = RefCell::new(HashMap::new());
}

/// Why forwarding failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect time-out): safe to retry.
    Connect(String),
    /// The request was sent but no answer came in time.
    Timeout,
    /// The connection failed after the request was sent: not safe to retry.
    Failed(String),
}

/// A connection taken from the pool, to be given back when its response is complete.
pub struct Lease {
    pub authority: Arc<str>,
    pub sender: Sender,
}

impl Lease {
    /// Gives the connection back if it can take another request.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        POOL.with(|p| {
            if let Ok(mut pool) = p.try_borrow_mut() {
                let idle = pool.entry(self.authority).or_default();
                if idle.len() < MAX_IDLE {
                    idle.push(self.sender);
                }
            }
        });
    }
}

fn checkout(authority: &Arc<str>) -> Option<Sender> {
    POOL.with(|p| {
        let mut pool = p.try_borrow_mut().ok()?;
        let idle = pool.get_mut(authority)?;
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    })
}

async fn connect(authority: &Arc<str>, timeout: Duration) -> Result<Sender, UpstreamError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(&**authority))
        .await
        .map_err(|_| UpstreamError::Connect(format!("connecting to {authority} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("cannot connect to {authority}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Connect(format!("handshake with {authority} failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection closed");
        }
    });
    Ok(sender)
}

/// Sends `req` to `upstream` over a pooled (or new) connection. A pooled connection that the
/// upstream closed while idle is replaced by a fresh one transparently (the request had not been
/// sent). Connection failures count against the upstream's passive health; a failure after the
/// request was sent is left to the caller, which knows whether the client's body caused it.
pub async fn send(
    upstream: &Upstream,
    req: Request<UpstreamBody>,
    connect_timeout: Duration,
    answer_timeout: Duration,
) -> Result<(Response<Incoming>, Lease), Unsent> {
    let authority = upstream.authority.clone();
    let (mut sender, mut pooled) = match checkout(&authority) {
        Some(s) => (s, true),
        None => match connect(&authority, connect_timeout).await {
            Ok(s) => (s, false),
            Err(e) => {
                note_failure(upstream);
                return Err(Unsent { error: e, request: Some(req) });
            }
        },
    };
    let mut req = req;
    upstream.in_flight.fetch_add(1, Ordering::Relaxed);
    let result = loop {
        match tokio::time::timeout(answer_timeout, sender.try_send_request(req)).await {
            Ok(Err(mut e)) if pooled => match e.take_message() {
                // Not sent: the idle connection was dead. Try once more on a new one.
                Some(back) => {
                    pooled = false;
                    match connect(&authority, connect_timeout).await {
                        Ok(s) => {
                            sender = s;
                            req = back;
                        }
                        Err(err) => {
                            note_failure(upstream);
                            break Err(Unsent { error: err, request: Some(back) });
                        }
                    }
                }
                None => {
                    break Err(Unsent {
                        error: UpstreamError::Failed(format!("{authority}: {}", e.error())),
                        request: None,
                    });
                }
            },
            Ok(Err(mut e)) => {
                let request = e.take_message();
                let error = match &request {
                    Some(_) => UpstreamError::Connect(format!("{authority}: {}", e.error())),
                    None => UpstreamError::Failed(format!("{authority}: {}", e.error())),
                };
                break Err(Unsent { error, request });
            }
            Ok(Ok(resp)) => break Ok(resp),
            Err(_) => break Err(Unsent { error: UpstreamError::Timeout, request: None }),
        }
    };
    upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
    let resp = result?;
    note_success(upstream);
    Ok((resp, Lease { authority, sender }))
}

/// A failed attempt, with the request back when it was never sent (so it can go elsewhere).
pub struct Unsent {
    pub error: UpstreamError,
    pub request: Option<Request<UpstreamBody>>,
}

pub fn note_success(u: &Upstream) {
    u.failures.store(0, Ordering::Relaxed);
    if !u.healthy.swap(true, Ordering::Relaxed) {
        tracing::info!(upstream = %u.authority, "upstream is healthy again");
    }
}

pub fn note_failure(u: &Upstream) {
    let n = u.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= PASSIVE_FAILURE_THRESHOLD && u.healthy.swap(false, Ordering::Relaxed) {
        tracing::warn!(upstream = %u.authority, failures = n, "upstream taken out of rotation");
    }
}

/// One active health check: `GET path` on a fresh connection.
pub async fn probe(upstream: &Upstream, path: &str, timeout: Duration) -> bool {
    let Ok(mut sender) = connect(&upstream.authority, timeout).await else { return false };
    let Ok(req) = Request::get(path).header(http::header::HOST, &*upstream.authority).body(UpstreamBody::Empty) else {
        return false;
    };
    matches!(tokio::time::timeout(timeout, sender.send_request(req)).await, Ok(Ok(r)) if r.status().is_success() || r.status().is_redirection())
}

/// Records an active health check: `healthy` consecutive successes put an upstream back,
/// `unhealthy` consecutive failures take it out.
pub fn note_probe(u: &Upstream, ok: bool, healthy: u32, unhealthy: u32) {
    if ok {
        u.failures.store(0, Ordering::Relaxed);
        let n = u.successes.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= healthy && !u.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(upstream = %u.authority, "upstream passed its health checks; back in rotation");
        }
    } else {
        u.successes.store(0, Ordering::Relaxed);
        let n = u.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= unhealthy && u.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(upstream = %u.authority, "upstream failed its health checks; out of rotation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GatewayConfig, RouteConfig};
    use crate::routes::RouteTable;

    fn table() -> RouteTable {
        let cfg: RouteConfig = serde_json::from_value(serde_json::json!({
            "id": "r", "path": "/r", "upstreams": ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        }))
        .unwrap();
        RouteTable::build(&[cfg], &GatewayConfig { demo: false, ..Default::default() }).unwrap()
    }

    #[test]
    fn passive_failures_take_an_upstream_out_and_a_success_brings_it_back() {
        let t = table();
        let u = &t.routes[0].upstreams[0];
        for _ in 0..PASSIVE_FAILURE_THRESHOLD - 1 {
            note_failure(u);
        }
        assert!(u.is_healthy(), "still in rotation below the threshold");
        note_failure(u);
        assert!(!u.is_healthy());
        assert_eq!(t.routes[0].pick(&[]), Some(1), "traffic goes to the healthy one");
        note_success(u);
        assert!(u.is_healthy());
    }

    #[test]
    fn active_checks_use_their_thresholds() {
        let t = table();
        let u = &t.routes[0].upstreams[1];
        note_probe(u, false, 2, 3);
        note_probe(u, false, 2, 3);
        assert!(u.is_healthy());
        note_probe(u, false, 2, 3);
        assert!(!u.is_healthy(), "3 failed checks take it out");
        note_probe(u, true, 2, 3);
        assert!(!u.is_healthy(), "one success is not enough");
        note_probe(u, true, 2, 3);
        assert!(u.is_healthy(), "2 successes put it back");
    }
}
