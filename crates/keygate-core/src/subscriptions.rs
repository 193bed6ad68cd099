//! Subscriptions with approval (issue 17): an app subscribes to an API (or one of its versions),
//! optionally under a plan; an API says whether its routes need a subscription at all
//! ([`ApiAccess`]) and whether a subscription waits for an owner's or admin's approval. Tokens
//! of an app work on the routes of a subscription-only API only while the app holds an active
//! subscription to it (or to the route's version); the plan a subscription names lends its rate
//! limit and quota to the app's calls to that API, shared by all of the app's tokens.
//!
//! The rules here are pure: the states and their moves. The store keeps subscriptions (each
//! change takes a change-feed position, `subscription:<id>`, so every node's gateway rebuilds);
//! the admin service decides and audits; the gateway applies ([`SubscriptionGrant`]).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ids::{ApiId, AppId, PlanId, SubscriptionId, WorkspaceId};
use crate::model::NewAuditEvent;
use crate::policy::{Quota, RateLimit};
use crate::{Error, Result, Timestamp};

/// The longest reason given for a rejection or a cancellation.
pub const MAX_REASON_LEN: usize = 500;
/// The most subscriptions (of any status) one app holds; rejected and cancelled ones count until
/// deleted with the app, so that a loop of requests cannot grow the table without bound.
pub const MAX_SUBSCRIPTIONS_PER_APP: usize = 1000;

/// Who may call an API's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiAccess {
    /// Every token the route admits (its workspace, scopes and limits): no subscription.
    #[default]
    Open,
    /// Only tokens of apps subscribed to the API (or the route's version); subscribing is
    /// immediate.
    Subscription,
    /// The same, and a subscription waits for an owner's or admin's approval.
    Approval,
}

impl ApiAccess {
    pub const ALL: [ApiAccess; 3] = [Self::Open, Self::Subscription, Self::Approval];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Subscription => "subscription",
            Self::Approval => "approval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether the API's routes admit only subscribed apps.
    pub fn needs_subscription(self) -> bool {
        self != Self::Open
    }

    /// Checks `s` as an access mode, for a request's field.
    pub fn from_field(s: &str) -> Result<Self> {
        Self::parse(s)
            .ok_or_else(|| Error::invalid("invalid_api_access", "access is one of open, subscription, approval"))
    }
}

/// Where a subscription stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionStatus {
    /// Waiting for an owner or admin (the API's access is `approval`).
    Pending,
    /// The app's tokens may call the API.
    Active,
    /// Refused by an owner or admin. Final.
    Rejected,
    /// Ended by the app's side or the provider's. Final.
    Cancelled,
}

impl SubscriptionStatus {
    pub const ALL: [SubscriptionStatus; 4] = [Self::Pending, Self::Active, Self::Rejected, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Pending or active: at most one such subscription per app, API and version.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Pending | Self::Active)
    }

    /// Whether a subscription may move from `self` to `to`: a pending one is approved, rejected
    /// or cancelled; an active one cancelled; nothing leaves a final state.
    pub fn may_become(self, to: Self) -> bool {
        matches!(
            (self, to),
            (Self::Pending, Self::Active | Self::Rejected | Self::Cancelled) | (Self::Active, Self::Cancelled)
        )
    }
}

/// The refusal of a move between states.
pub fn transition_error(from: SubscriptionStatus, to: SubscriptionStatus) -> Error {
    Error::conflict(
        "invalid_subscription_transition",
        format!(
            "a {} subscription cannot become {}: a pending one is approved, rejected or cancelled, an active one cancelled",
            from.as_str(),
            to.as_str()
        ),
    )
}

/// An app's subscription to an API (or one of its versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub api_id: ApiId,
    /// The version subscribed to; `None`: every version of the API.
    pub version: Option<String>,
    /// The plan it is under: its rate limit and quota are shared by the app's calls to the API.
    pub plan_id: Option<PlanId>,
    pub status: SubscriptionStatus,
    /// The actor who subscribed (`usr_…`, `rk_…`, `cli`).
    pub requested_by: String,
    pub created_at: Timestamp,
    /// Who approved, rejected or cancelled it, and when.
    pub decided_by: Option<String>,
    pub decided_at: Option<Timestamp>,
    /// Why it was rejected or cancelled, if they said.
    pub reason: Option<String>,
}

/// Checks a reason: at most [`MAX_REASON_LEN`] characters, no control characters.
pub fn check_reason(r: &str) -> Result<()> {
    if r.chars().count() > MAX_REASON_LEN || r.chars().any(char::is_control) {
        return Err(Error::invalid(
            "invalid_reason",
            format!("reason is at most {MAX_REASON_LEN} characters, on one line"),
        ));
    }
    Ok(())
}

/// An active subscription as the gateway uses it: which app may call which API (and version),
/// and the limits of its plan, shared by the app's tokens on that API.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionGrant {
    pub id: SubscriptionId,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub api_id: ApiId,
    pub version: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
}

/// Which subscriptions a list returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionFilter {
    pub app_id: Option<AppId>,
    pub api_id: Option<ApiId>,
    pub status: Option<SubscriptionStatus>,
}

#[async_trait]
pub trait SubscriptionStore: Send + Sync {
    /// Adds a subscription with its audit event; `conflict` `subscription_exists` if the app has
    /// a pending or active one to the same API and version (both engines hold a unique index on
    /// it, so two nodes racing cannot both add one). Takes a change-feed position
    /// (`subscription:<id>`), so every node's gateway rebuilds.
    async fn insert_subscription(&self, s: &Subscription, audit: &NewAuditEvent) -> Result<()>;
    /// Moves a subscription from `from` to `s.status` (with `s`'s decision fields) and writes
    /// `audit`, in one transaction with a feed position; `conflict` `subscription_changed` if it
    /// is no longer in `from` (someone decided first).
    async fn update_subscription(
        &self,
        s: &Subscription,
        from: SubscriptionStatus,
        audit: &NewAuditEvent,
    ) -> Result<()>;
    async fn subscription(&self, ws: &WorkspaceId, id: &SubscriptionId) -> Result<Option<Subscription>>;
    /// The workspace's subscriptions that match `f`, newest first, at most 1,000.
    async fn list_subscriptions(&self, ws: &WorkspaceId, f: &SubscriptionFilter) -> Result<Vec<Subscription>>;
    /// How many subscriptions (of any status) `app` holds.
    async fn count_app_subscriptions(&self, ws: &WorkspaceId, app: &AppId) -> Result<usize>;
    /// Every active subscription of every workspace, with its plan's limits (the gateway's table).
    async fn active_subscriptions(&self) -> Result<Vec<SubscriptionGrant>>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn statuses_move_forward_only() {
        use SubscriptionStatus::*;
        for (a, b) in [(Pending, Active), (Pending, Rejected), (Pending, Cancelled), (Active, Cancelled)] {
            assert!(a.may_become(b), "{a:?} -> {b:?}");
        }
        for (a, b) in [(Active, Pending), (Active, Rejected), (Rejected, Active), (Cancelled, Active), (Active, Active)]
        {
            assert!(!a.may_become(b), "{a:?} -> {b:?}");
        }
        assert_eq!(transition_error(Rejected, Active).code, "invalid_subscription_transition");
        assert!(Pending.is_live() && Active.is_live() && !Rejected.is_live() && !Cancelled.is_live());
        for s in SubscriptionStatus::ALL {
            assert_eq!(SubscriptionStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn access_modes_parse_and_say_whether_a_subscription_is_needed() {
        for a in ApiAccess::ALL {
            assert_eq!(ApiAccess::from_field(a.as_str()).unwrap(), a);
        }
        assert_eq!(ApiAccess::from_field("closed").unwrap_err().code, "invalid_api_access");
        assert!(!ApiAccess::Open.needs_subscription());
        assert!(ApiAccess::Subscription.needs_subscription() && ApiAccess::Approval.needs_subscription());
        assert_eq!(ApiAccess::default(), ApiAccess::Open);
    }

    #[test]
    fn reasons_are_bounded_and_on_one_line() {
        assert!(check_reason("not for production use").is_ok());
        assert_eq!(check_reason(&"x".repeat(501)).unwrap_err().code, "invalid_reason");
        assert_eq!(check_reason("a\nb").unwrap_err().code, "invalid_reason");
    }
}
