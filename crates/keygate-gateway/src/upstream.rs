//! Which HTTP version a request goes upstream in: a route's `upstream_protocol` (HTTP/1.1,
//! HTTP/2, or what ALPN agrees), this worker's pooled connections of either kind, and a new
//! connection when there is none. Above both clients ([`crate::proxy`] for HTTP/1.1,
//! [`crate::upstream_h2`] for HTTP/2), so that neither imports the other's caller.

use std::time::Duration;

use crate::config::UpstreamProtocol;
use crate::proxy::{self, Conn, UpstreamError};
use crate::target::Upstream;
use crate::upstream_h2::{self as h2, H2Conn};

/// A connection for one request, in the HTTP version the upstream speaks.
pub enum Opened {
    H1(Conn),
    H2(H2Conn),
}

/// A connection to `upstream` for one request: an idle pooled one (or the worker's HTTP/2
/// connection), else a new one. With `upstream_protocol = "auto"`, a new connection speaks what
/// ALPN agreed. A failure to connect counts against the upstream's passive health.
pub async fn open(upstream: &Upstream, connect_timeout: Duration) -> Result<Opened, UpstreamError> {
    let opened = match upstream.protocol {
        UpstreamProtocol::Http1 => return proxy::open(upstream, connect_timeout).await.map(Opened::H1),
        UpstreamProtocol::Http2 => {
            if let Some(c) = h2::checkout(upstream) {
                return Ok(Opened::H2(c));
            }
            match proxy::dial(upstream, connect_timeout).await {
                Ok(stream) => h2::handshake(upstream, stream).await.map(Opened::H2),
                Err(e) => Err(e),
            }
        }
        UpstreamProtocol::Auto => {
            if let Some(c) = h2::checkout(upstream) {
                return Ok(Opened::H2(c));
            }
            if let Some(c) = proxy::checkout_idle(upstream) {
                return Ok(Opened::H1(c));
            }
            match proxy::dial(upstream, connect_timeout).await {
                Ok(stream) if stream.is_h2() => h2::handshake(upstream, stream).await.map(Opened::H2),
                Ok(stream) => Ok(Opened::H1(Conn::new(upstream, stream))),
                Err(e) => Err(e),
            }
        }
    };
    opened.inspect_err(|_| proxy::note_failure(upstream))
}

/// One active health check on a new connection, in the version the upstream speaks: `GET path`;
/// a 2xx or 3xx answer within `timeout` passes.
pub async fn probe(upstream: &Upstream, path: &str, timeout: Duration) -> bool {
    let Ok(stream) = proxy::dial(upstream, timeout).await else { return false };
    let h2 = match upstream.protocol {
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Auto => stream.is_h2(),
    };
    if h2 {
        return matches!(tokio::time::timeout(timeout, h2::probe(upstream, stream, path)).await, Ok(true));
    }
    proxy::probe_h1(upstream, stream, path, timeout).await
}
