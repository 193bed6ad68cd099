//! Secrets that keygate must be able to read back (two-factor secrets, OAuth signing keys) are
//! sealed with AES-256-GCM under a key derived from the pepper, so a copied database alone
//! opens none of them. Each sealed value is bound to what it belongs to (the additional data:
//! a user id, a key id), so a sealed value moved to another row does not open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use keygate_core::{Error, Result};

use crate::service::Admin;

/// Seals and opens values for one purpose.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A sealer whose key is derived from the pepper for `purpose` (see [`Admin::derive_key`]).
    pub fn new(admin: &Admin, purpose: &str) -> Result<Self> {
        let key = admin.derive_key(purpose);
        let key = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| Error::internal("cannot build a sealing key"))?;
        Ok(Self { key: LessSafeKey::new(key) })
    }

    /// `nonce ‖ ciphertext ‖ tag`, with a fresh random nonce from `admin`'s CSPRNG.
    pub fn seal(&self, admin: &Admin, bound_to: &str, secret: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        admin.random(&mut nonce)?;
        let mut data = secret.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(bound_to.as_bytes()), &mut data)
            .map_err(|_| Error::internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what [`Sealer::seal`] made for `bound_to`; `what` names the secret in the error.
    pub fn open(&self, bound_to: &str, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let (nonce, data) =
            sealed.split_at_checked(NONCE_LEN).ok_or_else(|| Error::internal("sealed value too short"))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::internal("bad nonce"))?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(bound_to.as_bytes()), &mut data)
            .map_err(|_| Error::internal(format!("{what} cannot be opened: was the pepper changed?")))?;
        Ok(plain.to_vec())
    }
}
