//! Webhooks (issue 15) through the admin API, received by a real HTTP server: signed events from
//! the durable outbox, a delivery that survives a restart, one delivery per event with two nodes
//! on one PostgreSQL, and the address guard.

use std::time::Duration;

use base64::Engine as _;
use keygate::config::WebhooksConfig;
use keygate_testkit::recording::{Recorded, RecordingUpstream};
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::{Value, json};

fn allow_private() -> Option<WebhooksConfig> {
    Some(WebhooksConfig { allow_private: true, ..WebhooksConfig::default() })
}

/// Waits (polling, bounded) until the receiver holds at least `n` requests.
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

fn header(r: &Recorded, name: &str) -> String {
    r.headers(name).pop().unwrap_or_default()
}

/// Checks a request's Standard Webhooks signature under `secret` and returns its JSON body.
fn verified(r: &Recorded, secret: &str) -> Value {
    let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let ts: i64 = header(r, "webhook-timestamp").parse().unwrap();
    let want = keygate_core::notify::sign(&key, &header(r, "webhook-id"), ts, &r.body);
    assert_eq!(header(r, "webhook-signature"), want, "signature");
    assert_eq!(header(r, "content-type"), "application/json");
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_endpoint_signed_and_a_pending_delivery_survives_a_restart() {
    let rx = RecordingUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options { data_dir: Some(dir.path().join("data")), webhooks: allow_private(), ..Options::default() };
    let kg = TestKeygate::start_with(opts()).await.unwrap();
    let c = kg.client();
    let created = c
        .post("/admin/v1/webhooks", &json!({"url": format!("{}/in", rx.url()), "event_types": ["token.revoked"]}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let id = created.body["id"].as_str().unwrap().to_owned();
    let listed = c.get("/admin/v1/webhooks").await;
    assert!(!listed.body.to_string().contains(&secret), "the secret is shown once");
    let types = c.get("/admin/v1/webhook-event-types").await;
    assert!(types.body["data"].as_array().unwrap().iter().any(|t| t["name"] == "token.exposed"));

    let (token, _) = c.create_token(&json!({"name": "gone"})).await;
    assert_eq!(c.post(&format!("/admin/v1/tokens/{token}/revoke"), &json!({})).await.status, StatusCode::OK);
    let got = received(&rx, 1).await;
    let body = verified(&got[0], &secret);
    assert_eq!((body["type"].as_str(), body["data"]["target"].as_str()), (Some("token.revoked"), Some(token.as_str())));
    assert!(got[0].request_line().starts_with("POST /in "));

    // The receiver fails; the delivery waits for its retry, through a restart.
    rx.clear();
    rx.set_status(503);
    let (token2, _) = c.create_token(&json!({"name": "gone too"})).await;
    c.post(&format!("/admin/v1/tokens/{token2}/revoke"), &json!({})).await;
    let first = received(&rx, 1).await;
    let deliveries = c.get(&format!("/admin/v1/webhooks/{id}/deliveries")).await;
    let pending = deliveries.body["data"][0].clone();
    assert_eq!(pending["event_type"], "token.revoked");
    kg.stop().await;
    rx.set_status(204);
    let kg = TestKeygate::start_with(opts()).await.unwrap();
    kg.clock.advance_seconds(6);
    let both = received(&rx, 2).await;
    assert_eq!(header(&both[1], "webhook-id"), header(&first[0], "webhook-id"), "the same message");
    assert_eq!(verified(&both[1], &secret)["data"]["target"], token2.as_str());
    let c = kg.client();
    let mut detail = Value::Null;
    for _ in 0..100 {
        detail = c.get(&format!("/admin/v1/webhook-deliveries/{}", pending["id"])).await.body;
        if detail["state"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses: Vec<Value> = detail["attempts_log"].as_array().unwrap().iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, [json!(503), json!(204)], "{detail}");
    assert_eq!(detail["payload"]["data"]["target"], token2.as_str());

    // A read-only key reads, and cannot change.
    let reader = kg.root_key("default", &[keygate_core::model::Permission::WebhooksRead]).await.unwrap();
    let r = kg.client_with(Some(&reader));
    assert_eq!(r.get("/admin/v1/webhooks").await.status, StatusCode::OK);
    let denied = r.post(&format!("/admin/v1/webhooks/{id}/test"), &json!({})).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(c.delete(&format!("/admin/v1/webhooks/{id}")).await.status, StatusCode::NO_CONTENT);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    for url in [
        "http://127.0.0.1:9/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest",
        "http://localhost/x",
        // The metadata address through the local-use NAT64 prefix (RFC 8215).
        "http://[64:ff9b:1::a9fe:a9fe]/latest",
    ] {
        let r = c.post("/admin/v1/webhooks", &json!({"url": url})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(r.body["error"]["code"], "webhook_url_refused", "{url}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains("allow_private"), "says what to do");
    }
    let bad = c.post("/admin/v1/webhooks", &json!({"url": "https://example.com/x", "event_types": ["nope"]})).await;
    assert_eq!(bad.body["error"]["code"], "invalid_event_type");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_each_event_once() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let opts = Options { database_url: Some(db.url.clone()), webhooks: allow_private(), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let rx = RecordingUpstream::start().await.unwrap();
    let created =
        a.client().post("/admin/v1/webhooks", &json!({"url": rx.url(), "event_types": ["token.suspended"]})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let mut tokens = Vec::new();
    for i in 0..12 {
        let node = if i % 2 == 0 { &a } else { &b };
        let (t, _) = node.client().create_token(&json!({"name": format!("t{i}")})).await;
        assert_eq!(
            node.client().post(&format!("/admin/v1/tokens/{t}/suspend"), &json!({})).await.status,
            StatusCode::OK
        );
        tokens.push(t);
    }
    received(&rx, 12).await;
    // Once every delivery is recorded as delivered, no node can send one again.
    let hook = created.body["id"].as_str().unwrap().to_owned();
    for _ in 0..200 {
        let page = a.client().get(&format!("/admin/v1/webhooks/{hook}/deliveries")).await;
        let list = page.body["data"].as_array().cloned().unwrap_or_default();
        if list.len() == 12 && list.iter().all(|d| d["state"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = rx.requests();
    let mut ids: Vec<String> = got.iter().map(|r| header(r, "webhook-id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), got.len()), (12, 12), "each event once");
    let mut targets: Vec<String> =
        got.iter().map(|r| verified(r, &secret)["data"]["target"].as_str().unwrap().to_owned()).collect();
    targets.sort();
    tokens.sort();
    assert_eq!(targets, tokens);
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_and_admins_manage_webhooks_in_the_dashboard() {
    let rx = RecordingUpstream::start().await.unwrap();
    let kg = TestKeygate::start_with(Options { webhooks: allow_private(), ..Options::default() }).await.unwrap();
    let mut own = crate::dashboard::owner(&kg).await;
    let url = format!("{}/hooks", rx.url());
    let p =
        own.submit("/settings/webhooks", "/settings/webhooks", &[("url", &url), ("event_type", "token.revoked")]).await;
    assert_eq!(p.status, StatusCode::CREATED, "{}", p.body);
    let secret = p.between("<code id=\"webhook-secret\">", "<");
    assert!(secret.starts_with("whsec_"));
    let list = own.get("/settings/webhooks").await;
    assert!(list.body.contains(&url) && !list.body.contains(&secret), "listed, secret never again");
    let id = list.between("<tr id=\"", "\"");

    // A test event: delivered, signed, shown in the log with its attempt and body.
    let page = format!("/settings/webhooks/{id}");
    let t = own.submit(&page, &format!("{page}/test"), &[]).await;
    assert_eq!(t.status, StatusCode::SEE_OTHER, "{}", t.body);
    let got = received(&rx, 1).await;
    assert_eq!(verified(&got[0], &secret)["type"], "webhook.test");
    let mut log = own.get(&page).await;
    for _ in 0..100 {
        if log.body.contains(">delivered<") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        log = own.get(&page).await;
    }
    assert!(log.body.contains("webhook.test") && log.body.contains(">delivered<"), "{}", log.body);
    let delivery = log.between("<tr id=\"delivery-", "\"");
    let detail = own.get(&format!("{page}/deliveries/{delivery}")).await;
    assert_eq!(detail.status, StatusCode::OK);
    assert!(detail.body.contains("200") && detail.body.contains("&quot;webhook.test&quot;"), "{}", detail.body);
    let again = own.submit(&page, &format!("{page}/deliveries/{delivery}/redeliver"), &[]).await;
    assert_eq!(again.status, StatusCode::SEE_OTHER);
    let both = received(&rx, 2).await;
    assert_eq!(header(&both[0], "webhook-id"), header(&both[1], "webhook-id"));

    // Disabled, nothing is sent; enabled again; deleted.
    assert_eq!(own.submit(&page, &format!("{page}/disable"), &[]).await.status, StatusCode::SEE_OTHER);
    assert!(own.get(&page).await.body.contains("disabled by usr_"));
    assert_eq!(own.submit(&page, &format!("{page}/enable"), &[]).await.status, StatusCode::SEE_OTHER);
    let rotated = own.submit(&page, &format!("{page}/rotate"), &[("overlap", "86400")]).await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    let new_secret = rotated.between("<code id=\"webhook-secret\">", "<");
    assert_ne!(new_secret, secret);
    assert!(own.get(&page).await.body.contains("the previous secret signs beside the new one until"));
    // During the overlap a message carries both signatures: the new secret's, then the old one's.
    let before = rx.requests().len();
    assert_eq!(own.submit(&page, &format!("{page}/test"), &[]).await.status, StatusCode::SEE_OTHER);
    let sent = received(&rx, before + 1).await.pop().unwrap();
    let ts: i64 = header(&sent, "webhook-timestamp").parse().unwrap();
    let sig = |s: &str| {
        let key = base64::engine::general_purpose::STANDARD.decode(s.strip_prefix("whsec_").unwrap()).unwrap();
        keygate_core::notify::sign(&key, &header(&sent, "webhook-id"), ts, &sent.body)
    };
    assert_eq!(header(&sent, "webhook-signature"), format!("{} {}", sig(&new_secret), sig(&secret)));

    // A developer may not; a bad URL is explained on the form.
    let mut dev = crate::dashboard::member(&kg, &mut own, "dev@example.com", "developer").await;
    assert_eq!(dev.get("/settings/webhooks").await.status, StatusCode::FORBIDDEN);
    let bad = own.submit("/settings/webhooks", "/settings/webhooks", &[("url", "ftp://x")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("http:// or https://"), "{}", bad.body);
    assert_eq!(own.submit(&page, &format!("{page}/delete"), &[]).await.status, StatusCode::SEE_OTHER);
    assert!(!own.get("/settings/webhooks").await.body.contains(&url));
    kg.stop().await;
}

/// The events nobody makes: a token expiring soon, expired, at 80% and 100% of its quota; each
/// sent once, however many times (and on however many nodes) the minute's sweep runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_expired_and_quota_threshold_events_are_sent_once_each() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let rx = RecordingUpstream::start().await.unwrap();
    let kg = TestKeygate::start_with(Options {
        webhooks: allow_private(),
        routes: vec![keygate_testkit::route("plain", "/plain", &up.url())],
        ..Options::default()
    })
    .await
    .unwrap();
    let c = kg.client();
    let types = ["token.expiring", "token.expired", "quota.threshold"];
    let created = c.post("/admin/v1/webhooks", &json!({"url": rx.url(), "event_types": types})).await;
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let (soon, _) = c.create_token(&json!({"name": "soon", "expires_in": 3 * 86_400})).await;
    let (_later, _) = c.create_token(&json!({"name": "later", "expires_in": 30 * 86_400})).await;
    let (metered, secret_token) =
        c.create_token(&json!({"name": "metered", "quota": {"requests": 5, "period": "total"}})).await;
    kg.sync_index().await.unwrap();

    kg.cluster().sweep_notices().await;
    kg.cluster().sweep_notices().await;
    let got = received(&rx, 1).await;
    let body = verified(&got[0], &secret);
    assert_eq!((body["type"].as_str(), body["data"]["target"].as_str()), (Some("token.expiring"), Some(soon.as_str())));
    assert!(body["data"]["after"]["expires_at"].is_string());

    let call = async || {
        let r = reqwest::Client::new()
            .get(format!("{}/plain/x", kg.gateway_url()))
            .bearer_auth(&secret_token)
            .send()
            .await
            .unwrap();
        r.status()
    };
    for _ in 0..4 {
        assert_eq!(call().await, StatusCode::OK);
    }
    kg.flush_usage().await;
    kg.cluster().sweep_notices().await;
    let got = received(&rx, 2).await;
    let body = verified(&got[1], &secret);
    assert_eq!(body["type"], "quota.threshold");
    assert_eq!(body["data"]["target"], metered.as_str());
    assert_eq!(
        (body["data"]["after"]["threshold_percent"].as_u64(), body["data"]["after"]["used"].as_u64()),
        (Some(80), Some(4))
    );
    assert_eq!(call().await, StatusCode::OK);
    kg.flush_usage().await;
    kg.cluster().sweep_notices().await;
    kg.cluster().sweep_notices().await;
    let got = received(&rx, 3).await;
    assert_eq!(verified(&got[2], &secret)["data"]["after"]["threshold_percent"], 100);

    kg.clock.advance_seconds(4 * 86_400);
    kg.cluster().sweep_notices().await;
    let got = received(&rx, 4).await;
    let body = verified(&got[3], &secret);
    assert_eq!((body["type"].as_str(), body["data"]["target"].as_str()), (Some("token.expired"), Some(soon.as_str())));
    kg.cluster().sweep_notices().await;
    // Every delivery recorded (nothing pending): nothing more can be sent.
    let hook = created.body["id"].as_str().unwrap();
    for _ in 0..100 {
        let page = c.get(&format!("/admin/v1/webhooks/{hook}/deliveries")).await;
        if page.body["data"].as_array().unwrap().iter().all(|d| d["state"] == "delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let types: Vec<String> =
        rx.requests().iter().map(|r| verified(r, &secret)["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(types, ["token.expiring", "quota.threshold", "quota.threshold", "token.expired"], "each once");
    kg.stop().await;
}
