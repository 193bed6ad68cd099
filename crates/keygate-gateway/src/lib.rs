//! keygate's data plane. Its request path, top to bottom (imports point down, never up):
//!
//! - the listener ([`server`]) and the front ends, [`h1`] (keygate's own HTTP/1.1 server) and
//!   [`h2`] (HTTP/2 through hyper), which parse a request, make its context ([`ctx`]) and run
//! - the phases ([`phase`]): [`phase::admit`] (route, credential, token, DPoP, IP, scope, limits,
//!   CORS), [`phase::forward`] (upstream choice, the upstream head, attempts), [`phase::record`]
//!   (metering, access log);
//! - [`answer`], the one place a refusal or an upstream error becomes an answer;
//! - the state they read ([`gateway`]) and the leaves: the route table ([`routes`]), the in-memory
//!   token index ([`index`]) kept current by the change feed ([`follow`]), JWTs ([`jwt`]), rate
//!   limits and quotas ([`limiter`]), usage metering ([`usage`]), the upstream client
//!   ([`proxy`], HTTP/1.1), its TLS ([`upstream_tls`]), HTTP/2 ([`upstream_h2`]) and the choice
//!   between them ([`upstream`]), upstreams' DNS names ([`resolve`]), bodies ([`body`]), request
//!   heads ([`head`]), metrics ([`metrics`]), the per-route response cache ([`cache`]).
//!
//! [`tasks`] holds the gateway's background loops (usage flusher, health checks, DNS refresh).
#![forbid(unsafe_code)]

pub mod ai;
pub mod answer;
pub mod body;
pub mod cache;
pub mod calls;
pub mod config;
pub mod conns;
pub mod ctx;
pub mod follow;
#[doc(hidden)]
pub mod fuzz_api;
pub mod gateway;
pub mod h1;
pub mod h2;
pub mod head;
pub mod index;
pub mod jwt;
pub mod limiter;
pub mod metrics;
pub mod phase;
pub mod proxy;
pub mod resolve;
pub mod routes;
pub mod server;
pub mod shared;
pub mod target;
pub mod tasks;
mod timer;
pub mod upstream;
pub mod upstream_h2;
pub mod upstream_tls;
pub mod usage;
pub mod validate;
pub mod verify;
pub mod watch;
