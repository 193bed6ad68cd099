//! The gateway's route table as `keygate serve` keeps it: the config file's routes and the
//! routes stored through the admin API, compiled together and swapped whole when either changes
//! — when the file changes (or on SIGHUP), and when the change feed announces a route change
//! (from this node's admin API or another node's). A table that does not compile is never
//! swapped in: the old one keeps serving and the error is logged.
//!
//! The table also carries the apps' shared limits and each workspace's denylist (merged into its
//! routes' `deny`): a change to either is recorded on the feed like a route's (`app:<id>`,
//! `policy:<workspace>`), so every node rebuilds with it.
//!
//! Every route belongs to a workspace: the file names it (`workspace = "…"`, default the default
//! workspace), a stored route carries the workspace of the root key that made it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keygate_admin::routes::{FileRoute, RouteRules};
use keygate_admin::service::Admin;
use keygate_core::apis::{Api, Lifecycle};
use keygate_core::llm::StoredProvider;
use keygate_core::model::{DEFAULT_WORKSPACE, StoredRoute};
use keygate_core::store::Store;
use keygate_core::subscriptions::SubscriptionGrant;
use keygate_gateway::ai::{Deployment, Provider};
use keygate_gateway::config::{GatewayConfig, ProviderConfig, RouteConfig};
use keygate_gateway::gateway::AppLimit;
use keygate_gateway::gateway::{Gateway, Table};
use keygate_gateway::routes::{RouteLifecycle, RouteSource, RouteSpec, RouteTable, Subscribers};
use keygate_gateway::validate::{RouteValidation, Validator};
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
    /// The providers of the config file (read at start).
    file_providers: Vec<ProviderConfig>,
    /// `[ai] allow_private_providers`.
    allow_private_providers: bool,
    /// Opens the stored providers' keys.
    admin: Arc<Admin>,
}

/// What `keygate serve` knows about providers when it starts.
pub struct ProviderSettings {
    pub file: Vec<ProviderConfig>,
    pub allow_private: bool,
    pub admin: Arc<Admin>,
}

/// Checks that every `ai` route among `specs` names, in each deployment, a provider it may call:
/// one of the file's (`file`), or one of its workspace's among `stored`.
fn check_deployments(
    specs: &[RouteSpec<'_>],
    file: &[ProviderConfig],
    stored: &[StoredProvider],
) -> Result<(), String> {
    for spec in specs {
        let Some(ai) = &spec.config.ai else { continue };
        for (alias, deployments) in &ai.models {
            for d in deployments {
                let Ok(parsed) = Deployment::parse(d) else { continue };
                let p = &*parsed.provider;
                let ok = file.iter().any(|f| f.id == p)
                    || stored.iter().any(|s| s.id == p && Some(s.workspace_id.as_str()) == spec.workspace_id);
                if !ok {
                    return Err(format!(
                        "route {:?}: ai.models.{alias}: {d:?} names the provider {p:?}, which is neither in the \
                         config file's [[providers]] nor one of this workspace's providers (POST /admin/v1/providers)",
                        spec.config.id
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The API of workspace `ws` that a route's `api` names: by its id, else by its name.
pub fn find_api<'a>(apis: &'a [Api], ws: Option<&str>, key: &str) -> Option<&'a Api> {
    let own = || apis.iter().filter(move |a| Some(a.workspace_id.as_str()) == ws);
    own().find(|a| a.id.as_str() == key).or_else(|| own().find(|a| a.name == key))
}

/// The lifecycle a route follows: `None` for a route of no API; an error naming what is missing
/// when its workspace has no such API, or the API no such version.
fn route_lifecycle(
    c: &RouteConfig,
    ws: Option<&str>,
    apis: &[Api],
    grants: &[SubscriptionGrant],
) -> Result<Option<RouteLifecycle>, String> {
    let Some(key) = &c.api else { return Ok(None) };
    let api = find_api(apis, ws, key).ok_or_else(|| {
        format!(
            "route {:?}: api {key:?} is not an API of the route's workspace; create it first (POST /admin/v1/apis)",
            c.id
        )
    })?;
    let version = match &c.version {
        None => None,
        Some(v) => Some(api.version(v).ok_or_else(|| {
            format!("route {:?}: the API {:?} has no version {v:?}; add it to the API's versions first", c.id, api.name)
        })?),
    };
    let l = Lifecycle::of(api, version);
    let mut out = RouteLifecycle::new(&api.name, c.version.as_deref(), &l);
    out.subscribers = subscribers(api, c.version.as_deref(), grants);
    Ok(Some(out))
}

/// The apps subscribed to `api` on a route of its version `version` (a subscription to the
/// whole API, or to that version — which wins when an app holds both), with their plans'
/// limits; `None` for an open API no app subscribed to (the route reads nothing per request).
fn subscribers(api: &Api, version: Option<&str>, grants: &[SubscriptionGrant]) -> Option<Arc<Subscribers>> {
    let mut out = Subscribers { required: api.access.needs_subscription(), ..Subscribers::default() };
    for g in grants.iter().filter(|g| g.api_id == api.id && g.workspace_id == api.workspace_id) {
        let specific = match (&g.version, version) {
            (None, _) => false,
            (Some(v), Some(route)) if v == route => true,
            (Some(_), _) => continue,
        };
        let limit = AppLimit {
            key: keygate_core::limits::derived_key(keygate_core::limits::SUB_KEY, g.id.as_str()),
            rate_limit: g.rate_limit,
            quota: g.quota,
            llm_budget: None,
        };
        let app: Box<str> = g.app_id.as_str().into();
        if specific || !out.apps.contains_key(&app) {
            out.apps.insert(app, limit);
        }
    }
    (out.required || !out.apps.is_empty()).then(|| Arc::new(out))
}

/// The request validation of a route (`validate`, or its version's): `None` when it does not
/// validate; an error naming what is missing (the API, its document) or what does not compile.
/// Each API's document is compiled once per table (`compiled`, by API id).
fn route_validation(
    c: &RouteConfig,
    ws: Option<&str>,
    apis: &[Api],
    compiled: &mut HashMap<String, Result<Arc<Validator>, String>>,
) -> Result<Option<RouteValidation>, String> {
    let api = c.api.as_deref().and_then(|k| find_api(apis, ws, k));
    let by_version = api.zip(c.version.as_deref()).and_then(|(a, v)| a.version(v)).is_some_and(|v| v.validate);
    if !c.validate && !by_version {
        return Ok(None);
    }
    let Some(api) = api else {
        return Err(format!(
            "route {:?}: validate: the route's API is unknown, so there is no document to check requests against",
            c.id
        ));
    };
    let Some(doc) = &api.openapi else {
        return Err(format!(
            "route {:?}: validate: the API {:?} has no OpenAPI document to check requests against; give it one first (PATCH /admin/v1/apis/{})",
            c.id, api.name, api.id
        ));
    };
    let v = compiled.entry(api.id.as_str().to_owned()).or_insert_with(|| Validator::compile(doc).map(Arc::new));
    match v {
        Ok(v) => Ok(Some(RouteValidation::Ready(v.clone()))),
        Err(e) => Err(format!(
            "route {:?}: validate: the OpenAPI document of the API {:?} cannot be used to check requests: {e}",
            c.id, api.name
        )),
    }
}

/// Whether `base_url`'s host is a loopback, private or link-local address, or a local name.
fn private_host(base_url: &str) -> bool {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(h) => h.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let lower = host.to_ascii_lowercase();
    lower == "localhost"
        || lower.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| !keygate_core::notify::is_public_ip(ip))
}

/// Reads stored provider fields (they were checked when stored).
fn parse_provider_config(fields: &Map<String, Value>) -> Result<ProviderConfig, String> {
    serde_json::from_value(Value::Object(fields.clone())).map_err(|e| e.to_string())
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
        providers: ProviderSettings,
    ) -> anyhow::Result<Arc<Self>> {
        let live = Arc::new(Self {
            gw,
            store,
            file: ArcSwap::from_pointee(FileRoutes { routes, gateway }),
            applied: tokio::sync::Mutex::new(0),
            issuer_workspaces,
            file_providers: providers.file,
            allow_private_providers: providers.allow_private,
            admin: providers.admin,
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
    /// Each route naming an API (`api`, `version`) follows its lifecycle among `apis`; one
    /// naming an API or version its workspace does not have serves as a route of no API (logged)
    /// — unless `strict` (a change made through the admin API is being checked) and it is a
    /// stored route, which is then refused.
    #[allow(clippy::too_many_arguments, reason = "the table's sources, each its own kind")]
    fn compile(
        &self,
        file: &FileRoutes,
        names: &HashMap<String, Arc<str>>,
        stored: &[StoredRoute],
        providers: &[StoredProvider],
        denylists: &[(keygate_core::ids::WorkspaceId, Vec<String>)],
        apis: &[Api],
        grants: &[SubscriptionGrant],
        strict: bool,
        focus: Option<&str>,
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
        let sources: Vec<(&RouteConfig, Option<&str>, RouteSource)> = file
            .routes
            .iter()
            .map(|c| {
                (c, names.get(c.workspace.as_deref().unwrap_or(DEFAULT_WORKSPACE)).map(|w| &**w), RouteSource::File)
            })
            .chain(parsed.iter().map(|(c, ws)| (c, Some(*ws), RouteSource::Api)))
            .collect();
        let mut lifecycles = Vec::with_capacity(sources.len());
        for (c, ws, source) in &sources {
            match route_lifecycle(c, *ws, apis, grants) {
                Ok(l) => lifecycles.push(l),
                Err(e) if strict && *source == RouteSource::Api => return Err(e),
                Err(e) => {
                    if !strict {
                        tracing::warn!(route = %c.id, error = %e, "the route's API is unknown; it serves as a route of no API");
                    }
                    lifecycles.push(None);
                }
            }
        }
        // Request validation: a route that validates and cannot (its API unknown, without a
        // document, or one that does not compile) is refused when a change made through the
        // admin API is checked (a stored route, or any route of the API being changed), and
        // otherwise refuses every request (503 `validation_unavailable`), logged.
        let mut compiled = HashMap::new();
        let mut validations = Vec::with_capacity(sources.len());
        for (c, ws, source) in &sources {
            match route_validation(c, *ws, apis, &mut compiled) {
                Ok(v) => validations.push(v),
                Err(e) => {
                    let focused = focus.is_some_and(|id| {
                        c.api.as_deref().and_then(|k| find_api(apis, *ws, k)).is_some_and(|a| a.id.as_str() == id)
                    });
                    if strict && (*source == RouteSource::Api || focused) {
                        return Err(e);
                    }
                    if !strict {
                        tracing::error!(route = %c.id, error = %e, "the route validates requests but cannot: it refuses every request (503 validation_unavailable)");
                    }
                    validations.push(Some(RouteValidation::Unavailable(e.into())));
                }
            }
        }
        let specs: Vec<RouteSpec<'_>> = sources
            .iter()
            .zip(&lifecycles)
            .zip(&validations)
            .map(|(((config, workspace_id, source), l), v)| RouteSpec {
                config,
                workspace_id: *workspace_id,
                source: *source,
                lifecycle: l.as_ref(),
                validation: v.as_ref(),
            })
            .collect();
        // A workspace's denylist joins the `deny` of each of its routes (refused right after
        // routing, before any token work, like the route's own).
        let merged: Vec<Option<RouteConfig>> = specs
            .iter()
            .map(|s| {
                let (_, deny) = denylists.iter().find(|(w, _)| Some(w.as_str()) == s.workspace_id)?;
                let mut config = s.config.clone();
                config.deny.extend(deny.iter().cloned());
                Some(config)
            })
            .collect();
        let specs: Vec<RouteSpec<'_>> = specs
            .iter()
            .zip(&merged)
            .map(|(s, m)| RouteSpec { config: m.as_ref().unwrap_or(s.config), ..*s })
            .collect();
        let table = RouteTable::build_specs(&specs, &file.gateway)?;
        check_deployments(&specs, &self.file_providers, providers)?;
        Ok(table)
    }

    /// Opens the stored providers' keys and hands them to the AI gateway. A provider whose key
    /// does not open (the pepper changed) is left out, and logged: its routes answer
    /// `provider_unknown` until its key is given again.
    fn load_providers(&self, stored: &[StoredProvider]) {
        let Some(ai) = &self.gw.ai else { return };
        let mut out = Vec::with_capacity(stored.len());
        for s in stored {
            let built = parse_provider_config(&s.config).and_then(|c| {
                let key = self.admin.open_provider_key(s).map_err(|e| e.message.into_owned())?;
                Provider::stored(&c, key, s.workspace_id.as_str())
            });
            match built {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::error!(provider = %s.id, error = %e, "a provider made through the admin API cannot be used")
                }
            }
        }
        ai.set_stored(out);
    }

    /// Builds the table from the file's routes and the store's, and swaps it in.
    pub async fn rebuild(&self) -> Result<(), String> {
        let mut applied = self.applied.lock().await;
        let (pos, stored) = self.store.list_routes().await.map_err(|e| e.message.into_owned())?;
        let providers = self.store.list_providers().await.map_err(|e| e.message.into_owned())?;
        let apps = self.store.app_limits().await.map_err(|e| e.message.into_owned())?;
        let mut apis = self.store.all_apis().await.map_err(|e| e.message.into_owned())?;
        let file = self.file.load_full();
        // The documents of the APIs that routes validating requests need (read apart: up to
        // 1 MiB each).
        let mut keys = keygate_admin::apis::validating_keys(stored.iter().map(|s| &s.config));
        keys.extend(file.routes.iter().filter(|r| r.validate).filter_map(|r| r.api.clone()));
        keygate_admin::apis::with_documents(&*self.store, &mut apis, &keys)
            .await
            .map_err(|e| e.message.into_owned())?;
        let names = self.file_workspaces(&file.routes).await?;
        let denylists = self.store.workspace_denylists().await.map_err(|e| e.message.into_owned())?;
        let grants = self.store.active_subscriptions().await.map_err(|e| e.message.into_owned())?;
        let table = self.compile(&file, &names, &stored, &providers, &denylists, &apis, &grants, false, None)?;
        self.load_providers(&providers);
        let n = table.routes.len();
        let next = Table::succeeding(table, &self.gw.table.load()).with_apps(&apps);
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

    fn check(&self, stored: &[StoredRoute], providers: &[StoredProvider], apis: &[Api]) -> Result<(), String> {
        let file = self.file.load();
        // Workspaces do not change whether a table compiles: any id will do here.
        let names: HashMap<String, Arc<str>> = file
            .routes
            .iter()
            .map(|r| (r.workspace.clone().unwrap_or_else(|| DEFAULT_WORKSPACE.into()), Arc::from("")))
            .collect();
        self.compile(&file, &names, stored, providers, &[], apis, &[], true, None).map(drop)
    }

    async fn check_api(
        &self,
        stored: &[StoredRoute],
        providers: &[StoredProvider],
        apis: &[Api],
        api: &keygate_core::ids::ApiId,
    ) -> Result<(), String> {
        let file = self.file.load_full();
        // The file's routes find their API in their real workspace.
        let names = self.file_workspaces(&file.routes).await?;
        self.compile(&file, &names, stored, providers, &[], apis, &[], true, Some(api.as_str())).map(drop)
    }

    fn file_providers(&self) -> Vec<Map<String, Value>> {
        self.file_providers
            .iter()
            .filter_map(|p| match serde_json::to_value(p) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn parse_provider(&self, fields: Value) -> Result<Map<String, Value>, String> {
        let config: ProviderConfig = serde_json::from_value(fields).map_err(|e| e.to_string())?;
        // Checked as the gateway will build it (a stand-in key: the real one is checked apart).
        Provider::stored(&config, Some("k".into()), "")?;
        if !self.allow_private_providers && private_host(&config.base_url) {
            return Err(format!(
                "provider {:?}: base_url names a loopback, private or link-local host; providers made through \
                 the API call public hosts only, unless [ai] allow_private_providers = true is set in the \
                 configuration (or define the provider in the config file's [[providers]])",
                config.id
            ));
        }
        match serde_json::to_value(&config) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("the provider cannot be written back as JSON".into()),
        }
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
