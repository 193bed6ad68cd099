//! `keygate report usage`: the providers' report (`/admin/v1/reports/usage`).

use reqwest::Method;
use serde_json::{Value, json};

use super::Shown;
use crate::cli::{ApiCommand, ReportCommand};
use crate::client::{AdminClient, Query};

const COLUMNS: &[&str] = &["key", "requests", "ok", "client_errors", "server_errors", "p50_ms", "p95_ms", "p99_ms"];

pub async fn run(args: ApiCommand<ReportCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let ReportCommand::Usage { by, from, to, csv } = &args.command;
    let mut q = Query::default();
    q.push("by", by.as_str());
    q.push_opt("from", from.as_deref());
    q.push_opt("to", to.as_deref());
    if *csv {
        q.push("format", "csv");
        let (text, _) = client.get_text(&format!("/admin/v1/reports/usage{}", q.to_query_string())).await?;
        print!("{text}");
        return Ok(());
    }
    let answer = client.send(Method::GET, &format!("/admin/v1/reports/usage{}", q.to_query_string()), None).await?;
    // The table: one row per group, the totals last; JSON is the API's answer as it is.
    let shown = match args.api.output {
        crate::cli::Output::Json => answer,
        crate::cli::Output::Table => answer.map(|a| {
            let mut rows: Vec<Value> = a.get("groups").and_then(Value::as_array).cloned().unwrap_or_default();
            if let Some(t) = a.get("totals").filter(|t| !t.is_null()) {
                rows.push(t.clone());
            }
            json!({ "data": rows })
        }),
    };
    Shown::rows(shown, COLUMNS).print(args.api.output)
}
