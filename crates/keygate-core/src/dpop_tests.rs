use super::*;
use crate::jose::{Alg, SigningKey, b64url_decode, b64url_encode};
use serde_json::json;

const VECTORS: &str = include_str!("../../../tests/vectors/dpop.json");

fn vectors() -> serde_json::Value {
    serde_json::from_str(VECTORS).unwrap()
}

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str().unwrap()
}

fn check<'a>(case: &'a serde_json::Value) -> ProofCheck<'a> {
    ProofCheck {
        method: s(case, "htm"),
        uri: s(case, "htu"),
        now: case["iat"].as_i64().unwrap(),
        max_age: 60,
        leeway: 5,
        access_token: None,
        expected_jkt: None,
        nonces: &[],
    }
}

fn code(r: Result<VerifiedProof>) -> &'static str {
    r.unwrap_err().code
}

#[test]
fn rfc9449_token_request_proof() {
    let v = vectors();
    let case = &v["token_request_proof"];
    let proof = s(case, "proof");
    let out = verify_proof(proof, &check(case)).unwrap();
    assert_eq!(out.jkt, s(&v, "jkt"));
    assert_eq!(out.jti, s(case, "jti"));
    assert_eq!(out.iat, case["iat"].as_i64().unwrap());
    assert_eq!(out.replay_until, out.iat + 60);
    let jwk = PublicJwk::from_json(&v["public_jwk"].to_string()).unwrap();
    assert_eq!(jkt(&jwk), s(&v, "jkt"));
    // Bound to that key.
    verify_proof(proof, &ProofCheck { expected_jkt: Some(s(&v, "jkt")), ..check(case) }).unwrap();
    assert_eq!(
        code(verify_proof(
            proof,
            &ProofCheck { expected_jkt: Some("0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4J"), ..check(case) }
        )),
        DPOP_KEY_MISMATCH
    );
}

#[test]
fn rfc9449_resource_request_proof_with_ath() {
    let v = vectors();
    let case = &v["resource_request_proof"];
    let proof = s(case, "proof");
    let token = s(case, "access_token");
    assert_eq!(ath(token), s(case, "ath"));
    let out = verify_proof(proof, &ProofCheck { access_token: Some(token), ..check(case) }).unwrap();
    assert_eq!(out.jkt, s(&v, "jkt"));
    assert_eq!(out.jti, s(case, "jti"));
    // Another access token: ath does not match.
    assert_eq!(
        code(verify_proof(proof, &ProofCheck { access_token: Some("another-token"), ..check(case) })),
        DPOP_ATH_MISMATCH
    );
    // A proof without ath presented with an access token.
    let token_case = &v["token_request_proof"];
    assert_eq!(
        code(verify_proof(s(token_case, "proof"), &ProofCheck { access_token: Some(token), ..check(token_case) })),
        DPOP_ATH_MISMATCH
    );
}

#[test]
fn rfc9449_proofs_refused_for_another_request_or_time() {
    let v = vectors();
    let case = &v["resource_request_proof"];
    let proof = s(case, "proof");
    let c = check(case);
    assert_eq!(code(verify_proof(proof, &ProofCheck { method: "POST", ..c })), DPOP_METHOD_MISMATCH);
    assert_eq!(code(verify_proof(proof, &ProofCheck { method: "get", ..c })), DPOP_METHOD_MISMATCH);
    for uri in [
        "https://resource.example.org/protectedresource2",
        "https://resource.example.org/",
        "http://resource.example.org/protectedresource",
        "https://other.example.org/protectedresource",
    ] {
        assert_eq!(code(verify_proof(proof, &ProofCheck { uri, ..c })), DPOP_URL_MISMATCH, "{uri}");
    }
    // Query and fragment are ignored.
    verify_proof(proof, &ProofCheck { uri: "https://resource.example.org/protectedresource?a=1#f", ..c }).unwrap();
    // The iat window: 60 s back, 5 s ahead.
    verify_proof(proof, &ProofCheck { now: c.now + 60, ..c }).unwrap();
    assert_eq!(code(verify_proof(proof, &ProofCheck { now: c.now + 61, ..c })), DPOP_PROOF_EXPIRED);
    assert_eq!(code(verify_proof(proof, &ProofCheck { now: c.now + 86_400 * 365, ..c })), DPOP_PROOF_EXPIRED);
    verify_proof(proof, &ProofCheck { now: c.now - 5, ..c }).unwrap();
    assert_eq!(code(verify_proof(proof, &ProofCheck { now: c.now - 6, ..c })), DPOP_PROOF_NOT_YET_VALID);
    // A nonce is required but the proof has none.
    assert_eq!(code(verify_proof(proof, &ProofCheck { nonces: &["n-1"], ..c })), USE_DPOP_NONCE);
}

#[test]
fn replaced_signature_is_refused() {
    let v = vectors();
    let a = s(&v["token_request_proof"], "proof");
    let b = s(&v["resource_request_proof"], "proof");
    let (a_input, _) = a.rsplit_once('.').unwrap();
    let (_, b_sig) = b.rsplit_once('.').unwrap();
    let forged = format!("{a_input}.{b_sig}");
    assert_eq!(code(verify_proof(&forged, &check(&v["token_request_proof"]))), INVALID_DPOP_PROOF);
    // A flipped bit.
    let mut sig = b64url_decode(a.rsplit_once('.').unwrap().1).unwrap();
    sig[10] ^= 0x40;
    let forged = format!("{a_input}.{}", b64url_encode(&sig));
    assert_eq!(code(verify_proof(&forged, &check(&v["token_request_proof"]))), INVALID_DPOP_PROOF);
}

/// A proof signed by `key`, with the given header members and claims.
fn proof(key: &SigningKey, header: serde_json::Value, claims: &serde_json::Value) -> String {
    key.sign(&header, &claims.to_string()).unwrap()
}

fn jwk_value(key: &SigningKey) -> serde_json::Value {
    serde_json::from_str(&key.public_jwk().to_json()).unwrap()
}

const NOW: i64 = 1_800_000_000;

fn our_check() -> ProofCheck<'static> {
    ProofCheck {
        method: "GET",
        uri: "https://api.example/things",
        now: NOW,
        max_age: 60,
        leeway: 5,
        access_token: Some("kg_token"),
        expected_jkt: None,
        nonces: &[],
    }
}

fn our_claims() -> serde_json::Value {
    json!({"jti": "j-1", "htm": "GET", "htu": "https://api.example/things", "iat": NOW, "ath": ath("kg_token")})
}

#[test]
fn proofs_we_sign_verify_with_both_algs_and_nonces() {
    for alg in [Alg::EdDSA, Alg::ES256] {
        let key = SigningKey::generate(alg, "").unwrap();
        let header = json!({"typ": "dpop+jwt", "jwk": jwk_value(&key)});
        let p = proof(&key, header.clone(), &our_claims());
        let out = verify_proof(&p, &our_check()).unwrap();
        assert_eq!(out.jkt, key.public_jwk().thumbprint());
        assert_eq!(out.jti, "j-1");

        let mut with_nonce = our_claims();
        with_nonce["nonce"] = json!("n-1");
        let p = proof(&key, header.clone(), &with_nonce);
        verify_proof(&p, &ProofCheck { nonces: &["n-1"], ..our_check() }).unwrap();
        verify_proof(&p, &ProofCheck { nonces: &["n-0", "n-1"], ..our_check() }).unwrap();
        assert_eq!(code(verify_proof(&p, &ProofCheck { nonces: &["n-2"], ..our_check() })), USE_DPOP_NONCE);
        // A nonce the server does not require is fine.
        verify_proof(&p, &our_check()).unwrap();
    }
}

#[test]
fn malformed_proofs_are_refused() {
    let key = SigningKey::generate(Alg::ES256, "").unwrap();
    let jwk = jwk_value(&key);
    let header = json!({"typ": "dpop+jwt", "jwk": jwk});
    let refused = |h: serde_json::Value, c: serde_json::Value| code(verify_proof(&proof(&key, h, &c), &our_check()));

    // typ
    assert_eq!(refused(json!({"typ": "jwt", "jwk": jwk}), our_claims()), INVALID_DPOP_PROOF);
    assert_eq!(refused(json!({"typ": "at+jwt", "jwk": jwk}), our_claims()), INVALID_DPOP_PROOF);
    assert_eq!(refused(json!({"jwk": jwk}), our_claims()), INVALID_DPOP_PROOF);
    // jwk missing, private, or another key than the signer's
    assert_eq!(refused(json!({"typ": "dpop+jwt"}), our_claims()), INVALID_DPOP_PROOF);
    let pkcs8 = key.to_pkcs8().unwrap();
    let mut private = jwk.clone();
    // Any `d` member, even a bogus one, marks a private key.
    private["d"] = json!(b64url_encode(&pkcs8[pkcs8.len() - 32..]));
    assert_eq!(refused(json!({"typ": "dpop+jwt", "jwk": private}), our_claims()), INVALID_DPOP_PROOF);
    let other = SigningKey::generate(Alg::ES256, "").unwrap();
    assert_eq!(refused(json!({"typ": "dpop+jwt", "jwk": jwk_value(&other)}), our_claims()), INVALID_DPOP_PROOF);
    let ed = SigningKey::generate(Alg::EdDSA, "").unwrap();
    assert_eq!(refused(json!({"typ": "dpop+jwt", "jwk": jwk_value(&ed)}), our_claims()), INVALID_DPOP_PROOF);
    assert_eq!(refused(json!({"typ": "dpop+jwt", "jwk": {"kty": "EC"}}), our_claims()), INVALID_DPOP_PROOF);
    // Missing or ill-typed claims.
    for missing in ["jti", "htm", "htu", "iat"] {
        let mut c = our_claims();
        c.as_object_mut().unwrap().remove(missing);
        assert_eq!(refused(header.clone(), c), INVALID_DPOP_PROOF, "{missing}");
    }
    let mut c = our_claims();
    c["jti"] = json!("");
    assert_eq!(refused(header.clone(), c), INVALID_DPOP_PROOF);
    let mut c = our_claims();
    c["jti"] = json!("j".repeat(MAX_JTI_LEN + 1));
    assert_eq!(refused(header.clone(), c), INVALID_DPOP_PROOF);
    let mut c = our_claims();
    c["iat"] = json!(NOW as f64 + 0.5);
    assert_eq!(refused(header.clone(), c), INVALID_DPOP_PROOF);
    let mut c = our_claims();
    c["iat"] = json!(NOW.to_string());
    assert_eq!(refused(header.clone(), c), INVALID_DPOP_PROOF);
    let mut c = our_claims();
    c["ath"] = json!(ath("other"));
    assert_eq!(refused(header.clone(), c), DPOP_ATH_MISMATCH);
    // Claims as a JSON array (serde would take it positionally).
    let array = json!(["j-1", "GET", "https://api.example/things", NOW, ath("kg_token")]);
    assert_eq!(refused(header.clone(), array), INVALID_DPOP_PROOF);
    // The four-segment and oversized forms.
    let p = proof(&key, header.clone(), &our_claims());
    assert_eq!(code(verify_proof(&format!("{p}.x"), &our_check())), INVALID_DPOP_PROOF);
    let mut big = our_claims();
    big["pad"] = json!("x".repeat(crate::jose::MAX_TOKEN_LEN));
    assert_eq!(refused(header, big), INVALID_DPOP_PROOF);
}

#[test]
fn alg_none_and_hs256_proofs_are_refused() {
    use hmac::{Hmac, Mac};
    let v = vectors();
    let case = &v["token_request_proof"];
    let jwk = &v["public_jwk"];
    let payload = s(case, "proof").split('.').nth(1).unwrap().to_owned();

    let none = json!({"typ": "dpop+jwt", "alg": "none", "jwk": jwk});
    let unsigned = format!("{}.{payload}.", b64url_encode(none.to_string().as_bytes()));
    assert_eq!(code(verify_proof(&unsigned, &check(case))), INVALID_DPOP_PROOF);
    let with_junk = format!("{}.{payload}.{}", b64url_encode(none.to_string().as_bytes()), b64url_encode(&[0; 64]));
    let e = verify_proof(&with_junk, &check(case)).unwrap_err();
    assert_eq!(e.code, INVALID_DPOP_PROOF);
    assert!(e.message.contains("alg"), "{e}");

    let hs = json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk});
    let input = format!("{}.{payload}", b64url_encode(hs.to_string().as_bytes()));
    let x = b64url_decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = b64url_decode(jwk["y"].as_str().unwrap()).unwrap();
    let point = [&[4u8][..], &x, &y].concat();
    for secret in [point, x, jwk.to_string().into_bytes()] {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&secret).unwrap();
        mac.update(input.as_bytes());
        let forged = format!("{input}.{}", b64url_encode(&mac.finalize().into_bytes()));
        assert_eq!(code(verify_proof(&forged, &check(case))), INVALID_DPOP_PROOF);
    }
}

#[test]
fn codes_map_to_oauth_errors() {
    use crate::jose::oauth_error;
    assert_eq!(oauth_error(USE_DPOP_NONCE), "use_dpop_nonce");
    for c in [
        INVALID_DPOP_PROOF,
        DPOP_METHOD_MISMATCH,
        DPOP_URL_MISMATCH,
        DPOP_PROOF_EXPIRED,
        DPOP_PROOF_NOT_YET_VALID,
        DPOP_ATH_MISMATCH,
        DPOP_KEY_MISMATCH,
    ] {
        assert_eq!(oauth_error(c), "invalid_dpop_proof");
    }
    assert_eq!(oauth_error(crate::jose::TOKEN_EXPIRED), "invalid_token");
}

#[test]
fn the_replay_cache_accepts_each_jti_once_until_it_expires() {
    let c = ReplayCache::new(ReplayLimits::default());
    assert!(c.first_use(b"t1", "k", "a", 100, 10));
    assert!(!c.first_use(b"t1", "k", "a", 100, 50), "a replay inside the window");
    assert!(!c.first_use(b"t1", "k", "a", 100, 100), "still inside at its last second");
    assert!(c.first_use(b"t1", "k2", "a", 100, 50), "the same jti with another key");
    assert!(c.first_use(b"t2", "k", "a", 100, 50), "the same jti from another caller");
    assert!(c.first_use(b"t1", "k", "a", 300, 101), "an expired jti may come again");
    assert!(c.first_use(b"t1", "k", "b", 20, 10));
    assert!(!c.first_use(b"t1", "k", "b", 40, 20));
}

#[test]
fn one_caller_cannot_fill_the_replay_cache_for_everyone() {
    // Room for about 40 entries in all, 10 per caller.
    let limits =
        ReplayLimits { max_bytes: 40 * ReplayCache::ENTRY_BYTES + 8 * ReplayCache::CALLER_BYTES, max_per_caller: 10 };
    let c = ReplayCache::new(limits);
    assert!(c.first_use(b"victim", "k", "v-1", 400, 100));
    for i in 0..1000 {
        let until = 400 + i64::from(i);
        assert!(c.first_use(b"attacker", "k", &format!("a-{i}"), until, 100), "nothing is refused for want of room");
    }
    assert_eq!(c.len(), (2, 11), "the attacker keeps only its own 10");
    assert!(c.first_use(b"victim", "k", "v-2", 400, 100), "another caller's proof is accepted");
    assert!(!c.first_use(b"victim", "k", "v-1", 400, 100), "and its earlier proof is still remembered");
    assert!(c.first_use(b"attacker", "k", "a-0", 400, 100), "the attacker's flood only shortened its own memory");
}

#[test]
fn many_callers_evict_the_one_over_its_share_not_a_small_one() {
    let limits = ReplayLimits {
        max_bytes: 100 * ReplayCache::ENTRY_BYTES + 30 * ReplayCache::CALLER_BYTES,
        max_per_caller: 1000,
    };
    let c = ReplayCache::new(limits);
    for v in 0..3 {
        assert!(c.first_use(format!("victim-{v}").as_bytes(), "k", "v", 400, 100));
    }
    // Twenty attackers, each flooding from its own tokens, far past the whole bound.
    for i in 0..2000 {
        let who = format!("attacker-{}", i % 20);
        assert!(c.first_use(who.as_bytes(), "k", &format!("a-{i}"), 400, 100));
    }
    let (callers, entries) = c.len();
    // 100 entries and 30 callers' worth of bytes, with 23 callers: at most 118 entries.
    assert!(callers == 23 && entries <= 118, "{callers} callers, {entries} entries");
    for v in 0..3 {
        assert!(!c.first_use(format!("victim-{v}").as_bytes(), "k", "v", 400, 100), "victim {v} was evicted");
    }
}

#[test]
fn expired_entries_go_as_time_passes_without_a_sweep() {
    let c = ReplayCache::new(ReplayLimits::default());
    for i in 0..500 {
        assert!(c.first_use(
            format!("caller-{}", i % 50).as_bytes(),
            "k",
            &format!("j-{i}"),
            100 + i64::from(i % 7),
            10
        ));
    }
    assert_eq!(c.len(), (50, 500));
    // Each later call forgets a bounded number of expired entries of other callers.
    let mut calls = 0;
    while c.len().0 > 1 {
        assert!(c.first_use(b"late", "k", &format!("l-{calls}"), 200, 107 + 1));
        calls += 1;
        assert!(calls < 500, "expired entries are not forgotten");
    }
    assert!(calls <= 500 / ReplayCache::EXPIRE_PER_CALL + 2, "{calls} calls");
    assert_eq!(c.len(), (1, calls), "only the late caller's live entries are left");
}

#[test]
fn htu_is_compared_after_normalization() {
    let same = [
        ("HTTP://Example.COM:80/a/%7Euser/./b?q=1#f", "http://example.com/a/~user/b"),
        ("https://h:443", "https://h/"),
        ("http://h/a/../b/%2f", "http://h/b/%2F"),
        ("http://h/x/.", "http://h/x/"),
    ];
    for (a, b) in same {
        assert_eq!(normalize_htu(a), normalize_htu(b), "{a} vs {b}");
    }
    let different = [
        ("http://h/a", "https://h/a"),
        ("http://h:8080/a", "http://h/a"),
        ("http://h/a", "http://h/A"),
        ("http://h/a%2Fb", "http://h/a/b"),
    ];
    for (a, b) in different {
        assert_ne!(normalize_htu(a), normalize_htu(b), "{a} vs {b}");
    }
}

#[test]
fn an_htu_escape_is_a_percent_and_two_hex_digits() {
    // The mechanism of a bug the `path` fuzz target found in the gateway's path normalization:
    // `u8::from_str_radix` takes a sign, so `%+a` was read as the escape `%0A`.
    assert_ne!(normalize_htu("http://h/%+a"), normalize_htu("http://h/%0a"));
    assert_eq!(normalize_htu("http://h/%+a"), "http://h/%+a");
    assert_eq!(normalize_htu("http://h/%-1x"), "http://h/%-1x");
}

#[test]
fn server_nonces_change_with_the_window_and_overlap_one_window() {
    let k = NonceKey::new(&[4; 32], 60).unwrap();
    let n0 = k.current(600);
    assert_eq!(k.current(659), n0, "one window");
    assert_ne!(k.current(660), n0);
    assert_eq!(k.accepted(660)[1], n0, "the previous window's is still accepted");
    assert!(!k.accepted(720).contains(&n0), "two windows later it is not");
    assert_eq!(n0.len(), 24);
    assert_ne!(NonceKey::new(&[5; 32], 60).unwrap().current(600), n0, "another key, other nonces");
}
