//! Opt-in encryption of values at rest: XChaCha20-Poly1305 under a data key
//! per tenant, each data key stored in Redis wrapped by the master key.
//! A value's associated data is its tenant and key, so a ciphertext copied
//! to another key or tenant does not decrypt; deleting a tenant's data key
//! makes all its values unreadable.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use redis_failover::FailoverClient;

use crate::error::{Error, Result};
use crate::keys::{TenantId, TenantKeys};

/// Where the destruction of a tenant's data key is announced (the message
/// is the tenant id), so other instances stop using it at once.
pub(crate) const DATA_KEY_DESTROYED: &str = "tenant-kv:data-key-destroyed";

/// Marks an encrypted value, ahead of `base64(nonce || ciphertext)`.
const ENCRYPTED: &str = "enc:v1:";
const NONCE_LEN: usize = 24;

/// Associated data: each part length-prefixed, so no two (purpose, tenant,
/// key) triples give the same bytes.
fn associated(purpose: &str, tenant: &TenantId, key: &str) -> Vec<u8> {
    let mut aad = Vec::new();
    for part in [purpose, tenant.as_str(), key] {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

fn seal(cipher: &XChaCha20Poly1305, plaintext: &[u8], aad: &[u8]) -> String {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("XChaCha20-Poly1305 encrypts any message");
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&ciphertext);
    STANDARD.encode(sealed)
}

fn open(cipher: &XChaCha20Poly1305, sealed: &str, aad: &[u8]) -> Option<Vec<u8>> {
    let bytes = STANDARD.decode(sealed).ok()?;
    if bytes.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
}

/// The master key and the tenants' data keys met lately.
pub(crate) struct Encryption {
    master: XChaCha20Poly1305,
    /// Each data key with when it was read: it is read again after
    /// `lifetime`, so a key destroyed elsewhere stops being used.
    data_keys: Mutex<HashMap<TenantId, (Instant, XChaCha20Poly1305)>>,
    lifetime: Duration,
}

impl std::fmt::Debug for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encryption(<keys>)")
    }
}

impl Encryption {
    pub(crate) fn new(master_key: &[u8; 32], lifetime: Duration) -> Self {
        Self {
            master: XChaCha20Poly1305::new(Key::from_slice(master_key)),
            data_keys: Mutex::default(),
            lifetime,
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, (Instant, XChaCha20Poly1305)>> {
        self.data_keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cached(&self, tenant: &TenantId) -> Option<XChaCha20Poly1305> {
        self.keys()
            .get(tenant)
            .filter(|(read, _)| read.elapsed() < self.lifetime)
            .map(|(_, key)| key.clone())
    }

    /// Stops using `tenant`'s data key from memory (it was destroyed).
    pub(crate) fn forget(&self, tenant: &TenantId) {
        self.keys().remove(tenant);
    }

    /// The tenant's data key: cached, else read from Redis, else (when
    /// `create`) made and stored, first writer wins.
    async fn data_key(
        &self,
        client: &FailoverClient,
        tenant: &TenantId,
        create: bool,
    ) -> Result<Option<XChaCha20Poly1305>> {
        if let Some(key) = self.cached(tenant) {
            return Ok(Some(key));
        }
        let redis_key = TenantKeys::new(tenant).data_key();
        let aad = associated("data key", tenant, "");
        let mut stored: Option<String> = client.query(redis::cmd("GET").arg(&redis_key)).await?;
        if stored.is_none() && create {
            let fresh: [u8; 32] = rand::random();
            let wrapped = seal(&self.master, &fresh, &aad);
            let _: Option<String> = client
                .query(redis::cmd("SET").arg(&redis_key).arg(wrapped).arg("NX"))
                .await?;
            stored = client.query(redis::cmd("GET").arg(&redis_key)).await?;
        }
        let Some(stored) = stored else {
            return Ok(None);
        };
        let raw = open(&self.master, &stored, &aad).ok_or_else(|| Error::Corrupt {
            key: redis_key.clone(),
            reason: "the tenant's data key does not unwrap with this master key".to_owned(),
        })?;
        let key = XChaCha20Poly1305::new_from_slice(&raw).map_err(|_| Error::Corrupt {
            key: redis_key,
            reason: "the tenant's data key has the wrong length".to_owned(),
        })?;
        let mut keys = self.keys();
        // Tenants met long ago go, so the map holds only those in use.
        if keys.len() >= 1024 {
            let lifetime = self.lifetime;
            keys.retain(|_, (read, _)| read.elapsed() < lifetime);
        }
        keys.insert(tenant.clone(), (Instant::now(), key.clone()));
        Ok(Some(key))
    }

    /// Encrypts the value (JSON text) of `tenant`'s item `key`.
    pub(crate) async fn encrypt(
        &self,
        client: &FailoverClient,
        tenant: &TenantId,
        key: &str,
        value: &str,
    ) -> Result<String> {
        let cipher = self
            .data_key(client, tenant, true)
            .await?
            .expect("created when missing");
        let aad = associated("value", tenant, key);
        Ok(format!(
            "{ENCRYPTED}{}",
            seal(&cipher, value.as_bytes(), &aad)
        ))
    }

    /// Decrypts a stored value, or returns it as is if it is not encrypted.
    pub(crate) async fn decrypt(
        &self,
        client: &FailoverClient,
        tenant: &TenantId,
        key: &str,
        stored: &str,
    ) -> Result<String> {
        let Some(sealed) = stored.strip_prefix(ENCRYPTED) else {
            return Ok(stored.to_owned());
        };
        let unreadable = |reason: &str| Error::Corrupt {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        let cipher = self
            .data_key(client, tenant, false)
            .await?
            .ok_or_else(|| unreadable("the tenant's data key was destroyed"))?;
        let plaintext = open(&cipher, sealed, &associated("value", tenant, key))
            .ok_or_else(|| unreadable("the value does not decrypt for this tenant and key"))?;
        String::from_utf8(plaintext).map_err(|_| unreadable("the decrypted value is not UTF-8"))
    }

    /// Deletes the tenant's data key, and tells the other instances:
    /// its encrypted values become unreadable.
    pub(crate) async fn destroy(&self, client: &FailoverClient, tenant: &TenantId) -> Result<()> {
        let _: () = client
            .query_pipeline(
                redis::pipe()
                    .atomic()
                    .del(TenantKeys::new(tenant).data_key())
                    .ignore()
                    .publish(DATA_KEY_DESTROYED, tenant.as_str())
                    .ignore(),
            )
            .await?;
        self.forget(tenant);
        Ok(())
    }

    /// Whether a stored value is encrypted.
    pub(crate) fn is_encrypted(stored: &[u8]) -> bool {
        stored.starts_with(ENCRYPTED.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_associated_data() {
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&[7; 32]));
        let acme = TenantId::new("acme").unwrap();
        let aad = associated("value", &acme, "k");
        let sealed = seal(&cipher, b"{\"a\":1}", &aad);
        assert_eq!(open(&cipher, &sealed, &aad).unwrap(), b"{\"a\":1}");
        assert!(open(&cipher, &sealed, &associated("value", &acme, "other")).is_none());
        let bob = TenantId::new("bob").unwrap();
        assert!(open(&cipher, &sealed, &associated("value", &bob, "k")).is_none());
        let other = XChaCha20Poly1305::new(Key::from_slice(&[8; 32]));
        assert!(open(&other, &sealed, &aad).is_none());
        assert_ne!(
            seal(&cipher, b"x", &aad),
            seal(&cipher, b"x", &aad),
            "fresh nonces"
        );
    }
}
