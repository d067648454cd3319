//! A tenant's reads: items (one `GET`, or one `MGET` for many), listings
//! and usage, by the client's read policy.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::FromRedisValue;
use serde_json::Value as Json;
use serde_json::value::RawValue;

use crate::crypto::Encryption;
use crate::envelope::Stored;
use crate::error::{Error, Result};
use crate::item::{Item, Page, Usage};
use crate::keys::check_key;
use crate::layout::LayoutStatus;
use crate::tenant::{Tenant, ms_to_time};

impl Tenant {
    /// The item under `key`, read by the client's read policy with one
    /// `GET`. Audited as `get_key` through a `tracing` event with target
    /// `audit` (no write).
    pub async fn get(&self, key: &str) -> Result<Item> {
        self.get_as(key).await
    }

    /// The item under `key` as [`get`](Self::get) reads and audits it,
    /// its value the JSON text as stored (checked, never parsed into a
    /// tree): to pass it on, as an HTTP answer does, without the cost of
    /// building a [`serde_json::Value`] and writing it again, which grows
    /// with the value. (`RawValue` has no `PartialEq`: compare its text,
    /// [`RawValue::get`].)
    pub async fn get_raw(&self, key: &str) -> Result<Item<Box<RawValue>>> {
        self.get_as(key).await
    }

    async fn get_as<V: ValueForm>(&self, key: &str) -> Result<Item<V>> {
        check_key(key)?;
        let stored = match self.store.layout().await? {
            LayoutStatus::Current => {
                let envelope: Option<Vec<u8>> = self
                    .client()
                    .read(redis::cmd("GET").arg(self.keys.data_arg(key)))
                    .await?;
                envelope
                    .map(|bytes| Stored::from_envelope(bytes).map_err(|e| corrupt(key, e)))
                    .transpose()?
            }
            LayoutStatus::Migrating => self.read_through(&[key]).await?.pop().flatten(),
        };
        match stored {
            Some(stored) => self.parse(key, stored).await,
            None => Err(Error::NotFound {
                key: key.to_owned(),
            }),
        }
    }

    /// The items under `keys` (`None` where there is none), with one
    /// `MGET`, read by the client's read policy; each audited like
    /// [`get`](Self::get).
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Item>>> {
        for key in keys {
            check_key(key)?;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let stored = match self.store.layout().await? {
            LayoutStatus::Current => {
                let mut mget = redis::cmd("MGET");
                for key in keys {
                    mget.arg(self.keys.data_arg(key));
                }
                let envelopes: Vec<Option<Vec<u8>>> = self.client().read(&mget).await?;
                keys.iter()
                    .zip(envelopes)
                    .map(|(key, envelope)| {
                        envelope
                            .map(|bytes| Stored::from_envelope(bytes).map_err(|e| corrupt(key, e)))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            LayoutStatus::Migrating => self.read_through(keys).await?,
        };
        let parsed = keys.iter().zip(stored).map(|(key, stored)| async move {
            match stored {
                Some(stored) => self.parse(key, stored).await.map(Some),
                None => Ok(None),
            }
        });
        futures_util::future::try_join_all(parsed).await
    }

    /// Items while a migration runs: each one's layout 1 hash, then its
    /// layout 2 envelope, in one pipeline. An item only ever moves from
    /// layout 1 to layout 2 (converted, or written anew), in one script:
    /// read in that order, an envelope found is the latest, and a hash
    /// found with no envelope after it was the item when it was read.
    async fn read_through(&self, keys: &[&str]) -> Result<Vec<Option<Stored>>> {
        let mut pipeline = redis::pipe();
        for key in keys {
            pipeline
                .cmd("HMGET")
                .arg(self.keys.legacy_data(key))
                .arg(&Stored::LEGACY_FIELDS);
        }
        let redis_keys: Vec<String> = keys.iter().map(|key| self.keys.data(key)).collect();
        pipeline.cmd("MGET").arg(&redis_keys);
        let mut replies: Vec<redis::Value> = self.client().read_pipeline(&pipeline).await?;
        let envelopes = replies.pop().unwrap_or(redis::Value::Nil);
        let envelopes = Vec::<Option<Vec<u8>>>::from_redis_value(envelopes)
            .map_err(|e| corrupt(keys[0], e.to_string()))?;
        let mut found = Vec::with_capacity(keys.len());
        for ((key, hash), envelope) in keys.iter().zip(replies).zip(envelopes) {
            found.push(match envelope {
                Some(bytes) => Some(Stored::from_envelope(bytes).map_err(|e| corrupt(key, e))?),
                None => {
                    let fields = <[Option<String>; 7]>::from_redis_value(hash)
                        .map_err(|e| corrupt(key, e.to_string()))?;
                    Stored::from_legacy(fields).map_err(|e| corrupt(key, e))?
                }
            });
        }
        Ok(found)
    }

    /// Decrypts (if need be) and reads a stored item, auditing the read.
    async fn parse<V: ValueForm>(&self, key: &str, stored: Stored) -> Result<Item<V>> {
        let settings = &self.store.inner;
        let value = if Encryption::is_encrypted(&stored.value) {
            let Some(encryption) = &settings.encryption else {
                return Err(corrupt(
                    key,
                    "the value is encrypted and this store has no encryption key",
                ));
            };
            let sealed = std::str::from_utf8(&stored.value)
                .map_err(|_| corrupt(key, "the encrypted value is not text"))?;
            let plain = encryption
                .decrypt(&settings.client, &self.tenant, key, sealed)
                .await?;
            V::read_text(plain)
        } else {
            V::read(stored.value)
        }
        .map_err(|e| corrupt(key, format!("`value`: {e}")))?;
        let metadata = stored
            .metadata
            .as_deref()
            .map(serde_json::from_slice)
            .transpose()
            .map_err(|e| corrupt(key, format!("`metadata`: {e}")))?;
        if let Some(sampled) = settings.read_audits.next() {
            tracing::info!(
                target: "audit",
                tenant_id = self.tenant.as_str(),
                actor = self.actor.as_str(),
                action = "get_key",
                key,
                version = stored.version,
                size = stored.size,
                // Recorded only when reads are sampled.
                sampled = (sampled > 1).then_some(sampled),
            );
        }
        Ok(Item {
            key: key.to_owned(),
            value,
            metadata,
            version: stored.version,
            created_at: ms_to_time(stored.created),
            updated_at: ms_to_time(stored.updated),
            expires_at: stored.expires.map(ms_to_time),
        })
    }

    /// Up to `limit` keys starting with `prefix`, in byte order, after
    /// `cursor` (from the previous page). Costs `O(log n + limit)` in the
    /// tenant's own keys, whatever other tenants hold. Items whose TTL ran
    /// out are left out even before they leave the index.
    pub async fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> Result<Page> {
        let cursors = &self.store.inner.cursors;
        let start = match cursor {
            None => {
                let mut start = b"[".to_vec();
                start.extend_from_slice(prefix.as_bytes());
                start
            }
            Some(cursor) => {
                let after = cursors.open(&self.tenant, prefix, cursor)?;
                let mut start = b"(".to_vec();
                start.extend_from_slice(after.as_bytes());
                start
            }
        };
        // No UTF-8 text holds the byte 0xFF: every key with the prefix sorts before this.
        let mut end = b"[".to_vec();
        end.extend_from_slice(prefix.as_bytes());
        end.push(0xFF);
        let limit = limit.max(1);
        let mut keys: Vec<String> = self
            .client()
            .read(
                redis::cmd("ZRANGEBYLEX")
                    .arg(self.keys.index())
                    .arg(start)
                    .arg(end)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit + 1),
            )
            .await?;
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next = (more && !keys.is_empty())
            .then(|| cursors.seal(&self.tenant, prefix, keys.last().expect("not empty")));
        if !keys.is_empty() {
            let expiries: Vec<Option<u64>> = self
                .client()
                .read(redis::cmd("ZMSCORE").arg(self.keys.expiry()).arg(&keys))
                .await?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let mut expiries = expiries.into_iter();
            keys.retain(|_| expiries.next().flatten().is_none_or(|at| at > now));
        }
        Ok(Page { keys, cursor: next })
    }

    /// The tenant's usage counters.
    pub async fn usage(&self) -> Result<Usage> {
        let (keys, bytes): (Option<u64>, Option<u64>) = self
            .client()
            .read(
                redis::cmd("HMGET")
                    .arg(self.keys.usage())
                    .arg("keys")
                    .arg("bytes"),
            )
            .await?;
        Ok(Usage {
            keys: keys.unwrap_or(0),
            bytes: bytes.unwrap_or(0),
        })
    }
}

/// The forms an item's value is read in: parsed, or the text as stored.
trait ValueForm: Sized {
    /// The value from its JSON text as stored, checked.
    fn read(text: Vec<u8>) -> serde_json::Result<Self>;
    /// The value from JSON text already known to be UTF-8 (a decrypted
    /// value), checked.
    fn read_text(text: String) -> serde_json::Result<Self>;
}

impl ValueForm for Json {
    fn read(text: Vec<u8>) -> serde_json::Result<Self> {
        serde_json::from_slice(&text)
    }

    fn read_text(text: String) -> serde_json::Result<Self> {
        serde_json::from_str(&text)
    }
}

impl ValueForm for Box<RawValue> {
    fn read(text: Vec<u8>) -> serde_json::Result<Self> {
        Self::read_text(String::from_utf8(text).map_err(serde::de::Error::custom)?)
    }

    fn read_text(text: String) -> serde_json::Result<Self> {
        // Checks the text, then keeps it in a box of its size: a copy
        // when the text shares its buffer with the envelope read.
        RawValue::from_string(text)
    }
}

fn corrupt(key: &str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        key: key.to_owned(),
        reason: reason.into(),
    }
}
