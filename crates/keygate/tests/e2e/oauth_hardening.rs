//! The OAuth2 server's hardening (issue 12), from outside over HTTP: token exchange never
//! launders a credential (refresh tokens, other apps' credentials, a DPoP-bound subject without
//! its key, a restricted API key all refused or carried over; the subject's revocation ends the
//! derived token), revocation answers another client's token like an unknown one, JWTs name
//! their workspace, and a suspended client is issued nothing and its tokens refused.

use keygate_core::jose::{self, Alg, SigningKey};
use keygate_core::model::Permission;
use keygate_testkit::{MockUpstream, Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

async fn kit(up: &MockUpstream) -> TestKeygate {
    let mut orders = route("orders", "/orders", &up.url());
    orders.scopes.insert("GET".into(), "orders:read".into());
    orders.scopes.insert("*".into(), "orders:write".into());
    TestKeygate::start_with(Options { routes: vec![orders], ..Options::default() }).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

struct Client {
    app: String,
    id: String,
    secret: String,
}

/// A new app with an OAuth client registered with `body`.
async fn client(kg: &TestKeygate, name: &str, body: Value) -> Client {
    let c = kg.client();
    let app = c.post("/admin/v1/apps", &json!({"name": name})).await;
    assert_eq!(app.status, StatusCode::CREATED, "{:?}", app.body);
    let app = app.str("/id");
    let made = c.post(&format!("/admin/v1/apps/{app}/oauth-client"), &body).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    Client { app, id: made.str("/client_id"), secret: made.str("/client_secret") }
}

/// `POST` to an OAuth endpoint of the gateway with HTTP Basic client authentication.
async fn post(
    kg: &TestKeygate,
    c: &Client,
    path: &str,
    form: &[(&str, &str)],
    dpop: Option<String>,
) -> (StatusCode, Value) {
    let mut req = http().post(format!("{}{path}", kg.gateway_url())).basic_auth(&c.id, Some(&c.secret)).form(form);
    if let Some(p) = dpop {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn exchange(
    kg: &TestKeygate,
    c: &Client,
    subject: &str,
    scope: Option<&str>,
    dpop: Option<String>,
) -> (StatusCode, Value) {
    let mut form = vec![("grant_type", EXCHANGE), ("subject_token", subject), ("subject_token_type", ACCESS)];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    post(kg, c, "/oauth2/token", &form, dpop).await
}

async fn introspect(kg: &TestKeygate, c: &Client, token: &str) -> Value {
    let (s, v) = post(kg, c, "/oauth2/introspect", &[("token", token)], None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// `GET /orders/1` with `authorization`; the status and the error code.
async fn get_orders(kg: &TestKeygate, authorization: &str, dpop: Option<String>) -> (StatusCode, String) {
    let mut req = http().get(format!("{}/orders/1", kg.gateway_url())).header("authorization", authorization);
    if let Some(p) = dpop {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or("").to_owned())
}

fn claims(jwt: &str) -> Value {
    let jws = jose::split(jwt).unwrap();
    serde_json::from_slice(&jose::b64url_decode(jws.payload_b64()).unwrap()).unwrap()
}

fn now_s(kg: &TestKeygate) -> i64 {
    use keygate_core::Clock as _;
    kg.clock.now().as_millis() / 1000
}

/// A DPoP proof (RFC 9449 §4.2) by `key`.
fn proof(key: &SigningKey, method: &str, url: &str, token: Option<&str>, jti: &str, iat: i64) -> String {
    let jwk: Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
    let mut claims = json!({"jti": jti, "htm": method, "htu": url, "iat": iat});
    if let Some(t) = token {
        claims["ath"] = Value::from(keygate_core::dpop::ath(t));
    }
    key.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
}

/// An API key of `app` (the default app when `None`) made with the extra fields of `body`.
async fn api_key(kg: &TestKeygate, app: Option<&str>, body: Value) -> (String, String) {
    let mut body = body;
    body["name"] = Value::from("subject");
    if let Some(app) = app {
        body["app_id"] = Value::from(app);
    }
    kg.client().create_token(&body).await
}

const ALL_GRANTS: [&str; 3] = ["client_credentials", "refresh_token", EXCHANGE];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_refuses_the_laundering_paths() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"grant_types": ALL_GRANTS, "scopes": ["orders:read", "orders:write"]})).await;
    let (s, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let rt = t["refresh_token"].as_str().unwrap().to_owned();

    // A refresh token is never a subject, not even of its own client (and is not spent).
    let (s, e) = exchange(&kg, &a, &rt, None, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{e}");
    assert_eq!(introspect(&kg, &a, &rt).await["active"], true, "the refresh token was not spent");

    // Another client, registered with no scopes and no delegation, gets nothing from A's token.
    let b = client(&kg, "b", json!({"grant_types": [EXCHANGE], "scopes": []})).await;
    let (s, e) = exchange(&kg, &b, &at, Some("orders:read"), None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{e}");
    let (s, e) = exchange(&kg, &b, &at, None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");

    // An API key of another app (the default one) is not A's to exchange.
    let (_, other_key) = api_key(&kg, None, json!({"scopes": ["orders:read"]})).await;
    kg.sync_index().await.unwrap();
    let (s, e) = exchange(&kg, &a, &other_key, None, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{e}");

    // A token obtained by exchange is not a subject again.
    let (s, d) = exchange(&kg, &a, &at, Some("orders:read"), None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let (s, e) = exchange(&kg, &a, d["access_token"].as_str().unwrap(), None, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{e}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanged_scopes_are_capped_by_the_client_and_delegation_is_explicit() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"grant_types": ALL_GRANTS, "scopes": ["orders:read", "orders:write"]})).await;
    let (_, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    let at = t["access_token"].as_str().unwrap().to_owned();

    // A client allowed to act for A's app, but registered with no scopes: still no orders:read.
    let none =
        client(&kg, "none", json!({"grant_types": [EXCHANGE], "scopes": [], "exchange_subject_apps": [a.app]})).await;
    let (s, e) = exchange(&kg, &none, &at, Some("orders:read"), None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")), "{e}");
    let (s, e) = exchange(&kg, &none, &at, None, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")), "{e}");

    // A delegate with orders:read: gets at most that, acting for A (RFC 8693 `act`).
    let d = client(
        &kg,
        "delegate",
        json!({"grant_types": [EXCHANGE], "scopes": ["orders:read"], "exchange_subject_apps": [a.app]}),
    )
    .await;
    let shown = kg.client().get(&format!("/admin/v1/apps/{}/oauth-client", d.app)).await;
    assert_eq!(shown.body["exchange_subject_apps"], json!([a.app]));
    let (s, e) = exchange(&kg, &d, &at, Some("orders:write"), None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")), "{e}");
    let (s, got) = exchange(&kg, &d, &at, None, None).await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(got["scope"], "orders:read", "the intersection of the subject's and the client's scopes");
    let c = claims(got["access_token"].as_str().unwrap());
    assert_eq!((c["sub"].as_str(), c["client_id"].as_str()), (Some(a.id.as_str()), Some(d.id.as_str())));
    assert_eq!(c["act"]["sub"], d.id.as_str());

    // A delegation is granted (and taken back) by changing the client.
    let late = client(&kg, "late", json!({"grant_types": [EXCHANGE], "scopes": ["orders:read"]})).await;
    assert_eq!(exchange(&kg, &late, &at, None, None).await.0, StatusCode::BAD_REQUEST);
    let path = format!("/admin/v1/apps/{}/oauth-client", late.app);
    let changed = kg.client().patch(&path, &json!({"exchange_subject_apps": [a.app]})).await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    assert_eq!(exchange(&kg, &late, &at, None, None).await.0, StatusCode::OK);
    kg.client().patch(&path, &json!({"exchange_subject_apps": []})).await;
    assert_eq!(exchange(&kg, &late, &at, None, None).await.0, StatusCode::BAD_REQUEST);
    let trail = kg.client().get(&format!("/admin/v1/audit-events?target={}", late.id)).await;
    assert_eq!(trail.body["data"][0]["action"], "oauth_client.update", "{:?}", trail.body);

    // A delegation names apps of the client's own workspace only.
    let c = kg.client();
    let app = c.post("/admin/v1/apps", &json!({"name": "x"})).await.str("/id");
    for bad in [json!(["app_doesnotexist"]), json!(["not an id"])] {
        let r = c.post(&format!("/admin/v1/apps/{app}/oauth-client"), &json!({"exchange_subject_apps": bad})).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_exchange_subject_apps"), "{:?}", r.body);
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_exchanged_from_an_api_key_keeps_its_restrictions() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"grant_types": [EXCHANGE], "scopes": ["orders:read", "orders:write"]})).await;

    // A key without an expiry is exchangeable (its time left does not overflow), and its IP
    // allowlist binds what is derived from it.
    let (_, fenced) =
        api_key(&kg, Some(&a.app), json!({"scopes": ["orders:read"], "ip_allowlist": ["10.0.0.0/8"]})).await;
    kg.sync_index().await.unwrap();
    let (s, d) = exchange(&kg, &a, &fenced, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["scope"], "orders:read");
    let derived = format!("Bearer {}", d["access_token"].as_str().unwrap());
    assert_eq!(get_orders(&kg, &derived, None).await, (StatusCode::FORBIDDEN, "ip_not_allowed".into()));

    // Its rate limit: the derived token draws on the key's own allowance.
    let (_, limited) = api_key(
        &kg,
        Some(&a.app),
        json!({"scopes": ["orders:read"], "rate_limit": {"requests": 1, "per_seconds": 3600, "burst": 1}}),
    )
    .await;
    kg.sync_index().await.unwrap();
    let (s, d) = exchange(&kg, &a, &limited, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let derived = format!("Bearer {}", d["access_token"].as_str().unwrap());
    assert_eq!(get_orders(&kg, &format!("Bearer {limited}"), None).await.0, StatusCode::OK);
    assert_eq!(get_orders(&kg, &format!("Bearer {limited}"), None).await.0, StatusCode::OK);
    assert_eq!(get_orders(&kg, &derived, None).await, (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into()));

    // Its quota: the derived token's requests count against the key's.
    let (_, metered) =
        api_key(&kg, Some(&a.app), json!({"scopes": ["orders:read"], "quota": {"requests": 2, "period": "day"}})).await;
    kg.sync_index().await.unwrap();
    let (s, d) = exchange(&kg, &a, &metered, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let derived = format!("Bearer {}", d["access_token"].as_str().unwrap());
    assert_eq!(get_orders(&kg, &format!("Bearer {metered}"), None).await.0, StatusCode::OK);
    assert_eq!(get_orders(&kg, &derived, None).await.0, StatusCode::OK);
    assert_eq!(get_orders(&kg, &derived, None).await, (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded".into()));
    assert_eq!(
        get_orders(&kg, &format!("Bearer {metered}"), None).await,
        (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded".into())
    );
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_bound_subject_needs_its_key_and_binds_the_derived_token() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"grant_types": [EXCHANGE], "scopes": ["orders:read"]})).await;
    let key = SigningKey::generate(Alg::ES256, "").unwrap();
    let jkt = key.public_jwk().thumbprint();
    let (_, bound) = api_key(&kg, Some(&a.app), json!({"scopes": ["orders:read"], "dpop_jkt": jkt})).await;
    kg.sync_index().await.unwrap();
    let token_url = format!("{}/oauth2/token", kg.gateway_url());
    let now = now_s(&kg);

    let (s, e) = exchange(&kg, &a, &bound, None, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_dpop_proof")), "{e}");
    let stranger = SigningKey::generate(Alg::ES256, "").unwrap();
    let (s, e) = exchange(&kg, &a, &bound, None, Some(proof(&stranger, "POST", &token_url, None, "x-1", now))).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_dpop_proof")), "{e}");

    let (s, d) = exchange(&kg, &a, &bound, None, Some(proof(&key, "POST", &token_url, None, "x-2", now))).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["token_type"], "DPoP");
    let at = d["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims(&at)["cnf"]["jkt"], jkt.as_str());
    let url = format!("{}/orders/1", kg.gateway_url());
    assert_eq!(get_orders(&kg, &format!("Bearer {at}"), None).await.0, StatusCode::UNAUTHORIZED);
    let ok = get_orders(&kg, &format!("DPoP {at}"), Some(proof(&key, "GET", &url, Some(&at), "r-1", now))).await;
    assert_eq!(ok.0, StatusCode::OK, "{ok:?}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_subject_ends_the_derived_token_at_the_gateway_and_introspection() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"grant_types": ALL_GRANTS, "scopes": ["orders:read"]})).await;

    // An API key subject: suspended, resumed, revoked.
    let (key_id, key) = api_key(&kg, Some(&a.app), json!({"scopes": ["orders:read"]})).await;
    kg.sync_index().await.unwrap();
    let (s, d) = exchange(&kg, &a, &key, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let at = d["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {at}");
    assert_eq!(get_orders(&kg, &bearer, None).await.0, StatusCode::OK);
    assert_eq!(introspect(&kg, &a, &at).await["active"], true);
    let c = kg.client();
    c.post(&format!("/admin/v1/tokens/{key_id}/suspend"), &json!({})).await;
    kg.sync_index().await.unwrap();
    assert_eq!(get_orders(&kg, &bearer, None).await, (StatusCode::UNAUTHORIZED, "subject_token_inactive".into()));
    assert_eq!(introspect(&kg, &a, &at).await, json!({"active": false}));
    c.post(&format!("/admin/v1/tokens/{key_id}/resume"), &json!({})).await;
    kg.sync_index().await.unwrap();
    assert_eq!(get_orders(&kg, &bearer, None).await.0, StatusCode::OK);
    c.post(&format!("/admin/v1/tokens/{key_id}/revoke"), &json!({})).await;
    kg.sync_index().await.unwrap();
    assert_eq!(get_orders(&kg, &bearer, None).await, (StatusCode::UNAUTHORIZED, "subject_token_inactive".into()));
    assert_eq!(introspect(&kg, &a, &at).await, json!({"active": false}));

    // A JWT subject, revoked at the revocation endpoint: the next request is refused.
    let (_, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    let subject = t["access_token"].as_str().unwrap().to_owned();
    let (s, d) = exchange(&kg, &a, &subject, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let at = d["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {at}");
    assert_eq!(get_orders(&kg, &bearer, None).await.0, StatusCode::OK);
    let (s, _) = post(&kg, &a, "/oauth2/revoke", &[("token", &subject)], None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(get_orders(&kg, &bearer, None).await, (StatusCode::UNAUTHORIZED, "subject_token_inactive".into()));
    assert_eq!(introspect(&kg, &a, &at).await, json!({"active": false}));
    kg.stop().await;
}

/// A suspended client, as an operator and the client see it: suspended through the admin API,
/// its JWT is refused at the gateway on the next request (and so is a token another client
/// derived from it, and an opaque token); every grant is refused with `unauthorized_client` and a
/// description that says a person must resume it (never the reason); its refresh token is kept,
/// not spent, and introspects as inactive; suspending it again changes nothing. Resumed, it gets
/// tokens that work, and its refresh token works again; the revoked JWT stays revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_client_is_issued_nothing_and_its_tokens_are_refused_until_resumed() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let admin = kg.client();
    let a = client(&kg, "a", json!({"grant_types": ALL_GRANTS, "scopes": ["orders:read"]})).await;
    let b = client(
        &kg,
        "b",
        json!({"grant_types": [EXCHANGE], "scopes": ["orders:read"], "exchange_subject_apps": [a.app]}),
    )
    .await;
    let (s, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let jwt = t["access_token"].as_str().unwrap().to_owned();
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(get_orders(&kg, &format!("Bearer {jwt}"), None).await, (StatusCode::OK, String::new()));
    let (s, d) = exchange(&kg, &b, &jwt, None, None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let derived = format!("Bearer {}", d["access_token"].as_str().unwrap());
    assert_eq!(get_orders(&kg, &derived, None).await.0, StatusCode::OK);

    // Suspended through the admin API, with a reason: when and why are in the client's JSON.
    let path = format!("/admin/v1/apps/{}/oauth-client", a.app);
    let why = "secret pasted in a support ticket";
    let r = admin.post(&format!("{path}/suspend"), &json!({"reason": why})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((r.str("/client_id"), r.str("/suspended_reason")), (a.id.clone(), why.to_owned()));
    let since = r.str("/suspended_at");
    assert!(since.ends_with('Z'), "{:?}", r.body);
    let shown = admin.get(&path).await;
    assert_eq!((shown.str("/suspended_at"), shown.str("/suspended_reason")), (since.clone(), why.to_owned()));

    // At once, with no wait for the feed: its JWT is refused at the gateway, and so is the token
    // B derived from it.
    assert_eq!(
        get_orders(&kg, &format!("Bearer {jwt}"), None).await,
        (StatusCode::UNAUTHORIZED, "token_revoked".into())
    );
    assert_eq!(get_orders(&kg, &derived, None).await, (StatusCode::UNAUTHORIZED, "subject_token_inactive".into()));

    // Every grant is refused: unauthorized_client, saying what to do and not why.
    let refused = |(s, e): (StatusCode, Value)| {
        assert_eq!((s, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unauthorized_client")), "{e}");
        let text = e["error_description"].as_str().unwrap();
        assert!(text.contains("suspended") && text.contains("resume"), "{text}");
        assert!(!text.contains(why), "the reason is not told to the client: {text}");
    };
    refused(post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await);
    refused(
        post(&kg, &a, "/oauth2/token", &[("grant_type", "refresh_token"), ("refresh_token", &refresh)], None).await,
    );
    let (_, key) = api_key(&kg, Some(&a.app), json!({"scopes": ["orders:read"]})).await;
    refused(exchange(&kg, &a, &key, None, None).await);
    // Nor may it introspect or revoke; B's introspection of its tokens says inactive.
    refused(post(&kg, &a, "/oauth2/introspect", &[("token", &jwt)], None).await);
    refused(post(&kg, &a, "/oauth2/revoke", &[("token", &refresh)], None).await);
    assert_eq!(introspect(&kg, &b, &jwt).await, json!({"active": false}));
    assert_eq!(introspect(&kg, &b, &refresh).await, json!({"active": false}), "the kept refresh token is inactive");

    // Suspending it again changes nothing: the first suspension's time and reason stay, and the
    // trail holds one suspension, by the root key, with the reason and the tokens it revoked.
    let again = admin.post(&format!("{path}/suspend"), &json!({"reason": "another"})).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!((again.str("/suspended_at"), again.str("/suspended_reason")), (since.clone(), why.to_owned()));
    let trail = admin.get(&format!("/admin/v1/audit-events?target={}&action=oauth_client.suspend", a.id)).await;
    let events = trail.body["data"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0]["actor"].as_str().unwrap().starts_with("rk_"), "{:?}", events[0]);
    assert_eq!(events[0]["after"]["suspended_reason"], why);
    assert_eq!(events[0]["after"]["access_tokens_revoked"], 1, "A's JWT (B's derived token is B's)");
    assert_eq!(events[0]["after"]["app_id"], a.app.as_str());

    // Resumed: a new token works at the gateway, the kept refresh token rotates, and the JWT
    // revoked by the suspension stays refused. Resuming again changes nothing.
    let r = admin.post(&format!("{path}/resume"), &json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((&r.body["suspended_at"], &r.body["suspended_reason"]), (&Value::Null, &Value::Null));
    let (s, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(
        get_orders(&kg, &format!("Bearer {}", t["access_token"].as_str().unwrap()), None).await.0,
        StatusCode::OK
    );
    let (s, t) =
        post(&kg, &a, "/oauth2/token", &[("grant_type", "refresh_token"), ("refresh_token", &refresh)], None).await;
    assert_eq!(s, StatusCode::OK, "the refresh token was kept, not spent: {t}");
    assert_eq!(get_orders(&kg, &format!("Bearer {jwt}"), None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(admin.post(&format!("{path}/resume"), &json!({})).await.status, StatusCode::OK);
    let trail = admin.get(&format!("/admin/v1/audit-events?target={}&action=oauth_client.resume", a.id)).await;
    assert_eq!(trail.body["data"].as_array().unwrap().len(), 1, "{}", trail.body);

    // An opaque access token (an API key) of a suspended client is revoked too.
    let o = client(&kg, "o", json!({"scopes": ["orders:read"], "access_token_format": "opaque"})).await;
    let (s, t) = post(&kg, &o, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let opaque = format!("Bearer {}", t["access_token"].as_str().unwrap());
    kg.sync_index().await.unwrap();
    assert_eq!(get_orders(&kg, &opaque, None).await.0, StatusCode::OK);
    let r = admin.post(&format!("/admin/v1/apps/{}/oauth-client/suspend", o.app), &json!({})).await;
    assert_eq!((r.status, &r.body["suspended_reason"]), (StatusCode::OK, &Value::Null), "{:?}", r.body);
    // (A revoked API key is unknown to the gateway, as any is.)
    assert_eq!(get_orders(&kg, &opaque, None).await, (StatusCode::UNAUTHORIZED, "unknown_token".into()));

    // Refusals of the admin API: an app without a client, a reason too long or of the wrong
    // shape, a root key without apps:write.
    let bare = admin.post("/admin/v1/apps", &json!({"name": "bare"})).await.str("/id");
    for action in ["suspend", "resume"] {
        let r = admin.post(&format!("/admin/v1/apps/{bare}/oauth-client/{action}"), &json!({})).await;
        assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "oauth_client_not_found"), "{action}");
    }
    let long = "x".repeat(501);
    let r = admin.post(&format!("{path}/suspend"), &json!({"reason": long})).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_text"));
    let r = admin.post(&format!("{path}/suspend"), &json!({"why": "x"})).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_body"));
    let reader = kg.root_key("default", &[Permission::AppsRead]).await.unwrap();
    let r = kg.client_with(Some(&reader)).post(&format!("{path}/suspend"), &json!({})).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "missing_permission"));
    assert_eq!(admin.get(&path).await.body["suspended_at"], Value::Null, "refusals change nothing");
    // The OpenAPI document describes both endpoints and the fields.
    let doc = admin.get("/admin/v1/openapi.json").await.body;
    for action in ["suspend", "resume"] {
        let op = &doc["paths"][format!("/admin/v1/apps/{{id}}/oauth-client/{action}")]["post"];
        assert!(op["responses"]["200"].is_object() && op["responses"]["404"].is_object(), "{action}: {op}");
    }
    let view = &doc["components"]["schemas"]["ClientView"]["properties"];
    assert!(view["suspended_at"].is_object() && view["suspended_reason"].is_object(), "{view}");
    assert_eq!(doc["components"]["schemas"]["SuspendClientRequest"]["properties"]["reason"]["maxLength"], 500);
    // The event types webhooks may subscribe to include the client's suspension and resumption.
    let types = admin.get("/admin/v1/webhook-event-types").await.body.to_string();
    assert!(types.contains("oauth_client.suspended") && types.contains("oauth_client.resumed"), "{types}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_another_clients_token_answers_like_an_unknown_one() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a =
        client(&kg, "a", json!({"grant_types": ["client_credentials", "refresh_token"], "scopes": ["orders:read"]}))
            .await;
    let b = client(&kg, "b", json!({"scopes": ["orders:read"]})).await;
    let (_, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    let at = t["access_token"].as_str().unwrap().to_owned();
    let rt = t["refresh_token"].as_str().unwrap().to_owned();

    let unknown = post(&kg, &b, "/oauth2/revoke", &[("token", "kg_notatokenatall")], None).await;
    assert_eq!(unknown, (StatusCode::OK, json!({})));
    for foreign in [&at, &rt] {
        assert_eq!(
            post(&kg, &b, "/oauth2/revoke", &[("token", foreign)], None).await,
            unknown,
            "alike (RFC 7009 §2.2)"
        );
    }
    assert_eq!(get_orders(&kg, &format!("Bearer {at}"), None).await.0, StatusCode::OK, "left alone");
    assert_eq!(introspect(&kg, &a, &rt).await["active"], true, "left alone");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_name_their_workspace() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"scopes": ["orders:read"]})).await;
    let (_, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    let mine = claims(t["access_token"].as_str().unwrap());
    let ws = kg.admin().bootstrap().await.unwrap().id;
    assert_eq!(mine["workspace_id"], ws.as_str());

    // Another workspace's client: its own workspace, so a resource server can tell them apart.
    let other_key = kg.root_key("other", &keygate_core::model::Permission::ALL).await.unwrap();
    let other = kg.client_with(Some(&other_key));
    let app = other.post("/admin/v1/apps", &json!({"name": "theirs"})).await.str("/id");
    let made = other.post(&format!("/admin/v1/apps/{app}/oauth-client"), &json!({"scopes": []})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let theirs = Client { app, id: made.str("/client_id"), secret: made.str("/client_secret") };
    let (s, t) = post(&kg, &theirs, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let c = claims(t["access_token"].as_str().unwrap());
    assert!(c["workspace_id"].as_str().is_some_and(|w| w.starts_with("ws_") && w != ws.as_str()), "{c}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_client_ids_do_not_grow_the_throttles() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let url = format!("{}/oauth2/token", kg.gateway_url());
    // 300 requests from one address, each claiming a distinct 60 KB client id (the clock moves on
    // so that the address's own limit lets them all through to client authentication).
    for i in 0..300 {
        if i % 50 == 0 {
            kg.clock.advance_seconds(10);
        }
        let id = format!("{i:05}{}", "x".repeat(60_000));
        let form = [("grant_type", "client_credentials"), ("client_id", id.as_str()), ("client_secret", "nope")];
        let r = http().post(&url).form(&form).send().await.unwrap();
        assert!(matches!(r.status().as_u16(), 400 | 401), "{}", r.status());
    }
    // And 300 distinct well-formed ids of clients that do not exist.
    for i in 0..300 {
        if i % 50 == 0 {
            kg.clock.advance_seconds(10);
        }
        let id = format!("kgc_unknown{i:05}");
        let r = http().post(&url).basic_auth(&id, Some("nope")).form(&[("grant_type", "client_credentials")]).send();
        assert_eq!(r.await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let held = kg.oauth().throttle_footprint();
    // No claimed id is kept as sent: every entry is a fixed-size key and value.
    assert!(held.entries <= 302 && held.bytes <= held.entries * 64, "{held:?}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_do_not_lock_a_client_out() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let a = client(&kg, "a", json!({"scopes": ["orders:read"]})).await;
    let url = format!("{}/oauth2/token", kg.gateway_url());
    // A flood of wrong secrets for A's public client id, from another address (127.0.0.2 reaches
    // the loopback listener too).
    let elsewhere = reqwest::Client::builder().local_address(Some("127.0.0.2".parse().unwrap())).build().unwrap();
    let mut throttled = 0;
    for _ in 0..120 {
        let r = elsewhere.post(&url).basic_auth(&a.id, Some("guess")).form(&[("grant_type", "client_credentials")]);
        match r.send().await.unwrap().status().as_u16() {
            401 => {}
            429 => throttled += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(throttled > 0, "the guessing address is slowed down");
    // A, from its own address, is not.
    let (s, t) = post(&kg, &a, "/oauth2/token", &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    kg.stop().await;
}

#[test]
fn config_check_names_a_jwks_url_fetched_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml");
    let issuer = |url: &str| {
        format!(
            "[[oauth.trusted_issuers]]\nissuer = \"https://idp.example.com\"\naudience = \"api\"\njwks_url = \"{url}\"\n"
        )
    };
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_keygate")).args(["config", "check"]).arg(&cfg).output().unwrap()
    };
    std::fs::write(&cfg, issuer("http://idp.example.com/jwks")).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("oauth.trusted_issuers.jwks_url") && err.contains("https://"), "{err}");
    std::fs::write(&cfg, issuer("http://127.0.0.1:9/jwks")).unwrap();
    assert_eq!(check().status.code(), Some(0), "loopback http is allowed");
}
