//! The store, its settings, and one tenant's view of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis_failover::FailoverClient;

use crate::auth_cache::{AuthCacheState, DEFAULT_AUTH_CACHE_CAPACITY};
use crate::crypto::Encryption;
use crate::cursor::Cursors;
use crate::error::{Error, Result};
use crate::expiry::ExpiryWatcher;
use crate::keys::TenantId;
use crate::layout::LayoutCache;
use crate::limits::{QuotaCache, Quotas};
use crate::passwords::Hasher;
use crate::ratelimit::Refusals;
use crate::tenant::Tenant;
use crate::users::LoginThrottle;

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
    read_audit_sample: u32,
    auth_cache_capacity: usize,
    stage_audit_records: bool,
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

    /// Audits one read in `every` (`get`, `get_raw` and each item of
    /// `get_many`), the records of sampled reads saying `sampled = every`;
    /// writes are always audited. A read audit is a log record buffered,
    /// replicated and shipped, about as dear as the read itself: sampling
    /// trades the record of every read for throughput. Defaults to 1:
    /// every read is audited.
    pub fn read_audit_sample(mut self, every: u32) -> Self {
        self.read_audit_sample = every;
        self
    }

    /// About how many entries each tenant's audit stream keeps (`XADD
    /// MAXLEN ~`) for the log shipper to take: a record each, or, with
    /// [`stage_audit_records`](Self::stage_audit_records), up to 64 item
    /// writes' records. Defaults to 100,000.
    pub fn audit_max_len(mut self, records: u64) -> Self {
        self.audit_max_len = records;
        self
    }

    /// Whether item writes stage their audit records on the audit stream's
    /// staging list (`tenant:{<id>}:audit:staged`, log-buffer's
    /// `staging_list`), for log-buffer's offloader to move into the stream
    /// 64 to an entry, rather than appending an entry each. For stores
    /// whose audit streams that offloader reads: a record reaches the
    /// stream when the offloader next reads it, or with the 64th staged
    /// record, in one entry. [`audit_max_len`](Self::audit_max_len) still
    /// counts entries: while nothing ships the stream, it can hold up to
    /// 64 times as many records of item writes before the oldest go.
    /// Redis's cost, and a reader's, is per entry: on
    /// this workspace's benchmark an audited `PUT` took about 8% fewer
    /// instructions in the server's process. Other records (logins,
    /// users, API keys, the expiry watcher's expirations) are appended as
    /// before. Defaults to `false`: each record is in the stream once its
    /// write is.
    pub fn stage_audit_records(mut self, staged: bool) -> Self {
        self.stage_audit_records = staged;
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

    /// How many user and API-key records the authentication cache holds
    /// at most ([`TenantKv::cache_auth`]), past which it forgets one to
    /// store another. A record is a few hundred bytes. Defaults to
    /// [`DEFAULT_AUTH_CACHE_CAPACITY`] (10,000).
    pub fn auth_cache_capacity(mut self, records: usize) -> Self {
        self.auth_cache_capacity = records;
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
        if self.read_audit_sample == 0 {
            return invalid(
                "read_audit_sample",
                "must be more than zero (1: every read)",
            );
        }
        if self.expiry_sweep_interval.is_zero() {
            return invalid("expiry_sweep_interval", "must be more than zero");
        }
        if self.auth_cache_capacity == 0 {
            return invalid("auth_cache_capacity", "must be more than zero");
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
                layout: LayoutCache::default(),
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
                read_audits: ReadAudits::new(self.read_audit_sample),
                auth_cache: AuthCacheState::new(self.auth_cache_capacity),
                stage_audit_records: self.stage_audit_records,
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
    pub(crate) max_value_bytes: usize,
    pub(crate) max_metadata_bytes: usize,
    pub(crate) audit_max_len: u64,
    pub(crate) cursors: Cursors,
    /// The storage layout Redis holds, as last read.
    pub(crate) layout: LayoutCache,
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
    pub(crate) read_audits: ReadAudits,
    /// User and API-key records, while [`TenantKv::cache_auth`] runs.
    pub(crate) auth_cache: AuthCacheState,
    /// Whether item writes stage their audit records (see
    /// [`TenantKvBuilder::stage_audit_records`]).
    pub(crate) stage_audit_records: bool,
}

/// Which reads are audited: one in `every`, counted across the store.
#[derive(Debug)]
pub(crate) struct ReadAudits {
    every: u64,
    reads: AtomicU64,
}

impl ReadAudits {
    fn new(every: u32) -> Self {
        Self {
            every: u64::from(every),
            reads: AtomicU64::new(0),
        }
    }

    /// Whether this read is audited, and for how many reads its record
    /// stands (1 when every read is).
    pub(crate) fn next(&self) -> Option<u64> {
        if self.every == 1 {
            return Some(1);
        }
        let n = self.reads.fetch_add(1, Ordering::Relaxed);
        n.is_multiple_of(self.every).then_some(self.every)
    }
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
            read_audit_sample: 1,
            auth_cache_capacity: DEFAULT_AUTH_CACHE_CAPACITY,
            stage_audit_records: false,
        }
    }

    /// Starts the expiry watcher, which writes each `key_expiration` audit
    /// record (and takes the item out of the index and usage counters) as
    /// soon as Redis expires the item. Without it, an expired item stays
    /// in the index and the usage counters until a write replaces it or a
    /// quota refusal needs its room (writes do not scan for expired
    /// items); listings and reads leave expired items out either way. Run
    /// one watcher per deployment (the server does).
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
        Tenant::new(self.clone(), tenant, actor)
    }
}

#[cfg(test)]
mod tests {
    use super::ReadAudits;

    #[test]
    fn one_read_in_every_is_audited_and_says_for_how_many() {
        let every = ReadAudits::new(1);
        assert!((0..5).all(|_| every.next() == Some(1)));
        let sampled = ReadAudits::new(3);
        let seen: Vec<Option<u64>> = (0..7).map(|_| sampled.next()).collect();
        assert_eq!(seen, [Some(3), None, None, Some(3), None, None, Some(3)]);
    }
}
