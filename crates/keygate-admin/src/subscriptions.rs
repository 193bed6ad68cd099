//! Subscriptions with approval (issue 17): the service layer. An app subscribes to an API (or one
//! of its versions), optionally under a plan; on an API whose access is `approval` the
//! subscription waits for someone who may approve (a dashboard owner or admin, or a root key
//! holding `apis:write`). Every change is audited in the transaction that writes it and raises
//! its event (`subscription.requested`, `.approved`, `.rejected`, `.cancelled`); the store's
//! change feed carries it to every node's gateway, which admits the app's tokens on the API's
//! routes while the subscription is active and holds their calls to its plan's limits.

use keygate_core::apis::{Api, ApiState};
use keygate_core::ids::{ApiId, AppId, PlanId, SubscriptionId, WorkspaceId};
use keygate_core::model::{Actor, NewAuditEvent};
use keygate_core::subscriptions::{
    ApiAccess, MAX_SUBSCRIPTIONS_PER_APP, Subscription, SubscriptionFilter, SubscriptionStatus, check_reason,
    transition_error,
};
use keygate_core::{Error, Result};
use serde_json::{Value, json};

use crate::service::Admin;

/// A request to subscribe an app.
#[derive(Debug, Clone, Default)]
pub struct NewSubscription {
    /// The API, by id or by name.
    pub api: String,
    pub version: Option<String>,
    pub plan_id: Option<PlanId>,
}

/// What an audit event records of a subscription.
fn audit_view(s: &Subscription, api: Option<&Api>) -> Value {
    json!({
        "app_id": s.app_id.as_str(),
        "api_id": s.api_id.as_str(),
        "api": api.map(|a| a.name.as_str()),
        "version": s.version,
        "plan_id": s.plan_id.as_ref().map(PlanId::as_str),
        "status": s.status.as_str(),
        "reason": s.reason,
    })
}

impl Admin {
    /// An API of the workspace by id or, failing that, by name.
    async fn find_api(&self, ws: &WorkspaceId, key: &str) -> Result<Api> {
        if let Some(id) = ApiId::parse(key)
            && let Some(a) = self.store.api(ws, &id).await?
        {
            return Ok(a);
        }
        self.store.list_apis(ws).await?.into_iter().find(|a| a.name == key).ok_or_else(|| Error::not_found("api"))
    }

    /// Subscribes `app` to an API (or a version). Active at once unless the API's access is
    /// `approval` and the actor may not approve (`may_approve`), then pending. A plan other than
    /// the app's own needs someone who may approve, or an API whose subscriptions are approved
    /// anyway. Refused: a retired API or version (`api_retired`), a draft for those who may not
    /// approve (`api_not_published`: it is not in the portal), an app's second live
    /// subscription to the same API and version (`subscription_exists`).
    pub async fn subscribe(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        app_id: &AppId,
        new: NewSubscription,
        may_approve: bool,
    ) -> Result<Subscription> {
        let app = self.store.app(ws, app_id).await?.ok_or_else(|| Error::not_found("app"))?;
        let api = self.find_api(ws, &new.api).await?;
        let state = match &new.version {
            None => api.state,
            Some(v) => {
                let version = api.version(v).ok_or_else(|| Error::not_found("api version"))?;
                // The stricter of the two, as the gateway applies them.
                if api.state == ApiState::Retired || version.state == ApiState::Retired {
                    ApiState::Retired
                } else if api.state == ApiState::Draft || version.state == ApiState::Draft {
                    ApiState::Draft
                } else {
                    version.state
                }
            }
        };
        match state {
            ApiState::Retired => {
                return Err(Error::conflict(
                    "api_retired",
                    "this API (or version) is retired; subscribe to its successor",
                ));
            }
            ApiState::Draft if !may_approve => {
                return Err(Error::conflict(
                    "api_not_published",
                    "this API (or version) is a draft, not yet in the portal; subscribe once it is published",
                ));
            }
            _ => {}
        }
        if let Some(p) = &new.plan_id {
            self.store.plan(ws, p).await?.ok_or_else(|| Error::not_found("plan"))?;
            if !may_approve && app.plan_id.as_ref() != Some(p) && api.access != ApiAccess::Approval {
                return Err(Error::new(
                    keygate_core::ErrorKind::Forbidden,
                    "plan_needs_approval",
                    "a subscription under another plan than the app's needs an owner or admin; subscribe under the app's plan, or ask them",
                ));
            }
        }
        if self.store.count_app_subscriptions(ws, app_id).await? >= MAX_SUBSCRIPTIONS_PER_APP {
            return Err(Error::conflict(
                "too_many_subscriptions",
                format!("an app holds at most {MAX_SUBSCRIPTIONS_PER_APP} subscriptions, ended ones included"),
            ));
        }
        let now = self.now();
        let pending = api.access == ApiAccess::Approval && !may_approve;
        let s = Subscription {
            id: SubscriptionId::random(self.rng())?,
            workspace_id: ws.clone(),
            app_id: app_id.clone(),
            api_id: api.id.clone(),
            version: new.version,
            plan_id: new.plan_id.or(app.plan_id),
            status: if pending { SubscriptionStatus::Pending } else { SubscriptionStatus::Active },
            requested_by: actor.id.clone(),
            created_at: now,
            decided_by: (!pending).then(|| actor.id.clone()),
            decided_at: (!pending).then_some(now),
            reason: None,
        };
        let action = if pending { "subscription.requested" } else { "subscription.create" };
        let audit = NewAuditEvent::new(ws, actor, action, s.id.as_str(), now).with_after(audit_view(&s, Some(&api)));
        self.store.insert_subscription(&s, &audit).await?;
        self.apply_routes().await;
        Ok(s)
    }

    /// Moves a subscription to `to` (approved: active; rejected; cancelled) with an optional
    /// reason, audited as `subscription.approve|reject|cancel`. The caller has checked that the
    /// actor may approve (approving and rejecting) or act for the app (cancelling).
    pub async fn decide_subscription(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &SubscriptionId,
        to: SubscriptionStatus,
        reason: Option<String>,
    ) -> Result<Subscription> {
        if let Some(r) = &reason {
            check_reason(r)?;
        }
        let before = self.store.subscription(ws, id).await?.ok_or_else(|| Error::not_found("subscription"))?;
        if !before.status.may_become(to) {
            return Err(transition_error(before.status, to));
        }
        let now = self.now();
        let after = Subscription {
            status: to,
            decided_by: Some(actor.id.clone()),
            decided_at: Some(now),
            reason: reason.or(before.reason.clone()),
            ..before.clone()
        };
        let action = match to {
            SubscriptionStatus::Active => "subscription.approve",
            SubscriptionStatus::Rejected => "subscription.reject",
            _ => "subscription.cancel",
        };
        let api = self.store.api(ws, &before.api_id).await?;
        let audit = NewAuditEvent::new(ws, actor, action, id.as_str(), now)
            .with_before(json!({"status": before.status.as_str()}))
            .with_after(audit_view(&after, api.as_ref()));
        self.store.update_subscription(&after, before.status, &audit).await?;
        self.apply_routes().await;
        Ok(after)
    }

    /// One of the workspace's subscriptions.
    pub async fn subscription(&self, ws: &WorkspaceId, id: &SubscriptionId) -> Result<Subscription> {
        self.store.subscription(ws, id).await?.ok_or_else(|| Error::not_found("subscription"))
    }

    /// The workspace's subscriptions matching `f`, newest first.
    pub async fn list_subscriptions(&self, ws: &WorkspaceId, f: &SubscriptionFilter) -> Result<Vec<Subscription>> {
        self.store.list_subscriptions(ws, f).await
    }
}
