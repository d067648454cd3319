//! The store, its settings, and one tenant's view of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use redis_failover::FailoverClient;
use serde_json::{Map, Value as Json};

use crate::crypto::Encryption;
use crate::cursor::Cursors;
use crate::error::{Error, Result};
use crate::expiry::ExpiryWatcher;
use crate::keys::{TenantId, TenantKeys, check_key};
use crate::limits::{QuotaCache, Quotas};
use crate::passwords::Hasher;
use crate::ratelimit::Refusals;
use crate::scripts::WRITE;
use crate::users::LoginThrottle;

/// How many expired items the write script purges per call with no writes.
const PURGE_BATCH: u64 = 256;

/// Settings of a [`TenantKv`]; start from [`TenantKv::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct TenantKvBuilder {
    client: FailoverClient,
    max_value_bytes: usize,
    max_metadata_bytes: usize,
    audit_max_len: u64,
    cursor_secret: Option<Vec<u8>>,
    quotas: Quotas,
    tenant_quotas: HashMap<TenantId, Quotas>,
    encryption_key: Option<[u8; 32]>,
    expiry_notifications: bool,
    expiry_sweep_interval: Duration,
    hashing: (usize, usize),
    login_throttle: LoginThrottle,
    data_key_lifetime: Duration,
}

impl TenantKvBuilder {
    /// How many passwords are hashed or checked at once (each takes 19 MiB
    /// and a core for tens of milliseconds), and how many callers may wait
    /// for a slot; past them, a login or user creation fails at once with
    /// [`Error::Overloaded`]. The slots are the most of the machine that
    /// logins can take, however many clients try at once. Defaults to half
    /// the cores (at least one), and four waiting per slot.
    pub fn password_hashing(mut self, concurrency: usize, queue: usize) -> Self {
        self.hashing = (concurrency, queue);
        self
    }

    /// How logins are throttled. Defaults to [`LoginThrottle::default`].
    pub fn login_throttle(mut self, throttle: LoginThrottle) -> Self {
        self.login_throttle = throttle;
        self
    }

    /// How long a tenant's data key is used from memory before it is read
    /// again: once it is destroyed ([`TenantKv::destroy_data_key`]), other
    /// instances stop using it within this, or at once if they run the
    /// expiry watcher, which hears of the destruction. Defaults to 1 s.
    pub fn data_key_lifetime(mut self, lifetime: Duration) -> Self {
        self.data_key_lifetime = lifetime;
        self
    }

    /// Encrypts values at rest (XChaCha20-Poly1305) under a data key per
    /// tenant, stored in Redis wrapped by `master_key`. A value copied to
    /// another key or tenant does not decrypt, and
    /// [`TenantKv::destroy_data_key`] makes a tenant's values unreadable.
    /// Keys, metadata and listing stay in clear. Defaults to off; values
    /// written without it stay readable with it.
    pub fn encryption_key(mut self, master_key: [u8; 32]) -> Self {
        self.encryption_key = Some(master_key);
        self
    }

    /// The largest value, as JSON text. Defaults to 1 MiB.
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// The largest metadata object, as JSON text. Defaults to 8 KiB.
    pub fn max_metadata_bytes(mut self, bytes: usize) -> Self {
        self.max_metadata_bytes = bytes;
        self
    }

    /// About how many audit records each tenant's stream keeps (`XADD
    /// MAXLEN ~`) for the log shipper to take. Defaults to 100,000.
    pub fn audit_max_len(mut self, records: u64) -> Self {
        self.audit_max_len = records;
        self
    }

    /// The secret listing cursors are signed with. Every instance serving
    /// the same tenants must share it for a cursor to work on another
    /// instance. Defaults to a random secret of this store.
    pub fn cursor_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.cursor_secret = Some(secret.into());
        self
    }

    /// The quotas of every tenant without quotas of its own (each tenant's
    /// may be overridden in Redis: [`TenantKv::set_quota`]). Defaults to
    /// [`Quotas::default`]: at most 100 API keys, nothing else limited.
    pub fn quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// The quotas of `tenant`, instead of the default ones.
    pub fn tenant_quotas(mut self, tenant: TenantId, quotas: Quotas) -> Self {
        self.tenant_quotas.insert(tenant, quotas);
        self
    }

    /// Whether [`TenantKv::watch_expirations`] turns on the master's
    /// keyspace notifications of expired keys (`notify-keyspace-events Ex`,
    /// added to the flags already set) if they are off, on every master
    /// it follows. Where `CONFIG SET` is refused, or this is off and the
    /// server's configuration lacks them, expiry records come from the
    /// periodic sweeps only. Defaults to on.
    pub fn expiry_notifications(mut self, enable: bool) -> Self {
        self.expiry_notifications = enable;
        self
    }

    /// How often the expiry watcher scans for tenants with items past
    /// their time, which notifications missed (they are fire-and-forget:
    /// lost while the watcher reconnects or the master fails over). A scan
    /// costs in proportion to the whole keyspace. Defaults to 60 s.
    pub fn expiry_sweep_interval(mut self, interval: Duration) -> Self {
        self.expiry_sweep_interval = interval;
        self
    }

    /// Validates the settings.
    pub fn build(self) -> Result<TenantKv> {
        let invalid = |setting, reason: &str| {
            Err(Error::InvalidConfig {
                setting,
                reason: reason.to_owned(),
            })
        };
        if self.max_value_bytes == 0 {
            return invalid("max_value_bytes", "must be more than zero");
        }
        if self.audit_max_len == 0 {
            return invalid("audit_max_len", "must be more than zero");
        }
        if self.expiry_sweep_interval.is_zero() {
            return invalid("expiry_sweep_interval", "must be more than zero");
        }
        if self.hashing.0 == 0 {
            return invalid("password_hashing", "needs at least one slot");
        }
        if self.cursor_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return invalid("cursor_secret", "must be at least 16 bytes");
        }
        self.quotas.validate()?;
        for quotas in self.tenant_quotas.values() {
            quotas.validate()?;
        }
        let secret = self
            .cursor_secret
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        Ok(TenantKv {
            inner: Arc::new(Settings {
                bookkeeping: self
                    .client
                    .with_durability(redis_failover::Durability::Master),
                client: self.client,
                max_value_bytes: self.max_value_bytes,
                max_metadata_bytes: self.max_metadata_bytes,
                audit_max_len: self.audit_max_len,
                cursors: Cursors::new(&secret),
                quotas: self.quotas,
                tenant_quotas: self.tenant_quotas,
                quota_cache: QuotaCache::default(),
                refusals: Refusals::default(),
                hasher: Hasher::new(self.hashing.0, self.hashing.1),
                login_throttle: self.login_throttle,
                encryption: self
                    .encryption_key
                    .as_ref()
                    .map(|key| Encryption::new(key, self.data_key_lifetime)),
                expiry_notifications: self.expiry_notifications,
                expiry_sweep_interval: self.expiry_sweep_interval,
            }),
        })
    }
}

#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) client: FailoverClient,
    /// The same client for bookkeeping that needs no replica (rate state,
    /// login records, `last_used`): a failover that loses some only eases
    /// a limit or drops a record, and it must not hold up, or fail with,
    /// writes that wait for replicas.
    pub(crate) bookkeeping: FailoverClient,
    max_value_bytes: usize,
    max_metadata_bytes: usize,
    pub(crate) audit_max_len: u64,
    cursors: Cursors,
    quotas: Quotas,
    tenant_quotas: HashMap<TenantId, Quotas>,
    pub(crate) quota_cache: QuotaCache,
    /// Rate limits' refusals still in force.
    pub(crate) refusals: Refusals,
    pub(crate) hasher: Hasher,
    pub(crate) login_throttle: LoginThrottle,
    pub(crate) encryption: Option<Encryption>,
    pub(crate) expiry_notifications: bool,
    pub(crate) expiry_sweep_interval: Duration,
}

impl Settings {
    /// `tenant`'s quotas before the overrides stored in Redis.
    pub(crate) fn default_quotas(&self, tenant: &TenantId) -> Quotas {
        self.tenant_quotas
            .get(tenant)
            .copied()
            .unwrap_or(self.quotas)
    }
}

/// A tenant-isolated key-value store over a [`FailoverClient`]. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct TenantKv {
    pub(crate) inner: Arc<Settings>,
}

/// Who acts, as recorded in audit records: a user or an API key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Actor(String);

impl Actor {
    /// A user, by name.
    pub fn user(name: &str) -> Self {
        Self(format!("user:{name}"))
    }

    /// An API key, by its id.
    pub fn api_key(id: &str) -> Self {
        Self(format!("api_key:{id}"))
    }

    /// The store itself (expiry, maintenance).
    pub fn system() -> Self {
        Self("system".to_owned())
    }

    /// As written in audit records: `user:<name>`, `api_key:<id>` or `system`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An audit record of something done outside the item scripts (logins,
/// users, API keys), to send alone or inside a transaction with the change.
pub(crate) fn audit_record(
    settings: &Settings,
    tenant: &TenantId,
    actor: &Actor,
    action: &str,
    subject: &str,
) -> redis::Cmd {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut command = redis::cmd("XADD");
    command
        .arg(TenantKeys::new(tenant).audit())
        .arg("MAXLEN")
        .arg("~")
        .arg(settings.audit_max_len)
        .arg("*")
        .arg("ts")
        .arg(ns.to_string())
        .arg("tenant")
        .arg(tenant.as_str())
        .arg("actor")
        .arg(actor.as_str())
        .arg("action")
        .arg(action)
        .arg("key")
        .arg(subject);
    command
}

impl TenantKv {
    /// Settings for a store over `client`.
    pub fn builder(client: FailoverClient) -> TenantKvBuilder {
        TenantKvBuilder {
            client,
            max_value_bytes: 1024 * 1024,
            max_metadata_bytes: 8 * 1024,
            audit_max_len: 100_000,
            cursor_secret: None,
            quotas: Quotas::default(),
            tenant_quotas: HashMap::new(),
            encryption_key: None,
            expiry_notifications: true,
            expiry_sweep_interval: Duration::from_secs(60),
            hashing: {
                let slots =
                    (std::thread::available_parallelism().map_or(1, usize::from) / 2).max(1);
                (slots, 4 * slots)
            },
            login_throttle: LoginThrottle::default(),
            data_key_lifetime: Duration::from_secs(1),
        }
    }

    /// Starts the expiry watcher, which writes each `key_expiration` audit
    /// record (and takes the item out of the index and usage counters) as
    /// soon as Redis expires the item. Without it, that happens during the
    /// tenant's next writes; listings leave expired items out either way.
    ///
    /// It subscribes to the master's expired-key notifications
    /// ([`TenantKvBuilder::expiry_notifications`]) and follows failovers.
    /// Notifications are fire-and-forget: those published while it
    /// reconnects are lost. So it also sweeps on every (re)subscription
    /// and every [`TenantKvBuilder::expiry_sweep_interval`]. Every
    /// instance of a service may run one: each expired item is purged,
    /// and recorded, exactly once, by whichever comes first. Stops when
    /// the returned handle is dropped. Needs a Tokio runtime.
    pub fn watch_expirations(&self) -> ExpiryWatcher {
        ExpiryWatcher::start(self.clone())
    }

    /// Deletes `tenant`'s data key: every value it wrote encrypted becomes
    /// unreadable ([`Error::Corrupt`]), whatever copies of the data exist.
    /// New writes get a new data key. Other instances stop using the old
    /// one within [`TenantKvBuilder::data_key_lifetime`], or as soon as
    /// their expiry watcher hears of the destruction; values they write
    /// with it meanwhile are as unreadable as the older ones.
    pub async fn destroy_data_key(&self, tenant: &TenantId) -> Result<()> {
        match &self.inner.encryption {
            Some(encryption) => encryption.destroy(&self.inner.client, tenant).await,
            None => Err(Error::InvalidConfig {
                setting: "encryption_key",
                reason: "this store does not encrypt".to_owned(),
            }),
        }
    }

    /// `tenant`'s items, acted on by `actor`. Nothing here can reach
    /// another tenant's data.
    pub fn tenant(&self, tenant: TenantId, actor: Actor) -> Tenant {
        Tenant {
            keys: TenantKeys::new(&tenant),
            store: self.clone(),
            tenant,
            actor,
        }
    }
}

/// The longest TTL an item may have: 100 years, far inside what Redis's
/// millisecond expiry times can hold.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What to store under a key.
#[derive(Clone, Debug, PartialEq)]
pub struct NewItem {
    /// Any JSON value.
    pub value: Json,
    /// An optional JSON object kept beside the value.
    pub metadata: Option<Map<String, Json>>,
    /// How long the item lives; `None` for ever.
    pub ttl: Option<Duration>,
}

impl NewItem {
    /// `value`, without metadata or TTL.
    pub fn new(value: Json) -> Self {
        Self {
            value,
            metadata: None,
            ttl: None,
        }
    }

    /// With `metadata`.
    #[must_use]
    pub fn metadata(mut self, metadata: Map<String, Json>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Living `ttl` (at most [`MAX_TTL`]).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// A stored item.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Item {
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: Json,
    /// Its metadata, if any.
    pub metadata: Option<Map<String, Json>>,
    /// Its version: bumped by every write, never reused within the tenant
    /// (a recreated key gets a higher one). Use it as an `ETag`.
    pub version: u64,
    /// When it was created (by Redis's clock).
    pub created_at: SystemTime,
    /// When it was last written.
    pub updated_at: SystemTime,
    /// When it expires, if it has a TTL.
    pub expires_at: Option<SystemTime>,
}

/// What a write must find before it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Precondition {
    /// Nothing: create or replace.
    #[default]
    None,
    /// The item must exist (replace only).
    Exists,
    /// The item must exist at this version (compare-and-set).
    Version(u64),
}

/// One write of a [`Tenant::batch`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Write {
    /// Like [`Tenant::create`].
    Create {
        /// The key.
        key: String,
        /// What to store.
        item: NewItem,
    },
    /// Like [`Tenant::put`].
    Put {
        /// The key.
        key: String,
        /// What to store.
        item: NewItem,
        /// What it must find.
        precondition: Precondition,
    },
    /// Like [`Tenant::delete`].
    Delete {
        /// The key.
        key: String,
        /// The version it must find, if any.
        expected_version: Option<u64>,
    },
}

/// What a write did.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Written {
    /// The item as stored.
    Stored(Item),
    /// The item was deleted, taking this version.
    Deleted {
        /// The key.
        key: String,
        /// The version the deletion took.
        version: u64,
    },
}

impl Written {
    fn into_item(self) -> Item {
        match self {
            Self::Stored(item) => item,
            Self::Deleted { .. } => unreachable!("only deletes delete"),
        }
    }
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

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// Keys in byte order.
    pub keys: Vec<String>,
    /// Pass it to get the next page; `None` when the listing is done.
    pub cursor: Option<String>,
}

/// A tenant's usage, as its counters say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Items held.
    pub keys: u64,
    /// Bytes of keys, values and metadata held.
    pub bytes: u64,
}

/// One tenant's view of the store, from [`TenantKv::tenant`].
#[derive(Clone, Debug)]
pub struct Tenant {
    store: TenantKv,
    tenant: TenantId,
    keys: TenantKeys,
    actor: Actor,
}

fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

impl Tenant {
    /// The tenant's id.
    pub fn id(&self) -> &TenantId {
        &self.tenant
    }

    fn client(&self) -> &FailoverClient {
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
        let settings = &self.store.inner;
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
            value = serde_json::to_string(&item.value).expect("JSON values serialize");
            if value.len() > settings.max_value_bytes {
                return Err(Error::InvalidItem {
                    reason: format!(
                        "the value is {} bytes, more than the {} allowed",
                        value.len(),
                        settings.max_value_bytes
                    ),
                });
            }
            if let Some(m) = &item.metadata {
                metadata = serde_json::to_string(m).expect("JSON objects serialize");
            }
            if metadata.len() > settings.max_metadata_bytes {
                return Err(Error::InvalidItem {
                    reason: format!(
                        "the metadata is {} bytes, more than the {} allowed",
                        metadata.len(),
                        settings.max_metadata_bytes
                    ),
                });
            }
            match item.ttl {
                Some(t) if t.as_millis() == 0 => {
                    return Err(Error::InvalidItem {
                        reason: "a TTL must be at least 1 ms".to_owned(),
                    });
                }
                Some(t) if t > MAX_TTL => {
                    return Err(Error::InvalidItem {
                        reason: format!(
                            "a TTL must be at most {} days",
                            MAX_TTL.as_secs() / 86_400
                        ),
                    });
                }
                Some(t) => ttl = t.as_millis().to_string(),
                None => {}
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

    /// Runs prepared writes in one script. An error names the write at
    /// fault, if one is.
    async fn run(
        &self,
        mut writes: Vec<Prepared>,
        idempotent: bool,
    ) -> Result<Vec<Written>, (Option<usize>, Error)> {
        let settings = &self.store.inner;
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
        let reply: Vec<Value> = WRITE
            .run(
                self.client(),
                &self.write_script(&writes, &quotas),
                idempotent,
            )
            .await
            .map_err(|e| (None, e))?;
        let status = match reply.first() {
            Some(Value::BulkString(status)) => String::from_utf8_lossy(status).into_owned(),
            _ => String::new(),
        };
        let numbers: Vec<u64> = reply.iter().skip(1).map(|v| int(v).unwrap_or(0)).collect();
        if status == "ok" {
            return Ok(writes
                .into_iter()
                .zip(numbers.chunks(3))
                .map(|(write, numbers)| {
                    let [version, created, updated] = numbers else {
                        unreachable!("three numbers per write")
                    };
                    match write.item {
                        None => Written::Deleted {
                            key: write.key,
                            version: *version,
                        },
                        Some(item) => Written::Stored(Item {
                            expires_at: item.ttl.map(|ttl| ms_to_time(*updated) + ttl),
                            key: write.key,
                            value: item.value,
                            metadata: item.metadata,
                            version: *version,
                            created_at: ms_to_time(*created),
                            updated_at: ms_to_time(*updated),
                        }),
                    }
                })
                .collect());
        }
        let (at, number) = (
            numbers.first().copied().unwrap_or(0),
            numbers.get(1).copied().unwrap_or(0),
        );
        let index = usize::try_from(at).ok().and_then(|at| at.checked_sub(1));
        let key = index
            .and_then(|i| writes.get(i))
            .map_or_else(String::new, |w| w.key.clone());
        let error = match status.as_str() {
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
        Err((index, error))
    }

    /// The write script's command for `writes` (none: a purge) under `quotas`.
    fn write_script(&self, writes: &[Prepared], quotas: &Quotas) -> redis::Cmd {
        let optional = |n: Option<u64>| n.map_or_else(String::new, |n| n.to_string());
        let mut keys = vec![
            self.keys.index(),
            self.keys.expiry(),
            self.keys.expiring_sizes(),
            self.keys.usage(),
            self.keys.audit(),
            self.keys.rate(),
        ];
        keys.extend(writes.iter().map(|write| self.keys.data(&write.key)));
        let mut command = WRITE.command(&keys);
        command
            .arg(self.actor.as_str())
            .arg(self.keys.data_prefix())
            .arg(optional(quotas.max_keys))
            .arg(optional(quotas.max_bytes))
            .arg(self.store.inner.audit_max_len)
            .arg(self.tenant.as_str())
            .arg(optional(quotas.writes_per_second.map(u64::from)))
            .arg(quotas.write_burst());
        for write in writes {
            command
                .arg(write.op)
                .arg(&write.key)
                .arg(optional(write.expected))
                .arg(&write.value)
                .arg(&write.metadata)
                .arg(&write.ttl);
        }
        command
    }

    /// Takes the items whose TTL ran out out of the index and the usage
    /// counters, each with a `key_expiration` audit record by
    /// [`Actor::system`], and returns how many. An item is purged once
    /// however many callers try: the expiry watcher
    /// ([`TenantKv::watch_expirations`]) calls this when Redis reports an
    /// expiry, and writes purge a few on their way.
    pub async fn purge_expired(&self) -> Result<u64> {
        let command = self.write_script(&[], &Quotas::unlimited());
        let mut total = 0;
        loop {
            let reply: Vec<Value> = WRITE.run(self.client(), &command, true).await?;
            let purged = reply.get(1).and_then(int).unwrap_or(0);
            total += purged;
            if purged < PURGE_BATCH {
                return Ok(total);
            }
        }
    }

    /// The item under `key`, read by the client's read policy. Audited as
    /// `get_key` through a `tracing` event with target `audit` (no write).
    pub async fn get(&self, key: &str) -> Result<Item> {
        check_key(key)?;
        let stored: Stored = self
            .client()
            .read(
                redis::cmd("HMGET")
                    .arg(self.keys.data(key))
                    .arg(&Stored::FIELDS),
            )
            .await?;
        match self.parse(key, stored).await? {
            Some(item) => Ok(item),
            None => Err(Error::NotFound {
                key: key.to_owned(),
            }),
        }
    }

    /// The items under `keys` (`None` where there is none), in one round
    /// trip, read by the client's read policy; each audited like [`get`](Self::get).
    pub async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Item>>> {
        let mut pipeline = redis::pipe();
        for key in keys {
            check_key(key)?;
            pipeline
                .cmd("HMGET")
                .arg(self.keys.data(key))
                .arg(&Stored::FIELDS);
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<Stored> = self.client().read_pipeline(&pipeline).await?;
        keys.iter()
            .zip(replies)
            .map(|(key, stored)| self.parse(key, stored))
            .collect::<futures_util::future::TryJoinAll<_>>()
            .await
    }

    /// Decrypts (if need be) and reads a stored item, auditing the read.
    async fn parse(&self, key: &str, mut stored: Stored) -> Result<Option<Item>> {
        let settings = &self.store.inner;
        let Some(value) = &stored.value else {
            return Ok(None);
        };
        if Encryption::is_encrypted(value) {
            let Some(encryption) = &settings.encryption else {
                return Err(Error::Corrupt {
                    key: key.to_owned(),
                    reason: "the value is encrypted and this store has no encryption key"
                        .to_owned(),
                });
            };
            let plain = encryption
                .decrypt(&settings.client, &self.tenant, key, value)
                .await?;
            stored.value = Some(plain);
        }
        let item = stored.to_item(key)?;
        tracing::info!(
            target: "audit",
            tenant_id = %self.tenant,
            actor = self.actor.as_str(),
            action = "get_key",
            key = item.key,
            version = item.version,
            size = stored.size.as_deref().unwrap_or("0"),
        );
        Ok(Some(item))
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

/// An item's hash as `HMGET` of [`Stored::FIELDS`] returns it; no value
/// means no item.
#[derive(Debug)]
struct Stored {
    value: Option<String>,
    metadata: Option<String>,
    version: Option<String>,
    created: Option<String>,
    updated: Option<String>,
    expires: Option<String>,
    size: Option<String>,
}

impl Stored {
    const FIELDS: [&str; 7] = [
        "value", "metadata", "version", "created", "updated", "expires", "size",
    ];

    fn to_item(&self, key: &str) -> Result<Item> {
        let corrupt = |reason: &str| Error::Corrupt {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        let number = |name: &str, field: &Option<String>| -> Result<u64> {
            field
                .as_deref()
                .ok_or_else(|| corrupt(&format!("no `{name}`")))?
                .parse::<f64>()
                .map(|n| n as u64)
                .map_err(|e| corrupt(&format!("`{name}`: {e}")))
        };
        let value = self.value.as_deref().ok_or_else(|| corrupt("no `value`"))?;
        let value = serde_json::from_str(value).map_err(|e| corrupt(&format!("`value`: {e}")))?;
        let metadata = match &self.metadata {
            Some(m) => {
                Some(serde_json::from_str(m).map_err(|e| corrupt(&format!("`metadata`: {e}")))?)
            }
            None => None,
        };
        Ok(Item {
            key: key.to_owned(),
            value,
            metadata,
            version: number("version", &self.version)?,
            created_at: ms_to_time(number("created", &self.created)?),
            updated_at: ms_to_time(number("updated", &self.updated)?),
            expires_at: self
                .expires
                .is_some()
                .then(|| number("expires", &self.expires).map(ms_to_time))
                .transpose()?,
        })
    }
}

impl redis::FromRedisValue for Stored {
    fn from_redis_value(value: Value) -> std::result::Result<Self, redis::ParsingError> {
        let [value, metadata, version, created, updated, expires, size] =
            <[Option<String>; 7]>::from_redis_value(value)?;
        Ok(Self {
            value,
            metadata,
            version,
            created,
            updated,
            expires,
            size,
        })
    }
}
