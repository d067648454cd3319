//! One tenant's view of the store, and its writes: each one script that
//! checks, writes, counts and audits, all or nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use redis_failover::FailoverClient;

use crate::envelope::{HEADER_LEN, Header};
use crate::error::{Error, Result};
use crate::item::{Item, MAX_TTL, NewItem, Precondition, Write, Written};
use crate::keys::{
    AUDIT, AUDIT_STAGED, EXPIRING_SIZES, EXPIRY, INDEX, RATE, TenantId, TenantKeys, USAGE,
    check_key,
};
use crate::layout::LayoutStatus;
use crate::limits::Quotas;
use crate::scripts::{PURGE, WRITE};
use crate::store::{Actor, TenantKv};

/// How many expired items one purge script takes at most.
const PURGE_BATCH: usize = 256;

/// One tenant's view of the store, from [`TenantKv::tenant`].
#[derive(Clone, Debug)]
pub struct Tenant {
    pub(crate) store: TenantKv,
    pub(crate) tenant: TenantId,
    pub(crate) keys: TenantKeys,
    pub(crate) actor: Actor,
}

/// A checked write, as the script's arguments.
struct Prepared {
    op: &'static str,
    key: String,
    expected: Option<u64>,
    value: String,
    metadata: String,
    ttl: String,
    item: Option<NewItem>,
}

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The write script's reply: each write's envelope header, or a refusal
/// (its status and numbers).
enum Reply {
    Written(Vec<u8>),
    Refused { status: String, numbers: Vec<u64> },
}

impl Reply {
    fn new(reply: Value) -> Self {
        match reply {
            Value::BulkString(headers) => Self::Written(headers),
            Value::Array(reply) => Self::Refused {
                status: match reply.first() {
                    Some(Value::BulkString(status)) => String::from_utf8_lossy(status).into_owned(),
                    _ => String::new(),
                },
                numbers: reply.iter().skip(1).map(|v| int(v).unwrap_or(0)).collect(),
            },
            other => Self::Refused {
                status: format!("{other:?}"),
                numbers: Vec::new(),
            },
        }
    }

    fn quota_refused(&self) -> bool {
        matches!(self, Self::Refused { status, .. } if status.starts_with("quota_"))
    }
}

impl Tenant {
    pub(crate) fn new(store: TenantKv, tenant: TenantId, actor: Actor) -> Self {
        Self {
            keys: TenantKeys::new(&tenant),
            store,
            tenant,
            actor,
        }
    }

    /// The tenant's id.
    pub fn id(&self) -> &TenantId {
        &self.tenant
    }

    pub(crate) fn client(&self) -> &FailoverClient {
        &self.store.inner.client
    }

    /// Stores `item` under `key`; fails with [`Error::AlreadyExists`] if
    /// an item has the key.
    pub async fn create(&self, key: &str, item: NewItem) -> Result<Item> {
        let write = Write::Create {
            key: key.to_owned(),
            item,
        };
        self.write_one(write, false).await.map(Written::into_item)
    }

    /// Stores `item` under `key`, replacing any item there, as
    /// `precondition` allows: [`Error::NotFound`] when it must exist and
    /// does not, [`Error::VersionConflict`] on another version.
    pub async fn put(&self, key: &str, item: NewItem, precondition: Precondition) -> Result<Item> {
        let write = Write::Put {
            key: key.to_owned(),
            item,
            precondition,
        };
        self.write_one(write, false).await.map(Written::into_item)
    }

    /// Replaces the item under `key` with `item` ([`Error::NotFound`] if
    /// there is none), as HTTP's PUT does: the write is sent again when a
    /// failover leaves its outcome unknown or its replication unconfirmed,
    /// within the client's retry budget. The item ends up holding `item`
    /// either way, but a write that ran twice took two versions and left
    /// two audit records. Use [`put`](Self::put) with a version to write at
    /// most once.
    pub async fn replace(&self, key: &str, item: NewItem) -> Result<Item> {
        let write = Write::Put {
            key: key.to_owned(),
            item,
            precondition: Precondition::Exists,
        };
        self.write_one(write, true).await.map(Written::into_item)
    }

    /// Deletes `key`'s item (at `expected_version`, if given); returns the
    /// version the deletion took.
    pub async fn delete(&self, key: &str, expected_version: Option<u64>) -> Result<u64> {
        let write = Write::Delete {
            key: key.to_owned(),
            expected_version,
        };
        match self.write_one(write, false).await? {
            Written::Deleted { version, .. } => Ok(version),
            Written::Stored(_) => unreachable!("a delete deletes"),
        }
    }

    /// One write, sent again through a failover only if `idempotent`.
    async fn write_one(&self, write: Write, idempotent: bool) -> Result<Written> {
        let prepared = self.prepare(write)?;
        let mut written = self
            .run(vec![prepared], idempotent)
            .await
            .map_err(|(_, error)| error)?;
        Ok(written.pop().expect("one write, one result"))
    }

    /// Runs `writes` all or nothing, in order, each with its audit record:
    /// if one cannot be done (a precondition, a quota), none is, and the
    /// error says which ([`Error::BatchFailed`]). The keys must differ.
    pub async fn batch(&self, writes: Vec<Write>) -> Result<Vec<Written>> {
        let mut prepared = Vec::with_capacity(writes.len());
        for (index, write) in writes.into_iter().enumerate() {
            let write = self.prepare(write).map_err(|error| Error::BatchFailed {
                index,
                source: Box::new(error),
            })?;
            if prepared.iter().any(|p: &Prepared| p.key == write.key) {
                return Err(Error::BatchFailed {
                    index,
                    source: Box::new(Error::InvalidKey {
                        reason: format!("{:?} appears twice in the batch", write.key),
                    }),
                });
            }
            prepared.push(write);
        }
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        self.run(prepared, false)
            .await
            .map_err(|(index, error)| match index {
                Some(index) => Error::BatchFailed {
                    index,
                    source: Box::new(error),
                },
                None => error,
            })
    }

    /// Checks a write and turns it into the script's arguments.
    fn prepare(&self, write: Write) -> Result<Prepared> {
        let (op, key, item, expected) = match write {
            Write::Create { key, item } => ("create", key, Some(item), None),
            Write::Put {
                key,
                item,
                precondition,
            } => match precondition {
                Precondition::None => ("put", key, Some(item), None),
                Precondition::Exists => ("update", key, Some(item), None),
                Precondition::Version(v) => ("update", key, Some(item), Some(v)),
            },
            Write::Delete {
                key,
                expected_version,
            } => ("delete", key, None, expected_version),
        };
        check_key(&key)?;
        let (mut value, mut metadata, mut ttl) = (String::new(), String::new(), String::new());
        if let Some(item) = &item {
            (value, metadata) = self.serialize(item)?;
            if let Some(t) = item.ttl {
                ttl = check_ttl(t)?.to_string();
            }
        }
        Ok(Prepared {
            op,
            key,
            expected,
            value,
            metadata,
            ttl,
            item,
        })
    }

    /// An item's value and metadata as JSON text, within the store's sizes.
    fn serialize(&self, item: &NewItem) -> Result<(String, String)> {
        let settings = &self.store.inner;
        let value = serde_json::to_string(&item.value).expect("JSON values serialize");
        if value.len() > settings.max_value_bytes {
            return Err(Error::InvalidItem {
                reason: format!(
                    "the value is {} bytes, more than the {} allowed",
                    value.len(),
                    settings.max_value_bytes
                ),
            });
        }
        let metadata = item.metadata.as_ref().map_or_else(String::new, |m| {
            serde_json::to_string(m).expect("JSON objects serialize")
        });
        if metadata.len() > settings.max_metadata_bytes {
            return Err(Error::InvalidItem {
                reason: format!(
                    "the metadata is {} bytes, more than the {} allowed",
                    metadata.len(),
                    settings.max_metadata_bytes
                ),
            });
        }
        Ok((value, metadata))
    }

    /// Runs prepared writes in one script. An error names the write at
    /// fault, if one is. A write refused by a quota runs once more if
    /// purging the tenant's expired items made room. The script is sent
    /// again through a failover only if `idempotent`.
    async fn run(
        &self,
        mut writes: Vec<Prepared>,
        idempotent: bool,
    ) -> Result<Vec<Written>, (Option<usize>, Error)> {
        let settings = &self.store.inner;
        let layout = self.store.layout().await.map_err(|e| (None, e))?;
        if let Some(encryption) = &settings.encryption {
            for (index, write) in writes.iter_mut().enumerate() {
                if write.item.is_some() {
                    write.value = encryption
                        .encrypt(&settings.client, &self.tenant, &write.key, &write.value)
                        .await
                        .map_err(|e| (Some(index), e))?;
                }
            }
        }
        let quotas = self
            .store
            .quotas(&self.tenant)
            .await
            .map_err(|e| (None, e))?;
        let command = self.write_script(&writes, &quotas, layout);
        let run = || async {
            WRITE
                .run::<Value>(self.client(), &command, idempotent)
                .await
                .map(Reply::new)
                .map_err(|e| (None, e))
        };
        let mut reply = run().await?;
        if reply.quota_refused() && self.purge_expired().await.map_err(|e| (None, e))? > 0 {
            reply = run().await?;
        }
        match reply {
            Reply::Written(headers) => written(writes, &headers),
            Reply::Refused { status, numbers } => Err(refusal(&writes, &status, &numbers, &quotas)),
        }
    }

    /// The write script's command for `writes` under `quotas`, written
    /// straight into one buffer (this runs on every write).
    fn write_script(
        &self,
        writes: &[Prepared],
        quotas: &Quotas,
        layout: LayoutStatus,
    ) -> redis::Cmd {
        let migrating = layout == LayoutStatus::Migrating;
        let items = if migrating { 2 } else { 1 } * writes.len();
        let bytes: usize = writes
            .iter()
            .map(|w| 3 * w.key.len() + w.value.len() + w.metadata.len() + 80)
            .sum();
        let mut command = WRITE.command_for(7 + items, 16 + items + 6 * writes.len(), 256 + bytes);
        for name in [
            USAGE,
            AUDIT,
            INDEX,
            EXPIRY,
            EXPIRING_SIZES,
            RATE,
            AUDIT_STAGED,
        ] {
            command.arg(self.keys.arg(name));
        }
        for write in writes {
            command.arg(self.keys.data_arg(&write.key));
        }
        if migrating {
            for write in writes {
                command.arg(self.keys.legacy_data_arg(&write.key));
            }
        }
        let optional = |command: &mut redis::Cmd, n: Option<u64>| {
            match n {
                Some(n) => command.arg(n),
                None => command.arg(""),
            };
        };
        command
            .arg(self.actor.as_str())
            .arg(self.tenant.as_str())
            .arg(self.store.inner.audit_max_len)
            .arg(now_ns());
        optional(&mut command, quotas.max_keys);
        optional(&mut command, quotas.max_bytes);
        optional(&mut command, quotas.writes_per_second.map(u64::from));
        command
            .arg(quotas.write_burst())
            .arg(if self.store.inner.stage_audit_records {
                "1"
            } else {
                ""
            });
        for write in writes {
            command.arg(write.op).arg(&write.key);
            optional(&mut command, write.expected);
            command
                .arg(&write.ttl)
                .arg(&write.metadata)
                .arg(&write.value);
        }
        command
    }

    /// Takes the items whose TTL ran out out of the index and the usage
    /// counters, each with a `key_expiration` audit record by
    /// [`Actor::system`], and returns how many. An item is purged once
    /// however many callers try: the expiry watcher
    /// ([`TenantKv::watch_expirations`]) calls this when Redis reports an
    /// expiry and on its sweeps, and a write refused by a quota calls it
    /// before trying again.
    pub async fn purge_expired(&self) -> Result<u64> {
        let layout = self.store.layout().await?;
        let mut total = 0;
        loop {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let candidates: Vec<String> = self
                .client()
                .query_idempotent(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(self.keys.expiry())
                        .arg("-inf")
                        .arg(now_ms.to_string())
                        .arg("LIMIT")
                        .arg(0)
                        .arg(PURGE_BATCH),
                )
                .await?;
            if candidates.is_empty() {
                return Ok(total);
            }
            let mut keys = vec![
                self.keys.usage(),
                self.keys.audit(),
                self.keys.index(),
                self.keys.expiry(),
                self.keys.expiring_sizes(),
            ];
            keys.extend(candidates.iter().map(|key| self.keys.data(key)));
            if layout == LayoutStatus::Migrating {
                keys.extend(candidates.iter().map(|key| self.keys.legacy_data(key)));
            }
            let mut command = PURGE.command(&keys);
            command
                .arg(self.tenant.as_str())
                .arg(self.store.inner.audit_max_len)
                .arg(&candidates);
            let purged: u64 = PURGE.run(self.client(), &command, true).await?;
            total += purged;
            // Candidates not purged are still there (Redis has not expired
            // them yet): the next call takes them.
            if purged == 0 || candidates.len() < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}

/// A TTL within what the store takes, in ms.
fn check_ttl(ttl: Duration) -> Result<u128> {
    if ttl.as_millis() == 0 {
        return Err(Error::InvalidItem {
            reason: "a TTL must be at least 1 ms".to_owned(),
        });
    }
    if ttl > MAX_TTL {
        return Err(Error::InvalidItem {
            reason: format!("a TTL must be at most {} days", MAX_TTL.as_secs() / 86_400),
        });
    }
    Ok(ttl.as_millis())
}

/// Now by this machine's clock, in ns since the Unix epoch: the `ts` of
/// audit records.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What each write did, from the envelope header the script answered for each.
fn written(writes: Vec<Prepared>, headers: &[u8]) -> Result<Vec<Written>, (Option<usize>, Error)> {
    if headers.len() != writes.len() * HEADER_LEN {
        return Err((
            None,
            Error::Corrupt {
                key: String::new(),
                reason: format!("the write script answered {} bytes", headers.len()),
            },
        ));
    }
    Ok(writes
        .into_iter()
        .zip(headers.chunks_exact(HEADER_LEN))
        .map(|(write, header)| {
            let header = Header::read(header);
            match write.item {
                None => Written::Deleted {
                    key: write.key,
                    version: header.version,
                },
                Some(item) => Written::Stored(Item {
                    expires_at: item.ttl.map(|ttl| ms_to_time(header.updated) + ttl),
                    key: write.key,
                    value: item.value,
                    metadata: item.metadata,
                    version: header.version,
                    created_at: ms_to_time(header.created),
                    updated_at: ms_to_time(header.updated),
                }),
            }
        })
        .collect())
}

/// The error of a write the script refused, with the index of the write
/// at fault, if one is.
fn refusal(
    writes: &[Prepared],
    status: &str,
    numbers: &[u64],
    quotas: &Quotas,
) -> (Option<usize>, Error) {
    let (at, number) = (
        numbers.first().copied().unwrap_or(0),
        numbers.get(1).copied().unwrap_or(0),
    );
    let index = usize::try_from(at).ok().and_then(|at| at.checked_sub(1));
    let key = index
        .and_then(|i| writes.get(i))
        .map_or_else(String::new, |w| w.key.clone());
    let error = match status {
        "exists" => Error::AlreadyExists {
            key,
            version: number,
        },
        "missing" => Error::NotFound { key },
        "conflict" => Error::VersionConflict {
            expected: index.and_then(|i| writes[i].expected).unwrap_or(0),
            key,
            current: (number > 0).then_some(number),
        },
        "quota_keys" => Error::QuotaExceeded {
            what: "keys",
            limit: quotas.max_keys.unwrap_or(0),
            would_be: number,
        },
        "quota_bytes" => Error::QuotaExceeded {
            what: "bytes",
            limit: quotas.max_bytes.unwrap_or(0),
            would_be: number,
        },
        "rate_batch" => Error::QuotaExceeded {
            what: "write_burst",
            limit: number,
            would_be: writes.len() as u64,
        },
        "rate" => Error::RateLimited {
            retry_after: Duration::from_millis(number),
        },
        other => Error::Corrupt {
            key,
            reason: format!("the write script answered {other:?}"),
        },
    };
    (index, error)
}
