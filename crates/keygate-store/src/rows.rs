//! Row decoding: from the portable column types (TEXT, BIGINT, BLOB/BYTEA, JSON as TEXT) into
//! the records of `keygate-core`. A row that does not decode is a store error, never a panic.

use keygate_core::account::{
    Invitation, Membership, PlanRequest, PlanRequestStatus, Role, Session, User, WorkspacePolicy,
};
use keygate_core::ids::{AppId, InvitationId, PlanId, PlanRequestId, RootKeyId, TokenId, UserId, WorkspaceId};
use keygate_core::model::{App, AuditEvent, Permission, Plan, RootKey, ScopeEntry, TokenRecord, TokenState, Workspace};
use keygate_core::oauth::{
    AccessTokenFormat, AccessTokenRecord, ClientAuthMethod, GrantType, JtiRevocation, OAuthClient, RefreshTokenRecord,
    SigningKeyRecord,
};
use keygate_core::scope::Scope;
use keygate_core::secret::SecretHash;
use keygate_core::{Error, Result, Timestamp};
use serde::de::DeserializeOwned;
use sqlx::Row;
use sqlx::any::AnyRow;

pub(crate) fn get<'r, T>(row: &'r AnyRow, col: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(col).map_err(|e| corrupt(col, &e.to_string()))
}

pub(crate) fn corrupt(col: &str, why: &str) -> Error {
    tracing::error!(column = col, why, "undecodable row");
    Error::internal("the store holds a row keygate cannot read; see the server log")
}

pub(crate) fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    get::<i64>(row, col).map(Timestamp::from_millis)
}

pub(crate) fn opt_ts(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(get::<Option<i64>>(row, col)?.map(Timestamp::from_millis))
}

pub(crate) fn json<T: DeserializeOwned>(row: &AnyRow, col: &str) -> Result<T> {
    let text: String = get(row, col)?;
    serde_json::from_str(&text).map_err(|e| corrupt(col, &e.to_string()))
}

pub(crate) fn opt_json<T: DeserializeOwned>(row: &AnyRow, col: &str) -> Result<Option<T>> {
    match get::<Option<String>>(row, col)? {
        Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| corrupt(col, &e.to_string())),
        None => Ok(None),
    }
}

fn hash(row: &AnyRow, col: &str) -> Result<SecretHash> {
    let bytes: Vec<u8> = get(row, col)?;
    SecretHash::from_slice(&bytes).ok_or_else(|| corrupt(col, "hash is not 32 bytes"))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(format!("cannot encode JSON: {e}")))
}

pub(crate) fn opt_to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>> {
    v.as_ref().map(to_json).transpose()
}

pub(crate) fn workspace(row: &AnyRow) -> Result<Workspace> {
    Ok(Workspace {
        id: WorkspaceId::from_trusted(get(row, "id")?),
        name: get(row, "name")?,
        created_at: ts(row, "created_at")?,
    })
}

pub(crate) fn app(row: &AnyRow) -> Result<App> {
    Ok(App {
        id: AppId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        name: get(row, "name")?,
        description: get(row, "description")?,
        plan_id: get::<Option<String>>(row, "plan_id")?.map(PlanId::from_trusted),
        is_default: get::<i64>(row, "is_default")? != 0,
        metadata: json(row, "metadata")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        rate_limit: opt_json(row, "rate_limit")?,
        quota: opt_json(row, "quota")?,
        llm_budget: opt_json(row, "llm_budget")?,
    })
}

pub(crate) fn token(row: &AnyRow) -> Result<TokenRecord> {
    let state: String = get(row, "state")?;
    let allowlist: Vec<String> = json(row, "ip_allowlist")?;
    Ok(TokenRecord {
        id: TokenId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        name: get(row, "name")?,
        hash: hash(row, "hash")?,
        prefix: get(row, "prefix")?,
        last4: get(row, "last4")?,
        scopes: json::<Vec<Scope>>(row, "scopes")?,
        state: TokenState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        expires_at: opt_ts(row, "expires_at")?,
        ip_allowlist: allowlist
            .iter()
            .map(|s| s.parse().map_err(|_| corrupt("ip_allowlist", s)))
            .collect::<Result<_>>()?,
        rate_limit: opt_json(row, "rate_limit")?,
        quota: opt_json(row, "quota")?,
        metadata: json(row, "metadata")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        last_used_at: opt_ts(row, "last_used_at")?,
        last_used_ip: get(row, "last_used_ip")?,
        revoked_at: opt_ts(row, "revoked_at")?,
        revoke_reason: get(row, "revoke_reason")?,
        rotated_from: get::<Option<String>>(row, "rotated_from")?.map(TokenId::from_trusted),
        replaced_by: get::<Option<String>>(row, "replaced_by")?.map(TokenId::from_trusted),
        exposed_at: opt_ts(row, "exposed_at")?,
        dpop_jkt: get(row, "dpop_jkt")?,
        llm_budget: opt_json(row, "llm_budget")?,
        max_uses: get::<Option<i64>>(row, "max_uses")?.map(|n| u64::try_from(n).unwrap_or(0)),
        version: get(row, "version")?,
    })
}

pub(crate) fn plan(row: &AnyRow) -> Result<Plan> {
    Ok(Plan {
        id: PlanId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        name: get(row, "name")?,
        description: get(row, "description")?,
        scopes: json(row, "scopes")?,
        rate_limit: opt_json(row, "rate_limit")?,
        quota: opt_json(row, "quota")?,
        created_at: ts(row, "created_at")?,
        pricing: opt_json(row, "pricing")?,
    })
}

pub(crate) fn scope_entry(row: &AnyRow) -> Result<ScopeEntry> {
    let scope: String = get(row, "scope")?;
    Ok(ScopeEntry {
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        scope: Scope::parse(&scope).map_err(|_| corrupt("scope", &scope))?,
        description: get(row, "description")?,
        api: get(row, "api")?,
        created_at: ts(row, "created_at")?,
    })
}

pub(crate) fn root_key(row: &AnyRow) -> Result<RootKey> {
    let perms: Vec<String> = json(row, "permissions")?;
    Ok(RootKey {
        id: RootKeyId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        name: get(row, "name")?,
        hash: hash(row, "hash")?,
        last4: get(row, "last4")?,
        permissions: perms.iter().filter_map(|p| Permission::parse(p)).collect(),
        created_at: ts(row, "created_at")?,
        expires_at: opt_ts(row, "expires_at")?,
        revoked_at: opt_ts(row, "revoked_at")?,
        last_used_at: opt_ts(row, "last_used_at")?,
    })
}

pub(crate) fn audit_event(row: &AnyRow) -> Result<AuditEvent> {
    Ok(AuditEvent {
        id: get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        at: ts(row, "at")?,
        actor: get(row, "actor")?,
        action: get(row, "action")?,
        target: get(row, "target")?,
        before: opt_json(row, "before_json")?,
        after: opt_json(row, "after_json")?,
        source: get(row, "source")?,
        propagation: propagation(row)?,
    })
}

/// The `feed_acks` columns joined to an audit event, if its change was acknowledged.
fn propagation(row: &AnyRow) -> Result<Option<keygate_core::model::Propagation>> {
    let n = |col: &str| -> Result<Option<i64>> { get::<Option<i64>>(row, col) };
    Ok(match (n("ack_nodes")?, n("ack_applied")?, n("ack_elapsed_ms")?) {
        (Some(nodes), Some(applied), Some(ms)) => Some(keygate_core::model::Propagation {
            nodes: u32::try_from(nodes).unwrap_or(0),
            applied: u32::try_from(applied).unwrap_or(0),
            elapsed_ms: u64::try_from(ms).unwrap_or(0),
        }),
        _ => None,
    })
}

pub(crate) fn node(row: &AnyRow) -> Result<keygate_core::model::NodeRecord> {
    Ok(keygate_core::model::NodeRecord {
        id: get(row, "id")?,
        instance: get(row, "instance")?,
        gateway_address: get(row, "gateway_address")?,
        admin_address: get(row, "admin_address")?,
        version: get(row, "version")?,
        started_at: ts(row, "started_at")?,
        applied_seq: u64::try_from(get::<i64>(row, "applied_seq")?).unwrap_or(0),
        heartbeat_at: ts(row, "heartbeat_at")?,
        stopped_at: opt_ts(row, "stopped_at")?,
    })
}

pub(crate) fn usage(row: &AnyRow) -> Result<keygate_core::model::UsageRecord> {
    let n = |col: &str| -> Result<u64> { Ok(u64::try_from(get::<i64>(row, col)?).unwrap_or(0)) };
    let mut latency = [0u64; 10];
    for (slot, col) in latency.iter_mut().zip([
        "lat_1ms",
        "lat_5ms",
        "lat_10ms",
        "lat_25ms",
        "lat_50ms",
        "lat_100ms",
        "lat_250ms",
        "lat_500ms",
        "lat_1s",
        "lat_inf",
    ]) {
        *slot = n(col)?;
    }
    Ok(keygate_core::model::UsageRecord {
        token_id: TokenId::from_trusted(get(row, "token_id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        route: get(row, "route")?,
        minute: ts(row, "minute")?,
        requests: n("requests")?,
        status: [n("status_2xx")?, n("status_3xx")?, n("status_4xx")?, n("status_5xx")?],
        bytes_in: n("bytes_in")?,
        bytes_out: n("bytes_out")?,
        latency_us_sum: n("latency_us_sum")?,
        latency,
    })
}

fn flag(row: &AnyRow, col: &str) -> Result<bool> {
    Ok(get::<i64>(row, col)? != 0)
}

fn role(row: &AnyRow, col: &str) -> Result<Role> {
    let text: String = get(row, col)?;
    Role::parse(&text).ok_or_else(|| corrupt(col, &text))
}

pub(crate) fn user(row: &AnyRow) -> Result<User> {
    Ok(User {
        id: UserId::from_trusted(get(row, "id")?),
        email: get(row, "email")?,
        name: get(row, "name")?,
        password_hash: get(row, "password_hash")?,
        totp_sealed: get(row, "totp_sealed")?,
        totp_enabled: flag(row, "totp_enabled")?,
        totp_last_step: get(row, "totp_last_step")?,
        disabled: flag(row, "disabled")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

/// A membership whose `created_at` is in column `created_col` (joins with `users` rename it).
pub(crate) fn membership_at(row: &AnyRow, created_col: &str) -> Result<Membership> {
    Ok(Membership {
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        user_id: UserId::from_trusted(get(row, "user_id")?),
        role: role(row, "role")?,
        created_at: ts(row, created_col)?,
    })
}

pub(crate) fn membership(row: &AnyRow) -> Result<Membership> {
    membership_at(row, "created_at")
}

pub(crate) fn session(row: &AnyRow) -> Result<Session> {
    Ok(Session {
        id_hash: hash(row, "id_hash")?,
        user_id: UserId::from_trusted(get(row, "user_id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        pending_mfa: flag(row, "pending_mfa")?,
        created_at: ts(row, "created_at")?,
        last_seen_at: ts(row, "last_seen_at")?,
        expires_at: ts(row, "expires_at")?,
        ip: get(row, "ip")?,
    })
}

pub(crate) fn invitation(row: &AnyRow) -> Result<Invitation> {
    Ok(Invitation {
        id: InvitationId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        email: get(row, "email")?,
        role: role(row, "role")?,
        code_hash: hash(row, "code_hash")?,
        invited_by: UserId::from_trusted(get(row, "invited_by")?),
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        accepted_at: opt_ts(row, "accepted_at")?,
    })
}

pub(crate) fn workspace_policy(row: &AnyRow) -> Result<WorkspacePolicy> {
    let days = get::<Option<i64>>(row, "max_token_lifetime_days")?
        .map(|d| u32::try_from(d).map_err(|_| corrupt("max_token_lifetime_days", &d.to_string())))
        .transpose()?;
    Ok(WorkspacePolicy {
        max_token_lifetime_days: days,
        require_two_factor: flag(row, "require_two_factor")?,
        plan_changes_need_approval: flag(row, "plan_changes_need_approval")?,
        api_publish_needs_approval: flag(row, "api_publish_needs_approval")?,
        max_token_age_days: get::<Option<i64>>(row, "max_token_age_days")?
            .map(|d| u32::try_from(d).map_err(|_| corrupt("max_token_age_days", &d.to_string())))
            .transpose()?,
        suspend_unrotated: flag(row, "suspend_unrotated")?,
        anomaly_suspend: match get::<Option<String>>(row, "anomaly_suspend")? {
            None => None,
            Some(s) => Some(keygate_core::anomaly::Severity::parse(&s).ok_or_else(|| corrupt("anomaly_suspend", &s))?),
        },
        rules: opt_json(row, "rules")?.unwrap_or_default(),
        exposure_action: {
            let action: String = get(row, "exposure_action")?;
            keygate_core::account::ExposureAction::parse(&action).ok_or_else(|| corrupt("exposure_action", &action))?
        },
    })
}

pub(crate) fn plan_request(row: &AnyRow) -> Result<PlanRequest> {
    let status: String = get(row, "status")?;
    Ok(PlanRequest {
        id: PlanRequestId::from_trusted(get(row, "id")?),
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        plan_id: PlanId::from_trusted(get(row, "plan_id")?),
        requested_by: UserId::from_trusted(get(row, "requested_by")?),
        note: get(row, "note")?,
        status: PlanRequestStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        created_at: ts(row, "created_at")?,
        decided_by: get::<Option<String>>(row, "decided_by")?.map(UserId::from_trusted),
        decided_at: opt_ts(row, "decided_at")?,
    })
}

fn opt_hash(row: &AnyRow, col: &str) -> Result<Option<SecretHash>> {
    match get::<Option<Vec<u8>>>(row, col)? {
        Some(bytes) => SecretHash::from_slice(&bytes).map(Some).ok_or_else(|| corrupt(col, "hash is not 32 bytes")),
        None => Ok(None),
    }
}

fn seconds(row: &AnyRow, col: &str) -> Result<u32> {
    let n: i64 = get(row, col)?;
    u32::try_from(n).map_err(|_| corrupt(col, &n.to_string()))
}

fn seq(row: &AnyRow, col: &str) -> Result<u64> {
    let n: i64 = get(row, col)?;
    u64::try_from(n).map_err(|_| corrupt(col, &n.to_string()))
}

pub(crate) fn oauth_client(row: &AnyRow) -> Result<OAuthClient> {
    let method: String = get(row, "auth_method")?;
    let format: String = get(row, "access_token_format")?;
    Ok(OAuthClient {
        client_id: get(row, "client_id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        grant_types: json::<Vec<GrantType>>(row, "grant_types")?,
        scopes: json::<Vec<Scope>>(row, "scopes")?,
        auth_method: ClientAuthMethod::parse(&method).ok_or_else(|| corrupt("auth_method", &method))?,
        secret_hash: opt_hash(row, "secret_hash")?,
        secret_last4: get(row, "secret_last4")?,
        previous_secret_hash: opt_hash(row, "previous_secret_hash")?,
        previous_secret_expires_at: opt_ts(row, "previous_secret_expires_at")?,
        jwks: opt_json(row, "jwks")?,
        access_token_format: AccessTokenFormat::parse(&format)
            .ok_or_else(|| corrupt("access_token_format", &format))?,
        signing_alg: get(row, "signing_alg")?,
        access_token_ttl_seconds: seconds(row, "access_token_ttl_seconds")?,
        refresh_token_ttl_seconds: seconds(row, "refresh_token_ttl_seconds")?,
        exchange_subject_apps: json::<Vec<AppId>>(row, "exchange_subject_apps")?,
        suspended_at: opt_ts(row, "suspended_at")?,
        suspended_reason: get(row, "suspended_reason")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        version: get(row, "version")?,
    })
}

pub(crate) fn signing_key(row: &AnyRow) -> Result<SigningKeyRecord> {
    Ok(SigningKeyRecord {
        kid: get(row, "kid")?,
        alg: get(row, "alg")?,
        public_jwk: json(row, "public_jwk")?,
        sealed_private: get(row, "sealed_private")?,
        created_at: ts(row, "created_at")?,
        signs_from: ts(row, "signs_from")?,
        retired_at: opt_ts(row, "retired_at")?,
        drop_after: opt_ts(row, "drop_after")?,
    })
}

pub(crate) fn refresh_token(row: &AnyRow) -> Result<RefreshTokenRecord> {
    Ok(RefreshTokenRecord {
        hash: hash(row, "hash")?,
        family_id: get(row, "family_id")?,
        client_id: get(row, "client_id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        subject: get(row, "subject")?,
        scopes: json::<Vec<Scope>>(row, "scopes")?,
        dpop_jkt: get(row, "dpop_jkt")?,
        created_at: ts(row, "created_at")?,
        expires_at: ts(row, "expires_at")?,
        used_at: opt_ts(row, "used_at")?,
        revoked_at: opt_ts(row, "revoked_at")?,
    })
}

pub(crate) fn access_token(row: &AnyRow) -> Result<AccessTokenRecord> {
    Ok(AccessTokenRecord {
        jti: get(row, "jti")?,
        client_id: get(row, "client_id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        app_id: AppId::from_trusted(get(row, "app_id")?),
        family_id: get(row, "family_id")?,
        subject: get(row, "subject")?,
        scopes: json::<Vec<Scope>>(row, "scopes")?,
        dpop_jkt: get(row, "dpop_jkt")?,
        issued_at: ts(row, "issued_at")?,
        expires_at: ts(row, "expires_at")?,
        revoked_at: opt_ts(row, "revoked_at")?,
    })
}

pub(crate) fn jti_revocation(row: &AnyRow) -> Result<JtiRevocation> {
    Ok(JtiRevocation { seq: seq(row, "seq")?, jti: get(row, "jti")?, expires_at: ts(row, "expires_at")? })
}

pub(crate) fn route(row: &AnyRow) -> Result<keygate_core::model::StoredRoute> {
    Ok(keygate_core::model::StoredRoute {
        id: get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        config: json(row, "config")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
    })
}

pub(crate) fn provider(row: &AnyRow) -> Result<keygate_core::llm::StoredProvider> {
    Ok(keygate_core::llm::StoredProvider {
        id: get(row, "id")?,
        workspace_id: WorkspaceId::from_trusted(get(row, "workspace_id")?),
        config: json(row, "config")?,
        sealed_key: get(row, "sealed_key")?,
        key_fingerprint: get(row, "key_fingerprint")?,
        created_at: ts(row, "created_at")?,
        updated_at: ts(row, "updated_at")?,
        key_rotated_at: ts(row, "key_rotated_at")?,
    })
}
