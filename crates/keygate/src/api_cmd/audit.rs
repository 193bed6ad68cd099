//! `keygate audit`: the workspace's audit trail, with the API's filters (`list`), and its hash
//! chain (`head`, `verify`).

use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use super::{Shown, list};
use crate::cli::{ApiCommand, AuditCommand, Output};
use crate::client::{AdminClient, Query};

const COLUMNS: &[&str] = &["id", "at", "actor", "action", "target", "source"];

pub async fn run(args: ApiCommand<AuditCommand>) -> anyhow::Result<ExitCode> {
    let client = AdminClient::from_env(&args.api.url)?;
    match &args.command {
        AuditCommand::List { filter, page } => {
            let q = filter.query();
            Shown::rows(list(&client, "/admin/v1/audit-events", q, page).await?, COLUMNS).print(args.api.output)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { format, filter } => {
            use std::io::Write as _;
            let mut q = filter.query();
            q.push("format", format.clone());
            let mut path = format!("/admin/v1/audit-events/export{}", q.to_query_string());
            let mut out = std::io::stdout().lock();
            let mut first = true;
            loop {
                let (text, next) = client.get_text(&path).await?;
                // Each answer of a CSV export starts with the header line: keep the first only.
                let body = if format == "csv" && !first {
                    text.split_once("\r\n").map_or("", |(_, rest)| rest)
                } else {
                    &text
                };
                out.write_all(body.as_bytes())?;
                first = false;
                match next {
                    Some(n) => path = n,
                    None => break,
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Head => {
            let head = client.send(reqwest::Method::GET, "/admin/v1/audit-chain", None).await?;
            println!("{}", serde_json::to_string_pretty(&head.unwrap_or(Value::Null))?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { checkpoint, workspace, .. } => {
            if workspace.is_some() {
                return Err(crate::UsageError(
                    "--workspace goes with --data-dir or --database-url; through the API the key's workspace is checked"
                        .into(),
                )
                .into());
            }
            let mut q = Query::default();
            if let Some(path) = checkpoint {
                let (_, c) = read_checkpoint(path)?;
                q.push("checkpoint", format!("{}:{}", c.seq, keygate_core::audit_chain::to_hex(&c.link)));
            }
            let path = format!("/admin/v1/audit-chain/verify{}", q.to_query_string());
            let report = client.send(reqwest::Method::GET, &path, None).await?.unwrap_or_default();
            let intact = report["intact"].as_bool().unwrap_or(false);
            match args.api.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print_report(&report),
            }
            Ok(if intact { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// `keygate audit verify --data-dir DIR | --database-url URL`: every workspace's chain (or the
/// one named), read from the store directly with the pepper `keygate serve` would use. Exit 1 if
/// one is broken.
pub async fn verify_on_store(
    cfg: &crate::config::Config,
    pepper: Option<String>,
    workspace: Option<&str>,
    checkpoint: Option<&std::path::Path>,
    output: Output,
) -> anyhow::Result<ExitCode> {
    use keygate_core::store::WorkspaceStore as _;
    let checkpoint = match checkpoint {
        None => None,
        Some(path) => Some(read_checkpoint(path)?),
    };
    let opened = crate::serve::open(cfg, pepper).await?;
    let result = async {
        let workspaces = match workspace {
            Some(name) => vec![
                opened
                    .store
                    .workspace_by_name(name)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .ok_or_else(|| crate::UsageError(format!("no workspace is named {name:?}")))?,
            ],
            None => opened.store.list_workspaces().await.map_err(|e| anyhow::anyhow!("{e}"))?,
        };
        let mut all_intact = true;
        let mut reports = Vec::new();
        for ws in &workspaces {
            // A checkpoint names its workspace: it is compared with that one only.
            let cp = checkpoint.as_ref().filter(|(id, _)| id.as_deref().is_none_or(|id| id == ws.id.as_str()));
            let report = opened
                .admin
                .verify_audit_chain(&ws.id, cp.map(|(_, c)| *c))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            all_intact &= report.intact;
            let mut v = serde_json::to_value(&report)?;
            v["workspace"] = Value::from(ws.name.clone());
            reports.push(v);
        }
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
            Output::Table => {
                for r in &reports {
                    print!("{}: ", r["workspace"].as_str().unwrap_or(""));
                    print_report(r);
                }
            }
        }
        Ok::<bool, anyhow::Error>(all_intact)
    }
    .await;
    opened.store.close().await;
    Ok(if result? { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A head saved by `keygate audit head`: its workspace id and its position and link.
fn read_checkpoint(path: &std::path::Path) -> anyhow::Result<(Option<String>, keygate_core::audit_chain::Checkpoint)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the checkpoint {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the JSON `keygate audit head` prints", path.display()))?;
    let seq = v["seq"].as_u64();
    let link = v["link"].as_str().and_then(keygate_core::audit_chain::from_hex);
    let (Some(seq), Some(link)) = (seq, link) else {
        return Err(crate::UsageError(format!(
            "{} has no seq and link (64 hex digits) as `keygate audit head` prints them",
            path.display()
        ))
        .into());
    };
    Ok((v["workspace_id"].as_str().map(str::to_owned), keygate_core::audit_chain::Checkpoint { seq, link }))
}

fn print_report(r: &Value) {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if r["intact"].as_bool() == Some(true) {
        let from = if n("from_seq") > 0 {
            format!(" (from #{}, the events before deleted by retention)", n("from_seq") + 1)
        } else {
            String::new()
        };
        println!(
            "audit chain intact: {} events checked{from}, head #{} {}",
            n("checked"),
            n("head_seq"),
            r["head_link"].as_str().unwrap_or("")
        );
        match r["checkpoint"].as_str() {
            Some("matched") => println!("checkpoint: found in the chain"),
            Some("pruned") => println!("checkpoint: older than the events kept (retention); not comparable"),
            _ => {}
        }
    } else {
        let b = &r["broken"];
        println!(
            "audit chain BROKEN at #{}: {} ({})",
            b["seq"].as_u64().unwrap_or(0),
            b["message"].as_str().unwrap_or(""),
            b["code"].as_str().unwrap_or("")
        );
        if let Some(id) = b["event_id"].as_i64() {
            println!("first broken link: event {id}");
        }
        println!("{} events before it verified", n("checked"));
    }
}
