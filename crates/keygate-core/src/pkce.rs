//! PKCE (RFC 7636) with the `S256` method only (`plain` is not offered).
//!
//! # Error codes
//! All [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput):
//! - `invalid_code_verifier`: the verifier is not 43–128 characters of `[A-Za-z0-9-._~]` (OAuth
//!   `invalid_grant`);
//! - `invalid_code_challenge`: the challenge is not 43 characters of base64url, or the method is
//!   not `S256` (OAuth `invalid_request`);
//! - `pkce_mismatch`: the verifier does not hash to the challenge (OAuth `invalid_grant`).

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::jose;

pub const INVALID_CODE_VERIFIER: &str = "invalid_code_verifier";
pub const INVALID_CODE_CHALLENGE: &str = "invalid_code_challenge";
pub const PKCE_MISMATCH: &str = "pkce_mismatch";

/// The only supported `code_challenge_method`.
pub const S256: &str = "S256";
pub const MIN_VERIFIER_LEN: usize = 43;
pub const MAX_VERIFIER_LEN: usize = 128;
/// base64url of a SHA-256 digest.
pub const CHALLENGE_LEN: usize = 43;

/// Checks the verifier's format (RFC 7636 §4.1): 43–128 unreserved characters.
pub fn check_verifier(verifier: &str) -> Result<()> {
    let ok = (MIN_VERIFIER_LEN..=MAX_VERIFIER_LEN).contains(&verifier.len())
        && verifier.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(INVALID_CODE_VERIFIER, "code_verifier must be 43 to 128 characters of [A-Za-z0-9-._~]"))
    }
}

/// Checks a client's challenge and method at the authorization request: method `S256` and 43
/// characters of base64url.
pub fn check_challenge(challenge: &str, method: &str) -> Result<()> {
    if method != S256 {
        return Err(Error::invalid(INVALID_CODE_CHALLENGE, "code_challenge_method must be S256"));
    }
    let ok = challenge.len() == CHALLENGE_LEN && jose::b64url_decode(challenge).is_ok_and(|d| d.len() == 32);
    if ok { Ok(()) } else { Err(Error::invalid(INVALID_CODE_CHALLENGE, "code_challenge must be an S256 challenge")) }
}

/// The S256 challenge of a verifier: base64url(SHA-256(ASCII(verifier))).
pub fn s256_challenge(verifier: &str) -> String {
    jose::sha256_b64url(verifier.as_bytes())
}

/// At the token endpoint: the verifier's format, then its challenge against the stored one
/// (constant time).
pub fn verify_s256(verifier: &str, challenge: &str) -> Result<()> {
    check_verifier(verifier)?;
    let computed = s256_challenge(verifier);
    if bool::from(computed.as_bytes().ct_eq(challenge.as_bytes())) {
        Ok(())
    } else {
        Err(Error::invalid(PKCE_MISMATCH, "the code_verifier does not match the code_challenge"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTORS: &str = include_str!("../../../tests/vectors/pkce.json");

    #[test]
    fn rfc7636_appendix_b() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let verifier = v["code_verifier"].as_str().unwrap();
        let challenge = v["code_challenge"].as_str().unwrap();
        assert_eq!(v["code_challenge_method"], S256);
        assert_eq!(s256_challenge(verifier), challenge);
        check_challenge(challenge, S256).unwrap();
        verify_s256(verifier, challenge).unwrap();
    }

    #[test]
    fn mismatch_and_formats() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let challenge = v["code_challenge"].as_str().unwrap();
        let other = "a".repeat(43);
        assert_eq!(verify_s256(&other, challenge).unwrap_err().code, PKCE_MISMATCH);
        assert_eq!(verify_s256(&"a".repeat(42), challenge).unwrap_err().code, INVALID_CODE_VERIFIER);
        assert_eq!(check_verifier(&"a".repeat(129)).unwrap_err().code, INVALID_CODE_VERIFIER);
        check_verifier(&"a".repeat(128)).unwrap();
        check_verifier("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ-._~0123").unwrap();
        assert_eq!(check_verifier(&format!("{}+", "a".repeat(43))).unwrap_err().code, INVALID_CODE_VERIFIER);
        assert_eq!(check_verifier(&format!("{} ", "a".repeat(43))).unwrap_err().code, INVALID_CODE_VERIFIER);
        assert_eq!(check_verifier(&format!("{}é", "a".repeat(43))).unwrap_err().code, INVALID_CODE_VERIFIER);
        assert_eq!(check_challenge(challenge, "plain").unwrap_err().code, INVALID_CODE_CHALLENGE);
        assert_eq!(check_challenge(&format!("{challenge}="), S256).unwrap_err().code, INVALID_CODE_CHALLENGE);
        assert_eq!(check_challenge(&challenge.replace('-', "+"), S256).unwrap_err().code, INVALID_CODE_CHALLENGE);
        assert_eq!(jose::oauth_error(PKCE_MISMATCH), "invalid_grant");
    }
}
