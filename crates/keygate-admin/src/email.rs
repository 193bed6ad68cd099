//! Email notifications (issue 15): the outbox's messages rendered (plain text and HTML, from the
//! event, never with a secret) and sent through a [`Mailer`] the binary provides (SMTP), with
//! retries; and each person's notification settings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keygate_core::ids::{UserId, WorkspaceId};
use keygate_core::notify::{
    AttemptOutcome, DeliveryAttempt, DeliveryState, EMAIL_RETRY_SCHEDULE_SECS, EVENT_TYPES, Email, event_type,
};
use keygate_core::{Error, Result};
use minijinja::{Environment, context};
use serde_json::Value;

use crate::service::Admin;

/// How many emails one pass sends at most.
const CLAIM_BATCH: u32 = 20;
/// What a pass's lease allows beyond its sends' deadlines, for the store's reads and writes.
const LEASE_SLACK: Duration = Duration::from_secs(120);
/// No send is started unless this much of the lease would remain after its deadline: time to
/// record the attempt before another node may claim the email.
const RECORD_MARGIN: Duration = Duration::from_secs(60);

/// How long a pass of the email worker holds the emails it claimed: longer than the pass can take
/// when every send runs to its deadline (`CLAIM_BATCH` × `deadline`, plus slack for the store),
/// so that no other node claims an email while a send of it may still complete — it would go
/// twice. A pass is bounded by it too (the binary's worker stops waiting for one after it).
pub fn lease(deadline: Duration) -> Duration {
    deadline.saturating_mul(CLAIM_BATCH).saturating_add(LEASE_SLACK)
}

/// A message ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub to_address: String,
    pub to_name: String,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Sends one message (SMTP in the binary); `Err` says why not, without credentials.
#[async_trait]
pub trait Mailer: Send + Sync {
    async fn send(&self, message: &Message) -> std::result::Result<(), String>;

    /// The longest one message's send may take, start to end (`[email] timeout_seconds`). The
    /// worker stops waiting for a send after it and counts a failed attempt, whatever the
    /// transport does: a server that accepts the connection and then says nothing must not hold
    /// up every other email.
    fn deadline(&self) -> Duration;
}

const TEXT: &str = "Hello {{ name }},

{{ headline }}

{% for f in facts %}{{ f[0] }}: {{ f[1] }}
{% endfor %}
{{ advice }}
{% if link %}
{{ link }}
{% endif %}
--
keygate, workspace {{ workspace }}. You receive this as {{ why }}; change it in your notification settings{% if settings %} ({{ settings }}){% endif %}.
";

const HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ subject }}</title></head>
<body style="font-family: system-ui, sans-serif; color: #1a1a1a; max-width: 40em">
<p>Hello {{ name }},</p>
<p><strong>{{ headline }}</strong></p>
<table role="presentation" style="border-collapse: collapse">
{% for f in facts %}<tr><th scope="row" style="text-align: left; padding: 2px 12px 2px 0">{{ f[0] }}</th><td><code>{{ f[1] }}</code></td></tr>
{% endfor %}</table>
<p>{{ advice }}</p>
{% if link %}<p><a href="{{ link }}">Open it in the dashboard</a></p>{% endif %}
<hr>
<p style="color: #555; font-size: small">keygate, workspace {{ workspace }}. You receive this as {{ why }}; change it in your notification settings{% if settings %} (<a href="{{ settings }}">{{ settings }}</a>){% endif %}.</p>
</body></html>
"#;

/// What to say about an event: headline, facts, advice (from the event's JSON, which holds no
/// secret).
fn describe(kind: &str, data: &Value) -> (String, Vec<(String, String)>, String) {
    let after = &data["after"];
    let target = data["target"].as_str().unwrap_or_default().to_owned();
    let name = after["name"].as_str().or_else(|| data["before"]["name"].as_str()).map(str::to_owned);
    let mut facts = vec![("Token".to_owned(), target.clone())];
    if let Some(n) = &name {
        facts.push(("Name".into(), n.clone()));
    }
    let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let (headline, advice) = match kind {
        "token.exposed" => {
            if let Some(l) = after["location"].as_str() {
                facts.push(("Found".into(), l.to_owned()));
            }
            (
                "A token was found exposed.",
                "Rotate it now and remove it from where it was found; the workspace's exposure policy may have suspended or revoked it already.",
            )
        }
        "token.expiring" => {
            facts.push(("Expires".into(), text(&after["expires_at"])));
            ("A token expires soon.", "Rotate it before it expires, or the apps that use it stop working.")
        }
        "token.expired" => {
            facts.push(("Expired".into(), text(&after["expires_at"])));
            ("A token has expired.", "Calls with it are refused. Issue a new token if it is still needed.")
        }
        "token.revoked" => {
            if let Some(r) = after["revoke_reason"].as_str() {
                facts.push(("Reason".into(), r.to_owned()));
            }
            ("A token was revoked.", "Calls with it are refused from now on, on every node.")
        }
        "token.suspended" => ("A token was suspended.", "Calls with it are refused until it is resumed."),
        "token.resumed" => ("A suspended token was resumed.", "Calls with it are accepted again."),
        "oauth_client.suspended" | "oauth_client.resumed" => {
            facts[0].0 = "OAuth client".into();
            if let Some(a) = after["app_id"].as_str() {
                facts.push(("App".into(), a.to_owned()));
            }
            if kind == "oauth_client.resumed" {
                (
                    "A suspended OAuth client was resumed.",
                    "It is issued access tokens again, and its refresh tokens work again.",
                )
            } else {
                if let Some(r) = after["suspended_reason"].as_str() {
                    facts.push(("Reason".into(), r.to_owned()));
                }
                facts.push(("Access tokens revoked".into(), text(&after["access_tokens_revoked"])));
                (
                    "An OAuth client was suspended.",
                    "The token endpoint issues it nothing and its access tokens are refused. If its secret may be stolen, rotate it on its app's page before resuming the client there.",
                )
            }
        }
        "token.rotated" => {
            ("A token was rotated.", "Deploy the new secret: the old one stops working when its grace period ends.")
        }
        "token.rotation_due" => {
            facts.push(("Rotate by".into(), text(&after["rotation_due_at"])));
            ("A token is due for rotation.", "The workspace's rotation policy asks for a new secret; rotate the token.")
        }
        "quota.threshold" => {
            facts.push((
                "Used".into(),
                format!(
                    "{} of {} ({}%)",
                    text(&after["used"]),
                    text(&after["limit"]),
                    text(&after["threshold_percent"])
                ),
            ));
            if let Some(r) = after["resets_at"].as_str() {
                facts.push(("Resets".into(), r.to_owned()));
            }
            (
                "A token reached a quota threshold.",
                "At 100% its calls are refused until the quota resets; ask for a larger plan if it needs more.",
            )
        }
        "anomaly.detected" => {
            let client = after["subject"] == "client";
            if client {
                facts[0].0 = "OAuth client".into();
            }
            for (label, key) in [("Alert", "alert_id"), ("Kind", "kind"), ("Severity", "severity"), ("What", "summary")]
            {
                if let Some(v) = after[key].as_str() {
                    facts.push((label.into(), v.to_owned()));
                }
            }
            if client {
                (
                    "Unusual use of an OAuth client's access tokens was detected.",
                    "Check the alert in the dashboard (Alerts); if the client's secret may be stolen, rotate it on its app's page (the tokens it already issued expire on their own, or can be revoked).",
                )
            } else {
                (
                    "Unusual use of a token was detected.",
                    "Check the alert in the dashboard (Alerts); if the token may be stolen, revoke or rotate it. If the workspace's anomaly policy suspended it and the use was legitimate, resume it from the alert.",
                )
            }
        }
        "budget.threshold" => {
            let whose = after["budget_of"].as_str().unwrap_or("key");
            let label = match whose {
                "app" => "App",
                "workspace" => "Route (the workspace's budget)",
                _ => "Token",
            };
            facts = vec![(label.into(), target)];
            facts.push(("Route".into(), text(&after["route"])));
            let money = |v: &Value| v.as_f64().map_or_else(|| text(v), |x| format!("${x:.2}"));
            facts.push((
                "Spent".into(),
                format!(
                    "{} of {} a {} ({}%)",
                    money(&after["spent_usd"]),
                    money(&after["budget_usd"]),
                    text(&after["period"]),
                    text(&after["threshold_percent"])
                ),
            ));
            if let Some(r) = after["resets_at"].as_str() {
                facts.push(("Resets".into(), r.to_owned()));
            }
            (
                "An AI route's budget reached a threshold.",
                "At 100% calls to the route's models are refused (429 budget_exceeded) until the period ends; raise the budget in the route if it needs more.",
            )
        }
        "api.published" | "api.deprecated" | "api.retired" | "api.publish_requested" => {
            facts = vec![("API".into(), text(&after["api"]))];
            if let Some(v) = after["version"].as_str() {
                facts.push(("Version".into(), v.to_owned()));
            }
            if let Some(t) = after["sunset"].as_str() {
                facts.push(("Sunset".into(), t.to_owned()));
            }
            if let Some(t) = after["successor"].as_str() {
                facts.push(("Successor".into(), t.to_owned()));
            }
            match kind {
                "api.published" => ("An API was published.", "It is listed in the developer portal."),
                "api.deprecated" => (
                    "An API your apps call was deprecated.",
                    "It still answers, with Deprecation and Sunset headers; move your calls to its successor before the sunset.",
                ),
                "api.retired" => (
                    "An API your apps called was retired.",
                    "Its routes now answer 410 api_retired; call its successor instead.",
                ),
                _ => ("Someone asked to publish an API.", "Approve or reject it in the dashboard (API lifecycle)."),
            }
        }
        "subscription.requested" | "subscription.approved" | "subscription.rejected" | "subscription.cancelled" => {
            facts = vec![("Subscription".into(), target)];
            for (label, key) in [("App", "app_id"), ("API", "api"), ("Version", "version"), ("Reason", "reason")] {
                if let Some(v) = after[key].as_str() {
                    facts.push((label.into(), v.to_owned()));
                }
            }
            match kind {
                "subscription.requested" => (
                    "An app asked to subscribe to an API.",
                    "Approve or reject it in the dashboard (APIs); until then the app's tokens are refused on the API.",
                ),
                "subscription.approved" => {
                    ("An app's subscription to an API was approved.", "The app's tokens may call the API now.")
                }
                "subscription.rejected" => (
                    "An app's request to subscribe to an API was rejected.",
                    "The app's tokens are refused on the API (403 subscription_required); ask the API's owners why.",
                ),
                _ => (
                    "An app's subscription to an API was cancelled.",
                    "The app's tokens are refused on the API (403 subscription_required) until it subscribes again.",
                ),
            }
        }
        "plan.requested" => {
            facts = vec![("Request".into(), target)];
            ("A developer asked for a plan change.", "Approve or deny it in the dashboard (Apps).")
        }
        "member.invited" => {
            facts = vec![("Invitation".into(), target)];
            if let Some(e) = after["email"].as_str() {
                facts.push(("Invited".into(), e.to_owned()));
            }
            (
                "Someone was invited to the workspace.",
                "If you did not expect it, withdraw the invitation under Members.",
            )
        }
        "signing_key.rotated" => {
            facts = vec![("Key".into(), target)];
            ("The OAuth signing key was rotated.", "Clients that cache the JWKS pick up the new key by themselves.")
        }
        "webhook.disabled" => {
            facts = vec![("Endpoint".into(), target)];
            if let Some(r) = after["disabled_reason"].as_str() {
                facts.push(("Why".into(), r.to_owned()));
            }
            (
                "A webhook endpoint was disabled after failing for too long.",
                "Fix the receiver, then enable the endpoint again under Settings → Webhooks.",
            )
        }
        "billing.period_closed" => {
            facts = vec![("App".into(), target)];
            facts.push(("Month".into(), text(&after["period"])));
            facts.push(("Billable requests".into(), text(&after["billable_requests"])));
            facts.push(("Total".into(), format!("{} {}", text(&after["total"]), text(&after["currency"]))));
            (
                "A month ended: the app's statement is final.",
                "Fetch it from GET /admin/v1/apps/{id}/statement?period=YYYY-MM (JSON or CSV) or the app's page, and pass it to your billing system.",
            )
        }
        _ => ("Something happened in your workspace.", "See the audit log in the dashboard."),
    };
    facts.push(("When".into(), text(&data["at"])));
    if let Some(actor) = data["actor"].as_str() {
        facts.push(("By".into(), actor.to_owned()));
    }
    (headline.to_owned(), facts, advice.to_owned())
}

/// The message for `email`, rendered from its event.
pub fn render(email: &Email, workspace_name: &str, dashboard_url: Option<&str>) -> Result<Message> {
    let body: Value =
        serde_json::from_str(&email.payload).map_err(|_| Error::internal("an email's event is not JSON"))?;
    let (headline, facts, advice) = describe(&email.event_type, &body["data"]);
    let subject = format!("[keygate] {}", headline.trim_end_matches('.'));
    let base = dashboard_url.map(|u| u.trim_end_matches('/').to_owned());
    let target = body["data"]["target"].as_str().unwrap_or_default();
    let alert = body["data"]["after"]["alert_id"].as_str().filter(|_| email.event_type == "anomaly.detected");
    let link = base.as_ref().map(|b| {
        if let Some(id) = alert {
            format!("{b}/alerts/{id}")
        } else if target.starts_with("tok_") {
            format!("{b}/tokens/{target}")
        } else if target.starts_with("api_") {
            format!("{b}/apis")
        } else if let Some(app) =
            body["data"]["after"]["app_id"].as_str().filter(|_| email.event_type.starts_with("oauth_client."))
        {
            format!("{b}/apps/{app}")
        } else {
            format!("{b}/audit")
        }
    });
    let why = match event_type(&email.event_type).map(|t| t.email) {
        Some(a) if a.app_owner && a.workspace_owners => "the owner of the app or of the workspace",
        Some(a) if a.app_owner => "the owner of the app",
        Some(a) if a.workspace_owners => "an owner of the workspace",
        _ => "you asked for it",
    };
    let mut env = Environment::new();
    env.set_auto_escape_callback(|name| {
        if name == "html" { minijinja::AutoEscape::Html } else { minijinja::AutoEscape::None }
    });
    env.add_template("text", TEXT).map_err(|e| Error::internal(format!("email template: {e}")))?;
    env.add_template("html", HTML).map_err(|e| Error::internal(format!("email template: {e}")))?;
    let ctx = context! {
        name => email.recipient_name.clone(), headline, facts, advice, link, workspace => workspace_name,
        why, subject => subject.clone(), settings => base.as_ref().map(|b| format!("{b}/account/notifications")),
    };
    let render = |t: &str| {
        env.get_template(t).and_then(|t| t.render(&ctx)).map_err(|e| Error::internal(format!("email template: {e}")))
    };
    Ok(Message {
        to_address: email.recipient.clone(),
        to_name: email.recipient_name.clone(),
        subject,
        text: render("text")?,
        html: render("html")?,
    })
}

/// What one pass of the email worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmailPass {
    pub full: bool,
    pub sent: usize,
    pub failed: usize,
}

/// A person's setting for one event type: whether they get it, and whether that is the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationSetting {
    pub event_type: &'static str,
    pub description: &'static str,
    pub email: bool,
    pub default: bool,
}

impl Admin {
    /// One pass of the email worker: claims the emails due, renders and sends each, records the
    /// outcome and schedules retries (1 min, 5 min, 30 min, 2 h, 6 h).
    ///
    /// Each send is bounded by the mailer's [`Mailer::deadline`] (a send cut off is a failed
    /// attempt, retried), and the emails are leased for [`lease`]: no send starts that could end
    /// after the lease, so another node never claims an email whose send may still complete.
    pub async fn deliver_emails(self: &Arc<Self>, mailer: &dyn Mailer, node: &str) -> Result<EmailPass> {
        let deadline = mailer.deadline();
        let lease = lease(deadline);
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        // The lease runs from before the claim: a slow claim eats into it, not past it.
        let leased = std::time::Instant::now();
        let claimed = self.store().claim_emails(self.now(), lease_ms, node, CLAIM_BATCH).await?;
        let mut pass = EmailPass { full: claimed.len() >= CLAIM_BATCH as usize, ..EmailPass::default() };
        let dashboard = self.notify_settings().dashboard_url;
        let mut names: std::collections::HashMap<WorkspaceId, String> = Default::default();
        for e in claimed {
            let ws_name = match names.get(&e.workspace_id) {
                Some(n) => n.clone(),
                None => {
                    let n = self.store().workspace(&e.workspace_id).await?.map(|w| w.name).unwrap_or_default();
                    names.insert(e.workspace_id.clone(), n.clone());
                    n
                }
            };
            if leased.elapsed() + deadline + RECORD_MARGIN > lease {
                // The store was slow: the rest wait for the lease to run out and are claimed again.
                tracing::warn!(
                    email = e.id,
                    "the email pass ran close to its lease; the emails left are sent when it runs out"
                );
                break;
            }
            let started = self.now();
            let clock = std::time::Instant::now();
            let result = match render(&e, &ws_name, dashboard.as_deref()) {
                Ok(m) => match tokio::time::timeout(deadline, mailer.send(&m)).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        tracing::warn!(
                            email = e.id,
                            event = %e.event_type,
                            timeout_seconds = deadline.as_secs(),
                            "the SMTP server did not finish sending an email in time: a failed attempt"
                        );
                        Err(format!(
                            "timed out: the SMTP server did not finish within {} s (email.timeout_seconds)",
                            deadline.as_secs()
                        ))
                    }
                },
                Err(err) => Err(err.message.into_owned()),
            };
            let duration_ms = u32::try_from(clock.elapsed().as_millis()).unwrap_or(u32::MAX);
            let error = result.err();
            let attempt = DeliveryAttempt { at: started, status: None, error: error.clone(), duration_ms };
            let outcome = if error.is_none() {
                pass.sent += 1;
                AttemptOutcome { attempt, state: DeliveryState::Delivered, next_at: None }
            } else {
                let wait = usize::try_from(e.attempts).ok().and_then(|i| EMAIL_RETRY_SCHEDULE_SECS.get(i).copied());
                match wait {
                    Some(w) => AttemptOutcome {
                        attempt,
                        state: DeliveryState::Pending,
                        next_at: Some(started.plus_seconds(w)),
                    },
                    None => {
                        pass.failed += 1;
                        tracing::warn!(email = e.id, event = %e.event_type, "an email could not be sent after every retry");
                        AttemptOutcome { attempt, state: DeliveryState::Failed, next_at: None }
                    }
                }
            };
            self.store().record_email_attempt(e.id, &outcome).await?;
        }
        Ok(pass)
    }

    /// `user`'s notification settings in `ws`: every event type, emailed or not, and whether
    /// that is the default for `default_for` (their role: owner, app owner).
    pub async fn notification_settings(
        &self,
        ws: &WorkspaceId,
        user: &UserId,
        is_owner: bool,
        owns_apps: bool,
    ) -> Result<Vec<NotificationSetting>> {
        let prefs = self.store().notification_prefs(ws, user).await?;
        Ok(EVENT_TYPES
            .iter()
            .map(|t| {
                let default = (t.email.workspace_owners && is_owner) || (t.email.app_owner && owns_apps);
                let chosen = prefs.iter().find(|(e, _)| e == t.name).map(|(_, on)| *on);
                NotificationSetting {
                    event_type: t.name,
                    description: t.description,
                    email: chosen.unwrap_or(default),
                    default: chosen.is_none(),
                }
            })
            .collect())
    }

    /// Sets `user`'s choice for each event type: the types in `on` are emailed, the others not;
    /// a choice equal to the default is stored as "default" (so it follows later changes).
    pub async fn set_notification_settings(
        &self,
        ws: &WorkspaceId,
        user: &UserId,
        is_owner: bool,
        owns_apps: bool,
        on: &[String],
    ) -> Result<()> {
        for t in on {
            if event_type(t).is_none() {
                return Err(Error::invalid("invalid_event_type", format!("unknown event type {t:?}")));
            }
        }
        for t in EVENT_TYPES {
            let default = (t.email.workspace_owners && is_owner) || (t.email.app_owner && owns_apps);
            let want = on.iter().any(|o| o == t.name);
            let choice = (want != default).then_some(want);
            self.store().set_notification_pref(ws, user, t.name, choice).await?;
        }
        Ok(())
    }

    /// The workspace's emails, newest first (for the dashboard's log).
    pub async fn list_emails(&self, ws: &WorkspaceId, limit: u32) -> Result<Vec<Email>> {
        Ok(self.store().list_emails(ws, &keygate_core::model::PageRequest { limit, cursor: None }).await?.items)
    }

    /// Turns the email outbox on (when `[email]` is configured).
    pub fn enable_email(&self) {
        self.store().set_email_outbox(true);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use keygate_core::account::{Membership, Role, User};
    use keygate_core::model::Actor;
    use keygate_core::secret::OsRandom;

    use super::*;
    use crate::service::{NewApp, NewToken};

    #[derive(Default)]
    struct Outbox(parking_lot::Mutex<Vec<Message>>);

    #[async_trait]
    impl Mailer for Outbox {
        async fn send(&self, m: &Message) -> std::result::Result<(), String> {
            if m.to_address.starts_with("down@") {
                return Err("451 try again later".into());
            }
            self.0.lock().push(m.clone());
            Ok(())
        }

        fn deadline(&self) -> Duration {
            Duration::from_secs(5)
        }
    }

    async fn person(admin: &Admin, ws: &WorkspaceId, email: &str, role: Role) -> UserId {
        let user = User {
            id: UserId::random(&OsRandom).unwrap(),
            email: email.into(),
            name: email.split('@').next().unwrap().into(),
            password_hash: "x".into(),
            totp_sealed: None,
            totp_enabled: false,
            totp_last_step: 0,
            disabled: false,
            created_at: admin.now(),
            updated_at: admin.now(),
        };
        let m = Membership { workspace_id: ws.clone(), user_id: user.id.clone(), role, created_at: admin.now() };
        let audit =
            keygate_core::model::NewAuditEvent::new(ws, &Actor::cli(), "user.create", user.id.as_str(), admin.now());
        admin.store().insert_user(&user, &m, &audit).await.unwrap();
        user.id
    }

    #[tokio::test]
    async fn a_budget_notice_about_an_app_reaches_its_owner_and_the_workspaces() {
        let (admin, _clock, _dir, ws) = crate::testing::admin().await;
        admin.enable_email();
        let _owner = person(&admin, &ws, "owner@example.com", Role::Owner).await;
        let dev = person(&admin, &ws, "dev@example.com", Role::Developer).await;
        let actor = Actor::cli();
        let app = admin.create_app(&ws, &actor, NewApp { name: "bot".into(), ..Default::default() }).await.unwrap();
        admin.store().set_app_owner(&ws, &app.id, &dev).await.unwrap();
        let audit = keygate_core::model::NewAuditEvent::new(
            &ws,
            &Actor { id: "system".into(), source: None, owner: true },
            "budget.threshold",
            app.id.as_str(),
            admin.now(),
        )
        .with_after(serde_json::json!({"budget_of": "app", "route": "llm", "threshold_percent": 80,
            "spent_usd": 8.0, "budget_usd": 10.0, "period": "month", "resets_at": "2026-01-01T00:00:00Z"}));
        let key = keygate_core::ids::TokenId::from_trusted(app.id.to_string());
        assert!(admin.store().record_rotation_notice(&key, "budget80@llm@app@0", admin.now(), &audit).await.unwrap());
        let outbox = Outbox::default();
        admin.deliver_emails(&outbox, "n1").await.unwrap();
        let mut to: Vec<String> = outbox.0.lock().iter().map(|m| m.to_address.clone()).collect();
        to.sort();
        assert_eq!(to, ["dev@example.com", "owner@example.com"]);
        let m = outbox.0.lock()[0].clone();
        assert!(m.subject.contains("budget reached a threshold"), "{}", m.subject);
        assert!(m.text.contains("$8.00 of $10.00 a month (80%)") && m.text.contains(app.id.as_str()), "{}", m.text);
    }

    /// An API's deprecation reaches the owners of the apps whose tokens called its routes in the
    /// last 90 days (not those of older calls or of other routes), and the workspace's owners.
    #[tokio::test]
    async fn an_api_deprecation_reaches_the_owners_of_the_apps_that_called_it() {
        use keygate_core::apis::{Api, ApiState};
        use keygate_core::model::UsageRecord;
        let (admin, _clock, _dir, ws) = crate::testing::admin().await;
        admin.enable_email();
        let _owner = person(&admin, &ws, "owner@example.com", Role::Owner).await;
        let actor = Actor::cli();
        let mut tokens = Vec::new();
        for (email, route, days_ago) in [
            ("recent@example.com", "orders-v1", 3),
            ("old@example.com", "orders-v1", 120),
            ("else@example.com", "misc", 1),
        ] {
            let dev = person(&admin, &ws, email, Role::Developer).await;
            let app = admin.create_app(&ws, &actor, NewApp { name: email.into(), ..Default::default() }).await.unwrap();
            admin.store().set_app_owner(&ws, &app.id, &dev).await.unwrap();
            let new = NewToken { name: "t".into(), app_id: Some(app.id.clone()), ..Default::default() };
            let (t, _) = admin.create_token(&ws, &actor, new).await.unwrap();
            tokens.push(UsageRecord {
                token_id: t.id.clone(),
                workspace_id: ws.clone(),
                route: route.into(),
                minute: admin.now().plus_seconds(-days_ago * 86_400),
                requests: 1,
                status: [1, 0, 0, 0],
                bytes_in: 0,
                bytes_out: 0,
                latency_us_sum: 0,
                latency: [0; 10],
            });
        }
        admin.store().record_usage(&tokens, &[], &[]).await.unwrap();
        let created = admin
            .create_api(&ws, &actor, crate::apis::NewApi { name: "orders".into(), ..Default::default() })
            .await
            .unwrap();
        let before = created.api.clone();
        let after = Api { state: ApiState::Deprecated, deprecated_at: Some(admin.now()), ..before.clone() };
        let audit =
            keygate_core::model::NewAuditEvent::new(&ws, &actor, "api.deprecate", before.id.as_str(), admin.now())
                .with_after(serde_json::json!({"api": "orders", "version": "v1", "state": "deprecated",
                "sunset": "2031-01-01T00:00:00Z", "successor": "/v2/orders", "routes": ["orders-v1"]}));
        admin.store().update_api(&after, &[audit]).await.unwrap();
        let outbox = Outbox::default();
        admin.deliver_emails(&outbox, "n1").await.unwrap();
        let mut to: Vec<String> = outbox.0.lock().iter().map(|m| m.to_address.clone()).collect();
        to.sort();
        assert_eq!(to, ["owner@example.com", "recent@example.com"]);
        let m = outbox.0.lock()[0].clone();
        assert!(m.subject.contains("was deprecated"), "{}", m.subject);
        assert!(m.text.contains("2031-01-01T00:00:00Z") && m.text.contains("/v2/orders"), "{}", m.text);
    }

    #[tokio::test]
    async fn events_are_emailed_to_their_audience_as_people_chose() {
        let (admin, _clock, _dir, ws) = crate::testing::admin().await;
        admin.enable_email();
        let _owner = person(&admin, &ws, "owner@example.com", Role::Owner).await;
        let dev = person(&admin, &ws, "dev@example.com", Role::Developer).await;
        let viewer = person(&admin, &ws, "viewer@example.com", Role::Viewer).await;
        let actor = Actor::cli();
        let app = admin.create_app(&ws, &actor, NewApp { name: "shop".into(), ..Default::default() }).await.unwrap();
        admin.store().set_app_owner(&ws, &app.id, &dev).await.unwrap();
        let new = || NewToken { name: "ci".into(), app_id: Some(app.id.clone()), ..Default::default() };
        let (t, secret) = admin.create_token(&ws, &actor, new()).await.unwrap();
        let outbox = Outbox::default();

        // Revoked: the app's owner only. Exposed: the app's owner and the workspace's owners.
        admin.revoke_token(&ws, &actor, &t.id, Some("done".into())).await.unwrap();
        let (t2, secret2) = admin.create_token(&ws, &actor, new()).await.unwrap();
        admin.mark_exposed(&ws, &actor, &t2, Some("https://paste.example/x")).await.unwrap();
        admin.deliver_emails(&outbox, "n1").await.unwrap();
        let mut sent: Vec<(String, String)> =
            outbox.0.lock().iter().map(|m| (m.to_address.clone(), m.subject.clone())).collect();
        sent.sort();
        assert_eq!(
            sent,
            [
                ("dev@example.com".to_owned(), "[keygate] A token was found exposed".to_owned()),
                ("dev@example.com".to_owned(), "[keygate] A token was revoked".to_owned()),
                ("owner@example.com".to_owned(), "[keygate] A token was found exposed".to_owned()),
            ]
        );
        let m = outbox.0.lock().iter().find(|m| m.to_address == "owner@example.com").cloned().unwrap();
        assert!(m.text.contains(t2.id.as_str()) && m.text.contains("paste.example") && m.html.contains("<table"));
        for m in outbox.0.lock().iter() {
            assert!(!m.text.contains(secret.expose()) && !m.html.contains(secret2.expose()), "no secret");
        }

        // The developer opts out of revocations; the viewer opts in; the defaults are shown.
        let settings = admin.notification_settings(&ws, &dev, false, true).await.unwrap();
        let revoked = settings.iter().find(|s| s.event_type == "token.revoked").unwrap();
        assert!(revoked.email && revoked.default);
        let keep: Vec<String> = settings
            .iter()
            .filter(|s| s.email && s.event_type != "token.revoked")
            .map(|s| s.event_type.to_owned())
            .collect();
        admin.set_notification_settings(&ws, &dev, false, true, &keep).await.unwrap();
        admin.set_notification_settings(&ws, &viewer, false, false, &["token.revoked".into()]).await.unwrap();
        let after = admin.notification_settings(&ws, &dev, false, true).await.unwrap();
        let revoked = after.iter().find(|s| s.event_type == "token.revoked").unwrap();
        assert!(!revoked.email && !revoked.default);
        outbox.0.lock().clear();
        let (t3, _) = admin.create_token(&ws, &actor, new()).await.unwrap();
        admin.revoke_token(&ws, &actor, &t3.id, None).await.unwrap();
        admin.deliver_emails(&outbox, "n1").await.unwrap();
        let to: Vec<String> = outbox.0.lock().iter().map(|m| m.to_address.clone()).collect();
        assert_eq!(to, ["viewer@example.com"]);
        let bad = admin.set_notification_settings(&ws, &dev, false, true, &["nope".into()]).await.unwrap_err();
        assert_eq!(bad.code, "invalid_event_type");

        // A server that refuses: retried a minute later, then sent.
        let down = person(&admin, &ws, "down@example.com", Role::Owner).await;
        let (t4, _) = admin.create_token(&ws, &actor, new()).await.unwrap();
        admin.mark_exposed(&ws, &actor, &t4, None).await.unwrap();
        outbox.0.lock().clear();
        admin.deliver_emails(&outbox, "n1").await.unwrap();
        let emails = admin.list_emails(&ws, 50).await.unwrap();
        let pending = emails.iter().find(|e| e.recipient == "down@example.com").unwrap();
        assert_eq!(
            (pending.state, pending.last_error.as_deref()),
            (DeliveryState::Pending, Some("451 try again later"))
        );
        assert_eq!(pending.next_at, Some(admin.now().plus_seconds(60)));
        assert_eq!(pending.user_id, down.as_str());
    }
}
