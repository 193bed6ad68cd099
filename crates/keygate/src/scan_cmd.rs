//! `keygate scan`: runs the scanner, prints findings (never a whole secret), and with `--online`
//! asks the server which are live and has them marked exposed.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Value, json};

use crate::cli::{Output, ScanArgs};
use crate::client::AdminClient;
use crate::scan::{ScanOptions, scan};

pub async fn run(args: ScanArgs) -> anyhow::Result<ExitCode> {
    let mut prefixes = Vec::new();
    for p in &args.prefixes {
        let prefix = keygate_core::token_format::TokenPrefix::for_issuing(p)
            .map_err(|e| crate::UsageError(format!("--prefix: {}", e.message)))?;
        prefixes.push(prefix.as_str().to_owned());
        prefixes.push(prefix.root_key_prefix().as_str().to_owned());
    }
    prefixes.sort();
    prefixes.dedup();
    let paths = if args.paths.is_empty() { vec![std::path::PathBuf::from(".")] } else { args.paths.clone() };
    let opts = ScanOptions {
        paths,
        prefixes,
        git_history: !args.no_history && !args.staged,
        staged: args.staged,
        progress: !args.no_progress && std::io::stderr().is_terminal(),
    };
    let findings = tokio::task::spawn_blocking(move || scan(&opts)).await.context("the scan stopped")??;

    let mut verdicts: Vec<Option<String>> = vec![None; findings.len()];
    if args.online && !findings.is_empty() {
        let client = AdminClient::from_env(&args.url)?;
        for (chunk_no, chunk) in findings.chunks(100).enumerate() {
            let findings: Vec<Value> = chunk
                .iter()
                .map(|f| json!({"token": f.token.expose(), "location": format!("keygate scan: {}", f.location)}))
                .collect();
            let answer = client
                .call(reqwest::Method::POST, "/admin/v1/tokens/exposures", Some(json!({ "findings": findings })))
                .await?;
            let data = answer.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, d) in data.iter().enumerate() {
                if let Some(slot) = verdicts.get_mut(chunk_no * 100 + i) {
                    *slot = d.get("verdict").and_then(Value::as_str).map(str::to_owned);
                }
            }
        }
    }

    match args.output {
        Output::Json => {
            let items: Vec<Value> = findings
                .iter()
                .zip(&verdicts)
                .map(|(f, v)| json!({"location": f.location, "token": f.display, "verdict": v}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&json!({"findings": items}))?);
        }
        Output::Table => {
            for (f, v) in findings.iter().zip(&verdicts) {
                match v {
                    Some(v) => println!("{}: {} ({v})", f.location, f.display),
                    None => println!("{}: {}", f.location, f.display),
                }
            }
            eprintln!("{} token(s) confirmed by checksum", findings.len());
        }
    }
    Ok(if findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
