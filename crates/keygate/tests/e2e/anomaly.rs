//! Anomaly detection (issue 15), as it will be used: a token with a steady baseline is leaked
//! and used from a new network at ten times its rate. On the testkit's manual clock, with the
//! client addresses given by a trusted proxy's X-Forwarded-For: the alert within seconds, the
//! token suspended by the workspace's policy, the `anomaly.detected` webhook delivered signed,
//! the one-click resume; and an old secret presented after its rotation's grace.

use std::time::Duration;

use keygate::config::WebhooksConfig;
use keygate_core::Clock as _;
use keygate_core::model::Permission;
use keygate_testkit::recording::{Recorded, RecordingUpstream};
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

use crate::dashboard::owner;

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// One call through the gateway from `client` (as the trusted proxy says).
async fn call(kg: &TestKeygate, secret: &str, client: &str) -> u16 {
    let r = http()
        .get(format!("{}/orders", kg.gateway_url()))
        .bearer_auth(secret)
        .header("x-forwarded-for", client)
        .header("user-agent", "orders-client/2.1")
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

async fn received(rx: &RecordingUpstream, n: usize) -> Vec<Recorded> {
    for _ in 0..200 {
        let got = rx.requests();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the receiver got {} requests, not {n}", rx.requests().len());
}

/// Runs the detectors until the token's alerts satisfy `done` (a request is counted just after
/// its answer is written, so the client may see the answer first): polls, bounded.
async fn alerts_until(kg: &TestKeygate, token: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..100 {
        kg.detect_now().await;
        let got = kg.client().get(&format!("/admin/v1/alerts?token_id={token}")).await.body["data"].clone();
        let got = got.as_array().cloned().unwrap_or_default();
        if done(&got) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the alerts of {token} did not come");
}

/// A minimal SMTP receiver: its URL and the messages it received.
async fn smtp_receiver() -> (String, std::sync::Arc<parking_lot::Mutex<Vec<String>>>) {
    let rx = crate::email::SmtpReceiver::start(0).await;
    (rx.url, rx.messages)
}

/// Seventy minutes of steady use: 12 calls a minute from the app's own network, with the
/// credential `secret` gives. A call is counted just after its answer is sent: before each turn
/// of the detectors, the test waits until the calls it made are counted (the call log, counted
/// after the watch, says so), or a loaded machine would show the detectors fewer calls than were
/// made. Returns the calls made.
async fn steady_use(kg: &TestKeygate, secret: &mut impl AsyncFnMut() -> String) -> u64 {
    let mut made = 0u64;
    for _ in 0..70 * 12 {
        kg.clock.advance_seconds(5);
        assert_eq!(call(kg, &secret().await, "198.51.100.7").await, 200);
        made += 1;
        if kg.clock.now().as_millis() % 60_000 < 5_000 {
            kg.write_calls(made).await;
            kg.detect_now().await;
        }
    }
    kg.write_calls(made).await;
    kg.detect_now().await;
    made
}

/// The leak: two calls a second (ten times the usual) from a network never seen, for at most
/// `seconds` seconds or until a call is refused. Returns the calls made in all and the second of
/// the first refusal.
async fn leak(
    kg: &TestKeygate,
    secret: &mut impl AsyncFnMut() -> String,
    mut made: u64,
    seconds: u32,
) -> (u64, Option<u32>) {
    let mut refused_after = None;
    for second in 1..=seconds {
        kg.clock.advance_seconds(1);
        for _ in 0..2 {
            let status = call(kg, &secret().await, "203.0.113.9").await;
            made += 1;
            if status == 401 && refused_after.is_none() {
                refused_after = Some(second);
            }
        }
        kg.write_calls(made).await;
        kg.detect_now().await;
        if refused_after.is_some() {
            break;
        }
        kg.sync_index().await.unwrap();
    }
    (made, refused_after)
}

/// The messages `mail` received that contain `text` (waits for one, bounded).
async fn emails_with(mail: &parking_lot::Mutex<Vec<String>>, text: &str) -> Vec<String> {
    for _ in 0..200 {
        let got: Vec<String> = mail.lock().iter().filter(|m| m.contains(text)).cloned().collect();
        if !got.is_empty() {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no email with {text:?}");
}

async fn start() -> (TestKeygate, RecordingUpstream, RecordingUpstream) {
    start_with_email(None).await
}

async fn start_with_email(smtp_url: Option<String>) -> (TestKeygate, RecordingUpstream, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await.unwrap();
    let hooks = RecordingUpstream::start().await.unwrap();
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("orders", "/orders", &upstream.url())],
        gateway: Some(keygate::config::GatewayConfig {
            trusted_proxies: vec!["127.0.0.1".into()],
            ..Default::default()
        }),
        webhooks: Some(WebhooksConfig { allow_private: true, ..WebhooksConfig::default() }),
        email: smtp_url.map(|url| keygate::config::EmailConfig {
            smtp_url: Some(url),
            from: Some("keygate <keygate@example.com>".into()),
            ..Default::default()
        }),
        ..Options::default()
    })
    .await
    .unwrap();
    (kg, upstream, hooks)
}

/// A gateway with an SMTP receiver, a webhook for `anomaly.detected` (its secret kept) and the
/// workspace's anomaly policy suspending from `high`, set by its owner in the dashboard.
struct Scene {
    kg: TestKeygate,
    _upstream: RecordingUpstream,
    hooks: RecordingUpstream,
    mail: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
    own: crate::dashboard::Browser,
    hook_secret: String,
}

impl Scene {
    async fn start() -> Self {
        let (smtp_url, mail) = smtp_receiver().await;
        let (kg, _upstream, hooks) = start_with_email(Some(smtp_url)).await;
        let mut own = owner(&kg).await;
        let p = own.submit("/settings", "/settings", &[("anomaly_suspend", "high")]).await;
        assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
        let hook = kg
            .client()
            .post(
                "/admin/v1/webhooks",
                &json!({"url": format!("{}/hooks", hooks.url()), "event_types": ["anomaly.detected"]}),
            )
            .await;
        assert_eq!(hook.status, StatusCode::CREATED, "{:?}", hook.body);
        let hook_secret = hook.body["secret"].as_str().unwrap().to_owned();
        Self { kg, _upstream, hooks, mail, own, hook_secret }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_token_used_from_a_new_network_at_ten_times_its_rate_is_alerted_and_suspended() {
    let Scene { kg, _upstream, hooks, mail, own, hook_secret } = Scene::start().await;
    let c = kg.client();
    let (token, secret) = c.create_token(&json!({"name": "orders-sync"})).await;
    kg.sync_index().await.unwrap();

    let made = steady_use(&kg, &mut async || secret.clone()).await;
    assert_eq!(c.get("/admin/v1/alerts").await.body["data"], json!([]), "steady use raises nothing");
    let (_, refused_after) = leak(&kg, &mut async || secret.clone(), made, 30).await;
    assert!(refused_after.is_some_and(|s| s <= 12), "refused after {refused_after:?} s");
    let all = c.get(&format!("/admin/v1/alerts?token_id={token}")).await.body["data"].clone();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let spike = all.iter().find(|a| a["kind"] == "rate_spike").expect("a rate spike");
    assert_eq!(spike["severity"], "high", "from a new network");
    assert_eq!(spike["action"], "suspended");
    assert!(all.iter().any(|a| a["kind"] == "new_network" && a["key"] == "203.0.113.0/24" && a["severity"] == "low"));

    // Through the API: the alert, its evidence, the suspension and its reason in the audit trail.
    let listed = c.get("/admin/v1/alerts?severity=high&status=open").await;
    assert_eq!(listed.status, StatusCode::OK, "{:?}", listed.body);
    let view = &listed.body["data"][0];
    assert_eq!((view["kind"].as_str(), view["token_id"].as_str()), (Some("rate_spike"), Some(token.as_str())));
    assert_eq!(view["evidence"]["new_networks"][0], "203.0.113.0/24");
    assert!(view["evidence"]["times_usual"].as_f64().unwrap() >= 5.0, "{view}");
    let id = view["id"].as_str().unwrap().to_owned();
    assert_eq!(c.get(&format!("/admin/v1/tokens/{token}")).await.body["status"], "suspended");
    let trail = c.get(&format!("/admin/v1/audit-events?target={token}&action=token.suspend")).await;
    assert_eq!(trail.body["data"][0]["actor"], "anomaly-policy");
    assert!(trail.body["data"][0]["after"]["reason"].as_str().unwrap().contains(&id), "{}", trail.body);

    // The webhook: both alerts, signed, with the evidence.
    let got = received(&hooks, 2).await;
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| {
            let key = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                hook_secret.strip_prefix("whsec_").unwrap(),
            )
            .unwrap();
            let ts: i64 = r.headers("webhook-timestamp").pop().unwrap().parse().unwrap();
            let want = keygate_core::notify::sign(&key, &r.headers("webhook-id").pop().unwrap(), ts, &r.body);
            assert_eq!(r.headers("webhook-signature").pop().unwrap(), want);
            serde_json::from_slice(&r.body).unwrap()
        })
        .collect();
    assert!(bodies.iter().all(|b| b["type"] == "anomaly.detected"));
    assert!(bodies.iter().any(|b| b["data"]["after"]["kind"] == "rate_spike"
        && b["data"]["after"]["severity"] == "high"
        && b["data"]["target"] == token.as_str()));
    assert!(!String::from_utf8_lossy(&got[0].body).contains(&secret), "no secret in a webhook");

    // The email: to the workspace's owner, what happened and what to do, no secret.
    let emails = emails_with(&mail, "Unusual use of a token").await;
    let email = &emails[0];
    assert!(email.contains("olivia@example.com"), "{email}");
    assert!(email.contains(&token), "{email}");
    assert!(!email.contains(&secret), "no secret in an email");

    // Alerts in /metrics.
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keygate_alerts{severity=\"high\",status=\"open\"} 1"), "{metrics}");
    assert!(metrics.contains("keygate_anomaly_alerts_raised_total{kind=\"rate_spike\",severity=\"high\"} 1"));

    // A false alarm after all: one click resumes the token and resolves the alert; a token's
    // alert needs tokens:write only (an OAuth client's needs apps:write too: below).
    let tokens_only = kg.root_key("default", &[Permission::TokensWrite]).await.unwrap();
    let resumed =
        kg.client_with(Some(&tokens_only)).post(&format!("/admin/v1/alerts/{id}/resume-token"), &json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK, "{:?}", resumed.body);
    assert_eq!(resumed.body["status"], "resolved");
    kg.sync_index().await.unwrap();
    assert_eq!(call(&kg, &secret, "198.51.100.7").await, 200);
    let again = c.post(&format!("/admin/v1/alerts/{id}/acknowledge"), &json!({})).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "alert_status_conflict"));
    let low = c.get("/admin/v1/alerts?severity=low").await;
    let low_id = low.body["data"][0]["id"].as_str().unwrap().to_owned();
    let ack = c.post(&format!("/admin/v1/alerts/{low_id}/acknowledge"), &json!({})).await;
    assert_eq!(ack.body["status"], "acknowledged");
    assert_eq!(ack.body["acknowledged_by"].as_str().map(|s| s.starts_with("rk_")), Some(true));
    assert_eq!(c.get("/admin/v1/alerts?status=bogus").await.code(), "invalid_query");
    assert_eq!(c.get("/admin/v1/alerts/al_nothere").await.status, StatusCode::NOT_FOUND);

    // The dashboard's Alerts page lists them; the alert's page shows the evidence. (Seventy
    // minutes on, the session is long gone: sign in again.)
    drop(own);
    let mut own = crate::dashboard::Browser::new(&kg);
    let login = own.post("/login", &[("email", "olivia@example.com"), ("password", crate::dashboard::PASSWORD)]).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let page = own.get("/alerts?status=all").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("rate_spike") && page.body.contains(&token), "{}", page.body);
    let page = own.get(&format!("/alerts/{id}")).await;
    assert!(page.body.contains("203.0.113.0/24"), "{}", page.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_secret_presented_after_the_rotation_grace_is_a_high_alert() {
    let (kg, _upstream, _hooks) = start().await;
    let c = kg.client();
    let (token, secret) = c.create_token(&json!({"name": "rotated"})).await;
    let rot = c.post(&format!("/admin/v1/tokens/{token}/rotate"), &json!({"grace_period_seconds": 60})).await;
    assert_eq!(rot.status, StatusCode::CREATED, "{:?}", rot.body);
    let new_secret = rot.body["token"].as_str().unwrap().to_owned();
    kg.sync_index().await.unwrap();
    // Within the grace: the old secret works and nothing is raised.
    assert_eq!(call(&kg, &secret, "198.51.100.7").await, 200);
    assert!(kg.detect_now().await.is_empty());
    // After it: refused as expired, and a high alert on the old token (its successor untouched).
    kg.clock.advance_seconds(120);
    assert_eq!(call(&kg, &secret, "203.0.113.9").await, 401);
    let listed = alerts_until(&kg, &token, |a| !a.is_empty()).await;
    assert_eq!(c.get("/admin/v1/alerts").await.body["data"].as_array().unwrap().len(), 1, "{listed:?}");
    assert_eq!((listed[0]["kind"].as_str(), listed[0]["severity"].as_str()), (Some("old_secret"), Some("high")));
    assert_eq!(listed[0]["token_id"], token.as_str());
    let nets = listed[0]["evidence"]["networks"].as_array().unwrap();
    assert!(nets.iter().any(|n| n[0] == "203.0.113.0/24"), "{nets:?}");
    assert_eq!(listed[0]["action"], Value::Null, "the policy does not apply to an old secret");
    assert_eq!(call(&kg, &new_secret, "198.51.100.7").await, 200);
    // Still known after the index's sweep (kept for 30 days past the grace): a repeat counts an
    // occurrence of the same alert.
    kg.index().sweep_expired(kg.clock.now());
    assert_eq!(call(&kg, &secret, "203.0.113.9").await, 401);
    let listed = alerts_until(&kg, &token, |a| a.first().is_some_and(|x| x["occurrences"] == 2)).await;
    assert_eq!(listed.len(), 1);
}

/// An OAuth client's JWT access tokens are watched as the client: the leak of its secret (tokens
/// obtained and used from a new network at ten times the usual rate) raises alerts on the
/// client, delivered as webhooks and email, and the workspace's suspend policy suspends the
/// client: its JWT is refused at the gateway within seconds, the token endpoint issues it
/// nothing, until the one click on the alert resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_clients_jwts_used_from_a_new_network_at_ten_times_the_rate_alert_on_and_suspend_the_client() {
    let Scene { kg, _upstream, hooks, mail, own, .. } = Scene::start().await;
    let c = kg.client();
    let (app_id, client_id, client_secret) = crate::oauth::client(&kg, json!({"scopes": ["orders:read"]})).await;
    // A fresh access token every five minutes, as a client does before its token expires.
    let (mut jwt, mut got_at) = (String::new(), None::<i64>);
    let mut fresh = async || {
        let now = kg.clock.now().as_millis();
        if got_at.is_none_or(|at| now - at >= 300_000) {
            let form = [("grant_type", "client_credentials")];
            let (status, t) = crate::oauth::token(&kg, &client_id, &client_secret, &form, None).await;
            if status == StatusCode::OK {
                (jwt, got_at) = (t["access_token"].as_str().unwrap().to_owned(), Some(now));
            } else {
                // Suspended by the policy: issued nothing, the client goes on with what it has.
                assert_eq!(t["error"], "unauthorized_client", "{t}");
            }
        }
        jwt.clone()
    };
    let made = steady_use(&kg, &mut fresh).await;
    assert_eq!(c.get("/admin/v1/alerts").await.body["data"], json!([]), "steady use raises nothing");
    let (_, refused_after) = leak(&kg, &mut fresh, made, 30).await;
    assert!(refused_after.is_some_and(|s| s <= 12), "the client's JWT refused after {refused_after:?} s");

    let all = c.get(&format!("/admin/v1/alerts?client_id={client_id}")).await;
    assert_eq!(all.status, StatusCode::OK, "{:?}", all.body);
    let all = all.body["data"].as_array().unwrap().clone();
    let spike = all.iter().find(|a| a["kind"] == "rate_spike").unwrap_or_else(|| panic!("a rate spike: {all:?}"));
    assert_eq!((spike["severity"].as_str(), spike["action"].as_str()), (Some("high"), Some("suspended")));
    assert_eq!((spike["client_id"].as_str(), spike["token_id"].as_null()), (Some(client_id.as_str()), Some(())));
    assert_eq!(spike["app_id"], app_id.as_str());
    assert_eq!(spike["evidence"]["new_networks"][0], "203.0.113.0/24");
    assert!(all.iter().any(|a| a["kind"] == "new_network" && a["key"] == "203.0.113.0/24"), "{all:?}");
    let none = c.get("/admin/v1/alerts?client_id=kgc_someone_else").await;
    assert_eq!(none.body["data"], json!([]));
    let both = c.get(&format!("/admin/v1/alerts?client_id={client_id}&token_id=tok_abcdefghijkl")).await;
    assert_eq!((both.status, &both.body["data"]), (StatusCode::OK, &json!([])), "no alert is about both");
    // ...but only once every parameter is good: a bad cursor, limit or id is refused as alone
    // (the fuzzer's find: a malformed cursor beside both filters was answered 200).
    let both = format!("client_id={client_id}&token_id=tok_abcdefghijkl");
    for (bad, code) in [
        (format!("{both}&cursor=%F4%80%B9%A9%04"), "invalid_cursor"),
        (format!("{both}&limit=0"), "invalid_query"),
        (format!("client_id={client_id}&token_id=nope"), "invalid_query"),
        ("client_id=a%20b&token_id=tok_abcdefghijkl".to_owned(), "invalid_query"),
    ] {
        let r = c.get(&format!("/admin/v1/alerts?{bad}")).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, code), "{bad}: {:?}", r.body);
    }

    // The client is suspended by the policy, the alert its reason; the token endpoint issues it
    // nothing; the suspension is in the audit trail, by the policy.
    let id = spike["id"].as_str().unwrap();
    let client = c.get(&format!("/admin/v1/apps/{app_id}/oauth-client")).await;
    assert!(client.body["suspended_at"].is_string(), "{:?}", client.body);
    let reason = client.str("/suspended_reason");
    assert!(reason.starts_with(&format!("anomaly alert {id} (rate_spike, high)")), "{reason}");
    let form = [("grant_type", "client_credentials")];
    let (status, t) = crate::oauth::token(&kg, &client_id, &client_secret, &form, None).await;
    assert_eq!((status, t["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unauthorized_client")), "{t}");
    let trail = c.get(&format!("/admin/v1/audit-events?target={client_id}&action=oauth_client.suspend")).await;
    assert_eq!(trail.body["data"][0]["actor"], "anomaly-policy", "{}", trail.body);
    assert_eq!(trail.body["data"][0]["after"]["suspended_reason"], reason.as_str());

    // The webhook names the client; the email tells the workspace's owner.
    let got = received(&hooks, 1).await;
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(
        (body["data"]["target"].as_str(), body["data"]["after"]["subject"].as_str()),
        (Some(client_id.as_str()), Some("client"))
    );
    let emails = emails_with(&mail, &client_id).await;
    assert!(emails[0].contains("OAuth client") && emails[0].contains("olivia@example.com"), "{}", emails[0]);
    assert!(!emails[0].contains(&client_secret), "no secret in an email");

    // The dashboard's alert page shows the client, suspended, and points at its app.
    drop(own);
    let mut own = crate::dashboard::Browser::new(&kg);
    let login = own.post("/login", &[("email", "olivia@example.com"), ("password", crate::dashboard::PASSWORD)]).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let page = own.get(&format!("/alerts/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(&client_id) && page.body.contains(&format!("/apps/{app_id}")), "{}", page.body);
    assert!(page.body.contains("Resume the client and resolve") && page.body.contains("OAuth client was suspended"));
    // Resuming a client from its alert needs apps:write, as the client's own resume does: a
    // root key that may resume tokens only is refused and changes nothing.
    let tokens_only = kg.root_key("default", &[Permission::TokensRead, Permission::TokensWrite]).await.unwrap();
    let r = kg.client_with(Some(&tokens_only)).post(&format!("/admin/v1/alerts/{id}/resume-token"), &json!({})).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "missing_permission"), "{:?}", r.body);
    let client = c.get(&format!("/admin/v1/apps/{app_id}/oauth-client")).await;
    assert!(client.body["suspended_at"].is_string(), "{:?}", client.body);
    assert_eq!(c.get(&format!("/admin/v1/alerts/{id}")).await.body["status"], "open");
    // A false alarm: the one click resumes the client and resolves the alert; it gets a token
    // that works again.
    let r = c.post(&format!("/admin/v1/alerts/{id}/resume-token"), &json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("resolved")));
    let client = c.get(&format!("/admin/v1/apps/{app_id}/oauth-client")).await;
    assert_eq!(client.body["suspended_at"], Value::Null, "{:?}", client.body);
    let (status, t) = crate::oauth::token(&kg, &client_id, &client_secret, &form, None).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(call(&kg, t["access_token"].as_str().unwrap(), "198.51.100.7").await, 200);
}

/// A burst of refusals (a token bound to another network, used 20 times from this one) raises a
/// `refusal_burst` alert (medium) on the token: the alert.
async fn refusal_burst(kg: &TestKeygate) -> (String, String, String) {
    let (token, secret) = kg.client().create_token(&json!({"name": "bound", "ip_allowlist": ["10.0.0.0/8"]})).await;
    kg.sync_index().await.unwrap();
    for _ in 0..20 {
        assert_eq!(call(kg, &secret, "198.51.100.7").await, 403);
    }
    kg.write_calls(20).await;
    let alerts = alerts_until(kg, &token, |a| a.iter().any(|x| x["kind"] == "refusal_burst")).await;
    let id = alerts.iter().find(|x| x["kind"] == "refusal_burst").unwrap()["id"].as_str().unwrap().to_owned();
    (token, secret, id)
}

/// The token sent in a query string to the gateway: found exposed (refused with 400).
async fn leak_in_query(kg: &TestKeygate, secret: &str) {
    let r = http().get(format!("{}/orders?api_key={secret}", kg.gateway_url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

async fn until_suspended(kg: &TestKeygate, token: &str) {
    for _ in 0..400 {
        let t = kg.client().get(&format!("/admin/v1/tokens/{token}")).await.body;
        if t["status"] == "suspended" && t["exposed_at"].is_string() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{token} was not suspended as exposed");
}

/// The alert's one click resumes only what the alert's policy suspended: a token stopped by the
/// leak response (found exposed) stays stopped, whether the alert only notified or its policy
/// had suspended the token before the leak was found; the alert's page offers no button then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alerts_resume_never_undoes_a_leak_response() {
    let (kg, _upstream, _hooks) = start().await;
    let c = kg.client();
    let put = async |settings: Value| {
        let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/settings", Some(&settings)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    };
    let refused = async |id: &str, token: &str| {
        let r = c.post(&format!("/admin/v1/alerts/{id}/resume-token"), &json!({})).await;
        assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "suspended_for_another_reason"), "{:?}", r.body);
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("token's page")
                || r.body["error"]["message"].as_str().unwrap().contains("own page")
        );
        assert_eq!(c.get(&format!("/admin/v1/tokens/{token}")).await.body["status"], "suspended");
        assert_eq!(c.get(&format!("/admin/v1/alerts/{id}")).await.body["status"], "open", "left open");
    };
    // The anomaly policy only notifies; the exposure policy suspends.
    put(json!({"exposure_action": "suspend", "anomaly_suspend": null})).await;
    let (notified, notified_secret, notice) = refusal_burst(&kg).await;
    assert_eq!(c.get(&format!("/admin/v1/alerts/{notice}")).await.body["action"], Value::Null);
    leak_in_query(&kg, &notified_secret).await;
    until_suspended(&kg, &notified).await;
    refused(&notice, &notified).await;
    let mut own = owner(&kg).await;
    let page = own.get(&format!("/alerts/{notice}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("Resume the token and resolve"), "{}", page.body);
    assert!(page.body.contains("exposure-policy"), "the page says who suspended it: {}", page.body);

    // The anomaly policy suspends; the token is then found exposed (already suspended).
    put(json!({"anomaly_suspend": "medium"})).await;
    let (suspended, suspended_secret, alert) = refusal_burst(&kg).await;
    assert_eq!(c.get(&format!("/admin/v1/alerts/{alert}")).await.body["action"], "suspended");
    leak_in_query(&kg, &suspended_secret).await;
    until_suspended(&kg, &suspended).await;
    refused(&alert, &suspended).await;

    // Without a leak, the same click resumes the token the alert suspended and resolves it.
    let (clean, clean_secret, alert) = refusal_burst(&kg).await;
    let r = c.post(&format!("/admin/v1/alerts/{alert}/resume-token"), &json!({})).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("resolved")), "{:?}", r.body);
    assert_eq!(c.get(&format!("/admin/v1/tokens/{clean}")).await.body["status"], "active");
    kg.sync_index().await.unwrap();
    assert_eq!(call(&kg, &clean_secret, "10.1.2.3").await, 200);
}

/// One turn of the detectors on each node, once each node's calls are counted.
async fn both_detect(nodes: [&TestKeygate; 2], made: [u64; 2]) -> Vec<keygate_core::anomaly::Alert> {
    let mut opened = Vec::new();
    for (n, made) in nodes.iter().zip(made) {
        n.write_calls(made).await;
    }
    // Twice round: what the node without the lease ships, the holder takes at its next turn.
    for _ in 0..2 {
        for n in nodes {
            opened.extend(n.detect_now().await);
        }
    }
    opened
}

/// Two nodes on one PostgreSQL, a token's traffic spread over both: the detectors run on the
/// node holding the detector lease over both nodes' activity, so nine networks within ten
/// minutes (its own and eight new ones, four seen by each node: five on either alone, under the
/// bar of eight) are one `many_networks` alert whose evidence names all of them; the other node
/// ships what it counted.
/// When the holder stops, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_judge_a_tokens_traffic_together() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let upstream = RecordingUpstream::start().await.unwrap();
    let opts = Options {
        database_url: Some(db.url.clone()),
        routes: vec![route("orders", "/orders", &upstream.url())],
        gateway: Some(keygate::config::GatewayConfig {
            trusted_proxies: vec!["127.0.0.1".into()],
            ..Default::default()
        }),
        ..Options::default()
    };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (token, secret) = a.client().create_token(&json!({"name": "spread"})).await;
    a.sync_index().await.unwrap();
    b.sync_index().await.unwrap();
    let nodes = [&a, &b];
    // Seventy minutes of steady use, 12 calls a minute from one network, the nodes taking turns.
    let mut made = [0u64; 2];
    for i in 0..70 * 12 {
        for n in nodes {
            n.clock.advance_seconds(5);
        }
        assert_eq!(call(nodes[i % 2], &secret, "198.51.100.7").await, 200);
        made[i % 2] += 1;
        if a.clock.now().as_millis() % 60_000 < 5_000 {
            both_detect(nodes, made).await;
        }
    }
    assert!(both_detect(nodes, made).await.is_empty(), "steady use raises nothing");

    // The token shared out: used from eight new networks at once, four through each node. (The
    // nodes' own detector tasks take turns too: the alerts are read from the store.)
    for n in nodes {
        n.clock.advance_seconds(15);
    }
    for net in 1..=8 {
        let k = net % 2;
        assert_eq!(call(nodes[k], &secret, &format!("203.0.{net}.9")).await, 200);
        made[k] += 1;
    }
    both_detect(nodes, made).await;
    let listed = b.client().get(&format!("/admin/v1/alerts?token_id={token}")).await.body["data"].clone();
    let many: Vec<_> = listed.as_array().unwrap().iter().filter(|al| al["kind"] == "many_networks").collect();
    assert_eq!(many.len(), 1, "one alert across the cluster: {listed}");
    let nets = many[0]["evidence"]["networks"].as_array().unwrap();
    for net in (1..=8).map(|n| format!("203.0.{n}.0/24")).chain(["198.51.100.0/24".to_owned()]) {
        assert!(nets.iter().any(|n| *n == net), "{net} in {nets:?}");
    }

    // One node judges; when it stops (letting go of the lease), the other takes over.
    let judging = async |n: &TestKeygate| {
        let text = reqwest::get(format!("{}/metrics", n.url())).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("keygate_anomaly_detector_judging ")).map(str::to_owned)
    };
    both_detect(nodes, made).await;
    let holders = [judging(&a).await, judging(&b).await];
    assert_eq!(holders.iter().filter(|h| h.as_deref() == Some("1")).count(), 1, "{holders:?}");
    let (stays, goes) = if holders[0].as_deref() == Some("1") { (b, a) } else { (a, b) };
    goes.stop().await;
    stays.detect_now().await;
    assert_eq!(judging(&stays).await.as_deref(), Some("1"));
}
