//! `keygate policy …`: the workspace's token rules (`/admin/v1/policy/rules`).

use reqwest::Method;
use serde_json::Value;

use super::Shown;
use crate::UsageError;
use crate::cli::{ApiCommand, PolicyCommand};
use crate::client::AdminClient;

const COLUMNS: &[&str] = &[
    "require_expiry",
    "allowlist_required_for",
    "dpop_required_for",
    "max_active_tokens_per_app",
    "deny",
    "dormant_days",
    "suspend_dormant",
];

pub async fn run(args: ApiCommand<PolicyCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let answer = match &args.command {
        PolicyCommand::Show => client.send(Method::GET, "/admin/v1/policy/rules", None).await?,
        PolicyCommand::Set { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file).map_err(|e| UsageError(format!("cannot read {file}: {e}")))?
            };
            let rules: Value = serde_json::from_str(&text)
                .map_err(|e| UsageError(format!("{file} is not JSON: {e}; see `keygate policy show --output json`")))?;
            client.send(Method::PUT, "/admin/v1/policy/rules", Some(rules)).await?
        }
    };
    Shown::rows(answer, COLUMNS).print(args.api.output)
}
