//! The OAuth2 authorization server end to end, through the gateway listener where clients reach
//! it: tokens from the token endpoint accepted at the gateway, refused on the next request after
//! a revocation, forged and foreign tokens refused, DPoP-bound tokens and API keys, identity
//! tokens for upstreams, and tokens of a trusted external issuer.

use std::time::{Duration, Instant};

use base64::Engine as _;
use keygate_core::jose::{self, Alg, SigningKey};
use keygate_testkit::{MockUpstream, Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

async fn kit(up: &MockUpstream) -> TestKeygate {
    kit_with(up, Options::default()).await
}

async fn kit_with(up: &MockUpstream, opts: Options) -> TestKeygate {
    let mut orders = route("orders", "/orders", &up.url());
    orders.scopes.insert("GET".into(), "orders:read".into());
    orders.scopes.insert("*".into(), "orders:write".into());
    let mut phantom = route("phantom", "/phantom", &up.url());
    phantom.identity_token = true;
    TestKeygate::start_with(Options { routes: vec![orders, phantom], ..opts }).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// An app with an OAuth client; returns (app id, client id, client secret).
pub(crate) async fn client(kg: &TestKeygate, body: Value) -> (String, String, String) {
    let c = kg.client();
    let app = c.post("/admin/v1/apps", &json!({"name": "svc"})).await;
    assert_eq!(app.status, StatusCode::CREATED, "{:?}", app.body);
    let app_id = app.str("/id");
    let made = c.post(&format!("/admin/v1/apps/{app_id}/oauth-client"), &body).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    (app_id, made.str("/client_id"), made.str("/client_secret"))
}

/// `POST /oauth2/token` on the gateway with HTTP Basic client authentication.
pub(crate) async fn token(
    kg: &TestKeygate,
    id: &str,
    secret: &str,
    form: &[(&str, &str)],
    dpop: Option<String>,
) -> (StatusCode, Value) {
    let mut req = http().post(format!("{}/oauth2/token", kg.gateway_url())).basic_auth(id, Some(secret)).form(form);
    if let Some(p) = dpop {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

async fn call(
    kg: &TestKeygate,
    method: reqwest::Method,
    path: &str,
    auth: &str,
    dpop: Option<String>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = http().request(method, format!("{}{path}", kg.gateway_url())).header("authorization", auth);
    if let Some(p) = dpop {
        req = req.header("dpop", p);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn now_s(kg: &TestKeygate) -> i64 {
    use keygate_core::Clock as _;
    kg.clock.now().as_millis() / 1000
}

/// A DPoP proof (RFC 9449 §4.2) by `key`.
pub(crate) fn proof(key: &SigningKey, method: &str, url: &str, token: Option<&str>, jti: &str, iat: i64) -> String {
    let jwk: Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
    let mut claims = json!({"jti": jti, "htm": method, "htu": url, "iat": iat});
    if let Some(t) = token {
        claims["ath"] = Value::from(keygate_core::dpop::ath(t));
    }
    key.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_access_tokens_work_at_the_gateway_until_revoked() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    // Discovery and keys are on the gateway, naming it as the issuer.
    let meta: Value = http()
        .get(format!("{}/.well-known/oauth-authorization-server", kg.gateway_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], kg.gateway_url());
    assert_eq!(meta["token_endpoint"], format!("{}/oauth2/token", kg.gateway_url()));
    let jwks: Value =
        http().get(format!("{}/.well-known/jwks.json", kg.gateway_url())).send().await.unwrap().json().await.unwrap();
    assert!(!jwks["keys"].as_array().unwrap().is_empty());

    let (app_id, id, secret) = client(&kg, json!({"scopes": ["orders:read"]})).await;
    let (s, t) = token(&kg, &id, &secret, &[("grant_type", "client_credentials")], None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {at}");
    let (s, _, seen) = call(&kg, reqwest::Method::GET, "/orders/1", &bearer, None).await;
    assert_eq!(s, StatusCode::OK, "{seen}");
    let claims = jose::split(&at).unwrap();
    let payload: Value = serde_json::from_slice(&jose::b64url_decode(claims.payload_b64()).unwrap()).unwrap();
    assert_eq!(seen["headers"]["x-keygate-token-id"], payload["jti"]);
    assert_eq!(seen["headers"]["x-keygate-app-id"], app_id.as_str());
    assert_eq!(seen["headers"]["x-keygate-subject"], id.as_str());
    assert_eq!(seen["headers"]["x-keygate-scopes"], "orders:read");
    assert!(seen["headers"].get("authorization").is_none(), "the token does not reach the upstream");
    let (s, h, body) = call(&kg, reqwest::Method::POST, "/orders", &bearer, None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));
    assert!(h["www-authenticate"].to_str().unwrap().contains("scope=\"orders:write\""));

    // Revoked: refused on the very next request.
    let started = Instant::now();
    let r = http()
        .post(format!("{}/oauth2/revoke", kg.gateway_url()))
        .basic_auth(&id, Some(&secret))
        .form(&[("token", at.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (s, h, body) = call(&kg, reqwest::Method::GET, "/orders/1", &bearer, None).await;
    println!("revocation to first refusal: {:?}", started.elapsed());
    assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_revoked")));
    assert!(h["www-authenticate"].to_str().unwrap().contains("error=\"invalid_token\""));

    // Expiry applies to cached tokens too.
    let (_, t) = token(&kg, &id, &secret, &[("grant_type", "client_credentials")], None).await;
    let bearer = format!("Bearer {}", t["access_token"].as_str().unwrap());
    assert_eq!(call(&kg, reqwest::Method::GET, "/orders/2", &bearer, None).await.0, StatusCode::OK);
    kg.clock.advance_seconds(900 + 31);
    let (s, _, body) = call(&kg, reqwest::Method::GET, "/orders/2", &bearer, None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")));
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_jwts_are_refused() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let now = now_s(&kg);
    let iss = kg.gateway_url();
    // keygate's own tokens name their workspace: only its routes (and shared ones) take them.
    let ws = kg.store().workspace_by_name("default").await.unwrap().unwrap().id;
    let good = json!({
        "iss": iss, "sub": "kgc_x", "aud": iss, "exp": now + 300, "iat": now, "jti": "j1",
        "client_id": "kgc_x", "scope": "orders:read", "workspace_id": ws.as_str(),
    });
    let sign = |header: Value, claims: &Value| kg.oauth().sign(Alg::EdDSA, &header, claims).unwrap();
    let ok = sign(json!({"typ": "at+jwt"}), &good);
    assert_eq!(call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {ok}"), None).await.0, StatusCode::OK);

    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let kid = jose::split(&ok).unwrap().header().kid.clone().unwrap();
    let payload = ok.split('.').nth(1).unwrap().to_owned();
    // alg none; HS256 keyed with the public key (algorithm confusion); a flipped payload byte.
    let none = format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "at+jwt", "kid": kid})));
    let jwks: Value = serde_json::from_str(&kg.oauth().jwks().to_string()).unwrap();
    let public = jwks["keys"][0]["x"].as_str().unwrap().as_bytes().to_vec();
    let hs_head = b64(&json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}));
    let mac = {
        use hmac::Mac;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&public).unwrap();
        m.update(format!("{hs_head}.{payload}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    };
    let hs256 = format!("{hs_head}.{payload}.{mac}");
    let mut tampered = ok.clone().into_bytes();
    let at = ok.find('.').unwrap() + 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        change(&mut c);
        sign(json!({"typ": "at+jwt"}), &c)
    };
    let cases = [
        ("alg none", none),
        ("HS256 with the public key", hs256),
        ("tampered", tampered),
        ("wrong typ", sign(json!({"typ": "JWT"}), &good)),
        ("wrong audience", with(&|c| c["aud"] = json!("https://other.example"))),
        ("other issuer", with(&|c| c["iss"] = json!("https://evil.example"))),
        ("expired", with(&|c| c["exp"] = json!(now - 120))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now + 600))),
        ("no jti", with(&|c| c.as_object_mut().unwrap().retain(|k, _| k != "jti"))),
    ];
    for (what, forged) in cases {
        let (s, _, body) = call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {forged}"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {body}");
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_tokens_and_api_keys_need_a_fresh_proof_of_their_key() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (_, id, secret) = client(&kg, json!({"scopes": ["orders:read"]})).await;
    let key = SigningKey::generate(Alg::ES256, "").unwrap();
    let now = now_s(&kg);
    let token_url = format!("{}/oauth2/token", kg.gateway_url());
    let p = proof(&key, "POST", &token_url, None, "t-1", now);
    let (s, t) = token(&kg, &id, &secret, &[("grant_type", "client_credentials")], Some(p)).await;
    assert_eq!((s, t["token_type"].as_str()), (StatusCode::OK, Some("DPoP")), "{t}");
    let at = t["access_token"].as_str().unwrap().to_owned();
    let url = format!("{}/orders/1", kg.gateway_url());
    let auth = format!("DPoP {at}");

    let first = proof(&key, "GET", &url, Some(&at), "r-1", now);
    assert_eq!(call(&kg, reqwest::Method::GET, "/orders/1", &auth, Some(first.clone())).await.0, StatusCode::OK);
    for (what, dpop, authz, code) in [
        ("replayed", Some(first.clone()), auth.clone(), "invalid_dpop_proof"),
        (
            "another method",
            Some(proof(&key, "POST", &url, Some(&at), "r-2", now)),
            auth.clone(),
            "dpop_method_mismatch",
        ),
        (
            "another URL",
            Some(proof(&key, "GET", &format!("{}/orders/2", kg.gateway_url()), Some(&at), "r-3", now)),
            auth.clone(),
            "dpop_url_mismatch",
        ),
        (
            "another key",
            Some(proof(&SigningKey::generate(Alg::ES256, "").unwrap(), "GET", &url, Some(&at), "r-4", now)),
            auth.clone(),
            "dpop_key_mismatch",
        ),
        (
            "another token's hash",
            Some(proof(&key, "GET", &url, Some("other"), "r-5", now)),
            auth.clone(),
            "dpop_ath_mismatch",
        ),
        ("too old", Some(proof(&key, "GET", &url, Some(&at), "r-6", now - 3600)), auth.clone(), "dpop_proof_expired"),
        ("as Bearer", None, format!("Bearer {at}"), "invalid_token"),
        ("no proof", None, auth.clone(), "invalid_dpop_proof"),
    ] {
        let (s, h, body) = call(&kg, reqwest::Method::GET, "/orders/1", &authz, dpop).await;
        assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{what}: {body}");
        assert!(h["www-authenticate"].to_str().unwrap().starts_with("DPoP "), "{what}");
    }

    // An API key bound to a DPoP key: useless without the private key.
    let jkt = key.public_jwk().thumbprint();
    let (_, api_key) =
        kg.client().create_token(&json!({"name": "bound", "scopes": ["orders:read"], "dpop_jkt": jkt})).await;
    let (s, _, body) = call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {api_key}"), None).await;
    assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_token")));
    let p = proof(&key, "GET", &url, Some(&api_key), "k-1", now);
    assert_eq!(
        call(&kg, reqwest::Method::GET, "/orders/1", &format!("DPoP {api_key}"), Some(p)).await.0,
        StatusCode::OK
    );
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_can_get_identity_tokens_instead_of_credentials() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (_, api_key) = kg.client().create_token(&json!({"name": "phantom", "scopes": ["orders:read"]})).await;
    let (s, _, seen) = call(&kg, reqwest::Method::GET, "/phantom/x", &format!("Bearer {api_key}"), None).await;
    assert_eq!(s, StatusCode::OK);
    let auth = seen["headers"]["authorization"].as_str().unwrap().to_owned();
    let jwt = auth.strip_prefix("Bearer ").unwrap();
    assert!(!jwt.contains(&api_key), "the caller's key never reaches the upstream");
    // It verifies with the published keys, and says who called.
    let kid = jose::split(jwt).unwrap().header().kid.clone().unwrap();
    let jwks = kg.oauth().jwks();
    let key = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).unwrap();
    let key = jose::PublicJwk::from_json(&key.to_string()).unwrap();
    let v = jose::verify(jwt, &key, key.alg()).unwrap();
    let claims: Value = v.claims().unwrap();
    assert_eq!(claims["iss"], kg.gateway_url());
    assert_eq!(claims["aud"], "keygate-route:phantom");
    assert_eq!(claims["scope"], "orders:read");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 60);
    // Reused while fresh: the upstream sees the same token on the next call.
    let (_, _, again) = call(&kg, reqwest::Method::GET, "/phantom/y", &format!("Bearer {api_key}"), None).await;
    assert_eq!(again["headers"]["authorization"].as_str(), Some(auth.as_str()));
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_trusted_issuer_are_verified_with_its_fetched_keys() {
    use axum::routing::get;
    let up = MockUpstream::start().await.unwrap();
    // The identity provider: its JWKS on a local server.
    let idp_key = SigningKey::generate(Alg::ES256, "idp-1").unwrap();
    let jwks = json!({"keys": [serde_json::from_str::<Value>(&idp_key.public_jwk().to_json()).unwrap()]});
    let app = axum::Router::new().route(
        "/jwks",
        get(move || {
            let j = jwks.clone();
            async move { axum::Json(j) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let oauth = keygate::config::OAuthConfig {
        trusted_issuers: vec![keygate::config::TrustedIssuerConfig {
            issuer: "https://idp.example".into(),
            audience: "orders-api".into(),
            jwks_url: format!("http://{idp}/jwks"),
            workspace: None,
        }],
        ..Default::default()
    };
    let kg = kit_with(&up, Options { oauth: Some(oauth), ..Options::default() }).await;
    let now = now_s(&kg);
    let claims = json!({"iss": "https://idp.example", "sub": "user-7", "aud": "orders-api", "exp": now + 300,
        "iat": now, "azp": "web-app", "scope": "orders:read"});
    let t = idp_key.sign_claims(&json!({"typ": "JWT"}), &claims).unwrap();
    // The keys arrive in the background: wait (bounded) until the gateway knows them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let (s, _, seen) = call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {t}"), None).await;
        if s == StatusCode::OK {
            break seen;
        }
        assert!(Instant::now() < deadline, "the issuer's keys never arrived: {s} {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seen["headers"]["x-keygate-subject"], "user-7");
    assert_eq!(seen["headers"]["x-keygate-app-id"], "web-app");
    // Its tokens for another audience, or signed by a key it does not publish, are refused.
    let other_aud = idp_key
        .sign_claims(&json!({}), &json!({"iss": "https://idp.example", "sub": "u", "aud": "x", "exp": now + 60}))
        .unwrap();
    assert_eq!(
        call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {other_aud}"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let rogue = SigningKey::generate(Alg::ES256, "idp-1").unwrap().sign_claims(&json!({}), &claims).unwrap();
    assert_eq!(
        call(&kg, reqwest::Method::GET, "/orders/1", &format!("Bearer {rogue}"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_nonces_at_the_gateway_when_configured() {
    let up = MockUpstream::start().await.unwrap();
    let oauth = keygate::config::OAuthConfig { dpop_nonces: true, ..Default::default() };
    let kg = kit_with(&up, Options { oauth: Some(oauth), ..Options::default() }).await;
    let key = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let jkt = key.public_jwk().thumbprint();
    let (_, api_key) =
        kg.client().create_token(&json!({"name": "n", "scopes": ["orders:read"], "dpop_jkt": jkt})).await;
    let url = format!("{}/orders/1", kg.gateway_url());
    let auth = format!("DPoP {api_key}");
    let now = now_s(&kg);
    // No nonce: 401 use_dpop_nonce, with the nonce to use (RFC 9449 §9).
    let (s, h, body) =
        call(&kg, reqwest::Method::GET, "/orders/1", &auth, Some(proof(&key, "GET", &url, Some(&api_key), "a", now)))
            .await;
    assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("use_dpop_nonce")));
    assert!(h["www-authenticate"].to_str().unwrap().contains("error=\"use_dpop_nonce\""));
    let nonce = h["dpop-nonce"].to_str().unwrap().to_owned();
    // With it: accepted, and the answer names the nonce for the next proof.
    let jwk: Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
    let with_nonce = key
        .sign_claims(
            &json!({"typ": "dpop+jwt", "jwk": jwk}),
            &json!({"jti": "b", "htm": "GET", "htu": url, "iat": now, "nonce": nonce, "ath": keygate_core::dpop::ath(&api_key)}),
        )
        .unwrap();
    let (s, h, _) = call(&kg, reqwest::Method::GET, "/orders/1", &auth, Some(with_nonce)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.contains_key("dpop-nonce"));
    kg.stop().await;
}
