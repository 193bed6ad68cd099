//! Secrets and their handling: the server-side [`Pepper`], the [`TokenSecret`] shown once, the
//! keyed [`SecretHash`] that is all a store ever keeps, and the [`Randomness`] they are drawn from.
//!
//! Secrets have redacted `Debug` impls and are compared in constant time.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Where secret bytes come from. Production uses [`OsRandom`]; tests may pass a seeded source.
pub trait Randomness: Send + Sync {
    fn fill(&self, dest: &mut [u8]) -> Result<()>;
}

/// The operating system's CSPRNG (`getrandom(2)` on Linux).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl Randomness for OsRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<()> {
        getrandom::fill(dest).map_err(|e| Error::internal(format!("the OS random source failed: {e}")))
    }
}

/// The server-side HMAC key. It never lives in the database, so a copied database cannot be used
/// to test guesses of tokens.
#[derive(Clone)]
pub struct Pepper {
    /// HMAC state with the key already absorbed: each hash skips re-deriving the pads.
    mac: Hmac<Sha256>,
}

/// The smallest pepper accepted, in bytes.
pub const MIN_PEPPER_LEN: usize = 32;

impl Pepper {
    pub fn new(key: &[u8]) -> Result<Self> {
        if key.len() < MIN_PEPPER_LEN {
            return Err(Error::invalid(
                "pepper_too_short",
                format!(
                    "the pepper must be at least {MIN_PEPPER_LEN} bytes; generate one with `head -c 32 /dev/urandom | base64`"
                ),
            ));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Error::internal("HMAC rejected the pepper"))?;
        Ok(Self { mac })
    }

    /// Draws a fresh 32-byte pepper from `rng`.
    pub fn generate_bytes(rng: &dyn Randomness) -> Result<[u8; 32]> {
        let mut key = [0u8; 32];
        rng.fill(&mut key)?;
        Ok(key)
    }

    /// HMAC-SHA256(pepper, secret): the only form in which a token or root key is stored.
    pub fn hash(&self, secret: &str) -> SecretHash {
        let mut mac = self.mac.clone();
        mac.update(secret.as_bytes());
        SecretHash(mac.finalize().into_bytes().into())
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(<redacted>)")
    }
}

/// A keyed hash of a secret. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(Self)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for SecretHash {
    fn eq(&self, other: &Self) -> bool {
        // Word by word: as constant-time as byte by byte, in an eighth of the steps.
        let (a, _) = self.0.as_chunks::<8>();
        let (b, _) = other.0.as_chunks::<8>();
        a.iter()
            .zip(b)
            .fold(subtle::Choice::from(1), |all, (x, y)| all & u64::from_ne_bytes(*x).ct_eq(&u64::from_ne_bytes(*y)))
            .into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

/// A whole token or root key as handed to its owner, once. `Debug` and `Display` never show it;
/// call [`TokenSecret::expose`] where it must be written out (the create answer, the CLI).
#[derive(Clone)]
pub struct TokenSecret(String);

impl TokenSecret {
    pub fn new(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

impl PartialEq for TokenSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_agrees_with_python_hmac() {
        // The expected value comes from an independent implementation:
        // python3 -c "import hmac;print(hmac.new(b'k'*32, b'kg_example', 'sha256').hexdigest())"
        assert!(Pepper::new(b"Jefe").is_err());
        let p = Pepper::new(&[b'k'; 32]).unwrap();
        let h = p.hash("kg_example");
        let hex: String = h.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "89b2bf69497f91d82f1f863892dc94bd258836d428c72c7a7b73618ee66e132c");
    }

    #[test]
    fn hashes_differing_in_any_byte_are_unequal() {
        let a = SecretHash([0x5a; 32]);
        assert_eq!(a, SecretHash([0x5a; 32]));
        for i in 0..32 {
            for bit in [0x01, 0x80] {
                let mut b = a;
                b.0[i] ^= bit;
                assert_ne!(a, b, "byte {i}, bit {bit:#x}");
            }
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let s = TokenSecret::new("kg_supersecret".into());
        assert_eq!(format!("{s:?}"), "TokenSecret(<redacted>)");
        let p = Pepper::new(&[7; 32]).unwrap();
        assert!(!format!("{p:?}").contains('7'));
        assert_eq!(format!("{:?}", p.hash("x")), "SecretHash(<redacted>)");
    }

    #[test]
    fn os_random_fills() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        OsRandom.fill(&mut a).unwrap();
        OsRandom.fill(&mut b).unwrap();
        assert_ne!(a, b);
    }
}
