//! [`NotifyStore`] for [`SqlStore`]: webhook endpoints and the outbox of their deliveries (see
//! keygate-core's `notify` module). [`fan_out`] runs in the transaction of every audit event, so
//! a delivery exists exactly when its event was committed.

use async_trait::async_trait;
use keygate_core::ids::{WebhookId, WorkspaceId};
use keygate_core::model::{NewAuditEvent, Page, PageRequest};
use keygate_core::notify::{
    AttemptOutcome, Delivery, DeliveryAttempt, DeliveryState, Email, NewDelivery, NotifyStore, QuotaStanding,
    WebhookEndpoint,
};
use keygate_core::{Error, Result, Timestamp};
use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use crate::db_error;
use crate::rows::{self, to_json};
use crate::sql::{SqlStore, Tx, insert_audit};

const ENDPOINT_COLS: &str = "id, workspace_id, url, description, event_types, enabled, disabled_reason, \
    sealed_secret, previous_sealed_secret, previous_secret_until, failing_since, created_at, updated_at";
const DELIVERY_COLS: &str = "id, workspace_id, endpoint_id, message_id, event_type, payload, state, attempts, \
    next_at, last_attempt_at, last_status, last_error, created_at, delivered_at";

/// Writes a delivery of the event `e` (stored with id `event_id`, its JSON fields as stored) to
/// every enabled endpoint of its workspace subscribed to the event type its action raises.
/// With `email`, it also writes one email per recipient (see [`email_recipients`]).
pub(crate) async fn fan_out(
    tx: &mut Tx,
    e: &NewAuditEvent,
    event_id: i64,
    before: Option<&str>,
    after: Option<&str>,
    email: bool,
) -> Result<()> {
    let Some(kind) = keygate_core::notify::event_for_action(&e.action) else { return Ok(()) };
    let rows = sqlx::query("SELECT id, event_types FROM webhook_endpoints WHERE workspace_id = $1 AND enabled = 1")
        .bind(e.workspace_id.as_str())
        .fetch_all(&mut **tx)
        .await
        .map_err(db_error)?;
    let recipients = if email { email_recipients(tx, e, kind).await? } else { Vec::new() };
    if rows.is_empty() && recipients.is_empty() {
        return Ok(());
    }
    let parse = |text: Option<&str>| text.and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok());
    let data = serde_json::json!({
        "id": format!("evt_{event_id}"),
        "workspace_id": e.workspace_id,
        "action": e.action,
        "actor": e.actor,
        "target": e.target,
        "at": e.at,
        "source": e.source,
        "before": parse(before),
        "after": parse(after),
    });
    let payload = keygate_core::notify::payload(kind.name, e.at, data);
    for (user, address, name) in &recipients {
        sqlx::query(
            "INSERT INTO email_outbox (workspace_id, user_id, recipient, recipient_name, event_type, payload, state, \
             attempts, next_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7)",
        )
        .bind(e.workspace_id.as_str())
        .bind(user.as_str())
        .bind(address.as_str())
        .bind(name.as_str())
        .bind(kind.name)
        .bind(payload.as_str())
        .bind(e.at.as_millis())
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    }
    let message_id = format!("msg_{event_id}");
    // One statement for every subscribed endpoint: each statement is a round trip.
    let mut endpoints = Vec::with_capacity(rows.len());
    for row in &rows {
        let types: Vec<String> = serde_json::from_str(&rows::get::<String>(row, "event_types")?).unwrap_or_default();
        if keygate_core::notify::subscribes(&types, kind.name) {
            endpoints.push(rows::get::<String>(row, "id")?);
        }
    }
    if endpoints.is_empty() {
        return Ok(());
    }
    let values: Vec<String> =
        (0..endpoints.len()).map(|i| format!("($1, ${}, $2, $3, $4, 'pending', 0, $5, $5)", i + 6)).collect();
    let sql = format!(
        "INSERT INTO webhook_deliveries (workspace_id, endpoint_id, message_id, event_type, payload, state, \
         attempts, next_at, created_at) VALUES {}",
        values.join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(e.workspace_id.as_str())
        .bind(message_id.as_str())
        .bind(kind.name)
        .bind(payload.as_str())
        .bind(e.at.as_millis());
    for id in &endpoints {
        q = q.bind(id.as_str());
    }
    q.execute(&mut **tx).await.map_err(db_error)?;
    Ok(())
}

/// Who is emailed about `e`: its event's default audience (the owner of the app of the token it
/// is about, the workspace's owners), plus the members who opted in, minus those who opted out.
/// (user id, address, name), each once.
async fn email_recipients(
    tx: &mut Tx,
    e: &NewAuditEvent,
    kind: &keygate_core::notify::EventType,
) -> Result<Vec<(String, String, String)>> {
    let ws = e.workspace_id.as_str();
    let mut users: Vec<String> = Vec::new();
    // The owner of the app the event is about: a token's app, or the app itself.
    let owner_sql = if e.target.starts_with("tok_") {
        Some(
            "SELECT o.user_id FROM app_owners o JOIN tokens t ON t.app_id = o.app_id WHERE t.id = $1 AND o.workspace_id = $2",
        )
    } else if e.target.starts_with("app_") {
        Some("SELECT user_id FROM app_owners WHERE app_id = $1 AND workspace_id = $2")
    } else if e.target.starts_with("sub_") {
        Some(
            "SELECT o.user_id FROM app_owners o JOIN api_subscriptions s ON s.app_id = o.app_id WHERE s.id = $1 AND o.workspace_id = $2",
        )
    } else if e.action == "anomaly.detected" || e.action.starts_with("oauth_client.") {
        // An OAuth client's alert or change (a client's id has the workspace's own prefix).
        Some(
            "SELECT o.user_id FROM app_owners o JOIN oauth_clients c ON c.app_id = o.app_id WHERE c.client_id = $1 AND o.workspace_id = $2",
        )
    } else {
        None
    };
    if kind.email.app_owner
        && let Some(sql) = owner_sql
    {
        let owner: Option<String> = sqlx::query_scalar(sql)
            .bind(e.target.as_str())
            .bind(ws)
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
        users.extend(owner);
    }
    // An API's change of state: the owners of the apps whose tokens called its routes (the
    // event's `routes`) in the last 90 days.
    if kind.email.app_owner
        && e.target.starts_with("api_")
        && let Some(routes) = e.after.as_ref().and_then(|a| a.get("routes")).and_then(serde_json::Value::as_array)
    {
        let since_minute = e.at.as_millis() - 90 * 86_400_000;
        for route in routes.iter().filter_map(serde_json::Value::as_str).take(100) {
            let owners: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT o.user_id FROM app_owners o JOIN tokens t ON t.app_id = o.app_id \
                 WHERE o.workspace_id = $1 AND t.id IN (SELECT DISTINCT token_id FROM token_usage \
                 WHERE workspace_id = $1 AND route = $2 AND minute >= $3)",
            )
            .bind(ws)
            .bind(route)
            .bind(since_minute)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)?;
            users.extend(owners);
        }
    }
    if kind.email.workspace_owners {
        let owners: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM memberships WHERE workspace_id = $1 AND role = 'owner'")
                .bind(ws)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_error)?;
        users.extend(owners);
    }
    let prefs = sqlx::query(
        "SELECT p.user_id, p.email FROM notification_prefs p JOIN memberships m \
         ON m.workspace_id = p.workspace_id AND m.user_id = p.user_id WHERE p.workspace_id = $1 AND p.event_type = $2",
    )
    .bind(ws)
    .bind(kind.name)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    for p in &prefs {
        let user: String = rows::get(p, "user_id")?;
        if rows::get::<i64>(p, "email")? != 0 {
            users.push(user);
        } else {
            users.retain(|u| *u != user);
        }
    }
    users.sort();
    users.dedup();
    let mut out = Vec::with_capacity(users.len());
    for u in users {
        let row = sqlx::query("SELECT email, name FROM users WHERE id = $1")
            .bind(u.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db_error)?;
        if let Some(row) = row {
            out.push((u, rows::get(&row, "email")?, rows::get(&row, "name")?));
        }
    }
    Ok(out)
}

const EMAIL_COLS: &str = "id, workspace_id, user_id, recipient, recipient_name, event_type, payload, state, attempts, \
    next_at, last_error, created_at, sent_at";

fn email(row: &AnyRow) -> Result<Email> {
    let state: String = rows::get(row, "state")?;
    let opt_ts = |col: &str| -> Result<Option<Timestamp>> {
        Ok(rows::get::<Option<i64>>(row, col)?.map(Timestamp::from_millis))
    };
    Ok(Email {
        id: rows::get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(rows::get(row, "workspace_id")?),
        user_id: rows::get(row, "user_id")?,
        recipient: rows::get(row, "recipient")?,
        recipient_name: rows::get(row, "recipient_name")?,
        event_type: rows::get(row, "event_type")?,
        payload: rows::get(row, "payload")?,
        state: DeliveryState::parse(&state).ok_or_else(|| Error::internal("an email has an unknown state"))?,
        attempts: u32::try_from(rows::get::<i64>(row, "attempts")?).unwrap_or(u32::MAX),
        next_at: opt_ts("next_at")?,
        last_error: rows::get(row, "last_error")?,
        created_at: Timestamp::from_millis(rows::get(row, "created_at")?),
        sent_at: opt_ts("sent_at")?,
    })
}

/// Leases up to `limit` rows of an outbox `table` to `owner` until `now + lease_ms` and returns
/// them (`returning` columns). `pick` selects the candidate ids in the order to take them, with
/// `$3` for now (and `$5` for `extra`, if given); `guard` is re-checked on each row as it is
/// locked, with the lease itself. On PostgreSQL rows another claimer holds are skipped, so
/// concurrent claimers take different rows (a racing claimer may take fewer than it could; the
/// next pass takes the rest); SQLite has one writer at a time.
#[allow(clippy::too_many_arguments, reason = "the parts of one statement")]
pub(crate) async fn lease_rows(
    s: &SqlStore,
    table: &str,
    pick: &str,
    guard: &str,
    returning: &str,
    owner: &str,
    now: Timestamp,
    lease_ms: i64,
    limit: u32,
    extra: Option<&str>,
) -> Result<Vec<AnyRow>> {
    let lock = if s.engine == crate::Engine::Postgres { "FOR UPDATE SKIP LOCKED" } else { "" };
    let sql = format!(
        "UPDATE {table} SET lease_owner = $1, lease_until = $2 WHERE id IN ({pick} LIMIT $4 {lock}) \
         AND (lease_until IS NULL OR lease_until <= $3) {guard} RETURNING {returning}"
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(owner)
        .bind(now.as_millis().saturating_add(lease_ms))
        .bind(now.as_millis())
        .bind(i64::from(limit));
    if let Some(x) = extra {
        q = q.bind(x);
    }
    q.fetch_all(&s.pool).await.map_err(db_error)
}

/// A page of an outbox's rows of `ws`, newest first, by id (the cursor is the last id shown).
/// `select` takes `$1` the workspace, `$2` the id to stay below and `$3` `filter`.
async fn newest_by_id<T>(
    s: &SqlStore,
    select: &str,
    ws: &WorkspaceId,
    filter: &str,
    page: &PageRequest,
    decode: fn(&AnyRow) -> Result<T>,
    id_of: fn(&T) -> i64,
) -> Result<Page<T>> {
    let limit = crate::sql::page_size(page);
    let before = match &page.cursor {
        Some(c) => c.parse::<i64>().map_err(|_| crate::sql::invalid_cursor())?,
        None => i64::MAX,
    };
    let sql = format!("{select} ORDER BY id DESC LIMIT $4");
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(ws.as_str())
        .bind(before)
        .bind(filter)
        .bind(limit + 1)
        .fetch_all(&s.pool)
        .await
        .map_err(db_error)?;
    crate::sql::paginate(&rows, limit, decode, |t| id_of(t).to_string())
}

async fn insert_delivery(tx: &mut Tx, d: &NewDelivery) -> Result<i64> {
    sqlx::query_scalar::<_, i64>(
        "INSERT INTO webhook_deliveries (workspace_id, endpoint_id, message_id, event_type, payload, state, \
         attempts, next_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6) RETURNING id",
    )
    .bind(d.workspace_id.as_str())
    .bind(d.endpoint_id.as_str())
    .bind(d.message_id.as_str())
    .bind(d.event_type.as_str())
    .bind(d.payload.as_str())
    .bind(d.at.as_millis())
    .fetch_one(&mut **tx)
    .await
    .map_err(db_error)
}

fn endpoint(row: &AnyRow) -> Result<WebhookEndpoint> {
    let types: String = rows::get(row, "event_types")?;
    Ok(WebhookEndpoint {
        id: WebhookId::from_trusted(rows::get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(rows::get(row, "workspace_id")?),
        url: rows::get(row, "url")?,
        description: rows::get(row, "description")?,
        event_types: serde_json::from_str(&types)
            .map_err(|_| Error::internal("a webhook endpoint's event types are not a JSON list"))?,
        enabled: rows::get::<i64>(row, "enabled")? != 0,
        disabled_reason: rows::get(row, "disabled_reason")?,
        sealed_secret: rows::get(row, "sealed_secret")?,
        previous_sealed_secret: rows::get(row, "previous_sealed_secret")?,
        previous_secret_until: rows::get::<Option<i64>>(row, "previous_secret_until")?.map(Timestamp::from_millis),
        failing_since: rows::get::<Option<i64>>(row, "failing_since")?.map(Timestamp::from_millis),
        created_at: Timestamp::from_millis(rows::get(row, "created_at")?),
        updated_at: Timestamp::from_millis(rows::get(row, "updated_at")?),
    })
}

fn delivery(row: &AnyRow) -> Result<Delivery> {
    let state: String = rows::get(row, "state")?;
    let opt_ts = |col: &str| -> Result<Option<Timestamp>> {
        Ok(rows::get::<Option<i64>>(row, col)?.map(Timestamp::from_millis))
    };
    Ok(Delivery {
        id: rows::get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(rows::get(row, "workspace_id")?),
        endpoint_id: WebhookId::from_trusted(rows::get(row, "endpoint_id")?),
        message_id: rows::get(row, "message_id")?,
        event_type: rows::get(row, "event_type")?,
        payload: rows::get(row, "payload")?,
        state: DeliveryState::parse(&state).ok_or_else(|| Error::internal("a delivery has an unknown state"))?,
        attempts: u32::try_from(rows::get::<i64>(row, "attempts")?).unwrap_or(u32::MAX),
        next_at: opt_ts("next_at")?,
        last_attempt_at: opt_ts("last_attempt_at")?,
        last_status: rows::get::<Option<i64>>(row, "last_status")?.and_then(|s| u16::try_from(s).ok()),
        last_error: rows::get(row, "last_error")?,
        created_at: Timestamp::from_millis(rows::get(row, "created_at")?),
        delivered_at: opt_ts("delivered_at")?,
    })
}

fn attempt(row: &AnyRow) -> Result<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        at: Timestamp::from_millis(rows::get(row, "at")?),
        status: rows::get::<Option<i64>>(row, "status")?.and_then(|s| u16::try_from(s).ok()),
        error: rows::get(row, "error")?,
        duration_ms: u32::try_from(rows::get::<i64>(row, "duration_ms")?).unwrap_or(u32::MAX),
    })
}

#[async_trait]
impl NotifyStore for SqlStore {
    async fn insert_webhook(&self, w: &WebhookEndpoint, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, workspace_id, url, description, event_types, enabled, \
             disabled_reason, sealed_secret, previous_sealed_secret, previous_secret_until, failing_since, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(w.id.as_str())
        .bind(w.workspace_id.as_str())
        .bind(w.url.as_str())
        .bind(w.description.as_deref())
        .bind(to_json(&w.event_types)?)
        .bind(i64::from(w.enabled))
        .bind(w.disabled_reason.as_deref())
        .bind(w.sealed_secret.clone())
        .bind(w.previous_sealed_secret.clone())
        .bind(w.previous_secret_until.map(Timestamp::as_millis))
        .bind(w.failing_since.map(Timestamp::as_millis))
        .bind(w.created_at.as_millis())
        .bind(w.updated_at.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn update_webhook(&self, w: &WebhookEndpoint, audit: &NewAuditEvent) -> Result<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE webhook_endpoints SET url = $1, description = $2, event_types = $3, enabled = $4, \
             disabled_reason = $5, sealed_secret = $6, previous_sealed_secret = $7, previous_secret_until = $8, \
             failing_since = $9, updated_at = $10 \
             WHERE workspace_id = $11 AND id = $12",
        )
        .bind(w.url.as_str())
        .bind(w.description.as_deref())
        .bind(to_json(&w.event_types)?)
        .bind(i64::from(w.enabled))
        .bind(w.disabled_reason.as_deref())
        .bind(w.sealed_secret.clone())
        .bind(w.previous_sealed_secret.clone())
        .bind(w.previous_secret_until.map(Timestamp::as_millis))
        .bind(w.failing_since.map(Timestamp::as_millis))
        .bind(w.updated_at.as_millis())
        .bind(w.workspace_id.as_str())
        .bind(w.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found("webhook endpoint"));
        }
        insert_audit(&mut tx, &self.chain_key(), audit).await?;
        self.commit(tx, None).await
    }

    async fn delete_webhook(&self, ws: &WorkspaceId, id: &WebhookId, audit: &NewAuditEvent) -> Result<bool> {
        self.delete_in_workspace(
            "DELETE FROM webhook_endpoints WHERE workspace_id = $1 AND id = $2",
            &[
                "DELETE FROM webhook_attempts WHERE delivery_id IN \
                 (SELECT id FROM webhook_deliveries WHERE workspace_id = $1 AND endpoint_id = $2)",
                "DELETE FROM webhook_deliveries WHERE workspace_id = $1 AND endpoint_id = $2",
            ],
            ws,
            id.as_str(),
            audit,
        )
        .await
    }

    async fn webhook(&self, ws: &WorkspaceId, id: &WebhookId) -> Result<Option<WebhookEndpoint>> {
        let sql = format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE workspace_id = $1 AND id = $2");
        sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(endpoint)
            .transpose()
    }

    async fn list_webhooks(&self, ws: &WorkspaceId) -> Result<Vec<WebhookEndpoint>> {
        let sql =
            format!("SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE workspace_id = $1 ORDER BY created_at, id");
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(ws.as_str()).fetch_all(&self.pool).await.map_err(db_error)?;
        rows.iter().map(endpoint).collect()
    }

    async fn enqueue_delivery(&self, d: &NewDelivery) -> Result<i64> {
        let mut tx = self.begin().await?;
        let id = insert_delivery(&mut tx, d).await?;
        self.commit(tx, None).await?;
        Ok(id)
    }

    async fn claim_deliveries(&self, now: Timestamp, lease_ms: i64, owner: &str, limit: u32) -> Result<Vec<Delivery>> {
        let pick = "SELECT d.id FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
             WHERE d.state = 'pending' AND d.next_at <= $3 AND w.enabled = 1 \
             AND (d.lease_until IS NULL OR d.lease_until <= $3) ORDER BY d.next_at, d.id";
        let rows = lease_rows(
            self,
            "webhook_deliveries",
            pick,
            "AND state = 'pending'",
            DELIVERY_COLS,
            owner,
            now,
            lease_ms,
            limit,
            None,
        )
        .await?;
        let mut out = rows.iter().map(delivery).collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|d| (d.next_at, d.id));
        Ok(out)
    }

    async fn record_attempt(&self, delivery_id: i64, o: &AttemptOutcome) -> Result<()> {
        let mut tx = self.begin().await?;
        let a = &o.attempt;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, at, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(delivery_id)
        .bind(a.at.as_millis())
        .bind(a.status.map(i64::from))
        .bind(a.error.as_deref())
        .bind(i64::from(a.duration_ms))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let delivered = (o.state == DeliveryState::Delivered).then_some(a.at.as_millis());
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, next_at = $2, lease_owner = NULL, \
             lease_until = NULL, last_attempt_at = $3, last_status = $4, last_error = $5, \
             delivered_at = COALESCE($6, delivered_at) WHERE id = $7",
        )
        .bind(o.state.as_str())
        .bind(o.next_at.map(Timestamp::as_millis))
        .bind(a.at.as_millis())
        .bind(a.status.map(i64::from))
        .bind(a.error.as_deref())
        .bind(delivered)
        .bind(delivery_id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let endpoint = if delivered.is_some() {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = NULL WHERE failing_since IS NOT NULL AND \
                 id = (SELECT endpoint_id FROM webhook_deliveries WHERE id = $1)",
            )
            .bind(delivery_id)
        } else {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = $2 WHERE failing_since IS NULL AND \
                 id = (SELECT endpoint_id FROM webhook_deliveries WHERE id = $1)",
            )
            .bind(delivery_id)
            .bind(a.at.as_millis())
        };
        endpoint.execute(&mut *tx).await.map_err(db_error)?;
        self.commit(tx, None).await
    }

    async fn list_deliveries(
        &self,
        ws: &WorkspaceId,
        endpoint: Option<&WebhookId>,
        page: &PageRequest,
    ) -> Result<Page<Delivery>> {
        let select = format!(
            "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE workspace_id = $1 AND id < $2 \
             AND ($3 = '' OR endpoint_id = $3)"
        );
        newest_by_id(self, &select, ws, endpoint.map(WebhookId::as_str).unwrap_or_default(), page, delivery, |d| d.id)
            .await
    }

    async fn delivery(&self, ws: &WorkspaceId, id: i64) -> Result<Option<(Delivery, Vec<DeliveryAttempt>)>> {
        let sql = format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE workspace_id = $1 AND id = $2");
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(ws.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let attempts = sqlx::query(
            "SELECT at, status, error, duration_ms FROM webhook_attempts WHERE delivery_id = $1 ORDER BY at, status",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(Some((delivery(&row)?, attempts.iter().map(attempt).collect::<Result<Vec<_>>>()?)))
    }

    async fn redeliver(&self, ws: &WorkspaceId, id: i64, now: Timestamp) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_at = $1, lease_owner = NULL, \
             lease_until = NULL WHERE workspace_id = $2 AND id = $3",
        )
        .bind(now.as_millis())
        .bind(ws.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn resume_deliveries(&self, ws: &WorkspaceId, endpoint: &WebhookId, now: Timestamp) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = 0, next_at = $1 WHERE workspace_id = $2 AND endpoint_id = $3 \
             AND state = 'pending' AND next_at > $1",
        )
        .bind(now.as_millis())
        .bind(ws.as_str())
        .bind(endpoint.as_str())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    async fn next_delivery_due(&self) -> Result<Option<Timestamp>> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(d.next_at) FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
             WHERE d.state = 'pending' AND w.enabled = 1",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(at.map(Timestamp::from_millis))
    }

    async fn outbox_pending(&self) -> Result<(u64, u64)> {
        let count = |sql: &'static str| async move {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&self.pool).await.map_err(db_error)?;
            Ok::<u64, Error>(u64::try_from(n).unwrap_or(0))
        };
        Ok((
            count("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'pending'").await?,
            count("SELECT COUNT(*) FROM email_outbox WHERE state = 'pending'").await?,
        ))
    }

    async fn quota_standings(&self) -> Result<Vec<QuotaStanding>> {
        let rows = sqlx::query(
            "SELECT q.token_id, q.period_start, q.count, t.workspace_id, t.quota FROM quota_counters q \
             JOIN tokens t ON t.id = q.token_id WHERE t.state = 'active' AND t.quota IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let quota: Option<keygate_core::policy::Quota> =
                serde_json::from_str(&rows::get::<String>(r, "quota")?).ok().flatten();
            let Some(quota) = quota else { continue };
            out.push(QuotaStanding {
                token_id: keygate_core::ids::TokenId::from_trusted(rows::get(r, "token_id")?),
                workspace_id: WorkspaceId::from_trusted(rows::get(r, "workspace_id")?),
                quota,
                period_start: rows::get(r, "period_start")?,
                count: u64::try_from(rows::get::<i64>(r, "count")?).unwrap_or(0),
            });
        }
        Ok(out)
    }

    fn set_email_outbox(&self, enabled: bool) {
        self.email_outbox.store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    async fn claim_emails(&self, now: Timestamp, lease_ms: i64, owner: &str, limit: u32) -> Result<Vec<Email>> {
        let pick = "SELECT id FROM email_outbox WHERE state = 'pending' AND next_at <= $3 \
             AND (lease_until IS NULL OR lease_until <= $3) ORDER BY next_at, id";
        let rows = lease_rows(
            self,
            "email_outbox",
            pick,
            "AND state = 'pending'",
            EMAIL_COLS,
            owner,
            now,
            lease_ms,
            limit,
            None,
        )
        .await?;
        let mut out = rows.iter().map(email).collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|e| (e.next_at, e.id));
        Ok(out)
    }

    async fn record_email_attempt(&self, id: i64, o: &AttemptOutcome) -> Result<()> {
        let sent = (o.state == DeliveryState::Delivered).then_some(o.attempt.at.as_millis());
        sqlx::query(
            "UPDATE email_outbox SET state = $1, attempts = attempts + 1, next_at = $2, lease_owner = NULL, \
             lease_until = NULL, last_error = $3, sent_at = COALESCE($4, sent_at) WHERE id = $5",
        )
        .bind(o.state.as_str())
        .bind(o.next_at.map(Timestamp::as_millis))
        .bind(o.attempt.error.as_deref())
        .bind(sent)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn list_emails(&self, ws: &WorkspaceId, page: &PageRequest) -> Result<Page<Email>> {
        // ($3 is unused here: the email log has no second filter.)
        let select = format!("SELECT {EMAIL_COLS} FROM email_outbox WHERE workspace_id = $1 AND id < $2 AND $3 = ''");
        newest_by_id(self, &select, ws, "", page, email, |e| e.id).await
    }

    async fn notification_prefs(
        &self,
        ws: &WorkspaceId,
        user: &keygate_core::ids::UserId,
    ) -> Result<Vec<(String, bool)>> {
        let rows = sqlx::query(
            "SELECT event_type, email FROM notification_prefs WHERE workspace_id = $1 AND user_id = $2 ORDER BY event_type",
        )
        .bind(ws.as_str())
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.iter().map(|r| Ok((rows::get(r, "event_type")?, rows::get::<i64>(r, "email")? != 0))).collect()
    }

    async fn set_notification_pref(
        &self,
        ws: &WorkspaceId,
        user: &keygate_core::ids::UserId,
        event_type: &str,
        email: Option<bool>,
    ) -> Result<()> {
        let q = match email {
            Some(on) => sqlx::query(
                "INSERT INTO notification_prefs (workspace_id, user_id, event_type, email) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (workspace_id, user_id, event_type) DO UPDATE SET email = excluded.email",
            )
            .bind(ws.as_str())
            .bind(user.as_str())
            .bind(event_type)
            .bind(i64::from(on)),
            None => sqlx::query(
                "DELETE FROM notification_prefs WHERE workspace_id = $1 AND user_id = $2 AND event_type = $3",
            )
            .bind(ws.as_str())
            .bind(user.as_str())
            .bind(event_type),
        };
        q.execute(&self.pool).await.map_err(db_error)?;
        Ok(())
    }

    async fn prune_deliveries(&self, before: Timestamp) -> Result<u64> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "DELETE FROM webhook_attempts WHERE delivery_id IN \
             (SELECT id FROM webhook_deliveries WHERE created_at < $1 AND state <> 'pending')",
        )
        .bind(before.as_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let done = sqlx::query("DELETE FROM webhook_deliveries WHERE created_at < $1 AND state <> 'pending'")
            .bind(before.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query("DELETE FROM email_outbox WHERE created_at < $1 AND state <> 'pending'")
            .bind(before.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.commit(tx, None).await?;
        Ok(done.rows_affected())
    }
}
