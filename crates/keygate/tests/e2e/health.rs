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

/// `[health] listen`: the probes on a listener of their own, and nothing else there (the admin
/// API and the dashboard stay on the admin listener).
#[tokio::test]
async fn the_probes_have_a_listener_of_their_own_with_nothing_else_on_it() {
    let opts = keygate_testkit::Options { health_listener: true, ..Default::default() };
    let kg = TestKeygate::start_with(opts).await.unwrap();
    let base = format!("http://{}", kg.health_addr().expect("a health listener"));
    let alive = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
    assert_eq!(alive.json::<Value>().await.unwrap()["status"], "alive");
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await.unwrap()["token_index"]["loaded"], true);
    for path in ["/admin/v1/tokens", "/admin/v1/health", "/", "/metrics"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path} is not on the probes' listener");
    }
    let post = reqwest::Client::new().post(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    kg.stop().await;
}
