//! `keygate app …`: create, list, show, update and delete apps.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Layout, Shown, list, parse_object, parse_quota, parse_rate_limit, put_opt};
use crate::UsageError;
use crate::cli::{ApiCommand, AppCommand, AppLimitArgs};
use crate::client::{AdminClient, ApiFailure, Query, id_segment};

const COLUMNS: &[&str] = &["id", "name", "plan_id", "rate_limit", "quota", "is_default", "description", "created_at"];

fn limits_body(l: &AppLimitArgs, body: &mut Map<String, Value>) -> anyhow::Result<()> {
    if let Some(r) = &l.rate_limit {
        body.insert("rate_limit".into(), parse_rate_limit(r)?);
    }
    if let Some(q) = &l.quota {
        body.insert("quota".into(), parse_quota(q)?);
    }
    if let Some(b) = &l.llm_budget {
        body.insert("llm_budget".into(), super::token::parse_llm_budget(b)?);
    }
    Ok(())
}

/// Says on standard error which limits a move to another plan lowered (`adjusted`).
pub(crate) fn report_adjusted(answer: &Option<Value>) {
    for a in answer.as_ref().and_then(|v| v.get("adjusted")).and_then(Value::as_array).into_iter().flatten() {
        let field = |k: &str| a.get(k).map(ToString::to_string).unwrap_or_default();
        eprintln!(
            "lowered to the plan's ceiling: {} {}: {} -> {}",
            a.get("target").and_then(Value::as_str).unwrap_or_default(),
            a.get("field").and_then(Value::as_str).unwrap_or_default(),
            field("before"),
            field("after")
        );
    }
}

fn path(id: &str) -> anyhow::Result<String> {
    Ok(format!("/admin/v1/apps/{}", id_segment(id, "an app id (app_…)")?))
}

pub async fn run(args: ApiCommand<AppCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        AppCommand::Create { name, description, plan, metadata, limits } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            put_opt(&mut body, "description", description.as_ref());
            put_opt(&mut body, "plan_id", plan.as_ref());
            if let Some(m) = metadata {
                body.insert("metadata".into(), parse_object("--metadata", m)?);
            }
            limits_body(limits, &mut body)?;
            Shown::rows(client.send(Method::POST, "/admin/v1/apps", Some(Value::Object(body))).await?, COLUMNS)
        }
        AppCommand::Statement { id, period, csv } => {
            let mut q = Query::default();
            q.push_opt("period", period.as_deref());
            if *csv {
                q.push("format", "csv");
                let (text, _) = client.get_text(&format!("{}/statement{}", path(id)?, q.to_query_string())).await?;
                print!("{text}");
                return Ok(());
            }
            let answer =
                client.send(Method::GET, &format!("{}/statement{}", path(id)?, q.to_query_string()), None).await?;
            Shown::rows(answer, &["app_id", "period", "closed", "requests", "billable_requests", "total", "currency"])
        }
        AppCommand::List { page } => {
            Shown::rows(list(&client, "/admin/v1/apps", Query::default(), page).await?, COLUMNS)
        }
        AppCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        AppCommand::Update {
            id,
            name,
            description,
            no_description,
            plan,
            no_plan,
            metadata,
            limits,
            no_rate_limit,
            no_quota,
            no_llm_budget,
        } => {
            let mut body = Map::new();
            put_opt(&mut body, "name", name.as_ref());
            put_opt(&mut body, "description", description.as_ref());
            if *no_description {
                body.insert("description".into(), Value::Null);
            }
            put_opt(&mut body, "plan_id", plan.as_ref());
            if *no_plan {
                body.insert("plan_id".into(), Value::Null);
            }
            if let Some(m) = metadata {
                body.insert("metadata".into(), parse_object("--metadata", m)?);
            }
            limits_body(limits, &mut body)?;
            if *no_rate_limit {
                body.insert("rate_limit".into(), Value::Null);
            }
            if *no_quota {
                body.insert("quota".into(), Value::Null);
            }
            if *no_llm_budget {
                body.insert("llm_budget".into(), Value::Null);
            }
            if body.is_empty() {
                return Err(
                    UsageError("nothing to update: give at least one option, such as --name or --plan".into()).into()
                );
            }
            let answer = client.send(Method::PATCH, &path(id)?, Some(Value::Object(body))).await?;
            report_adjusted(&answer);
            Shown::rows(answer, COLUMNS)
        }
        AppCommand::Delete { id, revoke_tokens } => {
            // Without --revoke-tokens the API refuses an app that still holds tokens
            // (app_has_tokens): nothing is revoked unless the caller said so.
            let query = if *revoke_tokens { "?revoke_tokens=true" } else { "" };
            let answer = client.send(Method::DELETE, &format!("{}{query}", path(id)?), None).await.map_err(|e| {
                let hint = format!("`keygate app delete {id} --revoke-tokens` revokes and removes them with the app");
                ApiFailure::hint(e, "app_has_tokens", &hint)
            })?;
            let sentence = if *revoke_tokens {
                format!("deleted {id}; its tokens were revoked and removed")
            } else {
                format!("deleted {id}")
            };
            Shown { answer, layout: Layout::Done(sentence) }
        }
    };
    shown.print(args.api.output)
}
