//! Listing cursors: the last key of a page, signed for one tenant and
//! prefix so that a cursor cannot be forged, altered or replayed elsewhere.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::Error;
use crate::keys::TenantId;

/// Bytes of the signature kept in a cursor.
const TAG_LEN: usize = 16;

/// Seals and opens cursors with the store's secret.
#[derive(Clone)]
pub(crate) struct Cursors {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors(<secret>)")
    }
}

impl Cursors {
    pub(crate) fn new(secret: &[u8]) -> Self {
        Self {
            mac: Hmac::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    fn tag(&self, tenant: &TenantId, prefix: &str, last_key: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        // Lengths first: no two (tenant, prefix, key) triples feed the same bytes.
        for part in [tenant.as_str(), prefix, last_key] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// A cursor resuming after `last_key`.
    pub(crate) fn seal(&self, tenant: &TenantId, prefix: &str, last_key: &str) -> String {
        let tag = self.tag(tenant, prefix, last_key).finalize().into_bytes();
        let mut bytes = tag[..TAG_LEN].to_vec();
        bytes.extend_from_slice(last_key.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The key a cursor resumes after, if this store sealed it for this
    /// tenant and prefix.
    pub(crate) fn open(
        &self,
        tenant: &TenantId,
        prefix: &str,
        cursor: &str,
    ) -> Result<String, Error> {
        let bytes = URL_SAFE_NO_PAD
            .decode(cursor)
            .map_err(|_| Error::InvalidCursor)?;
        if bytes.len() < TAG_LEN {
            return Err(Error::InvalidCursor);
        }
        let (tag, last_key) = bytes.split_at(TAG_LEN);
        let last_key = std::str::from_utf8(last_key).map_err(|_| Error::InvalidCursor)?;
        self.tag(tenant, prefix, last_key)
            .verify_truncated_left(tag)
            .map_err(|_| Error::InvalidCursor)?;
        Ok(last_key.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_opens_only_for_its_tenant_prefix_and_store() {
        let cursors = Cursors::new(b"0123456789abcdef");
        let (alice, bob) = (
            TenantId::new("alice").unwrap(),
            TenantId::new("bob").unwrap(),
        );
        let cursor = cursors.seal(&alice, "img/", "img/042");
        assert_eq!(cursors.open(&alice, "img/", &cursor).unwrap(), "img/042");
        assert!(
            cursors.open(&bob, "img/", &cursor).is_err(),
            "another tenant"
        );
        assert!(
            cursors.open(&alice, "doc/", &cursor).is_err(),
            "another prefix"
        );
        let other_store = Cursors::new(b"fedcba9876543210");
        assert!(other_store.open(&alice, "img/", &cursor).is_err());
        let mut altered = URL_SAFE_NO_PAD.decode(&cursor).unwrap();
        *altered.last_mut().unwrap() ^= 1;
        let altered = URL_SAFE_NO_PAD.encode(altered);
        assert!(cursors.open(&alice, "img/", &altered).is_err());
        assert!(cursors.open(&alice, "img/", "not base64!").is_err());
        assert!(cursors.open(&alice, "img/", "").is_err());
    }
}
