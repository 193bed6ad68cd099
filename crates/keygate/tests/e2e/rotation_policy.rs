//! The rotation policy (issue 15): tokens to be replaced within a number of days, a reminder
//! before, flagged or suspended after; on a manual clock, through the dashboard and the API.

use keygate_testkit::{StatusCode, TestKeygate};
use serde_json::json;

use crate::dashboard::owner;

async fn events(kg: &TestKeygate, id: &str, action: &str) -> usize {
    let a = kg.client().get(&format!("/admin/v1/audit-events?target={id}&action={action}")).await;
    a.body["data"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_past_their_rotation_age_are_reminded_then_flagged_or_suspended() {
    let kg = TestKeygate::start().await.unwrap();
    let mut first = owner(&kg).await;
    let c = kg.client();
    let p = first.submit("/settings", "/settings", &[("max_token_age_days", "30")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let (old, _) = c.create_token(&json!({"name": "old"})).await;
    let (short, _) = c.create_token(&json!({"name": "short-lived", "expires_in": 20 * 86_400})).await;
    let (rotated, _) = c.create_token(&json!({"name": "rotated"})).await;

    // Day 24: within the 7 days before the age runs out: a reminder, recorded once.
    kg.clock.advance_seconds(24 * 86_400);
    let rot =
        c.post(&format!("/admin/v1/tokens/{rotated}/rotate"), &json!({"grace_period_seconds": 30 * 86_400})).await;
    assert_eq!(rot.status, StatusCode::CREATED, "{:?}", rot.body);
    kg.cluster().housekeeping().await;
    kg.cluster().housekeeping().await; // as another node would: nothing twice
    assert_eq!(events(&kg, &old, "token.rotation_due").await, 1);
    assert_eq!(events(&kg, &short, "token.rotation_due").await, 0, "it expires before it is due");
    assert_eq!(events(&kg, &rotated, "token.rotation_due").await, 0, "it was replaced already");

    // Day 31: overdue; the policy only flags it (it keeps working), the dashboard shows it.
    kg.clock.advance_seconds(7 * 86_400);
    kg.cluster().housekeeping().await;
    assert_eq!(events(&kg, &old, "token.rotation_overdue").await, 1);
    assert_eq!(c.get(&format!("/admin/v1/tokens/{old}")).await.body["status"], "active");
    // A month on, the session is long gone: sign in again.
    let mut own = crate::dashboard::Browser::new(&kg);
    let login = own.post("/login", &[("email", "olivia@example.com"), ("password", crate::dashboard::PASSWORD)]).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER, "{}", login.body);
    let page = own.get("/tokens").await;
    assert!(page.body.contains("rotation overdue"), "{}", page.body);
    let trail = c.get(&format!("/admin/v1/audit-events?target={old}&action=token.rotation_overdue")).await;
    assert_eq!(trail.body["data"][0]["actor"], "rotation-policy");
    assert_eq!(trail.body["data"][0]["after"]["max_token_age_days"], 30);

    let bad = own.submit("/settings", "/settings", &[("max_token_age_days", "0")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // With suspension on, a token that goes overdue is suspended (resuming is one call).
    let p = own.submit("/settings", "/settings", &[("max_token_age_days", "30"), ("suspend_unrotated", "on")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let (late, _) = c.create_token(&json!({"name": "late"})).await;
    kg.clock.advance_seconds(31 * 86_400);
    kg.cluster().housekeeping().await;
    assert_eq!(c.get(&format!("/admin/v1/tokens/{late}")).await.body["status"], "suspended");
    let suspended = c.get(&format!("/admin/v1/audit-events?target={late}&action=token.suspend")).await;
    assert_eq!(suspended.body["data"][0]["actor"], "rotation-policy");
    // The old token was noticed as overdue once already: it is not suspended after the fact.
    assert_eq!(c.get(&format!("/admin/v1/tokens/{old}")).await.body["status"], "active");

    kg.stop().await;
}
