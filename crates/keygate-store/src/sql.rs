//! [`SqlStore`]: the store traits over a `sqlx` `Any` pool. The SQL is written once in the
//! subset SQLite and PostgreSQL share (`$n` placeholders, `ON CONFLICT`, `RETURNING`); the
//! engines differ only in their migrations.

use std::sync::Arc;

use async_trait::async_trait;
use keygate_core::ids::{AppId, PlanId, RootKeyId, TokenId, WorkspaceId};
use keygate_core::model::{
    App, AuditEvent, AuditFilter, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, NewAuditEvent, Page, PageRequest, Plan, RootKey,
    ScopeEntry, TokenFilter, TokenRecord, TokenStatus, Workspace,
};
use keygate_core::model::{LastUse, QuotaCount, UsageRecord};
use keygate_core::oauth::JtiRevocation;
use keygate_core::scope::Scope;
use keygate_core::secret::SecretHash;
use keygate_core::store::{
    AppStore, AuditStore, ChangeFeed, ChangeSignal, PlanStore, RootKeyStore, Snapshot, Store, TokenChange, TokenStore,
    UsageStore, WorkspaceDeletion, WorkspaceStore,
};
use keygate_core::{Error, Result, Timestamp};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};
use tokio::sync::watch;

use crate::feed::{self, WatchSignal};
use crate::rows::{self, opt_to_json, to_json};
use crate::{Engine, db_error};

pub(crate) type Tx = Transaction<'static, Any>;
pub(crate) type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

// Every SQL string passed as `AssertSqlSafe` below is built only from these constants and
// numbered placeholders; values always travel as bind parameters.
const TOKEN_COLS: &str = "id, workspace_id, app_id, name, hash, prefix, last4, scopes, state, expires_at, \
    ip_allowlist, rate_limit, quota, metadata, created_at, updated_at, last_used_at, last_used_ip, revoked_at, \
    revoke_reason, rotated_from, replaced_by, exposed_at, version, dpop_jkt, llm_budget, max_uses";
const APP_COLS: &str = "id, workspace_id, name, description, plan_id, is_default, metadata, created_at, updated_at, rate_limit, quota, \
     llm_budget";
const PLAN_COLS: &str = "id, workspace_id, name, description, scopes, rate_limit, quota, created_at, pricing";
const ROOT_KEY_COLS: &str =
    "id, workspace_id, name, hash, last4, permissions, created_at, expires_at, revoked_at, last_used_at";

/// The SQL store. Clone-free: hold it as `Arc<SqlStore>` or `Arc<dyn Store>`.
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    pub(crate) engine: Engine,
    /// The audit chain's key (derived from the pepper by the admin service; see
    /// `Store::set_audit_chain_key`).
    chain_key: parking_lot::RwLock<[u8; 32]>,
    /// Whether events also go to the email outbox (`NotifyStore::set_email_outbox`).
    pub(crate) email_outbox: std::sync::atomic::AtomicBool,
    /// The SIEM sinks events are streamed to (`SiemStore::set_siem_sinks`): a bit per sink.
    pub(crate) siem_sinks: std::sync::atomic::AtomicU8,
    feed: Arc<watch::Sender<u64>>,
    listener: Option<tokio::task::AbortHandle>,
}

impl Drop for SqlStore {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

impl SqlStore {
    pub(crate) async fn start(pool: AnyPool, engine: Engine, url: String) -> Result<Arc<Self>> {
        let seq = sqlx::query_scalar::<_, i64>("SELECT seq FROM feed_state WHERE id = 1")
            .fetch_one(&pool)
            .await
            .map_err(db_error)?;
        let (tx, _rx) = watch::channel(u64::try_from(seq).unwrap_or(0));
        let feed = Arc::new(tx);
        // Only PostgreSQL has writers in other processes whose changes we must hear about.
        let listener = (engine == Engine::Postgres)
            .then(|| tokio::spawn(feed::follow_postgres(url, pool.clone(), feed.clone())).abort_handle());
        Ok(Arc::new(Self {
            pool,
            engine,
            chain_key: parking_lot::RwLock::new([0; 32]),
            email_outbox: Default::default(),
            siem_sinks: Default::default(),
            feed,
            listener,
        }))
    }

    /// The row of `select` (a table with `workspace_id` and `id`) with this id in workspace `ws`;
    /// another workspace's row is `None`, as if it did not exist.
    /// Runs `delete` (`… WHERE workspace_id = $1 AND <key> = $2`), then each of `also` with the
    /// same two parameters, and writes `audit`, in one transaction. `false`, with nothing
    /// written, when `delete` matched no row.
    pub(crate) async fn delete_in_workspace(
        &self,
        delete: &'static str,
        also: &[&'static str],
        ws: &WorkspaceId,
        key: &str,
        audit: &NewAuditEvent,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(delete).bind(ws.as_str()).bind(key).execute(&mut *tx).await.map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for sql in also {
            sqlx::query(*sql).bind(ws.as_str()).bind(key).execute(&mut *tx).await.map_err(db_error)?;
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        Ok(true)
    }

    pub(crate) async fn one_in_workspace<T>(
        &self,
        select: &str,
        ws: &WorkspaceId,
        id: &str,
        decode: fn(&AnyRow) -> Result<T>,
    ) -> Result<Option<T>> {
        let sql = format!("{select} WHERE workspace_id = $1 AND id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(decode)
            .transpose()
    }

    /// One page of `select` (a table with `created_at` and `id`) under conditions `c`, newest
    /// first, with a keyset cursor `<created_at ms>.<id>`.
    pub(crate) async fn newest_first<T>(
        &self,
        select: &str,
        mut c: Conditions,
        page: &PageRequest,
        decode: fn(&AnyRow) -> Result<T>,
        key: impl Fn(&T) -> (Timestamp, String),
    ) -> Result<Page<T>> {
        if let Some(cursor) = &page.cursor {
            let (ms, id) = parse_time_cursor(cursor)?;
            c.push("(created_at < ? OR (created_at = ? AND id < ?))", vec![Arg::Int(ms), Arg::Int(ms), Arg::Text(id)]);
        }
        let limit = page_size(page);
        let sql =
            format!("{select} {} ORDER BY created_at DESC, id DESC LIMIT {}", c.where_clause(), c.next_placeholder());
        let rows =
            c.bind(sqlx::query(AssertSqlSafe(sql))).bind(limit + 1).fetch_all(&self.pool).await.map_err(db_error)?;
        paginate(&rows, limit, decode, |t: &T| {
            let (at, id) = key(t);
            format!("{}.{id}", at.as_millis())
        })
    }

    /// What writing an audit event needs: the chain's key, and whether events go to the email
    /// outbox too.
    pub(crate) fn chain_key(&self) -> AuditKeys {
        AuditKeys {
            chain: *self.chain_key.read(),
            email: self.email_outbox.load(std::sync::atomic::Ordering::Relaxed),
            siem: self.siem_sinks.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub(crate) fn put_chain_key(&self, key: [u8; 32]) {
        *self.chain_key.write() = key;
    }

    /// Closes the pool; in-flight queries finish first.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) async fn begin(&self) -> Result<Tx> {
        self.pool.begin().await.map_err(db_error)
    }

    /// Commits `tx`, then wakes change-feed followers if it carried token changes.
    pub(crate) async fn commit(&self, tx: Tx, feed_seq: Option<u64>) -> Result<()> {
        tx.commit().await.map_err(db_error)?;
        if let Some(seq) = feed_seq {
            self.feed.send_if_modified(|cur| feed::bump(cur, seq));
        }
        Ok(())
    }
}

/// See [`SqlStore::chain_key`].
#[derive(Clone, Copy)]
pub(crate) struct AuditKeys {
    pub(crate) chain: [u8; 32],
    pub(crate) email: bool,
    /// A bit per `keygate_core::siem::Sink` (see `crate::siem`).
    pub(crate) siem: u8,
}

pub(crate) async fn insert_audit(tx: &mut Tx, chain_key: &AuditKeys, e: &NewAuditEvent) -> Result<()> {
    insert_change_audit(tx, chain_key, e, None).await
}

/// Writes an audit event that records the token change at feed position `feed_seq` (so the
/// event can show how far that change spread, see `NodeStore::record_propagation`), linked into
/// its workspace's hash chain under `chain_key` (see [`crate::audit`]).
pub(crate) async fn insert_change_audit(
    tx: &mut Tx,
    chain_key: &AuditKeys,
    e: &NewAuditEvent,
    feed_seq: Option<u64>,
) -> Result<()> {
    let before = opt_to_json(&e.before)?;
    let after = opt_to_json(&e.after)?;
    let feed_seq = feed_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    let (seq, prev) = crate::audit::lock_head(tx, e.workspace_id.as_str()).await?;
    let fields = keygate_core::audit_chain::LinkFields {
        workspace_id: e.workspace_id.as_str(),
        seq,
        at_ms: e.at.as_millis(),
        actor: &e.actor,
        action: &e.action,
        target: &e.target,
        before: before.as_deref(),
        after: after.as_deref(),
        source: e.source.as_deref(),
        feed_seq,
    };
    let link = keygate_core::audit_chain::to_hex(&keygate_core::audit_chain::link(&chain_key.chain, &prev, &fields));
    let event_id = sqlx::query_scalar::<_, i64>(
        "INSERT INTO audit_events (workspace_id, at, actor, action, target, before_json, after_json, source, feed_seq, \
         chain_seq, link) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id",
    )
    .bind(e.workspace_id.as_str())
    .bind(e.at.as_millis())
    .bind(e.actor.as_str())
    .bind(e.action.as_str())
    .bind(e.target.as_str())
    .bind(before.as_deref())
    .bind(after.as_deref())
    .bind(e.source.as_deref())
    .bind(feed_seq)
    .bind(i64::try_from(seq).unwrap_or(i64::MAX))
    .bind(link.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)?;
    crate::audit::move_head(tx, e.workspace_id.as_str(), seq, &link).await?;
    if chain_key.siem != 0 {
        let streamed = keygate_core::siem::StreamedEvent {
            id: event_id,
            workspace_id: e.workspace_id.as_str(),
            at: e.at,
            actor: &e.actor,
            action: &e.action,
            target: &e.target,
            source: e.source.as_deref(),
            before: before.as_deref(),
            after: after.as_deref(),
            chain_seq: seq,
            link: &link,
        };
        crate::siem::enqueue(tx, chain_key.siem, &streamed).await?;
    }
    crate::notify::fan_out(tx, e, event_id, before.as_deref(), after.as_deref(), chain_key.email).await
}

/// Takes the next feed sequence number. It must be the first write of its transaction: the
/// row lock it takes orders writers, so numbers become visible in commit order.
async fn next_seq(tx: &mut Tx) -> Result<u64> {
    let seq = sqlx::query_scalar::<_, i64>("UPDATE feed_state SET seq = seq + 1 WHERE id = 1 RETURNING seq")
        .fetch_one(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(u64::try_from(seq).unwrap_or(0))
}

/// The feed positions one transaction hands out. The first is taken when the transaction starts
/// (its first write, see [`next_seq`]); more are reserved as the changes need them. The
/// transaction holds `feed_state`'s row lock throughout, so its positions are consecutive.
pub(crate) struct FeedSeqs {
    /// Taken at the start and not handed out yet.
    spare: Option<u64>,
    /// The highest position handed out: the one to announce after commit.
    last: Option<u64>,
}

impl FeedSeqs {
    pub(crate) async fn start(tx: &mut Tx) -> Result<Self> {
        Ok(Self { spare: Some(next_seq(tx).await?), last: None })
    }

    /// `n` more positions, in order: the spare one first, the rest reserved in one statement.
    pub(crate) async fn take(&mut self, tx: &mut Tx, n: u64) -> Result<std::ops::Range<u64>> {
        if n == 0 {
            return Ok(0..0);
        }
        let (start, end) = match self.spare.take() {
            Some(first) if n == 1 => (first, first),
            Some(first) => (first, reserve_seqs(tx, n - 1).await?),
            None => {
                let end = reserve_seqs(tx, n).await?;
                (end.saturating_sub(n - 1), end)
            }
        };
        self.last = Some(end);
        Ok(start..end.saturating_add(1))
    }

    /// The position to announce after commit, if any change was recorded.
    pub(crate) fn last(&self) -> Option<u64> {
        self.last
    }
}

/// Moves the feed position `n` further in one statement; returns the new position.
async fn reserve_seqs(tx: &mut Tx, n: u64) -> Result<u64> {
    let end = sqlx::query_scalar::<_, i64>("UPDATE feed_state SET seq = seq + $1 WHERE id = 1 RETURNING seq")
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .fetch_one(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(u64::try_from(end).unwrap_or(0))
}

pub(crate) async fn record_change(
    tx: &mut Tx,
    seq: u64,
    token: &TokenId,
    hash: &SecretHash,
    at: Timestamp,
) -> Result<()> {
    sqlx::query("INSERT INTO token_changes (seq, token_id, token_hash, at) VALUES ($1, $2, $3, $4)")
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(token.as_str())
        .bind(hash.as_bytes().to_vec())
        .bind(at.as_millis())
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
}

fn bind_token<'q>(q: AnyQuery<'q>, t: &'q TokenRecord) -> Result<AnyQuery<'q>> {
    let allowlist: Vec<String> = t.ip_allowlist.iter().map(ToString::to_string).collect();
    Ok(q.bind(t.id.as_str())
        .bind(t.workspace_id.as_str())
        .bind(t.app_id.as_str())
        .bind(t.name.as_str())
        .bind(t.hash.as_bytes().to_vec())
        .bind(t.prefix.as_str())
        .bind(t.last4.as_str())
        .bind(to_json(&t.scopes)?)
        .bind(t.state.as_str())
        .bind(t.expires_at.map(Timestamp::as_millis))
        .bind(to_json(&allowlist)?)
        .bind(opt_to_json(&t.rate_limit)?)
        .bind(opt_to_json(&t.quota)?)
        .bind(to_json(&t.metadata)?)
        .bind(t.created_at.as_millis())
        .bind(t.updated_at.as_millis())
        .bind(t.last_used_at.map(Timestamp::as_millis))
        .bind(t.last_used_ip.as_deref())
        .bind(t.revoked_at.map(Timestamp::as_millis))
        .bind(t.revoke_reason.as_deref())
        .bind(t.rotated_from.as_ref().map(TokenId::as_str))
        .bind(t.replaced_by.as_ref().map(TokenId::as_str))
        .bind(t.exposed_at.map(Timestamp::as_millis))
        .bind(t.version)
        .bind(t.dpop_jkt.as_deref())
        .bind(opt_to_json(&t.llm_budget)?)
        .bind(t.max_uses.map(|n| i64::try_from(n).unwrap_or(i64::MAX))))
}

async fn insert_token_row(tx: &mut Tx, t: &TokenRecord) -> Result<()> {
    let sql = format!(
        "INSERT INTO tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
         $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27)"
    );
    bind_token(sqlx::query(AssertSqlSafe(sql)), t)?.execute(&mut **tx).await.map_err(db_error)?;
    Ok(())
}

/// Writes every mutable column of `t` if the stored version is `t.version - 1`.
async fn update_token_row(tx: &mut Tx, t: &TokenRecord) -> Result<()> {
    let allowlist: Vec<String> = t.ip_allowlist.iter().map(ToString::to_string).collect();
    let done = sqlx::query(
        "UPDATE tokens SET name = $1, app_id = $2, scopes = $3, state = $4, expires_at = $5, ip_allowlist = $6, \
         rate_limit = $7, quota = $8, metadata = $9, updated_at = $10, revoked_at = $11, revoke_reason = $12, \
         replaced_by = $13, exposed_at = $14, version = $15, dpop_jkt = $16, llm_budget = $17, max_uses = $18 \
         WHERE id = $19 AND workspace_id = $20 AND version = $21",
    )
    .bind(t.name.as_str())
    .bind(t.app_id.as_str())
    .bind(to_json(&t.scopes)?)
    .bind(t.state.as_str())
    .bind(t.expires_at.map(Timestamp::as_millis))
    .bind(to_json(&allowlist)?)
    .bind(opt_to_json(&t.rate_limit)?)
    .bind(opt_to_json(&t.quota)?)
    .bind(to_json(&t.metadata)?)
    .bind(t.updated_at.as_millis())
    .bind(t.revoked_at.map(Timestamp::as_millis))
    .bind(t.revoke_reason.as_deref())
    .bind(t.replaced_by.as_ref().map(TokenId::as_str))
    .bind(t.exposed_at.map(Timestamp::as_millis))
    .bind(t.version)
    .bind(t.dpop_jkt.as_deref())
    .bind(opt_to_json(&t.llm_budget)?)
    .bind(t.max_uses.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
    .bind(t.id.as_str())
    .bind(t.workspace_id.as_str())
    .bind(t.version - 1)
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    if done.rows_affected() == 0 {
        return Err(Error::conflict(
            "concurrent_update",
            "the token changed while this request was processed; read it again and retry",
        ));
    }
    Ok(())
}

pub(crate) fn page_size(page: &PageRequest) -> i64 {
    let n = if page.limit == 0 { DEFAULT_PAGE_SIZE } else { page.limit.min(MAX_PAGE_SIZE) };
    i64::from(n)
}

pub(crate) fn invalid_cursor() -> Error {
    Error::invalid("invalid_cursor", "the cursor is not one this API returned; start again without it")
}

/// Cursors of lists ordered by (created_at, id) descending: `<created_at ms>.<id>`.
fn parse_time_cursor(c: &str) -> Result<(i64, String)> {
    let (ms, id) = c.split_once('.').ok_or_else(invalid_cursor)?;
    let ms = ms.parse::<i64>().map_err(|_| invalid_cursor())?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(invalid_cursor());
    }
    Ok((ms, id.to_owned()))
}

/// A WHERE clause under construction with numbered placeholders.
pub(crate) struct Conditions {
    sql: Vec<String>,
    args: Vec<Arg>,
}

pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

impl Conditions {
    pub(crate) fn new() -> Self {
        Self { sql: Vec::new(), args: Vec::new() }
    }
    /// Adds a condition whose `?` marks are replaced by the next placeholders.
    pub(crate) fn push(&mut self, cond: &str, args: Vec<Arg>) {
        let mut out = String::new();
        let mut args = args.into_iter();
        for ch in cond.chars() {
            if ch == '?' {
                if let Some(a) = args.next() {
                    self.args.push(a);
                    out.push_str(&format!("${}", self.args.len()));
                }
            } else {
                out.push(ch);
            }
        }
        self.sql.push(out);
    }
    fn where_clause(&self) -> String {
        if self.sql.is_empty() { String::new() } else { format!("WHERE {}", self.sql.join(" AND ")) }
    }
    fn next_placeholder(&self) -> String {
        format!("${}", self.args.len() + 1)
    }
    fn bind<'q>(&'q self, mut q: AnyQuery<'q>) -> AnyQuery<'q> {
        for a in &self.args {
            q = match a {
                Arg::Text(s) => q.bind(s.as_str()),
                Arg::Int(i) => q.bind(*i),
            };
        }
        q
    }
}

fn like_pattern(s: &str) -> String {
    let escaped = s.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

#[async_trait]
impl WorkspaceStore for SqlStore {
    async fn ensure_workspace(&self, candidate: &Workspace, default_app: &App) -> Result<Workspace> {
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO workspaces (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(candidate.id.as_str())
        .bind(candidate.name.as_str())
        .bind(candidate.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if inserted.rows_affected() == 1 {
            insert_app_row(&mut tx, default_app).await?;
        }
        let row = sqlx::query("SELECT id, name, created_at FROM workspaces WHERE name = $1")
            .bind(candidate.name.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
        let ws = rows::workspace(&row)?;
        self.commit(tx, None).await?;
        Ok(ws)
    }

    async fn workspace(&self, id: &WorkspaceId) -> Result<Option<Workspace>> {
        sqlx::query("SELECT id, name, created_at FROM workspaces WHERE id = $1 AND deleted_at IS NULL")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::workspace)
            .transpose()
    }

    async fn workspace_by_name(&self, name: &str) -> Result<Option<Workspace>> {
        sqlx::query("SELECT id, name, created_at FROM workspaces WHERE name = $1 AND deleted_at IS NULL")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::workspace)
            .transpose()
    }

    async fn list_workspaces(&self) -> Result<Vec<Workspace>> {
        crate::workspaces::list(self).await
    }

    async fn rename_workspace(&self, id: &WorkspaceId, name: &str, audit: &NewAuditEvent) -> Result<()> {
        crate::workspaces::rename(self, id, name, audit).await
    }

    async fn delete_workspace(
        &self,
        id: &WorkspaceId,
        at: Timestamp,
        revoke_tokens: bool,
        audit: &NewAuditEvent,
    ) -> Result<WorkspaceDeletion> {
        crate::workspaces::delete(self, id, at, revoke_tokens, audit).await
    }
}

/// What `route_changes` records for a change of app `id`'s shared limits.
fn app_change(id: &AppId) -> String {
    format!("app:{id}")
}

async fn insert_app_row(tx: &mut Tx, app: &App) -> Result<()> {
    let sql = format!("INSERT INTO apps ({APP_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    sqlx::query(AssertSqlSafe(sql))
        .bind(app.id.as_str())
        .bind(app.workspace_id.as_str())
        .bind(app.name.as_str())
        .bind(app.description.as_deref())
        .bind(app.plan_id.as_ref().map(PlanId::as_str))
        .bind(i64::from(app.is_default))
        .bind(to_json(&app.metadata)?)
        .bind(app.created_at.as_millis())
        .bind(app.updated_at.as_millis())
        .bind(opt_to_json(&app.rate_limit)?)
        .bind(opt_to_json(&app.quota)?)
        .bind(opt_to_json(&app.llm_budget)?)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok(())
}

#[async_trait]
impl AppStore for SqlStore {
    async fn insert_app(&self, app: &App, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        if app.rate_limit.is_some() || app.quota.is_some() || app.llm_budget.is_some() {
            let seqs = FeedSeqs::start(&mut tx).await?;
            insert_app_row(&mut tx, app).await?;
            return crate::routes::commit_change(self, tx, seqs, &app_change(&app.id), audit.at, audit).await;
        }
        insert_app_row(&mut tx, app).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn app_limits(&self) -> Result<Vec<keygate_core::model::AppLimits>> {
        let rows = sqlx::query(
            "SELECT id, rate_limit, quota, llm_budget FROM apps \
                 WHERE rate_limit IS NOT NULL OR quota IS NOT NULL OR llm_budget IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok(keygate_core::model::AppLimits {
                    app_id: AppId::from_trusted(r.try_get("id").map_err(db_error)?),
                    rate_limit: rows::opt_json(r, "rate_limit")?,
                    quota: rows::opt_json(r, "quota")?,
                    llm_budget: rows::opt_json(r, "llm_budget")?,
                })
            })
            .collect()
    }

    async fn app(&self, ws: &WorkspaceId, id: &AppId) -> Result<Option<App>> {
        self.one_in_workspace(&format!("SELECT {APP_COLS} FROM apps"), ws, id.as_str(), rows::app).await
    }

    async fn default_app(&self, ws: &WorkspaceId) -> Result<App> {
        let sql = format!("SELECT {APP_COLS} FROM apps WHERE workspace_id = $1 AND is_default = 1");
        let row =
            sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_optional(&self.pool).await.map_err(db_error)?;
        row.as_ref().map(rows::app).transpose()?.ok_or_else(|| Error::not_found("app"))
    }

    async fn list_apps(&self, ws: &WorkspaceId, page: &PageRequest) -> Result<Page<App>> {
        let mut c = Conditions::new();
        c.push("workspace_id = ?", vec![Arg::Text(ws.as_str().to_owned())]);
        self.newest_first(&format!("SELECT {APP_COLS} FROM apps"), c, page, rows::app, |a: &App| {
            (a.created_at, a.id.to_string())
        })
        .await
    }

    async fn update_app(&self, app: &App, audit: &NewAuditEvent) -> Result<()> {
        // The shared limits as stored: a change to them is a change of the gateway's tables. Read
        // before the transaction, whose first statement must be a write: SQLite cannot turn a
        // reading transaction into a writing one while another writer holds the lock ("database
        // is locked"). Two changes of one app's limits at once are a lost update either way.
        let before = sqlx::query("SELECT rate_limit, quota, llm_budget FROM apps WHERE id = $1 AND workspace_id = $2")
            .bind(app.id.as_str())
            .bind(app.workspace_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        let mut tx = self.begin().await?;
        let limits_changed = match &before {
            Some(r) => {
                rows::opt_json::<keygate_core::policy::RateLimit>(r, "rate_limit")? != app.rate_limit
                    || rows::opt_json::<keygate_core::policy::Quota>(r, "quota")? != app.quota
                    || rows::opt_json::<keygate_core::llm::LlmBudget>(r, "llm_budget")? != app.llm_budget
            }
            None => false,
        };
        let seqs = if limits_changed { Some(FeedSeqs::start(&mut tx).await?) } else { None };
        let done = sqlx::query(
            "UPDATE apps SET name = $1, description = $2, plan_id = $3, metadata = $4, updated_at = $5, \
             rate_limit = $6, quota = $7, llm_budget = $10 WHERE id = $8 AND workspace_id = $9",
        )
        .bind(app.name.as_str())
        .bind(app.description.as_deref())
        .bind(app.plan_id.as_ref().map(PlanId::as_str))
        .bind(to_json(&app.metadata)?)
        .bind(app.updated_at.as_millis())
        .bind(opt_to_json(&app.rate_limit)?)
        .bind(opt_to_json(&app.quota)?)
        .bind(app.id.as_str())
        .bind(app.workspace_id.as_str())
        .bind(opt_to_json(&app.llm_budget)?)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("app"));
        }
        if let Some(seqs) = seqs {
            return crate::routes::commit_change(self, tx, seqs, &app_change(&app.id), audit.at, audit).await;
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn delete_app(
        &self,
        ws: &WorkspaceId,
        id: &AppId,
        revoke_tokens: bool,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<()> {
        let mut tx = self.begin().await?;
        // Taken first even when no token changes, so this transaction is a writer from the start.
        let mut seqs = FeedSeqs::start(&mut tx).await?;
        let is_default: Option<i64> =
            sqlx::query_scalar("SELECT is_default FROM apps WHERE workspace_id = $1 AND id = $2")
                .bind(ws.as_str())
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        match is_default {
            None => return Err(Error::not_found("app")),
            Some(0) => {}
            Some(_) => {
                return Err(Error::conflict("default_app", "the workspace's default app cannot be deleted"));
            }
        }
        let token_rows = sqlx::query("SELECT id, hash, state FROM tokens WHERE workspace_id = $1 AND app_id = $2")
            .bind(ws.as_str())
            .bind(id.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
        let mut token_ids = Vec::with_capacity(token_rows.len());
        for row in &token_rows {
            let tid: String = row.try_get("id").map_err(db_error)?;
            let hash: Vec<u8> = row.try_get("hash").map_err(db_error)?;
            let hash =
                SecretHash::from_slice(&hash).ok_or_else(|| Error::internal("a stored token hash is not 32 bytes"))?;
            let state: String = row.try_get("state").map_err(db_error)?;
            token_ids.push((tid, hash, state != "revoked"));
        }
        if token_ids.iter().any(|(_, _, live)| *live) && !revoke_tokens {
            return Err(Error::conflict(
                "app_has_tokens",
                "the app still has tokens; revoke them first, or delete with ?revoke_tokens=true to revoke and remove them with the app",
            ));
        }
        let positions = seqs.take(&mut tx, u64::try_from(token_ids.len()).unwrap_or(u64::MAX)).await?;
        for ((tid, hash, live), seq) in token_ids.iter().zip(positions) {
            let tid = TokenId::from_trusted(tid.clone());
            record_change(&mut tx, seq, &tid, hash, now).await?;
            if !live {
                continue;
            }
            let mut ev = audit.clone();
            ev.action = "token.revoke".into();
            ev.target = tid.as_str().to_owned();
            ev.before = None;
            ev.after = Some(serde_json::json!({"state": "revoked", "revoke_reason": "app deleted"}));
            insert_audit(&mut tx, &self.chain_key(), &ev).await?;
        }
        // Rows that reference the app go first: the foreign keys would refuse the app's deletion.
        crate::oauth::delete_app_oauth(&mut tx, &self.chain_key(), &mut seqs, ws, id, now, audit).await?;
        for table in ["app_owners", "api_subscriptions", "plan_requests", "tokens"] {
            sqlx::query(AssertSqlSafe(format!("DELETE FROM {table} WHERE workspace_id = $1 AND app_id = $2")))
                .bind(ws.as_str())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        sqlx::query("DELETE FROM apps WHERE workspace_id = $1 AND id = $2")
            .bind(ws.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, seqs.last()).await
    }
}

pub(crate) fn paginate<T>(
    rows: &[AnyRow],
    limit: i64,
    decode: fn(&AnyRow) -> Result<T>,
    cursor_of: impl Fn(&T) -> String,
) -> Result<Page<T>> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut items = rows.iter().take(limit).map(decode).collect::<Result<Vec<T>>>()?;
    let next_cursor = if rows.len() > limit { items.last().map(&cursor_of) } else { None };
    items.shrink_to_fit();
    Ok(Page { items, next_cursor })
}

#[async_trait]
impl TokenStore for SqlStore {
    async fn insert_token(&self, token: &TokenRecord, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let seq = next_seq(&mut tx).await?;
        insert_token_row(&mut tx, token).await?;
        record_change(&mut tx, seq, &token.id, &token.hash, token.updated_at).await?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, Some(seq)).await
    }

    async fn token(&self, ws: &WorkspaceId, id: &TokenId) -> Result<Option<TokenRecord>> {
        self.one_in_workspace(&format!("SELECT {TOKEN_COLS} FROM tokens"), ws, id.as_str(), rows::token).await
    }

    async fn token_by_hash(&self, hash: &SecretHash) -> Result<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE hash = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::token)
            .transpose()
    }

    async fn list_tokens(
        &self,
        ws: &WorkspaceId,
        filter: &TokenFilter,
        now: Timestamp,
        page: &PageRequest,
    ) -> Result<Page<TokenRecord>> {
        let now = now.as_millis();
        let mut c = Conditions::new();
        c.push("workspace_id = ?", vec![Arg::Text(ws.as_str().to_owned())]);
        if let Some(app) = &filter.app_id {
            c.push("app_id = ?", vec![Arg::Text(app.as_str().to_owned())]);
        }
        match filter.status {
            None => {}
            Some(TokenStatus::Revoked) => c.push("state = 'revoked'", vec![]),
            Some(TokenStatus::Expired) => {
                c.push("state <> 'revoked' AND expires_at IS NOT NULL AND expires_at <= ?", vec![Arg::Int(now)]);
            }
            Some(s @ (TokenStatus::Active | TokenStatus::Suspended)) => {
                let state = if s == TokenStatus::Active { "active" } else { "suspended" };
                c.push(
                    "state = ? AND (expires_at IS NULL OR expires_at > ?)",
                    vec![Arg::Text(state.into()), Arg::Int(now)],
                );
            }
        }
        if let Some(name) = &filter.name_contains {
            c.push("LOWER(name) LIKE ? ESCAPE '\\'", vec![Arg::Text(like_pattern(name))]);
        }
        if let Some(before) = filter.expiring_before {
            c.push("expires_at > ? AND expires_at <= ?", vec![Arg::Int(now), Arg::Int(before.as_millis())]);
        }
        if let Some(before) = filter.created_before {
            c.push("created_at < ?", vec![Arg::Int(before.as_millis())]);
        }
        if let Some(after) = filter.expired_after {
            c.push("expires_at > ?", vec![Arg::Int(after.as_millis())]);
        }
        if let Some(since) = filter.unused_since {
            c.push("COALESCE(last_used_at, created_at) < ?", vec![Arg::Int(since.as_millis())]);
        }
        match filter.exposed {
            Some(true) => c.push("exposed_at IS NOT NULL", vec![]),
            Some(false) => c.push("exposed_at IS NULL", vec![]),
            None => {}
        }
        self.newest_first(&format!("SELECT {TOKEN_COLS} FROM tokens"), c, page, rows::token, |t: &TokenRecord| {
            (t.created_at, t.id.to_string())
        })
        .await
    }

    async fn update_token(&self, token: &TokenRecord, audit: &NewAuditEvent) -> Result<u64> {
        let mut tx = self.begin().await?;
        let seq = next_seq(&mut tx).await?;
        update_token_row(&mut tx, token).await?;
        record_change(&mut tx, seq, &token.id, &token.hash, token.updated_at).await?;
        insert_change_audit(&mut tx, &self.chain_key(), audit, Some(seq)).await?;
        self.commit(tx, Some(seq)).await?;
        Ok(seq)
    }

    async fn rotate_token(
        &self,
        old: &TokenRecord,
        new: &TokenRecord,
        old_audit: &NewAuditEvent,
        new_audit: &NewAuditEvent,
    ) -> Result<u64> {
        let mut tx = self.begin().await?;
        let seq = next_seq(&mut tx).await?;
        update_token_row(&mut tx, old).await?;
        insert_token_row(&mut tx, new).await?;
        record_change(&mut tx, seq, &old.id, &old.hash, old.updated_at).await?;
        // The new token needs its own feed position: take the next one in the same transaction.
        let seq2 = next_seq(&mut tx).await?;
        record_change(&mut tx, seq2, &new.id, &new.hash, new.updated_at).await?;
        insert_change_audit(&mut tx, &self.chain_key(), old_audit, Some(seq2)).await?;
        insert_change_audit(&mut tx, &self.chain_key(), new_audit, Some(seq2)).await?;
        self.commit(tx, Some(seq2)).await?;
        Ok(seq2)
    }
}

#[async_trait]
impl RootKeyStore for SqlStore {
    async fn insert_root_key(&self, key: &RootKey, audit: &NewAuditEvent) -> Result<()> {
        let perms: Vec<&str> = key.permissions.iter().map(|p| p.as_str()).collect();
        let mut tx = self.begin().await?;
        let sql = format!("INSERT INTO root_keys ({ROOT_KEY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(key.id.as_str())
            .bind(key.workspace_id.as_str())
            .bind(key.name.as_str())
            .bind(key.hash.as_bytes().to_vec())
            .bind(key.last4.as_str())
            .bind(to_json(&perms)?)
            .bind(key.created_at.as_millis())
            .bind(key.expires_at.map(Timestamp::as_millis))
            .bind(key.revoked_at.map(Timestamp::as_millis))
            .bind(key.last_used_at.map(Timestamp::as_millis))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn root_key_by_hash(&self, hash: &SecretHash) -> Result<Option<RootKey>> {
        let sql = format!("SELECT {ROOT_KEY_COLS} FROM root_keys WHERE hash = $1");
        sqlx::query(AssertSqlSafe(sql))
            .bind(hash.as_bytes().to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::root_key)
            .transpose()
    }

    async fn root_key(&self, ws: &WorkspaceId, id: &RootKeyId) -> Result<Option<RootKey>> {
        let sql = format!("SELECT {ROOT_KEY_COLS} FROM root_keys WHERE workspace_id = $1 AND id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(rows::root_key)
            .transpose()
    }

    async fn list_root_keys(&self, ws: &WorkspaceId) -> Result<Vec<RootKey>> {
        let sql =
            format!("SELECT {ROOT_KEY_COLS} FROM root_keys WHERE workspace_id = $1 ORDER BY created_at DESC, id DESC");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::root_key).collect()
    }

    async fn all_root_keys(&self) -> Result<Vec<RootKey>> {
        let sql = format!("SELECT {ROOT_KEY_COLS} FROM root_keys ORDER BY created_at DESC, id DESC");
        let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::root_key).collect()
    }

    async fn revoke_root_key(&self, key: &RootKey, at: Timestamp, audit: &NewAuditEvent) -> Result<bool> {
        let mut tx = self.begin().await?;
        // Conditional, so that of two concurrent revocations exactly one writes its event.
        let done = sqlx::query(
            "UPDATE root_keys SET revoked_at = $3 WHERE workspace_id = $1 AND id = $2 AND revoked_at IS NULL",
        )
        .bind(key.workspace_id.as_str())
        .bind(key.id.as_str())
        .bind(at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected()
            == 1;
        if !done {
            tx.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await?;
        Ok(true)
    }

    async fn touch_root_key(&self, id: &RootKeyId, at: Timestamp, every_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE root_keys SET last_used_at = $2 WHERE id = $1 AND (last_used_at IS NULL OR last_used_at <= $3)",
        )
        .bind(id.as_str())
        .bind(at.as_millis())
        .bind(at.as_millis().saturating_sub(every_ms))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn credential_counts(&self) -> Result<(u64, u64)> {
        let count = |sql: &'static str| async move {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&self.pool).await.map_err(db_error)?;
            Ok::<u64, Error>(u64::try_from(n).unwrap_or(0))
        };
        Ok((count("SELECT COUNT(*) FROM root_keys").await?, count("SELECT COUNT(*) FROM tokens").await?))
    }
}

#[async_trait]
impl PlanStore for SqlStore {
    async fn insert_plan(&self, plan: &Plan, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let sql = format!("INSERT INTO plans ({PLAN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
        sqlx::query(AssertSqlSafe(sql))
            .bind(plan.id.as_str())
            .bind(plan.workspace_id.as_str())
            .bind(plan.name.as_str())
            .bind(plan.description.as_deref())
            .bind(to_json(&plan.scopes)?)
            .bind(opt_to_json(&plan.rate_limit)?)
            .bind(opt_to_json(&plan.quota)?)
            .bind(plan.created_at.as_millis())
            .bind(opt_to_json(&plan.pricing)?)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn update_plan(&self, plan: &Plan, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE plans SET name = $1, description = $2, scopes = $3, rate_limit = $4, quota = $5, pricing = $6 \
             WHERE workspace_id = $7 AND id = $8",
        )
        .bind(plan.name.as_str())
        .bind(plan.description.as_deref())
        .bind(to_json(&plan.scopes)?)
        .bind(opt_to_json(&plan.rate_limit)?)
        .bind(opt_to_json(&plan.quota)?)
        .bind(opt_to_json(&plan.pricing)?)
        .bind(plan.workspace_id.as_str())
        .bind(plan.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("plan"));
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn plan(&self, ws: &WorkspaceId, id: &PlanId) -> Result<Option<Plan>> {
        self.one_in_workspace(&format!("SELECT {PLAN_COLS} FROM plans"), ws, id.as_str(), rows::plan).await
    }

    async fn list_plans(&self, ws: &WorkspaceId) -> Result<Vec<Plan>> {
        let sql = format!("SELECT {PLAN_COLS} FROM plans WHERE workspace_id = $1 ORDER BY name");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(rows::plan).collect()
    }

    async fn put_scope(&self, entry: &ScopeEntry, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO scope_catalog (workspace_id, scope, description, api, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (workspace_id, scope) DO UPDATE SET description = excluded.description, api = excluded.api",
        )
        .bind(entry.workspace_id.as_str())
        .bind(entry.scope.as_str())
        .bind(entry.description.as_deref())
        .bind(entry.api.as_deref())
        .bind(entry.created_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn list_scopes(&self, ws: &WorkspaceId) -> Result<Vec<ScopeEntry>> {
        let rows = sqlx::query(
            "SELECT workspace_id, scope, description, api, created_at FROM scope_catalog WHERE workspace_id = $1 ORDER BY scope",
        )
        .bind(ws.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(rows::scope_entry).collect()
    }

    async fn delete_scope(&self, ws: &WorkspaceId, scope: &Scope, audit: &NewAuditEvent) -> Result<bool> {
        self.delete_in_workspace(
            "DELETE FROM scope_catalog WHERE workspace_id = $1 AND scope = $2",
            &[],
            ws,
            scope.as_str(),
            audit,
        )
        .await
    }
}

#[async_trait]
impl AuditStore for SqlStore {
    async fn list_audit(&self, ws: &WorkspaceId, filter: &AuditFilter, page: &PageRequest) -> Result<Page<AuditEvent>> {
        let mut c = Conditions::new();
        c.push("workspace_id = ?", vec![Arg::Text(ws.as_str().to_owned())]);
        for (col, v) in [("actor", &filter.actor), ("action", &filter.action), ("target", &filter.target)] {
            if let Some(v) = v {
                c.push(&format!("{col} = ?"), vec![Arg::Text(v.clone())]);
            }
        }
        if let Some(from) = filter.from {
            c.push("at >= ?", vec![Arg::Int(from.as_millis())]);
        }
        if let Some(to) = filter.to {
            c.push("at < ?", vec![Arg::Int(to.as_millis())]);
        }
        if let Some(cursor) = &page.cursor {
            let id = cursor.parse::<i64>().map_err(|_| invalid_cursor())?;
            c.push("id < ?", vec![Arg::Int(id)]);
        }
        let limit = page_size(page);
        let sql = format!(
            "SELECT id, workspace_id, at, actor, action, target, before_json, after_json, source, \
             k.nodes AS ack_nodes, k.applied AS ack_applied, k.elapsed_ms AS ack_elapsed_ms \
             FROM audit_events LEFT JOIN feed_acks k ON k.seq = audit_events.feed_seq {} \
             ORDER BY id DESC LIMIT {}",
            c.where_clause(),
            c.next_placeholder()
        );
        let rows =
            c.bind(sqlx::query(AssertSqlSafe(sql))).bind(limit + 1).fetch_all(&self.pool).await.map_err(db_error)?;
        paginate(&rows, limit, rows::audit_event, |e: &AuditEvent| e.id.to_string())
    }

    async fn append_audit(&self, event: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        insert_audit(&mut tx, &self.chain_key(), event).await?;
        self.commit(tx, None).await
    }

    fn set_audit_chain_key(&self, key: [u8; 32]) {
        self.put_chain_key(key);
    }

    async fn link_legacy_audit(&self) -> Result<u64> {
        self.link_legacy().await
    }

    async fn audit_chain_head(&self, ws: &WorkspaceId) -> Result<keygate_core::audit_chain::ChainHead> {
        self.chain_head(ws).await
    }

    async fn verify_audit_chain(
        &self,
        ws: &WorkspaceId,
        key: [u8; 32],
        checkpoint: Option<keygate_core::audit_chain::Checkpoint>,
    ) -> Result<keygate_core::audit_chain::ChainReport> {
        self.verify_chain(ws, key, checkpoint).await
    }

    async fn prune_audit(&self, before: Timestamp) -> Result<u64> {
        self.prune_chain(before).await
    }
}

const USAGE_COLS: &str = "token_id, workspace_id, route, minute, requests, status_2xx, status_3xx, status_4xx, \
    status_5xx, bytes_in, bytes_out, latency_us_sum, lat_1ms, lat_5ms, lat_10ms, lat_25ms, lat_50ms, lat_100ms, \
    lat_250ms, lat_500ms, lat_1s, lat_inf";

/// The sums of the usage counts of `token_usage u`, named as the columns, cast back to BIGINT
/// (PostgreSQL sums them as NUMERIC).
fn usage_sums() -> String {
    USAGE_COLS.split(", ").skip(4).map(|c| format!("CAST(SUM(u.{c}) AS BIGINT) AS {c}")).collect::<Vec<_>>().join(", ")
}

/// Rows per statement when flushing. SQLite looks a `$n` parameter up by a linear scan of the
/// statement's parameters, so binding costs grow with the square of their number: usage rows
/// (22 parameters) go one per statement, the 3-parameter rows in small batches. Measured in
/// docs/benchmarks.md (a 500-row batch made the flush ten times dearer, not cheaper).
const USAGE_ROWS: usize = 1;
const SMALL_ROWS: usize = 32;

/// `($first+1, …, $first+n)`, written in one buffer (a flush builds one per row written).
fn placeholders(first: usize, n: usize) -> String {
    let mut s = String::with_capacity(2 + n * 6);
    s.push('(');
    for i in first + 1..=first + n {
        if i > first + 1 {
            s.push_str(", ");
        }
        s.push('$');
        s.push_str(itoa::Buffer::new().format(i));
    }
    s.push(')');
    s
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A statement's text for a chunk of `n` rows, built once per distinct `n` within one flush:
/// every chunk but the last has the same length, so a flush of many rows builds it once or twice
/// instead of once per chunk, and each execution shares it.
struct ChunkSql<F: Fn(usize) -> String> {
    build: F,
    last: Option<(usize, Arc<str>)>,
}

impl<F: Fn(usize) -> String> ChunkSql<F> {
    fn new(build: F) -> Self {
        Self { build, last: None }
    }

    fn get(&mut self, n: usize) -> AssertSqlSafe<Arc<str>> {
        let sql = match &self.last {
            Some((m, sql)) if *m == n => sql.clone(),
            _ => {
                let sql: Arc<str> = (self.build)(n).into();
                self.last = Some((n, sql.clone()));
                sql
            }
        };
        AssertSqlSafe(sql)
    }
}

#[async_trait]
impl UsageStore for SqlStore {
    async fn record_usage(&self, usage: &[UsageRecord], last_used: &[LastUse], quota: &[QuotaCount]) -> Result<()> {
        if usage.is_empty() && last_used.is_empty() && quota.is_empty() {
            return Ok(());
        }
        // Every node writes its rows in the same order (by key), so two nodes flushing at once
        // (all stopping together) wait on each other instead of deadlocking; a deadlock still
        // reported (PostgreSQL picks one victim) is tried again.
        let mut usage = usage.to_vec();
        usage.sort_by(|a, b| (a.token_id.as_str(), &a.route, a.minute).cmp(&(b.token_id.as_str(), &b.route, b.minute)));
        let mut last_used = last_used.to_vec();
        last_used.sort_by(|a, b| a.token_id.as_str().cmp(b.token_id.as_str()));
        let mut quota = quota.to_vec();
        quota.sort_by(|a, b| a.token_id.as_str().cmp(b.token_id.as_str()));
        let mut tries = 0;
        loop {
            match self.record_usage_once(&usage, &last_used, &quota).await {
                Err(e) if e.code == "deadlock" && tries < 4 => {
                    tries += 1;
                    tracing::info!(tries, "usage flush met another node's; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(20 * tries)).await;
                }
                other => return other,
            }
        }
    }

    async fn usage(
        &self,
        ws: &WorkspaceId,
        token: &TokenId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRecord>> {
        let sql = format!(
            "SELECT {USAGE_COLS} FROM token_usage WHERE workspace_id = $1 AND token_id = $2 AND minute >= $3 \
             AND minute < $4 ORDER BY minute, route"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(token.as_str())
            .bind(from.as_millis())
            .bind(to.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(rows::usage).collect()
    }

    async fn record_refusals(&self, counts: &[keygate_core::model::RefusalCount]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        // One statement per batch, the rows as one JSON parameter (as the call log's chunks).
        let sql = match self.engine {
            crate::Engine::Sqlite => {
                "INSERT INTO usage_refusals (workspace_id, route, reason, hour, status, requests) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5 FROM json_each($1) WHERE true \
                 ON CONFLICT (workspace_id, hour, route, reason) DO UPDATE SET \
                 requests = usage_refusals.requests + excluded.requests, status = excluded.status"
            }
            crate::Engine::Postgres => {
                "INSERT INTO usage_refusals (workspace_id, route, reason, hour, status, requests) \
                 SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, (e->>4)::integer, (e->>5)::bigint \
                 FROM json_array_elements($1::json) AS e \
                 ON CONFLICT (workspace_id, hour, route, reason) DO UPDATE SET \
                 requests = usage_refusals.requests + excluded.requests, status = excluded.status"
            }
        };
        // Rows of one key summed first: one statement cannot touch a row twice (PostgreSQL).
        let mut summed: std::collections::BTreeMap<(&str, &str, &str, i64), (u16, u64)> = Default::default();
        for c in counts {
            let e = summed
                .entry((c.workspace_id.as_str(), c.route.as_str(), c.reason.as_str(), c.hour.as_millis()))
                .or_default();
            e.0 = c.status;
            e.1 = e.1.saturating_add(c.requests);
        }
        let rows: Vec<serde_json::Value> = summed
            .into_iter()
            .map(|((ws, route, reason, hour), (status, n))| serde_json::json!([ws, route, reason, hour, status, n]))
            .collect();
        for group in rows.chunks(1000) {
            let text = serde_json::to_string(group).map_err(|e| Error::internal(e.to_string()))?;
            sqlx::query(sql).bind(text).execute(&self.pool).await.map_err(db_error)?;
        }
        Ok(())
    }

    async fn refusals_by_day(
        &self,
        ws: &WorkspaceId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<keygate_core::model::RefusalCount>> {
        let rows = sqlx::query(
            "SELECT reason, (hour / 86400000) * 86400000 AS day, CAST(MAX(status) AS BIGINT) AS status, \
             CAST(SUM(requests) AS BIGINT) AS requests \
             FROM usage_refusals WHERE workspace_id = $1 AND hour >= $2 AND hour < $3 \
             GROUP BY reason, (hour / 86400000) * 86400000 ORDER BY day, reason LIMIT 100000",
        )
        .bind(ws.as_str())
        .bind(from.as_millis())
        .bind(to.as_millis())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let status: i64 = rows::get(r, "status")?;
                let requests: i64 = rows::get(r, "requests")?;
                Ok(keygate_core::model::RefusalCount {
                    workspace_id: ws.clone(),
                    route: String::new(),
                    reason: rows::get(r, "reason")?,
                    hour: rows::ts(r, "day")?,
                    status: u16::try_from(status).unwrap_or(0),
                    requests: u64::try_from(requests).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn usage_groups(
        &self,
        ws: &WorkspaceId,
        by: keygate_core::model::UsageGrouping,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<(String, UsageRecord)>> {
        use keygate_core::model::UsageGrouping as G;
        let key = match by {
            G::Token => "u.token_id",
            G::Route => "u.route",
            G::App => "COALESCE(t.app_id, '')",
            G::Day => "CAST(u.minute / 86400000 AS TEXT)",
        };
        let sql = format!(
            "SELECT {key} AS k, '' AS token_id, MIN(u.workspace_id) AS workspace_id, '' AS route, \
             CAST(MIN(u.minute) AS BIGINT) AS minute, {sums} FROM token_usage u LEFT JOIN tokens t ON t.id = u.token_id \
             WHERE u.workspace_id = $1 AND u.minute >= $2 AND u.minute < $3 GROUP BY {key}",
            sums = usage_sums()
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(from.as_millis())
            .bind(to.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(|r| Ok((r.try_get::<String, _>("k").map_err(db_error)?, rows::usage(r)?))).collect()
    }

    async fn app_usage(
        &self,
        ws: &WorkspaceId,
        app: &AppId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<Vec<UsageRecord>> {
        // Per token and route over [from, to).
        let sums = usage_sums();
        let sql = format!(
            "SELECT u.token_id, u.workspace_id, u.route, CAST($3 AS BIGINT) AS minute, {sums} FROM token_usage u \
             JOIN tokens t ON t.id = u.token_id WHERE u.workspace_id = $1 AND t.app_id = $2 AND u.minute >= $3 \
             AND u.minute < $4 GROUP BY u.token_id, u.workspace_id, u.route ORDER BY u.token_id, u.route"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(app.as_str())
            .bind(from.as_millis())
            .bind(to.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(rows::usage).collect()
    }

    async fn quota_counts(&self) -> Result<Vec<QuotaCount>> {
        let rows = sqlx::query("SELECT token_id, period_start, count FROM quota_counters")
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                let token_id: String = r.try_get("token_id").map_err(db_error)?;
                let period_start: i64 = r.try_get("period_start").map_err(db_error)?;
                let n: i64 = r.try_get("count").map_err(db_error)?;
                Ok(QuotaCount {
                    token_id: TokenId::from_trusted(token_id),
                    period_start,
                    count: u64::try_from(n).unwrap_or(0),
                })
            })
            .collect()
    }
}

#[async_trait]
impl ChangeFeed for SqlStore {
    async fn snapshot(&self, now: Timestamp) -> Result<Snapshot> {
        // The position is read first: tokens read afterwards are at least that current, and
        // re-applying a change a snapshot already holds is harmless.
        let seq = sqlx::query_scalar::<_, i64>("SELECT seq FROM feed_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        let sql = format!(
            "SELECT {TOKEN_COLS} FROM tokens WHERE state <> 'revoked' AND (expires_at IS NULL OR expires_at > $1)"
        );
        let rows =
            sqlx::query(AssertSqlSafe(sql)).bind(now.as_millis()).fetch_all(&self.pool).await.map_err(db_error)?;
        let tokens = rows.iter().map(rows::token).collect::<Result<Vec<_>>>()?;
        Ok(Snapshot { seq: u64::try_from(seq).unwrap_or(0), tokens })
    }

    async fn feed_position(&self) -> Result<u64> {
        let seq = sqlx::query_scalar::<_, i64>("SELECT seq FROM feed_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    async fn snapshot_page(&self, now: Timestamp, after: Option<&TokenId>, limit: u32) -> Result<Vec<TokenRecord>> {
        let sql = format!(
            "SELECT {TOKEN_COLS} FROM tokens WHERE state <> 'revoked' AND (expires_at IS NULL OR expires_at > $1 \
             OR (replaced_by IS NOT NULL AND expires_at > $4)) AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(now.as_millis())
            .bind(after.map_or("", TokenId::as_str))
            .bind(i64::from(limit))
            .bind(now.as_millis().saturating_sub(keygate_core::model::ROTATED_KEPT_MS))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter().map(rows::token).collect()
    }

    async fn changes_since(&self, seq: u64, limit: u32) -> Result<Vec<TokenChange>> {
        let cols: String = TOKEN_COLS.split(", ").map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT c.seq AS change_seq, c.token_id AS change_token, c.token_hash AS change_hash, {cols} FROM token_changes c \
             LEFT JOIN tokens t ON t.id = c.token_id WHERE c.seq > $1 ORDER BY c.seq LIMIT $2"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(i64::try_from(seq).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("change_seq").map_err(db_error)?;
                let id: String = row.try_get("change_token").map_err(db_error)?;
                let hash: Vec<u8> = row.try_get("change_hash").map_err(db_error)?;
                let hash = SecretHash::from_slice(&hash)
                    .ok_or_else(|| Error::internal("a change-feed hash is not 32 bytes"))?;
                let present: Option<String> = row.try_get("id").map_err(db_error)?;
                let record = match present {
                    Some(_) => Some(rows::token(row)?).filter(|t| t.state != keygate_core::model::TokenState::Revoked),
                    None => None,
                };
                Ok(TokenChange { seq: u64::try_from(seq).unwrap_or(0), id: TokenId::from_trusted(id), hash, record })
            })
            .collect()
    }

    async fn prune_feed(&self, before: Timestamp) -> Result<u64> {
        let mut tx = self.begin().await?;
        let top: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM token_changes WHERE at < $1")
            .bind(before.as_millis())
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
        let Some(top) = top else { return Ok(0) };
        // The floor first (it takes feed_state's row lock, as writers do first, so no writer
        // waits on rows this deletes), then the rows at or below it.
        sqlx::query(
            "UPDATE feed_state SET pruned_through = CASE WHEN pruned_through < $1 THEN $1 ELSE pruned_through END \
             WHERE id = 1",
        )
        .bind(top)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let done = sqlx::query("DELETE FROM token_changes WHERE seq <= $1")
            .bind(top)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.commit(tx, None).await?;
        Ok(done.rows_affected())
    }

    async fn feed_floor(&self) -> Result<u64> {
        let floor = sqlx::query_scalar::<_, i64>("SELECT pruned_through FROM feed_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(u64::try_from(floor).unwrap_or(0))
    }

    async fn revocations_since(&self, seq: u64, limit: u32) -> Result<Vec<JtiRevocation>> {
        let found =
            sqlx::query("SELECT seq, jti, expires_at FROM jti_revocations WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(i64::try_from(seq).unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        found.iter().map(rows::jti_revocation).collect()
    }

    async fn revoked_jtis(&self, now: Timestamp) -> Result<Vec<JtiRevocation>> {
        let found = sqlx::query("SELECT seq, jti, expires_at FROM jti_revocations WHERE expires_at > $1 ORDER BY seq")
            .bind(now.as_millis())
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
        found.iter().map(rows::jti_revocation).collect()
    }

    fn subscribe(&self) -> Box<dyn ChangeSignal> {
        Box::new(WatchSignal(self.feed.subscribe()))
    }

    fn position(&self) -> u64 {
        *self.feed.borrow()
    }
}

#[async_trait]
impl Store for SqlStore {
    fn engine(&self) -> &'static str {
        self.engine.as_str()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }
}

impl SqlStore {
    /// One attempt of [`UsageStore::record_usage`], with its rows in key order.
    async fn record_usage_once(
        &self,
        usage: &[UsageRecord],
        last_used: &[LastUse],
        quota: &[QuotaCount],
    ) -> Result<()> {
        let mut usage_sql = ChunkSql::new(|n| {
            let cols: Vec<&str> = USAGE_COLS.split(", ").collect();
            let rows: Vec<String> = (0..n).map(|r| placeholders(r * cols.len(), cols.len())).collect();
            // The key columns (token, workspace, route, minute) are kept; the counts add up.
            let updates: Vec<String> =
                cols.iter().skip(4).map(|c| format!("{c} = token_usage.{c} + excluded.{c}")).collect();
            format!(
                "INSERT INTO token_usage ({USAGE_COLS}) VALUES {} ON CONFLICT (token_id, route, minute) DO UPDATE SET {}",
                rows.join(", "),
                updates.join(", ")
            )
        });
        let mut last_used_sql = ChunkSql::new(|n| {
            let rows: Vec<String> = (0..n)
                .map(|r| {
                    format!(
                        "(CAST(${} AS TEXT), CAST(${} AS BIGINT), CAST(${} AS TEXT))",
                        3 * r + 1,
                        3 * r + 2,
                        3 * r + 3
                    )
                })
                .collect();
            format!(
                // VALUES columns are column1.. in both engines (SQLite cannot rename them).
                "UPDATE tokens SET last_used_at = v.column2, last_used_ip = v.column3 FROM (VALUES {}) AS v \
                 WHERE tokens.id = v.column1 AND (tokens.last_used_at IS NULL OR tokens.last_used_at < v.column2)",
                rows.join(", ")
            )
        });
        let mut quota_sql = ChunkSql::new(|n| {
            let rows: Vec<String> = (0..n).map(|r| placeholders(r * 3, 3)).collect();
            format!(
                "INSERT INTO quota_counters (token_id, period_start, count) VALUES {} \
                 ON CONFLICT (token_id) DO UPDATE SET \
                 count = CASE WHEN quota_counters.period_start = excluded.period_start \
                     THEN quota_counters.count + excluded.count ELSE excluded.count END, \
                 period_start = excluded.period_start",
                rows.join(", ")
            )
        });
        let mut tx = self.begin().await?;
        // Each statement is a round trip to the database (for SQLite, to its worker thread), and a
        // flush can hold one row per active token: the small rows go [`SMALL_ROWS`] to a
        // statement, usage rows [`USAGE_ROWS`] (see there why).
        for chunk in usage.chunks(USAGE_ROWS) {
            let mut q = sqlx::query(usage_sql.get(chunk.len()));
            for u in chunk {
                q = q
                    .bind(u.token_id.as_str())
                    .bind(u.workspace_id.as_str())
                    .bind(u.route.as_str())
                    .bind(u.minute.as_millis())
                    .bind(count(u.requests));
                for n in u.status {
                    q = q.bind(count(n));
                }
                q = q.bind(count(u.bytes_in)).bind(count(u.bytes_out)).bind(count(u.latency_us_sum));
                for n in u.latency {
                    q = q.bind(count(n));
                }
            }
            q.execute(&mut *tx).await.map_err(flush_error)?;
        }
        for chunk in last_used.chunks(SMALL_ROWS) {
            let mut q = sqlx::query(last_used_sql.get(chunk.len()));
            for l in chunk {
                q = q.bind(l.token_id.as_str()).bind(l.at.as_millis()).bind(l.ip.as_str());
            }
            q.execute(&mut *tx).await.map_err(flush_error)?;
        }
        for chunk in quota.chunks(SMALL_ROWS) {
            let mut q = sqlx::query(quota_sql.get(chunk.len()));
            for c in chunk {
                q = q.bind(c.token_id.as_str()).bind(c.period_start).bind(count(c.count));
            }
            q.execute(&mut *tx).await.map_err(flush_error)?;
        }
        self.commit(tx, None).await
    }
}

/// A flush's database error; a deadlock (PostgreSQL's 40P01) is told apart so it can be retried.
fn flush_error(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e
        && db.code().as_deref() == Some("40P01")
    {
        return Error::conflict("deadlock", "the flush met another node's; try again");
    }
    db_error(e)
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_on_from_the_first() {
        assert_eq!(super::placeholders(0, 3), "($1, $2, $3)");
        assert_eq!(super::placeholders(13, 2), "($14, $15)");
        assert_eq!(super::placeholders(0, 1), "($1)");
    }

    #[test]
    fn a_statement_is_built_once_per_chunk_length() {
        let built = std::cell::Cell::new(0);
        let mut sql = super::ChunkSql::new(|n| {
            built.set(built.get() + 1);
            format!("INSERT … {}", super::placeholders(0, n))
        });
        let texts: Vec<String> = [32, 32, 32, 7].iter().map(|n| sql.get(*n).0.to_string()).collect();
        assert_eq!(built.get(), 2, "one build for the full chunks, one for the last");
        assert_eq!(texts[0], texts[2]);
        assert!(texts[3].ends_with("$7)") && !texts[3].contains("$8"));
    }
}
