//! keygate's domain: the token format and its secrets, scopes and their matching, token policies,
//! the records of the data model and of the OAuth2 authorization server, audit events, the `Clock`
//! and randomness seams, and the store traits every engine implements. No transport and no IO live here.
#![forbid(unsafe_code)]

pub mod account;
pub mod anomaly;
pub mod apis;
pub mod audit_chain;
pub mod billing;
pub mod calls;
pub mod clock;
pub mod dpop;
pub mod error;
pub mod ids;
pub mod jose;
pub mod limits;
pub mod llm;
pub mod model;
pub mod notify;
pub mod oauth;
pub mod pkce;
pub mod policy;
pub mod scope;
pub mod secret;
pub mod siem;
pub mod store;
pub mod subscriptions;
pub mod token_format;
pub mod verify;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use error::{Error, ErrorKind, Result};
