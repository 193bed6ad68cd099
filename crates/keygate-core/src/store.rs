//! The store traits: one per aggregate, implemented once per engine by `keygate-store` and
//! chosen once at start. Every method that changes something takes the audit event that records
//! the change, and writes both in one transaction.

use async_trait::async_trait;

use crate::account::AccountStore;
use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{AppId, PlanId, RootKeyId, TokenId, WorkspaceId};
use crate::model::{
    App, AuditEvent, AuditFilter, LastUse, NewAuditEvent, NodeRecord, Page, PageRequest, Plan, Propagation, QuotaCount,
    RootKey, ScopeEntry, StoredRoute, TokenFilter, TokenRecord, UsageRecord, Workspace,
};
use crate::oauth::{JtiRevocation, OAuthStore};
use crate::scope::Scope;
use crate::secret::SecretHash;

#[async_trait]
pub trait WorkspaceStore: Send + Sync {
    /// Returns the workspace named like `candidate`, inserting it and `default_app` if missing.
    async fn ensure_workspace(&self, candidate: &Workspace, default_app: &App) -> Result<Workspace>;
    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<Workspace>>;
    async fn workspace_by_name(&self, name: &str) -> Result<Option<Workspace>>;
    /// Every workspace not deleted, by name.
    async fn list_workspaces(&self) -> Result<Vec<Workspace>>;
    /// Renames a workspace; `conflict` (`workspace_exists`) if the name is taken, `not_found` if
    /// there is no such workspace.
    async fn rename_workspace(&self, id: &WorkspaceId, name: &str, audit: &NewAuditEvent) -> Result<()>;
    /// Deletes a workspace in one transaction (`conflict` `workspace_has_tokens` if tokens that
    /// can authenticate remain and `revoke_tokens` is false): its tokens revoked (on the change feed, each
    /// audited), its apps' OAuth clients removed and their access tokens revoked, its root keys
    /// revoked, its routes deleted, its memberships and invitations removed; the row itself stays
    /// (audit trail, token history) under a name that frees the old one, and is never found again.
    async fn delete_workspace(
        &self,
        id: &WorkspaceId,
        at: Timestamp,
        revoke_tokens: bool,
        audit: &NewAuditEvent,
    ) -> Result<WorkspaceDeletion>;
}

/// What deleting a workspace revoked and removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkspaceDeletion {
    pub tokens_revoked: u64,
    pub root_keys_revoked: u64,
    pub routes_deleted: u64,
    pub oauth_clients_deleted: u64,
}

#[async_trait]
pub trait AppStore: Send + Sync {
    async fn insert_app(&self, app: &App, audit: &NewAuditEvent) -> Result<()>;
    async fn app(&self, ws: &WorkspaceId, id: &AppId) -> Result<Option<App>>;
    async fn default_app(&self, ws: &WorkspaceId) -> Result<App>;
    async fn list_apps(&self, ws: &WorkspaceId, page: &PageRequest) -> Result<Page<App>>;
    /// Writes the app; a change to its shared limits is also a change of the route table (the
    /// gateway's map of app limits is rebuilt with it, on every node).
    async fn update_app(&self, app: &App, audit: &NewAuditEvent) -> Result<()>;
    /// Every app, of every workspace, that has a shared rate limit or quota.
    async fn app_limits(&self) -> Result<Vec<crate::model::AppLimits>>;
    /// Deletes the app and its token rows in one transaction. While the app holds tokens that
    /// are not revoked, this is refused with `app_has_tokens` unless `revoke_tokens` is set; then
    /// each of those gets a `token.revoke` audit event (a copy of `audit` retargeted) and every
    /// token of the app leaves the change feed's followers. The app's OAuth client goes too (with
    /// an `oauth_client.delete` event), with its refresh tokens; its token families are revoked,
    /// and so are its live access tokens, on the change feed. The default app cannot be deleted.
    async fn delete_app(
        &self,
        ws: &WorkspaceId,
        id: &AppId,
        revoke_tokens: bool,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<()>;
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn insert_token(&self, token: &TokenRecord, audit: &NewAuditEvent) -> Result<()>;
    async fn token(&self, ws: &WorkspaceId, id: &TokenId) -> Result<Option<TokenRecord>>;
    /// Any workspace's token with this hash (for the scanner's liveness check).
    async fn token_by_hash(&self, hash: &SecretHash) -> Result<Option<TokenRecord>>;
    async fn list_tokens(
        &self,
        ws: &WorkspaceId,
        filter: &TokenFilter,
        now: Timestamp,
        page: &PageRequest,
    ) -> Result<Page<TokenRecord>>;
    /// Writes `token` (whose `version` is the one read plus one) if the stored version is still
    /// `token.version - 1`; otherwise fails with `concurrent_update`.
    /// Returns the change's feed position (what the nodes' indexes must reach to have it).
    async fn update_token(&self, token: &TokenRecord, audit: &NewAuditEvent) -> Result<u64>;
    /// Writes the rotated-out `old` (under the same version rule) and inserts `new`, atomically,
    /// with an audit event for each. Returns the feed position of the last of the two changes.
    async fn rotate_token(
        &self,
        old: &TokenRecord,
        new: &TokenRecord,
        old_audit: &NewAuditEvent,
        new_audit: &NewAuditEvent,
    ) -> Result<u64>;
}

#[async_trait]
pub trait RootKeyStore: Send + Sync {
    async fn insert_root_key(&self, key: &RootKey, audit: &NewAuditEvent) -> Result<()>;
    /// Any workspace's key with this hash, revoked and expired ones included (the caller decides).
    async fn root_key_by_hash(&self, hash: &SecretHash) -> Result<Option<RootKey>>;
    async fn root_key(&self, ws: &WorkspaceId, id: &RootKeyId) -> Result<Option<RootKey>>;
    /// The workspace's root keys, revoked ones included, newest first.
    async fn list_root_keys(&self, ws: &WorkspaceId) -> Result<Vec<RootKey>>;
    /// Every workspace's root keys, newest first: for the local command line only, which works on
    /// the store as its operator.
    async fn all_root_keys(&self) -> Result<Vec<RootKey>>;
    /// Sets `revoked_at` of the key (in its workspace) if it is not revoked yet, with the audit
    /// event, in one transaction; `false` (and no event) when it was already revoked or is gone.
    async fn revoke_root_key(&self, key: &RootKey, at: Timestamp, audit: &NewAuditEvent) -> Result<bool>;
    /// Moves `last_used_at` to `at` unless it is already later than `at - every_ms` (one
    /// conditional write: concurrent requests and other nodes write at most once per interval).
    async fn touch_root_key(&self, id: &RootKeyId, at: Timestamp, every_ms: i64) -> Result<()>;
    /// How many root keys and how many tokens exist in all workspaces (zeros on a fresh store).
    async fn credential_counts(&self) -> Result<(u64, u64)>;
}

#[async_trait]
pub trait PlanStore: Send + Sync {
    async fn insert_plan(&self, plan: &Plan, audit: &NewAuditEvent) -> Result<()>;
    /// Saves a plan's name, description, scopes and limits; `not_found` if it is not in its
    /// workspace.
    async fn update_plan(&self, plan: &Plan, audit: &NewAuditEvent) -> Result<()>;
    async fn plan(&self, ws: &WorkspaceId, id: &PlanId) -> Result<Option<Plan>>;
    async fn list_plans(&self, ws: &WorkspaceId) -> Result<Vec<Plan>>;
    /// Adds or replaces a scope catalog entry.
    async fn put_scope(&self, entry: &ScopeEntry, audit: &NewAuditEvent) -> Result<()>;
    async fn list_scopes(&self, ws: &WorkspaceId) -> Result<Vec<ScopeEntry>>;
    async fn delete_scope(&self, ws: &WorkspaceId, scope: &Scope, audit: &NewAuditEvent) -> Result<bool>;
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    async fn list_audit(&self, ws: &WorkspaceId, filter: &AuditFilter, page: &PageRequest) -> Result<Page<AuditEvent>>;
    /// Records an event that goes with no other change (a sign-in, say).
    async fn append_audit(&self, event: &NewAuditEvent) -> Result<()>;
    /// Sets the key every event's link in the hash chain is made with (derived from the pepper;
    /// see [`crate::audit_chain`]). Set once at start, before anything is written.
    fn set_audit_chain_key(&self, key: [u8; 32]);
    /// Links the events written before the chain existed, each workspace's in id order, under
    /// the current key, if their workspace's chain has no event yet. Returns how many.
    async fn link_legacy_audit(&self) -> Result<u64>;
    /// The head of `ws`'s chain (empty if it has no event).
    async fn audit_chain_head(&self, ws: &WorkspaceId) -> Result<crate::audit_chain::ChainHead>;
    /// Verifies `ws`'s chain under `key` (against `checkpoint`, a position and link recorded
    /// earlier, if given): its head and every stored event, read from one snapshot.
    async fn verify_audit_chain(
        &self,
        ws: &WorkspaceId,
        key: [u8; 32],
        checkpoint: Option<crate::audit_chain::Checkpoint>,
    ) -> Result<crate::audit_chain::ChainReport>;
    /// Deletes every workspace's events older than `before` (the oldest first, in chain order),
    /// keeping the link of the last one deleted as its chain's anchor, authenticated under the
    /// chain's key. The links of the events deleted are checked first: a workspace whose events
    /// due for deletion do not verify keeps them (logged). Returns how many were deleted.
    async fn prune_audit(&self, before: Timestamp) -> Result<u64>;
}

/// Routes managed through the admin API. Every change takes a change-feed position (recorded in
/// `route_changes`) and wakes the feed's followers, so every node's gateway rebuilds its route
/// table from [`RouteStore::list_routes`] without a restart.
#[async_trait]
pub trait RouteStore: Send + Sync {
    /// Adds a route; `conflict` (`route_exists`) if a stored route has its id.
    async fn insert_route(&self, route: &StoredRoute, audit: &NewAuditEvent) -> Result<()>;
    /// Replaces a route's config; `not_found` if the workspace has no route with its id.
    async fn update_route(&self, route: &StoredRoute, audit: &NewAuditEvent) -> Result<()>;
    /// Deletes a route; `false` if the workspace has no route with this id.
    async fn delete_route(&self, ws: &WorkspaceId, id: &str, audit: &NewAuditEvent) -> Result<bool>;
    /// A route by id, in whichever workspace it is.
    async fn route(&self, id: &str) -> Result<Option<StoredRoute>>;
    /// Every stored route of every workspace, ordered by id, with the feed position of the
    /// newest route change they include.
    async fn list_routes(&self) -> Result<(u64, Vec<StoredRoute>)>;
    /// The feed position of the newest route change (0 if none): a follower whose table is older
    /// reloads.
    async fn routes_position(&self) -> Result<u64>;
}

/// Usage counted by gateways, and the quota counts that must survive a restart.
#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Adds the counts of `usage` to what is stored (per token, route and minute), moves
    /// `last_used_at`/`last_used_ip` forward, and adds `quota` deltas (a delta for a newer
    /// period replaces the old count), in one transaction.
    async fn record_usage(&self, usage: &[UsageRecord], last_used: &[LastUse], quota: &[QuotaCount]) -> Result<()>;
    /// Minute records of a token in the workspace within [from, to).
    async fn usage(
        &self,
        ws: &WorkspaceId,
        token: &TokenId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRecord>>;
    /// The usage of every token of app `app` within [from, to), summed per token and route (each
    /// record's `minute` is `from`).
    async fn app_usage(
        &self,
        ws: &WorkspaceId,
        app: &crate::ids::AppId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRecord>>;
    /// Adds refusal counts to what is stored (per workspace, route, reason and hour).
    async fn record_refusals(&self, counts: &[crate::model::RefusalCount]) -> Result<()>;
    /// The workspace's refusals of the hours within [from, to), summed per reason and UTC day
    /// (`hour` holding the day's start, `route` empty), at most 100,000 rows.
    async fn refusals_by_day(
        &self,
        ws: &WorkspaceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<crate::model::RefusalCount>>;
    /// The workspace's usage within [from, to) summed per group (`by`): each group's key (a
    /// token id, a route id, an app id — empty for tokens no longer stored —, or a day number)
    /// and its counts (in a record whose `token_id`, `route` and `minute` mean nothing).
    async fn usage_groups(
        &self,
        ws: &WorkspaceId,
        by: crate::model::UsageGrouping,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(String, UsageRecord)>>;
    /// Every stored quota count.
    async fn quota_counts(&self) -> Result<Vec<QuotaCount>>;
}

/// Every token that may still authenticate, and the change-feed position it is current to.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub seq: u64,
    pub tokens: Vec<TokenRecord>,
}

/// One entry of the change feed: the token `id` changed; `record` is its state now (`None` if
/// it can no longer authenticate and may be dropped from an index).
#[derive(Debug, Clone)]
pub struct TokenChange {
    pub seq: u64,
    pub id: TokenId,
    /// The token's keyed hash (the index key), present even when the record is gone.
    pub hash: SecretHash,
    pub record: Option<TokenRecord>,
}

/// Wakes a follower of the change feed when new changes may be there. A wake-up carries no data:
/// the follower always reads `changes_since` its own position, so a missed wake-up only delays.
#[async_trait]
pub trait ChangeSignal: Send {
    /// Waits for the next wake-up; `false` once the feed is closed.
    async fn changed(&mut self) -> bool;
}

#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// Every token not revoked and not expired at `now`, with the feed position it is current to.
    async fn snapshot(&self, now: Timestamp) -> Result<Snapshot>;
    /// The committed feed position, read from the store (a snapshot taken in pages reads it
    /// first; tokens read afterwards are at least that current).
    async fn feed_position(&self) -> Result<u64>;
    /// One page of a snapshot: tokens not revoked and not expired at `now` (or replaced by a
    /// rotation and expired within [`crate::model::ROTATED_KEPT_MS`]) whose id sorts after
    /// `after`, in id order, at most `limit` — so a million tokens load without a million rows in
    /// memory at once.
    async fn snapshot_page(&self, now: Timestamp, after: Option<&TokenId>, limit: u32) -> Result<Vec<TokenRecord>>;
    /// Changes with a sequence number above `seq`, in order, at most `limit` of them.
    async fn changes_since(&self, seq: u64, limit: u32) -> Result<Vec<TokenChange>>;
    /// Access-token revocations with a sequence number above `seq`, in order, at most `limit` of
    /// them. They are numbered from the same sequence as token changes, so the two lists leave
    /// gaps in each other: a follower that pages through both keeps a position for each.
    async fn revocations_since(&self, seq: u64, limit: u32) -> Result<Vec<JtiRevocation>>;
    /// Every revocation whose token has not expired at `now`, for a gateway starting up. Read the
    /// feed position first (`snapshot`), then this, then `revocations_since` that position:
    /// seeing a revocation twice is harmless, missing one is not.
    async fn revoked_jtis(&self, now: Timestamp) -> Result<Vec<JtiRevocation>>;
    fn subscribe(&self) -> Box<dyn ChangeSignal>;
    /// The newest feed position this process knows to be committed (for lag metrics).
    fn position(&self) -> u64;
    /// Deletes token changes recorded before `before`; returns how many. The highest position
    /// deleted becomes the feed's floor.
    async fn prune_feed(&self, before: Timestamp) -> Result<u64>;
    /// The highest position pruned (0: none). A follower behind it cannot replay the feed: read
    /// it *after* reading changes, and reload a snapshot if it is above the position read from.
    async fn feed_floor(&self) -> Result<u64>;
}

/// The call log (issue 15): every gateway call, written in batches.
#[async_trait]
pub trait CallStore: Send + Sync {
    /// Writes chunks of calls (`keygate_core::calls`), in the order given (their ids grow).
    async fn insert_chunks(&self, chunks: &[crate::calls::CallChunk]) -> Result<()>;
    /// Writes calls, grouped into chunks by workspace, token and app.
    async fn insert_calls(&self, calls: &[crate::model::CallRecord]) -> Result<()> {
        self.insert_chunks(&crate::calls::chunk_calls(calls)).await
    }
    /// A page of the workspace's calls, newest first (the cursor is the last id shown). A filter
    /// that matches rarely can return a short page, even an empty one, with a cursor to go on
    /// from: a page examines a bounded number of calls.
    async fn list_calls(
        &self,
        ws: &WorkspaceId,
        filter: &crate::model::CallFilter,
        page: &PageRequest,
    ) -> Result<Page<crate::model::CallRecord>>;
    /// Deletes up to `limit` chunks of calls (`keygate_core::calls`) all older than `before`,
    /// oldest first; returns how many chunks.
    async fn trim_calls(&self, before: Timestamp, limit: u32) -> Result<u64>;
}

/// The registry of keygate processes sharing the store, and what each change reached.
#[async_trait]
pub trait NodeStore: Send + Sync {
    /// Adds the node, or replaces the row of an earlier process with the same id.
    async fn register_node(&self, node: &NodeRecord) -> Result<()>;
    /// Records a heartbeat and the feed position applied (never moving it back). `false` when
    /// the row is not this process's (gone, or taken over by another process with the same id).
    async fn node_heartbeat(&self, id: &str, instance: &str, applied_seq: u64, at: Timestamp) -> Result<bool>;
    /// Marks the node stopped (a graceful shutdown): it is no longer waited for.
    async fn node_stopped(&self, id: &str, instance: &str, at: Timestamp) -> Result<()>;
    /// Every registered node, by id.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Forgets nodes whose last heartbeat is older than `before`; returns how many.
    async fn prune_nodes(&self, before: Timestamp) -> Result<u64>;
    /// Records how far the change at feed position `seq` had spread when it was answered; the
    /// audit events written with that change show it.
    async fn record_propagation(&self, seq: u64, propagation: &Propagation, at: Timestamp) -> Result<()>;
}

/// All of a store, as the rest of keygate holds it: `Arc<dyn Store>`.
#[async_trait]
pub trait Store:
    WorkspaceStore
    + AppStore
    + TokenStore
    + RootKeyStore
    + PlanStore
    + RouteStore
    + AuditStore
    + UsageStore
    + ChangeFeed
    + AccountStore
    + OAuthStore
    + NodeStore
    + crate::notify::NotifyStore
    + crate::siem::SiemStore
    + crate::anomaly::AlertStore
    + CallStore
    + crate::llm::LlmStore
    + crate::apis::ApiStore
    + crate::subscriptions::SubscriptionStore
{
    /// Which engine this is (`sqlite`, `postgres`), for logs.
    fn engine(&self) -> &'static str;
    /// Succeeds when the store answers.
    async fn ping(&self) -> Result<()>;
}
