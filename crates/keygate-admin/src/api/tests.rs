//! Router tests with `oneshot` (no server): every operation of the generated OpenAPI document
//! refuses a request without a credential, and every write refuses a read-only key.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keygate_core::model::{Actor, Permission};
use keygate_core::secret::{OsRandom, Pepper};
use keygate_core::store::Store;
use keygate_core::{ManualClock, Timestamp};
use tower::ServiceExt;

use super::{AdminState, api_router, router};
use crate::service::{Admin, AdminSettings};

async fn setup() -> (axum::Router, Arc<Admin>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = keygate_store::open(&keygate_store::StoreLocation::DataDir(dir.path().to_owned())).await.unwrap();
    let store: Arc<dyn Store> = store;
    let clock = ManualClock::new(Timestamp::from_millis(1_900_000_000_000));
    let admin = Arc::new(Admin::new(
        store,
        Pepper::new(&[5; 32]).unwrap(),
        AdminSettings::default(),
        Arc::new(clock),
        Arc::new(OsRandom),
    ));
    admin.bootstrap().await.unwrap();
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
        let concrete = path.replace("{id}", "tok_000000000000").replace("{scope}", "orders:read");
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

#[tokio::test]
async fn every_operation_requires_a_credential() {
    let (app, _admin, _dir) = setup().await;
    let ops = operations();
    assert!(ops.len() >= 18, "{ops:?}");
    for (method, path) in ops {
        let (status, body) = call(&app, &method, &path, None).await;
        if path == "/admin/v1/health" {
            assert_eq!(status, StatusCode::OK);
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
