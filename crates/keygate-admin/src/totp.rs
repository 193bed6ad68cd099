//! One-time passwords for dashboard sign-in: HOTP (RFC 4226) and TOTP (RFC 6238), the
//! `otpauth://` enrolment URI that authenticator apps read from a QR code, and base32 (RFC 4648)
//! for the secret. keygate issues SHA-1, 6 digits, 30 s steps: what every authenticator app
//! accepts. The other hashes exist for the RFC vectors.

use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

/// Seconds per TOTP step.
pub const STEP_SECONDS: i64 = 30;
/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Steps accepted either side of now, for clock drift between phone and server.
pub const DRIFT_STEPS: i64 = 1;
/// Bytes of a generated secret (160 bits, RFC 4226's recommendation).
pub const SECRET_BYTES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Sha256,
    Sha512,
}

fn mac(alg: Algorithm, key: &[u8], msg: &[u8]) -> Vec<u8> {
    fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], msg: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        match <M as hmac::digest::KeyInit>::new_from_slice(key) {
            Ok(mut m) => {
                m.update(msg);
                m.finalize().into_bytes().to_vec()
            }
            Err(_) => Vec::new(),
        }
    }
    match alg {
        Algorithm::Sha1 => run::<Hmac<sha1::Sha1>>(key, msg),
        Algorithm::Sha256 => run::<Hmac<sha2::Sha256>>(key, msg),
        Algorithm::Sha512 => run::<Hmac<sha2::Sha512>>(key, msg),
    }
}

/// RFC 4226 §5.3: the HOTP value for `counter`.
pub fn hotp(alg: Algorithm, key: &[u8], counter: u64, digits: u32) -> u32 {
    let h = mac(alg, key, &counter.to_be_bytes());
    let Some(last) = h.last() else { return 0 };
    let offset = usize::from(last & 0x0f);
    let Some(b) = h.get(offset..offset + 4) else { return 0 };
    let bin = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
    bin % 10u32.pow(digits)
}

/// The time step of `unix_seconds`.
pub fn step_of(unix_seconds: i64) -> i64 {
    unix_seconds.div_euclid(STEP_SECONDS)
}

/// RFC 6238: the TOTP value at `unix_seconds`, zero-padded to `digits`.
pub fn totp(alg: Algorithm, key: &[u8], unix_seconds: i64, step_seconds: i64, digits: u32) -> String {
    let counter = u64::try_from(unix_seconds.div_euclid(step_seconds)).unwrap_or(0);
    format!("{:0width$}", hotp(alg, key, counter, digits), width = digits as usize)
}

/// Checks a presented 6-digit code against the steps around `unix_seconds`, skipping steps at
/// or before `last_step` (a code is good once). Returns the step that matched. Every candidate
/// is compared in constant time and all are tried, so timing says nothing about which matched.
pub fn verify(key: &[u8], presented: &str, unix_seconds: i64, last_step: i64) -> Option<i64> {
    let presented: String = presented.chars().filter(|c| !c.is_whitespace()).collect();
    if presented.len() != DIGITS as usize || !presented.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_seconds);
    let mut found = None;
    for step in (now - DRIFT_STEPS)..=(now + DRIFT_STEPS) {
        let expected = totp(Algorithm::Sha1, key, step * STEP_SECONDS, STEP_SECONDS, DIGITS);
        let same: bool = expected.as_bytes().ct_eq(presented.as_bytes()).into();
        if same && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 without padding, as authenticator apps expect secrets.
pub fn base32(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            let i = ((buffer >> (bits - 5)) & 31) as usize;
            out.push(char::from(BASE32[i]));
            bits -= 5;
        }
    }
    if bits > 0 {
        let i = ((buffer << (5 - bits)) & 31) as usize;
        out.push(char::from(BASE32[i]));
    }
    out
}

fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The enrolment URI (Google Authenticator's Key Uri Format), shown as a QR code.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        uri_escape(issuer),
        uri_escape(account),
        base32(secret),
        uri_escape(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alg(name: &str) -> Algorithm {
        match name {
            "SHA1" => Algorithm::Sha1,
            "SHA256" => Algorithm::Sha256,
            "SHA512" => Algorithm::Sha512,
            other => panic!("unknown algorithm {other}"),
        }
    }

    /// RFC 6238 Appendix B and RFC 4226 Appendix D, from `tests/vectors/totp.json`.
    #[test]
    fn rfc_vectors() {
        let v: serde_json::Value = serde_json::from_str(include_str!("../../../tests/vectors/totp.json")).unwrap();
        let totps = v["totp"].as_array().unwrap();
        assert!(totps.len() >= 18);
        for t in totps {
            let got = totp(
                alg(t["algorithm"].as_str().unwrap()),
                t["seed_ascii"].as_str().unwrap().as_bytes(),
                t["unix_time"].as_i64().unwrap(),
                t["step_seconds"].as_i64().unwrap(),
                u32::try_from(t["digits"].as_u64().unwrap()).unwrap(),
            );
            assert_eq!(got, t["expected"].as_str().unwrap(), "{t}");
        }
        let hotps = v["hotp"].as_array().unwrap();
        assert_eq!(hotps.len(), 10);
        for h in hotps {
            let got = hotp(
                alg(h["algorithm"].as_str().unwrap()),
                h["seed_ascii"].as_str().unwrap().as_bytes(),
                h["counter"].as_u64().unwrap(),
                u32::try_from(h["digits"].as_u64().unwrap()).unwrap(),
            );
            let expected: u32 = h["expected"].as_str().unwrap().parse().unwrap();
            assert_eq!(got, expected, "{h}");
        }
    }

    #[test]
    fn verify_accepts_one_step_of_drift_and_each_code_once() {
        let key = b"12345678901234567890";
        let now = 1_111_111_111;
        let code = totp(Algorithm::Sha1, key, now, 30, 6);
        let step = verify(key, &code, now, 0).unwrap();
        assert_eq!(step, step_of(now));
        assert_eq!(verify(key, &code, now, step), None, "the same code is refused the second time");
        let previous = totp(Algorithm::Sha1, key, now - 30, 30, 6);
        assert!(verify(key, &previous, now, 0).is_some(), "one step of drift");
        let old = totp(Algorithm::Sha1, key, now - 90, 30, 6);
        assert_eq!(verify(key, &old, now, 0), None, "three steps old");
        assert_eq!(verify(key, "12345", now, 0), None);
        assert_eq!(verify(key, "abcdef", now, 0), None);
        let spaced = format!("{} {}", &code[..3], &code[3..]);
        assert!(verify(key, &spaced, now, 0).is_some(), "spaces as apps show them");
    }

    #[test]
    fn base32_matches_rfc_4648() {
        // RFC 4648 §10, without padding.
        for (input, out) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), out);
        }
        let uri = otpauth_uri("keygate", "ann@example.com", b"12345678901234567890");
        assert_eq!(
            uri,
            "otpauth://totp/keygate:ann@example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=keygate&algorithm=SHA1&digits=6&period=30"
        );
    }
}
