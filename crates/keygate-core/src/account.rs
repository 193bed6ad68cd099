//! Dashboard accounts: people, their roles per workspace, their sessions, recovery codes and
//! invitations, and the store trait that keeps them. Passwords are kept as Argon2id PHC strings,
//! TOTP secrets sealed under a key derived from the pepper, and session ids, recovery codes and
//! invitation codes only as keyed hashes: nothing here is usable if the database is copied.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{AppId, InvitationId, PlanId, PlanRequestId, UserId, WorkspaceId};
use crate::model::NewAuditEvent;
use crate::secret::SecretHash;

/// What a person may do in a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only.
    Viewer,
    /// Their own apps and those apps' tokens.
    Developer,
    /// Everything in the workspace except members and settings.
    Admin,
    /// Everything, including members and workspace settings.
    Owner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Developer, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// May change anything in the workspace's apps and tokens (not only their own).
    pub fn manages_all(self) -> bool {
        self >= Role::Admin
    }

    /// May create apps and tokens at all (developers: for their own apps).
    pub fn can_write(self) -> bool {
        self >= Role::Developer
    }

    /// May invite, change roles, remove members and change workspace settings.
    pub fn is_owner(self) -> bool {
        self == Role::Owner
    }
}

/// A person who signs in to the dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: UserId,
    /// Lower-cased; unique.
    pub email: String,
    pub name: String,
    /// Argon2id, PHC string format.
    pub password_hash: String,
    /// The TOTP secret, sealed (see `keygate-admin`'s account service); `None` before enrolment.
    pub totp_sealed: Option<Vec<u8>>,
    /// Two-factor sign-in is on (set when the person confirmed a first code).
    pub totp_enabled: bool,
    /// The last TOTP time step accepted, so a code cannot be used twice.
    pub totp_last_step: i64,
    pub disabled: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A person's role in one workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub workspace_id: WorkspaceId,
    pub user_id: UserId,
    pub role: Role,
    pub created_at: Timestamp,
}

/// A signed-in browser. The cookie holds the session secret; the store holds its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id_hash: SecretHash,
    pub user_id: UserId,
    /// The workspace the person is working in.
    pub workspace_id: WorkspaceId,
    /// Password checked but the second factor not yet: only the TOTP step is open.
    pub pending_mfa: bool,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    /// Absolute end, whatever the activity.
    pub expires_at: Timestamp,
    /// The client's address at sign-in, for the audit trail.
    pub ip: Option<String>,
}

/// An invitation to a workspace, accepted once through a link that carries its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub id: InvitationId,
    pub workspace_id: WorkspaceId,
    pub email: String,
    pub role: Role,
    pub code_hash: SecretHash,
    pub invited_by: UserId,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub accepted_at: Option<Timestamp>,
}

/// Workspace policy set by its owners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspacePolicy {
    /// Longest token lifetime allowed, in days; `None`: no limit.
    pub max_token_lifetime_days: Option<u32>,
    /// Every member must have two-factor sign-in on.
    pub require_two_factor: bool,
    /// Developers' requests to move an app to a plan wait for an admin's approval (otherwise
    /// they apply at once).
    #[serde(default)]
    pub plan_changes_need_approval: bool,
    /// What happens to a token of the workspace found exposed (in a query string, by `keygate
    /// scan --online`, by a secret-scanning partner): it is always marked exposed; `suspend` and
    /// `revoke` also stop it at once.
    #[serde(default)]
    pub exposure_action: ExposureAction,
    /// Tokens are to be rotated (replaced by a new secret) within this many days of their
    /// creation; `None`: no rotation policy.
    #[serde(default)]
    pub max_token_age_days: Option<u32>,
    /// A token past that age is suspended (`true`) or only flagged (`false`).
    #[serde(default)]
    pub suspend_unrotated: bool,
    /// Anomaly alerts of this severity or above suspend their token or OAuth client at once
    /// (actor `anomaly-policy`, the alert in the reason); `None`: alerts only notify.
    #[serde(default)]
    pub anomaly_suspend: Option<crate::anomaly::Severity>,
    /// What every token of the workspace must be, and what the gateway refuses before any token
    /// work (issue 17).
    #[serde(default)]
    pub rules: TokenRules,
    /// Publishing an API (or a version) by anyone but an owner files a request that an owner
    /// approves or rejects (root keys with `apis:write` count as owners).
    #[serde(default)]
    pub api_publish_needs_approval: bool,
}

/// Rules every token creation and change of a workspace is checked against (in one place, for
/// the API, the dashboard and the CLI), and the workspace's address denylist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRules {
    /// Every token must have an expiry.
    #[serde(default)]
    pub require_expiry: bool,
    /// A token granted a scope that meets one of these (covers it, or is covered by it) must
    /// have an IP allowlist.
    #[serde(default)]
    pub allowlist_required_for: Vec<crate::scope::Scope>,
    /// A token granted a scope that meets one of these must be bound to a DPoP key.
    #[serde(default)]
    pub dpop_required_for: Vec<crate::scope::Scope>,
    /// The most active tokens one app may hold.
    #[serde(default)]
    pub max_active_tokens_per_app: Option<u32>,
    /// Addresses and CIDRs refused on every route of the workspace, before any token work.
    #[serde(default)]
    pub deny: Vec<String>,
    /// A token unused for this many days (since its last use, or its creation) is dormant:
    /// flagged, listed, and suspended if `suspend_dormant`.
    #[serde(default)]
    pub dormant_days: Option<u32>,
    #[serde(default)]
    pub suspend_dormant: bool,
}

/// The most entries a workspace's denylist may hold (each route of the workspace carries them;
/// the admin API's 64 KiB body bound holds a thousand of the longest). Longer lists belong in the
/// config file's `[gateway] deny`.
pub const MAX_WORKSPACE_DENY: usize = 1_000;

impl TokenRules {
    /// Checks the rules as values: the denylist parses and is bounded, the numbers are in range.
    pub fn validate(&self) -> crate::Result<()> {
        if self.deny.len() > MAX_WORKSPACE_DENY {
            return Err(crate::Error::invalid(
                "invalid_policy",
                format!("a workspace's denylist holds at most {MAX_WORKSPACE_DENY} entries"),
            ));
        }
        crate::policy::AddressSet::parse(&self.deny)
            .map_err(|e| crate::Error::invalid("invalid_policy", format!("deny: {e}")))?;
        if self.max_active_tokens_per_app.is_some_and(|n| n == 0 || n > 1_000_000) {
            return Err(crate::Error::invalid("invalid_policy", "max_active_tokens_per_app is from 1 to 1000000"));
        }
        if self.dormant_days.is_some_and(|d| d == 0 || d > 3650) {
            return Err(crate::Error::invalid("invalid_policy", "dormant_days is a number of days from 1 to 3650"));
        }
        if self.allowlist_required_for.len() > 100 || self.dpop_required_for.len() > 100 {
            return Err(crate::Error::invalid("invalid_policy", "a rule names at most 100 scopes"));
        }
        Ok(())
    }

    /// Checks `token` (as it will be stored) against the rules that concern one token.
    pub fn check(&self, token: &crate::model::TokenRecord) -> crate::Result<()> {
        if self.require_expiry && token.expires_at.is_none() {
            return Err(crate::Error::conflict(
                "expiry_required",
                "this workspace requires every token to expire; give expires_in or expires_at",
            ));
        }
        let meets = |rule: &[crate::scope::Scope]| {
            token.scopes.iter().find(|s| rule.iter().any(|r| r.covers(s) || s.covers(r))).cloned()
        };
        if token.ip_allowlist.is_empty()
            && let Some(s) = meets(&self.allowlist_required_for)
        {
            return Err(crate::Error::conflict(
                "allowlist_required",
                format!("this workspace requires an IP allowlist on tokens granted {s}; give ip_allowlist"),
            ));
        }
        if token.dpop_jkt.is_none()
            && let Some(s) = meets(&self.dpop_required_for)
        {
            return Err(crate::Error::conflict(
                "dpop_required",
                format!("this workspace requires tokens granted {s} to be bound to a DPoP key; give dpop_jkt"),
            ));
        }
        Ok(())
    }
}

/// Days before a token's rotation is due that its reminder (`token.rotation_due`) is recorded.
pub const ROTATION_REMINDER_DAYS: u32 = 7;

/// What a workspace does with a token found exposed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExposureAction {
    /// Marked exposed (and its owners told, where notifications are set up); it keeps working.
    #[default]
    Notify,
    /// Marked exposed and suspended: it works again when someone resumes it.
    Suspend,
    /// Marked exposed and revoked, for good.
    Revoke,
}

impl ExposureAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Suspend => "suspend",
            Self::Revoke => "revoke",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "notify" => Some(Self::Notify),
            "suspend" => Some(Self::Suspend),
            "revoke" => Some(Self::Revoke),
            _ => None,
        }
    }
}

/// Where a plan request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanRequestStatus {
    Pending,
    Approved,
    Denied,
}

impl PlanRequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Denied].into_iter().find(|v| v.as_str() == s)
    }
}

/// A developer's request to move one of their apps to a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRequest {
    pub id: PlanRequestId,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    pub plan_id: PlanId,
    pub requested_by: UserId,
    pub note: Option<String>,
    pub status: PlanRequestStatus,
    pub created_at: Timestamp,
    pub decided_by: Option<UserId>,
    pub decided_at: Option<Timestamp>,
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// How many accounts exist (0: first run, the setup code is open).
    async fn user_count(&self) -> Result<u64>;
    /// Inserts a user with their first membership. A taken email is `Conflict`.
    async fn insert_user(&self, user: &User, membership: &Membership, audit: &NewAuditEvent) -> Result<()>;
    async fn user(&self, id: &UserId) -> Result<Option<User>>;
    /// By lower-cased email.
    async fn user_by_email(&self, email: &str) -> Result<Option<User>>;
    /// Saves every field of `user` but `id`, `email` and `created_at`.
    async fn update_user(&self, user: &User, audit: Option<&NewAuditEvent>) -> Result<()>;
    /// Sets `totp_last_step` to `step` only if it is greater than the stored one; false if the
    /// step was already used (a replayed code).
    async fn advance_totp_step(&self, id: &UserId, step: i64) -> Result<bool>;

    async fn memberships(&self, user: &UserId) -> Result<Vec<Membership>>;
    async fn membership(&self, ws: &WorkspaceId, user: &UserId) -> Result<Option<Membership>>;
    /// Members of a workspace with their accounts, oldest first.
    async fn members(&self, ws: &WorkspaceId) -> Result<Vec<(Membership, User)>>;
    /// Inserts or changes a membership.
    async fn put_membership(&self, m: &Membership, audit: &NewAuditEvent) -> Result<()>;
    /// Removes a membership and the person's sessions in that workspace; false if there was none.
    async fn delete_membership(&self, ws: &WorkspaceId, user: &UserId, audit: &NewAuditEvent) -> Result<bool>;

    /// Replaces a person's recovery codes (keyed hashes).
    async fn set_recovery_codes(&self, user: &UserId, codes: &[SecretHash], at: Timestamp) -> Result<()>;
    /// Uses one recovery code: true once, false if unknown or used.
    async fn use_recovery_code(&self, user: &UserId, code: &SecretHash, at: Timestamp) -> Result<bool>;
    /// Recovery codes not used yet.
    async fn recovery_codes_left(&self, user: &UserId) -> Result<u32>;

    async fn insert_session(&self, s: &Session) -> Result<()>;
    async fn session(&self, id_hash: &SecretHash) -> Result<Option<Session>>;
    /// Saves `last_seen_at`, `pending_mfa` and `workspace_id`.
    async fn update_session(&self, s: &Session) -> Result<()>;
    async fn delete_session(&self, id_hash: &SecretHash) -> Result<()>;
    /// Signs a person out everywhere (password change, removal, disabling).
    async fn delete_user_sessions(&self, user: &UserId) -> Result<()>;
    /// Deletes sessions past `expires_at` or idle since before `idle_before`.
    async fn purge_sessions(&self, now: Timestamp, idle_before: Timestamp) -> Result<u64>;

    async fn insert_invitation(&self, inv: &Invitation, audit: &NewAuditEvent) -> Result<()>;
    async fn invitation_by_code(&self, code_hash: &SecretHash) -> Result<Option<Invitation>>;
    async fn invitations(&self, ws: &WorkspaceId) -> Result<Vec<Invitation>>;
    /// Marks it accepted and adds the membership (inserting `new_user` first when the person has
    /// no account yet), in one transaction; `Conflict` if it was already accepted.
    async fn accept_invitation(
        &self,
        inv: &Invitation,
        new_user: Option<&User>,
        membership: &Membership,
        audit: &NewAuditEvent,
    ) -> Result<()>;
    async fn delete_invitation(&self, ws: &WorkspaceId, id: &InvitationId, audit: &NewAuditEvent) -> Result<bool>;

    async fn workspace_policy(&self, ws: &WorkspaceId) -> Result<WorkspacePolicy>;
    /// Writes the policy; a change to its denylist is also a change of the route table.
    async fn put_workspace_policy(&self, ws: &WorkspaceId, p: &WorkspacePolicy, audit: &NewAuditEvent) -> Result<()>;
    /// The denylists of every workspace that has one.
    async fn workspace_denylists(&self) -> Result<Vec<(WorkspaceId, Vec<String>)>>;
    /// Records that `token` got the rotation notice `kind` (`due`, `overdue`), with `audit`, unless
    /// it got it already: `false` then, and nothing is written (so each is recorded once, whichever
    /// node checks first).
    async fn record_rotation_notice(
        &self,
        token: &crate::ids::TokenId,
        kind: &str,
        at: crate::Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<bool>;

    async fn insert_plan_request(&self, r: &PlanRequest, audit: &NewAuditEvent) -> Result<()>;
    async fn plan_request(&self, ws: &WorkspaceId, id: &PlanRequestId) -> Result<Option<PlanRequest>>;
    /// Requests of a workspace, newest first; only those with `status` if given.
    async fn plan_requests(&self, ws: &WorkspaceId, status: Option<PlanRequestStatus>) -> Result<Vec<PlanRequest>>;
    /// Records the decision on a pending request (`Conflict` if it was decided already), in one
    /// transaction with `audit`. Moving the app to the plan is the caller's next step.
    async fn decide_plan_request(
        &self,
        ws: &WorkspaceId,
        id: &PlanRequestId,
        status: PlanRequestStatus,
        by: &UserId,
        at: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<()>;

    /// The person who owns an app (developers manage their own apps), if any.
    async fn app_owner(&self, ws: &WorkspaceId, app: &AppId) -> Result<Option<UserId>>;
    async fn set_app_owner(&self, ws: &WorkspaceId, app: &AppId, owner: &UserId) -> Result<()>;
    /// Apps owned by `user` in `ws`.
    async fn owned_apps(&self, ws: &WorkspaceId, user: &UserId) -> Result<Vec<AppId>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Owner.manages_all() && Role::Admin.manages_all() && !Role::Developer.manages_all());
        assert!(Role::Developer.can_write() && !Role::Viewer.can_write());
        assert!(Role::Owner.is_owner() && !Role::Admin.is_owner());
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }
}
