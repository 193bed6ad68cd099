//! `keygate app …`: create, list, show, update and delete apps.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::{Layout, Shown, list, parse_object, put_opt};
use crate::UsageError;
use crate::cli::{ApiCommand, AppCommand};
use crate::client::{AdminClient, ApiFailure, Query, id_segment};

const COLUMNS: &[&str] = &["id", "name", "plan_id", "is_default", "description", "created_at"];

fn path(id: &str) -> anyhow::Result<String> {
    Ok(format!("/admin/v1/apps/{}", id_segment(id, "an app id (app_…)")?))
}

pub async fn run(args: ApiCommand<AppCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        AppCommand::Create { name, description, plan, metadata } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            put_opt(&mut body, "description", description.as_ref());
            put_opt(&mut body, "plan_id", plan.as_ref());
            if let Some(m) = metadata {
                body.insert("metadata".into(), parse_object("--metadata", m)?);
            }
            Shown::rows(client.send(Method::POST, "/admin/v1/apps", Some(Value::Object(body))).await?, COLUMNS)
        }
        AppCommand::List { page } => {
            Shown::rows(list(&client, "/admin/v1/apps", Query::default(), page).await?, COLUMNS)
        }
        AppCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        AppCommand::Update { id, name, description, no_description, plan, no_plan, metadata } => {
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
            if body.is_empty() {
                return Err(
                    UsageError("nothing to update: give at least one option, such as --name or --plan".into()).into()
                );
            }
            Shown::rows(client.send(Method::PATCH, &path(id)?, Some(Value::Object(body))).await?, COLUMNS)
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
