//! Nodes that know each other (issue 14): the registry, and token changes answered once every
//! live node has applied them, with the count in the answer and the audit trail.

use keygate::config::ClusterConfig;
use keygate_core::Clock;
use keygate_core::model::NodeRecord;
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::{Value, json};

fn spread(body: &Value) -> (u64, u64) {
    let p = &body["propagation"];
    assert!(p["elapsed_ms"].is_u64(), "{body}");
    (p["nodes"].as_u64().unwrap(), p["applied"].as_u64().unwrap())
}

/// Two nodes on one PostgreSQL: each is listed; a revocation made on one is answered only once
/// the other has applied it, so the other refuses the token as soon as the answer is back,
/// without anyone waiting for its feed; a stopped or silent node is not waited for (beyond the
/// bound) and the answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_answered_once_every_live_node_has_it() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let cluster = ClusterConfig { propagation_timeout_ms: 300, ..ClusterConfig::default() };
    let opts = Options { database_url: Some(db.url.clone()), cluster: Some(cluster), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();

    let nodes = a.client().get("/admin/v1/nodes").await;
    assert_eq!(nodes.status, StatusCode::OK, "{:?}", nodes.body);
    assert_eq!(nodes.body["live"], 2, "{}", nodes.body);
    let ids: Vec<&str> = nodes.body["data"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&a.cluster().id()) && ids.contains(&b.cluster().id()), "{ids:?}");
    for n in nodes.body["data"].as_array().unwrap() {
        assert_eq!(n["state"], "live");
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
    }

    let (id, secret) = a.client().create_token(&json!({"name": "t"})).await;
    let (id2, secret2) = a.client().create_token(&json!({"name": "t2"})).await;
    b.sync_index().await.unwrap();
    let now = a.clock.now();
    assert!(b.index().verify(&secret, now).is_ok());

    // Revoked on a: the answer waits for b, so b refuses the token right away.
    let r = a.client().post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(spread(&r.body), (2, 2), "{}", r.body);
    assert!(b.index().verify(&secret, now).is_err(), "node b applied the revocation before the answer");
    // A change that changes nothing waits for nothing and says nothing.
    let again = a.client().post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
    assert!(again.body.get("propagation").is_none(), "{}", again.body);
    // The audit trail records it; a rotation made on b is acknowledged by a.
    let events = a.client().get(&format!("/admin/v1/audit-events?target={id}&action=token.revoke")).await;
    let ev = &events.body["data"][0];
    assert_eq!(
        (ev["propagation"]["nodes"].as_u64(), ev["propagation"]["applied"].as_u64()),
        (Some(2), Some(2)),
        "{}",
        events.body
    );
    let rotated = b.client().post(&format!("/admin/v1/tokens/{id2}/rotate"), &json!({"grace_period_seconds": 0})).await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{:?}", rotated.body);
    assert_eq!(spread(&rotated.body), (2, 2));
    let new_secret = rotated.body["token"].as_str().unwrap();
    assert!(a.index().verify(new_secret, now).is_ok(), "node a has the new secret when b answers");
    assert!(a.index().verify(&secret2, now).is_err(), "and no longer takes the old one (no grace)");

    // A node that is registered but applies nothing (hung, or partitioned from the feed but
    // still beating): the answer waits the bound, then says 2 of 3.
    let silent = NodeRecord {
        id: "silent:1".into(),
        instance: "x".into(),
        gateway_address: "10.9.9.9:8080".into(),
        admin_address: "10.9.9.9:8081".into(),
        version: "0".into(),
        started_at: now,
        applied_seq: 0,
        heartbeat_at: now,
        stopped_at: None,
    };
    a.store().register_node(&silent).await.unwrap();
    let (id3, _) = a.client().create_token(&json!({"name": "t3"})).await;
    let s = a.client().post(&format!("/admin/v1/tokens/{id3}/suspend"), &json!({})).await;
    assert_eq!(spread(&s.body), (3, 2), "{}", s.body);
    assert!(s.body["propagation"]["elapsed_ms"].as_u64().unwrap() >= 300);
    // Once its heartbeat is older than the node timeout it is unreachable, and not waited for.
    a.clock.advance_seconds(11);
    b.clock.advance_seconds(11);
    a.cluster().beat_now().await;
    b.cluster().beat_now().await;
    let states = a.client().get("/admin/v1/nodes").await;
    let silent_state =
        states.body["data"].as_array().unwrap().iter().find(|n| n["id"] == "silent:1").unwrap()["state"].clone();
    assert_eq!(silent_state, "unreachable", "{}", states.body);
    let s = a.client().post(&format!("/admin/v1/tokens/{id3}/resume"), &json!({})).await;
    assert_eq!(spread(&s.body), (2, 2), "{}", s.body);

    // A node that stopped gracefully is listed as stopped and not waited for.
    let b_id = b.cluster().id().to_owned();
    b.stop().await;
    let states = a.client().get("/admin/v1/nodes").await;
    let b_state =
        states.body["data"].as_array().unwrap().iter().find(|n| n["id"] == b_id.as_str()).unwrap()["state"].clone();
    assert_eq!(b_state, "stopped");
    assert_eq!(states.body["live"], 1);
    let s = a.client().post(&format!("/admin/v1/tokens/{id3}/suspend"), &json!({})).await;
    assert_eq!(spread(&s.body), (1, 1), "{}", s.body);
    a.stop().await;
    db.drop_db().await;
}

/// One node (SQLite, the default): the answer says 1 of 1, and nodes lists it.
#[tokio::test]
async fn one_node_acknowledges_its_own_changes() {
    let kg = TestKeygate::start().await.unwrap();
    let (id, _) = kg.client().create_token(&json!({"name": "t"})).await;
    let r = kg.client().post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await;
    assert_eq!(spread(&r.body), (1, 1), "{}", r.body);
    let nodes = kg.client().get("/admin/v1/nodes").await;
    assert_eq!(nodes.body["live"], 1);
    assert_eq!(nodes.body["data"][0]["lag"], 0, "{}", nodes.body);
    // Instance-level: a root key of another workspace is refused.
    let ws = kg.client().post("/admin/v1/workspaces", &json!({"name": "tenant"})).await;
    assert_eq!(ws.status, StatusCode::CREATED);
    let key = kg.root_key("tenant", &keygate_core::model::Permission::ALL).await.unwrap();
    let refused = kg.client_with(Some(&key)).get("/admin/v1/nodes").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "instance_key_required");
    kg.stop().await;
}
