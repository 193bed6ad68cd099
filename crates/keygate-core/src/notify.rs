//! Notifications (issue 15): the events keygate tells people about, webhook endpoints that receive
//! them signed per the Standard Webhooks specification, and the durable outbox they are
//! delivered from.
//!
//! Every event comes from the audit trail: the transaction that writes an audit event whose
//! action has an [`EventType`] also writes one delivery per webhook endpoint of the workspace
//! that subscribes to it (the outbox). So an event is never lost between "it happened" and "it
//! will be sent", and a rolled-back change sends nothing. Deliveries are claimed with a lease by
//! whichever node gets there first, so each is sent once across nodes (at least once if a node
//! dies mid-send; receivers deduplicate on `webhook-id`, as the specification asks).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{WebhookId, WorkspaceId};

/// An event type: its name (`token.revoked`), the audit actions it is raised by, and what it
/// means, for the API's catalog and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventType {
    pub name: &'static str,
    #[serde(skip)]
    pub actions: &'static [&'static str],
    pub description: &'static str,
    /// Who is emailed about it unless they chose otherwise.
    #[serde(skip)]
    pub email: Audience,
}

/// The people an event is emailed to by default (each can opt out, and any member can opt in,
/// in their notification settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Audience {
    /// The owner of the app whose token it is about.
    pub app_owner: bool,
    /// The workspace's owners.
    pub workspace_owners: bool,
}

const NOBODY: Audience = Audience { app_owner: false, workspace_owners: false };
const APP_OWNER: Audience = Audience { app_owner: true, workspace_owners: false };
const OWNERS: Audience = Audience { app_owner: false, workspace_owners: true };
const BOTH: Audience = Audience { app_owner: true, workspace_owners: true };

/// Every event keygate sends, in the order the dashboard lists them.
pub const EVENT_TYPES: &[EventType] = &[
    EventType {
        name: "token.exposed",
        actions: &["token.exposed"],
        description: "A token was found where it should not be (a URL, a public repository, a scan).",
        email: BOTH,
    },
    EventType {
        name: "token.expiring",
        actions: &["token.expiring"],
        description: "A token expires soon (notifications.expiring_days before).",
        email: APP_OWNER,
    },
    EventType {
        name: "token.expired",
        actions: &["token.expired"],
        description: "A token reached its expiry.",
        email: APP_OWNER,
    },
    EventType { name: "token.created", actions: &["token.create"], description: "A token was issued.", email: NOBODY },
    EventType {
        name: "token.revoked",
        actions: &["token.revoke"],
        description: "A token was revoked.",
        email: APP_OWNER,
    },
    EventType {
        name: "token.suspended",
        actions: &["token.suspend"],
        description: "A token was suspended (by a person, an exposure, rotation or anomaly policy).",
        email: APP_OWNER,
    },
    EventType {
        name: "token.resumed",
        actions: &["token.resume"],
        description: "A suspended token was resumed.",
        email: NOBODY,
    },
    EventType {
        name: "oauth_client.suspended",
        actions: &["oauth_client.suspend"],
        description: "An OAuth client was suspended (by a person or the anomaly policy): it is issued no token, and its access tokens were revoked.",
        email: APP_OWNER,
    },
    EventType {
        name: "oauth_client.resumed",
        actions: &["oauth_client.resume"],
        description: "A suspended OAuth client was resumed.",
        email: NOBODY,
    },
    EventType {
        name: "token.rotated",
        actions: &["token.rotate"],
        description: "A token was replaced by a new secret (the old one works until its grace ends).",
        email: APP_OWNER,
    },
    EventType {
        name: "token.rotation_due",
        actions: &["token.rotation_due", "token.rotation_overdue"],
        description: "A token nears or passed the workspace's maximum age (rotation policy).",
        email: APP_OWNER,
    },
    EventType {
        name: "quota.threshold",
        actions: &["quota.threshold"],
        description: "A token used 80% or 100% of its quota for the period.",
        email: APP_OWNER,
    },
    EventType {
        name: "budget.threshold",
        actions: &["budget.threshold"],
        description: "A virtual key, an app or the workspace spent 80% or 100% of an AI route's budget for the period.",
        email: BOTH,
    },
    EventType {
        name: "anomaly.detected",
        actions: &["anomaly.detected"],
        description: "A token's use departs from its baseline (rate, networks, routes, refusals).",
        email: BOTH,
    },
    EventType {
        name: "plan.requested",
        actions: &["plan.requested"],
        description: "A developer asked for a plan.",
        email: OWNERS,
    },
    EventType {
        name: "api.published",
        actions: &["api.publish"],
        description: "An API or one of its versions was published (listed in the portal).",
        email: NOBODY,
    },
    EventType {
        name: "api.deprecated",
        actions: &["api.deprecate"],
        description: "An API or one of its versions was deprecated: it still answers, with Deprecation, Sunset and Link headers.",
        email: BOTH,
    },
    EventType {
        name: "api.retired",
        actions: &["api.retire"],
        description: "An API or one of its versions was retired: its routes answer 410 api_retired.",
        email: BOTH,
    },
    EventType {
        name: "api.publish_requested",
        actions: &["api.publish_requested"],
        description: "Someone asked to publish an API; an owner approves or rejects it.",
        email: OWNERS,
    },
    EventType {
        name: "subscription.requested",
        actions: &["subscription.requested"],
        description: "An app asked to subscribe to an API that needs approval; an owner or admin approves or rejects it.",
        email: OWNERS,
    },
    EventType {
        name: "subscription.approved",
        actions: &["subscription.approve"],
        description: "An app's subscription to an API was approved: its tokens may call the API.",
        email: APP_OWNER,
    },
    EventType {
        name: "subscription.rejected",
        actions: &["subscription.reject"],
        description: "An app's request to subscribe to an API was rejected.",
        email: APP_OWNER,
    },
    EventType {
        name: "subscription.cancelled",
        actions: &["subscription.cancel"],
        description: "An app's subscription to an API was cancelled: its tokens may no longer call the API.",
        email: APP_OWNER,
    },
    EventType {
        name: "member.invited",
        actions: &["member.invited"],
        description: "Someone was invited to the workspace.",
        email: OWNERS,
    },
    EventType {
        name: "signing_key.rotated",
        actions: &["oauth.signing_key.retire"],
        description: "The OAuth signing key was rotated (the old key stops signing).",
        email: OWNERS,
    },
    EventType {
        name: "billing.period_closed",
        actions: &["billing.period_closed"],
        description: "A calendar month ended for an app on a priced plan: its statement is final.",
        email: BOTH,
    },
    EventType {
        name: "webhook.disabled",
        actions: &["webhook.disable"],
        description: "A webhook endpoint was disabled after failing for too long.",
        email: OWNERS,
    },
];

/// The event an audit action raises, if any.
pub fn event_for_action(action: &str) -> Option<&'static EventType> {
    EVENT_TYPES.iter().find(|t| t.actions.contains(&action))
}

/// The event type named `name`.
pub fn event_type(name: &str) -> Option<&'static EventType> {
    EVENT_TYPES.iter().find(|t| t.name == name)
}

/// Whether `ip` is an address on the public internet: not loopback, private (RFC 1918, unique
/// local), link-local (where cloud metadata services answer), carrier-grade NAT, unspecified,
/// multicast, broadcast, documentation, benchmarking or reserved; IPv4 addresses carried in IPv6
/// (mapped, the well-known NAT64 prefix, 6to4) are judged as the IPv4 address they carry; any
/// other IPv6 address is public only in global unicast (`2000::/3`) outside its special blocks,
/// so the local-use NAT64 prefix `64:ff9b:1::/48`, whose operator chooses where the IPv4 address
/// sits, is never public. Webhooks and other outbound
/// requests keygate makes on a user's behalf go only to public addresses unless configured
/// otherwise, so that a URL cannot turn keygate against the network it runs in (SSRF).
pub fn is_public_ip(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    fn v4(ip: Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        !(a == 0                                   // "this network"
            || a == 10                             // private
            || a == 127                            // loopback
            || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
            || (a == 169 && b == 254)              // link-local, cloud metadata
            || (a == 172 && (16..32).contains(&b)) // private
            || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
            || (a == 192 && b == 0 && c == 2)      // documentation
            || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
            || (a == 192 && b == 168)              // private
            || (a == 198 && (18..20).contains(&b)) // benchmarking
            || (a == 198 && b == 51 && c == 100)   // documentation
            || (a == 203 && b == 0 && c == 113)    // documentation
            || a >= 224) // multicast, reserved, broadcast
    }
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return v4(mapped);
            }
            let s = ip.segments();
            let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return v4(embedded(s[6], s[7])); // NAT64
            }
            if s[0] == 0x2002 {
                return v4(embedded(s[1], s[2])); // 6to4
            }
            // Only global unicast (2000::/3) is public: everything else is loopback, unspecified,
            // IPv4-compatible, unique local, link-local, multicast, the rest of the NAT64 prefixes
            // (the local-use 64:ff9b:1::/48 of RFC 8215 among them, where the operator chooses
            // where the IPv4 address sits), SRv6 identifiers or unassigned. Within it, not public:
            // in 2001::/16, the IETF protocol assignments (2001::/23: Teredo, benchmarking, ORCHID)
            // and documentation (2001:db8::/32); and documentation's 3fff::/20 (RFC 9637).
            let special = (s[0] == 0x2001 && (s[1] < 0x0200 || s[1] == 0x0db8)) || (s[0] == 0x3fff && s[1] < 0x1000);
            s[0] & 0xe000 == 0x2000 && !special
        }
    }
}

/// A webhook endpoint's subscription: every event, or the named ones.
pub fn subscribes(event_types: &[String], name: &str) -> bool {
    event_types.is_empty() || event_types.iter().any(|t| t == "*" || t == name)
}

/// The waits before each retry after a failed attempt (the specification's suggestion, as the
/// reference implementation uses it): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h. After the last,
/// the delivery has failed: about 28 hours after the event.
pub const RETRY_SCHEDULE_SECS: [i64; 7] = [5, 300, 1_800, 7_200, 18_000, 36_000, 36_000];

/// The wait before the next attempt after `attempts` failed ones (from 1), or `None` when the
/// delivery has failed for good.
pub fn retry_after_secs(attempts: u32) -> Option<i64> {
    let i = usize::try_from(attempts).ok()?.checked_sub(1)?;
    RETRY_SCHEDULE_SECS.get(i).copied()
}

/// The prefix of a webhook signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A signing secret as shown to the user: `whsec_` and the base64 of the key bytes.
pub fn format_secret(key: &[u8]) -> String {
    format!("{SECRET_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// The `webhook-signature` value for a message: `v1,` and the base64 of HMAC-SHA256 under
/// `key` over `<id>.<timestamp>.<body>` (Standard Webhooks, symmetric signatures).
pub fn sign(key: &[u8], msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        // HMAC accepts keys of any length; this cannot happen.
        return String::new();
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A URL that receives a workspace's events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookEndpoint {
    pub id: WebhookId,
    pub workspace_id: WorkspaceId,
    pub url: String,
    pub description: Option<String>,
    /// The event types sent to it; empty: every event.
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why it was disabled (by keygate after persistent failure, or by a person).
    pub disabled_reason: Option<String>,
    /// The signing key, sealed under the pepper (never shown again after creation).
    #[serde(skip)]
    pub sealed_secret: Vec<u8>,
    /// The key a rotation replaced, sealed the same way, still signing beside the new one until
    /// `previous_secret_until` (a rotation with an overlap); `None`: no overlap.
    #[serde(skip)]
    pub previous_sealed_secret: Option<Vec<u8>>,
    pub previous_secret_until: Option<Timestamp>,
    /// Since when every attempt to it has failed; `None` after a success.
    pub failing_since: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl WebhookEndpoint {
    /// The fields an audit event records (never the secret).
    pub fn audit_view(&self) -> serde_json::Value {
        serde_json::json!({
            "url": self.url,
            "description": self.description,
            "event_types": self.event_types,
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
        })
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its next attempt (`next_at`).
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Every retry failed; only a redelivery sends it again.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed].into_iter().find(|v| v.as_str() == s)
    }
}

/// One message to one endpoint, and how its attempts went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    pub id: i64,
    #[serde(skip)]
    pub workspace_id: WorkspaceId,
    pub endpoint_id: WebhookId,
    /// The `webhook-id` header: the same on every attempt and redelivery.
    pub message_id: String,
    pub event_type: String,
    /// The body sent, exactly (JSON).
    #[serde(skip)]
    pub payload: String,
    pub state: DeliveryState,
    /// Attempts since it was created or last redelivered.
    pub attempts: u32,
    pub next_at: Option<Timestamp>,
    pub last_attempt_at: Option<Timestamp>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub delivered_at: Option<Timestamp>,
}

/// One HTTP attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeliveryAttempt {
    pub at: Timestamp,
    /// The answer's status; `None` when no answer came (refused, timed out, blocked).
    pub status: Option<u16>,
    /// What went wrong, when it did (never the response body).
    pub error: Option<String>,
    pub duration_ms: u32,
}

/// A message to put in the outbox for one endpoint (a test event, from the API).
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub workspace_id: WorkspaceId,
    pub endpoint_id: WebhookId,
    pub message_id: String,
    pub event_type: String,
    pub payload: String,
    pub at: Timestamp,
}

/// What an attempt did to its delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptOutcome {
    pub attempt: DeliveryAttempt,
    /// The delivery's state after it.
    pub state: DeliveryState,
    /// When to try again (state pending).
    pub next_at: Option<Timestamp>,
}

/// Webhook endpoints and the outbox of their deliveries.
#[async_trait::async_trait]
pub trait NotifyStore: Send + Sync {
    /// Adds an endpoint, with its audit event.
    async fn insert_webhook(&self, endpoint: &WebhookEndpoint, audit: &crate::model::NewAuditEvent) -> Result<()>;
    /// Replaces an endpoint's fields (url, description, event types, enabled, disabled reason,
    /// secret), with its audit event; `not_found` if it is gone.
    async fn update_webhook(&self, endpoint: &WebhookEndpoint, audit: &crate::model::NewAuditEvent) -> Result<()>;
    /// Deletes an endpoint and its deliveries; `false` if there was none.
    async fn delete_webhook(
        &self,
        ws: &WorkspaceId,
        id: &WebhookId,
        audit: &crate::model::NewAuditEvent,
    ) -> Result<bool>;
    async fn webhook(&self, ws: &WorkspaceId, id: &WebhookId) -> Result<Option<WebhookEndpoint>>;
    /// The workspace's endpoints, oldest first.
    async fn list_webhooks(&self, ws: &WorkspaceId) -> Result<Vec<WebhookEndpoint>>;
    /// Puts one message in the outbox (a test event).
    async fn enqueue_delivery(&self, delivery: &NewDelivery) -> Result<i64>;
    /// Takes up to `limit` deliveries due at `now` of enabled endpoints, oldest due first, each
    /// leased to `owner` until `now + lease_ms` so that no other node sends it meanwhile.
    async fn claim_deliveries(&self, now: Timestamp, lease_ms: i64, owner: &str, limit: u32) -> Result<Vec<Delivery>>;
    /// Records an attempt of a claimed delivery and what it leads to; updates the endpoint's
    /// `failing_since` (cleared by a success, set by the first failure after one).
    async fn record_attempt(&self, delivery_id: i64, outcome: &AttemptOutcome) -> Result<()>;
    /// A page of an endpoint's deliveries (or the workspace's), newest first.
    async fn list_deliveries(
        &self,
        ws: &WorkspaceId,
        endpoint: Option<&WebhookId>,
        page: &crate::model::PageRequest,
    ) -> Result<crate::model::Page<Delivery>>;
    /// A delivery and its attempts, oldest first.
    async fn delivery(&self, ws: &WorkspaceId, id: i64) -> Result<Option<(Delivery, Vec<DeliveryAttempt>)>>;
    /// Makes a delivery due again at `now` with its retries counted afresh (same message id).
    /// `false` if there is none.
    async fn redeliver(&self, ws: &WorkspaceId, id: i64, now: Timestamp) -> Result<bool>;
    /// Makes every pending delivery of an endpoint due at `now`, retries counted afresh (when it
    /// is enabled again). Returns how many.
    async fn resume_deliveries(&self, ws: &WorkspaceId, endpoint: &WebhookId, now: Timestamp) -> Result<u64>;
    /// When the next pending delivery of an enabled endpoint is due, if any.
    async fn next_delivery_due(&self) -> Result<Option<Timestamp>>;
    /// Deletes deliveries (and their attempts) created before `before` that are no longer
    /// pending. Returns how many.
    async fn prune_deliveries(&self, before: Timestamp) -> Result<u64>;
    /// Webhook deliveries and emails waiting to be sent (pending, any endpoint): for /metrics.
    async fn outbox_pending(&self) -> Result<(u64, u64)>;
    /// The stored quota count of every active token that has a quota, with the quota.
    async fn quota_standings(&self) -> Result<Vec<QuotaStanding>>;

    /// Whether events are also put in the email outbox (set once at start, when `[email]` is
    /// configured): one message per recipient, chosen by the event's [`Audience`] and the
    /// people's notification settings, in the event's transaction.
    fn set_email_outbox(&self, enabled: bool);
    /// As [`NotifyStore::claim_deliveries`], for emails.
    async fn claim_emails(&self, now: Timestamp, lease_ms: i64, owner: &str, limit: u32) -> Result<Vec<Email>>;
    /// Records an attempt to send an email and what it leads to.
    async fn record_email_attempt(&self, id: i64, outcome: &AttemptOutcome) -> Result<()>;
    /// A page of the workspace's emails, newest first (the cursor is an email id).
    async fn list_emails(
        &self,
        ws: &WorkspaceId,
        page: &crate::model::PageRequest,
    ) -> Result<crate::model::Page<Email>>;
    /// A person's choices for `ws`: event type → emailed or not (events not listed follow the
    /// default [`Audience`]).
    async fn notification_prefs(&self, ws: &WorkspaceId, user: &crate::ids::UserId) -> Result<Vec<(String, bool)>>;
    /// Sets (or, with `None`, clears back to the default) a person's choice for one event type.
    async fn set_notification_pref(
        &self,
        ws: &WorkspaceId,
        user: &crate::ids::UserId,
        event_type: &str,
        email: Option<bool>,
    ) -> Result<()>;
}

/// One email to one person about one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Email {
    pub id: i64,
    #[serde(skip)]
    pub workspace_id: WorkspaceId,
    pub user_id: String,
    /// The address, as it was when the event happened.
    pub recipient: String,
    pub recipient_name: String,
    pub event_type: String,
    /// The event (the same JSON a webhook carries): what the message is rendered from.
    #[serde(skip)]
    pub payload: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub created_at: Timestamp,
    pub sent_at: Option<Timestamp>,
}

/// The waits before each retry of an email: 1 min, 5 min, 30 min, 2 h, 6 h; then it failed.
pub const EMAIL_RETRY_SCHEDULE_SECS: [i64; 5] = [60, 300, 1_800, 7_200, 21_600];

/// Where a token stands against its quota (from the counts the gateways flush).
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaStanding {
    pub token_id: crate::ids::TokenId,
    pub workspace_id: WorkspaceId,
    pub quota: crate::policy::Quota,
    /// The start of the period counted (milliseconds since the epoch).
    pub period_start: i64,
    pub count: u64,
}

/// The quota thresholds `quota.threshold` is sent at, in percent.
pub const QUOTA_THRESHOLDS: [u8; 2] = [80, 100];

/// The highest threshold `count` of `limit` has reached, if any.
pub fn quota_threshold_reached(count: u64, limit: u64) -> Option<u8> {
    QUOTA_THRESHOLDS
        .iter()
        .rev()
        .copied()
        .find(|t| limit > 0 && u128::from(count) * 100 >= u128::from(limit) * u128::from(*t))
}

/// The JSON body of an event: `{"type", "timestamp", "data"}` as the specification recommends.
/// `data` carries the audit event (its id, actor, target and the fields it changed); audit
/// events never hold a secret, so neither does a message.
pub fn payload(event_type: &str, at: Timestamp, data: serde_json::Value) -> String {
    serde_json::json!({"type": event_type, "timestamp": at.to_rfc3339(), "data": data}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_specification_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let key = base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn actions_map_to_one_event_each() {
        assert_eq!(event_for_action("token.revoke").map(|t| t.name), Some("token.revoked"));
        assert_eq!(event_for_action("oauth.signing_key.retire").map(|t| t.name), Some("signing_key.rotated"));
        assert_eq!(event_for_action("token.update"), None);
        let mut seen = std::collections::HashSet::new();
        for t in EVENT_TYPES {
            assert!(seen.insert(t.name), "{} twice", t.name);
            for a in t.actions {
                assert_eq!(event_for_action(a).map(|x| x.name), Some(t.name), "{a} raises one event");
            }
        }
    }

    #[test]
    fn retries_follow_the_schedule_then_stop() {
        assert_eq!(retry_after_secs(0), None);
        assert_eq!(retry_after_secs(1), Some(5));
        assert_eq!(retry_after_secs(7), Some(36_000));
        assert_eq!(retry_after_secs(8), None);
        let total: i64 = RETRY_SCHEDULE_SECS.iter().sum();
        assert!((27 * 3600..29 * 3600).contains(&total), "{total}");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",
            "64:ff9b:1::808:808",
            "2001::1",
            "2001:2::1",
            "2001:20::1",
            "5f00::1",
            "3fff::1",
            "3fff:fff::1",
            "4000::1",
            "64:ff9b:2::1",
            "100::1",
            "2002:7f00:1::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public_ip(a.parse().unwrap()), "{a} is not public");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "3fff:1000::1",
            "2a00:1450::1",
            "2002:808:808::1",
        ] {
            assert!(is_public_ip(a.parse().unwrap()), "{a} is public");
        }
    }

    #[test]
    fn quota_thresholds() {
        assert_eq!(quota_threshold_reached(79, 100), None);
        assert_eq!(quota_threshold_reached(80, 100), Some(80));
        assert_eq!(quota_threshold_reached(99, 100), Some(80));
        assert_eq!(quota_threshold_reached(100, 100), Some(100));
        assert_eq!(quota_threshold_reached(u64::MAX, u64::MAX), Some(100));
        assert_eq!(quota_threshold_reached(5, 0), None);
    }

    #[test]
    fn subscriptions() {
        assert!(subscribes(&[], "token.revoked"));
        assert!(subscribes(&["*".into()], "token.revoked"));
        assert!(subscribes(&["token.revoked".into()], "token.revoked"));
        assert!(!subscribes(&["token.exposed".into()], "token.revoked"));
    }
}
