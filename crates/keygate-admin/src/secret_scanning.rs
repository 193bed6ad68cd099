//! The secret-scanning partner endpoint (issue 15): code-hosting platforms that find keygate
//! tokens in public code POST them here, in GitHub's partner format, signed with their key; each
//! token issued by this keygate is marked exposed and handled by its workspace's exposure policy
//! ([`Admin::mark_exposed`]), the same path as `keygate scan --online` and tokens found in query
//! strings.
//!
//! The request: a JSON array of `{"token", "type", "url", "source"}`, with the headers
//! `Github-Public-Key-Identifier` (which configured key) and `Github-Public-Key-Signature`
//! (base64 of an ASN.1 DER ECDSA P-256 SHA-256 signature of the raw body). The answer: one
//! `{"token_hash", "token_type", "label", "live"}` per token, in GitHub's feedback format
//! (`token_hash` is the SHA-256 of the token in hex: a secret is never sent back).

use base64::Engine as _;
use keygate_core::model::{Actor, AuditFilter, PageRequest, TokenRecord};
use keygate_core::token_format;
use keygate_core::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::service::Admin;

/// The DER prefix of a P-256 SubjectPublicKeyInfo, before the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Tokens per request at most.
pub const MAX_TOKENS: usize = 1_000;
/// The header naming the platform's key, and the one carrying the signature.
pub const KEY_ID_HEADER: &str = "github-public-key-identifier";
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";

/// The platforms' public keys, by identifier.
pub struct PartnerKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl PartnerKeys {
    /// Keys from `(identifier, PEM)` pairs: each an ECDSA P-256 public key (`BEGIN PUBLIC KEY`).
    pub fn from_pem(pairs: &[(String, String)]) -> std::result::Result<Self, String> {
        let mut keys = Vec::with_capacity(pairs.len());
        for (id, pem) in pairs {
            let body: String =
                pem.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("-----")).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(body.as_bytes())
                .map_err(|_| format!("key {id:?}: the PEM is not base64"))?;
            let point = der
                .strip_prefix(&P256_SPKI_PREFIX[..])
                .filter(|p| p.len() == 65 && p.first() == Some(&4))
                .ok_or_else(|| format!("key {id:?}: not an ECDSA P-256 public key (BEGIN PUBLIC KEY)"))?;
            keys.push((id.clone(), point.to_vec()));
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `signature_b64` is the key `key_id`'s signature of `body`.
    pub fn verify(&self, key_id: &str, signature_b64: &str, body: &[u8]) -> bool {
        let Some((_, point)) = self.keys.iter().find(|(id, _)| id == key_id) else { return false };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature_b64.trim().as_bytes()) else {
            return false;
        };
        let key = aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1, point);
        key.verify(body, &sig).is_ok()
    }
}

/// One token a platform found.
#[derive(Debug, Deserialize)]
pub struct Found {
    pub token: String,
    #[serde(rename = "type", default)]
    pub token_type: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub source: String,
}

/// The answer for one token.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Feedback {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    pub token_type: String,
    /// `true_positive`: a token (or root key) this keygate issued; `false_positive`: not one.
    pub label: &'static str,
    /// Whether it still works after the workspace's exposure policy was applied.
    pub live: bool,
}

/// The location written into the audit trail: the platform's URL (or source), as valid text.
fn location(f: &Found) -> String {
    let place = if f.url.is_empty() { f.source.as_str() } else { f.url.as_str() };
    let place = if place.is_empty() { "a public source" } else { place };
    format!("secret scanning: {place}").chars().filter(|c| !c.is_control()).take(400).collect()
}

/// Serializes the reports this node handles ([`Admin::secret_scanning_report`]).
static REPORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Admin {
    /// Handles tokens a secret-scanning partner found: each of this keygate's tokens is marked
    /// exposed in its own workspace (actor `secret-scanning`) and its workspace's exposure
    /// policy applied; root keys are logged (revoke them by hand). A token already reported at
    /// the same place is answered and left alone (a replayed report changes nothing). Never fails
    /// for one token: a token that cannot be handled is answered as not live and logged.
    pub async fn secret_scanning_report(&self, found: &[Found]) -> Result<Vec<Feedback>> {
        if found.len() > MAX_TOKENS {
            return Err(Error::invalid("too_many_tokens", format!("at most {MAX_TOKENS} tokens per request")));
        }
        let actor = Actor { id: "secret-scanning".into(), source: None, owner: true };
        // One report at a time on this node: the same report sent twice at once would otherwise
        // find no earlier exposure twice, and write and notify twice.
        let _one = REPORTS.lock().await;
        let mut out = Vec::with_capacity(found.len());
        for f in found {
            let token_hash: String =
                sha2::Sha256::digest(f.token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
            let mut answer =
                Feedback { token_hash, token_type: f.token_type.clone(), label: "false_positive", live: false };
            let is_token = token_format::parse(&f.token, self.prefix()).is_ok();
            let is_root = !is_token && token_format::parse(&f.token, self.root_prefix()).is_ok();
            if !is_token && !is_root {
                out.push(answer);
                continue;
            }
            let hash = self.hash(&f.token);
            if is_root {
                if let Some(key) = self.store().root_key_by_hash(&hash).await? {
                    answer.label = "true_positive";
                    answer.live = key.revoked_at.is_none();
                    tracing::warn!(root_key_id = %key.id, location = %location(f), "a secret-scanning partner found a root key; revoke it");
                }
                out.push(answer);
                continue;
            }
            let Some(token) = self.store().token_by_hash(&hash).await? else {
                out.push(answer);
                continue;
            };
            answer.label = "true_positive";
            let place = location(f);
            // A report already taken (the same token at the same place): answered again, changing
            // nothing. A signed report has no time of its own and can be sent again by whoever
            // saw it; it must not write another event, notify the owners again, or stop a token a
            // person has resumed since.
            match self.exposure_reported(&token, &actor, &place).await {
                Ok(true) => {
                    answer.live = token.status(self.now()) == keygate_core::model::TokenStatus::Active;
                    out.push(answer);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(token_id = %token.id, error = %e, "cannot read a token's earlier exposures");
                }
            }
            match self.mark_exposed(&token.workspace_id, &actor, &token, Some(&place)).await {
                Ok(t) => answer.live = t.status(self.now()) == keygate_core::model::TokenStatus::Active,
                Err(e) => {
                    tracing::warn!(token_id = %token.id, error = %e, "cannot handle a token a secret-scanning partner found");
                    answer.live = token.status(self.now()) == keygate_core::model::TokenStatus::Active;
                }
            }
            out.push(answer);
        }
        Ok(out)
    }
}

impl Admin {
    /// Whether `actor` has already reported `token` exposed at `location` (a `token.exposed`
    /// event of the token's with that actor and location). Reading every such event is bounded:
    /// a report already taken writes none, so there is one per distinct place.
    async fn exposure_reported(&self, token: &TokenRecord, actor: &Actor, location: &str) -> Result<bool> {
        let filter = AuditFilter {
            actor: Some(actor.id.clone()),
            action: Some("token.exposed".into()),
            target: Some(token.id.as_str().to_owned()),
            ..AuditFilter::default()
        };
        let mut cursor = None;
        loop {
            let page = self.audit_events(&token.workspace_id, &filter, &PageRequest { limit: 200, cursor }).await?;
            if page
                .items
                .iter()
                .any(|e| e.after.as_ref().and_then(|a| a.get("location")).and_then(|l| l.as_str()) == Some(location))
            {
                return Ok(true);
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 key pair for tests: the SPKI PEM of its public key.
    fn pem_of(key: &aws_lc_rs::signature::EcdsaKeyPair) -> String {
        use aws_lc_rs::signature::KeyPair as _;
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(key.public_key().as_ref());
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n", &b64[..64], &b64[64..])
    }

    #[test]
    fn signatures_are_checked_against_the_named_key() {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let new_key = || {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap()
        };
        let (a, b) = (new_key(), new_key());
        let keys = PartnerKeys::from_pem(&[("a".into(), pem_of(&a)), ("b".into(), pem_of(&b))]).unwrap();
        let body = br#"[{"token":"x","type":"keygate_token","url":"https://example.com","source":"content"}]"#;
        let sig = base64::engine::general_purpose::STANDARD.encode(a.sign(&rng, body).unwrap().as_ref());
        assert!(keys.verify("a", &sig, body));
        assert!(!keys.verify("b", &sig, body), "another key");
        assert!(!keys.verify("c", &sig, body), "an unknown key");
        assert!(!keys.verify("a", &sig, b"[]"), "another body");
        assert!(!keys.verify("a", "not base64!", body));
        assert!(!keys.verify("a", "", body));
    }

    #[test]
    fn keys_that_are_not_p256_public_keys_are_refused() {
        for pem in [
            "",
            "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----",
        ] {
            assert!(PartnerKeys::from_pem(&[("k".into(), pem.into())]).is_err(), "{pem}");
        }
    }

    #[test]
    fn locations_are_text_without_control_characters() {
        let f = Found {
            token: String::new(),
            token_type: String::new(),
            url: "https://x/\u{7}a\nb".into(),
            source: "commit".into(),
        };
        assert_eq!(location(&f), "secret scanning: https://x/ab");
        let f = Found { url: String::new(), ..f };
        assert_eq!(location(&f), "secret scanning: commit");
        let f = Found { url: "y".repeat(1000), ..f };
        assert_eq!(location(&f).chars().count(), 400);
    }
}
