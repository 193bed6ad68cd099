//! Request validation (issue 17), from outside: a route that validates (`validate`, or its API
//! version's `validate`) checks each request against its API's OpenAPI document after the
//! credential and before the upstream — a valid request is forwarded as it came, an invalid one
//! is answered 400 `request_invalid` as an RFC 9457 problem document naming the field, an
//! unauthenticated one 401 before any validation — and the admin API refuses what would leave a
//! validating route without a document it can use.

use keygate_testkit::{MockUpstream, StatusCode, TestKeygate};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {"title": "shop", "version": "1"},
        "paths": {
            "/items": {
                "get": {"parameters": [
                    {"name": "limit", "in": "query", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": 100}}
                ]},
                "post": {"requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}}
            },
            "/items/{id}": {"get": {"parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}]}}
        },
        "components": {"schemas": {
            "Order": {"type": "object", "required": ["items"], "properties": {
                "items": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Line"}},
                "note": {"type": "string", "maxLength": 20}
            }},
            "Line": {"type": "object", "required": ["sku", "price"], "properties": {
                "sku": {"type": "string"},
                "price": {"type": "number", "minimum": 0}
            }}
        }}
    })
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

async fn send(kg: &TestKeygate, method: &str, path: &str, token: Option<&str>, body: Option<(&str, String)>) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", kg.gateway_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    Answer { status, headers, body: resp.json().await.unwrap_or(Value::Null) }
}

fn content_type(h: &HeaderMap) -> &str {
    h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default()
}

#[tokio::test]
async fn a_validating_route_forwards_valid_requests_and_refuses_invalid_ones_naming_the_field() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (_, token) = c.create_token(&json!({"name": "shopper"})).await;
    kg.sync_index().await.unwrap();
    let t = Some(token.as_str());

    let made =
        c.post("/admin/v1/apis", &json!({"name": "shop", "openapi": document(), "versions": ["v1", "v2"]})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let id = made.str("/id");
    // The document's paths are those the upstream receives: the route strips its prefix.
    let route = json!({"id": "shop", "path": "/shop", "upstream": up.url(), "strip_prefix": true, "api": "shop", "validate": true});
    let r = c.post("/admin/v1/routes", &route).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["validate"], true);

    // A valid request is forwarded, its body as it came.
    let order = json!({"items": [{"sku": "A-1", "price": 9.5}], "note": "gift"}).to_string();
    let a = send(&kg, "POST", "/shop/items", t, Some(("application/json", order.clone()))).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!((a.body["method"].as_str(), a.body["uri"].as_str()), (Some("POST"), Some("/items")));
    assert_eq!(a.body["body_len"], order.len());
    let a = send(&kg, "GET", "/shop/items?limit=10", t, None).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(send(&kg, "GET", "/shop/items/42", t, None).await.status, StatusCode::OK);

    // A body field of the wrong type: 400, a problem document naming the field.
    let bad = json!({"items": [{"sku": "A-1", "price": "a secret price"}]}).to_string();
    let a = send(&kg, "POST", "/shop/items", t, Some(("application/json", bad))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{:?}", a.body);
    assert_eq!(content_type(&a.headers), "application/problem+json");
    assert_eq!(a.body["code"], "request_invalid");
    assert_eq!(a.body["error"]["code"], "request_invalid");
    assert_eq!(a.body["status"], 400);
    assert_eq!(
        a.body["errors"],
        json!([{"location": "body", "pointer": "/items/0/price", "message": "must be a number"}])
    );
    assert_eq!(a.body["detail"], "body /items/0/price: must be a number");
    assert!(!a.body.to_string().contains("a secret price"), "a value is never echoed: {}", a.body);
    // Several errors, each named; malformed JSON.
    let worse = json!({"items": [{"price": -1}], "note": "x".repeat(30)}).to_string();
    let a = send(&kg, "POST", "/shop/items", t, Some(("application/json", worse))).await;
    let mut pointers: Vec<&str> =
        a.body["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
    pointers.sort();
    assert_eq!(pointers, vec!["/items/0/price", "/items/0/sku", "/note"], "{:?}", a.body);
    let a = send(&kg, "POST", "/shop/items", t, Some(("application/json", "{\"items\": [".into()))).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("request_invalid")));

    // A missing required query parameter, and one out of range; a path parameter.
    let a = send(&kg, "GET", "/shop/items", t, None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["errors"], json!([{"location": "query", "name": "limit", "message": "is required"}]));
    assert_eq!(a.body["detail"], "query parameter limit: is required");
    let a = send(&kg, "GET", "/shop/items?limit=1000", t, None).await;
    assert_eq!(a.body["errors"][0]["message"], "must be at most 100");
    let a = send(&kg, "GET", "/shop/items/abc", t, None).await;
    assert_eq!(a.body["errors"], json!([{"location": "path", "name": "id", "message": "must be an integer"}]));

    // An operation the document does not have; a method it does not take; a media type.
    let a = send(&kg, "GET", "/shop/carts", t, None).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::NOT_FOUND, Some("operation_not_found")));
    let a = send(&kg, "DELETE", "/shop/items/1", t, None).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
    assert_eq!(a.headers.get("allow").and_then(|v| v.to_str().ok()), Some("GET"));
    let a = send(&kg, "POST", "/shop/items", t, Some(("text/plain", "hello".into()))).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"))
    );

    // Without a credential: 401 before any validation (nothing of the document is told).
    let a = send(&kg, "GET", "/shop/carts", None, None).await;
    assert_eq!((a.status, a.body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_token")));
    let a =
        send(&kg, "POST", "/shop/items", Some("kg_live_not_a_token"), Some(("application/json", "[]".into()))).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Refusals are counted by reason.
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keygate_gateway_refusals_total{reason=\"request_invalid\"} 6"), "{metrics}");
    assert!(metrics.contains("keygate_gateway_refusals_total{reason=\"operation_not_found\"} 1"), "{metrics}");

    // The admin API refuses what would leave a validating route without a usable document.
    let broken = json!({"openapi": "3.0.3", "paths": {"/items": {"get": {"parameters": [
        {"name": "q", "in": "query", "schema": {"type": "string", "pattern": "(?=lookahead)"}}
    ]}}}});
    let a = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"openapi": broken})).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_openapi"), "{:?}", a.body);
    assert!(a.str("/error/message").contains("pattern"), "{:?}", a.body);
    let a = c.patch(&format!("/admin/v1/apis/{id}"), &json!({"openapi": null})).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_openapi"), "{:?}", a.body);
    let plain = c.post("/admin/v1/apis", &json!({"name": "plain"})).await;
    assert_eq!(plain.status, StatusCode::CREATED);
    let a = c
        .post(
            "/admin/v1/routes",
            &json!({"id": "p", "path": "/p", "upstream": up.url(), "api": "plain", "validate": true}),
        )
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{:?}", a.body);
    let a = c.post("/admin/v1/routes", &json!({"id": "p", "path": "/p", "upstream": up.url(), "validate": true})).await;
    assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{:?}", a.body);
    // The route still validates with the document it had.
    assert_eq!(send(&kg, "GET", "/shop/items", t, None).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn validation_is_turned_on_for_a_version() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (_, token) = c.create_token(&json!({"name": "shopper"})).await;
    kg.sync_index().await.unwrap();
    let t = Some(token.as_str());
    let made =
        c.post("/admin/v1/apis", &json!({"name": "shop", "openapi": document(), "versions": ["v1", "v2"]})).await;
    let id = made.str("/id");
    let route =
        json!({"id": "shop-v2", "path": "/v2", "upstream": up.url(), "strip_prefix": true, "api": id, "version": "v2"});
    assert_eq!(c.post("/admin/v1/routes", &route).await.status, StatusCode::CREATED);

    // Not validating yet: an invalid request is forwarded.
    assert_eq!(send(&kg, "GET", "/v2/items", t, None).await.status, StatusCode::OK);
    // The version's flag turns it on for every route serving the version.
    let p = c.patch(&format!("/admin/v1/apis/{id}/versions/v2"), &json!({"validate": true})).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    assert_eq!(p.body["versions"][1]["validate"], true);
    assert_eq!(p.body["versions"][0]["validate"], false);
    let a = send(&kg, "GET", "/v2/items", t, None).await;
    assert_eq!((a.status, a.body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("request_invalid")));
    assert_eq!(a.body["errors"][0]["name"], "limit");
    assert_eq!(send(&kg, "GET", "/v2/items?limit=5", t, None).await.status, StatusCode::OK);
    // Kept with the API, and turned off again.
    assert_eq!(c.get(&format!("/admin/v1/apis/{id}")).await.body["versions"][1]["validate"], true);
    let p = c.patch(&format!("/admin/v1/apis/{id}/versions/v2"), &json!({"validate": false})).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(send(&kg, "GET", "/v2/items", t, None).await.status, StatusCode::OK);
    // A version of an API without a document cannot validate.
    let plain = c.post("/admin/v1/apis", &json!({"name": "plain", "versions": ["v1"]})).await;
    let pid = plain.str("/id");
    let r = json!({"id": "plain", "path": "/plain", "upstream": up.url(), "api": pid, "version": "v1"});
    assert_eq!(c.post("/admin/v1/routes", &r).await.status, StatusCode::CREATED);
    let p = c.patch(&format!("/admin/v1/apis/{pid}/versions/v1"), &json!({"validate": true})).await;
    assert_eq!((p.status, p.code()), (StatusCode::BAD_REQUEST, "invalid_openapi"), "{:?}", p.body);
}
