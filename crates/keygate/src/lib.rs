//! The `keygate` program as a library: configuration, the `serve` wiring, the CLI commands.
//! `main.rs` only parses the command line and hands off; the testkit starts servers through
//! [`serve::start`].
#![forbid(unsafe_code)]

pub mod api_cmd;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fetch;
pub mod gateway;
pub mod live_routes;
pub mod notify;
pub mod pepper;
pub mod root_key_cmd;
pub mod scan;
pub mod scan_cmd;
pub mod serve;
pub mod siem;

/// An error in how keygate was asked to run: the process exits with code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The process's exit code for an error, decided here for every command:
///
/// | code | meaning |
/// |---|---|
/// | 0 | success (`scan`: no token found) |
/// | 1 | the server refused (its code and message are printed), or another failure; `scan`: a token was confirmed |
/// | 2 | invalid usage: clap's own errors, a missing `KEYGATE_ADMIN_KEY`, a malformed option value, an invalid configuration (`config check`) |
/// | 3 | the admin API could not be reached, or the connection broke before its answer |
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() {
        2
    } else if err.downcast_ref::<client::TransportError>().is_some() {
        3
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn exit_codes_survive_context() {
        let refused =
            client::ApiFailure { status: 404, code: "app_not_found".into(), message: "no app".into(), hint: None };
        assert_eq!(exit_code(&anyhow::Error::from(refused)), 1);
        assert_eq!(exit_code(&anyhow::Error::from(UsageError("x".into()))), 2);
        let unreachable: anyhow::Result<()> = Err(client::TransportError("refused".into()).into());
        assert_eq!(exit_code(&unreachable.context("while listing").unwrap_err()), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        cli::Cli::command().debug_assert();
    }
}
