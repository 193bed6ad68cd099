//! Router tests with `oneshot` (no server): every operation of the generated OpenAPI document
//! refuses a request without a credential, and every write refuses a read-only key.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keygate_core::model::{Actor, Permission};
use tower::ServiceExt;

use super::{AdminState, api_router, router};
use crate::service::Admin;

async fn setup() -> (axum::Router, Arc<Admin>, tempfile::TempDir) {
    let (admin, _clock, dir, _ws) = crate::testing::admin().await;
    let oauth = Arc::new(
        crate::oauth::OAuth::new(admin.clone(), crate::oauth::OAuthSettings::for_issuer("http://127.0.0.1:8080"))
            .unwrap(),
    );
    (router(AdminState { admin: admin.clone(), oauth }), admin, dir)
}

/// Every (method, concrete path) of the OpenAPI document.
fn operations() -> Vec<(String, String)> {
    let (_, doc) = api_router();
    let doc = serde_json::to_value(doc).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete =
            path.replace("{id}", "tok_000000000000").replace("{scope}", "orders:read").replace("{version}", "v1");
        for method in item.as_object().unwrap().keys() {
            out.push((method.to_uppercase(), concrete.clone()));
        }
    }
    out
}

async fn call(app: &axum::Router, method: &str, path: &str, key: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = app.clone().oneshot(req.body(Body::from("{}")).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

/// The operations that need no credential: health, liveness, readiness.
const PUBLIC: [&str; 3] = ["/admin/v1/health", "/healthz", "/readyz"];

#[tokio::test]
async fn every_operation_requires_a_credential() {
    let (app, _admin, _dir) = setup().await;
    let ops = operations();
    assert!(ops.len() >= 18, "{ops:?}");
    for (method, path) in ops {
        let (status, body) = call(&app, &method, &path, None).await;
        if PUBLIC.contains(&path.as_str()) {
            // Readiness: this router has no token index (the binary gives it the gateway's).
            let want = if path == "/readyz" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            assert_eq!(status, want, "{path}: {body}");
            continue;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(body["error"]["code"], "missing_credentials", "{method} {path}");
    }
}

#[tokio::test]
async fn every_write_refuses_a_read_only_key() {
    let (app, admin, _dir) = setup().await;
    let read_all = vec![
        Permission::TokensRead,
        Permission::AppsRead,
        Permission::PlansRead,
        Permission::AuditRead,
        Permission::RootKeysRead,
        Permission::RoutesRead,
        Permission::WorkspacesRead,
        Permission::WebhooksRead,
        Permission::ProvidersRead,
        Permission::ApisRead,
    ];
    let (_, key) = admin.create_root_key("default", "reader", read_all, &Actor::cli()).await.unwrap();
    for (method, path) in operations() {
        let (status, body) = call(&app, &method, &path, Some(key.expose())).await;
        if method == "GET" {
            assert_ne!(status, StatusCode::FORBIDDEN, "{method} {path}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
            assert_eq!(body["error"]["code"], "missing_permission");
        }
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let (app, _admin, _dir) = setup().await;
    assert_eq!(call(&app, "GET", "/admin/v2/tokens", None).await.1["error"]["code"], "route_not_found");
    assert_eq!(call(&app, "DELETE", "/admin/v1/tokens", None).await.1["error"]["code"], "method_not_allowed");
}

/// Every operation documents the answers the API's layers can give it (schemathesis holds every
/// status code to the document): 401/403 where a key is needed, 400/413/415 where a body is read.
#[test]
fn every_operation_documents_its_common_answers() {
    let doc = serde_json::to_value(api_router().1).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let has = |status: &str| op["responses"].get(status).is_some();
            if !PUBLIC.contains(&path.as_str()) {
                assert!(has("401") && has("403"), "{method} {path}");
            }
            if op.get("requestBody").is_some() {
                assert!(has("400") && has("413") && has("415"), "{method} {path}");
            }
            if path.contains('{') {
                assert!(has("404"), "{method} {path}");
            }
        }
    }
}

/// The served document states what the service checks: sizes, characters, ranges.
#[tokio::test]
async fn the_served_document_states_the_limits_the_service_enforces() {
    let (app, _admin, _dir) = setup().await;
    let (status, doc) = call(&app, "GET", "/admin/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let name = &doc["components"]["schemas"]["CreateTokenRequest"]["properties"]["name"];
    assert_eq!((name["minLength"].as_u64(), name["maxLength"].as_u64()), (Some(1), Some(200)));
    assert!(doc["components"]["schemas"]["CreateTokenRequest"]["not"].is_object(), "expires_in xor expires_at");
    let grace = &doc["components"]["schemas"]["RotateTokenRequest"]["properties"]["grace_period_seconds"];
    assert_eq!(grace["maximum"].as_u64(), Some(30 * 86_400), "the configured maximum");
    let params = doc["paths"]["/admin/v1/tokens"]["get"]["parameters"].as_array().unwrap();
    let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!((limit["schema"]["minimum"].as_u64(), limit["schema"]["maximum"].as_u64()), (Some(1), Some(500)));
    let revoke = &doc["paths"]["/admin/v1/tokens/{id}/revoke"]["post"]["requestBody"];
    assert_eq!(revoke["required"], false, "a body whose fields are all optional may be left out");
}

/// What the document allows is accepted, what it refuses is refused: integral numbers written
/// with a fraction, page sizes, cursors, bodies that are not objects.
#[tokio::test]
async fn bodies_and_queries_are_read_as_the_document_states() {
    let (app, admin, _dir) = setup().await;
    let (_, key) = admin.create_root_key("default", "k", Permission::ALL.to_vec(), &Actor::cli()).await.unwrap();
    let send = |method: &'static str, path: &'static str, body: &'static str| {
        let app = app.clone();
        let key = key.expose().to_owned();
        async move {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"))
                .body(Body::from(body))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default())
        }
    };
    let (status, body) = send(
        "POST",
        "/admin/v1/tokens",
        r#"{"name":"n","expires_in":60.0,"rate_limit":{"requests":1e1,"per_seconds":1},"metadata":{"v":2.0}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["rate_limit"]["requests"], 10);
    // The caller's own metadata is kept as sent.
    assert!(body["metadata"]["v"].is_f64(), "{body}");
    let (status, body) = send("POST", "/admin/v1/tokens", r#"{"name":"n","expires_in":60.5}"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")));
    let (status, body) = send("PUT", "/admin/v1/scopes/orders:read", "[null, null]").await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")));
    for bad in ["/admin/v1/tokens?limit=0", "/admin/v1/apps?limit=501", "/admin/v1/audit-events?limit=4294967295"] {
        let (status, body) = send("GET", bad, "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_query")), "{bad}");
    }
    for bad in ["/admin/v1/tokens?cursor=0.5", "/admin/v1/apps?cursor=", "/admin/v1/audit-events?cursor=x"] {
        let (status, body) = send("GET", bad, "").await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_cursor")),
            "{bad}"
        );
    }
    let (status, _) = send("GET", "/admin/v1/tokens?limit=500&cursor=1900000000000.tok_abc", "").await;
    assert_eq!(status, StatusCode::OK);
}

/// What the verifier was asked: token, scope, cost, ip, workspace.
type Asked = (String, Option<String>, u32, Option<std::net::IpAddr>, String);

/// A verifier that records what it was asked and answers as told.
struct FakeVerifier {
    asked: parking_lot::Mutex<Vec<Asked>>,
}

#[async_trait::async_trait]
impl keygate_core::verify::TokenVerifier for FakeVerifier {
    async fn verify(&self, req: &keygate_core::verify::VerifyRequest<'_>) -> keygate_core::verify::Verification {
        use keygate_core::verify::{LimitState, Verification, VerifiedToken, VerifyCode};
        self.asked.lock().push((
            req.token.to_owned(),
            req.scope.map(ToString::to_string),
            req.cost,
            req.ip,
            req.workspace.to_string(),
        ));
        if req.token == "kg_refused" {
            return Verification::refused(VerifyCode::UnknownToken);
        }
        Verification {
            code: VerifyCode::Ok,
            token: Some(VerifiedToken {
                token_id: "tok_abc".into(),
                app_id: "app_abc".into(),
                workspace_id: req.workspace.to_string(),
                scopes: vec!["orders:read".into()],
                expires_at: None,
            }),
            rate_limit: None,
            quota: Some(LimitState { limit: 10, remaining: 9, reset_at: None }),
        }
    }
}

/// `POST /admin/v1/verify`: its own permission, what it passes to the verifier, its 400s, and 503
/// on a node without a token index.
#[tokio::test]
async fn verify_asks_the_verifier_with_the_keys_workspace() {
    let (app, admin, _dir) = setup().await;
    let (_, key) = admin.create_root_key("default", "v", vec![Permission::TokensVerify], &Actor::cli()).await.unwrap();
    let post = |body: &'static str, key: String| {
        let app = app.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri("/admin/v1/verify")
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"))
                .body(Body::from(body))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default())
        }
    };
    let k = || key.expose().to_owned();
    let (status, body) = post(r#"{"token":"kg_x"}"#, k()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("verification_unavailable"))
    );

    let fake = Arc::new(FakeVerifier { asked: parking_lot::Mutex::new(Vec::new()) });
    admin.set_verifier(fake.clone());
    let (status, body) = post(r#"{"token":"kg_x","scope":"orders:read","cost":3.0,"ip":"10.0.0.1"}"#, k()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["valid"], true);
    assert_eq!(body["code"], "ok");
    assert_eq!(body["token_id"], "tok_abc");
    assert_eq!(body["quota"], serde_json::json!({"limit": 10, "remaining": 9}));
    assert!(body.get("rate_limit").is_none() && body.get("expires_at").is_none(), "{body}");
    let ws = admin.store().workspace_by_name("default").await.unwrap().unwrap().id.to_string();
    let asked = fake.asked.lock().pop().unwrap();
    assert_eq!(asked, ("kg_x".into(), Some("orders:read".into()), 3, Some("10.0.0.1".parse().unwrap()), ws));
    let (_, body) = post(r#"{"token":"kg_x"}"#, k()).await;
    assert_eq!(body["valid"], true);
    assert_eq!(fake.asked.lock().pop().unwrap().2, 1, "cost defaults to 1");
    let (status, body) = post(r#"{"token":"kg_refused"}"#, k()).await;
    assert_eq!((status, body), (StatusCode::OK, serde_json::json!({"valid": false, "code": "unknown_token"})));
    fake.asked.lock().clear();

    for (bad, code) in [
        ("{}", "invalid_body"),
        ("{", "malformed_json"),
        (r#"{"token":""}"#, "invalid_token_field"),
        (r#"{"token":"kg_x","cost":1001}"#, "invalid_cost"),
        (r#"{"token":"kg_x","cost":-1}"#, "invalid_cost"),
        (r#"{"token":"kg_x","cost":1.5}"#, "invalid_body"),
        (r#"{"token":"kg_x","scope":"orders:*"}"#, "invalid_scope"),
        (r#"{"token":"kg_x","ip":"10.0.0.0/8"}"#, "invalid_ip"),
    ] {
        let (status, body) = post(bad, k()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{bad}");
    }
    assert!(fake.asked.lock().is_empty(), "nothing invalid reaches the verifier");

    let (_, reader) = admin.create_root_key("default", "r", vec![Permission::TokensRead], &Actor::cli()).await.unwrap();
    let (status, body) = post(r#"{"token":"kg_x"}"#, reader.expose().to_owned()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("missing_permission")));
}
