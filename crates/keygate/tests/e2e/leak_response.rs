//! Leak response (issue 15): a workspace's exposure policy, set in the dashboard, applied to a
//! token found exposed — here, sent in a query string to the gateway.

use std::time::Duration;

use keygate_testkit::{StatusCode, TestKeygate};
use serde_json::json;

use crate::dashboard::owner;

async fn until_state(kg: &TestKeygate, id: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = kg.client().get(&format!("/admin/v1/tokens/{id}")).await;
        if t.body["status"] == want && t.body["exposed_at"].is_string() {
            return t.body;
        }
        assert!(std::time::Instant::now() < deadline, "the token never became {want}: {}", t.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn leak(kg: &TestKeygate, token: &str) {
    let r = reqwest::get(format!("{}/demo/echo?api_key={token}", kg.gateway_url())).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_found_exposed_is_suspended_or_revoked_as_the_workspace_says() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let c = kg.client();

    // The default: marked exposed, still working.
    let (kept, kept_secret) = c.create_token(&json!({"name": "notify"})).await;
    leak(&kg, &kept_secret).await;
    until_state(&kg, &kept, "active").await;

    let set = async |own: &mut crate::dashboard::Browser, action: &str| {
        let p = own.submit("/settings", "/settings", &[("exposure_action", action)]).await;
        assert_eq!(p.location.as_deref(), Some("/settings?msg=settings_saved"), "{}", p.body);
        assert!(own.get("/settings").await.body.contains(&format!("value=\"{action}\" selected")));
    };
    set(&mut own, "suspend").await;
    let (sus, sus_secret) = c.create_token(&json!({"name": "suspend"})).await;
    leak(&kg, &sus_secret).await;
    until_state(&kg, &sus, "suspended").await;
    let trail = c.get(&format!("/admin/v1/audit-events?target={sus}&action=token.suspend")).await;
    assert_eq!(trail.body["data"][0]["actor"], "exposure-policy", "{}", trail.body);
    let r = reqwest::Client::new().get(format!("{}/demo/echo", kg.gateway_url())).bearer_auth(&sus_secret).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::UNAUTHORIZED, "suspended at the gateway too");
    // One click (one call) brings it back.
    assert_eq!(c.post(&format!("/admin/v1/tokens/{sus}/resume"), &json!({})).await.status, StatusCode::OK);

    set(&mut own, "revoke").await;
    let (rev, rev_secret) = c.create_token(&json!({"name": "revoke"})).await;
    leak(&kg, &rev_secret).await;
    let body = until_state(&kg, &rev, "revoked").await;
    let reason = body["revoke_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("exposed: gateway: query string of GET /demo/echo"), "{body}");
    assert!(!reason.contains(&rev_secret), "never the secret: {reason}");

    // An unknown value is refused with a message, and changes nothing.
    let p = own.submit("/settings", "/settings", &[("exposure_action", "explode")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(own.get("/settings").await.body.contains("value=\"revoke\" selected"));
    kg.stop().await;
}
