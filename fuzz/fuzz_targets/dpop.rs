//! DPoP proofs (`keygate_core::dpop::verify_proof`, RFC 9449 §4.3) checked against one fixed
//! request: the RFC's protected-resource request (`GET https://resource.example.org/protectedresource`
//! at its `iat`, with its access token), with and without a required nonce and a key binding.
//!
//! - "raw": any string as a proof.
//! - "sign": the input's header members and claims are signed with a fixed Ed25519 key whose
//!   JWK goes in the header (as a client does), so the fuzzer reaches the claim checks; then
//!   mutations of the signed proof, none of which may verify.
//!
//! Whatever is accepted must satisfy every check of RFC 9449 §4.3: the method, the normalized
//! URL, `iat` within the window, the `ath` of the access token, the nonce, the bound key; and
//! the replay window it returns must cover "now".
#![no_main]

mod common;

use std::sync::LazyLock;

use keygate_core::dpop::{DPOP_TYP, MAX_JTI_LEN, ProofCheck, ath, normalize_htu, verify_proof};
use keygate_core::jose::{Alg, SigningKey, b64url_decode, split};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

const METHOD: &str = "GET";
const URI: &str = "https://resource.example.org/protectedresource";
const NOW: i64 = 1_562_262_618;
const ACCESS_TOKEN: &str = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
/// The RFC 9449 examples' key, the one a raw seed proof can carry.
const RFC_JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
/// RFC 8037 A.1's seed, as the client key of "sign".
const SEED: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
const NONCES: [&str; 2] = ["n-current", "n-previous"];

/// The claims the checks are about.
#[derive(Deserialize)]
struct Checked {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    ath: Option<String>,
    nonce: Option<String>,
}

static KEY: LazyLock<SigningKey> = LazyLock::new(|| {
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(&b64url_decode(SEED).expect("seed"));
    SigningKey::from_pkcs8(Alg::EdDSA, &der, "").expect("RFC 8037 key")
});

/// The check contexts a proof is tried against; `flags` picks which.
fn checks(flags: u8) -> Vec<ProofCheck<'static>> {
    let base = ProofCheck {
        method: METHOD,
        uri: URI,
        now: NOW,
        max_age: 60,
        leeway: 5,
        access_token: None,
        expected_jkt: None,
        nonces: &[],
    };
    let ours: &'static str = Box::leak(KEY.public_jwk().thumbprint().into_boxed_str());
    vec![
        base,
        ProofCheck { access_token: Some(ACCESS_TOKEN), ..base },
        ProofCheck { nonces: &NONCES, ..base },
        ProofCheck { expected_jkt: Some(if flags & 1 == 0 { ours } else { RFC_JKT }), ..base },
    ]
}

static CHECKS: LazyLock<[Vec<ProofCheck<'static>>; 2]> = LazyLock::new(|| [checks(0), checks(1)]);

fn check_proof(proof: &str, flags: u8) {
    for check in &CHECKS[usize::from(flags & 1)] {
        let Ok(v) = verify_proof(proof, check) else { continue };
        let jws = split(proof).expect("an accepted proof splits");
        let header = jws.header();
        assert_eq!(header.typ.as_deref(), Some(DPOP_TYP));
        let jwk = header.jwk.as_ref().expect("an accepted proof carries its key");
        assert_eq!(v.jkt, jwk.thumbprint());
        if let Some(jkt) = check.expected_jkt {
            assert_eq!(v.jkt, jkt, "a proof by another key than the bound one");
        }
        let payload = b64url_decode(jws.payload_b64()).expect("payload");
        // Read as the verifier reads them: members it does not know are skipped unchecked.
        let claims: Checked = serde_json::from_slice(&payload).expect("claims");
        assert_eq!(claims.htm.as_deref(), Some(check.method));
        let htu = claims.htu.expect("htu");
        assert_eq!(normalize_htu(&htu), normalize_htu(check.uri), "htu {htu:?}");
        assert_eq!(claims.jti.as_deref(), Some(v.jti.as_str()));
        assert!(!v.jti.is_empty() && v.jti.len() <= MAX_JTI_LEN);
        assert!(v.iat >= check.now - i64::from(check.max_age) && v.iat <= check.now + i64::from(check.leeway));
        assert!(v.replay_until >= check.now, "the replay window ends before now");
        if let Some(token) = check.access_token {
            assert_eq!(claims.ath, Some(ath(token)));
        }
        if !check.nonces.is_empty() {
            let nonce = claims.nonce.expect("nonce");
            assert!(check.nonces.contains(&nonce.as_str()));
        }
    }
}

fn sign_and_mutate(flags: u8, rest: &[u8]) {
    let mut parts = rest.splitn(3, |b| *b == 0xff);
    let (Some(header), Some(claims), edits) = (parts.next(), parts.next(), parts.next().unwrap_or_default()) else {
        return;
    };
    let mut header = match serde_json::from_slice::<Value>(header) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    // As a client builds its proof, unless the input says otherwise.
    if flags & 2 == 0 {
        header.insert("typ".into(), DPOP_TYP.into());
    }
    if flags & 4 == 0 {
        let jwk: Value = serde_json::from_str(&KEY.public_jwk().to_json()).expect("JWK JSON");
        header.insert("jwk".into(), jwk);
    }
    let Ok(proof) = KEY.sign_payload(&Value::Object(header), claims) else { return };
    check_proof(&proof, flags);
    if let Some(m) = common::mutate(&proof, edits) {
        check_proof(&m, flags);
        for check in &CHECKS[0] {
            let mutated = verify_proof(&m, check);
            // Only a proof with a key of its own can verify, and this target holds none but
            // the RFC's and its own.
            if let Ok(v) = mutated {
                assert_ne!(v.jkt, KEY.public_jwk().thumbprint(), "a mutated proof verified: {m:?}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 0x80 == 0 {
        if let Ok(s) = std::str::from_utf8(rest) {
            check_proof(s, mode);
            // The URL normalization both sides of the htu comparison go through.
            let n = normalize_htu(s);
            let _ = normalize_htu(&n);
        }
    } else {
        sign_and_mutate(mode, rest);
    }
});
