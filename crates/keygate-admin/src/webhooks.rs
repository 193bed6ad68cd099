//! Webhook endpoints (issue 15): a workspace's URLs that receive its events, signed per the
//! Standard Webhooks specification, and the delivery of the outbox (see keygate-core's `notify`
//! module). The HTTP request itself is made by a [`WebhookTransport`] the binary provides (with
//! its address guard); everything else — claiming, signing, retrying, disabling — is here.

use std::sync::Arc;

use async_trait::async_trait;
use keygate_core::ids::{WebhookId, WorkspaceId};
use keygate_core::model::{Actor, NewAuditEvent, Page, PageRequest};
use keygate_core::notify::{
    AttemptOutcome, Delivery, DeliveryAttempt, DeliveryState, NewDelivery, WebhookEndpoint, event_type, format_secret,
    retry_after_secs, sign,
};
use keygate_core::{Error, Result, Timestamp};

use crate::seal::Sealer;
use crate::service::Admin;

/// The longest URL an endpoint may have.
const MAX_URL_LEN: usize = 2_000;
/// The most endpoints a workspace may have.
pub const MAX_ENDPOINTS: usize = 50;
/// How long a claimed delivery is reserved for the node that claimed it: longer than a batch of
/// attempts to one endpoint at the longest timeout (16 × 60 s at most, 16 × 10 s by default).
const LEASE_MS: i64 = 1_200_000;
/// How many deliveries one pass of a node's worker takes at most.
const CLAIM_BATCH: u32 = 16;
/// The bytes of a signing key.
const SECRET_BYTES: usize = 32;
/// The longest a rotated webhook secret keeps signing beside its successor: 7 days.
pub const MAX_SECRET_OVERLAP_SECONDS: u64 = 7 * 86_400;

/// How notifications behave (`[webhooks]` and `[notifications]` of the configuration).
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// `token.expiring` is recorded this many days before a token expires.
    pub expiring_days: u32,
    /// Where people reach the dashboard, for the links in emails (`[dashboard] public_url`).
    pub dashboard_url: Option<String>,
    /// Allow endpoints on private, loopback and link-local addresses (a receiver on the same
    /// network). Off by default: a URL must not turn keygate against its own network.
    pub allow_private: bool,
    /// An endpoint every attempt to which has failed for this long is disabled (milliseconds).
    pub disable_after_ms: i64,
    /// Deliveries no longer pending are kept this long in the delivery log (milliseconds).
    pub retention_ms: i64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            expiring_days: 7,
            dashboard_url: None,
            allow_private: false,
            disable_after_ms: 24 * 3_600_000,
            retention_ms: 30 * 86_400_000,
        }
    }
}

/// What a delivery attempt got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// An answer with this status.
    Answered(u16),
    /// No answer: refused by the address guard, unreachable, timed out (the reason, no secret).
    Failed(String),
}

/// Makes the HTTP request of an attempt: a POST of `body` with `headers` to `url`, within a time
/// limit, refusing addresses the settings forbid.
#[async_trait]
pub trait WebhookTransport: Send + Sync {
    async fn post(&self, url: &str, headers: &[(&'static str, String)], body: &str) -> SendResult;
}

/// An endpoint to create.
#[derive(Debug, Clone, Default)]
pub struct NewWebhook {
    pub url: String,
    pub description: Option<String>,
    /// Empty: every event.
    pub event_types: Vec<String>,
}

/// Changes to an endpoint; `None`: unchanged.
#[derive(Debug, Clone, Default)]
pub struct WebhookUpdate {
    pub url: Option<String>,
    pub description: Option<Option<String>>,
    pub event_types: Option<Vec<String>>,
    /// Enabling clears the reason it was disabled and its failure streak.
    pub enabled: Option<bool>,
}

/// The endpoint and, once, its signing secret (`whsec_…`).
#[derive(Debug, Clone)]
pub struct CreatedWebhook {
    pub endpoint: WebhookEndpoint,
    pub secret: String,
}

/// What one pass of the delivery worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryPass {
    /// The claim took a whole batch: more may be due.
    pub full: bool,
    pub attempted: usize,
    pub delivered: usize,
    pub disabled: usize,
}

impl Admin {
    fn webhook_sealer(&self) -> Result<Sealer> {
        Sealer::new(self, "webhook signing keys")
    }

    pub(crate) fn notify_settings(&self) -> NotifySettings {
        self.notify_settings.get().cloned().unwrap_or_default()
    }

    /// Sets how webhooks behave (once, at start).
    pub fn set_notify_settings(&self, settings: NotifySettings) {
        let _ = self.notify_settings.set(settings);
    }

    /// Checks an endpoint URL: `http(s)://host[:port]/path`, no credentials, no fragment, and a
    /// host that is not a private or loopback address (unless allowed). Names are checked again
    /// when they are resolved, at every attempt.
    fn check_webhook_url(&self, raw: &str) -> Result<String> {
        let bad = |why: &str| {
            Error::invalid("invalid_webhook_url", format!("url must be an absolute http:// or https:// URL{why}"))
        };
        let url = raw.trim();
        if url.is_empty() || url.len() > MAX_URL_LEN || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(&format!(" of at most {MAX_URL_LEN} characters, without spaces")));
        }
        let uri: axum::http::Uri = url.parse().map_err(|_| bad(""))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("")),
        }
        let Some(authority) = uri.authority() else { return Err(bad("")) };
        if authority.as_str().contains('@') {
            return Err(bad(" without credentials (user:password@): the signature authenticates keygate"));
        }
        if url.contains('#') {
            return Err(bad(" without a #fragment"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad(""));
        }
        if !self.notify_settings().allow_private {
            let local_name =
                host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost");
            let private_ip = host.parse::<std::net::IpAddr>().is_ok_and(|ip| !keygate_core::notify::is_public_ip(ip));
            if local_name || private_ip {
                return Err(Error::invalid(
                    "webhook_url_refused",
                    format!(
                        "{host} is a private, loopback or link-local address; webhooks go to public addresses \
                         only, unless [webhooks] allow_private = true is set in the configuration"
                    ),
                ));
            }
        }
        Ok(url.to_owned())
    }

    fn check_event_types(types: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for t in types {
            if t != "*" && event_type(t).is_none() {
                return Err(Error::invalid(
                    "invalid_event_type",
                    format!(
                        "unknown event type {t:?}; known types: {}, or * for all",
                        keygate_core::notify::EVENT_TYPES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        if out.iter().any(|t| t == "*") {
            out.clear();
        }
        Ok(out)
    }

    fn check_description(d: Option<String>) -> Result<Option<String>> {
        match d.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty()) {
            Some(d) if d.chars().count() > 500 || d.chars().any(char::is_control) => Err(Error::invalid(
                "invalid_description",
                "description must be at most 500 characters without control characters",
            )),
            other => Ok(other),
        }
    }

    fn new_webhook_secret(&self, id: &WebhookId) -> Result<(Vec<u8>, String)> {
        let mut key = [0u8; SECRET_BYTES];
        self.random(&mut key)?;
        let sealed = self.webhook_sealer()?.seal(self, id.as_str(), &key)?;
        Ok((sealed, format_secret(&key)))
    }

    /// Adds an endpoint; its signing secret is in the answer and never shown again.
    pub async fn create_webhook(&self, ws: &WorkspaceId, actor: &Actor, new: NewWebhook) -> Result<CreatedWebhook> {
        let url = self.check_webhook_url(&new.url)?;
        let event_types = Self::check_event_types(&new.event_types)?;
        let description = Self::check_description(new.description)?;
        if self.store().list_webhooks(ws).await?.len() >= MAX_ENDPOINTS {
            return Err(Error::conflict(
                "too_many_webhooks",
                format!("a workspace has at most {MAX_ENDPOINTS} webhook endpoints; delete one first"),
            ));
        }
        let now = self.now();
        let id = WebhookId::random(self.rng())?;
        let (sealed_secret, secret) = self.new_webhook_secret(&id)?;
        let endpoint = WebhookEndpoint {
            id,
            workspace_id: ws.clone(),
            url,
            description,
            event_types,
            enabled: true,
            disabled_reason: None,
            sealed_secret,
            previous_sealed_secret: None,
            previous_secret_until: None,
            failing_since: None,
            created_at: now,
            updated_at: now,
        };
        let audit = NewAuditEvent::new(ws, actor, "webhook.create", endpoint.id.as_str(), now)
            .with_after(endpoint.audit_view());
        self.store().insert_webhook(&endpoint, &audit).await?;
        Ok(CreatedWebhook { endpoint, secret })
    }

    pub async fn list_webhooks(&self, ws: &WorkspaceId) -> Result<Vec<WebhookEndpoint>> {
        self.store().list_webhooks(ws).await
    }

    pub async fn webhook(&self, ws: &WorkspaceId, id: &WebhookId) -> Result<WebhookEndpoint> {
        self.store().webhook(ws, id).await?.ok_or_else(|| Error::not_found("webhook endpoint"))
    }

    /// Changes an endpoint. Enabling a disabled one makes its pending deliveries due again.
    pub async fn update_webhook(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &WebhookId,
        update: WebhookUpdate,
    ) -> Result<WebhookEndpoint> {
        let before = self.webhook(ws, id).await?;
        let mut after = before.clone();
        if let Some(url) = &update.url {
            after.url = self.check_webhook_url(url)?;
        }
        if let Some(d) = update.description {
            after.description = Self::check_description(d)?;
        }
        if let Some(t) = &update.event_types {
            after.event_types = Self::check_event_types(t)?;
        }
        if let Some(enabled) = update.enabled {
            if enabled && !before.enabled {
                after.disabled_reason = None;
                after.failing_since = None;
            } else if !enabled && before.enabled {
                after.disabled_reason = Some(format!("disabled by {}", actor.id));
            }
            after.enabled = enabled;
        }
        if after == before {
            return Ok(before);
        }
        after.updated_at = self.now();
        let audit = NewAuditEvent::new(ws, actor, "webhook.update", id.as_str(), after.updated_at)
            .with_diff(&before.audit_view(), &after.audit_view());
        self.store().update_webhook(&after, &audit).await?;
        if after.enabled && !before.enabled {
            self.store().resume_deliveries(ws, id, after.updated_at).await?;
        }
        Ok(after)
    }

    /// Replaces an endpoint's signing secret; the new one is in the answer, once. With an
    /// `overlap_seconds` (at most [`MAX_SECRET_OVERLAP_SECONDS`]), the replaced secret keeps
    /// signing beside it until then — every message carries both signatures, so a receiver can
    /// move to the new secret without losing one; without, it stops at once (and an overlap
    /// still running from an earlier rotation ends).
    pub async fn rotate_webhook_secret(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &WebhookId,
        overlap_seconds: u64,
    ) -> Result<CreatedWebhook> {
        if overlap_seconds > MAX_SECRET_OVERLAP_SECONDS {
            return Err(Error::invalid(
                "invalid_overlap",
                format!(
                    "overlap_seconds is at most {MAX_SECRET_OVERLAP_SECONDS} (7 days); receivers that need longer should take the new secret sooner"
                ),
            ));
        }
        let mut endpoint = self.webhook(ws, id).await?;
        let (sealed, secret) = self.new_webhook_secret(id)?;
        let now = self.now();
        let replaced = std::mem::replace(&mut endpoint.sealed_secret, sealed);
        (endpoint.previous_sealed_secret, endpoint.previous_secret_until) = if overlap_seconds > 0 {
            (Some(replaced), Some(now.plus_seconds(overlap_seconds as i64)))
        } else {
            (None, None)
        };
        endpoint.updated_at = now;
        let mut audit = NewAuditEvent::new(ws, actor, "webhook.rotate_secret", id.as_str(), endpoint.updated_at);
        audit.after = Some(serde_json::json!({
            "previous_secret_until": endpoint.previous_secret_until.map(keygate_core::Timestamp::to_rfc3339),
        }));
        self.store().update_webhook(&endpoint, &audit).await?;
        Ok(CreatedWebhook { endpoint, secret })
    }

    pub async fn delete_webhook(&self, ws: &WorkspaceId, actor: &Actor, id: &WebhookId) -> Result<()> {
        let endpoint = self.webhook(ws, id).await?;
        let audit =
            NewAuditEvent::new(ws, actor, "webhook.delete", id.as_str(), self.now()).with_before(endpoint.audit_view());
        if !self.store().delete_webhook(ws, id, &audit).await? {
            return Err(Error::not_found("webhook endpoint"));
        }
        Ok(())
    }

    /// Sends the endpoint a `webhook.test` event (whatever it subscribes to); the answer is the
    /// delivery, whose attempts show how it went.
    pub async fn test_webhook(&self, ws: &WorkspaceId, actor: &Actor, id: &WebhookId) -> Result<i64> {
        let endpoint = self.webhook(ws, id).await?;
        let now = self.now();
        let message_id = format!("msg_test_{}", self.random_text(16)?);
        let data = serde_json::json!({
            "endpoint_id": endpoint.id,
            "workspace_id": ws,
            "requested_by": actor.id,
            "message": "A test event from keygate: this endpoint receives and verifies signed events.",
        });
        self.store()
            .enqueue_delivery(&NewDelivery {
                workspace_id: ws.clone(),
                endpoint_id: endpoint.id,
                message_id,
                event_type: "webhook.test".into(),
                payload: keygate_core::notify::payload("webhook.test", now, data),
                at: now,
            })
            .await
    }

    pub async fn list_deliveries(
        &self,
        ws: &WorkspaceId,
        endpoint: Option<&WebhookId>,
        page: &PageRequest,
    ) -> Result<Page<Delivery>> {
        if let Some(id) = endpoint {
            self.webhook(ws, id).await?;
        }
        self.store().list_deliveries(ws, endpoint, page).await
    }

    pub async fn delivery(&self, ws: &WorkspaceId, id: i64) -> Result<(Delivery, Vec<DeliveryAttempt>)> {
        self.store().delivery(ws, id).await?.ok_or_else(|| Error::not_found("webhook delivery"))
    }

    /// Sends a delivery again (same `webhook-id`, so receivers that saw it can tell), with its
    /// retries counted afresh.
    pub async fn redeliver(&self, ws: &WorkspaceId, id: i64) -> Result<Delivery> {
        if !self.store().redeliver(ws, id, self.now()).await? {
            return Err(Error::not_found("webhook delivery"));
        }
        Ok(self.delivery(ws, id).await?.0)
    }

    /// Deletes deliveries older than the retention that are no longer pending. Returns how many.
    pub async fn prune_deliveries(&self) -> Result<u64> {
        let before = self.now().as_millis().saturating_sub(self.notify_settings().retention_ms);
        self.store().prune_deliveries(Timestamp::from_millis(before)).await
    }

    /// When the next delivery is due, if any (for the worker's sleep).
    pub async fn next_delivery_due(&self) -> Result<Option<Timestamp>> {
        self.store().next_delivery_due().await
    }

    /// One pass of the delivery worker: claims the deliveries due (leased to `node`) and sends
    /// them — each endpoint's in order, different endpoints at once — recording every attempt,
    /// scheduling the retry or giving up, and disabling endpoints that failed every attempt for
    /// `disable_after`.
    pub async fn deliver_due(
        self: &Arc<Self>,
        transport: Arc<dyn WebhookTransport>,
        node: &str,
    ) -> Result<DeliveryPass> {
        let claimed = self.store().claim_deliveries(self.now(), LEASE_MS, node, CLAIM_BATCH).await?;
        let mut pass = DeliveryPass { full: claimed.len() >= CLAIM_BATCH as usize, ..DeliveryPass::default() };
        let mut by_endpoint: Vec<(WebhookId, Vec<Delivery>)> = Vec::new();
        for d in claimed {
            match by_endpoint.iter_mut().find(|(id, _)| *id == d.endpoint_id) {
                Some((_, list)) => list.push(d),
                None => by_endpoint.push((d.endpoint_id.clone(), vec![d])),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, list) in by_endpoint {
            let me = self.clone();
            let transport = transport.clone();
            tasks.spawn(async move { me.deliver_to_endpoint(&*transport, list).await });
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(p)) => {
                    pass.attempted += p.attempted;
                    pass.delivered += p.delivered;
                    pass.disabled += p.disabled;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "a webhook delivery could not be recorded"),
                Err(e) => tracing::error!(error = %e, "a webhook delivery task failed"),
            }
        }
        Ok(pass)
    }

    /// Sends `list` (deliveries to one endpoint) in order.
    async fn deliver_to_endpoint(&self, transport: &dyn WebhookTransport, list: Vec<Delivery>) -> Result<DeliveryPass> {
        let mut pass = DeliveryPass::default();
        let Some(first) = list.first() else { return Ok(pass) };
        let Some(endpoint) = self.store().webhook(&first.workspace_id, &first.endpoint_id).await? else {
            return Ok(pass);
        };
        let sealer = self.webhook_sealer()?;
        for d in list {
            pass.attempted += 1;
            let outcome = self.attempt(&sealer, transport, &endpoint, &d).await?;
            self.store().record_attempt(d.id, &outcome).await?;
            if outcome.state == DeliveryState::Delivered {
                pass.delivered += 1;
            } else if self.disable_if_failing(&endpoint, &outcome.attempt).await? {
                pass.disabled += 1;
                break;
            }
        }
        Ok(pass)
    }

    async fn attempt(
        &self,
        sealer: &Sealer,
        transport: &dyn WebhookTransport,
        endpoint: &WebhookEndpoint,
        d: &Delivery,
    ) -> Result<AttemptOutcome> {
        let key = sealer.open(endpoint.id.as_str(), &endpoint.sealed_secret, "a webhook signing key")?;
        let started = self.now();
        let ts = started.as_millis().div_euclid(1000);
        // Signed with the current key, and during a rotation's overlap with the replaced one too
        // (Standard Webhooks: signatures separated by spaces; a receiver accepts any it can check).
        let mut signature = sign(&key, &d.message_id, ts, d.payload.as_bytes());
        if let (Some(old), Some(until)) = (&endpoint.previous_sealed_secret, endpoint.previous_secret_until)
            && started < until
        {
            let old = sealer.open(endpoint.id.as_str(), old, "a webhook signing key")?;
            signature.push(' ');
            signature.push_str(&sign(&old, &d.message_id, ts, d.payload.as_bytes()));
        }
        let headers = [
            ("webhook-id", d.message_id.clone()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signature),
            ("content-type", "application/json".to_owned()),
            ("user-agent", concat!("keygate-webhooks/", env!("CARGO_PKG_VERSION")).to_owned()),
        ];
        let clock = std::time::Instant::now();
        let result = transport.post(&endpoint.url, &headers, &d.payload).await;
        let duration_ms = u32::try_from(clock.elapsed().as_millis()).unwrap_or(u32::MAX);
        let (status, error) = match &result {
            SendResult::Answered(s) if (200..300).contains(s) => (Some(*s), None),
            SendResult::Answered(s) => (Some(*s), Some(format!("the endpoint answered {s}"))),
            SendResult::Failed(why) => (None, Some(why.clone())),
        };
        let attempt = DeliveryAttempt { at: started, status, error, duration_ms };
        if attempt.error.is_none() {
            return Ok(AttemptOutcome { attempt, state: DeliveryState::Delivered, next_at: None });
        }
        match retry_after_secs(d.attempts.saturating_add(1)) {
            Some(wait) => {
                // Up to a tenth more, so that a receiver that was down is not hit by every retry at once.
                let mut jitter = [0u8; 2];
                self.random(&mut jitter)?;
                let extra = wait * 100 * i64::from(u16::from_le_bytes(jitter)) / 65_535;
                let next = Timestamp::from_millis(started.as_millis() + wait * 1000 + extra);
                Ok(AttemptOutcome { attempt, state: DeliveryState::Pending, next_at: Some(next) })
            }
            None => Ok(AttemptOutcome { attempt, state: DeliveryState::Failed, next_at: None }),
        }
    }

    /// Disables `endpoint` if every attempt to it failed for `disable_after` (its `failing_since`
    /// as now stored), with a `webhook.disable` audit event: the `webhook.disabled` notice goes to
    /// the workspace's other endpoints and to its owners.
    async fn disable_if_failing(&self, endpoint: &WebhookEndpoint, last: &DeliveryAttempt) -> Result<bool> {
        let Some(current) = self.store().webhook(&endpoint.workspace_id, &endpoint.id).await? else { return Ok(false) };
        let settings = self.notify_settings();
        let Some(since) = current.failing_since else { return Ok(false) };
        if !current.enabled || last.at.as_millis() - since.as_millis() < settings.disable_after_ms {
            return Ok(false);
        }
        let mut after = current.clone();
        after.enabled = false;
        after.disabled_reason = Some(format!(
            "every attempt since {since} failed (last: {}); fix the endpoint, then enable it again",
            last.error.as_deref().unwrap_or("no answer")
        ));
        after.updated_at = last.at;
        let actor = Actor { id: "webhook-delivery".into(), source: None, owner: true };
        let audit =
            NewAuditEvent::new(&endpoint.workspace_id, &actor, "webhook.disable", endpoint.id.as_str(), last.at)
                .with_diff(&current.audit_view(), &after.audit_view());
        self.store().update_webhook(&after, &audit).await?;
        tracing::warn!(endpoint = %endpoint.id, since = %since, "a webhook endpoint that failed every attempt was disabled");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use std::collections::VecDeque;

    use base64::Engine as _;
    use keygate_core::ManualClock;

    use super::*;
    use crate::service::NewToken;

    /// A request as sent: URL, headers, body.
    type Sent = (String, Vec<(String, String)>, String);

    /// Records every request and answers from a script (then 204).
    #[derive(Default)]
    struct Script {
        sent: parking_lot::Mutex<Vec<Sent>>,
        answers: parking_lot::Mutex<VecDeque<SendResult>>,
    }

    #[async_trait]
    impl WebhookTransport for Script {
        async fn post(&self, url: &str, headers: &[(&'static str, String)], body: &str) -> SendResult {
            let headers = headers.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
            self.sent.lock().push((url.to_owned(), headers, body.to_owned()));
            self.answers.lock().pop_front().unwrap_or(SendResult::Answered(204))
        }
    }

    async fn setup() -> (Arc<Admin>, ManualClock, tempfile::TempDir, WorkspaceId) {
        crate::testing::admin().await
    }

    /// An endpoint for every event at `url`, made by the CLI actor.
    async fn endpoint(admin: &Admin, ws: &WorkspaceId, url: &str) -> CreatedWebhook {
        let new = NewWebhook { url: url.into(), ..Default::default() };
        admin.create_webhook(ws, &Actor::cli(), new).await.unwrap()
    }

    fn header<'a>(sent: &'a Sent, name: &str) -> &'a str {
        sent.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap()
    }

    #[tokio::test]
    async fn a_rotation_with_an_overlap_signs_with_both_secrets_until_it_ends() {
        let (admin, clock, _dir, ws) = setup().await;
        let actor = Actor::cli();
        let hook = endpoint(&admin, &ws, "https://hooks.example.com/in").await;
        let key_of = |secret: &str| {
            base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap()
        };
        let id = &hook.endpoint.id;
        let refused = admin.rotate_webhook_secret(&ws, &actor, id, MAX_SECRET_OVERLAP_SECONDS + 1).await.unwrap_err();
        assert_eq!(refused.code, "invalid_overlap");
        let rotated = admin.rotate_webhook_secret(&ws, &actor, id, 3600).await.unwrap();
        assert_eq!(rotated.endpoint.previous_secret_until, Some(admin.now().plus_seconds(3600)));
        let (old, new) = (key_of(&hook.secret), key_of(&rotated.secret));
        let script = Arc::new(Script::default());
        let signed = async |script: &Arc<Script>| {
            admin.test_webhook(&ws, &actor, id).await.unwrap();
            admin.deliver_due(script.clone(), "n1").await.unwrap();
            let sent = script.sent.lock().last().cloned().unwrap();
            let (msg, ts) =
                (header(&sent, "webhook-id").to_owned(), header(&sent, "webhook-timestamp").parse().unwrap());
            let sig = |key: &[u8]| keygate_core::notify::sign(key, &msg, ts, sent.2.as_bytes());
            (header(&sent, "webhook-signature").to_owned(), sig(&new), sig(&old))
        };
        // During the overlap: both signatures, the new one first.
        let (header_value, by_new, by_old) = signed(&script).await;
        assert_eq!(header_value, format!("{by_new} {by_old}"));
        // At its end, the new one only.
        clock.advance_seconds(3600);
        let (header_value, by_new, _) = signed(&script).await;
        assert_eq!(header_value, by_new);
        // A rotation without an overlap ends one still running.
        let again = admin.rotate_webhook_secret(&ws, &actor, id, 600).await.unwrap();
        assert!(again.endpoint.previous_sealed_secret.is_some());
        let last = admin.rotate_webhook_secret(&ws, &actor, id, 0).await.unwrap();
        assert_eq!((last.endpoint.previous_sealed_secret, last.endpoint.previous_secret_until), (None, None));
        let trail = admin
            .store()
            .list_audit(
                &ws,
                &keygate_core::model::AuditFilter::default(),
                &keygate_core::model::PageRequest { limit: 10, cursor: None },
            )
            .await
            .unwrap();
        let rotations: Vec<_> = trail.items.iter().filter(|e| e.action == "webhook.rotate_secret").collect();
        assert_eq!(rotations.len(), 3);
        assert!(rotations.iter().all(|e| !e.after.as_ref().unwrap().to_string().contains("whsec_")), "no secret");
    }

    #[tokio::test]
    async fn events_are_signed_retried_on_schedule_and_the_endpoint_disabled_after_a_day_of_failures() {
        let (admin, clock, _dir, ws) = setup().await;
        let actor = Actor::cli();
        let hook = endpoint(&admin, &ws, "https://hooks.example.com/in").await;
        let other = admin
            .create_webhook(
                &ws,
                &actor,
                NewWebhook {
                    url: "https://ops.example.com/in".into(),
                    event_types: vec!["webhook.disabled".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let key =
            base64::engine::general_purpose::STANDARD.decode(hook.secret.strip_prefix("whsec_").unwrap()).unwrap();
        let script = Arc::new(Script::default());

        // A revocation is sent, signed over id.timestamp.body with the secret shown at creation.
        let (token, _) =
            admin.create_token(&ws, &actor, NewToken { name: "t".into(), ..Default::default() }).await.unwrap();
        admin.revoke_token(&ws, &actor, &token.id, Some("leaked".into())).await.unwrap();
        let pass = admin.deliver_due(script.clone(), "n1").await.unwrap();
        assert_eq!((pass.attempted, pass.delivered), (2, 2), "token.created and token.revoked");
        let sent = script.sent.lock().clone();
        let revoked = &sent[1];
        let body: serde_json::Value = serde_json::from_str(&revoked.2).unwrap();
        assert_eq!(body["type"], "token.revoked");
        assert_eq!(body["data"]["target"], token.id.as_str());
        assert_eq!(body["data"]["after"]["revoke_reason"], "leaked");
        let ts: i64 = header(revoked, "webhook-timestamp").parse().unwrap();
        assert_eq!(ts, admin.now().as_millis() / 1000);
        let id = header(revoked, "webhook-id");
        assert_eq!(
            header(revoked, "webhook-signature"),
            keygate_core::notify::sign(&key, id, ts, revoked.2.as_bytes())
        );
        assert!(!revoked.2.contains(&hook.secret), "no secret in a message");
        assert!(admin.deliver_due(script.clone(), "n1").await.unwrap().attempted == 0, "sent once");

        // Failures: retried after 5 s, 5 min, … (up to a tenth later), never before.
        script.answers.lock().extend([SendResult::Answered(500), SendResult::Failed("could not connect".into())]);
        admin
            .suspend_token(
                &ws,
                &actor,
                &admin
                    .create_token(&ws, &actor, NewToken { name: "u".into(), ..Default::default() })
                    .await
                    .unwrap()
                    .0
                    .id,
            )
            .await
            .unwrap();
        script.answers.lock().push_front(SendResult::Answered(204)); // token.created of "u"
        let p = admin.deliver_due(script.clone(), "n1").await.unwrap();
        assert_eq!((p.attempted, p.delivered), (2, 1));
        let list = admin.list_deliveries(&ws, Some(&hook.endpoint.id), &PageRequest::default()).await.unwrap().items;
        let suspended = list.iter().find(|d| d.event_type == "token.suspended").unwrap();
        assert_eq!(
            (suspended.state, suspended.attempts, suspended.last_status),
            (DeliveryState::Pending, 1, Some(500))
        );
        let wait = suspended.next_at.unwrap().as_millis() - admin.now().as_millis();
        assert!((5_000..=5_500).contains(&wait), "{wait}");
        clock.advance_seconds(4);
        assert_eq!(admin.deliver_due(script.clone(), "n1").await.unwrap().attempted, 0, "not before its time");
        clock.advance_seconds(2);
        assert_eq!(admin.deliver_due(script.clone(), "n1").await.unwrap().attempted, 1);
        let (d, attempts) = admin.delivery(&ws, suspended.id).await.unwrap();
        assert_eq!(attempts.iter().map(|a| a.status).collect::<Vec<_>>(), [Some(500), None]);
        assert_eq!(attempts[1].error.as_deref(), Some("could not connect"));
        let wait = d.next_at.unwrap().as_millis() - admin.now().as_millis();
        assert!((300_000..=330_000).contains(&wait), "{wait}");

        // Every attempt fails for a day: the endpoint is disabled, with a notice to the others.
        for _ in 0..6 {
            script.answers.lock().push_back(SendResult::Answered(503));
            clock.set(admin.delivery(&ws, suspended.id).await.unwrap().0.next_at.unwrap());
            admin.deliver_due(script.clone(), "n1").await.unwrap();
        }
        let w = admin.webhook(&ws, &hook.endpoint.id).await.unwrap();
        assert!(!w.enabled, "{w:?}");
        assert!(w.disabled_reason.as_deref().unwrap().contains("503"), "{:?}", w.disabled_reason);
        let audit = admin.store().list_audit(&ws, &Default::default(), &PageRequest::default()).await.unwrap().items;
        assert!(audit.iter().any(|e| e.action == "webhook.disable" && e.actor == "webhook-delivery"));
        script.sent.lock().clear();
        admin.deliver_due(script.clone(), "n1").await.unwrap();
        let sent = script.sent.lock().clone();
        assert_eq!(sent.len(), 1, "only the notice, to the other endpoint: {sent:?}");
        assert_eq!(sent[0].0, "https://ops.example.com/in");
        assert!(sent[0].2.contains("\"webhook.disabled\""));
        assert_eq!(other.endpoint.event_types, ["webhook.disabled"]);

        // Its last retry was the one that disabled it: the delivery failed for good. Enabled
        // again, the endpoint gets new events; a redelivery sends the failed one again.
        let (d, attempts) = admin.delivery(&ws, suspended.id).await.unwrap();
        assert_eq!((d.state, attempts.len()), (DeliveryState::Failed, 8));
        admin
            .update_webhook(&ws, &actor, &hook.endpoint.id, WebhookUpdate { enabled: Some(true), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(admin.deliver_due(script.clone(), "n1").await.unwrap().attempted, 0);
        let again = admin.redeliver(&ws, suspended.id).await.unwrap();
        assert_eq!((again.state, again.attempts), (DeliveryState::Pending, 0));
        script.sent.lock().clear();
        assert_eq!(admin.deliver_due(script.clone(), "n1").await.unwrap().delivered, 1);
        assert_eq!(header(&script.sent.lock()[0], "webhook-id"), again.message_id, "the same message id");
    }

    #[tokio::test]
    async fn urls_event_types_and_tests() {
        let (admin, _clock, _dir, ws) = setup().await;
        let actor = Actor::cli();
        let create = |url: &str| NewWebhook { url: url.into(), ..Default::default() };
        for (url, code) in [
            ("ftp://example.com/x", "invalid_webhook_url"),
            ("https://user:pw@example.com/x", "invalid_webhook_url"),
            ("https://example.com/x#frag", "invalid_webhook_url"),
            ("/relative", "invalid_webhook_url"),
            ("http://127.0.0.1:9000/x", "webhook_url_refused"),
            ("http://[::1]/x", "webhook_url_refused"),
            ("http://169.254.169.254/latest/meta-data", "webhook_url_refused"),
            ("http://10.0.0.8/x", "webhook_url_refused"),
            ("http://localhost:8080/x", "webhook_url_refused"),
            ("http://api.localhost/x", "webhook_url_refused"),
        ] {
            let e = admin.create_webhook(&ws, &actor, create(url)).await.unwrap_err();
            assert_eq!(e.code, code, "{url}: {}", e.message);
        }
        let e = admin
            .create_webhook(
                &ws,
                &actor,
                NewWebhook { event_types: vec!["token.nope".into()], ..create("https://a.example/") },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_event_type");
        let star = admin
            .create_webhook(
                &ws,
                &actor,
                NewWebhook { event_types: vec!["*".into(), "token.revoked".into()], ..create("https://a.example/") },
            )
            .await
            .unwrap();
        assert!(star.endpoint.event_types.is_empty(), "* is every event");
        assert!(star.secret.starts_with("whsec_") && star.secret.len() > 40);

        // Allowed on a private network when configured so.
        admin.set_notify_settings(NotifySettings { allow_private: true, ..Default::default() });
        let local = admin.create_webhook(&ws, &actor, create("http://127.0.0.1:9000/x")).await.unwrap();
        let script = Arc::new(Script::default());
        let id = admin.test_webhook(&ws, &actor, &local.endpoint.id).await.unwrap();
        admin.deliver_due(script.clone(), "n1").await.unwrap();
        let (d, attempts) = admin.delivery(&ws, id).await.unwrap();
        assert_eq!((d.state, d.event_type.as_str(), attempts.len()), (DeliveryState::Delivered, "webhook.test", 1));
        assert!(
            script.sent.lock().iter().all(|s| s.0 == "http://127.0.0.1:9000/x"),
            "a test goes to its endpoint only"
        );

        // The secret can be replaced; the old one no longer signs.
        let rotated = admin.rotate_webhook_secret(&ws, &actor, &local.endpoint.id, 0).await.unwrap();
        assert_ne!(rotated.secret, local.secret);
        admin.delete_webhook(&ws, &actor, &local.endpoint.id).await.unwrap();
        assert_eq!(admin.webhook(&ws, &local.endpoint.id).await.unwrap_err().code, "not_found");
    }
}
