//! Workspaces as the instance's operator manages them (issue 13): listed, created, renamed and
//! deleted through the admin API with a root key of the default workspace (the instance's own),
//! and in the dashboard by the instance owner. Deleting a workspace that still holds tokens
//! needs `revoke_tokens` and revokes them, with everything else that could authenticate.

use keygate_core::ids::WorkspaceId;
use keygate_core::model::{Actor, DEFAULT_WORKSPACE, NewAuditEvent, RootKey, Workspace};
use keygate_core::store::WorkspaceDeletion;
use keygate_core::{Error, Result};
use serde_json::json;

use crate::service::{Admin, validate_name};

fn default_workspace_fixed() -> Error {
    Error::conflict("default_workspace", "the default workspace is the instance's own: it cannot be renamed or deleted")
}

impl Admin {
    /// Whether `key` is one of the instance's (a root key of the default workspace), which alone
    /// may manage workspaces. Others get `forbidden` (`instance_key_required`).
    pub async fn require_instance_key(&self, key: &RootKey) -> Result<Workspace> {
        let default = self.bootstrap().await?;
        if key.workspace_id != default.id {
            return Err(Error::new(
                keygate_core::ErrorKind::Forbidden,
                "instance_key_required",
                "workspaces are managed with a root key of the default workspace (the instance's own)",
            ));
        }
        Ok(default)
    }

    pub async fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        self.store.list_workspaces().await
    }

    pub async fn workspace(&self, id: &WorkspaceId) -> Result<Workspace> {
        self.store.workspace(id).await?.ok_or_else(|| Error::not_found("workspace"))
    }

    /// Creates a workspace (with its default app); `conflict` if the name is taken.
    pub async fn create_workspace(&self, actor: &Actor, name: &str) -> Result<Workspace> {
        let name = validate_name(name, "name")?;
        if self.store.workspace_by_name(&name).await?.is_some() {
            return Err(Error::conflict("workspace_exists", format!("a workspace is already named {name:?}")));
        }
        let ws = self.ensure_workspace(&name).await?;
        let default = self.bootstrap().await?;
        let ev = NewAuditEvent::new(&default.id, actor, "workspace.create", ws.id.as_str(), self.now())
            .with_after(json!({"name": ws.name}));
        self.store.append_audit(&ev).await?;
        Ok(ws)
    }

    /// A workspace the configuration names by name stays as it is until the configuration no
    /// longer does: otherwise the next reload or start would stop on an unknown workspace.
    fn refuse_if_configured(&self, name: &str, what: &str) -> Result<()> {
        let used = self.route_rules.get().and_then(|rules| rules.config_uses_workspace(name));
        match used {
            Some(user) => Err(Error::conflict(
                "workspace_in_config",
                format!("{user} names workspace {name:?}, so it cannot be {what}; change the configuration file first"),
            )),
            None => Ok(()),
        }
    }

    pub async fn rename_workspace(&self, actor: &Actor, id: &WorkspaceId, name: &str) -> Result<Workspace> {
        let before = self.workspace(id).await?;
        if before.name == DEFAULT_WORKSPACE {
            return Err(default_workspace_fixed());
        }
        let name = validate_name(name, "name")?;
        self.refuse_if_configured(&before.name, "renamed")?;
        let default = self.bootstrap().await?;
        let ev = NewAuditEvent::new(&default.id, actor, "workspace.rename", id.as_str(), self.now())
            .with_before(json!({"name": before.name}))
            .with_after(json!({"name": name}));
        self.store.rename_workspace(id, &name, &ev).await?;
        Ok(Workspace { name, ..before })
    }

    /// Deletes a workspace: refused while tokens remain unless `revoke_tokens`; then revokes them,
    /// its root keys and OAuth tokens, deletes its routes and memberships, in one transaction.
    /// The event is in the workspace's own trail (with each token's revocation) and the instance's.
    pub async fn delete_workspace(
        &self,
        actor: &Actor,
        id: &WorkspaceId,
        revoke_tokens: bool,
    ) -> Result<WorkspaceDeletion> {
        let ws = self.workspace(id).await?;
        if ws.name == DEFAULT_WORKSPACE {
            return Err(default_workspace_fixed());
        }
        self.refuse_if_configured(&ws.name, "deleted")?;
        let now = self.now();
        let ev =
            NewAuditEvent::new(id, actor, "workspace.delete", id.as_str(), now).with_before(json!({"name": ws.name}));
        let done = self.store.delete_workspace(id, now, revoke_tokens, &ev).await?;
        let default = self.bootstrap().await?;
        let instance = NewAuditEvent::new(&default.id, actor, "workspace.delete", id.as_str(), now)
            .with_before(json!({"name": ws.name}))
            .with_after(serde_json::to_value(done).unwrap_or_default());
        self.store.append_audit(&instance).await?;
        // The local gateway drops the tokens and routes before this answers.
        self.changed().await;
        if let Some(rules) = self.route_rules.get() {
            rules.apply().await;
        }
        Ok(done)
    }
}
