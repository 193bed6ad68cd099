//! `keygate root-key create | list | revoke`: root keys managed on the store directly, as its
//! operator (actor `cli`). It has to be so for `create` (before the first key exists nothing can
//! authenticate to the API), and it is the way out when every key with `root_keys:write` leaked.

use keygate_admin::service::NewRootKey;
use keygate_core::Timestamp;
use keygate_core::ids::RootKeyId;
use keygate_core::model::{Actor, Permission, RootKey};
use keygate_core::store::{RootKeyStore, WorkspaceStore};
use serde_json::json;

use crate::UsageError;
use crate::cli::{Output, RootKeyCommand};
use crate::config::Config;
use crate::serve;

/// Runs one `root-key` command against the configured store.
pub async fn run(cmd: RootKeyCommand, cfg: &Config, pepper: Option<String>) -> anyhow::Result<()> {
    // Usage errors first, before the store is opened (exit code 2).
    let new = match &cmd {
        RootKeyCommand::Create { name, permissions, expires_in, expires_at, .. } => {
            let permissions = if permissions.is_empty() {
                Permission::ALL.to_vec()
            } else {
                Permission::parse_list(permissions).map_err(|e| UsageError(e.message.into_owned()))?
            };
            let expires_at = expires_at
                .as_deref()
                .map(|raw| {
                    Timestamp::parse_rfc3339(raw).ok_or_else(|| {
                        UsageError(format!(
                            "--expires-at {raw:?} is not an RFC 3339 date-time like 2030-01-31T00:00:00Z"
                        ))
                    })
                })
                .transpose()?;
            Some(NewRootKey { name: name.clone(), permissions, expires_in: *expires_in, expires_at })
        }
        _ => None,
    };
    let opened = serve::open(cfg, pepper).await?;
    let result = async {
        match cmd {
            RootKeyCommand::Create { workspace, output, .. } => {
                let new = new.unwrap_or_default();
                let (key, secret) = opened
                    .admin
                    .create_root_key_with(&workspace, new, &Actor::cli())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                match output {
                    Output::Json => {
                        println!("{}", json!({"id": key.id, "key": secret.expose(), "expires_at": key.expires_at}))
                    }
                    Output::Table => {
                        println!("id:          {}", key.id);
                        println!("workspace:   {workspace}");
                        println!("permissions: {}", permissions_text(&key));
                        println!(
                            "expires:     {}",
                            key.expires_at.map_or_else(|| "never".to_owned(), |t| t.to_rfc3339())
                        );
                        println!("key:         {}", secret.expose());
                        println!();
                        println!("Store this key now: it is shown only once. Use it as `Authorization: Bearer <key>`");
                        println!("or `export KEYGATE_ADMIN_KEY=<key>` for `keygate token`.");
                    }
                }
            }
            RootKeyCommand::List { workspace, output, .. } => {
                let keys = match &workspace {
                    Some(name) => {
                        let ws = opened
                            .store
                            .workspace_by_name(name)
                            .await
                            .map_err(|e| anyhow::anyhow!("{e}"))?
                            .ok_or_else(|| UsageError(format!("no workspace is named {name:?}")))?;
                        opened.store.list_root_keys(&ws.id).await
                    }
                    None => opened.store.all_root_keys().await,
                }
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                let now = opened.admin.now();
                let mut rows = Vec::with_capacity(keys.len());
                for k in &keys {
                    let ws = opened.store.workspace(&k.workspace_id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    rows.push((k, ws.map_or_else(|| k.workspace_id.to_string(), |w| w.name)));
                }
                print_list(&rows, now, opened.admin.root_prefix().as_str(), output);
            }
            RootKeyCommand::Revoke { id, output, .. } => {
                let key = find(&opened.store.all_root_keys().await.map_err(|e| anyhow::anyhow!("{e}"))?, &id)?;
                let revoked = opened
                    .admin
                    .revoke_root_key(&key.workspace_id, &Actor::cli(), None, &key.id)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let at = revoked.revoked_at.map(Timestamp::to_rfc3339).unwrap_or_default();
                match output {
                    Output::Json => println!("{}", json!({"id": revoked.id, "status": "revoked", "revoked_at": at})),
                    Output::Table => println!("{} revoked at {at}; it is refused from its next request on", revoked.id),
                }
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    opened.store.close().await;
    result
}

/// The key with this id, in whichever workspace.
fn find(keys: &[RootKey], raw: &str) -> anyhow::Result<RootKey> {
    let id = RootKeyId::parse(raw.trim())
        .ok_or_else(|| UsageError(format!("{raw:?} is not a root key id (rk_…); see `keygate root-key list`")))?;
    keys.iter()
        .find(|k| k.id == id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("root_key_not_found: no root key {id}; see `keygate root-key list`"))
}

fn permissions_text(k: &RootKey) -> String {
    k.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
}

fn print_list(rows: &[(&RootKey, String)], now: Timestamp, prefix: &str, output: Output) {
    let when = |t: Option<Timestamp>| t.map(Timestamp::to_rfc3339);
    match output {
        Output::Json => {
            let list: Vec<_> = rows
                .iter()
                .map(|(k, ws)| {
                    json!({
                        "id": k.id, "name": k.name, "workspace": ws, "display": k.display(prefix),
                        "status": k.status(now).as_str(),
                        "permissions": k.permissions.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                        "created_at": k.created_at.to_rfc3339(), "expires_at": when(k.expires_at),
                        "revoked_at": when(k.revoked_at), "last_used_at": when(k.last_used_at),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Output::Table => {
            println!(
                "{:<20} {:<20} {:<12} {:<8} {:<20} {:<20} {:<20} PERMISSIONS",
                "ID", "NAME", "WORKSPACE", "STATUS", "CREATED", "EXPIRES", "LAST USED"
            );
            let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
            let date = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| cut(&t.to_rfc3339(), 19));
            for (k, ws) in rows {
                println!(
                    "{:<20} {:<20} {:<12} {:<8} {:<20} {:<20} {:<20} {}",
                    k.id.as_str(),
                    cut(&k.name, 20),
                    cut(ws, 12),
                    k.status(now).as_str(),
                    date(Some(k.created_at)),
                    date(k.expires_at),
                    date(k.last_used_at),
                    permissions_text(k)
                );
            }
        }
    }
}
