//! Subscriptions with approval (issue 17), from outside the process: an API whose access is
//! `approval` admits only subscribed apps' tokens; a subscription made by a key that may not
//! approve waits; approving it opens the API to the app's tokens at once; the subscription's
//! plan limits the app's calls to the API, shared by its tokens; rejecting and cancelling close
//! it again; every step is audited and raises its event.

use keygate_core::model::Permission;
use keygate_testkit::{MockUpstream, TestKeygate};
use serde_json::{Value, json};

/// `GET path` on the gateway with `token`: the status, the `RateLimit-Policy` field and the body.
async fn call(kg: &TestKeygate, path: &str, token: &str) -> (u16, String, Value) {
    let r = reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    let policy = r
        .headers()
        .get_all("ratelimit-policy")
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join(", ");
    (status, policy, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_needs_approval_admits_only_subscribed_apps() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let owner = kg.client();
    // A developer's key: it may manage apps, not approve subscriptions.
    let dev_key = kg.root_key("default", &[Permission::AppsRead, Permission::AppsWrite]).await.unwrap();
    let dev = kg.client_with(Some(&dev_key));

    // A plan whose limits a subscription lends: three requests an hour.
    let plan = owner
        .post("/admin/v1/plans", &json!({"name": "metered", "rate_limit": {"requests": 3, "per_seconds": 3600}}))
        .await;
    assert_eq!(plan.status.as_u16(), 201, "{:?}", plan.body);
    let plan_id = plan.str("/id");
    let api = owner.post("/admin/v1/apis", &json!({"name": "orders", "versions": ["v1"], "access": "approval"})).await;
    assert_eq!((api.status.as_u16(), api.body["access"].as_str()), (201, Some("approval")), "{:?}", api.body);
    let api_id = api.str("/id");
    for path in [format!("/admin/v1/apis/{api_id}"), format!("/admin/v1/apis/{api_id}/versions/v1")] {
        assert_eq!(owner.patch(&path, &json!({"state": "published"})).await.status.as_u16(), 200);
    }
    let route =
        json!({"id": "orders-v1", "path": "/v1/orders", "upstream": up.url(), "api": "orders", "version": "v1"});
    assert_eq!(owner.post("/admin/v1/routes", &route).await.status.as_u16(), 201);

    let app = dev.post("/admin/v1/apps", &json!({"name": "shop"})).await.str("/id");
    let other = dev.post("/admin/v1/apps", &json!({"name": "other"})).await.str("/id");
    let (_, a) = owner.create_token(&json!({"name": "a", "app_id": app})).await;
    let (_, b) = owner.create_token(&json!({"name": "b", "app_id": app})).await;
    let (_, o) = owner.create_token(&json!({"name": "o", "app_id": other})).await;
    kg.sync_index().await.unwrap();

    // Not subscribed: refused after authentication, with a code and a way out.
    let (status, _, body) = call(&kg, "/v1/orders/1", &a).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("subscription_required")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("subscribe"), "{body}");

    // The developer subscribes under the plan: it waits for approval (the API says so, and the
    // key may not approve). Until then the app's tokens are still refused.
    let sub = dev
        .post(
            &format!("/admin/v1/apps/{app}/subscriptions"),
            &json!({"api": "orders", "version": "v1", "plan_id": plan_id}),
        )
        .await;
    assert_eq!((sub.status.as_u16(), sub.body["status"].as_str()), (201, Some("pending")), "{:?}", sub.body);
    let sub_id = sub.str("/id");
    assert!(sub_id.starts_with("sub_"), "{sub_id}");
    assert_eq!(call(&kg, "/v1/orders/1", &a).await.0, 403);
    let twice =
        dev.post(&format!("/admin/v1/apps/{app}/subscriptions"), &json!({"api": api_id, "version": "v1"})).await;
    assert_eq!((twice.status.as_u16(), twice.code()), (409, "subscription_exists"));
    let pending = owner.get("/admin/v1/subscriptions?status=pending").await;
    assert_eq!(pending.body["data"].as_array().unwrap().len(), 1, "{:?}", pending.body);
    // Only a key that may approve decides.
    let denied = dev.post(&format!("/admin/v1/subscriptions/{sub_id}/approve"), &json!({})).await;
    assert_eq!(denied.status.as_u16(), 403, "{:?}", denied.body);

    // Approved: the app's tokens pass at once, and share the plan's three an hour.
    let ok = owner.post(&format!("/admin/v1/subscriptions/{sub_id}/approve"), &json!({})).await;
    assert_eq!((ok.status.as_u16(), ok.body["status"].as_str()), (200, Some("active")), "{:?}", ok.body);
    let again = owner.post(&format!("/admin/v1/subscriptions/{sub_id}/approve"), &json!({})).await;
    assert_eq!((again.status.as_u16(), again.code()), (409, "invalid_subscription_transition"));
    let mut statuses = Vec::new();
    for t in [&a, &b, &a, &b] {
        let (status, policy, body) = call(&kg, "/v1/orders/1", t).await;
        assert_eq!(policy, "\"subscription\";q=3;w=3600", "the subscription's limit is shown");
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 429], "three in all across the app's tokens");
    // Another app is still refused.
    assert_eq!(call(&kg, "/v1/orders/1", &o).await.2["error"]["code"], "subscription_required");

    // The other app asks and is rejected, with a reason.
    let asked = dev.post(&format!("/admin/v1/apps/{other}/subscriptions"), &json!({"api": "orders"})).await;
    assert_eq!(asked.body["status"], "pending", "{:?}", asked.body);
    let no = owner
        .post(&format!("/admin/v1/subscriptions/{}/reject", asked.str("/id")), &json!({"reason": "trial ended"}))
        .await;
    assert_eq!((no.body["status"].as_str(), no.body["reason"].as_str()), (Some("rejected"), Some("trial ended")));
    assert_eq!(call(&kg, "/v1/orders/1", &o).await.0, 403);

    // Cancelled: the first app's tokens are refused again.
    let ended = dev.post(&format!("/admin/v1/subscriptions/{sub_id}/cancel"), &json!({})).await;
    assert_eq!(ended.body["status"], "cancelled", "{:?}", ended.body);
    assert_eq!(call(&kg, "/v1/orders/1", &b).await.2["error"]["code"], "subscription_required");
    let listed = owner.get(&format!("/admin/v1/subscriptions?app_id={app}")).await;
    assert_eq!(listed.body["data"][0]["status"], "cancelled");

    // Every step is in the audit trail.
    let audit = owner.get("/admin/v1/audit-events?limit=200").await;
    let actions: Vec<&str> =
        audit.body["data"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for a in ["subscription.requested", "subscription.approve", "subscription.reject", "subscription.cancel"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    kg.stop().await;
}

#[tokio::test]
async fn subscriptions_refuse_what_cannot_be_subscribed_to() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let owner = kg.client();
    let dev_key = kg.root_key("default", &[Permission::AppsRead, Permission::AppsWrite]).await.unwrap();
    let dev = kg.client_with(Some(&dev_key));
    let app = dev.post("/admin/v1/apps", &json!({"name": "shop"})).await.str("/id");
    let plan = owner.post("/admin/v1/plans", &json!({"name": "gold"})).await.str("/id");
    let api = owner.post("/admin/v1/apis", &json!({"name": "orders", "access": "subscription"})).await.str("/id");
    let sub = |body: Value| {
        let dev = &dev;
        let app = &app;
        async move { dev.post(&format!("/admin/v1/apps/{app}/subscriptions"), &body).await }
    };

    // A draft is not in the portal: a developer cannot subscribe to it yet.
    let r = sub(json!({"api": "orders"})).await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "api_not_published"));
    assert_eq!(
        owner.patch(&format!("/admin/v1/apis/{api}"), &json!({"state": "published"})).await.status.as_u16(),
        200
    );
    // Unknown API, version, plan; another plan than the app's without the right to approve.
    for (body, status, code) in [
        (json!({"api": "nothing"}), 404, "api_not_found"),
        (json!({"api": "orders", "version": "v9"}), 404, "api_version_not_found"),
        (json!({"api": "orders", "plan_id": "plan_00000000000000000000"}), 404, "plan_not_found"),
        (json!({"api": "orders", "plan_id": plan}), 403, "plan_needs_approval"),
        (json!({"api": "orders", "extra": 1}), 400, "invalid_body"),
    ] {
        let r = sub(body.clone()).await;
        assert_eq!((r.status.as_u16(), r.code()), (status, code), "{body}: {:?}", r.body);
    }
    // On an API that does not need approval, the subscription is active at once.
    let r = sub(json!({"api": api})).await;
    assert_eq!((r.status.as_u16(), r.body["status"].as_str()), (201, Some("active")), "{:?}", r.body);
    let reason =
        owner.post(&format!("/admin/v1/subscriptions/{}/cancel", r.str("/id")), &json!({"reason": "a\nb"})).await;
    assert_eq!((reason.status.as_u16(), reason.code()), (400, "invalid_reason"));
    // A retired API takes no new subscriptions; deleting the API (no route names it) takes its
    // subscriptions with it.
    assert_eq!(
        owner.patch(&format!("/admin/v1/apis/{api}"), &json!({"state": "deprecated"})).await.status.as_u16(),
        200
    );
    assert_eq!(owner.patch(&format!("/admin/v1/apis/{api}"), &json!({"state": "retired"})).await.status.as_u16(), 200);
    let other = dev.post("/admin/v1/apps", &json!({"name": "other"})).await.str("/id");
    let r = dev.post(&format!("/admin/v1/apps/{other}/subscriptions"), &json!({"api": "orders"})).await;
    assert_eq!((r.status.as_u16(), r.code()), (409, "api_retired"));
    let gone = owner.delete(&format!("/admin/v1/apis/{api}")).await;
    assert_eq!(gone.status.as_u16(), 204, "{:?}", gone.body);
    assert_eq!(owner.get(&format!("/admin/v1/subscriptions?app_id={app}")).await.body["data"], json!([]));
    let _ = up;
    kg.stop().await;
}

/// The dashboard: a developer subscribes an app from its page (pending on an API that wants
/// approval), an admin sees it on the APIs page and approves it, the developer cancels it; an
/// admin changes an API's access there; a developer cannot decide.
#[tokio::test]
async fn subscriptions_in_the_dashboard() {
    use crate::dashboard::{create_app, member, owner};
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "admin@example.com", "admin").await;
    let mut dev = member(&kg, &mut own, "dev@example.com", "developer").await;
    let api = c.post("/admin/v1/apis", &json!({"name": "orders", "access": "approval"})).await.str("/id");
    c.patch(&format!("/admin/v1/apis/{api}"), &json!({"state": "published"})).await;
    let up = MockUpstream::start().await.unwrap();
    let route = json!({"id": "orders", "path": "/orders", "upstream": up.url(), "api": "orders"});
    assert_eq!(c.post("/admin/v1/routes", &route).await.status.as_u16(), 201);
    let app = create_app(&mut dev, "shop").await;
    let portal = dev.get("/portal").await;
    assert!(portal.body.contains("Open to subscribed apps only"), "the portal says so: {}", portal.body);

    let page = dev.get(&format!("/apps/{app}")).await;
    assert!(page.body.contains("API subscriptions") && page.body.contains("orders (approval)"), "{}", page.body);
    let p = dev.submit(&format!("/apps/{app}"), &format!("/apps/{app}/subscriptions"), &[("api", "orders")]).await;
    assert_eq!(p.location.as_deref(), Some(format!("/apps/{app}?msg=subscription_requested").as_str()), "{}", p.body);
    let sub = c.get(&format!("/admin/v1/subscriptions?app_id={app}")).await.body["data"][0].clone();
    assert_eq!(
        (sub["status"].as_str(), sub["requested_by"].as_str().unwrap().starts_with("usr_")),
        (Some("pending"), true)
    );
    let id = sub["id"].as_str().unwrap().to_owned();
    // Twice: the page says why, and keeps the form.
    let p = dev.submit(&format!("/apps/{app}"), &format!("/apps/{app}/subscriptions"), &[("api", "orders")]).await;
    assert!(p.body.contains("already has a pending or active subscription"), "{}", p.body);

    // A developer cannot decide; an admin sees it waiting and approves it.
    let p = dev.submit(&format!("/apps/{app}"), &format!("/subscriptions/{id}/approve"), &[]).await;
    assert_eq!(p.status.as_u16(), 403);
    let page = admin.get("/apis").await;
    assert!(page.body.contains(&format!("subscription-{id}")), "{}", page.body);
    let p = admin.submit("/apis", &format!("/subscriptions/{id}/approve"), &[]).await;
    assert_eq!(p.location.as_deref(), Some("/apis?msg=subscription_approved"), "{}", p.body);
    assert_eq!(c.get(&format!("/admin/v1/subscriptions/{id}")).await.body["status"], "active");

    // The developer cancels it from the app's page.
    let p = dev.submit(&format!("/apps/{app}"), &format!("/subscriptions/{id}/cancel"), &[]).await;
    assert_eq!(p.location.as_deref(), Some(format!("/apps/{app}?msg=subscription_cancelled").as_str()), "{}", p.body);
    assert_eq!(c.get(&format!("/admin/v1/subscriptions/{id}")).await.body["status"], "cancelled");

    // An admin opens the API: subscribing is immediate from then on.
    let p = admin.submit("/apis", &format!("/apis/{api}/access"), &[("access", "subscription")]).await;
    assert_eq!(p.location.as_deref(), Some("/apis?msg=api_access_changed"), "{}", p.body);
    assert_eq!(c.get(&format!("/admin/v1/apis/{api}")).await.body["access"], "subscription");
    let p = dev.submit(&format!("/apps/{app}"), &format!("/apps/{app}/subscriptions"), &[("api", "orders")]).await;
    assert_eq!(p.location.as_deref(), Some(format!("/apps/{app}?msg=subscribed").as_str()), "{}", p.body);
    let p = dev.submit("/apis", &format!("/apis/{api}/access"), &[("access", "open")]).await;
    assert_eq!(p.status.as_u16(), 403, "a developer does not manage APIs");
    kg.stop().await;
}
