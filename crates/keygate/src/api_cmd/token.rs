//! `keygate token …`: create, list, show, update, suspend, resume, revoke, rotate and usage.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Layout, Shown, list, parse_object, parse_quota, parse_rate_limit, put_opt};
use crate::UsageError;
use crate::cli::{ApiCommand, TokenCommand, TokenPolicyArgs};
use crate::client::{AdminClient, Query, id_segment};

const COLUMNS: &[&str] = &["id", "name", "display", "status", "scopes", "expires_at", "last_used_at"];

fn policy_body(p: &TokenPolicyArgs, body: &mut Map<String, Value>, for_update: bool) -> anyhow::Result<()> {
    if !p.scopes.is_empty() || !for_update {
        body.insert("scopes".into(), json!(p.scopes));
    }
    put_opt(body, "expires_in", p.expires_in);
    put_opt(body, "expires_at", p.expires_at.as_ref());
    if !p.ip_allowlist.is_empty() {
        body.insert("ip_allowlist".into(), json!(p.ip_allowlist));
    }
    if let Some(r) = &p.rate_limit {
        body.insert("rate_limit".into(), parse_rate_limit(r)?);
    }
    if let Some(q) = &p.quota {
        body.insert("quota".into(), parse_quota(q)?);
    }
    if let Some(m) = &p.metadata {
        body.insert("metadata".into(), parse_object("--metadata", m)?);
    }
    if let Some(b) = &p.llm_budget {
        body.insert("llm_budget".into(), parse_llm_budget(b)?);
    }
    put_opt(body, "max_uses", p.max_uses);
    Ok(())
}

/// `20/month` (dollars a day or a month) as a token's `llm_budget`.
pub(super) fn parse_llm_budget(s: &str) -> anyhow::Result<Value> {
    let err = || UsageError(format!("--llm-budget must look like 20/month (dollars a day or a month), not {s:?}"));
    let (usd, period) = s.split_once('/').ok_or_else(err)?;
    let usd: f64 = usd.trim_start_matches('$').parse().map_err(|_| err())?;
    if !matches!(period, "day" | "month") || !usd.is_finite() || usd < 0.0 {
        return Err(err().into());
    }
    Ok(json!({"usd": usd, "period": period}))
}

fn path(id: &str) -> anyhow::Result<String> {
    Ok(format!("/admin/v1/tokens/{}", id_segment(id, "a token id (tok_…)")?))
}

pub async fn run(args: ApiCommand<TokenCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        TokenCommand::Create { name, app, policy } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            put_opt(&mut body, "app_id", app.as_ref());
            policy_body(policy, &mut body, false)?;
            let answer = client.send(Method::POST, "/admin/v1/tokens", Some(Value::Object(body))).await?;
            Shown::with_secret(answer, COLUMNS, "token")
        }
        TokenCommand::Review { csv } => {
            if *csv {
                let (text, _) = client.get_text("/admin/v1/access-review?format=csv").await?;
                print!("{text}");
                return Ok(());
            }
            let mut answer = client.send(Method::GET, "/admin/v1/access-review", None).await?;
            // One row per token: its view, with the review's own fields beside it.
            if let Some(rows) = answer.as_mut().and_then(|a| a.get_mut("data")).and_then(Value::as_array_mut) {
                for r in rows.iter_mut() {
                    let mut token = r.get("token").cloned().unwrap_or_default();
                    if let (Some(t), Some(obj)) = (token.as_object_mut(), r.as_object()) {
                        for k in ["app_name", "owner", "dormant"] {
                            t.insert(k.into(), obj.get(k).cloned().unwrap_or_default());
                        }
                    }
                    *r = token;
                }
            }
            Shown::rows(answer, &["id", "name", "app_name", "owner", "scopes", "status", "dormant", "last_used_at"])
        }
        TokenCommand::List { app, status, search, page } => {
            let mut q = Query::default();
            q.push_opt("app_id", app.as_deref());
            q.push_opt("status", status.as_deref());
            q.push_opt("q", search.as_deref());
            Shown::rows(list(&client, "/admin/v1/tokens", q, page).await?, COLUMNS)
        }
        TokenCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        TokenCommand::Update {
            id,
            name,
            policy,
            no_expiry,
            clear_ip_allowlist,
            clear_scopes,
            no_rate_limit,
            no_quota,
            no_llm_budget,
            no_max_uses,
        } => {
            let mut body = Map::new();
            put_opt(&mut body, "name", name.as_ref());
            policy_body(policy, &mut body, true)?;
            if *no_expiry {
                body.insert("expires_at".into(), Value::Null);
            }
            if *clear_ip_allowlist {
                body.insert("ip_allowlist".into(), json!([]));
            }
            if *clear_scopes {
                body.insert("scopes".into(), json!([]));
            }
            if *no_rate_limit {
                body.insert("rate_limit".into(), Value::Null);
            }
            if *no_quota {
                body.insert("quota".into(), Value::Null);
            }
            if *no_llm_budget {
                body.insert("llm_budget".into(), Value::Null);
            }
            if *no_max_uses {
                body.insert("max_uses".into(), Value::Null);
            }
            if body.is_empty() {
                return Err(UsageError(
                    "nothing to update: give at least one option, such as --name or --scope".into(),
                )
                .into());
            }
            Shown::rows(client.send(Method::PATCH, &path(id)?, Some(Value::Object(body))).await?, COLUMNS)
        }
        TokenCommand::Suspend { id } => {
            Shown::rows(client.send(Method::POST, &format!("{}/suspend", path(id)?), None).await?, COLUMNS)
        }
        TokenCommand::Resume { id } => {
            Shown::rows(client.send(Method::POST, &format!("{}/resume", path(id)?), None).await?, COLUMNS)
        }
        TokenCommand::Revoke { id, reason } => {
            let body = json!({ "reason": reason });
            Shown::rows(client.send(Method::POST, &format!("{}/revoke", path(id)?), Some(body)).await?, COLUMNS)
        }
        TokenCommand::Rotate { id, grace_period } => {
            let body = json!({ "grace_period_seconds": grace_period });
            let answer = client.send(Method::POST, &format!("{}/rotate", path(id)?), Some(body)).await?;
            Shown::with_secret(answer, COLUMNS, "token")
        }
        TokenCommand::Usage { id, from, to, granularity } => {
            let mut q = Query::default();
            q.push_opt("from", from.as_deref());
            q.push_opt("to", to.as_deref());
            q.push_opt("granularity", granularity.as_deref());
            let answer = client.send(Method::GET, &format!("{}/usage{}", path(id)?, q.to_query_string()), None).await?;
            Shown { answer, layout: Layout::Usage }
        }
    };
    shown.print(args.api.output)
}

#[cfg(test)]
mod llm_budget_tests {
    use super::*;

    #[test]
    fn an_llm_budget_is_dollars_a_day_or_a_month() {
        assert_eq!(parse_llm_budget("20/month").unwrap(), json!({"usd": 20.0, "period": "month"}));
        assert_eq!(parse_llm_budget("$0.5/day").unwrap(), json!({"usd": 0.5, "period": "day"}));
        for bad in ["20", "20/year", "x/day", "-1/day", "20/total"] {
            assert!(parse_llm_budget(bad).is_err(), "{bad}");
        }
    }
}
