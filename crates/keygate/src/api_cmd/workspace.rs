//! `keygate workspace …`: the instance's workspaces (tenants) through the admin API, with an
//! instance-level root key (one of the default workspace).

use reqwest::Method;
use serde_json::json;

use super::{Layout, Shown};
use crate::cli::{ApiCommand, WorkspaceCommand};
use crate::client::{AdminClient, ApiFailure, id_segment};

const COLUMNS: &[&str] = &["id", "name", "created_at"];
const DELETION_COLUMNS: &[&str] = &["tokens_revoked", "root_keys_revoked", "routes_deleted", "oauth_clients_deleted"];

fn path(id: &str) -> anyhow::Result<String> {
    Ok(format!("/admin/v1/workspaces/{}", id_segment(id, "a workspace id (ws_…)")?))
}

pub async fn run(args: ApiCommand<WorkspaceCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let instance_hint = "workspaces are managed with a root key of the default workspace: \
                         `keygate root-key create --workspace default`";
    let instance = |e| ApiFailure::hint(e, "instance_key_required", instance_hint);
    let shown = match &args.command {
        WorkspaceCommand::List => {
            Shown::rows(client.send(Method::GET, "/admin/v1/workspaces", None).await.map_err(instance)?, COLUMNS)
        }
        WorkspaceCommand::Show { id } => {
            Shown::rows(client.send(Method::GET, &path(id)?, None).await.map_err(instance)?, COLUMNS)
        }
        WorkspaceCommand::Create { name } => {
            let body = json!({ "name": name });
            Shown::rows(client.send(Method::POST, "/admin/v1/workspaces", Some(body)).await.map_err(instance)?, COLUMNS)
        }
        WorkspaceCommand::Rename { id, name } => {
            let body = json!({ "name": name });
            Shown::rows(client.send(Method::PATCH, &path(id)?, Some(body)).await.map_err(instance)?, COLUMNS)
        }
        WorkspaceCommand::Delete { id, revoke_tokens } => {
            // Without --revoke-tokens the API refuses a workspace that still holds tokens
            // (workspace_has_tokens): nothing is revoked unless the caller said so.
            let query = if *revoke_tokens { "?revoke_tokens=true" } else { "" };
            let answer = client.send(Method::DELETE, &format!("{}{query}", path(id)?), None).await.map_err(|e| {
                let hint = format!("`keygate workspace delete {id} --revoke-tokens` revokes them with the workspace");
                instance(ApiFailure::hint(e, "workspace_has_tokens", &hint))
            })?;
            Shown { answer, layout: Layout::Rows { columns: DELETION_COLUMNS, secret: None } }
        }
    };
    shown.print(args.api.output)
}
