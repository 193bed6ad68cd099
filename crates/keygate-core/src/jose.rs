//! A small, strict JOSE implementation: compact JWS with EdDSA (Ed25519) and ES256 (P-256, raw
//! `r‖s` signatures) only, public JWKs with RFC 7638 thumbprints, signing keys, and RFC 9068
//! access-token claims. The token endpoint signs with it and the gateway verifies with it on every
//! request, so verification decodes the signature onto the stack and keeps keys pre-parsed.
//!
//! What it refuses, on purpose:
//! - any `alg` other than `EdDSA` and `ES256` (`none`, `HS256`, `RS256`, ...), and any `alg` that is
//!   not the one the caller expects for the key it chose (no algorithm confusion);
//! - a `crit` header (we implement no extension), more or fewer than three segments, padded or
//!   non-url-alphabet base64, and tokens longer than [`MAX_TOKEN_LEN`];
//! - DER-encoded ECDSA signatures (JWS uses the fixed 64-byte `r‖s` form).
//!
//! What it never does: fetch or trust `jku`, `x5u` or `x5c`. Those members are ignored; a token
//! verifies only against the key the caller passes. An embedded `jwk` is parsed (strictly,
//! public members only) and exposed for DPoP, never used by [`verify`] itself.
//!
//! # Error codes
//! Every verification failure is [`ErrorKind::Unauthenticated`]; all of them are reported to OAuth
//! clients as `invalid_token` (see [`oauth_error`]), the code tells operators why:
//!
//! | code | meaning |
//! |---|---|
//! | `invalid_token` | malformed: size, segments, base64url, header or payload JSON, `crit`, embedded `jwk` |
//! | `invalid_token_alg` | `alg` unsupported (`none`, `HS256`, ...) or not the one expected for the key |
//! | `invalid_token_signature` | the signature is malformed (not 64 bytes) or does not verify |
//! | `invalid_token_type` | the `typ` header is not the expected one (`at+jwt` for access tokens) |
//! | `invalid_token_claims` | a required claim is missing or has the wrong JSON type |
//! | `token_expired` | `exp` is past (beyond the leeway) |
//! | `token_not_yet_valid` | `nbf` or `iat` is in the future (beyond the leeway) |
//! | `invalid_token_issuer` | `iss` is not the expected issuer |
//! | `invalid_token_audience` | `aud` does not contain the expected audience |
//!
//! Key handling errors are [`ErrorKind::InvalidInput`]: `invalid_jwk` (a JWK that does not parse:
//! wrong `kty`/`crv`, lengths, point not on the curve, private members), `invalid_signing_key` (a
//! PKCS#8 document that is not a key for the algorithm, or reserved header members passed to
//! [`SigningKey::sign`]), and `invalid_base64url` from [`b64url_decode`].

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
    ParsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};

/// The longest compact JWS accepted, in bytes. Our access tokens are well under 1 KiB.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Both supported algorithms produce 64-byte signatures (Ed25519; P-256 `r‖s`).
const SIG_LEN: usize = 64;
/// Coordinates of both key types are 32 bytes.
const COORD_LEN: usize = 32;

/// Malformed token (size, segments, base64url, JSON, `crit`, embedded `jwk`).
pub const INVALID_TOKEN: &str = "invalid_token";
/// Unsupported `alg`, or not the one expected for the key.
pub const INVALID_TOKEN_ALG: &str = "invalid_token_alg";
/// Signature malformed or not valid.
pub const INVALID_TOKEN_SIGNATURE: &str = "invalid_token_signature";
/// Wrong `typ` header.
pub const INVALID_TOKEN_TYPE: &str = "invalid_token_type";
/// A required claim is missing or ill-typed.
pub const INVALID_TOKEN_CLAIMS: &str = "invalid_token_claims";
/// A claim naming the token's subject, id or client holds a control character
/// ([`is_identity_text`]).
pub const INVALID_IDENTITY_CLAIM: &str = "invalid_identity_claim";
/// `exp` is past.
pub const TOKEN_EXPIRED: &str = "token_expired";
/// `nbf` or `iat` is in the future.
pub const TOKEN_NOT_YET_VALID: &str = "token_not_yet_valid";
/// `iss` is not the expected issuer.
pub const INVALID_TOKEN_ISSUER: &str = "invalid_token_issuer";
/// `aud` does not contain the expected audience.
pub const INVALID_TOKEN_AUDIENCE: &str = "invalid_token_audience";
/// A JWK that does not parse or is not acceptable.
pub const INVALID_JWK: &str = "invalid_jwk";
/// A signing key that cannot be imported, or a bad signing request.
pub const INVALID_SIGNING_KEY: &str = "invalid_signing_key";
/// A string that is not strict base64url without padding.
pub const INVALID_BASE64URL: &str = "invalid_base64url";

/// The `typ` of RFC 9068 access tokens.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The OAuth error (RFC 6750 §3.1, RFC 9449 §7.1, RFC 6749 §5.2) that a keygate code from this
/// module, [`crate::dpop`] or [`crate::pkce`] is reported as on the wire.
pub fn oauth_error(code: &str) -> &'static str {
    match code {
        crate::dpop::USE_DPOP_NONCE => "use_dpop_nonce",
        c if c.starts_with("dpop_") || c == crate::dpop::INVALID_DPOP_PROOF => "invalid_dpop_proof",
        crate::pkce::PKCE_MISMATCH | crate::pkce::INVALID_CODE_VERIFIER => "invalid_grant",
        crate::pkce::INVALID_CODE_CHALLENGE => "invalid_request",
        _ => "invalid_token",
    }
}

pub(crate) fn token_err(code: &'static str, message: &'static str) -> Error {
    Error::new(ErrorKind::Unauthenticated, code, message)
}

fn jwk_err(message: &'static str) -> Error {
    Error::invalid(INVALID_JWK, message)
}

fn key_err(message: &'static str) -> Error {
    Error::invalid(INVALID_SIGNING_KEY, message)
}

// ---------------------------------------------------------------------------------------------
// base64url

/// base64url without padding (RFC 7515 §2).
pub fn b64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strict base64url decoding: no padding, no `+`/`/`, no whitespace, no non-zero trailing bits.
/// Error code `invalid_base64url`.
pub fn b64url_decode(s: &str) -> Result<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).map_err(|_| Error::invalid(INVALID_BASE64URL, "not base64url without padding"))
}

/// Decodes exactly `N` bytes onto the stack, or `None`.
fn b64url_decode_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != (N * 4).div_ceil(3) {
        return None;
    }
    // A few spare bytes: the decoder's output-size check is conservative.
    let mut buf = [0u8; 66];
    let out = buf.get_mut(..N + 2)?;
    match URL_SAFE_NO_PAD.decode_slice(s, out) {
        Ok(n) if n == N => out.get(..N)?.try_into().ok(),
        _ => None,
    }
}

/// base64url(SHA-256(bytes)), as used by thumbprints, `ath` and PKCE.
pub(crate) fn sha256_b64url(bytes: &[u8]) -> String {
    b64url_encode(&Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Algorithms

/// The two signature algorithms keygate accepts. Parsing any other name is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum Alg {
    /// Ed25519 (RFC 8037).
    EdDSA,
    /// ECDSA P-256 with SHA-256, signature as raw `r‖s` (RFC 7518 §3.4).
    ES256,
}

impl Alg {
    /// The JOSE name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
        }
    }

    /// Parses a JOSE `alg` name; `invalid_token_alg` for anything but `EdDSA` (also under its
    /// fully-specified name `Ed25519`, RFC 9864 §2.2, which newer clients send) and `ES256`
    /// (exact, case-sensitive, as RFC 7515 says). keygate itself signs as `EdDSA`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "EdDSA" | "Ed25519" => Ok(Alg::EdDSA),
            "ES256" => Ok(Alg::ES256),
            _ => Err(token_err(INVALID_TOKEN_ALG, "unsupported alg: only EdDSA (Ed25519) and ES256 are accepted")),
        }
    }
}

impl FromStr for Alg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Alg::parse(s)
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Alg {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        Alg::parse(&s).map_err(|_| serde::de::Error::custom("unsupported alg"))
    }
}

// ---------------------------------------------------------------------------------------------
// Public keys

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyMaterial {
    Ed25519 { x: [u8; COORD_LEN] },
    P256 { x: [u8; COORD_LEN], y: [u8; COORD_LEN] },
}

/// A public JWK: OKP/Ed25519 (`x`) or EC/P-256 (`x`, `y`), validated and pre-parsed for fast
/// verification. Equality compares the key material only (not `kid`).
#[derive(Clone)]
pub struct PublicJwk {
    material: KeyMaterial,
    kid: Option<String>,
    parsed: ParsedPublicKey,
}

/// The encodings (`y`, sign bit ignored) of the eight small-order points of edwards25519, with the
/// non-canonical ones (`y + p`): 0, 1, the two order-8 `y`, p - 1, p, p + 1 (as libsodium's list).
const ED25519_SMALL_ORDER: [[u8; 32]; 7] = {
    let zero = [0u8; 32];
    let mut one = [0u8; 32];
    one[0] = 1;
    let mut p_minus_1 = [0xffu8; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0x7f;
    let mut p = p_minus_1;
    p[0] = 0xed;
    let mut p_plus_1 = p_minus_1;
    p_plus_1[0] = 0xee;
    [
        zero,
        one,
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0, 0xd5, 0xdf,
            0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05,
        ],
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f, 0x2a, 0x20,
            0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a,
        ],
        p_minus_1,
        p,
        p_plus_1,
    ]
};

fn ed25519_small_order(key: &[u8; 32]) -> bool {
    let mut y = *key;
    y[31] &= 0x7f;
    ED25519_SMALL_ORDER.contains(&y)
}

/// Deserializes any value and records that the member was present (even as `null`).
fn present<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    IgnoredAny::deserialize(d)?;
    Ok(true)
}

/// Whether `json` is (after whitespace) a JSON object. serde's derived structs also accept a JSON
/// array (members by position); JOSE headers, JWKs and claims sets are objects only.
pub(crate) fn is_json_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Deserializes a `T` from a JSON object only (never from an array taken positionally), keeping
/// serde's duplicate-member detection.
struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }
}

struct OptionalObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for OptionalObjectVisitor<T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or null")
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Option<T>, D::Error> {
        d.deserialize_map(ObjectVisitor(PhantomData)).map(Some)
    }
}

/// For a nested member that must be a JSON object (or absent/null).
pub(crate) fn nested_object<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_option(OptionalObjectVisitor(PhantomData))
}

/// The JSON form of a JWK, before validation. Members we do not use are ignored, but every
/// private-key member is detected so that a private key is never accepted as a public one.
#[derive(Deserialize)]
pub(crate) struct RawJwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default, deserialize_with = "present")]
    d: bool,
    #[serde(default, deserialize_with = "present")]
    p: bool,
    #[serde(default, deserialize_with = "present")]
    q: bool,
    #[serde(default, deserialize_with = "present")]
    dp: bool,
    #[serde(default, deserialize_with = "present")]
    dq: bool,
    #[serde(default, deserialize_with = "present")]
    qi: bool,
    #[serde(default, deserialize_with = "present")]
    oth: bool,
    #[serde(default, deserialize_with = "present")]
    k: bool,
}

impl PublicJwk {
    /// Parses a public JWK from JSON, strictly: `kty` `OKP` with `crv` `Ed25519` and a 32-byte `x`,
    /// or `kty` `EC` with `crv` `P-256` and 32-byte `x` and `y` forming a point on the curve. Any
    /// private member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, `k`) is refused, as is an `alg` other
    /// than the key type's and a `use` other than `sig`. Error code `invalid_jwk`.
    pub fn from_json(json: &str) -> Result<Self> {
        if !is_json_object(json.as_bytes()) {
            return Err(jwk_err("the JWK is not a JSON object"));
        }
        let raw: RawJwk = serde_json::from_str(json).map_err(|_| jwk_err("the JWK is not a valid JSON object"))?;
        Self::from_raw(raw).map_err(jwk_err)
    }

    pub(crate) fn from_raw(raw: RawJwk) -> std::result::Result<Self, &'static str> {
        if raw.d || raw.p || raw.q || raw.dp || raw.dq || raw.qi || raw.oth || raw.k {
            return Err("the JWK contains private key members");
        }
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            return Err("the JWK's use is not sig");
        }
        let x = raw.x.as_deref().ok_or("the JWK has no x")?;
        let x = b64url_decode_array::<COORD_LEN>(x).ok_or("the JWK's x is not 32 bytes of base64url")?;
        let mut jwk = match (raw.kty.as_str(), raw.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => {
                if raw.y.is_some() {
                    return Err("an OKP JWK has no y");
                }
                Self::from_ed25519(&x).map_err(|_| "the JWK is not a valid Ed25519 key")?
            }
            ("EC", Some("P-256")) => {
                let y = raw.y.as_deref().ok_or("the JWK has no y")?;
                let y = b64url_decode_array::<COORD_LEN>(y).ok_or("the JWK's y is not 32 bytes of base64url")?;
                Self::from_p256(&x, &y).map_err(|_| "the JWK is not a point on P-256")?
            }
            ("OKP", _) => return Err("unsupported OKP curve: only Ed25519"),
            ("EC", _) => return Err("unsupported EC curve: only P-256"),
            _ => return Err("unsupported kty: only OKP (Ed25519) and EC (P-256)"),
        };
        if let Some(alg) = raw.alg.as_deref()
            && Alg::parse(alg).ok() != Some(jwk.alg())
        {
            return Err("the JWK's alg does not match its key type");
        }
        jwk.kid = raw.kid;
        Ok(jwk)
    }

    /// An Ed25519 public key from its 32 bytes. Small-order points are refused: aws-lc-rs accepts
    /// them, and for such a key one signature verifies for every message. (aws-lc-rs checks only
    /// the length of an Ed25519 key when parsing; a point that does not decode is refused by every
    /// verification instead.)
    pub fn from_ed25519(x: &[u8]) -> Result<Self> {
        let x: [u8; COORD_LEN] = x.try_into().map_err(|_| jwk_err("an Ed25519 key is 32 bytes"))?;
        if ed25519_small_order(&x) {
            return Err(jwk_err("the Ed25519 key is a small-order point"));
        }
        let parsed = ParsedPublicKey::new(&ED25519, x).map_err(|_| jwk_err("not a valid Ed25519 key"))?;
        Ok(Self { material: KeyMaterial::Ed25519 { x }, kid: None, parsed })
    }

    /// A P-256 public key from its affine coordinates (32 bytes each, big-endian); refused unless
    /// the point is on the curve.
    pub fn from_p256(x: &[u8], y: &[u8]) -> Result<Self> {
        let x: [u8; COORD_LEN] = x.try_into().map_err(|_| jwk_err("a P-256 coordinate is 32 bytes"))?;
        let y: [u8; COORD_LEN] = y.try_into().map_err(|_| jwk_err("a P-256 coordinate is 32 bytes"))?;
        let mut point = [0u8; 1 + 2 * COORD_LEN];
        point[0] = 0x04;
        point[1..1 + COORD_LEN].copy_from_slice(&x);
        point[1 + COORD_LEN..].copy_from_slice(&y);
        let parsed =
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).map_err(|_| jwk_err("not a point on P-256"))?;
        Ok(Self { material: KeyMaterial::P256 { x, y }, kid: None, parsed })
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self.material {
            KeyMaterial::Ed25519 { .. } => Alg::EdDSA,
            KeyMaterial::P256 { .. } => Alg::ES256,
        }
    }

    /// The key id, if the JWK had one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The same key with this key id.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// The RFC 7638 thumbprint: base64url(SHA-256) of the required members in lexicographic order
    /// without whitespace. Also the DPoP `jkt`.
    pub fn thumbprint(&self) -> String {
        let mut canonical = String::with_capacity(128);
        match &self.material {
            KeyMaterial::Ed25519 { x } => {
                canonical.push_str(r#"{"crv":"Ed25519","kty":"OKP","x":""#);
                URL_SAFE_NO_PAD.encode_string(x, &mut canonical);
                canonical.push_str(r#""}"#);
            }
            KeyMaterial::P256 { x, y } => {
                canonical.push_str(r#"{"crv":"P-256","kty":"EC","x":""#);
                URL_SAFE_NO_PAD.encode_string(x, &mut canonical);
                canonical.push_str(r#"","y":""#);
                URL_SAFE_NO_PAD.encode_string(y, &mut canonical);
                canonical.push_str(r#""}"#);
            }
        }
        sha256_b64url(canonical.as_bytes())
    }

    /// The JWK as JSON, with `kid` when set, `alg` and `use: "sig"` (for a JWKS document).
    pub fn to_json(&self) -> String {
        // Serializing our own map of strings cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Verifies a raw signature over `message`: 64 bytes, Ed25519 or P-256 `r‖s`. This is the
    /// primitive under [`verify`]; error code `invalid_token_signature`.
    pub fn verify_signature(&self, message: &[u8], sig: &[u8]) -> Result<()> {
        if sig.len() != SIG_LEN {
            return Err(token_err(INVALID_TOKEN_SIGNATURE, "the signature is not 64 bytes"));
        }
        self.parsed
            .verify_sig(message, sig)
            .map_err(|_| token_err(INVALID_TOKEN_SIGNATURE, "the signature does not verify"))
    }
}

impl PartialEq for PublicJwk {
    fn eq(&self, other: &Self) -> bool {
        self.material == other.material
    }
}
impl Eq for PublicJwk {}

impl fmt::Debug for PublicJwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicJwk({}, kid={:?}, jkt={})", self.alg(), self.kid, self.thumbprint())
    }
}

impl Serialize for PublicJwk {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match &self.material {
            KeyMaterial::Ed25519 { x } => {
                map.serialize_entry("kty", "OKP")?;
                map.serialize_entry("crv", "Ed25519")?;
                map.serialize_entry("x", &b64url_encode(x))?;
            }
            KeyMaterial::P256 { x, y } => {
                map.serialize_entry("kty", "EC")?;
                map.serialize_entry("crv", "P-256")?;
                map.serialize_entry("x", &b64url_encode(x))?;
                map.serialize_entry("y", &b64url_encode(y))?;
            }
        }
        if let Some(kid) = &self.kid {
            map.serialize_entry("kid", kid)?;
        }
        map.serialize_entry("alg", self.alg().as_str())?;
        map.serialize_entry("use", "sig")?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for PublicJwk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw: RawJwk = d.deserialize_map(ObjectVisitor(PhantomData))?;
        PublicJwk::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

/// The RFC 7638 thumbprint of any JWK given as JSON (`EC`, `OKP`, `RSA`, `oct`): only the required
/// members, lexicographically ordered, no whitespace. For keys keygate does not otherwise support
/// (RSA) this computes the thumbprint only. Error code `invalid_jwk`.
pub fn jwk_thumbprint_json(jwk_json: &str) -> Result<String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(jwk_json).map_err(|_| jwk_err("the JWK is not a JSON object"))?;
    let kty = map.get("kty").and_then(|v| v.as_str()).ok_or_else(|| jwk_err("the JWK has no kty"))?;
    let members: &[&str] = match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        "RSA" => &["e", "kty", "n"],
        "oct" => &["k", "kty"],
        _ => return Err(jwk_err("unknown kty")),
    };
    let mut canonical = String::from("{");
    for (i, name) in members.iter().enumerate() {
        let value = map.get(*name).and_then(|v| v.as_str()).ok_or_else(|| jwk_err("a required member is missing"))?;
        if i > 0 {
            canonical.push(',');
        }
        // Member names and values as JSON strings (escaping, though base64url never needs it).
        canonical.push_str(&serde_json::Value::from(*name).to_string());
        canonical.push(':');
        canonical.push_str(&serde_json::Value::from(value).to_string());
    }
    canonical.push('}');
    Ok(sha256_b64url(canonical.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Signing keys

enum KeyPairInner {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair),
}

/// A private signing key (Ed25519 or P-256) with its key id. `Debug` never shows the private key.
pub struct SigningKey {
    kid: String,
    inner: KeyPairInner,
    public: PublicJwk,
}

impl SigningKey {
    /// A new key from the OS RNG (via aws-lc-rs).
    pub fn generate(alg: Alg, kid: impl Into<String>) -> Result<Self> {
        let inner = match alg {
            Alg::EdDSA => {
                KeyPairInner::Ed25519(Ed25519KeyPair::generate().map_err(|_| Error::internal("key generation failed"))?)
            }
            Alg::ES256 => KeyPairInner::P256(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| Error::internal("key generation failed"))?,
            ),
        };
        Self::new(inner, kid.into())
    }

    /// Imports an unencrypted PKCS#8 (v1 or v2) private key for `alg`. Error code
    /// `invalid_signing_key` if the document is not such a key.
    pub fn from_pkcs8(alg: Alg, der: &[u8], kid: impl Into<String>) -> Result<Self> {
        let inner = match alg {
            Alg::EdDSA => KeyPairInner::Ed25519(
                Ed25519KeyPair::from_pkcs8(der).map_err(|_| key_err("not a PKCS#8 Ed25519 private key"))?,
            ),
            Alg::ES256 => KeyPairInner::P256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(|_| key_err("not a PKCS#8 P-256 private key"))?,
            ),
        };
        Self::new(inner, kid.into())
    }

    fn new(inner: KeyPairInner, kid: String) -> Result<Self> {
        let public = match &inner {
            KeyPairInner::Ed25519(kp) => PublicJwk::from_ed25519(kp.public_key().as_ref()),
            KeyPairInner::P256(kp) => {
                let point = kp.public_key().as_ref();
                match (point.first(), point.get(1..1 + COORD_LEN), point.get(1 + COORD_LEN..)) {
                    (Some(0x04), Some(x), Some(y)) => PublicJwk::from_p256(x, y),
                    _ => Err(Error::internal("unexpected P-256 public key encoding")),
                }
            }
        }?;
        let public = if kid.is_empty() { public } else { public.with_kid(kid.clone()) };
        Ok(Self { kid, inner, public })
    }

    /// Exports the private key as an unencrypted PKCS#8 v1 document (for the store, which
    /// encrypts it). The caller must not log or keep it longer than needed.
    pub fn to_pkcs8(&self) -> Result<Vec<u8>> {
        let doc = match &self.inner {
            KeyPairInner::Ed25519(kp) => kp.to_pkcs8v1(),
            KeyPairInner::P256(kp) => kp.to_pkcs8v1(),
        }
        .map_err(|_| Error::internal("PKCS#8 export failed"))?;
        Ok(doc.as_ref().to_vec())
    }

    pub fn alg(&self) -> Alg {
        self.public.alg()
    }

    /// The key id put in the `kid` header (omitted when empty).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, with the `kid`, for the JWKS.
    pub fn public_jwk(&self) -> &PublicJwk {
        &self.public
    }

    /// Signs `claims_json` (the JWT claims set, used verbatim as the payload) into a compact JWS.
    /// The header is `{"alg":..., "kid":...}` followed by the members of `header_extra` (a JSON
    /// object such as `{"typ":"at+jwt"}`, or `null`); `header_extra` may not set `alg`, `kid` or
    /// `crit` (`invalid_signing_key`).
    pub fn sign(&self, header_extra: &serde_json::Value, claims_json: &str) -> Result<String> {
        self.sign_payload(header_extra, claims_json.as_bytes())
    }

    /// [`SigningKey::sign`] with a serializable claims set.
    pub fn sign_claims<T: Serialize>(&self, header_extra: &serde_json::Value, claims: &T) -> Result<String> {
        let json = serde_json::to_vec(claims).map_err(|_| Error::internal("claims do not serialize"))?;
        self.sign_payload(header_extra, &json)
    }

    /// [`SigningKey::sign`] for an arbitrary payload (not necessarily JSON).
    pub fn sign_payload(&self, header_extra: &serde_json::Value, payload: &[u8]) -> Result<String> {
        let mut header = String::with_capacity(96);
        header.push_str(r#"{"alg":""#);
        header.push_str(self.alg().as_str());
        header.push('"');
        if !self.kid.is_empty() {
            header.push_str(r#","kid":"#);
            header.push_str(&serde_json::Value::from(self.kid.as_str()).to_string());
        }
        match header_extra {
            serde_json::Value::Null => {}
            serde_json::Value::Object(members) => {
                for (name, value) in members {
                    if matches!(name.as_str(), "alg" | "kid" | "crit") {
                        return Err(key_err("header_extra may not set alg, kid or crit"));
                    }
                    header.push(',');
                    header.push_str(&serde_json::Value::from(name.as_str()).to_string());
                    header.push(':');
                    header.push_str(&value.to_string());
                }
            }
            _ => return Err(key_err("header_extra must be a JSON object")),
        }
        header.push('}');

        let mut out = String::with_capacity(header.len() * 4 / 3 + payload.len() * 4 / 3 + 96);
        URL_SAFE_NO_PAD.encode_string(header.as_bytes(), &mut out);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut out);
        let sig = self.sign_raw(out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut out);
        Ok(out)
    }

    /// A raw 64-byte signature over `message`.
    pub fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>> {
        match &self.inner {
            KeyPairInner::Ed25519(kp) => Ok(kp.sign(message).as_ref().to_vec()),
            KeyPairInner::P256(kp) => kp
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| Error::internal("ECDSA signing failed")),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, kid={:?})", self.alg(), self.kid)
    }
}

// ---------------------------------------------------------------------------------------------
// Compact JWS

/// A JOSE header, parsed strictly. Members other than those below are ignored, `jku`, `x5u` and
/// `x5c` included: they are never fetched or trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: Alg,
    pub typ: Option<String>,
    pub kid: Option<String>,
    /// An embedded public key (DPoP proofs); never used by [`verify`] itself.
    pub jwk: Option<PublicJwk>,
}

impl Header {
    /// Whether `typ` is `expected`, compared as a media type: ASCII case-insensitively, with an
    /// optional `application/` prefix (RFC 7515 §4.1.9).
    pub fn typ_is(&self, expected: &str) -> bool {
        let Some(typ) = self.typ.as_deref() else { return false };
        let typ = match typ.get(..12) {
            Some(prefix) if prefix.eq_ignore_ascii_case("application/") => typ.get(12..).unwrap_or(typ),
            _ => typ,
        };
        typ.eq_ignore_ascii_case(expected)
    }
}

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, deserialize_with = "nested_object")]
    jwk: Option<RawJwk>,
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// A compact JWS split and its header parsed, not yet verified: read [`Jws::header`] (`kid`,
/// `typ`) to choose the key, then call [`Jws::verify`].
#[derive(Debug)]
pub struct Jws<'a> {
    header: Header,
    signing_input: &'a str,
    payload: &'a str,
    signature: &'a str,
}

/// The result of a successful verification.
#[derive(Debug, Clone)]
pub struct Verified {
    pub header: Header,
    /// The decoded payload.
    pub payload: Vec<u8>,
}

impl Verified {
    /// The payload parsed as JSON claims; `invalid_token_claims` when it does not fit `T`.
    /// The payload must be a JSON object (nested structs of `T` should use objects too: serde's
    /// derived structs accept arrays positionally, so `Claims` guards its nested `cnf`).
    pub fn claims<T: DeserializeOwned>(&self) -> Result<T> {
        if !is_json_object(&self.payload) {
            return Err(token_err(INVALID_TOKEN_CLAIMS, "the claims set is not a JSON object"));
        }
        serde_json::from_slice(&self.payload)
            .map_err(|_| token_err(INVALID_TOKEN_CLAIMS, "the claims are missing a member or are malformed"))
    }
}

/// Splits a compact JWS (exactly three non-empty segments, at most [`MAX_TOKEN_LEN`] bytes) and
/// parses its header strictly (`alg` supported, no `crit`, a `jwk` if present public and valid).
/// Does not verify anything else.
pub fn split(compact: &str) -> Result<Jws<'_>> {
    if compact.len() > MAX_TOKEN_LEN {
        return Err(token_err(INVALID_TOKEN, "the token is too long"));
    }
    let mut parts = compact.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(token_err(INVALID_TOKEN, "a compact JWS has exactly three segments"));
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(token_err(INVALID_TOKEN, "a segment of the token is empty"));
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| token_err(INVALID_TOKEN, "the token header is not base64url without padding"))?;
    if !is_json_object(&header_json) {
        return Err(token_err(INVALID_TOKEN, "the token header is not a JSON object"));
    }
    let raw: RawHeader<'_> = serde_json::from_slice(&header_json)
        .map_err(|_| token_err(INVALID_TOKEN, "the token header is not a valid JSON object"))?;
    if raw.crit {
        return Err(token_err(INVALID_TOKEN, "the crit header is not supported"));
    }
    let alg = Alg::parse(&raw.alg)?;
    let jwk = match raw.jwk {
        Some(raw_jwk) => Some(
            PublicJwk::from_raw(raw_jwk)
                .map_err(|_| token_err(INVALID_TOKEN, "the jwk header is not a valid public key"))?,
        ),
        None => None,
    };
    let header = Header { alg, typ: raw.typ, kid: raw.kid, jwk };
    let signing_input = &compact[..h.len() + 1 + p.len()];
    Ok(Jws { header, signing_input, payload: p, signature: s })
}

impl<'a> Jws<'a> {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The raw base64url payload segment.
    pub fn payload_b64(&self) -> &'a str {
        self.payload
    }

    /// Verifies the signature with `key` for `expected_alg`: the key must be for that algorithm and
    /// the header's `alg` must be exactly it (`invalid_token_alg`); then the signature must be 64
    /// bytes and valid (`invalid_token_signature`); then the payload must decode (`invalid_token`).
    pub fn verify(self, key: &PublicJwk, expected_alg: Alg) -> Result<Verified> {
        if key.alg() != expected_alg {
            return Err(token_err(INVALID_TOKEN_ALG, "the key is not for the expected alg"));
        }
        if self.header.alg != expected_alg {
            return Err(token_err(INVALID_TOKEN_ALG, "the token's alg is not the expected one"));
        }
        let sig = b64url_decode_array::<SIG_LEN>(self.signature)
            .ok_or_else(|| token_err(INVALID_TOKEN_SIGNATURE, "the signature is not 64 bytes of base64url"))?;
        key.verify_signature(self.signing_input.as_bytes(), &sig)?;
        let payload = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| token_err(INVALID_TOKEN, "the payload is not base64url without padding"))?;
        Ok(Verified { header: self.header, payload })
    }
}

/// [`split`] then [`Jws::verify`]: verifies a compact JWS against the key the caller chose.
pub fn verify(compact: &str, key: &PublicJwk, expected_alg: Alg) -> Result<Verified> {
    split(compact)?.verify(key, expected_alg)
}

// ---------------------------------------------------------------------------------------------
// RFC 9068 access-token claims

/// `aud`: a string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(all) => all.iter().any(|a| a == aud),
        }
    }
}

/// `cnf` (RFC 7800) with the DPoP key thumbprint (RFC 9449 §6.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
}

/// Whether a claim that names who or what a token is for (`sub`, `jti`, `client_id`, `azp`,
/// keygate's `app_id`) is text a gateway may copy into a header field, a log line or a URL: no
/// control character (C0, DEL or C1). A CR or LF there would let a token's issuer, or whoever
/// got a trusted issuer to sign such a claim, write fields, or a whole second request, into an
/// upstream's request head (RFC 9110 §5.5, RFC 9112 §2.2). Tokens with such claims are refused
/// when they are verified, with [`INVALID_IDENTITY_CLAIM`].
pub fn is_identity_text(claim: &str) -> bool {
    !claim.chars().any(char::is_control)
}

/// The claims of an RFC 9068 access token. Times are integer NumericDates (seconds since the
/// epoch); a fractional or missing required claim is `invalid_token_claims`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "nested_object")]
    pub cnf: Option<Confirmation>,
}

impl Claims {
    /// Checks issuer (`invalid_token_issuer`), audience (`invalid_token_audience`), `exp`
    /// (`token_expired`: the token is expired once `now >= exp + leeway`), and `nbf`/`iat`
    /// (`token_not_yet_valid`: `now + leeway < nbf`, or `iat > now + leeway`).
    pub fn validate(&self, now: i64, leeway: u32, expected_iss: &str, expected_aud: &str) -> Result<()> {
        if ![&self.sub, &self.jti, &self.client_id].iter().all(|c| is_identity_text(c)) {
            return Err(token_err(
                INVALID_IDENTITY_CLAIM,
                "a claim naming the token's subject, id or client (sub, jti, client_id) holds a control character",
            ));
        }
        let leeway = i64::from(leeway);
        if self.iss != expected_iss {
            return Err(token_err(INVALID_TOKEN_ISSUER, "the token is from another issuer"));
        }
        if !self.aud.contains(expected_aud) {
            return Err(token_err(INVALID_TOKEN_AUDIENCE, "the token is not for this audience"));
        }
        if now >= self.exp.saturating_add(leeway) {
            return Err(token_err(TOKEN_EXPIRED, "the token has expired"));
        }
        let later = now.saturating_add(leeway);
        if self.nbf.is_some_and(|nbf| later < nbf) || self.iat > later {
            return Err(token_err(TOKEN_NOT_YET_VALID, "the token is not valid yet"));
        }
        Ok(())
    }

    /// The space-separated scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.as_deref().unwrap_or("").split(' ').filter(|s| !s.is_empty())
    }
}

/// A verified access token.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub header: Header,
    pub claims: Claims,
}

/// Verifies an RFC 9068 access token end to end: [`verify`] against `key` for `expected_alg`,
/// `typ` must be `at+jwt` (`invalid_token_type`), the claims must parse
/// (`invalid_token_claims`) and pass [`Claims::validate`].
pub fn verify_access_token(
    compact: &str,
    key: &PublicJwk,
    expected_alg: Alg,
    now: i64,
    leeway: u32,
    expected_iss: &str,
    expected_aud: &str,
) -> Result<AccessToken> {
    let verified = verify(compact, key, expected_alg)?;
    if !verified.header.typ_is(ACCESS_TOKEN_TYP) {
        return Err(token_err(INVALID_TOKEN_TYPE, "the token's typ is not at+jwt"));
    }
    let claims: Claims = verified.claims()?;
    claims.validate(now, leeway, expected_iss, expected_aud)?;
    Ok(AccessToken { header: verified.header, claims })
}

#[cfg(test)]
#[path = "jose_tests.rs"]
mod tests;
