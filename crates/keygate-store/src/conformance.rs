//! One conformance suite, run against every engine: SQLite in a temporary data directory, and
//! PostgreSQL in a database each test creates and drops (`KEYGATE_TEST_POSTGRES_URL`, default
//! the local server's `postgres` database as user `postgres`).

use std::sync::Arc;

use keygate_core::account::AccountStore;
use keygate_core::account::{
    Invitation, Membership, PlanRequest, PlanRequestStatus, Role, Session, User, WorkspacePolicy,
};
use keygate_core::ids::{AppId, InvitationId, PlanId, PlanRequestId, RootKeyId, TokenId, UserId, WorkspaceId};
use keygate_core::model::*;
use keygate_core::oauth::*;
use keygate_core::policy::{Quota, QuotaPeriod, RateLimit};
use keygate_core::scope::Scope;
use keygate_core::secret::{OsRandom, Pepper, SecretHash};
use keygate_core::store::*;
use keygate_core::token_format::{TokenPrefix, mint};
use keygate_core::{ErrorKind, Timestamp};
use serde_json::json;

use crate::{SqlStore, StoreLocation, open};

const T0: Timestamp = Timestamp::from_millis(1_900_000_000_000);

/// A store under test and whatever must be cleaned up after it.
struct Harness {
    store: Arc<SqlStore>,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

impl Harness {
    async fn finish(self) {
        self.store.close().await;
        drop(self.store);
        if let Some(pg) = self.pg {
            pg.drop_now().await;
        }
    }
}

struct PgDatabase {
    admin_url: String,
    name: String,
}

impl PgDatabase {
    async fn drop_now(&self) {
        let _ = crate::admin_sql(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
    }
}

pub(crate) fn pg_admin_url() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn sqlite() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&StoreLocation::DataDir(dir.path().join("data"))).await.unwrap();
    Harness { store, _dir: Some(dir), pg: None }
}

async fn postgres() -> Harness {
    let admin_url = pg_admin_url();
    let name =
        format!("keygate_test_{}", keygate_core::token_format::random_base62(&OsRandom, 12).unwrap().to_lowercase());
    crate::admin_sql(&admin_url, &format!("CREATE DATABASE {name}"))
        .await
        .expect("PostgreSQL must run for the conformance suite (set KEYGATE_TEST_POSTGRES_URL)");
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("KEYGATE_TEST_POSTGRES_URL needs a database path"),
    };
    let store = open(&StoreLocation::Postgres(url)).await.unwrap();
    Harness { store, _dir: None, pg: Some(PgDatabase { admin_url, name }) }
}

fn workspace(name: &str) -> (Workspace, App) {
    let ws = Workspace { id: WorkspaceId::random(&OsRandom).unwrap(), name: name.into(), created_at: T0 };
    let app = app(&ws.id, "Default app", true);
    (ws, app)
}

fn app(ws: &WorkspaceId, name: &str, is_default: bool) -> App {
    App {
        id: AppId::random(&OsRandom).unwrap(),
        workspace_id: ws.clone(),
        name: name.into(),
        description: None,
        plan_id: None,
        is_default,
        metadata: Default::default(),
        created_at: T0,
        updated_at: T0,
        rate_limit: None,
        quota: None,
        llm_budget: None,
    }
}

fn token(ws: &WorkspaceId, app: &AppId, name: &str, created: Timestamp) -> TokenRecord {
    let pepper = Pepper::new(&[9; 32]).unwrap();
    let minted = mint(&TokenPrefix::default(), &OsRandom).unwrap();
    TokenRecord {
        id: TokenId::from_public_id(&minted.public_id),
        workspace_id: ws.clone(),
        app_id: app.clone(),
        name: name.into(),
        hash: pepper.hash(minted.secret.expose()),
        prefix: "kg".into(),
        last4: minted.last4,
        scopes: vec![Scope::parse("orders:read").unwrap()],
        state: TokenState::Active,
        expires_at: None,
        ip_allowlist: vec!["10.0.0.0/8".parse().unwrap()],
        rate_limit: Some(RateLimit { requests: 10, per_seconds: 1, burst: 5 }),
        quota: Some(Quota { requests: 1000, period: QuotaPeriod::Month }),
        metadata: json!({"team": "billing"}).as_object().cloned().unwrap(),
        created_at: created,
        updated_at: created,
        last_used_at: None,
        last_used_ip: None,
        revoked_at: None,
        revoke_reason: None,
        rotated_from: None,
        replaced_by: None,
        exposed_at: None,
        dpop_jkt: None,
        llm_budget: None,
        max_uses: None,
        version: 1,
    }
}

fn audit(ws: &WorkspaceId, action: &str, target: &str) -> NewAuditEvent {
    NewAuditEvent::new(ws, &Actor::cli(), action, target, T0).with_after(json!({"x": 1}))
}

async fn all_audit(store: &SqlStore, ws: &WorkspaceId) -> Vec<AuditEvent> {
    store.list_audit(ws, &AuditFilter::default(), &PageRequest { limit: 500, cursor: None }).await.unwrap().items
}

async fn workspaces_and_apps(h: &Harness) {
    let s = &h.store;
    let (ws, default_app) = workspace("acme");
    let got = s.ensure_workspace(&ws, &default_app).await.unwrap();
    assert_eq!(got, ws);
    // A second call with other ids finds the existing workspace and adds no second default app.
    let (again, other_default) = workspace("acme");
    assert_eq!(s.ensure_workspace(&again, &other_default).await.unwrap().id, ws.id);
    assert_eq!(s.default_app(&ws.id).await.unwrap(), default_app);
    assert_eq!(s.workspace_by_name("acme").await.unwrap().map(|w| w.id), Some(ws.id.clone()));

    let a = app(&ws.id, "Mobile", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    let page = s.list_apps(&ws.id, &PageRequest { limit: 1, cursor: None }).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let next = s.list_apps(&ws.id, &PageRequest { limit: 1, cursor: page.next_cursor.clone() }).await.unwrap();
    assert_eq!(next.items.len(), 1);
    assert_ne!(page.items[0].id, next.items[0].id);
    assert!(next.next_cursor.is_none());

    // Another workspace sees none of it.
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    assert_eq!(s.app(&ws2.id, &a.id).await.unwrap(), None);
    assert_eq!(s.list_apps(&ws2.id, &PageRequest::default()).await.unwrap().items.len(), 1);
    assert!(all_audit(s, &ws2.id).await.is_empty());

    let mut renamed = a.clone();
    renamed.name = "Mobile v2".into();
    s.update_app(&renamed, &audit(&ws.id, "app.update", a.id.as_str())).await.unwrap();
    assert_eq!(s.app(&ws.id, &a.id).await.unwrap().unwrap().name, "Mobile v2");
    let mut foreign = renamed.clone();
    foreign.workspace_id = ws2.id.clone();
    assert_eq!(s.update_app(&foreign, &audit(&ws2.id, "app.update", "x")).await.unwrap_err().kind, ErrorKind::NotFound);

    // Shared limits: stored, listed for the gateway, and a change of the route table.
    assert!(s.app_limits().await.unwrap().iter().all(|l| l.app_id != a.id));
    let before = s.routes_position().await.unwrap();
    let mut limited = renamed.clone();
    limited.rate_limit = Some(RateLimit { requests: 5, per_seconds: 60, burst: 1 });
    limited.quota = Some(Quota { requests: 100, period: QuotaPeriod::Day });
    s.update_app(&limited, &audit(&ws.id, "app.update", a.id.as_str())).await.unwrap();
    assert_eq!(s.app(&ws.id, &a.id).await.unwrap().unwrap(), limited);
    let after = s.routes_position().await.unwrap();
    assert!(after > before, "the gateway hears of it");
    let listed = s.app_limits().await.unwrap();
    let mine = listed.iter().find(|l| l.app_id == a.id).unwrap();
    assert_eq!((mine.rate_limit, mine.quota), (limited.rate_limit, limited.quota));
    let mut renamed_again = limited.clone();
    renamed_again.name = "Mobile v3".into();
    s.update_app(&renamed_again, &audit(&ws.id, "app.update", a.id.as_str())).await.unwrap();
    assert_eq!(s.routes_position().await.unwrap(), after, "a rename is no change of limits");
}

async fn token_lifecycle(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let t = token(&ws.id, &d.id, "ci", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    assert_eq!(s.token(&ws.id, &t.id).await.unwrap(), Some(t.clone()));
    assert_eq!(s.token_by_hash(&t.hash).await.unwrap().map(|x| x.id), Some(t.id.clone()));

    // Another workspace cannot see it.
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    assert_eq!(s.token(&ws2.id, &t.id).await.unwrap(), None);
    let none = s.list_tokens(&ws2.id, &TokenFilter::default(), T0, &PageRequest::default()).await.unwrap();
    assert!(none.items.is_empty());

    // Update with the right version; a stale version is refused and writes nothing.
    let mut u = t.clone();
    u.name = "ci-renamed".into();
    u.version = 2;
    s.update_token(&u, &audit(&ws.id, "token.update", t.id.as_str())).await.unwrap();
    let before = all_audit(s, &ws.id).await.len();
    let mut stale = t.clone();
    stale.name = "lost update".into();
    stale.version = 2;
    let e = s.update_token(&stale, &audit(&ws.id, "token.update", t.id.as_str())).await.unwrap_err();
    assert_eq!(e.code, "concurrent_update");
    assert_eq!(all_audit(s, &ws.id).await.len(), before, "a refused change writes no audit event");
    assert_eq!(s.token(&ws.id, &t.id).await.unwrap().unwrap().name, "ci-renamed");

    // A duplicate insert fails whole: no audit event either.
    let e = s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert_eq!(all_audit(s, &ws.id).await.len(), before);

    // Rotation writes both tokens and links them.
    let mut old = s.token(&ws.id, &t.id).await.unwrap().unwrap();
    let mut new = token(&ws.id, &d.id, "ci", T0.plus_seconds(10));
    new.rotated_from = Some(old.id.clone());
    old.replaced_by = Some(new.id.clone());
    old.expires_at = Some(T0.plus_seconds(70));
    old.version += 1;
    let new_audit = audit(&ws.id, "token.create", new.id.as_str());
    s.rotate_token(&old, &new, &audit(&ws.id, "token.rotate", t.id.as_str()), &new_audit).await.unwrap();
    let stored_old = s.token(&ws.id, &t.id).await.unwrap().unwrap();
    assert_eq!(stored_old.replaced_by, Some(new.id.clone()));
    assert_eq!(stored_old.status(T0.plus_seconds(69)), TokenStatus::Active);
    assert_eq!(stored_old.status(T0.plus_seconds(70)), TokenStatus::Expired);
    assert_eq!(s.token(&ws.id, &new.id).await.unwrap().unwrap().rotated_from, Some(t.id.clone()));

    // Filters and pagination.
    let mut suspended = token(&ws.id, &d.id, "Batch Job", T0.plus_seconds(20));
    suspended.state = TokenState::Suspended;
    s.insert_token(&suspended, &audit(&ws.id, "token.create", suspended.id.as_str())).await.unwrap();
    let at = T0.plus_seconds(100);
    let wsid = &ws.id;
    let list = |f: TokenFilter| async move {
        s.list_tokens(wsid, &f, at, &PageRequest { limit: 10, cursor: None }).await.unwrap().items
    };
    assert_eq!(list(TokenFilter::default()).await.len(), 3);
    let expired = list(TokenFilter { status: Some(TokenStatus::Expired), ..Default::default() }).await;
    assert_eq!(expired.iter().map(|t| &t.id).collect::<Vec<_>>(), vec![&t.id]);
    let active = list(TokenFilter { status: Some(TokenStatus::Active), ..Default::default() }).await;
    assert_eq!(active.iter().map(|t| &t.id).collect::<Vec<_>>(), vec![&new.id]);
    let by_name = list(TokenFilter { name_contains: Some("batch".into()), ..Default::default() }).await;
    assert_eq!(by_name.len(), 1);
    let wild = list(TokenFilter { name_contains: Some("%".into()), ..Default::default() }).await;
    assert!(wild.is_empty(), "LIKE wildcards in a search are literal");
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = s.list_tokens(&ws.id, &TokenFilter::default(), at, &PageRequest { limit: 2, cursor }).await.unwrap();
        seen.extend(p.items.into_iter().map(|t| t.id));
        cursor = p.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, vec![suspended.id.clone(), new.id.clone(), t.id.clone()], "newest first, no duplicates");
    let e = s
        .list_tokens(&ws.id, &TokenFilter::default(), at, &PageRequest { limit: 2, cursor: Some("junk".into()) })
        .await;
    assert_eq!(e.unwrap_err().code, "invalid_cursor");

    let events = all_audit(s, &ws.id).await;
    assert_eq!(events.first().map(|e| e.action.as_str()), Some("token.create"));
    let by_target = s
        .list_audit(
            &ws.id,
            &AuditFilter { target: Some(t.id.to_string()), ..Default::default() },
            &PageRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(by_target.items.len(), 3);
}

async fn change_feed(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let a = token(&ws.id, &d.id, "a", T0);
    s.insert_token(&a, &audit(&ws.id, "token.create", a.id.as_str())).await.unwrap();
    let mut expired = token(&ws.id, &d.id, "old", T0);
    expired.expires_at = Some(T0);
    s.insert_token(&expired, &audit(&ws.id, "token.create", expired.id.as_str())).await.unwrap();

    let snap = s.snapshot(T0.plus_seconds(1)).await.unwrap();
    assert_eq!(snap.tokens.iter().map(|t| &t.id).collect::<Vec<_>>(), vec![&a.id]);
    let mut signal = s.subscribe();

    let mut revoked = a.clone();
    revoked.state = TokenState::Revoked;
    revoked.version = 2;
    s.update_token(&revoked, &audit(&ws.id, "token.revoke", a.id.as_str())).await.unwrap();
    let b = token(&ws.id, &d.id, "b", T0);
    s.insert_token(&b, &audit(&ws.id, "token.create", b.id.as_str())).await.unwrap();
    assert!(signal.changed().await, "a commit wakes followers");

    let changes = s.changes_since(snap.seq, 100).await.unwrap();
    assert_eq!(changes.len(), 2);
    assert!(changes[0].seq > snap.seq && changes[1].seq > changes[0].seq);
    assert_eq!(changes[0].id, a.id);
    assert!(changes[0].record.is_none(), "a revoked token leaves the index");
    assert_eq!(changes[0].hash, a.hash, "the change names the index key");
    assert_eq!(changes[1].record.as_ref().map(|t| &t.id), Some(&b.id));
    assert_eq!(s.changes_since(changes[1].seq, 100).await.unwrap().len(), 0);
    assert_eq!(s.changes_since(snap.seq, 1).await.unwrap().len(), 1);
}

fn stored_route(ws: &WorkspaceId, id: &str, path: &str) -> StoredRoute {
    StoredRoute {
        id: id.into(),
        workspace_id: ws.clone(),
        config: json!({"id": id, "path": path, "upstream": "http://127.0.0.1:9000"}).as_object().cloned().unwrap(),
        created_at: T0,
        updated_at: T0,
    }
}

/// API-managed routes: ids unique in the instance, changed only in their workspace, every change
/// a new feed position that wakes followers and is audited in the same transaction.
async fn routes(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    assert_eq!(s.routes_position().await.unwrap(), 0);
    assert_eq!(s.list_routes().await.unwrap(), (0, vec![]));
    let mut signal = s.subscribe();

    let orders = stored_route(&ws.id, "orders", "/orders");
    s.insert_route(&orders, &audit(&ws.id, "route.create", "orders")).await.unwrap();
    assert!(signal.changed().await, "a route change wakes followers");
    let p1 = s.routes_position().await.unwrap();
    assert!(p1 > 0);
    // The id is taken in every workspace.
    let clash = stored_route(&ws2.id, "orders", "/elsewhere");
    let e = s.insert_route(&clash, &audit(&ws2.id, "route.create", "orders")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "route_exists"));
    assert_eq!(s.routes_position().await.unwrap(), p1, "a refused change takes no position");

    let mut moved = orders.clone();
    moved.config.insert("path".into(), json!("/v2/orders"));
    moved.updated_at = T0.plus_seconds(5);
    // Another workspace cannot change it.
    let mut foreign = moved.clone();
    foreign.workspace_id = ws2.id.clone();
    assert_eq!(
        s.update_route(&foreign, &audit(&ws2.id, "route.update", "orders")).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    s.update_route(&moved, &audit(&ws.id, "route.update", "orders")).await.unwrap();
    let p2 = s.routes_position().await.unwrap();
    assert!(p2 > p1);
    assert_eq!(s.route("orders").await.unwrap(), Some(moved.clone()));
    let billing = stored_route(&ws2.id, "billing", "/billing");
    s.insert_route(&billing, &audit(&ws2.id, "route.create", "billing")).await.unwrap();
    let (p3, all) = s.list_routes().await.unwrap();
    assert!(p3 > p2);
    assert_eq!(all, vec![billing.clone(), moved.clone()], "every workspace's routes, by id");

    assert!(!s.delete_route(&ws2.id, "orders", &audit(&ws2.id, "route.delete", "orders")).await.unwrap());
    assert!(s.delete_route(&ws.id, "orders", &audit(&ws.id, "route.delete", "orders")).await.unwrap());
    assert!(s.routes_position().await.unwrap() > p3, "a deletion is a change too");
    assert_eq!(s.route("orders").await.unwrap(), None);
    let actions: Vec<String> = all_audit(s, &ws.id).await.into_iter().map(|e| e.action).collect();
    for a in ["route.create", "route.update", "route.delete"] {
        assert!(actions.iter().any(|x| x == a), "{a} audited: {actions:?}");
    }
    // Token changes and route changes share the feed without disturbing each other.
    let t = token(&ws.id, &d.id, "t", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let pos = s.routes_position().await.unwrap();
    assert_eq!(s.changes_since(p3, 100).await.unwrap().len(), 1, "only the token's change is a token change");
    assert!(s.snapshot(T0).await.unwrap().seq > pos);
}

/// Workspaces: listed by name, renamed (names unique), deleted in one transaction that revokes
/// tokens (on the feed) and root keys, deletes routes and memberships, and frees the name.
async fn workspace_lifecycle(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (other, od) = workspace("beta");
    s.ensure_workspace(&other, &od).await.unwrap();
    assert_eq!(
        s.list_workspaces().await.unwrap().iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
        ["acme", "beta"]
    );
    let e = s.rename_workspace(&ws.id, "beta", &audit(&ws.id, "workspace.rename", ws.id.as_str())).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "workspace_exists"));
    s.rename_workspace(&ws.id, "acme-2", &audit(&ws.id, "workspace.rename", ws.id.as_str())).await.unwrap();
    assert_eq!(s.workspace(&ws.id).await.unwrap().unwrap().name, "acme-2");

    let t = token(&ws.id, &d.id, "t", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let key = root_key(&ws.id, "k", T0);
    s.insert_root_key(&key, &audit(&ws.id, "root_key.create", key.id.as_str())).await.unwrap();
    s.insert_route(&stored_route(&ws.id, "r1", "/r1"), &audit(&ws.id, "route.create", "r1")).await.unwrap();
    let before = s.snapshot(T0).await.unwrap().seq;
    let routes_before = s.routes_position().await.unwrap();
    let del = audit(&ws.id, "workspace.delete", ws.id.as_str());
    let e = s.delete_workspace(&ws.id, T0, false, &del).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "workspace_has_tokens"));
    assert!(s.workspace(&ws.id).await.unwrap().is_some(), "a refused deletion changes nothing");
    let done = s.delete_workspace(&ws.id, T0, true, &del).await.unwrap();
    assert_eq!((done.tokens_revoked, done.root_keys_revoked, done.routes_deleted), (1, 1, 1));
    let changes = s.changes_since(before, 10).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert!(changes[0].record.is_none(), "the revoked token leaves every index");
    assert!(s.routes_position().await.unwrap() > routes_before, "the route's deletion is on the feed");
    assert!(s.route("r1").await.unwrap().is_none());
    assert!(s.root_key_by_hash(&key.hash).await.unwrap().is_none_or(|k| k.revoked_at.is_some()));
    assert!(s.workspace(&ws.id).await.unwrap().is_none());
    assert!(s.workspace_by_name("acme-2").await.unwrap().is_none());
    assert_eq!(s.list_workspaces().await.unwrap().len(), 1);
    // The name is free again; deleting twice finds nothing.
    let (again, ad) = workspace("acme-2");
    assert_ne!(s.ensure_workspace(&again, &ad).await.unwrap().id, ws.id);
    assert_eq!(s.delete_workspace(&ws.id, T0, true, &del).await.unwrap_err().kind, ErrorKind::NotFound);
}

fn root_key(ws: &WorkspaceId, name: &str, created_at: Timestamp) -> RootKey {
    let minted = mint(&TokenPrefix::default().root_key_prefix(), &OsRandom).unwrap();
    RootKey {
        id: RootKeyId::from_public_id(&minted.public_id),
        workspace_id: ws.clone(),
        name: name.into(),
        hash: Pepper::new(&[3; 32]).unwrap().hash(minted.secret.expose()),
        last4: minted.last4,
        permissions: vec![Permission::RootKeysRead, Permission::TokensRead],
        created_at,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    }
}

/// Root keys: listed per workspace (newest first) and for the operator across workspaces, found
/// by id only in their workspace, revoked once (one audit event), expiry kept, last use moved
/// forward at most once per interval.
async fn root_key_lifecycle(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (other, od) = workspace("other");
    s.ensure_workspace(&other, &od).await.unwrap();
    let mut old = root_key(&ws.id, "old", T0);
    old.expires_at = Some(Timestamp::from_millis(T0.as_millis() + 3_600_000));
    let new = root_key(&ws.id, "new", Timestamp::from_millis(T0.as_millis() + 1));
    let theirs = root_key(&other.id, "theirs", T0);
    for k in [&old, &new, &theirs] {
        s.insert_root_key(k, &audit(&k.workspace_id, "root_key.create", k.id.as_str())).await.unwrap();
    }
    assert_eq!(s.list_root_keys(&ws.id).await.unwrap(), vec![new.clone(), old.clone()]);
    assert_eq!(s.list_root_keys(&other.id).await.unwrap(), vec![theirs.clone()]);
    assert_eq!(s.all_root_keys().await.unwrap().len(), 3);
    assert_eq!(s.root_key(&ws.id, &old.id).await.unwrap(), Some(old.clone()), "the expiry is kept");
    assert_eq!(s.root_key(&ws.id, &theirs.id).await.unwrap(), None, "another workspace's key is not found");

    // Revocation: once, with its event; the key stays (for the list and the trail).
    let at = Timestamp::from_millis(T0.as_millis() + 5_000);
    let events = all_audit(s, &ws.id).await.len();
    assert!(s.revoke_root_key(&old, at, &audit(&ws.id, "root_key.revoke", old.id.as_str())).await.unwrap());
    assert!(!s.revoke_root_key(&old, at, &audit(&ws.id, "root_key.revoke", old.id.as_str())).await.unwrap());
    assert_eq!(all_audit(s, &ws.id).await.len(), events + 1, "one event for one revocation");
    let revoked = s.root_key_by_hash(&old.hash).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(at));
    // A key of another workspace is not revoked through a record that names the wrong one.
    let mut forged = theirs.clone();
    forged.workspace_id = ws.id.clone();
    assert!(!s.revoke_root_key(&forged, at, &audit(&ws.id, "root_key.revoke", theirs.id.as_str())).await.unwrap());
    assert_eq!(s.root_key(&other.id, &theirs.id).await.unwrap().unwrap().revoked_at, None);

    // Last use: written, then not again within the interval, then again after it.
    s.touch_root_key(&new.id, at, 60_000).await.unwrap();
    assert_eq!(s.root_key(&ws.id, &new.id).await.unwrap().unwrap().last_used_at, Some(at));
    let soon = Timestamp::from_millis(at.as_millis() + 59_999);
    s.touch_root_key(&new.id, soon, 60_000).await.unwrap();
    assert_eq!(s.root_key(&ws.id, &new.id).await.unwrap().unwrap().last_used_at, Some(at));
    let later = Timestamp::from_millis(at.as_millis() + 60_000);
    s.touch_root_key(&new.id, later, 60_000).await.unwrap();
    assert_eq!(s.root_key(&ws.id, &new.id).await.unwrap().unwrap().last_used_at, Some(later));
    // Never back in time (a slow request of an earlier instant).
    s.touch_root_key(&new.id, at, 0).await.unwrap();
    assert_eq!(s.root_key(&ws.id, &new.id).await.unwrap().unwrap().last_used_at, Some(later));
}

async fn root_keys_plans_and_scopes(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let pepper = Pepper::new(&[3; 32]).unwrap();
    let minted = mint(&TokenPrefix::default().root_key_prefix(), &OsRandom).unwrap();
    let rk = RootKey {
        id: RootKeyId::from_public_id(&minted.public_id),
        workspace_id: ws.id.clone(),
        name: "ops".into(),
        hash: pepper.hash(minted.secret.expose()),
        last4: minted.last4.clone(),
        permissions: vec![Permission::TokensRead, Permission::AuditRead],
        created_at: T0,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    assert_eq!(s.credential_counts().await.unwrap(), (0, 0));
    s.insert_root_key(&rk, &audit(&ws.id, "root_key.create", rk.id.as_str())).await.unwrap();
    assert_eq!(s.credential_counts().await.unwrap(), (1, 0));
    assert_eq!(s.root_key_by_hash(&rk.hash).await.unwrap(), Some(rk.clone()));
    assert_eq!(s.root_key_by_hash(&pepper.hash("kgroot_nope")).await.unwrap(), None);

    let plan = Plan {
        id: PlanId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        name: "free".into(),
        description: Some("Starter".into()),
        scopes: vec![Scope::parse("orders:read").unwrap()],
        rate_limit: Some(RateLimit { requests: 5, per_seconds: 1, burst: 0 }),
        quota: None,
        created_at: T0,
        pricing: Some(keygate_core::billing::Pricing::new("USD", 49.0, 1000, 0.0005).unwrap()),
    };
    s.insert_plan(&plan, &audit(&ws.id, "plan.create", plan.id.as_str())).await.unwrap();
    assert_eq!(s.plan(&ws.id, &plan.id).await.unwrap(), Some(plan.clone()));
    assert_eq!(s.list_plans(&ws.id).await.unwrap(), vec![plan.clone()]);
    let mut changed = plan.clone();
    changed.scopes.push(Scope::parse("orders:write").unwrap());
    changed.quota = Some(Quota { requests: 10, period: QuotaPeriod::Day });
    s.update_plan(&changed, &audit(&ws.id, "plan.update", plan.id.as_str())).await.unwrap();
    assert_eq!(s.plan(&ws.id, &plan.id).await.unwrap(), Some(changed.clone()));
    let mut elsewhere = changed.clone();
    elsewhere.workspace_id = WorkspaceId::random(&OsRandom).unwrap();
    let err = s.update_plan(&elsewhere, &audit(&ws.id, "plan.update", plan.id.as_str())).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "a plan is changed only in its own workspace");
    s.update_plan(&plan, &audit(&ws.id, "plan.update", plan.id.as_str())).await.unwrap();

    let entry = ScopeEntry {
        workspace_id: ws.id.clone(),
        scope: Scope::parse("orders:read").unwrap(),
        description: Some("Read orders".into()),
        api: Some("orders".into()),
        created_at: T0,
    };
    s.put_scope(&entry, &audit(&ws.id, "scope.put", "orders:read")).await.unwrap();
    s.put_scope(&entry, &audit(&ws.id, "scope.put", "orders:read")).await.unwrap();
    assert_eq!(s.list_scopes(&ws.id).await.unwrap(), vec![entry.clone()]);
    assert!(s.delete_scope(&ws.id, &entry.scope, &audit(&ws.id, "scope.delete", "orders:read")).await.unwrap());
    assert!(!s.delete_scope(&ws.id, &entry.scope, &audit(&ws.id, "scope.delete", "orders:read")).await.unwrap());
}

async fn deleting_apps(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let a = app(&ws.id, "Mobile", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    let t = token(&ws.id, &a.id, "m", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    // The app is also an OAuth client, with a refresh-token family and access tokens.
    let c = oauth_client(&ws.id, &a.id);
    s.insert_oauth_client(&c, &audit(&ws.id, "oauth_client.create", &c.client_id)).await.unwrap();
    let r = refresh_token(&c, "fam_del", "rt-del", T0, 3600);
    s.insert_refresh_token(&r).await.unwrap();
    let live = access_token(&c, Some("fam_del"), "jti-del-live", T0, 600);
    let plain = access_token(&c, None, "jti-del-cc", T0, 600);
    let expired = access_token(&c, None, "jti-del-old", T0.plus_seconds(-600), 300);
    for at in [&live, &plain, &expired] {
        s.insert_access_token(at).await.unwrap();
    }
    // An access token of another app is left alone.
    let other_app = app(&ws.id, "Other", false);
    s.insert_app(&other_app, &audit(&ws.id, "app.create", other_app.id.as_str())).await.unwrap();
    let other_client = oauth_client(&ws.id, &other_app.id);
    s.insert_oauth_client(&other_client, &audit(&ws.id, "oauth_client.create", "x")).await.unwrap();
    let bystander = access_token(&other_client, None, "jti-bystander", T0, 600);
    s.insert_access_token(&bystander).await.unwrap();

    let seq = s.snapshot(T0).await.unwrap().seq;
    let before = all_audit(s, &ws.id).await.len();
    let e = s.delete_app(&ws.id, &a.id, false, T0, &audit(&ws.id, "app.delete", a.id.as_str())).await.unwrap_err();
    assert_eq!(e.code, "app_has_tokens");
    assert!(s.app(&ws.id, &a.id).await.unwrap().is_some());
    assert_eq!(all_audit(s, &ws.id).await.len(), before, "a refused change writes no audit event");
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(c.clone()), "a refused delete keeps the client");
    assert!(s.revocations_since(seq, 10).await.unwrap().is_empty());
    let now = T0.plus_seconds(1);
    s.delete_app(&ws.id, &a.id, true, now, &audit(&ws.id, "app.delete", a.id.as_str())).await.unwrap();
    assert!(s.app(&ws.id, &a.id).await.unwrap().is_none());
    assert!(s.token(&ws.id, &t.id).await.unwrap().is_none());
    let changes = s.changes_since(seq, 10).await.unwrap();
    assert!(changes.iter().any(|c| c.id == t.id && c.hash == t.hash && c.record.is_none()));

    // The client and its refresh tokens are gone; its live access tokens are revoked, on the feed.
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), None);
    assert_eq!(s.oauth_client_for_app(&ws.id, &a.id).await.unwrap(), None);
    assert_eq!(s.refresh_token(&r.hash).await.unwrap(), None);
    assert_eq!(s.use_refresh_token(&r.hash, now).await.unwrap(), RefreshUse::Invalid);
    for at in [&live, &plain] {
        assert_eq!(s.access_token(&at.jti).await.unwrap().unwrap().revoked_at, Some(now), "{}", at.jti);
    }
    assert_eq!(s.access_token(&expired.jti).await.unwrap().unwrap().revoked_at, None, "expired: nothing to revoke");
    assert_eq!(s.access_token(&bystander.jti).await.unwrap().unwrap().revoked_at, None);
    let mut feed: Vec<String> = s.revocations_since(seq, 10).await.unwrap().into_iter().map(|r| r.jti).collect();
    feed.sort();
    assert_eq!(feed, vec![plain.jti.clone(), live.jti.clone()]);
    let token_seq = changes.iter().find(|ch| ch.id == t.id).unwrap().seq;
    assert!(s.revocations_since(seq, 10).await.unwrap().iter().all(|r| r.seq != token_seq), "one position each");
    let events = all_audit(s, &ws.id).await;
    let gone = events.iter().find(|e| e.action == "oauth_client.delete").expect("the client's deletion is audited");
    assert_eq!(gone.target, c.client_id);
    assert_eq!(gone.after.as_ref().unwrap()["access_tokens_revoked"], json!(2));
    // A rotation that was in flight cannot add to the deleted app's family afterwards.
    let late = access_token(&c, Some("fam_del"), "jti-del-late", now, 600);
    assert_eq!(s.insert_access_token(&late).await.unwrap_err().code, "token_family_revoked");
    let e = s.delete_app(&ws.id, &d.id, true, T0, &audit(&ws.id, "app.delete", d.id.as_str())).await.unwrap_err();
    assert_eq!(e.code, "default_app");
    let e = s.delete_app(&ws.id, &a.id, true, T0, &audit(&ws.id, "app.delete", a.id.as_str())).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

async fn llm_usage_and_spending(h: &Harness) {
    use keygate_core::llm::{LlmStore, LlmUsage, Spending};
    let s = &h.store;
    let ws = WorkspaceId::from_trusted("ws_llm".to_owned());
    let row = |caller: &str, deployment: &str, hour: i64, n: u64| LlmUsage {
        workspace_id: ws.clone(),
        caller: caller.into(),
        app_id: "app_1".into(),
        route: "llm".into(),
        deployment: deployment.into(),
        hour,
        requests: n,
        errors: 0,
        input_tokens: 10 * n,
        output_tokens: 5 * n,
        cached_tokens: n,
        micro_usd: 100 * n,
        fallbacks: n / 2,
    };
    let h0 = 3_600_000 * 500_000;
    let spend =
        |key: &str, period: i64, m: i64| Spending { key: key.into(), route_key: 7, period_start: period, micro_usd: m };
    // Two rows of one key in one write merge; a second write adds up.
    s.record_llm(
        &[row("tok_a", "openai/gpt", h0, 1), row("tok_a", "openai/gpt", h0, 2), row("tok_a", "anthropic/c", h0, 1)],
        &[spend("aa", 100, 500), spend("aa", 100, -200), spend("bb", 100, 50), spend("aa", 50, 999)],
    )
    .await
    .unwrap();
    s.record_llm(
        &[row("tok_a", "openai/gpt", h0, 1), row("tok_b", "openai/gpt", h0 + 3_600_000, 4)],
        &[spend("aa", 100, 1)],
    )
    .await
    .unwrap();
    s.record_llm(&[], &[]).await.unwrap();
    let a = TokenId::from_trusted("tok_a".to_owned());
    let got = s.llm_usage(&ws, &a, h0, h0 + 3_600_000).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].deployment, "openai/gpt");
    assert_eq!((got[1].requests, got[1].input_tokens, got[1].output_tokens, got[1].micro_usd), (4, 40, 20, 400));
    assert_eq!(got[0], row("tok_a", "anthropic/c", h0, 1));
    assert!(s.llm_usage(&ws, &a, h0 + 3_600_000, h0 + 7_200_000).await.unwrap().is_empty());
    let other = WorkspaceId::from_trusted("ws_other".to_owned());
    assert!(s.llm_usage(&other, &a, 0, i64::MAX).await.unwrap().is_empty(), "another workspace's usage");
    let mut totals = s.llm_spending_since(100).await.unwrap();
    totals.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(totals, vec![spend("aa", 100, 301), spend("bb", 100, 50)]);
    assert_eq!(s.llm_spending_since(0).await.unwrap().len(), 3);
    // By deployment: every caller's rows of an hour added up.
    let by = s.llm_usage_by_deployment(&ws, h0, h0 + 7_200_000).await.unwrap();
    let gpt: Vec<_> = by.iter().filter(|r| r.deployment == "openai/gpt").map(|r| (r.hour, r.requests)).collect();
    assert_eq!(gpt, vec![(h0, 4), (h0 + 3_600_000, 4)]);
    assert_eq!(by.iter().map(|r| r.micro_usd).sum::<u64>(), 900);
    assert!(s.llm_usage_by_deployment(&other, 0, i64::MAX).await.unwrap().is_empty());
    // Spending per caller and route, since the month's start and the day's.
    let mut spent = s.llm_spent_since(h0, h0 + 3_600_000).await.unwrap();
    spent.sort_by(|a, b| a.caller.cmp(&b.caller));
    let got: Vec<_> = spent.iter().map(|x| (x.caller.as_str(), x.month_micro_usd, x.day_micro_usd)).collect();
    assert_eq!(got, vec![("tok_a", 500, 0), ("tok_b", 400, 400)]);
    assert_eq!(spent[0].app_id, "app_1");
    assert!(s.llm_spent_since(h0 + 7_200_000, h0 + 7_200_000).await.unwrap().is_empty());
}

async fn llm_logs(h: &Harness) {
    use keygate_core::llm::{LlmLog, LlmStore};
    let s = &h.store;
    let ws = WorkspaceId::from_trusted("ws_logs".to_owned());
    let log = |route: &str, caller: &str, at: i64, expires_at: i64| LlmLog {
        id: 0,
        workspace_id: ws.clone(),
        route: route.into(),
        caller: caller.into(),
        app_id: "app_1".into(),
        model: "fast".into(),
        deployment: "openai/gpt".into(),
        at,
        status: 200,
        request: "{\"messages\": [\"ü'\\\"\"]}".into(),
        answer: "echo".into(),
        input_tokens: 3,
        output_tokens: 2,
        micro_usd: 7,
        expires_at,
    };
    s.insert_llm_logs(&[log("llm", "tok_a", 1, 100), log("llm", "tok_b", 2, 200), log("other", "tok_a", 3, 300)])
        .await
        .unwrap();
    s.insert_llm_logs(&[]).await.unwrap();
    let all = s.llm_logs(&ws, None, None, None, 10).await.unwrap();
    assert_eq!(all.iter().map(|l| l.at).collect::<Vec<_>>(), vec![3, 2, 1], "newest first");
    assert_eq!(all[2], LlmLog { id: all[2].id, ..log("llm", "tok_a", 1, 100) }, "every field back");
    let page = s.llm_logs(&ws, None, None, Some(all[0].id), 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].at, 2, "the cursor goes on below the last id");
    assert_eq!(s.llm_logs(&ws, Some("llm"), Some("tok_a"), None, 10).await.unwrap().len(), 1);
    assert_eq!(s.llm_logs(&ws, Some("other"), None, None, 10).await.unwrap().len(), 1);
    let other = WorkspaceId::from_trusted("ws_nobody".to_owned());
    assert!(s.llm_logs(&other, None, None, None, 10).await.unwrap().is_empty());
    assert_eq!(s.trim_llm_logs(250).await.unwrap(), 2);
    assert_eq!(s.llm_logs(&ws, None, None, None, 10).await.unwrap().len(), 1);
}

async fn token_llm_budget(h: &Harness) {
    use keygate_core::llm::{LlmBudget, LlmStore};
    let s = &h.store;
    let (ws, d) = workspace("budgets");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let budget = LlmBudget::from_usd(12.5, keygate_core::policy::QuotaPeriod::Day).unwrap();
    let mut t = token(&ws.id, &d.id, "b", T0);
    t.llm_budget = Some(budget);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let other = token(&ws.id, &d.id, "none", T0);
    s.insert_token(&other, &audit(&ws.id, "token.create", other.id.as_str())).await.unwrap();
    assert_eq!(s.token(&ws.id, &t.id).await.unwrap().unwrap().llm_budget, Some(budget));
    assert_eq!(s.tokens_with_llm_budget(&ws.id).await.unwrap(), vec![(t.id.clone(), budget)]);
    let mut changed = t.clone();
    changed.llm_budget = None;
    changed.version += 1;
    s.update_token(&changed, &audit(&ws.id, "token.update", t.id.as_str())).await.unwrap();
    assert_eq!(s.token(&ws.id, &t.id).await.unwrap().unwrap().llm_budget, None);
    assert!(s.tokens_with_llm_budget(&ws.id).await.unwrap().is_empty());
}

async fn llm_providers(h: &Harness) {
    use keygate_core::llm::{LlmStore, StoredProvider};
    let s = &h.store;
    let (ws, d) = workspace("ai");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({"id": "oa", "kind": "openai", "base_url": "https://x.example"}))
            .unwrap();
    let p = StoredProvider {
        id: "oa".into(),
        workspace_id: ws.id.clone(),
        config,
        sealed_key: vec![1, 2, 3, 0, 255],
        key_fingerprint: "0123456789ab".into(),
        created_at: T0,
        updated_at: T0,
        key_rotated_at: T0,
    };
    let before = s.routes_position().await.unwrap();
    s.insert_provider(&p, &audit(&ws.id, "provider.create", "oa")).await.unwrap();
    let after = s.routes_position().await.unwrap();
    assert!(after > before, "a provider change moves the route feed position");
    assert_eq!(
        s.insert_provider(&p, &audit(&ws.id, "provider.create", "oa")).await.unwrap_err().code,
        "provider_exists"
    );
    assert_eq!(s.provider("oa").await.unwrap(), Some(p.clone()));
    assert_eq!(s.list_providers().await.unwrap(), vec![p.clone()]);
    let q = StoredProvider {
        sealed_key: vec![9; 40],
        key_fingerprint: "ba9876543210".into(),
        key_rotated_at: T0.plus_seconds(9),
        updated_at: T0.plus_seconds(9),
        ..p.clone()
    };
    s.update_provider(&q, &audit(&ws.id, "provider.rotate_key", "oa")).await.unwrap();
    assert_eq!(s.provider("oa").await.unwrap(), Some(q.clone()));
    assert!(s.routes_position().await.unwrap() > after);
    let (ws2, d2) = workspace("ai-other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let theirs = StoredProvider { workspace_id: ws2.id.clone(), ..q.clone() };
    assert_eq!(
        s.update_provider(&theirs, &audit(&ws2.id, "provider.update", "oa")).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    assert!(!s.delete_provider(&ws2.id, "oa", &audit(&ws2.id, "provider.delete", "oa")).await.unwrap());
    assert!(s.delete_provider(&ws.id, "oa", &audit(&ws.id, "provider.delete", "oa")).await.unwrap());
    assert_eq!(s.provider("oa").await.unwrap(), None);
    assert!(s.list_providers().await.unwrap().is_empty());
}

async fn usage_and_quota_counts(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let t = token(&ws.id, &d.id, "u", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let rec = UsageRecord {
        token_id: t.id.clone(),
        workspace_id: ws.id.clone(),
        route: "orders".into(),
        minute: T0,
        requests: 3,
        status: [2, 0, 1, 0],
        bytes_in: 10,
        bytes_out: 300,
        latency_us_sum: 4500,
        latency: [1, 2, 0, 0, 0, 0, 0, 0, 0, 0],
    };
    let used = LastUse { token_id: t.id.clone(), at: T0.plus_seconds(5), ip: "10.0.0.1".into() };
    let q = QuotaCount { token_id: t.id.clone(), period_start: 100, count: 3 };
    s.record_usage(std::slice::from_ref(&rec), &[used], std::slice::from_ref(&q)).await.unwrap();
    s.record_usage(std::slice::from_ref(&rec), &[], std::slice::from_ref(&q)).await.unwrap();
    let got = s.usage(&ws.id, &t.id, T0, T0.plus_seconds(60)).await.unwrap();
    let mut twice = rec.clone();
    twice.add(&rec);
    assert_eq!(got, vec![twice], "counts add up");
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    assert!(s.usage(&ws2.id, &t.id, T0, T0.plus_seconds(60)).await.unwrap().is_empty());
    let stored = s.token(&ws.id, &t.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(T0.plus_seconds(5)));
    assert_eq!(stored.last_used_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(stored.version, t.version, "usage does not conflict with admin updates");
    assert_eq!(s.quota_counts().await.unwrap(), vec![QuotaCount { count: 6, ..q.clone() }]);
    // A flush of many rows at once (several statements of many rows each) adds up too.
    let many: Vec<UsageRecord> =
        (0..1200).map(|i| UsageRecord { minute: T0.plus_seconds(60 * (i + 1)), ..rec.clone() }).collect();
    s.record_usage(&many, &[], &[]).await.unwrap();
    let all = s.usage(&ws.id, &t.id, T0, T0.plus_seconds(60 * 1300)).await.unwrap();
    assert_eq!(all.iter().map(|u| u.requests).sum::<u64>(), 6 + 1200 * 3);
    // Summed per group for reports: by token, route and app one group here; by day, each UTC day.
    let to = T0.plus_seconds(60 * 1300);
    for by in [UsageGrouping::Token, UsageGrouping::Route, UsageGrouping::App] {
        let groups = s.usage_groups(&ws.id, by, T0, to).await.unwrap();
        assert_eq!(groups.len(), 1, "{by:?}");
        assert_eq!(groups[0].1.requests, 6 + 1200 * 3, "{by:?}");
        assert_eq!(groups[0].1.status, [2 * 1202, 0, 1202, 0], "{by:?}");
        assert_eq!(groups[0].1.latency[1], 2 * 1202, "{by:?}");
    }
    for (by, expected) in
        [(UsageGrouping::Token, t.id.as_str()), (UsageGrouping::Route, "orders"), (UsageGrouping::App, d.id.as_str())]
    {
        assert_eq!(s.usage_groups(&ws.id, by, T0, to).await.unwrap()[0].0, expected);
    }
    let days = s.usage_groups(&ws.id, UsageGrouping::Day, T0, to).await.unwrap();
    let first_day = (T0.as_millis() / 86_400_000).to_string();
    assert!(days.iter().any(|(k, _)| *k == first_day), "{days:?}");
    assert_eq!(days.iter().map(|(_, u)| u.requests).sum::<u64>(), 6 + 1200 * 3);
    assert!(s.usage_groups(&ws2.id, UsageGrouping::Route, T0, to).await.unwrap().is_empty(), "tenant isolation");
    // Last uses of more tokens than one statement takes: two statements of different lengths.
    let mut uses = Vec::new();
    for i in 0..40u8 {
        let t = token(&ws.id, &d.id, &format!("lu{i}"), T0);
        s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
        uses.push(LastUse { token_id: t.id.clone(), at: T0.plus_seconds(i64::from(i) + 1), ip: format!("10.0.1.{i}") });
    }
    s.record_usage(&[], &uses, &[]).await.unwrap();
    for u in &uses {
        let stored = s.token(&ws.id, &u.token_id).await.unwrap().unwrap();
        assert_eq!((stored.last_used_at, stored.last_used_ip.as_deref()), (Some(u.at), Some(u.ip.as_str())));
    }
    s.record_usage(&[], &[], &[QuotaCount { period_start: 200, count: 1, ..q.clone() }]).await.unwrap();
    assert_eq!(
        s.quota_counts().await.unwrap(),
        vec![QuotaCount { period_start: 200, count: 1, ..q }],
        "a new period starts over"
    );
}

fn person(email: &str, at: Timestamp) -> User {
    User {
        id: UserId::random(&OsRandom).unwrap(),
        email: email.into(),
        name: email.split('@').next().unwrap_or_default().into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        totp_sealed: None,
        totp_enabled: false,
        totp_last_step: 0,
        disabled: false,
        created_at: at,
        updated_at: at,
    }
}

fn member(ws: &WorkspaceId, user: &UserId, role: Role, at: Timestamp) -> Membership {
    Membership { workspace_id: ws.clone(), user_id: user.clone(), role, created_at: at }
}

fn secret_hash(secret: &str) -> SecretHash {
    Pepper::new(&[5; 32]).unwrap().hash(secret)
}

fn session(id: &str, user: &UserId, ws: &WorkspaceId, created: Timestamp) -> Session {
    Session {
        id_hash: secret_hash(id),
        user_id: user.clone(),
        workspace_id: ws.clone(),
        pending_mfa: true,
        created_at: created,
        last_seen_at: created,
        expires_at: created.plus_seconds(12 * 3600),
        ip: Some("192.0.2.7".into()),
    }
}

fn invitation(ws: &WorkspaceId, email: &str, role: Role, code: &str, by: &UserId) -> Invitation {
    Invitation {
        id: InvitationId::random(&OsRandom).unwrap(),
        workspace_id: ws.clone(),
        email: email.into(),
        role,
        code_hash: secret_hash(code),
        invited_by: by.clone(),
        created_at: T0,
        expires_at: T0.plus_seconds(7 * 86400),
        accepted_at: None,
    }
}

/// A workspace with its first user, an owner.
async fn workspace_with_owner(s: &SqlStore, name: &str, email: &str) -> (Workspace, App, User) {
    let (ws, d) = workspace(name);
    s.ensure_workspace(&ws, &d).await.unwrap();
    let owner = person(email, T0);
    let m = member(&ws.id, &owner.id, Role::Owner, T0);
    s.insert_user(&owner, &m, &audit(&ws.id, "user.create", owner.id.as_str())).await.unwrap();
    (ws, d, owner)
}

async fn accounts_users(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    assert_eq!(s.user_count().await.unwrap(), 0, "a fresh store has no accounts");

    // The first user, their membership and the audit event are written together.
    let mut alice = person("alice@example.com", T0);
    alice.totp_sealed = Some(vec![1, 2, 3, 0, 255]);
    let m = member(&ws.id, &alice.id, Role::Owner, T0);
    s.insert_user(&alice, &m, &audit(&ws.id, "user.create", alice.id.as_str())).await.unwrap();
    assert_eq!(s.user_count().await.unwrap(), 1);
    assert_eq!(s.user(&alice.id).await.unwrap(), Some(alice.clone()));
    assert_eq!(s.user_by_email("alice@example.com").await.unwrap(), Some(alice.clone()));
    assert_eq!(s.user_by_email("Alice@example.com").await.unwrap(), None, "lookups are exact");
    assert_eq!(s.membership(&ws.id, &alice.id).await.unwrap(), Some(m.clone()));
    assert_eq!(s.memberships(&alice.id).await.unwrap(), vec![m.clone()]);
    let events = all_audit(s, &ws.id).await;
    assert_eq!(events.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), vec!["user.create"]);

    // A taken email is a conflict, and nothing of the attempt is written.
    let twin = person("alice@example.com", T0.plus_seconds(1));
    let e = s
        .insert_user(&twin, &member(&ws.id, &twin.id, Role::Viewer, T0), &audit(&ws.id, "user.create", "x"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "email_taken"));
    assert_eq!(s.user_count().await.unwrap(), 1);
    assert_eq!(s.user(&twin.id).await.unwrap(), None);
    assert_eq!(s.membership(&ws.id, &twin.id).await.unwrap(), None);
    assert_eq!(all_audit(s, &ws.id).await.len(), 1);

    // Every field but id, email and created_at is saved; the audit event is optional.
    let mut changed = alice.clone();
    changed.email = "ignored@example.com".into();
    changed.created_at = T0.plus_seconds(999);
    changed.name = "Alice A.".into();
    changed.password_hash = "$argon2id$v=19$new".into();
    changed.totp_sealed = Some(vec![9; 40]);
    changed.totp_enabled = true;
    changed.totp_last_step = 42;
    changed.disabled = true;
    changed.updated_at = T0.plus_seconds(60);
    s.update_user(&changed, Some(&audit(&ws.id, "user.update", alice.id.as_str()))).await.unwrap();
    let stored = s.user(&alice.id).await.unwrap().unwrap();
    assert_eq!(stored, User { email: alice.email.clone(), created_at: alice.created_at, ..changed.clone() });
    assert_eq!(all_audit(s, &ws.id).await.len(), 2);
    let mut cleared = stored.clone();
    cleared.totp_sealed = None;
    cleared.totp_enabled = false;
    cleared.disabled = false;
    s.update_user(&cleared, None).await.unwrap();
    assert_eq!(s.user(&alice.id).await.unwrap(), Some(cleared.clone()));
    assert_eq!(all_audit(s, &ws.id).await.len(), 2, "no audit event when none is given");
    let ghost = person("ghost@example.com", T0);
    assert_eq!(s.update_user(&ghost, None).await.unwrap_err().kind, ErrorKind::NotFound);

    // TOTP steps only move forward: a replayed or older step is refused.
    assert!(s.advance_totp_step(&alice.id, 43).await.unwrap());
    assert!(!s.advance_totp_step(&alice.id, 43).await.unwrap(), "the same step twice");
    assert!(!s.advance_totp_step(&alice.id, 40).await.unwrap(), "an older step");
    assert!(s.advance_totp_step(&alice.id, 45).await.unwrap());
    assert_eq!(s.user(&alice.id).await.unwrap().unwrap().totp_last_step, 45);
    assert!(!s.advance_totp_step(&ghost.id, 100).await.unwrap(), "an unknown user");
}

async fn accounts_recovery_codes(h: &Harness) {
    let s = &h.store;
    let (_, _, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let codes: Vec<SecretHash> = (0..3).map(|i| secret_hash(&format!("code-{i}"))).collect();
    assert_eq!(s.recovery_codes_left(&alice.id).await.unwrap(), 0);
    s.set_recovery_codes(&alice.id, &codes, T0).await.unwrap();
    assert_eq!(s.recovery_codes_left(&alice.id).await.unwrap(), 3);
    assert!(s.use_recovery_code(&alice.id, &codes[1], T0.plus_seconds(5)).await.unwrap());
    assert!(!s.use_recovery_code(&alice.id, &codes[1], T0.plus_seconds(6)).await.unwrap(), "usable once");
    assert!(!s.use_recovery_code(&alice.id, &secret_hash("unknown"), T0).await.unwrap());
    assert_eq!(s.recovery_codes_left(&alice.id).await.unwrap(), 2);

    // Another person cannot use them.
    let bob = person("bob@example.com", T0);
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    s.insert_user(&bob, &member(&ws2.id, &bob.id, Role::Owner, T0), &audit(&ws2.id, "user.create", "b")).await.unwrap();
    assert!(!s.use_recovery_code(&bob.id, &codes[0], T0).await.unwrap());

    // A new set replaces the old one, used codes included.
    let fresh: Vec<SecretHash> = (0..2).map(|i| secret_hash(&format!("fresh-{i}"))).collect();
    s.set_recovery_codes(&alice.id, &fresh, T0.plus_seconds(10)).await.unwrap();
    assert_eq!(s.recovery_codes_left(&alice.id).await.unwrap(), 2);
    assert!(!s.use_recovery_code(&alice.id, &codes[0], T0.plus_seconds(11)).await.unwrap(), "old codes are gone");
    assert!(s.use_recovery_code(&alice.id, &fresh[0], T0.plus_seconds(11)).await.unwrap());
    s.set_recovery_codes(&alice.id, &[], T0.plus_seconds(12)).await.unwrap();
    assert_eq!(s.recovery_codes_left(&alice.id).await.unwrap(), 0);
}

async fn accounts_sessions(h: &Harness) {
    let s = &h.store;
    let (ws, _, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, _, bob) = workspace_with_owner(s, "other", "bob@example.com").await;
    s.put_membership(&member(&ws2.id, &alice.id, Role::Viewer, T0), &audit(&ws2.id, "member.add", "a")).await.unwrap();

    let a1 = session("a1", &alice.id, &ws.id, T0);
    let mut a2 = session("a2", &alice.id, &ws.id, T0);
    a2.ip = None;
    let b1 = session("b1", &bob.id, &ws2.id, T0);
    for x in [&a1, &a2, &b1] {
        s.insert_session(x).await.unwrap();
    }
    assert_eq!(s.session(&a1.id_hash).await.unwrap(), Some(a1.clone()));
    assert_eq!(s.session(&a2.id_hash).await.unwrap(), Some(a2.clone()));
    assert_eq!(s.session(&secret_hash("nope")).await.unwrap(), None);
    assert_eq!(s.insert_session(&a1).await.unwrap_err().kind, ErrorKind::Conflict);

    // Only last_seen_at, pending_mfa and workspace_id change.
    let mut moved = a1.clone();
    moved.pending_mfa = false;
    moved.last_seen_at = T0.plus_seconds(30);
    moved.workspace_id = ws2.id.clone();
    moved.expires_at = T0.plus_seconds(1);
    moved.ip = Some("203.0.113.1".into());
    s.update_session(&moved).await.unwrap();
    let stored = s.session(&a1.id_hash).await.unwrap().unwrap();
    assert_eq!(stored, Session { expires_at: a1.expires_at, ip: a1.ip.clone(), ..moved.clone() });

    s.delete_session(&a2.id_hash).await.unwrap();
    assert_eq!(s.session(&a2.id_hash).await.unwrap(), None);
    s.delete_session(&a2.id_hash).await.unwrap();

    // Signing a person out everywhere leaves others signed in.
    s.delete_user_sessions(&alice.id).await.unwrap();
    assert_eq!(s.session(&a1.id_hash).await.unwrap(), None);
    assert!(s.session(&b1.id_hash).await.unwrap().is_some());

    // Purge: past the absolute end, or idle since before the cut-off.
    let mut expired = session("expired", &alice.id, &ws.id, T0);
    expired.expires_at = T0.plus_seconds(100);
    expired.last_seen_at = T0.plus_seconds(99);
    let mut idle = session("idle", &alice.id, &ws.id, T0);
    idle.last_seen_at = T0.plus_seconds(10);
    let mut active = session("active", &alice.id, &ws.id, T0);
    active.last_seen_at = T0.plus_seconds(90);
    let mut b_active = b1.clone();
    b_active.last_seen_at = T0.plus_seconds(50);
    s.update_session(&b_active).await.unwrap();
    for x in [&expired, &idle, &active] {
        s.insert_session(x).await.unwrap();
    }
    assert_eq!(s.purge_sessions(T0.plus_seconds(99), T0.plus_seconds(10)).await.unwrap(), 0, "nothing due yet");
    assert_eq!(s.purge_sessions(T0.plus_seconds(100), T0.plus_seconds(20)).await.unwrap(), 2);
    assert_eq!(s.session(&expired.id_hash).await.unwrap(), None, "absolute end reached");
    assert_eq!(s.session(&idle.id_hash).await.unwrap(), None, "idle too long");
    assert!(s.session(&active.id_hash).await.unwrap().is_some());
    assert!(s.session(&b1.id_hash).await.unwrap().is_some());
}

async fn accounts_memberships(h: &Harness) {
    let s = &h.store;
    let (ws, _, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, _, carol) = workspace_with_owner(s, "other", "carol@example.com").await;
    let bob = person("bob@example.com", T0);
    s.insert_user(&bob, &member(&ws.id, &bob.id, Role::Developer, T0.plus_seconds(1)), &audit(&ws.id, "u", "b"))
        .await
        .unwrap();
    let before = all_audit(s, &ws.id).await.len();

    // Insert, then change the role; the first created_at stays.
    let in_ws2 = member(&ws2.id, &bob.id, Role::Viewer, T0.plus_seconds(2));
    s.put_membership(&in_ws2, &audit(&ws2.id, "member.add", bob.id.as_str())).await.unwrap();
    let promoted = Membership { role: Role::Admin, created_at: T0.plus_seconds(50), ..in_ws2.clone() };
    s.put_membership(&promoted, &audit(&ws2.id, "member.role", bob.id.as_str())).await.unwrap();
    assert_eq!(s.membership(&ws2.id, &bob.id).await.unwrap(), Some(Membership { role: Role::Admin, ..in_ws2.clone() }));
    assert_eq!(
        s.memberships(&bob.id).await.unwrap().iter().map(|m| (&m.workspace_id, m.role)).collect::<Vec<_>>(),
        vec![(&ws.id, Role::Developer), (&ws2.id, Role::Admin)]
    );

    // Members come with their accounts, oldest first; each workspace sees only its own.
    let members = s.members(&ws.id).await.unwrap();
    assert_eq!(
        members.iter().map(|(m, u)| (m.role, u.id.clone())).collect::<Vec<_>>(),
        vec![(Role::Owner, alice.id.clone()), (Role::Developer, bob.id.clone())]
    );
    assert_eq!(members[1].1, bob);
    assert_eq!(members[1].0.created_at, T0.plus_seconds(1));
    let members2 = s.members(&ws2.id).await.unwrap();
    assert_eq!(members2.iter().map(|(_, u)| u.id.clone()).collect::<Vec<_>>(), vec![carol.id.clone(), bob.id.clone()]);
    assert_eq!(s.membership(&ws2.id, &alice.id).await.unwrap(), None, "tenant isolation");

    // Removal takes the person's sessions in that workspace with it, and only those.
    let here = session("here", &bob.id, &ws.id, T0);
    let there = session("there", &bob.id, &ws2.id, T0);
    let alices = session("alice", &alice.id, &ws.id, T0);
    for x in [&here, &there, &alices] {
        s.insert_session(x).await.unwrap();
    }
    assert!(s.delete_membership(&ws.id, &bob.id, &audit(&ws.id, "member.remove", bob.id.as_str())).await.unwrap());
    assert_eq!(s.membership(&ws.id, &bob.id).await.unwrap(), None);
    assert_eq!(s.session(&here.id_hash).await.unwrap(), None);
    assert!(s.session(&there.id_hash).await.unwrap().is_some());
    assert!(s.session(&alices.id_hash).await.unwrap().is_some());
    assert_eq!(s.members(&ws.id).await.unwrap().len(), 1);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    assert!(!s.delete_membership(&ws.id, &bob.id, &audit(&ws.id, "member.remove", "b")).await.unwrap());
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1, "nothing removed, nothing audited");
    // A workspace cannot remove another workspace's member.
    assert!(!s.delete_membership(&ws.id, &carol.id, &audit(&ws.id, "member.remove", "c")).await.unwrap());
    assert!(s.membership(&ws2.id, &carol.id).await.unwrap().is_some());
}

async fn accounts_invitations(h: &Harness) {
    let s = &h.store;
    let (ws, _, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, _, carol) = workspace_with_owner(s, "other", "carol@example.com").await;
    let inv = invitation(&ws.id, "dave@example.com", Role::Developer, "code-dave", &alice.id);
    s.insert_invitation(&inv, &audit(&ws.id, "invitation.create", inv.id.as_str())).await.unwrap();
    assert_eq!(s.invitation_by_code(&inv.code_hash).await.unwrap(), Some(inv.clone()));
    assert_eq!(s.invitation_by_code(&secret_hash("wrong")).await.unwrap(), None);
    assert_eq!(s.invitations(&ws.id).await.unwrap(), vec![inv.clone()]);
    assert!(s.invitations(&ws2.id).await.unwrap().is_empty(), "tenant isolation");
    let dup = Invitation { id: InvitationId::random(&OsRandom).unwrap(), ..inv.clone() };
    assert_eq!(s.insert_invitation(&dup, &audit(&ws.id, "i", "x")).await.unwrap_err().kind, ErrorKind::Conflict);

    // Accepted by a new person: the account, membership and acceptance in one transaction.
    let at = T0.plus_seconds(60);
    let dave = person("dave@example.com", at);
    let m = member(&ws.id, &dave.id, Role::Developer, at);
    let before = all_audit(s, &ws.id).await.len();
    s.accept_invitation(&inv, Some(&dave), &m, &audit(&ws.id, "invitation.accept", inv.id.as_str())).await.unwrap();
    assert_eq!(s.user(&dave.id).await.unwrap(), Some(dave.clone()));
    assert_eq!(s.membership(&ws.id, &dave.id).await.unwrap(), Some(m.clone()));
    assert_eq!(s.invitation_by_code(&inv.code_hash).await.unwrap().unwrap().accepted_at, Some(at));
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);

    // A second acceptance is refused and writes nothing.
    let eve = person("eve@example.com", at);
    let e = s
        .accept_invitation(&inv, Some(&eve), &member(&ws.id, &eve.id, Role::Developer, at), &audit(&ws.id, "a", "b"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "invitation_accepted"));
    assert_eq!(s.user(&eve.id).await.unwrap(), None);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);

    // Accepted by someone with an account already (carol, from the other workspace).
    let inv2 = invitation(&ws.id, "carol@example.com", Role::Viewer, "code-carol", &alice.id);
    s.insert_invitation(&inv2, &audit(&ws.id, "invitation.create", inv2.id.as_str())).await.unwrap();
    let m2 = member(&ws.id, &carol.id, Role::Viewer, at);
    s.accept_invitation(&inv2, None, &m2, &audit(&ws.id, "invitation.accept", inv2.id.as_str())).await.unwrap();
    assert_eq!(s.membership(&ws.id, &carol.id).await.unwrap(), Some(m2.clone()));
    assert_eq!(s.memberships(&carol.id).await.unwrap().len(), 2);
    let e = s.accept_invitation(&inv2, None, &m2, &audit(&ws.id, "a", "b")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict);

    // A new account whose email is taken: nothing is written, the invitation stays open.
    let inv3 = invitation(&ws.id, "alice@example.com", Role::Admin, "code-3", &alice.id);
    s.insert_invitation(&inv3, &audit(&ws.id, "invitation.create", inv3.id.as_str())).await.unwrap();
    let twin = person("dave@example.com", at);
    let e = s
        .accept_invitation(&inv3, Some(&twin), &member(&ws.id, &twin.id, Role::Admin, at), &audit(&ws.id, "a", "b"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "email_taken");
    assert_eq!(s.invitation_by_code(&inv3.code_hash).await.unwrap().unwrap().accepted_at, None);
    // A person already in the workspace keeps their role.
    let e = s
        .accept_invitation(&inv3, None, &member(&ws.id, &alice.id, Role::Admin, at), &audit(&ws.id, "a", "b"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "already_member"));
    assert_eq!(s.membership(&ws.id, &alice.id).await.unwrap().unwrap().role, Role::Owner);
    assert_eq!(s.invitation_by_code(&inv3.code_hash).await.unwrap().unwrap().accepted_at, None);

    // Two acceptances at once: exactly one wins.
    let inv4 = invitation(&ws.id, "frank@example.com", Role::Viewer, "code-4", &alice.id);
    s.insert_invitation(&inv4, &audit(&ws.id, "invitation.create", inv4.id.as_str())).await.unwrap();
    let (f1, f2) = (person("frank@example.com", at), person("frank2@example.com", at));
    let (m1, m2) = (member(&ws.id, &f1.id, Role::Viewer, at), member(&ws.id, &f2.id, Role::Viewer, at));
    let (a1, a2) = (audit(&ws.id, "invitation.accept", "1"), audit(&ws.id, "invitation.accept", "2"));
    let (r1, r2) =
        tokio::join!(s.accept_invitation(&inv4, Some(&f1), &m1, &a1), s.accept_invitation(&inv4, Some(&f2), &m2, &a2));
    assert!(r1.is_ok() != r2.is_ok(), "one acceptance wins: {r1:?} {r2:?}");
    let loser = r1.err().or(r2.err()).unwrap();
    assert_eq!(loser.code, "invitation_accepted");
    assert_eq!(
        u8::from(s.user(&f1.id).await.unwrap().is_some()) + u8::from(s.user(&f2.id).await.unwrap().is_some()),
        1
    );

    // Deleting: only in its own workspace, and an unknown invitation cannot be accepted.
    assert!(!s.delete_invitation(&ws2.id, &inv3.id, &audit(&ws2.id, "invitation.delete", "x")).await.unwrap());
    let before = all_audit(s, &ws.id).await.len();
    assert!(
        s.delete_invitation(&ws.id, &inv3.id, &audit(&ws.id, "invitation.delete", inv3.id.as_str())).await.unwrap()
    );
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    assert_eq!(s.invitation_by_code(&inv3.code_hash).await.unwrap(), None);
    assert!(!s.delete_invitation(&ws.id, &inv3.id, &audit(&ws.id, "invitation.delete", "x")).await.unwrap());
    let e = s
        .accept_invitation(&inv3, None, &member(&ws.id, &carol.id, Role::Admin, at), &audit(&ws.id, "a", "b"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(s.invitations(&ws.id).await.unwrap().len(), 3, "accepted invitations stay listed");
}

async fn accounts_policy_and_app_owners(h: &Harness) {
    let s = &h.store;
    let (ws, d, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, d2, carol) = workspace_with_owner(s, "other", "carol@example.com").await;

    assert_eq!(s.workspace_policy(&ws.id).await.unwrap(), WorkspacePolicy::default());
    let p = WorkspacePolicy {
        max_token_lifetime_days: Some(90),
        require_two_factor: true,
        plan_changes_need_approval: true,
        exposure_action: keygate_core::account::ExposureAction::Suspend,
        max_token_age_days: Some(90),
        suspend_unrotated: true,
        anomaly_suspend: Some(keygate_core::anomaly::Severity::High),
        rules: keygate_core::account::TokenRules {
            require_expiry: true,
            allowlist_required_for: vec![Scope::parse("payments:*").unwrap()],
            max_active_tokens_per_app: Some(5),
            deny: vec!["203.0.113.0/24".into()],
            ..Default::default()
        },
        api_publish_needs_approval: true,
    };
    let before = s.routes_position().await.unwrap();
    s.put_workspace_policy(&ws.id, &p, &audit(&ws.id, "workspace.policy", ws.id.as_str())).await.unwrap();
    assert_eq!(s.workspace_policy(&ws.id).await.unwrap(), p);
    assert!(s.routes_position().await.unwrap() > before, "a new denylist is a change of the route table");
    assert_eq!(s.workspace_denylists().await.unwrap(), vec![(ws.id.clone(), vec!["203.0.113.0/24".to_owned()])]);
    assert_eq!(s.workspace_policy(&ws2.id).await.unwrap(), WorkspacePolicy::default(), "tenant isolation");
    let p2 = WorkspacePolicy { max_token_lifetime_days: None, require_two_factor: false, ..p.clone() };
    s.put_workspace_policy(&ws.id, &p2, &audit(&ws.id, "workspace.policy", ws.id.as_str())).await.unwrap();
    assert_eq!(s.workspace_policy(&ws.id).await.unwrap(), p2);
    assert!(s.workspace_policy(&ws.id).await.unwrap().plan_changes_need_approval, "the flag is kept on its own");
    let p3 = WorkspacePolicy {
        plan_changes_need_approval: false,
        exposure_action: keygate_core::account::ExposureAction::Notify,
        max_token_age_days: None,
        suspend_unrotated: false,
        anomaly_suspend: None,
        rules: Default::default(),
        api_publish_needs_approval: false,
        ..p2.clone()
    };
    s.put_workspace_policy(&ws.id, &p3, &audit(&ws.id, "workspace.policy", ws.id.as_str())).await.unwrap();
    assert_eq!(s.workspace_policy(&ws.id).await.unwrap(), p3);
    assert_eq!(s.workspace_policy(&ws.id).await.unwrap(), WorkspacePolicy::default());
    assert_eq!(all_audit(s, &ws.id).await.iter().filter(|e| e.action == "workspace.policy").count(), 3);

    let a = app(&ws.id, "Mobile", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    assert_eq!(s.app_owner(&ws.id, &a.id).await.unwrap(), None);
    s.set_app_owner(&ws.id, &a.id, &alice.id).await.unwrap();
    s.set_app_owner(&ws.id, &d.id, &alice.id).await.unwrap();
    assert_eq!(s.app_owner(&ws.id, &a.id).await.unwrap(), Some(alice.id.clone()));
    let mut owned = vec![a.id.clone(), d.id.clone()];
    owned.sort();
    assert_eq!(s.owned_apps(&ws.id, &alice.id).await.unwrap(), owned);

    // Another workspace sees no owner and cannot set one for this workspace's app.
    assert_eq!(s.app_owner(&ws2.id, &a.id).await.unwrap(), None);
    assert!(s.owned_apps(&ws2.id, &alice.id).await.unwrap().is_empty());
    let e = s.set_app_owner(&ws2.id, &a.id, &carol.id).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(s.app_owner(&ws.id, &a.id).await.unwrap(), Some(alice.id.clone()));
    s.set_app_owner(&ws2.id, &d2.id, &carol.id).await.unwrap();
    assert_eq!(s.owned_apps(&ws2.id, &carol.id).await.unwrap(), vec![d2.id.clone()]);
    assert!(s.owned_apps(&ws.id, &carol.id).await.unwrap().is_empty());

    // A new owner replaces the old one; deleting an owned app drops its owner.
    let bob = person("bob@example.com", T0);
    s.insert_user(&bob, &member(&ws.id, &bob.id, Role::Developer, T0), &audit(&ws.id, "u", "b")).await.unwrap();
    s.set_app_owner(&ws.id, &a.id, &bob.id).await.unwrap();
    assert_eq!(s.app_owner(&ws.id, &a.id).await.unwrap(), Some(bob.id.clone()));
    assert_eq!(s.owned_apps(&ws.id, &alice.id).await.unwrap(), vec![d.id.clone()]);
    s.delete_app(&ws.id, &a.id, false, T0, &audit(&ws.id, "app.delete", a.id.as_str())).await.unwrap();
    assert_eq!(s.app_owner(&ws.id, &a.id).await.unwrap(), None);
    assert!(s.owned_apps(&ws.id, &bob.id).await.unwrap().is_empty());
}

async fn audit_append(h: &Harness) {
    let s = &h.store;
    let (ws, _, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, _, _) = workspace_with_owner(s, "other", "carol@example.com").await;
    let before = all_audit(s, &ws.id).await.len();
    let ev = NewAuditEvent::new(&ws.id, &Actor::cli(), "user.sign_in", alice.id.as_str(), T0.plus_seconds(5))
        .with_after(json!({"ip": "192.0.2.7"}));
    s.append_audit(&ev).await.unwrap();
    let events = all_audit(s, &ws.id).await;
    assert_eq!(events.len(), before + 1);
    let got = &events[0];
    assert_eq!(
        (got.workspace_id.clone(), got.at, got.action.as_str(), got.target.as_str(), got.after.clone()),
        (ws.id.clone(), T0.plus_seconds(5), "user.sign_in", alice.id.as_str(), Some(json!({"ip": "192.0.2.7"})))
    );
    let by_action = s
        .list_audit(
            &ws.id,
            &AuditFilter { action: Some("user.sign_in".into()), ..Default::default() },
            &PageRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(by_action.items.len(), 1);
    assert!(all_audit(s, &ws2.id).await.iter().all(|e| e.action != "user.sign_in"), "tenant isolation");
}

fn plan(ws: &WorkspaceId, name: &str) -> Plan {
    Plan {
        id: PlanId::random(&OsRandom).unwrap(),
        workspace_id: ws.clone(),
        name: name.into(),
        description: None,
        scopes: vec![Scope::parse("orders:read").unwrap()],
        rate_limit: None,
        quota: None,
        created_at: T0,
        pricing: None,
    }
}

fn plan_request(ws: &WorkspaceId, app: &AppId, plan: &PlanId, by: &UserId, at: Timestamp) -> PlanRequest {
    PlanRequest {
        id: PlanRequestId::random(&OsRandom).unwrap(),
        workspace_id: ws.clone(),
        app_id: app.clone(),
        plan_id: plan.clone(),
        requested_by: by.clone(),
        note: Some("we need more requests".into()),
        status: PlanRequestStatus::Pending,
        created_at: at,
        decided_by: None,
        decided_at: None,
    }
}

async fn accounts_plan_requests(h: &Harness) {
    let s = &h.store;
    let (ws, d, alice) = workspace_with_owner(s, "acme", "alice@example.com").await;
    let (ws2, d2, carol) = workspace_with_owner(s, "other", "carol@example.com").await;
    let bob = person("bob@example.com", T0);
    s.insert_user(&bob, &member(&ws.id, &bob.id, Role::Developer, T0), &audit(&ws.id, "u", "b")).await.unwrap();
    let a = app(&ws.id, "Mobile", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    let (pro, pro2) = (plan(&ws.id, "pro"), plan(&ws2.id, "pro"));
    s.insert_plan(&pro, &audit(&ws.id, "plan.create", pro.id.as_str())).await.unwrap();
    s.insert_plan(&pro2, &audit(&ws2.id, "plan.create", pro2.id.as_str())).await.unwrap();

    // Inserted with their audit events, read back whole.
    let before = all_audit(s, &ws.id).await.len();
    let r1 = plan_request(&ws.id, &a.id, &pro.id, &bob.id, T0);
    let r2 = PlanRequest { note: None, ..plan_request(&ws.id, &a.id, &pro.id, &bob.id, T0.plus_seconds(10)) };
    let r3 = plan_request(&ws.id, &d.id, &pro.id, &alice.id, T0.plus_seconds(20));
    for r in [&r1, &r2, &r3] {
        s.insert_plan_request(r, &audit(&ws.id, "plan_request.create", r.id.as_str())).await.unwrap();
    }
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 3);
    assert_eq!(s.plan_request(&ws.id, &r1.id).await.unwrap(), Some(r1.clone()));
    assert_eq!(s.plan_request(&ws.id, &r2.id).await.unwrap(), Some(r2.clone()));
    assert_eq!(s.plan_request(&ws.id, &PlanRequestId::random(&OsRandom).unwrap()).await.unwrap(), None);
    let dup = s.insert_plan_request(&r1, &audit(&ws.id, "plan_request.create", "dup")).await.unwrap_err();
    assert_eq!(dup.kind, ErrorKind::Conflict);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 3, "a refused insert writes no audit event");

    // Another workspace's app or plan cannot be requested.
    let foreign_plan = plan_request(&ws.id, &a.id, &pro2.id, &bob.id, T0);
    let e = s.insert_plan_request(&foreign_plan, &audit(&ws.id, "x", "y")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "plan_not_found"));
    let foreign_app = plan_request(&ws.id, &d2.id, &pro.id, &bob.id, T0);
    let e = s.insert_plan_request(&foreign_app, &audit(&ws.id, "x", "y")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "app_not_found"));
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 3);

    // Newest first, with and without a status filter.
    let ids = |v: Vec<PlanRequest>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let all = vec![r3.id.clone(), r2.id.clone(), r1.id.clone()];
    assert_eq!(ids(s.plan_requests(&ws.id, None).await.unwrap()), all);
    assert_eq!(ids(s.plan_requests(&ws.id, Some(PlanRequestStatus::Pending)).await.unwrap()), all);
    assert!(s.plan_requests(&ws.id, Some(PlanRequestStatus::Approved)).await.unwrap().is_empty());

    // Another workspace sees none of them and cannot decide them.
    assert_eq!(s.plan_request(&ws2.id, &r1.id).await.unwrap(), None);
    assert!(s.plan_requests(&ws2.id, None).await.unwrap().is_empty());
    let e = s
        .decide_plan_request(&ws2.id, &r1.id, PlanRequestStatus::Approved, &carol.id, T0, &audit(&ws2.id, "x", "y"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "not_found"));
    assert_eq!(s.plan_request(&ws.id, &r1.id).await.unwrap(), Some(r1.clone()));

    // Decided once, with its audit event; a second decision is refused and writes nothing.
    let at = T0.plus_seconds(60);
    let before = all_audit(s, &ws.id).await.len();
    let ev = audit(&ws.id, "plan_request.approve", r2.id.as_str());
    s.decide_plan_request(&ws.id, &r2.id, PlanRequestStatus::Approved, &alice.id, at, &ev).await.unwrap();
    let decided = PlanRequest {
        status: PlanRequestStatus::Approved,
        decided_by: Some(alice.id.clone()),
        decided_at: Some(at),
        ..r2.clone()
    };
    assert_eq!(s.plan_request(&ws.id, &r2.id).await.unwrap(), Some(decided.clone()));
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    let e = s
        .decide_plan_request(
            &ws.id,
            &r2.id,
            PlanRequestStatus::Denied,
            &bob.id,
            at.plus_seconds(1),
            &audit(&ws.id, "plan_request.deny", r2.id.as_str()),
        )
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "already_decided"));
    assert_eq!(s.plan_request(&ws.id, &r2.id).await.unwrap(), Some(decided.clone()));
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    let unknown = PlanRequestId::random(&OsRandom).unwrap();
    let e = s
        .decide_plan_request(&ws.id, &unknown, PlanRequestStatus::Denied, &alice.id, at, &audit(&ws.id, "x", "y"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "not_found"));
    let e = s
        .decide_plan_request(&ws.id, &r1.id, PlanRequestStatus::Pending, &alice.id, at, &audit(&ws.id, "x", "y"))
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::InvalidInput, "invalid_decision"));
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);

    // Two decisions at once: exactly one wins.
    let (e1, e2) = (audit(&ws.id, "plan_request.approve", "1"), audit(&ws.id, "plan_request.deny", "2"));
    let (x, y) = tokio::join!(
        s.decide_plan_request(&ws.id, &r3.id, PlanRequestStatus::Approved, &alice.id, at, &e1),
        s.decide_plan_request(&ws.id, &r3.id, PlanRequestStatus::Denied, &alice.id, at, &e2),
    );
    assert!(x.is_ok() != y.is_ok(), "one decision wins: {x:?} {y:?}");
    assert_eq!(x.err().or(y.err()).unwrap().code, "already_decided");
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 2);

    let status_of = |v: Vec<PlanRequest>| v.into_iter().map(|r| (r.id, r.status)).collect::<Vec<_>>();
    let r3_status = s.plan_request(&ws.id, &r3.id).await.unwrap().unwrap().status;
    assert_eq!(
        status_of(s.plan_requests(&ws.id, None).await.unwrap()),
        vec![
            (r3.id.clone(), r3_status),
            (r2.id.clone(), PlanRequestStatus::Approved),
            (r1.id.clone(), PlanRequestStatus::Pending)
        ]
    );
    assert_eq!(ids(s.plan_requests(&ws.id, Some(PlanRequestStatus::Pending)).await.unwrap()), vec![r1.id.clone()]);
    let approved = ids(s.plan_requests(&ws.id, Some(PlanRequestStatus::Approved)).await.unwrap());
    let denied = ids(s.plan_requests(&ws.id, Some(PlanRequestStatus::Denied)).await.unwrap());
    if r3_status == PlanRequestStatus::Approved {
        assert_eq!((approved, denied), (vec![r3.id.clone(), r2.id.clone()], vec![]));
    } else {
        assert_eq!((approved, denied), (vec![r2.id.clone()], vec![r3.id.clone()]));
    }

    // Deleting an app with requests takes its requests with it, and only its own.
    s.delete_app(&ws.id, &a.id, false, T0, &audit(&ws.id, "app.delete", a.id.as_str())).await.unwrap();
    assert!(s.app(&ws.id, &a.id).await.unwrap().is_none());
    assert_eq!(s.plan_request(&ws.id, &r1.id).await.unwrap(), None);
    assert_eq!(s.plan_request(&ws.id, &r2.id).await.unwrap(), None);
    assert_eq!(ids(s.plan_requests(&ws.id, None).await.unwrap()), vec![r3.id.clone()]);
}

fn oauth_client(ws: &WorkspaceId, app: &AppId) -> OAuthClient {
    OAuthClient {
        client_id: format!("cl_{}", keygate_core::token_format::random_base62(&OsRandom, 16).unwrap()),
        workspace_id: ws.clone(),
        app_id: app.clone(),
        grant_types: vec![GrantType::ClientCredentials, GrantType::RefreshToken],
        scopes: vec![Scope::parse("orders:read").unwrap()],
        auth_method: ClientAuthMethod::ClientSecretBasic,
        secret_hash: Some(secret_hash("client-secret-1")),
        secret_last4: Some("et-1".into()),
        previous_secret_hash: None,
        previous_secret_expires_at: None,
        jwks: None,
        access_token_format: AccessTokenFormat::Jwt,
        signing_alg: "EdDSA".into(),
        access_token_ttl_seconds: 300,
        refresh_token_ttl_seconds: 86_400,
        exchange_subject_apps: Vec::new(),
        suspended_at: None,
        suspended_reason: None,
        created_at: T0,
        updated_at: T0,
        version: 1,
    }
}

fn refresh_token(c: &OAuthClient, family: &str, secret: &str, created: Timestamp, ttl: i64) -> RefreshTokenRecord {
    RefreshTokenRecord {
        hash: secret_hash(secret),
        family_id: family.into(),
        client_id: c.client_id.clone(),
        workspace_id: c.workspace_id.clone(),
        app_id: c.app_id.clone(),
        subject: c.client_id.clone(),
        scopes: c.scopes.clone(),
        dpop_jkt: Some("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into()),
        created_at: created,
        expires_at: created.plus_seconds(ttl),
        used_at: None,
        revoked_at: None,
    }
}

fn access_token(c: &OAuthClient, family: Option<&str>, jti: &str, issued: Timestamp, ttl: i64) -> AccessTokenRecord {
    AccessTokenRecord {
        jti: jti.into(),
        client_id: c.client_id.clone(),
        workspace_id: c.workspace_id.clone(),
        app_id: c.app_id.clone(),
        family_id: family.map(Into::into),
        subject: c.client_id.clone(),
        scopes: c.scopes.clone(),
        dpop_jkt: None,
        issued_at: issued,
        expires_at: issued.plus_seconds(ttl),
        revoked_at: None,
    }
}

/// A workspace with a second app that is an OAuth client.
async fn oauth_setup(s: &SqlStore, name: &str) -> (Workspace, App, OAuthClient) {
    let (ws, d) = workspace(name);
    s.ensure_workspace(&ws, &d).await.unwrap();
    let a = app(&ws.id, "Service", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    let c = oauth_client(&ws.id, &a.id);
    s.insert_oauth_client(&c, &audit(&ws.id, "oauth_client.create", &c.client_id)).await.unwrap();
    (ws, a, c)
}

async fn oauth_clients(h: &Harness) {
    let s = &h.store;
    let (ws, a, c) = oauth_setup(s, "acme").await;
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(c.clone()));
    assert_eq!(s.oauth_client_for_app(&ws.id, &a.id).await.unwrap(), Some(c.clone()));
    assert_eq!(s.oauth_client_for_app(&ws2.id, &a.id).await.unwrap(), None, "tenant isolation");
    assert_eq!(s.oauth_client("cl_unknown").await.unwrap(), None);
    let created = all_audit(s, &ws.id).await;
    assert_eq!(created[0].action, "oauth_client.create");
    assert!(all_audit(s, &ws2.id).await.is_empty());

    // A private_key_jwt client: no secret, a JWK Set, every grant, opaque tokens.
    let b = app(&ws.id, "Batch", false);
    s.insert_app(&b, &audit(&ws.id, "app.create", b.id.as_str())).await.unwrap();
    let jwt_client = OAuthClient {
        grant_types: GrantType::ALL.to_vec(),
        auth_method: ClientAuthMethod::PrivateKeyJwt,
        secret_hash: None,
        secret_last4: None,
        jwks: Some(
            json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "k1"}]}),
        ),
        access_token_format: AccessTokenFormat::Opaque,
        signing_alg: "ES256".into(),
        exchange_subject_apps: vec![a.id.clone()],
        ..oauth_client(&ws.id, &b.id)
    };
    s.insert_oauth_client(&jwt_client, &audit(&ws.id, "oauth_client.create", &jwt_client.client_id)).await.unwrap();
    assert_eq!(s.oauth_client(&jwt_client.client_id).await.unwrap(), Some(jwt_client.clone()));

    // One client per app; another workspace's app cannot get one. Neither refusal is audited.
    let before = all_audit(s, &ws.id).await.len();
    let twin = oauth_client(&ws.id, &a.id);
    let e = s.insert_oauth_client(&twin, &audit(&ws.id, "oauth_client.create", &twin.client_id)).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "oauth_client_exists"));
    let foreign = oauth_client(&ws.id, &d2.id);
    let e = s.insert_oauth_client(&foreign, &audit(&ws.id, "oauth_client.create", "x")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "app_not_found"));
    assert_eq!(all_audit(s, &ws.id).await.len(), before, "a refused change writes no audit event");
    assert_eq!(s.oauth_client(&twin.client_id).await.unwrap(), None);
    assert_eq!(s.oauth_client(&foreign.client_id).await.unwrap(), None);

    // A secret rotation with a grace period, under the version rule.
    let mut rotated = c.clone();
    rotated.previous_secret_hash = c.secret_hash;
    rotated.previous_secret_expires_at = Some(T0.plus_seconds(3600));
    rotated.secret_hash = Some(secret_hash("client-secret-2"));
    rotated.secret_last4 = Some("et-2".into());
    rotated.scopes.push(Scope::parse("orders:write").unwrap());
    rotated.access_token_ttl_seconds = 60;
    rotated.exchange_subject_apps = vec![b.id.clone()];
    rotated.updated_at = T0.plus_seconds(10);
    rotated.version = 2;
    s.update_oauth_client(&rotated, &audit(&ws.id, "oauth_client.rotate_secret", &c.client_id)).await.unwrap();
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(rotated.clone()));
    let before = all_audit(s, &ws.id).await.len();
    let mut stale = c.clone();
    stale.grant_types = vec![GrantType::TokenExchange];
    stale.version = 2;
    let e = s.update_oauth_client(&stale, &audit(&ws.id, "oauth_client.update", &c.client_id)).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "concurrent_update"));
    let mut elsewhere = rotated.clone();
    elsewhere.workspace_id = ws2.id.clone();
    elsewhere.version = 3;
    let e = s.update_oauth_client(&elsewhere, &audit(&ws2.id, "oauth_client.update", "x")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "oauth_client_not_found"));
    assert_eq!(all_audit(s, &ws.id).await.len(), before, "a refused change writes no audit event");
    assert!(all_audit(s, &ws2.id).await.is_empty());
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(rotated.clone()));

    // Two updates from the same read: exactly one wins.
    let (mut x, mut y) = (rotated.clone(), rotated.clone());
    (x.version, y.version) = (3, 3);
    x.signing_alg = "ES256".into();
    y.access_token_format = AccessTokenFormat::Opaque;
    let (ex, ey) = (audit(&ws.id, "oauth_client.update", "x"), audit(&ws.id, "oauth_client.update", "y"));
    let (rx, ry) = tokio::join!(s.update_oauth_client(&x, &ex), s.update_oauth_client(&y, &ey));
    assert!(rx.is_ok() != ry.is_ok(), "one update wins: {rx:?} {ry:?}");
    assert_eq!(rx.err().or(ry.err()).unwrap().code, "concurrent_update");
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    let stored = s.oauth_client(&c.client_id).await.unwrap().unwrap();
    assert!(stored == x || stored == y);
}

fn signing_key(kid: &str, created: Timestamp) -> SigningKeyRecord {
    SigningKeyRecord {
        kid: kid.into(),
        alg: "EdDSA".into(),
        public_jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": kid}),
        sealed_private: vec![0, 1, 2, 255, 254, 7],
        created_at: created,
        signs_from: created.plus_seconds(3600),
        retired_at: None,
        drop_after: None,
    }
}

async fn oauth_signing_keys(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    assert!(s.signing_keys().await.unwrap().is_empty());
    let (old, new) = (signing_key("k-old", T0), signing_key("k-new", T0.plus_seconds(86_400)));
    // Inserted newest first, listed oldest first.
    s.insert_signing_key(&new, &audit(&ws.id, "signing_key.create", &new.kid)).await.unwrap();
    s.insert_signing_key(&old, &audit(&ws.id, "signing_key.create", &old.kid)).await.unwrap();
    assert_eq!(s.signing_keys().await.unwrap(), vec![old.clone(), new.clone()]);
    assert_eq!(all_audit(s, &ws.id).await.len(), 2);

    let e = s.insert_signing_key(&old, &audit(&ws.id, "signing_key.create", &old.kid)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert_eq!(all_audit(s, &ws.id).await.len(), 2, "a refused change writes no audit event");

    // Retiring writes retired_at and drop_after only.
    let mut retired = old.clone();
    retired.retired_at = Some(T0.plus_seconds(86_400 + 3600));
    retired.drop_after = Some(T0.plus_seconds(86_400 + 7200));
    let mut tampered = retired.clone();
    tampered.alg = "ES256".into();
    tampered.sealed_private = vec![9];
    s.update_signing_key(&tampered, &audit(&ws.id, "signing_key.retire", &old.kid)).await.unwrap();
    assert_eq!(s.signing_keys().await.unwrap(), vec![retired.clone(), new.clone()]);
    let ghost = signing_key("k-ghost", T0);
    let e = s.update_signing_key(&ghost, &audit(&ws.id, "signing_key.retire", "k-ghost")).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "signing_key_not_found"));
    assert_eq!(all_audit(s, &ws.id).await.len(), 3);

    // A key leaves once its drop_after has passed, not before.
    let drop_at = retired.drop_after.unwrap();
    assert_eq!(s.delete_signing_keys_dropped_before(drop_at).await.unwrap(), 0);
    assert_eq!(s.delete_signing_keys_dropped_before(drop_at.plus_seconds(1)).await.unwrap(), 1);
    assert_eq!(s.signing_keys().await.unwrap(), vec![new.clone()]);
    assert_eq!(s.delete_signing_keys_dropped_before(drop_at.plus_seconds(1_000_000)).await.unwrap(), 0);
}

async fn oauth_refresh_rotation(h: &Harness) {
    let s = &h.store;
    let (ws, _, c) = oauth_setup(s, "acme").await;
    let r1 = refresh_token(&c, "fam_a", "rt-1", T0, 3600);
    s.insert_refresh_token(&r1).await.unwrap();
    assert_eq!(s.refresh_token(&r1.hash).await.unwrap(), Some(r1.clone()));
    assert_eq!(s.refresh_token(&secret_hash("rt-unknown")).await.unwrap(), None);
    let e = s.insert_refresh_token(&r1).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "a hash is stored once");

    // First use: fresh, and marked used. Second use: reuse, with the record.
    let used = RefreshTokenRecord { used_at: Some(T0.plus_seconds(1)), ..r1.clone() };
    assert_eq!(s.use_refresh_token(&r1.hash, T0.plus_seconds(1)).await.unwrap(), RefreshUse::Fresh(used.clone()));
    assert_eq!(s.use_refresh_token(&r1.hash, T0.plus_seconds(2)).await.unwrap(), RefreshUse::Reused(used.clone()));
    assert_eq!(s.refresh_token(&r1.hash).await.unwrap(), Some(used.clone()));
    assert!(!used.is_active(T0.plus_seconds(2)));
    // Its successor joins the family, and rotates in turn.
    let r2 = refresh_token(&c, "fam_a", "rt-2", T0.plus_seconds(1), 3600);
    s.insert_refresh_token(&r2).await.unwrap();
    assert!(matches!(s.use_refresh_token(&r2.hash, T0.plus_seconds(3)).await.unwrap(), RefreshUse::Fresh(_)));
    // A used token is still recognized as reused after it expires (until pruned).
    assert!(matches!(s.use_refresh_token(&r1.hash, T0.plus_seconds(7200)).await.unwrap(), RefreshUse::Reused(_)));

    // Unknown and expired tokens are invalid; an expired one is not marked used.
    assert_eq!(s.use_refresh_token(&secret_hash("rt-unknown"), T0).await.unwrap(), RefreshUse::Invalid);
    let short = refresh_token(&c, "fam_b", "rt-short", T0, 10);
    s.insert_refresh_token(&short).await.unwrap();
    assert_eq!(s.use_refresh_token(&short.hash, T0.plus_seconds(10)).await.unwrap(), RefreshUse::Invalid);
    assert_eq!(s.refresh_token(&short.hash).await.unwrap().unwrap().used_at, None);

    // Revoked tokens are invalid, used or not, and a revoked family takes no new token.
    let before = all_audit(s, &ws.id).await.len();
    let r3 = refresh_token(&c, "fam_a", "rt-3", T0.plus_seconds(3), 3600);
    s.insert_refresh_token(&r3).await.unwrap();
    let at = T0.plus_seconds(4);
    assert_eq!(s.revoke_token_family("fam_a", at, &audit(&ws.id, "oauth.family_revoke", "fam_a")).await.unwrap(), 0);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1, "refresh tokens revoked: audited");
    for r in [&r1, &r2, &r3] {
        assert_eq!(s.refresh_token(&r.hash).await.unwrap().unwrap().revoked_at, Some(at));
        assert_eq!(s.use_refresh_token(&r.hash, at).await.unwrap(), RefreshUse::Invalid);
    }
    let r4 = refresh_token(&c, "fam_a", "rt-4", at, 3600);
    let e = s.insert_refresh_token(&r4).await.unwrap_err();
    assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "token_family_revoked"));
    assert_eq!(s.refresh_token(&r4.hash).await.unwrap(), None);
    let a4 = access_token(&c, Some("fam_a"), "jti-late", at, 300);
    assert_eq!(s.insert_access_token(&a4).await.unwrap_err().code, "token_family_revoked");
    assert_eq!(s.access_token("jti-late").await.unwrap(), None);
    // Revoking it again finds nothing: no audit event.
    assert_eq!(s.revoke_token_family("fam_a", at, &audit(&ws.id, "oauth.family_revoke", "fam_a")).await.unwrap(), 0);
    assert_eq!(s.revoke_token_family("fam_nope", at, &audit(&ws.id, "x", "y")).await.unwrap(), 0);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1, "a revocation that finds nothing is not audited");
    // Other families are untouched.
    assert_eq!(s.refresh_token(&short.hash).await.unwrap().unwrap().revoked_at, None);
}

async fn oauth_refresh_concurrent_use(h: &Harness) {
    let s = &h.store;
    let (ws, _, c) = oauth_setup(s, "acme").await;
    for i in 0..10 {
        let r = refresh_token(&c, &format!("fam_{i}"), &format!("rt-race-{i}"), T0, 3600);
        s.insert_refresh_token(&r).await.unwrap();
        let now = T0.plus_seconds(5);
        let (x, y) = tokio::join!(s.use_refresh_token(&r.hash, now), s.use_refresh_token(&r.hash, now));
        let (x, y) = (x.unwrap(), y.unwrap());
        let fresh = [&x, &y].iter().filter(|u| matches!(u, RefreshUse::Fresh(_))).count();
        let reused = [&x, &y].iter().filter(|u| matches!(u, RefreshUse::Reused(_))).count();
        assert_eq!((fresh, reused), (1, 1), "exactly one use is fresh: {x:?} {y:?}");
    }

    // A rotation racing with its family's revocation either lands first (and is revoked with
    // the family) or is refused: never a live token in a revoked family.
    for i in 0..10 {
        let family = format!("fam_rev_{i}");
        let r = refresh_token(&c, &family, &format!("rt-rev-{i}"), T0, 3600);
        s.insert_refresh_token(&r).await.unwrap();
        let next = refresh_token(&c, &family, &format!("rt-rev-next-{i}"), T0, 3600);
        let ev = audit(&ws.id, "oauth.family_revoke", &family);
        let (ins, rev) = tokio::join!(s.insert_refresh_token(&next), s.revoke_token_family(&family, T0, &ev));
        rev.unwrap();
        match ins {
            Ok(()) => assert_eq!(s.refresh_token(&next.hash).await.unwrap().unwrap().revoked_at, Some(T0)),
            Err(e) => assert_eq!(e.code, "token_family_revoked"),
        }
        assert_eq!(s.use_refresh_token(&next.hash, T0).await.unwrap(), RefreshUse::Invalid);
    }
}

async fn oauth_access_tokens_and_revocations(h: &Harness) {
    let s = &h.store;
    let (ws, d, c) = oauth_setup(s, "acme").await;
    let now = T0.plus_seconds(60);
    let r = refresh_token(&c, "fam_x", "rt-x", T0, 3600);
    s.insert_refresh_token(&r).await.unwrap();
    let fam: Vec<AccessTokenRecord> =
        (0..3).map(|i| access_token(&c, Some("fam_x"), &format!("jti-fam-{i}"), T0, 600 + i)).collect();
    let fam_expired = access_token(&c, Some("fam_x"), "jti-fam-expired", T0, 30);
    let fam_revoked = access_token(&c, Some("fam_x"), "jti-fam-revoked", T0, 900);
    let other = access_token(&c, Some("fam_y"), "jti-other-family", T0, 600);
    let plain = access_token(&c, None, "jti-cc", T0, 600);
    for t in fam.iter().chain([&fam_expired, &fam_revoked, &other, &plain]) {
        s.insert_access_token(t).await.unwrap();
    }
    assert_eq!(s.access_token("jti-cc").await.unwrap(), Some(plain.clone()));
    assert!(plain.is_active(now));
    assert_eq!(s.access_token("jti-unknown").await.unwrap(), None);
    assert_eq!(s.insert_access_token(&plain).await.unwrap_err().kind, ErrorKind::Conflict, "a jti is stored once");
    let of_family: Vec<String> = s.access_tokens_of_family("fam_x").await.unwrap().into_iter().map(|t| t.jti).collect();
    assert_eq!(of_family.len(), 5, "every access token of the family, and only those: {of_family:?}");
    assert!(of_family.iter().all(|j| j.starts_with("jti-fam-")));
    assert!(s.access_tokens_of_family("fam_none").await.unwrap().is_empty());

    // One token revoked: audited, on the feed, and waking followers.
    let start = s.snapshot(T0).await.unwrap().seq;
    let mut signal = s.subscribe();
    let before = all_audit(s, &ws.id).await.len();
    assert!(s.revoke_access_token("jti-fam-revoked", T0, &audit(&ws.id, "oauth.token_revoke", "jti")).await.unwrap());
    assert!(signal.changed().await, "a revocation wakes followers");
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1);
    let first = s.revocations_since(start, 100).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].jti.as_str(), first[0].expires_at), ("jti-fam-revoked", fam_revoked.expires_at));
    assert!(first[0].seq > start);
    // Unknown or already revoked: false, nothing written.
    let ev = audit(&ws.id, "oauth.token_revoke", "jti");
    assert!(!s.revoke_access_token("jti-fam-revoked", now, &ev).await.unwrap());
    assert!(!s.revoke_access_token("jti-unknown", now, &ev).await.unwrap());
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1, "a revocation that finds nothing is not audited");
    assert_eq!(s.access_token("jti-fam-revoked").await.unwrap().unwrap().revoked_at, Some(T0));
    assert_eq!(s.revocations_since(start, 100).await.unwrap(), first);

    // The family: its refresh token and its live access tokens, each on the feed at its own position.
    let n = s.revoke_token_family("fam_x", now, &audit(&ws.id, "oauth.family_revoke", "fam_x")).await.unwrap();
    assert_eq!(n, 3, "the expired and the already revoked ones are not counted");
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 2);
    assert_eq!(s.refresh_token(&r.hash).await.unwrap().unwrap().revoked_at, Some(now));
    for t in &fam {
        let stored = s.access_token(&t.jti).await.unwrap().unwrap();
        assert_eq!(stored.revoked_at, Some(now));
        assert!(!stored.is_active(now));
    }
    assert_eq!(s.access_token("jti-fam-expired").await.unwrap().unwrap().revoked_at, None);
    assert_eq!(s.access_token("jti-fam-revoked").await.unwrap().unwrap().revoked_at, Some(T0), "kept");
    assert_eq!(s.access_token("jti-other-family").await.unwrap().unwrap().revoked_at, None);
    assert_eq!(s.access_token("jti-cc").await.unwrap().unwrap().revoked_at, None);
    let feed = s.revocations_since(start, 100).await.unwrap();
    assert_eq!(feed.len(), 4);
    let mut jtis: Vec<&str> = feed[1..].iter().map(|r| r.jti.as_str()).collect();
    jtis.sort();
    assert_eq!(jtis, vec!["jti-fam-0", "jti-fam-1", "jti-fam-2"]);
    assert!(feed.windows(2).all(|w| w[1].seq == w[0].seq + 1), "consecutive positions: {feed:?}");
    assert_eq!(s.revocations_since(start, 2).await.unwrap(), feed[..2].to_vec(), "limit");
    assert_eq!(s.revocations_since(feed[3].seq, 100).await.unwrap(), vec![]);
    // Again: nothing left to revoke, nothing written.
    assert_eq!(s.revoke_token_family("fam_x", now, &audit(&ws.id, "x", "y")).await.unwrap(), 0);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 2);
    assert_eq!(s.revocations_since(start, 100).await.unwrap().len(), 4);

    // Token changes and revocations share one sequence.
    let t = token(&ws.id, &d.id, "api", now);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let change = s.changes_since(start, 10).await.unwrap();
    assert_eq!(change.len(), 1);
    assert_eq!(change[0].seq, feed[3].seq + 1);

    // A gateway starting up: every revocation whose token has not expired.
    let live = |v: Vec<JtiRevocation>| v.into_iter().map(|r| r.jti).collect::<Vec<_>>();
    assert_eq!(live(s.revoked_jtis(now).await.unwrap()), live(feed.clone()));
    // jti-fam-0 expires at T0+600, jti-fam-1 at T0+601, jti-fam-2 at T0+602, jti-fam-revoked at T0+900.
    let later = live(s.revoked_jtis(T0.plus_seconds(601)).await.unwrap());
    assert_eq!(later.len(), 2);
    assert!(later.contains(&"jti-fam-revoked".to_string()) && later.contains(&"jti-fam-2".to_string()));
    assert!(s.revoked_jtis(T0.plus_seconds(900)).await.unwrap().is_empty());
}

/// Suspending a client revokes its live access tokens on the change feed (an expired one, one
/// revoked already and another client's are left alone), keeps its refresh tokens, and is audited
/// with the count; no access token is recorded for it while it is suspended, and one recorded in
/// a race with the suspension is revoked with the rest. Suspending it again, resuming an active
/// client, and either from another workspace write nothing. Resumed, it is issued tokens again.
async fn oauth_client_suspension(h: &Harness) {
    let s = &h.store;
    let (ws, _, c) = oauth_setup(s, "acme").await;
    let (ws2, d2) = workspace("other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let r = refresh_token(&c, "fam_s", "rt-s", T0, 3600);
    s.insert_refresh_token(&r).await.unwrap();
    let live = access_token(&c, Some("fam_s"), "jti-s-live", T0, 600);
    let plain = access_token(&c, None, "jti-s-cc", T0, 600);
    let expired = access_token(&c, None, "jti-s-old", T0.plus_seconds(-600), 300);
    let gone = access_token(&c, None, "jti-s-revoked", T0, 600);
    for at in [&live, &plain, &expired, &gone] {
        s.insert_access_token(at).await.unwrap();
    }
    assert!(s.revoke_access_token(&gone.jti, T0, &audit(&ws.id, "oauth.access_token.revoke", "jti")).await.unwrap());
    let b = app(&ws.id, "Bystander", false);
    s.insert_app(&b, &audit(&ws.id, "app.create", b.id.as_str())).await.unwrap();
    let other = oauth_client(&ws.id, &b.id);
    s.insert_oauth_client(&other, &audit(&ws.id, "oauth_client.create", &other.client_id)).await.unwrap();
    let bystander = access_token(&other, None, "jti-s-bystander", T0, 600);
    s.insert_access_token(&bystander).await.unwrap();

    let seq = s.snapshot(T0).await.unwrap().seq;
    let before = all_audit(s, &ws.id).await.len();
    let now = T0.plus_seconds(60);
    let ev = |ws: &WorkspaceId, action: &str| {
        NewAuditEvent::new(ws, &Actor::cli(), action, &c.client_id, now)
            .with_after(json!({"suspended_reason": "leaked"}))
    };
    for (w, id) in [(&ws2.id, c.client_id.as_str()), (&ws.id, "cl_unknown")] {
        let e = s.suspend_oauth_client(w, id, Some("leaked"), now, &ev(w, "oauth_client.suspend")).await.unwrap_err();
        assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "oauth_client_not_found"), "{id}");
        let e = s.resume_oauth_client(w, id, now, &ev(w, "oauth_client.resume")).await.unwrap_err();
        assert_eq!((e.kind, e.code), (ErrorKind::NotFound, "oauth_client_not_found"), "{id}");
    }
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(c.clone()), "another workspace's suspension");
    assert!(s.revocations_since(seq, 10).await.unwrap().is_empty());
    assert!(all_audit(s, &ws2.id).await.is_empty());

    // Suspended: when and why, a new version; its live access tokens revoked, on the feed.
    let mut signal = s.subscribe();
    let done = s
        .suspend_oauth_client(&ws.id, &c.client_id, Some("leaked"), now, &ev(&ws.id, "oauth_client.suspend"))
        .await
        .unwrap()
        .expect("an active client is suspended");
    assert!(signal.changed().await, "a suspension that revokes tokens wakes followers");
    let suspended = OAuthClient {
        suspended_at: Some(now),
        suspended_reason: Some("leaked".into()),
        updated_at: now,
        version: c.version + 1,
        ..c.clone()
    };
    assert_eq!(done.client, suspended);
    assert!(done.client.is_suspended());
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(suspended.clone()));
    assert_eq!(s.oauth_client_for_app(&ws.id, &c.app_id).await.unwrap(), Some(suspended.clone()));
    let mut revoked = done.revoked.clone();
    revoked.sort();
    assert_eq!(revoked, vec![plain.jti.clone(), live.jti.clone()]);
    for at in [&live, &plain] {
        assert_eq!(s.access_token(&at.jti).await.unwrap().unwrap().revoked_at, Some(now), "{}", at.jti);
    }
    assert_eq!(s.access_token(&expired.jti).await.unwrap().unwrap().revoked_at, None, "expired: nothing to revoke");
    assert_eq!(s.access_token(&gone.jti).await.unwrap().unwrap().revoked_at, Some(T0), "revoked before: kept");
    assert_eq!(s.access_token(&bystander.jti).await.unwrap().unwrap().revoked_at, None, "another client's");
    let feed = s.revocations_since(seq, 10).await.unwrap();
    let mut on_feed: Vec<String> = feed.iter().map(|r| r.jti.clone()).collect();
    on_feed.sort();
    assert_eq!(on_feed, revoked, "each on the change feed");
    assert!(feed.iter().all(|r| r.seq > seq));
    // The refresh token is kept (the service refuses it while the client is suspended).
    let kept = s.refresh_token(&r.hash).await.unwrap().unwrap();
    assert!(kept.is_active(now), "{kept:?}");
    let events = all_audit(s, &ws.id).await;
    assert_eq!(events.len(), before + 1);
    let audited = events.iter().find(|e| e.action == "oauth_client.suspend").expect("the suspension is audited");
    assert_eq!(audited.target, c.client_id);
    let after = audited.after.as_ref().unwrap();
    assert_eq!((&after["suspended_reason"], &after["access_tokens_revoked"]), (&json!("leaked"), &json!(2)));

    // While suspended no access token is recorded for it, with a family or without.
    for (jti, family) in [("jti-s-late", None), ("jti-s-late-fam", Some("fam_s"))] {
        let e = s.insert_access_token(&access_token(&c, family, jti, now, 600)).await.unwrap_err();
        assert_eq!((e.kind, e.code), (ErrorKind::Conflict, "oauth_client_suspended"), "{jti}");
        assert_eq!(s.access_token(jti).await.unwrap(), None);
    }
    s.insert_access_token(&access_token(&other, None, "jti-s-other", now, 600)).await.unwrap();

    // Again: nothing written; the first suspension's time and reason stay.
    let again = ev(&ws.id, "oauth_client.suspend");
    assert_eq!(s.suspend_oauth_client(&ws.id, &c.client_id, Some("again"), now, &again).await.unwrap(), None);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 1, "suspending a suspended client is not audited");
    assert_eq!(s.revocations_since(seq, 10).await.unwrap(), feed);
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(suspended.clone()));
    // A change of the client while it is suspended leaves the suspension.
    let mut changed = suspended.clone();
    changed.access_token_ttl_seconds = 60;
    changed.version += 1;
    s.update_oauth_client(&changed, &audit(&ws.id, "oauth_client.update", &c.client_id)).await.unwrap();
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(changed.clone()));
    // An update from a read before the suspension finds the client changed.
    let mut stale = c.clone();
    stale.version += 1;
    let e = s.update_oauth_client(&stale, &audit(&ws.id, "oauth_client.update", &c.client_id)).await.unwrap_err();
    assert_eq!(e.code, "concurrent_update");

    // Resumed: the suspension lifted, a new version, audited; the revoked tokens stay revoked.
    let later = now.plus_seconds(10);
    let resumed = s
        .resume_oauth_client(&ws.id, &c.client_id, later, &ev(&ws.id, "oauth_client.resume"))
        .await
        .unwrap()
        .expect("a suspended client is resumed");
    let active = OAuthClient {
        suspended_at: None,
        suspended_reason: None,
        updated_at: later,
        version: changed.version + 1,
        ..changed.clone()
    };
    assert_eq!(resumed, active);
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(active.clone()));
    let events = all_audit(s, &ws.id).await;
    assert_eq!(events.len(), before + 3);
    assert!(events.iter().any(|e| e.action == "oauth_client.resume" && e.target == c.client_id));
    assert_eq!(s.access_token(&live.jti).await.unwrap().unwrap().revoked_at, Some(now));
    // Resuming an active client: nothing written.
    let again = ev(&ws.id, "oauth_client.resume");
    assert_eq!(s.resume_oauth_client(&ws.id, &c.client_id, later, &again).await.unwrap(), None);
    assert_eq!(all_audit(s, &ws.id).await.len(), before + 3, "resuming an active client is not audited");
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(active));
    // It is issued tokens again, and its kept refresh token rotates.
    s.insert_access_token(&access_token(&c, Some("fam_s"), "jti-s-new", later, 600)).await.unwrap();
    assert!(matches!(s.use_refresh_token(&r.hash, later).await.unwrap(), RefreshUse::Fresh(_)));

    // A token recorded in a race with the suspension is revoked with the rest, or refused.
    let racing = access_token(&other, None, "jti-s-race", later, 600);
    let suspend_ev = NewAuditEvent::new(&ws.id, &Actor::cli(), "oauth_client.suspend", &other.client_id, later);
    let (issued, suspension) = tokio::join!(
        s.insert_access_token(&racing),
        s.suspend_oauth_client(&ws.id, &other.client_id, None, later, &suspend_ev)
    );
    let suspension = suspension.unwrap().expect("the other client is suspended");
    assert_eq!(suspension.client.suspended_reason, None, "no reason given");
    match issued {
        Ok(()) => {
            assert_eq!(s.access_token(&racing.jti).await.unwrap().unwrap().revoked_at, Some(later));
            assert!(suspension.revoked.contains(&racing.jti));
        }
        Err(e) => assert_eq!(e.code, "oauth_client_suspended"),
    }
}

async fn oauth_prune(h: &Harness) {
    let s = &h.store;
    let (ws, _, c) = oauth_setup(s, "acme").await;
    let ev = || audit(&ws.id, "oauth.token_revoke", "jti");
    let short = access_token(&c, None, "jti-short", T0, 10);
    let long = access_token(&c, Some("fam_long"), "jti-long", T0, 100_000);
    for t in [&short, &long] {
        s.insert_access_token(t).await.unwrap();
        assert!(s.revoke_access_token(&t.jti, T0, &ev()).await.unwrap());
    }
    let gone_soon = refresh_token(&c, "fam_short", "rt-short", T0, 10);
    let kept = refresh_token(&c, "fam_long", "rt-long", T0, 100_000);
    for r in [&gone_soon, &kept] {
        s.insert_refresh_token(r).await.unwrap();
    }
    let key = signing_key("k1", T0);
    s.insert_signing_key(&key, &audit(&ws.id, "signing_key.create", "k1")).await.unwrap();

    // Nothing has expired yet.
    assert_eq!(s.prune_oauth(T0.plus_seconds(5)).await.unwrap(), 0);
    // The short access token and its revocation go at its expiry; the refresh token a day after.
    assert_eq!(s.prune_oauth(T0.plus_seconds(10)).await.unwrap(), 2);
    assert_eq!(s.access_token("jti-short").await.unwrap(), None);
    assert!(s.access_token("jti-long").await.unwrap().is_some());
    assert_eq!(s.revocations_since(0, 100).await.unwrap().into_iter().map(|r| r.jti).collect::<Vec<_>>(), ["jti-long"]);
    assert!(s.refresh_token(&gone_soon.hash).await.unwrap().is_some(), "kept a day to recognize late reuse");
    assert!(matches!(s.use_refresh_token(&gone_soon.hash, T0.plus_seconds(20)).await.unwrap(), RefreshUse::Invalid));
    assert_eq!(s.prune_oauth(T0.plus_seconds(10 + 86_400)).await.unwrap(), 0);
    // A day after its expiry the refresh token goes, and with it its now empty family.
    assert_eq!(s.prune_oauth(T0.plus_seconds(11 + 86_400)).await.unwrap(), 2);
    assert_eq!(s.refresh_token(&gone_soon.hash).await.unwrap(), None);
    assert!(s.refresh_token(&kept.hash).await.unwrap().is_some());
    // A family with tokens left is kept and still takes new ones.
    s.insert_refresh_token(&refresh_token(&c, "fam_long", "rt-long-2", T0.plus_seconds(100), 100)).await.unwrap();
    assert_eq!(s.signing_keys().await.unwrap(), vec![key], "signing keys are not pruned here");
    assert_eq!(s.oauth_client(&c.client_id).await.unwrap(), Some(c.clone()));
}

async fn node_registry_and_propagation(h: &Harness) {
    let s = &h.store;
    let node = |id: &str, instance: &str, applied: u64, at: Timestamp| NodeRecord {
        id: id.into(),
        instance: instance.into(),
        gateway_address: "10.0.0.1:8080".into(),
        admin_address: "127.0.0.1:8081".into(),
        version: "0.1.0".into(),
        started_at: at,
        applied_seq: applied,
        heartbeat_at: at,
        stopped_at: None,
    };
    s.register_node(&node("b", "i1", 3, T0)).await.unwrap();
    s.register_node(&node("a", "i2", 0, T0)).await.unwrap();
    let later = T0.plus_seconds(2);
    // A heartbeat moves the applied position forward, never back.
    assert!(s.node_heartbeat("b", "i1", 7, later).await.unwrap());
    assert!(s.node_heartbeat("b", "i1", 5, later).await.unwrap());
    // Another process's instance (or a row that is gone) is not this process's.
    assert!(!s.node_heartbeat("b", "someone-else", 9, later).await.unwrap());
    assert!(!s.node_heartbeat("gone", "i9", 9, later).await.unwrap());
    let nodes = s.list_nodes().await.unwrap();
    assert_eq!(nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!((nodes[1].applied_seq, nodes[1].heartbeat_at), (7, later));
    assert_eq!(nodes[0].applied_seq, 0);

    // A restart with the same id replaces the row; a graceful stop marks it; a beat revives it.
    s.register_node(&node("a", "i3", 1, later)).await.unwrap();
    s.node_stopped("a", "i2", later).await.unwrap(); // the old instance cannot stop the new one
    assert_eq!(s.list_nodes().await.unwrap()[0].stopped_at, None);
    s.node_stopped("a", "i3", later).await.unwrap();
    assert_eq!(s.list_nodes().await.unwrap()[0].stopped_at, Some(later));
    assert!(s.node_heartbeat("a", "i3", 1, later).await.unwrap());
    assert_eq!(s.list_nodes().await.unwrap()[0].stopped_at, None);
    assert_eq!(s.prune_nodes(T0.plus_seconds(1)).await.unwrap(), 0);
    assert_eq!(s.prune_nodes(T0.plus_seconds(3)).await.unwrap(), 2);
    assert!(s.list_nodes().await.unwrap().is_empty());

    // A token change's audit event shows how far the change spread once that is recorded.
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let t = token(&ws.id, &d.id, "ci", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let mut u = t.clone();
    u.state = TokenState::Suspended;
    u.version = 2;
    let seq = s.update_token(&u, &audit(&ws.id, "token.suspend", t.id.as_str())).await.unwrap();
    assert_eq!(seq, s.changes_since(0, 10).await.unwrap().last().unwrap().seq);
    assert_eq!(all_audit(s, &ws.id).await[0].propagation, None);
    let p = Propagation { nodes: 3, applied: 2, elapsed_ms: 1000 };
    s.record_propagation(seq, &p, later).await.unwrap();
    let p2 = Propagation { nodes: 3, applied: 3, elapsed_ms: 1200 };
    s.record_propagation(seq, &p2, later).await.unwrap(); // recorded again: the last one holds
    let events = all_audit(s, &ws.id).await;
    assert_eq!((events[0].action.as_str(), events[0].propagation), ("token.suspend", Some(p2)));
    assert_eq!((events[1].action.as_str(), events[1].propagation), ("token.create", None));
    // Filters on the event's own columns still work with the join.
    let only = AuditFilter { action: Some("token.suspend".into()), from: Some(T0), ..AuditFilter::default() };
    let got = s.list_audit(&ws.id, &only, &PageRequest { limit: 10, cursor: None }).await.unwrap();
    assert_eq!(got.items.len(), 1);

    // A rotation's two events carry the position of the rotation's last change.
    let mut old = u.clone();
    old.state = TokenState::Active;
    old.version = 3;
    let new = token(&ws.id, &d.id, "ci-2", T0);
    let seq = s
        .rotate_token(
            &old,
            &new,
            &audit(&ws.id, "token.rotate", t.id.as_str()),
            &audit(&ws.id, "token.create", new.id.as_str()),
        )
        .await
        .unwrap();
    s.record_propagation(seq, &p, later).await.unwrap();
    let events = all_audit(s, &ws.id).await;
    assert_eq!(events[0].propagation, Some(p));
    assert_eq!(events[1].propagation, Some(p));
}

async fn feed_pruning(h: &Harness) {
    let s = &h.store;
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    assert_eq!(s.feed_floor().await.unwrap(), 0);
    assert_eq!(s.prune_feed(T0.plus_seconds(3600)).await.unwrap(), 0, "nothing to prune");
    let a = token(&ws.id, &d.id, "a", T0);
    let b = token(&ws.id, &d.id, "b", T0);
    s.insert_token(&a, &audit(&ws.id, "token.create", a.id.as_str())).await.unwrap();
    s.insert_token(&b, &audit(&ws.id, "token.create", b.id.as_str())).await.unwrap();
    let mut later = a.clone();
    later.name = "a2".into();
    later.version = 2;
    later.updated_at = T0.plus_seconds(600);
    let last = s.update_token(&later, &audit(&ws.id, "token.update", a.id.as_str())).await.unwrap();
    // Changes recorded before T0 + 5 min go; the floor is the highest position that went.
    assert_eq!(s.prune_feed(T0.plus_seconds(300)).await.unwrap(), 2);
    let floor = s.feed_floor().await.unwrap();
    let left = s.changes_since(0, 10).await.unwrap();
    assert_eq!(left.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![last]);
    assert!(floor < last && floor > 0, "floor {floor}, last {last}");
    // The tokens themselves stay; a snapshot still has them, whole or in pages by id.
    assert_eq!(s.snapshot(T0).await.unwrap().tokens.len(), 2);
    assert_eq!(s.feed_position().await.unwrap(), s.snapshot(T0).await.unwrap().seq);
    let mut ids = [a.id.clone(), b.id.clone()];
    ids.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    let first = s.snapshot_page(T0, None, 1).await.unwrap();
    assert_eq!(first.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![ids[0].clone()]);
    let second = s.snapshot_page(T0, Some(&ids[0]), 10).await.unwrap();
    assert_eq!(second.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), vec![ids[1].clone()]);
    assert!(s.snapshot_page(T0, Some(&ids[1]), 10).await.unwrap().is_empty());
    assert_eq!(s.prune_feed(T0.plus_seconds(300)).await.unwrap(), 0);
    assert_eq!(s.feed_floor().await.unwrap(), floor, "the floor never moves back");
    assert_eq!(s.prune_feed(T0.plus_seconds(3600)).await.unwrap(), 1);
    assert_eq!(s.feed_floor().await.unwrap(), last);
}

/// APIs with a lifecycle: names unique per workspace, every change on the route feed with its
/// audit events, another workspace's API invisible, publish requests decided once (an approval
/// writes the published API in the same transaction), the gateway's list without documents.
async fn apis_and_publish_requests(h: &Harness) {
    use keygate_core::apis::{Api, ApiPublishRequest, ApiState, ApiStore, ApiVersion, PublishRequestStatus};
    use keygate_core::ids::{ApiId, ApiPublishRequestId};
    let s = &h.store;
    let (ws, d) = workspace("apis");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (ws2, d2) = workspace("apis-other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let mut v1 = ApiVersion::new("v1");
    v1.state = ApiState::Published;
    let a = Api {
        id: ApiId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        name: "orders".into(),
        description: "Orders".into(),
        openapi: Some(r#"{"openapi":"3.1.0"}"#.into()),
        state: ApiState::Draft,
        deprecated_at: None,
        sunset: None,
        successor: None,
        versions: vec![v1, ApiVersion::new("v2")],
        access: keygate_core::subscriptions::ApiAccess::Open,
        created_at: T0,
        updated_at: T0,
    };
    let before = s.routes_position().await.unwrap();
    s.insert_api(&a, &audit(&ws.id, "api.create", a.id.as_str())).await.unwrap();
    assert!(s.routes_position().await.unwrap() > before, "an API change moves the route feed position");
    assert_eq!(s.api(&ws.id, &a.id).await.unwrap(), Some(a.clone()));
    let twin = Api { id: ApiId::random(&OsRandom).unwrap(), ..a.clone() };
    assert_eq!(s.insert_api(&twin, &audit(&ws.id, "api.create", "x")).await.unwrap_err().code, "api_exists");
    // The same name in another workspace is another API.
    let theirs = Api { id: ApiId::random(&OsRandom).unwrap(), workspace_id: ws2.id.clone(), ..a.clone() };
    s.insert_api(&theirs, &audit(&ws2.id, "api.create", theirs.id.as_str())).await.unwrap();
    assert_eq!(s.api(&ws2.id, &a.id).await.unwrap(), None, "another workspace's API is not found");
    assert_eq!(
        s.list_apis(&ws.id).await.unwrap(),
        vec![Api { openapi: None, ..a.clone() }],
        "lists leave documents out"
    );
    let all = s.all_apis().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|x| x.openapi.is_none()), "the gateway's list leaves the documents out");

    // A state change: two audit events, one feed position.
    let pos = s.routes_position().await.unwrap();
    let b = Api {
        state: ApiState::Deprecated,
        deprecated_at: Some(T0.plus_seconds(5)),
        sunset: Some(T0.plus_seconds(86_400)),
        successor: Some("/v2/orders".into()),
        access: keygate_core::subscriptions::ApiAccess::Approval,
        updated_at: T0.plus_seconds(5),
        ..a.clone()
    };
    s.update_api(&b, &[audit(&ws.id, "api.update", a.id.as_str()), audit(&ws.id, "api.deprecate", a.id.as_str())])
        .await
        .unwrap();
    assert!(s.routes_position().await.unwrap() > pos);
    assert_eq!(s.api(&ws.id, &a.id).await.unwrap(), Some(b.clone()));
    let actions: Vec<String> = all_audit(s, &ws.id).await.into_iter().map(|e| e.action).collect();
    assert!(actions.contains(&"api.update".to_owned()) && actions.contains(&"api.deprecate".to_owned()));
    // Another workspace cannot change it, nor take a name by renaming.
    let foreign = Api { workspace_id: ws2.id.clone(), ..b.clone() };
    assert_eq!(s.update_api(&foreign, &[audit(&ws2.id, "api.update", "x")]).await.unwrap_err().code, "api_not_found");
    let c = Api { id: ApiId::random(&OsRandom).unwrap(), name: "billing".into(), ..a.clone() };
    s.insert_api(&c, &audit(&ws.id, "api.create", c.id.as_str())).await.unwrap();
    let clash = Api { name: "orders".into(), ..c.clone() };
    assert_eq!(s.update_api(&clash, &[audit(&ws.id, "api.update", "x")]).await.unwrap_err().code, "api_exists");

    // Publish requests: pending, decided once, the approval writing the API with it.
    let r = ApiPublishRequest {
        id: ApiPublishRequestId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        api_id: c.id.clone(),
        version: None,
        requested_by: "usr_dev".into(),
        status: PublishRequestStatus::Pending,
        created_at: T0,
        decided_by: None,
        decided_at: None,
    };
    s.insert_publish_request(&r, &audit(&ws.id, "api.publish_requested", r.id.as_str())).await.unwrap();
    assert_eq!(s.publish_request(&ws.id, &r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(s.publish_request(&ws2.id, &r.id).await.unwrap(), None);
    assert_eq!(s.publish_requests(&ws.id, Some(PublishRequestStatus::Pending)).await.unwrap(), vec![r.clone()]);
    assert!(s.publish_requests(&ws.id, Some(PublishRequestStatus::Approved)).await.unwrap().is_empty());
    let decided = ApiPublishRequest {
        status: PublishRequestStatus::Approved,
        decided_by: Some("usr_owner".into()),
        decided_at: Some(T0.plus_seconds(9)),
        ..r.clone()
    };
    let published = Api { state: ApiState::Published, updated_at: T0.plus_seconds(9), ..c.clone() };
    let pos = s.routes_position().await.unwrap();
    s.decide_publish_request(&decided, Some(&published), &[audit(&ws.id, "api.publish", c.id.as_str())]).await.unwrap();
    assert!(s.routes_position().await.unwrap() > pos);
    assert_eq!(s.api(&ws.id, &c.id).await.unwrap().unwrap().state, ApiState::Published);
    assert_eq!(s.publish_request(&ws.id, &r.id).await.unwrap(), Some(decided.clone()));
    let again = s.decide_publish_request(&decided, None, &[audit(&ws.id, "api.publish", "x")]).await.unwrap_err();
    assert_eq!(again.code, "request_decided");

    // Deleting: only in its own workspace, its requests with it.
    assert!(!s.delete_api(&ws2.id, &c.id, &audit(&ws2.id, "api.delete", "x")).await.unwrap());
    assert!(s.delete_api(&ws.id, &c.id, &audit(&ws.id, "api.delete", c.id.as_str())).await.unwrap());
    assert_eq!(s.api(&ws.id, &c.id).await.unwrap(), None);
    assert!(s.publish_requests(&ws.id, None).await.unwrap().is_empty());

    // The policy's flag is kept.
    let p = WorkspacePolicy { api_publish_needs_approval: true, ..WorkspacePolicy::default() };
    s.put_workspace_policy(&ws.id, &p, &audit(&ws.id, "policy.update", ws.id.as_str())).await.unwrap();
    assert!(s.workspace_policy(&ws.id).await.unwrap().api_publish_needs_approval);
    assert!(!s.workspace_policy(&ws2.id).await.unwrap().api_publish_needs_approval);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::sqlite().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod postgres_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::postgres().await;
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

/// The audit trail's hash chain: every write links its event under the store's key; changing,
/// deleting or forging a row breaks the chain at that event; retention deletes the oldest events
/// and verification starts from the anchor they leave; events written before the chain existed
/// are linked once.
async fn audit_chain(h: &Harness) {
    use keygate_core::audit_chain::{Checkpoint, from_hex};
    let s = &h.store;
    let key = [5u8; 32];
    s.set_audit_chain_key(key);
    let (ws, d) = workspace("acme");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let verify = async |cp: Option<Checkpoint>| s.verify_audit_chain(&ws.id, key, cp).await.unwrap();
    let empty = verify(None).await;
    assert!(empty.intact && empty.checked == 0, "{empty:?}");
    let t = token(&ws.id, &d.id, "a", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    for i in 0..4 {
        let at = T0.plus_seconds(600 * (i + 1));
        s.append_audit(&NewAuditEvent::new(&ws.id, &Actor::cli(), "user.sign_in", &format!("usr_{i}"), at))
            .await
            .unwrap();
    }
    let head = s.audit_chain_head(&ws.id).await.unwrap();
    assert_eq!(head.seq, 5, "the token and four sign-ins: {head:?}");
    let ok = verify(None).await;
    assert!(ok.intact && ok.checked == 5, "{ok:?}");
    let cp = Checkpoint { seq: head.seq, link: from_hex(&head.link).unwrap() };
    assert_eq!(verify(Some(cp)).await.checkpoint, Some("matched"));
    // Another workspace has its own chain.
    let (other, od) = workspace("other");
    s.ensure_workspace(&other, &od).await.unwrap();
    assert_eq!(s.audit_chain_head(&other.id).await.unwrap().seq, 0);
    s.append_audit(&audit(&other.id, "user.sign_in", "usr_o")).await.unwrap();
    assert_eq!(s.audit_chain_head(&other.id).await.unwrap().seq, 1);

    let events = all_audit(s, &ws.id).await; // newest first
    let third = events[3].id;
    let exec = async |sql: &str, id: i64| {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).bind(id).execute(&s.pool).await.unwrap();
    };
    // A changed field.
    exec("UPDATE audit_events SET actor = 'someone else' WHERE id = $1", third).await;
    let r = verify(None).await;
    let b = r.broken.unwrap();
    assert_eq!((b.code, b.event_id), ("altered", Some(third)), "{}", b.message);
    exec("UPDATE audit_events SET actor = 'cli' WHERE id = $1", third).await;
    assert!(verify(None).await.intact, "put back, it verifies again");
    // A forged row, written without a link.
    sqlx::query(
        "INSERT INTO audit_events (workspace_id, at, actor, action, target) VALUES ($1, $2, 'cli', 'token.revoke', 'tok_x')",
    )
    .bind(ws.id.as_str())
    .bind(T0.as_millis())
    .execute(&s.pool)
    .await
    .unwrap();
    let forged: i64 = sqlx::query_scalar("SELECT MAX(id) FROM audit_events").fetch_one(&s.pool).await.unwrap();
    assert_eq!(verify(None).await.broken.map(|b| (b.code, b.event_id)), Some(("unlinked", Some(forged))));
    exec("DELETE FROM audit_events WHERE id = $1", forged).await;
    // A deleted row.
    exec("DELETE FROM audit_events WHERE id = $1", third).await;
    assert_eq!(verify(None).await.broken.map(|b| b.code), Some("missing"));

    // Retention, on a fresh workspace: events before T0 + 25 min go; the anchor keeps the chain.
    let (kept, kd) = workspace("kept");
    s.ensure_workspace(&kept, &kd).await.unwrap();
    for i in 0..4 {
        let at = T0.plus_seconds(600 * (i + 1));
        s.append_audit(&NewAuditEvent::new(&kept.id, &Actor::cli(), "user.sign_in", "usr_k", at)).await.unwrap();
    }
    let before = s.audit_chain_head(&kept.id).await.unwrap();
    let early = Checkpoint { seq: 2, link: [0; 32] };
    let pruned = s.prune_audit(T0.plus_seconds(1500)).await.unwrap();
    assert!(pruned >= 2, "at least the first two sign-ins: {pruned}");
    let after = s.audit_chain_head(&kept.id).await.unwrap();
    assert_eq!((after.seq, after.anchor_seq), (before.seq, 2), "{after:?}");
    let r = s.verify_audit_chain(&kept.id, key, Some(early)).await.unwrap();
    assert!(r.intact && r.checked == 2 && r.checkpoint == Some("pruned"), "{r:?}");
    assert_eq!(s.prune_audit(T0.plus_seconds(1500)).await.unwrap(), 0, "nothing more to prune");
    // Under another key nothing verifies.
    let wrong = s.verify_audit_chain(&kept.id, [6u8; 32], None).await.unwrap();
    assert_eq!(wrong.broken.map(|b| b.code), Some("altered"));
    // The anchor retention wrote is authenticated; moved in the database past events deleted by
    // hand (to the stored link of the last of them), it is a break that names the anchor, and the
    // checkpoint inside the deletion is not "pruned".
    let third_link: String =
        sqlx::query_scalar("SELECT link FROM audit_events WHERE workspace_id = $1 AND chain_seq = 3")
            .bind(kept.id.as_str())
            .fetch_one(&s.pool)
            .await
            .unwrap();
    sqlx::query("DELETE FROM audit_events WHERE workspace_id = $1 AND chain_seq = 3")
        .bind(kept.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_chains SET anchor_seq = 3, anchor_link = $1 WHERE workspace_id = $2")
        .bind(third_link.as_str())
        .bind(kept.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    let r = s.verify_audit_chain(&kept.id, key, Some(early)).await.unwrap();
    let b = r.broken.clone().unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!((b.code, b.seq, r.checkpoint), ("altered", 3, None), "{}", b.message);
    assert!(b.message.contains("anchor (#3)"), "{}", b.message);
    sqlx::query("UPDATE audit_chains SET anchor_mac = NULL WHERE workspace_id = $1")
        .bind(kept.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    let r = s.verify_audit_chain(&kept.id, key, None).await.unwrap();
    assert!(r.broken.is_some_and(|b| b.message.contains("not authenticated")), "no code: a break too");

    // Events dated back in the database so that retention deletes them: their links do not
    // verify, so nothing of the workspace is deleted and the break stays to be reported.
    let (dated, dd) = workspace("dated");
    s.ensure_workspace(&dated, &dd).await.unwrap();
    for i in 0..3 {
        let at = T0.plus_seconds(600 * (i + 1));
        s.append_audit(&NewAuditEvent::new(&dated.id, &Actor::cli(), "user.sign_in", "usr_d", at)).await.unwrap();
    }
    sqlx::query("UPDATE audit_events SET at = $1 WHERE workspace_id = $2 AND chain_seq <= 2")
        .bind(T0.as_millis())
        .bind(dated.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    s.prune_audit(T0.plus_seconds(1)).await.unwrap();
    assert_eq!(all_audit(s, &dated.id).await.len(), 3, "nothing deleted");
    assert_eq!(s.audit_chain_head(&dated.id).await.unwrap().anchor_seq, 0);
    let r = s.verify_audit_chain(&dated.id, key, None).await.unwrap();
    assert_eq!(r.broken.map(|b| (b.code, b.seq)), Some(("altered", 1)));

    // An anchor written before anchors were authenticated (no code): reported until retention
    // moves past it, which it does when the events after it verify; then it verifies again.
    let (old_anchor, oad) = workspace("old-anchor");
    s.ensure_workspace(&old_anchor, &oad).await.unwrap();
    for i in 0..4 {
        let at = T0.plus_seconds(600 * (i + 1));
        s.append_audit(&NewAuditEvent::new(&old_anchor.id, &Actor::cli(), "user.sign_in", "usr_a", at)).await.unwrap();
    }
    s.prune_audit(T0.plus_seconds(700)).await.unwrap();
    sqlx::query("UPDATE audit_chains SET anchor_mac = NULL WHERE workspace_id = $1")
        .bind(old_anchor.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    let r = s.verify_audit_chain(&old_anchor.id, key, None).await.unwrap();
    assert_eq!(r.broken.map(|b| (b.code, b.seq)), Some(("altered", 1)));
    s.prune_audit(T0.plus_seconds(1900)).await.unwrap();
    let r = s.verify_audit_chain(&old_anchor.id, key, None).await.unwrap();
    assert!(r.intact && r.from_seq == 3 && r.checked == 1, "{r:?}");

    // Events written before the chain existed: linked once, in id order, by the current key.
    let (old, odd) = workspace("legacy");
    s.ensure_workspace(&old, &odd).await.unwrap();
    s.append_audit(&audit(&old.id, "app.create", "app_l")).await.unwrap();
    sqlx::query("DELETE FROM audit_chains WHERE workspace_id = $1")
        .bind(old.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET chain_seq = NULL, link = NULL WHERE workspace_id = $1")
        .bind(old.id.as_str())
        .execute(&s.pool)
        .await
        .unwrap();
    let max: i64 = sqlx::query_scalar("SELECT MAX(id) FROM audit_events").fetch_one(&s.pool).await.unwrap();
    sqlx::query("UPDATE audit_chain_state SET legacy_through = $1 WHERE id = 1")
        .bind(max)
        .execute(&s.pool)
        .await
        .unwrap();
    assert_eq!(verify_ws(s, &old.id, key).await, Some("unlinked"), "written before the chain, not linked yet");
    assert_eq!(s.link_legacy_audit().await.unwrap(), 1);
    assert_eq!(verify_ws(s, &old.id, key).await, None);
    assert_eq!(s.link_legacy_audit().await.unwrap(), 0, "once");
}

async fn webhook_outbox(h: &Harness) {
    use keygate_core::ids::WebhookId;
    use keygate_core::notify::*;
    let s = &h.store;
    let (ws, d) = workspace("hooks");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let endpoint = |types: &[&str], enabled: bool| WebhookEndpoint {
        id: WebhookId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        url: "https://hooks.example.com/in".into(),
        description: None,
        event_types: types.iter().map(|t| (*t).to_owned()).collect(),
        enabled,
        disabled_reason: None,
        sealed_secret: vec![1, 2, 3],
        previous_sealed_secret: None,
        previous_secret_until: None,
        failing_since: None,
        created_at: T0,
        updated_at: T0,
    };
    let all = endpoint(&[], true);
    let exposed_only = endpoint(&["token.exposed"], true);
    let off = endpoint(&[], false);
    for e in [&all, &exposed_only, &off] {
        s.insert_webhook(e, &audit(&ws.id, "webhook.create", e.id.as_str())).await.unwrap();
    }
    assert_eq!(s.list_webhooks(&ws.id).await.unwrap().len(), 3);
    assert_eq!(s.webhook(&ws.id, &all.id).await.unwrap().as_ref(), Some(&all));
    // A rotation with an overlap keeps the replaced key and when it stops signing; then back.
    let rotated = WebhookEndpoint {
        sealed_secret: vec![4, 5, 6],
        previous_sealed_secret: Some(vec![1, 2, 3]),
        previous_secret_until: Some(T0.plus_seconds(3600)),
        ..all.clone()
    };
    for e in [&rotated, &all] {
        s.update_webhook(e, &audit(&ws.id, "webhook.rotate_secret", e.id.as_str())).await.unwrap();
        assert_eq!(s.webhook(&ws.id, &all.id).await.unwrap().as_ref(), Some(e));
    }

    // The outbox is written with the audit event: one delivery per subscribed, enabled endpoint.
    let t = token(&ws.id, &d.id, "a", T0);
    s.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    s.append_audit(&audit(&ws.id, "token.update", t.id.as_str())).await.unwrap();
    s.append_audit(&audit(&ws.id, "token.revoke", t.id.as_str())).await.unwrap();
    let page = PageRequest { limit: 50, cursor: None };
    let mine = s.list_deliveries(&ws.id, Some(&all.id), &page).await.unwrap().items;
    assert_eq!(mine.iter().map(|d| d.event_type.as_str()).collect::<Vec<_>>(), ["token.revoked", "token.created"]);
    assert!(s.list_deliveries(&ws.id, Some(&exposed_only.id), &page).await.unwrap().items.is_empty());
    assert!(s.list_deliveries(&ws.id, Some(&off.id), &page).await.unwrap().items.is_empty());
    let body: serde_json::Value = serde_json::from_str(&mine[0].payload).unwrap();
    assert_eq!(body["type"], "token.revoked");
    assert_eq!(body["data"]["target"], t.id.as_str());
    assert_eq!(body["data"]["after"], json!({"x": 1}));
    assert!(mine[0].message_id.starts_with("msg_") && mine[0].message_id != mine[1].message_id);
    let first = s.list_deliveries(&ws.id, None, &PageRequest { limit: 1, cursor: None }).await.unwrap();
    let rest = s.list_deliveries(&ws.id, None, &PageRequest { limit: 1, cursor: first.next_cursor }).await.unwrap();
    assert_eq!((first.items[0].id, rest.items[0].id), (mine[0].id, mine[1].id), "pages follow each other");

    // A lease keeps a delivery with one claimer until it runs out.
    let now = T0.plus_seconds(1);
    let a = s.claim_deliveries(now, 60_000, "node-a", 10).await.unwrap();
    assert_eq!(a.len(), 2);
    assert!(s.claim_deliveries(now, 60_000, "node-b", 10).await.unwrap().is_empty());
    assert_eq!(s.claim_deliveries(now.plus_seconds(61), 60_000, "node-b", 10).await.unwrap().len(), 2);

    // Attempts: a failure schedules the retry and starts the endpoint's failure streak; a
    // success ends both.
    let id = mine[1].id;
    let fail = AttemptOutcome {
        attempt: DeliveryAttempt {
            at: now,
            status: Some(503),
            error: Some("the endpoint answered 503".into()),
            duration_ms: 4,
        },
        state: DeliveryState::Pending,
        next_at: Some(now.plus_seconds(5)),
    };
    s.record_attempt(id, &fail).await.unwrap();
    assert_eq!(s.webhook(&ws.id, &all.id).await.unwrap().unwrap().failing_since, Some(now));
    let later = now.plus_seconds(3);
    let fail2 = AttemptOutcome { attempt: DeliveryAttempt { at: later, ..fail.attempt.clone() }, ..fail.clone() };
    s.record_attempt(id, &fail2).await.unwrap();
    assert_eq!(s.webhook(&ws.id, &all.id).await.unwrap().unwrap().failing_since, Some(now), "the streak's start");
    let (d1, attempts) = s.delivery(&ws.id, id).await.unwrap().unwrap();
    assert_eq!(
        (d1.state, d1.attempts, d1.last_status, d1.next_at),
        (DeliveryState::Pending, 2, Some(503), Some(now.plus_seconds(5)))
    );
    assert_eq!(attempts.len(), 2);
    let ok = AttemptOutcome {
        attempt: DeliveryAttempt { at: later, status: Some(204), error: None, duration_ms: 2 },
        state: DeliveryState::Delivered,
        next_at: None,
    };
    s.record_attempt(id, &ok).await.unwrap();
    let (d1, _) = s.delivery(&ws.id, id).await.unwrap().unwrap();
    assert_eq!((d1.state, d1.delivered_at), (DeliveryState::Delivered, Some(later)));
    assert_eq!(s.webhook(&ws.id, &all.id).await.unwrap().unwrap().failing_since, None);
    assert!(s.delivery(&WorkspaceId::random(&OsRandom).unwrap(), id).await.unwrap().is_none(), "another workspace's");

    // Redelivery makes it due again, counting afresh, under the same message id.
    assert!(s.redeliver(&ws.id, id, later).await.unwrap());
    let (d2, _) = s.delivery(&ws.id, id).await.unwrap().unwrap();
    assert_eq!((d2.state, d2.attempts, d2.message_id.as_str()), (DeliveryState::Pending, 0, d1.message_id.as_str()));
    assert_eq!(s.next_delivery_due().await.unwrap(), Some(T0), "the unsent one is still due first");

    // Many claimers at once never share a delivery.
    for i in 0..30 {
        s.append_audit(&audit(&ws.id, "token.suspend", &format!("tok_{i}"))).await.unwrap();
    }
    let at = later.plus_seconds(3_600);
    let (x, y, z) = tokio::join!(
        s.claim_deliveries(at, 60_000, "x", 12),
        s.claim_deliveries(at, 60_000, "y", 12),
        s.claim_deliveries(at, 60_000, "z", 12)
    );
    // (On PostgreSQL a claimer racing another may take fewer than it could; the next pass takes
    // the rest.)
    let rest = s.claim_deliveries(at, 60_000, "w", 50).await.unwrap();
    let mut ids: Vec<i64> = [x.unwrap(), y.unwrap(), z.unwrap(), rest].concat().iter().map(|d| d.id).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((ids.len(), n), (32, 32), "every due delivery claimed once");

    // A disabled endpoint's deliveries wait; pruning keeps what is pending.
    let mut disabled = s.webhook(&ws.id, &all.id).await.unwrap().unwrap();
    disabled.enabled = false;
    s.update_webhook(&disabled, &audit(&ws.id, "webhook.update", all.id.as_str())).await.unwrap();
    assert!(s.claim_deliveries(at.plus_seconds(3_600), 60_000, "x", 50).await.unwrap().is_empty());
    assert_eq!(s.next_delivery_due().await.unwrap(), None);
    let far = AttemptOutcome { next_at: Some(at.plus_seconds(36_000)), ..fail.clone() };
    s.record_attempt(ids[0], &far).await.unwrap();
    assert_eq!(s.resume_deliveries(&ws.id, &all.id, at.plus_seconds(60)).await.unwrap(), 1, "due again at once");
    assert_eq!(s.delivery(&ws.id, ids[0]).await.unwrap().unwrap().0.next_at, Some(at.plus_seconds(60)));
    s.record_attempt(id, &ok).await.unwrap();
    assert_eq!(s.prune_deliveries(at.plus_seconds(86_400)).await.unwrap(), 1, "only the delivered one");
    assert!(s.delivery(&ws.id, id).await.unwrap().is_none());

    // Deleting an endpoint deletes its deliveries; deleting the workspace, its endpoints.
    assert!(s.delete_webhook(&ws.id, &all.id, &audit(&ws.id, "webhook.delete", all.id.as_str())).await.unwrap());
    assert!(s.list_deliveries(&ws.id, None, &page).await.unwrap().items.is_empty());
    assert!(!s.delete_webhook(&ws.id, &all.id, &audit(&ws.id, "webhook.delete", all.id.as_str())).await.unwrap());
    s.delete_workspace(&ws.id, T0, true, &audit(&ws.id, "workspace.delete", ws.id.as_str())).await.unwrap();
    assert!(s.list_webhooks(&ws.id).await.unwrap().is_empty());
}

async fn siem_outbox(h: &Harness) {
    use keygate_core::siem::{SiemStore, Sink};
    let s = &h.store;
    let (ws, d) = workspace("siem");
    s.ensure_workspace(&ws, &d).await.unwrap();
    s.append_audit(&audit(&ws.id, "token.update", "tok_before")).await.unwrap();
    assert_eq!(s.siem_backlog(Sink::Syslog).await.unwrap(), 0, "nothing is queued without a sink");
    s.set_siem_sinks(&[Sink::Syslog, Sink::Http]);
    for i in 0..5 {
        s.append_audit(&audit(&ws.id, "token.update", &format!("tok_{i}"))).await.unwrap();
    }
    assert_eq!((s.siem_backlog(Sink::Syslog).await.unwrap(), s.siem_backlog(Sink::Http).await.unwrap()), (5, 5));
    let now = T0.plus_seconds(1);
    let a = s.claim_siem(Sink::Syslog, now, 60_000, "a", 3).await.unwrap();
    assert_eq!(a.ids.len(), 3);
    let ev: serde_json::Value = serde_json::from_str(&a.events[0]).unwrap();
    assert_eq!((ev["target"].as_str(), ev["action"].as_str()), (Some("tok_0"), Some("token.update")));
    assert!(ev["link"].as_str().unwrap().len() == 64, "with its chain link");
    let b = s.claim_siem(Sink::Syslog, now, 60_000, "b", 10).await.unwrap();
    assert_eq!(b.ids.len(), 2, "the leased ones are not taken twice");
    s.retry_siem(&a.ids, now.plus_seconds(5), "down").await.unwrap();
    assert!(s.claim_siem(Sink::Syslog, now.plus_seconds(1), 60_000, "c", 10).await.unwrap().ids.is_empty());
    let again = s.claim_siem(Sink::Syslog, now.plus_seconds(5), 60_000, "c", 10).await.unwrap();
    assert_eq!((again.ids.clone(), again.attempts), (a.ids.clone(), 1));
    s.ack_siem(&again.ids).await.unwrap();
    assert_eq!(s.siem_backlog(Sink::Syslog).await.unwrap(), 2);
    assert_eq!(s.trim_siem(Sink::Http, 2).await.unwrap(), 3, "the oldest beyond the newest 2");
    let left = s.claim_siem(Sink::Http, now, 60_000, "a", 10).await.unwrap();
    let targets: Vec<String> = left
        .events
        .iter()
        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap()["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(targets, ["tok_3", "tok_4"]);
    assert_eq!(s.trim_siem(Sink::Http, 2).await.unwrap(), 0);
    s.set_siem_sinks(&[]);
}

fn test_alert(
    id: &str,
    token: (&WorkspaceId, &keygate_core::anomaly::Watched, &AppId),
    kind: keygate_core::anomaly::AlertKind,
    severity: keygate_core::anomaly::Severity,
    key: &str,
    at: Timestamp,
) -> keygate_core::anomaly::Alert {
    let finding = keygate_core::anomaly::Finding {
        kind,
        severity,
        key: key.to_owned(),
        summary: "s".into(),
        evidence: json!({"n": 1}),
    };
    keygate_core::anomaly::Alert::open(keygate_core::ids::AlertId::parse(id).unwrap(), token, finding, at)
}

async fn anomaly_alerts(h: &Harness) {
    use keygate_core::anomaly::{AlertFilter, AlertKind, AlertStatus, AlertStore, Baseline, Raised, Severity, Watched};
    let s = &h.store;
    let (ws, d) = workspace("alerts");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (ws2, d2) = workspace("others");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let tok = Watched::Token(keygate_core::ids::TokenId::from_public_id("abcdefghijkl"));

    // Baselines and sightings: a first sighting is new once, whoever records it.
    assert_eq!(s.load_baseline(&tok).await.unwrap(), (None, Default::default()));
    let b = Baseline { first_ms: 5, last_ms: 9, active_minutes: 3, overall: 2.5, ..Baseline::default() };
    s.save_baselines(&[(tok.clone(), ws.id.clone(), b.clone())], T0).await.unwrap();
    let b2 = Baseline { active_minutes: 4, ..b.clone() };
    s.save_baselines(&[(tok.clone(), ws.id.clone(), b2.clone())], T0).await.unwrap();
    let values = vec![("network", "203.0.113.0/24".to_owned()), ("route", "GET orders".to_owned())];
    assert_eq!(s.record_sightings(&tok, &values, T0).await.unwrap(), values);
    let more = vec![("network", "203.0.113.0/24".to_owned()), ("agent", "curl/8".to_owned())];
    assert_eq!(s.record_sightings(&tok, &more, T0).await.unwrap(), vec![("agent", "curl/8".to_owned())]);
    let (loaded, known) = s.load_baseline(&tok).await.unwrap();
    assert_eq!(loaded, Some(b2));
    assert!(known.networks.contains("203.0.113.0/24") && known.routes.contains("GET orders"));
    assert!(known.agents.contains("curl/8"));
    // Many at once (more than one statement's worth), new and known tokens together.
    let many: Vec<_> = (0..2_500u32)
        .map(|i| {
            let t = Watched::Token(keygate_core::ids::TokenId::from_public_id(&format!("m{i:011}")));
            (t, ws.id.clone(), Baseline { active_minutes: i, ..b.clone() })
        })
        .collect();
    s.save_baselines(&many[..10], T0).await.unwrap();
    s.save_baselines(&many, T0).await.unwrap();
    for i in [0, 9, 10, 1_999, 2_499] {
        assert_eq!(s.load_baseline(&many[i].0).await.unwrap().0.as_ref(), Some(&many[i].2), "baseline {i}");
    }

    // Alerts: one per token, kind and key while unresolved; a repeat counts.
    let alert = |id: &str, kind: AlertKind, severity: Severity, key: &str, at: Timestamp| {
        test_alert(id, (&ws.id, &tok, &d.id), kind, severity, key, at)
    };
    let a1 = alert("al_1", AlertKind::RateSpike, Severity::Medium, "", T0);
    let ev = audit(&ws.id, "anomaly.detected", tok.as_str());
    assert!(matches!(s.raise_alert(&a1, &ev).await.unwrap(), Raised::New(_)));
    let again = alert("al_2", AlertKind::RateSpike, Severity::High, "", T0.plus_seconds(5));
    let Raised::Repeat(rep) = s.raise_alert(&again, &ev).await.unwrap() else { panic!("a repeat") };
    assert_eq!((rep.id.as_str(), rep.occurrences, rep.severity), ("al_1", 2, Severity::High));
    let net = alert("al_3", AlertKind::NewNetwork, Severity::Low, "203.0.113.0/24", T0.plus_seconds(6));
    assert!(matches!(s.raise_alert(&net, &ev).await.unwrap(), Raised::New(_)));
    assert_eq!(all_audit(s, &ws.id).await.iter().filter(|e| e.action == "anomaly.detected").count(), 2);
    s.set_alert_action(&a1.id, "suspended").await.unwrap();

    let all = s.list_alerts(&ws.id, &AlertFilter::default(), &PageRequest { limit: 1, cursor: None }).await.unwrap();
    assert_eq!(all.items[0].id.as_str(), "al_3", "newest first");
    let next = PageRequest { limit: 1, cursor: all.next_cursor.clone() };
    let second = s.list_alerts(&ws.id, &AlertFilter::default(), &next).await.unwrap();
    assert_eq!(second.items[0].action.as_deref(), Some("suspended"));
    assert!(second.next_cursor.is_none());
    let high = AlertFilter { severity: Some(Severity::High), ..AlertFilter::default() };
    assert_eq!(s.list_alerts(&ws.id, &high, &PageRequest::default()).await.unwrap().items.len(), 1);
    assert!(s.list_alerts(&ws2.id, &AlertFilter::default(), &PageRequest::default()).await.unwrap().items.is_empty());
    assert!(s.alert(&ws2.id, &a1.id).await.unwrap().is_none(), "tenant isolation");

    let ack = audit(&ws.id, "alert.acknowledge", "al_1");
    assert!(s.set_alert_status(&ws.id, &a1.id, AlertStatus::Acknowledged, "rk_x", T0, &ack).await.unwrap());
    assert!(!s.set_alert_status(&ws.id, &a1.id, AlertStatus::Acknowledged, "rk_x", T0, &ack).await.unwrap());
    assert!(!s.set_alert_status(&ws2.id, &a1.id, AlertStatus::Resolved, "rk_x", T0, &ack).await.unwrap());
    assert!(s.set_alert_status(&ws.id, &a1.id, AlertStatus::Resolved, "rk_y", T0, &ack).await.unwrap());
    let got = s.alert(&ws.id, &a1.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.acknowledged_by.as_deref(), got.resolved_by.as_deref()),
        (AlertStatus::Resolved, Some("rk_x"), Some("rk_y"))
    );
    // Once resolved, the same finding opens a new alert.
    let later = alert("al_4", AlertKind::RateSpike, Severity::Medium, "", T0.plus_seconds(60));
    assert!(matches!(s.raise_alert(&later, &ev).await.unwrap(), Raised::New(_)));
    let counts = s.alert_counts().await.unwrap();
    let n = |sev, st| counts.iter().find(|(a, b, _)| *a == sev && *b == st).map_or(0, |c| c.2);
    assert_eq!(
        (
            n(Severity::High, AlertStatus::Resolved),
            n(Severity::Medium, AlertStatus::Open),
            n(Severity::Low, AlertStatus::Open)
        ),
        (1, 1, 1)
    );

    // An OAuth client's baseline and alerts, apart from any token's and read back as a client's.
    let client = Watched::Client("kgc_abcdefghij".into());
    assert_eq!(s.record_sightings(&client, &values[..1], T0).await.unwrap(), values[..1]);
    assert!(s.load_baseline(&client).await.unwrap().1.routes.is_empty(), "the client's own sightings");
    let on_client = test_alert("al_5", (&ws.id, &client, &d.id), AlertKind::RateSpike, Severity::Low, "", T0);
    let ev = audit(&ws.id, "anomaly.detected", client.as_str());
    assert!(matches!(s.raise_alert(&on_client, &ev).await.unwrap(), Raised::New(_)), "not a repeat of the token's");
    let of_client = AlertFilter { subject: Some(client.clone()), ..AlertFilter::default() };
    let got = s.list_alerts(&ws.id, &of_client, &PageRequest::default()).await.unwrap().items;
    assert_eq!(got.iter().map(|a| (a.id.as_str(), &a.subject)).collect::<Vec<_>>(), [("al_5", &client)]);
}

/// The detector lease (one holder at a time, renewed by it, taken over once it ran out,
/// released at shutdown) and the activity other nodes ship to its holder (taken once, in order,
/// bounded per take, dropped when stale).
async fn anomaly_cluster(h: &Harness) {
    use keygate_core::anomaly::{Activity, AlertStore, Watched};
    let s = &h.store;
    let at = |ms: i64| Timestamp::from_millis(T0.as_millis() + ms);
    const LEASE: i64 = 15_000;
    assert!(s.claim_detector("n1", at(0), at(LEASE)).await.unwrap(), "no holder: taken");
    assert!(!s.claim_detector("n2", at(1_000), at(1_000 + LEASE)).await.unwrap(), "held by n1");
    assert!(s.claim_detector("n1", at(5_000), at(5_000 + LEASE)).await.unwrap(), "renewed");
    assert!(!s.claim_detector("n2", at(19_000), at(19_000 + LEASE)).await.unwrap(), "the renewal holds");
    assert!(s.claim_detector("n2", at(21_000), at(21_000 + LEASE)).await.unwrap(), "ran out: taken over");
    assert!(!s.claim_detector("n1", at(22_000), at(22_000 + LEASE)).await.unwrap());
    s.release_detector("n1").await.unwrap();
    assert!(!s.claim_detector("n1", at(23_000), at(23_000 + LEASE)).await.unwrap(), "n1 cannot release n2's");
    s.release_detector("n2").await.unwrap();
    assert!(s.claim_detector("n1", at(24_000), at(24_000 + LEASE)).await.unwrap(), "released: taken at once");

    let act = |subject: Watched, requests: u64| Activity {
        subject,
        workspace_id: WorkspaceId::from_trusted("ws_1".into()),
        app_id: AppId::from_trusted("app_1".into()),
        from_ms: 1,
        to_ms: 2,
        requests,
        networks: vec![("203.0.113.0/24".into(), requests)],
        routes: vec![("GET orders".into(), requests)],
        agents: vec![("curl/8".into(), requests)],
        ..Activity::default()
    };
    let tok = Watched::Token(TokenId::from_public_id("abcdefghijkl"));
    let client = Watched::Client("kgc_abcdefghij".into());
    let first = vec![act(tok.clone(), 3), act(client.clone(), 1)];
    s.ship_activity("n2", &first, at(30_000)).await.unwrap();
    s.ship_activity("n3", &[act(tok.clone(), 4)], at(31_000)).await.unwrap();
    s.ship_activity("n2", &[act(tok.clone(), 5)], at(32_000)).await.unwrap();
    let (taken, stale) = s.take_activity(2, at(0)).await.unwrap();
    assert_eq!(stale, 0);
    assert_eq!(taken, [first.clone(), vec![act(tok.clone(), 4)]].concat(), "two turns, in order, as shipped");
    let (taken, _) = s.take_activity(2, at(0)).await.unwrap();
    assert_eq!(taken, vec![act(tok.clone(), 5)]);
    assert_eq!(s.take_activity(2, at(0)).await.unwrap(), (vec![], 0), "taken once");
    // Nobody took it in time: dropped and counted, not judged.
    s.ship_activity("n2", &first, at(40_000)).await.unwrap();
    assert_eq!(s.take_activity(2, at(40_001)).await.unwrap(), (vec![], 1));
    // A turn of many tokens is shipped in rows of a bounded size and taken whole.
    let many: Vec<Activity> =
        (0..4_500u32).map(|i| act(Watched::Token(TokenId::from_public_id(&format!("t{i:011}"))), 1)).collect();
    s.ship_activity("n2", &many, at(50_000)).await.unwrap();
    let (taken, _) = s.take_activity(256, at(0)).await.unwrap();
    assert_eq!(taken, many);
}

async fn anomaly_purge(h: &Harness) {
    use keygate_core::anomaly::{AlertKind, AlertStatus, AlertStore, Baseline, Purged, Severity, Watched};
    let s = &h.store;
    let (ws, d) = workspace("purge");
    s.ensure_workspace(&ws, &d).await.unwrap();
    const DAY: i64 = 86_400;
    let with = |name: &str, f: &dyn Fn(&mut TokenRecord)| {
        let mut t = token(&ws.id, &d.id, name, T0);
        f(&mut t);
        t
    };
    let live = with("live", &|_| {});
    let revoked = with("revoked", &|t| {
        t.state = TokenState::Revoked;
        t.revoked_at = Some(T0);
    });
    let long_expired = with("long-expired", &|t| t.expires_at = Some(T0.plus_seconds(-40 * DAY)));
    let just_expired = with("just-expired", &|t| t.expires_at = Some(T0.plus_seconds(-DAY)));
    for t in [&live, &revoked, &long_expired, &just_expired] {
        s.insert_token(t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    }
    let gone = Watched::Token(TokenId::from_public_id("zzzzzzzzzzzz"));
    // An OAuth client's state is kept while the client exists.
    let client = oauth_client(&ws.id, &d.id);
    s.insert_oauth_client(&client, &audit(&ws.id, "oauth_client.create", &client.client_id)).await.unwrap();
    let ids: Vec<Watched> = [&live, &revoked, &long_expired, &just_expired]
        .iter()
        .map(|t| Watched::Token(t.id.clone()))
        .chain([gone.clone(), Watched::Client(client.client_id.clone()), Watched::Client("kgc_deleted".into())])
        .collect();
    for id in &ids {
        s.save_baselines(&[(id.clone(), ws.id.clone(), Baseline::default())], T0).await.unwrap();
        s.record_sightings(id, &[("network", "203.0.113.0/24".to_owned())], T0).await.unwrap();
    }
    let alert = |id: &str, at: Timestamp| {
        test_alert(id, (&ws.id, &Watched::Token(live.id.clone()), &d.id), AlertKind::NewNetwork, Severity::Low, id, at)
    };
    let ev = audit(&ws.id, "anomaly.detected", live.id.as_str());
    for (id, resolved) in [("al_old", Some(-20 * DAY)), ("al_recent", Some(-DAY)), ("al_open", None)] {
        let a = alert(id, T0.plus_seconds(-30 * DAY));
        s.raise_alert(&a, &ev).await.unwrap();
        if let Some(at) = resolved {
            let r = audit(&ws.id, "alert.resolve", id);
            s.set_alert_status(&ws.id, &a.id, AlertStatus::Resolved, "rk_x", T0.plus_seconds(at), &r).await.unwrap();
        }
    }
    let purged = s.purge_anomaly_state(T0.plus_seconds(-30 * DAY), T0.plus_seconds(-10 * DAY)).await.unwrap();
    assert_eq!(purged, Purged { baselines: 4, sightings: 4, alerts: 1 });
    for (id, kept) in ids.iter().zip([true, false, false, true, false, true, false]) {
        let (b, known) = s.load_baseline(id).await.unwrap();
        assert_eq!((b.is_some(), !known.networks.is_empty()), (kept, kept), "{id}");
    }
    assert!(s.alert(&ws.id, &keygate_core::ids::AlertId::parse("al_old").unwrap()).await.unwrap().is_none());
    for id in ["al_recent", "al_open"] {
        assert!(s.alert(&ws.id, &keygate_core::ids::AlertId::parse(id).unwrap()).await.unwrap().is_some(), "{id}");
    }
    assert_eq!(
        s.purge_anomaly_state(T0.plus_seconds(-30 * DAY), T0.plus_seconds(-10 * DAY)).await.unwrap(),
        Purged::default()
    );
}

async fn call_log(h: &Harness) {
    use keygate_core::model::{CallFilter, CallRecord};
    use keygate_core::store::CallStore;
    let s = &h.store;
    let (ws, d) = workspace("calls");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let tok = keygate_core::ids::TokenId::from_public_id("abcdefghijkl");
    let call = |i: i64, status: u16, token: bool| CallRecord {
        id: 0,
        workspace_id: ws.id.clone(),
        at: T0.plus_seconds(i),
        token_id: token.then(|| tok.clone()),
        app_id: token.then(|| d.id.clone()),
        route: Some("orders".into()),
        method: "GET".into(),
        path: format!("/orders/{i}"),
        status,
        latency_us: 100 + u64::try_from(i).unwrap(),
        client_ip: "203.0.113.7".into(),
        refusal: (status >= 400).then(|| "insufficient_scope".to_owned()),
    };
    // 45 writes of ten calls, one every ten seconds: two chunks each (with and without a token).
    let batch: Vec<CallRecord> = (0..450).map(|i| call(i, if i % 3 == 0 { 403 } else { 200 }, i % 2 == 0)).collect();
    for write in batch.chunks(10) {
        s.insert_calls(write).await.unwrap();
    }
    let wsid = ws.id.clone();
    let all = |f: CallFilter| {
        let wsid = wsid.clone();
        async move {
            let mut n = 0;
            let mut cursor = None;
            loop {
                let p = s.list_calls(&wsid, &f, &PageRequest { limit: 100, cursor }).await.unwrap();
                n += p.items.len();
                match p.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => return n,
                }
            }
        }
    };
    assert_eq!(all(CallFilter::default()).await, 450);
    let first = s.list_calls(&ws.id, &CallFilter::default(), &PageRequest { limit: 1, cursor: None }).await.unwrap();
    let newest = &first.items[0];
    assert_eq!(
        (newest.path.as_str(), newest.latency_us, newest.route.as_deref()),
        ("/orders/449", 549, Some("orders"))
    );
    assert_eq!(newest.token_id, None);
    assert_eq!(all(CallFilter { token_id: Some(tok.clone()), ..CallFilter::default() }).await, 225);
    assert_eq!(all(CallFilter { status: Some(4), ..CallFilter::default() }).await, 150);
    assert_eq!(all(CallFilter { status: Some(403), refused: Some(true), ..CallFilter::default() }).await, 150);
    assert_eq!(
        all(CallFilter { refused: Some(false), app_id: Some(d.id.clone()), ..CallFilter::default() }).await,
        150
    );
    let window = CallFilter { from: Some(T0.plus_seconds(10)), to: Some(T0.plus_seconds(20)), ..CallFilter::default() };
    assert_eq!(all(window).await, 10);
    let (other, od) = workspace("quiet");
    s.ensure_workspace(&other, &od).await.unwrap();
    assert!(s.list_calls(&other.id, &CallFilter::default(), &PageRequest::default()).await.unwrap().items.is_empty());
    // Any path comes back as it went in (quotes, backslashes, non-ASCII).
    let odd = CallRecord { path: "/o'r\"d\\ers/ü%20x".into(), refusal: None, ..call(500, 200, false) };
    s.insert_calls(std::slice::from_ref(&odd)).await.unwrap();
    let back = s.list_calls(&ws.id, &CallFilter::default(), &PageRequest { limit: 1, cursor: None }).await.unwrap();
    assert_eq!(back.items[0].path, odd.path);
    assert_eq!((back.items[0].status, back.items[0].token_id.clone()), (200, None));
    // Retention: the oldest chunks go, in slices (the first ten writes' twenty chunks).
    assert_eq!(s.trim_calls(T0.plus_seconds(100), 6).await.unwrap(), 6);
    assert_eq!(s.trim_calls(T0.plus_seconds(100), 60).await.unwrap(), 14);
    assert_eq!(s.trim_calls(T0.plus_seconds(100), 60).await.unwrap(), 0);
    assert_eq!(all(CallFilter::default()).await, 351);
    // A filter that matches one call in a quarter of a million: pages stop after examining a
    // bounded number of calls and say where to go on; following them finds it.
    let (big, bd) = workspace("busy");
    s.ensure_workspace(&big, &bd).await.unwrap();
    let many: Vec<CallRecord> = (0..250_000)
        .map(|i| CallRecord {
            workspace_id: big.id.clone(),
            status: if i == 0 { 500 } else { 200 },
            path: "/orders".into(),
            ..call(1000 + i / 1000, 200, false)
        })
        .collect();
    s.insert_calls(&many).await.unwrap();
    let f = CallFilter { status: Some(5), ..CallFilter::default() };
    let first = s.list_calls(&big.id, &f, &PageRequest { limit: 10, cursor: None }).await.unwrap();
    assert!(first.items.is_empty() && first.next_cursor.is_some(), "{:?}", first.next_cursor);
    let second = s.list_calls(&big.id, &f, &PageRequest { limit: 10, cursor: first.next_cursor }).await.unwrap();
    assert_eq!((second.items.len(), second.next_cursor), (1, None));
    assert_eq!(second.items[0].at, T0.plus_seconds(1000));
    let newest = s.list_calls(&big.id, &CallFilter::default(), &PageRequest { limit: 3, cursor: None }).await.unwrap();
    assert_eq!(newest.items.len(), 3);
    assert!(newest.items.windows(2).all(|w| w[0].id > w[1].id));
    assert!(
        s.list_calls(&ws.id, &CallFilter::default(), &PageRequest { limit: 1, cursor: Some("x".into()) })
            .await
            .is_err()
    );
}

async fn verify_ws(s: &SqlStore, ws: &WorkspaceId, key: [u8; 32]) -> Option<&'static str> {
    s.verify_audit_chain(ws, key, None).await.unwrap().broken.map(|b| b.code)
}

conformance!(
    workspaces_and_apps,
    token_lifecycle,
    change_feed,
    routes,
    workspace_lifecycle,
    root_keys_plans_and_scopes,
    root_key_lifecycle,
    deleting_apps,
    usage_and_quota_counts,
    llm_usage_and_spending,
    llm_providers,
    llm_logs,
    token_llm_budget,
    accounts_users,
    accounts_recovery_codes,
    accounts_sessions,
    accounts_memberships,
    accounts_invitations,
    accounts_policy_and_app_owners,
    audit_append,
    accounts_plan_requests,
    oauth_clients,
    oauth_signing_keys,
    oauth_refresh_rotation,
    oauth_refresh_concurrent_use,
    oauth_access_tokens_and_revocations,
    oauth_client_suspension,
    oauth_prune,
    node_registry_and_propagation,
    feed_pruning,
    audit_chain,
    webhook_outbox,
    siem_outbox,
    anomaly_alerts,
    call_log,
    anomaly_purge,
    anomaly_cluster,
    apis_and_publish_requests,
    api_subscriptions,
    usage_refusals
);

/// Subscriptions: one live subscription per app, API and version (the unique index holds it
/// whichever way it is added), moves only from the state the caller saw, every change on the
/// route feed, the gateway's list of active ones with their plan's limits, another workspace's
/// invisible, and the app's and the API's deletion taking their subscriptions with them.
async fn api_subscriptions(h: &Harness) {
    use keygate_core::apis::{Api, ApiState, ApiStore};
    use keygate_core::ids::{ApiId, SubscriptionId};
    use keygate_core::subscriptions::{
        ApiAccess, Subscription, SubscriptionFilter, SubscriptionStatus, SubscriptionStore,
    };
    let s = &h.store;
    let (ws, d) = workspace("subs");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (ws2, d2) = workspace("subs-other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let a = app(&ws.id, "shop", false);
    s.insert_app(&a, &audit(&ws.id, "app.create", a.id.as_str())).await.unwrap();
    let mut p = plan(&ws.id, "metered");
    p.rate_limit = Some(RateLimit { requests: 3, per_seconds: 3600, burst: 0 });
    p.quota = Some(Quota { requests: 100, period: QuotaPeriod::Day });
    s.insert_plan(&p, &audit(&ws.id, "plan.create", p.id.as_str())).await.unwrap();
    let api = Api {
        id: ApiId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        name: "orders".into(),
        description: String::new(),
        openapi: None,
        state: ApiState::Published,
        deprecated_at: None,
        sunset: None,
        successor: None,
        versions: vec![],
        access: ApiAccess::Approval,
        created_at: T0,
        updated_at: T0,
    };
    s.insert_api(&api, &audit(&ws.id, "api.create", api.id.as_str())).await.unwrap();
    assert_eq!(s.api(&ws.id, &api.id).await.unwrap().unwrap().access, ApiAccess::Approval);

    let pending = Subscription {
        id: SubscriptionId::random(&OsRandom).unwrap(),
        workspace_id: ws.id.clone(),
        app_id: a.id.clone(),
        api_id: api.id.clone(),
        version: None,
        plan_id: Some(p.id.clone()),
        status: SubscriptionStatus::Pending,
        requested_by: "usr_dev".into(),
        created_at: T0,
        decided_by: None,
        decided_at: None,
        reason: None,
    };
    let pos = s.routes_position().await.unwrap();
    s.insert_subscription(&pending, &audit(&ws.id, "subscription.requested", pending.id.as_str())).await.unwrap();
    assert!(s.routes_position().await.unwrap() > pos, "a subscription moves the route feed");
    assert_eq!(s.subscription(&ws.id, &pending.id).await.unwrap(), Some(pending.clone()));
    assert_eq!(s.subscription(&ws2.id, &pending.id).await.unwrap(), None, "another workspace's is not found");
    assert!(s.active_subscriptions().await.unwrap().iter().all(|g| g.id != pending.id), "pending is not active");
    // A second live one to the same API and version is refused; another version is another.
    let twin = Subscription { id: SubscriptionId::random(&OsRandom).unwrap(), ..pending.clone() };
    let err = s.insert_subscription(&twin, &audit(&ws.id, "subscription.create", "x")).await.unwrap_err();
    assert_eq!(err.code, "subscription_exists");
    let v1 = Subscription {
        id: SubscriptionId::random(&OsRandom).unwrap(),
        version: Some("v1".into()),
        status: SubscriptionStatus::Active,
        ..twin.clone()
    };
    s.insert_subscription(&v1, &audit(&ws.id, "subscription.create", v1.id.as_str())).await.unwrap();
    assert_eq!(s.count_app_subscriptions(&ws.id, &a.id).await.unwrap(), 2);

    // Approved once: the second decision finds it changed.
    let approved = Subscription {
        status: SubscriptionStatus::Active,
        decided_by: Some("usr_owner".into()),
        decided_at: Some(T0.plus_seconds(5)),
        ..pending.clone()
    };
    let pos = s.routes_position().await.unwrap();
    s.update_subscription(&approved, SubscriptionStatus::Pending, &audit(&ws.id, "subscription.approve", "x"))
        .await
        .unwrap();
    assert!(s.routes_position().await.unwrap() > pos);
    let again = s
        .update_subscription(&approved, SubscriptionStatus::Pending, &audit(&ws.id, "subscription.approve", "x"))
        .await
        .unwrap_err();
    assert_eq!(again.code, "subscription_changed");
    let foreign = Subscription { workspace_id: ws2.id.clone(), ..approved.clone() };
    let err = s
        .update_subscription(&foreign, SubscriptionStatus::Active, &audit(&ws2.id, "subscription.cancel", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code, "subscription_changed", "another workspace cannot change it");

    // The gateway's list: active ones, with the plan's limits (none for a subscription without).
    let grants: Vec<_> =
        s.active_subscriptions().await.unwrap().into_iter().filter(|g| g.workspace_id == ws.id).collect();
    assert_eq!(grants.len(), 2);
    let whole = grants.iter().find(|g| g.id == pending.id).unwrap();
    assert_eq!((whole.rate_limit, whole.quota, whole.version.as_deref()), (p.rate_limit, p.quota, None));
    assert_eq!(grants.iter().find(|g| g.id == v1.id).unwrap().version.as_deref(), Some("v1"));

    // Lists filter by app, API and status, newest first.
    let all = s.list_subscriptions(&ws.id, &SubscriptionFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let f = SubscriptionFilter { status: Some(SubscriptionStatus::Pending), ..SubscriptionFilter::default() };
    assert!(s.list_subscriptions(&ws.id, &f).await.unwrap().is_empty());
    let f = SubscriptionFilter { app_id: Some(a.id.clone()), api_id: Some(api.id.clone()), status: None };
    assert_eq!(s.list_subscriptions(&ws.id, &f).await.unwrap().len(), 2);
    assert!(s.list_subscriptions(&ws2.id, &SubscriptionFilter::default()).await.unwrap().is_empty());

    // Cancelled, a new one may be made.
    let cancelled =
        Subscription { status: SubscriptionStatus::Cancelled, reason: Some("done".into()), ..approved.clone() };
    s.update_subscription(&cancelled, SubscriptionStatus::Active, &audit(&ws.id, "subscription.cancel", "x"))
        .await
        .unwrap();
    assert_eq!(s.subscription(&ws.id, &pending.id).await.unwrap(), Some(cancelled));
    s.insert_subscription(&twin, &audit(&ws.id, "subscription.requested", twin.id.as_str())).await.unwrap();

    // Deleting the API takes its subscriptions; deleting an app takes its own.
    let b = app(&ws.id, "other", false);
    s.insert_app(&b, &audit(&ws.id, "app.create", b.id.as_str())).await.unwrap();
    let api2 = Api { id: ApiId::random(&OsRandom).unwrap(), name: "billing".into(), ..api.clone() };
    s.insert_api(&api2, &audit(&ws.id, "api.create", api2.id.as_str())).await.unwrap();
    let theirs = Subscription {
        id: SubscriptionId::random(&OsRandom).unwrap(),
        app_id: b.id.clone(),
        api_id: api2.id.clone(),
        status: SubscriptionStatus::Active,
        ..pending.clone()
    };
    s.insert_subscription(&theirs, &audit(&ws.id, "subscription.create", theirs.id.as_str())).await.unwrap();
    assert!(s.delete_api(&ws.id, &api.id, &audit(&ws.id, "api.delete", api.id.as_str())).await.unwrap());
    assert_eq!(s.count_app_subscriptions(&ws.id, &a.id).await.unwrap(), 0);
    s.delete_app(&ws.id, &b.id, false, T0, &audit(&ws.id, "app.delete", b.id.as_str())).await.unwrap();
    assert_eq!(s.subscription(&ws.id, &theirs.id).await.unwrap(), None);
}

/// Refusal counts: added to per workspace, route, reason and hour (also within one batch),
/// summed per reason and day for the reports, another workspace's apart.
async fn usage_refusals(h: &Harness) {
    use keygate_core::model::RefusalCount;
    let s = &h.store;
    let (ws, d) = workspace("refusals");
    s.ensure_workspace(&ws, &d).await.unwrap();
    let (ws2, d2) = workspace("refusals-other");
    s.ensure_workspace(&ws2, &d2).await.unwrap();
    let count = |ws: &WorkspaceId, route: &str, reason: &str, hour: i64, n: u64| RefusalCount {
        workspace_id: ws.clone(),
        route: route.into(),
        reason: reason.into(),
        hour: Timestamp::from_millis(hour * 3_600_000),
        status: 401,
        requests: n,
    };
    let day = 20_000 * 24;
    s.record_refusals(&[
        count(&ws.id, "orders", "unknown_token", day, 2),
        count(&ws.id, "orders", "unknown_token", day, 1),
        count(&ws.id, "misc", "unknown_token", day + 1, 4),
        count(&ws.id, "orders", "missing_token", day + 25, 5),
        count(&ws2.id, "orders", "unknown_token", day, 9),
    ])
    .await
    .unwrap();
    s.record_refusals(&[count(&ws.id, "orders", "unknown_token", day, 10)]).await.unwrap();
    let from = Timestamp::from_millis(day * 3_600_000);
    let rows = s.refusals_by_day(&ws.id, from, Timestamp::from_millis((day + 48) * 3_600_000)).await.unwrap();
    let got: Vec<(String, i64, u64)> =
        rows.iter().map(|r| (r.reason.clone(), r.hour.as_millis(), r.requests)).collect();
    assert_eq!(
        got,
        [("unknown_token".to_owned(), day * 3_600_000, 17), ("missing_token".to_owned(), (day + 24) * 3_600_000, 5)]
    );
    assert_eq!(rows[0].status, 401);
    let first_day = s.refusals_by_day(&ws.id, from, Timestamp::from_millis((day + 24) * 3_600_000)).await.unwrap();
    assert_eq!(first_day.len(), 1, "the range's end is exclusive");
}

/// A PostgreSQL node hears about changes another node commits, through LISTEN/NOTIFY, and a
/// node that was not listening converges by its catch-up read.
#[tokio::test]
async fn postgres_nodes_converge() {
    let h = postgres().await;
    let url = match pg_admin_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{}", h.pg.as_ref().unwrap().name),
        None => unreachable!(),
    };
    let other = open(&StoreLocation::Postgres(url)).await.unwrap();
    let mut signal = other.subscribe();
    let (ws, d) = workspace("acme");
    h.store.ensure_workspace(&ws, &d).await.unwrap();
    let t = token(&ws.id, &d.id, "a", T0);
    h.store.insert_token(&t, &audit(&ws.id, "token.create", t.id.as_str())).await.unwrap();
    let woke = tokio::time::timeout(std::time::Duration::from_secs(30), signal.changed()).await;
    assert_eq!(woke.ok(), Some(true), "the other node is woken");
    let changes = other.changes_since(0, 10).await.unwrap();
    assert_eq!(changes.last().map(|c| &c.id), Some(&t.id));
    other.close().await;
    drop(other);
    h.finish().await;
}

/// On PostgreSQL an access-token revocation notifies every node, like a token change: the trigger
/// on `jti_revocations` sends the new position on the change-feed channel at commit.
#[tokio::test]
async fn postgres_revocations_notify() {
    let h = postgres().await;
    let url = match pg_admin_url().rsplit_once('/') {
        Some((base, _)) => format!("{base}/{}", h.pg.as_ref().unwrap().name),
        None => unreachable!(),
    };
    let (ws, _, c) = oauth_setup(&h.store, "acme").await;
    let t = access_token(&c, None, "jti-notify", T0, 600);
    h.store.insert_access_token(&t).await.unwrap();
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen(crate::feed::CHANNEL).await.unwrap();
    assert!(h.store.revoke_access_token(&t.jti, T0, &audit(&ws.id, "oauth.token_revoke", "jti")).await.unwrap());
    let n = tokio::time::timeout(std::time::Duration::from_secs(30), listener.recv()).await.unwrap().unwrap();
    let seq = h.store.revocations_since(0, 10).await.unwrap()[0].seq;
    assert_eq!(n.payload(), seq.to_string());
    drop(listener);
    h.finish().await;
}

#[tokio::test]
async fn a_corrupt_sqlite_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keygate.db"), b"this is not a database, just some text that is long enough")
        .unwrap();
    let e = open(&StoreLocation::DataDir(dir.path().to_owned())).await.err().unwrap();
    assert!(matches!(e.code, "store_corrupt" | "store_migration_failed"), "{e}");
}

#[tokio::test]
async fn an_unreachable_postgres_is_a_clear_error() {
    let e = open(&StoreLocation::Postgres("postgres://postgres@127.0.0.1:1/none?connect_timeout=2".into()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code, "store_unavailable", "{e}");
}
