//! The authentication cache: user and API-key records (their Redis hashes)
//! kept in the process, so that an authenticated request needs no round
//! trip to Redis in the common case, and invalidated by Redis itself.
//!
//! Model. Users live at `user:<name>` and API keys at `api-key:<id>`,
//! outside the tenants' keys, so two fixed prefixes cover every record:
//! [`tracking`] keeps one connection of its own to the master (to each
//! master of a cluster) with
//! `CLIENT TRACKING on BCAST PREFIX user: PREFIX api-key:`, and the master
//! pushes the name of every such key any client modifies (or a null for
//! `FLUSHALL`/`FLUSHDB`) on that connection. BCAST needs no tracked read:
//! the records are read over the failover client's shared connections,
//! which know nothing of tracking.
//!
//! On a cluster, "the master generation" below is the client's
//! [`masters_epoch`](FailoverClient::masters_epoch), which changes once the
//! client's slot map has a master join or leave (after a `MOVED`, or at a
//! reload of the map). Until then, the heartbeat covers a failover: the
//! lease runs from a round in which every tracked node said it still is a
//! master of a cluster that serves (`ROLE`, `CLUSTER INFO`): a master
//! cut off in a minority reports `cluster_state:fail` after the node
//! timeout, the one after which the majority may promote its replica, so
//! the cache stops within the lease of that (and a failed heartbeat has
//! the client load its map again, so the new epoch comes without waiting
//! for a `MOVED`); a master demoted in good order (`CLUSTER
//! FAILOVER`) stays tracked as a replica, and Redis pushes the
//! invalidations of the writes it replicates. A record is stored only
//! when the master the map names for its slot served it (`query_on`):
//! one read through an `ASK` redirect could come from a node not tracked
//! yet. A slot moving between tracked masters needs nothing more: every
//! write to a record on either one is pushed, and `MIGRATE` (what
//! `redis-cli --cluster reshard` and `rebalance` use) deletes the record
//! on the source, which pushes its invalidation too.
//!
//! Why the cache can never serve what an old master said:
//! - It serves only while tracking is on for the master generation the
//!   failover client uses *now* ([`FailoverClient::master`]): a new master
//!   the client installed (failover, restart, a master found again) stops
//!   it at once, before the tracking task has even heard of it, and the
//!   task then drops every entry and turns tracking on again on the new
//!   master.
//! - It serves only within [`LEASE`] of the send time of the last `PING`
//!   the master answered on the tracking connection: an answer to a `PING`
//!   comes after every invalidation of writes the master ran before it, so
//!   a connection that went silent (a partition, a hung master) stops the
//!   cache within the lease, even before the connection is known dead.
//! - Every state change (tracking on or off, an invalidation, a local
//!   write) bumps a sequence number, and a record read from Redis is
//!   stored only if the sequence did not move while it was read: a read
//!   that raced with a write cannot store the value the write replaced
//!   after its invalidation was applied, nor can one made before tracking
//!   was on.
//!
//! [`FailoverClient::master`]: redis_failover::FailoverClient::master

mod tracking;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis_failover::FailoverClient;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::{Error, Result};
use crate::store::TenantKv;

/// The prefixes of every key the cache holds: users and API keys.
pub(crate) const USER_PREFIX: &str = "user:";
pub(crate) const API_KEY_PREFIX: &str = "api-key:";

/// How many records the cache holds by default.
pub const DEFAULT_AUTH_CACHE_CAPACITY: usize = 10_000;

/// How long after the send time of the last `PING` the master answered on
/// the tracking connection the cache may serve: its bound on staleness
/// when invalidations stop arriving without the connection failing.
pub(crate) const LEASE: Duration = Duration::from_secs(1);

/// A record as Redis holds it: the fields of its hash.
pub(crate) type Fields = Arc<HashMap<String, String>>;

/// The cache's counters, from [`TenantKv::auth_cache_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthCacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that read Redis while the cache was serving.
    pub misses: u64,
    /// Keys invalidated by the master, or by this store's own writes.
    pub invalidations: u64,
    /// Times the whole cache was dropped: tracking lost or turned on
    /// again, a new master, a flush.
    pub drops: u64,
    /// Records held now.
    pub entries: usize,
    /// Whether the cache serves now (tracking on, for the current master).
    pub serving: bool,
}

/// When the cache may serve.
#[derive(Clone, Copy, Debug)]
struct Tracking {
    /// The master generation tracking is on for.
    generation: u64,
    /// Until when, from the last `PING` answered ([`LEASE`]).
    valid_until: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Fields>,
    /// Bumped on every change that could make a read in flight stale.
    sequence: u64,
    /// `None`: nothing is served or stored.
    tracking: Option<Tracking>,
}

/// The cache shared by a store's clones, whether or not its tracking runs.
#[derive(Debug)]
pub(crate) struct AuthCacheState {
    capacity: usize,
    inner: Mutex<Inner>,
    /// Whether a tracking task runs (one per store).
    started: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    drops: AtomicU64,
}

/// The generation of the master `client` uses now; on a cluster, the
/// epoch of its set of masters.
fn generation(client: &FailoverClient) -> Option<u64> {
    client.masters_epoch()
}

/// What a read from Redis needs to be stored: the sequence it began at.
struct Ticket(u64);

impl AuthCacheState {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
            started: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            drops: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent whatever panicked while it was held.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `tracking` lets the cache serve now, when the client's
    /// master is of `generation`.
    fn serves(tracking: Option<Tracking>, generation: Option<u64>) -> bool {
        tracking.is_some_and(|t| Instant::now() < t.valid_until && generation == Some(t.generation))
    }

    /// The record at `key` from the cache, or else a ticket to store the
    /// one about to be read (`None` while the cache does not serve).
    fn lookup(&self, key: &str, generation: Option<u64>) -> Result<Fields, Option<Ticket>> {
        let inner = self.lock();
        if !Self::serves(inner.tracking, generation) {
            return Err(None);
        }
        if let Some(fields) = inner.entries.get(key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(fields));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Err(Some(Ticket(inner.sequence)))
    }

    /// Stores what was read under `ticket`, unless anything changed since
    /// it was taken. Absent records are not stored: random ids must not
    /// push real records out.
    fn store(&self, ticket: Ticket, key: &str, fields: &Fields, generation: Option<u64>) {
        if fields.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if inner.sequence != ticket.0 || !Self::serves(inner.tracking, generation) {
            return;
        }
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(key) {
            // Any one: the cache is a working set, not a history.
            if let Some(victim) = inner.entries.keys().next().cloned() {
                inner.entries.remove(&victim);
            }
        }
        inner.entries.insert(key.to_owned(), Arc::clone(fields));
    }

    /// The record at `key` (an empty map if there is none): from the cache
    /// when it serves and holds it, else from the master.
    pub(crate) async fn fetch(&self, client: &FailoverClient, key: &str) -> Result<Fields> {
        let ticket = match self.lookup(key, generation(client)) {
            Ok(fields) => return Ok(fields),
            Err(ticket) => ticket,
        };
        let hgetall = redis::cmd("HGETALL").arg(key).clone();
        // On a cluster, only a read the slot's own master served may be
        // stored: one through an `ASK` redirect could come from a node not
        // tracked yet.
        let on_master = match client.master_of(key) {
            Some(master) if ticket.is_some() && client.is_cluster() => {
                let read = client.query_on::<HashMap<_, _>>(&master, &hgetall);
                tokio::time::timeout(LEASE, read)
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            _ => None,
        };
        // Else (a redirect, a master failing, one master): read where the
        // client routes, following any failover.
        let (fields, tracked) = match on_master {
            Some(fields) => (fields, true),
            None => (client.query(&hgetall).await?, !client.is_cluster()),
        };
        let fields = Arc::new(fields);
        if let (Some(ticket), true) = (ticket, tracked) {
            // The generation after the read: a read served by a master
            // installed meanwhile is not stored.
            self.store(ticket, key, &fields, generation(client));
        }
        Ok(fields)
    }

    /// Forgets `keys`: the master invalidated them, or this store wrote them.
    pub(crate) fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        inner.sequence += 1;
        for key in keys {
            inner.entries.remove(key);
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops every record, tracking staying as it is (a flush).
    fn flush(&self) {
        let mut inner = self.lock();
        inner.sequence += 1;
        inner.entries.clear();
        self.drops.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops every record; with `tracking`, serves from then on for it.
    fn reset(&self, tracking: Option<Tracking>) {
        let mut inner = self.lock();
        inner.sequence += 1;
        if !inner.entries.is_empty() || inner.tracking.is_some() {
            self.drops.fetch_add(1, Ordering::Relaxed);
        }
        inner.entries.clear();
        inner.tracking = tracking;
    }

    /// Extends the lease to [`LEASE`] after `sent`, when a `PING` sent then
    /// was answered on the tracking connection for `generation`.
    fn renew(&self, generation: u64, sent: Instant) {
        let mut inner = self.lock();
        if let Some(tracking) = &mut inner.tracking
            && tracking.generation == generation
        {
            tracking.valid_until = tracking.valid_until.max(sent + LEASE);
        }
    }

    /// The counters, with the client's master of `generation`.
    fn stats_now(&self, generation: Option<u64>) -> AuthCacheStats {
        let inner = self.lock();
        AuthCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            entries: inner.entries.len(),
            serving: Self::serves(inner.tracking, generation),
        }
    }
}

/// A running authentication cache (see [`TenantKv::cache_auth`]). It
/// stops, and the store reads every record from Redis again, when dropped
/// or on [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct AuthCache {
    // Cancels the task when the handle is dropped.
    stop: DropGuard,
    task: JoinHandle<()>,
}

impl AuthCache {
    /// Stops the cache and waits until its tracking connection is closed.
    pub async fn shutdown(self) {
        let Self { stop, task } = self;
        drop(stop);
        let _ = task.await;
    }
}

impl TenantKv {
    /// Starts caching user and API-key records in this process (for every
    /// clone of this store), invalidated by the master through client
    /// tracking, so that [`Users::get`](crate::Users::get) and
    /// [`ApiKeys::verify`](crate::ApiKeys::verify) need no round trip in
    /// the common case: a change made anywhere (another instance,
    /// `redis-cli`) reaches the cache as soon as the master's push does.
    ///
    /// The cache holds up to
    /// [`TenantKvBuilder::auth_cache_capacity`](crate::TenantKvBuilder::auth_cache_capacity)
    /// records. It serves only while its tracking connection is up and
    /// answers, for the master the client uses now: on a new master, a
    /// lost connection or a flush it drops everything and serves again
    /// once tracking is on again. Records of users and keys that do not
    /// exist are never cached. Needs Redis 6 or later (RESP3) and the
    /// `CLIENT` command for the client's user. Stops when the returned
    /// handle is dropped. Needs a Tokio runtime.
    ///
    /// Fails with [`Error::InvalidConfig`] if this store's cache already runs.
    pub fn cache_auth(&self) -> Result<AuthCache> {
        let state = &self.inner.auth_cache;
        if state.started.swap(true, Ordering::AcqRel) {
            return Err(Error::InvalidConfig {
                setting: "auth_cache",
                reason: "this store's authentication cache runs already".to_owned(),
            });
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(tracking::run(self.clone(), stop.clone()));
        Ok(AuthCache {
            stop: stop.drop_guard(),
            task,
        })
    }

    /// The authentication cache's counters.
    pub fn auth_cache_stats(&self) -> AuthCacheStats {
        self.inner
            .auth_cache
            .stats_now(generation(&self.inner.client))
    }
}

#[cfg(test)]
mod tests;
