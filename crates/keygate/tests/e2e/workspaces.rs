//! Workspaces managed through the admin API (issue 13): only with a root key of the default
//! workspace; deleting one that still holds tokens needs `revoke_tokens=true` and leaves nothing
//! of it able to authenticate: tokens (at the gateway at once), root keys, routes.

use keygate_core::model::Permission;
use keygate_testkit::{MockUpstream, StatusCode, TestKeygate};
use serde_json::json;

#[tokio::test]
async fn workspaces_are_created_renamed_and_deleted_by_the_instance_only() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let made = c.post("/admin/v1/workspaces", &json!({"name": "team-b"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let id = made.str("/id");
    assert_eq!(c.post("/admin/v1/workspaces", &json!({"name": "team-b"})).await.code(), "workspace_exists");
    assert_eq!(c.post("/admin/v1/workspaces", &json!({"name": ""})).await.status, StatusCode::BAD_REQUEST);
    let names: Vec<String> = c.get("/admin/v1/workspaces").await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["default", "team-b"]);

    // Renamed; the default workspace is fixed.
    let renamed = c.patch(&format!("/admin/v1/workspaces/{id}"), &json!({"name": "team-blue"})).await;
    assert_eq!((renamed.status, renamed.str("/name")), (StatusCode::OK, "team-blue".to_owned()));
    let default_id = kg.store().workspace_by_name("default").await.unwrap().unwrap().id;
    let fixed = c.patch(&format!("/admin/v1/workspaces/{default_id}"), &json!({"name": "x"})).await;
    assert_eq!((fixed.status, fixed.code()), (StatusCode::CONFLICT, "default_workspace"));
    assert_eq!(c.delete(&format!("/admin/v1/workspaces/{default_id}")).await.code(), "default_workspace");

    // Another workspace's key cannot manage workspaces, whatever its permissions.
    let b_key = kg.root_key("team-blue", &Permission::ALL).await.unwrap();
    let b = kg.client_with(Some(&b_key));
    let refused = b.get("/admin/v1/workspaces").await;
    assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "instance_key_required"));
    assert_eq!(b.delete(&format!("/admin/v1/workspaces/{id}")).await.status, StatusCode::FORBIDDEN);

    // Its token and route work until the workspace is deleted.
    let (_, token) = b.create_token(&json!({"name": "b"})).await;
    let route = b.post("/admin/v1/routes", &json!({"id": "b-api", "path": "/b-api", "upstream": up.url()})).await;
    assert_eq!(route.status, StatusCode::CREATED, "{:?}", route.body);
    kg.sync_index().await.unwrap();
    let http = reqwest::Client::new();
    let call = |path: &str| http.get(format!("{}{path}", kg.gateway_url())).bearer_auth(&token).send();
    assert_eq!(call("/b-api/1").await.unwrap().status(), StatusCode::OK);

    let held = c.delete(&format!("/admin/v1/workspaces/{id}")).await;
    assert_eq!((held.status, held.code()), (StatusCode::CONFLICT, "workspace_has_tokens"));
    assert_eq!(call("/b-api/1").await.unwrap().status(), StatusCode::OK, "a refused deletion changes nothing");
    let gone = c.delete(&format!("/admin/v1/workspaces/{id}?revoke_tokens=true")).await;
    assert_eq!(gone.status, StatusCode::OK, "{:?}", gone.body);
    assert_eq!(gone.body["tokens_revoked"], 1);
    assert_eq!(gone.body["root_keys_revoked"], 1);
    assert_eq!(gone.body["routes_deleted"], 1);
    // At once on this node: the token, the route and the root key are gone.
    let after = call("/demo/echo").await.unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(call("/b-api/1").await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(b.get("/admin/v1/tokens").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(c.get(&format!("/admin/v1/workspaces/{id}")).await.status, StatusCode::NOT_FOUND);
    // The name is free again, and the instance's trail says what happened.
    assert_eq!(c.post("/admin/v1/workspaces", &json!({"name": "team-blue"})).await.status, StatusCode::CREATED);
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}")).await;
    let actions: Vec<&str> =
        trail.body["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["workspace.delete", "workspace.rename", "workspace.create"]);
    assert_eq!(trail.body["data"][0]["after"]["tokens_revoked"], 1);
    kg.stop().await;
}

/// A workspace the configuration names (a file route, a trusted issuer) is neither renamed nor
/// deleted: the next reload or start would stop on an unknown workspace.
#[tokio::test]
async fn a_workspace_the_config_file_names_stays() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let id = c.post("/admin/v1/workspaces", &json!({"name": "acme"})).await.str("/id");
    let mut r = keygate_testkit::route("acme-orders", "/acme", &up.url());
    r.workspace = Some("acme".into());
    kg.routes().set_file(vec![r], keygate::config::GatewayConfig::default()).await.unwrap();

    for answer in [
        c.patch(&format!("/admin/v1/workspaces/{id}"), &json!({"name": "acme-2"})).await,
        c.delete(&format!("/admin/v1/workspaces/{id}?revoke_tokens=true")).await,
    ] {
        assert_eq!((answer.status, answer.code()), (StatusCode::CONFLICT, "workspace_in_config"), "{:?}", answer.body);
        assert!(answer.str("/error/message").contains("acme-orders"), "{:?}", answer.body);
    }
    assert_eq!(c.get(&format!("/admin/v1/workspaces/{id}")).await.str("/name"), "acme");

    // Once the file no longer names it, it can go.
    kg.routes().set_file(vec![], keygate::config::GatewayConfig::default()).await.unwrap();
    let gone = c.delete(&format!("/admin/v1/workspaces/{id}")).await;
    assert_eq!(gone.status, StatusCode::OK, "{:?}", gone.body);
}
