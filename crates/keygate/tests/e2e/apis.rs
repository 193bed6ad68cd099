//! APIs with a lifecycle (issue 17), from outside: `/admin/v1/apis`, a route's `api` and
//! `version`, and what the gateway does in each state — a draft serves its own workspace only
//! and is not in the portal, a deprecated version answers with `Deprecation`, `Sunset` and `Link`,
//! a retired one answers 410 `api_retired` before any token work — publish requests waiting for
//! an owner, another workspace's API not found, and invalid inputs refused with stable codes.

use keygate_core::model::Permission;
use keygate_testkit::{MockUpstream, Options, StatusCode, TestKeygate, route};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::dashboard::{member, owner};

/// A GET through the gateway, with a token or without: status, headers, body.
async fn call(kg: &TestKeygate, path: &str, token: Option<&str>) -> (StatusCode, HeaderMap, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", kg.gateway_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn an_api_goes_from_draft_to_retired_and_its_routes_follow() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let other_key = kg.root_key("team-b", &Permission::ALL).await.unwrap();
    let b = kg.client_with(Some(&other_key));
    let (_, token) = c.create_token(&json!({"name": "own"})).await;
    let (_, b_token) = b.create_token(&json!({"name": "theirs"})).await;
    kg.sync_index().await.unwrap();

    // Made as a draft, with two versions that are drafts too.
    let made =
        c.post("/admin/v1/apis", &json!({"name": "orders", "description": "Orders", "versions": ["v1", "v2"]})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let id = made.str("/id");
    assert!(id.starts_with("api_"), "{id}");
    assert_eq!(made.body["state"], "draft");
    assert_eq!(
        made.body["versions"][1],
        json!({"name": "v2", "state": "draft", "deprecated_at": null, "sunset": null, "successor": null, "validate": false})
    );

    // Routes name it by name or by id, and a version of it; a route naming what does not exist
    // is refused.
    let v1 = json!({"id": "orders-v1", "path": "/v1/orders", "upstream": up.url(), "api": "orders", "version": "v1", "shared": true});
    assert_eq!(c.post("/admin/v1/routes", &v1).await.status, StatusCode::CREATED);
    let v2 = json!({"id": "orders-v2", "path": "/v2/orders", "upstream": up.url(), "api": id, "version": "v2"});
    assert_eq!(c.post("/admin/v1/routes", &v2).await.status, StatusCode::CREATED);
    for bad in [
        json!({"id": "x", "path": "/x", "upstream": up.url(), "api": "nothing"}),
        json!({"id": "x", "path": "/x", "upstream": up.url(), "api": "orders", "version": "v9"}),
        json!({"id": "x", "path": "/x", "upstream": up.url(), "version": "v1"}),
    ] {
        let a = c.post("/admin/v1/routes", &bad).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{bad}: {:?}", a.body);
    }
    // Another workspace cannot name it either.
    let theirs = b.post("/admin/v1/routes", &json!({"id": "b", "path": "/b", "upstream": up.url(), "api": id})).await;
    assert_eq!(theirs.code(), "invalid_route");
    let got = c.get(&format!("/admin/v1/apis/{id}")).await;
    assert_eq!(got.body["routes"].as_array().unwrap().len(), 2, "{:?}", got.body);

    // A draft serves its own workspace only, even on a shared route, and the portal hides it.
    assert_eq!(call(&kg, "/v1/orders/1", Some(&token)).await.0, StatusCode::OK);
    let (status, _, body) = call(&kg, "/v1/orders/1", Some(&b_token)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("route_not_in_workspace")));
    let mut browser = owner(&kg).await;
    let portal = browser.get("/portal").await;
    assert!(!portal.body.contains("orders-v1"), "a draft is not in the portal");

    // Published (the API and the version): the shared route takes every workspace's tokens,
    // and the portal lists it.
    let published = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": "published"})).await;
    assert_eq!((published.status, published.body["state"].as_str()), (StatusCode::OK, Some("published")));
    let still = call(&kg, "/v1/orders/1", Some(&b_token)).await;
    assert_eq!(still.0, StatusCode::FORBIDDEN, "version v1 is still a draft");
    for v in ["v1", "v2"] {
        let p = c.patch(&format!("/admin/v1/apis/{id}/versions/{v}"), &json!({"state": "published"})).await;
        assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    }
    let (status, headers, _) = call(&kg, "/v1/orders/1", Some(&b_token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "deprecation"), None);
    let portal = browser.get("/portal").await;
    assert!(portal.body.contains("orders-v1") && portal.body.contains("published"), "{}", portal.body);

    // Deprecated with a sunset and a successor: every answer says so, refusals included.
    let dep = c
        .patch(
            &format!("/admin/v1/apis/{id}/versions/v1"),
            &json!({"state": "deprecated", "sunset": "2031-01-01T00:00:00Z", "successor": "/v2/orders"}),
        )
        .await;
    assert_eq!(dep.status, StatusCode::OK, "{:?}", dep.body);
    let now = keygate_core::Clock::now(&kg.clock).as_millis() / 1000;
    assert_eq!(dep.body["versions"][0]["state"], "deprecated");
    for t in [Some(token.as_str()), None] {
        let (status, headers, _) = call(&kg, "/v1/orders/1", t).await;
        assert_eq!(status, if t.is_some() { StatusCode::OK } else { StatusCode::UNAUTHORIZED });
        assert_eq!(header(&headers, "deprecation"), Some(format!("@{now}").as_str()));
        assert_eq!(header(&headers, "sunset"), Some("Wed, 01 Jan 2031 00:00:00 GMT"));
        assert_eq!(header(&headers, "link"), Some("</v2/orders>; rel=\"successor-version\""));
    }
    let (_, headers, _) = call(&kg, "/v2/orders/1", Some(&token)).await;
    assert_eq!(header(&headers, "deprecation"), None, "the other version is not deprecated");
    let portal = browser.get("/portal").await;
    assert!(portal.body.contains("2031-01-01T00:00:00Z"), "the portal shows the sunset");

    // The lifecycle's rules, with stable codes.
    let skip = c.patch(&format!("/admin/v1/apis/{id}/versions/v2"), &json!({"state": "retired"})).await;
    assert_eq!((skip.status, skip.code()), (StatusCode::CONFLICT, "invalid_state_transition"));
    for (body, code) in [
        (json!({"state": "gone"}), "invalid_state"),
        (json!({"sunset": "next year"}), "invalid_sunset"),
        (json!({"successor": "javascript:alert(1)"}), "invalid_successor"),
        (json!({"successor": "/v2 orders"}), "invalid_successor"),
        (json!({"successor": "/v2>; rel=x"}), "invalid_successor"),
        // A URL whose host is not one (an unclosed IPv6 bracket): its `Link` would not parse.
        (json!({"successor": "https://ey0p'GG1jn0,X+[o"}), "invalid_successor"),
        (json!({"successor": "https://user@api.example.com/v2"}), "invalid_successor"),
        (json!({"name": "no spaces"}), "invalid_api_name"),
        (json!({"colour": "red"}), "invalid_body"),
        (json!({"openapi": {"swagger": "2.0"}}), "invalid_openapi"),
    ] {
        let a = c.patch(&format!("/admin/v1/apis/{id}"), &body).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, code), "{body}: {:?}", a.body);
        assert!(!a.str("/error/message").is_empty());
    }
    // An OpenAPI document larger than other bodies may be (up to 1 MiB); over that, refused.
    let big = json!({"openapi": "3.1.0", "info": {"title": "orders", "version": "1", "x-pad": "a".repeat(300_000)}, "paths": {}});
    let doc = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"openapi": big})).await;
    assert_eq!(doc.status, StatusCode::OK, "{:?}", doc.body["error"]);
    assert_eq!(doc.body["openapi"]["info"]["title"], "orders");
    assert!(c.get("/admin/v1/apis").await.body["data"][0].get("openapi").is_none(), "lists leave documents out");
    let over = json!({"openapi": "3.1.0", "x-pad": "a".repeat(1_050_000)});
    let refused = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"openapi": over})).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::BAD_REQUEST, "openapi_too_large"));
    let huge = json!({"openapi": "3.1.0", "x-pad": "a".repeat(1_200_000)});
    let refused = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"openapi": huge})).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    let other = c.post("/admin/v1/apps", &json!({"name": "x", "metadata": {"pad": "a".repeat(100_000)}})).await;
    assert_eq!(other.status, StatusCode::PAYLOAD_TOO_LARGE, "other endpoints keep their 64 KiB bound");
    // A sunset that has passed conflicts with the server's clock (as a token's expiry does).
    let past = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"sunset": "2020-01-01T00:00:00Z"})).await;
    assert_eq!((past.status, past.code()), (StatusCode::CONFLICT, "sunset_in_past"));
    let twin = c.post("/admin/v1/apis", &json!({"name": "orders"})).await;
    assert_eq!((twin.status, twin.code()), (StatusCode::CONFLICT, "api_exists"));
    let unknown = c.patch(&format!("/admin/v1/apis/{id}/versions/v7"), &json!({"state": "published"})).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "api_version_not_found"));

    // Another workspace's API does not exist for it.
    for a in [
        b.get(&format!("/admin/v1/apis/{id}")).await,
        b.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": "deprecated"})).await,
        b.patch(&format!("/admin/v1/apis/{id}/versions/v1"), &json!({"state": "retired"})).await,
        b.delete(&format!("/admin/v1/apis/{id}")).await,
    ] {
        assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "api_not_found"), "{:?}", a.body);
    }
    assert_eq!(b.get("/admin/v1/apis").await.body["data"], json!([]));

    // Retired: 410 before any token work, saying what to use instead.
    let ret = c.patch(&format!("/admin/v1/apis/{id}/versions/v1"), &json!({"state": "retired"})).await;
    assert_eq!(ret.status, StatusCode::OK, "{:?}", ret.body);
    for t in [None, Some("kg_not_even_a_token")] {
        let (status, _, body) = call(&kg, "/v1/orders/1", t).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::GONE, Some("api_retired")));
        assert!(body["error"]["message"].as_str().unwrap().contains("/v2/orders"), "{body}");
    }
    let back = c.patch(&format!("/admin/v1/apis/{id}/versions/v1"), &json!({"state": "published"})).await;
    assert_eq!((back.status, back.code()), (StatusCode::CONFLICT, "invalid_state_transition"), "retired is final");
    assert_eq!(call(&kg, "/v2/orders/1", Some(&token)).await.0, StatusCode::OK);
    assert!(!browser.get("/portal").await.body.contains("orders-v1"), "a retired version leaves the portal");

    // The API as a whole: deprecated, then retired; every version's routes follow.
    c.patch(
        &format!("/admin/v1/apis/{id}"),
        &json!({"state": "deprecated", "successor": "https://api.example.com/v3"}),
    )
    .await;
    let (_, headers, _) = call(&kg, "/v2/orders/1", Some(&token)).await;
    assert_eq!(header(&headers, "link"), Some("<https://api.example.com/v3>; rel=\"successor-version\""));
    assert_eq!(header(&headers, "sunset"), None, "no sunset was given");
    c.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": "retired"})).await;
    assert_eq!(call(&kg, "/v2/orders/1", Some(&token)).await.0, StatusCode::GONE);

    // An API that routes name cannot be deleted.
    let del = c.delete(&format!("/admin/v1/apis/{id}")).await;
    assert_eq!((del.status, del.code()), (StatusCode::CONFLICT, "api_in_use"));

    // Every change of state is audited, with the routes whose callers are told.
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}&limit=100")).await;
    let events = trail.body["data"].as_array().unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in ["api.create", "api.publish", "api.deprecate", "api.retire"] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    let retire_v1 = events
        .iter()
        .find(|e| e["action"] == "api.retire" && e["after"]["version"] == "v1")
        .expect("the retirement of v1 is audited");
    assert_eq!(retire_v1["after"]["routes"], json!(["orders-v1"]));
    assert_eq!(retire_v1["before"]["state"], "deprecated");
    let types = c.get("/admin/v1/webhook-event-types").await;
    let names = types.body.to_string();
    assert!(names.contains("api.deprecated") && names.contains("api.retired"), "{names}");
    kg.stop().await;
}

/// A config-file route names an API by its name before the API exists: it serves as a route of
/// no API, then follows the API from the moment it is made.
#[tokio::test]
async fn a_file_route_follows_an_api_made_later() {
    let up = MockUpstream::start().await.unwrap();
    let mut r = route("catalog", "/catalog", &up.url());
    r.api = Some("catalog".into());
    let kg = TestKeygate::start_with(Options { routes: vec![r], ..Options::default() }).await.unwrap();
    let c = kg.client();
    let (_, token) = c.create_token(&json!({"name": "t"})).await;
    kg.sync_index().await.unwrap();
    assert_eq!(call(&kg, "/catalog/1", Some(&token)).await.0, StatusCode::OK);
    let made = c.post("/admin/v1/apis", &json!({"name": "catalog"})).await;
    let id = made.str("/id");
    assert_eq!(made.body["routes"][0]["id"], "catalog");
    c.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": "published"})).await;
    let dep = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": "deprecated"})).await;
    assert_eq!(dep.status, StatusCode::OK, "{:?}", dep.body);
    let (status, headers, _) = call(&kg, "/catalog/1", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(header(&headers, "deprecation").is_some_and(|d| d.starts_with('@')));
    // Renaming it would leave the file's route naming nothing.
    let rename = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"name": "catalogue"})).await;
    assert_eq!((rename.status, rename.code()), (StatusCode::CONFLICT, "api_in_use"));
    kg.stop().await;
}

/// With `api_publish_needs_approval`, an admin's publication waits for an owner; a root key with
/// `apis:write` counts as an owner and decides it through the API.
#[tokio::test]
async fn publishing_waits_for_an_owner_when_the_workspace_says_so() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "admin@example.com", "admin").await;
    let p = own.submit("/settings", "/settings", &[("api_publish_needs_approval", "on")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let id = c.post("/admin/v1/apis", &json!({"name": "billing", "versions": ["v1"]})).await.str("/id");

    let p = admin.submit("/apis", &format!("/apis/{id}/state"), &[("state", "published")]).await;
    assert_eq!(p.location.as_deref(), Some("/apis?msg=api_publish_requested"), "{}", p.body);
    let api = c.get(&format!("/admin/v1/apis/{id}")).await;
    assert_eq!(api.body["state"], "draft", "nothing is published yet");
    assert_eq!(api.body["pending_publish_requests"].as_array().unwrap().len(), 1);
    let pending = c.get("/admin/v1/api-publish-requests?status=pending").await;
    let req = pending.body["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(pending.body["data"][0]["api_id"], id.as_str());
    // The same request again files nothing new; the admin cannot decide it.
    admin.submit("/apis", &format!("/apis/{id}/state"), &[("state", "published")]).await;
    assert_eq!(c.get("/admin/v1/api-publish-requests").await.body["data"].as_array().unwrap().len(), 1);
    let p = admin.submit("/apis", &format!("/apis/requests/{req}/approve"), &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);

    // The owner approves in the dashboard: published at once.
    let page = own.get("/apis").await;
    assert!(page.body.contains(&format!("request-{req}")), "the owner sees the request");
    let p = own.submit("/apis", &format!("/apis/requests/{req}/approve"), &[]).await;
    assert_eq!(p.location.as_deref(), Some("/apis?msg=api_request_decided"), "{}", p.body);
    assert_eq!(c.get(&format!("/admin/v1/apis/{id}")).await.body["state"], "published");
    let again = c.post(&format!("/admin/v1/api-publish-requests/{req}/approve"), &json!({})).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "request_decided"));

    // A version's publication waits too; the root key rejects it through the API.
    admin.submit("/apis", &format!("/apis/{id}/state"), &[("state", "published"), ("version", "v1")]).await;
    let pending = c.get("/admin/v1/api-publish-requests?status=pending").await;
    assert_eq!(pending.body["data"][0]["version"], "v1");
    let req = pending.body["data"][0]["id"].as_str().unwrap().to_owned();
    let rejected = c.post(&format!("/admin/v1/api-publish-requests/{req}/reject"), &json!({})).await;
    assert_eq!((rejected.status, rejected.body["status"].as_str()), (StatusCode::OK, Some("rejected")));
    assert_eq!(c.get(&format!("/admin/v1/apis/{id}")).await.body["versions"][0]["state"], "draft");
    // A root key with apis:write is an owner: it publishes at once.
    let direct = c.patch(&format!("/admin/v1/apis/{id}/versions/v1"), &json!({"state": "published"})).await;
    assert_eq!(direct.body["versions"][0]["state"], "published");
    // A request that waited while the API moved on changes nothing when approved: an old
    // approval never withdraws a deprecation.
    let late = c.post("/admin/v1/apis", &json!({"name": "late"})).await.str("/id");
    admin.submit("/apis", &format!("/apis/{late}/state"), &[("state", "published")]).await;
    let waiting = c.get(&format!("/admin/v1/apis/{late}")).await.body["pending_publish_requests"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.patch(&format!("/admin/v1/apis/{late}"), &json!({"state": "published"})).await;
    c.patch(&format!("/admin/v1/apis/{late}"), &json!({"state": "deprecated"})).await;
    let approved = c.post(&format!("/admin/v1/api-publish-requests/{waiting}/approve"), &json!({})).await;
    assert_eq!(approved.body["status"], "approved");
    assert_eq!(c.get(&format!("/admin/v1/apis/{late}")).await.body["state"], "deprecated");
    // Another workspace's key finds no such request.
    let other_key = kg.root_key("team-b", &Permission::ALL).await.unwrap();
    let theirs = kg
        .client_with(Some(&other_key))
        .post(&format!("/admin/v1/api-publish-requests/{req}/approve"), &json!({}))
        .await;
    assert_eq!((theirs.status, theirs.code()), (StatusCode::NOT_FOUND, "publish_request_not_found"));
    kg.stop().await;
}

/// Two nodes on one PostgreSQL: an API retired through one node's admin API is retired at the
/// other's gateway, through the change feed (`api:<id>`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_retired_on_one_node_is_retired_on_the_other() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let up = MockUpstream::start().await.unwrap();
    let opts = Options { database_url: Some(db.url.clone()), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let c = a.client();
    let (_, token) = c.create_token(&json!({"name": "t"})).await;
    a.sync_index().await.unwrap();
    b.sync_index().await.unwrap();
    let id = c.post("/admin/v1/apis", &json!({"name": "orders"})).await.str("/id");
    let made =
        c.post("/admin/v1/routes", &json!({"id": "o", "path": "/o", "upstream": up.url(), "api": "orders"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    for state in ["published", "deprecated", "retired"] {
        let p = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"state": state})).await;
        assert_eq!(p.status, StatusCode::OK, "{state}: {:?}", p.body);
    }
    assert_eq!(call(&a, "/o/1", Some(&token)).await.0, StatusCode::GONE);
    // Node b hears of it through LISTEN/NOTIFY (or its poll): wait for it, bounded.
    let mut gone = false;
    for _ in 0..200 {
        if call(&b, "/o/1", None).await.0 == StatusCode::GONE {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(gone, "node b answers 410 for the API retired on node a");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// A GET through the gateway with header fields of its own (a name may repeat).
async fn call_with(
    kg: &TestKeygate,
    path: &str,
    token: &str,
    fields: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).bearer_auth(token);
    for (n, v) in fields {
        req = req.header(*n, *v);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn versions_told_apart_by_a_header_route_check_and_follow_their_own_version() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let made = c.post("/admin/v1/apis", &json!({"name": "orders", "versions": ["v1", "v2"]})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let id = made.str("/id");
    // One path; the version by `Accept-Version` (v1 without it), each with its own scope and
    // upstream (told apart here by the upstream's base path).
    let v1 = json!({"id": "orders-v1", "path": "/orders", "upstream": format!("{}/one", up.url()),
        "api": "orders", "version": "v1", "scopes": {"*": "orders:read"}});
    let v2 = json!({"id": "orders-v2", "path": "/orders", "upstream": format!("{}/two", up.url()),
        "headers": {"Accept-Version": ["2", "v2"]}, "api": "orders", "version": "v2", "scopes": {"*": "orders:v2"}});
    for r in [&v1, &v2] {
        let a = c.post("/admin/v1/routes", r).await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    }
    let got = c.get("/admin/v1/routes/orders-v2").await;
    assert_eq!(got.body["headers"], json!({"Accept-Version": ["2", "v2"]}), "{:?}", got.body);
    let (_, v1_only) = c.create_token(&json!({"name": "v1", "scopes": ["orders:read"]})).await;
    let (_, both) = c.create_token(&json!({"name": "both", "scopes": ["orders:read", "orders:v2"]})).await;
    kg.sync_index().await.unwrap();

    let uri = |b: &Value| b["uri"].as_str().unwrap_or_default().to_owned();
    let (status, _, body) = call_with(&kg, "/orders/7", &both, &[]).await;
    assert_eq!((status, uri(&body).as_str()), (StatusCode::OK, "/one/orders/7"), "no header: v1");
    for v in ["2", "v2"] {
        let (status, _, body) = call_with(&kg, "/orders/7", &both, &[("accept-version", v)]).await;
        assert_eq!((status, uri(&body).as_str()), (StatusCode::OK, "/two/orders/7"), "{v}");
        assert_eq!(body["headers"]["accept-version"], v, "the field reaches the upstream as sent");
    }
    let (status, _, body) = call_with(&kg, "/orders/7", &both, &[("accept-version", "9")]).await;
    assert_eq!((status, uri(&body).as_str()), (StatusCode::OK, "/one/orders/7"), "an unknown version: the default");
    // v2's scope is checked for v2's requests: a token holding v1's only is refused there.
    let (status, _, body) = call_with(&kg, "/orders/7", &v1_only, &[("accept-version", "2")]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));
    assert_eq!(call_with(&kg, "/orders/7", &v1_only, &[]).await.0, StatusCode::OK);
    // A field an upstream could read otherwise than keygate is refused, never routed: sent
    // twice, or in another letter case than the route's value.
    // Counted by reason in /metrics, exactly: a route table the change feed's follower rebuilds
    // meanwhile shares its counters with its successor (it used to drop a request's count).
    let counted = async || {
        let text = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
        let line = text.lines().find(|l| l.starts_with("keygate_gateway_refusals_total{reason=\"ambiguous_header\"}"));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let before = counted().await;
    for fields in [&[("accept-version", "1"), ("accept-version", "2")][..], &[("accept-version", "V2")]] {
        let (status, _, body) = call_with(&kg, "/orders/7", &both, fields).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("ambiguous_header")),
            "{fields:?}"
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("send it once"), "{body}");
    }
    // (A request is counted just after its answer is written: the count may trail the answer.)
    let mut now = counted().await;
    for _ in 0..100 {
        if now >= before + 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        now = counted().await;
    }
    assert_eq!(now, before + 2, "each refusal counted under ambiguous_header");

    // Each version follows its own lifecycle: v1 deprecated, v2 not.
    for p in [
        format!("/admin/v1/apis/{id}"),
        format!("/admin/v1/apis/{id}/versions/v1"),
        format!("/admin/v1/apis/{id}/versions/v2"),
    ] {
        assert_eq!(c.patch(&p, &json!({"state": "published"})).await.status, StatusCode::OK, "{p}");
    }
    // The dashboard's routes page and the portal say which field tells the version.
    let mut browser = owner(&kg).await;
    let page = browser.get("/routes").await;
    assert!(page.body.contains("Accept-Version: 2 | v2"), "{}", page.body);
    let portal = browser.get("/portal").await;
    assert!(portal.body.contains("accept-version: 2 | v2"), "{}", portal.body);
    // The portal's explorer sends the version's field, so its request reaches that version.
    let tried = browser
        .submit(
            "/portal/orders-v2",
            "/portal/orders-v2/try",
            &[("method", "GET"), ("path", "/orders/7"), ("token", &both)],
        )
        .await;
    assert!(tried.body.contains("HTTP 200") && tried.body.contains("/two/orders/7"), "{}", tried.body);
    let dep = c
        .patch(&format!("/admin/v1/apis/{id}/versions/v1"), &json!({"state": "deprecated", "successor": "/orders"}))
        .await;
    assert_eq!(dep.status, StatusCode::OK, "{:?}", dep.body);
    let (_, headers, _) = call_with(&kg, "/orders/7", &both, &[]).await;
    assert!(header(&headers, "deprecation").is_some(), "v1 is deprecated");
    let (_, headers, _) = call_with(&kg, "/orders/7", &both, &[("accept-version", "2")]).await;
    assert_eq!(header(&headers, "deprecation"), None, "v2 is not");

    // Routes a request could not tell apart, and fields that cannot select a route, are refused.
    for (bad, says) in [
        (
            json!({"id": "dup", "path": "/orders", "upstream": up.url(), "headers": {"accept-version": "v2"}}),
            "a value in common",
        ),
        (
            json!({"id": "auth", "path": "/orders", "upstream": up.url(), "headers": {"authorization": "x"}}),
            "cannot select a route",
        ),
        (
            json!({"id": "list", "path": "/orders", "upstream": up.url(), "headers": {"accept-version": "1, 2"}}),
            "no comma",
        ),
        (
            json!({"id": "num", "path": "/orders", "upstream": up.url(), "headers": {"accept-version": 2}}),
            "a list of them",
        ),
    ] {
        let a = c.post("/admin/v1/routes", &bad).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{bad}: {:?}", a.body);
        assert!(a.str("/error/message").contains(says), "{bad}: {:?}", a.body);
    }
}
