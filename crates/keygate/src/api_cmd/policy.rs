//! `keygate policy …`: the workspace's token rules (`/admin/v1/policy/rules`) and its security
//! and governance settings (`/admin/v1/policy/settings`).

use reqwest::Method;
use serde_json::Value;

use super::Shown;
use crate::UsageError;
use crate::cli::{ApiCommand, PolicyCommand, PolicySettingsArgs};
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

const SETTINGS: &[&str] = &[
    "exposure_action",
    "anomaly_suspend",
    "max_token_age_days",
    "suspend_unrotated",
    "max_token_lifetime_days",
    "plan_changes_need_approval",
    "api_publish_needs_approval",
];

/// The settings `have` with the flags given applied; `None` when no flag is given.
fn changed(mut have: Value, a: &PolicySettingsArgs) -> Result<Option<Value>, UsageError> {
    let days = |flag: &str, v: &str| -> Result<Value, UsageError> {
        if v == "none" {
            return Ok(Value::Null);
        }
        v.parse::<u32>().map(Value::from).map_err(|_| UsageError(format!("--{flag} is a number of days, or none")))
    };
    let mut set: Vec<(&str, Value)> = Vec::new();
    if let Some(v) = &a.exposure_action {
        set.push(("exposure_action", Value::from(v.as_str())));
    }
    if let Some(v) = &a.anomaly_suspend {
        set.push(("anomaly_suspend", if v == "none" { Value::Null } else { Value::from(v.as_str()) }));
    }
    if let Some(v) = &a.max_token_age_days {
        set.push(("max_token_age_days", days("max-token-age-days", v)?));
    }
    if let Some(v) = a.suspend_unrotated {
        set.push(("suspend_unrotated", Value::from(v)));
    }
    if let Some(v) = &a.max_token_lifetime_days {
        set.push(("max_token_lifetime_days", days("max-token-lifetime-days", v)?));
    }
    if let Some(v) = a.plan_changes_need_approval {
        set.push(("plan_changes_need_approval", Value::from(v)));
    }
    if let Some(v) = a.api_publish_needs_approval {
        set.push(("api_publish_needs_approval", Value::from(v)));
    }
    if set.is_empty() {
        return Ok(None);
    }
    if let Value::Object(fields) = &mut have {
        for (k, v) in set {
            fields.insert(k.to_owned(), v);
        }
    }
    Ok(Some(have))
}

pub async fn run(args: ApiCommand<PolicyCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let answer = match &args.command {
        PolicyCommand::Settings(a) => {
            let have = client.send(Method::GET, "/admin/v1/policy/settings", None).await?;
            let answer = match changed(have.clone().unwrap_or_default(), a)? {
                Some(want) => client.send(Method::PUT, "/admin/v1/policy/settings", Some(want)).await?,
                None => have,
            };
            return Shown::rows(answer, SETTINGS).print(args.api.output);
        }
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
