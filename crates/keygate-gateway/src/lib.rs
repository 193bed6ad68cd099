//! keygate's data plane: the listener ([`server`]), the request path ([`handler`]), the route
//! table ([`routes`]), the in-memory token index ([`index`]) kept current by the change feed
//! ([`follow`]), rate limits and quotas ([`limiter`]), usage metering ([`usage`]), upstream
//! connections ([`proxy`]) and metrics ([`metrics`]).
#![forbid(unsafe_code)]

pub mod answer;
pub mod body;
pub mod config;
pub mod conns;
pub mod follow;
pub mod h1;
pub mod handler;
pub mod head;
pub mod index;
pub mod jwt;
pub mod limiter;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod server;
mod timer;
pub mod usage;
