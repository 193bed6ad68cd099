//! The gateway's route table as `keygate serve` keeps it: the config file's routes and the
//! routes stored through the admin API, compiled together and swapped whole when either changes
//! — when the file changes (or on SIGHUP), and when the change feed announces a route change
//! (from this node's admin API or another node's). A table that does not compile is never
//! swapped in: the old one keeps serving and the error is logged.
//!
//! Every route belongs to a workspace: the file names it (`workspace = "…"`, default the default
//! workspace), a stored route carries the workspace of the root key that made it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keygate_admin::routes::{FileRoute, RouteRules};
use keygate_core::model::{DEFAULT_WORKSPACE, StoredRoute};
use keygate_core::store::Store;
use keygate_gateway::config::{GatewayConfig, RouteConfig};
use keygate_gateway::gateway::{Gateway, Table};
use keygate_gateway::routes::{RouteSource, RouteSpec, RouteTable};
use serde_json::{Map, Value};
use tokio::task::JoinHandle;

/// How often the store's route position is read even without a change-feed wake-up.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// What the config file says about routes.
struct FileRoutes {
    routes: Vec<RouteConfig>,
    gateway: GatewayConfig,
}

/// The live route table's sources, and the gateway it feeds.
pub struct LiveRoutes {
    gw: Arc<Gateway>,
    store: Arc<dyn Store>,
    file: ArcSwap<FileRoutes>,
    /// The store's route position the table is current to; held while a table is built, so
    /// rebuilds take turns.
    applied: tokio::sync::Mutex<u64>,
    /// The workspace (by name) of each `[[oauth.trusted_issuers]]` entry, by issuer: read at start.
    issuer_workspaces: Vec<(String, String)>,
}

/// Reads stored route fields as the file's (they were checked the same way when stored).
fn parse_config(fields: &Map<String, Value>) -> Result<RouteConfig, String> {
    serde_json::from_value(Value::Object(fields.clone())).map_err(|e| e.to_string())
}

impl LiveRoutes {
    /// Builds the first table from the file's routes and the stored ones; an error (a file route
    /// that does not compile or names an unknown workspace) stops `keygate serve`.
    pub async fn start(
        gw: Arc<Gateway>,
        store: Arc<dyn Store>,
        routes: Vec<RouteConfig>,
        gateway: GatewayConfig,
        issuer_workspaces: Vec<(String, String)>,
    ) -> anyhow::Result<Arc<Self>> {
        let live = Arc::new(Self {
            gw,
            store,
            file: ArcSwap::from_pointee(FileRoutes { routes, gateway }),
            applied: tokio::sync::Mutex::new(0),
            issuer_workspaces,
        });
        live.rebuild().await.map_err(|e| anyhow::anyhow!("routes: {e}"))?;
        Ok(live)
    }

    /// The ids of the workspaces the file's routes name (`None`: the default workspace).
    async fn file_workspaces(&self, routes: &[RouteConfig]) -> Result<HashMap<String, Arc<str>>, String> {
        let mut ids = HashMap::new();
        for r in routes {
            let name = r.workspace.as_deref().unwrap_or(DEFAULT_WORKSPACE);
            if ids.contains_key(name) {
                continue;
            }
            let ws =
                self.store.workspace_by_name(name).await.map_err(|e| e.message.into_owned())?.ok_or_else(|| {
                    format!("route {:?}: workspace {name:?} does not exist; create it first, or fix the name", r.id)
                })?;
            ids.insert(name.to_owned(), Arc::from(ws.id.as_str()));
        }
        Ok(ids)
    }

    /// Compiles the file's routes with `stored`. A stored route whose id the file now uses is
    /// left out (the file wins; logged), so editing the file can never take the gateway down.
    fn compile(
        file: &FileRoutes,
        names: &HashMap<String, Arc<str>>,
        stored: &[StoredRoute],
    ) -> Result<RouteTable, String> {
        let mut parsed = Vec::with_capacity(stored.len());
        for s in stored {
            if file.routes.iter().any(|f| f.id == s.id) {
                tracing::error!(route = %s.id, "a route of the config file has the id of a route made through the admin API; the file's route serves, delete or rename the other");
                continue;
            }
            parsed.push((
                parse_config(&s.config).map_err(|e| format!("route {:?}: {e}", s.id))?,
                s.workspace_id.as_str(),
            ));
        }
        let specs: Vec<RouteSpec<'_>> = file
            .routes
            .iter()
            .map(|c| RouteSpec {
                config: c,
                workspace_id: names.get(c.workspace.as_deref().unwrap_or(DEFAULT_WORKSPACE)).map(|w| &**w),
                source: RouteSource::File,
            })
            .chain(parsed.iter().map(|(c, ws)| RouteSpec {
                config: c,
                workspace_id: Some(ws),
                source: RouteSource::Api,
            }))
            .collect();
        RouteTable::build_specs(&specs, &file.gateway)
    }

    /// Builds the table from the file's routes and the store's, and swaps it in.
    pub async fn rebuild(&self) -> Result<(), String> {
        let mut applied = self.applied.lock().await;
        let (pos, stored) = self.store.list_routes().await.map_err(|e| e.message.into_owned())?;
        let file = self.file.load_full();
        let names = self.file_workspaces(&file.routes).await?;
        let table = Self::compile(&file, &names, &stored)?;
        let n = table.routes.len();
        let next = Table::succeeding(table, &self.gw.table.load());
        // Upstream names new in this table are looked up before it serves (the others keep
        // what the old table knew).
        let now = keygate_gateway::resolve::monotonic_ms();
        keygate_gateway::resolve::refresh(
            next.routes.dns(),
            &self.gw.resolver,
            now,
            keygate_gateway::resolve::Which::New,
        )
        .await;
        self.gw.table.store(Arc::new(next));
        if *applied != pos || pos == 0 {
            tracing::info!(routes = n, stored = stored.len(), position = pos, "route table built");
        }
        *applied = pos;
        Ok(())
    }

    /// The config file changed: its routes replace the file's old ones if the whole table
    /// compiles; otherwise the old table keeps serving.
    pub async fn set_file(&self, routes: Vec<RouteConfig>, gateway: GatewayConfig) -> Result<(), String> {
        let previous = self.file.swap(Arc::new(FileRoutes { routes, gateway }));
        if let Err(e) = self.rebuild().await {
            self.file.store(previous);
            return Err(e);
        }
        Ok(())
    }

    /// Follows the change feed: rebuilds when the store's route position moves past the table's.
    pub fn spawn_follower(self: &Arc<Self>) -> JoinHandle<()> {
        let live = self.clone();
        let mut signal = live.store.subscribe();
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(POLL_EVERY);
            loop {
                tokio::select! {
                    open = signal.changed() => if !open { return },
                    _ = poll.tick() => {}
                }
                let pos = match live.store.routes_position().await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "routes: cannot read the store's route position; keeping the table");
                        continue;
                    }
                };
                if pos != *live.applied.lock().await
                    && let Err(e) = live.rebuild().await
                {
                    tracing::error!(error = %e, "routes: the new route table is refused; the old one keeps serving");
                }
            }
        })
    }
}

#[async_trait::async_trait]
impl RouteRules for LiveRoutes {
    fn file_routes(&self) -> Vec<FileRoute> {
        self.file
            .load()
            .routes
            .iter()
            .filter_map(|r| {
                let Ok(Value::Object(mut config)) = serde_json::to_value(r) else { return None };
                config.remove("workspace");
                Some(FileRoute { workspace: r.workspace.clone(), config })
            })
            .collect()
    }

    fn parse(&self, fields: Value) -> Result<Map<String, Value>, String> {
        let config: RouteConfig = serde_json::from_value(fields).map_err(|e| e.to_string())?;
        match serde_json::to_value(&config) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("the route cannot be written back as JSON".into()),
        }
    }

    fn check(&self, stored: &[StoredRoute]) -> Result<(), String> {
        let file = self.file.load();
        // Workspaces do not change whether a table compiles: any id will do here.
        let names: HashMap<String, Arc<str>> = file
            .routes
            .iter()
            .map(|r| (r.workspace.clone().unwrap_or_else(|| DEFAULT_WORKSPACE.into()), Arc::from("")))
            .collect();
        Self::compile(&file, &names, stored).map(drop)
    }

    async fn apply(&self) {
        if let Err(e) = self.rebuild().await {
            tracing::error!(error = %e, "routes: the new route table is refused; the old one keeps serving");
        }
    }

    fn config_uses_workspace(&self, name: &str) -> Option<String> {
        let file = self.file.load();
        let route = file.routes.iter().find(|r| r.workspace.as_deref().unwrap_or(DEFAULT_WORKSPACE) == name);
        if let Some(r) = route {
            return Some(format!("route {:?} of the config file", r.id));
        }
        let issuer = self.issuer_workspaces.iter().find(|(_, ws)| ws == name);
        issuer.map(|(iss, _)| format!("the oauth.trusted_issuers entry for {iss:?}"))
    }
}
