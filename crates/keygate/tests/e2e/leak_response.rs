//! Leak response (issue 15): a workspace's exposure policy, set in the dashboard, applied to a
//! token found exposed — here, sent in a query string to the gateway.

use std::time::Duration;

use keygate_testkit::{StatusCode, TestKeygate};
use serde_json::json;

use crate::audit_count;
use crate::dashboard::owner;

async fn until_state(kg: &TestKeygate, id: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = kg.client().get(&format!("/admin/v1/tokens/{id}")).await;
        if t.body["status"] == want && t.body["exposed_at"].is_string() {
            return t.body;
        }
        assert!(std::time::Instant::now() < deadline, "the token never became {want}: {}", t.body);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn leak(kg: &TestKeygate, token: &str) {
    let r = reqwest::get(format!("{}/demo/echo?api_key={token}", kg.gateway_url())).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_found_exposed_is_suspended_or_revoked_as_the_workspace_says() {
    let kg = TestKeygate::start().await.unwrap();
    let mut own = owner(&kg).await;
    let c = kg.client();

    // The default: marked exposed, still working.
    let (kept, kept_secret) = c.create_token(&json!({"name": "notify"})).await;
    leak(&kg, &kept_secret).await;
    until_state(&kg, &kept, "active").await;

    let set = async |own: &mut crate::dashboard::Browser, action: &str| {
        let p = own.submit("/settings", "/settings", &[("exposure_action", action)]).await;
        assert_eq!(p.location.as_deref(), Some("/settings?msg=settings_saved"), "{}", p.body);
        assert!(own.get("/settings").await.body.contains(&format!("value=\"{action}\" selected")));
    };
    set(&mut own, "suspend").await;
    let (sus, sus_secret) = c.create_token(&json!({"name": "suspend"})).await;
    leak(&kg, &sus_secret).await;
    until_state(&kg, &sus, "suspended").await;
    let trail = c.get(&format!("/admin/v1/audit-events?target={sus}&action=token.suspend")).await;
    assert_eq!(trail.body["data"][0]["actor"], "exposure-policy", "{}", trail.body);
    let r = reqwest::Client::new().get(format!("{}/demo/echo", kg.gateway_url())).bearer_auth(&sus_secret).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::UNAUTHORIZED, "suspended at the gateway too");
    // One click (one call) brings it back.
    assert_eq!(c.post(&format!("/admin/v1/tokens/{sus}/resume"), &json!({})).await.status, StatusCode::OK);

    set(&mut own, "revoke").await;
    let (rev, rev_secret) = c.create_token(&json!({"name": "revoke"})).await;
    leak(&kg, &rev_secret).await;
    let body = until_state(&kg, &rev, "revoked").await;
    let reason = body["revoke_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("exposed: gateway: query string of GET /demo/echo"), "{body}");
    assert!(!reason.contains(&rev_secret), "never the secret: {reason}");

    // An unknown value is refused with a message, and changes nothing.
    let p = own.submit("/settings", "/settings", &[("exposure_action", "explode")]).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(own.get("/settings").await.body.contains("value=\"revoke\" selected"));
    kg.stop().await;
}

/// The DER prefix of a P-256 public key (SubjectPublicKeyInfo), before its 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A code-hosting platform reports tokens it found in public code, signed with its key, in
/// GitHub's partner format: keygate's own tokens are marked exposed and handled by their
/// workspace's policy; the answer labels each by its SHA-256, never echoing a secret; a request
/// not signed by a configured key changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_scanning_partner_reports_leaked_tokens() {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
    use base64::Engine as _;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let platform = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(platform.public_key().as_ref());
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", b64.encode(&der));
    let cfg = keygate::config::SecretScanningConfig {
        keys: vec![keygate::config::PartnerKeyConfig { id: "key-1".into(), pem }],
        ..Default::default()
    };
    let kg = TestKeygate::start_with(keygate_testkit::Options { secret_scanning: Some(cfg), ..Default::default() })
        .await
        .unwrap();
    let mut own = owner(&kg).await;
    let p = own.submit("/settings", "/settings", &[("exposure_action", "revoke")]).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let c = kg.client();
    let (id, secret) = c.create_token(&json!({"name": "leaked"})).await;
    let made_up = {
        let minted = keygate_core::token_format::mint(
            &keygate_core::token_format::TokenPrefix::default(),
            &keygate_core::secret::OsRandom,
        )
        .unwrap();
        minted.secret.expose().to_owned()
    };
    let body = json!([
        {"token": secret, "type": "keygate_token", "url": "https://github.com/acme/app/blob/abc/config.env#L3", "source": "content"},
        {"token": made_up, "type": "keygate_token", "url": "", "source": "commit"},
    ])
    .to_string();
    let url = format!("{}/.well-known/keygate/secret-scanning", kg.gateway_url());
    let send = |body: String, key_id: &str, sig: String| {
        reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .header("Github-Public-Key-Identifier", key_id)
            .header("Github-Public-Key-Signature", sig)
            .body(body)
            .send()
    };
    // Unsigned, signed by an unknown key, or for another body: refused, nothing marked.
    let sig = b64.encode(platform.sign(&rng, body.as_bytes()).unwrap().as_ref());
    for (key_id, signature, what) in [
        ("key-1", String::new(), "no signature"),
        ("key-2", sig.clone(), "unknown key"),
        ("key-1", b64.encode(platform.sign(&rng, b"[]").unwrap().as_ref()), "another body"),
    ] {
        let r = send(body.clone(), key_id, signature).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert!(c.get(&format!("/admin/v1/tokens/{id}")).await.body["exposed_at"].is_null(), "nothing marked");
    let r = reqwest::Client::new().get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    let r = send(body.clone(), "key-1", sig.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(!text.contains(&secret) && !text.contains(&made_up), "no secret in the answer: {text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let hex = |t: &str| {
        use sha2::Digest as _;
        sha2::Sha256::digest(t.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(
        answer,
        json!([
            {"token_hash": hex(&secret), "token_type": "keygate_token", "label": "true_positive", "live": false},
            {"token_hash": hex(&made_up), "token_type": "keygate_token", "label": "false_positive", "live": false},
        ])
    );
    let t = c.get(&format!("/admin/v1/tokens/{id}")).await.body;
    assert_eq!(t["status"], "revoked", "the workspace revokes exposed tokens: {t}");
    assert!(
        t["revoke_reason"]
            .as_str()
            .unwrap()
            .contains("secret scanning: https://github.com/acme/app/blob/abc/config.env#L3")
    );
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}&action=token.exposed")).await;
    assert_eq!(trail.body["data"][0]["actor"], "secret-scanning");
    let events = audit_count(&kg).await;

    // The same signed report sent again (by the platform, or by whoever saw it): the same
    // answer, and nothing new — no event, so no webhook or email either.
    for _ in 0..3 {
        let r = send(body.clone(), "key-1", sig.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap(), answer);
    }
    assert_eq!(audit_count(&kg).await, events, "a replayed report writes nothing");
    let trail = c.get(&format!("/admin/v1/audit-events?target={id}&action=token.exposed")).await;
    assert_eq!(trail.body["data"].as_array().unwrap().len(), 1, "{}", trail.body);

    // Not JSON of the right shape: 400, even when signed.
    let junk = "{\"token\": 1}".to_owned();
    let sig = b64.encode(platform.sign(&rng, junk.as_bytes()).unwrap().as_ref());
    assert_eq!(send(junk, "key-1", sig).await.unwrap().status(), StatusCode::BAD_REQUEST);
    kg.stop().await;
}
