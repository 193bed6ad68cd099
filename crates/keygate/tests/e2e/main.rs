//! End-to-end tests: a whole keygate started by the testkit on ephemeral ports with a temporary
//! store, driven through its admin API and its command line. No fixed ports, no sleeps: time is a
//! manual clock, and the token index is synchronized explicitly.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod admin_hardening;
mod ai_gateway;
mod anomaly;
mod answer_framing;
mod apis;
mod audit_chain;
mod cache;
mod calls;
mod cli;
mod cluster;
mod dashboard;
mod dashboard_routes;
mod dns;
mod edge_conn;
mod edge_headers;
mod edge_policy;
mod edge_upgrade;
mod email;
mod faults;
mod fuzz_finds;
mod gateway;
mod governance;
mod health;
mod leak_response;
mod oauth;
mod oauth_hardening;
mod root_keys;
mod rotation_policy;
mod routes_live;
mod shared_limits;
mod siem;
mod subscriptions;
mod upstream_h2;
mod upstream_tls;
mod validation;
mod verify;
mod webhooks;
mod workspaces;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use keygate_core::Timestamp;
use keygate_core::model::Permission;
use keygate_gateway::index::Refusal;
use keygate_testkit::{Method, StatusCode, TestKeygate};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

async fn audit_count(kg: &TestKeygate) -> usize {
    let a = kg.client().get("/admin/v1/audit-events?limit=500").await;
    a.body["data"].as_array().map_or(0, Vec::len)
}

async fn token_count(kg: &TestKeygate) -> usize {
    let a = kg.client().get("/admin/v1/tokens?limit=500").await;
    a.body["data"].as_array().map_or(0, Vec::len)
}

/// Reads from a test upstream's connection until a whole request head has come; `false` if the
/// connection closed or failed first.
async fn read_request_head(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

fn now(kg: &TestKeygate) -> Timestamp {
    use keygate_core::Clock;
    kg.clock.now()
}

#[tokio::test]
async fn token_lifecycle_through_the_admin_api() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();

    let created = c
        .post(
            "/admin/v1/tokens",
            &json!({
                "name": "billing-ci", "scopes": ["orders:read", "invoice:read:own"], "expires_in": 3600,
                "ip_allowlist": ["10.0.0.0/8", "2001:db8::1"], "rate_limit": {"requests": 10, "per_seconds": 1, "burst": 5},
                "quota": {"requests": 1000, "period": "month"}, "metadata": {"team": "billing"}
            }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let id = created.str("/id");
    let secret = created.str("/token");
    assert!(secret.starts_with("kg_") && secret.len() == 64, "{secret}");
    assert_eq!(created.str("/status"), "active");
    assert_eq!(created.str("/display"), format!("kg_{}…{}", &id[4..], &secret[60..]));
    assert_eq!(created.body["ip_allowlist"], json!(["10.0.0.0/8", "2001:db8::1/128"]));

    // The secret is shown once: never by show or list.
    let shown = c.get(&format!("/admin/v1/tokens/{id}")).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.body.get("token").is_none());
    assert!(!shown.body.to_string().contains(&secret[15..]));
    let listed = c.get("/admin/v1/tokens").await;
    assert!(!listed.body.to_string().contains(&secret[15..]));

    kg.sync_index().await.unwrap();
    let entry = kg.index().verify(&secret, now(&kg)).unwrap();
    assert_eq!(entry.token_id().as_str(), id);

    // Update without reissuing: the same secret now carries the new scopes.
    let updated = c
        .patch(
            &format!("/admin/v1/tokens/{id}"),
            &json!({"scopes": ["orders:*"], "rate_limit": null, "name": "renamed"}),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{:?}", updated.body);
    assert_eq!(updated.body["scopes"], json!(["orders:*"]));
    assert_eq!(updated.body["rate_limit"], Value::Null);
    assert_eq!(updated.body["quota"]["requests"], 1000, "fields not named stay as they were");
    kg.sync_index().await.unwrap();
    let entry = kg.index().verify(&secret, now(&kg)).unwrap();
    assert!(entry.has_scope(&keygate_core::scope::Scope::parse("orders:write").unwrap()));

    // Suspend and resume.
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await.str("/status"), "suspended");
    kg.sync_index().await.unwrap();
    assert_eq!(kg.index().verify(&secret, now(&kg)).unwrap_err(), Refusal::Suspended);
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/resume"), &json!({})).await.str("/status"), "active");
    kg.sync_index().await.unwrap();
    assert!(kg.index().verify(&secret, now(&kg)).is_ok());

    // Rotate with a grace period: both work until it ends, then only the new one.
    let rotated = c.post(&format!("/admin/v1/tokens/{id}/rotate"), &json!({"grace_period_seconds": 60})).await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{:?}", rotated.body);
    let new_id = rotated.str("/id");
    let new_secret = rotated.str("/token");
    assert_ne!(new_secret, secret);
    assert_eq!(rotated.str("/rotated_from"), id);
    assert_eq!(rotated.body["scopes"], json!(["orders:*"]));
    let old = c.get(&format!("/admin/v1/tokens/{id}")).await;
    assert_eq!(old.str("/replaced_by"), new_id);
    let born = c.get(&format!("/admin/v1/audit-events?target={new_id}")).await;
    assert_eq!(born.body["data"][0]["action"], "token.create", "the new token has its own audit trail");
    assert_eq!(born.body["data"][0]["after"]["rotated_from"], id.as_str());
    let extend = c.patch(&format!("/admin/v1/tokens/{id}"), &json!({"expires_in": 86400})).await;
    assert_eq!(extend.code(), "token_rotated", "a rotated-out token's grace period cannot be extended");
    kg.sync_index().await.unwrap();
    assert!(kg.index().verify(&secret, now(&kg)).is_ok());
    assert!(kg.index().verify(&new_secret, now(&kg)).is_ok());
    kg.clock.advance_seconds(60);
    assert_eq!(kg.index().verify(&secret, now(&kg)).unwrap_err(), Refusal::Expired);
    assert!(kg.index().verify(&new_secret, now(&kg)).is_ok());
    assert_eq!(c.get(&format!("/admin/v1/tokens/{id}")).await.str("/status"), "expired");
    let again = c.post(&format!("/admin/v1/tokens/{id}/rotate"), &json!({})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // Revoke with a reason: final.
    let revoked = c.post(&format!("/admin/v1/tokens/{new_id}/revoke"), &json!({"reason": "leaked in a log"})).await;
    assert_eq!(revoked.str("/status"), "revoked");
    assert_eq!(revoked.str("/revoke_reason"), "leaked in a log");
    kg.sync_index().await.unwrap();
    assert_eq!(kg.index().verify(&new_secret, now(&kg)).unwrap_err(), Refusal::Unknown);
    let resume = c.post(&format!("/admin/v1/tokens/{new_id}/resume"), &json!({})).await;
    assert_eq!((resume.status, resume.code()), (StatusCode::CONFLICT, "token_revoked"));
    let patch = c.patch(&format!("/admin/v1/tokens/{new_id}"), &json!({"name": "x"})).await;
    assert_eq!(patch.code(), "token_revoked");

    // Expiry by time.
    let (short_id, short_secret) = c.create_token(&json!({"name": "short", "expires_in": 10})).await;
    kg.sync_index().await.unwrap();
    assert!(kg.index().verify(&short_secret, now(&kg)).is_ok());
    kg.clock.advance_seconds(10);
    assert_eq!(kg.index().verify(&short_secret, now(&kg)).unwrap_err(), Refusal::Expired);
    assert_eq!(c.get(&format!("/admin/v1/tokens/{short_id}")).await.str("/status"), "expired");

    // Filters.
    let expired = c.get("/admin/v1/tokens?status=expired").await;
    assert_eq!(expired.body["data"].as_array().unwrap().len(), 2);
    let by_name = c.get("/admin/v1/tokens?q=RENAMED").await;
    assert_eq!(by_name.body["data"].as_array().unwrap().len(), 2, "the rotated token keeps the name");
    let bad = c.get("/admin/v1/tokens?status=sleeping").await;
    assert_eq!(bad.code(), "invalid_query");

    // Every change wrote an audit event with who, what, and the changed fields.
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}")).await;
    // (keygate's own notices, such as token.expiring, may be there too: recorded by a background
    // sweep, they are not changes made through the API.)
    let made: Vec<&Value> = trail.body["data"].as_array().unwrap().iter().filter(|e| e["actor"] != "system").collect();
    let actions: Vec<&str> = made.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["token.rotate", "token.resume", "token.suspend", "token.update", "token.create"]);
    let update = made[3];
    assert_eq!(update["before"]["name"], "billing-ci");
    assert_eq!(update["after"]["name"], "renamed");
    assert!(update["before"].get("quota").is_none(), "unchanged fields are not recorded");
    assert!(update["actor"].as_str().unwrap().starts_with("rk_"));
    assert_eq!(update["source"], "127.0.0.1");
    assert!(!trail.body.to_string().contains(&secret[15..]), "no secret in the audit trail");
    kg.stop().await;
}

#[tokio::test]
async fn the_index_follows_the_change_feed_by_itself() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (id, secret) = c.create_token(&json!({"name": "a"})).await;
    // No explicit sync: the background follower applies the commit on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while kg.index().verify(&secret, now(&kg)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the follower never applied the creation");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    c.post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
    while kg.index().verify(&secret, now(&kg)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "the follower never applied the revocation");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    kg.stop().await;
}

#[tokio::test]
async fn apps_plans_and_the_scope_catalog() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let apps = c.get("/admin/v1/apps").await;
    assert_eq!(apps.body["data"][0]["is_default"], true, "a default app exists from the start");

    let plan = c
        .post(
            "/admin/v1/plans",
            &json!({"name": "free", "scopes": ["orders:read"], "rate_limit": {"requests": 5, "per_seconds": 1}}),
        )
        .await;
    assert_eq!(plan.status, StatusCode::CREATED, "{:?}", plan.body);
    let plan_id = plan.str("/id");
    let app = c.post("/admin/v1/apps", &json!({"name": "Mobile", "plan_id": plan_id})).await;
    assert_eq!(app.status, StatusCode::CREATED);
    let app_id = app.str("/id");

    // The plan bounds the scopes and supplies default limits.
    let t = c.post("/admin/v1/tokens", &json!({"name": "m", "app_id": app_id, "scopes": ["orders:read"]})).await;
    assert_eq!(t.status, StatusCode::CREATED, "{:?}", t.body);
    assert_eq!(t.body["rate_limit"]["requests"], 5);
    let t2 = c.post("/admin/v1/tokens", &json!({"name": "m", "app_id": app_id, "scopes": ["orders:write"]})).await;
    assert_eq!((t2.status, t2.code()), (StatusCode::CONFLICT, "scope_not_in_plan"));

    // A plan changes in place; its apps' tokens keep what they were given.
    let plan_path = format!("/admin/v1/plans/{plan_id}");
    let changed =
        c.patch(&plan_path, &json!({"scopes": ["orders:*"], "rate_limit": null, "description": "all orders"})).await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    assert_eq!(changed.body["scopes"], json!(["orders:*"]));
    assert_eq!((&changed.body["rate_limit"], changed.str("/name")), (&Value::Null, "free".to_owned()));
    assert_eq!(c.get(&format!("/admin/v1/tokens/{}", t.str("/id"))).await.body["rate_limit"]["requests"], 5);
    let t3 = c.post("/admin/v1/tokens", &json!({"name": "m", "app_id": app_id, "scopes": ["orders:write"]})).await;
    assert_eq!((t3.status, t3.body["rate_limit"].clone()), (StatusCode::CREATED, Value::Null), "{:?}", t3.body);
    let update = c.get(&format!("/admin/v1/audit-events?action=plan.update&target={plan_id}")).await;
    assert_eq!(update.body["data"][0]["before"]["scopes"], json!(["orders:read"]));
    assert!(update.body["data"][0]["after"].get("name").is_none(), "only changed fields are recorded");
    let events = audit_count(&kg).await;
    assert_eq!(c.patch(&plan_path, &json!({"scopes": ["orders:*"]})).await.status, StatusCode::OK);
    assert_eq!(audit_count(&kg).await, events, "a change that changes nothing writes nothing");
    c.post("/admin/v1/plans", &json!({"name": "pro"})).await;
    assert_eq!(c.patch(&plan_path, &json!({"name": "pro"})).await.code(), "plan_exists");
    assert_eq!(c.patch(&plan_path, &json!({"quota": {"requests": 0, "period": "day"}})).await.code(), "invalid_quota");
    assert_eq!(c.patch("/admin/v1/plans/plan_x", &json!({"name": "x"})).await.code(), "plan_not_found");
    assert_eq!(c.patch(&plan_path, &json!({"rate": 1})).await.code(), "invalid_body");

    // A non-empty catalog bounds every token's scopes.
    let put = c
        .send(
            Method::PUT,
            "/admin/v1/scopes/orders:read",
            Some(&json!({"description": "Read orders", "api": "orders"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    let unknown = c.post("/admin/v1/tokens", &json!({"name": "x", "scopes": ["users:read"]})).await;
    assert_eq!(unknown.code(), "unknown_scope");
    let wildcard = c.post("/admin/v1/tokens", &json!({"name": "x", "scopes": ["orders:*"]})).await;
    assert_eq!(wildcard.status, StatusCode::CREATED, "a wildcard covering catalog scopes is allowed");
    assert_eq!(c.get("/admin/v1/scopes").await.body["data"][0]["scope"], "orders:read");

    // Deleting an app with tokens needs revoke_tokens=true; the default app stays.
    let del = c.delete(&format!("/admin/v1/apps/{app_id}")).await;
    assert_eq!(del.code(), "app_has_tokens");
    let del = c.delete(&format!("/admin/v1/apps/{app_id}?revoke_tokens=true")).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(c.get(&format!("/admin/v1/apps/{app_id}")).await.status, StatusCode::NOT_FOUND);
    let default_id = apps.str("/data/0/id");
    assert_eq!(c.delete(&format!("/admin/v1/apps/{default_id}")).await.code(), "default_app");
    let renamed = c.patch(&format!("/admin/v1/apps/{default_id}"), &json!({"description": null, "name": "Main"})).await;
    assert_eq!(renamed.str("/name"), "Main");
    kg.stop().await;
}

#[tokio::test]
async fn workspaces_are_isolated() {
    let kg = TestKeygate::start().await.unwrap();
    let a = kg.client();
    let (id, _) = a.create_token(&json!({"name": "mine"})).await;
    let app = a.post("/admin/v1/apps", &json!({"name": "A's app"})).await.str("/id");
    let other_key = kg.root_key("other", &Permission::ALL).await.unwrap();
    let b = kg.client_with(Some(&other_key));

    for path in [format!("/admin/v1/tokens/{id}"), format!("/admin/v1/apps/{app}")] {
        let got = b.get(&path).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        assert!(got.code().ends_with("not_found"));
    }
    for action in ["suspend", "resume", "revoke", "rotate"] {
        let r = b.post(&format!("/admin/v1/tokens/{id}/{action}"), &json!({})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{action}");
    }
    assert_eq!(
        b.patch(&format!("/admin/v1/tokens/{id}"), &json!({"name": "stolen"})).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(b.delete(&format!("/admin/v1/apps/{app}?revoke_tokens=true")).await.status, StatusCode::NOT_FOUND);
    let t = b.post("/admin/v1/tokens", &json!({"name": "x", "app_id": app})).await;
    assert_eq!(t.status, StatusCode::NOT_FOUND, "another workspace's app cannot hold my token");
    let listed = b.get("/admin/v1/tokens").await;
    assert_eq!(listed.body["data"], json!([]));
    let audit = b.get("/admin/v1/audit-events").await;
    assert!(!audit.body.to_string().contains(&id), "audit events of A are invisible to B");
    assert_eq!(a.get(&format!("/admin/v1/tokens/{id}")).await.str("/name"), "mine", "nothing changed");
    kg.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_stable_code_and_writes_nothing() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (id, _) = c.create_token(&json!({"name": "base"})).await;
    let tokens_before = token_count(&kg).await;
    let audit_before = audit_count(&kg).await;

    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "x", "unknown_field": 1}), "invalid_body"),
        (json!({"name": 5}), "invalid_body"),
        (json!({"scopes": ["a:b"]}), "invalid_body"),
        (json!({"name": "x", "ip_allowlist": ["10.0.0.0/33"]}), "invalid_ip_allowlist"),
        (json!({"name": "x", "ip_allowlist": ["not-an-ip"]}), "invalid_ip_allowlist"),
        (json!({"name": "x", "expires_in": 0}), "invalid_expiry"),
        (json!({"name": "x", "expires_in": -5}), "invalid_expiry"),
        (json!({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}), "expiry_in_past"),
        (json!({"name": "x", "expires_at": "tomorrow"}), "invalid_body"),
        (json!({"name": "x", "expires_in": 60, "expires_at": "2099-01-01T00:00:00Z"}), "conflicting_expiry"),
        (json!({"name": "x", "scopes": ["Orders:Read"]}), "invalid_scope"),
        (json!({"name": "x", "scopes": ["orders"]}), "invalid_scope"),
        (json!({"name": "x", "rate_limit": {"requests": 0, "per_seconds": 1}}), "invalid_rate_limit"),
        (json!({"name": "x", "rate_limit": {"requests": 1, "per_seconds": 1, "extra": 1}}), "invalid_body"),
        (json!({"name": "x", "quota": {"requests": 10, "period": "week"}}), "invalid_body"),
        (json!({"name": "x", "metadata": [1, 2]}), "invalid_body"),
        (json!({"name": ""}), "invalid_name"),
        (json!({"name": "x", "app_id": "app_doesnotexist"}), "app_not_found"),
        (json!({"name": "x", "app_id": "'; DROP TABLE tokens; --"}), "app_not_found"),
    ];
    for (body, code) in cases {
        let a = c.post("/admin/v1/tokens", &body).await;
        assert_eq!(a.code(), code, "{body} -> {:?}", a.body);
        assert!(a.status.is_client_error());
        assert!(a.str("/error/message").len() > 10, "a message that says what to do");
    }
    let raw = |body: &'static [u8]| c.send_raw(Method::POST, "/admin/v1/tokens", "application/json", body.to_vec());
    assert_eq!(raw(b"{\"name\": ").await.code(), "malformed_json");
    assert_eq!(raw(b"\xff\xfe").await.code(), "malformed_json");
    let big = c.send_raw(Method::POST, "/admin/v1/tokens", "application/json", vec![b' '; 70 * 1024]).await;
    assert_eq!((big.status, big.code()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    let form = c.send_raw(Method::POST, "/admin/v1/tokens", "text/plain", b"name=x".to_vec()).await;
    assert_eq!(form.code(), "unsupported_media_type");

    // Unknown ids, malformed ids.
    for path in
        ["/admin/v1/tokens/tok_000000000000", "/admin/v1/tokens/nonsense", "/admin/v1/tokens/tok_%27%20OR%201=1"]
    {
        let a = c.get(path).await;
        assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "token_not_found"), "{path}");
    }
    assert_eq!(c.get("/admin/v1/nope").await.code(), "route_not_found");
    assert_eq!(c.send(Method::PUT, "/admin/v1/tokens", None).await.code(), "method_not_allowed");
    assert_eq!(c.get("/admin/v1/tokens?cursor=garbage").await.code(), "invalid_cursor");
    assert_eq!(c.get("/admin/v1/tokens?limit=abc").await.code(), "invalid_query");
    // An app id that cannot exist matches nothing, but the other parameters are still checked.
    let none = c.get("/admin/v1/tokens?app_id=nonsense").await;
    assert_eq!((none.status, &none.body["data"]), (StatusCode::OK, &json!([])));
    for (q, code) in
        [("cursor=garbage", "invalid_cursor"), ("limit=0", "invalid_query"), ("unused_days=0", "invalid_query")]
    {
        let r = c.get(&format!("/admin/v1/tokens?app_id=nonsense&{q}")).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, code), "{q}");
    }
    let rot = c.post(&format!("/admin/v1/tokens/{id}/rotate"), &json!({"grace_period_seconds": 999_999_999})).await;
    assert_eq!(rot.code(), "invalid_grace_period");

    // Credentials.
    let none = kg.client_with(None).get("/admin/v1/tokens").await;
    assert_eq!((none.status, none.code()), (StatusCode::UNAUTHORIZED, "missing_credentials"));
    assert!(none.headers.get("www-authenticate").is_some());
    let wrong = kg.client_with(Some("kgroot_thisisnotarealkey")).get("/admin/v1/tokens").await;
    assert_eq!((wrong.status, wrong.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let mut forged = kg.root_key.clone();
    forged.replace_range(20..21, if &forged[20..21] == "a" { "b" } else { "a" });
    let forged = kg.client_with(Some(&forged)).get("/admin/v1/tokens").await;
    assert_eq!(forged.code(), "invalid_credentials");
    let token_as_key =
        kg.client_with(Some(&c.create_token(&json!({"name": "t"})).await.1)).get("/admin/v1/tokens").await;
    assert_eq!(token_as_key.code(), "invalid_credentials", "an API token is not a root key");
    let reader = kg.root_key("default", &[Permission::TokensRead]).await.unwrap();
    let r = kg.client_with(Some(&reader));
    assert_eq!(r.get("/admin/v1/tokens").await.status, StatusCode::OK);
    let denied = r.post("/admin/v1/tokens", &json!({"name": "x"})).await;
    assert_eq!((denied.status, denied.code()), (StatusCode::FORBIDDEN, "missing_permission"));
    assert_eq!(r.post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await.code(), "missing_permission");
    assert_eq!(r.get("/admin/v1/audit-events").await.code(), "missing_permission");

    // Nothing was written by any refused request (one token was created on purpose above).
    assert_eq!(token_count(&kg).await, tokens_before + 1);
    assert_eq!(audit_count(&kg).await, audit_before + 2, "the extra token and the reader key");
    kg.stop().await;
}

#[tokio::test]
async fn pagination_and_audit_filters() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut ids = Vec::new();
    for i in 0..7 {
        kg.clock.advance_seconds(1);
        ids.push(c.create_token(&json!({"name": format!("t{i}")})).await.0);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/admin/v1/tokens?limit=3&cursor={cur}"),
            None => "/admin/v1/tokens?limit=3".to_owned(),
        };
        let page = c.get(&path).await;
        seen.extend(page.body["data"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        cursor = page.body["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every token once");

    let from = Timestamp::from_millis(keygate_testkit::START.as_millis() + 3000).to_rfc3339();
    let a = c.get(&format!("/admin/v1/audit-events?action=token.create&from={from}")).await;
    assert_eq!(a.body["data"].as_array().unwrap().len(), 5);
    let bad = c.get("/admin/v1/audit-events?from=yesterday").await;
    assert_eq!(bad.code(), "invalid_query");
    kg.stop().await;
}

#[tokio::test]
async fn openapi_document_and_explorer() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client_with(None);
    let doc = c.get("/admin/v1/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.str("/openapi").starts_with("3.1"));
    let paths = doc.body["paths"].as_object().unwrap();
    for p in [
        "/admin/v1/apps",
        "/admin/v1/apps/{id}",
        "/admin/v1/tokens",
        "/admin/v1/tokens/{id}",
        "/admin/v1/tokens/{id}/suspend",
        "/admin/v1/tokens/{id}/resume",
        "/admin/v1/tokens/{id}/revoke",
        "/admin/v1/tokens/{id}/rotate",
        "/admin/v1/audit-events",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the OpenAPI document");
    }
    assert!(doc.body["paths"]["/admin/v1/tokens"]["post"]["responses"]["201"].is_object());
    let ui = reqwest::get(format!("{}/admin/docs/", kg.url())).await.unwrap();
    assert_eq!(ui.status(), StatusCode::OK);
    let html = ui.text().await.unwrap();
    assert!(html.contains("swagger"), "the explorer is served from the binary");
    assert!(!html.contains("https://"), "and loads nothing from another host");
    let health = c.get("/admin/v1/health").await;
    assert_eq!((health.str("/status"), health.str("/store")), ("ok".to_owned(), "sqlite".to_owned()));
    kg.stop().await;
}

fn keygate(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("KEYGATE_ADMIN_KEY").env_remove("KEYGATE_PEPPER").env_remove("KEYGATE_DATA_DIR");
    cmd
}

// Multi-threaded: the CLI runs as a blocking child process while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_root_keys_tokens_scan_and_config() {
    let kg = TestKeygate::start().await.unwrap();
    let data_dir = kg.data_dir().to_str().unwrap().to_owned();

    // root-key create works on the store directly, prints the key once, creates the workspace.
    let out = keygate(&[
        "root-key",
        "create",
        "--name",
        "ops",
        "--workspace",
        "team-b",
        "--output",
        "json",
        "--data-dir",
        &data_dir,
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = v["key"].as_str().unwrap().to_owned();
    assert!(v["id"].as_str().unwrap().starts_with("rk_") && key.starts_with("kgroot_"));
    let b = kg.client_with(Some(&key));
    assert_eq!(b.get("/admin/v1/tokens").await.body["data"], json!([]));
    let bad = keygate(&["root-key", "create", "--name", "x", "--permission", "tokens:delete", "--data-dir", &data_dir])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid")
            || String::from_utf8_lossy(&bad.stderr).contains("unknown permission")
    );

    // token commands against the running server.
    let url = kg.url();
    let run = |args: &[&str]| {
        let mut all = vec!["token", "--url", url.as_str()];
        all.extend_from_slice(args);
        let out = keygate(&all).env("KEYGATE_ADMIN_KEY", &key).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) =
        run(&["create", "--name", "cli", "--scope", "orders:read", "--rate-limit", "10/1+5", "--output", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["token"].as_str().unwrap().to_owned();
    let (code, stdout, _) = run(&["list"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains(&id) && stdout.contains("orders:read") && !stdout.contains(&secret));
    let (_, stdout, _) = run(&["update", &id, "--scope", "orders:write", "--output", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["scopes"], json!(["orders:write"]));
    let (_, stdout, _) = run(&["suspend", &id]);
    assert!(stdout.contains("suspended"));
    let (_, stdout, _) = run(&["resume", &id]);
    assert!(stdout.contains("active"));
    let (code, stdout, _) = run(&["rotate", &id, "--grace-period", "30"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("shown only once"));
    let (_, stdout, _) = run(&["show", &id, "--output", "json"]);
    assert!(serde_json::from_str::<Value>(&stdout).unwrap()["replaced_by"].is_string());
    let (code, _, stderr) = run(&["revoke", "tok_000000000000", "--reason", "x"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("token_not_found"), "{stderr}");
    let no_key = keygate(&["token", "--url", &url, "list"]).output().unwrap();
    assert_eq!(no_key.status.code(), Some(2), "a missing key is a usage error");
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("KEYGATE_ADMIN_KEY"));

    // scan: finds the token by checksum, never prints it, and --online marks it exposed.
    let dir = tempfile::tempdir().unwrap();
    let leaked = created["token"].as_str().unwrap();
    std::fs::write(dir.path().join("app.env"), format!("# config\nAPI_KEY={leaked}\n")).unwrap();
    let mut typo = leaked.to_owned();
    typo.replace_range(30..31, if &typo[30..31] == "a" { "b" } else { "a" });
    std::fs::write(dir.path().join("notes.txt"), format!("not a token: {typo}\n")).unwrap();
    let scan = keygate(&["scan", dir.path().to_str().unwrap(), "--no-history"]).output().unwrap();
    let text = String::from_utf8_lossy(&scan.stdout);
    assert_eq!(scan.status.code(), Some(1), "a confirmed token fails the scan");
    assert!(text.contains("app.env:2"), "{text}");
    assert!(!text.contains("notes.txt"), "a token with a wrong checksum is not reported");
    assert!(!text.contains(&leaked[15..]), "the secret is never printed");
    let online = keygate(&["scan", dir.path().to_str().unwrap(), "--no-history", "--online", "--url", &url])
        .env("KEYGATE_ADMIN_KEY", &key)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&online.stdout).contains("(inactive)")
            || String::from_utf8_lossy(&online.stdout).contains("(live)")
    );
    let shown = b.get(&format!("/admin/v1/tokens/{id}")).await;
    assert!(shown.body["exposed_at"].is_string(), "marked exposed: {:?}", shown.body);
    let exposed = b.get(&format!("/admin/v1/audit-events?target={id}&action=token.exposed")).await;
    assert_eq!(exposed.body["data"].as_array().unwrap().len(), 1);
    let location = exposed.body["data"][0]["after"]["location"].as_str().unwrap();
    assert!(location.ends_with("app.env:2"), "the audit trail says where it was found: {location}");
    let clean = tempfile::tempdir().unwrap();
    std::fs::write(clean.path().join("ok.txt"), "nothing here").unwrap();
    assert_eq!(keygate(&["scan", clean.path().to_str().unwrap(), "--no-history"]).status().unwrap().code(), Some(0));

    // config check names an unknown key.
    let cfg = dir.path().join("keygate.toml");
    std::fs::write(&cfg, "[admin]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
    assert_eq!(keygate(&["config", "check", cfg.to_str().unwrap()]).status().unwrap().code(), Some(0));
    std::fs::write(&cfg, "[admin]\nlisten = \"127.0.0.1:9000\"\nlisen = true\n").unwrap();
    let out = keygate(&["config", "check", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
    kg.stop().await;
}

/// Starts the real binary with `args`, waits for its "admin API on" line, returns the child and
/// the address.
fn spawn_serve(data_dir: &str, extra_env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut cmd = keygate(&["serve", "--data-dir", data_dir]);
    cmd.env("KEYGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_LOG_FORMAT", "json");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.strip_prefix("keygate: admin API on http://") {
            let addr = rest.split('/').next().unwrap().to_owned();
            std::thread::spawn(move || for _ in lines {});
            return (child, addr);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("keygate serve did not start:\n{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_defaults_stops_on_sigterm_and_reports_bad_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (mut child, addr) = spawn_serve(data, &[]);
    let health = reqwest::get(format!("http://{addr}/admin/v1/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("data/pepper")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the pepper file is private");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        assert_eq!(child.wait().unwrap().code(), Some(0), "SIGTERM is a graceful stop");
    }
    #[cfg(not(unix))]
    child.kill().unwrap();

    // The database holds no pepper and no secret in plain text.
    let db = std::fs::read(dir.path().join("data/keygate.db")).unwrap();
    let pepper = std::fs::read_to_string(dir.path().join("data/pepper")).unwrap();
    assert!(!db.windows(16).any(|w| w == &pepper.as_bytes()[..16]));

    // A damaged database: a clear message, exit 1, no panic.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("keygate.db"), vec![7u8; 4096]).unwrap();
    let out = keygate(&["serve", "--data-dir", broken.to_str().unwrap()])
        .env("KEYGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("damaged") || err.contains("not a database") || err.contains("migrated"), "{err}");
    assert!(!err.contains("panicked"));

    // An unreachable database: a clear message, exit 1.
    let out = keygate(&["serve", "--data-dir", data])
        .env("KEYGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_DATABASE_URL", "postgres://postgres@127.0.0.1:1/none?connect_timeout=2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the postgres store"), "{err}");

    // An invalid config value exits 2 and names it.
    let out = keygate(&["serve", "--data-dir", data]).env("KEYGATE_TOKEN_PREFIX", "Bad_").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens.prefix"));
}

#[tokio::test]
async fn postgres_backs_the_same_api() {
    use sqlx_free_pg::*;
    let db = TempPg::create().await;
    let kg = keygate_testkit::TestKeygate::start_with(keygate_testkit::Options {
        database_url: Some(db.url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = kg.client();
    let (id, secret) = c.create_token(&json!({"name": "pg", "scopes": ["orders:read"]})).await;
    kg.sync_index().await.unwrap();
    assert!(kg.index().verify(&secret, now(&kg)).is_ok());
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await.str("/status"), "revoked");
    kg.sync_index().await.unwrap();
    assert!(kg.index().verify(&secret, now(&kg)).is_err());
    assert_eq!(c.get("/admin/v1/health").await.str("/store"), "postgres");
    kg.stop().await;
    db.drop_db().await;
}

/// PostgreSQL databases for tests, made and dropped with `psql`-free SQL over the testkit's
/// own dependency on sqlx (through keygate-store).
mod sqlx_free_pg {
    pub struct TempPg {
        pub url: String,
        name: String,
    }

    fn admin_url() -> String {
        std::env::var("KEYGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    impl TempPg {
        pub async fn create() -> Self {
            let name = format!("keygate_e2e_{}", std::process::id()) + &format!("_{}", rand_suffix());
            keygate_store_admin(&format!("CREATE DATABASE {name}")).await;
            let url = match admin_url().rsplit_once('/') {
                Some((base, _)) => format!("{base}/{name}"),
                None => panic!("KEYGATE_TEST_POSTGRES_URL needs a database path"),
            };
            Self { url, name }
        }
        pub async fn drop_db(self) {
            keygate_store_admin(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
        }
    }

    fn rand_suffix() -> String {
        keygate_core::token_format::random_base62(&keygate_core::secret::OsRandom, 8).unwrap().to_lowercase()
    }

    async fn keygate_store_admin(sql: &str) {
        keygate_store::admin_sql(&admin_url(), sql).await.unwrap();
    }
}
