//! The authorization server's behaviour on a real (SQLite) store with a manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;

use keygate_core::jose::{self, Alg, PublicJwk, SigningKey};
use keygate_core::model::Actor;
use keygate_core::policy::RateLimit;
use keygate_core::secret::{OsRandom, Pepper};
use keygate_core::store::Store;
use keygate_core::{ManualClock, Timestamp};
use serde_json::{Value, json};

use super::*;
use crate::service::{Admin, AdminSettings, NewApp};

const T0: i64 = 1_900_000_000_000;
const ISS: &str = "http://gw.test";

struct Kit {
    oauth: OAuth,
    admin: Arc<Admin>,
    clock: ManualClock,
    ws: WorkspaceId,
    _dir: tempfile::TempDir,
}

async fn kit_with(settings: impl FnOnce(&mut OAuthSettings)) -> Kit {
    let dir = tempfile::tempdir().unwrap();
    let store = keygate_store::open(&keygate_store::StoreLocation::DataDir(dir.path().to_owned())).await.unwrap();
    let store: Arc<dyn Store> = store;
    let clock = ManualClock::new(Timestamp::from_millis(T0));
    let admin = Arc::new(Admin::new(
        store,
        Pepper::new(&[9; 32]).unwrap(),
        AdminSettings::default(),
        Arc::new(clock.clone()),
        Arc::new(OsRandom),
    ));
    let ws = admin.bootstrap().await.unwrap().id;
    let mut s = OAuthSettings::for_issuer(ISS);
    settings(&mut s);
    let oauth = OAuth::new(admin.clone(), s).unwrap();
    oauth.reload_keys().await.unwrap();
    oauth.ensure_key(Alg::EdDSA).await.unwrap();
    Kit { oauth, admin, clock, ws, _dir: dir }
}

async fn kit() -> Kit {
    kit_with(|_| {}).await
}

fn actor() -> Actor {
    Actor::cli()
}

impl Kit {
    async fn app(&self, name: &str) -> AppId {
        self.admin.create_app(&self.ws, &actor(), NewApp { name: name.into(), ..NewApp::default() }).await.unwrap().id
    }

    async fn client(&self, new: NewClient) -> (OAuthClient, Option<String>) {
        let app = self.app("svc").await;
        let (c, s) = self.oauth.create_client(&self.ws, &actor(), &app, new).await.unwrap();
        (c, s.map(|s| s.expose().to_owned()))
    }

    fn now_s(&self) -> i64 {
        self.clock.now().as_millis() / 1000
    }

    /// The published key for `kid`.
    fn key(&self, kid: &str) -> PublicJwk {
        let set = self.oauth.jwks();
        let k = set["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).expect("kid in the JWKS").clone();
        PublicJwk::from_json(&k.to_string()).unwrap()
    }

    /// Verifies an issued JWT against the published JWKS, as a resource server would.
    fn verify(&self, jwt: &str) -> jose::AccessToken {
        let kid = jose::split(jwt).unwrap().header().kid.clone().unwrap();
        let key = self.key(&kid);
        jose::verify_access_token(jwt, &key, key.alg(), self.now_s(), 0, ISS, ISS).unwrap()
    }
}

use keygate_core::Clock as _;

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn req(auth: Option<String>, pairs: &[(&str, &str)]) -> OAuthRequest {
    OAuthRequest { form: form(pairs), authorization: auth, dpop: None, peer: Some("10.0.0.1".parse().unwrap()) }
}

fn cc_client(scopes: &[&str], grants: &[&str]) -> NewClient {
    NewClient {
        grant_types: grants.iter().map(|g| (*g).to_owned()).collect(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..NewClient::default()
    }
}

#[tokio::test]
async fn clients_are_validated_and_secrets_shown_once() {
    let k = kit().await;
    let app = k.app("a").await;
    let bad = |n: NewClient| {
        let k = &k;
        let app = app.clone();
        async move { k.oauth.create_client(&k.ws, &actor(), &app, n).await.unwrap_err().code }
    };
    assert_eq!(bad(cc_client(&[], &["password"])).await, "invalid_grant_type");
    assert_eq!(
        bad(NewClient { auth_method: Some("private_key_jwt".into()), ..NewClient::default() }).await,
        "jwks_required"
    );
    assert_eq!(
        bad(NewClient { auth_method: Some("none".into()), ..NewClient::default() }).await,
        "invalid_auth_method"
    );
    assert_eq!(bad(NewClient { access_token_ttl_seconds: Some(0), ..NewClient::default() }).await, "invalid_ttl");
    assert_eq!(bad(cc_client(&["not a scope"], &[])).await, "invalid_scope");

    let (c, secret) = k.oauth.create_client(&k.ws, &actor(), &app, cc_client(&["orders:read"], &[])).await.unwrap();
    let secret = secret.unwrap();
    assert!(secret.expose().starts_with("kgcs_"));
    assert!(c.client_id.starts_with("kgc_"));
    assert_eq!(c.secret_hash, Some(k.admin.hash(secret.expose())), "only the keyed hash is stored");
    let again = k.oauth.create_client(&k.ws, &actor(), &app, cc_client(&[], &[])).await.unwrap_err();
    assert_eq!(again.code, "oauth_client_exists");
}

#[tokio::test]
async fn client_credentials_issue_rfc9068_tokens_that_verify_against_the_jwks() {
    let k = kit().await;
    let (c, secret) = k.client(cc_client(&["orders:read", "orders:write"], &[])).await;
    let secret = secret.unwrap();
    let r = k
        .oauth
        .token(&req(
            Some(basic(&c.client_id, &secret)),
            &[("grant_type", "client_credentials"), ("scope", "orders:read")],
        ))
        .await
        .unwrap();
    assert_eq!((r.token_type, r.expires_in, r.scope.as_deref()), ("Bearer", 900, Some("orders:read")));
    assert!(r.refresh_token.is_none(), "no refresh grant, no refresh token");
    let at = k.verify(&r.access_token);
    assert_eq!(at.header.typ.as_deref(), Some("at+jwt"));
    assert_eq!((at.claims.sub.as_str(), at.claims.client_id.as_str()), (c.client_id.as_str(), c.client_id.as_str()));
    assert_eq!(at.claims.exp - at.claims.iat, 900);
    let payload: Value =
        serde_json::from_slice(&jose::b64url_decode(jose::split(&r.access_token).unwrap().payload_b64()).unwrap())
            .unwrap();
    assert_eq!(payload["app_id"], c.app_id.as_str());

    // All of the client's scopes when none are asked; none beyond them.
    let all =
        k.oauth.token(&req(Some(basic(&c.client_id, &secret)), &[("grant_type", "client_credentials")])).await.unwrap();
    assert_eq!(all.scope.as_deref(), Some("orders:read orders:write"));
    let e = k
        .oauth
        .token(&req(
            Some(basic(&c.client_id, &secret)),
            &[("grant_type", "client_credentials"), ("scope", "admin:all")],
        ))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.error), (400, "invalid_scope"));
    // Grants the client does not have, and unknown ones.
    let e =
        k.oauth.token(&req(Some(basic(&c.client_id, &secret)), &[("grant_type", "refresh_token")])).await.unwrap_err();
    assert_eq!(e.error, "unauthorized_client");
    let e = k.oauth.token(&req(Some(basic(&c.client_id, &secret)), &[("grant_type", "password")])).await.unwrap_err();
    assert_eq!(e.error, "unsupported_grant_type");
}

#[tokio::test]
async fn client_authentication_follows_the_registered_method() {
    let k = kit().await;
    let (c, secret) = k.client(cc_client(&[], &[])).await;
    let secret = secret.unwrap();
    let cc = [("grant_type", "client_credentials")];
    for (auth, extra) in [
        (Some(basic(&c.client_id, "kgcs_wrong")), vec![]),
        (Some(basic("kgc_unknown", &secret)), vec![]),
        (None, vec![("client_id", c.client_id.as_str()), ("client_secret", secret.as_str())]),
        (Some(basic(&c.client_id, &secret)), vec![("client_secret", secret.as_str())]),
        (None, vec![]),
    ] {
        let mut pairs = cc.to_vec();
        pairs.extend(extra);
        let e = k.oauth.token(&req(auth, &pairs)).await.unwrap_err();
        assert_eq!((e.status, e.error), (401, "invalid_client"), "{pairs:?}");
    }
    let e = k.oauth.token(&req(Some(basic(&c.client_id, "x")), &cc)).await.unwrap_err();
    assert_eq!(e.www_authenticate, Some("Basic realm=\"keygate\""), "RFC 6749 §5.2: a Basic challenge");

    // A rotated secret: the old one works during the grace period only.
    let (_, new_secret) = k.oauth.rotate_client_secret(&k.ws, &actor(), &c.app_id, 60).await.unwrap();
    assert!(k.oauth.token(&req(Some(basic(&c.client_id, &secret)), &cc)).await.is_ok());
    assert!(k.oauth.token(&req(Some(basic(&c.client_id, new_secret.expose())), &cc)).await.is_ok());
    k.clock.advance_seconds(61);
    assert_eq!(k.oauth.token(&req(Some(basic(&c.client_id, &secret)), &cc)).await.unwrap_err().error, "invalid_client");
    assert!(k.oauth.token(&req(Some(basic(&c.client_id, new_secret.expose())), &cc)).await.is_ok());

    // client_secret_post.
    let app = k.app("post").await;
    let post = NewClient { auth_method: Some("client_secret_post".into()), ..NewClient::default() };
    let (pc, ps) = k.oauth.create_client(&k.ws, &actor(), &app, post).await.unwrap();
    let ps = ps.unwrap();
    let ok = req(
        None,
        &[("grant_type", "client_credentials"), ("client_id", &pc.client_id), ("client_secret", ps.expose())],
    );
    assert!(k.oauth.token(&ok).await.is_ok());
    assert_eq!(
        k.oauth.token(&req(Some(basic(&pc.client_id, ps.expose())), &cc)).await.unwrap_err().error,
        "invalid_client"
    );
}

#[tokio::test]
async fn private_key_jwt_assertions_are_checked_and_used_once() {
    let k = kit().await;
    let client_key = SigningKey::generate(Alg::ES256, "client-1").unwrap();
    let jwks: Value = json!({"keys": [serde_json::from_str::<Value>(&client_key.public_jwk().to_json()).unwrap()]});
    let new = NewClient { auth_method: Some("private_key_jwt".into()), jwks: Some(jwks), ..NewClient::default() };
    let (c, secret) = k.client(new).await;
    assert!(secret.is_none());
    let assertion = |aud: &str, jti: &str| {
        let now = k.now_s();
        client_key
            .sign_claims(
                &Value::Null,
                &json!({"iss": c.client_id, "sub": c.client_id, "aud": aud, "exp": now + 60, "iat": now, "jti": jti}),
            )
            .unwrap()
    };
    let with = |a: String| {
        req(
            None,
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", CLIENT_ASSERTION_JWT),
                ("client_assertion", a.as_str()),
            ],
        )
    };
    let endpoint = format!("{ISS}/oauth2/token");
    assert!(k.oauth.token(&with(assertion(&endpoint, "a1"))).await.is_ok());
    assert_eq!(k.oauth.token(&with(assertion(&endpoint, "a1"))).await.unwrap_err().error, "invalid_client", "replayed");
    assert_eq!(k.oauth.token(&with(assertion("https://elsewhere", "a2"))).await.unwrap_err().error, "invalid_client");
    let other = SigningKey::generate(Alg::ES256, "client-1").unwrap();
    let now = k.now_s();
    let forged = other
        .sign_claims(
            &Value::Null,
            &json!({"iss": c.client_id, "sub": c.client_id, "aud": endpoint, "exp": now + 60, "jti": "a3"}),
        )
        .unwrap();
    assert_eq!(k.oauth.token(&with(forged)).await.unwrap_err().error, "invalid_client", "not the registered key");
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_replay_revokes_the_family() {
    let k = kit().await;
    let (c, secret) =
        k.client(cc_client(&["orders:read", "orders:write"], &["client_credentials", "refresh_token"])).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let first = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    let rt1 = first.refresh_token.clone().unwrap();
    assert!(rt1.starts_with("kgrt_"));
    let second = k
        .oauth
        .token(&req(
            auth.clone(),
            &[("grant_type", "refresh_token"), ("refresh_token", &rt1), ("scope", "orders:read")],
        ))
        .await
        .unwrap();
    assert_eq!(second.scope.as_deref(), Some("orders:read"), "an access token may be narrowed");
    let rt2 = second.refresh_token.clone().unwrap();
    assert_ne!(rt1, rt2, "rotated on every use");
    let third =
        k.oauth.token(&req(auth.clone(), &[("grant_type", "refresh_token"), ("refresh_token", &rt2)])).await.unwrap();
    assert_eq!(third.scope.as_deref(), Some("orders:read orders:write"), "the family keeps its scopes");
    let rt3 = third.refresh_token.clone().unwrap();

    // rt1 again: reuse. Every token of the family goes, including the newest ones.
    let start = k.admin.store().snapshot(k.clock.now()).await.unwrap().seq;
    let e = k
        .oauth
        .token(&req(auth.clone(), &[("grant_type", "refresh_token"), ("refresh_token", &rt1)]))
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_grant");
    let e = k
        .oauth
        .token(&req(auth.clone(), &[("grant_type", "refresh_token"), ("refresh_token", &rt3)]))
        .await
        .unwrap_err();
    assert_eq!(e.error, "invalid_grant", "the family is revoked");
    let revoked = k.admin.store().revoked_jtis(k.clock.now()).await.unwrap();
    let third_jti = k.verify(&third.access_token).claims.jti;
    assert!(revoked.iter().any(|r| r.jti == third_jti), "the family's access tokens reach the feed");
    let _ = start;
    let audit = k
        .admin
        .audit_events(&k.ws, &keygate_core::model::AuditFilter::default(), &keygate_core::model::PageRequest::default())
        .await
        .unwrap();
    assert!(audit.items.iter().any(|e| e.action == "oauth.refresh_token.reuse"), "the reuse is audited");
    let intro = k.oauth.introspect(&req(auth.clone(), &[("token", &third.access_token)])).await.unwrap();
    assert_eq!(intro, json!({"active": false}));

    // Another client cannot use (or burn) the client's refresh token.
    let fresh = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    let rt = fresh.refresh_token.unwrap();
    let app = k.app("thief").await;
    let (tc, ts) = k
        .oauth
        .create_client(&k.ws, &actor(), &app, cc_client(&[], &["client_credentials", "refresh_token"]))
        .await
        .unwrap();
    let thief = Some(basic(&tc.client_id, ts.unwrap().expose()));
    let e = k.oauth.token(&req(thief, &[("grant_type", "refresh_token"), ("refresh_token", &rt)])).await.unwrap_err();
    assert_eq!(e.error, "invalid_grant");
    assert!(k.oauth.token(&req(auth, &[("grant_type", "refresh_token"), ("refresh_token", &rt)])).await.is_ok());
}

#[tokio::test]
async fn token_exchange_down_scopes_and_shortens() {
    let k = kit().await;
    let grants = ["client_credentials", "urn:ietf:params:oauth:grant-type:token-exchange"];
    let (c, secret) = k.client(cc_client(&["orders:read", "orders:write"], &grants)).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let broad = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    let ex = |scope: &str| {
        req(
            auth.clone(),
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token", broad.access_token.as_str()),
                ("subject_token_type", TOKEN_TYPE_ACCESS),
                ("scope", scope),
            ],
        )
    };
    let narrow = k.oauth.token(&ex("orders:read")).await.unwrap();
    assert_eq!((narrow.scope.as_deref(), narrow.expires_in), (Some("orders:read"), 300));
    assert_eq!(narrow.issued_token_type, Some(TOKEN_TYPE_ACCESS));
    let at = k.verify(&narrow.access_token);
    assert_eq!(at.claims.exp - at.claims.iat, 300);
    assert_eq!(k.oauth.token(&ex("admin:all")).await.unwrap_err().error, "invalid_scope", "never broader");
    // A revoked subject token cannot be exchanged.
    k.oauth.revoke(&req(auth.clone(), &[("token", &broad.access_token)])).await.unwrap();
    assert_eq!(k.oauth.token(&ex("orders:read")).await.unwrap_err().error, "invalid_grant");
}

#[tokio::test]
async fn introspection_and_revocation_follow_rfc7662_and_rfc7009() {
    let k = kit().await;
    let (c, secret) = k.client(cc_client(&["orders:read"], &["client_credentials", "refresh_token"])).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let t = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    let v = k.oauth.introspect(&req(auth.clone(), &[("token", &t.access_token)])).await.unwrap();
    assert_eq!(v["active"], true);
    assert_eq!((v["scope"].as_str(), v["client_id"].as_str()), (Some("orders:read"), Some(c.client_id.as_str())));
    assert_eq!((v["iss"].as_str(), v["token_type"].as_str()), (Some(ISS), Some("Bearer")));
    let rt = t.refresh_token.clone().unwrap();
    let v = k.oauth.introspect(&req(auth.clone(), &[("token", &rt)])).await.unwrap();
    assert_eq!((v["active"].as_bool(), v["token_type"].as_str()), (Some(true), Some("refresh_token")));
    for junk in ["nope", "kg_notatoken", "eyJ.eyJ.sig"] {
        assert_eq!(k.oauth.introspect(&req(auth.clone(), &[("token", junk)])).await.unwrap(), json!({"active": false}));
    }
    // Unauthenticated callers are refused.
    assert_eq!(
        k.oauth.introspect(&req(None, &[("token", &t.access_token)])).await.unwrap_err().error,
        "invalid_client"
    );
    // Expiry.
    k.clock.advance_seconds(901);
    assert_eq!(
        k.oauth.introspect(&req(auth.clone(), &[("token", &t.access_token)])).await.unwrap(),
        json!({"active": false})
    );

    // Revoking a refresh token revokes the access tokens issued from it; unknown tokens are fine.
    let t = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    k.oauth.revoke(&req(auth.clone(), &[("token", "kgrt_unknown")])).await.unwrap();
    k.oauth.revoke(&req(auth.clone(), &[("token", t.refresh_token.as_deref().unwrap())])).await.unwrap();
    assert_eq!(
        k.oauth.introspect(&req(auth.clone(), &[("token", &t.access_token)])).await.unwrap(),
        json!({"active": false})
    );
    assert!(k.oauth.revoke(&req(None, &[("token", &t.access_token)])).await.is_err(), "revocation needs a client");
    // Another client's token: answered like an unknown one (RFC 7009 §2.2) and left alone.
    let live = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    let app = k.app("other").await;
    let (oc, os) = k.oauth.create_client(&k.ws, &actor(), &app, cc_client(&[], &[])).await.unwrap();
    let other = Some(basic(&oc.client_id, os.unwrap().expose()));
    for t in [live.access_token.as_str(), live.refresh_token.as_deref().unwrap()] {
        k.oauth.revoke(&req(other.clone(), &[("token", t)])).await.unwrap();
    }
    assert_eq!(k.oauth.introspect(&req(auth.clone(), &[("token", &live.access_token)])).await.unwrap()["active"], true);
    let rt = live.refresh_token.as_deref().unwrap();
    assert_eq!(k.oauth.introspect(&req(auth.clone(), &[("token", rt)])).await.unwrap()["active"], true);
}

#[tokio::test]
async fn dpop_binds_tokens_to_the_clients_key() {
    let k = kit().await;
    let (c, secret) = k.client(cc_client(&[], &["client_credentials", "refresh_token"])).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let dkey = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let jwk: Value = serde_json::from_str(&dkey.public_jwk().to_json()).unwrap();
    let proof = |jti: &str| {
        dkey.sign_claims(
            &json!({"typ": "dpop+jwt", "jwk": jwk}),
            &json!({"jti": jti, "htm": "POST", "htu": format!("{ISS}/oauth2/token"), "iat": k.now_s()}),
        )
        .unwrap()
    };
    let mut r = req(auth.clone(), &[("grant_type", "client_credentials")]);
    r.dpop = Some(proof("p1"));
    let t = k.oauth.token(&r).await.unwrap();
    assert_eq!(t.token_type, "DPoP");
    let at = k.verify(&t.access_token);
    assert_eq!(at.claims.cnf.unwrap().jkt.unwrap(), dkey.public_jwk().thumbprint());
    assert_eq!(k.oauth.token(&r).await.unwrap_err().error, "invalid_dpop_proof", "a proof is used once");
    // The bound refresh token needs a proof of the same key.
    let rt = t.refresh_token.unwrap();
    let plain = req(auth.clone(), &[("grant_type", "refresh_token"), ("refresh_token", &rt)]);
    assert_eq!(k.oauth.token(&plain).await.unwrap_err().error, "invalid_dpop_proof");
    let mut bound = plain.clone();
    bound.dpop = Some(proof("p2"));
    assert_eq!(k.oauth.token(&bound).await.unwrap().token_type, "DPoP");
}

#[tokio::test]
async fn signing_keys_are_published_before_they_sign_and_kept_until_their_tokens_expire() {
    let k = kit_with(|s| s.key_publish_ahead_seconds = 600).await;
    let (c, secret) = k.client(cc_client(&[], &[])).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let cc = [("grant_type", "client_credentials")];
    let old_kid = |t: &TokenResponse| jose::split(&t.access_token).unwrap().header().kid.clone().unwrap();
    let before = old_kid(&k.oauth.token(&req(auth.clone(), &cc)).await.unwrap());
    let made = k.oauth.rotate_keys(&actor(), None).await.unwrap();
    let new_kid = made[0].kid.clone();
    let kids = |k: &Kit| -> Vec<String> {
        k.oauth.jwks()["keys"].as_array().unwrap().iter().map(|x| x["kid"].as_str().unwrap().to_owned()).collect()
    };
    assert!(kids(&k).contains(&new_kid), "published at once");
    assert_eq!(old_kid(&k.oauth.token(&req(auth.clone(), &cc)).await.unwrap()), before, "not signing yet");
    k.clock.advance_seconds(600);
    k.oauth.reload_keys().await.unwrap();
    assert_eq!(old_kid(&k.oauth.token(&req(auth.clone(), &cc)).await.unwrap()), new_kid, "signs after the delay");
    assert!(kids(&k).contains(&before), "the old key verifies the tokens it signed");
    k.clock.advance_seconds(86_400 + 31);
    k.oauth.maintain().await.unwrap();
    assert!(!kids(&k).contains(&before), "gone once its last token expired");
}

#[tokio::test]
async fn opaque_access_tokens_are_keygate_tokens() {
    let k = kit().await;
    let new = NewClient {
        access_token_format: Some("opaque".into()),
        scopes: vec!["orders:read".into()],
        ..NewClient::default()
    };
    let (c, secret) = k.client(new).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let t = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
    assert!(t.access_token.starts_with("kg_"));
    let v = k.oauth.introspect(&req(auth.clone(), &[("token", &t.access_token)])).await.unwrap();
    assert_eq!((v["active"].as_bool(), v["client_id"].as_str()), (Some(true), Some(c.client_id.as_str())));
    k.oauth.revoke(&req(auth.clone(), &[("token", &t.access_token)])).await.unwrap();
    assert_eq!(k.oauth.introspect(&req(auth, &[("token", &t.access_token)])).await.unwrap(), json!({"active": false}));
}

#[tokio::test]
async fn opaque_access_tokens_are_not_held_to_the_token_rules_of_people_s_keys() {
    let k = kit().await;
    let rules = keygate_core::account::TokenRules {
        max_active_tokens_per_app: Some(1),
        allowlist_required_for: vec![keygate_core::scope::Scope::parse("orders:*").unwrap()],
        ..Default::default()
    };
    k.admin.set_token_rules(&k.ws, &actor(), rules).await.unwrap();
    let new = NewClient {
        access_token_format: Some("opaque".into()),
        scopes: vec!["orders:read".into()],
        ..NewClient::default()
    };
    let (c, secret) = k.client(new).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    for _ in 0..3 {
        let t = k.oauth.token(&req(auth.clone(), &[("grant_type", "client_credentials")])).await.unwrap();
        assert!(t.access_token.starts_with("kg_"), "one grant, one short-lived token: not capped per app");
    }
    // Keys people make for the same app are held to them, and the access tokens do not count.
    let key = |name: &str| crate::service::NewToken {
        name: name.into(),
        app_id: Some(c.app_id.clone()),
        ..Default::default()
    };
    k.admin.create_token(&k.ws, &actor(), key("first")).await.unwrap();
    let e = k.admin.create_token(&k.ws, &actor(), key("second")).await.unwrap_err();
    assert_eq!(e.code, "too_many_tokens");
}

#[tokio::test]
async fn the_endpoints_are_rate_limited_per_client() {
    let k = kit_with(|s| s.client_rate = RateLimit { requests: 2, per_seconds: 60, burst: 0 }).await;
    let (c, secret) = k.client(cc_client(&[], &[])).await;
    let good = req(Some(basic(&c.client_id, &secret.unwrap())), &[("grant_type", "client_credentials")]);
    assert!(k.oauth.token(&good).await.is_ok());
    assert!(k.oauth.token(&good).await.is_ok());
    let e = k.oauth.token(&good).await.unwrap_err();
    assert_eq!((e.status, e.error), (429, "slow_down"));
    assert!(e.retry_after.is_some_and(|s| s > 0));
}

#[tokio::test]
async fn dpop_nonces_are_required_when_configured() {
    let k = kit_with(|s| s.dpop_nonces = true).await;
    let (c, secret) = k.client(cc_client(&[], &[])).await;
    let auth = Some(basic(&c.client_id, &secret.unwrap()));
    let dkey = SigningKey::generate(Alg::ES256, "").unwrap();
    let jwk: Value = serde_json::from_str(&dkey.public_jwk().to_json()).unwrap();
    let proof = |jti: &str, nonce: Option<&str>| {
        let mut claims = json!({"jti": jti, "htm": "POST", "htu": format!("{ISS}/oauth2/token"), "iat": k.now_s()});
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        dkey.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
    };
    let mut r = req(auth.clone(), &[("grant_type", "client_credentials")]);
    r.dpop = Some(proof("n1", None));
    let e = k.oauth.token(&r).await.unwrap_err();
    assert_eq!((e.status, e.error), (400, "use_dpop_nonce"));
    let nonce = e.dpop_nonce.expect("the nonce to use comes with the error");
    assert_eq!(k.oauth.dpop_nonce().as_deref(), Some(nonce.as_str()));
    r.dpop = Some(proof("n2", Some("made-up")));
    assert_eq!(k.oauth.token(&r).await.unwrap_err().error, "use_dpop_nonce");
    r.dpop = Some(proof("n3", Some(&nonce)));
    assert_eq!(k.oauth.token(&r).await.unwrap().token_type, "DPoP");
    // The previous window's nonce is still accepted; older ones are not.
    k.clock.advance_seconds(NONCE_WINDOW_S);
    r.dpop = Some(proof("n4", Some(&nonce)));
    assert!(k.oauth.token(&r).await.is_ok());
    k.clock.advance_seconds(NONCE_WINDOW_S);
    r.dpop = Some(proof("n5", Some(&nonce)));
    assert_eq!(k.oauth.token(&r).await.unwrap_err().error, "use_dpop_nonce");
    // Without DPoP, nothing changes.
    assert!(k.oauth.token(&req(auth, &[("grant_type", "client_credentials")])).await.is_ok());
}

#[tokio::test]
async fn failed_authentications_are_throttled_where_they_come_from() {
    let k = kit().await;
    let (c, secret) = k.client(cc_client(&[], &[])).await;
    let secret = secret.unwrap();
    let from = |ip: &str, s: &str| {
        let mut r = req(Some(basic(&c.client_id, s)), &[("grant_type", "client_credentials")]);
        r.peer = Some(ip.parse().unwrap());
        r
    };
    for _ in 0..20 {
        assert_eq!(k.oauth.token(&from("10.0.0.9", "guess")).await.unwrap_err().error, "invalid_client");
    }
    let e = k.oauth.token(&from("10.0.0.9", "guess")).await.unwrap_err();
    assert_eq!((e.status, e.error), (429, "slow_down"));
    assert!(k.oauth.token(&from("10.0.0.8", &secret)).await.is_ok(), "the client elsewhere is not locked out");
    // Successes and other clients' ids are not counted as failures of this one.
    assert!(k.oauth.token(&from("10.0.0.8", &secret)).await.is_ok());
    // A claimed id that cannot be one is refused without being kept.
    let before = k.oauth.throttle_footprint();
    let mut r =
        req(None, &[("grant_type", "client_credentials"), ("client_id", &"x".repeat(5000)), ("client_secret", "s")]);
    r.peer = Some("10.0.0.7".parse().unwrap());
    assert_eq!(k.oauth.token(&r).await.unwrap_err().error, "invalid_client");
    assert_eq!(k.oauth.throttle_footprint().entries, before.entries + 1, "only the address is counted");
}

#[tokio::test]
async fn one_client_cannot_fill_the_replay_memory_of_another() {
    let k = kit_with(|s| s.replay_per_client = 5).await;
    let dkey = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let jwk: Value = serde_json::from_str(&dkey.public_jwk().to_json()).unwrap();
    let proof = |jti: &str| {
        dkey.sign_claims(
            &json!({"typ": "dpop+jwt", "jwk": jwk}),
            &json!({"jti": jti, "htm": "POST", "htu": format!("{ISS}/oauth2/token"), "iat": k.now_s()}),
        )
        .unwrap()
    };
    let (a, sa) = k.client(cc_client(&[], &[])).await;
    let (b, sb) = k.client(cc_client(&[], &[])).await;
    let with = |c: &OAuthClient, s: &Option<String>, jti: &str| {
        let mut r = req(Some(basic(&c.client_id, s.as_deref().unwrap())), &[("grant_type", "client_credentials")]);
        r.dpop = Some(proof(jti));
        r
    };
    // B's proof is remembered; then A floods far past what is kept for one client, with long
    // jtis...
    let b1 = with(&b, &sb, "b-1");
    assert_eq!(k.oauth.token(&b1).await.unwrap().token_type, "DPoP");
    for i in 0..50 {
        k.oauth.token(&with(&a, &sa, &format!("{i}{}", "j".repeat(250)))).await.unwrap();
    }
    // ...which costs A only its own oldest memories: it holds at most its share (digests, not
    // the jtis as sent), and B's proof is still known as used.
    let held = k.oauth.replay_footprint();
    assert!(held.entries <= 5 + 1, "A keeps at most its share, B its one: {held:?}");
    assert!(
        held.bytes
            <= 6 * keygate_core::dpop::ReplayCache::ENTRY_BYTES + 2 * keygate_core::dpop::ReplayCache::CALLER_BYTES,
        "{held:?}"
    );
    assert_eq!(k.oauth.token(&b1).await.unwrap_err().error, "invalid_dpop_proof", "B's replay is still caught");
    // A's latest proofs are still caught too.
    assert_eq!(
        k.oauth.token(&with(&a, &sa, &format!("49{}", "j".repeat(250)))).await.unwrap_err().error,
        "invalid_dpop_proof"
    );
    // Once the proofs are too old to be replayed anyway, they are forgotten.
    k.clock.advance_seconds(400);
    assert_eq!(k.oauth.token(&with(&a, &sa, "later")).await.unwrap().token_type, "DPoP");
    let held = k.oauth.replay_footprint();
    assert!(held.entries <= 2, "the expired ones gone: {held:?}");
}
