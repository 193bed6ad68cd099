//! The token format: `<prefix>_<public id><secret><checksum>`.
//!
//! | part      | length | content                                                        |
//! |-----------|--------|----------------------------------------------------------------|
//! | prefix    | 2–12   | `[a-z][a-z0-9]*`, configurable, `kg` by default                 |
//! | `_`       | 1      | separator                                                      |
//! | public id | 12     | base62, ~71 random bits; names the token in lists and logs      |
//! | secret    | 43     | base62, ~256 random bits from the OS CSPRNG                     |
//! | checksum  | 6      | CRC-32 (IEEE, as zlib) of everything before it, base62, 0-padded |
//!
//! The alphabet is `0-9A-Za-z`, so a double-click selects the whole token, and the checksum lets
//! a scanner or the gateway reject a mistyped or made-up token without any lookup. The layout and
//! vectors are documented in `docs/token-format.md`.

use crate::error::{Error, Result};
use crate::secret::{Randomness, TokenSecret};

/// The base62 alphabet, in the order GitHub's token format uses.
pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const PUBLIC_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = 6;
/// Length of everything after the `_`.
pub const BODY_LEN: usize = PUBLIC_ID_LEN + SECRET_LEN + CHECKSUM_LEN;
pub const DEFAULT_PREFIX: &str = "kg";
/// The longest prefix a token can have (root-key prefixes included).
const MAX_PREFIX_LEN: usize = 12;
/// The longest prefix a server may be configured to issue: its root-key prefix (`<prefix>root`)
/// must still fit in [`MAX_PREFIX_LEN`].
pub const MAX_ISSUING_PREFIX_LEN: usize = MAX_PREFIX_LEN - 4;

/// A validated token prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPrefix(String);

impl TokenPrefix {
    pub fn new(p: &str) -> Result<Self> {
        let mut chars = p.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !first_ok || !rest_ok || p.len() < 2 || p.len() > MAX_PREFIX_LEN {
            return Err(Error::invalid(
                "invalid_token_prefix",
                format!(
                    "a token prefix is 2 to {MAX_PREFIX_LEN} lowercase letters and digits, starting with a letter (got {p:?})"
                ),
            ));
        }
        Ok(Self(p.to_owned()))
    }
    /// Validates a prefix to issue tokens with: as [`TokenPrefix::new`], and at most
    /// [`MAX_ISSUING_PREFIX_LEN`] characters so that its root-key prefix is valid too.
    pub fn for_issuing(p: &str) -> Result<Self> {
        let prefix = Self::new(p)?;
        if p.len() > MAX_ISSUING_PREFIX_LEN {
            return Err(Error::invalid(
                "invalid_token_prefix",
                format!(
                    "a token prefix is at most {MAX_ISSUING_PREFIX_LEN} characters, so that root keys (<prefix>root) fit too"
                ),
            ));
        }
        Ok(prefix)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The prefix of root keys (admin credentials) that go with this token prefix.
    pub fn root_key_prefix(&self) -> Self {
        Self(format!("{}root", self.0))
    }
}

impl Default for TokenPrefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.to_owned())
    }
}

/// Why a string is not a well-formed token. All of these are decided without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    WrongPrefix,
    WrongLength,
    BadCharacter,
    BadChecksum,
}

impl FormatError {
    pub fn describe(self) -> &'static str {
        match self {
            Self::WrongPrefix => "the token does not start with this server's prefix",
            Self::WrongLength => "the token has the wrong length",
            Self::BadCharacter => "the token contains characters other than letters and digits",
            Self::BadChecksum => "the token's checksum does not match: it was mistyped or truncated",
        }
    }
}

/// A token whose prefix, length, alphabet and checksum are right. It may still be unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub prefix: &'a str,
    pub public_id: &'a str,
    /// The last four characters, shown in lists beside the public id.
    pub last4: &'a str,
}

/// A newly minted token: the secret to hand out once, and its public parts.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub secret: TokenSecret,
    pub public_id: String,
    pub last4: String,
}

/// Encodes `n` in base62, left-padded with `0` to `width` characters.
pub fn base62_fixed(mut n: u64, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        let digit = usize::try_from(n % 62).unwrap_or(0);
        *slot = ALPHABET.get(digit).copied().unwrap_or(b'0');
        n /= 62;
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The 6-character checksum of `data`: CRC-32 (the IEEE polynomial, as zlib's `crc32`) in base62.
pub fn checksum(data: &[u8]) -> String {
    String::from_utf8(checksum_bytes(data).to_vec()).unwrap_or_default()
}

/// [`checksum`] without allocating: the verify path runs it for every request.
fn checksum_bytes(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET.get((n % 62) as usize).copied().unwrap_or(b'0');
        n /= 62;
    }
    out
}

/// 1 for the bytes of the base62 alphabet, 0 for every other byte.
const IS_BASE62: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 62 {
        t[ALPHABET[i] as usize] = 1;
        i += 1;
    }
    t
};

/// Whether every byte is in the alphabet. No early exit: on random input the branchy version
/// mispredicts, and this runs for every request.
fn all_base62(bytes: &[u8]) -> bool {
    bytes.iter().fold(1u8, |ok, b| ok & IS_BASE62[usize::from(*b)]) == 1
}

/// `len` characters drawn uniformly from the base62 alphabet (rejection sampling, so no bias).
pub fn random_base62(rng: &dyn Randomness, len: usize) -> Result<String> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf)?;
        for b in buf {
            // 248 = 4 * 62: bytes at or above it would favour the first characters.
            if b < 248 {
                let c = ALPHABET.get(usize::from(b % 62)).copied().unwrap_or(b'0');
                out.push(char::from(c));
                if out.len() == len {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// Mints a token with `prefix`.
pub fn mint(prefix: &TokenPrefix, rng: &dyn Randomness) -> Result<MintedToken> {
    let public_id = random_base62(rng, PUBLIC_ID_LEN)?;
    let secret = random_base62(rng, SECRET_LEN)?;
    let mut token = format!("{}_{public_id}{secret}", prefix.as_str());
    let sum = checksum(token.as_bytes());
    token.push_str(&sum);
    let last4 = sum.get(CHECKSUM_LEN - 4..).unwrap_or_default().to_owned();
    Ok(MintedToken { secret: TokenSecret::new(token), public_id, last4 })
}

/// Checks a presented token against `prefix` with no lookup.
pub fn parse<'a>(token: &'a str, prefix: &TokenPrefix) -> Result<ParsedToken<'a>, FormatError> {
    let p = prefix.as_str();
    let body = token.strip_prefix(p).and_then(|rest| rest.strip_prefix('_')).ok_or(FormatError::WrongPrefix)?;
    parse_body(token, p.len(), body)
}

/// Like [`parse`] for a token of any well-formed prefix (used by the scanner).
pub fn parse_any(token: &str) -> Result<ParsedToken<'_>, FormatError> {
    let (p, body) = token.split_once('_').ok_or(FormatError::WrongPrefix)?;
    TokenPrefix::new(p).map_err(|_| FormatError::WrongPrefix)?;
    parse_body(token, p.len(), body)
}

fn parse_body<'a>(token: &'a str, prefix_len: usize, body: &'a str) -> Result<ParsedToken<'a>, FormatError> {
    if body.len() != BODY_LEN {
        return Err(FormatError::WrongLength);
    }
    if !all_base62(body.as_bytes()) {
        return Err(FormatError::BadCharacter);
    }
    // All ASCII from here on, so byte offsets are character boundaries.
    let split = token.len() - CHECKSUM_LEN;
    let (signed, sum) =
        (token.as_bytes().get(..split).unwrap_or_default(), token.as_bytes().get(split..).unwrap_or_default());
    if checksum_bytes(signed) != sum {
        return Err(FormatError::BadChecksum);
    }
    Ok(ParsedToken {
        prefix: token.get(..prefix_len).unwrap_or_default(),
        public_id: body.get(..PUBLIC_ID_LEN).unwrap_or_default(),
        last4: token.get(token.len() - 4..).unwrap_or_default(),
    })
}

/// A deterministic [`Randomness`] for tests and vectors (not for secrets).
#[derive(Debug)]
pub struct SeededRandom(parking_lot::Mutex<u64>);

impl SeededRandom {
    pub fn new(seed: u64) -> Self {
        Self(parking_lot::Mutex::new(seed))
    }
}

impl Randomness for SeededRandom {
    fn fill(&self, dest: &mut [u8]) -> Result<()> {
        let mut s = self.0.lock();
        for b in dest {
            // splitmix64
            *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            *b = (z ^ (z >> 31)) as u8;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::OsRandom;

    #[test]
    fn github_vector_checks_our_crc_and_base62() {
        // ../shared/vectors/checksum-token-format.json: the checksum of a GitHub token is the
        // base62 CRC-32 of its 30 random characters, the same primitive our format uses.
        let valid = "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";
        let body = valid.strip_prefix("ghp_").unwrap();
        assert_eq!(checksum(&body.as_bytes()[..30]), &body[30..]);
        let failing = "gho_16C7e42F292c6912E7710c838347Ae178B4a";
        let body = failing.strip_prefix("gho_").unwrap();
        assert_eq!(checksum(&body.as_bytes()[..30]), "4H2Y7G");
        assert_ne!(&body[30..], "4H2Y7G");
    }

    #[test]
    fn minted_tokens_parse_and_have_the_documented_layout() {
        let prefix = TokenPrefix::default();
        let t = mint(&prefix, &OsRandom).unwrap();
        let s = t.secret.expose();
        assert_eq!(s.len(), 3 + BODY_LEN);
        assert!(s.starts_with("kg_"));
        let parsed = parse(s, &prefix).unwrap();
        assert_eq!(parsed.public_id, t.public_id);
        assert_eq!(parsed.last4, t.last4);
        assert_eq!(parse_any(s).unwrap(), parsed);
    }

    #[test]
    fn malformed_tokens_are_refused_without_lookup() {
        let prefix = TokenPrefix::default();
        let t = mint(&prefix, &OsRandom).unwrap();
        let s = t.secret.expose();
        assert_eq!(parse(s, &TokenPrefix::new("acme").unwrap()), Err(FormatError::WrongPrefix));
        assert_eq!(parse(&s[..s.len() - 1], &prefix), Err(FormatError::WrongLength));
        let mut bad = s.to_owned();
        bad.replace_range(10..11, "-");
        assert_eq!(parse(&bad, &prefix), Err(FormatError::BadCharacter));
        // Change one character of the secret: the checksum catches it.
        let mut typo = s.as_bytes().to_vec();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(parse(&typo, &prefix), Err(FormatError::BadChecksum));
        assert_eq!(parse("", &prefix), Err(FormatError::WrongPrefix));
        assert_eq!(parse("kg_", &prefix), Err(FormatError::WrongLength));
        assert_eq!(parse("kg_ééééé", &prefix), Err(FormatError::WrongLength));
    }

    #[test]
    fn deterministic_vector() {
        // The vector printed in docs/token-format.md; its checksum is also checked against
        // Python's zlib.crc32 by tests/token_vectors.py.
        let t = mint(&TokenPrefix::default(), &SeededRandom::new(42)).unwrap();
        assert_eq!(t.secret.expose(), VECTOR_TOKEN);
        assert_eq!(t.public_id, &VECTOR_TOKEN[3..15]);
    }

    const VECTOR_TOKEN: &str = "kg_P3KOu6VeRo544tMM3eGTuk2XlGyRZ89LSw2SNDrMUtvCHSy10aSXay50PBaG4";

    #[test]
    fn prefixes_are_validated() {
        assert!(TokenPrefix::new("kg").is_ok());
        assert!(TokenPrefix::new("acme2").is_ok());
        for bad in ["", "k", "Kg", "1kg", "k_g", "kg-", "abcdefghijklmnopq"] {
            assert!(TokenPrefix::new(bad).is_err(), "{bad}");
        }
        assert_eq!(TokenPrefix::default().root_key_prefix().as_str(), "kgroot");
        assert!(TokenPrefix::for_issuing("abcdefgh").is_ok());
        assert!(TokenPrefix::for_issuing("abcdefghi").is_err());
        let longest = TokenPrefix::for_issuing("abcdefgh").unwrap().root_key_prefix();
        assert!(TokenPrefix::new(longest.as_str()).is_ok(), "its root-key prefix is valid");
    }

    #[test]
    fn base62_is_uniform_enough_and_alphanumeric() {
        let s = random_base62(&SeededRandom::new(1), 62 * 200).unwrap();
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()));
        for c in ALPHABET {
            let n = s.bytes().filter(|b| b == c).count();
            assert!((100..=300).contains(&n), "{} appeared {n} times", *c as char);
        }
    }
}
