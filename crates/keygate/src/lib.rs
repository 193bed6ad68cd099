//! The `keygate` program as a library: configuration, the `serve` wiring, the CLI commands.
//! `main.rs` only parses the command line and hands off; the testkit starts servers through
//! [`serve::start`].
#![forbid(unsafe_code)]

pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod fetch;
pub mod gateway;
pub mod pepper;
pub mod root_key_cmd;
pub mod scan;
pub mod scan_cmd;
pub mod serve;

/// An error in how keygate was asked to run: the process exits with code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
