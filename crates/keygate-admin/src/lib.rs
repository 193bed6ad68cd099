//! keygate's control plane: the service layer that the admin API, the CLI and (later) the
//! dashboard all call, and the admin REST API with its generated OpenAPI document.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod alerts;
pub mod api;
pub mod apis;
pub mod catalog;
mod csv;
pub mod dashboard;
pub mod email;
pub mod listener;
pub mod notices;
pub mod oauth;
pub mod providers;
pub mod routes;
pub mod seal;
pub mod secret_scanning;
pub mod service;
pub mod subscriptions;
#[cfg(test)]
mod testing;
pub mod totp;
pub mod webhooks;
pub mod workspaces;

pub use api::{AdminState, probes_router, router};
pub use service::{Admin, AdminSettings};
