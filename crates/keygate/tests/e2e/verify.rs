//! `POST /admin/v1/verify` through a whole keygate: every code, a cost that drains the same
//! bucket as the gateway's traffic, another workspace's token as unknown, the permission, and the
//! usage it meters.

use keygate_core::model::Permission;
use keygate_testkit::{StatusCode, TestKeygate};
use serde_json::{Value, json};

async fn verify(c: &keygate_testkit::Client, body: Value) -> Value {
    let a = c.post("/admin/v1/verify", &body).await;
    assert_eq!(a.status, StatusCode::OK, "{body} -> {:?}", a.body);
    a.body
}

#[tokio::test]
async fn verify_answers_every_code_from_the_index() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (id, token) = c
        .create_token(&json!({
            "name": "svc", "scopes": ["orders:read"], "expires_in": 3600,
            "ip_allowlist": ["10.0.0.0/8"], "quota": {"requests": 100, "period": "day"}
        }))
        .await;

    let ok = verify(&c, json!({"token": token, "scope": "orders:read", "ip": "10.1.2.3"})).await;
    assert_eq!(ok["valid"], true, "{ok}");
    assert_eq!(ok["code"], "ok");
    assert_eq!(ok["token_id"], id);
    assert_eq!(ok["scopes"], json!(["orders:read"]));
    assert!(ok["app_id"].is_string() && ok["workspace_id"].is_string() && ok["expires_at"].is_string(), "{ok}");
    assert_eq!(ok["quota"]["limit"], 100);
    assert_eq!(ok["quota"]["remaining"], 99);
    assert!(ok["quota"]["reset_at"].is_string());
    assert!(ok.get("rate_limit").is_none(), "no rate limit on this token");

    let code = |v: &Value| (v["valid"].clone(), v["code"].as_str().unwrap_or_default().to_owned());
    let no_scope = verify(&c, json!({"token": token})).await;
    assert_eq!(code(&no_scope), (json!(true), "ok".into()), "without a scope any valid token is ok");
    assert_eq!(
        code(&verify(&c, json!({"token": token, "scope": "orders:write"})).await),
        (json!(false), "insufficient_scope".into())
    );
    assert_eq!(
        code(&verify(&c, json!({"token": token, "ip": "192.0.2.1"})).await),
        (json!(false), "ip_not_allowed".into())
    );
    assert_eq!(code(&verify(&c, json!({"token": "kg_nope"})).await), (json!(false), "malformed_token".into()));
    let refused = verify(&c, json!({"token": "kg_nope"})).await;
    assert!(refused.get("token_id").is_none(), "nothing of a token that is not found: {refused}");

    // Suspended, resumed, expired, revoked.
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await.status, StatusCode::OK);
    assert_eq!(code(&verify(&c, json!({"token": token})).await), (json!(false), "token_suspended".into()));
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/resume"), &json!({})).await.status, StatusCode::OK);
    assert_eq!(code(&verify(&c, json!({"token": token})).await).1, "ok");
    kg.clock.advance_seconds(3601);
    assert_eq!(code(&verify(&c, json!({"token": token})).await), (json!(false), "token_expired".into()));
    let (rid, revoked) = c.create_token(&json!({"name": "gone", "scopes": ["orders:read"]})).await;
    assert_eq!(c.post(&format!("/admin/v1/tokens/{rid}/revoke"), &json!({})).await.status, StatusCode::OK);
    assert_eq!(code(&verify(&c, json!({"token": revoked})).await), (json!(false), "unknown_token".into()));

    // Quota: a cost counts several, a refused one counts nothing.
    let (_, q) = c.create_token(&json!({"name": "q", "quota": {"requests": 5, "period": "month"}})).await;
    assert_eq!(verify(&c, json!({"token": q, "cost": 4})).await["quota"]["remaining"], 1);
    let over = verify(&c, json!({"token": q, "cost": 2})).await;
    assert_eq!(code(&over), (json!(false), "quota_exceeded".into()));
    assert_eq!(over["quota"]["remaining"], 1);
    assert_eq!(verify(&c, json!({"token": q, "cost": 0})).await["quota"]["remaining"], 1, "a cost of 0 reads");
    assert_eq!(code(&verify(&c, json!({"token": q})).await).1, "ok");
    assert_eq!(code(&verify(&c, json!({"token": q})).await).1, "quota_exceeded");

    // Bad requests: 400 with the admin API's error shape.
    for (body, want) in [
        (json!({}), "invalid_body"),
        (json!({"scope": "orders:read"}), "invalid_body"),
        (json!({"token": token, "cost": 1001}), "invalid_cost"),
        (json!({"token": token, "cost": -1}), "invalid_cost"),
        (json!({"token": token, "scope": "not a scope"}), "invalid_scope"),
        (json!({"token": token, "ip": "example.com"}), "invalid_ip"),
        (json!({"token": token, "extra": 1}), "invalid_body"),
        (json!({"token": ""}), "invalid_token_field"),
    ] {
        let a = c.post("/admin/v1/verify", &body).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, want), "{body}: {:?}", a.body);
    }
    let raw = c.send_raw(keygate_testkit::Method::POST, "/admin/v1/verify", "application/json", b"{".to_vec()).await;
    assert_eq!((raw.status, raw.code()), (StatusCode::BAD_REQUEST, "malformed_json"));
    kg.stop().await;
}

#[tokio::test]
async fn verify_and_gateway_traffic_share_one_bucket_and_usage() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (id, token) =
        c.create_token(&json!({"name": "rl", "rate_limit": {"requests": 5, "per_seconds": 60, "burst": 0}})).await;
    let first = verify(&c, json!({"token": token, "cost": 3})).await;
    assert_eq!(first["rate_limit"]["remaining"], 2, "{first}");
    assert_eq!(first["rate_limit"]["limit"], 5);
    assert!(first["rate_limit"]["reset_at"].is_string());

    // The gateway takes from the same bucket: two requests fit, the third is refused.
    let http = reqwest::Client::new();
    let url = format!("{}/demo/echo", kg.gateway_url());
    for want in [200, 200, 429] {
        let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want);
    }
    let limited = verify(&c, json!({"token": token})).await;
    assert_eq!((limited["valid"].clone(), limited["code"].clone()), (json!(false), json!("rate_limited")));
    assert_eq!(limited["rate_limit"]["remaining"], 0);
    // The bucket refills with the clock: one request every 12 s.
    kg.clock.advance_seconds(12);
    assert_eq!(verify(&c, json!({"token": token})).await["code"], "ok");

    // Metered: the token's usage shows the verifications under the route `verify`.
    kg.flush_usage().await;
    let usage = c.get(&format!("/admin/v1/tokens/{id}/usage")).await;
    assert_eq!(usage.status, StatusCode::OK, "{:?}", usage.body);
    let routes = usage.body["routes"].as_array().unwrap();
    let v = routes.iter().find(|r| r["route"] == "verify").unwrap_or_else(|| panic!("{}", usage.body));
    assert_eq!(v["requests"], 3, "{v}");
    assert_eq!(v["status_4xx"], 1, "the refused one: {v}");
    kg.stop().await;
}

#[tokio::test]
async fn verify_needs_its_permission_and_sees_only_its_workspace() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (_, token) = c.create_token(&json!({"name": "mine", "scopes": ["orders:read"]})).await;

    // A key with tokens:verify only may verify, and do nothing else.
    let verifier = kg.root_key("default", &[Permission::TokensVerify]).await.unwrap();
    let vc = kg.client_with(Some(&verifier));
    assert_eq!(verify(&vc, json!({"token": token, "scope": "orders:read"})).await["valid"], true);
    let list = vc.get("/admin/v1/tokens").await;
    assert_eq!((list.status, list.code()), (StatusCode::FORBIDDEN, "missing_permission"));

    // A key without it: 403; no key: 401.
    let reader = kg.root_key("default", &[Permission::TokensRead, Permission::TokensWrite]).await.unwrap();
    let a = kg.client_with(Some(&reader)).post("/admin/v1/verify", &json!({"token": token})).await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "missing_permission"));
    let a = kg.client_with(None).post("/admin/v1/verify", &json!({"token": token})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Another workspace's key: the token is unknown, even when suspended (existence never leaks).
    let other = kg.root_key("other", &[Permission::TokensVerify]).await.unwrap();
    let oc = kg.client_with(Some(&other));
    let theirs = verify(&oc, json!({"token": token})).await;
    assert_eq!((theirs["valid"].clone(), theirs["code"].clone()), (json!(false), json!("unknown_token")));
    assert!(theirs.get("token_id").is_none());
    let listed = c.get("/admin/v1/tokens").await;
    let id = listed.body["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await.status, StatusCode::OK);
    assert_eq!(verify(&oc, json!({"token": token})).await["code"], "unknown_token");
    assert_eq!(verify(&c, json!({"token": token})).await["code"], "token_suspended");
    kg.stop().await;
}
