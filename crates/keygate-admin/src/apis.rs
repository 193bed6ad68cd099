//! APIs with a lifecycle (issue 17): the service layer's API methods. An API is created as a
//! draft, published (by an owner, or through a request an owner approves when the workspace's
//! policy says so), deprecated with a sunset and a successor, and retired. Every change is
//! audited in the transaction that writes it, and every change of state is an event of its own
//! (`api.publish`, `api.deprecate`, `api.retire`) that carries the routes of the API, so that
//! the notification of it reaches the workspace and the owners of the apps that called those
//! routes in the last 90 days. The store's change feed carries each change to every node's
//! gateway (`api:<id>`), which applies the new state to the API's routes.
//!
//! Who counts as an owner: a dashboard member with the owner role, and a root key holding
//! `apis:write` (a key is made by whoever holds the workspace; it has no person to ask).

use keygate_core::apis::{
    self, Api, ApiPublishRequest, ApiState, ApiVersion, MAX_DESCRIPTION_LEN, MAX_VERSIONS, PublishRequestStatus,
    transition_error,
};
use keygate_core::ids::{ApiId, ApiPublishRequestId, WorkspaceId};
use keygate_core::model::{Actor, NewAuditEvent};
use keygate_core::{Error, Result, Timestamp};
use serde_json::{Value, json};

use crate::service::Admin;

/// The `api` (an id or a name) of each route among `configs` (route fields) that validates
/// requests (`validate: true`).
pub fn validating_keys<'a>(configs: impl IntoIterator<Item = &'a serde_json::Map<String, Value>>) -> Vec<String> {
    configs
        .into_iter()
        .filter(|c| c.get("validate").and_then(Value::as_bool) == Some(true))
        .filter_map(|c| c.get("api").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

/// Fills in the OpenAPI documents of `apis` (read without them: they are up to 1 MiB each) that
/// routes validating requests need: those of the APIs `keys` name (by id or name), and of the
/// APIs with a version that validates.
pub async fn with_documents(store: &dyn keygate_core::store::Store, apis: &mut [Api], keys: &[String]) -> Result<()> {
    for a in apis.iter_mut() {
        let needed = keys.iter().any(|k| *k == a.id.as_str() || *k == a.name) || a.versions.iter().any(|v| v.validate);
        if needed
            && a.openapi.is_none()
            && let Some(full) = store.api(&a.workspace_id, &a.id).await?
        {
            a.openapi = full.openapi;
        }
    }
    Ok(())
}

/// An API and the routes (ids) of its workspace that serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiDetails {
    pub api: Api,
    pub routes: Vec<ApiRoute>,
    /// The pending request to publish it (or one of its versions), if any.
    pub pending: Vec<ApiPublishRequest>,
}

/// A route that names an API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRoute {
    pub id: String,
    pub path: String,
    pub version: Option<String>,
}

/// A new API: a draft with these fields.
#[derive(Debug, Clone, Default)]
pub struct NewApi {
    pub name: String,
    pub description: Option<String>,
    pub openapi: Option<Value>,
    /// Its versions' names (each a draft).
    pub versions: Vec<String>,
    pub successor: Option<String>,
    /// Who may call its routes (default: open).
    pub access: Option<keygate_core::subscriptions::ApiAccess>,
}

/// Changes to an API; `None` leaves a field as it is, `Some(None)` removes an optional one.
#[derive(Debug, Clone, Default)]
pub struct ApiChange {
    pub name: Option<String>,
    pub description: Option<String>,
    pub openapi: Option<Option<Value>>,
    pub state: Option<ApiState>,
    pub sunset: Option<Option<Timestamp>>,
    pub successor: Option<Option<String>>,
    /// The whole list of version names: new ones are added as drafts, missing ones removed.
    pub versions: Option<Vec<String>>,
    pub access: Option<keygate_core::subscriptions::ApiAccess>,
}

/// Changes to one version.
#[derive(Debug, Clone, Default)]
pub struct VersionChange {
    pub state: Option<ApiState>,
    pub sunset: Option<Option<Timestamp>>,
    pub successor: Option<Option<String>>,
    /// Whether the routes serving this version check requests against the API's document.
    pub validate: Option<bool>,
}

/// What a change did: the API as it now is, and the publish request it filed instead of
/// publishing (the workspace wants publishing approved and the actor is not an owner).
#[derive(Debug, Clone)]
pub struct ApiOutcome {
    pub entry: ApiDetails,
    pub requested: Option<ApiPublishRequest>,
}

fn api_in_use(what: &str, route: &str) -> Error {
    Error::conflict(
        "api_in_use",
        format!("route {route:?} names {what}; change the route's api or version (or delete the route) first"),
    )
}

/// The state and dates of an API or a version, as one value to move through the lifecycle.
struct Phase<'a> {
    state: &'a mut ApiState,
    deprecated_at: &'a mut Option<Timestamp>,
    sunset: &'a mut Option<Timestamp>,
    successor: &'a mut Option<String>,
}

impl Phase<'_> {
    /// Applies a state, sunset and successor change (checked), at `now`.
    fn apply(
        &mut self,
        state: Option<ApiState>,
        sunset: Option<Option<Timestamp>>,
        successor: Option<Option<String>>,
        now: Timestamp,
    ) -> Result<()> {
        if let Some(Some(s)) = &successor {
            apis::check_successor(s)?;
        }
        if let Some(Some(t)) = sunset
            && t <= now
        {
            // A conflict with the server's clock, as `expiry_in_past` is: the same body was
            // valid a moment earlier.
            return Err(Error::conflict(
                "sunset_in_past",
                "sunset must be a time in the future (RFC 3339, such as 2030-01-31T00:00:00Z)",
            ));
        }
        let from = *self.state;
        if from == ApiState::Retired && (state.is_some_and(|s| s != from) || sunset.is_some() || successor.is_some()) {
            return Err(transition_error(from, state.unwrap_or(ApiState::Published)));
        }
        if let Some(to) = state {
            if !from.may_become(to) {
                return Err(transition_error(from, to));
            }
            match (from, to) {
                (f, ApiState::Deprecated) if f != ApiState::Deprecated => *self.deprecated_at = Some(now),
                // A deprecation withdrawn: no date, no sunset (unless one is given with it).
                (ApiState::Deprecated, ApiState::Published) => {
                    *self.deprecated_at = None;
                    *self.sunset = None;
                }
                _ => {}
            }
            *self.state = to;
        }
        if let Some(s) = sunset {
            *self.sunset = s;
        }
        if let Some(s) = successor {
            *self.successor = s;
        }
        Ok(())
    }
}

fn api_phase(a: &mut Api) -> Phase<'_> {
    Phase {
        state: &mut a.state,
        deprecated_at: &mut a.deprecated_at,
        sunset: &mut a.sunset,
        successor: &mut a.successor,
    }
}

fn version_phase(v: &mut ApiVersion) -> Phase<'_> {
    Phase {
        state: &mut v.state,
        deprecated_at: &mut v.deprecated_at,
        sunset: &mut v.sunset,
        successor: &mut v.successor,
    }
}

/// What an audit event records of an API: every field but the OpenAPI document (its size only).
fn audit_view(a: &Api) -> Value {
    json!({
        "name": a.name,
        "description": a.description,
        "openapi_bytes": a.openapi.as_ref().map(String::len),
        "state": a.state.as_str(),
        "deprecated_at": a.deprecated_at.map(Timestamp::to_rfc3339),
        "sunset": a.sunset.map(Timestamp::to_rfc3339),
        "successor": a.successor,
        "versions": a.versions,
        "access": a.access.as_str(),
    })
}

fn check_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION_LEN || d.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::invalid(
            "invalid_description",
            format!("description is at most {MAX_DESCRIPTION_LEN} characters, without control characters"),
        ));
    }
    Ok(())
}

/// Checks a list of version names: each valid, none twice, at most [`MAX_VERSIONS`].
fn check_versions(names: &[String]) -> Result<()> {
    if names.len() > MAX_VERSIONS {
        return Err(Error::invalid("too_many_versions", format!("an API has at most {MAX_VERSIONS} versions")));
    }
    for (i, n) in names.iter().enumerate() {
        apis::check_version_name(n)?;
        if names.iter().take(i).any(|m| m == n) {
            return Err(Error::invalid("invalid_api_version", format!("version {n:?} is listed twice")));
        }
    }
    Ok(())
}

impl Admin {
    /// The routes of workspace `ws` (the file's and the stored ones) that name `api`, by id or
    /// name.
    async fn api_routes(&self, ws: &WorkspaceId, api: &Api) -> Result<Vec<ApiRoute>> {
        let Ok(routes) = self.list_routes(ws).await else { return Ok(Vec::new()) };
        Ok(routes
            .into_iter()
            .filter_map(|r| {
                let key = r.config.get("api").and_then(Value::as_str)?;
                (key == api.id.as_str() || key == api.name).then(|| ApiRoute {
                    path: r.config.get("path").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    version: r.config.get("version").and_then(Value::as_str).map(str::to_owned),
                    id: r.id,
                })
            })
            .collect())
    }

    async fn api_entry(&self, api: Api) -> Result<ApiDetails> {
        let routes = self.api_routes(&api.workspace_id, &api).await?;
        let pending = self
            .store
            .publish_requests(&api.workspace_id, Some(PublishRequestStatus::Pending))
            .await?
            .into_iter()
            .filter(|r| r.api_id == api.id)
            .collect();
        Ok(ApiDetails { api, routes, pending })
    }

    /// Rebuilds this node's route table now (other nodes follow the feed), if routes are
    /// served here.
    /// Checks that the routes naming `after` that validate requests (the file's too) can still
    /// do so with it: its document compiles, and is there (400 `invalid_openapi` otherwise).
    async fn check_validating_routes(&self, after: &Api) -> Result<()> {
        let Some(rules) = self.route_rules.get() else { return Ok(()) };
        let (_, stored) = self.store.list_routes().await?;
        let providers = self.store.list_providers().await?;
        let mut apis = self.store.all_apis().await?;
        apis.retain(|a| a.id != after.id);
        let files = rules.file_routes();
        let keys = validating_keys(stored.iter().map(|r| &r.config).chain(files.iter().map(|f| &f.config)));
        with_documents(&*self.store, &mut apis, &keys).await?;
        // The changed API as it would be (its document, or none), not as stored.
        apis.push(after.clone());
        rules.check_api(&stored, &providers, &apis, &after.id).await.map_err(|m| Error::invalid("invalid_openapi", m))
    }

    pub(crate) async fn apply_routes(&self) {
        if let Some(rules) = self.route_rules.get() {
            rules.apply().await;
        }
    }

    /// The workspace's APIs, by name, with their routes.
    pub async fn list_apis(&self, ws: &WorkspaceId) -> Result<Vec<ApiDetails>> {
        let mut out = Vec::new();
        for a in self.store.list_apis(ws).await? {
            out.push(self.api_entry(a).await?);
        }
        Ok(out)
    }

    /// One of the workspace's APIs, by id.
    pub async fn api(&self, ws: &WorkspaceId, id: &ApiId) -> Result<ApiDetails> {
        let a = self.store.api(ws, id).await?.ok_or_else(|| Error::not_found("api"))?;
        self.api_entry(a).await
    }

    /// Adds an API to workspace `ws`, as a draft.
    pub async fn create_api(&self, ws: &WorkspaceId, actor: &Actor, new: NewApi) -> Result<ApiDetails> {
        apis::check_name(&new.name)?;
        let description = new.description.unwrap_or_default();
        check_description(&description)?;
        check_versions(&new.versions)?;
        if let Some(s) = &new.successor {
            apis::check_successor(s)?;
        }
        let openapi = new.openapi.as_ref().map(apis::check_openapi).transpose()?;
        if self.store.list_apis(ws).await?.len() >= apis::MAX_APIS_PER_WORKSPACE {
            return Err(Error::conflict(
                "too_many_apis",
                format!("a workspace has at most {} APIs; delete one first", apis::MAX_APIS_PER_WORKSPACE),
            ));
        }
        let now = self.now();
        let api = Api {
            id: ApiId::random(self.rng())?,
            workspace_id: ws.clone(),
            name: new.name,
            description,
            openapi,
            state: ApiState::Draft,
            deprecated_at: None,
            sunset: None,
            successor: new.successor,
            versions: new.versions.iter().map(|v| ApiVersion::new(v)).collect(),
            access: new.access.unwrap_or_default(),
            created_at: now,
            updated_at: now,
        };
        let audit = NewAuditEvent::new(ws, actor, "api.create", api.id.as_str(), now).with_after(audit_view(&api));
        self.store.insert_api(&api, &audit).await?;
        self.apply_routes().await;
        self.api_entry(api).await
    }

    /// Whether moving to `to` is a publication that waits for an owner: from draft to
    /// published, in a workspace that wants it approved, by someone who is not an owner.
    async fn needs_approval(
        &self,
        ws: &WorkspaceId,
        from: ApiState,
        to: Option<ApiState>,
        owner: bool,
    ) -> Result<bool> {
        if owner || from != ApiState::Draft || to != Some(ApiState::Published) {
            return Ok(false);
        }
        Ok(self.store.workspace_policy(ws).await?.api_publish_needs_approval)
    }

    /// Files a request to publish `api` (`version`) for an owner.
    async fn file_publish_request(&self, actor: &Actor, api: &Api, version: Option<&str>) -> Result<ApiPublishRequest> {
        let pending = self.store.publish_requests(&api.workspace_id, Some(PublishRequestStatus::Pending)).await?;
        if let Some(r) = pending.into_iter().find(|r| r.api_id == api.id && r.version.as_deref() == version) {
            return Ok(r);
        }
        let now = self.now();
        let r = ApiPublishRequest {
            id: ApiPublishRequestId::random(self.rng())?,
            workspace_id: api.workspace_id.clone(),
            api_id: api.id.clone(),
            version: version.map(str::to_owned),
            requested_by: actor.id.clone(),
            status: PublishRequestStatus::Pending,
            created_at: now,
            decided_by: None,
            decided_at: None,
        };
        let audit = NewAuditEvent::new(&api.workspace_id, actor, "api.publish_requested", r.id.as_str(), now)
            .with_after(json!({"api_id": api.id.as_str(), "api": api.name, "version": version}));
        self.store.insert_publish_request(&r, &audit).await?;
        Ok(r)
    }

    /// The audit event of a change of state of `api` (or of its version `version`): before and
    /// after, and the routes that serve it (whose callers are told).
    async fn state_event(
        &self,
        actor: &Actor,
        api: &Api,
        version: Option<&str>,
        from: ApiState,
        to: ApiState,
        at: Timestamp,
    ) -> Result<NewAuditEvent> {
        let routes: Vec<String> = self
            .api_routes(&api.workspace_id, api)
            .await?
            .into_iter()
            .filter(|r| version.is_none() || r.version.as_deref() == version)
            .map(|r| r.id)
            .collect();
        let (sunset, successor) = match version.and_then(|v| api.version(v)) {
            Some(v) => (v.sunset, v.successor.clone().or_else(|| api.successor.clone())),
            None => (api.sunset, api.successor.clone()),
        };
        Ok(NewAuditEvent::new(&api.workspace_id, actor, to.action(), api.id.as_str(), at)
            .with_before(json!({"state": from.as_str()}))
            .with_after(json!({
                "api": api.name,
                "version": version,
                "state": to.as_str(),
                "sunset": sunset.map(Timestamp::to_rfc3339),
                "successor": successor,
                "routes": routes,
            })))
    }

    /// Changes an API: its fields, and its state as a whole. `owner`: the actor counts as an
    /// owner (see the module's header); otherwise a publication in a workspace that wants it
    /// approved is filed as a request, and the other changes are made.
    pub async fn update_api(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &ApiId,
        change: ApiChange,
        owner: bool,
    ) -> Result<ApiOutcome> {
        let before = self.store.api(ws, id).await?.ok_or_else(|| Error::not_found("api"))?;
        let now = self.now();
        let mut after = before.clone();
        if let Some(n) = change.name {
            apis::check_name(&n)?;
            // Routes may name the API by its name: renaming would leave them naming nothing.
            if n != before.name
                && let Some(x) = self
                    .list_routes(ws)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .find(|x| x.config.get("api").and_then(Value::as_str) == Some(before.name.as_str()))
            {
                return Err(api_in_use(&format!("the API by its name {:?}", before.name), &x.id));
            }
            after.name = n;
        }
        if let Some(d) = change.description {
            check_description(&d)?;
            after.description = d;
        }
        if let Some(doc) = change.openapi {
            after.openapi = doc.as_ref().map(apis::check_openapi).transpose()?;
        }
        if let Some(names) = change.versions {
            check_versions(&names)?;
            let routes = self.api_routes(ws, &before).await?;
            if let Some(r) = routes.iter().find(|r| r.version.as_ref().is_some_and(|v| !names.contains(v))) {
                return Err(api_in_use(&format!("version {:?}", r.version.as_deref().unwrap_or_default()), &r.id));
            }
            after.versions =
                names.iter().map(|n| before.version(n).cloned().unwrap_or_else(|| ApiVersion::new(n))).collect();
        }
        if let Some(a) = change.access {
            after.access = a;
        }
        let wait = self.needs_approval(ws, before.state, change.state, owner).await?;
        let state = if wait { None } else { change.state };
        api_phase(&mut after).apply(state, change.sunset, change.successor, now)?;
        let requested = if wait { Some(self.file_publish_request(actor, &before, None).await?) } else { None };
        if after == before {
            return Ok(ApiOutcome { entry: self.api_entry(before).await?, requested });
        }
        if after.openapi != before.openapi || after.versions != before.versions {
            self.check_validating_routes(&after).await?;
        }
        after.updated_at = now;
        // One `api.update` for the fields, one event of the state change (with the sunset and
        // successor it came with).
        let lifecycle_only = Api {
            state: before.state,
            deprecated_at: before.deprecated_at,
            sunset: before.sunset,
            successor: before.successor.clone(),
            updated_at: before.updated_at,
            ..after.clone()
        } == before;
        let mut audits = Vec::new();
        if !lifecycle_only || after.state == before.state {
            audits.push(
                NewAuditEvent::new(ws, actor, "api.update", id.as_str(), now)
                    .with_diff(&audit_view(&before), &audit_view(&after)),
            );
        }
        if after.state != before.state {
            audits.push(self.state_event(actor, &after, None, before.state, after.state, now).await?);
        }
        self.store.update_api(&after, &audits).await?;
        self.apply_routes().await;
        Ok(ApiOutcome { entry: self.api_entry(after).await?, requested })
    }

    /// Changes one version of an API: its state, sunset and successor.
    pub async fn update_api_version(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &ApiId,
        version: &str,
        change: VersionChange,
        owner: bool,
    ) -> Result<ApiOutcome> {
        let before = self.store.api(ws, id).await?.ok_or_else(|| Error::not_found("api"))?;
        let from = before.version(version).ok_or_else(|| Error::not_found("api version"))?.state;
        let now = self.now();
        let wait = self.needs_approval(ws, from, change.state, owner).await?;
        let mut after = before.clone();
        let Some(v) = after.versions.iter_mut().find(|v| v.name == version) else {
            return Err(Error::not_found("api version"));
        };
        version_phase(v).apply(if wait { None } else { change.state }, change.sunset, change.successor, now)?;
        if let Some(on) = change.validate {
            v.validate = on;
        }
        let to = v.state;
        let validate_changed = v.validate != before.version(version).is_some_and(|b| b.validate);
        let requested = if wait { Some(self.file_publish_request(actor, &before, Some(version)).await?) } else { None };
        if after == before {
            return Ok(ApiOutcome { entry: self.api_entry(before).await?, requested });
        }
        if validate_changed {
            self.check_validating_routes(&after).await?;
        }
        after.updated_at = now;
        let mut audits = vec![
            NewAuditEvent::new(ws, actor, "api.update", id.as_str(), now)
                .with_diff(&audit_view(&before), &audit_view(&after)),
        ];
        if to != from {
            audits.push(self.state_event(actor, &after, Some(version), from, to, now).await?);
        }
        self.store.update_api(&after, &audits).await?;
        self.apply_routes().await;
        Ok(ApiOutcome { entry: self.api_entry(after).await?, requested })
    }

    /// Deletes an API; refused (`api_in_use`) while a route names it.
    pub async fn delete_api(&self, ws: &WorkspaceId, actor: &Actor, id: &ApiId) -> Result<()> {
        let before = self.store.api(ws, id).await?.ok_or_else(|| Error::not_found("api"))?;
        if let Some(r) = self.api_routes(ws, &before).await?.first() {
            return Err(api_in_use(&format!("the API {:?}", before.name), &r.id));
        }
        let audit =
            NewAuditEvent::new(ws, actor, "api.delete", id.as_str(), self.now()).with_before(audit_view(&before));
        if !self.store.delete_api(ws, id, &audit).await? {
            return Err(Error::not_found("api"));
        }
        self.apply_routes().await;
        Ok(())
    }

    /// The workspace's publish requests, newest first (only those with `status` if given).
    pub async fn publish_requests(
        &self,
        ws: &WorkspaceId,
        status: Option<PublishRequestStatus>,
    ) -> Result<Vec<ApiPublishRequest>> {
        self.store.publish_requests(ws, status).await
    }

    /// An owner approves (the API or version is published, in the same transaction) or rejects
    /// a pending request. The caller has checked that the actor is an owner.
    pub async fn decide_publish_request(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &ApiPublishRequestId,
        approve: bool,
    ) -> Result<ApiPublishRequest> {
        let req = self.store.publish_request(ws, id).await?.ok_or_else(|| Error::not_found("publish request"))?;
        if req.status != PublishRequestStatus::Pending {
            return Err(Error::conflict("request_decided", "this request was decided already"));
        }
        let now = self.now();
        let decided = ApiPublishRequest {
            status: if approve { PublishRequestStatus::Approved } else { PublishRequestStatus::Rejected },
            decided_by: Some(actor.id.clone()),
            decided_at: Some(now),
            ..req.clone()
        };
        let action = if approve { "api.publish_approved" } else { "api.publish_rejected" };
        let mut audits = vec![
            NewAuditEvent::new(ws, actor, action, id.as_str(), now)
                .with_after(json!({"api_id": req.api_id.as_str(), "version": req.version})),
        ];
        let api = if approve {
            let mut after = self.store.api(ws, &req.api_id).await?.ok_or_else(|| Error::not_found("api"))?;
            // Only a draft is published: a request that waited while someone else moved the
            // API on (published it, deprecated it) is recorded as approved and changes nothing,
            // so an old approval never withdraws a deprecation.
            let from = match &req.version {
                None => after.state,
                Some(name) => after.version(name).ok_or_else(|| Error::not_found("api version"))?.state,
            };
            if from == ApiState::Draft {
                match &req.version {
                    None => api_phase(&mut after).apply(Some(ApiState::Published), None, None, now)?,
                    Some(name) => {
                        if let Some(v) = after.versions.iter_mut().find(|v| &v.name == name) {
                            version_phase(v).apply(Some(ApiState::Published), None, None, now)?;
                        }
                    }
                }
                after.updated_at = now;
                audits.push(
                    self.state_event(actor, &after, req.version.as_deref(), from, ApiState::Published, now).await?,
                );
                Some(after)
            } else {
                None
            }
        } else {
            None
        };
        self.store.decide_publish_request(&decided, api.as_ref(), &audits).await?;
        if api.is_some() {
            self.apply_routes().await;
        }
        Ok(decided)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_phase_dates_deprecations_and_refuses_past_sunsets_and_final_retirement() {
        let (mut state, mut dep, mut sunset, mut succ) = (ApiState::Published, None, None, None);
        let mut p = Phase { state: &mut state, deprecated_at: &mut dep, sunset: &mut sunset, successor: &mut succ };
        assert_eq!(p.apply(None, Some(Some(t(5))), None, t(10)).unwrap_err().code, "sunset_in_past");
        assert_eq!(p.apply(None, None, Some(Some("v2".into())), t(10)).unwrap_err().code, "invalid_successor");
        p.apply(Some(ApiState::Deprecated), Some(Some(t(99))), Some(Some("/v2".into())), t(10)).unwrap();
        assert_eq!((*p.state, *p.deprecated_at, *p.sunset), (ApiState::Deprecated, Some(t(10)), Some(t(99))));
        // Deprecated again (a new sunset): the date stays.
        p.apply(Some(ApiState::Deprecated), Some(Some(t(120))), None, t(20)).unwrap();
        assert_eq!(*p.deprecated_at, Some(t(10)));
        p.apply(Some(ApiState::Retired), None, None, t(30)).unwrap();
        assert_eq!(p.apply(Some(ApiState::Published), None, None, t(40)).unwrap_err().code, "invalid_state_transition");
        assert_eq!(p.apply(None, Some(Some(t(500))), None, t(40)).unwrap_err().code, "invalid_state_transition");
    }

    #[test]
    fn version_lists_are_checked() {
        assert!(check_versions(&["v1".into(), "v2".into()]).is_ok());
        assert_eq!(check_versions(&["v1".into(), "v1".into()]).unwrap_err().code, "invalid_api_version");
        assert_eq!(check_versions(&["v 1".into()]).unwrap_err().code, "invalid_api_version");
    }
}
