//! Liveness and readiness on the admin listener (`GET /healthz`, `GET /readyz`): no credential,
//! what a load balancer or an orchestrator reads. The readiness rule itself (a stuck change feed,
//! the store down) is unit-tested in `keygate_admin::api::misc`.

use keygate_testkit::{StatusCode, TestKeygate};
use serde_json::{Value, json};

async fn get(kg: &TestKeygate, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(format!("{}{path}", kg.url())).await.unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test]
async fn healthz_says_alive_and_readyz_reports_the_index_and_the_store() {
    let kg = TestKeygate::start().await.unwrap();
    let (status, body) = get(&kg, "/healthz").await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"status": "alive"})));

    let (status, before) = get(&kg, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{before}");
    assert_eq!(before["status"], "ready");
    assert!(before.get("reason").is_none(), "nothing degraded: {before}");
    assert_eq!(before["token_index"]["loaded"], true);
    assert!(before["token_index"]["caught_up_ms_ago"].as_u64().is_some(), "{before}");
    assert_eq!(before["store"], json!({"engine": "sqlite", "reachable": true}));

    // A token made through the admin API is in the index, at a later feed position.
    kg.client().create_token(&json!({"name": "ready", "scopes": []})).await;
    kg.sync_index().await.unwrap();
    let (_, after) = get(&kg, "/readyz").await;
    let n = |v: &Value, k: &str| v["token_index"][k].as_u64().unwrap();
    assert_eq!(n(&after, "tokens"), n(&before, "tokens") + 1, "{after}");
    assert!(n(&after, "position") > n(&before, "position"), "{after}");
    kg.stop().await;
}
