//! The dashboard's Routes and Workspaces pages (issue 13), as a browser without JavaScript uses
//! them: owners and admins add, replace and delete API routes and the gateway serves them at
//! once; developers and viewers only read; file routes are read-only; the portal and the Routes
//! page show a workspace its own routes and shared ones; only the instance's owners manage
//! workspaces, and deleting one that holds tokens needs the confirmation box.

use keygate_core::Clock;
use keygate_core::account::{Membership, Role};
use keygate_core::model::{Actor, NewAuditEvent, Permission};
use keygate_testkit::{MockUpstream, Options, TestKeygate, route};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::dashboard::{Browser, PASSWORD, member, owner};

async fn call(kg: &TestKeygate, path: &str, token: &str) -> StatusCode {
    reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).bearer_auth(token).send().await.unwrap().status()
}

fn actions(trail: &Value) -> Vec<String> {
    trail["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn owners_manage_routes_in_the_dashboard_and_the_gateway_serves_them() {
    let up = MockUpstream::start().await.unwrap();
    let kg =
        TestKeygate::start_with(Options { routes: vec![route("orders", "/orders", &up.url())], ..Options::default() })
            .await
            .unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "admin@example.com", "admin").await;
    let mut dev = member(&kg, &mut own, "dev@example.com", "developer").await;
    let mut viewer = member(&kg, &mut own, "viewer@example.com", "viewer").await;
    let (_, token) = c.create_token(&json!({"name": "reader", "scopes": ["billing:read", "orders:read"]})).await;
    kg.sync_index().await.unwrap();

    // The list shows the file's route, marked as such, and the form to owners.
    let page = own.get("/routes").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("id=\"route-orders\"") && page.body.contains(">file<"), "{}", page.body);
    assert!(page.body.contains("id=\"route-form\""));
    assert!(page.body.contains("href=\"/routes\" aria-current=\"page\""), "the navigation marks the page");

    // Created from the form: it serves at once, its scope enforced.
    let billing = format!(
        "id = \"billing\"\npath = \"/billing\"\nupstream = \"{}\"\ndescription = \"Invoices\"\n\n[scopes]\nGET = \"billing:read\"\n",
        up.url()
    );
    let p = own.submit("/routes", "/routes", &[("route", &billing)]).await;
    assert_eq!(p.location.as_deref(), Some("/routes?msg=route_created"), "{}", p.body);
    assert_eq!(call(&kg, "/billing/7", &token).await, StatusCode::OK);
    let listed = own.get("/routes?msg=route_created").await;
    assert!(listed.body.contains("Route added") && listed.body.contains("id=\"route-billing\""));
    assert!(listed.body.contains("GET: billing:read") && listed.body.contains(">api<"));

    // A refusal is shown on the form with its stable code, and what was typed is kept.
    let bad = format!("id = \"x\"\npath = \"/x\"\nupstream = \"{}\"\ncolour = \"red\"\n", up.url());
    let p = own.submit("/routes", "/routes", &[("route", &bad)]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    let error = p.between("id=\"route-error\">", "</div>");
    assert!(error.contains("invalid_route") && error.contains("colour"), "{error}");
    assert!(p.body.contains("colour = &quot;red&quot;"), "the input is kept: {}", p.body);
    let p = own.submit("/routes", "/routes", &[("route", "id = [unclosed")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.between("id=\"route-error\">", "</div>").contains("not valid TOML"));
    let p = own.submit("/routes", "/routes", &[("route", &billing)]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.between("id=\"route-error\">", "</div>").contains("route_exists"));

    // Replaced from its page (an admin may too): the new path serves, the old one is gone.
    let page = admin.get("/routes/billing").await;
    assert!(page.body.contains("id=\"route-text\"") && page.body.contains("billing:read"), "{}", page.body);
    let invoices = billing.replace("/billing", "/invoices");
    let p = admin.submit("/routes/billing", "/routes/billing", &[("route", &invoices)]).await;
    assert_eq!(p.location.as_deref(), Some("/routes?msg=route_updated"), "{}", p.body);
    assert_eq!(call(&kg, "/invoices/1", &token).await, StatusCode::OK);
    assert_eq!(call(&kg, "/billing/7", &token).await, StatusCode::NOT_FOUND);
    let renamed = invoices.replace("id = \"billing\"", "id = \"other\"");
    let p = own.submit("/routes/billing", "/routes/billing", &[("route", &renamed)]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.between("id=\"route-error\">", "</div>").contains("route_id_mismatch"));

    // Developers and viewers read, without forms; their posts are refused.
    for (who, b) in [("developer", &mut dev), ("viewer", &mut viewer)] {
        let page = b.get("/routes").await;
        assert_eq!(page.status, StatusCode::OK, "{who}");
        assert!(page.body.contains("id=\"route-billing\"") && !page.body.contains("id=\"route-form\""), "{who}");
        let one = b.get("/routes/billing").await;
        assert!(!one.body.contains("id=\"route-form\"") && !one.body.contains("/routes/billing/delete"), "{who}");
        let tries = [
            ("/routes", vec![("route", billing.replace("billing", "sneaky"))]),
            ("/routes/billing", vec![("route", billing.replace("/billing", "/stolen"))]),
            ("/routes/billing/delete", vec![]),
        ];
        for (action, fields) in tries {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let p = b.submit("/routes", action, &fields).await;
            assert_eq!(p.status, StatusCode::FORBIDDEN, "{who} posting to {action}");
        }
    }
    assert_eq!(call(&kg, "/invoices/1", &token).await, StatusCode::OK, "nothing changed");

    // The file's route is read-only: no form, and a post is refused with route_from_file.
    let page = own.get("/routes/orders").await;
    assert!(page.body.contains("id=\"route-readonly\"") && !page.body.contains("id=\"route-form\""));
    let p = own.submit("/routes/orders", "/routes/orders", &[("route", &billing.replace("billing", "orders"))]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.between("id=\"route-error\">", "</div>").contains("route_from_file"));
    let p = own.submit("/routes/orders", "/routes/orders/delete", &[]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert_eq!(call(&kg, "/orders/1", &token).await, StatusCode::OK);

    // Deleted: the gateway stops serving it.
    let p = own.submit("/routes/billing", "/routes/billing/delete", &[]).await;
    assert_eq!(p.location.as_deref(), Some("/routes?msg=route_deleted"));
    assert_eq!(call(&kg, "/invoices/1", &token).await, StatusCode::NOT_FOUND);
    assert_eq!(own.get("/routes/billing").await.status, StatusCode::NOT_FOUND);

    // Every change is in the audit trail, with the person as actor and the dashboard as source.
    let trail = c.get("/admin/v1/audit-events?target=billing").await.body;
    assert_eq!(actions(&trail), ["route.delete", "route.update", "route.create"]);
    for e in trail["data"].as_array().unwrap() {
        assert!(e["actor"].as_str().unwrap().starts_with("usr_"), "{e}");
        assert_eq!(e["source"], "dashboard");
    }
    assert!(own.get("/audit?action=route.create").await.body.contains("billing"));
}

/// Moves `email`'s membership from the default workspace to `ws` as `role`, then signs them in
/// afresh (a person signs in to their workspace).
async fn move_to(kg: &TestKeygate, email: &str, ws: &str, role: Role) -> Browser {
    let store = kg.store();
    let user = store.user_by_email(email).await.unwrap().unwrap();
    let target = store.workspace_by_name(ws).await.unwrap().unwrap().id;
    let default = store.workspace_by_name("default").await.unwrap().unwrap().id;
    let now = kg.clock.now();
    let actor = Actor { id: "test".into(), source: None, owner: true };
    let m = Membership { workspace_id: target.clone(), user_id: user.id.clone(), role, created_at: now };
    store
        .put_membership(&m, &NewAuditEvent::new(&target, &actor, "member.added", user.id.as_str(), now))
        .await
        .unwrap();
    let gone = NewAuditEvent::new(&default, &actor, "member.removed", user.id.as_str(), now);
    assert!(store.delete_membership(&default, &user.id, &gone).await.unwrap());
    let mut b = Browser::new(kg);
    let p = b.post("/login", &[("email", email), ("password", PASSWORD)]).await;
    assert_eq!(p.location.as_deref(), Some("/"), "{}", p.body);
    b
}

#[tokio::test]
async fn the_portal_and_the_routes_page_show_a_workspace_its_routes_and_shared_ones() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    member(&kg, &mut own, "bob@example.com", "owner").await;
    assert_eq!(c.post("/admin/v1/workspaces", &json!({"name": "team-b"})).await.status, StatusCode::CREATED);
    let b = kg.client_with(Some(&kg.root_key("team-b", &Permission::ALL).await.unwrap()));
    for (client, id, shared) in [(&c, "a-api", false), (&b, "b-api", false), (&b, "b-shared", true)] {
        let body = json!({"id": id, "path": format!("/{id}"), "upstream": up.url(), "shared": shared});
        let made = client.post("/admin/v1/routes", &body).await;
        assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    }
    let mut bob = move_to(&kg, "bob@example.com", "team-b", Role::Owner).await;

    // Each portal lists its own workspace's APIs and the shared ones; another's is not found.
    for (who, browser, mine, theirs) in
        [("default", &mut own, "a-api", "b-api"), ("team-b", &mut bob, "b-api", "a-api")]
    {
        let portal = browser.get("/portal").await;
        assert_eq!(portal.status, StatusCode::OK, "{who}");
        for listed in [mine, "b-shared", "demo"] {
            assert!(portal.body.contains(&format!("/portal/{listed}\"")), "{who} lists {listed}: {}", portal.body);
        }
        assert!(!portal.body.contains(&format!("/portal/{theirs}\"")), "{who} does not list {theirs}");
        assert_eq!(browser.get(&format!("/portal/{theirs}")).await.status, StatusCode::NOT_FOUND, "{who}");
        let p = browser
            .submit(
                "/portal",
                &format!("/portal/{theirs}/try"),
                &[("method", "GET"), ("path", &format!("/{theirs}/1")), ("token", "")],
            )
            .await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{who} trying {theirs}");
        assert_eq!(browser.get("/portal/b-shared").await.status, StatusCode::OK, "{who}");

        // The Routes page the same way; the shared route of another workspace is read-only.
        let routes = browser.get("/routes").await;
        assert!(routes.body.contains(&format!("id=\"route-{mine}\"")), "{who}: {}", routes.body);
        assert!(routes.body.contains("id=\"route-b-shared\""), "{who}");
        assert!(!routes.body.contains(&format!("id=\"route-{theirs}\"")), "{who}");
        assert_eq!(browser.get(&format!("/routes/{theirs}")).await.status, StatusCode::NOT_FOUND, "{who}");
    }
    let shared = own.get("/routes/b-shared").await;
    assert!(shared.body.contains("id=\"route-readonly\"") && !shared.body.contains("id=\"route-form\""));
    let p = own.submit("/routes/b-shared", "/routes/b-shared/delete", &[]).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND, "another workspace's route cannot be deleted");
    assert!(bob.get("/routes/b-shared").await.body.contains("id=\"route-form\""), "its own workspace edits it");

    // Routes made in team-b's dashboard belong to team-b.
    let made = bob
        .submit(
            "/routes",
            "/routes",
            &[("route", &format!("id = \"b-two\"\npath = \"/b-two\"\nupstream = \"{}\"", up.url()))],
        )
        .await;
    assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
    assert_eq!(b.get("/admin/v1/routes/b-two").await.str("/workspace"), "team-b");
    assert_eq!(c.get("/admin/v1/routes/b-two").await.status, StatusCode::NOT_FOUND);

    // An owner of another workspace is not an owner of the instance.
    assert!(!bob.get("/routes").await.body.contains("href=\"/workspaces\""));
    assert_eq!(bob.get("/workspaces").await.status, StatusCode::FORBIDDEN);
    let p = bob.submit("/routes", "/workspaces", &[("name", "team-x")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn only_the_instance_owner_manages_workspaces_and_deleting_one_with_tokens_needs_confirmation() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "admin@example.com", "admin").await;
    assert!(own.get("/").await.body.contains("href=\"/workspaces\""), "the instance owner has the link");
    assert!(!admin.get("/").await.body.contains("href=\"/workspaces\""));
    assert_eq!(admin.get("/workspaces").await.status, StatusCode::FORBIDDEN);
    let p = admin.submit("/", "/workspaces", &[("name", "team-x")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);

    // Created and renamed; a taken name is refused on the page.
    let p = own.submit("/workspaces", "/workspaces", &[("name", "team-c")]).await;
    assert_eq!(p.location.as_deref(), Some("/workspaces?msg=workspace_created"), "{}", p.body);
    let p = own.submit("/workspaces", "/workspaces", &[("name", "team-c")]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.body.contains("workspace_exists"));
    let id = kg.store().workspace_by_name("team-c").await.unwrap().unwrap().id.to_string();
    assert!(own.get("/workspaces").await.body.contains(&format!("<code>{id}</code>")));
    let p = own.submit("/workspaces", &format!("/workspaces/{id}/rename"), &[("name", "team-cee")]).await;
    assert_eq!(p.location.as_deref(), Some("/workspaces?msg=workspace_renamed"), "{}", p.body);
    assert!(own.get("/workspaces").await.body.contains("team-cee"));

    // The default workspace stays, and says why.
    let default = kg.store().workspace_by_name("default").await.unwrap().unwrap().id.to_string();
    let page = format!("/workspaces/{default}/delete");
    let p = own.submit(&page, &page, &[("revoke_tokens", "yes")]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.body.contains("default_workspace") && p.body.contains("cannot be renamed or deleted"));
    let p = own.submit("/workspaces", &format!("/workspaces/{default}/rename"), &[("name", "x")]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);

    // A workspace holding a token: refused without the box, deleted with it, its token refused.
    let key = kg.root_key("team-cee", &Permission::ALL).await.unwrap();
    let cee = kg.client_with(Some(&key));
    let (_, token) = cee.create_token(&json!({"name": "c"})).await;
    let made = cee.post("/admin/v1/routes", &json!({"id": "c-api", "path": "/c-api", "upstream": up.url()})).await;
    assert_eq!(made.status, StatusCode::CREATED);
    kg.sync_index().await.unwrap();
    assert_eq!(call(&kg, "/c-api/1", &token).await, StatusCode::OK);
    let page = format!("/workspaces/{id}/delete");
    assert!(own.get(&page).await.body.contains("name=\"revoke_tokens\""));
    let p = own.submit(&page, &page, &[]).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.body.contains("workspace_has_tokens") && p.body.contains("id=\"ws-holds-tokens\""));
    assert_eq!(call(&kg, "/c-api/1", &token).await, StatusCode::OK, "a refused deletion changes nothing");
    let p = admin.submit("/", &page, &[("revoke_tokens", "yes")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "admins cannot delete workspaces");
    let p = own.submit(&page, &page, &[("revoke_tokens", "yes")]).await;
    assert_eq!(p.location.as_deref(), Some("/workspaces?msg=workspace_deleted"), "{}", p.body);
    assert_eq!(call(&kg, "/demo/echo", &token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&kg, "/c-api/1", &token).await, StatusCode::NOT_FOUND);
    assert!(!own.get("/workspaces").await.body.contains("team-cee"));

    // The instance's trail names the person.
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}")).await.body;
    assert_eq!(actions(&trail), ["workspace.delete", "workspace.rename", "workspace.create"]);
    assert!(trail["data"][0]["actor"].as_str().unwrap().starts_with("usr_"));
    assert_eq!(trail["data"][0]["after"]["tokens_revoked"], 1);
}

#[tokio::test]
async fn a_member_of_two_workspaces_switches_between_them_in_the_header() {
    let up = MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let mut own = owner(&kg).await;
    let mut bob = member(&kg, &mut own, "bob@example.com", "developer").await;
    assert_eq!(c.post("/admin/v1/workspaces", &json!({"name": "team-b"})).await.status, StatusCode::CREATED);
    let b = kg.client_with(Some(&kg.root_key("team-b", &Permission::ALL).await.unwrap()));
    for (client, id) in [(&c, "a-api"), (&b, "b-api")] {
        let made =
            client.post("/admin/v1/routes", &json!({"id": id, "path": format!("/{id}"), "upstream": up.url()})).await;
        assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    }
    // One workspace: no switcher, its name in the header.
    let home = bob.get("/routes").await;
    assert!(!home.body.contains("id=\"workspace-switch\""), "{}", home.body);
    assert!(home.body.contains("· developer · default"), "{}", home.body);

    // Bob joins team-b too (as its owner); the header now offers both.
    let store = kg.store();
    let user = store.user_by_email("bob@example.com").await.unwrap().unwrap();
    let team_b = store.workspace_by_name("team-b").await.unwrap().unwrap().id;
    let now = kg.clock.now();
    let actor = Actor { id: "test".into(), source: None, owner: true };
    let m = Membership { workspace_id: team_b.clone(), user_id: user.id.clone(), role: Role::Owner, created_at: now };
    store
        .put_membership(&m, &NewAuditEvent::new(&team_b, &actor, "member.added", user.id.as_str(), now))
        .await
        .unwrap();
    let page = bob.get("/routes").await;
    assert!(page.body.contains("id=\"workspace-switch\""), "{}", page.body);
    assert!(page.body.contains(&format!("<option value=\"{team_b}\">team-b</option>")), "{}", page.body);
    assert!(page.body.contains("id=\"route-a-api\"") && !page.body.contains("id=\"route-b-api\""));
    let old_cookie = bob.cookie.clone().unwrap();

    // Switching: a new session in team-b (another cookie), its routes, its role.
    let p = bob.submit("/routes", "/workspace", &[("workspace", team_b.as_str())]).await;
    assert_eq!((p.status, p.location.as_deref()), (StatusCode::SEE_OTHER, Some("/")), "{}", p.body);
    assert_ne!(bob.cookie.as_deref(), Some(old_cookie.as_str()), "a fresh session secret");
    let page = bob.get("/routes").await;
    assert!(page.body.contains("id=\"route-b-api\"") && !page.body.contains("id=\"route-a-api\""), "{}", page.body);
    assert!(page.body.contains("· owner"), "the role is team-b's");
    let mut stale = Browser::new(&kg);
    stale.cookie = Some(old_cookie);
    assert_eq!(stale.get("/routes").await.status, StatusCode::SEE_OTHER, "the old session ended");
    let trail = b.get("/admin/v1/audit-events?action=user.signed_in").await;
    assert_eq!(trail.body["data"][0]["after"]["method"], "workspace_switch", "{:?}", trail.body);

    // A workspace Bob is not a member of (or no workspace at all) is not found; nothing changes.
    let other = c.post("/admin/v1/workspaces", &json!({"name": "team-c"})).await.str("/id");
    for target in [other.as_str(), "ws_nope", ""] {
        let p = bob.submit("/routes", "/workspace", &[("workspace", target)]).await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{target}: {}", p.body);
    }
    assert!(bob.get("/routes").await.body.contains("id=\"route-b-api\""), "still in team-b");
    // And back.
    let default = store.workspace_by_name("default").await.unwrap().unwrap().id;
    let p = bob.submit("/routes", "/workspace", &[("workspace", default.as_str())]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert!(bob.get("/routes").await.body.contains("id=\"route-a-api\""));
}
