//! Root keys as attack surface (issue 12): listed without secrets, revoked (effective on the next
//! request on every node), expiring, with their last use, and a permission to manage them that
//! cannot be used to switch off a broader key. Through the admin API, the real binary and two
//! nodes on one store.

use keygate_admin::service::NewRootKey;
use keygate_core::model::{Actor, Permission};
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::Value;

use super::keygate;

async fn key_with(
    kg: &TestKeygate,
    ws: &str,
    name: &str,
    permissions: &[Permission],
    expires_in: Option<i64>,
) -> (String, String) {
    let new = NewRootKey { name: name.into(), permissions: permissions.to_vec(), expires_in, expires_at: None };
    let (key, secret) = kg.admin().create_root_key_with(ws, new, &Actor::cli()).await.unwrap();
    (key.id.to_string(), secret.expose().to_owned())
}

fn listed<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["data"].as_array().unwrap().iter().find(|k| k["id"] == id).unwrap_or_else(|| panic!("{id} not in {list}"))
}

#[tokio::test]
async fn root_keys_are_listed_revoked_expire_and_record_their_last_use() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (ci_id, ci) = key_with(&kg, "default", "ci", &[Permission::TokensRead], Some(3600)).await;

    // Listed, never with a secret or a hash.
    let list = c.get("/admin/v1/root-keys").await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    let text = list.body.to_string();
    assert!(!text.contains(&ci[12..]) && !text.contains(&kg.root_key[12..]), "no secret is shown again");
    let entry = listed(&list.body, &ci_id);
    assert_eq!(entry["status"], "active");
    assert_eq!(entry["permissions"], serde_json::json!(["tokens:read"]));
    assert!(entry["expires_at"].is_string() && entry["last_used_at"].is_null() && entry.get("hash").is_none());
    assert!(entry["display"].as_str().unwrap().starts_with("kgroot_"));

    // Last use: written by the first request, then at most once a minute.
    let ci_client = kg.client_with(Some(&ci));
    assert_eq!(ci_client.get("/admin/v1/tokens").await.status, StatusCode::OK);
    let first = listed(&c.get("/admin/v1/root-keys").await.body, &ci_id)["last_used_at"].clone();
    assert!(first.is_string(), "{first}");
    kg.clock.advance_seconds(30);
    assert_eq!(ci_client.get("/admin/v1/tokens").await.status, StatusCode::OK);
    assert_eq!(listed(&c.get("/admin/v1/root-keys").await.body, &ci_id)["last_used_at"], first, "not on every request");
    kg.clock.advance_seconds(31);
    assert_eq!(ci_client.get("/admin/v1/tokens").await.status, StatusCode::OK);
    assert_ne!(listed(&c.get("/admin/v1/root-keys").await.body, &ci_id)["last_used_at"], first);

    // Expiry: refused with its own code once it has passed.
    kg.clock.advance_seconds(3600);
    let expired = ci_client.get("/admin/v1/tokens").await;
    assert_eq!((expired.status, expired.code()), (StatusCode::UNAUTHORIZED, "root_key_expired"));
    assert_eq!(listed(&c.get("/admin/v1/root-keys").await.body, &ci_id)["status"], "expired");

    // Reading keys needs root_keys:read.
    let (_, reader) = key_with(&kg, "default", "reader", &[Permission::TokensRead], None).await;
    let refused = kg.client_with(Some(&reader)).get("/admin/v1/root-keys").await;
    assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "missing_permission"));

    // A key that manages keys cannot revoke one holding permissions it lacks, only narrower ones.
    let (narrow_id, narrow) =
        key_with(&kg, "default", "key admin", &[Permission::RootKeysWrite, Permission::TokensRead], None).await;
    let (victim_id, victim) = key_with(&kg, "default", "victim", &[Permission::TokensRead], None).await;
    let n = kg.client_with(Some(&narrow));
    let testkit_id = c.get("/admin/v1/root-keys").await.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "testkit")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let outranked = n.delete(&format!("/admin/v1/root-keys/{testkit_id}")).await;
    assert_eq!((outranked.status, outranked.code()), (StatusCode::FORBIDDEN, "root_key_outranks"));
    assert_eq!(c.get("/admin/v1/tokens").await.status, StatusCode::OK, "the broader key still works");
    let revoked = n.delete(&format!("/admin/v1/root-keys/{victim_id}")).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(revoked.str("/status"), "revoked");
    // Effective on the next request, with its own code; final and idempotent.
    let after = kg.client_with(Some(&victim)).get("/admin/v1/tokens").await;
    assert_eq!((after.status, after.code()), (StatusCode::UNAUTHORIZED, "root_key_revoked"));
    let again = n.delete(&format!("/admin/v1/root-keys/{victim_id}")).await;
    assert_eq!((again.status, again.str("/status")), (StatusCode::OK, "revoked".to_owned()));
    // Audited once, by the key that did it.
    let trail = c.get(&format!("/admin/v1/audit-events?target={victim_id}&action=root_key.revoke")).await;
    let events = trail.body["data"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{:?}", trail.body);
    assert_eq!(events[0]["actor"], narrow_id.as_str());
    assert!(events[0]["after"]["revoked_at"].is_string());
    // A key may revoke itself.
    assert_eq!(n.delete(&format!("/admin/v1/root-keys/{narrow_id}")).await.status, StatusCode::OK);
    assert_eq!(n.get("/admin/v1/tokens").await.code(), "root_key_revoked");

    // Another workspace's key: not listed, and 404 like a key that does not exist.
    let (theirs_id, theirs) = key_with(&kg, "other", "theirs", &Permission::ALL, None).await;
    assert!(!c.get("/admin/v1/root-keys").await.body.to_string().contains(&theirs_id));
    let foreign = c.delete(&format!("/admin/v1/root-keys/{theirs_id}")).await;
    assert_eq!((foreign.status, foreign.code()), (StatusCode::NOT_FOUND, "root_key_not_found"));
    assert_eq!(kg.client_with(Some(&theirs)).get("/admin/v1/tokens").await.status, StatusCode::OK);
    assert_eq!(c.delete("/admin/v1/root-keys/rk_doesnotexist").await.code(), "root_key_not_found");
    assert_eq!(c.delete("/admin/v1/root-keys/not-an-id").await.code(), "root_key_not_found");
    kg.stop().await;
}

/// Root keys are looked up in the store on every request: a key revoked through one node is
/// refused by another on its very next request, with no cache to wait out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_root_key_is_refused_on_the_next_request_on_every_node() {
    let a = TestKeygate::start().await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..Options::default() })
        .await
        .unwrap();
    let (id, key) = key_with(&a, "default", "shared", &[Permission::TokensRead], None).await;
    assert_eq!(b.client_with(Some(&key)).get("/admin/v1/tokens").await.status, StatusCode::OK);
    assert_eq!(a.client().delete(&format!("/admin/v1/root-keys/{id}")).await.status, StatusCode::OK);
    let on_b = b.client_with(Some(&key)).get("/admin/v1/tokens").await;
    assert_eq!((on_b.status, on_b.code()), (StatusCode::UNAUTHORIZED, "root_key_revoked"));
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_and_revokes_root_keys_and_creates_them_with_an_expiry() {
    let kg = TestKeygate::start().await.unwrap();
    let data_dir = kg.data_dir().to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let mut all = vec!["root-key"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", &data_dir]);
        let out = keygate(&all).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An absolute expiry: the CLI reads the wall clock, the test server a manual one.
    let (code, stdout, stderr) = run(&[
        "create",
        "--name",
        "deploy",
        "--permission",
        "tokens:read",
        "--expires-at",
        "2099-01-01T00:00:00Z",
        "--output",
        "json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let created: Value = serde_json::from_str(&stdout).unwrap();
    let (id, key) = (created["id"].as_str().unwrap().to_owned(), created["key"].as_str().unwrap().to_owned());
    assert!(created["expires_at"].is_string(), "{created}");
    assert_eq!(kg.client_with(Some(&key)).get("/admin/v1/tokens").await.status, StatusCode::OK);

    let (code, stdout, _) = run(&["list", "--output", "json"]);
    assert_eq!(code, Some(0));
    let list: Value = serde_json::from_str(&stdout).unwrap();
    let entry = list.as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!((entry["status"].as_str(), entry["workspace"].as_str()), (Some("active"), Some("default")));
    assert!(!stdout.contains(&key[12..]), "list never shows a secret");
    let (_, table, _) = run(&["list"]);
    assert!(table.contains(&id) && table.contains("deploy") && !table.contains(&key[12..]), "{table}");

    let (code, stdout, stderr) = run(&["revoke", &id]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("revoked"), "{stdout}");
    let refused = kg.client_with(Some(&key)).get("/admin/v1/tokens").await;
    assert_eq!(refused.code(), "root_key_revoked", "the running server refuses it on the next request");
    let (code, _, stderr) = run(&["revoke", "rk_doesnotexist"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("root_key_not_found"), "{stderr}");
    let (code, _, stderr) = run(&["create", "--name", "x", "--expires-in", "0"]);
    assert_eq!(code, Some(1), "a non-positive lifetime is refused");
    assert!(stderr.contains("invalid_expiry"), "{stderr}");
    let audit = kg.client().get(&format!("/admin/v1/audit-events?target={id}")).await;
    let actions: Vec<&str> =
        audit.body["data"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions, ["root_key.revoke", "root_key.create"], "{:?}", audit.body);
    kg.stop().await;
}

/// Owners list, create (with an expiry; the secret shown once) and revoke root keys in the
/// dashboard; other roles cannot reach the page.
#[tokio::test]
async fn owners_manage_root_keys_in_the_dashboard() {
    use super::dashboard::{Browser, member, owner};
    let kg = TestKeygate::start().await.unwrap();
    let mut b = owner(&kg).await;
    let page = b.get("/settings/root-keys").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("testkit") && !page.body.contains(&kg.root_key[12..]), "listed, never the secret");

    let p = b
        .submit(
            "/settings/root-keys",
            "/settings/root-keys",
            &[
                ("name", "deploy bot"),
                ("permission", "tokens:read"),
                ("permission", "audit:read"),
                ("lifetime_days", "30"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::CREATED, "{}", p.body);
    assert_eq!(p.headers.get("cache-control").map(|v| v.as_bytes()), Some(&b"no-store"[..]));
    let secret = p.between("id=\"root-key-secret\" class=\"secret\">", "<");
    assert!(secret.starts_with("kgroot_"), "{secret}");
    let id = format!("rk_{}", p.between("<code>rk_", "</code>"));
    let api = kg.client_with(Some(&secret));
    assert_eq!(api.get("/admin/v1/tokens").await.status, StatusCode::OK);
    assert_eq!(api.get("/admin/v1/apps").await.code(), "missing_permission", "only the permissions chosen");
    let list = b.get("/settings/root-keys").await;
    assert!(list.body.contains("deploy bot") && !list.body.contains(&secret[12..]), "the secret is never shown again");
    let view = kg.client().get("/admin/v1/root-keys").await;
    let entry = view.body["data"].as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap().clone();
    assert!(entry["expires_at"].is_string(), "{entry}");
    // Refused: no permission chosen.
    let none =
        b.submit("/settings/root-keys", "/settings/root-keys", &[("name", "empty"), ("lifetime_days", "0")]).await;
    assert_eq!(none.status, StatusCode::BAD_REQUEST);

    // Revoke after a confirmation page; effective on the key's next request; audited as the person.
    let confirm = b.get(&format!("/settings/root-keys/{id}/revoke")).await;
    assert_eq!(confirm.status, StatusCode::OK);
    let p =
        b.submit(&format!("/settings/root-keys/{id}/revoke"), &format!("/settings/root-keys/{id}/revoke"), &[]).await;
    assert_eq!(p.location.as_deref(), Some("/settings/root-keys?msg=root_key_revoked"), "{}", p.body);
    assert_eq!(api.get("/admin/v1/tokens").await.code(), "root_key_revoked");
    let trail = kg.client().get(&format!("/admin/v1/audit-events?target={id}&action=root_key.revoke")).await;
    assert!(trail.body["data"][0]["actor"].as_str().unwrap().starts_with("usr_"), "{:?}", trail.body);
    // Without the form's CSRF token, nothing happens.
    let forged = b.post(&format!("/settings/root-keys/{id}/revoke"), &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);

    // Admins (not owners) and people not signed in do not reach it.
    let mut admin = member(&kg, &mut b, "ada@example.com", "admin").await;
    assert_eq!(admin.get("/settings/root-keys").await.status, StatusCode::FORBIDDEN);
    let other = kg.client().get("/admin/v1/root-keys").await.body["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(admin.get(&format!("/settings/root-keys/{other}/revoke")).await.status, StatusCode::FORBIDDEN);
    let anon = Browser::new(&kg).get("/settings/root-keys").await;
    assert_eq!(anon.location.as_deref(), Some("/login"));
    kg.stop().await;
}
