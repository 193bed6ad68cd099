//! The dashboard through HTTP, as a browser without JavaScript would use it: cookies, forms with
//! CSRF tokens, redirects. Time is the testkit's manual clock, so TOTP codes and session
//! time-outs are exact. (The real-browser test is `tests/browser/dashboard.mjs`.)

use keygate_admin::totp;
use keygate_core::Clock;
use keygate_testkit::TestKeygate;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

pub(crate) const PASSWORD: &str = "correct horse battery staple";

/// A cookie-keeping client that does not follow redirects.
pub(crate) struct Browser {
    base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) cookie: Option<String>,
}

pub(crate) struct Page {
    pub(crate) status: StatusCode,
    pub(crate) location: Option<String>,
    pub(crate) body: String,
    pub(crate) headers: reqwest::header::HeaderMap,
}

impl Page {
    pub(crate) fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("the page has a CSRF field");
        let rest = &self.body[at + 19..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
    pub(crate) fn between(&self, start: &str, end: &str) -> String {
        let at = self.body.find(start).unwrap_or_else(|| panic!("{start:?} not in the page:\n{}", self.body));
        let rest = &self.body[at + start.len()..];
        rest[..rest.find(end).unwrap()].to_owned()
    }
}

impl Browser {
    pub(crate) fn new(kg: &TestKeygate) -> Self {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { base: kg.url(), http, cookie: None }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header(COOKIE, format!("keygate_session={c}")),
            None => req,
        };
        let resp = req.send().await.unwrap();
        if let Some(set) = resp.headers().get(SET_COOKIE).and_then(|v| v.to_str().ok()) {
            let value = set.split(';').next().unwrap().trim_start_matches("keygate_session=").to_owned();
            self.cookie = (!value.is_empty()).then_some(value);
        }
        let status = resp.status();
        let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let headers = resp.headers().clone();
        // minijinja escapes `/` in values as `&#x2f;`, which browsers read back as `/`.
        let body = resp.text().await.unwrap().replace("&#x2f;", "/");
        Page { status, location, body, headers }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Page {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    pub(crate) async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let req = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(req).await
    }

    /// Posts a form with the CSRF token of `page_path`.
    pub(crate) async fn submit(&mut self, page_path: &str, action: &str, form: &[(&str, &str)]) -> Page {
        let csrf = self.get(page_path).await.csrf();
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend_from_slice(form);
        self.post(action, &fields).await
    }
}

fn code_at(secret_b32: &str, kg: &TestKeygate, offset_s: i64) -> String {
    let key = base32_decode(secret_b32);
    totp::totp(totp::Algorithm::Sha1, &key, kg.clock.now().as_millis() / 1000 + offset_s, 30, 6)
}

fn base32_decode(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut buf, mut bits, mut out) = (0u32, 0, Vec::new());
    for c in s.bytes() {
        let v = alphabet.iter().position(|a| *a == c).unwrap() as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            out.push((buf >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// Sets up the first owner and returns their browser.
pub(crate) async fn owner(kg: &TestKeygate) -> Browser {
    let mut b = Browser::new(kg);
    let code = kg.setup_code().expect("a fresh keygate offers a setup code");
    let p = b
        .post("/setup", &[("code", &code), ("name", "Olivia"), ("email", "olivia@example.com"), ("password", PASSWORD)])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    b
}

/// Invites `email` as `role` and accepts in a fresh browser.
pub(crate) async fn member(kg: &TestKeygate, owner: &mut Browser, email: &str, role: &str) -> Browser {
    let p = owner.submit("/members", "/members/invite", &[("email", email), ("role", role)]).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    let link = p.between("id=\"invite-link\" class=\"secret\">", "<").replace("&#x2f;", "/");
    let path = &link[link.find("/invite/").unwrap()..];
    let mut b = Browser::new(kg);
    assert_eq!(b.get(path).await.status, StatusCode::OK);
    let p = b.post(path, &[("name", email), ("password", PASSWORD)]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(b.get(path).await.status, StatusCode::NOT_FOUND, "an invitation works once");
    b
}

pub(crate) async fn create_app(b: &mut Browser, name: &str) -> String {
    let p = b.submit("/apps", "/apps", &[("name", name)]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let page = b.get("/tokens/new").await;
    let at = page.body.find(&format!(">{name}</option>")).unwrap();
    let before = &page.body[..at];
    let start = before.rfind("value=\"").unwrap() + 7;
    before[start..start + before[start..].find('"').unwrap()].to_owned()
}

async fn create_token(b: &mut Browser, app: &str) -> (String, String) {
    let p = b.submit("/tokens/new", "/tokens", &[("name", "t"), ("app", app), ("expiry", "30d")]).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    let secret = p.between("id=\"token-secret\" class=\"secret\">", "<");
    let id = p.between("href=\"/tokens/tok_", "\"");
    (format!("tok_{id}"), secret)
}

#[tokio::test]
async fn setup_two_factor_sign_in_and_recovery() {
    let kg = TestKeygate::start().await.unwrap();
    let mut anon = Browser::new(&kg);
    let p = anon.get("/").await;
    assert_eq!(p.location.as_deref(), Some("/setup"), "a fresh keygate sends people to the setup page");
    let p = anon
        .post("/setup", &[("code", "wrong-code"), ("name", "X"), ("email", "x@example.com"), ("password", PASSWORD)])
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("setup code is not right"));
    let p = anon
        .post(
            "/setup",
            &[("code", &kg.setup_code().unwrap()), ("name", "X"), ("email", "x@example.com"), ("password", "short")],
        )
        .await;
    assert!(p.body.contains("at least 12 characters"), "a weak password is refused and the code still works");

    let mut b = owner(&kg).await;
    let again = Browser::new(&kg)
        .post(
            "/setup",
            &[("code", &kg.setup_code().unwrap()), ("name", "Y"), ("email", "y@example.com"), ("password", PASSWORD)],
        )
        .await;
    assert_ne!(again.status, StatusCode::SEE_OTHER, "the setup code works once");
    let home = b.get("/").await;
    assert!(home.body.contains("Welcome, Olivia"));
    assert!(home.body.contains("Two-factor sign-in is off"));
    for h in ["content-security-policy", "x-frame-options", "x-content-type-options"] {
        assert!(home.headers.contains_key(h), "{h}");
    }
    let csp = home.headers["content-security-policy"].to_str().unwrap();
    assert!(!csp.contains("unsafe-inline") && csp.contains("frame-ancestors 'none'"));

    // Enrol: the secret is shown with its QR code; a wrong code does not turn it on.
    let p = b.submit("/account/security", "/account/2fa/start", &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let page = b.get("/account/security").await;
    assert!(page.body.contains("id=\"totp-qr\"") && page.body.contains("data:image/svg+xml;base64,"));
    let secret = page.between("id=\"totp-secret\">", "<");
    let p = b.submit("/account/security", "/account/2fa/confirm", &[("code", "000000")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    let code = code_at(&secret, &kg, 0);
    let p = b.submit("/account/security", "/account/2fa/confirm", &[("code", &code)]).await;
    assert!(p.body.contains("Two-factor sign-in is on"), "{}", p.body);
    let recovery = p.between("<ul id=\"recovery-codes\" class=\"codes\"><li>", "</li>");

    // Sign out, then in: the password alone is not enough.
    let p = b.submit("/", "/logout", &[]).await;
    assert_eq!(p.location.as_deref(), Some("/login?msg=signed_out"));
    assert_eq!(b.get("/").await.location.as_deref(), Some("/login"));
    let p = b.post("/login", &[("email", "OLIVIA@example.com"), ("password", PASSWORD)]).await;
    assert_eq!(p.location.as_deref(), Some("/login/2fa"));
    assert_eq!(b.get("/").await.location.as_deref(), Some("/login"), "a pending session opens no page");
    let p = b.submit("/login/2fa", "/login/2fa", &[("code", &code)]).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED, "the code used at enrolment cannot be replayed");
    let next = code_at(&secret, &kg, 30);
    let p = b.submit("/login/2fa", "/login/2fa", &[("code", &next)]).await;
    assert_eq!(p.location.as_deref(), Some("/"));
    assert_eq!(b.get("/").await.status, StatusCode::OK);

    // A recovery code works once.
    for (i, expect) in [(0, Some("/")), (1, None)] {
        let mut other = Browser::new(&kg);
        other.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
        let p = other.submit("/login/2fa", "/login/2fa", &[("code", &recovery)]).await;
        assert_eq!(p.location.as_deref(), expect, "recovery code use {i}");
    }
    let audit = b.get("/audit?action=user.signed_in").await;
    assert!(audit.body.contains("user.signed_in"));
    let csv = b.get("/audit/export.csv").await;
    assert!(csv.body.starts_with("at,actor,action,target"));
    assert!(!csv.body.contains(PASSWORD) && !csv.body.contains(&recovery), "no secret in the audit trail");
}

#[tokio::test]
async fn every_role_can_do_what_it_should_and_nothing_else() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "admin@example.com", "admin").await;
    let mut dev_a = member(&kg, &mut own, "a@example.com", "developer").await;
    let mut dev_b = member(&kg, &mut own, "b@example.com", "developer").await;
    let mut viewer = member(&kg, &mut own, "v@example.com", "viewer").await;

    let app_a = create_app(&mut dev_a, "App A").await;
    let (tok_a, _) = create_token(&mut dev_a, &app_a).await;
    let app_b = create_app(&mut dev_b, "App B").await;
    let token_page = format!("/tokens/{tok_a}");

    // Reading: everyone but the other developer sees A's token.
    for (who, b, expect) in [
        ("owner", &mut own, StatusCode::OK),
        ("admin", &mut admin, StatusCode::OK),
        ("developer A", &mut dev_a, StatusCode::OK),
        ("developer B", &mut dev_b, StatusCode::NOT_FOUND),
        ("viewer", &mut viewer, StatusCode::OK),
    ] {
        assert_eq!(b.get(&token_page).await.status, expect, "{who} reading A's token");
    }
    assert!(!dev_b.get("/tokens").await.body.contains(&tok_a), "B's list does not show A's token");
    assert!(!dev_b.get("/tokens/new").await.body.contains(&app_a), "B cannot pick A's app");

    // Changing: B and the viewer cannot suspend A's token; the admin can.
    let suspend = format!("/tokens/{tok_a}/suspend");
    let p = dev_b.submit("/tokens", &suspend, &[]).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND, "developer B suspending A's token");
    let p = viewer.submit("/tokens", &suspend, &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "viewer suspending");
    let p = admin.submit(&token_page, &suspend, &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "admin suspending");
    let p = dev_a.submit(&token_page, &format!("/tokens/{tok_a}/resume"), &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "A resuming their own token");

    // Creating: the viewer cannot; B cannot create a token in A's app.
    assert_eq!(viewer.get("/tokens/new").await.status, StatusCode::FORBIDDEN);
    let p = viewer.submit("/apps", "/apps", &[("name", "viewer app")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    assert!(!viewer.get("/").await.body.contains("Create a token"));
    let p = dev_b.submit("/tokens/new", "/tokens", &[("name", "sneaky"), ("app", &app_a), ("expiry", "30d")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST, "B creating a token in A's app");
    let (_, _) = create_token(&mut dev_b, &app_b).await;

    // Invitations can be withdrawn by owners; the link then stops working.
    let p = own.submit("/members", "/members/invite", &[("email", "late@example.com"), ("role", "viewer")]).await;
    let link = p.between("id=\"invite-link\" class=\"secret\">", "<");
    let path = link[link.find("/invite/").unwrap()..].to_owned();
    let members = own.get("/members").await;
    let inv = format!("inv_{}", members.between("action=\"/members/invitations/inv_", "/withdraw"));
    let p = admin.submit("/", &format!("/members/invitations/{inv}/withdraw"), &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "admins cannot withdraw invitations");
    let p = own.submit("/members", &format!("/members/invitations/{inv}/withdraw"), &[]).await;
    assert_eq!(p.location.as_deref(), Some("/members?msg=invitation_withdrawn"));
    assert_eq!(Browser::new(&kg).get(&path).await.status, StatusCode::NOT_FOUND);

    // Members: only owners.
    for (who, b) in [("admin", &mut admin), ("developer", &mut dev_a), ("viewer", &mut viewer)] {
        assert_eq!(b.get("/members").await.status, StatusCode::FORBIDDEN, "{who} opening members");
        let p = b.submit("/", "/members/invite", &[("email", "z@example.com"), ("role", "owner")]).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{who} inviting");
    }
    // Audit: developers see their own actions only.
    let a_audit = dev_a.get("/audit").await.body;
    assert!(a_audit.contains("token.create") && !a_audit.contains("member.invited"));
    assert!(own.get("/audit").await.body.contains("member.invited"));

    // The last owner cannot leave or be demoted.
    let members = own.get("/members").await;
    let mine = &members.body[members.body.find("(you)").unwrap()..];
    let at = mine.find("action=\"/members/").unwrap() + "action=\"/members/".len();
    let me = mine[at..at + mine[at..].find('/').unwrap()].to_owned();
    let p = own.submit("/members", &format!("/members/{me}/role"), &[("role", "viewer")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("needs an owner"));
}

#[tokio::test]
async fn forms_need_the_sessions_csrf_token_and_the_same_origin() {
    let kg = TestKeygate::start().await.unwrap();
    let mut b = owner(&kg).await;
    let csrf = b.get("/apps").await.csrf();
    for (name, fields, origin) in [
        ("no token", vec![("name", "forged1")], None),
        ("a wrong token", vec![("csrf", "AAAA"), ("name", "forged2")], None),
        ("another site", vec![("csrf", csrf.as_str()), ("name", "forged3")], Some("https://evil.example")),
    ] {
        let mut req = b.http.post(format!("{}/apps", b.base)).form(&fields);
        if let Some(o) = origin {
            req = req.header("origin", o).header("sec-fetch-site", "cross-site");
        }
        let p = b.send(req).await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{name}");
    }
    let apps = b.get("/apps").await.body;
    assert!(!apps.contains("forged"), "nothing was created");
    // What Chromium sends on a same-origin post when it withholds the origin: accepted with the
    // token; the same from another site is not.
    let fields = [("csrf", csrf.as_str()), ("name", "legit")];
    let req = b.http.post(format!("{}/apps", b.base)).form(&fields).header("origin", "null");
    let cross = b.send(req.header("sec-fetch-site", "cross-site")).await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN);
    let req = b.http.post(format!("{}/apps", b.base)).form(&fields).header("origin", "null");
    let same = b.send(req.header("sec-fetch-site", "same-origin")).await;
    assert_eq!(same.status, StatusCode::SEE_OTHER);
    // Another person's token does not fit this session.
    let mut other = member(&kg, &mut b, "d@example.com", "developer").await;
    let theirs = other.get("/apps").await.csrf();
    assert_ne!(theirs, csrf);
    let p = b.post("/apps", &[("csrf", &theirs), ("name", "forged4")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn sessions_end_when_idle_or_old_and_sign_in_is_throttled() {
    let kg = TestKeygate::start().await.unwrap();
    let mut b = owner(&kg).await;
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    kg.clock.advance_seconds(31 * 60);
    assert_eq!(b.get("/").await.location.as_deref(), Some("/login"), "idle for 31 minutes");

    let p = b.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    assert_eq!(p.location.as_deref(), Some("/"));
    for _ in 0..36 {
        kg.clock.advance_seconds(20 * 60);
        if b.get("/").await.status != StatusCode::OK {
            break;
        }
    }
    let elapsed_ok = b.get("/").await;
    assert_eq!(elapsed_ok.location.as_deref(), Some("/login"), "a session ends 12 hours after sign-in");

    // Ten wrong passwords lock the account for a while, even for the right one.
    let mut attacker = Browser::new(&kg);
    for _ in 0..10 {
        let p = attacker.post("/login", &[("email", "olivia@example.com"), ("password", "wrong password!!")]).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    }
    let p = attacker.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
    kg.clock.advance_seconds(16 * 60);
    let p = attacker.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    assert_eq!(p.location.as_deref(), Some("/"), "the lock lifts after the window");
}

#[tokio::test]
async fn a_token_made_in_the_dashboard_works_at_the_gateway_until_revoked() {
    let kg = TestKeygate::start().await.unwrap();
    let mut b = owner(&kg).await;
    let app = create_app(&mut b, "Shop").await;
    let (id, secret) = create_token(&mut b, &app).await;
    let gw = reqwest::Client::new();
    let call = |s: String| {
        let gw = gw.clone();
        let url = format!("{}/demo/echo", kg.gateway_url());
        async move { gw.get(url).bearer_auth(s).send().await.unwrap().status() }
    };
    assert_eq!(call(secret.clone()).await, StatusCode::OK);
    let page = b.get(&format!("/tokens/{id}")).await;
    assert_eq!(page.between("id=\"usage-total\">", "<"), "1", "live usage before any flush");
    assert!(page.body.contains("id=\"usage-chart\""));
    let p =
        b.submit(&format!("/tokens/{id}"), &format!("/tokens/{id}/revoke"), &[("reason", "leaked in a demo")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(call(secret).await, StatusCode::UNAUTHORIZED, "revoked on the next request");
    let page = b.get(&format!("/tokens/{id}")).await;
    assert!(page.body.contains("badge revoked") && page.body.contains("leaked in a demo"));
    // How far the revocation spread: one node here, which had applied it.
    assert_eq!(page.between("id=\"propagation\" class=\"muted\">", "</p>"), "Revoked on 1/1 nodes");
    let nodes = b.get("/nodes").await;
    assert_eq!(nodes.status, StatusCode::OK);
    assert!(nodes.body.contains(&kg.cluster().id().to_owned()), "{}", nodes.body);
    assert_eq!(nodes.between("<p id=\"nodes-live\"><strong>", "</strong>"), "1");
}

/// `POST /oauth2/token` on the gateway: client credentials with HTTP Basic.
async fn client_credentials(kg: &TestKeygate, id: &str, secret: &str) -> (StatusCode, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/oauth2/token", kg.gateway_url()))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test]
async fn an_apps_oauth_client_is_registered_and_rotated_from_its_page() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let mut viewer = member(&kg, &mut own, "v@example.com", "viewer").await;
    let app = create_app(&mut own, "Billing").await;
    let page_path = format!("/apps/{app}");
    assert!(own.get("/apps").await.body.contains(&format!("href=\"/apps/{app}\"")), "the apps list links the page");
    let page = own.get(&page_path).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Register OAuth client"));
    assert!(page.body.contains(&format!("{}/oauth2/token", kg.gateway_url())), "the token endpoint is named");
    let seen = viewer.get(&page_path).await;
    assert_eq!(seen.status, StatusCode::OK);
    assert!(!seen.body.contains("Register OAuth client"), "a viewer gets no form");

    // The service's refusals are shown on the form, with what was typed.
    let action = format!("/apps/{app}/oauth-client");
    let basic = ("grant_types", "client_credentials");
    for (form, says) in [
        (vec![], "choose at least one grant type"),
        (vec![basic, ("auth_method", "private_key_jwt"), ("jwks", r#"{"keys": []}"#)], "jwks must be a JWK Set"),
        (vec![basic, ("auth_method", "private_key_jwt"), ("jwks", "not json")], "the JWKS is not valid JSON"),
        (vec![basic, ("access_token_ttl", "999999")], "access_token_ttl_seconds must be between 1 and 86400"),
        (vec![basic, ("scopes_text", "Not A Scope")], "scope"),
    ] {
        let p = own.submit(&page_path, &action, &form).await;
        assert_eq!(p.status, StatusCode::BAD_REQUEST, "{says}: {}", p.body);
        assert!(p.body.contains(says) && p.body.contains("notice error"), "{says}: {}", p.body);
        assert!(p.body.contains("Register OAuth client"), "the form is shown again");
    }
    let p = own.submit(&page_path, &action, &[basic, ("auth_method", "private_key_jwt"), ("jwks", "not json")]).await;
    assert!(p.body.contains(">not json</textarea>") && p.body.contains("value=\"private_key_jwt\" selected"));
    // The scope picker is the token form's: the catalog's scopes as checkboxes.
    for scope in ["orders:read", "users:read"] {
        let body = serde_json::json!({"api": "shop"});
        let put = kg.client().send(reqwest::Method::PUT, &format!("/admin/v1/scopes/{scope}"), Some(&body)).await;
        assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    }
    let p = own.submit(&page_path, &action, &[basic, ("scopes", "orders:read"), ("access_token_ttl", "0")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("value=\"orders:read\" checked") && !p.body.contains("value=\"users:read\" checked"));

    // Registered: the client id, and the secret shown once.
    let p = own
        .submit(
            &page_path,
            &action,
            &[
                basic,
                ("grant_types", "refresh_token"),
                ("scopes", "orders:read"),
                ("auth_method", "client_secret_basic"),
                ("access_token_format", "jwt"),
                ("signing_alg", "EdDSA"),
                ("access_token_ttl", "600"),
            ],
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert_eq!(p.headers["cache-control"], "no-store");
    assert!(p.body.contains("Copy this client secret now"));
    let client_id = p.between("id=\"client-id\" class=\"secret\">", "<");
    let secret = p.between("id=\"client-secret\" class=\"secret\">", "<");
    let page = own.get(&page_path).await;
    assert!(page.body.contains(&client_id) && !page.body.contains(&secret), "the secret is not shown again");
    assert!(page.body.contains(&format!("…{}", &secret[secret.len() - 4..])), "its last four are");
    assert!(page.body.contains("Rotate secret") && !page.body.contains("Register OAuth client"));
    assert!(page.body.contains("<code>orders:read</code>") && page.body.contains("JWT signed EdDSA, valid 600 s"));
    let seen = viewer.get(&page_path).await.body;
    assert!(seen.contains(&client_id) && !seen.contains("Rotate secret"), "a viewer sees the client, not the form");

    // It works at the gateway's token endpoint.
    let (status, t) = client_credentials(&kg, &client_id, &secret).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert!(t["access_token"].as_str().is_some_and(|a| a.split('.').count() == 3), "a JWT: {t}");
    assert_eq!((t["expires_in"].as_u64(), t["scope"].as_str()), (Some(600), Some("orders:read")));
    assert!(t["refresh_token"].is_string(), "the refresh grant was chosen: {t}");
    let p = own.submit(&page_path, &action, &[basic]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("already an OAuth client"), "{}", p.body);

    // Rotation: the old secret works for the grace period, then not.
    let rotate = format!("/apps/{app}/oauth-client/rotate");
    let p = viewer.submit(&page_path, &rotate, &[("grace", "3600")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "a viewer cannot rotate");
    let p = own.submit(&page_path, &rotate, &[("grace", "5")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("choose one of the grace periods"));
    let p = own.submit(&page_path, &rotate, &[("grace", "3600")]).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert!(p.body.contains("Client secret rotated") && p.body.contains("keeps working only for the grace period"));
    let rotated = p.between("id=\"client-secret\" class=\"secret\">", "<");
    assert_ne!(rotated, secret);
    assert_eq!(client_credentials(&kg, &client_id, &rotated).await.0, StatusCode::OK);
    assert_eq!(client_credentials(&kg, &client_id, &secret).await.0, StatusCode::OK, "within the grace period");
    assert!(own.get(&page_path).await.between("id=\"previous-secret\">", "</td>").starts_with("works until"));

    // Suspended from the page, with a reason: the page shows since when and why, and a Resume
    // button; the token endpoint refuses the client. A viewer sees it and can do neither.
    let suspend = format!("/apps/{app}/oauth-client/suspend");
    let resume = format!("/apps/{app}/oauth-client/resume");
    let status_cell =
        |body: &str| body.split("id=\"client-status\">").nth(1).unwrap().split("</td>").next().unwrap().to_owned();
    let page = own.get(&page_path).await.body;
    assert!(page.contains("Suspend client") && status_cell(&page).contains("badge active\">active<"), "{page}");
    assert_eq!(viewer.submit(&page_path, &suspend, &[]).await.status, StatusCode::FORBIDDEN);
    let long = "x".repeat(501);
    let p = own.submit(&page_path, &suspend, &[("reason", long.as_str())]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("reason must be at most 500 characters") && p.body.contains("notice error"), "{}", p.body);
    let p = own.submit(&page_path, &suspend, &[("reason", "rotating after an incident")]).await;
    assert_eq!(p.location, Some(format!("/apps/{app}?msg=client_suspended")), "{}", p.body);
    let page = own.get(&format!("/apps/{app}?msg=client_suspended")).await.body;
    assert!(page.contains("OAuth client suspended: it is issued no token"), "{page}");
    let cell = status_cell(&page);
    assert!(cell.contains("badge suspended\">suspended<") && cell.contains(": rotating after an incident"), "{cell}");
    assert!(
        page.contains("id=\"client-suspended\"") && page.contains("Resume client") && !page.contains("Suspend client")
    );
    let (status, t) = client_credentials(&kg, &client_id, &rotated).await;
    assert_eq!((status, t["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unauthorized_client")), "{t}");
    let seen = viewer.get(&page_path).await.body;
    assert!(status_cell(&seen).contains("suspended") && !seen.contains("Resume client"), "a viewer gets no button");
    assert_eq!(viewer.submit(&page_path, &resume, &[]).await.status, StatusCode::FORBIDDEN);
    // Resumed: the client works again.
    let p = own.submit(&page_path, &resume, &[]).await;
    assert_eq!(p.location, Some(format!("/apps/{app}?msg=client_resumed")), "{}", p.body);
    let page = own.get(&page_path).await.body;
    assert!(status_cell(&page).contains("badge active\">active<") && page.contains("Suspend client"));
    assert_eq!(client_credentials(&kg, &client_id, &rotated).await.0, StatusCode::OK);
    kg.clock.advance_seconds(3601);
    assert_eq!(client_credentials(&kg, &client_id, &secret).await.0, StatusCode::UNAUTHORIZED, "after it");
    assert_eq!(client_credentials(&kg, &client_id, &rotated).await.0, StatusCode::OK);
    // (The session ended while idle.)
    let p = own.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    assert_eq!(p.location.as_deref(), Some("/"));
    assert!(own.get(&page_path).await.between("id=\"previous-secret\">", "</td>").starts_with("stopped working"));
    for action in ["oauth_client.create", "oauth_client.rotate_secret", "oauth_client.suspend", "oauth_client.resume"] {
        let audit = own.get(&format!("/audit?action={action}")).await.body;
        assert!(audit.contains(&format!(">{action}<")) && audit.contains("Olivia"), "{action} by the owner: {audit}");
    }
    let csv = own.get("/audit/export.csv").await.body;
    assert!(!csv.contains(&secret) && !csv.contains(&rotated), "no secret in the audit trail");

    // A private_key_jwt client has no secret to show or rotate.
    let signer = create_app(&mut own, "Signer").await;
    let key = keygate_core::jose::SigningKey::generate(keygate_core::jose::Alg::ES256, "k1").unwrap();
    let jwks = format!("{{\"keys\": [{}]}}", key.public_jwk().to_json());
    let form = [basic, ("auth_method", "private_key_jwt"), ("jwks", jwks.as_str())];
    let p = own.submit(&format!("/apps/{signer}"), &format!("/apps/{signer}/oauth-client"), &form).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert!(p.body.contains("it has no secret") && !p.body.contains("id=\"client-secret\""));
    let page = own.get(&format!("/apps/{signer}")).await.body;
    assert!(page.contains("(1 registered key)") && !page.contains("Rotate secret"), "{page}");
}

#[tokio::test]
async fn owners_rotate_the_signing_keys_from_the_settings() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let mut admin = member(&kg, &mut own, "a@example.com", "admin").await;
    let settings = own.get("/settings").await;
    assert!(settings.body.contains("Signing keys"), "{}", settings.body);
    assert_eq!(settings.body.matches("<tr><td><code>eddsa-").count(), 1, "the key made at start");
    assert!(settings.body.contains("badge active\">signing<"));
    assert_eq!(admin.get("/settings/signing-keys/rotate").await.status, StatusCode::FORBIDDEN);
    let p = admin.submit("/", "/settings/signing-keys/rotate", &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "admins cannot rotate the instance's keys");

    let confirm = own.get("/settings/signing-keys/rotate").await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(
        confirm.body.contains("Rotate the signing keys?")
            && confirm.body.contains("action=\"/settings/signing-keys/rotate\"")
    );
    let p = own.submit("/settings/signing-keys/rotate", "/settings/signing-keys/rotate", &[]).await;
    assert_eq!(p.location.as_deref(), Some("/settings?msg=keys_rotated"), "{}", p.body);
    let settings = own.get("/settings?msg=keys_rotated").await.body;
    assert!(settings.contains("Signing keys rotated"));
    assert_eq!(settings.matches("<tr><td><code>eddsa-").count(), 2, "the new key is published beside the old");
    assert!(settings.contains("published, signs later") && settings.contains("badge active\">signing<"));
    let keys = kg.client().get("/admin/v1/oauth/keys").await;
    let data = keys.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        data.iter().filter(|k| k["retired_at"].is_string()).count(),
        1,
        "the old key retires when the new signs"
    );
    for action in ["oauth.signing_key.create", "oauth.signing_key.retire"] {
        let audit = own.get(&format!("/audit?action={action}")).await.body;
        assert!(audit.contains(&format!(">{action}<")) && audit.contains("Olivia"), "{action} by the owner: {audit}");
    }
}

#[tokio::test]
async fn the_portal_lists_apis_renders_their_openapi_and_tries_them() {
    let upstream = keygate_testkit::MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("orders.json");
    std::fs::write(
        &doc,
        r#"{"openapi":"3.1.0","info":{"title":"Orders API","version":"2.0","description":"Orders <b>of the shop</b>"},
            "paths":{"/orders/{id}":{"get":{"summary":"Read an order","parameters":[{"name":"id","in":"path"}]}}}}"#,
    )
    .unwrap();
    let mut orders = keygate_testkit::route("orders", "/orders", &upstream.url());
    orders.description = Some("Orders of the shop".into());
    orders.openapi = Some(doc.display().to_string());
    orders.scopes.insert("GET".into(), "orders:read".into());
    let mut broken = keygate_testkit::route("broken", "/broken", &upstream.url());
    broken.openapi = Some(dir.path().join("missing.json").display().to_string());
    let kg = TestKeygate::start_with(keygate_testkit::Options { routes: vec![orders, broken], ..Default::default() })
        .await
        .unwrap();
    let mut b = owner(&kg).await;
    let portal = b.get("/portal").await;
    assert!(portal.body.contains("/portal/orders") && portal.body.contains("/portal/demo"));
    let api = b.get("/portal/orders").await;
    assert_eq!(api.status, StatusCode::OK);
    assert!(api.body.contains("Orders API") && api.body.contains("Read an order") && api.body.contains("id (path)"));
    assert!(api.body.contains("&lt;b&gt;of the shop"), "document text is escaped, never markup");
    assert!(api.body.contains("curl -H") && api.body.contains("requests.get") && api.body.contains("reqwest::Client"));
    let broken = b.get("/portal/broken").await;
    assert!(broken.body.contains("could not be read"), "a missing document is reported on the page");
    assert_eq!(b.get("/portal/nope").await.status, StatusCode::NOT_FOUND);

    // The explorer sends a real request through the gateway, with the token from the form.
    let app = create_app(&mut b, "Explorer").await;
    let (_, secret) = create_token(&mut b, &app).await;
    let p = b
        .submit(
            "/portal/demo",
            "/portal/demo/try",
            &[("method", "GET"), ("path", "/demo/echo?x=1"), ("token", &secret)],
        )
        .await;
    assert!(p.body.contains("HTTP 200"), "{}", p.body);
    assert!(p.body.contains("identity") && !p.body.contains(&secret), "the answer is shown, the token is not echoed");
    let p =
        b.submit("/portal/demo", "/portal/demo/try", &[("method", "GET"), ("path", "/demo/echo"), ("token", "")]).await;
    assert!(p.body.contains("HTTP 401"));
    let p = b
        .submit("/portal/demo", "/portal/demo/try", &[("method", "GET"), ("path", "/orders/1"), ("token", &secret)])
        .await;
    assert!(p.body.contains("is not served by the API demo"), "the explorer stays within the API it is on");
    let p = b
        .submit(
            "/portal/demo",
            "/portal/demo/try",
            &[("method", "GET"), ("path", "/demo/echo/../../orders/1"), ("token", &secret)],
        )
        .await;
    assert!(p.body.contains("is not served by the API demo"), "dot segments are resolved before the check");
}

#[tokio::test]
async fn owners_set_the_workspace_policy_and_it_is_enforced() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let mut dev = member(&kg, &mut own, "dev@example.com", "developer").await;
    assert_eq!(dev.get("/settings").await.status, StatusCode::FORBIDDEN);

    // Plans: made and narrowed by owners, in the settings.
    let p = own
        .submit(
            "/settings",
            "/settings/plans",
            &[("name", "Starter"), ("scopes_text", "orders:read"), ("rate_limit", "60")],
        )
        .await;
    assert_eq!(p.location.as_deref(), Some("/settings?msg=plan_saved"));
    let plans = kg.client().get("/admin/v1/plans").await;
    let plan_id = plans.str("/data/0/id");
    assert_eq!(plans.body["data"][0]["rate_limit"]["requests"], 60);
    let p = own
        .submit("/settings", &format!("/settings/plans/{plan_id}/scopes"), &[("scopes_text", "orders:* users:read")])
        .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let plans = kg.client().get("/admin/v1/plans").await;
    assert_eq!(plans.body["data"][0]["scopes"], serde_json::json!(["orders:*", "users:read"]));
    let p =
        own.submit("/settings", &format!("/settings/plans/{plan_id}/scopes"), &[("scopes_text", "Not A Scope!")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    let p = dev.submit("/", &format!("/settings/plans/{plan_id}/scopes"), &[("scopes_text", "")]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);

    let p = own.submit("/settings", "/settings", &[("max_token_lifetime_days", "30")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let app = create_app(&mut dev, "Limited").await;
    let p = dev.submit("/tokens/new", "/tokens", &[("name", "long"), ("app", &app), ("expiry", "90d")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("at most 30 days"));
    let api = kg.client().post("/admin/v1/tokens", &serde_json::json!({"name": "no expiry"})).await;
    assert_eq!(api.status, StatusCode::BAD_REQUEST, "the policy applies to the admin API too");
    assert_eq!(api.code(), "lifetime_too_long");

    // Requiring two-factor: not before the owner has it; then members without it are sent to
    // the enrolment page.
    let p = own.submit("/settings", "/settings", &[("require_two_factor", "on")]).await;
    assert!(p.body.contains("turn on two-factor sign-in for your own account first"));
    own.submit("/account/security", "/account/2fa/start", &[]).await;
    let secret = own.get("/account/security").await.between("id=\"totp-secret\">", "<");
    let code = code_at(&secret, &kg, 0);
    own.submit("/account/security", "/account/2fa/confirm", &[("code", &code)]).await;
    let p = own.submit("/settings", "/settings", &[("require_two_factor", "on")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(dev.get("/tokens").await.location.as_deref(), Some("/account/security?msg=2fa_required"));
    assert_eq!(dev.get("/account/security").await.status, StatusCode::OK);
}

#[tokio::test]
async fn plan_changes_wait_for_an_admin_when_the_workspace_says_so() {
    let kg = TestKeygate::start().await.unwrap();
    let plan = kg.client().post("/admin/v1/plans", &serde_json::json!({"name": "Pro", "scopes": []})).await;
    assert_eq!(plan.status, StatusCode::CREATED, "{:?}", plan.body);
    let plan_id = plan.str("/id");
    let mut own = owner(&kg).await;
    let mut dev = member(&kg, &mut own, "dev@example.com", "developer").await;
    let app = create_app(&mut dev, "Needs Pro").await;

    // Without the policy, a developer moves their own app at once.
    let p = dev.submit("/apps", &format!("/apps/{app}/plan"), &[("plan", &plan_id)]).await;
    assert_eq!(p.location.as_deref(), Some("/apps?msg=plan_applied"));

    let p = own.submit("/settings", "/settings", &[("plan_changes_need_approval", "on")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let app2 = create_app(&mut dev, "Second").await;
    let p = dev.submit("/tokens/new", "/tokens", &[("name", "early"), ("app", &app2), ("expiry", "30d")]).await;
    assert!(p.body.contains("request a plan for this app"), "no tokens before the app is on a plan");
    let p = dev
        .submit(
            &format!("/apps/{app2}"),
            &format!("/apps/{app2}/oauth-client"),
            &[("grant_types", "client_credentials")],
        )
        .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("request a plan for this app"), "nor an OAuth client");
    let p = dev.submit("/apps", &format!("/apps/{app2}/plan"), &[("plan", &plan_id), ("note", "launch week")]).await;
    assert_eq!(p.location.as_deref(), Some("/apps?msg=plan_requested"));
    let apps = dev.get("/apps").await;
    assert!(apps.body.contains("launch week") && apps.body.contains(">pending<"));
    let req = format!("preq_{}", own.get("/apps").await.between("action=\"/plan-requests/preq_", "/approve"));
    let p = dev.submit("/apps", &format!("/plan-requests/{req}/approve"), &[]).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "a developer cannot approve their own request");
    let p = own.submit("/apps", &format!("/plan-requests/{req}/approve"), &[]).await;
    assert_eq!(p.location.as_deref(), Some("/apps?msg=plan_decided"));
    let app_json = kg.client().get(&format!("/admin/v1/apps/{app2}")).await;
    assert_eq!(app_json.str("/plan_id"), plan_id, "approval moved the app");
    let p = own.submit("/apps", &format!("/plan-requests/{req}/deny"), &[]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST, "a decided request stays decided");
    let audit = own.get("/audit").await.body;
    assert!(audit.contains("plan.requested") && audit.contains("plan.request_approved"));
    // Another developer's app cannot be moved at all.
    let mut other = member(&kg, &mut own, "other@example.com", "developer").await;
    let p = other.submit("/apps", &format!("/apps/{app}/plan"), &[("plan", &plan_id)]).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
}

/// Every role against every action of the dashboard, in one table: `O` owner, `A` admin, `D`
/// the developer who owns the app, `d` another developer, `V` viewer.
#[tokio::test]
async fn the_role_action_matrix() {
    let kg = TestKeygate::start().await.unwrap();
    let plan = kg.client().post("/admin/v1/plans", &serde_json::json!({"name": "Pro", "scopes": []})).await.str("/id");
    let mut o = owner(&kg).await;
    let mut a = member(&kg, &mut o, "admin@example.com", "admin").await;
    let mut d = member(&kg, &mut o, "dev@example.com", "developer").await;
    let mut d2 = member(&kg, &mut o, "dev2@example.com", "developer").await;
    let mut v = member(&kg, &mut o, "viewer@example.com", "viewer").await;
    let app = create_app(&mut d, "Owned by D").await;
    let (tok, _) = create_token(&mut d, &app).await;
    let members = o.get("/members").await.body;
    let user_id = |email: &str| {
        let at = members.find(&format!("<td>{email}</td>")).unwrap();
        let rest = &members[at..];
        let start = rest.find("action=\"/members/").unwrap() + "action=\"/members/".len();
        rest[start..start + rest[start..].find('/').unwrap()].to_owned()
    };
    let d2_id = user_id("dev2@example.com");

    let mut failures = Vec::new();
    let mut check = |action: &str, who: char, got: StatusCode, want: u16| {
        if got.as_u16() != want {
            failures.push(format!("{action:<28} {who}: got {}, want {want}", got.as_u16()));
        }
    };
    let roles: [(char, &mut Browser); 5] = [('O', &mut o), ('A', &mut a), ('D', &mut d), ('d', &mut d2), ('V', &mut v)];
    // Expected statuses in the order O, A, D, d, V.
    let reads: [(&str, String, [u16; 5]); 11] = [
        ("GET /", "/".into(), [200; 5]),
        ("GET /apps/{D's}", format!("/apps/{app}"), [200, 200, 200, 404, 200]),
        ("GET /settings/signing-keys/rotate", "/settings/signing-keys/rotate".into(), [200, 403, 403, 403, 403]),
        ("GET /tokens", "/tokens".into(), [200; 5]),
        ("GET /tokens/{D's}", format!("/tokens/{tok}"), [200, 200, 200, 404, 200]),
        // The other developer has no app yet: the page says to create one first.
        ("GET /tokens/new", "/tokens/new".into(), [200, 200, 200, 409, 403]),
        ("GET /audit", "/audit".into(), [200; 5]),
        ("GET /audit/export.csv", "/audit/export.csv".into(), [200; 5]),
        ("GET /members", "/members".into(), [200, 403, 403, 403, 403]),
        ("GET /settings", "/settings".into(), [200, 403, 403, 403, 403]),
        ("GET /portal", "/portal".into(), [200; 5]),
    ];
    let mut roles = roles;
    for (name, path, want) in &reads {
        for (i, (who, b)) in roles.iter_mut().enumerate() {
            check(name, *who, b.get(path).await.status, want[i]);
        }
    }
    // Writes on D's token: each role acts on a fresh token of D's, so one role's change does not
    // decide the next one's answer.
    type Write<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, [u16; 5]);
    let writes: [Write<'_>; 5] = [
        ("POST edit", "edit", vec![("name", "renamed")], [303, 303, 303, 404, 403]),
        ("POST suspend", "suspend", vec![], [303, 303, 303, 404, 403]),
        ("POST rotate", "rotate", vec![("grace", "3600")], [200, 200, 200, 404, 403]),
        ("POST revoke", "revoke", vec![("reason", "matrix")], [303, 303, 303, 404, 403]),
        ("GET revoke page", "revoke-page", vec![], [200, 200, 200, 404, 403]),
    ];
    for (name, what, form, want) in &writes {
        for (i, (who, b)) in roles.iter_mut().enumerate() {
            let fresh = {
                // Made by D through the admin API into D's app (the API acts for the workspace).
                let r = kg
                    .client()
                    .post("/admin/v1/tokens", &serde_json::json!({"name": "fresh", "app_id": app, "expires_in": 86400}))
                    .await;
                r.str("/id")
            };
            let got = if *what == "revoke-page" {
                b.get(&format!("/tokens/{fresh}/revoke")).await.status
            } else {
                b.submit("/tokens", &format!("/tokens/{fresh}/{what}"), form).await.status
            };
            check(name, *who, got, want[i]);
        }
    }
    // Creating.
    for (i, (who, b)) in roles.iter_mut().enumerate() {
        let want = [303, 303, 303, 303, 403][i];
        check("POST /apps", *who, b.submit("/", "/apps", &[("name", &format!("app by {who}"))]).await.status, want);
        let want = [200, 200, 200, 400, 403][i];
        let got = b.submit("/", "/tokens", &[("name", "x"), ("app", &app), ("expiry", "30d")]).await.status;
        check("POST /tokens in D's app", *who, got, want);
        let want = [303, 303, 303, 404, 404][i];
        check(
            "POST /apps/{D's}/plan",
            *who,
            b.submit("/", &format!("/apps/{app}/plan"), &[("plan", &plan)]).await.status,
            want,
        );
        let got =
            b.submit("/portal/demo", "/portal/demo/try", &[("method", "GET"), ("path", "/demo/echo")]).await.status;
        check("POST /portal/demo/try", *who, got, [200, 200, 200, 200, 403][i]);
    }
    // OAuth clients: each role registers one for a fresh app of D's, and rotates the secret of
    // the client of another app of D's.
    let client_app = create_app(&mut *roles[2].1, "client app of D").await;
    let form = [("grant_types", "client_credentials")];
    let p = roles[2].1.submit("/", &format!("/apps/{client_app}/oauth-client"), &form).await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    for i in 0..5 {
        let fresh = create_app(&mut *roles[2].1, &format!("app {i} of D")).await;
        let (who, b) = &mut roles[i];
        let got = b.submit("/", &format!("/apps/{fresh}/oauth-client"), &form).await.status;
        check("POST /apps/{D's}/oauth-client", *who, got, [200, 200, 200, 404, 403][i]);
        let got = b.submit("/", &format!("/apps/{client_app}/oauth-client/rotate"), &[("grace", "3600")]).await.status;
        check("POST …/oauth-client/rotate", *who, got, [200, 200, 200, 404, 403][i]);
        let got = b.submit("/", &format!("/apps/{client_app}/oauth-client/suspend"), &[]).await.status;
        check("POST …/oauth-client/suspend", *who, got, [303, 303, 303, 404, 403][i]);
        let got = b.submit("/", &format!("/apps/{client_app}/oauth-client/resume"), &[]).await.status;
        check("POST …/oauth-client/resume", *who, got, [303, 303, 303, 404, 403][i]);
    }
    // Owner-only changes.
    for (i, (who, b)) in roles.iter_mut().enumerate() {
        let want = [200, 403, 403, 403, 403][i];
        let got = b
            .submit("/", "/members/invite", &[("email", &format!("new{i}@example.com")), ("role", "viewer")])
            .await
            .status;
        check("POST /members/invite", *who, got, want);
        let want = [303, 403, 403, 403, 403][i];
        check("POST /settings", *who, b.submit("/", "/settings", &[]).await.status, want);
        let got = b.submit("/", &format!("/members/{d2_id}/role"), &[("role", "developer")]).await.status;
        check("POST /members/{id}/role", *who, got, want);
        let got = b.submit("/", "/settings/signing-keys/rotate", &[]).await.status;
        check("POST /settings/signing-keys/rotate", *who, got, want);
    }
    // Deciding plan requests: admins and owners only.
    o.submit("/settings", "/settings", &[("plan_changes_need_approval", "on")]).await;
    let mut roles: [(char, &mut Browser); 5] =
        [('O', &mut o), ('A', &mut a), ('D', &mut d), ('d', &mut d2), ('V', &mut v)];
    for i in 0..5 {
        let p = roles[2].1.submit("/apps", &format!("/apps/{app}/plan"), &[("plan", &plan)]).await;
        assert_eq!(p.location.as_deref(), Some("/apps?msg=plan_requested"));
        let apps = roles[0].1.get("/apps").await;
        let req = format!("preq_{}", apps.between("action=\"/plan-requests/preq_", "/approve"));
        let (who, b) = &mut roles[i];
        let want = [303, 303, 403, 403, 403][i];
        check(
            "POST /plan-requests/approve",
            *who,
            b.submit("/", &format!("/plan-requests/{req}/approve"), &[]).await.status,
            want,
        );
        if want != 303 {
            roles[0].1.submit("/apps", &format!("/plan-requests/{req}/deny"), &[]).await;
        }
    }
    // Removing a member (the owner last, since the removal signs the person out).
    for i in [1, 2, 3, 4, 0] {
        let (who, b) = &mut roles[i];
        let want = [303, 403, 403, 403, 403][i];
        check(
            "POST /members/{id}/remove",
            *who,
            b.submit("/", &format!("/members/{d2_id}/remove"), &[]).await.status,
            want,
        );
    }
    assert_eq!(d2.get("/").await.location.as_deref(), Some("/login"), "a removed member is signed out");
    assert!(failures.is_empty(), "role × action mismatches:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn guessing_is_throttled_even_in_parallel_and_through_invitations() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    own.submit("/account/security", "/account/2fa/start", &[]).await;
    let secret = own.get("/account/security").await.between("id=\"totp-secret\">", "<");
    own.submit("/account/security", "/account/2fa/confirm", &[("code", &code_at(&secret, &kg, 0))]).await;

    // 40 wrong second-factor codes at once from one pending session: at most the limit (10) are
    // even checked; the rest are refused unchecked.
    let mut pending = Browser::new(&kg);
    pending.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    let csrf = pending.get("/login/2fa").await.csrf();
    let cookie = pending.cookie.clone().unwrap();
    let base = pending.base.clone();
    let attempts = (0..40).map(|i| {
        let http = pending.http.clone();
        let (base, cookie, csrf) = (base.clone(), cookie.clone(), csrf.clone());
        async move {
            let code = format!("{:06}", 100_000 + i);
            let r = http
                .post(format!("{base}/login/2fa"))
                .header(COOKIE, format!("keygate_session={cookie}"))
                .form(&[("csrf", csrf.as_str()), ("code", code.as_str())])
                .send()
                .await
                .unwrap();
            r.text().await.unwrap()
        }
    });
    let answers = futures_join_all(attempts).await;
    let checked = answers.iter().filter(|b| b.contains("the code is not right")).count();
    assert!(checked <= 10, "{checked} codes were checked; the limit is 10");
    assert!(answers.iter().any(|b| b.contains("too many failed")), "the rest are refused");

    // An invitation for an existing account (a former member) does not let anyone guess its
    // password freely.
    kg.clock.advance_seconds(16 * 60); // the second-factor lock from above lifts
    let mut own = Browser::new(&kg);
    own.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
    let next = code_at(&secret, &kg, 0);
    own.submit("/login/2fa", "/login/2fa", &[("code", &next)]).await;
    let _former = member(&kg, &mut own, "former@example.com", "developer").await;
    let members = own.get("/members").await.body;
    let at = members.find("<td>former@example.com</td>").unwrap();
    let start = at + members[at..].find("action=\"/members/").unwrap() + "action=\"/members/".len();
    let former_id = members[start..start + members[start..].find('/').unwrap()].to_owned();
    let p = own.submit("/members", &format!("/members/{former_id}/remove"), &[]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = own.submit("/members", "/members/invite", &[("email", "former@example.com"), ("role", "viewer")]).await;
    let link = p.between("id=\"invite-link\" class=\"secret\">", "<");
    let path = &link[link.find("/invite/").unwrap()..];
    let mut guesser = Browser::new(&kg);
    let mut refused = false;
    for i in 0..12 {
        let p = guesser.post(path, &[("password", &format!("guess number {i}"))]).await;
        if p.body.contains("too many failed") {
            refused = true;
            break;
        }
        assert!(p.body.contains("email or password is not right"), "{}", p.body);
    }
    assert!(refused, "guessing through an invitation is throttled like sign-in");
}

async fn futures_join_all<F: std::future::Future<Output = String> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<String> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
