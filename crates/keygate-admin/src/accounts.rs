//! Dashboard accounts: the first-run setup code, sign-in with Argon2id passwords and TOTP,
//! recovery codes, sessions with idle and absolute time-outs, CSRF tokens, sign-in throttling,
//! invitations, roles and workspace policy. The dashboard's handlers call this; it calls the
//! store through [`Admin`].

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, PasswordHash};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keygate_core::account::{
    Invitation, Membership, PlanRequest, PlanRequestStatus, Role, Session, User, WorkspacePolicy,
};
use keygate_core::ids::{AppId, InvitationId, PlanId, PlanRequestId, UserId, WorkspaceId};
use keygate_core::model::{Actor, NewAuditEvent};
use keygate_core::secret::SecretHash;
use keygate_core::{Error, ErrorKind, Result, Timestamp};
use parking_lot::Mutex;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::seal::Sealer;
use crate::service::Admin;
use crate::totp;

/// Session and sign-in settings.
#[derive(Debug, Clone)]
pub struct AccountSettings {
    /// A session unused this long ends.
    pub idle_timeout_ms: i64,
    /// A session ends this long after sign-in, whatever the activity.
    pub absolute_timeout_ms: i64,
    /// Failed sign-ins allowed per account, and per address, within `throttle_window_ms`.
    pub max_failures_per_account: u32,
    pub max_failures_per_address: u32,
    pub throttle_window_ms: i64,
    /// How long an invitation link stays valid.
    pub invitation_ttl_ms: i64,
    /// Issuer name shown by authenticator apps.
    pub issuer: String,
}

impl Default for AccountSettings {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30 * 60 * 1000,
            absolute_timeout_ms: 12 * 60 * 60 * 1000,
            max_failures_per_account: 10,
            max_failures_per_address: 50,
            throttle_window_ms: 15 * 60 * 1000,
            invitation_ttl_ms: 7 * 24 * 60 * 60 * 1000,
            issuer: "keygate".into(),
        }
    }
}

/// Shortest password accepted (NIST SP 800-63B asks for at least 8; keygate guards tokens).
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password hashed (bounds the work a request can cause).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Recovery codes issued at two-factor enrolment.
pub const RECOVERY_CODES: usize = 10;
/// Setup attempts one address may make within the throttle window.
pub const SETUP_ATTEMPTS_PER_ADDRESS: u32 = 20;
/// A session's `last_seen_at` is written at most this often.
const TOUCH_EVERY_MS: i64 = 60 * 1000;

/// A signed-in person, as a page handler sees them.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub session: Session,
    pub user: User,
    pub role: Role,
    /// The cookie's secret, from which the CSRF token is derived.
    pub csrf: String,
    /// The workspaces the account belongs to (id and name, by name), the session's among them:
    /// what the dashboard's workspace switcher offers.
    pub workspaces: Vec<(WorkspaceId, String)>,
}

impl Viewer {
    pub fn actor(&self) -> Actor {
        Actor { id: self.user.id.to_string(), source: Some("dashboard".into()), owner: self.role == Role::Owner }
    }
    pub fn workspace(&self) -> &WorkspaceId {
        &self.session.workspace_id
    }
}

/// The result of a password check.
pub enum SignIn {
    /// Signed in: the new session's cookie secret.
    Done(String),
    /// Password good, a TOTP code is needed next; the cookie secret of the pending session.
    NeedsSecondFactor(String),
}

/// Counts failures per key in a sliding window (in memory, per node).
/// Counts failed attempts per key in a window (in memory, per node). An attempt is counted
/// before it is checked and given back when it succeeds, so concurrent attempts cannot slip past
/// the limit while the first ones are still being checked.
#[derive(Default)]
struct Throttle {
    failures: Mutex<HashMap<String, (Timestamp, u32)>>,
}

impl Throttle {
    /// Keys kept at most; past that, expired entries go, and if that is not enough the counts
    /// start over (each attempt costs an Argon2 hash, so refilling is slow).
    const MAX_KEYS: usize = 100_000;

    /// Takes an attempt under each `(key, limit)`; `false` (nothing taken) if any is used up.
    fn attempt(&self, keys: &[(&str, u32)], window: i64, now: Timestamp) -> bool {
        let mut map = self.failures.lock();
        let live = |e: &(Timestamp, u32)| now.as_millis() - e.0.as_millis() < window;
        if keys.iter().any(|(k, limit)| map.get(*k).is_some_and(|e| live(e) && e.1 >= *limit)) {
            return false;
        }
        if map.len() + keys.len() > Self::MAX_KEYS {
            map.retain(|_, e| now.as_millis() - e.0.as_millis() < window);
            if map.len() + keys.len() > Self::MAX_KEYS {
                tracing::warn!("sign-in throttle full; its counts start over");
                map.clear();
            }
        }
        for (k, _) in keys {
            let e = map.entry((*k).to_owned()).or_insert((now, 0));
            if !live(e) {
                *e = (now, 0);
            }
            e.1 += 1;
        }
        true
    }

    /// Gives back the attempt taken under each key (it succeeded).
    fn succeeded(&self, keys: &[&str]) {
        let mut map = self.failures.lock();
        for k in keys {
            if let Some(e) = map.get_mut(*k) {
                e.1 = e.1.saturating_sub(1);
            }
        }
    }
}

/// The throttle key of an address: IPv6 by its /64 (one host usually holds a whole /64).
fn address_key(ip: Option<&str>) -> String {
    match ip.and_then(|i| i.parse::<std::net::IpAddr>().ok()) {
        Some(std::net::IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("address:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Some(ip) => format!("address:{ip}"),
        None => "address:-".into(),
    }
}

/// The throttle key of an account: the normalized email, bounded.
fn account_key(email: &str) -> String {
    let e = email.trim().to_lowercase();
    let end = (0..=e.len().min(254)).rev().find(|i| e.is_char_boundary(*i)).unwrap_or(0);
    format!("account:{}", &e[..end])
}

fn too_many() -> Error {
    Error::new(
        ErrorKind::Forbidden,
        "too_many_attempts",
        "too many failed sign-in attempts; wait 15 minutes and try again",
    )
}

fn bad_credentials() -> Error {
    Error::new(ErrorKind::Unauthenticated, "bad_credentials", "the email or password is not right")
}

/// Accounts, sessions and the setup code.
pub struct Accounts {
    admin: Arc<Admin>,
    settings: AccountSettings,
    sealer: Sealer,
    /// The first-run setup code's hash, while no account exists.
    setup_code: Mutex<Option<SecretHash>>,
    throttle: Throttle,
    /// Sign-in throttling shared by every node (Redis), with its key prefix; the local
    /// [`Throttle`] decides while it does not answer.
    shared: std::sync::OnceLock<(Arc<dyn keygate_core::limits::SharedLimits>, String)>,
    /// A hash to verify against when the email is unknown, so the answer takes as long.
    dummy_hash: String,
    /// Argon2 runs at most this many at once (each takes 19 MiB): a flood of sign-ins queues
    /// instead of exhausting memory.
    hashing: tokio::sync::Semaphore,
}

fn hasher() -> Argon2<'static> {
    // Argon2id, 19 MiB, 2 passes, 1 lane: OWASP's recommended minimum.
    let params = argon2::Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

fn normalize_email(email: &str) -> Result<String> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.starts_with('.') && !e.contains(char::is_whitespace)
        });
    if ok { Ok(e) } else { Err(Error::invalid("invalid_email", "enter an email address like ann@example.com")) }
}

fn check_password(password: &str) -> Result<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::invalid(
            "weak_password",
            format!("choose a password of at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::invalid("password_too_long", "choose a password under 1024 bytes"));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 100 || n.chars().any(char::is_control) {
        return Err(Error::invalid("invalid_name", "enter a name of 1 to 100 characters"));
    }
    Ok(n.to_owned())
}

impl Accounts {
    pub fn new(admin: Arc<Admin>, settings: AccountSettings) -> Result<Self> {
        let sealer = Sealer::new(&admin, "dashboard totp seal v1")?;
        let dummy_hash = dummy_phc(&admin)?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        Ok(Self {
            admin,
            settings,
            sealer,
            setup_code: Mutex::new(None),
            throttle: Throttle::default(),
            shared: std::sync::OnceLock::new(),
            dummy_hash,
            hashing: tokio::sync::Semaphore::new(parallel),
        })
    }

    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// Shares sign-in throttling with the other nodes through `backend` (set once).
    pub fn set_shared_throttle(&self, backend: Arc<dyn keygate_core::limits::SharedLimits>, prefix: &str) {
        let _ = self.shared.set((backend, prefix.to_owned()));
    }

    /// The shared key of a throttle key: digested (an email is no key name), in one hash slot.
    fn shared_key(prefix: &str, key: &str) -> String {
        let d = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes());
        let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("{{{prefix}:signin}}:{hex}")
    }

    /// Takes an attempt under each `(key, limit)`, on every node's count when shared; `false` if
    /// one is used up. A shared count that does not answer within a second falls back to this
    /// node's.
    async fn attempt(&self, keys: &[(&str, u32)], now: Timestamp) -> bool {
        let window = self.settings.throttle_window_ms;
        if let Some((shared, prefix)) = self.shared.get() {
            let named: Vec<(String, u32)> = keys.iter().map(|(k, l)| (Self::shared_key(prefix, k), *l)).collect();
            let refs: Vec<(&str, u32)> = named.iter().map(|(k, l)| (k.as_str(), *l)).collect();
            match tokio::time::timeout(std::time::Duration::from_secs(1), shared.attempt(&refs, window)).await {
                Ok(Ok(allowed)) => return allowed,
                Ok(Err(e)) => tracing::warn!(error = %e, "sign-in throttle: Redis failed; counting on this node"),
                Err(_) => tracing::warn!("sign-in throttle: Redis did not answer; counting on this node"),
            }
        }
        self.throttle.attempt(keys, window, now)
    }

    /// Gives back the attempt taken under each key (it succeeded).
    async fn succeeded(&self, keys: &[&str]) {
        self.throttle.succeeded(keys);
        if let Some((shared, prefix)) = self.shared.get() {
            let named: Vec<String> = keys.iter().map(|k| Self::shared_key(prefix, k)).collect();
            let refs: Vec<&str> = named.iter().map(String::as_str).collect();
            if let Ok(Err(e)) = tokio::time::timeout(std::time::Duration::from_secs(1), shared.give_back(&refs)).await {
                tracing::warn!(error = %e, "sign-in throttle: cannot give an attempt back in Redis");
            }
        }
    }

    pub fn settings(&self) -> &AccountSettings {
        &self.settings
    }

    fn now(&self) -> Timestamp {
        self.admin.now()
    }

    fn store(&self) -> &Arc<dyn keygate_core::store::Store> {
        self.admin.store()
    }

    fn hash(&self, secret: &str) -> SecretHash {
        self.admin.hash(secret)
    }

    // ---- first run ---------------------------------------------------------------------------

    /// When no account exists yet: a fresh one-time setup code (printed by `keygate serve` on
    /// its terminal, never logged); `None` once the first owner exists.
    pub async fn open_setup(&self) -> Result<Option<String>> {
        if self.store().user_count().await? > 0 {
            return Ok(None);
        }
        let raw = self.admin.random_text(20)?;
        let code = format!("{}-{}-{}-{}", &raw[..5], &raw[5..10], &raw[10..15], &raw[15..20]);
        *self.setup_code.lock() = Some(self.hash(&code));
        Ok(Some(code))
    }

    /// Whether the setup page is open (no account yet and a code was issued).
    pub fn setup_open(&self) -> bool {
        self.setup_code.lock().is_some()
    }

    /// Creates the first owner with the setup code, and signs them in.
    pub async fn complete_setup(
        &self,
        code: &str,
        email: &str,
        name: &str,
        password: &str,
        ip: Option<String>,
    ) -> Result<String> {
        let now = self.now();
        // Throttled per source address (an IPv6 /64 as one), never globally: a global count let
        // anyone who reached /setup lock the owner out with a few wrong codes. Guessing is hopeless
        // anyway (a 20-character base62 code: about 119 bits); the throttle only bounds the work
        // one address can cause, and its map is bounded like every throttle's.
        let address = format!("setup:{}", address_key(ip.as_deref()));
        if !self.attempt(&[(address.as_str(), SETUP_ATTEMPTS_PER_ADDRESS)], now).await {
            return Err(too_many());
        }
        let email = normalize_email(email)?;
        let name = check_name(name)?;
        check_password(password)?;
        // The code is taken out of its slot before anything else happens: it works once.
        let taken = {
            let mut slot = self.setup_code.lock();
            let good = slot.as_ref().is_some_and(|h| *h == self.hash(code.trim()));
            if good { slot.take() } else { None }
        };
        if taken.is_none() {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "bad_setup_code",
                "the setup code is not right; copy it from the terminal where `keygate serve` runs",
            ));
        }
        // Whatever fails from here on, the code works again.
        let result = async {
            if self.store().user_count().await? > 0 {
                return Err(Error::conflict("already_set_up", "keygate is already set up; sign in instead"));
            }
            let ws = self.admin.bootstrap().await?;
            let user = self.new_user(&email, &name, password).await?;
            let m = Membership {
                workspace_id: ws.id.clone(),
                user_id: user.id.clone(),
                role: Role::Owner,
                created_at: now,
            };
            let actor = Actor { id: user.id.to_string(), source: Some("dashboard setup".into()), owner: true };
            let mut audit = NewAuditEvent::new(&ws.id, &actor, "user.created", user.id.as_str(), now);
            audit.after = Some(json!({"email": user.email, "name": user.name, "role": "owner"}));
            self.store().insert_user(&user, &m, &audit).await?;
            Ok((user, ws))
        }
        .await;
        let (user, ws) = match result {
            Ok(done) => done,
            Err(e) => {
                if e.code != "already_set_up" {
                    *self.setup_code.lock() = taken;
                }
                return Err(e);
            }
        };
        self.start_session(&user, &ws.id, false, ip).await
    }

    async fn new_user(&self, email: &str, name: &str, password: &str) -> Result<User> {
        let now = self.now();
        Ok(User {
            id: UserId::random(&RngOf(&self.admin))?,
            email: email.to_owned(),
            name: name.to_owned(),
            password_hash: self.hash_password(password).await?,
            totp_sealed: None,
            totp_enabled: false,
            totp_last_step: 0,
            disabled: false,
            created_at: now,
            updated_at: now,
        })
    }

    async fn hash_password(&self, password: &str) -> Result<String> {
        let mut salt = [0u8; 16];
        self.admin.random(&mut salt)?;
        let password = password.to_owned();
        let _permit = self.hashing.acquire().await.map_err(|_| Error::internal("password hashing stopped"))?;
        tokio::task::spawn_blocking(move || hash_password_now(&password, &salt))
            .await
            .map_err(|_| Error::internal("password hashing task failed"))?
    }

    async fn password_matches(&self, password: &str, phc: &str) -> bool {
        let password = password.to_owned();
        let phc = phc.to_owned();
        let Ok(_permit) = self.hashing.acquire().await else { return false };
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&phc).is_ok_and(|h| hasher().verify_password(password.as_bytes(), &h).is_ok())
        })
        .await
        .unwrap_or(false)
    }

    // ---- sign-in ----------------------------------------------------------------------------

    /// Checks email and password (throttled per account and per address).
    pub async fn sign_in(&self, email: &str, password: &str, ip: Option<String>) -> Result<SignIn> {
        let user = self.check_password_throttled(email, password, ip.as_deref()).await?;
        let memberships = self.store().memberships(&user.id).await?;
        let Some(m) = memberships.first() else {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "no_workspace",
                "this account belongs to no workspace any more; ask an owner to invite you again",
            ));
        };
        let secret = self.start_session(&user, &m.workspace_id, user.totp_enabled, ip.clone()).await?;
        if user.totp_enabled {
            return Ok(SignIn::NeedsSecondFactor(secret));
        }
        self.audit_sign_in(&user, &m.workspace_id, ip, "password").await;
        Ok(SignIn::Done(secret))
    }

    /// The account whose password this is, throttled per account and per address (an attempt
    /// is counted before the hash is checked, and given back if the password is right).
    async fn check_password_throttled(&self, email: &str, password: &str, ip: Option<&str>) -> Result<User> {
        let now = self.now();
        let account = account_key(email);
        let address = address_key(ip);
        let keys = [
            (account.as_str(), self.settings.max_failures_per_account),
            (address.as_str(), self.settings.max_failures_per_address),
        ];
        if !self.attempt(&keys, now).await {
            return Err(too_many());
        }
        let password = if password.len() > MAX_PASSWORD_BYTES { "" } else { password };
        let user = self.store().user_by_email(&email.trim().to_lowercase()).await?;
        let phc = user.as_ref().map_or(self.dummy_hash.as_str(), |u| u.password_hash.as_str());
        let good = self.password_matches(password, phc).await;
        let user = user.filter(|u| good && !u.disabled).ok_or_else(bad_credentials)?;
        self.succeeded(&[account.as_str(), address.as_str()]).await;
        Ok(user)
    }

    async fn audit_sign_in(&self, user: &User, ws: &WorkspaceId, ip: Option<String>, method: &str) {
        let actor = Actor { id: user.id.to_string(), source: ip.clone().or(Some("dashboard".into())), owner: true };
        let mut audit = NewAuditEvent::new(ws, &actor, "user.signed_in", user.id.as_str(), self.now());
        audit.after = Some(json!({"method": method}));
        if let Err(e) = self.store().append_audit(&audit).await {
            tracing::warn!(error = %e, "could not record a sign-in in the audit trail");
        }
    }

    /// Completes a pending sign-in with a TOTP code or a recovery code. The pending session is
    /// replaced by a new one (a fresh secret at the change of privilege); returns its secret.
    pub async fn second_factor(&self, cookie: &str, code: &str) -> Result<String> {
        let now = self.now();
        let Some(session) = self.store().session(&self.hash(cookie)).await? else {
            return Err(Error::new(ErrorKind::Unauthenticated, "session_expired", "sign in again"));
        };
        if !session.pending_mfa || self.expired(&session, now) {
            return Err(Error::new(ErrorKind::Unauthenticated, "session_expired", "sign in again"));
        }
        let key = format!("mfa:{}", session.user_id);
        if !self.attempt(&[(key.as_str(), self.settings.max_failures_per_account)], now).await {
            return Err(too_many());
        }
        let user = self.store().user(&session.user_id).await?.ok_or_else(bad_credentials)?;
        let method = if self.check_code(&user, code).await? {
            "totp"
        } else if self.store().use_recovery_code(&user.id, &self.hash(&normalize_recovery(code)), now).await? {
            "recovery_code"
        } else {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                "bad_code",
                "the code is not right; enter the 6 digits your authenticator app shows now, or a recovery code",
            ));
        };
        self.succeeded(&[key.as_str()]).await;
        self.store().delete_session(&session.id_hash).await?;
        let secret = self.start_session(&user, &session.workspace_id, false, session.ip.clone()).await?;
        self.audit_sign_in(&user, &session.workspace_id, session.ip.clone(), method).await;
        Ok(secret)
    }

    /// Checks a TOTP code for `user` and spends its time step.
    async fn check_code(&self, user: &User, code: &str) -> Result<bool> {
        let Some(sealed) = &user.totp_sealed else { return Ok(false) };
        let secret = self.unseal(user, sealed)?;
        let now_s = self.now().as_millis().div_euclid(1000);
        let Some(step) = totp::verify(&secret, code, now_s, user.totp_last_step) else { return Ok(false) };
        self.store().advance_totp_step(&user.id, step).await
    }

    async fn start_session(
        &self,
        user: &User,
        ws: &WorkspaceId,
        pending_mfa: bool,
        ip: Option<String>,
    ) -> Result<String> {
        self.start_session_until(user, ws, pending_mfa, ip, None).await
    }

    /// [`Self::start_session`], ending at `until` (a session moved to another workspace keeps
    /// the end of the one it replaces: switching does not extend a sign-in) or after the
    /// absolute time-out.
    async fn start_session_until(
        &self,
        user: &User,
        ws: &WorkspaceId,
        pending_mfa: bool,
        ip: Option<String>,
        until: Option<Timestamp>,
    ) -> Result<String> {
        let now = self.now();
        let mut raw = [0u8; 32];
        self.admin.random(&mut raw)?;
        let secret = URL_SAFE_NO_PAD.encode(raw);
        let session = Session {
            id_hash: self.hash(&secret),
            user_id: user.id.clone(),
            workspace_id: ws.clone(),
            pending_mfa,
            created_at: now,
            last_seen_at: now,
            expires_at: until
                .unwrap_or_else(|| Timestamp::from_millis(now.as_millis() + self.settings.absolute_timeout_ms)),
            ip,
        };
        self.store().insert_session(&session).await?;
        Ok(secret)
    }

    fn expired(&self, s: &Session, now: Timestamp) -> bool {
        now >= s.expires_at || now.as_millis() - s.last_seen_at.as_millis() >= self.settings.idle_timeout_ms
    }

    /// The signed-in person behind a session cookie, or `None` (unknown, expired, pending the
    /// second factor, account disabled or removed from the workspace).
    pub async fn resolve(&self, cookie: &str) -> Result<Option<Viewer>> {
        let now = self.now();
        let Some(mut session) = self.store().session(&self.hash(cookie)).await? else { return Ok(None) };
        if self.expired(&session, now) {
            self.store().delete_session(&session.id_hash).await?;
            return Ok(None);
        }
        if session.pending_mfa {
            return Ok(None);
        }
        let Some(user) = self.store().user(&session.user_id).await?.filter(|u| !u.disabled) else { return Ok(None) };
        let Some(m) = self.store().membership(&session.workspace_id, &user.id).await? else { return Ok(None) };
        if now.as_millis() - session.last_seen_at.as_millis() >= TOUCH_EVERY_MS {
            session.last_seen_at = now;
            self.store().update_session(&session).await?;
        }
        let workspaces = self.workspaces_of(&user).await?;
        Ok(Some(Viewer { session, user, role: m.role, csrf: self.csrf_token(cookie), workspaces }))
    }

    /// The workspaces `user` is a member of (id and name), by name. Memberships of a workspace
    /// being deleted are skipped.
    async fn workspaces_of(&self, user: &User) -> Result<Vec<(WorkspaceId, String)>> {
        let mut out = Vec::new();
        for m in self.store().memberships(&user.id).await? {
            if let Some(ws) = self.store().workspace(&m.workspace_id).await? {
                out.push((ws.id, ws.name));
            }
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    /// Moves `viewer` to another workspace they are a member of: a new session there (a fresh
    /// secret, as at every change of privilege; the second factor, if any, was given for this
    /// sign-in and still counts), the old one ended, and a sign-in in the target workspace's
    /// audit trail (method `workspace_switch`). Returns the new session's secret. A workspace
    /// the account is not a member of is `workspace_not_found`, whether it exists or not.
    pub async fn switch_workspace(&self, viewer: &Viewer, target: &str) -> Result<String> {
        let Some((ws, _)) = viewer.workspaces.iter().find(|(id, _)| id.as_str() == target) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "workspace_not_found",
                "you are not a member of that workspace; pick one from the list",
            ));
        };
        // Membership is checked again against the store: the list was read with the page.
        if self.store().membership(ws, &viewer.user.id).await?.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                "workspace_not_found",
                "you are no longer a member of that workspace",
            ));
        }
        let ip = viewer.session.ip.clone();
        let until = Some(viewer.session.expires_at);
        let secret = self.start_session_until(&viewer.user, ws, false, ip.clone(), until).await?;
        self.store().delete_session(&viewer.session.id_hash).await?;
        self.audit_sign_in(&viewer.user, ws, ip, "workspace_switch").await;
        Ok(secret)
    }

    /// Whether a cookie belongs to a session waiting for its second factor.
    pub async fn pending(&self, cookie: &str) -> Result<bool> {
        let now = self.now();
        Ok(self.store().session(&self.hash(cookie)).await?.is_some_and(|s| s.pending_mfa && !self.expired(&s, now)))
    }

    pub async fn sign_out(&self, cookie: &str) -> Result<()> {
        self.store().delete_session(&self.hash(cookie)).await
    }

    /// The CSRF token of a session: derived from its secret, so it needs no storage and is
    /// worthless without the cookie.
    pub fn csrf_token(&self, cookie: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.hash(&format!("csrf:{cookie}")).0)
    }

    /// Compares a submitted CSRF token in constant time.
    pub fn csrf_ok(&self, cookie: &str, submitted: &str) -> bool {
        self.csrf_token(cookie).as_bytes().ct_eq(submitted.as_bytes()).into()
    }

    // ---- two-factor enrolment ---------------------------------------------------------------

    fn seal(&self, user: &UserId, secret: &[u8]) -> Result<Vec<u8>> {
        self.sealer.seal(&self.admin, user.as_str(), secret)
    }

    fn unseal(&self, user: &User, sealed: &[u8]) -> Result<Vec<u8>> {
        self.sealer.open(user.id.as_str(), sealed, "the two-factor secret")
    }

    /// Starts enrolment: a new secret, sealed and stored (not active until confirmed). Returns
    /// the `otpauth://` URI for the QR code and the secret in base32 for typing.
    pub async fn begin_totp(&self, viewer: &Viewer) -> Result<(String, String)> {
        let mut user = self.store().user(&viewer.user.id).await?.ok_or_else(|| Error::not_found("user"))?;
        if user.totp_enabled {
            return Err(Error::conflict("two_factor_on", "two-factor sign-in is already on"));
        }
        let mut secret = [0u8; totp::SECRET_BYTES];
        self.admin.random(&mut secret)?;
        user.totp_sealed = Some(self.seal(&user.id, &secret)?);
        user.updated_at = self.now();
        self.store().update_user(&user, None).await?;
        Ok((totp::otpauth_uri(&self.settings.issuer, &user.email, &secret), totp::base32(&secret)))
    }

    /// The pending enrolment's URI and secret again (a reload of the enrolment page).
    pub async fn pending_totp(&self, viewer: &Viewer) -> Result<Option<(String, String)>> {
        let user = self.store().user(&viewer.user.id).await?.ok_or_else(|| Error::not_found("user"))?;
        match (&user.totp_sealed, user.totp_enabled) {
            (Some(sealed), false) => {
                let secret = self.unseal(&user, sealed)?;
                Ok(Some((totp::otpauth_uri(&self.settings.issuer, &user.email, &secret), totp::base32(&secret))))
            }
            _ => Ok(None),
        }
    }

    /// Confirms enrolment with a first code; turns two-factor on and returns fresh recovery
    /// codes (shown once).
    pub async fn confirm_totp(&self, viewer: &Viewer, code: &str) -> Result<Vec<String>> {
        let mut user = self.store().user(&viewer.user.id).await?.ok_or_else(|| Error::not_found("user"))?;
        if user.totp_enabled {
            return Err(Error::conflict("two_factor_on", "two-factor sign-in is already on"));
        }
        if !self.check_code(&user, code).await? {
            return Err(Error::invalid("bad_code", "the code is not right; enter the 6 digits your app shows now"));
        }
        let now = self.now();
        user.totp_enabled = true;
        user.totp_last_step = self.store().user(&user.id).await?.map_or(0, |u| u.totp_last_step);
        user.updated_at = now;
        let audit =
            NewAuditEvent::new(viewer.workspace(), &viewer.actor(), "user.two_factor_enabled", user.id.as_str(), now);
        self.store().update_user(&user, Some(&audit)).await?;
        self.new_recovery_codes(&user.id).await
    }

    async fn new_recovery_codes(&self, user: &UserId) -> Result<Vec<String>> {
        let mut codes = Vec::with_capacity(RECOVERY_CODES);
        let mut hashes = Vec::with_capacity(RECOVERY_CODES);
        for _ in 0..RECOVERY_CODES {
            let raw = self.admin.random_text(10)?.to_lowercase();
            let code = format!("{}-{}", &raw[..5], &raw[5..]);
            hashes.push(self.hash(&normalize_recovery(&code)));
            codes.push(code);
        }
        self.store().set_recovery_codes(user, &hashes, self.now()).await?;
        Ok(codes)
    }

    pub async fn recovery_codes_left(&self, user: &UserId) -> Result<u32> {
        self.store().recovery_codes_left(user).await
    }

    // ---- members, invitations, policy -----------------------------------------------------

    fn require_owner(viewer: &Viewer) -> Result<()> {
        if viewer.role.is_owner() {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Forbidden, "owner_only", "only an owner of this workspace can do this"))
        }
    }

    pub async fn members(&self, viewer: &Viewer) -> Result<Vec<(Membership, User)>> {
        self.store().members(viewer.workspace()).await
    }

    /// Creates an invitation; returns it and the one-time code for its link.
    pub async fn invite(&self, viewer: &Viewer, email: &str, role: Role) -> Result<(Invitation, String)> {
        Self::require_owner(viewer)?;
        let email = normalize_email(email)?;
        let now = self.now();
        let code = self.admin.random_text(32)?;
        let inv = Invitation {
            id: InvitationId::random(&RngOf(&self.admin))?,
            workspace_id: viewer.workspace().clone(),
            email: email.clone(),
            role,
            code_hash: self.hash(&code),
            invited_by: viewer.user.id.clone(),
            created_at: now,
            expires_at: Timestamp::from_millis(now.as_millis() + self.settings.invitation_ttl_ms),
            accepted_at: None,
        };
        let mut audit = NewAuditEvent::new(viewer.workspace(), &viewer.actor(), "member.invited", inv.id.as_str(), now);
        audit.after = Some(json!({"email": email, "role": role.as_str()}));
        self.store().insert_invitation(&inv, &audit).await?;
        Ok((inv, code))
    }

    /// Withdraws an invitation (its link stops working).
    pub async fn withdraw_invitation(&self, viewer: &Viewer, id: &InvitationId) -> Result<()> {
        Self::require_owner(viewer)?;
        let audit = NewAuditEvent::new(
            viewer.workspace(),
            &viewer.actor(),
            "member.invitation_withdrawn",
            id.as_str(),
            self.now(),
        );
        if self.store().delete_invitation(viewer.workspace(), id, &audit).await? {
            Ok(())
        } else {
            Err(Error::not_found("invitation"))
        }
    }

    pub async fn invitations(&self, viewer: &Viewer) -> Result<Vec<Invitation>> {
        self.store().invitations(viewer.workspace()).await
    }

    /// A valid (unexpired, unused) invitation by its code.
    pub async fn invitation(&self, code: &str) -> Result<Invitation> {
        let now = self.now();
        self.store()
            .invitation_by_code(&self.hash(code))
            .await?
            .filter(|i| i.accepted_at.is_none() && now < i.expires_at)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    "invitation_not_found",
                    "this invitation link is not valid any more; ask for a new one",
                )
            })
    }

    /// Accepts an invitation, creating the account if the email has none; signs the person in.
    pub async fn accept_invitation(
        &self,
        code: &str,
        name: &str,
        password: &str,
        ip: Option<String>,
    ) -> Result<String> {
        let inv = self.invitation(code).await?;
        let now = self.now();
        let existing = self.store().user_by_email(&inv.email).await?;
        let new_user = match &existing {
            Some(u) => {
                // Asked before the password, so the answer says nothing about the password.
                if self.store().membership(&inv.workspace_id, &u.id).await?.is_some() {
                    return Err(Error::conflict(
                        "already_member",
                        "you are already a member of this workspace; sign in",
                    ));
                }
                // The same throttle as sign-in: an invitation link is not a way to guess passwords.
                self.check_password_throttled(&inv.email, password, ip.as_deref()).await?;
                None
            }
            None => {
                let name = check_name(name)?;
                check_password(password)?;
                Some(self.new_user(&inv.email, &name, password).await?)
            }
        };
        let Some(user) = existing.clone().or_else(|| new_user.clone()) else {
            return Err(Error::internal("no user after accepting an invitation"));
        };
        let m = Membership {
            workspace_id: inv.workspace_id.clone(),
            user_id: user.id.clone(),
            role: inv.role,
            created_at: now,
        };
        let actor = Actor { id: user.id.to_string(), source: Some("dashboard".into()), owner: true };
        let mut audit = NewAuditEvent::new(&inv.workspace_id, &actor, "member.joined", user.id.as_str(), now);
        audit.after = Some(json!({"invitation": inv.id.as_str(), "role": inv.role.as_str()}));
        self.store().accept_invitation(&inv, new_user.as_ref(), &m, &audit).await?;
        self.start_session(&user, &inv.workspace_id, user.totp_enabled, ip).await
    }

    pub async fn set_role(&self, viewer: &Viewer, user: &UserId, role: Role) -> Result<()> {
        Self::require_owner(viewer)?;
        let ws = viewer.workspace();
        let mut m = self.store().membership(ws, user).await?.ok_or_else(|| Error::not_found("member"))?;
        if m.role == Role::Owner && role != Role::Owner {
            self.keep_an_owner(ws, user).await?;
        }
        let before = m.role;
        m.role = role;
        let mut audit = NewAuditEvent::new(ws, &viewer.actor(), "member.role_changed", user.as_str(), self.now());
        audit.before = Some(json!({"role": before.as_str()}));
        audit.after = Some(json!({"role": role.as_str()}));
        self.store().put_membership(&m, &audit).await
    }

    pub async fn remove_member(&self, viewer: &Viewer, user: &UserId) -> Result<()> {
        Self::require_owner(viewer)?;
        let ws = viewer.workspace();
        let m = self.store().membership(ws, user).await?.ok_or_else(|| Error::not_found("member"))?;
        if m.role == Role::Owner {
            self.keep_an_owner(ws, user).await?;
        }
        let audit = NewAuditEvent::new(ws, &viewer.actor(), "member.removed", user.as_str(), self.now());
        self.store().delete_membership(ws, user, &audit).await?;
        Ok(())
    }

    async fn keep_an_owner(&self, ws: &WorkspaceId, leaving: &UserId) -> Result<()> {
        let others = self
            .store()
            .members(ws)
            .await?
            .into_iter()
            .filter(|(m, _)| m.role == Role::Owner && m.user_id != *leaving)
            .count();
        if others == 0 {
            return Err(Error::conflict("last_owner", "a workspace needs an owner; make someone else owner first"));
        }
        Ok(())
    }

    pub async fn policy(&self, ws: &WorkspaceId) -> Result<WorkspacePolicy> {
        self.store().workspace_policy(ws).await
    }

    pub async fn set_policy(&self, viewer: &Viewer, policy: &WorkspacePolicy) -> Result<()> {
        Self::require_owner(viewer)?;
        policy.rules.validate()?;
        let mut audit = NewAuditEvent::new(
            viewer.workspace(),
            &viewer.actor(),
            "workspace.policy_changed",
            viewer.workspace().as_str(),
            self.now(),
        );
        audit.after = serde_json::to_value(policy).ok();
        self.store().put_workspace_policy(viewer.workspace(), policy, &audit).await
    }
}

/// What became of a plan change a person asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanChange {
    /// The app is on the plan now.
    Applied,
    /// An admin has to approve it first.
    Requested,
}

impl Accounts {
    /// Whether this person may change `app` (developers: only apps they own).
    pub async fn may_change_app(&self, viewer: &Viewer, app: &AppId) -> Result<bool> {
        if viewer.role.manages_all() {
            return Ok(true);
        }
        if !viewer.role.can_write() {
            return Ok(false);
        }
        Ok(self.store().app_owner(viewer.workspace(), app).await?.as_ref() == Some(&viewer.user.id))
    }

    /// Moves `app` to `plan`, or files a request for an admin when the workspace wants plan
    /// changes approved and the person is not an admin.
    pub async fn change_plan(
        &self,
        viewer: &Viewer,
        app: &AppId,
        plan: &PlanId,
        note: Option<String>,
    ) -> Result<PlanChange> {
        let ws = viewer.workspace();
        if !self.may_change_app(viewer, app).await? {
            return Err(Error::not_found("app"));
        }
        self.admin.app(ws, app).await?;
        self.admin.plan(ws, plan).await?;
        let policy = self.store().workspace_policy(ws).await?;
        if !policy.plan_changes_need_approval || viewer.role.manages_all() {
            let update = crate::service::AppUpdate { plan_id: Some(Some(plan.clone())), ..Default::default() };
            self.admin.update_app(ws, &viewer.actor(), app, update).await?;
            return Ok(PlanChange::Applied);
        }
        let note = note.map(|n| n.trim().chars().take(500).collect::<String>()).filter(|n| !n.is_empty());
        let now = self.now();
        let req = PlanRequest {
            id: PlanRequestId::random(&RngOf(&self.admin))?,
            workspace_id: ws.clone(),
            app_id: app.clone(),
            plan_id: plan.clone(),
            requested_by: viewer.user.id.clone(),
            note,
            status: PlanRequestStatus::Pending,
            created_at: now,
            decided_by: None,
            decided_at: None,
        };
        let mut audit = NewAuditEvent::new(ws, &viewer.actor(), "plan.requested", req.id.as_str(), now);
        audit.after = Some(json!({"app_id": app.as_str(), "plan_id": plan.as_str()}));
        self.store().insert_plan_request(&req, &audit).await?;
        Ok(PlanChange::Requested)
    }

    /// Plan requests this person may see: admins all of them, developers their own.
    pub async fn plan_requests(&self, viewer: &Viewer) -> Result<Vec<PlanRequest>> {
        let all = self.store().plan_requests(viewer.workspace(), None).await?;
        Ok(if viewer.role.manages_all() {
            all
        } else {
            all.into_iter().filter(|r| r.requested_by == viewer.user.id).collect()
        })
    }

    /// An admin approves (the app moves to the plan) or denies a pending request.
    pub async fn decide_plan_request(&self, viewer: &Viewer, id: &PlanRequestId, approve: bool) -> Result<()> {
        if !viewer.role.manages_all() {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "admin_only",
                "only an admin or owner can decide plan requests",
            ));
        }
        let ws = viewer.workspace();
        let req = self.store().plan_request(ws, id).await?.ok_or_else(|| Error::not_found("plan request"))?;
        let status = if approve { PlanRequestStatus::Approved } else { PlanRequestStatus::Denied };
        let now = self.now();
        let action = if approve { "plan.request_approved" } else { "plan.request_denied" };
        let mut audit = NewAuditEvent::new(ws, &viewer.actor(), action, id.as_str(), now);
        audit.after = Some(json!({"app_id": req.app_id.as_str(), "plan_id": req.plan_id.as_str()}));
        self.store().decide_plan_request(ws, id, status, &viewer.user.id, now, &audit).await?;
        if approve {
            let update = crate::service::AppUpdate { plan_id: Some(Some(req.plan_id.clone())), ..Default::default() };
            self.admin.update_app(ws, &viewer.actor(), &req.app_id, update).await?;
        }
        Ok(())
    }
}

fn normalize_recovery(code: &str) -> String {
    code.trim().to_lowercase().replace(' ', "")
}

/// A PHC string with the parameters real hashes have, a random salt and a random output: checking
/// a password against it costs exactly what checking a real one does, and never matches. It is
/// made without running Argon2, so starting keygate does not take (and, with the allocator
/// keeping freed memory, hold) Argon2's 19 MiB.
fn dummy_phc(admin: &Admin) -> Result<String> {
    let mut salt = [0u8; 16];
    let mut output = [0u8; 32];
    admin.random(&mut salt)?;
    admin.random(&mut output)?;
    Ok(phc_of(&salt, &output))
}

/// The PHC string of an Argon2id output made with [`hasher`]'s parameters.
fn phc_of(salt: &[u8; 16], output: &[u8; 32]) -> String {
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    let h = hasher();
    let p = h.params();
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        p.m_cost(),
        p.t_cost(),
        p.p_cost(),
        STANDARD_NO_PAD.encode(salt),
        STANDARD_NO_PAD.encode(output)
    )
}

fn hash_password_now(password: &str, salt: &[u8; 16]) -> Result<String> {
    hasher()
        .hash_password_with_salt(password.as_bytes(), salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("password hashing failed: {e}")))
}

/// The admin's CSRNG as a `Randomness`, for id generation.
struct RngOf<'a>(&'a Admin);

impl keygate_core::secret::Randomness for RngOf<'_> {
    fn fill(&self, dest: &mut [u8]) -> Result<()> {
        self.0.random(dest)
    }
}

#[cfg(test)]
mod dummy_hash_tests {
    use super::*;

    #[test]
    fn the_dummy_hash_costs_what_a_real_one_does_and_matches_nothing() {
        let salt = [7u8; 16];
        let real = hash_password_now("correct horse battery", &salt).unwrap();
        let real = PasswordHash::new(&real).unwrap();
        // Same algorithm, version, parameters and output length as a real hash: the same work.
        let dummy = phc_of(&salt, &[1u8; 32]);
        let parsed = PasswordHash::new(&dummy).unwrap();
        assert_eq!(parsed.algorithm, real.algorithm);
        assert_eq!(parsed.version, real.version);
        assert_eq!(parsed.params, real.params);
        assert_eq!(parsed.hash.map(|h| h.len()), real.hash.map(|h| h.len()));
        // The output is random, so no password verifies against it, including the one whose
        // real hash shares its salt.
        assert!(hasher().verify_password(b"correct horse battery", &parsed).is_err());
        // And a real output in the same format does verify: the format is Argon2's own.
        let out = real.hash.unwrap();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(out.as_bytes());
        let rebuilt = phc_of(&salt, &bytes);
        assert!(hasher().verify_password(b"correct horse battery", &PasswordHash::new(&rebuilt).unwrap()).is_ok());
    }
}
