//! The client against a whole keygate started by the testkit.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use keygate_client::{Client, Error};
use keygate_core::model::Permission;
use keygate_testkit::TestKeygate;
use serde_json::json;

#[tokio::test]
async fn verifies_through_a_running_keygate() {
    let kg = TestKeygate::start().await.unwrap();
    let (id, token) = kg
        .client()
        .create_token(&json!({
            "name": "svc", "scopes": ["orders:read"], "ip_allowlist": ["10.0.0.0/8"],
            "quota": {"requests": 10, "period": "total"}
        }))
        .await;
    let key = kg.root_key("default", &[Permission::TokensVerify]).await.unwrap();
    let client = Client::new(&kg.url(), key).unwrap();
    assert!(!format!("{client:?}").contains("kgroot_"), "the key is not printed");

    let ok = client.verify(&token, "orders:read").send().await.unwrap();
    assert!(ok.valid, "{ok:?}");
    assert_eq!(ok.code, "ok");
    assert_eq!(ok.token_id.as_deref(), Some(id.as_str()));
    assert_eq!(ok.scopes, vec!["orders:read".to_owned()]);
    let q = ok.quota.unwrap();
    assert_eq!((q.limit, q.remaining, q.reset_at), (10, 9, None));

    let costly = client.verify(&token, "orders:read").cost(5).ip("10.0.0.1".parse().unwrap()).send().await.unwrap();
    assert_eq!(costly.quota.unwrap().remaining, 4);
    let far = client.verify(&token, "").ip("192.0.2.1".parse().unwrap()).send().await.unwrap();
    assert_eq!((far.valid, far.code.as_str()), (false, "ip_not_allowed"));
    let scope = client.verify(&token, "orders:write").send().await.unwrap();
    assert_eq!(scope.code, "insufficient_scope");
    let unknown = client.verify("kg_nothing", "").send().await.unwrap();
    assert_eq!(unknown.code, "malformed_token");

    match client.verify(&token, "").cost(5000).send().await {
        Err(Error::Api { status: 400, code, .. }) => assert_eq!(code, "invalid_cost"),
        other => panic!("{other:?}"),
    }
    let bad = Client::new(&kg.url(), "kgroot_wrong").unwrap();
    match bad.verify(&token, "").send().await {
        Err(Error::Api { status: 401, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(Client::new("not a url", "k"), Err(Error::InvalidUrl(_))));
    kg.stop().await;
}
