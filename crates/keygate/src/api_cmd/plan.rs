//! `keygate plan …` and `keygate scope …`: plans and the scope catalog.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Layout, Shown, parse_quota, parse_rate_limit, put_opt};
use crate::UsageError;
use crate::cli::{ApiCommand, PlanCommand, ScopeCommand};
use crate::client::{AdminClient, id_segment, urlencode};

const PLAN_COLUMNS: &[&str] = &["id", "name", "scopes", "rate_limit", "quota", "description"];
const SCOPE_COLUMNS: &[&str] = &["scope", "api", "description", "created_at"];

pub async fn run_plan(args: ApiCommand<PlanCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let answer = match &args.command {
        PlanCommand::Create { name, description, scopes, rate_limit, quota } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            put_opt(&mut body, "description", description.as_ref());
            body.insert("scopes".into(), json!(scopes));
            if let Some(r) = rate_limit {
                body.insert("rate_limit".into(), parse_rate_limit(r)?);
            }
            if let Some(q) = quota {
                body.insert("quota".into(), parse_quota(q)?);
            }
            client.send(Method::POST, "/admin/v1/plans", Some(Value::Object(body))).await?
        }
        PlanCommand::List => client.send(Method::GET, "/admin/v1/plans", None).await?,
        PlanCommand::Update {
            id,
            name,
            description,
            no_description,
            scopes,
            clear_scopes,
            rate_limit,
            no_rate_limit,
            quota,
            no_quota,
        } => {
            let mut body = Map::new();
            put_opt(&mut body, "name", name.as_ref());
            put_opt(&mut body, "description", description.as_ref());
            if *no_description {
                body.insert("description".into(), Value::Null);
            }
            if !scopes.is_empty() || *clear_scopes {
                body.insert("scopes".into(), json!(scopes));
            }
            if let Some(r) = rate_limit {
                body.insert("rate_limit".into(), parse_rate_limit(r)?);
            }
            if *no_rate_limit {
                body.insert("rate_limit".into(), Value::Null);
            }
            if let Some(q) = quota {
                body.insert("quota".into(), parse_quota(q)?);
            }
            if *no_quota {
                body.insert("quota".into(), Value::Null);
            }
            if body.is_empty() {
                return Err(UsageError("nothing to update: give at least one option, such as --scope".into()).into());
            }
            let path = format!("/admin/v1/plans/{}", id_segment(id, "a plan id (plan_…)")?);
            let answer = client.send(Method::PATCH, &path, Some(Value::Object(body))).await?;
            super::app::report_adjusted(&answer);
            answer
        }
    };
    Shown::rows(answer, PLAN_COLUMNS).print(args.api.output)
}

pub async fn run_scope(args: ApiCommand<ScopeCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    // A scope is a path segment: encoded, so that no scope can reach another path.
    let path = |scope: &str| format!("/admin/v1/scopes/{}", urlencode(scope));
    let shown = match &args.command {
        ScopeCommand::List => Shown::rows(client.send(Method::GET, "/admin/v1/scopes", None).await?, SCOPE_COLUMNS),
        ScopeCommand::Put { scope, description, api } => {
            let body = json!({ "description": description, "api": api });
            Shown::rows(client.send(Method::PUT, &path(scope), Some(body)).await?, SCOPE_COLUMNS)
        }
        ScopeCommand::Delete { scope } => {
            let answer = client.send(Method::DELETE, &path(scope), None).await?;
            Shown { answer, layout: Layout::Done(format!("removed {scope} from the scope catalog")) }
        }
    };
    shown.print(args.api.output)
}
