//! `keygate subscription …`: apps' subscriptions to APIs (`/admin/v1/apps/{id}/subscriptions`,
//! `/admin/v1/subscriptions`).

use reqwest::Method;
use serde_json::{Map, Value};

use super::{Shown, put_opt};
use crate::cli::{ApiCommand, SubscriptionCommand};
use crate::client::{AdminClient, Query, id_segment};

const COLUMNS: &[&str] = &["id", "app_id", "api_id", "version", "plan_id", "status", "reason", "created_at"];

pub async fn run(args: ApiCommand<SubscriptionCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let decide = |id: &str, action: &str| -> anyhow::Result<String> {
        Ok(format!("/admin/v1/subscriptions/{}/{action}", id_segment(id, "a subscription id (sub_…)")?))
    };
    let reason_body = |reason: &Option<String>| {
        let mut body = Map::new();
        put_opt(&mut body, "reason", reason.as_ref());
        Some(Value::Object(body))
    };
    let answer = match &args.command {
        SubscriptionCommand::Create { app, api, version, plan } => {
            let mut body = Map::new();
            body.insert("api".into(), Value::String(api.clone()));
            put_opt(&mut body, "version", version.as_ref());
            put_opt(&mut body, "plan_id", plan.as_ref());
            let path = format!("/admin/v1/apps/{}/subscriptions", id_segment(app, "an app id (app_…)")?);
            client.send(Method::POST, &path, Some(Value::Object(body))).await?
        }
        SubscriptionCommand::List { app, api, status } => {
            let mut q = Query::default();
            q.push_opt("app_id", app.as_deref());
            q.push_opt("api_id", api.as_deref());
            q.push_opt("status", status.as_deref());
            client.send(Method::GET, &format!("/admin/v1/subscriptions{}", q.to_query_string()), None).await?
        }
        SubscriptionCommand::Approve { id } => client.send(Method::POST, &decide(id, "approve")?, None).await?,
        SubscriptionCommand::Reject { id, reason } => {
            client.send(Method::POST, &decide(id, "reject")?, reason_body(reason)).await?
        }
        SubscriptionCommand::Cancel { id, reason } => {
            client.send(Method::POST, &decide(id, "cancel")?, reason_body(reason)).await?
        }
    };
    Shown::rows(answer, COLUMNS).print(args.api.output)
}
