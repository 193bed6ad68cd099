//! The `keygate` program as a library: configuration, the `serve` wiring, the CLI commands.
//! `main.rs` only parses the command line and hands off; the testkit starts servers through
//! [`serve::start`].
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod pepper;
pub mod scan;
pub mod scan_cmd;
pub mod serve;
