//! JOSE/JWT parsing and verification (`keygate_core::jose`) against fixed keys: the Ed25519 key
//! of RFC 8037 A.1 and the P-256 key of RFC 7515 A.3.
//!
//! - "raw": any string as a compact JWS, and as a JWK. Nothing panics; a token is accepted only
//!   with a signature the key really made (Ed25519 signs deterministically, so the target signs
//!   the same input and compares; the only P-256 signature known is the RFC's), never with the
//!   other key's algorithm.
//! - "sign": the input's header members and payload are signed with the Ed25519 key; the token
//!   verifies and gives back the payload, and no mutation of it (a character replaced, inserted
//!   or removed) is ever accepted.
//! - "es256": mutations of the RFC 7515 A.3 token. ECDSA signatures are malleable (`s` and
//!   `n - s`), so here only the signed header and payload are held fixed: a token accepted after
//!   a mutation must carry the very same signing input.
#![no_main]

mod common;

use std::sync::LazyLock;

use common::mutate;
use keygate_core::jose::{
    Alg, Claims, PublicJwk, SigningKey, b64url_decode, jwk_thumbprint_json, split, verify, verify_access_token,
};
use libfuzzer_sys::fuzz_target;

/// RFC 8037 A.1.
const ED25519_SEED: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
/// RFC 7515 A.3.
const ES256_JWK: &str = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
const ES256_SIGNING_INPUT: &str = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
const ES256_SIGNATURE: &str = "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";

static ED25519: LazyLock<SigningKey> = LazyLock::new(|| {
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(&b64url_decode(ED25519_SEED).expect("seed"));
    SigningKey::from_pkcs8(Alg::EdDSA, &der, "").expect("RFC 8037 key")
});
static ES256: LazyLock<PublicJwk> = LazyLock::new(|| PublicJwk::from_json(ES256_JWK).expect("RFC 7515 key"));

/// Everything a verifier does with an untrusted string.
fn check_raw(token: &str) {
    if let Ok(jws) = split(token) {
        assert!(token.len() <= keygate_core::jose::MAX_TOKEN_LEN);
        assert_eq!(token.split('.').count(), 3);
        let _ = jws.header().typ_is("at+jwt");
    }
    let ed = ED25519.public_jwk();
    if let Ok(v) = verify(token, ed, Alg::EdDSA) {
        let (signing_input, sig) = token.rsplit_once('.').expect("three segments");
        let ours = ED25519.sign_raw(signing_input.as_bytes()).expect("signing");
        assert_eq!(
            b64url_decode(sig).expect("base64url"),
            ours,
            "{token:?} accepted with a signature the key never made"
        );
        let _ = v.claims::<Claims>();
        let _ = v.claims::<serde_json::Value>();
    }
    if verify(token, &ES256, Alg::ES256).is_ok() {
        let (signing_input, _) = token.rsplit_once('.').expect("three segments");
        assert_eq!(signing_input, ES256_SIGNING_INPUT, "{token:?} accepted by the RFC 7515 key");
    }
    // No algorithm confusion: a key is used only for its own algorithm.
    assert!(verify(token, ed, Alg::ES256).is_err());
    assert!(verify(token, &ES256, Alg::EdDSA).is_err());
    if verify_access_token(token, ed, Alg::EdDSA, 1_700_000_000, 30, "https://issuer.example", "api").is_ok() {
        assert!(verify(token, ed, Alg::EdDSA).is_ok());
    }
}

fn check_jwk(json: &str) {
    if let Ok(jwk) = PublicJwk::from_json(json) {
        let again = PublicJwk::from_json(&jwk.to_json()).expect("a JWK's own JSON parses");
        assert!(again == jwk, "JWK round trip");
        assert_eq!(again.thumbprint(), jwk.thumbprint());
        assert_eq!(jwk_thumbprint_json(json).ok(), Some(jwk.thumbprint()));
    }
}

fn sign_and_mutate(rest: &[u8]) {
    let mut parts = rest.splitn(3, |b| *b == 0xff);
    let (Some(header), Some(payload), edits) = (parts.next(), parts.next(), parts.next().unwrap_or_default()) else {
        return;
    };
    let header: serde_json::Value = serde_json::from_slice(header).unwrap_or(serde_json::Value::Null);
    let Ok(token) = ED25519.sign_payload(&header, payload) else { return };
    check_raw(&token);
    // Whatever the verifier's header parsing lets through (it refuses, by design, what the
    // signer may still write: an empty payload, a `typ` that is not a string, an invalid `jwk`,
    // a token over the size limit), a signature the key made verifies.
    if split(&token).is_ok() {
        let v = verify(&token, ED25519.public_jwk(), Alg::EdDSA).expect("a token the key signed verifies");
        assert_eq!(v.payload, payload);
    }
    if let Some(m) = mutate(&token, edits) {
        check_raw(&m);
        assert!(verify(&m, ED25519.public_jwk(), Alg::EdDSA).is_err(), "a mutated token verified: {m:?}");
    }
}

fn es256_mutate(edits: &[u8]) {
    let token = format!("{ES256_SIGNING_INPUT}.{ES256_SIGNATURE}");
    assert!(verify(&token, &ES256, Alg::ES256).is_ok());
    if let Some(m) = mutate(&token, edits) {
        // check_raw holds accepted tokens to the RFC's signing input.
        check_raw(&m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                check_raw(s);
                check_jwk(s);
            }
        }
        1 => sign_and_mutate(rest),
        _ => es256_mutate(rest),
    }
});
