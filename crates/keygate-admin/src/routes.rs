//! Routes managed through the admin API (issue 13): kept in the store, applied by every node's
//! gateway without a restart (the change feed carries them), audited. The config file's routes
//! are shown beside them (`"source": "file"`) and cannot be changed here.
//!
//! The control plane does not compile routes itself: the gateway does, through [`RouteRules`],
//! which `keygate serve` provides. So a route is checked by exactly the code that will run it,
//! against the whole table it will join (the file's routes and every stored route).

use std::sync::Arc;

use keygate_core::ids::WorkspaceId;
use keygate_core::llm::StoredProvider;
use keygate_core::model::{Actor, NewAuditEvent, StoredRoute};
use keygate_core::{Error, Result};
use serde_json::{Map, Value};

use crate::service::Admin;

/// A route of the config file, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct FileRoute {
    /// The route's `workspace` (a name); `None`: the default workspace.
    pub workspace: Option<String>,
    /// Its fields, as `[[routes]]` has them.
    pub config: Map<String, Value>,
}

/// What the gateway knows about routes, for the control plane.
#[async_trait::async_trait]
pub trait RouteRules: Send + Sync {
    /// The config file's routes as they are now.
    fn file_routes(&self) -> Vec<FileRoute>;
    /// Reads the fields of one `[[routes]]` table (exactly those: an unknown field is an error),
    /// and returns them in their complete form (defaults filled in). The error says which field
    /// and why.
    fn parse(&self, fields: Value) -> std::result::Result<Map<String, Value>, String>;
    /// Whether the table made of the file's routes and `stored` (every stored route, as it would
    /// be after a change) compiles, each `ai` route's deployments naming providers it may call
    /// (the file's, or its workspace's among `providers`), and each stored route's `api` and
    /// `version` naming an API of its workspace among `apis` and one of its versions. The error
    /// names the route and what is wrong.
    fn check(
        &self,
        stored: &[StoredRoute],
        providers: &[StoredProvider],
        apis: &[keygate_core::apis::Api],
    ) -> std::result::Result<(), String>;
    /// As [`RouteRules::check`], for a change of the API `api` (among `apis` as it would be
    /// after it): every route naming that API that validates requests — the file's too — must
    /// still have a document that compiles.
    async fn check_api(
        &self,
        stored: &[StoredRoute],
        providers: &[StoredProvider],
        apis: &[keygate_core::apis::Api],
        api: &keygate_core::ids::ApiId,
    ) -> std::result::Result<(), String> {
        let _ = api;
        self.check(stored, providers, apis)
    }
    /// The config file's providers: their `[[providers]]` fields (the key's source named, never
    /// the key).
    fn file_providers(&self) -> Vec<Map<String, Value>>;
    /// Reads the fields of a provider made through the API (those of a `[[providers]]` table
    /// but the key's source), checks them as the gateway will use them, and returns them
    /// complete. The error says which field and why.
    fn parse_provider(&self, fields: Value) -> std::result::Result<Map<String, Value>, String>;
    /// Rebuilds this node's route table from the store now, so the next request sees the change
    /// (other nodes follow the change feed).
    async fn apply(&self);
    /// What in the configuration names the workspace called `name` (a route of the file, a
    /// trusted issuer), if anything: such a workspace cannot be renamed or deleted, or the next
    /// reload or start would fail on an unknown name.
    fn config_uses_workspace(&self, name: &str) -> Option<String>;
}

/// A route as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteEntry {
    pub id: String,
    /// The workspace's name.
    pub workspace: String,
    pub from_file: bool,
    pub config: Map<String, Value>,
    pub created_at: Option<keygate_core::Timestamp>,
    pub updated_at: Option<keygate_core::Timestamp>,
}

/// Fields a route's answer carries that are not route fields: accepted back (so an answer can be
/// edited and sent again) and ignored.
const READ_ONLY: [&str; 3] = ["source", "created_at", "updated_at"];

fn route_from_file(id: &str) -> Error {
    Error::conflict(
        "route_from_file",
        format!("route {id:?} is defined in the config file; change it there (the file is re-read when it changes)"),
    )
}

impl Admin {
    fn rules(&self) -> Result<&Arc<dyn RouteRules>> {
        self.route_rules.get().ok_or_else(|| {
            Error::new(
                keygate_core::ErrorKind::Unavailable,
                "routes_unavailable",
                "routes cannot be managed on this node: its gateway is not running",
            )
        })
    }

    /// Sets what compiles and applies routes (once).
    pub fn set_route_rules(&self, rules: Arc<dyn RouteRules>) {
        let _ = self.route_rules.set(rules);
    }

    async fn workspace_name(&self, ws: &WorkspaceId) -> Result<String> {
        Ok(self.store.workspace(ws).await?.ok_or_else(|| Error::not_found("workspace"))?.name)
    }

    /// The file's routes of workspace `ws` (named `ws_name`).
    fn file_routes_of(rules: &dyn RouteRules, ws_name: &str) -> Vec<RouteEntry> {
        rules
            .file_routes()
            .into_iter()
            .filter(|r| r.workspace.as_deref().unwrap_or(keygate_core::model::DEFAULT_WORKSPACE) == ws_name)
            .map(|r| RouteEntry {
                id: r.config.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                workspace: ws_name.to_owned(),
                from_file: true,
                config: r.config,
                created_at: None,
                updated_at: None,
            })
            .collect()
    }

    fn stored_entry(r: StoredRoute, ws_name: &str) -> RouteEntry {
        RouteEntry {
            id: r.id,
            workspace: ws_name.to_owned(),
            from_file: false,
            config: r.config,
            created_at: Some(r.created_at),
            updated_at: Some(r.updated_at),
        }
    }

    /// The workspace's routes: the file's, then the stored ones, each group by id.
    pub async fn list_routes(&self, ws: &WorkspaceId) -> Result<Vec<RouteEntry>> {
        let rules = self.rules()?;
        let name = self.workspace_name(ws).await?;
        let mut out = Self::file_routes_of(&**rules, &name);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        let (_, stored) = self.store.list_routes().await?;
        out.extend(stored.into_iter().filter(|r| &r.workspace_id == ws).map(|r| Self::stored_entry(r, &name)));
        Ok(out)
    }

    /// The routes a workspace's credentials can call: its own ([`Admin::list_routes`]), then the
    /// other workspaces' shared routes (file, then stored), which it may see but not change.
    pub async fn visible_routes(&self, ws: &WorkspaceId) -> Result<Vec<RouteEntry>> {
        let rules = self.rules()?;
        let mut out = self.list_routes(ws).await?;
        let own = self.workspace_name(ws).await?;
        let names: std::collections::HashMap<WorkspaceId, String> =
            self.store.list_workspaces().await?.into_iter().map(|w| (w.id, w.name)).collect();
        let shared = |config: &Map<String, Value>| config.get("shared").and_then(Value::as_bool) == Some(true);
        let mut file: Vec<RouteEntry> = rules
            .file_routes()
            .into_iter()
            .filter(|r| shared(&r.config))
            .filter_map(|r| {
                let name = r.workspace.unwrap_or_else(|| keygate_core::model::DEFAULT_WORKSPACE.to_owned());
                (name != own).then(|| RouteEntry {
                    id: r.config.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    workspace: name,
                    from_file: true,
                    config: r.config,
                    created_at: None,
                    updated_at: None,
                })
            })
            .collect();
        file.sort_by(|a, b| a.id.cmp(&b.id));
        out.extend(file);
        let (_, stored) = self.store.list_routes().await?;
        out.extend(stored.into_iter().filter(|r| &r.workspace_id != ws && shared(&r.config)).map(|r| {
            let name = names.get(&r.workspace_id).cloned().unwrap_or_default();
            Self::stored_entry(r, &name)
        }));
        Ok(out)
    }

    /// One of the workspace's routes.
    pub async fn route(&self, ws: &WorkspaceId, id: &str) -> Result<RouteEntry> {
        let rules = self.rules()?;
        let name = self.workspace_name(ws).await?;
        if let Some(r) = Self::file_routes_of(&**rules, &name).into_iter().find(|r| r.id == id) {
            return Ok(r);
        }
        match self.store.route(id).await? {
            Some(r) if &r.workspace_id == ws => Ok(Self::stored_entry(r, &name)),
            _ => Err(Error::not_found("route")),
        }
    }

    /// Reads a route's fields sent to the API: read-only fields dropped, `workspace` (if given)
    /// the caller's own, the rest as the file would be read.
    fn route_fields(rules: &dyn RouteRules, body: Value, ws_name: &str) -> Result<(String, Map<String, Value>)> {
        let Value::Object(mut fields) = body else {
            return Err(Error::invalid(
                "invalid_route",
                "a route is a JSON object with the fields of a [[routes]] table",
            ));
        };
        for k in READ_ONLY {
            fields.remove(k);
        }
        match fields.remove("workspace") {
            None | Some(Value::Null) => {}
            Some(Value::String(w)) if w == ws_name => {}
            Some(_) => {
                return Err(Error::invalid(
                    "route_workspace_mismatch",
                    format!(
                        "a route made through the API belongs to the root key's workspace ({ws_name:?}); leave workspace out or name that one"
                    ),
                ));
            }
        }
        let mut config = rules.parse(Value::Object(fields)).map_err(|m| Error::invalid("invalid_route", m))?;
        config.remove("workspace");
        let id = config.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
        Ok((id, config))
    }

    /// Checks the table the stored routes would make with `change` applied (`None` config:
    /// the route `id` removed).
    async fn check_with(&self, rules: &dyn RouteRules, id: &str, change: Option<&StoredRoute>) -> Result<()> {
        let (_, mut stored) = self.store.list_routes().await?;
        stored.retain(|r| r.id != id);
        stored.extend(change.cloned());
        let providers = self.store.list_providers().await?;
        let mut apis = self.store.all_apis().await?;
        // The documents of the APIs that routes validating requests need (lists leave them out).
        let keys = crate::apis::validating_keys(stored.iter().map(|r| &r.config));
        crate::apis::with_documents(&*self.store, &mut apis, &keys).await?;
        rules.check(&stored, &providers, &apis).map_err(|m| Error::invalid("invalid_route", m))
    }

    /// Adds a route to workspace `ws`; it serves on every node within the change feed's delay
    /// (on this one before this returns).
    pub async fn create_route(&self, ws: &WorkspaceId, actor: &Actor, body: Value) -> Result<RouteEntry> {
        let rules = self.rules()?.clone();
        let name = self.workspace_name(ws).await?;
        let (id, config) = Self::route_fields(&*rules, body, &name)?;
        if rules.file_routes().iter().any(|r| r.config.get("id").and_then(Value::as_str) == Some(id.as_str())) {
            return Err(Error::conflict(
                "route_exists",
                format!("a route with id {id:?} is defined in the config file; choose another id"),
            ));
        }
        if self.store.route(&id).await?.is_some() {
            return Err(Error::conflict(
                "route_exists",
                format!("a route with id {id:?} already exists; choose another id"),
            ));
        }
        let now = self.now();
        let route = StoredRoute { id: id.clone(), workspace_id: ws.clone(), config, created_at: now, updated_at: now };
        self.check_with(&*rules, &id, Some(&route)).await?;
        let audit =
            NewAuditEvent::new(ws, actor, "route.create", &id, now).with_after(Value::Object(route.config.clone()));
        self.store.insert_route(&route, &audit).await?;
        rules.apply().await;
        Ok(Self::stored_entry(route, &name))
    }

    /// Replaces an API-managed route's fields (`id` stays).
    pub async fn update_route(&self, ws: &WorkspaceId, actor: &Actor, id: &str, body: Value) -> Result<RouteEntry> {
        let rules = self.rules()?.clone();
        let name = self.workspace_name(ws).await?;
        let before = self.editable_route(&*rules, ws, &name, id).await?;
        let mut body = body;
        if let Value::Object(fields) = &mut body {
            match fields.get("id") {
                None => {
                    fields.insert("id".into(), Value::String(id.to_owned()));
                }
                Some(Value::String(given)) if given == id => {}
                Some(_) => {
                    return Err(Error::invalid(
                        "route_id_mismatch",
                        "a route's id cannot change: leave id out, or give the id of the path (create a new route for another id)",
                    ));
                }
            }
        }
        let (_, config) = Self::route_fields(&*rules, body, &name)?;
        let now = self.now();
        let route = StoredRoute { config, updated_at: now, ..before.clone() };
        self.check_with(&*rules, id, Some(&route)).await?;
        let audit = NewAuditEvent::new(ws, actor, "route.update", id, now)
            .with_diff(&Value::Object(before.config), &Value::Object(route.config.clone()));
        self.store.update_route(&route, &audit).await?;
        rules.apply().await;
        Ok(Self::stored_entry(route, &name))
    }

    /// Deletes an API-managed route.
    pub async fn delete_route(&self, ws: &WorkspaceId, actor: &Actor, id: &str) -> Result<()> {
        let rules = self.rules()?.clone();
        let name = self.workspace_name(ws).await?;
        let before = self.editable_route(&*rules, ws, &name, id).await?;
        let audit =
            NewAuditEvent::new(ws, actor, "route.delete", id, self.now()).with_before(Value::Object(before.config));
        if !self.store.delete_route(ws, id, &audit).await? {
            return Err(Error::not_found("route"));
        }
        rules.apply().await;
        Ok(())
    }

    /// The stored route `id` of `ws`; a file route's id is a conflict (it is changed in the file).
    async fn editable_route(
        &self,
        rules: &dyn RouteRules,
        ws: &WorkspaceId,
        ws_name: &str,
        id: &str,
    ) -> Result<StoredRoute> {
        if Self::file_routes_of(rules, ws_name).iter().any(|r| r.id == id) {
            return Err(route_from_file(id));
        }
        match self.store.route(id).await? {
            Some(r) if &r.workspace_id == ws => Ok(r),
            _ => Err(Error::not_found("route")),
        }
    }
}
