//! Routes managed live (issue 13): the admin API's `/admin/v1/routes`, applied by the gateway
//! without a restart (on this node before the API answers, on other nodes through the change
//! feed), file routes read-only, and tenants apart: a credential works only on its own
//! workspace's routes and on shared ones.

use std::time::Duration;

use keygate_core::model::Permission;
use keygate_testkit::{MockUpstream, Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

async fn get(kg: &TestKeygate, path: &str, token: &str) -> (StatusCode, Value) {
    let resp =
        reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).bearer_auth(token).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn routes_are_created_changed_and_deleted_through_the_api_and_serve_at_once() {
    let up = MockUpstream::start().await.unwrap();
    let kg =
        TestKeygate::start_with(Options { routes: vec![route("orders", "/orders", &up.url())], ..Options::default() })
            .await
            .unwrap();
    let c = kg.client();
    let (_, token) = c.create_token(&json!({"name": "t"})).await;
    kg.sync_index().await.unwrap();

    // The file's route is listed, marked as such, and refuses changes.
    let list = c.get("/admin/v1/routes").await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    assert_eq!(list.body["data"][0]["id"], "orders");
    assert_eq!(list.body["data"][0]["source"], "file");
    assert_eq!(list.body["data"][0]["workspace"], "default");
    assert_eq!(list.body["data"][0]["retries"], 1, "defaults are filled in");
    let put = c
        .send(reqwest::Method::PUT, "/admin/v1/routes/orders", Some(&json!({"path": "/x", "upstream": up.url()})))
        .await;
    assert_eq!((put.status, put.code()), (StatusCode::CONFLICT, "route_from_file"));
    let del = c.delete("/admin/v1/routes/orders").await;
    assert_eq!((del.status, del.code()), (StatusCode::CONFLICT, "route_from_file"));

    // Created: it serves before the API has answered.
    let body = json!({"id": "billing", "path": "/billing", "upstream": up.url(), "scopes": {"GET": "billing:read"}});
    let created = c.post("/admin/v1/routes", &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["source"], "api");
    assert!(created.body["created_at"].is_string());
    assert_eq!(get(&kg, "/billing/7", &token).await.0, StatusCode::FORBIDDEN, "its scope is enforced");
    let (_, reader) = c.create_token(&json!({"name": "r", "scopes": ["billing:read"]})).await;
    kg.sync_index().await.unwrap();
    let (status, echoed) = get(&kg, "/billing/7", &reader).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed["uri"], "/billing/7");

    // Validated as the file is, with stable codes.
    for (bad, code) in [
        (json!({"id": "x", "path": "/x", "upstream": up.url(), "colour": "red"}), "invalid_route"),
        (json!({"id": "x", "path": "/x", "upstream": "ftp://example.com"}), "invalid_route"),
        (json!({"id": "x", "path": "/x"}), "invalid_route"),
        (json!({"id": "..", "path": "/x", "upstream": up.url()}), "invalid_route"),
        (json!({"id": "x", "path": "/ORDERS", "upstream": up.url()}), "invalid_route"),
        (json!({"id": "x", "path": "/x", "upstream": up.url(), "workspace": "elsewhere"}), "route_workspace_mismatch"),
        (json!(["not", "an", "object"]), "invalid_body"),
    ] {
        let a = c.post("/admin/v1/routes", &bad).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, code), "{bad}: {:?}", a.body);
        assert!(!a.str("/error/message").is_empty());
    }
    let unknown =
        c.post("/admin/v1/routes", &json!({"id": "x", "path": "/x", "upstream": up.url(), "colour": 1})).await;
    assert!(unknown.str("/error/message").contains("colour"), "the message names the field: {:?}", unknown.body);
    for id in ["orders", "billing"] {
        let a = c.post("/admin/v1/routes", &json!({"id": id, "path": "/y", "upstream": up.url()})).await;
        assert_eq!((a.status, a.code()), (StatusCode::CONFLICT, "route_exists"), "{id}");
    }

    // Replaced whole (an answer can be sent back as it is), then deleted.
    let mut edited = c.get("/admin/v1/routes/billing").await.body;
    edited["path"] = json!("/invoices");
    let put = c.send(reqwest::Method::PUT, "/admin/v1/routes/billing", Some(&edited)).await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    assert_eq!(get(&kg, "/billing/7", &reader).await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&kg, "/invoices/7", &reader).await.0, StatusCode::OK);
    let renamed = c
        .send(
            reqwest::Method::PUT,
            "/admin/v1/routes/billing",
            Some(&json!({"id": "other", "path": "/i", "upstream": up.url()})),
        )
        .await;
    assert_eq!(renamed.code(), "route_id_mismatch");
    assert_eq!(c.delete("/admin/v1/routes/billing").await.status, StatusCode::NO_CONTENT);
    assert_eq!(get(&kg, "/invoices/7", &reader).await.0, StatusCode::NOT_FOUND);
    assert_eq!(c.delete("/admin/v1/routes/billing").await.status, StatusCode::NOT_FOUND);

    // Audited, with what changed.
    let trail = c.get("/admin/v1/audit-events?target=billing").await;
    let actions: Vec<&str> =
        trail.body["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["route.delete", "route.update", "route.create"]);
    assert_eq!(trail.body["data"][1]["after"]["path"], "/invoices");

    // Permissions: reading and writing routes each need their own.
    let reader_key = kg.root_key("default", &[Permission::RoutesRead]).await.unwrap();
    let rc = kg.client_with(Some(&reader_key));
    assert_eq!(rc.get("/admin/v1/routes").await.status, StatusCode::OK);
    let denied = rc.post("/admin/v1/routes", &json!({"id": "z", "path": "/z", "upstream": up.url()})).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    kg.stop().await;
}

#[tokio::test]
async fn a_token_works_only_on_its_own_workspaces_routes_and_shared_ones() {
    let up = MockUpstream::start().await.unwrap();
    let mut shared = route("status", "/status", &up.url());
    shared.shared = true;
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("orders", "/orders", &up.url()), shared],
        ..Options::default()
    })
    .await
    .unwrap();
    let b_key = kg.root_key("team-b", &Permission::ALL).await.unwrap();
    let b = kg.client_with(Some(&b_key));
    let (_, a_token) = kg.client().create_token(&json!({"name": "a"})).await;
    let (_, b_token) = b.create_token(&json!({"name": "b"})).await;
    let created = b.post("/admin/v1/routes", &json!({"id": "b-api", "path": "/b-api", "upstream": up.url()})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["workspace"], "team-b");
    kg.sync_index().await.unwrap();

    assert_eq!(get(&kg, "/b-api/1", &b_token).await.0, StatusCode::OK);
    assert_eq!(get(&kg, "/orders/1", &a_token).await.0, StatusCode::OK);
    for (path, token) in [("/b-api/1", &a_token), ("/orders/1", &b_token)] {
        let (status, body) = get(&kg, path, token).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(body["error"]["code"], "route_not_in_workspace", "{path}: {body}");
    }
    // keygate's own JWTs carry their workspace: the same rule holds for them.
    let b_ws = kg.store().workspace_by_name("team-b").await.unwrap().unwrap().id;
    let now = keygate_core::Clock::now(&kg.clock).as_millis() / 1000;
    let iss = kg.gateway_url();
    let claims = json!({
        "iss": iss, "sub": "kgc_b", "aud": iss, "exp": now + 300, "iat": now, "jti": "jb",
        "client_id": "kgc_b", "workspace_id": b_ws.as_str(),
    });
    let jwt = kg.oauth().sign(keygate_core::jose::Alg::EdDSA, &json!({"typ": "at+jwt"}), &claims).unwrap();
    assert_eq!(get(&kg, "/b-api/1", &jwt).await.0, StatusCode::OK);
    let (status, body) = get(&kg, "/orders/1", &jwt).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("route_not_in_workspace")));

    // Shared routes (and the demo route) take every workspace's tokens.
    for token in [&a_token, &b_token] {
        assert_eq!(get(&kg, "/status/1", token).await.0, StatusCode::OK);
        assert_eq!(get(&kg, "/demo/echo", token).await.0, StatusCode::OK);
    }

    // Each workspace sees and changes only its own routes.
    let b_list = b.get("/admin/v1/routes").await;
    let ids: Vec<&str> = b_list.body["data"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["b-api"]);
    assert_eq!(b.get("/admin/v1/routes/orders").await.status, StatusCode::NOT_FOUND);
    assert_eq!(kg.client().get("/admin/v1/routes/b-api").await.status, StatusCode::NOT_FOUND);
    assert_eq!(kg.client().delete("/admin/v1/routes/b-api").await.status, StatusCode::NOT_FOUND);
    let a_ids: Vec<String> = kg.client().get("/admin/v1/routes").await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(a_ids, ["orders", "status"]);
    kg.stop().await;
}

/// A file route naming a workspace belongs to it; naming one that does not exist stops the start.
#[tokio::test]
async fn file_routes_name_their_workspace() {
    let up = MockUpstream::start().await.unwrap();
    let mut r = route("orders", "/orders", &up.url());
    r.workspace = Some("nowhere".into());
    let err = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.err().unwrap();
    assert!(format!("{err:#}").contains("workspace \"nowhere\" does not exist"), "{err:#}");
}

/// Two nodes on one PostgreSQL: a route made on one serves on the other, through the change feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_made_on_one_node_serves_on_the_other() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let up = MockUpstream::start().await.unwrap();
    let opts = Options { database_url: Some(db.url.clone()), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    // The same pepper (in the data directory) as every node of a deployment.
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (_, token) = a.client().create_token(&json!({"name": "t"})).await;
    a.sync_index().await.unwrap();
    b.sync_index().await.unwrap();
    let created =
        a.client().post("/admin/v1/routes", &json!({"id": "live", "path": "/live", "upstream": up.url()})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(get(&a, "/live", &token).await.0, StatusCode::OK);
    // Node b hears of it through LISTEN/NOTIFY (or its poll): wait for it, bounded.
    let mut served = false;
    for _ in 0..200 {
        if get(&b, "/live", &token).await.0 == StatusCode::OK {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "node b serves the route made on node a");
    assert_eq!(a.client().delete("/admin/v1/routes/live").await.status, StatusCode::NO_CONTENT);
    let mut gone = false;
    for _ in 0..200 {
        if get(&b, "/live", &token).await.0 == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "and stops serving it when it is deleted there");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}
